#!/usr/bin/env bash
# Builds Portcullis and runs it on the demo: a sample upstream behind the proxy, and a local
# OpenID provider to sign in at. Open http://localhost:8080/ once it says it is ready and sign
# in as alice@example.com with password "demo"; Ctrl-C stops everything. On the way up it shows
# alice's AI agent calling through Portcullis until alice is deactivated (agent_demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh demo
cargo build -p portcullis
if [ ! -d tests/idp/node_modules ]; then
  (cd tests/idp && npm ci --silent --no-audit --no-fund)
fi

python3 examples/upstream.py 127.0.0.1 8081 &
upstream=$!
IDP_DETACHED=1 node tests/idp/idp.mjs examples/demo-idp.json >target/demo-idp.log 2>&1 &
idp=$!
trap 'kill $upstream $idp 2>/dev/null || true' EXIT

target/debug/portcullis serve --config examples/demo.toml &
portcullis=$!
trap 'kill $upstream $idp $portcullis 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:9090/readyz", timeout=1)' 2>/dev/null && break
  sleep 0.2
done
python3 examples/provision_demo.py
for _ in $(seq 150); do
  python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:9400/.well-known/openid-configuration", timeout=1)' 2>/dev/null && break
  sleep 0.2
done
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
makes alice active again. Ctrl-C stops the demo.

MSG
wait $portcullis
