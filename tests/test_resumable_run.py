"""A standalone run in segments (stadi_core/resumable_run.py): loop states that continue on other rows,
and bands that move mid-run when a worker slows down, the latent unchanged in exact mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import cpu_cluster
from stadi_core.api import generate
from stadi_core.cluster import ClusterSpec, DeviceSpec
from stadi_core.models.spec import ModelSpec
from stadi_core.replan import REPLAN_ENV
from stadi_core.sampling.band_loop import LoopSchedule, run_band
from stadi_core.sampling.loop_state import LoopState, stitch
from stadi_core.sampling.model_sampling import EpsDiscrete
from stadi_core.sampling.noise import FullLatentNoise


def _state(step, row_start, rows, history=True):
    x = np.arange(2 * 3 * rows * 4, dtype=np.float32).reshape(2, 3, rows, 4) + 100 * row_start
    solver = {"old_denoised": -x, "prev_sigma": 2.5} if history else {}
    return LoopState(step, row_start, x, solver)


def test_stitched_bands_crop_back_to_any_rows():
    whole = stitch([_state(4, 5, 3), _state(4, 0, 5)])  # given out of order
    assert (whole.step, whole.row_start, whole.rows) == (4, 0, 8)
    np.testing.assert_array_equal(whole.x[:, :, 5:], _state(4, 5, 3).x)
    part = whole.crop(3, 4)  # across the old band boundary
    assert (part.row_start, part.rows, part.solver["prev_sigma"]) == (3, 4, 2.5)
    np.testing.assert_array_equal(part.solver["old_denoised"], -part.x)


@pytest.mark.parametrize("states,match", [
    ([_state(4, 0, 5), _state(5, 5, 3)], "different steps"),
    ([_state(4, 0, 5), _state(4, 6, 3)], "gap or overlap"),
    ([_state(4, 0, 5), _state(4, 5, 3, history=False)], "different sampler histories"),
])
def test_states_that_do_not_make_one_latent_are_refused(states, match):
    with pytest.raises(ValueError, match=match):
        stitch(states)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_a_loop_continued_on_other_rows_steps_as_the_uninterrupted_one(sampler):
    """The math alone, in one process: a whole-latent loop checkpointed before step 4, continued as two
    bands of other sizes, ends on the uninterrupted loop's latent (history and noise carried over)."""
    shape, steps = (1, 4, 12, 6), 8
    sampling = EpsDiscrete()
    sigmas = sampling.sigmas("karras", steps)
    weight = torch.linspace(-1, 1, 12).view(1, 1, 12, 1)

    def network(x_in, t, phase):  # row-local, like every band's network in exact mode
        return torch.tanh(x_in) * 0.5 + weight[:, :, :x_in.shape[2]] * t / 1000

    kw = dict(sigmas=sigmas, sampler=sampler, cfg=1.0, noise=FullLatentNoise(7, shape), model_sampling=sampling)
    seen = []
    whole, _ = run_band(network, rows=slice(0, 12), schedule=LoopSchedule(steps=steps), checkpoint=seen.append, **kw)
    at4 = next(s for s in seen if s.step == 4)
    if sampler == "dpmpp_2m":
        assert set(at4.solver) == {"old_denoised", "prev_sigma"}
    bands = []
    for lo, n in ((0, 7), (7, 5)):
        def band_net(x_in, t, phase, lo=lo):
            return torch.tanh(x_in) * 0.5 + weight[:, :, lo:lo + x_in.shape[2]] * t / 1000

        x, timings = run_band(band_net, rows=slice(lo, lo + n), schedule=LoopSchedule(steps=steps),
                              start=at4.crop(lo, n), **{**kw, "noise": FullLatentNoise(7, shape)})
        assert [t.step for t in timings] == list(range(4, steps))
        bands.append(x)
    torch.testing.assert_close(torch.cat(bands, dim=2), whole, rtol=0, atol=1e-6)


KW = dict(height=48, width=32, batch=1, steps=12, cfg=2.0, sampler="dpmpp_2m", mode="exact", warmup=1)


def _slowing_cluster(factor: float, from_step: int) -> ClusterSpec:
    return ClusterSpec((DeviceSpec("cpu:0", relative_speed=1.0),
                        DeviceSpec("cpu:1", relative_speed=1.0, slowdown=factor, slowdown_from=from_step)),
                       backend="gloo")


def test_a_worker_that_slows_down_mid_run_gives_up_rows_and_exact_stays_exact(monkeypatch):
    monkeypatch.setenv(REPLAN_ENV, "on")
    ref = generate(ModelSpec(), cpu_cluster(1.0, 1.0), **KW)
    res = generate(ModelSpec(), _slowing_cluster(4.0, 3), **KW)
    notes = [n for n in res.report.notes if n.startswith("re-planned at step")]
    print("\n".join(res.report.notes))
    assert notes, res.report.notes
    assert res.report.plan["bands"][0]["rows"] > res.report.plan["bands"][1]["rows"]  # the slow device gave rows up
    first = int(notes[0].split()[3].rstrip(":"))
    assert 3 < first <= 8, notes  # reacts within a few steps of the slowdown, not before it
    assert sum(r.evals for r in res.report.ranks) >= KW["steps"]  # every step evaluated once per rank's segments
    diff = (res.latent - ref.latent).abs().max().item()
    assert diff <= 5e-6 * ref.latent.abs().max().item(), diff


def test_no_replan_when_it_is_off(monkeypatch):
    """(That measurement noise alone moves nothing is test_replan.py's, on controlled times: on a shared
    2-core machine a worker preempted for a few calls is a real slowdown, and may move rows.)"""
    monkeypatch.setenv(REPLAN_ENV, "off")
    res = generate(ModelSpec(), _slowing_cluster(4.0, 3), **KW)
    assert not any(n.startswith("re-planned") for n in res.report.notes), res.report.notes
    assert [b["rows"] for b in res.report.plan["bands"]] == [24, 24]


def test_displaced_run_with_strides_replans_and_finishes(monkeypatch):
    monkeypatch.setenv(REPLAN_ENV, "on")
    kw = dict(KW, mode="displaced", strides="auto", warmup=2, steps=18)  # room for a late decision on a busy machine
    res = generate(ModelSpec(), _slowing_cluster(4.0, 3), **kw)
    assert any(n.startswith("re-planned at step") for n in res.report.notes), res.report.notes
    assert torch.isfinite(res.latent).all() and res.latent.shape == (1, 4, 48, 32)


def test_the_cli_takes_a_slowdown_from_a_step():
    import argparse

    from stadi_core.cli import _cluster
    from stadi_core.errors import StadiError

    args = argparse.Namespace(devices="cpu*2", backend="gloo", slowdown=["cpu:1=2@4"], speed=None)
    fast, slow = _cluster(args).devices
    assert (fast.slowdown, slow.slowdown, slow.slowdown_from) == (1.0, 2.0, 4)
    args.slowdown = ["cpu:1=2@soon"]
    with pytest.raises(StadiError, match="after '@' give the step"):
        _cluster(args)
