"""A TCP relay that holds every forwarded chunk for a fixed time: link latency where netem is missing.

Why it exists: issue #14 asks that the link a remote worker's join measures (runtime/link_probe.py,
round trips over the worker's control connection) match the shaping of a second host made on this
machine (bench/netns.py: a namespace, a veth pair, tc). tc can shape the rate with tbf anywhere, but
only netem (or fq/etf/bpf) can *delay* packets, and some kernels have none of them. There the test
puts this relay on the worker's path instead: it runs in the second host's namespace, listens on that
host's address, and forwards each connection a worker opens to the coordinator's lobby over the
(rate-shaped) veth. Every chunk read from either side is held until ``delay`` after it arrived (the
kernel's receive timestamp, SO_TIMESTAMPNS, so the relay's own wake-up to read it is inside the delay,
not added to it), then written to the other side: each direction gets ``delay`` more one-way latency on
a real socket path (real TCP, real processes, real scheduling) -- a delay line, not a mock of the probe.
Chunks are queued, not serialized, so the rate stays the veth's. The coordinator sees the connection
come from the namespace's own address, as it would without the relay.

What it is not: netem delays each packet in the kernel; this delays each ``recv()`` in user space, so
its own forwarding (one more loopback hop, Python's copies, waking up at the due time) adds to the delay.
On this 2-core machine under load that is 0.03-0.15 ms one way (with ``--delay-ms 0``), and the 1 ms holds
overshoot by a few tens of microseconds. ``holds`` records how long each chunk actually stayed between its
arrival and the start of its write; the relay prints their summary when it stops (chunks queued behind a
bulk transfer on the shaped veth stay longer: that is the queue at the bottleneck, not the delay).

Run: ``python -m stadi_core.bench.delay_relay --listen 10.77.0.2:0 --to 10.77.0.1:29600 --delay-ms 1``;
it prints ``listening HOST:PORT`` once ready, and on SIGTERM/SIGINT closes everything and prints
``holds {json}``. ``DelayRelay`` starts it (in a namespace with ``prefix=["ip", "netns", "exec", NS]``)
and stops it (``stop()``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

CHUNK = 1 << 18
MAX_QUEUED = 64 << 20  # bytes held per direction before the relay stops reading it (TCP back-pressure)
_MAX_HOLDS = 100_000
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux: the kernel's receive time of the data
_ANC = socket.CMSG_SPACE(16)


def _low_timer_slack() -> None:
    """Sleep to the microsecond (Linux's default 50 us timer slack would add to every hold)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):  # not Linux: the default slack
        return


def _recv(sock: socket.socket) -> tuple[bytes, float]:
    """(data, when it arrived on this host: the kernel's receive timestamp on the monotonic clock)."""
    data, anc, _, _ = sock.recvmsg(CHUNK, _ANC)
    now_mono, now_real = time.monotonic(), time.time()
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= 16:
            sec, nsec = struct.unpack("qq", raw[:16])
            age = now_real - (sec + nsec * 1e-9)
            if 0 <= age < 1.0:
                return data, now_mono - age
    return data, now_mono  # no timestamp: when this process read it


class _Flow:
    """One direction of one connection: chunks read from ``src``, each written to ``dst`` ``delay_s`` after
    it arrived."""

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.queue: collections.deque = collections.deque()  # (due, arrived, bytes); b"" = end of stream
        self.queued = 0
        self.sending: memoryview | None = None
        self.eof_in = self.done = False
        try:
            src.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            pass

    def read(self, delay_s: float) -> None:
        data, arrived = _recv(self.src)
        self.queue.append((arrived + delay_s, arrived, data))
        self.queued += len(data)
        self.eof_in = not data

    def flush(self, now: float, record) -> None:
        """Write what is due (without blocking)."""
        while True:
            if self.sending is None:
                if not self.queue or self.queue[0][0] > now:
                    return
                _, arrived, data = self.queue.popleft()
                self.queued -= len(data)
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.done = True
                    return
                record(time.monotonic() - arrived)
                self.sending = memoryview(data)
            try:
                n = self.dst.send(self.sending)
            except BlockingIOError:
                return
            self.sending = self.sending[n:] if n < len(self.sending) else None
            if self.sending is not None:
                return

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.sending is None and self.queue else None


class Relay:
    """Listens on ``listen``; each connection is forwarded to ``upstream`` with ``delay_s`` each way.

    One thread, one event loop (no hand-offs between threads: each chunk costs one wake-up to read it
    and one, at its due time, to write it)."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], delay_s: float):
        self.upstream, self.delay_s = upstream, delay_s
        self.sock = socket.create_server(listen)
        self.address = self.sock.getsockname()[:2]
        self.stopping = False
        self.holds: list[float] = []
        self.connections = 0
        self._pairs: list[tuple[_Flow, _Flow]] = []

    def record(self, hold_s: float) -> None:
        if len(self.holds) < _MAX_HOLDS:
            self.holds.append(hold_s)

    def _accept(self) -> None:
        client, _ = self.sock.accept()
        try:
            server = socket.create_connection(self.upstream, timeout=10.0)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        self.connections += 1
        self._pairs.append((_Flow(client, server), _Flow(server, client)))

    def serve(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            reads, writes, timeout = [self.sock], [], 0.2
            for pair in list(self._pairs):
                try:
                    for flow in pair:
                        flow.flush(now, self.record)
                except OSError:  # reset: drop the connection
                    self._close(pair)
                    continue
                if all(f.done for f in pair):
                    self._close(pair)
                    continue
                for flow in pair:
                    if not flow.eof_in and flow.queued < MAX_QUEUED:
                        reads.append(flow.src)
                    if flow.sending is not None:
                        writes.append(flow.dst)
                    due = flow.next_due()
                    if due is not None:
                        timeout = min(timeout, max(0.0, due - now))
            try:
                readable, _, _ = select.select(reads, writes, [], timeout)
            except (OSError, ValueError):
                if self.stopping:
                    return
                continue
            for sock in readable:
                if sock is self.sock:
                    try:
                        self._accept()
                    except OSError:
                        pass
                    continue
                for pair in list(self._pairs):
                    for flow in pair:
                        if flow.src is sock:
                            try:
                                flow.read(self.delay_s)
                            except BlockingIOError:
                                pass
                            except OSError:
                                self._close(pair)

    def _close(self, pair) -> None:
        if pair in self._pairs:
            self._pairs.remove(pair)
        for s in (pair[0].src, pair[0].dst):
            try:
                s.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Called from the thread that runs ``serve`` once it returned, or from a signal handler's flag."""
        self.stopping = True
        for pair in list(self._pairs):
            self._close(pair)
        try:
            self.sock.close()
        except OSError:
            pass

    def summary(self) -> dict:
        holds = sorted(self.holds)
        out = {"delay_ms": self.delay_s * 1e3, "connections": self.connections, "chunks": len(holds)}
        if holds:
            out.update(min_ms=holds[0] * 1e3, median_ms=holds[len(holds) // 2] * 1e3,
                       p90_ms=holds[int(len(holds) * 0.9)] * 1e3, max_ms=holds[-1] * 1e3)
        return out


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stadi_core.bench.delay_relay")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (PORT 0: any free one)")
    parser.add_argument("--to", required=True, help="HOST:PORT every connection is forwarded to")
    parser.add_argument("--delay-ms", type=float, required=True, help="hold each chunk this long, each way")
    args = parser.parse_args(argv)
    _low_timer_slack()
    relay = Relay(_address(args.listen), _address(args.to), args.delay_ms * 1e-3)

    def on_signal(*_):
        relay.stopping = True  # serve() returns within its select timeout (0.2 s at most)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    print(f"listening {relay.address[0]}:{relay.address[1]}", flush=True)
    relay.serve()
    relay.stop()
    print("holds " + json.dumps(relay.summary()), flush=True)
    return 0


class DelayRelay:
    """Start ``delay_relay`` as a process (``prefix``: e.g. ``ip netns exec NS``); ``stop()`` ends it."""

    def __init__(self, listen: str, upstream: str, delay_ms: float, prefix: list[str] | None = None,
                 start_timeout_s: float = 30.0):
        self.delay_ms = delay_ms
        self.stats: dict = {}
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent] + [p for p in [os.environ.get(
            "PYTHONPATH")] if p]))
        cmd = list(prefix or []) + [sys.executable, "-m", "stadi_core.bench.delay_relay", "--listen", listen, "--to",
                                    upstream, "--delay-ms", f"{delay_ms:g}"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        line = ""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                if line.startswith("listening ") or not line:
                    break
            elif self.proc.poll() is not None:
                break
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the delay relay did not start: {line.strip() or 'no output'}")
        self.address = line.split()[1]

    def stop(self, timeout_s: float = 10.0) -> dict:
        """SIGTERM, wait; SIGKILL its process group if it lingers. Returns the relay's hold summary."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
        for line in (out or "").splitlines():
            if line.startswith("holds "):
                self.stats = json.loads(line[len("holds "):])
        return self.stats

    def describe(self) -> str:
        s = self.stats
        if not s.get("chunks"):
            return f"relay {self.delay_ms:g} ms each way (no hold recorded)"
        return (f"relay {self.delay_ms:g} ms each way: {s['chunks']} chunks over {s['connections']} connections held "
                f"{s['min_ms']:.3f} / {s['median_ms']:.3f} / {s['p90_ms']:.3f} / {s['max_ms']:.3f} ms "
                "(min / median / p90 / max)")


if __name__ == "__main__":
    sys.exit(main())
