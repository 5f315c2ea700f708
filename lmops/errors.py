"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class LmopsError(Exception):
    """Base of every error caused by input or configuration, not by a bug."""


class ConfigError(LmopsError):
    """params.yaml, a profile or a --set override is wrong; the message names the key."""


class DataError(LmopsError):
    """A data source cannot be read or does not make a usable dataset."""


class ValidationFailed(LmopsError):
    """The data contract failed; the batch was quarantined."""
