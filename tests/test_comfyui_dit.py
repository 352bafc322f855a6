"""SD3-, Flux- and SDXL-family models under the STADI Sampler inside a real ComfyUI server.

Tiny random-weight networks that ComfyUI's own detector takes for SD3, Flux and an SDXL-family
UNet (see comfy_dit_models.py), loaded with the stock UNETLoader / CLIPLoader / DualCLIPLoader,
sampled by ComfyUI's own loop (flow matching with the ModelSamplingSD3 / ModelSamplingFlux
nodes, which patch it, for the DiTs). Skipped with a reason when no ComfyUI checkout is configured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_dit_models import write_tiny_model
from comfy_support import (
    ComfyExecutionError,
    ComfyServer,
    comfyui_marks,
    dit_api_workflow,
    load_latent_file,
    require_comfyui,
)

pytestmark = comfyui_marks()

REPO = Path(__file__).resolve().parent.parent
FILES = {"sd3": "stadi_tiny_sd3.safetensors", "flux": "stadi_tiny_flux.safetensors",
         "flux-fill": "stadi_tiny_flux_fill.safetensors",
         "sdxl": "stadi_tiny_sdxl.safetensors", "clip-l": "stadi_tiny_clip_l.safetensors",
         "clip-g": "stadi_tiny_clip_g.safetensors"}
# Latents reach |x| ~ 10-100 with random weights; relative bound as in test_comfyui_stadi.py.
REL_TOL = 2e-6


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-models")
    return {kind: write_tiny_model(kind, folder / name, comfy=require_comfyui()) for kind, name in FILES.items()}


@pytest.fixture(scope="module")
def server(dit_files):
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(),
                     diffusion_models=[dit_files[k] for k in ("sd3", "flux", "flux-fill", "sdxl")],
                     text_encoders=[dit_files["clip-l"], dit_files["clip-g"]]) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


def _sdxl(wf: dict) -> dict:
    """The same graph for an SDXL-family UNet: SDXL's two text encoders, a 4-channel latent, no shift."""
    wf["2"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": FILES["clip-l"], "clip_name2": FILES["clip-g"],
                                                         "type": "sdxl"}}
    wf["5"]["class_type"] = "EmptyLatentImage"
    return wf


def _workflow(family: str, *, stadi: dict | None = None, **kw) -> dict:
    if family == "sdxl":
        kw.setdefault("scheduler", "karras")
        kw["shift"] = None
        return _sdxl(_workflow("sd3", stadi=stadi, unet="sdxl", **kw))
    flux = family == "flux"
    kw.setdefault("cfg", 1.0 if flux else 2.0)
    kw.setdefault("shift", 1.15 if flux else 3.0)
    unet = FILES[kw.pop("unet", family)]
    if stadi is None:
        return dit_api_workflow(unet, FILES["clip-l"], flux=flux, **kw)
    devices, speeds, mode = stadi["devices"], stadi["speeds"], stadi.get("mode", "exact")
    wf = dit_api_workflow(unet, FILES["clip-l"], flux=flux, sampler_class="STADISampler",
                          sampler_extra_inputs={"mode": mode, "warmup_steps": 2, "strides": "auto",
                                                "cluster": ["10", 0]}, **kw)
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": devices, "backend": "gloo", "measure": stadi.get("measure", False), "speeds": speeds, "exclude": "",
        "emulate_slowdown": ""}}
    return wf


def _latent(server, entry) -> torch.Tensor:
    files = server.output_files(entry, "7", "latents")
    assert files, f"no latent saved: {entry.get('outputs')}"
    return load_latent_file(files[0])


TWO = {"devices": "cpu*2", "speeds": "cpu:0=2, cpu:1=3"}
THREE = {"devices": "cpu*3", "speeds": "cpu:0=1, cpu:1=2, cpu:2=3"}


