"""A shared-memory ring that carries batch pixels from an ingest server to a Loader on one host.

When a training process and its ingest server share ``/dev/shm`` (a pod and
its sidecar, or one machine), copying pixels through a socket and two
protobuf codecs is wasted work. Instead:

1. The Loader creates a ring file, ``/dev/shm/gristmill-ring-<random>``,
   reserves its memory up front (so a full ``/dev/shm`` is a clear error,
   not a SIGBUS later), holds an ``flock`` on it, and names it in
   ``StreamBatchesRequest.ring``.
2. The server opens the file and unlinks its name at once. From then on the
   memory lives exactly as long as one side holds it open: a SIGKILL of
   either process leaves no ``/dev/shm`` entry and no mapping behind.
3. The server writes each batch as one contiguous record and sends only a
   :class:`~gristmill.v1.ingest_pb2.RingSlice` (offset, length, release)
   over gRPC. The Loader copies the record into its batch array and writes
   ``release`` into the ring's read counter; the server reuses the space
   only after that, waiting otherwise, so the ring is also the stream's
   back-pressure.

The server never maps the ring: the file belongs to the client, and a client
that truncates a mapped file would kill the server with SIGBUS on its next
write. It writes with ``pwritev`` and reads the counter with ``pread`` on its
descriptor, checks before each record that the file still has its size and
its reserved memory, and turns a short read or a failed write into
FAILED_PRECONDITION (reason ``SHM_RING_BROKEN``) for that stream alone.

A ring whose creator died before any server opened it (the only window in
which a name can outlive its owner) is unlocked; :func:`sweep` removes such
names when the next ring is created.

File layout: a 4096-byte header (``MAGIC``, then the data capacity and the
read counter as little-endian uint64 at bytes 8 and 16, then the ring's
16-byte random token at byte 24) and the data area.

The token is what proves a request's right to the ring: a request names the
ring and carries its token, and the server writes only into a ring whose
header holds that token. A client that can learn a ring's name (by listing
``/dev/shm``) but cannot read the file cannot make the server write into it.
A server also holds an exclusive lock on byte 64 of the header (an
open-file-description lock) while it writes into a ring that serves many
calls in turn, so that two calls never write into one ring at once (a call
gRPC retried while its first attempt still runs).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gristmill.client.errors import FailedPrecondition, Internal, InvalidArgument

__all__ = [
    "DEFAULT_DIR",
    "RING_BROKEN",
    "RING_BUSY",
    "RING_UNAVAILABLE",
    "RingClosed",
    "RingReader",
    "RingWriter",
    "ring_dir",
    "sweep",
    "unavailable",
]

log = logging.getLogger(__name__)

#: Where rings live unless ``GRISTMILL_SHM_DIR`` (client) or ``ingest.shm_dir``
#: (server) says otherwise.
DEFAULT_DIR = Path("/dev/shm")
#: ErrorInfo reason when the server cannot use the ring a request named.
RING_UNAVAILABLE = "SHM_RING_UNAVAILABLE"
#: ErrorInfo reason when a ring became unusable mid-stream (the client truncated,
#: shrank or closed it).
RING_BROKEN = "SHM_RING_BROKEN"
#: ErrorInfo reason when another call still writes into the ring a request named.
RING_BUSY = "SHM_RING_BUSY"
MAGIC = b"GMRING01"
HEADER = 4096
_CAPACITY_AT = 8
_READ_AT = 16
_TOKEN_AT = 24
TOKEN_BYTES = 16
_LOCK_AT = 64
#: Records start on cache-line boundaries.
ALIGN = 64
PREFIX = "gristmill-ring-"
NAME = re.compile(PREFIX + r"[A-Za-z0-9_-]{1,64}")
#: Seconds an unlocked ring must have existed before :func:`sweep` removes it
#: (a ring is locked microseconds after it is created).
STALE_AFTER = 30.0
#: Buffers per pwritev call (the kernel's IOV_MAX).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class RingClosed(Exception):
    """The stream ended while the server waited for space in the ring."""


def ring_dir() -> Path:
    """The client's ring directory: ``GRISTMILL_SHM_DIR`` or /dev/shm."""
    return Path(os.environ.get("GRISTMILL_SHM_DIR") or DEFAULT_DIR)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def unavailable(message: str) -> FailedPrecondition:
    """The error a server answers when it cannot use a request's ring."""
    return FailedPrecondition(message, reason=RING_UNAVAILABLE)


