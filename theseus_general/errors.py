"""Errors raised by theseus-general.

Every error says what was wrong and how to fix it. All derive from
`TheseusError`, which is also a `ValueError` so that callers that already
catch bad-argument errors keep working.
"""


class TheseusError(ValueError):
    """Base class of every error this package raises on bad input."""


class ScheduleError(TheseusError):
    """A replacement-rate schedule was given values it cannot use."""


class PlanError(TheseusError):
    """The compression target cannot be turned into a valid plan."""


class AdapterError(TheseusError):
    """No adapter accepts the model, or the chosen adapter does not fit it."""


class SuccessorMismatchError(TheseusError):
    """A successor module does not map its group's input to the same kind of output."""


class ExportError(TheseusError):
    """The successor model cannot be exported in the requested form."""


class EngineStateError(TheseusError, RuntimeError):
    """The engine was used in a state that does not allow it (closed, already wrapped)."""


class NonFiniteLossError(TheseusError, RuntimeError):
    """The training loss became NaN or infinite; the run was stopped."""


class CheckpointError(TheseusError):
    """A checkpoint is missing, corrupted, or was saved from a different run."""


class UnknownOptionError(TheseusError, TypeError):
    """A keyword argument, adapter option or config field that does not exist (usually a typo).
    The message suggests the closest valid name. Also a `TypeError`, which is what Python raises
    for an unexpected keyword argument."""


class InputError(TheseusError, TypeError):
    """An input (``sample=``, a `fit` batch's inputs) that can be read two ways, or that the model's forward
    does not take as given; the message shows the spellings. Also a `TypeError`."""


class TrainingError(TheseusError, ValueError):
    """`theseus_general.training.fit` was given settings it cannot train with (device, precision,
    steps, batches)."""


class MatchingDivergedWarning(UserWarning):
    """Module matching left a successor further from its group than it started (its error on the
    first batch rose); that successor went back to its weights from before matching."""


class CollapsedSuccessorWarning(UserWarning):
    """After `fit`, the successors alone (the model `export` gives) answer a single class on the run's last
    batch, where the predecessor answers several: the compressed model has most likely collapsed."""


def warn_user(message: str, category: type = UserWarning) -> None:
    """`warnings.warn` pointing at the first caller outside this package (theseus_general, its
    adapters and integrations), however deep inside it the warning is raised."""
    import os
    import sys
    import warnings

    ours = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (sys.modules[n] for n in ("theseus_general", "theseus_general.adapters",
                                                    "theseus_general.integrations") if n in sys.modules)
                 if getattr(m, "__file__", None))
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
