//! Who is calling: browser sessions (OpenID Connect sign-in) and bearer JWTs (machines and
//! agents), and Portcullis' own sign-in endpoints under `/.portcullis/`.
//!
//! - [`Auth::authenticate`] turns a request into an [`Authentication`] from memory only: a
//!   session cookie looked up in [`sessions::Sessions`], or a bearer JWT verified against its
//!   issuer's cached keys. Whether that caller gets in is the gate's question
//!   ([`crate::gate`]), not this module's.
//! - [`endpoints`] serves `/.portcullis/sign_in`, `callback`, `sign_out`,
//!   `backchannel_logout` and `me`, and starts a sign-in when the gate asks for one.

pub mod bounded;
pub mod endpoints;
pub mod jwt;
pub mod oidc;
pub mod once;
pub mod redirect;
pub mod sealed;
pub mod sessions;
pub mod verified;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::header;
use pingora::http::RequestHeader;
use serde::Deserialize;

use portcullis_config::{CaBundle, Config, Credential, JwtIssuer, JWKS_REFRESH};

use self::jwt::{algorithm, Jwks, JwtError, NumericDate};
use self::oidc::{Oidc, Refreshed};
use self::sessions::{Kept, Sessions};
use self::verified::Verified;
use crate::audit::Audit;
use crate::caller::{Actor, Caller, Machine, Principal};
use crate::gate::Presented;
use crate::state::Runtime;

/// Largest `Cookie` header (all of them together) read when looking for the session.
const MAX_COOKIE_BYTES: usize = 8 * 1024;
/// Cookies of the session's name looked up at most (each costs a hash and a lookup): a
/// planted one, a stale one, and the session.
const MAX_SESSION_COOKIES: usize = 4;

/// How a request came: over TLS or not, at which local address, for which host (lower case,
/// without port: as routes are found).
#[derive(Clone, Copy)]
pub struct Arrival<'a> {
    pub tls: bool,
    pub local: Option<SocketAddr>,
    pub host: &'a str,
}

/// Why a bearer token sent over plain HTTP off loopback is refused, unread.
pub(crate) const IN_CLEAR: &str =
    "it was sent over plain HTTP off loopback, crossing the network in clear \
                        (for anyone on the way to replay): send it over HTTPS";

/// Authentication state that outlives configuration reloads.
pub struct Auth {
    pub oidc: Arc<Oidc>,
    directory: Arc<portcullis_scim::store::Directory>,
    pub sessions: Sessions,
    /// Key sets of the bearer-token issuers, by what identifies them: the issuer and its
    /// configured `jwks_uri` (a reload that changes the URI gets a key set of its own).
    issuers: DashMap<KeySetId, Arc<Jwks>>,
    /// When fetching a key set for the first time last failed.
    issuer_failures: DashMap<KeySetId, std::time::Instant>,
    /// Held while a key set is fetched for the first time: the requests that arrive meanwhile
    /// wait for that fetch instead of each fetching (a cold start under load would send the
    /// IdP a discovery and a key set request per request, and be rate-limited for it).
    first_fetches: DashMap<KeySetId, Arc<tokio::sync::Mutex<()>>>,
    /// Bearer tokens already verified.
    pub verified: Verified,
    http: reqwest::Client,
    /// Where sign-ins, sign-outs and refused sign-ins are recorded.
    audit: Arc<Audit>,
}

/// An issuer's key set: the issuer, its `jwks_uri` (`None` for the one its discovery
/// document names), and the CA its endpoints are trusted by.
type KeySetId = (String, Option<String>, TrustedBy);

fn key_set_id(issuer: &JwtIssuer) -> KeySetId {
    let JwtIssuer {
        issuer,
        jwks_uri,
        tls_ca,
        ..
    } = issuer;
    (issuer.clone(), jwks_uri.clone(), TrustedBy(tls_ca.clone()))
}

/// The CA an issuer's endpoints are trusted by (`None` for the bundled roots), compared whole
/// (at once where it is the same configuration's) but hashed by its count of certificates
/// only: a bundle may be large, and the key sets are few.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TrustedBy(Option<CaBundle>);

impl std::hash::Hash for TrustedBy {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_ref().map(|ca| ca.len()).hash(state);
    }
}

/// The client every call to an identity provider goes through: it never follows a redirect
/// (SSRF), is bounded in time, trusts `ca` instead of the bundled roots where one is given
/// (`tls_ca`), and goes through no proxy but the environment's for https ([`https_proxy`]).
pub(crate) fn idp_client(ca: Option<&CaBundle>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .no_proxy();
    if let Some(proxy) = https_proxy(ca.is_some())? {
        builder = builder.proxy(proxy);
    }
    if let Some(ca) = ca {
        builder = builder.tls_built_in_root_certs(false);
        for der in ca.iter() {
            let certificate = reqwest::Certificate::from_der(der)
                .map_err(|e| format!("a certificate of tls_ca: {e}"))?;
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The proxy the environment names for https (`HTTPS_PROXY`, else `ALL_PROXY` as curl reads
/// it; each in upper case, else lower, as Go reads them), for any host but this machine and those
/// `NO_PROXY` names: a tunnel, whose TLS is checked end to end. Plain http goes to this machine
/// only (see `portcullis_config::check_fetch_url`), never through a proxy, which would see the
/// client secret and could answer for the IdP.
///
/// With `tls_ca` (an IdP behind a private CA), a proxy reached over TLS is refused: the client
/// would check its certificate against that CA, not the roots it is under.
fn https_proxy(tls_ca: bool) -> Result<Option<reqwest::Proxy>, String> {
    // One that holds no UTF-8 text is refused, not taken as unset: calls would go direct.
    let named = |names: &[&'static str]| {
        for &name in names {
            match std::env::var(name) {
                Ok(value) if !value.is_empty() => return Ok(Some((name, value))),
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("{name} in the environment is not UTF-8 text"))
                }
                _ => {}
            }
        }
        Ok(None)
    };
    let Some((name, url)) = named(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])?
    else {
        return Ok(None);
    };
    proxy_check(name, &url, tls_ca)?;
    let proxy = reqwest::Proxy::https(url.as_str())
        .map_err(|_| format!("{name} in the environment is not a proxy's URL"))?;
    let besides = named(&["NO_PROXY", "no_proxy"])?.map(|(_, hosts)| hosts);
    let direct = format!("localhost,127.0.0.0/8,::1,{}", besides.unwrap_or_default());
    Ok(Some(proxy.no_proxy(reqwest::NoProxy::from_string(&direct))))
}

/// Whether the proxy `url` (named by the variable `name`) is one calls to an IdP go through:
/// an HTTP one, as this build speaks no SOCKS (which would be taken for HTTP and fail every call
/// unclearly), and not one reached over TLS beside `tls_ca`. (Its value is not quoted: a
/// proxy's URL may hold its password.)
fn proxy_check(name: &str, url: &str, tls_ca: bool) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    let is = |name: &str| scheme.is_some_and(|s| s.eq_ignore_ascii_case(name));
    if scheme.is_some() && !is("http") && !is("https") {
        return Err(format!(
            "{name} in the environment names a proxy other than an http:// or https:// one, \
             which calls to identity providers do not go through"
        ));
    }
    if tls_ca && is("https") {
        return Err(format!(
            "{name} in the environment names an https:// proxy, whose certificate would be \
             checked against this issuer's tls_ca: name an http:// one (the tunnel carries the \
             issuer's own TLS)"
        ));
    }
    Ok(())
}

/// What a request presented, once looked at.
#[derive(Debug, Clone)]
pub enum Authentication {
    /// No credential the route takes.
    Nothing,
    /// A credential that did not verify: an unknown, expired or ended session (`refused_token`
    /// `None`), or a bearer token, refused for the reason `refused_token` gives (which never
    /// repeats the token); `keys_unavailable` when it could not be verified because its
    /// issuer's keys could not be had (Portcullis' trouble, not the token's).
    Invalid {
        refused_token: Option<String>,
        keys_unavailable: bool,
    },
    Caller(Caller),
}

impl Authentication {
    /// What the gate is shown.
    pub fn presented(&self) -> Presented<'_> {
        match self {
            Authentication::Nothing => Presented::Nothing,
            Authentication::Invalid { refused_token, .. } => Presented::Invalid {
                bearer: refused_token.is_some(),
            },
            Authentication::Caller(caller) => Presented::Caller(caller.principal()),
        }
    }

    pub fn caller(&self) -> Option<&Caller> {
        match self {
            Authentication::Caller(caller) => Some(caller),
            _ => None,
        }
    }

    /// Why a bearer token was refused, if one was.
    pub fn refused_token(&self) -> Option<&str> {
        match self {
            Authentication::Invalid { refused_token, .. } => refused_token.as_deref(),
            _ => None,
        }
    }

    /// Whether a bearer token went unverified because its issuer's keys could not be had.
    pub fn keys_unavailable(&self) -> bool {
        matches!(
            self,
            Authentication::Invalid {
                keys_unavailable: true,
                ..
            }
        )
    }
}

/// The answer to a bearer token that could not be checked because its issuer's keys could not
/// be had: 503, in JSON as a bearer client's other answers, to try again once the keys may be
/// fetched again ([`jwt::REFETCH_AFTER`]); not `invalid_token`, which has a client throw a
/// good token away.
pub fn keys_unavailable() -> crate::reply::Reply {
    let body = serde_json::json!({
        "error": "temporarily_unavailable",
        "error_description": "the token's issuer's keys cannot be had just now; try again",
    });
    let retry = jwt::REFETCH_AFTER.as_secs().to_string();
    crate::reply::Reply::json(http::StatusCode::SERVICE_UNAVAILABLE, &body)
        .header(http::header::RETRY_AFTER, retry)
}

