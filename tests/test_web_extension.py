"""The web extension (web/stadi.js) in the real ComfyUI frontend, driven by headless Chromium.

* the server lists the extension exactly once and the templates menu lists the UI workflows;
* the frontend turns each UI example workflow into exactly its API twin (graphToPrompt);
* a synthetic ``executed`` message (sent through the frontend's own api event path) makes the
  STADI Sampler and GPU Cluster Profile nodes draw the plan / device list, also after messages
  with missing fields, without console errors;
* a real run of an example workflow (tiny SD1.5 checkpoint, two CPU workers) queued from the
  UI draws the plan the server reported; the screenshot goes to the test's tmp dir and to
  /work/notes/web_screenshot.png (a team notes folder; skipped when it does not exist).

Needs STADI_COMFYUI_PATH (skipped otherwise), the Python ``playwright`` package and a Chromium
binary (``STADI_CHROMIUM``, else /usr/bin/chromium or chromium on PATH; skipped when missing).
The Playwright-managed browsers are not used: Debian's chromium is driven directly.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_support import (  # noqa: E402
    ComfyServer,
    comfyui_marks,
    repo_root,
    require_comfyui,
)

# Every test but the first (plain Node.js, runs in CI when `node` is installed) needs ComfyUI.
needs_comfyui = comfyui_marks()


def comfyui_test(fn):
    for mark in needs_comfyui:
        fn = mark(fn)
    return fn

REPO = repo_root()
PACK = "comfyui-stadi"
CKPT = "stadi_tiny_sd15.safetensors"
NOTES_DIR = Path("/work/notes")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1920, "height": 1080}

# Settings stored for the test user before the page opens:
# - TutorialCompleted: otherwise the first visit opens the template browser over the canvas.
# - NavigationMode "custom": with the fresh-install default ("legacy") frontend 1.27.10 throws
#   "Cannot read properties of undefined (reading 'id')" while registering its settings
#   (the NavigationMode onChange sets Comfy.Canvas.LeftMouseClickBehavior before that setting
#   exists; it happens with no custom node at all). "custom" keeps the other two settings at
#   their own defaults, which is what the test's canvas needs.
# - Minimap.Visible: the minimap would cover part of the screenshot.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Canvas.NavigationMode": "custom", "Comfy.Minimap.Visible": False}

# Console errors that the stock frontend produces on a fresh user directory, independent of any
# custom node: it probes these optional files and folders and logs "Failed to load resource"
# for each 404. Nothing else is ignored.
STOCK_404_PROBES = ("/api/userdata/user.css", "/user.css", "/favicon.ico", "/api/userdata?dir=workflows",
                    "/api/userdata?dir=subgraphs", "/api/userdata/comfy.templates.json")

# A plan as plan_ui_payload() writes it: three GPUs, the middle one with stride 2.
SYNTHETIC_PLAN = {
    "height": 128, "steps": 20, "mode": "displaced", "warmup": 2, "sync_period": 2, "wall_s": 6.42,
    "notes": ["cuda:1 evaluates every 2nd step after warmup (stride 2)",
              "slowdowns are emulated (compute padded to budget): cuda:2 x2"],
    "bands": [
        {"rank": 0, "device": "cuda:0", "row_start": 0, "rows": 56, "stride": 1, "evals": 20,
         "busy_s": 4.81, "comm_s": 0.42, "wall_s": 5.61, "idle_pct": 14.3},
        {"rank": 1, "device": "cuda:1", "row_start": 56, "rows": 48, "stride": 2, "evals": 11,
         "busy_s": 3.12, "comm_s": 0.63, "wall_s": 5.53, "idle_pct": 43.6},
        {"rank": 2, "device": "cuda:2", "row_start": 104, "rows": 24, "stride": 1, "evals": 20,
         "busy_s": 4.90, "comm_s": 0.31, "wall_s": 5.60, "idle_pct": 12.5},
    ],
}
SYNTHETIC_DEVICES = {
    "backend": "nccl",
    "notes": ["cuda:3 not found on this machine: skipped"],
    "devices": [
        {"name": "cuda:0", "kind": "cuda", "label": "NVIDIA GeForce RTX 4090", "memory_total_mb": 24564,
         "memory_used_mb": 3120, "utilization_pct": 7.0, "source": "pynvml"},
        {"name": "cuda:1", "kind": "cuda", "label": "NVIDIA GeForce RTX 3090", "memory_total_mb": 24576,
         "memory_used_mb": 11800, "utilization_pct": 63.0, "source": "pynvml"},
        {"name": "cuda:2", "kind": "cuda", "label": "NVIDIA RTX A4000", "memory_total_mb": 16376,
         "memory_used_mb": None, "utilization_pct": None, "source": "torch"},
    ],
}
# Device colours of web/stadi.js (cuda:N -> PALETTE[N], cpu:N -> PALETTE[N + 5]).
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def count_colour(png: Path, colour: str, box=None) -> int:
    from PIL import Image

    with Image.open(png) as im:
        im = im.convert("RGB")
        if box:
            im = im.crop(box)
        want = rgb(colour)
        return sum(1 for px in im.get_flattened_data() if px == want) if hasattr(im, "get_flattened_data") \
            else sum(1 for px in im.getdata() if px == want)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

def chromium_path() -> str | None:
    for cand in (os.environ.get("STADI_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the web tests")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set STADI_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def model_files(tiny_comfy_models):
    return tiny_comfy_models[0]


@pytest.fixture(scope="module")
def server(model_files):
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(PACK), checkpoints=[model_files]) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        srv._request("POST", "/settings", SETTINGS)
        yield srv


class Console:
    """Everything the page reports that could be a problem."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.ignored: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}\n{getattr(exc, 'stack', '')}"))

    def _console(self, msg):
        url = (msg.location or {}).get("url", "")
        if msg.type == "error":
            if msg.text.startswith("Failed to load resource") and "/extensions/" not in url and \
                    any(p in url for p in STOCK_404_PROBES):
                self.ignored.append(url)
                return
            self.errors.append(f"console.error: {msg.text} ({url})")
        elif msg.type == "warning" and "STADI" in msg.text:
            self.warnings.append(f"console.warn: {msg.text}")

    def check(self):
        if self.ignored:
            print("ignored stock 404 probes:", sorted(set(self.ignored)))
        problems = self.errors + self.warnings
        assert not problems, "\n".join(problems)


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    pg = ctx.new_page()
    console = Console(pg)
    pg.goto(server.url)
    pg.wait_for_function(
        """() => { const app = window.comfyAPI?.app?.app;
                   return !!(app && app.graph && app.canvas && window.LiteGraph
                             && app.extensions?.some((e) => e.name === "stadi.plan")
                             && window.LiteGraph.registered_node_types["STADIClusterProfile"]); }""",
        timeout=120_000)
    pg.evaluate("() => window.comfyAPI.app.app.graph.clear()")
    pg.console = console
    yield pg
    ctx.close()


