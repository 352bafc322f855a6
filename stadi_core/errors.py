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


class NonFiniteOutput(StadiError, FloatingPointError):
    """A band's network output held NaN or inf: the run stops at that step, nothing is returned."""
