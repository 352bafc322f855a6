"""What the ComfyUI-model adapters share inside a worker: building the server's network, and
band attention through ComfyUI's own attention hook.

The worker rebuilds the server's diffusion model class (named in ``spec.extra["model_class"]``)
from the server's ``unet_config`` and the weights the server shares (comfy_weights.py).
ComfyUI is imported lazily, with its command line options set the way the server had them, so
this module is importable without ComfyUI.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn as nn

from ..errors import UnsupportedError

# ComfyUI options that change how the network computes; mirrored from the server into workers.
MIRRORED_ARGS = ("use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention",
                 "disable_xformers", "use_sage_attention", "use_flash_attention", "force_upcast_attention",
                 "dont_upcast_attention",
                 "use_ck_attention",  # newer ComfyUI (Comfy Kitchen attention); the server mirrors only what it has
                 "fast",  # fp16 accumulation, fp8 matmuls, cuBLAS ops, cuDNN autotune (read at import and in comfy.ops)
                 "deterministic",  # torch.use_deterministic_algorithms, set when comfy.model_management is imported
                 "force_channels_last")  # the network's memory format (BaseModel applies it; build_from_spec here)


def mirrored_args(args) -> dict:
    """The server's values of MIRRORED_ARGS that its ComfyUI has, as plain data (``--fast``'s set of
    enum members becomes their sorted values: a worker rebuilds them from its own ComfyUI)."""
    out = {}
    for name in MIRRORED_ARGS:
        if hasattr(args, name):
            value = getattr(args, name)
            out[name] = sorted(getattr(v, "value", v) for v in value) if isinstance(value, (set, frozenset)) else value
    return out


def prepare_comfy(comfy_args: dict, cpu: bool) -> None:
    """Set ComfyUI's options before its modules read them at import time."""
    import comfy.cli_args

    args = comfy.cli_args.args
    for name, value in comfy_args.items():
        if name == "fast" and isinstance(value, list):
            feature = getattr(comfy.cli_args, "PerformanceFeature", None)
            value = {feature(v) for v in value} if feature is not None else set(value)
        setattr(args, name, value)
    args.cpu = cpu


