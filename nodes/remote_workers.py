"""Workers on other machines for the ComfyUI server (stadi_core/runtime/lobby.py).

Start ComfyUI with ``STADI_LISTEN=ADDR:PORT`` and ``STADI_TOKEN=...`` in its environment (the token
stays out of workflows, which are shared): the server then listens there from the moment the pack is
loaded, and on another machine ``python -m stadi_core worker --join ADDR:PORT --devices cuda:0,cuda:1``
(same ``STADI_TOKEN``) joins. Joined devices are ``HOST/DEVICE`` in the GPU Cluster Profile: 'auto'
adds every joined one after this machine's, a list names them, and speeds/exclude/slowdowns take them
like local ones.
"""

from __future__ import annotations

import logging
import os

LISTEN_ENV = "STADI_LISTEN"
_log = logging.getLogger("stadi")


def server_lobby():
    """The server's lobby, opened on first use from ``STADI_LISTEN``/``STADI_TOKEN``; None when not set."""
    address = os.environ.get(LISTEN_ENV, "").strip()
    if not address:
        return None
    from stadi_core.runtime.handshake import TOKEN_ENV
    from stadi_core.runtime.lobby import open_lobby

    return open_lobby(address, os.environ.get(TOKEN_ENV) or None)


def open_at_load() -> None:
    """Listen as soon as the pack loads, so remote workers can join before the first prompt."""
    try:
        lobby = server_lobby()
    except Exception as exc:  # the pack works without remote workers; say why they cannot join
        _log.error("STADI: %s=%s: cannot listen for remote workers: %s", LISTEN_ENV, os.environ.get(LISTEN_ENV), exc)
        return
    if lobby is not None:
        _log.info("STADI: workers on other machines join with `python -m stadi_core worker --join %s` "
                  "(and this server's STADI_TOKEN)", lobby.address)


def joined_info(lobby, names) -> list[dict]:
    """The device panel's entries for joined devices (discover_devices' layout, plus host and link)."""
    out = []
    for name in names:
        worker = lobby.workers.get(name)
        if worker is None:
            continue
        j = worker.join
        kind = j.device.split(":")[0]
        out.append({"name": name, "kind": kind, "label": f"{j.device_name} on {j.hostname}",
                    "memory_total_mb": int(j.memory_bytes / 2**20), "memory_used_mb": None, "utilization_pct": None,
                    "source": "joined", "host": worker.host, "pid": j.pid,
                    "link": worker.link.describe() if worker.link else None})
    return out
