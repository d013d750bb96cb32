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

Not measured here yet: requests allowed on B and C after the answer (zero by construction; the
end-to-end test `replicas::a_scim_answer_on_one_replica_holds_on_every_replica_under_load`
checks it under load), authenticated requests/s on a replica, and start-up with 1M users.

The PostgreSQL server is a throw-away cluster (scripts/with-postgres.sh sets
PORTCULLIS_POSTGRES_URL; each Portcullis on it gets a fresh database). A benchmark, not a
test: it prints figures and never fails on noise.

Usage: scripts/with-postgres.sh bench/replicas.py [--rounds N] [--duration S] [--writes N] [--json OUT]
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


def run(args):
    base_url = os.environ.get("PORTCULLIS_POSTGRES_URL")
    if not base_url:
        raise SystemExit("PORTCULLIS_POSTGRES_URL is not set: run under scripts/with-postgres.sh")
    binary = common.binary()
    tmp = tempfile.mkdtemp(prefix="portcullis-replicas-bench-")
    try:
        return {"creates_c16": measure_creates(args, binary, tmp, base_url),
                "latency": measure_latency(args, binary, tmp, base_url),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--writes", type=int, default=300, help="PATCHes per round")
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
