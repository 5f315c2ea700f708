"""Pretraining throughput: our stage's loop vs a plain Hugging Face `Trainer` with default
arguments, on the same model, tokenizer and packed data, measured in one run.

    .venv/bin/python bench/train.py [--profile cpu-demo] [--steps 20]

Writes reports/bench/train.json. Needs data/validated and models/tokenizer (make run).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmops.config import Params, override, parse_params, profile_overrides, read_raw
from lmops.stages import TOKENIZER_DIR, VALIDATED_DIR


def pack(tokenizer: Any, texts: list[str], seq_len: int) -> Any:
    """Concatenate documents separated by [SEP] and cut them into `[CLS] … [SEP]` rows, in
    memory: the Hugging Face Trainer's side of this bench (pretraining itself reads its rows
    from token files, lmops/tokens.py)."""
    import torch

    body = seq_len - 2
    # The backend directly: documents are longer than a sequence on purpose here.
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    stream = [token for doc in ids for token in (*doc, tokenizer.sep_token_id)]
    rows = len(stream) // body
    if rows == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    chunks = torch.tensor(stream[: rows * body], dtype=torch.long).view(rows, body)
    cls = torch.full((rows, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((rows, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, chunks, sep], dim=1)


def _params(root: Path, profile: str, steps: int) -> Params:
    overrides = {
        **profile_overrides(root, profile),
        "pretrain.steps": steps,
        "pretrain.checkpoint_every": steps + 1,
    }
    return parse_params(override(read_raw(root), overrides))


def ours(params: Params, root: Path, scratch: Path) -> dict:
    from lmops.tasks import pretrain

    metrics = pretrain.run(
        params.pretrain,
        params.model,
        root / TOKENIZER_DIR,
        root / VALIDATED_DIR,
        scratch / "ours",
        scratch / "tokens",
        scratch / "ckpt",
        scratch / "live",
        scratch / "ours.json",
    )
    return {"tokens_per_s": metrics["tokens_per_s"], "seconds": metrics["seconds"]}


def hf_trainer(params: Params, root: Path, scratch: Path) -> dict:
    """Trainer with default TrainingArguments except what must match: batch size, steps,
    learning rate and seed (and no logging integrations, which would add I/O)."""
    import pandas as pd
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lmops.modeling import language_model, load_tokenizer
    from lmops.tasks.pretrain import _collator

    tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    texts = [
        t
        for table in ("corpus", "train")
        for t in pd.read_parquet(root / VALIDATED_DIR / f"{table}.parquet")["text"]
    ]
    rows = pack(tokenizer, texts, params.model.max_length)
    dataset = [{"input_ids": r} for r in rows]
    torch.manual_seed(params.pretrain.seed)
    model = language_model(params.model, tokenizer)

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    arguments = TrainingArguments(
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=params.pretrain.batch_size,
        max_steps=params.pretrain.steps,
        learning_rate=params.pretrain.learning_rate,
        seed=params.pretrain.seed,
        report_to="none",
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=_collator(
            tokenizer, params.model.architecture, params.pretrain.mask_probability
        ),
        callbacks=[clock],
    )
    trainer.train()
    tokens = params.pretrain.steps * params.pretrain.batch_size * params.model.max_length
    return {"tokens_per_s": round(tokens / clock.seconds, 1), "seconds": round(clock.seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="reports/bench/train.json")
    args = parser.parse_args()
    root = Path.cwd()
    params = _params(root, args.profile, args.steps)
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        trainer = hf_trainer(params, root, Path(scratch))
        our = ours(params, root, Path(scratch))
    result = {
        "what": "pretraining tokens/s: lmops pretrain stage vs transformers.Trainer (defaults)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "profile": args.profile,
        "model": params.model.model_dump(),
        "steps": args.steps,
        "batch_size": params.pretrain.batch_size,
        "lmops": our,
        "hf_trainer": trainer,
        "ratio_lmops_over_trainer": round(our["tokens_per_s"] / trainer["tokens_per_s"], 3),
    }
    out = root / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
