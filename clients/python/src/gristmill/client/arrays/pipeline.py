"""zarr-python's codec pipeline, with batched fetches, safe partial writes and named corruption.

:class:`GristmillCodecPipeline` is zarr's ``BatchedCodecPipeline`` (same
codecs, same selection: zarr's indexer hands it the chunks of a selection)
with three changes in how chunk bytes move:

- **Reads** over a :class:`~gristmill.client.arrays.store.GrpcZarrStore`
  ask for many chunks in one GetKeys call (``njobs`` calls at once) and
  decode each chunk as soon as its bytes arrive; over any other store, up to
  ``njobs`` chunks are read at once.
- **Writes** of partial chunks over a ``GrpcZarrStore`` are read-modify-write
  with a version check: the chunk is read with its version, merged, encoded
  and written only if the stored version is still the one read (or the chunk
  still absent). A chunk whose condition failed is read, merged and written
  again, so a concurrent writer's update is never lost. Whole chunks are
  written without a read (their new value does not depend on the old one).
- **A chunk that fails to decode** (its crc32c checksum does not match, a
  codec rejects it) raises :class:`~gristmill.client.errors.DataLoss` naming
  the chunk's key, instead of a bare ``ValueError``.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Self, TypeAlias

from zarr.abc.store import ByteGetter, ByteSetter
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.codec_pipeline import BatchedCodecPipeline, fill_value_or_default
from zarr.core.common import concurrent_map
from zarr.core.indexing import SelectorTuple
from zarr.core.metadata import ArrayV3Metadata

from gristmill.client.arrays.store import MAX_KEYS_PER_CALL, Chunk, GrpcZarrStore, KeyWriteOp
from gristmill.client.errors import Aborted, DataLoss, GristmillError

__all__ = ["GristmillCodecPipeline"]

#: Raw (decoded) bytes of the chunks one call reads or writes, at most.
_CALL_BYTES = 64 * 1024 * 1024
#: Seconds between checks, while the fetch waits for placing, that the read goes on.
_SETTLE_POLL = 0.05
#: Attempts of one partial-chunk write under contention before it gives up.
_MAX_ATTEMPTS = 64


class _Abandoned(Exception):
    """The fetch of a read whose placing stopped (it failed or was cancelled)."""


ReadItem: TypeAlias = tuple[ByteGetter, ArraySpec, SelectorTuple, SelectorTuple, bool]
WriteItem: TypeAlias = tuple[ByteSetter, ArraySpec, SelectorTuple, SelectorTuple, bool]


def _key(item: ReadItem | WriteItem) -> str:
    return str(getattr(item[0], "path", item[0]))


def _raw_bytes(spec: ArraySpec) -> int:
    return max(1, math.prod(spec.shape) * spec.dtype.to_native_dtype().itemsize)


@dataclass(frozen=True)
class GristmillCodecPipeline(BatchedCodecPipeline):
    """zarr's batched pipeline with gristmill's fetches and conditional writes (module doc)."""

    #: Calls (or, on a local store, chunk reads) in flight at once.
    njobs: int = 4

    @classmethod
    def for_metadata(cls, metadata: ArrayV3Metadata, njobs: int) -> Self:
        """The pipeline of an array's codecs."""
        return replace(cls.from_codecs(metadata.codecs), njobs=max(1, njobs))

    def _calls(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        """Split items into calls: at least one per job, bounded by count and raw bytes."""
        per_job = math.ceil(len(items) / self.njobs)
        by_bytes = max(1, _CALL_BYTES // _raw_bytes(items[0][1]))
        size = max(1, min(per_job, by_bytes, MAX_KEYS_PER_CALL))
        return [items[i:i + size] for i in range(0, len(items), size)]

    # -- reads ----------------------------------------------------------------------
    async def read(self, batch_info: Iterable[ReadItem], out: NDBuffer,
                   drop_axes: tuple[int, ...] = ()) -> None:
        """Fetch, decode and place the chunks of a selection (see the module docstring)."""
        items = list(batch_info)
        if not items:
            return
        if self.supports_partial_decode:
            await super().read(items, out, drop_axes)
            return
        store = getattr(items[0][0], "store", None)
        if isinstance(store, GrpcZarrStore):
            await _all_or_nothing([partial(self._read_call, store, call, out, drop_axes)
                                   for call in self._calls(items)], self.njobs)
            return

        async def one(item: ReadItem) -> None:
            await self._place(item, await item[0].get(prototype=item[1].prototype), out,
                              drop_axes)

        await concurrent_map([(item,) for item in items], one, self.njobs)

    async def _read_call(self, store: GrpcZarrStore, items: Sequence[ReadItem], out: NDBuffer,
                         drop_axes: tuple[int, ...]) -> None:
        """One GetKeys call; each chunk is decoded and placed as soon as it arrives.

        The values may lie in the store's shared-memory ring: after each
        message the fetching thread waits (``settle``) until the chunks
        delivered so far are placed, so the server reuses their space only then.
        """
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[tuple[int, Chunk | None] | threading.Event | None] = \
            asyncio.Queue()
        stopped = threading.Event()  # this call's placing is over: settle must not wait

        def deliver(index: int, data: Chunk | None, _version: str) -> None:
            loop.call_soon_threadsafe(arrived.put_nowait, (index, data))

        def settle() -> None:
            placed = threading.Event()
            loop.call_soon_threadsafe(arrived.put_nowait, placed)
            while not placed.wait(_SETTLE_POLL):
                if stopped.is_set() or loop.is_closed() or not loop.is_running():
                    break
            if not placed.is_set():
                raise _Abandoned("the read was abandoned")

        def fetch() -> None:
            try:
                # a plain read: no version needed (no conditional write follows)
                store.read_values([(_key(item), 0, 0) for item in items], deliver,
                                  versions=False, settle=settle)
            finally:
                loop.call_soon_threadsafe(arrived.put_nowait, None)

        call = asyncio.ensure_future(store.run_blocking(fetch))
        # a call that never ran (refused before it started) must still end the wait below
        call.add_done_callback(lambda done: None if not done.cancelled() and done.exception()
                               is None else arrived.put_nowait(None))
        placing: list[asyncio.Task[None]] = []
        settled = 0  # placing[:settled] are done
        try:
            while (got := await arrived.get()) is not None:
                if isinstance(got, threading.Event):  # the fetch waits for what it delivered
                    if placing[settled:]:
                        await asyncio.wait(placing[settled:])
                    settled = len(placing)
                    got.set()
                    continue
                index, data = got
                item = items[index]
                buffer = None if data is None else item[1].prototype.buffer.from_bytes(data)
                placing.append(asyncio.ensure_future(self._place(item, buffer, out, drop_axes)))
            await call
        finally:
            stopped.set()
            results = await asyncio.gather(*placing, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _place(self, item: ReadItem, data: Buffer | None, out: NDBuffer,
                     drop_axes: tuple[int, ...]) -> None:
        _, spec, chunk_selection, out_selection, _ = item
        chunk = await self._decode(_key(item), data, spec)
        if chunk is None:
            out[out_selection] = fill_value_or_default(spec)
            return
        piece = chunk[chunk_selection]
        if drop_axes:
            piece = piece.squeeze(axis=drop_axes)
        out[out_selection] = piece

    async def _decode(self, key: str, data: Buffer | None, spec: ArraySpec) -> NDBuffer | None:
        if data is None:
            return None
        try:
            [chunk] = await self.decode_batch([(data, spec)])
        except GristmillError:
            raise
        except Exception as e:  # a codec's own error (checksum, size, format)
            raise DataLoss(f"chunk {key} is corrupt: {type(e).__name__}: {e}. Write the chunk "
                           "again (or delete the key) to repair it", reason="CHUNK_CORRUPT",
                           metadata={"key": key}) from e
        return chunk

    # -- writes ---------------------------------------------------------------------
    async def write(self, batch_info: Iterable[WriteItem], value: NDBuffer,
                    drop_axes: tuple[int, ...] = ()) -> None:
        """Merge ``value`` into the chunks of a selection and store them (module docstring)."""
        items = list(batch_info)
        if not items:
            return
        store = getattr(items[0][0], "store", None)
        if self.supports_partial_encode or not isinstance(store, GrpcZarrStore):
            await super().write(items, value, drop_axes)
            return
        await _all_or_nothing([partial(self._write_call, store, call, value, drop_axes)
                               for call in self._calls(items)], self.njobs)

    async def _write_call(self, store: GrpcZarrStore, items: Sequence[WriteItem],
                          value: NDBuffer, drop_axes: tuple[int, ...]) -> None:
        """Read-merge-write the chunks of one call until none lost a race."""
        pending = list(items)
        for attempt in range(_MAX_ATTEMPTS):
            partial = [_key(it) for it in pending if not it[4]]
            seen: dict[str, tuple[Chunk | None, str]] = {}
            if partial:
                got = await store.run_blocking(store.fetch, [(k, 0, 0) for k in partial])
                seen = dict(zip(partial, got, strict=True))
            old = await asyncio.gather(*(
                self._decode(_key(it), _buffer(it, seen), it[1]) for it in pending))
            merged: list[NDBuffer | None] = []
            for it, chunk in zip(pending, old, strict=True):
                _, spec, chunk_selection, out_selection, complete = it
                new = self._merge_chunk_array(chunk, value, out_selection, spec,
                                              chunk_selection, complete, drop_axes)
                empty = (not spec.config.write_empty_chunks
                         and new.all_equal(fill_value_or_default(spec)))
                merged.append(None if empty else new)
            encoded = list(await self.encode_batch(
                [(m, it[1]) for m, it in zip(merged, pending, strict=True)]))
            ops: list[KeyWriteOp] = []
            sent: list[WriteItem] = []
            for it, data in zip(pending, encoded, strict=True):
                key = _key(it)
                expected = None if it[4] else seen[key][1]  # "" when it was absent
                if data is None and expected == "":
                    continue  # nothing stored, nothing to store
                ops.append(KeyWriteOp(key, None if data is None else data.to_bytes(), expected))
                sent.append(it)
            outcomes = await store.run_blocking(store.write_values, ops) if ops else []
            pending = [it for it, o in zip(sent, outcomes, strict=True) if o.conflict]
            if not pending:
                return
            await asyncio.sleep(random.random() * min(0.1, 0.002 * 2 ** attempt))
        keys = ", ".join(_key(it) for it in pending[:3])
        raise Aborted(f"chunk(s) {keys} kept changing under concurrent writers ({_MAX_ATTEMPTS} "
                      "attempts); nothing of this write was lost, but it is not complete: "
                      "write it again", reason="WRITE_CONTENDED")


def _buffer(item: WriteItem, seen: dict[str, tuple[Chunk | None, str]]) -> Buffer | None:
    data = seen.get(_key(item), (None, ""))[0]
    return None if data is None else item[1].prototype.buffer.from_bytes(data)


async def _all_or_nothing(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run jobs, ``limit`` at a time; on the first failure cancel the rest and raise it."""
    gate = asyncio.Semaphore(limit)

    async def gated(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    tasks = [asyncio.ensure_future(gated(job)) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
