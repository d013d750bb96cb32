//! The validated configuration the rest of Portcullis uses.
//!
//! Every value here has already been checked: addresses parse, files exist and hold what they
//! should, durations are positive, routes are unambiguous. What the proxy needs compiled or
//! loaded is held compiled or loaded (each route's policy, header names, certificates and their
//! keys, upstream CAs), so building the proxy's state from a [`Config`] cannot fail: nothing is
//! read or compiled a second time. Code that receives a [`Config`] never re-validates it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use portcullis_policy::{Policy, RuleSpec};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

/// A secret value read from the file, the environment (`env:NAME`) or a file (`file:PATH`).
///
/// Its `Debug` output never shows the value, so a secret cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself. Call only where the value is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Whether a socket bound to `bound` takes connections to `ip`: the same address, or a
/// wildcard of its family (`0.0.0.0` takes IPv4 only; `[::]` takes both, as Linux binds it
/// unless `bindv6only` is set). `ip` is read as IPv4 when it is an IPv4-mapped address.
pub fn address_takes(bound: std::net::IpAddr, ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    bound == ip || (bound.is_unspecified() && (bound.is_ipv6() || ip.is_ipv4()))
}

/// The session cookie's name unless `[oidc] cookie_name` says another.
pub const DEFAULT_COOKIE_NAME: &str = "portcullis_session";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `portcullis=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    /// `None` when the file has no `[scim]` section: SCIM is off.
    pub scim: Option<ScimConfig>,
    /// `None` when the file has no `[oidc]` section: nobody signs in with a browser.
    pub oidc: Option<OidcConfig>,
    /// Issuers whose bearer JWTs are accepted on routes that take `bearer`; issuers unique.
    pub jwt_issuers: Vec<JwtIssuer>,
    /// How a signed-in caller is found in the SCIM directory and told to upstreams; the
    /// defaults when the file has no `[identity]` section.
    pub identity: IdentityConfig,
    /// `None` when the file has no `[postgres]` section: the directory lives in `data_dir`.
    pub postgres: Option<PostgresConfig>,
    /// `None` when the file has no `[console]` section: there is no console.
    pub console: Option<Route>,
}

/// The path under which the console is served on the auth host.
pub const CONSOLE_PATH: &str = "/.portcullis/console/";

/// The name of the console's route, which its refusals are recorded on.
pub const CONSOLE_ROUTE: &str = "console";

/// How old an IdP's key set may grow before it is fetched again, unless configured otherwise.
pub const JWKS_REFRESH: Duration = Duration::from_secs(5 * 60);

/// Most upstreams a route lists: a request tries each that refuses it in turn, and the proxy
/// is told to try at most twice as many times (a pooled connection found closed is tried past
/// too). Put a balancer in front of more.
pub const MAX_UPSTREAMS: usize = 32;

/// The PostgreSQL database several replicas share (`[postgres]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// A `postgres://` URL or a `key=value` connection string; it may carry a password.
    /// TLS to the server as the URL's `sslmode` asks (`require` verifies the certificate
    /// against the system's roots).
    pub url: Secret,
    /// Connections kept for reads of whole records (SCIM answers).
    pub pool_size: usize,
    /// How long a replica that has lost the change feed keeps admitting callers; also the
    /// longest a dead replica can hold up a SCIM answer.
    pub max_staleness: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Worker threads serving the listeners.
    pub threads: usize,
    /// How long `SIGTERM` waits for in-flight requests before exiting.
    pub shutdown_timeout: Duration,
    /// Largest request head (request line plus headers) accepted; larger is a 431.
    pub max_request_header_bytes: usize,
    /// Largest request body accepted unless a route sets its own; larger is a 413.
    pub max_request_body_bytes: u64,
    /// How often the config file is checked for changes (in addition to `SIGHUP`).
    pub reload_poll_interval: Duration,
    /// How long a client's HTTP/1 connection may sit idle between its requests, and a write of
    /// a large or open-ended answer's body wait for the client to read, before the connection
    /// is closed.
    pub client_idle_timeout: Duration,
    /// How often an upstream given by a DNS name is resolved again, so that requests follow
    /// the name to a new address (a cloud load balancer's addresses change).
    pub upstream_dns_refresh: Duration,
}

