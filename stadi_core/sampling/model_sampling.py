"""How a family's network output becomes a denoised estimate (k-diffusion's denoiser wrapper).

Epsilon-prediction DDPM models (SD1.5, SDXL) and flow-matching models (SD3, Flux)
differ only here: input scaling, the timestep the network sees, the output
parameterisation and the noise levels. The band loop is the same for both.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .schedule import DiscreteSchedule


class EpsDiscrete:
    """x_in = x / sqrt(sigma^2 + 1); t from the DDPM sigma table; denoised = x - sigma * eps."""

    def __init__(self, schedule: DiscreteSchedule | None = None):
        self.schedule = schedule or DiscreteSchedule()

    def scale_in(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x / (sigma**2 + 1) ** 0.5

    def timestep(self, sigma: float) -> float:
        return self.schedule.sigma_to_t(sigma)

    def denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
        return x - out * sigma

    default_scheduler = "karras"

    def sigmas(self, scheduler: str | None, steps: int) -> list[float]:
        return self.schedule.sigmas_for(scheduler or self.default_scheduler, steps)


class FlowMatch:
    """Rectified flow: x_t = (1 - s) x0 + s noise, the network predicts v = noise - x0.

    ``shift`` is SD3/Flux's time shift; ``multiplier`` maps sigma to the network's timestep
    (1000 for SD3's transformer, 1 for Flux's).
    """

    default_scheduler = "simple"

    def __init__(self, shift: float = 3.0, multiplier: float = 1000.0):
        self.shift = shift
        self.multiplier = multiplier

    def scale_in(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x

    def timestep(self, sigma: float) -> float:
        return sigma * self.multiplier

    def denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
        return x - out * sigma

    def _shifted(self, t: float) -> float:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sigmas(self, scheduler: str | None, steps: int) -> list[float]:
        """Evenly spaced flow times, shifted (ComfyUI's "simple"/"normal" for flow models)."""
        if scheduler not in (None, "simple", "normal"):
            raise UnsupportedError(f"scheduler {scheduler!r} is not offered for flow models: use simple or normal")
        return [self._shifted(1 - i / steps) for i in range(steps)] + [0.0]
