"""Starting helper processes that announce readiness by writing a file."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

__all__ = ["start_and_wait"]


def start_and_wait(cmd: list[str], ready: Path, *, log: IO[bytes] | Path | None = None,
                   timeout: float = 30) -> subprocess.Popen[bytes]:
    """Start ``cmd`` and wait until it writes a non-empty ``ready`` file.

    ``log`` receives stdout and stderr (a path is opened for appending); if the
    process exits or the timeout passes first, it is killed and the error
    quotes the log.
    """
    ready.unlink(missing_ok=True)
    sink: IO[bytes] | int = subprocess.DEVNULL
    if isinstance(log, Path):
        sink = open(log, "ab")  # noqa: SIM115 - inherited by the child, closed below
    elif log is not None:
        sink = log
    try:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    finally:
        if isinstance(log, Path) and not isinstance(sink, int):
            sink.close()
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            detail = log.read_text(errors="replace") if isinstance(log, Path) else ""
            raise RuntimeError(f"{' '.join(cmd)} did not become ready:\n{detail}")
        time.sleep(0.05)
    return proc
