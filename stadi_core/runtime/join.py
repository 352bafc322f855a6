"""Workers on another machine: ``python -m stadi_core worker --join HOST:PORT --token T [--devices ...]``.

The command starts one worker process per device (``--devices cpu,cpu`` or ``cuda:0,cuda:1``;
default every GPU, else one CPU worker). Each connects to the coordinator's lobby (lobby.py), proves
it knows the token, has its link measured, opens its lifeline and waits to be claimed by a worker
pool; then it is an ordinary worker (worker.py's ``_Worker``) over TCP. Exit codes of a worker:

- 0: its pool ended; the command starts it again and it re-joins, fresh, for the next pool;
- 3: the coordinator could not be reached; 5: the token was refused (either side);
- 4: the coordinator stopped heart-beating (crashed, or the network is down); 10: it said goodbye.

Anything but 0 ends the whole command (its other workers are stopped), with the reason printed.

Under ``torchrun --nproc-per-node N -m stadi_core worker --join ...`` each process torchrun starts is
one worker, for device ``--devices[LOCAL_RANK]`` (default ``cuda:LOCAL_RANK``); after its pool ends it
re-executes itself to re-join (torchrun keeps the same process).

The token comes from ``--token`` or, better (command lines are visible to other users), ``STADI_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from . import link_probe
from .lifeline import Channel
from .relay import FileStore
from .handshake import (TOKEN_ENV, HandshakeError, TokenRefused, interface_env, is_loopback, key_of, parse_address,
                        worker_handshake)
from .messages import (Beat, FileChunk, Join, JoinRefused, LifelineHello, Release, Welcome, WorkerFailure,
                       WorkerInit)

EXIT_REJOIN, EXIT_UNREACHABLE, EXIT_COORDINATOR_LOST, EXIT_REFUSED, EXIT_DISMISSED = 0, 3, 4, 5, 10
FIRST_CONNECT_TIMEOUT_S = 120.0  # the coordinator may start after this command
REJOIN_CONNECT_TIMEOUT_S = 30.0
BEAT_S = 1.0
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EXIT_TEXT = {EXIT_UNREACHABLE: "the coordinator could not be reached", EXIT_COORDINATOR_LOST:
              "the coordinator stopped heart-beating", EXIT_REFUSED: "the token was refused",
              EXIT_DISMISSED: "the coordinator shut down"}


def parse_devices(text: str | None) -> list[str]:
    """``cpu,cpu`` -> [cpu:0, cpu:1]; ``cuda:0,cuda:1``; None -> every GPU, else one CPU worker."""
    from ..cluster import canonical_device
    from ..errors import PlanError

    if not text:
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:
            n = 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu:0"]
    out: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        name = canonical_device(token)
        if ":" not in token:  # a bare "cpu"/"cuda": the next free index
            kind = name.split(":")[0]
            i = 0
            while f"{kind}:{i}" in out:
                i += 1
            name = f"{kind}:{i}"
        if name in out:
            raise PlanError(f"--devices lists {name} twice: one worker per device")
        out.append(name)
    return out


def _token(args) -> str:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token and not is_loopback(parse_address(args.join, "--join")[0]):
        raise SystemExit(f"stadi worker: give the coordinator's token with --token or {TOKEN_ENV}")
    return token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stadi_core worker --join HOST:PORT")
    parser.add_argument("--join", required=True, help="HOST:PORT the coordinator listens on (its --listen)")
    parser.add_argument("--token", default=None, help=f"the coordinator's token (or set {TOKEN_ENV})")
    parser.add_argument("--devices", default=None, help="cpu,cpu or cuda:0,cuda:1 (default: every GPU, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per CPU worker (default: cores shared)")
    parser.add_argument("--comfyui", default=None, help="this machine's ComfyUI checkout, when the coordinator is a "
                        "ComfyUI server whose path differs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connect-timeout", type=float, default=FIRST_CONNECT_TIMEOUT_S, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    token = _token(args)
    devices = parse_devices(args.devices)
    cpus = sum(d.startswith("cpu") for d in devices)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, cpus))
    if args.child:
        return run_worker(args.join, token, devices[0], threads, args.connect_timeout, comfyui=args.comfyui)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:  # one process of torchrun --nproc-per-node
        rank = int(local_rank)
        device = devices[rank] if args.devices else (f"cuda:{rank}" if devices[0].startswith("cuda") else f"cpu:{rank}")
        return run_worker(args.join, token, device, threads, args.connect_timeout, reexec=True, comfyui=args.comfyui)
    return run_launcher(args.join, token, devices, threads, args.comfyui)


# -- the command: one child per device, restarted after each pool -----------------------------------
def run_launcher(address: str, token: str, devices: list[str], threads: int, comfyui: str | None = None) -> int:
    env = dict(os.environ)
    env[TOKEN_ENV] = token
    env["STADI_PARENT_PID"] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT] + [p for p in [env.get("PYTHONPATH")] if p])

    def spawn(device: str, connect_timeout: float) -> subprocess.Popen:
        child_env = dict(env)
        if device.startswith("cuda"):
            child_env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1].split(".")[0]
        cmd = [sys.executable, "-m", "stadi_core.runtime.join", "--child", "--join", address, "--devices", device,
               "--threads", str(threads), "--connect-timeout", str(connect_timeout)]
        cmd += ["--comfyui", comfyui] if comfyui else []
        return subprocess.Popen(cmd, env=child_env, stdin=subprocess.DEVNULL)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"stadi worker: joining {address} with {', '.join(devices)}", flush=True)
    children = {d: spawn(d, FIRST_CONNECT_TIMEOUT_S) for d in devices}
    code = 0
    while not stop.is_set():
        time.sleep(0.2)
        for device, proc in list(children.items()):
            rc = proc.poll()
            if rc is None:
                continue
            if rc == EXIT_REJOIN:
                children[device] = spawn(device, REJOIN_CONNECT_TIMEOUT_S)
                continue
            print(f"stadi worker: {device} exited ({_EXIT_TEXT.get(rc, f'code {rc}')}); stopping", file=sys.stderr,
                  flush=True)
            code = rc if rc > 0 else 1
            stop.set()
            break
    for proc in children.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in children.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return code


# -- one worker ------------------------------------------------------------------------------------
def _connect(host: str, port: int, timeout_s: float) -> socket.socket | None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


def _open(host: str, port: int, key: bytes, timeout_s: float, who: str) -> tuple[Connection, str]:
    """An authenticated connection to the coordinator and this side's address on it; exits on failure."""
    sock = _connect(host, port, timeout_s)
    if sock is None:
        _say(who, f"could not reach the coordinator at {host}:{port} within {timeout_s:.0f} s (is it listening "
                  "there, and is the port open?)")
        raise SystemExit(EXIT_UNREACHABLE)
    try:
        worker_handshake(sock, key, f"{host}:{port}")
    except TokenRefused as exc:
        _say(who, str(exc))
        raise SystemExit(EXIT_REFUSED) from None
    except (HandshakeError, OSError) as exc:
        _say(who, f"the token handshake with {host}:{port} failed: {exc}")
        raise SystemExit(EXIT_UNREACHABLE) from None
    local = sock.getsockname()[0]
    return Connection(sock.detach()), local


