//! OpenID Connect sign-in for people: discovery of the provider, the authorization-code flow
//! with PKCE, `state` and `nonce`, ID-token verification, and back-channel logout tokens.
//!
//! The provider is discovered in the background (retried with backoff while the IdP is down)
//! and kept across reloads; while it is unknown, existing sessions keep working and new
//! sign-ins get a 503. A sign-in in progress is kept by the browser that started it, not by
//! the server: its PKCE verifier, nonce and return address are sealed (see [`super::sealed`])
//! into a cookie named after, and bound to, its `state`, good for ten minutes. Every replica
//! holds the same sealing keys, so the callback may land on any of them. Nobody can fill
//! a server-side table of pending sign-ins, several tabs can sign in at once, and a callback
//! without the cookie (another browser) cannot finish it. The IdP redeems a code once, so a
//! replayed callback is refused there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreGenderClaim, CoreGrantType, CoreIdTokenVerifier, CoreJsonWebKey, CoreJsonWebKeySet,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{
    AccessToken, AdditionalProviderMetadata, AuthenticationFlow, AuthorizationCode, ClientId,
    ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, ProviderMetadata, RedirectUrl,
    RefreshToken, Scope, SubjectIdentifier, UserInfoClaims,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use portcullis_config::{CaBundle, JwtAlgorithm, OidcConfig, UserInfo};

use super::jwt::{algorithm, Jwks, JwtError, NumericDate};
use super::once::{Use, UsedOnce};
use super::sessions::{Kept, Refresh};
use super::{bounded, string_list};
use crate::caller::{add_string_claims, Claims, Identity, MAX_CLAIM_VALUE};

/// How long a started sign-in may take.
pub const PENDING_FOR: u64 = 600;
/// Back-channel logout tokens, and sign-ins, remembered against replay (each).
const MAX_USES_KEPT: usize = 100_000;

/// Provider metadata the `openidconnect` crate does not read itself.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ExtraMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_session_endpoint: Option<String>,
    /// RFC 9207: the provider names itself (`iss`) in every authorization response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_response_iss_parameter_supported: Option<bool>,
}
impl AdditionalProviderMetadata for ExtraMetadata {}

pub type Metadata = ProviderMetadata<
    ExtraMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// A discovered provider.
pub struct Provider {
    pub issuer: String,
    /// The CA its endpoints are trusted by (`[oidc] tls_ca`), `None` for the bundled roots.
    pub tls_ca: Option<CaBundle>,
    pub metadata: Metadata,
    pub jwks: Jwks,
    /// The client every call to it goes through (see [`super::idp_client`]).
    http: reqwest::Client,
}

/// The relying-party client built from a provider's metadata.
type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

impl Provider {
    /// Whether it is `config`'s provider: its issuer, trusted by its `tls_ca`.
    pub fn is_of(&self, config: &OidcConfig) -> bool {
        self.issuer == config.issuer && self.tls_ca == config.tls_ca
    }

    fn client(&self, config: &OidcConfig) -> Client {
        CoreClient::from_provider_metadata(
            self.metadata.clone(),
            ClientId::new(config.client_id.clone()),
            Some(ClientSecret::new(config.client_secret.expose().to_owned())),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("sign-in is unavailable: the identity provider has not been reached yet")]
    ProviderUnavailable,
    #[error("this sign-in link has expired or was already used; start again")]
    UnknownState,
    #[error(
        "this sign-in was started in another browser or on another host, or too long ago; \
         start again"
    )]
    WrongBrowser,
    /// Started with another issuer or client than the configured one (a reload came between),
    /// or answered in the name of another issuer (RFC 9207's `iss`): its code is not sent to
    /// this issuer's token endpoint.
    #[error("this sign-in was started with another identity provider; start again")]
    OtherProvider,
    #[error("the identity provider refused the sign-in: {0}")]
    Refused(String),
    /// A refusal (`error=`, its code alone) sent back to a browser that began no sign-in under
    /// its state: the IdP's for a sign-in begun elsewhere, or a link anyone could have made.
    #[error("a refusal ({0}) came back for no sign-in begun in this browser; start again")]
    RefusedElsewhere(String),
    #[error("the identity provider could not be reached: {0}")]
    Unreachable(String),
    /// The IdP sent the browser back saying it is in trouble (RFC 6749 §4.1.2.1's
    /// `temporarily_unavailable` or `server_error`): a new sign-in may finish in a moment.
    #[error("the identity provider could not sign you in just now: {0}")]
    Busy(String),
    /// UserInfo did not answer, after the code was exchanged: a reload cannot finish this
    /// sign-in (the code is spent), a new one may.
    #[error("the identity provider's UserInfo endpoint could not be reached: {0}")]
    UserInfoUnreachable(String),
    #[error("the identity provider's answer could not be verified: {0}")]
    Invalid(String),
    /// The ID token is signed with a key the provider's key set lacked, and the set could
    /// not be fetched again, or holds no key Portcullis can use: the code is spent, a new
    /// sign-in may finish.
    #[error(
        "the identity provider's signing keys could not be fetched, or hold none Portcullis can \
         use, to verify its answer"
    )]
    KeysUnavailable,
}

/// Why a call to the token endpoint failed: where it was not made or not answered, with the
/// causes the HTTP client gives (a status, a bound, a refused address), as discovery's are
/// told; an answer that does not read, without them (they may quote its tokens).
fn token_call_failed<E: std::error::Error + 'static>(
    error: &openidconnect::RequestTokenError<E, impl openidconnect::ErrorResponse + 'static>,
) -> String {
    match error {
        openidconnect::RequestTokenError::Request(_) => portcullis_scim::error::with_causes(error),
        other => other.to_string(),
    }
}

/// Whether `body` is an OAuth error: a JSON object whose `error` is a code (`invalid_token`),
/// not a framework's words for its status (Spring's `"error": "Not Found"`).
fn says_an_oauth_error(body: &[u8]) -> bool {
    let code = |error: &str| {
        !error.is_empty()
            && (error.bytes()).all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|answer| {
        answer
            .get("error")
            .and_then(|e| e.as_str())
            .is_some_and(code)
    })
}

/// Whether `body` is a JSON object (whatever it holds).
fn is_json_object(body: &[u8]) -> bool {
    matches!(
        serde_json::from_slice(body),
        Ok(serde_json::Value::Object(_))
    )
}

/// Whether two addresses are of one scheme and host (in any case), whatever their ports: a
/// session is its host's (see `IssuedIn`), and replicas behind one address may each be
/// reached on a port of its own. Either not read: not.
fn same_host(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.scheme() == b.scheme() && a.host().is_some() && a.host() == b.host(),
        _ => false,
    }
}

/// Why an ID token was refused: a bad signature may mean the IdP rotated its keys.
#[derive(Debug)]
enum IdTokenError {
    Signature(String),
    /// Signed with a key the provider's set (as last fetched) does not hold.
    UnknownKey(String),
    Other(String),
}

impl From<IdTokenError> for SignInError {
    fn from(e: IdTokenError) -> Self {
        match e {
            IdTokenError::Signature(e) | IdTokenError::UnknownKey(e) => {
                SignInError::Invalid(format!("signature: {e}"))
            }
            IdTokenError::Other(e) => SignInError::Invalid(e),
        }
    }
}

/// A sign-in in progress, as sealed into the browser's cookie.
#[derive(Deserialize, Serialize)]
struct Pending {
    pkce_verifier: String,
    nonce: String,
    return_to: String,
    redirect_uri: String,
    created: u64,
    /// The [`provider_mark`] of the issuer and client it was started with (absent from a
    /// sign-in a replica of an earlier version started).
    #[serde(default)]
    provider: Option<String>,
}

