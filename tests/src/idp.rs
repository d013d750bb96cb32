//! A real OpenID provider for tests: the `oidc-provider` npm package run by `tests/idp/idp.mjs`
//! under Node on an ephemeral loopback port, set up entirely by the test (clients, users,
//! resource servers), with fresh RS256 and ES256 signing keys generated at every start.
//!
//! Besides OIDC it serves test-control endpoints under `/test/`: key rotation, a back-channel
//! logout on demand, and a simulated outage. The node process is killed when the [`Idp`] is
//! dropped (and exits by itself when the test process goes away, as its stdin closes).
//!
//! `node_modules` is installed with `npm ci` on first use when missing or installed from another
//! `package-lock.json` (once per machine, under a file lock, bounded in time), so a fresh clone
//! needs only `node` and `npm` on the `PATH`.
//!
//! A start that does not print `ready` in time is reported with what the node process was
//! doing ([`crate::diagnose`]) and each start-up phase it reached (`phase` lines in its log).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::RngCore as _;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// How long `start` waits for the `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `npm ci` may take on first use.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one request to the IdP may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One client registered at the IdP: oidc-provider client metadata in snake_case.
#[derive(Debug, Clone, Serialize)]
pub struct IdpClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub response_types: Vec<String>,
    pub token_endpoint_auth_method: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub post_logout_redirect_uris: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backchannel_logout_uri: Option<String>,
    pub backchannel_logout_session_required: bool,
    /// Any other client metadata (e.g. `id_token_signed_response_alg`), written as given.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// The grant type of RFC 8693 token exchange, which the test IdP offers (see `idp.mjs`).
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

impl IdpClient {
    /// A confidential client (`client_secret_basic`) allowed `authorization_code`,
    /// `refresh_token` and `client_credentials`, with no redirect URI yet. (Use secrets of 32+
    /// bytes: oidc-provider refuses shorter ones for HMAC algorithms.)
    pub fn new(client_id: &str, client_secret: &str) -> IdpClient {
        IdpClient {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            redirect_uris: Vec::new(),
            grant_types: vec![
                "authorization_code".into(),
                "refresh_token".into(),
                "client_credentials".into(),
            ],
            response_types: vec!["code".into()],
            token_endpoint_auth_method: "client_secret_basic".into(),
            post_logout_redirect_uris: Vec::new(),
            backchannel_logout_uri: None,
            backchannel_logout_session_required: true,
            extra: serde_json::Map::new(),
        }
    }

    pub fn redirect_uri(mut self, uri: &str) -> IdpClient {
        self.redirect_uris.push(uri.to_owned());
        self
    }

    pub fn post_logout_redirect_uri(mut self, uri: &str) -> IdpClient {
        self.post_logout_redirect_uris.push(uri.to_owned());
        self
    }

    pub fn backchannel_logout_uri(mut self, uri: &str) -> IdpClient {
        self.backchannel_logout_uri = Some(uri.to_owned());
        self
    }

    pub fn auth_method(mut self, method: &str) -> IdpClient {
        self.token_endpoint_auth_method = method.to_owned();
        self
    }

    /// Any other client metadata field.
    pub fn metadata(mut self, key: &str, value: Value) -> IdpClient {
        self.extra.insert(key.to_owned(), value);
        self
    }
}

/// One person who can sign in at the IdP's login form (by email or by `sub`).
#[derive(Debug, Clone, Serialize)]
pub struct IdpUser {
    pub sub: String,
    pub email: String,
    pub password: String,
    pub name: String,
    pub groups: Vec<String>,
    pub email_verified: bool,
    /// The `preferred_username` claim; the email when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
    /// The `oid` claim (the user's object id) in the `entra` profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oid: Option<String>,
    /// Claims as the IdP words them, over the others (`updated_at` as Auth0 sends it, an
    /// RFC 3339 time; `email_verified` as a string, as Apple and Amazon Cognito do).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl IdpUser {
    pub fn new(sub: &str, email: &str, password: &str) -> IdpUser {
        IdpUser {
            sub: sub.to_owned(),
            email: email.to_owned(),
            password: password.to_owned(),
            name: sub.to_owned(),
            groups: Vec::new(),
            email_verified: true,
            preferred_username: None,
            oid: None,
            claims: serde_json::Map::new(),
        }
    }