def ensure_node_defs(page, server):
    """Register the STADI node definitions the server does not have yet (the contract of
    tests/test_workflows.py, built from KSampler's own definition) so that the drawing can be
    tested while a node is still being written. Returns the names registered that way."""
    info = server.object_info()
    missing = {}
    if "STADISampler" not in info:
        ks = copy.deepcopy(info["KSampler"])
        req = ks["input"]["required"]
        req["mode"] = [["displaced", "exact"], {"default": "displaced"}]
        req["warmup_steps"] = ["INT", {"default": 2, "min": 0, "max": 1000}]
        req["strides"] = [["auto", "off"], {"default": "auto"}]
        ks["input"]["optional"] = {"cluster": ["STADI_CLUSTER"],
                                   "strategy": [["auto", "bands", "cfg_split", "cfg_split+bands"], {"default": "auto"}]}
        ks["input_order"] = {"required": list(req), "optional": ["cluster", "strategy"]}
        ks.update(name="STADISampler", display_name="STADI Sampler", output=["LATENT", "STADI_PATCHES"],
                  output_is_list=[False, False], output_name=["LATENT", "patches"], category="sampling/stadi",
                  python_module="custom_nodes.comfyui-stadi", description="(synthetic definition for the test)")
        missing["STADISampler"] = ks
    for name, d in missing.items():
        page.evaluate("async ([n, d]) => { await window.comfyAPI.app.app.registerNodeDef(n, d); }", [name, d])
    return sorted(missing)


LOAD_JS = """async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf, true, true, null, {showMissingNodesDialog: false, showMissingModelsDialog: false});
    app.canvas.draw(true, true);
}"""


