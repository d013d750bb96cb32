//! Portcullis' own sign-in endpoints, on every host under `/.portcullis/`:
//!
//! - `sign_in?rd=URL` starts a sign-in that returns to `rd` (checked, see [`super::redirect`]);
//! - `callback` completes it (the IdP's redirect URI);
//! - `sign_out`: GET shows a confirmation form, POST (same-origin only) ends the session and
//!   continues to the IdP's `end_session_endpoint` when it has one;
//! - `backchannel_logout`: the IdP's logout token ends the matching sessions at once;
//! - `me`: who you are signed in as (HTML, or JSON for `Accept: application/json`).

use std::net::IpAddr;

use http::{header, StatusCode};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;

use portcullis_config::{Config, OidcConfig, Scheme};

use super::oidc::{pending_cookie_name, SignInError, Wanted, PENDING_FOR};
use super::redirect::{safe_return_url, Hosts};
use super::{cookies_in_any_jar, session_cookie_name, Auth};
use crate::audit;
use crate::caller::{Caller, Identity, Principal};
use crate::clock::now_unix;
use crate::gate::Gate;
use crate::reply::{escape, Reply};
use crate::state::Runtime;

/// The route refusals at Portcullis' own endpoints (the sign-in callback, back-channel
/// logout, `me`) are audited under.
pub const AUDIT_ROUTE: &str = "oidc";

/// The cookies carrying sign-ins in progress are named this, `_`, and a digest of the state.
pub const BROWSER_COOKIE: &str = "portcullis_signin";
/// The same on TLS (see [`browser_cookie_prefix`]).
pub const HOST_BROWSER_COOKIE: &str = "__Host-portcullis_signin";
/// How many sign-ins in progress a browser keeps on TLS, where their cookies go with every
/// request to the host: starting one more expires the oldest (its tab's callback then asks to
/// sign in again). Tabs restored at once, each sent to sign in, would otherwise fill the
/// request's head past any bound, and every request to the host would be 431 until they
/// expired. (Tabs whose sign-ins start all at once each add one, seeing none of the others':
/// a request they make too large is answered 431 with the oldest expired.) Each is at most the
/// 4096 bytes a browser keeps of a cookie.
pub const MAX_PENDING_SIGN_INS: usize = 16;
/// Largest back-channel logout request body.
const MAX_LOGOUT_BODY: usize = 64 * 1024;
/// The IdP's refusals of a sign-in the operator has something to mend for: the client's
/// registration, or what it asks for.
const OPERATOR_MENDS: [&str; 4] = [
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

/// The second a sign-in refused at the IdP for what the operator mends was last logged.
static REFUSAL_WARNED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether such a refusal is logged at `now`: not within a minute of the last.
fn warn_of_refusals_now(now: u64) -> bool {
    use std::sync::atomic::Ordering;
    let last = REFUSAL_WARNED_AT.load(Ordering::Relaxed);
    warning_due(last, now)
        && REFUSAL_WARNED_AT
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Whether a warning last logged at `last` (0: never) is due again at `now`: a minute on, or
/// at once if the clock has stepped back since (else none would be for as long as the step).
fn warning_due(last: u64, now: u64) -> bool {
    last == 0 || now < last || now >= last.saturating_add(60)
}

/// When an IdP told to send a back-channel logout again should (`Retry-After`, in seconds):
/// once the key set may be fetched again ([`crate::auth::jwt::REFETCH_AFTER`]), which also
/// gives a store that refused to end its sessions a moment to come back.
const LOGOUT_RETRY_AFTER: &str = "10";

/// A back-channel logout to be sent again ([`LOGOUT_RETRY_AFTER`] on): 503 in the JSON the
/// IdP reads (OpenID Connect Back-Channel Logout §2.8).
pub(crate) fn logout_later() -> Reply {
    json_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
        .header(header::RETRY_AFTER, LOGOUT_RETRY_AFTER)
}

/// The request as the endpoints need it.
pub struct Request<'a> {
    /// `scheme://host[:port]` of this request, as the client sent it.
    pub origin: &'a str,
    /// Lower-case host without port.
    pub host: &'a str,
    pub tls: bool,
    /// The address it came from.
    pub client: Option<IpAddr>,
    /// Whether this replica's directory is known to be current (see
    /// `Shared::directory_is_current`).
    pub current: bool,
}

impl Request<'_> {
    /// How this request, of `session`, came.
    fn arrival(&self, session: &Session) -> super::Arrival<'_> {
        super::Arrival {
            tls: self.tls,
            local: crate::proxy::local_addr(session),
            host: self.host,
        }
    }

    /// This request, as an audit record of `method` on `path` says it.
    fn audited<'b>(&self, method: &'b str, path: &'b str) -> audit::Request<'b> {
        audit::Request {
            method,
            path,
            client: self.client,
        }
    }
}

/// What an endpoint answers.
pub enum Served {
    Reply(Reply),
    /// The endpoint needs a signed-in caller and there is none: answered as the gate answers
    /// any request without one (`/.portcullis/me`), a bearer token refused (`invalid_token`)
    /// too.
    Unauthenticated {
        invalid_token: bool,
    },
}

fn redirect(location: &str, cookies: Vec<String>) -> Reply {
    cookies
        .into_iter()
        .fold(Reply::redirect(StatusCode::FOUND, location), |reply, c| {
            reply.header(header::SET_COOKIE, c)
        })
}

/// Hosts Portcullis serves: where a return URL may point.
pub fn served_hosts(config: &Config) -> Hosts {
    let auth_host = config.oidc.as_ref().map(|o| o.auth_host_name.clone());
    Hosts::new(
        config
            .routes
            .iter()
            .map(|r| r.host.as_str())
            .chain(auth_host.as_deref()),
    )
}

fn auth_origin(oidc: &OidcConfig) -> String {
    let scheme = match oidc.auth_scheme {
        Scheme::Https => "https",
        Scheme::Http => "http",
    };
    format!("{scheme}://{}", oidc.auth_host)
}

