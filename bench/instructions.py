#!/usr/bin/env python3
"""Instructions per request: Portcullis against bare pingora, counted, not timed.

`bench/floor.py` times CPU per request side by side; on a shared virtual machine its differences
still move by a µs or more between rounds. Instructions executed hardly do: this part runs each
system under valgrind's callgrind, sends the same N keep-alive requests to each, one after the
other (after a warm-up, not counted), and counts the instructions the thread serving them executed
in user space. The systems and the requests are `bench/floor.py`'s: bare pingora, the same
pingora sending Portcullis' headers for alice (captured from Portcullis) with its timeouts,
Portcullis on its public route and on the signed-in, group-authorized route.

What it does not count: time in the kernel (the sockets: about half of every system's CPU here,
and the same syscalls for all), and how fast each instruction runs (cache misses, branches).
Under valgrind the CPU has no SHA extensions, so the SHA-256 of the session cookie is counted as
done in software: about 3,500 instructions that the `sha2` crate otherwise does with the CPU's
SHA extensions. A large memcpy (glibc's `rep movsb`) is counted as one instruction per byte,
where the CPU copies 32 bytes or more per cycle; the table says how much of each count is
copying (most of it pingora's copy of each request's future, about 13 kB). Between runs and
builds a total moves by up to about 700 instructions per request (under 1%), also where the
code did not change; the functions' own counts move less. Treat them as where the work is and
how it changes from commit to commit; CPU time stays `bench/floor.py`'s.

It also lists the Portcullis functions that cost most per signed-in request, callees included,
and keeps each system's data in target/bench-results/callgrind-<system>.out (`callgrind_annotate`).

Usage: bench/instructions.py [--requests N] [--json OUT]
"""
import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import floor  # noqa: E402
from common import free_port, log, wait_http  # noqa: E402

WARM_UP = 300
# Where each system's callgrind data is kept, for `callgrind_annotate`.
RESULTS = os.path.join(common.ROOT, "target", "bench-results")
VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
SESSION = "portcullis session+policy"


def callgrind(out):
    return [*VALGRIND, f"--callgrind-out-file={out}"]


