"""CUDA graphs of a band's network call (FastUSP's lesson: launch overhead, not FLOPs, bounds
small bands on fast GPUs).

A call is captured once per input shape and call slot (call_key) and replayed afterwards. Only calls without
communication inside are captured: displaced-mode calls (REFRESH and STALE compute the
same thing; REFRESH's exchange runs after the forward, re-issued here from what the
capture recorded) and calls measured alone. Exact-mode calls exchange inside every
layer and stay eager. A failed capture drops whatever its warmup iterations or the capture
recorded and runs the call eagerly from a clean call state, so the failing rank issues the
same exchanges as the ranks that replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .context import BandContext, Phase


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict
    out: torch.Tensor
    pending: list  # the exchanges a REFRESH replay must run afterwards


def call_key(ctx: BandContext, inputs: dict) -> tuple:
    """What a captured/compiled call is specialised to: the context's call slot (its stored
    buffers), band layout and alignment, whether it is measured alone, and the input shapes."""
    return ((ctx.local_only, ctx.slot, tuple(ctx.rows), ctx.ragged_align)
            + tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())))


def restart_call(ctx: BandContext, record: bool) -> None:
    """Start the current call's forward over: no pending exchange, layer counters reset.

    Keeps what ``begin_call`` already did for the call (its slot, width, the wait for the
    slot's in-flight exchange and its stats) and completes nothing more: a STALE begin (a
    FRESH one where nothing is exchanged) only resets the per-call state. With ``record``
    the forward then runs as REFRESH, recording what it would send (dropped for STALE).
    """
    slot, width, stats = ctx.slot, ctx.width, ctx.stats
    ctx.take_pending()
    exchanging = ctx.world_size > 1 and not ctx.local_only
    ctx.begin_call(Phase.STALE if exchanging else Phase.FRESH, slot, width)
    ctx.stats = stats
    if record and exchanging:
        ctx.phase = Phase.REFRESH


class FallbackBand:
    """What every compiled band call shares: which calls it takes, and the note it leaves when it
    had to fall back to eager (``disabled``, set by the subclass, says why)."""

    disabled: str | None = None  # why compiling failed; calls then run eagerly
    note: str | None = None  # a note not yet handed to the run report

    def capturable(self, ctx: BandContext, phase: Phase) -> bool:
        if self.disabled is not None:
            return False
        return ctx.world_size == 1 or ctx.local_only or phase is not Phase.FRESH

    def take_note(self) -> str | None:
        note, self.note = self.note, None
        return note


class GraphedBand(FallbackBand):
    """``call(inputs: dict[str, Tensor], phase) -> Tensor`` with per-shape CUDA graphs."""

    def __init__(self, forward: Callable[[dict], torch.Tensor], ctx: BandContext, warmup_iters: int = 2):
        self.forward = forward
        self.ctx = ctx
        self.warmup_iters = warmup_iters
        self.captured: dict[tuple, _Captured] = {}
        self.generation = ctx.generation

    def __call__(self, inputs: dict, phase: Phase) -> torch.Tensor:
        if self.generation != self.ctx.generation:  # buffers were re-created: old graphs point at freed memory
            self.captured.clear()
            self.generation = self.ctx.generation
        key = call_key(self.ctx, inputs)
        entry = self.captured.get(key)
        if entry is None:
            try:
                entry = self._capture(key, inputs)
            except Exception as exc:  # e.g. an op that syncs with the host: run eagerly from now on
                self.disabled = self.note = f"CUDA graph capture failed, running eagerly: {exc}".splitlines()[0][:300]
                return self._eager_after_failure(inputs, phase)
            finally:
                self.ctx.phase = phase
        for k, v in inputs.items():
            entry.inputs[k].copy_(v)
        entry.graph.replay()
        if phase is Phase.REFRESH and not self.ctx.local_only:
            self.ctx._pending = list(entry.pending)
        return entry.out

    def _eager_after_failure(self, inputs: dict, phase: Phase) -> torch.Tensor:
        """This call again, eagerly, from a clean call state.

        Warmup iterations or the capture may have recorded part of the call's exchanges; they
        are dropped, so this rank issues exactly the exchanges a replaying rank issues."""
        if torch.cuda.is_available():
            try:
                torch.cuda.synchronize()
            except RuntimeError:
                pass
        restart_call(self.ctx, record=phase is Phase.REFRESH)  # STALE: records nothing, as a replay
        return self.forward(inputs)

    def _capture(self, key: tuple, inputs: dict) -> _Captured:
        static = {k: v.clone() for k, v in inputs.items()}
        ctx = self.ctx
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):  # let lazy init and autotuning happen outside the graph
                restart_call(ctx, record=True)
                self.forward(static)
                ctx.take_pending()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        restart_call(ctx, record=True)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):  # a private pool per graph (sharing one tripped an allocator assert)
            out = self.forward(static)
        entry = _Captured(graph, static, out, ctx.take_pending())
        self.captured[key] = entry
        return entry
