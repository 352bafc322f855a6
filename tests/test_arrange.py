"""The planner's choice of arrangement as a pure function (arrange.choose_plan), and work units."""

import itertools
import random

import pytest

from stadi_core.arrange import choose_plan, host_shared_speeds, link_for
from stadi_core.cost_model import ExchangeCost, LinkModel, predict_step
from stadi_core.errors import PlanError, UnsupportedError
from stadi_core.planner import Plan, make_branch_plan, make_plan
from stadi_core.work_units import BranchGroup, branch_major_shares, check_groups, units_of, work_rows

# SDXL-like figures at 1024^2 (see stadi_core/bench/arrangements.py for their derivation)
SDXL = ExchangeCost(bytes_per_row=4.0e6, bytes_fixed=2.0e6, messages=140, output_bytes_per_row=2 * 4 * 128 * 2)
NVLINK = LinkModel(bandwidth_gbps=25.0, latency_s=10e-6)


def two_machines(order: str) -> tuple[list[str], LinkModel]:
    """Four GPUs, two per machine, 10 GbE between the machines; ``order`` lists them (a/b = machine)."""
    names = [f"{m}{i}" for m, i in zip(order, itertools.count())]
    bw = [[25.0 if names[i][0] == names[j][0] else 1.25 for j in range(4)] for i in range(4)]
    lat = [[10e-6 if names[i][0] == names[j][0] else 50e-6 for j in range(4)] for i in range(4)]
    return names, LinkModel(bandwidth_matrix=bw, latency_matrix=lat)


def kw(**extra):
    return dict(dict(steps=30, warmup=2, align=8), **extra)


@pytest.mark.parametrize("mode", ["exact", "displaced"])
def test_cfg_1_never_splits_branches(mode):
    rng = random.Random(0)
    for _ in range(40):
        n = rng.choice([2, 3, 4])
        speeds = [rng.uniform(100, 1000) for _ in range(n)]
        names = [f"cuda:{i}" for i in range(n)]
        choice = choose_plan(128, speeds, devices=names, branches=False, link=NVLINK, exchange=SDXL,
                             mode=mode, **kw())
        assert not choice.plan.groups
        assert not any("cfg" in c.name for c in choice.candidates), [c.name for c in choice.candidates]
    with pytest.raises(UnsupportedError, match="CFG is 1"):
        choose_plan(128, [1, 1], devices=["a", "b"], strategy="cfg_split", branches=False, **kw())


@pytest.mark.parametrize("order", ["aabb", "abab", "abba"])
def test_a_slow_link_carries_branches_not_bands(order):
    names, link = two_machines(order)
    choice = choose_plan(128, [800.0] * 4, devices=names, branches=True, link=link, exchange=SDXL, mode="exact",
                         **kw())
    plan = choice.plan
    assert plan.strategy == "cfg_split+bands", choice.table()
    for g in plan.groups:  # each branch's bands exchange inside one machine only
        assert len({plan.bands[r].device[0] for r in g.ranks}) == 1, plan.describe()
    bands = next(c for c in choice.candidates if c.name == "bands")
    assert bands.predicted_s > 2 * choice.candidates[0].predicted_s  # bands across 10 GbE are much slower


def test_never_predicted_slower_than_the_fastest_device_alone():
    rng = random.Random(1)
    for _ in range(60):
        n = rng.choice([2, 3, 4])
        speeds = [rng.uniform(10, 1000) for _ in range(n)]
        names = [f"cuda:{i}" for i in range(n)]
        link = LinkModel(bandwidth_gbps=rng.choice([0.5, 5.0, 50.0]), latency_s=rng.choice([0.0, 1e-4]))
        choice = choose_plan(rng.choice([64, 128]), speeds, devices=names, branches=rng.random() < 0.7, link=link,
                             exchange=SDXL, mode=rng.choice(["exact", "displaced"]), **kw())
        single = next(c for c in choice.candidates if c.name.startswith("single"))
        assert choice.candidates[0].predicted_s <= single.predicted_s
        assert single.plan.devices == (names[speeds.index(max(speeds))],)


def test_two_cpu_workers_on_two_cores_run_as_one_device():
    together, alone = host_shared_speeds(["cpu:0", "cpu:1"], [1.0, 1.0], cpu_count=2, efficiency=0.76)
    assert together == [0.76, 0.76] and alone == [2.0, 2.0]
    choice = choose_plan(32, together, devices=["cpu:0", "cpu:1"], alone_speeds=alone, **kw(mode="exact"))
    assert choice.plan.world_size == 1 and choice.candidates[0].name == "single cpu:0"
    assert "strategy auto: single cpu:0" in choice.plan.notes[-1] and "cfg_split" in choice.plan.notes[-1]
    gpu_t, gpu_a = host_shared_speeds(["cuda:0", "cpu:0"], [5.0, 1.0], cpu_count=2)
    assert gpu_t == gpu_a == [5.0, 1.0]  # one CPU worker shares nothing