#[derive(Deserialize)]
struct MachineClaims {
    sub: String,
    exp: NumericDate,
    #[serde(default)]
    iat: Option<NumericDate>,
    #[serde(default)]
    aud: Audiences,
    /// The marks of an ID token (see [`not_an_access_token`]).
    #[serde(default)]
    nonce: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    at_hash: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    c_hash: Option<serde::de::IgnoredAny>,
    /// Keycloak's kind of token, in the payload: `ID` or `Bearer`.
    #[serde(default)]
    typ: Option<String>,
    /// The scopes an access token grants, which an ID token does not carry (app `roles` it
    /// may: Entra ID's do). Entra's `scp` is read in `marks`: a field of this struct would
    /// take it before the flattened one sees it.
    #[serde(default)]
    scope: Option<serde::de::IgnoredAny>,
    /// Entra ID's tenant, in its ID and access tokens alike.
    #[serde(default)]
    tid: Option<serde::de::IgnoredAny>,
    /// A logout token's.
    #[serde(default)]
    events: Option<serde::de::IgnoredAny>,
    /// RFC 7800: a token bound to a key (DPoP, RFC 9449; mutual TLS, RFC 8705), which only
    /// its holder's proof makes worth anything.
    #[serde(default)]
    cnf: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(flatten)]
    marks: ClientTokenMarks,
    /// A list of names, or anything else (one name as a string): then none is taken, and the
    /// token speaks of groups it does not list (see [`groups_unlisted`]).
    #[serde(default)]
    groups: Option<serde_json::Value>,
    /// Entra ID's overage: where the groups would have been, past 200 (see
    /// [`groups_unlisted`]).
    #[serde(default, rename = "_claim_names")]
    claim_names: Option<serde_json::Value>,
    #[serde(default)]
    hasgroups: Option<serde_json::Value>,
    #[serde(default)]
    email: Option<String>,
    /// A boolean, or a string saying one (as Apple's and Amazon Cognito's tokens word it).
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    /// RFC 8693 §4.1: the actor of a delegated token, a JSON object.
    #[serde(default)]
    act: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A token's `aud`: one string or several.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audiences {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audiences {
    fn contains(&self, audience: &str) -> bool {
        match self {
            Audiences::None => false,
            Audiences::One(one) => one == audience,
            Audiences::Many(many) => many.iter().any(|a| a == audience),
        }
    }
}

/// Why a verified token is not an access token, if it is not: a logout token (its `events`),
/// a token bound to a key, or an ID token, of any sign-in. An ID token verifies as an access
/// token where an issuer's audiences include a client that signs people in (an Entra ID app
/// registration that is the API and a single-page app too), and it is no credential to
/// present: it travels through browsers (`id_token_hint`), logs and other services, and
/// outlives its sign-in. It is known by what only ID tokens carry:
/// - `nonce` (OpenID Connect Core §2; Portcullis asks for one with every sign-in), except
///   beside the scopes only an access token grants (`scope`, `scp`): Azure AD B2C's and older
///   Keycloak's access tokens copy the sign-in's nonce;
/// - `at_hash` or `c_hash` (§3.1.3.6, §3.3.2.11);
/// - Keycloak's `typ` `ID`;
/// - Entra ID's tenant (`tid`) without the client an access token always names (`azp` in
///   v2.0 tokens, `appid` in v1.0).
///
/// An ID token with no nonce, `at_hash` or `c_hash`, from a provider other than Entra ID or
/// Keycloak, carries no such mark: it is told apart only by its audience.
fn not_an_access_token(claims: &MachineClaims) -> Option<&'static str> {
    if claims.events.is_some() {
        return Some("it is a logout token (events)");
    }
    // RFC 9449 §7.2: a bound token is not to be taken as a bearer token, and Portcullis checks
    // no proof of possession: sent as `Bearer`, it may be a stolen one.
    if claims.cnf.is_some() {
        return Some("it is bound to a key (cnf) whose possession Portcullis cannot check");
    }
    let typ = claims.typ.as_deref();
    if typ == Some("ID") {
        return Some("it is an ID token (typ ID), not an access token");
    }
    let grants = claims.scope.is_some() || claims.marks.scp.is_some();
    if claims.nonce.is_some() && !grants {
        return Some("it is an ID token of a sign-in (nonce), not an access token");
    }
    if claims.at_hash.is_some() || claims.c_hash.is_some() {
        return Some("it is an ID token (at_hash or c_hash), not an access token");
    }
    if claims.tid.is_some() && claims.azp.is_none() && claims.marks.appid.is_none() {
        return Some(
            "it is an Entra ID token (tid, and neither azp nor appid), not an access token",
        );
    }
    None
}

/// The current actor of a delegated token's `act` claim; one without a string `sub` names
/// nobody, and the token is refused.
fn actor(
    act: &serde_json::Map<String, serde_json::Value>,
    read: &[&str],
) -> Result<Actor, JwtError> {
    let subject = act
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| JwtError::Invalid("the act claim has no sub".into()))?;
    let mut claims = crate::caller::Claims::new();
    crate::caller::add_string_claims(&mut claims, act, read);
    Ok(Actor {
        subject: subject.to_owned(),
        claims,
    })
}

/// The claims by which issuers mark a token they gave a client for itself, not for a person.
#[derive(Debug, Default, Deserialize)]
pub struct ClientTokenMarks {
    /// Okta's client id.
    #[serde(default)]
    cid: Option<String>,
    /// Entra ID's (v1) client id.
    #[serde(default)]
    appid: Option<String>,
    /// Entra ID's object id: an app-only token's `sub` and `oid` are both its service
    /// principal's.
    #[serde(default)]
    oid: Option<String>,
    /// The scopes a person delegated: an Entra ID token that has them is a person's, never
    /// an app-only one (Azure AD B2C's carry a person's `sub` and `oid`, the same id).
    #[serde(default)]
    scp: Option<serde::de::IgnoredAny>,
    /// Entra ID's optional claim: `app` for an app-only token, `user` for a person's.
    #[serde(default)]
    idtyp: Option<String>,
    /// Auth0's grant type: `client-credentials`; a list of grants (`["refresh_token",
    /// "password"]`) in a token a refresh gave, always a person's.
    #[serde(default)]
    gty: Option<serde_json::Value>,
}

/// Whether a token (or UserInfo) speaks of groups it does not list, which no `token_groups`
/// rule may then judge on: Entra ID's overage, past 200 groups in a JWT (`_claim_names` names
/// where `groups` would be, or `hasgroups: true`), or a `groups` claim that is no list. `get`
/// gives a claim by name.
pub fn groups_unlisted(get: impl Fn(&str) -> Option<serde_json::Value>) -> bool {
    get("_claim_names").is_some_and(|names| names.get("groups").is_some())
        || get("hasgroups") == Some(serde_json::Value::Bool(true))
        || get("groups").is_some_and(|groups| string_list(&groups).is_none())
}

/// Whether a flag claim (`email_verified`) says true: `true` or `"true"` (as sign-in reads an
/// ID token's); anything else says false.
fn said_true(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Bool(flag) => *flag,
        serde_json::Value::String(word) => word == "true",
        _ => false,
    }
}

/// The strings of a claim that is a list of strings; `None` for anything else (a list with
/// something else in it too: a group left out of what a deny rule sees would let its members
/// past it).
pub fn string_list(value: &serde_json::Value) -> Option<Vec<String>> {
    let list = value.as_array()?;
    list.iter()
        .map(|name| name.as_str().map(str::to_owned))
        .collect()
}

/// Whether an access token was given to a client for itself (the client-credentials grant),
/// rather than to a client acting for a person. Each issuer marks this its own way:
/// - RFC 9068 (oidc-provider, and others that follow it): `sub` is the client's id
///   (`client_id`, or `azp`);
/// - Okta: `sub` equals `cid`;
/// - Microsoft Entra ID: `idtyp` is `app`, or `sub` equals `oid` (v2; a token with delegated
///   scopes, `scp`, is a person's: Azure AD B2C's have `sub` = `oid`) or `appid` (v1);
/// - Auth0: `gty` is `client-credentials`.
///
/// A token without any of these marks is a person's.
pub fn is_client_token(
    sub: &str,
    client_id: Option<&str>,
    azp: Option<&str>,
    marks: &ClientTokenMarks,
) -> bool {
    if let Some(idtyp) = &marks.idtyp {
        return idtyp == "app";
    }
    [
        client_id,
        azp,
        marks.cid.as_deref(),
        marks.appid.as_deref(),
        marks.oid.as_deref().filter(|_| marks.scp.is_none()),
    ]
    .into_iter()
    .flatten()
    .any(|id| id == sub)
        || marks.gty.as_ref().and_then(serde_json::Value::as_str) == Some("client-credentials")
}

