"""The array client against a hostile server: ring places it invents are refused.

The peer is a small fake ArrayService on a real socket (port 0) that answers
GetKeys with values said to lie in the client's shared-memory ring where
they cannot: outside the ring, at a negative offset, or in a ring the
request never named. The client must answer DataLoss (reason BAD_RESPONSE),
read nothing outside its mapping, and leave no ring behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from gristmill.client.arrays.store import RING_BYTES, GrpcZarrStore
from gristmill.client.arraywire import encode_release, encode_value
from gristmill.client.errors import DataLoss
from gristmill.v1 import arrays_pb2


class LyingArrays:
    """GetKeys answers one value at ``place`` (offset, length) in "the ring"."""

    def __init__(self, place: tuple[int, int]) -> None:
        self.place = place
        self.release = 4096
        self.rings: list[str] = []

    def GetKeys(self, request: arrays_pb2.GetKeysRequest,
                context: grpc.ServicerContext) -> Iterator[bytes]:
        self.rings.append(request.ring.name)
        parts = encode_value(0, True, 0, b"", True, "", self.place[1], ring=self.place)
        yield b"".join(parts) + (encode_release(self.release) if self.release else b"")


@pytest.fixture
def lying() -> Iterator[tuple[str, LyingArrays]]:
    servicer = LyingArrays((0, 0))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler("gristmill.v1.ArrayService", {
        "GetKeys": grpc.unary_stream_rpc_method_handler(
            servicer.GetKeys, request_deserializer=arrays_pb2.GetKeysRequest.FromString,
            response_serializer=lambda b: b)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


@pytest.mark.parametrize("place,shared", [
    ((RING_BYTES - 8, 64), True),       # runs past the ring's end
    ((2**62, 16), True),                # far outside
    ((-4096, 16), True),                # before the ring's start (its header, or worse)
    ((0, -1), True),                    # a negative length
    ((0, 16), False),                   # the request named no ring
])
def test_ring_places_outside_the_ring_are_data_loss(lying: tuple[str, LyingArrays],
                                                    shm_dir: Path, place: tuple[int, int],
                                                    shared: bool) -> None:
    address, servicer = lying
    servicer.place = place
    store = GrpcZarrStore(address, shared_memory=shared)
    try:
        got: list[object] = []
        with pytest.raises(DataLoss) as info:
            store.read_values([("a/c/0", 0, 0)], lambda i, d, v: got.append(d),
                              versions=False, settle=lambda: None)
        assert info.value.reason == "BAD_RESPONSE" and "ring" in info.value.message
        assert not got
        assert bool(servicer.rings[-1]) is shared
        assert not list(shm_dir.iterdir())  # the ring of a failed call is not kept
    finally:
        store.close()


@pytest.mark.parametrize("release", [0, -8, 2**63 + 64])
def test_ring_values_without_a_valid_release_are_data_loss(lying: tuple[str, LyingArrays],
                                                           shm_dir: Path, release: int) -> None:
    address, servicer = lying
    servicer.place, servicer.release = (0, 16), release
    store = GrpcZarrStore(address, shared_memory=True)
    try:
        with pytest.raises(DataLoss, match="release point") as info:
            store.read_values([("a/c/0", 0, 0)], lambda i, d, v: None, versions=False,
                              settle=lambda: None)
        assert info.value.reason == "BAD_RESPONSE"
        assert not list(shm_dir.iterdir())  # that ring is not used again
    finally:
        store.close()