/// A short digest of `config`'s issuer and client: what a sign-in in progress keeps of them
/// (the cookie has little room to spare).
fn provider_mark(config: &OidcConfig) -> String {
    let digest = Sha256::new()
        .chain_update(config.issuer.as_bytes())
        .chain_update([0])
        .chain_update(config.client_id.as_bytes())
        .finalize();
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// What the browser needs to start a sign-in: where to go, and the cookie that carries it.
pub struct Started {
    pub authorize_url: String,
    pub cookie_name: String,
    pub cookie_value: String,
}

/// The name of the cookie carrying the sign-in with this `state`: one per sign-in, so that
/// sign-ins in several tabs do not overwrite each other.
pub fn pending_cookie_name(prefix: &str, state: &str) -> String {
    let digest = Sha256::digest(state.as_bytes());
    let mut name = String::with_capacity(prefix.len() + 17);
    name.push_str(prefix);
    name.push('_');
    for byte in &digest[..8] {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn core_alg(alg: JwtAlgorithm) -> CoreJwsSigningAlgorithm {
    match alg {
        JwtAlgorithm::RS256 => CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        JwtAlgorithm::RS384 => CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
        JwtAlgorithm::RS512 => CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
        JwtAlgorithm::PS256 => CoreJwsSigningAlgorithm::RsaSsaPssSha256,
        JwtAlgorithm::PS384 => CoreJwsSigningAlgorithm::RsaSsaPssSha384,
        JwtAlgorithm::PS512 => CoreJwsSigningAlgorithm::RsaSsaPssSha512,
        JwtAlgorithm::ES256 => CoreJwsSigningAlgorithm::EcdsaP256Sha256,
        JwtAlgorithm::ES384 => CoreJwsSigningAlgorithm::EcdsaP384Sha384,
        JwtAlgorithm::EdDSA => CoreJwsSigningAlgorithm::EdDsa,
    }
}

/// What a refresh with the IdP came to.
#[derive(Debug)]
pub enum Refreshed {
    /// The IdP vouches for the person again: the session's new refresh state.
    Renewed(Refresh),
    /// The IdP answered, but its ID token cannot be judged without the provider's keys, or
    /// UserInfo, asked for the person's groups, did not answer: the refresh token it gave is
    /// kept (the one sent may be spent), the session goes on as it was, and refreshes pause as
    /// for an outage.
    Postponed(Refresh),
    /// The IdP refused, or its answer failed verification: the session is over.
    Ended(String),
    /// The IdP vouches for the person, in other groups than the session began with, where a
    /// route judges the IdP's groups: the session is over, and the person signs in again
    /// (never taken for another replica's refresh: this one was answered).
    Regrouped(String),
    /// The IdP was not asked: as many refreshes as it may be asked at once are under way, or
    /// another is finding out whether it is back (see [`Oidc::asking`]). The session goes on
    /// as it is, its refresh still due.
    NotAsked,
}

/// How long a session whose refresh could not be judged ([`Refreshed::Postponed`]: its ID
/// token for want of the provider's keys, or its groups for want of UserInfo) waits to be
/// judged again.
const JUDGE_AGAIN_IN: std::time::Duration = std::time::Duration::from_secs(60);
/// The first and the longest pause in refreshing while the IdP is unreachable: at most one
/// request per pause waits on it.
const MIN_REFRESH_BACKOFF: u64 = 5;
const MAX_REFRESH_BACKOFF: u64 = 60;
/// How many refreshes this replica asks the IdP for at once: as many requests wait on an IdP
/// that has just stopped answering (a refresh due is a few an hour per person, and one not
/// asked for is asked by the session's next request).
const MAX_REFRESHES_ASKING: usize = 4;
/// How long a refresh finding out whether the IdP is back holds the others back at most (it
/// gives up on the IdP well before, and lets them go as soon as it has its answer).
const PROBE_HOLD: u64 = 120;

/// The OIDC relying party: state that outlives configuration reloads.
pub struct Oidc {
    provider: ArcSwapOption<Provider>,
    /// The keys sign-ins are sealed with, kept beside the directory.
    kept: Arc<Kept>,
    /// The `jti` of each logout token taken, kept from its `iat` (or when it was taken, if
    /// later) for `PENDING_FOR`, as long as it could be sent.
    logout_tokens: UsedOnce,
    /// The `state` of each sign-in whose code was sent to the IdP, kept as long as its
    /// sealed cookie could be: a replayed callback (with that cookie) is not sent again.
    sign_ins: UsedOnce,
    /// While the IdP is unreachable, refreshes pause until this Unix second (see
    /// [`Oidc::refresh_paused`]); `refresh_backoff` seconds, doubling to a minute.
    refresh_paused_until: AtomicU64,
    refresh_backoff: AtomicU64,
    /// Leave to ask the IdP for a refresh: [`MAX_REFRESHES_ASKING`] at once.
    refreshes_asking: tokio::sync::Semaphore,
}

/// A refresh's leave to ask the IdP ([`Oidc::asking`]).
struct Asking<'a> {
    oidc: &'a Oidc,
    _permit: tokio::sync::SemaphorePermit<'a>,
    /// Whether it is finding out if the IdP is back, holding the others back until it knows
    /// (until this Unix second at most).
    probe: Option<u64>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        // Given up without an outcome (its request went away): the pause was over, and the
        // next refresh may find out.
        if let Some(hold) = self.probe {
            let until = &self.oidc.refresh_paused_until;
            let _ = until.compare_exchange(hold, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

impl Oidc {
    pub fn new(kept: Arc<Kept>) -> Self {
        Self {
            provider: ArcSwapOption::empty(),
            kept,
            logout_tokens: UsedOnce::new(PENDING_FOR, MAX_USES_KEPT),
            sign_ins: UsedOnce::new(PENDING_FOR, MAX_USES_KEPT),
            refresh_paused_until: AtomicU64::new(0),
            refresh_backoff: AtomicU64::new(0),
            refreshes_asking: tokio::sync::Semaphore::new(MAX_REFRESHES_ASKING),
        }
    }

    pub fn provider(&self) -> Option<Arc<Provider>> {
        self.provider.load_full()
    }

    /// The provider of `config`'s issuer, once discovered (trusted by its `tls_ca`).
    pub(super) fn current(&self, config: &OidcConfig) -> Result<Arc<Provider>, SignInError> {
        self.provider()
            .filter(|p| p.is_of(config))
            .ok_or(SignInError::ProviderUnavailable)
    }

    /// Discovers `issuer` (metadata and keys), trusting `tls_ca` instead of the bundled roots
    /// where one is given. Keeps the last good provider on failure.
    pub async fn discover(&self, issuer: &str, tls_ca: Option<CaBundle>) -> Result<(), String> {
        let issuer_url = IssuerUrl::new(issuer.to_owned()).map_err(|e| e.to_string())?;
        let http = super::idp_client(tls_ca.as_ref())?;
        // Every call the flows make goes over https (http only on loopback), as the issuer
        // must: see `bounded::Client`, which also fetches the keys, during discovery.
        let metadata = Metadata::discover_async(issuer_url, &bounded::Client(http.clone()))
            .await
            .map_err(|e| {
                format!(
                    "discovery of {issuer} failed: {}",
                    portcullis_scim::error::with_causes(&e)
                )
            })?;
        // And every endpoint it names, before any is used: UserInfo is called with the
        // client's own HTTP client, and the browser is sent to the others.
        let endpoints = [
            (
                "token_endpoint",
                metadata.token_endpoint().map(|u| u.as_str()),
            ),
            (
                "userinfo_endpoint",
                metadata.userinfo_endpoint().map(|u| u.as_str()),
            ),
            (
                "authorization_endpoint",
                Some(metadata.authorization_endpoint().as_str()),
            ),
            (
                "end_session_endpoint",
                metadata
                    .additional_metadata()
                    .end_session_endpoint
                    .as_deref(),
            ),
        ];
        for (name, url) in endpoints {
            if let Some(url) = url {
                portcullis_config::check_fetch_url(url)
                    .map_err(|e| format!("the discovery document of {issuer}: its {name} {e}"))?;
            }
        }
        let jwks = Jwks::new(metadata.jwks_uri().url().to_string(), http.clone());
        jwks.refresh(true)
            .await
            .map_err(|e| format!("keys of {issuer}: {e}"))?;
        self.provider.store(Some(Arc::new(Provider {
            issuer: issuer.to_owned(),
            tls_ca,
            metadata,
            jwks,
            http,
        })));
        Ok(())
    }

    /// Starts a sign-in that returns to `return_to` through `redirect_uri`; its cookie's name
    /// begins with `cookie_prefix`.
    pub fn start(
        &self,
        config: &OidcConfig,
        redirect_uri: &str,
        return_to: String,
        cookie_prefix: &str,
        now: u64,
    ) -> Result<Started, SignInError> {
        let provider = self.current(config)?;
        let return_to = within_cookie(return_to);
        let client = provider.client(config).set_redirect_uri(
            RedirectUrl::new(redirect_uri.to_owned())
                .map_err(|e| SignInError::Invalid(e.to_string()))?,
        );
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.url();
        let pending = Pending {
            pkce_verifier: verifier.secret().clone(),
            nonce: nonce.secret().clone(),
            return_to,
            redirect_uri: redirect_uri.to_owned(),
            created: now,
            provider: Some(provider_mark(config)),
        };
        let plain =
            serde_json::to_vec(&pending).map_err(|e| SignInError::Invalid(e.to_string()))?;
        // Until the first sealing key is kept (see `SessionKeeper`), sign-in waits as for
        // discovery.
        let sealers = self.kept.sealers();
        let (_, sealer) = sealers.first().ok_or(SignInError::ProviderUnavailable)?;
        Ok(Started {
            authorize_url: url.to_string(),
            cookie_name: pending_cookie_name(cookie_prefix, state.secret()),
            cookie_value: sealer.seal(state.secret().as_bytes(), &plain),
        })
    }

    /// Completes a sign-in: opens the sign-in sealed for `state` in the browser's cookie,
    /// exchanges the code, verifies the ID token, and asks UserInfo for what it lacks of what
    /// Portcullis `wants` (see [`UserInfo`]). Returns who signed in and where they were going.
    #[allow(clippy::too_many_arguments)]
    /// The sign-in in progress that `sealed` (its browser's cookie) holds for `state`, if it
    /// is one Portcullis started there and it has not expired.
    fn pending(&self, state: &str, sealed: &str, now: u64) -> Result<Pending, SignInError> {
        // Altered, sealed for another state, or under a key no longer kept: unknown here.
        let pending: Pending = self
            .kept
            .sealers()
            .iter()
            .find_map(|(_, sealer)| sealer.open(state.as_bytes(), sealed))
            .and_then(|plain| serde_json::from_slice(&plain).ok())
            .ok_or(SignInError::UnknownState)?;
        if pending.created + PENDING_FOR <= now || pending.created > now + 60 {
            return Err(SignInError::UnknownState);
        }
        Ok(pending)
    }

    /// Whether `sealed` is this browser's cookie of a sign-in Portcullis started under `state`.
    /// Whether `config`'s provider says it names itself (`iss`) in every authorization
    /// response (RFC 9207), so that one without it is not its own.
    pub fn names_itself(&self, config: &OidcConfig) -> bool {
        self.current(config).is_ok_and(|p| {
            p.metadata
                .additional_metadata()
                .authorization_response_iss_parameter_supported
                == Some(true)
        })
    }

    pub fn started(&self, state: &str, sealed: &str, now: u64) -> bool {
        self.pending(state, sealed, now).is_ok()
    }

    /// Finishes the sign-in `state` whose callback came to `callback` (the callback address of
    /// the host it came to; with `cookie_domain`, the auth host's): the code is exchanged,
    /// and the person's identity made.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish(
        &self,
        config: &OidcConfig,
        state: &str,
        code: &str,
        sealed: Option<&str>,
        callback: &str,
        wants: Wanted<'_>,
        now: u64,
    ) -> Result<(Identity, Option<Refresh>, String, u64), SignInError> {
        let sealed = sealed.ok_or(SignInError::WrongBrowser)?;
        let pending = self.pending(state, sealed, now)?;
        // Finished where it began, before its code is spent: a code caught on one host (its
        // page's service worker sees that host's callbacks) and sent to another's callback,
        // with the sign-in's cookie, would make a session of the other host, where a session
        // vouches.
        if !same_host(&pending.redirect_uri, callback) {
            return Err(SignInError::WrongBrowser);
        }
        let provider = self.current(config)?;
        if pending
            .provider
            .as_ref()
            .is_some_and(|started| *started != provider_mark(config))
        {
            return Err(SignInError::OtherProvider);
        }
        // The code goes to the IdP once per sign-in, however often its callback is sent
        // with its cookie (a reload, a prefetch, a replay): one request to the IdP's token
        // endpoint, under its rate limits. (Unless a flood of sign-ins made it give way.)
        if self.sign_ins.record(state, pending.created, now) == Use::Again {
            return Err(SignInError::UnknownState);
        }
        let client = provider.client(config).set_redirect_uri(
            RedirectUrl::new(pending.redirect_uri.clone())
                .map_err(|e| SignInError::Invalid(e.to_string()))?,
        );
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| SignInError::Invalid(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()))
            .request_async(&bounded::Client(provider.http.clone()))
            .await
            .map_err(|e| match e {
                openidconnect::RequestTokenError::ServerResponse(r) => {
                    SignInError::Refused(r.error().to_string())
                }
                // It answered with tokens, taking the code for them, in a shape that does not
                // read: sent again, the code would be refused. (Where alone: the error quotes
                // values, which may be the IdP's tokens.) Any other answer that does not read
                // (a gateway's error page, HTML or JSON, in the IdP's place) may come from
                // in front of an IdP that never had the code.
                openidconnect::RequestTokenError::Parse(e, body) if gave_tokens(&body) => {
                    SignInError::Invalid(format!(
                        "the token response does not parse (at {})",
                        e.path()
                    ))
                }
                other => {
                    // The IdP may never have had the code: it may be sent again.
                    self.sign_ins.forget(state);
                    SignInError::Unreachable(token_call_failed(&other))
                }
            })?;
        let id_token = openidconnect::TokenResponse::id_token(&response)
            .ok_or_else(|| SignInError::Invalid("no ID token in the token response".into()))?;
        let nonce = Nonce::new(pending.nonce.clone());
        // The keys it is verified with were fetched before this moment.
        let seen = std::time::Instant::now();
        let claims = match self.verify_id_token(config, &provider, id_token, &nonce) {
            Err(missed @ (IdTokenError::UnknownKey(_) | IdTokenError::Signature(_))) => {
                // The IdP rotated its keys since they were fetched (or replaced one under its
                // kid): fetched again, and tried once more.
                let missing_key = matches!(missed, IdTokenError::UnknownKey(_));
                let refetched = provider.jwks.refresh_for_issuers_own(missing_key, seen);
                // Nor is a set with no key to use (what an IdP node whose keys failed to load
                // serves, taken as the provider's first) its word on the token.
                let refetched = refetched.await;
                if matches!(refetched, Err(JwtError::KeysUnavailable))
                    || !provider.jwks.has_usable_key()
                {
                    return Err(SignInError::KeysUnavailable);
                }
                self.verify_id_token(config, &provider, id_token, &nonce)?
            }
            other => other?,
        };

        // Claims the ID token lacks may be at UserInfo (OpenID Connect Core §5.4): a provider
        // need not put claims asked for by scope into the ID token when it issues an access
        // token. Asked at sign-in, and on a refresh where a route reads the provider's groups.
        let raw_claims = payload_of(&id_token.to_string());
        let id_groups = raw_claims
            .as_ref()
            .and_then(|c| string_list(c.get("groups")?));
        let lacks = |name: &str| raw_claims.as_ref().is_none_or(|c| c.get(name).is_none());
        // What the person is known by, and their groups where a route reads the provider's: a
        // sign-in without them is a person Portcullis cannot place, or one in no group.
        let lacks_needed = lacks(wants.claim) || (wants.groups && id_groups.is_none());
        let ask = match config.userinfo {
            UserInfo::Never => false,
            UserInfo::Always => true,
            UserInfo::Auto => {
                (claims.email().is_none() || lacks_needed)
                    && provider.metadata.userinfo_endpoint().is_some()
            }
        };
        let info = match ask {
            true => {
                let answer = self
                    .user_info(config, &provider, response.access_token(), claims.subject())
                    .await;
                match answer {
                    Ok(info) => Some(info),
                    // An endpoint in trouble (down, 5xx, 429, a redirect, a 404, a page in
                    // place of its JSON) where it holds what is needed is an outage, not an
                    // answer: the sign-in fails (503, try again), as a refresh keeps its groups
                    // then. Taken as the ID token has it, the person would be
                    // in no group for the session's lifetime, a deny rule on a group missing
                    // them, or without the claim they are known by.
                    Err(UserInfoFailure::Unanswered(e @ SignInError::UserInfoUnreachable(_)))
                        if lacks_needed =>
                    {
                        return Err(e)
                    }
                    // Asked only in case (`auto`), an endpoint that does not answer usefully
                    // (one that refuses the token) leaves the ID token's claims: whoever they
                    // fail to identify is refused later. An answer about someone else, or one
                    // that fails verification, ends the sign-in whatever the setting.
                    Err(UserInfoFailure::Unanswered(e)) if config.userinfo == UserInfo::Auto => {
                        tracing::warn!("UserInfo not used: {e}");
                        None
                    }
                    Err(UserInfoFailure::Unanswered(e) | UserInfoFailure::Invalid(e)) => {
                        return Err(e)
                    }
                }
            }
            false => None,
        };
        // An email and whether it is verified always come from the same answer.
        let (email, email_verified) = match (claims.email(), &info) {
            (Some(email), _) => (Some(email.to_string()), claims.email_verified()),
            (None, Some(info)) => (info.email().map(|e| e.to_string()), info.email_verified()),
            (None, None) => (None, None),
        };
        // Kept in the session, and with it in the store and on every replica: an email or a
        // name longer than any claim Portcullis keeps is none.
        let email = email.filter(|email| email.len() <= MAX_CLAIM_VALUE);
        let name = claims
            .name()
            .or_else(|| info.as_ref()?.name())
            .and_then(|n| n.get(None))
            .map(|n| n.to_string())
            .filter(|name| name.len() <= MAX_CLAIM_VALUE);
        let info_claims = info.as_ref().map(|info| &info.additional_claims().rest);
        let (groups, unlisted) = provider_groups(raw_claims.as_ref(), info_claims);
        // Groups the ID token lacks, where UserInfo could say them but gave no usable answer
        // (it refused the access token) or was not asked for them (no route read groups then,
        // and it was asked for the email at most, perhaps without the groups scope): unknown,
        // not none, unless an answer listed them. Taken as none, a deny rule on a group (one a
        // reload adds, too) would miss them for the session's lifetime.
        let listed = id_groups.is_some() || info_claims.is_some_and(|c| c.contains_key("groups"));
        let asked_for_groups = info.is_some() && wants.groups;
        let groups_unlisted =
            unlisted || groups_unsaid(listed, asked_for_groups, config, &provider);
        let mut strings = Claims::new();
        if let Some(object) = raw_claims.as_ref().and_then(|c| c.as_object()) {
            add_string_claims(&mut strings, object, &[wants.claim]);
        }
        if let Some(info) = info.as_ref().and_then(every_claim) {
            add_string_claims(&mut strings, &info, &[wants.claim]);
        }

        let lifetime = config.session_lifetime.as_secs();
        let identity = Identity {
            issuer: provider.issuer.clone(),
            subject: claims.subject().to_string(),
            email,
            email_verified,
            name,
            idp_session: raw_claims
                .as_ref()
                .and_then(|c| c.get("sid")?.as_str().map(str::to_owned)),
            created: now,
            expires: now + lifetime,
            id_token: Some(id_token.to_string()),
            directory_seq: 0,
            groups,
            groups_unlisted: Some(groups_unlisted),
            claims: strings,
        };
        let refresh = match (config.refresh, response.refresh_token()) {
            (true, Some(token)) => Some(Refresh {
                refresh_token: token.secret().clone(),
                due: u64::try_from(claims.expiration().timestamp()).unwrap_or(now),
                sealed: false,
            }),
            (true, None) => {
                tracing::warn!(
                    "refresh is on but the identity provider issued no refresh token: this \
                     session lasts its session_lifetime, unchecked by the IdP (Okta and Entra ID \
                     issue one only when [oidc] scopes holds offline_access and the client may \
                     use the Refresh Token grant)"
                );
                None
            }
            (false, _) => None,
        };
        Ok((identity, refresh, pending.return_to, pending.created))
    }

    /// Whether refreshes are paused at `now`, because the IdP was unreachable a moment ago:
    /// sessions then keep working on what they have, and no request waits on the IdP.
    pub fn refresh_paused(&self, now: u64) -> bool {
        now < self.refresh_paused_until.load(Ordering::Relaxed)
    }

    /// Leave to ask the IdP for a refresh at `now`: not while refreshes pause, nor while
    /// [`MAX_REFRESHES_ASKING`] are under way; once a pause is over, for one refresh at a time
    /// until the IdP answers one, so that at most one request per pause waits on an IdP still
    /// down.
    fn asking(&self, now: u64) -> Option<Asking<'_>> {
        let _permit = self.refreshes_asking.try_acquire().ok()?;
        let until = self.refresh_paused_until.load(Ordering::Acquire);
        if now < until {
            return None;
        }
        let mut probe = None;
        if self.refresh_backoff.load(Ordering::Acquire) > 0 {
            let hold = now_unix().max(now) + PROBE_HOLD;
            (self.refresh_paused_until)
                .compare_exchange(until, hold, Ordering::AcqRel, Ordering::Acquire)
                .ok()?;
            probe = Some(hold);
        }
        Some(Asking {
            oidc: self,
            _permit,
            probe,
        })
    }

    /// Refreshes a session's tokens with the IdP: [`Refreshed`] when the IdP answered (or was
    /// not asked: [`Refreshed::NotAsked`]), `Err` when it could not be asked (an outage: the
    /// session keeps working on what it has, and refreshes pause, 5 s at first, doubling up to
    /// a minute).
    pub async fn refresh(
        &self,
        config: &OidcConfig,
        current: &Refresh,
        identity: &Identity,
        wants_groups: bool,
        now: u64,
    ) -> Result<Refreshed, SignInError> {
        let Some(mut asking) = self.asking(now) else {
            return Ok(Refreshed::NotAsked);
        };
        let result = (self.ask_refresh(config, current, identity, wants_groups, now)).await;
        // Its outcome, good or bad, is what the others wait for: the hold goes with it.
        asking.probe = None;
        match &result {
            Err(_) | Ok(Refreshed::Postponed(_)) => {
                let backoff = (self.refresh_backoff.load(Ordering::Relaxed) * 2)
                    .clamp(MIN_REFRESH_BACKOFF, MAX_REFRESH_BACKOFF);
                self.refresh_backoff.store(backoff, Ordering::Relaxed);
                // From when the IdP gave up, not from when it was asked: a hanging IdP may
                // have taken many seconds to.
                self.refresh_paused_until
                    .store(now_unix().max(now) + backoff, Ordering::Relaxed);
            }
            Ok(_) => {
                self.refresh_backoff.store(0, Ordering::Relaxed);
                self.refresh_paused_until.store(0, Ordering::Release);
            }
        }
        result
    }

    async fn ask_refresh(
        &self,
        config: &OidcConfig,
        current: &Refresh,
        identity: &Identity,
        wants_groups: bool,
        now: u64,
    ) -> Result<Refreshed, SignInError> {
        let subject = identity.subject.as_str();
        let provider = self.current(config)?;
        let client = provider.client(config);
        let response = client
            .exchange_refresh_token(&RefreshToken::new(current.refresh_token.clone()))
            .map_err(|e| SignInError::Invalid(e.to_string()))?
            .request_async(&bounded::Client(provider.http.clone()))
            .await;
        let response = match response {
            Ok(response) => response,
            Err(openidconnect::RequestTokenError::ServerResponse(r)) => {
                let error = r.error().to_string();
                // RFC 6749 §5.2 errors end the session; an IdP saying it is in trouble
                // (RFC 6749 §4.1.2.1's two) is an outage.
                if matches!(error.as_str(), "server_error" | "temporarily_unavailable") {
                    return Err(SignInError::Unreachable(error));
                }
                return Ok(Refreshed::Ended(format!("the IdP refused: {error}")));
            }
            Err(e) => return Err(SignInError::Unreachable(token_call_failed(&e))),
        };
        // The token to refresh with next: a rotating IdP has just spent the one sent.
        let refresh_token = response
            .refresh_token()
            .map_or_else(|| current.refresh_token.clone(), |t| t.secret().clone());
        let due = match openidconnect::TokenResponse::id_token(&response) {
            Some(id_token) => {
                // A refreshed ID token carries no nonce; it must still be valid and be about
                // the same person. One that is not ends the session.
                let no_nonce = |_: Option<&Nonce>| Ok(());
                // The keys it is verified with were fetched before this moment.
                let seen = std::time::Instant::now();
                let verified = match self.verify_id_token(config, &provider, id_token, no_nonce) {
                    Err(missed @ (IdTokenError::Signature(_) | IdTokenError::UnknownKey(_))) => {
                        // Perhaps the IdP rotated its keys: refetch, once (for a key it lacks,
                        // unless a fetch began since, as at sign-in; else rate limited). Keys
                        // that cannot be fetched, a set with none Portcullis can use, or one
                        // not fetched again for a key it lacks (a fetch begun since found none
                        // such) give no verdict on the session: it is judged again a minute on,
                        // with the refresh token the IdP has just given (the one sent may be
                        // spent).
                        let postponed = || {
                            tracing::warn!(
                                "a refreshed ID token cannot be verified without the \
                                 provider's keys: judged again in {}s at the earliest",
                                JUDGE_AGAIN_IN.as_secs()
                            );
                            Ok(Refreshed::Postponed(Refresh {
                                refresh_token: refresh_token.clone(),
                                due: now + JUDGE_AGAIN_IN.as_secs(),
                                sealed: false,
                            }))
                        };
                        let missing_key = matches!(missed, IdTokenError::UnknownKey(_));
                        let refetched = provider
                            .jwks
                            .refresh_for_issuers_own(missing_key, seen)
                            .await;
                        if refetched.is_err() || !provider.jwks.has_usable_key() {
                            return postponed();
                        }
                        match self.verify_id_token(config, &provider, id_token, no_nonce) {
                            Err(IdTokenError::UnknownKey(_)) if refetched == Ok(false) => {
                                return postponed();
                            }
                            other => other,
                        }
                    }
                    other => other,
                };
                let claims = match verified {
                    Ok(claims) => claims,
                    Err(
                        IdTokenError::Signature(e)
                        | IdTokenError::UnknownKey(e)
                        | IdTokenError::Other(e),
                    ) => {
                        return Ok(Refreshed::Ended(format!(
                            "the refreshed ID token failed verification: {e}"
                        )))
                    }
                };
                if claims.subject().as_str() != subject {
                    return Ok(Refreshed::Ended(
                        "the refreshed ID token is about someone else".to_owned(),
                    ));
                }
                u64::try_from(claims.expiration().timestamp()).unwrap_or(now)
            }
            None => now.saturating_add(response.expires_in().map_or(300, |d| d.as_secs())),
        };
        if wants_groups {
            let id_token = openidconnect::TokenResponse::id_token(&response);
            let access_token = response.access_token();
            let moved = self.groups_moved(config, &provider, id_token, access_token, identity);
            match moved.await {
                Ok(None) => {}
                Ok(Some(why)) => return Ok(Refreshed::Regrouped(why)),
                // UserInfo did not answer: judged again later, as through an outage, with
                // the refresh token the IdP has just given.
                Err(e) => {
                    tracing::warn!("the person's groups cannot be read on refresh: {e}");
                    return Ok(Refreshed::Postponed(Refresh {
                        refresh_token,
                        due: now + JUDGE_AGAIN_IN.as_secs(),
                        sealed: false,
                    }));
                }
            }
        }
        Ok(Refreshed::Renewed(Refresh {
            refresh_token,
            due,
            sealed: false,
        }))
    }

    /// Why a refreshed session no longer holds for a route that judges the provider's groups:
    /// the groups the provider gives the person now, read as a sign-in reads them (the
    /// refreshed ID token's list, else UserInfo's, asked as sign-in asks it), are not those the
    /// session began with; the person signs in again. `None` when they are, or when the answer
    /// says nothing of groups: a refreshed ID token may hold no more than the claims it must
    /// (OpenID Connect Core §12.2), and a UserInfo answer without `groups` tells nothing either;
    /// but an ID token with the person's claims ([`PERSON_CLAIMS`]) and no `groups` gives none
    /// (Okta and Entra ID leave the claim out for a person in no group they name). `Err` when
    /// UserInfo does not answer.
    async fn groups_moved(
        &self,
        config: &OidcConfig,
        provider: &Provider,
        id_token: Option<&openidconnect::core::CoreIdToken>,
        access_token: &AccessToken,
        identity: &Identity,
    ) -> Result<Option<String>, SignInError> {
        let raw_claims = id_token.and_then(|token| payload_of(&token.to_string()));
        let listed =
            (raw_claims.as_ref()).is_some_and(|c| c.get("groups").and_then(string_list).is_some());
        let ask = match config.userinfo {
            UserInfo::Never => false,
            UserInfo::Always => true,
            UserInfo::Auto => !listed,
        } && provider.metadata.userinfo_endpoint().is_some();
        let info = match ask {
            true => {
                let subject = SubjectIdentifier::new(identity.subject.clone());
                match self
                    .user_info(config, provider, access_token, &subject)
                    .await
                {
                    Ok(info) => Some(info),
                    // Not reached: judged again later, as through an outage.
                    Err(UserInfoFailure::Unanswered(e @ SignInError::UserInfoUnreachable(_))) => {
                        return Err(e)
                    }
                    // Answered with no use (an error, an access token meant for another API):
                    // the ID token says what it says, as at sign-in with `auto`.
                    Err(UserInfoFailure::Unanswered(e)) => {
                        tracing::warn!("UserInfo not used on refresh: {e}");
                        None
                    }
                    Err(UserInfoFailure::Invalid(e)) => return Ok(Some(e.to_string())),
                }
            }
            false => None,
        };
        let info_claims = info.as_ref().map(|info| &info.additional_claims().rest);
        let speaks = |get: &dyn Fn(&str) -> Option<serde_json::Value>| {
            get("groups").is_some() || super::groups_unlisted(get)
        };
        let told = speaks(&|name| raw_claims.as_ref()?.get(name).cloned())
            || speaks(&|name| info_claims?.get(name).cloned())
            || raw_claims
                .as_ref()
                .is_some_and(|c| PERSON_CLAIMS.iter().any(|name| c.get(name).is_some()));
        if !told {
            return Ok(None);
        }
        let (mut groups, unlisted) = provider_groups(raw_claims.as_ref(), info_claims);
        // Unknown, as at sign-in, where UserInfo could say them and did not answer.
        let unlisted = unlisted || groups_unsaid(listed, info.is_some(), config, provider);
        let mut held = identity.groups.clone();
        groups.sort_unstable();
        groups.dedup();
        held.sort_unstable();
        held.dedup();
        // A session stored before it was kept (`None`) is judged on it where it matters, not
        // ended here for a change nobody made.
        let moved = identity
            .groups_unlisted
            .is_some_and(|kept| kept != unlisted);
        Ok((groups != held || moved).then(|| {
            "the identity provider's groups for the person changed: they sign in again".to_owned()
        }))
    }

    /// The provider's UserInfo for `subject`, with an access token the provider has just given
    /// (a sign-in's or a refresh's). The answer must
    /// be about `subject` (OpenID Connect Core §5.3.4). A signed one (`application/jwt`, as a
    /// client registered with `userinfo_signed_response_alg` gets) must verify as an ID token
    /// does: with the provider's keys as they are now (fetched again for a key not seen yet),
    /// under `id_token_algorithms`, and naming this provider and client where it names any.
    async fn user_info(
        &self,
        config: &OidcConfig,
        provider: &Provider,
        access_token: &AccessToken,
        subject: &SubjectIdentifier,
    ) -> Result<UserInfoClaims<MoreClaims, CoreGenderClaim>, UserInfoFailure> {
        let unanswered =
            |e: String| UserInfoFailure::Unanswered(SignInError::Invalid(format!("UserInfo: {e}")));
        let unreachable =
            |e: String| UserInfoFailure::Unanswered(SignInError::UserInfoUnreachable(e));
        let invalid =
            |e: String| UserInfoFailure::Invalid(SignInError::Invalid(format!("UserInfo: {e}")));
        let endpoint = provider.metadata.userinfo_endpoint().ok_or_else(|| {
            UserInfoFailure::Unanswered(SignInError::Invalid(
                "the provider has no UserInfo endpoint, and [oidc] userinfo = \"always\""
                    .to_owned(),
            ))
        })?;
        let response = provider
            .http
            .get(endpoint.url().as_str())
            .bearer_auth(access_token.secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| unreachable(portcullis_scim::error::with_causes(&e.without_url())))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            // One that refuses the token (RFC 6750's 400, 401 and 403: one meant for another
            // API), or says another OAuth error (a JSON object with an `error` code), answered;
            // one in trouble (5xx, 429, 408), or not there (a redirect to a maintenance page, a
            // gateway's 404 during a deployment, a page or JSON), or a gateway's answer in its
            // place (Kong's `{"message": …}`), is an outage.
            let said = format!("status {status}");
            let refused = matches!(status.as_u16(), 400 | 401 | 403);
            let says_an_error = !refused
                && !bounded::elsewhere(status)
                && bounded::body(response, bounded::MAX_RESPONSE_BYTES)
                    .await
                    .is_ok_and(|body| says_an_oauth_error(&body));
            return Err(match refused || says_an_error {
                true => unanswered(said),
                false => unreachable(said),
            });
        }
        let signed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/jwt"));
        // An answer too large is no answer (a signed one, no valid answer); one cut short, as
        // one not made.
        let body = bounded::body(response, bounded::MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                bounded::BodyError::Cut(e) => unreachable(e),
                too_large if signed => invalid(too_large.to_string()),
                too_large => unanswered(too_large.to_string()),
            })?;
        let json = if signed {
            let token = std::str::from_utf8(&body)
                .map_err(|_| invalid("the signed answer is not text".to_owned()))?
                .trim();
            let mut validation = from_provider(config, provider);
            validation.set_required_spec_claims::<&str>(&[]);
            // Keys that cannot be had give no verdict: an outage, as for an ID token.
            let claims: serde_json::Value = provider
                .jwks
                .verify_issuers_answer(token, &validation)
                .await
                .map_err(|e| match e {
                    JwtError::KeysUnavailable => unreachable(e.to_string()),
                    e => invalid(e.to_string()),
                })?;
            serde_json::to_vec(&claims).map_err(|e| invalid(e.to_string()))?
        } else {
            body
        };
        // A signed answer that verified but does not read (no `sub`) is no outage, nor is a
        // JSON object that does not read; an unsigned answer that is no JSON object (a page
        // a proxy or a maintenance mode serves with 200) is the endpoint in trouble.
        UserInfoClaims::from_json::<std::io::Error>(&json, Some(subject)).map_err(|e| match e {
            openidconnect::UserInfoError::ClaimsVerification(e) => invalid(e.to_string()),
            other if signed => invalid(other.to_string()),
            other if !is_json_object(&json) => unreachable(other.to_string()),
            other => unanswered(other.to_string()),
        })
    }

    fn verify_id_token(
        &self,
        config: &OidcConfig,
        provider: &Provider,
        id_token: &openidconnect::core::CoreIdToken,
        nonce: impl openidconnect::NonceVerifier,
    ) -> Result<openidconnect::core::CoreIdTokenClaims, IdTokenError> {
        verify_id_token(config, &provider.issuer, &provider.jwks, id_token, nonce)
    }

    /// Verifies a back-channel logout token (OIDC Back-Channel Logout 1.0 §2.6), one not used
    /// before, and returns whom it signs out; it is used from then on. A token whose sessions
    /// could not be ended is [`Oidc::unused_logout_token`] again, so the IdP's retry is taken.
    pub async fn verify_logout_token(
        &self,
        config: &OidcConfig,
        token: &str,
        now: u64,
    ) -> Result<LoggedOut, JwtError> {
        let provider = self
            .provider()
            .filter(|p| p.is_of(config))
            .ok_or(JwtError::KeysUnavailable)?;
        let mut validation = from_provider(config, &provider);
        validation.set_required_spec_claims(&["iss", "aud"]);
        validation.validate_exp = false;
        let claims: LogoutClaims = provider.jwks.verify(token, &validation).await?;
        let invalid = |why: &str| JwtError::Invalid(why.to_owned());
        if claims.nonce.is_some() {
            return Err(invalid("a logout token must not carry a nonce"));
        }
        let is_logout_event = claims
            .events
            .as_ref()
            .and_then(|e| e.as_object())
            .is_some_and(|e| e.contains_key("http://schemas.openid.net/event/backchannel-logout"));
        if !is_logout_event {
            return Err(invalid("not a back-channel logout event"));
        }
        let NumericDate(iat) = claims.iat.ok_or_else(|| invalid("no iat"))?;
        if iat > now + 60 || iat + PENDING_FOR < now {
            return Err(invalid("iat is out of range"));
        }
        if claims
            .exp
            .is_some_and(|NumericDate(exp)| exp.saturating_add(60) < now)
        {
            return Err(invalid("expired"));
        }
        if claims.sub.is_none() && claims.sid.is_none() {
            return Err(invalid("neither sub nor sid"));
        }
        let jti = claims.jti.ok_or_else(|| invalid("no jti"))?;
        // Kept as long as the token could be taken: until PENDING_FOR after its `iat`, which
        // may be a minute ahead of now (or until a flood of them made it give way: a replay
        // could only end sessions again).
        if self.logout_tokens.record(&jti, iat.max(now), now) == Use::Again {
            return Err(invalid("this logout token was already used"));
        }
        Ok(LoggedOut {
            sub: claims.sub,
            sid: claims.sid,
            jti,
            until: iat.max(now).saturating_add(PENDING_FOR),
        })
    }

    /// Forgets that `logout`'s token was used: its sessions could not be ended.
    pub fn unused_logout_token(&self, logout: &LoggedOut) {
        self.logout_tokens.forget(&logout.jti);
    }

    /// Forgets logout tokens and sign-ins too old to be accepted again.
    pub fn sweep(&self, now: u64) {
        self.logout_tokens.sweep(now);
        self.sign_ins.sweep(now);
    }
}

