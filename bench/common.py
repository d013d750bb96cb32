"""Shared pieces of the benchmarks: processes on free loopback ports, nginx, wrk, the test IdP
(tests/idp, a real `oidc-provider`), sign-in with a plain HTTP client, and SCIM requests.

Everything listens on 127.0.0.1 with ports the kernel picks; every wait is bounded.
"""
import base64
import fcntl
import hashlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDP_DIR = os.path.join(ROOT, "tests", "idp")
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30, want=None, headers=None):
    """Poll url until it answers (a status < 500, or exactly `want`); return the seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as r:
                if (want is None and r.status < 500) or r.status == want:
                    return time.monotonic() - started
        except urllib.error.HTTPError as e:
            if (want is None and e.code < 500) or e.code == want:
                return time.monotonic() - started
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not come up within {timeout}s")


def stop(proc, timeout=15):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def median(values):
    values = list(values)
    return statistics.median(values) if values else float("nan")


def verdict(ok):
    return "met" if ok else "not met"


def thread_cpu_ns(pid):
    """Nanoseconds each thread of a process has run, by thread id (`/proc/<pid>/task/*/schedstat`)."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                threads[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended between the listing and the read
    return threads


def process_tree(pid):
    """A process and its children, theirs in turn (nginx's and Apache's workers): pids, the
    process first. One that ended has none."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return [pid] + [p for child in children for p in process_tree(child)]


def pin(pid, cpu):
    """Pins every thread of a process and of its children (nginx's worker) to one CPU. Threads
    started later inherit it from the thread that starts them."""
    for member in process_tree(pid):
        for tid in os.listdir(f"/proc/{member}/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except OSError:
                pass  # the thread ended


def check_upstream_answers(url, headers):
    """One request with `headers` must be answered 200 by the upstream through the proxy (not a
    redirect to sign in: urllib follows it, and the sign-in page is not the upstream's)."""
    import ssl
    req = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
    # The bench's own self-signed certificate: this checks the answer, not the certificate.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    with urllib.request.urlopen(req, timeout=10, context=context) as r:
        body = r.read()
        if r.status != 200 or b"hello from upstream" not in body:
            raise SystemExit(f"{url} {headers}: {r.status} {body[:200]}")


def quartiles(values):
    """The lower and upper quartile of `values` (interpolated between the values, as
    `statistics.quantiles` does with the inclusive method); of one value, that value twice."""
    values = sorted(values)
    if len(values) < 2:
        return values * 2
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return [lower, upper]


def machine():
    """Cores, memory, kernel and CPU model of this machine."""
    with open("/proc/meminfo") as f:
        mem_gib = int(re.search(r"MemTotal:\s+(\d+) kB", f.read()).group(1)) / 2**20
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        m = re.search(r"model name\s*:\s*(.+)", f.read())
        if m:
            model = m.group(1).strip()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": os.uname().release,
        "cpu": model,
    }


def run_cli(parser, run, report):
    """Parses the arguments (adding `--json`), runs, prints the report, writes the JSON; returns
    the result. The shared tail of every part's `main`."""
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args()
    result = run(args)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


# The build measured: `cargo build --release`'s, or with PORTCULLIS_BUILD another Cargo target
# directory holding release/portcullis and release/examples/pingora_floor (scripts/pgo.sh makes
# target/pgo/bin, the build optimized with profiles).
BUILD = os.path.abspath(os.environ.get("PORTCULLIS_BUILD") or os.path.join(ROOT, "target"))


def build_said():
    """Which build the figures are of, for a report's heading."""
    if os.environ.get("PORTCULLIS_BUILD"):
        return f"the build in {BUILD} (PORTCULLIS_BUILD)"
    return "`cargo build --release`"


def binary():
    return os.path.join(BUILD, "release", "portcullis")


def floor_binary():
    """Bare pingora (proxy/examples/pingora_floor.rs), of the same build as `binary()`."""
    return os.path.join(BUILD, "release", "examples", "pingora_floor")


def build_release(floor=False):
    """Builds Portcullis (and with `floor` bare pingora) in release; with PORTCULLIS_BUILD,
    only checks that build has them."""
    wanted = [binary()] + ([floor_binary()] if floor else [])
    if os.environ.get("PORTCULLIS_BUILD"):
        for path in wanted:
            if not os.access(path, os.X_OK):
                raise SystemExit(f"{path} is missing (PORTCULLIS_BUILD={BUILD})")
        return
    subprocess.run(["cargo", "build", "--release", "-p", "portcullis", "--bin", "portcullis",
                    *(["--example", "pingora_floor"] if floor else [])], cwd=ROOT, check=True)


# --- nginx and wrk ------------------------------------------------------------------------------

def nginx_bin():
    for path in ("/usr/sbin/nginx", "/usr/bin/nginx"):
        if os.path.exists(path):
            return path
    raise SystemExit("nginx is missing: run scripts/deps.sh bench")


def start_nginx(tmp, name, body):
    """One nginx process (1 worker, no daemon) with `body` inside its `http {}` block."""
    conf = f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-{name}.pid;
error_log {tmp}/nginx-{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body-{name};
  proxy_temp_path {tmp}/proxy-{name};
  fastcgi_temp_path {tmp}/fcgi-{name};
  uwsgi_temp_path {tmp}/uwsgi-{name};
  scgi_temp_path {tmp}/scgi-{name};
  {body}
}}
"""
    path = os.path.join(tmp, f"nginx-{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    return subprocess.Popen([nginx_bin(), "-c", path, "-p", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_upstream(tmp, port):
    """The upstream every proxy forwards to: nginx answering 200 with a 20-byte body."""
    return start_nginx(tmp, "upstream", f"""
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location / {{ return 200 "hello from upstream\\n"; }} }}""")


def start_nginx_proxy(tmp, port, upstream_port):
    return start_nginx(tmp, "proxy", f"""
  upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr; }} }}""")


# --- Apache with mod_auth_openidc: the identity-aware peer ---------------------------------------

APACHE_MODULES = "/usr/lib/apache2/modules"
APACHE_CLIENT_ID = "apache-bench"


def apache_bin():
    for path in ("/usr/sbin/apache2", "/usr/sbin/httpd"):
        if os.path.exists(path) and os.path.exists(os.path.join(APACHE_MODULES, "mod_auth_openidc.so")):
            return path
    raise SystemExit("Apache with mod_auth_openidc is missing: run scripts/deps.sh bench")


def start_apache_oidc(tmp, port, upstream_port, issuer, client_secret):
    """Apache 2.4 with mod_auth_openidc in front of the upstream, one worker process (event MPM,
    64 threads): `/plain` is proxied to anyone; everything else needs a signed-in session
    (sessions in shared memory) whose `groups` claim holds `eng`, the same requirement as the
    Portcullis session route. The IdP gives groups for the `groups` scope alone, as Okta does."""
    run = os.path.join(tmp, "apache-run")
    os.makedirs(run, exist_ok=True)
    modules = ["mpm_event", "authn_core", "authz_core", "proxy", "proxy_http", "auth_openidc"]
    load = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in modules)
    conf = f"""
