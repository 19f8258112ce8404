"""The Ceph backend: objects in a RADOS pool through librados (Debian's python3-rados).

Layout (see docs/storage.md for why):

- An object key is the RADOS object name (``blobs/ab/cd/<sha256>``,
  ``arrays/<path>/c/0/1``): content-addressed blobs spread evenly over
  placement groups by their hash.
- A value up to ``piece_bytes`` (default 4 MiB) is one object, written with one
  atomic write operation (create-exclusive for blobs, so a second writer of
  the same content keeps the first copy). A larger staged value is written as
  pieces ``pieces/<staging id>/<n>`` of ``piece_bytes`` each, then published
  by one atomic write of its head object, which carries the piece list in the
  xattrs ``gm.pieces`` and ``gm.size`` and no data: no object is ever larger
  than ``piece_bytes``, and a value is visible only once all its pieces are
  stored.
- Conditional writes (array chunks) use the object's RADOS version
  (``assert_version`` in the write operation), so a concurrent writer's
  update is never lost; a key's version token is that version.
- Pieces of several objects are read and written with aio; every call is
  bounded by ``timeout_seconds`` (``client_mount_timeout``,
  ``rados_osd_op_timeout``, ``rados_mon_op_timeout``), so with the cluster
  down a call fails with UNAVAILABLE instead of hanging, and the same
  connection resumes when the cluster is back.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gristmill.client.errors import GristmillError, Internal, Unavailable
from gristmill.store.disk import disk_full
from gristmill.store.objects import (
    ObjectBackend,
    ObjectMissing,
    ObjectStat,
    PutResult,
    Staging,
    register_backend,
    validate_key,
)

if TYPE_CHECKING:
    from gristmill.store.config import CephBackendConfig, StoreConfig

__all__ = ["CephBackend"]

log = logging.getLogger("gristmill.store")
T = TypeVar("T")
_PIECES = "gm.pieces"
_SIZE = "gm.size"
_UNAVAILABLE_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN,
                                 errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.EAGAIN})
_RETRY_AFTER_DOWN = 1.0
#: Listing index objects: ``~idx/<directory>`` ("~" is in no key).
_INDEX = "~idx/"
_INDEX_PAGE = 1000
#: Which head each published set of pieces belongs to (omap: staging id -> key).
_PIECE_HEADS = "~piece-heads"
#: Directory entries known to be indexed already, remembered to skip rewriting them.
_INDEXED_DIRS = 1 << 17
_HEAD_CACHE = 4096
_CONFLICT_ERRNOS = frozenset({errno.EEXIST, errno.ERANGE, errno.EOVERFLOW, errno.ENOENT})


F = TypeVar("F", bound=Callable[..., Any])


def _tracked(method: F) -> F:
    """Count the call as in flight on its backend: :meth:`CephBackend.close` waits for it."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        backend = self if isinstance(self, CephBackend) else self._backend
        with backend._using():
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _rados() -> Any:
    try:
        import rados
    except ImportError as e:  # pragma: no cover - setup installs it
        raise Unavailable("the Ceph backend needs the librados Python binding: apt-get install "
                          "python3-rados, then run scripts/link-rados.sh to link it into the "
                          f"virtual environment ({e})", reason="STORAGE_UNAVAILABLE") from None
    return rados


