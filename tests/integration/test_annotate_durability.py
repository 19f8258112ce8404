"""Annotate under crashes and concurrent writers: a subprocess server and client processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gristmill.client.annotations import Annotations
from gristmill.client.errors import GristmillError
from tests.helpers import ROOT, spawn_server, stop_process

DS = "photos"

#: One writer process: appends N events, each at the head it read, retrying on ABORTED.
WRITER = """
import json, sys
from gristmill.client.annotations import Annotations
from gristmill.client.errors import Aborted
address, key, name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
conflicts = 0
with Annotations(address, key) as ann:
    for i in range(n):
        while True:
            head = ann.head("photos")
            try:
                ann.append("photos", [("owner.add", {"principal": f"key:{name}-{i}"})],
                           expected_head=head)
                break
            except Aborted:
                conflicts += 1
print(json.dumps({"conflicts": conflicts}))
"""


@pytest.mark.slow
def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = spawn_server(data, "--services", "annotate")
    acked: list[str] = []
    stop = threading.Event()
    try:
        with Annotations(running.address, running.admin_key) as ann:
            ann.init(DS)

            def burst() -> None:
                i = 0
                while not stop.is_set():
                    try:
                        resp = ann.append(DS, [("owner.add", {"principal": f"key:k{i}"})])
                    except GristmillError:
                        return  # the server died under this call: not acknowledged
                    acked.append(resp.events[0].id)
                    i += 1

            writers = [threading.Thread(target=burst) for _ in range(3)]
            for w in writers:
                w.start()
            deadline = time.monotonic() + 20
            while len(acked) < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop_process(running, signal.SIGKILL) == -signal.SIGKILL
            stop.set()
            for w in writers:
                w.join(10)
        assert len(acked) >= 200
    finally:
        stop.set()
        stop_process(running, signal.SIGKILL)
    again = spawn_server(data, "--services", "annotate")
    try:
        with Annotations(again.address, again.admin_key) as ann:
            stored = {e.id for e in ann.events(DS)}
            assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged events lost"
            report = ann.verify(DS)
            assert report.ok and report.events_checked == len(stored)
            assert ann.rebuild(DS).equal
    finally:
        stop_process(again)


@pytest.mark.slow
def test_writer_processes_with_expected_heads_never_interleave_silently(tmp_path: Path) -> None:
    running = spawn_server(tmp_path / "data", "--services", "annotate")
    n = 60
    try:
        with Annotations(running.address, running.admin_key) as ann:
            ann.init(DS)
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, running.address,
                                   running.admin_key, name, str(n)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name in ("a", "b")]
        outputs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err.decode()
            json.loads(out)
        with Annotations(running.address, running.admin_key) as ann:
            events = list(ann.events(DS))
            assert [e.seq for e in events] == list(range(1, 2 * n + 2))
            principals = {json.loads(e.payload_json)["principal"] for e in events[1:]}
            assert principals == {f"key:{w}-{i}" for w in "ab" for i in range(n)}
            assert ann.verify(DS).ok
    finally:
        stop_process(running)
