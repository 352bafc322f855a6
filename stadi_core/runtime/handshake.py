"""The token handshake of remote workers, and which network interface carries a connection.

Both sides prove they know the token without sending it (DESIGN §6): a mutual HMAC-SHA256
challenge over fresh nonces, each step with a deadline::

    coordinator -> worker   MAGIC, nonce_c                                   (40 bytes)
    worker -> coordinator   MAGIC, nonce_w, HMAC(key, "worker" | nonce_c | nonce_w)   (72)
    coordinator -> worker   "OK" + HMAC(key, "coordinator" | nonce_w | nonce_c), or "NO" + zeros
    worker -> coordinator   "OK", or "NO" when the coordinator's proof was wrong

``key`` is SHA-256 of the token with a domain prefix. Only after this does either side unpickle
anything, so a peer without the token never reaches pickle.

Why not multiprocessing's ``Listener(authkey=...)``: it does a mutual HMAC challenge too, and with
the token-derived key it would prove the same thing (HMAC-MD5 on Python 3.11, SHA-256 from 3.12).
But its ``accept()`` runs the challenge with blocking reads and no deadline, so one silent TCP
connection (a port scanner, a stuck peer) would hold the accept loop for ever, and a failure
surfaces as a bare ``AuthenticationError`` on one side. This module does the same exchange with a
timeout on every read and says on both sides what went wrong. (Local children keep multiprocessing's
authkey: their listener is private to one pool and only they know its random key.)

What the handshake does NOT give: the messages after it are neither encrypted nor signed, and the
torch.distributed store and gloo/NCCL ports are unauthenticated, as in any torch.distributed job.
Run remote workers on a network you trust (a LAN, a VPN, an SSH tunnel), with the port firewalled.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct

from ..errors import WorkerError

MAGIC = b"STADIJ01"  # protocol and version: a mismatch says "not a STADI peer / other version"
NONCE = 32
MAC = 32
HANDSHAKE_TIMEOUT_S = 10.0
TOKEN_ENV = "STADI_TOKEN"


class HandshakeError(WorkerError):
    """The peer is not a STADI peer of this version, or went silent during the handshake."""


class TokenRefused(HandshakeError):
    """The other side does not know the token (or does not accept ours)."""


def key_of(token: str) -> bytes:
    return hashlib.sha256(b"stadi-join-v1\0" + token.encode()).digest()


def _mac(key: bytes, who: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, who + a + b, hashlib.sha256).digest()


def _read(sock: socket.socket, n: int, peer: str) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except socket.timeout:
            raise HandshakeError(f"{peer} went silent during the token handshake "
                                 f"({HANDSHAKE_TIMEOUT_S:.0f} s)") from None
        if not chunk:
            raise HandshakeError(f"{peer} closed the connection during the token handshake")
        data += chunk
    return data


def coordinator_handshake(sock: socket.socket, key: bytes, peer: str,
                          timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """The coordinator's side; raises TokenRefused or HandshakeError (the caller logs and closes)."""
    sock.settimeout(timeout_s)
    nonce_c = secrets.token_bytes(NONCE)
    sock.sendall(MAGIC + nonce_c)
    reply = _read(sock, len(MAGIC) + NONCE + MAC, peer)
    if reply[:len(MAGIC)] != MAGIC:
        raise HandshakeError(f"{peer} is not a STADI worker of this version (it sent {reply[:8]!r})")
    nonce_w, proof = reply[len(MAGIC):len(MAGIC) + NONCE], reply[len(MAGIC) + NONCE:]
    if not hmac.compare_digest(proof, _mac(key, b"worker", nonce_c, nonce_w)):
        sock.sendall(b"NO" + bytes(MAC))
        raise TokenRefused(f"refused the worker at {peer}: it does not know this coordinator's token "
                           "(give both sides the same --token / STADI_TOKEN)")
    sock.sendall(b"OK" + _mac(key, b"coordinator", nonce_w, nonce_c))
    if _read(sock, 2, peer) != b"OK":
        raise TokenRefused(f"the worker at {peer} did not accept this coordinator's proof of the token")
    sock.settimeout(None)


def worker_handshake(sock: socket.socket, key: bytes, peer: str, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """The worker's side; raises TokenRefused or HandshakeError."""
    sock.settimeout(timeout_s)
    hello = _read(sock, len(MAGIC) + NONCE, peer)
    if hello[:len(MAGIC)] != MAGIC:
        raise HandshakeError(f"{peer} is not a STADI coordinator of this version (it sent {hello[:8]!r})")
    nonce_c = hello[len(MAGIC):]
    nonce_w = secrets.token_bytes(NONCE)
    sock.sendall(MAGIC + nonce_w + _mac(key, b"worker", nonce_c, nonce_w))
    answer = _read(sock, 2 + MAC, peer)
    if answer[:2] != b"OK":
        raise TokenRefused(f"the coordinator at {peer} refused this worker: wrong token "
                           "(give both sides the same --token / STADI_TOKEN)")
    if not hmac.compare_digest(answer[2:], _mac(key, b"coordinator", nonce_w, nonce_c)):
        sock.sendall(b"NO")
        raise TokenRefused(f"{peer} answered the challenge without knowing the token: it is not the coordinator "
                           "this worker was told to join")
    sock.sendall(b"OK")
    sock.settimeout(None)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def parse_address(text: str, what: str, any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT; port 0 (any free port) only where ``any_port`` (a listen address)."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise WorkerError(f"{what} {text!r}: give HOST:PORT, e.g. 192.168.1.10:29600")
    return host.strip("[]"), int(port)


def interface_of(address: str) -> str | None:
    """The name of the local network interface that has IPv4 ``address`` (Linux), else None.

    gloo and NCCL pick their interface from the hostname unless told; across machines (or network
    namespaces) that can be an address the peers cannot reach, so a worker names the interface its
    connection to the coordinator uses (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``)."""
    try:
        packed = socket.inet_aton(address)
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if raw[20:24] == packed:
                return name
    return None


def interface_env(local_address: str) -> dict[str, str]:
    """Environment that makes gloo and NCCL use the interface of ``local_address`` (empty for loopback,
    unknown interfaces, or when the user already chose one)."""
    if is_loopback(local_address):
        return {}
    name = interface_of(local_address)
    if name is None:
        return {}
    return {k: name for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if not os.environ.get(k)}
