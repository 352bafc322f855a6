"""The STADI Sampler's coordinator inside the ComfyUI server (DESIGN §3).

For each rank a light thread runs ComfyUI's own sampler loop (KSampler -> CFGGuider ->
k-diffusion) over the full latent, on a clone of the MODEL whose diffusion network is a
``BandNetwork`` (an object patch, see band_network.py) that sends the network call to that
rank's worker, which computes only its band.
So every sampler, scheduler, CFG function and model_sampling patch works unchanged, and
a rank with stride k simply answers k-1 of every k calls from its last output. The
server keeps ComfyUI's noise, progress bar, preview and interrupt semantics.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from stadi_core.api import check_finite
from stadi_core.cluster import ClusterSpec
from stadi_core.errors import StadiError, UnsupportedError
from stadi_core.models.comfy_common import MIRRORED_ARGS, model_class_path
from stadi_core.models.spec import FAMILIES, ModelSpec
from stadi_core.parallel import Phase
from stadi_core.planner import Plan, make_plan
from stadi_core.report import RunReport, measured_capabilities
from stadi_core.runtime.messages import BandCall, SessionStart
from stadi_core.runtime.pool import JobCancelledError, get_pool
from stadi_core.sampling.band_loop import LoopSchedule

from . import compatibility
from .band_network import BandNetwork, private_shell
from .types import StadiCluster, StadiPatches
from .weights import baked_network_file

log = logging.getLogger("stadi")

# rows/s measured per (model key, device, latent H, W): plans of later runs start from these
_CAPABILITIES: dict[tuple, float] = {}


def default_cluster() -> StadiCluster:
    n = torch.cuda.device_count()
    spec = ClusterSpec.parse(f"cuda*{n}" if n else "cpu*2")
    return StadiCluster(spec, notes=[] if n else ["no GPU found: running on 2 CPU workers"])


@dataclass
class _RankState:
    rank: int
    rows: slice
    schedule: LoopSchedule
    last_out: torch.Tensor | None = None
    step: int = 0  # last sampler step reported by the callback
    records: list = field(default_factory=list)  # per network call: step, computed, phase, busy, comm, t0
    result: torch.Tensor | None = None
    error: BaseException | None = None


def _step_index(transformer_options: dict) -> int:
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None:
        raise UnsupportedError("STADI Sampler: the sampler did not provide its sigma schedule")
    s = float(sigmas.max())
    return max(0, int((sample_sigmas >= s * (1 - 1e-6)).sum()) - 1)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


class StadiRun:
    """One STADI Sampler execution: plan, workers, per-rank loops, stitched bands."""

    def __init__(self, model, *, cluster: StadiCluster | None, mode: str, warmup: int, strides: str,
                 sampler_name: str, steps: int):
        import comfy.cli_args

        family = compatibility.check_model(model)
        self.model = model
        self.cluster = cluster or default_cluster()
        self.mode, self.warmup, self.strides = mode, warmup, strides
        self.sampler_name, self.steps = sampler_name, steps
        base = model.model
        network = base.diffusion_model
        self.adapter = FAMILIES[family]
        self.align = self.adapter.alignment(network)
        self.channels = self.adapter.latent_channels(network)
        model_config = base.model_config
        unet_config = dict(model_config.unet_config)
        unet_config.pop("dtype", None)
        path, key = baked_network_file(model)
        mirrored = {k: getattr(comfy.cli_args.args, k) for k in MIRRORED_ARGS if hasattr(comfy.cli_args.args, k)}
        # weights as ComfyUI stores them (fp8 included), computed in its manual-cast dtype where it has one
        self.spec = ModelSpec(family=family, config=unet_config, path=path, dtype=_dtype_name(base.get_dtype()),
                              extra={"comfy_args": mirrored, "weights_key": key,
                                     "model_class": model_class_path(network),
                                     "compute_dtype": _dtype_name(base.manual_cast_dtype),
                                     "scaled_fp8": _dtype_name(model_config.scaled_fp8),
                                     "fp8_optimizations": bool(model_config.optimizations.get("fp8", False))})

    # -- planning ----------------------------------------------------------------------------
    def plan(self, height: int, width: int, speeds: list[float] | None = None) -> Plan:
        spec = self.cluster.spec
        spec.validate_available()
        active = spec.active()
        if speeds is None:
            speeds = []
            for d in active:
                cached = _CAPABILITIES.get((self.spec.key(), d.name, height, width))
                speeds.append(d.relative_speed or cached or d.planning_speed())
        align = self.align
        if width % align:
            raise StadiError(f"latent width {width} is not a multiple of {align}: use an image width that is a "
                             f"multiple of {8 * align} px")
        return make_plan(height, speeds, devices=[d.name for d in active], align=align, steps=self.steps,
                         warmup=self.warmup, mode=self.mode, strides=self.strides, sampler=self.sampler_name)

    def _pool(self, plan: Plan):
        import comfy.model_base

        # comfy is a namespace package: locate the checkout through one of its modules
        comfy_root = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_base.__file__)))
        return get_pool([b.device for b in plan.bands], self.cluster.spec.resolved_backend(),
                        extra_sys_path=[comfy_root])

    def _open(self, plan: Plan):
        by_name = {d.name: d for d in self.cluster.spec.active()}
        slowdowns = [by_name[b.device].slowdown for b in plan.bands]
        pool = self._pool(plan)

        def per_rank(start, rank):
            start.slowdown = slowdowns[rank]
            return start

        session = pool.open_session(lambda job_id: SessionStart(job_id, self.spec.to_dict(), plan.to_dict()),
                                    per_rank=per_rank)
        return pool, session, slowdowns

    def measure(self, plan: Plan, batch: int, width: int) -> list[float]:
        """Rows/s of each device on its band alone (no exchange), one device at a time."""
        n = 2 * batch
        # stand-in conditioning shaped for this network (values do not matter for timing)
        probe = self.adapter.make_conditioning(self.model.model.diffusion_model, n, seed=0)["cond"]
        cond = {k: v.numpy().astype(np.float32) for k, v in probe.items()}
        pool, session, _ = self._open(plan)
        speeds = []
        try:
            for band in plan.bands:
                x = np.random.default_rng(0).standard_normal((n, self.channels, band.rows, width)).astype(np.float32)
                busy = []
                for _ in range(2):
                    out = session.call(band.rank, lambda job_id, call_id: BandCall(
                        job_id, call_id, 0, Phase.FRESH.value, x, np.full((n,), 500.0, np.float32), cond,
                        measure_only=True))
                    busy.append(out.busy_s)
                speeds.append(band.rows / busy[-1])
        finally:
            session.close()
        return speeds

    # -- the run -----------------------------------------------------------------------------
    def sample(self, noise, latent_image, *, positive, negative, cfg, scheduler, denoise, noise_mask, seed,
               latent_extra: dict) -> StadiPatches:
        import comfy.model_management
        import comfy.patcher_extension
        import comfy.sample
        import comfy.utils
        import latent_preview

        compatibility.check_conditioning(positive, negative)
        batch, _, height, width = latent_image.shape
        plan = self.plan(height, width)
        if self.cluster.measure and plan.world_size > 1 and not all(
                (self.spec.key(), b.device, height, width) in _CAPABILITIES for b in plan.bands):
            speeds = self.measure(plan, batch, width)
            for band, s in zip(plan.bands, speeds):
                _CAPABILITIES[(self.spec.key(), band.device, height, width)] = s
            plan = self.plan(height, width)
        pool, session, slowdowns = self._open(plan)
        states = [_RankState(b.rank, slice(b.row_start, b.row_start + b.rows),
                             LoopSchedule(steps=plan.steps, warmup=plan.warmup, stride=b.stride,
                                          sync_period=plan.sync_period, exact=plan.mode == "exact"))
                  for b in plan.bands]
        x0_preview = torch.zeros_like(latent_image[:1])
        preview_lock = threading.Lock()
        total_steps = [plan.steps]

        def make_network_call(state: _RankState):
            def network_call(x, timesteps, context, control, transformer_options, extra):
                if control is not None:
                    raise UnsupportedError("STADI Sampler: ControlNet residuals reached the model; use KSampler")
                unknown = sorted(k for k, v in extra.items() if v is not None and k not in self.adapter.COND_KEYS)
                if unknown:
                    raise UnsupportedError(f"STADI Sampler: model inputs {unknown} (e.g. reference latents of an edit "
                                           "model, a text attention mask) are not supported in bands; use KSampler")
                compatibility.check_call_options(transformer_options)
                step = _step_index(transformer_options)
                t0 = time.perf_counter()
                if state.schedule.computes(step) or state.last_out is None \
                        or state.last_out.shape[0] != x.shape[0]:
                    phase = state.schedule.phase(step)
                    cond = {"context": _as_numpy(context)}
                    cond.update({k: _as_numpy(extra[k]) for k in self.adapter.COND_KEYS if extra.get(k) is not None})
                    xb = _as_numpy(x[:, :, state.rows])
                    signature = hash((step, tuple(x.shape))) % (1 << 50)
                    out = session.call(state.rank, lambda job_id, call_id: BandCall(
                        job_id, call_id, step, phase.value, xb, _as_numpy(timesteps.float()), cond,
                        cancel=session.cancel_requested, signature=signature))
                    state.last_out = torch.from_numpy(out.out)
                    state.records.append(dict(step=step, computed=True, phase=phase.value, busy_s=out.busy_s,
                                              comm_s=out.comm_s, t0=t0))
                else:
                    state.records.append(dict(step=step, computed=False, phase=Phase.STALE.value, busy_s=0.0,
                                              comm_s=0.0, t0=t0))
                full = x.new_zeros((x.shape[0], state.last_out.shape[1]) + tuple(x.shape[2:]))
                full[:, :, state.rows] = state.last_out.to(device=x.device, dtype=x.dtype)
                return full
            return network_call

        def load_nothing(executor, model, noise_shape, conds, model_options=None):
            return model.model, conds, []  # the workers hold the weights: the server loads nothing

        def make_callback(state: _RankState):
            def callback(step, x0, x, total):
                total_steps[0] = total
                with preview_lock:
                    x0_preview[:, :, state.rows] = x0[:1, :, state.rows].to(x0_preview)
                state.step = step + 1
            return callback

        def run_rank(state: _RankState):
            try:
                with torch.inference_mode():
                    clone = self.model.clone()
                    clone.add_object_patch("diffusion_model",
                                           BandNetwork(self.model.model.diffusion_model, make_network_call(state)))
                    # Each rank's loop runs on its own shell of the BaseModel carrying the clone's object
                    # patches (model_sampling, the BandNetwork); the network modules stay shared. pre_run/
                    # cleanup set per-loop state on it (current_patcher): a fast rank that finishes first
                    # must not clear it under a slower rank's loop.
                    clone.model = private_shell(clone)
                    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "stadi",
                                               load_nothing)
                    out = comfy.sample.sample(clone, noise, self.steps, cfg, self.sampler_name, scheduler, positive,
                                              negative, latent_image, denoise=denoise, noise_mask=noise_mask,
                                              callback=make_callback(state), disable_pbar=True, seed=seed)
                    state.result = out[:, :, state.rows].cpu()
            except BaseException as exc:
                state.error = exc
                if not isinstance(exc, JobCancelledError) and session.failed is None:
                    session.failed = exc
                    pool.close(force=True)  # ranks waiting on this one in a collective must not hang

        pbar = comfy.utils.ProgressBar(plan.steps)
        previewer = latent_preview.get_previewer(self.model.load_device, self.model.model.latent_format)
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(run_rank, s),
                                    name=f"stadi-rank-{s.rank}", daemon=True) for s in states]
        t_start = time.perf_counter()
        interrupted = False
        try:
            for t in threads:
                t.start()
            shown = 0
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.05)
                if not interrupted and comfy.model_management.processing_interrupted():
                    interrupted = True
                    session.cancel()
                done = min(s.step for s in states)
                if done > shown:
                    shown = done
                    preview = None
                    if previewer is not None:
                        with preview_lock:
                            preview = previewer.decode_latent_to_preview_image("JPEG", x0_preview.clone())
                    pbar.update_absolute(done, total_steps[0], preview)
        finally:
            session.close()
        wall = time.perf_counter() - t_start
        errors = [s.error for s in states if s.error is not None]
        if interrupted or any(isinstance(e, JobCancelledError) for e in errors):
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException()
        if errors:
            first = session.failed or errors[0]
            raise first
        check_finite([s.result for s in states], plan)
        timings = [_step_timings(s.records, t_start + wall) for s in states]
        report = RunReport.from_results(plan, timings, wall, slowdowns=slowdowns, pool_pids=pool.pids(),
                                        checksums={r: session.ready[r].info.get("weights_checksum")
                                                   for r in session.ready})
        report.notes.extend(self.cluster.notes)
        for device, cap in measured_capabilities(report).items():
            _CAPABILITIES[(self.spec.key(), device, height, width)] = cap
        return StadiPatches(plan=plan.to_dict(), bands=[s.result for s in states], report=report.to_dict(),
                            latent_extra=latent_extra)


def _dtype_name(dtype) -> str | None:
    return str(dtype).split(".")[-1] if dtype is not None else None


def _step_timings(records: list[dict], t_end: float) -> list[dict]:
    """Per-call records -> per-step timings in the engine's StepTiming layout."""
    out = []
    for i, r in enumerate(records):
        nxt = records[i + 1]["t0"] if i + 1 < len(records) else t_end
        out.append(dict(step=r["step"], computed=r["computed"], phase=r["phase"], busy_s=r["busy_s"],
                        comm_s=r["comm_s"], wall_s=nxt - r["t0"]))
    return out

