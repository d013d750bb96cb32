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
//! - An open websocket ends when a reload stops taking the agent's token (its issuer is
//!   configured for other audiences).
//! - An open websocket ends when the IdP withdraws the key that signed the agent's token.
//! - Delegation (RFC 8693): a person's token exchanged at the IdP for one whose `act` names the
//!   agent is let in only while both the person and the agent are allowed.

use std::time::{Duration, Instant};

use portcullis_tests::client::{closed_within, websocket};
use portcullis_tests::idp::{jwt_claims, query_param, random_token, TOKEN_EXCHANGE};
use portcullis_tests::scim::{
    agentic_application, patch_ops, PORTCULLIS_AGENT_SCHEMA, USER_SCHEMA,
};
use portcullis_tests::{
    ConfigBuilder, Echo, Idp, IdpClient, IdpProfile, JwtIssuer, Pkce, Portcullis, Route,
    ScimClient, ScimResponse, Upstream,
};
use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::audit::{audit_json_until, of_event, refusal_where};
use crate::authz::{revocation_under_load, with_bearer};
use crate::signin::{
    bare_client, idp_setup, now_unix, ALICE, ALICE_PASSWORD, API, API_AUD, BOB, BOB_PASSWORD,
    CLIENT_ID, CLIENT_SECRET, MACHINE_ID, MACHINE_SECRET,
};
use crate::{SCIM_HOST, SCIM_TOKEN};

/// The agent's OAuth client at the IdP; its token's `client_id` is the Agent's `name`.
const AGENT_ID: &str = "helpdesk-agent";
const AGENT_SECRET: &str = "helpdesk-agent-secret-0123456789abcdefghij";
/// The route agents call: those whose owners are in `eng`, and people in `eng` (through a
/// delegated token).
const AGENTS_ROUTE: &str = "http://agents.test";
/// Where the IdP sends people back to: nowhere (the tests read the code off the redirect).
const UNUSED: &str = "http://127.0.0.1:9/unused";

/// A running IdP (with the agent's client), Portcullis serving SCIM and the agents route, and
/// the directory: alice in `eng`, bob in no group (each with the IdP's `sub` as `externalId`,
/// which people's tokens are mapped by), the application `Helpdesk`, and the agent owned by
/// `eng` running in it.
struct Agents {
    idp: Idp,
    cfg: ConfigBuilder,
    px: Portcullis,
    _api: Upstream,
    scim: ScimClient,
    alice: String,
    eng: String,
    app: String,
    agent: String,
}

impl Agents {
    async fn start() -> Agents {
        Agents::start_with(IdpProfile::Conformant).await
    }

    /// With the IdP's tokens shaped as `profile`'s are.
    async fn start_with(profile: IdpProfile) -> Agents {
        Agents::start_accepting(profile, &[API_AUD]).await
    }

    /// With the IdP's `[[jwt_issuers]]` entry taking `audiences`.
    async fn start_accepting(profile: IdpProfile, audiences: &[&str]) -> Agents {
        // People's tokens name them by `sub`, which the IdP provisions as `externalId`; every
        // allowed request is audited.
        // (Okta's access tokens name a person by their login, the `userName` it provisions.)
        let attribute = match profile {
            IdpProfile::Okta => "userName",
            _ => "externalId",
        };
        let identity = format!(
            "[identity]\nclaim = \"sub\"\nscim_attribute = \"{attribute}\"\nallow_sample_rate = 1.0\n"
        );
        Agents::start_as(profile, audiences, &identity).await
    }

