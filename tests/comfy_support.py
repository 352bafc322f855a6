"""Helpers for tests that run against a real ComfyUI checkout.

Nothing here imports ComfyUI into the test process: ComfyUI's modules have import-time side
effects (``comfy.model_management`` probes the accelerator, ``comfy.cli_args`` fixes the global
``args``), so anything that needs ComfyUI code runs in a subprocess with the checkout on sys.path.

Usage from a test module (``tests/`` is not a package; this puts it on sys.path)::

    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from comfy_support import require_comfyui, write_tiny_sd15_checkpoint, ComfyServer

Environment:
    STADI_COMFYUI_PATH   a ComfyUI checkout (the directory holding main.py); tests skip without it.
    STADI_TEST_CACHE     where built model files are cached (default: <tmp>/stadi-test-cache).

Run as a script (``python comfy_support.py build-checkpoint OUT [--seed N]``) it builds the tiny
SD1.5 checkpoint; the test helpers use that entry point internally in a subprocess.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

SKIP_REASON = "set STADI_COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"

# Bump when the builder below changes what it writes (invalidates cached files).
_BUILDER_VERSION = "tiny-sd15-v1"

# The reduced SD1.5 UNet. Detection (comfy/model_detection.py detect_unet_config) reads
# model_channels from input_blocks.0.0, channel_mult from each res block's out_layers.3,
# context_dim from the first transformer of the input blocks; comfy/supported_models.py SD15
# matches on context_dim 768, model_channels 320, use_linear_in_transformer False,
# adm_in_channels None, use_temporal_attention False. 4 levels (3 downsamples: latent rows must
# be a multiple of 8, as in real SD1.5), one res block per level, transformers on levels 0-2 and
# the middle block, 8 heads of 40 channels, like SD1.5.
TINY_SD15_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1, 1],
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "use_checkpoint": False,
}
TINY_SD15_UNET_PREFIX = "model.diffusion_model."

# The real SD1.5 UNet (0.86 B parameters), as comfy/model_detection.py lists it: the memory benchmark's
# checkpoint (stadi_core/bench/memory.py), random weights.
FULL_SD15_UNET_CONFIG = dict(
    TINY_SD15_UNET_CONFIG, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


# --------------------------------------------------------------------------------------------
# Locating ComfyUI
# --------------------------------------------------------------------------------------------

def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by STADI_COMFYUI_PATH, or None if unset or not a checkout."""
    raw = os.environ.get("STADI_COMFYUI_PATH", "").strip()
    if not raw:
        return None
    p = Path(raw).expanduser().resolve()
    if not (p / "main.py").is_file() or not (p / "comfy").is_dir() or not (p / "nodes.py").is_file():
        return None
    return p


def require_comfyui() -> Path:
    """Return the ComfyUI checkout, or skip the calling test."""
    p = comfyui_path()
    if p is None:
        import pytest

        pytest.skip(SKIP_REASON)
    return p


def comfyui_version(comfy: Path | None = None) -> str:
    comfy = Path(comfy) if comfy else require_comfyui()
    try:
        text = (comfy / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"")
    return "unknown"


