"""Serving speed, all in one run on the same model and inputs:

1. engines — PyTorch eager vs ONNX Runtime fp32 (as exported), fp32 fused (ORT's transformer
   optimizer) and int8, at batch 1, 8 and 32, as ratios to eager; the model's FLOPs from
   its config against this machine's fp32 GEMM rate measured now (the ceiling);
2. HTTP — `lmops serve` on a loopback port, 1, 8 and 32 concurrent async clients, with
   micro-batching on and off: throughput, p50, p99, the server's CPU time per 1,000 texts
   (what serving costs), and the server's overhead over a bare engine at batch 1;
3. protocol — the Open Inference Protocol through the real `tritonclient[http]`, JSON
   against the binary tensor data extension, at batch 1 and 32, side by side.

`--compare NAME=DIR ...` instead puts the models of several project folders (each after
its own run: the English base, the Chinese from-scratch model, a student) side by side:
each published variant through the serving engine, texts/s and ms per text at batch 1 and
32 on that folder's own test texts, with the variant's test accuracy from its parity check.

    .venv/bin/python bench/serving.py [--seconds 3] [--protocol-only]
    .venv/bin/python bench/serving.py --compare en=/tmp/run-en zh=/tmp/run-zh

Needs `make run` first (models/finetuned, models/onnx, data/validated; `--protocol-only`
needs only the last two). Writes reports/bench/serving.json (`--protocol-only`:
reports/bench/protocol.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmops.artifacts import ExportManifest

ROOT = Path.cwd()
BATCHES = (1, 8, 32)
CONCURRENCY = (1, 8, 32)


def gemm_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def forward_flops(config: Any, lengths: list[int]) -> float:
    """Weights: 2 FLOPs per non-embedding parameter per token; attention: QK^T and AV."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 2 * hidden * config.intermediate_size
    width = max(lengths)
    tokens = width * len(lengths)
    return tokens * (2 * layers * per_layer + 4 * layers * width * hidden)


