"""All-gather between workers that share one GPU, without leaving the GPU.

NCCL refuses two ranks on one device and gloo copies through the host, so workers that
share a GPU (CUDA MPS emulation of unequal GPUs) exchange through CUDA IPC: each rank
owns one device buffer per exchange key, shares its IPC handle once through the
TCPStore, and peers read it with a device-to-device copy. A gloo barrier before the
reads (every rank has written) and one after (every rank has read) order the accesses;
the barriers are tiny CPU messages, the data never leaves the GPU.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor


class CudaIpcTransport:
    def __init__(self, store, group, rank: int, world_size: int, timeout_s: float = 120.0):
        self.store = store
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.timeout = timedelta(seconds=timeout_s)
        self._own: dict[str, torch.Tensor] = {}
        self._peers: dict[str, list[torch.Tensor]] = {}
        self.generation = 0

    def _slot(self, key: tuple, like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        name = f"ipc/{self.generation}/{key}/{tuple(like.shape)}/{like.dtype}"
        own = self._own.get(name)
        if own is None:
            own = torch.empty_like(like)
            self._own[name] = own
            self.store.set(f"{name}/{self.rank}", pickle.dumps(reduce_tensor(own)))
            peers = []
            for r in range(self.world_size):
                if r == self.rank:
                    peers.append(own)
                    continue
                self.store.wait([f"{name}/{r}"], self.timeout)
                rebuild, args = pickle.loads(self.store.get(f"{name}/{r}"))
                peers.append(rebuild(*args))
            self._peers[name] = peers
        return own, self._peers[name]

    def all_gather_many(self, items: list[tuple[tuple, torch.Tensor]]) -> list[list[torch.Tensor]]:
        """For each (key, local) of equal shape on every rank: every rank's tensor, in rank order."""
        slots = [self._slot(key, local) for key, local in items]
        for (own, _), (_, local) in zip(slots, items):
            own.copy_(local)
        torch.cuda.current_stream().synchronize()  # our writes are in memory before anyone reads
        dist.barrier(group=self.group)
        out = [[p.clone() for p in peers] for _, peers in slots]
        torch.cuda.current_stream().synchronize()  # our reads are done before anyone writes again
        dist.barrier(group=self.group)
        return out

    def self_test(self) -> str | None:
        """None if every rank reads every other rank's buffer correctly, else why not.

        CUDA IPC can map memory without error yet read garbage (seen between CUDA MPS
        clients on the lent H100), so the transport proves itself before it is used; all
        ranks agree on the verdict so they fall back together.
        """
        probe = torch.empty(1 << 16, dtype=torch.float32, device="cuda")
        reason = None
        try:
            own, peers = self._slot(("self-test",), probe)
            own.fill_(float(self.rank + 1))
            torch.cuda.current_stream().synchronize()
            dist.barrier(group=self.group)
            for r, peer in enumerate(peers):
                seen = peer.clone()
                if not bool((seen == float(r + 1)).all()):
                    reason = f"rank {self.rank} read wrong data from rank {r} through CUDA IPC"
            torch.cuda.current_stream().synchronize()
        except Exception as exc:  # opening a handle can fail outright too
            reason = f"CUDA IPC failed: {exc}".splitlines()[0]
        verdict = torch.tensor([0.0 if reason is None else 1.0])
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=self.group)
        self.reset()
        if verdict.item() > 0:
            return reason or "another rank could not read through CUDA IPC"
        return None

    def reset(self) -> None:
        """Forget the buffers (a new plan); the peers' handles are dropped with them."""
        self._own.clear()
        self._peers.clear()
        self.generation += 1
