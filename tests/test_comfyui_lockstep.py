"""Lockstep execution in the real ComfyUI: the STADI Parallel Model under stock sampler nodes, and
the STADI Sampler's own lockstep/strided split (fetched checkout; STADI_COMFYUI_PATH).

Every comparison is exact mode against the stock path with the same seed, relative to the
latent's magnitude: the stock path's own float floor here is 2-4e-6 of max |x| (KSampler batch
of 1 vs 2), a band bug (wrong halo, norm or attention span) gives ~1e-2.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from comfy_support import ComfyExecutionError, ComfyServer, comfyui_marks, load_latent_file, require_comfyui, \
    sd15_api_workflow

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
REL_TOL = 5e-6
TWO = ("cpu*2", "cpu:0=2, cpu:1=3")
THREE = ("cpu*3", "cpu:0=1, cpu:1=2, cpu:2=3")
LONG_PROMPT = " ".join(["a red house by a calm lake under a cloudy sky with tall pine trees"] * 30)  # > 5 chunks



@pytest.fixture(scope="module")
def server(tiny_comfy_models):
    ckpt, lora = tiny_comfy_models
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt],
                     loras=[lora]) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


def _cluster(devices_speeds) -> dict:
    devices, speeds = devices_speeds
    return {"class_type": "STADIClusterProfile", "inputs": {"devices": devices, "backend": "gloo", "measure": False,
                                                            "speeds": speeds, "exclude": "", "emulate_slowdown": ""}}


def _parallel(wf: dict, cluster=TWO, mode: str = "exact", samplers=("6",), warmup: int = 2,
              strategy: str = "bands") -> dict:
    """The same workflow with a STADI Parallel Model between the model and each sampler node."""
    wf = copy.deepcopy(wf)
    wf["50"] = _cluster(cluster)
    for i, node in enumerate(samplers):
        wf[f"5{i + 1}"] = {"class_type": "STADIParallelModel", "inputs": {
            "model": wf[node]["inputs"]["model"], "mode": mode, "warmup_steps": warmup, "cluster": ["50", 0],
            "strategy": strategy}}
        wf[node]["inputs"]["model"] = [f"5{i + 1}", 0]
    return wf


def _with_model_node(wf: dict, node_id: str, class_type: str, **inputs) -> dict:
    """Insert a MODEL -> MODEL node (RescaleCFG, EasyCache...) before the sampler "6"."""
    wf = copy.deepcopy(wf)
    wf[node_id] = {"class_type": class_type, "inputs": {"model": wf["6"]["inputs"]["model"], **inputs}}
    wf["6"]["inputs"]["model"] = [node_id, 0]
    return wf


def _latent(server, wf, node="7", timeout=600) -> torch.Tensor:
    entry = server.run(wf, timeout=timeout)
    files = server.output_files(entry, node, "latents")
    assert files, f"no latent saved: {entry.get('outputs')}"
    return load_latent_file(files[0])


def _assert_exact(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{what}: max |STADI - stock| = {diff:.3g} (|ref| max {scale:.3g}, relative {diff / scale:.2g})")
    assert diff <= REL_TOL * scale, f"{what}: relative {diff / scale:.3g}"


def _base(prefix: str, **kw) -> dict:
    kw.setdefault("seed", 3)
    kw.setdefault("steps", 4)
    kw.setdefault("cfg", 4.0)
    kw.setdefault("width", 128)
    kw.setdefault("height", 192)
    return sd15_api_workflow(CKPT, lora_name=LORA, save_image=False, filename_prefix=prefix, **kw)


@pytest.mark.parametrize("cluster", [TWO, THREE], ids=["2w", "3w"])
def test_rescale_cfg_under_ksampler_equals_stock(server, cluster):
    wf = _with_model_node(_base(f"rescale{len(cluster[1])}", height=256), "12", "RescaleCFG", multiplier=0.7)
    ref = _latent(server, wf)
    _assert_exact(_latent(server, _parallel(wf, cluster)), ref, f"RescaleCFG + KSampler, {cluster[0]}")


def test_perpneg_guider_with_custom_sigmas_under_sampler_custom_advanced(server):
    wf = _base("perpneg")
    sampler = wf.pop("6")["inputs"]
    wf["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}}
    wf["21"] = {"class_type": "PerpNegGuider", "inputs": {"model": sampler["model"], "positive": ["3", 0],
                                                          "negative": ["4", 0], "empty_conditioning": ["20", 0],
                                                          "cfg": 4.0, "neg_scale": 1.5}}
    wf["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
    wf["23"] = {"class_type": "KarrasScheduler", "inputs": {"steps": 4, "sigma_max": 10.0, "sigma_min": 0.1,
                                                            "rho": 7.0}}
    wf["24"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}}
    wf["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["24", 0], "guider": ["21", 0],
                                                                 "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                 "latent_image": ["5", 0]}}
    ref = _latent(server, wf)
    _assert_exact(_latent(server, _parallel(wf, samplers=("21",))), ref, "PerpNegGuider + Karras sigmas")


def test_ksampler_advanced_second_half_without_added_noise(server):
    wf = _base("adv")
    first = wf["6"]["inputs"]
    common = {k: first[k] for k in ("model", "cfg", "sampler_name", "scheduler", "positive", "negative")}
    wf["6"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "noise_seed": 4, "steps": 6, "latent_image": ["5", 0], "start_at_step": 0,
        "end_at_step": 3, "return_with_leftover_noise": "enable"}}
    wf["30"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "noise_seed": 4, "steps": 6, "latent_image": ["6", 0], "start_at_step": 3,
        "end_at_step": 6, "return_with_leftover_noise": "disable"}}
    wf["7"]["inputs"]["samples"] = ["30", 0]
    ref = _latent(server, wf)
    _assert_exact(_latent(server, _parallel(wf, samplers=("6", "30"))), ref, "KSamplerAdvanced 0-3 + 3-6")


def test_a_positive_of_five_clip_chunks_equals_stock(server):
    wf = _base("long", positive=LONG_PROMPT)
    ref = _latent(server, wf)
    _assert_exact(_latent(server, _parallel(wf)), ref, "5-chunk positive, separate cond/uncond calls")


@pytest.mark.parametrize("width,height", [(136, 200), (128, 136)])
@pytest.mark.parametrize("cluster", [TWO, THREE], ids=["2w", "3w"])
def test_sizes_off_the_alignment_equal_stock(server, width, height, cluster):
    if cluster is THREE and height < 192:
        pytest.skip("a 17-row latent has two whole 8-row units: at most 2 bands")
    wf = _base(f"size{width}x{height}", width=width, height=height)
    ref = _latent(server, wf)
    _assert_exact(_latent(server, _parallel(wf, cluster)), ref, f"{width}x{height} px, {cluster[0]}")


def test_dpm_adaptive_equals_stock(server):
    wf = _base("adaptive", sampler_name="dpm_adaptive", steps=3, cfg=2.0)
    ref = _latent(server, wf, timeout=900)
    _assert_exact(_latent(server, _parallel(wf), timeout=900), ref, "dpm_adaptive")


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
def test_step_cache_in_lockstep_equals_the_same_cache_on_one_device(server, cache):
    nocache = _base(f"no{cache}", steps=8)
    wf = _with_model_node(nocache, "12", cache, reuse_threshold=1.5, start_percent=0.0, end_percent=1.0,
                          verbose=False)
    ref = _latent(server, wf)
    plain = _latent(server, nocache)
    assert (ref - plain).abs().max().item() > 1e-3 * plain.abs().max().item(), f"{cache} skipped nothing here"
    _assert_exact(_latent(server, _parallel(wf)), ref, f"{cache} + KSampler")


# -- displaced mode and strides: cond and uncond sent apart keep their own context and reuse -----------------

def _concat(wf: dict, first: str, links: list, node_prefix: str) -> list:
    """ConditioningConcat of ``links`` onto ``first`` (token-wise: one CLIP chunk more per link)."""
    link = [first, 0]
    for i, other in enumerate(links):
        wf[f"{node_prefix}{i}"] = {"class_type": "ConditioningConcat",
                                   "inputs": {"conditioning_to": link, "conditioning_from": other}}
        link = [f"{node_prefix}{i}", 0]
    return link


def _five_chunk_pair(prefix: str, batched: bool, sampler_class="KSampler", extra=None) -> dict:
    """A positive of exactly 5 CLIP chunks against a negative that ComfyUI sends apart (1 chunk: 385 vs
    77 tokens is more padding than it batches) or batched with it (the negative's chunk concatenated 5
    times: attention over repeated tokens is the same attention, and 385 = 385 tokens batch)."""
    wf = sd15_api_workflow(CKPT, save_image=False, filename_prefix=prefix, seed=8, steps=6, cfg=4.0, width=128,
                           height=192, sampler_class=sampler_class, sampler_extra_inputs=extra)
    texts = ["a red house by a lake", "a cloudy sky", "tall pine trees", "a small boat", "mountains at dawn"]
    for i, text in enumerate(texts[1:]):
        wf[f"3{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    wf["3"]["inputs"]["text"] = texts[0]
    wf["6"]["inputs"]["positive"] = _concat(wf, "3", [[f"3{i}", 0] for i in range(4)], "35")
    if batched:
        wf["6"]["inputs"]["negative"] = _concat(wf, "4", [["4", 0]] * 4, "45")
    return wf


def _calls_per_step(server) -> list[str]:
    return [line.split("up to ")[1].split(" per step")[0] for line in server.log_text().splitlines()
            if "STADI lockstep:" in line]


def test_displaced_keeps_cond_and_uncond_context_apart(server):
    seen = len(_calls_per_step(server))
    apart = _latent(server, _parallel(_five_chunk_pair("dapart", False), mode="displaced", warmup=2))
    together = _latent(server, _parallel(_five_chunk_pair("dtogether", True), mode="displaced", warmup=2))
    assert _calls_per_step(server)[seen:] == ["2", "1"], "cond/uncond were not sent apart, then batched"
    _assert_exact(apart, together, "displaced, cond/uncond apart vs batched")


def test_strides_keep_cond_and_uncond_reuse_apart(server):
    extra = {"mode": "displaced", "warmup_steps": 1, "strides": "auto", "cluster": ["50", 0]}
    outs, evals = [], []
    for batched in (False, True):
        wf = _five_chunk_pair(f"s{batched}", batched, "STADISampler", extra)
        wf["50"] = _cluster(("cpu*2", "cpu:0=1, cpu:1=0.3"))
        entry = server.run(wf, timeout=600)
        bands = entry["outputs"]["6"]["stadi_plan"][0]["bands"]
        assert [b["stride"] for b in bands] == [1, 2], bands
        evals.append(bands[0]["evals"])
        outs.append(load_latent_file(server.output_files(entry, "7", "latents")[0]))
    assert evals[0] == 2 * evals[1], f"cond/uncond were not sent apart, then batched: evals {evals}"
    _assert_exact(outs[0], outs[1], "strides (1, 2), cond/uncond apart vs batched")


# -- the STADI Sampler: strided runs refuse what they cannot reproduce; lockstep takes it -----------------------

def _stadi(prefix: str, speeds: str, mode: str = "displaced", **kw) -> dict:
    wf = _base(prefix, sampler_class="STADISampler", sampler_extra_inputs={
        "mode": mode, "warmup_steps": 1, "strides": "auto", "cluster": ["50", 0]}, **kw)
    wf["50"] = _cluster(("cpu*2", speeds))
    return wf


@pytest.mark.parametrize("node,inputs,named", [
    ("RescaleCFG", {"multiplier": 0.7}, "RescaleCFG"),
    ("EasyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}, "easycache"),
])
def test_strided_stadi_sampler_refuses_image_wide_nodes(server, node, inputs, named):
    wf = _with_model_node(_stadi(f"refuse{node}", "cpu:0=1, cpu:1=0.3"), "12", node, **inputs)
    with pytest.raises(ComfyExecutionError) as err:
        server.run(wf, timeout=300)
    text = str(err.value.entry)
    assert named in text and "set strides off" in text, text[-2000:]
    wf["6"]["inputs"]["strides"] = "off"  # the fix the message names: one sampler loop
    wf["6"]["inputs"]["mode"] = "exact"
    out = _latent(server, wf)
    ref_wf = _with_model_node(_base(f"refuse{node}ref"), "12", node, **inputs)
    _assert_exact(out, _latent(server, ref_wf), f"{node} with strides off")


def _notes(entry) -> list[str]:
    return entry["outputs"]["6"]["stadi_plan"][0]["notes"]


@pytest.mark.parametrize("strides", ["off", "auto"], ids=["lockstep", "strided"])
def test_the_prompt_after_an_interrupt_loads_no_weights(server, strides):
    def stadi(prefix, steps):
        wf = _stadi(prefix, "cpu:0=1, cpu:1=0.3", steps=steps)
        wf["6"]["inputs"]["strides"] = strides
        return wf

    warm = server.run(stadi("warm", 2), timeout=300)
    lockstep = [n for n in _notes(warm) if n.startswith("lockstep:")]
    assert bool(lockstep) == (strides == "off"), _notes(warm)  # the execution shape this case is about
    with server.listen() as ws:
        pid = server.queue(stadi("long", 60))
        deadline = time.monotonic() + 120
        while len(ws.of_type("progress", pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ws.of_type("progress", pid), "no progress before the interrupt"
        server.interrupt()
        with pytest.raises(ComfyExecutionError):
            server.wait(pid, timeout=120)
    after = server.run(stadi("after", 2), timeout=300)
    assert "weights already loaded (warm workers)" in _notes(after), (_notes(warm), _notes(after), server.log_tail(30))


def test_a_parallel_model_into_a_stadi_sampler_is_refused_with_the_fix(server):
    wf = _stadi("nested", "cpu:0=2, cpu:1=3", mode="exact")
    wf["51"] = {"class_type": "STADIParallelModel", "inputs": {"model": wf["6"]["inputs"]["model"], "mode": "exact",
                                                               "warmup_steps": 2, "cluster": ["50", 0]}}
    wf["6"]["inputs"]["model"] = ["51", 0]
    with pytest.raises(ComfyExecutionError) as err:
        server.run(wf, timeout=300)
    assert "already comes from a STADI Parallel Model" in str(err.value.entry)
