"""Measure the link to a worker that joined from another machine: a short timed transfer.

At join, over the worker's control connection: a few tiny round trips give the latency (half the
smallest round trip), then ``probe_bytes`` each way (best of ``repeats``) the bandwidth: a transfer
of N bytes that comes back as an empty echo takes one round trip plus N / bandwidth. The whole
measurement moves about 2 x repeats x N bytes (48 MB by default: 0.4 s on 1 GbE).

It measures the TCP path between the two hosts as the control channel sees it, Python's copies
included; gloo and NCCL use the same path between these hosts (their own interface choice aside).
"""

from __future__ import annotations

import os
import time

from ..errors import WorkerTimeout
from .messages import LinkDone, LinkEcho, LinkInfo, LinkProbe

PROBE_BYTES_ENV = "STADI_LINK_PROBE_BYTES"
DEFAULT_PROBE_BYTES = 8 << 20
PINGS = 7
REPEATS = 3
REPLY_TIMEOUT_S = 30.0  # one probe; 8 MB over a 10 Mbit/s link would take 7 s


def probe_bytes() -> int:
    raw = os.environ.get(PROBE_BYTES_ENV, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_PROBE_BYTES


def _round_trip(conn, probe: LinkProbe, host: str) -> float:
    t0 = time.perf_counter()
    conn.send(probe)
    if not conn.poll(REPLY_TIMEOUT_S):
        raise WorkerTimeout(f"the worker at {host} did not answer a link probe within {REPLY_TIMEOUT_S:.0f} s")
    reply = conn.recv()
    dt = time.perf_counter() - t0
    if not isinstance(reply, LinkEcho) or len(reply.payload) != probe.reply_bytes:
        raise WorkerTimeout(f"the worker at {host} answered a link probe with {type(reply).__name__}")
    return dt


def measure(conn, host: str, nbytes: int | None = None, repeats: int = REPEATS) -> LinkInfo:
    """The coordinator's side: probe the worker at ``host`` and tell it the result (LinkDone)."""
    nbytes = nbytes or probe_bytes()
    rtt = min(_round_trip(conn, LinkProbe(b"", 0), host) for _ in range(PINGS))
    blob = bytes(nbytes)
    down = min(_round_trip(conn, LinkProbe(blob, 0), host) for _ in range(repeats))
    up = min(_round_trip(conn, LinkProbe(b"", nbytes), host) for _ in range(repeats))
    floor = 1e-6  # a transfer can never be faster than its round trip; keep the division finite
    down_gbps = nbytes / max(down - rtt, floor) / 1e9
    up_gbps = nbytes / max(up - rtt, floor) / 1e9
    info = LinkInfo(host=host, bandwidth_gbps=min(down_gbps, up_gbps), latency_s=rtt / 2, down_gbps=down_gbps,
                    up_gbps=up_gbps, probe_bytes=nbytes)
    conn.send(LinkDone(info))
    return info


def answer(conn, timeout_s: float) -> LinkInfo:
    """The worker's side: echo probes until the coordinator says what it measured."""
    while True:
        if not conn.poll(timeout_s):
            raise WorkerTimeout(f"the coordinator sent no link probe for {timeout_s:.0f} s after accepting this worker")
        msg = conn.recv()
        if isinstance(msg, LinkDone):
            return msg.info
        if not isinstance(msg, LinkProbe):
            raise WorkerTimeout(f"expected a link probe from the coordinator, got {type(msg).__name__}")
        conn.send(LinkEcho(bytes(msg.reply_bytes)))
