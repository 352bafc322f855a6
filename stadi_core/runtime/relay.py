"""Shared memory files for workers on other machines.

Local workers map the server's memory files (weights, weight patches, a VAE: shared_memory.py) through
``/proc/<pid>/fd/<n>``; a worker on another machine cannot. Before a message that names such a file
goes to a remote worker, the coordinator copies the file to it (``FileChunk`` messages over its control
connection, 16 MB each) once per worker process; the worker writes it into a memory file of its own,
answers ``FileStored`` with its pid and descriptor, and the message's handle is rewritten to point
there. Everything else about the file (size, tag, tensor layout) stays, so the worker opens it exactly
as a local one opens the server's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

from ..errors import WorkerTimeout
from .messages import FileChunk, FileStored, Heartbeat

CHUNK = 16 << 20
_HANDLE_KEYS = frozenset({"pid", "fd", "size", "tag", "entries"})


def _handles(obj, out: list) -> list:
    """Every shared-memory handle dict inside ``obj`` (dataclasses, dicts, lists), in order."""
    if isinstance(obj, dict):
        if _HANDLE_KEYS <= obj.keys():
            out.append(obj)
        else:
            for v in obj.values():
                _handles(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _handles(v, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _handles(getattr(obj, f.name), out)
    return out


def _read(handle: dict) -> bytes:
    """The bytes of one of this process's shared files."""
    if handle.get("name"):
        from multiprocessing import shared_memory

        segment = shared_memory.SharedMemory(name=handle["name"])
        try:
            return bytes(segment.buf[:handle["size"]])
        finally:
            segment.close()
    with open(f"/proc/{handle['pid']}/fd/{handle['fd']}", "rb") as f:
        return f.read(handle["size"])


def localize(msg, files: dict, write, conn, timeout_s: float = 600.0):
    """``msg`` with its shared-file handles pointing at copies on the remote worker, copying the files it
    does not hold yet. ``files``: tag -> (pid, fd) already there (kept per worker process); ``write``
    sends one message on the worker's connection; ``conn`` is read for the answers (no one else reads it
    while a job is being sent)."""
    if not _handles(msg, []):
        return msg
    msg = copy.deepcopy(msg)
    for handle in _handles(msg, []):
        tag = handle["tag"]
        if tag not in files:
            data = _read(handle)
            for offset in range(0, max(len(data), 1), CHUNK):
                write(FileChunk(tag, offset, len(data), data[offset:offset + CHUNK]))
            files[tag] = _stored(conn, tag, timeout_s)
        handle["pid"], handle["fd"] = files[tag]
        handle["name"] = ""
    return msg


def _stored(conn, tag: str, timeout_s: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            reply = conn.recv()
            if isinstance(reply, FileStored) and reply.tag == tag:
                return reply.pid, reply.fd
            if not isinstance(reply, Heartbeat):
                raise WorkerTimeout(f"a remote worker answered a file copy with {type(reply).__name__}")
    raise WorkerTimeout(f"a remote worker did not store a shared file within {timeout_s:.0f} s")


class FileStore:
    """The remote worker's side: memory files assembled from FileChunks, kept for the process's life."""

    def __init__(self):
        self.fds: dict[str, int] = {}

    def take(self, chunk: FileChunk) -> FileStored | None:
        fd = self.fds.get(chunk.tag)
        if fd is None:
            fd = self.fds[chunk.tag] = os.memfd_create(f"stadi-remote-{chunk.tag[:8]}")
            os.ftruncate(fd, chunk.size)
        os.pwrite(fd, chunk.data, chunk.offset)
        if chunk.offset + len(chunk.data) >= chunk.size:
            return FileStored(chunk.tag, os.getpid(), fd)
        return None
