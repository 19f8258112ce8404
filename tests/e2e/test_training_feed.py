"""The training feed with real processes: ranks as processes, a server killed mid-epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gristmill.client.delivery import audit
from gristmill.client.hub import Hub
from gristmill.client.loader import Loader
from scripts.sample_data import make_sample_folder
from tests.helpers import Running, spawn_server, stop_process

DATASET = "photos"
SMALL = {"batch_size": 2, "image_size": 128, "downsampling_ratio": 16}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Running]:
    """`gristmill serve` in a subprocess with 22 photos imported and committed."""
    make_sample_folder(tmp_path / "photos", count=22, max_side=320)
    running = spawn_server(tmp_path / "data")
    with Hub(running.address, running.admin_key, None, show_progress=False) as hub:
        hub.import_folder(DATASET, tmp_path / "photos")
        hub.commit_version(DATASET)
    yield running
    stop_process(running, signal.SIGKILL)


def gristmill(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gristmill.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def test_three_ranks_as_processes_deliver_each_sample_once(served: Running,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "deliveries"
    conn = ["--address", served.address, "--api-key", served.admin_key]
    procs = [gristmill("stream", DATASET, *conn, "--batch-size", "3", "--image-size", "128",
                       "--epochs", "2", "--seed", "4", "--delivery-log", str(log), "--quiet",
                       env={"RANK": str(r), "WORLD_SIZE": "3"})  # as torchrun sets them
             for r in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    for r, out in enumerate(outputs):
        assert f"rank {r}/3" in out and "images/s" in out
    report = audit(log)
    assert report.ok, report.lines()
    assert [e.delivered_samples for e in report.epochs] == [22, 22]
    checked = gristmill("audit", str(log))
    assert checked.communicate(timeout=60)[0].strip().endswith("exactly once: OK")
    assert checked.returncode == 0


def test_audit_catches_a_rank_that_replays_a_batch(served: Running, tmp_path: Path) -> None:
    log = tmp_path / "deliveries"
    kw = {**SMALL, "api_key": served.admin_key, "world_size": 2, "delivery_log": log}
    with Loader(served.address, DATASET, rank=0, **kw) as ld:  # type: ignore[arg-type]
        list(ld)
    with Loader(served.address, DATASET, rank=1, **kw) as ld:  # type: ignore[arg-type]
        it = iter(ld)
        next(it), next(it)
        state = ld.state_dict()
        state["position"] = 1  # a restart from a stale checkpoint: batch 1 comes twice
        it.close()
        ld.load_state_dict(state)
        list(ld)
    report = audit(log)
    assert not report.ok and report.epochs[0].duplicates
    assert any("duplicate" in line for line in report.lines())


def test_server_killed_and_restarted_mid_epoch_loses_and_repeats_nothing(
        served: Running, tmp_path: Path) -> None:
    kw = {**SMALL, "api_key": served.admin_key, "seed": 2}
    with Loader(served.address, DATASET, **kw) as ld:  # type: ignore[arg-type]
        expected = [b.planned_ids for b in ld]
    port = served.address.rsplit(":", 1)[1]
    got = []
    restarted: Running | None = None
    try:
        with Loader(served.address, DATASET, prefetch=1, retry_timeout=60,
                    **kw) as ld:  # type: ignore[arg-type]
            for i, batch in enumerate(ld):
                got.append(batch.planned_ids)
                if i == 2:
                    stop_process(served, signal.SIGKILL)
                    restarted = spawn_server(served.config.data_dir, "--port", port)
        assert got == expected
    finally:
        if restarted is not None:
            stop_process(restarted, signal.SIGKILL)


def test_memory_stays_flat_over_20_epochs(served: Running) -> None:
    me = psutil.Process()
    assert served.process is not None
    server = psutil.Process(served.process.pid)
    rss: list[tuple[int, int]] = []
    kw = {**SMALL, "batch_size": 4, "api_key": served.admin_key}
    with Loader(served.address, DATASET, **kw) as ld:  # type: ignore[arg-type]
        for e in range(20):
            n = sum(len(b) for b in ld)
            assert n == 4 * len(ld) >= 22  # every batch full: the tails are padded
            if e in (4, 19):
                rss.append((me.memory_info().rss, server.memory_info().rss))
    (client0, server0), (client1, server1) = rss
    mib = 1024 * 1024
    assert client1 - client0 < 16 * mib, f"client grew {(client1 - client0) / mib:.1f} MiB"
    assert server1 - server0 < 16 * mib, f"server grew {(server1 - server0) / mib:.1f} MiB"
