"""Planner and cluster tests: the worked example, rounding properties, schedules, errors."""

import json
import random

import pytest

from stadi_core.cluster import ClusterSpec, DeviceSpec
from stadi_core.errors import PlanError, UnsupportedError
from stadi_core.planner import (
    ONE_EVAL_SAMPLERS, Band, Plan, choose_strides, make_plan, replan, split_rows, step_time,
)


# ---------------------------------------------------------------- worked example (REFERENCES.md)
def test_worked_example_equal_bands():
    assert step_time([64, 64], [1.0, 0.6]) == pytest.approx(106.67, abs=0.01)


def test_worked_example_elastic_bands():
    p = make_plan(128, [1.0, 0.6], steps=10, strides="off")
    assert p.rows == (80, 48)
    assert p.strides == (1, 1)
    assert p.sync_period == 1
    assert p.predicted_step_time() == pytest.approx(80.0)


def test_worked_example_strides():
    p = make_plan(128, [1.0, 0.6], steps=10, strides="auto")
    assert p.strides == (1, 2)
    assert p.sync_period == 2
    p4 = make_plan(128, [1.0, 0.6], steps=10, strides="auto", align=4)
    assert p4.strides == (1, 2)
    assert p4.rows == (60, 68)
    assert p4.predicted_step_time() == pytest.approx(60.0)
    # -44% against equal bands
    assert 1 - 60.0 / step_time([64, 64], [1.0, 0.6]) == pytest.approx(0.4375)


def test_choose_strides_direct():
    assert choose_strides([1.0, 0.6], 128, 8) == (1, 2)
    assert choose_strides([1.0, 1.0, 1.0], 128, 8) == (1, 1, 1)
    assert choose_strides([1.0, 0.6], 128, 8, max_stride=1) == (1, 1)
    # fastest keeps stride 1 regardless of position
    ks = choose_strides([0.6, 1.0], 128, 8)
    assert ks[1] == 1
    # a device only a little slower is never strided
    assert choose_strides([1.0, 0.8], 128, 8) == (1, 1)
    with pytest.raises(PlanError):
        choose_strides([1.0, 0.5], 128, 8, max_stride=0)


def test_choose_strides_respects_max_stride():
    ks = choose_strides([1.0, 0.1], 256, 8, max_stride=3)
    assert max(ks) <= 3


# ---------------------------------------------------------------- split_rows
def test_split_rows_321():
    assert split_rows(96, [3, 2, 1], 8) == [48, 32, 16]
    assert make_plan(96, [3, 2, 1], steps=10, strides="off").rows == (48, 32, 16)
    assert make_plan(96, [3.0, 2.0, 1.0], steps=10, strides="off", align=1).rows == (48, 32, 16)


def test_split_rows_largest_remainder_known():
    # 128/8 = 16 units, shares 7.27/8.73 -> 7, 9
    assert split_rows(128, [1.0, 1.2], 8) == [56, 72]
    # equal remainders: deterministic, earlier rank wins
    assert split_rows(24, [1, 1], 8) == [16, 8]
    assert split_rows(64, [1, 0], 8) == [64, 0]


def test_split_rows_properties_random():
    rng = random.Random(1234)
    for _ in range(2000):
        align = rng.choice([1, 2, 4, 8, 16])
        units = rng.randint(1, 64)
        height = units * align
        n = rng.randint(1, 8)
        weights = [rng.uniform(0.01, 10.0) for _ in range(n)]
        rows = split_rows(height, weights, align)
        assert len(rows) == n
        assert sum(rows) == height
        assert all(r % align == 0 and r >= 0 for r in rows)
        total = sum(weights)
        for r, w in zip(rows, weights):
            assert abs(r / align - units * w / total) < 1.0 + 1e-9
        # monotone: a larger weight never gets fewer rows than a smaller one
        order = sorted(range(n), key=lambda i: weights[i])
        for a, b in zip(order, order[1:]):
            assert rows[b] >= rows[a]


