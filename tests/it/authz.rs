//! Authorization against the live SCIM directory (issue 5), end to end: the real IdP signs
//! people and machines in, the same Portcullis serves SCIM on `auth.test`, and every request to
//! a route is judged against the directory as it is right now.
//!
//! - Revocation under load: a client sends requests continuously while the test revokes access
//!   over SCIM; not one request *sent after the SCIM answer arrived* may be answered 2xx
//!   (deactivation, removal from the group, deletion of the group or the user, and a machine
//!   token whose service account is deactivated).
//! - Open websockets: not one frame crosses, either way, once a deactivation is answered, and
//!   the connection is closed, busy or idle.
//! - Header spoofing: every spelling of the identity headers a client may send is dropped; the
//!   upstream sees exactly what Portcullis asserts.
//! - Path normalization: what the deny rule sees is what the upstream gets.
//! - The upstream verifies `X-Portcullis-Assertion` against `/.portcullis/jwks.json`.
//! - Refusal pages say who, which route and why, and nothing about anybody else.
//!
//! Directory users are created *before* their owner signs in: a session that began before the
//! user's creation (or last deactivation) is over.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use portcullis_tests::client::tls_client;
use portcullis_tests::idp::{jwt_claims, jwt_header, verify_with};
use portcullis_tests::scim::patch_ops;
use portcullis_tests::upstream::stamp;
use portcullis_tests::{
    raw_request, ConfigBuilder, Echo, JwtIssuer, Route, ScimClient, ScimResponse, TestCa, Upstream,
};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, COOKIE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::signin::after_the_second_of;
use crate::signin::{
    assert_session_refused, assert_session_works, bare_client, client, get_with_session,
    idp_for_app_test, Fixture, ALICE, ALICE_PASSWORD, API, API_AUD, BOB, BOB_PASSWORD,
    BROWSER_ACCEPT, MACHINE_ID, MACHINE_SECRET, SESSION_COOKIE,
};
use crate::{SCIM_HOST, SCIM_TOKEN};

/// The route people use: members of `eng` may, except under `/admin`.
const APP_ROUTE: &str = "http://app.test";
/// The route machines use (bearer tokens only): members of `eng` may.
const API_ROUTE: &str = "http://api.test";
/// As `API_ROUTE`, telling the upstream who calls only by the signed assertion.
const QUIET_ROUTE: &str = "http://quiet.test";
/// As `API_ROUTE`, telling the upstream who calls only by the identity headers.
const UNSIGNED_ROUTE: &str = "http://unsigned.test";
const GROUP: &str = "eng";

/// Bounds of the load generator, per worker. Its workers stop when told (3 s after the
/// revocation's answer, or 400 requests sent after it): these bounds are a safety net, wide
/// enough that a revocation slow to answer on a loaded machine (a write waiting for every
/// replica) never ends the load before the requests sent after it.
const LOAD_WORKERS: usize = 4;
const LOAD_MAX_REQUESTS: usize = 20_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

/// A running IdP, Portcullis (SCIM on `auth.test`, `app.test` and `api.test` as above, the
/// latter on TLS too, and `*.tenants.test` for bearer tokens) and a SCIM client, with alice and
/// the `build-agent` service account provisioned in `eng`.
struct Authz {
    fx: Fixture,
    /// The CA of the TLS listener's certificate.
    ca: TestCa,
    scim: ScimClient,
    alice_id: String,
    machine_id: String,
    eng_id: String,
}

impl Authz {
    async fn start() -> Authz {
        let app = Upstream::start("app").await;
        let api = Upstream::start("api").await;
        let ca = TestCa::new();
        let cfg = ConfigBuilder::new()
            .http_listener()
            .https_listener(vec![ca.leaf("api", &["api.test"])]);
        let (idp, oidc) = idp_for_app_test(&cfg).await;
        let oidc = oidc.set("session_lifetime", "\"2h\"");
        let cfg = cfg
            .route(
                Route::new(APP_ROUTE, &[&app])
                    .websockets(true)
                    .set("allow = { groups = [\"eng\"] }")
                    .set("deny = { groups = [\"eng\"], paths = [\"/admin\"] }"),
            )
            .route(
                Route::new(API_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::new("https://api.test", &[&api])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::new(TENANTS_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::new(TENANTS_ADMIN_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }"),
            )
            .route(
                Route::new(QUIET_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }")
                    .set("identity_headers = false"),
            )
            .route(
                Route::new(UNSIGNED_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .set("allow = { groups = [\"eng\"] }")
                    .set("assertion = false"),
            )
            .oidc(oidc)
            .jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]))
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)]);
        let px = cfg.start().await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let fx = Fixture {
            cfg,
            idp,
            px,
            app,
            api,
        };
        fx.wait_sign_in_available(Duration::from_secs(15)).await;

        let alice_id = scim.create_user(ALICE).await.id();
        let machine_id = scim.create_user(MACHINE_ID).await.id();
        let eng_id = scim
            .create_group(GROUP, &[&alice_id, &machine_id])
            .await
            .id();
        Authz {
            fx,
            ca,
            scim,
            alice_id,
            machine_id,
            eng_id,
        }
    }

    fn app_url(&self, path: &str) -> String {
        self.fx.app_url(path)
    }

    fn api_url(&self, path: &str) -> String {
        self.fx.url("api.test", path)
    }

    /// Signs `login` in with a fresh client; returns the session cookie's value.
    async fn sign_in(&self, login: &str, password: &str) -> String {
        self.fx
            .sign_in(&client(), &self.app_url("/"), login, password)
            .await
            .cookie
    }

    async fn machine_token(&self) -> String {
        self.fx
            .idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
            .await
    }

    async fn set_active(&self, user_id: &str, active: bool) -> ScimResponse {
        self.scim
            .patch(
                &format!("/Users/{user_id}"),
                &patch_ops(json!([{"op": "replace", "value": {"active": active}}])),
            )
            .await
    }

    async fn remove_member(&self, group_id: &str, user_id: &str) -> ScimResponse {
        self.scim
            .patch(
                &format!("/Groups/{group_id}"),
                &patch_ops(json!([{
                    "op": "remove",
                    "path": format!("members[value eq \"{user_id}\"]"),
                }])),
            )
            .await
    }

    /// As Entra ID renames a group.
    async fn rename_group(&self, group_id: &str, name: &str) -> ScimResponse {
        let rename = json!([{"op": "Replace", "path": "displayName", "value": name}]);
        self.scim
            .patch(&format!("/Groups/{group_id}"), &patch_ops(rename))
            .await
    }

    async fn add_member(&self, group_id: &str, user_id: &str) -> ScimResponse {
        self.scim
            .patch(
                &format!("/Groups/{group_id}"),
                &patch_ops(
                    json!([{"op": "add", "path": "members", "value": [{"value": user_id}]}]),
                ),
            )
            .await
    }
}

/// One request of the load generator: when it started to be sent, and its status (0: no
/// response, a transport error).
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: Instant,
    status: u16,
}

/// Builds one authenticated request of the load.
pub(crate) type MakeRequest =
    Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync>;

/// A GET of `url` with the session cookie, as an API client.
fn with_session(url: String, cookie: String) -> MakeRequest {
    Arc::new(move |c: &reqwest::Client| {
        c.get(&url)
            .header(COOKIE, format!("{SESSION_COOKIE}={cookie}"))
            .header(ACCEPT, "application/json")
    })
}

/// A GET of `url` with a bearer token.
pub(crate) fn with_bearer(url: String, token: String) -> MakeRequest {
    Arc::new(move |c: &reqwest::Client| {
        c.get(&url)
            .bearer_auth(&token)
            .header(ACCEPT, "application/json")
    })
}

/// The answer to what revokes a caller: it must have succeeded; named in messages.
pub(crate) trait Revoked {
    /// Asserts success; returns `METHOD url`.
    fn succeeded(self) -> String;
}

impl Revoked for ScimResponse {
    fn succeeded(self) -> String {
        let answer = self.expect_success();
        format!("{} {}", answer.method, answer.url)
    }
}

