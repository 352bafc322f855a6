"""Tensors and blobs the server shares with workers on its host through anonymous memory files.

The server packs a set of named tensors (a diffusion network's weights, a VAE's) into one
``memfd`` — memory with no name in ``/dev/shm`` or the temp dir, freed by the kernel once the
last process holding it exits, whatever way it exits — and, with ``adopt=True``, points the
source tensors at their copies there, so the server's own weights *are* the shared pages and
host memory holds one copy. A worker on the same host opens the server's descriptor through
``/proc/<pid>/fd/<n>`` and maps it copy-on-write: its tensors read the server's pages, nothing is
copied and nothing crosses the control socket but a small :class:`SharedHandle`.

Blobs (pickled weight patches such as a LoRA) travel the same way: a LoRA change maps megabytes,
not the model.

Where there is no memfd (Windows, macOS) or ``STADI_SHARED_MEMORY=named``, a named segment of
``multiprocessing.shared_memory`` takes its place: Windows frees it with its last handle, and on POSIX
the server's resource tracker (a process of its own) unlinks it even after a SIGKILL. Workers map it
read-write there, and never write to weights.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from dataclasses import dataclass

import torch

_ALIGN = 64  # every tensor starts on a cache line (and on any element size)
_TAG_BYTES = 16  # a random tag at offset 0: a reused descriptor number is never mistaken for ours


class SharedMemoryError(RuntimeError):
    """A worker could not map what the server shared (the server is gone, or another host)."""


def available() -> bool:
    """Whether anonymous memory files work here (else the named fallback is used)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") and \
        os.environ.get("STADI_SHARED_MEMORY", "auto") != "named"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "float16", "float8_e4m3fn"
    shape: tuple
    offset: int  # bytes from the start of the memory file


@dataclass(frozen=True)
class SharedHandle:
    """Where a process on the server's host finds a shared memory file (crosses process boundaries)."""

    pid: int
    fd: int
    size: int
    tag: str  # hex of the first _TAG_BYTES bytes
    entries: tuple = ()  # TensorEntry per tensor; empty for a blob
    blob_size: int = 0  # bytes of the blob after the tag, for a blob
    name: str = ""  # a named segment (the fallback without memfd); "" for a memory file

    def to_dict(self) -> dict:
        return {"pid": self.pid, "fd": self.fd, "size": self.size, "tag": self.tag, "blob_size": self.blob_size,
                "name": self.name, "entries": [[e.name, e.dtype, list(e.shape), e.offset] for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "SharedHandle":
        entries = tuple(TensorEntry(n, dt, tuple(shape), off) for n, dt, shape, off in d.get("entries", ()))
        return cls(pid=d["pid"], fd=d["fd"], size=d["size"], tag=d["tag"], entries=entries,
                   blob_size=d.get("blob_size", 0), name=d.get("name", ""))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SharedMemoryError(f"unknown dtype {name!r} in shared weights")
    return dtype


def _view(buffer, entry: TensorEntry) -> torch.Tensor:
    dtype = _dtype(entry.dtype)
    count = 1
    for n in entry.shape:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=entry.offset) if nbytes else \
        torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).view(entry.shape)


