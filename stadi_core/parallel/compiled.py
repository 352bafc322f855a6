"""Compiled band calls for the per-call (ComfyUI session) path: CUDA graphs or ``torch.compile``.

Like graphs.GraphedBand, only calls without communication inside are compiled: displaced
calls (REFRESH and STALE compute the same thing) and calls measured alone. Exact-mode and
warmup (FRESH) calls exchange inside every layer and stay eager.

``torch.compile`` traces the layers' context reads and the REFRESH recording
(``ctx._pending.append``) with ``fullgraph=True``; dynamo replays those Python side effects
after the compiled graph runs. That is checked, not trusted: the first displaced call of
each shape runs eagerly and notes which exchanges it recorded (key, sizes, dim, shape); a
compiled call that records anything else is treated as a failed compile. Every call runs
with the context in REFRESH (a STALE call's recording is dropped), so STALE and REFRESH
share one compiled graph. A compile that fails or is refused (graph break, no compiler)
falls back to eager for good, with a note for the run report, and the call that failed
is re-run eagerly from a clean call state: it records exactly the exchanges every other
rank records, so the collectives keep matching.
"""

from __future__ import annotations

import os
import shutil
import weakref
from typing import Callable

import torch

from .context import BandContext, Phase
from .graphs import FallbackBand, GraphedBand, call_key, restart_call

MODES = ("off", "auto", "graphs", "torch.compile")

BACKEND_ENV = "STADI_COMPILE_BACKEND"  # torch.compile backend of the workers (default inductor; aot_eager to debug)

_last_model = None  # weakref to the model compiled last in this process (dynamo's caches follow it)


def resolve(mode: str | None, device_type: str) -> tuple[str, str | None]:
    """(mode to run, note or None) for a requested compile ``mode`` on a ``device_type`` device.

    auto: CUDA graphs on CUDA, eager elsewhere. A mode the device cannot run is refused
    (eager) with a note saying why.
    """
    mode = (mode or "off").strip()
    if mode == "off":
        return "off", None
    if mode == "auto":
        return ("graphs", None) if device_type == "cuda" else ("off", None)
    if mode == "graphs":
        if device_type != "cuda":
            return "off", f"compile 'graphs' refused on {device_type}: CUDA graphs need a CUDA device; ran eagerly"
        return "graphs", None
    if mode == "torch.compile":
        why = compile_unavailable(device_type)
        if why:
            return "off", f"compile 'torch.compile' refused: {why}; ran eagerly"
        return "torch.compile", None
    return "off", f"unknown compile option {mode!r} (use one of {', '.join(MODES)}); ran eagerly"


def compile_unavailable(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot run here (None: it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python"
    except Exception as exc:  # an incomplete install
        return f"torch.compile unavailable ({type(exc).__name__}: {exc})".splitlines()[0][:300]
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton is not installed (inductor needs it for CUDA)"
        except Exception:
            return "Triton is not installed (inductor needs it for CUDA)"
    else:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            compiler = get_cpp_compiler()
            if not (shutil.which(compiler) or shutil.which(compiler.split()[0])):
                return f"no C++ compiler ({compiler}) for inductor's CPU code"
        except Exception as exc:
            return f"no C++ compiler for inductor's CPU code ({exc})".splitlines()[0][:300]
    return None


def _signature(pending: list) -> tuple:
    """What a REFRESH call recorded, without the data: the exchanges it will issue."""
    return tuple((p.key, tuple(p.sizes), p.dim, tuple(p.local.shape), p.local.dtype) for p in pending)


class CompiledBand(FallbackBand):
    """``call(inputs: dict[str, Tensor], phase) -> Tensor`` through ``torch.compile`` (fullgraph, static shapes)."""

    def __init__(self, forward: Callable[[dict], torch.Tensor], ctx: BandContext, model=None,
                 backend: str | None = None, options: dict | None = None):
        global _last_model
        import torch._dynamo as dynamo

        previous = _last_model() if _last_model is not None else None
        if model is not None:
            if _last_model is not None and previous is not model:
                dynamo.reset()  # compiled code of a replaced model: drop it with the model
            _last_model = weakref.ref(model)
        cfg = dynamo.config  # shapes x call slots x measured-alone: more than the default 8 variants
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name) and getattr(cfg, name) < 64:
                setattr(cfg, name, 64)
        self.forward = forward
        self.ctx = ctx
        self.backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
        self.generation = ctx.generation
        self.signatures: dict[tuple, tuple] = {}  # call key -> exchanges the eager call recorded
        self.compiled_calls = 0
        try:
            self.compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=self.backend,
                                          options=options)
        except Exception as exc:  # e.g. an unknown backend
            self.compiled = None
            self.disabled = self.note = _failure_note(exc)

    def __call__(self, inputs: dict, phase: Phase) -> torch.Tensor:
        ctx = self.ctx
        if self.generation != ctx.generation:  # new context buffers: learn each shape's exchanges again
            self.signatures.clear()
            self.generation = ctx.generation
        key = call_key(ctx, inputs)
        record = phase is Phase.REFRESH and ctx.world_size > 1 and not ctx.local_only
        expected = self.signatures.get(key)
        if expected is None:  # the first call of this shape: eager, noting what it records
            out, pending = self._eager(inputs)
            self.signatures[key] = _signature(pending)
        else:
            try:
                restart_call(ctx, record=True)
                out = self.compiled(inputs)
                pending = ctx.take_pending()
                if _signature(pending) != expected:
                    raise RuntimeError(f"the compiled call recorded {len(pending)} exchanges that differ from the "
                                       f"{len(expected)} of the eager call")
                self.compiled_calls += 1
            except Exception as exc:  # graph break, compiler error, ...: eager from now on, this call too
                self.disabled = self.note = _failure_note(exc)
                out, pending = self._eager(inputs)
        ctx.phase = phase
        ctx._pending = list(pending) if record else []
        return out

    def _eager(self, inputs: dict) -> tuple[torch.Tensor, list]:
        restart_call(self.ctx, record=True)  # nothing half-recorded survives, the layer counters restart
        out = self.forward(inputs)
        return out, self.ctx.take_pending()


def _failure_note(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    first = text[0] if text else type(exc).__name__
    where = next((line.strip() for line in reversed(text) if line.strip().startswith("File ")), "")
    return (f"torch.compile failed, running eagerly: {first}"[:300] + (f" ({where[:200]})" if where else ""))


def make_band(mode: str, forward: Callable[[dict], torch.Tensor], ctx: BandContext, model=None):
    """The compiled band call for a resolved ``mode`` ('graphs' | 'torch.compile'); None for 'off'."""
    if mode == "graphs":
        return GraphedBand(forward, ctx)
    if mode == "torch.compile":
        return CompiledBand(forward, ctx, model=model)
    return None
