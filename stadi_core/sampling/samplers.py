"""Sampler steps in the k-diffusion formulation, elementwise so a band steps like the whole.

Each sampler turns (x, denoised, sigma, sigma_next) into the next x; the network is
evaluated elsewhere, which is what lets a rank reuse its last output on steps it skips.
A sampler's history (``state``/``load``) travels with a paused or checkpointed loop
(loop_state.py), so a loop continued on other rows steps exactly as it would have.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import UnsupportedError

NoiseFn = Callable[[int], torch.Tensor]


class _Stateless:
    def state(self) -> dict:
        """The history the next step needs: row-aligned tensors and floats (none here)."""
        return {}

    def load(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no history, got {sorted(state)}")


class Euler(_Stateless):
    def step(self, i, x, denoised, sigma, sigma_next, noise: NoiseFn):
        d = (x - denoised) / sigma
        return x + d * (sigma_next - sigma)


class EulerAncestral(_Stateless):
    """eta = 1, s_noise = 1, as ComfyUI's euler_ancestral defaults."""

    def step(self, i, x, denoised, sigma, sigma_next, noise: NoiseFn):
        if sigma_next == 0:
            return denoised
        sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        return x + noise(i).to(x) * sigma_up


class DPMPP2M:
    """DPM-Solver++(2M): keeps the previous denoised estimate as its history."""

    def __init__(self):
        self.old_denoised = None
        self.prev_sigma = None

    def step(self, i, x, denoised, sigma, sigma_next, noise: NoiseFn):
        if sigma_next == 0:
            out = denoised
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            if self.old_denoised is None:
                d = denoised
            else:
                r = (t - (-math.log(self.prev_sigma))) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.old_denoised
            out = (sigma_next / sigma) * x - math.expm1(-h) * d
        self.old_denoised = denoised
        self.prev_sigma = sigma
        return out

    def state(self) -> dict:
        if self.old_denoised is None:
            return {}
        return {"old_denoised": self.old_denoised, "prev_sigma": self.prev_sigma}

    def load(self, state: dict) -> None:
        self.old_denoised = state.get("old_denoised")
        self.prev_sigma = state.get("prev_sigma")


SAMPLERS: dict[str, type] = {"euler": Euler, "euler_ancestral": EulerAncestral, "dpmpp_2m": DPMPP2M}


def make_sampler(name: str):
    try:
        return SAMPLERS[name]()
    except KeyError:
        raise UnsupportedError(
            f"sampler {name!r} is not in the standalone engine: use one of {', '.join(SAMPLERS)} "
            "(the ComfyUI node runs every ComfyUI sampler)"
        ) from None
