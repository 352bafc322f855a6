"""The Python entry points: generate an image latent on a cluster, or on one process."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .arrange import Choice, choose_plan, host_shared_speeds
from .cluster import ClusterSpec
from .errors import PlanError, WorkerError
from .models.spec import ModelSpec, batched_conditioning, build_model, make_conditioning
from .parallel.links import LINK_ENV, EmulatedLink
from .parallel.options import ContextOptions
from .planner import Plan
from .replan import ReplanPolicy
from .report import RunReport
from .resumable_run import ResumableRun
from .runtime.messages import GenerateJob, MeasureJob
from .runtime.registry import get_pool
from .sampling.band_loop import NON_FINITE_HINT, LoopSchedule, count_non_finite, run_band
from .sampling.noise import FullLatentNoise
from .sampling.samplers import make_sampler

log = logging.getLogger("stadi")



@dataclass
class GenerateResult:
    latent: torch.Tensor  # (B, C, H, W), the stitched bands
    report: RunReport


def _as_cluster(cluster: ClusterSpec | str | None) -> ClusterSpec:
    if cluster is None:
        return ClusterSpec.parse("cuda*%d" % torch.cuda.device_count()) if torch.cuda.device_count() else ClusterSpec.cpu(2)
    if isinstance(cluster, str):
        return ClusterSpec.parse(cluster)
    return cluster


def _model_info(spec: ModelSpec):
    """Alignment and conditioning need the model's config, not its weights: build it on the
    meta device (instant even for SDXL) unless it comes from a folder."""
    model = build_model(spec, "cpu" if spec.path else "meta")
    return model, spec.adapter.alignment(model)


def plan_for(cluster: ClusterSpec, *, height: int, steps: int, sampler: str, mode: str, warmup: int, strides,
             align: int, strategy: str = "bands", cfg: float = 5.0, context=None, links=None) -> Plan:
    """The plan for the cluster's active devices at their planning speeds (arrange.choose_plan)."""
    return choose_for(cluster, height=height, steps=steps, sampler=sampler, mode=mode, warmup=warmup,
                      strides=strides, align=align, strategy=strategy, cfg=cfg, context=context, links=links).plan


def choose_for(cluster: ClusterSpec, *, height: int, steps: int, sampler: str, mode: str, warmup: int, strides,
               align: int, strategy: str, cfg: float, ragged: bool = False, context=None, links=None) -> Choice:
    """Every arrangement ``strategy`` allows, priced for this cluster; CPU workers share the host's cores.

    ``links``: (lobby, ExchangeCost) when workers joined from other machines: the links measured at join
    (per pair of devices; runtime/lobby.py) and the bytes a call sends are priced against the devices'
    speeds, which must then be measured rows/s (capabilities), else only compute is priced."""
    cluster.validate_available()
    active = cluster.active()
    names = [d.name for d in active]
    together, alone = host_shared_speeds(names, [d.planning_speed() for d in active], cpu_count=os.cpu_count() or 1)
    priced = {}
    if links is not None and all(d.capability is not None and d.relative_speed is None for d in active):
        lobby, exchange = links
        priced = {"link": lobby.link_model(names), "exchange": exchange}
    return choose_plan(height, together, devices=names, alone_speeds=alone, strategy=strategy, branches=cfg != 1.0,
                       align=align, steps=steps, warmup=warmup, mode=mode, strides=strides, sampler=sampler,
                       ragged=ragged, context=context, **priced)


