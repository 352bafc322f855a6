"""The pieces of lockstep execution that need no ComfyUI: call slots, ragged bands, the lockstep
scatter/gather over real worker processes, the warm pool after a cancel, and the strided refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stadi_core.errors import UnsupportedError
from stadi_core.models.spec import ModelSpec, build_model, make_conditioning
from stadi_core.parallel.context import BandContext
from stadi_core.planner import ONE_EVAL_SAMPLERS, make_plan, split_rows
from stadi_core.runtime.messages import BandCall, SessionStart
from stadi_core.runtime.pool import JobCancelledError
from stadi_core.runtime.registry import get_pool
from stadi_pack.nodes.compatibility import check_model, image_wide_features
from stadi_pack.nodes.deployment import CallSlots

SPEC = ModelSpec()  # the tiny diffusers SD1.5-like UNet (alignment 8)


# -- planning: any height, boundaries on the alignment ----------------------------------------------------------
@pytest.mark.parametrize("height,weights,rows", [(17, [2, 3], [8, 9]), (25, [1, 1], [16, 9]), (25, [2, 3], [8, 17]),
                                                 (5, [1], [5]), (32, [1, 1], [16, 16])])
def test_ragged_split_keeps_every_boundary_on_the_alignment(height, weights, rows):
    assert split_rows(height, weights, 8, ragged=True) == rows
    plan = make_plan(height, weights, steps=2, mode="exact", ragged=True)
    assert plan.rows == tuple(rows) and all(b.row_start % 8 == 0 for b in plan.bands)


def test_without_ragged_an_off_alignment_height_is_refused_with_the_fix():
    with pytest.raises(Exception, match="multiple of 8 rows"):
        make_plan(17, [1, 1], steps=2, warmup=0, mode="exact")


def test_multi_evaluation_and_adaptive_samplers_take_no_strides():
    assert "dpm_fast" not in ONE_EVAL_SAMPLERS and "dpm_adaptive" not in ONE_EVAL_SAMPLERS
    plan = make_plan(64, [1.0, 0.3], steps=8, warmup=1, mode="displaced", strides="auto", sampler="dpm_fast")
    assert plan.strides == (1, 1)


def test_ragged_band_extents_follow_the_networks_ceil_downsampling():
    # bands 8 + 9 of a 17-row latent, width 25: the full image is 17x25 -> 9x13 -> 5x7 -> 3x4
    for rank, mine in ((0, [8, 4, 2, 1]), (1, [9, 5, 3, 2])):
        ctx = BandContext([8, 9], rank)
        ctx.reset(ragged_align=8)
        ctx.width = 25
        for level, (rows, cols) in enumerate(zip(mine, [25, 13, 7, 4])):
            full = [8 >> level, [9, 5, 3, 2][level]]
            assert ctx.sizes_like(rows * cols) == [r * cols for r in full]  # attention tokens
            assert ctx.sizes_like(40 * rows * cols, rows=rows) == [40 * r * cols for r in full]  # GroupNorm counts


def test_call_slots_number_calls_within_a_step():
    slots = CallSlots()
    assert [slots.next(s) for s in (0, 0, 1, 1, 1, 2, 1)] == [0, 1, 0, 1, 2, 0, 0]


# -- lockstep over two real worker processes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_cond():
    model = build_model(SPEC, torch.device("cpu"))
    conds = [make_conditioning(SPEC, model, 1, seed=s)["cond"] for s in (0, 1)]
    return model, [{k: v.numpy() for k, v in c.items()} for c in conds]


def _session(pool, plan):
    return pool.open_session(lambda job_id: SessionStart(job_id, SPEC.to_dict(), plan.to_dict()))


def _scatter(session, plan, x, step, phase, cond, slot=0, cancel=False):
    def call(b):
        xb = np.ascontiguousarray(x[:, :, b.row_start:b.row_end])
        return lambda job_id, call_id: BandCall(job_id, call_id, step, phase, xb, np.array([700.0 - 100 * step],
                                                np.float32), cond, slot=slot, cancel=cancel,
                                                signature=step * 10 + slot)
    outs = session.call_all({b.rank: call(b) for b in plan.bands}, stall_timeout_s=60)
    return np.concatenate([outs[b.rank].out for b in plan.bands], axis=2)


def test_lockstep_scatter_gather_on_ragged_bands_equals_one_device(model_and_cond):
    _, (cond, _) = model_and_cond
    x = np.random.default_rng(0).standard_normal((1, 4, 20, 13)).astype(np.float32)
    one = make_plan(20, [1.0], devices=["cpu:0"], steps=1, warmup=0, mode="exact", ragged=True)
    two = make_plan(20, [1.0, 1.0], devices=["cpu:0", "cpu:1"], steps=1, warmup=0, mode="exact", ragged=True)
    assert two.rows == (8, 12)
    outs = []
    for plan in (one, two):
        pool = get_pool(list(plan.devices), "gloo")
        session = _session(pool, plan)
        try:
            outs.append(_scatter(session, plan, x, 0, "fresh", cond))
        finally:
            session.close()
    diff = np.abs(outs[1] - outs[0]).max()
    assert diff <= 5e-6 * np.abs(outs[0]).max(), diff


def test_displaced_context_is_kept_per_call_slot(model_and_cond):
    """Two interleaved call slots (cond and uncond sent apart) in one session give what each slot gives
    alone: a slot's displaced context never comes from the other slot."""
    _, conds = model_and_cond
    plan = make_plan(16, [1.0, 1.0], devices=["cpu:0", "cpu:1"], steps=4, warmup=1, mode="displaced",
                     strides="off")
    phases = ["fresh", "refresh", "stale", "refresh"]  # a stride-2 schedule: stale steps between syncs
    rng = np.random.default_rng(1)
    xs = [[rng.standard_normal((1, 4, 16, 16)).astype(np.float32) for _ in range(2)] for _ in phases]
    pool = get_pool(["cpu:0", "cpu:1"], "gloo")

    def run(slots, keyed=True):
        session = _session(pool, plan)
        try:
            return {(step, s): _scatter(session, plan, xs[step][s], step, phase, conds[s], slot=s if keyed else 0)
                    for step, phase in enumerate(phases) for s in slots}
        finally:
            session.close()

    def close(a, b):
        return np.abs(a - b).max() <= 1e-5 * np.abs(b).max()

    both = run([0, 1])
    for s in (0, 1):  # a stale step of slot 0 must not see slot 1's later exchange land either
        alone = run([s])
        assert all(close(both[(step, s)], alone[(step, s)]) for step in range(len(phases))), s
    # keyed by layer only (the old behaviour), slot 1 reads slot 0's context and differs: the check can fail
    shared = run([0, 1], keyed=False)
    assert close(shared[(0, 1)], alone[(0, 1)]) and not close(shared[(3, 1)], alone[(3, 1)])


