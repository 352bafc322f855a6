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
from typing import Callable, Sequence

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
class _Summary:
    """A function of one exchange key's stored context, kept current as the stored context changes.

    Layers that need only a reduction of the other bands' context (GroupNorm: their moments)
    read this instead of recomputing it on every stale call; it is recomputed when a sync
    step stores new context, in place, so a CUDA graph that read it sees the new values.
    """

    fn: Callable  # fn(stored parts, *args) -> tuple of tensors
    args: tuple
    value: tuple | None = None

    def refresh(self, parts: list) -> tuple:
        new = tuple(self.fn(parts, *self.args))
        if self.value is None or any(a.shape != b.shape for a, b in zip(self.value, new)):
            self.value = new
        else:
            for dst, src in zip(self.value, new):
                dst.copy_(src)
        return self.value


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
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # per key: every band's part, views of _whole
        self._whole: dict[tuple, torch.Tensor] = {}  # per key: the parts as one tensor (whole-image tokens)
        self._summaries: dict[tuple, _Summary] = {}
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
                self._store(p.key, _trim(gathered, p.sizes, p.dim), p.dim)
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
            self._whole.clear()
            self._summaries.clear()
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

    @property
    def sending(self) -> bool:
        """Whether this call sends our fresh data: a FRESH or REFRESH call of a real multi-band layout.

        A STALE call sends nothing, so layers skip building what they would send."""
        return self.world_size > 1 and not self.local_only and self.phase is not Phase.STALE

    # -- the one exchange primitive ------------------------------------------------------
    def exchange(self, layer_id: int, local: torch.Tensor | None, dim: int, sizes: Sequence[int]) -> list:
        """All ranks' tensors along ``dim`` (rank order), ours always fresh.

        ``local`` may be None in a STALE call (nothing is sent; our entry is then None)."""
        if self.world_size == 1 or self.local_only:
            return [local]
        return self._exchange(self._next_key(layer_id), local, dim, sizes)

    def _next_key(self, layer_id: int) -> tuple:
        """(slot, layer, n): the n-th exchange of this layer in this call, of this call slot."""
        n = self._calls_seen.get(layer_id, 0)
        self._calls_seen[layer_id] = n + 1
        return (self.slot, layer_id, n)

    def _exchange(self, key: tuple, local: torch.Tensor | None, dim: int, sizes: Sequence[int]) -> list:
        if self.phase is Phase.FRESH:
            t0 = time.perf_counter()
            if self.transport is not None:
                gathered = self.transport.all_gather_many([(key, _padded(local, dim, max(sizes)))])[0]
            else:
                gathered = self._all_gather(key, local, dim, sizes, async_op=False)[0]
            self.stats.comm_wait_s += time.perf_counter() - t0
            return self._store(key, _trim(gathered, sizes, dim), dim)
        stored = self._buffers.get(key)
        if stored is None:
            raise RuntimeError(f"no stored context for {key}: the displaced schedule is out of step")
        parts = list(stored)
        parts[self.rank] = local
        if self.phase is Phase.REFRESH:
            self._pending.append(_Pending(key, local, list(sizes), dim))
        return parts

    def _store(self, key: tuple, parts: list, dim: int) -> list:
        """Keep a key's fresh context: in place (static addresses) unless its shapes changed."""
        stored = self._buffers.get(key)
        if stored is None or any(a.shape != b.shape for a, b in zip(stored, parts)):
            if stored is not None:
                self.generation += 1
            whole = torch.cat(parts, dim=dim)
            self._whole[key] = whole
            stored = self._buffers[key] = list(whole.split([p.shape[dim] for p in parts], dim=dim))
        else:
            torch.cat(parts, dim=dim, out=self._whole[key])
        summary = self._summaries.get(key)
        if summary is not None and summary.value is not None:  # in use by displaced calls: keep it current
            summary.refresh(stored)
        return stored

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

    # -- what the layers ask for -----------------------------------------------------------
    def halo(self, layer_id: int, x: torch.Tensor, pad: int) -> tuple:
        """Rows ``pad`` above and below our band from the neighbours: views of the received or stored
        context, None at the image border (where the conv's zero padding applies)."""
        if x.shape[2] < pad:
            raise UnsupportedError(f"band of {x.shape[2]} rows is thinner than a {pad}-row halo")
        if self.world_size == 1 or self.local_only:
            return None, None
        edge = torch.cat([x[:, :, :pad], x[:, :, -pad:]], dim=2) if self.sending else None
        parts = self.exchange(layer_id, edge, 2, [2 * pad] * self.world_size)
        top = parts[self.rank - 1].narrow(2, pad, pad) if self.rank > 0 else None
        bottom = parts[self.rank + 1].narrow(2, 0, pad) if self.rank < self.world_size - 1 else None
        return top, bottom

    def whole_tokens(self, layer_id: int, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every band's tokens as one tensor (row-major bands are contiguous token runs).

        The stored context is kept as that tensor, so a displaced call writes only its own run
        into it, and no call concatenates the whole image's tokens. The returned tensor is that
        buffer: read it in this call, do not keep it."""
        if self.world_size == 1 or self.local_only:
            return tokens
        sizes = self.sizes_like(tokens.shape[dim])
        key = self._next_key(layer_id)
        self._exchange(key, tokens, dim, sizes)
        whole = self._whole[key]
        if self.phase is not Phase.FRESH:
            whole.narrow(dim, sum(sizes[: self.rank]), sizes[self.rank]).copy_(tokens)
        return whole

    def summarised(self, layer_id: int, local: torch.Tensor | None, dim: int, sizes: Sequence[int],
                   summarise: Callable, args: tuple = ()) -> tuple:
        """(parts, None) in a FRESH call; (None, summary) in a displaced one.

        ``summary`` = ``summarise(stored parts, *args)``, recomputed only when the stored context
        changes (each sync step) instead of on every stale call. ``local`` may be None in STALE."""
        if self.world_size == 1 or self.local_only:
            return [local], None
        key = self._next_key(layer_id)
        parts = self._exchange(key, local, dim, sizes)
        summary = self._summaries.get(key)
        if summary is None or summary.fn is not summarise or summary.args != args:
            summary = self._summaries[key] = _Summary(summarise, args)
        if self.phase is Phase.FRESH:
            return parts, None
        if summary.value is None:  # first displaced call since the context was stored
            summary.refresh(self._buffers[key])
        return None, summary.value


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
