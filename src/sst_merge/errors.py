"""Errors raised for bad user input.

Every user-facing error is one line that names the input and the fix. The CLI prints ``str(err)`` and exits
with status 2; library callers catch :class:`SSTMergeError`.
"""


class SSTMergeError(Exception):
    """Base class for errors caused by the user's input or environment (not bugs)."""


class ConfigError(SSTMergeError):
    """A configuration value is unknown, missing or out of range."""


class AdapterError(SSTMergeError):
    """An adapter directory is missing, corrupt or incompatible with the others."""


class DataError(SSTMergeError):
    """A data source is missing, empty or malformed."""


class OutputExistsError(SSTMergeError):
    """The output path exists and ``--force`` was not given."""