    /// With `identity` as the `[identity]` table.
    async fn start_as(profile: IdpProfile, audiences: &[&str], identity: &str) -> Agents {
        let api = Upstream::start("api").await;
        let agent_client = IdpClient::new(AGENT_ID, AGENT_SECRET)
            .redirect_uri(UNUSED)
            .metadata(
                "grant_types",
                json!(["client_credentials", "authorization_code", TOKEN_EXCHANGE]),
            );
        let idp = idp_setup(&[UNUSED.to_owned()], UNUSED)
            .client(agent_client)
            .profile(profile)
            .start()
            .await;
        let cfg = ConfigBuilder::new()
            .http_listener()
            .route(
                Route::new(AGENTS_ROUTE, &[&api])
                    .accept(&["bearer"])
                    .websockets(true)
                    .set("allow = [{ agent_owner_groups = [\"eng\"] }, { groups = [\"eng\"] }]"),
            )
            .jwt_issuer(match profile {
                // As for Entra ID's own issuers by default: its tokens are dated 5 minutes
                // early.
                IdpProfile::Entra => {
                    JwtIssuer::new(idp.issuer(), audiences).set("iat_backdate", "\"5m\"")
                }
                _ => JwtIssuer::new(idp.issuer(), audiences),
            })
            .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)]);
        let px = Portcullis::start(&format!("{}\n{identity}", cfg.toml())).await;
        let scim = ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN);
        let person = |user_name: &str, sub: &str| json!({"schemas": [USER_SCHEMA], "userName": user_name, "externalId": sub});
        let alice = scim
            .post("/Users", &person(ALICE, "alice"))
            .await
            .expect(201)
            .id();
        scim.post("/Users", &person(BOB, "bob")).await.expect(201);
        let eng = scim.create_group("eng", &[&alice]).await.id();
        let app = scim
            .post("/AgenticApplications", &agentic_application("Helpdesk"))
            .await
            .expect(201)
            .id();
        let mut t = Agents {
            idp,
            cfg,
            px,
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

    /// A token the agent holds for the person who signs in as `login`: their ID token (from
    /// the code flow of the IdP's other client) exchanged by the agent's client.
    async fn delegated(&self, login: &str, password: &str) -> String {
        let id_token = self.id_token(login, password, true).await;
        self.idp
            .exchange_token(AGENT_ID, AGENT_SECRET, &id_token, API)
            .await
    }

    /// The ID token of `login`'s sign-in at the IdP's other client (`CLIENT_ID`), whose
    /// authorization request sends a nonce or none (OpenID Connect's code flow needs none).
    async fn id_token(&self, login: &str, password: &str, nonce: bool) -> String {
        let pkce = Pkce::new();
        let mut authorize = url::Url::parse(&self.idp.authorization_url(
            CLIENT_ID,
            UNUSED,
            "openid email",
            &random_token(16),
            &random_token(16),
            &pkce,
        ))
        .expect("an authorization URL");
        if !nonce {
            let kept: Vec<(String, String)> = authorize
                .query_pairs()
                .filter(|(name, _)| name != "nonce")
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect();
            authorize.query_pairs_mut().clear().extend_pairs(kept);
        }
        let back = self
            .idp
            .sign_in_http(authorize.as_str(), login, password)
            .await;
        let code = query_param(&back, "code").expect("a code");
        let tokens = self
            .idp
            .exchange_code(CLIENT_ID, CLIENT_SECRET, &code, UNUSED, &pkce.verifier)
            .await;
        tokens["id_token"].as_str().expect("an ID token").to_owned()
    }

    /// A person's own access token issued to the agent's client by the code flow: what Okta's
    /// and Entra ID's on-behalf-of exchanges give, the person as `sub`, the agent as the client
    /// (`client_id`), and no `act` claim.
    async fn issued_to_agent(&self, login: &str, password: &str) -> String {
        self.issued_to((AGENT_ID, AGENT_SECRET), login, password)
            .await
    }

    /// A person's own access token for the API, issued to `client` by the code flow.
    async fn issued_to(&self, client: (&str, &str), login: &str, password: &str) -> String {
        let (id, secret) = client;
        let pkce = Pkce::new();
        let authorize = self.idp.authorization_url(
            id,
            UNUSED,
            "openid",
            &random_token(16),
            &random_token(16),
            &pkce,
        );
        let authorize = format!("{authorize}&resource={}", url_encode(API));
        let back = self.idp.sign_in_http(&authorize, login, password).await;
        let code = query_param(&back, "code").expect("a code");
        let form = [
            ("grant_type", "authorization_code".to_owned()),
            ("code", code),
            ("redirect_uri", UNUSED.to_owned()),
            ("code_verifier", pkce.verifier.clone()),
            ("resource", API.to_owned()),
        ];
        let tokens = self.idp.token_request(id, secret, &form).await;
        tokens["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned()
    }

    async fn token(&self) -> String {
        self.idp
            .client_credentials_token(AGENT_ID, AGENT_SECRET, Some(API))
            .await
    }

    /// A websocket opened on the agents' route with `token`.
    async fn websocket(&self, token: &str) -> portcullis_tests::client::Websocket {
        let authorization = format!("Bearer {token}");
        websocket(
            self.cfg.http_addr(),
            "agents.test",
            "/ws",
            ("authorization", &authorization),
        )
        .await
    }

    /// Waits until a refusal whose reason says `why` is audited.
    async fn refusal_audited(&self, why: &str) {
        audit_json_until(&self.px, &[], |records| {
            of_event(records, "refusal").iter().any(|r| {
                r["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains(why))
            })
        })
        .await;
    }

    /// `portcullis explain` of `GET /tickets` with `who` (`--agent …`); (exit code, stdout).
    async fn explain(&self, who: &[&str]) -> (i32, String) {
        let config = self.px.config_path().display().to_string();
        let url = self.url("/tickets");
        let mut args = vec!["explain", "--config", &config, "--url", &url];
        args.extend_from_slice(who);
        let out = portcullis_tests::process::run(self.px.dir(), &args).await;
        let code = out.status.code().unwrap_or(-1);
        assert!(code == 0 || code == 1, "explain failed: {}", out.stderr);
        (code, out.stdout)
    }

    fn url(&self, path: &str) -> String {
        self.cfg.http_url("agents.test", path)
    }

    async fn call(&self, token: &str) -> (StatusCode, String) {
        self.get("/tickets", token, "application/json").await
    }

    /// A GET of `path` with `token`, taking `accept`.
    async fn get(&self, path: &str, token: &str, accept: &str) -> (StatusCode, String) {
        let resp = bare_client()
            .get(self.url(path))
            .bearer_auth(token)
            .header(ACCEPT, accept)
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

fn url_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// RFC 3339, `seconds` from now.
fn in_seconds(seconds: u64) -> String {
    let at =
        time::OffsetDateTime::from_unix_timestamp((now_unix() + seconds) as i64).expect("a time");
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("formatted")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_calls_with_its_own_token_and_is_named_to_the_upstream() {
    let t = Agents::start().await;
    let token = t.token().await;
    let claims = jwt_claims(&token);
    assert_eq!(claims["client_id"], AGENT_ID, "{claims}");
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo = Echo::parse(body.as_bytes());
    // Named so that no upstream takes it for a person of the same name.
    let user = format!("agent:{AGENT_ID}");
    assert_eq!(echo.header("x-portcullis-user"), Some(user.as_str()));
    assert_eq!(echo.header("x-portcullis-agent"), Some(AGENT_ID));
    assert_eq!(
        echo.header("authorization"),
        None,
        "the token stays with Portcullis"
    );
    // It can ask who it is where no one signs in (no `[oidc]`).
    let (status, me) = t.get("/.portcullis/me", &token, "application/json").await;
    assert_eq!(status, StatusCode::OK);
    let me: Value = serde_json::from_str(&me).expect("JSON");
    assert_eq!(me["subject"], AGENT_ID, "{me}");
    assert_eq!(me["kind"], "agent", "{me}");
    let (_, page) = t.get("/.portcullis/me", &token, "text/html").await;
    assert!(page.contains(AGENT_ID), "{page}");
    // HEAD too, as for any page (a client's check that it still gets in).
    let head = bare_client()
        .head(t.url("/.portcullis/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the HEAD is answered");
    assert_eq!(head.status(), StatusCode::OK);
    // A token it refuses there is recorded as the HEAD it was.
    let refused = bare_client()
        .head(t.url("/.portcullis/me"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .expect("the HEAD is answered");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    audit_json_until(&t.px, &[], |records| {
        of_event(records, "refusal")
            .iter()
            .any(|r| r["method"] == "HEAD" && r["path"] == "/.portcullis/me")
    })
    .await;
    assert!(!page.contains("sign_out"), "nothing to sign out of: {page}");

    // The owner chain is judged on every request, and the refusal says which link broke.
    t.set_active(&format!("/Users/{}", t.alice), false)
        .await
        .expect_success();
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("no owner of the agent is an active user"),
        "{body}"
    );
    // Its client reading HTML gets the page, with nothing to sign out of.
    let (status, page) = t.get("/tickets", &token, "text/html").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("no owner of the agent"), "{page}");
    assert!(!page.contains("sign_out"), "nothing to sign out of: {page}");
    t.set_active(&format!("/Users/{}", t.alice), true)
        .await
        .expect_success();
    assert_eq!(t.call(&token).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_times_created_called_deactivated_and_refused() {
    let t = Agents::start().await;
    let path = format!("/Agents/{}", t.agent);
    t.scim.delete(&path).await.expect(204);
    let started = Instant::now();
    for cycle in 0..100 {
        // A token issued before the agent was created is not its own: fetched after.
        let id = t.create_agent(None).await.expect(201).id();
        let token = t.token().await;
        let (status, body) = t.call(&token).await;
        assert_eq!(status, StatusCode::OK, "cycle {cycle}, created: {body}");
        t.set_active(&format!("/Agents/{id}"), false)
            .await
            .expect(200);
        let (status, body) = t.call(&token).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "cycle {cycle}, deactivated: {body}"
        );
        assert!(body.contains("the agent is deactivated"), "{body}");
        t.scim.delete(&format!("/Agents/{id}")).await.expect(204);
        let (status, body) = t.call(&token).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "cycle {cycle}, deleted: {body}"
        );
        // Refused as deleted, not merely as it was (deactivated) before.
        assert!(
            body.contains("was deleted"),
            "cycle {cycle}, deleted: {body}"
        );
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

    revocation_under_load(
        "owner deactivated",
        load(),
        t.set_active(&alice, false),
        &[403],
    )
    .await;
    t.set_active(&alice, true).await.expect_success();

    revocation_under_load(
        "owner left the owning group",
        load(),
        t.members("remove"),
        &[403],
    )
    .await;
    t.members("add").await.expect_success();

    revocation_under_load(
        "application deactivated",
        load(),
        t.set_active(&app, false),
        &[403],
    )
    .await;
    // Records are dated in whole seconds: the re-activation falls in a later one than the
    // token's. Its tokens from before the application came back are not taken: it gets a new
    // one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    t.set_active(&app, true).await.expect_success();
    assert_eq!(t.call(&token).await.0, StatusCode::UNAUTHORIZED);
    let token = t.token().await;

    revocation_under_load(
        "agent deactivated",
        with_bearer(t.url("/tickets"), token.clone()),
        t.set_active(&agent, false),
        &[403],
    )
    .await;
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
    let mut ws = t.websocket(&token).await;
    let expiry =
        time::OffsetDateTime::parse(&expires, &time::format_description::well_known::Rfc3339)
            .expect("an RFC 3339 time")
            .unix_timestamp() as u64;
    assert!(
        now_unix() < expiry,
        "the websocket opened only after the expiry: the machine is too loaded to tell"
    );
    // Nothing is written to the directory: time alone ends the agent's access.
    let closed = closed_within(&mut ws, Duration::from_secs(20)).await;
    let at = now_unix();
    assert!(
        closed,
        "the websocket was still open 20 s after opening ({expires})"
    );
    assert!(at >= expiry, "cut at {at}, before the expiry {expiry}");
    assert!(
        at <= expiry + 6,
        "cut at {at}, more than 6 s after the expiry {expiry}"
    );
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("expired"), "{body}");
}

/// A person's token is taken only from the clients its issuer lists in `person_clients`: every
/// application signing people in through the IdP gets their tokens for the API (as every one
/// on Okta's default authorization server gets `api://default`), and one replaying them is
/// refused, its open connections cut at the reload that lists the others. An agent's client
/// holding one is judged as the agent, listed or not.
#[tokio::test(flavor = "multi_thread")]
async fn a_person_s_token_is_taken_only_from_the_clients_its_issuer_lists() {
    let t = Agents::start().await;
    // Alice's token, held by the IdP's other application.
    let replayed = t
        .issued_to((CLIENT_ID, CLIENT_SECRET), ALICE, ALICE_PASSWORD)
        .await;
    assert_eq!(jwt_claims(&replayed)["client_id"], CLIENT_ID);
    let held_by_agent = t.issued_to_agent(ALICE, ALICE_PASSWORD).await;
    let (status, body) = t.call(&replayed).await;
    assert_eq!(status, StatusCode::OK, "any client's, unlisted: {body}");
    // "Who am I" names the person whose token it is, as the gate judges it: not a machine.
    let (status, body) = t
        .get("/.portcullis/me", &replayed, "application/json")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let me: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&me["kind"], &me["subject"]),
        (&json!("person"), &json!("alice"))
    );
    let mut ws = t.websocket(&replayed).await;

    let audiences = format!("audiences = [\"{API_AUD}\"]");
    let listing = |clients: &str| format!("{audiences}\nperson_clients = [{clients}]");
    t.px.reload_with("[[jwt_issuers]]", &audiences, &listing("\"cli\""))
        .await;
    assert!(
        closed_within(&mut ws, Duration::from_secs(10)).await,
        "the websocket was still open 10 s after the reload"
    );
    let why = format!(
        "held by the client \"{CLIENT_ID}\", which its issuer's person_clients does not list"
    );
    t.refusal_audited(&format!(
        "open connection closed: the bearer token is a person's {why}"
    ))
    .await;
    let resp = bare_client()
        .get(t.url("/tickets"))
        .bearer_auth(&replayed)
        .send()
        .await
        .expect("the call is answered");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers().get(reqwest::header::WWW_AUTHENTICATE);
    assert!(
        challenge.is_some_and(|c| c.as_bytes().ends_with(b"error=\"invalid_token\"")),
        "{challenge:?}"
    );
    // Nor does "who am I" answer it. Each refusal is recorded as alice's token, held by it.
    let (status, body) = t
        .get("/.portcullis/me", &replayed, "application/json")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let reason = format!("the bearer token is a person's {why}");
    let records = audit_json_until(&t.px, &[], |records| {
        of_event(records, "refusal")
            .iter()
            .filter(|r| r["reason"] == reason.as_str())
            .count()
            >= 2
    })
    .await;
    let refused: Vec<(&str, &str)> = of_event(&records, "refusal")
        .iter()
        .filter(|r| r["reason"] == reason.as_str())
        .map(|r| {
            (
                r["user"].as_str().unwrap_or_default(),
                r["path"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    // (Her `sub`, as the token names her.)
    assert_eq!(
        refused,
        [("alice", "/tickets"), ("alice", "/.portcullis/me")]
    );
    let (status, body) = t.call(&held_by_agent).await;
    assert_eq!(status, StatusCode::OK, "the agent's client: {body}");

    // Listed: taken again.
    let listed = listing(&format!("\"cli\", \"{CLIENT_ID}\""));
    t.px.reload_with("[[jwt_issuers]]", &listing("\"cli\""), &listed)
        .await;
    let (status, body) = t.call(&replayed).await;
    assert_eq!(status, StatusCode::OK, "a listed client's: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_websocket_ends_when_a_reload_stops_taking_its_token() {
    let t = Agents::start().await;
    let token = t.token().await;
    let mut ws = t.websocket(&token).await;
    // The IdP's tokens are now taken only for another API: the agent's is taken no longer.
    let audiences = format!("audiences = [\"{API_AUD}\"]");
    let another = "audiences = [\"another-api\"]";
    t.px.reload_with("[[jwt_issuers]]", &audiences, another)
        .await;
    assert!(
        closed_within(&mut ws, Duration::from_secs(10)).await,
        "the websocket was still open 10 s after the reload"
    );
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    t.refusal_audited("the token's issuer is no longer configured to take it")
        .await;
    // The connection's end is the agent's, as its requests were.
    let cut = "open connection closed: the token's issuer is no longer configured to take it";
    let refusal = refusal_where(&t.px, |why| why.starts_with(cut)).await;
    assert_eq!(refusal["user"], format!("agent:{AGENT_ID}"), "{refusal:#}");
    assert_eq!(refusal["agent"]["name"], AGENT_ID, "{refusal:#}");
}

/// A key the IdP withdraws ends the connections its tokens opened as soon as Portcullis has
/// the new key set (here fetched for a token signed with a new key; otherwise at
/// `jwks_refresh`), not when the tokens expire.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_websocket_ends_when_the_idp_withdraws_the_key_that_signed_its_token() {
    let t = Agents::start().await;
    let token = t.token().await;
    // The first token Portcullis sees has it fetch the key set.
    let mut ws = t.websocket(&token).await;
    let fetched = Instant::now();
    // Refetches are rate-limited (10 s): let that pass, then rotate, dropping the old keys.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(fetched.elapsed())).await;
    t.idp.rotate_keys(false).await;
    assert!(
        !closed_within(&mut ws, Duration::from_secs(2)).await,
        "the websocket closed before Portcullis had the new key set"
    );
    // A token signed with a new key has Portcullis fetch the set again.
    let renewed = t.token().await;
    let (status, body) = t.call(&renewed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Within a second of the new set (open connections are looked at once a second); the
    // bound is for a loaded machine, far below what a miss would take (the key set's refresh,
    // 5 minutes, or the token's expiry, an hour).
    assert!(
        closed_within(&mut ws, Duration::from_secs(10)).await,
        "the websocket was still open 10 s after Portcullis had the new key set"
    );
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    t.refusal_audited("the token's issuer no longer publishes the key that signed it")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delegated_token_is_let_in_only_while_both_the_person_and_the_agent_are() {
    let t = Agents::start().await;
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    let claims = jwt_claims(&for_alice);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["act"]["sub"], AGENT_ID, "{claims}");

    // alice is in eng, and her agent is owned by eng: in, and the upstream is told both.
    let (status, body) = t.call(&for_alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo = Echo::parse(body.as_bytes());
    assert_eq!(echo.header("x-portcullis-user"), Some(ALICE));
    assert_eq!(echo.header("x-portcullis-agent"), Some(AGENT_ID));
    let assertion = echo
        .header("x-portcullis-assertion")
        .expect("the signed assertion");
    let asserted = jwt_claims(assertion);
    assert_eq!(asserted["sub"], ALICE, "{asserted}");
    assert_eq!(asserted["act"], json!({"sub": AGENT_ID}), "{asserted}");
    assert_eq!(asserted["portcullis_agent"], AGENT_ID, "{asserted}");

    // bob is in no group: the same agent acting for him is refused, for him.
    let for_bob = t.delegated(BOB, BOB_PASSWORD).await;
    let (status, body) = t.call(&for_bob).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains(BOB), "{body}");

    // The agent deactivated: alice's delegated token is refused too.
    let agent = format!("/Agents/{}", t.agent);
    t.set_active(&agent, false).await.expect(200);
    let (status, body) = t.call(&for_alice).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("the agent is deactivated"), "{body}");
    // Re-activated, it does not get its tokens from before back (invalid: its client gets a
    // new one); a new one works.
    crate::signin::after_the_second_of(&for_alice).await;
    t.set_active(&agent, true).await.expect(200);
    assert_eq!(t.call(&for_alice).await.0, StatusCode::UNAUTHORIZED);
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    assert_eq!(t.call(&for_alice).await.0, StatusCode::OK);

    // A person's own token issued to the agent's client (no `act`, as Okta's and Entra ID's
    // on-behalf-of tokens are) is judged the same way: the agent cannot shed its owner chain.
    let held = t.issued_to_agent(ALICE, ALICE_PASSWORD).await;
    let claims = jwt_claims(&held);
    assert_eq!(
        (&claims["sub"], &claims["client_id"], claims.get("act")),
        (&json!("alice"), &json!(AGENT_ID), None),
        "{claims}"
    );
    let (status, body) = t.call(&held).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo = Echo::parse(body.as_bytes());
    assert_eq!(echo.header("x-portcullis-user"), Some(ALICE));
    assert_eq!(echo.header("x-portcullis-agent"), Some(AGENT_ID));
    t.set_active(&agent, false).await.expect(200);
    let (status, body) = t.call(&held).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    t.set_active(&agent, true).await.expect(200);
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;

    // The audit log names the agent, its owners and the person, allowed or refused.
    let records = audit_json_until(&t.px, &[], |r| {
        of_event(r, "allow").len() >= 2 && of_event(r, "refusal").len() >= 2
    })
    .await;
    let allow = of_event(&records, "allow")[0];
    assert_eq!(allow["user"], ALICE, "{allow}");
    assert_eq!(
        allow["agent"],
        json!({"name": AGENT_ID, "owners": ["eng"], "on_behalf_of": ALICE}),
        "{allow}"
    );
    let for_bob = of_event(&records, "refusal")[0];
    assert_eq!(for_bob["user"], BOB, "{for_bob}");
    assert_eq!(for_bob["agent"]["on_behalf_of"], BOB, "{for_bob}");
    // Refused for the agent's sake, a delegated token's refusal is still the person's (as the
    // directory names them, as their allowed requests are), with the agent beside them.
    let person = ALICE;
    let deactivated = of_event(&records, "refusal")
        .into_iter()
        .find(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|r| r.contains("the agent is deactivated"))
        })
        .expect("the refusal for the agent's sake");
    assert_eq!(deactivated["user"], person, "{deactivated}");
    assert_eq!(deactivated["agent"]["name"], AGENT_ID, "{deactivated}");
    assert_eq!(
        deactivated["agent"]["on_behalf_of"], person,
        "{deactivated}"
    );

    // `portcullis explain` answers the same, for the agent alone and on behalf of each.
    let url = t.url("/tickets");
    let (code, out) = t.explain(&["--agent", AGENT_ID]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("agent:  {AGENT_ID} (owners: eng)")),
        "{out}"
    );
    assert!(
        out.contains("agent owned by a member of group eng"),
        "{out}"
    );
    let (code, out) = t
        .explain(&["--agent", AGENT_ID, "--on-behalf-of", "alice"])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ALLOW GET {url}")), "{out}");
    assert!(out.contains(&format!("for {ALICE}")), "{out}");
    let (code, out) = t
        .explain(&["--agent", AGENT_ID, "--on-behalf-of", "bob"])
        .await;
    assert_eq!(code, 1, "{out}");
    // Acting for someone is an agent's: asked of a person or a machine, it is a usage error,
    // not an answer to another question.
    let config = t.px.config_path().display().to_string();
    for who in ["--user", "--machine"] {
        let args = [
            "explain",
            "--config",
            &config,
            "--url",
            &url,
            who,
            ALICE,
            "--on-behalf-of",
            "bob",
        ];
        let out = portcullis_tests::process::run(t.px.dir(), &args).await;
        assert_eq!(out.status.code(), Some(2), "{who}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{who}: {}", out.stdout);
    }

    // alice leaves eng: she is refused (and so is her agent, whose only owner she was).
    t.members("remove").await.expect_success();
    let (status, body) = t.call(&for_alice).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (code, out) = t.explain(&["--agent", AGENT_ID]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no owner of the agent is an active user"),
        "{out}"
    );
}

/// Okta names an access token's client `cid`, with no `client_id` or `azp`: a person's token
/// issued to the agent's client is still the agent's to hold, without the `okta` preset, so the
/// agent's deactivation refuses it (it was judged as the person alone).
#[tokio::test(flavor = "multi_thread")]
async fn an_okta_token_issued_to_the_agent_s_client_holds_the_agent_to_its_chain() {
    let t = Agents::start_with(IdpProfile::Okta).await;
    let held = t.issued_to_agent(ALICE, ALICE_PASSWORD).await;
    let claims = jwt_claims(&held);
    assert_eq!(
        (&claims["sub"], &claims["uid"], &claims["cid"]),
        (&json!(ALICE), &json!("alice"), &json!(AGENT_ID)),
        "{claims}"
    );
    assert_eq!(claims.get("client_id"), None, "{claims}");
    let (status, body) = t.call(&held).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo = Echo::parse(body.as_bytes());
    assert_eq!(echo.header("x-portcullis-agent"), Some(AGENT_ID));
    t.set_active(&format!("/Agents/{}", t.agent), false)
        .await
        .expect(200);
    let (status, body) = t.call(&held).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// With the `okta` preset, a person's Okta access token (their login as `sub`, their user id as
/// `uid`) finds them by `uid` against the `externalId` Okta provisions, as their sign-in finds
/// them by `sub`: held by the agent's client, it is let in as alice through the agent, and
/// refused once she leaves `eng`.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_okta_preset_a_person_s_access_token_finds_them_by_uid() {
    let identity = "[identity]\npreset = \"okta\"\nallow_sample_rate = 1.0\n";
    let t = Agents::start_as(IdpProfile::Okta, &[API_AUD], identity).await;
    let held = t.issued_to_agent(ALICE, ALICE_PASSWORD).await;
    let claims = jwt_claims(&held);
    assert_eq!(
        (&claims["sub"], &claims["uid"]),
        (&json!(ALICE), &json!("alice"))
    );
    let (status, body) = t.call(&held).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo = Echo::parse(body.as_bytes());
    assert_eq!(echo.header("x-portcullis-user"), Some(ALICE));
    assert_eq!(echo.header("x-portcullis-agent"), Some(AGENT_ID));
    t.members("remove").await.expect_success();
    let (status, body) = t.call(&held).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// An ID token is no bearer token, whichever client's sign-in made it. Where an issuer's
/// audiences take a client that also signs people in (an Entra ID app registration that is both
/// the API and a single-page app), a person's ID token verifies as a token for the API; it
/// travels through browsers (`id_token_hint`), logs and other services, and outlives the
/// sign-in. Here no `[oidc]` is configured at all: the sign-in is another application's.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_token_of_any_sign_in_is_no_bearer_token() {
    // Known by its nonce; and an Entra ID token without one by its tenant with no client named.
    for (profile, nonces) in [
        (IdpProfile::Conformant, &[true][..]),
        (IdpProfile::Entra, &[true, false][..]),
    ] {
        let t = Agents::start_accepting(profile, &[API_AUD, CLIENT_ID]).await;
        for &nonce in nonces {
            let id_token = t.id_token(ALICE, ALICE_PASSWORD, nonce).await;
            let claims = jwt_claims(&id_token);
            assert_eq!(claims["aud"], CLIENT_ID, "{claims}");
            assert_eq!(claims.get("nonce").is_some(), nonce, "{claims}");
            let (status, body) = t.call(&id_token).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{profile:?}, nonce {nonce}: alice's ID token was taken as a bearer token: {body}"
            );
        }
        // Tokens issued for the API still pass: the agent's, and alice's through it.
        let token = t
            .idp
            .client_credentials_token(AGENT_ID, AGENT_SECRET, Some(API))
            .await;
        assert_eq!(t.call(&token).await.0, StatusCode::OK, "{profile:?}");
        // (The test IdP exchanges no Entra-shaped ID token: their `sub` is pairwise.)
        if profile == IdpProfile::Conformant {
            let token = t.delegated(ALICE, ALICE_PASSWORD).await;
            assert_eq!(t.call(&token).await.0, StatusCode::OK, "{profile:?}");
        }
    }
}

/// A token issued before its agent was re-activated is refused (401), and the audit log says
/// it was the agent's record the token is older than: the agent's own token is recorded as
/// the agent's, a delegated one as the person's, with the agent beside them. Neither person
/// nor agent is anyone else.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_older_than_its_agent_is_refused_and_recorded_as_the_agent_s() {
    let t = Agents::start().await;
    let own = t.token().await;
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    assert_eq!(t.call(&own).await.0, StatusCode::OK);
    assert_eq!(t.call(&for_alice).await.0, StatusCode::OK);
    let agent = format!("/Agents/{}", t.agent);
    t.set_active(&agent, false).await.expect(200);
    // Records are dated in whole seconds: the re-activation falls in a later one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    t.set_active(&agent, true).await.expect(200);
    assert_eq!(t.call(&own).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(t.call(&for_alice).await.0, StatusCode::UNAUTHORIZED);
    // And where each asks who it is: told to get a new one, not that it is fine.
    for token in [&own, &for_alice] {
        let me = t.get("/.portcullis/me", token, "application/json").await;
        assert_eq!(me.0, StatusCode::UNAUTHORIZED, "{}", me.1);
    }

    let whose = format!("before the agent {AGENT_ID} was last created, re-activated");
    let records = audit_json_until(&t.px, &[], |records| {
        of_event(records, "refusal")
            .iter()
            .filter(|r| r["reason"].as_str().is_some_and(|r| r.contains(&whose)))
            .count()
            >= 4
    })
    .await;
    let refusals: Vec<&Value> = of_event(&records, "refusal")
        .into_iter()
        .filter(|r| r["reason"].as_str().is_some_and(|r| r.contains(&whose)))
        .collect();
    assert_eq!(refusals.len(), 4, "{refusals:#?}");
    // The route's, then /me's, each as the route records it.
    for (route, me) in refusals[..2].iter().zip(&refusals[2..]) {
        assert_eq!(me["route"], "oidc", "{me:#}");
        assert_eq!(me["user"], route["user"], "{me:#}");
        assert_eq!(me["agent"], route["agent"], "{me:#}");
    }
    let agent_user = format!("agent:{AGENT_ID}");
    assert_eq!(
        refusals[0]["user"],
        agent_user.as_str(),
        "{:#}",
        refusals[0]
    );
    assert_eq!(refusals[0]["agent"]["name"], AGENT_ID, "{:#}", refusals[0]);
    // The person as the directory names them, as for the delegated token's other records.
    assert_eq!(refusals[1]["user"], ALICE, "{:#}", refusals[1]);
    assert_eq!(refusals[1]["agent"]["name"], AGENT_ID, "{:#}", refusals[1]);
    assert_eq!(
        refusals[1]["agent"]["on_behalf_of"], ALICE,
        "{:#}",
        refusals[1]
    );
    // `portcullis audit --user agent:<name>` finds the agent's own.
    let mine = audit_json_until(&t.px, &["--user", &agent_user], |records| {
        of_event(records, "refusal")
            .iter()
            .any(|r| r["reason"].as_str().is_some_and(|r| r.contains(&whose)))
    })
    .await;
    assert!(!mine.is_empty());
}

/// A route that lets agents in by `agent_groups` refuses one taken out of the group on its
/// next request, with the token it was let in with; directly or through a nested group, and
/// lets it in again once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_taken_out_of_its_group_is_refused_on_its_next_request() {
    let t = Agents::start().await;
    let bots = t.scim.create_group("support-bots", &[&t.agent]).await.id();
    let rule = "allow = [{ agent_owner_groups = [\"eng\"] }, { groups = [\"eng\"] }]";
    let by_group = "allow = { agent_groups = [\"Support-Bots\"] }";
    t.px.reload_with("[[routes]]", rule, by_group).await;
    let own = t.token().await;
    assert_eq!(t.call(&own).await.0, StatusCode::OK);
    let bots_path = format!("/Groups/{bots}");
    let member = |op: &str, id: &str| match op {
        "remove" => json!([{"op": "remove", "path": format!("members[value eq \"{id}\"]")}]),
        _ => json!([{"op": "add", "path": "members", "value": [{"value": id}]}]),
    };
    let patch = |op: &'static str, id: String| {
        let (scim, path) = (&t.scim, bots_path.clone());
        async move { scim.patch(&path, &patch_ops(member(op, &id))).await }
    };
    patch("remove", t.agent.clone()).await.expect(204);
    let (status, body) = t.call(&own).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    patch("add", t.agent.clone()).await.expect(204);
    assert_eq!(t.call(&own).await.0, StatusCode::OK);

    // Through a nested group: taken out with it.
    let tier1 = t.scim.create_group("tier1", &[&t.agent]).await.id();
    patch("remove", t.agent.clone()).await.expect(204);
    patch("add", tier1.clone()).await.expect(204);
    assert_eq!(t.call(&own).await.0, StatusCode::OK, "in it through tier1");
    patch("remove", tier1).await.expect(204);
    let (status, body) = t.call(&own).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Both recorded as the agent's.
    let agent_user = format!("agent:{AGENT_ID}");
    let refusals = |records: &[Value]| {
        let of_agent = |r: &&Value| r["user"] == agent_user.as_str();
        of_event(records, "refusal")
            .into_iter()
            .filter(of_agent)
            .count()
    };
    audit_json_until(&t.px, &[], |records| refusals(records) == 2).await;
}

/// With agents found by their `externalId` (the client id) and named otherwise, a token older
/// than its agent is refused at `/.portcullis/me` as at a route.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_older_than_its_agent_found_by_client_id_is_refused_where_it_asks_who_it_is() {
    let identity = "[identity]\nclaim = \"sub\"\nscim_attribute = \"externalId\"\n\
                    agent_scim_attribute = \"externalId\"\n";
    let t = Agents::start_as(IdpProfile::Conformant, &[API_AUD], identity).await;
    let agent = format!("/Agents/{}", t.agent);
    let ops = json!([{"op": "replace", "value": {"externalId": AGENT_ID, "name": "Helpdesk"}}]);
    t.scim.patch(&agent, &patch_ops(ops)).await.expect(200);
    let own = t.token().await;
    assert_eq!(t.call(&own).await.0, StatusCode::OK);
    let me = t.get("/.portcullis/me", &own, "application/json").await;
    assert_eq!(me.0, StatusCode::OK, "{}", me.1);
    t.set_active(&agent, false).await.expect(200);
    // Records are dated in whole seconds: the re-activation falls in a later one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    t.set_active(&agent, true).await.expect(200);
    assert_eq!(t.call(&own).await.0, StatusCode::UNAUTHORIZED);
    let me = t.get("/.portcullis/me", &own, "application/json").await;
    assert_eq!(me.0, StatusCode::UNAUTHORIZED, "{}", me.1);
}

/// A delegated token issued before its person was re-activated is refused (401) as theirs,
/// with the agent beside them: the agent's refusals are found under it, and counted toward its
/// share of the audit log.
#[tokio::test(flavor = "multi_thread")]
async fn a_delegated_token_older_than_its_person_is_recorded_with_the_agent() {
    let t = Agents::start().await;
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    assert_eq!(t.call(&for_alice).await.0, StatusCode::OK);
    // Records are dated in whole seconds: the re-activation falls in a later one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let alice = format!("/Users/{}", t.alice);
    t.set_active(&alice, false).await.expect(200);
    t.set_active(&alice, true).await.expect(200);
    assert_eq!(t.call(&for_alice).await.0, StatusCode::UNAUTHORIZED);
    // And where it asks who it is.
    let me = t
        .get("/.portcullis/me", &for_alice, "application/json")
        .await;
    assert_eq!(me.0, StatusCode::UNAUTHORIZED, "{}", me.1);

    let whose = format!("before {ALICE} was last created, re-activated");
    let refusals = |records: &[Value]| -> Vec<Value> {
        // The route's and /me's, in turn.
        of_event(records, "refusal")
            .into_iter()
            .filter(|r| r["reason"].as_str().is_some_and(|r| r.contains(&whose)))
            .cloned()
            .collect()
    };
    let records = audit_json_until(&t.px, &[], |records| refusals(records).len() >= 2).await;
    let refusals = refusals(&records);
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    for refusal in &refusals {
        assert_eq!(refusal["user"], ALICE, "{refusal:#}");
        assert_eq!(refusal["agent"]["name"], AGENT_ID, "{refusal:#}");
        assert_eq!(refusal["agent"]["on_behalf_of"], ALICE, "{refusal:#}");
    }
    assert_eq!(refusals[1]["route"], "oidc", "{:#}", refusals[1]);
}

/// A delegated token a route no longer takes, for none of its audiences, is refused (401) as
/// the person's with the agent beside them, at a request and on an open connection: counted
/// toward the agent's share of the audit log, not the person's (an agent replaying the tokens
/// of many people is one caller).
#[tokio::test(flavor = "multi_thread")]
async fn a_delegated_token_for_none_of_a_route_s_audiences_is_recorded_with_the_agent() {
    const OTHER_API: &str = "other-api";
    let t = Agents::start_accepting(IdpProfile::Conformant, &[API_AUD, OTHER_API]).await;
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    let own = t.token().await;
    assert_eq!(t.call(&for_alice).await.0, StatusCode::OK);
    let mut ws = t.websocket(&for_alice).await;
    let only_other = format!("websockets = true\naudiences = [\"{OTHER_API}\"]");
    t.px.reload_with("[[routes]]", "websockets = true", &only_other)
        .await;
    assert!(
        closed_within(&mut ws, Duration::from_secs(10)).await,
        "the websocket was still open 10 s after the reload"
    );
    assert_eq!(t.call(&for_alice).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(t.call(&own).await.0, StatusCode::UNAUTHORIZED);

    let reasons = [
        "open connection closed: the bearer token is no longer for this route's audiences",
        "the bearer token is for none of this route's audiences",
    ];
    // Alice's, by the agent, and the agent's own (its open connection's end: see
    // `an_open_websocket_ends_when_a_reload_stops_taking_its_token`).
    let agent = format!("agent:{AGENT_ID}");
    let whose = |why: &str| match why.starts_with("open connection closed") {
        true => vec!["alice"],
        false => vec!["alice", agent.as_str()],
    };
    fn found<'a>(
        records: &'a [serde_json::Value],
        why: &str,
        who: &str,
    ) -> Option<&'a serde_json::Value> {
        of_event(records, "refusal")
            .into_iter()
            .find(|r| r["reason"] == why && r["user"] == who)
    }
    let records = audit_json_until(&t.px, &[], |records| {
        reasons.iter().all(|why| {
            whose(why)
                .iter()
                .all(|who| found(records, why, who).is_some())
        })
    })
    .await;
    for why in reasons {
        // Named by the token, as a token the route does not take is before the directory is
        // asked; the agent, by the directory.
        let refusal = found(&records, why, "alice").expect("alice's refusal");
        assert_eq!(refusal["agent"]["name"], AGENT_ID, "{refusal:#}");
        assert_eq!(refusal["agent"]["on_behalf_of"], ALICE, "{refusal:#}");
    }
    let own = found(&records, reasons[1], &agent).expect("the agent's refusal");
    assert_eq!(own["agent"]["name"], AGENT_ID, "{own:#}");
    assert!(own["agent"].get("on_behalf_of").is_none(), "{own:#}");
}

