"""Baseline servers for benchmarks, run as separate processes.

    python bench/baselines.py grpc PORT_FILE   # bare grpcio: a folder's files, 1 MiB messages
    python bench/baselines.py tcp PORT_FILE    # raw loopback TCP: N bytes per connection

The gRPC one reads the same files from disk as the store does and sends them
as raw bytes (no protobuf, no gristmill code); the TCP one sends N bytes from
memory, the transport's ceiling.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

MiB = 1024 * 1024
PAYLOAD = os.urandom(MiB)
METHOD = "/bench.Bytes/Stream"


def _grpc_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """Stream the files of a directory (named in the request) in 1 MiB messages."""
    folder = Path(request.decode())
    pending = bytearray()
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            while block := f.read(MiB - len(pending)):
                if not pending and len(block) == MiB:
                    yield block
                    continue
                pending += block
                if len(pending) >= MiB:
                    yield bytes(pending)
                    pending.clear()
    if pending:
        yield bytes(pending)


def serve_grpc(port_file: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[
        ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])
    handler = grpc.method_handlers_generic_handler("bench.Bytes", {
        "Stream": grpc.unary_stream_rpc_method_handler(_grpc_stream)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        total = struct.unpack("<Q", sock.recv(8, socket.MSG_WAITALL))[0]
        view = memoryview(PAYLOAD)
        sent = 0
        while sent < total:
            sent += sock.send(view[:min(MiB, total - sent)])


def serve_tcp(port_file: Path) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TcpHandler)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


def grpc_fetch(port: int, folder: Path) -> int:
    """Client side of the bare grpcio stream of a folder's files; returns bytes received."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_receive_message_length", 64 * MiB)]) as ch:
        call: grpc.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(METHOD)
        got = 0
        for chunk in call(str(folder).encode()):
            got += len(chunk)
        return got


def tcp_fetch(port: int, total: int) -> int:
    """Client side of the raw socket; returns bytes received."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(struct.pack("<Q", total))
        got = 0
        while got < total:
            n = s.recv_into(view)
            if not n:
                break
            got += n
        return got


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gristmill.client.tuning import tune_malloc

    tune_malloc()
    kind, port_path = sys.argv[1], Path(sys.argv[2])
    threading.current_thread().name = f"baseline-{kind}"
    {"grpc": serve_grpc, "tcp": serve_tcp}[kind](port_path)
