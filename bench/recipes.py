"""Which training recipe should a profile take? Each candidate runs the real stages (base,
labels, tokenizer, pretrain, finetune, distill, evaluate) on several split seeds of the same
data, beside the TF-IDF + LR baseline on the same splits; reports/bench/recipes.json (the
default, English) or recipes-zh.json (--zh, Chinese) gets every run and the mean and
standard deviation per recipe.

Recipes are chosen on validation accuracy; test accuracy is reported, never used to choose.

    python -m bench.recipes                       # every default candidate, split seeds 0 1 2
    python -m bench.recipes --recipe cpu-demo --recipe "cpu-demo, lr 1e-4"
    python -m bench.recipes --zh                  # the Chinese candidates
    python -m bench.recipes --markdown            # the README table from the JSON

A pretrained run whose tokenizer and pretraining params equal an earlier pretrained run's
on the same split reuses that pretrained model (and counts its pretraining time); a
"(transformer alone)" row is the same trained model without its n-gram channel.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lmops.artifacts import LabelIssuesReport, Metrics
from lmops.config import override, parse_params, profile_overrides, read_raw
from lmops.stages import (
    FINETUNE_METRICS,
    FINETUNED_DIR,
    LABELS_DIR,
    LABELS_METRICS,
    METRICS,
    PRETRAIN_LIVE,
    PRETRAIN_METRICS,
    PRETRAINED_DIR,
    TOKENIZER_DIR,
    VALIDATED_DIR,
)
from lmops.sweep import Definition
from lmops.tasks.stages import run_stage

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "bench" / "recipes.json"
OUT_ZH = ROOT / "reports" / "bench" / "recipes-zh.json"

# What `make run` uses (the cpu-demo profile is the defaults): English movie reviews from the
# shipped MiniLM base, and the Chinese profile's from-scratch recipe.
DEFAULT = profile_overrides(ROOT, "cpu-demo")
ZH = profile_overrides(ROOT, "zh")
SWEEPS = ROOT / "bench" / "sweeps"


def candidates(*files: str) -> dict[str, dict[str, Any]]:
    """The named configs of sweep definitions, each over its profile: the same recipes
    `lmops sweep --file bench/sweeps/NAME.yaml` runs as DVC experiments."""
    found = {}
    for file in files:
        spec = Definition.read(SWEEPS / file)
        base = profile_overrides(ROOT, spec.profile) if spec.profile else {}
        found.update({name: {**base, **config} for name, config in spec.configs.items()})
    return found


# The default, and one thing changed in it each; then from random weights on the same data.
CANDIDATES = candidates("recipes.yaml", "recipes-scratch.yaml")
ZH_PRETRAINED = "zh + pretraining (TAPT, 400 steps)"
ZH_CANDIDATES = candidates("recipes-zh.yaml")


def _workspace(base: Path, name: str, seed: int, validated: Path) -> Path:
    root = base / f"{name.replace(' ', '_').replace(',', '')}-seed{seed}"
    (root / VALIDATED_DIR).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(validated, root / VALIDATED_DIR)
    return root


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _baseline_val_accuracy(params: Any, root: Path) -> float:
    """The baseline on validation, learning from the rows the labels stage kept."""
    from lmops.baseline import baseline_proba

    train = pd.read_parquet(root / LABELS_DIR / "train.parquet")
    val = pd.read_parquet(root / VALIDATED_DIR / "val.parquet")
    labels = sorted(train["label"].unique())
    probs = baseline_proba(params.evaluate, train, val["text"].tolist(), labels)
    return float((probs.argmax(1) == val["label"].map(labels.index).to_numpy()).mean())


def run_recipe(
    name: str,
    overrides: dict[str, Any],
    seed: int,
    base: Path,
    validated: Path,
    pretrained_cache: dict[str, tuple[Path, float]],
) -> list[dict[str, Any]]:
    """One recipe on one split; rows for the served model and, with an n-gram channel,
    for its transformer alone."""
    raw = read_raw(ROOT)
    params = parse_params(override(raw, {**overrides, "data.split.seed": seed}))
    root = _workspace(base, name, seed, validated)
    seconds: dict[str, float] = {}
    cache_key = json.dumps(
        [params.tokenizer.model_dump(), params.model.model_dump(), params.pretrain.model_dump()],
        sort_keys=True,
    )
    # The pretrain stage runs even when fine-tuning starts from random weights: it then only
    # writes why it skipped (what evaluate reads), so such a run takes nothing from the cache.
    from_pretrained = params.finetune.from_pretrained
    for stage in ("base", "labels", "tokenizer", "pretrain", "finetune", "distill", "evaluate"):
        if stage in ("tokenizer", "pretrain") and cache_key in pretrained_cache and from_pretrained:
            source, cached_seconds = pretrained_cache[cache_key]
            target = TOKENIZER_DIR if stage == "tokenizer" else PRETRAINED_DIR
            shutil.copytree(source / target, root / target)
            if stage == "pretrain":
                shutil.copy2(source / PRETRAIN_METRICS, root / PRETRAIN_METRICS)
                shutil.copytree(source / PRETRAIN_LIVE, root / PRETRAIN_LIVE)
            seconds[stage] = cached_seconds if stage == "pretrain" else 0.0
            continue
        started = time.perf_counter()
        run_stage(stage, params, root)
        seconds[stage] = round(time.perf_counter() - started, 1)
    if from_pretrained and cache_key not in pretrained_cache:
        pretrained_cache[cache_key] = (root, seconds["pretrain"])
    metrics, finetune = Metrics.read(root / METRICS), _read(root / FINETUNE_METRICS)
    common = {
        "split_seed": seed,
        "baseline_val_accuracy": round(_baseline_val_accuracy(params, root), 5),
        "dropped_train_rows": LabelIssuesReport.read(root / LABELS_METRICS).dropped_train_rows,
        "baseline_test_accuracy": metrics.baseline.accuracy,
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "best_epoch": finetune["best_epoch"],
    }
    if (root / PRETRAIN_METRICS).is_file() and params.finetune.from_pretrained:
        pretrain = _read(root / PRETRAIN_METRICS)
        if "val_perplexity" in pretrain:  # not when model.init_pretraining skipped it
            common["pretrain_val_perplexity"] = pretrain["val_perplexity"]
            common["pretrain_val_unigram_perplexity"] = pretrain["val_unigram_perplexity"]
    distilled = metrics.distillation
    if distilled is not None and distilled.served == "student":
        # Validation of the served student; its transformer alone has no validation figure.
        return [
            {
                "recipe": name,
                **common,
                "val_accuracy": distilled.student_val_accuracy,
                "test_accuracy": metrics.model.accuracy,
                "teacher_val_accuracy": distilled.teacher_val_accuracy,
                "transformer_weight": metrics.transformer_weight,
            }
        ]
    rows = []
    channel = finetune.get("ngram_channel")
    if channel:
        rows.append(
            {
                "recipe": name,
                **common,
                "val_accuracy": channel["val_accuracy_combined"],
                "test_accuracy": metrics.model.accuracy,
                "transformer_weight": channel["transformer_weight"],
            }
        )
    rows.append(
        {
            "recipe": f"{name} (transformer alone)" if channel else name,
            **common,
            "val_accuracy": finetune["val_accuracy"],
            "test_accuracy": (metrics.transformer_only or metrics.model).accuracy,
        }
    )
    shutil.rmtree(root / FINETUNED_DIR, ignore_errors=True)
    return rows


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def stats(values: list[float]) -> dict[str, float]:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": round(statistics.mean(values), 5), "std": round(spread, 5)}

    summary = []
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == recipe]
        summary.append(
            {
                "recipe": recipe,
                "seeds": [r["split_seed"] for r in mine],
                "val_accuracy": stats([r["val_accuracy"] for r in mine]),
                "test_accuracy": stats([r["test_accuracy"] for r in mine]),
                "baseline_val_accuracy": stats([r["baseline_val_accuracy"] for r in mine]),
                "baseline_test_accuracy": stats([r["baseline_test_accuracy"] for r in mine]),
                "test_margin_over_baseline": stats(
                    [r["test_accuracy"] - r["baseline_test_accuracy"] for r in mine]
                ),
                "total_seconds": stats([r["total_seconds"] for r in mine]),
            }
        )
    return summary


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| recipe | seeds | val accuracy | test accuracy | baseline test | test margin | "
        "stage seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(result["summary"], key=lambda s: -s["val_accuracy"]["mean"]):
        one = len(s["seeds"]) == 1

        def fmt(x: dict[str, float], scale: float = 100, one: bool = one) -> str:
            return f"{x['mean'] * scale:.2f}" + ("" if one else f" ± {x['std'] * scale:.2f}")

        lines.append(
            f"| {s['recipe']} | {', '.join(map(str, s['seeds']))} | {fmt(s['val_accuracy'])} | "
            f"{fmt(s['test_accuracy'])} | "
            f"{fmt(s['baseline_test_accuracy'])} | {fmt(s['test_margin_over_baseline'])} | "
            f"{s['total_seconds']['mean']:.0f} |"
        )
    lines.append(
        "\nAccuracy in %, mean ± standard deviation over the split seeds listed (a single "
        "seed: its figure, a probe, not yet a choice); chosen on validation, test only reported."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append")
    parser.add_argument(
        "--zh", action="store_true", help="the zh profile's candidates on the Chinese data"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help=f"default: {OUT} ({OUT_ZH} with --zh)")
    parser.add_argument("--markdown", action="store_true", help="print the table and stop")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="combine the runs of several result files into --out"
    )
    parser.add_argument("--note", help="with --merge: how and when the added runs were made")
    args = parser.parse_args()
    out = args.out or (OUT_ZH if args.zh else OUT)
    if args.merge:
        parts = [json.loads(path.read_text(encoding="utf-8")) for path in args.merge]
        runs = [run for part in parts for run in part["runs"]]
        notes = [part["note"] for part in parts if part.get("note")] + [args.note or ""]
        result = {
            "seeds": sorted({r["split_seed"] for r in runs}),
            "candidates": {k: v for part in parts for k, v in part["candidates"].items()},
            "runs": runs,
            "summary": summarise(runs),
            "note": " | ".join(note for note in notes if note),
        }
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(markdown(result))
        return
    if args.markdown:
        print(markdown(json.loads(out.read_text(encoding="utf-8"))))
        return
    candidates = ZH_CANDIDATES if args.zh else CANDIDATES
    names = args.recipe or list(candidates)
    unknown = set(names) - set(candidates)
    if unknown:
        parser.error(f"unknown recipe(s) {sorted(unknown)}; known: {sorted(candidates)}")
    data = {
        key: value for key, value in (ZH if args.zh else DEFAULT).items() if key.startswith("data.")
    }
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lmops-recipes-") as tmp:
        base = Path(tmp)
        for seed in args.seeds:
            params = parse_params(override(read_raw(ROOT), {**data, "data.split.seed": seed}))
            data_root = base / f"data-seed{seed}"
            run_stage("ingest", params, data_root)
            run_stage("validate", params, data_root)
            cache: dict[str, tuple[Path, float]] = {}
            for name in names:
                runs += run_recipe(
                    name, candidates[name], seed, base, data_root / VALIDATED_DIR, cache
                )
                result = {
                    "seeds": args.seeds,
                    "candidates": {n: candidates[n] for n in names},
                    "runs": runs,
                    "summary": summarise(runs),
                }
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2), encoding="utf-8")
                print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