def load_workflow(page, wf: dict):
    page.evaluate(LOAD_JS, wf)


def frame_nodes(page, left: float, top: float, scale: float = 1.0):
    """Put graph point (left, top) at the canvas' top-left corner (plus margins) at `scale`."""
    page.evaluate("""([x, y, s]) => {
        const app = window.comfyAPI.app.app;
        const rect = app.canvas.canvas.getBoundingClientRect();
        app.canvas.ds.scale = s;
        app.canvas.ds.offset[0] = -x + 20 / s;
        app.canvas.ds.offset[1] = -y + 20 / s;
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        return [rect.left, rect.top];
    }""", [left, top, scale])
    time.sleep(0.3)


def node_screen_box(page, node_id: int):
    """The node's box (title included) in page pixels: (left, top, right, bottom)."""
    return page.evaluate("""(id) => {
        const app = window.comfyAPI.app.app;
        const n = app.graph.getNodeById(id);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const th = window.LiteGraph.NODE_TITLE_HEIGHT;
        const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
        const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        return [rect.left + x0, rect.top + y0, rect.left + x1, rect.top + y1].map(Math.round);
    }""", node_id)


def wait_for_new_history(server, known: set, timeout: float):
    """The first prompt not in `known` to finish; fails on an error, with the server log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, entry in server._get("/history").items():
            status = entry.get("status") or {}
            if pid in known or status.get("status_str") not in ("success", "error"):
                continue
            assert status["status_str"] == "success", (json.dumps(status)[:4000], server.log_tail())
            return pid, entry
        assert server.alive(), server.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"no result after {timeout:.0f} s:\n{server.log_tail()}")


def save_notes_copy(src: Path, name: str):
    if NOTES_DIR.is_dir():
        shutil.copyfile(src, NOTES_DIR / name)


# --------------------------------------------------------------------------------------------
# Without ComfyUI: the drawing code under Node.js, with a recording 2D context
# --------------------------------------------------------------------------------------------

NODE_HARNESS = r"""
import { stadiPanels } from "./extensions/comfyui-stadi/stadi.js";
import { registered } from "./scripts/app.js";
const ctx = {
  texts: [], fills: [], font: "", fillStyle: "", strokeStyle: "", lineWidth: 1, textAlign: "left", textBaseline: "",
  measureText(t) { return { width: 5.5 * String(t).length }; },  // about Arial 11-12px
  fillText(t, x, y) { this.texts.push(String(t)); },
  fillRect(x, y, w, h) { if (!(w >= 0 && h >= 0 && [x, y].every(Number.isFinite))) throw new Error(`bad rect ${[x, y, w, h]}`);
                         this.fills.push(this.fillStyle); },
  strokeRect() {}, beginPath() {}, moveTo() {}, lineTo() {}, stroke() {}, rect() {}, clip() {}, fill() {},
  save() {}, restore() {}, roundRect() {},
};
const cases = JSON.parse(process.argv[2]);
const out = { extension: registered.map((e) => e.name), results: [] };
for (const [kind, data] of cases) {
  ctx.texts = []; ctx.fills = [];
  const draw = kind === "plan" ? stadiPanels.drawPlan : stadiPanels.drawDevices;
  const h = draw(ctx, data, 10, 10, 440, false);
  out.results.push({ height: h, texts: ctx.texts, fills: ctx.fills });
}
console.log(JSON.stringify(out));
"""


def test_drawing_code_under_node(tmp_path):
    """web/stadi.js draws what it is given and survives payloads with missing fields; run by
    Node.js against stub ComfyUI modules (no browser, no ComfyUI)."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js not installed")
    # The layout the frontend serves: /scripts/app.js next to /extensions/<pack>/stadi.js.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts" / "app.js").write_text(
        "export const registered = [];\nexport const app = { registerExtension(e) { registered.push(e); } };\n")
    (tmp_path / "scripts" / "api.js").write_text("export const api = { addEventListener() {} };\n")
    shutil.copytree(REPO / "web", tmp_path / "extensions" / PACK)
    (tmp_path / "harness.js").write_text(NODE_HARNESS)
    cases = [["plan", SYNTHETIC_PLAN], ["devices", SYNTHETIC_DEVICES],
             ["plan", {}], ["plan", {"bands": [{}, None, 3], "notes": "not a list", "wall_s": "n/a"}],
             ["plan", {"bands": [{"device": "cuda:0", "rows": 0}], "height": 0}],
             ["devices", {}], ["devices", {"devices": [{}, None], "notes": [None, 1]}]]
    proc = subprocess.run([node, str(tmp_path / "harness.js"), json.dumps(cases)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["extension"] == ["stadi.plan"]
    plan, devices, *odd = out["results"]
    text = "\n".join(plan["texts"])
    for want in ("STADI plan · displaced", "20 steps · warmup 2 · sync every 2 · wall 6.42 s", "cuda:0",
                 "rows 0–55 (56) · stride 1 · 20 evals", "rows 56–103 (48) · stride 2 · 11 evals",
                 "busy 4.81 s / 5.61 s · idle 14%", "busy 3.12 s / 5.53 s · idle 44%",
                 "• cuda:1 evaluates every 2nd step after warmup (stride 2)"):
        assert want in text, f"{want!r} not drawn; drawn: {plan['texts']}"
    for dev in range(3):  # a stripe and a busy bar per device, in its colour
        assert plan["fills"].count(PALETTE[dev]) >= 2
    text = "\n".join(devices["texts"])
    for want in ("STADI devices: 3 · backend nccl", "NVIDIA GeForce RTX 3090", "mem 11.5 GiB / 24.0 GiB · util 63% · pynvml",
                 "mem ? / 16.0 GiB · util – · torch", "• cuda:3 not found on this machine: skipped"):
        assert want in text, f"{want!r} not drawn; drawn: {devices['texts']}"
    assert plan["height"] > 200 and devices["height"] > 60
    assert all(r["height"] > 0 for r in odd)


# --------------------------------------------------------------------------------------------
# Server side: extension and templates
# --------------------------------------------------------------------------------------------

@comfyui_test
def test_extension_is_listed_once_and_served(server):
    listed = server._get("/extensions")
    ours = [e for e in listed if e.startswith(f"/extensions/{PACK}/")]
    want = sorted(f"/extensions/{PACK}/{p.relative_to(REPO / 'web').as_posix()}" for p in (REPO / "web").rglob("*.js"))
    assert sorted(ours) == want
    assert sum(e.endswith("/stadi.js") for e in listed) == 1, listed
    with urllib.request.urlopen(server.url + f"/extensions/{PACK}/stadi.js", timeout=10) as r:
        assert r.read() == (REPO / "web" / "stadi.js").read_bytes()


@comfyui_test
def test_templates_menu_lists_the_ui_workflows(server):
    templates = server._get("/workflow_templates")
    want = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert sorted(templates.get(PACK, [])) == want
    for name in want:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.json", timeout=10) as r:
            assert "nodes" in json.loads(r.read())


# Inputs that name a model (or input) file: the server lists only installed files (none of the examples'
# are installed here), so their values are not checked against its lists.
MODEL_FILE_INPUTS = {"ckpt_name", "lora_name", "unet_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
                     "control_net_name", "image"}  # image: LoadImage lists the input folder, empty here


@comfyui_test
def test_api_workflows_match_the_servers_node_definitions(server):
    """Every input of every API example exists on the server's node, every required input is
    given, and widget values are in range (model file names excepted: not installed here)."""
    info = server.object_info()
    paths = sorted((REPO / "workflows" / "api").glob("*.json"))
    assert [p.stem for p in paths] == sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    for path in paths:
        for nid, node in json.loads(path.read_text()).items():
            cls = node["class_type"]
            assert cls in info, f"{path.name}: node {nid}: the server has no {cls}"
            decl = {**info[cls]["input"].get("required", {}), **info[cls]["input"].get("optional", {})}
            required = set(info[cls]["input"].get("required", {}))
            given = node["inputs"]
            assert set(given) <= set(decl), f"{path.name}: {cls} has no input {sorted(set(given) - set(decl))}"
            assert required <= set(given), f"{path.name}: {cls} misses {sorted(required - set(given))}"
            for name, value in given.items():
                kind, opts = decl[name][0], (decl[name][1] if len(decl[name]) > 1 else {})
                if isinstance(value, list):  # a link: its output type must be what the input takes
                    src = json.loads(path.read_text())[value[0]]["class_type"]
                    out_type = info[src]["output"][value[1]]
                    assert out_type == kind, f"{path.name}: {cls}.{name} takes {kind}, gets {out_type}"
                elif isinstance(kind, list) or kind == "COMBO":
                    options = kind if isinstance(kind, list) else opts.get("options", [])
                    if name not in MODEL_FILE_INPUTS:
                        assert value in options, f"{path.name}: {cls}.{name} = {value!r} not in {options}"
                elif kind in ("INT", "FLOAT"):
                    assert opts.get("min", value) <= value <= opts.get("max", value), f"{path.name}: {cls}.{name}"
                else:
                    assert kind in ("STRING", "BOOLEAN"), f"{path.name}: {cls}.{name} is a {kind}"


# --------------------------------------------------------------------------------------------
# Frontend
# --------------------------------------------------------------------------------------------

@comfyui_test
def test_ui_workflows_become_their_api_twins(page, server):
    """What the frontend queues for each UI example is exactly the API example."""
    ensure_node_defs(page, server)
    for ui_path in sorted((REPO / "example_workflows").glob("*.json")):
        api = json.loads((REPO / "workflows" / "api" / ui_path.name).read_text())
        load_workflow(page, json.loads(ui_path.read_text()))
        out = page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
        got = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in out.items()}
        want = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
        assert got == want, f"{ui_path.name}: frontend prompt differs from workflows/api/{ui_path.name}"
    page.console.check()


PANEL_JS = """(id) => { const n = window.comfyAPI.app.app.graph.getNodeById(id);
                       return {size: Array.from(n.size), panel: n.__stadiPanel ?? null}; }"""


@comfyui_test
def test_plan_drawn_from_synthetic_executed_messages(page, server, tmp_path):
    """Without running anything: the frontend receives `executed` messages (through its own api
    event path) for a STADI Sampler and a GPU Cluster Profile node and draws them."""
    synthetic = ensure_node_defs(page, server)
    ids = page.evaluate("""() => {
        const app = window.comfyAPI.app.app, LG = window.LiteGraph;
        const s = LG.createNode("STADISampler"); s.pos = [420, 40]; app.graph.add(s);
        const p = LG.createNode("STADIClusterProfile"); p.pos = [20, 40]; app.graph.add(p);
        app.canvas.draw(true, true);
        return [s.id, p.id];
    }""")
    sampler, profile = ids
    before = page.evaluate(PANEL_JS, sampler)
    assert before["panel"] is None

    def executed(node_id, output):
        page.evaluate("""([id, output]) => {
            window.comfyAPI.api.api.dispatchCustomEvent("executed",
                {node: String(id), display_node: String(id), output, prompt_id: "synthetic"});
            const app = window.comfyAPI.app.app; app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        }""", [node_id, output])

    # Messages with missing or odd fields (a cached re-run, another node's ui, an older server)
    # must neither throw nor log; the ones without STADI data leave the node as it was.
    for odd in ({}, {"images": []}, {"stadi_plan": []}, {"stadi_plan": [None]}, {"stadi_plan": [{}]},
                {"stadi_plan": [{"bands": [{}], "notes": None, "wall_s": "n/a"}]},
                {"stadi_plan": [{"bands": [{"device": "cuda:0", "rows": 0}], "height": 0}]}):
        executed(sampler, odd)
    for odd in ({}, {"stadi_devices": [{}]}, {"stadi_devices": [{"devices": [{}], "notes": "x"}]}):
        executed(profile, odd)
    time.sleep(0.2)
    page.console.check()

    executed(sampler, {"stadi_plan": [SYNTHETIC_PLAN]})
    executed(profile, {"stadi_devices": [SYNTHETIC_DEVICES]})
    after = page.evaluate(PANEL_JS, sampler)
    assert after["panel"]["data"] == SYNTHETIC_PLAN and after["panel"]["kind"] == "plan"
    assert after["size"][0] >= 460 and after["size"][1] > before["size"][1] + 200, (before, after)
    prof = page.evaluate(PANEL_JS, profile)
    assert prof["panel"]["data"] == SYNTHETIC_DEVICES

    frame_nodes(page, 0, 0)
    shot = tmp_path / "web_synthetic.png"
    page.screenshot(path=str(shot))
    save_notes_copy(shot, "web_screenshot_synthetic.png")
    # The stripes and busy bars are plain fills in the device colours, inside the node boxes.
    sbox, pbox = node_screen_box(page, sampler), node_screen_box(page, profile)
    for dev in range(3):
        assert count_colour(shot, PALETTE[dev], sbox) > 500, f"no cuda:{dev} stripe on the sampler ({synthetic=})"
        assert count_colour(shot, PALETTE[dev], pbox) > 20, f"no cuda:{dev} swatch on the profile node"
    page.console.check()


@comfyui_test
def test_real_run_draws_the_plan(page, server, tmp_path):
    """The SD1.5 example, shrunk to the tiny checkpoint on two CPU workers, queued from the UI."""
    info = server.object_info()
    missing = [n for n in ("STADIClusterProfile", "STADISampler", "STADIPatchStitch") if n not in info]
    if missing:
        pytest.skip(f"node(s) {missing} not registered by the pack yet: {server.log_tail(20)}")
    wf = json.loads((REPO / "example_workflows" / "stadi_sd15_txt2img.json").read_text())
    nodes = {n["type"] + (f":{n['id']}" if n["type"] in ("CLIPTextEncode", "PreviewImage") else ""): n
             for n in wf["nodes"]}
    nodes["CheckpointLoaderSimple"]["widgets_values"][0] = CKPT
    nodes["EmptyLatentImage"]["widgets_values"][:2] = [128, 128]
    sv = nodes["STADISampler"]["widgets_values"]  # seed, control, steps, cfg, sampler, scheduler, denoise, ...
    sv[0], sv[1], sv[2] = 1, "fixed", 4
    sv[-3] = "bands"  # strategy (then compile, context): the panel's drawing of two bands (auto runs one CPU worker on a 2-core host)
    nodes["STADIClusterProfile"]["widgets_values"][:3] = ["cpu*2", "gloo", False]
    sampler_id = nodes["STADISampler"]["id"]
    profile_id = nodes["STADIClusterProfile"]["id"]

    load_workflow(page, wf)
    before = server._get("/history")
    page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
    entry_id, entry = wait_for_new_history(server, set(before), timeout=600)
    plan = entry["outputs"][str(sampler_id)]["stadi_plan"][0]
    assert [b["device"] for b in plan["bands"]] == ["cpu:0", "cpu:1"]

    page.wait_for_function("(id) => !!window.comfyAPI.app.app.graph.getNodeById(id).__stadiPanel?.data",
                           arg=sampler_id, timeout=30_000)
    panel = page.evaluate(PANEL_JS, sampler_id)["panel"]
    assert panel["data"] == plan and panel["stale"] is False
    assert page.evaluate(PANEL_JS, profile_id)["panel"]["data"] == \
        entry["outputs"][str(profile_id)]["stadi_devices"][0]

    # Queue it again: every node is cached, so the sampler is not executed and gets no
    # "executed" message (ComfyUI re-sends only the output nodes' ui); it must keep its plan
    # and not call it a previous run (the extension listens to "execution_cached").
    page.evaluate("""async () => {
        window.__stadiSeen = [];  // the page's own view of the run, in message order
        const api = window.comfyAPI.api.api;
        for (const type of ["execution_start", "execution_cached", "execution_success"])
            api.addEventListener(type, (e) => window.__stadiSeen.push(type));
        await window.comfyAPI.app.app.queuePrompt(0, 1);
    }""")
    again_id, again = wait_for_new_history(server, set(before) | {entry_id}, timeout=120)
    cached = [m[1] for m in again["status"]["messages"] if m[0] == "execution_cached"]
    assert cached and str(sampler_id) in cached[0]["nodes"], again["status"]
    page.wait_for_function("() => window.__stadiSeen.includes('execution_success')", timeout=30_000)
    assert page.evaluate("() => window.__stadiSeen") == ["execution_start", "execution_cached", "execution_success"]
    panel = page.evaluate(PANEL_JS, sampler_id)["panel"]
    assert panel["data"] == plan and panel["stale"] is False

    time.sleep(1.0)  # previews of the stitched images arrive with their own messages
    frame_nodes(page, 300, 60)
    shot = tmp_path / "web_screenshot.png"
    page.screenshot(path=str(shot))
    save_notes_copy(shot, "web_screenshot.png")
    sbox = node_screen_box(page, sampler_id)
    for dev in (0, 1):  # cpu:N is drawn in PALETTE[N + 5]
        assert count_colour(shot, PALETTE[dev + 5], sbox) > 300, f"no cpu:{dev} stripe on the sampler node"
    page.console.check()