def test_split_rows_bad_input():
    with pytest.raises(PlanError):
        split_rows(60, [1, 1], 8)
    with pytest.raises(PlanError):
        split_rows(64, [], 8)
    with pytest.raises(PlanError):
        split_rows(64, [1, -1], 8)
    with pytest.raises(PlanError):
        split_rows(64, [0, 0], 8)


# ---------------------------------------------------------------- schedules
def test_schedule_strides_1_2():
    p = make_plan(128, [1.0, 0.6], steps=10, warmup=2, strides=(1, 2))
    assert p.strides == (1, 2) and p.sync_period == 2
    assert p.compute_steps(0) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert p.compute_steps(1) == [0, 1, 2, 4, 6, 8]
    assert p.sync_steps() == [0, 1, 2, 4, 6, 8]
    assert [t for t in range(10) if p.is_sync_step(t)] == [0, 1, 2, 4, 6, 8]
    assert not p.is_compute_step(1, 3) and p.is_compute_step(0, 3)


def test_schedule_strides_1_1_2():
    p = make_plan(96, [1.0, 1.0, 0.5], steps=10, warmup=2, strides=(1, 1, 2))
    assert p.strides == (1, 1, 2) and p.sync_period == 2
    assert p.compute_steps(0) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert p.compute_steps(1) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert p.compute_steps(2) == [0, 1, 2, 4, 6, 8]
    assert p.sync_steps() == [0, 1, 2, 4, 6, 8]


def test_schedule_lcm_sync_period():
    p = make_plan(128, [1.0, 0.5, 0.34], steps=12, warmup=2, strides=(1, 2, 3))
    assert p.sync_period == 6
    assert p.compute_steps(2) == [0, 1, 2, 5, 8, 11]
    assert p.sync_steps() == [0, 1, 2, 8]


def test_exact_mode_all_stride_one():
    p = make_plan(128, [1.0, 0.6], steps=10, mode="exact")
    assert p.strides == (1, 1) and p.sync_period == 1 and p.mode == "exact"
    assert p.rows == (80, 48)
    assert all(p.is_sync_step(t) for t in range(10))
    assert make_plan(128, [1.0, 0.6], steps=4, warmup=0, mode="exact", strides=(1, 1)).strides == (1, 1)
    with pytest.raises(PlanError, match="exact"):
        make_plan(128, [1.0, 0.6], steps=10, mode="exact", strides=(1, 2))


def test_strides_off_and_explicit_validation():
    assert make_plan(128, [1.0, 0.3], steps=10, strides="off").strides == (1, 1)
    with pytest.raises(PlanError, match="at least 1"):
        make_plan(128, [1.0, 0.6], steps=10, strides=(1, 0))
    with pytest.raises(PlanError, match="one stride per device"):
        make_plan(128, [1.0, 0.6], steps=10, strides=(1, 2, 2))
    with pytest.raises(PlanError, match="auto"):
        make_plan(128, [1.0, 0.6], steps=10, strides="sometimes")


# ---------------------------------------------------------------- samplers
def test_multi_eval_sampler_auto_gets_stride_one_with_note():
    assert "heun" not in ONE_EVAL_SAMPLERS
    p = make_plan(128, [1.0, 0.6], steps=10, sampler="heun")
    assert p.strides == (1, 1)
    assert any("heun" in n for n in p.notes)


def test_multi_eval_sampler_explicit_strides_unsupported():
    with pytest.raises(UnsupportedError) as e:
        make_plan(128, [1.0, 0.6], steps=10, sampler="heun", strides=(1, 2))
    msg = str(e.value)
    assert "heun" in msg and "strides off" in msg and "euler" in msg
    # explicit all-ones is fine with any sampler
    assert make_plan(128, [1.0, 0.6], steps=10, sampler="heun", strides=(1, 1)).strides == (1, 1)


