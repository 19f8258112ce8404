from __future__ import annotations

from pathlib import Path

import pytest

from gristmill.client.hub import Hub
from scripts.sample_data import make_sample_folder
from tests.helpers import DATASET, Running


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    make_sample_folder(folder, count=22, max_side=360)
    return folder


@pytest.fixture
def fed(server: Running, hub: Hub, photos: Path) -> Running:
    """The all-in-one server with the photos imported and committed."""
    hub.import_folder(DATASET, photos)
    hub.commit_version(DATASET)
    return server
