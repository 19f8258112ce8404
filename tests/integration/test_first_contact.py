"""First contact: a wrong address fails fast and clearly; the CLI never shows a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gristmill.cli import main as cli
from gristmill.client.decoding import DecodeClient
from gristmill.client.errors import NO_SERVER, Unavailable
from gristmill.client.hub import Hub
from gristmill.client.loader import Loader
from tests.helpers import Running, make_certificate, make_image_tree

GRISTMILL = [sys.executable, "-m", "gristmill.cli.main"]


@pytest.fixture
def unused_address() -> str:
    """host:port where nothing listens (a port the kernel just handed out, then freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def no_server(address: str) -> str:
    return f"no gristmill server at {address}: start `gristmill serve` or set GRISTMILL_ADDRESS"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "GRISTMILL_DEBUG"}
    return subprocess.run([*GRISTMILL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**environ, **(env or {})})


def assert_clean_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Failed with one clear message: no traceback, no raw gRPC text."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "failed to connect" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


# connecting ------------------------------------------------------------------

def test_clients_fail_fast_without_a_server(unused_address: str) -> None:
    attempts: list[Callable[[], object]] = [
        lambda: Loader(unused_address, "photos", batch_size=2),
        lambda: Hub(unused_address, None, None, show_progress=False).list_datasets(),
        lambda: DecodeClient(unused_address).list_buckets(224, 16, 0.5, 2.0),
    ]
    for attempt in attempts:
        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            attempt()
        assert time.monotonic() - start < 30  # not the Loader's 300 s of retries
        assert info.value.reason == NO_SERVER
        assert info.value.message.startswith(no_server(unused_address))
        assert "failed to connect" not in info.value.message


def test_a_name_that_does_not_resolve_fails_fast() -> None:
    with pytest.raises(Unavailable, match="no gristmill server at nosuchhost.invalid:7450"):
        Loader("nosuchhost.invalid:7450", "photos")


def test_tls_to_a_plaintext_server_says_so(server: Running, tmp_path: Path) -> None:
    cert, _key = make_certificate(tmp_path)
    with Hub(server.address, server.admin_key, None, ca_file=cert, show_progress=False) as hub, \
            pytest.raises(Unavailable, match="cannot open a TLS connection") as info:
        hub.list_datasets()
    assert info.value.reason == NO_SERVER and "--ca-file" in info.value.message


def test_cli_without_a_server_says_what_to_do(unused_address: str) -> None:
    for args in (["dataset", "list"], ["stream", "photos", "--quiet"],
                 ["decode", "buckets"]):
        result = run(*args, env={"GRISTMILL_ADDRESS": unused_address})
        assert_clean_error(result, no_server(unused_address))
        assert result.returncode == 1


# the CLI ---------------------------------------------------------------------

def test_serve_on_a_busy_port_names_it_and_creates_no_key(busy_port: int,
                                                         tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run("serve", "--data", str(data), "--port", str(busy_port), "--no-metrics")
    assert_clean_error(result, f"port {busy_port} is in use", "--port")
    assert result.returncode == 2
    assert not (data / "admin.key").exists()


def test_serve_on_a_file_says_it_needs_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a directory")
    result = run("serve", "--data", str(file), "--port", "0", "--no-metrics")
    assert_clean_error(result, f"{file} is a file", "directory")
    assert result.returncode == 2
    assert_clean_error(run("keys", "list", "--data", str(file)), f"{file} is a file")


def test_audit_without_logs(tmp_path: Path) -> None:
    result = run("audit", str(tmp_path))
    assert_clean_error(result, "no delivery logs", "delivery_log")
    assert result.returncode == 2
    assert_clean_error(run("audit", str(tmp_path / "missing")), "is not a folder")


def test_stream_with_a_rank_outside_the_world(unused_address: str) -> None:
    result = run("stream", "photos", "--rank", "3", "--world-size", "2",
                 "--address", unused_address)
    assert_clean_error(result, "rank must be 0 to 1, got 3", "--rank")
    assert result.returncode == 2
    result = run("stream", "photos", "--address", unused_address, env={"RANK": "x"})
    assert_clean_error(result, "RANK='x' is not an integer")


def test_a_missing_ca_file_is_named(unused_address: str, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    result = run("dataset", "list", "--address", unused_address, "--ca-file", str(missing))
    assert_clean_error(result, f"cannot read the TLS CA certificate {missing}")


def test_manifest_into_head_exits_quietly(server: Running, hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(700):  # ~80 KiB of manifest lines: more than a pipe holds
        (src / f"file-{i:04}-with-a-longer-name.txt").write_text(str(i))
    hub.import_folder("many", src)
    env = {**os.environ, "GRISTMILL_ADDRESS": server.address,
           "GRISTMILL_API_KEY": server.admin_key}
    env.pop("GRISTMILL_DEBUG", None)
    command = " ".join([*GRISTMILL, "dataset", "manifest", "many", "--cache-dir",
                        str(tmp_path / "cache")])
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.startswith("# many @ latest: 700 files")
    assert result.stderr == ""
    assert result.returncode in (0, 141)  # 141: quiet end on SIGPIPE, as `yes | head` does


def test_manifest_json_has_numbers(server: Running, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_ADDRESS", server.address)
    monkeypatch.setenv("GRISTMILL_API_KEY", server.admin_key)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    src = tmp_path / "src"
    sizes = make_image_tree(src)
    assert cli.main(["dataset", "import", "pics", str(src), *cache]) == 0
    capsys.readouterr()
    assert cli.main(["dataset", "manifest", "pics", "--json", *cache]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert len(files) == len(sizes)
    for f in files:
        assert isinstance(f["size"], int) and f["size"] > 0
        assert (f["image"]["width"], f["image"]["height"]) == sizes[f["path"]]
    assert cli.main(["dataset", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert isinstance(listed["file_count"], int) and isinstance(listed["total_bytes"], int)


def test_an_unexpected_error_is_one_line(server: Running, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_ADDRESS", server.address)
    monkeypatch.setenv("GRISTMILL_API_KEY", server.admin_key)
    monkeypatch.delenv("GRISTMILL_DEBUG", raising=False)

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(Hub, "list_datasets", broken)
    assert cli.main(["dataset", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "something nobody expected" in err
    assert "GRISTMILL_DEBUG=1" in err
    monkeypatch.setenv("GRISTMILL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="nobody expected"):
        cli.main(["dataset", "list"])
