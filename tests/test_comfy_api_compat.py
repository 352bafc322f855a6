"""The ComfyUI-version shims, against fakes with the exact signatures of ComfyUI 0.3.64 and of the
newest versions read (docs/COMFYUI_COMPATIBILITY.md). No ComfyUI needed: every test installs the
comfy modules it needs as fakes in sys.modules (monkeypatch undoes it).

Each test asserts where an argument landed, so a shim that called the wrong slot would fail.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from stadi_core.errors import UnsupportedError
from stadi_core.models import comfy_common, comfy_flux, comfy_mmdit
from stadi_pack.nodes import comfy_api, weights


@pytest.fixture
def fake_comfy(monkeypatch):
    """install(utils=..., **{"ldm.common_dit": ...}): a fake ``comfy`` package holding only these submodules."""

    def install(**submodules):
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
            monkeypatch.delitem(sys.modules, name)  # no real ComfyUI leaks in
        root = types.ModuleType("comfy")
        root.__path__ = []  # a package: importing a submodule that is not faked raises ImportError
        monkeypatch.setitem(sys.modules, "comfy", root)
        for dotted, mod in submodules.items():
            parent, name = root, "comfy"
            parts = dotted.split(".")
            for i, part in enumerate(parts):
                name = f"{name}.{part}"
                child = mod if i == len(parts) - 1 else sys.modules.get(name) or types.ModuleType(name)
                if child is not mod:
                    child.__path__ = []
                monkeypatch.setitem(sys.modules, name, child)
                setattr(parent, part, child)
                parent = child
        return root

    return install


def module(**attrs) -> types.ModuleType:
    m = types.ModuleType("fake")
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


# -- string_to_seed: comfy.utils (newest) or comfy.model_patcher (0.3.64) -----------------------------------

def test_string_to_seed_prefers_comfy_utils(fake_comfy):
    calls = []
    fake_comfy(utils=module(string_to_seed=lambda d: calls.append(("utils", d)) or 11),
               model_patcher=module(string_to_seed=lambda d: calls.append(("model_patcher", d)) or 22))
    assert comfy_api.string_to_seed("diffusion_model.x.weight") == 11
    assert calls == [("utils", "diffusion_model.x.weight")]


def test_string_to_seed_falls_back_to_model_patcher_on_0364(fake_comfy):
    calls = []
    fake_comfy(utils=module(), model_patcher=module(string_to_seed=lambda d: calls.append(d) or 22))
    assert comfy_api.string_to_seed("k") == 22
    assert calls == ["k"]


def test_string_to_seed_missing_everywhere_is_a_clear_error(fake_comfy):
    fake_comfy(utils=module())
    with pytest.raises(UnsupportedError, match="string_to_seed"):
        comfy_api.string_to_seed("k")


# -- PREPARE_SAMPLING wrapper: newest passes force_full_load= and force_offload= -----------------------------

def test_load_nothing_takes_both_wrapper_signatures():
    model = types.SimpleNamespace(model=object())
    conds = {"positive": []}
    # 0.3.64: executor.execute(model, noise_shape, conds, model_options=model_options)
    assert comfy_api.load_nothing(None, model, (1, 4, 8, 8), conds, model_options={}) == (model.model, conds, [])
    # newest: ... model_options=..., force_full_load=..., force_offload=...
    out = comfy_api.load_nothing(None, model, (1, 4, 8, 8), conds, model_options={}, force_full_load=True,
                                 force_offload=False)
    assert out[0] is model.model and out[1] is conds and out[2] == []


# -- comfy.ops.pick_operations: 0.3.64 has scaled_fp8=, newest has model_config= instead ---------------------

def pick_0364(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False,
              scaled_fp8=None):
    return ("0.3.64", weight_dtype, compute_dtype, load_device, disable_fast_fp8, fp8_optimizations, scaled_fp8)


def pick_newest(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False,
                model_config=None):
    return ("newest", weight_dtype, compute_dtype, load_device, disable_fast_fp8, fp8_optimizations, model_config)


def test_pick_operations_passes_scaled_fp8_where_the_signature_has_it():
    out = comfy_common.pick_operations(pick_0364, torch.float8_e4m3fn, torch.bfloat16,
                                       scaled_fp8=torch.float8_e4m3fn, fp8_optimizations=True)
    assert out == ("0.3.64", torch.float8_e4m3fn, torch.bfloat16, None, False, True, torch.float8_e4m3fn)


def test_pick_operations_on_newest_passes_no_scaled_fp8_and_keeps_fp8_optimizations():
    out = comfy_common.pick_operations(pick_newest, torch.float16, None, scaled_fp8=None, fp8_optimizations=True)
    assert out == ("newest", torch.float16, None, None, False, True, None)  # model_config stays at its default


def test_scaled_fp8_on_a_comfyui_without_the_parameter_is_refused():
    with pytest.raises(UnsupportedError, match="scaled.fp8.*KSampler"):
        comfy_common.pick_operations(pick_newest, torch.float8_e4m3fn, torch.bfloat16, scaled_fp8=torch.float8_e4m3fn)


def test_scaled_fp8_dtype_reads_a_missing_attribute_as_none():
    assert comfy_api.scaled_fp8_dtype(types.SimpleNamespace(scaled_fp8=torch.float8_e4m3fn)) is torch.float8_e4m3fn
    assert comfy_api.scaled_fp8_dtype(types.SimpleNamespace()) is None  # newest model_config


def test_archive_model_dtypes_runs_only_where_comfy_has_it(fake_comfy):
    seen = []
    fake_comfy(model_management=module(archive_model_dtypes=seen.append))
    net = torch.nn.Linear(2, 2)
    comfy_common.archive_model_dtypes(net)
    assert seen == [net]
    fake_comfy(model_management=module())
    comfy_common.archive_model_dtypes(net)  # 0.3.64: nothing to call, no error


def test_accepted_kwargs_and_call_by_keyword():
    def f(a, b=1, *, c=2):
        return a, b, c

    def g(a, **kw):
        return a, kw

    assert comfy_common.accepted_kwargs(f, {"a": 0, "c": 3, "zzz": 9}) == {"a": 0, "c": 3}
    assert comfy_common.accepted_kwargs(g, {"a": 0, "zzz": 9}) == {"a": 0, "zzz": 9}
    assert comfy_common.call_by_keyword(f, "f", required=("a",), a=5, c=7, zzz=1) == (5, 1, 7)
    with pytest.raises(UnsupportedError, match="f of this ComfyUI has no parameter d"):
        comfy_common.call_by_keyword(f, "f", required=("a", "d"), a=5, d=1)


# -- Flux.forward_orig: newest has timestep_zero_index before transformer_options ----------------------------

class FluxParams:  # the fields the adapter reads; 0.3.64's FluxParams has no txt_ids_dims
    def __init__(self, **extra):
        self.in_channels, self.axes_dim, self.vec_in_dim = 4, [4, 6, 6], 8
        self.__dict__.update(extra)


class Flux0364:
    """0.3.64: ``process_img`` is a method; ``forward_orig(..., control, transformer_options, attn_mask)``."""

    patch_size = 2

    def __init__(self):
        self.params = FluxParams()
        self.double_blocks, self.single_blocks = [], []
        self.calls = []

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        self.calls.append(("process_img", h_offset))
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), -1)
        return tokens, torch.zeros(b, tokens.shape[1], 3)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):
        self.calls.append(("forward_orig", dict(control=control, transformer_options=transformer_options, y=y,
                                                guidance=guidance, txt_ids=txt_ids)))
        return img * 2


class FluxNewest(Flux0364):
    """Newest: no ``process_img`` method (comfy.ldm.common_dit.process_img instead), FluxParams with
    Flux.2 fields, and ``forward_orig(..., control, timestep_zero_index, transformer_options, attn_mask)``."""

    process_img = None

    def __init__(self, **overrides):
        super().__init__()
        self.params = FluxParams(**{"txt_ids_dims": [], "global_modulation": False, **overrides})

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     timestep_zero_index=None, transformer_options={}, attn_mask=None):
        self.calls.append(("forward_orig", dict(control=control, timestep_zero_index=timestep_zero_index,
                                                transformer_options=transformer_options, y=y, guidance=guidance,
                                                txt_ids=txt_ids)))
        return img * 2


def common_dit_process_img(calls):
    def process_img(x, index=0, h_offset=0, w_offset=0, patch_size=2, transformer_options={}):
        calls.append(("common_dit.process_img", h_offset, patch_size))
        return Flux0364.process_img(Flux0364(), x)
    return process_img


def test_the_old_positional_call_would_break_on_the_newest_signature():
    """Why the adapter calls by keyword: positionally, transformer_options lands in timestep_zero_index."""
    model, options = FluxNewest(), {"optimized_attention_override": object()}
    img = torch.zeros(1, 4, 16)
    model.forward_orig(img, None, None, None, None, None, None, None, options)
    seen = model.calls[-1][1]
    assert seen["timestep_zero_index"] is options and seen["transformer_options"] == {}


@pytest.mark.parametrize("cls", [Flux0364, FluxNewest])
def test_forward_orig_lands_every_argument_in_its_slot(cls):
    model, options = cls(), {"optimized_attention_override": object()}
    img, y, g = torch.ones(1, 4, 16), torch.ones(1, 8), torch.full((1,), 3.5)
    out = comfy_flux.forward_orig(model, img, torch.zeros(1, 4, 3), torch.zeros(1, 2, 16), torch.zeros(1, 2, 3),
                                  torch.ones(1), y, g, options)
    assert torch.equal(out, img * 2)
    seen = model.calls[-1][1]
    assert seen["transformer_options"] is options and seen["control"] is None
    assert seen["y"] is y and seen["guidance"] is g
    if cls is FluxNewest:
        assert seen["timestep_zero_index"] is None


def test_forward_orig_without_a_needed_parameter_is_refused():
    class Renamed(Flux0364):
        def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, vec, options=None):
            raise AssertionError("must not be called")

    with pytest.raises(UnsupportedError, match="forward_orig.*transformer_options"):
        comfy_flux.forward_orig(Renamed(), 1, 2, 3, 4, 5, None, None, {})


def test_patchify_uses_the_method_on_0364():
    model = Flux0364()
    img, ids = comfy_flux.patchify(model, torch.zeros(1, 4, 4, 4), h_offset=6)
    assert model.calls == [("process_img", 6)] and img.shape == (1, 4, 16)


def test_patchify_uses_common_dit_on_newest(fake_comfy):
    calls = []
    fake_comfy(**{"ldm.common_dit": module(process_img=common_dit_process_img(calls))})
    img, ids = comfy_flux.patchify(FluxNewest(), torch.zeros(1, 4, 4, 4), h_offset=6)
    assert calls == [("common_dit.process_img", 6, 2)] and img.shape == (1, 4, 16)


def test_patchify_without_either_is_refused(fake_comfy):
    fake_comfy()
    with pytest.raises(UnsupportedError, match="process_img"):
        comfy_flux.patchify(FluxNewest(), torch.zeros(1, 4, 4, 4), h_offset=0)


def test_text_ids_follow_each_versions_forward():
    x = torch.zeros(1, 4, 4, 4, dtype=torch.bfloat16)
    old = comfy_flux.text_ids(Flux0364(), 2, 5, x)
    new = comfy_flux.text_ids(FluxNewest(), 2, 5, x)
    assert old.shape == new.shape == (2, 5, 3)
    assert old.dtype == torch.bfloat16 and new.dtype == torch.float32  # as each _forward makes them
    with pytest.raises(UnsupportedError, match="txt_ids_dims"):
        comfy_flux.text_ids(FluxNewest(txt_ids_dims=[1, 2]), 2, 5, x)


@pytest.mark.parametrize("cls", [Flux0364, FluxNewest])
def test_flux_forward_places_the_band_and_returns_its_shape(cls, fake_comfy):
    calls = []
    fake_comfy(**{"ldm.common_dit": module(process_img=common_dit_process_img(calls))})
    model = cls()
    model._stadi_ctx = types.SimpleNamespace(local_only=False, row_start=4, total_rows=8)  # the band's place
    x = torch.randn(1, 4, 4, 6)
    cond = {"context": torch.zeros(1, 3, 16), "y": torch.zeros(1, 8), "guidance": torch.full((1,), 3.5)}
    out = comfy_flux.forward(model, x, torch.ones(1), cond)
    assert out.shape == x.shape and torch.allclose(out, 2 * x)
    h_offsets = [c[1] for c in model.calls if c[0] == "process_img"] + [c[1] for c in calls]
    assert h_offsets == [4]
    seen = [c[1] for c in model.calls if c[0] == "forward_orig"][0]
    assert seen["transformer_options"] == {} and seen["txt_ids"].shape == (1, 3, 3)
    assert seen.get("timestep_zero_index") is None and seen["control"] is None


def test_flux2_era_network_options_are_refused_in_the_worker():
    assert comfy_flux.unverified_features(FluxParams()) == []
    assert comfy_flux.unverified_features(FluxNewest().params) == []
    found = comfy_flux.unverified_features({"global_modulation": True, "txt_ids_dims": [1], "ops_bias": False,
                                            "vec_in_dim": None})
    assert found == ["global_modulation", "txt_ids_dims", "ops_bias=False", "no vec_in_dim"]
    with pytest.raises(UnsupportedError, match="global_modulation.*KSampler"):
        comfy_flux.patch_attention(FluxNewest(global_modulation=True), None, lambda: 0)


class PatchEmbed:
    patch_size = (2, 2)

    def __call__(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), -1)


class MMDiTFake:
    """The OpenAISignatureMMDITWrapper members the adapter uses, with the signatures of 0.3.64 and of the
    newest fork read (they agree): forward_core_with_concat(x, c_mod, context, control, transformer_options)."""

    def __init__(self):
        self.x_embedder, self.context_processor, self.y_embedder = PatchEmbed(), None, None
        self.seen = {}

    def cropped_pos_embed(self, hw, device=None):
        return torch.zeros(1, (hw[0] // 2) * (hw[1] // 2), 16)

    def t_embedder(self, t, dtype):
        return torch.zeros(t.shape[0], 16, dtype=dtype)

    def context_embedder(self, context):
        return context

    def forward_core_with_concat(self, x, c_mod, context=None, control=None, transformer_options={}):
        self.seen.update(c_mod=c_mod, context=context, control=control, transformer_options=transformer_options)
        return x

    def unpatchify(self, x, hw):
        b, (h, w) = x.shape[0], hw
        return x.reshape(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def test_mmdit_forward_calls_the_core_by_keyword(fake_comfy):
    fake_comfy(ops=module(cast_to_input=lambda weight, x: weight.to(x)))
    model, x = MMDiTFake(), torch.randn(1, 4, 4, 6)
    context = torch.ones(1, 3, 16)
    out = comfy_mmdit.forward(model, x, torch.ones(1), {"context": context})
    assert torch.allclose(out, x)
    assert model.seen["context"] is context and model.seen["control"] is None
    assert model.seen["transformer_options"] == {} and model.seen["c_mod"].shape == (1, 16)


# -- refusing model types that reuse the Flux / MMDiT network ------------------------------------------------

def comfy_class(module_name: str, name: str, bases=(object,)):
    return type(name, bases, {"__module__": module_name, "__qualname__": name})


BaseModel = comfy_class("comfy.model_base", "BaseModel")
FluxBase = comfy_class("comfy.model_base", "Flux", (BaseModel,))
Flux2Base = comfy_class("comfy.model_base", "Flux2", (FluxBase,))
LongCatBase = comfy_class("comfy.model_base", "LongCatImage", (FluxBase,))
SD3Base = comfy_class("comfy.model_base", "SD3", (BaseModel,))
SDXLBase = comfy_class("comfy.model_base", "SDXL", (BaseModel,))
CustomFlux = comfy_class("some_pack.models", "Flux", (FluxBase,))  # a node pack's subclass, same name
FluxNet = comfy_class("comfy.ldm.flux.model", "Flux")
MMDiTNet = comfy_class("comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper")
UNetNet = comfy_class("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel")


def patcher(base_cls, net_cls, config_name="Flux", unet_config=None, transformer_options=None):
    base = base_cls()
    base.diffusion_model = net_cls()
    base.model_config = comfy_class("comfy.supported_models", config_name)()
    base.model_config.unet_config = {"image_model": "flux", "vec_in_dim": 768} if unet_config is None else unet_config
    return types.SimpleNamespace(model=base, model_options={"transformer_options": transformer_options or {}})


def test_flux1_and_sd3_pass():
    comfy_api.refuse_unsupported_variants(patcher(FluxBase, FluxNet))
    comfy_api.refuse_unsupported_variants(patcher(FluxBase, FluxNet, "FluxSchnell"))
    comfy_api.refuse_unsupported_variants(patcher(SD3Base, MMDiTNet, "SD3", {"in_channels": 16}))
    comfy_api.refuse_unsupported_variants(patcher(SDXLBase, UNetNet, "SDXL", {"use_temporal_attention": False}))


@pytest.mark.parametrize("base_cls,config,unet_config,shown", [
    (Flux2Base, "Flux2", {"image_model": "flux2", "global_modulation": True, "txt_ids_dims": [], "vec_in_dim": None},
     "Flux.2"),
    (LongCatBase, "LongCatImage", {"image_model": "flux", "vec_in_dim": None}, "LongCat-Image"),
    (CustomFlux, "Flux", None, "Flux"),
    (FluxBase, "Flux2", None, "Flux.2"),  # a Flux.2 config on the plain Flux base: still Flux.2
    (FluxBase, "Flux", {"image_model": "flux2"}, "Flux"),
    (FluxBase, "Flux", {"image_model": "flux", "global_modulation": True}, "Flux"),
])
def test_variants_reusing_the_flux_network_are_refused(base_cls, config, unet_config, shown):
    with pytest.raises(UnsupportedError, match=f"the {shown} model.*use KSampler"):
        comfy_api.refuse_unsupported_variants(patcher(base_cls, FluxNet, config, unet_config))


def test_mmdit_under_another_model_type_and_video_unets_are_refused():
    with pytest.raises(UnsupportedError, match="Flux.*MMDITWrapper.*KSampler"):
        comfy_api.refuse_unsupported_variants(patcher(FluxBase, MMDiTNet, "SD3", {}))
    with pytest.raises(UnsupportedError, match="temporal.*KSampler"):
        comfy_api.refuse_unsupported_variants(patcher(SDXLBase, UNetNet, "SVD_img2vid",
                                                      {"use_temporal_attention": True}))


def test_network_options_the_workers_never_see_are_refused():
    with pytest.raises(UnsupportedError, match="RoPE"):
        comfy_api.refuse_unsupported_variants(patcher(FluxBase, FluxNet, transformer_options={
            "rope_options": {"scale_x": 2.0}}))
    with pytest.raises(UnsupportedError, match="attention-function override"):
        comfy_api.refuse_unsupported_variants(patcher(SDXLBase, UNetNet, "SDXL", {}, transformer_options={
            "optimized_attention_override": lambda *a, **k: None}))


def test_test_doubles_without_comfy_classes_are_judged_by_what_they_carry():
    fake = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=FluxNet()),
                                 model_options={"transformer_options": {}})
    comfy_api.refuse_unsupported_variants(fake)  # as tests/test_nodes_unit.py builds them


# -- weights the workers cannot rebuild --------------------------------------------------------------------

class QuantizedTensor(torch.Tensor):  # named like comfy.quant_ops.QuantizedTensor
    pass


def weights_patcher(network, quant_config=None, wrappers=None):
    base = types.SimpleNamespace(diffusion_model=network,
                                 model_config=types.SimpleNamespace(quant_config=quant_config))
    return types.SimpleNamespace(model=base, weight_wrapper_patches=wrappers or {})


def test_plain_weights_pass():
    comfy_api.refuse_unrebuildable_weights(weights_patcher(torch.nn.Linear(2, 2)))


def test_quantized_models_wrappers_and_attention_configs_are_refused():
    with pytest.raises(UnsupportedError, match="quantized.*KSampler"):
        comfy_api.refuse_unrebuildable_weights(weights_patcher(torch.nn.Linear(2, 2), quant_config={"mixed_ops": True}))
    layer = torch.nn.Linear(2, 2)
    layer.weight = torch.nn.Parameter(torch.zeros(2, 2).as_subclass(QuantizedTensor), requires_grad=False)
    with pytest.raises(UnsupportedError, match="weight is a quantized tensor"):
        comfy_api.refuse_unrebuildable_weights(weights_patcher(layer))
    with pytest.raises(UnsupportedError, match="add_weight_wrapper"):
        comfy_api.refuse_unrebuildable_weights(weights_patcher(torch.nn.Linear(2, 2),
                                                               wrappers={"diffusion_model.w": [abs]}))
    attn = torch.nn.Module()
    attn.comfy_attention = types.SimpleNamespace(config={"attention": "comfy_kitchen_int8"}, function=None)
    with pytest.raises(UnsupportedError, match="ComfyAttention"):
        comfy_api.refuse_unrebuildable_weights(weights_patcher(attn))
    attn.comfy_attention = types.SimpleNamespace(config=None, function=None)  # newest default: fine
    comfy_api.refuse_unrebuildable_weights(weights_patcher(attn))


# -- LoRA baking: the dtype, intermediate dtype and seed each version's ComfyUI uses -----------------------

def test_lora_bake_settings_0364(fake_comfy):
    fake_comfy(model_management=module())
    mp = types.SimpleNamespace(load_device="cuda:0", model=types.SimpleNamespace())
    assert comfy_api.lora_bake_settings(mp, "diffusion_model.a.weight", torch.zeros(1)) == (
        torch.float32, torch.float32, "diffusion_model.a.weight")


def test_lora_bake_settings_newest_plain_patcher(fake_comfy):
    asked = []
    fake_comfy(model_management=module(lora_compute_dtype=lambda d: asked.append(d) or torch.float16))
    mp = types.SimpleNamespace(load_device="cuda:1", model=types.SimpleNamespace(), is_dynamic=lambda: False)
    assert comfy_api.lora_bake_settings(mp, "diffusion_model.a.weight", torch.zeros(1)) == (
        torch.float16, torch.float32, "diffusion_model.a.weight")
    assert asked == ["cuda:1"]


def test_lora_bake_settings_newest_dynamic_patcher(fake_comfy):
    fake_comfy(model_management=module(lora_compute_dtype=lambda d: torch.float16))
    base = types.SimpleNamespace(manual_cast_dtype=torch.bfloat16)
    mp = types.SimpleNamespace(load_device="cuda:0", model=base, is_dynamic=lambda: True, object_patches={})
    assert comfy_api.lora_bake_settings(mp, "diffusion_model.a.b.weight", torch.zeros(1, dtype=torch.float8_e4m3fn)) \
        == (torch.bfloat16, torch.bfloat16, "diffusion_model.a.b")


def test_compute_dtype_honours_a_manual_cast_object_patch():
    base = types.SimpleNamespace(manual_cast_dtype=None, get_dtype=lambda: torch.float16)
    assert comfy_api.compute_dtype(types.SimpleNamespace(model=base, object_patches={})) is None
    assert comfy_api.inference_dtype(types.SimpleNamespace(model=base, object_patches={})) is torch.float16
    mp = types.SimpleNamespace(model=base, object_patches={"manual_cast_dtype": torch.float32})
    assert comfy_api.compute_dtype(mp) is torch.float32


@pytest.mark.parametrize("parent", [Exception, BaseException])  # 0.3.64, newest
def test_is_interrupt_for_either_base_class(fake_comfy, parent):
    interrupt = type("InterruptProcessingException", (parent,), {})
    fake_comfy(model_management=module(InterruptProcessingException=interrupt))
    assert comfy_api.is_interrupt(interrupt())
    assert not comfy_api.is_interrupt(RuntimeError())


@pytest.mark.parametrize("version", ["0.3.64", "newest"])
def test_lora_patches_are_applied_in_the_worker_with_each_versions_dtype_and_seed(version, fake_comfy):
    """nodes/weights.py (server) to models/comfy_weights.py (worker) with fake comfy modules: the base weight
    is shared (adopted: the server's tensor now lives in the memory file), the patch travels as a patch, and
    the worker computes it in the dtype and with the seed that version's ComfyUI uses."""
    from stadi_core.models import comfy_weights

    seen = {}

    def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
        seen.update(weight_dtype=weight.dtype, intermediate=intermediate_dtype, key=key, patches=patches)
        return weight + 1

    def stochastic_rounding(value, dtype, seed=0):
        seen.update(seed=seed, to=dtype)
        return value.to(dtype)

    mm = module(lora_compute_dtype=lambda device: torch.float16) if version == "newest" else module()
    utils = module(string_to_seed=lambda d: len(d)) if version == "newest" else module()
    mp_module = module(get_key_weight=lambda model, key: (None, None, None),
                       string_to_seed=lambda d: -len(d))  # 0.3.64's home of string_to_seed
    fake_comfy(float=module(stochastic_rounding=stochastic_rounding), lora=module(calculate_weight=calculate_weight),
               model_patcher=mp_module, model_management=mm, utils=utils)
    w = torch.zeros(2, 2, dtype=torch.bfloat16)
    key = "diffusion_model.blocks.0.weight"
    patch = (1.0, ("diff", (torch.full((2, 2), 3.0),)), 1.0, None, None)
    base_model = torch.nn.Module()  # weights.py keys its shared memory to the model object's lifetime
    base_model.diffusion_model, base_model.model_config = torch.nn.Linear(2, 2), types.SimpleNamespace()
    patcher = types.SimpleNamespace(
        model=base_model,
        patches_uuid=f"uuid-{version}", load_device="cuda:0", weight_wrapper_patches={}, patches={key: [patch]},
        get_key_patches=lambda prefix: {key: [(w, lambda t, inplace=False: t), patch],
                                        "diffusion_model.other": [(torch.ones(3), lambda t, inplace=False: t)]})
    extra = weights.shared_network(patcher)
    assert set(extra) == {"shared_weights", "weight_patches", "weights_key"}
    assert seen == {}  # nothing computed on the server
    state = comfy_weights.comfy_state(extra)  # what a worker does (here in the same process)
    if version == "newest":
        assert {k: v for k, v in seen.items() if k != "patches"} == dict(
            weight_dtype=torch.float16, intermediate=torch.float32, key=key, seed=len(key), to=torch.bfloat16)
    else:
        assert {k: v for k, v in seen.items() if k != "patches"} == dict(
            weight_dtype=torch.float32, intermediate=torch.float32, key=key, seed=-len(key), to=torch.bfloat16)
    assert torch.equal(seen["patches"][0][1][1][0], torch.full((2, 2), 3.0))  # the patch itself travelled
    assert state["blocks.0.weight"].dtype == torch.bfloat16 and torch.all(state["blocks.0.weight"] == 1)
    assert torch.equal(state["other"], torch.ones(3))  # unpatched: the shared base tensor
    assert torch.all(w == 0)  # the server's base weight is untouched by the patch


def test_mirrored_options_cross_as_plain_data_and_the_worker_rebuilds_fast_features(fake_comfy):
    """--fast is a set of enum members on the server; the spec carries their values and a worker turns them
    back into its own ComfyUI's members before comfy.model_management / comfy.ops read them."""
    import enum

    class PerformanceFeature(enum.Enum):
        Fp16Accumulation = "fp16_accumulation"
        AutoTune = "autotune"

    server_args = types.SimpleNamespace(fast={PerformanceFeature.AutoTune, PerformanceFeature.Fp16Accumulation},
                                        deterministic=True, force_channels_last=False, use_pytorch_cross_attention=True)
    mirrored = comfy_common.mirrored_args(server_args)
    assert mirrored == {"fast": ["autotune", "fp16_accumulation"], "deterministic": True, "force_channels_last": False,
                        "use_pytorch_cross_attention": True}  # only what this ComfyUI has
    worker_args = types.SimpleNamespace(fast=set(), cpu=False)
    fake_comfy(cli_args=module(args=worker_args, PerformanceFeature=PerformanceFeature))
    comfy_common.prepare_comfy(mirrored, cpu=True)
    assert worker_args.fast == {PerformanceFeature.AutoTune, PerformanceFeature.Fp16Accumulation}
    assert worker_args.deterministic is True and worker_args.use_pytorch_cross_attention is True and worker_args.cpu