/// Why `config` no longer takes the token `machine` came with as it was taken, if it does not:
/// its issuer must still be one of `[[jwt_issuers]]`, still take every audience it was taken
/// for, from the same key set fetched under the same CA, with the token's algorithm and no
/// less `iat_backdate`, and still publish the key that signed it. Judged again for open
/// connections (at least once a second), so a reload that stops trusting an issuer, or a key
/// the issuer withdraws, ends the connections its tokens opened (a new request verifies
/// afresh).
pub fn no_longer_takes(config: &Config, machine: &Machine) -> Option<&'static str> {
    let Some(issuer) = config
        .jwt_issuers
        .iter()
        .find(|issuer| issuer.issuer == machine.issuer)
        .filter(|issuer| {
            machine
                .audiences
                .iter()
                .all(|a| issuer.audiences.contains(a))
        })
    else {
        return Some(
            "the token's issuer is no longer configured to take it (removed, or its audiences \
             changed)",
        );
    };
    let signed = machine.signed.as_ref()?;
    if issuer.jwks_uri != signed.jwks_uri {
        Some("the token's issuer is now configured with another key set (jwks_uri)")
    } else if issuer.tls_ca != signed.tls_ca {
        Some("the token's issuer is now trusted by another CA (tls_ca)")
    } else if issuer.iat_backdate.as_secs() < signed.iat_backdate.as_secs() {
        // It was taken as issued earlier than the issuer now dates its tokens: it may be from
        // before its user's or agent's record was made anew. (A lowered `leeway` ends only
        // tokens past it: see [`expires_under`].)
        Some("the token's issuer now dates its tokens more strictly (iat_backdate)")
    } else if !issuer
        .algorithms
        .iter()
        .any(|alg| algorithm(*alg) == signed.alg)
    {
        Some("the token's algorithm is no longer allowed for its issuer")
    } else if !signed
        .set
        .publishes(signed.kid.as_deref(), signed.alg, &signed.key)
    {
        Some("the token's issuer no longer publishes the key that signed it")
    } else {
        None
    }
}

/// When `machine`'s token expires as its issuer is configured now: its `exp` and the `leeway`
/// it was taken with, or a lower one a reload has set since (a raised one gives it no more).
pub fn expires_under(issuers: &[JwtIssuer], machine: &Machine) -> u64 {
    let Some(signed) = &machine.signed else {
        return machine.expires;
    };
    let had = signed.leeway.as_secs();
    let now = issuers
        .iter()
        .find(|issuer| issuer.issuer == machine.issuer)
        .map_or(had, |issuer| issuer.leeway.as_secs().min(had));
    machine.expires.saturating_sub(had - now)
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: String,
}

/// Whether `token` says it is a bearer token for Portcullis: a JWT of one of its
/// `[[jwt_issuers]]` for one of that issuer's audiences. Read without verifying: it decides
/// only that the token is not passed on to an upstream (which could replay it where
/// Portcullis takes it).
pub fn meant_for_portcullis(config: &Config, token: &str) -> bool {
    addressed(token).is_some_and(|claims| {
        config.jwt_issuers.iter().any(|issuer| {
            issuer.issuer == claims.iss && issuer.audiences.iter().any(|a| claims.aud.contains(a))
        })
    })
}

/// Whom a JWT says it is from and for, read without verifying.
#[derive(Deserialize)]
struct Addressed {
    iss: String,
    #[serde(default)]
    aud: Audiences,
}

