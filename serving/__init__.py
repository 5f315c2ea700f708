"""The prediction service: ONNX Runtime behind FastAPI, with micro-batching.

Nothing here imports torch, transformers, great_expectations or evidently: the serving
process stays small and starts in seconds.
"""
