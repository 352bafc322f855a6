"""CFG-branch work units in the standalone engine: real worker processes over gloo.

Exact mode of cfg_split and cfg_split+bands (uneven bands inside the branch groups, the uneven
branch split with an emulated 2x slower worker, 2 branches x 2 bands on four workers) must
reproduce the single-process latent (1e-4 on fp32 latents of magnitude ~70, as
test_exact_parity); the plan must really be the arrangement asked for.
"""

import pytest
import torch

from helpers import cpu_cluster
from stadi_core.api import generate, reference_generate
from stadi_core.models.spec import ModelSpec

TOL = 1e-4
FAMILY = {"tiny-sd15": "diffusers-unet", "tiny-sdxl": "diffusers-unet", "tiny-sd3": "diffusers-sd3"}
COMMON = dict(width=32, batch=2, steps=5, cfg=2.0, seed=7)
_refs: dict = {}


def _spec(config: str) -> ModelSpec:
    return ModelSpec(family=FAMILY[config], config=config)


def _kw(config: str) -> dict:
    return dict(COMMON, scheduler="simple") if config == "tiny-sd3" else dict(COMMON)


def _reference(config: str, height: int, sampler: str):
    key = (config, height, sampler)
    if key not in _refs:
        torch.set_num_threads(1)  # the workers' thread count, so only the split differs
        _refs[key] = reference_generate(_spec(config), height=height, sampler=sampler, **_kw(config))
    return _refs[key]


def _groups(report) -> list:
    return [(tuple(g["branches"]), tuple(g["ranks"]), tuple(g["rows"])) for g in report.plan["groups"]]


# (strategy, speeds, slowdowns, height, the branch groups the plan must have)
CASES = {
    "split-2w": ("cfg_split", (1.0, 1.0), None, 48, [(("uncond",), (1,), (48,)), (("cond",), (0,), (48,))]),
    "uneven-2w-slow": ("cfg_split+bands", (2.0, 1.0), (1.0, 2.0), 48,
                       [(("uncond",), (0, 1), (16, 32)), (("cond",), (0,), (48,))]),
    "2x2-4w-uneven": ("cfg_split+bands", (2.0, 1.0, 2.0, 1.0), None, 48,
                      [(("uncond",), (2, 3), (32, 16)), (("cond",), (0, 1), (32, 16))]),
}


@pytest.mark.parametrize("config,case,sampler", [
    ("tiny-sd15", "split-2w", "euler"),
    ("tiny-sd15", "uneven-2w-slow", "dpmpp_2m"),
    ("tiny-sd15", "2x2-4w-uneven", "euler"),
    ("tiny-sdxl", "uneven-2w-slow", "euler"),
    ("tiny-sdxl", "2x2-4w-uneven", "dpmpp_2m"),
    ("tiny-sd3", "split-2w", "euler"),
    ("tiny-sd3", "2x2-4w-uneven", "euler"),
])
def test_exact_branch_split_matches_single_process(config, case, sampler):
    strategy, speeds, slowdowns, height, groups = CASES[case]
    ref = _reference(config, height, sampler)
    res = generate(_spec(config), cpu_cluster(*speeds, slowdowns=slowdowns), height=height, sampler=sampler,
                   mode="exact", strategy=strategy, **_kw(config))
    assert res.report.plan["strategy"] == strategy
    assert _groups(res.report) == groups
    assert res.latent.shape == ref.shape
    diff = (res.latent - ref).abs().max().item()
    assert diff <= TOL, f"{strategy} {case} deviates by {diff:.3g}"
    assert len(set(res.report.checksums.values())) == 1, "ranks built different weights"


def test_displaced_branch_bands_finish_close_to_exact():
    """Displaced context inside the uncond group: finite, close, and not silently exact."""
    kw = dict(_kw("tiny-sd15"), height=48, sampler="euler", strategy="cfg_split+bands")
    exact = generate(_spec("tiny-sd15"), cpu_cluster(2.0, 1.0), mode="exact", **kw).latent
    disp = generate(_spec("tiny-sd15"), cpu_cluster(2.0, 1.0), mode="displaced", warmup=2, **kw).latent
    assert torch.isfinite(disp).all()
    diff = (disp - exact).abs().max().item()
    assert TOL < diff < 0.2 * exact.abs().max().item(), diff


def test_cfg_split_needs_two_branches():
    with pytest.raises(Exception, match="CFG is 1"):
        generate(_spec("tiny-sd15"), cpu_cluster(1.0, 1.0), height=16, steps=2, cfg=1.0, strategy="cfg_split")


def test_hybrid_window_opens_where_the_criterion_says_and_saves_steps():
    from stadi_core.sampling.hybrid_window import PRESETS, HybridWindow

    kw = dict(_kw("tiny-sd15"), height=16, steps=20, sampler="euler", mode="exact", strategy="cfg_split")
    plain = generate(_spec("tiny-sd15"), cpu_cluster(1.0, 1.0), **kw)
    res = generate(_spec("tiny-sd15"), cpu_cluster(1.0, 1.0), hybrid_window="sd15", **kw)
    win = res.report.hybrid_window
    replay = HybridWindow(PRESETS["sd15"], 20)  # the engine's logged discrepancies, fed to the criterion again
    for step, mae in enumerate(win["maes"]):
        replay.observe_value(step, mae)
    assert win["opened_at"] == replay.opened_at is not None and win["opened_at"] <= PRESETS["sd15"].cap
    saved = len(win["steps"]) // 2
    assert saved >= 1 and [r.evals for r in res.report.ranks] == [20 - saved] * 2
    assert any("evaluations saved" in n for n in res.report.notes)
    diff = (res.latent - plain.latent).abs().max().item()
    assert 0 < diff < 0.5 * plain.latent.abs().max().item()
    with pytest.raises(Exception, match="needs a CFG-branch split"):
        generate(_spec("tiny-sd15"), cpu_cluster(1.0, 1.0), hybrid_window="sd15", **dict(kw, strategy="bands"))
