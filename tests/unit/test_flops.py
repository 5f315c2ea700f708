"""The FLOPs bookkeeping behind MFU: matmuls only, the right peak for the precision, and MFU
in both training stages' metrics where a peak is known."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmops.tasks.pretrain import lm_flops_per_token
from lmops.trainloop import LossOutput, device_peak_flops, matmul_precision, peak_flops
from tests.conftest import params_with, tiny_raw

LAYERS, HIDDEN, INTERMEDIATE, SEQ, VOCAB, MASK = 1, 32, 64, 32, 1000, 0.15


def _bert_config(**extra: Any) -> Any:
    from transformers import BertConfig

    shape = {
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "num_attention_heads": 2,
        "intermediate_size": INTERMEDIATE,
        "vocab_size": VOCAB,
        "max_position_embeddings": SEQ,
    }
    return BertConfig(**{**shape, **extra})


def _matmul_weights(module: Any) -> int:
    """What a token meets in matmuls, counted off the real modules (GPT-2's are Conv1D)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sum(
        m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear | Conv1D)
    )


def test_masked_lm_flops_per_token_by_hand() -> None:
    per_layer = 4 * 32 * 32 + 2 * 32 * 64  # Q, K, V, output 4096; the MLP 4096
    head = (32 * 32 + 32 * 1000) * 0.15  # transform and vocabulary, on masked tokens only
    attention = 2 * 2 * 32 * 32  # scores and weighted values over 32 positions
    forward = 2 * (1 * per_layer + head) + 1 * attention
    assert forward == pytest.approx(30387.2)
    assert lm_flops_per_token(_bert_config(), SEQ, MASK, 0) == pytest.approx(3 * forward)
    assert 3 * forward == pytest.approx(91161.6)


def test_embedding_tables_cost_nothing() -> None:
    import torch
    from transformers import BertForMaskedLM

    base = lm_flops_per_token(_bert_config(), SEQ, MASK, 0)
    # Positions and token types are lookups: more of them change nothing.
    wider = _bert_config(max_position_embeddings=4 * SEQ, type_vocab_size=8)
    assert lm_flops_per_token(wider, SEQ, MASK, 0) == pytest.approx(base)
    # A bigger vocabulary grows the head's projection (on masked tokens), not the lookup.
    bigger = lm_flops_per_token(_bert_config(vocab_size=2 * VOCAB), SEQ, MASK, 0)
    assert bigger - base == pytest.approx(3 * 2 * HIDDEN * VOCAB * MASK)
    # The old 6N estimate counted the 1000 x 32 token table as if it were a matmul.
    model = BertForMaskedLM(_bert_config())
    embedding_weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    )
    assert embedding_weights >= VOCAB * HIDDEN
    assert base < 6 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])
def test_formula_matches_the_real_language_model(architecture: str) -> None:
    """Without attention (seq_len 0) and with the head on every token, the formula is 6 FLOPs
    per matmul weight of the model transformers builds: the layer shape is the real one."""
    from transformers import BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    if architecture == "bert":
        config = _bert_config()
        model = BertForMaskedLM(config)
    else:
        config = GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
        model = GPT2LMHeadModel(config)
    assert lm_flops_per_token(config, 0, 1.0, 0) == 6 * _matmul_weights(model)
    per_token_attention = 3 * config.num_hidden_layers * 2 * 2 * SEQ * HIDDEN
    assert lm_flops_per_token(config, SEQ, 1.0, 0) == 6 * _matmul_weights(model) + (
        per_token_attention
    )


def test_causal_lm_head_runs_on_every_token() -> None:
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_inner=64, n_head=2, vocab_size=1000)
    forward = 2 * (4 * 32 * 32 + 2 * 32 * 64 + 32 * 1000) + 2 * 2 * 32 * 32
    # mask_probability means nothing to a causal LM.
    assert lm_flops_per_token(config, 32, 0.15, 0) == pytest.approx(3 * forward)


def test_ngram_projection_counts_its_table_does_not() -> None:
    from lmops.ngrams import ngram_embedding

    ngrams = ngram_embedding(VOCAB, 3, 10_007, 8, HIDDEN)
    with_ngrams = lm_flops_per_token(_bert_config(), SEQ, MASK, 8)
    without = lm_flops_per_token(_bert_config(), SEQ, MASK, 0)
    assert with_ngrams - without == pytest.approx(6 * _matmul_weights(ngrams)) == 6 * 8 * 32


def test_classifier_flops_count_the_head_once_a_text() -> None:
    from lmops.classifier import NgramSpec, new_classifier

    config = _bert_config()
    labels = ["negative", "positive"]
    spec = NgramSpec(order=3, buckets=10_007, vocab_size=VOCAB, special_ids=[], dim=8)
    for input_ngrams in (None, spec):
        model = new_classifier(config, labels, 0.0, input_ngrams)
        # One token: the head's share is the whole token; its matmuls are all there are.
        attention_one = 3 * 2 * 2 * 1 * HIDDEN
        assert model.flops_per_token(1) == 6 * _matmul_weights(model) + attention_one
    model = new_classifier(config, labels, 0.0, None)
    encoder = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * 20 * 32
    # A 20-token text: the 32 x 2 head runs once, i.e. a twentieth of it a token.
    assert model.flops_per_token(20) == pytest.approx(3 * (encoder + 2 * 32 * 2 / 20))


