"""Standalone sampling: k-diffusion-style samplers run per rank on its band."""

from .noise import FullLatentNoise
from .samplers import SAMPLERS, make_sampler
from .schedule import DiscreteSchedule

__all__ = ["FullLatentNoise", "SAMPLERS", "make_sampler", "DiscreteSchedule"]
