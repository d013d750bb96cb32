//! "Nothing acknowledged is lost": SCIM clients stream writes while the server is killed with
//! `SIGKILL` at random moments and restarted on the same `data_dir`; at the end every write
//! that had been answered 2xx must be there.
//!
//! Each writer task owns its users and is the only one changing their memberships, one
//! request at a time, so for every (group, user) pair the expected final state is the result
//! of the last acknowledged PATCH, unless a later PATCH of that pair got no answer (cut by a
//! kill): then either state is right. A create (of a user, or of an agent with one of the
//! writer's users as its owner) that got no answer may or may not exist, but never twice. The
//! kill schedule comes from a seeded generator; the seed is printed, and
//! `SCIM_CRASH_SEED=<seed>` repeats it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_tests::rng::Rng;
use portcullis_tests::scim::{agent, patch_ops, user};
use portcullis_tests::{ScimClient, ScimResponse};
use reqwest::Method;
use serde_json::json;

use crate::{scim_config, SCIM_TOKEN};

/// Kills to make; the test fails if fewer than [`MIN_KILLS`] happened within [`MAX_TIME`].
const KILLS: usize = 25;
/// Kills a loaded machine, whose restarts are slow, must still make within [`MAX_TIME`].
const MIN_KILLS: usize = 20;
/// Time for the whole kill phase (the checks after it take a few seconds more).
/// (a bound for a loaded machine, where restarts are slow: the phase ends at `KILLS` first).
const MAX_TIME: Duration = Duration::from_secs(120);
const WRITERS: usize = 6;
const GROUPS: usize = 4;
/// Most requests one writer sends (a bound in case the server is very fast).
const MAX_REQUESTS_PER_WRITER: usize = 20_000;
/// A request cut by a kill fails at once; one to a hung server fails after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The membership of one (group, user) pair as this writer knows it.
#[derive(Debug, Clone, Copy, Default)]
struct Pair {
    /// The state set by the last acknowledged PATCH (`None`: never acknowledged).
    acked: Option<bool>,
    /// A PATCH after the last acknowledged one got no answer.
    unknown_since: bool,
}

#[derive(Debug, Default)]
struct WriterLog {
    /// `userName → id` of creates answered 201.
    acked_users: Vec<(String, String)>,
    /// userNames of creates that got no answer.
    unknown_users: Vec<String>,
    /// `(name, id, owner's id)` of Agents' creates answered 201.
    acked_agents: Vec<(String, String, String)>,
    /// names of Agents' creates that got no answer.
    unknown_agents: Vec<String>,
    /// `(group index, user id) → state`.
    pairs: HashMap<(usize, String), Pair>,
    acked_writes: usize,
    unknown_writes: usize,
    /// Answers that are neither 2xx nor a cut connection: each is a failure.
    unexpected: Vec<String>,
}

/// What happened to one request.
enum Outcome {
    Acked(ScimResponse),
    Unknown,
    Unexpected(String),
}

async fn send(
    scim: &ScimClient,
    method: Method,
    path: &str,
    body: &serde_json::Value,
    expected: &[u16],
) -> Outcome {
    match scim.try_request(method, path, &[], Some(body), &[]).await {
        Ok(resp) if expected.contains(&resp.status) => Outcome::Acked(resp),
        Ok(resp) => Outcome::Unexpected(format!(
            "{} {}: {} {}",
            resp.method, resp.url, resp.status, resp.text
        )),
        Err(_) => Outcome::Unknown,
    }
}

