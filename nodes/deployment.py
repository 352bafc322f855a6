"""What a STADI run needs before its first network call: the workers' model spec, the plan, a session.

Shared by both execution shapes (lockstep.py: one sampler loop, every call scattered to the ranks;
rank_loops.py: one loop per rank, for strides). Built from the final ModelPatcher, so LoRAs and
ModelSampling nodes applied anywhere upstream reach the workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import torch

from stadi_core.cluster import ClusterSpec
from stadi_core.errors import StadiError
from stadi_core.models.comfy_common import mirrored_args, model_class_path
from stadi_core.models.spec import FAMILIES, ModelSpec
from stadi_core.parallel import Phase
from stadi_core.planner import Plan, make_plan
from stadi_core.report import RunReport, loss_note
from stadi_core.runtime.messages import BandCall, SessionStart
from stadi_core.runtime.registry import get_pool

from . import comfy_api, compatibility, link_pricing
from .types import StadiCluster
from .weights import shared_network

log = logging.getLogger("stadi")

# rows/s measured per (model key, device, latent H, W): plans of later runs start from these
CAPABILITIES: dict[tuple, float] = {}


def default_cluster() -> StadiCluster:
    n = torch.cuda.device_count()
    spec = ClusterSpec.parse(f"cuda*{n}" if n else "cpu*2")
    return StadiCluster(spec, notes=[] if n else ["no GPU found: running on 2 CPU workers"])


def compile_notes(session) -> list[str]:
    """The report's notes on compiled band calls: what ran compiled, what was refused or failed (then eager)."""
    ready = getattr(session, "ready", {}) or {}
    failed = getattr(session, "notes", {}) or {}
    modes = {r: m.info.get("compile", "off") for r, m in ready.items()}
    notes = []
    for mode in sorted(set(modes.values()) - {"off"}):
        ranks = sorted(r for r, m in modes.items() if m == mode and r not in failed)
        if ranks:
            what = "CUDA graphs" if mode == "graphs" else mode
            notes.append(f"band network compiled ({what}) on ranks {ranks}: displaced and measured calls "
                         "(exact and warmup calls run eagerly)")
    refused = {r: m.info["compile_note"] for r, m in ready.items() if m.info.get("compile_note")}
    for per_rank in (refused, {r: n for r, ns in failed.items() for n in ns}):
        by_note: dict[str, list] = {}
        for r, note in sorted(per_rank.items()):
            by_note.setdefault(note, []).append(r)
        notes.extend(f"ranks {ranks}: {note}" if len(ranks) > 1 else f"rank {ranks[0]}: {note}"
                     for note, ranks in by_note.items())
    return notes


def dtype_name(dtype) -> str | None:
    return str(dtype).split(".")[-1] if dtype is not None else None