def test_peak_depends_on_the_precision() -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops(h100, "bf16") == peak_flops(h100, "fp16") == 989e12
    assert peak_flops(h100, "tf32") == 495e12
    assert peak_flops(h100, "fp32") == 67e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    # Names that contain one another are different GPUs.
    assert peak_flops("NVIDIA A10", "bf16") == 125e12
    assert peak_flops("NVIDIA L40S", "bf16") == 362e12 != peak_flops("NVIDIA L4", "bf16")
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12


@pytest.mark.parametrize(
    ("device", "precision"),
    [("NVIDIA A10G", "bf16"), ("NVIDIA GeForce GTX 1080", "fp32"), ("cpu", "fp32"), ("", "bf16")],
)
def test_unknown_devices_have_no_peak(device: str, precision: str) -> None:
    assert peak_flops(device, precision) is None


def test_unknown_precision_has_no_peak() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") is None


def test_the_precision_in_use_picks_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert matmul_precision(SimpleNamespace(mixed_precision="bf16", device=gpu)) == "bf16"
    assert matmul_precision(SimpleNamespace(mixed_precision="fp16", device=gpu)) == "fp16"
    assert matmul_precision(SimpleNamespace(mixed_precision="no", device=cpu)) == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _: "NVIDIA A100-SXM4-80GB")
    assert device_peak_flops(SimpleNamespace(mixed_precision="bf16", device=gpu)) == 312e12
    assert device_peak_flops(SimpleNamespace(mixed_precision="bf16", device=cpu)) is None
    # torch's cuBLAS flags are not plain attributes (monkeypatch cannot restore them).
    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert matmul_precision(SimpleNamespace(mixed_precision="no", device=gpu)) == "fp32"
        assert device_peak_flops(SimpleNamespace(mixed_precision="no", device=gpu)) == 19.5e12
        torch.backends.cuda.matmul.allow_tf32 = True
        assert matmul_precision(SimpleNamespace(mixed_precision="no", device=gpu)) == "tf32"
        assert matmul_precision(SimpleNamespace(mixed_precision="no", device=cpu)) == "fp32"
        assert device_peak_flops(SimpleNamespace(mixed_precision="no", device=gpu)) == 156e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def test_training_forwards_return_one_class_built_once() -> None:
    import torch
    from transformers import BertForMaskedLM

    from lmops.classifier import new_classifier
    from lmops.tasks.finetune import _with_loss
    from lmops.tasks.pretrain import masked_positions_only

    torch.manual_seed(0)
    ids = torch.randint(5, VOCAB, (2, SEQ))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    lm = masked_positions_only(BertForMaskedLM(_bert_config()))
    classifier = _with_loss(new_classifier(_bert_config(), ["a", "b"], 0.0, None), 0.0)
    outputs = [
        lm(input_ids=ids, labels=labels),
        lm(input_ids=ids, labels=labels),
        classifier(ids, torch.ones_like(ids), torch.tensor([0, 1])),
    ]
    assert all(type(out) is LossOutput for out in outputs)
    assert all(out.loss.ndim == 0 and torch.isfinite(out.loss) for out in outputs)


@pytest.fixture(scope="module")
def tiny_params(repo_params_raw: dict) -> Any:
    return params_with(tiny_raw(repo_params_raw))


@pytest.fixture(scope="module")
def tokenizer_dir(
    tiny_params: Any, tiny_validated: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from lmops.tasks import tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer.run(
        tiny_params.tokenizer, tiny_params.model, tiny_validated, out, out.parent / "t.json"
    )
    return out


def _mfu_log(live_dir: Path) -> list[float]:
    rows = (live_dir / "plots" / "metrics" / "train" / "mfu.tsv").read_text("utf-8").splitlines()
    return [float(row.split("\t")[-1]) for row in rows[1:]]


def test_both_stages_report_mfu_where_a_peak_is_known(
    tiny_params: Any,
    tokenizer_dir: Path,
    tiny_validated: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU has no known peak: pretend one (1 GFLOP/s) to see the figures reach the logs."""
    from lmops.tasks import finetune, pretrain

    peak = 1e9
    monkeypatch.setattr(pretrain, "device_peak_flops", lambda _: peak)
    monkeypatch.setattr(finetune, "device_peak_flops", lambda _: peak)
    metrics = pretrain.run(
        tiny_params.pretrain,
        tiny_params.model,
        tokenizer_dir,
        tiny_validated,
        tmp_path / "pretrained",
        tmp_path / "tokens",
        tmp_path / "ckpt",
        tmp_path / "live",
        tmp_path / "p.json",
    )
    model, seq = tiny_params.model, tiny_params.model.max_length
    config = SimpleNamespace(
        model_type="bert",
        num_hidden_layers=model.layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        vocab_size=json.loads((tokenizer_dir.parent / "t.json").read_text("utf-8"))["vocab_size"],
    )
    expected = metrics["tokens_per_s"] * lm_flops_per_token(
        config, seq, tiny_params.pretrain.mask_probability, 0
    )
    assert metrics["mfu"] == pytest.approx(expected / peak, abs=1e-4)
    assert len(_mfu_log(tmp_path / "live")) == tiny_params.pretrain.steps

    summary = finetune.run(
        tiny_params.finetune,
        tiny_params.model,
        tokenizer_dir,
        tmp_path / "pretrained",
        tiny_validated,
        tiny_validated,  # the labels stage's training rows: all of them
        tmp_path / "finetuned",
        tmp_path / "ft-live",
        tmp_path / "ft.json",
    )
    written = json.loads((tmp_path / "ft.json").read_text("utf-8"))
    assert written["mfu"] == summary["mfu"] > 0
    logged = _mfu_log(tmp_path / "ft-live")
    assert logged and all(value > 0 for value in logged)