/// Where the IdP sends the browser back: the auth host when one cookie covers every host,
/// otherwise the host the sign-in started on (each must be registered with the IdP).
fn redirect_uri(oidc: &OidcConfig, req: &Request<'_>) -> String {
    match oidc.cookie_domain {
        Some(_) => format!("{}/.portcullis/callback", auth_origin(oidc)),
        None => format!("{}/.portcullis/callback", req.origin),
    }
}

fn session_cookie(oidc: &OidcConfig, tls: bool, value: &str, max_age: u64) -> String {
    let name = session_cookie_name(oidc, tls);
    let mut cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}");
    // A prefixed name is kept by browsers only with `Secure`.
    if tls || name.starts_with("__") {
        cookie.push_str("; Secure");
    }
    if let Some(domain) = &oidc.cookie_domain {
        cookie.push_str("; Domain=");
        cookie.push_str(domain.trim_start_matches('.'));
    }
    cookie
}

/// What a sign-in's cookie name begins with. On TLS, `__Host-`: a cookie of that name can be
/// set by this host alone, over TLS, so no sibling host under the same domain and no plain-HTTP
/// answer can plant a sign-in of its own for the callback to finish, signing the browser in as
/// someone else.
fn browser_cookie_prefix(tls: bool) -> &'static str {
    if tls {
        HOST_BROWSER_COOKIE
    } else {
        BROWSER_COOKIE
    }
}

/// The longest end-session address a sign-out sends the browser to Entra ID with an
/// `id_token_hint`: Entra refuses a longer query (AADSTS90015, from a few KiB).
const MAX_ENTRA_END_SESSION_URL: usize = 2048;

/// `endpoint` (the IdP's `end_session_endpoint`) asked to end the sign-in `id_token_hint`
/// names. An Entra ID token listing many groups (with `groupMembershipClaims`) makes too long
/// an address for Entra: it goes without the hint, and Entra ends its session by its own
/// cookie, perhaps asking which account. Other IdPs take a long one, and some (Okta) need
/// the hint.
fn end_session_url(endpoint: url::Url, oidc: &OidcConfig, id_token_hint: Option<&str>) -> url::Url {
    let with = |hint: Option<&str>| {
        let mut url = endpoint.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &oidc.client_id);
            if let Some(hint) = hint {
                q.append_pair("id_token_hint", hint);
            }
            if let Some(after) = &oidc.post_logout_redirect {
                q.append_pair("post_logout_redirect_uri", after);
            }
        }
        url
    };
    let url = with(id_token_hint);
    let entra = portcullis_config::is_entra_issuer(&oidc.issuer);
    if entra && id_token_hint.is_some() && url.as_str().len() > MAX_ENTRA_END_SESSION_URL {
        return with(None);
    }
    url
}

/// The cookies expiring the sign-ins in progress that `head` carries on TLS but the newest
/// `keep` (at most 64 of them: a browser keeps about 180 cookies a host). Browsers send
/// cookies of one path oldest first (RFC 6265 §5.4).
pub fn pending_past(head: &RequestHeader, tls: bool, keep: usize) -> Vec<String> {
    if !tls {
        return Vec::new();
    }
    let cookies = head.headers.get_all(header::COOKIE);
    let pending = pending_sign_ins(&cookies);
    let over = pending.len().saturating_sub(keep).min(64);
    (pending.iter().take(over))
        .filter_map(|(name, _)| std::str::from_utf8(name).ok())
        .map(|name| browser_cookie(tls, name, "", 0))
        .collect()
}

