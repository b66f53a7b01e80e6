"""Errors raised by the model package."""


class Sam2UnetError(Exception):
    """Base class of the model package's errors."""


class ConfigError(Sam2UnetError, ValueError):
    """A model configuration or argument is invalid."""


class CheckpointError(Sam2UnetError):
    """A checkpoint cannot be loaded: wrong format, wrong keys, wrong shapes or a hash mismatch."""


class DatasetError(Sam2UnetError):
    """A dataset is malformed (missing or unpaired files, unreadable images)."""


class ImageError(Sam2UnetError, ValueError):
    """An image cannot be used as model input."""