/// A sign-out (a redirect to the IdP, or a page saying so).
impl Revoked for reqwest::Response {
    fn succeeded(self) -> String {
        let status = self.status();
        assert!(
            status == StatusCode::FOUND || status == StatusCode::OK,
            "{} answered {status}",
            self.url()
        );
        format!("POST {}", self.url())
    }
}

/// Sends requests from [`LOAD_WORKERS`] clients continuously (bounded in count and time),
/// runs `revoke` (one SCIM request, or a sign-out) once some have been allowed, notes the
/// instant its answer arrived, keeps sending for a while, and asserts that no request sent
/// after that instant got a 2xx, and that each of them got one of `refused_with`.
pub(crate) async fn revocation_under_load(
    what: &str,
    make: MakeRequest,
    revoke: impl Future<Output = impl Revoked>,
    refused_with: &[u16],
) {
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let allowed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..LOAD_WORKERS {
        let (samples, stop, allowed, make) =
            (samples.clone(), stop.clone(), allowed.clone(), make.clone());
        workers.push(tokio::spawn(async move {
            let http = bare_client();
            let started = Instant::now();
            for _ in 0..LOAD_MAX_REQUESTS {
                if stop.load(Ordering::SeqCst) || started.elapsed() > LOAD_MAX_TIME {
                    break;
                }
                let sent = Instant::now();
                let status = match make(&http).send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let _ = resp.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                if (200..300).contains(&status) {
                    allowed.fetch_add(1, Ordering::SeqCst);
                }
                samples.lock().unwrap().push(Sample { sent, status });
            }
        }));
    }

    // Many requests must get through first, or the test could not fail.
    let deadline = Instant::now() + Duration::from_secs(5);
    while allowed.load(Ordering::SeqCst) < 100 {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            let statuses = histogram(&samples.lock().unwrap());
            panic!("{what}: fewer than 100 requests allowed before revoking: {statuses:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let answer = revoke.await;
    let answered = Instant::now();
    let answer = answer.succeeded();

    // Keep going until enough requests were sent after the answer (bounded).
    let deadline = answered + Duration::from_secs(3);
    loop {
        let after = samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.sent > answered)
            .count();
        if after >= 400 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(35), worker)
            .await
            .expect("a load worker stopped")
            .expect("a load worker panicked");
    }

    let samples = samples.lock().unwrap().clone();
    let (before, after): (Vec<Sample>, Vec<Sample>) =
        samples.iter().partition(|s| s.sent <= answered);
    let ok = |s: &&Sample| (200..300).contains(&s.status);
    assert!(
        before.iter().filter(ok).count() >= 100,
        "{what}: too few allowed before the SCIM answer: {:?}",
        histogram(&before)
    );
    assert!(
        after.len() >= 50,
        "{what}: only {} requests were sent after the SCIM answer ({answer})",
        after.len(),
    );
    let leaked: Vec<String> = after
        .iter()
        .filter(ok)
        .map(|s| {
            format!(
                "{} sent {} µs after the answer",
                s.status,
                (s.sent - answered).as_micros()
            )
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "{what}: {} of {} requests sent after the SCIM answer were allowed (first: {:?}); \
         statuses after: {:?}",
        leaked.len(),
        after.len(),
        leaked.first(),
        histogram(&after)
    );
    eprintln!(
        "{what}: {} requests sent before the SCIM answer {:?}, {} after {:?}",
        before.len(),
        histogram(&before),
        after.len(),
        histogram(&after)
    );
    let unexpected: Vec<u16> = after
        .iter()
        .map(|s| s.status)
        .filter(|s| !refused_with.contains(s))
        .collect();
    // A transport error (0) is not an answer, but it must stay rare.
    assert!(
        unexpected.iter().all(|&s| s == 0) && unexpected.len() * 10 <= after.len(),
        "{what}: after the SCIM answer, expected only {refused_with:?}, got {:?}",
        histogram(&after)
    );
}

/// `(status, count)`, sorted by status.
fn histogram(samples: &[Sample]) -> Vec<(u16, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for s in samples {
        *counts.entry(s.status).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

// ----- revocation ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn deactivation_refuses_the_next_request_and_ends_the_session() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/work");
    assert_session_works(&url, &cookie).await;

    revocation_under_load(
        "deactivating alice",
        with_session(url.clone(), cookie.clone()),
        t.set_active(&t.alice_id, false),
        &[401],
    )
    .await;

    // Re-activation does not bring the old session back: it is over.
    t.set_active(&t.alice_id, true).await.expect_success();
    assert_session_refused(&t.fx, &url, &cookie).await;
    // Signing in again works.
    let fresh = t.sign_in(ALICE, ALICE_PASSWORD).await;
    assert_ne!(fresh, cookie);
    let echo = assert_session_works(&url, &fresh).await;
    assert_eq!(echo.header("x-portcullis-user"), Some(ALICE));
    assert_session_refused(&t.fx, &url, &cookie).await;

    // Signed in while deactivated (her IdP account still works), she gets nowhere, and that
    // session does not come to life when she is re-activated.
    t.set_active(&t.alice_id, false).await.expect_success();
    let inactive = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let resp = get_with_session(&url, &inactive, "application/json").await;
    assert_eq!(
        resp.status(),
        StatusCode::FORBIDDEN,
        "signed in while deactivated"
    );
    t.set_active(&t.alice_id, true).await.expect_success();
    assert_session_refused(&t.fx, &url, &inactive).await;
    let again = t.sign_in(ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &again).await;
}

type Websocket = portcullis_tests::client::Websocket;

/// Opens a websocket to `path` on the app route with the session `cookie`.
async fn open_websocket(t: &Authz, path: &str, cookie: &str) -> Websocket {
    let cookie = format!("{SESSION_COOKIE}={cookie}");
    portcullis_tests::client::websocket(t.fx.cfg.http_addr(), "app.test", path, ("cookie", &cookie))
        .await
}

/// The stamp in `tick <stamp>` or `msg <stamp>`.
fn sent_at(message: &str) -> u64 {
    message
        .split_once(' ')
        .and_then(|(_, stamp)| stamp.parse().ok())
        .unwrap_or_else(|| panic!("unexpected message {message:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_websocket_carries_not_one_frame_after_deactivation_and_is_closed() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    // Busy: the upstream sends a tick every 20 ms and the client a message every 10 ms, each
    // stamped with when it was sent. Idle: an echo nobody speaks on.
    let (mut busy_tx, mut busy_rx) = open_websocket(&t, "/ws-ticks", &cookie).await.split();
    let mut idle = open_websocket(&t, "/ws", &cookie).await;

    let stop_sending = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop_sending.clone();
        tokio::spawn(async move {
            let mut sent = 0usize;
            // Bounded: at most 2000 messages (20 s).
            while sent < 2000 && !stop.load(Ordering::Relaxed) {
                if busy_tx
                    .send(Message::text(format!("msg {}", stamp())))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };
    let ticks = Arc::new(Mutex::new(Vec::<String>::new()));
    let receiver = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                match tokio::time::timeout_at(deadline, busy_rx.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        ticks.lock().unwrap().push(text.to_string());
                    }
                    Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => return true,
                    Ok(Some(Ok(_))) => {}
                    Err(_) => return false,
                }
            }
        })
    };

    // Both directions work before.
    let until = Instant::now() + Duration::from_secs(10);
    while (ticks.lock().unwrap().len() < 5 || t.fx.app.ws_received().len() < 5)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ticks.lock().unwrap().len() >= 5,
        "no ticks arrive through the proxy"
    );
    assert!(
        t.fx.app.ws_received().len() >= 5,
        "no messages reach the upstream"
    );

    t.set_active(&t.alice_id, false).await.expect_success();
    let answered = stamp();

    // The busy connection is closed; keep sending meanwhile, to show nothing gets through.
    let closed = tokio::time::timeout(Duration::from_secs(10), receiver)
        .await
        .expect("the receiver is bounded")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_sending.store(true, Ordering::Relaxed);
    let sent = sender.await.unwrap();
    assert!(
        closed,
        "the busy websocket was still open 10 s after the deactivation"
    );

    let late_ticks: Vec<String> = ticks
        .lock()
        .unwrap()
        .iter()
        .filter(|tick| sent_at(tick) >= answered)
        .cloned()
        .collect();
    assert!(
        late_ticks.is_empty(),
        "ticks sent by the upstream after the SCIM answer reached the client: {late_ticks:?}"
    );
    let late_messages: Vec<String> =
        t.fx.app
            .ws_received()
            .into_iter()
            .filter(|msg| sent_at(msg) >= answered)
            .collect();
    assert!(
        late_messages.is_empty(),
        "messages sent by the client after the SCIM answer reached the upstream \
         ({sent} sent in all): {late_messages:?}"
    );

    // The idle connection, on which nothing was said, is closed too.
    let idle_end = tokio::time::timeout(Duration::from_secs(5), idle.next()).await;
    assert!(
        matches!(
            idle_end,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))
        ),
        "the idle websocket was not closed within 5 s of the deactivation: {idle_end:?}"
    );
    // And the session is over.
    assert_session_refused(&t.fx, &t.app_url("/work"), &cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_comes_after_removal_from_the_group_is_refused_whole() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    // Slow handlers (a long poll, a report): let in, then the upstream takes its time. A GET's
    // answer has a body; a HEAD's has only its status and headers.
    let before = t.fx.app.count();
    let url = t.app_url("/slow?ms=3000");
    let slow: Vec<_> = [reqwest::Method::GET, reqwest::Method::HEAD]
        .into_iter()
        .map(|method| {
            let request = bare_client()
                .request(method.clone(), &url)
                .header(COOKIE, format!("{SESSION_COOKIE}={cookie}"))
                .header(ACCEPT, "application/json");
            tokio::spawn(async move { (method, request.send().await.unwrap()) })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.fx.app.count() < before + slow.len() {
        assert!(
            Instant::now() < deadline,
            "the slow requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.remove_member(&t.eng_id, &t.alice_id)
        .await
        .expect_success();
    // The answers, arriving after the removal, are not passed on: not their status, not
    // their headers (a Location, the upstream's cookies), not their body.
    for answer in slow {
        let (method, resp) = answer.await.unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::FORBIDDEN, "{method}: {body}");
        assert!(
            !body.contains("\"upstream\""),
            "{method}: the answer crossed: {body}"
        );
        // Told who they are and why, as a request refused at once is.
        if method == reqwest::Method::GET {
            let refusal: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(refusal["error"], "forbidden", "{body}");
            assert_eq!(refusal["user"], ALICE, "{body}");
            assert!(
                refusal["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{body}"
            );
        }
    }
}

/// A slow request whose session is signed out meanwhile (in another tab) is refused as one
/// made then would be: told why, as nobody signed in, in JSON to an API client.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_comes_after_its_session_ended_is_refused_as_nobody_s() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let before = t.fx.app.count();
    let request = bare_client()
        .get(t.app_url("/slow?ms=3000"))
        .header(COOKIE, format!("{SESSION_COOKIE}={cookie}"))
        .header(ACCEPT, "application/json");
    let slow = tokio::spawn(async move { request.send().await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.fx.app.count() == before {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = t.fx.sign_out(&format!("{SESSION_COOKIE}={cookie}")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let resp = slow.await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body = resp.text().await.unwrap();
    let refusal: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusal["error"], "forbidden", "{body}");
    assert_eq!(refusal["user"], serde_json::Value::Null, "{body}");
    let reason = refusal["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("the session has ended or expired"),
        "{body}"
    );
}

/// An event stream that sits idle is closed once its caller loses access, as an idle
/// websocket is: a person's, a machine's, and one that asked for a websocket besides (which
/// goes upstream as an ordinary request, on a route with websockets or without).
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_event_stream_is_closed_once_its_caller_loses_access() {
    let t = Authz::start().await;
    let cookie = format!(
        "{SESSION_COOKIE}={}",
        t.sign_in(ALICE, ALICE_PASSWORD).await
    );
    let bearer = format!("Bearer {}", t.machine_token().await);
    let open = |url: String, credential: (reqwest::header::HeaderName, &str), upgrade| {
        let mut request = bare_client()
            .get(url)
            .header(credential.0, credential.1)
            .header(ACCEPT, "text/event-stream");
        if let Some(connection) = upgrade {
            request = request
                .header("connection", connection)
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("sec-websocket-version", "13");
        }
        async move {
            let mut resp = request.send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
                .await
                .expect("the first event arrives");
            assert_eq!(first.unwrap().as_deref(), Some(&b"data: hello\n\n"[..]));
            resp
        }
    };
    let mut streams = [
        open(t.app_url("/idle-events"), (COOKIE, &cookie), None).await,
        open(t.api_url("/idle-events"), (AUTHORIZATION, &bearer), None).await,
        open(
            t.api_url("/idle-events"),
            (AUTHORIZATION, &bearer),
            Some("upgrade"),
        )
        .await,
        // On a route with websockets, the upstream answering the stream and not the upgrade,
        // and not told the client asked for one (`Accept` named in `Connection`).
        open(
            t.app_url("/idle-events"),
            (COOKIE, &cookie),
            Some("upgrade"),
        )
        .await,
        open(
            t.app_url("/idle-events"),
            (COOKIE, &cookie),
            Some("upgrade, accept"),
        )
        .await,
    ];
    t.remove_member(&t.eng_id, &t.alice_id)
        .await
        .expect_success();
    t.remove_member(&t.eng_id, &t.machine_id)
        .await
        .expect_success();
    for (i, resp) in streams.iter_mut().enumerate() {
        let ended = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await;
        assert!(
            matches!(ended, Ok(Err(_) | Ok(None))),
            "stream {i} is still open: {ended:?}"
        );
    }
}

/// An event stream over HTTP/2 is closed too once its caller loses access (the path from the
/// upstream is pingora's HTTP/1.1 one either way), and the caller's next request refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_event_stream_is_closed_once_its_caller_loses_access() {
    let t = Authz::start().await;
    let bearer = format!("Bearer {}", t.machine_token().await);
    let client = tls_client(&t.ca);
    let url = |path| t.fx.cfg.https_url("api.test", path);
    let mut resp = client
        .get(url("/idle-events"))
        .header(AUTHORIZATION, &bearer)
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the first event arrives");
    assert_eq!(first.unwrap().as_deref(), Some(&b"data: hello\n\n"[..]));
    t.remove_member(&t.eng_id, &t.machine_id)
        .await
        .expect_success();
    let ended = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await;
    assert!(
        matches!(ended, Ok(Err(_) | Ok(None))),
        "the stream is still open: {ended:?}"
    );
    let after = client
        .get(url("/after"))
        .header(AUTHORIZATION, &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(after.version(), reqwest::Version::HTTP_2);
    assert_eq!(after.status(), StatusCode::FORBIDDEN);
}

/// An event stream whose upstream has not answered yet (Go's servers send nothing before the
/// first event) is cut when its caller loses access, and answered 403 as a refusal, not 502.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_cut_before_its_upstream_answers_is_refused_with_403() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/slow?ms=20000");
    let request = tokio::spawn(async move {
        let resp = get_with_session(&url, &cookie, "text/event-stream").await;
        (resp.status(), Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.fx.app.seen().iter().any(|e| e.uri.starts_with("/slow")) {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.remove_member(&t.eng_id, &t.alice_id)
        .await
        .expect_success();
    let answered = Instant::now();
    let (status, at) = tokio::time::timeout(Duration::from_secs(15), request)
        .await
        .expect("answered before the upstream would have")
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(at.duration_since(answered) < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_response_carries_not_one_chunk_after_removal_from_the_group() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    // A plain streaming response (not an event stream): only the per-chunk check guards it.
    let mut resp = get_with_session(&t.app_url("/stream-ticks"), &cookie, "text/plain").await;
    assert_eq!(resp.status(), StatusCode::OK);

    let mut received = String::new();
    while received.lines().count() < 5 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("ticks arrive")
            .expect("the stream is fine")
            .expect("the stream goes on");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    t.remove_member(&t.eng_id, &t.alice_id)
        .await
        .expect_success();
    let answered = stamp();

    // Read on until the stream ends (it would run for 20 s); it must end early, with an error.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => received.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => return "completed",
                Err(_) => return "cut",
            }
        }
    })
    .await;
    assert_eq!(ended, Ok("cut"), "the stream was not cut");
    let late: Vec<&str> = received
        .lines()
        .filter(|line| sent_at(line) >= answered)
        .collect();
    assert!(
        late.is_empty(),
        "chunks sent by the upstream after the SCIM answer reached the client: {late:?}"
    );
    // The cut is audited (by the audit thread, just after).
    let audited =
        t.fx.px
            .audit_log_until(Duration::from_secs(10), |text| {
                text.contains("open connection closed")
            })
            .await;
    assert!(
        audited
            .lines()
            .any(|line| line.contains("open connection closed") && line.contains(ALICE)),
        "the cut is not in the audit log:\n{audited}"
    );
}

/// The upstream judged a websocket by the identity headers it got when it opened (an admin
/// console checking `X-Portcullis-Groups`): removed from a group, the caller loses that
/// websocket although the route still lets them in, and opens a new one as they now are.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_ends_when_its_caller_s_groups_change_though_the_route_still_lets_them_in() {
    let t = Authz::start().await;
    let admins = t.scim.create_group("admins", &[&t.alice_id]).await.id();
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let mut ws = open_websocket(&t, "/ws", &cookie).await;
    let told =
        t.fx.app
            .seen()
            .last()
            .map(|echo| echo.header("x-portcullis-groups").map(str::to_owned));
    assert!(
        told.flatten()
            .is_some_and(|groups| groups.contains("admins")),
        "the upstream was not told of admins"
    );
    ws.send(Message::text("as an admin")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(echoed, Ok(Some(Ok(Message::Text(_))))),
        "{echoed:?}"
    );

    t.remove_member(&admins, &t.alice_id).await.expect_success();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(end, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))),
        "the websocket opened as an admin was not closed within 5 s: {end:?}"
    );
    // Still in eng: a new one opens, told of her groups as they are.
    let mut again = open_websocket(&t, "/ws", &cookie).await;
    again.send(Message::text("as myself")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), again.next()).await;
    assert!(
        matches!(echoed, Ok(Some(Ok(Message::Text(_))))),
        "{echoed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_out_closes_the_sessions_open_websockets() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let other = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let mut idle = open_websocket(&t, "/ws", &cookie).await;
    let mut other_ws = open_websocket(&t, "/ws", &other).await;

    let resp = t.fx.sign_out(&format!("{SESSION_COOKIE}={cookie}")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);

    let end = tokio::time::timeout(Duration::from_secs(5), idle.next()).await;
    assert!(
        matches!(end, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))),
        "the signed-out session's websocket was not closed within 5 s: {end:?}"
    );
    // Alice's other session, in another browser, carries on.
    other_ws.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), other_ws.next())
        .await
        .expect("the other session's websocket answers")
        .expect("open")
        .unwrap();
    assert_eq!(echoed, Message::text("still here"));
}