fn addressed(token: &str) -> Option<Addressed> {
    let payload = token
        .split('.')
        .nth(1)
        .filter(|_| jwt::is_compact_jws(token))?;
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Auth {
    /// Over `directory`, whose entries `kept` holds (see [`sessions::Kept`]).
    pub fn new(
        directory: Arc<portcullis_scim::store::Directory>,
        kept: Arc<Kept>,
        audit: Arc<Audit>,
    ) -> Result<Self, String> {
        let http = idp_client(None)?;
        Ok(Self {
            oidc: Arc::new(Oidc::new(kept.clone())),
            sessions: Sessions::new(kept, directory.clone()),
            directory,
            issuers: DashMap::new(),
            issuer_failures: DashMap::new(),
            first_fetches: DashMap::new(),
            verified: Verified::default(),
            http,
            audit,
        })
    }

    /// What `req`, come as `at` says, presents to a route accepting `accept`.
    pub async fn authenticate(
        &self,
        runtime: &Runtime,
        accept: &[Credential],
        req: &RequestHeader,
        at: Arrival<'_>,
        now: u64,
    ) -> Authentication {
        let Arrival { tls, local, host } = at;
        let config = &runtime.config;
        if accept.contains(&Credential::Bearer) {
            if let Some(token) = bearer_token(req) {
                // As a SCIM token or a session cookie would be: it has crossed the network in
                // clear, for anyone on the way to replay (elsewhere too: a route leaving out
                // `audiences` takes any of its issuer's).
                if !runtime.carries_credentials(local, tls) {
                    return Authentication::Invalid {
                        refused_token: Some(IN_CLEAR.to_owned()),
                        keys_unavailable: false,
                    };
                }
                // A request that presents a token is judged by it, never by a cookie too. A
                // token verified before is found at once; verifying one is awaited boxed (as
                // is a refresh, below): its state would make every request's larger.
                let hash = Verified::hash(token);
                let epoch = runtime.tokens_epoch;
                let verified = match self.verified.get(&hash, now, epoch) {
                    Some(caller) => Ok(caller),
                    None => Box::pin(self.verify_bearer(config, epoch, token, hash, now)).await,
                };
                return match verified {
                    Ok(caller) => Authentication::Caller(caller),
                    Err(why) => Authentication::Invalid {
                        keys_unavailable: matches!(why, JwtError::KeysUnavailable),
                        refused_token: Some(why.to_string()),
                    },
                };
            }
        }
        if !accept.contains(&Credential::Session) {
            return Authentication::Nothing;
        }
        let Some(oidc) = config.oidc.as_ref() else {
            return Authentication::Nothing;
        };
        // Only the exact name: on TLS without a cookie domain that is the `__Host-` one, which
        // no sibling host and no plain-http page can have set. Of several, the one of a session
        // that vouches: a stale or planted one sent first must not send the person round the
        // sign-in for ever.
        let name = session_cookie_name(oidc, tls);
        let mut ids = cookies(req, &name).peekable();
        if ids.peek().is_none() {
            return Authentication::Nothing;
        }
        // Sent in clear where this listener takes no credentials, as a token above: not read,
        // as no sign-in happens there either (one begun while `allow_plain_http` was on, say).
        if !runtime.carries_credentials(local, tls) {
            return Authentication::Nothing;
        }
        let invalid = Authentication::Invalid {
            refused_token: None,
            keys_unavailable: false,
        };
        let held = ids.take(MAX_SESSION_COOKIES).find_map(|id| {
            let (key, session) = self.sessions.get(id)?;
            (session.vouches(now, oidc) && session.issued_on(host)).then_some((id, key, session))
        });
        let Some((id, key, session)) = held else {
            return invalid;
        };
        // Boxed, as verifying a token is: its state would make every request's larger.
        if let Some(turn) = self.refresh_turn(oidc, &session, now) {
            if !Box::pin(self.refresh_now(config, oidc, id, key, &session, turn, now)).await {
                return invalid;
            }
        }
        session.touch(now);
        Authentication::Caller(Caller::Person {
            session: key,
            identity: session.identity.clone(),
        })
    }

    /// When the refresh with the IdP of the session the cookie `id` names fell due, if it has
    /// and the session vouches and no refresh of it is under way (for a stream, which makes
    /// no requests: see [`Auth::refresh_for_stream`]).
    pub fn refresh_due(&self, config: &Config, id: &str, now: u64) -> Option<u64> {
        let oidc = config.oidc.as_ref().filter(|oidc| oidc.refresh)?;
        let (_, session) = self.sessions.get(id)?;
        if !session.vouches(now, oidc) {
            return None;
        }
        self.refresh_turn(oidc, &session, now)
            .map(|turn| turn.state.due)
    }

    /// Refreshes the session of a stream's person (its cookie `id`) with the IdP when due, as
    /// their next request would: a refusal, or other groups where a route judges them, ends
    /// the session, and so the stream (the watcher cuts it). The session is not touched: a
    /// stream is no activity of its person. With a shared store, what other replicas wrote is
    /// read first: one that refreshed the session since leaves nothing to do (a refresh token
    /// spent twice is taken for a stolen one by IdPs that rotate them).
    pub async fn refresh_for_stream(&self, config: &Config, id: &str, now: u64) {
        let Some(oidc) = config.oidc.as_ref() else {
            return;
        };
        if let Err(why) = self.sessions.catch_up().await {
            tracing::warn!("stream's session not refreshed: cannot read the shared store: {why}");
            return;
        }
        let Some((key, session)) = self.sessions.get(id) else {
            return;
        };
        if !session.vouches(now, oidc) {
            return;
        }
        let Some(turn) = self.refresh_turn(oidc, &session, now) else {
            return;
        };
        self.refresh_now(config, oidc, id, key, &session, turn, now)
            .await;
    }

    /// The session's turn to refresh with the IdP, with its refresh as it stands, when that is
    /// due: not while a refresh of it is under way (another request's, or a stream's), nor
    /// while refreshes pause after the IdP was unreachable, nor once a reload turned them off.
    fn refresh_turn<'s>(
        &self,
        oidc: &portcullis_config::OidcConfig,
        session: &'s sessions::Session,
        now: u64,
    ) -> Option<RefreshTurn<'s>> {
        // Asked of every request a session makes: its refresh token is copied only once one
        // is due, and its turn taken.
        let refreshing = session.refresh.as_ref()?;
        if !oidc.refresh || refreshing.due() > now || self.oidc.refresh_paused(now) {
            return None;
        }
        let turn = refreshing.turn.try_lock().ok()?;
        // As it stands once the turn is held: a refresh just done has moved it on.
        let state = refreshing.state();
        (state.due <= now).then_some(RefreshTurn {
            refreshing,
            turn,
            state,
        })
    }

    /// Refreshes the session `id` (its cookie's value) names with the IdP, in its `turn`, and
    /// says whether it still holds: a refusal, or other groups where a route judges them, ends
    /// it.
    #[allow(clippy::too_many_arguments)]
    async fn refresh_now(
        &self,
        config: &Config,
        oidc: &portcullis_config::OidcConfig,
        id: &str,
        key: crate::caller::SessionKey,
        session: &sessions::Session,
        turn: RefreshTurn<'_>,
        now: u64,
    ) -> bool {
        let RefreshTurn {
            refreshing,
            turn,
            state,
        } = turn;
        let opened = state.opened(id);
        let refreshed = match &opened {
            Some(opened) => {
                // The IdP's groups judge only people the directory does not know.
                let wants_groups = config.routes.iter().any(|r| r.token_groups)
                    && self.unknown_to_the_directory(config, &session.identity, now);
                (self.oidc)
                    .refresh(oidc, opened, &session.identity, wants_groups, now)
                    .await
            }
            None => Ok(Refreshed::Ended(
                "the refresh token kept for the session does not open".to_owned(),
            )),
        };
        match refreshed {
            Ok(Refreshed::Renewed(next) | Refreshed::Postponed(next)) => {
                self.sessions.refreshed(id, &key, refreshing, next)
            }
            Ok(Refreshed::Ended(_))
                if match &opened {
                    Some(used) => {
                        self.sessions
                            .refreshed_elsewhere(id, refreshing, &used.refresh_token)
                            .await
                    }
                    None => false,
                } => {}
            Ok(Refreshed::Ended(why) | Refreshed::Regrouped(why)) => {
                // The IdP no longer vouches for this person, or now gives them other
                // groups: the session ends.
                drop(turn);
                match self.sessions.end(&[key]).await {
                    Ok(()) => {
                        let who = Principal::Person(&session.identity).log_name();
                        self.audit.session(&who, "idp_ended", &why, None);
                    }
                    Err(e) => tracing::error!("cannot end the session: {e}"),
                }
                return false;
            }
            // Left to a later request.
            Ok(Refreshed::NotAsked) => {}
            // IdP outage: existing sessions keep working until it is back.
            Err(e) => tracing::warn!("session refresh postponed: {e}"),
        }
        true
    }

    /// Whether the directory knows nobody `identity` names, as the gate looks people up.
    fn unknown_to_the_directory(
        &self,
        config: &Config,
        identity: &crate::caller::Identity,
        now: u64,
    ) -> bool {
        let gate = crate::gate::Gate {
            directory: &self.directory,
            identity: &config.identity,
            jwt_issuers: &config.jwt_issuers,
            current: true,
            now,
            forwards: None,
        };
        gate.directory_view(Principal::Person(identity)).is_none()
    }

    /// Verifies a bearer token not found verified already (by its `hash`), by the rules of
    /// `config`, whose epoch is `epoch`.
    async fn verify_bearer(
        &self,
        config: &Config,
        epoch: u64,
        token: &str,
        hash: verified::TokenHash,
        now: u64,
    ) -> Result<Caller, JwtError> {
        if !jwt::is_compact_jws(token) {
            return Err(JwtError::Malformed);
        }
        // Which issuer? Read `iss` unverified only to pick the key set; everything is then
        // verified against that issuer's keys and rules.
        let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .map_err(|_| JwtError::Malformed)?;
        let claimed: IssuerOnly = serde_json::from_slice(&bytes).map_err(|_| {
            // Claims without a textual `iss` are a JWT's all the same.
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(claims) if claims.is_object() => {
                    JwtError::Invalid("it names no issuer (iss)".into())
                }
                _ => JwtError::Malformed,
            }
        })?;
        // An access token says it is one (RFC 9068: `at+jwt`) or says nothing of its type
        // (`JWT`, or no `typ`: Okta, Entra); another type (`logout+jwt`, `dpop+jwt`, a
        // `secevent+jwt`) is some other token.
        let header = jwt::decode_header(token)?;
        if let Some(typ) = header.typ.as_deref() {
            // Media types are case-insensitive (RFC 9110 §8.3.1).
            let prefix = "application/";
            let typ = match typ.get(..prefix.len()) {
                Some(head) if head.eq_ignore_ascii_case(prefix) => &typ[prefix.len()..],
                _ => typ,
            };
            // `JOSE` is RFC 7515's own (SPIFFE's JWT-SVIDs send it).
            if ["jwt", "at+jwt", "jose"]
                .iter()
                .all(|t| !typ.eq_ignore_ascii_case(t))
            {
                let why = if typ.eq_ignore_ascii_case("okta-internal-at+jwt") {
                    "it is a token of Okta's org authorization server, for Okta's own APIs \
                     (use a custom authorization server)"
                } else {
                    "its type (typ) is not an access token's"
                };
                return Err(JwtError::Invalid(why.into()));
            }
        }
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
        let jwt::Verified {
            claims,
            kid,
            alg,
            key,
        } = jwks
            .verify_keyed::<MachineClaims>(token, &validation)
            .await?;
        if let Some(why) = not_an_access_token(&claims) {
            return Err(JwtError::Invalid(why.into()));
        }
        // `iat` dates the token against its user's record (`gate::outlived`): one from the
        // future could outlast a re-activation it came before.
        if claims
            .iat
            .is_some_and(|NumericDate(iat)| iat > now.saturating_add(validation.leeway))
        {
            return Err(JwtError::Invalid(
                "it was issued in the future (iat)".into(),
            ));
        }
        // `exp` read rounded down: a token is over at the second it says (RFC 7519 §4.1.4:
        // taken only before it), also where the library checking it read a fraction up, as
        // the verified tokens' cache and the stream watcher judge it.
        let valid_until = claims.exp.0.saturating_add(validation.leeway);
        if now >= valid_until {
            return Err(JwtError::Invalid("it has expired".into()));
        }
        let for_itself = is_client_token(
            &claims.sub,
            claims.client_id.as_deref(),
            claims.azp.as_deref(),
            &claims.marks,
        );
        let read = config.identity.claims_read();
        let act = (claims.act.as_ref())
            .map(|act| actor(act, &read))
            .transpose()?;
        let caller = Caller::Machine(Arc::new(Machine {
            issuer: issuer.issuer.clone(),
            subject: claims.sub,
            // Okta names the client `cid`, Entra ID's v1 tokens `appid`.
            client_id: claims
                .client_id
                .or(claims.azp)
                .or_else(|| claims.marks.cid.clone())
                .or_else(|| claims.marks.appid.clone()),
            groups_unlisted: groups_unlisted(|name| match name {
                "_claim_names" => claims.claim_names.clone(),
                "hasgroups" => claims.hasgroups.clone(),
                "groups" => claims.groups.clone(),
                _ => None,
            }),
            groups: claims
                .groups
                .as_ref()
                .and_then(string_list)
                .unwrap_or_default(),
            audiences: issuer
                .audiences
                .iter()
                .filter(|a| claims.aud.contains(a))
                .cloned()
                .collect(),
            expires: valid_until,
            // When it was issued, where its issuer dates tokens early (Entra ID).
            issued: claims
                .iat
                .map(|NumericDate(iat)| iat.saturating_add(issuer.iat_backdate.as_secs())),
            for_itself,
            email: claims.email,
            email_verified: claims.email_verified.as_ref().map(said_true),
            // Every string claim of the (now verified) payload, for a mapping by any claim.
            claims: crate::caller::string_claims(&bytes, &read),
            act,
            signed: Some(jwt::SignedWith {
                jwks_uri: issuer.jwks_uri.clone(),
                tls_ca: issuer.tls_ca.clone(),
                leeway: issuer.leeway,
                iat_backdate: issuer.iat_backdate,
                set: jwks.clone(),
                kid,
                alg,
                key,
            }),
        }));
        let entry = verified::Entry {
            caller: caller.clone(),
            valid_until,
            jwks,
            keys,
            epoch,
        };
        self.verified.insert(hash, entry, now);
        Ok(caller)
    }

    /// Fetches again the key sets that have aged past their `jwks_refresh` (the sign-in
    /// provider's past [`JWKS_REFRESH`]), so a key an IdP withdraws stops verifying even when
    /// no token names one of its new keys. A set that cannot be fetched is kept. Each fetch
    /// is a task of its own, not waited for: an IdP that stops answering (a fetch may wait
    /// 10 s) holds up no other's refresh, now or at the next look; a set being fetched is
    /// not aged ([`Jwks::older_than`]), so not fetched twice at once.
    pub fn refresh_aged_key_sets(&self, config: &Config) {
        // And forgets again any a request under the configuration before a reload fetched
        // after that reload forgot them.
        self.keep_key_sets_of(config);
        for issuer in &config.jwt_issuers {
            let id = key_set_id(issuer);
            let Some(jwks) = self.issuers.get(&id).map(|j| j.clone()) else {
                continue; // not used yet: the first token fetches it
            };
            if jwks.older_than(issuer.jwks_refresh) {
                tokio::spawn(async move { jwks.refresh(false).await });
            }
        }
        if let Some(provider) = self.oidc.provider() {
            if provider.jwks.older_than(JWKS_REFRESH) {
                tokio::spawn(async move { provider.jwks.refresh(false).await });
            }
        }
    }

    /// Forgets the key sets of the issuers `config` no longer lists (or lists with another
    /// `jwks_uri` or `tls_ca`): nothing refreshes them while they are out, and an issuer put back must
    /// fetch its keys afresh, not verify with a set that may still hold a key its IdP has
    /// withdrawn since (after a leak, say).
    pub fn keep_key_sets_of(&self, config: &Config) {
        let listed = |id: &KeySetId| config.jwt_issuers.iter().any(|i| key_set_id(i) == *id);
        self.issuers.retain(|id, _| listed(id));
        self.issuer_failures.retain(|id, _| listed(id));
        self.first_fetches.retain(|id, _| listed(id));
    }

    async fn jwks_for(&self, issuer: &JwtIssuer) -> Result<Arc<Jwks>, JwtError> {
        let id = key_set_id(issuer);
        let known = || -> Option<Result<Arc<Jwks>, JwtError>> {
            if let Some(jwks) = self.issuers.get(&id) {
                return Some(Ok(jwks.clone()));
            }
            // While an issuer cannot be reached, don't let every request try again.
            let failed = self.issuer_failures.get(&id)?;
            (failed.elapsed() < jwt::REFETCH_AFTER).then_some(Err(JwtError::KeysUnavailable))
        };
        if let Some(known) = known() {
            return known;
        }
        let gate = self.first_fetches.entry(id.clone()).or_default().clone();
        // Once it has failed, one request at a time asks again, and the others are refused
        // meanwhile as they were while the failure was recent: an issuer that does not answer
        // would hold each of them up for its timeouts (twenty seconds), again and again.
        let _fetching = match gate.try_lock() {
            Ok(fetching) => fetching,
            Err(_) if self.issuer_failures.contains_key(&id) => {
                return Err(JwtError::KeysUnavailable)
            }
            Err(_) => gate.lock().await,
        };
        // Fetched, or failed, while this request waited.
        if let Some(known) = known() {
            return known;
        }
        match self.first_fetch(issuer).await {
            // The one every later request, and every verification remembered, uses, and the
            // only one refreshed, so that a key the issuer withdraws stops verifying.
            Ok(jwks) => Ok(self.issuers.entry(id).or_insert(jwks).value().clone()),
            Err(e) => {
                self.issuer_failures.insert(id, std::time::Instant::now());
                Err(e)
            }
        }
    }

    async fn first_fetch(&self, issuer: &JwtIssuer) -> Result<Arc<Jwks>, JwtError> {
        let http = match &issuer.tls_ca {
            None => self.http.clone(),
            Some(ca) => idp_client(Some(ca)).map_err(|e| {
                tracing::warn!(issuer = %issuer.issuer, "{e}");
                JwtError::KeysUnavailable
            })?,
        };
        let uri = match &issuer.jwks_uri {
            Some(uri) => uri.clone(),
            None => discover_jwks_uri(&http, &issuer.issuer)
                .await
                .map_err(|e| {
                    tracing::warn!(issuer = %issuer.issuer, "cannot discover the key set: {e}");
                    JwtError::KeysUnavailable
                })?,
        };
        let jwks = Arc::new(Jwks::new(uri, http));
        jwks.refresh(true).await?;
        // No key to use, and none used before: no token's key is known withdrawn (an IdP node
        // whose keys failed to load serves such a set for a moment). Asked again as after a
        // failed fetch, tokens meanwhile refused as unjudged, not as invalid.
        if !jwks.has_usable_key() {
            tracing::warn!(
                issuer = %issuer.issuer,
                "the key set has no signing key Portcullis can use; asking again in {}s",
                jwt::REFETCH_AFTER.as_secs()
            );
            return Err(JwtError::KeysUnavailable);
        }
        Ok(jwks)
    }
}

