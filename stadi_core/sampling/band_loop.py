"""One rank's denoising loop over its band, with stride reuse.

The same loop runs the single-process reference (one band = the whole latent), so the
only difference between the two is the network call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import NonFiniteOutput
from ..parallel.context import Phase
from .loop_state import LoopState
from .noise import FullLatentNoise
from .samplers import make_sampler

# model_sampling: see model_sampling.py (EpsDiscrete, FlowMatch)
# network(x_scaled, t, phase) -> raw output for the rows of x (batch doubled under CFG), or a parallel
# network's (raw, seconds blocked in exchanges, bytes sent)
Network = Callable[[torch.Tensor, float, Phase], torch.Tensor]


@dataclass
class StepTiming:
    """What one base step cost this rank (seconds)."""

    step: int
    computed: bool
    phase: str
    busy_s: float
    comm_s: float
    wall_s: float
    sent: dict = field(default_factory=dict)  # context bytes this rank sent in the step, per kind (kv, halo, ...)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LoopSchedule:
    """When this rank evaluates the network and how fresh the context is then."""

    steps: int
    warmup: int = 0
    stride: int = 1
    sync_period: int = 1
    exact: bool = True

    def computes(self, t: int) -> bool:
        return t < self.warmup or (t - self.warmup) % self.stride == 0

    def phase(self, t: int) -> Phase:
        if self.exact or t < self.warmup:
            return Phase.FRESH
        if (t - self.warmup) % self.sync_period == 0:
            return Phase.REFRESH
        return Phase.STALE


def cfg_combine(raw: torch.Tensor, cfg: float, batch: int) -> torch.Tensor:
    """Raw output for [uncond; cond] (or cond alone when cfg == 1) -> guided epsilon."""
    if raw.shape[0] == batch:
        return raw
    uncond, cond = raw[:batch], raw[batch:]
    return uncond + cfg * (cond - uncond)


def run_band(
    network: Network,
    *,
    sigmas: list[float],
    sampler: str,
    cfg: float,
    noise: FullLatentNoise,
    rows: slice,
    schedule: LoopSchedule,
    model_sampling,
    on_step: Callable[[StepTiming], None] | None = None,
    before_sync_step: Callable[[int], None] | None = None,
    window=None,
    start: LoopState | None = None,
    checkpoint: Callable[[LoopState], None] | None = None,
) -> tuple[torch.Tensor, list[StepTiming]]:
    """Denoise rows ``rows`` of the latent from noise; returns (band latent, per-step timings).

    ``window`` (a hybrid_window.HybridWindow): each step's [uncond; cond] output is logged to it,
    and inside the window it opens every second step reuses the last output (one larger step,
    as a stride 2 does). The raw output must be the whole latent's, so every rank decides alike.
    ``start``: continue a loop paused or checkpointed elsewhere (its rows must be ``rows``); its
    first step evaluates the network. ``checkpoint``: told the loop's state before every sync step.
    """
    solver = make_sampler(sampler)
    batch = noise.shape[0]
    row_start = rows.start or 0
    first = 0
    if start is None:
        x = noise.initial(rows) * sigmas[0]
    else:
        first = start.step
        x, history = start.tensors()
        solver.load(history)
    use_cfg = cfg != 1.0
    last_raw = None
    timings: list[StepTiming] = []
    for i in range(first, len(sigmas) - 1):
        t0 = time.perf_counter()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if schedule.phase(i) is not Phase.STALE:
            if checkpoint is not None:
                checkpoint(LoopState.capture(i, row_start, x, solver.state()))
            if before_sync_step is not None:
                before_sync_step(i)  # every rank reaches sync steps, so they can agree on a cancel here
        computed = (schedule.computes(i) and not _window_skips(window, i)) or last_raw is None
        phase = schedule.phase(i)
        busy = comm = 0.0
        sent = {}
        if computed:
            x_in = model_sampling.scale_in(x, sigma)
            if use_cfg:
                x_in = torch.cat([x_in, x_in])
            c0 = time.perf_counter()
            last_raw, comm, sent = _timed_call(network, x_in, model_sampling.timestep(sigma), phase)
            busy = time.perf_counter() - c0 - comm
            require_finite(last_raw, i, phase)
        if window is not None:
            window.observe(i, last_raw[batch:].float(), last_raw[:batch].float())
        eps = cfg_combine(last_raw.float(), cfg, batch)
        denoised = model_sampling.denoised(x, eps, sigma)
        x = solver.step(i, x, denoised, sigma, sigma_next, lambda k: noise.step(k, rows))
        timing = StepTiming(i, computed, phase.value, busy, comm, time.perf_counter() - t0, sent)
        timings.append(timing)
        if on_step is not None:
            on_step(timing)
    return x, timings


def _window_skips(window, step: int) -> bool:
    """Every second step of an opened hybrid window reuses the last network output."""
    return window is not None and window.in_window(step) and (step - window.opened_at) % 2 == 1


NON_FINITE_HINT = ("Causes seen: fp16 overflow in the model or a very high CFG (try bfloat16 or float32, or a lower "
                   "CFG), or an exchange that does not work on this machine (try mode 'exact': if that is finite, "
                   "report the displaced failure)")


def count_non_finite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def require_finite(out: torch.Tensor, step: int, phase: Phase) -> None:
    """Stop at the first network call whose output holds NaN/inf, saying where it happened.

    A non-finite band poisons every later step and, through the exchange, the other bands;
    the step and the kind of call (fresh / refresh / stale context) are what tell an fp16
    overflow from a broken exchange.
    """
    bad = count_non_finite(out)
    if bad:
        raise NonFiniteOutput(f"the network output held {bad} NaN/inf values of {out.numel()} at step {step} "
                              f"({phase.value} call); the run was stopped and nothing was returned. {NON_FINITE_HINT}")


def _timed_call(network: Network, x_in, t, phase):
    out = network(x_in, t, phase)
    if isinstance(out, tuple):  # (raw, comm seconds, bytes sent) from a parallel network
        return out
    return out, 0.0, {}
