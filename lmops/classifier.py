"""The text classifier every stage after pretraining shares: a transformer encoder with
mean pooling and a linear head, optionally combined with a hashed n-gram logistic
regression (lmops/ngrams.py) into one module, and so into one exported graph.

Imports torch at module level: import this module inside the functions that train,
evaluate or export, never from the serving process.

A saved classifier is a directory: the encoder's Hugging Face `config.json` (with the
label maps), `model.safetensors` (this module's whole state), `classifier.json` (pooling,
labels, the n-gram channel's shape and the ensemble weight) and the tokenizer's files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lmops.errors import LmopsError
from lmops.ngrams import ngram_embedding, ngram_module
from lmops.trainloop import flops_per_token

CLASSIFIER_FILE = "classifier.json"
WEIGHTS_FILE = "model.safetensors"
# Pretraining's n-gram embeddings, beside the Hugging Face checkpoint of the encoder.
INPUT_NGRAMS_FILE = "input_ngrams.safetensors"


@dataclass(frozen=True)
class NgramSpec:
    order: int
    buckets: int
    vocab_size: int
    special_ids: list[int]
    # Width of an embedding table (input n-grams only).
    dim: int = 0


@dataclass(frozen=True)
class ClassifierSpec:
    labels: list[str]
    model_type: str
    # Share of the transformer in the served log-probabilities; 1.0 without an n-gram channel.
    transformer_weight: float = 1.0
    ngram: NgramSpec | None = None
    # Hashed n-gram embeddings added to the token embeddings (lmops/ngrams.py).
    input_ngrams: NgramSpec | None = None
    # Divides the served logits (lmops/calibration.py); fitted on val after training.
    temperature: float = 1.0


class TextClassifier(torch.nn.Module):
    def __init__(self, encoder: Any, spec: ClassifierSpec, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(encoder.config.hidden_size, len(spec.labels))
        self.ngram = None
        self.input_ngrams = None
        if spec.input_ngrams is not None:
            n = spec.input_ngrams
            self.input_ngrams = ngram_embedding(
                n.vocab_size, n.order, n.buckets, n.dim, encoder.config.hidden_size
            )
        if spec.ngram is not None:
            n = spec.ngram
            self.ngram = ngram_module(
                torch.zeros(n.buckets, len(spec.labels)).numpy(),
                torch.zeros(n.buckets).numpy(),
                torch.zeros(len(spec.labels)).numpy(),
                n.vocab_size,
                n.order,
                n.special_ids,
            )

    def pooled(self, input_ids: Any, attention_mask: Any) -> Any:
        if self.input_ngrams is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        else:
            embeds = self.encoder.get_input_embeddings()(input_ids)
            embeds = embeds + self.input_ngrams(input_ids, attention_mask)
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask)[0]
        if self.spec.model_type == "gpt2":
            last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
            return hidden[torch.arange(hidden.shape[0]), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def transformer_logits(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        pooled = self.pooled(input_ids, attention_mask)
        return self.head(self.dropout(pooled)), pooled

    def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        """(logits, pooled embedding); with the n-gram channel the logits are the weighted
        sum of both models' log-probabilities (a normalised geometric mean)."""
        logits, pooled = self.transformer_logits(input_ids, attention_mask)
        if self.ngram is None:
            return logits, pooled
        w = self.spec.transformer_weight
        ngram = self.ngram(input_ids, attention_mask)
        mixed = w * torch.log_softmax(logits.float(), -1) + (1 - w) * torch.log_softmax(ngram, -1)
        return mixed, pooled

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of a text of `seq_len` tokens (lmops/trainloop.py); the
        head runs once a text. The n-gram channel is fitted outside training: not counted."""
        config = self.encoder.config
        hidden = config.hidden_size
        ngram_dim = self.spec.input_ngrams.dim if self.spec.input_ngrams else 0
        head = hidden * len(self.spec.labels)
        return flops_per_token(config, seq_len, head, 1 / seq_len, ngram_dim * hidden)

    def with_ngram(self, module: Any, spec: NgramSpec, transformer_weight: float) -> None:
        self.ngram = module
        self.spec = replace(self.spec, transformer_weight=transformer_weight, ngram=spec)

    def with_temperature(self, temperature: float) -> None:
        self.spec = replace(self.spec, temperature=temperature)


def _encoder_kwargs(config: Any) -> dict[str, Any]:
    # The classifier pools itself: BERT's pooler would be dead weight in the graph.
    return {"add_pooling_layer": False} if config.model_type == "bert" else {}


def new_classifier(
    encoder_config: Any, labels: list[str], dropout: float, input_ngrams: NgramSpec | None
) -> TextClassifier:
    """Random weights (the ablation): the encoder built from its config."""
    from transformers import AutoModel

    encoder = AutoModel.from_config(encoder_config, **_encoder_kwargs(encoder_config))
    spec = ClassifierSpec(labels, encoder_config.model_type, input_ngrams=input_ngrams)
    return TextClassifier(encoder, spec, dropout)


def from_pretrained_encoder(
    directory: Path, labels: list[str], dropout: float, input_ngrams: NgramSpec | None
) -> TextClassifier:
    """An encoder from a Hugging Face checkpoint (ours from pretraining, or a user's), with
    the n-gram embeddings pretraining saved beside it where there are any."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(directory))
    encoder = AutoModel.from_pretrained(str(directory), **_encoder_kwargs(config))
    spec = ClassifierSpec(labels, config.model_type, input_ngrams=input_ngrams)
    model = TextClassifier(encoder, spec, dropout)
    saved = directory / INPUT_NGRAMS_FILE
    if model.input_ngrams is not None and saved.is_file():
        model.input_ngrams.load_state_dict(load_file(str(saved)))
    return model


def save(model: TextClassifier, directory: Path) -> None:
    from safetensors.torch import save_file

    config = model.encoder.config
    config.id2label = dict(enumerate(model.spec.labels))
    config.label2id = {name: i for i, name in enumerate(model.spec.labels)}
    config.save_pretrained(str(directory))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CLASSIFIER_FILE).write_text(json.dumps(asdict(model.spec), indent=2), "utf-8")


def load(directory: Path, attn_implementation: str | None = None) -> TextClassifier:
    """A saved classifier in eval mode; `attn_implementation="eager"` for a fusable export."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    if not (directory / CLASSIFIER_FILE).is_file():
        raise LmopsError(f"no classifier in {directory} (run the finetune stage first)")
    raw = json.loads((directory / CLASSIFIER_FILE).read_text("utf-8"))
    for key in ("ngram", "input_ngrams"):
        raw[key] = NgramSpec(**raw[key]) if raw.get(key) else None
    spec = ClassifierSpec(**raw)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = AutoConfig.from_pretrained(str(directory), **extra)
    encoder = AutoModel.from_config(config, **_encoder_kwargs(config))
    model = TextClassifier(encoder, spec, dropout=0.0)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()


def input_ngram_spec(model_cfg: Any, tokenizer: Any) -> NgramSpec | None:
    if not model_cfg.input_ngram_order:
        return None
    return NgramSpec(
        order=model_cfg.input_ngram_order,
        buckets=model_cfg.input_ngram_buckets,
        vocab_size=len(tokenizer),
        special_ids=[],
        dim=model_cfg.input_ngram_dim,
    )
