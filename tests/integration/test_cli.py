"""The gristmill CLI, in-process against a real server (and `--help` everywhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gristmill.cli.main import main
from tests.helpers import Running, make_image_tree

HELP = [[], ["serve"], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"],
        ["dataset"]] + [["dataset", a] for a in ("create", "list", "show", "delete", "import",
                                                 "manifest", "download", "commit")] + [
    ["decode"], ["decode", "buckets"], ["decode", "dataset"], ["store"], ["store", "gc"],
    ["store", "migrate-catalog"]]


@pytest.mark.parametrize("argv", HELP, ids=lambda a: " ".join(a) or "gristmill")
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gristmill") and len(out) > 100


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "gristmill"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "dataset" in out.stdout and "serve" in out.stdout


def test_keys_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(tmp_path)]
    assert main(["keys", "create", *data, "--role", "writer", "--name", "ci"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("gm_")
    assert main(["keys", "list", *data]) == 0
    listing = capsys.readouterr().out
    key_id = key.split("_")[1]
    assert key_id in listing and "writer" in listing and key not in listing
    assert main(["keys", "revoke", *data, key_id]) == 0
    assert main(["keys", "revoke", *data, key_id]) == 1
    assert "no active API key" in capsys.readouterr().err


def test_dataset_commands(server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_ADDRESS", server.address)
    monkeypatch.setenv("GRISTMILL_API_KEY", server.admin_key)
    monkeypatch.setenv("GRISTMILL_CACHE_DIR", str(tmp_path / "cache"))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    src = tmp_path / "src"
    sizes = make_image_tree(src)
    assert main(["dataset", "create", "cli", "--description", "from the CLI"]) == 0
    assert main(["dataset", "import", "cli", str(src), *cache]) == 0
    assert f"{len(sizes)} uploaded" in capsys.readouterr().out
    assert main(["dataset", "commit", "cli"]) == 0
    version = capsys.readouterr().out.split()[2]
    assert main(["dataset", "manifest", "cli", "--version", version[:10], "--json", *cache]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["version"] == version and len(manifest["files"]) == len(sizes)
    assert main(["dataset", "list"]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["dataset", "show", "cli", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dataset"]["description"] == "from the CLI"
    assert shown["versions"][0]["id"] == version
    assert main(["dataset", "download", "cli", str(tmp_path / "out"), *cache]) == 0
    for rel in sizes:
        assert (tmp_path / "out" / rel).read_bytes() == (src / rel).read_bytes()
    assert main(["dataset", "delete", "cli"]) == 2
    assert main(["dataset", "delete", "cli", "--yes"]) == 0
    assert main(["dataset", "show", "cli"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_decode_commands(server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_ADDRESS", server.address)
    monkeypatch.setenv("GRISTMILL_API_KEY", server.admin_key)
    assert main(["decode", "buckets", "--image-size", "224", "--downsampling", "16"]) == 0
    out = capsys.readouterr().out
    assert "11 buckets" in out and "160    304" in out
    src = tmp_path / "src"
    sizes = make_image_tree(src)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\x00 not really")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["dataset", "import", "pics", str(src), *cache]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "decoded"
    assert main(["decode", "dataset", "pics", "--size", "64x48", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"decoded {len(sizes)} of {len(sizes) + 1} files" in out
    assert "broken.jpg: TRUNCATED" in out or "broken.jpg: CORRUPT" in out
    assert len(list(out_dir.rglob("*.png"))) == len(sizes)
    assert main(["decode", "dataset", "pics", "--size", "64x48", "--strict"]) == 1
    with pytest.raises(SystemExit):
        main(["decode", "dataset", "pics", "--size", "64by48"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_serve_refuses_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_STORE__BACKND", "fs")
    assert main(["serve", "--data", str(tmp_path)]) == 2
    assert "GRISTMILL_STORE__BACKND" in capsys.readouterr().err
    monkeypatch.delenv("GRISTMILL_STORE__BACKND")
    assert main(["serve"]) == 2
    assert "data_dir" in capsys.readouterr().err
    assert main(["serve", "--data", str(tmp_path), "--services", "nope"]) == 2
    assert "unknown service(s) nope" in capsys.readouterr().err