/// Whom a back-channel logout token signs out: the IdP's session `sid`, or every session of
/// the subject `sub` (at least one is present).
#[derive(Debug)]
pub struct LoggedOut {
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: String,
    /// Until when (Unix seconds) the token could be taken again: kept as used until then.
    pub until: u64,
}

impl LoggedOut {
    /// Whether `identity`'s session is one this logout ends: the IdP session it names, or,
    /// for a session whose ID token had no `sid` (some IdPs send one only in logout tokens),
    /// any of its subject's.
    pub fn ends(&self, identity: &crate::caller::Identity, issuer: &str) -> bool {
        identity.issuer == issuer
            && match (&self.sid, &self.sub, &identity.idp_session) {
                (Some(sid), _, Some(session)) => session == sid,
                (Some(_), Some(sub), None) | (None, Some(sub), _) => identity.subject == *sub,
                (Some(_), None, None) | (None, None, _) => false,
            }
    }
}

/// How a JWT the sign-in provider signs for this client is checked: under
/// `id_token_algorithms`, from its issuer, for its client (where named), with a minute's leeway.
fn from_provider(config: &OidcConfig, provider: &Provider) -> jsonwebtoken::Validation {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.algorithms = config
        .id_token_algorithms
        .iter()
        .copied()
        .map(algorithm)
        .collect();
    validation.set_issuer(&[&provider.issuer]);
    validation.set_audience(&[&config.client_id]);
    validation.leeway = 60;
    validation
}

