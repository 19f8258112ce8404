"""``gristmill annotate`` end to end, and offline verification of exported logs."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gristmill.cli.main import main
from gristmill.client.annotations import Annotations, verify_file
from tests.helpers import ROOT, Running, start_in_process

DS = "photos"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


@pytest.fixture
def ann_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    running = start_in_process(tmp_path / "data", services=["annotate"])
    monkeypatch.setenv("GRISTMILL_ADDRESS", running.address)
    monkeypatch.setenv("GRISTMILL_API_KEY", running.admin_key)
    yield running
    assert running.server is not None
    running.server.stop(0)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["annotate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [
    [], ["init"], ["schema"], ["schema", "add"], ["schema", "list"], ["propose"], ["review"],
    ["proposals"], ["owners"], ["show"], ["log"], ["release"], ["releases"], ["export"],
    ["export-log"], ["import-log"], ["verify"], ["rebuild"],
])
def test_every_annotate_command_has_help(argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["annotate", *argv, "--help"])
    assert done.value.code == 0
    assert "usage: gristmill annotate" in capsys.readouterr().out


def test_cli_workflow(ann_server: Running, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    schema = tmp_path / "label.json"
    schema.write_text(json.dumps(SCHEMA))
    assert run(capsys, "init", DS)[0] == 0
    code, out, _ = run(capsys, "schema", "add", DS, "label", str(schema))
    assert code == 0 and "version 1" in out
    code, out, _ = run(capsys, "propose", DS, "--schema", "label", "--sample", "a/1.jpg",
                       "--sample", "a/2.jpg", "--payload", '{"label": "cat"}')
    assert code == 0
    proposal = out.strip().splitlines()[-1]
    assert len(proposal) == 36  # the event id alone on the last line
    payload = tmp_path / "dog.json"
    payload.write_text('{"label": "dog"}')
    code, out, _ = run(capsys, "propose", DS, "--schema", "label", "--sample", "b.jpg",
                       "--payload", f"@{payload}")
    rejected = out.strip().splitlines()[-1]
    assert run(capsys, "review", DS, proposal, "--accept")[0] == 0
    assert run(capsys, "review", DS, rejected, "--reject", "--reason", "blurry")[0] == 0
    code, _, err = run(capsys, "review", DS, rejected, "--accept")
    assert code == 1 and "already rejected" in err and "Traceback" not in err
    code, out, _ = run(capsys, "release", DS, "r1")
    assert code == 0 and "1 accepted" in out
    code, out, _ = run(capsys, "show", DS, "a/2.jpg", "--release", "r1", "--json")
    assert code == 0 and json.loads(out)[0]["data"] == {"label": "cat"}
    code, out, _ = run(capsys, "show", DS, "b.jpg")
    assert code == 0 and "no accepted annotations" in out
    code, out, _ = run(capsys, "owners", "list", DS)
    assert code == 0 and "(you)" in out
    code, _, err = run(capsys, "owners", "remove", DS, out.split()[0])
    assert code == 1 and "last owner" in err
    code, out, _ = run(capsys, "proposals", DS, "--status", "rejected", "--json")
    assert [p["id"] for p in json.loads(out)] == [rejected]
    code, out, _ = run(capsys, "log", DS, "--after", "2", "--json")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [3, 4, 5, 6, 7]

    first, second = tmp_path / "r1-a.jsonl", tmp_path / "r1-b.jsonl"
    assert run(capsys, "export", DS, "--release", "r1", "--out", str(first))[0] == 0
    code, out, _ = run(capsys, "propose", DS, "--annotation", proposal, "--payload",
                       '{"label": "lynx"}')
    assert run(capsys, "review", DS, out.strip().splitlines()[-1], "--accept")[0] == 0
    assert run(capsys, "export", DS, "--release", "r1", "--out", str(second))[0] == 0
    assert first.read_bytes() == second.read_bytes()

    log_file = tmp_path / "log.jsonl"
    assert run(capsys, "export-log", DS, "--out", str(log_file))[0] == 0
    code, out, _ = run(capsys, "verify", str(log_file))
    assert code == 0 and "ok: 9 events" in out
    code, out, _ = run(capsys, "verify", "--dataset", DS, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = run(capsys, "rebuild", DS)
    assert code == 0 and "equals the live state" in out
    assert run(capsys, "import-log", "copy", str(log_file))[0] == 0
    code, out, _ = run(capsys, "verify", "--dataset", "copy")
    assert code == 0

    lines = log_file.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("cat", "cow")
    log_file.write_text("".join(lines))
    code, _, err = run(capsys, "verify", "--file", str(log_file))
    assert code == 1 and "line 3, seq 3" in err
    code, _, err = run(capsys, "import-log", "copy2", str(log_file))
    assert code == 1 and "does not verify" in err and "Traceback" not in err


def test_cli_errors_are_one_line(ann_server: Running, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    code, _, err = run(capsys, "show", "nolog", "x.jpg")
    assert code == 1 and err.startswith("error:") and "annotate init nolog" in err
    assert run(capsys, "init", DS)[0] == 0
    code, _, err = run(capsys, "propose", DS, "--schema", "label", "--sample", "x.jpg",
                       "--payload", "{not json")
    assert code == 1 and "not JSON" in err
    code, _, err = run(capsys, "review", DS, "not-a-uuid", "--accept")
    assert code == 1 and "not a UUID" in err
    code, _, err = run(capsys, "verify", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "missing.jsonl" in err
    code, _, err = run(capsys, "verify")
    assert code == 2 and "FILE" in err


def test_flipped_bytes_in_an_exported_log_are_located(ann_server: Running,
                                                      tmp_path: Path) -> None:
    with Annotations(ann_server.address, ann_server.admin_key, signing_key=bytes(32)) as ann:
        ann.init(DS)
        ann.add_schema(DS, "label", SCHEMA)
        ann.append(DS, [("annotation.create", {"schema": "label", "samples": [
            {"path": f"img/{i}.jpg"}], "data": {"label": f"l{i}"}}) for i in range(300)])
        good = tmp_path / "log.jsonl"
        with open(good, "w") as f:
            ann.export_log(DS, f)
    data = good.read_bytes()
    report = verify_file(good)
    assert report.ok and report.events == 302 and report.signatures == 301
    rng = random.Random(7)
    bad = tmp_path / "bad.jsonl"
    for position in [0, len(data) - 1, *rng.sample(range(len(data)), 150)]:
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        found = verify_file(bad)
        line = data.count(b"\n", 0, position) + 1
        assert found.first_bad is not None, position
        assert found.first_bad.line == line, (position, found.first_bad)
        assert found.first_bad.seq == line
    truncated = data[:len(data) // 2]
    bad.write_bytes(truncated[:truncated.rindex(b"\n") + 1])
    assert verify_file(bad).ok  # a clean prefix is a valid (shorter) log ...
    bad.write_bytes(truncated)
    assert not verify_file(bad).ok  # ... a cut line is not


def test_console_script_reports_failure_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"seq": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "gristmill.cli.main", "annotate", "verify",
                           str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "line 1, seq 1" in proc.stderr and "Traceback" not in proc.stderr


def _blocks(kind: str) -> list[str]:
    text = (ROOT / "docs" / "annotate.md").read_text()
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S)


def test_docs_examples_run(ann_server: Running, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    python, shell = _blocks("python"), _blocks("bash")
    assert python and shell
    for code in python:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"example failed:\n{code}\n{out.stderr}"
    for script in shell:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, f"example failed:\n{script}\n{out.stdout}\n{out.stderr}"
        assert "Traceback" not in out.stderr
    assert (tmp_path / "birds-v1.jsonl").read_text().count("\n") == 2
