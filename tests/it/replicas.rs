//! Several replicas on one PostgreSQL (issue #10), end to end: a real PostgreSQL server in a
//! cluster made for the test, the real IdP issuing client-credentials tokens, and three
//! `portcullis serve` processes, A, B and C, that share the database and nothing else.
//!
//! - A SCIM write on any replica is answered only once every replica has it: the creation of
//!   a caller admits them on B and C at once, and after a revocation is answered not one
//!   request is allowed on any replica, under load.
//! - People sign in through any replica, and the IdP's callback may land on another: SCIM
//!   writes on A, a sign-in on B, load on C. After a deactivation, group removal, deletion or
//!   sign-out is answered, not one request with that session is allowed on any replica, and its
//!   websocket on C is cut; the IdP's back-channel logout at C ends the session on A and B.
//! - One audit log for the fleet (each SCIM change once), and one set of assertion keys: every
//!   replica publishes the same JWKS, and a rotation with the CLI reaches all of them.
//! - A replica started late catches up; one cut off for longer than `max_staleness` (stopped
//!   with `SIGSTOP`) holds up an answer by at most about `max_staleness`, and refuses every
//!   caller until it has caught up; it is never seen admitting the revoked one.
//! - PostgreSQL restarting under load: the replicas fail closed (503) during the gap, never
//!   admit a caller revoked just before it, and catch up without being restarted.
//! - Every connection of the replicas dropped with the database up (a pooler restarting):
//!   they reconnect within their leases and refuse nobody meanwhile.
//! - `kill -9` of a replica during SCIM writes loses no acknowledged write.
//! - A SCIM read waiting on PostgreSQL (a lock held elsewhere) holds up no proxied request on
//!   the one worker thread that took it; a SCIM write that needs a locked table fails soon, and
//!   the replica keeps its lease.
//! - Migrations: from empty, idempotent, safe with replicas starting at once, and a schema
//!   newer than the binary's is refused at start with a clear message.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use portcullis_tests::client::{closed_within, websocket};
use portcullis_tests::idp::{jwt_claims, verify_with};
use portcullis_tests::scim::{agent, patch_ops, user};
use portcullis_tests::{
    ConfigBuilder, Echo, Idp, JwtIssuer, Oidc, Portcullis, Postgres, Route, ScimClient,
    ScimResponse, Upstream,
};
use reqwest::header::{HeaderName, ACCEPT, AUTHORIZATION, COOKIE, ORIGIN};
use reqwest::Method;
use serde_json::json;

use crate::authz::{revocation_under_load, MakeRequest, Revoked};
use crate::signin::{
    bare_client, client, cookie_value, get_with_session, header, idp_setup, navigate, set_cookie,
    wait_sign_in_available_at, ALICE, ALICE_PASSWORD, API, API_AUD, BOB, BOB_PASSWORD, CLIENT_ID,
    CLIENT_SECRET, MACHINE_ID, MACHINE_SECRET, SESSION_COOKIE,
};
use crate::{SCIM_HOST, SCIM_TOKEN};

const API_ROUTE: &str = "http://api.test";
/// Long enough that a loaded 2-core machine does not stall a replica's renewals past it (a
/// lapse would be a 503, never a wrong answer, but the tests count on 200s).
const MAX_STALENESS: Duration = Duration::from_secs(3);
/// What a refused request gets: 403, or 503 from a replica whose lease lapsed meanwhile.
const REFUSED: &[u16] = &[403, 503];

/// One replica: its process, the config it was built from, and a SCIM client for it.
struct Replica {
    px: Portcullis,
    cfg: ConfigBuilder,
    scim: ScimClient,
}

impl Replica {
    fn api_url(&self, path: &str) -> String {
        self.cfg.http_url("api.test", path)
    }
}

/// PostgreSQL, the IdP, an upstream, and the config every replica shares.
struct Fleet {
    pg: Postgres,
    idp: Idp,
    api: Upstream,
    /// `auth_host` when people sign in (see [`Fleet::start_signing_in`]).
    auth_host: Option<String>,
}

impl Fleet {
    async fn start() -> Fleet {
        let pg = Postgres::start().await;
        let idp = idp_setup(&[], "http://127.0.0.1:9/unused").start().await;
        let api = Upstream::start("api").await;
        Fleet {
            pg,
            idp,
            api,
            auth_host: None,
        }
    }

    /// A fleet people sign in to at `http://app.test`, through replicas on the listeners of
    /// `configs` (each is an origin registered with the IdP). The IdP's back-channel logouts
    /// go to the last.
    async fn start_signing_in(configs: &[ConfigBuilder]) -> Fleet {
        let callbacks: Vec<String> = configs
            .iter()
            .map(|c| c.http_url("app.test", "/.portcullis/callback"))
            .collect();
        let last = configs[configs.len() - 1].http_addr();
        let backchannel = format!("http://{last}/.portcullis/backchannel_logout");
        let pg = Postgres::start().await;
        let idp = idp_setup(&callbacks, &backchannel).start().await;
        let api = Upstream::start("api").await;
        Fleet {
            pg,
            idp,
            api,
            auth_host: Some(format!("app.test:{}", configs[0].http_addr().port())),
        }
    }

    /// A replica's config on `cfg`'s listener: its own ports and `data_dir`, everything else
    /// the same.
    fn config_on(&self, cfg: ConfigBuilder) -> ConfigBuilder {
        self.config_with(cfg, &format!("{}s", MAX_STALENESS.as_secs()))
    }

    /// [`Fleet::config_on`], with `max_staleness` of its own.
    fn config_with(&self, cfg: ConfigBuilder, max_staleness: &str) -> ConfigBuilder {
        let cfg = match &self.auth_host {
            Some(auth_host) => cfg
                .route(
                    Route::new("http://app.test", &[&self.api])
                        .websockets(true)
                        .set("allow = { groups = [\"eng\"] }"),
                )
                .oidc(Oidc::new(
                    self.idp.issuer(),
                    CLIENT_ID,
                    CLIENT_SECRET,
                    auth_host,
                )),
            None => cfg,
        };
        cfg.route(
            Route::new(API_ROUTE, &[&self.api])
                .accept(&["bearer"])
                .websockets(true)
                .set("allow = [{ groups = [\"eng\"] }, { agent_owner_groups = [\"eng\"] }]"),
        )
        .jwt_issuer(JwtIssuer::new(self.idp.issuer(), &[API_AUD]))
        .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)])
        .postgres(&self.pg.url(), max_staleness)
    }

    fn spawn(&self) -> Replica {
        self.spawn_on(ConfigBuilder::new().http_listener())
    }

    fn spawn_on(&self, cfg: ConfigBuilder) -> Replica {
        self.spawn_with(cfg, &format!("{}s", MAX_STALENESS.as_secs()))
    }

    /// [`Fleet::spawn_on`], with `max_staleness` of its own.
    fn spawn_with(&self, cfg: ConfigBuilder, max_staleness: &str) -> Replica {
        let cfg = self.config_with(cfg, max_staleness);
        let px = Portcullis::spawn(&cfg.toml());
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        Replica { px, cfg, scim }
    }

    async fn replica(&self) -> Replica {
        let mut replica = self.spawn();
        replica.px.wait_ready().await;
        replica
    }

    async fn token(&self) -> String {
        self.idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
            .await
    }
}

