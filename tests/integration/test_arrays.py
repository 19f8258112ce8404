"""N-d arrays (Zarr v3) through gristmill.client.arrays: a real server on port 0 and a directory.

Server-based tests run on both storage backends: the ``storage`` fixture for
``array_server``, and the server targets of ``target`` (the Ceph ones in the
session's cluster, a RADOS namespace per server).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import h5py
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gristmill.cli.main import main
from gristmill.client.arrays import Dataset, File, GrpcZarrStore
from gristmill.client.arrays.store import KeyWriteOp
from gristmill.client.arraywire import decode_response, encode_release, encode_value
from gristmill.client.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from gristmill.client.shm import RING_UNAVAILABLE, RingReader, RingWriter
from gristmill.common.server import create_server, ensure_admin_key
from gristmill.common.service import select_services
from gristmill.store.arrays import MIN_RING_BYTES, ArrayStore
from gristmill.store.arrays_service import SERVICE as ARRAYS
from gristmill.store.fsobjects import FsBackend
from gristmill.v1 import arrays_pb2 as pb
from gristmill.v1 import arrays_pb2_grpc
from tests.helpers import ROOT, Running, both_backends, ceph_backend, config_for

#: every numpy numeric dtype and bool, both byte orders where they have one
DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128", ">i4", ">f8"]
GROUP = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def array_meta(shape: list[int], chunks: list[int], data_type: str = "uint8") -> bytes:
    return json.dumps({
        "zarr_format": 3, "node_type": "array", "shape": shape, "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    }).encode()


# -- servers ----------------------------------------------------------------------------
storage = both_backends()


def store_backend(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``store`` config section selecting backend ``kind`` ("fs" or "ceph")."""
    if kind == "fs":
        return {}
    assert kind == "ceph", kind
    return {"backend": ceph_backend(request.getfixturevalue("ceph_cluster"))}


def start_array_server(data_dir: Path, store: dict[str, Any] | None = None,
                       **overrides: Any) -> Running:
    """Store and array services in this process on port 0 (``store``: that config section)."""
    config = config_for(data_dir, store=store or {}, **overrides)
    key_file = ensure_admin_key(config)
    assert key_file is not None
    installed = select_services(("store",))
    specs = installed if any(s.name == "arrays" for s in installed) else [*installed, ARRAYS]
    server, port = create_server(config, specs)
    server.start()
    return Running(f"127.0.0.1:{port}", config, key_file.read_text().strip(), server=server)


def stop(running: Running) -> None:
    assert running.server is not None
    running.server.stop(0)


@pytest.fixture
def array_server(tmp_path: Path, storage: str, request: pytest.FixtureRequest
                 ) -> Iterator[Running]:
    running = start_array_server(tmp_path / "data", store_backend(storage, request))
    yield running
    stop(running)


def dataset(group: Any, name: str) -> Dataset:
    """``group[name]``, which must be a dataset."""
    node = group[name]
    assert isinstance(node, Dataset)
    return node


def stub(running: Running, key: str | None = "admin") -> arrays_pb2_grpc.ArrayServiceStub:
    return arrays_pb2_grpc.ArrayServiceStub(running.channel(key))


def array_store(running: Running) -> ArrayStore:
    assert running.server is not None
    arrays = running.server.context.local["arrays"]
    assert isinstance(arrays, ArrayStore)
    return arrays


