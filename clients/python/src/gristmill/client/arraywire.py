"""``GetKeysResponse`` on the wire, without copying chunk bytes through protobuf objects.

GetKeys carries most of an array read's bytes. Built as protobuf objects,
each chunk would be copied into the message, again when it is serialized,
and twice more when the client parses it and reads the field. These
functions write and read the same wire format (``gristmill.v1.GetKeysResponse``,
protobuf encoding: any protobuf client reads what :func:`encode_value` writes,
and :func:`decode_response` reads what protobuf writes, unknown fields
skipped) with one copy on each side: the server joins a message's parts once,
and the client hands out ``memoryview`` slices of the received message.

With a shared-memory ring (``GetKeysRequest.ring``) a value's bytes lie in
the ring instead: its ``KeyValue`` carries ``ring_offset`` and
``ring_length`` and no data, and the message ends with ``ring_release``.

Stdlib only: used by the server (``gristmill.store.arrays``) and the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Response", "ValuePiece", "decode_response", "encode_release", "encode_value",
           "value_overhead"]

# field numbers of gristmill.v1.KeyValue (arrays.proto) and their wire tags
_VALUES = 0x0A  # GetKeysResponse.values = 1, length-delimited
_RELEASE = 0x10  # GetKeysResponse.ring_release = 2, varint
_INDEX, _FOUND, _OFFSET, _DATA, _LAST, _VERSION, _SIZE = 0x08, 0x10, 0x18, 0x22, 0x28, 0x32, 0x38
_RING_OFFSET, _RING_LENGTH = 0x40, 0x48


@dataclass(frozen=True, slots=True)
class ValuePiece:
    """One ``KeyValue`` of a GetKeys response (``data`` a view into the message)."""

    index: int
    found: bool
    offset: int
    data: memoryview
    last: bool
    version: str
    size: int
    #: Where the bytes lie in the request's ring (``ring_length`` 0: in ``data``).
    ring_offset: int = 0
    ring_length: int = 0


@dataclass(frozen=True, slots=True)
class Response:
    """One decoded GetKeysResponse: its values, and the ring's release point (0: no ring)."""

    values: Sequence[ValuePiece]
    ring_release: int


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # protobuf's two's complement for negative int32/int64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _head(index: int, found: bool, offset: int, data_len: int, last: bool, version: str,
          size: int, ring: tuple[int, int] | None) -> tuple[bytes, bytes]:
    """The KeyValue's fields before its data (with the data's tag and length), and after."""
    before = bytearray()
    if index:
        before += bytes((_INDEX,)) + _varint(index)
    if found:
        before += bytes((_FOUND, 1))
    if offset:
        before += bytes((_OFFSET,)) + _varint(offset)
    if data_len:
        before += bytes((_DATA,)) + _varint(data_len)
    after = bytearray()
    if last:
        after += bytes((_LAST, 1))
    if version:
        raw = version.encode()
        after += bytes((_VERSION,)) + _varint(len(raw)) + raw
    if size:
        after += bytes((_SIZE,)) + _varint(size)
    if ring is not None:
        after += bytes((_RING_OFFSET,)) + _varint(ring[0])
        if ring[1]:
            after += bytes((_RING_LENGTH,)) + _varint(ring[1])
    return bytes(before), bytes(after)


def encode_value(index: int, found: bool, offset: int, data: bytes | memoryview, last: bool,
                 version: str = "", size: int = 0, ring: tuple[int, int] | None = None
                 ) -> list[bytes | memoryview]:
    """The parts of one ``values`` entry of a GetKeysResponse (join them to send).

    ``ring`` (offset, length): the bytes lie in the request's ring, and
    ``data`` should be empty.
    """
    before, after = _head(index, found, offset, len(data), last, version, size, ring)
    body = len(before) + len(data) + len(after)
    return [bytes((_VALUES,)) + _varint(body) + before, data, after]


def encode_release(release: int) -> bytes:
    """A GetKeysResponse's ``ring_release`` field (append it to the message's values)."""
    return bytes((_RELEASE,)) + _varint(release)


def value_overhead(version: str = "") -> int:
    """The most bytes :func:`encode_value` adds around a value's data (tags, lengths, fields)."""
    return 72 + len(version.encode())


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _skip(buf: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 2:
        n, pos = _read_varint(buf, pos)
        return pos + n
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_value(buf: memoryview) -> ValuePiece:
    index = offset = size = ring_offset = ring_length = 0
    found = last = False
    data = buf[0:0]
    version = ""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number in (1, 2, 3, 5, 7, 8, 9) and wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if number == 1:
                index = _signed(value)
            elif number == 2:
                found = bool(value)
            elif number == 3:
                offset = _signed(value)
            elif number == 5:
                last = bool(value)
            elif number == 7:
                size = _signed(value)
            elif number == 8:
                ring_offset = _signed(value)
            else:
                ring_length = _signed(value)
        elif number in (4, 6) and wire_type == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            if number == 4:
                data = buf[pos:pos + n]
            else:
                version = bytes(buf[pos:pos + n]).decode()
            pos += n
        else:
            pos = _skip(buf, pos, wire_type)
    if pos != len(buf):
        raise ValueError("truncated KeyValue")
    return ValuePiece(index, found, offset, data, last, version, size, ring_offset, ring_length)


def decode_response(raw: bytes | memoryview) -> Response:
    """One serialized GetKeysResponse; ValueError if it does not parse."""
    buf = memoryview(raw)
    out: list[ValuePiece] = []
    release = 0
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        if key == _VALUES:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated GetKeysResponse")
            out.append(_decode_value(buf[pos:pos + n]))
            pos += n
        elif key == _RELEASE:
            value, pos = _read_varint(buf, pos)
            release = _signed(value)
        else:
            pos = _skip(buf, pos, key & 7)
    if pos != len(buf):
        raise ValueError("truncated GetKeysResponse")
    return Response(out, release)