def accepted_kwargs(fn, kwargs: dict) -> dict:
    """The part of ``kwargs`` that ``fn``'s signature takes by name (all of it if ``fn`` takes ``**kwargs``).

    ComfyUI adds and removes keyword parameters between versions; the pack calls its functions by
    keyword and passes only what the installed version has (feature detection, not version strings).
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in named}


def has_parameter(fn, name: str) -> bool:
    """Whether ``fn`` declares a parameter called ``name`` (a ``**kwargs`` catch-all does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_by_keyword(fn, what: str, required: tuple = (), **kwargs):
    """``fn(**kwargs)`` with only the keywords its signature has; the ``required`` ones must be there.

    A parameter we must hand over (a band's tokens, its positions) that the installed ComfyUI no
    longer has by that name means the adapter would compute something else: refuse instead.
    """
    passed = accepted_kwargs(fn, kwargs)
    missing = [k for k in required if k not in passed]
    if missing:
        raise UnsupportedError(f"{what} of this ComfyUI has no parameter {', '.join(missing)}: the band adapter "
                               "does not know this version's signature; use KSampler")
    return fn(**passed)


def pick_operations(pick, weight_dtype, compute_dtype, *, scaled_fp8=None, fp8_optimizations=False):
    """The layer classes ``comfy.ops.pick_operations`` (``pick``) gives for the server's dtypes.

    ComfyUI 0.3.64 takes ``scaled_fp8=`` (scaled-fp8 checkpoints get their own layers); newer
    versions dropped it (scaled-fp8 files load as quantized tensors via ``model_config``) and take
    ``fp8_optimizations=`` and ``model_config=`` by keyword. Only keywords ``pick`` declares are
    passed; a scaled-fp8 model on a ComfyUI without ``scaled_fp8`` cannot be rebuilt (the server
    refuses it first, see nodes/comfy_api.py).
    """
    kwargs = {}
    if has_parameter(pick, "fp8_optimizations"):
        kwargs["fp8_optimizations"] = bool(fp8_optimizations)
    if scaled_fp8 is not None:
        if not has_parameter(pick, "scaled_fp8"):
            raise UnsupportedError("the server's model has scaled-fp8 weights, but this ComfyUI's "
                                   "comfy.ops.pick_operations has no scaled_fp8 parameter (it loads such files as "
                                   "quantized tensors, which the workers cannot rebuild); load an fp8_e4m3fn/bf16/"
                                   "fp16 model or use KSampler")
        kwargs["scaled_fp8"] = scaled_fp8
    return pick(weight_dtype, compute_dtype, **kwargs)


def archive_model_dtypes(model: nn.Module) -> None:
    """What newer ComfyUI's BaseModel does right after building its network (records each
    parameter's dtype for its lazy casts); absent in 0.3.64, then nothing to do."""
    import comfy.model_management

    archive = getattr(comfy.model_management, "archive_model_dtypes", None)
    if archive is not None:
        archive(model)


def model_class_path(module: nn.Module) -> str:
    """``module:QualName`` of the server's diffusion model, for the worker to rebuild it."""
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def _network(spec, device, operations) -> nn.Module:
    """The server's network class built from its config on ``device`` (no weights loaded)."""
    module_name, _, qualname = spec.extra["model_class"].partition(":")
    cls = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    config = dict(spec.config, dtype=getattr(torch, spec.dtype))
    model = cls(**config, device=device, operations=operations)
    archive_model_dtypes(model)
    return model


def _operations(spec):
    """The layer classes the server built the network with: manual-cast layers keep fp8/fp16 weights
    and compute in the server's compute dtype, scaled-fp8 layers carry their scales."""
    import comfy.ops

    extra = spec.extra
    compute_dtype = getattr(torch, extra["compute_dtype"]) if extra.get("compute_dtype") else None
    scaled_fp8 = getattr(torch, extra["scaled_fp8"]) if extra.get("scaled_fp8") else None
    return pick_operations(comfy.ops.pick_operations, getattr(torch, spec.dtype), compute_dtype,
                           scaled_fp8=scaled_fp8, fp8_optimizations=bool(extra.get("fp8_optimizations")))


def _compute_dtype(spec) -> torch.dtype:
    name = spec.extra.get("compute_dtype")
    return getattr(torch, name) if name else getattr(torch, spec.dtype)


def build_from_spec(spec, device) -> nn.Module:
    """The server's diffusion model, rebuilt from its config and the weights the server shares.

    Built on the meta device and given the server's tensors (models/comfy_weights.py: its base
    weights mapped from its memory, patched ones computed here), so a CPU worker computes on the
    server's pages and a GPU worker copies them to its device once; a network with state the
    server does not share (non-persistent buffers) is built on the CPU instead.
    """
    from .comfy_weights import comfy_state

    extra = spec.extra
    prepare_comfy(extra.get("comfy_args", {}), cpu=torch.device(device).type == "cpu")
    operations = _operations(spec)
    state = comfy_state(extra)
    model = _network(spec, "meta", operations)
    # like load_state_dict into a built model: each tensor takes the dtype the network was built with
    built = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(built[k]) if k in built and v.is_floating_point() and v.dtype != built[k] else v
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnsupportedError(f"the diffusion model's weights do not match its config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = _network(spec, "cpu", operations)
        model.load_state_dict(state, strict=False)
    model = model.to(device=device)
    import comfy.model_management

    channels_last = getattr(comfy.model_management, "force_channels_last", None)
    if channels_last is not None and channels_last():  # what BaseModel does with the server's network
        model = model.to(memory_format=torch.channels_last)
    model._stadi_compute_dtype = _compute_dtype(spec)  # what inputs are cast to (spec.input_dtype)
    return model


def meta_network(spec) -> nn.Module:
    """The server's network on the meta device, with no weights: shapes only, for counting what a call
    sends (exchange_probe.py) inside the server itself.

    Unlike ``build_from_spec`` it leaves ComfyUI's options alone (they are the server's own here) and
    maps no weights. Its attentions are computed with ComfyUI's SDPA attention (``call_options``): the
    one ComfyUI picks on a CPU server, sub-quadratic (or split), sizes its chunks by the device's free
    memory, which the meta device cannot report (``KeyError: 'active_bytes.all.current'``). Attention
    changes no shape and sends nothing, so the count is the same.
    """
    import comfy.ldm.modules.attention as attention

    model = _network(spec, "meta", _operations(spec))
    model._stadi_compute_dtype = _compute_dtype(spec)
    model._stadi_plain_attention = attention.get_attention_function("pytorch")
    return model


def call_options(model: nn.Module, options: dict | None = None) -> dict:
    """The ``transformer_options`` of one network call: ``options`` (a band attention's route), and on a
    ``meta_network`` ComfyUI's own ``optimized_attention_override`` hook routing every attention to the
    SDPA one (through the band attention where there is one). Empty for a worker's network: its calls
    run exactly as before."""
    plain = getattr(model, "_stadi_plain_attention", None)
    options = dict(options or {})
    if plain is None:
        return options
    band = options.get("optimized_attention_override")
    if band is None:
        options["optimized_attention_override"] = lambda func, *args, **kwargs: plain(*args, **kwargs)
    else:
        options["optimized_attention_override"] = lambda func, *args, **kwargs: band(plain, *args, **kwargs)
    return options


def model_sampling(model):
    raise UnsupportedError("ComfyUI models sample in ComfyUI's own loop (the server), not in the worker")


class BandAttention:
    """ComfyUI's ``optimized_attention_override``: every self/joint attention sees the whole image.

    ComfyUI's DiTs call ``optimized_attention`` with the text tokens first and the image tokens
    last (MMDiT's joint blocks, Flux's double and single blocks), or with image tokens only
    (SD3.5's second attention). Either way the band's image tokens are the last ``image_tokens``
    of the keys and values (Flux hands them over after RoPE, so each band's keys carry their
    own positions); they are replaced by the whole image's, ours fresh, the others' from the
    band context. Calls are numbered in network order, the same on every rank.
    """

    def __init__(self, ctx, layer_ids: list[int]):
        self.ctx = ctx
        self.layer_ids = layer_ids
        self.image_tokens = 0
        self.calls = 0

    def start(self, image_tokens: int) -> dict:
        """Begin a network call; returns the transformer_options that route attention here."""
        self.image_tokens = image_tokens
        self.calls = 0
        return {"optimized_attention_override": self}

    def finish(self) -> None:
        if self.calls != len(self.layer_ids):
            raise UnsupportedError(f"the network ran {self.calls} attentions, the band plan expected "
                                   f"{len(self.layer_ids)}: this model variant is not supported in bands")

    def __call__(self, func, q, k, v, *args, **kwargs):
        if kwargs.get("mask") is not None:
            raise UnsupportedError("masked attention (e.g. a T5 attention mask) is not supported in bands")
        seq = 2 if kwargs.get("skip_reshape") else 1  # (B, H, S, D), or (B, S, H*D) / (B, S, H, D)
        if seq == 1:  # MMDiT hands v over as (B, S, H, D) and k as (B, S, H*D): one layout for both
            k, v = k.reshape(k.shape[0], k.shape[1], -1), v.reshape(v.shape[0], v.shape[1], -1)
        n_img = self.image_tokens
        if q.shape[seq] != k.shape[seq] or k.shape[seq] < n_img:
            raise UnsupportedError("cross-attention inside a DiT block is not supported in bands")
        if self.calls >= len(self.layer_ids):
            raise UnsupportedError("the network ran more attentions than the band plan expected")
        layer_id = self.layer_ids[self.calls]
        self.calls += 1
        n_text = k.shape[seq] - n_img
        k_img, v_img = k.narrow(seq, n_text, n_img), v.narrow(seq, n_text, n_img)
        kv = self.ctx.whole_tokens(layer_id, torch.cat([k_img, v_img], dim=-1), dim=seq)
        k_all, v_all = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
        if n_text:
            k_all = torch.cat([k.narrow(seq, 0, n_text), k_all], dim=seq)
            v_all = torch.cat([v.narrow(seq, 0, n_text), v_all], dim=seq)
        return func(q, k_all.contiguous(), v_all.contiguous(), *args, **kwargs)


def attach_band_attention(model: nn.Module, ctx, next_id, sites: int) -> int:
    """Give ``model`` a ``BandAttention`` for its ``sites`` attention calls per network call."""
    model._stadi_ctx = ctx
    model._stadi_attention = BandAttention(ctx, [next_id() for _ in range(sites)])
    return sites


def band_attention(model: nn.Module) -> BandAttention | None:
    """The model's band attention, or None for an unwrapped (single-process reference) model."""
    return getattr(model, "_stadi_attention", None)