def sweep(directory: Path) -> int:
    """Remove rings whose creator died before a server opened them; the number removed."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not NAME.fullmatch(entry.name):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: its creator is alive
        else:
            try:
                os.unlink(entry.path)
                removed += 1
                log.info("removed stale shared-memory ring %s", entry.path)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


class RingReader:
    """The Loader's side of a ring: creates it, reads records, releases them.

    Use :meth:`create`; :meth:`close` when the stream is over.
    """

    def __init__(self, path: Path | None, fd: int, mapping: mmap.mmap, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        #: the random token in the ring's header; requests carry it (``ring.token``)
        self.token = bytes(mapping[_TOKEN_AT:_TOKEN_AT + TOKEN_BYTES])
        self._fd = fd
        self._mmap = mapping
        self._data: npt.NDArray[np.uint8] | None = np.frombuffer(mapping, np.uint8)[HEADER:]
        self._named = path is not None

    @property
    def name(self) -> str:
        """The file name the server opens ("" for a private ring)."""
        return self.path.name if self.path is not None else ""

    @classmethod
    def private(cls, capacity: int) -> RingReader:
        """A ring with no name, for a writer in this process (:meth:`local_writer`)."""
        capacity = _aligned(max(capacity, ALIGN))
        fd = os.memfd_create("gristmill-ring", os.MFD_CLOEXEC)
        try:
            return cls(None, fd, _map_new(fd, capacity, None), capacity)
        except BaseException:
            os.close(fd)
            raise

    def local_writer(self) -> RingWriter:
        """A writer of this ring in this process (``Loader.from_folder``)."""
        return RingWriter(os.dup(self._fd), self.capacity, "(private ring)")

    @classmethod
    def create(cls, capacity: int, directory: Path | None = None) -> RingReader:
        """A new ring of ``capacity`` data bytes, its memory reserved.

        Raises:
            FailedPrecondition: (reason ``SHM_RING_UNAVAILABLE``) the directory
                is missing or has too little space.
        """
        directory = directory or ring_dir()
        capacity = _aligned(max(capacity, ALIGN))
        sweep(directory)
        path = directory / (PREFIX + secrets.token_hex(12))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise unavailable(f"cannot create a shared-memory ring in {directory}: "
                              f"{e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the server may run as another user of the same group (a sidecar)
            os.fchmod(fd, 0o660)
            mapping = _map_new(fd, capacity, directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd, mapping, capacity)

    def attached(self) -> None:
        """The server has mapped the ring (its first message came): drop the name."""
        if self._named and self.path is not None:
            self._named = False
            self.path.unlink(missing_ok=True)

    def view(self, offset: int, length: int) -> npt.NDArray[np.uint8]:
        """The ``length`` bytes at ``offset`` (valid until :meth:`release` of their record)."""
        if self._data is None:
            raise Internal("the shared-memory ring is closed")
        if offset + length > self.capacity:
            raise Internal(f"ring slice {offset}+{length} lies outside the ring "
                           f"({self.capacity} bytes)")
        return self._data[offset:offset + length]

    def release(self, end: int) -> None:
        """Let the server reuse the ring up to ``end`` (a RingSlice's release)."""
        struct.pack_into("<Q", self._mmap, _READ_AT, end)

    def close(self) -> None:
        """Unmap the ring and remove its name if the server never did."""
        if self._data is None:
            return
        self._data = None
        self.attached()
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive: unmapped when it is collected
            pass
        os.close(self._fd)


class RingWriter:
    """The server's side of a ring: opens it by name, writes records in order.

    Writes go through the file descriptor (``pwritev``), never a mapping, and
    only inside the ring's data area; see the module notes.
    """

    def __init__(self, fd: int, capacity: int, name: str) -> None:
        self.capacity = capacity
        self.name = name
        self._fd: int | None = fd
        self._size = HEADER + capacity
        self._written = 0

    @classmethod
    def open(cls, directory: Path | None, name: str, capacity: int, *,
             token: bytes | None = None,
             keep_name: bool = False, setting: str = "ingest.shm_dir",
             lock_wait: float | None = None,
             is_active: Callable[[], bool] = lambda: True) -> RingWriter:
        """Open the ring ``name`` in ``directory`` and unlink its name (unless ``keep_name``).

        ``token`` must be the one in the ring's header (None: not checked,
        for a ring of this process; empty: refused, a client from before tokens).
        ``keep_name`` is for a ring that serves many calls in turn (GetKeys):
        its client removes the name when it closes. ``lock_wait`` (seconds):
        take the ring's writer lock, waiting at most that long for another
        call's writer to finish (FAILED_PRECONDITION, reason
        ``SHM_RING_BUSY``, after that; RingClosed once ``is_active`` turns
        false). ``setting`` names the server setting that turns shared memory
        on, for the error message.

        Raises:
            InvalidArgument: the name is not a ring name.
            FailedPrecondition: (reason ``SHM_RING_UNAVAILABLE``) shared memory
                is off (``directory`` None), or the ring is not there or not
                usable.
        """
        if not NAME.fullmatch(name):
            raise InvalidArgument("ring.name", f"{name!r} is not a ring name "
                                  f"({PREFIX}<letters, digits, - or _>)")
        if capacity < ALIGN or capacity % ALIGN:
            raise InvalidArgument("ring.capacity", f"must be a positive multiple of {ALIGN}, "
                                  f"got {capacity}")
        if token is not None and len(token) != TOKEN_BYTES:
            if not token:  # a client from before tokens: it streams over gRPC then
                raise unavailable("the request names a ring without its token (ring.token); "
                                  "update the client, or stream without a ring")
            raise InvalidArgument("ring.token", f"must be {TOKEN_BYTES} bytes (the ring's own), "
                                  f"got {len(token)}")
        if directory is None:
            raise unavailable(f"this server does not use shared memory ({setting} is "
                              "not set); stream without a ring")
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise unavailable(f"no ring {name} in {directory}: the client is on another host "
                              "or uses another shared-memory directory; stream without a "
                              "ring") from None
        except OSError as e:
            raise unavailable(f"cannot open ring {path}: {e.strerror} (run client and server "
                              "as the same user or group)") from e
        try:
            st = os.fstat(fd)
            size = HEADER + capacity
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise unavailable(f"ring {path} is {st.st_size} bytes, the request says "
                                  f"{size}")
            if st.st_blocks * 512 < size:
                raise unavailable(f"ring {path} has no memory reserved (a sparse file): "
                                  "create rings with RingReader.create")
            header = os.pread(fd, _TOKEN_AT + TOKEN_BYTES, 0)
            if header[:len(MAGIC)] != MAGIC or len(header) < _TOKEN_AT + TOKEN_BYTES or \
                    struct.unpack_from("<Q", header, _CAPACITY_AT)[0] != capacity:
                raise unavailable(f"{path} is not a gristmill ring of {capacity} bytes")
            if token is not None and not secrets.compare_digest(header[_TOKEN_AT:], token):
                raise unavailable(f"ring {name} is not the ring of this request (its token "
                                  "differs): name a ring this client created")
            if lock_wait is not None:
                _lock_writer(fd, name, lock_wait, is_active)
        except BaseException:
            os.close(fd)
            raise
        if not keep_name:
            try:
                path.unlink()
            except OSError:
                pass  # another user's file in a sticky directory: the client unlinks it
        return cls(fd, capacity, name)

    def fits(self, length: int) -> bool:
        """Whether a record of ``length`` bytes can ever be written."""
        return _aligned(length) <= self.capacity

    def _broken(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"shared-memory ring {self.name} was truncated, shrunk or closed by the client "
            f"while the server streamed into it ({what}); this stream ends here: keep the "
            "ring intact until the stream is over, or stream without a ring",
            reason=RING_BROKEN)

    def _released(self, fd: int) -> int:
        try:
            raw = os.pread(fd, 8, _READ_AT)
        except OSError as e:
            raise self._broken(f"reading its read counter: {e.strerror}") from None
        if len(raw) < 8:
            raise self._broken(f"the file ends at byte {_READ_AT + len(raw)}, inside its "
                               "header")
        return int.from_bytes(raw, "little")

    def write(self, parts: Sequence[bytes | memoryview | npt.NDArray[np.uint8]],
              is_active: Callable[[], bool]) -> tuple[int, int, int]:
        """Write ``parts`` as one record, waiting for space; (offset, length, release).

        Raises:
            RingClosed: ``is_active`` turned false while waiting.
            FailedPrecondition: (reason ``SHM_RING_BROKEN``) the client
                truncated or shrank the ring, or writing to it failed.
        """
        fd = self._fd
        if fd is None:
            raise RingClosed("the ring is closed")
        views = [memoryview(np.ascontiguousarray(p).reshape(-1))  # type: ignore[arg-type]
                 if isinstance(p, np.ndarray) else memoryview(p) for p in parts]
        length = sum(v.nbytes for v in views)
        if not self.fits(length):
            raise ValueError(f"a record of {length} bytes does not fit a ring of "
                             f"{self.capacity}; check fits() first")
        start = self._written
        offset = start % self.capacity
        if offset + length > self.capacity:  # records never wrap: start over at 0
            start += self.capacity - offset
            offset = 0
        end = start + _aligned(length)
        # the space is free once everything up to end - capacity is released; all
        # written records released, the skipped tail of the last lap is free too
        need = min(end - self.capacity, self._written)
        delay = 1e-4
        while self._released(fd) < need:
            if not is_active():
                raise RingClosed("the client went away")
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)
        if not is_active():  # a call cut short writes nothing more
            raise RingClosed("the client went away")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise self._broken(e.strerror or "fstat failed") from None
        if st.st_size != self._size or st.st_blocks * 512 < self._size:
            raise self._broken(f"it is {st.st_size} bytes with {st.st_blocks * 512} "
                               f"reserved, not {self._size}")
        try:
            _pwrite_all(fd, views, HEADER + offset)
        except OSError as e:
            raise self._broken(f"writing {length} bytes: {e.strerror}") from None
        self._written = end
        return offset, length, end

    def close(self) -> None:
        """Close the ring's descriptor."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _pwrite_all(fd: int, views: list[memoryview], at: int) -> None:
    """Write ``views`` back to back at ``at``: one ``pwritev`` per IOV_MAX buffers."""
    pending = [v.cast("B") for v in views if v.nbytes]
    i = 0
    while i < len(pending):
        chunk = pending[i:i + _IOV_MAX]
        n = os.pwritev(fd, chunk, at)
        if n <= 0:
            raise OSError(errno.EIO, "the ring took no bytes")
        at += n
        for v in chunk:  # skip what was written; a partly written buffer goes again
            if n < v.nbytes:
                pending[i] = v[n:]
                break
            n -= v.nbytes
            i += 1


def _lock_writer(fd: int, name: str, wait: float, is_active: Callable[[], bool]) -> None:
    """Take the ring's writer lock (an OFD lock, released when ``fd`` closes)."""
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_AT, 1, 0)
    deadline = time.monotonic() + wait
    delay = 1e-3
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise unavailable(f"cannot lock ring {name}: {e.strerror}") from e
        if not is_active():
            raise RingClosed("the client went away")
        if time.monotonic() >= deadline:
            raise FailedPrecondition(f"ring {name} is still written by another call after "
                                     f"{wait:g} s: use a ring for one call at a time",
                                     reason=RING_BUSY)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _map_new(fd: int, capacity: int, directory: Path | None) -> mmap.mmap:
    """Reserve and map a new ring's memory and write its header (``directory`` None: private)."""
    try:
        os.posix_fallocate(fd, 0, HEADER + capacity)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        need = f"{(HEADER + capacity) / 2**20:.0f} MiB"
        if directory is None:
            raise unavailable(f"no memory for a ring of {need}") from e
        raise unavailable(
            f"{directory} has {_free_bytes(directory) / 2**20:.0f} MiB free, the ring needs "
            f"{need}: give the pod a bigger /dev/shm (an emptyDir with medium: Memory and a "
            "sizeLimit) or use shared_memory=False") from e
    mapping = mmap.mmap(fd, HEADER + capacity)
    mapping[:len(MAGIC)] = MAGIC
    struct.pack_into("<QQ", mapping, _CAPACITY_AT, capacity, 0)
    mapping[_TOKEN_AT:_TOKEN_AT + TOKEN_BYTES] = secrets.token_bytes(TOKEN_BYTES)
    return mapping


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
