//! AI agents as directory identities (issue 14), end to end: the real IdP issues an agent's
//! client-credentials token, the IdP's SCIM pushes the Agent, its AgenticApplication, its
//! owning group and that group's members, and Portcullis admits the agent only while its owner
//! chain holds.
//!
//! - A rapid lifecycle: the agent is created, calls, is deactivated and is refused, a hundred
//!   times over.
//! - Revocation under load: not one request sent after the SCIM answer is let in, whether the
//!   owner is deactivated, the owner leaves the owning group, the application is deactivated
//!   or the agent itself is.
//! - An open websocket is cut when the agent's `expires` passes, with no SCIM write at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_tests::client::{closed_within, websocket};
use portcullis_tests::scim::{agentic_application, patch_ops, PORTCULLIS_AGENT_SCHEMA};
use portcullis_tests::{
    ConfigBuilder, Echo, Idp, IdpClient, JwtIssuer, Portcullis, Route, ScimClient, ScimResponse,
    Upstream,
};
use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::authz::{revocation_under_load, MakeRequest};
use crate::signin::{bare_client, idp_setup, now_unix, API, API_AUD, ALICE};
use crate::{SCIM_HOST, SCIM_TOKEN};

/// The agent's OAuth client at the IdP; its token's `client_id` is the Agent's `name`.
const AGENT_ID: &str = "helpdesk-agent";
const AGENT_SECRET: &str = "helpdesk-agent-secret-0123456789abcdefghij";
/// The route agents call: those whose owners are in `eng`.
const AGENTS_ROUTE: &str = "http://agents.test";

/// A running IdP (with the agent's client), Portcullis serving SCIM and the agents route, and
/// the directory: alice in `eng`, the application `Helpdesk`, and the agent owned by `eng`
/// running in it.
struct Agents {
    idp: Idp,
    cfg: ConfigBuilder,
    _px: Portcullis,
    _api: Upstream,
    scim: ScimClient,
    alice: String,
    eng: String,
    app: String,
    agent: String,
}

impl Agents {
    async fn start() -> Agents {
        let api = Upstream::start("api").await;
        let unused = "http://127.0.0.1:9/unused";
        let setup = idp_setup(&[unused.to_owned()], unused)
            .client(IdpClient::new(AGENT_ID, AGENT_SECRET).redirect_uri(unused));
        let idp = setup.start().await;
        let cfg = ConfigBuilder::new()
            .http_listener()
            .route(
                Route::new(AGENTS_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .websockets(true)
                    .set("allow = { agent_owner_groups = [\"eng\"] }"),
            )
            .jwt_issuer(JwtIssuer::new(idp.issuer(), &[API_AUD]))
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)]);
        let px = cfg.start().await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let alice = scim.create_user(ALICE).await.id();
        let eng = scim.create_group("eng", &[&alice]).await.id();
        let app = scim
            .post("/AgenticApplications", &agentic_application("Helpdesk"))
            .await
            .expect(201)
            .id();
        let mut t = Agents {
            idp,
            cfg,
            _px: px,
            _api: api,
            scim,
            alice,
            eng,
            app,
            agent: String::new(),
        };
        t.agent = t.create_agent(None).await.expect(201).id();
        t
    }

    /// Creates the agent, owned by `eng`, in the application, until `expires` if given.
    async fn create_agent(&self, expires: Option<&str>) -> ScimResponse {
        let mut extension = json!({
            "owners": [{"value": self.eng, "type": "Group"}],
            "applications": [{"value": self.app}],
        });
        if let Some(at) = expires {
            extension["expires"] = json!(at);
        }
        let body = json!({
            "schemas": [
                "urn:ietf:params:scim:schemas:core:2.0:Agent",
                PORTCULLIS_AGENT_SCHEMA,
            ],
            "name": AGENT_ID,
            "agentType": "Assistant",
            PORTCULLIS_AGENT_SCHEMA: extension,
        });
        self.scim.post("/Agents", &body).await
    }

    async fn token(&self) -> String {
        self.idp
            .client_credentials_token(AGENT_ID, AGENT_SECRET, Some(API))
            .await
    }

    fn url(&self, path: &str) -> String {
        self.cfg.http_url("agents.test", path)
    }

    async fn call(&self, token: &str) -> (StatusCode, String) {
        let resp = bare_client()
            .get(self.url("/tickets"))
            .bearer_auth(token)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .expect("the call is answered");
        (resp.status(), resp.text().await.unwrap_or_default())
    }

    async fn set_active(&self, path: &str, active: bool) -> ScimResponse {
        let ops = patch_ops(json!([{"op": "replace", "path": "active", "value": active}]));
        self.scim.patch(path, &ops).await
    }

    async fn members(&self, op: &str) -> ScimResponse {
        let ops = match op {
            "remove" => json!([{"op": "remove",
                                "path": format!("members[value eq \"{}\"]", self.alice)}]),
            _ => json!([{"op": "add", "path": "members", "value": [{"value": self.alice}]}]),
        };
        self.scim
            .patch(&format!("/Groups/{}", self.eng), &patch_ops(ops))
            .await
    }
}

