"""Types for everything that crosses the coordinator <-> worker boundary.

Plain dataclasses of builtins and numpy arrays, so they pickle the same over a pipe,
a TCPStore or a socket to another machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # a worker imports this module before torch (it picks its GPU first)
    from ..sampling.loop_state import LoopState


@dataclass
class Hello:
    """First message of a worker that connected: who it is."""

    rank: int
    pid: int


@dataclass
class WorkerInit:
    rank: int
    world_size: int
    device: str  # "cpu:N" or "cuda:N" as the coordinator sees it
    backend: str
    store_host: str
    store_port: int
    store_prefix: str
    threads: int
    timeout_s: float
    heartbeat_s: float = 1.0
    extra_sys_path: list = field(default_factory=list)  # e.g. the ComfyUI root, for comfy-family models
    transport: str = "dist"  # "dist" (NCCL/gloo) or "cuda-ipc" (all ranks share one GPU)


@dataclass
class Ready:
    rank: int
    pid: int
    device_name: str


@dataclass
class GenerateJob:
    """Denoise one band: everything a rank needs, the same object sent to every rank."""

    job_id: int
    model: dict  # ModelSpec.to_dict()
    plan: dict  # Plan.to_dict()
    sampler: str
    sigmas: list
    cfg: float
    seed: int
    latent_shape: tuple  # (B, C, H, W) of the whole latent
    conditioning: dict  # {"cond": {name: ndarray}, "uncond": {...}}
    slowdown: float = 1.0
    graphs: bool = False  # replay communication-free band calls from CUDA graphs (CUDA devices)
    hybrid_window: dict | None = None  # hybrid_window.WindowConfig fields: Hybridiff's adaptive window
    resume: LoopState | None = None  # continue from there (this rank's rows) instead of starting from noise
    checkpoints: bool = False  # send a Checkpoint before every sync step (a lost worker's rows can be resumed)
    slowdown_from: int = 0  # the emulated slowdown applies from this sampler step on


@dataclass
class MeasureJob:
    """Time the network on a band of ``rows`` rows, alone (no exchange)."""

    job_id: int
    model: dict
    rows: int
    width: int
    batch: int
    repeats: int = 3
    slowdown: float = 1.0
    graphs: bool = False


@dataclass
class Shutdown:
    pass


@dataclass
class Heartbeat:
    """Sent every second by a worker's side thread. ``progress`` is the main thread's counter (messages
    received, band calls started and finished): heartbeats alone prove the process lives, an unmoving
    counter under flowing heartbeats shows a stuck main thread (a hung CUDA sync, a lost collective)."""

    rank: int
    job_id: int | None
    progress: int = 0
    doing: str = ""  # what the main thread does now, for the error that names a stuck rank


@dataclass
class StepReport:
    job_id: int
    rank: int
    timing: dict  # StepTiming.to_dict()


@dataclass
class BandResult:
    job_id: int
    rank: int
    band: np.ndarray
    timings: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class MeasureResult:
    job_id: int
    rank: int
    seconds_per_eval: float
    rows: int


@dataclass
class Cancelled:
    job_id: int
    rank: int
    step: int


@dataclass
class WorkerFailure:
    job_id: int | None
    rank: int
    message: str
    traceback: str


@dataclass
class Checkpoint:
    """A rank's loop state before a sync step: the coordinator keeps the latest every rank sent."""

    job_id: int
    rank: int
    state: LoopState


@dataclass
class PauseRequest:
    """Stop the current job at the next step where every rank can agree on it, keeping its state
    (the Checkpoint of that step): the coordinator continues it on new rows."""

    job_id: int | None = None


@dataclass
class Paused:
    job_id: int
    rank: int
    step: int


@dataclass
class CancelRequest:
    """Stop the current job at the next step where every rank can agree on it."""

    job_id: int | None = None


@dataclass
class SessionStart:
    """Per-call mode (ComfyUI): load the model and plan, then answer BandCalls until SessionEnd."""

    job_id: int
    model: dict  # ModelSpec.to_dict()
    plan: dict  # Plan.to_dict()
    slowdown: float = 1.0
    compile: str = "off"  # band calls without exchange inside: off | auto | graphs | torch.compile (parallel/compiled.py)
    slowdown_from: int = 0  # the emulated slowdown applies from this sampler step on


@dataclass
class SessionReady:
    job_id: int
    rank: int
    info: dict = field(default_factory=dict)


@dataclass
class UnitInput:
    """One work unit of a branch arrangement's call: rows of one group's branches."""

    group: int  # index into the plan's groups
    x: np.ndarray  # (N_branch, C, rows, W) the unit's rows of its branches' batch entries
    timesteps: np.ndarray
    cond: dict  # batch-aligned with x; {} when cond_key names arrays this session already sent
    cond_key: str = ""
    control: dict | None = None  # this unit's ControlNet residuals (models/control_bands.py wire form)


