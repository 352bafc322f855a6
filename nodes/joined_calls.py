"""Per-rank loops that lost a worker go on: from then on their calls are joined into whole-latent calls.

In a strided run (rank_loops.py) every rank's sampler loop runs in the server, each over the full latent
with only its band's rows real. When a worker dies, nothing of the loops is lost: each thread still holds
its rows at the current step. So the loops keep running, and from the failed call on each of their
network calls is *joined*: once every loop has reached that call (its inputs are kept per (step, slot),
so loops a step ahead need not wait for the others to come back), the real rows of all loops make the
whole input, one lockstep call (lockstep.py) on a plan of the survivors evaluates it, and every loop
takes its rows of the output. Strides end with the loss (every loop evaluates every call), the loops'
sampler state stays where it was, and a second loss or an in-run re-plan is handled by the lockstep
call as in any lockstep run.
"""

from __future__ import annotations

import threading

import torch

from stadi_core.errors import WorkerLost

POLL_S = 0.1


class CallInputs:
    """Every loop's real rows of its recent network inputs, by (step, slot): what joined calls are made of."""

    def __init__(self, rows: list[slice]):
        self.rows = rows
        self.inputs: list[dict] = [{} for _ in rows]  # loop -> (step, slot) -> its rows of x
        self.cond = threading.Condition()

    def keep(self, loop: int, key: tuple, rows: torch.Tensor, oldest_step: int) -> None:
        """Record loop ``loop``'s real rows of its input of call ``key`` (a host copy the loop no longer
        writes); forget calls before ``oldest_step`` (every loop passed them)."""
        with self.cond:
            self.inputs[loop][key] = rows
            for kept in self.inputs:
                for old in [k for k in kept if k[0] < oldest_step]:
                    del kept[old]
            self.cond.notify_all()

    def ready(self, key: tuple) -> bool:
        return all(key in kept for kept in self.inputs)

    def whole(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        x = like.detach().clone()
        for rows, kept in zip(self.rows, self.inputs):
            x[:, :, rows] = kept[key].to(x)
        return x


class JoinedCalls:
    """After a loss: each loop's call waits for the others' inputs of it, one lockstep call serves them all."""

    def __init__(self, inputs: CallInputs, lockstep_run, interrupted, since: int):
        self.inputs, self.run, self.interrupted = inputs, lockstep_run, interrupted
        self.since = since  # the step the slowest loop was at when the worker was lost
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.computing: set = set()
        self.error: BaseException | None = None

    def call(self, loop: int, key: tuple, x, timesteps, context, control, transformer_options, extra):
        cond = self.inputs.cond
        with cond:
            while True:
                if self.error is not None:
                    raise self.error
                if key in self.outputs:
                    return self._rows(loop, key, x)
                if key not in self.computing and self.inputs.ready(key):
                    self.computing.add(key)
                    whole = self.inputs.whole(key, x)
                    break
                if self.interrupted():
                    import comfy.model_management

                    raise comfy.model_management.InterruptProcessingException()
                cond.wait(POLL_S)
        try:
            out = self.run.network_call(whole, timesteps, context, control, transformer_options, extra)
        except BaseException as exc:
            self.fail(exc)
            raise
        with cond:
            self.outputs[key] = out
            for old in [k for k in self.outputs if k[0] < key[0] - 1]:
                del self.outputs[old]
            self.computing.discard(key)
            cond.notify_all()
            return self._rows(loop, key, x)

    def fail(self, exc: BaseException) -> None:
        """A loop ended with ``exc``: the others stop waiting for its calls and end with it too."""
        with self.inputs.cond:
            if self.error is None:
                self.error = exc
            self.inputs.cond.notify_all()

    def _rows(self, loop: int, key: tuple, x) -> torch.Tensor:
        """The whole output with only this loop's rows (the loop reads nothing else)."""
        out = self.outputs[key]
        full = out.new_zeros(out.shape)
        rows = self.inputs.rows[loop]
        full[:, :, rows] = out[:, :, rows]
        return full.to(device=x.device, dtype=x.dtype)

    def close(self) -> None:
        self.run.close()


def loss_of(session, exc: BaseException) -> WorkerLost | None:
    """The lost worker behind a failed call: the session's first failure (later ranks' errors name it)."""
    for cause in (session.failed, exc):
        if isinstance(cause, WorkerLost):
            return cause
    return None