/// The status of a GET with the bearer token, asked again (bounded) while it is 503: a replica
/// may briefly lose its lease on a loaded machine, and is then right to refuse.
async fn status(url: &str, token: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = status_once(url, token).await;
        if status != 503 || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_once(url: &str, token: &str) -> u16 {
    match bare_client()
        .get(url)
        .bearer_auth(token)
        .header(ACCEPT, "application/json")
        .send()
        .await
    {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

/// A GET with the bearer token, to each of `urls` in turn.
fn round_robin(urls: Vec<String>, credential: (HeaderName, String)) -> MakeRequest {
    let next = Arc::new(AtomicUsize::new(0));
    Arc::new(move |c: &reqwest::Client| {
        let i = next.fetch_add(1, Ordering::Relaxed) % urls.len();
        c.get(&urls[i])
            .header(&credential.0, &credential.1)
            .header(ACCEPT, "application/json")
    })
}

/// The header that presents a bearer token.
fn bearer(token: &str) -> (HeaderName, String) {
    (AUTHORIZATION, format!("Bearer {token}"))
}

/// The header that presents a session.
fn session(cookie: &str) -> (HeaderName, String) {
    (COOKIE, format!("{SESSION_COOKIE}={cookie}"))
}

/// [`revocation_under_load`] on `urls`, presenting `credential`, while the caller also has a
/// websocket open to `host` on `replica`, which must be cut within seconds of the answer.
async fn revoked_with_a_websocket_open(
    what: &str,
    (replica, host): (&Replica, &str),
    credential: (HeaderName, String),
    urls: Vec<String>,
    revoke: impl Future<Output = impl Revoked>,
    refused_with: &[u16],
) {
    let header = (credential.0.as_str(), credential.1.as_str());
    let mut ws = websocket(replica.cfg.http_addr(), host, "/ws-ticks", header).await;
    revocation_under_load(
        what,
        round_robin(urls, credential.clone()),
        revoke,
        refused_with,
    )
    .await;
    assert!(
        closed_within(&mut ws, Duration::from_secs(10)).await,
        "{what}: the websocket was still open 10 s after the load ended"
    );
}

async fn set_active(scim: &ScimClient, id: &str, active: bool) -> ScimResponse {
    scim.patch(
        &format!("/Users/{id}"),
        &patch_ops(json!([{"op": "replace", "value": {"active": active}}])),
    )
    .await
}

async fn remove_member(scim: &ScimClient, group: &str, member: &str) -> ScimResponse {
    scim.patch(
        &format!("/Groups/{group}"),
        &patch_ops(json!([{
            "op": "remove",
            "path": format!("members[value eq \"{member}\"]"),
        }])),
    )
    .await
}

async fn add_member(scim: &ScimClient, group: &str, member: &str) -> ScimResponse {
    scim.patch(
        &format!("/Groups/{group}"),
        &patch_ops(json!([{"op": "add", "path": "members", "value": [{"value": member}]}])),
    )
    .await
}

/// `/readyz` on the replica's admin listener: the status and the text.
async fn readyz(replica: &Replica) -> (u16, String) {
    match bare_client()
        .get(replica.px.admin_url("/readyz"))
        .send()
        .await
    {
        Ok(resp) => (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls `check` every 20 ms until it is true, for at most `timeout`; false if it never was.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scim_answer_on_one_replica_holds_on_every_replica_under_load() {
    let fleet = Fleet::start().await;
    let (a, b, c) = tokio::join!(fleet.replica(), fleet.replica(), fleet.replica());
    let urls: Vec<String> = [&a, &b, &c].iter().map(|r| r.api_url("/v1/jobs")).collect();

    // Provisioned on A: once answered, B and C admit the machine on their first request. (A
    // token issued before its user was created is not the user's: fetched after.)
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    let token = fleet.token().await;
    let eng = a
        .scim
        .create_group("eng", &[&machine])
        .await
        .expect_success()
        .id();
    for url in &urls {
        assert_eq!(
            status(url, &token).await,
            200,
            "{url} right after the answer"
        );
    }
    // Every replica serves SCIM, and reads what the others wrote.
    let read = c
        .scim
        .get(&format!("/Users/{machine}"))
        .await
        .expect_success();
    assert_eq!(read.body["userName"], MACHINE_ID);

    // Deactivated on A, under load on B and C, with a websocket open on C.
    revoked_with_a_websocket_open(
        "deactivation on A, load on B and C, a websocket on C",
        (&c, "api.test"),
        bearer(&token),
        urls[1..].to_vec(),
        set_active(&a.scim, &machine, false),
        REFUSED,
    )
    .await;
    // Re-activated on B (its tokens from before are over: it gets a new one); removed from
    // the group on C, under load on A and B.
    set_active(&b.scim, &machine, true).await.expect_success();
    let token = fleet.token().await;
    for url in &urls {
        assert_eq!(status(url, &token).await, 200, "{url} after re-activation");
    }
    revocation_under_load(
        "group removal on C, load on A and B",
        round_robin(urls[..2].to_vec(), bearer(&token)),
        remove_member(&c.scim, &eng, &machine),
        REFUSED,
    )
    .await;
    // Back in the group (on A), then the user deleted on B, under load on all three.
    add_member(&a.scim, &eng, &machine).await.expect_success();
    for url in &urls {
        assert_eq!(status(url, &token).await, 200, "{url} after re-adding");
    }
    revocation_under_load(
        "deletion on B, load on A, B and C",
        round_robin(urls.clone(), bearer(&token)),
        b.scim.delete(&format!("/Users/{machine}")),
        REFUSED,
    )
    .await;
}

/// Refusals of a session that ended (deactivation, sign-out), or from a replica whose lease
/// lapsed meanwhile.
const SESSION_ENDED: &[u16] = &[401, 503];

/// Signs `login` in with a fresh browser-like client: the sign-in starts on `start`, and its
/// callback lands on `callback`, as a load balancer in front of both may send it. Returns the
/// session cookie's value.
async fn sign_in_through(
    fleet: &Fleet,
    (start, callback): (&Replica, &Replica),
    login: &str,
    password: &str,
) -> String {
    let browser = client();
    let page = start.cfg.http_url("app.test", "/dashboard");
    let resp = navigate(&browser, &page).await;
    assert_eq!(
        resp.status(),
        302,
        "{page} must send the browser to sign in"
    );
    let authorize = header(&resp, "location").unwrap_or_default();
    assert!(authorize.starts_with(fleet.idp.issuer()), "{authorize}");
    let back = fleet.idp.sign_in_http(&authorize, login, password).await;
    let sent_to = start.cfg.http_url("app.test", "/.portcullis/callback?");
    let query = back
        .strip_prefix(&sent_to)
        .unwrap_or_else(|| panic!("the IdP sent the browser to {back}, not to {sent_to}"));
    let landed = callback
        .cfg
        .http_url("app.test", &format!("/.portcullis/callback?{query}"));
    let resp = browser.get(&landed).send().await.expect("GET callback");
    let session = set_cookie(&resp, SESSION_COOKIE);
    let status = resp.status();
    assert_eq!(
        status,
        302,
        "the callback failed: {}",
        resp.text().await.unwrap_or_default()
    );
    cookie_value(&session.expect("the callback sets the session cookie"))
}

async fn sign_out(replica: &Replica, cookie: &str) -> reqwest::Response {
    bare_client()
        .post(replica.cfg.http_url("app.test", "/.portcullis/sign_out"))
        .header(COOKIE, format!("{SESSION_COOKIE}={cookie}"))
        .header(ORIGIN, replica.cfg.http_url("app.test", ""))
        .send()
        .await
        .expect("POST sign_out")
}

/// `portcullis audit --json` with `replica`'s configuration.
async fn audit_records(replica: &Replica) -> Vec<serde_json::Value> {
    audit_records_with(replica, &[]).await
}

/// `portcullis audit --json` with `replica`'s configuration and `more` arguments.
async fn audit_records_with(replica: &Replica, more: &[&str]) -> Vec<serde_json::Value> {
    let config = replica.px.config_path().display().to_string();
    let mut args = vec!["audit", "--config", &config, "--json"];
    args.extend_from_slice(more);
    let out = portcullis_tests::process::run(replica.px.dir(), &args).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "portcullis audit: {}",
        out.stderr
    );
    out.stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect()
}

/// The status `replica` answers an API call presenting the session.
async fn with_session(replica: &Replica, cookie: &str) -> u16 {
    let url = replica.cfg.http_url("app.test", "/v1/jobs");
    get_with_session(&url, cookie, "application/json")
        .await
        .status()
        .as_u16()
}

/// Bob, in `eng`, signed in on `a` once it is ready, his session let in there: his cookie.
async fn bob_signed_in_on(fleet: &Fleet, a: &mut Replica) -> String {
    a.px.wait_ready().await;
    let url = a.cfg.http_url("app.test", "/.portcullis/sign_in?rd=%2F");
    wait_sign_in_available_at(&client(), &url, Duration::from_secs(60)).await;
    let bob = a.scim.create_user(BOB).await.expect_success().id();
    a.scim.create_group("eng", &[&bob]).await.expect_success();
    let cookie = sign_in_through(fleet, (&*a, &*a), BOB, BOB_PASSWORD).await;
    assert_eq!(with_session(a, &cookie).await, 200);
    cookie
}

/// Each replica's file sets its own `max_staleness` (a rolling restart changes it one replica
/// at a time): a sign-out on a replica of a short one is answered only once a stopped replica
/// of a longer one can no longer count on its lease, not once the writer's own would have
/// lapsed. Answered earlier, the other replica, cut off from the database but not stopped,
/// lets the ended session in until its lease runs out.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_out_waits_for_a_longer_lease_than_its_replica_s_own() {
    let (cfg_a, cfg_b) = (
        ConfigBuilder::new().http_listener(),
        ConfigBuilder::new().http_listener(),
    );
    let fleet = Fleet::start_signing_in(&[cfg_a.clone(), cfg_b.clone()]).await;
    let mut a = fleet.spawn_with(cfg_a, "2s");
    let mut b = fleet.spawn_with(cfg_b, "15s");
    let cookie = bob_signed_in_on(&fleet, &mut a).await;
    b.px.wait_ready().await;
    assert_eq!(with_session(&b, &cookie).await, 200);

    b.px.signal(Signal::SIGSTOP);
    let started = Instant::now();
    let resp = sign_out(&a, &cookie).await;
    let waited = started.elapsed();
    b.px.signal(Signal::SIGCONT);
    assert_eq!(resp.status(), reqwest::StatusCode::FOUND, "the sign-out");
    // B renews about four times per `max_staleness`: its lease had 11.25 s or more to run
    // when it stopped. A's own would have lapsed within 2 s (A once gave up after 5).
    assert!(
        waited >= Duration::from_secs(8),
        "answered after {waited:?}, while B could still count on its lease"
    );
    // B, its lease lapsed, refuses until it has caught up, then refuses the ended session.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.last() != Some(&401) && Instant::now() < deadline {
        seen.push(with_session(&b, &cookie).await);
    }
    assert_eq!(seen.last(), Some(&401), "{seen:?}");
    assert!(seen.iter().all(|s| SESSION_ENDED.contains(s)), "{seen:?}");
}

/// A replica that died leaves its row, lease and all; should the database's clock step back
/// past that lease, the database counts it live again, though its holder no longer counts on
/// it, nor could it for longer than its length. Writes wait out that length, not the step,
/// and are answered as saved (here the row's lease is moved ten minutes on, and the time it was
/// granted with it, as a step back of ten minutes reads to the database).
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_replica_s_lease_revived_by_the_database_s_clock_holds_up_no_write() {
    let fleet = Fleet::start().await;
    let (a, b) = tokio::join!(fleet.replica(), fleet.replica());
    a.scim.create_user(MACHINE_ID).await.expect_success();
    b.px.signal(Signal::SIGKILL);
    // Once B's lease has lapsed, it is moved on.
    let lapsed = eventually(MAX_STALENESS * 3, || async {
        fleet
            .pg
            .query("SELECT id FROM portcullis_replicas WHERE lease_until < clock_timestamp()")
            .await
            .is_ok_and(|rows| rows.len() == 1)
    })
    .await;
    assert!(lapsed, "B's lease never lapsed");
    let moved = fleet
        .pg
        .query(
            "UPDATE portcullis_replicas SET lease_until = lease_until + interval '10 minutes', \
             seen = seen + interval '10 minutes' WHERE lease_until < clock_timestamp() \
             RETURNING id",
        )
        .await
        .unwrap();
    assert_eq!(moved.len(), 1, "B's row alone: {moved:?}");
    let started = Instant::now();
    a.scim
        .create_user("after-the-step@corp.test")
        .await
        .expect_success();
    let waited = started.elapsed();
    assert!(
        waited < MAX_STALENESS + Duration::from_secs(5),
        "a write was held up {waited:?}"
    );
}

/// A back-channel logout while the database is down cannot end the sessions it names: the IdP
/// is told to try again (503), not that all went well, and the refusal is recorded; the
/// session stands meanwhile, and the IdP's next try, once the database is back, ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_backchannel_logout_while_the_database_is_down_is_asked_again_and_recorded() {
    let cfg = ConfigBuilder::new().http_listener();
    let mut fleet = Fleet::start_signing_in(std::slice::from_ref(&cfg)).await;
    let mut a = fleet.spawn_on(cfg);
    let cookie = bob_signed_in_on(&fleet, &mut a).await;

    fleet.pg.stop();
    let told = fleet
        .idp
        .try_backchannel_logout_keeping_sessions("bob", CLIENT_ID)
        .await;
    let told = told.expect_err("the logout was taken with its sessions not ended");
    assert!(told.contains("503"), "{told}");
    fleet.pg.start_again().await;
    until_ready("A", &a).await;
    assert_eq!(with_session(&a, &cookie).await, 200, "not ended meanwhile");
    // The IdP sends the same token again: not refused as used, it ends the session now.
    let again = fleet.idp.resend_last_backchannel_logout().await;
    assert_eq!(again, Ok(()), "taken once the store is back");
    assert_eq!(with_session(&a, &cookie).await, 401, "ended");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = audit_records(&a).await;
        let recorded = records.iter().any(|r| {
            r["event"] == "refusal"
                && r["route"] == "oidc"
                && r["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("could not be ended"))
        });
        if recorded {
            break;
        }
        assert!(Instant::now() < deadline, "not recorded: {records:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A back-channel logout whose end is saved but whose confirmation by every replica cannot be
/// read (the replicas' table locked, as an operator's `LOCK TABLE` or `VACUUM FULL` holds it)
/// is taken: the sessions are ended and the logout recorded as the IdP's, not refused as if
/// the store had refused it (the IdP's retry would find its token used).
#[tokio::test(flavor = "multi_thread")]
async fn a_backchannel_logout_saved_but_not_confirmed_everywhere_is_taken_and_recorded() {
    let cfg = ConfigBuilder::new().http_listener();
    let fleet = Fleet::start_signing_in(std::slice::from_ref(&cfg)).await;
    // A lease long enough that A's, whose renewal the lock holds up too, is not lost before
    // the IdP's logout reaches it on a loaded machine (then it would be refused as out of touch).
    let cfg = fleet.config_on(cfg).postgres(&fleet.pg.url(), "10s");
    let mut a = Replica {
        px: Portcullis::spawn(&cfg.toml()),
        scim: ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN),
        cfg,
    };
    let cookie = bob_signed_in_on(&fleet, &mut a).await;

    let (locker, driver) = lock_table(&fleet.pg, "portcullis_replicas").await;
    // The IdP gives up on its delivery after 2.5 s (oidc-provider's timeout), long before
    // A can tell whether every replica has the end (twice `max_staleness` and a second): what
    // A made of it is read in its audit trail.
    let _ = fleet
        .idp
        .try_backchannel_logout_keeping_sessions("bob", CLIENT_ID)
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let records = audit_records(&a).await;
        let logged_out = records
            .iter()
            .any(|r| r["event"] == "session" && r["what"] == "idp_logout");
        let refused = records.iter().any(|r| {
            r["event"] == "refusal"
                && r["reason"].as_str().is_some_and(|reason| {
                    reason.contains("could not be ended") || reason.contains("lost touch")
                })
        });
        if logged_out || refused {
            break records;
        }
        assert!(Instant::now() < deadline, "nothing recorded: {records:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    locker.batch_execute("COMMIT").await.expect("unlock");
    drop(locker);
    let _ = driver.await;
    let recorded = records
        .iter()
        .find(|r| r["event"] == "session" && r["what"] == "idp_logout");
    assert!(
        recorded.is_some_and(|r| r["user"] == BOB),
        "not recorded as the IdP's logout: {records:?}\n{}",
        a.px.log()
    );
    until_ready("A", &a).await;
    assert_eq!(with_session(&a, &cookie).await, 401, "ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn people_sign_in_on_any_replica_and_every_revocation_holds_on_all_of_them() {
    let configs: Vec<ConfigBuilder> = (0..3)
        .map(|_| ConfigBuilder::new().http_listener())
        .collect();
    let fleet = Fleet::start_signing_in(&configs).await;
    let mut replicas: Vec<Replica> = configs.into_iter().map(|c| fleet.spawn_on(c)).collect();
    for replica in &mut replicas {
        replica.px.wait_ready().await;
        let url = replica
            .cfg
            .http_url("app.test", "/.portcullis/sign_in?rd=%2F");
        wait_sign_in_available_at(&client(), &url, Duration::from_secs(60)).await;
    }
    let [a, b, c]: [Replica; 3] = replicas.try_into().ok().expect("three replicas");
    let urls: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|r| r.cfg.http_url("app.test", "/v1/jobs"))
        .collect();

    // SCIM writes on A; a sign-in started on B whose callback lands on A; load on C.
    let alice = a.scim.create_user(ALICE).await.expect_success().id();
    let bob = a.scim.create_user(BOB).await.expect_success().id();
    let eng = a
        .scim
        .create_group("eng", &[&alice, &bob])
        .await
        .expect_success()
        .id();
    let cookie = sign_in_through(&fleet, (&b, &a), ALICE, ALICE_PASSWORD).await;
    for replica in [&a, &b, &c] {
        assert_eq!(with_session(replica, &cookie).await, 200, "a fresh session");
    }
    revoked_with_a_websocket_open(
        "deactivation on A, sessions on B and C, a websocket on C",
        (&c, "app.test"),
        session(&cookie),
        urls[1..].to_vec(),
        set_active(&a.scim, &alice, false),
        SESSION_ENDED,
    )
    .await;
    // Re-activated: the old session stays over everywhere; a new one works.
    set_active(&b.scim, &alice, true).await.expect_success();
    for replica in [&a, &b, &c] {
        assert!(SESSION_ENDED.contains(&with_session(replica, &cookie).await));
    }
    let cookie = sign_in_through(&fleet, (&c, &b), ALICE, ALICE_PASSWORD).await;
    revocation_under_load(
        "group removal on B, sessions on A and C",
        round_robin(vec![urls[0].clone(), urls[2].clone()], session(&cookie)),
        remove_member(&b.scim, &eng, &alice),
        &[403, 503],
    )
    .await;
    add_member(&c.scim, &eng, &alice).await.expect_success();
    for replica in [&a, &b, &c] {
        assert_eq!(with_session(replica, &cookie).await, 200, "back in eng");
    }
    revocation_under_load(
        "deletion on C, sessions on A, B and C",
        round_robin(urls.clone(), session(&cookie)),
        c.scim.delete(&format!("/Users/{alice}")),
        &[403, 503],
    )
    .await;

    // Sign-out on B ends the session on A and C, and cuts its websocket on C.
    let cookie = sign_in_through(&fleet, (&a, &c), BOB, BOB_PASSWORD).await;
    let other = sign_in_through(&fleet, (&c, &c), BOB, BOB_PASSWORD).await;
    revoked_with_a_websocket_open(
        "sign-out on B, sessions on A and C, a websocket on C",
        (&c, "app.test"),
        session(&cookie),
        vec![urls[0].clone(), urls[2].clone()],
        sign_out(&b, &cookie),
        SESSION_ENDED,
    )
    .await;
    // Bob's other session carries on, until the IdP logs him out: its back-channel logout
    // reaches C, and A and B refuse at once.
    for replica in [&a, &b, &c] {
        assert_eq!(
            with_session(replica, &other).await,
            200,
            "the other session"
        );
    }
    let sids = fleet.idp.backchannel_logout("bob", CLIENT_ID).await;
    assert!(!sids.is_empty());
    for replica in [&a, &b] {
        assert_eq!(
            with_session(replica, &other).await,
            401,
            "after the IdP's logout"
        );
    }
    // One audit log for the fleet, read from any replica: every SCIM change once (recorded by
    // the replica that made it), and the refusals of all of them.
    let changes = fleet
        .pg
        .query("SELECT count(*) FROM directory_changes")
        .await
        .unwrap()[0][0]
        .clone()
        .unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(15);
    let records = loop {
        // Written by each replica's audit thread, a moment after the fact.
        let records = audit_records(&b).await;
        let logged = records.iter().filter(|r| r["event"] == "change").count();
        if logged.to_string() == changes {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "{changes} changes, audit log: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for user in [ALICE, BOB] {
        assert!(
            records
                .iter()
                .any(|r| r["event"] == "refusal" && r["user"] == user),
            "no refusal of {user} in {records:?}"
        );
    }
    // Read from its end (the console's reading), the same log: every record, the changes
    // the newest first. (Replicas' records are not quite in time order among themselves, so
    // the two readings may interleave the changes with them differently.)
    let mut newest = audit_records_with(&b, &["--newest-first"]).await;
    newest.reverse();
    let changes_of = |records: &[serde_json::Value]| -> Vec<serde_json::Value> {
        let changes = records.iter().filter(|r| r["event"] == "change");
        changes.cloned().collect()
    };
    assert_eq!(changes_of(&newest), changes_of(&records));
    assert!(newest.len() >= records.len(), "{newest:?}");
    for record in &records {
        assert!(newest.contains(record), "{record} not read from the end");
    }
    // Every replica publishes the same sealing keys: none made its own.
    let keys = fleet
        .pg
        .query("SELECT count(*) FROM directory_entries WHERE kind = 'sealing-key'")
        .await
        .unwrap();
    assert!(
        matches!(keys[0][0].as_deref(), Some("1" | "2" | "3")),
        "{keys:?}"
    );
}

/// Read from the end since a time, the fleet's log goes by when records were written: a
/// replica's batch that arrives late (PostgreSQL was out of its reach a while), after newer
/// records of others, does not end the reading before those.
#[tokio::test(flavor = "multi_thread")]
async fn reading_the_fleet_s_log_back_since_a_time_passes_over_records_that_arrived_late() {
    let fleet = Fleet::start().await;
    let a = fleet.replica().await;
    let record = |path: &str, ago: time::Duration| {
        let time = (time::OffsetDateTime::now_utc() - ago)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        serde_json::json!({
            "event": "refusal", "time": time, "user": "mallory", "route": "app",
            "rule": null, "reason": "no", "method": "GET", "path": path, "client": null,
        })
        .to_string()
    };
    // Appended as a replica appends its batches: one of five minutes ago, then one made two
    // hours ago that arrives only now.
    for (path, ago) in [
        ("/five-minutes-ago", time::Duration::minutes(5)),
        ("/two-hours-ago", time::Duration::hours(2)),
    ] {
        let sql = format!(
            "INSERT INTO portcullis_audit (record) VALUES ('{}')",
            record(path, ago).replace('\'', "''")
        );
        fleet.pg.query(&sql).await.expect("INSERT");
    }
    let paths = |records: Vec<serde_json::Value>| -> Vec<String> {
        records
            .iter()
            .filter_map(|r| r["path"].as_str().map(str::to_owned))
            .collect()
    };
    let newest = audit_records_with(&a, &["--since", "1h", "--newest-first"]).await;
    assert_eq!(paths(newest), ["/five-minutes-ago"]);
    let oldest = audit_records_with(&a, &["--since", "1h"]).await;
    assert_eq!(paths(oldest), ["/five-minutes-ago"]);
}

/// The JWKS `replica` publishes.
/// The replica's answer to `GET /.portcullis/jwks.json`.
async fn jwks_answer(replica: &Replica) -> reqwest::Response {
    let url = replica.cfg.http_url("api.test", "/.portcullis/jwks.json");
    bare_client().get(&url).send().await.expect("GET jwks")
}

async fn jwks_of(replica: &Replica) -> jsonwebtoken::jwk::JwkSet {
    let text = jwks_answer(replica).await.text().await.unwrap_or_default();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("jwks: {e}: {text}"))
}

fn kids(jwks: &jsonwebtoken::jwk::JwkSet) -> Vec<String> {
    let mut kids: Vec<String> = jwks
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    kids.sort();
    kids
}

/// The identity assertion `replica` sends the upstream for the bearer token.
async fn assertion_via(replica: &Replica, token: &str) -> String {
    let resp = bare_client()
        .get(replica.api_url("/v1/whoami"))
        .bearer_auth(token)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let echo = Echo::parse(&resp.bytes().await.unwrap_or_default());
    echo.header("x-portcullis-assertion")
        .expect("an assertion upstream")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_signs_with_the_same_keys_and_a_rotation_reaches_them_all() {
    let fleet = Fleet::start().await;
    let (a, b, c) = tokio::join!(fleet.replica(), fleet.replica(), fleet.replica());
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    a.scim
        .create_group("eng", &[&machine])
        .await
        .expect_success();
    let token = fleet.token().await;

    // The replicas started at once on an empty database; they publish one JWKS, and an
    // assertion from any of them verifies against the JWKS of any other.
    let first = kids(&jwks_of(&a).await);
    assert!(!first.is_empty());
    for replica in [&b, &c] {
        assert_eq!(kids(&jwks_of(replica).await), first);
    }
    let verify = |jwks: &jsonwebtoken::jwk::JwkSet, token: &str| {
        let claims = jwt_claims(token);
        let issuer = claims["iss"].as_str().unwrap_or_default().to_owned();
        verify_with(jwks, token, &issuer, API_ROUTE)
    };
    let from_b = assertion_via(&b, &token).await;
    verify(&jwks_of(&c).await, &from_b).expect("B's assertion verifies with C's JWKS");

    // Rotated with the CLI on A's machine: every replica publishes the new key at once and
    // signs with it from the time the CLI names. Until then, assertions verify with the JWKS
    // an upstream fetched before the rotation (it may keep it for a minute: max-age=60).
    let before = jwks_of(&a).await;
    let config = a.px.config_path().display().to_string();
    let out = portcullis_tests::process::run(
        a.px.dir(),
        &[
            "rotate-assertion-key",
            "--config",
            &config,
            "--publish-for",
            "10s",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let mut lines = out.stdout.lines();
    let kid = lines
        .next()
        .and_then(|line| line.strip_prefix("new assertion signing key: "))
        .unwrap_or_else(|| panic!("{}", out.stdout))
        .to_owned();
    let signs = lines
        .next()
        .and_then(|line| line.strip_prefix("published now; it signs from "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|at| {
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or_else(|| panic!("{}", out.stdout))
        .unix_timestamp();
    let signed_with = |assertion: &str| {
        jsonwebtoken::decode_header(assertion)
            .ok()
            .and_then(|h| h.kid)
    };
    for replica in [&a, &b, &c] {
        let published = eventually(Duration::from_secs(10), || async {
            kids(&jwks_of(replica).await).contains(&kid)
        })
        .await;
        assert!(published, "{kid} not published");
        let assertion = assertion_via(replica, &token).await;
        // Signed when its `iat` says, plus the 5 s it is dated early.
        let signed_at = |assertion: &str| jwt_claims(assertion)["iat"].as_i64().map(|iat| iat + 5);
        if signed_at(&assertion) < Some(signs) {
            assert!(signed_with(&assertion).is_some_and(|k| k != kid));
            verify(&before, &assertion).expect("verifies with the JWKS from before");
        }
    }
    for replica in [&a, &b, &c] {
        let switched = eventually(Duration::from_secs(40), || async {
            signed_with(&assertion_via(replica, &token).await).as_deref() == Some(kid.as_str())
        })
        .await;
        assert!(switched, "{kid} never signed");
        let assertion = assertion_via(replica, &token).await;
        let signed_at = jwt_claims(&assertion)["iat"].as_i64().map(|iat| iat + 5);
        assert!(signed_at >= Some(signs));
        verify(&jwks_of(&a).await, &assertion).expect("verifies with A's JWKS");
    }
    // The old key stays published while tokens it signed may be live.
    let all = kids(&jwks_of(&c).await);
    assert!(first.iter().all(|k| all.contains(k)), "{all:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_shuts_down_leaves_the_fleet_and_holds_up_no_write() {
    let fleet = Fleet::start().await;
    let (a, mut b) = tokio::join!(fleet.replica(), fleet.replica());
    let leases = "SELECT count(*) FROM portcullis_replicas WHERE lease_until > now()";
    let two = eventually(Duration::from_secs(10), || async {
        fleet.pg.query(leases).await.ok() == Some(vec![vec![Some("2".to_owned())]])
    })
    .await;
    assert!(two, "both replicas hold a lease");
    let status = b.px.terminate().await;
    assert!(status.success(), "{status:?}");
    // Its row is gone at once, not left to lapse: A's writes wait for nobody.
    let rows = fleet
        .pg
        .query("SELECT count(*) FROM portcullis_replicas")
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Some("1".to_owned())]]);
    let started = Instant::now();
    a.scim
        .create_user("after-b@corp.test")
        .await
        .expect_success();
    eprintln!("a write right after B left: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_replica_and_one_cut_off_past_max_staleness_catch_up_and_never_admit_the_revoked() {
    let fleet = Fleet::start().await;
    let (a, b) = tokio::join!(fleet.replica(), fleet.replica());
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    let token = fleet.token().await;
    a.scim
        .create_group("eng", &[&machine])
        .await
        .expect_success();

    // C starts after the writes: ready only once it has them.
    let c = fleet.replica().await;
    assert_eq!(status(&c.api_url("/"), &token).await, 200, "late replica");

    // B stops answering anything (SIGSTOP): the deactivation is answered once B's lease has
    // lapsed, so within about max_staleness.
    b.px.signal(Signal::SIGSTOP);
    let started = Instant::now();
    set_active(&a.scim, &machine, false).await.expect_success();
    let waited = started.elapsed();
    eprintln!("deactivation answered {waited:?} after B stopped");
    // B's lease was renewed at most a quarter of max_staleness before it stopped: the answer
    // must have waited for it to lapse (a writer that did not wait would answer at once).
    assert!(
        waited >= MAX_STALENESS / 2,
        "answered after {waited:?}, while B could still hold a lease"
    );
    assert!(
        waited < MAX_STALENESS + Duration::from_secs(5),
        "a stopped replica held the answer up for {waited:?}"
    );
    assert_eq!(status(&c.api_url("/"), &token).await, 403);

    // B resumes with a lapsed lease: refused (503) until caught up, then 403; never 200.
    b.px.signal(Signal::SIGCONT);
    let url = b.api_url("/");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut settled = false;
    while !settled && Instant::now() < deadline {
        let s = status_once(&url, &token).await;
        seen.push(s);
        settled = s == 403;
        if !settled {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(settled, "B never settled on 403: {seen:?}");
    assert!(
        seen.iter().all(|s| *s == 403 || *s == 503),
        "B answered the revoked caller with {seen:?}"
    );
    assert_eq!(readyz(&b).await.0, 200, "B is ready again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_fails_closed_and_the_replicas_catch_up_without_restarting() {
    let mut fleet = Fleet::start().await;
    let (a, b) = tokio::join!(fleet.replica(), fleet.replica());
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    let token = fleet.token().await;
    let other = a
        .scim
        .create_user("other-agent")
        .await
        .expect_success()
        .id();
    let eng = a
        .scim
        .create_group("eng", &[&machine, &other])
        .await
        .expect_success()
        .id();
    // Revoked just before the gap.
    remove_member(&a.scim, &eng, &machine)
        .await
        .expect_success();
    let urls = [a.api_url("/"), b.api_url("/")];

    fleet.pg.stop();
    let stopped = Instant::now();
    // Both replicas fail closed within max_staleness (and a bit), and say why.
    for (name, (url, replica)) in ["A", "B"].iter().zip(urls.iter().zip([&a, &b])) {
        let refused = eventually(MAX_STALENESS * 3, || {
            let (url, token) = (url.clone(), token.clone());
            async move { status_once(&url, &token).await == 503 }
        })
        .await;
        assert!(refused, "{name} kept admitting without its database");
        let (code, text) = readyz(replica).await;
        assert_eq!(code, 503, "{name} /readyz during the gap: {text}");
        assert!(text.contains("not ready"), "{name}: {text}");
        // Its key set may lack a key rotated in since: not handed to an upstream to keep.
        let jwks = jwks_answer(replica).await;
        assert_eq!(
            jwks.status(),
            503,
            "{name} /.portcullis/jwks.json during the gap"
        );
        assert_eq!(jwks.headers()["cache-control"], "no-store", "{name}");
    }
    eprintln!(
        "both replicas refused {:?} after the stop",
        stopped.elapsed()
    );
    // SCIM writes are refused during the gap, not acknowledged and lost.
    let during = a.scim.post("/Users", &user("written-during-the-gap")).await;
    assert_eq!(during.status, 503, "{}", during.body);
    assert!(
        during.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not in step with the shared directory")),
        "{}",
        during.body
    );
    // A refusal during the gap is kept on A's disk until PostgreSQL is back (however long
    // that takes), then reaches the fleet's log.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[2] = "A".repeat(parts[2].len());
    let forged = parts.join(".");
    assert_eq!(status_once(&a.api_url("/in-the-gap"), &forged).await, 401);
    // So is an IdP's back-channel logout this replica cannot act on: told in JSON to try again.
    const LOGOUT: &str = "/.portcullis/backchannel_logout";
    let logout = bare_client()
        .post(a.api_url(LOGOUT))
        .form(&[("logout_token", "in-the-gap")])
        .send()
        .await
        .expect("POST backchannel_logout");
    assert_eq!(logout.status(), 503);
    assert_eq!(
        logout.headers()["retry-after"],
        "10",
        "as its other 503s say"
    );
    let told: serde_json::Value =
        serde_json::from_str(&logout.text().await.expect("body")).expect("JSON");
    assert_eq!(told["error"], "temporarily_unavailable");
    let spool = a.px.dir().join("data/audit-spool.jsonl");
    let kept = eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&spool)
            .is_ok_and(|text| text.contains("/in-the-gap") && text.contains(LOGOUT))
    })
    .await;
    assert!(kept, "the refusal is not kept in {}", spool.display());

    fleet.pg.start_again().await;
    for (name, replica) in ["A", "B"].iter().zip([&a, &b]) {
        let ready = eventually(Duration::from_secs(60), || async {
            readyz(replica).await.0 == 200
        })
        .await;
        assert!(
            ready,
            "{name} did not catch up: {:?}",
            readyz(replica).await
        );
        assert_eq!(
            jwks_answer(replica).await.status(),
            200,
            "{name} /.portcullis/jwks.json once caught up"
        );
    }
    for url in &urls {
        assert_eq!(
            status(url, &token).await,
            403,
            "{url}: revoked before the gap"
        );
    }
    let moved = eventually(Duration::from_secs(30), || async {
        let records = audit_records(&b).await;
        let logout = records.iter().any(|record| {
            record["path"] == LOGOUT
                && record["event"] == "refusal"
                && record["reason"] == "this replica lost touch with the directory"
        });
        // The IdP's write, refused for the gap, is recorded as its token's.
        let write = records.iter().any(|record| {
            record["path"] == "/scim/v2/Users"
                && record["event"] == "refusal"
                && record["user"] == "okta"
                && record["reason"] == "this replica lost touch with the directory"
        });
        logout && write && records.iter().any(|record| record["path"] == "/in-the-gap")
    })
    .await;
    assert!(
        moved,
        "the refusal made during the gap is not in the fleet's log"
    );
    // Emptied once all are moved (a moment after the last commit).
    let emptied = eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&spool).is_ok_and(|text| text.is_empty())
    })
    .await;
    assert!(emptied, "the spool still holds what was moved");
    // And the fleet takes writes again.
    set_active(&b.scim, &other, false).await.expect_success();
    a.scim
        .create_user("written-after-the-gap")
        .await
        .expect_success();
}

/// A connection to PostgreSQL can drop with the database still up: a pooler restarting, an
/// operator's `pg_terminate_backend`, a firewall's idle timeout. Each replica reconnects within
/// its lease, and refuses nobody meanwhile: its index is as current as the lease says, since
/// no writer answers without it before that lease has lapsed in the database.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_postgres_connections_refuse_nobody_while_the_lease_holds() {
    let fleet = Fleet::start().await;
    let (a, b) = tokio::join!(fleet.replica(), fleet.replica());
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    let eng = a
        .scim
        .create_group("eng", &[&machine])
        .await
        .expect_success()
        .id();
    let token = fleet.token().await;
    let urls = [a.api_url("/"), b.api_url("/")];
    for url in &urls {
        assert_eq!(status(url, &token).await, 200, "{url}");
    }

    // Every connection of both replicas is ended, mid-load; the load goes on past the end of
    // the leases the replicas held then, so only renewals keep them answering.
    let terminated = std::sync::OnceLock::new();
    let load = async {
        let mut seen = Vec::new();
        let started = Instant::now();
        let past_the_leases = || {
            terminated.get().is_some_and(|at: &Instant| {
                at.elapsed() > MAX_STALENESS + Duration::from_millis(500)
            })
        };
        while !past_the_leases()
            && started.elapsed() < Duration::from_secs(60)
            && seen.len() < 50_000
        {
            seen.push(status_once(&urls[seen.len() % 2], &token).await);
        }
        seen
    };
    let terminate = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ended = fleet
            .pg
            .query(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'portcullis'",
            )
            .await
            .expect("end the replicas' connections");
        let _ = terminated.set(Instant::now());
        ended[0][0].clone().unwrap_or_default()
    };
    let (seen, ended) = tokio::join!(load, terminate);
    assert!(
        terminated
            .get()
            .is_some_and(|at| at.elapsed() > MAX_STALENESS),
        "the load ended before the leases held at the termination would have lapsed"
    );
    // Each replica holds at least its feed's connection and its writer's.
    assert!(
        ended.parse::<u32>().is_ok_and(|n| n >= 4),
        "connections ended: {ended}"
    );
    let refused: Vec<_> = seen.iter().filter(|s| **s != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of {} answers were not 200 after the connections dropped: {refused:?}\nA:\n{}\nB:\n{}",
        refused.len(),
        seen.len(),
        a.px.log(),
        b.px.log()
    );

    // Both follow the database again: a revocation answered on A holds on B.
    remove_member(&a.scim, &eng, &machine)
        .await
        .expect_success();
    for url in &urls {
        assert_eq!(status(url, &token).await, 403, "{url}");
    }
}

/// After a failover, the database that judges a replica's lease may have lost its last
/// renewal (an asynchronous standby), or run on another clock. A replica that reconnects keeps
/// only as much of its lease as the database holds: writers there answer without it once
/// that has lapsed.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_reconnecting_keeps_only_the_lease_the_database_holds() {
    let fleet = Fleet::start().await;
    let a = fleet.replica().await;
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    a.scim
        .create_group("eng", &[&machine])
        .await
        .expect_success();
    let token = fleet.token().await;
    let url = a.api_url("/");
    assert_eq!(status(&url, &token).await, 200);

    // The database forgets the lease and ends the connections, in one transaction: a
    // renewal sent meanwhile waits for it, and goes with its connection.
    fleet
        .pg
        .query(
            "UPDATE portcullis_replicas SET lease_until = clock_timestamp() - interval '1 second'; \
             SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'portcullis'",
        )
        .await
        .expect("forget the lease and end the connections");
    let cut = eventually(MAX_STALENESS * 3, || async {
        a.px.log()
            .contains("PostgreSQL holds this replica's lease for less than it counted")
    })
    .await;
    assert!(
        cut,
        "the lease held past what the database granted:\n{}",
        a.px.log()
    );
    // Renewed on the database as it is, it answers again.
    assert_eq!(status(&url, &token).await, 200, "{}", a.px.log());
}

/// A writer counts another replica's lease as lapsed only a margin after the database's clock
/// says so: that clock stepped forward (an NTP step), or running faster than the replica's,
/// would otherwise end the lease there while the replica still counts on it, and a write
/// would be answered while it admits on a directory without it.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_waits_a_margin_past_a_lease_that_lapses_on_the_database_s_clock() {
    let fleet = Fleet::start().await;
    let a = fleet.replica().await;
    a.scim.create_user("ann").await.expect_success();
    // A replica that has applied nothing, whose lease ends 50 ms from now by the database.
    fleet
        .pg
        .query(
            "INSERT INTO portcullis_replicas (id, applied_seq, lease_until) \
             VALUES ('behind', 0, clock_timestamp() + interval '50 milliseconds')",
        )
        .await
        .expect("a replica behind");
    a.scim.create_user("bob").await.expect_success();
    // Answered only once the database's clock is a margin (a second) past that lease.
    let rows = fleet
        .pg
        .query(
            "SELECT clock_timestamp() >= lease_until + interval '1 second' \
             FROM portcullis_replicas WHERE id = 'behind'",
        )
        .await
        .expect("read the lease");
    assert_eq!(
        rows[0][0].as_deref(),
        Some("t"),
        "answered before the lease was a margin past"
    );
}

/// The directory's sequence number as PostgreSQL holds it.
async fn directory_seq(pg: &Postgres) -> String {
    let rows = pg
        .query("SELECT value FROM directory_meta WHERE key = 'seq'")
        .await
        .expect("read the sequence number");
    rows[0][0].clone().expect("a sequence number")
}

/// Waits (bounded) until the replica's `/readyz` answers 200.
async fn until_ready(name: &str, replica: &Replica) {
    let ready = eventually(Duration::from_secs(60), || async {
        readyz(replica).await.0 == 200
    })
    .await;
    assert!(ready, "{name} is not ready: {:?}", readyz(replica).await);
}

/// A write is answered once no replica can admit anyone on a directory without it, as the
/// database says. A connection whose view does not hold the write yet (a standby behind its
/// primary, which pgpool or a host list can hand out for a read) cannot say so, however few
/// replicas it finds waiting: settling asks again, and gives up rather than answer from it.
#[tokio::test(flavor = "multi_thread")]
async fn settling_never_answers_from_a_view_without_the_write() {
    use portcullis_scim::store::postgres::PgStorage;
    use portcullis_scim::store::Storage;

    let pg = Postgres::start().await;
    let max_staleness = Duration::from_millis(500);
    let options = one_connection(pg.url(), max_staleness);
    let settled = tokio::task::spawn_blocking(move || {
        let storage = PgStorage::open(&options)?;
        storage.migrate()?;
        let at_zero = storage.settle(0, Instant::now());
        // The database holds no batch 1: as a standby that has not replayed it reads.
        let asked = Instant::now();
        let ahead = storage.settle(1, asked);
        Ok::<_, portcullis_scim::store::StoreError>((at_zero, ahead, asked.elapsed()))
    })
    .await
    .unwrap();
    let (at_zero, ahead, waited) = settled.unwrap();
    assert!(
        at_zero.is_ok(),
        "the change it holds is settled: {at_zero:?}"
    );
    let error = ahead.expect_err("settled from a view without the change");
    assert!(
        error.to_string().contains("does not hold the change"),
        "{error}"
    );
    assert!(waited >= max_staleness * 2, "gave up after {waited:?}");
}

/// Migrates `pg`'s database, as a first replica's start does, through a store of one
/// connection; the same migration, to run again.
async fn migrated(
    pg: &Postgres,
) -> impl Fn() -> Result<(), portcullis_scim::store::StoreError> + Clone + Send + 'static {
    let options = one_connection(pg.url(), Duration::from_millis(500));
    let migrate = move || portcullis_scim::store::postgres::PgStorage::open(&options)?.migrate();
    tokio::task::spawn_blocking(migrate.clone())
        .await
        .unwrap()
        .expect("the schema");
    migrate
}

/// A replica that connects to a database whose schema is up to date takes no lock: one
/// holding the migration lock and stalled (a frozen host; it waits outside a transaction, so
/// no server timeout ends it) kept every replica whose feed reconnected from catching up.
#[tokio::test(flavor = "multi_thread")]
async fn an_up_to_date_schema_is_not_waited_on_behind_a_stalled_migration_lock() {
    use portcullis_scim::store::postgres::MIGRATION_LOCK;

    let pg = Postgres::start().await;
    let migrate = migrated(&pg).await;
    let migrate_again = migrate.clone();
    // Another replica takes the lock, and stalls holding it.
    let (holder, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(connection);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .expect("the lock");
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(migrate),
    )
    .await
    .expect("waited on the lock");
    again.unwrap().expect("nothing to migrate");
    // A newer version migrated the schema, and stalls holding the lock: an older replica is
    // refused at once (it cannot read what the newer one writes), not held up.
    holder
        .execute("UPDATE portcullis_schema SET version = version + 1", &[])
        .await
        .expect("a newer version");
    let newer = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(migrate_again),
    )
    .await
    .expect("waited on the lock");
    let refused = newer.unwrap().expect_err("a newer schema");
    assert!(
        matches!(refused, portcullis_scim::store::StoreError::Version { .. }),
        "{refused}"
    );
    drop(holder);
    let _ = driver.await;
}

/// A database holding Portcullis' tables without their rows (its schema copied with `pg_dump
/// --schema-only`) is refused, saying so, not read as an outage for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_schema_copied_without_its_data_is_refused() {
    use portcullis_scim::store::postgres::PgStorage;
    let pg = Postgres::start().await;
    let again = migrated(&pg).await;
    pg.query("DELETE FROM portcullis_schema; DELETE FROM directory_meta")
        .await
        .expect("the rows taken out");
    let refused = tokio::task::spawn_blocking(again).await.unwrap();
    let refused = refused.expect_err("a schema without its data");
    assert!(
        matches!(refused, portcullis_scim::store::StoreError::Unsuitable(_)),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("without its data"),
        "{refused}"
    );
    // As the commands that only read (explain, rotate-assertion-key) find it.
    let options = one_connection(pg.url(), Duration::from_millis(500));
    let checked = tokio::task::spawn_blocking(move || PgStorage::open(&options)?.check_schema());
    let refused = checked
        .await
        .unwrap()
        .expect_err("a schema without its data");
    assert!(
        refused.to_string().contains("without its data"),
        "{refused}"
    );
}