@dataclass
class Target:
    """Where a File opens: a server address or a directory."""

    kind: str
    target: str
    api_key: str | None

    def open(self, mode: str = "a", **kw: Any) -> File:
        return File(self.target, mode, api_key=self.api_key, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["server-fs", "server-ceph", "local"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A File target: a server on either backend, or a directory (no backend at all)."""
    if request.param == "local":
        yield Target("local", str(tmp_path / "local.zarr"), None)
        return
    running = start_array_server(tmp_path / "data",
                                 store_backend(request.param.split("-")[1], request))
    yield Target("server", running.address, running.admin_key)
    stop(running)


# -- random round trips -----------------------------------------------------------------
def random_values(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...]
                  ) -> np.ndarray:
    """An array (0-d included, never a numpy scalar) of random values of ``dtype``."""
    return np.asarray(_random_values(rng, dtype, shape), dtype=dtype)


def _random_values(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...]
                   ) -> np.ndarray:
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=np.dtype(dtype.name),
                            endpoint=True).astype(dtype)
    values = rng.standard_normal(size=shape) * 100
    if dtype.kind == "c":
        values = values + 1j * rng.standard_normal(size=shape)
    out = np.asarray(values).astype(dtype)
    if out.size:
        out.flat[rng.integers(0, out.size)] = np.nan  # NaN survives the round trip
    return out


@st.composite
def selections(draw: st.DrawFn, shape: tuple[int, ...]) -> Any:
    items: list[Any] = []
    for n in shape:
        if n and draw(st.booleans()):
            items.append(draw(st.integers(-n, n - 1)))
        else:
            bound = st.none() | st.integers(-n - 2, n + 2)
            items.append(slice(draw(bound), draw(bound), draw(st.none() | st.integers(1, 4))))
    if len(shape) > 0 and draw(st.booleans()):  # an Ellipsis standing for some leading axes
        cut = draw(st.integers(0, len(items)))
        items = [Ellipsis, *items[cut:]]
    return tuple(items) if len(items) != 1 or draw(st.booleans()) else items[0]


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, tuple[int, ...], tuple[int, ...], Any, Any, int]:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    chunks = tuple(draw(st.integers(1, max(1, n))) for n in shape)
    return (dtype, shape, chunks, draw(selections(shape)), draw(selections(shape)),
            draw(st.integers(0, 2**32 - 1)))


COUNTER = iter(range(10**9))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_random_round_trips_match_numpy(target: Target, case: tuple[Any, ...]) -> None:
    dtype_name, shape, chunks, read_sel, write_sel, seed = case
    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    model = random_values(rng, dtype, shape)
    name = f"a{next(COUNTER)}"
    shm = {"shared_memory": bool(rng.integers(0, 2))} if target.kind == "server" else {}
    with target.open("a", njobs=int(rng.integers(1, 5)), **shm) as f:
        ds = f.create_dataset(name, data=model, chunks=chunks)
        assert (ds.shape, ds.dtype, ds.chunks) == (shape, dtype, chunks)
        np.testing.assert_array_equal(ds[...], model)
        expect = model[read_sel]
        got = ds[read_sel]
        assert type(got) is type(expect) and np.shape(got) == np.shape(expect)
        np.testing.assert_array_equal(got, expect)
        # a write of the same selection, checked against numpy doing it
        region = model[write_sel]
        new = random_values(rng, dtype, np.shape(region))
        model[write_sel] = new
        ds[write_sel] = new
        np.testing.assert_array_equal(dataset(f, name)[...], model)
        if np.shape(region) and np.size(region):  # a scalar is broadcast, as numpy does
            ds[write_sel] = new.flat[0]
            model[write_sel] = new.flat[0]
            np.testing.assert_array_equal(ds[...], model)


def test_every_dtype_with_nan_or_zero_fill(target: Target) -> None:
    with target.open("a") as f:
        for dtype_name in DTYPES:
            dtype = np.dtype(dtype_name)
            fill = np.nan if dtype.kind in "fc" else (True if dtype.kind == "b" else 7)
            ds = f.create_dataset(f"fill_{dtype.name}_{dtype.byteorder in '>'}",
                                  shape=(5, 6), dtype=dtype, chunks=(2, 4), fillvalue=fill)
            expect = np.full((5, 6), fill, dtype=dtype)
            np.testing.assert_array_equal(ds[...], expect)  # nothing written: all fill
            ds[1, 1:3] = expect[0, 0] if dtype.kind == "b" else 1
            expect[1, 1:3] = expect[0, 0] if dtype.kind == "b" else 1
            np.testing.assert_array_equal(ds[...], expect)
            assert np.array_equal(np.asarray(ds.fillvalue), np.asarray(fill, dtype=dtype),
                                  equal_nan=dtype.kind in "fc")


# -- missing chunks -----------------------------------------------------------------------
def test_missing_chunks_read_as_fill_and_are_never_created(array_server: Running) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        ds = f.create_dataset("sparse", shape=(10, 10), dtype="float32", chunks=(4, 4),
                              fillvalue=np.nan)
        ds[5, 5] = 1.5
        s = stub(array_server)
        before = [k.key for k in s.ListKeys(pb.ListKeysRequest(prefix="sparse/")).keys]
        assert before == ["sparse/c/1/1", "sparse/zarr.json"]
        data = ds[...]
        assert data[5, 5] == 1.5 and np.isnan(data).sum() == 99
        assert np.isnan(ds[9, 9]) and np.isnan(ds[-1]).all()  # an edge chunk, never written
        after = [k.key for k in s.ListKeys(pb.ListKeysRequest(prefix="sparse/")).keys]
        assert after == before
        info = s.GetArray(pb.GetArrayRequest(path="sparse")).array
        assert info.chunks_stored == 1 and info.bytes_stored > 0
        ds[5, 5] = np.nan  # back to all fill: the chunk goes away (zarr's write_empty_chunks)
        assert [k.key for k in s.ListKeys(pb.ListKeysRequest(prefix="sparse/")).keys] == [
            "sparse/zarr.json"]


# -- concurrency --------------------------------------------------------------------------
@dataclass(frozen=True)
class Write:
    """A rectangle inside one chunk, filled with one value (the write's id)."""

    value: int
    rows: tuple[int, int]
    cols: tuple[int, int]


SHAPE, CHUNK = (8, 8), (4, 4)


def plan_writes(seed: int, count: int, first_value: int) -> list[Write]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        ci, cj = rng.integers(0, 2, size=2)
        r0, r1 = sorted(rng.integers(0, 5, size=2))
        c0, c1 = sorted(rng.integers(0, 5, size=2))
        r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
        out.append(Write(first_value + i, (ci * 4 + r0, ci * 4 + r1), (cj * 4 + c0, cj * 4 + c1)))
    return out


def apply_writes(address: str, key: str, writes: list[Write]) -> None:
    with File(address, "r+", api_key=key) as f:
        ds = dataset(f, "shared")
        for w in writes:
            ds[w.rows[0]:w.rows[1], w.cols[0]:w.cols[1]] = w.value


def some_serial_order_explains(final: np.ndarray, writes: list[Write]) -> bool:
    """Peel writes off from the last: each must show its value wherever nothing later wrote."""
    settled = np.zeros(final.shape, dtype=bool)  # cells explained by a later write
    left = list(writes)
    while left:
        for w in left:
            cells = (slice(*w.rows), slice(*w.cols))
            if np.all((final[cells] == w.value) | settled[cells]):
                settled[cells] = True
                left.remove(w)
                break
        else:
            return False
    return bool(np.all(final[~settled] == 0))


def shared_array(address: str, key: str) -> None:
    with File(address, "a", api_key=key) as f:
        f.create_dataset("shared", shape=SHAPE, dtype="int32", chunks=CHUNK)


def final_state(address: str, key: str) -> np.ndarray:
    with File(address, "r", api_key=key) as f:
        return np.asarray(dataset(f, "shared")[...])


def test_concurrent_threads_end_in_a_serial_order(array_server: Running) -> None:
    address, key = array_server.address, array_server.admin_key
    shared_array(address, key)
    plans = [plan_writes(seed, 12, 1 + seed * 100) for seed in range(6)]
    threads = [threading.Thread(target=apply_writes, args=(address, key, p)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = final_state(address, key)
    assert some_serial_order_explains(final, [w for p in plans for w in p]), final


def test_concurrent_processes_lose_no_update(array_server: Running) -> None:
    """Disjoint cells of the same chunks from several processes: every write survives."""
    address, key = array_server.address, array_server.admin_key
    shared_array(address, key)
    cells = [(i, j) for i in range(8) for j in range(8)]
    plans = [[Write(1 + n, (i, i + 1), (j, j + 1)) for n, (i, j) in enumerate(cells)
              if n % 4 == p] for p in range(4)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=apply_writes, args=(address, key, p)) for p in plans]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    final = final_state(address, key)
    np.testing.assert_array_equal(final, np.arange(1, 65).reshape(8, 8))


def test_concurrent_processes_overlapping_end_in_a_serial_order(array_server: Running) -> None:
    address, key = array_server.address, array_server.admin_key
    shared_array(address, key)
    plans = [plan_writes(100 + seed, 10, 1 + seed * 100) for seed in range(3)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=apply_writes, args=(address, key, p)) for p in plans]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    final = final_state(address, key)
    assert some_serial_order_explains(final, [w for p in plans for w in p]), final


def test_serial_order_check_can_fail() -> None:
    final = np.zeros(SHAPE, dtype=np.int32)
    a, b = Write(1, (0, 2), (0, 2)), Write(2, (1, 3), (1, 3))
    final[0:2, 0:2] = 1
    final[1:3, 1:3] = 2
    assert some_serial_order_explains(final, [a, b])
    final[1, 1] = 1  # a after b in one cell, b after a in another: no serial order
    final[2, 2] = 2
    final[1, 2] = 1
    assert not some_serial_order_explains(final, [a, b])


# -- corruption ---------------------------------------------------------------------------
def test_corrupted_chunk_is_reported_with_its_key_on_the_server(array_server: Running) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        ds = f.create_dataset("fragile", data=np.arange(64, dtype="int64").reshape(8, 8),
                              chunks=(4, 4))
        backend = array_store(array_server).backend
        stored = backend.read("arrays/fragile/c/1/0")
        flipped = bytes([stored[0] ^ 0xFF]) + stored[1:]
        backend.put("arrays/fragile/c/1/0", flipped)
        np.testing.assert_array_equal(ds[:4], np.arange(32).reshape(4, 8))  # others are fine
        with pytest.raises(DataLoss) as info:
            ds[...]
        assert "fragile/c/1/0" in info.value.message and info.value.reason == "CHUNK_CORRUPT"
        with pytest.raises(DataLoss, match="fragile/c/1/0"):
            ds[5, 1] = 0  # a partial write must read the chunk: refused, nothing written
        assert backend.read("arrays/fragile/c/1/0") == flipped
        ds[4:8, 0:4] = 9  # a whole-chunk write repairs it
        assert (ds[4:, :4] == 9).all()


def test_corrupted_chunk_is_reported_with_its_key_in_a_directory(tmp_path: Path) -> None:
    with File(tmp_path / "d", "a") as f:
        ds = f.create_dataset("fragile", data=np.ones((4, 4), "float32"), chunks=(2, 2))
        chunk = tmp_path / "d" / "fragile" / "c" / "0" / "1"
        raw = chunk.read_bytes()
        chunk.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
        with pytest.raises(DataLoss, match="fragile/c/0/1"):
            ds[...]


# -- Zarr interoperability ----------------------------------------------------------------
def test_fs_backend_array_opens_with_plain_zarr(tmp_path: Path) -> None:
    running = start_array_server(tmp_path / "data")  # the filesystem backend
    try:
        data = np.random.default_rng(1).standard_normal((20, 30)).astype("float32")
        with File(running.address, "a", api_key=running.admin_key) as f:
            f.create_dataset("exp/features", data=data, chunks=(8, 8), compression="zstd")
        directory = tmp_path / "data" / "store" / "arrays" / "exp" / "features"
        assert (directory / "zarr.json").is_file() and (directory / "c" / "0" / "0").is_file()
        plain = zarr.open_array(str(directory), mode="r")
        np.testing.assert_array_equal(plain[...], data)
        assert [type(c).__name__ for c in plain.compressors] == ["ZstdCodec", "Crc32cCodec"]
        # and the other way: zarr-python's own array code over the gRPC store
        with GrpcZarrStore(running.address, api_key=running.admin_key) as store:
            group = zarr.open_group(store, mode="a", zarr_format=3)
            arr = group.create_array("plain", shape=(6,), dtype="int16", chunks=(4,))
            arr[...] = np.arange(6)
            assert sorted(group.array_keys()) == ["plain"]
            assert sorted(group["exp"].array_keys()) == ["features"]  # type: ignore[union-attr]
        reread = zarr.open_array(str(tmp_path / "data" / "store" / "arrays" / "plain"))
        np.testing.assert_array_equal(reread[...], np.arange(6))
    finally:
        assert running.server is not None
        running.server.stop(0)


def test_zarr_store_semantics(array_server: Running) -> None:
    import asyncio

    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()

    async def run(store: GrpcZarrStore) -> None:
        await store.set("zarr.json", proto.buffer.from_bytes(GROUP))
        await store.set("a/b/zarr.json", proto.buffer.from_bytes(GROUP))
        await store.set("a/x", proto.buffer.from_bytes(b"0123456789"))
        got = await store.get("a/x", proto, RangeByteRequest(2, 5))
        assert got is not None and got.to_bytes() == b"234"
        got = await store.get("a/x", proto, OffsetByteRequest(7))
        assert got is not None and got.to_bytes() == b"789"
        got = await store.get("a/x", proto, SuffixByteRequest(2))
        assert got is not None and got.to_bytes() == b"89"
        assert await store.get("a/missing", proto) is None
        assert await store.get(".zarray", proto) is None  # a key the server cannot hold
        parts = await store.get_partial_values(proto, [("a/x", None), ("nope", None),
                                                       ("a/x", RangeByteRequest(0, 1))])
        assert [p.to_bytes() if p else None for p in parts] == [b"0123456789", None, b"0"]
        assert await store.exists("a/x") and not await store.exists("a/")
        assert await store.getsize("a/x") == 10
        assert sorted([k async for k in store.list_dir("a")]) == ["b", "x"]
        assert sorted([k async for k in store.list_dir("")]) == ["a", "zarr.json"]
        assert [k async for k in store.list_prefix("a/b")] == ["a/b/zarr.json"]
        await store.set_if_not_exists("a/x", proto.buffer.from_bytes(b"other"))
        got = await store.get("a/x", proto)
        assert got is not None and got.to_bytes() == b"0123456789"
        await store.delete("a/never")  # absent keys are fine
        await store.delete_dir("a")
        assert [k async for k in store.list()] == ["zarr.json"]
        reader = store.with_read_only(True)
        with pytest.raises(ValueError, match="read-only"):
            await reader.set("a/y", proto.buffer.from_bytes(b"1"))

    with GrpcZarrStore(array_server.address, api_key=array_server.admin_key) as store:
        asyncio.run(run(store))


# -- the h5py script ----------------------------------------------------------------------
def h5py_script(f: Any) -> list[Any]:
    """Code written for h5py; records every result (values, shapes, types, errors)."""
    log: list[Any] = []

    def record(label: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - the error's type is part of the result
            log.append((label, "raises", type(e).__name__))
            return
        if isinstance(value, (np.ndarray, np.generic)):
            log.append((label, type(value).__name__, value.dtype.str, np.shape(value),
                        np.asarray(value).tolist()))
        else:
            log.append((label, value))

    base = np.arange(6 * 5 * 4, dtype="float64").reshape(6, 5, 4)
    d = f.create_dataset("cube", data=base, chunks=(2, 2, 2))
    e = f.create_dataset("empty", shape=(7, 3), dtype="int16", fillvalue=-1, chunks=(3, 2))
    g = f.create_dataset("grp/sub", data=np.arange(10, dtype="uint8"), chunks=(4,),
                         compression="gzip")
    s = f.create_dataset("scalar", data=np.float32(2.5))
    for label, sel in [("all", ()), ("ellipsis", ...), ("int", 3), ("negative", -1),
                       ("two ints", (1, -2)), ("three ints", (5, 4, 3)),
                       ("slice", slice(1, 4)), ("steps", (slice(None, None, 2), slice(1, 5, 3))),
                       ("mixed", (2, slice(None), 1)), ("ellipsis last", (..., 2)),
                       ("ellipsis mid", (1, ..., 3)), ("empty slice", slice(4, 2)),
                       ("beyond", slice(4, 100)), ("negative slice", (slice(-3, -1),)),
                       ("out of range", 6), ("negative step", slice(None, None, -1))]:
        record(f"cube[{label}]", partial(d.__getitem__, sel))
    record("empty[...]", lambda: e[...])
    record("empty[2, 1]", lambda: e[2, 1])
    record("grp/sub[::3]", lambda: g[::3])
    record("scalar[()]", lambda: s[()])
    record("scalar[...]", lambda: s[...])
    d[0] = 7  # broadcast scalar
    d[1, :, 2] = np.arange(5)
    d[2:4] = np.arange(4)  # broadcast a row over a block
    d[..., 0] = -1
    e[1:6:2, 1] = 5
    record("cube after writes", lambda: d[...])
    record("empty after writes", lambda: e[...])
    record("shapes", lambda: [d.shape, e.shape, g.shape, s.shape])
    record("dtypes", lambda: [str(x.dtype) for x in (d, e, g, s)])
    record("chunks", lambda: [d.chunks, e.chunks, g.chunks])
    record("fillvalue", lambda: e.fillvalue)
    record("compression", lambda: [d.compression, g.compression])
    record("names", lambda: [d.name, g.name])
    record("len", lambda: [len(d), len(e)])
    record("size ndim", lambda: [d.size, d.ndim, d.nbytes])
    record("keys", lambda: list(f.keys()))
    record("list", lambda: list(f))
    record("in", lambda: ["cube" in f, "grp/sub" in f, "grp" in f, "nope" in f])
    record("group keys", lambda: list(f["grp"].keys()))
    record("missing", lambda: f["nope"])
    record("exists already", lambda: f.create_dataset("cube", shape=(1,), dtype="f4"))
    record("numpy array", lambda: np.asarray(f["grp/sub"]))
    del f["cube"]
    record("after del", lambda: list(f))
    record("del missing", lambda: f.__delitem__("cube"))
    return log


def test_h5py_script_gives_the_same_results(array_server: Running, tmp_path: Path) -> None:
    with h5py.File(tmp_path / "ref.h5", "w") as h:
        expected = h5py_script(h)
    assert ("cube[negative step]", "raises", "ValueError") in expected  # the script is telling
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        on_server = h5py_script(f)
    with File(tmp_path / "local.zarr", "w") as f:
        in_directory = h5py_script(f)
    for got in (on_server, in_directory):
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert mine == theirs


# -- files and modes ----------------------------------------------------------------------
def test_modes_like_h5py(target: Target) -> None:
    if target.kind == "local":
        with pytest.raises(FileNotFoundError):
            target.open("r")
        with pytest.raises(FileNotFoundError):
            target.open("r+")
    with target.open("w-") as f:
        f.create_dataset("x", data=[1, 2, 3])
    with pytest.raises(FileExistsError):
        target.open("x")
    with target.open("r") as f:
        assert f.mode == "r" and list(dataset(f, "x")[...]) == [1, 2, 3]
        with pytest.raises(ValueError, match="read-only"):
            dataset(f, "x")[0] = 5
        with pytest.raises(ValueError, match="read-only"):
            f.create_dataset("y", shape=(1,))
    with target.open("r+") as f:
        dataset(f, "x")[0] = 5
        f.create_group("g").create_dataset("y", shape=(2, 2), dtype="i1")
        assert list(f) == ["g", "x"] and f["g/y"].name == "/g/y"
        assert f["/g"]["y"].shape == (2, 2)  # type: ignore[union-attr]
    with target.open("a") as f:
        assert list(dataset(f, "x")[...]) == [5, 2, 3]
    with target.open("w") as f:
        assert list(f) == []
    f = target.open("a")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f["x"]


def test_server_file_needs_a_hierarchy_to_read(array_server: Running) -> None:
    with pytest.raises(FileNotFoundError, match="mode 'a'"):
        File(array_server.address, "r", api_key=array_server.admin_key)


def test_create_dataset_checks_its_arguments(target: Target) -> None:
    with target.open("a") as f:
        with pytest.raises(TypeError, match="not supported"):
            f.create_dataset("s", shape=(2,), dtype="U4")
        with pytest.raises(ValueError, match="compression"):
            f.create_dataset("c", shape=(2,), compression="lzf")
        with pytest.raises(ValueError, match="maxshape"):
            f.create_dataset("m", shape=(2,), maxshape=(None,))
        with pytest.raises(ValueError, match="invalid name"):
            f.create_dataset("../escape", shape=(2,))
        with pytest.raises(TypeError, match="unexpected keyword"):
            f.create_dataset("k", shape=(2,), bogus=1)
        with pytest.raises(ValueError, match="broadcast"):
            f.create_dataset("b", shape=(3, 2), dtype="i4")[...] = np.ones((2, 2))
        ds = f.require_dataset("b", shape=(3, 2), dtype="i2")
        assert ds.dtype == np.int32
        assert "../escape" not in f and "b" in f


@pytest.mark.parametrize("njobs", [1, 3, 8])
def test_njobs_gives_the_same_answer(array_server: Running, njobs: int) -> None:
    data = np.random.default_rng(njobs).integers(0, 1000, size=(33, 17, 9))
    with File(array_server.address, "a", api_key=array_server.admin_key, njobs=njobs) as f:
        ds = f.create_dataset("par", data=data, chunks=(4, 5, 3))
        assert ds.njobs == njobs
        np.testing.assert_array_equal(ds[...], data)
        np.testing.assert_array_equal(ds[::3, 2, 1:], data[::3, 2, 1:])
        ds.njobs = 1
        np.testing.assert_array_equal(ds[5:30], data[5:30])


def test_index_arrays_follow_numpy_or_are_refused(target: Target) -> None:
    data = np.arange(60).reshape(3, 4, 5)
    with target.open("a") as f:
        ds = f.create_dataset("fancy", data=data, chunks=(2, 2, 2))
        np.testing.assert_array_equal(ds[[0, 2]], data[[0, 2]])
        np.testing.assert_array_equal(ds[:, [1, 3], 2:], data[:, [1, 3], 2:])
        np.testing.assert_array_equal(ds[data > 30], data[data > 30])
        np.testing.assert_array_equal(ds[[0, 1], [1, 2], [3, 4]], data[[0, 1], [1, 2], [3, 4]])
        with pytest.raises(TypeError, match="one index array"):
            ds[[0, 1], :, [0, 1]]  # numpy pairs the lists, zarr crosses them: refused


def _read_in_child(ds: Dataset, results: Any) -> None:
    try:
        ds[...]
        results.put("read")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(e).__name__}: {getattr(e, 'reason', '')}")


def test_a_file_opened_before_fork_refuses_clearly(array_server: Running) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        ds = f.create_dataset("forked", data=np.arange(4))
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(ds, results))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert results.get(timeout=5) == "FailedPrecondition: OPENED_BEFORE_FORK"
        np.testing.assert_array_equal(ds[...], np.arange(4))  # the parent still reads


# -- the service, key by key --------------------------------------------------------------
def test_conditional_puts_and_deletes(array_server: Running) -> None:
    s = stub(array_server)
    first = s.PutKeys(iter([pb.PutKeysRequest(writes=[
        pb.KeyWrite(key="zarr.json", data=GROUP),
        pb.KeyWrite(key="k/v", data=b"one", if_absent=True)])])).results
    assert [r.conflict for r in first] == [False, False] and first[1].version
    again = s.PutKeys(iter([pb.PutKeysRequest(writes=[
        pb.KeyWrite(key="k/v", data=b"two", if_absent=True),
        pb.KeyWrite(key="k/v", data=b"three", expected_version="stale"),
        pb.KeyWrite(key="k/v", data=b"four", expected_version=first[1].version)])])).results
    assert [r.conflict for r in again] == [True, True, False]
    assert again[0].version == first[1].version and again[2].version != first[1].version
    values = list(s.GetKeys(pb.GetKeysRequest(reads=[pb.KeyRead(key="k/v")])))
    assert values[0].values[0].data == b"four"
    gone = s.DeleteKeys(pb.DeleteKeysRequest(deletes=[
        pb.KeyDelete(key="k/v", expected_version=first[1].version),
        pb.KeyDelete(key="k/v", expected_version=again[2].version)])).results
    assert [r.conflict for r in gone] == [True, False] and gone[1].version == ""


def test_get_keys_packs_and_splits_values(array_server: Running) -> None:
    s = stub(array_server)
    big = os.urandom(50_000)
    s.PutKeys(iter([pb.PutKeysRequest(writes=[pb.KeyWrite(key=f"g/{i}", data=bytes([i]) * 10)
                                              for i in range(20)] +
                                      [pb.KeyWrite(key="g/big", data=big)])]))
    reads = [pb.KeyRead(key=f"g/{i}") for i in range(20)] + [
        pb.KeyRead(key="g/big"), pb.KeyRead(key="g/none"),
        pb.KeyRead(key="g/big", offset=100, length=7), pb.KeyRead(key="g/big", offset=-5)]
    messages = list(s.GetKeys(pb.GetKeysRequest(reads=reads, max_message_bytes=8192)))
    assert len(messages) >= 7 and all(m.ByteSize() <= 8192 for m in messages)
    joined: dict[int, bytes] = {}
    for m in messages:
        for v in m.values:
            if v.offset == 0:
                assert v.index not in joined and (v.version or not v.found)
            assert v.offset == len(joined.get(v.index, b""))
            joined[v.index] = joined.get(v.index, b"") + v.data
    assert [joined[i] for i in range(20)] == [bytes([i]) * 10 for i in range(20)]
    assert joined[20] == big and joined[21] == b""
    assert joined[22] == big[100:107] and joined[23] == big[-5:]
    indexes = [v.index for m in messages for v in m.values]
    assert indexes == sorted(indexes)  # request order
    found = [v for m in messages for v in m.values if v.index == 21]
    assert found[0].found is False and found[0].last


def test_a_value_rewritten_while_read_arrives_whole(array_server: Running) -> None:
    """A value over the server's first read (4 MiB) is read in two; one rewritten in
    between is read again whole, so a reader gets one write's bytes, never a mix."""
    size = 6 * 1024 * 1024
    stop = threading.Event()
    store = GrpcZarrStore(array_server.address, api_key=array_server.admin_key)
    store.write_values([KeyWriteOp("big/value", bytes([0]) * size)])

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.write_values([KeyWriteOp("big/value", bytes([n % 256]) * size)])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(20):
            [(data, version)] = store.fetch([("big/value", 0, 0)])
            assert data is not None and len(data) == size and version
            assert bytes(data).count(bytes(data[:1])) == size  # one write's bytes, never mixed
    finally:
        stop.set()
        writer.join()
        store.close()


class _WriterWinsBetweenReads(FsBackend):
    """A filesystem backend where another writer replaces "big" right after each first read."""

    def read_many(self, reads: Any, versions: bool = True) -> Any:
        got = super().read_many(reads, versions)
        self.put("arrays/big", b"\x02" * (6 * 1024 * 1024))
        return got


def test_a_value_changed_between_reads_is_read_again_whole(tmp_path: Path) -> None:
    backend = _WriterWinsBetweenReads(tmp_path / "store")
    backend.put("arrays/big", b"\x01" * (6 * 1024 * 1024))
    arrays = ArrayStore(backend, max_chunk_bytes=32 << 20, read_message_bytes=4 << 20)
    try:
        pieces = [v for m in arrays.get_keys(pb.GetKeysRequest(reads=[pb.KeyRead(key="big")]))
                  for v in pb.GetKeysResponse.FromString(m).values]
    finally:
        arrays.close()
    data = b"".join(v.data for v in pieces)
    assert data == b"\x02" * (6 * 1024 * 1024)  # the later write, whole: not 4 MiB of each
    assert pieces[0].version == backend.stat("arrays/big").version  # type: ignore[union-attr]
    assert pieces[-1].last and [v.offset for v in pieces] == sorted(v.offset for v in pieces)


def test_wire_format_matches_protobuf() -> None:
    parts = encode_value(3, True, 4096, b"abc", True, "v1", 77)
    message = pb.GetKeysResponse.FromString(b"".join(parts))
    assert message.values[0] == pb.KeyValue(index=3, found=True, offset=4096, data=b"abc",
                                            last=True, version="v1", size=77)
    proto = pb.GetKeysResponse(values=[pb.KeyValue(index=0, found=False, last=True),
                                       pb.KeyValue(index=1, found=True, data=b"x" * 300,
                                                   version="ver", size=300, offset=2**40)])
    [a, b] = decode_response(proto.SerializeToString()).values
    assert (a.index, a.found, a.last, bytes(a.data)) == (0, False, True, b"")
    assert (b.index, b.found, b.offset, bytes(b.data), b.version, b.size) == (
        1, True, 2**40, b"x" * 300, "ver", 300)
    with pytest.raises(ValueError):
        decode_response(proto.SerializeToString()[:-3])
    # a ring's value: where the bytes lie, and the message's release point
    parts = encode_value(5, True, 0, b"", True, "v", 9, ring=(2**33, 9)) + [encode_release(4096)]
    message = pb.GetKeysResponse.FromString(b"".join(parts))
    assert message.values[0] == pb.KeyValue(index=5, found=True, last=True, version="v", size=9,
                                            ring_offset=2**33, ring_length=9)
    assert message.ring_release == 4096
    decoded = decode_response(b"".join(parts))
    assert decoded.ring_release == 4096
    assert (decoded.values[0].ring_offset, decoded.values[0].ring_length) == (2**33, 9)


def test_listing_keys_and_arrays_in_pages(array_server: Running) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        for i in range(5):
            f.create_dataset(f"g{i % 2}/arr{i}", data=np.arange(10 * (i + 1), dtype="int32"),
                             chunks=(10,))
    s = stub(array_server)
    paths: list[str] = []
    request = pb.ListArraysRequest(page_size=2)
    pages = 0
    while True:
        page = s.ListArrays(request)
        pages += 1
        for a in page.arrays:
            paths.append(a.path)
            i = int(a.path[-1])
            assert a.chunks_stored == i + 1 and a.bytes_stored == (i + 1) * (40 + 4)
            assert json.loads(a.metadata)["shape"] == [10 * (i + 1)]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert pages == 3 and paths == ["g0/arr0", "g0/arr2", "g0/arr4", "g1/arr1", "g1/arr3"]
    top = s.ListKeys(pb.ListKeysRequest(prefix="", delimiter="/"))
    assert [k.key for k in top.keys] == ["g0/", "g1/", "zarr.json"]
    keys, token = [], ""
    while True:
        page2 = s.ListKeys(pb.ListKeysRequest(prefix="g0/arr4/", page_size=3, page_token=token))
        keys += [k.key for k in page2.keys]
        token = page2.next_page_token
        if not token:
            break
    assert keys == [f"g0/arr4/c/{i}" for i in range(5)] + ["g0/arr4/zarr.json"]
    deleted = s.DeleteArray(pb.DeleteArrayRequest(path="g0/arr4"))
    assert deleted.keys_deleted == 6 and deleted.bytes_freed > 5 * 44
    with pytest.raises(grpc.RpcError) as info:
        s.GetArray(pb.GetArrayRequest(path="g0/arr4"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_directory_listing_rolls_up_big_levels(array_server: Running) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("a/many", data=np.arange(1, 151, dtype="uint8"), chunks=(1,))
        f.create_dataset("b", data=np.arange(3, dtype="int8"), chunks=(1,))
    s = stub(array_server)
    listed = [k.key for k in s.ListKeys(pb.ListKeysRequest(prefix="a/many/",
                                                           delimiter="/")).keys]
    assert listed == ["a/many/c/", "a/many/zarr.json"]
    paged, token = [], ""
    while True:
        page = s.ListKeys(pb.ListKeysRequest(prefix="", delimiter="/", page_size=1,
                                             page_token=token))
        paged += [k.key for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert paged == ["a/", "b/", "zarr.json"]
    chunks = [k.key for k in s.ListKeys(pb.ListKeysRequest(prefix="a/many/c/")).keys]
    assert len(chunks) == 150


HOSTILE_KEYS = ["", "../x", "a/../b", "a//b", "/a", "a/", ".hidden", "a/.zarray", "a b",
                "a\x00b", "é", "x" * 129, "/".join(["a"] * 70), "a/zarr.json/c"]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_hostile_keys_are_invalid_argument(array_server: Running, key: str) -> None:
    s = stub(array_server)
    calls: list[Callable[[], Any]] = [
        lambda: s.PutKeys(iter([pb.PutKeysRequest(writes=[pb.KeyWrite(key=key, data=b"1")])])),
        lambda: list(s.GetKeys(pb.GetKeysRequest(reads=[pb.KeyRead(key=key)]))),
        lambda: s.DeleteKeys(pb.DeleteKeysRequest(deletes=[pb.KeyDelete(key=key)])),
    ]
    if key not in ("/a", "a/"):  # an array path may be written "/a" or "a/", as in h5py
        calls += [lambda: s.GetArray(pb.GetArrayRequest(path=key)),
                  lambda: s.DeleteArray(pb.DeleteArrayRequest(path=key))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        details = info.value.details() or ""
        assert "key" in details or "path" in details


def _meta(**changes: Any) -> bytes:
    doc = json.loads(array_meta([4, 4], [2, 2]))
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(("key", "data", "needle"), [
    ("m/zarr.json", b"{not json", "not valid JSON"),
    ("m/zarr.json", b"\xff\xfe", "not valid JSON"),
    ("m/zarr.json", b"[1, 2]", "JSON object"),
    ("m/zarr.json", _meta(zarr_format=2), "zarr_format must be 3"),
    ("m/zarr.json", _meta(zarr_format=True), "zarr_format must be 3"),
    ("m/zarr.json", _meta(node_type="dataset"), "node_type"),
    ("m/zarr.json", _meta(shape=[-1, 4]), "shape"),
    ("m/zarr.json", _meta(shape="big"), "shape"),
    ("m/zarr.json", _meta(chunk_grid={"name": "regular",
                                      "configuration": {"chunk_shape": [0, 2]}}), "chunk_grid"),
    ("m/zarr.json", _meta(chunk_grid={"name": "regular",
                                      "configuration": {"chunk_shape": [2]}}), "chunk_grid"),
    ("m/zarr.json", _meta(codecs=None), "codecs"),
    ("m/zarr.json", _meta(data_type="float64", chunk_grid={
        "name": "regular", "configuration": {"chunk_shape": [4096, 4096]}}),
     "max_array_chunk_bytes"),
    ("m/zarr.json", b" " * (1024 * 1024 + 1), "at most"),
    ("zarr.json", array_meta([2], [2]), "root"),
    ("chunky/c/0", b"x" * (256 * 1024 + 1), "max_array_chunk_bytes"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hostile_values_are_invalid_argument(tmp_path: Path, key: str, data: bytes,
                                             needle: str) -> None:
    running = start_array_server(tmp_path / "data", {"max_array_chunk_bytes": 256 * 1024})
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub(running).PutKeys(iter([pb.PutKeysRequest(writes=[
                pb.KeyWrite(key=key, data=data)])]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (info.value.details() or "")
        listed = stub(running).ListKeys(pb.ListKeysRequest()).keys
        assert list(listed) == []  # nothing of a refused message was stored
    finally:
        assert running.server is not None
        running.server.stop(0)


def test_hostile_requests(array_server: Running) -> None:
    s = stub(array_server)
    s.PutKeys(iter([pb.PutKeysRequest(writes=[pb.KeyWrite(key="zarr.json", data=GROUP),
                                              pb.KeyWrite(key="arr/zarr.json",
                                                          data=array_meta([4], [2])),
                                              pb.KeyWrite(key="grp/zarr.json", data=GROUP)])]))
    cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
        (lambda: list(s.GetKeys(pb.GetKeysRequest(reads=[pb.KeyRead(key="a")] * 10_001))),
         grpc.StatusCode.INVALID_ARGUMENT, "at most 10000"),
        (lambda: list(s.GetKeys(pb.GetKeysRequest(reads=[pb.KeyRead(key="a")],
                                                  max_message_bytes=-1))),
         grpc.StatusCode.INVALID_ARGUMENT, "max_message_bytes"),
        (lambda: s.DeleteKeys(pb.DeleteKeysRequest(deletes=[pb.KeyDelete(key="a")] * 10_001)),
         grpc.StatusCode.INVALID_ARGUMENT, "at most 10000"),
        (lambda: s.PutKeys(iter([pb.PutKeysRequest(writes=[
            pb.KeyWrite(key="x", data=b"1", if_absent=True, expected_version="v")])])),
         grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (lambda: s.PutKeys(iter([pb.PutKeysRequest(writes=[
            pb.KeyWrite(key="arr/sub/zarr.json", data=GROUP)])])),
         grpc.StatusCode.INVALID_ARGUMENT, "arrays have no children"),
        (lambda: s.ListKeys(pb.ListKeysRequest(page_size=-1)),
         grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
        (lambda: s.ListKeys(pb.ListKeysRequest(page_token="garbage")),
         grpc.StatusCode.INVALID_ARGUMENT, "page token"),
        (lambda: s.ListKeys(pb.ListKeysRequest(prefix="../")),
         grpc.StatusCode.INVALID_ARGUMENT, "prefix"),
        (lambda: s.ListKeys(pb.ListKeysRequest(delimiter=".")),
         grpc.StatusCode.INVALID_ARGUMENT, "delimiter"),
        (lambda: s.ListArrays(pb.ListArraysRequest(page_token="x")),
         grpc.StatusCode.INVALID_ARGUMENT, "page token"),
        (lambda: s.GetArray(pb.GetArrayRequest(path="nope")),
         grpc.StatusCode.NOT_FOUND, "no array 'nope'"),
        (lambda: s.DeleteArray(pb.DeleteArrayRequest(path="nope")),
         grpc.StatusCode.NOT_FOUND, "no array 'nope'"),
        (lambda: s.GetArray(pb.GetArrayRequest(path="grp")),
         grpc.StatusCode.FAILED_PRECONDITION, "is a group"),
        (lambda: stub(array_server, None).ListArrays(pb.ListArraysRequest()),
         grpc.StatusCode.UNAUTHENTICATED, ""),
        (lambda: stub(array_server, array_server.key("reader")).PutKeys(iter([
            pb.PutKeysRequest(writes=[pb.KeyWrite(key="x", data=b"1")])])),
         grpc.StatusCode.PERMISSION_DENIED, ""),
    ]
    for call, code, needle in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, info.value.details()
        assert needle in (info.value.details() or "")
    # a reader key reads
    reader = stub(array_server, array_server.key("reader"))
    assert [a.path for a in reader.ListArrays(pb.ListArraysRequest()).arrays] == ["arr"]


def test_client_maps_server_errors(array_server: Running) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("ok", shape=(2,), dtype="uint8")
        store = f.store
        assert isinstance(store, GrpcZarrStore)
        with pytest.raises(InvalidArgument, match="max_array_chunk_bytes"):
            f.create_dataset("huge", shape=(10**5, 10**4), dtype="float64",
                             chunks=(10**5, 10**4))
        with pytest.raises(KeyError, match="nope"):
            f["nope"]
    with pytest.raises(Unavailable, match="no gristmill server at 127.0.0.1:1"):
        File("127.0.0.1:1", "r")


# -- CLI and docs -------------------------------------------------------------------------
def test_array_cli(array_server: Running, capsys: pytest.CaptureFixture[str]) -> None:
    conn = ["--address", array_server.address, "--api-key", array_server.admin_key]
    assert main(["array", "list", *conn]) == 0
    assert "no arrays" in capsys.readouterr().out
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("run1/latents", shape=(100, 8), dtype="float16", chunks=(10, 8),
                         compression="zstd")[:35] = 1
    assert main(["array", "list", *conn]) == 0
    out = capsys.readouterr().out
    assert re.search(r"run1/latents\s+\(100, 8\)\s+float16\s+\(10, 8\)\s+4/10 chunks", out), out
    assert main(["array", "show", "run1/latents", *conn]) == 0
    out = capsys.readouterr().out
    assert "codecs       bytes, zstd, crc32c" in out and "4 chunks" in out
    assert main(["array", "show", "run1/latents", "--json", *conn]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["shape"] == [100, 8] and shown["chunks_stored"] == 4
    assert main(["array", "delete", "run1/latents", *conn]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["array", "delete", "run1/latents", "--yes", *conn]) == 0
    assert "deleted array run1/latents (5 keys" in capsys.readouterr().out
    assert main(["array", "show", "run1/latents", *conn]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no array 'run1/latents'") and "Traceback" not in err
    assert main(["array", "show", "../x", *conn]) == 1
    assert "invalid key" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["array"], ["array", "list"], ["array", "show"],
                                  ["array", "delete"]])
def test_array_cli_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: gristmill array")


def test_docs_examples_run(array_server: Running, tmp_path: Path) -> None:
    doc = ROOT / "docs" / "arrays.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 3
    env = dict(os.environ, GRISTMILL_ADDRESS=array_server.address,
               GRISTMILL_API_KEY=array_server.admin_key, PYTHONPATH=str(ROOT))
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"example failed:\n{code}\n{out.stderr}"


def test_reads_without_versions_return_the_same_bytes(array_server: Running) -> None:
    """skip_versions (plain reads) gives the same values, versions "", large ones whole."""
    s = stub(array_server)
    s.PutKeys(iter([pb.PutKeysRequest(writes=[
        pb.KeyWrite(key="zarr.json", data=b'{"zarr_format": 3, "node_type": "group"}'),
        pb.KeyWrite(key="v/zarr.json", data=array_meta([4096, 4096], [2048, 2048]))])]))
    big = os.urandom(5 * 1024 * 1024)  # more than one first read step (4 MiB)
    small = os.urandom(1000)
    s.PutKeys(iter([pb.PutKeysRequest(writes=[
        pb.KeyWrite(key="v/c/0/0", data=big), pb.KeyWrite(key="v/c/0/1",
                                                                         data=small)])]))
    reads = [("v/c/0/0", 0, 0), ("v/c/9/9", 0, 0), ("v/c/0/1", 0, 0), ("v/c/0/0", 100, 50)]
    with GrpcZarrStore(array_server.address, api_key=array_server.admin_key) as store:
        got: dict[int, tuple[bytes | None, str]] = {}

        def keep(i: int, data: Any, version: str) -> None:
            got[i] = (None if data is None else bytes(data), version)
        for versions in (True, False):
            got.clear()
            store.read_values(reads, keep, versions=versions)
            assert [got[i][0] for i in range(4)] == [big, None, small, big[100:150]]
            assert all(bool(got[i][1]) == versions for i in (0, 2))


def test_h5py_imports_after_the_decoder(tmp_path: Path) -> None:
    """libvips links Debian's HDF5; gristmill.decode loads h5py first so both work together."""
    script = ("import gristmill.decode, h5py, sys\n"
              "with h5py.File(sys.argv[1], 'w') as f:\n"
              "    f.create_dataset('x', data=[1, 2, 3])\n"
              "print(h5py.File(sys.argv[1])['x'][:].sum())\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.h5")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"


def test_the_decoder_imports_after_pyvips() -> None:
    """Imported after pyvips (as bench_decode did), gristmill.decode must still load and decode."""
    script = ("import pyvips, gristmill.decode as d, io\n"
              "from PIL import Image\n"
              "buf = io.BytesIO(); Image.new('RGB', (8, 6)).save(buf, 'PNG')\n"
              "out = d.decode_sample(buf.getvalue(), d.Transform(size=(4, 3)))\n"
              "print(out.image.pixels.shape)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 4, 3)"


# -- shared memory (same host) --------------------------------------------------------
def array_shm_bytes(path: str) -> float:
    return REGISTRY.get_sample_value("gristmill_store_array_bytes_out_total",
                                     {"path": path}) or 0.0


def test_reads_through_shared_memory_match_grpc(array_server: Running, shm_dir: Path
                                                ) -> None:
    rng = np.random.default_rng(3)
    # a chunk of 9 MiB is larger than a ring message (4 MiB): it comes in pieces
    data = rng.random((3, 1024, 1024), dtype=np.float32) * 100
    data[2] = 0  # the last chunk is all fill: never stored, read as the fill value
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("big", data=data, chunks=(1, 1024, 1024))
        f.create_dataset("small", data=np.arange(1000, dtype="int16"), chunks=(7,))
    stored = sum(n for k, n in GrpcZarrStore(array_server.address,
                                             api_key=array_server.admin_key).list_keys()
                 if "/c/" in k)
    before = array_shm_bytes("shm")
    with File(array_server.address, "r", api_key=array_server.admin_key,
              shared_memory=True) as f:
        np.testing.assert_array_equal(dataset(f, "big")[...], data)
        np.testing.assert_array_equal(dataset(f, "big")[1:, 5::3, 7], data[1:, 5::3, 7])
        np.testing.assert_array_equal(dataset(f, "small")[...], np.arange(1000))
        np.testing.assert_array_equal(dataset(f, "small")[-5:], np.arange(995, 1000))
        names = {p.name for p in shm_dir.iterdir()}
        assert names and all(n.startswith("gristmill-ring-") for n in names)
    moved = array_shm_bytes("shm") - before
    # every stored chunk went through a ring once by the first reads, at least
    assert moved >= stored
    assert not list(shm_dir.iterdir())  # closing the File removed its rings
    with File(array_server.address, "r", api_key=array_server.admin_key,
              shared_memory=False) as f:
        np.testing.assert_array_equal(dataset(f, "big")[...], data)
        assert not list(shm_dir.iterdir())
    assert array_shm_bytes("shm") - before == moved  # the gRPC reads put nothing in a ring


def test_shared_memory_falls_back_to_grpc_or_fails_as_asked(array_server: Running,
                                                            shm_dir: Path) -> None:
    array_store(array_server).shm_dir = None  # the server has shared memory off
    data = np.arange(5000, dtype="int32")
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("x", data=data, chunks=(100,))
    before = array_shm_bytes("shm")
    with File(array_server.address, "r", api_key=array_server.admin_key) as f:  # automatic
        np.testing.assert_array_equal(dataset(f, "x")[...], data)
        np.testing.assert_array_equal(dataset(f, "x")[::7], data[::7])
        store = f.store
        assert isinstance(store, GrpcZarrStore) and not store._rings.on
    assert array_shm_bytes("shm") == before
    with File(array_server.address, "r", api_key=array_server.admin_key,
              shared_memory=True) as f:
        with pytest.raises(FailedPrecondition, match="store.shm_dir") as info:
            dataset(f, "x")[...]
        assert info.value.reason == RING_UNAVAILABLE
    assert not list(shm_dir.iterdir())


@pytest.mark.parametrize("name,capacity,code,match", [
    ("../../etc/passwd", 1 << 20, grpc.StatusCode.INVALID_ARGUMENT, "ring.name"),
    ("gristmill-ring-x/../y", 1 << 20, grpc.StatusCode.INVALID_ARGUMENT, "ring.name"),
    ("gristmill-ring-nothere", 1 << 20, grpc.StatusCode.FAILED_PRECONDITION, "another host"),
    ("gristmill-ring-x", 100, grpc.StatusCode.INVALID_ARGUMENT, "ring.capacity"),
    ("gristmill-ring-x", 2**63 - 1, grpc.StatusCode.INVALID_ARGUMENT, "ring.capacity"),
    ("gristmill-ring-x", 2**63 - 64, grpc.StatusCode.FAILED_PRECONDITION, "another host"),
])
def test_hostile_rings_are_refused(array_server: Running, shm_dir: Path, name: str,
                                   capacity: int, code: grpc.StatusCode, match: str) -> None:
    request = pb.GetKeysRequest(reads=[pb.KeyRead(key="zarr.json")])
    request.ring.name, request.ring.capacity, request.ring.token = name, capacity, b"t" * 16
    with pytest.raises(grpc.RpcError) as info:
        list(stub(array_server).GetKeys(request))
    assert info.value.code() == code and match in str(info.value.details())


def test_a_ring_that_is_a_symlink_or_shrunk_is_refused(array_server: Running, shm_dir: Path,
                                                       tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep me" * 1000)
    (shm_dir / "gristmill-ring-link").symlink_to(target)
    request = pb.GetKeysRequest(reads=[pb.KeyRead(key="zarr.json")])
    request.ring.name, request.ring.capacity = "gristmill-ring-link", 1 << 20
    request.ring.token = b"t" * 16
    with pytest.raises(grpc.RpcError) as info:
        list(stub(array_server).GetKeys(request))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert target.read_bytes() == b"keep me" * 1000
    (shm_dir / "gristmill-ring-link").unlink()
    # a ring the client truncates while the server writes: that call ends, the server goes on
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("v", data=np.ones((64, 1024, 64), dtype="float32"),
                         chunks=(8, 1024, 64))
    ring = RingReader.create(MIN_RING_BYTES * 16, shm_dir)
    request = pb.GetKeysRequest(reads=[pb.KeyRead(key=f"v/c/{i}/0/0") for i in range(8)])
    request.ring.name, request.ring.capacity, request.ring.token = (
        ring.name, ring.capacity, ring.token)
    call = stub(array_server).GetKeys(request)
    next(call)  # the first message's record is written; the ring is now full
    os.truncate(shm_dir / ring.name, 4096)
    ring.release(1 << 40)  # let the server try the next record
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "truncated" in str(info.value.details())
    ring.close()
    with File(array_server.address, "r", api_key=array_server.admin_key) as f:
        assert float(dataset(f, "v")[3, 5, 7]) == 1.0


def test_a_read_cut_short_does_not_reuse_its_ring(array_server: Running, shm_dir: Path
                                                  ) -> None:
    data = np.arange(64 * 1024, dtype="float64").reshape(64, 1024)
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("w", data=data, chunks=(4, 1024))
    store = GrpcZarrStore(array_server.address, api_key=array_server.admin_key,
                          shared_memory=True)
    try:
        reads = [(f"w/c/{i}/0", 0, 0) for i in range(16)]
        got: list[Any] = []

        def stop_early() -> None:
            raise RuntimeError("the caller gave up")

        with pytest.raises(RuntimeError, match="gave up"):
            store.read_values(reads, lambda i, d, v: got.append(d), versions=False,
                              settle=stop_early)
        assert got and not list(shm_dir.iterdir())  # its ring is closed, name and all
        out: dict[int, bytes] = {}
        store.read_values(reads, lambda i, d, v: out.__setitem__(i, bytes(d or b"")),
                          versions=False, settle=lambda: None)
        assert len(out) == 16 and len(list(shm_dir.iterdir())) == 1  # a new ring, kept
        plain = store.fetch(reads)
        assert [bytes(d) for d, _ in plain if d is not None] == [out[i] for i in range(16)]
    finally:
        store.close()
    assert not list(shm_dir.iterdir())


def test_a_ring_takes_its_token_and_one_call_at_a_time(array_server: Running, shm_dir: Path
                                                       ) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("t", data=np.ones((64, 1024, 64), dtype="float32"),
                         chunks=(8, 1024, 64))
    ring = RingReader.create(MIN_RING_BYTES * 16, shm_dir)
    reads = [pb.KeyRead(key=f"t/c/{i}/0/0") for i in range(8)]

    def call(token: bytes) -> Any:
        request = pb.GetKeysRequest(reads=reads)
        request.ring.name, request.ring.capacity, request.ring.token = (
            ring.name, ring.capacity, token)
        return stub(array_server).GetKeys(request)

    try:
        # knowing the name is not enough: the token must be the ring's own
        for token, code, match in [(b"", grpc.StatusCode.INVALID_ARGUMENT, "ring.token"),
                                   (b"x" * 5, grpc.StatusCode.INVALID_ARGUMENT, "ring.token"),
                                   (bytes(16), grpc.StatusCode.FAILED_PRECONDITION, "token")]:
            with pytest.raises(grpc.RpcError) as info:
                list(call(token))
            assert info.value.code() == code and match in str(info.value.details())
        # a call on a ring another call still writes into waits for it
        first = call(ring.token)
        next(first)  # the first holds the ring: it waits for space now
        second = call(ring.token)
        done = threading.Event()
        got: list[Any] = []

        def drain() -> None:
            try:
                got.extend(second)
            except grpc.RpcError as e:
                got.append(e)
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        assert not done.wait(1.0)  # still waiting for the first call's writer
        first.cancel()
        ring.release(1 << 40)  # the first call's writer sees it is over and lets go
        assert done.wait(30)
        assert got and not isinstance(got[0], grpc.RpcError)
    finally:
        ring.close()


def test_a_store_never_closed_still_removes_its_rings(array_server: Running, shm_dir: Path
                                                      ) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("n", data=np.arange(100, dtype="int64"), chunks=(10,))
    store = GrpcZarrStore(array_server.address, api_key=array_server.admin_key,
                          shared_memory=True)
    got: dict[int, bytes] = {}
    store.read_values([(f"n/c/{i}", 0, 0) for i in range(10)],
                      lambda i, d, v: got.__setitem__(i, bytes(d or b"")), versions=False,
                      settle=lambda: None)
    assert len(got) == 10 and len(list(shm_dir.iterdir())) == 1
    del store
    gc.collect()
    assert not list(shm_dir.iterdir())


def test_rings_outlive_a_forked_child_and_a_dropped_parent_store(array_server: Running,
                                                                  shm_dir: Path) -> None:
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("k", data=np.arange(100, dtype="int64"), chunks=(10,))
    reads = [(f"k/c/{i}", 0, 0) for i in range(10)]

    def read_through(store: GrpcZarrStore) -> list[bytes]:
        got: dict[int, bytes] = {}
        store.read_values(reads, lambda i, d, v: got.__setitem__(i, bytes(d or b"")),
                          versions=False, settle=lambda: None)
        return [got[i] for i in range(10)]

    owner = GrpcZarrStore(array_server.address, api_key=array_server.admin_key,
                          shared_memory=True)
    derived = owner.with_read_only(True)
    expect = read_through(owner)
    rings = sorted(p.name for p in shm_dir.iterdir())
    assert len(rings) == 1
    # a forked child that drops its copy of the store leaves the parent's rings alone
    pid = os.fork()
    if pid == 0:  # the child: collect the store (its finalizer runs here), then leave
        code = 1
        try:
            del owner, derived
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(p.name for p in shm_dir.iterdir()) == rings
    # the store zarr derives (with_read_only) keeps the rings while it lives
    del owner
    gc.collect()
    before = array_shm_bytes("shm")
    assert read_through(derived) == expect
    assert array_shm_bytes("shm") > before
    assert sorted(p.name for p in shm_dir.iterdir()) == rings
    del derived
    gc.collect()
    assert not list(shm_dir.iterdir())


def test_a_ring_another_call_still_writes_is_read_around(array_server: Running, shm_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gristmill.store.arrays._RING_LOCK_WAIT", 0.3)
    with File(array_server.address, "a", api_key=array_server.admin_key) as f:
        f.create_dataset("b", data=np.arange(100, dtype="int64"), chunks=(10,))
    store = GrpcZarrStore(array_server.address, api_key=array_server.admin_key)
    try:
        got: dict[int, bytes] = {}
        reads = [(f"b/c/{i}", 0, 0) for i in range(10)]
        store.read_values(reads, lambda i, d, v: got.__setitem__(i, bytes(d or b"")),
                          versions=False, settle=lambda: None)
        [name] = [p.name for p in shm_dir.iterdir()]
        ring = store._rings._free[0]
        # a writer of another call holds the ring (as a call gRPC retried would)
        other = RingWriter.open(shm_dir, name, ring.capacity, token=ring.token,
                                keep_name=True, lock_wait=0)
        try:
            again: dict[int, bytes] = {}
            store.read_values(reads, lambda i, d, v: again.__setitem__(i, bytes(d or b"")),
                              versions=False, settle=lambda: None)
        finally:
            other.close()
        assert again == got  # this call went over gRPC ...
        assert store._rings.on  # ... and rings stay on for the next ones
    finally:
        store.close()
    assert not list(shm_dir.iterdir())
