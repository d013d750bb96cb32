//! The audit log end to end: SCIM changes, refusals and sampled allows land in
//! `data_dir/audit.jsonl`, `portcullis audit` reads them back with its filters, and the file
//! keeps growing across a restart.

use std::time::{Duration, Instant};

use portcullis_tests::process::run;
use portcullis_tests::scim::{patch_ops, ScimClient};
use portcullis_tests::{ConfigBuilder, Portcullis, Route, Upstream};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{scim_config, SCIM_TOKEN};

/// `portcullis audit --config <px's config> <args>`; panics unless it succeeds.
async fn audit(px: &Portcullis, args: &[&str]) -> Vec<String> {
    let config = px.config_path().display().to_string();
    let mut all = vec!["audit", "--config", &config];
    all.extend_from_slice(args);
    let out = run(px.dir(), &all).await;
    assert!(out.status.success(), "portcullis {all:?}: {}", out.stderr);
    out.stdout.lines().map(str::to_owned).collect()
}

/// The records that `args` select, as JSON, once `done` holds for them (the log is written
/// just after the answers, by another thread).
pub(crate) async fn audit_json_until(
    px: &Portcullis,
    args: &[&str],
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<Value> = audit(px, &all)
            .await
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "the audit log never had what was expected: {records:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The records of `event`, in the order written.
///
/// Not the refusals of the fixtures' own waits for sign-in (`wait_sign_in_available`), which
/// ask `/.portcullis/sign_in` until the provider is discovered: each ask before is refused, and
/// recorded, as many times as a loaded machine takes to discover it.
pub(crate) fn of_event<'a>(records: &'a [Value], event: &str) -> Vec<&'a Value> {
    let waiting = |r: &Value| {
        r["path"] == "/.portcullis/sign_in"
            && (r["reason"].as_str())
                .is_some_and(|why| why.contains("sign-in is unavailable: the identity provider"))
    };
    (records.iter())
        .filter(|r| r["event"] == event && !waiting(r))
        .collect()
}

/// The first refusal whose reason `said` holds for, once it is written.
pub(crate) async fn refusal_where(px: &Portcullis, said: impl Fn(&str) -> bool) -> Value {
    let of = |r: &&Value| r["reason"].as_str().is_some_and(&said);
    let records = audit_json_until(px, &[], |records| {
        of_event(records, "refusal").iter().any(of)
    })
    .await;
    let found = of_event(&records, "refusal").into_iter().find(of);
    found.cloned().expect("the refusal")
}