/// An agent whose application is deactivated stays refused whatever a SCIM remove of its
/// applications names: a value naming only what is not kept (the read-only `display`) would
/// have selected every application, and an agent in none is refused by none; a filter on it,
/// none (a 2xx for a remove that did nothing). Taken off by its id, the application no longer
/// refuses the agent, but the agent's tokens from before are not its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_remove_that_names_no_kept_sub_attribute_removes_nothing() {
    let t = Agents::start().await;
    let token = t.token().await;
    assert_eq!(t.call(&token).await.0, StatusCode::OK);
    t.set_active(&format!("/AgenticApplications/{}", t.app), false)
        .await
        .expect(200);
    assert_eq!(t.call(&token).await.0, StatusCode::FORBIDDEN);

    let applications = format!("{PORTCULLIS_AGENT_SCHEMA}:applications");
    let agent = format!("/Agents/{}", t.agent);
    for selector in [json!({"display": "Helpdesk"}), json!({"value": null})] {
        let ops = patch_ops(json!([{"op": "remove", "path": applications, "value": [selector]}]));
        let answer = t.scim.patch(&agent, &ops).await.expect(400);
        assert_eq!(answer.body["scimType"], "invalidValue", "{:#}", answer.body);
        let (status, body) = t.call(&token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{selector}: {body}");
    }
    // Nor does a filter on it: it would select no application, a 2xx that removed nothing.
    let ops = patch_ops(json!([{"op": "remove",
                                "path": format!("{applications}[display eq \"Helpdesk\"]")}]));
    let answer = t.scim.patch(&agent, &ops).await.expect(400);
    assert_eq!(
        answer.body["scimType"], "invalidFilter",
        "{:#}",
        answer.body
    );
    // Named by its `value`, it goes; the agent, in no application now, is let in again, with
    // a token issued since: one from before its disabled application was taken off it is not
    // its own (as after a re-activation). Records are dated in whole seconds.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let ops = patch_ops(json!([{"op": "remove", "path": applications,
                                "value": [{"value": t.app}]}]));
    t.scim.patch(&agent, &ops).await.expect(200);
    assert_eq!(t.call(&token).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(t.call(&t.token().await).await.0, StatusCode::OK);
}