/// `portcullis explain` for `user` on `url` with the test's config; (exit code, stdout).
async fn explain(t: &Authz, user: &str, url: &str, method: &str) -> (i32, String) {
    let config = t.fx.px.config_path().display().to_string();
    let out = portcullis_tests::process::run(
        t.fx.px.dir(),
        &[
            "explain", "--config", &config, "--user", user, "--url", url, "--method", method,
        ],
    )
    .await;
    let code = out.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 1, "explain failed: {}", out.stderr);
    (code, out.stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_judges_a_machine_by_its_service_account() {
    let t = Authz::start().await;
    let config = t.fx.px.config_path().display().to_string();
    let api = t.api_url("/jobs");
    let explain_machine = || async {
        let out = portcullis_tests::process::run(
            t.fx.px.dir(),
            &[
                "explain",
                "--config",
                &config,
                "--machine",
                MACHINE_ID,
                "--url",
                &api,
            ],
        )
        .await;
        (out.status.code().unwrap_or(-1), out.stdout)
    };
    let (code, out) = explain_machine().await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rule:   routes[1].allow"), "{out}");
    // People cannot sign in to the bearer-only route, whoever they are.
    let (code, out) = explain(&t, MACHINE_ID, &api, "GET").await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(t.set_active(&t.machine_id, false).await.status, 200);
    let (code, out) = explain_machine().await;
    assert_eq!(code, 1, "a deactivated service account: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_judges_against_the_live_directory_with_or_without_a_running_proxy() {
    let mut t = Authz::start().await;
    let work = t.app_url("/work");

    let (code, out) = explain(&t, ALICE, &work, "GET").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with(&format!("ALLOW GET {work}")), "{out}");
    assert!(
        out.contains(&format!("user:   {ALICE} (active; groups: {GROUP})")),
        "{out}"
    );
    assert!(out.contains("rule:   routes[0].allow"), "{out}");

    // The deny rule, however the path is spelled; the path is judged as the proxy judges it.
    for path in ["/admin", "/x/../admin", "//admin", "/%61dmin/users"] {
        let (code, out) = explain(&t, ALICE, &t.app_url(path), "POST").await;
        assert_eq!(code, 1, "{path}: {out}");
        assert!(out.starts_with("DENY POST"), "{path}: {out}");
        assert!(out.contains("rule:   routes[0].deny"), "{path}: {out}");
    }
    let (code, out) = explain(&t, ALICE, &t.app_url("/admin%2fx"), "GET").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused with 400"), "{out}");

    // Strangers, and addresses no route serves.
    let (code, out) = explain(&t, "mallory@example.com", &work, "GET").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("user:   not in the directory"), "{out}");
    let (code, out) = explain(&t, ALICE, "http://nowhere.test/", "GET").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no route serves this address"), "{out}");

    // The live directory: a SCIM change shows at once.
    t.remove_member(&t.eng_id, &t.alice_id)
        .await
        .expect_success();
    let (code, out) = explain(&t, ALICE, &work, "GET").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("groups: none"), "{out}");

    // Without a running proxy, explain reads the directory it left behind.
    t.add_member(&t.eng_id, &t.alice_id).await.expect_success();
    t.fx.px.kill_hard();
    let (code, out) = explain(&t, ALICE, &work, "GET").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("groups: {GROUP}")), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn removal_from_the_group_refuses_the_next_request_and_re_adding_restores_it() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/work");
    assert_session_works(&url, &cookie).await;

    revocation_under_load(
        "removing alice from eng",
        with_session(url.clone(), cookie.clone()),
        t.remove_member(&t.eng_id, &t.alice_id),
        &[403],
    )
    .await;
    assert_eq!(t.scim.member_ids(&t.eng_id).await, [t.machine_id.as_str()]);

    // The session itself is fine: re-adding her lets the same session in at once.
    t.add_member(&t.eng_id, &t.alice_id).await.expect_success();
    let echo = assert_session_works(&url, &cookie).await;
    assert_eq!(echo.header("x-portcullis-groups"), Some(GROUP));
}

