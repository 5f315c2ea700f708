"""Tokenizer, pretraining, fine-tuning and evaluation on a tiny model and real data."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmops.calibration import expected_calibration_error
from lmops.config import Params
from lmops.errors import ConfigError, DataError
from lmops.tasks import evaluate, finetune, pretrain, tokenizer
from tests.conftest import params_with, tiny_raw, tool_env, without_base


def tiny(repo_params_raw: dict, **dotted: Any) -> Params:
    return params_with(tiny_raw(repo_params_raw), **dotted)


@pytest.fixture(scope="module")
def tokenizer_dir(
    repo_params_raw: dict, tiny_validated: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    params = tiny(repo_params_raw)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer.run(params.tokenizer, params.model, tiny_validated, out, out.parent / "t.json")
    return out


def _pretrain(params: Params, tokenizer_dir: Path, validated: Path, root: Path) -> dict:
    return pretrain.run(
        params.pretrain,
        params.model,
        tokenizer_dir,
        validated,
        root / "pretrained",
        root / "tokens",
        root / "ckpt",
        root / "live",
        root / "p.json",
    )


def test_the_tokenizer_trains_on_a_seeded_sample(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    """tokenizer.sample_docs: that many documents, the same ones every run, drawn in one
    pass; null streams every document of the corpus and train split, in order."""
    import pandas as pd

    every = [
        t
        for table in ("corpus", "train")
        for t in pd.read_parquet(tiny_validated / f"{table}.parquet")["text"]
    ]
    assert list(tokenizer._texts(tiny_validated, None)) == every
    sample = list(tokenizer._texts(tiny_validated, 300))
    assert len(sample) == 300 and set(sample) <= set(every)
    assert sample == list(tokenizer._texts(tiny_validated, 300))
    assert sample[:10] != every[:10]  # drawn from the whole stream, not its head
    params = tiny(repo_params_raw, tokenizer__sample_docs=300)
    made = [tmp_path / name for name in ("a", "b")]
    for out in made:
        tokenizer.run(params.tokenizer, params.model, tiny_validated, out, out.parent / "t.json")
    # The same vocabulary (the trainer numbers tied tokens in no fixed order, sample or not).
    vocabularies = [
        json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] for out in made
    ]
    assert set(vocabularies[0]) == set(vocabularies[1])


def test_tokenizer_loads_offline_and_adds_cls_sep(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    loaded = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokens = loaded.convert_ids_to_tokens(loaded("这本书很好")["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens[1:-1] == ["这", "本", "书", "很", "好"]  # CJK: one character a token
    metrics = json.loads((tokenizer_dir.parent / "t.json").read_text("utf-8"))
    assert metrics["vocab_size"] == len(loaded) >= 1000  # every character is kept
    assert 0 <= metrics["val_unknown_token_rate"] < 0.05


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_latin_and_cjk_text_both_tokenise(repo_params_raw: dict, kind: str) -> None:
    params = tiny(repo_params_raw, tokenizer__kind=kind, tokenizer__vocab_size=300)
    texts = [
        "great book, loved it",
        "terrible service and slow delivery",
        "这本书很好看",
        "质量很差",
        "Great value, would buy again",
    ] * 50
    built = tokenizer.build(params.tokenizer, params.model, iter(texts))
    assert tokenizer.unknown_rate(built, ["slow delivery, great value", "这本书很差"]) == 0.0
    assert (
        built.decode(built("great book")["input_ids"], skip_special_tokens=True).replace(" ", "")
        == "greatbook"
    )
    assert len(built("很好 " * 100, truncation=True)["input_ids"]) == params.model.max_length


@pytest.mark.parametrize(
    ("architecture", "auto_class"),
    [("bert", "AutoModelForMaskedLM"), ("gpt2", "AutoModelForCausalLM")],
)
def test_pretrain_writes_a_loadable_language_model(
    repo_params_raw: dict,
    tokenizer_dir: Path,
    tiny_validated: Path,
    tmp_path: Path,
    architecture: str,
    auto_class: str,
) -> None:
    import transformers

    params = tiny(repo_params_raw, model__architecture=architecture)
    metrics = _pretrain(params, tokenizer_dir, tiny_validated, tmp_path)
    assert metrics["objective"] == ("masked-lm" if architecture == "bert" else "causal-lm")
    assert math.isfinite(metrics["val_perplexity"]) and metrics["val_perplexity"] > 1
    assert metrics["steps"] == 20 and metrics["tokens_per_s"] > 0
    model = getattr(transformers, auto_class).from_pretrained(str(tmp_path / "pretrained"))
    assert model.config.num_hidden_layers == 1
    assert (tmp_path / "pretrained" / "model.safetensors").is_file()
    loss_log = tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(loss_log.read_text("utf-8").splitlines()) == 21  # header + one row a step
    assert not (tmp_path / "ckpt").exists()  # checkpoints go once the model is saved


def test_same_seed_gives_the_same_metrics(
    repo_params_raw: dict, tokenizer_dir: Path, tiny_validated: Path, tmp_path: Path
) -> None:
    """Tolerance: 1e-6 relative; on CPU the runs are bit-identical in practice."""
    params = tiny(repo_params_raw)
    first = _pretrain(params, tokenizer_dir, tiny_validated, tmp_path / "a")
    second = _pretrain(params, tokenizer_dir, tiny_validated, tmp_path / "b")
    assert second["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    other = _pretrain(
        tiny(repo_params_raw, pretrain__seed=1), tokenizer_dir, tiny_validated, tmp_path / "c"
    )
    assert other["val_loss"] != first["val_loss"]


def test_corpus_too_small_for_the_batch_is_refused_before_training(
    repo_params_raw: dict, tokenizer_dir: Path, tiny_validated: Path, tmp_path: Path
) -> None:
    params = tiny(repo_params_raw, pretrain__batch_size=100_000)
    with pytest.raises(DataError, match=r"fewer than one batch \(pretrain.batch_size=100000"):
        _pretrain(params, tokenizer_dir, tiny_validated, tmp_path)
    assert not (tmp_path / "pretrained").exists()


def test_invalid_hyper_parameters_are_rejected_with_their_key(repo_params_raw: dict) -> None:
    with pytest.raises(ConfigError, match=r"model\.heads \(3\) must divide model\.hidden_size"):
        tiny(repo_params_raw, model__heads=3)
    with pytest.raises(ConfigError, match=r"pretrain\.steps: Input should be greater"):
        tiny(repo_params_raw, pretrain__steps=0)
    with pytest.raises(ConfigError, match=r"model\.architecture"):
        tiny(repo_params_raw, model__architecture="t5")


@pytest.mark.model
@pytest.mark.parametrize(
    ("architecture", "ngrams"), [("bert", False), ("gpt2", False), ("bert", True)]
)
def test_finetune_and_evaluate_against_the_baseline(
    repo_params_raw: dict,
    tokenizer_dir: Path,
    tiny_validated: Path,
    tmp_path: Path,
    architecture: str,
    ngrams: bool,
) -> None:
    from lmops.classifier import load

    params = tiny(
        repo_params_raw,
        model__architecture=architecture,
        evaluate__ablation=True,
        finetune__ngram_channel__enabled=ngrams,
        finetune__ngram_channel__buckets=50_021,
        model__input_ngram_order=3 if ngrams else 0,
        model__input_ngram_buckets=10_007,
    )
    _pretrain(params, tokenizer_dir, tiny_validated, tmp_path)
    summary = finetune.run(
        params.finetune,
        params.model,
        tokenizer_dir,
        tmp_path / "pretrained",
        tiny_validated,
        tiny_validated,  # the labels stage's training rows: all of them
        tmp_path / "finetuned",
        tmp_path / "ft-live",
        tmp_path / "ft.json",
    )
    assert summary["from_pretrained"] and summary["epochs_run"] == 1
    model = load(tmp_path / "finetuned")
    assert model.spec.labels == ["negative", "positive"]
    assert (model.ngram is not None) == ngrams and (model.input_ngrams is not None) == ngrams
    if ngrams:
        channel = summary["ngram_channel"]
        assert channel["transformer_weight"] in params.finetune.ngram_channel.transformer_weights
        assert channel["val_accuracy_ngram"] > 0.6  # the n-gram LR learns from 1,200 reviews
        # The graph's hashing (torch) scores val exactly as the fit's features (numpy) did.
        import pandas as pd
        import torch

        from lmops.batching import collate, encode
        from lmops.modeling import load_tokenizer

        val = pd.read_parquet(tiny_validated / "val.parquet")
        tok = load_tokenizer(tmp_path / "finetuned")
        ids = encode(tok, val["text"].tolist(), params.model.max_length)
        with torch.no_grad():
            logits = model.ngram(**collate(ids, tok.pad_token_id))
        targets = val["label"].map(model.spec.labels.index).to_numpy()
        graph_accuracy = float((logits.argmax(1).numpy() == targets).mean())
        assert graph_accuracy == pytest.approx(channel["val_accuracy_ngram"], abs=1e-5)

    metrics = evaluate.run(
        params.evaluate,
        params.finetune,
        params.model,
        tmp_path / "finetuned",
        tokenizer_dir,
        tiny_validated,
        tiny_validated,
        tmp_path / "metrics.json",
        tmp_path / "plots",
        tmp_path / "card.md",
        tmp_path / "errors.md",
        live_dirs={"finetune": tmp_path / "ft-live", "pretrain": tmp_path / "no-such-live"},
    )
    # The error analysis: the most confident mistakes, each a table row, and the deletion
    # test's figures on the sampled texts.
    errors = (tmp_path / "errors.md").read_text("utf-8")
    wrong = round(150 * (1 - metrics["model"]["accuracy"]))
    mistakes = errors.split("## Tokens")[0]
    rows = [line for line in mistakes.splitlines() if line[:5].strip("| ").isdigit()]
    shown = min(params.evaluate.errors.mistakes, wrong)
    assert errors.startswith("# Most confident mistakes") and f"of {wrong:,} mistakes" in errors
    assert len(rows) == shown
    check = metrics["explanations"]
    assert 0 < check["texts"] <= params.evaluate.errors.deletion_texts
    assert 0 <= check["top_drop_larger_share"] <= 1
    calibration = metrics["calibration"]
    assert (
        calibration["temperature"]
        == model.spec.temperature
        == summary["calibration"]["temperature"]
    )
    assert 0.05 <= calibration["temperature"] <= 20
    assert (
        summary["calibration"]["val_log_loss_after"]
        <= summary["calibration"]["val_log_loss_before"]
    )
    assert metrics["model"]["ece"] == calibration["test_ece_after"]
    for which in ("before", "after"):
        rows = json.loads((tmp_path / "plots" / f"reliability_{which}.json").read_text("utf-8"))
        assert sum(row["texts"] for row in rows) == 150
        assert all(0 <= row["confidence"] <= 1 and 0 <= row["accuracy"] <= 1 for row in rows)
    for side in ("model", "baseline"):
        assert set(metrics[side]) >= {"accuracy", "macro_f1", "roc_auc", "ece", "slices_by_chars"}
        assert 0 <= metrics[side]["ece"] <= 1
        assert sum(s["n"] for s in metrics[side]["slices_by_chars"].values()) == 150
    assert metrics["baseline"]["accuracy"] > 0.6  # TF-IDF learns even from 1,200 reviews
    assert set(metrics["behavioural"]) == {
        "invariance_punctuation",
        "directional_negative_suffix",
        "minimum_functionality",
    }
    gates = metrics["gates"]
    beats = gates["beats_baseline"]
    assert gates["passed"] == (
        gates["min_accuracy"]["passed"]
        and (beats["passed"] or beats["relaxed"])
        and all(gate["passed"] for gate in gates["behavioural"].values())
    )
    assert "pretraining_gain" in metrics["ablation_no_pretraining"]
    paired = beats["paired"]
    assert paired["ci_low"] <= beats["margin"] <= paired["ci_high"]
    assert 0 <= paired["p_value_mcnemar"] <= 1
    assert ("transformer_only" in metrics) == ngrams
    confusion = json.loads((tmp_path / "plots" / "confusion.json").read_text("utf-8"))
    assert len(confusion) == 150
    roc = json.loads((tmp_path / "plots" / "roc.json").read_text("utf-8"))
    assert roc[0]["fpr"] == 0 and roc[-1]["tpr"] == 1
    card = (tmp_path / "card.md").read_text("utf-8")
    assert "TF-IDF + LR baseline" in card and "Gates:" in card and "95% CI" in card
    assert ("| transformer alone |" in card) == ngrams
    from PIL import Image

    for name, _ in evaluate.PICTURES:  # real images, each linked from the card
        with Image.open(tmp_path / "plots" / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 300, name
        assert f"(plots/{name})" in card
    assert not (tmp_path / "plots" / "curves_pretrain.png").exists()  # it logged nothing


def test_expected_calibration_error_of_a_perfectly_calibrated_model() -> None:
    import numpy as np

    probs = np.array([[0.2, 0.8]] * 10)
    targets = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(targets, probs, bins=10) == pytest.approx(0.0)
    assert expected_calibration_error(1 - targets, probs, bins=10) == pytest.approx(0.6)


def test_temperature_scaling_recovers_a_known_overconfidence() -> None:
    """Scores twice as sharp as the truth: the fit finds T = 2 within its sampling noise,
    labels stay, and the calibration error falls."""
    import numpy as np

    from lmops.calibration import apply_temperature, fit_temperature
    from lmops.ngrams import softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20_000, 2))
    truth = softmax(logits / 2)
    targets = (rng.random(len(truth)) < truth[:, 1]).astype(int)
    overconfident = softmax(logits)
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(2.0, abs=0.1)
    calibrated = apply_temperature(overconfident, temperature)
    assert (calibrated.argmax(1) == overconfident.argmax(1)).all()
    before = expected_calibration_error(targets, overconfident, bins=10)
    after = expected_calibration_error(targets, calibrated, bins=10)
    assert after < 0.02 < before


def test_sigkilled_pretraining_resumes_from_its_last_checkpoint(
    repo_params_raw: dict, tokenizer_dir: Path, tiny_validated: Path, tmp_path: Path
) -> None:
    raw = tiny_raw(repo_params_raw)
    raw["pretrain"].update({"steps": 600, "checkpoint_every": 10})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), "utf-8")
    shutil.copytree(tiny_validated, tmp_path / "data" / "validated")
    shutil.copytree(tokenizer_dir, tmp_path / "models" / "tokenizer")
    without_base(tmp_path)
    checkpoints = tmp_path / "models" / "checkpoints" / "pretrain"
    command = [sys.executable, "-m", "lmops", "stage", "pretrain"]

    killed = subprocess.Popen(
        command, cwd=tmp_path, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    last_seen = 0
    while last_seen < 50 and time.monotonic() < deadline and killed.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")]
        last_seen = max(steps, default=0)
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "pretraining finished before it was killed"
    assert last_seen >= 50
    assert not (tmp_path / "models" / "pretrained").exists()

    resumed = subprocess.run(
        command, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((tmp_path / "reports" / "pretrain.json").read_text("utf-8"))
    assert metrics["resumed_from_step"] >= last_seen  # at most one interval lost
    assert f"resuming from the checkpoint at step {metrics['resumed_from_step']}" in resumed.stderr
    # Not a terminal: progress comes as log lines, not as redrawn bars.
    assert "\r" not in resumed.stderr and "progress: pretrain 600/600 (100%)" in resumed.stderr
    assert metrics["steps"] == 600 and math.isfinite(metrics["val_perplexity"])
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(str(tmp_path / "models" / "pretrained"))
    loss_log = tmp_path / "reports" / "dvclive" / "pretrain" / "plots" / "metrics" / "train"
    steps_logged = [
        int(line.split("\t")[0])
        for line in (loss_log / "loss.tsv").read_text("utf-8").splitlines()[1:]
    ]
    assert steps_logged[-1] == 599  # the curve continues to the last step


def test_pretrain_and_finetune_run_data_parallel_under_torchrun(
    repo_params_raw: dict, tokenizer_dir: Path, tiny_validated: Path, tmp_path: Path
) -> None:
    """Two processes on CPU (gloo): each draws its slice of every batch, gradients are
    synchronised, and only the main process writes checkpoints, metrics and models."""
    raw = tiny_raw(repo_params_raw)
    raw["pretrain"].update({"steps": 30, "checkpoint_every": 10})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), "utf-8")
    shutil.copytree(tiny_validated, tmp_path / "data" / "validated")
    # What the labels stage keeps under data.label_issues: report: every training row.
    shutil.copytree(tiny_validated, tmp_path / "data" / "labels")
    shutil.copytree(tokenizer_dir, tmp_path / "models" / "tokenizer")
    without_base(tmp_path)
    for stage in ("pretrain", "finetune"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "-m",
                "lmops",
                "stage",
                stage,
            ],
            cwd=tmp_path,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "reports" / "pretrain.json").read_text("utf-8"))
    assert metrics["train_tokens"] == 30 * 8 * 2 * 32  # steps x batch x 2 processes x tokens
    assert (tmp_path / "models" / "pretrained" / "model.safetensors").is_file()
    assert not (tmp_path / "models" / "checkpoints" / "pretrain").exists()
    assert (tmp_path / "models" / "finetuned" / "model.safetensors").is_file()


def test_pretraining_nobody_uses_is_skipped_with_its_reason(
    repo_params_raw: dict, tokenizer_dir: Path, tiny_validated: Path, tmp_path: Path
) -> None:
    params = tiny(repo_params_raw, finetune__from_pretrained=False)
    metrics = pretrain.run(
        params.pretrain,
        params.model,
        tokenizer_dir,
        tiny_validated,
        tmp_path / "pretrained",
        tmp_path / "tokens",
        tmp_path / "ckpt",
        tmp_path / "live",
        tmp_path / "p.json",
        used=params.finetune.from_pretrained,
    )
    assert metrics == {"objective": "none (finetune.from_pretrained is false)", "steps": 0}
    for out in ("pretrained", "live"):
        assert json.loads((tmp_path / out / "skipped.json").read_text("utf-8")) == metrics


def test_resuming_survives_a_dvclive_summary_cut_short_by_a_kill(tmp_path: Path) -> None:
    """SIGKILL while DVCLive rewrote metrics.json leaves it empty: the resume must start."""
    from lmops.trainloop import live_logger

    (tmp_path / "metrics.json").write_text("", "utf-8")
    live = live_logger(tmp_path, resume=True)
    live.step = 50
    live.log_metric("train/loss", 1.0)
    live.next_step()
    assert json.loads((tmp_path / "metrics.json").read_text("utf-8"))["step"] == 50


def test_batches_follow_one_seeded_permutation_a_pass() -> None:
    """The order is drawn once a pass (not every step), and is the same permutation it was
    when it was drawn every step: resumed runs and old checkpoints draw the same batches."""
    import torch

    rows, batch, seed = 1000, 8, 3
    for step in (0, 5, 124, 125, 130):
        pass_index, offset = divmod(step, rows // batch)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + pass_index))
        expected = order[offset * batch : offset * batch + batch]
        assert torch.equal(pretrain._batch_indices(step, batch, rows, seed, 0, 1), expected)
    first, second = (pretrain._batch_indices(s, batch, rows, seed, 0, 1) for s in (0, 125))
    assert not torch.equal(first, second)  # a new pass, a new order
