"""The shipped example workflows are well-formed and describe the graphs they claim to.

Two formats of the same four graphs (SD1.5 / SDXL text-to-image, each with and without a LoRA):

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
EXPECTED = ["stadi_sd15_txt2img", "stadi_sd15_txt2img_lora", "stadi_sdxl_txt2img", "stadi_sdxl_txt2img_lora"]

# --------------------------------------------------------------------------------------------
# Node contracts: per class, inputs in INPUT_TYPES order as (name, type, required); a type in
# LINK_TYPES is a link (a socket), anything else a widget. Outputs as (name, type).
# --------------------------------------------------------------------------------------------
LINK_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "STADI_CLUSTER", "STADI_PATCHES"}

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
                   ("strides", ("auto", "off"), True), ("cluster", "STADI_CLUSTER", False)],
        "outputs": [("LATENT", "LATENT"), ("patches", "STADI_PATCHES")],
    },
    "STADIPatchStitch": {
        "inputs": [("patches", "STADI_PATCHES", True), ("overlap_rows", "INT", True), ("vae", "VAE", False)],
        "outputs": [("latent", "LATENT"), ("plan", "IMAGE"), ("image", "IMAGE")],
    },
}
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes: never sent to the server
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


@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.stem)
def test_api_workflow_graph(path):
    """CheckpointLoaderSimple -> [LoraLoader] -> CLIPTextEncode x2 -> EmptyLatentImage ->
    STADIClusterProfile -> STADISampler -> STADIPatchStitch (with VAE) and VAEDecode -> SaveImage."""
    prompt = load(path)
    by_class: dict[str, list[str]] = {}
    for nid, node in prompt.items():
        by_class.setdefault(node["class_type"], []).append(nid)
    one = {c: ids[0] for c, ids in by_class.items() if len(ids) == 1}
    for cls in ("CheckpointLoaderSimple", "EmptyLatentImage", "STADIClusterProfile", "STADISampler",
                "STADIPatchStitch", "VAEDecode", "SaveImage"):
        assert cls in one, f"exactly one {cls} expected, got {by_class.get(cls)}"
    assert len(by_class["CLIPTextEncode"]) == 2
    lora = "lora" in path.stem
    assert ("LoraLoader" in one) == lora
    ckpt, sampler = one["CheckpointLoaderSimple"], prompt[one["STADISampler"]]["inputs"]
    model_src = one["LoraLoader"] if lora else ckpt
    if lora:
        assert prompt[model_src]["inputs"]["model"] == [ckpt, 0] and prompt[model_src]["inputs"]["clip"] == [ckpt, 1]
    assert sampler["model"] == [model_src, 0]
    for text_id in by_class["CLIPTextEncode"]:
        assert prompt[text_id]["inputs"]["clip"] == [model_src, 1]
    assert {sampler["positive"][0], sampler["negative"][0]} == set(by_class["CLIPTextEncode"])
    assert sampler["latent_image"] == [one["EmptyLatentImage"], 0]
    assert sampler["cluster"] == [one["STADIClusterProfile"], 0]
    stitch = prompt[one["STADIPatchStitch"]]["inputs"]
    assert stitch["patches"] == [one["STADISampler"], 1] and stitch["vae"] == [ckpt, 2]
    assert prompt[one["VAEDecode"]]["inputs"] == {"samples": [one["STADISampler"], 0], "vae": [ckpt, 2]}
    assert prompt[one["SaveImage"]]["inputs"]["images"] == [one["VAEDecode"], 0]
    # Realistic defaults.
    ckpt_name = prompt[ckpt]["inputs"]["ckpt_name"]
    size = 512 if "sd15" in path.stem else 1024
    assert ckpt_name == ("v1-5-pruned-emaonly.safetensors" if size == 512 else "sd_xl_base_1.0.safetensors")
    latent = prompt[one["EmptyLatentImage"]]["inputs"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (size, size, 1)
    assert sampler["sampler_name"] == "euler" and sampler["denoise"] == 1.0 and sampler["cfg"] == 7.0
    assert sampler["steps"] == (20 if size == 512 else 25)


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
    assert sampler["mode"] == "displaced" and sampler["strides"] == "auto" and sampler["warmup_steps"] == 2
    profile = next(n for n in stadi.values() if n["class_type"] == "STADIClusterProfile")["inputs"]
    assert profile == {"devices": "auto", "backend": "auto", "measure": True, "speeds": "", "exclude": "",
                       "emulate_slowdown": ""}


def test_contract_matches_the_node_classes():
    """When the node pack is importable here, its INPUT_TYPES / RETURN_TYPES are the contract."""
    try:
        import stadi_nodes
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


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.stem)
def test_ui_workflow_has_model_hints_and_titles(path):
    """Checkpoints carry a download hint (the frontend's missing-models dialog reads
    properties.models); STADI nodes carry their display names as titles."""
    wf = load(path)
    ckpt = next(n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    (model,) = ckpt["properties"]["models"]
    assert model["name"] == ckpt["widgets_values"][0] and model["directory"] == "checkpoints"
    assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
    titles = {n["type"]: n.get("title") for n in wf["nodes"]}
    assert titles["STADISampler"] == "STADI Sampler"
    assert titles["STADIClusterProfile"] == "GPU Cluster Profile (STADI)"
    assert titles["STADIPatchStitch"] == "Patch Stitch (STADI)"