/// The `jwks_uri` of `issuer`'s discovery document, fetched with `http`.
async fn discover_jwks_uri(http: &reqwest::Client, issuer: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: String,
        jwks_uri: String,
    }
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    // With its causes: reqwest says only "error sending request" itself, not the certificate
    // it refused (a private CA wants `tls_ca`).
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| portcullis_scim::error::with_causes(&e))?
        .error_for_status()
        .map_err(|e| e.to_string())?;
    let body = bounded::body(response, bounded::MAX_RESPONSE_BYTES).await?;
    let doc: Discovery = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    // OpenID Connect Discovery §4.3: the document is the issuer's only if it says so.
    if doc.issuer != issuer {
        return Err("the discovery document names another issuer".to_owned());
    }
    portcullis_config::check_fetch_url(&doc.jwks_uri)
        .map_err(|e| format!("the discovery document's jwks_uri {e}"))?;
    Ok(doc.jwks_uri)
}

/// A session's turn to refresh with the IdP (see [`Auth::refresh_turn`]).
struct RefreshTurn<'s> {
    refreshing: &'s sessions::Refreshing,
    turn: tokio::sync::MutexGuard<'s, ()>,
    state: sessions::Refresh,
}

/// The session cookie's name: for one host only, `__Host-` prefixed on TLS; shared under a
/// `cookie_domain`, `__Secure-` prefixed when the auth host that sets it is reached over https,
/// whatever the scheme of the request that reads it.
pub fn session_cookie_name(
    oidc: &portcullis_config::OidcConfig,
    tls: bool,
) -> std::borrow::Cow<'_, str> {
    match (tls, &oidc.cookie_domain) {
        (true, None) => format!("__Host-{}", oidc.cookie_name).into(),
        // Shared with the domain's hosts, but only over TLS: no plain-HTTP answer (a sibling
        // host's, or one forged on the network) can plant a session under this name.
        (_, Some(_)) if oidc.auth_scheme == portcullis_config::Scheme::Https => {
            format!("__Secure-{}", oidc.cookie_name).into()
        }
        _ => oidc.cookie_name.as_str().into(),
    }
}

/// The `Authorization: Bearer` token, if the request has exactly one such header: all after
/// the spaces that follow the scheme (RFC 6750 §2.1: `"Bearer" 1*SP b64token`).
pub fn bearer_token(req: &RequestHeader) -> Option<&str> {
    let mut values = req.headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of an `Authorization` value `value` of the `Bearer` scheme (in any case), as
/// Portcullis reads its own tokens (SCIM's, the admin's): all after the first space, without
/// the spaces around it, as bytes (a header value may hold any byte from 0x80 up, which a
/// configured token may too). None if the value is of another scheme or holds no token.
pub fn own_bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// The values of every cookie named `name` (see [`crate::cookies`]), in the order sent, from
/// `Cookie` headers of at most `MAX_COOKIE_BYTES` in all; a value that is not text is none of
/// Portcullis' cookies.
///
/// A browser sends every cookie of a name it holds, those set for longer paths first: with a
/// cookie domain, a sibling host (or an earlier `cookie_domain`) can put one of the session's
/// name in front of the session.
pub fn cookies<'r>(req: &'r RequestHeader, name: &'r str) -> impl Iterator<Item = &'r str> {
    let values = req.headers.get_all(header::COOKIE);
    let read = !past_bound(&values);
    let headers = values.iter().filter(move |_| read).map(|v| v.as_bytes());
    crate::cookies::find_all(headers, name.as_bytes())
        .filter_map(|value| std::str::from_utf8(value).ok())
}

/// The values of every cookie named `name`, in the order sent, however many cookies the
/// request has (pingora bounds the request head as a whole): for Portcullis' own endpoints,
/// where a jar stuffed past `MAX_COOKIE_BYTES` must not hide the cookie they act on.
pub fn cookies_in_any_jar<'r>(
    req: &'r RequestHeader,
    name: &'r str,
) -> impl Iterator<Item = &'r str> + 'r {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| crate::cookies::pairs(v.as_bytes()))
        .filter(move |(n, _)| *n == name.as_bytes())
        .filter_map(|(_, value)| std::str::from_utf8(value).ok())
}

/// Whether the request's `Cookie` headers hold more than `MAX_COOKIE_BYTES` in all, past
/// which none is read: a session among them is not found, and a sign-in would not help.
///
/// Sign-ins in progress on TLS are not counted: `__Host-` cookies only this host sets, a
/// sealed return URL each, sent with every request while they last. Several tabs sent to
/// sign in at once must not hide the session the first of them comes back with.
pub fn cookies_past_bound(req: &RequestHeader) -> bool {
    past_bound(&req.headers.get_all(header::COOKIE))
}

/// (Whatever the scheme the request came by: browsers send `__Host-` cookies over TLS alone.)
/// Counted as one `Cookie` field holds them: an HTTP/2 browser's crumbs (a field each) with
/// the `; ` HTTP/1 joins them with, so that a jar is past the bound over both or neither.
fn past_bound(values: &http::header::GetAll<'_, http::HeaderValue>) -> bool {
    let (bytes, fields) = (values.iter()).fold((0usize, 0usize), |(bytes, fields), v| {
        (bytes + v.len(), fields + 1)
    });
    let total = bytes + 2 * fields.saturating_sub(1);
    total > MAX_COOKIE_BYTES && total.saturating_sub(signing_in(values, true)) > MAX_COOKIE_BYTES
}

/// The bytes of the sign-ins in progress on TLS among `values` (`Cookie` headers), up to what
/// [`endpoints::MAX_PENDING_SIGN_INS`] of them hold: not counted against the bounds on cookies
/// or on a request's head, as they never go upstream (see [`cookies_past_bound`]). Read only
/// for a request past one of those bounds.
pub fn signing_in(values: &http::header::GetAll<'_, http::HeaderValue>, tls: bool) -> usize {
    if !tls {
        return 0;
    }
    let pending = endpoints::pending_sign_ins(values).into_iter();
    let bytes: usize = pending
        .map(|(name, value)| name.len() + value.len() + 2)
        .sum();
    bytes.min(PENDING_SIGN_IN_BYTES)
}

/// What the sign-ins in progress a browser keeps may hold, at 4096 bytes (what browsers keep of
/// a cookie) each.
pub const PENDING_SIGN_IN_BYTES: usize = endpoints::MAX_PENDING_SIGN_INS * 4096;

