from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gristmill.client.hub import Hub
from tests.helpers import Running, start_in_process


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    """The all-in-one server in this process, on a real socket (port 0)."""
    running = start_in_process(tmp_path / "data")
    yield running
    assert running.server is not None
    running.server.stop(0)


@pytest.fixture
def hub(server: Running, tmp_path: Path) -> Iterator[Hub]:
    with Hub(server.address, server.admin_key, tmp_path / "cache", show_progress=False) as h:
        yield h
