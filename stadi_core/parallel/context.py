"""The exchange manager shared by every patch-parallel layer of one rank.

Layers hand it their fresh local data and get back the whole image's context.
How fresh that context is depends on the phase of the current network call:

* ``FRESH``   – a blocking all-gather inside the layer: every band is current (exact
  mode, warmup, the first call after a plan change).
* ``REFRESH`` – displaced sync step: the layer gets the stored (stale) context of the
  other bands plus its own fresh data, and only records what it will send; the
  exchange starts in ``end_call`` after the forward and completes at the next sync
  step, writing into the stored buffers in place. The forward is then pure compute (it
  can be replayed from a CUDA graph), and a fast rank's stale steps overlap a slow
  rank's longer evaluation instead of waiting for it.
* ``STALE``   – displaced non-sync step: the stored context, no communication.

Context is kept per call slot: the n-th network call of a sampler step (``slot``) only ever
reads context stored by slot n of an earlier step, so a cond call and an uncond call that
ComfyUI sends apart (prompts of different lengths) never read each other's activations.

Stored buffers are allocated once per plan and updated in place (static addresses for
graph replay). So are the all-gather's send and receive buffers (``_Wire``): the send
buffer is a copy of the fresh tensor, because under CUDA graphs that tensor is a static
activation the next replay overwrites while an asynchronous collective (NCCL's or gloo's
own stream) may still be reading it. All-gathers are padded to the largest band and
trimmed, so bands may be unequal (distrifuser's flat buffer assumes equal slices).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import UnsupportedError, WorkerTimeout
from .geometry import band_sizes


class Phase(enum.Enum):
    FRESH = "fresh"
    REFRESH = "refresh"
    STALE = "stale"


@dataclass
class _Pending:
    """A fresh local tensor recorded in a REFRESH call, to be exchanged after the forward."""

    key: tuple
    local: torch.Tensor
    sizes: list
    dim: int


@dataclass
class _Wire:
    """One exchange key's all-gather buffers, allocated once per plan and reused every step.

    The padding rows of ``send`` are zeroed once; each exchange overwrites only the band's
    rows. A key's next exchange starts only after its previous one was waited for
    (``complete_inflight`` runs before every synchronous call), so reuse is race-free.
    """

    send: torch.Tensor
    recv: list

    def load(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        self.send.narrow(dim, 0, local.shape[dim]).copy_(local)
        return self.send


@dataclass
class CallStats:
    """What one network call spent waiting on other ranks."""

    comm_wait_s: float = 0.0
    exchanges: int = 0
    bytes_sent: int = 0


class BandContext:
    """Per-rank view of the band layout plus the context buffers of every layer."""

    def __init__(
        self,
        rows: Sequence[int],
        rank: int,
        group=None,
        timeout_s: float = 120.0,
        transport=None,
    ):
        self.rows = list(rows)
        self.rank = rank
        self.world_size = len(self.rows)
        self.group = group
        self.transport = transport  # CudaIpcTransport for ranks sharing a GPU; None: torch.distributed
        self.timeout = timedelta(seconds=timeout_s)
        self.phase = Phase.FRESH
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._wires: dict[tuple, _Wire] = {}  # all-gather send/receive buffers per exchange key
        self._pending: list[_Pending] = []
        self._inflight: dict[int, list] = {}  # per call slot: exchanges started at its last sync step
        self._calls_seen: dict[int, int] = {}
        self.stats = CallStats()
        self.generation = 0  # bumped whenever stored buffers are re-created
        self.local_only = False  # measure a band alone: no exchange, image-border context
        self.slot = 0  # which call of the sampler step this is (context is kept per slot)
        self.width = 0  # latent columns of the current call (sizes of a ragged last band)
        self.ragged_align = 0  # >0: bands start on this alignment and the last one may end off it
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")

    # -- lifecycle of one network call -------------------------------------------------
    def begin_call(self, phase: Phase, slot: int = 0, width: int = 0) -> None:
        if phase is not Phase.FRESH and not self._buffers and self.world_size > 1:
            raise RuntimeError("displaced context used before any synchronous step filled it")
        self.phase = phase
        self.slot = slot
        self.width = width
        self._calls_seen.clear()
        self.stats = CallStats()
        if phase is not Phase.STALE:
            self.complete_inflight(slot=slot)  # a sync step needs this slot's previous sync exchange

    def end_call(self) -> CallStats:
        """Start the exchanges a REFRESH call recorded; they complete at the next sync step.

        Deferring the wait lets a fast rank run its stale steps while a slow rank is still
        computing its (stride > 1) evaluation; the buffers change only at the next sync
        step, so the stale steps in between read a consistent snapshot.
        """
        if self._pending:
            t0 = time.perf_counter()
            self._inflight[self.slot] = self._launch(self._pending)
            self._pending = []
            self.stats.comm_wait_s += time.perf_counter() - t0
        return self.stats

    def complete_inflight(self, store: bool = True, slot: int | None = None) -> None:
        """Wait for the exchanges started at the last sync step and (unless discarding) store them.

        Only ``slot``'s when given: another slot's exchange lands at that slot's own next sync
        call, so each slot's stale steps read the same snapshot whatever the other slots do.
        """
        slots = [s for s in self._inflight if slot is None or s == slot]
        if not slots:
            return
        t0 = time.perf_counter()
        inflight = [entry for s in slots for entry in self._inflight.pop(s)]
        for p, gathered, work in inflight:
            if work is not None:
                _wait(work, self.timeout)
            if store:
                for dst, src in zip(self._buffers[p.key], _trim(gathered, p.sizes, p.dim)):
                    dst.copy_(src)
        self.stats.comm_wait_s += time.perf_counter() - t0

    def take_pending(self) -> list:
        """The exchanges a REFRESH call recorded (kept by a CUDA graph to re-issue after replays)."""
        pending, self._pending = self._pending, []
        return pending

    def _launch(self, pending: list) -> list:
        """Start an all-gather per recorded tensor: [(pending, gathered, work or None)]."""
        if self.transport is not None:  # CUDA IPC: synchronous, data already gathered
            sends = [(p.key, _padded(p.local, p.dim, max(p.sizes))) for p in pending]
            return [(p, g, None) for p, g in zip(pending, self.transport.all_gather_many(sends))]
        out = []
        for p in pending:
            gathered, work = self._all_gather(p.key, p.local, p.dim, p.sizes, async_op=True)
            out.append((p, gathered, work))
        return out

    def reset(self, rows: Sequence[int] | None = None, ragged_align: int = 0) -> None:
        """Start a new run: stored buffers survive only if the band layout is unchanged.

        Keeping them (a warmup step overwrites them in place) keeps their addresses, so
        CUDA graphs captured in an earlier run stay valid; ``generation`` tells when not.
        """
        self._pending = []
        self.complete_inflight(store=False)  # a new run starts with a synchronous step anyway
        self.ragged_align = ragged_align
        if rows is not None and list(rows) != self.rows:
            if len(rows) != self.world_size:
                raise ValueError("a re-plan cannot change the number of ranks")
            self.rows = list(rows)
            self._buffers.clear()
            self._wires.clear()
            self.generation += 1
            if self.transport is not None:
                self.transport.reset()

    # -- geometry ----------------------------------------------------------------------
    @property
    def row_start(self) -> int:
        """First latent row of our band in the whole image (for true positional ids)."""
        return sum(self.rows[: self.rank])

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def sizes_like(self, local_size: int, rows: int | None = None) -> list[int]:
        """Every rank's extent along a band-proportional dimension, from ours (geometry.band_sizes)."""
        return band_sizes(self.rows, self.rank, local_size, rows, self.ragged_align, self.width)

    # -- the one exchange primitive ------------------------------------------------------
    def exchange(self, layer_id: int, local: torch.Tensor, dim: int, sizes: Sequence[int]) -> list[torch.Tensor]:
        """All ranks' tensors along ``dim`` (rank order), ours always fresh."""
        if self.world_size == 1 or self.local_only:
            return [local]
        n = self._calls_seen.get(layer_id, 0)
        self._calls_seen[layer_id] = n + 1
        key = (self.slot, layer_id, n)
        if self.phase is Phase.FRESH:
            t0 = time.perf_counter()
            if self.transport is not None:
                gathered = self.transport.all_gather_many([(key, _padded(local, dim, max(sizes)))])[0]
            else:
                gathered = self._all_gather(key, local, dim, sizes, async_op=False)[0]
            self.stats.comm_wait_s += time.perf_counter() - t0
            parts = _trim(gathered, sizes, dim)
            stored = self._buffers.get(key)
            if stored is None or any(a.shape != b.shape for a, b in zip(stored, parts)):
                if stored is not None:
                    self.generation += 1
                self._buffers[key] = [p.clone() for p in parts]
            else:
                for dst, src in zip(stored, parts):
                    dst.copy_(src)
            return parts
        stored = self._buffers.get(key)
        if stored is None:
            raise RuntimeError(f"no stored context for layer {layer_id}: the displaced schedule is out of step")
        parts = list(stored)
        parts[self.rank] = local
        if self.phase is Phase.REFRESH:
            self._pending.append(_Pending(key, local, list(sizes), dim))
        return parts

    def _all_gather(self, key: tuple, local: torch.Tensor, dim: int, sizes: Sequence[int], async_op: bool):
        wire = self._wire(key, local, dim, max(sizes))
        send = wire.load(local.detach(), dim)
        self.stats.exchanges += 1
        self.stats.bytes_sent += send.numel() * send.element_size()
        work = dist.all_gather(wire.recv, send, group=self.group, async_op=async_op)
        return wire.recv, work

    def _wire(self, key: tuple, local: torch.Tensor, dim: int, size: int) -> _Wire:
        """The key's buffers; re-made only if the padded shape or dtype changed (a new plan)."""
        shape = list(local.shape)
        shape[dim] = size
        wire = self._wires.get(key)
        if wire is None or list(wire.send.shape) != shape or wire.send.dtype != local.dtype:
            send = local.new_zeros(shape)
            wire = _Wire(send, [torch.empty_like(send) for _ in range(self.world_size)])
            self._wires[key] = wire
        return wire

    # -- helpers the layers use ------------------------------------------------------------
    def halo(self, layer_id: int, x: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``pad`` above and below our band (zeros at the image border), from the neighbours."""
        if x.shape[2] < pad:
            raise UnsupportedError(f"band of {x.shape[2]} rows is thinner than a {pad}-row halo")
        zeros = x.new_zeros(x.shape[0], x.shape[1], pad, x.shape[3])
        if self.world_size == 1 or self.local_only:
            return zeros, zeros
        edge = torch.cat([x[:, :, :pad], x[:, :, -pad:]], dim=2)
        parts = self.exchange(layer_id, edge, 2, [2 * pad] * self.world_size)
        top = parts[self.rank - 1][:, :, pad:] if self.rank > 0 else zeros
        bottom = parts[self.rank + 1][:, :, :pad] if self.rank < self.world_size - 1 else zeros
        return top.to(x.dtype), bottom.to(x.dtype)

    def whole_tokens(self, layer_id: int, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Concatenate every band's tokens (row-major bands are contiguous token runs)."""
        if self.world_size == 1 or self.local_only:
            return tokens
        sizes = self.sizes_like(tokens.shape[dim])
        return torch.cat(self.exchange(layer_id, tokens, dim, sizes), dim=dim)

    def group_moments(self, layer_id: int, mean: torch.Tensor, m2: torch.Tensor, count: int, rows: int | None = None):
        """Global (mean, biased variance) per group from every band's local moments.

        Chan's parallel merge: each band contributes its count, mean and sum of squared
        deviations, so bands of different heights are weighted by their rows and the
        result equals the whole-image statistics up to float rounding.
        """
        if self.world_size == 1 or self.local_only:
            return mean, m2 / count
        parts = self.exchange(layer_id, torch.stack([mean, m2]), 0, [2] * self.world_size)
        counts = self.sizes_like(count, rows)
        total = float(sum(counts))
        # python-scalar weights: no host-to-device copy, so this is legal inside CUDA graph capture
        g_mean = sum(p[0] * (n / total) for p, n in zip(parts, counts))
        g_m2 = sum(p[1] + n * (p[0] - g_mean) ** 2 for p, n in zip(parts, counts))
        return g_mean, g_m2 / total


def _padded(local: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``local`` zero-padded along ``dim`` to ``size`` (all-gathers need equal shapes)."""
    send = local.detach()
    if send.shape[dim] != size:
        pad_shape = list(send.shape)
        pad_shape[dim] = size - send.shape[dim]
        send = torch.cat([send, send.new_zeros(pad_shape)], dim=dim)
    return send.contiguous()


def _trim(gathered: list[torch.Tensor], sizes: Sequence[int], dim: int) -> list[torch.Tensor]:
    return [g.narrow(dim, 0, s) for g, s in zip(gathered, sizes)]


def _wait(work, timeout: timedelta) -> None:
    try:
        ok = work.wait(timeout)
    except RuntimeError as exc:  # gloo raises on timeout or on a dead peer
        raise WorkerTimeout(f"context exchange with another rank failed: {exc}") from exc
    if ok is False:
        raise WorkerTimeout(f"context exchange did not finish within {timeout.total_seconds():.0f} s")
