//! Fills a data directory with a large synthetic directory, for benchmarks (bench/scim.py):
//! `cargo run --release -p portcullis-scim --example populate -- DATA_DIR USERS GROUPS [AGENTS]`.
//! The decision-path benchmark (`proxy/benches/decision.rs`) includes this file as a module and
//! calls [`populate`], so both measure the very same directory.
//!
//! Users are `user{n}@bench.example` with id `00000000-0000-4000-8000-{n:012}`; groups are
//! `group{n}` with id `00000000-0000-4000-9000-{n:012}`. Every user is in one of the groups
//! (round-robin); `group0` additionally holds the first 100,000 users and `group1` holds
//! 10, so a benchmark can change a large and a small group. Agents are `agent{n}` with id
//! `00000000-0000-4000-a000-{n:012}`, each owned by `group0` (a group owner: an active member
//! stands for it) and running in the one AgenticApplication `bench-app`. Records go straight
//! to storage in large transactions, as the writer would have stored them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use portcullis_scim::schema::ResourceType;
use portcullis_scim::store::redb::RedbStorage;
use portcullis_scim::store::{Batch, Record, Storage};

fn user_id(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn group_id(n: u64) -> String {
    format!("00000000-0000-4000-9000-{n:012}")
}

fn agent_id(n: u64) -> String {
    format!("00000000-0000-4000-a000-{n:012}")
}

const APPLICATION_ID: &str = "00000000-0000-4000-b000-000000000000";

fn meta(rt: &str, seq: u64) -> serde_json::Value {
    json!({
        "resourceType": rt,
        "created": "2026-01-01T00:00:00Z",
        "lastModified": "2026-01-01T00:00:00Z",
        "version": format!("W/\"{seq}\""),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: populate DATA_DIR USERS GROUPS [AGENTS]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let users: u64 = args.next().ok_or(usage)?.parse()?;
    let groups: u64 = args.next().ok_or(usage)?.parse()?;
    let agents: u64 = args.next().map_or(Ok(0), |a| a.parse())?;
    populate(&dir, users, groups, agents)
}

/// Writes `users` users, `groups` groups (at least 2) and `agents` agents (with their one
/// application, when there are any) into a new directory store in `dir`.
pub fn populate(
    dir: &Path,
    users: u64,
    groups: u64,
    agents: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let groups = groups.max(2);
    std::fs::create_dir_all(dir)?;
    let storage = RedbStorage::open(dir)?;
    let started = Instant::now();

    // Rows: users 1..=users, groups after them, then agents, then the application.
    let group_row = |g: u64| users + 1 + g;
    let agent_row = |a: u64| users + groups + 1 + a;
    let application_row = users + groups + agents + 1;
    let mut seq = 0u64;
    let mut batch = Batch::default();
    let flush = |batch: &mut Batch, seq: u64| -> Result<(), Box<dyn std::error::Error>> {
        batch.seq = seq;
        batch.next_row = application_row + 1;
        storage.commit(batch)?;
        *batch = Batch::default();
        Ok(())
    };
    for g in 0..groups {
        seq += 1;
        let resource = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "id": group_id(g),
            "displayName": format!("group{g}"),
            "meta": meta("Group", seq),
        });
        batch.records.push((
            ResourceType::Group,
            group_row(g),
            Some(Record {
                resource,
                password_hash: None,
                valid_since: Some(0),
                valid_since_unix: None,
                retired: false,
                later: serde_json::Map::new(),
            }),
        ));
    }
    flush(&mut batch, seq)?;
    for n in 0..users {
        seq += 1;
        let name = format!("user{n}@bench.example");
        let resource = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": user_id(n),
            "userName": name,
            "externalId": format!("ext-{n}"),
            "name": {"givenName": "User", "familyName": format!("Number{n}")},
            "emails": [{"type": "work", "value": name, "primary": true}],
            "active": true,
            "meta": meta("User", seq),
        });
        let row = n + 1;
        batch.records.push((
            ResourceType::User,
            row,
            Some(Record {
                resource,
                password_hash: None,
                valid_since: Some(0),
                valid_since_unix: None,
                retired: false,
                later: serde_json::Map::new(),
            }),
        ));
        batch
            .members
            .push((group_row(2 + n % (groups - 2).max(1)), row, true));
        if n < 100_000 {
            batch.members.push((group_row(0), row, true));
        }
        if n < 10 {
            batch.members.push((group_row(1), row, true));
        }
        if batch.records.len() >= 20_000 {
            flush(&mut batch, seq)?;
        }
    }
    flush(&mut batch, seq)?;
    if agents > 0 {
        seq += 1;
        let resource = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:AgenticApplication"],
            "id": APPLICATION_ID,
            "name": "bench-app",
            "active": true,
            "meta": meta("AgenticApplication", seq),
        });
        batch.records.push((
            ResourceType::AgenticApplication,
            application_row,
            Some(record(resource)),
        ));
    }
    const EXTENSION: &str = portcullis_scim::schema::PORTCULLIS_AGENT_SCHEMA;
    for n in 0..agents {
        seq += 1;
        let resource = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Agent", EXTENSION],
            "id": agent_id(n),
            "name": format!("agent{n}"),
            "active": true,
            EXTENSION: {
                "owners": [{"value": group_id(0), "type": "Group"}],
                "applications": [{"value": APPLICATION_ID}],
            },
            "meta": meta("Agent", seq),
        });
        batch
            .records
            .push((ResourceType::Agent, agent_row(n), Some(record(resource))));
        if batch.records.len() >= 20_000 {
            flush(&mut batch, seq)?;
        }
    }
    flush(&mut batch, seq)?;
    eprintln!(
        "populated {users} users, {groups} groups and {agents} agents in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn record(resource: serde_json::Value) -> Record {
    Record {
        resource,
        password_hash: None,
        valid_since: None,
        valid_since_unix: None,
        retired: false,
        later: serde_json::Map::new(),
    }
}
