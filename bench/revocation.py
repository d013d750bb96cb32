#!/usr/bin/env python3
"""Revocation latency under load: how soon after a SCIM write is answered are requests refused,
and is any request sent after the answer still allowed (the promise: none).

One Portcullis (2 worker threads) with sign-in at the test IdP and SCIM on the same process
(see common.Stack). Per scenario and round:

1. set up: alice active, in `eng`, freshly signed in (a session cookie), or a fresh
   client-credentials JWT for the service account `bench-agent`;
2. --workers threads send GETs continuously on keep-alive connections (bounded: at most
   --max-requests per thread and --max-seconds), each request timestamped when it is sent and
   when its answer arrives (time.monotonic, one clock for all threads);
3. once 200 requests were allowed, one SCIM request revokes access; the instant its answer
   arrived is noted; the load continues until 400 requests were sent after it or 3 s passed.

Scenarios: deactivate the user (session), remove the user from the group (session),
deactivate the service account (machine JWT). Figures per scenario, medians over rounds:

- SCIM answer -> first refusal: from the SCIM answer's arrival to the arrival of the first
  refused answer to a request sent after it;
- refusals that arrived *before* the SCIM answer did (the directory changes before the SCIM
  answer leaves, so requests racing the answer may already be refused: negative latency);
- 2xx answers to requests sent after the SCIM answer: must be 0 (not noise: an error).

Usage: bench/revocation.py [--rounds N] [--workers W] [--json OUT]
"""
import argparse
import http.client
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import log, median  # noqa: E402

ALLOWED_BEFORE = 200
AFTER_REQUESTS = 400
AFTER_SECONDS = 3.0


def load_until_revoked(port, headers, revoke, workers, max_requests, max_seconds):
    """Runs the load and `revoke()` in the middle; returns (samples, answered_at, scim_status)."""
    samples = []   # (sent, received, status) per request
    lock = threading.Lock()
    stop = threading.Event()
    allowed = [0]

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started = time.monotonic()
        mine = []
        for _ in range(max_requests):
            if stop.is_set() or time.monotonic() - started > max_seconds:
                break
            sent = time.monotonic()
            try:
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (http.client.HTTPException, OSError):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            received = time.monotonic()
            mine.append((sent, received, status))
            if 200 <= status < 300:
                with lock:
                    allowed[0] += 1
            if len(mine) % 50 == 0:
                with lock:
                    samples.extend(mine)
                mine = []
        with lock:
            samples.extend(mine)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while allowed[0] < ALLOWED_BEFORE and time.monotonic() < deadline:
        time.sleep(0.005)
    if allowed[0] < ALLOWED_BEFORE:
        stop.set()
        for t in threads:
            t.join()
        statuses = sorted({s for _, _, s in samples})
        raise SystemExit(f"fewer than {ALLOWED_BEFORE} requests allowed before revoking (statuses {statuses})")
    status, _ = revoke()
    answered = time.monotonic()
    while time.monotonic() - answered < AFTER_SECONDS:
        with lock:
            after = sum(1 for s, _, _ in samples if s > answered)
        if after >= AFTER_REQUESTS:
            break
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    return samples, answered, status


def analyse(samples, answered):
    after = [s for s in samples if s[0] > answered]
    ok = lambda s: 200 <= s[2] < 300  # noqa: E731
    # A socket error (status 0) is no refusal; a refusal "before the answer arrived" is one
    # that arrived (s[1]) before the SCIM answer did.
    refused_after = sorted(s[1] for s in after if not ok(s) and s[2] != 0)
    early_refusals = [s for s in samples if s[1] <= answered and not ok(s) and s[2] != 0]
    before_ok = [s for s in samples if s[0] <= answered and ok(s)]
    statuses = {}
    for s in after:
        statuses[s[2]] = statuses.get(s[2], 0) + 1
    return {
        "requests": len(samples),
        "allowed_before": len(before_ok),
        "sent_after": len(after),
        "allowed_after": sum(1 for s in after if ok(s)),
        "statuses_after": statuses,
        "first_refusal_after_answer_ms": (refused_after[0] - answered) * 1e3 if refused_after else None,
        "refused_before_answer_arrived": len(early_refusals),
        # The first refused answer of the whole run, relative to the SCIM answer's arrival:
        # negative when the proxy refused before the client had even read the SCIM answer.
        "first_refusal_any_ms": min(((s[1] - answered) * 1e3 for s in samples if not ok(s) and s[2] != 0),
                                    default=None),
        "client_latency_ms_median": median((s[1] - s[0]) * 1e3 for s in samples),
        # Answers to requests sent before the SCIM answer that still arrived after it, allowed:
        # in flight when the write was answered, so allowed by the state before it.
        "late_2xx_sent_before": sum(1 for s in before_ok if s[1] > answered),
        "last_2xx_answer_after_scim_answer_ms": max(((s[1] - answered) * 1e3 for s in before_ok), default=None),
    }