def generate(
    model: ModelSpec | None = None,
    cluster: ClusterSpec | str | None = None,
    *,
    height: int = 32,
    width: int = 32,
    batch: int = 1,
    steps: int = 8,
    sampler: str = "euler",
    scheduler: str | None = None,  # None: the model's usual one (karras for eps models, simple for flow)
    cfg: float = 5.0,
    seed: int = 0,
    mode: str = "displaced",
    warmup: int = 2,
    strides: str | Sequence[int] = "auto",
    strategy: str = "bands",
    align: int | None = None,
    stall_timeout_s: float = 60.0,
    graphs: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    threads_per_worker: int | None = None,
    hybrid_window: str | None = None,
    prompt: str | None = None,
    context: "str | ContextOptions | None" = None,
    emulate_link: str | None = None,
    listen: str | None = None,
    token: str | None = None,
    remote_workers: int = 0,
    join_timeout_s: float = 120.0,
) -> GenerateResult:
    """Denoise a ``batch x channels x height x width`` latent with one band per active device.

    ``height``/``width`` are latent rows/columns (image pixels / 8). Bands are sized by each
    device's planning speed (measured capability, manual override, or emulated slowdown).
    ``strategy``: bands | cfg_split | cfg_split+bands (CFG branches on different devices) |
    auto (the arrangement the cost model predicts fastest, one device included).
    ``threads_per_worker``: CPU threads of each worker (default: the host's cores shared out).
    ``hybrid_window``: a preset of sampling.hybrid_window (sdxl, sd3, sd15): Hybridiff's adaptive
    window, in which every second step reuses the last network output (branch splits only).
    ``context``: how displaced steps exchange (parallel/options.py): 'full' (default), 'partial:0.3',
    'fp8', 'delta', 'partial:0.3+delta', ... a ContextOptions, or 'auto' (the cost model's pick;
    with no link model, as for one host, that is full).
    ``emulate_link``: 'GBPS,LATENCY_US' — every context transfer also takes as long as on such a
    link (parallel/links.py; benchmarks and tests of slow interconnects on one host).
    ``listen``: 'ADDR:PORT' where workers on other machines join (``python -m stadi_core worker --join
    ADDR:PORT --token T``; runtime/lobby.py), with ``token`` (required unless ADDR is loopback). The
    cluster may name joined devices (``10.0.0.2/cuda:0``); ``remote_workers=N`` waits up to
    ``join_timeout_s`` for N of them and adds them after the cluster's own devices. The links measured at
    join are in the report's notes.
    """
    spec = model or ModelSpec()
    cluster = _as_cluster(cluster)
    lobby = links = None
    if listen:
        from .runtime.lobby import open_lobby

        lobby = open_lobby(listen, token)
        cluster = with_joined(cluster, lobby.wait_for(remote_workers, join_timeout_s) if remote_workers else [])
    elif remote_workers or any(d.host for d in cluster.active()):
        raise PlanError("workers on other machines join through a listen address: pass listen='ADDR:PORT' and the "
                        "token (CLI: --listen, --token)")
    make_sampler(sampler)  # unknown samplers fail before any process starts
    ref_model, model_align = _model_info(spec)
    align = align or model_align
    if width % align:
        raise PlanError(f"latent width {width} is not a multiple of {align}: "
                        f"use an image width that is a multiple of {8 * align} px")
    sigmas = spec.adapter.model_sampling(ref_model).sigmas(scheduler, steps)
    conditioning = make_conditioning(spec, ref_model, batch, seed, prompt)
    shape = (batch, spec.adapter.latent_channels(ref_model), height, width)
    del ref_model
    cond_np = {part: {k: v.numpy() for k, v in d.items()} for part, d in conditioning.items()}
    threads = {} if threads_per_worker is None else {"threads_per_worker": threads_per_worker}
    if emulate_link:
        EmulatedLink.parse(emulate_link)  # a malformed value fails here, not in every worker
    link_notes: list[str] = []
    if lobby is not None and any(d.host for d in cluster.active()) and len(cluster.active()) > 1:
        cluster, links, link_notes = _price_links(spec, cluster, lobby, height=height, width=width, batch=batch,
                                                  cfg=cfg, align=align, **threads)
    work = StandaloneInputs(
        spec=spec, sigmas=sigmas, shape=shape, conditioning=cond_np, sampler=sampler, cfg=cfg, seed=seed,
        graphs=graphs, hybrid_window=hybrid_window, by_name={d.name: d for d in cluster.devices},
        plan_kw=dict(height=height, steps=steps, sampler=sampler, mode=mode, warmup=warmup, strides=strides,
                     align=align, strategy=strategy, cfg=cfg, context=context, links=links),
        pool_kw=threads, emulate_link=emulate_link, lobby=lobby)
    first_plan = work.plan(cluster)
    _window_config(hybrid_window, first_plan, sampler)  # a run that cannot take the window fails here
    outcome = ResumableRun(cluster, first_plan, work, stall_timeout_s=stall_timeout_s, on_step=on_step,
                           should_cancel=should_cancel, resumable=hybrid_window is None,
                           policy=ReplanPolicy.from_env()).run()
    plan, results, pool = outcome.plan, outcome.results, outcome.pool
    slowdowns = [work.by_name[b.device].slowdown for b in plan.bands]
    wall = outcome.wall_s
    if plan.splits_branches:  # every rank stepped the whole latent; rank 0's is the result
        bands = [torch.from_numpy(results[0].band)]
    else:
        bands = [torch.from_numpy(results[r].band) for r in range(plan.world_size)]
    check_finite(bands, plan)
    checksums = {r: results[r].info.get("weights_checksum") for r in results}
    report = RunReport.from_results(plan, outcome.timings, wall,
                                    slowdowns=slowdowns, pool_pids=pool.pids(), checksums=checksums)
    report.notes.extend(f"rank {r}: {results[r].info['note']}" for r in results if results[r].info.get("note"))
    summary = results[0].info.get("hybrid_window")
    if summary is not None:
        report.notes.append(window_note(summary, steps))
        report.hybrid_window = summary
    if plan.world_size > 1:
        report.notes.append(f"exchange: {results[0].info.get('transport', 'dist')} "
                            f"({cluster.resolved_backend()} process group)")
    report.notes.extend(outcome.notes)
    if lobby is not None:
        report.notes.extend(lobby.link_notes([b.device for b in plan.bands]) + link_notes)
    return GenerateResult(torch.cat(bands, dim=2), report)


