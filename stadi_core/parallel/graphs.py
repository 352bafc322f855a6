"""CUDA graphs of a band's network call (FastUSP's lesson: launch overhead, not FLOPs, bounds
small bands on fast GPUs).

A call is captured once per input shape and replayed afterwards. Only calls without
communication inside are captured: displaced-mode calls (REFRESH and STALE compute the
same thing; REFRESH's exchange runs after the forward, re-issued here from what the
capture recorded) and calls measured alone. Exact-mode calls exchange inside every
layer and stay eager.
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


class GraphedBand:
    """``call(inputs: dict[str, Tensor], phase) -> Tensor`` with per-shape CUDA graphs."""

    def __init__(self, forward: Callable[[dict], torch.Tensor], ctx: BandContext, warmup_iters: int = 2):
        self.forward = forward
        self.ctx = ctx
        self.warmup_iters = warmup_iters
        self.captured: dict[tuple, _Captured] = {}
        self.generation = ctx.generation
        self.disabled: str | None = None  # why capture failed; calls then run eagerly

    def capturable(self, ctx: BandContext, phase: Phase) -> bool:
        if self.disabled is not None:
            return False
        return ctx.world_size == 1 or ctx.local_only or phase is not Phase.FRESH

    def __call__(self, inputs: dict, phase: Phase) -> torch.Tensor:
        if self.generation != self.ctx.generation:  # buffers were re-created: old graphs point at freed memory
            self.captured.clear()
            self.generation = self.ctx.generation
        key = (self.ctx.local_only,) + tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        entry = self.captured.get(key)
        if entry is None:
            try:
                entry = self._capture(key, inputs)
            except RuntimeError as exc:  # e.g. an op that syncs with the host: run eagerly from now on
                self.disabled = f"CUDA graph capture failed, running eagerly: {exc}".splitlines()[0][:300]
                torch.cuda.synchronize()
                self.ctx.begin_call(phase)
                return self.forward(inputs)
        for k, v in inputs.items():
            entry.inputs[k].copy_(v)
        entry.graph.replay()
        if phase is Phase.REFRESH and not self.ctx.local_only:
            self.ctx._pending = list(entry.pending)
        return entry.out

    def _capture(self, key: tuple, inputs: dict) -> _Captured:
        static = {k: v.clone() for k, v in inputs.items()}
        ctx = self.ctx
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):  # let lazy init and autotuning happen outside the graph
                ctx.begin_call(Phase.REFRESH)
                self.forward(static)
                ctx.take_pending()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        ctx.begin_call(Phase.REFRESH)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):  # a private pool per graph (sharing one tripped an allocator assert)
            out = self.forward(static)
        entry = _Captured(graph, static, out, ctx.take_pending())
        self.captured[key] = entry
        return entry