#[derive(Deserialize)]
struct LogoutClaims {
    sub: Option<String>,
    sid: Option<String>,
    iat: Option<NumericDate>,
    exp: Option<NumericDate>,
    jti: Option<String>,
    nonce: Option<serde_json::Value>,
    events: Option<serde_json::Value>,
}

/// The longest return address a sign-in's cookie carries: with the rest sealed and encoded,
/// the cookie stays well within the 4096 bytes browsers keep.
const MAX_RETURN_TO: usize = 1536;

/// `return_to`, shortened to fit a sign-in's cookie: without its query, else the root of its
/// origin (an absolute URL) or `/`. A deep link that long loses its query rather than the
/// sign-in.
pub(super) fn within_cookie(return_to: String) -> String {
    if return_to.len() <= MAX_RETURN_TO {
        return return_to;
    }
    let without_query = return_to.split('?').next().unwrap_or_default();
    if without_query.len() <= MAX_RETURN_TO {
        return without_query.to_owned();
    }
    match without_query.split_once("://") {
        Some((scheme, rest)) => {
            let origin = rest.split('/').next().unwrap_or_default();
            let root = format!("{scheme}://{origin}/");
            if root.len() <= MAX_RETURN_TO {
                root
            } else {
                "/".to_owned()
            }
        }
        None => "/".to_owned(),
    }
}