/// A listener serving `/healthz`, `/readyz`, `/metrics` and `/explain`, kept apart from the
/// proxied traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// The bearer token `/metrics` and `/explain` require. Without one they answer only on a
    /// loopback address, to requests whose `Host` is a loopback name.
    pub token: Option<AdminToken>,
    /// A token may be set although `address` is not loopback: it crosses the network in clear.
    pub allow_plain_http: bool,
}

impl AdminConfig {
    /// Whether its token would cross the network in clear on a listener bound to `bound`: the
    /// admin listener has no TLS, and whoever reads the token reads the directory through
    /// `/explain`. Only with `allow_plain_http`.
    pub fn token_in_clear(&self, bound: SocketAddr) -> bool {
        self.token.is_some() && !bound.ip().is_loopback() && !self.allow_plain_http
    }
}

/// The admin listener's bearer token: the value (for `portcullis explain`, which presents it)
/// and its SHA-256 (what the listener compares, in constant time).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminToken {
    pub secret: Secret,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: Option<ListenerTls>,
    /// On a plain-HTTP listener whose address is not loopback, let SCIM and sign-in through
    /// anyway (`allow_plain_http = true`: behind a proxy that terminates TLS). Without it, a
    /// SCIM token or a sign-in there would cross the network in clear: both are refused.
    pub allow_plain_http: bool,
    /// A plain-HTTP listener that only a proxy or load balancer terminating TLS reaches
    /// (`behind_tls_proxy = true`): its requests are taken as the https requests its clients
    /// made (https routes, `__Host-` and `Secure` cookies, `https` origins and redirects).
    pub behind_tls_proxy: bool,
    /// The proxies or load balancers in front whose `X-Forwarded-For` says who the client is
    /// (`trusted_proxies`): a connection from one of these addresses is taken to be for the
    /// address it names last, and so on back while that is one of these too. Empty: every
    /// client is the address its connection comes from.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Listener {
    /// Whether SCIM, sign-in, sessions and bearer tokens may be taken on this listener: over
    /// TLS (its own or a proxy's in front), on a loopback address, or where the file allows
    /// plain HTTP.
    pub fn carries_credentials(&self) -> bool {
        self.tls.is_some()
            || self.address.ip().is_loopback()
            || self.allow_plain_http
            || self.behind_tls_proxy
    }
}

/// Certificates served by a TLS listener. The first one is the default; the others are chosen
/// by SNI against the DNS names in each certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    pub certificates: Vec<CertificateFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateFiles {
    /// PEM file holding the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file holding the private key.
    pub key: PathBuf,
    /// DNS names (possibly `*.` wildcards) the leaf certificate is valid for, lower-cased.
    pub names: Vec<String>,
    /// The chain and its key, loaded and checked to match.
    pub loaded: LoadedKey,
}

/// A certificate chain and its private key, as read when the configuration was loaded. Equal
/// when the certificates are; `Debug` shows neither the certificates nor the key.
#[derive(Clone)]
pub struct LoadedKey(pub Arc<CertifiedKey>);

impl PartialEq for LoadedKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.cert == other.0.cert
    }
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoadedKey({} certificates)", self.0.cert.len())
    }
}

