"""The errors leansd raises for problems a user can fix. Each message names the problem and the fix."""
from __future__ import annotations


class LeanSDError(Exception):
    """Base class: a problem with the user's input, model folder or environment (not a bug)."""


class ModelFolderError(LeanSDError):
    """The model folder is missing, incomplete, or holds a file that is not a model."""


class BackendError(LeanSDError):
    """The requested backend or device is not installed or not available."""


class InvalidInputError(LeanSDError, ValueError):
    """An argument has a value the pipeline cannot use (wrong shape, size, range...)."""


class InsufficientMemoryError(LeanSDError):
    """A generation would need more memory than the machine has available (checked before it starts)."""


class Cancelled(LeanSDError):
    """A step callback returned False: the generation stopped and returned nothing (`leansd.Cancelled`)."""


class LeanSDWarning(UserWarning):
    """Something was done differently from what was asked (e.g. a mask stretched to the output size)."""
