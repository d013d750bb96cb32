//! The authorization decision as the proxy makes it for every request on a route with rules,
//! against a real directory of 1,000,000 users and 10,000 groups (redb storage, the in-memory
//! index the proxy builds at start-up):
//!
//! cookie header → `Auth::authenticate` (cookie parse, session lookup, idle/absolute limits)
//! → `Gate::admit` (SCIM user by `userName`, active, signed in after the last deactivation,
//! transitive groups, the route's compiled policy, the upstream's identity).
//!
//! Benchmarks:
//! - `session/one_user`: the same session every time (everything in cache);
//! - `session/random_user`: one of 10,000 sessions of random users, so the session and index
//!   lookups miss the CPU caches as they would with many people signed in. The request head
//!   itself is read once before the timed call, as pingora has just parsed it when the proxy
//!   decides (10,000 pre-built heads would otherwise count cache misses the proxy never has);
//! - `machine/decide`: a machine caller whose bearer JWT is already verified; JWT signature
//!   verification is *not* included (it is measured end to end in `bench/proxy.py`);
//! - `agent/random_agent`: one of 100,000 AI agents (`PORTCULLIS_BENCH_AGENTS`), each owned by
//!   the 100,000-member `group0` and running in an AgenticApplication, calling with a verified
//!   client-credentials token: the agent by `client_id`, its owner chain (active, not expired,
//!   its application active, an active member of the owning group) and its owners' groups,
//!   then a route that admits agents whose owners are in `group0`.
//!
//! Criterion reports the mean and median of batched iterations. The p99 is computed here by
//! timing 200,000 single iterations each (`Instant::now` around one call; the timer's own cost
//! is measured and reported beside it), written to `target/bench-results/decision.json`.
//!
//! `cargo bench -p portcullis --bench decision` (`-- --quick` for a short run).
//! `PORTCULLIS_BENCH_USERS` changes the number of users (default 1,000,000). The populated
//! directory is cached in `target/bench-data/` (about 600 MB for 1,000,000 users).

// Benchmark code: a setup that fails is a bug in the benchmark, reported by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

// The allocator the `portcullis` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::hint::black_box;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;

use portcullis::audit::{Audit, Destination};
use portcullis::auth::sessions::IssuedIn;
use portcullis::auth::{session_cookie_name, Arrival, Auth};
use portcullis::caller::{Caller, Identity, Machine};
use portcullis::clock::now_unix;
use portcullis::gate::{Admission, ClientOf, Facts, Forwards, Gate, Presented};
use portcullis::state::Runtime;
use portcullis_scim::store::Directory;

mod shared;

use shared::{agents, open_directory, target_dir, users};

const SESSIONS: usize = 10_000;
/// group0 holds the first 100,000 users (populate.rs); the route allows it.
const GROUP0_MEMBERS: u64 = 100_000;
const TIMED_ITERATIONS: usize = 200_000;

/// The route as the proxy would load it: sessions and bearer tokens, members of `group0`
/// allowed, nobody under `/admin` but `group1`.
const CONFIG: &str = r#"
data_dir = "/nonexistent"

[[listeners]]
address = "127.0.0.1:1"

[oidc]
issuer = "http://127.0.0.1:2"
client_id = "bench"
client_secret = "bench-secret-0123456789abcdef0123456789"
auth_host = "app.test"
auth_scheme = "http"

[[jwt_issuers]]
issuer = "http://127.0.0.1:2"
audiences = ["bench-api"]
algorithms = ["RS256"]

[[routes]]
from = "http://app.test"
to = ["http://127.0.0.1:3"]
accept = ["session", "bearer"]
allow = { groups = ["group0"] }
deny = { groups = ["group0"], paths = ["/admin"] }

[[routes]]
from = "http://agents.test"
to = ["http://127.0.0.1:3"]
accept = ["bearer"]
allow = { agent_owner_groups = ["group0"] }
"#;

/// An RS256 ID token's shape and size (header.claims.signature, base64url), not a valid one.
fn fake_id_token(n: u64) -> String {
    let part = |len: usize| -> String {
        (0..len)
            .map(|i| char::from(b'A' + ((i as u64 + n) % 26) as u8))
            .collect()
    };
    format!("{}.{}.{}", part(100), part(450), part(342))
}

/// A verified client-credentials token of the client `client_id` (also its `sub`).
fn client_token(client_id: &str) -> Caller {
    Caller::Machine(Arc::new(Machine {
        issuer: "http://127.0.0.1:2".into(),
        subject: client_id.into(),
        client_id: Some(client_id.into()),
        groups: Vec::new(),
        groups_unlisted: false,
        audiences: Vec::new(),
        expires: u64::MAX,
        issued: Some(u64::MAX),
        for_itself: true,
        email: None,
        email_verified: None,
        claims: Default::default(),
        act: None,
        signed: None,
    }))
}

