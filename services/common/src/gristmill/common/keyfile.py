"""API keys shared by every server of a deployment: a read-only file of key hashes.

``gristmill keys export`` writes the keys of a SQLite key database (the
operator's, where keys are created and revoked) as JSON::

    {"gristmill_keys": 1,
     "keys": [{"id": "3f2a9c0b1d4e", "sha256": "<hex>", "role": "reader",
               "name": "training", "created": "2026-01-01T00:00:00+00:00",
               "revoked": null}]}

Servers configured with ``auth.shared_keys_file`` read it instead of a key
database of their own. In Kubernetes it is a Secret mounted read-only into
every pod; when the Secret changes, the kubelet swaps the file and each server
sees the new inode or mtime at its next check (at most every
``auth.reload_seconds``, on the next call) and re-reads it, without a restart.
A change that cannot be read or parsed keeps the last good keys and is logged
and counted (``gristmill_auth_key_file_errors_total``, alert
``GristmillKeyFileBroken``): a broken update never locks everyone out, but
what it changed (a revocation, say) has not taken effect until it is fixed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gristmill.client.errors import Unauthenticated
from gristmill.common import metrics
from gristmill.common.auth import ApiKey, KeyStore, Role, secret_matches, split_key

__all__ = ["FORMAT_VERSION", "KeyFile", "KeyFileError", "dump_key_file", "parse_key_file"]

log = logging.getLogger("gristmill.auth")

#: The value of ``gristmill_keys`` in files this version writes and reads.
FORMAT_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9A-Za-z]{1,64}")

#: A file's identity: device, inode, size, mtime (ns). A changed one means "re-read".
_Stamp = tuple[int, int, int, int]


class KeyFileError(ValueError):
    """The shared key file is missing, unreadable or not in the expected format."""


def parse_key_file(text: str, source: str = "key file") -> dict[str, tuple[str, ApiKey]]:
    """Keys of a shared key file by id: (secret sha256, record); :class:`KeyFileError` if bad."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KeyFileError(f"{source} is not JSON ({e}); write it with `gristmill keys "
                           "export`") from None
    if not isinstance(data, dict) or data.get("gristmill_keys") != FORMAT_VERSION or \
            not isinstance(data.get("keys"), list):
        raise KeyFileError(f"{source} is not a gristmill key file (expected an object with "
                           f"\"gristmill_keys\": {FORMAT_VERSION} and a \"keys\" list); write it "
                           "with `gristmill keys export`")
    keys: dict[str, tuple[str, ApiKey]] = {}
    for i, entry in enumerate(data["keys"]):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where} is not an object")
        key_id, digest, role = entry.get("id"), entry.get("sha256"), entry.get("role")
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise KeyFileError(f"{where}: \"id\" must be the key id (letters and digits)")
        if key_id in keys:
            raise KeyFileError(f"{where}: key id {key_id} appears twice")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise KeyFileError(f"{where}: \"sha256\" must be 64 lower-case hex digits")
        if role not in ("reader", "writer", "admin"):
            raise KeyFileError(f"{where}: \"role\" must be reader, writer or admin")
        revoked = entry.get("revoked")
        if revoked is not None and not isinstance(revoked, str):
            raise KeyFileError(f"{where}: \"revoked\" must be null or a time")
        keys[key_id] = (digest, ApiKey(key_id, Role.parse(role), str(entry.get("name") or ""),
                                       str(entry.get("created") or ""), revoked))
    return keys


def dump_key_file(keys: KeyStore) -> str:
    """The shared key file for every key of ``keys`` (hashes only, never a secret)."""
    rows = ",\n".join("  " + json.dumps(k) for k in keys.export())
    return (f'{{"gristmill_keys": {FORMAT_VERSION}, "keys": [\n{rows}\n]}}\n' if rows
            else f'{{"gristmill_keys": {FORMAT_VERSION}, "keys": []}}\n')


def _stamp(path: Path) -> _Stamp:
    st = os.stat(path)  # follows the kubelet's ..data symlink to the current file
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class KeyFile:
    """Keys from a shared key file, re-read when it changes.

    The file is checked at most every ``reload_seconds``, when a call needs a
    key. Raises :class:`KeyFileError` at construction when the file is missing or
    invalid: a server does not start without keys.
    """

    def __init__(self, path: Path, reload_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._interval = reload_seconds
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._stamp = _stamp(self.path)
            self._keys = parse_key_file(self.path.read_text(), str(self.path))
        except OSError as e:
            raise KeyFileError(f"cannot read the shared key file {self.path}: {e.strerror}; "
                               "mount it or write it with `gristmill keys export`") from None
        self._next_check = clock() + reload_seconds
        self._failed: _Stamp | None = None

    def _current(self) -> dict[str, tuple[str, ApiKey]]:
        now = self._clock()
        if now < self._next_check:
            return self._keys
        with self._lock:
            if now >= self._next_check:
                self._next_check = now + self._interval
                self._reload_if_changed()
            return self._keys

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp or stamp == self._failed:
                return
            keys = parse_key_file(self.path.read_text(), str(self.path))
        except (OSError, KeyFileError) as e:
            reason = f"{e.strerror}" if isinstance(e, OSError) else str(e)
            try:
                self._failed = _stamp(self.path)
            except OSError:
                self._failed = None
            metrics.AUTH_KEY_FILE_ERRORS.inc()
            log.error("cannot reload the shared key file %s (%s); keeping the %d keys read "
                      "before", self.path, reason, len(self._keys))
            return
        self._keys, self._stamp, self._failed = keys, stamp, None
        metrics.AUTH_KEY_FILE_RELOADS.inc()
        log.info("reloaded the shared key file %s: %d keys, %d revoked", self.path, len(keys),
                 sum(1 for _, k in keys.values() if k.revoked))

    def list(self) -> Sequence[ApiKey]:
        """Every key in the file (revoked ones included)."""
        return [record for _, record in self._current().values()]

    def authenticate(self, key: str) -> ApiKey:
        """The record of a valid key, or :class:`Unauthenticated`."""
        key_id, secret = split_key(key)
        found = self._current().get(key_id)
        if not secret_matches(found[0] if found else None, secret) or found is None:
            raise Unauthenticated("invalid API key; ask an admin for a key of this deployment "
                                  "(`gristmill keys create`, then `gristmill keys export`)")
        record = found[1]
        if record.revoked is not None:
            raise Unauthenticated(f"API key {key_id} was revoked at {record.revoked}; ask an "
                                  "admin for a new one")
        return record

    require = staticmethod(KeyStore.require)

    def close(self) -> None:
        """Nothing to release (the file is read whole on each change)."""