    /// The claim `name` worded as `value`, over what the profile gives it.
    pub fn claim(mut self, name: &str, value: serde_json::Value) -> IdpUser {
        self.claims.insert(name.to_owned(), value);
        self
    }

    pub fn oid(mut self, oid: &str) -> IdpUser {
        self.oid = Some(oid.to_owned());
        self
    }

    pub fn preferred_username(mut self, name: &str) -> IdpUser {
        self.preferred_username = Some(name.to_owned());
        self
    }

    pub fn name(mut self, name: &str) -> IdpUser {
        self.name = name.to_owned();
        self
    }

    pub fn groups(mut self, groups: &[&str]) -> IdpUser {
        self.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        self
    }
}

/// A resource server (RFC 8707 resource indicator): access tokens issued for it are JWTs
/// with `aud` = `audience`, signed with `alg` (RS256 or ES256).
#[derive(Debug, Clone, Serialize)]
pub struct IdpResource {
    pub indicator: String,
    pub audience: String,
    pub scope: String,
    pub access_token_ttl: u64,
    pub alg: String,
}

impl IdpResource {
    /// A resource `indicator` (an absolute URI) whose tokens carry `aud` = `audience`, scope
    /// `api`, an hour of lifetime, RS256.
    pub fn new(indicator: &str, audience: &str) -> IdpResource {
        IdpResource {
            indicator: indicator.to_owned(),
            audience: audience.to_owned(),
            scope: "api".to_owned(),
            access_token_ttl: 3600,
            alg: "RS256".to_owned(),
        }
    }

    pub fn scope(mut self, scope: &str) -> IdpResource {
        self.scope = scope.to_owned();
        self
    }

    pub fn ttl(mut self, seconds: u64) -> IdpResource {
        self.access_token_ttl = seconds;
        self
    }

    pub fn alg(mut self, alg: &str) -> IdpResource {
        self.alg = alg.to_owned();
        self
    }
}

/// Everything `idp.mjs` is started with (see the header of that file).
#[derive(Debug, Clone, Serialize)]
pub struct IdpSetup {
    /// 0: any free port (the default).
    pub port: u16,
    /// `{port}` is replaced by the port listened on. Default `http://127.0.0.1:{port}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub clients: Vec<IdpClient>,
    pub users: Vec<IdpUser>,
    pub resources: Vec<IdpResource>,
    /// The resource a client-credentials request without `resource` gets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_resource: Option<String>,
    /// oidc-provider `ttl` overrides in seconds, e.g. `{"IdToken": 60}`.
    pub ttl: serde_json::Map<String, Value>,
    /// Whether the RP-initiated logout page submits itself.
    pub logout_auto_submit: bool,
    /// Whether claims asked for by scope (`email`, `profile`, `groups`) are left out of an ID
    /// token issued with an access token, and served only at UserInfo, as OpenID Connect Core
    /// §5.4 allows and oidc-provider does by default. True by default: the tests meet the
    /// provider as it ships.
    pub conform_id_token_claims: bool,
    /// Claims never put in an ID token, only in UserInfo answers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub userinfo_only_claims: Vec<String>,
    /// How tokens look: `conformant` (oidc-provider as it ships), `entra` or `okta`; see
    /// [`IdpProfile`].
    pub profile: IdpProfile,
    /// In the `entra` profile, the app registration's `groupMembershipClaims` set: a user's
    /// groups in the ID token, no `groups` claim for a user in none.
    pub group_membership_claims: bool,
}

/// The shapes of tokens the test IdP issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdpProfile {
    /// oidc-provider as it ships: claims asked for by scope only at UserInfo when an access
    /// token is issued.
    Conformant,
    /// Microsoft Entra ID: a pairwise `sub`, `oid`, `tid`, `preferred_username` (the UPN) and
    /// `name` in the ID token, no `email`.
    Entra,
    /// Okta: the claims of the scopes asked for in the ID token (as Okta's token endpoint
    /// returns it for the code flow), `groups` only when the `groups` scope is asked; access
    /// tokens name their client `cid`, with no `client_id`, and a person by their login as `sub`
    /// (their user id as `uid`); users' subs are Okta ids (`00u…`), as the test gives them.
    /// (`conform_id_token_claims` applies to the conformant profile only.)
    Okta,
}

