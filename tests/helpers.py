"""Small helpers shared by the engine tests."""


from stadi_core.cluster import ClusterSpec, DeviceSpec
from stadi_core.report import psnr  # noqa: F401 - re-exported for the tests


def cpu_cluster(*speeds: float, slowdowns=None) -> ClusterSpec:
    """CPU workers with manual relative speeds (uneven bands without emulated slowness)."""
    slowdowns = slowdowns or [1.0] * len(speeds)
    return ClusterSpec(tuple(DeviceSpec(f"cpu:{i}", relative_speed=s, slowdown=d)
                             for i, (s, d) in enumerate(zip(speeds, slowdowns))), backend="gloo")


def gone(pid: int) -> bool:
    """The process has exited (or is a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True