class _CephStaging(Staging):
    """Buffers up to one piece in memory; larger values go out as piece objects."""

    def __init__(self, backend: CephBackend) -> None:
        self._backend = backend
        self.id = uuid.uuid4().hex
        self.size = 0
        self.buffer = bytearray()
        self.pieces = 0
        self._pending: list[Any] = []

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        limit = self._backend.piece_bytes
        while len(self.buffer) > limit:
            self._send(bytes(self.buffer[:limit]))
            del self.buffer[:limit]

    @_tracked
    def _send(self, piece: bytes) -> None:
        name = f"pieces/{self.id}/{self.pieces}"
        self._backend.index_add([name])  # listed (for gc) before it exists
        self.pieces += 1
        self._pending.append(self._backend.call(
            f"write piece {name}", lambda io: io.aio_write_full(name, piece)))
        if len(self._pending) >= 4:  # bound memory: at most 4 pieces in flight
            self.wait()

    @_tracked
    def wait(self) -> None:
        """Wait for piece writes in flight; raise if one failed."""
        pending, self._pending = self._pending, []
        for completion in pending:
            completion.wait_for_complete()
            code = completion.get_return_value()
            if code < 0:
                raise self._backend.error("write a piece", OSError(-code, "piece write failed"))

    @_tracked
    def finish(self) -> None:
        """Send the last piece of a multi-piece value and wait for all of them."""
        if self.pieces:
            if self.buffer:
                self._send(bytes(self.buffer))
                self.buffer.clear()
            self.wait()

    def abort(self) -> None:
        try:
            with self._backend._using():
                self._abort()
        except Unavailable:  # shutting down: pieces already written are left to gc
            self._pending.clear()
            self.buffer.clear()

    def _abort(self) -> None:
        pending, self._pending = self._pending, []
        for completion in pending:
            completion.wait_for_complete()
        self.buffer.clear()
        self._backend._active.discard(self.id)
        if self.pieces:
            self._backend.remove_pieces(self.id, self.pieces)
            self.pieces = 0


