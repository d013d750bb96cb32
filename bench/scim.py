#!/usr/bin/env python3
"""SCIM directory: Portcullis vs scim2-server 0.8.3 (PyPI), side by side in the same run.

Measurements (each repeated --rounds times, alternating the two systems; medians printed):

1. User creates/s (POST /Users, unique userNames) with 1 and 16 concurrent clients, each
   system started fresh every round (Portcullis on a fresh, durable data directory).
   Target: Portcullis >= 10x scim2-server at 16 clients.
2. Lookups/s, `GET /Users?filter=userName eq "user{random}@bench.example"`, 16 connections.
   Portcullis holds --users users (default 1,000,000) and 10,000 groups written by the
   `populate` example; scim2-server holds as many users as 16 clients create via POST within
   a bounded time (20,000 or 120 s, whichever comes first). Target: >= 50x.
3. Portcullis only: latency of adding one member to the 100,000-member group vs the
   10-member group (sequential PATCH /Groups/{id}, N=500 each, interleaved, users not yet in
   the group). Target: the 100k-group median within 2x of the 10-group's. The same for
   Microsoft Entra ID's check of one membership (`GET /Groups?filter=id eq "G" and members eq
   "U"&attributes=id`, N=200 each, half for a member).
4. Portcullis only, with the large directory: start-up time (spawn -> /readyz 200) and VmRSS
   after start-up and after the lookup load. Target: RSS < 1 GiB.

Load comes from wrk (-t1) with Lua scripts written to a temporary directory. scim2-server is a
single-process wsgiref server speaking HTTP/1.0 without keep-alive, so wrk opens a new TCP
connection for each of its requests; Portcullis keeps connections alive. Both check a bearer
token. Servers listen on 127.0.0.1 only, on free ports; every load is bounded in count and
time; temporary data (about 570 MB for 1,000,000 users) is deleted at the end. A benchmark, not
a test: it prints figures and ratios and never fails on noise.

Usage: bench/scim.py [--rounds N] [--duration S] [--users N] [--json OUT]
Needs: scripts/deps.sh bench (wrk); the venv target/bench-venv is created if missing.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import ROOT, free_port, log, percentile, stop, verdict, wait_http  # noqa: E402

VENV = os.path.join(ROOT, "target", "bench-venv")
# scim2-server with everything it needs pinned, as the conformance suite pins them (the
# Makefile's bench-deps installs the same).
REQUIREMENTS = os.path.join(ROOT, "tests", "conformance", "requirements.txt")
TOKEN = "bench-scim-token-0123456789abcdef"
GROUPS = 10_000
REFERENCE_USERS = 20_000    # users created in scim2-server before its lookups ...
REFERENCE_FILL_S = 120      # ... or fewer, if this many seconds run out first
PATCH_N = 500               # PATCHes per group per round
CHECK_N = 200               # membership checks per group per round
BIG_GROUP_MEMBERS = 100_000  # group0 holds the first 100,000 users (populate.rs)
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def user_id(n):
    return f"00000000-0000-4000-8000-{n:012}"


def group_id(n):
    return f"00000000-0000-4000-9000-{n:012}"


# --- processes and HTTP ------------------------------------------------------------------------

def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        kb = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
    return kb / 1024


def request(conn, method, path, body=None):
    """One request on an http.client connection; returns (status, parsed JSON body or None)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if body is not None:
        headers["Content-Type"] = "application/scim+json"
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, (json.loads(data) if data else None)


