"""Encoded bytes for samples that name a store file instead of carrying bytes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import GristmillError, from_item_error, stream_rpc
from gristmill.common.config import DecodeConfig
from gristmill.v1 import decode_pb2, store_pb2, store_pb2_grpc

__all__ = ["FileSource", "RemoteStore", "assemble", "read_refs"]

#: Paths per ReadFiles call (the store's own limit is larger).
PATHS_PER_CALL = 1000

class FileSource(Protocol):
    """Something that reads store files: the in-process Store or a remote one."""

    def read_files(self, dataset: str, version: str, paths: list[str]
                   ) -> Iterable[store_pb2.ReadFilesResponse]:
        """ReadFiles responses for ``paths`` of a dataset version."""


class RemoteStore:
    """A store service reached over gRPC (decode deployed apart from the store)."""

    def __init__(self, config: DecodeConfig, max_message_bytes: int) -> None:
        assert config.store_address is not None
        self._channel = open_channel(ConnectionOptions(
            address=config.store_address, api_key=config.store_api_key,
            ca_file=config.store_ca_file, max_message_bytes=max_message_bytes))
        self._stub = store_pb2_grpc.StoreServiceStub(self._channel)

    def read_files(self, dataset: str, version: str, paths: list[str]
                   ) -> Iterator[store_pb2.ReadFilesResponse]:
        """ReadFiles on the remote store; call failures raise GristmillError."""
        yield from stream_rpc(self._stub.ReadFiles(store_pb2.ReadFilesRequest(
            dataset=dataset, version=version, paths=paths)))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def assemble(responses: Iterable[store_pb2.ReadFilesResponse]
             ) -> dict[str, bytes | GristmillError]:
    """Join the pieces of each file; a per-file error replaces its bytes."""
    parts: dict[str, list[bytes]] = {}
    out: dict[str, bytes | GristmillError] = {}
    for resp in responses:
        for piece in resp.files:
            if piece.HasField("error"):
                err = piece.error
                out[piece.path] = from_item_error(err.code, err.reason, err.message)
                continue
            parts.setdefault(piece.path, []).append(piece.data)
            if piece.eof:
                out[piece.path] = b"".join(parts.pop(piece.path))
    return out


def read_refs(source: FileSource | None, refs: list[decode_pb2.StoreRef]
              ) -> list[bytes | GristmillError]:
    """The bytes (or the error) of each reference, in order; few calls per batch."""
    groups: dict[tuple[str, str], list[str]] = {}
    for ref in refs:
        groups.setdefault((ref.dataset, ref.version), []).append(ref.path)
    found: dict[tuple[str, str, str], bytes | GristmillError] = {}
    for (dataset, version), paths in groups.items():
        unique = list(dict.fromkeys(paths))
        for i in range(0, len(unique), PATHS_PER_CALL):
            chunk = unique[i:i + PATHS_PER_CALL]
            try:
                if source is None:
                    raise GristmillError("this server has no store to read references from; "
                                         "send the bytes inline or set decode.store_address")
                got = assemble(source.read_files(dataset, version, chunk))
            except GristmillError as e:
                got = dict.fromkeys(chunk, e)
            for p in chunk:
                data = got.get(p)
                found[(dataset, version, p)] = data if data is not None else GristmillError(
                    f"the store sent no data for {p!r}")
    return [found[(r.dataset, r.version, r.path)] for r in refs]
