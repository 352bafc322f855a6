"""Displaced-context codecs (stadi_core.parallel.codecs): payload sizes, fp8 error, delta error feedback."""

import pytest
import torch

from stadi_core.errors import PlanError
from stadi_core.parallel.codecs import DeltaCodec, Fp8Codec, XorDeltaCodec, make_codec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODECS = (Fp8Codec(), DeltaCodec(2), DeltaCodec(4), DeltaCodec(8), XorDeltaCodec())
# K/V tokens [B, N, C] (channel -1) and halo rows [B, C, R, W] (channel 1); odd sizes so that neither
# numel nor C is a multiple of 8/bits
SHAPES = (((2, 7, 5), -1), ((1, 3, 1, 5), 1), ((2, 64, 40), -1), ((2, 320, 2, 128), 1), ((3, 1, 1), 1))


def _scales(payload, shape, channel_dim):
    c = shape[channel_dim]
    return payload[-4 * c:].clone().view(torch.float32)


def _per_channel(t, channel_dim):
    """t (any shape) as [C, everything else]."""
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channel_dim", SHAPES)
def test_nbytes_matches_encoded_size(codec, dtype, shape, channel_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    mirror = torch.randn(shape, generator=g).to(dtype) if codec.stateful else None
    held = mirror.clone() if codec.stateful else torch.empty_like(x)
    payload = codec.encode(x, mirror, channel_dim)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    assert payload.numel() == codec.nbytes(shape, dtype, channel_dim)
    codec.decode_into(payload, held, channel_dim)  # decodes at that size, into the right shape
    assert torch.isfinite(held.float()).all()
    if codec.stateful:
        assert torch.equal(held, mirror)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channel_dim", (((2, 50, 33), -1), ((2, 13, 3, 17), 1)))
def test_fp8_roundtrip_error_per_channel(dtype, shape, channel_dim):
    # e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most half an ulp, 2**-4 of the value, and
    # the per-channel scale maps the channel's amax to 448 (subnormals below 2**-6 * scale err by at
    # most 2**-10 * scale, far less). So |x - x'| <= 2**-4 * amax; we assert 2**-3 * amax, leaving
    # room for the float16/bfloat16 rounding of the decoded value, and that the error is not zero.
    g = torch.Generator().manual_seed(1)
    # channels of very different magnitudes, so one shared scale would fail the per-channel bound
    mags = torch.logspace(-4, 3, shape[channel_dim])
    x = torch.randn(shape, generator=g) * mags.view([-1 if i == channel_dim % len(shape) else 1
                                                    for i in range(len(shape))])
    x = x.to(dtype)
    codec = Fp8Codec()
    held = torch.empty_like(x)
    codec.decode_into(codec.encode(x, None, channel_dim), held, channel_dim)
    err = _per_channel((held.float() - x.float()).abs(), channel_dim).amax(1)
    amax = _per_channel(x.float().abs(), channel_dim).amax(1)
    assert (err <= 2 ** -3 * amax).all(), (err / amax).max()
    assert (err > 0).any()

    zero = torch.zeros(shape, dtype=dtype)
    held = torch.full_like(zero, 7.0)
    payload = codec.encode(zero, None, channel_dim)
    assert torch.equal(_scales(payload, shape, channel_dim), torch.ones(shape[channel_dim]))
    codec.decode_into(payload, held, channel_dim)
    assert torch.equal(held, zero)


def _drift(steps, shape=(2, 64, 32), seed=2):
    """x_t = x_{t-1} + small noise + a slow per-element trend (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    trend = 0.02 * torch.randn(shape, generator=g)
    out = [x]
    for _ in range(steps):
        x = x + 0.01 * torch.randn(shape, generator=g) + trend
        out.append(x)
    return out


def _run_delta(codec, channel_dim, steps=50):
    """Send every step of a drift through codec; returns [(x_t, mirror_t, held_t, scale_t)]."""
    xs = _drift(steps)
    mirror, held = xs[0].clone(), xs[0].clone()  # both sides start from the same x_0
    trace = []
    for x in xs[1:]:
        payload = codec.encode(x, mirror, channel_dim)
        assert payload.numel() == codec.nbytes(x.shape, x.dtype, channel_dim)
        codec.decode_into(payload, held, channel_dim)
        scale = _scales(payload, x.shape, channel_dim)
        trace.append((x, mirror.clone(), held.clone(), scale))
    return trace


def _excess(x, held, scale, channel_dim):
    """max over elements of |x - held| / (scale/2 of its channel); <= 1 means within half a step."""
    err = _per_channel((x - held).abs(), channel_dim)
    slack = 1e-6 * x.abs().max()  # float32 rounding of the add into held
    return ((err - slack) / (scale[:, None] / 2)).max().item()


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("channel_dim", (-1, 1))
def test_delta_error_feedback_keeps_receivers_within_half_a_step(bits, channel_dim):
    for t, (x, mirror, held, scale) in enumerate(_run_delta(DeltaCodec(bits), channel_dim)):
        assert torch.equal(held, mirror), f"receiver left the sender's mirror at step {t}"
        assert _excess(x, held, scale, channel_dim) <= 1.0, f"step {t}"


def test_delta_without_feedback_drifts_past_the_bound():
    trace = _run_delta(DeltaCodec(4, feedback=False), -1)
    x, _, held, scale = trace[-1]
    # rounding errors of 50 steps add up (the trend keeps each element's rounding error similar from
    # step to step); with feedback the same signal stays within 1
    assert _excess(x, held, scale, -1) > 3.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_xor_delta_is_bit_exact(dtype):
    codec = XorDeltaCodec()
    xs = [x.to(dtype) for x in _drift(6, shape=(2, 9, 7))]
    xs[3][0, 0, 0] = float("nan")  # bit patterns travel, whatever they mean
    mirror, held = xs[0].clone(), xs[0].clone()
    for x in xs[1:]:
        payload = codec.encode(x, mirror, -1)
        assert payload.numel() == x.numel() * x.element_size()
        codec.decode_into(payload, held, -1)
        assert torch.equal(held.view(torch.int16 if x.element_size() == 2 else torch.int32),
                           x.view(torch.int16 if x.element_size() == 2 else torch.int32))
        assert torch.equal(mirror.view(torch.uint8), x.view(torch.uint8))
        if not x.isnan().any():
            assert torch.equal(held, x)


def test_decode_from_a_misaligned_slice():
    """Payloads split out of one gathered buffer may start at any byte offset."""
    x = torch.randn(2, 5, 3)
    for codec in (Fp8Codec(), DeltaCodec(4), XorDeltaCodec()):
        mirror = torch.zeros_like(x)
        payload = codec.encode(x, mirror if codec.stateful else None, -1)
        buf = torch.cat([torch.zeros(1, dtype=torch.uint8), payload])
        a, b = torch.zeros_like(x), torch.zeros_like(x)
        codec.decode_into(payload, a, -1)
        codec.decode_into(buf[1:], b, -1)
        assert torch.equal(a, b)


def test_make_codec():
    assert make_codec("raw") is None
    assert isinstance(make_codec("fp8"), Fp8Codec)
    assert make_codec("delta", 2).bits == 2 and make_codec("delta").bits == 4
    assert isinstance(make_codec("delta-lossless"), XorDeltaCodec)
    with pytest.raises(PlanError) as e:
        make_codec("zstd")
    for name in ("raw", "fp8", "delta", "delta-lossless"):
        assert name in str(e.value)
    with pytest.raises(PlanError):
        make_codec("delta", 3)