/// Routes name groups by `displayName`: a group renamed in the IdP no longer lets its
/// members in under its old name, from the next request, and renamed back lets them in again.
#[tokio::test(flavor = "multi_thread")]
async fn renaming_the_group_refuses_the_next_request_and_renaming_it_back_restores_it() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/work");
    assert_session_works(&url, &cookie).await;
    revocation_under_load(
        "renaming eng to ops",
        with_session(url.clone(), cookie.clone()),
        t.rename_group(&t.eng_id, "ops"),
        &[403],
    )
    .await;

    t.rename_group(&t.eng_id, GROUP).await.expect_success();
    let echo = assert_session_works(&url, &cookie).await;
    assert_eq!(echo.header("x-portcullis-groups"), Some(GROUP));
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_group_refuses_the_next_request() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/work");
    assert_session_works(&url, &cookie).await;

    revocation_under_load(
        "deleting the group eng",
        with_session(url.clone(), cookie.clone()),
        t.scim.delete(&format!("/Groups/{}", t.eng_id)),
        &[403],
    )
    .await;

    // A new group of the same name, with her in it, lets the same session in again.
    t.scim.create_group(GROUP, &[&t.alice_id]).await;
    assert_session_works(&url, &cookie).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_user_refuses_the_next_request_and_a_re_created_user_must_sign_in() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/work");
    assert_session_works(&url, &cookie).await;

    revocation_under_load(
        "deleting alice",
        with_session(url.clone(), cookie.clone()),
        t.scim.delete(&format!("/Users/{}", t.alice_id)),
        &[403],
    )
    .await;

    // Re-created with the same userName (and put back in eng), she is someone new to the
    // directory: the old session does not carry over.
    let new_id = t.scim.create_user(ALICE).await.id();
    t.add_member(&t.eng_id, &new_id).await.expect_success();
    assert_session_refused(&t.fx, &url, &cookie).await;
    let fresh = t.sign_in(ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &fresh).await;
}

