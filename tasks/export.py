"""Export: the fine-tuned classifier to ONNX, with variants that must pass parity checks
on the whole test split before they are published.

Outputs per text: `logits`, and the pooled sentence `embedding` the drift monitor uses.
`model.onnx` (fp32) must match PyTorch; `model.int8.onnx` (dynamic quantisation, for CPU)
must keep accuracy; `model.fp16.onnx` (fused, then fp16, for CUDA) must agree with fp32 on
labels — checked only where ONNX Runtime really runs on CUDA, since an unverified variant
is never published. A Triton model repository is written beside them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmops.artifacts import ExportManifest, TensorSpec, Variant, sha256_of
from lmops.atomic import atomic_dir
from lmops.batching import collate, encode, length_bucketed
from lmops.config import ExportConfig, ModelConfig
from lmops.errors import LmopsError

log = logging.getLogger(__name__)

INPUTS = ["input_ids", "attention_mask"]
OUTPUTS = ["logits", "embedding"]
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


def export_fp32(model: Any, path: Path, opset: int) -> None:
    import torch

    example = {
        "input_ids": torch.ones((2, 8), dtype=torch.long),
        "attention_mask": torch.ones((2, 8), dtype=torch.long),
    }
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes.update({name: {0: "batch"} for name in OUTPUTS})
    torch.onnx.export(
        model.eval(),
        (example["input_ids"], example["attention_mask"]),
        str(path),
        input_names=INPUTS,
        output_names=OUTPUTS,
        dynamic_axes=axes,
        opset_version=opset,
        dynamo=False,
    )
    import onnx

    onnx.checker.check_model(str(path))


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def fuse_fp16(source: Path, target: Path, model_cfg: ModelConfig) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(source),
        model_type="bert" if model_cfg.architecture == "bert" else "gpt2",
        num_heads=model_cfg.heads,
        hidden_size=model_cfg.hidden_size,
    )
    optimized.convert_float_to_float16(keep_io_types=True)
    optimized.save_model_to_file(str(target))


def session(path: Path, providers: list[str]) -> Any:
    import onnxruntime as ort

    # A missing CUDA library is read from get_providers(), not from ORT's page of errors.
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    return ort.InferenceSession(str(path), options, providers=providers)


def run_batches(predict: Any, ids: list[list[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """Logits for every text, in order, computed in length-bucketed batches."""
    logits: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
    for batch in length_bucketed([len(s) for s in ids], batch_size, seed=None):
        inputs = collate([ids[i] for i in batch], pad_id)
        batch_logits = predict({k: v.numpy() for k, v in inputs.items()})
        for row, index in enumerate(batch):
            logits[index] = batch_logits[row]
    return np.stack(logits)


def _torch_logits(model: Any) -> Any:
    import torch

    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
            return model(**tensors)[0].float().numpy()

    return predict


def _ort_logits(ort_session: Any) -> Any:
    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return ort_session.run(["logits"], inputs)[0].astype(np.float32)

    return predict


TEXT_MODEL, TOKENIZER_MODEL = "lmops_text", "lmops_tokenizer"


def _triton_text_configs(model_cfg: ModelConfig, num_labels: int, max_batch: int) -> dict[str, str]:
    """The tokenizer step (Python backend) and the ensemble that takes raw text."""
    tokenizer = f"""name: "{TOKENIZER_MODEL}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
parameters {{ key: "max_length" value: {{ string_value: "{model_cfg.max_length}" }} }}
"""
    ensemble = f"""name: "{TEXT_MODEL}"
