"""Starting worker processes and taking their connections, each step with a deadline.

Workers are separate Python processes (``python -m stadi_core.runtime.worker``) that connect back
over an authenticated local socket; one that dies before it connects is reported with its exit.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from typing import Sequence

from ..errors import WorkerError, WorkerTimeout
from .messages import Hello

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def describe_exit(code: int | str | None) -> str:
    """A worker's exit code as words for an error message (a remote worker's is words already)."""
    if code is None:
        return "stopped answering"
    if isinstance(code, str):
        return code
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_workers(devices: Sequence[str], worker_env: Sequence[dict], listener: Listener,
                   authkey: bytes, ranks: Sequence[int] | None = None) -> list[subprocess.Popen]:
    """One process per device (of ``ranks``, default all), told where to connect; the auth key travels in
    the environment."""
    host, lport = listener.address
    procs = []
    for rank in range(len(devices)) if ranks is None else ranks:
        device = devices[rank]
        env = dict(os.environ)
        env["STADI_AUTHKEY"] = authkey.hex()
        env["STADI_PARENT_PID"] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT] + [p for p in [env.get("PYTHONPATH")] if p])
        kind, _, index = device.partition(":")
        if kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = index.split(".")[0] or "0"
        env.update(worker_env[rank])
        cmd = [sys.executable, "-m", "stadi_core.runtime.worker", "--connect", f"{host}:{lport}", "--rank", str(rank)]
        procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
    return procs


def accept_workers(listener: Listener, procs: Sequence[subprocess.Popen], devices: Sequence[str],
                   timeout_s: float, ranks: Sequence[int] | None = None) -> list:
    """Take one connection per rank (of ``ranks``, default all; ``procs`` indexed by rank), in rank order; a
    worker that dies before connecting is reported."""
    world_size = len(devices)
    ranks = list(range(world_size)) if ranks is None else list(ranks)
    accepted: queue.Queue = queue.Queue()

    def accept_all():
        for _ in ranks:
            try:
                accepted.put(listener.accept())
            except OSError as exc:  # listener closed or auth failure
                accepted.put(exc)
                return

    threading.Thread(target=accept_all, name="stadi-accept", daemon=True).start()
    conns: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    while len(conns) < len(ranks):
        for rank in ranks:
            p = procs[rank]
            if p.poll() is not None and rank not in conns:
                raise WorkerError(f"worker rank {rank} ({devices[rank]}) {describe_exit(p.returncode)} "
                                  "before connecting; see its output above")
        try:
            conn = accepted.get(timeout=0.25)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise WorkerTimeout(f"workers did not connect within {timeout_s:.0f} s")
            continue
        if isinstance(conn, Exception):
            raise WorkerError(f"a worker could not connect: {conn}")
        if not conn.poll(30):
            raise WorkerTimeout("a connected worker did not introduce itself within 30 s")
        hello = conn.recv()
        if not isinstance(hello, Hello) or hello.rank not in ranks or hello.rank in conns:
            raise WorkerError(f"unexpected greeting {hello!r}")
        conns[hello.rank] = conn
    return [conns[r] for r in ranks]