/// An IdP that removes an agent's owner by the value it read back (with the `$ref` Portcullis
/// wrote into it) removes it: the agent, owned by no one, is refused on its next call.
#[tokio::test(flavor = "multi_thread")]
async fn an_owner_removed_as_it_was_read_back_is_gone() {
    let t = Agents::start().await;
    let token = t.token().await;
    assert_eq!(t.call(&token).await.0, StatusCode::OK);
    let agent = format!("/Agents/{}", t.agent);
    let read = t.scim.get(&agent).await;
    let owner = read.body["owners"][0].clone();
    assert!(owner["$ref"].is_string(), "{:#}", read.body);
    let ops = patch_ops(json!([{"op": "remove",
                                "path": format!("{PORTCULLIS_AGENT_SCHEMA}:owners"),
                                "value": [owner]}]));
    t.scim.patch(&agent, &ops).await.expect(200);
    let read = t.scim.get(&agent).await;
    assert_eq!(read.body.get("owners"), None, "{:#}", read.body);
    assert_eq!(t.call(&token).await.0, StatusCode::FORBIDDEN);
}

/// The identity headers tell the upstream who calls as it will read them, or the request is
/// refused. An HTTP/1 upstream trims a header value: alice renamed `bob@corp.test ` (a
/// `userName` SCIM takes, and no other user's) would reach it as bob. A control character
/// cannot be sent at all. Both are refused, for the user as the directory names them, and
/// audited.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_the_identity_headers_cannot_name_truly_is_refused() {
    let t = Agents::start().await;
    let users = format!("/Users/{}", t.alice);
    let rename = |name: String| {
        let ops = patch_ops(json!([{"op": "replace", "path": "userName", "value": name}]));
        let scim = &t.scim;
        let users = users.clone();
        async move { scim.patch(&users, &ops).await }
    };
    for name in [format!("{BOB} "), "alice\u{1}@corp.test".to_owned()] {
        rename(name.clone()).await.expect(200);
        // Issued since: one issued before her userName changed is refused (401) once that
        // change is a second or more later, as the end of this test says.
        let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
        let (status, body) = t.call(&for_alice).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{name:?}: {body}");
        assert!(
            body.contains("cannot tell the upstream who calls"),
            "{name:?}: {body}"
        );
        let records = audit_json_until(&t.px, &[], |records| {
            of_event(records, "refusal")
                .iter()
                .any(|r| r["user"] == name.as_str())
        })
        .await;
        let refusal = of_event(&records, "refusal")
            .into_iter()
            .find(|r| r["user"] == name.as_str())
            .expect("the refusal");
        assert_eq!(refusal["agent"]["name"], AGENT_ID, "{refusal:#}");
    }
    // Named as it is read, alice is in again, with a token issued since (one issued before
    // her userName last changed is refused once that change is a second or more later).
    rename(ALICE.to_owned()).await.expect(200);
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    let (status, body) = t.call(&for_alice).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        Echo::parse(body.as_bytes()).header("x-portcullis-user"),
        Some(ALICE)
    );
}