/// A database in an encoding other than UTF8 is refused at start, with what to do: it would
/// refuse any character it lacks (a name's, a refused request's in an audit record) and stall
/// what is queued behind it.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_not_in_utf8_is_refused_at_start() {
    use portcullis_scim::store::postgres::PgStorage;
    let pg = Postgres::start().await;
    pg.query(
        "CREATE DATABASE latin TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'",
    )
    .await
    .expect("a LATIN1 database");
    let url = pg.url().replace("/postgres?", "/latin?");
    let options = one_connection(url.clone(), Duration::from_secs(2));
    let refused = tokio::task::spawn_blocking(move || PgStorage::open(&options)?.migrate())
        .await
        .unwrap()
        .expect_err("LATIN1");
    assert!(
        matches!(refused, portcullis_scim::store::StoreError::Unsuitable(_)),
        "{refused}"
    );
    assert!(refused.to_string().contains("ENCODING 'UTF8'"), "{refused}");
    // `serve` says so and stops.
    let cfg = ConfigBuilder::new().http_listener().postgres(&url, "2s");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, cfg.toml()).unwrap();
    let stderr = portcullis_tests::process::refused_serve(dir.path(), &path, &[])
        .await
        .1;
    assert!(stderr.contains("its encoding is LATIN1"), "{stderr}");
}

