"""The committed generated code matches protos/ (CI fails when it is stale)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_generated_code_is_fresh() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_buf_lint_clean() -> None:
    buf = ROOT / ".venv" / "bin" / "buf"
    out = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
