//! Who is calling: browser sessions (OpenID Connect sign-in) and bearer JWTs (machines and
//! agents), and Portcullis' own sign-in endpoints under `/.portcullis/`.
//!
//! - [`Auth::authenticate`] turns a request into a [`Caller`] from memory only: a session
//!   cookie looked up in [`sessions::Sessions`], or a bearer JWT verified against its
//!   issuer's cached keys.
//! - [`Auth::challenge`] answers a request that needs a caller and has none: a browser
//!   navigation goes to sign-in (302), anything else gets 401 with `WWW-Authenticate`.
//! - [`endpoints`] serves `/.portcullis/sign_in`, `callback`, `sign_out`,
//!   `backchannel_logout` and `me`.

pub mod endpoints;
pub mod jwt;
pub mod oidc;
pub mod redirect;
pub mod sessions;
pub mod verified;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::header;
use pingora::http::RequestHeader;
use serde::Deserialize;

use portcullis_config::{Config, Credential, JwtIssuer};

use self::jwt::{algorithm, Jwks, JwtError};
use self::oidc::Oidc;
use self::sessions::{Identity, SessionKey, Sessions};
use self::verified::Verified;

/// Largest `Cookie` header (all of them together) read when looking for the session.
const MAX_COOKIE_BYTES: usize = 8 * 1024;

/// The caller of a request, once authenticated.
#[derive(Debug, Clone)]
pub enum Caller {
    Person {
        /// Which session, so it can be ended when the person is deprovisioned, and its open
        /// connections closed when it ends.
        session: SessionKey,
        identity: Arc<Identity>,
    },
    Machine {
        issuer: String,
        subject: String,
        client_id: Option<String>,
        /// The token's `groups` claim (for `token_groups` routes).
        groups: Vec<String>,
    },
}

/// Authentication state that outlives configuration reloads.
pub struct Auth {
    pub oidc: Arc<Oidc>,
    directory: Arc<portcullis_scim::store::Directory>,
    pub sessions: Sessions,
    /// Key sets of the bearer-token issuers, by issuer.
    issuers: DashMap<String, Arc<Jwks>>,
    /// When fetching an issuer's keys for the first time last failed.
    issuer_failures: DashMap<String, std::time::Instant>,
    /// Bearer tokens already verified.
    pub verified: Verified,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct MachineClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: String,
}

impl Caller {
    /// A short name for logs: the person's email (or subject), or the machine's client id.
    pub fn log_name(&self) -> String {
        match self {
            Caller::Person { identity, .. } => identity
                .email
                .clone()
                .unwrap_or_else(|| identity.subject.clone()),
            Caller::Machine {
                issuer,
                subject,
                client_id,
                ..
            } => format!("{}@{issuer}", client_id.as_deref().unwrap_or(subject)),
        }
    }
}

