"""The shared key file's format: what parses, and the message for what does not."""

from __future__ import annotations

import json

import pytest

from gristmill.common.auth import Role, hash_secret
from gristmill.common.keyfile import KeyFileError, parse_key_file

GOOD = {"id": "3f2a9c0b1d4e", "sha256": hash_secret("s"), "role": "writer", "name": "n",
        "created": "2026-01-01T00:00:00+00:00", "revoked": None}


def text(*keys: object, version: object = 1) -> str:
    return json.dumps({"gristmill_keys": version, "keys": list(keys)})


def test_a_good_file() -> None:
    keys = parse_key_file(text(GOOD, {**GOOD, "id": "ab", "revoked": "2026-02-01"}))
    digest, record = keys["3f2a9c0b1d4e"]
    assert digest == hash_secret("s") and record.role == Role.WRITER and record.revoked is None
    assert keys["ab"][1].revoked == "2026-02-01"
    assert parse_key_file(text()) == {}


@pytest.mark.parametrize(("content", "message"), [
    ("{", "is not JSON"),
    (text(version=2), "not a gristmill key file"),
    (json.dumps({"keys": []}), "not a gristmill key file"),
    (text("x"), r"keys\[0\] is not an object"),
    (text({**GOOD, "id": "a_b"}), r"keys\[0\]: \"id\" must be the key id"),
    (text(GOOD, GOOD), r"keys\[1\]: key id 3f2a9c0b1d4e appears twice"),
    (text({**GOOD, "sha256": "AB" * 32}), "64 lower-case hex digits"),
    (text({**GOOD, "role": "root"}), "reader, writer or admin"),
    (text({**GOOD, "revoked": 5}), "must be null or a time"),
])
def test_bad_files_are_named(content: str, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        parse_key_file(content, "keys.json")
