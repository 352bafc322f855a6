"""Loading a diffusers model class from a local folder, shared by the diffusers adapters."""

from __future__ import annotations

import os

import torch


def load_local(class_name: str, path: str, subfolder: str) -> torch.nn.Module:
    """``class_name`` from ``path`` or its ``subfolder`` (a whole pipeline folder); never the hub."""
    import diffusers

    sub = os.path.join(path, subfolder)
    folder = sub if os.path.isdir(sub) else path
    return getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True)