impl Default for IdpSetup {
    fn default() -> IdpSetup {
        IdpSetup {
            port: 0,
            issuer: None,
            clients: Vec::new(),
            users: Vec::new(),
            resources: Vec::new(),
            default_resource: None,
            ttl: serde_json::Map::new(),
            logout_auto_submit: true,
            conform_id_token_claims: true,
            userinfo_only_claims: Vec::new(),
            profile: IdpProfile::Conformant,
            group_membership_claims: false,
        }
    }
}

impl IdpSetup {
    pub fn new() -> IdpSetup {
        IdpSetup::default()
    }

    pub fn client(mut self, client: IdpClient) -> IdpSetup {
        self.clients.push(client);
        self
    }

    pub fn user(mut self, user: IdpUser) -> IdpSetup {
        self.users.push(user);
        self
    }

    /// Adds a resource server; the first one added is also the default resource.
    pub fn resource(mut self, resource: IdpResource) -> IdpSetup {
        if self.default_resource.is_none() {
            self.default_resource = Some(resource.indicator.clone());
        }
        self.resources.push(resource);
        self
    }

    /// The issuer, e.g. `http://idp.test:{port}` (`{port}` is filled in at start).
    pub fn issuer(mut self, issuer: &str) -> IdpSetup {
        self.issuer = Some(issuer.to_owned());
        self
    }

    pub fn ttl(mut self, model: &str, seconds: u64) -> IdpSetup {
        self.ttl.insert(model.to_owned(), json!(seconds));
        self
    }

    pub fn logout_auto_submit(mut self, on: bool) -> IdpSetup {
        self.logout_auto_submit = on;
        self
    }

    pub fn profile(mut self, profile: IdpProfile) -> IdpSetup {
        self.profile = profile;
        self
    }

    /// Puts claims asked for by scope into ID tokens too (`false`), or serves them only at
    /// UserInfo when an access token is issued (`true`, the default).
    pub fn conform_id_token_claims(mut self, on: bool) -> IdpSetup {
        self.conform_id_token_claims = on;
        self
    }

    /// In the `entra` profile, puts a user's groups in the ID token, as Entra ID does for an
    /// app registration with `groupMembershipClaims`.
    pub fn group_membership_claims(mut self, on: bool) -> IdpSetup {
        self.group_membership_claims = on;
        self
    }

    /// Never puts claim `name` in an ID token, only in UserInfo answers.
    pub fn userinfo_only(mut self, name: &str) -> IdpSetup {
        self.userinfo_only_claims.push(name.to_owned());
        self
    }

    pub async fn start(self) -> Idp {
        Idp::start(self).await
    }
}

/// The object id the test IdP's `entra` profile gives the group `name` in its tokens' `groups`
/// claim, as Entra lists groups (by object id, never by name): a GUID of `group|name`'s
/// SHA-256, as `idp.mjs` makes it.
pub fn entra_group_id(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("group|{name}"));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let parts = [
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32],
    ];
    parts.join("-")
}

