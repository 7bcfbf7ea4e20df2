"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Programming errors are not FolioErrors: they stay tracebacks.
"""


class FolioError(Exception):
    """A problem with the user's input or environment, with a message naming the fix."""

    exit_code = 2


class ConfigError(FolioError):
    """A bad setting: unknown key, wrong type, out-of-range value, unreadable config file."""


class DataError(FolioError):
    """A dataset that cannot be read, downloaded or prepared."""


class CheckpointError(FolioError):
    """A run dir that is missing, incomplete, corrupt or does not match the request."""


class DeviceError(FolioError):
    """A device or dtype that this machine does not have."""


class MissingPackageError(FolioError):
    """An optional package is not installed; the message names the extra that installs it."""


class TrainingError(FolioError):
    """Training cannot go on (e.g. the loss became NaN)."""
