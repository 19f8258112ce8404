"""The training feed with real processes: ranks as processes, a server killed mid-epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
        assert "pixels via shared memory" in out  # same host: the ring, automatically
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


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "grpc"])
def test_server_killed_and_restarted_mid_epoch_loses_and_repeats_nothing(
        served: Running, shm_dir: Path, shared_memory: bool) -> None:
    kw = {**SMALL, "api_key": served.admin_key, "seed": 2, "shared_memory": shared_memory}
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
            assert ld.pixel_path == ("shared memory" if shared_memory else "gRPC")
        assert got == expected
        assert not list(shm_dir.iterdir())  # the dead server's ring went with it
    finally:
        if restarted is not None:
            stop_process(restarted, signal.SIGKILL)


def ring_mappings(pid: int) -> list[str]:
    """The shared-memory rings process ``pid`` maps (the Loader's side)."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "gristmill-ring-" in line]


def ring_files(pid: int) -> list[str]:
    """The rings process ``pid`` holds open (the server writes with pwrite, never maps)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "gristmill-ring-" in target:
            held.append(target)
    return held + ring_mappings(pid)


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


#: A training process that takes its time over each batch. At 512 px its ring
#: (4.5 MiB) holds 3 of the epoch's 11 batches: the server is still writing,
#: waiting for space, when the trainer dies.
SLOW_TRAINER = """
import sys, time
from gristmill.client import Loader
loader = Loader(sys.argv[1], "photos", batch_size=2, image_size=512, api_key=sys.argv[2],
                shared_memory=True, prefetch=1)
assert 2 * loader._ring_bytes < len(loader) * 2 * 512 * 512 * 3, "the ring holds half the epoch"
for batch in loader:
    print(len(batch), flush=True)
    time.sleep(0.5)
"""


def test_a_client_killed_mid_stream_leaves_no_shared_memory_behind(
        served: Running, shm_dir: Path) -> None:
    assert served.process is not None
    server = served.process.pid
    client = subprocess.Popen([sys.executable, "-c", SLOW_TRAINER, served.address,
                               served.admin_key], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "2"
        assert ring_mappings(client.pid) and ring_files(server)  # both hold the ring
        assert not list(shm_dir.iterdir())  # and its name is already gone
    finally:
        client.kill()
        client.wait(30)
    assert wait_until(lambda: not ring_files(server)), ring_files(server)
    assert not list(shm_dir.iterdir())
    # the server goes on serving; a new client gets a new ring
    with Loader(served.address, DATASET, **SMALL, api_key=served.admin_key,  # type: ignore[arg-type]
                shared_memory=True) as ld:
        assert sum(len(b) for b in ld) >= 22 and ld.pixel_path == "shared memory"
    assert wait_until(lambda: not ring_files(server)), ring_files(server)


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
    assert not ring_mappings(os.getpid())  # one ring per epoch, each unmapped after it
    assert wait_until(lambda: not ring_files(server.pid)), ring_files(server.pid)
