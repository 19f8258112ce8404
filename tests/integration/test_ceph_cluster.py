"""The local Ceph cluster (deploy/local/ceph-up and ceph-down) that the Ceph tests stand on.

Its data outlives a stop and start (memstore saves on a clean stop), clients of a
stopped cluster fail within their timeouts instead of hanging, and a client that was
connected before the outage works again after it. The error paths of ceph-up need no
cluster and name their fix.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import rados

from tests.ceph import CEPH_DOWN, CEPH_UP, CephCluster, CephError, client_options

TIMEOUT = 3  # seconds any client call may take while the cluster is down
SLACK = 4  # for a busy two-core machine


@pytest.fixture
def client(ceph_cluster: CephCluster) -> Iterator[Any]:
    cluster = ceph_cluster.connect(TIMEOUT)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def timed(call: Any, *args: Any) -> tuple[BaseException | None, float]:
    began = time.monotonic()
    try:
        call(*args)
    except rados.Error as e:
        return e, time.monotonic() - began
    return None, time.monotonic() - began


def test_objects_outlive_a_restart_and_clients_fail_fast_while_it_is_down(
    ceph_cluster: CephCluster, client: Any
) -> None:
    name = f"outage-{os.getpid()}-{time.monotonic_ns()}"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with client.open_ioctx(ceph_cluster.pool) as io:
        io.write_full(name, payload)
        io.set_xattr(name, "sha", b"xattr-value")
        with rados.WriteOpCtx() as op:
            io.set_omap(op, ("field",), (b"omap-value",))
            io.operate_write_op(op, name)
        assert io.read(name, len(payload) + 1) == payload  # read needs a length

        with ceph_cluster.outage():
            fresh = rados.Rados(conffile=str(ceph_cluster.conf), conf=client_options(TIMEOUT))
            try:
                # all at once (librados waits without the GIL): a connected client's
                # read and write, and a new client's connect give up; nothing hangs
                with ThreadPoolExecutor(3) as pool:
                    outcomes = list(pool.map(lambda c: timed(*c), (
                        (io.read, name, 10), (io.write_full, name + "-new", b"x"),
                        (fresh.connect,),
                    )))
            finally:
                fresh.shutdown()
            for error, took in outcomes:
                assert isinstance(error, rados.TimedOut), outcomes
                assert took < TIMEOUT + SLACK, outcomes
            ceph_cluster.stop()  # stopping a stopped cluster is no error

        # ceph-up returned once I/O works: the old client carries on without reconnecting
        assert io.read(name, len(payload) + 1) == payload
        with pytest.raises(rados.ObjectNotFound):
            io.stat(name + "-new")  # the write that timed out was not half-done

    # a new client sees every part of the object the OSD saved when it stopped
    after = ceph_cluster.connect(TIMEOUT)
    try:
        with after.open_ioctx(ceph_cluster.pool) as io:
            assert io.read(name, len(payload) + 1) == payload
            assert io.get_xattr(name, "sha") == b"xattr-value"
            with rados.ReadOpCtx() as op:
                values, _ = io.get_omap_vals_by_keys(op, ("field",))
                io.operate_read_op(op, name)
                assert dict(values) == {"field": b"omap-value"}
            io.remove_object(name)
    finally:
        after.shutdown()


def test_starting_a_running_cluster_is_quick_and_keeps_its_address(
    ceph_cluster: CephCluster,
) -> None:
    mon_host = re.findall(r"^mon host = .*$", ceph_cluster.conf.read_text(), re.M)
    assert len(mon_host) == 1 and "127.0.0.1:" in mon_host[0]
    ceph_cluster.start()
    assert ceph_cluster.last_start_seconds < 10
    assert re.findall(r"^mon host = .*$", ceph_cluster.conf.read_text(), re.M) == mon_host
    # the conf alone (it names the admin keyring) is enough for the command-line tools
    listed = subprocess.run(
        ["rados", "lspools"], env=ceph_cluster.environ(), capture_output=True, text=True,
        timeout=30, check=True,
    )
    assert ceph_cluster.pool in listed.stdout.split()
    assert ceph_cluster.keyring.is_file()
    assert ceph_cluster.keyring.stat().st_mode & 0o077 == 0


def test_a_killed_osd_comes_back_with_what_it_saved_at_its_last_clean_stop(
    tmp_path: Path,
) -> None:
    own = CephCluster(tmp_path / "c", pool="kept")  # not the session's: this one loses data
    try:
        own.start()
        client = own.connect(TIMEOUT)
        try:
            with client.open_ioctx(own.pool) as io:
                io.write_full("saved", b"before the clean stop")
            own.stop()
            own.start()
            with client.open_ioctx(own.pool) as io:
                io.write_full("unsaved", b"after it")
            client.create_pool("later")  # its placement groups were never saved either
        finally:
            client.shutdown()
        os.kill(int((own.dir / "run" / "osd.0.pid").read_text()), signal.SIGKILL)

        done = ceph_up(own.dir, CEPH_POOL=own.pool, CEPH_MGR="0")
        assert done.returncode == 0, done.stderr
        assert "osd.0 was not stopped cleanly" in done.stderr
        assert "recreating, empty, the 8 placement groups it never saved" in done.stderr
        client = own.connect(TIMEOUT)
        try:
            with client.open_ioctx(own.pool) as io:
                assert io.read("saved", 100) == b"before the clean stop"
                with pytest.raises(rados.ObjectNotFound):
                    io.stat("unsaved")
            with client.open_ioctx("later") as io:  # writable again, empty
                io.write_full("x", b"y")
                assert io.read("x", 10) == b"y"
        finally:
            client.shutdown()
    finally:
        own.stop()


# --- ceph-up's refusals: no cluster needed --------------------------------------


def ceph_up(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
    environ.update(env)
    return subprocess.run(
        [str(CEPH_UP), str(directory)], env=environ, capture_output=True, text=True, timeout=60,
        check=False,
    )


def test_a_directory_too_long_for_admin_sockets_is_refused_before_anything_is_made() -> None:
    directory = Path("/tmp") / ("gm-ceph-" + "x" * 80)
    done = ceph_up(directory)
    assert done.returncode == 1
    assert "too long" in done.stderr and "ceph-up /tmp/ceph" in done.stderr
    assert not directory.exists()
    with pytest.raises(CephError, match="too long"):
        CephCluster(directory).start()


def test_a_busy_port_is_named_with_its_fix(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = ceph_up(tmp_path / "c", CEPH_MON_PORT=str(port))
    assert done.returncode == 1
    assert f"port {port} (CEPH_MON_PORT) on 127.0.0.1 is busy" in done.stderr
    assert "set CEPH_MON_PORT to a free port" in done.stderr
    assert not (tmp_path / "c").exists()


def test_a_missing_ceph_package_names_the_apt_get_line(tmp_path: Path) -> None:
    # every command of the machine but ceph-mon
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(directory).iterdir() if Path(directory).is_dir() else ():
            link = bin_dir / tool.name
            if tool.name != "ceph-mon" and not link.exists():
                link.symlink_to(tool)
    done = ceph_up(tmp_path / "c", PATH=str(bin_dir))
    assert done.returncode == 1
    assert "ceph-mon not found" in done.stderr
    assert "apt-get install -y ceph-mon ceph-osd ceph-mgr ceph-common python3-rados" in done.stderr


def test_a_directory_of_other_files_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "thesis.tex").write_text("mine")
    done = ceph_up(tmp_path / "c")
    assert done.returncode == 1
    assert "holds files but no cluster made by ceph-up" in done.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["thesis.tex"]


def test_ceph_down_without_a_cluster_is_no_error(tmp_path: Path) -> None:
    for directory in (tmp_path / "missing", tmp_path):
        done = subprocess.run(
            [str(CEPH_DOWN), str(directory)], capture_output=True, text=True, timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "no cluster" in done.stderr


# --- docs/ceph-local.md: its examples run ---------------------------------------

DOC = CEPH_UP.parent.parent.parent / "docs" / "ceph-local.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_shell_example_in_the_docs_runs(tmp_path: Path) -> None:
    [example] = [b for b in blocks("sh") if "ceph-up" in b]
    directory = tmp_path / "c"
    script = example.replace("/tmp/ceph", str(directory)).replace(
        "/tmp/hello.txt", str(tmp_path / "hello.txt")
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=DOC.parent.parent,
        env={**environ, "CEPH_MGR": "0"}, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "hello"  # read back after a stop and start
    assert "HEALTH_" in done.stdout
    assert not directory.exists()  # --purge


def test_the_python_examples_in_the_docs_run(ceph_cluster: CephCluster) -> None:
    first, second = blocks("python")
    done = subprocess.run(
        [sys.executable, "-c", first], env=ceph_cluster.environ(), capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "b'hello'"
    namespace: dict[str, Any] = {}
    exec(second, namespace)
    namespace["test_survives_an_outage"](ceph_cluster)