/// A bearer token from before its user was re-activated is no longer theirs: refused on a
/// route, and at `/.portcullis/me`, which would show the directory's record of whoever holds
/// the name now, as for a session.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_older_than_its_user_shows_no_record_at_me() {
    let t = Authz::start().await;
    let token = t.machine_token().await;
    let me = || async {
        let resp = bare_client()
            .get(t.api_url("/.portcullis/me"))
            .bearer_auth(&token)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .expect("/me is answered");
        let challenge = resp.headers().get(WWW_AUTHENTICATE).cloned();
        let challenge = challenge.map(|v| v.to_str().unwrap_or_default().to_owned());
        (
            resp.status(),
            resp.text().await.unwrap_or_default(),
            challenge,
        )
    };
    let (status, body, _) = me().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"directory\":{"), "{body}");

    crate::signin::after_the_second_of(&token).await;
    t.set_active(&t.machine_id, false).await.expect_success();
    t.set_active(&t.machine_id, true).await.expect_success();
    let route = bare_client()
        .get(t.api_url("/work"))
        .bearer_auth(&token)
        .send();
    let route = route.await.expect("the route answers");
    assert_eq!(route.status(), StatusCode::UNAUTHORIZED);
    let (status, body, challenge) = me().await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // As a route answers it: its client gets a new token.
    let challenge = challenge.unwrap_or_default();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    let audited = t
        .fx
        .px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.lines()
                .any(|line| line.contains("/.portcullis/me") && line.contains("was last created"))
        })
        .await;
    assert!(
        audited.lines().any(|line| line.contains("/.portcullis/me")
            && line.contains("was last created, re-activated")
            && line.contains("\"refusal\"")),
        "the outdated token at /.portcullis/me is not in the audit log:\n{audited}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_users_session_does_not_pass_to_the_user_given_her_name() {
    let t = Authz::start().await;
    // Carol is in eng from before alice signs in: her record predates alice's session.
    let carol = t.scim.create_user("carol@corp.test").await.id();
    t.add_member(&t.eng_id, &carol).await.expect_success();
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/work");
    assert_session_works(&url, &cookie).await;
    t.scim
        .delete(&format!("/Users/{}", t.alice_id))
        .await
        .expect_success();
    let deleted = get_with_session(&url, &cookie, "application/json").await;
    assert_eq!(deleted.status(), StatusCode::FORBIDDEN, "deleted");

    // The IdP gives alice's name to carol: the session alice signed in with, looked up by
    // that name, now finds carol, and must not be let in as her.
    t.scim
        .patch(
            &format!("/Users/{carol}"),
            &patch_ops(json!([{"op": "replace", "path": "userName", "value": ALICE}])),
        )
        .await
        .expect_success();
    // Not at /.portcullis/me either, which would show carol's record as hers.
    let me = get_with_session(&t.app_url("/.portcullis/me"), &cookie, "application/json").await;
    assert_eq!(me.status(), StatusCode::UNAUTHORIZED);
    // Ended there, and recorded as a refusal at a route would be.
    let audited =
        t.fx.px
            .audit_log_until(Duration::from_secs(10), |text| {
                text.contains("/.portcullis/me")
            })
            .await;
    assert!(
        audited.lines().any(|line| line.contains("/.portcullis/me")
            && line.contains("must sign in again")
            && line.contains("\"refusal\"")),
        "the session ended at /.portcullis/me is not in the audit log:\n{audited}"
    );
    assert_session_refused(&t.fx, &url, &cookie).await;
    // Whoever signs in as that name now is carol's record, with its groups.
    let fresh = t.sign_in(ALICE, ALICE_PASSWORD).await;
    assert_session_works(&url, &fresh).await;
}

