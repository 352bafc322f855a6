"""The standalone engine's jobs on a worker: denoise a band with the sampler loop in the worker
(GenerateJob) and time the network on a band (MeasureJob).

The worker (worker.py) lends them its model cache (``model_for``), its band network (``band_network``)
and its step agreement (``agree``: where a cancel or a pause stops every rank together); the loop state
they checkpoint and resume is sampling/loop_state.py's.
"""

from __future__ import annotations

import os
import time

from .lifeline import kill_if_armed
from .messages import BandResult, Checkpoint, GenerateJob, MeasureJob, MeasureResult, StepReport


class SlowdownPad:
    """An emulated slowdown that starts at sampler step ``start`` (a device that gets busy mid-run);
    ``float(pad)`` is the factor for the step the loop is at (``step``, set as it goes). Both job kinds
    use it: the standalone loop here and a ComfyUI session's band calls (worker.py)."""

    def __init__(self, factor: float, start: int = 0, step: int = 0):
        self.factor, self.start, self.step = factor, start, step

    def __float__(self) -> float:
        return self.factor if self.step >= self.start else 1.0


def generate(worker, job: GenerateJob) -> BandResult:
    """Denoise this rank's band with the sampler loop here (sampling/band_loop.py), reporting each step,
    checkpointing before sync steps when asked, and stopping where every rank agrees to (cancel, pause)."""
    torch = worker.torch
    from ..models.spec import batched_conditioning, input_dtype
    from ..planner import Plan
    from ..sampling.band_loop import LoopSchedule, run_band
    from ..sampling.noise import FullLatentNoise

    plan = Plan.from_dict(job.plan)
    if plan.world_size != worker.init.world_size:
        raise ValueError(f"plan for {plan.world_size} ranks sent to a pool of {worker.init.world_size}")
    band = plan.bands[worker.init.rank]
    model, ctx, spec, checksum = worker.model_for(job.model, plan.rows, context=plan.context)
    dtype = input_dtype(model)
    conditioning = {part: {k: torch.from_numpy(v) for k, v in d.items()} for part, d in job.conditioning.items()}
    schedule = LoopSchedule(steps=plan.steps, warmup=plan.warmup, stride=band.stride,
                            sync_period=plan.sync_period, exact=plan.mode == "exact")
    pad = SlowdownPad(job.slowdown, job.slowdown_from, job.resume.step if job.resume is not None else 0)
    if plan.groups:  # a branch arrangement: every rank steps the whole latent from the whole output
        from ..sampling.unit_network import UnitsNetwork
        from .branch_groups import BranchGroups

        groups = BranchGroups(worker, plan, ctx)
        network = UnitsNetwork(groups.rank_units(model, spec, conditioning, pad, dtype), groups.combine)
        rows = slice(None)
    else:
        cond = batched_conditioning(conditioning, job.cfg, worker.device, dtype)
        network = worker.band_network(model, ctx, spec, cond, pad, graphs=job.graphs)
        rows = slice(band.row_start, band.row_start + band.rows)

    def on_step(timing):
        pad.step = timing.step + 1
        worker.channel.tick(f"denoising (step {timing.step + 1})")
        worker.channel.send(StepReport(job.job_id, worker.init.rank, timing.to_dict()))
        kill_if_armed(worker.init.device, timing.step + 1)  # test-only, inert unless STADI_TEST_KILL_FILE is set

    def checkpoint(state):
        worker.channel.send(Checkpoint(job.job_id, worker.init.rank, state))

    window = None
    if job.hybrid_window is not None:
        from ..sampling.hybrid_window import HybridWindow, WindowConfig

        window = HybridWindow(WindowConfig(**job.hybrid_window), plan.steps)

    with torch.inference_mode():
        x, timings = run_band(
            network,
            sigmas=job.sigmas, sampler=job.sampler, cfg=job.cfg,
            noise=FullLatentNoise(job.seed, tuple(job.latent_shape)), rows=rows,
            schedule=schedule, model_sampling=spec.adapter.model_sampling(model),
            on_step=on_step, before_sync_step=worker.agree, window=window,
            start=job.resume, checkpoint=checkpoint if job.checkpoints else None,
        )
    info = {"weights_checksum": checksum, "pid": os.getpid(), "transport": worker.transport_name}
    if window is not None:
        info["hybrid_window"] = window.summary()
    note = worker.graphs_note(model)
    if note:
        info["note"] = note
    return BandResult(job.job_id, worker.init.rank, x.numpy(), [t.to_dict() for t in timings], info)

def measure(worker, job: MeasureJob) -> MeasureResult:
    """Median seconds of the network on a band of ``job.rows`` rows, alone (no exchange)."""
    torch = worker.torch
    from ..models.spec import batched_conditioning, input_dtype, make_conditioning
    from ..parallel import Phase

    model, ctx, spec, _ = worker.model_for(job.model, [1] * worker.init.world_size)
    dtype = input_dtype(model)
    conditioning = make_conditioning(spec, model, job.batch, seed=0)
    cond = batched_conditioning(conditioning, 2.0, worker.device, dtype)
    net = worker.band_network(model, ctx, spec, cond, job.slowdown, graphs=job.graphs)
    x = torch.randn(2 * job.batch, spec.adapter.latent_channels(model), job.rows, job.width)
    times = []
    ctx.local_only = True
    try:
        with torch.inference_mode():
            for _ in range(job.repeats + 1):
                t0 = time.perf_counter()
                net(x, 500.0, Phase.FRESH)
                times.append(time.perf_counter() - t0)
    finally:
        ctx.local_only = False
    times = sorted(times[1:])  # the first call pays for allocation and caching
    return MeasureResult(job.job_id, worker.init.rank, times[len(times) // 2], job.rows)