/// A data_dir that keeps a directory of its own (from a start without `[postgres]`) is refused
/// at a start with `[postgres]`, naming the file: the fleet's directory is another, and a start
/// without `[postgres]` later would bring back what the IdP took away meanwhile. Moved aside,
/// the replica starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_with_a_directory_of_its_own_is_refused_with_postgres() {
    let pg = Postgres::start().await;
    let mut px = ConfigBuilder::new().http_listener().start().await;
    px.terminate().await;
    let own = px.dir().join("data/directory.redb");
    assert!(own.exists(), "the embedded directory is {}", own.display());
    let cfg = ConfigBuilder::new()
        .http_listener()
        .postgres(&pg.url(), "2s");
    px.rewrite_config(&cfg.toml());
    let stderr = portcullis_tests::process::refused_serve(px.dir(), px.config_path(), &[])
        .await
        .1;
    assert!(
        stderr.contains("directory.redb holds a directory of its own"),
        "{stderr}"
    );
    std::fs::rename(&own, px.dir().join("directory.redb.before-postgres")).unwrap();
    // Its assertion key is taken by the fleet's first start, and then removed from data_dir:
    // a start without [postgres] would sign with it again, one the fleet may have rotated out.
    let keys = px.dir().join("data/assertion-keys");
    let kid = std::fs::read_dir(&keys)
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".pem")
                .map(str::to_owned)
        })
        .next()
        .expect("the machine's key");
    px.restart().await;
    let jwks_kids = |cfg: &ConfigBuilder| {
        let url = cfg.http_url("any.test", "/.portcullis/jwks.json");
        async move {
            let resp = bare_client().get(&url).send().await.expect("GET jwks");
            let text = resp.text().await.unwrap_or_default();
            let jwks: jsonwebtoken::jwk::JwkSet =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("jwks: {e}: {text}"));
            kids(&jwks)
        }
    };
    assert_eq!(
        jwks_kids(&cfg).await,
        std::slice::from_ref(&kid),
        "the fleet's first keys"
    );
    let gone = eventually(Duration::from_secs(30), || async { !keys.exists() }).await;
    assert!(gone, "{} is still there", keys.display());
    px.terminate().await;
    let single = ConfigBuilder::new().http_listener();
    px.rewrite_config(&single.toml());
    px.restart().await;
    let signing = jwks_kids(&single).await;
    assert!(!signing.contains(&kid), "{signing:?}");
}

