"""Lockstep execution: ONE stock sampler loop in the server; each network call runs in bands.

DistriFusion's shape inside ComfyUI. The sampler, guider, CFG functions, wrappers and step
caches all see the true full tensors, so everything image-wide (RescaleCFG, PerpNeg, EasyCache,
dpm_adaptive's error norm...) works unchanged; only the diffusion network's forward is split:
the call's rows are scattered to the ranks, each computes its band with the others' context,
and the band outputs are gathered into the full output.

It is attached to a clone of the MODEL with ComfyUI's own wrapper mechanism, nothing global:
- OUTER_SAMPLE: per sampling run, plan from the latent's shape, open a session on the warm
  workers, close it afterwards (an Interrupt ends the run between calls, the pool staying warm, or
  during one: ranks that do not stop within 1.2 s are killed and the next run starts a fresh pool);
- PREPARE_SAMPLING: load nothing on the server (the workers hold the weights) and hand the
  loop a private shell of the BaseModel whose diffusion network is a ``BandNetwork``.
"""

from __future__ import annotations

import contextvars
import logging
import time

import torch

from stadi_core.errors import StadiError, WorkerLost
from stadi_core.parallel import Phase
from stadi_core.replan import Replanner, ReplanPolicy
from stadi_core.report import RunReport, measured_capabilities
from stadi_core.runtime.messages import BandCall
from stadi_core.runtime.pool import JobCancelledError
from stadi_core.runtime.session_conds import ConditioningOnce, digest

from .band_controls import BandControls, ControlsOnce, band_note, message_bytes, worker_side
from .band_network import BandNetwork, private_shell
from .branch_calls import assemble, split_call
from .compatibility import LOCKSTEP_KEY as WRAPPER_KEY
from .control_residuals import band_control, call_control_bytes, control_note, controls_in, load_controls
from .deployment import CallSlots, Deployment, call_inputs, step_index, step_timings
from .types import StadiCluster
from .weights import patched_state_dict

log = logging.getLogger("stadi")
_RUN: contextvars.ContextVar = contextvars.ContextVar("stadi_lockstep_run", default=None)


