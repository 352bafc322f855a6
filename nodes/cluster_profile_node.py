"""GPU Cluster Profile node: which devices a STADI Sampler uses, and how fast each is taken to be.

A workflow is often opened on another machine than the one it was made on, so a device the
workflow names that does not exist here is skipped with a note (and, if nothing is left, the
cluster falls back to CPU workers) instead of failing the prompt. What a user typed wrong in
a widget, on the other hand, is an error whose message says what to write instead.

The node also reports what the warm STADI workers hold when it runs (one note per pool: devices,
pids, the model loaded, host and GPU memory per worker; ``registry.pool_report`` as data under the
``stadi_workers`` UI key), because that memory is invisible to ComfyUI's own memory manager. It is a
snapshot: ComfyUI caches the node, so it is taken when the node last ran (``GET /stadi/workers``
answers live).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from stadi_core.cluster import DEVICE_SYNTAX, ClusterSpec, DeviceSpec, canonical_device
from stadi_core.errors import PlanError
from stadi_core.runtime.registry import format_pool_report, pool_report

from .device_discovery import cuda_names, devices_fingerprint, discover_devices
from .remote_workers import joined_info, server_lobby
from .types import CLUSTER_TYPE, StadiCluster

log = logging.getLogger("stadi")

__all__ = ["GPUClusterProfile", "build_cluster", "parse_assignments", "parse_device_list", "profile_ui"]

AUTO_CPU_WORKERS = 2
_SPLIT = re.compile(r"[,;\n]+")


def parse_device_list(text: str, what: str) -> list[str]:
    """ "cuda:2, cuda:3" -> ["cuda:2", "cuda:3"] (canonical names, duplicates removed)."""
    out: list[str] = []
    for tok in (t.strip() for t in _SPLIT.split(str(text or ""))):
        if not tok:
            continue
        try:
            name = canonical_device(tok)
        except PlanError:
            raise PlanError(f"{what}: {tok!r} is not a device name; write device names such as "
                            f"'cuda:2' or 'cuda:1, cpu:0' ({DEVICE_SYNTAX})") from None
        if name not in out:
            out.append(name)
    return out


def parse_assignments(text: str, what: str, example: str, meaning: str, minimum: float, strict_min: bool) -> dict[str, float]:
    """ "cuda:1=0.5, cuda:0=1" -> {"cuda:1": 0.5, "cuda:0": 1.0}; errors say what to write."""
    out: dict[str, float] = {}
    fix = f"write {meaning} as DEVICE=NUMBER pairs separated by commas, e.g. '{example}'"
    for item in (t.strip() for t in _SPLIT.split(str(text or ""))):
        if not item:
            continue
        if item.count("=") != 1:
            raise PlanError(f"{what}: {item!r} is not DEVICE=NUMBER; {fix}")
        dev, _, val = (p.strip() for p in item.partition("="))
        try:
            name = canonical_device(dev)
        except PlanError:
            raise PlanError(f"{what}: {dev!r} in {item!r} is not a device name ({DEVICE_SYNTAX}); {fix}") from None
        try:
            number = float(val.rstrip("xX").strip()) if val else float("nan")
        except ValueError:
            number = float("nan")
        if number != number or number in (float("inf"), float("-inf")):
            raise PlanError(f"{what}: {val!r} in {item!r} is not a number; {fix}")
        if number < minimum or (strict_min and number == minimum):
            bound = f"> {minimum:g}" if strict_min else f">= {minimum:g}"
            raise PlanError(f"{what}: {item!r}: the number must be {bound}; {fix}")
        if name in out:
            raise PlanError(f"{what}: {name} is given twice; give each device once, e.g. '{example}'")
        out[name] = number
    return out


def slowdown_steps(text: str) -> tuple[str, dict[str, int]]:
    """ "cpu:1=2@4" (2x slower from sampler step 4 on) -> ("cpu:1=2", {"cpu:1": 4}); plain pairs pass."""
    plain, starts = [], {}
    for item in (t.strip() for t in _SPLIT.split(str(text or ""))):
        if "@" in item:
            pair, _, step = (p.strip() for p in item.rpartition("@"))
            if not step.isdigit():
                raise PlanError(f"emulate_slowdown: {item!r}: after '@' give the sampler step the slowdown starts "
                                "at, e.g. 'cpu:1=2@4'")
            starts[canonical_device(pair.partition("=")[0].strip())] = int(step)
            item = pair
        plain.append(item)
    return ", ".join(plain), starts


def _nccl_available() -> bool:
    try:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_nccl_available())
    except Exception:
        return False


def build_cluster(devices: str = "auto", backend: str = "auto", measure: bool = True, speeds: str = "",
                  exclude: str = "", emulate_slowdown: str = "", discovered: list[dict] | None = None) -> StadiCluster:
    """The node's work, without ComfyUI. `discovered` replaces device discovery (tests)."""
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log.warning("STADI cluster: %s", msg)

    # -- syntax first: a typo fails the prompt, whatever the machine ---------------------------
    if backend not in ("auto", "nccl", "gloo"):
        raise PlanError(f"backend: unknown backend {backend!r}; choose auto, nccl or gloo")
    speed_map = parse_assignments(speeds, "speeds", "cuda:0=1, cuda:1=0.5", "relative speeds (1 = full speed)",
                                  0.0, strict_min=True)
    emulate_slowdown, slow_from = slowdown_steps(emulate_slowdown)
    slow_map = parse_assignments(emulate_slowdown, "emulate_slowdown", "cuda:1=2",
                                 "emulated slowdown factors (2 = half speed, 1 = none)", 1.0, strict_min=False)
    excluded = parse_device_list(exclude, "exclude")
    text = str(devices or "").strip() or "auto"
    auto = text.lower() == "auto"
    if not auto:
        try:
            wanted = list(ClusterSpec.parse(text).names())
        except PlanError as exc:
            raise PlanError(f"devices: {exc}. Write 'auto', a list such as 'cuda:0, cuda:1', or 'cpu*2'") from None

    # -- what this machine has ----------------------------------------------------------------
    found = discover_devices() if discovered is None else [dict(d) for d in discovered]
    have_cuda = cuda_names(found)
    lobby = server_lobby()  # workers on other machines (STADI_LISTEN; nodes/remote_workers.py)
    joined = lobby.names() if lobby is not None else []
    if auto:
        if have_cuda:
            wanted = list(have_cuda)
        else:
            wanted = [f"cpu:{i}" for i in range(AUTO_CPU_WORKERS)]
            note(f"no CUDA device found: using {AUTO_CPU_WORKERS} CPU workers")
        wanted += joined
    missing = [n for n in wanted if n.startswith("cuda:") and n not in have_cuda]
    if missing:
        here = ", ".join(have_cuda) if have_cuda else "no CUDA device"
        verb = "is" if len(missing) == 1 else "are"
        note(f"{', '.join(missing)} {verb} not on this machine (it has {here}): skipped")
    absent = [n for n in wanted if "/" in n and n not in joined]
    if absent:
        where = (f"join with `python -m stadi_core worker --join {lobby.address}` on that machine" if lobby is not None
                 else "start ComfyUI with STADI_LISTEN=ADDR:PORT and STADI_TOKEN so workers on other machines can join")
        note(f"{', '.join(absent)} {'has' if len(absent) == 1 else 'have'} not joined: skipped ({where})")
        missing += absent
    names = [n for n in wanted if n not in missing]

    def assemble(names: list[str]) -> list[DeviceSpec]:
        return [DeviceSpec(n, relative_speed=speed_map.get(n), slowdown=slow_map.get(n, 1.0),
                           slowdown_from=slow_from.get(n, 0), excluded=n in excluded) for n in names]

    specs = assemble(names)
    if not any(not d.excluded for d in specs):
        if not missing:  # the user's own exclude list removed everything that exists
            raise PlanError(f"exclude: every device of the cluster ({', '.join(names)}) is excluded; "
                            "leave at least one out of 'exclude'")
        names = [f"cpu:{i}" for i in range(AUTO_CPU_WORKERS)]
        specs = assemble(names)
        note(f"no usable device left: falling back to {AUTO_CPU_WORKERS} CPU workers")
        if not any(not d.excluded for d in specs):  # exclude named these cpu workers too
            specs = [replace(d, excluded=False) for d in specs]

    # overrides for devices that are not in the cluster: harmless on another machine, say so
    in_cluster = set(names)
    for what, given in (("speeds", speed_map), ("emulate_slowdown", slow_map), ("exclude", dict.fromkeys(excluded))):
        stray = [n for n in given if n not in in_cluster and n not in missing]
        if stray:
            note(f"{what}: {', '.join(stray)} not in the cluster ({', '.join(names)}): ignored")

    # -- transport ------------------------------------------------------------------------------
    chosen = backend
    active = [d for d in specs if not d.excluded]
    if backend == "nccl":
        if not all(d.kind == "cuda" for d in active):
            if auto or missing:  # the CPU workers are our fallback, not the user's choice
                chosen = "gloo"
                note("backend nccl needs GPUs; the CPU workers use gloo")
            else:
                raise PlanError("backend: nccl needs one GPU per worker; choose gloo (or auto) for CPU workers")
        elif not _nccl_available():
            chosen = "gloo"
            note("backend nccl is not available in this PyTorch build: using gloo")
    spec = ClusterSpec(tuple(specs), backend=chosen)

    # -- discovery data for the web panel: each physical device and the workers on it ----------
    info = []
    for d in found:
        workers = [s.to_dict() for s in specs if (s.name == d["name"] if d.get("kind") == "cuda" else
                                                    s.kind == d.get("kind") and not s.host)]
        info.append(dict(d, workers=workers, in_cluster=any(not w["excluded"] for w in workers)))
    if lobby is not None:
        info += [dict(d, workers=[s.to_dict() for s in specs if s.name == d["name"]],
                      in_cluster=any(s.name == d["name"] and not s.excluded for s in specs))
                 for d in joined_info(lobby, joined)]
    cluster = StadiCluster(spec=spec, measure=bool(measure), devices_info=info, notes=notes)
    log.info("STADI cluster: %s (backend %s)%s", spec, spec.resolved_backend(), "" if measure else ", not measured")
    return cluster


