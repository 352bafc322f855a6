"""The shipped tiny-shapes model: its weights load (checksummed), denoise far better than an
untrained network, the main command's split picture equals one process's, and the seam score
tells a seamless picture from bands generated without context."""

import re
import shutil
import subprocess
import sys

import pytest
import torch

from stadi_core.api import reference_generate
from stadi_core.errors import StadiError, UnsupportedError
from stadi_core.models import tiny_shapes
from stadi_core.models.spec import ModelSpec, build_model, make_conditioning
from stadi_core.models.tiny_shapes_data import caption_for, tokenize
from stadi_core.quality import psnr, seam_score, ssim
from stadi_core.train_tiny import fresh, held_out

SPEC = ModelSpec(family="tiny-shapes", config="tiny-shapes")
KW = dict(height=64, width=32, steps=12, sampler="dpmpp_2m", cfg=4.0)


def test_shipped_weights_denoise_far_better_than_an_untrained_network():
    trained = build_model(SPEC)
    text = tiny_shapes.caption_encoder(str(tiny_shapes.WEIGHTS))
    untrained_unet, untrained_text = fresh(0)
    ratio = held_out(trained, text, n=96) / held_out(untrained_unet, untrained_text, n=96)
    assert ratio < 0.25, f"held-out loss ratio trained/untrained {ratio:.3f}: the shipped weights learnt little"


def test_the_sidecar_records_the_checksum_and_the_training():
    import json

    meta = json.loads(tiny_shapes.sidecar(tiny_shapes.WEIGHTS).read_text())
    assert meta["sha256"] == tiny_shapes.sha256(tiny_shapes.WEIGHTS)
    assert meta["steps"] > 0 and meta["loss_ratio"] < 0.25
    assert tiny_shapes.WEIGHTS.stat().st_size < 20 * 2**20


def test_missing_or_corrupt_weights_are_refused_with_the_fix(tmp_path):
    missing = ModelSpec(family="tiny-shapes", config="tiny-shapes", extra={"weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(StadiError, match="missing.*train-tiny"):
        build_model(missing)
    bad = tmp_path / "tiny_shapes.safetensors"
    shutil.copyfile(tiny_shapes.WEIGHTS, bad)
    shutil.copyfile(tiny_shapes.sidecar(tiny_shapes.WEIGHTS), tiny_shapes.sidecar(bad))
    with open(bad, "r+b") as fh:
        fh.seek(bad.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StadiError, match="corrupt"):
        build_model(ModelSpec(family="tiny-shapes", config="tiny-shapes", extra={"weights": str(bad)}))


def test_captions_are_checked_and_other_families_refuse_a_prompt():
    assert tokenize("red circle") != tokenize("blue circle")
    assert tokenize(None) == tokenize("")
    with pytest.raises(StadiError, match="vocabulary"):
        tokenize("a dragon")
    sd15 = ModelSpec()
    with pytest.raises(UnsupportedError, match="tiny-shapes"):
        make_conditioning(sd15, build_model(sd15, "meta"), 1, 0, prompt="red circle")


def test_the_caption_changes_the_picture():
    red = tiny_shapes.to_rgb(reference_generate(SPEC, seed=3, prompt="red square flat clear", **KW))
    blue = tiny_shapes.to_rgb(reference_generate(SPEC, seed=3, prompt="blue square flat clear", **KW))
    # the same noise, another colour word: the red channel dominates in one picture, blue in the other
    assert (red[:, 0] - red[:, 2]).max() > 0.5 and (blue[:, 2] - blue[:, 0]).max() > 0.5
    assert psnr(red, blue) < 25


def test_seam_score_is_about_one_without_seams_and_high_for_bands_without_context():
    seeds, boundaries = range(6), [24, 44]
    bands = [slice(0, 24), slice(24, 44), slice(44, 64)]
    whole, alone = [], []
    for s in seeds:
        caption = caption_for(1000 + s)
        whole.append(tiny_shapes.to_rgb(reference_generate(SPEC, seed=s, prompt=caption, **KW))[0])
        alone.append(tiny_shapes.to_rgb(torch.cat([reference_generate(SPEC, seed=s, prompt=caption, rows=r, **KW)
                                                   for r in bands], dim=2))[0])
    seamless, seamed = seam_score(whole, boundaries), seam_score(alone, boundaries)
    assert 0.6 < seamless < 1.5, seamless
    assert seamed > 1.5 * seamless and seamed > 1.6, (seamless, seamed)
    assert ssim(whole[0], whole[0]) == pytest.approx(1.0)
    assert ssim(alone[0], whole[0]) < 0.99


def test_the_main_command_writes_the_picture_and_shows_it_equals_one_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stadi_core", "generate", "--devices", "cpu*2", "--strategy", "bands",
                           "--mode", "exact", "--steps", "6", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("parallel (2 ranks"))
    diff = float(re.search(r"max \|diff\| ([0-9.e+-]+)", line).group(1))
    assert diff <= 1e-4 and "equal to float precision" in line, line
    from PIL import Image

    picture = Image.open(tmp_path / "image.png")
    assert picture.mode == "RGB" and picture.height == 2 * picture.width >= 64 * 4
    assert Image.open(tmp_path / "image_plan.png").width > picture.width
