"""A Zarr v3 store over gristmill's ArrayService (gRPC).

:class:`GrpcZarrStore` implements ``zarr.abc.store.Store``: zarr-python (and
so any code that takes a Zarr store) reads and writes a server's array
hierarchy through it. Besides the ``Store`` methods it offers what
:mod:`gristmill.client.arrays.pipeline` needs to read many chunks in one
call and to make partial-chunk writes safe against concurrent writers:
:meth:`~GrpcZarrStore.read_values` (versions included) and
:meth:`~GrpcZarrStore.write_values` (conditional writes and deletes).

The gRPC calls block; the async ``Store`` methods run them on a thread pool
of the store's own, so zarr's event loop keeps decoding while bytes arrive.

**Shared memory.** When the server runs on the same host, the chunk bytes of
bulk reads (:meth:`~GrpcZarrStore.read_values` with ``settle``, which the
codec pipeline uses) skip the socket: the store creates a ring in
``/dev/shm`` (:mod:`gristmill.client.shm`) per concurrent call, names it in
the GetKeys request, and the server writes the values into it; zarr decodes
them where they lie. ``shared_memory=None`` (default) tries this for
loopback addresses and falls back to gRPC for good when the server cannot
open the ring.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from gristmill.client.arraywire import decode_response
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import (
    DataLoss,
    FailedPrecondition,
    call_pages,
    call_rpc,
    from_rpc_error,
)
from gristmill.client.shm import RING_BUSY, RING_UNAVAILABLE, RingReader
from gristmill.v1 import arrays_pb2, arrays_pb2_grpc

__all__ = ["MAX_KEYS_PER_CALL", "Chunk", "GrpcZarrStore", "KeyOutcome", "KeyWriteOp", "valid_key"]

log = logging.getLogger(__name__)

#: The server's limit on reads, writes or deletes of one call.
MAX_KEYS_PER_CALL = 10_000
#: Payload bytes of one PutKeys message (a larger value travels alone).
_PUT_MESSAGE_BYTES = 16 * 1024 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: Data bytes of one GetKeys ring: four messages of the server's default budget.
RING_BYTES = 16 * 1024 * 1024
T = TypeVar("T")
#: A value as read: a view into the received message (no copy).
Chunk = bytes | memoryview


def _raw(message: bytes) -> bytes:
    return message


def valid_key(key: str) -> bool:
    """Whether the server accepts ``key`` (segments of [A-Za-z0-9._-], not starting with '.').

    zarr-python probes keys the server could never hold (Zarr v2's
    ``.zarray``); reads of those are answered "absent" without a call.
    """
    parts = key.split("/")
    return (0 < len(key) <= 1017 and all(_SEGMENT.fullmatch(p) for p in parts)
            and "zarr.json" not in parts[:-1])


@dataclass(frozen=True)
class KeyWriteOp:
    """One conditional write (``data``) or delete (``data is None``) of a key.

    ``expected`` is the version the key must still have, ``""`` for "must
    still be absent", or None for an unconditional write.
    """

    key: str
    data: bytes | None
    expected: str | None = None


@dataclass(frozen=True)
class KeyOutcome:
    """The result of one :class:`KeyWriteOp`: whether its condition failed; the version now."""

    key: str
    conflict: bool
    version: str


def _to_range(byte_range: ByteRequest | None) -> tuple[int, int] | None:
    """(offset, length) for GetKeys (length 0: to the end); None for an empty range."""
    if byte_range is None:
        return 0, 0
    if isinstance(byte_range, RangeByteRequest):
        if byte_range.end <= byte_range.start:
            return None
        return byte_range.start, byte_range.end - byte_range.start
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, 0
    if isinstance(byte_range, SuffixByteRequest):
        return (-byte_range.suffix, 0) if byte_range.suffix > 0 else None
    raise TypeError(f"unexpected byte range {byte_range!r}")


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names this host (localhost, 127.0.0.0/8, ::1)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RingPool:
    """The GetKeys rings of a store: one per call in flight, reused call after call.

    ``mode`` is the store's ``shared_memory`` setting; in automatic mode
    (None) the first refusal (the server cannot open the ring, or /dev/shm
    has no room) turns rings off for good.
    """

    def __init__(self, mode: bool | None, address: str) -> None:
        self.mode = mode
        self.on = mode is True or (mode is None and is_loopback(address))
        self._free: list[RingReader] = []
        self._all: set[RingReader] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # rings belong to this process, not to a forked child

    def take(self) -> RingReader | None:
        """A ring for one call, or None: read over gRPC.

        Rings are created under the lock, so that :meth:`close` never misses one.
        """
        with self._lock:
            if not self.on or self._closed or os.getpid() != self._pid:
                return None
            if self._free:
                return self._free.pop()
            try:
                ring = RingReader.create(RING_BYTES)
            except FailedPrecondition as e:
                refusal = e
            else:
                self._all.add(ring)
                return ring
        if self.refused(refusal):
            return None
        raise refusal

    def give(self, ring: RingReader, clean: bool) -> None:
        """Return a ring after its call; a call that did not end cleanly loses its ring.

        (A server may still be writing into the ring of a call cut short.)
        """
        with self._lock:
            if clean and self.on and not self._closed:
                self._free.append(ring)
                return
            self._all.discard(ring)
        ring.close()

    def refused(self, error: FailedPrecondition) -> bool:
        """Whether ``error`` turns rings off (automatic mode, reason SHM_RING_UNAVAILABLE).

        Rings not in use are closed then; those in use are when they come back.
        """
        if self.mode is not None or error.reason != RING_UNAVAILABLE:
            return False
        with self._lock:
            if self.on:
                log.info("array values go over gRPC: %s", error.message)
            self.on = False
            idle, self._free = self._free, []
            self._all.difference_update(idle)
        for ring in idle:
            ring.close()
        return True

    def close(self) -> None:
        """Close every ring (their names go from /dev/shm); in a forked child, nothing.

        A child that drops its copy of the store must not remove the rings
        its parent still uses.
        """
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._closed = True
            rings, self._all, self._free = list(self._all), set(), []
        for ring in rings:
            ring.close()


class GrpcZarrStore(Store):
    """The array hierarchy of a gristmill server, as a Zarr v3 store.

    Args:
        address: ``host:port``; default ``GRISTMILL_ADDRESS`` or 127.0.0.1:7450.
        api_key: default ``GRISTMILL_API_KEY`` (a reader key reads, a writer writes).
        ca_file: PEM root certificate for TLS; default ``GRISTMILL_CA_FILE``.
        read_only: refuse writes on this side.
        threads: gRPC calls that may run at once (parallel chunk fetches).
        shared_memory: chunk bytes of bulk reads through a ring in
            ``/dev/shm`` (or ``GRISTMILL_SHM_DIR``) instead of the socket.
            None (default): for a loopback address, until the server cannot
            open a ring (another host or /dev/shm, ``store.shm_dir`` unset);
            True: required (an error otherwise); False: never.
    """

    supports_writes = True
    supports_deletes = True
    supports_listing = True

    def __init__(self, address: str | None = None, *, api_key: str | None = None,
                 ca_file: Path | str | None = None, read_only: bool = False,
                 threads: int = 16, shared_memory: bool | None = None,
                 _shared: GrpcZarrStore | None = None) -> None:
        super().__init__(read_only=read_only)
        self._options: ConnectionOptions
        self._channel: grpc.Channel
        self._pool: ThreadPoolExecutor
        self._rings: _RingPool
        if _shared is not None:  # with_read_only: same connection
            self._options = _shared._options
            self._channel = _shared._channel
            self._pool = _shared._pool
            self._rings = _shared._rings
            self._owner = False
            self._parent: GrpcZarrStore | None = _shared  # its rings live while this store does
        else:
            self._options = ConnectionOptions(address, api_key,
                                              Path(ca_file) if ca_file else None).resolved()
            self._channel = open_channel(self._options)
            self._pool = ThreadPoolExecutor(max_workers=max(2, threads),
                                            thread_name_prefix="gristmill-arrays")
            assert self._options.address is not None
            self._rings = _RingPool(shared_memory, self._options.address)
            # a store never closed still removes its rings' names (at collection or exit)
            weakref.finalize(self, self._rings.close)
            self._owner = True
            self._parent = None
        self._stub = arrays_pb2_grpc.ArrayServiceStub(self._channel)
        self._pid = os.getpid()
        # GetKeys responses are read as wire bytes (gristmill.client.arraywire): no copies
        self._get_keys_raw = self._channel.unary_stream(
            "/gristmill.v1.ArrayService/GetKeys",
            request_serializer=arrays_pb2.GetKeysRequest.SerializeToString,
            response_deserializer=_raw)

    # -- identity -------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The server's ``host:port``."""
        assert self._options.address is not None
        return self._options.address

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GrpcZarrStore) and other.address == self.address
                and other.read_only == self.read_only)

    def __hash__(self) -> int:
        return hash((self.address, self.read_only))

    def __str__(self) -> str:
        return f"gristmill://{self.address}"

    def __repr__(self) -> str:
        return f"GrpcZarrStore({self.address!r}, read_only={self.read_only})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a GrpcZarrStore holds a connection and cannot be pickled; open "
                        "one in each process")

    def with_read_only(self, read_only: bool = False) -> GrpcZarrStore:
        """A store on the same connection with another read-only setting."""
        return GrpcZarrStore(read_only=read_only, _shared=self)

    def close(self) -> None:
        """Close the connection (when this store opened it)."""
        super().close()
        if self._owner:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._channel.close()
            self._rings.close()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (of this store's) on the store's threads."""
        self._check_process()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _check_process(self) -> None:
        """A gRPC connection does not survive fork(): refuse clearly instead of hanging."""
        if os.getpid() != self._pid:
            raise FailedPrecondition(
                f"this connection to {self.address} was opened in another process (before a "
                "fork); open the File (or store) again in each process, e.g. in each "
                "DataLoader worker", reason="OPENED_BEFORE_FORK")

    # -- blocking calls ---------------------------------------------------------------
    def read_values(self, reads: Sequence[tuple[str, int, int]],
                    deliver: Callable[[int, Chunk | None, str], None],
                    versions: bool = True, settle: Callable[[], None] | None = None) -> None:
        """Read ``(key, offset, length)`` triples; ``deliver(index, bytes or None, version)``.

        Values are delivered in request order as they arrive (several
        GetKeys calls for more than :data:`MAX_KEYS_PER_CALL` reads). A key
        the server could not hold is delivered as absent. With
        ``versions=False`` the versions are "" (faster on some backends).

        Without ``settle`` the delivered bytes are the caller's to keep. With
        ``settle`` they may be views into a shared-memory ring (see the
        module notes), valid only until ``settle`` returns: it is called
        after each message's values and must return once the caller is done
        with every value delivered so far (or raise to abandon the read).
        """
        self._check_process()
        for start in range(0, len(reads), MAX_KEYS_PER_CALL):
            part = reads[start:start + MAX_KEYS_PER_CALL]
            asked: list[int] = []
            request = arrays_pb2.GetKeysRequest(skip_versions=not versions)
            for i, (key, offset, length) in enumerate(part):
                if valid_key(key):
                    request.reads.add(key=key, offset=offset, length=length)
                    asked.append(start + i)
                else:
                    deliver(start + i, None, "")
            if asked:
                self._get_keys(request, asked, deliver, settle)

    def _get_keys(self, request: arrays_pb2.GetKeysRequest, asked: list[int],
                  deliver: Callable[[int, Chunk | None, str], None],
                  settle: Callable[[], None] | None) -> None:
        """One GetKeys call, through a ring when ``settle`` allows one and the store has one."""
        ring = self._rings.take() if settle is not None else None
        if ring is None:
            self._stream(request, asked, deliver, None, None)
            return
        request.ring.name, request.ring.capacity, request.ring.token = (
            ring.name, ring.capacity, ring.token)
        ring.release(0)  # each call's writer starts at the ring's beginning
        clean = False
        started: list[bool] = []
        try:
            self._stream(request, asked, deliver, settle, ring, started)
            clean = True
        except FailedPrecondition as e:
            # refused before anything was sent: read the same values without it (a ring
            # another call still writes into is given up; a refusal turns rings off)
            clean = not started and e.reason == RING_UNAVAILABLE
            if started or not (e.reason == RING_BUSY or self._rings.refused(e)):
                raise
            request.ClearField("ring")
            self._stream(request, asked, deliver, None, None)
        finally:
            self._rings.give(ring, clean)

    def _stream(self, request: arrays_pb2.GetKeysRequest, asked: list[int],
                deliver: Callable[[int, Chunk | None, str], None],
                settle: Callable[[], None] | None, ring: RingReader | None,
                started: list[bool] | None = None) -> None:
        pending: bytearray | None = None
        version = ""
        expect = 0  # the read whose value is due next
        call = self._get_keys_raw(request)
        try:
            for message in call:
                if started is not None and not started:
                    started.append(True)
                try:
                    response = decode_response(message)
                except ValueError as e:
                    raise DataLoss(f"a GetKeys response from {self.address} does not parse "
                                   f"({e}); retry", reason="BAD_RESPONSE") from None
                in_ring = False  # whether this message's values lie in the ring
                for v in response.values:
                    if v.index != expect or v.index >= len(asked):
                        raise DataLoss(f"the server sent value {v.index} where {expect} was due; "
                                       "retry", reason="BAD_RESPONSE")
                    if not v.found:
                        deliver(asked[v.index], None, "")
                        expect += 1
                        continue
                    data: Chunk = v.data
                    if v.ring_length or v.ring_offset:
                        data = self._in_ring(ring, v.ring_offset, v.ring_length)
                        in_ring = True
                    if pending is None:
                        version = v.version
                        if v.last:  # the common case: one piece, no copy
                            deliver(asked[v.index], data, version)
                            expect += 1
                            continue
                        pending = bytearray()
                    if v.offset != len(pending):
                        raise DataLoss(f"piece of {request.reads[v.index].key} at offset "
                                       f"{v.offset} where {len(pending)} was due; retry",
                                       reason="BAD_RESPONSE")
                    pending += data
                    if v.last:
                        deliver(asked[v.index], memoryview(pending), version)
                        pending = None
                        expect += 1
                if in_ring:
                    if not 0 < response.ring_release < 1 << 63:
                        raise DataLoss(f"a GetKeys response from {self.address} placed values "
                                       f"in the ring without a valid release point "
                                       f"({response.ring_release}); retry",
                                       reason="BAD_RESPONSE")
                    assert ring is not None and settle is not None
                    settle()
                    ring.release(response.ring_release)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the call has ended; else the server stops
        if expect != len(asked):
            raise DataLoss(f"the server ended GetKeys after {expect} of {len(asked)} values; "
                           "retry", reason="BAD_RESPONSE")

    def _in_ring(self, ring: RingReader | None, offset: int, length: int) -> memoryview:
        """A value's bytes in the call's ring, checked against the ring's bounds.

        (A call has a ring only when its caller gave ``settle``: see :meth:`_get_keys`.)
        """
        if ring is None or offset < 0 or length < 0 or offset + length > ring.capacity:
            raise DataLoss(f"the server from {self.address} placed a value at {offset}+{length}, "
                           "outside the call's ring; retry", reason="BAD_RESPONSE")
        return memoryview(ring.view(offset, length).data)

    def fetch(self, reads: Sequence[tuple[str, int, int]]) -> list[tuple[Chunk | None, str]]:
        """``(bytes or None, version)`` per read (one GetKeys call per 10,000)."""
        out: list[tuple[Chunk | None, str]] = [(None, "")] * len(reads)

        def keep(i: int, data: Chunk | None, version: str) -> None:
            out[i] = (data, version)

        self.read_values(reads, keep)
        return out

    def write_values(self, ops: Sequence[KeyWriteOp]) -> list[KeyOutcome]:
        """Apply writes (one PutKeys call) and deletes (one DeleteKeys call); outcomes in order."""
        self._check_writable()
        self._check_process()
        outcomes: list[KeyOutcome | None] = [None] * len(ops)
        writes = [(i, op) for i, op in enumerate(ops) if op.data is not None]
        deletes = [(i, op) for i, op in enumerate(ops) if op.data is None]
        for start in range(0, len(writes), MAX_KEYS_PER_CALL):
            part = writes[start:start + MAX_KEYS_PER_CALL]
            response = call_rpc(self._stub.PutKeys, _put_messages([op for _, op in part]))
            for (i, _), r in zip(part, response.results, strict=True):
                outcomes[i] = KeyOutcome(r.key, r.conflict, r.version)
        for start in range(0, len(deletes), MAX_KEYS_PER_CALL):
            dpart = deletes[start:start + MAX_KEYS_PER_CALL]
            request = arrays_pb2.DeleteKeysRequest(deletes=[
                arrays_pb2.KeyDelete(key=op.key, expected_version=op.expected or "")
                for _, op in dpart])
            dresponse = call_rpc(self._stub.DeleteKeys, request)
            for (i, _), r in zip(dpart, dresponse.results, strict=True):
                outcomes[i] = KeyOutcome(r.key, r.conflict, r.version)
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    def list_keys(self, prefix: str = "", delimiter: str = "") -> Iterator[tuple[str, int]]:
        """``(key, size)`` under ``prefix`` in byte order, all pages."""
        request = arrays_pb2.ListKeysRequest(prefix=prefix, page_size=10_000,
                                             delimiter=delimiter)
        for page in call_pages(self._stub.ListKeys, request):
            for k in page.keys:
                yield k.key, k.size

    def array_info(self, path: str) -> arrays_pb2.ArrayInfo:
        """The server's view of one array (metadata, chunks and bytes stored)."""
        return call_rpc(self._stub.GetArray, arrays_pb2.GetArrayRequest(path=path)).array

    def list_arrays(self) -> Iterator[arrays_pb2.ArrayInfo]:
        """Every array of the hierarchy, by path."""
        request = arrays_pb2.ListArraysRequest(page_size=1000)
        for page in call_pages(self._stub.ListArrays, request):
            yield from page.arrays

    def delete_array(self, path: str) -> arrays_pb2.DeleteArrayResponse:
        """Delete an array (metadata and chunks) in one call."""
        self._check_writable()
        return call_rpc(self._stub.DeleteArray, arrays_pb2.DeleteArrayRequest(path=path))

    def _sync_list(self, prefix: str, delimiter: str = "") -> list[tuple[str, int]]:
        return list(self.list_keys(prefix, delimiter))

    # -- zarr.abc.store.Store ---------------------------------------------------------
    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        """The value (or a range of it), or None if the key is not stored."""
        await self._ensure_open()
        prototype = prototype or default_buffer_prototype()
        span = _to_range(byte_range)
        if span is None:
            return prototype.buffer.from_bytes(b"") if await self.exists(key) else None
        [(data, _)] = await self.run_blocking(self.fetch, [(key, span[0], span[1])])
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        """Many (ranges of) values in one GetKeys call."""
        await self._ensure_open()
        pairs = list(key_ranges)
        spans = [_to_range(r) for _, r in pairs]
        reads = [(k, s[0], s[1]) for (k, _), s in zip(pairs, spans, strict=True)
                 if s is not None]
        got = iter(await self.run_blocking(self.fetch, reads))
        out: list[Buffer | None] = []
        for span in spans:
            if span is None:
                out.append(prototype.buffer.from_bytes(b""))
                continue
            data, _ = next(got)
            out.append(None if data is None else prototype.buffer.from_bytes(data))
        return out

    async def exists(self, key: str) -> bool:
        """Whether the key is stored."""
        await self._ensure_open()
        if not valid_key(key):
            return False
        found = await self.run_blocking(self._first, key)
        return found is not None and found[0] == key

    def _first(self, prefix: str) -> tuple[str, int] | None:
        page = call_rpc(self._stub.ListKeys, arrays_pb2.ListKeysRequest(prefix=prefix,
                                                                        page_size=1))
        return (page.keys[0].key, page.keys[0].size) if page.keys else None

    async def set(self, key: str, value: Buffer) -> None:
        """Store a value (durable when this returns)."""
        await self._ensure_open()
        self._check_writable()
        await self.run_blocking(self.write_values, [KeyWriteOp(key, value.to_bytes())])

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        """Store a value unless the key is stored (atomic on the server)."""
        await self._ensure_open()
        self._check_writable()
        await self.run_blocking(self.write_values, [KeyWriteOp(key, value.to_bytes(), "")])

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        self._check_writable()
        ops = [KeyWriteOp(k, v.to_bytes()) for k, v in values]
        await self.run_blocking(self.write_values, ops)

    async def delete(self, key: str) -> None:
        """Remove a key (absent keys are fine)."""
        await self._ensure_open()
        self._check_writable()
        if valid_key(key):
            await self.run_blocking(self.write_values, [KeyWriteOp(key, None)])

    async def delete_dir(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (batched DeleteKeys calls)."""
        await self._ensure_open()
        self._check_writable()
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        keys = [k for k, _ in await self.run_blocking(self._sync_list, prefix)]
        await self.run_blocking(self.write_values, [KeyWriteOp(k, None) for k in keys])

    @property
    def supports_consolidated_metadata(self) -> bool:
        """No: the server's listing is the one source of what exists."""
        return False

    async def list(self) -> AsyncIterator[str]:
        """Every key."""
        for key, _ in await self.run_blocking(self._sync_list, ""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        """Every key starting with ``prefix``."""
        for key, _ in await self.run_blocking(self._sync_list, prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        """Names directly under ``prefix`` (keys and next-level prefixes, without '/')."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for key, _ in await self.run_blocking(self._sync_list, prefix, "/"):
            yield key[len(prefix):].rstrip("/")

    async def getsize(self, key: str) -> int:
        """Bytes stored under ``key``; FileNotFoundError if absent."""
        await self._ensure_open()
        found = await self.run_blocking(self._first, key) if valid_key(key) else None
        if found is None or found[0] != key:
            raise FileNotFoundError(key)
        return found[1]

    async def getsize_prefix(self, prefix: str) -> int:
        """Bytes stored under ``prefix``."""
        return sum(n for _, n in await self.run_blocking(self._sync_list, prefix))

    async def _open(self) -> None:
        await super()._open()

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> Self:
        """Create and open the store (zarr's protocol)."""
        store = cls(*args, **kwargs)
        await store._open()
        return store


def _put_messages(ops: Sequence[KeyWriteOp]) -> Iterator[arrays_pb2.PutKeysRequest]:
    message = arrays_pb2.PutKeysRequest()
    size = 0
    for op in ops:
        assert op.data is not None
        if message.writes and size + len(op.data) > _PUT_MESSAGE_BYTES:
            yield message
            message, size = arrays_pb2.PutKeysRequest(), 0
        message.writes.add(key=op.key, data=op.data, expected_version=op.expected or "",
                           if_absent=op.expected == "")
        size += len(op.data)
    if message.writes:
        yield message