/// A session whose settings are not those asked for at connection (a pooler in front dropped
/// them, and the database's `synchronous_commit = off` stood) is refused, saying why: a change
/// answered on it could be lost in a crash. Here the URL's own options undo them, as such a
/// pooler would (`check-config` refuses such a URL). So is one on whose search path another
/// role may create objects.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_without_the_settings_asked_for_is_refused() {
    use portcullis_scim::store::postgres::PgStorage;
    use portcullis_scim::store::StoreError;
    let pg = Postgres::start().await;
    // A first start's migration over a connection to `url`.
    let migrate = |url: String| async move {
        let options = one_connection(url, Duration::from_secs(2));
        tokio::task::spawn_blocking(move || PgStorage::open(&options)?.migrate())
            .await
            .unwrap()
    };
    let unsuitable = |refused: &StoreError, said: &str| {
        assert!(matches!(refused, StoreError::Unsuitable(_)), "{refused}");
        assert!(refused.to_string().contains(said), "{refused}");
    };
    for (undone, said) in [
        ("synchronous_commit%3Doff", "synchronous_commit is off"),
        (
            "idle_in_transaction_session_timeout%3D0",
            "idle_in_transaction_session_timeout is 0",
        ),
    ] {
        let url = format!("{}&options=-c%20{undone}", pg.url());
        unsuitable(&migrate(url).await.expect_err(undone), said);
    }
    // A connection refused says why, in the server's words (not "db error" alone).
    let refused = migrate(pg.url().replace("/postgres?", "/nowhere?"))
        .await
        .expect_err("a database that does not exist");
    let said = refused.to_string();
    assert!(
        said.contains("database \"nowhere\" does not exist"),
        "{said}"
    );
    // A schema on the search path where any role may create objects (`public` before
    // PostgreSQL 15): another role's `unnest(text[])` there would run in every audit write.
    pg.query("CREATE ROLE \"user\" LOGIN; GRANT CREATE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
    let refused = migrate(pg.url())
        .await
        .expect_err("a search path others may create objects in");
    unsuitable(&refused, "(public to PUBLIC)");
    let said = refused.to_string();
    assert!(
        said.contains("REVOKE CREATE ON SCHEMA public FROM PUBLIC;"),
        "{said}"
    );
    assert!(said.contains("TO postgres)"), "{said}");
    pg.query(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT CREATE ON SCHEMA public TO \"user\"",
    )
    .await
    .unwrap();
    let refused = migrate(pg.url())
        .await
        .expect_err("a search path another role may create objects in");
    // Named as SQL names it (a keyword, quoted), in a statement that runs as given.
    unsuitable(&refused, "(public to \"user\")");
    let revoke = "REVOKE CREATE ON SCHEMA public FROM \"user\";";
    assert!(refused.to_string().contains(revoke), "{refused}");
    pg.query(revoke).await.unwrap();
    migrate(pg.url())
        .await
        .expect("the schema's owner alone may create objects in it");
}

