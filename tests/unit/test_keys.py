from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gristmill.client.errors import NotFound, PermissionDenied, Unauthenticated
from gristmill.common.auth import KeyStore, Role


def test_keys_stored_hashed_and_checked(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite")
    key, record = store.create(Role.WRITER, "ci")
    assert store.authenticate(key).role == Role.WRITER
    raw = (tmp_path / "keys.sqlite").read_bytes()
    secret = key.split("_", 2)[2]
    assert secret.encode() not in raw
    rows = sqlite3.connect(tmp_path / "keys.sqlite").execute("SELECT * FROM keys").fetchall()
    assert all(secret not in str(r) for r in rows)
    assert oct((tmp_path / "keys.sqlite").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Unauthenticated):
        store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B"))
    with pytest.raises(PermissionDenied, match="admin"):
        store.require(record, Role.ADMIN, "/gristmill.v1.StoreService/DeleteDataset")
    store.revoke(record.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        store.authenticate(key)
    with pytest.raises(NotFound):
        store.revoke(record.key_id)
    assert [k.key_id for k in store.list()] == [record.key_id]
    store.close()
