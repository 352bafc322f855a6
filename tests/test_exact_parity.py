"""Exact mode must reproduce the single-process latent: the oracle for every other mode.

Real worker processes over gloo, uneven bands, batch 2 with CFG. The tolerance is the
issue's 1e-4 on latents of magnitude ~70 (random weights do not denoise): the float32
noise floor here, measured as the reference against itself at another thread count,
is of the same order at cfg 5, so these tests use cfg 2.
"""

import pytest
import torch

from helpers import cpu_cluster
from stadi_core.api import generate, reference_generate
from stadi_core.models.spec import ModelSpec

TOL = 1e-4
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
# (speeds, latent height): 40/60 on two workers, 3:2:1 on three
CLUSTERS = {"two-40-60": ((2.0, 3.0), 40), "three-3-2-1": ((3.0, 2.0, 1.0), 48)}

_refs: dict = {}


def _reference(config: str, height: int, sampler: str, **kw):
    key = (config, height, sampler, tuple(sorted(kw.items())))
    if key not in _refs:
        torch.set_num_threads(1)  # the workers' thread count, so only the banding differs
        _refs[key] = reference_generate(ModelSpec(config=config), height=height, sampler=sampler, **kw)
    return _refs[key]


COMMON = dict(width=32, batch=2, steps=5, cfg=2.0, seed=7)


@pytest.mark.parametrize("cluster_name", list(CLUSTERS))
@pytest.mark.parametrize("config", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_mode_matches_single_process(cluster_name, config, sampler):
    speeds, height = CLUSTERS[cluster_name]
    ref = _reference(config, height, sampler, **COMMON)
    res = generate(ModelSpec(config=config), cpu_cluster(*speeds), height=height, sampler=sampler, mode="exact",
                   **COMMON)
    rows = [b["rows"] for b in res.report.plan["bands"]]
    assert len(set(rows)) == len(rows) > 1, f"bands should be uneven, got {rows}"
    assert res.latent.shape == ref.shape
    assert torch.isfinite(res.latent).all()
    diff = (res.latent - ref).abs().max().item()
    assert diff <= TOL, f"exact mode deviates by {diff:.3g} (rows {rows})"
    assert len(set(res.report.checksums.values())) == 1, "ranks built different weights"


def test_same_seed_twice_is_identical_and_seed_matters():
    kw = dict(COMMON, height=40, sampler="euler_ancestral", mode="exact")
    a = generate(ModelSpec(), cpu_cluster(2.0, 3.0), **kw).latent
    b = generate(ModelSpec(), cpu_cluster(2.0, 3.0), **kw).latent
    assert torch.equal(a, b)
    c = generate(ModelSpec(), cpu_cluster(2.0, 3.0), **dict(kw, seed=8)).latent
    assert (a - c).abs().max() > 1.0


def test_exact_output_does_not_depend_on_the_split():
    kw = dict(COMMON, height=48, sampler="dpmpp_2m", mode="exact")
    two = generate(ModelSpec(), cpu_cluster(1.0, 1.0), **kw)
    three = generate(ModelSpec(), cpu_cluster(3.0, 2.0, 1.0), **kw)
    skewed = generate(ModelSpec(), cpu_cluster(1.0, 5.0), **kw)
    splits = {tuple(b["rows"] for b in r.report.plan["bands"]) for r in (two, three, skewed)}
    assert len(splits) == 3
    assert (two.latent - three.latent).abs().max() <= TOL
    assert (two.latent - skewed.latent).abs().max() <= TOL


def test_one_device_cluster_gives_the_reference():
    ref = _reference("tiny-sd15", 40, "euler", **COMMON)
    res = generate(ModelSpec(), "cpu:0", height=40, sampler="euler", mode="exact", **COMMON)
    assert (res.latent - ref).abs().max() <= TOL
