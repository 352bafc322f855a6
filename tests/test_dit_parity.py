"""Diffusion transformers (diffusers SD3 and Flux) under step-patch parallelism.

* In process: the patched network on one band, its context emulated from a whole-image pass,
  equals the corresponding rows of the whole-image network, and only with the band's true
  positions (a band run as if it started at row 0 must fail the comparison).
* Real worker processes over gloo: exact mode reproduces the single-process latent for uneven
  2- and 3-way splits; displaced mode with strides finishes and follows the plan.
"""

import copy

import pytest
import torch

from helpers import cpu_cluster
from stadi_core.api import generate, profile, reference_generate
from stadi_core.models.spec import ModelSpec, batched_conditioning, build_model, make_conditioning
from stadi_core.parallel import make_patch_parallel

SD3, FLUX = "diffusers-sd3", "diffusers-flux"
MODELS = {"tiny-sd3": SD3, "tiny-flux": FLUX}
EXTRA_MODELS = {"tiny-sd35": SD3, "tiny-flux-schnell": FLUX}


def _spec(config: str) -> ModelSpec:
    return ModelSpec(family={**MODELS, **EXTRA_MODELS}[config], config=config)


# -- in process: band positions and the whole-image context ------------------------------------------
class EmulatedContext:
    """Stands in for a BandContext without other processes.

    ``row_start`` is what the adapter is told (its positions); ``slot`` is where the band's
    tokens really sit in the whole image. Without a recording it records every layer's
    tokens (a whole-image pass); with one, ``whole_tokens`` splices the band's fresh tokens
    into the recorded whole image at ``slot``, as an exact-mode exchange would deliver them.
    """

    local_only = False

    def __init__(self, total_rows: int, row_start: int = 0, slot: int = 0, recorded: dict | None = None):
        self.total_rows = total_rows
        self.row_start = row_start
        self.slot = slot
        self.recorded = recorded
        self.calls: dict[int, int] = {}
        self.log: dict[int, torch.Tensor] = {}

    def whole_tokens(self, layer_id, tokens, dim=1):
        self.calls[layer_id] = self.calls.get(layer_id, 0) + 1
        if self.recorded is None:
            self.log[layer_id] = tokens
            return tokens
        whole = self.recorded[layer_id]
        per_row = whole.shape[dim] // self.total_rows
        start = self.slot * per_row
        return torch.cat([whole.narrow(dim, 0, start), tokens,
                          whole.narrow(dim, start + tokens.shape[dim], whole.shape[dim] - start - tokens.shape[dim])],
                         dim=dim)


def _patched(adapter, model, ctx):
    """A copy of ``model`` in its patch-parallel form, as a worker builds it."""
    model = copy.deepcopy(model)
    counts = make_patch_parallel(model, ctx, adapter.patch_attention)
    return model, counts


@pytest.fixture(scope="module", params=list(MODELS) + list(EXTRA_MODELS))
def one_band(request):
    """Whole-image output, recorded context, and a band's inputs for one tiny DiT."""
    torch.set_num_threads(1)
    spec = _spec(request.param)
    model = build_model(spec)
    adapter = spec.adapter
    cond = batched_conditioning(make_conditioning(spec, model, 1, seed=5), 2.0, "cpu", torch.float32)
    height, width = 40, 24
    x = torch.randn(2, adapter.latent_channels(model), height, width, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.6 * adapter.model_sampling(model).multiplier)
    with torch.inference_mode():
        plain = adapter.forward(model, x, t, cond)
        recorder = EmulatedContext(height)
        whole_model, counts = _patched(adapter, model, recorder)
        whole = adapter.forward(whole_model, x, t, cond)
    return dict(spec=spec, model=model, adapter=adapter, cond=cond, x=x, t=t, plain=plain, whole=whole,
                recorder=recorder, counts=counts, height=height)


