"""The warm-pool registry gives memory back: idle pools close after STADI_IDLE_RELEASE_S, a release
request closes idle pools at once and busy ones when their run ends, and a pool in use is never
closed. Real one-worker CPU pools (a few seconds each); idle times of a fraction of a second."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from stadi_core.runtime import registry
from stadi_core.runtime.registry import format_pool_report, get_pool, pool_report, release_pools

# threads_per_worker=1 makes a key of its own: the warm pools other test files share are not these
KW = {"threads_per_worker": 1}
IDLE = "0.4"


def _gone(pids, timeout: float = 20.0) -> bool:
    """True once no process of ``pids`` runs (zombies count as gone) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _until(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture
def quick_idle(monkeypatch):
    monkeypatch.setenv(registry.IDLE_RELEASE_ENV, IDLE)
    yield
    monkeypatch.delenv(registry.IDLE_RELEASE_ENV)


def test_an_idle_pool_is_released_and_the_next_one_starts_fresh(quick_idle, caplog):
    caplog.set_level(logging.INFO, logger="stadi")
    pool = get_pool(["cpu:0"], "gloo", **KW)
    pids = pool.pids()
    assert _gone(pids), f"workers {pids} still run {IDLE} s after their pool went idle"
    assert not pool.alive()
    assert _until(lambda: any("released the worker pool" in r.getMessage() and str(pids[0]) in r.getMessage()
                              for r in caplog.records), 5), caplog.text
    again = get_pool(["cpu:0"], "gloo", **KW)
    assert again is not pool and again.alive() and again.pids() != pids
    release_pools()
    assert _gone(again.pids())


def test_a_busy_pool_is_never_released(quick_idle):
    pool = get_pool(["cpu:0"], "gloo", **KW)
    assert pool._lock.acquire(timeout=5)  # what a run (open_session .. Session.close) holds
    try:
        time.sleep(5 * float(IDLE))
        assert pool.alive(), "the idle release closed a pool in use"
        assert release_pools()["deferred"], "a release request closed a pool in use"
        time.sleep(2 * float(IDLE))
        assert pool.alive(), "a deferred release closed a pool before its run ended"
        assert get_pool(["cpu:0"], "gloo", **KW) is pool  # handed out while busy: the same one
    finally:
        pool._lock.release()
    assert _gone(pool.pids(), 10), "the deferred release did not close the pool after its run ended"


def test_release_closes_idle_pools_at_once_and_keeps_the_idle_timer_off_by_default(monkeypatch):
    monkeypatch.delenv(registry.IDLE_RELEASE_ENV, raising=False)
    assert registry.idle_release_s() == registry.DEFAULT_IDLE_RELEASE_S == 600
    pool = get_pool(["cpu:0"], "gloo", **KW)
    pids = pool.pids()
    time.sleep(0.5)
    assert pool.alive()  # 600 s default: nothing happens by itself
    t0 = time.monotonic()
    out = release_pools()
    assert any(str(pids[0]) in d for d in out["released"]), out
    assert _gone(pids, 5), "release_pools returned but the workers still run"
    print(f"release_pools closed a one-worker pool in {time.monotonic() - t0:.2f} s")
    assert get_pool(["cpu:0"], "gloo", **KW).pids() != pids  # the next run starts new workers
    release_pools()


def test_a_bad_setting_falls_back_to_the_default(monkeypatch, caplog):
    monkeypatch.setenv(registry.IDLE_RELEASE_ENV, "ten minutes")
    assert registry.idle_release_s() == 600
    assert "not a number of seconds" in caplog.text and "=300" in caplog.text
    monkeypatch.setenv(registry.IDLE_RELEASE_ENV, "0")
    assert registry.idle_release_s() == 0


def test_pool_report_says_what_each_worker_holds():
    pool = get_pool(["cpu:0"], "gloo", **KW)
    pool.loaded_model_key = "tiny-model-key"
    try:
        mine = [p for p in pool_report() if p["workers"] and p["workers"][0]["pid"] == pool.pids()[0]]
        assert len(mine) == 1, pool_report()
        report = mine[0]
        assert report["devices"] == ["cpu:0"] and report["model"] == "tiny-model-key" and not report["busy"]
        worker = report["workers"][0]
        assert worker["alive"] and worker["rss_bytes"] > 10 * 2**20, worker  # a python with torch imported
        if not os.path.exists("/dev/nvidiactl"):
            assert worker["gpu_bytes"] is None
        line = [ln for ln in format_pool_report() if str(pool.pids()[0]) in ln]
        assert line and "tiny-model-key" in line[0] and "host" in line[0] and "MB" in line[0], format_pool_report()
        print("\n".join(format_pool_report()))
        from stadi_pack.nodes.cluster_profile_node import build_cluster, profile_ui

        ui = profile_ui(build_cluster("cpu*2", "gloo", measure=False, discovered=[]))
        json.dumps(ui)
        assert any(str(pool.pids()[0]) in n for n in ui["stadi_devices"][0]["notes"]), ui
        assert any(p["model"] == "tiny-model-key" for p in ui["stadi_workers"])
        assert registry.process_rss_bytes(os.getpid()) > 0
    finally:
        release_pools()
    assert format_pool_report([]) == ["warm workers: none (they start with the next STADI run)"]
