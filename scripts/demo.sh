#!/usr/bin/env bash
# Builds Portcullis and runs it on the demo: a sample upstream behind the proxy.
# Open http://localhost:8080/ once it says it is ready; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh build
cargo build -p portcullis

python3 examples/upstream.py 127.0.0.1 8081 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT

cat <<'MSG'

Portcullis demo
  proxied sample upstream: http://localhost:8080/
  SCIM directory:          curl -H 'Authorization: Bearer demo-scim-token-change-me-0123456789' \
                                http://auth.localhost:8080/scim/v2/Users
  metrics:                 http://127.0.0.1:9090/metrics

MSG
target/debug/portcullis serve --config examples/demo.toml