def _band_output(b, start: int, rows: int, told_start: int):
    ctx = EmulatedContext(b["height"], row_start=told_start, slot=start, recorded=b["recorder"].log)
    model, _ = _patched(b["adapter"], b["model"], ctx)
    with torch.inference_mode():
        out = b["adapter"].forward(model, b["x"][:, :, start:start + rows], b["t"], b["cond"])
    return out, ctx


def test_adapter_forward_is_the_diffusers_forward(one_band):
    """The adapter's own forward (SD3: band-aware patch embedding) equals diffusers' on a whole image."""
    b = one_band
    model, x, t, cond = b["model"], b["x"], b["t"], b["cond"]
    kw = dict(encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"],
              timestep=t, return_dict=False)
    with torch.inference_mode():
        if b["spec"].family == SD3:
            native = model(x, **kw)[0]
        else:
            fx = b["adapter"]
            ids = fx.image_ids(0, x.shape[2] // 2, x.shape[3] // 2)
            txt = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
            native = model(fx.pack(x), img_ids=ids, txt_ids=txt, guidance=cond.get("guidance"), **kw)[0]
            native = fx.unpack(native, x.shape[2], x.shape[3])
    assert (b["plain"] - native).abs().max() <= 1e-6


def test_patched_whole_image_is_the_plain_model(one_band):
    b = one_band
    assert b["counts"]["conv"] == 0, "a patchify conv needs no halo: bands start on patch rows"
    assert b["counts"]["attention"] == len(b["recorder"].calls) > 0
    assert all(n == 1 for n in b["recorder"].calls.values()), "one exchange per attention call"
    assert (b["whole"] - b["plain"]).abs().max() <= 1e-5


@pytest.mark.parametrize("start,rows", [(12, 10), (30, 10), (0, 6)])
def test_band_with_true_positions_matches_the_whole_image(one_band, start, rows):
    b = one_band
    out, ctx = _band_output(b, start, rows, told_start=start)
    assert out.shape == b["x"][:, :, start:start + rows].shape
    assert all(n == 1 for n in ctx.calls.values()) and len(ctx.calls) == b["counts"]["attention"]
    diff = (out - b["whole"][:, :, start:start + rows]).abs().max().item()
    assert diff <= 1e-5, f"band at row {start} deviates from the whole image by {diff:.3g}"


@pytest.mark.parametrize("start,rows", [(12, 10), (30, 10)])
def test_band_positioned_at_row_zero_is_wrong(one_band, start, rows):
    """The defect this guards against: a band embedded as if it were the top of the image."""
    b = one_band
    out, _ = _band_output(b, start, rows, told_start=0)
    diff = (out - b["whole"][:, :, start:start + rows]).abs().max().item()
    assert diff > 1e-3, f"band positions do not reach the output (diff {diff:.3g}): the test cannot see a defect"


def test_family_parameters():
    from stadi_core.models import diffusers_flux, diffusers_sd3

    sd3 = build_model(_spec("tiny-sd3"))
    flux = build_model(_spec("tiny-flux"))
    schnell = build_model(_spec("tiny-flux-schnell"))
    assert diffusers_sd3.alignment(sd3) == 2 and diffusers_sd3.latent_channels(sd3) == 16
    assert diffusers_flux.alignment(flux) == 2 and diffusers_flux.latent_channels(flux) == 16
    ms = diffusers_sd3.model_sampling(sd3)
    assert (ms.shift, ms.multiplier) == (3.0, 1000.0)
    assert diffusers_flux.model_sampling(flux).multiplier == 1.0
    assert diffusers_flux.model_sampling(flux).shift == pytest.approx(3.158, abs=1e-3)  # exp(1.15)
    assert diffusers_flux.model_sampling(schnell).shift == 1.0
    cond = make_conditioning(_spec("tiny-flux"), flux, 3, seed=1)
    for part in ("cond", "uncond"):
        assert set(cond[part]) == {"encoder_hidden_states", "pooled_projections", "guidance"}
        assert all(v.shape[0] == 3 for v in cond[part].values()), "CFG concatenates along dim 0"
    assert "guidance" not in make_conditioning(_spec("tiny-flux-schnell"), schnell, 1, seed=1)["cond"]
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(diffusers_flux.unpack(diffusers_flux.pack(x), 6, 8), x)


# -- worker processes over gloo -------------------------------------------------------------------
TOL = 1e-4
# (speeds, latent height): 40/60 on two workers, 3:2:1 on three
CLUSTERS = {"two-40-60": ((2.0, 3.0), 40), "three-3-2-1": ((3.0, 2.0, 1.0), 48)}
COMMON = dict(width=32, batch=2, steps=5, cfg=2.0, seed=7, scheduler="simple")

_refs: dict = {}


def _reference(config: str, height: int, sampler: str):
    key = (config, height, sampler)
    if key not in _refs:
        torch.set_num_threads(1)  # the workers' thread count, so only the banding differs
        _refs[key] = reference_generate(_spec(config), height=height, sampler=sampler, **COMMON)
    return _refs[key]


def _check_exact(config, cluster_name, sampler):
    speeds, height = CLUSTERS[cluster_name]
    ref = _reference(config, height, sampler)
    res = generate(_spec(config), cpu_cluster(*speeds), height=height, sampler=sampler, mode="exact", **COMMON)
    rows = [b["rows"] for b in res.report.plan["bands"]]
    assert len(set(rows)) == len(rows) > 1, f"bands should be uneven, got {rows}"
    assert res.latent.shape == ref.shape == (2, 16, height, 32)
    assert torch.isfinite(res.latent).all()
    diff = (res.latent - ref).abs().max().item()
    assert diff <= TOL, f"exact mode deviates by {diff:.3g} (rows {rows})"
    assert len(set(res.report.checksums.values())) == 1, "ranks built different weights"


@pytest.mark.parametrize("cluster_name", list(CLUSTERS))
@pytest.mark.parametrize("config", list(MODELS))
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_exact_mode_matches_single_process(cluster_name, config, sampler):
    _check_exact(config, cluster_name, sampler)


@pytest.mark.parametrize("config", list(EXTRA_MODELS))
def test_exact_mode_variants(config):
    """SD3.5's qk-norm and image-only second attention; Flux schnell without guidance."""
    _check_exact(config, "three-3-2-1", "euler")


STRIDE_KW = dict(width=32, batch=2, steps=8, cfg=2.0, seed=3, sampler="euler", scheduler="simple")


@pytest.mark.parametrize("config", list(MODELS))
@pytest.mark.parametrize("speeds,strides", [((2.0, 1.0), (1, 2)), ((2.0, 2.0, 1.0), (1, 1, 2))])
def test_strided_displaced_run_follows_the_plan(config, speeds, strides):
    res = generate(_spec(config), cpu_cluster(*speeds), height=48, mode="displaced", warmup=2, strides=strides,
                   stall_timeout_s=60, **STRIDE_KW)
    assert torch.isfinite(res.latent).all() and res.latent.shape == (2, 16, 48, 32)
    plan = res.report.plan
    assert tuple(b["stride"] for b in plan["bands"]) == strides
    for band, rank in zip(plan["bands"], res.report.ranks):
        expected = 2 + len(range(2, STRIDE_KW["steps"], band["stride"]))
        assert rank.evals == expected, f"rank {rank.rank} evaluated {rank.evals} times, plan says {expected}"
    slow = strides.index(2)
    skipped = [s for s in res.report.steps[slow] if not s["computed"]]
    assert skipped and all(s["comm_s"] == 0.0 and s["busy_s"] == 0.0 for s in skipped)


@pytest.mark.parametrize("config", list(MODELS))
def test_capability_measurement_runs_bands_alone(config):
    """Measurement runs a band with ``local_only`` and a plan of 1-row bands: positions must not crash it."""
    measured = profile(_spec(config), cpu_cluster(1.0, 1.0), rows=8, width=32, repeats=1)
    assert all(d.capability and d.capability > 0 for d in measured.devices)
