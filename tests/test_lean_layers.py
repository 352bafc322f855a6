"""The lean patch-parallel layers: GroupNorm moments merged from a summary, halo-padded conv
inputs written into shared buffers, whole-image K/V kept as one tensor.

Two-process runs check what the layers compute against the whole image (the parity and
displaced tests do so end to end); these check the pieces' own contracts."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stadi_core.parallel import moments
from stadi_core.parallel.layers import PaddedInputs


def _band_moments(x: torch.Tensor, cuts: list[int], groups: int):
    bands = list(torch.split(x, cuts, dim=2))
    parts = [torch.stack(moments.local_moments(b, groups)) for b in bands]
    counts = [b[0, 0].numel() for b in bands]
    return bands, parts, counts


def test_merged_moments_are_the_whole_images():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 6) * 3 + 40  # a large mean: cancellation would show
    _, parts, counts = _band_moments(x, [3, 5, 3], 4)
    mean, var = moments.merge(parts, counts)
    ref_var, ref_mean = torch.var_mean(x.reshape(2, 4, -1).double(), dim=-1, correction=0)
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=0)
    assert torch.allclose(var.double(), ref_var, rtol=1e-5, atol=0)


def test_displaced_moments_from_a_summary_equal_the_full_merge():
    torch.manual_seed(1)
    x = torch.randn(1, 6, 10, 4) * 2 - 25
    _, parts, counts = _band_moments(x, [2, 4, 4], 3)
    for rank in range(3):
        summary = moments.others_summary(parts, rank, counts, 2)
        w0 = counts[rank] / sum(counts)
        mean, var = moments.with_summary(parts[rank][0], parts[rank][1], summary, w0)
        ref_mean, ref_var = moments.merge(parts, counts)
        assert mean.shape == var.shape == (1, 3, 2)  # per channel: each group's value on its 2 channels
        assert torch.allclose(mean, ref_mean.unsqueeze(-1).expand(1, 3, 2), rtol=1e-6, atol=1e-6)
        assert torch.allclose(var, ref_var.unsqueeze(-1).expand(1, 3, 2), rtol=1e-5, atol=0)


def test_per_channel_normalize_is_the_stock_group_norm_and_follows_weight_patches():
    """The displaced path's one fused kernel (batch_norm on given statistics) computes the stock
    GroupNorm, with and without affine parameters, and picks up a weight changed in place."""
    torch.manual_seed(3)
    norm = nn.GroupNorm(4, 8, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 7) * 4 + 10
    parts = [torch.stack(moments.local_moments(x, 4))]
    affine = moments.AffineRepeats(norm)
    for _ in range(2):
        mean, var = (t.unsqueeze(-1).expand(2, 4, 2) for t in moments.merge(parts, [35]))
        y = moments.normalize_per_channel(x, mean, var, affine, norm.eps)
        ref = norm(x)
        assert (y - ref).abs().max() <= 5e-6 * ref.abs().max()
        with torch.no_grad():
            norm.weight.mul_(-2.0)  # a LoRA-style in-place patch: the repeats must follow
    y0 = moments.normalize_per_channel(x, mean, var, None, 1e-5)
    assert torch.allclose(y0, F.group_norm(x, 4, eps=1e-5), rtol=1e-5, atol=1e-5)


def test_normalize_matches_the_stock_group_norm():
    torch.manual_seed(2)
    norm = nn.GroupNorm(4, 8, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 7) * 4 + 10
    mean, var = moments.local_moments(x, 4)
    y = moments.normalize(x, 4, mean, torch.rsqrt(var + norm.eps), norm.weight, norm.bias)
    ref = norm(x)
    assert (y - ref).abs().max() <= 5e-6 * ref.abs().max()
    y0 = moments.normalize(x, 4, mean, torch.rsqrt(var + 1e-5), None, None)
    assert torch.allclose(y0, F.group_norm(x, 4, eps=1e-5), rtol=1e-5, atol=1e-5)


def test_padded_inputs_reuse_one_buffer_per_shape_and_keep_borders_zero():
    padded = PaddedInputs()
    x = torch.randn(1, 3, 4, 5)
    below = torch.randn(1, 3, 1, 5)
    buf = padded.fill(x, 1, None, below)  # rank 0: image border above
    assert buf.shape == (1, 3, 6, 5)
    assert torch.equal(buf[:, :, 0], torch.zeros(1, 3, 5))
    assert torch.equal(buf[:, :, 1:5], x) and torch.equal(buf[:, :, 5:], below)
    again = padded.fill(x * 2, 1, None, below * 2)
    assert again.data_ptr() == buf.data_ptr()  # no allocation per call
    assert torch.equal(again[:, :, 0], torch.zeros(1, 3, 5)) and torch.equal(again[:, :, 1:5], x * 2)
    above = torch.randn(1, 3, 1, 5)
    middle = padded.fill(x, 1, above, below)  # a middle band: another border pattern, another buffer
    assert middle.data_ptr() != buf.data_ptr()
    assert torch.equal(middle, torch.cat([above, x, below], dim=2))
    with torch.inference_mode():  # made outside inference mode, written inside it (and back)
        padded.fill(x, 1, None, below)
    padded.fill(x, 1, None, below)


def test_a_band_conv_over_the_padded_buffer_equals_the_whole_images_rows():
    from stadi_core.parallel.layers import PatchConv2d

    class _Halo:  # the neighbour's rows, as a context hands them to the layer
        def __init__(self, top, bottom):
            self.top, self.bottom = top, bottom

        def halo(self, layer_id, x, pad):
            return self.top, self.bottom

    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    whole = torch.randn(1, 3, 8, 6)
    ref = conv(whole)
    band = PatchConv2d(nn.Conv2d(3, 4, 3, padding=1), _Halo(whole[:, :, 3:4], whole[:, :, 7:8]), 0)
    band.inner.load_state_dict(conv.state_dict())
    band.inner.padding = (0, 1)
    out = band(whole[:, :, 4:7])
    assert torch.allclose(out, ref[:, :, 4:7], atol=1e-6)


def test_a_displaced_unet_band_traces_whole_under_torch_compile():
    """dynamo takes the band UNet's stale call as one graph (fullgraph) and it equals eager; the
    session path's compiled calls (test_compiled_band.py) depend on that for the conv models."""
    from stadi_core.bench.ops import LoopbackContext, _inputs
    from stadi_core.models.spec import build_model, model_spec_for
    from stadi_core.parallel import Phase, make_patch_parallel

    spec = model_spec_for("tiny-sd15")
    model = build_model(spec)
    forward = spec.adapter.forward
    x, t, cond = _inputs(spec, model, 8, 16)
    ctx = LoopbackContext([8, 8])  # one process plays both bands: the neighbour's context is ours
    make_patch_parallel(model, ctx, spec.adapter.patch_attention)
    compiled = torch.compile(lambda x: forward(model, x, t, cond), fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        ctx.begin_call(Phase.FRESH, 0, 16)
        forward(model, x, t, cond)
        ctx.end_call()
        ctx.begin_call(Phase.STALE, 0, 16)
        ref = forward(model, x, t, cond)
        ctx.end_call()
        ctx.begin_call(Phase.STALE, 0, 16)
        out = compiled(x)
        ctx.end_call()
    assert (out - ref).abs().max() <= 5e-6 * ref.abs().max()
