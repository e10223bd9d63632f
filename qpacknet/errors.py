"""Errors that reach the user: each names the problem and the fix.

The CLI maps :class:`UsageError` (and subclasses) to exit code 2.
"""


class QpacknetError(Exception):
    """Base class of qpacknet's own errors."""


class UsageError(QpacknetError):
    """Bad input from the user (config, paths, data): exit code 2."""


class ConfigError(UsageError):
    """An invalid setting; the message names the key."""


class DataError(UsageError):
    """Missing or malformed data; the message says what to put where."""


class ModelFileError(UsageError):
    """A packed model file that is damaged, truncated or of another format."""


class IllegalTransition(QpacknetError):
    """A task stage was entered out of order (SEARCH → TRAIN → QUANTIZE → COMMIT)."""


class CommitRefused(QpacknetError):
    """COMMIT found that what the driver would write is not, bit for bit, what the worker
    quantised; nothing was committed."""


class ForgettingDetected(QpacknetError):
    """An earlier task's test accuracy changed after a later commit: the method's promise
    (BWT exactly 0) is broken, so the run stops."""


class StoreError(QpacknetError):
    """A commit that would break the packed store's invariants (e.g. a word over 32 bits)."""


class NetworkFull(UsageError):
    """``capacity.when_full: stop`` and a layer cannot give the next task its minimum density:
    exit 2 before the task is trained, naming the layer and the policies."""


class TaskNotLearned(QpacknetError):
    """The quality gate: TRAIN's best validation accuracy is within the margin of chance, so
    the task is not committed (``capacity.quality_gate: stop``)."""