#[cfg(test)]
mod tests {
    use super::*;

    /// An IdP's calls go through an HTTP proxy, reached in clear or over TLS (checked then
    /// against the bundled roots), but not over TLS beside `tls_ca`, and never a SOCKS one.
    #[test]
    fn an_idp_s_calls_go_through_an_http_proxy_only() {
        for url in [
            "http://p:3128",
            "HTTP://p",
            "p:3128",
            "https://p:3128",
            "Https://p",
        ] {
            assert_eq!(proxy_check("HTTPS_PROXY", url, false), Ok(()), "{url}");
        }
        for url in ["http://p:3128", "p:3128"] {
            assert_eq!(proxy_check("HTTPS_PROXY", url, true), Ok(()), "{url}");
        }
        let beside = proxy_check("https_proxy", "https://u:secret@p", true).unwrap_err();
        assert!(
            beside.starts_with("https_proxy ") && beside.contains("tls_ca"),
            "{beside}"
        );
        for url in ["socks5://u:secret@p:1080", "SOCKS5H://p", "ftp://p"] {
            let refused = proxy_check("ALL_PROXY", url, false).unwrap_err();
            assert!(refused.starts_with("ALL_PROXY "), "{refused}");
            assert!(!refused.contains(url), "{refused}");
        }
        assert!(!beside.contains("secret"), "{beside}");
    }

