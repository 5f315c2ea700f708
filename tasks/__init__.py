"""The pipeline's stages: one module each, each with a `run` function.

`dvc.yaml` calls them through `lmops stage NAME`; the Prefect training flow reaches the
same functions by asking DVC to reproduce that stage. Nothing here imports on load what
a stage does not need.
"""