platform: "ensemble"
max_batch_size: {max_batch}
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ {num_labels} ] label_filename: "labels.txt" }},
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {model_cfg.hidden_size} ] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{TOKENIZER_MODEL}"
      model_version: -1
      input_map {{ key: "TEXT" value: "TEXT" }}
      output_map {{ key: "input_ids" value: "input_ids" }}
      output_map {{ key: "attention_mask" value: "attention_mask" }}
    }},
    {{
      model_name: "lmops"
      model_version: -1
      input_map {{ key: "input_ids" value: "input_ids" }}
      input_map {{ key: "attention_mask" value: "attention_mask" }}
      output_map {{ key: "logits" value: "logits" }}
      output_map {{ key: "embedding" value: "embedding" }}
    }}
  ]
}}
"""
    return {TOKENIZER_MODEL: tokenizer, TEXT_MODEL: ensemble}


def _triton_config(name: str, model_cfg: ModelConfig, num_labels: int, max_batch: int) -> str:
    inputs = "\n".join(
        f'  {{ name: "{n}" data_type: TYPE_INT64 dims: [ -1 ] }},' for n in INPUTS
    ).rstrip(",")
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
{inputs}
]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ {num_labels} ] label_filename: "labels.txt" }},
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {model_cfg.hidden_size} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""


def run(
    cfg: ExportConfig,
    model_cfg: ModelConfig,
    finetuned_dir: Path,
    validated_dir: Path,
    out_dir: Path,
    triton_dir: Path,
) -> dict[str, Any]:
    from lmops.classifier import load
    from lmops.modeling import load_tokenizer

    # Eager attention: with SDPA the optimizer cannot fuse attention (STACK.md).
    model = load(finetuned_dir, attn_implementation="eager")
    tokenizer = load_tokenizer(finetuned_dir)
    labels = model.spec.labels
    test = pd.read_parquet(validated_dir / "test.parquet")
    targets = test["label"].map({name: i for i, name in enumerate(labels)}).to_numpy()
    ids = encode(tokenizer, test["text"].tolist(), model_cfg.max_length)

    def logits_of(predict: Any) -> np.ndarray:
        return run_batches(predict, ids, tokenizer.pad_token_id, cfg.parity_batch_size)

    reference = logits_of(_torch_logits(model))
    published: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    with atomic_dir(out_dir) as scratch:
        fp32_path = scratch / VARIANT_FILES["fp32"]
        export_fp32(model, fp32_path, cfg.opset)
        fp32 = logits_of(_ort_logits(session(fp32_path, ["CPUExecutionProvider"])))
        fp32_accuracy = float((fp32.argmax(1) == targets).mean())
        parity = {
            "max_abs_logit_diff_vs_torch": float(np.abs(fp32 - reference).max()),
            "label_agreement_vs_torch": float((fp32.argmax(1) == reference.argmax(1)).mean()),
            "accuracy": fp32_accuracy,
        }
        fp32_ok = (
            parity["max_abs_logit_diff_vs_torch"] <= cfg.parity.max_abs_logit_diff
            and parity["label_agreement_vs_torch"] >= cfg.parity.min_label_agreement
        )
        if not fp32_ok:
            raise LmopsError(
                f"export: fp32 ONNX fails parity with PyTorch on the test split: "
                f"{parity} (limits: export.parity)"
            )
        published["fp32"] = parity

        if "int8" in cfg.variants:
            int8_path = scratch / VARIANT_FILES["int8"]
            quantize_int8(fp32_path, int8_path)
            int8 = logits_of(_ort_logits(session(int8_path, ["CPUExecutionProvider"])))
            check = {
                "accuracy": float((int8.argmax(1) == targets).mean()),
                "label_agreement_vs_fp32": float((int8.argmax(1) == fp32.argmax(1)).mean()),
                "max_abs_logit_diff_vs_fp32": float(np.abs(int8 - fp32).max()),
            }
            drop = fp32_accuracy - check["accuracy"]
            if drop <= cfg.parity.max_int8_accuracy_drop:
                published["int8"] = check
            else:
                refused["int8"] = (
                    f"accuracy {check['accuracy']:.4f} is {drop:.4f} below fp32, "
                    f"over export.parity.max_int8_accuracy_drop"
                )
                int8_path.unlink()

        if "fp16" in cfg.variants:
            fp16_path = scratch / VARIANT_FILES["fp16"]
            fuse_fp16(fp32_path, fp16_path, model_cfg)
            cuda = session(fp16_path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
            if "CUDAExecutionProvider" not in cuda.get_providers():
                refused["fp16"] = (
                    "not verified: ONNX Runtime has no working CUDA provider "
                    f"here (providers in use: {cuda.get_providers()})"
                )
                fp16_path.unlink()
            else:
                fp16 = logits_of(_ort_logits(cuda))
                agreement = float((fp16.argmax(1) == fp32.argmax(1)).mean())
                check = {
                    "label_agreement_vs_fp32": agreement,
                    "accuracy": float((fp16.argmax(1) == targets).mean()),
                }
                if agreement >= cfg.parity.min_fp16_agreement:
                    published["fp16"] = check
                else:
                    refused["fp16"] = (
                        f"label agreement with fp32 {agreement:.4f} is under "
                        "export.parity.min_fp16_agreement"
                    )
                    fp16_path.unlink()

        tokenizer.save_pretrained(str(scratch / "tokenizer"))
        manifest = ExportManifest(
            opset=cfg.opset,
            architecture=model_cfg.architecture,
            max_length=model_cfg.max_length,
            labels=labels,
            inputs={n: TensorSpec(dtype="int64", shape=["batch", "sequence"]) for n in INPUTS},
            outputs={
                "logits": TensorSpec(dtype="float32", shape=["batch", len(labels)]),
                "embedding": TensorSpec(dtype="float32", shape=["batch", model_cfg.hidden_size]),
            },
            tokenizer="tokenizer/",
            test_rows=len(test),
            torch_accuracy=float((reference.argmax(1) == targets).mean()),
            variants={
                name: Variant(
                    file=VARIANT_FILES[name],
                    sha256=sha256_of(scratch / VARIANT_FILES[name]),
                    parity=figures,
                )
                for name, figures in published.items()
            },
            refused=refused,
            recommended={
                "CUDAExecutionProvider": "fp16" if "fp16" in published else "fp32",
                "CPUExecutionProvider": cfg.cpu_variant if cfg.cpu_variant in published else "fp32",
            },
            # The server divides the logits by it (lmops/calibration.py); parity is on logits.
            temperature=model.spec.temperature,
        )
        manifest.write(scratch / ExportManifest.FILE)

    with atomic_dir(triton_dir) as scratch:
        model_dir = scratch / "lmops"
        (model_dir / "1").mkdir(parents=True)
        shutil.copy2(out_dir / VARIANT_FILES["fp32"], model_dir / "1" / "model.onnx")
        (model_dir / "config.pbtxt").write_text(
            _triton_config("lmops", model_cfg, len(labels), cfg.parity_batch_size), "utf-8"
        )
        (model_dir / "labels.txt").write_text("\n".join(labels) + "\n", "utf-8")
        # Raw text in, as `lmops serve` takes it: a tokenizer step and an ensemble.
        configs = _triton_text_configs(model_cfg, len(labels), cfg.parity_batch_size)
        for name, config in configs.items():
            (scratch / name / "1").mkdir(parents=True)
            (scratch / name / "config.pbtxt").write_text(config, "utf-8")
        step = scratch / TOKENIZER_MODEL / "1"
        shutil.copy2(Path(__file__).with_name("triton_tokenizer.py"), step / "model.py")
        shutil.copy2(out_dir / "tokenizer" / "tokenizer.json", step / "tokenizer.json")
        (scratch / TEXT_MODEL / "labels.txt").write_text("\n".join(labels) + "\n", "utf-8")
    for name, reason in refused.items():
        log.warning("export: %s variant not published: %s", name, reason)
    log.info(
        "export: wrote %s (%s; fp32 sha256 %s) and the Triton repository %s",
        out_dir,
        ", ".join(published),
        manifest.version_id("fp32"),
        triton_dir,
    )
    return manifest.dump()
