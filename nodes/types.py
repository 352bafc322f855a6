"""The objects that travel between STADI nodes (ComfyUI types STADI_CLUSTER, STADI_PATCHES).

Plain dataclasses with CPU tensors only: ComfyUI's cache keeps node outputs alive, so a
CUDA tensor here would pin VRAM until the node runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stadi_core.cluster import ClusterSpec

CLUSTER_TYPE = "STADI_CLUSTER"
PATCHES_TYPE = "STADI_PATCHES"
# optional (old prompts validate): how displaced steps exchange context (stadi_core/parallel/options.py)
CONTEXT_INPUT = (["full", "partial:0.5", "partial:0.3", "fp8", "delta", "partial:0.3+delta", "auto"], {
    "default": "full",
    "tooltip": "displaced mode only. full: every band's context (DistriFusion); partial:P: each band attends to the "
               "nearest P of its neighbours' rows and sends only those (PCPP); fp8: context sent as 8-bit floats; "
               "delta: 4-bit step-to-step changes with error feedback; auto: the lightest the cost model predicts "
               "pays off on these links. Lighter context moves fewer bytes and changes the image more "
               "(bench-context measures how much)"})

STRATEGY_INPUT = (["auto", "bands", "cfg_split", "cfg_split+bands"], {
    "default": "auto",
    "tooltip": "auto: the arrangement predicted fastest from the devices' speeds (one device alone included); "
               "bands: every device a band of rows of both CFG branches; cfg_split: cond and uncond on two "
               "devices; cfg_split+bands: the branches cut by speed (a fast device may also take a band of the "
               "other branch; 4 devices = 2 branches x 2 bands). Branch splits need CFG > 1"})


@dataclass
class StadiCluster:
    """What the GPU Cluster Profile node decided: devices, overrides, and why."""

    spec: ClusterSpec
    measure: bool = True  # measure capability on the actual model before planning (cached)
    devices_info: list[dict] = field(default_factory=list)  # per device: name, kind, label, memory, utilisation...
    notes: list[str] = field(default_factory=list)  # e.g. "cuda:3 not found on this machine: skipped"

    def to_ui(self) -> dict:
        return {"devices": self.devices_info, "notes": self.notes, "backend": self.spec.resolved_backend()}


@dataclass
class StadiPatches:
    """Per-rank bands of one STADI run, the plan that made them, and what each rank spent."""

    plan: dict  # stadi_core.planner.Plan.to_dict()
    bands: list[torch.Tensor]  # per rank, CPU (B, C, rows, W), top to bottom
    report: dict  # stadi_core.report.RunReport.to_dict()
    latent_extra: dict = field(default_factory=dict)  # other LATENT keys to carry (batch_index, noise_mask)
    # (devices, backend) of the worker pool that computed the bands, for Patch Stitch's decode_on=devices;
    # None: that node looks the warm pool up by the plan's band devices (what Deployment's pool is keyed by)
    pool_key: tuple | None = None

    def stitched(self) -> torch.Tensor:
        return torch.cat(self.bands, dim=2)

    def as_latent(self) -> dict:
        out = dict(self.latent_extra)
        out["samples"] = self.stitched()
        return out


def plan_ui_payload(patches: StadiPatches) -> dict:
    """The JSON the web extension draws on the STADI Sampler node after a run."""
    plan, report = patches.plan, patches.report
    ranks = {r["rank"]: r for r in report.get("ranks", [])}
    bands = []
    for b in plan["bands"]:
        r = ranks.get(b["rank"], {})
        bands.append({
            "rank": b["rank"], "device": b["device"], "row_start": b["row_start"], "rows": b["rows"],
            "stride": b["stride"], "evals": r.get("evals"), "busy_s": r.get("busy_s"), "comm_s": r.get("comm_s"),
            "wall_s": r.get("wall_s"), "idle_pct": r.get("idle_pct"), "sent_bytes": r.get("sent_bytes"),
        })
    return {"height": plan["height"], "steps": plan["steps"], "mode": plan["mode"], "warmup": plan["warmup"],
            "sync_period": plan["sync_period"], "wall_s": report.get("wall_s"), "notes": report.get("notes", []),
            "bands": bands, "strategy": plan.get("strategy", "bands"), "groups": plan.get("groups", []),
            "context": plan.get("context")}
