#!/usr/bin/env bash
# Make Debian's librados binding (python3-rados; PyPI has none) importable from
# .venv by linking its one extension module into the venv's site-packages. Only
# that file is linked, so Debian's other Python packages stay out of the venv.
set -euo pipefail
venv=${1:-.venv}
src=/usr/lib/python3/dist-packages/rados.cpython-311-x86_64-linux-gnu.so
if [ ! -f "$src" ]; then
  echo "librados binding not found at $src; install it: apt-get install python3-rados" >&2
  exit 1
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sf "$src" "$site/$(basename "$src")"
"$venv/bin/python" -c 'import rados' || { echo "rados does not import in $venv" >&2; exit 1; }