/// When sign-in asks the provider's UserInfo endpoint (OpenID Connect Core §5.3) for the
/// claims Portcullis uses. A provider need not put claims asked for by scope (`email`,
/// `profile`) into the ID token when it issues an access token; they are then only at UserInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserInfo {
    /// When the ID token lacks `email`, the `[identity] claim`, or `groups` while a route has
    /// `token_groups`, and the provider has a UserInfo endpoint.
    #[default]
    Auto,
    /// At every sign-in; a provider without a UserInfo endpoint cannot sign anyone in.
    Always,
    /// Never: only the ID token's claims count.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `from` exactly as written, used as the route's name in logs and metrics.
    pub name: String,
    pub scheme: Scheme,
    /// Lower-cased host without port. A leading `*.` matches any one or more labels.
    pub host: String,
    /// Path prefix, always starting with `/`. `/` matches everything. A prefix not ending in `/`
    /// matches only at a segment boundary (`/v1` matches `/v1` and `/v1/x`, not `/v1x`).
    pub path_prefix: String,
    pub upstreams: Vec<Upstream>,
    pub preserve_host: bool,
    pub websockets: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_request_body_bytes: u64,
    /// Credentials this route takes, at least one of them required; empty for a public route
    /// (no authentication). `Session` appears only with [`Config::oidc`], `Bearer` only with
    /// [`Config::jwt_issuers`].
    pub accept: Vec<Credential>,
    /// Who may use the route, for [`portcullis_policy::Policy::compile`]: each rule named by
    /// its key path (`routes[2].allow[0]`, or `routes[2].allow` for a single rule written as a
    /// table), in file order. The rules compile: validation compiled them.
    ///
    /// Never empty. A route that takes credentials has at least one allow rule (a file without
    /// one is refused: it would let nobody in). A public route (`accept` empty) has only
    /// `public` rules; without `allow` in the file it gets one, `public = true` alone, named
    /// `routes[i].allow`, so the proxy can evaluate every route's policy the same way.
    ///
    /// A `public` rule on a route that takes credentials lets anyone in, signed in or not,
    /// where it applies; the proxy asks for sign-in only when no public rule covers the request.
    pub allow: Vec<RuleSpec>,
    /// Rules that refuse whatever the allow rules say, named like `allow`. Empty on public
    /// routes: every criterion of a deny rule names a caller, and nobody signs in there.
    pub deny: Vec<RuleSpec>,
    /// `allow` and `deny`, compiled (once, here).
    pub policy: Arc<Policy>,
    /// Set [`IdentityConfig::header_user`], `header_email` and `header_groups` on requests
    /// sent upstream (default on).
    pub identity_headers: bool,
    /// Set `X-Portcullis-Assertion`, a signed JWT of the caller's identity, on requests sent
    /// upstream (default on).
    pub assertion: bool,
    /// When a signed-in caller has no SCIM user, take their groups from the token's `groups`
    /// claim instead of refusing them (default off).
    pub token_groups: bool,
    /// Send a bearer token Portcullis verified on to the upstream in `Authorization` (default
    /// off: the token is Portcullis' credential, and the upstream gets the assertion instead).
    /// Only on routes that accept `bearer`.
    pub pass_authorization: bool,
    /// A bearer token is taken here only when it is for one of these (its `aud`); empty: for
    /// any of its issuer's `audiences`. So a token minted for one API is not replayed at
    /// another behind the same issuer (RFC 8725 §3.9).
    pub audiences: Vec<String>,
    /// Let CORS preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`, and
    /// no body) through to the upstream without a caller, for it to answer (default off).
    /// Browsers send no credentials with a preflight, so without this a cross-origin call
    /// that carries them is refused before it is made.
    pub cors_preflight: bool,
}

/// A credential a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A browser session, signed in through [`OidcConfig`].
    Session,
    /// `Authorization: Bearer <JWT>` from one of [`Config::jwt_issuers`].
    Bearer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// The URL as written, for logs.
    pub url: String,
    pub tls: bool,
    /// Host name or IP literal as written in the URL (no brackets), used for SNI and `Host`.
    pub host: String,
    pub port: u16,
    /// The first address `host` resolved to when the file was read; for a DNS name, resolved
    /// again every `[server] upstream_dns_refresh` while running.
    pub address: SocketAddr,
    /// Verify the upstream's certificate (on by default; only meaningful with `tls`).
    pub verify_tls: bool,
    /// PEM bundle of the CA certificates trusted for this upstream, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The certificates of `ca_file`, each checked to parse as X.509.
    pub ca: Option<CaBundle>,
    /// `Host` sent to this upstream unless the route preserves the client's: the host, and the
    /// port unless it is the scheme's default.
    pub host_header: HeaderValue,
}

