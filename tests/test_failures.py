"""Workers that die, hang or get interrupted, and input that cannot be planned.

Every failure must surface as a clear error within its deadline, never a hang, and
the next run must work.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import cpu_cluster, gone
from stadi_core.api import generate
from stadi_core.errors import PlanError, UnsupportedError, WorkerError, WorkerTimeout
from stadi_core.models.spec import ModelSpec
from stadi_core.runtime.pool import JobCancelledError

KW = dict(height=40, width=32, batch=1, steps=12, cfg=2.0, sampler="euler", mode="exact")


def _warm_pool_pids(cluster):
    """Start (or reuse) the pool for ``cluster`` with a short run; its worker pids."""
    return generate(ModelSpec(), cluster, **dict(KW, steps=2)).report.pool_pids


def test_a_killed_worker_is_dropped_and_the_run_finishes_on_the_survivor():
    """The run goes on from its last checkpoint on the devices left; the report names the loss."""
    cluster = cpu_cluster(1.0, 1.0)
    pids = _warm_pool_pids(cluster)
    killed = []

    def kill_rank1(rank, timing):
        if rank == 0 and timing["step"] == 2 and not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.append(time.monotonic())

    res = generate(ModelSpec(), cluster, on_step=kill_rank1, **KW)
    assert killed and time.monotonic() - killed[0] < 30
    assert [b["device"] for b in res.report.plan["bands"]] == ["cpu:0"]
    assert any(re.match(r"cpu:1 lost at step \d+ \(was killed by SIGKILL\); its rows \d+-39 moved to cpu:0; "
                        r"the survivors went on from step \d+, the last every rank had reached", n)
               for n in res.report.notes), res.report.notes
    for pid in pids:  # the survivor's old process was stopped too, not left in a collective
        deadline = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid), f"worker {pid} outlived the failed run"
    assert set(res.report.pool_pids).isdisjoint(pids)


def test_a_killed_worker_with_no_survivor_is_an_error():
    cluster = cpu_cluster(1.0)
    pids = _warm_pool_pids(cluster)
    killed = []

    def kill_it(rank, timing):
        if timing["step"] == 1 and not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(1)

    with pytest.raises(WorkerError, match=r"rank 0 .*SIGKILL"):
        generate(ModelSpec(), cluster, on_step=kill_it, **KW)


def test_frozen_worker_is_detected_by_heartbeat_timeout():
    cluster = cpu_cluster(1.0, 1.0)
    pids = _warm_pool_pids(cluster)
    stopped = []

    def freeze_rank0(rank, timing):
        if rank == 1 and timing["step"] == 1 and not stopped:
            os.kill(pids[0], signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        with pytest.raises(WorkerTimeout, match=r"sent nothing for 3 s"):
            generate(ModelSpec(), cluster, on_step=freeze_rank0, stall_timeout_s=3, **KW)
        assert time.monotonic() - stopped[0] < 30
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_cancel_stops_all_ranks_at_one_step_and_pool_survives():
    cluster = cpu_cluster(1.0, 1.0)
    pids = _warm_pool_pids(cluster)
    seen = []
    with pytest.raises(JobCancelledError, match="interrupted at step"):
        generate(ModelSpec(), cluster, on_step=lambda r, t: seen.append(t["step"]),
                 should_cancel=lambda: len(seen) >= 4, **KW)
    assert max(seen) < KW["steps"] - 1
    res = generate(ModelSpec(), cluster, **dict(KW, steps=2))
    assert res.report.pool_pids == pids  # same warm workers


def test_no_worker_outlives_a_killed_parent(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from stadi_core.runtime.registry import get_pool
        if __name__ == "__main__":
            pool = get_pool(["cpu:0", "cpu:1"], "gloo")
            print(" ".join(map(str, pool.pids())), flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, f"parent printed {line!r}"
        assert not any(gone(p) for p in pids)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(gone(p) for p in pids), "a worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


# -- bad input: each refused before any process starts, with the fix in the message ---------

@pytest.mark.parametrize("kwargs,cluster,error,words", [
    (dict(height=44), "cpu*2", PlanError, "multiple of 64 px"),
    (dict(height=16), "cpu*3", PlanError, "at most 2 devices"),
    (dict(width=36), "cpu*2", PlanError, "width"),
    (dict(), "gpu:0,cpu:1", PlanError, "gpu:0"),
    (dict(), "cpu:0,cpu:0", PlanError, "listed twice"),
    (dict(), "cuda:7", PlanError, "cuda:7 does not exist"),
    (dict(strides=(1, 0)), "cpu*2", PlanError, "stride"),
    (dict(warmup=20, steps=8), "cpu*2", PlanError, "lower warmup to at most 8"),
    (dict(sampler="heun"), "cpu*2", UnsupportedError, "use one of euler"),
    (dict(mode="fast"), "cpu*2", PlanError, "mode"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, cluster, error, words):
    args = dict(height=40, width=32, steps=8)
    args.update(kwargs)
    t0 = time.monotonic()
    with pytest.raises(error) as err:
        generate(ModelSpec(), cluster, **args)
    assert words.lower() in str(err.value).lower(), str(err.value)
    assert time.monotonic() - t0 < 10


def test_strides_with_a_multi_evaluation_sampler_are_refused():
    from stadi_core.planner import make_plan

    with pytest.raises(UnsupportedError, match="strides off"):
        make_plan(64, [1.0, 0.5], steps=10, sampler="heun", strides=(1, 2))


def test_non_finite_band_is_refused_not_returned():
    import torch

    from stadi_core.api import check_finite
    from stadi_core.planner import make_plan

    plan = make_plan(16, [1.0, 1.0], devices=["cpu:0", "cpu:1"], steps=4)
    good = torch.zeros(1, 4, 8, 8)
    bad = good.clone()
    bad[0, 0, 3, 3] = float("nan")
    check_finite([good, good], plan)
    with pytest.raises(WorkerError, match=r"rank 1 \(cpu:1\) returned 1 non-finite values in rows \[8,16\)"):
        check_finite([good, bad], plan)


def test_fp16_overflow_stops_the_run_at_the_first_bad_step_and_the_next_run_works():
    """A CFG of 1e5 in float16 overflows the network input a few steps in (a real overflow, not a
    planted NaN): the run stops at that step, says where and what to try, and shows no traceback."""
    spec = ModelSpec(dtype="float16")
    kw = dict(height=32, width=32, steps=8, seed=0, mode="displaced", warmup=2, strides="off")
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank \d \(cpu:\d\) failed.*NaN/inf values .* at step \d") as err:
        generate(spec, "cpu*2", cfg=1e5, **kw)
    assert time.monotonic() - t0 < 60
    message = str(err.value)
    assert "traceback" not in message and "bfloat16" in message and "mode 'exact'" in message
    step = int(message.split(" at step ")[1].split()[0])
    assert step < kw["steps"] - 1, "the overflow should stop the run early, not at its end"
    assert generate(spec, "cpu*2", cfg=2.0, **kw).latent.isfinite().all()


def test_per_call_session_refuses_a_non_finite_band_output_and_the_pool_recovers():
    """The ComfyUI path (one BandCall per network call): a NaN in the band's input gives a NaN
    output, which the worker refuses with the step and call kind instead of sending it back."""
    import numpy as np
    import torch

    from stadi_core.models.spec import build_model, make_conditioning
    from stadi_core.planner import make_plan
    from stadi_core.runtime.messages import BandCall, SessionStart
    from stadi_core.runtime.registry import get_pool

    spec = ModelSpec()
    model = build_model(spec, torch.device("cpu"))
    cond = make_conditioning(spec, model, 1, seed=0)["cond"]
    plan = make_plan(16, [1.0], devices=["cpu:0"], steps=4, mode="exact")
    x = np.zeros((1, 4, 16, 16), dtype=np.float32)
    x[0, 0, 5, 5] = np.nan

    def call(pool, step, x):
        session = pool.open_session(lambda job_id: SessionStart(job_id, spec.to_dict(), plan.to_dict()))
        try:
            return session.call(0, lambda job_id, call_id: BandCall(
                job_id, call_id, step, "fresh", x, np.array([500.0], dtype=np.float32),
                {k: v.numpy() for k, v in cond.items()}), stall_timeout_s=60)
        finally:
            session.close()

    pool = get_pool(["cpu:0"], "gloo")
    with pytest.raises(WorkerError, match=r"rank 0 \(cpu:0\) failed: the network output held \d+ NaN/inf values "
                                          r"of \d+ at step 3 \(fresh call\)") as err:
        call(pool, 3, x)
    assert "traceback" not in str(err.value)
    pool = get_pool(["cpu:0"], "gloo")  # the failed session stopped the pool; a fresh one answers
    out = call(pool, 0, np.nan_to_num(x))
    assert np.isfinite(out.out).all() and out.out.shape == (1, 4, 16, 16)