def timed(run: Any, seconds: float) -> float:
    """Median seconds per call over `seconds` of repeated calls (after one warm-up)."""
    run()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engines(
    model_dir: Path, onnx_dir: Path, texts: list[str], threads: int, seconds: float
) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoTokenizer

    from lmops.classifier import load

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(onnx_dir / "tokenizer"))
    model = load(model_dir)
    manifest = ExportManifest.of(onnx_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as scratch:
        fused_path = Path(scratch) / "fused.onnx"
        optimize_model(
            str(onnx_dir / "model.onnx"),
            model_type=manifest.architecture,
            num_heads=model.encoder.config.num_attention_heads,
            hidden_size=model.encoder.config.hidden_size,
        ).save_model_to_file(str(fused_path))
        sessions = {
            "ort_fp32": ort.InferenceSession(
                str(onnx_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
            ),
            "ort_fp32_fused": ort.InferenceSession(
                str(fused_path), options, providers=["CPUExecutionProvider"]
            ),
        }
        if (onnx_dir / "model.int8.onnx").exists():
            sessions["ort_int8"] = ort.InferenceSession(
                str(onnx_dir / "model.int8.onnx"), options, providers=["CPUExecutionProvider"]
            )
        results: dict[str, Any] = {}
        for batch in BATCHES:
            encoded = tokenizer(
                texts[:batch],
                padding=True,
                truncation=True,
                max_length=manifest.max_length,
                return_tensors="np",
            )
            feed = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            lengths = [int(m.sum()) for m in feed["attention_mask"]]

            def eager(tensors: dict = tensors) -> None:
                with torch.no_grad():
                    model(**tensors)

            row = {"eager_ms": timed(eager, seconds) * 1000}
            for name, sess in sessions.items():
                row[f"{name}_ms"] = (
                    timed(lambda s=sess, f=feed: s.run(["logits"], f), seconds) * 1000
                )
                row[f"{name}_vs_eager"] = row["eager_ms"] / row[f"{name}_ms"]
            row["gflop"] = forward_flops(model.encoder.config, lengths) / 1e9
            row["ort_fp32_gflops"] = row["gflop"] / (row["ort_fp32_ms"] / 1000)
            results[f"batch_{batch}"] = {k: round(v, 4) for k, v in row.items()}
    results["int8_accuracy_drop"] = round(
        manifest.variants["fp32"].parity["accuracy"]
        - (
            manifest.variants["int8"].parity["accuracy"]
            if "int8" in manifest.variants
            else float("nan")
        ),
        5,
    )
    return results


def bare_engine(onnx_dir: Path, texts: list[str], threads: int, seconds: float) -> dict:
    from lmops.engine import Engine

    engine = Engine(onnx_dir, require_gpu=False, max_batch_size=32, threads=threads)
    one = timed(lambda: engine.predict(texts[:1]), seconds)
    thirty_two = timed(lambda: engine.predict(texts[:32]), seconds)
    # POST /v1/explain's work: one session run of n+1 texts for n tokens.
    typical = sorted(texts, key=len)[len(texts) // 2]
    longest = "".join(texts)[:126]  # 126 characters: about 126 tokens, the cpu-demo limit
    explain_typical = timed(lambda: engine.explain(typical, 10**6), seconds)
    explain_longest = timed(lambda: engine.explain(longest, 10**6), seconds)
    return {
        "variant": engine.variant,
        "batch_1_ms": round(one * 1000, 3),
        "best_texts_per_s": round(32 / thirty_two, 1),
        "explain_median_text_ms": round(explain_typical * 1000, 3),
        "explain_median_text_tokens": len(engine.explain(typical, 10**6)["tokens"]),
        "explain_126_chars_ms": round(explain_longest * 1000, 3),
        "explain_126_chars_tokens": len(engine.explain(longest, 10**6)["tokens"]),
    }


def compare_models(roots: dict[str, Path], threads: int, seconds: float) -> dict[str, Any]:
    """Each folder's published variants through the serving engine, model by model in one
    run: ms per text and texts/s at batch 1 and 32, and each variant's test accuracy."""
    from lmops.engine import Engine

    models: dict[str, Any] = {}
    for name, root in roots.items():
        onnx_dir = root / "models/onnx"
        manifest = ExportManifest.of(onnx_dir)
        texts = pd.read_parquet(root / "data/validated/test.parquet")["text"].tolist()[:512]
        row: dict[str, Any] = {"architecture": manifest.architecture, "variants": {}}
        for variant, published in manifest.variants.items():
            if variant == "fp16":  # a CUDA variant: on a CPU it only measures emulation
                continue
            engine = Engine(
                onnx_dir, require_gpu=False, max_batch_size=32, threads=threads, variant=variant
            )
            one = timed(lambda e=engine, t=texts: e.predict(t[:1]), seconds)
            batch = timed(lambda e=engine, t=texts: e.predict(t[:32]), seconds)
            row["variants"][variant] = {
                "test_accuracy": published.parity.get("accuracy"),
                "batch_1_ms_per_text": round(one * 1000, 3),
                "batch_32_ms_per_text": round(batch * 1000 / 32, 3),
                "batch_1_texts_per_s": round(1 / one, 1),
                "batch_32_texts_per_s": round(32 / batch, 1),
            }
        models[name] = row
    return models


def side_by_side(
    rounds: dict[str, list[dict]], base: str, other: str, concurrency: tuple[int, ...]
) -> dict[str, dict[str, Any]]:
    """Per concurrency, each side's median texts/s, p50 and p99 over its rounds, and the
    ratio other/base of each (a bench that alternates two servers round by round)."""
    summary = {}
    for n in concurrency:
        clients = f"clients_{n}"
        row: dict[str, Any] = {}
        for key in ("texts_per_s", "p50_ms", "p99_ms"):
            for side in (base, other):
                row[f"{side}_{key}"] = statistics.median(r[clients][key] for r in rounds[side])
            row[f"{other}_vs_{base}_{key}"] = round(row[f"{other}_{key}"] / row[f"{base}_{key}"], 3)
        summary[clients] = row
    return summary


def write_result(out: Path, facts: dict[str, Any], summary: dict, runs: dict) -> None:
    """The bench's JSON: when, on what machine, `facts`, the summary and every run."""
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        **facts,
        "summary": summary,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(json.dumps(summary, indent=2))


def wait_ready(url: str, seconds: float = 60) -> None:
    """Until the server at `url` says it is ready (a bench's server is starting)."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the server at {url} was not ready within {seconds:g} s")


async def load(
    url: str,
    texts: list[str],
    clients: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """Single-text requests from `clients` concurrent async clients (each with `headers`).
    aiohttp, not httpx: the load generator shares the machine's two cores with the server,
    so it must be light."""
    import aiohttp

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        i = index
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.post(
                f"{url}/v1/predict", json={"texts": [texts[i % len(texts)]]}
            ) as response:
                response.raise_for_status()
                await response.read()
            latencies.append(time.perf_counter() - start)
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {
        "texts_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": round(ms[len(ms) // 2], 3),
        "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 3),
        "requests": len(ms),
    }


def server_load(pid: int, url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`load`, and what it cost the server: its process's CPU time (every thread) per
    1,000 texts answered, the serving cost the model page shows."""
    import psutil

    server = psutil.Process(pid)

    def cpu_seconds() -> float:
        times = server.cpu_times()
        return times.user + times.system

    before = cpu_seconds()
    figures = asyncio.run(load(url, texts, clients, seconds))
    cpu_ms = (cpu_seconds() - before) * 1000
    return figures | {"server_cpu_ms_per_1k_texts": round(cpu_ms / figures["requests"] * 1000, 1)}


def protocol(url: str, texts: list[str], seconds: float) -> dict[str, Any]:
    """tritonclient's infer() per call, JSON vs binary tensor data, one client."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    results: dict[str, Any] = {}
    for batch in (1, 32):
        chunk = np.array(texts[:batch], dtype=object)
        for binary in (False, True):
            text = triton.InferInput("text", [batch], "BYTES")
            text.set_data_from_numpy(chunk, binary_data=binary)
            outputs = [
                triton.InferRequestedOutput(name, binary_data=binary)
                for name in ("label", "probabilities")
            ]
            per_call = timed(
                lambda t=text, o=outputs: client.infer("lmops", [t], outputs=o), seconds
            )
            results[f"batch_{batch}_{'binary' if binary else 'json'}"] = {
                "ms": round(per_call * 1000, 3),
                "texts_per_s": round(batch / per_call, 1),
            }
        results[f"batch_{batch}_binary_vs_json_texts_per_s"] = round(
            results[f"batch_{batch}_binary"]["texts_per_s"]
            / results[f"batch_{batch}_json"]["texts_per_s"],
            3,
        )
    client.close()
    return results


def http(
    onnx_dir: Path,
    texts: list[str],
    threads: int,
    seconds: float,
    batching: bool,
    protocol_only: bool = False,
) -> dict[str, Any]:
    import yaml

    from lmops.config import override, read_raw

    with tempfile.TemporaryDirectory() as scratch:
        workspace = Path(scratch)
        (workspace / "models").mkdir()
        shutil.copytree(onnx_dir, workspace / "models" / "onnx")
        settings = {
            "serve.threads": threads,
            "serve.traffic.dir": "traffic",
            "serve.max_batch_size": 32 if batching else 1,
            "serve.max_wait_ms": 0,
            "serve.max_queue": 1024,
            "serve.drain_seconds": 0,
            "serve.max_body_bytes": 16 * 1024 * 1024,
        }
        raw = override(read_raw(ROOT), settings)
        (workspace / "params.yaml").write_text(yaml.safe_dump(raw), "utf-8")
        port = 18_000 + os.getpid() % 1000 + (1 if batching else 0)
        server = subprocess.Popen(
            [sys.executable, "-m", "lmops", "serve", "--port", str(port)],
            cwd=workspace,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            if protocol_only:
                return protocol(url, texts, seconds)
            loads = {
                f"clients_{n}": server_load(server.pid, url, texts, n, seconds) for n in CONCURRENCY
            }
            return {**loads, "protocol": protocol(url, texts, seconds)} if batching else loads
        finally:
            server.terminate()
            server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--protocol-only", action="store_true", help="Only the tritonclient JSON-vs-binary part."
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="NAME=DIR", help="Models of several project folders."
    )
    args = parser.parse_args()
    if args.compare:
        roots = dict(item.split("=", 1) for item in args.compare)
        result = {
            "what": "models side by side through the serving engine (bench/serving.py --compare)",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"threads": args.threads, "platform": platform.platform()},
            "gemm_ceiling_gflops": round(gemm_gflops(args.threads), 1),
            "models": compare_models(
                {name: Path(root) for name, root in roots.items()}, args.threads, args.seconds
            ),
        }
        out = ROOT / (args.out or "reports/bench/serving-models.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result["models"], indent=2))
        return
    texts = pd.read_parquet(ROOT / "data/validated/test.parquet")["text"].tolist()[:512]
    onnx_dir, model_dir = ROOT / "models/onnx", ROOT / "models/finetuned"
    if args.protocol_only:
        result = {
            "what": "Open Inference Protocol through tritonclient[http]: JSON vs binary data",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"threads": args.threads, "platform": platform.platform()},
            "model": ExportManifest.of(onnx_dir).architecture,
            "protocol": http(onnx_dir, texts, args.threads, args.seconds, True, protocol_only=True),
        }
        out = ROOT / (args.out or "reports/bench/protocol.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
        print(json.dumps(result["protocol"], indent=2))
        return

    ceiling = gemm_gflops(args.threads)
    engine_results = engines(model_dir, onnx_dir, texts, args.threads, args.seconds)
    bare = bare_engine(onnx_dir, texts, args.threads, args.seconds)
    served = {
        "batching_on": http(onnx_dir, texts, args.threads, args.seconds, batching=True),
        "batching_off": http(onnx_dir, texts, args.threads, args.seconds, batching=False),
    }
    b1, b32 = engine_results["batch_1"], engine_results["batch_32"]
    on32 = served["batching_on"]["clients_32"]["texts_per_s"]
    off32 = served["batching_off"]["clients_32"]["texts_per_s"]
    one_at_a_time = served["batching_off"]["clients_1"]["texts_per_s"]
    summary = {
        "ort_fp32_batch32_share_of_gemm_ceiling": round(b32["ort_fp32_gflops"] / ceiling, 3),
        "int8_vs_fp32_batch32": round(b32["ort_fp32_ms"] / b32.get("ort_int8_ms", float("nan")), 3),
        "int8_accuracy_drop": engine_results["int8_accuracy_drop"],
        "ort_fp32_vs_eager_batch1": b1["ort_fp32_vs_eager"],
        "http_32_clients_share_of_bare_engine_best": round(on32 / bare["best_texts_per_s"], 3),
        "micro_batching_vs_one_at_a_time": round(on32 / one_at_a_time, 3),
        "micro_batching_vs_off_at_32_clients": round(on32 / off32, 3),
        "explain_median_text_vs_predict_batch1": round(
            bare["explain_median_text_ms"] / bare["batch_1_ms"], 2
        ),
        "server_overhead_batch1_ms": round(
            served["batching_on"]["clients_1"]["p50_ms"] - bare["batch_1_ms"], 3
        ),
        # Serving cost of the served variant: the server's CPU time per 1,000 texts.
        "server_cpu_ms_per_1k_texts_1_client": served["batching_on"]["clients_1"][
            "server_cpu_ms_per_1k_texts"
        ],
        "server_cpu_ms_per_1k_texts_32_clients": served["batching_on"]["clients_32"][
            "server_cpu_ms_per_1k_texts"
        ],
    }
    targets = {
        "ort_fp32_batch32_share_of_gemm_ceiling": (">=", 0.85),
        "int8_vs_fp32_batch32": (">=", 1.4),
        "int8_accuracy_drop": ("<=", 0.01),
        "ort_fp32_vs_eager_batch1": (">=", 1.8),
        "http_32_clients_share_of_bare_engine_best": (">=", 0.8),
        "micro_batching_vs_one_at_a_time": (">=", 4.0),
        "server_overhead_batch1_ms": ("<=", 1.0),
    }
    met = {
        key: (summary[key] >= bound if op == ">=" else summary[key] <= bound)
        for key, (op, bound) in targets.items()
    }
    import torch

    result = {
        "what": __doc__.splitlines()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "threads": args.threads,
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
        },
        "model": ExportManifest.of(onnx_dir).architecture,
        "gemm_ceiling_gflops": round(ceiling, 1),
        "engines": engine_results,
        "bare_engine": bare,
        "http": served,
        "summary": summary,
        "targets": {k: f"{op} {bound}" for k, (op, bound) in targets.items()},
        "met": met,
    }
    out = ROOT / (args.out or "reports/bench/serving.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"summary": summary, "met": met}, indent=2))


if __name__ == "__main__":
    main()