ServerRoot "{tmp}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {run}/apache.pid
DefaultRuntimeDir {run}
ErrorLog {tmp}/apache-error.log
LogLevel warn
{load}
User www-data
Group www-data
ServerLimit 1
StartServers 1
ThreadLimit 64
ThreadsPerChild 64
MaxRequestWorkers 64
MinSpareThreads 1
MaxSpareThreads 64
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 30

OIDCProviderMetadataURL {issuer}/.well-known/openid-configuration
OIDCClientID {APACHE_CLIENT_ID}
OIDCClientSecret {client_secret}
OIDCRedirectURI http://127.0.0.1:{port}/redirect_uri
OIDCCryptoPassphrase {random_secret(32)}
OIDCScope "openid email profile groups"
OIDCSessionType server-cache
OIDCCacheType shm
OIDCSessionInactivityTimeout 7200

ProxyPass "/redirect_uri" "!"
ProxyPass "/" "http://127.0.0.1:{upstream_port}/"
<Location "/">
  AuthType openid-connect
  Require claim groups:eng
</Location>
<Location "/plain">
  AuthType None
  Require all granted
</Location>
"""
    path = os.path.join(tmp, "apache.conf")
    with open(path, "w") as f:
        f.write(conf)
    out = open(os.path.join(tmp, "apache-start.log"), "w")
    return subprocess.Popen([apache_bin(), "-f", path, "-DFOREGROUND"], stdout=out, stderr=subprocess.STDOUT)


# --- TLS and HTTP/2 -------------------------------------------------------------------------------

def make_tls_cert(tmp, name="plain.test"):
    """A self-signed P-256 certificate for `name` and 127.0.0.1 (openssl CLI); (cert, key)."""
    cert, key = os.path.join(tmp, f"{name}.pem"), os.path.join(tmp, f"{name}-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext",
                    f"subjectAltName=DNS:{name},IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


def start_nginx_tls_proxy(tmp, port, upstream_port, cert, key):
    """nginx 1 worker terminating TLS (OpenSSL) with HTTP/1.1 and HTTP/2 (ALPN), keep-alive to
    the upstream as in the plain proxy."""
    return start_nginx(tmp, "tls-proxy", f"""
  upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port} ssl http2; keepalive_requests 1000000;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:1m;
    http2_max_requests 1000000;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr; }} }}""")


def h2load(url, duration, connections, headers=()):
    """Runs `h2load` (HTTP/2 over TLS, one thread, one stream per connection at a time, like
    wrk's one request per connection); returns dict(rps, p50=None, p99=None, non2xx, sockerr,
    requests, mean_ms)."""
    cmd = ["h2load", "-t1", f"-c{connections}", "-m1", f"-D{duration}"]
    for h in headers:
        # HTTP/2 has no Host header: the authority pseudo-header says it (a `Host` is a 400).
        if h.lower().startswith("host:"):
            h = ":authority:" + h.split(":", 1)[1]
        cmd += ["-H", h]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if not rps or not done or not codes:
        raise SystemExit(f"could not parse h2load output for {url}:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "p50": None,
        "p99": None,
        "mean_ms": _ms(*mean.groups()) if mean else None,
        "requests": int(done.group(2)),
        "non2xx": sum(int(x) for x in codes.groups()[1:]),
        "sockerr": int(done.group(5)) + int(done.group(6)),
    }


def _ms(value, unit):
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url, duration, connections, headers=(), script=None, timeout_s=10):
    """Runs `wrk -t1`; returns dict(rps, p50, p99 in ms, non2xx, sockerr, requests)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", f"{timeout_s}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise SystemExit(f"could not parse wrk output for {url}:\n{out}")
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "p50": _ms(*p50.groups()),
        "p99": _ms(*p99.groups()),
        "requests": int(total.group(1)) if total else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "sockerr": sum(int(x) for x in sock.groups()) if sock else 0,
    }


