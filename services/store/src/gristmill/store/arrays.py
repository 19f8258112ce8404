"""N-d arrays: the keys of one Zarr v3 hierarchy, kept as objects of a storage backend.

A Zarr key ``features/c/0/1`` is the object ``arrays/features/c/0/1`` of the
store's :class:`~gristmill.store.objects.ObjectBackend`; on the filesystem
backend that is the file ``<data_dir>/store/arrays/features/c/0/1``, so the
directory ``<data_dir>/store/arrays/features`` is an array that plain
``zarr.open_array(path)`` reads. The server never decodes a chunk: selection,
codecs and checksums run in zarr-python on the client
(:mod:`gristmill.client.arrays`). What the server owns is the shape of the
keys and values it accepts:

- keys are paths of segments of ``[A-Za-z0-9._-]`` (1-128 characters, not
  starting with '.'); ``zarr.json`` only as the last segment;
- a metadata value (``.../zarr.json``) is a Zarr v3 JSON object, ``node_type``
  ``array`` or ``group``, at most :data:`MAX_METADATA_BYTES`; the root is a
  group; an array's raw chunk (chunk shape x item size) fits
  ``store.max_array_chunk_bytes``, and an array has no children;
- any other value (a chunk) is at most ``store.max_array_chunk_bytes``.

Every key has a version (the backend's); a put or delete may name the version
it expects, which is what makes a read-modify-write of a partial chunk safe
against a concurrent writer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gristmill.client.arraywire import encode_release, encode_value, value_overhead
from gristmill.client.errors import FailedPrecondition, InvalidArgument, NotFound
from gristmill.client.shm import RingClosed, RingWriter
from gristmill.store.metrics import ARRAY_BYTES_OUT
from gristmill.store.objects import ObjectBackend, ObjectStat
from gristmill.v1 import arrays_pb2

__all__ = [
    "MAX_KEYS_PER_CALL",
    "MAX_METADATA_BYTES",
    "PREFIX",
    "ArrayInfo",
    "ArrayStore",
    "validate_array_key",
    "validate_array_path",
]

#: Object key prefix of the hierarchy.
PREFIX = "arrays/"
#: Largest metadata document (``zarr.json``) accepted.
MAX_METADATA_BYTES = 1024 * 1024
#: Reads of one GetKeys call, deletes of one DeleteKeys call, writes of one PutKeys call.
MAX_KEYS_PER_CALL = 10_000
METADATA = "zarr.json"
#: Reads handed to the backend at once (a backend may fan them out), and the
#: bytes of each read first: a GetKeys stream holds at most two groups (the one
#: sent, the one read ahead), 2 x 8 x 4 MiB, plus one larger value read whole,
#: besides its message.
_READ_GROUP = 8
_READ_STEP = 4 * 1024 * 1024
#: Threads (per server) storing the values of PutKeys messages side by side and
#: reading the next group of a GetKeys stream while the current one is sent.
_IO_THREADS = 8
#: The smallest ring a GetKeys request may name: two messages of 32 KiB.
MIN_RING_BYTES = 64 * 1024
#: Ring records start (and each value in them) on this boundary, so that a
#: chunk's elements are aligned where the client decodes them in place.
_RING_ALIGN = 64
_PADDING = bytes(_RING_ALIGN)
#: Seconds a GetKeys call waits for another call's writer of the same ring
#: (a call gRPC sent again while its first attempt still ran).
_RING_LOCK_WAIT = 10.0
_GRPC_BYTES = ARRAY_BYTES_OUT.labels("grpc")
_SHM_BYTES = ARRAY_BYTES_OUT.labels("shm")
#: Keys of one rolled-up level skipped while listing before the listing starts
#: again past it (a filesystem backend then skips the level's directories).
_SKIP_BEFORE_SEEK = 64
#: A group of reads as read: (request, (offset, length), bytes and stat or None).
_Group = list[tuple[arrays_pb2.KeyRead, tuple[int, int], "tuple[bytes, ObjectStat] | None"]]
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_MAX_KEY = 1024 - len(PREFIX)
_MAX_DEPTH = 64
#: Item sizes of the Zarr v3 core data types (others are not size-checked).
_ITEM_SIZES = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "float32": 4, "float64": 8, "complex64": 8,
    "complex128": 16,
}
_KEY_RULE = ("a path of '/'-separated segments of letters, digits, '.', '_' and '-' "
             "(1-128 characters each, not starting with '.')")


def validate_array_key(key: str, field_name: str = "key") -> str:
    """A Zarr key the hierarchy may hold (see the module docstring), or INVALID_ARGUMENT."""
    if not key or len(key) > _MAX_KEY:
        raise InvalidArgument(field_name, f"key {key[:80]!r} must be 1-{_MAX_KEY} characters, "
                              f"{_KEY_RULE}", reason="INVALID_KEY")
    parts = key.split("/")
    if len(parts) > _MAX_DEPTH or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise InvalidArgument(field_name, f"invalid key {key[:200]!r}: use {_KEY_RULE}",
                              reason="INVALID_KEY")
    if METADATA in parts[:-1]:
        raise InvalidArgument(field_name, f"invalid key {key[:200]!r}: '{METADATA}' may only be "
                              "the last segment", reason="INVALID_KEY")
    return key


def validate_array_path(path: str, field_name: str = "path") -> str:
    """The path of an array or group (a key without ``/zarr.json``), or INVALID_ARGUMENT."""
    path = path.strip("/")
    if not path:
        raise InvalidArgument(field_name, "empty path: name an array, e.g. 'features'",
                              reason="INVALID_KEY")
    validate_array_key(path, field_name)
    if path.split("/")[-1] == METADATA:
        raise InvalidArgument(field_name, f"name the array ({path.rsplit('/', 1)[0]!r}), not its "
                              f"{METADATA}", reason="INVALID_KEY")
    return path


def _prefix_ok(prefix: str) -> str:
    if len(prefix) > _MAX_KEY or not set(prefix) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/"):
        raise InvalidArgument("prefix", f"invalid prefix {prefix[:200]!r}: use {_KEY_RULE}",
                              reason="INVALID_KEY")
    if prefix.startswith("/") or "//" in prefix or any(
            p.startswith(".") for p in prefix.split("/")):
        raise InvalidArgument("prefix", f"invalid prefix {prefix[:200]!r}: use {_KEY_RULE}",
                              reason="INVALID_KEY")
    return prefix


@dataclass(frozen=True)
class ArrayInfo:
    """An array of the hierarchy: its path, metadata (verbatim) and what it stores."""

    path: str
    metadata: bytes
    chunks_stored: int
    bytes_stored: int

    def message(self) -> arrays_pb2.ArrayInfo:
        """The proto view."""
        return arrays_pb2.ArrayInfo(path=self.path, metadata=self.metadata,
                                    chunks_stored=self.chunks_stored,
                                    bytes_stored=self.bytes_stored)


@dataclass
class _Dir:
    path: str
    chunks: int = 0
    nbytes: int = 0
    metadata: bytes | None = None


@dataclass
class _Head:
    """The fields of a value's first piece (or of a continuation, without version and size)."""

    index: int
    found: bool
    last: bool
    version: str = ""
    size: int = 0


