#!/usr/bin/env bash
# The third-party license check, from Cargo.lock: every crate that can end up in a binary
# of this workspace must be under a license deny.toml allows (cargo-deny), and
# docs/third-party-licenses.md — the list shipped in the image and the plugin archive —
# must be what cargo-deny lists now.
#
#   scripts/licenses.sh           check (scripts/test.sh runs it)
#   scripts/licenses.sh --write   regenerate docs/third-party-licenses.md after a dependency change
#
# cargo-deny is installed from crates.io (`cargo install --locked`) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DENY_VERSION=0.20.2
LIST=docs/third-party-licenses.md

if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $CARGO_DENY_VERSION"; then
  echo "licenses: installing cargo-deny $CARGO_DENY_VERSION from crates.io" >&2
  cargo install --locked --quiet "cargo-deny@$CARGO_DENY_VERSION"
fi

cargo deny --locked --log-level error check licenses

current=$(mktemp)
trap 'rm -f "$current"' EXIT
{
  cat <<'HEAD'
# Third-party licenses

The crates in `Cargo.lock` that can be built into cohort-operator and the other binaries
of the workspace (the Braze sandbox, the warehouse stand-ins, the tests), by license, as
`cargo deny list` reports them: a crate offered under several licenses (`MIT OR
Apache-2.0`) or under several at once (`MIT AND BSD-3-Clause`) is listed under each.
`deny.toml` allows every license each crate needs (`scripts/licenses.sh` checks that and
this file; `scripts/licenses.sh --write` regenerates it). cohort-operator itself is under
the Apache License 2.0 (`LICENSE`).

HEAD
  cargo deny --locked --log-level error list --layout license --format json | python3 -c '
import json, sys
for license, crates in json.load(sys.stdin)["licenses"]:
    names = sorted({" ".join(c.split()[:2]) for c in crates})
    print(f"## {license} ({len(names)})\n")
    print(", ".join(names) + "\n")
'
} > "$current"

if [ "${1:-}" = "--write" ]; then
  cp "$current" "$LIST"
  echo "licenses: wrote $LIST" >&2
elif ! diff -u "$LIST" "$current"; then
  echo "licenses: $LIST is out of date; run scripts/licenses.sh --write" >&2
  exit 1
fi