class Portcullis:
    """A Portcullis process serving only SCIM; start-up time is spawn -> /readyz 200.
    `extra` is appended to its config (bench/replicas.py adds `[postgres]`, bench/scim_reads.py
    a route); `threads` is its worker threads (default: one per CPU)."""

    def __init__(self, binary, tmp, data_dir, name, extra="", threads=None):
        self.port, admin_port = free_port(), free_port()
        self.base = "/scim/v2"
        self.url = f"http://127.0.0.1:{self.port}{self.base}"
        config = os.path.join(tmp, f"portcullis-{name}.toml")
        with open(config, "w") as f:
            f.write(f"""
data_dir = "{data_dir}"
[log]
level = "warn"
[server]
threads = {threads or os.cpu_count()}
[admin]
address = "127.0.0.1:{admin_port}"
[[listeners]]
address = "127.0.0.1:{self.port}"
[scim]
host = "127.0.0.1"
[[scim.tokens]]
name = "bench"
secret = "{TOKEN}"
{extra}""")
        self.log = open(os.path.join(tmp, f"portcullis-{name}.log"), "w")
        self.proc = subprocess.Popen([binary, "serve", "--config", config],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.startup_s = wait_http(f"http://127.0.0.1:{admin_port}/readyz", timeout=300, want=200)
        except SystemExit:
            self.stop()
            with open(self.log.name) as f:
                log(f.read()[-2000:])
            raise

    def stop(self):
        stop(self.proc)
        self.log.close()


class Scim2Server:
    """The reference: scim2-server's test server (in memory, wsgiref, HTTP/1.0)."""

    def __init__(self, tmp, name):
        self.port = free_port()
        self.base = "/v2"
        self.url = f"http://127.0.0.1:{self.port}{self.base}"
        self.log = open(os.path.join(tmp, f"scim2-server-{name}.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(VENV, "bin", "scim2-server"), "--hostname", "127.0.0.1",
             "--port", str(self.port), "--bearer-token", TOKEN],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.startup_s = wait_http(f"http://127.0.0.1:{self.port}/v2/ServiceProviderConfig")
        except SystemExit:
            self.stop()
            raise

    def stop(self):
        stop(self.proc)
        self.log.close()


# --- wrk ---------------------------------------------------------------------------------------

CREATE_LUA = """
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/scim+json"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  n = n + 1
  local body = '{"schemas":["%(schema)s"],"userName":"%(prefix)s-' .. n .. '@bench.example"}'
  return wrk.format(nil, nil, nil, body)
end
"""

LOOKUP_LUA = """
math.randomseed(%(seed)d)
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  local n = math.random(0, %(users)d - 1)
  return wrk.format("GET", "%(path)s?filter=userName%%20eq%%20%%22user" .. n .. "%%40bench.example%%22")
end
"""


def wrk(tmp, lua, url, duration, connections):
    """`wrk` with the Lua script `lua`; returns dict(rps, p50, p99 ms, non2xx, sockerr). A run
    with a refused request or a socket error is an error (see bench/README.md): wrk counts a
    fast 503 in its rate as a served request."""
    script = os.path.join(tmp, f"wrk-{random.getrandbits(32):08x}.lua")
    with open(script, "w") as f:
        f.write(lua)
    try:
        run = common.wrk(url, duration, connections, script=script)
    finally:
        os.unlink(script)
    if run["non2xx"] or run["sockerr"]:
        raise SystemExit(f"{url}: {run['non2xx']} non-2xx, {run['sockerr']} socket errors")
    return run


def wrk_create(tmp, server, duration, connections):
    prefix = f"bench{random.getrandbits(48):012x}"  # fresh per run: userNames never collide
    lua = CREATE_LUA % {"token": TOKEN, "schema": USER_SCHEMA, "prefix": prefix}
    return wrk(tmp, lua, f"{server.url}/Users", duration, connections)


def wrk_lookup(tmp, server, users, duration, connections=16):
    lua = LOOKUP_LUA % {"seed": random.getrandbits(31), "token": TOKEN, "users": users,
                        "path": f"{server.base}/Users"}
    return wrk(tmp, lua, f"{server.url}/Users", duration, connections)


def check_lookup(server, n):
    """Sanity check: the lookup the load generator sends finds exactly one user."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    query = urllib.parse.quote(f'userName eq "user{n}@bench.example"')
    status, body = request(conn, "GET", f"{server.base}/Users?filter={query}")
    conn.close()
    if status != 200 or not body or body.get("totalResults") != 1:
        raise SystemExit(f"lookup of user{n} on {server.url}: {status} {body}")


def median(runs, key):
    return statistics.median(r[key] for r in runs)


# --- measurements ------------------------------------------------------------------------------

def measure_creates(args, binary, tmp):
    """1. Creates/s with 1 and 16 clients; both systems started fresh each round."""
    results = {("portcullis", c): [] for c in (1, 16)}
    results.update({("scim2-server", c): [] for c in (1, 16)})
    for round_no in range(args.rounds):
        order = ["portcullis", "scim2-server"]
        if round_no % 2:
            order.reverse()
        for system in order:
            name = f"create-{round_no}"
            if system == "portcullis":
                server = Portcullis(binary, tmp, os.path.join(tmp, f"data-{name}"), name)
            else:
                server = Scim2Server(tmp, name)
            try:
                for clients in (1, 16):
                    wrk_create(tmp, server, 1, clients)  # warm-up
                    run = wrk_create(tmp, server, args.duration, clients)
                    results[(system, clients)].append(run)
                    log(f"round {round_no + 1}: create {system:12} c{clients:<2} {run['rps']:8.0f}/s "
                        f"p99 {run['p99']:7.2f} ms  non-2xx {run['non2xx']}  socket errors {run['sockerr']}")
            finally:
                server.stop()
                shutil.rmtree(os.path.join(tmp, f"data-{name}"), ignore_errors=True)
    return results


def fill_reference(server, target, limit_s, clients=16):
    """Create user0..user{target-1} in scim2-server with `clients` threads, bounded by limit_s.

    Returns (users created, seconds, failures). Numbers are handed out in order, so the users
    created are exactly user0..user{created-1} unless a request failed.
    """
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0, "reasons": {}}
    deadline = time.monotonic() + limit_s

    def worker():
        while time.monotonic() < deadline:
            with lock:
                n = state["next"]
                if n >= target:
                    return
                state["next"] += 1
            # HTTP/1.0 server: a new connection per request. A create that fails at the TCP level
            # (its listen backlog is socketserver's 5) is retried, so user0..user{created-1} exist.
            body = {"schemas": [USER_SCHEMA], "userName": f"user{n}@bench.example"}
            for attempt in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                try:
                    status, _ = request(conn, "POST", f"{server.base}/Users", body)
                    reason = str(status)
                except OSError as e:
                    status, reason = 0, type(e).__name__
                finally:
                    conn.close()
                if status == 409 and attempt > 0:
                    status = 201  # an earlier attempt created it before its connection broke
                if status != 0:
                    break
            with lock:
                if status == 201:
                    state["ok"] += 1
                else:
                    state["failed"] += 1
                    state["reasons"][reason] = state["reasons"].get(reason, 0) + 1

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["failed"]:
        log(f"warning: {state['failed']} scim2-server creates failed ({state['reasons']}); "
            "some lookups there may find nothing")
    return state["ok"], time.monotonic() - started, state["failed"]


def interleaved(server, n, bound_s, what, ask):
    """n sequential requests to group0 (100k) and group1 (10) each, interleaved, on one
    keep-alive connection, within bound_s seconds. ask(i, group) gives (method, path, body,
    whether the answer (status, body) is right). Returns ms lists per group. A wrong answer ends
    the run, as a refused request ends a wrk run: a quick refusal is no latency."""
    latencies = {0: [], 1: []}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    deadline = time.monotonic() + bound_s
    try:
        for i in range(n):
            if time.monotonic() > deadline:
                log(f"{what} hit its {bound_s} s bound; stopping early")
                break
            for group in (0, 1):
                method, path, body, right = ask(i, group)
                t0 = time.perf_counter()
                answer = request(conn, method, f"{server.base}{path}", body)
                latencies[group].append((time.perf_counter() - t0) * 1e3)
                if not right(*answer):
                    raise SystemExit(f"{what} on group{group}: {method} {path}: "
                                     f"{answer[0]} {answer[1]}")
    finally:
        conn.close()
    return latencies


def patch_latencies(server, round_no, users):
    """3. Sequential PATCH add-member to group0 (100k) and group1 (10), interleaved; ms lists."""
    # Users in neither group: group0 holds users 0..99,999, group1 users 0..9. The rest of the
    # users are split in two halves, one per group, and each round takes fresh ones.
    first_free = BIG_GROUP_MEMBERS
    # The directory's last CHECK_N users stay in no group: the membership checks' non-members.
    half = (users - first_free - CHECK_N) // 2
    starts = {0: first_free + round_no * PATCH_N, 1: first_free + half + round_no * PATCH_N}

    def ask(i, group):
        body = {"schemas": [PATCH_SCHEMA], "Operations": [
            {"op": "add", "path": "members", "value": [{"value": user_id(starts[group] + i)}]}]}
        return "PATCH", f"/Groups/{group_id(group)}", body, lambda status, _: status in (200, 204)
    return interleaved(server, PATCH_N, 300, "PATCH measurement", ask)


def membership_latencies(server, users):
    """3b. Microsoft Entra ID's check of one membership, `GET /Groups?filter=id eq "G" and
    members eq "U"&attributes=id`, sequential, on group0 (100k) and group1 (10), interleaved,
    alternately for users 0..9 (in both groups) and for the directory's last users (in neither:
    the PATCH rounds add users from the start of each half past 100,000); ms lists. Each
    answer must say what the user is: 1 group found for a member, none for the others."""
    def ask(i, group):
        is_member = bool(i % 2)
        member = user_id(i % 10) if is_member else user_id(max(BIG_GROUP_MEMBERS, users - 1 - i))
        query = urllib.parse.quote(f'id eq "{group_id(group)}" and members eq "{member}"')
        expected = 1 if is_member else 0
        return ("GET", f"/Groups?filter={query}&attributes=id", None,
                lambda status, body: status == 200 and isinstance(body, dict)
                and body.get("totalResults") == expected)
    return interleaved(server, CHECK_N, 120, "membership check", ask)


def measure_large_directory(args, binary, tmp):
    """2, 3 and 4: lookups on both systems; PATCH, start-up and RSS on Portcullis."""
    data_dir = os.path.join(tmp, "data-large")
    populate = os.path.join(ROOT, "target", "release", "examples", "populate")
    log(f"populating {args.users:,} users and {GROUPS:,} groups ...")
    t0 = time.monotonic()
    subprocess.run([populate, data_dir, str(args.users), str(GROUPS)], check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    populate_s = time.monotonic() - t0
    disk_mb = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, files in os.walk(data_dir) for f in files) / 1e6

    reference = Scim2Server(tmp, "lookup")
    try:
        log(f"filling scim2-server (up to {REFERENCE_USERS:,} users or {REFERENCE_FILL_S} s) ...")
        ref_users, fill_s, fill_failed = fill_reference(reference, REFERENCE_USERS, REFERENCE_FILL_S)
        check_lookup(reference, ref_users - 1)

        lookups = {"portcullis": [], "scim2-server": []}
        per_round = {"startup_s": [], "rss_start": [], "rss_after": []}
        patches = {0: [], 1: []}   # per round: (median, p99)
        checks = {0: [], 1: []}    # the same, for membership checks
        for round_no in range(args.rounds):
            portcullis = Portcullis(binary, tmp, data_dir, f"large-{round_no}")
            try:
                per_round["startup_s"].append(portcullis.startup_s)
                per_round["rss_start"].append(rss_mib(portcullis.proc.pid))
                check_lookup(portcullis, args.users - 1)
                order = [("portcullis", portcullis, args.users), ("scim2-server", reference, ref_users)]
                if round_no % 2:
                    order.reverse()
                for system, server, users in order:
                    wrk_lookup(tmp, server, users, 1)  # warm-up
                    run = wrk_lookup(tmp, server, users, args.duration)
                    lookups[system].append(run)
                    log(f"round {round_no + 1}: lookup {system:12} {run['rps']:8.0f}/s "
                        f"p99 {run['p99']:7.2f} ms  non-2xx {run['non2xx']}  socket errors {run['sockerr']}")
                per_round["rss_after"].append(rss_mib(portcullis.proc.pid))
                log(f"round {round_no + 1}: start-up {portcullis.startup_s:.2f} s, RSS "
                    f"{per_round['rss_start'][-1]:.0f} -> {per_round['rss_after'][-1]:.0f} MiB")
                latencies = patch_latencies(portcullis, round_no, args.users)
                for group in (0, 1):
                    patches[group].append((statistics.median(latencies[group]),
                                           percentile(latencies[group], 99)))
                log(f"round {round_no + 1}: PATCH group0 median {patches[0][-1][0]:.2f} ms "
                    f"p99 {patches[0][-1][1]:.2f} ms; group1 median {patches[1][-1][0]:.2f} ms "
                    f"p99 {patches[1][-1][1]:.2f} ms")
                latencies = membership_latencies(portcullis, args.users)
                for group in (0, 1):
                    checks[group].append((statistics.median(latencies[group]),
                                          percentile(latencies[group], 99)))
                log(f"round {round_no + 1}: membership check group0 median {checks[0][-1][0]:.2f} ms; "
                    f"group1 median {checks[1][-1][0]:.2f} ms")
            finally:
                portcullis.stop()
    finally:
        reference.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "populate_s": populate_s, "disk_mb": disk_mb,
        "ref_users": ref_users, "fill_s": fill_s, "fill_failed": fill_failed,
        "lookups": lookups, "per_round": per_round, "patches": patches, "checks": checks,
    }


# --- output ------------------------------------------------------------------------------------

def report(args, creates, large, load_start):
    summary = []
    print(f"\n## SCIM benchmark: Portcullis vs scim2-server 0.8.3\n")
    machine = common.machine()
    print(f"Machine: {machine['cores']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB memory; load average {load_start:.2f} before, {os.getloadavg()[0]:.2f} after "
          "(wrk and the servers share these CPUs).  ")
    print(f"Median of {args.rounds} round(s), systems alternating each round; wrk -t1 -d{args.duration}s. "
          f"Portcullis: {os.cpu_count()} worker threads, durable (fsync per commit batch). "
          "scim2-server: one Python process (thread per connection, GIL), in memory, "
          "HTTP/1.0 without keep-alive, so every request it serves opens a new TCP connection.\n")

    print("### 1. User creates/s (POST /Users, fresh server each round)\n")
    print("| clients | Portcullis creates/s | p99 ms | scim2-server creates/s | p99 ms | ratio | target |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for clients in (1, 16):
        p, s = creates[("portcullis", clients)], creates[("scim2-server", clients)]
        ratio = median(p, "rps") / median(s, "rps")
        target = f">= 10x: {verdict(ratio >= 10)}" if clients == 16 else "-"
        print(f"| {clients} | {median(p, 'rps'):,.0f} | {median(p, 'p99'):.2f} | {median(s, 'rps'):,.0f} "
              f"| {median(s, 'p99'):.2f} | {ratio:.1f}x | {target} |")
        if clients == 16:
            summary.append(("creates/s, 16 clients", f"{median(p, 'rps'):,.0f}", f"{median(s, 'rps'):,.0f}",
                            f"{ratio:.1f}x", ">= 10x", verdict(ratio >= 10)))
    errs = {k: sum(r["non2xx"] + r["sockerr"] for r in v) for k, v in creates.items()}
    print(f"\nNon-2xx + socket errors over all create runs: "
          + ", ".join(f"{sys_} c{c}: {n}" for (sys_, c), n in errs.items()))

    lk = large["lookups"]
    p_rps, s_rps = median(lk["portcullis"], "rps"), median(lk["scim2-server"], "rps")
    ratio = p_rps / s_rps
    print(f"\n### 2. userName eq lookups/s (GET /Users?filter=..., 16 connections, random user)\n")
    print("| system | users loaded | lookups/s | p99 ms | non-2xx + socket errors |")
    print("|---|---:|---:|---:|---:|")
    print(f"| Portcullis | {args.users:,} (+ {GROUPS:,} groups, populate) | {p_rps:,.0f} "
          f"| {median(lk['portcullis'], 'p99'):.2f} | {sum(r['non2xx'] + r['sockerr'] for r in lk['portcullis'])} |")
    print(f"| scim2-server | {large['ref_users']:,} (POST, {large['fill_s']:.0f} s) | {s_rps:,.0f} "
          f"| {median(lk['scim2-server'], 'p99'):.2f} | {sum(r['non2xx'] + r['sockerr'] for r in lk['scim2-server'])} |")
    print(f"\nPortcullis / scim2-server: {ratio:.1f}x (target >= 50x: {verdict(ratio >= 50)}). "
          f"scim2-server was filled by 16 client threads, bounded to {REFERENCE_USERS:,} users or "
          f"{REFERENCE_FILL_S} s ({large['fill_failed']} failed creates); it indexes `eq` on userName, "
          "so its lookup rate hardly depends on its size.")
    summary.append(("lookups/s, 16 connections", f"{p_rps:,.0f}", f"{s_rps:,.0f}", f"{ratio:.1f}x",
                    ">= 50x", verdict(ratio >= 50)))

    summary.append(group_pair(
        args, large["patches"],
        f"3. Add one member to a group (Portcullis, sequential PATCH, {PATCH_N} per group per round, "
        "interleaved, 1 keep-alive connection)",
        "Each PATCH is a durable commit, answered 204.", "PATCH add member"))
    summary.append(group_pair(
        args, large["checks"],
        "3b. Check one membership as Microsoft Entra ID does (Portcullis, sequential "
        f"`GET /Groups?filter=id eq \"G\" and members eq \"U\"&attributes=id`, {CHECK_N} per group "
        "per round, half of them for a member, interleaved)", "", "membership check"))

    pr = large["per_round"]
    rss_start, rss_after = statistics.median(pr["rss_start"]), statistics.median(pr["rss_after"])
    startup = statistics.median(pr["startup_s"])
    print(f"\n### 4. Portcullis with {args.users:,} users and {GROUPS:,} groups\n")
    print("| figure | value | target |")
    print("|---|---:|---|")
    print(f"| populate (example, straight to storage) | {large['populate_s']:.1f} s | - |")
    print(f"| data directory size | {large['disk_mb']:,.0f} MB | - |")
    print(f"| start-up (spawn -> /readyz 200) | {startup:.2f} s | - |")
    print(f"| VmRSS after start-up | {rss_start:,.0f} MiB | < 1024 MiB: {verdict(rss_start < 1024)} |")
    print(f"| VmRSS after the lookup load | {rss_after:,.0f} MiB | < 1024 MiB: {verdict(rss_after < 1024)} |")
    summary.append(("VmRSS after lookups (Portcullis)", f"{rss_after:,.0f} MiB", "-", "-", "< 1 GiB",
                    verdict(rss_after < 1024)))

    print("\n### Targets\n")
    print("| measurement | Portcullis | scim2-server | ratio | target | result |")
    print("|---|---:|---:|---:|---|---|")
    for row in summary:
        print("| " + " | ".join(row) + " |")


