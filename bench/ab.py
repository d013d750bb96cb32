#!/usr/bin/env python3
"""Two builds side by side on one core: did a change make a request cheaper, and by how much?

A change to Portcullis (or to how it is built) moves its CPU per request by a few percent; on a
shared virtual machine two runs of `bench/floor.py` minutes apart differ by as much. Here the two
builds run at the same time instead, as `bench/floor.py` runs its systems: each build's bare
pingora (`proxy/examples/pingora_floor.rs`) and its Portcullis on one route, four processes
with one worker thread each, all pinned to one CPU, each loaded by its own `wrk -t1 -c32` at
the same moment (the `wrk`s and the upstream, nginx `return 200`, on the other CPU), each
process's CPU time from `/proc/<pid>/task/*/schedstat` over the requests its `wrk` completed.
Whatever the machine does to that CPU in a round, it does to both builds, so the ratio B/A of
each round is steady where the µs are not. Printed: each round's figures, and the median of the
rounds' ratios B/A for Portcullis and for bare pingora (which moves only when pingora itself is
built differently: a compiler setting, a dependency).

The route: `session` (alice's signed-in, group-authorized request, as in `bench/floor.py`) or
`plain` (the public route, the same request).

A build is a Cargo target directory holding `release/portcullis` and
`release/examples/pingora_floor`, e.g. for a commit and its parent:

    git worktree add /tmp/a HEAD~1 && (cd /tmp/a && CARGO_TARGET_DIR=/tmp/target-a \\
        cargo build --release -p portcullis --bin portcullis --example pingora_floor)
    (same for HEAD into /tmp/target-b)
    bench/ab.py /tmp/target-a /tmp/target-b

A benchmark, not a test: it fails only when something does not work.

Usage: bench/ab.py A_TARGET_DIR B_TARGET_DIR [--route session|plain] [--rounds N] [--duration S]
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import floor  # noqa: E402
from common import free_port, log, median, pin, quartiles, wait_http, wrk  # noqa: E402

HOSTS = {"session": "app.test", "plain": "plain.test"}


def programs(target_dir):
    """(portcullis, pingora_floor) of a build; exits if one is missing."""
    found = (os.path.join(target_dir, "release", "portcullis"),
             os.path.join(target_dir, "release", "examples", "pingora_floor"))
    for path in found:
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{path} is missing: build it (see `bench/ab.py --help`)")
    return found


def run(args):
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: one for the systems, one for the load and the upstream")
    builds = {"A": programs(args.a), "B": programs(args.b)}
    tmp = tempfile.mkdtemp(prefix="portcullis-bench-ab-")
    upstream_port = free_port()
    procs, stacks, systems = [], [], {}
    try:
        procs.append(common.start_upstream(tmp, upstream_port))
        upstream = procs[-1]
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        for tag, (portcullis, bare) in builds.items():
            port = free_port()
            procs.append(subprocess.Popen([bare, f"127.0.0.1:{port}", f"127.0.0.1:{upstream_port}"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{port}/")
            path = os.path.join(tmp, tag)
            os.makedirs(path)
            stack = common.Stack(path, threads=1, upstream_port=upstream_port, program=portcullis)
            stacks.append(stack)
            same = [f"Cookie: portcullis_session={stack.sign_in()}", "Accept: application/json"]
            systems[f"bare pingora {tag}"] = (procs[-1].pid, f"http://127.0.0.1:{port}/", ["Host: app.test", *same])
            systems[f"portcullis {tag}"] = (stack.proc.pid, f"http://127.0.0.1:{stack.port}/",
                                            [f"Host: {HOSTS[args.route]}", *same])
        for pid, _, _ in systems.values():
            pin(pid, 1)
        pin(upstream.pid, 0)
        # The wrk processes started from here inherit CPU 0.
        os.sched_setaffinity(0, {0})

        def load(duration):
            with concurrent.futures.ThreadPoolExecutor(len(systems)) as pool:
                futures = {name: pool.submit(wrk, url, duration, args.connections, headers)
                           for name, (_, url, headers) in systems.items()}
                return {name: f.result() for name, f in futures.items()}

        load(2)  # warm-up: connection pools, caches, the session in memory
        results = {name: [] for name in systems}
        for round_no in range(args.rounds):
            before = {name: floor.process_cpu_ns(pid) for name, (pid, _, _) in systems.items()}
            runs = load(args.duration)
            after = {name: floor.process_cpu_ns(pid) for name, (pid, _, _) in systems.items()}
            for name, run_ in runs.items():
                if run_["non2xx"] or run_["sockerr"]:
                    raise SystemExit(f"{name}: {run_['non2xx']} non-2xx, {run_['sockerr']} socket errors")
                # wrk counts a redirect to sign in as an answer: each system must still serve
                # the route from its upstream.
                _, url, headers = systems[name]
                common.check_upstream_answers(url, headers)
                results[name].append((after[name] - before[name]) / 1e3 / max(run_["requests"], 1))
            log(f"round {round_no + 1}: " + "  ".join(f"{name} {results[name][-1]:.2f} µs" for name in systems))
    finally:
        for stack in stacks:
            stack.stop()
        for p in procs:
            common.stop(p)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        shutil.rmtree(tmp, ignore_errors=True)

    def ratios(system):
        return sorted(b / a for a, b in zip(results[f"{system} A"], results[f"{system} B"]))

    return {"a": args.a, "b": args.b, "route": args.route, "rounds": args.rounds, "duration": args.duration,
            "cpu_us": {name: median(runs) for name, runs in results.items()}, "runs": results,
            "b_over_a": {system: {"median": median(ratios(system)), "quartiles": quartiles(ratios(system))}
                         for system in ("portcullis", "bare pingora")}}


def report(result):
    print(f"\nA = {result['a']}, B = {result['b']}; Portcullis' {result['route']} route; side by side on one "
          f"core, {result['rounds']} rounds of {result['duration']} s. CPU per request (µs), median of the rounds:\n")
    print("| system | A | B | B / A, median of the rounds (quartiles) |")
    print("|---|---:|---:|---:|")
    for system in ("portcullis", "bare pingora"):
        ratio = result["b_over_a"][system]
        low, high = ratio["quartiles"]
        print(f"| {system} | {result['cpu_us'][f'{system} A']:.2f} | {result['cpu_us'][f'{system} B']:.2f} | "
              f"{ratio['median']:.3f} ({low:.3f} to {high:.3f}) |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="build A: a Cargo target directory")
    parser.add_argument("b", help="build B: a Cargo target directory")
    parser.add_argument("--route", choices=sorted(HOSTS), default="session")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    common.run_cli(parser, run, report)


if __name__ == "__main__":
    main()