@pytest.mark.parametrize("family,sampler,cluster,rows", [
    ("sd3", "euler", TWO, [10, 14]),
    ("sd3", "dpmpp_2m", THREE, [4, 8, 12]),
    ("flux", "euler", THREE, [4, 8, 12]),
    ("flux", "dpmpp_2m", TWO, [10, 14]),
    ("sdxl", "euler_ancestral", TWO, [8, 16]),  # SDXL family: the 2816-wide size/crop y, UNet bands of 4 rows
    ("sdxl", "dpmpp_2m", THREE, [4, 8, 12]),
])
def test_exact_mode_equals_stock_ksampler(server, family, sampler, cluster, rows):
    common = dict(seed=7, steps=4, sampler_name=sampler, width=128, height=192)
    ref = _latent(server, server.run(_workflow(family, filename_prefix=f"ref_{family}_{sampler}", **common),
                                     timeout=600))
    entry = server.run(_workflow(family, stadi=cluster, filename_prefix=f"stadi_{family}_{sampler}", **common),
                       timeout=900)
    out = _latent(server, entry)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    assert [b["rows"] for b in plan["bands"]] == rows
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{family} {sampler} bands {rows}: max |STADI exact - KSampler| = {diff:.3g} "
          f"(|ref| max {scale:.3g}, relative {diff / scale:.2g})")
    assert out.shape == ref.shape
    assert diff <= REL_TOL * scale


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl"])
def test_measured_plan_runs_and_stays_exact(server, family):
    """measure=True times each device on its band with stand-in conditioning shaped for the network
    first (the capability probe), then plans from it: the result is still KSampler's."""
    common = dict(seed=6, steps=2, sampler_name="euler", width=128, height=128)
    ref = _latent(server, server.run(_workflow(family, filename_prefix=f"mref_{family}", **common), timeout=600))
    cluster = {"devices": "cpu*2", "speeds": "", "measure": True}
    entry = server.run(_workflow(family, stadi=cluster, filename_prefix=f"meas_{family}", **common), timeout=900)
    assert len(entry["outputs"]["6"]["stadi_plan"][0]["bands"]) == 2
    out = _latent(server, entry)
    assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()


def test_flux_fill_with_a_noise_mask_equals_ksampler(server):
    """Flux Fill (96 input channels): ComfyUI concatenates a masked-image latent and the 8x8-packed
    mask (here from the noise mask) onto x, 80 extra channels that must reach the bands sliced like
    the latent; the noise mask itself too."""
    def fill(wf):
        wf["21"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 192}}
        wf["22"] = {"class_type": "FeatherMask", "inputs": {"mask": ["21", 0], "left": 0, "top": 64, "right": 48,
                                                             "bottom": 0}}
        wf["24"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["22", 0]}}
        wf["6"]["inputs"]["latent_image"] = ["24", 0]
        return wf

    common = dict(seed=3, steps=4, sampler_name="euler", width=128, height=192, unet="flux-fill")
    ref = _latent(server, server.run(fill(_workflow("flux", filename_prefix="fill_ref", **common)), timeout=600))
    out = _latent(server, server.run(fill(_workflow("flux", stadi=TWO, filename_prefix="fill_stadi", **common)),
                                     timeout=900))
    diff = (out - ref).abs().max().item()
    print(f"flux fill bands [10, 14]: max |STADI exact - KSampler| = {diff:.3g}")
    assert out.shape == ref.shape
    assert diff <= REL_TOL * ref.abs().max().item()


def test_batch_of_two_with_denoise_below_one_equals_ksampler(server):
    common = dict(seed=9, steps=4, sampler_name="euler", width=128, height=128, batch_size=2, denoise=0.6)
    ref = _latent(server, server.run(_workflow("sd3", filename_prefix="b2_ref", **common)))
    out = _latent(server, server.run(_workflow("sd3", stadi=TWO, filename_prefix="b2_stadi", **common), timeout=600))
    assert out.shape == ref.shape and out.shape[0] == 2
    assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()