class CephBackend(ObjectBackend):
    """Objects in one RADOS pool (see the module docstring for the layout)."""

    kind = "ceph"

    def __init__(self, config: CephBackendConfig) -> None:
        self.config = config
        self.piece_bytes = config.piece_bytes
        self.timeout = config.timeout_seconds
        self._cluster: Any = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._next_connect = 0.0
        #: when an operation last timed out (0: not since start)
        self._down_at = 0.0
        self._active: set[str] = set()
        #: calls in flight (see :meth:`_using`); close() waits for them before shutting down
        self._inflight = 0
        self._closed = False
        self._idle = threading.Condition()
        #: (size, staging id, pieces, piece size) of values in pieces read lately
        #: (their pieces never change; a value deleted and stored again has new ones)
        self._heads: dict[str, tuple[int, str, int, int]] = {}
        #: (index object, directory entry) pairs written already
        self._indexed: set[tuple[str, str]] = set()
        try:
            self._connect()
        except Unavailable as e:  # serve anyway: calls fail with UNAVAILABLE until it is up
            log.warning("%s", e)

    def describe(self) -> str:
        ns = f" (namespace {self.config.namespace!r})" if self.config.namespace else ""
        return f"Ceph pool {self.config.pool!r}{ns} of the cluster in {self.config.conf}"

    # -- connection -----------------------------------------------------------------
    def _connect(self) -> Any:
        rados = _rados()
        with self._lock:
            if self._cluster is not None:
                return self._cluster
            if time.monotonic() < self._next_connect:
                raise self._unavailable("is not reachable (retrying shortly)")
            t = str(max(1, round(self.timeout)))  # librados takes whole seconds
            # objecter_timeout: how soon a client notices an OSD that restarted
            conf = {"client_mount_timeout": t, "rados_osd_op_timeout": t,
                    "rados_mon_op_timeout": t, "objecter_timeout": t}
            if self.config.keyring is not None:
                conf["keyring"] = str(self.config.keyring)
            if not Path(self.config.conf).is_file():
                raise self._unavailable(f"has no conf file at {self.config.conf}")
            cluster = rados.Rados(conffile=str(self.config.conf), name=self.config.client,
                                  conf=conf)
            try:
                cluster.connect(timeout=max(1, round(self.timeout)))
                if not cluster.pool_exists(self.config.pool):
                    cluster.shutdown()
                    raise Unavailable(
                        f"{self.describe()}: the pool does not exist; create it with `ceph osd "
                        f"pool create {self.config.pool}` (or set store.backend.pool)",
                        reason="STORAGE_UNAVAILABLE")
            except rados.Error as e:
                self._next_connect = time.monotonic() + min(self.timeout, 2.0)
                with contextlib.suppress(Exception):
                    cluster.shutdown()
                raise self._unavailable(f"did not accept a connection ({e})") from None
            self._cluster = cluster
            self._local = threading.local()
            return cluster

    def _unavailable(self, what: str) -> Unavailable:
        return Unavailable(f"{self.describe()} {what}; check that its monitors and OSDs are up "
                           f"(`ceph --conf {self.config.conf} -s`) and reachable; calls resume "
                           "by themselves when it is back", reason="STORAGE_UNAVAILABLE")

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """A call in flight: refused once the backend is closed, waited for by close()."""
        with self._idle:
            if self._closed:
                raise Unavailable(f"{self.describe()}: the store is shutting down; retry on "
                                  "another replica or when it is back",
                                  reason="STORAGE_UNAVAILABLE")
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _io(self) -> Any:
        """This thread's I/O context (``get_last_version`` is per context).

        For a second after an operation timed out, calls fail at once instead
        of each waiting out the timeout again (the cluster is down); then one
        goes through to try.
        """
        if self._down_at and time.monotonic() - self._down_at < _RETRY_AFTER_DOWN:
            raise self._unavailable(f"did not answer within {self.timeout:g} s")
        cluster = self._cluster or self._connect()
        io = getattr(self._local, "io", None)
        if io is None or getattr(self._local, "cluster", None) is not cluster:
            try:
                io = cluster.open_ioctx(self.config.pool)
                if self.config.namespace:
                    io.set_namespace(self.config.namespace)
            except _rados().Error as e:
                raise self._map("open the pool", e) from None
            self._local.io = io
            self._local.cluster = cluster
        return io

    @_tracked
    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(ioctx)``; librados errors become domain errors naming the cluster."""
        io = self._io()
        try:
            return fn(io)
        except _rados().Error as e:
            raise self._map(what, e) from None

    def _map(self, what: str, e: Exception) -> GristmillError:
        rados = _rados()
        code = getattr(e, "errno", None)
        if isinstance(e, rados.ObjectNotFound):
            return ObjectMissing(what)
        if isinstance(e, rados.TimedOut | rados.ConnectionShutdown) or (
                code is not None and abs(code) in _UNAVAILABLE_ERRNOS):
            self._down_at = time.monotonic()
            return self._unavailable(f"did not answer within {self.timeout:g} s ({what})")
        if isinstance(e, rados.NoSpace) or (code is not None and abs(code) == errno.ENOSPC):
            return disk_full(f"cannot {what}", self.describe())
        return Internal(f"{self.describe()}: cannot {what}: {e}", reason="STORAGE_ERROR")

    def error(self, operation: str, error: OSError) -> GristmillError:
        if error.errno is not None and abs(error.errno) == errno.ENOSPC:
            return disk_full(f"cannot {operation}", self.describe())
        if error.errno is not None and abs(error.errno) in _UNAVAILABLE_ERRNOS:
            self._down_at = time.monotonic()
            return self._unavailable(f"did not answer within {self.timeout:g} s ({operation})")
        return Internal(f"{self.describe()}: cannot {operation}: {error}", reason="STORAGE_ERROR")

    @_tracked
    def check_health(self) -> None:
        def probe(io: Any) -> None:
            try:
                io.stat("gristmill.health")
            except _rados().ObjectNotFound:
                pass
        self.call("answer a health probe", probe)

    # -- writes ---------------------------------------------------------------------
    def stage(self) -> _CephStaging:
        staging = _CephStaging(self)
        self._active.add(staging.id)
        return staging

    @_tracked
    def commit(self, items: Sequence[tuple[Staging, str]]) -> list[bool]:
        rados = _rados()
        created = [False] * len(items)
        ours = [(i, s, validate_key(k)) for i, (s, k) in enumerate(items)
                if isinstance(s, _CephStaging)]
        try:
            for _, s, _ in ours:
                s.finish()
            self.index_add([key for _, _, key in ours])
            multi = {s.id: key for _, s, key in ours if s.pieces}
            if multi:  # which head each set of pieces is for (gc asks)
                self._omap_batch({_PIECE_HEADS: sorted(multi)}, add=True,
                                 values={sid: key.encode() for sid, key in multi.items()})
            io = self._io()
            ops = []
            for i, s, key in ours:
                op = io.create_write_op()
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                if s.pieces:
                    op.set_xattr(_PIECES, f"{s.id}:{s.pieces}:{self.piece_bytes}".encode())
                    op.set_xattr(_SIZE, str(s.size).encode())
                else:
                    op.write_full(bytes(s.buffer))
                ops.append((i, op, io.operate_aio_write_op(op, key, mtime=_now())))
            failure: GristmillError | None = None
            for i, op, completion in ops:
                completion.wait_for_complete()
                code = completion.get_return_value()
                io.release_write_op(op)
                if code == 0:
                    created[i] = True
                elif -code != errno.EEXIST and failure is None:  # EEXIST: stored meanwhile
                    failure = self.error("store an upload's bytes",
                                         OSError(-code, errno.errorcode.get(-code, "error")))
            if failure is not None:
                raise failure
        except _rados().Error as e:
            raise self._map("store an upload's bytes", e) from None
        finally:
            for i, s, _ in ours:
                self._active.discard(s.id)
                if not created[i]:
                    s.abort()
                else:
                    s.buffer.clear()
        return created

    @_tracked
    def put(self, key: str, data: bytes, *, expected_version: str | None = None,
            if_absent: bool = False) -> PutResult:
        rados = _rados()
        validate_key(key)
        if len(data) > self.piece_bytes * 16:
            raise Internal(f"{key}: {len(data)} bytes is too large for one object",
                           reason="STORAGE_ERROR")
        if expected_version not in (None, "") and not expected_version.isdigit():
            now = self.stat(key)  # not a version this backend made: it cannot match
            return PutResult(True, now.version if now else "")
        self.index_add([key])
        io = self._io()
        op = io.create_write_op()
        try:
            if if_absent or expected_version == "":
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            elif expected_version is not None:
                op.assert_version(int(expected_version))
            op.write_full(data)
            try:
                io.operate_write_op(op, key, mtime=_now())
            except rados.Error as e:
                code = abs(getattr(e, "errno", 0) or 0)
                if isinstance(e, rados.ObjectExists | rados.ObjectNotFound) or (
                        code in _CONFLICT_ERRNOS and (if_absent or expected_version is not None)):
                    now = self.stat(key)
                    return PutResult(True, now.version if now else "")
                raise self._map(f"write {key}", e) from None
            return PutResult(False, str(io.get_last_version()))
        finally:
            io.release_write_op(op)

    @_tracked
    def delete(self, key: str, *, expected_version: str | None = None) -> tuple[PutResult, int]:
        rados = _rados()
        current = self.stat(key)
        if current is None:
            return PutResult(expected_version not in (None, ""), ""), 0
        if expected_version is not None and not expected_version.isdigit():
            return PutResult(True, current.version), 0  # not a version this backend made
        pieces = self._pieces(key) if current.size else None
        io = self._io()
        op = io.create_write_op()
        try:
            if expected_version is not None:
                op.assert_version(int(expected_version))
            op.remove()
            try:
                io.operate_write_op(op, key, mtime=_now())
            except rados.ObjectNotFound:
                return PutResult(expected_version not in (None, ""), ""), 0
            except rados.Error as e:
                if abs(getattr(e, "errno", 0) or 0) in (errno.ERANGE, errno.EOVERFLOW):
                    now = self.stat(key)
                    return PutResult(True, now.version if now else ""), 0
                raise self._map(f"delete {key}", e) from None
        finally:
            io.release_write_op(op)
        self.index_remove([key])
        if pieces is not None:
            self.remove_pieces(pieces[0], pieces[1])
        return PutResult(False, ""), current.size

    @_tracked
    def remove_pieces(self, staging_id: str, count: int) -> None:
        """Remove the piece objects of a staging (best effort: gc removes leftovers)."""
        io = self._io()
        completions = []
        for n in range(count):
            try:
                completions.append(io.aio_remove(f"pieces/{staging_id}/{n}"))
            except _rados().Error:
                continue
        for c in completions:
            c.wait_for_complete()
        self.index_remove([f"pieces/{staging_id}/{n}" for n in range(count)])
        try:  # the staging's directory entry, and its registration
            self._indexed.discard((_INDEX + "pieces", f"{staging_id}/"))
            self._omap_batch({_INDEX + "pieces": [f"{staging_id}/"],
                              _PIECE_HEADS: [staging_id]}, add=False)
        except GristmillError:
            pass  # a stale registration only costs gc one lookup

    # -- the listing index ----------------------------------------------------------
    @_tracked
    def index_add(self, keys: Sequence[str]) -> None:
        """Name keys in their directories' index objects, before the keys are written.

        A directory's index is the object ``~idx/<directory>`` whose omap keys
        are its entries (``name`` for an object, ``name/`` for a directory), so
        a listing walks only what is under its prefix, in key order, instead of
        the whole pool. An entry whose object is gone (a crash between the two
        writes) is skipped by the listing.
        """
        wanted: dict[str, set[str]] = {}
        for key in keys:
            for obj, entry in _index_entries(key):
                if entry.endswith("/") and (obj, entry) in self._indexed:
                    continue
                wanted.setdefault(obj, set()).add(entry)
        if not wanted:
            return
        self._omap_batch({obj: sorted(entries) for obj, entries in wanted.items()}, add=True)
        if len(self._indexed) > _INDEXED_DIRS:
            self._indexed.clear()
        self._indexed.update((obj, e) for obj, entries in wanted.items()
                             for e in entries if e.endswith("/"))

    @_tracked
    def index_remove(self, keys: Sequence[str]) -> None:
        """Drop objects' entries from their directories' indexes (best effort)."""
        gone: dict[str, list[str]] = {}
        for key in keys:
            obj, entry = _index_entries(key)[-1]
            gone.setdefault(obj, []).append(entry)
        try:
            self._omap_batch(gone, add=False)
        except GristmillError:
            log.warning("cannot update the listing index of %s", self.describe(), exc_info=True)

    def _omap_batch(self, entries: dict[str, list[str]], *, add: bool,
                    values: dict[str, bytes] | None = None) -> None:
        io = self._io()
        pending = []
        try:
            for obj, names in entries.items():
                op = io.create_write_op()
                if add:
                    io.set_omap(op, names, [(values or {}).get(n, b"") for n in names])
                else:
                    io.remove_omap_keys(op, names)
                pending.append((op, io.operate_aio_write_op(op, obj, mtime=_now())))
        finally:
            codes = []
            for op, completion in pending:
                completion.wait_for_complete()
                codes.append(completion.get_return_value())
                io.release_write_op(op)
        self.check_codes("update the listing index", codes)

    def check_codes(self, operation: str, codes: Sequence[int]) -> None:
        """Raise the domain error of the first failed aio return code; ENOENT is no failure."""
        for code in codes:
            if code < 0 and -code != errno.ENOENT:
                raise self.error(operation, OSError(-code, errno.errorcode.get(-code, "error")))

    @_tracked
    def _index_page(self, directory: str, after: str, only: str) -> list[str]:
        rados = _rados()
        io = self._io()
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, after, only, _INDEX_PAGE)
            try:
                io.operate_read_op(op, _INDEX + directory)
            except rados.ObjectNotFound:
                return []
            except rados.Error as e:
                raise self._map(f"list {directory or 'the root'}", e) from None
            return [str(k) for k, _ in it]

    @_tracked
    def touch(self, key: str) -> bool:
        """Write ``gm.used`` (a new mtime and version) at the version found; False if absent.

        The write is guarded by the version the stat saw, so it never creates
        a missing object, and a collector's delete guarded by the version it
        saw fails once the touch is in (and the touch fails once the delete is).
        """
        rados = _rados()

        def mark(io: Any) -> bool:
            for _ in range(8):
                try:
                    io.stat(key)
                except rados.ObjectNotFound:
                    return False
                version = io.get_last_version()
                op = io.create_write_op()
                try:
                    op.assert_version(version)
                    op.set_xattr("gm.used", str(_now()).encode())
                    try:
                        io.operate_write_op(op, key, mtime=_now())  # the new mtime is the point
                        return True
                    except rados.ObjectNotFound:
                        return False
                    except rados.Error as e:
                        if abs(getattr(e, "errno", 0) or 0) not in (errno.ERANGE,
                                                                     errno.EOVERFLOW):
                            raise
                finally:
                    io.release_write_op(op)
            return True  # written by others all along: it is there, at a newer version
        # an error is raised: a touch that did not land must not let a reference through
        return self.call(f"touch {key}", mark)

    # -- reads ----------------------------------------------------------------------
    def _pieces(self, key: str) -> tuple[str, int, int] | None:
        """(staging id, count, piece size) of a multi-piece head, or None."""
        rados = _rados()
        try:
            raw = self._io().get_xattr(key, _PIECES)
        except rados.NoData:
            return None
        except rados.Error as e:
            if isinstance(e, rados.ObjectNotFound):
                raise ObjectMissing(key) from None
            if abs(getattr(e, "errno", 0) or 0) == errno.ENODATA:
                return None
            raise self._map(f"read {key}", e) from None
        sid, count, size = raw.decode().split(":")
        return sid, int(count), int(size)

    @_tracked
    def stat(self, key: str) -> ObjectStat | None:
        got = self._stat(key)
        return None if got is None else got[0]

    @_tracked
    def _stat(self, key: str) -> tuple[ObjectStat, bool] | None:
        """The stat and whether the value is in pieces (an empty head with ``gm.size``)."""
        rados = _rados()
        validate_key(key)
        io = self._io()
        try:
            size, mtime = io.stat(key)
            version = io.get_last_version()
        except rados.ObjectNotFound:
            return None
        except rados.Error as e:
            raise self._map(f"stat {key}", e) from None
        multi = False
        if size == 0:
            try:
                size = int(io.get_xattr(key, _SIZE).decode())
                multi = True
            except rados.Error:
                pass
        return ObjectStat(key, int(size), time.mktime(mtime), str(version)), multi

    @_tracked
    def read(self, key: str, offset: int = 0, length: int = -1) -> bytes:
        heads = self._heads.get(key)
        if heads is not None and length > 0:  # a value in pieces read before: no lookups
            try:
                return self._read_pieces(key, heads, offset, min(length, heads[0] - offset))
            except ObjectMissing:
                self._heads.pop(key, None)  # deleted and stored again since: look it up
        if length > 0:  # one round trip when the object holds the bytes itself
            rados = _rados()
            validate_key(key)
            io = self._io()
            try:
                data: bytes = io.read(key, length, offset)
            except rados.ObjectNotFound:
                raise ObjectMissing(key) from None
            except rados.Error as e:
                raise self._map(f"read {key}", e) from None
            if data:
                return data
        found = self._stat(key)
        if found is None:
            raise ObjectMissing(key)
        st, multi = found
        if length < 0:
            length = max(0, st.size - offset)
        length = max(0, min(length, st.size - offset))
        if length == 0:
            return b""
        pieces = self._pieces(key) if multi else None
        if pieces is None:
            whole: bytes = self.call(f"read {key}", lambda io: io.read(key, length, offset))
            return whole
        head = (st.size, *pieces)
        if len(self._heads) >= _HEAD_CACHE:
            self._heads.pop(next(iter(self._heads)))
        self._heads[key] = head
        return self._read_pieces(key, head, offset, length)

    def _read_pieces(self, key: str, head: tuple[int, str, int, int], offset: int,
                     length: int) -> bytes:
        if length <= 0:
            return b""
        _, sid, _, piece = head
        first, last = offset // piece, (offset + length - 1) // piece
        io = self._io()
        got: dict[int, bytes] = {}
        completions = []
        for n in range(first, last + 1):
            start = max(offset, n * piece) - n * piece
            end = min(offset + length, (n + 1) * piece) - n * piece

            def done(_completion: Any, data: bytes, n: int = n) -> None:
                got[n] = data
            completions.append(io.aio_read(f"pieces/{sid}/{n}", end - start, start, done))
        for completion in completions:
            completion.wait_for_complete_and_cb()
            code = completion.get_return_value()
            if code == -errno.ENOENT:
                raise ObjectMissing(key)
            if code < 0:
                raise self.error(f"read {key}", OSError(-code, "piece read failed"))
        return b"".join(got[n] for n in range(first, last + 1))

    @_tracked
    def read_versioned(self, key: str, offset: int = 0, length: int = -1
                       ) -> tuple[bytes, ObjectStat] | None:
        rados = _rados()
        validate_key(key)
        io = self._io()
        for _ in range(8):
            try:
                size, mtime = io.stat(key)
                before = io.get_last_version()
                want = length if length >= 0 else max(0, size - offset)
                data = io.read(key, want, offset) if want else b""
                after = io.get_last_version() if want else before
            except rados.ObjectNotFound:
                return None
            except rados.Error as e:
                raise self._map(f"read {key}", e) from None
            if size == 0 and (whole := self._stat(key)) is not None and whole[1]:
                st = whole[0]  # a value in pieces: they never change once published
                return self.read(key, offset, length), st
            if before == after:
                return data, ObjectStat(key, int(size), time.mktime(mtime), str(after))
        raise self._unavailable(f"kept changing {key} while it was read")

    @_tracked
    def read_many(self, reads: Sequence[tuple[str, int, int]], versions: bool = True
                  ) -> list[tuple[bytes, ObjectStat] | None]:
        """Without versions: all reads in flight at once (aio stat, then aio read).

        aio completions carry no object version, so reads that need one go one
        by one through :meth:`read_versioned`.
        """
        if versions:
            return [self.read_versioned(k, o, n) for k, o, n in reads]
        if reads and all(n > 0 for _, _, n in reads):
            return self._read_known(reads)
        io = self._io()
        stats: dict[int, tuple[int, Any]] = {}
        datas: dict[int, bytes] = {}
        pending = []
        for i, (key, _offset, _length) in enumerate(reads):
            validate_key(key)

            def on_stat(_c: Any, size: int | None, mtime: Any, i: int = i) -> None:
                if size is not None:
                    stats[i] = (size, mtime)
            pending.append(io.aio_stat(key, on_stat))
        for c in pending:
            c.wait_for_complete_and_cb()
            code = c.get_return_value()
            if code < 0 and -code != errno.ENOENT:
                raise self.error("read objects", OSError(-code, "stat failed"))
        pending = []
        for i, (key, offset, length) in enumerate(reads):
            if i not in stats or stats[i][0] == 0:
                continue
            want = length if length >= 0 else max(0, stats[i][0] - offset)

            def on_read(_c: Any, data: bytes, i: int = i) -> None:
                datas[i] = data
            pending.append(io.aio_read(key, max(want, 1), offset, on_read))
        for c in pending:
            c.wait_for_complete_and_cb()
            code = c.get_return_value()
            if code < 0 and -code != errno.ENOENT:
                raise self.error("read objects", OSError(-code, "read failed"))
        out: list[tuple[bytes, ObjectStat] | None] = []
        for i, (key, offset, length) in enumerate(reads):
            if i not in stats:
                out.append(None)
            elif stats[i][0] == 0:  # empty, or a value in pieces
                out.append(self.read_versioned(key, offset, length))
            else:
                size, mtime = stats[i]
                data = datas.get(i, b"")
                if length == 0:
                    data = b""
                out.append((data, ObjectStat(key, int(size), time.mktime(mtime), "")))
        return out

    def _read_known(self, reads: Sequence[tuple[str, int, int]]
                    ) -> list[tuple[bytes, ObjectStat] | None]:
        """Reads of known lengths: one aio read each, all in flight (no stat round)."""
        io = self._io()
        datas: dict[int, bytes] = {}
        pending = []
        for i, (key, offset, length) in enumerate(reads):
            validate_key(key)

            def on_read(_c: Any, data: bytes, i: int = i) -> None:
                datas[i] = data
            pending.append((i, io.aio_read(key, length, offset, on_read)))
        missing: set[int] = set()
        for i, c in pending:
            c.wait_for_complete_and_cb()
            code = c.get_return_value()
            if code == -errno.ENOENT:
                missing.add(i)
            elif code < 0:
                raise self.error("read objects", OSError(-code, "read failed"))
        out: list[tuple[bytes, ObjectStat] | None] = []
        for i, (key, offset, length) in enumerate(reads):
            data = datas.get(i, b"")
            if i in missing:
                out.append(None)
            elif not data:  # a value in pieces (an empty head)
                try:
                    out.append((self.read(key, offset, length), ObjectStat(key, -1, 0.0, "")))
                except ObjectMissing:
                    out.append(None)
            else:
                out.append((data, ObjectStat(key, -1, 0.0, "")))
        return out

    @_tracked
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        io = self._io()
        completions = []
        for k in keys:
            completions.append(io.aio_stat(validate_key(k), lambda *_a: None))
        found = []
        for c in completions:
            c.wait_for_complete()
            code = c.get_return_value()
            if code < 0 and -code != errno.ENOENT:
                raise self.error("look up objects", OSError(-code, "stat failed"))
            found.append(code >= 0)
        return found

    def list_objects(self, prefix: str, start_after: str = "", fix_modes: bool = False
                     ) -> Iterator[ObjectStat]:
        """Objects under ``prefix`` in key order.

        A walk of the listing index (see :meth:`index_add`) that visits only
        the directories under the prefix, never the whole pool.
        """
        base, _, _ = prefix.rpartition("/")
        yield from self._walk(base, prefix, start_after)

    def _walk(self, directory: str, prefix: str, start_after: str) -> Iterator[ObjectStat]:
        here = f"{directory}/" if directory else ""
        only = prefix[len(here):] if prefix.startswith(here) and "/" not in prefix[len(here):] \
            else ""
        # entries before start_after's own entry here come before it (that entry's
        # directory, "name/", sorts after "name" and may hold later keys)
        after = start_after[len(here):].split("/")[0] if start_after.startswith(here) else ""
        while True:
            page = self._index_page(directory, after, only)
            for entry in page:
                full = here + entry
                if entry.endswith("/"):
                    if not (full.startswith(prefix) or prefix.startswith(full)):
                        continue
                    if start_after and full < start_after and not start_after.startswith(full):
                        continue
                    yield from self._walk(full[:-1], prefix, start_after)
                    continue
                if not full.startswith(prefix) or (start_after and full <= start_after):
                    continue
                st = self.stat(full)
                if st is not None:
                    yield st
            if len(page) < _INDEX_PAGE:
                return
            after = page[-1]

    # -- upkeep ---------------------------------------------------------------------
    @_tracked
    def remove_temporaries(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove pieces that no head names, written before ``older_than``.

        Pieces are listed by staging (the index of ``pieces/``); a staging
        counts as published while the head its registration names
        (``~piece-heads``) still lists that staging's pieces.
        """
        count = freed = 0
        for sid in self._index_page("pieces", "", ""):
            sid = sid.rstrip("/")
            if sid in self._active or self._published(sid):
                continue
            for piece in list(self.list_objects(f"pieces/{sid}/")):
                if piece.mtime >= older_than:
                    continue
                if not dry_run:
                    self.call(f"remove {piece.key}", _remove_of(piece.key))
                    self.index_remove([piece.key])
                count += 1
                freed += piece.size
            if not dry_run and not any(True for _ in self.list_objects(f"pieces/{sid}/")):
                self._omap_batch({_PIECE_HEADS: [sid]}, add=False)
        return count, freed

    @_tracked
    def _published(self, sid: str) -> bool:
        rados = _rados()
        io = self._io()
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals_by_keys(op, (sid,))
            try:
                io.operate_read_op(op, _PIECE_HEADS)
            except rados.ObjectNotFound:
                return False
            heads = {str(k): bytes(v).decode() for k, v in it}
        head = heads.get(sid)
        if head is None:
            return False
        try:
            pieces = self._pieces(head)
        except ObjectMissing:
            return False
        return pieces is not None and pieces[0] == sid

    def close(self) -> None:
        """Refuse new calls, wait for those in flight, then shut the connection down.

        Shutting librados down under a thread that waits in a call would leave
        that thread waiting forever; each call ends within the operation
        timeout, so the wait is bounded. Should one not end, the connection is
        left to the process's exit instead.
        """
        deadline = time.monotonic() + 3 * self.timeout + 5
        with self._idle:
            self._closed = True
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            busy = self._inflight
        with self._lock:
            cluster, self._cluster = self._cluster, None
        if cluster is None:
            return
        if busy:
            log.warning("%s: %d call(s) still in flight at close; the connection is left to "
                        "the process's exit", self.describe(), busy)
            return
        with contextlib.suppress(Exception):
            cluster.shutdown()


def _index_entries(key: str) -> list[tuple[str, str]]:
    """(index object, entry) for each level of ``key``: its directories, then the object."""
    parts = key.split("/")
    return [(_INDEX + "/".join(parts[:i]), part + ("/" if i < len(parts) - 1 else ""))
            for i, part in enumerate(parts)]


def _now() -> int:
    """Now, for a write's mtime (librados otherwise leaves some writes' mtime at 0)."""
    return int(time.time())


def _remove_of(name: str) -> Callable[[Any], Any]:
    return lambda io: io.remove_object(name)


def _open(config: StoreConfig, root: Path) -> CephBackend:
    from gristmill.store.config import CephBackendConfig

    assert isinstance(config.backend, CephBackendConfig)
    return CephBackend(config.backend)


register_backend("ceph", _open)
