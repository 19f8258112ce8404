"""The annotation log's chain: canonical event encoding, hashes, signatures, offline checks.

Server and client share this module, so an exported log is verified with the
same code that wrote it. Standard library only, except Ed25519 signatures,
which need PyNaCl (``pip install pynacl``); without it, signed events are
still hash-checked and counted as signatures left unchecked.

An event's hash is SHA-256 over a length-prefixed encoding of, in order::

    domain tag, previous hash (32 bytes), sequence number (8 bytes),
    type, author, timestamp in microseconds (8 bytes), id,
    signer public key (empty when unsigned), payload bytes

Every field carries its length as 8 big-endian bytes, so no two different
events encode alike (no field can borrow bytes from its neighbour), and the
author, the type and the position are all covered.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DOMAIN_TAG",
    "EVENT_TYPES",
    "GENESIS_HASH",
    "BadEvent",
    "ChainEvent",
    "ChainReport",
    "canonical_json",
    "check_link",
    "encode_event",
    "event_hash",
    "public_key_of",
    "read_log_file",
    "sign_hash",
    "signature_problem",
    "verify_chain",
]

#: First field of every encoding: ties a hash to this format and version.
DOMAIN_TAG = b"gristmill.annotate.event.v1"
#: The previous hash of the first event.
GENESIS_HASH = "0" * 64
#: Event type names, as hashed and exported.
EVENT_TYPES = (
    "schema.create", "schema.deprecate",
    "annotation.create", "annotation.update", "annotation.delete",
    "review.accept", "review.reject",
    "owner.add", "owner.remove",
    "release.create",
)
_LINE_KEYS = ("author", "hash", "id", "payload", "prev_hash", "public_key", "seq",
              "signature", "time_us", "type")
_HEX = frozenset("0123456789abcdef")


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, UTF-8 text, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def encode_event(prev_hash: str, seq: int, type_: str, author: str, time_us: int,
                 event_id: str, payload: str, public_key: str = "") -> bytes:
    """The canonical, length-prefixed encoding an event's hash is taken over.

    Raises:
        ValueError: a hash or key that is not lower-case hex of the right length.
    """
    prev = _hex_bytes(prev_hash, 32, "prev_hash")
    key = _hex_bytes(public_key, 32, "public_key") if public_key else b""
    return b"".join((
        _field(DOMAIN_TAG), _field(prev), _field(struct.pack(">q", seq)),
        _field(type_.encode()), _field(author.encode()), _field(struct.pack(">q", time_us)),
        _field(event_id.encode()), _field(key), _field(payload.encode()),
    ))


def event_hash(prev_hash: str, seq: int, type_: str, author: str, time_us: int,
               event_id: str, payload: str, public_key: str = "") -> str:
    """Hex SHA-256 of :func:`encode_event`."""
    return hashlib.sha256(encode_event(prev_hash, seq, type_, author, time_us, event_id,
                                       payload, public_key)).hexdigest()


def _hex_bytes(text: str, size: int, name: str) -> bytes:
    if len(text) != 2 * size or not set(text) <= _HEX:
        raise ValueError(f"{name} must be {2 * size} lower-case hex digits, got {text[:80]!r}")
    return bytes.fromhex(text)


def sign_hash(signing_key: bytes, hash_hex: str) -> tuple[str, str]:
    """Sign an event hash with an Ed25519 seed (32 bytes); returns (public key, signature) hex.

    Needs PyNaCl.
    """
    from nacl.signing import SigningKey

    key = SigningKey(signing_key)
    signed = key.sign(bytes.fromhex(hash_hex))
    return key.verify_key.encode().hex(), signed.signature.hex()


def public_key_of(signing_key: bytes) -> str:
    """Hex Ed25519 public key of a 32-byte seed (needs PyNaCl)."""
    from nacl.signing import SigningKey

    return str(SigningKey(signing_key).verify_key.encode().hex())


def signature_problem(public_key: str, signature: str, hash_hex: str) -> str | None:
    """Why the signature of ``hash_hex`` does not verify, or None when it does.

    Raises:
        ImportError: PyNaCl is not installed.
    """
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        key = VerifyKey(_hex_bytes(public_key, 32, "public_key"))
        key.verify(bytes.fromhex(hash_hex), _hex_bytes(signature, 64, "signature"))
    except ValueError as e:
        return str(e)
    except BadSignatureError:
        return "the Ed25519 signature does not verify against the event hash and public key"
    except Exception as e:  # noqa: BLE001 - nacl raises its own types for bad keys
        return f"bad public key or signature: {e}"
    return None


@dataclass(frozen=True)
class ChainEvent:
    """One event as stored and exported (hashes, keys and signatures in hex)."""

    seq: int
    id: str
    type: str
    author: str
    time_us: int
    payload: str
    prev_hash: str
    hash: str
    public_key: str = ""
    signature: str = ""

    def computed_hash(self) -> str:
        """The hash this event's content gives (compare with :attr:`hash`)."""
        return event_hash(self.prev_hash, self.seq, self.type, self.author, self.time_us,
                          self.id, self.payload, self.public_key)

    def to_line(self) -> str:
        """The event as one canonical JSON line (no newline), as exported."""
        return canonical_json(asdict(self))

    @classmethod
    def from_line(cls, line: str) -> ChainEvent:
        """Parse an exported line; ValueError unless it is exactly canonical and complete."""
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if sorted(data) != list(_LINE_KEYS):
            missing = sorted(set(_LINE_KEYS) - set(data))
            extra = sorted(set(data) - set(_LINE_KEYS))
            raise ValueError(f"fields differ from an event's (missing {missing}, unknown {extra})")
        for name in ("seq", "time_us"):
            if type(data[name]) is not int:
                raise ValueError(f"{name} is not an integer")
        for name in _LINE_KEYS:
            if name not in ("seq", "time_us") and not isinstance(data[name], str):
                raise ValueError(f"{name} is not a string")
        event = cls(**data)
        if event.to_line() != line:
            raise ValueError("the line is not in canonical form (an edited or damaged byte)")
        return event


