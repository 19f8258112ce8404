"""Regenerate (or, with --check, verify) the committed Python code for protos/.

Generated files go to clients/python/src/gristmill/v1/: *_pb2.py and
*_pb2_grpc.py from grpc_tools.protoc, *.pyi stubs from mypy-protobuf. The
directory mirrors the proto package, so imports need no rewriting.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PKG = Path("gristmill") / "v1"
OUT_ROOT = ROOT / "clients" / "python" / "src"
INIT_TEXT = '"""Generated gRPC API of gristmill (package gristmill.v1). Do not edit."""\n'


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / OUT_PKG).glob("*.proto"))
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}", f"-I{well_known}",
        f"--python_out={out_root}", f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}", f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT, env=env)
    (out_root / OUT_PKG / "__init__.py").write_text(INIT_TEXT)
    (out_root / OUT_PKG / "py.typed").write_text("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / OUT_PKG).mkdir(parents=True)
        generate(tmp_root)
        fresh = tmp_root / OUT_PKG
        current = OUT_ROOT / OUT_PKG
        if args.check:
            names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in current.glob("*")
                                                                if p.is_file()})
            stale = [n for n in names if not (current / n).is_file() or not (fresh / n).is_file()
                     or not filecmp.cmp(current / n, fresh / n, shallow=False)]
            if stale:
                print("generated protobuf code is stale: " + ", ".join(stale)
                      + "\nfix: run `make protos` and commit the result", file=sys.stderr)
                return 1
            print("generated protobuf code is up to date")
            return 0
        if current.exists():
            shutil.rmtree(current)
        shutil.copytree(fresh, current)
        print(f"generated {len(list(current.iterdir()))} files in {current.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
