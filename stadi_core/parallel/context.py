"""The exchange manager shared by every patch-parallel layer of one rank.

Layers hand it their fresh local data and get back the whole image's context.
How fresh that context is depends on the phase of the current network call:

* ``FRESH``   – a blocking all-gather inside the layer: every band is current (exact
  mode, warmup, the first call after a plan change). Always full and uncompressed.
* ``REFRESH`` – displaced sync step: the layer gets the stored (stale) context of the
  other bands plus its own fresh data, and sends its fresh data for the next sync step.
  With overlap (``ContextOptions.overlap``, eager calls) each layer's exchange starts
  right there and is waited for only when the next sync call's same layer needs it, so
  it runs behind a whole step of compute. Otherwise (CUDA graphs, torch.compile, overlap
  off) the call only records what it will send; the exchanges start in ``end_call`` and
  complete when the next sync call begins, and the forward stays pure compute (it can be
  replayed from a CUDA graph). Either way a fast rank's stale steps overlap a slow rank's
  longer evaluation instead of waiting for it, and the data stored is the same.
* ``STALE``   – displaced non-sync step: the stored context, no communication.

What a REFRESH sends follows the plan's ``ContextOptions``: all of the band (all-gather)
or, with partial context, the nearest rows of its attention K/V to each adjacent band
only (point-to-point; conv halos always go that way: only the neighbours read them);
raw, or coded (parallel/codecs.py: fp8, delta with error feedback).
The wire itself (byte counts, deadlines, an emulated slow link) is parallel/links.py.

Context is kept per call slot: the n-th network call of a sampler step (``slot``) only ever
reads context stored by slot n of an earlier step, so a cond call and an uncond call that
ComfyUI sends apart (prompts of different lengths) never read each other's activations.

Stored buffers are allocated once per plan and updated in place (static addresses for
graph replay). So are the all-gather's send and receive buffers (``exchange_parts.Wire``): the send
buffer is a copy of the fresh tensor, because under CUDA graphs that tensor is a static
activation the next replay overwrites while an asynchronous collective (NCCL's or gloo's
own stream) may still be reading it. All-gathers are padded to the largest band and
trimmed, so bands may be unequal (distrifuser's flat buffer assumes equal slices).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Sequence

import torch

from ..errors import UnsupportedError
from .codecs import make_codec
from .geometry import band_sizes, near_sizes, row_tokens
from .exchange_parts import Flight, Mirrors, Pending, Summary, Wire, decode, padded, trim, with_size
from .links import EmulatedLink, Link
from .options import ContextOptions


class Phase(enum.Enum):
    FRESH = "fresh"
    REFRESH = "refresh"
    STALE = "stale"


@dataclass
class CallStats:
    """What one network call spent waiting on other ranks."""

    comm_wait_s: float = 0.0
    exchanges: int = 0
    sent: dict = field(default_factory=dict)  # bytes put on the wire per kind: "kv", "halo", "moments"


class BandContext:
    """Per-rank view of the band layout plus the context buffers of every layer."""

    def __init__(
        self,
        rows: Sequence[int],
        rank: int,
        group=None,
        timeout_s: float = 120.0,
        transport=None,
        options: ContextOptions | None = None,
    ):
        self.rows = list(rows)
        self.rank = rank
        self.world_size = len(self.rows)
        self.group = group
        self.transport = transport  # CudaIpcTransport for ranks sharing a GPU; None: torch.distributed
        self.link = Link(group, self.world_size, EmulatedLink.from_env())
        self.timeout = timedelta(seconds=timeout_s)
        self.phase = Phase.FRESH
        self.options = ContextOptions()
        self._codec = None
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # per key: every band's part, views of _whole
        self._whole: dict[tuple, torch.Tensor] = {}  # per key: the parts as one tensor (whole-image tokens)
        self._summaries: dict[tuple, Summary] = {}
        self._wires: dict[tuple, Wire] = {}  # all-gather send/receive buffers per exchange key
        self._mirrors = Mirrors()  # delta codecs: what the receivers hold of our data
        self._pending: list[Pending] = []
        self._inflight: dict[int, dict[tuple, Flight]] = {}  # per call slot: exchanges of its last sync step
        self._launched: dict[tuple, Flight] = {}  # overlapped: started during this call
        self.lazy = False  # this call starts exchanges in the layers and waits for them at their next use
        self._calls_seen: dict[int, int] = {}
        self.stats = CallStats()
        self.generation = 0  # bumped whenever stored buffers are re-created
        self.local_only = False  # measure a band alone: no exchange, image-border context
        self.slot = 0  # which call of the sampler step this is (context is kept per slot)
        self.width = 0  # latent columns of the current call (sizes of a ragged last band)
        self.ragged_align = 0  # >0: bands start on this alignment and the last one may end off it
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        if options is not None:
            self.set_options(options)

    def set_options(self, options: ContextOptions) -> None:
        """How displaced calls exchange from now on; a change forgets the coders' state."""
        options = ContextOptions.from_dict(options)
        if options == self.options:
            return
        if self.transport is not None and not options.is_default:
            raise UnsupportedError(f"context '{options.label()}' needs torch.distributed between the ranks; workers "
                                   "sharing one GPU exchange through CUDA IPC: use context full")
        self.complete_inflight(store=False)
        self.options = options
        self._codec = make_codec(options.exchange, options.delta_bits)
        self._mirrors.clear()

    # -- lifecycle of one network call -------------------------------------------------
    def begin_call(self, phase: Phase, slot: int = 0, width: int = 0, overlap: bool = False) -> None:
        """Start a network call. ``overlap``: the caller runs the layers eagerly, so a REFRESH call may
        start each exchange inside its layer (``ContextOptions.overlap``); graph replays and compiled
        calls pass False and keep the forward free of communication."""
        if phase is not Phase.FRESH and not self._buffers and self.world_size > 1:
            raise RuntimeError("displaced context used before any synchronous step filled it")
        self.phase = phase
        self.slot = slot
        self.width = width
        self._calls_seen.clear()
        self.stats = CallStats()
        self.link.take_bytes()
        self.lazy = (overlap and self.options.overlap and phase is Phase.REFRESH and self.world_size > 1
                     and not self.local_only and self.transport is None)
        if phase is not Phase.STALE and not self.lazy:
            self.complete_inflight(slot=slot)  # a sync step needs this slot's previous sync exchange

    def end_call(self) -> CallStats:
        """Start the exchanges a deferred REFRESH call recorded (overlapped ones already run); they
        complete at the next sync step.

        Deferring the wait lets a fast rank run its stale steps while a slow rank is still
        computing its (stride > 1) evaluation; the buffers change only at the next sync
        step, so the stale steps in between read a consistent snapshot.
        """
        if self.lazy:
            for flight in self._inflight.pop(self.slot, {}).values():  # keys this call did not reach
                self._land(flight)
            if self._launched:
                self._inflight[self.slot] = self._launched
            self._launched = {}
            self.lazy = False
        elif self._pending:
            self._inflight[self.slot] = {p.key: self._launch(p) for p in self._pending}
            self._pending = []
        for kind, n in self.link.take_bytes().items():
            self.stats.sent[kind] = self.stats.sent.get(kind, 0) + n
        return self.stats

    def complete_inflight(self, store: bool = True, slot: int | None = None) -> None:
        """Wait for the exchanges started at the last sync step and (unless discarding) store them.

        Only ``slot``'s when given: another slot's exchange lands at that slot's own next sync
        call, so each slot's stale steps read the same snapshot whatever the other slots do.
        """
        slots = [s for s in self._inflight if slot is None or s == slot]
        flights = [f for s in slots for f in self._inflight.pop(s).values()]
        for flight in flights:
            self._land(flight, store)

    def take_pending(self) -> list:
        """The exchanges a REFRESH call recorded (kept by a CUDA graph to re-issue after replays)."""
        pending, self._pending = self._pending, []
        return pending

    def reset(self, rows: Sequence[int] | None = None, ragged_align: int = 0,
              options: ContextOptions | None = None) -> None:
        """Start a new run: stored buffers survive only if the band layout is unchanged.

        Keeping them (a warmup step overwrites them in place) keeps their addresses, so
        CUDA graphs captured in an earlier run stay valid; ``generation`` tells when not.
        """
        self._pending = []
        for flight in self._launched.values():  # a call that ended early (an error) left these on the wire
            self._land(flight, store=False)
        self._launched = {}
        self.lazy = False
        self.complete_inflight(store=False)  # a new run starts with a synchronous step anyway
        self.ragged_align = ragged_align
        if options is not None:
            self.set_options(options)
        if rows is not None and list(rows) != self.rows:
            if len(rows) != self.world_size:
                raise ValueError("a re-plan cannot change the number of ranks")
            self.rows = list(rows)
            self._buffers.clear()
            self._whole.clear()
            self._summaries.clear()
            self._wires.clear()
            self._mirrors.clear()
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

    def _near(self, sizes: Sequence[int]) -> list[int]:
        """Partial context: each band's tokens an adjacent band attends to (geometry.near_sizes)."""
        return near_sizes(sizes, self.options.portion, row_tokens(self.total_rows, self.width, sum(sizes)))

    # -- the one exchange primitive ------------------------------------------------------
    def exchange(self, layer_id: int, local: torch.Tensor | None, dim: int, sizes: Sequence[int],
                 coded: bool = False, channel: int = 1, kind: str = "other") -> list:
        """All ranks' tensors along ``dim`` (rank order), ours always fresh.

        ``local`` may be None in a STALE call (nothing is sent; our entry is then None).
        ``coded``: a displaced sync call may send it compressed (ContextOptions.exchange), with
        per-``channel`` scales. ``kind`` names it in the byte counts; "halo" (``local`` = a band's
        [top; bottom] edge rows) is sent to the adjacent bands only in displaced calls."""
        if self.world_size == 1 or self.local_only:
            return [local]
        return self._exchange(self._next_key(layer_id), local, dim, sizes, coded, channel=channel, kind=kind)

    def _next_key(self, layer_id: int) -> tuple:
        """(slot, layer, n): the n-th exchange of this layer in this call, of this call slot."""
        n = self._calls_seen.get(layer_id, 0)
        self._calls_seen[layer_id] = n + 1
        return (self.slot, layer_id, n)

    def _exchange(self, key: tuple, local: torch.Tensor | None, dim: int, sizes: Sequence[int],
                  coded: bool = False, partial: bool = False, channel: int = -1, kind: str = "kv") -> list:
        if self.phase is Phase.FRESH:
            t0 = time.perf_counter()
            if self.transport is not None:
                gathered = self._ipc_gather(key, local, dim, sizes, kind)
            else:
                gathered = self._all_gather(key, local, dim, sizes, async_op=False, kind=kind)[0]
            self.stats.comm_wait_s += time.perf_counter() - t0
            if coded and self._codec is not None and self._codec.stateful:  # what every receiver now holds
                self._mirrors.sent_fresh(key, local)
            return self._store(key, trim(gathered, sizes, dim), dim)
        if self.lazy:
            self._settle(key)
        stored = self._buffers.get(key)
        if stored is None:
            raise RuntimeError(f"no stored context for {key}: the displaced schedule is out of step")
        parts = list(stored)
        parts[self.rank] = local
        if self.phase is Phase.REFRESH:
            pieces = partial or (kind == "halo" and self.transport is None)
            self._send(Pending(key, local, list(sizes), dim, coded, pieces, channel, kind))
        return parts

    def _send(self, pending: Pending) -> None:
        if self.lazy:
            self._launched[pending.key] = self._launch(pending)
        else:
            self._pending.append(pending)

    def _settle(self, key: tuple) -> None:
        """Overlapped call: land this key's exchange from the last sync step before reading it."""
        flight = self._inflight.get(self.slot, {}).pop(key, None)
        if flight is not None:
            self._land(flight)

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
        self._stored_changed(key)
        return stored

    def _stored_changed(self, key: tuple) -> None:
        summary = self._summaries.get(key)
        if summary is not None and summary.value is not None:  # in use by displaced calls: keep it current
            summary.refresh(self._buffers[key])

    # -- the wire: launching and landing a REFRESH exchange --------------------------------
    def _launch(self, p: Pending) -> Flight:
        codec = self._codec if p.coded else None
        if self.transport is not None:  # CUDA IPC: synchronous, data already gathered
            return Flight(p, "gather", None, self._ipc_gather(p.key, p.local, p.dim, p.sizes, p.kind))
        if p.pieces:
            return self._launch_pieces(p, codec)
        if codec is None:
            recv, transfer = self._all_gather(p.key, p.local, p.dim, p.sizes, async_op=True, kind=p.kind)
            return Flight(p, "gather", transfer, recv)
        local = p.local.detach()
        shapes = [with_size(local.shape, p.dim, n) for n in p.sizes]
        nbytes = [codec.nbytes(sh, local.dtype, p.channel) for sh in shapes]
        payload = codec.encode(local, self._mirrors.get(p.key, "all", local) if codec.stateful else None, p.channel)
        recv, transfer = self._all_gather((p.key, "coded"), payload, 0, [max(nbytes)], async_op=True, kind=p.kind)
        return Flight(p, "coded", transfer, [r[:n] for r, n in zip(recv, nbytes)])

    def _launch_pieces(self, p: Pending, codec) -> Flight:
        """Our rows nearest each adjacent band to that band only; theirs into our stored context.

        K/V under partial context: the nearest ``portion`` of the band's rows. Conv halos: a
        band's [top; bottom] edge rows, the top half to the band above, the bottom to the one below."""
        local, dim, sizes, r = p.local.detach(), p.dim, p.sizes, self.rank
        near = self._near(sizes) if p.kind == "kv" else [s // 2 for s in sizes]
        stored = self._buffers[p.key]
        sends, recvs = [], []
        for peer in (r - 1, r + 1):
            if not 0 <= peer < self.world_size:
                continue
            first = 0 if peer < r else sizes[r] - near[r]
            mine = local.narrow(dim, first, near[r])
            theirs = stored[peer].narrow(dim, sizes[peer] - near[peer] if peer < r else 0, near[peer])
            if codec is None:  # a copy: the tensor may be a graph's static activation, overwritten before it lands
                sends.append((peer, mine.clone(memory_format=torch.contiguous_format)))
                buf = torch.empty(theirs.shape, dtype=theirs.dtype, device=theirs.device)
            else:
                mirror = self._mirrors.get(p.key, peer, mine, dim, first) if codec.stateful else None
                sends.append((peer, codec.encode(mine.contiguous(), mirror, p.channel)))
                buf = torch.empty(codec.nbytes(theirs.shape, theirs.dtype, p.channel), dtype=torch.uint8,
                                  device=theirs.device)
            recvs.append((peer, buf, theirs))
        self.stats.exchanges += 1
        transfer = self._send_pieces(sends, [(peer, buf) for peer, buf, _ in recvs], p.kind)
        return Flight(p, "pieces", transfer, [(buf, region) for _, buf, region in recvs])

    def _send_pieces(self, sends: list, recvs: list, kind: str):
        """Point-to-point sends and receives on the wire (a one-process stand-in overrides this)."""
        return self.link.exchange(sends, recvs, kind)

    def _land(self, flight: Flight, store: bool = True) -> None:
        """Wait for a flight and, unless discarding, write what arrived into the stored context.

        Only the wait counts as communication (CallStats.comm_wait_s: the exposed part); decoding
        is compute."""
        if flight.transfer is not None:
            t0 = time.perf_counter()
            flight.transfer.wait(self.timeout)
            self.stats.comm_wait_s += time.perf_counter() - t0
        if not store:
            return
        p = flight.pending
        if flight.kind == "gather":
            self._store(p.key, trim(flight.recv, p.sizes, p.dim), p.dim)
            return
        codec = self._codec if p.coded else None
        if flight.kind == "pieces":
            for buf, region in flight.recv:
                if codec is None:
                    region.copy_(buf)
                else:
                    decode(codec, buf, region, p.channel)
            return
        stored = self._buffers[p.key]
        for o, payload in enumerate(flight.recv):
            if o != self.rank:
                decode(codec, payload, stored[o], p.channel)
        self._stored_changed(p.key)

    def _ipc_gather(self, key: tuple, local: torch.Tensor, dim: int, sizes: Sequence[int], kind: str) -> list:
        """Every rank's tensor through CUDA IPC (synchronous), padded to the largest band, counted."""
        send = padded(local, dim, max(sizes))
        self.link.count(send.numel() * send.element_size() * (self.world_size - 1), kind)
        return self.transport.all_gather_many([(key, send)])[0]

    def _all_gather(self, key: tuple, local: torch.Tensor, dim: int, sizes: Sequence[int], async_op: bool,
                    kind: str = "kv"):
        wire = self._wire(key, local, dim, max(sizes))
        send = wire.load(local.detach(), dim)
        self.stats.exchanges += 1
        transfer = self.link.all_gather(wire.recv, send, self.timeout, async_op=async_op, kind=kind)
        return wire.recv, transfer

    def _wire(self, key: tuple, local: torch.Tensor, dim: int, size: int) -> Wire:
        """The key's buffers; re-made only if the padded shape or dtype changed (a new plan)."""
        shape = list(local.shape)
        shape[dim] = size
        wire = self._wires.get(key)
        if wire is None or list(wire.send.shape) != shape or wire.send.dtype != local.dtype:
            send = local.new_zeros(shape)
            wire = Wire(send, [torch.empty_like(send) for _ in range(self.world_size)])
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
        parts = self.exchange(layer_id, edge, 2, [2 * pad] * self.world_size, coded=True, channel=1, kind="halo")
        top = parts[self.rank - 1].narrow(2, pad, pad) if self.rank > 0 else None
        bottom = parts[self.rank + 1].narrow(2, 0, pad) if self.rank < self.world_size - 1 else None
        return top, bottom

    def whole_tokens(self, layer_id: int, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every band's tokens as one tensor (row-major bands are contiguous token runs).

        The stored context is kept as that tensor, so a displaced call writes only its own run
        into it, and no call concatenates the whole image's tokens. The returned tensor is that
        buffer: read it in this call, do not keep it. Under partial context a displaced call gets
        the run from the nearest rows of the band above to the nearest rows of the band below."""
        if self.world_size == 1 or self.local_only:
            return tokens
        sizes = self.sizes_like(tokens.shape[dim])
        key = self._next_key(layer_id)
        partial = self.options.partial and self.phase is not Phase.FRESH
        self._exchange(key, tokens, dim, sizes, coded=True, partial=partial, channel=tokens.dim() - 1, kind="kv")
        whole = self._whole[key]
        start = sum(sizes[: self.rank])
        if self.phase is not Phase.FRESH:
            whole.narrow(dim, start, sizes[self.rank]).copy_(tokens)
        if not partial:
            return whole
        near = self._near(sizes)
        lo = start - (near[self.rank - 1] if self.rank > 0 else 0)
        hi = start + sizes[self.rank] + (near[self.rank + 1] if self.rank < self.world_size - 1 else 0)
        return whole.narrow(dim, lo, hi - lo)

    def summarised(self, layer_id: int, local: torch.Tensor | None, dim: int, sizes: Sequence[int],
                   summarise: Callable, args: tuple = ()) -> tuple:
        """(parts, None) in a FRESH call; (None, summary) in a displaced one.

        ``summary`` = ``summarise(stored parts, *args)``, recomputed only when the stored context
        changes (each sync step) instead of on every stale call. ``local`` may be None in STALE."""
        if self.world_size == 1 or self.local_only:
            return [local], None
        key = self._next_key(layer_id)
        parts = self._exchange(key, local, dim, sizes, kind="moments")
        summary = self._summaries.get(key)
        if summary is None or summary.fn is not summarise or summary.args != args:
            summary = self._summaries[key] = Summary(summarise, args)
        if self.phase is Phase.FRESH:
            return parts, None
        if summary.value is None:  # first displaced call since the context was stored
            summary.refresh(self._buffers[key])
        return None, summary.value


