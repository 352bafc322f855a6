"""The ComfyUI node layer without ComfyUI: schemas, the cluster profile, the plan picture, stitching.

Fast and CPU-only; nothing here imports comfy. (The nodes inside a real ComfyUI server are
covered by the comfyui-marked tests.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from stadi_core.cluster import ClusterSpec
from stadi_core.planner import make_plan
from stadi_pack.nodes import device_discovery
from stadi_pack.nodes.cluster_profile_node import GPUClusterProfile, build_cluster
from stadi_pack.nodes.device_discovery import devices_fingerprint, discover_devices
from stadi_pack.nodes.patch_stitch_node import NO_VAE_TEXT, PatchStitch, band_extensions, decode_bands, stitch_decoded
from stadi_pack.nodes.plan_picture import device_colour, plan_image
from stadi_pack.nodes.types import StadiCluster, StadiPatches

DEVICE_KEYS = {"name", "kind", "label", "memory_total_mb", "memory_used_mb", "utilization_pct", "source"}


def gpus(n: int) -> list[dict]:
    """A discovery result for a machine with n GPUs (and the CPU entry)."""
    out = [{"name": f"cuda:{i}", "kind": "cuda", "index": i, "label": "Fake GPU", "memory_total_mb": 24000,
            "memory_used_mb": 100, "utilization_pct": 0.0, "source": "pynvml", "uuid": f"u{i}"} for i in range(n)]
    return out + [{"name": "cpu:0", "kind": "cpu", "index": 0, "label": "Fake CPU (8 cores)", "cores": 8,
                   "memory_total_mb": 64000, "memory_used_mb": 1000, "utilization_pct": None, "source": "cpu"}]


# ------------------------------------------------------------------------------ schemas
def test_registry_has_the_two_nodes():
    import stadi_pack.nodes as stadi_nodes

    assert stadi_nodes.NODE_CLASS_MAPPINGS["STADIClusterProfile"] is GPUClusterProfile
    assert stadi_nodes.NODE_CLASS_MAPPINGS["STADIPatchStitch"] is PatchStitch
    assert "STADIClusterProfile" in stadi_nodes.NODE_DISPLAY_NAME_MAPPINGS


def test_cluster_profile_schema():
    it = GPUClusterProfile.INPUT_TYPES()
    assert set(it) == {"required"}
    req = it["required"]
    assert list(req) == ["devices", "backend", "measure", "speeds", "exclude", "emulate_slowdown"]
    assert req["devices"][0] == "STRING" and req["devices"][1]["default"] == "auto"
    assert req["backend"][0] == ["auto", "nccl", "gloo"]
    assert req["measure"][0] == "BOOLEAN" and req["measure"][1]["default"] is True
    for k in ("speeds", "exclude", "emulate_slowdown"):
        assert req[k][0] == "STRING" and req[k][1]["default"] == ""
    assert GPUClusterProfile.RETURN_TYPES == ("STADI_CLUSTER",)
    assert GPUClusterProfile.RETURN_NAMES == ("cluster",)
    assert GPUClusterProfile.CATEGORY == "sampling/STADI"
    assert GPUClusterProfile.OUTPUT_NODE is False
    assert callable(getattr(GPUClusterProfile(), GPUClusterProfile.FUNCTION))
    assert GPUClusterProfile.DESCRIPTION


def test_parallel_model_schema():
    from stadi_pack.nodes.parallel_model_node import STADIParallelModel

    import stadi_pack.nodes as stadi_nodes

    assert stadi_nodes.NODE_CLASS_MAPPINGS["STADIParallelModel"] is STADIParallelModel
    it = STADIParallelModel.INPUT_TYPES()
    assert list(it["required"]) == ["model", "mode", "warmup_steps"] and it["required"]["model"][0] == "MODEL"
    assert it["required"]["mode"][0] == ["exact", "displaced"] and it["required"]["mode"][1]["default"] == "exact"
    assert list(it["optional"]) == ["cluster", "strategy", "compile", "context"]
    assert it["optional"]["cluster"][0] == "STADI_CLUSTER" and it["optional"]["context"][1]["default"] == "full"
    from stadi_core.parallel.options import ContextOptions

    for choice in it["optional"]["context"][0]:  # every choice the node offers is one the engine parses
        if choice != "auto":
            ContextOptions.parse(choice)
    assert it["optional"]["strategy"][0] == ["auto", "bands", "cfg_split", "cfg_split+bands"]
    assert it["optional"]["strategy"][1]["default"] == "auto"
    assert STADIParallelModel.RETURN_TYPES == ("MODEL",) and STADIParallelModel.CATEGORY == "sampling/STADI"
    assert callable(getattr(STADIParallelModel(), STADIParallelModel.FUNCTION)) and STADIParallelModel.DESCRIPTION


def test_patch_stitch_schema():
    it = PatchStitch.INPUT_TYPES()
    assert list(it["required"]) == ["patches", "overlap_rows"]
    assert it["required"]["patches"][0] == "STADI_PATCHES"
    ov = it["required"]["overlap_rows"]
    assert ov[0] == "INT" and (ov[1]["default"], ov[1]["min"], ov[1]["max"]) == (4, 0, 64)
    assert list(it["optional"]) == ["vae", "decode_on"] and it["optional"]["vae"][0] == "VAE"
    assert it["optional"]["decode_on"][0] == ["server", "devices"]
    assert it["optional"]["decode_on"][1]["default"] == "server"
    assert PatchStitch.RETURN_TYPES == ("LATENT", "IMAGE", "IMAGE")
    assert PatchStitch.RETURN_NAMES == ("latent", "plan", "image")
    assert PatchStitch.CATEGORY == "sampling/STADI"
    assert callable(getattr(PatchStitch(), PatchStitch.FUNCTION))


def test_node_modules_do_not_import_comfy():
    code = ("import sys; sys.path.insert(0, 'tests'); import pack_loader, stadi_pack.nodes.cluster_profile_node, "
            "stadi_pack.nodes.patch_stitch_node, stadi_pack.nodes.plan_picture, stadi_pack.nodes.device_discovery; "
            "print(sorted(m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'nodes', 'server', 'folder_paths'))))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ discovery
def test_discovery_on_this_machine_is_jsonable():
    devs = discover_devices()
    json.dumps(devs)
    assert devs[-1]["name"] == "cpu:0" and devs[-1]["kind"] == "cpu" and devs[-1]["cores"] >= 1
    for d in devs:
        assert DEVICE_KEYS <= set(d)
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [d["name"] for d in devs[:-1]] == [f"cuda:{i}" for i in range(n_cuda)]


def test_discovery_matches_nvml_to_torch_numbering(monkeypatch):
    """NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES: match by UUID."""

    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    nv = [  # NVML order: the 3090 first
        dict(name=b"RTX 3090", uuid="GPU-bbbb", total=24 << 30, used=3 << 30, util=50, procs=[(999, 2 << 30)]),
        dict(name="RTX 4090", uuid="GPU-aaaa", total=24 << 30, used=1 << 30, util=5, procs=[]),
    ]
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: len(nv)
    fake.nvmlDeviceGetHandleByIndex = lambda i: nv[i]
    fake.nvmlDeviceGetName = lambda h: h["name"]
    fake.nvmlDeviceGetMemoryInfo = lambda h: Obj(total=h["total"], used=h["used"])
    fake.nvmlDeviceGetUtilizationRates = lambda h: Obj(gpu=h["util"])
    fake.nvmlDeviceGetUUID = lambda h: h["uuid"]
    fake.nvmlDeviceGetComputeRunningProcesses = lambda h: [Obj(pid=p, usedGpuMemory=m) for p, m in h["procs"]]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # torch order: the 4090 is cuda:0 (e.g. CUDA_DEVICE_ORDER=FASTEST_FIRST)
    props = [Obj(name="torch 4090", total_memory=24 << 30, uuid="aaaa"), Obj(name="torch 3090", total_memory=24 << 30, uuid="bbbb")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    devs = discover_devices()
    json.dumps(devs)
    assert [(d["name"], d["label"], d["source"]) for d in devs[:2]] == [
        ("cuda:0", "RTX 4090", "pynvml"), ("cuda:1", "RTX 3090", "pynvml")]
    assert devs[1]["utilization_pct"] == 50.0 and devs[1]["memory_used_mb"] == 3072
    assert devs[1]["memory_used_by_others_mb"] == 2048 and devs[0]["memory_used_by_others_mb"] == 0
    assert devs[0]["memory_total_mb"] == 24576


def test_discovery_without_pynvml_uses_torch(monkeypatch):
    class Props:
        name, total_memory, uuid = "Torch GPU", 8 << 30, "cccc"

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(device_discovery, "_has_context", lambda t, i: False)  # never create a context
    (d, cpu) = discover_devices()
    assert (d["name"], d["label"], d["source"], d["memory_total_mb"]) == ("cuda:0", "Torch GPU", "torch", 8192)
    assert d["memory_used_mb"] is None and d["utilization_pct"] is None
    assert cpu["source"] == "cpu"


def test_fingerprint_follows_devices_not_load():
    a = gpus(2)
    busy = [dict(d, utilization_pct=99.0, memory_used_mb=20000) for d in a]
    assert devices_fingerprint(a) == devices_fingerprint(busy)
    assert devices_fingerprint(a) != devices_fingerprint(gpus(3))
    assert devices_fingerprint(a) == devices_fingerprint([dict(d, memory_total_mb=1) for d in a])  # nvml vs torch
    swapped = [dict(d, uuid="other") if d["name"] == "cuda:1" else d for d in a]
    assert devices_fingerprint(a) != devices_fingerprint(swapped)
    assert GPUClusterProfile.IS_CHANGED(devices="auto") == GPUClusterProfile.IS_CHANGED(devices="auto")


# ------------------------------------------------------------------------------ cluster profile
def test_profile_node_on_this_machine():
    out = GPUClusterProfile().build("auto", "auto", True, "", "", "")
    (cluster,) = out["result"]
    assert isinstance(cluster, StadiCluster) and cluster.measure is True
    ui = out["ui"]["stadi_devices"]
    assert isinstance(ui, list) and len(ui) == 1
    json.dumps(out["ui"])
    assert set(ui[0]) == {"devices", "notes", "backend"}
    if not torch.cuda.is_available():
        assert cluster.spec.names() == ("cpu:0", "cpu:1")
        assert ui[0]["backend"] == "gloo"
        assert any("no CUDA device" in n for n in cluster.notes)
        (cpu,) = ui[0]["devices"]
        assert cpu["in_cluster"] and [w["name"] for w in cpu["workers"]] == ["cpu:0", "cpu:1"]


def test_auto_takes_every_gpu():
    c = build_cluster("auto", discovered=gpus(3))
    assert c.spec.names() == ("cuda:0", "cuda:1", "cuda:2") and not c.notes
    assert [d["in_cluster"] for d in c.devices_info] == [True, True, True, False]


def test_auto_without_gpu_gives_two_cpu_workers():
    c = build_cluster("auto", discovered=gpus(0))
    assert c.spec.names() == ("cpu:0", "cpu:1") and c.spec.resolved_backend() == "gloo"


def test_missing_cuda_device_is_a_note_not_a_crash():
    c = build_cluster("cuda:0, cuda:1", discovered=gpus(1))
    assert c.spec.names() == ("cuda:0",)
    assert any("cuda:1" in n and "not on this machine" in n for n in c.notes)


def test_missing_everything_falls_back_to_cpu(caplog):
    with caplog.at_level("WARNING", logger="stadi"):
        c = build_cluster("cuda:0,cuda:1", backend="nccl", speeds="cuda:1=0.5", discovered=gpus(0))
    assert c.spec.names() == ("cpu:0", "cpu:1")
    assert c.spec.backend == "gloo"
    text = " | ".join(c.notes)
    assert "cuda:0, cuda:1 are not on this machine" in text and "falling back" in text and "gloo" in text
    assert "not on this machine" in caplog.text


def test_overrides_become_device_specs():
    c = build_cluster("auto", speeds="cuda:1=0.5, cuda:0=1", exclude="cuda:2", emulate_slowdown="cuda:1=2",
                      measure=False, discovered=gpus(3))
    d0, d1, d2 = c.spec.devices
    assert (d0.name, d0.relative_speed, d0.slowdown, d0.excluded) == ("cuda:0", 1.0, 1.0, False)
    assert (d1.name, d1.relative_speed, d1.slowdown, d1.excluded) == ("cuda:1", 0.5, 2.0, False)
    assert (d2.name, d2.excluded) == ("cuda:2", True)
    assert c.spec.names() == ("cuda:0", "cuda:1") and c.measure is False
    assert c.spec.speeds() == (1.0, 0.5)
    info = {d["name"]: d for d in c.devices_info}
    assert info["cuda:2"]["in_cluster"] is False and info["cuda:2"]["workers"][0]["excluded"] is True
    # the spec survives a JSON round trip (it crosses process boundaries)
    assert ClusterSpec.from_dict(json.loads(json.dumps(c.spec.to_dict()))) == c.spec


def test_explicit_cpu_workers_with_overrides():
    c = build_cluster("cpu*3", emulate_slowdown="cpu:2=3", exclude="cpu:0", discovered=gpus(2))
    assert c.spec.names() == ("cpu:1", "cpu:2")
    assert c.spec.devices[2].slowdown == 3.0


def test_a_slowdown_can_start_at_a_later_step():
    c = build_cluster("cpu*2", emulate_slowdown="cpu:1=2@4", discovered=gpus(0))
    slow = c.spec.devices[1]
    assert (slow.slowdown, slow.slowdown_from) == (2.0, 4)
    assert slow.planning_speed() == 1.0  # at full speed when the run is planned
    assert ClusterSpec.from_dict(json.loads(json.dumps(c.spec.to_dict()))) == c.spec


def test_overrides_for_devices_outside_the_cluster_are_noted():
    c = build_cluster("cuda:0", speeds="cuda:1=0.5", discovered=gpus(2))
    assert any("speeds: cuda:1 not in the cluster" in n for n in c.notes)


@pytest.mark.parametrize("kwargs, fix", [
    (dict(speeds="cuda:1=fast"), "e.g. 'cuda:0=1, cuda:1=0.5'"),
    (dict(speeds="cuda:1 0.5"), "DEVICE=NUMBER"),
    (dict(speeds="cuda:1=0"), "> 0"),
    (dict(speeds="gpu1=1"), "is not a device name"),
    (dict(speeds="cuda:0=1, cuda:0=2"), "given twice"),
    (dict(emulate_slowdown="cuda:1=0.5"), ">= 1"),
    (dict(emulate_slowdown="cuda:1=slow"), "e.g. 'cuda:1=2'"),
    (dict(emulate_slowdown="cuda:1=2@soon"), "e.g. 'cpu:1=2@4'"),
    (dict(exclude="gpu2"), "'cuda:2'"),
    (dict(devices="gpu:0"), "'auto'"),
    (dict(devices="cuda:0, cuda:0"), "listed twice"),
    (dict(backend="mpi"), "auto, nccl or gloo"),
])
def test_bad_syntax_says_what_to_write(kwargs, fix):
    with pytest.raises(ValueError) as e:
        build_cluster(**kwargs, discovered=gpus(2))
    assert fix in str(e.value)


def test_excluding_every_device_is_an_error():
    with pytest.raises(ValueError, match="leave at least one"):
        build_cluster("cuda:0, cuda:1", exclude="cuda:0, cuda:1", discovered=gpus(2))


def test_nccl_for_explicit_cpu_workers_is_an_error():
    with pytest.raises(ValueError, match="gloo"):
        build_cluster("cpu*2", backend="nccl", discovered=gpus(0))


# ------------------------------------------------------------------------------ plan picture
def _plan_and_report(devices=("cuda:0", "cuda:1", "cpu:0")):
    plan = make_plan(64, [1.0, 0.6, 0.3][: len(devices)], devices=list(devices), steps=10, warmup=2).to_dict()
    ranks = [{"rank": b["rank"], "device": b["device"], "rows": b["rows"], "stride": b["stride"], "evals": 7,
              "busy_s": 1.5, "comm_s": 0.1, "wall_s": 2.0, "idle_pct": 25.0} for b in plan["bands"]]
    report = {"plan": plan, "wall_s": 3.2, "denoise_s": 2.0, "notes": ["an example note"], "ranks": ranks}
    return plan, report


def test_plan_image_shape_range_and_colours():
    plan, report = _plan_and_report()
    img = plan_image(plan, report, width=512)
    assert img.dtype == torch.float32 and img.dim() == 4 and img.shape[0] == 1 and img.shape[3] == 3
    assert img.shape[2] == 512 and img.shape[1] > 100
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # the right edge crosses every stripe without text: each band's colour is there, in order
    column = (img[0, :, -2] * 255).round().to(torch.int64)
    seen = []
    for px in column.tolist():
        t = tuple(px)
        if not seen or seen[-1] != t:
            seen.append(t)
    colours = [device_colour(b["device"]) for b in plan["bands"]]
    assert len(set(colours)) == len(colours)
    positions = [seen.index(c) for c in colours]
    assert positions == sorted(positions)
    # stripes are proportional to rows
    heights = [sum(1 for px in column.tolist() if tuple(px) == c) for c in colours]
    rows = [b["rows"] for b in plan["bands"]]
    for h, r in zip(heights, rows):
        assert h / sum(heights) == pytest.approx(r / sum(rows), abs=0.03)


def test_plan_image_is_deterministic_and_tolerates_a_missing_report():
    plan, report = _plan_and_report()
    assert torch.equal(plan_image(plan, report), plan_image(plan, report))
    img = plan_image(plan, {})
    assert img.shape[-1] == 3 and torch.isfinite(img).all()
    assert device_colour("cuda:1") == device_colour("cuda:1") != device_colour("cuda:0")
    assert device_colour("cpu:0") != device_colour("cuda:0")


# ------------------------------------------------------------------------------ stitching
def _patches(rows=(24, 16, 24), batch=2, channels=4, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, channels, sum(rows), width, generator=g)
    bands = list(torch.split(full, list(rows), dim=2))
    plan = make_plan(sum(rows), [1.0] * len(rows), devices=[f"cuda:{i}" for i in range(len(rows))],
                     steps=4, warmup=1, align=8).to_dict()
    start = 0
    for b, r in zip(plan["bands"], rows):  # force the given rows into the plan
        b["row_start"], b["rows"] = start, r
        start += r
    extra = {"batch_index": [3, 4], "noise_mask": torch.ones(1, 1, 8, 8)}
    return full, StadiPatches(plan=plan, bands=bands, report={}, latent_extra=extra)


def row_decoder(lat: torch.Tensor) -> torch.Tensor:
    """A decoder that is a pure function of position: each latent row -> 8 pixel rows."""
    x = lat[:, :3] * 0.5 + 0.25 * torch.tanh(lat[:, 1:4])
    return x.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).movedim(1, -1)


def blur_decoder(lat: torch.Tensor) -> torch.Tensor:
    """A decoder with a receptive field (3x3 box blur over latent rows): seams show without context."""
    pad = torch.nn.functional.pad(lat[:, :3], (1, 1, 1, 1), mode="replicate")
    x = torch.nn.functional.avg_pool2d(pad, 3, stride=1)
    return x.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).movedim(1, -1)


def test_as_latent_keeps_extra_keys_and_concatenates():
    full, patches = _patches()
    lat = patches.as_latent()
    assert torch.equal(lat["samples"], full)
    assert lat["batch_index"] == [3, 4] and lat["noise_mask"].shape == (1, 1, 8, 8)
    assert "samples" not in patches.latent_extra  # not mutated


def test_band_extensions_clip_at_edges():
    assert band_extensions([24, 16, 24], 4) == [(0, 4), (4, 4), (4, 0)]
    assert band_extensions([8, 8], 64) == [(0, 8), (8, 0)]
    assert band_extensions([64], 4) == [(0, 0)]


@pytest.mark.parametrize("overlap", [0, 4, 12])
def test_bandwise_decode_of_a_positional_decoder_is_exact(overlap):
    full, patches = _patches()
    want = row_decoder(full)
    got = decode_bands(row_decoder, full, [24, 16, 24], overlap)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_overlap_zero_is_plain_concatenation():
    full, _ = _patches()
    decoded = [blur_decoder(b) for b in torch.split(full, [24, 16, 24], dim=2)]
    assert torch.equal(stitch_decoded(decoded, [24, 16, 24], 0), torch.cat(decoded, dim=1))


def test_seams_cross_fade_linearly():
    rows, ov, s = [24, 16, 24], 4, 8
    full, _ = _patches()
    ext = band_extensions(rows, ov)
    starts = [0, 24, 40]
    decoded = [row_decoder(full[:, :, st - a: st + r + b]) + 10.0 * i
               for i, (st, r, (a, b)) in enumerate(zip(starts, rows, ext))]  # each band offset by 10*i
    out = stitch_decoded(decoded, rows, ov * s)  # scale inferred
    base = row_decoder(full)
    diff = (out - base).mean(dim=(0, 2, 3))  # the offset each pixel row got
    o = ov * s // 2  # the fade covers the middle half of the doubly decoded rows
    for i, seam in enumerate([24 * s, 40 * s]):
        w = (torch.arange(2 * o, dtype=torch.float32) + 0.5) / (2 * o)
        want = 10.0 * i + 10.0 * w
        assert torch.allclose(diff[seam - o: seam + o], want, atol=1e-4)
        assert torch.allclose(diff[seam - o - 3: seam - o], torch.full((3,), 10.0 * i), atol=1e-4)
        assert torch.allclose(diff[seam + o: seam + o + 3], torch.full((3,), 10.0 * (i + 1)), atol=1e-4)


def test_overlap_context_reduces_the_seam_error():
    full, _ = _patches(seed=1)
    want = blur_decoder(full)
    err0 = (decode_bands(blur_decoder, full, [24, 16, 24], 0) - want).abs().max()
    err4 = (decode_bands(blur_decoder, full, [24, 16, 24], 4) - want).abs().max()
    err1 = (decode_bands(blur_decoder, full, [24, 16, 24], 1) - want).abs().max()
    # a 1-row receptive field: the fade uses decoded rows up to overlap/2 rows past a band's edge,
    # which are exact when overlap/2 rows of context lie beyond them
    assert err0 > 1e-3 and err1 > 1e-3 and err4 < 1e-6
    assert err1 < err0


def test_stitch_rejects_mismatched_bands():
    full, _ = _patches()
    decoded = [row_decoder(b) for b in torch.split(full, [24, 16, 24], dim=2)]
    with pytest.raises(ValueError):
        stitch_decoded(decoded, [24, 24, 16], 0)
    with pytest.raises(ValueError):
        stitch_decoded(decoded[:2], [24, 16, 24], 0)


class FakeVAE:
    def __init__(self):
        self.calls = []

    def decode(self, samples):
        self.calls.append(tuple(samples.shape))
        return row_decoder(samples)


def test_patch_stitch_node_with_and_without_vae():
    full, patches = _patches()
    latent, picture, image = PatchStitch().stitch(patches, 4)
    assert torch.equal(latent["samples"], full) and latent["batch_index"] == [3, 4]
    assert picture.dim() == 4 and picture.shape[-1] == 3
    assert image.shape == (1, 64, 320, 3) and image.max() > image.min()  # the visible placeholder
    assert NO_VAE_TEXT

    vae = FakeVAE()
    latent, _, image = PatchStitch().stitch(patches, 4, vae=vae)
    assert torch.equal(image, row_decoder(full))
    assert vae.calls == [(2, 4, 28, 6), (2, 4, 24, 6), (2, 4, 28, 6)]


def test_patch_stitch_rejects_other_inputs():
    with pytest.raises(ValueError, match="STADI Sampler"):
        PatchStitch().stitch({"samples": torch.zeros(1, 4, 8, 8)}, 4)


# -- which ComfyUI networks the sampler takes (compatibility.check_model) -------------------------------

def _patcher_with_network(module: str, qualname: str, **options):
    """A MODEL-like object holding an instance of a class named like ComfyUI's network class."""
    cls = type(qualname, (), {"__module__": module, "__qualname__": qualname})
    base = types.SimpleNamespace(diffusion_model=cls())
    return types.SimpleNamespace(model=base, model_options={"transformer_options": {}}, wrappers=options.get(
        "wrappers", {}), object_patches=options.get("object_patches", {}), hook_patches={})