/// A request let in, then held up connecting (its first upstream never completes the TLS
/// handshake) while its caller is deactivated, is judged again before it is sent to the
/// upstream it is retried on: refused, and that upstream never sees it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_retried_after_its_caller_was_deactivated_never_reaches_the_upstream() {
    let mute = portcullis_tests::upstream::Mute::start().await;
    let api = Upstream::start("retried").await;
    let cfg = ConfigBuilder::new().http_listener();
    let (idp, _) = idp_for_app_test(&cfg).await;
    let cfg = cfg
        .route(
            Route::to_urls("http://retry.test", vec![mute.tls_url(), api.url()])
                .accept(&["bearer"])
                .set("allow = { groups = [\"eng\"] }")
                .set("connect_timeout = \"30s\""),
        )
        .jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]))
        .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)]);
    let px = cfg.start().await;
    let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
    let machine = scim.create_user(MACHINE_ID).await.id();
    scim.create_group(GROUP, &[&machine]).await.expect_success();
    let token = idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    // The route's first request tries the mute upstream first (round-robin starts there).
    let url = cfg.http_url("retry.test", "/v1/retried");
    let sent =
        tokio::spawn(async move { bare_client().get(&url).bearer_auth(&token).send().await });
    mute.accepted().await;
    let off = patch_ops(json!([{"op": "replace", "value": {"active": false}}]));
    scim.patch(&format!("/Users/{machine}"), &off)
        .await
        .expect(200);
    // Answered: the connection attempt fails now, and the request goes to the next upstream.
    mute.hang_up();
    let resp = sent.await.unwrap().expect("an answer");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{}", px.log());
    assert!(
        !api.seen().iter().any(|e| e.uri == "/v1/retried"),
        "the retried request reached the upstream after its caller was deactivated"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deactivating_a_service_account_refuses_its_token_on_the_next_request() {
    let t = Authz::start().await;
    let token = t.machine_token().await;
    assert_eq!(
        jwt_claims(&token)["sub"],
        MACHINE_ID,
        "the service account is found by the token's sub"
    );
    let url = t.api_url("/v1/jobs");
    let get = |token: &str| bare_client().get(&url).bearer_auth(token).send();
    let resp = get(&token).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    revocation_under_load(
        "deactivating the build-agent service account",
        with_bearer(url.clone(), token.clone()),
        t.set_active(&t.machine_id, false),
        &[403],
    )
    .await;

    // Re-activated (its secret rotated, say), it does not get its old tokens back: one issued
    // before is invalid, audited, and its client gets a new one. `iat` is in seconds: the
    // re-activation waits for the token's second to pass.
    after_the_second_of(&token).await;
    t.set_active(&t.machine_id, true).await.expect_success();
    let resp = get(&token).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()[reqwest::header::WWW_AUTHENTICATE].to_str();
    assert!(challenge.unwrap().contains("invalid_token"));
    let records = crate::audit::audit_json_until(&t.fx.px, &[], |r| {
        crate::audit::of_event(r, "refusal")
            .iter()
            .any(|r| r["reason"].as_str().unwrap().contains("issued before"))
    })
    .await;
    let refusal = crate::audit::of_event(&records, "refusal")
        .into_iter()
        .find(|r| r["reason"].as_str().unwrap().contains("issued before"))
        .cloned()
        .unwrap();
    let who = refusal["user"].as_str().unwrap();
    assert!(who.starts_with(&format!("{MACHINE_ID}@")), "{refusal}");
    assert_eq!(refusal["path"], "/v1/jobs", "{refusal}");
    let token = t.machine_token().await;
    let resp = get(&token).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // And removing it from the group refuses it.
    t.remove_member(&t.eng_id, &t.machine_id)
        .await
        .expect_success();
    let resp = get(&token).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

// ----- identity headers ----------------------------------------------------------------------

/// `GET <path>` on app.test with the session cookie, `extra` header lines (each ending in
/// CRLF) written byte for byte.
fn raw_get(t: &Authz, path: &str, cookie: &str, extra: &str) -> Vec<u8> {
    let port = t.fx.cfg.http_addr().port();
    format!(
        "GET {path} HTTP/1.1\r\nHost: app.test:{port}\r\nAccept: application/json\r\n\
         Cookie: {SESSION_COOKIE}={cookie}\r\n{extra}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// True for a header name Portcullis reserves: `x-portcullis-` in any case, `_` for `-`.
fn is_reserved(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace('_', "-");
    name.starts_with("x-portcullis-")
}

/// A route told to set no identity headers (an upstream that must not learn emails and
/// groups), or no assertion, sets none; and a client's own never get through in their place.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_without_identity_headers_or_assertion_sends_none_and_no_client_s() {
    let t = Authz::start().await;
    let token = t.machine_token().await;
    let call = |host: &'static str| {
        let url = t.fx.url(host, "/told");
        let token = token.clone();
        async move {
            let resp = bare_client()
                .get(&url)
                .bearer_auth(&token)
                .header("X-Portcullis-User", "mallory@corp.test")
                .header("X-Portcullis-Groups", "admins")
                .header("X-Portcullis-Assertion", "forged.by.client")
                .send()
                .await
                .expect("the route answers");
            assert_eq!(resp.status(), StatusCode::OK, "{url}");
            Echo::parse(&resp.bytes().await.unwrap_or_default())
        }
    };
    let quiet = call("quiet.test").await;
    for name in [
        "x-portcullis-user",
        "x-portcullis-email",
        "x-portcullis-groups",
    ] {
        assert_eq!(quiet.header(name), None, "{name}: {:?}", quiet.headers);
    }
    let assertion = quiet
        .header("x-portcullis-assertion")
        .expect("the assertion");
    assert_ne!(assertion, "forged.by.client");
    let unsigned = call("unsigned.test").await;
    assert_eq!(unsigned.header("x-portcullis-assertion"), None);
    assert_eq!(unsigned.header("x-portcullis-user"), Some(MACHINE_ID));
    assert_eq!(unsigned.header("x-portcullis-groups"), Some(GROUP));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_sent_identity_headers_never_reach_the_upstream() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let addr = t.fx.cfg.http_addr();
    let forged = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl";
    let jwks = fetch_jwks(&t).await;
    let issuer = t.app_url("");

    let variants: Vec<(&str, String)> = vec![
        ("none", String::new()),
        (
            "canonical user",
            "X-Portcullis-User: mallory@corp.test\r\n".into(),
        ),
        (
            "lower-case user",
            "x-portcullis-user: mallory@corp.test\r\n".into(),
        ),
        (
            "underscores",
            "X_Portcullis_User: mallory@corp.test\r\n".into(),
        ),
        (
            "mixed _ and -",
            "X-Portcullis_User: mallory@corp.test\r\n".into(),
        ),
        (
            "upper-case groups",
            "X-PORTCULLIS-GROUPS: admins\r\n".into(),
        ),
        ("email", "X-Portcullis-Email: mallory@corp.test\r\n".into()),
        ("assertion", format!("X-Portcullis-Assertion: {forged}\r\n")),
        (
            "lower-case assertion",
            format!("x-portcullis-assertion: {forged}\r\n"),
        ),
        (
            "duplicates",
            "X-Portcullis-User: mallory@corp.test\r\nX-Portcullis-User: eve@corp.test\r\n\
             x-portcullis-groups: admins\r\nX-Portcullis-Groups: eng, admins\r\n"
                .into(),
        ),
        (
            "unknown reserved name",
            "X-Portcullis-Role: admin\r\n".into(),
        ),
        (
            "named in Connection",
            "X-Portcullis-User: mallory@corp.test\r\n\
             Connection: X-Portcullis-User, X-Portcullis-Groups, X-Portcullis-Assertion, \
             X-Portcullis-Email\r\n"
                .into(),
        ),
        (
            "X-Forwarded-For named in Connection",
            "X-Forwarded-For: 10.6.6.6\r\nConnection: X-Forwarded-For\r\n".into(),
        ),
        (
            "everything",
            format!(
                "X-Portcullis-User: mallory@corp.test\r\nx_portcullis_user: eve\r\n\
                 X-PORTCULLIS-EMAIL: mallory@corp.test\r\nX-Portcullis-Groups: admins\r\n\
                 X-Portcullis-Assertion: {forged}\r\nX-Portcullis-Assertion: {forged}\r\n\
                 Connection: keep-alive, X-Portcullis-User\r\n"
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (what, extra) in &variants {
        let resp = raw_request(addr, &raw_get(&t, "/spoof", &cookie, extra))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // Naming a header Portcullis sets itself (X-Forwarded-For) in `Connection` is refused
        // outright (pingora: "protected header cannot be nominated"); that is as good as
        // ignoring it, so either is accepted, but never a request without it.
        if *what == "X-Forwarded-For named in Connection" && resp.status == 400 {
            continue;
        }
        if resp.status != 200 {
            failures.push(format!(
                "{what}: status {}: {}",
                resp.status,
                resp.body_text()
            ));
            continue;
        }
        let echo = Echo::parse(&resp.body);
        let reserved: Vec<(String, String)> = echo
            .headers
            .iter()
            .filter(|(n, _)| is_reserved(n))
            .cloned()
            .collect();
        let mut names: Vec<&str> = reserved.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        let want_names = [
            "x-portcullis-assertion",
            "x-portcullis-email",
            "x-portcullis-groups",
            "x-portcullis-user",
        ];
        if names != want_names {
            failures.push(format!("{what}: reserved headers upstream: {reserved:?}"));
            continue;
        }
        for (name, want) in [
            ("x-portcullis-user", ALICE),
            ("x-portcullis-email", ALICE),
            ("x-portcullis-groups", GROUP),
        ] {
            if echo.header(name) != Some(want) {
                failures.push(format!("{what}: {name} = {:?}", echo.header(name)));
            }
        }
        let assertion = echo.header("x-portcullis-assertion").unwrap_or_default();
        if assertion == forged {
            failures.push(format!("{what}: the client's assertion was forwarded"));
        } else if let Err(e) = verify_with(&jwks, assertion, &issuer, APP_ROUTE) {
            failures.push(format!("{what}: the assertion does not verify: {e}"));
        } else if jwt_claims(assertion)["sub"] != ALICE {
            failures.push(format!(
                "{what}: assertion sub {}",
                jwt_claims(assertion)["sub"]
            ));
        }
        if echo.header_all("x-forwarded-for") != ["127.0.0.1"] {
            failures.push(format!(
                "{what}: x-forwarded-for upstream: {:?}",
                echo.header_all("x-forwarded-for")
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ----- path normalization --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_deny_rule_sees_the_path_the_upstream_gets() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let addr = t.fx.cfg.http_addr();

    // (path as sent, status, path the upstream must get when allowed)
    let table: &[(&str, u16, Option<&str>)] = &[
        ("/admin", 403, None),
        ("/./admin", 403, None),
        ("//admin", 403, None),
        ("/%61dmin", 403, None),
        ("/adm%69n", 403, None),
        ("/%2e/admin", 403, None),
        ("/x/../admin", 403, None),
        ("/x/%2e%2e/admin", 403, None),
        ("/../admin", 403, None),
        ("/admin/", 403, None),
        ("/admin/x", 403, None),
        ("/admin/./x/../y", 403, None),
        ("/admin?x=1", 403, None),
        // An encoded slash is ambiguous: refused, not guessed.
        ("/admin%2f", 400, None),
        ("/admin%2F", 400, None),
        ("/%2fadmin", 400, None),
        ("/x/..%2fadmin", 400, None),
        // So is a control character: Starlette matches /admin at /admin%0A.
        ("/admin%0A", 400, None),
        ("/admin%0a", 400, None),
        ("/admin%0D%0A", 400, None),
        // Deny rules read a path as the most lenient upstream would (Express and ASP.NET
        // route /ADMIN as /admin).
        ("/ADMIN", 403, None),
        // Prefixes match at segment boundaries.
        ("/administrator", 200, Some("/administrator")),
        ("/x/../administrator", 200, Some("/administrator")),
        ("/public/./page", 200, Some("/public/page")),
    ];
    let mut failures = Vec::new();
    for &(path, want, upstream_path) in table {
        let resp = raw_request(addr, &raw_get(&t, path, &cookie, ""))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        if resp.status != want {
            failures.push(format!(
                "{path}: expected {want}, got {}: {}",
                resp.status,
                resp.body_text()
            ));
            continue;
        }
        match want {
            200 => {
                let echo = Echo::parse(&resp.body);
                if Some(echo.uri.as_str()) != upstream_path {
                    failures.push(format!("{path}: the upstream got {}", echo.uri));
                }
            }
            403 => {
                let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                if body["error"] != "forbidden" || body["route"] != APP_ROUTE {
                    failures.push(format!("{path}: 403 body {}", resp.body_text()));
                }
            }
            _ => {}
        }
    }
    // Nothing refused ever reached the upstream.
    let reached: Vec<String> =
        t.fx.app
            .seen()
            .into_iter()
            .map(|e| e.uri)
            .filter(|u| u == "/admin" || u.starts_with("/admin/") || u.starts_with("/admin?"))
            .collect();
    if !reached.is_empty() {
        failures.push(format!("the upstream got denied paths: {reached:?}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The encoded slashes were probes: each is recorded, with the path as sent.
    let audited =
        t.fx.px
            .audit_log_until(Duration::from_secs(10), |text| {
                text.contains("/x/..%2fadmin")
            })
            .await;
    for path in ["/admin%2f", "/admin%2F", "/%2fadmin", "/x/..%2fadmin"] {
        assert!(
            audited
                .lines()
                .any(|line| line.contains(&format!("\"path\":\"{path}\""))
                    && line.contains("refused as malformed: the path holds an encoded")),
            "{path} is not in the audit log:\n{audited}"
        );
    }
}

// ----- the signed assertion ------------------------------------------------------------------

async fn fetch_jwks(t: &Authz) -> jsonwebtoken::jwk::JwkSet {
    let resp = bare_client()
        .get(t.app_url("/.portcullis/jwks.json"))
        .send()
        .await
        .expect("GET jwks");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("JWKS {e}: {text}"))
}

/// Verifies the assertion an upstream got, as an upstream would: ES256 by a key of the JWKS
/// Portcullis publishes, for this route, not expired. Returns its claims.
fn verify_assertion(jwks: &jsonwebtoken::jwk::JwkSet, issuer: &str, echo: &Echo) -> Value {
    let all = echo.header_all("x-portcullis-assertion");
    assert_eq!(all.len(), 1, "one assertion: {:?}", echo.headers);
    let token = all[0];
    let header = jwt_header(token);
    assert_eq!(header["alg"], "ES256", "{header}");
    assert!(header["kid"].is_string(), "{header}");
    let claims = verify_with(jwks, token, issuer, APP_ROUTE)
        .unwrap_or_else(|e| panic!("the assertion does not verify: {e}: {token}"));
    let now = crate::signin::now_unix();
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert!(iat <= now + 5 && exp > now && exp - iat <= 3600, "{claims}");
    claims
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_verifies_the_assertion_against_the_published_jwks() {
    let t = Authz::start().await;
    let ops_id = t.scim.create_group("ops", &[]).await.id();
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    let url = t.app_url("/whoami");
    let jwks = fetch_jwks(&t).await;
    assert!(
        jwks.keys.iter().all(|k| matches!(
            k.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)
        )),
        "only EC keys are published"
    );
    let issuer = t.app_url("");

    let first = assert_session_works(&url, &cookie).await;
    let claims = verify_assertion(&jwks, &issuer, &first);
    assert_eq!(claims["iss"], issuer.as_str(), "{claims}");
    assert_eq!(claims["aud"], APP_ROUTE, "{claims}");
    assert_eq!(claims["sub"], ALICE, "{claims}");
    assert_eq!(claims["email"], ALICE, "{claims}");
    assert_eq!(claims["groups"], json!([GROUP]), "{claims}");

    // Within its lifetime the same token is reused.
    let second = assert_session_works(&url, &cookie).await;
    assert_eq!(
        second.header("x-portcullis-assertion"),
        first.header("x-portcullis-assertion")
    );

    // A token that was tampered with does not verify (so the check above means something).
    let token = first.header("x-portcullis-assertion").unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged_claims = claims.clone();
    forged_claims["groups"] = json!(["eng", "admins"]);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            forged_claims.to_string()
        ),
        parts[2]
    );
    assert!(verify_with(&jwks, &forged, &issuer, APP_ROUTE).is_err());
    // Nor for another route.
    assert!(verify_with(&jwks, token, &issuer, API_ROUTE).is_err());

    // Added to another group: the very next token differs and says so.
    t.add_member(&ops_id, &t.alice_id).await.expect_success();
    let third = assert_session_works(&url, &cookie).await;
    assert_ne!(
        third.header("x-portcullis-assertion"),
        first.header("x-portcullis-assertion")
    );
    let claims = verify_assertion(&jwks, &issuer, &third);
    let mut groups: Vec<&str> = claims["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, ["eng", "ops"], "{claims}");
    assert_eq!(claims["sub"], ALICE, "{claims}");
}

/// A route for every host under `tenants.test`, with the machine's API behind it.
const TENANTS_ROUTE: &str = "http://*.tenants.test";
/// A path of every tenant's host, routed apart.
const TENANTS_ADMIN_ROUTE: &str = "http://*.tenants.test/admin/";

/// Behind a `*.` route, each host's assertion names it beside the route: an upstream can take
/// only what was made for its own host, and none is handed a sibling's token to replay.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_wildcard_route_each_host_s_assertion_names_that_host() {
    let t = Authz::start().await;
    let token = t.machine_token().await;
    let jwks = fetch_jwks(&t).await;
    let issuer = t.app_url("");
    let mut seen = Vec::new();
    for tenant in ["red.tenants.test", "blue.tenants.test"] {
        let url = t.fx.url(tenant, "/v1/whoami");
        let resp = bare_client()
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{tenant}");
        let echo = Echo::parse(&resp.bytes().await.unwrap());
        let assertion = echo.header("x-portcullis-assertion").unwrap().to_owned();
        let served = format!("http://{tenant}");
        let claims = verify_with(&jwks, &assertion, &issuer, &served)
            .unwrap_or_else(|e| panic!("{tenant}'s assertion for its host: {e}"));
        assert_eq!(claims["aud"], json!([TENANTS_ROUTE, served]), "{claims}");
        // A verifier that checks the route's name takes it too.
        assert!(verify_with(&jwks, &assertion, &issuer, TENANTS_ROUTE).is_ok());
        seen.push(assertion);
    }
    assert_ne!(seen[0], seen[1], "two hosts were sent one token");
    assert!(
        verify_with(&jwks, &seen[0], &issuer, "http://blue.tenants.test").is_err(),
        "red's assertion is taken for blue"
    );
    // Another route of the same host is named with its path: its upstream takes no assertion
    // meant for the host's other routes.
    let resp = bare_client()
        .get(t.fx.url("red.tenants.test", "/admin/users"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    let assertion = echo.header("x-portcullis-assertion").unwrap();
    let served = "http://red.tenants.test/admin/";
    let claims = verify_with(&jwks, assertion, &issuer, served).unwrap();
    assert_eq!(
        claims["aud"],
        json!([TENANTS_ADMIN_ROUTE, served]),
        "{claims}"
    );
    assert!(
        verify_with(&jwks, &seen[0], &issuer, served).is_err(),
        "the host's assertion is taken under /admin/"
    );
}

// ----- refusals ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn refusals_say_who_which_route_and_why_and_nothing_about_others() {
    let t = Authz::start().await;
    // Other people in the directory, whose names must never show.
    let carol = t.scim.create_user("carol@corp.test").await.id();
    t.add_member(&t.eng_id, &carol).await.expect_success();
    let sales = t.scim.create_group("sales", &[&t.alice_id]).await.id();
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;
    t.remove_member(&t.eng_id, &t.alice_id)
        .await
        .expect_success();
    let url = t.app_url("/reports");
    let secrets = [
        "carol",
        carol.as_str(),
        t.alice_id.as_str(),
        sales.as_str(),
        MACHINE_ID,
    ];
    let assert_no_leak = |what: &str, body: &str| {
        for s in secrets {
            assert!(!body.contains(s), "{what} mentions {s}: {body}");
        }
    };

    // An API client: JSON.
    let resp = get_with_session(&url, &cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let content_type = resp.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["error"], "forbidden", "{body}");
    assert_eq!(body["user"], ALICE, "{body}");
    assert_eq!(body["route"], APP_ROUTE, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert_no_leak("the JSON refusal", &text);

    // A browser: the page, with who, the route, why, and a way to sign out; never inside
    // another site's frame, where a click on it could be someone else's doing.
    let resp = get_with_session(&url, &cookie, BROWSER_ACCEPT).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let content_type = resp.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    assert_eq!(
        resp.headers()["content-security-policy"],
        "frame-ancestors 'none'"
    );
    // Read as the HTML it says it is, and never kept by a shared cache.
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let html = resp.text().await.unwrap();
    assert!(html.contains(ALICE), "{html}");
    assert!(html.contains(APP_ROUTE), "{html}");
    assert!(
        html.contains(body["reason"].as_str().unwrap()),
        "the page gives the reason {}: {html}",
        body["reason"]
    );
    assert!(
        html.contains("action=\"/.portcullis/sign_out\"") && html.contains("method=\"post\""),
        "a sign-out form: {html}"
    );
    assert_no_leak("the HTML refusal", &html);

    // The deny rule's refusal says so too.
    t.add_member(&t.eng_id, &t.alice_id).await.expect_success();
    let resp = get_with_session(&t.app_url("/admin"), &cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["user"], ALICE, "{body}");
    assert_no_leak("the deny refusal", &text);

    // Someone the IdP knows but the directory does not: refused, and told so.
    let bob = t.sign_in(BOB, BOB_PASSWORD).await;
    let resp = get_with_session(&url, &bob, "application/json").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["user"], BOB, "{body}");
    assert_eq!(body["route"], APP_ROUTE, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not a user in the directory"), "{body}");
    assert_no_leak("bob's refusal", &text);
    assert!(!text.contains(ALICE), "{text}");
    let resp = get_with_session(&url, &bob, BROWSER_ACCEPT).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let html = resp.text().await.unwrap();
    assert!(
        html.contains(BOB) && html.contains("not a user in the directory"),
        "{html}"
    );
    assert!(!html.contains(ALICE), "{html}");
    assert_no_leak("bob's page", &html);
}

// ----- refusals of credentials in the audit log ------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_are_audited_by_what_was_wrong_never_by_what_they_were() {
    let t = Authz::start().await;
    let cookie = t.sign_in(ALICE, ALICE_PASSWORD).await;

    // A machine's token with its signature changed, and something that is no JWT at all; the
    // token's claims under `"alg": "none"`, and its header over claims that name no issuer.
    let token = t.machine_token().await;
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", signature.chars().rev().collect::<String>());
    let (header, claims) = signed.split_once('.').unwrap();
    let b64 = |json: &str| {
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, json)
    };
    let unsigned = format!(
        "{}.{claims}.{signature}",
        b64(r#"{"alg":"none","typ":"JWT"}"#)
    );
    let no_issuer = format!("{header}.{}.{signature}", b64(r#"{"sub":"build-bot"}"#));
    let api = t.api_url("/v1/jobs");
    for bearer in [&forged, "not-a-jwt-at-all", &unsigned, &no_issuer] {
        let resp = bare_client()
            .get(&api)
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bearer}");
    }
    // A SCIM client with a token that is not one of the SCIM tokens.
    const WRONG_SCIM_TOKEN: &str = "wrong-scim-token-0123456789abcdef";
    let wrong = ScimClient::new(&t.fx.cfg.scim_base_url(), WRONG_SCIM_TOKEN);
    wrong.get("/Users").await.expect(401);
    // The IdP sends someone back refusing them (Okta: not assigned to the application).
    let callback = t.app_url(
        "/.portcullis/callback?error=access_denied&error_description=not%20assigned%20to%20the%20app",
    );
    let resp = bare_client().get(&callback).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Anyone could have made that link: the page and the audit record show the error's code,
    // not its words, for a browser that started no sign-in.
    let page = resp.text().await.unwrap_or_default();
    assert!(
        page.contains("access_denied") && !page.contains("not assigned"),
        "{page}"
    );
    // Alice's session, once she is deactivated: over, and she is told to sign in again.
    t.set_active(&t.alice_id, false).await.expect_success();
    let resp = get_with_session(&t.app_url("/work"), &cookie, "application/json").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let records = crate::audit::audit_json_until(&t.fx.px, &[], |r| {
        crate::audit::of_event(r, "refusal").len() >= 7
    })
    .await;
    let refusals = crate::audit::of_event(&records, "refusal");
    let on = |route: &str| -> Vec<&Value> {
        refusals
            .iter()
            .copied()
            .filter(|r| r["route"] == route)
            .collect()
    };
    let reasons = |records: &[&Value]| -> Vec<String> {
        records
            .iter()
            .map(|r| r["reason"].as_str().unwrap().to_owned())
            .collect()
    };

    // Tokens: by nobody (whatever their claims say), with what was wrong.
    let tokens = on(API_ROUTE);
    assert_eq!(tokens.len(), 4, "{refusals:#?}");
    for refusal in &tokens {
        assert_eq!(refusal["user"], "anonymous", "{refusal}");
        assert_eq!(refusal["path"], "/v1/jobs", "{refusal}");
    }
    let why = reasons(&tokens);
    assert!(
        why.iter()
            .all(|r| r.starts_with("a bearer token was refused: ")),
        "{why:?}"
    );
    // In fixed words: the changed signature may not even decode.
    assert!(
        why[0].ends_with("its signature does not verify")
            || why[0].ends_with("it is not a well-formed JWT"),
        "{why:?}"
    );
    assert!(why[1].contains("not a compact JWS"), "{why:?}");
    // An algorithm jsonwebtoken has no name for is one not allowed, as HS256 is.
    assert!(
        why[2].ends_with("the token's algorithm is not allowed"),
        "{why:?}"
    );
    assert!(why[3].ends_with("it names no issuer (iss)"), "{why:?}");

    let sign_in = on("oidc");
    assert_eq!(sign_in.len(), 1, "{refusals:#?}");
    assert_eq!(sign_in[0]["path"], "/.portcullis/callback");
    assert_eq!(
        sign_in[0]["reason"],
        "a sign-in was refused: a refusal (access_denied) came back for no sign-in begun in \
         this browser; start again"
    );

    let scim = on("scim");
    assert_eq!(scim.len(), 1, "{refusals:#?}");
    assert_eq!(scim[0]["user"], "anonymous");
    assert_eq!(scim[0]["method"], "GET");
    assert_eq!(scim[0]["path"], "/scim/v2/Users");
    assert_eq!(
        scim[0]["reason"],
        "the bearer token is not one of the SCIM tokens"
    );

    let revoked = on(APP_ROUTE);
    assert_eq!(revoked.len(), 1, "{refusals:#?}");
    assert_eq!(revoked[0]["user"], ALICE);
    assert_eq!(revoked[0]["path"], "/work");
    let reason = revoked[0]["reason"].as_str().unwrap();
    assert!(reason.contains("deactivated"), "{reason}");

    // Nothing presented is in the log: not the tokens, not their signatures, not the cookie.
    let log = std::fs::read_to_string(t.fx.px.dir().join("data/audit.jsonl")).unwrap();
    for secret in [
        &forged,
        signature,
        WRONG_SCIM_TOKEN,
        "not-a-jwt-at-all",
        &cookie,
    ] {
        assert!(!log.contains(secret), "the audit log holds {secret}");
    }
}
