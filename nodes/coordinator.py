"""The STADI Sampler's coordinator inside the ComfyUI server (DESIGN §3): picks the execution shape.

- Plans with every stride 1 (exact mode, strides off, equal devices, multi-evaluation or adaptive
  samplers) run in **lockstep** (lockstep.py): one stock sampler loop, each network call split
  into bands, so everything image-wide works unchanged.
- Plans with strides > 1 run **per-rank loops** (rank_loops.py), where anything image-wide is
  refused before the run.
Both keep ComfyUI's noise, sigmas, progress bar, preview and interrupt semantics.
"""

from __future__ import annotations

from stadi_core.errors import WorkerLost

from . import compatibility
from .deployment import Deployment
from .lockstep import LockstepPatch
from .rank_loops import RankLoops
from .types import StadiCluster, StadiPatches


class StadiRun:
    """One STADI Sampler execution: plan, execution shape, stitched bands and report."""

    def __init__(self, model, *, cluster: StadiCluster | None, mode: str, warmup: int, strides: str,
                 sampler_name: str, steps: int, strategy: str = "auto", compile: str = "off", context: str = "full"):
        compatibility.refuse_second_stadi(model)
        self.deployment = Deployment(model, cluster=cluster, mode=mode, warmup=warmup, strides=strides,
                                     sampler_name=sampler_name, steps=steps, strategy=strategy, compile=compile,
                                     context=context)
        self.strategy, self.compile, self.context = strategy, compile, context
        self.model, self.cluster = model, self.deployment.cluster
        self.mode, self.warmup, self.sampler_name, self.steps = mode, warmup, sampler_name, steps

    def plan(self, height: int, width: int, speeds=None):
        return self.deployment.plan(height, width, speeds)

    def sample(self, noise, latent_image, *, positive, negative, cfg, scheduler, denoise, noise_mask, seed,
               latent_extra: dict) -> StadiPatches:
        compatibility.check_conditioning(positive, negative)
        compatibility.check_controls(self.model, positive, negative, lockstep=True)  # the family; strides below
        batch, _, height, width = latent_image.shape
        self.deployment.branches = cfg != 1.0  # KSampler's guider: a separate uncond pass unless cfg is 1
        plan = self.deployment.measured_plan(batch, height, width)
        while any(b.stride > 1 for b in plan.bands):
            compatibility.check_model(self.model, lockstep=False)
            compatibility.check_controls(self.model, positive, negative, lockstep=False)
            loops = RankLoops(self.deployment, plan)
            try:
                bands, report = loops.sample(
                    noise, latent_image, positive=positive, negative=negative, cfg=cfg, scheduler=scheduler,
                    denoise=denoise, noise_mask=noise_mask, seed=seed)
            except WorkerLost as lost:  # lost before the loops could go on (e.g. while loading): restart
                plan = self.deployment.drop(lost, loops.final_plan, width, getattr(lost, "step", None),
                                            resumed=False)
                continue
            return StadiPatches(plan=loops.final_plan.to_dict(), bands=bands, report=report.to_dict(),
                                latent_extra=latent_extra)
        return self._lockstep(noise, latent_image, positive=positive, negative=negative, cfg=cfg, scheduler=scheduler,
                              denoise=denoise, noise_mask=noise_mask, seed=seed, latent_extra=latent_extra)

    def _lockstep(self, noise, latent_image, *, positive, negative, cfg, scheduler, denoise, noise_mask, seed,
                  latent_extra):
        import comfy.sample
        import comfy.utils
        import latent_preview

        # the cluster as it is now: a strided attempt may have lost a worker before this
        patch = LockstepPatch(self.deployment.cluster, self.mode, self.warmup, self.strategy, self.compile,
                              self.context)
        model = patch.apply(self.model)
        callback = latent_preview.prepare_callback(model, self.steps)
        out = comfy.sample.sample(model, noise, self.steps, cfg, self.sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=noise_mask, callback=callback,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        plan = patch.last_plan
        if plan.splits_branches:  # every rank computed rows of branches, not a band of the result
            bands = [out.cpu()]
        else:
            bands = [out[:, :, b.row_start:b.row_end].cpu() for b in plan.bands]
        report = patch.last_report
        report.notes[:0] = self.deployment.losses  # lost before this lockstep run (a strided attempt)
        return StadiPatches(plan=plan.to_dict(), bands=bands, report=report.to_dict(), latent_extra=latent_extra)
