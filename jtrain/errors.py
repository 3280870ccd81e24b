"""Errors that mean "the user asked for something that cannot work".

They carry one line that names the problem and the fix. The entry point turns them into a
single line on stderr and exit code 2; everything deeper than the entry point raises them
instead of letting a bare JAX traceback escape.
"""


class JtrainError(Exception):
    """Base class for user-facing errors (bad config, bad data, bad checkpoint)."""


class ConfigError(JtrainError, ValueError):
    """A configuration key, value or combination that cannot work."""


class DataError(JtrainError, ValueError):
    """A dataset, column, row or file that the pipeline cannot use."""


class CheckpointError(JtrainError, RuntimeError):
    """A checkpoint or output directory that cannot be read or written."""


class NonFiniteError(JtrainError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""