# --- the test IdP -------------------------------------------------------------------------------

def ensure_idp_modules():
    """`npm ci` in tests/idp unless its node_modules was installed in full from the current
    lock file: the marker the tests and scripts/demo.sh write (see tests/src/idp.rs). A tree
    that is merely there may be an interrupted install's, or an older lock file's."""
    with open(os.path.join(IDP_DIR, "package-lock.json"), "rb") as f:
        lock_hash = hashlib.sha256(f.read()).hexdigest()
    marker = os.path.join(IDP_DIR, "node_modules", ".portcullis-installed")

    def installed():
        try:
            with open(marker) as f:
                return f.read().strip() == lock_hash
        except OSError:
            return False

    if installed():
        return
    # The tests' lock: an install they run meanwhile is waited for, not undone.
    # Where Rust's `std::env::temp_dir()` puts it: TMPDIR, else /tmp.
    lock_path = os.path.join(os.environ.get("TMPDIR") or "/tmp", "portcullis-tests-idp-npm.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return
        log("installing the test IdP's npm packages (npm ci in tests/idp) ...")
        npm = os.environ.get("PORTCULLIS_NPM", "npm")
        subprocess.run([npm, "ci", "--silent", "--no-audit", "--no-fund"], cwd=IDP_DIR, check=True,
                       timeout=300)
        with open(marker, "w") as f:
            f.write(lock_hash + "\n")


class Idp:
    """`node tests/idp/idp.mjs` with a setup (see that file's header); stops with the object."""

    def __init__(self, tmp, setup):
        ensure_idp_modules()
        path = os.path.join(tmp, "idp-setup.json")
        with open(path, "w") as f:
            json.dump(setup, f)
        self.log_path = os.path.join(tmp, "idp.log")
        self.log = open(self.log_path, "w")
        # The IdP exits when its stdin closes, so it never outlives this process.
        self.proc = subprocess.Popen(["node", os.path.join(IDP_DIR, "idp.mjs"), path], cwd=IDP_DIR,
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            with open(self.log_path) as f:
                text = f.read()
            ready = [line for line in text.splitlines() if line.startswith("ready ")]
            if ready:
                info = json.loads(ready[0][len("ready "):])
                self.port, self.issuer = info["port"], info["issuer"]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the test IdP did not start:\n{text[-3000:]}")
            time.sleep(0.05)

    def client_credentials(self, client_id, secret, resource, scope):
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "resource": resource,
                                       "scope": scope})
        basic = base64.b64encode(f"{urllib.parse.quote(client_id)}:{urllib.parse.quote(secret)}".encode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/token", body=form, headers={
            "Authorization": f"Basic {basic.decode()}",
            "Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
        conn.close()
        if resp.status != 200 or "access_token" not in body:
            raise SystemExit(f"client-credentials token refused: {resp.status} {body}")
        return body["access_token"]

    def stop(self):
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        stop(self.proc, timeout=5)
        self.log.close()


def idp_setup(portcullis_port, users, machine_id, machine_secret, client_id, client_secret,
              resource, audience, apache=None):
    """The IdP: one web client (callbacks on app.test and cap.test), one machine client, `users` (in the
    token group `eng`, which Apache's requirement reads), one API; with `apache = (port,
    secret)`, Apache's client too."""
    clients = []
    if apache:
        clients.append({
            "client_id": APACHE_CLIENT_ID,
            "client_secret": apache[1],
            "redirect_uris": [f"http://127.0.0.1:{apache[0]}/redirect_uri"],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        })
    return {
        "port": 0,
        "clients": [
            {
                "client_id": client_id,
                "client_secret": client_secret,
                # cap.test: the floor's capture of Portcullis' headers, signed in there (a
                # session is good on the host it began on alone).
                "redirect_uris": [f"http://{host}:{portcullis_port}/.portcullis/callback"
                                  for host in ("app.test", "cap.test")],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
                "backchannel_logout_uri": f"http://127.0.0.1:{portcullis_port}/.portcullis/backchannel_logout",
                "backchannel_logout_session_required": True,
            },
            {
                "client_id": machine_id,
                "client_secret": machine_secret,
                "redirect_uris": ["http://127.0.0.1:9/unused"],
                "grant_types": ["client_credentials"],
                "response_types": [],
                "token_endpoint_auth_method": "client_secret_basic",
            },
        ] + clients,
        "users": [{"sub": u["sub"], "email": u["email"], "password": u["password"], "name": u["sub"],
                   "groups": [GROUP], "email_verified": True} for u in users],
        "resources": [{"indicator": resource, "audience": audience, "scope": "api:read",
                       "access_token_ttl": 3600, "alg": "RS256"}],
        "default_resource": resource,
        "ttl": {},
        "logout_auto_submit": True,
    }


# --- HTTP with a Host header, cookies kept by hand ----------------------------------------------

class Browserless:
    """A plain HTTP client that signs in like a browser would: it keeps cookies per host and
    follows no redirect on its own. Every connection goes to 127.0.0.1; the URL's host name is
    only sent as `Host` (so app.test needs no DNS)."""

    def __init__(self):
        self.cookies = {}  # host -> {name: value}

    def request(self, method, url, body=None, headers=None):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection("127.0.0.1", u.port or 80, timeout=30)
        h = {"Host": u.netloc, "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        jar = self.cookies.get(u.hostname, {})
        if jar:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        h.update(headers or {})
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie":
                pair = value.split(";", 1)[0]
                if "=" in pair:
                    k, v = pair.split("=", 1)
                    self.cookies.setdefault(u.hostname, {})[k.strip()] = v.strip()
        conn.close()
        return resp.status, resp.getheader("Location"), data.decode("utf-8", "replace")


def absolute(base, location):
    return urllib.parse.urljoin(base, location)


def sign_in(start_url, login, password, cookie_name="portcullis_session"):
    """The authorization-code sign-in, as a browser does it but without one: Portcullis → IdP
    login form → Portcullis callback. Returns the session cookie's value."""
    client = Browserless()
    status, location, body = client.request("GET", start_url)
    if status != 302 or not location:
        raise SystemExit(f"GET {start_url} was not sent to sign in: {status} {body[:300]}")
    url = absolute(start_url, location)
    posted = False
    for _ in range(12):
        host = urllib.parse.urlsplit(url).hostname
        if urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(start_url).netloc:
            # Back at Portcullis: the callback sets the session cookie.
            status, location, body = client.request("GET", url)
            value = client.cookies.get(host, {}).get(cookie_name)
            if status != 302 or not value:
                raise SystemExit(f"the callback {url} failed: {status} {body[:300]}")
            return value
        status, location, body = client.request("GET", url)
        if status in (301, 302, 303, 307, 308):
            url = absolute(url, location)
            continue
        m = re.search(r'<form[^>]*action="([^"]+)"', body)
        if status != 200 or not m or posted:
            raise SystemExit(f"sign-in at the IdP stopped at {url} with {status}: {body[:500]}")
        form = urllib.parse.urlencode({"login": login, "password": password})
        status, location, body = client.request(
            "POST", absolute(url, m.group(1).replace("&amp;", "&")), body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        posted = True
        if status not in (302, 303) or not location:
            raise SystemExit(f"the IdP refused the sign-in of {login}: {status} {body[:300]}")
        url = absolute(url, location)
    raise SystemExit(f"sign-in did not come back to Portcullis (last URL {url})")


class Scim:
    """SCIM requests to Portcullis' directory (`Host: <scim host>`), one keep-alive connection."""

    def __init__(self, port, host, token):
        self.port, self.host, self.token = port, host, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method, path, body=None):
        headers = {"Host": self.host, "Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/scim+json"
            body = json.dumps(body)
        try:
            self.conn.request(method, f"/scim/v2{path}", body=body, headers=headers)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.request(method, f"/scim/v2{path}", body=body, headers=headers)
            resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)

    def create_user(self, user_name):
        status, body = self.request("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": user_name,
                                                        "emails": [{"value": user_name, "primary": True}]
                                                        if "@" in user_name else [],
                                                        "active": True})
        if status != 201:
            raise SystemExit(f"SCIM create user {user_name}: {status} {body}")
        return body["id"]

    def create_group(self, name, member_ids):
        status, body = self.request("POST", "/Groups", {"schemas": [GROUP_SCHEMA], "displayName": name,
                                                         "members": [{"value": m} for m in member_ids]})
        if status != 201:
            raise SystemExit(f"SCIM create group {name}: {status} {body}")
        return body["id"]

    def set_active(self, user_id, active):
        return self.request("PATCH", f"/Users/{user_id}", {
            "schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "value": {"active": active}}]})

    def remove_member(self, group_id, user_id):
        return self.request("PATCH", f"/Groups/{group_id}", {
            "schemas": [PATCH_SCHEMA],
            "Operations": [{"op": "remove", "path": f'members[value eq "{user_id}"]'}]})

    def add_member(self, group_id, user_id):
        return self.request("PATCH", f"/Groups/{group_id}", {
            "schemas": [PATCH_SCHEMA],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": user_id}]}]})

    def close(self):
        self.conn.close()


def random_secret(n=24):
    return secrets.token_urlsafe(n)


# --- Portcullis with sign-in, machine tokens and SCIM -------------------------------------------

SCIM_HOST = "auth.test"
SCIM_TOKEN = "bench-scim-token-0123456789abcdef"
CLIENT_ID = "portcullis-bench"
MACHINE_ID = "bench-agent"
API = "https://api.bench.test/"
API_AUD = "portcullis-bench-api"
GROUP = "eng"
ALICE = {"sub": "alice", "email": "alice@bench.test", "password": "correct horse battery staple"}


def bench_users(n):
    """Alice and `n - 1` more people like her (in `eng`, with her password)."""
    return [ALICE] + [{"sub": f"user{i}", "email": f"user{i}@bench.test", "password": ALICE["password"]}
                      for i in range(1, n)]


def rotating_cookies_script(path, cookies):
    """A wrk script that sends each request with the next of `cookies` (full `Cookie` header
    values), in turn; written to `path`."""
    with open(path, "w") as f:
        f.write("local cookies = {\n")
        f.writelines(f'  "{c}",\n' for c in cookies)
        f.write("}\nlocal i = 0\nrequest = function()\n  i = i % #cookies + 1\n"
                "  wrk.headers[\"Cookie\"] = cookies[i]\n  return wrk.format()\nend\n")
    return path


class Stack:
    """An upstream (nginx `return 200`), the test IdP and one Portcullis with three routes to
    that upstream: `plain.test` (public, no authentication), `app.test` (signed-in members of
    `eng`, session cookie) and `api.test` (members of `eng`, bearer JWT). SCIM on `auth.test`
    provisions alice and the service account `bench-agent` into `eng` before anyone signs in.
    `extra` is appended to its configuration (a `[postgres]` table, say); `prefix` is put before
    its command line (`valgrind …`, say), and then start-up may take minutes. `program` is the
    Portcullis binary to run (`binary()` unless given).
    """

    def __init__(self, tmp, threads=1, upstream_port=None, log_level="warn", apache=None, tls=None, extra="",
                 prefix=(), program=None, users=1):
        self.tmp = tmp
        self.procs = []
        self.idp = None
        self.client_secret = random_secret(32)
        self.machine_secret = random_secret(32)
        self.port, self.admin_port = free_port(), free_port()
        # With `tls = (cert, key)`, a TLS listener too, and `https://plain.test` on it.
        self.tls_port = free_port() if tls else None
        try:
            if upstream_port is None:
                upstream_port = free_port()
                self.procs.append(start_upstream(tmp, upstream_port))
                wait_http(f"http://127.0.0.1:{upstream_port}/")
            self.upstream_port = upstream_port
            self.users = bench_users(users)
            self.idp = Idp(tmp, idp_setup(self.port, self.users, MACHINE_ID, self.machine_secret, CLIENT_ID,
                                          self.client_secret, API, API_AUD, apache=apache))
            self.config = os.path.join(tmp, "portcullis-auth.toml")
            upstream = f"http://127.0.0.1:{upstream_port}"
            tls_listener = tls_route = ""
            if tls:
                tls_listener = (f'[[listeners]]\naddress = "127.0.0.1:{self.tls_port}"\n'
                                f'tls = {{ cert = "{tls[0]}", key = "{tls[1]}" }}\n')
                tls_route = f'[[routes]]\nfrom = "https://plain.test"\nto = ["{upstream}"]\naccept = ["public"]\n'

            with open(self.config, "w") as f:
                f.write(f"""
data_dir = "{tmp}/data-auth"
[log]
level = "{log_level}"
[server]
threads = {threads}
[admin]
address = "127.0.0.1:{self.admin_port}"
[[listeners]]
address = "127.0.0.1:{self.port}"
{tls_listener}
[[routes]]
from = "http://plain.test"
to = ["{upstream}"]
accept = ["public"]
{tls_route}
[[routes]]
from = "http://app.test"
to = ["{upstream}"]
accept = ["session"]
allow = {{ groups = ["{GROUP}"] }}

[[routes]]
from = "http://api.test"
to = ["{upstream}"]
accept = ["bearer"]
allow = {{ groups = ["{GROUP}"] }}

[oidc]
issuer = "{self.idp.issuer}"
client_id = "{CLIENT_ID}"
client_secret = "{self.client_secret}"
auth_host = "app.test:{self.port}"
auth_scheme = "http"
session_lifetime = "2h"
# RS256 only, as Apache's mod_auth_openidc is signed in with: the same work per sign-in.
id_token_algorithms = ["RS256"]

[[jwt_issuers]]
issuer = "{self.idp.issuer}"
audiences = ["{API_AUD}"]
algorithms = ["RS256"]

[scim]
host = "{SCIM_HOST}"
[[scim.tokens]]
name = "bench"
secret = "{SCIM_TOKEN}"
{extra}
""")
            self.log = open(os.path.join(tmp, "portcullis-auth.log"), "w")
            self.proc = subprocess.Popen([*prefix, program or binary(), "serve", "--config", self.config],
                                         stdout=self.log, stderr=subprocess.STDOUT)
            self.procs.append(self.proc)
            slow = 10 if prefix else 1
            wait_http(f"http://127.0.0.1:{self.admin_port}/readyz", want=200, timeout=60 * slow)
            wait_http(f"http://127.0.0.1:{self.port}/", headers={"Host": "plain.test"}, timeout=30 * slow)
            # Sign-in works once Portcullis has discovered the IdP.
            deadline = time.monotonic() + 30 * slow
            while Browserless().request("GET", self.url("app.test", "/.portcullis/sign_in?rd=%2F"))[0] != 302:
                if time.monotonic() > deadline:
                    raise SystemExit("sign-in never became available")
                time.sleep(0.1)
            self.scim = Scim(self.port, SCIM_HOST, SCIM_TOKEN)
            self.alice_id = self.scim.create_user(ALICE["email"])
            self.machine_id = self.scim.create_user(MACHINE_ID)
            others = [self.scim.create_user(u["email"]) for u in self.users[1:]]
            self.group_id = self.scim.create_group(GROUP, [self.alice_id, self.machine_id, *others])
        except BaseException:
            common_log = self.log_tail() if hasattr(self, "log") else ""
            self.stop()
            if common_log:
                log(f"Portcullis output:\n{common_log}")
            raise

    def url(self, host, path="/"):
        return f"http://{host}:{self.port}{path}"

    def sign_in(self, user=ALICE, host="app.test"):
        """A fresh session of `user` (alice unless said), begun on `host` (a session is good
        there alone); returns the cookie value."""
        return sign_in(self.url(host, "/"), user["email"], user["password"])

    def machine_token(self):
        return self.idp.client_credentials(MACHINE_ID, self.machine_secret, API, "api:read")

    def stop(self):
        for p in reversed(self.procs):
            stop(p)
        if self.idp:
            self.idp.stop()
        if hasattr(self, "scim"):
            self.scim.close()
        if hasattr(self, "log"):
            self.log.close()

    def log_tail(self):
        try:
            with open(os.path.join(self.tmp, "portcullis-auth.log")) as f:
                return f.read()[-3000:]
        except OSError:
            return ""