async fn writer(
    index: usize,
    scim: ScimClient,
    groups: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> WriterLog {
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
    let mut log = WriterLog::default();
    let mut created = 0usize;
    for _ in 0..MAX_REQUESTS_PER_WRITER {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let create = log.acked_users.len() < 3 || rng.chance(40);
        let cut = if create && !log.acked_users.is_empty() && rng.chance(25) {
            // An agent, owned by one of this writer's users: kept with its owner's link.
            let name = format!("crash-w{index}-agent-{created}");
            created += 1;
            let (_, owner) =
                log.acked_users[rng.below(log.acked_users.len() as u64) as usize].clone();
            let body = agent(&name, &[&owner], &[]);
            match send(&scim, Method::POST, "/Agents", &body, &[201]).await {
                Outcome::Acked(resp) => {
                    log.acked_agents.push((name, resp.id(), owner));
                    log.acked_writes += 1;
                    false
                }
                Outcome::Unknown => {
                    log.unknown_agents.push(name);
                    log.unknown_writes += 1;
                    true
                }
                Outcome::Unexpected(e) => {
                    log.unexpected.push(e);
                    false
                }
            }
        } else if create {
            let name = format!("crash-w{index}-{created}@example.com");
            created += 1;
            match send(&scim, Method::POST, "/Users", &user(&name), &[201]).await {
                Outcome::Acked(resp) => {
                    log.acked_users.push((name, resp.id()));
                    log.acked_writes += 1;
                    false
                }
                Outcome::Unknown => {
                    log.unknown_users.push(name);
                    log.unknown_writes += 1;
                    true
                }
                Outcome::Unexpected(e) => {
                    log.unexpected.push(e);
                    false
                }
            }
        } else {
            let (_, user_id) =
                log.acked_users[rng.below(log.acked_users.len() as u64) as usize].clone();
            let g = rng.below(GROUPS as u64) as usize;
            let add = rng.chance(60);
            // Okta's two forms; a PATCH may be answered 200 with the group or 204.
            let ops = if add {
                json!([{"op": "add", "path": "members", "value": [{"value": user_id}]}])
            } else {
                json!([{"op": "remove", "path": format!("members[value eq \"{user_id}\"]")}])
            };
            let path = format!("/Groups/{}", groups[g]);
            let outcome = send(&scim, Method::PATCH, &path, &patch_ops(ops), &[200, 204]).await;
            let pair = log.pairs.entry((g, user_id)).or_default();
            match outcome {
                Outcome::Acked(_) => {
                    *pair = Pair {
                        acked: Some(add),
                        unknown_since: false,
                    };
                    log.acked_writes += 1;
                    false
                }
                Outcome::Unknown => {
                    pair.unknown_since = true;
                    log.unknown_writes += 1;
                    true
                }
                Outcome::Unexpected(e) => {
                    log.unexpected.push(e);
                    false
                }
            }
        };
        if cut {
            // The server is down or restarting: do not spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill() {
    let seed = Rng::seed_from_env("SCIM_CRASH_SEED");
    println!("scim crash test seed: {seed} (SCIM_CRASH_SEED={seed} repeats the kill schedule)");
    eprintln!("scim crash test seed: {seed}");
    let mut rng = Rng::new(seed);

    let cfg = scim_config();
    let mut px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let mut groups = Vec::new();
    for g in 0..GROUPS {
        groups.push(
            scim.create_group(&format!("crash-group-{g}"), &[])
                .await
                .id(),
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            tokio::spawn(writer(
                i,
                scim.with_timeout(REQUEST_TIMEOUT),
                groups.clone(),
                seed,
                stop.clone(),
            ))
        })
        .collect();

    let started = Instant::now();
    let mut kills = 0;
    let mut down_for = Duration::ZERO;
    while kills < KILLS && started.elapsed() < MAX_TIME {
        tokio::time::sleep(Duration::from_millis(rng.range(30, 900))).await;
        px.kill_hard();
        kills += 1;
        let down = Instant::now();
        // Sometimes restart at once, sometimes let clients hit a closed port for a while.
        if rng.chance(50) {
            tokio::time::sleep(Duration::from_millis(rng.range(0, 200))).await;
        }
        px.restart().await;
        down_for += down.elapsed();
    }
    // A last stretch of writes on a server that is not killed, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.expect("writer task"));
    }
    let elapsed = started.elapsed();

    let acked: usize = logs.iter().map(|l| l.acked_writes).sum();
    let unknown: usize = logs.iter().map(|l| l.unknown_writes).sum();
    println!(
        "{kills} kills in {elapsed:?} (down {down_for:?} in all); writes: {acked} acknowledged, \
         {unknown} without an answer"
    );
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills within {MAX_TIME:?} (seed {seed}); restarts too slow?"
    );
    let unexpected: Vec<&String> = logs.iter().flat_map(|l| &l.unexpected).collect();
    assert!(
        unexpected.is_empty(),
        "answers that are neither 2xx nor a cut connection (seed {seed}): {unexpected:#?}"
    );
    assert!(
        acked > 5 * KILLS,
        "too few acknowledged writes ({acked}) to say anything (seed {seed})"
    );

    // One more crash right after the last writes, then check on a fresh process.
    px.kill_hard();
    px.restart().await;
    verify(&scim, &groups, &logs, seed).await;
}

async fn verify(scim: &ScimClient, groups: &[String], logs: &[WriterLog], seed: u64) {
    let mut lost = Vec::new();
    // Every acknowledged create is there, by id and by its userName.
    for (name, id) in logs.iter().flat_map(|l| &l.acked_users) {
        let got = scim.get(&format!("/Users/{id}")).await;
        if got.status != 200 || got.body["userName"] != name.as_str() {
            lost.push(format!(
                "user {name} ({id}): GET {} {}",
                got.status, got.text
            ));
            continue;
        }
        let found = scim
            .filter("/Users", &format!("userName eq \"{name}\""))
            .await;
        if found.status != 200 || found.body["totalResults"] != 1 {
            lost.push(format!(
                "user {name}: lookup by userName {} {}",
                found.status, found.text
            ));
        }
    }
    // A create without an answer is there at most once.
    for name in logs.iter().flat_map(|l| &l.unknown_users) {
        let found = scim
            .filter("/Users", &format!("userName eq \"{name}\""))
            .await
            .expect(200);
        let n = found.body["totalResults"].as_u64().unwrap_or(u64::MAX);
        if n > 1 {
            lost.push(format!("unacknowledged user {name} exists {n} times"));
        }
    }
    // Every acknowledged agent is there, by id and by its name, with its owner; one without an
    // answer at most once.
    for (name, id, owner) in logs.iter().flat_map(|l| &l.acked_agents) {
        let got = scim.get(&format!("/Agents/{id}")).await;
        let owners = &got.body[portcullis_tests::scim::PORTCULLIS_AGENT_SCHEMA]["owners"];
        let owned = owners
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["value"] == owner.as_str()));
        if got.status != 200 || got.body["name"] != name.as_str() || !owned {
            lost.push(format!(
                "agent {name} ({id}) of {owner}: GET {} {}",
                got.status, got.text
            ));
        }
    }
    for (name, acked) in logs
        .iter()
        .flat_map(|l| l.acked_agents.iter().map(|a| (&a.0, true)))
        .chain(
            logs.iter()
                .flat_map(|l| l.unknown_agents.iter().map(|n| (n, false))),
        )
    {
        let found = scim
            .filter("/Agents", &format!("name eq \"{name}\""))
            .await
            .expect(200);
        let n = found.body["totalResults"].as_u64().unwrap_or(u64::MAX);
        if (acked && n != 1) || n > 1 {
            lost.push(format!(
                "agent {name} (acknowledged: {acked}) found {n} times"
            ));
        }
    }
    let acked_users: usize = logs.iter().map(|l| l.acked_users.len()).sum();
    let unknown_users: usize = logs.iter().map(|l| l.unknown_users.len()).sum();
    let total = scim
        .get_query("/Users", &[("count", "1")])
        .await
        .expect(200)
        .body["totalResults"]
        .as_u64()
        .unwrap_or(0) as usize;
    if total < acked_users || total > acked_users + unknown_users {
        lost.push(format!(
            "{total} users; expected {acked_users} acknowledged plus at most {unknown_users} \
             unacknowledged"
        ));
    }

    // Every pair whose last PATCH was acknowledged is in that state.
    let mut members: Vec<HashSet<String>> = Vec::new();
    for group in groups {
        members.push(scim.member_ids(group).await.into_iter().collect());
    }
    let mut checked = 0;
    for ((g, user_id), pair) in logs.iter().flat_map(|l| &l.pairs) {
        let (Some(expected), false) = (pair.acked, pair.unknown_since) else {
            continue;
        };
        checked += 1;
        let present = members[*g].contains(user_id);
        if present != expected {
            lost.push(format!(
                "group {} ({}): user {user_id} {} but the last acknowledged PATCH {} it",
                g,
                groups[*g],
                if present {
                    "is a member"
                } else {
                    "is not a member"
                },
                if expected { "added" } else { "removed" }
            ));
        }
    }
    // And no group holds a user that was never acknowledged anywhere near it.
    let pairs: HashSet<(usize, &String)> = logs
        .iter()
        .flat_map(|l| l.pairs.keys())
        .map(|(g, u)| (*g, u))
        .collect();
    for (g, ids) in members.iter().enumerate() {
        for id in ids {
            if !pairs.contains(&(g, id)) {
                lost.push(format!("group {g} holds {id}, which no PATCH ever added"));
            }
        }
    }
    let acked_agents: usize = logs.iter().map(|l| l.acked_agents.len()).sum();
    println!(
        "verified {acked_users} acknowledged users, {acked_agents} agents and {checked} \
         acknowledged memberships"
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes lost or state corrupted after SIGKILL (seed {seed}):\n{}",
        lost.join("\n")
    );
    // The memberships are half of what is promised: enough of them checked to say anything.
    assert!(
        checked > 5 * KILLS,
        "too few acknowledged memberships ({checked}) to say anything (seed {seed})"
    );
}

