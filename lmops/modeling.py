"""Transformer architectures built from config (never downloaded) and the shared tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmops.config import ModelConfig
from lmops.errors import LmopsError


def load_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise LmopsError(f"no tokenizer in {tokenizer_dir} (run the tokenizer stage first)")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def build_config(cfg: ModelConfig, tokenizer: Any, **extra: Any) -> Any:
    """A BERT (encoder) or GPT-2 (decoder) config sized by params, with our vocabulary."""
    from transformers import BertConfig, GPT2Config

    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **extra}
    if cfg.architecture == "bert":
        return BertConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_length,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            **common,
        )
    return GPT2Config(
        n_embd=cfg.hidden_size,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_inner=cfg.intermediate_size,
        n_positions=cfg.max_length,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        **common,
    )


def language_model(cfg: ModelConfig, tokenizer: Any) -> Any:
    """Masked-LM for encoders, causal-LM for decoders, randomly initialised."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = build_config(cfg, tokenizer)
    auto = AutoModelForMaskedLM if cfg.architecture == "bert" else AutoModelForCausalLM
    return auto.from_config(config)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