@dataclass
class BandCall:
    """One network evaluation of this rank's band, inside a session.

    In a branch arrangement ``units`` holds this rank's units instead (``x`` then unused),
    computed in group order, so the members of a group reach its exchanges together.
    """

    job_id: int
    call_id: int
    step: int
    phase: str  # parallel.Phase value
    x: np.ndarray  # (N, C, rows, W) the band of the already-scaled model input
    timesteps: np.ndarray
    cond: dict  # name -> ndarray, batch-aligned with x (context, y, ...)
    cancel: bool = False
    signature: int = 0  # equal on every rank for the same call; a mismatch means the loops diverged
    measure_only: bool = False  # time the band alone, no exchange (capability measurement)
    slot: int = 0  # the n-th network call of this sampler step: context is kept per slot
    units: list = field(default_factory=list)  # [UnitInput] in a branch arrangement
    cond_key: str = ""  # names ``cond``; an empty cond with a key: the arrays sent earlier in this session
    control: dict | None = None  # the band's ControlNet / T2I-Adapter residuals (models/control_bands.py wire form)
    # ControlNets that run on the band (runtime/worker_controls.py): (model key, hint key, strength, strength type,
    # passes y) per active one, innermost first; their ModelSpec dicts and hint rows the first time in a session
    controls: list | None = None
    control_models: dict = field(default_factory=dict)
    control_hints: dict = field(default_factory=dict)


@dataclass
class BandOutput:
    job_id: int
    call_id: int
    rank: int
    out: np.ndarray | None  # None when the call had units
    busy_s: float
    comm_s: float
    unit_outs: list = field(default_factory=list)  # one raw output per UnitInput, in order
    note: str = ""  # for the run report, once: e.g. compiling this band failed and calls run eagerly now
    sent: dict = field(default_factory=dict)  # context bytes this rank sent in the call, per kind (parallel/links.py)
    control_rows_bytes: int = 0  # the band's ControlNet residuals computed here: what step 1 would have sent


@dataclass
class SessionEnd:
    job_id: int


@dataclass
class SessionClosed:
    """A rank's answer to SessionEnd: it left the session (also after a cancel) and waits for jobs."""

    job_id: int
    rank: int


@dataclass
class DecodeJob:
    """Decode one band of a latent with a VAE (Patch Stitch, decode on the devices).

    ``latent`` is the band's own ``rows`` latent rows plus ``top`` rows of the band above and
    ``bottom`` rows of the band below (the overlap the server cross-fades), (B, C, top+rows+bottom, W).
    """

    job_id: int
    vae: dict  # runtime.decode.VaeSpec fields: the baked weights file, dtype, config, ComfyUI options
    latent: np.ndarray
    rows: int
    top: int = 0
    bottom: int = 0


@dataclass
class DecodeResult:
    job_id: int
    rank: int
    pixels: np.ndarray  # (B, H_px, W_px, C) float32, as ComfyUI's VAE.decode returns it
    seconds: float  # the decode alone (building the VAE is in info["build_s"])
    peak_memory_bytes: int  # see info["memory"]: what was measured
    info: dict = field(default_factory=dict)


# -- workers on other machines (runtime/lobby.py, runtime/join.py) -------------------------------
@dataclass
class Join:
    """A remote worker's first message after the token handshake: what it offers."""

    device: str  # its own name for the device: "cpu:0", "cuda:1"
    device_name: str  # "cpu" or the GPU's name
    memory_bytes: int  # the GPU's memory, or the host's RAM for a CPU worker
    threads: int  # CPU threads it will use (its host's cores shared among its CPU workers)
    pid: int
    hostname: str


@dataclass
class Welcome:
    """The coordinator's answer to Join: the worker's name in the cluster, and the id its lifeline quotes."""

    name: str  # "10.77.0.2/cpu:0": the address the coordinator sees it at, then its device
    join_id: str


@dataclass
class JoinRefused:
    reason: str


@dataclass
class LinkProbe:
    """Link measurement at join: ``payload`` travels to the worker, which answers ``reply_bytes`` back."""

    payload: bytes
    reply_bytes: int


@dataclass
class LinkEcho:
    payload: bytes


@dataclass
class LinkInfo:
    """One measured link between the coordinator's host and a worker's host."""

    host: str  # the worker's address as the coordinator sees it
    bandwidth_gbps: float  # GB/s (1e9 bytes/s), the slower of the two directions
    latency_s: float  # one way: half the smallest round trip of a tiny message
    down_gbps: float = 0.0  # coordinator -> worker
    up_gbps: float = 0.0  # worker -> coordinator
    probe_bytes: int = 0

    def describe(self) -> str:
        return (f"{self.bandwidth_gbps * 8:.3g} Gbit/s ({self.bandwidth_gbps * 1e3:.0f} MB/s; down "
                f"{self.down_gbps * 8:.3g}, up {self.up_gbps * 8:.3g} Gbit/s), latency {self.latency_s * 1e3:.3g} ms "
                f"one way (round trip {2 * self.latency_s * 1e3:.3g} ms)")


@dataclass
class LinkDone:
    info: LinkInfo


@dataclass
class LifelineHello:
    """First message on a remote worker's second connection: which join it belongs to."""

    join_id: str


@dataclass
class Beat:
    """Lifeline heartbeat, both ways, every second: silence means the other side is gone."""


@dataclass
class Release:
    """The coordinator lets a remote worker go: ``rejoin`` True when its pool ended (it joins again,
    fresh), False when the coordinator itself is going away (the worker exits)."""

    rejoin: bool
    reason: str = ""


@dataclass
class FileChunk:
    """Part of a shared memory file (runtime/shared_memory.py) copied to a worker on another machine,
    which cannot map the server's: ``size`` bytes in all, tagged ``tag`` (runtime/relay.py)."""

    tag: str
    offset: int
    size: int
    data: bytes


@dataclass
class FileStored:
    """The worker holds the whole file ``tag`` as its own memory file ``fd`` of process ``pid``."""

    tag: str
    pid: int
    fd: int
