"""The token handshake, the lobby's door and the copy of shared files to remote workers, on 127.0.0.1:
real sockets and real threads, no second host needed (tests/test_remote_join.py has that)."""

import logging
import socket
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import pytest
import torch

from stadi_core.runtime import relay
from stadi_core.runtime.handshake import (HandshakeError, TokenRefused, coordinator_handshake, key_of,
                                          worker_handshake)
from stadi_core.runtime.lobby import Lobby
from stadi_core.runtime.messages import FileChunk, Join, Welcome
from stadi_core.runtime.shared_memory import SharedHandle, open_tensors, share_tensors

TOKEN = "s3cret-token-value"


def _tapped_pair():
    """(coordinator end, worker end, bytes seen on the wire): a relay thread copies and records both ways."""
    c_sock, c_tap = socket.socketpair()
    w_sock, w_tap = socket.socketpair()
    seen = bytearray()

    def pump(src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                dst.close()
                return
            seen.extend(data)
            dst.sendall(data)

    for a, b in ((c_tap, w_tap), (w_tap, c_tap)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
    return c_sock, w_sock, seen


def _run(coord_token, worker_token):
    c, w, seen = _tapped_pair()
    out = {}

    def coordinator():
        try:
            coordinator_handshake(c, key_of(coord_token), "worker", timeout_s=5)
            out["c"] = "ok"
        except HandshakeError as exc:
            out["c"] = exc

    t = threading.Thread(target=coordinator)
    t.start()
    try:
        worker_handshake(w, key_of(worker_token), "coordinator", timeout_s=5)
        out["w"] = "ok"
    except HandshakeError as exc:
        out["w"] = exc
    t.join(10)
    return out, bytes(seen)


def test_both_sides_prove_the_token_and_it_never_crosses_the_wire():
    out, seen = _run(TOKEN, TOKEN)
    assert out == {"c": "ok", "w": "ok"}
    assert TOKEN.encode() not in seen and key_of(TOKEN) not in seen
    assert len(seen) == 40 + 72 + 34 + 2  # the four fixed-size steps and nothing else


def test_a_wrong_token_is_refused_on_both_sides():
    out, _ = _run(TOKEN, "wrong")
    assert isinstance(out["c"], TokenRefused) and "does not know this coordinator's token" in str(out["c"])
    assert isinstance(out["w"], TokenRefused) and "wrong token" in str(out["w"])


def test_a_silent_peer_times_out():
    c, w = socket.socketpair()
    t0 = time.monotonic()
    with pytest.raises(HandshakeError, match="went silent"):
        coordinator_handshake(c, key_of(TOKEN), "a silent peer", timeout_s=0.5)
    assert time.monotonic() - t0 < 3
    w.close()


def test_a_silent_connection_does_not_block_the_lobby_door(caplog):
    lobby = Lobby("127.0.0.1:0", TOKEN)
    try:
        squatter = socket.create_connection(("127.0.0.1", lobby.port))  # connects, never speaks
        sock = socket.create_connection(("127.0.0.1", lobby.port), timeout=5)
        t0 = time.monotonic()
        worker_handshake(sock, key_of(TOKEN), "lobby", timeout_s=5)
        assert time.monotonic() - t0 < 2, "the handshake waited for the silent connection"
        conn = Connection(sock.detach())
        conn.send(Join("cpu:0", "cpu", 1 << 30, 1, 123, "test-host"))
        assert conn.poll(5) and isinstance(conn.recv(), Welcome)
        squatter.close()
        bad = socket.create_connection(("127.0.0.1", lobby.port), timeout=5)
        with caplog.at_level(logging.WARNING, logger="stadi"):
            with pytest.raises(TokenRefused):
                worker_handshake(bad, key_of("wrong"), "lobby", timeout_s=5)
            deadline = time.monotonic() + 5
            while "refused the worker at 127.0.0.1" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "refused the worker at 127.0.0.1" in caplog.text
        conn.close()
    finally:
        lobby.close()


def test_shared_files_are_copied_to_a_remote_worker_once():
    tensors = {"w": torch.arange(3 * 1000, dtype=torch.float16).view(3, 1000), "b": torch.ones(7)}
    shared, handle = share_tensors(tensors, adopt=False, label="test")
    coord, worker = Pipe()
    store = relay.FileStore()
    sent = []

    def write(msg):  # what the pool's _write does; the worker answers as RelayChannel.recv would
        sent.append(msg)
        coord.send(msg)
        while worker.poll(0):
            stored = store.take(worker.recv())
            if stored is not None:
                worker.send(stored)

    files = {}
    msg = {"model": {"extra": {"shared_weights": handle.to_dict()}}}
    out = relay.localize(msg, files, write, coord)
    local = out["model"]["extra"]["shared_weights"]
    assert msg["model"]["extra"]["shared_weights"]["fd"] == handle.fd  # the caller's message is untouched
    assert local["fd"] != handle.fd and local["tag"] == handle.tag
    opened = open_tensors(SharedHandle.from_dict(local))
    assert all(torch.equal(opened[k], tensors[k]) for k in tensors)
    assert all(isinstance(m, FileChunk) for m in sent)
    again = relay.localize(msg, files, write, coord)  # already there: nothing is sent again
    assert len(sent) == 1 and again["model"]["extra"]["shared_weights"]["fd"] == local["fd"]
    shared.close()
