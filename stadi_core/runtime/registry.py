"""Warm worker pools shared across runs: one per (devices, backend, options), reused while healthy."""

from __future__ import annotations

import atexit
import threading
from typing import Sequence

from .pool import WorkerPool

_POOLS: dict[tuple, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(devices: Sequence[str], backend: str, **kw) -> WorkerPool:
    """A started pool for exactly these devices, reused while it stays healthy."""
    key = (tuple(devices), backend, repr(sorted(kw.items())))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and pool.alive():
            return pool
        if pool is not None:
            pool.close(force=True)
        gpus = {d.split(".")[0] for d in devices if d.startswith("cuda")}
        for other_key in [k for k in _POOLS if gpus & {d.split(".")[0] for d in k[0]}]:
            _POOLS.pop(other_key).close()  # a GPU belongs to one pool at a time (its memory)
        pool = WorkerPool(devices, backend, **kw).start()
        _POOLS[key] = pool
        return pool


def warm_pools(devices: Sequence[str], backend: str | None = None) -> list[WorkerPool]:
    """The live pools started for exactly ``devices`` (and ``backend``, unless None)."""
    with _POOLS_LOCK:
        return [p for k, p in _POOLS.items() if k[0] == tuple(devices) and backend in (None, k[1]) and p.alive()]


def shutdown_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


atexit.register(shutdown_pools)
