#!/usr/bin/env bash
# Install one gristmill service (or the client) with only its own dependencies,
# pinned by uv.lock, into a new virtual environment. This is the install step of
# every Dockerfile, and the command tests/e2e/test_images.py runs.
#   scripts/install-service.sh store|decode|ingest|annotate|client VENV
# UV (default: python3 -m uv) and PYTHON (default: /usr/bin/python3, Debian's, as
# in the images) may be set.
set -euo pipefail
name=${1:-}
venv=${2:-}
read -r -a uv <<< "${UV:-python3 -m uv}"
python=${PYTHON:-/usr/bin/python3}
cd "$(dirname "$0")/.."
extras=()
case "$name" in
  client) package=gristmill-client; extras=(--extra cli); paths=(./clients/python) ;;
  store|decode|annotate)
    package=gristmill-$name; paths=(./clients/python ./services/common "./services/$name") ;;
  ingest)  # ingest decodes in-process when it runs beside decode: it depends on gristmill-decode
    package=gristmill-ingest
    paths=(./clients/python ./services/common ./services/decode ./services/ingest) ;;
  *) echo "usage: $0 store|decode|ingest|annotate|client VENV" >&2; exit 2 ;;
esac
if [ -z "$venv" ]; then echo "usage: $0 $name VENV" >&2; exit 2; fi
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
"${uv[@]}" export --quiet --frozen --no-dev --no-emit-workspace --no-hashes \
  --package "$package" "${extras[@]}" -o "$requirements"
"${uv[@]}" venv --quiet --python "$python" "$venv"
"${uv[@]}" pip install --quiet --python "$venv/bin/python" --no-deps -r "$requirements" "${paths[@]}"