/// How the IdP misbehaves during a simulated outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdpOutage {
    /// Serving normally.
    Off,
    /// Every OIDC request answers 503.
    Unavailable,
    /// Every OIDC request has its connection reset without an answer.
    Reset,
    /// Every OIDC request is held, never answered (until the outage ends): an IdP that
    /// accepts connections and then times out.
    Hang,
    /// Every OIDC request gets a 502 in JSON, as a gateway in front of an IdP it cannot reach
    /// answers (Kong's `{"message": …}`).
    Gateway,
    /// Every OIDC request gets a 500 whose JSON reads as an OAuth error, as an IdP failing
    /// inside answers (Keycloak's `{"error":"unknown_error"}` with its database down).
    ServerError,
    /// Only UserInfo answers 503.
    UserInfo,
    /// Only UserInfo answers, 401 to every access token: one meant for another API (Entra's
    /// for an `api://` scope), not an outage.
    UserInfoRefuses,
    /// Only UserInfo answers, about another person (a `sub` not the access token's).
    UserInfoOtherSubject,
    /// Only UserInfo answers, with a redirect to a maintenance page.
    UserInfoRedirect,
    /// Only UserInfo answers, with a maintenance page (HTML) and 200, as a proxy in front in
    /// maintenance mode serves it.
    UserInfoPage,
    /// Only UserInfo answers, with a gateway's 404 page (HTML), as during a deployment.
    UserInfoNotFound,
    /// Only UserInfo answers, with a gateway's 404 in JSON (Kong's `{"message": …}`).
    UserInfoGatewayNotFound,
    /// Only UserInfo answers, with Spring's 404 JSON (`"error": "Not Found"`).
    UserInfoSpringNotFound,
    /// Every OIDC request gets Spring's 404 JSON (`"error": "Not Found"`), as a gateway in
    /// front of an IdP being deployed answers.
    SpringNotFound,
    /// Only the key set (`jwks_uri`) answers 503: tokens are still issued, signed with keys
    /// no one can fetch.
    Jwks,
    /// The key set is served empty, as an IdP node whose keys failed to load serves it, while
    /// tokens are still issued.
    JwksEmpty,
}

/// A PKCE verifier and its S256 challenge.
#[derive(Debug, Clone)]
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        let verifier = random_token(32);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Pkce {
            verifier,
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Pkce {
        Pkce::new()
    }
}

/// `bytes` random bytes, base64url without padding (for `state`, `nonce`, PKCE).
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A running test IdP. Killed when dropped; if the test is panicking, its output is printed.
pub struct Idp {
    child: Option<Child>,
    _stdin: Option<ChildStdin>,
    dir: TempDir,
    log_path: PathBuf,
    port: u16,
    issuer: String,
    setup: IdpSetup,
    http: reqwest::Client,
}