def test_fp8_weights_stay_fp8_in_the_workers_and_equal_ksampler(server):
    """UNETLoader's fp8_e4m3fn: ComfyUI keeps fp8 weights and computes in its manual-cast dtype; the
    workers must do the same (a bf16/fp32 copy would double every GPU's memory for Flux)."""

    def fp8(wf):
        wf["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
        return wf

    common = dict(seed=2, steps=3, sampler_name="euler", width=128, height=128)
    ref = _latent(server, server.run(fp8(_workflow("sd3", filename_prefix="fp8_ref", **common))))
    out = _latent(server, server.run(fp8(_workflow("sd3", stadi=TWO, filename_prefix="fp8_stadi", **common)),
                                     timeout=600))
    assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()
    # what the workers map is what the server holds: the pack logs the dtypes of the weights it shares
    shared = re.findall(r"base weights shared with the workers \([\d.]+ MB; ([^)]*)\)",
                        server.log_path.read_text(errors="replace"))
    counts = [dict((kv.split()[0], int(kv.split()[1])) for kv in line.split(", ")) for line in shared]
    assert any(c.get("float8_e4m3fn", 0) > sum(c.values()) / 2 for c in counts), shared


def test_model_sampling_node_reaches_the_bands(server):
    """ModelSamplingSD3's shift is an object patch: without it the STADI run would differ from stock."""
    common = dict(seed=3, steps=3, sampler_name="euler", width=128, height=128, shift=6.0)
    ref = _latent(server, server.run(_workflow("sd3", filename_prefix="ms_ref", **common)))
    plain = _latent(server, server.run(_workflow("sd3", filename_prefix="ms_plain", **dict(common, shift=3.0))))
    out = _latent(server, server.run(_workflow("sd3", stadi=TWO, filename_prefix="ms_stadi", **common), timeout=600))
    assert (plain - ref).abs().max() > 1e-2 * ref.abs().max(), "the shift does not change the result: test is blind"
    assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_displaced_and_stride_modes_run_and_report_psnr_to_stock(server, family):
    common = dict(seed=5, steps=6, sampler_name="euler", width=128, height=192)
    ref = _latent(server, server.run(_workflow(family, filename_prefix=f"dref_{family}", **common), timeout=600))
    cluster = {"devices": "cpu*2", "speeds": "cpu:0=1, cpu:1=0.5", "mode": "displaced"}
    entry = server.run(_workflow(family, stadi=cluster, filename_prefix=f"disp_{family}", **common), timeout=900)
    out = _latent(server, entry)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    assert [b["stride"] for b in plan["bands"]] == [1, 2]
    mse = ((out - ref) ** 2).mean().item()
    peak = (ref.max() - ref.min()).item()
    psnr = 10 * torch.log10(torch.tensor(peak ** 2 / max(mse, 1e-20))).item()
    print(f"{family} displaced + strides {[b['stride'] for b in plan['bands']]}: PSNR vs stock {psnr:.1f} dB")
    assert torch.isfinite(out).all() and out.shape == ref.shape


def test_flux_edit_inputs_are_refused_with_a_message(server, dit_files):
    """Reference latents (Flux Kontext style) cannot be split into bands: a clear error, then recovery."""
    wf = _workflow("flux", stadi=TWO, steps=2, filename_prefix="kontext", width=128, height=128)
    wf["11"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    wf["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": wf["6"]["inputs"]["positive"],
                                                            "latent": ["11", 0]}}
    wf["6"]["inputs"]["positive"] = ["12", 0]
    with pytest.raises(ComfyExecutionError) as err:
        server.run(wf, timeout=300)
    assert "ref_latents" in str(err.value.entry) and "KSampler" in str(err.value.entry)
    ok = server.run(_workflow("flux", stadi=TWO, steps=2, filename_prefix="after_kontext", width=128, height=128),
                    timeout=600)
    assert torch.isfinite(_latent(server, ok)).all()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "workflows" / "api").glob("*.json")
                                        if '"UNETLoader"' in p.read_text()))
def test_every_shipped_dit_api_workflow_completes(server, name):
    """Each SD3/Flux API workflow as shipped, with the tiny files, a small size and no VAE decode
    (no 16-channel VAE here): the loaders are swapped for the tiny ones, the decode for SaveLatent."""
    wf = json.loads((REPO / "workflows" / "api" / name).read_text())
    family = "flux" if "flux" in name else "sd3"
    for node_id, node in list(wf.items()):
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "UNETLoader":
            inputs["unet_name"] = FILES[family]
        elif kind in ("DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader"):
            wf[node_id] = {"class_type": "CLIPLoader", "inputs": {"clip_name": FILES["clip-l"], "type": "sd3"}}
        elif kind in ("EmptySD3LatentImage", "EmptyLatentImage"):
            inputs.update(width=128, height=128)
        elif kind == "STADISampler":
            inputs["steps"] = 2
        elif kind == "STADIClusterProfile":
            inputs["devices"] = "cpu*2"
    for node_id in [k for k, n in wf.items() if n["class_type"] in ("VAELoader", "VAEDecode", "SaveImage",
                                                                      "PreviewImage")]:
        del wf[node_id]
    sampler = next(k for k, n in wf.items() if n["class_type"] == "STADISampler")
    wf["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": f"latents/{name}"}}
    stitch = [k for k, n in wf.items() if n["class_type"] == "STADIPatchStitch"]
    for node_id in stitch:  # the 16-channel bands stitched without a VAE must be the sampler's latent
        wf[node_id]["inputs"].pop("vae", None)
        wf["98"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id, 0],
                                                           "filename_prefix": f"latents/stitched_{name}"}}
    entry = server.run(wf, timeout=900)
    files = server.output_files(entry, "99", "latents")
    assert files and torch.isfinite(load_latent_file(files[0])).all()
    if stitch:
        stitched = load_latent_file(server.output_files(entry, "98", "latents")[0])
        assert torch.equal(stitched, load_latent_file(files[0]))