/// Entra ID dates its tokens 5 minutes early (`iat`, `nbf`). A token fetched the moment an
/// agent is provisioned is still not older than the agent: it is let in, and only one issued
/// before a re-activation is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_entra_token_fetched_as_its_agent_is_provisioned_is_let_in() {
    let t = Agents::start_with(IdpProfile::Entra).await;
    let token = t.token().await;
    let claims = jwt_claims(&token);
    let iat = claims["iat"].as_u64().expect("iat");
    assert!(iat + 240 < now_unix(), "dated early: {claims}");
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Re-activated after the token was issued: that token is refused, a new one let in.
    let agent = format!("/Agents/{}", t.agent);
    t.set_active(&agent, false).await.expect(200);
    // Records are dated in whole seconds: the re-activation falls in a later one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    t.set_active(&agent, true).await.expect(200);
    assert_eq!(t.call(&token).await.0, StatusCode::UNAUTHORIZED);
    let token = t.token().await;
    assert_eq!(t.call(&token).await.0, StatusCode::OK);
}

/// With the entra preset, an Entra-shaped app-only token (its `sub` and `oid` its service
/// principal's object id, no `scp`) is a machine's: the service account whose `externalId` is
/// that object id (Entra provisions no service principals: the operator makes the account),
/// named so to the upstream, and refused on its next request once the account is deactivated.
/// The agent's own token is still the agent's, found by its client (`azp`).
#[tokio::test(flavor = "multi_thread")]
async fn with_the_entra_preset_an_app_only_token_is_its_service_account_s() {
    let identity = "[identity]\npreset = \"entra\"\nallow_sample_rate = 1.0\n";
    let t = Agents::start_as(IdpProfile::Entra, &[API_AUD], identity).await;
    let machine_token = || {
        t.idp
            .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
    };
    let claims = jwt_claims(&machine_token().await);
    let oid = claims["oid"].as_str().expect("an oid").to_owned();
    assert_eq!(claims["sub"], oid.as_str(), "{claims}");
    assert_eq!(claims["azp"], MACHINE_ID, "{claims}");
    assert!(claims.get("scp").is_none(), "{claims}");
    let account = json!({"schemas": [USER_SCHEMA], "userName": "svc-reports", "externalId": oid});
    let svc = t.scim.post("/Users", &account).await.expect(201).id();
    let add = patch_ops(json!([{"op": "add", "path": "members", "value": [{"value": svc}]}]));
    t.scim
        .patch(&format!("/Groups/{}", t.eng), &add)
        .await
        .expect(204);

    // Fetched once the account is there (one issued before is older than it).
    let token = machine_token().await;
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        Echo::parse(body.as_bytes()).header("x-portcullis-user"),
        Some("svc-reports")
    );
    let (status, body) = t.call(&t.token().await).await;
    assert_eq!(status, StatusCode::OK, "the agent's: {body}");
    assert_eq!(
        Echo::parse(body.as_bytes()).header("x-portcullis-agent"),
        Some(AGENT_ID)
    );
    // A machine's, not a person's (the preset finds both by `oid`): a rule for machines only
    // lets it in.
    let rule = "allow = [{ agent_owner_groups = [\"eng\"] }, { groups = [\"eng\"] }]";
    (t.px)
        .reload_with("[[routes]]", rule, "allow = { machines = true }")
        .await;
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::OK, "as a machine: {body}");
    t.set_active(&format!("/Users/{svc}"), false)
        .await
        .expect(200);
    let (status, body) = t.call(&token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// A body too large for the route is refused, and recorded as the gate named its caller: an
/// agent as `agent:<name>`, a person acting through it by their `userName`, as their other
/// records are (and within the agent's budget).
#[tokio::test(flavor = "multi_thread")]
async fn a_body_too_large_is_recorded_as_the_caller_the_gate_let_in() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let t = Agents::start().await;
    let own = t.token().await;
    let for_alice = t.delegated(ALICE, ALICE_PASSWORD).await;
    for token in [&own, &for_alice] {
        let mut stream = tokio::net::TcpStream::connect(t.cfg.http_addr())
            .await
            .expect("connect");
        let head = format!(
            "POST /tickets HTTP/1.1\r\nHost: agents.test\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 20000000\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("the head");
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        let _ = tokio::time::timeout(Duration::from_secs(30), read).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    let too_large = |r: &Value| {
        r["reason"]
            .as_str()
            .is_some_and(|r| r.contains("larger than the route takes"))
    };
    let records = audit_json_until(&t.px, &[], |records| {
        of_event(records, "refusal")
            .iter()
            .filter(|r| too_large(r))
            .count()
            == 2
    })
    .await;
    let users: Vec<&Value> = of_event(&records, "refusal")
        .into_iter()
        .filter(|r| too_large(r))
        .map(|r| &r["user"])
        .collect();
    assert_eq!(users, [&json!(format!("agent:{AGENT_ID}")), &json!(ALICE)]);
}