impl Idp {
    /// Installs `tests/idp/node_modules` if missing, starts `node tests/idp/idp.mjs` with
    /// `setup`, and waits (bounded) for its `ready` line.
    pub async fn start(setup: IdpSetup) -> Idp {
        let idp_dir = idp_dir();
        let dir_for_npm = idp_dir.clone();
        tokio::task::spawn_blocking(move || ensure_node_modules(&dir_for_npm))
            .await
            .expect("npm ci task");

        let dir = tempfile::tempdir().expect("tempdir for the IdP");
        let setup_path = dir.path().join("idp-setup.json");
        std::fs::write(
            &setup_path,
            serde_json::to_vec_pretty(&setup).expect("serialize IdP setup"),
        )
        .expect("write IdP setup");
        let log_path = dir.path().join("idp.log");
        let log = File::create(&log_path).expect("create IdP log");
        let mut child = Command::new(node_binary())
            .arg(idp_dir.join("idp.mjs"))
            .arg(&setup_path)
            .current_dir(&idp_dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn `{} tests/idp/idp.mjs`: {e} (install Node.js 20+: scripts/deps.sh test)",
                    node_binary()
                )
            });
        let stdin = child.stdin.take();

        let deadline = Instant::now() + READY_TIMEOUT;
        let (port, issuer) = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(ready) = text.lines().find_map(|l| l.strip_prefix("ready ")) {
                let v: Value = serde_json::from_str(ready).expect("IdP ready line is JSON");
                let port = v["port"].as_u64().expect("ready line has a port");
                let issuer = v["issuer"].as_str().expect("ready line has an issuer");
                break (
                    u16::try_from(port).expect("port fits in u16"),
                    issuer.to_owned(),
                );
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the test IdP exited with {status} before it was ready; output:\n{text}");
            }
            if Instant::now() > deadline {
                let report = crate::diagnose::report(child.id(), READY_TIMEOUT);
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the test IdP was not ready after {READY_TIMEOUT:?}\n{report}\
                     ----- its output -----\n{text}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };

        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("build IdP client");
        Idp {
            child: Some(child),
            _stdin: stdin,
            dir,
            log_path,
            port,
            issuer,
            setup,
            http,
        }
    }

    /// The issuer URL (no trailing slash), e.g. `http://127.0.0.1:41234`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`: where the IdP really listens, whatever the issuer's host.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    pub fn jwks_url(&self) -> String {
        self.url("/jwks")
    }

    pub fn token_url(&self) -> String {
        self.url("/token")
    }

    /// The setup the IdP was started with.
    pub fn setup(&self) -> &IdpSetup {
        &self.setup
    }

    /// Everything the node process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The discovery document (fetched from the loopback address).
    pub async fn discovery(&self) -> Value {
        self.get_json("/.well-known/openid-configuration").await
    }

    /// The JWKS as published now.
    pub async fn jwks(&self) -> JwkSet {
        serde_json::from_value(self.get_json("/jwks").await).expect("JWKS parses")
    }

    /// Fresh keys sign from now on under the kids of the keys they replace, which leave the
    /// key set (an IdP that replaced a key but kept its kid). Returns the kids.
    pub async fn replace_keys_under_their_kids(&self) -> Vec<String> {
        let v = self
            .control(
                "/test/rotate-keys",
                json!({ "keep_old": false, "same_kids": true }),
            )
            .await;
        serde_json::from_value(v["kids"].clone()).expect("kids")
    }

    /// New RS256 and ES256 keys sign from now on; the previous keys stay in the JWKS (for
    /// verification only) when `keep_old`, else they disappear. Returns the kids now published.
    pub async fn rotate_keys(&self, keep_old: bool) -> Vec<String> {
        let v = self
            .control("/test/rotate-keys", json!({ "keep_old": keep_old }))
            .await;
        serde_json::from_value(v["kids"].clone()).expect("kids")
    }

    /// Makes the IdP send a real back-channel logout token to `client_id`'s
    /// `backchannel_logout_uri` for every session of `sub` with that client, then end those
    /// sessions at the IdP. Returns the `sid`s sent (empty if `sub` had no session). Panics if
    /// the receiver did not answer 200/204.
    pub async fn backchannel_logout(&self, sub: &str, client_id: &str) -> Vec<String> {
        let v = self
            .control(
                "/test/backchannel-logout",
                json!({ "sub": sub, "client_id": client_id }),
            )
            .await;
        serde_json::from_value(v["sids"].clone()).expect("sids")
    }

    /// [`Idp::backchannel_logout`], leaving the IdP's sessions and grants as they are: a code
    /// it issued before is still redeemed, as one is whose exchange the logout overtook.
    pub async fn backchannel_logout_keeping_sessions(
        &self,
        sub: &str,
        client_id: &str,
    ) -> Vec<String> {
        let v = self
            .control(
                "/test/backchannel-logout",
                json!({ "sub": sub, "client_id": client_id, "end_session": false }),
            )
            .await;
        serde_json::from_value(v["sids"].clone()).expect("sids")
    }

    /// [`Idp::backchannel_logout_keeping_sessions`], whatever the client answers: the sids,
    /// or what the IdP was told where the client did not answer 200 (the IdP's words).
    pub async fn try_backchannel_logout_keeping_sessions(
        &self,
        sub: &str,
        client_id: &str,
    ) -> Result<Vec<String>, String> {
        let body = json!({ "sub": sub, "client_id": client_id, "end_session": false });
        let (status, v) = self.control_answer("/test/backchannel-logout", body).await;
        match status {
            StatusCode::OK => Ok(serde_json::from_value(v["sids"].clone()).expect("sids")),
            _ => Err(v["error"].as_str().unwrap_or_default().to_owned()),
        }
    }

    /// Sends the last back-channel logout again, the same token to the same client, as an IdP
    /// retrying a delivery the client did not answer 200 does: `Err` with the IdP's words where
    /// the client does not answer 200 this time either.
    pub async fn resend_last_backchannel_logout(&self) -> Result<(), String> {
        let body = json!({ "resend_last": true });
        let (status, v) = self.control_answer("/test/backchannel-logout", body).await;
        match status {
            StatusCode::OK => Ok(()),
            _ => Err(v["error"].as_str().unwrap_or_default().to_owned()),
        }
    }

    /// Gives the user `sub` these groups from now on, as an admin's change at the IdP: tokens
    /// and UserInfo answers issued after carry them.
    pub async fn set_groups(&self, sub: &str, groups: &[&str]) {
        self.control("/test/set-groups", json!({ "sub": sub, "groups": groups }))
            .await;
    }

    /// Starts (`true`: every OIDC request answers 503) or ends a simulated outage.
    pub async fn outage(&self, on: bool) {
        self.set_outage(if on {
            IdpOutage::Unavailable
        } else {
            IdpOutage::Off
        })
        .await;
    }

    pub async fn set_outage(&self, outage: IdpOutage) {
        // The test IdP's name for each (`POST /test/stop-serving`, see idp.mjs).
        let mode = match outage {
            IdpOutage::Off => {
                self.control("/test/start-serving", json!({})).await;
                return;
            }
            IdpOutage::Unavailable => "503",
            IdpOutage::Reset => "reset",
            IdpOutage::Hang => "hang",
            IdpOutage::Gateway => "gateway",
            IdpOutage::ServerError => "server-error",
            IdpOutage::UserInfo => "userinfo",
            IdpOutage::UserInfoRefuses => "userinfo-refuses",
            IdpOutage::UserInfoOtherSubject => "userinfo-other-sub",
            IdpOutage::UserInfoRedirect => "userinfo-redirect",
            IdpOutage::UserInfoPage => "userinfo-page",
            IdpOutage::UserInfoNotFound => "userinfo-404",
            IdpOutage::UserInfoGatewayNotFound => "userinfo-gateway-404",
            IdpOutage::UserInfoSpringNotFound => "userinfo-spring-404",
            IdpOutage::SpringNotFound => "spring-404",
            IdpOutage::Jwks => "jwks",
            IdpOutage::JwksEmpty => "jwks-empty",
        };
        self.control("/test/stop-serving", json!({ "mode": mode }))
            .await;
    }

    /// A token delegated to `client_id` (an agent) by the person whose `id_token` it holds
    /// (RFC 8693 token exchange): a JWT for `resource` whose `sub` is the person and whose `act`
    /// names the client. The client must be allowed the grant (see [`TOKEN_EXCHANGE`]).
    pub async fn exchange_token(
        &self,
        client_id: &str,
        secret: &str,
        id_token: &str,
        resource: &str,
    ) -> String {
        let form = [
            ("grant_type", TOKEN_EXCHANGE.to_owned()),
            ("subject_token", id_token.to_owned()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token".to_owned(),
            ),
            ("resource", resource.to_owned()),
        ];
        let v = self.token_request(client_id, secret, &form).await;
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {v}"))
            .to_owned()
    }

    /// A real client-credentials access token from the token endpoint: a JWT for `resource`
    /// (or the setup's default resource) with all of that resource's scopes.
    pub async fn client_credentials_token(
        &self,
        client_id: &str,
        secret: &str,
        resource: Option<&str>,
    ) -> String {
        let resource = resource
            .map(str::to_owned)
            .or_else(|| self.setup.default_resource.clone());
        let mut form = vec![("grant_type", "client_credentials".to_owned())];
        if let Some(resource) = &resource {
            form.push(("resource", resource.clone()));
            if let Some(r) = self
                .setup
                .resources
                .iter()
                .find(|r| &r.indicator == resource)
            {
                if !r.scope.is_empty() {
                    form.push(("scope", r.scope.clone()));
                }
            }
        }
        let v = self.token_request(client_id, secret, &form).await;
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {v}"))
            .to_owned()
    }

    /// Exchanges an authorization code (with its PKCE verifier) at the token endpoint and
    /// returns the token response (`id_token`, `access_token`, `refresh_token`, …).
    pub async fn exchange_code(
        &self,
        client_id: &str,
        secret: &str,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> Value {
        let form = [
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.to_owned()),
            ("redirect_uri", redirect_uri.to_owned()),
            ("code_verifier", code_verifier.to_owned()),
        ];
        self.token_request(client_id, secret, &form).await
    }

    /// POSTs `form` to the token endpoint with HTTP Basic client authentication; panics
    /// unless it answers 200.
    pub async fn token_request(
        &self,
        client_id: &str,
        secret: &str,
        form: &[(&str, String)],
    ) -> Value {
        let (status, v) = self.try_token_request(client_id, secret, form).await;
        assert_eq!(status, StatusCode::OK, "token endpoint answered {v}");
        v
    }

    /// Like [`Idp::token_request`], but returns the status and body whatever they are.
    pub async fn try_token_request(
        &self,
        client_id: &str,
        secret: &str,
        form: &[(&str, String)],
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.token_url())
            .basic_auth(form_encode(client_id), Some(form_encode(secret)))
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {}: {e}", self.token_url()));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// The authorization URL (on the issuer's host) for the code flow with PKCE (S256),
    /// `state` and `nonce`.
    pub fn authorization_url(
        &self,
        client_id: &str,
        redirect_uri: &str,
        scope: &str,
        state: &str,
        nonce: &str,
        pkce: &Pkce,
    ) -> String {
        // The issuer's host, not the loopback address: the IdP's own redirects and cookies use it.
        let mut url = url::Url::parse(&format!("{}/auth", self.issuer)).expect("auth URL");
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", scope)
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256");
        url.into()
    }

    /// Verifies a JWT signed by this IdP against its current JWKS: signature (RS256 or
    /// ES256, by `kid`), `iss`, `aud` = `audience`, `exp`. Returns the claims, or the reason.
    pub async fn verify_jwt(&self, token: &str, audience: &str) -> Result<Value, String> {
        let jwks = self.jwks().await;
        verify_with(&jwks, token, &self.issuer, audience)
    }

    /// Signs in through the IdP's login form with a plain HTTP client (its own cookie jar),
    /// starting at `authorization_url` and following redirects until one leaves the IdP's
    /// origin. Returns that redirect's URL (the client's `redirect_uri` with `code` and
    /// `state`). Panics if the credentials are refused.
    pub async fn sign_in_http(
        &self,
        authorization_url: &str,
        login: &str,
        password: &str,
    ) -> String {
        let client = crate::client::plain_client_builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("build sign-in client");
        let idp_origins = [self.url(""), self.issuer.clone()];
        let on_idp = |u: &str| idp_origins.iter().any(|o| u.starts_with(&format!("{o}/")));
        let mut url = authorization_url.to_owned();
        let mut posted = false;
        for _ in 0..10 {
            let resp = client
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            if resp.status().is_redirection() {
                url = absolute(&url, location(&resp));
                if !on_idp(&url) {
                    return url;
                }
                continue;
            }
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            assert!(
                status == StatusCode::OK && !posted,
                "sign-in at the IdP stopped at {url} with {status}:\n{body}"
            );
            let action =
                form_action(&body).unwrap_or_else(|| panic!("no login form at {url}:\n{body}"));
            let resp = client
                .post(absolute(&url, &action))
                .form(&[("login", login), ("password", password)])
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST login form: {e}"));
            posted = true;
            if !resp.status().is_redirection() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                panic!("the IdP refused the sign-in of {login} ({status}):\n{body}");
            }
            url = absolute(&url, location(&resp));
            if !on_idp(&url) {
                return url;
            }
        }
        panic!("sign-in at the IdP did not leave it after 10 redirects (last: {url})");
    }

    /// `GET /test/health`.
    pub async fn health(&self) -> Value {
        self.get_json("/test/health").await
    }

    async fn get_json(&self, path: &str) -> Value {
        let url = self.url(path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "GET {url}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {text}"))
    }

    async fn control(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.control_answer(path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "POST {path} {body}: {answer}");
        answer
    }

    /// The status and JSON answer of a test control endpoint.
    async fn control_answer(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let url = self.url(path);
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let answer = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {url}: not JSON ({e}): {text}"));
        (status, answer)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- test IdP ({}) output -----\n{}\n-----",
                self.issuer,
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Verifies `token` against `jwks`: signature by `kid` (RS256/ES256 only), `iss`, `aud`,
/// `exp`/`nbf` (no leeway). Returns the claims or the reason it was refused.
pub fn verify_with(
    jwks: &JwkSet,
    token: &str,
    issuer: &str,
    audience: &str,
) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(format!("algorithm {:?} not allowed", header.alg));
    }
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks
        .find(&kid)
        .ok_or_else(|| format!("kid {kid} not in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWK {kid}: {e}"))?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = 0;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| format!("{e}"))
}

