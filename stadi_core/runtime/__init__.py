"""Worker processes: launch, torch.distributed group, control channel, heartbeats, warm pool.

Kept import-free: ``python -m stadi_core.runtime.worker`` must not import torch before
it has set ``CUDA_VISIBLE_DEVICES``.
"""
