//! What the benchmarks share: the benchmark directory (1,000,000 users, 10,000 groups and
//! 100,000 agents by default, written by `scim/examples/populate.rs` and cached in
//! `target/bench-data/`), loaded into the in-memory index as at start-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use portcullis::auth::sessions::Kept;
use portcullis_scim::store::redb::RedbStorage;
use portcullis_scim::store::{Directory, Sinks};

#[path = "../../../scim/examples/populate.rs"]
#[allow(dead_code)]
mod populate;

pub const GROUPS: u64 = 10_000;
/// Agents in the directory unless `PORTCULLIS_BENCH_AGENTS` says otherwise.
const AGENTS: u64 = 100_000;

/// Users in the directory: `PORTCULLIS_BENCH_USERS`, 1,000,000 by default.
pub fn users() -> u64 {
    std::env::var("PORTCULLIS_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

pub fn agents() -> u64 {
    std::env::var("PORTCULLIS_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(AGENTS)
}

pub fn target_dir() -> PathBuf {
    // CARGO_MANIFEST_DIR is proxy/; the workspace's target/ is beside it.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("target")
}

/// The populated directory store, built once and kept under target/bench-data/.
fn directory_data(users: u64, agents: u64) -> PathBuf {
    let dir = target_dir()
        .join("bench-data")
        .join(format!("directory-{users}-{GROUPS}-{agents}"));
    let done = dir.join("populated");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "populating {users} users, {GROUPS} groups and {agents} agents in {} ...",
            dir.display()
        );
        populate::populate(&dir, users, GROUPS, agents).expect("populate");
        std::fs::write(&done, b"").expect("mark populated");
    }
    dir
}

/// The benchmark directory, opened with its sessions kept beside it (as `serve` opens it).
pub fn open_directory(users: u64, agents: u64) -> (Arc<Directory>, Arc<Kept>) {
    let data = directory_data(users, agents);
    let started = Instant::now();
    let storage = RedbStorage::open(&data).expect("open storage");
    let kept = Arc::new(Kept::default());
    let sinks = Sinks {
        changes: None,
        entries: Some(kept.clone()),
    };
    let directory = Arc::new(
        Directory::open_with_sinks(
            Arc::new(storage),
            Box::new(time::OffsetDateTime::now_utc),
            sinks,
        )
        .expect("open directory"),
    );
    eprintln!(
        "directory loaded: {:?} (users, groups) in {:.1} s",
        directory.counts(),
        started.elapsed().as_secs_f64()
    );
    (directory, kept)
}
