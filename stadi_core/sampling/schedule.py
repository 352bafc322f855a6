"""Noise levels of a discrete-time (DDPM) epsilon model, in the k-diffusion formulation."""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedError

SCHEDULERS = ("karras", "normal", "simple")


class DiscreteSchedule:
    """sigma <-> timestep for a model trained on ``num_train`` betas (SD's scaled-linear default)."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train: int = 1000):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        log_sigma = math.log(sigma)
        ls = self.log_sigmas
        low = int(torch.clamp((log_sigma - ls >= 0).sum() - 1, 0, len(ls) - 2))
        w = (ls[low] - log_sigma) / (ls[low] - ls[low + 1])
        w = float(min(max(w, 0.0), 1.0))
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: float) -> float:
        low = int(math.floor(t))
        high = min(low + 1, len(self.log_sigmas) - 1)
        w = t - low
        return float(((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp())

    def sigmas_for(self, scheduler: str, steps: int) -> list[float]:
        """``steps + 1`` noise levels ending in 0, as ComfyUI's schedulers of the same name."""
        if scheduler == "karras":
            rho = 7.0
            ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
            lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
            sig = ((hi + ramp * (lo - hi)) ** rho).tolist()
        elif scheduler == "normal":
            ts = torch.linspace(len(self.sigmas) - 1, 0, steps, dtype=torch.float64).tolist()
            sig = [self.t_to_sigma(t) for t in ts]
        elif scheduler == "simple":
            stride = len(self.sigmas) / steps
            sig = [float(self.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
        else:
            raise UnsupportedError(f"unknown scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")
        return sig + [0.0]
