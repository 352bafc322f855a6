"""Make a worker die with its parent: no orphaned processes holding GPU memory."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time


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
