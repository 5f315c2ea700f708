"""Prefect flows: the training pipeline (and, later, promotion and monitoring)."""