class LockstepRun:
    """One sampling run: the plan, the session, and the scatter/gather of each network call."""

    def __init__(self, deployment: Deployment, noise_shape, plan=None):
        batch, _, height, width = noise_shape
        self.deployment = deployment
        self.plan = plan or deployment.measured_plan(batch, height, width)
        self.height, self.width = height, width
        log.info("STADI %s", self.plan.describe())
        self.pool, self.session = deployment.open(self.plan)
        self.slots = CallSlots()
        self.records = [[] for _ in self.plan.bands]
        self._new_plan_state(keep_records=True)
        self.t_start = time.perf_counter()
        self.replanner = Replanner(ReplanPolicy.from_env())  # STADI_REPLAN=off: never moves
        self.step_seen: int | None = None
        self.replans: list[str] = []
        self.control_notes: list[str] = []  # ControlNet chains kept in the server, and why (band_controls.py)

    def network_call(self, x, timesteps, context, control, transformer_options, extra):
        timesteps, cond = call_inputs(self.deployment.adapter, x, timesteps, context, control, transformer_options,
                                      extra, takes_control=True)
        step = step_index(transformer_options)
        slot = self.slots.next(step)
        if step != self.step_seen:  # a new sampler step: the place where bands may move
            self.step_seen = step
            self._maybe_replan(step)
        while True:
            try:
                return self._scatter(x, timesteps, cond, transformer_options, step, slot, control)
            except WorkerLost as lost:  # the server holds the loop's state: this call goes to the survivors
                self._continue_without(lost, step)

    def _scatter(self, x, timesteps, cond, transformer_options, step: int, slot: int, control=None):
        """One network call on the current plan: each rank's rows (or branch units) out, outputs back
        (``control``: the call's ControlNet residuals, which ComfyUI computed here; each rank gets its rows)."""
        plan = self.plan
        on_bands = isinstance(control, BandControls)  # the ControlNets run in the workers (band_controls.py)
        shapes = (tuple(x.shape),) + tuple((k, v.shape) for k, v in sorted(cond.items()))
        if on_bands:  # other networks in the call: other layers' stored context, so a change makes it fresh
            shapes += control.signature()
        fresh = plan.mode == "exact" or step < plan.warmup or self.filled.get(slot) != shapes
        phase = Phase.FRESH if fresh else Phase.REFRESH
        signature = hash((step, slot, shapes)) % (1 << 50)
        if plan.splits_branches and on_bands:
            raise StadiError("STADI: ControlNets that run in the workers reached a CFG-branch arrangement; set "
                             "STADI_CONTROLNET=server or strategy bands")
        if plan.splits_branches:  # each rank gets its units: rows of its branches' entries
            units, places = split_call(plan, x, timesteps, cond, transformer_options.get("cond_or_uncond"), self.sent,
                                       control=control)
            calls = {r: dict(x=None, timesteps=None, cond={}, units=units[r]) for r in units}
        else:
            key = digest(cond)  # once per call: every rank gets the same conditioning
            calls = {b.rank: dict(x=x[:, :, b.row_start:b.row_end].detach().cpu().float().contiguous().numpy(),
                                  timesteps=timesteps, cond=self.sent.lean(b.rank, cond, key), cond_key=key,
                                  control=None if on_bands else band_control(control, x.shape[2], b.row_start,
                                                                             b.row_end))
                     for b in plan.bands}
            if on_bands:
                for b in plan.bands:
                    calls[b.rank].update(self.band_controls.for_rank(b.rank, control, x.shape[2], b.row_start,
                                                                     b.row_end))

        def band_call(rank):
            return lambda job_id, call_id: BandCall(job_id, call_id, step, phase.value, signature=signature, slot=slot,
                                                    **calls[rank])

        t0 = time.perf_counter()
        outs = self._call_all({b.rank: band_call(b.rank) for b in plan.bands})
        if fresh:
            self.filled[slot] = shapes
        for b in plan.bands:
            o = outs[b.rank]
            once, each = message_bytes(calls[b.rank])
            self.records[b.rank].append(dict(step=step, computed=True, phase=phase.value, busy_s=o.busy_s,
                                             rows=b.rows, comm_s=o.comm_s, sent=o.sent, t0=t0,
                                             control_bytes=call_control_bytes(calls[b.rank]),
                                             control_rows_bytes=o.control_rows_bytes, control_once_bytes=once,
                                             control_call_bytes=each))
            if not self.fresh_plan:
                self.recent[b.rank].append(o.busy_s)
        self.fresh_plan = False
        if plan.splits_branches:
            return assemble(x, outs, places)
        out = torch.cat([torch.from_numpy(outs[b.rank].out) for b in plan.bands], dim=2)
        return out.to(device=x.device, dtype=x.dtype)

    def _maybe_replan(self, step: int) -> None:
        """After warmup, move the bands when the measured band times predict a clearly faster step
        (stadi_core/replan.py: medians, a gain threshold, at most every few steps). The new rows take
        effect from this call, in a new session on the same warm workers; every slot's next call is
        fresh, which rebuilds the context (exact mode stays exact)."""
        proposal = self.replanner.propose(self.plan, self.recent, step)
        if proposal is None:
            return
        note = proposal.describe(self.plan, step)
        log.info("STADI %s", note)
        self.session.close()  # ends normally: the pool stays warm
        self._switch_to(proposal.plan, keep_records=True)
        self.replanner.moved(step)
        self.replans.append(note)

    def _switch_to(self, plan, keep_records: bool) -> None:
        """Run the next calls on ``plan``: a session on its workers, and the state a new plan starts without."""
        self.plan = plan
        self.pool, self.session = self.deployment.open(plan)
        self._new_plan_state(keep_records)

    def _new_plan_state(self, keep_records: bool) -> None:
        """What a (new) plan starts without: conditionings sent (each rank gets each once per session),
        stored context (slot -> the input shapes it was made from), the busy times it is judged by (per rank,
        since the rows changed; the first call allocates and is not a measurement)."""
        self.sent = ConditioningOnce()
        self.band_controls = ControlsOnce()
        self.filled: dict[int, tuple] = {}
        self.recent: list[list[float]] = [[] for _ in self.plan.bands]
        self.fresh_plan = True
        if not keep_records:  # other ranks: the report times the survivors' part of the run
            self.records = [[] for _ in self.plan.bands]

    def _continue_without(self, lost: WorkerLost, step: int) -> None:
        """Drop the lost worker's device, re-plan on the survivors and open a session there; the failed
        call is sent again, fresh (the survivors' context starts empty), so exact mode stays exact."""
        self.session.close()  # the failed session: its pool is stopped, this releases it
        survivors = self.deployment.drop(lost, self.plan, self.width, step, resumed=True)
        log.info("STADI %s", survivors.describe())
        self._switch_to(survivors, keep_records=False)

    def _call_all(self, calls: dict) -> dict:
        """The session's lockstep call, watching ComfyUI's Interrupt while it waits: a stuck worker
        cannot hold the prompt (the session kills the pool 1.2 s after the cancel), and a stop reaches
        the user as an interrupted prompt, not an error."""
        import comfy.model_management as mm

        try:
            return self.session.call_all(calls, should_cancel=mm.processing_interrupted)
        except JobCancelledError as exc:
            mm.throw_exception_if_processing_interrupted()  # clears the flag, as ComfyUI's own check does
            raise mm.InterruptProcessingException() from exc

    def close(self) -> None:
        self.session.close()

    def report(self, loop: str = "one sampler loop in the server") -> RunReport:
        wall = time.perf_counter() - self.t_start
        timings = [step_timings(r, self.t_start + wall) for r in self.records]
        calls = self.records[0]
        per_step = max((sum(1 for r in calls if r["step"] == s) for s in {r["step"] for r in calls}), default=0)
        refresh = sum(1 for r in calls if r["phase"] != Phase.FRESH.value)
        note = (f"lockstep: {loop}; {len(calls)} network calls split into bands, up to "
                f"{per_step} per step, {refresh} with displaced context")
        log.info("STADI %s", note)
        controls = control_note(self.records) + band_note(self.records) + self.control_notes
        for line in controls:
            log.info("STADI %s", line)
        notes = [note] + controls + self.replans
        return self.deployment.report(self.plan, self.pool, self.session, timings, wall, notes=notes)


