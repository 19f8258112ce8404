"""The Dockerfiles: pinned, multi-stage, non-root, and their install step run for real here.

No Docker engine runs on this machine, so each image's install step is a script
(scripts/install-service.sh) that these tests run into a fresh virtual
environment with the interpreter the images use (Debian's /usr/bin/python3).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from scripts.processes import start_and_wait
from tests.helpers import ROOT

IMAGES = {
    "store": ROOT / "services" / "store" / "Dockerfile",
    "decode": ROOT / "services" / "decode" / "Dockerfile",
    "ingest": ROOT / "services" / "ingest" / "Dockerfile",
    "annotate": ROOT / "services" / "annotate" / "Dockerfile",
    "client": ROOT / "clients" / "python" / "Dockerfile",
}
#: Modules each image must import, and modules that belong to others and must be absent.
IMPORTS = {
    "store": (["gristmill.store.service", "gristmill.common.server"],
              ["gristmill.decode", "gristmill.ingest", "pyvips", "cv2"]),
    "decode": (["gristmill.decode.service", "pyvips", "cv2", "simplejpeg"],
               ["gristmill.store", "gristmill.ingest", "gristmill.annotate"]),
    "ingest": (["gristmill.ingest.service", "gristmill.decode.service"],
               ["gristmill.store", "gristmill.annotate"]),
    "annotate": (["gristmill.annotate.service", "nacl", "jsonschema"],
                 ["gristmill.store", "gristmill.decode", "pyvips"]),
    "client": (["gristmill.client", "gristmill.cli.main"],
               ["gristmill.common", "gristmill.store", "grpc_health", "pydantic"]),
}
DEBIAN_PYTHON = Path("/usr/bin/python3")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_is_pinned_multistage_non_root(name: str) -> None:
    steps = instructions(IMAGES[name])
    bases = [args for op, args in steps if op == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        image = base.split()[0]
        assert re.fullmatch(r"[\w./-]+(:\d+(\.\d+)+[\w.-]*|@sha256:[0-9a-f]{64})", image), \
            f"{image}: pin the base by an exact version tag or a digest"
    runtime = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [args for op, args in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    installs = [args for op, args in steps if op == "RUN" and "install-service.sh" in args]
    assert len(installs) == 1 and re.search(rf"install-service\.sh {name} /opt/gristmill",
                                            installs[0])
    for op, args in steps:
        if op == "COPY" and "--from" not in args:
            *sources, _dest = args.split()
            for source in sources:
                assert source == "." or (ROOT / source).exists(), f"COPY {source}: no such file"
    assert ("ENTRYPOINT", '["gristmill"]') in steps
    if name == "store":  # librados, from Debian, linked into the venv
        apt = " ".join(args for op, args in runtime if op == "RUN")
        assert "python3-rados" in apt and "link-rados.sh /opt/gristmill" in apt
    if name in ("decode", "ingest"):
        assert "libvips42" in " ".join(args for op, args in runtime if op == "RUN")
    if name != "client":
        exposed = {int(p) for op, args in steps if op == "EXPOSE" for p in args.split()}
        assert exposed == {7450, 7451, 9450}  # gRPC, health, metrics as deploy/k8s uses them


def install(name: str, venv: Path) -> None:
    assert DEBIAN_PYTHON.exists(), "the images build on Debian's python3; install python3"
    # uv as `make` installs it (python3 -m uv), outside the project's .venv
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV")}
    out = subprocess.run(["scripts/install-service.sh", name, str(venv)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_install_step_gives_only_that_images_packages(name: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    install(name, venv)
    wanted, foreign = IMPORTS[name]
    probe = ("import importlib.util, json, sys\n"
             "print(json.dumps({m: importlib.util.find_spec(m) is not None "
             "for m in sys.argv[1:]}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe, *wanted, *foreign],
                         capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path)
    found = json.loads(out.stdout)
    assert all(found[m] for m in wanted), found
    assert not any(found[m] for m in foreign), found
    cli = subprocess.run([str(venv / "bin" / "gristmill"), "--help"], capture_output=True,
                         text=True, timeout=120, check=False, cwd=tmp_path)
    assert cli.returncode == 0 and "usage" in cli.stdout.lower()


def test_store_image_venv_links_librados_and_serves(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    install("store", venv)
    subprocess.run([str(ROOT / "scripts" / "link-rados.sh"), str(venv)], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import rados"], check=True,
                   timeout=60, cwd=tmp_path)
    ready = tmp_path / "ready.json"
    proc = start_and_wait([str(venv / "bin" / "gristmill"), "serve", "--data",
                           str(tmp_path / "data"), "--port", "0", "--metrics-port", "0",
                           "--ready-file", str(ready)], ready, log=tmp_path / "log",
                          timeout=60)
    try:
        info = json.loads(ready.read_text())
        assert info["port"] > 0
        log = (tmp_path / "log").read_text()
        assert "gristmill serving store, arrays on" in log  # this image holds the store alone
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
