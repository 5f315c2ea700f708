"""The pipeline's stages by name, with the paths each reads and writes.

`lmops stage NAME` (the `cmd` of every stage in dvc.yaml) lands here; so does the
Prefect flow, through `dvc repro`. The paths below are the ones dvc.yaml declares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmops.config import Params

INGESTED_DIR = Path("data/ingested")
VALIDATED_DIR = Path("data/validated")
QUARANTINE_DIR = Path("data/quarantine")
VALIDATION_DOCS_DIR = Path("reports/validation")
INGEST_METRICS = Path("reports/ingest.json")
VALIDATION_METRICS = Path("reports/validation.json")


def _ingest(params: Params, root: Path) -> Any:
    from lmops.tasks import ingest

    return ingest.run(params.data, root, root / INGESTED_DIR, root / INGEST_METRICS)


def _validate(params: Params, root: Path) -> Any:
    from lmops.tasks import validate

    return validate.run(
        params.validation,
        ingested_dir=root / INGESTED_DIR,
        validated_dir=root / VALIDATED_DIR,
        docs_dir=root / VALIDATION_DOCS_DIR,
        quarantine_root=root / QUARANTINE_DIR,
        metrics_path=root / VALIDATION_METRICS,
    )


# In pipeline order.
STAGES: dict[str, Callable[[Params, Path], Any]] = {
    "ingest": _ingest,
    "validate": _validate,
}
