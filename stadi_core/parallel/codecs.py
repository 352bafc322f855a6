"""Codecs for the context a rank sends at displaced sync steps (see ``options.ContextOptions.exchange``).

Displaced (stale-context) steps, as in DistriFusion, send every layer's K/V tokens ([B, N, C],
channel dim -1) and conv halo rows ([B, C, R, W], channel dim 1) while the next step computes. Those
bytes are the run's communication cost, and they are only used one step late, so they can be coded:

* ``Fp8Codec`` ("fp8"): float8 e4m3 with one float32 scale per channel. FastUSP quantises its
  collectives to FP8 the same way; it halves float16 traffic (quarters float32) for ~2**-4
  relative error per element.
* ``DeltaCodec`` ("delta"): consecutive steps' activations differ little, so send the change, quantised
  to 2/4/8 bits per value with per-channel scales, as CompactFusion does. Error feedback makes this
  safe: the change is taken against the *mirror* (the sender's copy of what receivers hold), so a
  step's rounding error is resent next step instead of piling up; receivers stay within half a
  quantisation step of the truth forever.
* ``XorDeltaCodec`` ("delta-lossless"): the change as the XOR of bit patterns. No bytes saved; it
  exercises the stateful (mirror) machinery with a bit-exact result, so tests can compare against raw.

Every payload is a contiguous 1-D uint8 tensor whose size is a pure function of (shape, dtype,
channel_dim): receivers allocate buffers before data arrives (all_gather, irecv).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PlanError
from .options import DELTA_BITS, EXCHANGES

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _cdim(ndim: int, channel_dim: int) -> int:
    if not -ndim <= channel_dim < ndim:
        raise ValueError(f"channel_dim {channel_dim} is out of range for a {ndim}-d payload")
    return channel_dim % ndim


def _bshape(ndim: int, cd: int, c: int) -> list[int]:
    """Shape that broadcasts per-channel values along channel dim ``cd``."""
    return [c if i == cd else 1 for i in range(ndim)]


def _channel_scale(v: Tensor, cd: int, qmax: float) -> Tensor:
    """float32 per-channel scale amax|v| / qmax, broadcastable against v; all-zero channels get 1."""
    if v.numel() == 0:
        return torch.ones(_bshape(v.dim(), cd, v.shape[cd]), dtype=torch.float32, device=v.device)
    dims = [i for i in range(v.dim()) if i != cd]
    amax = v.abs().amax(dim=dims, keepdim=True) if dims else v.abs()
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _scales_from(payload: Tensor, offset: int, ndim: int, cd: int, c: int) -> Tensor:
    """The float32 scales stored at payload[offset:] (copied: the slice may be misaligned for float32)."""
    return payload[offset:offset + 4 * c].clone().view(torch.float32).view(_bshape(ndim, cd, c))


def _bytes(t: Tensor) -> Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


class Codec:
    """Turns a tensor into a fixed-size uint8 payload and back (see the module docstring)."""

    name: str = "?"
    stateful: bool = False

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype, channel_dim: int) -> int:
        raise NotImplementedError

    def encode(self, x: Tensor, mirror: Tensor | None, channel_dim: int) -> Tensor:
        raise NotImplementedError

    def decode_into(self, payload: Tensor, held: Tensor, channel_dim: int) -> None:
        raise NotImplementedError

    def _check_mirror(self, x: Tensor, mirror: Tensor | None) -> Tensor:
        if mirror is None or mirror.shape != x.shape or mirror.dtype != x.dtype:
            raise ValueError(f"{self.name} codec needs a mirror shaped {tuple(x.shape)} {x.dtype}, "
                             f"got {None if mirror is None else (tuple(mirror.shape), mirror.dtype)}")
        return mirror

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Fp8Codec(Codec):
    """float8 e4m3fn values (scaled so each channel's amax maps to 448), then C float32 scales."""

    name = "fp8"

    def nbytes(self, shape, dtype, channel_dim):
        return math.prod(shape) + 4 * shape[_cdim(len(shape), channel_dim)]

    def encode(self, x, mirror, channel_dim):
        cd = _cdim(x.dim(), channel_dim)
        xf = x.float()
        scale = _channel_scale(xf, cd, FP8_MAX)
        # clamp: e4m3fn has no inf, and a value rounded past 448 would cast to NaN
        q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch.cat([_bytes(q), _bytes(scale)])

    def decode_into(self, payload, held, channel_dim):
        cd, n = _cdim(held.dim(), channel_dim), held.numel()
        scale = _scales_from(payload, n, held.dim(), cd, held.shape[cd])
        q = payload[:n].view(torch.float8_e4m3fn).view(held.shape)
        held.copy_(q.float() * scale)


class DeltaCodec(Codec):
    """x − mirror quantised to ``bits``-bit integers with per-channel scales, with error feedback.

    Layout: packed codes (code + qmax as an unsigned ``bits``-bit field, lowest bits first, 8/bits per
    byte; bits=8 stores int8), then C float32 scales. ``feedback=False`` is a deliberately broken
    variant (for tests): the mirror keeps the previous true value, so receivers drift.
    """

    name = "delta"
    stateful = True

    def __init__(self, bits: int = 4, feedback: bool = True):
        if bits not in DELTA_BITS:
            raise PlanError(f"delta_bits {bits!r} must be one of {DELTA_BITS}")
        self.bits, self.feedback = bits, feedback
        self.qmax = 2 ** (bits - 1) - 1
        self.per_byte = 8 // bits

    def __repr__(self) -> str:
        return f"DeltaCodec(bits={self.bits}, feedback={self.feedback})"

    def _code_bytes(self, numel: int) -> int:
        return -(-numel // self.per_byte)

    def nbytes(self, shape, dtype, channel_dim):
        return self._code_bytes(math.prod(shape)) + 4 * shape[_cdim(len(shape), channel_dim)]

    def encode(self, x, mirror, channel_dim):
        mirror = self._check_mirror(x, mirror)
        cd = _cdim(x.dim(), channel_dim)
        d = x.float() - mirror.float()
        scale = _channel_scale(d, cd, float(self.qmax))
        q = torch.round(d / scale).clamp_(-self.qmax, self.qmax).reshape(-1)
        if self.bits == 8:
            codes = q.to(torch.int8).view(torch.uint8)
        else:
            u = (q + self.qmax).to(torch.uint8)
            u = torch.cat([u, u.new_zeros((-u.numel()) % self.per_byte)]).view(-1, self.per_byte)
            codes = u[:, 0].clone()
            for i in range(1, self.per_byte):
                codes |= u[:, i] << (self.bits * i)
        payload = torch.cat([codes, _bytes(scale)])
        if self.feedback:
            self.decode_into(payload, mirror, channel_dim)  # the receivers' exact float ops
        else:
            mirror.copy_(x)
        return payload

    def decode_into(self, payload, held, channel_dim):
        cd, n = _cdim(held.dim(), channel_dim), held.numel()
        nb = self._code_bytes(n)
        scale = _scales_from(payload, nb, held.dim(), cd, held.shape[cd])
        codes = payload[:nb]
        if self.bits == 8:
            q = codes.view(torch.int8).float()
        else:
            shifts = torch.arange(self.per_byte, device=codes.device, dtype=torch.uint8) * self.bits
            u = (codes[:, None] >> shifts) & (2 ** self.bits - 1)
            q = u.reshape(-1)[:n].float() - self.qmax
        deq = q.view(held.shape) * scale
        held.add_(deq.to(held.dtype))


_INT_VIEW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


class XorDeltaCodec(Codec):
    """Bits of x XOR bits of mirror: lossless, same size as raw; receivers hold x bit for bit."""

    name = "delta-lossless"
    stateful = True

    def nbytes(self, shape, dtype, channel_dim):
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def encode(self, x, mirror, channel_dim):
        mirror = self._check_mirror(x, mirror)
        it = _INT_VIEW[x.element_size()]
        payload = _bytes(x.contiguous().view(it) ^ mirror.contiguous().view(it))
        self.decode_into(payload, mirror, channel_dim)
        return payload

    def decode_into(self, payload, held, channel_dim):
        it = _INT_VIEW[held.element_size()]
        if payload.storage_offset() % held.element_size():
            payload = payload.clone()  # a slice of a bigger buffer may be misaligned for int16/int32
        held.view(it).bitwise_xor_(payload.view(it).view(held.shape))


def make_codec(exchange: str, delta_bits: int = 4) -> Codec | None:
    """The codec for an ``exchange`` option value; None for "raw" (send the tensors as they are)."""
    if exchange == "raw":
        return None
    if exchange == "fp8":
        return Fp8Codec()
    if exchange == "delta":
        return DeltaCodec(int(delta_bits))
    if exchange == "delta-lossless":
        return XorDeltaCodec()
    raise PlanError(f"exchange {exchange!r} is not one of {', '.join(EXCHANGES)}")