def run(args):
    common.build_release()
    tmp = tempfile.mkdtemp(prefix="portcullis-bench-revocation-")
    stack = None
    scenarios = {"deactivate user (session)": [], "remove from group (session)": [],
                 "deactivate service account (JWT)": []}
    try:
        stack = common.Stack(tmp, threads=2)
        scim = stack.scim
        for round_no in range(args.rounds):
            for name in scenarios:
                # Access restored first; a person then signs in again (re-activation requires it).
                if name.startswith("deactivate user"):
                    scim.set_active(stack.alice_id, True)
                    cookie = stack.sign_in()
                    headers = {"Host": "app.test", "Cookie": f"portcullis_session={cookie}",
                               "Accept": "application/json"}
                    revoke = lambda: scim.set_active(stack.alice_id, False)  # noqa: E731
                elif name.startswith("remove from group"):
                    scim.set_active(stack.alice_id, True)
                    scim.add_member(stack.group_id, stack.alice_id)
                    cookie = stack.sign_in()
                    headers = {"Host": "app.test", "Cookie": f"portcullis_session={cookie}",
                               "Accept": "application/json"}
                    revoke = lambda: scim.remove_member(stack.group_id, stack.alice_id)  # noqa: E731
                else:
                    scim.set_active(stack.machine_id, True)
                    token = stack.machine_token()
                    headers = {"Host": "api.test", "Authorization": f"Bearer {token}",
                               "Accept": "application/json"}
                    revoke = lambda: scim.set_active(stack.machine_id, False)  # noqa: E731
                samples, answered, status = load_until_revoked(
                    stack.port, headers, revoke, args.workers, args.max_requests, args.max_seconds)
                if status not in (200, 204):
                    raise SystemExit(f"{name}: the SCIM request was answered {status}")
                result = analyse(samples, answered)
                scenarios[name].append(result)
                first = result["first_refusal_after_answer_ms"]
                log(f"round {round_no + 1}: {name:34} sent after answer {result['sent_after']:4}, "
                    f"2xx after {result['allowed_after']}, first refusal "
                    f"{'-' if first is None else f'{first:.3f} ms'} after the answer, "
                    f"{result['refused_before_answer_arrived']} refused before it arrived")
            # Back in the group for the next round.
            scim.add_member(stack.group_id, stack.alice_id)
    finally:
        if stack:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    for name, runs in scenarios.items():
        firsts = [r["first_refusal_after_answer_ms"] for r in runs if r["first_refusal_after_answer_ms"] is not None]
        summary[name] = {
            "rounds": len(runs),
            "first_refusal_ms_median": median(firsts),
            "first_refusal_ms_max": max(firsts) if firsts else float("nan"),
            "first_refusal_any_ms_median": median(r["first_refusal_any_ms"] for r in runs
                                                  if r["first_refusal_any_ms"] is not None),
            "client_latency_ms_median": median(r["client_latency_ms_median"] for r in runs),
            "allowed_after_total": sum(r["allowed_after"] for r in runs),
            "sent_after_total": sum(r["sent_after"] for r in runs),
            "refused_before_answer_arrived_total": sum(r["refused_before_answer_arrived"] for r in runs),
            "late_2xx_sent_before_total": sum(r["late_2xx_sent_before"] for r in runs),
            "runs": runs,
        }
    return {"workers": args.workers, "rounds": args.rounds, "scenarios": summary}


def report(result):
    print(f"\n{result['workers']} client threads, keep-alive, {result['rounds']} round(s) per scenario\n")
    print("| scenario | SCIM answer -> first refusal of a request sent after it (median, max) "
          "| first refusal of any request, relative to the SCIM answer | refused before the answer arrived "
          "| client request latency (median) | requests sent after the answer | 2xx to them | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, s in result["scenarios"].items():
        print(f"| {name} | {s['first_refusal_ms_median']:.3f} ms, {s['first_refusal_ms_max']:.3f} ms "
              f"| {s['first_refusal_any_ms_median']:+.3f} ms | {s['refused_before_answer_arrived_total']} "
              f"| {s['client_latency_ms_median']:.3f} ms | {s['sent_after_total']} | {s['allowed_after_total']} "
              f"| 0: {common.verdict(s['allowed_after_total'] == 0)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=20_000, help="per thread and scenario round")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per scenario round")
    result = common.run_cli(parser, run, report)
    leaked = sum(s["allowed_after_total"] for s in result["scenarios"].values())
    if leaked:
        # Not noise: a request sent after the SCIM answer was allowed.
        raise SystemExit(f"{leaked} request(s) sent after the SCIM answer were allowed")


if __name__ == "__main__":
    main()
