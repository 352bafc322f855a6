"""ControlNet residuals cut to bands (stadi_core/models/control_bands.py), without ComfyUI.

The cut must give each band exactly the rows its own UNet levels hold: the band's latent rows,
downsampled by the UNet's stride-2 convolutions (ceil sizes), so that the band outputs stitched
together equal the full network's. Checked here against real stride-2 convolutions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stadi_core.models.control_bands import band_residuals, level_factor, residuals_on, wire_bytes


def _levels(height: int, width: int, n: int) -> list[torch.Tensor]:
    """Feature maps of a stride-2 conv chain (as the UNet's Downsample makes them), distinct values per row."""
    x = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1).expand(2, 3, height, width).contiguous()
    conv = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)
    out = [x]
    for _ in range(n - 1):
        out.append(conv(out[-1]).detach())
    return out


@pytest.mark.parametrize("height,bands", [(24, [(0, 8), (8, 24)]), (20, [(0, 8), (8, 16), (16, 20)]),
                                          (36, [(0, 16), (16, 24), (24, 36)])])
def test_band_cuts_tile_every_level_like_the_band_network(height, bands):
    levels = _levels(height, 5, 4)  # factors 1, 2, 4, 8 (an SD1.5 UNet's alignment 8)
    control = {"input": [None] + levels, "middle": [levels[-1]], "output": list(reversed(levels))}
    cuts = [band_residuals(control, height, s, e) for s, e in bands]
    for key, items in control.items():
        for i, full in enumerate(items):
            if full is None:
                assert all(c[key][i] is None for c in cuts)
                continue
            stitched = np.concatenate([c[key][i] for c in cuts], axis=2)
            np.testing.assert_array_equal(stitched, full.numpy(), err_msg=f"{key}[{i}] rows {full.shape[2]}")
    # each band's cut at factor f has the rows its band network computes there: ceil((e - s) / f)
    for (s, e), c in zip(bands, cuts):
        for f, r in zip((1, 2, 4, 8), c["input"][1:]):
            assert r.shape[2] == -(-(e - s) // f)
            # and they are the right rows: a band starting at s holds level rows from s / f
            x_rows = _levels(e - s, 5, 4)[[1, 2, 4, 8].index(f)].shape[2]
            assert r.shape[2] == x_rows


def test_level_factor_is_the_ceil_chain():
    assert [level_factor(20, r) for r in (20, 10, 5, 3)] == [1, 2, 4, 8]
    assert level_factor(20, 7) is None  # no level of a 20-row latent has 7 rows


def test_broadcast_and_foreign_residuals_travel_whole():
    full = torch.randn(2, 4, 1, 1)  # broadcasts over the band like over the image
    odd = torch.randn(2, 4, 7, 5)  # no level of 24 rows: the band's UNet warns as ComfyUI's would
    cut = band_residuals({"middle": [full, odd]}, 24, 8, 24)
    assert cut["middle"][0].shape == (2, 4, 1, 1) and cut["middle"][1].shape == (2, 4, 7, 5)


def test_branch_entries_and_wire_round_trip():
    r = torch.arange(4 * 2 * 8 * 3, dtype=torch.float32).view(4, 2, 8, 3)
    one = torch.randn(1, 2, 8, 3)
    cut = band_residuals({"output": [r, one]}, 8, 0, 8, entries=np.array([2, 3]))
    np.testing.assert_array_equal(cut["output"][0], r[2:4].numpy())
    assert cut["output"][1].shape[0] == 1  # a batch-1 residual broadcasts over the entries
    back = residuals_on(cut, torch.device("cpu"))
    back["output"].pop()  # the UNet pops its lists: a second conversion must give fresh ones
    assert len(residuals_on(cut, torch.device("cpu"))["output"]) == 2
    assert wire_bytes(cut) == r[2:4].numel() * 4 + one.numel() * 4


def test_bfloat16_travels_as_float32():
    r = torch.randn(1, 2, 8, 3).to(torch.bfloat16)
    cut = band_residuals({"input": [r]}, 8, 0, 8)
    assert cut["input"][0].dtype == np.float32
    assert torch.equal(torch.from_numpy(cut["input"][0]).to(torch.bfloat16), r)


def test_unknown_keys_are_refused():
    from stadi_core.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="input/middle/output"):
        band_residuals({"input": [], "extra": [torch.zeros(1)]}, 8, 0, 8)