impl Auth {
    pub fn new(
        data_dir: &std::path::Path,
        directory: Arc<portcullis_scim::store::Directory>,
    ) -> Result<Self, String> {
        // IdP calls never follow redirects (SSRF) and are bounded in time.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            oidc: Arc::new(Oidc::new(http.clone())),
            directory,
            sessions: Sessions::open(data_dir, oidc::now_unix())?,
            issuers: DashMap::new(),
            issuer_failures: DashMap::new(),
            verified: Verified::default(),
            http,
        })
    }

    /// The caller of `req` for a route accepting `accept`, or `None`.
    pub async fn authenticate(
        &self,
        config: &Config,
        accept: &[Credential],
        req: &RequestHeader,
        tls: bool,
        now: u64,
    ) -> Option<Caller> {
        if accept.contains(&Credential::Bearer) {
            if let Some(token) = bearer_token(req) {
                // A request that presents a token is judged by it, never by a cookie too.
                return self.verify_bearer(config, token, now).await.ok();
            }
        }
        if accept.contains(&Credential::Session) {
            let oidc = config.oidc.as_ref()?;
            // Only the exact name: on TLS without a cookie domain that is the `__Host-` one,
            // which no sibling host and no plain-http page can have set.
            let id = cookie(req, &session_cookie_name(oidc, tls))?;
            let (key, session) = self.sessions.get(id)?;
            if !session.is_live(now, oidc.session_idle_timeout.as_secs()) {
                return None;
            }
            if let Some(refresh) = &session.refresh {
                let mut state = refresh.lock().await;
                if state.due <= now {
                    match self
                        .oidc
                        .refresh(oidc, &state, &session.identity.subject, now)
                        .await
                    {
                        Ok(Some(next)) => {
                            if let Err(e) = self.sessions.save_refresh(&key, &session, &next) {
                                tracing::warn!("cannot save the refreshed session: {e}");
                            }
                            *state = next;
                        }
                        Ok(None) => {
                            // The IdP no longer vouches for this person: the session ends.
                            drop(state);
                            if let Err(e) = self.sessions.end(&[key]) {
                                tracing::error!("cannot end the session: {e}");
                            }
                            return None;
                        }
                        // IdP outage: existing sessions keep working until it is back.
                        Err(e) => tracing::warn!("session refresh postponed: {e}"),
                    }
                }
            }
            session.touch(now);
            return Some(Caller::Person {
                session: key,
                identity: session.identity.clone(),
            });
        }
        None
    }

    async fn verify_bearer(
        &self,
        config: &Config,
        token: &str,
        now: u64,
    ) -> Result<Caller, JwtError> {
        let hash = Verified::hash(token);
        if let Some(caller) = self.verified.get(&hash, now) {
            return Ok(caller);
        }
        // Read before verifying: a reload or key refetch meanwhile makes the entry stale.
        let epoch = self.verified.epoch();
        if !jwt::is_compact_jws(token) {
            return Err(JwtError::Malformed);
        }
        // Which issuer? Read `iss` unverified only to pick the key set; everything is then
        // verified against that issuer's keys and rules.
        let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .map_err(|_| JwtError::Malformed)?;
        let claimed: IssuerOnly =
            serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
        let issuer = config
            .jwt_issuers
            .iter()
            .find(|i| i.issuer == claimed.iss)
            .ok_or_else(|| JwtError::Invalid("unknown issuer".into()))?;
        let jwks = self.jwks_for(issuer).await?;
        let keys = jwks.generation();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.algorithms = issuer.algorithms.iter().copied().map(algorithm).collect();
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&issuer.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = issuer.leeway.as_secs();
        let claims: MachineClaims = jwks.verify(token, &validation).await?;
        let caller = Caller::Machine {
            issuer: issuer.issuer.clone(),
            subject: claims.sub,
            client_id: claims.client_id.or(claims.azp),
            groups: claims.groups,
        };
        let entry = verified::Entry {
            caller: caller.clone(),
            valid_until: claims.exp.saturating_add(validation.leeway),
            jwks,
            keys,
            epoch,
        };
        self.verified.insert(hash, entry, now);
        Ok(caller)
    }

    async fn jwks_for(&self, issuer: &JwtIssuer) -> Result<Arc<Jwks>, JwtError> {
        if let Some(jwks) = self.issuers.get(&issuer.issuer) {
            return Ok(jwks.clone());
        }
        // While an issuer cannot be reached, don't let every request try again.
        if let Some(failed) = self.issuer_failures.get(&issuer.issuer) {
            if failed.elapsed() < jwt::REFETCH_AFTER {
                return Err(JwtError::KeysUnavailable);
            }
        }
        let result = self.first_fetch(issuer).await;
        if result.is_err() {
            self.issuer_failures
                .insert(issuer.issuer.clone(), std::time::Instant::now());
        }
        result
    }

    async fn first_fetch(&self, issuer: &JwtIssuer) -> Result<Arc<Jwks>, JwtError> {
        let uri = match &issuer.jwks_uri {
            Some(uri) => uri.clone(),
            None => self.discover_jwks_uri(&issuer.issuer).await.map_err(|e| {
                tracing::warn!(issuer = %issuer.issuer, "cannot discover the key set: {e}");
                JwtError::KeysUnavailable
            })?,
        };
        let jwks = Arc::new(Jwks::new(uri, self.http.clone()));
        jwks.refresh(true).await?;
        self.issuers.insert(issuer.issuer.clone(), jwks.clone());
        Ok(jwks)
    }

    async fn discover_jwks_uri(&self, issuer: &str) -> Result<String, String> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc: Discovery = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .error_for_status()
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(doc.jwks_uri)
    }
}

/// The session cookie's name: `__Host-` prefixed on TLS when the cookie is for one host only.
pub fn session_cookie_name(oidc: &portcullis_config::OidcConfig, tls: bool) -> String {
    if tls && oidc.cookie_domain.is_none() {
        format!("__Host-{}", oidc.cookie_name)
    } else {
        oidc.cookie_name.clone()
    }
}

/// The `Authorization: Bearer` token, if the request has exactly one such header.
pub fn bearer_token(req: &RequestHeader) -> Option<&str> {
    let mut values = req.headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// The value of cookie `name`, from bounded `Cookie` headers; anything malformed is absent.
pub fn cookie<'r>(req: &'r RequestHeader, name: &str) -> Option<&'r str> {
    let mut total = 0;
    for value in req.headers.get_all(header::COOKIE) {
        total += value.len();
        if total > MAX_COOKIE_BYTES {
            return None;
        }
        let Ok(value) = value.to_str() else {
            continue;
        };
        for pair in value.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == name {
                    return Some(v.trim_matches('"'));
                }
            }
        }
    }
    None
}

/// Whether the request is a browser navigating to a page (it may be sent to sign in), as
/// opposed to an API call or a script (which gets a 401).
pub fn is_browser_navigation(req: &RequestHeader) -> bool {
    let method_ok = req.method == http::Method::GET || req.method == http::Method::HEAD;
    let accepts_html = req
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    let is_xhr = req
        .headers
        .get("x-requested-with")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"xmlhttprequest"));
    let fetch_mode_ok = req
        .headers
        .get("sec-fetch-mode")
        .is_none_or(|v| v.as_bytes() == b"navigate");
    method_ok && accepts_html && !is_xhr && fetch_mode_ok
}

/// Discovers the configured OpenID provider in the background (see [`oidc::discovery_loop`]).
pub struct DiscoveryService {
    shared: Arc<crate::state::Shared>,
}

impl DiscoveryService {
    pub fn new(shared: Arc<crate::state::Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for DiscoveryService {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        let shared = self.shared.clone();
        let issuer = move || {
            shared
                .runtime
                .load()
                .config
                .oidc
                .as_ref()
                .map(|o| o.issuer.clone())
        };
        oidc::discovery_loop(self.shared.auth.oidc.clone(), issuer, shutdown).await;
    }
}