def group_pair(args, rounds, title, note, label):
    """Prints the table of a measurement on group0 (100k) and group1 (10); its summary row.
    rounds: {group: [(median, p99) per round]}."""
    big, small = rounds[0], rounds[1]
    big_med, small_med = statistics.median(r[0] for r in big), statistics.median(r[0] for r in small)
    big_p99, small_p99 = statistics.median(r[1] for r in big), statistics.median(r[1] for r in small)
    ratio = big_med / small_med
    print(f"\n### {title}\n")
    print("| group | members | median ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(f"| group0 | {min(args.users, BIG_GROUP_MEMBERS):,} | {big_med:.2f} | {big_p99:.2f} |")
    print(f"| group1 | 10 | {small_med:.2f} | {small_p99:.2f} |")
    print(f"\n100k-group / 10-group: median {ratio:.2f}x, p99 {big_p99 / small_p99:.2f}x "
          f"(target: within 2x: {verdict(ratio <= 2)}). {note}".rstrip())
    return (f"{label}, 100k vs 10-member group (median)", f"{big_med:.2f} ms vs {small_med:.2f} ms",
            "-", f"{ratio:.2f}x", "<= 2x", verdict(ratio <= 2))


def write_json(args, creates, large):
    """The medians report() prints, for the suite's summary table."""
    out = {"rounds": args.rounds, "duration": args.duration, "users": args.users, "groups": GROUPS,
           "creates": {}, "lookups": {}, "ref_users": large["ref_users"]}
    for (system, clients), runs in creates.items():
        out["creates"][f"{system} c{clients}"] = {"rps": median(runs, "rps"), "p99": median(runs, "p99")}
    for system, runs in large["lookups"].items():
        out["lookups"][system] = {"rps": median(runs, "rps"), "p99": median(runs, "p99")}
    for (kind, group), key in ((("patches", 0), "patch_100k"), (("patches", 1), "patch_10"),
                               (("checks", 0), "check_100k"), (("checks", 1), "check_10")):
        rows = large[kind][group]
        out[key] = {"median_ms": statistics.median(r[0] for r in rows),
                    "p99_ms": statistics.median(r[1] for r in rows)}
    pr = large["per_round"]
    out["startup_s"] = statistics.median(pr["startup_s"])
    out["rss_start_mib"] = statistics.median(pr["rss_start"])
    out["rss_after_mib"] = statistics.median(pr["rss_after"])
    out["populate_s"] = large["populate_s"]
    out["disk_mb"] = large["disk_mb"]
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


# --- setup -------------------------------------------------------------------------------------

def ensure_tools():
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: run scripts/deps.sh bench")
    kept = os.path.join(VENV, "requirements.txt")
    with open(REQUIREMENTS, "rb") as wanted:
        pinned = wanted.read()
    installed = os.path.exists(kept) and open(kept, "rb").read() == pinned
    if not (installed and os.path.exists(os.path.join(VENV, "bin", "scim2-server"))):
        log(f"creating {VENV} with {REQUIREMENTS} ...")
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "-r", REQUIREMENTS], check=True)
        shutil.copyfile(REQUIREMENTS, kept)
    common.build_release()
    subprocess.run(["cargo", "build", "--release", "-p", "portcullis-scim", "--example", "populate"],
                   cwd=ROOT, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--users", type=int, default=1_000_000, help="users in Portcullis' large directory")
    parser.add_argument("--json", help="also write the results as JSON to this file (for bench/suite.py)")
    args = parser.parse_args()
    needed = BIG_GROUP_MEMBERS + 2 * PATCH_N * args.rounds + CHECK_N
    if args.users < needed:
        parser.error(f"--users must be at least {needed:,} (100,000 in group0, fresh users for the PATCHes, "
                     f"and {CHECK_N} in no group)")

    ensure_tools()
    binary = common.binary()
    load_start = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="portcullis-scim-bench-")
    try:
        creates = measure_creates(args, binary, tmp)
        large = measure_large_directory(args, binary, tmp)
        report(args, creates, large, load_start)
        if args.json:
            write_json(args, creates, large)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