@dataclass
class StandaloneInputs:
    """What every segment of one standalone run shares (resumable_run.py): the model and sampling inputs,
    how plans are made and how the devices' workers are reached."""

    spec: ModelSpec
    sigmas: list
    shape: tuple
    conditioning: dict  # {"cond"|"uncond": {name: ndarray}}
    sampler: str
    cfg: float
    seed: int
    graphs: bool
    hybrid_window: str | None
    by_name: dict  # device name -> DeviceSpec (every device of the cluster, joined ones included)
    plan_kw: dict  # plan_for's keywords
    pool_kw: dict  # get_pool's keywords (threads per worker)
    emulate_link: str | None = None
    lobby: object = None  # runtime/lobby.py, when devices joined from other machines

    def plan(self, cluster: ClusterSpec) -> Plan:
        return plan_for(cluster, **self.plan_kw)

    def pool(self, cluster: ClusterSpec, plan: Plan):
        devices = [b.device for b in plan.bands]
        env = _worker_env(self.by_name, devices)
        if self.emulate_link:
            env = [dict(e, **{LINK_ENV: self.emulate_link}) for e in env]
        joined = {"lobby": self.lobby} if any(self.by_name[d].host for d in devices) else {}  # local pools: own keys
        return get_pool(devices, cluster.resolved_backend(), worker_env=env, **self.pool_kw, **joined)

    def job(self, job_id: int, rank: int, plan: Plan) -> GenerateJob:
        device = self.by_name[plan.bands[rank].device]
        return GenerateJob(job_id=job_id, model=self.spec.to_dict(), plan=plan.to_dict(), sampler=self.sampler,
                           sigmas=self.sigmas, cfg=self.cfg, seed=self.seed, latent_shape=self.shape,
                           conditioning=self.conditioning, graphs=self.graphs,
                           hybrid_window=_window_config(self.hybrid_window, plan, self.sampler),
                           slowdown=device.slowdown, slowdown_from=device.slowdown_from)


