"""The annotation log's canonical encoding, hashes and offline chain checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gristmill.client.annolog import (
    DOMAIN_TAG,
    EVENT_TYPES,
    GENESIS_HASH,
    ChainEvent,
    encode_event,
    event_hash,
    verify_chain,
)

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
key = st.one_of(st.just(""), hex64)
events = st.tuples(hex64, st.integers(-2**63, 2**63 - 1), st.text(max_size=20),
                   st.text(max_size=20), st.integers(-2**63, 2**63 - 1), st.text(max_size=40),
                   st.text(max_size=60), key)


def decode(data: bytes) -> tuple[object, ...]:
    """Invert encode_event: proves every field can be read back unambiguously."""
    fields = []
    at = 0
    while at < len(data):
        (n,) = struct.unpack(">Q", data[at:at + 8])
        fields.append(data[at + 8:at + 8 + n])
        at += 8 + n
    tag, prev, seq, type_, author, time_us, ident, pub, payload = fields
    assert tag == DOMAIN_TAG
    return (prev.hex(), struct.unpack(">q", seq)[0], type_.decode(), author.decode(),
            struct.unpack(">q", time_us)[0], ident.decode(), payload.decode(), pub.hex())


@settings(max_examples=300)
@given(events, events)
def test_different_events_never_encode_alike(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    ea, eb = encode_event(*a), encode_event(*b)  # type: ignore[arg-type]
    assert (ea == eb) == (a == b)
    assert decode(ea) == a


@settings(max_examples=100)
@given(events)
def test_encoding_reads_back(a: tuple[object, ...]) -> None:
    assert decode(encode_event(*a)) == a  # type: ignore[arg-type]


def test_shifting_bytes_between_fields_changes_the_hash() -> None:
    base = (GENESIS_HASH, 1, "owner.add", "key:ab", 5, "id", "{}")
    assert event_hash(*base) != event_hash(GENESIS_HASH, 1, "owner.add", "key:a", 5, "bid", "{}")
    assert event_hash(*base) != event_hash(GENESIS_HASH, 2, "owner.add", "key:ab", 5, "id", "{}")


def _chain(n: int) -> list[ChainEvent]:
    out, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        payload = '{"principal":"key:x"}'
        h = event_hash(prev, seq, "owner.add", "key:x", seq, f"id{seq}", payload)
        out.append(ChainEvent(seq, f"id{seq}", "owner.add", "key:x", seq, payload, prev, h))
        prev = h
    return out


def test_verify_chain_names_the_first_bad_event() -> None:
    chain = _chain(50)
    assert verify_chain(enumerate(chain, 1)).ok
    edited = list(chain)
    edited[20] = ChainEvent(**{**edited[20].__dict__, "author": "key:y"})
    report = verify_chain(enumerate(edited, 1))
    assert report.first_bad is not None and report.first_bad.seq == 21
    assert "content" in report.first_bad.problem
    dropped = chain[:10] + chain[11:]
    report = verify_chain(enumerate(dropped, 1))
    assert report.first_bad is not None and report.first_bad.seq == 11


def test_lines_must_be_canonical() -> None:
    line = _chain(1)[0].to_line()
    assert ChainEvent.from_line(line) == _chain(1)[0]
    with pytest.raises(ValueError, match="canonical"):
        ChainEvent.from_line(line.replace(":", ": ", 1))
    assert set(EVENT_TYPES) >= {"owner.add", "release.create"}
