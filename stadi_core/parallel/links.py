"""The wire under the context exchange: all-gathers and neighbour sends, counted and timed.

Kept apart from what is exchanged (context.py) so the byte count a report prints is what the
transport really moved, whatever the layer: an all-gather counts its payload once per peer
that receives it (padded, as it travels), a point-to-point send once per destination.

``EmulatedLink`` (test and benchmark hook, ``STADI_EMULATE_LINK="GBPS,LATENCY_US"`` in the
worker's environment) makes every transfer take ``latency + bytes / bandwidth`` of a serial
link as well: a transfer's ``wait`` returns no sooner than that, so a slow interconnect (PCIe
without P2P, Ethernet) can be studied on one host without burning CPU in the wait.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import UnsupportedError, WorkerTimeout

LINK_ENV = "STADI_EMULATE_LINK"


class EmulatedLink:
    """A serial link of ``gbps`` GB/s and ``latency_s`` per message: when each transfer lands."""

    def __init__(self, gbps: float, latency_s: float):
        if not gbps > 0 or latency_s < 0:
            raise UnsupportedError(f"{LINK_ENV}: bandwidth must be > 0 GB/s and latency >= 0 (got {gbps}, {latency_s})")
        self.bytes_per_s = gbps * 1e9
        self.latency_s = latency_s
        self._free_at = 0.0

    def ready_at(self, nbytes: int) -> float:
        start = max(time.perf_counter(), self._free_at)
        self._free_at = start + self.latency_s + nbytes / self.bytes_per_s
        return self._free_at

    @classmethod
    def parse(cls, text: str) -> "EmulatedLink":
        """From 'GBPS,LATENCY_US', e.g. '1.25,50' for 10 GbE."""
        try:
            gbps, latency_us = (float(v) for v in text.split(","))
        except ValueError:
            raise UnsupportedError(f"emulated link {text!r}: expected 'GBPS,LATENCY_US', e.g. '1.25,50'") from None
        return cls(gbps, latency_us * 1e-6)

    @classmethod
    def from_env(cls) -> "EmulatedLink | None":
        text = os.environ.get(LINK_ENV, "").strip()
        return cls.parse(text) if text else None


class Transfer:
    """In-flight communication: torch.distributed works plus when an emulated link would land."""

    def __init__(self, works: Sequence, ready_at: float = 0.0):
        self.works = [w for w in works if w is not None]
        self.ready_at = ready_at

    def wait(self, timeout: timedelta) -> None:
        for work in self.works:
            try:
                ok = work.wait(timeout)
            except RuntimeError as exc:  # gloo raises on timeout or on a dead peer
                raise WorkerTimeout(f"context exchange with another rank failed: {exc}") from exc
            if ok is False:
                raise WorkerTimeout(f"context exchange did not finish within {timeout.total_seconds():.0f} s")
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class Link:
    """One band group's torch.distributed communication, with the bytes it moved."""

    def __init__(self, group, world_size: int, emulated: EmulatedLink | None = None):
        self.group = group
        self.world_size = world_size
        self.emulated = emulated
        self.sent: dict[str, int] = {}  # bytes per kind of context ("kv", "halo", "moments") since take_bytes()

    def take_bytes(self) -> dict[str, int]:
        sent, self.sent = self.sent, {}
        return sent

    def count(self, nbytes: int, kind: str) -> float:
        """Book ``nbytes`` of ``kind``; returns when an emulated link would have delivered them."""
        self.sent[kind] = self.sent.get(kind, 0) + nbytes
        return self.emulated.ready_at(nbytes) if self.emulated is not None else 0.0

    def all_gather(self, recv: list, send: torch.Tensor, timeout: timedelta, async_op: bool,
                   kind: str = "kv") -> Transfer | None:
        """Every rank's ``send`` into ``recv``; waited for here unless ``async_op``."""
        ready = self.count(send.numel() * send.element_size() * (self.world_size - 1), kind)
        work = dist.all_gather(recv, send, group=self.group, async_op=True)
        transfer = Transfer([work], ready)
        if async_op:
            return transfer
        transfer.wait(timeout)
        return None

    def exchange(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
                 kind: str = "kv") -> Transfer:
        """Point-to-point: each (group rank, tensor) of ``sends`` to that rank, each of ``recvs`` from it."""
        works, ready = [], 0.0
        for peer, buf in recvs:
            works.append(dist.irecv(buf, src=self._global(peer), group=self.group))
        for peer, tensor in sends:
            ready = max(ready, self.count(tensor.numel() * tensor.element_size(), kind))
            works.append(dist.isend(tensor, dst=self._global(peer), group=self.group))
        return Transfer(works, ready)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)
