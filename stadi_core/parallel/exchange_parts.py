"""The pieces of a context exchange that are plain data: what is sent, what is on the wire,
where it lands, and the sender's copy of what receivers hold (codecs with state).

context.py drives them through a network call's phases; this module holds no lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .links import Transfer


@dataclass
class Pending:
    """A fresh local tensor a REFRESH call sends for the next sync step."""

    key: tuple
    local: torch.Tensor
    sizes: list
    dim: int
    coded: bool = False  # may be compressed (K/V, halos; never GroupNorm moments)
    pieces: bool = False  # sent point-to-point, to the adjacent bands only (conv halos; K/V under partial context)
    channel: int = -1  # the channel dim of ``local`` (per-channel codec scales)
    kind: str = "kv"  # what it is, for the byte counts: "kv", "halo", "moments"


@dataclass
class Flight:
    """One key's exchange on the wire: what lands where once ``transfer`` completes.

    ``kind``: "gather" (raw all-gather into ``recv``), "coded" (all-gathered codec payloads) or
    "pieces" (point-to-point: ``recv`` holds (payload buffer, region of the stored context))."""

    pending: Pending
    kind: str
    transfer: Transfer | None
    recv: list


@dataclass
class Wire:
    """One exchange key's all-gather buffers, allocated once per plan and reused every step.

    The padding rows of ``send`` are zeroed once; each exchange overwrites only the band's
    rows. A key's next exchange starts only after its previous one has landed (when the next
    sync call begins, or, overlapped, at that key's own next use), so reuse is race-free.
    """

    send: torch.Tensor
    recv: list

    def load(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        self.send.narrow(dim, 0, local.shape[dim]).copy_(local)
        return self.send


@dataclass
class Summary:
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


class Mirrors:
    """Stateful codecs (delta): per payload, our copy of what its receivers hold of our data.

    It starts from what the last FRESH call sent (the receivers stored that exactly) and the
    codec keeps it equal to the receivers' copy bit for bit (parallel/codecs.py)."""

    def __init__(self):
        self._copies: dict[tuple, torch.Tensor] = {}  # (key, peer or "all")
        self._sent: dict[tuple, torch.Tensor] = {}  # per key: our part as the last FRESH call sent it

    def clear(self) -> None:
        self._copies.clear()
        self._sent.clear()

    def sent_fresh(self, key: tuple, local: torch.Tensor) -> None:
        """A FRESH call sent ``local`` whole: every receiver's copy is exact again."""
        self._sent[key] = local.detach().clone()
        self._copies = {k: v for k, v in self._copies.items() if k[0] != key}

    def get(self, key: tuple, peer, like: torch.Tensor, dim: int = 0, start: int = 0) -> torch.Tensor:
        """The copy for a payload of ``like``'s shape: rows from ``start`` along ``dim`` of our part."""
        copy = self._copies.get((key, peer))
        if copy is None:
            base = self._sent.get(key)
            if base is None:
                raise RuntimeError(f"no synchronous exchange of {key} to take deltas from")
            copy = self._copies[(key, peer)] = base.narrow(dim, start, like.shape[dim]).clone()
        return copy


def padded(local: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``local`` zero-padded along ``dim`` to ``size`` (all-gathers need equal shapes)."""
    send = local.detach()
    if send.shape[dim] != size:
        pad_shape = list(send.shape)
        pad_shape[dim] = size - send.shape[dim]
        send = torch.cat([send, send.new_zeros(pad_shape)], dim=dim)
    return send.contiguous()


def trim(gathered: list[torch.Tensor], sizes: Sequence[int], dim: int) -> list[torch.Tensor]:
    return [g.narrow(dim, 0, s) for g, s in zip(gathered, sizes)]


def with_size(shape, dim: int, n: int) -> list[int]:
    out = list(shape)
    out[dim] = n
    return out


def decode(codec, payload: torch.Tensor, held: torch.Tensor, channel: int) -> None:
    """Decode into a stored view; a non-contiguous view goes through a contiguous copy."""
    if held.is_contiguous():
        codec.decode_into(payload, held, channel)
        return
    tmp = held.contiguous()
    codec.decode_into(payload, tmp, channel)
    held.copy_(tmp)