/// Where SCIM is served on its host.
pub const SCIM_BASE_PATH: &str = "/scim/v2";

/// Whether the normalized `path` is SCIM's on its host: [`SCIM_BASE_PATH`] or under it, as
/// written (the proxy answers it before any route is looked up).
pub fn under_scim_base(path: &str) -> bool {
    path.strip_prefix(SCIM_BASE_PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// SCIM 2.0 provisioning, served at `<scheme>://<host>/scim/v2` on every listener.
///
/// `host` may also be a route's host; that is allowed on purpose. Requests for that host under
/// `/scim/v2` go to SCIM, and every other path on it still goes to its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimConfig {
    /// Lower-case host name, without scheme, port or path.
    pub host: String,
    /// Largest SCIM request body accepted; larger is a 413.
    pub max_request_body_bytes: usize,
    /// Most operations accepted in one `/Bulk` request.
    pub max_bulk_operations: usize,
    /// Largest `count` served in one page of a list or search.
    pub max_results: usize,
    /// Bearer tokens allowed to call SCIM; at least one, names and hashes unique.
    pub tokens: Vec<ScimToken>,
}

/// A bearer token allowed to call SCIM. Only its hash is kept: the clear token never reaches
/// the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimToken {
    /// Unique name, recorded with every change the token makes.
    pub name: String,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// Unix seconds after which the token is refused; `None` for never.
    pub expires_at: Option<i64>,
}

/// Sign-in for people with OpenID Connect (authorization code flow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The issuer exactly as written (a trailing `/` is kept): it is compared with the `iss` of
    /// discovery and ID tokens as a string. `https`, or `http` to a loopback host.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Scopes requested; always include `openid`.
    pub scopes: Vec<String>,
    /// Lower-case `host[:port]` whose `/.portcullis/callback` the IdP redirects to, as it is
    /// registered with the IdP.
    pub auth_host: String,
    /// `auth_host`'s host, as a request's `Host` names it: without the port, an IPv6 literal
    /// bracketed and in its one text form (`[::1]`).
    pub auth_host_name: String,
    pub auth_scheme: Scheme,
    /// `.parent.domain` the session cookie is set for, covering `auth_host`; `None` for a
    /// cookie per host.
    pub cookie_domain: Option<String>,
    /// Session cookie name, without the `__Host-` prefix the proxy adds on TLS when there is
    /// no `cookie_domain`.
    pub cookie_name: String,
    /// A session unused for this long ends.
    pub session_idle_timeout: Duration,
    /// A session ends this long after sign-in, used or not.
    pub session_lifetime: Duration,
    /// Sessions one person (issuer and subject) may hold at once: a sign-in past it ends
    /// their oldest.
    pub max_sessions_per_person: usize,
    /// Refresh the session's tokens with the IdP's refresh token when the ID token expires.
    pub refresh: bool,
    /// When sign-in asks the provider's UserInfo endpoint for claims.
    pub userinfo: UserInfo,
    /// Algorithms an ID token may be signed with; never `none` or HMAC.
    pub id_token_algorithms: Vec<JwtAlgorithm>,
    /// Absolute URL passed to the IdP's `end_session_endpoint` as `post_logout_redirect_uri`.
    pub post_logout_redirect: Option<String>,
    /// The CA certificates trusted for the provider's https endpoints (discovery, keys, token,
    /// UserInfo), instead of the bundled roots: an IdP behind a private CA.
    pub tls_ca: Option<CaBundle>,
}

