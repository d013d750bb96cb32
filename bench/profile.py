#!/usr/bin/env python3
"""Where Portcullis spends its time on the slow paths: `perf record -g` of the Portcullis
process (1 worker thread) while wrk loads it, for the session+policy route and the machine
JWT route, summarized as kernel vs user share, share per binary/library, and top symbols
(self time).

Needs /usr/bin/perf and permission to profile (root, or kernel.perf_event_paranoid <= 1 for
kernel samples); without it, it says so and writes what it could. The perf.data files are
kept in target/bench-results/ for `perf report -i ...`.

Usage: bench/profile.py [--duration S] [--json OUT]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import ROOT, log, wrk  # noqa: E402

OUT_DIR = os.path.join(ROOT, "target", "bench-results")


def perf_available():
    perf = shutil.which("perf") or ("/usr/bin/perf" if os.path.exists("/usr/bin/perf") else None)
    if not perf:
        return None, "perf is not installed"
    probe = subprocess.run([perf, "record", "-o", "/dev/null", "-q", "--", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        try:
            with open("/proc/sys/kernel/perf_event_paranoid") as f:
                paranoid = f.read().strip()
        except OSError:
            paranoid = "?"
        return None, (f"perf record is not permitted here (kernel.perf_event_paranoid = {paranoid}): "
                      f"{probe.stderr.strip()[:200]}")
    return perf, None


def report_rows(perf, data, sort):
    """(percent, key) rows of `perf report --sort <sort>`, self time."""
    out = subprocess.run([perf, "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                          "--sort", sort, "--percent-limit", "0.3"],
                         capture_output=True, text=True, timeout=300).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*\S)\s*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2)))
    return rows


def summarize(perf, data):
    dsos = report_rows(perf, data, "dso")
    syms = report_rows(perf, data, "dso,sym")
    kernel = sum(p for p, d in dsos if "kernel" in d or d.startswith("[k"))
    total = sum(p for p, _ in dsos) or 100.0
    top = []
    for pct, key in syms[:20]:
        # "dso  [k] symbol" or "dso  [.] symbol"
        m = re.match(r"(\S+)\s+\[(.)\]\s+(.*)", key)
        dso, kind, sym = (m.group(1), m.group(2), m.group(3)) if m else ("?", "?", key)
        if len(sym) > 90:
            sym = sym[:87] + "..."
        top.append({"percent": pct, "dso": dso, "kernel": kind == "k", "symbol": sym})
    return {
        "kernel_percent": kernel,
        "user_percent": total - kernel,
        "dsos": [{"percent": p, "dso": d} for p, d in dsos[:8]],
        "top": top,
    }


def run(args):
    perf, why = perf_available()
    if not perf:
        log(why)
        return {"available": False, "reason": why}
    common.build_release()
    os.makedirs(OUT_DIR, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="portcullis-bench-profile-")
    stack = None
    result = {"available": True, "duration": args.duration, "profiles": {}}
    try:
        stack = common.Stack(tmp, threads=1)
        cookie = stack.sign_in()
        token = stack.machine_token()
        url = f"http://127.0.0.1:{stack.port}/"
        loads = {
            "session+policy": ["Host: app.test", f"Cookie: portcullis_session={cookie}", "Accept: application/json"],
            "machine JWT": ["Host: api.test", f"Authorization: Bearer {token}", "Accept: application/json"],
        }
        for name, headers in loads.items():
            data = os.path.join(OUT_DIR, f"perf-{name.split()[0].split('+')[0]}.data")
            wrk(url, 1, 32, headers)  # warm-up
            load = subprocess.Popen(["wrk", "-t1", "-c32", f"-d{args.duration + 2}s", "--latency"]
                                    + sum((["-H", h] for h in headers), []) + [url],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1)
            rec = subprocess.run([perf, "record", "-g", "-F", "999", "-p", str(stack.proc.pid), "-o", data,
                                  "--", "sleep", str(args.duration)],
                                 capture_output=True, text=True, timeout=args.duration + 120)
            out, _ = load.communicate(timeout=args.duration + 60)
            rps = re.search(r"Requests/sec:\s+([\d.]+)", out or "")
            if rec.returncode != 0:
                result["profiles"][name] = {"error": rec.stderr.strip()[-300:]}
                continue
            summary = summarize(perf, data)
            summary["rps_during_profile"] = float(rps.group(1)) if rps else None
            summary["perf_data"] = os.path.relpath(data, ROOT)
            result["profiles"][name] = summary
            log(f"profile {name}: kernel {summary['kernel_percent']:.1f}%, user {summary['user_percent']:.1f}%; "
                f"top: " + ", ".join(f"{t['symbol'][:40]} {t['percent']:.1f}%" for t in summary["top"][:5]))
    finally:
        if stack:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def report(result):
    if not result.get("available"):
        print(f"\nno profile: {result.get('reason')}")
        return
    for name, p in result["profiles"].items():
        if "error" in p:
            print(f"\n{name}: perf record failed: {p['error']}")
            continue
        print(f"\n### {name}: kernel {p['kernel_percent']:.1f}%, user {p['user_percent']:.1f}% "
              f"(wrk -c32 at {p['rps_during_profile'] or 0:,.0f} req/s while profiled)\n")
        print("| self % | where | symbol |")
        print("|---:|---|---|")
        for t in p["top"][:15]:
            print(f"| {t['percent']:.1f} | {t['dso']} | `{t['symbol']}` |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds of perf record per path")
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
