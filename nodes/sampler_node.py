"""STADI Sampler: KSampler's inputs and output, computed in bands on several devices."""

from __future__ import annotations

from .types import CLUSTER_TYPE, CONTEXT_INPUT, PATCHES_TYPE, STRATEGY_INPUT, StadiCluster, plan_ui_payload

# optional (old prompts validate): how the workers run band calls that have no exchange inside
COMPILE_INPUT = (["auto", "off", "graphs", "torch.compile"], {
    "default": "auto",
    "tooltip": "auto: CUDA graphs on GPUs, eager on CPU; graphs: replay displaced calls from CUDA graphs; "
               "torch.compile: compile them (the first calls of each shape pay the compile time); off: eager. "
               "Exact and warmup calls always run eagerly; a refused or failed compile runs eagerly and says so "
               "in the report"})


class STADISampler:
    DESCRIPTION = ("Drop-in KSampler replacement that splits one generation across several GPUs (or CPU "
                   "workers), each denoising a band of rows sized to its speed. 'exact' reproduces KSampler; "
                   "'displaced' reuses the other bands' context from the last sync step (faster, slight deviation). "
                   "Without strides it runs one sampler loop (CFG functions, step caches work); with strides each "
                   "device runs its own loop and image-wide nodes are refused (set strides off). 'strategy' may split "
                   "the CFG branches across devices instead (auto: the arrangement predicted fastest). "
                   "Models: SD1.x, SD2.x, SDXL (inpainting too), SD3/SD3.5, Flux.1 incl. Fill (LoRA, fp8 weights and "
                   "ModelSampling nodes included). ControlNets / T2I-Adapters (SD1.x/SD2.x/SDXL) need strides off or exact mode.")
    RETURN_TYPES = ("LATENT", PATCHES_TYPE)
    RETURN_NAMES = ("LATENT", "patches")
    FUNCTION = "sample"
    CATEGORY = "sampling/STADI"

    @classmethod
    def INPUT_TYPES(cls):
        from .comfy_api import comfy_nodes

        required = dict(comfy_nodes().KSampler.INPUT_TYPES()["required"])  # same names, order, lists and defaults
        required["mode"] = (["displaced", "exact"], {"default": "displaced",
                                                     "tooltip": "exact: fresh context every layer and step, "
                                                                "equals KSampler; displaced: faster"})
        required["warmup_steps"] = ("INT", {"default": 2, "min": 0, "max": 1000,
                                            "tooltip": "synchronous steps before displaced context and strides"})
        required["strides"] = (["auto", "off"], {"default": "auto",
                                                 "tooltip": "auto: slower devices may take fewer, larger steps"})
        return {"required": required, "optional": {"cluster": (CLUSTER_TYPE,), "strategy": STRATEGY_INPUT,
                                                    "compile": COMPILE_INPUT, "context": CONTEXT_INPUT}}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               mode, warmup_steps, strides, cluster: StadiCluster | None = None, strategy: str = "auto",
               compile: str = "auto", context: str = "full"):
        import comfy.sample

        from .coordinator import StadiRun

        latent = latent_image
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        run = StadiRun(model, cluster=cluster, mode=mode, warmup=min(warmup_steps, steps),
                       strides=strides, sampler_name=sampler_name, steps=steps, strategy=strategy, compile=compile,
                       context=context)
        extra = {k: v for k, v in latent.items() if k != "samples"}
        patches = run.sample(noise, samples, positive=positive, negative=negative, cfg=cfg, scheduler=scheduler,
                             denoise=denoise, noise_mask=latent.get("noise_mask"), seed=seed, latent_extra=extra)
        return {"ui": {"stadi_plan": [plan_ui_payload(patches)]}, "result": (patches.as_latent(), patches)}
