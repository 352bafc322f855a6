"""Planning with workers on other machines, without a second machine: the per-pair link matrix built
from the links measured at join, the planner's choice across a slow and a fast link, and the context
bytes counted on the model against what a real run's transport counted."""

import pytest

from helpers import cpu_cluster
from stadi_core.api import choose_for, generate
from stadi_core.cluster import ClusterSpec, DeviceSpec
from stadi_core.cost_model import ExchangeCost
from stadi_core.exchange_probe import measure_exchange
from stadi_core.models.spec import ModelSpec, model_spec_for
from stadi_core.runtime.lobby import Lobby
from stadi_core.runtime.messages import LinkInfo

REMOTE = "10.0.0.2"
FLUX_1024 = ExchangeCost(bytes_per_row=22_413_312, messages=57, output_bytes_per_row=4096)  # bench/arrangements.py


@pytest.fixture
def lobby():
    lob = Lobby("127.0.0.1:0", "a-token")
    yield lob
    lob.close()


def _with_link(lobby, gbps: float, latency_s: float):
    lobby.links[REMOTE] = LinkInfo(REMOTE, gbps, latency_s, gbps, gbps, 8 << 20)
    return lobby


def test_link_matrix_uses_the_measured_link_between_machines_only(lobby):
    _with_link(lobby, 0.1, 1e-3)
    devices = ["cpu:0", "cpu:1", f"{REMOTE}/cuda:0", f"{REMOTE}/cuda:1"]
    link = lobby.link_model(devices)
    assert link.bandwidth(0, 1) == link.bandwidth(2, 3) == 25e9  # inside a machine: LinkModel() defaults
    assert link.bandwidth(0, 2) == link.bandwidth(3, 1) == pytest.approx(0.1e9)
    assert link.latency(1, 3) == pytest.approx(1e-3) and link.latency(2, 3) == pytest.approx(20e-6)
    with pytest.raises(Exception, match="no link measured to 10.0.0.9"):
        lobby.link_model(["cpu:0", "10.0.0.9/cpu:0"])


@pytest.mark.parametrize("gbps, expect", [(0.125, "single"), (25.0, "bands")])
def test_planner_keeps_work_off_a_slow_link(lobby, gbps, expect):
    """Flux-1024-like: 183 rows/s per device, 22 MB of K/V per band row and call, no CFG branches. Over
    1 GbE bands across the machines would wait seconds per step: one device alone; over 25 GB/s: bands."""
    _with_link(lobby, gbps, 50e-6)
    cluster = ClusterSpec((DeviceSpec("cpu:0", capability=183.0), DeviceSpec(f"{REMOTE}/cpu:0", capability=183.0)))
    choice = choose_for(cluster, height=128, steps=28, sampler="euler", mode="displaced", warmup=2, strides="off",
                        align=2, strategy="auto", cfg=1.0, links=(lobby, FLUX_1024))
    print(choice.table())
    assert choice.candidates[0].name.startswith(expect), choice.table()


def test_relative_speeds_are_not_priced_against_links(lobby):
    _with_link(lobby, 0.125, 50e-6)
    cluster = ClusterSpec((DeviceSpec("cpu:0", relative_speed=1.0), DeviceSpec(f"{REMOTE}/cpu:0", relative_speed=1.0)))
    choice = choose_for(cluster, height=128, steps=28, sampler="euler", mode="displaced", warmup=2, strides="off",
                        align=2, strategy="bands", cfg=1.0, links=(lobby, FLUX_1024))
    assert choice.plan.rows == (64, 64)  # compute only: the link did not enter the price
    assert choice.candidates[0].predicted_s == pytest.approx(64.0)


def test_counted_context_bytes_equal_what_a_real_run_sent():
    """measure_exchange (one process, meta device) against the transport's own count in a 2-worker run."""
    kw = dict(height=32, width=32, batch=2, cfg=2.0)
    cost = measure_exchange(model_spec_for("tiny-sd15"), align=8, **kw)
    res = generate(ModelSpec(config="tiny-sd15"), cpu_cluster(1.0, 1.0), mode="exact", strategy="bands", steps=3,
                   threads_per_worker=1, **kw)
    per_call = res.report.ranks[0].sent_bytes / 3
    assert res.report.ranks[0].rows == 16
    assert cost.bytes_fixed + cost.bytes_per_row * 16 == pytest.approx(per_call, rel=1e-6)
    # output: channels x width x 4 samples (2 x 2 CFG branches) x fp32
    assert cost.messages > 0 and cost.output_bytes_per_row == 4 * 32 * 2 * 2 * 4