@pytest.mark.parametrize("path,family", [
    ("comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel", "comfy-unet"),
    ("comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper", "comfy-mmdit"),
    ("comfy.ldm.flux.model:Flux", "comfy-flux"),
])
def test_supported_networks_map_to_their_worker_family(path, family):
    from stadi_pack.nodes.compatibility import check_model

    assert check_model(_patcher_with_network(*path.split(":"))) == family


def test_other_networks_and_network_wrappers_are_refused_with_what_to_do():
    from stadi_core.errors import UnsupportedError
    from stadi_pack.nodes.compatibility import check_model

    with pytest.raises(UnsupportedError, match="Chroma.*KSampler"):
        check_model(_patcher_with_network("comfy.ldm.chroma.model", "Chroma"))
    cached = _patcher_with_network("comfy.ldm.flux.model", "Flux",
                                   wrappers={"diffusion_model": {"teacache": [lambda *a: None]}})
    with pytest.raises(UnsupportedError, match="teacache.*set strides off"):
        check_model(cached)  # per-rank loops: a step cache would see one band's rows
    assert check_model(cached, lockstep=True) == "comfy-flux"  # one loop: the cache sees the whole image
    with pytest.raises(UnsupportedError, match="object patches"):
        check_model(_patcher_with_network("comfy.ldm.flux.model", "Flux", object_patches={"diffusion_model.x": 1}))


