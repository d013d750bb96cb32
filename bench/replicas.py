#!/usr/bin/env python3
"""Several replicas on PostgreSQL: what the shared directory costs, in the same run.

Measurements (each repeated --rounds times; medians printed):

1. SCIM user creates/s with 16 clients (wrk, keep-alive): one Portcullis on PostgreSQL against
   one on the embedded redb store, alternating, each started fresh. Target on PostgreSQL:
   >= 10,000/s on 2 cores.
2. SCIM write latency with three replicas on one PostgreSQL: sequential PATCHes (deactivate /
   re-activate one user) sent to replica A, N=--writes each round; median and p99. Each answer
   waits until B and C have applied the change (the fleet-wide wait). Target: p99 < 20 ms. The
   same PATCHes against a single replica on PostgreSQL give the cost of the wait itself.

3. Authenticated requests/s (a signed-in session, a group policy; wrk -t1 -c32, keep-alive) and
   CPU per request of one Portcullis worker thread, on PostgreSQL against redb, alternating.
   Target: within 5%. The request path is the same on both (memory only).
4. Start-up (spawn -> /readyz 200) with --users users and 10,000 groups loaded from PostgreSQL,
   against the same directory on redb (the `populate` example's shape; PostgreSQL's rows are
   written by SQL on the server).

Not measured here: requests allowed on B and C after the answer (zero by construction; the
end-to-end test `replicas::a_scim_answer_on_one_replica_holds_on_every_replica_under_load`
checks it under load).

The PostgreSQL server is a throw-away cluster (scripts/with-postgres.sh sets
PORTCULLIS_POSTGRES_URL; each Portcullis on it gets a fresh database). A benchmark, not a
test: it prints figures and never fails on noise.

Usage: scripts/with-postgres.sh bench/replicas.py [--rounds N] [--duration S] [--writes N] [--users N]
       [--json OUT]
"""
import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import log, percentile  # noqa: E402
from scim import USER_SCHEMA, PATCH_SCHEMA, Portcullis, request, wrk_create  # noqa: E402


def psql(url, sql):
    """Runs `sql` against the server at `url` (as the postgres superuser, trust auth)."""
    bindir = sorted(d for d in os.listdir("/usr/lib/postgresql"))[-1]
    subprocess.run([f"/usr/lib/postgresql/{bindir}/bin/psql", url, "-qAt", "-c", sql],
                   check=True, stdout=subprocess.DEVNULL)


def fresh_database(base_url, name):
    """Creates database `name` on the server; returns its URL."""
    psql(base_url, f"DROP DATABASE IF EXISTS {name}")
    psql(base_url, f"CREATE DATABASE {name}")
    return base_url.replace("/postgres?", f"/{name}?")


def start_replica(binary, tmp, name, pg_url=None):
    """A Portcullis serving only SCIM, its directory in PostgreSQL at `pg_url` (or redb)."""
    extra = f'[postgres]\nurl = "{pg_url}"\n' if pg_url else ""
    return Portcullis(binary, tmp, os.path.join(tmp, f"data-{name}"), name, extra)


def measure_creates(args, binary, tmp, base_url):
    runs = {"postgres": [], "redb": []}
    for round_no in range(args.rounds):
        order = ["postgres", "redb"] if round_no % 2 == 0 else ["redb", "postgres"]
        for system in order:
            name = f"create{round_no}{system}"
            pg = fresh_database(base_url, name) if system == "postgres" else None
            replica = start_replica(binary, tmp, name, pg)
            try:
                wrk_create(tmp, replica, 1, 16)  # warm-up
                run = wrk_create(tmp, replica, args.duration, 16)
                runs[system].append(run)
                log(f"round {round_no + 1}: create {system:8} c16 {run['rps']:8.0f}/s p99 {run['p99']:7.2f} ms "
                    f"non-2xx {run['non2xx']}")
            finally:
                replica.stop()
    return {s: {"rps": statistics.median(r["rps"] for r in v), "p99_ms": statistics.median(r["p99"] for r in v)}
            for s, v in runs.items()}