/// Polls a future that never waits (a session without refresh) to completion.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("authenticate waited: the benchmark measures the in-memory path"),
    }
}

struct Fixture {
    runtime: Runtime,
    auth: Auth,
    directory: Arc<Directory>,
    /// Requests carrying a session cookie, one per session.
    requests: Vec<RequestHeader>,
    machine: Caller,
    /// A verified client-credentials token of each agent.
    agents: Vec<Caller>,
    /// Kept as the server keeps them.
    forwards: Forwards,
}

impl Fixture {
    fn new() -> Fixture {
        let (users, agents) = (users(), agents().max(1));
        assert!(users >= GROUP0_MEMBERS, "at least {GROUP0_MEMBERS} users");
        let (directory, kept) = open_directory(users, agents);
        let config = portcullis_config::parse(CONFIG, Path::new("/"), &|_| None)
            .unwrap_or_else(|e| panic!("bench config: {e}"));

        // Sign-ins are audited; the bench signs nobody in, so its log stays empty.
        let log = tempfile::tempdir().expect("audit dir");
        let destination = || Destination::of(log.path(), None);
        let audit = Audit::open(destination(), destination()).expect("audit");
        let auth = Auth::new(directory.clone(), kept, Arc::new(audit)).expect("auth");
        let writes = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The sessions of an earlier run are kept in the cached directory: end them first.
        writes
            .block_on(auth.sessions.end_where(|_| true))
            .expect("end old sessions");
        let oidc = config.oidc.as_ref().expect("oidc");
        let cookie_name = session_cookie_name(oidc, false);
        let now = now_unix();
        let seq = directory.seq();
        // 10,000 sessions of random members of group0 (all allowed), created in memory and
        // beside the directory exactly as a sign-in does.
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut requests = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let n = rng % GROUP0_MEMBERS;
            let email = format!("user{n}@bench.example");
            let identity = Identity {
                issuer: oidc.issuer.clone(),
                subject: format!("sub-{n}"),
                email: Some(email),
                email_verified: None,
                name: None,
                idp_session: None,
                created: now,
                expires: now + 86_400,
                // A real session keeps its ID token (about 900 bytes from the test IdP).
                id_token: Some(fake_id_token(n)),
                directory_seq: seq,
                groups: Vec::new(),
                groups_unlisted: Some(false),
                claims: Default::default(),
            };
            let id = writes
                .block_on(
                    auth.sessions
                        .create(identity, None, IssuedIn::of(oidc, "app.test"), now),
                )
                .expect("create session");
            let mut req = RequestHeader::build("GET", b"/projects/42", None).expect("request");
            req.insert_header("host", "app.test").expect("host");
            req.insert_header("accept", "application/json")
                .expect("accept");
            req.insert_header("cookie", format!("theme=dark; {cookie_name}={id}; lang=en"))
                .expect("cookie");
            requests.push(req);
        }
        let machine = client_token("user7@bench.example");
        let agents = (0..agents)
            .map(|n| client_token(&format!("agent{n}")))
            .collect();
        Fixture {
            runtime: Runtime::build(config, &directory),
            auth,
            directory,
            requests,
            machine,
            agents,
            forwards: Forwards::default(),
        }
    }

    fn gate(&self) -> Gate<'_> {
        Gate {
            directory: &self.directory,
            identity: &self.runtime.config.identity,
            jwt_issuers: &self.runtime.config.jwt_issuers,
            current: true,
            now: now_unix(),
            forwards: Some(&self.forwards),
        }
    }

    fn facts<'a>(&'a self, req: &'a RequestHeader) -> Facts<'a> {
        Facts {
            route: &self.runtime.config.routes[0],
            method: req.method.as_str(),
            path: req.uri.path(),
            client: ClientOf::Headers(&req.headers),
        }
    }

    /// One request's authentication and admission, as `proxy.rs` runs them.
    // Never inlined, so that `valgrind --tool=callgrind --toggle-collect='*session_decision*'`
    // counts the instructions of exactly one decision per call.
    #[inline(never)]
    fn session_decision(&self, req: &RequestHeader) -> bool {
        let route = &self.runtime.config.routes[0];
        // Come to the configuration's (loopback) listener, in plain HTTP, for the route's host.
        let at = Arrival {
            tls: false,
            local: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 1))),
            host: "app.test",
        };
        let authentication =
            ready(
                self.auth
                    .authenticate(&self.runtime, &route.accept, req, at, now_unix()),
            );
        let admission = self
            .gate()
            .admit(&self.facts(req), authentication.presented());
        matches!(admission, Admission::Allow(_))
    }

    /// An agent's verified token on the agents route, as `proxy.rs` admits it.
    #[inline(never)]
    fn agent_decision(&self, req: &RequestHeader, agent: &Caller) -> bool {
        let facts = Facts {
            route: &self.runtime.config.routes[1],
            ..self.facts(req)
        };
        let admission = self
            .gate()
            .admit(&facts, Presented::Caller(agent.principal()));
        matches!(admission, Admission::Allow(_))
    }

    #[inline(never)]
    fn machine_decision(&self, req: &RequestHeader) -> bool {
        let admission = self.gate().admit(
            &self.facts(req),
            Presented::Caller(self.machine.principal()),
        );
        matches!(admission, Admission::Allow(_))
    }
}

