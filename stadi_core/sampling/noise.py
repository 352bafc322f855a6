"""Noise defined on the whole latent from the seed, then sliced to a band.

Every rank draws the same full-size tensors, so the image does not depend on how
many bands there are or where they fall.
"""

from __future__ import annotations

import torch

_STEP_MIX = 0x9E3779B97F4A7C15


class FullLatentNoise:
    def __init__(self, seed: int, shape: tuple[int, int, int, int]):
        self.seed = int(seed)
        self.shape = tuple(shape)

    def _draw(self, stream: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed((self.seed * _STEP_MIX + stream) % (1 << 63))
        return torch.randn(self.shape, generator=gen, dtype=torch.float32)

    def initial(self, rows: slice = slice(None)) -> torch.Tensor:
        """Starting noise (unit variance), rows ``rows`` of the full latent."""
        return self._draw(0)[:, :, rows]

    def step(self, index: int, rows: slice = slice(None)) -> torch.Tensor:
        """Fresh noise for sampler step ``index`` (ancestral samplers)."""
        return self._draw(index + 1)[:, :, rows]
