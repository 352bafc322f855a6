"""A worker's liveness, seen from inside the worker.

- ``tie_to_parent``: die with the coordinator, so no orphaned process holds GPU memory;
- ``Channel``: the connection to the coordinator with the main thread's progress counter, which the
  heartbeat thread reports, so the coordinator can tell a stuck main thread from a slow one;
- ``stall_if_armed``: a test-only hook (inert unless ``STADI_TEST_STALL_FILE`` is set) that hangs the
  main thread the way a hung CUDA sync would, heartbeats still flowing.

Kept free of torch: the worker imports it before it sets ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

from .messages import CancelRequest, PauseRequest

STALL_FILE_ENV = "STADI_TEST_STALL_FILE"
KILL_FILE_ENV = "STADI_TEST_KILL_FILE"


def tie_to_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Exit this process as soon as ``parent_pid`` is gone.

    Linux's PR_SET_PDEATHSIG does it at once; the polling thread covers other systems
    and the race where the parent died before the signal was armed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(poll_s)

    threading.Thread(target=watch, name="stadi-lifeline", daemon=True).start()


class Channel:
    """The connection to the coordinator, shared by the job loop and the heartbeat thread.

    One lock per direction's writer: the heartbeat thread and the main thread both send, and a
    message over 16 KB goes out in several writes that must not interleave. ``progress`` and
    ``doing`` are written by the main thread only and read by the heartbeat thread.
    """

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self.job_id = None
        self.cancel_requested = False
        self.pause_requested = False
        self.progress = 0
        self.doing = "idle"

    def tick(self, doing: str | None = None) -> None:
        """The main thread got something done (and now does ``doing``)."""
        self.progress += 1
        if doing is not None:
            self.doing = doing

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)

    def recv(self):
        msg = self.conn.recv()
        self.tick()
        if isinstance(msg, CancelRequest):
            self.cancel_requested = True
        elif isinstance(msg, PauseRequest):
            self.pause_requested = True
        return msg

    def new_job(self, job_id) -> None:
        """Requests that arrived before this job belong to the one before it."""
        self.job_id = job_id
        self.cancel_requested = self.pause_requested = False

    def poll_cancel(self) -> bool:
        """Drain pending control messages without blocking; True once a cancel arrived (a pause
        request is noted in ``pause_requested``)."""
        while self.conn.poll(0):
            msg = self.recv()
            if not isinstance(msg, (CancelRequest, PauseRequest)):
                raise RuntimeError(f"unexpected {type(msg).__name__} in the middle of a job")
        return self.cancel_requested


def stall_if_armed(rank: int) -> None:
    """Test-only: when the file named by ``STADI_TEST_STALL_FILE`` exists, block this (main) thread
    until the process is killed, as a hung CUDA sync or a lost collective would; the heartbeat
    thread keeps running, which is the point. The file may list the ranks to stall (``1`` or
    ``0 1``); an empty file stalls every rank. On stalling, ``<file>.stalled`` gets a line
    ``<rank> <unix time>`` so a test can measure from the moment the worker hung.
    """
    path = os.environ.get(STALL_FILE_ENV)
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            ranks = f.read().replace(",", " ").split()
    except OSError:
        return
    if ranks and str(rank) not in ranks:
        return
    with open(path + ".stalled", "a") as f:
        f.write(f"{rank} {time.time():.3f}\n")
    while True:
        time.sleep(0.5)


def kill_if_armed(device: str, step: int) -> None:
    """Test-only: when the file named by ``STADI_TEST_KILL_FILE`` reads ``<device> <step>`` (``cpu:1 3``)
    and this worker runs on that device at that step or later, claim the file (one shot: the survivors'
    fresh pool must not die too) and SIGKILL this process, as a crashed GPU or an OOM killer would."""
    path = os.environ.get(KILL_FILE_ENV)
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            target, at = f.read().split()
        if target != device or step < int(at):
            return
        os.rename(path, f"{path}.{os.getpid()}.fired")  # only one process wins the claim
    except (OSError, ValueError):
        return
    os.kill(os.getpid(), signal.SIGKILL)
