"""The shipped example workflows are well-formed and describe the graphs they claim to.

Two formats of the same seven graphs (SD1.5 / SDXL text-to-image, each with and without a LoRA, from
one checkpoint file; SD1.5 with a ControlNet on ComfyUI's stock nodes; SD3.5 medium and Flux.1 dev
text-to-image from separate diffusion model, text encoder and VAE files):

* ``example_workflows/*.json``: UI format (drag onto the canvas; ComfyUI's templates menu lists
  this folder of an installed pack);
* ``workflows/api/*.json``: API format, for ``POST /prompt``.

No ComfyUI needed: the node contracts are written down here (ComfyUI 0.3.64's core nodes and
the STADI nodes). tests/test_web_extension.py additionally loads the UI files in the real
frontend and checks that it turns them into exactly the API files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UI_DIR = REPO / "example_workflows"
API_DIR = REPO / "workflows" / "api"
EXPECTED = ["stadi_flux_dev_txt2img", "stadi_sd15_controlnet", "stadi_sd15_txt2img", "stadi_sd15_txt2img_lora",
            "stadi_sd3_txt2img", "stadi_sdxl_txt2img", "stadi_sdxl_txt2img_lora"]  # sorted, as the folders list them

# --------------------------------------------------------------------------------------------
# Node contracts: per class, inputs in INPUT_TYPES order as (name, type, required); a type in
# LINK_TYPES is a link (a socket), anything else a widget. Outputs as (name, type).
# --------------------------------------------------------------------------------------------
LINK_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "CONTROL_NET", "STADI_CLUSTER",
              "STADI_PATCHES"}

SAMPLERS = None  # any string: the list depends on the ComfyUI version
SCHEDULERS = None

NODES = {
    "CheckpointLoaderSimple": {
        "inputs": [("ckpt_name", "COMBO", True)],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    },
    "LoraLoader": {
        "inputs": [("model", "MODEL", True), ("clip", "CLIP", True), ("lora_name", "COMBO", True),
                   ("strength_model", "FLOAT", True), ("strength_clip", "FLOAT", True)],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP")],
    },
    "CLIPTextEncode": {
        "inputs": [("text", "STRING", True), ("clip", "CLIP", True)],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "EmptyLatentImage": {
        "inputs": [("width", "INT", True), ("height", "INT", True), ("batch_size", "INT", True)],
        "outputs": [("LATENT", "LATENT")],
    },
    "VAEDecode": {
        "inputs": [("samples", "LATENT", True), ("vae", "VAE", True)],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "SaveImage": {"inputs": [("images", "IMAGE", True), ("filename_prefix", "STRING", True)], "outputs": []},
    "PreviewImage": {"inputs": [("images", "IMAGE", True)], "outputs": []},
    # --- separate model files (SD3.5, Flux): nodes.py and comfy_extras/nodes_{sd3,flux,model_advanced}.py ---
    "UNETLoader": {
        "inputs": [("unet_name", "COMBO", True),
                   ("weight_dtype", ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"), True)],
        "outputs": [("MODEL", "MODEL")],
    },
    "DualCLIPLoader": {
        "inputs": [("clip_name1", "COMBO", True), ("clip_name2", "COMBO", True),
                   ("type", ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"), True),
                   ("device", ("default", "cpu"), False)],  # optional (an "advanced" widget); the editor sends it
        "outputs": [("CLIP", "CLIP")],
    },
    "TripleCLIPLoader": {
        "inputs": [("clip_name1", "COMBO", True), ("clip_name2", "COMBO", True), ("clip_name3", "COMBO", True)],
        "outputs": [("CLIP", "CLIP")],
    },
    "VAELoader": {"inputs": [("vae_name", "COMBO", True)], "outputs": [("VAE", "VAE")]},
    "EmptySD3LatentImage": {
        "inputs": [("width", "INT", True), ("height", "INT", True), ("batch_size", "INT", True)],
        "outputs": [("LATENT", "LATENT")],
    },
    "ModelSamplingSD3": {
        "inputs": [("model", "MODEL", True), ("shift", "FLOAT", True)],
        "outputs": [("MODEL", "MODEL")],
    },
    "ModelSamplingFlux": {
        "inputs": [("model", "MODEL", True), ("max_shift", "FLOAT", True), ("base_shift", "FLOAT", True),
                   ("width", "INT", True), ("height", "INT", True)],
        "outputs": [("MODEL", "MODEL")],
    },
    "FluxGuidance": {
        "inputs": [("conditioning", "CONDITIONING", True), ("guidance", "FLOAT", True)],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    # --- ControlNet (nodes.py) ---
    "LoadImage": {"inputs": [("image", "COMBO", True)], "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "ControlNetLoader": {"inputs": [("control_net_name", "COMBO", True)], "outputs": [("CONTROL_NET", "CONTROL_NET")]},
    "ControlNetApplyAdvanced": {
        "inputs": [("positive", "CONDITIONING", True), ("negative", "CONDITIONING", True),
                   ("control_net", "CONTROL_NET", True), ("image", "IMAGE", True), ("strength", "FLOAT", True),
                   ("start_percent", "FLOAT", True), ("end_percent", "FLOAT", True), ("vae", "VAE", False)],
        "outputs": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    },
    # --- STADI (the contract the web extension and the workflows are built against) ---
    "STADIClusterProfile": {
        "inputs": [("devices", "STRING", True), ("backend", ("auto", "nccl", "gloo"), True),
                   ("measure", "BOOLEAN", True), ("speeds", "STRING", True), ("exclude", "STRING", True),
                   ("emulate_slowdown", "STRING", True)],
        "outputs": [("cluster", "STADI_CLUSTER")],
    },
    "STADISampler": {
        # exactly KSampler's required inputs, in KSampler's order, then the STADI options
        "inputs": [("model", "MODEL", True), ("seed", "INT", True), ("steps", "INT", True), ("cfg", "FLOAT", True),
                   ("sampler_name", SAMPLERS, True), ("scheduler", SCHEDULERS, True),
                   ("positive", "CONDITIONING", True), ("negative", "CONDITIONING", True),
                   ("latent_image", "LATENT", True), ("denoise", "FLOAT", True),
                   ("mode", ("displaced", "exact"), True), ("warmup_steps", "INT", True),
                   ("strides", ("auto", "off"), True), ("cluster", "STADI_CLUSTER", False),
                   ("strategy", ("auto", "bands", "cfg_split", "cfg_split+bands"), False),
                   ("compile", ("auto", "off", "graphs", "torch.compile"), False),
                   ("context", ("full", "partial:0.5", "partial:0.3", "fp8", "delta", "partial:0.3+delta", "auto"), False)],
        "outputs": [("LATENT", "LATENT"), ("patches", "STADI_PATCHES")],
    },
    "STADIPatchStitch": {
        "inputs": [("patches", "STADI_PATCHES", True), ("overlap_rows", "INT", True), ("vae", "VAE", False),
                   ("decode_on", ("server", "devices"), False)],
        "outputs": [("latent", "LATENT"), ("plan", "IMAGE"), ("image", "IMAGE")],
    },
}
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes: never sent to the server
UI_EXTRA_VALUES = {"LoadImage": ["image"]}  # values of frontend-only widgets (the upload button), saved last
CONTROLNET_NODES = {"LoadImage": 1, "ControlNetLoader": 1, "ControlNetApplyAdvanced": 1}
SEED_WIDGETS = {"seed", "noise_seed"}  # the frontend adds a "control after generate" value after these
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
KSAMPLER_INPUTS = ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                   "latent_image", "denoise"]


def link_inputs(cls):
    return [(n, t, req) for n, t, req in NODES[cls]["inputs"] if isinstance(t, str) and t in LINK_TYPES]


def widget_inputs(cls):
    return [(n, t, req) for n, t, req in NODES[cls]["inputs"] if not (isinstance(t, str) and t in LINK_TYPES)]


def widget_value_ok(kind, value) -> bool:
    if kind is None or kind in ("COMBO", "STRING"):
        return isinstance(value, str)
    if isinstance(kind, tuple):
        return value in kind
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    raise AssertionError(f"unknown widget kind {kind!r}")


def is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def load(path: Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def api_files():
    return sorted(API_DIR.glob("*.json"))


def ui_files():
    return sorted(UI_DIR.glob("*.json"))


# --------------------------------------------------------------------------------------------
# Layout of the folders
# --------------------------------------------------------------------------------------------

def test_expected_workflows_exist_in_both_formats():
    assert [p.stem for p in api_files()] == EXPECTED
    assert [p.stem for p in ui_files()] == EXPECTED


def test_templates_menu_sees_only_ui_workflows():
    # ComfyUI's GET /workflow_templates globs <pack>/{example_workflows,example,examples,workflow,
    # workflows}/*.json (top level only) and offers every hit as a UI workflow.
    for folder in ("example", "examples", "workflow", "workflows"):
        hits = sorted((REPO / folder).glob("*.json"))
        assert not hits, f"{hits} would be listed in the templates menu; API files go to workflows/api/"
    assert sorted(p.name for p in (REPO / "workflows").iterdir()) == ["README.md", "api"]
    for path in ui_files():
        data = load(path)
        assert isinstance(data, dict) and "nodes" in data and "links" in data, f"{path.name} is not UI format"


def test_readme_explains_both_formats():
    text = (REPO / "workflows" / "README.md").read_text(encoding="utf-8")
    assert "example_workflows" in text and "workflows/api" in text
    assert "curl" in text and "/prompt" in text


# --------------------------------------------------------------------------------------------
# API format
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.stem)
def test_api_workflow_is_valid(path):
    prompt = load(path)
    assert isinstance(prompt, dict) and prompt, "an API workflow is a non-empty object {node_id: node}"
    for nid, node in prompt.items():
        assert nid.isdigit(), f"node id {nid!r}"
        assert set(node) <= {"class_type", "inputs", "_meta"}, f"node {nid}: keys {sorted(node)}"
        cls = node["class_type"]
        assert cls in NODES, f"node {nid}: unexpected class {cls}"
        spec = {n: (t, req) for n, t, req in NODES[cls]["inputs"]}
        inputs = node["inputs"]
        assert set(inputs) <= set(spec), f"node {nid} ({cls}): unknown inputs {sorted(set(inputs) - set(spec))}"
        missing = [n for n, (t, req) in spec.items() if req and n not in inputs]
        assert not missing, f"node {nid} ({cls}): missing required inputs {missing}"
        for name, value in inputs.items():
            kind, _ = spec[name]
            if isinstance(kind, str) and kind in LINK_TYPES:
                assert is_link(value), f"node {nid} ({cls}).{name} must be a link [node_id, output], got {value!r}"
                src, idx = value
                assert src in prompt, f"node {nid}.{name} links to missing node {src}"
                outs = NODES[prompt[src]["class_type"]]["outputs"]
                assert 0 <= idx < len(outs), f"node {nid}.{name} links to output {idx} of {src}, which has {len(outs)}"
                assert outs[idx][1] == kind, f"node {nid}.{name} wants {kind}, gets {outs[idx][1]} from {src}:{idx}"
            else:
                assert not is_link(value), f"node {nid} ({cls}).{name} is a widget, not a link"
                assert widget_value_ok(kind, value), f"node {nid} ({cls}).{name} = {value!r} is not a {kind}"


# What each graph is made of, by the family in its file name (stadi_<family>_...): the model,
# CLIP and VAE sources as the chain of classes a link passes through back to its origin (nearest
# first; a LoRA adds LoraLoader in front of the model and CLIP chains), the model files, the
# latent and the sampler settings.
FAMILIES = {
    "sd15": {"model": ["CheckpointLoaderSimple"], "clip": ["CheckpointLoaderSimple"], "vae": ["CheckpointLoaderSimple"],
             "positive": ["CLIPTextEncode"], "latent": "EmptyLatentImage", "size": 512,
             "files": {("CheckpointLoaderSimple", "ckpt_name"): "v1-5-pruned-emaonly.safetensors"},
             "sampler": {"steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}},
    "sdxl": {"model": ["CheckpointLoaderSimple"], "clip": ["CheckpointLoaderSimple"], "vae": ["CheckpointLoaderSimple"],
             "positive": ["CLIPTextEncode"], "latent": "EmptyLatentImage", "size": 1024,
             "files": {("CheckpointLoaderSimple", "ckpt_name"): "sd_xl_base_1.0.safetensors"},
             "sampler": {"steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}},
    "sd3": {"model": ["ModelSamplingSD3", "UNETLoader"], "clip": ["TripleCLIPLoader"], "vae": ["VAELoader"],
            "positive": ["CLIPTextEncode"], "latent": "EmptySD3LatentImage", "size": 1024,
            "files": {("UNETLoader", "unet_name"): "sd3.5_medium.safetensors",
                      ("TripleCLIPLoader", "clip_name1"): "clip_l.safetensors",
                      ("TripleCLIPLoader", "clip_name2"): "clip_g.safetensors",
                      ("TripleCLIPLoader", "clip_name3"): "t5xxl_fp16.safetensors",
                      ("VAELoader", "vae_name"): "sd3.5_vae.safetensors"},
            "sampler": {"steps": 28, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform"}},
    "flux": {"model": ["ModelSamplingFlux", "UNETLoader"], "clip": ["DualCLIPLoader"], "vae": ["VAELoader"],
             "positive": ["FluxGuidance", "CLIPTextEncode"], "latent": "EmptySD3LatentImage", "size": 1024,
             "files": {("UNETLoader", "unet_name"): "flux1-dev.safetensors",
                       ("DualCLIPLoader", "clip_name1"): "clip_l.safetensors",
                       ("DualCLIPLoader", "clip_name2"): "t5xxl_fp16.safetensors",
                       ("VAELoader", "vae_name"): "ae.safetensors"},
             "sampler": {"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}},
}
OUTPUT_NODES = {"SaveImage", "PreviewImage"}
# Node ids every API file shares (workflows/README.md names them; its jq examples edit "6" and "7").
FIXED_IDS = {"3": "CLIPTextEncode", "4": "CLIPTextEncode", "6": "STADISampler", "7": "STADIClusterProfile",
             "8": "VAEDecode", "9": "SaveImage", "10": "STADIPatchStitch", "11": "PreviewImage", "12": "PreviewImage"}


def family(path: Path) -> str:
    return path.stem.split("_")[1]


def trace(prompt, ref):
    """The nodes a link passes through back to its origin, nearest first: [(class, node id, output)].
    A node whose output has the type of one of its link inputs (LoraLoader, ModelSampling*,
    FluxGuidance) is passed through along that input; with several such inputs (ControlNetApplyAdvanced:
    positive and negative), along the one named like the output."""
    path = []
    while True:
        nid, slot = ref
        cls = prompt[nid]["class_type"]
        path.append((cls, nid, slot))
        out_type = NODES[cls]["outputs"][slot][1]
        through = [n for n, t, _ in NODES[cls]["inputs"] if t == out_type]
        if not through:
            return path
        if len(through) > 1:
            through = [n for n in through if n == NODES[cls]["outputs"][slot][0]]
        (name,) = through
        ref = prompt[nid]["inputs"][name]


def classes(path):
    return [cls for cls, _, _ in path]


@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.stem)
def test_api_workflow_graph(path):
    """Model loader(s) -> [LoraLoader | ModelSampling*] -> CLIPTextEncode x2 [-> FluxGuidance] ->
    empty latent -> STADIClusterProfile -> STADISampler -> STADIPatchStitch (with the VAE) and
    VAEDecode -> SaveImage, followed link by link from the sampler."""
    prompt = load(path)
    fam = FAMILIES[family(path)]
    lora = "lora" in path.stem
    controlnet = "controlnet" in path.stem
    assert not (lora and fam["model"] != ["CheckpointLoaderSimple"]), "LoRA variants exist for checkpoints only"
    # Which nodes, and the ids the README documents.
    want = {"STADISampler": 1, "STADIClusterProfile": 1, "STADIPatchStitch": 1, "VAEDecode": 1, "SaveImage": 1,
            "PreviewImage": 2, "CLIPTextEncode": 2, fam["latent"]: 1}
    for chain in (fam["model"], fam["clip"], fam["vae"], fam["positive"]):
        for cls in chain:
            want.setdefault(cls, 1)
    if lora:
        want["LoraLoader"] = 1
    if controlnet:
        want.update(CONTROLNET_NODES)
    got: dict[str, int] = {}
    for node in prompt.values():
        got[node["class_type"]] = got.get(node["class_type"], 0) + 1
    assert got == want
    for nid, cls in FIXED_IDS.items():
        assert prompt[nid]["class_type"] == cls, f"node {nid} should be the {cls}"
    assert prompt["5"]["class_type"] == fam["latent"]
    assert prompt["1"]["class_type"] == fam["model"][-1]
    if lora:
        assert prompt["2"]["class_type"] == "LoraLoader"
    if fam["model"] != ["CheckpointLoaderSimple"]:
        assert prompt["2"]["class_type"] == fam["model"][0]
        assert prompt["14"]["class_type"] == fam["clip"][0] and prompt["15"]["class_type"] == "VAELoader"
    if fam["positive"][0] == "FluxGuidance":
        assert prompt["16"]["class_type"] == "FluxGuidance"
    # Every node feeds an output node (nothing left dangling).
    needed, todo = set(), [nid for nid, n in prompt.items() if n["class_type"] in OUTPUT_NODES]
    while todo:
        nid = todo.pop()
        if nid not in needed:
            needed.add(nid)
            todo += [v[0] for v in prompt[nid]["inputs"].values() if is_link(v)]
    assert needed == set(prompt), f"nodes {sorted(set(prompt) - needed)} feed no output"
    # The sampler's inputs, traced back to their origins.
    sampler = prompt["6"]["inputs"]
    lora_front = ["LoraLoader"] if lora else []
    model = trace(prompt, sampler["model"])
    assert classes(model) == lora_front + fam["model"]
    assert model[-1][2] == 0
    positive, negative = trace(prompt, sampler["positive"]), trace(prompt, sampler["negative"])
    cn_front = ["ControlNetApplyAdvanced"] if controlnet else []
    assert classes(positive) == cn_front + fam["positive"] and positive[-1][1] == "3"
    assert classes(negative) == cn_front + ["CLIPTextEncode"] and negative[-1][1] == "4"
    if controlnet:  # one Apply ControlNet on both conditionings, with a loaded ControlNet and an image
        (apply_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "ControlNetApplyAdvanced"]
        assert sampler["positive"] == [apply_id, 0] and sampler["negative"] == [apply_id, 1]
        cn = prompt[apply_id]["inputs"]
        assert prompt[cn["control_net"][0]]["class_type"] == "ControlNetLoader"
        assert prompt[cn["image"][0]]["class_type"] == "LoadImage"
        assert 0 < cn["strength"] <= 1 and 0 <= cn["start_percent"] < cn["end_percent"] <= 1
    for text_id in ("3", "4"):
        clip = trace(prompt, prompt[text_id]["inputs"]["clip"])
        assert classes(clip) == lora_front + fam["clip"]
        if fam["clip"] == ["CheckpointLoaderSimple"]:
            assert clip[-1][1:] == (model[-1][1], 1), "CLIP from the checkpoint the model comes from"
    assert sampler["latent_image"] == ["5", 0]
    assert sampler["cluster"] == ["7", 0]
    vae = prompt["8"]["inputs"]["vae"]
    assert classes(trace(prompt, vae)) == fam["vae"]
    if fam["vae"] == ["CheckpointLoaderSimple"]:
        assert vae == [model[-1][1], 2]
    assert prompt["8"]["inputs"]["samples"] == ["6", 0]
    assert prompt["10"]["inputs"] == {"patches": ["6", 1], "overlap_rows": 4, "vae": vae, "decode_on": "server"}
    assert prompt["9"]["inputs"]["images"] == ["8", 0]
    assert prompt["11"]["inputs"]["images"] == ["10", 1] and prompt["12"]["inputs"]["images"] == ["10", 2]
    # Realistic defaults.
    for (cls, name), value in fam["files"].items():
        (nid,) = [i for i, n in prompt.items() if n["class_type"] == cls]
        assert prompt[nid]["inputs"][name] == value, f"{cls}.{name}"
    size = fam["size"]
    latent = prompt["5"]["inputs"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (size, size, 1)
    assert {k: sampler[k] for k in fam["sampler"]} == fam["sampler"] and sampler["denoise"] == 1.0
    by_class = {n["class_type"]: n["inputs"] for n in prompt.values()}
    if "UNETLoader" in by_class:
        assert by_class["UNETLoader"]["weight_dtype"] == "default"
    if family(path) == "sd3":
        assert by_class["ModelSamplingSD3"]["shift"] == 3.0
    if family(path) == "flux":
        flux = by_class["ModelSamplingFlux"]
        assert (flux["max_shift"], flux["base_shift"]) == (1.15, 0.5)
        assert (flux["width"], flux["height"]) == (size, size), "ModelSamplingFlux's size is the latent's"
        assert by_class["FluxGuidance"]["guidance"] == 3.5
        assert by_class["DualCLIPLoader"]["type"] == "flux" and by_class["DualCLIPLoader"]["device"] == "default"
        assert prompt["4"]["inputs"]["text"] == "", "cfg 1 ignores the negative prompt: leave it empty"
    else:
        assert prompt["4"]["inputs"]["text"], "a negative prompt that cfg > 1 uses"


@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.stem)
def test_stadi_nodes_follow_the_contract(path):
    prompt = load(path)
    stadi = {nid: n for nid, n in prompt.items() if n["class_type"].startswith("STADI")}
    assert sorted(n["class_type"] for n in stadi.values()) == ["STADIClusterProfile", "STADIPatchStitch", "STADISampler"]
    for nid, node in stadi.items():
        names = [n for n, _, _ in NODES[node["class_type"]]["inputs"]]
        assert list(node["inputs"]) == names, f"{node['class_type']} inputs {list(node['inputs'])} != {names}"
    sampler = next(n for n in stadi.values() if n["class_type"] == "STADISampler")["inputs"]
    assert list(sampler)[:10] == KSAMPLER_INPUTS  # a drop-in KSampler: its inputs first, same order
    # a ControlNet looks at the whole image: strides off (the sampler refuses strides with one)
    strides = "off" if "controlnet" in path.stem else "auto"
    assert sampler["mode"] == "displaced" and sampler["strides"] == strides and sampler["warmup_steps"] == 2
    profile = next(n for n in stadi.values() if n["class_type"] == "STADIClusterProfile")["inputs"]
    assert profile == {"devices": "auto", "backend": "auto", "measure": True, "speeds": "", "exclude": "",
                       "emulate_slowdown": ""}


def test_contract_matches_the_node_classes():
    """When the node pack is importable here, its INPUT_TYPES / RETURN_TYPES are the contract."""
    try:
        import stadi_pack.nodes as stadi_nodes
    except Exception as exc:  # ComfyUI-only imports: the real-ComfyUI tests cover it then
        pytest.skip(f"stadi_nodes not importable without ComfyUI: {exc}")
    mapping = stadi_nodes.NODE_CLASS_MAPPINGS
    checked = 0
    for cls in ("STADIClusterProfile", "STADISampler", "STADIPatchStitch"):
        if cls not in mapping:
            continue
        node = mapping[cls]
        try:
            types = node.INPUT_TYPES()
        except ImportError:  # reads ComfyUI's own lists (samplers, schedulers): needs ComfyUI
            continue
        got = [(n, True) for n in types.get("required", {})] + [(n, False) for n in types.get("optional", {})]
        want = [(n, req) for n, _, req in NODES[cls]["inputs"]]
        assert got == want, f"{cls}: INPUT_TYPES {got} != contract {want}"
        for name, kind, req in NODES[cls]["inputs"]:
            decl = (types["required"] if req else types["optional"])[name][0]
            if isinstance(kind, tuple):
                assert tuple(decl) == kind, f"{cls}.{name}: {decl}"
            elif kind not in ("COMBO", None):
                assert decl == kind, f"{cls}.{name}: {decl} != {kind}"
        assert list(node.RETURN_TYPES) == [t for _, t in NODES[cls]["outputs"]]
        assert list(getattr(node, "RETURN_NAMES", node.RETURN_TYPES)) == [n for n, _ in NODES[cls]["outputs"]]
        checked += 1
    if not checked:
        pytest.skip("no STADI node whose INPUT_TYPES can be read without ComfyUI")


# --------------------------------------------------------------------------------------------
# UI format
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.stem)
def test_ui_workflow_links_are_consistent(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf.get("version") == 0.4
    assert wf["last_node_id"] >= max(nodes)
    links = {}
    for link in wf["links"]:
        assert isinstance(link, list) and len(link) == 6, f"link {link}: [id, from, from_slot, to, to_slot, type]"
        lid, src, sslot, dst, dslot, ltype = link
        assert lid not in links, f"duplicate link id {lid}"
        links[lid] = link
        assert src in nodes and dst in nodes, f"link {lid} joins missing nodes"
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert lid in (out.get("links") or []), f"link {lid} not listed on output {sslot} of node {src}"
        assert inp.get("link") == lid, f"input {dslot} of node {dst} does not hold link {lid}"
        assert out["type"] == inp["type"] == ltype, f"link {lid}: {out['type']} -> {inp['type']} as {ltype}"
    assert wf["last_link_id"] >= max(links)
    for nid, node in nodes.items():
        cls = node["type"]
        if cls in UI_ONLY:
            continue
        spec_in = link_inputs(cls)
        spec_out = NODES[cls]["outputs"]
        # Inputs: the link sockets, in declaration order (optional ones may be left out). A file
        # re-saved by a newer frontend also lists widget sockets ({"widget": {"name": ...}});
        # those must stay unconnected here, so that widgets_values holds every widget's value.
        sockets = []
        for i in node.get("inputs", []):
            if "widget" in i:
                assert i["name"] in [n for n, _, _ in widget_inputs(cls)], f"node {nid}: unknown widget socket {i}"
                assert i.get("link") is None, f"node {nid}: widget {i['name']} is driven by a link"
            else:
                sockets.append(i)
        names = [i["name"] for i in sockets]
        assert names == [n for n, _, req in spec_in if req or n in names], f"node {nid} ({cls}) inputs {names}"
        for i in sockets:
            want = dict((n, t) for n, t, _ in spec_in)[i["name"]]
            assert i["type"] == want, f"node {nid}.{i['name']}: {i['type']} != {want}"
            if i.get("link") is not None:
                assert i["link"] in links, f"node {nid}.{i['name']} holds unknown link {i['link']}"
            else:
                req = dict((n, r) for n, _, r in spec_in)[i["name"]]
                assert not req, f"node {nid} ({cls}): required input {i['name']} is not connected"
        assert [(o["name"], o["type"]) for o in node.get("outputs", [])] == spec_out, f"node {nid} ({cls}) outputs"
        for slot, o in enumerate(node.get("outputs", [])):
            for lid in o.get("links") or []:
                assert lid in links and links[lid][1] == nid and links[lid][2] == slot, f"node {nid} output {slot}: link {lid}"


def ui_widget_values(node) -> dict:
    """widgets_values -> {widget name: value}, checking count, order and the seed control value."""
    cls = node["type"]
    values = list(node.get("widgets_values", []))
    named = {}
    for name, kind, _ in widget_inputs(cls):
        assert values, f"node {node['id']} ({cls}): no value for widget {name}"
        value = values.pop(0)
        assert widget_value_ok(kind, value), f"node {node['id']} ({cls}).{name} = {value!r} is not a {kind}"
        named[name] = value
        if name in SEED_WIDGETS:
            assert values and values[0] in CONTROL_VALUES, (
                f"node {node['id']} ({cls}): {name} must be followed by its control value, got {values[:1]}")
            values.pop(0)
    extra = UI_EXTRA_VALUES.get(cls, [])
    assert values[:len(extra)] == extra, f"node {node['id']} ({cls}): frontend widget values {values} != {extra}"
    values = values[len(extra):]
    assert not values, f"node {node['id']} ({cls}): extra widgets_values {values}"
    return named


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.stem)
def test_ui_widgets_values_follow_widget_order(path):
    wf = load(path)
    for node in wf["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        ui_widget_values(node)
    sampler = next(n for n in wf["nodes"] if n["type"] == "STADISampler")
    assert sampler["widgets_values"][1] in CONTROL_VALUES


def ui_graph(wf):
    """(types {id: class}, edges {(src, slot, dst, input name)}, widgets {id: {name: value}})."""
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in UI_ONLY}
    types = {str(i): n["type"] for i, n in nodes.items()}
    edges = set()
    for lid, src, sslot, dst, dslot, _ in wf["links"]:
        edges.add((str(src), sslot, str(dst), nodes[dst]["inputs"][dslot]["name"]))
    widgets = {str(i): ui_widget_values(n) for i, n in nodes.items()}
    return types, edges, widgets


def api_graph(prompt):
    types = {nid: n["class_type"] for nid, n in prompt.items()}
    edges = set()
    widgets = {}
    for nid, n in prompt.items():
        widgets[nid] = {}
        for name, value in n["inputs"].items():
            if is_link(value):
                edges.add((value[0], value[1], nid, name))
            else:
                widgets[nid][name] = value
    return types, edges, widgets


@pytest.mark.parametrize("stem", EXPECTED)
def test_ui_and_api_versions_describe_the_same_graph(stem):
    ui_types, ui_edges, ui_widgets = ui_graph(load(UI_DIR / f"{stem}.json"))
    api_types, api_edges, api_widgets = api_graph(load(API_DIR / f"{stem}.json"))
    assert ui_types == api_types
    assert ui_edges == api_edges
    assert ui_widgets == api_widgets


# Model loaders: the folder under ComfyUI/models their file widgets list, and those widgets.
MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models",
                 "DualCLIPLoader": "text_encoders", "TripleCLIPLoader": "text_encoders", "VAELoader": "vae",
                 "ControlNetLoader": "controlnet"}
FILE_WIDGETS = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "control_net_name"}
# Files published under another name; the workflow's note says to save them under the workflow's.
RENAMED = {"sd3.5_vae.safetensors": "diffusion_pytorch_model.safetensors"}


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.stem)
def test_ui_workflow_has_model_hints_and_titles(path):
    """Every model file a loader names carries a download hint (the frontend's missing-models dialog
    reads properties.models, keeps the entries whose name is one of the node's widget values, and
    offers downloads from huggingface.co / civitai.com of .safetensors files); a workflow whose files
    go to several folders says in its note which file goes where; STADI nodes carry their display
    names as titles."""
    wf = load(path)
    loaders = [n for n in wf["nodes"] if n["type"] in MODEL_FOLDERS]
    assert loaders, "no model loader"
    hints = []
    for node in loaders:
        files = [v for name, v in ui_widget_values(node).items() if name in FILE_WIDGETS]
        models = node["properties"]["models"]
        assert [m["name"] for m in models] == files, f"node {node['id']} ({node['type']}): hints for {files}"
        for m in models:
            assert m["directory"] == MODEL_FOLDERS[node["type"]], m
            assert m["name"].endswith(".safetensors"), m
            assert m["url"].startswith("https://huggingface.co/") and "/resolve/" in m["url"], m
            assert m["url"].endswith("/" + RENAMED.get(m["name"], m["name"])), m
        hints += models
    folders = {m["directory"] for m in hints}
    if folders != {"checkpoints"}:
        (note,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in UI_ONLY]
        for folder in folders:
            assert f"models/{folder}/" in note, f"the note does not name models/{folder}/"
        for m in hints:
            assert m["name"] in note, f"the note does not name {m['name']}"
            if m["name"] in RENAMED:
                assert RENAMED[m["name"]] in note, f"the note does not say where {m['name']} comes from"
    titles = {n["type"]: n.get("title") for n in wf["nodes"]}
    assert titles["STADISampler"] == "STADI Sampler"
    assert titles["STADIClusterProfile"] == "GPU Cluster Profile (STADI)"
    assert titles["STADIPatchStitch"] == "Patch Stitch (STADI)"