@dataclass(frozen=True)
class BadEvent:
    """Where a chain breaks first."""

    seq: int
    id: str
    problem: str
    #: Line of the file (from 1), for exported logs.
    line: int = 0

    def __str__(self) -> str:
        where = f"line {self.line}, " if self.line else ""
        ident = f" (id {self.id})" if self.id else ""
        return f"{where}event seq {self.seq}{ident}: {self.problem}"


@dataclass
class ChainReport:
    """The outcome of walking a chain."""

    events: int = 0
    signatures: int = 0
    #: Signed events whose signature was not checked (PyNaCl missing).
    signatures_unchecked: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    first_bad: BadEvent | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No bad event."""
        return self.first_bad is None


def check_link(event: ChainEvent, expected_seq: int, prev_hash: str,
               check_signature: bool = True) -> str | None:
    """What is wrong with ``event`` at this place of a chain, or None."""
    if event.seq != expected_seq:
        return f"sequence number {event.seq} where {expected_seq} was expected"
    if event.type not in EVENT_TYPES:
        return f"unknown event type {event.type!r}"
    if event.prev_hash != prev_hash:
        return ("previous hash does not match the hash of the event before it (an event was "
                "edited, removed or inserted before this one)")
    try:
        computed = event.computed_hash()
    except ValueError as e:
        return str(e)
    if computed != event.hash:
        return "hash does not match the event's content (the event was edited)"
    if bool(event.public_key) != bool(event.signature):
        return "a public key without a signature, or a signature without a public key"
    if event.signature and check_signature:
        return signature_problem(event.public_key, event.signature, event.hash)
    return None


def _have_nacl() -> bool:
    try:
        import nacl.signing  # noqa: F401
    except ImportError:
        return False
    return True


def verify_chain(events: Iterable[tuple[int, ChainEvent | ValueError]]) -> ChainReport:
    """Walk (line, event or parse error) pairs from the first event; stop at the first bad one."""
    report = ChainReport()
    nacl = _have_nacl()
    prev, expected = GENESIS_HASH, 1
    for line, event in events:
        if isinstance(event, ValueError):
            report.first_bad = BadEvent(expected, "", f"unreadable: {event}", line)
            return report
        problem = check_link(event, expected, prev, check_signature=nacl)
        if problem is not None:
            report.first_bad = BadEvent(expected, event.id, problem, line)
            return report
        if event.signature:
            if nacl:
                report.signatures += 1
            else:
                report.signatures_unchecked += 1
        report.events += 1
        prev, expected = event.hash, expected + 1
        report.head_seq, report.head_hash = event.seq, event.hash
    return report


def read_log_file(path: Path) -> Iterator[tuple[int, ChainEvent | ValueError]]:
    """The events of an exported log (JSON lines), each with its line number.

    A line that does not parse, or is not exactly canonical, comes as a
    ValueError in place of its event; so does a missing final newline.
    """
    with open(path, "rb") as f:
        number = 0
        for number, raw in enumerate(f, 1):  # noqa: B007 - used after the loop
            if not raw.endswith(b"\n"):
                yield number, ValueError("the file ends without a newline (truncated?)")
                return
            try:
                text = raw[:-1].decode("utf-8")
            except UnicodeDecodeError:
                yield number, ValueError("not UTF-8")
                continue
            try:
                yield number, ChainEvent.from_line(text)
            except ValueError as e:
                yield number, e