/// Reads the request head the way parsing it leaves it: in the CPU caches.
fn warm(req: &RequestHeader) {
    let mut sum = req.uri.path().len();
    for (name, value) in &req.headers {
        sum += name.as_str().len();
        sum += value
            .as_bytes()
            .iter()
            .map(|&b| usize::from(b))
            .sum::<usize>();
    }
    black_box(sum);
}

/// Median, p99 and mean of `iterations` single timed calls of `f`, in nanoseconds; `prepare`
/// runs before each call, untimed.
fn timed(
    iterations: usize,
    mut prepare: impl FnMut(usize),
    mut f: impl FnMut(usize) -> bool,
) -> serde_json::Value {
    let mut ns = Vec::with_capacity(iterations);
    let mut allowed = 0usize;
    for i in 0..iterations {
        prepare(i);
        let t0 = Instant::now();
        let ok = black_box(f(black_box(i)));
        ns.push(t0.elapsed().as_nanos() as u64);
        allowed += usize::from(ok);
    }
    assert_eq!(allowed, iterations, "every benchmarked request is allowed");
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() - 1) as f64 * p).round() as usize];
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
    serde_json::json!({
        "iterations": iterations,
        "median_ns": at(0.5),
        "p90_ns": at(0.9),
        "p99_ns": at(0.99),
        "p999_ns": at(0.999),
        "mean_ns": mean,
    })
}

fn benches(c: &mut Criterion) {
    let fx = Fixture::new();
    assert!(
        fx.session_decision(&fx.requests[0]),
        "the session is allowed"
    );
    assert!(
        fx.machine_decision(&fx.requests[0]),
        "the machine is allowed"
    );
    assert!(
        fx.agent_decision(&fx.requests[0], &fx.agents[0]),
        "the agent is allowed"
    );

    let mut group = c.benchmark_group("session");
    group.bench_function("one_user", |b| {
        let req = &fx.requests[0];
        b.iter(|| fx.session_decision(black_box(req)));
    });
    group.bench_function("random_user", |b| {
        let mut i = 0usize;
        b.iter_custom(|iterations| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iterations {
                i = (i + 7919) % SESSIONS;
                let req = &fx.requests[i];
                warm(req);
                let t0 = Instant::now();
                black_box(fx.session_decision(black_box(req)));
                total += t0.elapsed();
            }
            total
        });
    });
    group.finish();
    let mut group = c.benchmark_group("machine");
    group.bench_function("decide", |b| {
        b.iter(|| fx.machine_decision(&fx.requests[0]))
    });
    group.finish();
    let random_agent = |i: usize| &fx.agents[(i * 7919) % fx.agents.len()];
    let mut group = c.benchmark_group("agent");
    group.bench_function("random_agent", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            fx.agent_decision(&fx.requests[0], black_box(random_agent(i)))
        })
    });
    group.finish();

    // Per-iteration timings for the percentiles criterion does not give.
    let random_request = |i: usize| &fx.requests[(i * 7919) % SESSIONS];
    let timer = timed(TIMED_ITERATIONS, |_| {}, |_| true);
    let one = timed(
        TIMED_ITERATIONS,
        |_| {},
        |_| fx.session_decision(&fx.requests[0]),
    );
    let random = timed(
        TIMED_ITERATIONS,
        |i| warm(random_request(i)),
        |i| fx.session_decision(random_request(i)),
    );
    let machine = timed(
        TIMED_ITERATIONS,
        |_| {},
        |_| fx.machine_decision(&fx.requests[0]),
    );
    let agent = timed(
        TIMED_ITERATIONS,
        |_| {},
        |i| fx.agent_decision(&fx.requests[0], random_agent(i)),
    );
    let (users, groups) = fx.directory.counts();
    let out = serde_json::json!({
        "users": users,
        "groups": groups,
        "agents": fx.agents.len(),
        "sessions": SESSIONS,
        "timer_overhead": timer,
        "session/one_user": one,
        "session/random_user": random,
        "machine/decide": machine,
        "agent/random_agent": agent,
    });
    eprintln!("per-iteration timings: {out:#}");
    let dir = target_dir().join("bench-results");
    std::fs::create_dir_all(&dir).expect("create target/bench-results");
    std::fs::write(dir.join("decision.json"), out.to_string()).expect("write decision.json");
}

criterion_group!(decision, benches);
criterion_main!(decision);