/// The sign-ins in progress on TLS among `values` (`Cookie` headers), as (name, value), in the
/// order sent: the cookies named as Portcullis names them (`__Host-portcullis_signin_` and 16
/// hex digits), each name once.
pub fn pending_sign_ins<'a>(
    values: &'a http::header::GetAll<'a, http::HeaderValue>,
) -> Vec<(&'a [u8], &'a [u8])> {
    let ours = |name: &[u8]| {
        name.strip_prefix(HOST_BROWSER_COOKIE.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"_"))
            .is_some_and(|digest| {
                digest.len() == 16
                    && digest
                        .iter()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
    };
    let mut seen = std::collections::HashSet::new();
    (values.iter())
        .flat_map(|v| crate::cookies::pairs(v.as_bytes()))
        .filter(|(name, _)| ours(name) && seen.insert(*name))
        .collect()
}

/// A sign-in's cookie: sent to the callback only, or on TLS (where `__Host-` needs `Path=/`)
/// to the whole host, which removes it from what upstreams are sent.
fn browser_cookie(tls: bool, name: &str, value: &str, max_age: u64) -> String {
    let (path, secure) = if tls {
        ("/", "; Secure")
    } else {
        ("/.portcullis/callback", "")
    };
    format!("{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}")
}

impl Auth {
    /// Starts a sign-in that returns to `return_to`: the redirect to the IdP, with the cookie
    /// binding the sign-in to this browser. A refusal is recorded as `asked` on `route`: the
    /// request for a route's page that sent the browser here, or `/.portcullis/sign_in`.
    pub fn start_sign_in(
        &self,
        oidc: &OidcConfig,
        req: &Request<'_>,
        head: &RequestHeader,
        return_to: String,
        (route, asked): (&str, &audit::Request<'_>),
    ) -> Reply {
        // The session it would make could not be read back from among these cookies: the
        // browser would be sent round the sign-in for ever.
        if super::cookies_past_bound(head) {
            self.audit.unverified_refusal(
                route,
                "a sign-in was refused: the browser sends more cookies than Portcullis reads",
                asked,
            );
            return Reply::page(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Too many cookies",
                "<p>Your browser sends this site more cookies than Portcullis reads, so it \
                 cannot find your sign-in among them. Clear this site's cookies, then reload \
                 the page.</p>",
            );
        }
        // With one cookie for every host, sign-in runs on the auth host, where the callback
        // lands and the browser-binding cookie must be set. The address goes there already
        // shortened as the sign-in's cookie would shorten it: a longer one is refused there.
        if oidc.cookie_domain.is_some() && req.host != oidc.auth_host_name {
            // A raw `\` (which browsers send in a query as typed) would have the auth host
            // refuse the address, as it refuses any: in a query, `%5C` reads the same.
            let return_to = super::oidc::within_cookie(return_to.replace('\\', "%5C"));
            let location = format!(
                "{}/.portcullis/sign_in?rd={}",
                auth_origin(oidc),
                form_urlencoded::byte_serialize(return_to.as_bytes()).collect::<String>()
            );
            return redirect(&location, Vec::new());
        }
        let started = self.oidc.start(
            oidc,
            &redirect_uri(oidc, req),
            return_to,
            browser_cookie_prefix(req.tls),
            now_unix(),
        );
        match started {
            Ok(started) => {
                let cookie = browser_cookie(
                    req.tls,
                    &started.cookie_name,
                    &started.cookie_value,
                    PENDING_FOR,
                );
                let mut cookies = vec![cookie];
                cookies.extend(pending_past(head, req.tls, MAX_PENDING_SIGN_INS - 1));
                redirect(&started.authorize_url, cookies)
            }
            Err(e) => {
                let why = format!("a sign-in was refused: {e}");
                self.audit.unverified_refusal(route, &why, asked);
                sign_in_failed(&e)
            }
        }
    }

    /// Serves `/.portcullis/<endpoint>`; `None` for an endpoint that isn't ours.
    pub async fn serve(
        &self,
        session: &mut Session,
        runtime: &Runtime,
        endpoint: &str,
        req: &Request<'_>,
    ) -> Result<Option<Served>> {
        let config = &runtime.config;
        let method = session.req_header().method.clone();
        // Machines and agents ask who they are where no one signs in too.
        if endpoint == "me" && matches!(method, http::Method::GET | http::Method::HEAD) {
            let served = match self.me(session, runtime, req).await {
                Ok(reply) => Served::Reply(reply),
                Err(invalid_token) => Served::Unauthenticated { invalid_token },
            };
            return Ok(Some(served));
        }
        let Some(oidc) = &config.oidc else {
            return Ok(None);
        };
        let query = session
            .req_header()
            .uri
            .query()
            .unwrap_or_default()
            .to_owned();
        let param = |name: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let reply = match (endpoint, &method) {
            ("sign_in", &http::Method::GET) => {
                let hosts = served_hosts(config);
                let rd = param("rd").unwrap_or_else(|| "/".to_owned());
                match safe_return_url(&rd, req.origin, &hosts) {
                    Some(return_to) => self.start_sign_in(
                        oidc,
                        req,
                        session.req_header(),
                        return_to,
                        (AUDIT_ROUTE, &req.audited("GET", "/.portcullis/sign_in")),
                    ),
                    None => {
                        // A link made to send someone elsewhere after signing in.
                        self.audit.unverified_refusal(
                            AUDIT_ROUTE,
                            "a sign-in link's return address (rd) is not one Portcullis serves",
                            &req.audited("GET", "/.portcullis/sign_in"),
                        );
                        Reply::page(
                            StatusCode::BAD_REQUEST,
                            "Sign-in link refused",
                            "<p>This sign-in link would send you to an address Portcullis does not serve.</p>",
                        )
                    }
                }
            }
            ("callback", &http::Method::GET) => {
                let wants = Wanted {
                    claim: config.identity.claim.as_str(),
                    groups: config.routes.iter().any(|r| r.token_groups),
                };
                self.callback(session, runtime, oidc, req, &param, wants)
                    .await
            }
            ("sign_out", &http::Method::GET) => {
                Reply::page(StatusCode::OK, "Sign out", SIGN_OUT_FORM)
            }
            ("sign_out", &http::Method::POST) => self.sign_out(session, oidc, req).await,
            ("backchannel_logout", &http::Method::POST) => {
                let idle = config.server.client_idle_timeout;
                self.backchannel_logout(session, oidc, req, idle).await?
            }
            _ => return Ok(None),
        };
        Ok(Some(Served::Reply(reply)))
    }

    /// The page for a sign-in that did not complete, recorded as a refusal (anyone can call
    /// the callback, so as one of unverified credentials).
    fn sign_in_refused(&self, e: &SignInError, req: &Request<'_>) -> Reply {
        self.record_refused_sign_in(e, req);
        sign_in_failed(e)
    }

    fn record_refused_sign_in(&self, e: &SignInError, req: &Request<'_>) {
        let reason = format!("a sign-in was refused: {e}");
        let request = req.audited("GET", "/.portcullis/callback");
        self.audit
            .unverified_refusal(AUDIT_ROUTE, &reason, &request);
    }

    async fn callback(
        &self,
        session: &Session,
        runtime: &Runtime,
        oidc: &OidcConfig,
        req: &Request<'_>,
        param: &(dyn Fn(&str) -> Option<String> + Sync),
        wants: Wanted<'_>,
    ) -> Reply {
        let pending = |state: &str| pending_cookie_name(browser_cookie_prefix(req.tls), state);
        if let Some(error) = param("error") {
            // Anyone can send someone a link to this address with any words in it ("your
            // account is locked: call …"), to be shown on the company's sign-in host: the IdP's
            // words are shown to, and recorded as the IdP's for, only the browser that started
            // a sign-in under that state.
            let started_here = param("state").is_some_and(|state| {
                cookies_in_any_jar(session.req_header(), &pending(&state))
                    .any(|sealed| self.oidc.started(&state, sealed, now_unix()))
            });
            let e = if started_here {
                let detail = param("error_description").unwrap_or_default();
                let said = format!("{error} {detail}");
                // Anyone may send this under a sign-in they started: once a minute at most.
                // (One of a few words: nothing anyone wrote reaches the log.)
                if OPERATOR_MENDS.contains(&error.as_str()) && warn_of_refusals_now(now_unix()) {
                    tracing::warn!(
                        "a sign-in was refused at the identity provider ({error}): the [oidc] \
                         client or its registration there needs mending; the IdP's log says why \
                         (said once a minute at most)"
                    );
                }
                match error.as_str() {
                    "temporarily_unavailable" | "server_error" => SignInError::Busy(said),
                    _ => SignInError::Refused(said),
                }
            } else {
                SignInError::RefusedElsewhere(error_code(&error))
            };
            self.record_refused_sign_in(&e, req);
            return sign_in_failed(&e);
        }
        let (Some(state), Some(code)) = (param("state"), param("code")) else {
            return self.sign_in_refused(&SignInError::UnknownState, req);
        };
        // RFC 9207: an IdP that names itself in its answer must be the configured one (a
        // sign-in answered by another is a mix-up), and one that says it always does must.
        let mixed_up = match param("iss") {
            Some(iss) => iss != oidc.issuer,
            None => self.oidc.names_itself(oidc),
        };
        if mixed_up {
            return self.sign_in_refused(&SignInError::OtherProvider, req);
        }
        let cookie_name = pending(&state);
        // Read without the bound on session cookies: sign-ins in progress in other tabs are
        // sent here too.
        let sealed = cookies_in_any_jar(session.req_header(), &cookie_name)
            .next()
            .map(str::to_owned);
        let now = now_unix();
        let finished = self
            .oidc
            .finish(
                oidc,
                &state,
                &code,
                sealed.as_deref(),
                &redirect_uri(oidc, req),
                wants,
                now,
            )
            .await;
        let (mut identity, refresh, return_to, started) = match finished {
            Ok(done) => done,
            // The back button after signing in brings back the IdP's page, which sends the
            // browser here again under the sign-in's spent state: a browser whose session
            // holds is signed in, not refused a sign-in (nor is a forged callback sent to it
            // recorded then: it did nothing).
            Err(SignInError::UnknownState | SignInError::WrongBrowser)
                if self.signed_in(runtime, session, req).await =>
            {
                let scheme = if req.tls { Scheme::Https } else { Scheme::Http };
                return match runtime.routes.find(scheme, req.host, "/") {
                    crate::routes::Match::Found(_) => redirect("/", Vec::new()),
                    _ => Reply::page(
                        StatusCode::OK,
                        "Signed in",
                        "<p>You are signed in. Go back to the page you were on.</p>",
                    ),
                };
            }
            Err(e) => {
                // Recorded as a refusal, within its budget. A warning too only where the
                // operator has something to mend (the IdP out of reach, its answers unreadable,
                // the client's registration refused): not for what anyone can send (a callback
                // without this browser's sign-in, a code of their own under a sign-in they
                // started, which the IdP refuses `invalid_grant`), a line each on top of the
                // record.
                match &e {
                    SignInError::UnknownState
                    | SignInError::WrongBrowser
                    | SignInError::OtherProvider => {
                        tracing::debug!(error = %e, "sign-in refused");
                    }
                    SignInError::Refused(said)
                        if !OPERATOR_MENDS
                            .contains(&said.split(' ').next().unwrap_or_default()) =>
                    {
                        tracing::debug!(error = %e, "sign-in refused");
                    }
                    _ => tracing::warn!(error = %e, "sign-in refused"),
                }
                // This sign-in's cookie is spent, so that nothing piles up; unless the IdP was
                // not reached, when the code is still good and a reload finishes the sign-in.
                let retry = matches!(
                    e,
                    SignInError::Unreachable(_) | SignInError::ProviderUnavailable
                );
                let mut reply = self.sign_in_refused(&e, req);
                if sealed.is_some() && !retry {
                    reply.headers.push((
                        header::SET_COOKIE,
                        browser_cookie(req.tls, &cookie_name, "", 0),
                    ));
                }
                return reply;
            }
        };
        // Sessions count from the directory as it is now: a deactivation answered before this
        // point does not end this new session.
        identity.directory_seq = self.directory.seq();
        let who = Principal::Person(&identity).log_name();
        let person = identity.clone();
        let lifetime = oidc.session_lifetime.as_secs();
        let id = match self
            .sessions
            .create(
                identity,
                refresh,
                super::sessions::IssuedIn::of(oidc, req.host),
                now,
            )
            .await
        {
            Ok(id) => id,
            Err(e) => {
                tracing::error!("cannot store the session: {e}");
                let reason =
                    format!("the sign-in of {who} was refused: its session could not be saved");
                let request = req.audited("GET", "/.portcullis/callback");
                self.audit
                    .unverified_refusal(AUDIT_ROUTE, &reason, &request);
                return Reply::page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in unavailable",
                    "<p>Your sign-in could not be saved. Try again shortly.</p>",
                );
            }
        };
        // While this sign-in was finished here, the IdP signed out the session it is of (by a
        // back-channel logout), or a reload moved sign-in to a configuration that does not
        // hold it: each ended the sessions held then, not this one. No cookie for it, and it
        // is ended (no one else has its id); the next sign-in is under what holds now.
        let ended_meanwhile = match self.sessions.get(&id) {
            // Taken already, by a back-channel logout that came meanwhile (which records it).
            None => Some(None),
            Some(_) if self.sessions.signed_out_by_idp(&person, started) => Some(Some((
                "idp_logout",
                "its IdP session was signed out while it began",
            ))),
            Some((_, session)) if !self.sessions.holds_as_configured(&session, now_unix()) => {
                Some(Some((
                    "config_ended",
                    "a reload of [oidc] that no longer holds it came while it began",
                )))
            }
            Some(_) => None,
        };
        if let Some(why) = ended_meanwhile {
            // Recorded by the end that takes it: this one's, or a late logout's. (Taken only
            // to be ended here: one a logout took, then put back when its write failed, is the
            // logout's to end on the IdP's next try.)
            let taken = why.and_then(|why| Some((why, self.sessions.take_held(&id)?)));
            if let Some(((what, detail), (key, taken))) = taken {
                let ending = "the session of a sign-in ended while it began".to_owned();
                (self.sessions).write_end_until_it_holds(vec![key], taken, ending, || {});
                self.audit.session(&who, what, detail, req.client);
            }
            // A page, not the way back: a sign-in started from there again may come back under
            // the same IdP session (one the IdP kept), within the minute replicas' clocks
            // are allowed apart, and be refused again, and again.
            let mut reply = Reply::page(
                StatusCode::OK,
                "Signed out",
                &format!(
                    "<p>Your sign-in was ended while it was under way: your identity provider \
                     signed you out, or sign-in was configured anew.</p><p><a href=\"{}\">Sign in \
                     again</a></p>",
                    crate::reply::escape(&return_to)
                ),
            );
            reply.headers.push((
                header::SET_COOKIE,
                browser_cookie(req.tls, &cookie_name, "", 0),
            ));
            return reply;
        }
        self.audit.session(&who, "sign_in", "", req.client);
        let keep = oidc.max_sessions_per_person;
        match self.sessions.end_all_but_newest(&person, &id, keep).await {
            Ok(0) => {}
            Ok(ended) => {
                let detail = format!("{ended} past max_sessions_per_person ({keep})");
                self.audit
                    .session(&who, "oldest_ended", &detail, req.client);
            }
            // The sign-in stands; the next one tries again.
            Err(e) => tracing::error!("cannot end a person's oldest sessions: {e}"),
        }
        let cookies = vec![
            session_cookie(oidc, req.tls, &id, lifetime),
            browser_cookie(req.tls, &cookie_name, "", 0),
        ];
        redirect(&return_to, cookies)
    }

    async fn sign_out(&self, session: &Session, oidc: &OidcConfig, req: &Request<'_>) -> Reply {
        // CSRF: a cross-site form post must not sign anyone out. Browsers send Origin on POST;
        // without it, fall back to Referer.
        if !same_origin(&session.req_header().headers, req.origin) {
            self.audit.unverified_refusal(
                AUDIT_ROUTE,
                "a sign-out was posted from another site",
                &req.audited("POST", "/.portcullis/sign_out"),
            );
            return Reply::page(
                StatusCode::FORBIDDEN,
                "Sign-out refused",
                "<p>Sign out from the page Portcullis shows at /.portcullis/sign_out.</p>",
            );
        }
        // Every session the browser sends a cookie of that name for, whatever else the jar
        // holds: a sign-out that said so but left a session alive (one hidden by a jar stuffed
        // by a sibling host, or behind another cookie of the name set for a longer path)
        // would be worse than none.
        let sessions_in = |name: &str, found: &mut Vec<_>| {
            for id in cookies_in_any_jar(session.req_header(), name) {
                // One another sign-out is ending too: its write may fail.
                let Some((key, s)) = self.sessions.get_to_end(id) else {
                    continue;
                };
                if found.iter().all(|(k, _, _)| *k != key) {
                    found.push((key, s.identity.clone(), s.id_token(id)));
                }
            }
        };
        let mut current: Vec<_> = Vec::new();
        sessions_in(&session_cookie_name(oidc, req.tls), &mut current);
        // And the sessions of the same sign-in at the IdP (its `sid`) on other hosts: without a
        // cookie domain each host has a session of its own, and the IdP may never tell them of
        // this sign-out (Entra ID sends no back-channel logout).
        let signed_in_at_idp: Vec<(String, String, String)> = current
            .iter()
            .filter_map(|(_, identity, _)| {
                let sid = identity.idp_session.clone()?;
                Some((identity.issuer.clone(), identity.subject.clone(), sid))
            })
            .collect();
        if !signed_in_at_idp.is_empty() {
            let same_sign_in = |identity: &Identity| {
                signed_in_at_idp.iter().any(|(issuer, subject, sid)| {
                    identity.issuer == *issuer
                        && identity.subject == *subject
                        && identity.idp_session.as_deref() == Some(sid.as_str())
                })
            };
            for (key, s) in self.sessions.find(same_sign_in) {
                if current.iter().all(|(k, _, _)| *k != key) {
                    current.push((key, s.identity.clone(), None));
                }
            }
        }
        // And the sessions of the cookie's other spellings and earlier names: they vouch for
        // no one now, but would again were the name (or `cookie_domain`) set back as it was.
        // Ended only: a sibling host or a plain-http page can set these names, so they say
        // nothing of whom the IdP is to sign out.
        let earlier = self.sessions.cookie_names();
        let mut others = Vec::new();
        for name in std::iter::once(oidc.cookie_name.as_str()).chain(earlier.iter().map(|n| &**n)) {
            for spelling in [
                format!("__Host-{name}"),
                format!("__Secure-{name}"),
                name.into(),
            ] {
                sessions_in(&spelling, &mut others);
            }
        }
        others.retain(|(key, _, _)| current.iter().all(|(k, _, _)| k != key));
        let keys: Vec<_> = current
            .iter()
            .chain(&others)
            .map(|(key, _, _)| *key)
            .collect();
        if let Err(e) = self.sessions.end(&keys).await {
            // Gone from this replica only: not signed out until the store has it.
            tracing::error!("cannot end the session: {e}");
            return Reply::page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-out failed",
                "<p>Portcullis could not end your session just now. Try again in a moment.</p>",
            );
        }
        for (_, identity, _) in current.iter().chain(&others) {
            let who = Principal::Person(identity).log_name();
            self.audit.session(&who, "sign_out", "", req.client);
        }
        // The IdP is told whom to sign out only when that is one person: a cookie another
        // person planted (for a longer path, without `__Host-`) must not take the hint. Nor is
        // an ID token another issuer signed, or issued to another client (one configured
        // before a reload), sent to this one: the IdP would refuse the sign-out.
        let one_person = current.windows(2).all(|pair| {
            (&pair[0].1.issuer, &pair[0].1.subject) == (&pair[1].1.issuer, &pair[1].1.subject)
        });
        let id_token_hint = current
            .first()
            .filter(|(_, identity, _)| one_person && identity.issuer == oidc.issuer)
            .and_then(|(_, _, id_token)| id_token.clone())
            .filter(|id_token| super::oidc::issued_to(id_token, &oidc.client_id));
        let clear = session_cookie(oidc, req.tls, "", 0);
        // The configured issuer's end-session endpoint, never another's: after a reload that
        // moved to another IdP (off a compromised one, say), sign-outs end here until it is
        // discovered.
        let end_session = self.oidc.current(oidc).ok().and_then(|p| {
            p.metadata
                .additional_metadata()
                .end_session_endpoint
                .clone()
        });
        match end_session.and_then(|e| url::Url::parse(&e).ok()) {
            Some(endpoint) => {
                let url = end_session_url(endpoint, oidc, id_token_hint.as_deref());
                redirect(url.as_str(), vec![clear])
            }
            None => Reply::page(StatusCode::OK, "Signed out", "<p>You are signed out.</p>")
                .header(header::SET_COOKIE, clear),
        }
    }

    async fn backchannel_logout(
        &self,
        session: &mut Session,
        oidc: &OidcConfig,
        req: &Request<'_>,
        idle: std::time::Duration,
    ) -> Result<Reply> {
        // Every refusal is recorded, as anyone's: nothing here says who sent it.
        let audited = |reason: &str| {
            let request = req.audited("POST", "/.portcullis/backchannel_logout");
            self.audit.unverified_refusal(AUDIT_ROUTE, reason, &request);
        };
        let refuse = |status, reason: &str| {
            audited(reason);
            Ok(json_error(status, "invalid_request"))
        };
        let later = |reason: &str| {
            audited(reason);
            Ok(logout_later())
        };
        let too_large = "a back-channel logout's body is larger than any logout token";
        if !crate::reply::ready_for_body(session, MAX_LOGOUT_BODY as u64).await? {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, too_large);
        }
        let mut body = Vec::new();
        while let Some(chunk) = crate::reply::read_body(session, idle).await? {
            if body.len() + chunk.len() > MAX_LOGOUT_BODY {
                return refuse(StatusCode::PAYLOAD_TOO_LARGE, too_large);
            }
            body.extend_from_slice(&chunk);
        }
        let token = form_urlencoded::parse(&body)
            .find(|(k, _)| k == "logout_token")
            .map(|(_, v)| v.into_owned());
        let Some(token) = token else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "a back-channel logout without a logout_token",
            );
        };
        let now = now_unix();
        // Used once, fleet-wide: one this replica has not seen may have been taken by another,
        // or before a restart.
        let verified = self
            .oidc
            .verify_logout_token(oidc, &token, now)
            .await
            .and_then(|logout| {
                if self.sessions.logout_token_used(&oidc.issuer, &logout.jti) {
                    let used = "this logout token was already used".to_owned();
                    return Err(crate::auth::JwtError::Invalid(used));
                }
                Ok(logout)
            });
        let logout = match verified {
            Ok(logout) => logout,
            // Not known to be invalid: the IdP is told to try again (RFC 6749's
            // `temporarily_unavailable`), not that its token is bad, which it would drop, and
            // the sessions it ends would go on. A key the set lacks may be one the IdP has just
            // rotated to, which the set, fetched at most once in 10 s for what anyone posts
            // here, will have then.
            Err(crate::auth::JwtError::KeysUnavailable | crate::auth::JwtError::UnknownKey) => {
                return later(
                    "a back-channel logout token could not be verified yet: the provider's key \
                     that signed it could not be had",
                );
            }
            Err(e) => {
                let reason = format!("a back-channel logout token was refused: {e}");
                return refuse(StatusCode::BAD_REQUEST, &reason);
            }
        };
        let found = self
            .sessions
            .find(|identity| logout.ends(identity, &oidc.issuer));
        let keys: Vec<_> = found.iter().map(|(key, _)| *key).collect();
        let ending = self
            .sessions
            .end_for_logout(&keys, &oidc.issuer, &logout, now);
        // (An end saved with other replicas not waited for is written: see
        // `Sessions::write_end`. The token is used then, and a retry would be refused.)
        if let Err(e) = ending.await {
            self.oidc.unused_logout_token(&logout);
            tracing::error!("back-channel logout could not end sessions: {e}");
            return later(
                "the sessions a back-channel logout ends could not be ended: the store refused",
            );
        }
        // A sign-in of that IdP session stored before this logout was, though after its
        // sessions were found, is held here now: ended too. (One stored after it is ended by
        // its callback: see `Sessions::signed_out_by_idp`.)
        let late = self
            .sessions
            .find(|identity| logout.ends(identity, &oidc.issuer));
        let late_keys: Vec<_> = late.iter().map(|(key, _)| *key).collect();
        // Answered once their end is written, so that every replica has it when the IdP hears
        // back (or, where their progress cannot be read, once the store is read holding it).
        // The token is kept as used (an answer other than 200 has the IdP send it again, to be
        // refused): if the store refuses, the end is written until it holds, and they let
        // nobody in here meanwhile.
        let what = "the sessions signed in while a back-channel logout came".to_owned();
        self.sessions.end_for_good(&late_keys, what).await;
        // Whom the IdP signed out: the people whose sessions these were. None held (signed out
        // already): nothing ended. A session another end was taking meanwhile (a sign-out, a
        // sign-in's callback) may be recorded by both: that end's write may yet fail, and an
        // end twice recorded is better than one not recorded at all.
        let mut people: Vec<String> = (found.iter().chain(&late))
            .map(|(_, s)| Principal::Person(&s.identity).log_name())
            .collect();
        people.sort();
        people.dedup();
        let detail = format!("{} session(s) ended", keys.len() + late_keys.len());
        for who in &people {
            self.audit.session(who, "idp_logout", &detail, req.client);
        }
        Ok(Reply::empty(StatusCode::OK))
    }

    /// Whether the request carries a session that lets its person in (judged as any request's:
    /// a refresh due is made).
    async fn signed_in(&self, runtime: &Runtime, session: &Session, req: &Request<'_>) -> bool {
        let accept = [portcullis_config::Credential::Session];
        let header = session.req_header();
        let at = req.arrival(session);
        let authentication = self.authenticate(runtime, &accept, header, at, now_unix());
        authentication.await.caller().is_some()
    }

    /// The page (or JSON) of who the caller is; `Err` if there is none, `true` where a bearer
    /// token was refused (answered `invalid_token`, so its client gets a new one).
    async fn me(
        &self,
        session: &Session,
        runtime: &Runtime,
        req: &Request<'_>,
    ) -> Result<Reply, bool> {
        let config = &runtime.config;
        let authentication = self
            .authenticate(
                runtime,
                &[
                    portcullis_config::Credential::Session,
                    portcullis_config::Credential::Bearer,
                ],
                session.req_header(),
                req.arrival(session),
                now_unix(),
            )
            .await;
        if let Some(why) = authentication.refused_token() {
            let request = req.audited(session.req_header().method.as_str(), "/.portcullis/me");
            self.audit.refused_bearer(AUDIT_ROUTE, why, &request);
            if authentication.keys_unavailable() {
                return Ok(crate::auth::keys_unavailable());
            }
            return Err(true);
        }
        let caller = authentication.caller().ok_or(false)?;
        let gate = Gate {
            directory: &self.directory,
            identity: &config.identity,
            jwt_issuers: &config.jwt_issuers,
            current: true,
            now: crate::clock::now_unix(),
            forwards: None,
        };
        // A person's token replayed by a client its issuer takes none of theirs from, as a
        // route refuses it.
        if let Caller::Machine(machine) = caller {
            if let Some(client) = gate.unlisted_holder(machine) {
                // Behind, the directory may not know yet the agent whose client it is.
                if !req.current {
                    return Ok(json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "temporarily_unavailable",
                    ));
                }
                let request = req.audited(session.req_header().method.as_str(), "/.portcullis/me");
                let why = crate::gate::unlisted_client_reason(client);
                (self.audit).refusal_of_a_client(
                    &caller.log_name(),
                    client,
                    AUDIT_ROUTE,
                    &why,
                    &request,
                );
                return Err(true);
            }
        }
        let wants_json = session
            .req_header()
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        let (kind, subject, email, name, expires) = match caller {
            // At the latest when the configuration in force ends it (a reload may have
            // shortened `session_lifetime` since the sign-in).
            // An email the IdP says it has not verified is not who they are signed in as
            // (anyone may type another's into a profile): the subject stands, as in the
            // audit log and on the 403 page.
            Caller::Person { identity, .. } => (
                "person",
                identity.subject.clone(),
                (identity.email.clone()).filter(|_| identity.email_verified != Some(false)),
                identity.name.clone(),
                (config.oidc.as_ref()).map(|oidc| {
                    let lifetime = oidc.session_lifetime.as_secs();
                    identity
                        .expires
                        .min(identity.created.saturating_add(lifetime))
                }),
            ),
            // A person's token a client holds for them names that person, as the gate and
            // the audit log take it; an agent's own is the agent's.
            Caller::Machine(machine) if !machine.for_itself => (
                "person",
                machine.subject.clone(),
                (machine.email.clone()).filter(|_| machine.email_verified != Some(false)),
                None,
                None,
            ),
            Caller::Machine(machine) if gate.own_agent(machine).is_some() => {
                ("agent", machine.subject.clone(), None, None, None)
            }
            Caller::Machine(machine) => ("machine", machine.subject.clone(), None, None, None),
        };
        // The directory's view of this caller: their SCIM user and every group they are in.
        // (A view only, never an admission: it is shown even while a replica catches up.)
        let directory = gate.directory_view(caller.principal());
        // A token older than the agent acting with it is refused by every route before its
        // person is asked: so here.
        let outdated_agent = match &caller {
            Caller::Machine(machine) => gate.outdated_agent(machine),
            Caller::Person { .. } => None,
        };
        if outdated_agent.is_some() || directory.as_ref().is_some_and(|view| view.outlived) {
            // Not this user's session or token (any more): recorded, as a request through a
            // route would be (a session ended), and answered as no sign-in, never with the
            // record of whoever holds the name now.
            let request = req.audited(session.req_header().method.as_str(), "/.portcullis/me");
            match &caller {
                Caller::Person { session: key, .. } => {
                    self.audit
                        .revoked_session(&caller.log_name(), AUDIT_ROUTE, None, &request);
                    if let Err(e) = self.sessions.end(&[*key]).await {
                        tracing::error!("cannot end the session: {e}");
                    }
                }
                // With the agent a delegated token acts through, as a route records it: an
                // agent's refusals count toward its own share, for whomever it acts.
                Caller::Machine(machine) => {
                    let outdated = match outdated_agent {
                        Some(agent) => crate::gate::Outdated::Agent(agent),
                        None => crate::gate::Outdated::Caller(gate.acting_agent(machine)),
                    };
                    let (who, reason) =
                        crate::audit::outdated_token(&caller.log_name(), Some(&outdated));
                    let agent = outdated.agent();
                    (self.audit).refusal(&who, AUDIT_ROUTE, None, &reason, &request, agent);
                    return Err(true);
                }
            }
            return Err(false);
        }
        if wants_json {
            let body = serde_json::json!({
                "kind": kind,
                "subject": subject,
                "email": email,
                "name": name,
                "session_expires": expires,
                "directory": directory.as_ref().map(|d| serde_json::json!({
                    "user_name": d.user_name,
                    "active": d.active,
                    "groups": d.groups,
                })),
            });
            return Ok(Reply::json(StatusCode::OK, &body));
        }
        let mut rows = format!(
            "<p>Signed in as <strong>{}</strong>",
            escape(email.as_deref().unwrap_or(&subject))
        );
        if let Some(name) = &name {
            rows.push_str(&format!(" ({})", escape(name)));
        }
        rows.push_str("</p>");
        if let Some(expires) = expires {
            let left = i64::try_from(expires.saturating_sub(now_unix())).unwrap_or(i64::MAX);
            rows.push_str(&format!(
                "<p>Your session ends at the latest {}.</p>",
                crate::human::relative(left)
            ));
        }
        match &directory {
            Some(d) => {
                let groups: Vec<String> = d.groups.iter().map(|g| escape(g)).collect();
                rows.push_str(&format!(
                    "<p>Directory user <strong>{}</strong>{}; groups: {}.</p>",
                    escape(&d.user_name),
                    if d.active { "" } else { " (deactivated)" },
                    if groups.is_empty() {
                        "none".to_owned()
                    } else {
                        groups.join(", ")
                    },
                ));
            }
            None => rows.push_str("<p>You are not a user in the directory.</p>"),
        }
        // A person signed in can sign out; a machine or an agent has nothing to end.
        if matches!(caller, Caller::Person { .. }) {
            rows.push_str(SIGN_OUT_FORM);
        }
        Ok(Reply::page(StatusCode::OK, "Who am I", &rows))
    }
}

