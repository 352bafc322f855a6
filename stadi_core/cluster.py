"""Who computes: the devices of one STADI run and how fast each is assumed to be.

A cluster is a plain, JSON-able value so it can cross process boundaries (workers
are spawned processes) and serve as a ComfyUI cache key. Everything a user can get
wrong here raises PlanError with the fix in the message, at construction time, so a
bad cluster never reaches the workers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .errors import PlanError

__all__ = ["DeviceSpec", "ClusterSpec", "canonical_device", "DEVICE_SYNTAX"]

BACKENDS = ("auto", "nccl", "gloo")
DEVICE_SYNTAX = ("cpu, cpu:N, cuda or cuda:N (and cpu*N / cuda*N for N workers; cuda:N.K for a K-th extra "
                 "worker sharing GPU N, e.g. under CUDA MPS; HOST/cuda:N for a worker that joined from another "
                 "machine), separated by commas")
_DEVICE_RE = re.compile(r"^(?:([^/\s,*]+)/)?(cpu|cuda)(?::(\d+)(?:\.(\d+))?)?$")


def canonical_device(token: str) -> str:
    """Canonical name of one device token: "cuda" -> "cuda:0", " CPU:2 " -> "cpu:2", "10.0.0.2/cuda" ->
    "10.0.0.2/cuda:0" (a worker on another machine, runtime/lobby.py)."""
    m = _DEVICE_RE.match(str(token).strip().lower())
    if not m:
        raise PlanError(f"unknown device {token!r}: use {DEVICE_SYNTAX}")
    slot = f".{int(m.group(4))}" if m.group(4) and int(m.group(4)) > 0 else ""
    host = f"{m.group(1)}/" if m.group(1) else ""
    return f"{host}{m.group(2)}:{int(m.group(3) or 0)}{slot}"


def device_host(name: str) -> str:
    """"10.0.0.2/cuda:1" -> "10.0.0.2"; "" for a device of this machine."""
    return name.rpartition("/")[0]


def device_index(name: str) -> int:
    """"cuda:1.2" -> 1: the device a worker runs on, whatever its slot (and machine)."""
    return int(name.rpartition("/")[2].split(":")[1].split(".")[0])


def _check_positive(what: str, value: float | None, name: str) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{name}: {what} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class DeviceSpec:
    """One worker. Its planning speed decides how many rows (and steps) it gets."""

    name: str
    capability: float | None = None  # measured rows/second of one network evaluation
    relative_speed: float | None = None  # manual override; when set it is the planning speed
    slowdown: float = 1.0  # emulated slowdown >= 1: the worker pads its compute (tests/benchmarks)
    slowdown_from: int = 0  # ... from this sampler step on (a device that gets busy mid-run; lockstep runs)
    excluded: bool = False
    mps_percent: int | None = None  # CUDA MPS active thread percentage for this worker (emulated smaller GPU)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", canonical_device(self.name))
        _check_positive("capability", self.capability, self.name)
        _check_positive("relative_speed", self.relative_speed, self.name)
        s = self.slowdown
        if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 1:
            raise PlanError(f"{self.name}: slowdown must be a number >= 1 (1 = full speed), got {s!r}")
        if not isinstance(self.slowdown_from, int) or self.slowdown_from < 0:
            raise PlanError(f"{self.name}: the step a slowdown starts at must be a whole number >= 0, "
                            f"got {self.slowdown_from!r}")

    def planning_speed(self) -> float:
        """Manual speed, else measured capability (which already includes any emulated
        slowdown), else the nominal 1/slowdown."""
        if self.relative_speed is not None:
            return float(self.relative_speed)
        if self.capability is not None:
            return float(self.capability)
        return 1.0 / float(self.slowdown) if self.slowdown_from == 0 else 1.0  # slowed later: unknown at plan time

    @property
    def kind(self) -> str:
        return self.name.rpartition("/")[2].split(":")[0]

    @property
    def host(self) -> str:
        """The machine of a worker that joined from elsewhere ("" for this machine's devices)."""
        return device_host(self.name)

    @property
    def index(self) -> int:
        """The physical device index (a shared-GPU slot suffix ".K" is not part of it)."""
        return device_index(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capability": self.capability,
            "relative_speed": self.relative_speed,
            "slowdown": self.slowdown,
            "slowdown_from": self.slowdown_from,
            "excluded": self.excluded,
            "mps_percent": self.mps_percent,
        }


@dataclass(frozen=True)
class ClusterSpec:
    """The ordered devices of one run (order = band order, top to bottom) and how they talk."""

    devices: tuple[DeviceSpec, ...]
    backend: str = "auto"  # "auto" | "nccl" | "gloo"
    rendezvous_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        devs = tuple(d if isinstance(d, DeviceSpec) else DeviceSpec(str(d)) for d in self.devices)
        object.__setattr__(self, "devices", devs)
        seen: set[str] = set()
        for d in devs:
            if d.name in seen:
                raise PlanError(f"device {d.name} is listed twice: list each device once")
            seen.add(d.name)
        if not self.active():
            raise PlanError("the cluster has no active device: add a device or un-exclude one")
        if self.backend not in BACKENDS:
            raise PlanError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.backend == "nccl" and any(d.kind == "cpu" for d in self.active()):
            raise PlanError("nccl needs one GPU per worker; use gloo for CPU workers")

    # construction helpers -------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, **kw: Any) -> "ClusterSpec":
        """Parse "cuda:0, cuda:1", "cpu*3" (three cpu workers), "cuda" (= cuda:0)."""
        tokens = [t.strip() for t in str(text).split(",") if t.strip()]
        if not tokens:
            raise PlanError(f"empty device list: use {DEVICE_SYNTAX}")
        names: list[str] = []
        for tok in tokens:
            if "*" in tok:
                kind, _, count = (p.strip().lower() for p in tok.partition("*"))
                if kind not in ("cpu", "cuda") or not count.isdigit() or int(count) < 1:
                    raise PlanError(f"unknown device {tok!r}: use {DEVICE_SYNTAX}")
                used = {n for n in names if n.startswith(kind + ":")}
                i = 0
                for _ in range(int(count)):
                    while f"{kind}:{i}" in used:
                        i += 1
                    names.append(f"{kind}:{i}")
                    used.add(f"{kind}:{i}")
            else:
                names.append(canonical_device(tok))
        return cls(tuple(DeviceSpec(n) for n in names), **kw)

    @classmethod
    def cpu(cls, n: int, slowdowns: Sequence[float] | None = None, **kw: Any) -> "ClusterSpec":
        """n CPU workers, optionally slowed down to emulate a heterogeneous cluster."""
        if int(n) < 1:
            raise PlanError(f"need at least 1 cpu worker, got {n}")
        slowdowns = [1.0] * int(n) if slowdowns is None else list(slowdowns)
        if len(slowdowns) != int(n):
            raise PlanError(f"{len(slowdowns)} slowdowns given for {n} cpu workers: give one per worker")
        return cls(tuple(DeviceSpec(f"cpu:{i}", slowdown=float(s)) for i, s in enumerate(slowdowns)), **kw)

    # queries ---------------------------------------------------------------------------
    def active(self) -> tuple[DeviceSpec, ...]:
        return tuple(d for d in self.devices if not d.excluded)

    def names(self) -> tuple[str, ...]:
        """Names of the active devices, in band order."""
        return tuple(d.name for d in self.active())

    def speeds(self) -> tuple[float, ...]:
        """Planning speeds of the active devices, in band order."""
        return tuple(d.planning_speed() for d in self.active())

    def resolved_backend(self) -> str:
        """nccl only when every worker owns its own GPU and nccl exists; gloo otherwise."""
        if self.backend != "auto":
            return self.backend
        act = self.active()
        if not all(d.kind == "cuda" for d in act):
            return "gloo"
        if len({(d.host, d.index) for d in act}) != len(act):
            return "gloo"
        try:
            import torch.distributed as dist

            return "nccl" if dist.is_available() and dist.is_nccl_available() else "gloo"
        except Exception:  # no torch / no distributed build
            return "gloo"

    def with_capabilities(self, caps: Mapping[str, float]) -> "ClusterSpec":
        """A copy with measured capabilities (rows/second) set for the named devices."""
        by_name = {canonical_device(k): float(v) for k, v in caps.items()}
        unknown = sorted(set(by_name) - {d.name for d in self.devices})
        if unknown:
            raise PlanError(f"capabilities given for {', '.join(unknown)}, which is not in the cluster "
                            f"({', '.join(d.name for d in self.devices)})")
        devs = tuple(replace(d, capability=by_name[d.name]) if d.name in by_name else d for d in self.devices)
        return replace(self, devices=devs)

    def without(self, name: str) -> "ClusterSpec":
        """A copy with device ``name`` excluded (a worker lost mid-run); PlanError when none is left."""
        return replace(self, devices=tuple(replace(d, excluded=True) if d.name == name else d for d in self.devices))

    def validate_available(self, cuda_count: int | None = None) -> None:
        """Fail early, with the devices that do exist, if a cuda:N is not on this machine."""
        wanted = [d for d in self.active() if d.kind == "cuda" and not d.host]  # other machines' are theirs
        if not wanted:
            return
        if cuda_count is None:
            try:
                import torch

                cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            except Exception:
                cuda_count = 0
        missing = [d.name for d in wanted if d.index >= cuda_count]
        if not missing:
            return
        verb = "does" if len(missing) == 1 else "do"
        have = (f"this machine has {', '.join(f'cuda:{i}' for i in range(cuda_count))}"
                if cuda_count else "this machine has no CUDA device (use cpu workers)")
        raise PlanError(f"{', '.join(missing)} {verb} not exist: {have}; "
                        "remove it from the cluster or pick another")

    # serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": [d.to_dict() for d in self.devices],
            "backend": self.backend,
            "rendezvous_host": self.rendezvous_host,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClusterSpec":
        try:
            devs = tuple(DeviceSpec(**dict(d)) for d in data["devices"])
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed cluster description: {e}") from e
        return cls(devs, backend=data.get("backend", "auto"),
                   rendezvous_host=data.get("rendezvous_host", "127.0.0.1"))

    def __str__(self) -> str:
        return ", ".join(d.name + (" (excluded)" if d.excluded else "") for d in self.devices)
