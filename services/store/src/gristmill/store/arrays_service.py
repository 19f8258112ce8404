"""ArrayService over gRPC: validates, delegates to :class:`ArrayStore`, converts.

Hosted as its own service ("arrays") beside the store: it shares the store's
storage backend when both run in one process, and opens the configured
backend itself when it runs alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from gristmill.common.auth import Role
from gristmill.common.paging import decode_page_token, encode_page_token, page_size
from gristmill.common.service import ServiceContext, ServiceSpec
from gristmill.store.arrays import ArrayStore, validate_array_path
from gristmill.store.config import StoreConfig
from gristmill.store.disk import private_dir
from gristmill.store.objects import ObjectBackend, open_backend
from gristmill.store.store import Store
from gristmill.v1 import arrays_pb2

__all__ = ["SERVICE", "SERVICE_NAME", "ArrayServicer", "open_array_store"]

log = logging.getLogger("gristmill.store.arrays")

SERVICE_NAME = "gristmill.v1.ArrayService"
#: Room left in a message for framing when a chunk must travel whole.
_FRAMING = 64 * 1024


class ArrayServicer:
    """gRPC front of the array hierarchy (registered by :func:`_add_to_server`)."""

    def __init__(self, arrays: ArrayStore) -> None:
        self.arrays = arrays

    def GetKeys(self, request: arrays_pb2.GetKeysRequest,
                context: grpc.ServicerContext) -> Iterator[bytes]:
        # serialized GetKeysResponse messages (see _add_to_server)
        yield from self.arrays.get_keys(request, context.is_active)

    def PutKeys(self, request_iterator: Iterator[arrays_pb2.PutKeysRequest],
                context: grpc.ServicerContext) -> arrays_pb2.PutKeysResponse:
        return arrays_pb2.PutKeysResponse(
            results=self.arrays.put_keys(request_iterator, context.is_active))

    def DeleteKeys(self, request: arrays_pb2.DeleteKeysRequest,
                   context: grpc.ServicerContext) -> arrays_pb2.DeleteKeysResponse:
        return arrays_pb2.DeleteKeysResponse(results=self.arrays.delete_keys(request))

    def ListKeys(self, request: arrays_pb2.ListKeysRequest,
                 context: grpc.ServicerContext) -> arrays_pb2.ListKeysResponse:
        size = page_size(request.page_size, 1000, 10_000)
        query = ["keys", request.prefix, request.delimiter]
        after = decode_page_token(request.page_token, query)
        keys = self.arrays.list_keys(request.prefix, after, size + 1, request.delimiter)
        token = encode_page_token(query, keys[size - 1][0]) if len(keys) > size else ""
        return arrays_pb2.ListKeysResponse(
            keys=[arrays_pb2.KeyInfo(key=k, size=n) for k, n in keys[:size]],
            next_page_token=token)

    def ListArrays(self, request: arrays_pb2.ListArraysRequest,
                   context: grpc.ServicerContext) -> arrays_pb2.ListArraysResponse:
        size = page_size(request.page_size, 100, 1000)
        after = decode_page_token(request.page_token, ["arrays"])
        found = self.arrays.list_arrays(after, size + 1)
        token = encode_page_token(["arrays"], found[size - 1].path) if len(found) > size else ""
        return arrays_pb2.ListArraysResponse(arrays=[a.message() for a in found[:size]],
                                             next_page_token=token)

    def GetArray(self, request: arrays_pb2.GetArrayRequest,
                 context: grpc.ServicerContext) -> arrays_pb2.GetArrayResponse:
        return arrays_pb2.GetArrayResponse(array=self.arrays.get_array(request.path).message())

    def DeleteArray(self, request: arrays_pb2.DeleteArrayRequest,
                    context: grpc.ServicerContext) -> arrays_pb2.DeleteArrayResponse:
        path = validate_array_path(request.path)
        keys, freed = self.arrays.delete_array(path)
        log.info("deleted array", extra={"array": path, "keys": keys, "bytes": freed})
        return arrays_pb2.DeleteArrayResponse(keys_deleted=keys, bytes_freed=freed)


def _backend(ctx: ServiceContext) -> ObjectBackend:
    """The store's backend when the store runs in this process, else the configured one."""
    store = ctx.local.get("store")
    if isinstance(store, Store):  # the store in this process: share its backend
        return store.blobs.backend
    cfg = ctx.config  # the array service runs alone (--services arrays)
    private_dir(cfg.data_dir)
    opened = open_backend(StoreConfig.of(cfg), private_dir(cfg.data_dir / "store"))
    ctx.resources.append(opened)
    return opened


def open_array_store(ctx: ServiceContext) -> ArrayStore:
    """The array store for a server config, on the store's backend."""
    cfg = ctx.config
    store = StoreConfig.of(cfg)
    return ArrayStore(_backend(ctx),
                      max_chunk_bytes=min(store.max_array_chunk_bytes,
                                          cfg.max_message_bytes - _FRAMING),
                      read_message_bytes=store.read_message_bytes, shm_dir=store.shm_dir)


def _build(ctx: ServiceContext, server: grpc.Server) -> None:
    arrays = open_array_store(ctx)
    ctx.local["arrays"] = arrays
    ctx.resources.append(arrays)
    ctx.health_checks[SERVICE_NAME] = arrays.backend.check_health
    _add_to_server(ArrayServicer(arrays), server)


def _pass_serialized(message: bytes | Message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


#: gRPC's handler factory per (client streaming, server streaming).
_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def _add_to_server(servicer: ArrayServicer, server: grpc.Server) -> None:
    """``add_ArrayServiceServicer_to_server``, with GetKeys sending messages serialized already.

    The handlers are built from the service's descriptor, as the generated
    function builds them, so every method is served with its own types.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in arrays_pb2.DESCRIPTOR.services_by_name["ArrayService"].methods:
        request = getattr(arrays_pb2, method.input_type.name)
        response = getattr(arrays_pb2, method.output_type.name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name), request_deserializer=request.FromString,
            response_serializer=(_pass_serialized if method.name == "GetKeys"
                                 else response.SerializeToString))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


#: DeleteArray needs only a writer key: a writer may delete every key of an
#: array with DeleteKeys anyway, so asking for an admin key would protect nothing.
SERVICE = ServiceSpec(
    name="arrays",
    # built after these when they run in this process: it uses them in-process
    after=("store",),
    full_name=SERVICE_NAME,
    build=_build,
    roles={
        "GetKeys": Role.READER,
        "ListKeys": Role.READER,
        "ListArrays": Role.READER,
        "GetArray": Role.READER,
        "PutKeys": Role.WRITER,
        "DeleteKeys": Role.WRITER,
        "DeleteArray": Role.WRITER,
    },
)
