"""Do the explanations point at what the model uses? The deletion test on the served engine.

For each test text (cpu-demo export, `models/onnx`), `POST /v1/explain`'s occlusion weights
(lmops/explain.py) rank its tokens; deleting the k top-weighted tokens together must move
the predicted label's probability more than deleting k tokens picked at random (the mean
over `--random-draws` draws), for k = 20% of the text's tokens (at least 1). Writes
reports/bench/explain.json: both mean drops, their ratio and the share of texts where the
top-k drop is larger, with the seconds an explanation took.

    python -m bench.explain [--texts 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from lmops.engine import Engine
from lmops.explain import deletion_drop, occlusion

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="reports/bench/explain.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    engine = Engine(ROOT / "models/onnx", require_gpu=False, max_batch_size=32)
    test = pd.read_parquet(ROOT / "data/validated/test.parquet")
    texts = test["text"].sample(n=min(args.texts, len(test)), random_state=args.seed).tolist()
    top_drops, random_drops, seconds = [], [], []
    for text in texts:
        encoding = engine.tokenizer.encode(text)
        special = {t for t, m in zip(encoding.ids, encoding.special_tokens_mask, strict=True) if m}
        started = time.perf_counter()
        found = occlusion(encoding.ids, special, engine.score_ids)
        seconds.append(time.perf_counter() - started)
        if len(found.positions) < 2:
            continue
        k = max(1, round(args.share * len(found.positions)))
        top = [found.positions[i] for i in np.argsort(-found.weights)[:k]]
        top_drops.append(deletion_drop(encoding.ids, top, found.label, engine.score_ids))
        random_drops.append(
            float(
                np.mean(
                    [
                        deletion_drop(
                            encoding.ids,
                            list(rng.choice(found.positions, size=k, replace=False)),
                            found.label,
                            engine.score_ids,
                        )
                        for _ in range(args.random_draws)
                    ]
                )
            )
        )
    top_arr, random_arr = np.array(top_drops), np.array(random_drops)
    result = {
        "what": __doc__.splitlines()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "model": {"variant": engine.variant, "version": engine.version},
        "settings": vars(args),
        "texts_scored": len(top_drops),
        "mean_drop_top_k": round(float(top_arr.mean()), 4),
        "mean_drop_random_k": round(float(random_arr.mean()), 4),
        "top_over_random": round(float(top_arr.mean() / random_arr.mean()), 2),
        "share_of_texts_top_drop_larger": round(float((top_arr > random_arr).mean()), 3),
        "explain_ms_median": round(float(np.median(seconds)) * 1000, 2),
        "explain_ms_p90": round(float(np.quantile(seconds, 0.9)) * 1000, 2),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