class SharedFile:
    """The server's side of one memory file: kept open while workers may still map it."""

    def __init__(self, size: int, label: str):
        self.size = max(size, _TAG_BYTES)
        self.fd, self.name, self._segment = -1, "", None
        if available():
            self.fd = os.memfd_create(f"stadi-{label}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        else:
            from multiprocessing import shared_memory

            self._segment = shared_memory.SharedMemory(create=True, size=self.size)
            self.name, self.map = self._segment.name, self._segment.buf
        self.tag = secrets.token_bytes(_TAG_BYTES)
        self.map[:_TAG_BYTES] = self.tag
        self._lock = threading.Lock()
        self.closed = False

    def handle(self, entries: tuple = (), blob_size: int = 0) -> SharedHandle:
        return SharedHandle(pid=os.getpid(), fd=self.fd, size=self.size, tag=self.tag.hex(), entries=entries,
                            blob_size=blob_size, name=self.name)

    def close(self) -> None:
        """Stop offering the file to new workers (mappings, ours included, stay valid)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._segment is None:
                os.close(self.fd)
            elif os.name == "posix":  # the name goes; Windows frees a segment with its last handle
                self._segment.unlink()


def layout(tensors: dict[str, torch.Tensor]) -> tuple[tuple, int]:
    """(entries, total bytes): each tensor at the next aligned offset after the tag."""
    entries, offset = [], _ALIGN
    for name, t in tensors.items():
        entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return tuple(entries), offset


def share_tensors(tensors: dict[str, torch.Tensor], *, adopt: bool, label: str) -> tuple[SharedFile, SharedHandle]:
    """Copy ``tensors`` into one memory file; with ``adopt``, repoint every CPU source tensor at its copy.

    Adopting swaps the storage under the caller's own tensor objects (``t.data = view``), one tensor
    at a time, so peak host memory grows by one tensor, not by the whole set, and every holder of
    those objects (a ComfyUI model) keeps working on the shared pages.
    """
    entries, size = layout(tensors)
    shared = SharedFile(size, label)
    for entry, t in zip(entries, tensors.values()):
        view = _view(shared.map, entry)
        view.copy_(t.detach())
        if adopt and t.device.type == "cpu" and not t.is_meta:
            t.data = view
    return shared, shared.handle(entries)


def share_blob(data: bytes, *, label: str) -> tuple[SharedFile, SharedHandle]:
    shared = SharedFile(_TAG_BYTES + len(data), label)
    shared.map[_TAG_BYTES:_TAG_BYTES + len(data)] = data
    return shared, shared.handle(blob_size=len(data))


def _open_named(handle: SharedHandle):
    """A named segment (the fallback), not handed to this process's resource tracker: the server owns it."""
    from multiprocessing import shared_memory

    try:
        segment = shared_memory.SharedMemory(name=handle.name)
    except OSError as exc:
        raise SharedMemoryError(f"cannot open the server's shared weights {handle.name!r} ({exc}): workers must run on "
                                "the server's host while the server runs") from exc
    if os.name == "posix":
        from multiprocessing import resource_tracker

        resource_tracker.unregister(segment._name, "shared_memory")  # else our exit would unlink the server's
    if bytes(segment.buf[:_TAG_BYTES]).hex() != handle.tag:
        segment.close()
        raise SharedMemoryError(f"{handle.name} is not the server's shared weights (tag differs)")
    return segment


def _map(handle: SharedHandle) -> mmap.mmap:
    """The server's memory file, mapped copy-on-write (its pages are shared until someone writes)."""
    path = f"/proc/{handle.pid}/fd/{handle.fd}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SharedMemoryError(f"cannot open the server's shared weights at {path} ({exc.strerror}): workers must "
                                "run on the server's host, as the same user, while the server runs") from exc
    try:
        if os.fstat(fd).st_size != handle.size:
            raise SharedMemoryError(f"{path} is not the server's shared weights (size differs)")
        mapped = mmap.mmap(fd, handle.size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if mapped[:_TAG_BYTES].hex() != handle.tag:
        raise SharedMemoryError(f"{path} is not the server's shared weights (tag differs): the server closed it")
    return mapped


_SEGMENTS: dict[str, object] = {}  # the named segment this process's tensors use (one model at a time)


def open_tensors(handle: SharedHandle) -> dict[str, torch.Tensor]:
    """Name -> tensor over the server's pages (read them freely; a write copies that page only)."""
    if handle.name:
        if handle.name not in _SEGMENTS:
            segment = _open_named(handle)
            _SEGMENTS.clear()  # the previous model's segment goes with its tensors
            _SEGMENTS[handle.name] = segment  # its buffer must outlive the tensors over it
        return {e.name: _view(_SEGMENTS[handle.name].buf, e) for e in handle.entries}
    mapped = _map(handle)
    return {e.name: _view(mapped, e) for e in handle.entries}


def open_blob(handle: SharedHandle) -> bytes:
    if handle.name:
        segment = _open_named(handle)
        try:
            return bytes(segment.buf[_TAG_BYTES:_TAG_BYTES + handle.blob_size])
        finally:
            segment.close()
    mapped = _map(handle)
    try:
        return mapped[_TAG_BYTES:_TAG_BYTES + handle.blob_size]
    finally:
        mapped.close()