def test_a_cancelled_session_leaves_the_pool_warm(model_and_cond):
    _, (cond, _) = model_and_cond
    plan = make_plan(16, [1.0, 1.0], devices=["cpu:0", "cpu:1"], steps=2, warmup=0, mode="exact")
    pool = get_pool(["cpu:0", "cpu:1"], "gloo")
    x = np.zeros((1, 4, 16, 16), np.float32)
    session = _session(pool, plan)
    pids = pool.pids()
    try:
        _scatter(session, plan, x, 0, "fresh", cond)
        session.cancel()
        with pytest.raises(JobCancelledError):
            _scatter(session, plan, x, 1, "fresh", cond, cancel=True)
    finally:
        session.close()
    assert pool.alive() and get_pool(["cpu:0", "cpu:1"], "gloo") is pool and pool.pids() == pids
    session = _session(pool, plan)
    try:
        assert not any(m.info["loaded_weights"] for m in session.ready.values())  # nothing loaded again
        assert np.isfinite(_scatter(session, plan, x, 0, "fresh", cond)).all()
    finally:
        session.close()


# -- what per-rank loops refuse --------------------------------------------------------------------------------
class _Patcher:
    def __init__(self, model_options=None, wrappers=None):
        net = type("UNetModel", (torch.nn.Module,), {"__module__": "comfy.ldm.modules.diffusionmodules.openaimodel"})()
        self.model = type("SD15", (), {"diffusion_model": net})()
        self.model_options = model_options or {"transformer_options": {}}
        self.wrappers = wrappers or {}
        self.object_patches = {}


