"""Worker processes: spawn, torch.distributed group, control channel, heartbeats, warm pool."""

from .pool import WorkerPool, get_pool, shutdown_pools

__all__ = ["WorkerPool", "get_pool", "shutdown_pools"]