/// Why UserInfo gave nothing: it did not answer usefully (unreachable, an error status, an
/// answer that does not parse), or it answered about someone else or failed verification.
enum UserInfoFailure {
    Unanswered(SignInError),
    Invalid(SignInError),
}

/// What sign-in wants of the provider's claims: the one that identifies a person (see
/// `[identity] claim`), and `groups` when a route judges on the token's groups.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub claim: &'a str,
    pub groups: bool,
}

/// The UserInfo claims beyond the standard ones, as any JSON (`groups` counts only as a list of
/// strings; a mapping by any claim reads the strings), so an unexpected shape never fails a
/// sign-in.
#[derive(Debug, Deserialize, Serialize)]
pub struct MoreClaims {
    #[serde(flatten)]
    rest: std::collections::BTreeMap<String, serde_json::Value>,
}

impl openidconnect::AdditionalClaims for MoreClaims {}

/// Claims of the person (scope `email`'s and `profile`'s) whose presence shows an ID token
/// holds more than the claims it must: Okta's has `email`, Entra ID's `preferred_username` and
/// `name` (and `email` only for a person with a mailbox).
const PERSON_CLAIMS: [&str; 3] = ["email", "preferred_username", "name"];

/// The most groups a sign-in keeps (Entra ID puts at most 200 in a token, Okta 100), and the
/// most bytes of them all: as much as all other claims kept.
const MAX_GROUPS: usize = 1000;
const MAX_GROUP_BYTES: usize = 64 * 1024;

