"""Which devices this machine has, for the GPU Cluster Profile node and its web panel.

Every entry is a plain JSON-able dict:

    name             "cuda:0" ... (torch's numbering, i.e. after CUDA_VISIBLE_DEVICES) or "cpu:0"
    kind             "cuda" | "cpu"
    label            hardware name ("NVIDIA GeForce RTX 4090", "AMD EPYC 7V13 (16 cores)")
    memory_total_mb  int
    memory_used_mb   int or None (whole device: every process, this one included)
    utilization_pct  float or None when unknown
    source           "pynvml" | "torch" | "cpu"

plus a few extras: `index`, `uuid` (cuda), `memory_used_by_others_mb` (pynvml: processes other
than this one; None when NVML does not say), `cores` (cpu).

torch decides which cuda:N exist (that is what the workers will use); pynvml (package
`nvidia-ml-py`, optional) adds live utilisation and memory, matched to torch's devices by UUID
or PCI address, because NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES.
Without pynvml, memory comes from torch.cuda.mem_get_info, but only for devices on which this
process already holds a CUDA context: asking any other device would create a context there
(a few hundred MiB of VRAM pinned in the ComfyUI process for its lifetime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from typing import Any

log = logging.getLogger("stadi")

__all__ = ["discover_devices", "cuda_names", "devices_fingerprint"]

_MB = 1024 * 1024


def _mb(n: Any) -> int | None:
    try:
        return int(round(float(n) / _MB))
    except (TypeError, ValueError):
        return None


def _norm_uuid(u: Any) -> str | None:
    if u is None:
        return None
    if isinstance(u, bytes):
        u = u.decode("utf-8", "replace")
    s = str(u).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    return s or None


# -- NVML ---------------------------------------------------------------------------------
def _nvml_devices() -> list[dict]:
    """Every GPU NVML sees, in NVML order; [] when pynvml or the driver is missing."""
    try:
        import pynvml  # package nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no permission
        log.debug("STADI: NVML unavailable: %s", exc)
        return []
    out = []
    try:
        me = os.getpid()
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                if isinstance(name, bytes):
                    name = name.decode("utf-8", "replace")
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                entry: dict[str, Any] = {"nvml_index": i, "label": str(name), "memory_total_mb": _mb(mem.total),
                                         "memory_used_mb": _mb(mem.used), "utilization_pct": None,
                                         "memory_used_by_others_mb": None, "uuid": None, "pci": None}
                try:
                    entry["utilization_pct"] = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:
                    pass
                try:
                    entry["uuid"] = _norm_uuid(pynvml.nvmlDeviceGetUUID(h))
                except Exception:
                    pass
                try:
                    pci = pynvml.nvmlDeviceGetPciInfo(h)
                    entry["pci"] = (int(pci.domain), int(pci.bus), int(pci.device))
                except Exception:
                    pass
                try:
                    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                    used = [p.usedGpuMemory for p in procs if p.pid != me]
                    if all(isinstance(u, int) for u in used):  # NVML gives None when it can't tell
                        entry["memory_used_by_others_mb"] = _mb(sum(used))
                except Exception:
                    pass
                out.append(entry)
            except Exception as exc:
                log.debug("STADI: NVML device %d unreadable: %s", i, exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


# -- torch ----------------------------------------------------------------------------------
def _torch_cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _has_context(torch_mod: Any, i: int) -> bool:
    probe = getattr(torch_mod._C, "_cuda_hasPrimaryContext", None)
    if probe is None:
        return False
    try:
        return bool(probe(i))
    except Exception:
        return False


def _cuda_devices() -> list[dict]:
    n = _torch_cuda_count()
    if n == 0:
        return []
    import torch

    nvml = _nvml_devices()
    by_uuid = {d["uuid"]: d for d in nvml if d.get("uuid")}
    by_pci = {d["pci"]: d for d in nvml if d.get("pci")}
    out = []
    for i in range(n):
        entry: dict[str, Any] = {"name": f"cuda:{i}", "kind": "cuda", "index": i, "label": f"CUDA device {i}",
                                 "memory_total_mb": None, "memory_used_mb": None, "utilization_pct": None,
                                 "memory_used_by_others_mb": None, "uuid": None, "source": "torch"}
        try:
            props = torch.cuda.get_device_properties(i)
            entry["label"] = str(props.name)
            entry["memory_total_mb"] = _mb(props.total_memory)
            entry["uuid"] = _norm_uuid(getattr(props, "uuid", None))
            pci = None
            if hasattr(props, "pci_bus_id"):
                pci = (int(getattr(props, "pci_domain_id", 0)), int(props.pci_bus_id), int(getattr(props, "pci_device_id", 0)))
        except Exception as exc:
            log.warning("STADI: cannot read the properties of cuda:%d: %s", i, exc)
            pci = None
        match = by_uuid.get(entry["uuid"]) if entry["uuid"] else None
        if match is None and pci is not None:
            match = by_pci.get(pci)
        if match is None and len(nvml) == n and not os.environ.get("CUDA_VISIBLE_DEVICES") \
                and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
            match = nvml[i]  # same set, same (PCI) order
        if match is not None:
            entry.update(source="pynvml", label=match["label"] or entry["label"],
                         memory_total_mb=match["memory_total_mb"] or entry["memory_total_mb"],
                         memory_used_mb=match["memory_used_mb"], utilization_pct=match["utilization_pct"],
                         memory_used_by_others_mb=match["memory_used_by_others_mb"])
        elif _has_context(torch, i):
            try:
                free, total = torch.cuda.mem_get_info(i)
                entry["memory_total_mb"] = _mb(total)
                entry["memory_used_mb"] = _mb(total - free)
            except Exception:
                pass
        out.append(entry)
    return out


# -- CPU ------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_device() -> dict:
    total = used = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, used = _mb(vm.total), _mb(vm.total - vm.available)
    except Exception:
        try:
            total = _mb(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, ValueError, OSError):
            pass
    cores = _cpu_cores()
    return {"name": "cpu:0", "kind": "cpu", "index": 0, "label": f"{_cpu_model()} ({cores} cores)",
            "cores": cores, "memory_total_mb": total, "memory_used_mb": used, "utilization_pct": None,
            "source": "cpu"}


# -- public ---------------------------------------------------------------------------------
def discover_devices() -> list[dict]:
    """Every CUDA device torch can use (cuda:0..), then one CPU entry. Never raises."""
    try:
        cuda = _cuda_devices()
    except Exception as exc:  # discovery must never take the node down
        log.warning("STADI: CUDA device discovery failed: %s", exc)
        cuda = []
    return cuda + [_cpu_device()]


def cuda_names(devices: list[dict]) -> list[str]:
    return [d["name"] for d in devices if d.get("kind") == "cuda"]


def devices_fingerprint(devices: list[dict]) -> str:
    """A hash of what the devices ARE (name, hardware, UUID), not of how busy they are: it
    changes when a GPU appears, disappears or is swapped, and stays put between prompts
    otherwise, so ComfyUI does not re-run the cluster node (and the sampler after it) every time.
    Total memory is left out: NVML and torch report different totals for the same GPU."""
    ident = [[d.get("name"), d.get("label"), d.get("uuid")] for d in devices]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
