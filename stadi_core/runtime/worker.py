"""The per-device worker process: joins the group, caches models, runs band jobs.

Importable by its normal module name (``stadi_core.runtime.worker``) so spawned
children can unpickle their entry point even when the coordinator was imported under
a file-path name, as ComfyUI imports node packs.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from datetime import timedelta

from .messages import (
    BandResult,
    Cancelled,
    GenerateJob,
    Heartbeat,
    MeasureJob,
    MeasureResult,
    Ready,
    Shutdown,
    StepReport,
    WorkerFailure,
    WorkerInit,
)


class JobCancelled(Exception):
    def __init__(self, step: int):
        super().__init__(f"cancelled at step {step}")
        self.step = step


class _Channel:
    """The pipe to the coordinator, shared by the job loop and the heartbeat thread."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self.job_id = None

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)


def worker_main(init: WorkerInit, conn, cancel_event) -> None:
    """Entry point of a spawned worker."""
    from .lifeline import tie_to_parent

    tie_to_parent(init.parent_pid)
    kind, _, index = init.device.partition(":")
    if kind == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = index or "0"
    channel = _Channel(conn)
    try:
        worker = _Worker(init, channel, cancel_event)
    except BaseException as exc:  # report start-up failures instead of dying silently
        channel.send(WorkerFailure(None, init.rank, f"worker {init.rank} ({init.device}) failed to start: {exc}",
                                   traceback.format_exc()))
        return
    worker.serve()