def _say(who: str, text: str) -> None:
    print(f"stadi worker {who}: {text}", file=sys.stderr, flush=True)


def _describe(device: str, threads: int) -> Join:
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(0)  # CUDA_VISIBLE_DEVICES names this device only
        name, memory = props.name, int(props.total_memory)
    else:
        name, memory = "cpu", int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Join(device=device, device_name=name, memory_bytes=memory, threads=threads if device.startswith("cpu")
                else 1, pid=os.getpid(), hostname=socket.gethostname())


class Lifeline:
    """The worker's end of its lifeline: beats both ways; silence, a closed connection or a Release ends it."""

    def __init__(self, conn: Connection, who: str, coordinator: str, timeout_s: float, reexec: bool):
        self.conn, self.who, self.coordinator = conn, who, coordinator
        self.timeout_s, self.reexec = timeout_s, reexec
        self.beats = 0
        self.lock = threading.Lock()  # the main thread's leave() and this thread's beats
        threading.Thread(target=self._run, name="stadi-lifeline", daemon=True).start()

    def _run(self) -> None:
        heard = sent = time.monotonic()
        while True:
            try:
                if self.conn.poll(0.25):
                    msg = self.conn.recv()
                    heard = time.monotonic()
                    self.beats += 1
                    if isinstance(msg, Release):
                        _say(self.who, f"released by the coordinator ({msg.reason})"
                             + ("; joining again" if msg.rejoin else "; exiting"))
                        if msg.rejoin:
                            rejoin(self.reexec)
                        os._exit(EXIT_DISMISSED)
                now = time.monotonic()
                if now - sent >= BEAT_S:
                    with self.lock:
                        self.conn.send(Beat())
                    sent = now
            except (EOFError, OSError):
                self._lost("closed the connection")
            if time.monotonic() - heard > self.timeout_s:
                self._lost(f"stopped heart-beating (nothing for {self.timeout_s:.0f} s)")

    def _lost(self, why: str) -> None:
        _say(self.who, f"the coordinator at {self.coordinator} {why}; exiting")
        os._exit(EXIT_COORDINATOR_LOST)

    def leave(self, reason: str) -> None:
        """Say we exit on purpose (the coordinator then logs no loss)."""
        try:
            with self.lock:
                self.conn.send(Release(True, reason))
        except OSError:
            pass

    def coordinator_alive(self, within_s: float = 3 * BEAT_S) -> bool:
        """True once a beat arrives within ``within_s`` (a lost coordinator ends the process instead)."""
        seen, deadline = self.beats, time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.beats > seen:
                return True
            time.sleep(0.05)
        return False


