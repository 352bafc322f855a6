"""What users type for a model (CLI --model, benches) resolves to the right family, and flow
models get their own default scheduler."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stadi_core.errors import UnsupportedError
from stadi_core.models.spec import model_spec_for


@pytest.mark.parametrize("name,family", [("tiny-sd15", "diffusers-unet"), ("sdxl", "diffusers-unet"),
                                         ("tiny-sd3", "diffusers-sd3"), ("tiny-sd35", "diffusers-sd3"),
                                         ("tiny-flux", "diffusers-flux"), ("tiny-flux-schnell", "diffusers-flux")])
def test_named_configs_find_their_family(name, family):
    assert model_spec_for(name).family == family


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnsupportedError, match="tiny-flux"):
        model_spec_for("tiny-sd4")


@pytest.mark.parametrize("sub,cls,family", [("transformer", "FluxTransformer2DModel", "diffusers-flux"),
                                            ("unet", "UNet2DConditionModel", "diffusers-unet"),
                                            ("", "SD3Transformer2DModel", "diffusers-sd3")])
def test_folders_are_recognised_from_their_config(tmp_path, sub, cls, family):
    (tmp_path / sub).mkdir(exist_ok=True)
    (tmp_path / sub / "config.json").write_text(json.dumps({"_class_name": cls}))
    spec = model_spec_for(str(tmp_path))
    assert (spec.family, spec.path) == (family, str(tmp_path))


def test_folder_without_a_known_network_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UnsupportedError, match="FluxTransformer2DModel"):
        model_spec_for(str(tmp_path))


def test_cli_generates_with_a_flux_model_and_its_default_scheduler(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stadi_core", "generate", "--model", "tiny-flux", "--devices", "cpu*2",
                           "--height", "16", "--width", "16", "--steps", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "latent.safetensors").exists()
    assert "tiny-flux" in proc.stdout