/// Whether a token endpoint's answer holds tokens: a JSON object with an `access_token`.
fn gave_tokens(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|answer| answer.get("access_token").is_some())
}

/// Whether a sign-in's (or a refresh's) groups are unknown: the ID token does not list them,
/// and UserInfo, which may hold claims the ID token lacks (the provider has the endpoint, and
/// the configuration lets Portcullis ask it), gave no answer. Without the endpoint, or with
/// `userinfo = "never"`, the ID token says all there is.
fn groups_unsaid(listed: bool, answered: bool, config: &OidcConfig, provider: &Provider) -> bool {
    !listed
        && !answered
        && config.userinfo != UserInfo::Never
        && provider.metadata.userinfo_endpoint().is_some()
}

/// The groups the provider gives a person: the ID token's (its raw claims), else UserInfo's
/// (its claims beyond the standard ones); and whether it speaks of groups it does not list
/// (Entra ID's overage), or lists more than are kept: a route that reads token groups cannot
/// judge them then.
fn provider_groups(
    id_token: Option<&serde_json::Value>,
    info: Option<&std::collections::BTreeMap<String, serde_json::Value>>,
) -> (Vec<String>, bool) {
    let groups = (id_token.and_then(|c| string_list(c.get("groups")?)))
        .or_else(|| string_list(info?.get("groups")?));
    let unkeepable = groups.as_deref().is_some_and(too_many_to_keep);
    let unlisted = unkeepable
        || (groups.is_none()
            && (super::groups_unlisted(|name| id_token?.get(name).cloned())
                || super::groups_unlisted(|name| info?.get(name).cloned())));
    (groups.filter(|_| !unkeepable).unwrap_or_default(), unlisted)
}

