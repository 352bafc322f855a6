"""Warm worker pools shared across runs, and when they give their memory back.

A pool is kept per (devices, backend, options) and reused while healthy: starting workers and
loading weights costs seconds to minutes, so a second run must not pay it again. But a warm pool
holds its workers' memory (weights on each GPU, a host copy) that the host application's own
memory manager does not know about, so it is given back in three ways:

- ``release_pools()``: the host asks (ComfyUI's "Unload models" / ``POST /free``, wired up in
  ``nodes/memory_hooks.py``). Idle pools close at once; a pool in use is marked and closes as soon
  as its run ends (the reaper below, or the next ``get_pool`` for it, whichever comes first).
- Idle release: a daemon thread closes pools unused for ``STADI_IDLE_RELEASE_S`` seconds
  (default 600; 0 keeps pools warm until exit). It runs only while pools exist.
- ``shutdown_pools()``: at interpreter exit (and by benchmarks between rows).

A pool is busy while its ``_lock`` is held (a session or a decode holds it for the whole run).
Releases take it without blocking and never close a busy pool; a pool found busy counts as used
right now, and so does a pool handed out by ``get_pool`` or ``warm_pools``, so the idle clock
only runs while nobody touches the pool.

``pool_report()`` says what each warm pool holds (devices, pids, model, host and GPU memory per
worker) as plain data, for the GPU Cluster Profile node and logs.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from .pool import WorkerPool

IDLE_RELEASE_ENV = "STADI_IDLE_RELEASE_S"
DEFAULT_IDLE_RELEASE_S = 600.0
_MAX_TICK_S = 5.0  # how late an idle release may come, at most (the setting is re-read every tick)
_PENDING_TICK_S = 0.25  # while a release waits for a run to end

_log = logging.getLogger("stadi")


@dataclass
class _Entry:
    pool: WorkerPool
    last_used: float  # time.monotonic() when last handed out or seen busy
    release_requested: bool = False  # close as soon as the pool is free (POST /free during a run)


_POOLS: dict[tuple, _Entry] = {}
_POOLS_LOCK = threading.Lock()
_WAKE = threading.Event()  # new pool, release request or shutdown: re-plan the reaper's sleep
_reaper: threading.Thread | None = None
_bad_setting_warned: set[str] = set()


# -- handing pools out ------------------------------------------------------------------------
def get_pool(devices: Sequence[str], backend: str, **kw) -> WorkerPool:
    """A started pool for exactly these devices, reused while it stays healthy."""
    key = (tuple(devices), backend, repr(sorted(kw.items())))
    with _POOLS_LOCK:
        entry = _POOLS.get(key)
        if entry is not None and entry.pool.alive():
            if not (entry.release_requested and _close_if_free(key, entry, "its memory was asked back")):
                entry.last_used = time.monotonic()
                return entry.pool
        elif entry is not None:
            _POOLS.pop(key)
            entry.pool.close(force=True)
        gpus = {d.split(".")[0] for d in devices if d.startswith("cuda")}
        joined = {d for d in devices if "/" in d}  # a worker that joined from another machine serves one pool
        for other_key in [k for k in _POOLS if gpus & {d.split(".")[0] for d in k[0]} or joined & set(k[0])]:
            _POOLS.pop(other_key).pool.close()  # a GPU belongs to one pool at a time (its memory)
        pool = WorkerPool(devices, backend, **kw).start()
        _POOLS[key] = _Entry(pool, time.monotonic())
        _ensure_reaper()
        return pool


def warm_pools(devices: Sequence[str], backend: str | None = None) -> list[WorkerPool]:
    """The live pools started for exactly ``devices`` (and ``backend``, unless None) that nobody asked
    to give their memory back; each counts as used now."""
    now = time.monotonic()
    with _POOLS_LOCK:
        found = [e for k, e in _POOLS.items() if k[0] == tuple(devices) and backend in (None, k[1])
                 and e.pool.alive() and not e.release_requested]
        for e in found:
            e.last_used = now
        return [e.pool for e in found]


# -- giving memory back -----------------------------------------------------------------------
def release_pools(reason: str = "its memory was asked back") -> dict:
    """Close every idle pool now; mark pools in use to close when their run ends.

    Returns {"released": [...], "deferred": [...]}, one description per pool (devices and pids).
    """
    released, deferred = [], []
    with _POOLS_LOCK:
        for key, entry in list(_POOLS.items()):
            what = _describe(entry.pool)
            if _close_if_free(key, entry, reason):
                released.append(what)
            else:
                entry.release_requested = True
                deferred.append(what)
                _log.info("STADI: the worker pool on %s is in use; it is released when its run ends", what)
    if deferred:
        _WAKE.set()
    return {"released": released, "deferred": deferred}


def shutdown_pools() -> None:
    """Close every pool (busy or not): the process is exiting, or a benchmark starts afresh."""
    with _POOLS_LOCK:
        for entry in _POOLS.values():
            entry.pool.close()
        _POOLS.clear()
    _WAKE.set()


def idle_release_s() -> float:
    """``STADI_IDLE_RELEASE_S`` (seconds; 0 or less = never), read at every use so it can change."""
    raw = os.environ.get(IDLE_RELEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_RELEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        if raw not in _bad_setting_warned:
            _bad_setting_warned.add(raw)
            _log.warning("STADI: %s=%r is not a number of seconds; using %g. Write e.g. %s=300, or 0 to keep "
                         "worker pools warm until exit", IDLE_RELEASE_ENV, raw, DEFAULT_IDLE_RELEASE_S, IDLE_RELEASE_ENV)
        return DEFAULT_IDLE_RELEASE_S
    return value


def reap_idle(now: float | None = None) -> float | None:
    """One pass of the idle release: close the free pools that are due. Returns how long to sleep
    before the next pass, or None when no pool is left (the reaper thread then ends)."""
    global _reaper
    now = time.monotonic() if now is None else now
    idle_s = idle_release_s()
    with _POOLS_LOCK:
        for key, entry in list(_POOLS.items()):
            if entry.release_requested:
                _close_if_free(key, entry, "its memory was asked back")
            elif idle_s > 0 and now - entry.last_used >= idle_s:
                _close_if_free(key, entry, f"unused for {now - entry.last_used:.0f} s ({IDLE_RELEASE_ENV}={idle_s:g})")
        if not _POOLS:
            if _reaper is threading.current_thread():
                _reaper = None
            return None
        if any(e.release_requested for e in _POOLS.values()):
            return _PENDING_TICK_S
        if idle_s <= 0:
            return _MAX_TICK_S
        due = min(e.last_used + idle_s for e in _POOLS.values()) - now
        return min(_MAX_TICK_S, max(0.02, due))


def _close_if_free(key: tuple, entry: _Entry, reason: str) -> bool:
    """Close ``entry``'s pool unless a run holds it (then it counts as used now). Caller holds _POOLS_LOCK."""
    pool = entry.pool
    if not pool._lock.acquire(blocking=False):
        entry.last_used = time.monotonic()
        return False
    try:
        _POOLS.pop(key, None)
        what = _describe(pool)
        pool.close()
        _log.info("STADI: released the worker pool on %s: %s", what, reason)
    finally:
        pool._lock.release()
    return True