fn with_bearer(url: String, token: String) -> MakeRequest {
    Arc::new(move |c: &reqwest::Client| {
        c.get(&url)
            .bearer_auth(&token)
            .header(ACCEPT, "application/json")
    })
}

/// RFC 3339, `seconds` from now.
fn in_seconds(seconds: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp((now_unix() + seconds) as i64)
        .expect("a time");
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("formatted")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_calls_with_its_own_token_and_is_named_to_the_upstream() {
    let t = Agents::start().await;
    let token = t.token().await;
    let claims = portcullis_tests::idp::jwt_claims(&token);
    assert_eq!(claims["client_id"], AGENT_ID, "{claims}");
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo = Echo::parse(body.as_bytes());
    assert_eq!(echo.header("x-portcullis-user"), Some(AGENT_ID));
    assert_eq!(echo.header("x-portcullis-agent"), Some(AGENT_ID));
    assert_eq!(echo.header("authorization"), None, "the token stays with Portcullis");

    // The owner chain is judged on every request, and the refusal says which link broke.
    t.set_active(&format!("/Users/{}", t.alice), false)
        .await
        .expect_success();
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("no owner of the agent is an active user"), "{body}");
    t.set_active(&format!("/Users/{}", t.alice), true)
        .await
        .expect_success();
    assert_eq!(t.call(&token).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_times_created_called_deactivated_and_refused() {
    let t = Agents::start().await;
    let token = t.token().await;
    let path = format!("/Agents/{}", t.agent);
    t.scim.delete(&path).await.expect(204);
    let started = Instant::now();
    for cycle in 0..100 {
        let id = t.create_agent(None).await.expect(201).id();
        let (status, body) = t.call(&token).await;
        assert_eq!(status, StatusCode::OK, "cycle {cycle}, created: {body}");
        t.set_active(&format!("/Agents/{id}"), false)
            .await
            .expect(200);
        let (status, body) = t.call(&token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "cycle {cycle}, deactivated: {body}");
        assert!(body.contains("the agent is deactivated"), "{body}");
        t.scim.delete(&format!("/Agents/{id}")).await.expect(204);
        let (status, body) = t.call(&token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "cycle {cycle}, deleted: {body}");
    }
    eprintln!("100 agent lifecycles in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn under_load_no_request_is_let_in_after_any_link_of_the_owner_chain_breaks() {
    let t = Agents::start().await;
    let token = t.token().await;
    let load = || with_bearer(t.url("/tickets"), token.clone());
    let alice = format!("/Users/{}", t.alice);
    let app = format!("/AgenticApplications/{}", t.app);
    let agent = format!("/Agents/{}", t.agent);

    revocation_under_load("owner deactivated", load(), t.set_active(&alice, false), &[403]).await;
    t.set_active(&alice, true).await.expect_success();

    revocation_under_load("owner left the owning group", load(), t.members("remove"), &[403])
        .await;
    t.members("add").await.expect_success();

    revocation_under_load("application deactivated", load(), t.set_active(&app, false), &[403])
        .await;
    t.set_active(&app, true).await.expect_success();

    revocation_under_load("agent deactivated", load(), t.set_active(&agent, false), &[403]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_websocket_is_cut_when_the_agent_expires() {
    let t = Agents::start().await;
    let token = t.token().await;
    let path = format!("/Agents/{}", t.agent);
    // Expires a few seconds from now: long enough to open the websocket under load.
    let expires = in_seconds(6);
    let ops = patch_ops(json!([
        {"op": "add", "path": format!("{PORTCULLIS_AGENT_SCHEMA}:expires"), "value": expires},
    ]));
    let patched = t.scim.patch(&path, &ops).await.expect(200);
    let expires_at = patched.body[PORTCULLIS_AGENT_SCHEMA]["expires"].clone();
    assert_eq!(expires_at, Value::String(expires.clone()));
    let authorization = format!("Bearer {token}");
    let mut ws = websocket(
        t.cfg.http_addr(),
        "agents.test",
        "/ws",
        ("authorization", &authorization),
    )
    .await;
    let expiry = time::OffsetDateTime::parse(
        &expires,
        &time::format_description::well_known::Rfc3339,
    )
    .expect("an RFC 3339 time")
    .unix_timestamp() as u64;
    assert!(
        now_unix() < expiry,
        "the websocket opened only after the expiry: the machine is too loaded to tell"
    );
    // Nothing is written to the directory: time alone ends the agent's access.
    let closed = closed_within(&mut ws, Duration::from_secs(20)).await;
    let at = now_unix();
    assert!(closed, "the websocket was still open 20 s after opening ({expires})");
    assert!(at >= expiry, "cut at {at}, before the expiry {expiry}");
    assert!(at <= expiry + 3, "cut at {at}, more than 3 s after the expiry {expiry}");
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("expired"), "{body}");
}