def _rescale_cfg(args):
    return args["cond"]


_rescale_cfg.__qualname__ = "RescaleCFG.patch.<locals>.rescale_cfg"


def test_image_wide_features_name_their_node_and_only_strided_runs_refuse_them():
    opts = {"transformer_options": {}, "sampler_cfg_function": _rescale_cfg,
            "sampler_post_cfg_function": [lambda a: a["denoised"]]}
    patcher = _Patcher(opts, {"outer_sample": {"easycache": [lambda *a: None]}})
    found = image_wide_features(patcher)
    assert any("RescaleCFG.patch.rescale_cfg" in f for f in found) and any("easycache" in f for f in found)
    assert len(found) == 3
    with pytest.raises(UnsupportedError, match="RescaleCFG.*set strides off"):
        check_model(patcher)
    assert check_model(patcher, lockstep=True) == "comfy-unet"
    assert image_wide_features(_Patcher()) == []


# -- the PREPARE_SAMPLING wrapper under both ComfyUI signatures --------------------------------------------------
def test_prepare_sampling_wrapper_takes_the_old_and_the_new_signature(monkeypatch):
    """0.3.64 calls it as (model, noise_shape, conds, model_options=); newer ComfyUI adds force_full_load=
    and force_offload=. Either way the loop gets a shell whose network is the band scatter and nothing loads."""
    import sys
    import types

    from stadi_pack.nodes import lockstep
    from stadi_pack.nodes.band_network import BandNetwork

    def set_attr(obj, attr, value):
        prev = getattr(obj, attr)
        setattr(obj, attr, value)
        return prev

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(set_attr=set_attr)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    base = torch.nn.Module()
    base.diffusion_model = torch.nn.Linear(1, 1)
    base.model_sampling = "stock"
    patcher = types.SimpleNamespace(model=base, object_patches={"model_sampling": "patched"})
    run = types.SimpleNamespace(network_call=lambda *a: "band output")
    patch = lockstep.LockstepPatch(None, "exact", 0)
    token = lockstep._RUN.set(run)
    try:
        for kwargs in ({"model_options": {}}, {"model_options": {}, "force_full_load": False, "force_offload": True}):
            shell, conds, loaded = patch.prepare_sampling(None, patcher, (1, 4, 8, 8), {"positive": []}, **kwargs)
            assert isinstance(shell.diffusion_model, BandNetwork) and shell.model_sampling == "patched"
            assert shell.current_patcher is patcher and loaded == [] and conds == {"positive": []}
            assert isinstance(base.diffusion_model, torch.nn.Linear) and base.model_sampling == "stock"  # untouched
    finally:
        lockstep._RUN.reset(token)
    with pytest.raises(Exception, match="outside a STADI run"):
        patch.prepare_sampling(None, patcher, (1, 4, 8, 8), {}, model_options={})


def test_a_second_stadi_node_on_a_parallel_model_is_refused_with_the_fix():
    """Parallel Model -> STADI Sampler (or a second Parallel Model) would nest two sampling runs on one
    worker pool, the inner waiting for the pool the outer holds: refused before anything runs."""
    from stadi_pack.nodes.coordinator import StadiRun
    from stadi_pack.nodes.lockstep import LockstepPatch

    patched = _Patcher(wrappers={"outer_sample": {"stadi_lockstep": [lambda *a: None]}})
    for make in (lambda: LockstepPatch(None, "exact", 0).apply(patched),
                 lambda: StadiRun(patched, cluster=None, mode="exact", warmup=0, strides="off", sampler_name="euler",
                                  steps=2)):
        with pytest.raises(UnsupportedError, match="already comes from a STADI Parallel Model.*keep one"):
            make()