def drive(port, host, cookie, n):
    """n sequential requests on one keep-alive connection; each must be answered 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Host": host, "Cookie": f"portcullis_session={cookie}", "Accept": "application/json"}
    try:
        for _ in range(n):
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{host}: answered {response.status}")
    finally:
        conn.close()


def control(*args):
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def count(pid, out, port, host, cookie, requests):
    """(dump, instructions) of the thread that served `requests` requests (after a warm-up) in
    `pid`: the one that executed the most instructions meanwhile. The other threads' work (pingora's timer tick,
    Portcullis' background services) is periodic: it grows with the wall time valgrind takes,
    not with the requests, and no request is handed to them."""
    drive(port, host, cookie, WARM_UP)
    control("--instr=on", str(pid))
    drive(port, host, cookie, requests)
    before = set(os.listdir(os.path.dirname(out)))
    control("--dump", str(pid))
    control("--instr=off", str(pid))
    # One file per thread; callgrind_control may answer before they are all written.
    deadline, seen = time.monotonic() + 300, None
    while True:
        dumps = sorted(os.path.join(os.path.dirname(out), f) for f in set(os.listdir(os.path.dirname(out))) - before
                       if f.startswith(os.path.basename(out) + "."))
        if dumps and dumps == seen:
            return max(((dump, totals(dump)) for dump in dumps), key=lambda counted: counted[1])
        if time.monotonic() > deadline:
            raise SystemExit(f"callgrind wrote no dump for pid {pid}")
        seen = dumps
        time.sleep(1)


def totals(dump):
    """The instructions counted in `dump`, once callgrind has finished writing it (its last line
    says `totals:`; callgrind_control may answer before that)."""
    deadline = time.monotonic() + 300
    while True:
        with open(dump) as f:
            text = f.read()
        total = re.search(r"^totals:\s*(\d+)", text, re.M)
        if total:
            return int(total.group(1))
        if time.monotonic() > deadline:
            raise SystemExit(f"callgrind never finished writing {dump}")
        time.sleep(0.2)


def copies(dump):
    """The instructions `dump` counts in libc's memcpy/memmove. Valgrind counts a large copy
    (glibc's `rep movsb`, used above a few kB) as one instruction per byte, where the CPU moves
    32 bytes or more per cycle: these are the counts least like time."""
    text = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=no", "--threshold=100", dump],
                          capture_output=True, text=True, timeout=600).stdout
    return sum(int(m.group(1).replace(",", "")) for m in
               re.finditer(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+\S*(?:memcpy|memmove)\S*:", text, re.M))


def portcullis_functions(dump, requests, top=14):
    """Portcullis' own functions by instructions per request, callees included, as callgrind
    lists them: a function partly inlined into another is listed once per source file of its
    code, each with the calls made from there."""
    text = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=yes", "--threshold=100", dump],
                          capture_output=True, text=True, timeout=600).stdout
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+(\S*?\.rs):(.*?)(?:\s+\([\d,]+x\))?\s*(?:\[[^\]]*\])?\s*$", line)
        if m and m.group(3).strip().startswith(("portcullis", "<portcullis")):
            source = "/".join(m.group(2).split("/")[-2:])
            rows.append((f"{m.group(3).strip()} ({source})", int(m.group(1).replace(",", "")) / requests))
    return sorted(rows, key=lambda row: -row[1])[:top]


def run(args):
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (scripts/deps.sh bench installs valgrind)")
    floor_bin = floor.build()
    tmp = tempfile.mkdtemp(prefix="portcullis-bench-instructions-")
    outs = os.path.join(tmp, "callgrind")
    os.makedirs(outs)
    os.makedirs(RESULTS, exist_ok=True)
    upstream_port, floor_port, headers_port = free_port(), free_port(), free_port()
    procs, stack = [], None
    capture = floor.Capture()
    try:
        procs.append(common.start_upstream(tmp, upstream_port))
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        os.makedirs(os.path.join(tmp, "portcullis"))
        stack = common.Stack(os.path.join(tmp, "portcullis"), threads=1, upstream_port=upstream_port,
                             extra=floor.capture_route(capture),
                             prefix=callgrind(os.path.join(outs, "portcullis")))
        cookie = stack.sign_in()
        same = [f"Cookie: portcullis_session={cookie}", "Accept: application/json"]
        # Alice's session on the capture's host: one begun on app.test is good there alone.
        captured = [f"Cookie: portcullis_session={stack.sign_in(host=floor.CAPTURE_HOST)}", same[1]]
        added = capture.added(stack.port, [f"Host: {floor.CAPTURE_HOST}", *captured])
        headers_file = os.path.join(tmp, "portcullis-headers")
        with open(headers_file, "w") as f:
            f.writelines(f"{name}: {value}\n" for name, value in added)
        for name, port, extra_args in (("floor", floor_port, []), ("headers", headers_port, [headers_file])):
            procs.append(subprocess.Popen([*callgrind(os.path.join(outs, name)), floor_bin, f"127.0.0.1:{port}",
                                           f"127.0.0.1:{upstream_port}", *extra_args],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{port}/", timeout=600)
        systems = [
            ("bare pingora", procs[1].pid, "floor", floor_port, "app.test"),
            (floor.HEADERS_FLOOR, procs[2].pid, "headers", headers_port, "app.test"),
            ("portcullis plain", stack.proc.pid, "portcullis", stack.port, "plain.test"),
            (SESSION, stack.proc.pid, "portcullis", stack.port, "app.test"),
        ]
        results, copied, functions = {}, {}, []
        for name, pid, out, port, host in systems:
            dump, instructions = count(pid, os.path.join(outs, out), port, host, cookie, args.requests)
            results[name] = instructions / args.requests
            copied[name] = copies(dump) / args.requests
            kept = os.path.join(RESULTS, f"callgrind-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.out")
            shutil.copyfile(dump, kept)
            log(f"{name}: {results[name]:,.0f} instructions per request")
            if name == SESSION:
                functions = portcullis_functions(dump, args.requests)
    finally:
        capture.stop()
        if stack:
            stack.stop()
        for p in procs:
            common.stop(p, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"requests": args.requests, "per_request": results, "copies": copied, "functions": functions,
            "data": RESULTS}


def report(result):
    per = result["per_request"]
    floor_ = per["bare pingora"]
    print(f"\nInstructions executed in user space per request by the thread serving them (callgrind), over "
          f"{result['requests']:,} keep-alive requests to each after a warm-up of {WARM_UP}:\n")
    print("| system | instructions per request | above bare pingora | x bare pingora | of which in memcpy |")
    print("|---|---:|---:|---:|---:|")
    for name, n in per.items():
        above = "-" if name == "bare pingora" else f"+{n - floor_:,.0f}"
        print(f"| {name} | {n:,.0f} | {above} | {n / floor_:.3f} | {result['copies'][name]:,.0f} |")
    print("\n(Valgrind counts a large memcpy as one instruction per byte copied; the CPU copies 32 bytes "
          "or more per cycle. Most of these are pingora's copy of each request's future.)")
    own = per[SESSION] - per[floor.HEADERS_FLOOR]
    print(f"\nPortcullis' own work on the session route, above `{floor.HEADERS_FLOOR}`: "
          f"{own:+,.0f} instructions per request ({own / per[floor.HEADERS_FLOOR]:+.1%}).")
    if result["functions"]:
        print("\nPortcullis' costliest functions on the session route, instructions per request, callees "
              "included (a function inside another is counted in both; code inlined from another source "
              "file is listed under that file):\n")
        print("| function | instructions |")
        print("|---|---:|")
        for name, n in result["functions"]:
            print(f"| `{name[:140]}` | {n:,.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