class LockstepPatch:
    """The settings of one STADI Parallel Model (or lockstep STADI Sampler) and its two wrappers."""

    def __init__(self, cluster: StadiCluster | None, mode: str, warmup: int, strategy: str = "auto",
                 compile: str = "off", context: str = "full"):
        self.cluster, self.mode, self.warmup, self.strategy, self.compile = cluster, mode, warmup, strategy, compile
        self.context = context
        self.last_report: RunReport | None = None
        self.last_plan = None

    def apply(self, model):
        """A clone of ``model`` whose sampling runs in lockstep bands."""
        from . import compatibility

        compatibility.refuse_second_stadi(model)
        import comfy.patcher_extension as ext

        compatibility.check_model(model, lockstep=True)
        if not all(hasattr(ext.WrappersMP, name) for name in ("OUTER_SAMPLE", "PREPARE_SAMPLING")):
            raise StadiError("STADI: this ComfyUI has no OUTER_SAMPLE/PREPARE_SAMPLING model wrappers, which the "
                             "band-parallel sampler hooks into; update ComfyUI")
        clone = model.clone()
        clone.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, self.outer_sample)
        clone.add_wrapper_with_key(ext.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY, self.prepare_sampling)
        return clone

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        patcher = guider.model_patcher
        from . import compatibility

        compatibility.check_model(patcher, lockstep=True)  # nodes applied after this one are checked too
        compatibility.check_guider_conds(guider, patcher, lockstep=True)
        steps = max(1, int(sigmas.shape[-1]) - 1)
        deployment = Deployment(patcher, cluster=self.cluster, mode=self.mode, warmup=min(self.warmup, steps),
                                strides="off", sampler_name="lockstep", steps=steps, strategy=self.strategy, compile=self.compile,
                                context=self.context, branches=compatibility.guider_branches(guider))
        run = LockstepRun(deployment, tuple(noise.shape))
        token = _RUN.set(run)
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:  # also on Interrupt: between network calls the workers are idle; during one they stopped or died
            _RUN.reset(token)
            run.close()
        self.last_plan = run.plan
        self.last_report = run.report()
        deployment.remember(measured_capabilities(self.last_report), run.height, run.width)
        return out

    def prepare_sampling(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        """Load nothing in the server; the loop runs on a shell whose network is the band scatter."""
        run = _RUN.get()
        if run is None:
            raise StadiError("STADI Parallel Model: sampling started outside a STADI run (another node re-entered "
                             "the sampler); use KSampler for this workflow")
        shell = private_shell(model, diffusion_model=BandNetwork(model.model.diffusion_model, run.network_call,
                                                                 state=lambda: patched_state_dict(model)))
        shell.current_patcher = model  # pre_run() sets it on the shared model, the loop reads it here
        if controls_in(*conds.values()):  # those that can run in the workers do (band_controls.py)
            if run.plan.splits_branches:
                run.control_notes = ["ControlNet: computed in the server (step 1): a CFG-branch arrangement sends "
                                     "each unit its branches' rows of the residuals"]
            else:
                conds, run.control_notes = worker_side(conds, model, run.deployment.adapter)
        return shell, conds, load_controls(model, conds)  # the rest (step 1) run here, in the server