class Deployment:
    """One model on one cluster: the spec the workers rebuild it from, plans, sessions."""

    def __init__(self, model, *, cluster: StadiCluster | None, mode: str, warmup: int, strides: str,
                 sampler_name: str, steps: int, strategy: str = "auto", branches: bool = False,
                 compile: str = "off", context: str = "full"):
        import comfy.cli_args

        if mode == "exact" and context not in ("full", "auto"):
            raise StadiError(f"STADI: context '{context}' only applies to mode 'displaced' (exact mode always exchanges "
                             "every band's full context): set mode to displaced or context to full")
        self.context = None if mode == "exact" else context  # how displaced steps exchange (parallel/options.py)

        family = compatibility.check_model(model, lockstep=True)  # strided runs check the rest (coordinator)
        self.model = model
        self.cluster = cluster or default_cluster()
        self.losses: list[str] = []  # workers lost during this run, for the report (drop())
        self.mode, self.warmup, self.strides = mode, warmup, strides
        self.sampler_name, self.steps = sampler_name, steps
        self.strategy = strategy
        self.compile = compile  # off | auto | graphs | torch.compile (parallel/compiled.py)
        self.branches = branches  # the run evaluates a separate uncond branch (CFG > 1)
        self.last_choice = None
        self.batch = 1  # latent batch of the run being planned (measured_plan): the bytes a call sends
        base = model.model
        network = base.diffusion_model
        self.adapter = FAMILIES[family]
        self.align = self.adapter.alignment(network)
        self.any_size = bool(getattr(self.adapter, "ANY_SIZE", False))
        self.channels = self.adapter.latent_channels(network)
        model_config = base.model_config
        unet_config = dict(model_config.unet_config)
        unet_config.pop("dtype", None)
        mirrored = mirrored_args(comfy.cli_args.args)
        # weights as ComfyUI stores them (fp8 included), computed in its manual-cast dtype where it has one
        self.spec = ModelSpec(family=family, config=unet_config, dtype=dtype_name(base.get_dtype()),
                              extra={"comfy_args": mirrored, **shared_network(model),
                                     "model_class": model_class_path(network),
                                     "compute_dtype": dtype_name(comfy_api.compute_dtype(model)),
                                     "scaled_fp8": dtype_name(comfy_api.scaled_fp8_dtype(model_config)),
                                     "fp8_optimizations": bool(model_config.optimizations.get("fp8", False))})

    def plan(self, height: int, width: int, speeds: list[float] | None = None) -> Plan:
        spec = self.cluster.spec
        spec.validate_available()
        active = spec.active()
        measured = False  # speeds in rows/s, measured on this model at this size: links can be priced
        if speeds is None:
            cached = [CAPABILITIES.get((self.spec.key(), d.name, height, width)) for d in active]
            if not all(cached):  # measured rows/s and default relative speeds do not mix
                cached = [None] * len(active)
            measured = all(cached) and all(d.relative_speed is None for d in active)
            speeds = [d.relative_speed or c or d.planning_speed() for d, c in zip(active, cached)]
        align = self.align
        if width % align and not self.any_size:
            raise StadiError(f"latent width {width} is not a multiple of {align} for this model: use an image width "
                             f"that is a multiple of {8 * align} px")
        if height % align and not self.any_size:
            raise StadiError(f"latent height {height} is not a multiple of {align} for this model: use an image "
                             f"height that is a multiple of {8 * align} px")
        names = [d.name for d in active]
        links, note = self._links(names, measured, height, width)
        self.last_choice = link_pricing.plan_choice(
            height, names, speeds, links=links, strategy=self.strategy, branches=self.branches, align=align,
            steps=self.steps, warmup=self.warmup, mode=self.mode, strides=self.strides, sampler=self.sampler_name,
            ragged=self.any_size, context=self.context)
        plan = self.last_choice.plan
        if links is not None:
            note = link_pricing.priced_note(self.last_choice, names, speeds, links[1])
        return replace(plan, notes=plan.notes + (note,)) if note else plan

    def _links(self, names: list[str], measured: bool, height: int, width: int) -> tuple[tuple | None, str | None]:
        """(lobby, bytes per call) to price the links to other machines with, or None and why not."""
        if len(names) < 2 or not link_pricing.joined(names):
            return None, None
        from .remote_workers import server_lobby

        lobby = server_lobby()
        if lobby is None:
            return None, None
        manual = any(d.relative_speed is not None for d in self.cluster.spec.active())
        if not manual and not measured:
            return None, link_pricing.unpriced_note(names, "the device speeds are not measured on this model yet")
        exchange = link_pricing.counted_exchange(self.spec, height=height, width=width, batch=self.batch,
                                                 branches=self.branches, align=self.align)
        if manual:  # what crosses the links is still worth knowing
            return None, link_pricing.unpriced_note(names, "manual speeds cannot be set against link seconds (leave "
                                                           "'speeds' empty to have them measured)", exchange)
        return (lobby, exchange), None

    def needs_measuring(self) -> bool:
        """Measure the devices' speeds on the model before planning: the cluster asks for it, or devices
        joined from other machines (their links are priced against rows/s; manual speeds opt out)."""
        active = self.cluster.spec.active()
        joined = link_pricing.joined([d.name for d in active])
        return self.cluster.measure or bool(joined) and all(d.relative_speed is None for d in active)

    @staticmethod
    def forget_measurements() -> None:
        """Plans start from the cluster's speeds again, not from earlier runs' measurements (benchmarks)."""
        CAPABILITIES.clear()

    def drop(self, lost, old_plan: Plan, width: int, step: int | None, *, resumed: bool) -> Plan:
        """Take a lost worker's device out of this run's cluster and re-plan on the survivors.

        Re-raises ``lost`` (a WorkerLost) when no device survives; returns the survivors' plan and
        notes what moved in the report (``loss_note``).
        """
        try:
            spec = self.cluster.spec.without(lost.device)
        except StadiError:
            raise lost from None
        self.cluster = replace(self.cluster, spec=spec)
        plan = self.plan(old_plan.height, width)
        note = loss_note(lost.device, lost.reason, step, old_plan, plan, resumed=resumed)
        self.losses.append(note)
        log.warning("STADI: %s", note)
        return plan

    def measured_plan(self, batch: int, height: int, width: int) -> Plan:
        """The plan, from this model's measured device speeds when the cluster asks for them (or devices joined
        from other machines: needs_measuring)."""
        self.batch = batch
        plan = self.plan(height, width)
        names = [d.name for d in self.cluster.spec.active()]
        if self.needs_measuring() and len(names) > 1 and not all(
                (self.spec.key(), d, height, width) in CAPABILITIES for d in names):
            # every device, on equal bands: the arrangement is chosen from all of their speeds
            probe = make_plan(height, [1.0] * len(names), devices=names, align=self.align, steps=self.steps,
                              warmup=self.warmup, mode=self.mode, strides="off", ragged=self.any_size)
            for band, s in zip(probe.bands, self.measure(probe, batch, width)):
                CAPABILITIES[(self.spec.key(), band.device, height, width)] = s
            plan = self.plan(height, width)
        return plan

    def remember(self, capabilities: dict, height: int, width: int) -> None:
        for device, cap in capabilities.items():
            CAPABILITIES[(self.spec.key(), device, height, width)] = cap

    def _pool(self, plan: Plan):
        import comfy.model_base

        # comfy is a namespace package: locate the checkout through one of its modules
        comfy_root = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_base.__file__)))
        devices = [b.device for b in plan.bands]
        joined = {}
        if any("/" in d for d in devices):  # devices that joined from other machines (nodes/remote_workers.py)
            from .remote_workers import server_lobby

            joined = {"lobby": server_lobby()}
        return get_pool(devices, self.cluster.spec.resolved_backend(), extra_sys_path=[comfy_root], **joined)

    def slowdowns(self, plan: Plan) -> list[float]:
        by_name = {d.name: d for d in self.cluster.spec.active()}
        return [by_name[b.device].slowdown for b in plan.bands]

    def open(self, plan: Plan, compile: str | None = None):
        """(pool, session) with the model loaded on every rank of the plan."""
        slowdowns = self.slowdowns(plan)
        by_name = {d.name: d for d in self.cluster.spec.active()}
        compile = self.compile if compile is None else compile
        pool = self._pool(plan)

        def per_rank(start, rank):
            start.slowdown = slowdowns[rank]
            start.slowdown_from = by_name[plan.bands[rank].device].slowdown_from
            return start

        session = pool.open_session(lambda job_id: SessionStart(job_id, self.spec.to_dict(), plan.to_dict(),
                                                                compile=compile),
                                    per_rank=per_rank)
        pool.loaded_model_key = f"{self.spec.family} (weights {self.spec.extra.get('weights_key')})"  # the profile shows it
        return pool, session

    def report(self, plan: Plan, pool, session, timings: list, wall: float, notes: list[str] = ()) -> RunReport:
        """The run's report: per-rank timings, the workers' checksums, whether they loaded weights."""
        report = RunReport.from_results(plan, timings, wall, slowdowns=self.slowdowns(plan), pool_pids=pool.pids(),
                                        checksums={r: m.info.get("weights_checksum") for r, m in session.ready.items()})
        report.notes.extend(notes)
        loaded = sorted(r for r, m in session.ready.items() if m.info.get("loaded_weights"))
        report.notes.append(f"weights loaded by ranks {loaded}" if loaded else "weights already loaded (warm workers)")
        report.notes.extend(self.cluster.notes)
        if any("/" in d for d in plan.devices):  # devices that joined from other machines: their links
            from .remote_workers import server_lobby

            lobby = server_lobby()
            report.notes.extend(lobby.link_notes(plan.devices) if lobby is not None else [])
        report.notes.extend(self.losses)
        report.notes.extend(compile_notes(session))
        options = [f"--{k.replace('_', '-')}" + (f" {' '.join(v)}" if isinstance(v, list) else "")
                   for k, v in self.spec.extra.get("comfy_args", {}).items() if v]
        if options:
            report.notes.append("ComfyUI options the workers run with, as the server: " + ", ".join(options))
        return report

    def measure(self, plan: Plan, batch: int, width: int) -> list[float]:
        """Rows/s of each device on its band alone (no exchange), one device at a time."""
        n = 2 * batch
        # stand-in conditioning shaped for this network (values do not matter for timing)
        probe = self.adapter.make_conditioning(self.model.model.diffusion_model, n, seed=0)["cond"]
        cond = {k: v.numpy().astype(np.float32) for k, v in probe.items()}
        # torch.compile would time its compile (the second call of a shape): measure eagerly then
        pool, session = self.open(plan, compile="off" if self.compile == "torch.compile" else None)
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


