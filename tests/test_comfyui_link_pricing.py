"""The ComfyUI path's planner with a device that joined from another machine (nodes/link_pricing.py
``plan_choice``, what Deployment.plan calls), without ComfyUI or a second machine: the lobby holds the link
as if measured at join, the bytes a call sends are counted on a real model (exchange_probe.py; the count of
the ComfyUI network itself, against a real ComfyUI run's transport, is in test_comfyui_remote.py).

Speeds are rows/s of one both-branch call, as Deployment.measure gives them: 400 and 300 (a fast and a
slower device; unequal, so that bands, cut by speed, beat the CFG-branch split on compute alone)."""

import pytest

from stadi_core.exchange_probe import measure_exchange
from stadi_core.models.spec import model_spec_for
from stadi_core.runtime.lobby import Lobby
from stadi_core.runtime.messages import LinkInfo
from stadi_pack.nodes import link_pricing

REMOTE = "10.77.0.2"
NAMES = ["cpu:0", f"{REMOTE}/cpu:1"]
SPEEDS = [400.0, 300.0]
PLAN = dict(strategy="auto", branches=True, align=8, steps=20, warmup=2, mode="displaced", strides="off",
            sampler="euler", ragged=True, context=None)


@pytest.fixture(scope="module")
def exchange():
    """tiny-sd15 at a 64 x 64 latent with CFG: about 1 MB + 0.16 MB per band row and call, 85 all-gathers."""
    return measure_exchange(model_spec_for("tiny-sd15"), height=64, width=64, batch=1, cfg=5.0, align=8)


@pytest.fixture
def lobby():
    lob = Lobby("127.0.0.1:0", "a-token")
    yield lob
    lob.close()


def _linked(lobby, gbps: float):
    lobby.links[REMOTE] = LinkInfo(REMOTE, gbps, 50e-6, gbps, gbps, 8 << 20)
    return lobby


def test_a_slow_link_moves_the_plan_to_the_cfg_branch_split(lobby, exchange):
    """0.01 GB/s (80 Mbit/s): bands would send ~11 MB per call across it; the branch split only its output."""
    unpriced = link_pricing.plan_choice(64, NAMES, SPEEDS, **PLAN)
    priced = link_pricing.plan_choice(64, NAMES, SPEEDS, links=(_linked(lobby, 0.01), exchange), **PLAN)
    print(unpriced.table(), priced.table(), sep="\n")
    assert unpriced.candidates[0].name == "bands"
    assert priced.candidates[0].name == "cfg_split"
    times = {c.name: c.predicted_s for c in priced.candidates}
    assert times["bands"] > 5 * times["cfg_split"]  # the link, not compute, decided
    note = link_pricing.priced_note(priced, NAMES, SPEEDS, exchange)
    assert note.startswith("plan priced with the links to other machines, predicted per step: cfg_split ")
    assert "bands " in note and "single cpu:0 " in note and "85 all-gathers" in note


def test_a_fast_link_picks_what_compute_alone_picks(lobby, exchange):
    unpriced = link_pricing.plan_choice(64, NAMES, SPEEDS, **PLAN)
    priced = link_pricing.plan_choice(64, NAMES, SPEEDS, links=(_linked(lobby, 25.0), exchange), **PLAN)
    assert priced.plan.strategy == unpriced.plan.strategy == "bands"
    assert priced.plan.rows == unpriced.plan.rows
    assert priced.candidates[0].predicted_s > unpriced.candidates[0].predicted_s  # the exchange is priced


def test_devices_of_one_machine_are_not_link_priced(lobby, exchange):
    _linked(lobby, 0.01)
    local = link_pricing.plan_choice(64, ["cpu:0", "cuda:0"], SPEEDS, links=(lobby, exchange), **PLAN)
    assert local.candidates[0].name == "bands"
