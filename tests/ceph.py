"""A throw-away single-node Ceph cluster for the tests that ask for one (a pytest plugin).

`ceph_cluster` (session scope) brings a cluster up with `deploy/local/ceph-up` in a
short temporary directory the first time a test asks for it, and stops and deletes
it when the run ends; tests that do not ask for it never start one. It runs without
a manager (I/O needs none; set GRISTMILL_TEST_CEPH_MGR=auto to start one).

Without the Ceph packages, or when the cluster does not come up, every test that
asks for it fails with ceph-up's message: the Ceph tests never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CEPH_DOWN", "CEPH_UP", "CephCluster", "CephError", "ceph_cluster", "client_options"]

ROOT = Path(__file__).resolve().parent.parent
CEPH_UP = ROOT / "deploy" / "local" / "ceph-up"
CEPH_DOWN = ROOT / "deploy" / "local" / "ceph-down"
# ceph-up refuses longer directories (the daemons' admin sockets live in them)
MAX_DIR_LEN = 80
# what the caller's environment must not pass on to ceph-up: fixed ports could
# collide with another run, and CEPH_ARGS/CEPH_CONF would redirect the tools
_SCRUBBED = ("CEPH_ARGS", "CEPH_CONF", "CEPH_MON_PORT", "CEPH_MON_PORT1")


class CephError(Exception):
    """ceph-up or ceph-down failed; the message carries what it said."""


def client_options(timeout: float) -> dict[str, str]:
    """librados options under which connecting and every call give up after `timeout` seconds."""
    seconds = str(timeout)
    return {
        "client_mount_timeout": seconds,
        "rados_mon_op_timeout": seconds,
        "rados_osd_op_timeout": seconds,
    }


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class CephCluster:
    """A local cluster made by ceph-up in `dir`: its conf, pool and admin keyring."""

    dir: Path
    pool: str = "gristmill"
    mgr: str = "0"
    #: seconds the last start() took
    last_start_seconds: float = 0.0

    @property
    def conf(self) -> Path:
        """The conf file: monitor address and admin keyring, enough for any client."""
        return self.dir / "ceph.conf"

    @property
    def keyring(self) -> Path:
        """client.admin's keyring (the conf names it already)."""
        return self.dir / "keyring"

    def _run(self, script: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        environ.update(env)
        try:
            done = subprocess.run(
                [str(script), str(self.dir)],
                env=environ,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as e:
            raise CephError(f"cannot run {script}: {e}") from e
        except subprocess.TimeoutExpired as e:
            said = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
            raise CephError(
                f"{script.name} {self.dir} ran over {timeout:.0f}s:\n{_tail(said)}"
            ) from e
        if done.returncode != 0:
            raise CephError(
                f"{script.name} {self.dir} failed (exit {done.returncode}):\n{_tail(done.stderr)}"
            )
        return done

    def start(self, timeout: float = 120) -> None:
        """Start the cluster (bootstrapping it the first time); return once the pool takes I/O."""
        began = time.monotonic()
        done = self._run(
            CEPH_UP, timeout + 30, CEPH_POOL=self.pool, CEPH_MGR=self.mgr,
            CEPH_UP_TIMEOUT=str(int(timeout)),
        )
        self.last_start_seconds = time.monotonic() - began
        printed = done.stdout.strip().splitlines()[-1:] or [""]
        if Path(printed[0]) != self.conf:
            raise CephError(f"ceph-up printed {printed[0]!r} as its conf file, not {self.conf}")

    def stop(self, timeout: float = 60) -> None:
        """Stop every daemon cleanly (the OSD saves its objects); no error if already down."""
        self._run(CEPH_DOWN, timeout + 30, CEPH_STOP_TIMEOUT=str(int(timeout)))

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Stop the cluster for the body of a `with`, and start it again however the body ends."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def connect(self, timeout: float = 5, **options: str) -> Any:
        """A connected `rados.Rados` (close it) whose every call gives up after `timeout` s."""
        try:
            import rados
        except ImportError:
            pytest.fail(
                "the rados module does not import: install python3-rados and link it into"
                " the venv with scripts/link-rados.sh",
                pytrace=False,
            )
        cluster = rados.Rados(conffile=str(self.conf), conf={**client_options(timeout), **options})
        try:
            cluster.connect()
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def environ(self) -> Mapping[str, str]:
        """Environment under which the `ceph` and `rados` commands talk to this cluster."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}


def _cluster_dir(factory: pytest.TempPathFactory) -> Path:
    directory = factory.mktemp("ceph")
    if len(str(directory)) <= MAX_DIR_LEN - 5:
        return directory
    # a long --basetemp: the admin sockets need a short path
    directory.rmdir()
    return Path(tempfile.mkdtemp(prefix="gmceph", dir="/tmp"))


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One local Ceph cluster for the whole run; a failed start fails the tests, never skips."""
    cluster = CephCluster(
        _cluster_dir(tmp_path_factory), mgr=os.environ.get("GRISTMILL_TEST_CEPH_MGR", "0")
    )
    failure = None
    try:
        cluster.start()
    except CephError as e:
        failure = str(e)
    if failure is not None:
        with suppress(CephError):
            _discard(cluster)
        pytest.fail(
            f"the test Ceph cluster did not start: {failure}\n(to try it by hand:"
            f" {CEPH_UP} /tmp/ceph; see docs/ceph-local.md)",
            pytrace=False,
        )
    try:
        yield cluster
    finally:
        _discard(cluster)


def _discard(cluster: CephCluster) -> None:
    try:
        cluster.stop()
    finally:
        shutil.rmtree(cluster.dir, ignore_errors=True)
