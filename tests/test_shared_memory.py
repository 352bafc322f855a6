"""Weights shared through anonymous memory files (stadi_core/runtime/shared_memory.py), across real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

from stadi_core.runtime import shared_memory as shm



@pytest.fixture(autouse=True, params=["memfd", "named"])
def mode(request, monkeypatch):
    """Both ways: anonymous memory files (Linux) and the named segments used where memfd is missing."""
    if request.param == "memfd":
        if not shm.available():
            pytest.skip("memfd and /proc are Linux-only")
        monkeypatch.delenv("STADI_SHARED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("STADI_SHARED_MEMORY", "named")  # children inherit it
    return request.param

_CHILD = textwrap.dedent("""
    import json, sys, torch
    from stadi_core.runtime.shared_memory import SharedHandle, open_tensors, open_blob
    handle = SharedHandle.from_dict(json.loads(sys.argv[1]))
    def kb():
        rollup = dict(l.split(":") for l in open("/proc/self/smaps_rollup").read().splitlines()[1:])
        get = lambda k: int(rollup[k].split()[0])
        return get("Private_Clean") + get("Private_Dirty"), get("Shared_Clean") + get("Shared_Dirty")
    if handle.entries:
        private0, shared0 = kb()
        tensors = open_tensors(handle)
        touched = sum(int(v.reshape(-1).view(torch.uint8).sum()) for v in tensors.values())  # reads every page
        private1, shared1 = kb()
        sums = {k: float(v.double().sum()) for k, v in tensors.items()}
        print(json.dumps({"sums": sums, "private_kb": private1 - private0, "shared_kb": shared1 - shared0,
                          "dtypes": {k: str(v.dtype) for k, v in tensors.items()}}))
    else:
        print(json.dumps({"blob": open_blob(handle).decode()}))
""")


def _open_in_child(handle: shm.SharedHandle) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(handle.to_dict())], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_adopted_tensors_live_in_the_shared_file_and_another_process_reads_them_without_a_copy(mode):
    big = torch.arange(16 << 20, dtype=torch.float32).reshape(4096, -1) / 1e6  # 64 MiB
    weights = {"big": torch.nn.Parameter(big, requires_grad=False), "half": torch.ones(3, 5, dtype=torch.float16),
               "fp8": torch.full((7,), 0.5).to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5)}
    expected = {k: float(v.double().sum()) for k, v in weights.items()}
    param = weights["big"]
    shared, handle = shm.share_tensors(weights, adopt=True, label="test")
    try:
        base = torch.frombuffer(shared.map, dtype=torch.uint8).data_ptr()
        assert bool(handle.name) == (mode == "named")
        for name, t in weights.items():  # the same objects now point into the memory file, values intact
            assert base <= t.data_ptr() < base + shared.size, name
            assert float(t.double().sum()) == expected[name]
        assert weights["big"] is param and isinstance(param, torch.nn.Parameter)
        seen = _open_in_child(handle)
        assert seen["sums"] == expected
        assert seen["dtypes"]["fp8"] == "torch.float8_e4m3fn"
        # the child read all 64 MiB: as the server's pages (shared), not as its own copy
        assert seen["shared_kb"] > 60 * 1024 and seen["private_kb"] < 4 * 1024, seen
    finally:
        shared.close()


def test_without_adopt_the_sources_keep_their_own_memory():
    t = torch.ones(10)
    ptr = t.data_ptr()
    shared, handle = shm.share_tensors({"t": t}, adopt=False, label="test")
    shared.close()
    assert t.data_ptr() == ptr


def test_blobs_round_trip_and_a_closed_or_reused_descriptor_is_refused():
    shared, handle = shm.share_blob(b"lora patches", label="test")
    assert _open_in_child(handle) == {"blob": "lora patches"}
    shared.close()
    with pytest.raises(shm.SharedMemoryError, match="cannot open|not the server's"):
        shm.open_blob(handle)
    other, _ = shm.share_blob(b"x" * 100, label="other")  # may get the same descriptor number
    try:
        with pytest.raises(shm.SharedMemoryError, match="not the server's|cannot open"):
            shm.open_blob(handle)
    finally:
        other.close()


def test_nothing_is_left_in_shm_or_tmp_when_the_sharing_process_is_killed():
    """A SIGKILLed server cannot clean up: its memory files must vanish by themselves."""
    before = {d: set(os.listdir(d)) for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)}
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import json, sys, time, torch
        from stadi_core.runtime.shared_memory import share_tensors
        shared, handle = share_tensors({"w": torch.ones(1 << 20)}, adopt=True, label="killed")
        print(json.dumps(handle.to_dict()), flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        handle = shm.SharedHandle.from_dict(json.loads(server.stdout.readline()))
        assert _open_in_child(handle)["sums"] == {"w": float(1 << 20)}
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    deadline = time.monotonic() + 10  # a named segment is unlinked by the dead server's resource tracker
    while True:
        after = {d: set(os.listdir(d)) for d in before}
        if all(after[d] <= before[d] for d in before) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(after[d] <= before[d] for d in before), {d: after[d] - before[d] for d in before}
    with pytest.raises(shm.SharedMemoryError, match="cannot open"):
        shm.open_tensors(handle)