/// A standby, which may be far behind its primary (pgpool balances reads onto one; a URL
/// listing several hosts can connect to one), is never read as the directory: loaded or caught
/// up from it, a replica would lose what the primary has answered since (an acknowledged
/// deactivation), and the writer would build a change on a record's older copy and write it
/// back over the primary's; and its clock would judge the primary's leases when a write waits
/// for the replicas. Each read is refused, and the replica stays out of touch.
#[tokio::test(flavor = "multi_thread")]
async fn the_directory_is_never_read_from_a_standby() {
    use portcullis_scim::schema::ResourceType;
    use portcullis_scim::store::postgres::PgStorage;
    use portcullis_scim::store::Storage;

    let mut pg = Postgres::start().await;
    let options = |url: String| one_connection(url, Duration::from_millis(500));
    let primary = options(pg.url());
    tokio::task::spawn_blocking(move || PgStorage::open(&primary)?.migrate())
        .await
        .unwrap()
        .expect("the schema, on the primary");
    pg.stop();
    pg.keep_copy();
    pg.start_again().await;
    let standby = pg.start_standby().await;
    let on_standby = options(standby.url());
    let reads = tokio::task::spawn_blocking(move || {
        let storage = PgStorage::open(&on_standby)?;
        Ok::<_, portcullis_scim::store::StoreError>([
            storage.load(&mut |_| {}).map(|_| ()),
            storage.feed(0).map(|_| ()),
            storage
                .records_for_writer(ResourceType::User, &[1])
                .map(|_| ()),
            // Nor are the replicas' leases judged by a standby's clock.
            storage.settle(0, std::time::Instant::now()),
        ])
    })
    .await
    .unwrap()
    .expect("a storage on the standby");
    let reads = reads.into_iter();
    for (read, what) in reads.zip(["load", "feed", "a record", "settling a write"]) {
        let error = read.expect_err(what);
        assert!(error.to_string().contains("standby"), "{what}: {error}");
    }
}

/// Takes the batch `seq` out of PostgreSQL, as a failover to a standby that had not received
/// it does: its feed row gone, and the sequence back one.
async fn lose_write(pg: &Postgres, seq: u64) {
    pg.query(&format!(
        "DELETE FROM directory_feed WHERE seq = {seq}; \
         UPDATE directory_meta SET value = {} WHERE key = 'seq'",
        seq - 1
    ))
    .await
    .expect("lose the write");
}

/// A write is answered once every replica applied it, as the database says: asked of the
/// write's own commit, not of its sequence number. A failover that lost the commit, and then
/// took another batch under that number (which every replica applied), does not have the lost
/// write answered as done: by the replica that wrote it, nor by one that answers a repeat of it
/// (nothing to change there) once it has the batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_postgres_lost_is_not_settled_by_another_of_its_number() {
    use portcullis_scim::store::postgres::PgStorage;
    use portcullis_scim::store::{Entry, Feed, Storage};

    let pg = Postgres::start().await;
    let options = one_connection(pg.url(), Duration::from_millis(500));
    let entry = |value: &str| Entry {
        kind: "test".to_owned(),
        key: "k".to_owned(),
        value: Some(value.to_owned()),
    };
    // `follower` applies it from the feed, as a replica that answers the IdP's repeat of the
    // write (nothing to change there) waits for it.
    let (writer, follower, seq) = tokio::task::spawn_blocking({
        let options = options.clone();
        move || {
            let writer = PgStorage::open(&options)?;
            writer.migrate()?;
            let seq = writer.put_entries(vec![entry("lost")])?;
            let follower = PgStorage::open(&options)?;
            follower.feed(0)?;
            follower.answering_at(seq);
            Ok::<_, portcullis_scim::store::StoreError>((writer, follower, seq))
        }
    })
    .await
    .unwrap()
    .expect("a write");
    // Lost, as a failover to a standby that had not received it loses it; then another batch
    // is written under its number.
    lose_write(&pg, seq).await;
    let settled = tokio::task::spawn_blocking(move || {
        let other = PgStorage::open(&options)?;
        let again = other.put_entries(vec![entry("in its place")])?;
        assert_eq!(again, seq);
        // The follower catches up before it settles: it reads the directory anew, at the
        // same number, and keeps the new batch's commit time as the one it applied.
        assert!(matches!(follower.feed(seq)?, Feed::Gap));
        follower.load(&mut |_| {})?;
        let now = std::time::Instant::now();
        Ok::<_, portcullis_scim::store::StoreError>([
            writer.settle(seq, now),
            follower.settle(seq, now),
        ])
    })
    .await
    .unwrap()
    .expect("another write");
    for (settled, whose) in settled
        .into_iter()
        .zip(["its writer's", "another replica's"])
    {
        let error = settled.expect_err(whose);
        assert!(
            error.to_string().contains("no longer holds"),
            "{whose}: {error}"
        );
        assert!(
            matches!(error, portcullis_scim::store::StoreError::Lost(_)),
            "{whose}: {error}"
        );
    }
}

/// A write the database lost with nothing yet written under its number (a failover to a
/// standby that had not received it, in a quiet fleet) is lost too, once the wait for the
/// replicas gives up: its batch's answers, refusals too, are all 503.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_postgres_lost_with_nothing_in_its_place_is_lost() {
    use portcullis_scim::store::postgres::PgStorage;
    use portcullis_scim::store::{Entry, Storage};

    let pg = Postgres::start().await;
    let options = one_connection(pg.url(), Duration::from_millis(500));
    let entry = Entry {
        kind: "test".to_owned(),
        key: "k".to_owned(),
        value: Some("lost".to_owned()),
    };
    let (writer, seq) = tokio::task::spawn_blocking({
        let options = options.clone();
        move || {
            let writer = PgStorage::open(&options)?;
            writer.migrate()?;
            let seq = writer.put_entries(vec![entry])?;
            Ok::<_, portcullis_scim::store::StoreError>((writer, seq))
        }
    })
    .await
    .unwrap()
    .expect("a write");
    lose_write(&pg, seq).await;
    let settled =
        tokio::task::spawn_blocking(move || writer.settle(seq, std::time::Instant::now()))
            .await
            .unwrap();
    let error = settled.expect_err("lost");
    assert!(
        matches!(error, portcullis_scim::store::StoreError::Lost(_)),
        "{error}"
    );
}