/// The claims of a JWT without any verification (for looking, never for trusting).
pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .expect("payload is base64url");
    serde_json::from_slice(&bytes).expect("payload is JSON")
}

/// The header of a JWT, parsed as JSON, without verification.
pub fn jwt_header(token: &str) -> Value {
    let header = token.split('.').next().expect("a JWT has a header");
    let bytes = URL_SAFE_NO_PAD.decode(header).expect("header is base64url");
    serde_json::from_slice(&bytes).expect("header is JSON")
}

/// The value of query parameter `name` in `url`.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `tests/idp/` of this checkout.
pub fn idp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("idp")
}

fn node_binary() -> String {
    std::env::var("PORTCULLIS_NODE").unwrap_or_else(|_| "node".to_owned())
}

/// Client credentials in HTTP Basic are form-encoded first (RFC 6749 §2.3.1).
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn location(resp: &reqwest::Response) -> &str {
    resp.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("redirect from {} without Location", resp.url()))
}

fn absolute(base: &str, reference: &str) -> String {
    url::Url::parse(base)
        .and_then(|b| b.join(reference))
        .unwrap_or_else(|e| panic!("resolve {reference} against {base}: {e}"))
        .into()
}

/// The `action` of the first `<form …>` in an HTML page (the IdP's own, simple pages).
fn form_action(html: &str) -> Option<String> {
    let form = &html[html.find("<form")?..];
    let tag = &form[..form.find('>')?];
    let rest = &tag[tag.find("action=\"")? + "action=\"".len()..];
    let action = &rest[..rest.find('"')?];
    Some(action.replace("&amp;", "&"))
}