def test_one_eval_sampler_explicit_strides_ok():
    for s in ("euler", "dpmpp_2m", "uni_pc", "ddim"):
        assert make_plan(128, [1.0, 0.6], steps=10, sampler=s, strides=(1, 2)).strides == (1, 2)


# ---------------------------------------------------------------- bad input messages
@pytest.mark.parametrize("kwargs, words", [
    (dict(height=60, speeds=[1, 1], steps=10), ["60", "multiple of 8", "64 px"]),
    (dict(height=16, speeds=[1, 1, 1], steps=10), ["3 devices", "16-row", "only 2 bands", "at most 2 devices"]),
    (dict(height=64, speeds=[1, 1], steps=0), ["at least 1 step"]),
    (dict(height=64, speeds=[1, 1], steps=10, warmup=-1), ["negative"]),
    (dict(height=64, speeds=[1, 1], steps=4, warmup=5), ["warmup 5", "4 steps", "at most 4"]),
    (dict(height=64, speeds=[1, 1], steps=4, warmup=0), ["displaced", "at least 1", "warmup"]),
    (dict(height=64, speeds=[1, 1], steps=4, mode="fast"), ["unknown mode", "exact", "displaced"]),
    (dict(height=64, speeds=[1, 1], steps=4, max_stride=0), ["max_stride", "at least 1"]),
    (dict(height=64, speeds=[1, 0], steps=4), ["positive"]),
    (dict(height=64, speeds=[1, 1], steps=4, devices=["cpu:0"]), ["one speed per device"]),
    (dict(height=64, speeds=[], steps=4), ["at least one device"]),
])
def test_bad_input_messages(kwargs, words):
    height = kwargs.pop("height")
    speeds = kwargs.pop("speeds")
    with pytest.raises(PlanError) as e:
        make_plan(height, speeds, **kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_align_px_in_message():
    with pytest.raises(PlanError, match="multiple of 16 px"):
        make_plan(31, [1.0], steps=4, align=2)


def test_dropped_rank_note_and_renumbering():
    p = make_plan(64, [1.0, 1.0, 0.05], devices=["cpu:0", "cpu:1", "cpu:2"], steps=10, strides="off")
    assert p.world_size == 2
    assert p.devices == ("cpu:0", "cpu:1")
    assert [b.rank for b in p.bands] == [0, 1]
    assert p.rows == (32, 32)
    assert "cpu:2 dropped: its share of 64 rows rounds to less than one 8-row band" in p.notes
    assert "cpu:2 dropped" in p.describe()
    # dropped in the middle: ranks stay ordered and contiguous
    q = make_plan(64, [1.0, 0.05, 1.0], devices=["cuda:0", "cuda:1", "cuda:2"], steps=10, strides="off")
    assert q.devices == ("cuda:0", "cuda:2") and q.row_starts == (0, 32)
    # explicit strides follow their devices when a rank is dropped
    r = make_plan(64, [1.0, 0.01, 0.5], devices=["a", "b", "c"], steps=10, strides=(1, 1, 2))
    assert r.devices == ("a", "c") and r.strides == (1, 2)


# ---------------------------------------------------------------- plan value
def test_plan_round_trip_and_describe():
    p = make_plan(128, [1.0, 0.6], devices=["cuda:0", "cuda:1"], steps=20, align=4)
    q = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p
    assert q.world_size == 2 and q.row_starts == (0, 60)
    text = p.describe()
    assert "cuda:0" in text and "[60,128)" in text and "rank" in text
    lines = text.splitlines()
    assert any(l.split()[:2] == ["1", "cuda:1"] and l.split()[-1] == "11" for l in lines)  # evals


def test_plan_rejects_malformed():
    b = (Band(0, "cpu:0", 0, 32, 1, 1.0), Band(1, "cpu:1", 40, 24, 1, 1.0))
    with pytest.raises(PlanError):
        Plan(height=64, align=8, steps=4, warmup=1, mode="displaced", bands=b, sync_period=1)
    with pytest.raises(PlanError):
        Plan.from_dict({"height": 64})


# ---------------------------------------------------------------- replan
def test_replan_moves_rows_toward_faster_device():
    p = make_plan(128, [1.0, 1.0], devices=["cuda:0", "cuda:1"], steps=10, strides="off")
    assert p.rows == (64, 64)
    # rank 1 turned out to take twice as long for the same rows
    q = replan(p, [1.0, 2.0])
    assert q.rows[0] > q.rows[1]
    assert q.rows == tuple(split_rows(128, [64.0, 32.0], 8))
    assert q.strides == (1, 1)  # option "off" kept
    assert q.devices == p.devices and q.steps == p.steps and q.warmup == p.warmup
    assert any("re-planned" in n for n in q.notes)
    # measured speeds reproduce the original plan when timings are balanced
    assert replan(p, [0.5, 0.5]).rows == (64, 64)


def test_replan_auto_strides_and_errors():
    p = make_plan(128, [1.0, 1.0], steps=10)
    assert p.strides == (1, 1)
    q = replan(p, [64 / 1.0, 64 / 0.5])  # rank 1 measured at half speed
    assert q.strides == (1, 2)
    assert q.predicted_step_time() < step_time(p.rows, q.speeds)
    with pytest.raises(PlanError, match="one timing per rank"):
        replan(p, [1.0])
    with pytest.raises(PlanError, match="positive"):
        replan(p, [1.0, 0.0])


# ---------------------------------------------------------------- ClusterSpec
def test_cluster_parse_forms():
    assert ClusterSpec.parse("cpu:0,cpu:1").names() == ("cpu:0", "cpu:1")
    assert ClusterSpec.parse(" cuda:0 , cuda:1 ").names() == ("cuda:0", "cuda:1")
    assert ClusterSpec.parse("cpu*3").names() == ("cpu:0", "cpu:1", "cpu:2")
    assert ClusterSpec.parse("cuda").names() == ("cuda:0",)
    assert ClusterSpec.parse("cpu").names() == ("cpu:0",)
    assert ClusterSpec.parse("cpu:0, cpu*2").names() == ("cpu:0", "cpu:1", "cpu:2")
    assert ClusterSpec.parse("cuda:1,cuda:0").names() == ("cuda:1", "cuda:0")  # order = band order
    c = ClusterSpec.parse("cpu*2", backend="gloo", rendezvous_host="10.0.0.2")
    assert c.backend == "gloo" and c.rendezvous_host == "10.0.0.2"
    d = c.devices[1]
    assert d.kind == "cpu" and d.index == 1


@pytest.mark.parametrize("text, words", [
    ("gpu:0", ["gpu:0", "cuda:N"]),
    ("cuda:x", ["cuda:x", "cpu:N"]),
    ("tpu*2", ["tpu*2"]),
    ("", ["empty"]),
    ("cuda:0,cuda:0", ["cuda:0", "twice"]),
    ("cuda,cuda:0", ["cuda:0", "twice"]),
])
def test_cluster_parse_errors(text, words):
    with pytest.raises(PlanError) as e:
        ClusterSpec.parse(text)
    for w in words:
        assert w in str(e.value)


def test_cluster_validation():
    with pytest.raises(PlanError, match="slowdown"):
        DeviceSpec("cpu:0", slowdown=0.5)
    with pytest.raises(PlanError, match="positive"):
        DeviceSpec("cpu:0", capability=0.0)
    with pytest.raises(PlanError, match="positive"):
        DeviceSpec("cpu:0", relative_speed=-1.0)
    with pytest.raises(PlanError, match="no active device"):
        ClusterSpec((DeviceSpec("cpu:0", excluded=True),))
    with pytest.raises(PlanError, match="no active device"):
        ClusterSpec(())
    with pytest.raises(PlanError, match="unknown backend"):
        ClusterSpec.parse("cpu", backend="mpi")
    with pytest.raises(PlanError, match="use gloo for CPU workers"):
        ClusterSpec.parse("cuda:0,cpu:0", backend="nccl")
    assert ClusterSpec.parse("cuda:0,cuda:1", backend="nccl").resolved_backend() == "nccl"


def test_cluster_planning_speed_and_active():
    assert DeviceSpec("cpu:0").planning_speed() == 1.0
    assert DeviceSpec("cpu:0", slowdown=4).planning_speed() == 0.25
    assert DeviceSpec("cpu:0", slowdown=4, capability=3.0).planning_speed() == 3.0
    assert DeviceSpec("cpu:0", slowdown=4, capability=3.0, relative_speed=0.7).planning_speed() == 0.7
    c = ClusterSpec((DeviceSpec("cuda:0"), DeviceSpec("cuda:1", excluded=True), DeviceSpec("cuda:2")))
    assert [d.name for d in c.active()] == ["cuda:0", "cuda:2"]
    c2 = ClusterSpec.cpu(3, slowdowns=[1, 2, 4])
    assert c2.speeds() == (1.0, 0.5, 0.25)
    with pytest.raises(PlanError):
        ClusterSpec.cpu(2, slowdowns=[1.0])


def test_cluster_resolved_backend():
    assert ClusterSpec.parse("cpu*2").resolved_backend() == "gloo"
    assert ClusterSpec.parse("cuda:0,cpu:0").resolved_backend() == "gloo"
    assert ClusterSpec.parse("cuda:0,cuda:1", backend="gloo").resolved_backend() == "gloo"
    assert ClusterSpec.parse("cuda:0,cuda:1").resolved_backend() in ("nccl", "gloo")


def test_cluster_with_capabilities():
    c = ClusterSpec.cpu(2, slowdowns=[1, 2])
    m = c.with_capabilities({"cpu:1": 10.0})
    assert m.devices[1].capability == 10.0 and m.devices[0].capability is None
    assert c.devices[1].capability is None  # original unchanged
    assert m.speeds() == (1.0, 10.0)
    with pytest.raises(PlanError, match="cpu:5"):
        c.with_capabilities({"cpu:5": 1.0})


def test_cluster_validate_available():
    c = ClusterSpec.parse("cuda:0,cuda:3")
    with pytest.raises(PlanError) as e:
        c.validate_available(cuda_count=2)
    assert str(e.value) == ("cuda:3 does not exist: this machine has cuda:0, cuda:1; "
                            "remove it from the cluster or pick another")
    ClusterSpec.parse("cuda:0,cuda:1").validate_available(cuda_count=2)
    ClusterSpec.parse("cpu*4").validate_available(cuda_count=0)
    with pytest.raises(PlanError, match="no CUDA device"):
        ClusterSpec.parse("cuda").validate_available(cuda_count=0)
    # an excluded missing device does not matter
    ClusterSpec((DeviceSpec("cuda:0"), DeviceSpec("cuda:7", excluded=True))).validate_available(cuda_count=1)
    ClusterSpec.parse("cpu").validate_available()  # default count path runs without CUDA


def test_cluster_round_trip():
    c = ClusterSpec((DeviceSpec("cuda:1", capability=12.5), DeviceSpec("cpu:0", slowdown=3.0, excluded=True),
                     DeviceSpec("cuda:0", relative_speed=0.5)), backend="gloo", rendezvous_host="h")
    d = json.loads(json.dumps(c.to_dict()))
    assert ClusterSpec.from_dict(d) == c
    assert hash(ClusterSpec.from_dict(d)) == hash(c)  # usable as a cache key
    with pytest.raises(PlanError):
        ClusterSpec.from_dict({"backend": "gloo"})


def test_cluster_feeds_planner():
    c = ClusterSpec.cpu(3, slowdowns=[1, 1.5, 3])
    p = make_plan(96, c.speeds(), devices=c.names(), steps=10, strides="off")
    assert p.rows == (48, 32, 16) and p.devices == ("cpu:0", "cpu:1", "cpu:2")