def test_uneven_pair_takes_the_uneven_branch_split():
    """Fast + 2x slower on a slow link (4 GB/s, e.g. through the host), displaced: only the uncond band
    exchanges (half the bytes of bands), and both finish together."""
    link = LinkModel(bandwidth_gbps=4.0, latency_s=5e-6)
    choice = choose_plan(48, [2000.0, 1000.0], devices=["fast", "slow"], link=link, exchange=SDXL, strides="off",
                         **kw(mode="displaced"))
    assert choice.plan.strategy == "cfg_split+bands", choice.table()
    g = {grp.branches: grp for grp in choice.plan.groups}
    assert g[("cond",)].ranks == (0,) and g[("uncond",)].ranks == (0, 1) and g[("uncond",)].rows == (16, 32)
    plain = next(c for c in choice.candidates if c.name == "cfg_split")
    assert choice.candidates[0].predicted_s < 0.8 * plain.predicted_s


def test_exact_mode_ties_a_group_together():
    """In a synchronous call every layer's exchange makes a group's members wait for each other: the
    uneven split's fast rank waits for the slow one's uncond band, then computes cond -- slower than
    plain cfg_split, so exact mode never prefers it."""
    plan = make_branch_plan(48, [2.0, 1.0], strategy="cfg_split+bands", steps=30, mode="exact")
    comp = lambda r, rows: rows / [2.0, 1.0][r]  # noqa: E731
    free = LinkModel(latency_s=0.0)
    step = predict_step(plan, comp, link=free)
    assert step.seconds == pytest.approx(max(16 * 0.5 / 2, 32 * 0.5 / 1) + 48 * 0.5 / 2)  # 16 + 12
    plain = make_branch_plan(48, [2.0, 1.0], strategy="cfg_split", steps=30, mode="exact")
    assert predict_step(plain, comp, link=free).seconds == pytest.approx(24.0)
    choice = choose_plan(48, [2.0, 1.0], devices=["fast", "slow"], **kw(mode="exact"))
    assert choice.plan.strategy != "cfg_split+bands"


def test_explicit_strategies_are_honoured_and_checked():
    for strategy in ("bands", "cfg_split", "cfg_split+bands"):
        plan = choose_plan(32, [1.0, 1.0], devices=["a", "b"], strategy=strategy, **kw()).plan
        assert plan.strategy == strategy and plan.world_size == 2
    with pytest.raises(PlanError, match="unknown strategy"):
        choose_plan(32, [1.0], devices=["a"], strategy="fastest", **kw())
    with pytest.raises(PlanError, match="at least 2 devices"):
        choose_plan(32, [1.0], devices=["a"], strategy="cfg_split", **kw())


def test_link_for_follows_the_band_order():
    names, link = two_machines("abab")
    plan = make_branch_plan(32, [1, 1, 1, 1], strategy="cfg_split+bands", devices=["a0", "a2", "b1", "b3"], steps=4)
    sub = link_for(link, names, plan)
    assert sub.bandwidth(0, 1) == 25e9 and sub.bandwidth(1, 2) == 1.25e9


# -- work units -------------------------------------------------------------------------------------
def test_branch_major_shares_snap_to_band_starts():
    assert branch_major_shares(32, [2, 1], 8) == [40, 24]  # 2/3 of 64 = 42.7 -> 40 (cond 32 + uncond 8)
    assert branch_major_shares(36, [1, 1], 8) == [36, 36]  # a ragged branch: the boundary is a valid cut
    assert sum(branch_major_shares(36, [3, 2, 1], 8)) == 72
    assert branch_major_shares(16, [100, 1], 8)[1] == 0  # rounds to nothing: the caller drops it


def test_units_and_work_rows():
    plan = make_branch_plan(48, [2, 1], strategy="cfg_split+bands", steps=4)
    assert [(u.branches, u.row_start, u.rows) for u in units_of(plan.groups, 0)] == [(("uncond",), 0, 16),
                                                                                    (("cond",), 0, 48)]
    assert work_rows(plan.groups, 0) == 32 and work_rows(plan.groups, 1) == 16
    assert Plan.from_dict(plan.to_dict()) == plan


def test_malformed_groups_are_refused():
    with pytest.raises(PlanError, match="exactly once"):
        check_groups((BranchGroup(("cond",), (0,), (8,)),), 8, 1)
    with pytest.raises(PlanError, match="covers"):
        check_groups((BranchGroup(("cond",), (0,), (8,)), BranchGroup(("uncond",), (1,), (16,))), 16, 2)
    with pytest.raises(PlanError, match="no work"):
        check_groups((BranchGroup(("uncond", "cond"), (0,), (8,)),), 8, 2)


def test_exact_mode_pays_the_exchange_displaced_hides_it():
    names, link = two_machines("aabb")
    exact = make_plan(128, [1, 1, 1, 1], devices=names, steps=4, mode="exact", strides="off")
    disp = make_plan(128, [1, 1, 1, 1], devices=names, steps=4, mode="displaced", strides="off")
    comp = lambda r, rows: rows / 800.0  # noqa: E731
    e = predict_step(exact, comp, link=link, cost=SDXL)
    d = predict_step(disp, comp, link=link, cost=SDXL)
    assert e.seconds == pytest.approx(max(e.compute_s) + e.exchange_s[0])
    assert d.steady_s == pytest.approx(max(max(c, x) for c, x in zip(d.compute_s, d.exchange_s)))
    assert d.sync_s == pytest.approx(e.seconds)  # warmup steps are synchronous
    assert d.seconds == pytest.approx((2 * d.sync_s + 2 * d.steady_s) / 4) and d.seconds < e.seconds