def test_no_weight_file_is_written_or_left(dit_files):
    """The weights reach the workers through the server's own memory (nodes/weights.py): nothing of the pack
    appears in /dev/shm or the temp dir while the server runs, and nothing is left after Ctrl-C."""
    import tempfile

    def entries():
        return {d / name for d in (Path("/dev/shm"), Path(tempfile.gettempdir())) if d.is_dir()
                for name in os.listdir(d) if "stadi" in name and not name.startswith(("stadi-comfy-", "stadi-test"))}

    before = entries()
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), diffusion_models=[dit_files["sd3"]],
                     text_encoders=[dit_files["clip-l"]]) as srv:
        srv.run(_workflow("sd3", stadi=TWO, steps=1, filename_prefix="leave", width=64, height=64), timeout=600)
        assert "base weights shared with the workers" in srv.log_path.read_text(errors="replace")
        during = entries() - before
    assert not during and not entries() - before, (during, entries() - before)


# -- the adapters against ComfyUI's own forward, in a subprocess with the checkout importable ------------

_ADAPTER_CHECK = r"""
import json, sys, types
import torch
sys.path[:0] = [sys.argv[1]]
import comfy.options, comfy.cli_args
comfy.cli_args.args.cpu = True
from stadi_core.models.spec import ModelSpec, build_model
from stadi_core.models import comfy_flux, comfy_mmdit
from stadi_core.runtime.shared_memory import share_tensors
import comfy.model_detection, comfy.utils

out = {}
for family, path in json.loads(sys.argv[2]).items():
    sd = comfy.utils.load_torch_file(path)
    mc = comfy.model_detection.model_config_from_unet(dict(sd), "")
    cls = type(mc.get_model({})).__mro__[0]
    net_cls = {"comfy-mmdit": "comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper",
               "comfy-flux": "comfy.ldm.flux.model:Flux"}[family]
    config = {k: v for k, v in mc.unet_config.items() if k != "dtype"}
    shared, handle = share_tensors(sd, adopt=False, label="check")  # what the server shares with its workers
    spec = ModelSpec(family=family, config=config, extra={"model_class": net_cls, "shared_weights": handle.to_dict()})
    net = build_model(spec)
    adapter = spec.adapter
    torch.manual_seed(0)
    x = torch.randn(1, 16, 24, 16)
    cond = adapter.make_conditioning(net, 1, seed=1)["cond"]
    t = torch.tensor([0.6 if family == "comfy-flux" else 600.0])
    extra = {k: v for k, v in cond.items() if k != "context"}
    stock = net(x, t, context=cond["context"], **extra)
    ours = adapter.forward(net, x, t, cond)  # no band context: the whole image, positions from row 0
    # SD3: a 16x16 table centre-cropped, so 28 rows start the crop one patch row higher; Flux: ids from row 8
    start, total = (4, 28) if family == "comfy-mmdit" else (16, 40)
    net._stadi_ctx = types.SimpleNamespace(local_only=False, row_start=start, total_rows=total)
    moved = adapter.forward(net, x, t, cond)  # the same rows told they sit 2 patch rows lower in a taller image
    out[family] = {"same": (ours - stock).abs().max().item(), "moved": (moved - stock).abs().max().item(),
                   "scale": stock.abs().max().item()}
print(json.dumps(out))
"""


def test_adapters_equal_comfyui_forward_and_positions_reach_the_output(dit_files):
    comfy = require_comfyui()
    files = {"comfy-mmdit": str(dit_files["sd3"]), "comfy-flux": str(dit_files["flux"])}
    proc = subprocess.run([sys.executable, "-c", _ADAPTER_CHECK, str(comfy), json.dumps(files)],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for family, r in result.items():
        print(family, r)
        assert r["same"] <= 1e-5 * r["scale"], f"{family}: the band forward differs from ComfyUI's own"
        # "same" is exactly 0 here; Flux's RoPE moves a random-weight output by ~1e-3 of its scale
        assert r["moved"] > 1e-4 * r["scale"], f"{family}: band positions do not reach the output"