_MEASURED: dict[tuple, float] = {}  # (model key, device, rows, width, batch) -> rows/s, measured for link pricing
_EXCHANGES: dict[tuple, object] = {}  # (model key, height, width, batch, cfg, align) -> ExchangeCost


def _price_links(spec: ModelSpec, cluster: ClusterSpec, lobby, *, height: int, width: int, batch: int, cfg: float,
                 align: int, **pool_kw) -> tuple[ClusterSpec, tuple, list[str]]:
    """What the planner needs to price the links to other machines: every device's speed in rows/s
    (measured now on the model, unless known), the bytes a call sends (exchange_probe.py), the lobby's links."""
    from .exchange_probe import measure_exchange

    notes = []
    active = cluster.active()
    if any(d.relative_speed is not None for d in active):
        return cluster, None, ["links not priced: manual relative speeds cannot be set against link seconds; "
                               "leave the speeds to be measured"]
    rows = max(align, (height // len(active)) // align * align)
    key = lambda d: (spec.key(), d.name, rows, width, batch)  # noqa: E731
    known = {d.name: _MEASURED[key(d)] for d in active if d.capability is None and key(d) in _MEASURED}
    cluster = cluster.with_capabilities(known) if known else cluster
    if any(d.capability is None for d in cluster.active()):
        cluster = profile(spec, cluster, rows=rows, width=width, batch=batch, lobby=lobby, **pool_kw)
        _MEASURED.update({key(d): d.capability for d in cluster.active()})
    notes.append(f"device speeds (rows/s of one call on a {rows}-row band, measured on the model) price the links: "
                 + ", ".join(f"{d.name} {d.capability:.4g}" for d in cluster.active()))
    ex_key = (spec.key(), height, width, batch, cfg, align)
    if ex_key not in _EXCHANGES:
        _EXCHANGES[ex_key] = measure_exchange(spec, height=height, width=width, batch=batch, cfg=cfg, align=align)
    exchange = _EXCHANGES[ex_key]
    notes.append(f"context per synchronous call, per rank: {exchange.bytes_fixed / 1e6:.3g} MB + "
                 f"{exchange.bytes_per_row / 1e6:.3g} MB/row in {exchange.messages} all-gathers (counted on the model)")
    return cluster, (lobby, exchange), notes


def with_joined(cluster: ClusterSpec, names: Sequence[str]) -> ClusterSpec:
    """``cluster`` plus the joined devices ``names`` it does not list yet (after its own, in join order)."""
    from dataclasses import replace

    from .cluster import DeviceSpec

    have = {d.name for d in cluster.devices}
    extra = tuple(DeviceSpec(n) for n in names if n not in have)
    return replace(cluster, devices=cluster.devices + extra) if extra else cluster


def _window_config(preset: str | None, plan: Plan, sampler: str) -> dict | None:
    """The WindowConfig fields a hybrid window needs, after checking the run can take one."""
    if preset is None:
        return None
    from dataclasses import asdict

    from .planner import ONE_EVAL_SAMPLERS
    from .sampling.hybrid_window import PRESETS

    if preset not in PRESETS:
        raise PlanError(f"unknown hybrid_window preset {preset!r}: use one of {', '.join(sorted(PRESETS))}")
    if not plan.splits_branches:
        raise PlanError("hybrid_window needs a CFG-branch split (strategy cfg_split or cfg_split+bands): it reads "
                        "both branches' whole outputs, which only a branch split gives every rank")
    if sampler not in ONE_EVAL_SAMPLERS:
        raise PlanError(f"hybrid_window reuses network outputs, which sampler {sampler!r} cannot (it evaluates the "
                        "network more than once per step): pick euler, dpmpp_2m, ...")
    return asdict(PRESETS[preset])


def window_note(summary: dict, steps: int) -> str:
    if summary.get("opened_at") is None:
        return f"hybrid window: did not open within {steps} steps (no evaluation saved)"
    win = summary["steps"]
    saved = sum(1 for i, s in enumerate(win) if i % 2 == 1)
    return (f"hybrid window: opened at step {summary['opened_at']} ({summary['reason']}), steps {win[0]}-{win[-1]}; "
            f"{saved} of {steps} network evaluations saved")


def check_finite(bands: Sequence[torch.Tensor], plan: Plan) -> None:
    """Refuse to hand back a latent with NaN/inf: a corrupted result must not pass silently."""
    if plan.splits_branches:
        bad = count_non_finite(bands[0])
        if bad:
            raise WorkerError(f"the run returned {bad} non-finite values: the result was discarded. {NON_FINITE_HINT}")
        return
    for band, b in zip(bands, plan.bands):
        bad = count_non_finite(band)
        if bad:
            raise WorkerError(f"rank {b.rank} ({b.device}) returned {bad} non-finite values in rows [{b.row_start},"
                              f"{b.row_start + b.rows}): the result was discarded. {NON_FINITE_HINT}")


def _worker_env(by_name: dict, devices: list[str]) -> list[dict]:
    """Per-worker environment: CUDA MPS thread percentages for emulated smaller GPUs."""
    env = []
    for name in devices:
        pct = by_name[name].mps_percent
        env.append({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct)} if pct else {})
    return env


def _with_slowdown(job, slowdown: float):
    job.slowdown = slowdown
    return job


def reference_generate(
    model: ModelSpec | None = None,
    *,
    height: int = 32,
    width: int = 32,
    batch: int = 1,
    steps: int = 8,
    sampler: str = "euler",
    scheduler: str | None = None,
    cfg: float = 5.0,
    seed: int = 0,
    prompt: str | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """The single-process result with the unmodified model: the oracle exact mode must match.

    ``rows``: denoise only those latent rows, as an image of their own (the same noise rows as the
    whole image's) — a band generated with no context from the others, the yardstick seams are
    measured against."""
    spec = model or ModelSpec()
    net_model = build_model(spec, "cpu")
    conditioning = make_conditioning(spec, net_model, batch, seed, prompt)
    cond = batched_conditioning(conditioning, cfg, "cpu", torch.float32)
    forward = spec.adapter.forward

    def network(x_in, t, phase):
        ts = torch.full((x_in.shape[0],), t, dtype=torch.float32)
        return forward(net_model, x_in, ts, cond)

    sampling = spec.adapter.model_sampling(net_model)
    with torch.inference_mode():
        x, _ = run_band(network, sigmas=sampling.sigmas(scheduler, steps), sampler=sampler, cfg=cfg,
                        noise=FullLatentNoise(seed, (batch, spec.adapter.latent_channels(net_model), height, width)),
                        rows=rows or slice(None), schedule=LoopSchedule(steps=steps), model_sampling=sampling)
    return x


def profile(model: ModelSpec | None, cluster: ClusterSpec | str | None, *, rows: int, width: int, batch: int = 1,
            repeats: int = 3, graphs: bool = False, lobby=None, **pool_kw) -> ClusterSpec:
    """Measure each device's capability (rows/s of one network call on a ``rows``-row band)."""
    spec = model or ModelSpec()
    cluster = _as_cluster(cluster)
    cluster.validate_available()
    active = cluster.active()
    devices = [d.name for d in active]
    if lobby is not None and any(d.host for d in active):
        pool_kw["lobby"] = lobby  # devices that joined from other machines
    pool = get_pool(devices, cluster.resolved_backend(), worker_env=_worker_env({d.name: d for d in active}, devices),
                    **pool_kw)
    slowdowns = [d.slowdown for d in active]
    results = pool.run(lambda job_id: MeasureJob(job_id, spec.to_dict(), rows, width, batch, repeats,
                                                 graphs=graphs),
                       per_rank=lambda job, rank: _with_slowdown(job, slowdowns[rank]))
    caps = {devices[r]: res.rows / res.seconds_per_eval for r, res in results.items()}
    return cluster.with_capabilities(caps)
