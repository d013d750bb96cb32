#!/usr/bin/env python3
"""Proxy throughput and latency: Portcullis vs nginx, side by side, same upstream.

Systems (each with one worker thread, keep-alive to the same upstream, an nginx `return 200`
with a 20-byte body):

- upstream alone (no proxy);
- nginx 1 worker as a plain reverse proxy (the reference);
- Portcullis as a plain proxy (a public route, `Host: plain.test`);
- Portcullis with a signed-in session and a group policy (`Host: app.test`, the session cookie
  of alice, who signed in at the test IdP through the real authorization-code flow and is
  provisioned over SCIM into the allowed group `eng`);
- Portcullis with a machine JWT (`Host: api.test`, `Authorization: Bearer` a client-credentials
  token from the test IdP; the service account is provisioned into `eng`);
- bare pingora (`proxy/examples/pingora_floor.rs`: a pingora proxy with no filters and no
  modules, the same runtime settings and allocator): the floor under Portcullis, showing how
  much of the gap to nginx is pingora's own;
- Apache 2.4 with mod_auth_openidc, the identity-aware peer (one worker process, event MPM):
  plain (`/plain`, no authentication) and with a session (alice signed in at the same test IdP
  through the same authorization-code flow; sessions in shared memory; `Require claim
  groups:eng`, the equivalent of the Portcullis group policy);
- Portcullis with `threads = 2` (a second process, same routes), session + group policy: how
  throughput grows with a second core on a machine whose two cores wrk and the upstream share;
- TLS termination with keep-alive, each proxy plain: nginx (OpenSSL) and Portcullis (rustls) over
  HTTPS/1.1 with wrk, and over HTTP/2 with h2load (one thread, one stream per connection at a
  time, like wrk; h2load reports a mean latency, not percentiles).

Each system's CPU time per request (user + system, from /proc, the proxy process and its
children only) is the headline, printed first: on a 2-core machine shared with wrk and the
upstream, requests/s swing between runs far more than CPU per request does. Portcullis rows
also show their ratio to Apache's matching row (CPU per request: how many times less).

The three Portcullis variants are routes of one process (1 worker thread). Load is
`wrk -t1 -c32 -d6s --latency`, the systems alternating within each round (order rotated every
round); medians of the rounds and ratios to nginx are printed. A benchmark, not a test: it never
fails on noise, only when something does not work (a non-2xx answer, a failed sign-in).

Usage: bench/proxy.py [--rounds N] [--duration S] [--connections C] [--json OUT]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import free_port, log, median, start_nginx_proxy, start_upstream, verdict, wait_http, wrk  # noqa: E402

TARGET = 0.9  # issue 5: authenticated requests/s >= 0.9x nginx as a plain proxy


def cpu_seconds(pid):
    """User and system CPU seconds of a process and its children (nginx's worker)."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for member in common.process_tree(pid):
        with open(f"/proc/{member}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]) / ticks, system + int(fields[12]) / ticks
    return user, system


def systems(stack, upstream_port, nginx_port, floor_port, cookie, token, apache_port, apache_cookie,
            nginx_tls_port, stack2, cookie2):
    """name -> (url, extra headers[, load tool: wrk unless h2load])."""
    portcullis = f"http://127.0.0.1:{stack.port}/"
    apache = f"http://127.0.0.1:{apache_port}"
    portcullis_tls = f"https://127.0.0.1:{stack.tls_port}/"
    nginx_tls = f"https://127.0.0.1:{nginx_tls_port}/"
    return {
        "upstream alone": (f"http://127.0.0.1:{upstream_port}/", []),
        "nginx proxy": (f"http://127.0.0.1:{nginx_port}/", []),
        "portcullis plain": (portcullis, ["Host: plain.test"]),
        "portcullis session+policy": (portcullis, ["Host: app.test", f"Cookie: portcullis_session={cookie}",
                                                   "Accept: application/json"]),
        "portcullis machine JWT": (portcullis, ["Host: api.test", f"Authorization: Bearer {token}",
                                                "Accept: application/json"]),
        "bare pingora": (f"http://127.0.0.1:{floor_port}/", []),
        "apache+openidc plain": (f"{apache}/plain", []),
        "apache+openidc session+claim": (f"{apache}/", [f"Cookie: mod_auth_openidc_session={apache_cookie}"]),
        "portcullis session+policy, 2 threads": (f"http://127.0.0.1:{stack2.port}/", [
            "Host: app.test", f"Cookie: portcullis_session={cookie2}", "Accept: application/json"]),
        "nginx https proxy": (nginx_tls, ["Host: plain.test"]),
        "portcullis https plain": (portcullis_tls, ["Host: plain.test"]),
        "nginx http2 proxy": (nginx_tls, ["Host: plain.test"], common.h2load),
        "portcullis http2 plain": (portcullis_tls, ["Host: plain.test"], common.h2load),
    }

def nginx_peer(name):
    """The nginx row a row's requests/s is compared with: the one over the same protocol (HTTPS,
    HTTP/2), else plain HTTP."""
    for protocol in ("https", "http2"):
        if f" {protocol} " in f" {name} ":
            return f"nginx {protocol} proxy"
    return "nginx proxy"


def has_target(name):
    """Whether a row is held to the nginx target: Portcullis' one-worker rows (the two-thread
    row has no two-worker nginx to be compared with)."""
    return name.startswith("portcullis") and not name.endswith("2 threads")


# Each Portcullis row and the Apache row it is compared with.
APACHE_PEER = {"portcullis plain": "apache+openidc plain",
               "portcullis session+policy": "apache+openidc session+claim"}


def run(args):
    for tool in ("wrk", "node", "cargo"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run scripts/deps.sh bench")
    common.nginx_bin()
    common.apache_bin()
    common.build_release(floor=True)
    floor_bin = common.floor_binary()

    tmp = tempfile.mkdtemp(prefix="portcullis-bench-proxy-")
    upstream_port, nginx_port, floor_port, apache_port = free_port(), free_port(), free_port(), free_port()
    nginx_tls_port = free_port()
    apache_secret = common.random_secret(32)
    procs, stack, stack2 = [], None, None
    try:
        procs.append(start_upstream(tmp, upstream_port))
        procs.append(start_nginx_proxy(tmp, nginx_port, upstream_port))
        nginx_proxy = procs[-1]
        cert, key = common.make_tls_cert(tmp)
        procs.append(common.start_nginx_tls_proxy(tmp, nginx_tls_port, upstream_port, cert, key))
        nginx_tls = procs[-1]
        procs.append(subprocess.Popen([floor_bin, f"127.0.0.1:{floor_port}", f"127.0.0.1:{upstream_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        floor = procs[-1]
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        wait_http(f"http://127.0.0.1:{nginx_port}/")
        wait_http(f"http://127.0.0.1:{floor_port}/")
        stack = common.Stack(tmp, threads=1, upstream_port=upstream_port, apache=(apache_port, apache_secret),
                             tls=(cert, key))
        cookie = stack.sign_in()
        token = stack.machine_token()
        procs.append(common.start_apache_oidc(tmp, apache_port, upstream_port, stack.idp.issuer, apache_secret))
        apache = procs[-1]
        wait_http(f"http://127.0.0.1:{apache_port}/plain")
        apache_cookie = common.sign_in(f"http://127.0.0.1:{apache_port}/", common.ALICE["email"],
                                       common.ALICE["password"], cookie_name="mod_auth_openidc_session")
        tmp2 = os.path.join(tmp, "two-threads")
        os.makedirs(tmp2)
        stack2 = common.Stack(tmp2, threads=2, upstream_port=upstream_port)
        cookie2 = stack2.sign_in()
        targets = systems(stack, upstream_port, nginx_port, floor_port, cookie, token, apache_port, apache_cookie,
                          nginx_tls_port, stack2, cookie2)
        pids = {"upstream alone": procs[0].pid, "nginx proxy": nginx_proxy.pid, "bare pingora": floor.pid,
                "apache+openidc plain": apache.pid, "apache+openidc session+claim": apache.pid,
                "nginx https proxy": nginx_tls.pid, "nginx http2 proxy": nginx_tls.pid,
                "portcullis session+policy, 2 threads": stack2.proc.pid}
        for url, headers, *_ in targets.values():
            common.check_upstream_answers(url, headers)

        results = {name: [] for name in targets}
        names = list(targets)
        for round_no in range(args.rounds):
            # Rotated, and reversed every other round, so that no system always runs just
            # before another (a drift within a round would then move their ratio one way).
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            if round_no % 2:
                order.reverse()
            for name in order:
                url, headers, *tool = targets[name]
                load = tool[0] if tool else wrk
                load(url, 1, args.connections, headers)  # warm-up: fill connection pools and caches
                pid = pids.get(name, stack.proc.pid)
                before = cpu_seconds(pid)
                run_ = load(url, args.duration, args.connections, headers)
                after = cpu_seconds(pid)
                requests = max(run_["rps"] * args.duration, 1)
                run_["user_us"] = (after[0] - before[0]) / requests * 1e6
                run_["sys_us"] = (after[1] - before[1]) / requests * 1e6
                results[name].append(run_)
                log(f"round {round_no + 1}: {name:28} {run_['rps']:9.0f} req/s  "
                    f"CPU {run_['user_us'] + run_['sys_us']:6.1f} µs/req  "
                    f"non-2xx {run_['non2xx']}  socket errors {run_['sockerr']}")
                if run_["non2xx"] or run_["sockerr"]:
                    # A refused or failed request means the measurement is not of what it claims.
                    raise SystemExit(f"{name}: {run_['non2xx']} non-2xx and {run_['sockerr']} socket errors; "
                                     f"Portcullis log:\n{stack.log_tail()}")
                # wrk counts a redirect as an answer: a session lost during the window (sent to
                # sign in, cheaply) would pass for served requests. It would still be lost now.
                common.check_upstream_answers(url, headers)
    finally:
        if stack2:
            stack2.stop()
        if stack:
            stack.stop()
        for p in procs:
            common.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    rps_of = {name: median(r["rps"] for r in runs) for name, runs in results.items()}
    for name, runs in results.items():
        rps = median(r["rps"] for r in runs)
        latency = {key: (median(r[key] for r in runs) if runs[0].get(key) is not None else None)
                   for key in ("p50", "p99", "mean_ms")}
        summary[name] = {
            "rps": rps, **latency,
            "user_us": median(r["user_us"] for r in runs), "sys_us": median(r["sys_us"] for r in runs),
            "cpu_us": median(r["user_us"] + r["sys_us"] for r in runs),
            "nginx_peer": nginx_peer(name), "ratio_to_nginx": rps / rps_of[nginx_peer(name)], "runs": runs,
        }
    for name, peer in APACHE_PEER.items():
        # How many times less CPU per request Portcullis spends than Apache on the same work.
        summary[name]["cpu_vs_apache"] = summary[peer]["cpu_us"] / max(summary[name]["cpu_us"], 1e-9)
    return {"rounds": args.rounds, "duration": args.duration, "connections": args.connections,
            "threads": 1, "target_ratio": TARGET, "systems": summary}


def report(result):
    print(f"\nwrk -t1 -c{result['connections']} -d{result['duration']}s, median of {result['rounds']} rounds, "
          f"1 worker thread each, {os.cpu_count()} cores; Portcullis and bare pingora: {common.build_said()}\n")
    print("| system | CPU/request (µs) | user + sys | requests/s | p50 (ms) | p99 (ms) | / its nginx's req/s "
          "| Apache's CPU / ours | target |")
    ms = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, s in result["systems"].items():
        target = "-"
        if has_target(name):
            target = f">= {TARGET}x {s['nginx_peer']}: {verdict(s['ratio_to_nginx'] >= TARGET)}"
        vs_apache = f"{s['cpu_vs_apache']:.1f}x" if "cpu_vs_apache" in s else "-"
        p50 = ms(s["p50"]) if s["p50"] is not None else f"mean {ms(s.get('mean_ms'))}"
        print(f"| {name} | {s['cpu_us']:.1f} | {s['user_us']:.1f} + {s['sys_us']:.1f} | {s['rps']:,.0f} | "
              f"{p50} | {ms(s['p99'])} | {s['ratio_to_nginx']:.2f}x | {vs_apache} | {target} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