#[tokio::test(flavor = "multi_thread")]
async fn scim_changes_refusals_and_sampled_allows_are_audited_and_read_back() {
    let up = Upstream::start("up").await;
    let cfg = scim_config().route(
        Route::new("http://open.test", &[&up])
            .accept(&["public"])
            .set("allow = { public = true, paths = [\"/open\"] }"),
    );
    let toml = format!("{}\n[identity]\nallow_sample_rate = 1.0\n", cfg.toml());
    let mut px = Portcullis::start(&toml).await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);

    let id = scim.create_user("carol@corp.example").await.id();
    scim.patch(
        &format!("/Users/{id}"),
        &patch_ops(json!([{"op": "replace", "path": "active", "value": false}])),
    )
    .await
    .expect_success();
    scim.delete(&format!("/Users/{id}")).await.expect(204);

    let client = portcullis_tests::client::plain_client();
    let refused = client
        .delete(cfg.http_url("open.test", "/closed?token=s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let allowed = client
        .get(cfg.http_url("open.test", "/open/page"))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);

    let records = audit_json_until(&px, &[], |r| {
        of_event(r, "change").len() == 3
            && of_event(r, "refusal").len() == 1
            && of_event(r, "allow").len() == 1
    })
    .await;
    let changes = of_event(&records, "change");
    let ops: Vec<&str> = changes.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["create", "patch", "delete"], "{records:#?}");
    for change in &changes {
        assert_eq!(change["actor"], "okta", "{change}");
        // Where from: a leaked SCIM token's writes are told from the IdP's by their address.
        assert_eq!(change["client"], "127.0.0.1", "{change}");
        assert_eq!(change["resource_type"], "User", "{change}");
        assert_eq!(change["id"], id.as_str(), "{change}");
    }
    // Who was created and deleted, by name; a deactivation in so many words.
    let summaries: Vec<&str> = changes
        .iter()
        .map(|c| c["summary"].as_str().unwrap())
        .collect();
    assert_eq!(
        summaries,
        [
            "created userName \"carol@corp.example\"",
            "attributes, deactivated",
            "deleted userName \"carol@corp.example\""
        ],
        "{records:#?}"
    );
    let seqs: Vec<u64> = changes.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let refusal = of_event(&records, "refusal")[0];
    assert_eq!(refusal["user"], "anonymous", "{refusal}");
    assert_eq!(refusal["method"], "DELETE", "{refusal}");
    assert_eq!(
        refusal["path"], "/closed",
        "the query is never logged: {refusal}"
    );
    assert!(refusal["route"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(refusal["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let allow = of_event(&records, "allow")[0];
    assert_eq!(allow["path"], "/open/page", "{allow}");
    for record in [refusal, allow] {
        assert_eq!(record["client"], "127.0.0.1", "{record}");
    }

    // Human-readable by default, one line a record; no secrets anywhere.
    let lines = audit(&px, &[]).await;
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(
        lines[0].contains("okta") && lines[0].contains("create"),
        "{lines:#?}"
    );
    assert!(
        lines[3].contains("refusal") && lines[3].contains("/closed"),
        "{lines:#?}"
    );
    let file = std::fs::read_to_string(px.dir().join("data/audit.jsonl")).unwrap();
    assert!(
        !file.contains(SCIM_TOKEN) && !file.contains("s3cret"),
        "{file}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(px.dir().join("data/audit.jsonl"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // --user matches the actor or the user, in any case.
    assert_eq!(audit(&px, &["--user", "OKTA"]).await.len(), 3);
    let mine = audit(&px, &["--user", "Anonymous"]).await;
    assert_eq!(mine.len(), 2, "{mine:#?}");
    assert!(
        mine[0].contains("refusal") && mine[1].contains("allow"),
        "{mine:#?}"
    );
    assert!(audit(&px, &["--user", "nobody"]).await.is_empty());
    // --since takes a duration back from now or an RFC 3339 time.
    assert_eq!(audit(&px, &["--since", "1h"]).await.len(), 5);
    assert!(audit(&px, &["--since", "2999-01-01T00:00:00Z"])
        .await
        .is_empty());
    assert_eq!(
        audit(&px, &["--since", "2000-01-01T00:00:00Z", "--user", "okta"])
            .await
            .len(),
        3
    );
    let config = px.config_path().display().to_string();
    let bad = run(px.dir(), &["audit", "--config", &config, "--since", "soon"]).await;
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("--since"), "{}", bad.stderr);
    // Read with the file as it is while an upstream's name does not resolve (the running proxy
    // keeps the address it had): the log is read all the same.
    let unresolved = px.dir().join("unresolved.toml");
    let text = std::fs::read_to_string(px.config_path()).unwrap();
    let moved = text.replacen(&up.url(), "http://upstream.does-not-resolve.invalid:80", 1);
    assert_ne!(moved, text, "the config names the upstream");
    std::fs::write(&unresolved, moved).unwrap();
    let unresolved = unresolved.display().to_string();
    let read = run(
        px.dir(),
        &["audit", "--config", &unresolved, "--user", "okta"],
    )
    .await;
    assert!(read.status.success(), "{}", read.stderr);
    assert_eq!(read.stdout.lines().count(), 3, "{}", read.stdout);

    // The file survives a restart, and the restarted server appends to it. A change the
    // log lost (here cut from the file, as a crash between the commit and the log's write
    // would) is appended again from the directory at start, and no change twice.
    px.terminate().await;
    let path = px.dir().join("data/audit.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|line| !line.contains(r#""op":"delete""#))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&path, kept.concat()).unwrap();
    // Nor, then, had the log kept the delete's sequence beside it.
    std::fs::remove_file(px.dir().join("data/audit.last-change")).unwrap();
    px.restart().await;
    let records = audit_json_until(&px, &["--user", "okta"], |r| r.len() == 3).await;
    assert_eq!(records[0]["op"], "create");
    assert_eq!(records[2]["op"], "delete");
    scim.create_user("dave@corp.example").await;
    let records = audit_json_until(&px, &["--user", "okta"], |r| r.len() == 4).await;
    assert_eq!(records[3]["op"], "create");
    assert!(records[3]["seq"].as_u64() > records[2]["seq"].as_u64());

    // Rotated (as logrotate does, by moving the file away) while it runs: the next record
    // starts a new file, and a restart appends nothing the moved file has.
    let rotated = px.dir().join("data/audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    scim.create_user("erin@corp.example").await;
    let records = audit_json_until(&px, &["--user", "okta"], |r| r.len() == 1).await;
    assert_eq!(
        records[0]["summary"],
        "created userName \"erin@corp.example\""
    );
    let moved = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        moved
            .trim_end()
            .ends_with(r#""summary":"created userName \"dave@corp.example\""}"#),
        "{moved}"
    );
    px.terminate().await;
    px.restart().await;
    scim.create_user("fay@corp.example").await;
    let records = audit_json_until(&px, &["--user", "okta"], |r| r.len() == 2).await;
    assert_eq!(
        records[1]["summary"],
        "created userName \"fay@corp.example\""
    );
}

/// Portcullis with one public route, `http://open.test`, whose only public paths are under
/// `/open`: anyone's requests elsewhere there are refused.
async fn open_route() -> (Upstream, ConfigBuilder, Portcullis) {
    let up = Upstream::start("up").await;
    let cfg = scim_config().route(
        Route::new("http://open.test", &[&up])
            .accept(&["public"])
            .set("allow = { public = true, paths = [\"/open\"] }"),
    );
    let px = Portcullis::start(&cfg.toml()).await;
    (up, cfg, px)
}

/// Ctrl-C (SIGINT) stops Portcullis as SIGTERM does: the refusals counted but not yet written
/// out (past the route's budget) are written before it exits. (pingora's own SIGINT stops at
/// once, without them.)
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupt_writes_out_the_refusals_it_counted() {
    let (_up, cfg, mut px) = open_route().await;
    let client = portcullis_tests::client::plain_client();
    let url = cfg.http_url("open.test", "/closed");
    // Rounds of 200 until some were counted (a second held more than the budget of 100), at
    // most 10.
    let mut sent: u64 = 0;
    for _ in 0..10 {
        let mut round = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, url) = (client.clone(), url.clone());
            round.spawn(async move {
                for _ in 0..25 {
                    let refused = client.post(&url).send().await.unwrap();
                    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
                }
            });
        }
        while let Some(done) = round.join_next().await {
            done.unwrap();
        }
        sent += 200;
        if px.log().contains("the rest are counted") {
            break;
        }
    }
    px.exit_on(nix::sys::signal::Signal::SIGINT, Duration::from_secs(30))
        .await;
    let counted = |r: &Value| -> u64 {
        let reason = r["reason"].as_str().unwrap_or_default();
        match reason.split_once(" more refusals of requests that named nobody") {
            Some((n, _)) => n.parse().unwrap(),
            None => 1,
        }
    };
    let records = audit_json_until(&px, &[], |_| true).await;
    let refusals = of_event(&records, "refusal");
    let accounted: u64 = refusals.iter().map(|r| counted(r)).sum();
    assert_eq!(accounted, sent, "refusals lost at the interrupt");
    // Some were counted, not recorded one by one: what the interrupt had to write out.
    assert!(
        (refusals.len() as u64) < sent,
        "all {sent} were recorded one by one"
    );
}

/// Behind a load balancer, a refusal says whose request it was: the address the balancer
/// (Debian's nginx, the listener's trusted proxy, connecting from 127.0.0.3) was reached from,
/// not the balancer's, and not what the client claims itself.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_a_refusal_records_the_address_it_names() {
    let up = Upstream::start("up").await;
    let cfg = scim_config()
        .http_listener_setting("trusted_proxies = [\"127.0.0.3\"]")
        .route(
            Route::new("http://open.test", &[&up])
                .accept(&["public"])
                .set("allow = { public = true, paths = [\"/open\"] }"),
        );
    let px = Portcullis::start(&cfg.toml()).await;
    let balancer =
        portcullis_tests::Nginx::in_front_of(cfg.http_addr(), [127, 0, 0, 3].into()).await;
    let client = portcullis_tests::Nginx::client_from([127, 0, 0, 2].into());
    let url = format!("http://open.test:{}/closed", balancer.addr().port());
    let refused = client
        .get(&url)
        .header("x-forwarded-for", "198.51.100.1")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let records = audit_json_until(&px, &[], |r| of_event(r, "refusal").len() == 1).await;
    let refusal = of_event(&records, "refusal")[0];
    assert_eq!(refusal["client"], "127.0.0.2", "{refusal}");
    let lines = audit(&px, &[]).await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refusal anonymous from 127.0.0.2 GET /closed")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_request_s_long_path_is_recorded_cut() {
    let (_up, cfg, px) = open_route().await;
    // Anyone can have a request refused; its path (here 20 kB) is theirs to choose.
    let long = format!("/closed/{}", "a".repeat(20_000));
    let refused = portcullis_tests::client::plain_client()
        .get(cfg.http_url("open.test", &long))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let records = audit_json_until(&px, &[], |r| of_event(r, "refusal").len() == 1).await;
    let path = of_event(&records, "refusal")[0]["path"].as_str().unwrap();
    let kept = &long[..1024];
    assert_eq!(path, format!("{kept}…({} bytes more)", long.len() - 1024));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_anonymous_refusals_is_recorded_within_the_route_s_budget() {
    let (_up, cfg, px) = open_route().await;
    // Anyone may ask a public route for what it does not make public, as fast as they like:
    // each refusal counts, but not each one is written out (the disk, the console).
    const SENT: usize = 600;
    let client = portcullis_tests::client::plain_client();
    let url = cfg.http_url("open.test", "/closed");
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let first_second = unix();
    let mut sent = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        sent.spawn(async move {
            for _ in 0..SENT / 8 {
                let refused = client.post(&url).send().await.unwrap();
                assert_eq!(refused.status(), StatusCode::FORBIDDEN);
            }
        });
    }
    while let Some(done) = sent.join_next().await {
        done.unwrap();
    }
    // The budget is per wall-clock second: the seconds the requests were sent in.
    let seconds = unix() - first_second + 1;

    // One by one, or counted: every refusal is accounted for, and no more than the budget
    // of each second they were sent in is written one by one.
    let counted = |r: &Value| -> u64 {
        let reason = r["reason"].as_str().unwrap_or_default();
        match reason.split_once(" more refusals of requests that named nobody") {
            Some((n, _)) => n.parse().unwrap(),
            None => 0,
        }
    };
    let records = audit_json_until(&px, &[], |r| {
        let refusals = of_event(r, "refusal");
        let one_by_one = refusals.iter().filter(|r| counted(r) == 0).count() as u64;
        let counted: u64 = refusals.iter().map(|r| counted(r)).sum();
        one_by_one + counted == SENT as u64
    })
    .await;
    let one_by_one: Vec<&Value> = of_event(&records, "refusal")
        .into_iter()
        .filter(|r| counted(r) == 0)
        .collect();
    assert!(
        one_by_one.len() as u64 <= 100 * seconds,
        "{} recorded one by one in {seconds} s",
        one_by_one.len()
    );
    for record in &one_by_one {
        assert_eq!(record["user"], "anonymous", "{record}");
        assert_eq!(record["path"], "/closed", "{record}");
    }
}
