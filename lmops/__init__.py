"""lmops: a workflow-orchestrated MLOps platform for transformer models."""
