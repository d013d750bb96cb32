#!/usr/bin/env bash
# Runs a command with a throw-away PostgreSQL server: a cluster initdb makes in a temporary
# directory, on a free loopback port, its socket in that directory, removed afterwards. The
# command finds it in $PORTCULLIS_POSTGRES_URL. As root, the server runs as the `postgres` user.
# Usage: scripts/with-postgres.sh COMMAND [ARGS...]
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "PostgreSQL is not installed: run scripts/deps.sh test" >&2; exit 1; }
dir=$(mktemp -d -t portcullis-pg-XXXXXX)
as_pg=()
# Set before anything can fail: a cluster that did not start (or started late, after pg_ctl
# gave up) is stopped and its directory removed all the same.
cleanup() {
  if [ -f "$dir/data/postmaster.pid" ]; then
    "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
if [ "$(id -u)" -eq 0 ]; then
  chown postgres:postgres "$dir"
  as_pg=(runuser -u postgres --)
fi
if ! "${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 --no-locale \
  >"$dir/initdb.log" 2>&1; then
  echo "initdb failed:" >&2
  cat "$dir/initdb.log" >&2
  exit 1
fi
# A port below the ephemeral range, where no outgoing connection takes one meanwhile (taken
# after initdb, which takes seconds: the tests take theirs there too).
port=$(python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
if low <= 11000:
    raise SystemExit(f"the ephemeral port range starts at {low}: a port below it is needed")
for port in random.sample(range(10000, low), low - 10000):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
else:
    raise SystemExit("no free loopback port below the ephemeral range")
PY
)
if ! "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 120 \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null; then
  echo "PostgreSQL did not start; the end of its log:" >&2
  tail -40 "$dir/postgres.log" >&2 || true
  exit 1
fi
export PORTCULLIS_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
"$@"
