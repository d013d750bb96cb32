#!/usr/bin/env python3
"""SCIM reads in a large directory, and what they leave to the requests Portcullis proxies.

Portcullis holds --users users (default 1,000,000, written by the `populate` example), runs one
worker thread (so a read held on it would hold up every request) and routes `app.test` to nginx
(`return 200`). Measured:

1. A page of `GET /Users` without a filter (100 users) starting at the first user, the middle
   one and the last page: what each page of an Okta import costs, wherever it starts. Median of
   --reads reads of each, one after the other on one keep-alive connection.
2. A search that no index answers (`name.familyName co "nobody"`: every user is read and matches
   nothing) while one keep-alive client sends proxied requests back to back until the search is
   answered: how long the search took, how many proxied requests were answered meanwhile, and
   their median and largest latency. A read held on the worker thread shows as one request that
   waited out the whole search.

A benchmark, not a test: it prints figures and fails only when something does not work (a
status other than 200). Servers listen on 127.0.0.1 on free ports; the data (about 570 MB for
1,000,000 users) is deleted at the end.

Usage: bench/scim_reads.py [--users N] [--reads N] [--json OUT]
"""
import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import scim  # noqa: E402
from common import ROOT, free_port, log, stop, wait_http  # noqa: E402

TOKEN = scim.TOKEN
PAGE = 100
SEARCH = 'name.familyName co "nobody"'


def build():
    common.build_release()
    subprocess.run(["cargo", "build", "--release", "-p", "portcullis-scim", "--example", "populate"],
                   cwd=ROOT, check=True, stdout=sys.stderr)


def start(tmp, data_dir, upstream_port):
    """Portcullis with one worker thread, SCIM on 127.0.0.1 and `app.test` routed upstream."""
    route = f'[[routes]]\nfrom = "http://app.test"\nto = ["http://127.0.0.1:{upstream_port}"]\n'
    return scim.Portcullis(common.binary(), tmp, data_dir, "reads", extra=route, threads=1)


def get(conn, path, headers):
    """(status, seconds) of one GET on `conn`, its body read."""
    began = time.monotonic()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status, time.monotonic() - began


def pages(port, users, reads):
    """Median ms of a page of `GET /Users` at each start."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    result = {}
    for start_index in (1, users // 2, max(1, users - PAGE + 1)):
        times = []
        for _ in range(reads):
            status, seconds = get(conn, f"/scim/v2/Users?startIndex={start_index}&count={PAGE}", auth)
            if status != 200:
                raise SystemExit(f"GET /Users from {start_index}: {status}")
            times.append(seconds * 1e3)
        result[start_index] = statistics.median(times)
        log(f"page of {PAGE} from {start_index:,}: {result[start_index]:.1f} ms")
    conn.close()
    return result


def search_while_proxying(port):
    """The unindexed search, and the proxied requests answered while it ran."""
    answered = {}

    def search():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        answered["search"] = get(conn, "/scim/v2/Users?filter=" + urllib.parse.quote(SEARCH),
                                 {"Authorization": f"Bearer {TOKEN}"})
        conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    get(conn, "/", {"Host": "app.test"})  # the upstream connection, made before
    searching = threading.Thread(target=search)
    searching.start()
    latencies = []
    # Bounded: the search is answered (or times out) within 600 s.
    while searching.is_alive():
        status, seconds = get(conn, "/", {"Host": "app.test"})
        if status != 200:
            raise SystemExit(f"a proxied request was answered {status}")
        latencies.append(seconds * 1e3)
    searching.join()
    conn.close()
    status, seconds = answered["search"]
    if status != 200:
        raise SystemExit(f"the search was answered {status}")
    return {"search_s": seconds, "proxied": len(latencies),
            "proxied_median_ms": statistics.median(latencies) if latencies else None,
            "proxied_max_ms": max(latencies, default=None)}


def run(args):
    build()
    tmp = tempfile.mkdtemp(prefix="portcullis-bench-scim-reads-")
    procs = []
    try:
        data_dir = os.path.join(tmp, "data")
        log(f"populating {args.users:,} users ...")
        subprocess.run([os.path.join(ROOT, "target", "release", "examples", "populate"), data_dir,
                        str(args.users), "100"], check=True, timeout=900, stdout=subprocess.DEVNULL)
        upstream_port = free_port()
        procs.append(common.start_upstream(tmp, upstream_port))
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        portcullis = start(tmp, data_dir, upstream_port)
        try:
            return {"users": args.users, "page": PAGE, "reads": args.reads,
                    "pages_ms": pages(portcullis.port, args.users, args.reads),
                    "search": search_while_proxying(portcullis.port)}
        finally:
            portcullis.stop()
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def report(result):
    print(f"## SCIM reads with {result['users']:,} users, one worker thread\n")
    print(f"| read | ms (median of {result['reads']}) |\n|---|---:|")
    for start_index, ms in result["pages_ms"].items():
        print(f"| `GET /Users?startIndex={start_index}&count={result['page']}` | {ms:.1f} |")
    s = result["search"]
    print(f"\nA search no index answers (`{SEARCH}`): {s['search_s']:.2f} s. Proxied requests answered "
          f"while it ran, by one client on the same worker: {s['proxied']:,}", end="")
    if s["proxied"]:
        print(f", median {s['proxied_median_ms']:.2f} ms, largest {s['proxied_max_ms']:.1f} ms.")
    else:
        print(".")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=5, help="reads of each page")
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