/// Whether a form post with `headers` comes from a page of `origin` (`scheme://host[:port]`):
/// browsers send `Origin` on a POST; without it, `Referer` is asked. A page whose referrer
/// policy is `no-referrer` (helmet's default) has the browser send `Origin: null` and no
/// `Referer` on its own forms: then `Sec-Fetch-Site`, which no page can set, says whether the
/// post is the origin's own (a sandboxed frame's, or another site's, says otherwise).
pub fn same_origin(headers: &http::HeaderMap, origin: &str) -> bool {
    let of_origin = |sent: &http::HeaderValue| {
        sent.to_str().is_ok_and(|sent| {
            sent == origin
                || sent
                    .strip_prefix(origin)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    };
    let own_by_fetch = || {
        headers
            .get("sec-fetch-site")
            .is_some_and(|site| site == "same-origin")
    };
    match (headers.get(header::ORIGIN), headers.get(header::REFERER)) {
        (Some(sent), _) if sent == "null" => own_by_fetch(),
        (Some(sent), _) | (None, Some(sent)) => of_origin(sent),
        (None, None) => own_by_fetch(),
    }
}

/// The sign-out button: a same-origin POST.
pub const SIGN_OUT_FORM: &str = "<form method=\"post\" action=\"/.portcullis/sign_out\"><button type=\"submit\">Sign out</button></form>";

fn json_error(status: StatusCode, error: &str) -> Reply {
    Reply::json(status, &serde_json::json!({ "error": error }))
}

/// An authorization error as it may be shown to anyone: its code if it is one of those RFC 6749
/// §4.1.2.1 and OpenID Connect Core §3.1.2.6 define, else none of its words.
fn error_code(error: &str) -> String {
    const CODES: [&str; 16] = [
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "interaction_required",
        "login_required",
        "account_selection_required",
        "consent_required",
        "invalid_request_uri",
        "invalid_request_object",
        "request_not_supported",
        "request_uri_not_supported",
        "registration_not_supported",
    ];
    match CODES.iter().find(|&&code| code == error) {
        Some(code) => (*code).to_owned(),
        None => "an error Portcullis does not know".to_owned(),
    }
}

fn sign_in_failed(e: &SignInError) -> Reply {
    let status = match e {
        SignInError::ProviderUnavailable
        | SignInError::Unreachable(_)
        | SignInError::Busy(_)
        | SignInError::UserInfoUnreachable(_)
        | SignInError::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        SignInError::UnknownState
        | SignInError::WrongBrowser
        | SignInError::OtherProvider
        | SignInError::Refused(_)
        | SignInError::RefusedElsewhere(_) => StatusCode::BAD_REQUEST,
        SignInError::Invalid(_) => StatusCode::BAD_GATEWAY,
    };
    let retry = match e {
        SignInError::ProviderUnavailable | SignInError::Unreachable(_) => {
            "<p>Reload this page in a moment to try again.</p>"
        }
        // The sign-in's code is spent by then: only a new sign-in can finish.
        SignInError::Busy(_)
        | SignInError::UserInfoUnreachable(_)
        | SignInError::KeysUnavailable => {
            "<p>Go back to the site in a moment to sign in again.</p>"
        }
        _ => "",
    };
    Reply::page(
        status,
        "Sign-in did not complete",
        &format!("<p>{}</p>{retry}", escape(&e.to_string())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_warning_is_due_a_minute_on_or_once_the_clock_steps_back() {
        assert!(warning_due(0, 1_000), "never logged");
        assert!(!warning_due(1_000, 1_059), "within a minute");
        assert!(warning_due(1_000, 1_060), "a minute on");
        assert!(warning_due(1_000, 900), "the clock stepped back");
    }

    #[test]
    fn an_idp_told_to_send_a_logout_again_waits_until_the_key_set_may_be_fetched_again() {
        let refetch = crate::auth::jwt::REFETCH_AFTER.as_secs().to_string();
        assert_eq!(LOGOUT_RETRY_AFTER, refetch);
    }

    #[test]
    fn a_sign_out_sends_entra_the_hint_only_where_the_address_stays_short() {
        let mut oidc = crate::testing::config("").oidc.unwrap();
        oidc.issuer = "https://login.microsoftonline.com/t/v2.0".to_owned();
        oidc.post_logout_redirect = Some("https://corp.example.com/bye".to_owned());
        let endpoint =
            url::Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/logout").unwrap();
        let read = |url: &url::Url, name: &str| {
            url.query_pairs()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.into_owned())
        };
        let short = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";
        let url = end_session_url(endpoint.clone(), &oidc, Some(short));
        assert_eq!(read(&url, "id_token_hint").as_deref(), Some(short));
        // An Entra ID token listing 200 group ids.
        let long = format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", "A".repeat(10_000));
        let url = end_session_url(endpoint.clone(), &oidc, Some(&long));
        assert!(
            url.as_str().len() <= MAX_ENTRA_END_SESSION_URL,
            "{}",
            url.as_str().len()
        );
        assert_eq!(read(&url, "id_token_hint"), None);
        assert_eq!(read(&url, "client_id"), Some(oidc.client_id.clone()));
        assert_eq!(
            read(&url, "post_logout_redirect_uri").as_deref(),
            Some("https://corp.example.com/bye")
        );
        // Okta needs the hint, and takes a long address.
        oidc.issuer = "https://corp.okta.com/oauth2/default".to_owned();
        let url = end_session_url(endpoint, &oidc, Some(&long));
        assert_eq!(read(&url, "id_token_hint").as_deref(), Some(long.as_str()));
    }
}
