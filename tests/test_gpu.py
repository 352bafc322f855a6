"""GPU paths: CUDA workers, shared-GPU workers, CUDA graphs, NCCL. Skipped without CUDA."""

import pytest
import torch

from stadi_core.api import generate
from stadi_core.cluster import ClusterSpec, DeviceSpec
from stadi_core.models.spec import ModelSpec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")]

KW = dict(height=48, width=48, batch=1, steps=6, cfg=2.0, seed=5, sampler="euler")


def _two_on_one_gpu(speeds=(2.0, 3.0)):
    return ClusterSpec((DeviceSpec("cuda:0", relative_speed=speeds[0]),
                        DeviceSpec("cuda:0.1", relative_speed=speeds[1])), backend="gloo")


def test_exact_mode_on_gpu_workers_matches_one_gpu_worker():
    one = generate(ModelSpec(), "cuda:0", mode="exact", **KW).latent
    two = generate(ModelSpec(), _two_on_one_gpu(), mode="exact", **KW)
    assert [b["rows"] for b in two.report.plan["bands"]] == [16, 32]
    diff = (two.latent - one).abs().max().item()
    print("exact, 2 workers on one GPU vs 1:", diff)
    assert diff <= 1e-4


def test_cuda_graphs_reproduce_eager_displaced_run():
    kw = dict(KW, mode="displaced", warmup=2, strides=(1, 2))
    eager = generate(ModelSpec(), _two_on_one_gpu((2.0, 1.0)), graphs=False, **kw).latent
    graphed = generate(ModelSpec(), _two_on_one_gpu((2.0, 1.0)), graphs=True, **kw)
    again = generate(ModelSpec(), _two_on_one_gpu((2.0, 1.0)), graphs=True, **kw)  # replays earlier captures
    d1 = (graphed.latent - eager).abs().max().item()
    d2 = (again.latent - eager).abs().max().item()
    print("displaced+strides, graphs vs eager:", d1, "second graphed run:", d2)
    assert d1 <= 1e-4 and d2 <= 1e-4


def test_graphs_in_one_worker_match_eager():
    a = generate(ModelSpec(config="tiny-sdxl"), "cuda:0", mode="displaced", graphs=False, **KW).latent
    b = generate(ModelSpec(config="tiny-sdxl"), "cuda:0", mode="displaced", graphs=True, **KW).latent
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between workers needs two GPUs")
def test_nccl_exact_mode_matches_one_gpu():
    one = generate(ModelSpec(), "cuda:0", mode="exact", **KW).latent
    res = generate(ModelSpec(), ClusterSpec((DeviceSpec("cuda:0", relative_speed=2.0),
                                             DeviceSpec("cuda:1", relative_speed=3.0)), backend="nccl"),
                   mode="exact", **KW)
    assert (res.latent - one).abs().max().item() <= 1e-4
