#!/usr/bin/env python3
"""The console: how long its pages take at a million users, and whether it slows the proxy.

1. Page timings: `cargo bench -p portcullis --bench console` makes each page from the benchmark
   directory of the decision bench (1,000,000 users, 10,000 groups, 100,000 agents): the users
   list, a search that looks at every user, the 100,000-member group, "who can reach" two routes
   (a group minus a deny, and anyone signed in), a user's page. Target: under 100 ms each for
   the directory list and "who can reach".
2. Polling: one Portcullis (1 worker thread, the bench stack of `common.Stack`, with
   `[console]` open to `eng`), `wrk -t1 -c32` on the signed-in, group-authorized route, in
   rounds alternating between no console client and a client loading a console page (overview,
   users, who can reach, audit, in turn) every `--interval` seconds with alice's session.
   Portcullis is pinned to a core of its own and the upstream, wrk and the poller to the other,
   so what the pages cost comes out of the proxy's core. Target: requests/s with the poller at
   least 0.98x of without. Two figures speak to it:
   - requests/s, as the median of each round's ratio (the runs of a round are back to back).
     On a shared virtual machine this swings by 10% and more from one second to the next, far
     more than 2%, so the quartiles of the ratios are printed with it, and each round has a
     third run without the console: its ratio to the first shows what chance alone does;
   - the share of the proxy's core the console took: CPU time of Portcullis' threads other than
     the worker (the blocking pool that makes pages, and background tasks), less what they use
     without the poller, over all Portcullis ran in those rounds (`/proc/<pid>/task/*/schedstat`).
     Both parts are measured in the same seconds, so the machine's speed cancels out. With the
     proxy's core busy, requests/s can fall by at most that share, plus whatever the pages do to
     the worker's caches; the worker's own CPU per request is printed, with and without.

A benchmark, not a test: it never fails on noise, only when something does not work.

Usage: bench/console.py [--rounds N] [--duration S] [--interval S] [--users N] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import log, median, pin, quartiles, thread_cpu_ns, verdict, wrk  # noqa: E402

PAGE_TARGET_MS = 100.0
POLL_TARGET = 0.98
PAGES = ["", "users", "routes/1", "audit"]


def page_timings(users):
    """Runs the console page bench; returns its JSON."""
    env = {**os.environ, "PORTCULLIS_BENCH_USERS": str(users)}
    subprocess.run(["cargo", "bench", "-p", "portcullis", "--bench", "console"], cwd=common.ROOT, env=env,
                   check=True, stdout=sys.stderr)
    with open(os.path.join(common.ROOT, "target", "bench-results", "console.json")) as f:
        return json.load(f)


def console_get(stack, cookie, page):
    """Loads a console page as a browser does; returns the status."""
    req = urllib.request.Request(f"http://127.0.0.1:{stack.port}/.portcullis/console/{page}",
                                 headers={"Host": f"app.test:{stack.port}", "Accept": "text/html",
                                          "Cookie": f"portcullis_session={cookie}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        return r.status


class Poller(threading.Thread):
    """Loads a console page every `interval` seconds until stopped; counts and times them."""

    def __init__(self, stack, cookie, interval):
        super().__init__(daemon=True)
        self.stack, self.cookie, self.interval = stack, cookie, interval
        self.stop_event = threading.Event()
        self.times_ms, self.failures = [], 0

    def run(self):
        i = 0
        while not self.stop_event.is_set():
            page = PAGES[i % len(PAGES)]
            i += 1
            started = time.monotonic()
            try:
                if console_get(self.stack, self.cookie, page) != 200:
                    self.failures += 1
            except OSError:
                self.failures += 1
            self.times_ms.append((time.monotonic() - started) * 1e3)
            self.stop_event.wait(self.interval)


def polling(args):
    """Requests/s of the proxy without and with a console client, alternating rounds, and the
    CPU the console's pages took from the proxy's core."""
    tmp = tempfile.mkdtemp(prefix="portcullis-bench-console-")
    stack = common.Stack(tmp, threads=1, extra=f'[console]\nallow = {{ groups = ["{common.GROUP}"] }}\n')
    try:
        for i in range(args.directory_users):
            stack.scim.create_user(f"user{i}@bench.example")
        cookie = stack.sign_in()
        url = f"http://127.0.0.1:{stack.port}/"
        headers = ["Host: app.test", f"Cookie: portcullis_session={cookie}", "Accept: application/json"]
        # The poller must get pages, not refusals.
        for page in PAGES:
            status = console_get(stack, cookie, page)
            if status != 200:
                raise SystemExit(f"console page {page!r}: {status}")
        # Portcullis gets a core of its own; the upstream, wrk and the poller share the other.
        # Whatever the console's pages cost then comes out of the proxy's own core.
        pinned = len(os.sched_getaffinity(0)) >= 2
        if pinned:
            pin(stack.proc.pid, 1)
            pin(stack.procs[0].pid, 0)
            os.sched_setaffinity(0, {0})
        # "again" is a second run without the console: its ratio to "alone" shows how far
        # two runs differ when nothing differs but the moment.
        modes = ["alone", "again", "polled"]
        results, worker_ns, worker_total, other_ns = ({m: [] for m in modes} for _ in range(4))
        busy = []
        pages_ms, page_count = [], 0
        for round_no in range(args.rounds):
            order = modes[round_no % 3:] + modes[:round_no % 3]
            for mode in order:
                wrk(url, 1, args.connections, headers)  # warm-up
                poller = Poller(stack, cookie, args.interval) if mode == "polled" else None
                if poller:
                    poller.start()
                before = thread_cpu_ns(stack.proc.pid)
                started = time.monotonic()
                run = wrk(url, args.duration, args.connections, headers)
                elapsed = time.monotonic() - started
                after = thread_cpu_ns(stack.proc.pid)
                if poller:
                    poller.stop_event.set()
                    poller.join(timeout=15)
                    if poller.failures:
                        raise SystemExit(f"{poller.failures} console pages failed")
                    pages_ms += poller.times_ms
                    page_count += len(poller.times_ms)
                if run["non2xx"] or run["sockerr"]:
                    raise SystemExit(f"{mode}: {run['non2xx']} non-2xx, {run['sockerr']} socket errors")
                # wrk counts a redirect to sign in as an answer: the session must still be served.
                common.check_upstream_answers(url, headers)
                # The worker thread is the one that ran most; the rest are the blocking pool
                # (console pages) and background tasks.
                ran = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
                results[mode].append(run["rps"])
                worker_ns[mode].append(ran[0] / max(run["requests"], 1))
                worker_total[mode].append(ran[0])
                other_ns[mode].append(sum(ran[1:]))
                busy.append(sum(ran) / 1e9 / elapsed)
                log(f"round {round_no + 1}: {mode:7} {run['rps']:9.0f} req/s  worker {worker_ns[mode][-1]:.0f} ns "
                    f"per request, other threads {other_ns[mode][-1] / 1e6:.1f} ms")
    finally:
        stack.stop()
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    alone, polled = median(results["alone"]), median(results["polled"])
    # Each round's pair ran back to back: its ratio is not thrown by the machine's slower and
    # faster minutes, which swing requests/s far more than 2%.
    pairs = sorted(p / a for a, p in zip(results["alone"], results["polled"]))
    controls = sorted(p / a for a, p in zip(results["alone"], results["again"]))
    # What the console took from the proxy: the other threads' CPU with the poller, less what
    # they use without it, as a share of all Portcullis ran in those rounds.
    idle_other = median(other_ns["alone"] + other_ns["again"])
    taken = (max(sum(other_ns["polled"]) - idle_other * args.rounds, 0)
             / (sum(worker_total["polled"]) + sum(other_ns["polled"])))
    return {"rounds": args.rounds, "duration": args.duration, "interval_s": args.interval, "pinned": pinned,
            "directory_users": args.directory_users + 2, "alone_rps": alone, "polled_rps": polled,
            "ratio": median(pairs), "pair_ratios": pairs,
            "pair_quartiles": quartiles(pairs), "target_ratio": POLL_TARGET,
            "control_ratio": median(controls), "control_quartiles": quartiles(controls),
            "worker_ns_alone": median(worker_ns["alone"]), "worker_ns_polled": median(worker_ns["polled"]),
            "worker_ratio": median(p / a for a, p in zip(worker_ns["alone"], worker_ns["polled"])),
            "console_share": taken, "capacity_ratio": 1 - taken, "proxy_core_busy": median(busy),
            "pages_loaded": page_count, "page_ms_median": median(pages_ms) if pages_ms else None,
            "runs": results}


def report(result):
    pages = result["pages"] or {"users": 0, "groups": 0, "agents": 0, "rounds": 0, "pages": []}
    print(f"\nConsole pages at {pages['users']:,} users, {pages['groups']:,} groups, {pages['agents']:,} agents "
          f"(median of {pages['rounds']} makes each; `cargo bench -p portcullis --bench console`)\n")
    print("| page | median (ms) | slowest (ms) | target |")
    print("|---|---:|---:|---|")
    for p in pages["pages"]:
        targeted = p["page"].startswith(("users list", "who can reach"))
        target = f"< {PAGE_TARGET_MS:.0f} ms: {verdict(p['median_ms'] < PAGE_TARGET_MS)}" if targeted else "-"
        print(f"| {p['page']} | {p['median_ms']:.1f} | {p['slowest_ms']:.1f} | {target} |")
    poll = result["polling"]
    where = ("Portcullis pinned to a core of its own; the upstream, wrk and the poller on the other"
             if poll["pinned"] else "not pinned: fewer than two CPUs")
    print(f"\nThe proxy while a client loads a console page every {poll['interval_s']} s "
          f"(wrk -t1 -c{result['connections']} -d{poll['duration']}s, session + group policy, "
          f"{poll['rounds']} alternating rounds, {poll['directory_users']:,} users; {where}; "
          f"the proxy's core was {poll['proxy_core_busy']:.0%} busy):\n")
    q1, q3 = poll["pair_quartiles"]
    c1, c3 = poll["control_quartiles"]
    print("| figure | without the console | with it polled | ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| requests/s (ratio: median of each round's pair; quartiles {q1:.3f} to {q3:.3f}) | "
          f"{poll['alone_rps']:,.0f} | {poll['polled_rps']:,.0f} | {poll['ratio']:.3f} | "
          f">= {POLL_TARGET}: {verdict(poll['ratio'] >= POLL_TARGET)} |")
    print(f"| requests/s of a second run without the console, the same way (quartiles {c1:.3f} to {c3:.3f}): "
          f"how far two runs differ by chance | | | {poll['control_ratio']:.3f} | - |")
    print(f"| worker thread's CPU per request (ns) | {poll['worker_ns_alone']:,.0f} | "
          f"{poll['worker_ns_polled']:,.0f} | {poll['worker_ratio']:.3f} | - |")
    print(f"| the proxy's core left to requests (1 - the console's share of its CPU: "
          f"{poll['console_share']:.2%}) | 1 | {poll['capacity_ratio']:.4f} | {poll['capacity_ratio']:.4f} | "
          f">= {POLL_TARGET}: {verdict(poll['capacity_ratio'] >= POLL_TARGET)} |")
    print(f"\nConsole pages loaded: {poll['pages_loaded']}, median {poll['page_ms_median'] or 0:.1f} ms each.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=1_000_000, help="users in the page-timing directory")
    parser.add_argument("--directory-users", type=int, default=1000,
                        help="users provisioned into the polled Portcullis")
    parser.add_argument("--no-pages", action="store_true", help="only the polling part")
    parser.add_argument("--json")
    args = parser.parse_args()
    common.build_release()
    pages = None if args.no_pages else page_timings(args.users)
    result = {"pages": pages, "polling": polling(args), "connections": args.connections}
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
