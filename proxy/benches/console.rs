//! The console's pages against the benchmark directory of `decision.rs` (1,000,000 users,
//! 10,000 groups, 100,000 agents; `group0` holds the first 100,000 users): how long each page
//! takes to make, as the proxy makes it (on the blocking pool, from the live index, the
//! sessions and the audit log). The target is under 100 ms for the directory list and for
//! "who can reach" a route.
//!
//! Pages timed:
//! - `users`: the first page of the users list; `users?q=`: a search that must look at every
//!   user (one match, near the end); `users?page=`: the last page;
//! - `groups/group0`: the 100,000-member group's first page of members;
//! - `routes/0`: who can reach a route whose rule admits `group0` minus a deny on `/admin`;
//! - `routes/1`: who can reach a route open to anyone signed in (every user judged);
//! - `users/<id>`: a user's page (groups, routes, sessions, newest records).
//!
//! Each page is made `ROUNDS` times; the median and the slowest are printed and written to
//! `target/bench-results/console.json`. No page is timed inside another's lock, and nothing
//! is cached between rounds (the pages cache nothing).
//!
//! `cargo bench -p portcullis --bench console`; `PORTCULLIS_BENCH_USERS` as for `decision`
//! (the directory is the same, populated by whichever runs first).

// Benchmark code: a setup that fails is a bug in the benchmark, reported by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

mod shared;

use shared::{agents, open_directory, target_dir, users};

use portcullis::audit::{Audit, Destination};
use portcullis::auth::sessions::Sessions;
use portcullis::console::Console;
use portcullis::state::Runtime;
use portcullis_scim::schema::ResourceType;
use portcullis_scim::store::format_id;

const ROUNDS: usize = 7;
/// Under this, a page is on target.
const TARGET_MS: f64 = 100.0;

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

[[routes]]
from = "http://app.test"
to = ["http://127.0.0.1:3"]
accept = ["session"]
allow = { groups = ["group0"] }
deny = { groups = ["group0"], paths = ["/admin"] }

[[routes]]
from = "http://wiki.test"
to = ["http://127.0.0.1:3"]
accept = ["session"]
allow = { any_signed_in = true }

[console]
allow = { groups = ["group1"] }
"#;

fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() {
    let (users, agents) = (users(), agents());
    let (directory, kept) = open_directory(users, agents);
    let config = portcullis_config::parse(CONFIG, Path::new("/"), &|_| None)
        .unwrap_or_else(|e| panic!("bench config: {e}"));
    let runtime = Arc::new(Runtime::build(config, &directory));
    let logs = tempfile::tempdir().expect("tempdir");
    let log = || Destination::of(logs.path(), None);
    let console = Console {
        runtime,
        directory: directory.clone(),
        sessions: Sessions::new(kept, directory.clone()),
        audit: Arc::new(Audit::open(log(), log()).expect("audit")),
        config_path: logs.path().join("portcullis.toml"),
        csrf: "bench".to_owned(),
        viewer: "user1@bench.example".to_owned(),
        viewer_ip: None,
        now: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let (group0, user) = directory.read(|index| {
        let group0 = index
            .rows(ResourceType::Group)
            .find_map(|row| index.group(row).filter(|g| &*g.display_name == "group0"))
            .map(|g| format_id(g.id))
            .expect("group0");
        let user = index
            .rows(ResourceType::User)
            .nth(12_345)
            .and_then(|row| index.user(row))
            .map(|u| format_id(u.id))
            .expect("a user");
        (group0, user)
    });
    let last_page = (users as usize).div_ceil(50).to_string();
    let needle = format!("user{}@", users - 7);
    let pages: Vec<(&str, String, String)> = vec![
        ("users list, first page", "users".into(), String::new()),
        (
            "users list, last page",
            "users".into(),
            format!("page={last_page}"),
        ),
        (
            "users search (every user looked at)",
            "users".into(),
            format!("q={needle}"),
        ),
        (
            "group0 (100,000 members)",
            format!("groups/{group0}"),
            String::new(),
        ),
        (
            "who can reach: group0 minus a deny",
            "routes/0".into(),
            String::new(),
        ),
        (
            "who can reach: anyone signed in",
            "routes/1".into(),
            String::new(),
        ),
        ("a user's page", format!("users/{user}"), String::new()),
    ];
    let mut rows = Vec::new();
    println!(
        "{:<40} {:>12} {:>12}",
        "console page", "median ms", "slowest ms"
    );
    for (name, page, query) in &pages {
        let mut ms = Vec::with_capacity(ROUNDS);
        let mut bytes = 0;
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let reply = console.get(page, query);
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            assert_eq!(reply.status, 200, "{page}?{query}");
            bytes = reply.body.len();
        }
        let slowest = ms.iter().copied().fold(0.0, f64::max);
        let median = median(ms);
        let mark = if median < TARGET_MS {
            ""
        } else {
            "  (over 100 ms)"
        };
        println!("{name:<40} {median:>12.1} {slowest:>12.1}{mark}");
        rows.push(serde_json::json!({
            "page": name, "path": page, "query": query,
            "median_ms": median, "slowest_ms": slowest, "bytes": bytes,
        }));
    }
    let out = target_dir().join("bench-results");
    std::fs::create_dir_all(&out).expect("bench-results");
    let results = serde_json::json!({
        "users": users, "groups": 10_000, "agents": agents, "rounds": ROUNDS,
        "target_ms": TARGET_MS, "pages": rows,
    });
    std::fs::write(out.join("console.json"), results.to_string()).expect("write results");
}
