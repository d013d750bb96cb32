#!/usr/bin/env python3
"""Run scim2-tester against a live SCIM server and gate CI on the result.

Tested with scim2-tester 0.5.2 / scim2-client 0.13.2 / scim2-models 0.12.3 / httpx2 2.16.2
(pip install "scim2-tester[httpx2]==0.5.2").

Usage:
    run_scim2_tester.py --binary target/debug/portcullis        # starts Portcullis itself
    run_scim2_tester.py --url http://127.0.0.1:8080/scim/v2 --token TOKEN [options]

Exit status:
    0  every check category executed at least one check, and no check ended
       with ERROR or CRITICAL (nor DEVIATION with --strict, nor SKIPPED with
       --fail-on-skip), and every --require-resource-type was exercised.
    1  any of the above is violated.
    2  the tester itself could not run (bad arguments, crash, timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections import defaultdict

from httpx2 import Client
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import Status
from scim2_tester import check_server

# Category of a check, from the tags scim2-tester puts on it (scim2_tester/checkers/*.py).
#   discovery  : service_provider_config_endpoint(_methods), query_all_resource_types,
#                query_resource_type_by_id, resource_types_schema_validation,
#                access_invalid_resource_type, resource_types_endpoint_methods,
#                query_all_schemas, access_schema_by_id, access_invalid_schema,
#                schemas_endpoint_methods  (+ "service_description" synthetic error)
#   misc       : random_url
#   crud       : object_creation, object_query, object_query_without_id,
#                object_replacement, object_deletion
#   attributes : object_query_with_attributes, object_list_with_attributes,
#                search_with_attributes   (tag crud:read:attributes)
#   patch      : check_add_attribute, check_remove_attribute, check_replace_attribute
CATEGORIES = ("discovery", "misc", "crud", "attributes", "patch")

FAILING = {Status.ERROR, Status.CRITICAL}
STATUS_COLUMNS = (
    Status.SUCCESS,
    Status.COMPLIANT,
    Status.ACCEPTABLE,
    Status.DEVIATION,
    Status.ERROR,
    Status.CRITICAL,
    Status.SKIPPED,
)


def category_of(tags: set[str]) -> str:
    if "crud:read:attributes" in tags:
        return "attributes"
    if any(t.startswith("patch") for t in tags):
        return "patch"
    if any(t.startswith("crud") for t in tags):
        return "crud"
    if "discovery" in tags:
        return "discovery"
    if "misc" in tags:
        return "misc"
    return "other"


def subcategory_of(tags: set[str]) -> str:
    specific = sorted(t for t in tags if t not in ("*", "discovery"))
    return ",".join(specific) or "discovery"


def short(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def teach_datetimes() -> None:
    """scim2-tester 0.5.2 fills an attribute of type dateTime with a UUID string, which its own
    models refuse before anything is sent, so a server with a writable dateTime attribute
    (Portcullis' Agent `expires`) could not be tested at all. Its generator is wrapped to give
    such attributes an RFC 3339 time instead; every other value it makes is left as it is."""
    import datetime
    import random

    from scim2_tester import filling
    from scim2_tester.checkers import patch_add, patch_replace

    original = filling.generate_random_value

    def generate(context, path, mutability=None, required=None):
        value = original(context, path, mutability=mutability, required=required)
        binding = path.resolve()
        if value is None or binding is None or binding.target_type is not datetime.datetime:
            return value
        days = datetime.timedelta(days=random.randint(1, 365))
        at = (datetime.datetime.now(datetime.timezone.utc) + days).replace(microsecond=0)
        return [at] if binding.target_is_multivalued else at

    for module in (filling, patch_add, patch_replace):
        module.generate_random_value = generate


def teach_multi_valued_add() -> None:
    """RFC 7644 §3.5.2.1: an `add` to a multi-valued attribute adds its values to those already
    there. scim2-tester 0.5.2 expects exactly the added values back, which holds only if the
    attribute was empty. It is not for a multi-valued attribute of an extension (Portcullis'
    Agent `owners`), which the tester has just filled by adding the whole extension. Its add
    check is taught to accept a result that holds every added value; every other comparison
    stays exact."""
    from pydantic import BaseModel
    from scim2_tester import utils
    from scim2_tester.checkers import patch_add

    def dump(value):
        return value.model_dump() if isinstance(value, BaseModel) else value

    def added(expected, actual):
        if isinstance(expected, list) and isinstance(actual, list):
            present = [dump(value) for value in actual]
            return all(dump(value) in present for value in expected)
        return utils.fields_equality(expected, actual)

    patch_add.fields_equality = added


_given: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before, from below the kernel's ephemeral
    range (as the Rust harness's `free_port`): Portcullis' own outgoing connections (to
    PostgreSQL, before it binds its listeners) take theirs in that range, and could take a
    port reserved there and released until the server binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    low = 10_000
    if ephemeral_low <= low + 1000:
        raise SystemExit(f"the ephemeral port range starts at {ephemeral_low}: ports below it are needed")
    span = ephemeral_low - low
    start = secrets.randbelow(span)
    for step in range(span):
        port = low + (start + step) % span
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise SystemExit(f"no free loopback port in {low}..{ephemeral_low}")


def start_portcullis(binary: str, workdir: str, postgres: bool) -> tuple[subprocess.Popen, str, str, str]:
    """Starts `portcullis serve` on free loopback ports with SCIM on host scim.test (its
    directory in PostgreSQL at $PORTCULLIS_POSTGRES_URL with `postgres`).
    Returns the process, the SCIM base URL, the token and the Host header to send."""
    port, admin = free_port(), free_port()
    token = secrets.token_urlsafe(32)
    config = os.path.join(workdir, "portcullis.toml")
    with open(config, "w") as f:
        f.write(f"""data_dir = "data"
[admin]
address = "127.0.0.1:{admin}"
[[listeners]]
address = "127.0.0.1:{port}"
[scim]
host = "scim.test"
[[scim.tokens]]
name = "scim2-tester"
secret = "env:SCIM_TOKEN"
""")
        if postgres:
            if not os.environ.get("PORTCULLIS_POSTGRES_URL"):
                raise SystemExit("--postgres needs PORTCULLIS_POSTGRES_URL (scripts/with-postgres.sh sets it)")
            f.write('[postgres]\nurl = "env:PORTCULLIS_POSTGRES_URL"\n')
    log = open(os.path.join(workdir, "portcullis.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "SCIM_TOKEN": token})
    # As long as the test harness gives it (tests/src/process.rs): a loaded 2-core machine.
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            # The log goes with the temporary directory: shown here, or never.
            print_log_tail(log.name)
            raise SystemExit(f"portcullis exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}/scim/v2", token, "scim.test"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    print_log_tail(log.name)
    raise SystemExit("portcullis did not become ready in 40 s")


def print_log_tail(path: str, lines: int = 80) -> None:
    """Prints the end of portcullis' own log, which goes with the temporary directory: why a
    failed run's answers were what they were (a lapsed lease, a lost connection) is there."""
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError as e:
        print(f"(portcullis' log is unreadable: {e})")
        return
    print(f"== the last {len(tail)} lines of portcullis' log")
    print("".join(tail), end="")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="Start this portcullis binary on free ports and test it")
    p.add_argument("--postgres", action="store_true",
                   help="With --binary: keep its directory in PostgreSQL at $PORTCULLIS_POSTGRES_URL")
    p.add_argument("--url", help="SCIM base URL, e.g. http://127.0.0.1:8080/scim/v2")
    p.add_argument("--token", help="Bearer token (sent as 'Authorization: Bearer TOKEN')")
    p.add_argument("--content-type", default="application/scim+json",
                   help="Accept and Content-Type header sent on every request "
                        "(default application/scim+json; scim2-client itself sets none, "
                        "so httpx2 would send Content-Type: application/json and Accept: */*). "
                        "Pass '' to keep the httpx2 defaults.")
    p.add_argument("--host-header", help="Override the Host header (e.g. when the server routes by virtual host "
                                         "but is reached at 127.0.0.1)")
    p.add_argument("--http-timeout", type=float, default=30.0, help="Per-request timeout, seconds (default 30)")
    p.add_argument("--max-seconds", type=int, default=900, help="Abort the whole run after N seconds (default 900)")
    p.add_argument("--resource-type", action="append", dest="resource_types",
                   help="Only test these resource type names (repeatable). Default: every discovered type.")
    p.add_argument("--require-resource-type", action="append", dest="required_types",
                   help="Fail unless crud, attributes and patch checks executed for this resource type "
                        "(repeatable; default: User and Group).")
    p.add_argument("--include-tag", action="append", dest="include_tags",
                   help="Pass include_tags to check_server (repeatable). Default: all.")
    p.add_argument("--exclude-tag", action="append", dest="exclude_tags",
                   help="Pass exclude_tags to check_server (repeatable). Default: none.")
    p.add_argument("--strict", action="store_true", help="Also fail on DEVIATION results")
    p.add_argument("--fail-on-skip", action="store_true", help="Also fail on any SKIPPED result")
    p.add_argument("--insecure", action="store_true", help="Do not verify TLS certificates")
    p.add_argument("-v", "--verbose", action="store_true", help="List every check, not only the problems")
    p.add_argument("--json", metavar="FILE", help="Write every result as JSON to FILE")
    args = p.parse_args()
    if args.binary:
        with tempfile.TemporaryDirectory(prefix="scim2-tester-") as workdir:
            proc, args.url, args.token, args.host_header = start_portcullis(args.binary, workdir, args.postgres)
            try:
                status = run(args)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if status != 0:
                print_log_tail(os.path.join(workdir, "portcullis.log"))
            return status
    if not (args.url and args.token):
        p.error("give --binary, or --url and --token")
    return run(args)