def rejoin(reexec: bool) -> None:
    """Leave this process group for good and join again: a fresh process (the launcher's respawn, or an
    exec of ourselves under torchrun, which keeps the pid torchrun watches)."""
    if reexec:
        sys.stdout.flush()
        sys.stderr.flush()
        args = sys.argv[1:]
        args = args[1:] if args[:1] == ["worker"] else args  # started as `-m stadi_core worker ...`
        os.execv(sys.executable, [sys.executable, "-m", "stadi_core.runtime.join"] + args)
    os._exit(EXIT_REJOIN)


def run_worker(address: str, token: str, device: str, threads: int, connect_timeout_s: float,
               reexec: bool = False, comfyui: str | None = None) -> int:
    from .lobby import lifeline_timeout_s

    if os.environ.get("STADI_PARENT_PID"):
        from .lifeline import tie_to_parent

        tie_to_parent(int(os.environ["STADI_PARENT_PID"]))
    if device.startswith("cuda") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1].split(".")[0]
    host, port = parse_address(address, "--join")
    key = key_of(token)
    who = device
    conn, local = _open(host, port, key, connect_timeout_s, who)
    conn.send(_describe(device, threads))
    if not conn.poll(link_probe.REPLY_TIMEOUT_S):
        _say(who, "the coordinator did not answer the join")
        return EXIT_UNREACHABLE
    reply = conn.recv()
    if isinstance(reply, JoinRefused):
        _say(who, f"the coordinator refused the join: {reply.reason}")
        return EXIT_REFUSED
    if not isinstance(reply, Welcome):
        _say(who, f"unexpected answer to the join: {type(reply).__name__}")
        return EXIT_UNREACHABLE
    who = reply.name
    link = link_probe.answer(conn, link_probe.REPLY_TIMEOUT_S)
    lifeline_conn, _ = _open(host, port, key, REJOIN_CONNECT_TIMEOUT_S, who)
    lifeline_conn.send(LifelineHello(reply.join_id))
    lifeline = Lifeline(lifeline_conn, who, address, lifeline_timeout_s(), reexec)
    print(f"stadi worker {who}: joined {address} (pid {os.getpid()}); link {link.describe()}", flush=True)
    os.environ.update(interface_env(local))  # gloo / NCCL: the interface that reaches the coordinator
    try:
        init = conn.recv()  # waits in the lobby until a pool claims us; the lifeline ends us if the coordinator goes
    except (EOFError, OSError):
        init = None
    if isinstance(init, WorkerInit):
        _serve(init, conn, comfyui)
    lifeline.coordinator_alive()  # a coordinator that went away ends us here (exit 4), before a pointless rejoin
    lifeline.leave("its pool ended; joining again")
    rejoin(reexec)
    return EXIT_REJOIN


class RelayChannel(Channel):
    """worker.py's Channel that also stores the shared files the coordinator copies here (relay.py)."""

    def __init__(self, conn):
        super().__init__(conn)
        self.store = FileStore()

    def recv(self):
        while True:
            msg = super().recv()
            if not isinstance(msg, FileChunk):
                return msg
            stored = self.store.take(msg)
            if stored is not None:
                self.send(stored)


def _serve(init: WorkerInit, conn: Connection, comfyui: str | None = None) -> None:
    import traceback

    from .worker import _Worker

    paths = [comfyui] if comfyui else init.extra_sys_path  # e.g. the ComfyUI checkout, as on the coordinator
    for path in paths:
        if not os.path.isdir(path):
            _say(init.device, f"{path} (the coordinator's ComfyUI, needed by its model) is not here: give this "
                              "machine's ComfyUI checkout with --comfyui PATH")
        elif path not in sys.path:
            sys.path.insert(0, path)
    channel = RelayChannel(conn)
    try:
        worker = _Worker(init, channel)
    except BaseException as exc:  # report start-up failures instead of dying silently (as worker.main)
        channel.send(WorkerFailure(None, init.rank, f"worker {init.rank} ({init.device}) failed to start: {exc}",
                                   traceback.format_exc()))
        return
    worker.serve()


if __name__ == "__main__":
    sys.exit(main())