/// Whether a sign-in's `groups` are more than it keeps: more than [`MAX_GROUPS`], one longer
/// than a claim is kept, or more than [`MAX_GROUP_BYTES`] in all.
fn too_many_to_keep(groups: &[String]) -> bool {
    groups.len() > MAX_GROUPS
        || groups.iter().any(|g| g.len() > MAX_CLAIM_VALUE)
        || groups.iter().map(String::len).sum::<usize>() > MAX_GROUP_BYTES
}

/// Whether `id_token` (one Portcullis kept, not verified again) was issued to `client_id`: an
/// IdP refuses an `id_token_hint` from another of its clients.
pub fn issued_to(id_token: &str, client_id: &str) -> bool {
    payload_of(id_token).is_some_and(|claims| match &claims["aud"] {
        serde_json::Value::String(aud) => aud == client_id,
        serde_json::Value::Array(auds) => auds.iter().any(|aud| aud == client_id),
        _ => false,
    })
}

fn payload_of(id_token: &str) -> Option<serde_json::Value> {
    let payload = id_token.split('.').nth(1)?;
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Retries discovery of the configured issuer until it succeeds (backoff 1 s to 60 s, and at
/// once after each reload), and again whenever a reload names another issuer, or another
/// `tls_ca` for it. Keys are refetched on demand (unknown `kid`).
pub async fn discovery_loop(
    oidc: Arc<Oidc>,
    config: impl Fn() -> Option<OidcConfig>,
    mut reloads: tokio::sync::watch::Receiver<u64>,
    mut shutdown: pingora::server::ShutdownWatch,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = match config() {
            None => Duration::from_secs(5),
            Some(config) => {
                let issuer = &config.issuer;
                let due = !oidc.provider().is_some_and(|p| p.is_of(&config));
                if due {
                    match oidc.discover(issuer, config.tls_ca.clone()).await {
                        Ok(()) => {
                            tracing::info!(%issuer, "identity provider discovered");
                            backoff = Duration::from_secs(1);
                            Duration::from_secs(5)
                        }
                        Err(e) => {
                            tracing::warn!("{e}; retrying in {}s", backoff.as_secs());
                            let wait = backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(60));
                            wait
                        }
                    }
                } else {
                    oidc.sweep(now_unix());
                    Duration::from_secs(5)
                }
            }
        };
        // A reload may name another issuer, or fix a mistyped one: looked at once, afresh.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                backoff = Duration::from_secs(1);
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Every claim of a UserInfo answer, as it came: openidconnect keeps the standard ones
/// (`nickname`, `phone_number`, ...) out of its other claims, and `[identity] claim` may name
/// any.
fn every_claim(
    info: &UserInfoClaims<MoreClaims, CoreGenderClaim>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(info) {
        Ok(serde_json::Value::Object(claims)) => Some(claims),
        _ => None,
    }
}

/// An ID token's claims, verified against the key set `jwks` of `issuer`, for `config`'s client.
fn verify_id_token(
    config: &OidcConfig,
    issuer: &str,
    jwks: &Jwks,
    id_token: &openidconnect::core::CoreIdToken,
    nonce: impl openidconnect::NonceVerifier,
) -> Result<openidconnect::core::CoreIdTokenClaims, IdTokenError> {
    let raw = jwks
        .raw()
        .ok_or_else(|| IdTokenError::Other("no keys".into()))?;
    let keys: CoreJsonWebKeySet = serde_json::from_value((*raw).clone())
        .map_err(|e| IdTokenError::Other(format!("key set: {e}")))?;
    let issuer =
        IssuerUrl::new(issuer.to_owned()).map_err(|e| IdTokenError::Other(e.to_string()))?;
    // A public client verifier: no client secret, so no HMAC-signed ID tokens.
    let verifier = CoreIdTokenVerifier::new_public_client(
        ClientId::new(config.client_id.clone()),
        issuer,
        keys,
    )
    .set_allowed_algs(config.id_token_algorithms.iter().copied().map(core_alg));
    id_token
        .claims(&verifier, nonce)
        .cloned()
        .map_err(|e| match e {
            openidconnect::ClaimsVerificationError::SignatureVerification(
                e @ openidconnect::SignatureVerificationError::NoMatchingKey,
            ) => IdTokenError::UnknownKey(e.to_string()),
            openidconnect::ClaimsVerificationError::SignatureVerification(e) => {
                IdTokenError::Signature(e.to_string())
            }
            other => IdTokenError::Other(other.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::super::sealed::Sealer;
    use super::*;

    #[test]
    fn more_groups_than_are_kept_are_none_listed() {
        let groups = |n: usize, long: usize| {
            let mut groups: Vec<String> = (0..n).map(|i| format!("g{i}")).collect();
            groups.push("x".repeat(long));
            groups
        };
        assert!(!too_many_to_keep(&groups(MAX_GROUPS - 1, MAX_CLAIM_VALUE)));
        assert!(too_many_to_keep(&groups(MAX_GROUPS, 1)));
        assert!(too_many_to_keep(&groups(1, MAX_CLAIM_VALUE + 1)));
        let long = |n: usize| (0..n).map(|_| "x".repeat(1000)).collect::<Vec<_>>();
        assert!(!too_many_to_keep(&long(65)));
        assert!(too_many_to_keep(&long(66)));
    }

    /// An ID token verifies under a key its provider publishes twice, as GitHub Enterprise
    /// Server's set does (openidconnect's verifier refuses two keys under one `kid`, even the
    /// same one), as bearer and logout tokens of the same set do.
    #[test]
    fn an_id_token_verifies_under_a_key_published_twice() {
        use base64::Engine;
        let key = rcgen::KeyPair::generate().unwrap();
        let point = key.public_key_raw();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "a", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        let set = serde_json::json!({ "keys": [jwk, jwk] }).to_string();
        let issuer = "https://idp.example";
        let jwks = Jwks::holding(&format!("{issuer}/jwks"), set.as_bytes());
        let mut config = crate::testing::config("").oidc.unwrap();
        config.issuer = issuer.to_owned();
        config.id_token_algorithms = vec![portcullis_config::JwtAlgorithm::ES256];
        let now = crate::clock::now_unix();
        let claims = serde_json::json!({
            "iss": issuer, "aud": config.client_id, "sub": "alice",
            "iat": now, "exp": now + 300,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("a".to_owned());
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        let id_token: openidconnect::core::CoreIdToken = token.parse().unwrap();
        let any_nonce = |_: Option<&openidconnect::Nonce>| Ok(());
        let verified = verify_id_token(&config, issuer, &jwks, &id_token, any_nonce);
        assert_eq!(
            verified.map(|c| c.subject().to_string()).ok(),
            Some("alice".to_owned())
        );
    }

    /// A person may be found by any string claim UserInfo says, a standard one the ID token
    /// lacks too (as a conformant provider serves `nickname`).
    #[test]
    fn every_string_claim_of_userinfo_can_find_a_person() {
        let answer = br#"{"sub": "s1", "nickname": "alice", "phone_number": "+1 555",
            "email": "a@corp.example", "preferred_username": "al", "groups": ["eng"],
            "email_verified": true}"#;
        let info: UserInfoClaims<MoreClaims, CoreGenderClaim> =
            UserInfoClaims::from_json::<std::io::Error>(answer, None).unwrap();
        let claims = every_claim(&info).expect("an object");
        let mut strings = Claims::new();
        add_string_claims(&mut strings, &claims, &["nickname"]);
        for (name, value) in [
            ("nickname", "alice"),
            ("phone_number", "+1 555"),
            ("email", "a@corp.example"),
            ("preferred_username", "al"),
            ("sub", "s1"),
        ] {
            assert_eq!(strings.get(name).map(String::as_str), Some(value), "{name}");
        }
    }

    /// A test provider's answer to `request`: an empty key set at `/jwks`, else `document`.
    fn discovery_answer(request: &[u8], document: &str) -> String {
        let body = if request.starts_with(b"GET /jwks ") {
            r#"{"keys": []}"#
        } else {
            document
        };
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A provider behind a private CA is discovered, its keys fetched, under `[oidc] tls_ca`,
    /// and never under the bundled roots; the provider found is `config`'s only under the CA
    /// it was discovered with (a reload naming another CA discovers it again).
    #[tokio::test]
    async fn a_provider_behind_a_private_ca_is_trusted_under_its_tls_ca() {
        use std::io::{Read, Write};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca_issuer)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        let server = Arc::new(server);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let issuer = format!("https://{}", listener.local_addr().unwrap());
        let document = serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/auth"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let Ok(tls) = rustls::ServerConnection::new(server.clone()) else {
                    return;
                };
                let mut stream = rustls::StreamOwned::new(tls, stream);
                let mut request = [0u8; 2048];
                let Ok(_) = stream.read(&mut request) else {
                    continue; // a client that does not trust the CA
                };
                let _ = stream.write_all(discovery_answer(&request, &document).as_bytes());
                stream.conn.send_close_notify();
                let _ = stream.flush();
            }
        });
        let ca: CaBundle = vec![ca_cert.der().clone()].into();
        let oidc = Oidc::new(Arc::new(Kept::default()));
        let refused = oidc
            .discover(&issuer, None)
            .await
            .expect_err("bundled roots");
        assert!(refused.contains("discovery"), "{refused}");
        assert!(oidc.provider().is_none());
        oidc.discover(&issuer, Some(ca.clone()))
            .await
            .expect("discovered under tls_ca");
        let provider = oidc.provider().expect("the provider");
        let mut config = crate::testing::config("").oidc.unwrap();
        config.issuer = issuer;
        assert!(
            !provider.is_of(&config),
            "not the config's without its tls_ca"
        );
        config.tls_ca = Some(ca);
        assert!(provider.is_of(&config));
    }

    /// A provider whose discovery document names an endpoint over plain http off loopback
    /// (its keys, its UserInfo) is not taken: what they serve could be swapped on the network.
    #[tokio::test]
    async fn a_provider_with_an_endpoint_over_plain_http_is_not_taken() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (jwks, userinfo, says) in [
            (
                "http://keys.idp.example/jwks",
                None,
                "http://keys.idp.example/jwks must be https",
            ),
            (
                "/jwks",
                Some("http://idp.example/userinfo"),
                "its userinfo_endpoint must be https",
            ),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let issuer = format!("http://{}", listener.local_addr().unwrap());
            let mut document = serde_json::json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{issuer}/auth"),
                "token_endpoint": format!("{issuer}/token"),
                "jwks_uri": if jwks.starts_with('/') { format!("{issuer}{jwks}") } else { jwks.to_owned() },
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            });
            if let Some(userinfo) = userinfo {
                document["userinfo_endpoint"] = userinfo.into();
            }
            let document = document.to_string();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let mut request = [0u8; 2048];
                    let _ = stream.read(&mut request).await;
                    let answer = discovery_answer(&request, &document);
                    let _ = stream.write_all(answer.as_bytes()).await;
                }
            });
            let oidc = Oidc::new(Arc::new(Kept::default()));
            let refused = oidc.discover(&issuer, None).await.expect_err("not taken");
            assert!(refused.contains(says), "{refused}");
            assert!(oidc.provider().is_none());
        }
    }

    #[test]
    fn a_logout_token_s_dates_may_have_fractions_of_a_second() {
        let claims: LogoutClaims = serde_json::from_value(serde_json::json!({
            "iat": 1_700_000_000.5, "exp": 1_700_000_120.25, "jti": "j", "sid": "s",
        }))
        .expect("RFC 7519 NumericDates");
        assert_eq!(claims.iat, Some(NumericDate(1_700_000_000)));
        assert_eq!(claims.exp, Some(NumericDate(1_700_000_120)));
    }

    #[test]
    fn a_logout_ends_the_idp_session_it_names_or_its_subject_s_sessions_without_one() {
        let world = crate::testing::World::new();
        let issuer = "http://127.0.0.1:2";
        let person = |sid: Option<&str>| crate::caller::Identity {
            idp_session: sid.map(str::to_owned),
            ..world.person("alice@corp.example")
        };
        let sub = Some(person(None).subject);
        let logout = |sub: Option<String>, sid: Option<&str>| LoggedOut {
            sub,
            sid: sid.map(str::to_owned),
            jti: "j".to_owned(),
            until: 0,
        };
        let by_sid = logout(sub.clone(), Some("s1"));
        assert!(by_sid.ends(&person(Some("s1")), issuer));
        assert!(
            !by_sid.ends(&person(Some("s2")), issuer),
            "another IdP session"
        );
        assert!(
            by_sid.ends(&person(None), issuer),
            "a session whose ID token named no IdP session: by its subject"
        );
        assert!(!logout(None, Some("s1")).ends(&person(None), issuer));
        let by_sub = logout(sub.clone(), None);
        assert!(by_sub.ends(&person(Some("s2")), issuer) && by_sub.ends(&person(None), issuer));
        assert!(
            !by_sub.ends(&person(None), "https://other.test"),
            "another issuer"
        );
        let bob = crate::caller::Identity {
            idp_session: None,
            ..world.person("bob@corp.example")
        };
        assert!(!by_sid.ends(&bob, issuer) && !by_sub.ends(&bob, issuer));
    }

    #[test]
    fn a_return_address_too_long_for_a_cookie_loses_its_query_then_its_path() {
        let short = "https://app.test/a?b=c".to_owned();
        assert_eq!(within_cookie(short.clone()), short);
        let long_query = format!("https://app.test/board?q={}", "x".repeat(4000));
        assert_eq!(within_cookie(long_query), "https://app.test/board");
        let long_path = format!("https://app.test/{}?q=1", "p".repeat(4000));
        assert_eq!(within_cookie(long_path), "https://app.test/");
        assert_eq!(within_cookie(format!("/{}", "p".repeat(4000))), "/");
        // The sealed cookie of the longest return address fits a browser's 4096 bytes.
        let sealer = Sealer::random();
        let pending = Pending {
            pkce_verifier: "v".repeat(43),
            nonce: "n".repeat(43),
            return_to: "r".repeat(MAX_RETURN_TO),
            redirect_uri: format!("https://{}/.portcullis/callback", "h".repeat(253)),
            created: u64::MAX,
            provider: Some("p".repeat(16)),
        };
        let plain = serde_json::to_vec(&pending).unwrap_or_default();
        let sealed = sealer.seal(b"state", &plain);
        let name = pending_cookie_name("portcullis_signin", "state");
        let line = format!(
            "{name}={sealed}; Path=/.portcullis/callback; HttpOnly; SameSite=Lax; Max-Age=600; Secure"
        );
        assert!(line.len() < 4096, "{} bytes", line.len());
    }

    #[test]
    fn few_refreshes_ask_the_idp_at_once_and_one_finds_out_whether_it_is_back() {
        let oidc = Oidc::new(Arc::new(Kept::default()));
        let now = now_unix();
        // An IdP answering: four at once, the fifth goes on without asking.
        let asking: Vec<_> = (0..MAX_REFRESHES_ASKING)
            .map(|_| oidc.asking(now).expect("leave to ask"))
            .collect();
        assert!(oidc.asking(now).is_none(), "a fifth refresh asked the IdP");
        drop(asking);
        // It failed to answer, and the pause is over: one finds out, the others wait for it.
        oidc.refresh_backoff
            .store(MIN_REFRESH_BACKOFF, Ordering::Relaxed);
        oidc.refresh_paused_until.store(now, Ordering::Relaxed);
        let probe = oidc.asking(now).expect("one finds out");
        assert!(probe.probe.is_some());
        assert!(
            oidc.asking(now).is_none(),
            "two asked an IdP that may be down"
        );
        assert!(oidc.refresh_paused(now));
        // Gone without an answer (its request went away): the next one finds out.
        drop(probe);
        assert!(!oidc.refresh_paused(now));
        assert!(oidc.asking(now).is_some_and(|next| next.probe.is_some()));
    }
}