/// What a restart must rebuild from disk: the in-memory index (case-insensitive userName,
/// externalId, emails, group names, memberships both ways and through nested groups), the
/// change sequence behind ETags, and what deletes and renames freed or took.
#[tokio::test(flavor = "multi_thread")]
async fn the_index_and_etags_are_rebuilt_after_sigkill() {
    let cfg = scim_config();
    let mut px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    let mut ann_body = user("Ann.Lee@example.com");
    ann_body["externalId"] = json!("ext-ann");
    ann_body["emails"] = json!([{"type": "work", "value": "ann@work.example"}]);
    ann_body["password"] = json!("ann-secret-password");
    // Every ETag handed out before the crash; none may come back for a later change.
    let mut seen = HashSet::new();
    let mut keep = |resp: ScimResponse| {
        if let Some(etag) = resp.etag() {
            seen.insert(etag.to_owned());
        }
        resp.id()
    };
    let ann = keep(scim.post("/Users", &ann_body).await.expect(201));
    let bob = keep(scim.create_user("bob@example.com").await);
    let gone = keep(scim.create_user("gone@example.com").await);
    let team = keep(scim.create_group("team", &[&ann, &gone]).await);
    let dept = keep(scim.create_group("dept-old-name", &[&team, &bob]).await);
    scim.patch(
        &format!("/Groups/{dept}"),
        &patch_ops(json!([{"op": "replace", "path": "displayName", "value": "dept"}])),
    )
    .await
    .expect_success();
    keep(scim.get(&format!("/Groups/{dept}")).await.expect(200));
    scim.patch(
        &format!("/Users/{bob}"),
        &patch_ops(json!([{"op": "replace", "value": {"active": false}}])),
    )
    .await
    .expect_success();
    keep(scim.get(&format!("/Users/{bob}")).await.expect(200));
    scim.delete(&format!("/Users/{gone}")).await.expect(204);
    keep(scim.get(&format!("/Groups/{team}")).await.expect(200));
    let ann_before = scim.get(&format!("/Users/{ann}")).await.expect(200);
    let ann_etag = ann_before.etag().unwrap().to_owned();
    let bob_etag = scim
        .get(&format!("/Users/{bob}"))
        .await
        .expect(200)
        .etag()
        .unwrap()
        .to_owned();
    assert!(seen.len() >= 6, "ETags before the crash: {seen:?}");

    px.kill_hard();
    px.restart().await;

    // Reads: the same resources, the same ETags.
    let ann_after = scim.get(&format!("/Users/{ann}")).await.expect(200);
    assert_eq!(ann_after.etag(), Some(ann_etag.as_str()));
    let mut before = ann_before.body.clone();
    let mut after = ann_after.body.clone();
    // `groups` is derived; compared below.
    before.as_object_mut().unwrap().remove("groups");
    after.as_object_mut().unwrap().remove("groups");
    assert_eq!(before, after, "Ann changed across the restart");
    assert!(!ann_after.text.contains("ann-secret-password"));
    scim.request(
        Method::GET,
        &format!("/Users/{ann}"),
        &[],
        None,
        &[("if-none-match", &ann_etag)],
    )
    .await
    .expect(304);
    let bob_now = scim.get(&format!("/Users/{bob}")).await.expect(200);
    assert_eq!(bob_now.body["active"], false, "{}", bob_now.text);
    assert_eq!(bob_now.etag(), Some(bob_etag.as_str()));
    scim.get(&format!("/Users/{gone}"))
        .await
        .expect_error(404, None);

    // The index answers every lookup it answered before.
    let one = |filter: &'static str, id: String| {
        let scim = scim.clone();
        async move {
            let found = scim.filter("/Users", filter).await.expect(200);
            assert_eq!(found.body["totalResults"], 1, "{filter}: {}", found.text);
            assert_eq!(found.body["Resources"][0]["id"], id.as_str(), "{filter}");
        }
    };
    one("userName eq \"ann.lee@EXAMPLE.com\"", ann.clone()).await;
    one("externalId eq \"ext-ann\"", ann.clone()).await;
    one(
        "emails[type eq \"work\"].value eq \"ann@work.example\"",
        ann.clone(),
    )
    .await;
    one("active eq false", bob.clone()).await;
    let gone_found = scim
        .filter("/Users", "userName eq \"gone@example.com\"")
        .await
        .expect(200);
    assert_eq!(gone_found.body["totalResults"], 0);
    let dept_found = scim
        .filter("/Groups", "displayName eq \"dept\"")
        .await
        .expect(200);
    assert_eq!(dept_found.body["totalResults"], 1, "{}", dept_found.text);

    // Memberships both ways, the delete's removal included, and through the nested group.
    assert_eq!(scim.member_ids(&team).await, vec![ann.clone()]);
    let mut dept_members = vec![team.clone(), bob.clone()];
    dept_members.sort();
    assert_eq!(scim.member_ids(&dept).await, dept_members);
    let mut groups: Vec<(String, String)> = ann_after.body["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|g| {
                    (
                        g["value"].as_str().unwrap_or_default().to_owned(),
                        g["type"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    groups.sort();
    let mut expected = vec![
        (team.clone(), "direct".to_owned()),
        (dept.clone(), "indirect".to_owned()),
    ];
    expected.sort();
    assert_eq!(groups, expected, "{}", ann_after.text);

    // Names: taken ones still are, freed ones are free.
    scim.post("/Users", &user("ANN.LEE@example.com"))
        .await
        .expect_error(409, Some("uniqueness"));
    scim.post("/Groups", &portcullis_tests::scim::group("dept", &[]))
        .await
        .expect_error(409, Some("uniqueness"));
    scim.create_group("dept-old-name", &[]).await;
    scim.create_user("gone@example.com").await;

    // New writes get ETags never seen before.
    let changed = scim
        .patch(
            &format!("/Users/{ann}"),
            &patch_ops(json!([{"op": "replace", "path": "title", "value": "After"}])),
        )
        .await
        .expect(200);
    let new_etag = changed.etag().unwrap().to_owned();
    assert!(
        !seen.contains(&new_etag),
        "a change after the restart reuses the ETag {new_etag} of a change before it \
         (the change sequence went back): {seen:?}"
    );
    scim.request(
        Method::GET,
        &format!("/Users/{ann}"),
        &[],
        None,
        &[("if-none-match", &ann_etag)],
    )
    .await
    .expect(200);
}