def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def step_index(transformer_options: dict) -> int:
    """The sampler step a network call belongs to, from the sigma schedule ComfyUI passes along."""
    from stadi_core.errors import UnsupportedError

    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None:
        raise UnsupportedError("STADI: the sampler did not provide its sigma schedule")
    s = float(sigmas.max())
    return max(0, int((sample_sigmas >= s * (1 - 1e-6)).sum()) - 1)


def call_inputs(adapter, x, timesteps, context, control, transformer_options: dict, extra: dict,
                takes_control: bool = False):
    """Check one network call's inputs and return (timesteps, conditioning) as the workers take them.

    ``takes_control``: the caller sends the call's ControlNet residuals on (lockstep); per-rank loops do not,
    and both cases are refused before the run (control_residuals.check_controls): these are the last guards."""
    from stadi_core.errors import UnsupportedError

    if control is not None and not takes_control:
        raise UnsupportedError("STADI Sampler with strides: ControlNet residuals reached a per-rank sampler loop, "
                               "which holds only its band: set strides off")
    if control is not None and not getattr(adapter, "TAKES_CONTROL", False):
        raise UnsupportedError(f"STADI: ControlNet residuals reached a {adapter.FAMILY} model, which takes none in "
                               "bands; use KSampler")
    unknown = sorted(k for k, v in extra.items() if v is not None and k not in adapter.COND_KEYS)
    if unknown:
        raise UnsupportedError(f"STADI: model inputs {unknown} (e.g. reference latents of an edit model, a text "
                               "attention mask) are not supported in bands; use KSampler")
    compatibility.check_call_options(transformer_options)
    cond = {"context": as_numpy(context)}
    cond.update({k: as_numpy(extra[k]) for k in adapter.COND_KEYS if extra.get(k) is not None})
    return as_numpy(timesteps.float()), cond


class CallSlots:
    """Numbers the network calls of each sampler step: slot n of a step only ever reuses slot n.

    ComfyUI sends cond and uncond apart when they cannot be batched (prompts of different
    lengths), multi-evaluation samplers call several times per step: each such call keeps its
    own context and its own reused output.
    """

    def __init__(self):
        self.step = None
        self.count = 0

    def next(self, step: int) -> int:
        if step != self.step:
            self.step, self.count = step, 0
        slot = self.count
        self.count += 1
        return slot


def step_timings(records: list[dict], t_end: float) -> list[dict]:
    """Per-call records -> per-call timings in the engine's StepTiming layout."""
    out = []
    for i, r in enumerate(records):
        nxt = records[i + 1]["t0"] if i + 1 < len(records) else t_end
        out.append(dict(step=r["step"], computed=r["computed"], phase=r["phase"], busy_s=r["busy_s"],
                        comm_s=r["comm_s"], wall_s=nxt - r["t0"], sent=r.get("sent", {}),
                        **({"rows": r["rows"]} if "rows" in r else {})))
    return out
