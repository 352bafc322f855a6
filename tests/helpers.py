"""Small helpers shared by the engine tests."""

import torch

from stadi_core.cluster import ClusterSpec, DeviceSpec


def cpu_cluster(*speeds: float, slowdowns=None) -> ClusterSpec:
    """CPU workers with manual relative speeds (uneven bands without emulated slowness)."""
    slowdowns = slowdowns or [1.0] * len(speeds)
    return ClusterSpec(tuple(DeviceSpec(f"cpu:{i}", relative_speed=s, slowdown=d)
                             for i, (s, d) in enumerate(zip(speeds, slowdowns))), backend="gloo")


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((a - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak**2 / mse)).item()
