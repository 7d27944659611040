#!/usr/bin/env bash
# The Python environment of the chart tools (Helm v4's library from PyPI, pytest, PyYAML):
# a venv outside the clone (~/.cache/cohort-operator/chart-venv), rebuilt when
# tests/chart/requirements.txt changes. Prints the venv's directory.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${COHORT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator}"
VENV="$CACHE_DIR/chart-venv"
REQUIREMENTS=tests/chart/requirements.txt

python3 -c 'import venv, ensurepip' 2>/dev/null || bash scripts/control-plane.sh packages python3-venv
stamp="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$stamp" ]; then
  printf 'chart-venv: creating %s\n' "$VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$stamp" > "$VENV/.requirements"
fi
echo "$VENV"
