"""The server side of a lockstep branch split, without ComfyUI: which rank gets which entries and
rows of a call, the output written back, and each conditioning sent once per session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stadi_core.errors import UnsupportedError
from stadi_core.planner import make_branch_plan
from stadi_core.runtime.messages import BandOutput
from stadi_core.runtime.session_conds import ConditioningOnce
from stadi_pack.nodes.branch_calls import assemble, split_call

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


def _call(codes, per=2, rows=48):
    n = per * len(codes)
    x = torch.arange(n * 4 * rows * 8, dtype=torch.float32).reshape(n, 4, rows, 8)
    ts = np.arange(n, dtype=np.float32)
    cond = {"context": np.arange(n * 3 * 5, dtype=np.float32).reshape(n, 3, 5)}
    return x, ts, cond


def _fake_network(units) -> BandOutput:
    """What a worker would return: here the unit's own input, so the assembly can be checked."""
    return BandOutput(0, 0, 0, None, 0.0, 0.0, unit_outs=[u.x * 1.0 for u in units])


@pytest.mark.parametrize("codes", [[UNCOND, COND], [COND, UNCOND], [COND, COND, UNCOND]])
def test_uneven_split_scatters_entries_and_rows_and_assembles_them(codes):
    plan = make_branch_plan(48, [2, 1], strategy="cfg_split+bands", steps=4)  # cond: r0; uncond: r0 [0,16) r1 [16,48)
    x, ts, cond = _call(codes)
    units, places = split_call(plan, x, ts, cond, codes)
    cond_entries = np.concatenate([np.arange(i * 2, i * 2 + 2) for i, c in enumerate(codes) if c == COND])
    uncond_entries = np.concatenate([np.arange(i * 2, i * 2 + 2) for i, c in enumerate(codes) if c == UNCOND])
    r0 = {u.group: u for u in units[0]}
    assert [u.group for u in units[0]] == [0, 1] and [u.group for u in units[1]] == [0]  # group order: uncond, cond
    assert np.array_equal(r0[1].x, x.numpy()[cond_entries])  # the whole cond branch
    assert np.array_equal(r0[0].x, x.numpy()[uncond_entries][:, :, 0:16])
    assert np.array_equal(units[1][0].x, x.numpy()[uncond_entries][:, :, 16:48])
    assert np.array_equal(units[1][0].cond["context"], cond["context"][uncond_entries])
    assert np.array_equal(r0[1].timesteps, ts[cond_entries])
    out = assemble(x, {r: _fake_network(u) for r, u in units.items()}, places)
    assert torch.equal(out, x)  # every entry and row written back where it came from


def test_a_call_with_one_branch_leaves_the_other_group_idle():
    plan = make_branch_plan(32, [1, 1], strategy="cfg_split", steps=4)  # uncond: r1, cond: r0
    x, ts, cond = _call([COND], rows=32)
    units, places = split_call(plan, x, ts, cond, [COND])
    assert [u.group for u in units[0]] == [1] and units[1] == []  # rank 1 still gets a call: no units
    assert torch.equal(assemble(x, {r: _fake_network(u) for r, u in units.items()}, places), x)


def test_calls_that_cannot_be_split_by_branch_are_refused():
    plan = make_branch_plan(32, [1, 1], strategy="cfg_split", steps=4)
    x, ts, cond = _call([COND, 2])  # a third conditioning (DualCFG's middle one)
    with pytest.raises(UnsupportedError, match="use strategy bands"):
        split_call(plan, x, ts, cond, [COND, 2])
    x, ts, cond = _call([COND, UNCOND])
    cond["odd"] = np.zeros((1, 3), np.float32)
    with pytest.raises(UnsupportedError, match="'odd'"):
        split_call(plan, x, ts, cond, [COND, UNCOND])


def test_each_conditioning_is_sent_once_per_rank():
    plan = make_branch_plan(32, [1, 1], strategy="cfg_split", steps=4)
    sent = ConditioningOnce()
    x, ts, cond = _call([UNCOND, COND])
    first, _ = split_call(plan, x, ts, cond, [UNCOND, COND], sent)
    again, _ = split_call(plan, x + 1, ts, cond, [UNCOND, COND], sent)
    assert all(u.cond for us in first.values() for u in us)
    assert all(u.cond == {} and u.cond_key for us in again.values() for u in us)
    assert [u.cond_key for u in first[0]] == [u.cond_key for u in again[0]]
    other = {"context": cond["context"] + 1}
    changed, _ = split_call(plan, x, ts, other, [UNCOND, COND], sent)
    assert all(u.cond for us in changed.values() for u in us)  # new values: sent again


def test_controlnet_residuals_follow_each_units_entries_and_rows():
    """A branch unit gets its branch's entries and its rows of every residual, at every level."""
    plan = make_branch_plan(48, [2, 1], strategy="cfg_split+bands", steps=4)  # cond: r0; uncond: r0 [0,16) r1 [16,48)
    codes = [UNCOND, COND]
    x, ts, cond = _call(codes)
    full = x[:, :1]  # level 1: the latent's rows, distinct per entry and row
    half = torch.nn.functional.avg_pool2d(x[:, :1], 2, ceil_mode=True)  # level 2: ceil(48 / 2) rows
    units, _ = split_call(plan, x, ts, cond, codes, control={"output": [full, None, half]})
    uncond_entries, cond_entries = np.arange(0, 2), np.arange(2, 4)
    r0 = {u.group: u for u in units[0]}
    whole = r0[1].control["output"]
    assert np.array_equal(whole[0], full.numpy()[cond_entries]) and whole[1] is None
    assert np.array_equal(whole[2], half.numpy()[cond_entries])
    top, bottom = r0[0].control["output"], units[1][0].control["output"]
    assert np.array_equal(top[0], full.numpy()[uncond_entries][:, :, 0:16])
    assert np.array_equal(top[2], half.numpy()[uncond_entries][:, :, 0:8])
    assert np.array_equal(bottom[0], full.numpy()[uncond_entries][:, :, 16:48])
    assert np.array_equal(bottom[2], half.numpy()[uncond_entries][:, :, 8:24])
