"""Errors the engine raises on purpose.

Every error a user can cause or meet says what to change. They derive from one
base class so the ComfyUI layer can show them as a node error without a traceback.
"""


class StadiError(Exception):
    """Base of every deliberate engine error."""


class PlanError(StadiError, ValueError):
    """The cluster, image size or options cannot be planned (bad input)."""


class UnsupportedError(StadiError, ValueError):
    """A sampler, model or option the engine cannot run in parallel."""


class WorkerError(StadiError, RuntimeError):
    """A worker process died, hung or reported a failure."""


class WorkerTimeout(WorkerError):
    """A worker did not answer within its deadline."""


class WorkerLost(WorkerError):
    """One worker is gone: its process died or its connection broke. Names the rank and device, so a
    run can drop that device and finish on the others (the server holds every rank's state)."""

    def __init__(self, message: str, rank: int, device: str, reason: str = "lost"):
        super().__init__(message)
        self.rank, self.device, self.reason = rank, device, reason


class WorkerStuck(WorkerTimeout):
    """A worker silent, or heard from but not progressing, past its deadline. Not recovered from: a hung
    collective may hold every rank, and the prompt ends with an error naming the rank."""

    def __init__(self, message: str, rank: int, device: str, reason: str = "stuck"):
        super().__init__(message)
        self.rank, self.device, self.reason = rank, device, reason


class NonFiniteOutput(StadiError, FloatingPointError):
    """A band's network output held NaN or inf: the run stops at that step, nothing is returned."""
