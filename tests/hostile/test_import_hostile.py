"""`Hub.import_folder` and `gristmill dataset import` against hostile and changing folders.

A real in-process server on port 0; the folder is what a careless or hostile
user hands to the import: symlinks out of it, VCS and OS junk, files that
vanish or change between hashing and upload.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import gristmill.client.hub as hub_module
from gristmill.client.hub import Hub
from tests.helpers import Running

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"  # stands in for /etc/passwd


def manifest_paths(hub: Hub, dataset: str) -> list[str]:
    return sorted(e.path for e in hub.get_manifest(dataset, refresh=True).files)


def stored_shas(hub: Hub, dataset: str) -> set[str]:
    return {e.sha256 for e in hub.get_manifest(dataset, refresh=True).files}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the import folder, with a secret file and a secret folder."""
    out = tmp_path / "outside"
    (out / "private").mkdir(parents=True)
    (out / "passwd").write_bytes(SECRET)
    (out / "private" / "id_rsa").write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    return out


def test_symlinks_out_of_the_folder_are_not_followed(hub: Hub, tmp_path: Path,
                                                     outside: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.txt").write_bytes(b"b")
    (src / "passwd.txt").symlink_to(outside / "passwd")
    (src / "sub" / "up.txt").symlink_to("../../outside/passwd")  # relative, escapes
    (src / "keys").symlink_to(outside / "private", target_is_directory=True)
    (src / "broken.txt").symlink_to(tmp_path / "does-not-exist")
    (src / "loop").symlink_to(src / "loop")
    report = hub.import_folder("links", src)
    assert manifest_paths(hub, "links") == ["a.txt", "sub/b.txt"]
    assert hashlib.sha256(SECRET).hexdigest() not in stored_shas(hub, "links")
    skipped = dict(report.links_skipped)
    assert set(skipped) == {"passwd.txt", "sub/up.txt", "keys", "broken.txt", "loop"}
    assert "outside" in skipped["passwd.txt"] and "outside" in skipped["keys"]
    assert "broken" in skipped["broken.txt"]
    assert report.uploaded == 2 and not report.failed
    assert "5 links not followed" in str(report)


def test_symlinks_inside_the_folder(hub: Hub, tmp_path: Path) -> None:
    """A link to a file inside is imported at its own path; a directory link is not walked."""
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    (src / "real" / "x.bin").write_bytes(b"x" * 100)
    (src / "alias.bin").symlink_to("real/x.bin")
    (src / "again").symlink_to("real", target_is_directory=True)
    (src / "real" / "parent").symlink_to("..", target_is_directory=True)  # a loop if followed
    report = hub.import_folder("inside", src)
    assert manifest_paths(hub, "inside") == ["alias.bin", "real/x.bin"]
    assert set(dict(report.links_skipped)) == {"again", "real/parent"}
    assert not report.failed


def test_vcs_dotfiles_and_os_junk_are_skipped(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in [".git/config", ".git/objects/ab/cdef", ".hg/store/x", ".svn/entries",
                "CVS/Root", ".DS_Store", "train/.DS_Store", "train/Thumbs.db",
                "train/desktop.ini", "__MACOSX/train/._a.jpg", ".env", ".cache/x.bin",
                "train/._a.jpg", "train/a.jpg", "val/b.jpg"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    report = hub.import_folder("junk", src)
    assert manifest_paths(hub, "junk") == ["train/a.jpg", "val/b.jpg"]
    assert report.uploaded == 2 and not report.failed
    assert {".git/", ".hg/", ".svn/", "CVS/", "__MACOSX/", ".DS_Store",
            "train/Thumbs.db"} <= set(report.ignored)
    assert "ignored" in str(report)


def test_include_and_exclude_patterns(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in ["train/a.jpg", "train/b.png", "train/deep/c.jpg", "val/d.jpg", "raw/e.jpg",
                "notes.txt", "train/notes.txt"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    # no '/' in a pattern: matched against the name at any depth
    hub.import_folder("jpg", src, include=["*.jpg"], exclude=["raw"])
    assert manifest_paths(hub, "jpg") == ["train/a.jpg", "train/deep/c.jpg", "val/d.jpg"]
    # with a '/': against the whole relative path, and '*' crosses '/'
    report = hub.import_folder("train", src, include=["train/*"], exclude=["*.txt", "train/deep/*"])
    assert manifest_paths(hub, "train") == ["train/a.jpg", "train/b.png"]
    assert "notes.txt" in report.ignored and "val/d.jpg" in report.ignored


def _mutate_after_scan(monkeypatch: pytest.MonkeyPatch, total: int,
                       mutate: Callable[[], None]) -> None:
    """Run ``mutate`` once every file has been hashed, before anything is uploaded."""
    original = hub_module._sha256_file
    calls = 0

    def hashing(path: Path) -> tuple[str, int]:
        nonlocal calls
        result = original(path)
        calls += 1
        if calls == total:
            mutate()
        return result

    monkeypatch.setattr(hub_module, "_sha256_file", hashing)


def test_files_changed_after_hashing_do_not_take_the_others_down(
        hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    content = {f"f{i:02d}.bin": os.urandom(2000) for i in range(50)}
    for name, data in content.items():
        (src / name).write_bytes(data)

    def change() -> None:  # same size, other bytes: only the hash tells
        (src / "f10.bin").write_bytes(os.urandom(2000))
        (src / "f30.bin").write_bytes(os.urandom(2000))

    _mutate_after_scan(monkeypatch, 50, change)
    report = hub.import_folder("changing", src)
    assert report.uploaded == 48
    failed = dict(report.failed)
    assert set(failed) == {"f10.bin", "f30.bin"}
    assert all("changed" in why for why in failed.values())
    entries = {e.path: e.sha256 for e in hub.get_manifest("changing", refresh=True).files}
    assert set(entries) == set(content) - {"f10.bin", "f30.bin"}
    for name, sha in entries.items():
        assert sha == hashlib.sha256(content[name]).hexdigest()


def test_files_the_server_refuses_do_not_take_the_others_down(
        hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the client's own re-check, the server's refusal names the file; the rest go again."""
    src = tmp_path / "src"
    src.mkdir()
    content = {f"f{i:02d}.bin": os.urandom(2000) for i in range(50)}
    for name, data in content.items():
        (src / name).write_bytes(data)

    def change() -> None:
        for name in ("f05.bin", "f25.bin", "f45.bin"):
            (src / name).write_bytes(os.urandom(2000))

    _mutate_after_scan(monkeypatch, 50, change)
    monkeypatch.setattr(hub_module, "_changed", lambda *a: "")
    report = hub.import_folder("refused", src)
    assert set(dict(report.failed)) == {"f05.bin", "f25.bin", "f45.bin"}
    assert all("sha256" in why for _, why in report.failed)
    assert report.uploaded == 47
    assert manifest_paths(hub, "refused") == sorted(set(content) - {"f05.bin", "f25.bin",
                                                                     "f45.bin"})


def test_vanished_grown_shrunk_and_swapped_files(hub: Hub, tmp_path: Path, outside: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    content = {f"f{i:02d}.bin": os.urandom(3000) for i in range(20)}
    content["big.bin"] = os.urandom(3 * 1024 * 1024 + 5)  # several chunks: changed mid-stream
    for name, data in content.items():
        (src / name).write_bytes(data)
    bad = {"f03.bin", "f07.bin", "f11.bin", "f15.bin", "f17.bin", "big.bin"}

    def mutate() -> None:
        (src / "f03.bin").unlink()                                 # vanished
        (src / "f07.bin").write_bytes(content["f07.bin"] + b"more")  # grew
        (src / "f11.bin").write_bytes(content["f11.bin"][:100])    # shrank
        (src / "f15.bin").unlink()                                 # swapped for a link out
        (src / "f15.bin").symlink_to(outside / "passwd")
        (src / "f17.bin").unlink()                                 # swapped for a pipe
        os.mkfifo(src / "f17.bin")
        big = bytearray(content["big.bin"])
        big[-1] ^= 0xFF                                            # last byte differs
        (src / "big.bin").write_bytes(bytes(big))

    _mutate_after_scan(monkeypatch, len(content), mutate)
    report = hub.import_folder("mixed", src)
    assert set(dict(report.failed)) == bad
    assert report.uploaded == len(content) - len(bad)
    assert manifest_paths(hub, "mixed") == sorted(set(content) - bad)
    assert hashlib.sha256(SECRET).hexdigest() not in stored_shas(hub, "mixed")


def test_cli_import_reports_links_and_failures(server: Running, tmp_path: Path,
                                               outside: Path) -> None:
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.jpg").write_bytes(b"a")
    (src / "train" / "b.jpg").write_bytes(b"b")
    (src / "train" / "skip.tmp").write_bytes(b"t")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_bytes(b"ref")
    (src / "passwd").symlink_to(outside / "passwd")
    (src / "back\\slash.jpg").write_bytes(b"refused")  # a name the store refuses: a failure
    exe = Path(sys.executable).parent / "gristmill"
    env = {**os.environ, "GRISTMILL_ADDRESS": server.address,
           "GRISTMILL_API_KEY": server.admin_key, "GRISTMILL_CACHE_DIR": str(tmp_path / "c")}
    out = subprocess.run([str(exe), "dataset", "import", "cli", str(src), "--exclude", "*.tmp"],
                         capture_output=True, text=True, env=env, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Traceback" not in text
    assert "2 uploaded" in out.stdout and "1 failed" in out.stdout
    assert "back\\slash.jpg" in out.stderr and "backslash" in out.stderr
    assert "passwd" in out.stderr and "outside" in out.stderr
    ok = subprocess.run([str(exe), "dataset", "import", "cli", str(src), "--exclude", "*.tmp",
                         "--exclude", "back*"], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 already present" in ok.stdout and "Traceback" not in ok.stderr
    with Hub(server.address, server.admin_key, None, show_progress=False) as hub:
        assert manifest_paths(hub, "cli") == ["train/a.jpg", "train/b.jpg"]