def _ensure_reaper() -> None:
    """Start the idle-release thread unless it runs. Caller holds _POOLS_LOCK."""
    global _reaper
    if _reaper is None or not _reaper.is_alive():
        _reaper = threading.Thread(target=_reap_loop, name="stadi-idle-release", daemon=True)
        _reaper.start()
    _WAKE.set()


def _reap_loop() -> None:
    while True:
        _WAKE.clear()
        try:
            wait_s = reap_idle()
        except Exception:  # a failed close must not end idle release for the pools that remain
            _log.exception("STADI: idle release of worker pools failed; retrying in %g s", _MAX_TICK_S)
            wait_s = _MAX_TICK_S
        if wait_s is None:
            return
        _WAKE.wait(wait_s)


# -- what the pools hold ----------------------------------------------------------------------
def _describe(pool: WorkerPool) -> str:
    return f"{', '.join(pool.devices)} (pids {', '.join(str(p) for p in pool.pids())})"


def pool_report() -> list[dict]:
    """What each warm pool holds, as plain data: one dict per pool with ``devices``, ``backend``,
    ``model`` (the key of the model its workers loaded, or None), ``busy``, ``idle_s`` and
    ``workers`` (per rank: ``device``, ``pid``, ``alive``, ``rss_bytes`` and ``gpu_bytes``; a
    figure that cannot be measured here is None)."""
    now = time.monotonic()
    with _POOLS_LOCK:
        entries = [(k, e, e.pool.pids(), list(e.pool.devices)) for k, e in _POOLS.items()]
    gpu = _gpu_bytes_by_pid()
    out = []
    for key, entry, pids, devices in entries:
        busy = entry.pool._lock.locked()
        workers = []
        for rank, (device, pid) in enumerate(zip(devices, pids)):
            proc = entry.pool.procs[rank] if rank < len(entry.pool.procs) else None
            workers.append({"rank": rank, "device": device, "pid": pid,
                            "alive": proc is not None and proc.poll() is None,
                            "rss_bytes": None if "/" in device else process_rss_bytes(pid),  # another machine's pid
                            "gpu_bytes": gpu.get(pid) if gpu is not None and "/" not in device else None})
        out.append({"devices": devices, "backend": key[1], "model": entry.pool.loaded_model_key, "busy": busy,
                    "idle_s": 0.0 if busy else round(now - entry.last_used, 1),
                    "release_requested": entry.release_requested, "workers": workers})
    return out


def process_rss_bytes(pid: int) -> int | None:
    """Resident host memory of ``pid`` (psutil when installed, else /proc/PID/status); None if unknown."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # gone, or not ours to see
        return None
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpu_bytes_by_pid() -> dict[int, int] | None:
    """GPU memory used per process over every NVIDIA GPU (pynvml); None when it cannot be measured
    (no pynvml, no driver). In a container the driver may report host pids: those stay unmatched."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    used: dict[int, int] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.usedGpuMemory is not None:
                    used[int(proc.pid)] = used.get(int(proc.pid), 0) + int(proc.usedGpuMemory)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return used


def format_pool_report(report: list[dict] | None = None) -> list[str]:
    """One line per warm pool (and one when there is none), for a node's UI and logs."""
    report = pool_report() if report is None else report
    if not report:
        return ["warm workers: none (they start with the next STADI run)"]

    def mb(n):
        return "n/a" if n is None else f"{n / 2**20:.0f} MB"

    lines = []
    for p in report:
        state = "busy" if p["busy"] else f"idle {p['idle_s']:.0f} s"
        if p["release_requested"]:
            state += ", released when its run ends"
        workers = "; ".join(f"{w['device']} pid {w['pid']}: host {mb(w['rss_bytes'])}, GPU {mb(w['gpu_bytes'])}"
                            for w in p["workers"])
        lines.append(f"warm workers on {', '.join(p['devices'])} ({p['backend']}, {state}), "
                     f"model {p['model'] or 'n/a (not recorded)'}: {workers}")
    return lines


atexit.register(shutdown_pools)
