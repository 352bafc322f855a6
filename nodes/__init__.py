"""The ComfyUI layer: thin nodes that convert ComfyUI objects to engine types and back."""

from __future__ import annotations

import importlib
import logging

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# node module -> (class name, node id, display name)
_NODES = [
    ("cluster_profile_node", "GPUClusterProfile", "STADIClusterProfile", "GPU Cluster Profile (STADI)"),
    ("sampler_node", "STADISampler", "STADISampler", "STADI Sampler"),
    ("parallel_model_node", "STADIParallelModel", "STADIParallelModel", "STADI Parallel Model"),
    ("patch_stitch_node", "PatchStitch", "STADIPatchStitch", "Patch Stitch (STADI)"),
]

for module_name, class_name, node_id, display in _NODES:
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:  # a node whose module is missing must not take the others down
        logging.getLogger("stadi").error("STADI: node %s unavailable: %s", node_id, exc)
        continue
    NODE_CLASS_MAPPINGS[node_id] = getattr(module, class_name)
    NODE_DISPLAY_NAME_MAPPINGS[node_id] = display