def cache_dir() -> Path:
    d = Path(os.environ.get("STADI_TEST_CACHE") or (Path(tempfile.gettempdir()) / "stadi-test-cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 900.0):
    """Exclusive lock (fcntl) so parallel test processes build a cached file once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out waiting for lock {path}")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _place(src: Path, dst: Path) -> Path:
    """Put a cached file at dst: hard link, else symlink, else copy."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve():
            return dst
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# Tiny SD1.5 checkpoint
# --------------------------------------------------------------------------------------------

def _sd15_config(in_channels: int, full: bool = False) -> dict:
    """The tiny UNet's config (or the real SD1.5's); 9 input channels make it an inpainting model
    (latent + mask + masked image)."""
    return dict(FULL_SD15_UNET_CONFIG if full else TINY_SD15_UNET_CONFIG, in_channels=in_channels)


def tiny_sd15_cache_key(seed: int = 0, comfy: Path | None = None, in_channels: int = 4, full: bool = False) -> str:
    comfy = Path(comfy) if comfy else require_comfyui()
    blob = json.dumps(
        {"v": _BUILDER_VERSION, "cfg": _sd15_config(in_channels, full), "seed": int(seed),
         "comfy": comfyui_version(comfy)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_tiny_sd15_checkpoint(path, seed: int = 0, comfy: Path | None = None, timeout: float = 600.0,
                               in_channels: int = 4) -> Path:
    """Write (a link to) a small random-weight checkpoint that ComfyUI detects as SD15.

    Contents: the reduced UNet of TINY_SD15_UNET_CONFIG under ``model.diffusion_model.``, a full
    CLIP-L text encoder under ``cond_stage_model.transformer.`` (every key; ComfyUI leaves missing
    keys uninitialised) and a TAESD VAE under ``first_stage_model.taesd_{encoder,decoder}.``.
    All fp16, seeded, deterministic. Built once per (seed, ComfyUI version, builder version)
    in cache_dir(); the checkpoint's module layout comes from the checkout's own classes.
    """
    comfy = Path(comfy) if comfy else require_comfyui()
    return build_cached(
        f"tiny-sd15-{tiny_sd15_cache_key(seed, comfy, in_channels)}", path, timeout,
        lambda tmp: [sys.executable, str(Path(__file__).resolve()), "build-checkpoint", str(tmp), "--seed",
                     str(int(seed)), "--comfyui", str(comfy), "--in-channels", str(in_channels)])


def write_full_sd15_checkpoint(path, seed: int = 0, comfy: Path | None = None, timeout: float = 1800.0) -> Path:
    """Like write_tiny_sd15_checkpoint with the real SD1.5 UNet (0.86 B parameters, 1.7 GB in fp16)."""
    comfy = Path(comfy) if comfy else require_comfyui()
    return build_cached(
        f"full-sd15-{tiny_sd15_cache_key(seed, comfy, full=True)}", path, timeout,
        lambda tmp: [sys.executable, str(Path(__file__).resolve()), "build-checkpoint", str(tmp), "--seed",
                     str(int(seed)), "--comfyui", str(comfy), "--full"])


def build_cached(stem: str, path, timeout: float, command) -> Path:
    """(A link at ``path`` to) ``cache_dir()/<stem>.safetensors``, built once by the subprocess
    ``command(tmp_path)`` (no GPU), under a file lock so parallel test processes build it once."""
    cached = cache_dir() / f"{stem}.safetensors"
    with _file_lock(cache_dir() / f"{stem}.lock"):
        if not cached.exists():
            tmp = cached.with_suffix(f".{os.getpid()}.partial")
            proc = subprocess.run(command(tmp), capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
            if proc.returncode != 0 or not tmp.exists():
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise RuntimeError(f"building {stem} failed (rc={proc.returncode}):\n"
                                   f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
            os.replace(tmp, cached)
    return _place(cached, Path(path))


def check_detected(sd: dict, prefix: str, expected: str, cls, operations) -> None:
    """ComfyUI's own detector must take the network under ``prefix`` of ``sd`` for the supported
    model ``expected``, and its detected config must rebuild exactly the same tensors. Runs where
    the checkout is importable (the builder subprocesses)."""
    import torch

    import comfy.model_detection

    probe = dict(sd)  # detection may pop keys
    mc = comfy.model_detection.model_config_from_unet(probe, prefix)
    if mc is None or type(mc).__name__ != expected:
        raise RuntimeError(f"detected as {type(mc).__name__ if mc else None}, not {expected}")
    config = {k: v for k, v in mc.unet_config.items() if k != "dtype"}
    again = cls(**config, dtype=torch.float32, device="meta", operations=operations)
    want = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
    got = {k: tuple(v.shape) for k, v in again.state_dict().items()}
    if want != got:
        raise RuntimeError(f"detected network differs: {sorted(set(want) ^ set(got))[:10]}")


def comfyui_marks() -> list:
    """``pytestmark`` for tests that need the real ComfyUI: marked, and skipped with the reason."""
    import pytest

    return [pytest.mark.comfyui, pytest.mark.skipif(comfyui_path() is None, reason=SKIP_REASON)]


def random_fill(sd: dict, module, prefix: str, gen) -> None:
    """Seeded random weights for every parameter of ``module`` (a meta-device build) into ``sd``, fp16.

    Linear/conv weights uniform in +-1/sqrt(fan_in) (PyTorch's default scale), norms at identity,
    embeddings small; RMS-norm scales of ComfyUI's DiTs (``scale``/``weight`` of their own norm
    classes) at one.
    """
    import torch

    names = []
    for mname, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            names.append((f"{mname}.{pname}" if mname else pname, mod, pname, p))
        for bname, b in mod.named_buffers(recurse=False):
            if bname == "pos_embed":  # an MMDiT's position table is a saved buffer
                names.append((f"{mname}.{bname}" if mname else bname, mod, bname, b))
            elif bname not in mod._non_persistent_buffers_set:
                raise RuntimeError(f"unexpected persistent buffer {mname}.{bname}")
    for full, mod, pname, p in sorted(names, key=lambda t: t[0]):
        shape = tuple(p.shape)
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            t = torch.ones(shape) if pname == "weight" else torch.zeros(shape)
        elif isinstance(mod, torch.nn.Embedding):
            t = torch.randn(shape, generator=gen) * 0.02
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d)):
            w = mod.weight
            fan_in = w.shape[1] * (w[0, 0].numel() if w.dim() > 2 else 1)
            bound = 1.0 / (fan_in ** 0.5)
            t = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        elif full == "logit_scale":
            t = torch.tensor(4.6055)
        elif full == "vae_scale":
            t = torch.tensor(1.0)
        elif full == "vae_shift":
            t = torch.tensor(0.0)
        elif pname in ("scale", "weight") and "norm" in type(mod).__name__.lower():
            t = torch.ones(shape)
        elif "pos_embed" in full:
            t = torch.randn(shape, generator=gen) * 0.5
        else:
            raise RuntimeError(f"no init rule for {prefix}{full} ({type(mod).__name__})")
        sd[prefix + full] = t.to(torch.float16).contiguous()


def _build_checkpoint_main(out: str, seed: int, comfy_dir: str, in_channels: int = 4, full: bool = False) -> None:
    """Runs in a subprocess with the ComfyUI checkout importable."""
    sys.path.insert(0, comfy_dir)
    import torch

    import comfy.options  # noqa: F401  (args_parsing stays False: cli_args parses [])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_detection
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init  # the layer classes ComfyUI itself builds SD1.5 with
    unet = UNetModel(**_sd15_config(in_channels, full), dtype=torch.float32, device="meta", operations=ops)
    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)

    gen = torch.Generator().manual_seed(int(seed))
    sd: dict[str, torch.Tensor] = {}

    random_fill(sd, unet, TINY_SD15_UNET_PREFIX, gen)
    random_fill(sd, clip, "cond_stage_model.", gen)
    random_fill(sd, taesd, "first_stage_model.", gen)

    prefix = comfy.model_detection.unet_prefix_from_state_dict(dict(sd))
    assert prefix == TINY_SD15_UNET_PREFIX, prefix
    check_detected(sd, prefix, "SD15", UNetModel, ops)

    import safetensors.torch

    safetensors.torch.save_file(sd, out, metadata={"format": "pt", "stadi_test": f"{_BUILDER_VERSION} seed={seed}"})
    n_unet = sum(v.numel() for k, v in sd.items() if k.startswith(prefix))
    print(json.dumps({"tensors": len(sd), "unet_params": n_unet, "bytes": os.path.getsize(out)}))


# --------------------------------------------------------------------------------------------
# Tiny LoRA
# --------------------------------------------------------------------------------------------

# (ldm key stem under model.diffusion_model.) — attention projections, a 1x1 proj conv, a 3x3 conv.
DEFAULT_LORA_TARGETS = (
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_k",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_q",
    "middle_block.1.transformer_blocks.0.attn1.to_out.0",
    "middle_block.1.proj_in",
    "input_blocks.1.0.in_layers.2",
    "output_blocks.7.0.out_layers.3",
)


def write_tiny_lora(path, checkpoint_path, seed: int = 0, rank: int = 4, strength: float = 0.5,
                    targets=DEFAULT_LORA_TARGETS) -> Path:
    """Write a kohya-format LoRA (``lora_unet_<ldm key with _>.lora_up/.lora_down/.alpha``) for
    the checkpoint's UNet. ComfyUI maps these names through comfy/lora.py model_lora_keys_unet.
    Each delta has about ``strength`` times the std of the weight it patches (nonzero effect).
    Conv targets get a [r, in, kh, kw] down and [out, r, 1, 1] up, as kohya writes them.
    Needs only torch + safetensors (reads shapes from the checkpoint, no ComfyUI import).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(int(seed) + 7919)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint_path), framework="pt") as f:
        keys = set(f.keys())
        for stem in targets:
            wkey = f"{TINY_SD15_UNET_PREFIX}{stem}.weight"
            if wkey not in keys:
                raise KeyError(f"{wkey} not in {checkpoint_path}")
            w = f.get_tensor(wkey).float()
            name = "lora_unet_" + stem.replace(".", "_")
            r = min(rank, w.shape[0], w.shape[1])
            down_shape = (r, w.shape[1], *w.shape[2:])
            up_shape = (w.shape[0], r, *([1] * (w.dim() - 2)))
            down = torch.randn(down_shape, generator=gen)
            up = torch.randn(up_shape, generator=gen)
            delta = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
            scale = (strength * float(w.std()) / float(delta.std())) ** 0.5
            out[f"{name}.lora_down.weight"] = (down * scale).contiguous()
            out[f"{name}.lora_up.weight"] = (up * scale).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(r))  # alpha / rank = 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt", "stadi_test": f"tiny-lora seed={seed}"})
    return path


# --------------------------------------------------------------------------------------------
# API-format workflows
# --------------------------------------------------------------------------------------------

def sd15_api_workflow(ckpt_name: str, *, lora_name: str | None = None, lora_strength: float = 1.0,
                      positive: str = "a photo of a cat", negative: str = "blurry",
                      width: int = 128, height: int = 128, batch_size: int = 1,
                      seed: int = 0, steps: int = 4, cfg: float = 7.0,
                      sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
                      sampler_class: str = "KSampler", sampler_extra_inputs: dict | None = None,
                      save_latent: bool = True, save_image: bool = True,
                      filename_prefix: str = "stadi_test") -> dict:
    """CheckpointLoaderSimple -> [LoraLoader] -> CLIPTextEncode x2 -> EmptyLatentImage ->
    KSampler (or ``sampler_class`` with the same inputs plus ``sampler_extra_inputs``; a value
    may be a link ``[node_id, output_index]``) -> SaveLatent / VAEDecode -> SaveImage.
    Node ids: "1" ckpt, "2" lora, "3" +, "4" -, "5" latent, "6" sampler, "7" SaveLatent,
    "8" VAEDecode, "9" SaveImage."""
    model, clip = ["1", 0], ["1", 1]
    p: dict = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    if lora_name:
        p["2"] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": lora_name,
            "strength_model": lora_strength, "strength_clip": lora_strength}}
        model, clip = ["2", 0], ["2", 1]
    p["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}}
    p["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}}
    p["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch_size}}
    inputs = {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": ["3", 0], "negative": ["4", 0],
              "latent_image": ["5", 0], "denoise": denoise}
    if sampler_class == "STADISampler":
        inputs["strategy"] = "bands"  # these workflows test bands; the auto default has tests of its own
    inputs.update(sampler_extra_inputs or {})
    p["6"] = {"class_type": sampler_class, "inputs": inputs}
    if save_latent:
        p["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{filename_prefix}"}}
    if save_image:
        p["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
        p["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": filename_prefix}}
    return p


def dit_api_workflow(unet_name: str, clip_name: str, *, flux: bool, width: int = 128, height: int = 192,
                     batch_size: int = 1, seed: int = 0, steps: int = 4, cfg: float = 1.0,
                     sampler_name: str = "euler", scheduler: str = "simple", denoise: float = 1.0,
                     guidance: float = 3.5, shift: float | None = None, sampler_class: str = "KSampler",
                     sampler_extra_inputs: dict | None = None, filename_prefix: str = "stadi_dit") -> dict:
    """UNETLoader -> [ModelSamplingSD3 / ModelSamplingFlux] -> sampler; CLIPLoader(type sd3) ->
    CLIPTextEncode x2 [-> FluxGuidance] ; EmptySD3LatentImage; SaveLatent. Same node ids as
    ``sd15_api_workflow`` where they mean the same thing ("6" sampler, "7" SaveLatent)."""
    model = ["1", 0]
    p: dict = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
               "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "sd3"}},
               "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
               "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
               "5": {"class_type": "EmptySD3LatentImage",
                     "inputs": {"width": width, "height": height, "batch_size": batch_size}}}
    positive = ["3", 0]
    if flux:
        p["8"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive, "guidance": guidance}}
        positive = ["8", 0]
    if shift is not None:
        p["9"] = ({"class_type": "ModelSamplingFlux", "inputs": {"model": model, "max_shift": shift, "base_shift": 0.5,
                                                                  "width": width, "height": height}}
                  if flux else {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": shift}})
        model = ["9", 0]
    inputs = {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": positive, "negative": ["4", 0], "latent_image": ["5", 0],
              "denoise": denoise}
    if sampler_class == "STADISampler":
        inputs["strategy"] = "bands"  # these workflows test bands; the auto default has tests of its own
    inputs.update(sampler_extra_inputs or {})
    p["6"] = {"class_type": sampler_class, "inputs": inputs}
    p["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{filename_prefix}"}}
    return p


def load_latent_file(path) -> "torch.Tensor":  # noqa: F821
    """Read a SaveLatent .latent file (safetensors, key ``latent_tensor``)."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    if "latent_tensor" not in data:
        raise KeyError(f"{path}: no latent_tensor (keys {sorted(data)})")
    t = data["latent_tensor"]
    if "latent_format_version_0" not in data:
        t = t * (1.0 / 0.18215)  # LoadLatent's rule for pre-versioned files
    return t


# --------------------------------------------------------------------------------------------
# A ComfyUI server in a subprocess
# --------------------------------------------------------------------------------------------

class ComfyServerError(RuntimeError):
    pass


class ComfyPromptError(ComfyServerError):
    """/prompt rejected the workflow (validation); .body holds ComfyUI's JSON answer."""

    def __init__(self, msg: str, body: dict | None = None):
        super().__init__(msg)
        self.body = body or {}


class ComfyExecutionError(ComfyServerError):
    """The prompt ran and failed (or was interrupted); .entry is the history entry."""

    def __init__(self, msg: str, entry: dict | None = None):
        super().__init__(msg)
        self.entry = entry or {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


class ComfyServer:
    """``with ComfyServer(...) as srv:`` runs ``python main.py --cpu ...`` in its own process group.

    Layout under ``root`` (a temp dir unless given): custom_nodes/<name> -> pack dir (symlink),
    models/checkpoints, models/loras, output/, input/, user/, temp/, extra_model_paths.yaml,
    server.log. Put model files into ``srv.checkpoints_dir`` / ``srv.loras_dir`` (before or after
    start: ComfyUI lists folders on demand) or pass ``checkpoints=[paths]`` / ``loras=[paths]``.

    ``custom_nodes`` maps a directory name to a pack directory; each name is whitelisted
    (``--disable-all-custom-nodes --whitelist-custom-nodes NAME``). None/{} = no custom nodes.
    Use ``ComfyServer.stadi_pack()`` for this repository as ``comfyui-stadi``.
    """

    def __init__(self, comfy: Path | None = None, *, custom_nodes: dict | None = None,
                 checkpoints=(), loras=(), diffusion_models=(), text_encoders=(), controlnets=(), cpu: bool = True,
                 extra_args=(), root: Path | None = None,
                 port: int | None = None, startup_timeout: float = 180.0, env: dict | None = None):
        self.comfy = Path(comfy) if comfy else require_comfyui()
        self.custom_nodes = dict(custom_nodes or {})
        self._checkpoints = [Path(p) for p in checkpoints]
        self._loras = [Path(p) for p in loras]
        self._diffusion_models = [Path(p) for p in diffusion_models]
        self._text_encoders = [Path(p) for p in text_encoders]
        self._controlnets = [Path(p) for p in controlnets]
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="stadi-comfy-"))
        self.port = port
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.log_path = self.root / "server.log"
        self.checkpoints_dir = self.root / "models" / "checkpoints"
        self.loras_dir = self.root / "models" / "loras"
        self.diffusion_models_dir = self.root / "models" / "diffusion_models"
        self.text_encoders_dir = self.root / "models" / "text_encoders"
        self.controlnet_dir = self.root / "models" / "controlnet"
        self.output_dir = self.root / "output"
        self.input_dir = self.root / "input"

    @staticmethod
    def stadi_pack(name: str = "comfyui-stadi") -> dict:
        return {name: repo_root()}

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _prepare(self) -> list[str]:
        for d in (self.checkpoints_dir, self.loras_dir, self.diffusion_models_dir, self.text_encoders_dir,
                  self.controlnet_dir,
                  self.output_dir, self.input_dir,
                  self.root / "user", self.root / "custom_nodes"):
            d.mkdir(parents=True, exist_ok=True)
        for src in self._checkpoints:
            _place(src, self.checkpoints_dir / src.name)
        for src in self._loras:
            _place(src, self.loras_dir / src.name)
        for src in self._diffusion_models:
            _place(src, self.diffusion_models_dir / src.name)
        for src in self._text_encoders:
            _place(src, self.text_encoders_dir / src.name)
        for src in self._controlnets:
            _place(src, self.controlnet_dir / src.name)
        for name, src in self.custom_nodes.items():
            link = self.root / "custom_nodes" / name
            if not link.exists():
                os.symlink(Path(src).resolve(), link, target_is_directory=True)
        yaml_path = self.root / "extra_model_paths.yaml"
        yaml_path.write_text(
            "stadi_test:\n"
            f"    base_path: {json.dumps(str(self.root))}\n"
            "    is_default: true\n"
            "    checkpoints: models/checkpoints\n"
            "    loras: models/loras\n"
            "    diffusion_models: models/diffusion_models\n"
            "    text_encoders: models/text_encoders\n"
            "    controlnet: models/controlnet\n"
            "    custom_nodes: custom_nodes\n"
        )
        if self.port is None:
            self.port = free_port()
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--extra-model-paths-config", str(yaml_path),
                "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir),
                "--temp-directory", str(self.root),
                "--user-directory", str(self.root / "user"),
                "--database-url", f"sqlite:///{self.root / 'comfyui.db'}",
                "--disable-auto-launch", "--disable-api-nodes",
                "--disable-all-custom-nodes"]
        if self.cpu:
            args.append("--cpu")
        if self.custom_nodes:
            args += ["--whitelist-custom-nodes", *self.custom_nodes]
        return args + self.extra_args

    def start(self) -> "ComfyServer":
        args = self._prepare()
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=str(self.comfy), stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ComfyServerError(f"ComfyUI exited during startup (rc={self.proc.returncode}):\n{tail}")
            try:
                self._get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ComfyServerError(f"ComfyUI not ready after {self.startup_timeout:.0f}s:\n{tail}")
            time.sleep(0.25)

    def stop(self, term_timeout: float = 15.0, kill_timeout: float = 10.0) -> None:
        """Ctrl-C the server (as a user would: exit handlers run), then SIGTERM the whole process group
        (server and anything it spawned), then SIGKILL."""
        p = self.proc
        if p is not None:
            try:
                pgid = os.getpgid(p.pid)
            except ProcessLookupError:
                pgid = None
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=term_timeout)
            if pgid is not None and pgid != os.getpgid(0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    p.wait(timeout=term_timeout)
                except subprocess.TimeoutExpired:
                    pass
                # Children (workers) may outlive the server: kill what is left of the group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=kill_timeout)
        fh = getattr(self, "_log_fh", None)
        if fh is not None and not fh.closed:
            fh.close()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_root and not os.environ.get("STADI_KEEP_COMFY_ROOT"):
            shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs --------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP --------------------------------------------------------------------------------
    def _request(self, method: str, route: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def _get(self, route: str, timeout: float = 30.0):
        return self._request("GET", route, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self._get(f"/object_info/{urllib.parse.quote(node_class)}")
        return self._get("/object_info", timeout=60)

    def system_stats(self) -> dict:
        return self._get("/system_stats")

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            ans = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read() or b"{}")
            except ValueError:
                detail = {}
            raise ComfyPromptError(f"/prompt rejected the workflow (HTTP {e.code}): "
                                   f"{json.dumps(detail)[:4000]}\n--- server log ---\n{self.log_tail(40)}",
                                   detail) from None
        return ans["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self._get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2,
             allow_error: bool = False) -> dict:
        """Wait for the prompt's history entry. Raises ComfyExecutionError when it failed or was
        interrupted (unless allow_error) and ComfyServerError on timeout or a dead server."""
        deadline = time.monotonic() + timeout
        while True:
            entry = None
            try:
                entry = self.history(prompt_id)
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
                if not self.alive():
                    raise ComfyServerError(f"ComfyUI died (rc={self.proc.returncode}) while running "
                                           f"{prompt_id}:\n{self.log_tail()}") from None
            if entry is not None and entry.get("status") is not None:
                st = entry["status"]
                if st.get("status_str") == "success" and st.get("completed", True):
                    return entry
                if allow_error:
                    return entry
                raise ComfyExecutionError(
                    f"prompt {prompt_id} ended with status {st.get('status_str')}: "
                    f"{json.dumps(_error_messages(entry))[:6000]}\n--- server log ---\n{self.log_tail()}",
                    entry)
            if not self.alive():
                raise ComfyServerError(f"ComfyUI died (rc={self.proc.returncode}) while running "
                                       f"{prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def queue_state(self) -> dict:
        return self._get("/queue")

    def listen(self) -> "WsListener":
        """Open a websocket as this server's client_id (the one queue() uses), so progress /
        executing / executed messages of prompts queued afterwards are collected."""
        return WsListener("127.0.0.1", self.port, self.client_id)

    def custom_node_import_failures(self) -> list[str]:
        """Log lines of custom nodes that failed to import ('(IMPORT FAILED)')."""
        return [l for l in self.log_text().splitlines() if "IMPORT FAILED" in l]

    def output_files(self, entry: dict, node_id: str, kind: str = "images") -> list[Path]:
        """Paths of files a node reported in its history output (kind: images / latents / ...)."""
        out = []
        for item in entry.get("outputs", {}).get(str(node_id), {}).get(kind, []):
            base = {"output": self.output_dir, "input": self.input_dir,
                    "temp": self.root / "temp"}[item.get("type", "output")]
            out.append(base / item.get("subfolder", "") / item["filename"])
        return out


class WsListener:
    """Minimal websocket client (stdlib only) for ComfyUI's /ws?clientId=...: collects the JSON
    messages the server sends to this client (status, execution_start, executing, progress,
    executed, execution_error, execution_interrupted, ...) in ``.messages`` as dicts
    ``{"type": ..., "data": ...}``; binary frames (latent previews) are counted in ``.binary``.
    Progress of a prompt only goes to the client_id it was queued with: use ComfyServer.listen().
    """

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 10.0):
        import base64
        import threading

        self.messages: list[dict] = []
        self.binary = 0
        self._lock = threading.Lock()
        self._closed = False
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake failed: {head[:200]!r}")
        self.sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                if self._closed:
                    raise ConnectionError("closed")
                continue
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        hdr = bytes([0x80 | opcode])
        n = len(payload)
        hdr += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        self.sock.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _run(self) -> None:
        try:
            while not self._closed:
                b0, b1 = self._recv_exact(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(self._recv_exact(2), "big")
                elif n == 127:
                    n = int.from_bytes(self._recv_exact(8), "big")
                mask = self._recv_exact(4) if b1 & 0x80 else None
                payload = self._recv_exact(n) if n else b""
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 1:
                    with contextlib.suppress(ValueError):
                        with self._lock:
                            self.messages.append(json.loads(payload.decode()))
                elif opcode == 2:
                    with self._lock:
                        self.binary += 1
                elif opcode == 9:
                    self._send(10, payload)
                elif opcode == 8:
                    break
        except (ConnectionError, OSError):
            pass

    def of_type(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        with self._lock:
            msgs = list(self.messages)
        return [m for m in msgs if m.get("type") == kind
                and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id)]

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._send(8)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(timeout=2)

    def __enter__(self) -> "WsListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_messages(entry: dict) -> list:
    msgs = (entry.get("status") or {}).get("messages") or []
    return [m for m in msgs if m and m[0] in ("execution_error", "execution_interrupted")] or msgs


# --------------------------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-checkpoint", help="write the tiny SD1.5 checkpoint (no cache)")
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--in-channels", type=int, default=4, help="9 for an inpainting UNet")
    b.add_argument("--comfyui", default=os.environ.get("STADI_COMFYUI_PATH"))
    b.add_argument("--full", action="store_true", help="the real SD1.5 UNet instead of the reduced one")
    a = ap.parse_args(argv)
    if a.cmd == "build-checkpoint":
        if not a.comfyui:
            ap.error("--comfyui or STADI_COMFYUI_PATH is required")
        _build_checkpoint_main(a.out, a.seed, str(Path(a.comfyui).resolve()), a.in_channels, a.full)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