@dataclass
class _Packer:
    """Packs values into serialized GetKeys responses of at most ``budget`` bytes each.

    Messages are built as wire bytes (:mod:`gristmill.client.arraywire`), so a
    chunk is copied once, when its message is joined.
    """

    budget: int
    parts: list[bytes | memoryview] = field(default_factory=list)
    used: int = 0

    def add(self, head: _Head, data: bytes, base: int = 0) -> Iterator[bytes]:
        """Add bytes of one value at offset ``base``, split into pieces as needed.

        The first piece carries ``head``'s version and size; ``head.last``
        says whether these bytes end the value. Yields the messages that filled up.
        """
        view = memoryview(data)
        offset = 0
        while True:
            first = offset == 0 and base == 0
            overhead = value_overhead(head.version if first else "")
            room = self.budget - self.used - overhead
            left = len(data) - offset
            if room <= 0 or (room < left and self.used and room < self.budget // 4):
                yield from self.flush()  # a new message rather than a sliver of this one
                continue
            take = min(room, left)
            piece = view if take == len(data) else view[offset:offset + take]
            offset += take
            self._append(head, base + offset - take, piece, head.last and offset >= len(data),
                         first)
            if offset >= len(data):
                return

    def _append(self, head: _Head, offset: int, piece: bytes | memoryview, last: bool,
                first: bool) -> None:
        parts = encode_value(head.index, head.found, offset, piece, last,
                             head.version if first else "", head.size if first else 0)
        self.parts.extend(parts)
        self.used += sum(len(p) for p in parts)
        _GRPC_BYTES.inc(len(piece))

    def flush(self) -> Iterator[bytes]:
        """The message so far, if it holds anything."""
        if self.parts:
            yield b"".join(self.parts)
        self.parts = []
        self.used = 0


@dataclass
class _RingPacker(_Packer):
    """A packer whose values' bytes go into the client's shared-memory ring.

    Each message's bytes are one ring record (each value on a 64-byte
    boundary); the message carries only where they lie, and the release
    point the client writes back once it is done with them.
    """

    ring: RingWriter | None = None
    is_active: Callable[[], bool] = lambda: True
    #: (head, offset within the value, last, first, start within the record, length)
    pending: list[tuple[_Head, int, bool, bool, int, int]] = field(default_factory=list)
    #: bytes of the record so far (``used`` also counts the message's own bytes)
    record: int = 0

    def _append(self, head: _Head, offset: int, piece: bytes | memoryview, last: bool,
                first: bool) -> None:
        start = self.record
        if len(piece):
            self.parts.append(piece)
            pad = -len(piece) % _RING_ALIGN
            if pad:
                self.parts.append(_PADDING[:pad])
            self.record += len(piece) + pad
            self.used += len(piece) + pad
        self.pending.append((head, offset, last, first, start, len(piece)))
        # the message itself: a value's fields and its place, whatever its size
        self.used += value_overhead(head.version if first else "")

    def flush(self) -> Iterator[bytes]:
        """Write the record of the message so far into the ring, then the message."""
        if not self.pending:
            return
        assert self.ring is not None
        at = release = 0
        if self.parts:
            at, length, release = self.ring.write(self.parts, self.is_active)
            _SHM_BYTES.inc(length)
        message: list[bytes | memoryview] = []
        for head, offset, last, first, start, length in self.pending:
            message += encode_value(head.index, head.found, offset, b"", last,
                                    head.version if first else "", head.size if first else 0,
                                    ring=(at + start, length) if head.found else None)
        if release:
            message.append(encode_release(release))
        self.parts, self.pending, self.used, self.record = [], [], 0, 0
        yield b"".join(message)


class ArrayStore:
    """The array service's logic over an object backend (see the module docstring).

    Args:
        backend: where the objects live.
        max_chunk_bytes: the largest value stored under one key.
        read_message_bytes: the byte budget of one GetKeys response message,
            and the most a request may ask for.
        shm_dir: the shared-memory directory of GetKeys rings (None: off).
    """

    def __init__(self, backend: ObjectBackend, *, max_chunk_bytes: int,
                 read_message_bytes: int, shm_dir: Path | None = None) -> None:
        self.backend = backend
        self.max_chunk_bytes = max_chunk_bytes
        self.read_message_bytes = read_message_bytes
        #: where clients on this host put GetKeys rings (None: no shared memory)
        self.shm_dir = shm_dir
        #: threads (per server) storing PutKeys values and reading GetKeys groups ahead
        self._io_pool = ThreadPoolExecutor(max_workers=_IO_THREADS,
                                           thread_name_prefix="gristmill-array-io")

    # -- keys -----------------------------------------------------------------------
    def get_keys(self, request: arrays_pb2.GetKeysRequest,
                 is_active: Callable[[], bool] = lambda: True) -> Iterator[bytes]:
        """Values (or ranges of them) in request order, packed into messages up to a budget.

        The messages are serialized ``GetKeysResponse``s (see :class:`_Packer`).
        """
        reads = list(request.reads)
        if len(reads) > MAX_KEYS_PER_CALL:
            raise InvalidArgument("reads", f"{len(reads)} reads in one call; at most "
                                  f"{MAX_KEYS_PER_CALL}: split the call", reason="TOO_MANY_KEYS")
        for i, r in enumerate(reads):
            validate_array_key(r.key, f"reads[{i}].key")
        if request.max_message_bytes < 0:
            raise InvalidArgument("max_message_bytes", "must not be negative; 0 means the "
                                  "server's default")
        budget = min(request.max_message_bytes or self.read_message_bytes,
                     self.read_message_bytes)
        budget = max(budget, 4096)
        if not request.HasField("ring"):
            yield from self._get_keys(reads, _Packer(budget), not request.skip_versions,
                                      is_active)
            return
        if request.ring.capacity < MIN_RING_BYTES:
            raise InvalidArgument("ring.capacity", f"a GetKeys ring needs at least "
                                  f"{MIN_RING_BYTES} bytes, got {request.ring.capacity}")
        if not request.ring.token:
            raise InvalidArgument("ring.token", "a GetKeys ring needs its token (the 16 bytes "
                                  "at byte 24 of its header)")
        try:
            ring = RingWriter.open(self.shm_dir, request.ring.name, request.ring.capacity,
                                   token=request.ring.token, keep_name=True,
                                   setting="store.shm_dir", lock_wait=_RING_LOCK_WAIT,
                                   is_active=is_active)
        except RingClosed:
            return
        try:  # two records fit the ring: one the client reads while the next is written
            packer = _RingPacker(min(budget, ring.capacity // 2), ring=ring,
                                 is_active=is_active)
            yield from self._get_keys(reads, packer, not request.skip_versions, is_active)
        except RingClosed:
            return
        finally:
            ring.close()

    def _get_keys(self, reads: Sequence[arrays_pb2.KeyRead], packer: _Packer, versions: bool,
                  is_active: Callable[[], bool]) -> Iterator[bytes]:
        starts = range(0, len(reads), _READ_GROUP)
        # the next group is read (on the shared read threads) while this one is sent
        ahead: Future[_Group] | None = None
        try:
            for start in starts:
                if not is_active():
                    return
                current = ahead.result() if ahead is not None else self._read_group(
                    reads[start:start + _READ_GROUP], versions)
                ahead = None
                if start + _READ_GROUP < len(reads):
                    ahead = self._io_pool.submit(
                        self._read_group, reads[start + _READ_GROUP:start + 2 * _READ_GROUP],
                        versions)
                for i, (r, (off, n), got) in enumerate(current):
                    yield from self._emit(packer, start + i, r.key, off, n, got, versions)
            yield from packer.flush()
        finally:
            if ahead is not None:
                ahead.cancel()

    def _read_group(self, group: Sequence[arrays_pb2.KeyRead], versions: bool = True) -> _Group:
        plans = [self._plan(r) for r in group]
        firsts = self.backend.read_many([(PREFIX + r.key, off, _first_step(n))
                                         for r, (off, n) in zip(group, plans, strict=True)],
                                        versions=versions)
        return list(zip(group, plans, firsts, strict=True))

    def _plan(self, read: arrays_pb2.KeyRead) -> tuple[int, int]:
        """(offset, length) to read; a suffix (negative offset) is resolved by a stat."""
        offset, length = read.offset, read.length if read.length > 0 else -1
        if offset >= 0:
            return offset, length
        st = self.backend.stat(PREFIX + read.key)
        size = st.size if st is not None else 0
        return max(0, size + offset), length

    def _emit(self, packer: _Packer, index: int, key: str, offset: int, length: int,
              got: tuple[bytes, ObjectStat] | None, versions: bool = True) -> Iterator[bytes]:
        """Pack one read; a value larger than its first step is read whole before any is sent.

        The rest is read at the version of the first step; if the value
        changed in between, it is read again in one read (one version), so a
        client never gets pieces of two writes and nothing sent is taken back.
        """
        if got is not None and got[1].size < 0:  # read without a stat (skip_versions)
            data, st = got
            if len(data) < _first_step(length):  # the value ended within the first step
                got = data, ObjectStat(st.key, offset + len(data), st.mtime, st.version)
            else:  # maybe more: all of it, at one version
                got = self.backend.read_versioned(PREFIX + key, offset, length)
        if got is not None:
            data, st = got
            total = _span(st.size, offset, length)
            parts = [data]
            if len(data) < total:
                rest = self.backend.read_versioned(PREFIX + key, offset + len(data),
                                                   total - len(data))
                if rest is not None and rest[1].version == st.version:
                    parts.append(rest[0])
                else:  # rewritten meanwhile: all of it, at one version
                    got = self.backend.read_versioned(PREFIX + key, offset, length)
                    if got is not None:
                        data, st = got
                        total, parts = _span(st.size, offset, length), [data]
        if got is None:
            yield from packer.add(_Head(index, found=False, last=True), b"")
            return
        done = 0
        for n, part in enumerate(parts):
            part = part[:max(0, total - done)]
            last = n == len(parts) - 1 or done + len(part) >= total
            head = (_Head(index, found=True, last=last, version=st.version if versions else "",
                          size=st.size)
                    if n == 0 else _Head(index, found=True, last=last))
            yield from packer.add(head, part, base=done)
            done += len(part)
            if last:
                return

    def put_keys(self, requests: Iterator[arrays_pb2.PutKeysRequest],
                 is_active: Callable[[], bool] = lambda: True) -> list[arrays_pb2.KeyResult]:
        """Validate and store each message's values, durably, in order; conflicts come back."""
        results: list[arrays_pb2.KeyResult] = []
        for request in requests:
            if len(results) + len(request.writes) > MAX_KEYS_PER_CALL:
                raise InvalidArgument("writes", f"more than {MAX_KEYS_PER_CALL} writes in one "
                                      "call; split it (the writes before this message were "
                                      "stored)", reason="TOO_MANY_KEYS")
            base = len(results)
            writes = list(request.writes)
            for i, w in enumerate(writes):
                self._check_write(w, f"writes[{base + i}]")
            if not is_active():
                return results
            keys = {w.key for w in writes}
            if len(writes) > 1 and len(keys) == len(writes):
                # distinct keys: their puts (each durable on its own) overlap their syncs
                results.extend(self._io_pool.map(self._put, writes))
            else:
                results.extend(self._put(w) for w in writes)  # a key twice: in order
        return results

    def _put(self, write: arrays_pb2.KeyWrite) -> arrays_pb2.KeyResult:
        res = self.backend.put(PREFIX + write.key, write.data,
                               expected_version=write.expected_version or None,
                               if_absent=write.if_absent)
        return arrays_pb2.KeyResult(key=write.key, conflict=res.conflict, version=res.version)

    def close(self) -> None:
        """Stop the I/O threads (the backend belongs to whoever opened it)."""
        self._io_pool.shutdown(wait=True, cancel_futures=True)

    def _check_write(self, write: arrays_pb2.KeyWrite, where: str) -> None:
        key = validate_array_key(write.key, f"{where}.key")
        if write.if_absent and write.expected_version:
            raise InvalidArgument(f"{where}.if_absent", "set expected_version or if_absent, "
                                  "not both")
        if key.rsplit("/", 1)[-1] == METADATA:
            self._check_metadata(key, write.data, where)
        elif len(write.data) > self.max_chunk_bytes:
            raise InvalidArgument(f"{where}.data", f"{key}: {len(write.data)} bytes is more than "
                                  f"the {self.max_chunk_bytes} bytes a chunk may have on this "
                                  "server (store.max_array_chunk_bytes); use smaller chunks",
                                  reason="CHUNK_TOO_LARGE")

    def _check_metadata(self, key: str, data: bytes, where: str) -> None:
        field_name = f"{where}.data"
        if len(data) > MAX_METADATA_BYTES:
            raise InvalidArgument(field_name, f"{key}: metadata of {len(data)} bytes; at most "
                                  f"{MAX_METADATA_BYTES}", reason="INVALID_METADATA")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidArgument(field_name, f"{key} is not valid JSON ({e})",
                                  reason="INVALID_METADATA") from None
        if not isinstance(doc, dict):
            raise InvalidArgument(field_name, f"{key} must hold a JSON object, not "
                                  f"{type(doc).__name__}", reason="INVALID_METADATA")
        if doc.get("zarr_format") != 3 or isinstance(doc.get("zarr_format"), bool):
            raise InvalidArgument(field_name, f"{key}: zarr_format must be 3 (Zarr v3), got "
                                  f"{doc.get('zarr_format')!r}", reason="INVALID_METADATA")
        node_type = doc.get("node_type")
        if node_type not in ("array", "group"):
            raise InvalidArgument(field_name, f"{key}: node_type must be 'array' or 'group', "
                                  f"got {node_type!r}", reason="INVALID_METADATA")
        path = key[:-len(METADATA)].rstrip("/")
        if not path and node_type != "group":
            raise InvalidArgument(field_name, "the root (zarr.json) must be a group: create "
                                  "arrays under a name, e.g. 'features/zarr.json'",
                                  reason="INVALID_METADATA")
        if node_type == "array":
            self._check_array(key, doc, field_name)
        parts = path.split("/") if path else []
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            got = self.backend.read_versioned(f"{PREFIX}{parent}/{METADATA}")
            if got is not None and _node_type(got[0]) == "array":
                raise InvalidArgument(field_name, f"{key}: {parent} is an array, and arrays have "
                                      "no children; pick another path",
                                      reason="INVALID_METADATA")

    def _check_array(self, key: str, doc: dict[str, object], field_name: str) -> None:
        def bad(why: str) -> InvalidArgument:
            return InvalidArgument(field_name, f"{key}: {why}", reason="INVALID_METADATA")

        shape = doc.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise bad("shape must be a list of at most 32 non-negative integers")
        grid = doc.get("chunk_grid")
        config = grid.get("configuration") if isinstance(grid, dict) else None
        chunks = config.get("chunk_shape") if isinstance(config, dict) else None
        if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(
                chunks, list) or len(chunks) != len(shape) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in chunks):
            raise bad("chunk_grid must be {'name': 'regular', 'configuration': {'chunk_shape': "
                      "[...]}} with one positive integer per dimension")
        for name in ("data_type", "codecs", "chunk_key_encoding", "fill_value"):
            if name not in doc:
                raise bad(f"missing {name!r}")
        if not isinstance(doc["codecs"], list) or not doc["codecs"]:
            raise bad("codecs must be a non-empty list")
        data_type = doc["data_type"]
        item = _ITEM_SIZES.get(data_type) if isinstance(data_type, str) else None
        if item is not None:
            raw = math.prod(chunks) * item
            if raw > self.max_chunk_bytes:
                raise bad(f"chunks of {chunks} {data_type} hold {raw} bytes, more than the "
                          f"{self.max_chunk_bytes} a chunk may have on this server "
                          "(store.max_array_chunk_bytes); use smaller chunks")

    def delete_keys(self, request: arrays_pb2.DeleteKeysRequest) -> list[arrays_pb2.KeyResult]:
        """Delete keys, each only at its expected version if one is given."""
        if len(request.deletes) > MAX_KEYS_PER_CALL:
            raise InvalidArgument("deletes", f"{len(request.deletes)} deletes in one call; at "
                                  f"most {MAX_KEYS_PER_CALL}: split the call",
                                  reason="TOO_MANY_KEYS")
        for i, d in enumerate(request.deletes):
            validate_array_key(d.key, f"deletes[{i}].key")
        results = []
        for d in request.deletes:
            res, _ = self.backend.delete(PREFIX + d.key,
                                         expected_version=d.expected_version or None)
            results.append(arrays_pb2.KeyResult(key=d.key, conflict=res.conflict,
                                                version=res.version))
        return results

    def list_keys(self, prefix: str, after: str | None, limit: int, delimiter: str = ""
                  ) -> list[tuple[str, int]]:
        """Up to ``limit`` (key, size) under ``prefix`` after ``after``, in byte order.

        With ``delimiter='/'``, deeper keys are rolled up into their next-level
        prefix (ending in '/', size 0), listed once.
        """
        _prefix_ok(prefix)
        if delimiter not in ("", "/"):
            raise InvalidArgument("delimiter", f"must be '' or '/', got {delimiter!r}")
        out: list[tuple[str, int]] = []
        start = _resume_point(after)
        while len(out) < limit:
            restarted = False
            rolled, skipped = "", 0  # the level being skipped, and how many keys of it
            for st in self.backend.list_objects(PREFIX + prefix, start_after=start):
                key = st.key[len(PREFIX):]
                if rolled and key.startswith(rolled):
                    skipped += 1
                    if skipped >= _SKIP_BEFORE_SEEK:  # a big level: list again past it
                        start, restarted = _resume_point(rolled), True
                        break
                    continue
                rest = key[len(prefix):]
                if delimiter and "/" in rest:
                    rolled, skipped = prefix + rest[:rest.index("/") + 1], 0
                    out.append((rolled, 0))
                else:
                    out.append((key, st.size))
                if len(out) >= limit:
                    break
            if not restarted:
                break
        return out

    # -- arrays ---------------------------------------------------------------------
    def list_arrays(self, after: str | None, limit: int) -> list[ArrayInfo]:
        """Up to ``limit`` arrays whose path sorts after ``after``, in key order."""
        found: list[ArrayInfo] = []
        for info in self._walk_arrays(after):
            found.append(info)
            if len(found) >= limit:
                break
        return found

    def _walk_arrays(self, after: str | None) -> Iterator[ArrayInfo]:
        """Every array in key order, with its chunk count and bytes, in one listing pass.

        The keys under ``<path>/`` are contiguous in byte order, so a stack of
        the directories above the current key is all the state needed.
        """
        stack: list[_Dir] = []
        start = f"{PREFIX}{after}/\x7f" if after else ""
        for st in self.backend.list_objects(PREFIX, start_after=start):
            parts = st.key[len(PREFIX):].split("/")
            dirs = ["/".join(parts[:i]) for i in range(1, len(parts))]
            while stack and (len(stack) > len(dirs) or stack[-1].path != dirs[len(stack) - 1]):
                yield from _finished(stack.pop())
            stack.extend(_Dir(d) for d in dirs[len(stack):])
            if parts[-1] == METADATA:
                if stack:
                    got = self.backend.read_versioned(st.key)
                    if got is not None and _node_type(got[0]) == "array":
                        stack[-1].metadata = got[0]
                continue
            for d in stack:
                d.chunks += 1
                d.nbytes += st.size
        while stack:
            yield from _finished(stack.pop())

    def _array_metadata(self, path: str) -> bytes:
        got = self.backend.read_versioned(f"{PREFIX}{path}/{METADATA}")
        if got is None:
            raise NotFound(f"no array {path!r}; list the arrays with `gristmill array list`",
                           reason="ARRAY_NOT_FOUND")
        if _node_type(got[0]) != "array":
            raise FailedPrecondition(f"{path!r} is a group, not an array",
                                     reason="NOT_AN_ARRAY")
        return got[0]

    def get_array(self, path: str) -> ArrayInfo:
        """One array: its metadata, the chunks it stores and their bytes."""
        path = validate_array_path(path)
        metadata = self._array_metadata(path)
        chunks = nbytes = 0
        for st in self.backend.list_objects(f"{PREFIX}{path}/"):
            if st.key != f"{PREFIX}{path}/{METADATA}":
                chunks += 1
                nbytes += st.size
        return ArrayInfo(path, metadata, chunks, nbytes)

    def delete_array(self, path: str) -> tuple[int, int]:
        """Delete an array's chunks, then its metadata; returns (keys deleted, bytes freed).

        Chunks go first, so that a delete cut short leaves an array (with fewer
        chunks) that can be deleted again, never chunks without an array that a
        new array of the same path would show.
        """
        path = validate_array_path(path)
        self._array_metadata(path)
        meta = f"{PREFIX}{path}/{METADATA}"
        keys = freed = 0
        for rounds in range(2):  # the second sweeps chunks written meanwhile
            for st in list(self.backend.list_objects(f"{PREFIX}{path}/")):
                if st.key == meta:
                    continue
                res, n = self.backend.delete(st.key)
                keys += 0 if res.conflict else 1
                freed += n
            if rounds == 0:
                res, n = self.backend.delete(meta)
                keys += 1
                freed += n
        return keys, freed


def _span(size: int, offset: int, length: int) -> int:
    """Bytes a read of ``length`` (-1: to the end) from ``offset`` gets of a value of ``size``."""
    end = size if length < 0 else min(size, offset + length)
    return max(0, end - offset)


def _first_step(length: int) -> int:
    return _READ_STEP if length < 0 else min(length, _READ_STEP)


def _resume_point(after: str | None) -> str:
    """The backend's start_after for a listing resumed after key (or prefix) ``after``."""
    if not after:
        return ""
    return PREFIX + after + ("\x7f" if after.endswith("/") else "")


def _node_type(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    node_type = doc.get("node_type") if isinstance(doc, dict) else None
    return node_type if isinstance(node_type, str) else None


def _finished(d: _Dir) -> Iterator[ArrayInfo]:
    if d.metadata is not None:
        yield ArrayInfo(d.path, d.metadata, d.chunks, d.nbytes)
