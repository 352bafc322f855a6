"""Patch-parallel layers: each rank computes its own band of rows and borrows context from the others."""

from .context import BandContext, Phase
from .layers import PatchConv2d, PatchGroupNorm
from .convert import make_patch_parallel

__all__ = ["BandContext", "Phase", "PatchConv2d", "PatchGroupNorm", "make_patch_parallel"]