/// Runs `npm ci` in `dir` unless its `node_modules` was installed from the current
/// `package-lock.json`, holding a lock file so that test processes and threads running in
/// parallel install once.
///
/// "Installed" is a marker the harness writes after `npm ci` succeeds, holding the lock file's
/// SHA-256: a package's own files appear one by one while `npm ci` runs, so their presence says
/// nothing about whether the install is complete, and a tree installed from an older lock file
/// is not the one the tests expect.
fn ensure_node_modules(dir: &Path) {
    let lock_hash = {
        let lock = std::fs::read(dir.join("package-lock.json")).expect("read package-lock.json");
        format!("{:x}", Sha256::digest(&lock))
    };
    let marker = dir.join("node_modules/.portcullis-installed");
    let installed = || std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == lock_hash);
    if installed() {
        return;
    }
    let lock_path = std::env::temp_dir().join("portcullis-tests-idp-npm.lock");
    let lock_file = File::create(&lock_path).expect("create npm lock file");
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock npm lock file");
    if installed() {
        return;
    }
    let npm = std::env::var("PORTCULLIS_NPM").unwrap_or_else(|_| "npm".to_owned());
    let log_path =
        std::env::temp_dir().join(format!("portcullis-tests-npm-{}.log", std::process::id()));
    let log = File::create(&log_path).expect("create npm log");
    let mut child = Command::new(&npm)
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone npm log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "spawn `{npm} ci` in {}: {e} (install Node.js 20+ and npm)",
                dir.display()
            )
        });
    let deadline = Instant::now() + NPM_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for npm") {
            break status;
        }
        if Instant::now() > deadline {
            let report = crate::diagnose::report(child.id(), NPM_TIMEOUT);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`npm ci` in {} did not finish within {NPM_TIMEOUT:?}\n{report}----- its output -----\n{}",
                dir.display(),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        status.success(),
        "`npm ci` in {} failed ({status}):\n{output}",
        dir.display()
    );
    std::fs::write(&marker, &lock_hash).expect("write the install marker");
}