class _Worker:
    def __init__(self, init: WorkerInit, channel: _Channel, cancel_event):
        import torch
        import torch.distributed as dist

        self.init = init
        self.channel = channel
        self.cancel_event = cancel_event
        self.torch = torch
        torch.set_num_threads(max(1, init.threads))
        self.device = torch.device("cuda:0" if init.device.startswith("cuda") else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.group = None
        if init.world_size > 1:
            store = dist.TCPStore(init.store_host, init.store_port, is_master=False,
                                  timeout=timedelta(seconds=init.timeout_s))
            dist.init_process_group(
                init.backend,
                store=dist.PrefixStore(init.store_prefix, store),
                rank=init.rank,
                world_size=init.world_size,
                timeout=timedelta(seconds=init.timeout_s),
            )
            self.group = dist.group.WORLD
        self.models: dict[str, tuple] = {}  # spec key -> (model, ctx, adapter)
        threading.Thread(target=self._heartbeat, name="stadi-heartbeat", daemon=True).start()
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        channel.send(Ready(init.rank, os.getpid(), name))

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.init.heartbeat_s)
            try:
                self.channel.send(Heartbeat(self.init.rank, self.channel.job_id))
            except (OSError, EOFError, BrokenPipeError):
                os._exit(4)  # the coordinator is gone

    def serve(self) -> None:
        while True:
            try:
                job = self.channel.conn.recv()
            except (EOFError, OSError):
                return  # coordinator closed the pipe
            if isinstance(job, Shutdown):
                break
            self.channel.job_id = job.job_id
            try:
                if isinstance(job, GenerateJob):
                    self.channel.send(self._generate(job))
                elif isinstance(job, MeasureJob):
                    self.channel.send(self._measure(job))
                else:
                    raise TypeError(f"unknown job {type(job).__name__}")
            except JobCancelled as exc:
                self.channel.send(Cancelled(job.job_id, self.init.rank, exc.step))
            except BaseException as exc:
                self.channel.send(WorkerFailure(job.job_id, self.init.rank,
                                                f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            finally:
                self.channel.job_id = None
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()

    # -- model cache ---------------------------------------------------------------------
    def _model(self, spec_dict: dict, rows):
        from ..models.spec import ModelSpec, build_model, weights_checksum
        from ..parallel import BandContext, make_patch_parallel

        spec = ModelSpec.from_dict(spec_dict)
        key = spec.key()
        if key not in self.models:
            self.models.clear()  # one model per worker: release the previous one first
            model = build_model(spec, self.device)
            checksum = weights_checksum(model)
            ctx = BandContext(rows, self.init.rank, self.group, timeout_s=self.init.timeout_s)
            make_patch_parallel(model, ctx, spec.adapter.patch_attention)
            self.models[key] = (model, ctx, spec, checksum)
        model, ctx, spec, checksum = self.models[key]
        ctx.reset(rows)
        return model, ctx, spec, checksum

    def _network(self, model, ctx, spec, cond, slowdown: float):
        """The band's network call: exchange-aware forward plus the emulated slowdown pad."""
        torch = self.torch
        dtype = next(model.parameters()).dtype
        forward = spec.adapter.forward

        def call(x_in, t, phase):
            ctx.begin_call(phase)
            start = time.perf_counter()
            ts = torch.full((x_in.shape[0],), t, device=self.device, dtype=torch.float32)
            out = forward(model, x_in.to(self.device, dtype), ts, cond)
            stats = ctx.end_call()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            busy = time.perf_counter() - start - stats.comm_wait_s
            if slowdown > 1.0:
                time.sleep(busy * (slowdown - 1.0))  # pad to budget: emulated slower device
            return out.float().cpu(), stats.comm_wait_s

        return call

    # -- jobs ----------------------------------------------------------------------------
    def _generate(self, job: GenerateJob) -> BandResult:
        torch = self.torch
        from ..models.spec import batched_conditioning
        from ..planner import Plan
        from ..sampling.band_loop import LoopSchedule, run_band
        from ..sampling.noise import FullLatentNoise

        plan = Plan.from_dict(job.plan)
        if plan.world_size != self.init.world_size:
            raise ValueError(f"plan for {plan.world_size} ranks sent to a pool of {self.init.world_size}")
        band = plan.bands[self.init.rank]
        model, ctx, spec, checksum = self._model(job.model, plan.rows)
        dtype = next(model.parameters()).dtype
        conditioning = {part: {k: torch.from_numpy(v) for k, v in d.items()} for part, d in job.conditioning.items()}
        cond = batched_conditioning(conditioning, job.cfg, self.device, dtype)
        schedule = LoopSchedule(steps=plan.steps, warmup=plan.warmup, stride=band.stride,
                                sync_period=plan.sync_period, exact=plan.mode == "exact")
        rows = slice(band.row_start, band.row_start + band.rows)

        def on_step(timing):
            self.channel.send(StepReport(job.job_id, self.init.rank, timing.to_dict()))

        def before_sync_step(step: int) -> None:
            self._agree_on_cancel(step)

        with torch.inference_mode():
            x, timings = run_band(
                self._network(model, ctx, spec, cond, job.slowdown),
                sigmas=job.sigmas, sampler=job.sampler, cfg=job.cfg,
                noise=FullLatentNoise(job.seed, tuple(job.latent_shape)), rows=rows,
                schedule=schedule, model_sampling=spec.adapter.model_sampling(model),
                on_step=on_step, before_sync_step=before_sync_step,
            )
        return BandResult(job.job_id, self.init.rank, x.numpy(), [t.to_dict() for t in timings],
                          {"weights_checksum": checksum, "pid": os.getpid()})

    def _agree_on_cancel(self, step: int) -> None:
        """All ranks stop at the same sync step, or none does (no half-entered collective)."""
        torch = self.torch
        flag = 1.0 if self.cancel_event.is_set() else 0.0
        if self.group is not None:
            import torch.distributed as dist

            t = torch.tensor([flag], device=self.device if self.init.backend == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = float(t.item())
        if flag > 0:
            raise JobCancelled(step)

    def _measure(self, job: MeasureJob) -> MeasureResult:
        torch = self.torch
        from ..models.spec import ModelSpec, build_model, make_conditioning, batched_conditioning
        from ..parallel import Phase

        model, ctx, spec, _ = self._model(job.model, [1] * self.init.world_size)
        dtype = next(model.parameters()).dtype
        conditioning = make_conditioning(spec, model, job.batch, seed=0)
        cond = batched_conditioning(conditioning, 2.0, self.device, dtype)
        net = self._network(model, ctx, spec, cond, job.slowdown)
        channels = spec.adapter.latent_channels(model)
        x = torch.randn(2 * job.batch, channels, job.rows, job.width)
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
        return MeasureResult(job.job_id, self.init.rank, times[len(times) // 2], job.rows)
