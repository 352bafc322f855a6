"""The coordinator's door for workers on other machines (DESIGN §6).

``open_lobby("10.0.0.1:29600", token)`` listens there. A worker started on another machine with
``python -m stadi_core worker --join 10.0.0.1:29600 --token T`` connects, proves it knows the token
(handshake.py: mutual HMAC challenge, never the token in clear), says what device it offers (Join),
has its link measured (link_probe.py) and opens a second connection, its lifeline. It then waits in
the lobby as ``HOST/DEVICE`` (``10.0.0.2/cuda:0``: the address the coordinator sees it at) until a
worker pool claims it; the pool talks to it exactly as to a local child.

The lifeline carries a beat each way every second. A worker that hears nothing for
``STADI_LIFELINE_TIMEOUT_S`` (10 s) exits, so a coordinator that crashed or lost the network leaves
no worker behind; the coordinator treats a closed lifeline, or one silent that long, as the worker's
death (the pool's usual WorkerLost: an error, or the survivors finish). When a pool ends, its remote
workers exit cleanly and their ``worker --join`` command starts them again, so they re-join fresh
(a new process, a new process group) for the next pool; when the coordinator goes away it tells
them to exit (Release).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Sequence

from ..errors import PlanError, WorkerError, WorkerTimeout
from . import link_probe
from . import registry as _registry  # noqa: F401 - imported first, so its atexit (pools) runs after ours
from .handshake import (HandshakeError, TokenRefused, coordinator_handshake, is_loopback, key_of,
                        parse_address)
from .messages import Beat, Join, JoinRefused, LifelineHello, LinkInfo, Release, Welcome

LIFELINE_TIMEOUT_ENV = "STADI_LIFELINE_TIMEOUT_S"
DEFAULT_LIFELINE_TIMEOUT_S = 10.0
BEAT_S = 1.0
JOIN_STEP_TIMEOUT_S = 15.0  # each step of a join after the handshake (Join message, lifeline)
REMOTE_SEPARATOR = "/"

_log = logging.getLogger("stadi")


def lifeline_timeout_s() -> float:
    raw = os.environ.get(LIFELINE_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_LIFELINE_TIMEOUT_S
    except ValueError:
        value = -1.0
    if value <= 0:
        raise PlanError(f"{LIFELINE_TIMEOUT_ENV}={raw!r}: give the seconds without a heartbeat after which the other "
                        f"side counts as gone, e.g. {DEFAULT_LIFELINE_TIMEOUT_S:.0f}")
    return value


def is_remote(device: str) -> bool:
    return REMOTE_SEPARATOR in device


def host_of(device: str) -> str:
    """``10.0.0.2/cuda:0`` -> ``10.0.0.2``; a local device -> ``""``."""
    return device.rpartition(REMOTE_SEPARATOR)[0]


@dataclass(eq=False)
class RemoteWorker:
    """One joined worker process on another machine."""

    name: str  # HOST/DEVICE
    host: str
    via: str  # this machine's address it connected to (the store's address for it; listening on 0.0.0.0 too)
    join: Join
    conn: Connection  # control: the pool's messages
    join_id: str
    link: LinkInfo | None = None
    lifeline: Connection | None = None
    heard: float = 0.0
    dead: str | None = None  # why it is gone, once it is
    claimed: bool = False
    released: bool = False
    files: dict = field(default_factory=dict)  # shared-file tag -> (pid, fd) copied to it (relay.py)
    lock: threading.Lock = field(default_factory=threading.Lock)  # lifeline writes

    def describe(self) -> str:
        j = self.join
        return (f"{self.name} ({j.device_name}, {j.memory_bytes / 2**30:.1f} GiB, {j.threads} threads, pid {j.pid} "
                f"on {j.hostname})")


class RemoteProcess:
    """A remote worker seen through the calls a pool makes on its local ``subprocess.Popen``s."""

    def __init__(self, lobby: "Lobby", worker: RemoteWorker):
        self.lobby, self.worker = lobby, worker

    @property
    def pid(self) -> int:
        return self.worker.join.pid

    @property
    def returncode(self) -> str | None:
        return self.worker.dead

    def poll(self) -> str | None:
        """None while the worker lives, else why it is gone (launch.describe_exit prints it as is)."""
        return self.worker.dead

    def wait(self, timeout: float | None = None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.worker.dead is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.worker.name, timeout)
            time.sleep(0.05)
        return self.worker.dead

    def kill(self) -> None:
        """Stop it: it leaves its process group and joins again, fresh, for the next pool."""
        self.lobby.release(self.worker, rejoin=True, reason="its worker pool was stopped")


class Lobby:
    """Listens on ``address`` for remote workers; see the module docstring."""

    def __init__(self, address: str, token: str | None):
        host, port = parse_address(address, "listen address", any_port=True)
        if not token and not is_loopback(host):
            raise PlanError(f"listening on {host} (not 127.0.0.1) needs a token that remote workers must prove they "
                            "know: pass --token (or set STADI_TOKEN), e.g. a value from "
                            "`python -c 'import secrets; print(secrets.token_hex(16))'`")
        if not token:
            _log.warning("STADI: listening on %s:%d without a token: any local process can join", host, port)
        self.key = key_of(token or "")
        try:
            self.sock = socket.create_server((host, port))
        except OSError as exc:
            raise WorkerError(f"cannot listen for workers on {host}:{port}: {exc}. Use an address of this machine "
                              "and a free port (and open it in the firewall for the other machines)") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        self.workers: dict[str, RemoteWorker] = {}  # joined and alive (or claimed), join order
        self.links: dict[str, LinkInfo] = {}  # by worker host: the latest measurement
        self._pending: dict[str, RemoteWorker] = {}  # join_id -> joined, lifeline not yet open
        self._cond = threading.Condition()
        self._probe_lock = threading.Lock()  # one link measurement at a time: two would share the link
        self.closed = False
        self.timeout_s = lifeline_timeout_s()
        threading.Thread(target=self._accept_loop, name="stadi-lobby-accept", daemon=True).start()
        threading.Thread(target=self._lifeline_loop, name="stadi-lobby-lifelines", daemon=True).start()
        _log.info("STADI: listening for remote workers on %s:%d", self.host, self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- admitting workers ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, addr = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._admit, args=(sock, addr), name="stadi-lobby-join", daemon=True).start()

    def _admit(self, sock: socket.socket, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            coordinator_handshake(sock, self.key, peer)
        except TokenRefused as exc:
            _log.warning("STADI: %s", exc)
            sock.close()
            return
        except (HandshakeError, OSError) as exc:
            _log.warning("STADI: a connection from %s failed the join handshake: %s", peer, exc)
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        via = sock.getsockname()[0]
        conn = Connection(sock.detach())
        try:
            if not conn.poll(JOIN_STEP_TIMEOUT_S):
                raise WorkerTimeout(f"sent nothing for {JOIN_STEP_TIMEOUT_S:.0f} s after the handshake")
            msg = conn.recv()
            if isinstance(msg, LifelineHello):
                self._attach_lifeline(msg.join_id, conn, peer)
            elif isinstance(msg, Join):
                self._join(msg, conn, addr[0], via)
            else:
                raise WorkerError(f"sent {type(msg).__name__} instead of a Join")
        except (WorkerError, OSError, EOFError) as exc:
            _log.warning("STADI: the worker at %s could not join: %s", peer, exc)
            conn.close()

    def _join(self, msg: Join, conn: Connection, host: str, via: str) -> None:
        from ..cluster import canonical_device

        name = f"{host}{REMOTE_SEPARATOR}{canonical_device(msg.device)}"
        with self._cond:
            old = self.workers.get(name)
        if old is not None and old.released:  # its pool let it go and it is back before its old lifeline closed
            self._gone(old, "exited")
        with self._cond:
            old = self.workers.get(name)
            if old is not None and old.dead is None:
                conn.send(JoinRefused(f"{name} already joined (pid {old.join.pid} on {old.join.hostname}): start "
                                      "one worker per device (--devices lists each once)"))
                raise WorkerError(f"{name} is already in the lobby (pid {old.join.pid})")
        worker = RemoteWorker(name, host, via, msg, conn, secrets.token_hex(8))
        with self._cond:
            self._pending[worker.join_id] = worker
        try:
            conn.send(Welcome(name, worker.join_id))
            with self._probe_lock:
                worker.link = link_probe.measure(conn, host)
            deadline = time.monotonic() + JOIN_STEP_TIMEOUT_S
            with self._cond:
                while worker.lifeline is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.closed:
                        raise WorkerTimeout(f"{name} did not open its lifeline within {JOIN_STEP_TIMEOUT_S:.0f} s")
                    self._cond.wait(left)
                worker.heard = time.monotonic()
                self.workers[name] = worker
                self.links[host] = worker.link
                self._cond.notify_all()
        finally:
            with self._cond:
                self._pending.pop(worker.join_id, None)
        _log.info("STADI: %s joined; link %s", worker.describe(), worker.link.describe())

    def _attach_lifeline(self, join_id: str, conn: Connection, peer: str) -> None:
        with self._cond:
            worker = self._pending.get(join_id)
            if worker is None:
                raise WorkerError(f"opened a lifeline for an unknown join {join_id!r}")
            worker.lifeline = conn
            self._cond.notify_all()

    # -- lifelines -----------------------------------------------------------------------------
    def _lifeline_loop(self) -> None:
        last_beat = 0.0
        while not self.closed:
            with self._cond:
                live = [w for w in self.workers.values() if w.dead is None and w.lifeline is not None]
            by_conn = {w.lifeline: w for w in live}
            try:
                ready = wait_connections(list(by_conn), timeout=0.25) if by_conn else []
            except (OSError, ValueError):
                ready = []  # a lifeline closed meanwhile: the next pass sees it
            if not by_conn:
                time.sleep(0.25)
            now = time.monotonic()
            for conn in ready:
                worker = by_conn[conn]
                try:
                    while conn.poll(0):
                        if isinstance(conn.recv(), Release):  # it leaves on purpose (its pool ended)
                            worker.released = True
                        worker.heard = now
                except (EOFError, OSError):
                    self._gone(worker, "exited" if worker.released else
                               "closed its connection (the process ended, or its machine went away)")
            if now - last_beat >= BEAT_S:
                last_beat = now
                for worker in live:
                    if worker.dead is None:
                        try:
                            with worker.lock:
                                worker.lifeline.send(Beat())
                        except (OSError, ValueError):
                            self._gone(worker, "closed its connection")
            for worker in live:
                if worker.dead is None and now - worker.heard > self.timeout_s:
                    self._gone(worker, f"sent no heartbeat for {self.timeout_s:.0f} s (its machine or the network "
                                       "is down?)")

    def _gone(self, worker: RemoteWorker, why: str) -> None:
        with self._cond:
            if worker.dead is not None:
                return
            worker.dead = why
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name]
            self._cond.notify_all()
        if worker.lifeline is not None:
            worker.lifeline.close()
        if not worker.released:
            _log.warning("STADI: remote worker %s %s", worker.name, why)

    def release(self, worker: RemoteWorker, rejoin: bool, reason: str) -> None:
        """Tell ``worker`` to leave: to join again (its pool ended) or to exit (we are going away)."""
        worker.released = True
        if worker.dead is not None or worker.lifeline is None:
            return
        try:
            with worker.lock:
                worker.lifeline.send(Release(rejoin, reason))
        except (OSError, ValueError):
            pass

    # -- for pools and users -------------------------------------------------------------------
    def names(self) -> list[str]:
        """The remote devices in the lobby now (join order), claimed or not."""
        with self._cond:
            return [n for n, w in self.workers.items() if w.dead is None]

    def wait_for(self, count: int, timeout_s: float) -> list[str]:
        """The first ``count`` remote devices, once that many joined; WorkerTimeout saying what to run if not."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                names = [n for n, w in self.workers.items() if w.dead is None]
                if len(names) >= count:
                    return names[:count]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerTimeout(self._missing_text(f"{count - len(names)} more remote worker(s)", timeout_s))
                self._cond.wait(min(left, 0.5))

    def claim(self, names: Sequence[str], timeout_s: float) -> dict[str, RemoteWorker]:
        """Hand ``names`` to a pool (waiting up to ``timeout_s`` for them to join or re-join)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = [n for n in names if n not in self.workers or self.workers[n].claimed]
                if not missing:
                    for n in names:
                        self.workers[n].claimed = True
                    return {n: self.workers[n] for n in names}
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerTimeout(self._missing_text(", ".join(missing), timeout_s))
                self._cond.wait(min(left, 0.5))

    def _missing_text(self, what: str, timeout_s: float) -> str:
        here = ", ".join(self.workers) or "none"
        return (f"{what} did not join within {timeout_s:.0f} s (joined now: {here}). On each other machine run "
                f"`python -m stadi_core worker --join {self.address} --token TOKEN --devices cuda:0,...` with this "
                f"coordinator's token, and open port {self.port}/tcp to it")

    def link_to(self, device: str) -> LinkInfo | None:
        return self.links.get(host_of(device)) if is_remote(device) else None

    def link_model(self, devices: Sequence[str], inside=None):
        """cost_model.LinkModel with P x P matrices over ``devices``: ``inside`` (default LinkModel()'s
        figures) between devices of one machine, the link measured at join between this machine and
        another; between two other machines (not measured) the slower of their links here."""
        from ..cost_model import LinkModel

        inside = inside or LinkModel()
        n = len(devices)
        hosts = [host_of(d) for d in devices]
        missing = sorted({h for h in hosts if h and h not in self.links})
        if missing:
            raise WorkerError(f"no link measured to {', '.join(missing)}: its workers did not join this coordinator")
        bw = [[inside.bandwidth_gbps] * n for _ in range(n)]
        lat = [[inside.latency_s] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i == j or hosts[i] == hosts[j]:
                    continue
                ends = [self.links[h] for h in (hosts[i], hosts[j]) if h]
                bw[i][j] = min(x.bandwidth_gbps for x in ends)
                lat[i][j] = sum(x.latency_s for x in ends)
        return LinkModel(bandwidth_gbps=inside.bandwidth_gbps, latency_s=inside.latency_s, bandwidth_matrix=bw,
                         latency_matrix=lat)

    def link_notes(self, devices: Sequence[str]) -> list[str]:
        hosts = dict.fromkeys(host_of(d) for d in devices if is_remote(d))
        return [f"link coordinator {self.host} <-> {h}: {self.links[h].describe()} (measured at join)"
                for h in hosts if h in self.links]

    def close(self) -> None:
        """Stop listening and tell every remote worker to exit."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self._cond:
            workers = list(self.workers.values())
        for worker in workers:
            self.release(worker, rejoin=False, reason="the coordinator is shutting down")
            if worker.lifeline is not None:
                worker.lifeline.close()
        _LOBBIES.pop((self.host, self.port), None)


_LOBBIES: dict[tuple[str, int], Lobby] = {}
_LOBBIES_LOCK = threading.Lock()


def open_lobby(address: str, token: str | None) -> Lobby:
    """The lobby listening on ``address`` (one per address and process; reopened if the token changed)."""
    host, port = parse_address(address, "listen address", any_port=True)
    with _LOBBIES_LOCK:
        lobby = _LOBBIES.get((host, port))
        if lobby is not None and lobby.key == key_of(token or "") and not lobby.closed:
            return lobby
        if lobby is not None:
            lobby.close()
        lobby = Lobby(address, token)
        _LOBBIES[(host, lobby.port)] = lobby
        if port and port != lobby.port:
            _LOBBIES[(host, port)] = lobby
        return lobby


def close_lobbies() -> None:
    for lobby in list(dict.fromkeys(_LOBBIES.values())):
        lobby.close()


atexit.register(close_lobbies)
