"""STADI Parallel Model: MODEL -> MODEL whose sampling runs in bands on the cluster, for any sampler node."""

from __future__ import annotations

from .sampler_node import COMPILE_INPUT
from .types import CLUSTER_TYPE, CONTEXT_INPUT, STRATEGY_INPUT, StadiCluster


class STADIParallelModel:
    DESCRIPTION = ("Makes any sampler node (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced with any "
                   "guider, other packs' samplers) split each network call across the cluster's GPUs (or CPU "
                   "workers), one band of rows per device sized to its speed. The sampler loop, CFG functions "
                   "(RescaleCFG...), guiders and step caches (EasyCache, LazyCache) run unchanged on the whole "
                   "image. 'exact' reproduces the stock result; 'displaced' reuses the other bands' context from the "
                   "previous call after the warmup steps (faster, slight deviation). 'strategy' may put the CFG "
                   "branches on different devices instead (auto: the arrangement predicted fastest, one device "
                   "alone included). "
                   "ControlNets and T2I-Adapters (SD1.x/SD2.x/SDXL) work: ComfyUI computes them here, each device "
                   "gets its rows. Strides need the STADI Sampler.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "sampling/STADI"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "mode": (["exact", "displaced"], {"default": "exact",
                                                  "tooltip": "exact: fresh context every layer and call, equals the "
                                                             "stock sampler; displaced: faster"}),
                "warmup_steps": ("INT", {"default": 2, "min": 0, "max": 1000,
                                         "tooltip": "synchronous steps before displaced context"}),
            },
            "optional": {"cluster": (CLUSTER_TYPE,), "strategy": STRATEGY_INPUT, "compile": COMPILE_INPUT,
                         "context": CONTEXT_INPUT},
        }

    def patch(self, model, mode, warmup_steps, cluster: StadiCluster | None = None, strategy: str = "auto",
              compile: str = "auto", context: str = "full"):
        from stadi_core.errors import PlanError

        from .lockstep import LockstepPatch

        if mode == "displaced" and warmup_steps < 1:
            raise PlanError("STADI Parallel Model: displaced mode needs at least 1 warmup step; set warmup_steps "
                            "to 1 or more, or use exact mode")
        return (LockstepPatch(cluster, mode, warmup_steps, strategy, compile, context).apply(model),)