impl OidcConfig {
    /// Whether a request to `host` (over https or not) can bring back the session cookie a
    /// sign-in sets: one per host always can; one shared under `cookie_domain` reaches only the
    /// hosts under it and (named `__Secure-` when the auth host is https) only over https.
    /// Elsewhere a sign-in would end where it began, again and again.
    pub fn session_cookie_reaches(&self, host: &str, https: bool) -> bool {
        let Some(domain) = &self.cookie_domain else {
            return true;
        };
        let under = host.ends_with(domain.as_str()) || Some(host) == domain.get(1..);
        under && (https || self.auth_scheme == Scheme::Http)
    }
}

/// The certificates of a `tls_ca` file, each checked to parse as X.509.
pub type CaBundle = Arc<[CertificateDer<'static>]>;

/// How a signed-in caller is found in the SCIM directory, and the names of the identity headers
/// sent upstream.
///
/// Any claim may be matched against any attribute except that a person's `sub` is never
/// matched against [`ScimAttribute::Emails`] (a `sub` is not an address) and a machine's claim
/// never is (service accounts are found by name or id).
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityConfig {
    /// The ID-token claim that finds a person's SCIM user.
    pub claim: IdentityClaim,
    /// The claim of a person's bearer token (issued to a client for them, or delegated to an
    /// agent) that finds their SCIM user, by the same `scim_attribute`: `claim` unless set
    /// (Okta's access tokens name a person by login as `sub`, their user id as `uid`).
    pub bearer_claim: IdentityClaim,
    /// The SCIM attribute `claim` is matched against.
    pub scim_attribute: ScimAttribute,
    /// The access-token claim that finds a machine's SCIM user (its service account).
    pub machine_claim: MachineClaim,
    /// The SCIM attribute `machine_claim` is matched against: `UserName` or `ExternalId`.
    pub machine_scim_attribute: ScimAttribute,
    /// The claim of a client's own token (client credentials) that names a SCIM Agent; a
    /// token it names no agent by is a machine's. Also read from a delegated token's `act`.
    pub agent_claim: MachineClaim,
    /// The Agent attribute `agent_claim` is matched against.
    pub agent_scim_attribute: AgentAttribute,
    /// Header names for the caller's `userName`, email and groups; each starts with
    /// `X-Portcullis-` (in any case), so clients can never send it (such headers are stripped
    /// on the way in). Distinct from each other and from `X-Portcullis-Assertion`, even
    /// compared case-insensitively with `_` read as `-`.
    pub header_user: HeaderName,
    pub header_email: HeaderName,
    pub header_groups: HeaderName,
    /// Fraction of allowed requests also written to the audit log, `0.0..=1.0`; refusals are
    /// always written.
    pub allow_sample_rate: f64,
}

impl IdentityConfig {
    /// The claims of a token (or its `act`) a mapping reads: the person's (in an ID token and
    /// in a bearer token), the machine's and the agent's (`client_id`'s `azp` too).
    pub fn claims_read(&self) -> [&str; 5] {
        [
            self.claim.as_str(),
            self.bearer_claim.as_str(),
            self.machine_claim.as_str(),
            self.agent_claim.as_str(),
            "azp",
        ]
    }
}

impl Default for IdentityConfig {
    /// What a file without `[identity]` gets.
    fn default() -> Self {
        Self {
            claim: IdentityClaim::Email,
            bearer_claim: IdentityClaim::Email,
            scim_attribute: ScimAttribute::UserName,
            machine_claim: MachineClaim::Sub,
            machine_scim_attribute: ScimAttribute::UserName,
            agent_claim: MachineClaim::ClientId,
            agent_scim_attribute: AgentAttribute::Name,
            header_user: HeaderName::from_static("x-portcullis-user"),
            header_email: HeaderName::from_static("x-portcullis-email"),
            header_groups: HeaderName::from_static("x-portcullis-groups"),
            allow_sample_rate: 0.0,
        }
    }
}

/// The claim (of the ID token, or of UserInfo) that identifies a person.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityClaim {
    /// `email`, only when the IdP has not said it is unverified (`email_verified: false`).
    Email,
    Sub,
    /// Any other claim with a string value: `oid`, `preferred_username`, `upn`, custom ones.
    Named(String),
}

