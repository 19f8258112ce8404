"""API keys: issued once, stored only as sha256 hashes, compared in constant time.

A key looks like ``gm_<id>_<secret>``: the id finds the row, the secret is
checked with :func:`hmac.compare_digest` against its stored hash. Secrets are
256 random bits, so a fast hash is enough (no password stretching needed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import sqlite_utils

from gristmill.client.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from gristmill.client.private import private_database

__all__ = ["ApiKey", "KeyChecker", "KeyStore", "Role", "hash_secret", "secret_matches",
           "split_key"]


class Role(IntEnum):
    """Ordered roles: a higher role may do all that a lower one may."""

    READER = 1
    WRITER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        """Role from its name ("reader", "writer", "admin")."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise InvalidArgument("role", f"unknown role {name!r}; use one of reader, writer, "
                                  "admin") from None


@dataclass(frozen=True)
class ApiKey:
    """A stored key's public facts (never the secret)."""

    key_id: str
    role: Role
    name: str
    created: str
    revoked: str | None


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret: its sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str]:
    """``gm_<id>_<secret>`` as (id, secret), or :class:`Unauthenticated`."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "gm":
        raise Unauthenticated("malformed API key; expected 'authorization: Bearer gm_<id>_"
                              "<secret>' as printed by `gristmill keys create`")
    return parts[1], parts[2]


def secret_matches(stored_sha256: str | None, secret: str) -> bool:
    """Whether ``secret`` hashes to ``stored_sha256``, in constant time.

    Compares also when nothing is stored (an unknown id), so timing does not
    tell known ids apart.
    """
    stored = stored_sha256 or "0" * 64
    return hmac.compare_digest(stored.encode(), hash_secret(secret).encode()) and \
        stored_sha256 is not None


class KeyChecker(Protocol):
    """What servers need from a key store: :class:`KeyStore` or a shared key file."""

    def authenticate(self, key: str) -> ApiKey:
        """The record of a valid key, or :class:`Unauthenticated`."""

    def require(self, key: ApiKey, needed: Role, method: str) -> None:
        """Raise :class:`PermissionDenied` unless ``key`` has at least ``needed``."""

    def close(self) -> None:
        """Release the store."""


class KeyStore:
    """API keys in a SQLite file (shared by services reading the same file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_database(self.path)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        self._db.table("keys").create(
            {"key_id": str, "secret_sha256": str, "role": str, "name": str, "created": str,
             "revoked": str},
            pk="key_id", not_null={"secret_sha256", "role", "created"}, if_not_exists=True,
        )

    def create(self, role: Role, name: str = "") -> tuple[str, ApiKey]:
        """Create a key; returns (the full key, shown only now, and its record)."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._lock:
            self._db.table("keys").insert({"key_id": key_id, "secret_sha256": hash_secret(secret),
                                     "role": role.name.lower(), "name": name, "created": created,
                                     "revoked": None})
        return f"gm_{key_id}_{secret}", ApiKey(key_id, role, name, created, None)

    def export(self) -> list[dict[str, str | None]]:
        """Every key as stored: id, secret's sha256, role, name, created, revoked.

        Oldest first; the content of a shared key file (:mod:`gristmill.common.keyfile`).
        """
        with self._lock:
            rows = list(self._db.table("keys").rows_where(order_by="created, key_id"))
        return [{"id": r["key_id"], "sha256": r["secret_sha256"], "role": r["role"],
                 "name": r["name"] or "", "created": r["created"], "revoked": r["revoked"]}
                for r in rows]

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self._lock:
            rows = list(self._db.table("keys").rows_where(order_by="created, key_id"))
        return [ApiKey(r["key_id"], Role.parse(r["role"]), r["name"] or "", r["created"],
                       r["revoked"]) for r in rows]

    def revoke(self, key_id: str) -> None:
        """Revoke a key by id (the part after ``gm_``); it stops working at once."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._lock:
            cur = self._db.execute("UPDATE keys SET revoked = ? WHERE key_id = ? AND revoked IS "
                                   "NULL", [now, key_id])
        if cur.rowcount == 0:
            raise NotFound(f"no active API key with id {key_id!r}; see `gristmill keys list`")

    def count_active(self) -> int:
        """Number of keys not revoked."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM keys WHERE revoked IS NULL")
                       .fetchone()[0])

    def authenticate(self, key: str) -> ApiKey:
        """The record of a valid key, or :class:`Unauthenticated`.

        Reads the key file every time (one indexed row; WAL readers never wait
        for writers), so a key revoked by any process is refused at once.
        """
        key_id, secret = split_key(key)
        with self._lock:
            row = self._db.execute("SELECT secret_sha256, role, name, created, revoked FROM keys "
                                   "WHERE key_id = ?", [key_id]).fetchone()
        if not secret_matches(row[0] if row else None, secret):
            raise Unauthenticated("invalid API key; create one with `gristmill keys create`")
        if row[4] is not None:
            raise Unauthenticated(f"API key {key_id} was revoked at {row[4]}; ask an admin for "
                                  "a new one")
        return ApiKey(key_id, Role.parse(row[1]), row[2] or "", row[3], row[4])

    @staticmethod
    def require(key: ApiKey, needed: Role, method: str) -> None:
        """Raise :class:`PermissionDenied` unless ``key`` has at least ``needed``."""
        if key.role < needed:
            raise PermissionDenied(
                f"{method} needs the {needed.name.lower()} role; API key {key.key_id} is a "
                f"{key.role.name.lower()}. Ask an admin for a key with that role.")

    def close(self) -> None:
        """Close the database."""
        self._db.conn.close()