def patch_active(conn, base, user, active):
    body = {"schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "value": {"active": active}}]}
    started = time.perf_counter()
    status, _ = request(conn, "PATCH", f"{base}/Users/{user}", body)
    elapsed = time.perf_counter() - started
    if status not in (200, 204):
        raise SystemExit(f"PATCH /Users/{user}: {status}")
    return elapsed * 1000


def write_latencies(args, replicas):
    """Sequential PATCHes to replicas[0]; their latencies in ms."""
    a = replicas[0]
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
    status, body = request(conn, "POST", f"{a.base}/Users",
                           {"schemas": [USER_SCHEMA], "userName": f"latency-{time.time_ns()}@bench.example"})
    if status != 201:
        raise SystemExit(f"create: {status} {body}")
    user = body["id"]
    latencies = [patch_active(conn, a.base, user, i % 2 == 1) for i in range(args.writes)]
    conn.close()
    return latencies


def measure_latency(args, binary, tmp, base_url):
    result = {}
    for fleet in (1, 3):
        all_latencies = []
        for round_no in range(args.rounds):
            pg = fresh_database(base_url, f"latency{fleet}r{round_no}")
            replicas = [start_replica(binary, tmp, f"lat{fleet}-{round_no}-{i}", pg) for i in range(fleet)]
            try:
                latencies = write_latencies(args, replicas)
            finally:
                for replica in replicas:
                    replica.stop()
            all_latencies += latencies
            log(f"round {round_no + 1}: {fleet} replica(s): PATCH median {statistics.median(latencies):.2f} ms "
                f"p99 {percentile(latencies, 99):.2f} ms")
        result[f"replicas_{fleet}"] = {
            "median_ms": statistics.median(all_latencies),
            "p99_ms": percentile(all_latencies, 99),
            "writes": len(all_latencies),
        }
    return result


def measure_authenticated(args, tmp, base_url):
    """Requests/s and CPU µs per request with alice's session, one Portcullis thread."""
    from proxy import cpu_seconds  # noqa: E402
    runs = {"postgres": [], "redb": []}
    for round_no in range(args.rounds):
        order = ["postgres", "redb"] if round_no % 2 == 0 else ["redb", "postgres"]
        for system in order:
            where = os.path.join(tmp, f"auth{round_no}{system}")
            os.makedirs(where)
            extra = ""
            if system == "postgres":
                extra = f'[postgres]\nurl = "{fresh_database(base_url, f"auth{round_no}")}"\n'
            stack = common.Stack(where, threads=1, extra=extra)
            try:
                cookie = stack.sign_in()
                url = f"http://127.0.0.1:{stack.port}/"
                headers = ["Host: app.test", f"Cookie: portcullis_session={cookie}", "Accept: application/json"]
                common.wrk(url, 1, 32, headers)  # warm-up
                before = cpu_seconds(stack.proc.pid)
                run_ = common.wrk(url, args.duration, 32, headers)
                after = cpu_seconds(stack.proc.pid)
                if run_["non2xx"] or run_["sockerr"]:
                    raise SystemExit(f"{system}: {run_['non2xx']} non-2xx, {run_['sockerr']} socket errors")
                requests = max(run_["rps"] * args.duration, 1)
                run_["cpu_us"] = (sum(after) - sum(before)) / requests * 1e6
                runs[system].append(run_)
                log(f"round {round_no + 1}: authenticated {system:8} {run_['rps']:8.0f} req/s "
                    f"CPU {run_['cpu_us']:5.1f} µs/req p99 {run_['p99']:6.2f} ms")
            finally:
                stack.stop()
    return {s: {"rps": statistics.median(r["rps"] for r in v), "cpu_us": statistics.median(r["cpu_us"] for r in v),
                "p99_ms": statistics.median(r["p99"] for r in v)} for s, v in runs.items()}


GROUPS = 10_000


def populate_postgres(url, users, groups):
    """The `populate` example's directory, written into a migrated database by SQL."""
    user = (f"jsonb_build_object('resource', jsonb_build_object("
            f"'schemas', jsonb_build_array('{USER_SCHEMA}'), "
            f"'id', '00000000-0000-4000-8000-' || lpad(n::text, 12, '0'), "
            f"'userName', 'user' || n || '@bench.example', 'externalId', 'ext-' || n, "
            f"'name', jsonb_build_object('givenName', 'User', 'familyName', 'Number' || n), "
            f"'emails', jsonb_build_array(jsonb_build_object('type', 'work', "
            f"'value', 'user' || n || '@bench.example', 'primary', true)), 'active', true, "
            f"'meta', jsonb_build_object('resourceType', 'User', 'created', '2026-01-01T00:00:00Z', "
            f"'lastModified', '2026-01-01T00:00:00Z', 'version', 'W/\"' || (n + {groups + 1}) || '\"')), "
            f"'valid_since', 0)::text")
    group = (f"jsonb_build_object('resource', jsonb_build_object("
             f"'schemas', jsonb_build_array('urn:ietf:params:scim:schemas:core:2.0:Group'), "
             f"'id', '00000000-0000-4000-9000-' || lpad(g::text, 12, '0'), 'displayName', 'group' || g, "
             f"'meta', jsonb_build_object('resourceType', 'Group', 'created', '2026-01-01T00:00:00Z', "
             f"'lastModified', '2026-01-01T00:00:00Z', 'version', 'W/\"' || (g + 1) || '\"')), "
             f"'valid_since', 0)::text")
    first_group = users + 1
    psql(url, f"INSERT INTO directory_groups SELECT {first_group} + g, convert_to({group}, 'UTF8') "
              f"FROM generate_series(0, {groups - 1}) AS g")
    psql(url, f"INSERT INTO directory_users SELECT n + 1, convert_to({user}, 'UTF8') "
              f"FROM generate_series(0, {users - 1}) AS n")
    psql(url, f"INSERT INTO directory_members SELECT {first_group} + 2 + n % {groups - 2}, n + 1 "
              f"FROM generate_series(0, {users - 1}) AS n")
    psql(url, f"INSERT INTO directory_members SELECT {first_group}, n + 1 "
              f"FROM generate_series(0, {min(users, 100_000) - 1}) AS n")
    psql(url, f"INSERT INTO directory_members SELECT {first_group} + 1, n + 1 "
              f"FROM generate_series(0, {min(users, 10) - 1}) AS n")
    psql(url, f"UPDATE directory_meta SET value = CASE key WHEN 'seq' THEN value + {users + groups} "
              f"ELSE {users + groups + 1} END")


def measure_startup(args, binary, tmp, base_url):
    """Spawn -> /readyz 200 with a large directory, from PostgreSQL and from redb."""
    populate = os.path.join(common.ROOT, "target", "release", "examples", "populate")
    subprocess.run(["cargo", "build", "--release", "-p", "portcullis-scim", "--example", "populate"],
                   cwd=common.ROOT, check=True)
    redb_dir = os.path.join(tmp, "data-big")
    subprocess.run([populate, redb_dir, str(args.users), str(GROUPS)], check=True, timeout=1800)
    pg = fresh_database(base_url, "big")
    start_replica(binary, tmp, "migrate", pg).stop()  # the schema, and the first keys
    t0 = time.monotonic()
    populate_postgres(pg, args.users, GROUPS)
    log(f"PostgreSQL populated with {args.users:,} users in {time.monotonic() - t0:.1f} s")
    times = {"postgres": [], "redb": []}
    for round_no in range(args.rounds):
        for system in ("postgres", "redb"):
            if system == "postgres":
                replica = start_replica(binary, tmp, f"big{round_no}", pg)
            else:
                replica = Portcullis(binary, tmp, redb_dir, f"bigredb{round_no}")
            replica.stop()
            times[system].append(replica.startup_s)
            log(f"round {round_no + 1}: start-up {system:8} {replica.startup_s:6.2f} s")
    return {s: statistics.median(v) for s, v in times.items()}


def run(args):
    base_url = os.environ.get("PORTCULLIS_POSTGRES_URL")
    if not base_url:
        raise SystemExit("PORTCULLIS_POSTGRES_URL is not set: run under scripts/with-postgres.sh")
    binary = common.binary()
    tmp = tempfile.mkdtemp(prefix="portcullis-replicas-bench-")
    try:
        return {"creates_c16": measure_creates(args, binary, tmp, base_url),
                "latency": measure_latency(args, binary, tmp, base_url),
                "authenticated": measure_authenticated(args, tmp, base_url),
                "startup_s": measure_startup(args, binary, tmp, base_url),
                "users": args.users,
                "machine": common.machine()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(r):
    c = r["creates_c16"]
    one, three = r["latency"]["replicas_1"], r["latency"]["replicas_3"]
    print("| figure | PostgreSQL | redb | target |")
    print("|---|---:|---:|---|")
    print(f"| SCIM creates/s, 16 clients | {c['postgres']['rps']:,.0f} (p99 {c['postgres']['p99_ms']:.1f} ms) | "
          f"{c['redb']['rps']:,.0f} (p99 {c['redb']['p99_ms']:.1f} ms) | >= 10,000/s on PostgreSQL |")
    print()
    print("| SCIM write latency (PATCH, sequential) | median | p99 | target |")
    print("|---|---:|---:|---|")
    print(f"| 1 replica on PostgreSQL | {one['median_ms']:.2f} ms | {one['p99_ms']:.2f} ms | - |")
    print(f"| 3 replicas (the answer waits for B and C) | {three['median_ms']:.2f} ms | {three['p99_ms']:.2f} ms | "
          f"p99 < 20 ms |")
    a = r["authenticated"]
    ratio = a["postgres"]["rps"] / a["redb"]["rps"]
    print()
    print("| one worker thread, session + group policy | PostgreSQL | redb | PostgreSQL / redb | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| requests/s | {a['postgres']['rps']:,.0f} | {a['redb']['rps']:,.0f} | {ratio:.3f} | within 5%: {common.verdict(ratio >= 0.95)} |")
    print(f"| CPU µs/request | {a['postgres']['cpu_us']:.1f} | {a['redb']['cpu_us']:.1f} | "
          f"{a['postgres']['cpu_us'] / a['redb']['cpu_us']:.3f} | - |")
    print(f"| p99 | {a['postgres']['p99_ms']:.2f} ms | {a['redb']['p99_ms']:.2f} ms | - | - |")
    st = r["startup_s"]
    print()
    print(f"| start-up, spawn -> /readyz 200, {r['users']:,} users + {GROUPS:,} groups | PostgreSQL | redb |")
    print("|---|---:|---:|")
    print(f"| median | {st['postgres']:.2f} s | {st['redb']:.2f} s |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--writes", type=int, default=300, help="PATCHes per round")
    parser.add_argument("--users", type=int, default=1_000_000, help="users in the start-up directory")
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
