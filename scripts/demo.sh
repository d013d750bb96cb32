#!/usr/bin/env bash
# Builds Portcullis and runs it on the demo: a sample upstream behind the proxy, and a local
# OpenID provider to sign in at. Open http://localhost:8080/ once it says it is ready and sign
# in as alice@example.com with password "demo"; Ctrl-C stops everything. On the way up it shows
# alice's AI agent calling through Portcullis until alice is deactivated (agent_demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh demo
cargo build -p portcullis
# Where cargo builds (`CARGO_TARGET_DIR` or a `build.target-dir` may put it outside target/).
target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# The tests' marker (tests/src/idp.rs): node_modules installed in full from this lock file.
# Under the tests' lock, so that a suite installing meanwhile is waited for, not undone.
marker=tests/idp/node_modules/.portcullis-installed
lock_hash=$(sha256sum tests/idp/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$marker" 2>/dev/null)" != "$lock_hash" ]; then
  (
    flock -w 600 9 || { echo "demo: waited 10 minutes for another npm install" >&2; exit 1; }
    if [ "$(cat "$marker" 2>/dev/null)" != "$lock_hash" ]; then
      (cd tests/idp && timeout 300 "${PORTCULLIS_NPM:-npm}" ci --silent --no-audit --no-fund)
      echo "$lock_hash" >"$marker"
    fi
  ) 9>"${TMPDIR:-/tmp}/portcullis-tests-idp-npm.lock"
fi

# Waits (up to 30 s) for `url` to answer while process `pid` runs; else says why (the end
# of `log`, if given) and stops.
wait_for() {
  local url=$1 pid=$2 log=${3:-}
  for _ in $(seq 150); do
    # Ours gone, an answer is another program's (one holding the port).
    if ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
    python3 -c "import urllib.request; urllib.request.urlopen('$url', timeout=1)" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "demo: $url did not answer (a port taken by another program?)" >&2
  if [ -n "$log" ]; then
    tail -20 "$log" >&2
  fi
  exit 1
}

# Ports another program (an earlier demo still running, say) holds: its answers would be
# taken for the demo's.
for port in 8080 8081 9090 9400; do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=1)" 2>/dev/null; then
    echo "demo: port $port is taken by another program (an earlier demo? stop it first)" >&2
    exit 1
  fi
done

python3 examples/upstream.py 127.0.0.1 8081 &
upstream=$!
IDP_DETACHED=1 node tests/idp/idp.mjs examples/demo-idp.json >"$target/demo-idp.log" 2>&1 &
idp=$!
trap 'kill $upstream $idp 2>/dev/null || true' EXIT

"$target/debug/portcullis" serve --config examples/demo.toml &
portcullis=$!
trap 'kill $upstream $idp $portcullis 2>/dev/null || true' EXIT
wait_for http://127.0.0.1:8081/ $upstream
wait_for http://127.0.0.1:9090/readyz $portcullis
python3 examples/provision_demo.py
wait_for http://127.0.0.1:9400/.well-known/openid-configuration $idp "$target/demo-idp.log"
echo
python3 examples/agent_demo.py

cat <<'MSG'

Portcullis demo
  proxied sample upstream: http://localhost:8080/   (sign in as alice@example.com / demo)
  who am I:                http://localhost:8080/.portcullis/me
  console:                 http://localhost:8080/.portcullis/console/   (alice is in "eng")
  SCIM directory:          curl -H 'Authorization: Bearer demo-scim-token-change-me-0123456789' \
                                http://auth.localhost:8080/scim/v2/Users
  metrics:                 http://127.0.0.1:9090/metrics
Deactivate alice over SCIM (her id is printed above) and her very next request is refused:
  curl -X PATCH -H 'Authorization: Bearer demo-scim-token-change-me-0123456789' \
       -H 'Content-Type: application/scim+json' http://auth.localhost:8080/scim/v2/Users/<id> \
       -d '{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","value":{"active":false}}]}'
Her AI agent too: python3 examples/agent_demo.py shows the agent's call through
http://api.localhost:8080 refused the moment alice is deactivated. Running this script again
makes alice active and a member of eng again. Ctrl-C stops the demo.

MSG
wait $portcullis