    #[test]
    fn id_tokens_are_known_by_what_only_they_carry() {
        let judge = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "s", "exp": 1, "aud": "api"});
            if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
                claims.extend(extra.clone());
            }
            let claims: MachineClaims = serde_json::from_value(claims).expect("claims");
            not_an_access_token(&claims)
        };
        for id_token in [
            serde_json::json!({"nonce": "n"}),
            serde_json::json!({"nonce": "n", "typ": "Bearer"}),
            serde_json::json!({"nonce": "n", "roles": ["admin"]}),
            serde_json::json!({"at_hash": "h"}),
            serde_json::json!({"c_hash": "h"}),
            serde_json::json!({"typ": "ID", "azp": "spa"}),
            // Entra ID's, v1.0 and v2.0: the tenant, no client.
            serde_json::json!({"tid": "t", "oid": "o"}),
        ] {
            assert!(judge(id_token.clone()).is_some(), "{id_token}");
        }
        for access_token in [
            serde_json::json!({}),
            serde_json::json!({"client_id": "c"}),
            // Keycloak's and Azure AD B2C's access tokens copy the sign-in's nonce.
            serde_json::json!({"typ": "Bearer", "nonce": "n", "azp": "c", "scope": "openid"}),
            serde_json::json!({"tfp": "B2C_1_signin", "nonce": "n", "azp": "c", "scp": "read"}),
            serde_json::json!({"tid": "t", "azp": "c"}),
            serde_json::json!({"tid": "t", "appid": "c"}),
        ] {
            assert_eq!(judge(access_token.clone()), None, "{access_token}");
        }
    }

    /// A claim in a shape Portcullis does not read as a list of names refuses no token: a
    /// `groups` that is one name lists none and speaks of groups it does not list; Auth0's
    /// `gty` as a list (a refreshed person's token) marks no client.
    #[test]
    fn claims_in_another_shape_still_read_as_a_token() {
        use serde_json::json;
        let read = |extra: serde_json::Value| {
            let mut claims = json!({"sub": "auth0|1", "exp": u32::MAX, "azp": "abc"});
            if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
                claims.extend(extra.clone());
            }
            serde_json::from_value::<MachineClaims>(claims)
        };
        let one = read(json!({"groups": "eng"})).expect("a token with one group as a string");
        assert_eq!(one.groups.as_ref().and_then(string_list), None);
        assert!(groups_unlisted(
            |name| (name == "groups").then(|| one.groups.clone())?
        ));
        let listed = read(json!({"groups": ["eng", "ops"]})).unwrap();
        let names = vec!["eng".to_owned(), "ops".to_owned()];
        assert_eq!(listed.groups.as_ref().and_then(string_list), Some(names));
        // A list with something else in it lists no group: a deny rule must see them all.
        let mixed = read(json!({"groups": ["eng", 7]})).unwrap();
        assert_eq!(mixed.groups.as_ref().and_then(string_list), None);
        assert!(groups_unlisted(
            |name| (name == "groups").then(|| mixed.groups.clone())?
        ));
        for (said, verified) in [
            (json!(true), true),
            (json!("true"), true),
            (json!("False"), false),
            (json!("TRUE"), false),
            (json!(1), false),
        ] {
            let token = read(json!({"email_verified": said})).expect("a token");
            assert_eq!(
                token.email_verified.as_ref().map(said_true),
                Some(verified),
                "{said}"
            );
        }
        let refreshed = read(json!({"gty": ["refresh_token", "password"]})).unwrap();
        assert!(!is_client_token("auth0|1", None, None, &refreshed.marks));
    }

    fn marks(
        claims: serde_json::Value,
    ) -> (String, Option<String>, Option<String>, ClientTokenMarks) {
        // Read as a verified token's claims are, with the rest of them.
        let mut whole = claims.clone();
        whole["exp"] = serde_json::json!(u32::MAX);
        let claims: MachineClaims = serde_json::from_value(whole).unwrap();
        (claims.sub, claims.client_id, claims.azp, claims.marks)
    }

    #[test]
    fn cookie_headers_beyond_the_bound_carry_no_session() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("cookie", "portcullis_session=abc")
            .unwrap();
        let cookie = |req: &RequestHeader, name: &str| cookies(req, name).next().map(str::to_owned);
        assert_eq!(cookie(&req, "portcullis_session").as_deref(), Some("abc"));
        // A sibling host that stuffs the cookie jar (cookie bombing) gets no further than a
        // sign-in: past the bound nothing is read, not even the real session.
        let padding = format!("pad={}", "x".repeat(MAX_COOKIE_BYTES));
        req.append_header("cookie", padding).unwrap();
        assert_eq!(cookie(&req, "portcullis_session").as_deref(), None);
        assert!(cookies_past_bound(&req));
        // Over HTTP/2 a browser sends each cookie as a field of its own: the same jar is past
        // the bound as in one HTTP/1 field (`; ` between them): 100 cookies of 80 bytes.
        let jar: Vec<String> = (0..100)
            .map(|i| format!("c{i:02}={}", "v".repeat(76)))
            .collect();
        let mut one = RequestHeader::build("GET", b"/", None).unwrap();
        one.append_header("cookie", jar.join("; ")).unwrap();
        let mut crumbs = RequestHeader::build("GET", b"/", None).unwrap();
        for crumb in &jar {
            crumbs.append_header("cookie", crumb).unwrap();
        }
        assert!(cookies_past_bound(&one));
        assert!(cookies_past_bound(&crumbs));

        // Many sign-ins in progress on TLS (this host's own `__Host-` cookies) do not count;
        // the same names without the prefix, which any sibling host can set, do.
        let pending = |prefix: &str| {
            (0..20)
                .map(|i| format!("{prefix}_{i:016x}={}", "s".repeat(600)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        for (prefix, counted) in [
            (endpoints::HOST_BROWSER_COOKIE, false),
            (endpoints::BROWSER_COOKIE, true),
        ] {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            req.append_header(
                "cookie",
                format!("portcullis_session=abc; {}", pending(prefix)),
            )
            .unwrap();
            assert_eq!(cookies_past_bound(&req), counted, "{prefix}");
            let found = cookie(&req, "portcullis_session");
            assert_eq!(found.as_deref(), (!counted).then_some("abc"), "{prefix}");
        }
    }

    #[test]
    fn each_issuer_s_mark_of_a_client_s_own_token_is_read_and_a_person_s_token_is_not_one() {
        use serde_json::json;
        let cases = [
            // RFC 9068 (oidc-provider): client credentials have sub = client_id.
            (
                json!({"sub": "build-agent", "client_id": "build-agent"}),
                true,
            ),
            (json!({"sub": "alice", "client_id": "portcullis"}), false),
            // Okta: sub = cid for client credentials; a person's sub is their login.
            (json!({"sub": "0oa1", "cid": "0oa1"}), true),
            (
                json!({"sub": "alice@corp.example", "cid": "0oa1", "uid": "00u1"}),
                false,
            ),
            // Entra ID: idtyp when configured, else sub = oid (v2) or appid (v1).
            (
                json!({"sub": "sp-1", "oid": "sp-1", "azp": "app-1", "idtyp": "app"}),
                true,
            ),
            (json!({"sub": "sp-1", "oid": "sp-1", "azp": "app-1"}), true),
            (
                json!({"sub": "sp-1", "oid": "sp-1", "azp": "app-1", "roles": ["Reports.Read"]}),
                true,
            ),
            (
                json!({"sub": "pairwise", "oid": "user-1", "azp": "app-1"}),
                false,
            ),
            (
                json!({"sub": "pairwise", "oid": "user-1", "idtyp": "user"}),
                false,
            ),
            // idtyp decides alone: a person's token is not an app's because an id repeats.
            (json!({"sub": "x", "oid": "x", "idtyp": "user"}), false),
            (json!({"sub": "app-1", "appid": "app-1"}), true),
            // Azure AD B2C: a person's token with their object id as both sub and oid, and
            // the scopes they delegated.
            (
                json!({"sub": "u-1", "oid": "u-1", "azp": "app-1", "scp": "read", "tfp": "B2C_1_signin"}),
                false,
            ),
            // Auth0: gty.
            (
                json!({"sub": "abc@clients", "azp": "abc", "gty": "client-credentials"}),
                true,
            ),
            (
                json!({"sub": "auth0|1", "azp": "abc", "gty": "password"}),
                false,
            ),
            // A person's token that a refresh gave: the grants it came by.
            (
                json!({"sub": "auth0|1", "azp": "abc", "gty": ["refresh_token", "password"]}),
                false,
            ),
            // No marks at all: a person's.
            (json!({"sub": "someone"}), false),
        ];
        for (claims, client) in cases {
            let (sub, client_id, azp, marks) = marks(claims.clone());
            assert_eq!(
                is_client_token(&sub, client_id.as_deref(), azp.as_deref(), &marks),
                client,
                "{claims}"
            );
        }
    }

    /// An IdP on loopback answering every request with `body` (given its address) after
    /// `delay`; counts them.
    async fn idp_answering(
        body: impl FnOnce(std::net::SocketAddr) -> String,
        delay: Duration,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        idp_answering_in_turn(|address| vec![body(address)], delay).await
    }

    /// As [`idp_answering`], with the bodies in turn (the last one ever after).
    async fn idp_answering_in_turn(
        bodies: impl FnOnce(std::net::SocketAddr) -> Vec<String>,
        delay: Duration,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        let bodies: Arc<[String]> = bodies(address).into();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (counted, bodies) = (counted.clone(), bodies.clone());
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    let turn = counted.fetch_add(1, Ordering::SeqCst);
                    let body = &bodies[turn.min(bodies.len() - 1)];
                    tokio::time::sleep(delay).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        (address, fetches)
    }

    #[tokio::test]
    async fn a_token_is_taken_again_only_as_it_was_taken() {
        let world = crate::testing::World::new();
        let mut machine = crate::testing::machine("build-bot");
        machine.audiences = vec!["api".to_owned()];
        let why = |change: &dyn Fn(&mut JwtIssuer), machine: &Machine| {
            let mut config = world.config.clone();
            change(&mut config.jwt_issuers[0]);
            no_longer_takes(&config, machine)
        };
        let unchanged = |_: &mut JwtIssuer| {};
        let audiences = |audiences: &'static [&'static str]| {
            move |issuer: &mut JwtIssuer| {
                issuer.audiences = audiences.iter().map(|a| a.to_string()).collect()
            }
        };
        let no_longer = Some(
            "the token's issuer is no longer configured to take it (removed, or its audiences \
             changed)",
        );
        assert_eq!(why(&unchanged, &machine), None);
        assert_eq!(
            why(&audiences(&["api", "billing"]), &machine),
            None,
            "a widened issuer"
        );
        assert_eq!(
            why(&audiences(&["billing"]), &machine),
            no_longer,
            "a narrowed issuer"
        );
        let another = |issuer: &mut JwtIssuer| issuer.issuer = "https://other.example".to_owned();
        assert_eq!(why(&another, &machine), no_longer, "another issuer");
        let mut none = world.config.clone();
        none.jwt_issuers.clear();
        assert_eq!(no_longer_takes(&none, &machine), no_longer, "no issuer");

        // Verified with a key of the issuer's set: taken while the set publishes that key (under
        // any kid), from the same set, for an algorithm the issuer still allows.
        let key = |kid: &str| {
            format!(
                r#"{{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"{kid}"}}"#
            )
        };
        let published = key("published");
        let (address, _) =
            idp_answering(|_| format!(r#"{{"keys":[{published}]}}"#), Duration::ZERO).await;
        let set = Arc::new(Jwks::new(
            format!("http://{address}/jwks"),
            reqwest::Client::new(),
        ));
        set.refresh(true).await.unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(&key("first")).unwrap();
        let thumbprint = jwk
            .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .unwrap();
        machine.signed = Some(jwt::SignedWith {
            jwks_uri: world.config.jwt_issuers[0].jwks_uri.clone(),
            tls_ca: None,
            leeway: world.config.jwt_issuers[0].leeway,
            iat_backdate: world.config.jwt_issuers[0].iat_backdate,
            set,
            kid: Some("published".to_owned()),
            alg: jsonwebtoken::Algorithm::ES256,
            key: thumbprint.into(),
        });
        use portcullis_config::JwtAlgorithm::{self, ES256, RS256};
        let algorithms = |algorithms: &'static [JwtAlgorithm]| {
            move |issuer: &mut JwtIssuer| issuer.algorithms = algorithms.to_vec()
        };
        assert_eq!(why(&algorithms(&[RS256, ES256]), &machine), None);
        assert_eq!(
            why(&algorithms(&[RS256]), &machine),
            Some("the token's algorithm is no longer allowed for its issuer")
        );
        let elsewhere =
            |issuer: &mut JwtIssuer| issuer.jwks_uri = Some("http://127.0.0.1:2/other".to_owned());
        assert_eq!(
            why(&elsewhere, &machine),
            Some("the token's issuer is now configured with another key set (jwks_uri)")
        );
        // Its keys fetched under another CA (one a reload stopped trusting, say).
        let ca = |issuer: &mut JwtIssuer| {
            let certificate = rustls::pki_types::CertificateDer::from(vec![0x30, 0x00]);
            issuer.tls_ca = Some(vec![certificate].into());
        };
        assert_eq!(
            why(&ca, &machine),
            Some("the token's issuer is now trusted by another CA (tls_ca)")
        );
        // Its expiry reckoned with more leeway than the issuer now allows: it expires by the
        // leeway allowed now (more gives it none), and is not refused for that before.
        let leeway =
            |secs: u64| move |issuer: &mut JwtIssuer| issuer.leeway = Duration::from_secs(secs);
        let had = world.config.jwt_issuers[0].leeway.as_secs();
        assert!(had > 0);
        let expires_with = |change: &dyn Fn(&mut JwtIssuer)| {
            let mut config = world.config.clone();
            change(&mut config.jwt_issuers[0]);
            expires_under(&config.jwt_issuers, &machine)
        };
        assert_eq!(expires_with(&unchanged), machine.expires);
        assert_eq!(expires_with(&leeway(had + 60)), machine.expires);
        assert_eq!(expires_with(&leeway(0)), machine.expires - had);
        assert_eq!(why(&leeway(0), &machine), None);
        // Taken as issued earlier than the issuer now dates its tokens.
        let backdate = |issuer: &mut JwtIssuer| issuer.iat_backdate = Duration::ZERO;
        if let Some(signed) = machine.signed.as_mut() {
            signed.iat_backdate = Duration::from_secs(300);
        }
        assert_eq!(
            why(&backdate, &machine),
            Some("the token's issuer now dates its tokens more strictly (iat_backdate)")
        );
        if let Some(signed) = machine.signed.as_mut() {
            signed.iat_backdate = world.config.jwt_issuers[0].iat_backdate;
        }
        if let Some(signed) = machine.signed.as_mut() {
            signed.key = "a-key-the-set-does-not-publish".into();
        }
        assert_eq!(
            why(&algorithms(&[RS256, ES256]), &machine),
            Some("the token's issuer no longer publishes the key that signed it")
        );
    }

    /// What the IdP answers is read no further than its bound, by the callers that read it: a
    /// key set 256 KiB, a discovery document 1 MiB. An answer past it is no answer (the keys
    /// cannot be had); one within it is taken, however much of it is padding.
    #[tokio::test]
    async fn the_idp_s_answers_are_read_no_further_than_their_bounds() {
        let key = USABLE_KEY;
        let padded = |json: String, size: usize| format!("{json}{}", " ".repeat(size - json.len()));
        for (size, taken) in [(200 << 10, true), (300 << 10, false)] {
            let set = padded(format!(r#"{{"keys":[{key}]}}"#), size);
            let (address, _) = idp_answering(|_| set, Duration::ZERO).await;
            let jwks = Jwks::new(format!("http://{address}/jwks"), reqwest::Client::new());
            let fetched = jwks.refresh(true).await;
            assert_eq!(
                fetched.is_ok(),
                taken,
                "a key set of {size} bytes: {fetched:?}"
            );
        }
        for (size, taken) in [(900 << 10, true), (1100 << 10, false)] {
            let (address, _) = idp_answering(
                |address| {
                    let issuer = format!("http://{address}");
                    let document = format!(r#"{{"issuer":"{issuer}","jwks_uri":"{issuer}/jwks"}}"#);
                    padded(document, size)
                },
                Duration::ZERO,
            )
            .await;
            let (http, issuer) = (reqwest::Client::new(), format!("http://{address}"));
            let found = discover_jwks_uri(&http, &issuer).await;
            assert_eq!(
                found.is_ok(),
                taken,
                "a discovery document of {size} bytes: {found:?}"
            );
        }
    }

    /// A set with no usable key withdraws every key, once a fetch 10 s later finds the same:
    /// an admin who disabled them all. Until then the last usable set is kept, as an IdP
    /// node whose keys failed to load serves one for a moment.
    #[tokio::test]
    async fn a_key_set_with_no_usable_key_withdraws_every_key_once_it_stays() {
        let key = USABLE_KEY;
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(key).unwrap();
        let thumbprint = jwk
            .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .unwrap();
        let usable = format!(r#"{{"keys":[{key}]}}"#);
        let none = r#"{"keys":[]}"#.to_owned();
        let symmetric = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.to_owned();
        let garbage = "<html>oops</html>".to_owned();
        let bodies = |_| {
            vec![
                usable.clone(),
                none.clone(),
                usable,
                none.clone(),
                garbage,
                none,
                symmetric,
            ]
        };
        let (address, fetches) = idp_answering_in_turn(bodies, Duration::ZERO).await;
        let set = Jwks::new(format!("http://{address}/jwks"), reqwest::Client::new());
        let published = || set.publishes(Some("a"), jsonwebtoken::Algorithm::ES256, &thumbprint);
        let unavailable = Err(JwtError::KeysUnavailable);
        set.refresh(true).await.unwrap();
        assert!(published());
        // A moment's glitch: kept, though not as the issuer's word (a refresh too soon to
        // fetch says so); forgotten once the key is back.
        assert_eq!(set.refresh(true).await, unavailable);
        assert!(published(), "kept at first");
        assert_eq!(set.refresh(false).await, unavailable, "on probation");
        set.age_unusable().await;
        set.refresh(true).await.unwrap();
        assert!(published());
        assert_eq!(set.refresh(true).await, unavailable);
        assert!(published(), "a new glitch is one again");
        // An outage between two glitches: two glitches.
        set.age_unusable().await;
        assert_eq!(set.refresh(true).await, unavailable, "the outage");
        set.age_unusable().await;
        assert_eq!(set.refresh(true).await, unavailable);
        assert!(published(), "a glitch after an outage is one again");
        // Still none 10 s on (a symmetric key is none to use): withdrawn.
        set.age_unusable().await;
        set.refresh(true).await.unwrap();
        assert!(!published(), "a key left out of the set is withdrawn");
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 7);
    }

    fn auth(world: &crate::testing::World, dir: &std::path::Path) -> Auth {
        let log = || crate::audit::Destination::of(dir, None);
        let audit = Arc::new(Audit::open(log(), log()).unwrap());
        Auth::new(world.directory.clone(), Arc::new(Kept::default()), audit).unwrap()
    }

    /// A key set of one key Portcullis can use.
    fn a_usable_key_set() -> String {
        format!(r#"{{"keys":[{USABLE_KEY}]}}"#)
    }

    const USABLE_KEY: &str = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"a"}"#;

    #[tokio::test]
    async fn requests_that_first_fetch_an_issuer_s_keys_together_share_one_fetch() {
        // A slow IdP: every request below arrives while the first fetch is out.
        let keys = |_| a_usable_key_set();
        let (address, fetches) = idp_answering(keys, Duration::from_millis(300)).await;
        let world = crate::testing::World::new();
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&world, dir.path());
        let mut issuer = world.config.jwt_issuers[0].clone();
        issuer.jwks_uri = Some(format!("http://{address}/jwks"));
        // Requests miss the cache together: one fetch, one key set.
        let fetch = || auth.jwks_for(&issuer);
        let (a, b, c, d) = tokio::join!(fetch(), fetch(), fetch(), fetch());
        let sets = [a, b, c, d];
        let first = sets[0].as_ref().unwrap().clone();
        for set in &sets {
            assert!(
                Arc::ptr_eq(&first, set.as_ref().unwrap()),
                "two key sets for one issuer"
            );
        }
        let fetched = fetches.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(fetched, 1, "fetches of the key set");
        let kept = auth.jwks_for(&issuer).await.unwrap();
        assert!(Arc::ptr_eq(&first, &kept));
    }

    /// An IdP that stops answering holds up no other issuer's refresh: a key another issuer
    /// withdraws stops verifying at its `jwks_refresh`, not 10 s (a fetch's bound) later for
    /// each IdP down.
    #[tokio::test]
    async fn an_idp_that_stops_answering_holds_up_no_other_issuer_s_refresh() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Answers its first fetch, then holds every later one unanswered.
        let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let down_address = down.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut first = true;
            while let Ok((mut stream, _)) = down.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                if std::mem::take(&mut first) {
                    let body = a_usable_key_set();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                } else {
                    held.push(stream);
                }
            }
        });
        let (up_address, up_fetches) = idp_answering(|_| a_usable_key_set(), Duration::ZERO).await;
        let world = crate::testing::World::new();
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&world, dir.path());
        let mut config = world.config.clone();
        let mut up = config.jwt_issuers[0].clone();
        up.issuer = "https://up.example".to_owned();
        up.jwks_uri = Some(format!("http://{up_address}/jwks"));
        // The one down first: refreshed one after the other, it held the other's up.
        config.jwt_issuers[0].jwks_uri = Some(format!("http://{down_address}/jwks"));
        config.jwt_issuers.push(up);
        for issuer in &mut config.jwt_issuers {
            issuer.jwks_refresh = jwt::REFETCH_AFTER;
            auth.jwks_for(issuer).await.unwrap().age_fetches().await;
        }
        auth.refresh_aged_key_sets(&config);
        let fetched = || up_fetches.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while fetched() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            fetched(),
            2,
            "the answering IdP's key set was not fetched again"
        );
    }

    /// A first fetch that finds no key to use keeps no key set: no token's key is known
    /// withdrawn, so tokens are refused as unjudged (503), not as invalid, and the issuer is
    /// asked again as after a failed fetch.
    #[tokio::test]
    async fn a_first_key_set_with_no_usable_key_is_asked_for_again_as_a_failed_fetch() {
        let bodies = |_| vec![r#"{"keys":[]}"#.to_owned(), a_usable_key_set()];
        let (address, fetches) = idp_answering_in_turn(bodies, Duration::ZERO).await;
        let world = crate::testing::World::new();
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&world, dir.path());
        let mut issuer = world.config.jwt_issuers[0].clone();
        issuer.jwks_uri = Some(format!("http://{address}/jwks"));
        let fetched = || fetches.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..2 {
            let refused = auth.jwks_for(&issuer).await;
            assert!(matches!(refused, Err(JwtError::KeysUnavailable)));
        }
        assert_eq!(fetched(), 1, "asked again at once");
        let failed = std::time::Instant::now() - jwt::REFETCH_AFTER - Duration::from_secs(1);
        auth.issuer_failures.insert(key_set_id(&issuer), failed);
        assert!(auth.jwks_for(&issuer).await.unwrap().has_usable_key());
        assert_eq!(fetched(), 2);
    }

    /// An issuer a reload takes out of the configuration forgets its key set: put back, its
    /// keys are fetched afresh, not taken from a set nobody refreshed meanwhile.
    #[tokio::test]
    async fn an_issuer_taken_out_and_put_back_fetches_its_keys_afresh() {
        let keys = |_| a_usable_key_set();
        let (address, fetches) = idp_answering(keys, Duration::ZERO).await;
        let world = crate::testing::World::new();
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&world, dir.path());
        let mut config = world.config.clone();
        config.jwt_issuers[0].jwks_uri = Some(format!("http://{address}/jwks"));
        let issuer = config.jwt_issuers[0].clone();
        let first = auth.jwks_for(&issuer).await.unwrap();
        auth.keep_key_sets_of(&config);
        let kept = auth.jwks_for(&issuer).await.unwrap();
        assert!(Arc::ptr_eq(&first, &kept), "still listed: kept");
        let mut without = config.clone();
        without.jwt_issuers.clear();
        auth.keep_key_sets_of(&without);
        // Nothing of it is kept: each reload naming another `jwks_uri` would leave some.
        assert!(auth.issuers.is_empty() && auth.first_fetches.is_empty());
        let again = auth.jwks_for(&issuer).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &again), "put back: fetched afresh");
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// An issuer whose first fetch failed is asked again by one request at a time: the others
    /// are refused at once, not held up for its timeouts behind that one.
    #[tokio::test]
    async fn an_issuer_that_failed_is_asked_again_by_one_request_at_a_time() {
        // Takes connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap();
        let world = crate::testing::World::new();
        let dir = tempfile::tempdir().unwrap();
        let auth = Arc::new(auth(&world, dir.path()));
        let mut issuer = world.config.jwt_issuers[0].clone();
        issuer.jwks_uri = Some(format!("http://{address}/jwks"));
        let id = key_set_id(&issuer);
        // Failed long enough ago to be asked again.
        let failed = std::time::Instant::now() - jwt::REFETCH_AFTER - Duration::from_secs(1);
        auth.issuer_failures.insert(id, failed);
        let asking = {
            let (auth, issuer) = (auth.clone(), issuer.clone());
            tokio::spawn(async move { auth.jwks_for(&issuer).await.map(|_| ()) })
        };
        // The first asks (and waits on the issuer); the rest are answered at once.
        while auth
            .first_fetches
            .iter()
            .all(|gate| gate.try_lock().is_ok())
        {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        for _ in 0..4 {
            let refused = auth.jwks_for(&issuer).await;
            assert!(matches!(refused, Err(JwtError::KeysUnavailable)));
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        asking.abort();
        drop(silent);
    }

    #[tokio::test]
    async fn a_discovery_document_is_the_issuer_s_only_if_it_names_it_and_its_keys_over_tls() {
        let world = crate::testing::World::new();
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&world, dir.path());
        // (the issuer it names, if not the one asked; its jwks_uri; taken)
        for (names, jwks_uri, taken) in [
            (None, "http://127.0.0.1:9/jwks", true),
            (
                Some("https://idp.example"),
                "http://127.0.0.1:9/jwks",
                false,
            ),
            (None, "http://idp.example/jwks", false),
        ] {
            let doc = |address| {
                let own = format!("http://{address}");
                serde_json::json!({"issuer": names.unwrap_or(&own), "jwks_uri": jwks_uri})
                    .to_string()
            };
            let (address, _) = idp_answering(doc, Duration::ZERO).await;
            let found = discover_jwks_uri(&auth.http, &format!("http://{address}")).await;
            assert_eq!(found.is_ok(), taken, "{names:?} {jwks_uri}: {found:?}");
        }
    }
}
