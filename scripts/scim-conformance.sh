#!/usr/bin/env bash
# Runs the scim2-tester conformance suite (PyPI) against a freshly started portcullis binary.
# Installs the pinned tester into target/conformance-venv the first time.
# Usage: scripts/scim-conformance.sh [BINARY] [--postgres]   (--postgres: the directory in
# PostgreSQL at $PORTCULLIS_POSTGRES_URL, as scripts/with-postgres.sh provides)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/conformance-venv
requirements=tests/conformance/requirements.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
exec "$venv/bin/python" tests/conformance/run_scim2_tester.py --binary "${1:-target/debug/portcullis}" "${@:2}" --max-seconds 600
