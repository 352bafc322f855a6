"""CFG-branch work units in the real ComfyUI (fetched checkout; STADI_COMFYUI_PATH).

cfg_split (cond and uncond on two workers), the uneven branch split (a fast worker takes the
whole cond branch and a band of uncond) and 2 branches x 2 bands on four workers, under the
stock KSampler through the STADI Parallel Model and in the STADI Sampler, each against the
stock KSampler in exact mode (relative to the latent's magnitude, as test_comfyui_lockstep).
"""

from __future__ import annotations

import copy

import pytest

from comfy_support import ComfyExecutionError, ComfyServer, comfyui_marks, load_latent_file, require_comfyui, \
    sd15_api_workflow

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
REL_TOL = 5e-6
# (devices, speeds, emulated slowdowns, what the plan's branch groups must be)
EQUAL_2 = ("cpu*2", "cpu:0=1, cpu:1=1", "", [("uncond", [1]), ("cond", [0])])
UNEVEN_2 = ("cpu*2", "cpu:0=2, cpu:1=1", "cpu:1=2", [("uncond", [0, 1]), ("cond", [0])])
FOUR = ("cpu*4", "", "", [("uncond", [2, 3]), ("cond", [0, 1])])


@pytest.fixture(scope="module")
def server(tiny_comfy_models):
    ckpt, lora = tiny_comfy_models
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt],
                     loras=[lora]) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


def _cluster(devices: str, speeds: str, slowdown: str) -> dict:
    return {"class_type": "STADIClusterProfile", "inputs": {"devices": devices, "backend": "gloo", "measure": False,
                                                            "speeds": speeds, "exclude": "",
                                                            "emulate_slowdown": slowdown}}


def _base(prefix: str, sampler: str, **kw) -> dict:
    kw = dict(dict(seed=5, steps=4, cfg=4.0, width=128, height=192), **kw)
    return sd15_api_workflow(CKPT, lora_name=LORA, save_image=False, filename_prefix=prefix, sampler_name=sampler,
                             **kw)


def _latent(server, wf, node="7") -> "torch.Tensor":  # noqa: F821
    entry = server.run(wf, timeout=900)
    return load_latent_file(server.output_files(entry, node, "latents")[0])


def _assert_exact(out, ref, what: str) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{what}: max |STADI - stock| = {diff:.3g} (|ref| max {scale:.3g}, relative {diff / scale:.2g})")
    assert diff <= REL_TOL * scale, f"{what}: relative {diff / scale:.3g}"


def _logged_groups(server, since: int) -> list[str]:
    return [line for line in server.log_text()[since:].splitlines() if "branch " in line and "rows [" in line]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("strategy,cluster", [("cfg_split", EQUAL_2), ("cfg_split+bands", UNEVEN_2),
                                              ("cfg_split+bands", FOUR)], ids=["split-2w", "uneven-2w", "2x2-4w"])
def test_parallel_model_branch_split_equals_ksampler(server, strategy, cluster, sampler):
    devices, speeds, slowdown, groups = cluster
    wf = _base(f"pm{strategy}{devices[-1]}{sampler}", sampler)
    ref = _latent(server, wf)
    par = copy.deepcopy(wf)
    par["50"] = _cluster(devices, speeds, slowdown)
    par["51"] = {"class_type": "STADIParallelModel", "inputs": {"model": wf["6"]["inputs"]["model"], "mode": "exact",
                                                                "warmup_steps": 2, "cluster": ["50", 0],
                                                                "strategy": strategy}}
    par["6"]["inputs"]["model"] = ["51", 0]
    since = len(server.log_text())
    _assert_exact(_latent(server, par), ref, f"{strategy} {devices} {sampler}")
    logged = _logged_groups(server, since)
    for branch, ranks in groups:  # the run really split the branches this way
        line = next((ln for ln in logged if f"branch {branch}:" in ln), None)
        assert line is not None, server.log_tail(40)
        assert [int(p.split()[0]) for p in line.split("rank ")[1:]] == ranks, line


def test_stadi_sampler_uneven_branch_split_equals_ksampler(server):
    wf = _base("ssuneven", "dpmpp_2m")
    ref = _latent(server, wf)
    st = _base("ssuneven_stadi", "dpmpp_2m", sampler_class="STADISampler", sampler_extra_inputs={
        "mode": "exact", "warmup_steps": 2, "strides": "auto", "cluster": ["50", 0], "strategy": "cfg_split+bands"})
    st["50"] = _cluster(*UNEVEN_2[:3])
    entry = server.run(st, timeout=900)
    payload = entry["outputs"]["6"]["stadi_plan"][0]
    assert payload["strategy"] == "cfg_split+bands", payload
    assert [(g["branches"], g["ranks"]) for g in payload["groups"]] == [(["uncond"], [0, 1]), (["cond"], [0])]
    _assert_exact(load_latent_file(server.output_files(entry, "7", "latents")[0]), ref, "STADI Sampler uneven split")


def test_auto_on_two_cpu_workers_of_one_host_runs_one_device_and_says_why(server):
    st = _base("ssauto", "euler", sampler_class="STADISampler", sampler_extra_inputs={
        "mode": "exact", "warmup_steps": 2, "strides": "auto", "cluster": ["50", 0], "strategy": "auto"})
    st["50"] = _cluster("cpu*2", "", "")
    entry = server.run(st, timeout=900)
    payload = entry["outputs"]["6"]["stadi_plan"][0]
    assert len(payload["bands"]) == 1, payload
    why = [n for n in payload["notes"] if n.startswith("strategy auto:")]
    assert why and "single cpu:" in why[0] and "cfg_split" in why[0] and "bands" in why[0], payload["notes"]


def test_cfg_split_at_cfg_1_is_refused_with_the_fix(server):
    st = _base("sscfg1", "euler", sampler_class="STADISampler", sampler_extra_inputs={
        "mode": "exact", "warmup_steps": 2, "strides": "off", "cluster": ["50", 0], "strategy": "cfg_split"})
    st["6"]["inputs"]["cfg"] = 1.0
    st["50"] = _cluster(*EQUAL_2[:3])
    with pytest.raises(ComfyExecutionError) as err:
        server.run(st, timeout=300)
    text = str(err.value.entry)
    assert "CFG is 1" in text and "use strategy bands or auto" in text, text[-1500:]


def test_displaced_uneven_split_stays_close_to_exact(server):
    """Displaced context inside the uncond group: the run finishes after warmup with stale context and
    stays close to the stock image (the exact split equals it; displaced must not be a different image)."""
    import math

    wf = _base("pmdisp", "euler", steps=6)
    ref = _latent(server, wf)
    par = copy.deepcopy(wf)
    par["50"] = _cluster(*UNEVEN_2[:3])
    par["51"] = {"class_type": "STADIParallelModel", "inputs": {"model": wf["6"]["inputs"]["model"],
                                                                "mode": "displaced", "warmup_steps": 2,
                                                                "cluster": ["50", 0], "strategy": "cfg_split+bands"}}
    par["6"]["inputs"]["model"] = ["51", 0]
    out = _latent(server, par)
    assert out.isfinite().all()
    mse = float(((out - ref) ** 2).mean())
    psnr = 10 * math.log10(float(ref.max() - ref.min()) ** 2 / mse) if mse else math.inf
    print(f"displaced uneven split vs stock: PSNR {psnr:.1f} dB")
    assert 20.0 < psnr, psnr
