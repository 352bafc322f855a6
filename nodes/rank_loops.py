"""Per-rank loops: the STADI Sampler's execution shape for plans with strides > 1 (DESIGN §3).

For each rank a light thread runs ComfyUI's own sampler loop over the full latent, on a clone
of the MODEL whose diffusion network is a ``BandNetwork`` that sends the call to that rank's
worker, which computes only its band. The sampler math is row-local, so each band's rows
evolve exactly as in one loop, and a rank with stride k answers k-1 of every k calls from its
last output (one larger step on a slow band). Anything image-wide is refused before the run
(compatibility.check_model without lockstep): each loop sees only its band's rows as real.
"""

from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass, field

import torch

from stadi_core.api import check_finite
from stadi_core.errors import WorkerError, WorkerLost
from stadi_core.parallel import Phase
from stadi_core.planner import Plan
from stadi_core.runtime.messages import BandCall
from stadi_core.runtime.pool import JobCancelledError
from stadi_core.runtime.session_conds import ConditioningOnce, digest
from stadi_core.sampling.band_loop import LoopSchedule

from . import comfy_api
from .band_network import BandNetwork, private_shell
from .deployment import CallSlots, Deployment, call_inputs, step_index, step_timings
from .joined_calls import CallInputs, JoinedCalls, loss_of
from .lockstep import LockstepRun


def _interrupted() -> bool:
    """ComfyUI's Interrupt, polled by each rank thread while it waits for its worker (a stuck worker
    cannot hold the prompt: the session kills the pool 1.2 s after the cancel)."""
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


@dataclass
class _RankState:
    rank: int
    rows: slice
    schedule: LoopSchedule
    slots: CallSlots = field(default_factory=CallSlots)
    last_out: dict = field(default_factory=dict)  # slot -> (input shape, this band's last output)
    step: int = 0  # last sampler step reported by the callback
    records: list = field(default_factory=list)  # per network call: step, computed, phase, busy, comm, t0
    result: torch.Tensor | None = None
    error: BaseException | None = None


