#!/usr/bin/env python3
"""Plain reverse-proxy throughput: Portcullis vs nginx, side by side, same upstream.

Both proxies get one worker thread and keep-alive connections to the same upstream (an nginx
`return 200` with a 20-byte body). Load is `wrk -t1 -c32 -d6s --latency`, alternating the two
proxies for several rounds; the medians and the ratio are printed. A benchmark, not a test: it
never fails on noise.

Usage: bench/proxy.py [--rounds N] [--duration S] [--connections C]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def nginx_conf(tmp, body):
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-%s.pid;
error_log {tmp}/nginx-%s-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body-%s;
  proxy_temp_path {tmp}/proxy-%s;
  fastcgi_temp_path {tmp}/fcgi-%s;
  uwsgi_temp_path {tmp}/uwsgi-%s;
  scgi_temp_path {tmp}/scgi-%s;
  {body}
}}
"""


def start_nginx(tmp, name, body):
    conf = nginx_conf(tmp, body).replace("%s", name)
    path = os.path.join(tmp, f"nginx-{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    return subprocess.Popen(["nginx", "-c", path, "-p", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk(url, duration, connections):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99.group(1)) * scale, int(errors.group(1)) if errors else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    for tool in ("nginx", "wrk", "cargo"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is missing: run scripts/deps.sh bench")
    os.environ["PATH"] += ":/usr/sbin"
    subprocess.run(["cargo", "build", "--release", "-p", "portcullis"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "portcullis")

    tmp = tempfile.mkdtemp(prefix="portcullis-bench-")
    upstream_port, nginx_port, portcullis_port = free_port(), free_port(), free_port()
    procs = []
    try:
        procs.append(start_nginx(tmp, "upstream", f"""
  server {{ listen 127.0.0.1:{upstream_port}; keepalive_requests 1000000;
    location / {{ return 200 "hello from upstream\\n"; }} }}"""))
        procs.append(start_nginx(tmp, "proxy", f"""
  upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{nginx_port}; keepalive_requests 1000000;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr; }} }}"""))
        config = os.path.join(tmp, "portcullis.toml")
        with open(config, "w") as f:
            f.write(f"""
data_dir = "{tmp}/data"
[log]
level = "warn"
[server]
threads = 1
[[listeners]]
address = "127.0.0.1:{portcullis_port}"
[[routes]]
from = "http://127.0.0.1"
to = ["http://127.0.0.1:{upstream_port}"]
""")
        procs.append(subprocess.Popen([binary, "serve", "--config", config],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        targets = {
            "upstream alone": f"http://127.0.0.1:{upstream_port}/",
            "nginx proxy": f"http://127.0.0.1:{nginx_port}/",
            "portcullis proxy": f"http://127.0.0.1:{portcullis_port}/",
        }
        for url in targets.values():
            wait_http(url)
        results = {name: [] for name in targets}
        for round_no in range(args.rounds):
            for name, url in targets.items():
                wrk(url, 1, args.connections)  # warm-up: fill connection pools
                rps, p99, errors = wrk(url, args.duration, args.connections)
                results[name].append((rps, p99, errors))
                print(f"round {round_no + 1}: {name:18} {rps:10.0f} req/s  p99 {p99:6.2f} ms  non-2xx {errors}",
                      file=sys.stderr)

        print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s, median of {args.rounds} rounds, "
              f"1 worker each, {os.cpu_count()} cores\n")
        print("| system | requests/s | p99 (ms) | non-2xx |")
        print("|---|---:|---:|---:|")
        medians = {}
        for name, runs in results.items():
            rps = statistics.median(r[0] for r in runs)
            p99 = statistics.median(r[1] for r in runs)
            medians[name] = (rps, p99)
            print(f"| {name} | {rps:,.0f} | {p99:.2f} | {sum(r[2] for r in runs)} |")
        ratio = medians["portcullis proxy"][0] / medians["nginx proxy"][0]
        verdict = "met" if ratio >= 0.9 else "not met"
        print(f"\nPortcullis / nginx throughput: {ratio:.2f}x (target >= 0.9x: {verdict})")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
