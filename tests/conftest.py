from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

# h5py before anything loads libvips (tests/images.py imports pyvips directly):
# libvips links Debian's HDF5, which would shadow h5py's own (see gristmill.decode)
import h5py  # noqa: F401
import pytest

from gristmill.client.hub import Hub
from tests.helpers import Running, ceph_backend, start_in_process

# ceph_cluster: a local Ceph cluster (deploy/local/ceph-up), started only for tests that ask
pytest_plugins = ["tests.ceph"]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """CLI commands run in-process install a handler on this test's captured stdout: undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def shm_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A shared-memory directory of this test's own, for client and servers alike.

    Every test ends with it empty: a ring left behind is a leak.
    """
    directory = Path("/dev/shm") / f"gristmill-test-{uuid.uuid4().hex[:12]}"
    directory.mkdir()
    monkeypatch.setenv("GRISTMILL_SHM_DIR", str(directory))
    monkeypatch.setenv("GRISTMILL_INGEST__SHM_DIR", str(directory))
    monkeypatch.setenv("GRISTMILL_STORE__SHM_DIR", str(directory))
    try:
        yield directory
        left = sorted(p.name for p in directory.iterdir())
        assert not left, f"shared-memory rings left behind: {left}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def storage() -> str:
    """The store backend of the `server` fixture: "fs" here; modules that run on both
    backends override it with `storage = both_backends()` (tests.helpers)."""
    return "fs"


@pytest.fixture
def server(tmp_path: Path, storage: str, request: pytest.FixtureRequest) -> Iterator[Running]:
    """The all-in-one server in this process, on a real socket (port 0).

    On the "ceph" storage it keeps its objects in a RADOS namespace of its own in
    the session's cluster (`ceph_cluster`); its catalog stays in its data directory.
    """
    overrides: dict[str, object] = {}
    if storage == "ceph":
        overrides["store"] = {"backend": ceph_backend(request.getfixturevalue("ceph_cluster"))}
    running = start_in_process(tmp_path / "data", **overrides)
    yield running
    assert running.server is not None
    running.server.stop(0)


@pytest.fixture
def hub(server: Running, tmp_path: Path) -> Iterator[Hub]:
    with Hub(server.address, server.admin_key, tmp_path / "cache", show_progress=False) as h:
        yield h