class RunTimeout(BaseException):
    """The run took longer than --max-seconds. Not an `Exception`: scim2-tester turns every
    `Exception` raised in a check into that check's ERROR and goes on to the next (and the HTTP
    client would first take a `TimeoutError` for a read timeout), so the run never stopped."""


def run(args: argparse.Namespace) -> int:

    def on_alarm(signum, frame):  # noqa: ARG001
        raise RunTimeout(f"scim2-tester run exceeded --max-seconds={args.max_seconds}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.max_seconds)

    headers = {"Authorization": f"Bearer {args.token}"}
    if args.content_type:
        headers["Accept"] = args.content_type
        headers["Content-Type"] = args.content_type
    if args.host_header:
        headers["Host"] = args.host_header

    base_url = args.url.rstrip("/") + "/"  # httpx2 appends relative paths ("/Users") under it
    teach_datetimes()
    teach_multi_valued_add()
    started = time.monotonic()
    try:
        with Client(base_url=base_url, headers=headers, timeout=args.http_timeout,
                    verify=not args.insecure) as http:
            scim = SyncSCIMClient(http)
            results = check_server(
                scim,
                raise_exceptions=False,
                include_tags=set(args.include_tags) if args.include_tags else None,
                exclude_tags=set(args.exclude_tags) if args.exclude_tags else None,
                resource_types=args.resource_types,
            )
    except (Exception, RunTimeout) as exc:  # tester crash / timeout / network failure outside a check
        print(f"FATAL: scim2-tester did not complete: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
    elapsed = time.monotonic() - started

    by_cat: dict[str, Counter] = defaultdict(Counter)
    by_sub: dict[tuple[str, str, str], Counter] = defaultdict(Counter)
    for r in results:
        cat = category_of(r.tags)
        by_cat[cat][r.status] += 1
        by_sub[(cat, subcategory_of(r.tags), r.resource_type or "-")][r.status] += 1

    cols = [s.name for s in STATUS_COLUMNS]
    print(f"scim2-tester against {args.url}: {len(results)} results in {elapsed:.1f}s\n")
    header = f"{'category':<11} {'tag':<24} {'resource':<9} " + " ".join(f"{c[:8]:>8}" for c in cols)
    print(header)
    print("-" * len(header))
    for key in sorted(by_sub, key=lambda k: (CATEGORIES.index(k[0]) if k[0] in CATEGORIES else 99, k[1], k[2])):
        c = by_sub[key]
        print(f"{key[0]:<11} {key[1]:<24} {key[2]:<9} " + " ".join(f"{c[s]:>8}" for s in STATUS_COLUMNS))
    print("-" * len(header))
    for cat in list(CATEGORIES) + sorted(set(by_cat) - set(CATEGORIES)):
        c = by_cat[cat]
        print(f"{cat:<11} {'TOTAL':<24} {'':<9} " + " ".join(f"{c[s]:>8}" for s in STATUS_COLUMNS))
    print()

    problems: list[str] = []
    bad_statuses = set(FAILING)
    if args.strict:
        bad_statuses.add(Status.DEVIATION)
    if args.fail_on_skip:
        bad_statuses.add(Status.SKIPPED)

    for r in results:
        if r.status in bad_statuses or args.verbose or r.status in (Status.SKIPPED, Status.DEVIATION):
            mark = "FAIL" if r.status in bad_statuses else "info"
            line = (f"[{mark}] {r.status.name:<9} {category_of(r.tags):<10} {r.title} "
                    f"({r.resource_type or '-'}): {short(r.reason or '', 400)}")
            print(line)
            if r.status in bad_statuses and r.data is not None:
                print(f"        data: {short(r.data, 600)}")
        if r.status in bad_statuses:
            problems.append(f"{r.status.name} in {r.title}")

    executed = {cat: sum(n for s, n in by_cat[cat].items() if s != Status.SKIPPED) for cat in CATEGORIES}
    for cat, n in executed.items():
        if n == 0:
            problems.append(f"category '{cat}' executed zero checks")

    required_types = args.required_types if args.required_types is not None else ["User", "Group"]
    if args.resource_types:
        required_types = [t for t in required_types if t in args.resource_types]
    for rt in required_types:
        for cat in ("crud", "attributes", "patch"):
            n = sum(n for (c, _, t), cnt in by_sub.items() if c == cat and t == rt
                    for s, n in cnt.items() if s != Status.SKIPPED)
            if n == 0:
                problems.append(f"resource type '{rt}' executed zero '{cat}' checks")

    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"status": r.status.name, "category": category_of(r.tags), "title": r.title,
                        "tags": sorted(r.tags), "resource_type": r.resource_type, "reason": r.reason,
                        "data": None if r.data is None else short(r.data, 4000)} for r in results],
                      f, indent=2)

    print()
    failed = sum(1 for r in results if r.status in bad_statuses)
    passed = sum(1 for r in results if r.status not in bad_statuses and r.status != Status.SKIPPED)
    if problems:
        print(f"RESULT: FAIL ({len(problems)} problem(s))")
        for pr in sorted(set(problems)):
            print(f"  - {pr}" + (f" x{problems.count(pr)}" if problems.count(pr) > 1 else ""))
        print(f"scim2-tester: {passed} passed, {max(failed, 1)} failed")
        return 1
    print("RESULT: PASS (every category executed, no ERROR/CRITICAL)")
    print(f"scim2-tester: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
