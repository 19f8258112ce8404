"""Examples in the docs run; the Kubernetes base agrees with the server config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gristmill.common.config import load_config
from gristmill.store.config import StoreConfig
from scripts.sample_data import make_sample_folder
from tests.helpers import ROOT, Running

DOCS = [ROOT / "README.md", ROOT / "docs" / "store.md", ROOT / "docs" / "decode.md",
        ROOT / "docs" / "ingest.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_run(doc: Path, server: Running, tmp_path: Path) -> None:
    blocks = python_blocks(doc)
    assert blocks, f"{doc} has no python examples"
    make_sample_folder(tmp_path / "photos", count=5, max_side=256)
    env = dict(os.environ, GRISTMILL_ADDRESS=server.address, GRISTMILL_API_KEY=server.admin_key,
               GRISTMILL_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"example in {doc.name} failed:\n{code}\n{out.stderr}"


def test_operations_yaml_example_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, flags=re.S)
    assert block is not None
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(block.group(1))
    cfg = load_config(cfg_file, environ={})
    assert cfg.tls is not None and StoreConfig.of(cfg).backend.kind == "fs"


def test_k8s_base_matches_config(tmp_path: Path) -> None:
    """Each service's config in the base loads; deploy/k8s is checked in depth in test_k8s."""
    from scripts.k8s_render import render

    docs = render(ROOT / "deploy" / "k8s" / "base")
    configs = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(configs) == 4
    for cm in configs:
        path = tmp_path / "config.yaml"
        path.write_text(cm["data"]["config.yaml"])
        cfg = load_config(path, environ={})
        assert yaml.safe_load(cm["data"]["config.yaml"])["services"] == list(cfg.services)