class GPUClusterProfile:
    """ComfyUI node: STADI_CLUSTER for a STADI Sampler."""

    DESCRIPTION = ("Chooses the devices a STADI Sampler splits one image across, and how fast each counts. "
                   "'auto' takes every CUDA GPU (or 2 CPU workers when there is none). Devices the workflow names "
                   "that this machine lacks are skipped with a note. Speeds are measured on the actual model when "
                   "'measure' is on; 'speeds' overrides them, 'exclude' leaves devices out, and 'emulate_slowdown' "
                   "slows a worker down on purpose (testing).")
    CATEGORY = "sampling/STADI"
    FUNCTION = "build"
    RETURN_TYPES = (CLUSTER_TYPE,)
    RETURN_NAMES = ("cluster",)
    OUTPUT_TOOLTIPS = ("The devices, their speeds and the backend, for a STADI Sampler's 'cluster' input.",)
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "devices": ("STRING", {"default": "auto", "multiline": False, "tooltip":
                            "'auto' = every CUDA GPU (2 CPU workers when there is none), or a list in band order "
                            "(top to bottom) such as 'cuda:0, cuda:1' or 'cpu*2'."}),
                "backend": (["auto", "nccl", "gloo"], {"default": "auto", "tooltip":
                            "How workers exchange activations: auto = nccl when every worker has its own GPU, "
                            "else gloo."}),
                "measure": ("BOOLEAN", {"default": True, "tooltip":
                            "Measure each device's speed on the actual model before planning (cached). With devices "
                            "of other machines they are measured anyway (links are priced against real speeds) "
                            "unless 'speeds' sets them."}),
                "speeds": ("STRING", {"default": "", "multiline": False, "tooltip":
                           "Manual relative speeds that replace the measurement, e.g. 'cuda:0=1, cuda:1=0.5'."}),
                "exclude": ("STRING", {"default": "", "multiline": False, "tooltip":
                            "Devices to leave out, e.g. 'cuda:2'."}),
                "emulate_slowdown": ("STRING", {"default": "", "multiline": False, "tooltip":
                                     "Testing: slow a worker down on purpose, e.g. 'cuda:1=2' (half speed), or 'cuda:1=2@4' (from sampler step 4: bands move during the run)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Widget values are part of ComfyUI's cache key already; this adds the machine, so a
        # GPU that appears or disappears re-runs the node (live load does not).
        lobby = server_lobby()
        return devices_fingerprint(discover_devices()) + ("|" + ",".join(lobby.names()) if lobby is not None else "")

    def build(self, devices, backend, measure, speeds, exclude, emulate_slowdown):
        cluster = build_cluster(devices=devices, backend=backend, measure=measure, speeds=speeds,
                                exclude=exclude, emulate_slowdown=emulate_slowdown)
        return {"ui": profile_ui(cluster), "result": (cluster,)}


def profile_ui(cluster: StadiCluster) -> dict:
    """The node's UI payload: the devices panel (its notes end with one line per warm worker pool)
    and the pools' data."""
    pools = pool_report()
    lines = format_pool_report(pools)
    for line in lines:
        log.info("STADI cluster: %s", line)
    ui = cluster.to_ui()
    ui["notes"] = list(ui.get("notes") or []) + lines
    return {"stadi_devices": [ui], "stadi_workers": pools}