/// PostgreSQL can lose what it acknowledged: a backup restored, or a failover to a standby
/// that had not received the last commits. A replica that applied a lost batch does not take
/// the batch written later under the same number for it: it reads the directory again, and
/// lets in nobody the database no longer grants.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_applied_a_batch_postgres_lost_reads_the_directory_again() {
    let mut fleet = Fleet::start().await;
    let (a, b) = tokio::join!(fleet.replica(), fleet.replica());
    let machine = a.scim.create_user(MACHINE_ID).await.expect_success().id();
    let other = a
        .scim
        .create_user("other-agent")
        .await
        .expect_success()
        .id();
    let eng = a.scim.create_group("eng", &[]).await.expect_success().id();
    let token = fleet.token().await;
    for replica in [&a, &b] {
        assert_eq!(status(&replica.api_url("/"), &token).await, 403);
    }

    // The database as it is now is kept aside; then the machine joins eng, acknowledged and
    // let in on both replicas.
    fleet.pg.stop();
    fleet.pg.keep_copy();
    fleet.pg.start_again().await;
    until_ready("A", &a).await;
    until_ready("B", &b).await;
    add_member(&a.scim, &eng, &machine).await.expect_success();
    let lost = directory_seq(&fleet.pg).await;
    for replica in [&a, &b] {
        assert_eq!(status(&replica.api_url("/"), &token).await, 200);
    }

    // B sleeps through the loss: the database comes back without the membership, and A,
    // reading it again, writes another batch under the number B applied last.
    b.px.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    fleet.pg.stop();
    fleet.pg.restore_copy();
    fleet.pg.start_again().await;
    // A may answer from the lost history until it has reconnected, within its lease.
    let a_url = a.api_url("/");
    let followed = eventually(MAX_STALENESS * 3, || {
        let (url, token) = (a_url.clone(), token.clone());
        async move { status_once(&url, &token).await == 403 }
    })
    .await;
    assert!(followed, "A after the loss:\n{}", a.px.log());
    until_ready("A", &a).await;
    add_member(&a.scim, &eng, &other).await.expect_success();
    assert_eq!(
        directory_seq(&fleet.pg).await,
        lost,
        "the batch written after the loss has the lost one's number"
    );

    // B, awake once the lease it last renewed has lapsed (the database lost that renewal too:
    // until then, B's answers are as stale as `max_staleness` allows): refused (503) until
    // caught up, then 403; never let in.
    tokio::time::sleep_until((stopped + MAX_STALENESS + Duration::from_secs(1)).into()).await;
    b.px.signal(Signal::SIGCONT);
    let url = b.api_url("/");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.iter().filter(|s| **s == 403).count() < 20 {
        assert!(
            Instant::now() < deadline,
            "B never settled on 403: {seen:?}"
        );
        let s = status_once(&url, &token).await;
        assert!(
            REFUSED.contains(&s),
            "B let in a member PostgreSQL lost: {s} after {seen:?}\n{}",
            b.px.log()
        );
        seen.push(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_ready("B", &b).await;
}

/// PostgreSQL's notification queue, shared by every session of the server, is truncated only
/// past what every listening session has read. A writer that waited for the other replicas'
/// confirmations listens no more once it has them: nothing holds the queue, which every
/// replica's renewals keep adding to (full, it fails every commit).
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_wrote_holds_up_no_notification_of_postgres() {
    let fleet = Fleet::start().await;
    let (a, _b) = tokio::join!(fleet.replica(), fleet.replica());
    // A's writes wait for B's confirmations.
    for i in 0..3 {
        a.scim
            .create_user(&format!("written-{i}@corp.test"))
            .await
            .expect_success();
    }
    // 28 MB of notifications on the channel of confirmations: more than a session that
    // listens and reads nothing takes in before it stops reading the queue.
    fleet
        .pg
        .query(
            "SELECT pg_notify('portcullis_applied', i::text || repeat('x', 7000)) \
             FROM generate_series(1, 4000) AS i",
        )
        .await
        .expect("notify");
    let usage = || async {
        fleet
            .pg
            .query("SELECT pg_notification_queue_usage() < 0.0001")
            .await
            .expect("queue usage")[0][0]
            .as_deref()
            == Some("t")
    };
    assert!(
        eventually(Duration::from_secs(30), usage).await,
        "the notification queue is held: {:?}",
        fleet.pg.query("SELECT pg_notification_queue_usage()").await
    );
    // And writes still settle.
    a.scim
        .create_user("written-after@corp.test")
        .await
        .expect_success();
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_during_scim_writes_loses_no_acknowledged_write() {
    let fleet = Fleet::start().await;
    let (mut a, b) = tokio::join!(fleet.replica(), fleet.replica());
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let scim = ScimClient::new(&a.cfg.scim_base_url(), SCIM_TOKEN);
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..400 {
                let name = format!("user-{w}-{i}");
                let body = user(&name);
                match scim
                    .try_request(Method::POST, "/Users", &[], Some(&body), &[])
                    .await
                {
                    Ok(resp) if resp.status == 201 => {
                        acknowledged.lock().unwrap().push((name, resp.id()));
                    }
                    // Killed: unanswered writes may or may not have been made.
                    _ => break,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.px.kill_hard();
    for writer in writers {
        let _ = writer.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 200,
        "only {} writes acknowledged",
        acknowledged.len()
    );
    for (name, id) in &acknowledged {
        let read = b.scim.get(&format!("/Users/{id}")).await;
        assert_eq!(read.status, 200, "{name} was acknowledged, then lost");
        assert_eq!(read.body["userName"], name.as_str());
    }
    eprintln!(
        "{} acknowledged writes all present on B",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_run_once_from_empty_with_replicas_starting_at_once() {
    let fleet = Fleet::start().await;
    // `explain` without a running proxy judges from the database, and `rotate-assertion-key`
    // writes the fleet's keys there, only in one of this build's schema: they neither make
    // one nor read another build's, nor move the fleet's on (which would stop its replicas,
    // of an older build, at their next renewal).
    let url = fleet.pg.url();
    let refused = |command: &'static [&'static str]| {
        let cfg = ConfigBuilder::new().http_listener().postgres(&url, "2s");
        async move {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("portcullis.toml");
            std::fs::write(&config, cfg.toml()).unwrap();
            let config = config.display().to_string();
            let mut args = vec![command[0], "--config", &config];
            args.extend(&command[1..]);
            let out = portcullis_tests::process::run(dir.path(), &args).await;
            assert_ne!(out.status.code(), Some(0), "{out:?}");
            out.stderr
        }
    };
    let explain_says = || refused(&["explain", "--user", "alice", "--url", "http://app.test/"]);
    let rotate_says = || refused(&["rotate-assertion-key"]);
    let said = rotate_says().await;
    assert!(said.contains("no directory in PostgreSQL yet"), "{said}");
    let said = explain_says().await;
    assert!(said.contains("no directory in PostgreSQL yet"), "{said}");
    // Three replicas start on an empty database at the same moment.
    let mut replicas = [fleet.spawn(), fleet.spawn(), fleet.spawn()];
    for replica in &mut replicas {
        replica.px.wait_ready().await;
    }
    let version = fleet
        .pg
        .query("SELECT version FROM portcullis_schema")
        .await
        .unwrap();
    assert_eq!(version, vec![vec![Some("3".to_owned())]], "one schema row");
    replicas[0].scim.create_user("alice").await.expect_success();
    // Idempotent: a restart migrates nothing and keeps the data.
    replicas[1].px.kill_hard();
    replicas[1].px.restart().await;
    let found = replicas[1]
        .scim
        .get("/Users?filter=userName%20eq%20%22alice%22")
        .await;
    assert_eq!(found.expect_success().body["totalResults"], 1);

    // The lease of the replica killed above lapses (it never left); the three running hold theirs.
    let running = "SELECT count(*) FROM portcullis_replicas WHERE lease_until > clock_timestamp()";
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.pg.query(running).await.unwrap() != vec![vec![Some("3".to_owned())]] {
        assert!(Instant::now() < deadline, "not three leases running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A database migrated by a newer build is refused at start, saying so; replicas already
    // running stop at their next renewal, not at their next reconnection: they cannot read
    // what the newer build writes, and must not vouch for being current.
    fleet
        .pg
        .query("UPDATE portcullis_schema SET version = 99")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for replica in &mut replicas {
        let status = loop {
            if let Some(status) = replica.px.try_exit() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "a running replica went on on a newer schema"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success());
        let log = replica.px.log();
        assert!(log.contains("schema version 99"), "{log}");
    }
    let said = explain_says().await;
    assert!(said.contains("schema version 99"), "{said}");
    let said = rotate_says().await;
    assert!(said.contains("schema version 99"), "{said}");
    // A fleet of an older build, its key rotated with this one's: refused, the schema as it was.
    fleet
        .pg
        .query("UPDATE portcullis_schema SET version = 2")
        .await
        .unwrap();
    let said = rotate_says().await;
    assert!(said.contains("schema version 2"), "{said}");
    let version = fleet
        .pg
        .query("SELECT version FROM portcullis_schema")
        .await
        .unwrap();
    assert_eq!(version, vec![vec![Some("2".to_owned())]]);
    fleet
        .pg
        .query("UPDATE portcullis_schema SET version = 99")
        .await
        .unwrap();
    // Their leases went with them: no writer waits for them to lapse.
    let leases = fleet.pg.query(running).await.unwrap();
    assert_eq!(
        leases,
        vec![vec![Some("0".to_owned())]],
        "leases left running"
    );
    let mut newer = fleet.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = newer.px.try_exit() {
            break status;
        }
        assert!(Instant::now() < deadline, "started against a newer schema");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = newer.px.log();
    assert!(
        log.contains("schema version 99") && log.contains("this build reads version 3"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_on_two_replicas_all_land_once_and_every_replica_sees_them() {
    let fleet = Fleet::start().await;
    let (a, b, c) = tokio::join!(fleet.replica(), fleet.replica(), fleet.replica());
    // Writers on A and B at once: each batch is built on one replica's directory and is
    // refused if the other committed first, then built again on the caught-up directory.
    let mut writers = Vec::new();
    for (name, replica) in [("a", &a), ("b", &b)] {
        for w in 0..4 {
            let scim = ScimClient::new(&replica.cfg.scim_base_url(), SCIM_TOKEN);
            writers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..40 {
                    let resp = scim.post("/Users", &user(&format!("{name}-{w}-{i}"))).await;
                    assert_eq!(resp.status, 201, "{}", resp.body);
                    ids.push(resp.id());
                }
                ids
            }));
        }
    }
    let mut ids = Vec::new();
    for writer in writers {
        ids.extend(writer.await.unwrap());
    }
    // The same userName written on both replicas at once: exactly one wins.
    let contested = user("contested");
    let (x, y) = tokio::join!(
        a.scim.post("/Users", &contested),
        b.scim.post("/Users", &contested)
    );
    let mut statuses = [x.status, y.status];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{} / {}", x.body, y.body);

    // C, which wrote nothing, has every one of them, each once.
    let all = c.scim.get("/Users?count=1000").await.expect_success();
    assert_eq!(all.body["totalResults"], ids.len() + 1);
    for id in &ids {
        c.scim.get(&format!("/Users/{id}")).await.expect_success();
    }
    // Members added to one group on A and B at once, as Okta sends a group's pushes in
    // parallel: none is lost, and C has them all.
    let crowd = a
        .scim
        .create_group("crowd", &[])
        .await
        .expect_success()
        .id();
    let adds = ids.iter().take(40).enumerate().map(|(i, id)| {
        let scim = [&a.scim, &b.scim][i % 2];
        let (crowd, id) = (crowd.clone(), id.clone());
        async move {
            let op = json!([{"op": "add", "path": "members", "value": [{"value": id}]}]);
            let resp = scim
                .patch(&format!("/Groups/{crowd}"), &patch_ops(op))
                .await;
            assert!(resp.status < 300, "{}: {}", resp.status, resp.body);
        }
    });
    futures_util::future::join_all(adds).await;
    let group = c
        .scim
        .get(&format!("/Groups/{crowd}"))
        .await
        .expect_success();
    let members = group.body["members"].as_array().map_or(0, Vec::len);
    assert_eq!(members, 40, "{}", group.body);
    // One change per user, per group and per member added, and a sequence without gaps:
    // every batch in the feed (which also carries what sign-in keeps beside the directory)
    // was built on the one before it.
    let changes = fleet
        .pg
        .query("SELECT count(*) FROM directory_changes")
        .await
        .unwrap();
    assert_eq!(
        changes,
        vec![vec![Some((ids.len() + 1 + 1 + 40).to_string())]]
    );
    let chained = fleet
        .pg
        .query(
            "SELECT bool_and(base = before) FROM \
             (SELECT base, lag(seq, 1, 0::bigint) OVER (ORDER BY seq) AS before \
              FROM directory_feed) AS feed",
        )
        .await
        .unwrap();
    assert_eq!(
        chained,
        vec![vec![Some("t".to_owned())]],
        "each batch built on the last"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_s_owner_chain_broken_on_one_replica_holds_on_every_replica() {
    let fleet = Fleet::start().await;
    let (a, b, c) = tokio::join!(fleet.replica(), fleet.replica(), fleet.replica());
    // The IdP's machine client is, in the directory, an agent owned by the group eng.
    let urls: Vec<String> = [&a, &b, &c].iter().map(|r| r.api_url("/v1/jobs")).collect();
    let alice = a.scim.create_user(ALICE).await.expect_success().id();
    let eng = a
        .scim
        .create_group("eng", &[&alice])
        .await
        .expect_success()
        .id();
    let bot = b
        .scim
        .post("/Agents", &agent(MACHINE_ID, &[&eng], &[]))
        .await
        .expect(201)
        .id();
    // A token issued before its agent was created is not the agent's: fetched after.
    let token = fleet.token().await;
    for url in &urls {
        assert_eq!(
            status(url, &token).await,
            200,
            "{url} right after the answer"
        );
    }
    // Its only active owner deactivated on A, under load on B and C, a websocket open on C.
    revoked_with_a_websocket_open(
        "the owner deactivated on A, load on B and C, a websocket on C",
        (&c, "api.test"),
        bearer(&token),
        urls[1..].to_vec(),
        set_active(&a.scim, &alice, false),
        REFUSED,
    )
    .await;
    set_active(&b.scim, &alice, true).await.expect_success();
    for url in &urls {
        assert_eq!(status(url, &token).await, 200, "{url} after re-activation");
    }
    // The agent itself deactivated on C, under load on A and B.
    let off = patch_ops(json!([{"op": "replace", "path": "active", "value": false}]));
    revocation_under_load(
        "the agent deactivated on C, load on A and B",
        round_robin(urls[..2].to_vec(), bearer(&token)),
        c.scim.patch(&format!("/Agents/{bot}"), &off),
        REFUSED,
    )
    .await;
}

/// SCIM reads that wait on PostgreSQL (here on a lock the test holds; in life a search that
/// reads the whole directory, or a busy or distant server) hold up no proxied request on the
/// worker thread that took them: they wait off that thread, and are answered once PostgreSQL
/// is. Four wait at most; a fifth is answered 503 once it has waited its turn for 10 s.
/// The users' table locked by a session of its own, as a long transaction, `VACUUM FULL` or a
/// migration elsewhere may hold it, until the client returned commits.
async fn lock_users_table(
    pg: &Postgres,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    lock_table(pg, "directory_users").await
}

/// A session of its own holding `table` locked (ACCESS EXCLUSIVE) until it commits.
async fn lock_table(
    pg: &Postgres,
    table: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (locker, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    let driver = tokio::spawn(connection);
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .expect("lock the table");
    (locker, driver)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scim_read_waiting_on_postgres_holds_up_no_proxied_request() {
    const READS: usize = 4;
    let pg = Postgres::start().await;
    let up = Upstream::start("app").await;
    // One worker thread: a read held on it would hold up every request.
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("threads", "1")
        .route(Route::new("http://app.test", &[&up]))
        .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)])
        .postgres(&pg.url(), "30s");
    let _px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let id = scim.create_user("ada@example.com").await.expect(201).id();

    // The users' table locked, as a long transaction or a migration elsewhere may hold it.
    let (locker, driver) = lock_users_table(&pg).await;
    let reads: Vec<_> = (0..READS)
        .map(|_| {
            let (scim, path) = (scim.clone(), format!("/Users/{id}"));
            tokio::spawn(async move { scim.get(&path).await })
        })
        .collect();
    // Until every read waits on the lock: Portcullis' read of user records, nothing else (sent
    // with the comment that keeps pgpool from balancing it onto a standby).
    let waiting = eventually(Duration::from_secs(60), || async {
        let rows = pg
            .query(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '/*NO LOAD BALANCE*/ SELECT row_id, record FROM directory_users \
                 WHERE row_id%'",
            )
            .await;
        let want = READS.to_string();
        rows.is_ok_and(|rows| rows.first().and_then(|row| row[0].as_deref()) == Some(&*want))
    })
    .await;
    assert!(waiting, "the SCIM reads never all came to wait on the lock");

    let client = bare_client();
    for n in 0..5 {
        let sent = client.get(cfg.http_url("app.test", "/")).send();
        let answer = tokio::time::timeout(Duration::from_secs(20), sent).await;
        assert!(
            matches!(&answer, Ok(Ok(response)) if response.status() == 200),
            "proxied request {n} was held up by SCIM reads waiting on PostgreSQL: {answer:?}"
        );
    }
    // One read more waits for a turn, and is told to come back.
    let asked = Instant::now();
    let busy = scim.get(&format!("/Users/{id}")).await.expect(503);
    assert!(
        asked.elapsed() >= Duration::from_secs(9),
        "a read answered 503 before it waited its turn: {:?}",
        asked.elapsed()
    );
    assert!(busy.text.contains("busy"), "{}", busy.text);
    assert!(
        reads.iter().all(|read| !read.is_finished()),
        "a SCIM read was answered while it waited on the lock"
    );

    locker.batch_execute("COMMIT").await.expect("unlock");
    for read in reads {
        let got = read.await.expect("the SCIM read").expect(200);
        assert_eq!(got.body["userName"], "ada@example.com", "{}", got.text);
    }
    drop(locker);
    let _ = driver.await;
}

/// One replica on its own database, with `max_staleness`, and ada: her record's SCIM path.
struct OneReplica {
    pg: Postgres,
    _up: Upstream,
    px: Portcullis,
    scim: ScimClient,
    path: String,
}

impl OneReplica {
    async fn start(max_staleness: &str) -> OneReplica {
        let pg = Postgres::start().await;
        let up = Upstream::start("app").await;
        let cfg = ConfigBuilder::new()
            .http_listener()
            .route(Route::new("http://app.test", &[&up]))
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)])
            .postgres(&pg.url(), max_staleness);
        let px = cfg.start().await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let id = scim.create_user("ada@example.com").await.expect(201).id();
        let path = format!("/Users/{id}");
        OneReplica {
            pg,
            _up: up,
            px,
            scim,
            path,
        }
    }
}

/// The writer also applies the feed that keeps the lease: a write that needs a table another
/// session has locked (an operator's `LOCK TABLE`, `VACUUM FULL`, `ALTER TABLE`) must fail soon,
/// not wait with the lease lapsing and every caller refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_scim_write_on_a_locked_table_fails_soon_and_the_replica_stays_ready() {
    let OneReplica {
        pg,
        _up,
        px,
        scim,
        path,
    } = OneReplica::start("4s").await;
    let mut others = Vec::new();
    for i in 0..8 {
        let other = scim.create_user(&format!("u{i}@example.com")).await;
        others.push(format!("/Users/{}", other.expect(201).id()));
    }
    let ready = || async {
        let resp = bare_client().get(px.admin_url("/readyz")).send().await;
        resp.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    assert_eq!(ready().await, 200);

    let (locker, driver) = lock_users_table(&pg).await;
    // The deactivation needs ada's record: it waits at most a quarter of max_staleness for the
    // lock (1 s), and is told to try again.
    let off = patch_ops(json!([{"op": "replace", "value": {"active": false}}]));
    let answer = tokio::time::timeout(Duration::from_secs(30), scim.patch(&path, &off)).await;
    let Ok(refused) = answer else {
        panic!("the write waited on the lock:\n{}", px.log());
    };
    assert_eq!(refused.status, 503, "{}", refused.text);
    // Its lease kept all along: a lapse would show for a while (it renews only when caught up).
    for _ in 0..10 {
        assert_eq!(ready().await, 200, "{}", px.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Several at once, as an IdP sends them, are written in one batch: they fail together,
    // not each after a wait of its own (8 s in all, past the lease of 4 s).
    let writes = others.iter().map(|path| scim.patch(path, &off));
    let mut writes = std::pin::pin!(futures_util::future::join_all(writes));
    let deadline = Instant::now() + Duration::from_secs(60);
    let answers = loop {
        tokio::select! {
            answers = &mut writes => break answers,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                assert_eq!(ready().await, 200, "the lease lapsed:\n{}", px.log());
                assert!(Instant::now() < deadline, "the writes waited on the lock");
            }
        }
    };
    for refused in answers {
        assert_eq!(refused.status, 503, "{}", refused.text);
    }
    for _ in 0..10 {
        assert_eq!(ready().await, 200, "{}", px.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    locker.batch_execute("COMMIT").await.expect("unlock");
    drop(locker);
    let _ = driver.await;
    // The IdP retries, and the write lands.
    scim.patch(&path, &off).await.expect(200);
    let got = scim.get(&path).await.expect(200);
    assert_eq!(got.body["active"], false, "{}", got.text);
}

/// A write whose commit holds, but whose confirmation by the replicas cannot be read (the
/// replicas' table locked by an operator), is answered 503 within about twice max_staleness,
/// not held for as long as the lock is; once it is let go, the write stands.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_whose_confirmation_cannot_be_read_is_answered_all_the_same() {
    // Long enough that the replica's own lease, whose renewal the lock holds up too, is not
    // lost before the write reaches its check (then its 503 would say so).
    let OneReplica {
        pg,
        _up,
        px,
        scim,
        path,
    } = OneReplica::start("5s").await;

    let (locker, driver) = lock_table(&pg, "portcullis_replicas").await;
    let off = patch_ops(json!([{"op": "replace", "value": {"active": false}}]));
    let answer = tokio::time::timeout(Duration::from_secs(30), scim.patch(&path, &off)).await;
    let Ok(answered) = answer else {
        panic!("the write's answer waited on the lock:\n{}", px.log());
    };
    assert_eq!(answered.status, 503, "{}", answered.text);
    assert!(
        answered.text.contains("not yet confirmed"),
        "{}",
        answered.text
    );
    locker.batch_execute("COMMIT").await.expect("unlock");
    drop(locker);
    let _ = driver.await;
    // Saved all the same: read back once the replica is back in touch.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = scim.get(&path).await;
        if got.status == 200 && got.body["active"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "{}", got.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Options for a store of one connection to the database at `url`.
fn one_connection(
    url: String,
    max_staleness: Duration,
) -> portcullis_scim::store::postgres::PgOptions {
    portcullis_scim::store::postgres::PgOptions {
        url,
        pool_size: 1,
        max_staleness,
    }
}