class RankLoops:
    """One strided run: a sampler loop per rank, stitched bands, and what each rank spent."""

    def __init__(self, deployment: Deployment, plan: Plan):
        self.deployment = deployment
        self.plan = plan  # the plan the loops started on
        self.final_plan = plan  # ... and the one they finished on (the survivors', after a loss)
        self.sent = ConditioningOnce()  # rank threads touch only their own rank's entry
        self.inputs = CallInputs([slice(b.row_start, b.row_end) for b in plan.bands])
        self.states: list[_RankState] = []
        self.joined: JoinedCalls | None = None  # set when a worker is lost: the loops go on joined
        self._join_lock = threading.Lock()

    def _network_call(self, session, state: _RankState):
        adapter = self.deployment.adapter

        def network_call(x, timesteps, context, control, transformer_options, extra):
            ts, cond = call_inputs(adapter, x, timesteps, context, control, transformer_options, extra)
            step = step_index(transformer_options)
            slot = state.slots.next(step)
            rows = x[:, :, state.rows].detach().to("cpu", torch.float32, copy=True)  # what the band call sends too
            self.inputs.keep(state.rank, (step, slot), rows, min(s.step for s in self.states) - 1)
            if self.joined is not None:
                return self.joined.call(state.rank, (step, slot), x, timesteps, context, control,
                                        transformer_options, extra)
            try:
                return band_call(x, rows, ts, cond, step, slot)
            except JobCancelledError:
                raise
            except WorkerError as exc:  # a lost worker: the loops go on, their calls joined on the survivors
                return self._join(session, exc, x).call(state.rank, (step, slot), x, timesteps, context, control,
                                                        transformer_options, extra)

        def band_call(x, rows, ts, cond, step, slot):
            t0 = time.perf_counter()
            last = state.last_out.get(slot)
            if state.schedule.computes(step) or last is None or last[0] != tuple(x.shape):
                phase = state.schedule.phase(step)
                xb = rows.contiguous().numpy()
                signature = hash((step, slot, tuple(x.shape))) % (1 << 50)
                key = digest(cond)
                lean = self.sent.lean(state.rank, cond, key)  # once per run per rank, then by key
                out = session.call(state.rank, lambda job_id, call_id: BandCall(
                    job_id, call_id, step, phase.value, xb, ts, lean, cancel=session.cancel_requested,
                    signature=signature, slot=slot, cond_key=key), should_cancel=_interrupted)
                last = (tuple(x.shape), torch.from_numpy(out.out))
                state.last_out[slot] = last
                state.records.append(dict(step=step, computed=True, phase=phase.value, busy_s=out.busy_s,
                                          comm_s=out.comm_s, sent=out.sent, t0=t0))
            else:
                state.records.append(dict(step=step, computed=False, phase=Phase.STALE.value, busy_s=0.0,
                                          comm_s=0.0, t0=t0))
            band = last[1]
            full = x.new_zeros((x.shape[0], band.shape[1]) + tuple(x.shape[2:]))
            full[:, :, state.rows] = band.to(device=x.device, dtype=x.dtype)
            return full

        return network_call

    def _join(self, session, exc: WorkerError, x) -> JoinedCalls:
        """The first loop whose call failed because a worker was lost opens a lockstep run on the survivors
        (strides end here: every loop evaluates every call); a failure that is not a loss is raised."""
        with self._join_lock:
            if self.joined is None:
                lost = loss_of(session, exc)
                if lost is None:
                    raise exc
                d = self.deployment
                d.strides = "off"
                step = min(s.step for s in self.states)
                survivors = d.drop(lost, self.plan, x.shape[-1], step, resumed=True)
                self.joined = JoinedCalls(self.inputs, LockstepRun(d, tuple(x.shape), plan=survivors), _interrupted,
                                          since=step)
                self.final_plan = survivors
        return self.joined

    def sample(self, noise, latent_image, *, positive, negative, cfg, scheduler, denoise, noise_mask, seed):
        """(per-rank band latents, report); raises InterruptProcessingException on Interrupt."""
        import comfy.model_management
        import comfy.patcher_extension
        import comfy.sample
        import comfy.utils
        import latent_preview

        d, plan = self.deployment, self.plan
        pool, session = d.open(plan)
        states = self.states = [_RankState(b.rank, slice(b.row_start, b.row_end),
                                           LoopSchedule(steps=plan.steps, warmup=plan.warmup, stride=b.stride,
                                                        sync_period=plan.sync_period, exact=plan.mode == "exact"))
                                for b in plan.bands]
        x0_preview = torch.zeros_like(latent_image[:1])
        preview_lock = threading.Lock()
        total_steps = [plan.steps]

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
                    clone = d.model.clone()
                    # Each rank's loop runs on its own shell of the BaseModel (object patches such as
                    # model_sampling, and its BandNetwork); the network modules stay shared. pre_run/cleanup
                    # set per-loop state on it (current_patcher): a fast rank that finishes first must not
                    # clear it under a slower rank's loop.
                    clone.model = private_shell(clone, diffusion_model=BandNetwork(
                        d.model.model.diffusion_model, self._network_call(session, state)))
                    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "stadi",
                                               comfy_api.load_nothing)
                    out = comfy.sample.sample(clone, noise, plan.steps, cfg, d.sampler_name, scheduler, positive,
                                              negative, latent_image, denoise=denoise, noise_mask=noise_mask,
                                              callback=make_callback(state), disable_pbar=True, seed=seed)
                    state.result = out[:, :, state.rows].cpu()
            except BaseException as exc:
                state.error = exc
                if not isinstance(exc, JobCancelledError) and session.failed is None:
                    session.failed = exc
                    pool.close(force=True)  # ranks waiting on this one in a collective must not hang
                if self.joined is not None:  # the other loops must not wait for this one's next call
                    self.joined.fail(exc)

        pbar = comfy.utils.ProgressBar(plan.steps)
        previewer = latent_preview.get_previewer(d.model.load_device, d.model.model.latent_format)
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(run_rank, s),
                                    name=f"stadi-rank-{s.rank}", daemon=True) for s in states]
        t_start = time.perf_counter()
        interrupted = False
        stopped: BaseException | None = None  # raised here (the progress hook raises ComfyUI's interrupt)
        try:
            for t in threads:
                t.start()
            shown = 0
            # The session ends only after every rank thread has: they read their connections until then.
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.05)
                if not interrupted and (stopped is not None or comfy.model_management.processing_interrupted()):
                    interrupted = True
                    session.cancel()  # the ranks stop together at their next sync step
                done = min(s.step for s in states)
                if done > shown and stopped is None:
                    shown = done
                    try:
                        preview = None
                        if previewer is not None:
                            with preview_lock:
                                preview = previewer.decode_latent_to_preview_image("JPEG", x0_preview.clone())
                        pbar.update_absolute(done, total_steps[0], preview)
                    except BaseException as exc:
                        stopped = exc
        finally:
            session.close()
            if self.joined is not None:
                self.joined.close()
        if stopped is not None and not comfy_api.is_interrupt(stopped):
            raise stopped
        wall = time.perf_counter() - t_start
        errors = [s.error for s in states if s.error is not None]
        if interrupted or any(isinstance(e, JobCancelledError) for e in errors):
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException()
        if errors:  # a lost worker is the cause when there is one (the others were stopped because of it)
            lost = next((e for e in errors if isinstance(e, WorkerLost)), None)
            if lost is not None:
                lost.step = min(s.step for s in states)  # where the loops were: the report says so
                raise lost
            raise session.failed or errors[0]
        check_finite([s.result for s in states], plan)
        if self.joined is not None:  # each loop's rows, cut by the survivors' plan; their calls' report
            whole = torch.cat([s.result for s in states], dim=2)
            report = self.joined.run.report(loop="the per-rank loops' calls joined after the loss")
            report.notes.append(f"per-rank loops until step {self.joined.since}, then every call joined on the "
                                "survivors (strides ended with the loss)")
            return [whole[:, :, b.row_start:b.row_end] for b in self.final_plan.bands], report
        timings = [step_timings(s.records, t_start + wall) for s in states]
        return [s.result for s in states], d.report(plan, pool, session, timings, wall)