impl IdentityClaim {
    /// The claim's name in the token and in the file.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Email => "email",
            Self::Sub => "sub",
            Self::Named(name) => name,
        }
    }
}

/// The access-token claim that identifies a machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MachineClaim {
    Sub,
    /// `client_id`, or else `azp`.
    ClientId,
    /// Any other claim with a string value: `azp`, `appid`, `oid`, `cid`, custom ones.
    Named(String),
}

impl MachineClaim {
    /// The claim's name in the token and in the file.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Sub => "sub",
            Self::ClientId => "client_id",
            Self::Named(name) => name,
        }
    }
}

/// The SCIM Agent attribute an agent's claim is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentAttribute {
    /// `name`, compared case-insensitively.
    Name,
    /// `externalId`, compared exactly.
    ExternalId,
}

impl AgentAttribute {
    /// The attribute's name in SCIM and in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::ExternalId => "externalId",
        }
    }
}

/// The SCIM user attribute a claim is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScimAttribute {
    /// `userName`, compared case-insensitively.
    UserName,
    /// Any of the user's `emails[].value`, compared case-insensitively.
    Emails,
    /// `externalId`, compared exactly.
    ExternalId,
}

impl ScimAttribute {
    /// The attribute's name in SCIM and in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserName => "userName",
            Self::Emails => "emails",
            Self::ExternalId => "externalId",
        }
    }
}

/// An issuer whose bearer JWTs machines and agents present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIssuer {
    /// The issuer exactly as written, compared with a token's `iss` as a string.
    pub issuer: String,
    /// A token's `aud` must hold at least one of these.
    pub audiences: Vec<String>,
    /// The only clients (a token's `client_id`, else `azp`, `cid` or `appid`) whose tokens
    /// held for a person are taken, beside the agents' clients; empty: any client's. (A token
    /// the issuer marks as a client's own is a machine's, and not judged by it.) Every
    /// client that can get a token for `audiences` (every application signing people in
    /// through Okta's default authorization server gets `api://default`) could otherwise act
    /// as each person who signs in to it.
    pub person_clients: Vec<String>,
    /// Where the signing keys are; `None` to take `jwks_uri` from the issuer's discovery
    /// document.
    pub jwks_uri: Option<String>,
    pub algorithms: Vec<JwtAlgorithm>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`; at most 5 minutes.
    pub leeway: Duration,
    /// How old the key set may grow before it is fetched again, so that a key the issuer
    /// withdraws stops verifying within this time; 5 minutes by default, at least 10 seconds.
    pub jwks_refresh: Duration,
    /// How long before it issues a token the issuer dates it (`iat`): Entra ID dates its
    /// tokens 5 minutes early (the default for its issuers), others not at all (0). Added to
    /// `iat` where a token's age is judged against its user's or agent's record, so that a
    /// token fetched just after the record was created or re-activated is not taken for older.
    pub iat_backdate: Duration,
    /// The CA certificates trusted for the issuer's https endpoints (discovery, keys), instead
    /// of the bundled roots.
    pub tls_ca: Option<CaBundle>,
}

/// A JWS signature algorithm Portcullis accepts. There is deliberately no `none` and no HMAC
/// (`HS*`): a token must be signed with a key only the issuer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    /// Every algorithm, in the order the configuration reference lists them.
    pub const ALL: [JwtAlgorithm; 9] = [
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::EdDSA,
    ];

    /// The `alg` header value (RFC 7518, RFC 8037).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
        }
    }
}
