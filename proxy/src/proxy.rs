//! The data plane: pingora's `ProxyHttp` phases for every request. This is glue: what it
//! decides, it asks the gate (`gate.rs`); what it answers itself, it writes with `reply.rs`.
//!
//! 1. `request_filter`, in order:
//!    1. snapshot the configuration; bound the request head (431);
//!    2. normalize the path once (400), find the host (400);
//!    3. answer Portcullis' own endpoints (`/.portcullis/…`) and SCIM;
//!    4. find the route (404, or 308 to https);
//!    5. authenticate: the session cookie or bearer token, from memory ([`crate::auth`]);
//!    6. ask the gate whether to let the request in ([`crate::gate::Gate::admit`]);
//!    7. a refusal is answered in `Proxy::answer`, the one place an admission becomes a 302,
//!       401 or 403; a request let in is remembered for step 5 below, and its body size bounded.
//! 2. `upstream_peer`: choose an upstream (round-robin over the healthy ones).
//! 3. `upstream_request_filter`: strip client-sent identity headers, set the caller's identity
//!    headers and signed assertion, `X-Forwarded-*` and `Host`, send the normalized path.
//! 4. `connected_to_upstream`: watch websockets and event streams, so they can be cut when
//!    their caller loses access (see [`crate::streams`]).
//! 5. `request_body_filter` / `response_body_filter`: enforce the body limit on streamed
//!    bodies; let no chunk or frame cross for a caller who has lost access since.
//! 6. `fail_to_connect` / `fail_to_proxy`: mark dead upstreams and retry, or answer with a page.
//! 7. `logging`: metrics and one access-log line.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use portcullis_config::{Credential, Scheme, CONSOLE_PATH, CONSOLE_ROUTE};

use crate::assertion::{AssertionClaims, Signer, ASSERTION_HEADER, JWKS_PATH};
use crate::audit;
use crate::auth::endpoints::{self, Served, BROWSER_COOKIE, SIGN_OUT_FORM};
use crate::auth::{cookies, session_cookie_name, Arrival, Authentication};
use crate::caller::{Caller, SessionKey};
use crate::clock::now_unix;
use crate::cookies;
use crate::gate::{accepts, Admission, Client, ClientOf, Facts, Forward, Pass, Refusal, Refused};
use crate::path;
use crate::reply::{self, escape, Reply};
use crate::routes::{CompiledRoute, Match};
use crate::state::{InFlight, Runtime, Shared};
use crate::streams::{Marks, Recheck, Registration, Target};

pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// What the upstream is sent, from the request as the client sent it: Portcullis' own
    /// headers, cookies and verified bearer token taken out; the caller's identity, the signed
    /// assertion, `Forwarded`, `X-Forwarded-*` and `Host` put in; the path the gate judged.
    fn edit_upstream_request(
        &self,
        session: &Session,
        request: &mut http::request::Parts,
        ctx: &RequestCtx,
    ) -> Result<()> {
        let headers = &mut request.headers;
        // Room for every header added below, so the map grows at most once.
        headers
            .try_reserve(11)
            .or_err(ErrorType::InvalidHTTPHeader, "too many request headers")?;
        // What is Portcullis' own never reaches the upstream: headers only it may set, its
        // cookies, and a bearer token it verified (unless the route passes it on).
        strip_reserved_headers(headers);
        // An HTTP/1.0 client's `Expect` is none (RFC 9110 §10.1.1): passed on, it would have
        // the upstream's `100 Continue` reach the client, read as the answer.
        if session.req_header().version == http::Version::HTTP_10 {
            headers.remove(http::header::EXPECT);
        }
        // A WebDAV COPY or MOVE writes where it was judged to (see `destination`).
        if let Some(destination) = &ctx.destination {
            let value = HeaderValue::from_bytes(destination.as_bytes()).or_err(
                ErrorType::InvalidHTTPHeader,
                "cannot pass the Destination on",
            )?;
            headers.insert(HeaderName::from_static("destination"), value);
        }
        // Without [oidc] (removed by a reload, say) browsers still send the session cookie
        // they were given: it is taken out under its default name.
        if let Some(runtime) = &ctx.runtime {
            let earlier = self.shared.auth.sessions.cookie_names();
            strip_own_cookies(headers, OwnCookies::new(runtime.session_cookie(), &earlier));
        }
        // On a route that takes bearer tokens, a bearer token is Portcullis' to read: it goes
        // on only as one Portcullis verified and the gate let in as its caller (`forward`),
        // and only where the route says so. One that did not verify (expired, or its key not
        // fetched yet), or whose caller the gate did not let in as such (a token for another
        // audience, a deactivated machine: in by a public rule as anyone), is never passed.
        // Another scheme (an upstream's own Basic login) is the upstream's.
        // Elsewhere, a token that says it is for Portcullis (one of its issuers', for one of
        // their audiences) is not passed on either: an agent that sends its token to a
        // session route must not hand that upstream a token it could replay where Portcullis
        // takes it. The upstream's own tokens pass.
        if let (Some(route), Some(runtime)) = (&ctx.route, &ctx.runtime) {
            let verified = matches!(ctx.caller, Some(Caller::Machine(_))) && ctx.forward.is_some();
            if route.config.accept.contains(&Credential::Bearer) {
                if !(verified && route.config.pass_authorization) {
                    remove_bearer_tokens(headers, |_| true);
                }
            } else {
                // A SCIM token sent to a mistyped base URL (`/SCIM/v2`), or the admin token to
                // a routed host, is Portcullis' too.
                remove_bearer_tokens(headers, |token| runtime.is_own_token(token));
            }
        }
        let mut set = |name: HeaderName, value: HeaderValue| {
            headers
                .try_insert(name, value)
                .map(drop)
                .or_err(ErrorType::InvalidHTTPHeader, "too many request headers")
        };
        let text = |value: &str| {
            HeaderValue::from_str(value).or_err(
                ErrorType::InvalidHTTPHeader,
                "an identity header value is not a valid header value",
            )
        };
        if let (Some(runtime), Some(route), Some(forward)) =
            (&ctx.runtime, &ctx.route, &ctx.forward)
        {
            if route.config.identity_headers {
                let names = &runtime.config.identity;
                // `or_err_with`: pingora's `or_err` on an `Option` makes its error even when
                // there is none to report.
                let values = forward
                    .values
                    .as_ref()
                    .or_err_with(ErrorType::InvalidHTTPHeader, || {
                        "an identity header value is not a valid header value"
                    })?;
                set(names.header_user.clone(), values.user.clone())?;
                if let Some(email) = &values.email {
                    set(names.header_email.clone(), email.clone())?;
                }
                set(names.header_groups.clone(), values.groups.clone())?;
                if let Some(agent) = &forward.agent {
                    set(AGENT_HEADER, text(&agent.name)?)?;
                }
            }
            if route.config.assertion {
                let issuer = runtime.assertion_issuer.as_str();
                let claims = AssertionClaims {
                    issuer,
                    audience: &route.config.name,
                    served: ctx.served.as_deref(),
                    subject: &forward.user,
                    email: forward.email.as_deref(),
                    groups: &forward.group_names,
                    agent: forward.agent.as_ref().map(|a| a.name.as_str()),
                    delegated: forward
                        .agent
                        .as_ref()
                        .is_some_and(|a| a.on_behalf_of.is_some()),
                    version: forward.version,
                };
                // Fail closed: an upstream that relies on the assertion never gets the request
                // without it.
                let token = assertion(&self.shared.signer, &forward.named, &claims, now_unix())
                    .or_err(
                        ErrorType::InternalError,
                        "cannot sign the identity assertion",
                    )?;
                set(ASSERTION_HEADER, token)?;
            }
        }

        let client_ip = ctx.client_ip;
        let proto = if ctx.tls { "https" } else { "http" };
        let client_host = session
            .req_header()
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                let authority = session.req_header().uri.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            });
        let (forwarded, forwarded_for) =
            forwarding_headers(client_ip, client_host.as_ref(), ctx.tls).or_err(
                ErrorType::InvalidHTTPHeader,
                "the Forwarded header made for the request is not a valid header value",
            )?;
        set(header::FORWARDED, forwarded)?;
        if let Some(forwarded_for) = forwarded_for {
            set(X_FORWARDED_FOR, forwarded_for)?;
        }
        set(X_FORWARDED_PROTO, HeaderValue::from_static(proto))?;
        if let Some(client_host) = client_host {
            set(X_FORWARDED_HOST, client_host.clone())?;
            let route = ctx.route.as_ref().filter(|r| r.config.preserve_host);
            if route.is_some() {
                set(header::HOST, client_host)?;
            }
        }
        if let (Some(route), Some(index)) = (&ctx.route, ctx.upstream) {
            if !route.config.preserve_host {
                if let Some(host) = route.upstreams.host_header(index) {
                    set(header::HOST, host.clone())?;
                }
            }
        }
        // A watched stream's upstream socket may be shut down by `Streams` until the request
        // is over, which is after pingora has pooled its connection: a cut then would cut the
        // next request on it, another caller's. So an event stream's connection is not pooled
        // (a websocket's is not once upgraded; one the upstream refuses stops being watched,
        // see `upstream_response_filter`).
        // Windows authentication (`Negotiate`, `NTLM`) logs in the connection, not the request:
        // IIS serves what else comes on it as whoever logged in, so a pooled connection would
        // carry one caller's login to the next caller's requests. (NTLM's handshake spans two
        // requests on one connection, so it cannot complete through Portcullis; Kerberos can.)
        // A websocket handshake keeps its `Connection: upgrade`, which the upstream checks (and
        // a `close` beside it has hyper answer `Connection: close` in place of `upgrade`): its
        // connection is not pooled once upgraded.
        // A websocket handshake that also asks for an event stream (no client sends both) goes
        // as an ordinary request: an upstream that answered the stream and not the upgrade left
        // it on a connection neither closed after it nor watched while it was idle.
        // (Asked by the client: a `Connection` naming `Accept` took it out of what goes up.)
        if ctx.long_lived && accepts(&session.req_header().headers, b"text/event-stream") {
            request.headers.remove(header::UPGRADE);
        }
        // An answer to HEAD has no body, and pingora reads none: one an upstream sends all the
        // same (answering HEAD as GET) would be the next request's answer on a pooled
        // connection, one made for another caller. HEAD goes on a connection of its own.
        let head = request.method == http::Method::HEAD;
        if head {
            // A websocket's handshake is a GET (RFC 6455 §4.1).
            request.headers.remove(header::UPGRADE);
        }
        let upgrade = request.headers.contains_key(header::UPGRADE);
        if !upgrade && (ctx.long_lived || head || logs_in_the_connection(&request.headers)) {
            request
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }

        if let Some(target) = &ctx.upstream_target {
            request.uri = http::Uri::builder()
                .path_and_query(target.as_str())
                .build()
                .or_err(
                    ErrorType::InvalidHTTPHeader,
                    "the normalized request target is not a valid URI",
                )?;
        }
        Ok(())
    }

    /// What the client is sent of the upstream's answer: [`edit_answer`], and a warning for
    /// each of Portcullis' cookies the upstream tried to set or clear.
    fn edit_upstream_response(
        &self,
        response: &mut http::response::Parts,
        ctx: &RequestCtx,
    ) -> Result<()> {
        let route = || ctx.route.as_ref().map_or("", |r| r.config.name.as_str());
        let earlier = self.shared.auth.sessions.cookie_names();
        let session_cookie = ctx
            .runtime
            .as_ref()
            .map(|r| OwnCookies::new(r.session_cookie(), &earlier));
        if ctx.preflight {
            preflight_answer(response);
            return Ok(());
        }
        let identified = ctx.caller.is_some();
        let edits = edit_answer(response, session_cookie, identified)?;
        // An upstream that keys its answer on who is calling (`Vary: X-Portcullis-User`) keys
        // it on headers only Portcullis sends it: a cache in front never sees them and would
        // keep one answer for everyone. So it is private, whatever else it says, to a CDN too.
        if let (true, true, Some(runtime)) = (identified, edits.varies, &ctx.runtime) {
            let identity = &runtime.config.identity;
            if varies_on_what_portcullis_tells(&response.headers, identity) {
                let private = made_private(&response.headers)
                    .or_err(ErrorType::InternalError, "cannot mark the answer private")?;
                response.headers.insert(header::CACHE_CONTROL, private);
                for name in cdn_cache_fields(&response.headers) {
                    response.headers.remove(name);
                }
            }
        }
        if edits.own_set_cookies > 0 {
            tracing::warn!(
                route = route(),
                dropped = edits.own_set_cookies,
                "an upstream's Set-Cookie for Portcullis' own cookie was removed"
            );
        }
        if edits.cleared_cookies {
            tracing::warn!(
                route = route(),
                "an upstream's Clear-Site-Data naming cookies was removed"
            );
        }
        Ok(())
    }
}

/// What [`edit_answer`] took out that the upstream meant for Portcullis' cookies.
#[derive(Debug, Default, PartialEq)]
struct AnswerEdits {
    own_set_cookies: usize,
    cleared_cookies: bool,
    /// Not an edit: whether the answer has a `Vary` (read in the same pass).
    varies: bool,
}

/// An upstream's answer as the client gets it: the headers for the hop it came over taken out,
/// and Portcullis' cookies (`own`, when there is a runtime), which only it sets or clears; an
/// answer to someone `identified` marked private.
fn edit_answer(
    response: &mut http::response::Parts,
    session_cookie: Option<OwnCookies<'_>>,
    identified: bool,
) -> Result<AnswerEdits> {
    let headers = &mut response.headers;
    // Most answers have none of the headers edited below: one pass over their names says which
    // they have, where asking the map for each would hash all six.
    let mut present = Present::in_answer(headers);
    let mut edits = AnswerEdits {
        varies: present.vary,
        ..AnswerEdits::default()
    };
    // What the upstream's `Connection` names is about its connection to Portcullis, not the
    // client's (pingora says its own `Connection` to an HTTP/1 client, and drops these for
    // HTTP/2 ones): first, so that the rules below see what the client will get.
    if present.hop_by_hop {
        strip_hop_by_hop(headers, response.status);
        // `Connection` may name any of the others.
        present = Present::in_answer(headers);
    }
    // A length said more than once (`5, 5`, or two lines: pingora takes equal ones) goes to the
    // client said once: h2 clients reset the stream over it, and Go and Node refuse it.
    if present.length_said_again {
        if let Some(length) = length_of(headers) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    // Portcullis' cookies are its own to set: an upstream that sets one (its operator's
    // session, to sign visitors in as someone else) or clears one is not obeyed.
    // Without [oidc] too: browsers keep what an upstream plants until sign-in is back.
    if let (true, Some(session_cookie)) = (present.set_cookie, session_cookie) {
        edits.own_set_cookies = strip_own_set_cookies(headers, session_cookie);
    }
    // Nor may it clear them: browsers apply `Clear-Site-Data: "cookies"` to the whole site,
    // every host of it, so one page would sign its visitors out everywhere.
    if present.clear_site_data && clears_cookies(headers) {
        headers.remove(&CLEAR_SITE_DATA);
        edits.cleared_cookies = true;
    }
    // Nor send the browser elsewhere: an `Alt-Svc` is kept for the origin, which is
    // Portcullis', and would have the browser take every later request of it (its session
    // cookie, a sign-in's callback) to the endpoint the upstream names, for as long as it says.
    // No upstream has one to give (Caddy sends its own by default, `h3=":443"`).
    if present.alt_svc {
        headers.remove(header::ALT_SVC);
    }
    // An answer to someone identified is theirs: a shared cache in front (a CDN, a caching
    // load balancer) must not keep it for others. The upstream cannot tell, as it never sees
    // Portcullis' cookie or token; what it says itself of who may store it stands.
    if identified
        && response.status.as_u16() >= 200
        && !(present.cache_control && says_who_may_store(headers))
    {
        // Room for pingora's `Date` and `Connection` too: the map grows once, not twice. (A
        // second field line adds to the upstream's: `must-revalidate` becomes
        // `must-revalidate, private`.)
        headers
            .try_reserve(3)
            .and_then(|()| {
                headers.try_append(header::CACHE_CONTROL, HeaderValue::from_static("private"))
            })
            .or_err(ErrorType::InternalError, "cannot mark the answer private")?;
    }
    Ok(edits)
}

/// Which of the headers [`edit_answer`] edits an answer has.
#[derive(Default)]
struct Present {
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, or a `Connection` that names any option but
    /// `keep-alive` and `close`.
    hop_by_hop: bool,
    /// A `Content-Length` on more than one line, or a list.
    length_said_again: bool,
    set_cookie: bool,
    clear_site_data: bool,
    alt_svc: bool,
    cache_control: bool,
    vary: bool,
}

impl Present {
    fn in_answer(headers: &http::HeaderMap) -> Self {
        let mut present = Self::default();
        let mut length_said = false;
        for (name, value) in headers {
            if *name == header::CONNECTION {
                present.hop_by_hop |= connection_options(value).next().is_some();
            } else if *name == header::CONTENT_LENGTH {
                present.length_said_again |= length_said || value.as_bytes().contains(&b',');
                length_said = true;
            } else if *name == KEEP_ALIVE || *name == PROXY_CONNECTION || *name == header::TE {
                present.hop_by_hop = true;
            } else if *name == header::SET_COOKIE {
                present.set_cookie = true;
            } else if *name == CLEAR_SITE_DATA {
                present.clear_site_data = true;
            } else if *name == header::ALT_SVC {
                present.alt_svc = true;
            } else if *name == header::CACHE_CONTROL {
                present.cache_control = true;
            } else if *name == header::VARY {
                present.vary = true;
            }
        }
        present
    }
}

pub struct RequestCtx {
    started: Instant,
    /// The configuration this request lives by, whatever reloads meanwhile.
    runtime: Option<Arc<Runtime>>,
    route: Option<Arc<CompiledRoute>>,
    /// The request target the upstream gets, when it is not the one the client sent: the
    /// normalized path and the query.
    upstream_target: Option<String>,
    tls: bool,
    /// The listener's address, and whether its own TLS carried the request (`tls` is also
    /// set by a TLS proxy in front).
    local: Option<std::net::SocketAddr>,
    own_tls: bool,
    /// The client's address: its connection's, or the one a trusted proxy in front names.
    client_ip: Option<IpAddr>,
    round_robin_start: usize,
    /// The upstreams this request could not reach, before the one it is at (`upstream`).
    tried: Vec<usize>,
    upstream: Option<usize>,
    /// The address `upstream` was at when picked.
    upstream_at: Option<pingora::protocols::l4::socket::SocketAddr>,
    /// Whether the attempt at `upstream` went out on a pooled connection: one the upstream
    /// closed as it went (the keep-alive race) says nothing of whether it can be reached.
    reused: bool,
    upstream_started: Option<Instant>,
    body_bytes: u64,
    /// Answered by the SCIM endpoint rather than proxied.
    scim: bool,
    /// Who is calling, once authenticated, let in or not (for the access log).
    caller: Option<Caller>,
    /// What the upstream is told about the caller, once let in.
    forward: Option<Forward>,
    /// For a request let upstream (not a CORS preflight): the marks read just before it was
    /// let in. Its body and connection carry on while they stand (nobody's, while the
    /// configuration does); once they move, it is judged again (`recheck`).
    decided_at: Option<Marks>,
    /// A request let in with a caller, as it is judged again while its body or connection
    /// lasts: made when first needed (a websocket or event stream, or marks that moved), from
    /// the caller, the route, the method and the judged path.
    recheck: Option<Arc<Recheck>>,
    /// A websocket or event stream: watched while open, see [`crate::streams`].
    long_lived: bool,
    /// A websocket handshake on a route that takes them.
    websocket: bool,
    /// A watched request went upstream asking for a websocket (with its `Upgrade`, which
    /// pingora takes off one it does not pass as such).
    upgrade_sent: bool,
    /// A CORS preflight let through as nobody's: its answer goes back as one (see
    /// [`preflight_answer`]).
    preflight: bool,
    /// The `Destination` of a WebDAV COPY or MOVE, as judged (see [`destination`]).
    destination: Option<String>,
    /// On a `*.` route that sends the assertion, the URL of the host served, with the route's
    /// path (`https://a.apps`, `https://a.apps/admin/`; see `AssertionClaims::served`).
    served: Option<Box<str>>,
    registration: Option<Registration>,
    _in_flight: InFlight,
    /// Over HTTP/2: counted among its connection's requests under way.
    _h2_under_way: Option<crate::state::H2UnderWay>,
}

/// The request as step 1.7 needs it after the session has been borrowed mutably.
struct Asked {
    method: String,
    path: String,
    client: Client,
    /// The address it came from.
    client_ip: Option<IpAddr>,
    /// `scheme://host[:port]` as the client addressed the request.
    origin: String,
    host: String,
    tls: bool,
    path_and_query: String,
}

impl Asked {
    /// `req`, judged at the normalized `path`.
    fn of(req: &RequestHeader, path: String, origin: String, host: String, at: At) -> Asked {
        Asked {
            method: req.method.as_str().to_owned(),
            path,
            client: Client::of(&req.headers),
            client_ip: at.client_ip,
            origin,
            host,
            tls: at.tls,
            path_and_query: req
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
        }
    }

    /// The request as its audit records say it.
    fn audited(&self) -> audit::Request<'_> {
        audit::Request {
            method: &self.method,
            path: &self.path,
            client: self.client_ip,
        }
    }
}

/// How a request reached Portcullis: over https (its own TLS or a proxy's), and from where.
#[derive(Debug, Clone, Copy)]
struct At {
    tls: bool,
    client_ip: Option<IpAddr>,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Box<RequestCtx>;

    /// No downstream modules: pingora's default response compression (off at level 0, but
    /// still set up and called for every request) is of no use to Portcullis.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> Self::CTX {
        Box::new(RequestCtx {
            started: Instant::now(),
            runtime: None,
            route: None,
            upstream_target: None,
            tls: false,
            local: None,
            own_tls: false,
            client_ip: None,
            round_robin_start: 0,
            tried: Vec::new(),
            upstream: None,
            upstream_at: None,
            reused: false,
            upstream_started: None,
            body_bytes: 0,
            scim: false,
            caller: None,
            forward: None,
            decided_at: None,
            recheck: None,
            long_lived: false,
            websocket: false,
            upgrade_sent: false,
            preflight: false,
            destination: None,
            served: None,
            registration: None,
            _in_flight: InFlight::begin(),
            _h2_under_way: None,
        })
    }

    /// The endpoints, SCIM and refusals are awaited boxed: pingora boxes this hook's future
    /// for every request, and their state machines (kilobytes, the console's and SCIM's) would
    /// otherwise make it that large and be copied for every proxied request.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // 1.1 The configuration this request lives by, whatever reloads meanwhile, and the
        // count of reloads as of it (read first: see 1.5).
        let reloads = self.shared.reloads();
        let runtime = self.shared.runtime.load_full();
        ctx.runtime = Some(runtime.clone());
        // A client connection is not kept for ever (pingora keeps an HTTP/1.1 one idle without
        // end): idle after this request, it is closed in time. (And one that does not read a
        // large answer: see `upstream_response_filter`.)
        if session.get_keepalive() == Some(0) {
            let idle = runtime.config.server.client_idle_timeout;
            session.set_keepalive(Some(idle.as_secs()));
        }
        // An HTTP/1.0 client reads no interim answer (RFC 9110 §15.2): an upstream's `103
        // Early Hints` would be taken for the answer. (Nor a chunked one: `response_filter`.)
        if session.req_header().version == http::Version::HTTP_10 {
            session.set_ignore_info_resp(true);
        }
        // Over HTTP/2 an answer of any size, Portcullis' own page as well as the upstream's,
        // waits on the client's flow-control window: one that opens none (a window of 0) would
        // be waited on for ever, with the upstream's connection held. Every write is timed.
        if session.req_header().version == http::Version::HTTP_2 {
            session.set_write_timeout(Some(runtime.config.server.client_idle_timeout));
        }
        // Made over https: to this listener's TLS, or to a proxy's in front of it.
        let own_tls = session
            .digest()
            .is_some_and(|digest| digest.ssl_digest.is_some());
        ctx.local = local_addr(session);
        ctx.own_tls = own_tls;
        ctx.tls = runtime.over_https(ctx.local, own_tls);
        let req = session.req_header();
        let max_bytes = runtime.config.server.max_request_header_bytes;
        // pingora reads at most `MAX_FIELDS` of an HTTP/1 head; an HTTP/2 one is bounded by
        // its size alone, which lets in ten times as many small fields, enough that an
        // upstream that keeps the first 2,000 (Node) would drop Portcullis' own, set last.
        let head_too_large = if fields(req) > MAX_FIELDS {
            Some(format!("it has more than {MAX_FIELDS} header fields"))
        } else {
            // Sign-ins in progress on TLS are not counted (see `cookies_past_bound`): tabs
            // restored at once, each sent to sign in, must not make every request 431.
            let size = head_size(req);
            let signing_in = || {
                let cookies = req.headers.get_all(header::COOKIE);
                crate::auth::signing_in(&cookies, ctx.tls)
            };
            (size > max_bytes && size.saturating_sub(signing_in()) > max_bytes)
                .then(|| format!("its head is larger than {max_bytes} bytes"))
        };
        // HTTP/1 parsers drop the whitespace around a field value; HTTP/2 hands a value on as
        // sent (RFC 9113 §8.2.1 calls it malformed; servers and clients differ). ` Bearer
        // <token>` would be no bearer token to Portcullis (never verified, never removed) and
        // one to an HTTP/1 upstream, which trims it. Trimmed before anything reads them, as
        // HTTP/1 would have it, so that Portcullis and the upstream read the same value.
        if head_too_large.is_none() && req.version == http::Version::HTTP_2 {
            trim_padded_values(session.req_header_mut());
        }
        let req = session.req_header();
        ctx.client_ip =
            runtime.client_ip(peer_ip(session), local_addr(session), own_tls, &req.headers);
        // Over HTTP/2, only so many of a connection's requests are served at once (see
        // `state::h2_under_way_bound`): one past them is refused before anything else is done
        // for it.
        if session.req_header().version == http::Version::HTTP_2 {
            if let Some(digest) = session.digest() {
                let (under_way, count) = crate::state::H2UnderWay::begin(digest);
                ctx._h2_under_way = Some(under_way);
                // Whether the connection is a trusted proxy's is asked only past a client's.
                let past = |trusted| count > crate::state::h2_under_way_bound(trusted);
                let trusted =
                    || runtime.from_trusted_proxy(peer_ip(session), local_addr(session), own_tls);
                if past(false) && past(trusted()) {
                    let bound = crate::state::h2_under_way_bound(trusted());
                    let refused = Reply::status_page(StatusCode::TOO_MANY_REQUESTS);
                    let why = format!(
                        "a request was refused: its HTTP/2 connection has more than {bound} \
                         requests under way (it resets streams it opened, their requests going \
                         on here)"
                    );
                    return self
                        .refuse_as_sent(session, ctx.client_ip, NO_ROUTE, refused, &why)
                        .await;
                }
            }
        }
        if let Some(why) = head_too_large {
            let reason = format!("a request was refused: {why}");
            let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            // Sign-ins begun in many tabs at once may have made it so: all but the newest the
            // browser keeps expire, so that its next request is not.
            let keep = crate::auth::endpoints::MAX_PENDING_SIGN_INS;
            let expired = crate::auth::endpoints::pending_past(req, ctx.tls, keep);
            let refused = (expired.into_iter())
                .fold(Reply::status_page(status), |reply, cookie| {
                    reply.header(header::SET_COOKIE, cookie)
                });
            return self
                .refuse_as_sent(session, ctx.client_ip, NO_ROUTE, refused, &reason)
                .await;
        }

        // An HTTP/1.0 request may come without `Host`: with an absolute target, the host it
        // asks for is the target's (RFC 9112 §3.2.2), which pingora keeps out of its URI. Given
        // it as its `Host`, it is read, judged and sent on as any request is.
        if let Some(host) = target_host_for(session.req_header()) {
            session.req_header_mut().insert_header(header::HOST, host)?;
        }
        // An OPTIONS without a body may be a CORS preflight (see 1.6). Known from the framing
        // (HTTP/2's end of stream too), which only the session reads.
        let bodiless_options =
            session.req_header().method == http::Method::OPTIONS && session.is_body_empty();
        let req = session.req_header();

        // A method is case-sensitive (RFC 9110 §9.1): Go and PHP keep `get` as sent, which is
        // not GET to them, while rules name methods in any case. Refused, as nginx does.
        if req.method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            let why = "a method in lower case";
            return self
                .bad_request(session, ctx.client_ip, NO_ROUTE, why)
                .await;
        }

        // TRACE (and Microsoft's TRACK) has the upstream echo the request it received: the
        // signed assertion and the identity headers, which are the upstream's to read, would
        // go back to the client, to be replayed to the upstream past Portcullis for as long
        // as the assertion lasts. Refused, as nginx does.
        if echoes_request(req.method.as_str()) {
            // RFC 9110 §15.5.6: a 405 says which methods are taken. Any other is passed on,
            // for the upstream to take or not; these are the ones HTTP itself defines.
            let refused = Reply::status_page(StatusCode::METHOD_NOT_ALLOWED).header(
                header::ALLOW,
                "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH",
            );
            let why = "a request was refused: TRACE echoes what upstreams are told";
            return self
                .refuse_as_sent(session, ctx.client_ip, NO_ROUTE, refused, why)
                .await;
        }

        // A body coded before its chunks (`gzip, chunked`): pingora takes off the chunks only,
        // and the upstream would be sent the coded bytes as the body itself. Refused, as RFC
        // 9112 §6.1 has a server refuse a transfer coding it does not understand.
        if codes_its_body(&req.headers) {
            let refused = Reply::status_page(StatusCode::NOT_IMPLEMENTED);
            let why = "a request was refused: its body has a transfer coding other than chunked";
            return self
                .refuse_as_sent(session, ctx.client_ip, NO_ROUTE, refused, why)
                .await;
        }

        // 1.2 The request target, read as any upstream must read it: a path, or the URL of a
        // host served here. Then one normalized path: routed, judged and sent upstream.
        let (target, host) = match (path::target(req.raw_path()), request_host(req)) {
            (Ok(target), Some(host)) => (target, host),
            (Err(e), _) => {
                return self
                    .bad_request(session, ctx.client_ip, NO_ROUTE, &e.to_string())
                    .await
            }
            (_, None) => {
                return self
                    .bad_request(session, ctx.client_ip, NO_ROUTE, "no valid host")
                    .await
            }
        };
        // An IPv6 address as the host is read (`request_host`), in its routes' text form.
        let foreign = |named: &str| !names_host(named, &host) || !runtime.serves(&host);
        if target.host.is_some_and(foreign) {
            let why = "an absolute request target names another host than Host";
            return self
                .bad_request(session, ctx.client_ip, NO_ROUTE, why)
                .await;
        }
        let normalized = match path::normalize(target.path) {
            Ok(normalized) => normalized,
            Err(e) => {
                return self
                    .bad_request(session, ctx.client_ip, NO_ROUTE, &e.to_string())
                    .await
            }
        };

        // 1.3 Portcullis' own endpoints and SCIM.
        if let Some(endpoint) = normalized.strip_prefix("/.portcullis/") {
            let endpoint = endpoint.to_owned();
            let host = host.into_owned();
            let at = At {
                tls: ctx.tls,
                client_ip: ctx.client_ip,
            };
            let own = self.own_endpoint(session, &runtime, reloads, &endpoint, &host, at);
            return Box::pin(own).await;
        }
        if let Some(scim) = runtime
            .scim
            .as_ref()
            .filter(|s| s.claims(&host, &normalized))
        {
            ctx.scim = true;
            if !runtime.carries_credentials(local_addr(session), ctx.tls) {
                // Its token has just crossed the network in clear: worth a record.
                let request = audit::Request {
                    method: req.method.as_str(),
                    path: &normalized,
                    client: ctx.client_ip,
                };
                self.shared.audit.unverified_refusal(
                    "scim",
                    "a SCIM request over plain HTTP off loopback (its token crossed in clear)",
                    &request,
                );
                return crate::scim_http::refuse(session, PLAIN_HTTP).await;
            }
            let path = normalized.into_owned();
            let audit = &self.shared.audit;
            let idle = runtime.config.server.client_idle_timeout;
            let runtimes = &self.shared.runtime;
            let served = scim.serve(
                session,
                &path,
                ctx.tls,
                ctx.client_ip,
                audit,
                idle,
                runtimes,
                // Reads would answer from a directory that may be stale (empty, at start).
                self.shared.directory_is_current(),
                self.shared.needs_restart(),
            );
            return Box::pin(served).await;
        }

        // 1.4 The route.
        let route = match runtime
            .routes
            .find(Runtime::scheme_of(ctx.tls), &host, &normalized)
        {
            Match::Found(route) => route,
            Match::WrongScheme(route) if route.config.scheme == Scheme::Https => {
                // Counted as the route's, as every answer to a request a route holds is.
                ctx.route = Some(route.clone());
                // A bearer token sent here has crossed the network in clear: refused and
                // recorded, as one sent to an http route here is (`Auth::authenticate`), not
                // sent on to https to be taken there.
                let in_clear = route.config.accept.contains(&Credential::Bearer)
                    && crate::auth::bearer_token(req).is_some()
                    && !runtime.carries_credentials(local_addr(session), ctx.tls);
                if in_clear {
                    let why = format!("a bearer token was refused: {}", crate::auth::IN_CLEAR);
                    let (name, refused) = (&route.config.name, plain_http_challenge());
                    return (self.refuse_as_sent(session, ctx.client_ip, name, refused, &why))
                        .await;
                }
                let location = https_location(&host, runtime.https_port, req);
                let reply = Reply::status_page(StatusCode::PERMANENT_REDIRECT)
                    .header(header::LOCATION, location);
                return reply::send(session, reply).await;
            }
            // On this listener's own TLS, a host nothing here serves most likely came on a
            // connection a browser reused for another name its certificate covers (HTTP/2
            // coalescing): 421 has it ask again on a connection of its own.
            Match::WrongScheme(_) | Match::None if own_tls && !runtime.serves(&host) => {
                let reply = Reply::status_page(StatusCode::MISDIRECTED_REQUEST);
                return reply::send(session, reply).await;
            }
            Match::WrongScheme(_) | Match::None => {
                return reply::send(session, Reply::status_page(StatusCode::NOT_FOUND)).await;
            }
        };
        // From here every answer is the route's (its metrics and access log say so), the
        // 400s and 413s before it is judged among them.
        ctx.route = Some(route.clone());
        if let Some(why) = runtime.routes.refuses(
            Runtime::scheme_of(ctx.tls),
            &host,
            route,
            &normalized,
            target.query,
        ) {
            return self
                .bad_request(session, ctx.client_ip, &route.config.name, why)
                .await;
        }
        let path: &str = &normalized;
        // The upstream gets the path judged and the query as sent: the request line is rebuilt
        // unless it already says exactly that.
        let as_sent = target.host.is_none()
            && matches!(normalized, Cow::Borrowed(_))
            && req
                .uri
                .path_and_query()
                .is_some_and(|pq| pq.as_str().as_bytes() == req.raw_path());
        if !as_sent {
            ctx.upstream_target = Some(match target.query {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            });
        }

        // 1.5 Who is calling. The marks are read first, so that a change landing while the
        // decision is made is noticed by the recheck of an open connection. Their second is
        // the decision's "now". Their reload count is the one read before the runtime: a
        // reload installed since is one this decision did not see.
        let decided_at = self.shared.marks_as_of(reloads);
        let authentication = self
            .shared
            .auth
            .authenticate(
                &runtime,
                &route.config.accept,
                req,
                Arrival {
                    tls: ctx.tls,
                    local: local_addr(session),
                    host: &host,
                },
                decided_at.second,
            )
            .await;

        // 1.6 The gate. A CORS preflight, where the route lets them through, is the
        // upstream's to answer, as nobody's: browsers send it without credentials, and it asks
        // for nothing of anyone's.
        let facts = Facts {
            route: &route.config,
            method: req.method.as_str(),
            path,
            client: ClientOf::Headers(&req.headers),
        };
        let preflight = bodiless_options && route.config.cors_preflight && is_cors_preflight(req);
        let admission = if preflight {
            Admission::Allow(Pass {
                forward: None,
                why: None,
            })
        } else {
            self.shared
                .gate(&runtime, &decided_at)
                .admit(&facts, authentication.presented())
        };

        // 1.7 In, or answered here. WebDAV's COPY and MOVE write where `Destination` says
        // (nginx's and Go's DAV take `/admin/x` there as it stands): judged as the path is,
        // for the same caller, on the same route, and sent upstream as judged.
        let mut destination: Option<(String, String)> = None;
        let admission = match (admission, self::destination(req, &host, ctx.tls)) {
            (admission @ Admission::Refuse(_), _) | (admission, Ok(None)) => admission,
            (Admission::Allow(pass), Ok(Some((path, sent)))) => {
                let scheme = Runtime::scheme_of(ctx.tls);
                let on_route = match runtime.routes.find(scheme, &host, &path) {
                    Match::Found(found) => Arc::ptr_eq(found, route),
                    _ => false,
                };
                let refused = runtime.routes.refuses(scheme, &host, route, &path, None);
                if !on_route || refused.is_some() {
                    let why = refused.unwrap_or("a Destination on another route");
                    return self
                        .bad_request(session, ctx.client_ip, &route.config.name, why)
                        .await;
                }
                let to = Facts {
                    path: &path,
                    ..facts
                };
                let admission = self
                    .shared
                    .gate(&runtime, &decided_at)
                    .admit(&to, authentication.presented());
                destination = Some((path, sent));
                match admission {
                    Admission::Allow(_) => Admission::Allow(pass),
                    refused => refused,
                }
            }
            (_, Err(why)) => {
                return self
                    .bad_request(session, ctx.client_ip, &route.config.name, &why)
                    .await;
            }
        };
        let pass = match admission {
            Admission::Allow(pass) => pass,
            Admission::Refuse(refused) => {
                let at = At {
                    tls: ctx.tls,
                    client_ip: ctx.client_ip,
                };
                // Refused where it would write, if it was its Destination that was.
                let judged = destination.map_or_else(|| facts.path.to_owned(), |(path, _)| path);
                let asked = Asked::of(
                    req,
                    judged,
                    request_origin(req, ctx.tls),
                    host.into_owned(),
                    at,
                );
                ctx.caller = authentication.caller().cloned();
                return Box::pin(self.answer(
                    session,
                    &runtime,
                    &route.config.name,
                    route.config.accept.contains(&Credential::Session),
                    &asked,
                    &authentication,
                    refused,
                ))
                .await;
            }
        };
        let caller = match authentication {
            Authentication::Caller(caller) if !preflight => Some(caller),
            _ => None,
        };
        // Swept while it is open (a websocket or an event stream, which may be silent for
        // hours); any other request is judged again at its next chunk once anything moved. A
        // websocket only on a route that takes them: elsewhere it goes upstream without its
        // `Upgrade` (pingora's `deny_upgrades`), an ordinary request, as is an upgrade to
        // anything else (`curl --http2` on `http:` asks for `h2c`), and one that also asks for
        // an event stream (see `edit_upstream_request`).
        let websocket = route.config.websockets && asks_for_websocket(req);
        let long_lived = websocket || accepts(&req.headers, b"text/event-stream");
        ctx.caller = caller;
        ctx.websocket = websocket;
        ctx.long_lived = long_lived;
        ctx.preflight = preflight;
        ctx.destination = destination.map(|(_, sent)| sent);
        ctx.forward = pass.forward;
        let declared = content_length(req);
        if declared.is_some_and(|len| len > route.config.max_request_body_bytes) {
            self.audit_body_too_large(ctx, session.req_header(), "said by its Content-Length");
            return reply::send(session, Reply::status_page(StatusCode::PAYLOAD_TOO_LARGE)).await;
        }
        // A length said more than once goes upstream said once (below): Go, Node and hyper
        // refuse `Content-Length: 1000, 1000`.
        let said_again = declared.filter(|_| {
            let mut said = req.headers.get_all(header::CONTENT_LENGTH).iter();
            let once = said.next().is_some_and(|v| !v.as_bytes().contains(&b','));
            !(once && said.next().is_none())
        });
        // Recorded once nothing here refuses it any more.
        self.shared.audit.allow_sampled(
            runtime.config.identity.allow_sample_rate,
            ctx.forward
                .as_ref()
                .map_or("anonymous", |f| f.user.as_str()),
            &route.config.name,
            &audit::Request {
                method: facts.method,
                path: facts.path,
                client: ctx.client_ip,
            },
            ctx.forward.as_ref().and_then(|f| f.agent.as_ref()),
        );
        ctx.round_robin_start = route.upstreams.start();
        // Named in the assertion's `aud` (see `AssertionClaims::served`).
        if route.config.assertion && route.config.host.starts_with('*') {
            let scheme = if route.config.scheme == Scheme::Https {
                "https"
            } else {
                "http"
            };
            // With the route's path: two `*.` routes of one host (`/admin/` beside `/`) name
            // their assertions apart, so that neither upstream takes the other's.
            let path = match route.config.path_prefix.as_str() {
                "/" => "",
                path => path,
            };
            ctx.served = Some(format!("{scheme}://{host}{path}").into());
        }
        // With the caller and the route set: all a recheck is made from. Whoever it is: a
        // stream let in by a public rule (a log tail, an NDJSON feed) ends when a reload takes
        // that rule away, as a caller's ends when they lose access. A CORS preflight is
        // nobody's request, let in by the route's `cors_preflight`: not judged again as one.
        ctx.decided_at = (!preflight).then_some(decided_at);
        if long_lived {
            // Watched from the moment it connects upstream (`connected_to_upstream`).
            let recheck = ctx.recheck(session.req_header());
            // With the session cookie it was let in with, to refresh the session when due.
            if let (Some(recheck), Some(Caller::Person { session: key, .. })) =
                (recheck, &ctx.caller)
            {
                if let Some(id) =
                    self.session_cookie_of(&runtime, session.req_header(), ctx.tls, key)
                {
                    recheck.keep_session_cookie(&id);
                }
            }
        }
        if let Some(len) = said_again {
            session
                .req_header_mut()
                .insert_header(header::CONTENT_LENGTH, len)
                .or_err(ErrorType::InvalidHTTPHeader, "cannot say the body's length")?;
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let now = Instant::now();
        // A retry: the upstream picked last could not be reached, or closed the connection
        // as the request went out. pingora sends the body read so far again, through
        // `request_body_filter`: counted from nothing again. One that closed a pooled
        // connection may be tried again (on a new one): passed over, it would leave only
        // upstreams known to be down.
        if let Some(failed) = ctx.upstream {
            if !ctx.reused {
                ctx.tried.push(failed);
            }
            ctx.body_bytes = 0;
        }
        ctx.reused = false;
        let (index, mut peer, trying_again) =
            route.upstreams.pick(ctx.round_robin_start, &ctx.tried, now);
        // A connection Windows authentication logs in is pooled under a key of its own, which
        // no other request asks for: a websocket handshake keeps its connection open for the
        // upgrade (no `close`, see `edit_upstream_request`), and one the upstream refuses goes
        // back to the pool, logged in.
        //
        // A websocket handshake goes over a connection of its own too: pingora 0.9 ends an
        // upgraded connection at once when it reads the upstream's 101 before the handshake's
        // own (empty) body has gone (cloudflare/pingora#946), which a pooled connection, whose
        // upstream answers sooner, makes likely; a new one's connect and first read leave that
        // body time to go first. (An upgraded connection is never pooled; one refused goes
        // back under a key no other request asks for.)
        //
        // So does the one try of an upstream after its time out: only a new connection says
        // whether it takes them again (`mark_up`).
        if ctx.websocket || logs_in_the_connection(&session.req_header().headers) || trying_again {
            peer.group_key = rand::random();
            // Pooled (one its upstream refused), it is no one's to take: closed soon, not
            // left to push reusable connections out of the pool.
            peer.options.idle_timeout = Some(std::time::Duration::from_secs(1));
        }
        ctx.upstream = Some(index);
        ctx.upstream_at = Some(peer._address.clone());
        ctx.upstream_started = Some(now);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(route), Some(index)) = (&ctx.route, ctx.upstream) {
            let now = Instant::now();
            route.upstreams.mark_down(index, &peer._address, now);
            // Its name may have moved to another address (see `upstream.rs`).
            if route
                .upstreams
                .resolve_after_failure(index, &peer._address, now)
            {
                let (route, address) = (route.clone(), peer._address.clone());
                tokio::spawn(async move {
                    let name = &route.config.name;
                    let failed = Some((index, &address));
                    route.upstreams.resolve_again(name, failed).await;
                });
            }
            // Nothing has been sent upstream yet, so any request may go to the next upstream:
            // after a refusal (which costs nothing), to any not tried yet, one marked down
            // too (it may be back); after a timeout, only to one not known to be down (each
            // would hold the request up another connect timeout).
            let timed_out = matches!(
                e.etype(),
                ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout
            );
            let untried = ctx.tried.len() + 1 < route.upstreams.count();
            if (untried && !timed_out) || route.upstreams.live_besides(index, &ctx.tried, now) {
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Judged again before it goes: a connection held up (or failed, and retried on the
        // next upstream) while its caller lost access sends the upstream nothing.
        let sent = ctx
            .still_allowed(&self.shared, session.req_header(), false)
            .and_then(|()| {
                // The request is edited as plain `http` parts, not through `RequestHeader`'s
                // methods: those parse every name again and keep a second map with the
                // client's spelling of each name, which together cost more per request than
                // anything else Portcullis does. Names go upstream in their standard case
                // (`Host`, `Content-Length`, ...) or in lower case, as every request from an
                // HTTP/2 client always has.
                let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
                let mut parts =
                    http::request::Parts::from(std::mem::replace(upstream_request, placeholder));
                let edited = self.edit_upstream_request(session, &mut parts, ctx);
                *upstream_request = RequestHeader::from(parts);
                edited
            });
        // Not sent (refused, or not made): pingora may put the connection back in its pool,
        // for another caller, so it is no longer watched.
        if sent.is_err() {
            ctx.registration = None;
        } else if ctx.registration.is_some() {
            ctx.upgrade_sent = upstream_request.headers.contains_key(header::UPGRADE);
        }
        sent
    }

    /// The last look at an answer before it goes to the client, after pingora framed it.
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        // An HTTP/1.0 client reads no chunked body (RFC 9112 §6.1: the coding is HTTP/1.1's),
        // which pingora makes of every answer without a length: it shows the chunks' sizes as
        // the body, and waits past its end. Without the coding, the body ends with the
        // connection.
        if session.req_header().version == http::Version::HTTP_10 {
            response.remove_header(&http::header::TRANSFER_ENCODING);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // The answer's time, whatever becomes of it below (not a `100 Continue`'s before it;
        // a `101` is a websocket's answer).
        let status = upstream_response.status;
        let interim = status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS;
        if let (Some(route), Some(started), false) = (&ctx.route, ctx.upstream_started, interim) {
            route
                .metrics
                .observe_upstream(started.elapsed().as_secs_f64());
        }
        // An answer that comes after its caller lost access crosses no more than its body
        // would: not its status, nor its headers (a bodiless answer has nothing else).
        ctx.still_allowed(&self.shared, session.req_header(), true)?;
        // pingora takes the chunks off such a body and leaves the rest of its coding: an
        // HTTP/1.0 or HTTP/2 client, whose `Transfer-Encoding` goes, would take the coded
        // bytes for the body. Refused, as such a request is.
        if codes_its_body(&upstream_response.headers) {
            return Error::e_explain(
                ErrorType::HTTPStatus(502),
                "the upstream's answer has a transfer coding besides its chunks",
            );
        }
        // After a 101 every byte is passed through unjudged, both ways: only a websocket the
        // upstream really accepted may have that. A handler that answers 101 to anything (a
        // status echo, say) would otherwise turn the rest of the connection into requests
        // Portcullis never sees.
        if upstream_response.status == StatusCode::SWITCHING_PROTOCOLS {
            if !accepts_websocket(session.req_header(), upstream_response) {
                return Error::e_explain(
                    ErrorType::HTTPStatus(502),
                    "the upstream switched protocols without accepting the websocket",
                );
            }
            // A websocket silent both ways lasts the route's `read_timeout`, as the README
            // says, not pingora's minute for a client's body (browsers send no pings).
            if let Some(route) = &ctx.route {
                session.set_read_timeout(Some(route.config.read_timeout));
            }
        }
        // A websocket the upstream refused is an ordinary answer, on a connection pingora may
        // pool: its socket is no longer `Streams`' to shut (the per-chunk check still holds).
        // Not so an upgrade not passed (on a route without websockets, or by an event stream
        // that also asked for one): it went with `Connection: close`, and stays watched.
        if ctx.registration.is_some()
            && !upstream_response.status.is_informational()
            && ctx.upgrade_sent
        {
            ctx.registration = None;
        }
        // The answer is edited as plain `http` parts, as the request is (see
        // `upstream_request_filter`): through `ResponseHeader`'s methods every name is parsed
        // again and kept twice, and an answer given `Cache-Control` below grew both maps. Names
        // go to the client in lower case, as HTTP/2 clients get every name, bar a dozen common
        // ones pingora spells in their usual case (`Content-Type`, `Set-Cookie`, ...); the
        // status goes with its standard reason phrase (none for a code without one), not the
        // upstream's. Envoy (Pomerium's proxy) sends them so by default.
        let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
        let mut parts =
            http::response::Parts::from(std::mem::replace(upstream_response, placeholder));
        let edited = self.edit_upstream_response(&mut parts, ctx);
        *upstream_response = ResponseHeader::from(parts);
        edited?;
        // A client that reads none of a large or open-ended answer (a download, a stream, a
        // websocket) is not waited on for ever. Over HTTP/1 a small one fits the socket's
        // buffers, and timing every write costs a timer per request (HTTP/2: `request_filter`).
        if length_of(&upstream_response.headers).is_none_or(|len| len > SMALL_ANSWER) {
            if let Some(runtime) = &ctx.runtime {
                session.set_write_timeout(Some(runtime.config.server.client_idle_timeout));
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // It takes connections (again): a request trying it after failures ends its time out.
        // (A pooled connection tells nothing: one made before it stopped may stay open; the
        // one try after a time out goes on a new one, see `upstream_peer`.)
        if let (false, Some(route), Some(index)) = (reused, &ctx.route, ctx.upstream) {
            route.upstreams.mark_up(index, &peer._address);
        }
        ctx.reused = reused;
        if let (true, Some(recheck)) = (ctx.long_lived, &ctx.recheck) {
            // Fail closed: a connection that could not be cut is not made.
            let registration = self
                .shared
                .streams
                .register(fd, recheck.clone())
                .or_err(ErrorType::InternalError, "cannot watch the connection")?;
            ctx.registration = Some(registration);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.still_allowed(&self.shared, session.req_header(), true)?;
        // An HTTP/2 body may end with an empty DATA frame (curl's uploads of no stated length
        // do). pingora writes an empty last piece to an HTTP/1.1 upstream as a last chunk, then
        // ends the body with another: a `0\r\n\r\n` after the body, which the upstream reads
        // as a request of its own (Node.js answers it 400, before the upload's answer). The end
        // alone writes the one last chunk.
        if end_of_stream && body.as_ref().is_some_and(Bytes::is_empty) {
            *body = None;
        }
        // A request body is bounded; a websocket's frames after the upgrade are not a body.
        if session.was_upgraded() {
            return Ok(());
        }
        if let (Some(chunk), Some(route)) = (body.as_ref(), &ctx.route) {
            ctx.body_bytes = ctx.body_bytes.saturating_add(chunk.len() as u64);
            if ctx.body_bytes > route.config.max_request_body_bytes {
                self.audit_body_too_large(ctx, session.req_header(), "as it was sent");
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        ctx.still_allowed(&self.shared, session.req_header(), true)?;
        if ctx.preflight {
            *body = None;
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let cut = ctx.recheck.as_deref().filter(|r| r.is_cut());
        let code = failure_status(e, cut, &session.req_header().method);
        // A response already started cannot be replaced; the connection is simply closed. An
        // interim one (`100 Continue`, `103 Early Hints`) is no answer yet: the page follows it.
        // (A `101` is the answer: what follows it is the websocket's, not HTTP.)
        let answered = session.response_written().is_some_and(|written| {
            !written.status.is_informational() || written.status == StatusCode::SWITCHING_PROTOCOLS
        });
        if code > 0 && !answered {
            // The connection ends after the page (`can_reuse_downstream` below), and the page
            // says so: a client told `keep-alive` sends its next request into a reset.
            session.set_keepalive(None);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            // Access refused after the request was let in, before its answer began: told who
            // they are and why, as a request refused at once is.
            let page = match (cut, &ctx.route) {
                // 503, or 403 for a POST sent already (not to be sent again blindly).
                (Some(cut), _) if cut.lost_touch() => {
                    lost_touch_page(status, self.shared.needs_restart())
                }
                (Some(cut), Some(route)) if code == 403 => match cut.refusal_note() {
                    Some(note) => {
                        let person =
                            note.who.is_some() && matches!(ctx.caller, Some(Caller::Person { .. }));
                        let client = Client::of(&session.req_header().headers);
                        let who = note.who.as_deref();
                        refused_page(who, &note.reason, &route.config.name, client, person)
                    }
                    None => Reply::status_page(status),
                },
                _ => Reply::status_page(status),
            };
            if let Err(write_error) = reply::send(session, page).await {
                tracing::debug!(error = %write_error, "could not send the error page");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// What pingora's own warnings and errors say about a request (a failure to reach the
    /// upstream, say): its method, path and host as the access log has them, never the query,
    /// which may carry a sign-in's code and state or a client's token. The path is cut, as
    /// anyone may send one of 64 KiB.
    fn request_summary(&self, session: &Session, _ctx: &Self::CTX) -> String {
        let req = session.req_header();
        let host = request_host(req).unwrap_or_default();
        let path = crate::human::printable(reply::cut(req.uri.path(), 1024));
        format!("{} {path}, Host: {}", req.method, reply::cut(&host, 256))
    }

    /// pingora's own line for a failed request prints its error whole, with the contexts pingora
    /// puts what it could not parse in: an upstream's whole response head (its `Set-Cookie`, a
    /// `Location` with a token), bytes of a body. It is replaced by [`failure`]'s.
    fn suppress_error_log(&self, session: &Session, ctx: &Self::CTX, e: &Error) -> bool {
        let summary = self.request_summary(session, ctx);
        tracing::error!("Fail to proxy: {}, {summary}", failure(e, ctx));
        true
    }

    /// As [`ProxyHttp::suppress_error_log`], for a failure a retry follows.
    fn suppress_proxy_warn_log(
        &self,
        session: &Session,
        ctx: &Self::CTX,
        e: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        let summary = self.request_summary(session, ctx);
        tracing::warn!("Fail to proxy: {}, retry: true, {summary}", failure(e, ctx));
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        // An interim answer (`100 Continue`, `103 Early Hints`) is no answer: a client that
        // left after one was given none (0). A `101` is the answer.
        let status = session
            .response_written()
            .map(|response| response.status)
            .filter(|status| {
                !status.is_informational() || *status == StatusCode::SWITCHING_PROTOCOLS
            })
            .map_or(0, |status| status.as_u16());
        let route = match &ctx.route {
            Some(route) => route.config.name.as_str(),
            None if ctx.scim => "scim",
            None => "",
        };
        match &ctx.route {
            Some(route) => route.metrics.count_request(status),
            None => crate::metrics::count_request(route, status),
        }
        let req = session.req_header();
        tracing::info!(
            target: "access",
            client = %ctx
                .client_ip
                .or_else(|| session.client_addr()?.as_inet().map(|a| a.ip().to_canonical()))
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            // Method, host and path cut (32, 256 and 1,024 bytes), as the audit cuts method and
            // path: pingora reads heads of up to 1 MiB, and this line is written for each.
            method = %reply::cut(req.method.as_str(), 32),
            // HTTP/2 names it in `:authority`, and browsers send no `Host` there.
            host = reply::cut(
                req.headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| Some(req.uri.authority()?.as_str()))
                    .unwrap_or_default(),
                256
            ),
            // Escaped as the other fields are: a path may hold any UTF-8, the marks that
            // reverse the rest of a line as a terminal shows it among them.
            path = %crate::human::printable(reply::cut(req.uri.path(), 1024)),
            status,
            route,
            user = ctx.caller.as_ref().map(Caller::log_name),
            upstream = ctx.upstream,
            duration_us = ctx.started.elapsed().as_micros() as u64,
            error = e.map(|e| e.etype().as_str()),
        );
    }
}

/// What a failed request's error says, for the log: the upstream it went to last, if any, and
/// [`described`].
fn failure(e: &Error, ctx: &RequestCtx) -> String {
    match &ctx.upstream_at {
        Some(at) => format!("upstream {at}: {}", described(e)),
        None => described(e),
    }
}

/// An error as the log tells it: at each level its side and kind, the context only where
/// Portcullis or pingora itself is the source (never where the upstream or the client is:
/// pingora puts the bytes it could not parse there, an upstream's whole response head) or where
/// it is pingora's word on a TLS handshake (why a certificate was refused: the operator's first
/// question), and the root cause (an OS, TLS or parser error, which quotes none).
fn described(e: &Error) -> String {
    use std::fmt::Write;
    let mut line = String::new();
    let mut level = e;
    loop {
        let _ = write!(
            line,
            "{} {}",
            level.esource().as_str(),
            level.etype().as_str()
        );
        let own = matches!(level.esource(), ErrorSource::Internal | ErrorSource::Unset)
            || matches!(
                level.etype(),
                ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert
            );
        // Cut, and escaped: a TLS error quotes the certificate's names and fields.
        if let (true, Some(context)) = (own, &level.context) {
            let context = context.to_string();
            let shown = crate::human::printable(crate::reply::cut(&context, 512));
            let _ = write!(line, " context: {shown}");
        }
        match &level.cause {
            Some(cause) => match cause.downcast_ref::<Box<Error>>() {
                Some(next) => {
                    line.push_str(" cause: ");
                    level = next;
                }
                None => {
                    let _ = write!(line, " cause: {cause}");
                    return line;
                }
            },
            None => return line,
        }
    }
}

impl RequestCtx {
    /// Refuses to pass on one more chunk or frame for a caller who has lost access (403; 503
    /// when this replica lost touch, see `Recheck::refusal_status`; `sent`: whether the
    /// request went upstream). While nothing moved since the request was let in, that is a
    /// read of the marks.
    fn still_allowed(&mut self, shared: &Shared, req: &RequestHeader, sent: bool) -> Result<()> {
        let Some(decided_at) = self.decided_at else {
            return Ok(());
        };
        if self.recheck.is_none() {
            // Nobody's request (let in by a public rule) is judged by the configuration alone:
            // only a reload can change its answer.
            let unchanged = match self.caller {
                None => shared.reloads() == decided_at.config,
                Some(_) => shared.marks() == decided_at,
            };
            if unchanged {
                return Ok(());
            }
        }
        match self.recheck(req) {
            Some(recheck) if shared.still_allowed(&recheck) => Ok(()),
            Some(recheck) => Error::e_explain(
                ErrorType::HTTPStatus(recheck.refusal_status(&req.method, sent)),
                "access revoked",
            ),
            // Fail closed: a request that cannot be judged again is not carried on.
            None => Error::e_explain(ErrorType::HTTPStatus(403), "access revoked"),
        }
    }

    /// The request's [`Recheck`], made on first need from what it was let in with: its caller,
    /// route, method, the path it was judged on and its kind of client (`req` is the client's
    /// request).
    fn recheck(&mut self, req: &RequestHeader) -> Option<Arc<Recheck>> {
        if self.recheck.is_none() {
            let (Some(route), Some(decided_at)) = (&self.route, self.decided_at) else {
                return None;
            };
            // The judged path: the one sent upstream, which is the client's own unless the
            // target was rebuilt (its query follows the first `?`, which no path holds).
            let path = match &self.upstream_target {
                Some(target) => target.split_once('?').map_or(target.as_str(), |(p, _)| p),
                None => req.uri.path(),
            };
            let target = Target {
                route: route.config.name.clone(),
                scheme: route.config.scheme,
                host: request_host(req)?.into_owned(),
                method: req.method.as_str().to_owned(),
                path: path.to_owned(),
                query: req.uri.query().map(str::to_owned),
                client: Client::of(&req.headers),
                client_ip: self.client_ip,
                websocket: self.websocket,
                local: self.local,
                own_tls: self.own_tls,
            };
            let told = self.forward.clone();
            let recheck = Recheck::new(self.caller.clone(), target, told, decided_at);
            self.recheck = Some(Arc::new(recheck));
        }
        self.recheck.clone()
    }
}

impl Proxy {
    /// The session cookie in `req` of the session `key`.
    fn session_cookie_of(
        &self,
        runtime: &Runtime,
        req: &RequestHeader,
        tls: bool,
        key: &SessionKey,
    ) -> Option<String> {
        let oidc = runtime.config.oidc.as_ref()?;
        let name = crate::auth::session_cookie_name(oidc, tls);
        let sessions = &self.shared.auth.sessions;
        let id = crate::auth::cookies(req, &name)
            .find(|id| sessions.get(id).is_some_and(|(held, _)| held == *key))
            .map(str::to_owned);
        id
    }

    /// Serves `/.portcullis/<endpoint>` on any host.
    async fn own_endpoint(
        &self,
        session: &mut Session,
        runtime: &Runtime,
        reloads: u64,
        endpoint: &str,
        host: &str,
        at: At,
    ) -> Result<bool> {
        let tls = at.tls;
        // An answer (a console page, `me` for someone in thousands of groups) that a client
        // takes nothing of is not waited on for ever, over HTTP/1 as over HTTP/2.
        session.set_write_timeout(Some(runtime.config.server.client_idle_timeout));
        let reply = match endpoint {
            // Upstreams keep the set a minute (and a CDN may): a replica still loading its keys
            // (an empty set), or out of touch with the shared store (without a key rotated in
            // since), would have them refuse every replica's assertions for that long.
            e if Some(e) == JWKS_PATH.strip_prefix("/.portcullis/")
                && !(self.shared.signer.can_sign() && self.shared.directory_is_current()) =>
            {
                Reply::status_page(StatusCode::SERVICE_UNAVAILABLE)
            }
            e if Some(e) == JWKS_PATH.strip_prefix("/.portcullis/") => Reply::with_body(
                StatusCode::OK,
                "application/json",
                self.shared.signer.jwks_json().into(),
            )
            .header(header::CACHE_CONTROL, "public, max-age=60"),
            "healthz" => Reply::status_page(StatusCode::OK),
            "style.css" => reply::stylesheet(),
            "console" => Reply::redirect(StatusCode::PERMANENT_REDIRECT, CONSOLE_PATH),
            e if e.starts_with("console/") => {
                return self
                    .console(session, runtime, reloads, endpoint, host, at)
                    .await;
            }
            "readyz"
                if self.shared.is_draining()
                    || !self.shared.directory_is_current()
                    || self.shared.missing_key().is_some() =>
            {
                Reply::status_page(StatusCode::SERVICE_UNAVAILABLE)
            }
            "sign_in" | "callback" if !runtime.carries_credentials(local_addr(session), tls) => {
                // A callback brings the IdP's code, crossed in clear: recorded as a SCIM
                // token's is (a sign-in's start carries nothing), in touch with the store or not.
                if endpoint == "callback" {
                    let request = audit::Request {
                        method: session.req_header().method.as_str(),
                        path: "/.portcullis/callback",
                        client: at.client_ip,
                    };
                    let why = "a sign-in's callback over plain HTTP off loopback (its code \
                               crossed in clear)";
                    (self.shared.audit).unverified_refusal(endpoints::AUDIT_ROUTE, why, &request);
                }
                plain_http_page()
            }
            // Sessions held here may be stale (with a shared store, until caught up): a
            // session is neither begun nor ended on them.
            "callback" | "sign_out" | "backchannel_logout"
                if !self.shared.directory_is_current() =>
            {
                // Anyone may post here: within the sign-in's budget.
                let request = audit::Request {
                    method: session.req_header().method.as_str(),
                    path: &format!("/.portcullis/{endpoint}"),
                    client: at.client_ip,
                };
                let audit = &self.shared.audit;
                let reason = self.shared.out_of_touch();
                audit.unverified_refusal(endpoints::AUDIT_ROUTE, reason, &request);
                if endpoint == "backchannel_logout" {
                    endpoints::logout_later()
                } else {
                    let text = match self.shared.needs_restart() {
                        true => "<p>Portcullis cannot read its store until it is restarted.</p>",
                        false => {
                            "<p>Portcullis cannot reach its store just now. Try again in a \
                             moment.</p>"
                        }
                    };
                    Reply::page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Temporarily unavailable",
                        text,
                    )
                }
            }
            "readyz" => Reply::status_page(StatusCode::OK),
            _ => {
                let origin = request_origin(session.req_header(), tls);
                let request = endpoints::Request {
                    origin: &origin,
                    host,
                    tls,
                    client: at.client_ip,
                    current: self.shared.directory_is_current(),
                };
                let served = self
                    .shared
                    .auth
                    .serve(session, runtime, endpoint, &request)
                    .await?;
                match served {
                    Some(Served::Reply(reply)) => reply,
                    Some(Served::Unauthenticated { invalid_token }) => {
                        let asked = Asked::of(
                            session.req_header(),
                            format!("/.portcullis/{endpoint}"),
                            origin.clone(),
                            host.to_owned(),
                            at,
                        );
                        let sessions = (runtime.config.oidc.as_ref())
                            .is_some_and(|oidc| oidc.session_cookie_reaches(host, tls));
                        let refused = crate::gate::sign_in_or_challenge(
                            &asked.method,
                            asked.client,
                            sessions,
                            invalid_token,
                            None,
                        );
                        return self
                            .answer(
                                session,
                                runtime,
                                endpoints::AUDIT_ROUTE,
                                sessions,
                                &asked,
                                &Authentication::Nothing,
                                refused,
                            )
                            .await;
                    }
                    None => Reply::status_page(StatusCode::NOT_FOUND),
                }
            }
        };
        reply::send(session, reply).await
    }

    /// Who asks for the console's `path`, and whether `[console]` (`route`) lets them.
    async fn judge_console(
        &self,
        runtime: &Runtime,
        route: &portcullis_config::Route,
        req: &RequestHeader,
        at: Arrival<'_>,
        path: &str,
    ) -> (Authentication, Admission) {
        let decided_at = self.shared.marks();
        let authentication = self
            .shared
            .auth
            .authenticate(runtime, &route.accept, req, at, now_unix())
            .await;
        let facts = Facts {
            route,
            method: req.method.as_str(),
            path,
            client: ClientOf::Headers(&req.headers),
        };
        let admission = self
            .shared
            .gate(runtime, &decided_at)
            .admit(&facts, authentication.presented());
        (authentication, admission)
    }

    /// A console request refused: recorded as `who`'s, as every console refusal is, and
    /// answered with `status`'s page.
    fn console_refused(
        &self,
        who: &str,
        method: &str,
        path: &str,
        at: At,
        why: &str,
        status: StatusCode,
    ) -> Reply {
        let request = audit::Request {
            method,
            path,
            client: at.client_ip,
        };
        (self.shared.audit).refusal(who, CONSOLE_ROUTE, None, why, &request, None);
        Reply::status_page(status)
    }

    /// Judges a console request again, under the configuration in force now: whether the
    /// console still lets its viewer in, by the session it was first judged by (`first`).
    /// Refused, it is answered (and audited) here.
    async fn console_judged_again(
        &self,
        session: &mut Session,
        host: &str,
        path: &str,
        first: &Authentication,
        at: At,
    ) -> Result<Again> {
        let tls = at.tls;
        let runtime = self.shared.runtime.load_full();
        let method = session.req_header().method.clone();
        // Refused as the viewer first let in.
        let who = first
            .caller()
            .map_or("anonymous".to_owned(), |c| c.log_name());
        let refused = |status: StatusCode, why: &str| {
            self.console_refused(&who, method.as_str(), path, at, why, status)
        };
        let Some(route) = runtime.config.console.as_ref().filter(|c| c.host == host) else {
            let why = "a reload took the console off this host while the request was made";
            let sent = reply::send(session, refused(StatusCode::NOT_FOUND, why)).await?;
            return Ok(Again::Answered(sent));
        };
        let arrival = Arrival {
            tls,
            local: local_addr(session),
            host,
        };
        let req = session.req_header();
        let (again, admission) = self
            .judge_console(&runtime, route, req, arrival, path)
            .await;
        let same_session = match (again.caller(), first.caller()) {
            (
                Some(Caller::Person { session: now, .. }),
                Some(Caller::Person { session: then, .. }),
            ) => now == then,
            _ => false,
        };
        let viewer = match admission {
            Admission::Allow(pass) if same_session => pass.forward,
            Admission::Allow(_) => {
                // Another session of the jar than the one first judged (a form's token is of).
                let why = "a console request went on under another session than its own";
                let sent = reply::send(session, refused(StatusCode::FORBIDDEN, why)).await?;
                return Ok(Again::Answered(sent));
            }
            Admission::Refuse(refused) => {
                let origin = request_origin(req, tls);
                let asked = Asked::of(req, path.to_owned(), origin, host.to_owned(), at);
                let route_name = route.name.clone();
                let sent = self
                    .answer(
                        session,
                        &runtime,
                        &route_name,
                        true,
                        &asked,
                        &again,
                        refused,
                    )
                    .await?;
                return Ok(Again::Answered(sent));
            }
        };
        let Some(viewer) = viewer else {
            // `[console]` has no public rule: let in as anyone, by no rule of its own.
            let why = "the console let the request in as anyone's, not a directory user's";
            let sent = reply::send(session, refused(StatusCode::FORBIDDEN, why)).await?;
            return Ok(Again::Answered(sent));
        };
        if !runtime.carries_credentials(local_addr(session), tls) {
            let sent = reply::send(session, plain_http_page()).await?;
            return Ok(Again::Answered(sent));
        }
        Ok(Again::Still(runtime, viewer))
    }

    /// Serves the console (`/.portcullis/console/…`, see [`crate::console`]) on the auth host,
    /// to callers the gate lets in by `[console]`, judged as a route.
    async fn console(
        &self,
        session: &mut Session,
        runtime: &Runtime,
        reloads: u64,
        endpoint: &str,
        host: &str,
        at: At,
    ) -> Result<bool> {
        let tls = at.tls;
        // Its writes are timed (see `own_endpoint`).
        let Some(route) = runtime.config.console.as_ref().filter(|c| c.host == host) else {
            return reply::send(session, Reply::status_page(StatusCode::NOT_FOUND)).await;
        };
        if !runtime.carries_credentials(local_addr(session), tls) {
            return reply::send(session, plain_http_page()).await;
        }
        let arrival = Arrival {
            tls,
            local: local_addr(session),
            host,
        };
        let req = session.req_header();
        let path = format!("/.portcullis/{endpoint}");
        // As a proxied request's (1.5): a reload installed since `runtime` was loaded has the
        // page judged again under it once made.
        let decided_at = self.shared.marks_as_of(reloads);
        let (authentication, admission) = self
            .judge_console(runtime, route, req, arrival, &path)
            .await;
        let pass = match admission {
            Admission::Allow(pass) => pass,
            Admission::Refuse(refused) => {
                let origin = request_origin(req, tls);
                let asked = Asked::of(req, path, origin, host.to_owned(), at);
                return self
                    .answer(
                        session,
                        runtime,
                        &route.name,
                        route.accept.contains(&Credential::Session),
                        &asked,
                        &authentication,
                        refused,
                    )
                    .await;
            }
        };
        // The form token comes from the session id itself (see `csrf_token`): that of the
        // cookie the caller was found by.
        let cookie_name = runtime
            .config
            .oidc
            .as_ref()
            .map(|oidc| session_cookie_name(oidc, tls));
        let session_id = match (authentication.caller(), &cookie_name) {
            (Some(Caller::Person { session: key, .. }), Some(name)) => {
                cookies(req, name).find(|id| {
                    let found = self.shared.auth.sessions.get(id);
                    found.is_some_and(|(found, _)| found == *key)
                })
            }
            _ => None,
        };
        let (Some(viewer), Some(Caller::Person { .. }), Some(session_id)) =
            (pass.forward, authentication.caller(), session_id)
        else {
            // Only a person's session gets this far (`[console]` takes nothing else, and has
            // no public rule): its cookie no longer finds it, ended since it was let in (a
            // sign-out in another tab).
            let who = (authentication.caller()).map_or("anonymous".to_owned(), |c| c.log_name());
            let why = "the session the console request was let in by ended while it was judged";
            let method = req.method.as_str();
            let refused = self.console_refused(&who, method, &path, at, why, StatusCode::FORBIDDEN);
            return reply::send(session, refused).await;
        };
        let method = req.method.clone();
        let origin = request_origin(req, tls);
        let same_origin = endpoints::same_origin(&req.headers, &origin);
        // Whether it says where it comes from: a request not shown to be the console's own may
        // name another origin, or none (a script's).
        let says_origin =
            req.headers.contains_key(header::ORIGIN) || req.headers.contains_key(header::REFERER);
        let query = req.uri.query().unwrap_or_default().to_owned();
        let page = endpoint
            .strip_prefix("console/")
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        let console = crate::console::Console {
            runtime: self.shared.runtime.load_full(),
            directory: self.shared.directory.clone(),
            sessions: self.shared.auth.sessions.clone(),
            audit: self.shared.audit.clone(),
            config_path: self.shared.config_path.clone(),
            csrf: crate::console::csrf_token(session_id),
            viewer: viewer.user.clone(),
            viewer_ip: at.client_ip,
            now: i64::try_from(now_unix()).unwrap_or(i64::MAX),
        };
        // A post (or another write) refused here is recorded as the console user's, and says
        // whether it came from the console's own pages: a cross-site post carries their cookie.
        let refused = |status: StatusCode, why: &str| {
            let path = format!("{CONSOLE_PATH}{page}");
            let from = match (same_origin, says_origin) {
                (true, _) => "",
                (false, true) => " (sent from another origin)",
                (false, false) => " (sent with neither Origin nor Referer)",
            };
            let reason = format!("{why}{from}");
            self.console_refused(&viewer.user, method.as_str(), &path, at, &reason, status)
        };
        let reply = match method {
            // Pages walk the directory and read the audit log: off this worker thread, which
            // serves the proxied traffic.
            // At most a few at once, so that however many are asked for (a page of images
            // pointing at the console, say), they take no more than that from the proxy.
            // A page waits at most `CONSOLE_TURN` for its turn, and is shown only from a
            // directory still known to be current when its turn comes (a replica that lost the
            // change feed meanwhile would show who is active, and who gets in, as it was).
            http::Method::GET | http::Method::HEAD => {
                match tokio::time::timeout(CONSOLE_TURN, CONSOLE_PAGES.acquire()).await {
                    Ok(Ok(turn)) => {
                        let shared = self.shared.clone();
                        // Checked again once it is made: a page of a million users takes a
                        // while, and must not outlast the lease it was made under.
                        let made = tokio::task::spawn_blocking(move || {
                            let current = || shared.directory_is_current();
                            match current().then(|| console.get(&page, &query)) {
                                Some(page) if current() => page,
                                _ => Reply::status_page(StatusCode::SERVICE_UNAVAILABLE),
                            }
                        })
                        .await
                        .unwrap_or_else(|_| Reply::status_page(StatusCode::INTERNAL_SERVER_ERROR));
                        // Another page may be made while this one's viewer is judged again.
                        drop(turn);
                        // Shown only to a viewer the console still lets in: the page waited
                        // for its turn, and took its time to make, while the directory or a
                        // reload may have taken them out of it, or their session ended.
                        if self.shared.marks() != decided_at {
                            let path = &path;
                            let again = self
                                .console_judged_again(session, host, path, &authentication, at)
                                .await?;
                            if let Again::Answered(done) = again {
                                return Ok(done);
                            }
                        }
                        made
                    }
                    Ok(Err(_)) | Err(_) => Reply::status_page(StatusCode::SERVICE_UNAVAILABLE),
                }
            }
            http::Method::POST => match console.action(&page) {
                Some(act) => {
                    let limit = route.max_request_body_bytes;
                    let too_large = || {
                        let why = format!(
                            "the request body is larger than the console takes ({limit} bytes)"
                        );
                        refused(StatusCode::PAYLOAD_TOO_LARGE, &why)
                    };
                    if !reply::ready_for_body(session, limit).await? {
                        return reply::send(session, too_large()).await;
                    }
                    let mut form = Vec::new();
                    let idle = runtime.config.server.client_idle_timeout;
                    while let Some(chunk) = reply::read_body(session, idle).await? {
                        if (form.len() + chunk.len()) as u64 > limit {
                            return reply::send(session, too_large()).await;
                        }
                        form.extend_from_slice(&chunk);
                    }
                    // Judged again with the form in, however long it took to come: whoever the
                    // directory or a reload removed from the console meanwhile, or whose
                    // session ended, acts no more.
                    let (runtime, viewer) = match self
                        .console_judged_again(session, host, &path, &authentication, at)
                        .await?
                    {
                        Again::Still(runtime, viewer) => (runtime, viewer),
                        Again::Answered(done) => return Ok(done),
                    };
                    // Acted on as the configuration and the viewer now are.
                    let console = crate::console::Console {
                        runtime: runtime.clone(),
                        viewer: viewer.user.clone(),
                        ..console
                    };
                    let shared = self.shared.clone();
                    let reload = || async move {
                        tokio::task::spawn_blocking(move || {
                            crate::reload::reload(&shared, "console", None)
                        })
                        .await
                        .unwrap_or_else(|e| Err(vec![format!("the reload stopped: {e}")]))
                    };
                    console.post(act, &form, same_origin, reload).await
                }
                // An action on a user who is not (or no longer) in the directory.
                None if page.ends_with("/end_sessions") => refused(
                    StatusCode::NOT_FOUND,
                    "a console action on a user the directory does not have",
                ),
                None => refused(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "a post to a console page that takes none",
                )
                .header(header::ALLOW, "GET, HEAD"),
            },
            _ => refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "a console request of a method the console does not take",
            )
            .header(header::ALLOW, "GET, HEAD, POST"),
        };
        // Never in a frame (a click there would be the viewer's own), no script, no
        // resource or form target but this origin, and no console address in a Referer.
        let reply = reply
            .header(header::X_FRAME_OPTIONS, "DENY")
            .header(header::CONTENT_SECURITY_POLICY, CONSOLE_POLICY)
            .header(header::REFERRER_POLICY, "same-origin");
        reply::send(session, reply).await
    }

    /// A request refused with 400 for how it is written (a request target upstreams read in
    /// different ways, an encoded `/`, a method override): recorded, as anyone's, on `route`
    /// (or [`NO_ROUTE`], before one is found) within its budget, with the path as sent.
    async fn bad_request(
        &self,
        session: &mut Session,
        client: Option<IpAddr>,
        route: &str,
        why: &str,
    ) -> Result<bool> {
        let reason = format!("a request was refused as malformed: {why}");
        let refused = Reply::status_page(StatusCode::BAD_REQUEST);
        self.refuse_as_sent(session, client, route, refused, &reason)
            .await
    }

    /// Answers `refused` to a request refused as it was sent, before anyone was asked for,
    /// and records it as nobody's (within the budget of [`audit::Audit::unverified_refusal`]).
    async fn refuse_as_sent(
        &self,
        session: &mut Session,
        client: Option<IpAddr>,
        route: &str,
        refused: Reply,
        reason: &str,
    ) -> Result<bool> {
        let req = session.req_header();
        let path = String::from_utf8_lossy(req.raw_path());
        let request = audit::Request {
            method: req.method.as_str(),
            path: path.split('?').next().unwrap_or_default(),
            client,
        };
        self.shared
            .audit
            .unverified_refusal(route, reason, &request);
        reply::send(session, refused).await
    }

    /// Records a request refused (413) for a body larger than its route takes (`how`: as
    /// declared or as sent), by the caller the gate let in, if any.
    fn audit_body_too_large(&self, ctx: &RequestCtx, req: &RequestHeader, how: &str) {
        let Some(route) = &ctx.route else { return };
        let sent = String::from_utf8_lossy(req.raw_path());
        let target = ctx.upstream_target.as_deref().unwrap_or(&sent);
        let request = audit::Request {
            method: req.method.as_str(),
            path: target.split('?').next().unwrap_or_default(),
            client: ctx.client_ip,
        };
        let reason = format!(
            "the request body is larger than the route takes ({} bytes), {how}",
            route.config.max_request_body_bytes
        );
        let audit = &self.shared.audit;
        let name = &route.config.name;
        match &ctx.caller {
            // Named as the gate let them in (an agent as `agent:<name>`, a person acting
            // through one by their `userName`), as their other records are.
            Some(caller) => {
                let forward = ctx.forward.as_ref();
                let who = forward.map_or_else(|| caller.log_name(), |f| f.user.clone());
                let agent = forward.and_then(|f| f.agent.as_ref());
                audit.refusal(&who, name, None, &reason, &request, agent);
            }
            None => audit.unverified_refusal(name, &reason, &request),
        }
    }

    /// The one place a refusal becomes a response: a sign-in redirect (302), a challenge (401),
    /// a refusal (403) or a replica's lost touch (503), after ending a session the directory
    /// has revoked. Audited: every 403 and 503, every revoked session and every refused bearer
    /// token (past a rate per caller and route, counted: [`crate::audit::Audit::refusal`]);
    /// not a request that presented no credential at all, which is only asked for one.
    /// `sessions`: whether people sign in where the request was sent (a 401 for a browser's
    /// form there is a page with a way to sign in).
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        session: &mut Session,
        runtime: &Runtime,
        route: &str,
        sessions: bool,
        asked: &Asked,
        authentication: &Authentication,
        refused: Refused,
    ) -> Result<bool> {
        let audit = &self.shared.audit;
        match (refused.revoked(), authentication.caller()) {
            (true, Some(caller @ Caller::Person { session: key, .. })) => {
                // Deactivated (or re-created) since this person signed in: the session is
                // over for good. Ended in the background: every replica's gate refuses the
                // session meanwhile, so this refusal need not wait for the store and the
                // other replicas.
                let (shared, key) = (self.shared.clone(), *key);
                tokio::spawn(async move {
                    if let Err(e) = shared.auth.sessions.end(&[key]).await {
                        tracing::error!("cannot end a revoked session: {e}");
                    }
                });
                let outdated = refused.outdated();
                audit.revoked_session(&caller.log_name(), route, outdated, &asked.audited());
            }
            (true, Some(caller @ Caller::Machine(_))) => {
                let agent = refused.outdated_agent();
                let (who, reason) =
                    crate::audit::outdated_token(&caller.log_name(), refused.outdated());
                audit.refusal(&who, route, None, &reason, &asked.audited(), agent);
            }
            // A token that verified but is for none of the route's audiences, or a person's
            // held by a client its issuer does not take theirs from: refused as an invalid
            // token there, and recorded by whose it is (a token for another API of the
            // issuer, or for another application, replayed here).
            (false, Some(caller @ Caller::Machine(machine)))
                if !matches!(refused, Refused::Forbid(_) | Refused::Unavailable) =>
            {
                let gate = self.shared.gate(runtime, &self.shared.marks());
                match gate.unlisted_holder(machine) {
                    Some(client) => audit.refusal_of_a_client(
                        &caller.log_name(),
                        client,
                        route,
                        &crate::gate::unlisted_client_reason(client),
                        &asked.audited(),
                    ),
                    None => {
                        let (who, agent) = gate.token_refused_as(machine);
                        audit.refusal(
                            &who,
                            route,
                            None,
                            "the bearer token is for none of this route's audiences",
                            &asked.audited(),
                            agent.as_ref(),
                        );
                    }
                }
            }
            _ => {}
        }
        if let Some(why) = authentication.refused_token() {
            // Answered 401, or 503 when its keys could not be had (a 403 is audited below).
            if !matches!(refused, Refused::Forbid(_)) {
                audit.refused_bearer(route, why, &asked.audited());
            }
        }
        let signs_in = sessions && runtime.config.oidc.is_some();
        let reply = match refused {
            Refused::SignIn { .. }
                if !runtime.carries_credentials(local_addr(session), asked.tls) =>
            {
                plain_http_page()
            }
            // A token presented there was refused unread (see `Auth::authenticate`), at
            // `/.portcullis/me` too.
            Refused::Challenge {
                invalid_token: true,
                ..
            } if !runtime.carries_credentials(local_addr(session), asked.tls) => {
                plain_http_challenge()
            }
            // A browser's form sent without a session (it ended while the page was open): it
            // cannot be sent on after a sign-in, so a page says so and offers one, back to the
            // page the form was on. (One that presented a token is no browser's.)
            Refused::Challenge {
                invalid_token: false,
                ..
            } if signs_in
                && asked.client == Client::Browser
                && runtime.carries_credentials(local_addr(session), asked.tls) =>
            {
                // A page of this host that sign-in takes as a return address, else its root.
                let referer = session.req_header().headers.get(header::REFERER);
                let hosts = endpoints::served_hosts(&runtime.config);
                let back = referer
                    .and_then(|v| v.to_str().ok())
                    .filter(|r| {
                        r.strip_prefix(asked.origin.as_str())
                            .is_some_and(|p| p.starts_with('/'))
                    })
                    .and_then(|r| crate::auth::redirect::safe_return_url(r, &asked.origin, &hosts))
                    .unwrap_or_else(|| format!("{}/", asked.origin));
                sign_in_to_send_again(&back)
            }
            Refused::SignIn { .. } => match &runtime.config.oidc {
                Some(oidc) => {
                    let request = endpoints::Request {
                        origin: &asked.origin,
                        host: &asked.host,
                        tls: asked.tls,
                        client: asked.client_ip,
                        current: self.shared.directory_is_current(),
                    };
                    let return_to = format!("{}{}", asked.origin, asked.path_and_query);
                    let head = session.req_header();
                    self.shared.auth.start_sign_in(
                        oidc,
                        &request,
                        head,
                        return_to,
                        (route, &asked.audited()),
                    )
                }
                None => challenge(false),
            },
            // Not the token's fault: told to come back, not to throw it away (RFC 6750's
            // `invalid_token` has clients fetch another, over and over, from an IdP whose keys
            // Portcullis cannot reach).
            Refused::Challenge {
                invalid_token: true,
                ..
            } if authentication.keys_unavailable() => crate::auth::keys_unavailable(),
            Refused::Challenge { invalid_token, .. } => challenge(invalid_token),
            Refused::Unavailable => {
                let reason = self.shared.out_of_touch();
                match authentication.caller() {
                    Some(caller) => {
                        let who = caller.log_name();
                        audit.refusal(&who, route, None, reason, &asked.audited(), None);
                    }
                    // A session cookie this replica does not hold (anyone may send one):
                    // within the route's budget.
                    None => audit.unverified_refusal(route, reason, &asked.audited()),
                }
                lost_touch_page(StatusCode::SERVICE_UNAVAILABLE, self.shared.needs_restart())
            }
            Refused::Forbid(refusal) => {
                match refusal.who.as_deref() {
                    // Nobody: anyone can send as many of these as they like (to a public
                    // route, outside its public paths), so they are kept within its budget.
                    None => audit.unverified_refusal(route, &refusal.reason, &asked.audited()),
                    Some(who) => audit.refusal(
                        who,
                        route,
                        refusal.rule.as_deref(),
                        &refusal.reason,
                        &asked.audited(),
                        refusal.agent.as_ref(),
                    ),
                }
                let person = matches!(authentication.caller(), Some(Caller::Person { .. }));
                forbidden(&refusal, route, asked.client, person)
            }
        };
        reply::send(session, reply).await
    }
}

/// The audit's route for a request refused before a route was found.
const NO_ROUTE: &str = "-";

/// Console pages made at once; more wait their turn.
static CONSOLE_PAGES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The longest a console page waits for its turn (then 503, to be asked again).
const CONSOLE_TURN: std::time::Duration = std::time::Duration::from_secs(10);

/// The console's Content-Security-Policy: its pages have no script and load only the
/// stylesheet, from this origin.
const CONSOLE_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The header that names the agent making a request (an agent's own, or a delegated token's
/// actor). Like every `X-Portcullis-` header, a client's own is stripped on the way in.
pub const AGENT_HEADER: HeaderName = HeaderName::from_static("x-portcullis-agent");

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Why SCIM, sign-in and bearer tokens are refused on a plain-HTTP listener that is not on
/// loopback.
const PLAIN_HTTP: &str = "SCIM, sign-in and bearer tokens need HTTPS: this listener serves plain \
     HTTP on an address other than loopback (use a TLS listener, or set behind_tls_proxy = true \
     on it behind a proxy that terminates TLS)";

/// 401 for a bearer token sent where it crossed the network in clear: `invalid_request` (RFC
/// 6750 §3.1, which gives it 400; 401 here, as for every credential refused), not
/// `invalid_token`, which tells a client to fetch a new token and send that in clear too.
fn plain_http_challenge() -> Reply {
    let body = serde_json::json!({ "error": "invalid_request", "detail": PLAIN_HTTP });
    Reply::json(StatusCode::UNAUTHORIZED, &body).header(
        header::WWW_AUTHENTICATE,
        "Bearer realm=\"portcullis\", error=\"invalid_request\"",
    )
}

fn plain_http_page() -> Reply {
    Reply::page(
        StatusCode::FORBIDDEN,
        "Sign-in needs HTTPS",
        &format!("<p>{}.</p>", escape(PLAIN_HTTP)),
    )
}

/// The address of this end of the client's connection.
pub(crate) fn local_addr(session: &Session) -> Option<std::net::SocketAddr> {
    session.server_addr().and_then(|a| a.as_inet()).copied()
}

/// The address the request's connection comes from.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// 401 for a browser's form sent without a session: a page with a way to sign in and come
/// back to `back`, and the bearer challenge a 401 needs.
fn sign_in_to_send_again(back: &str) -> Reply {
    let link = format!(
        "/.portcullis/sign_in?rd={}",
        form_urlencoded::byte_serialize(back.as_bytes()).collect::<String>()
    );
    let content = format!(
        "<p>You are not signed in (your session may have ended), so what you sent was not \
         sent on. Sign in, then send it again.</p>\
         <p><a class=\"button\" href=\"{}\">Sign in</a></p>",
        escape(&link)
    );
    Reply::page(StatusCode::UNAUTHORIZED, "Sign in to continue", &content)
        .header(header::WWW_AUTHENTICATE, bearer_challenge(false))
}

/// The `WWW-Authenticate` of a 401 (RFC 6750).
fn bearer_challenge(invalid_token: bool) -> &'static str {
    if invalid_token {
        "Bearer realm=\"portcullis\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"portcullis\""
    }
}

/// 401 with a bearer challenge (RFC 6750).
fn challenge(invalid_token: bool) -> Reply {
    let scheme = bearer_challenge(invalid_token);
    let body = serde_json::json!({
        "error": "unauthenticated",
        "detail": "sign in or present a valid bearer token",
    });
    Reply::json(StatusCode::UNAUTHORIZED, &body).header(header::WWW_AUTHENTICATE, scheme)
}

/// The 403: who the caller is signed in as, which route, why, and a way to sign out for a
/// `person` (a machine or an agent has nothing to end), as a page for a browser, or the same
/// as JSON. Nothing about other users.
fn forbidden(refusal: &Refusal, route: &str, client: Client, person: bool) -> Reply {
    refused_page(
        refusal.who.as_deref(),
        &refusal.reason,
        route,
        client,
        person,
    )
}

/// The 403 answer to `client`, naming `who` was refused (nobody when `None`) on `route` and
/// why; a person is offered to sign out.
fn refused_page(
    who: Option<&str>,
    reason: &str,
    route: &str,
    client: Client,
    person: bool,
) -> Reply {
    if client == Client::Api {
        let body = serde_json::json!({
            "error": "forbidden",
            "user": who,
            "route": route,
            "reason": reason,
        });
        return Reply::json(StatusCode::FORBIDDEN, &body);
    }
    let who = match who {
        Some(who) => format!(
            "<p>You are signed in as <strong>{}</strong>.</p>",
            escape(who)
        ),
        None => "<p>You are not signed in.</p>".to_owned(),
    };
    let sign_out = if person { SIGN_OUT_FORM } else { "" };
    let content = format!(
        "{who}<p>{route}: {reason}.</p>\
         <p>If you should have access, ask for it: what the directory says of you is judged \
         afresh at each request, and what your identity provider said as you signed in (an \
         email it had not verified, the groups it named), once you sign in again.</p>\
         {sign_out}",
        route = escape(route),
        reason = escape(reason),
    );
    Reply::page(
        StatusCode::FORBIDDEN,
        "You don't have access to this page",
        &content,
    )
}

/// Why a request is refused by a replica that lost touch with the directory, as audited.
pub(crate) const LOST_TOUCH: &str = "this replica lost touch with the directory";

/// Why callers are refused while the directory file holds changes only a restart reads.
pub(crate) const NEEDS_RESTART: &str =
    "the directory file holds changes a failed write left unread, until Portcullis is restarted";

/// The answer of a replica that lost touch with the directory, or of a process that cannot
/// read its directory until `restart`ed (`status`: 503, or 403 to a request sent upstream
/// already that is not to be sent again as it is).
fn lost_touch_page(status: StatusCode, restart: bool) -> Reply {
    let then = match (status, restart) {
        (StatusCode::FORBIDDEN, _) => {
            "Your request had been passed on already and may have taken effect: check before \
             sending it again."
        }
        (_, true) => "Tell whoever runs it.",
        (_, false) => "Try again in a moment.",
    };
    let text = match restart {
        true => format!(
            "<p>Portcullis cannot read its directory until it is restarted, and cannot be sure \
             who may come in, so it lets nobody in meanwhile. {then}</p>"
        ),
        false => format!(
            "<p>This replica has lost touch with the directory and cannot be sure who may come \
             in, so it lets nobody in until it has caught up. {then}</p>"
        ),
    };
    Reply::page(status, "Temporarily unavailable", &text)
}

/// Whether `method` has the upstream echo the request it received (TRACE, and Microsoft's
/// TRACK), so refused: see `request_filter`.
pub fn echoes_request(method: &str) -> bool {
    matches!(method, "TRACE" | "TRACK")
}

/// Whether an `OPTIONS` request without a body is a CORS preflight (Fetch standard,
/// CORS-preflight request): with `Origin` and `Access-Control-Request-Method`, and nothing
/// that would keep it open (no upgrade, no event stream). The upstream must see it as one:
/// a `Connection` naming its headers (`Connection: Origin, Access-Control-Request-Method`)
/// has them removed on the way, and an `OPTIONS` without them is an ordinary request to its
/// handler. Other options pass (`keep-alive`; `upgrade`, which nginx's websocket recipe sets
/// on every request it forwards).
fn is_cors_preflight(req: &RequestHeader) -> bool {
    let headers = &req.headers;
    let preflight_header = |option: &[u8]| {
        let prefix = b"access-control-request-";
        option.eq_ignore_ascii_case(b"origin")
            || option
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    req.method == http::Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && !headers.contains_key(header::UPGRADE)
        && !accepts(headers, b"text/event-stream")
        && !list_elements(headers, &header::CONNECTION).any(preflight_header)
}

/// The status a request that failed to proxy is answered with (0: none, the client is gone).
/// A refusal's own status (`still_allowed`'s) says whether the request went upstream; a watched
/// connection cut before its answer started otherwise (its caller lost access while the
/// upstream was still to answer: the socket shut) fails as a refusal of a request sent (see
/// `Recheck::refusal_status`).
pub(crate) fn failure_status(e: &Error, cut: Option<&Recheck>, method: &http::Method) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        _ if cut.is_some() => cut.map_or(403, |r| r.refusal_status(method, true)),
        _ => match e.esource() {
            // Reached but too slow (to connect, to answer, to take the body): 504, as
            // nginx answers, so that slow is told from down.
            ErrorSource::Upstream
                if matches!(
                    e.etype(),
                    ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                ) =>
            {
                504
            }
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// Whether the request asks to become a websocket (`Upgrade: websocket`, in any case).
fn asks_for_websocket(req: &RequestHeader) -> bool {
    list_elements(&req.headers, &header::UPGRADE)
        .any(|token| token.eq_ignore_ascii_case(b"websocket"))
}

/// Makes an upstream's answer to a preflight let through as nobody's what a browser reads of
/// one: its status, `Access-Control-*` and `Vary`, without a body. A handler that answers any
/// method (a Django view, a Go handler that never looks at it) would otherwise hand its page,
/// with whatever it sets, to anyone who sends an `Origin` and `Access-Control-Request-Method`.
fn preflight_answer(response: &mut http::response::Parts) {
    let dropped: Vec<HeaderName> = (response.headers.keys())
        .filter(|name| !name.as_str().starts_with("access-control-") && **name != header::VARY)
        .cloned()
        .collect();
    for name in dropped {
        response.headers.remove(name);
    }
    // RFC 9110 §8.6: no length on a 204 (nor a 304, which is no answer to a preflight).
    if !matches!(
        response.status,
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    ) && !response.status.is_informational()
    {
        response
            .headers
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from_static("0"));
    }
}

/// Whether the body of a message with `headers` has a transfer coding besides its chunks (one
/// `chunked`, last, is all pingora reads).
fn codes_its_body(headers: &http::HeaderMap) -> bool {
    let mut codings = list_elements(headers, &header::TRANSFER_ENCODING);
    let chunked = |coding: &[u8]| coding.eq_ignore_ascii_case(b"chunked");
    codings
        .next()
        .is_some_and(|first| !chunked(first) || codings.next().is_some())
}

/// The elements of the comma-separated list that the `name` field lines of `headers` make
/// together, trimmed, empty ones left out (RFC 9110 §5.6.1).
fn list_elements<'a>(
    headers: &'a http::HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
}

/// A `Cache-Control` directive's name: what comes before its `=`.
fn directive_name(directive: &[u8]) -> &[u8] {
    let name = directive.split(|&b| b == b'=').next().unwrap_or_default();
    name.trim_ascii()
}

/// What judging a console request again found: the viewer still let in, under the
/// configuration in force now; or the refusal, answered (what `request_filter` returns).
enum Again {
    Still(Arc<Runtime>, Forward),
    Answered(bool),
}

/// Whether a client-sent header is one only Portcullis may set, so that no client can change
/// who the upstream believes is calling or how it reads the request:
///
/// - its own identity headers, `X-Portcullis-*`;
/// - the headers a proxy sets to describe the original request: `Forwarded`, `X-Forwarded-*`,
///   `X-Real-IP`, `X-Original-*` (`X-Original-URL`, …) and `X-Rewrite-URL` (Portcullis sets
///   `Forwarded` and `X-Forwarded-For`, `-Proto` and `-Host` itself);
/// - the client addresses CDNs and load balancers set, which frameworks read before the
///   connection's (`Client-IP`, `X-Client-IP`, `True-Client-IP`, `X-Cluster-Client-IP`,
///   `CF-Connecting-IP`, `Fastly-Client-IP`), and those django-ipware reads past a private
///   `X-Forwarded-For` for a public address (`X-Forwarded`, `Forwarded-For`, `Via`);
/// - the method overrides (`X-HTTP-Method-Override`, `X-Method-Override`, `X-HTTP-Method`),
///   which would let a client dodge a rule on methods;
/// - `X-Script-Name`, the mount point a common Flask recipe strips from the path;
/// - the schemes a client could claim: `X-Scheme`, which Tornado reads before
///   `X-Forwarded-Proto`, `Front-End-Https`, which CodeIgniter reads after it (so an http
///   request would be https to it), and Jetty's `X-Proxied-Https`, `Proxy-Ssl-Id` and
///   `Proxy-Auth-Cert` (the TLS session and cipher a request came over, to its forwarding);
/// - the client certificates a proxy in front passes on, which applications take as the
///   caller's identity: `Client-Cert` and `Client-Cert-Chain` (RFC 9440), `X-Client-Cert`
///   (ASP.NET Core's certificate forwarding), `X-Client-Cert-*` (Google Cloud's load
///   balancers), `X-Amzn-Mtls-*` (AWS ALB's), `Ssl-Client-*` (Kubernetes ingress-nginx's),
///   `X-ARR-ClientCert` and `X-ARR-SSL` (IIS and Azure App Service) and `X-SSL-*` (nginx's
///   and HAProxy's `X-SSL-Client-Cert`, `-Client-Verify`, `-Client-S-DN`);
/// - `X-Sendfile-Type` and `X-Accel-Mapping`, which an nginx in front of Rails sets and which
///   Rack before 2.2.20 and 3.1.18 reads from the request: a client's would make a download
///   an `X-Accel-Redirect` to a file it chose (CVE-2025-61780);
/// - `X-Middleware-Subrequest`, with which Next.js before 12.3.5, 13.5.9, 14.2.25 and 15.2.3
///   skips its middleware, where its apps check who may see a page (CVE-2025-29927);
/// - `Proxy`, which CGI-style servers hand the application as `HTTP_PROXY`, the variable HTTP
///   clients take their proxy from (httpoxy);
/// - every name with a character other than a letter, a digit or `-`, as nginx drops them:
///   CGI-style servers read `_` as `-`, so `X_Portcullis_User` would be `X-Portcullis-User` to
///   them, PHP reads `.` as `_` and lighttpd every other character (`X.Portcullis.User` and
///   `X~Portcullis~User` are `HTTP_X_PORTCULLIS_USER`), and gunicorn before 22 takes
///   `SCRIPT_NAME` from a header and strips it from the path the application routes.
///
/// Header names arrive lower-cased.
fn is_reserved(name: &[u8]) -> bool {
    const PREFIXES: [&[u8]; 7] = [
        b"x-portcullis-",
        b"x-forwarded-",
        b"x-original-",
        b"x-ssl-",
        b"x-client-cert-",
        b"x-amzn-mtls-",
        b"ssl-client-",
    ];
    const NAMES: [&[u8]; 30] = [
        b"forwarded",
        b"x-forwarded",
        b"forwarded-for",
        b"via",
        b"x-real-ip",
        b"client-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-method-override",
        b"x-http-method",
        b"x-script-name",
        b"x-scheme",
        b"front-end-https",
        b"x-proxied-https",
        b"proxy-ssl-id",
        b"proxy-auth-cert",
        b"client-cert",
        b"client-cert-chain",
        b"x-client-cert",
        b"x-arr-clientcert",
        b"x-arr-ssl",
        b"x-sendfile-type",
        b"x-accel-mapping",
        b"x-middleware-subrequest",
        b"proxy",
    ];
    !name.iter().all(|&b| PLAIN_NAME[usize::from(b)])
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || NAMES.contains(&name)
}

/// The bytes of a header name every server reads as written: `a`-`z`, `0`-`9` and `-` (a table:
/// [`is_reserved`] looks at every byte of every name of every request).
const PLAIN_NAME: [bool; 256] = {
    let mut plain = [false; 256];
    let mut b = 0;
    while b < 256 {
        plain[b] = matches!(b as u8, b'a'..=b'z' | b'0'..=b'9' | b'-');
        b += 1;
    }
    plain
};

/// Removes the `Authorization` values that hold a `Bearer` token (the scheme in any case)
/// `which` picks (any token, in a value that is not ASCII); the others stay. Read as the most
/// lenient upstream reads them, not as Portcullis does (one value, `Bearer <token>`): Flask-JWT-Extended
/// splits a value at commas and then at any space, a Latin-1 no-break space too, and takes
/// `x, Bearer <token>` or `Bearer\xA0<token>` for that token, which Portcullis never read.
/// And as Portcullis reads its own tokens (SCIM's, the admin's): all that follows the scheme,
/// which may hold a space or a comma.
fn remove_bearer_tokens(headers: &mut http::HeaderMap, which: impl Fn(&str) -> bool) {
    // At most so many questions a request, over all its values (up to 256 of them): past them,
    // what is left to ask about is removed unasked.
    let asked = std::cell::Cell::new(0);
    let which = |token: &str| {
        if asked.get() >= MAX_BEARER_QUESTIONS {
            return true;
        }
        asked.set(asked.get() + 1);
        which(token)
    };
    let removed = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        let mut words = bytes
            .split(|&b| b == b',' || !b.is_ascii_graphic())
            .filter(|word| !word.is_empty())
            .skip_while(|word| !word.eq_ignore_ascii_case(b"bearer"));
        if words.next().is_none() {
            return false;
        }
        // More words after the scheme than a credential has are removed unasked: `which`
        // hashes each it is asked about, and a value of one-letter words would be tens of
        // thousands of hashes (milliseconds of the worker's thread) for any client.
        let words: Vec<&[u8]> = words.take(MAX_BEARER_WORDS + 1).collect();
        !bytes.is_ascii()
            || words.len() > MAX_BEARER_WORDS
            || if words.is_empty() {
                which("")
            } else {
                // Every word is ASCII.
                (words.iter()).any(|token| std::str::from_utf8(token).map_or(true, &which))
            }
            || after_bearer(bytes).any(|token| std::str::from_utf8(token).map_or(true, &which))
    };
    remove_values(headers, header::AUTHORIZATION, removed);
}

/// The most words after `Bearer` an `Authorization` value keeps for its tokens to be asked
/// about one by one: a token of Portcullis' own typed by hand may hold a few spaces or commas;
/// an upstream's own is one word.
const MAX_BEARER_WORDS: usize = 8;
/// The most tokens of a request's `Authorization` values asked about (each a hash or two).
const MAX_BEARER_QUESTIONS: usize = 16;

/// What follows a `Bearer` word of `value` (its scheme, in any case), trimmed, as Portcullis
/// reads its own tokens (all after the scheme): after the first such word, and in each element
/// of a list that begins with one; only where it is more than one word (a word alone was
/// asked about as one), so an ordinary token is not asked about again. No byte is in more
/// than two: each goes to `which`, a hash.
fn after_bearer(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    fn apart(b: &u8) -> bool {
        *b == b',' || !b.is_ascii_graphic()
    }
    fn after_scheme(text: &[u8]) -> Option<&[u8]> {
        let (scheme, rest) = text.split_at_checked(6)?;
        let word = scheme.eq_ignore_ascii_case(b"bearer") && rest.first().is_some_and(apart);
        word.then_some(rest)
    }
    let first = (0..value.len())
        .filter(|&at| at == 0 || apart(&value[at - 1]))
        .find_map(|at| after_scheme(&value[at..]));
    let elements = value.split(|&b| b == b',');
    let listed = elements.filter_map(|element| after_scheme(element.trim_ascii_start()));
    first
        .into_iter()
        .chain(listed)
        .map(<[u8]>::trim_ascii)
        .filter(|token| token.iter().any(apart))
}

/// Removes the `name` values `doomed` picks, the others kept in their order; returns how many
/// it removed. When it picks none, as for nearly every request and answer, nothing is copied.
fn remove_values(
    headers: &mut http::HeaderMap,
    name: HeaderName,
    doomed: impl Fn(&HeaderValue) -> bool,
) -> usize {
    let values = headers.get_all(&name);
    let Some(first) = values.iter().position(&doomed) else {
        return 0;
    };
    // Each value judged once: those before the first picked were kept already.
    let mut removed = 1;
    let kept: Vec<HeaderValue> = (values.iter().enumerate())
        .filter(|&(at, value)| {
            let gone = at == first || (at > first && doomed(value));
            removed += usize::from(gone && at > first);
            !gone
        })
        .map(|(_, value)| value.clone())
        .collect();
    replace_all(headers, name, kept);
    removed
}

/// Puts `kept` in place of every `name` header, in their order.
fn replace_all(headers: &mut http::HeaderMap, name: HeaderName, kept: Vec<HeaderValue>) {
    headers.remove(&name);
    for value in kept {
        // No more values than were just removed: the map has room for them.
        let _ = headers.try_append(&name, value);
    }
}

/// Removes every header [`is_reserved`] names.
fn strip_reserved_headers(headers: &mut http::HeaderMap) {
    let reserved = |name: &HeaderName| is_reserved(name.as_str().as_bytes());
    if !headers.keys().any(reserved) {
        return;
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| reserved(n)).cloned().collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// The names of Portcullis' own cookies: the session cookie's (`[oidc] cookie_name`, or the
/// default), those sessions held were issued in under an earlier name, and sign-ins'.
#[derive(Clone, Copy)]
struct OwnCookies<'a> {
    session: &'a str,
    /// Earlier names of the session cookie (the present one may be among them).
    earlier: &'a [Box<str>],
}

impl<'a> OwnCookies<'a> {
    fn new(session: &'a str, earlier: &'a [Box<str>]) -> Self {
        Self { session, earlier }
    }

    /// Whether `name`, a cookie's name, is one of them, with or without a `__Host-` or
    /// `__Secure-` prefix.
    fn holds(&self, name: &str) -> bool {
        let unprefixed = ["__Host-", "__Secure-"].iter().find_map(|prefix| {
            let head = name.get(..prefix.len())?;
            head.eq_ignore_ascii_case(prefix)
                .then(|| &name[prefix.len()..])
        });
        let name = unprefixed.unwrap_or(name);
        name == self.session
            || name.starts_with(BROWSER_COOKIE)
            || self.earlier.iter().any(|earlier| **earlier == *name)
    }

    /// Text every one of them contains: the session cookie's names and the sign-ins' prefix.
    fn marks(&self) -> impl Iterator<Item = &'a str> {
        let session = self.session;
        [session, BROWSER_COOKIE].into_iter().chain(
            self.earlier
                .iter()
                .map(|earlier| &**earlier)
                .filter(move |earlier| *earlier != session),
        )
    }
}

/// Whether `response` (a 101) accepts the websocket `request` asked for: `Upgrade: websocket`
/// and the `Sec-WebSocket-Accept` of the request's one key (RFC 6455 §4.2.2).
fn accepts_websocket(request: &RequestHeader, response: &ResponseHeader) -> bool {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    fn one(headers: &http::HeaderMap, name: HeaderName) -> Option<&HeaderValue> {
        let mut values = headers.get_all(name).iter();
        values.next().filter(|_| values.next().is_none())
    }
    let (Some(key), Some(accept), Some(upgrade)) = (
        one(&request.headers, header::SEC_WEBSOCKET_KEY),
        one(&response.headers, header::SEC_WEBSOCKET_ACCEPT),
        one(&response.headers, header::UPGRADE),
    ) else {
        return false;
    };
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &[key.as_bytes(), GUID].concat(),
    );
    let expected = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    upgrade.as_bytes().eq_ignore_ascii_case(b"websocket")
        && accept.as_bytes().trim_ascii() == expected.as_bytes()
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Takes out of an upstream's answer the headers that are for the hop it came over (RFC 9110
/// §7.6.1): `Keep-Alive`, `Proxy-Connection` and `TE` (a request's, which h2 refuses in an
/// answer to an HTTP/2 client) always, and those its `Connection` names (an
/// internal token an upstream hands the proxy, say). What the client needs stays whatever is
/// named: the framing headers (pingora frames the answer to the client from them) and, on a
/// 101, the `Upgrade` and `Connection` of the websocket it asked for.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, status: StatusCode) {
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let kept = |name: &HeaderName| {
        *name == header::CONTENT_LENGTH
            || *name == header::TRANSFER_ENCODING
            || (switching && (*name == header::UPGRADE || *name == header::CONNECTION))
    };
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(connection_options)
        .filter_map(|name| HeaderName::from_bytes(name).ok())
        .filter(|name| !kept(name))
        .collect();
    for name in named
        .iter()
        .chain([&KEEP_ALIVE, &PROXY_CONNECTION, &header::TE])
    {
        headers.remove(name);
    }
}

/// The options a `Connection` value names (header names, in a valid one) bar `keep-alive` and
/// `close`, which nearly every one says alone.
fn connection_options(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    let options = value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii);
    options.filter(|o| !o.eq_ignore_ascii_case(b"keep-alive") && !o.eq_ignore_ascii_case(b"close"))
}

const CLEAR_SITE_DATA: HeaderName = HeaderName::from_static("clear-site-data");

/// Whether `headers`' `Vary` names a header Portcullis sets on requests to upstreams (or
/// removes from them): the identity headers as `identity` names them, and every reserved one
/// ([`is_reserved`]: `X-Portcullis-*`, `Forwarded`, `X-Forwarded-*`, ...).
fn varies_on_what_portcullis_tells(
    headers: &http::HeaderMap,
    identity: &portcullis_config::IdentityConfig,
) -> bool {
    let told = [
        &identity.header_user,
        &identity.header_email,
        &identity.header_groups,
    ];
    list_elements(headers, &header::VARY).any(|name| {
        let name = name.to_ascii_lowercase();
        is_reserved(&name) || told.iter().any(|t| t.as_str().as_bytes() == name)
    })
}

/// Whether `headers`' `Cache-Control` says whether a shared cache may store the answer:
/// `public` or `s-maxage` (it may), `private` or `no-store` (it may not). Any other directive
/// (`max-age`, `no-cache`, `must-revalidate`, `immutable`) leaves a shared cache free to store
/// it (RFC 9111 §3).
fn says_who_may_store(headers: &http::HeaderMap) -> bool {
    list_elements(headers, &header::CACHE_CONTROL).any(|directive| {
        // `private="Set-Cookie"` keeps only those fields from shared caches: it settles
        // nothing about the rest.
        [&b"public"[..], b"private", b"no-store"]
            .iter()
            .any(|said| directive.eq_ignore_ascii_case(said))
            || directive_name(directive).eq_ignore_ascii_case(b"s-maxage")
    })
}

/// `headers`' `Cache-Control` made private, in one field line: `private`, then what else it
/// says but `public` and `s-maxage` (and any `private`), so no cache reads two opinions.
fn made_private(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let mut value = b"private".to_vec();
    for directive in list_elements(headers, &header::CACHE_CONTROL) {
        let name = directive_name(directive);
        let dropped = [&b"public"[..], b"s-maxage", b"private"]
            .iter()
            .any(|said| name.eq_ignore_ascii_case(said));
        if !dropped {
            value.extend_from_slice(b", ");
            value.extend_from_slice(directive);
        }
    }
    HeaderValue::from_bytes(&value).ok()
}

/// Whether `headers` carry credentials of a scheme that logs in the connection they come on
/// (`Negotiate`, `NTLM`) rather than the request alone.
fn logs_in_the_connection(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::AUTHORIZATION).iter().any(|value| {
        let scheme = value
            .as_bytes()
            .split(|b| *b == b' ')
            .next()
            .unwrap_or_default();
        scheme.eq_ignore_ascii_case(b"negotiate") || scheme.eq_ignore_ascii_case(b"ntlm")
    })
}

/// The fields of `headers` that tell a CDN how to cache the answer in place of
/// `Cache-Control`: RFC 9213's `CDN-Cache-Control` and a CDN's own (`Cloudflare-CDN-Cache-Control`,
/// `Surrogate-Control`, `Edge-Control`, ...). A CDN that finds one ignores `Cache-Control`, so
/// an answer made private there is stored all the same.
fn cdn_cache_fields(headers: &http::HeaderMap) -> Vec<HeaderName> {
    let for_a_cdn = |name: &&HeaderName| {
        let name = name.as_str();
        name.ends_with("-cache-control") || name == "surrogate-control" || name == "edge-control"
    };
    headers.keys().filter(for_a_cdn).cloned().collect()
}

/// Whether `headers` ask the browser to clear the site's cookies (`"cookies"` or `"*"`).
fn clears_cookies(headers: &http::HeaderMap) -> bool {
    list_elements(headers, &CLEAR_SITE_DATA)
        .any(|kind| kind.eq_ignore_ascii_case(b"\"cookies\"") || kind == b"\"*\"")
}

/// Takes out of `headers`, an answer's, each `Set-Cookie` for one of Portcullis' own cookies;
/// returns how many. An answer without any, nearly all of them, is left as it is.
fn strip_own_set_cookies(headers: &mut http::HeaderMap, own: OwnCookies<'_>) -> usize {
    let own = |value: &HeaderValue| {
        let line = String::from_utf8_lossy(value.as_bytes());
        let pair = line.split(';').next().unwrap_or_default();
        let name = pair.split('=').next().unwrap_or_default().trim();
        // A nameless cookie (`=portcullis_session=x`) is sent back as its value alone, which
        // then reads as a cookie of that name (RFC 6265bis §5.6).
        let sent_as = match name {
            "" => pair.split('=').nth(1).unwrap_or_default().trim(),
            name => name,
        };
        own.holds(sent_as)
    };
    remove_values(headers, header::SET_COOKIE, own)
}

/// Removes Portcullis' own cookies from the `Cookie` headers sent upstream: the session (under
/// either of its names) and sign-ins in progress. The other cookies stay, in order, whatever
/// bytes they hold, in one `Cookie` header: HTTP/2 clients may send each cookie as a header of
/// its own, which RFC 9113 §8.2.3 has joined with `; ` for HTTP/1.1 (gunicorn would join them
/// with `,` into one cookie, Starlette read the first only).
fn strip_own_cookies(headers: &mut http::HeaderMap, own: OwnCookies<'_>) {
    // Every own name contains one of its marks (`__Host-` + the session's name included), so
    // a request without any, nearly all of them, is left as it is without a copy.
    let mentions_own = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        let contains = |name: &[u8]| {
            // The first byte is compared on its own: most windows differ there, and a whole
            // comparison per window cost several times as much on a browser's cookies.
            let first = name.first();
            bytes
                .windows(name.len())
                .any(|w| w.first() == first && w == name)
        };
        own.marks().any(|name| contains(name.as_bytes()))
    };
    let all = headers.get_all(header::COOKIE);
    if all.iter().nth(1).is_none() && !all.iter().any(mentions_own) {
        return;
    }
    // A name that is not text is none of Portcullis' (they are ASCII).
    let is_own = |name: &[u8]| std::str::from_utf8(name).is_ok_and(|name| own.holds(name));
    let mut joined = Vec::new();
    for kept in all
        .iter()
        .filter_map(|value| cookies::without(value.as_bytes(), is_own))
    {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(&kept);
    }
    // Each part came from a valid header value, so the joined value is one too.
    let kept = HeaderValue::from_bytes(&joined)
        .ok()
        .filter(|_| !joined.is_empty());
    replace_all(headers, header::COOKIE, kept.into_iter().collect());
}

/// The assertion a worker thread sent last, with what it was signed for: the identity
/// ([`Named`], whose user, email and groups a pointer names while it lives) and the other
/// claims. A caller's requests to a route take it from here, not from the signer's shared
/// cache (its lock, its comparison of every claim), while its key signs and it is not near its
/// end ([`Signer::still_serves`]).
struct LastAssertion {
    signer: Arc<Signer>,
    named: Arc<crate::gate::Named>,
    issuer: Box<str>,
    audience: Box<str>,
    served: Option<Box<str>>,
    agent: Option<Box<str>>,
    delegated: bool,
    signed: crate::assertion::Signed,
}

thread_local! {
    static LAST_ASSERTION: std::cell::RefCell<Option<LastAssertion>> =
        const { std::cell::RefCell::new(None) };
}

/// The assertion of `claims`, made for the identity `named`, at `now` (see [`LastAssertion`]).
/// A frame of its own in profiles (`bench/floor.py --profile` reads it).
#[inline(never)]
fn assertion(
    signer: &Arc<Signer>,
    named: &Arc<crate::gate::Named>,
    claims: &AssertionClaims<'_>,
    now: u64,
) -> std::result::Result<HeaderValue, String> {
    LAST_ASSERTION.with_borrow_mut(|last| {
        let same = |l: &&LastAssertion| {
            Arc::ptr_eq(&l.signer, signer)
                && Arc::ptr_eq(&l.named, named)
                && *l.audience == *claims.audience
                && *l.issuer == *claims.issuer
                && l.served.as_deref() == claims.served
                && l.agent.as_deref() == claims.agent
                && l.delegated == claims.delegated
        };
        if let Some(last) = last.as_ref().filter(same) {
            if signer.still_serves(&last.signed, now) {
                return Ok(last.signed.token.clone());
            }
        }
        let signed = signer.signed(claims, now)?;
        let token = signed.token.clone();
        *last = Some(LastAssertion {
            signer: signer.clone(),
            named: named.clone(),
            issuer: claims.issuer.into(),
            audience: claims.audience.into(),
            served: claims.served.map(Into::into),
            agent: claims.agent.map(Into::into),
            delegated: claims.delegated,
            signed,
        });
        Ok(token)
    })
}

/// The `Forwarded` and `X-Forwarded-For` values of the last request a worker thread sent
/// upstream, with what they were made from. The requests of a connection share client, host
/// and protocol, so most requests take them from here instead of writing them again.
struct Forwarding {
    client: Option<std::net::IpAddr>,
    host: Option<HeaderValue>,
    tls: bool,
    forwarded: HeaderValue,
    forwarded_for: Option<HeaderValue>,
}

thread_local! {
    static LAST_FORWARDING: std::cell::RefCell<Option<Forwarding>> =
        const { std::cell::RefCell::new(None) };
}

/// `Forwarded` and `X-Forwarded-For` for a request from `client` to `host`.
fn forwarding_headers(
    client: Option<std::net::IpAddr>,
    host: Option<&HeaderValue>,
    tls: bool,
) -> std::result::Result<(HeaderValue, Option<HeaderValue>), http::header::InvalidHeaderValue> {
    LAST_FORWARDING.with_borrow_mut(|last| {
        let same = |l: &&Forwarding| l.client == client && l.tls == tls && l.host.as_ref() == host;
        if let Some(last) = last.as_ref().filter(same) {
            return Ok((last.forwarded.clone(), last.forwarded_for.clone()));
        }
        let proto = if tls { "https" } else { "http" };
        let made = Forwarding {
            client,
            host: host.cloned(),
            tls,
            forwarded: HeaderValue::try_from(forwarded(client, host, proto))?,
            forwarded_for: client
                .map(|ip| HeaderValue::try_from(ip.to_string()))
                .transpose()?,
        };
        let values = (made.forwarded.clone(), made.forwarded_for.clone());
        *last = Some(made);
        Ok(values)
    })
}

/// `Forwarded` (RFC 7239) for the request: who sent it, to which host, over which protocol.
fn forwarded(client: Option<std::net::IpAddr>, host: Option<&HeaderValue>, proto: &str) -> String {
    use std::fmt::Write;
    let mut value = String::with_capacity(96);
    // Writing to a String cannot fail.
    let _ = match client {
        Some(std::net::IpAddr::V6(ip)) => write!(value, "for=\"[{ip}]\";"),
        Some(ip) => write!(value, "for={ip};"),
        None => write!(value, "for=unknown;"),
    };
    // A host is a quoted-string: it may hold a `:`, and never holds `"` or `\`.
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        if !host.contains(['"', '\\']) {
            let _ = write!(value, "host=\"{host}\";");
        }
    }
    value.push_str("proto=");
    value.push_str(proto);
    value
}

/// Size of the request head as it arrived, near enough to bound it: request line and headers.
/// An HTTP/2 request's host is its `:authority` (browsers send no `Host` there), counted as
/// the `Host` header HTTP/1 would have carried, which it is sent upstream as; and its cookie
/// crumbs (a field each, RFC 9113 §8.2.3) as the one `Cookie` field HTTP/1 carries them in,
/// which they are sent upstream as: the same head is the same size over either.
fn head_size(req: &RequestHeader) -> usize {
    let mut cookie_said = false;
    let headers: usize = req
        .headers
        .iter()
        .map(|(name, value)| match name == header::COOKIE {
            // `; ` before it, in the field said first.
            true if std::mem::replace(&mut cookie_said, true) => value.len() + 2,
            _ => name.as_str().len() + value.len() + 4,
        })
        .sum();
    // (An HTTP/1 request has no authority unless its target is absolute, and then a `Host`:
    // the map is not searched for it on every request.)
    let authority = (req.uri.authority())
        .filter(|_| !req.headers.contains_key(header::HOST))
        .map_or(0, |a| "host".len() + a.as_str().len() + 4);
    req.raw_path().len() + req.method.as_str().len() + 12 + headers + authority
}

fn content_length(req: &RequestHeader) -> Option<u64> {
    length_of(&req.headers)
}

/// The `Content-Length` `headers` say, if one: as pingora frames the body by it, one length
/// however many times it is said (`2048, 2048`, or in several field lines: RFC 9110 §8.6).
pub(crate) fn length_of(headers: &http::HeaderMap) -> Option<u64> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for said in value.as_bytes().split(|&b| b == b',') {
            let said = decimal(said.trim_ascii())?;
            if length.is_some_and(|length| length != said) {
                return None;
            }
            length = Some(said);
        }
    }
    length
}

/// `digits` as a number: ASCII digits only (no sign), at least one, and no more than fit.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d < 10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Answers up to this long are written without a timeout: they fit the socket's buffers.
const SMALL_ANSWER: u64 = 64 * 1024;

/// The most header fields a request may have, as pingora bounds an HTTP/1 one.
const MAX_FIELDS: usize = 256;

/// How many header fields `req` has as an HTTP/1 client sends them: HTTP/2 browsers send each
/// cookie as a field of its own (RFC 9113 §8.2.3), which HTTP/1 joins into one.
fn fields(req: &RequestHeader) -> usize {
    let all = req.headers.len();
    if all <= MAX_FIELDS {
        return all;
    }
    let crumbs = req.headers.get_all(header::COOKIE).iter().count();
    all - crumbs.saturating_sub(1)
}

/// Whether a field value starts or ends with a space or a tab.
fn padded(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    [bytes.first(), bytes.last()]
        .into_iter()
        .flatten()
        .any(|b| matches!(b, b' ' | b'\t'))
}

/// Takes the spaces and tabs off both ends of every field value of `req`, as HTTP/1 parsers
/// do. The values of a name keep their order. A request without any, nearly all of them, is
/// left as it is.
fn trim_padded_values(req: &mut RequestHeader) {
    let names: std::collections::HashSet<HeaderName> = req
        .headers
        .iter()
        .filter(|(_, value)| padded(value))
        .map(|(name, _)| name.clone())
        .collect();
    for name in names {
        // A part of a valid value is a valid value.
        let values: Vec<HeaderValue> = req
            .headers
            .get_all(&name)
            .iter()
            .filter_map(|value| HeaderValue::from_bytes(value.as_bytes().trim_ascii()).ok())
            .collect();
        req.remove_header(&name);
        for value in values {
            // Only a name pingora could not write fails, and this one came from the request.
            let _ = req.append_header(name.clone(), value);
        }
    }
}

/// The `host[:port]` of an HTTP/1.0 request's absolute target, where it has no `Host`. (The
/// rest is read as any target is: `path::target`.)
fn target_host_for(req: &RequestHeader) -> Option<HeaderValue> {
    if req.version != http::Version::HTTP_10 || req.headers.contains_key(header::HOST) {
        return None;
    }
    let raw = std::str::from_utf8(req.raw_path()).ok()?;
    let (authority, _) = path::absolute(raw)?;
    HeaderValue::from_str(authority).ok()
}

/// The host the client asked for, lower-cased and without port: `Host` for HTTP/1, the
/// `:authority` for HTTP/2. `None` unless it is a host name, an IPv4 address or a bracketed
/// IPv6 address, with at most a numeric port: `evil.test/x.corp.test` would otherwise match a
/// `*.corp.test` route and reach the upstream as `X-Forwarded-Host`, where an application that
/// builds links from it would send its users to `evil.test`.
fn request_host(req: &RequestHeader) -> Option<Cow<'_, str>> {
    let raw = match req.headers.get(header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => req.uri.authority()?.as_str(),
    };
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port, in the one text form routes are written in (see `bracketed_ipv6`).
        let (v6, after) = rest.split_once(']')?;
        let port = if after.is_empty() {
            ""
        } else {
            after.strip_prefix(':')?
        };
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return bracketed_ipv6(v6).map(Cow::Owned);
    } else {
        let (host, port) = raw.rsplit_once(':').unwrap_or((raw, ""));
        let name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !host.bytes().all(name_byte) {
            return None;
        }
        (host, port)
    };
    if host.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// Whether a host `named` in a URL is `host` (as [`request_host`] reads a `Host`: an IPv6
/// address in its one text form).
fn names_host(named: &str, host: &str) -> bool {
    let named = match named.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => bracketed_ipv6(v6).map(Cow::Owned),
        None => Some(Cow::Borrowed(named)),
    };
    named.is_some_and(|named| named.eq_ignore_ascii_case(host))
}

/// An IPv6 address as routes name it: bracketed, in the text form Rust gives it (as the
/// configuration writes it), which is not always the client's (`0:0::1` is `::1`) nor a
/// browser's (`::ffff:a00:1`, as the URL standard writes it, is `::ffff:10.0.0.1`).
pub(crate) fn bracketed_ipv6(text: &str) -> Option<String> {
    let address: std::net::Ipv6Addr = text.parse().ok()?;
    Some(format!("[{address}]"))
}

/// A WebDAV `Destination` (RFC 4918 §10.3), read as the request target is: on this `host`,
/// its path normalized. Its path, and the value to send upstream in its place (the absolute
/// URL it was, or its path, now as judged); `None` without one, or for a method other than
/// COPY and MOVE (which alone read it).
fn destination(
    req: &RequestHeader,
    host: &str,
    tls: bool,
) -> Result<Option<(String, String)>, String> {
    if !matches!(req.method.as_str(), "COPY" | "MOVE") {
        return Ok(None);
    }
    let mut values = req.headers.get_all("destination").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Destination".to_owned());
    }
    let target = path::target(value.as_bytes()).map_err(|e| format!("its Destination: {e}"))?;
    if target.host.is_some_and(|named| !names_host(named, host)) {
        return Err("a Destination on another host".to_owned());
    }
    let path = path::normalize(target.path)
        .map_err(|e| format!("its Destination: {e}"))?
        .into_owned();
    let query = target.query.map_or(String::new(), |q| format!("?{q}"));
    let sent = match target.host {
        // Apache's mod_dav takes only an absolute URL, on the host it was asked for.
        Some(_) => format!("{}{path}{query}", request_origin(req, tls)),
        None => format!("{path}{query}"),
    };
    Ok(Some((path, sent)))
}

/// `scheme://host[:port]` as the client addressed this request.
fn request_origin(req: &RequestHeader, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let authority = req
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    format!("{scheme}://{authority}")
}

fn https_location(host: &str, https_port: Option<u16>, req: &RequestHeader) -> String {
    let path_and_query = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    match https_port {
        Some(443) | None => format!("https://{host}{path_and_query}"),
        Some(port) => format!("https://{host}:{port}{path_and_query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker thread sends the assertion it sent last again only while it is what the signer
    /// would give: for the same identity and claims, its key still signing, not near its end.
    #[test]
    fn a_thread_sends_its_last_assertion_again_only_while_the_signer_would() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::clock::now_unix();
        let ttl = std::time::Duration::from_secs(300);
        let signer = Arc::new(Signer::open(dir.path(), now, ttl).unwrap());
        let named = |groups: &[&str]| {
            let groups = groups.iter().map(|g| g.to_string()).collect();
            let email = Some("alice@corp.example".to_owned());
            Arc::new(crate::gate::Named::new("alice".to_owned(), email, groups))
        };
        let send = |named: &Arc<crate::gate::Named>, audience: &str, at: u64| {
            let claims = AssertionClaims {
                issuer: "https://auth.example.com",
                audience,
                served: None,
                subject: &named.user,
                email: named.email.as_deref(),
                groups: &named.group_names,
                agent: None,
                delegated: false,
                version: named.version,
            };
            let token = assertion(&signer, named, &claims, at).unwrap();
            token.to_str().unwrap().to_owned()
        };
        let eng = named(&["eng"]);
        let first = send(&eng, "app", now);
        assert_eq!(send(&eng, "app", now), first, "the same, sent again");
        assert_ne!(send(&eng, "wiki", now), first, "for another route");
        let ops = named(&["ops"]);
        let regrouped = send(&ops, "app", now);
        assert_ne!(regrouped, first, "for other groups");
        assert_eq!(send(&ops, "app", now), regrouped);
        // Within REUSE_SECS of its signing, then no more.
        let later = now + crate::assertion::REUSE_SECS + 1;
        let renewed = send(&ops, "app", later);
        assert_ne!(renewed, regrouped, "near its end");
        // A new key signs from now: the last is not sent again.
        signer.rotate(later, 0).unwrap();
        assert_ne!(
            send(&ops, "app", later),
            renewed,
            "signed by a key that no longer signs"
        );
    }

    /// A refused upstream certificate is logged with why (pingora's words, in the context of
    /// an error it marks the upstream's); what an upstream sent that could not be parsed is not.
    #[test]
    fn the_log_says_why_an_upstream_certificate_was_refused_and_quotes_no_upstream_bytes() {
        let mut tls = Error::explain(
            ErrorType::TLSHandshakeFailure,
            "TLS connect() failed: invalid peer certificate: UnknownIssuer, SNI: billing",
        );
        tls.as_up();
        let told = described(&tls);
        assert!(told.contains("UnknownIssuer"), "{told}");
        // The certificate's names, quoted there, are cut and cannot forge a line.
        let names = format!("\nforged line{}", ", name".repeat(10_000));
        let mut long = Error::explain(
            ErrorType::TLSHandshakeFailure,
            format!("TLS connect() failed: NotValidForName: {names}"),
        );
        long.as_up();
        let told = described(&long);
        assert!(!told.contains('\n') && told.len() < 1024, "{told}");
        let mut head = Error::explain(ErrorType::InvalidHTTPHeader, "HTTP/1.1 200 secret-head");
        head.as_up();
        let told = described(&head);
        assert!(!told.contains("secret-head"), "{told}");
    }

    #[test]
    fn only_an_upgrade_to_websocket_asks_for_a_websocket() {
        let with = |upgrade: &[&str]| {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            for value in upgrade {
                req.append_header("upgrade", *value).unwrap();
            }
            asks_for_websocket(&req)
        };
        assert!(with(&["websocket"]));
        assert!(with(&["WebSocket"]));
        assert!(with(&["h2c, websocket"]));
        assert!(with(&["h2c", "websocket"]));
        assert!(!with(&["h2c"]));
        assert!(!with(&["websocket2"]));
        assert!(!with(&[]));
    }

    /// A `Destination` names this host in any spelling of it (an IPv6 address as `Host` is
    /// read), and its query goes on as sent.
    #[test]
    fn a_destination_is_read_on_this_host_in_any_spelling() {
        let copy = |host: &str, destination: &[u8]| {
            let mut req = RequestHeader::build("COPY", b"/a", None).unwrap();
            req.insert_header("host", host).unwrap();
            let value = HeaderValue::from_bytes(destination).unwrap();
            req.insert_header("destination", value).unwrap();
            req
        };
        let host = bracketed_ipv6("::ffff:a00:1").unwrap();
        let req = copy(
            "[::ffff:a00:1]",
            "http://[::FFFF:a00:1]/x/../b?café".as_bytes(),
        );
        let (path, sent) = destination(&req, &host, false).unwrap().unwrap();
        assert_eq!(path, "/b");
        assert_eq!(sent, "http://[::ffff:a00:1]/b?café");
        let elsewhere = copy("app.test", b"http://other.test/b");
        assert!(destination(&elsewhere, "app.test", false).is_err());
        let get = {
            let mut req = copy("app.test", b"/admin");
            req.set_method(http::Method::GET);
            req
        };
        assert_eq!(destination(&get, "app.test", false), Ok(None));
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    /// The headers of a request built by [`request`], as the upstream request is edited.
    fn header_map(headers: &[(&str, &str)]) -> http::HeaderMap {
        http::request::Parts::from(request(headers)).headers
    }

    fn refusal(who: Option<&str>, reason: &str) -> Refusal {
        Refusal {
            who: who.map(str::to_owned),
            rule: Some("routes[0].deny".to_owned()),
            cause: crate::gate::Cause::DenyRule,
            reason: reason.to_owned(),
            agent: None,
        }
    }

    fn body(reply: &Reply) -> String {
        String::from_utf8_lossy(&reply.body).into_owned()
    }

    /// A request cut because the replica lost touch is told to try again, unless it was sent
    /// upstream already (a 403 then: it may have taken effect).
    #[test]
    fn the_lost_touch_page_says_whether_to_try_again() {
        let again = body(&lost_touch_page(StatusCode::SERVICE_UNAVAILABLE, false));
        assert!(again.contains("Try again in a moment."), "{again}");
        let restart = body(&lost_touch_page(StatusCode::SERVICE_UNAVAILABLE, true));
        assert!(restart.contains("until it is restarted"), "{restart}");
        assert!(!restart.contains("Try again"), "{restart}");
        let sent = lost_touch_page(StatusCode::FORBIDDEN, false);
        assert_eq!(sent.status, StatusCode::FORBIDDEN);
        let sent = body(&sent);
        assert!(sent.contains("check before sending it again"), "{sent}");
        assert!(!sent.contains("Try again"), "{sent}");
    }

    #[test]
    fn an_api_client_is_refused_in_json_naming_only_itself() {
        let reply = forbidden(
            &refusal(Some("alice@corp.example"), "denied by routes[0].deny"),
            "http://app.test",
            Client::Api,
            true,
        );
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(reply.content_type, Some("application/json"));
        let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(json["error"], "forbidden");
        assert_eq!(json["user"], "alice@corp.example");
        assert_eq!(json["route"], "http://app.test");
        assert_eq!(json["reason"], "denied by routes[0].deny");
    }

    #[test]
    fn a_browser_is_refused_with_a_page_and_a_way_to_sign_out() {
        let reply = forbidden(
            &refusal(Some("<alice>"), "no rule allows <alice> to GET /x"),
            "http://app.test",
            Client::Browser,
            true,
        );
        let html = body(&reply);
        assert_eq!(reply.content_type, Some("text/html; charset=utf-8"));
        assert!(
            html.contains("signed in as <strong>&lt;alice&gt;</strong>"),
            "{html}"
        );
        assert!(html.contains("http://app.test: no rule allows &lt;alice&gt; to GET /x."));
        assert!(html.contains(SIGN_OUT_FORM), "{html}");
        // A machine (or an agent) whose client reads HTML has no session to end.
        let reply = forbidden(
            &refusal(Some("agent:bot"), "no rule allows agent:bot to GET /x"),
            "http://app.test",
            Client::Browser,
            false,
        );
        assert!(!body(&reply).contains("sign_out"), "{}", body(&reply));
    }

    #[test]
    fn nobody_signed_in_is_not_shown_as_anyone_nor_offered_to_sign_out() {
        let reply = forbidden(
            &refusal(None, "this address is not public"),
            "r",
            Client::Browser,
            false,
        );
        let html = body(&reply);
        assert!(html.contains("You are not signed in."), "{html}");
        assert!(!html.contains("anonymous"), "{html}");
        assert!(!html.contains("sign_out"), "{html}");
        let reply = forbidden(
            &refusal(None, "this address is not public"),
            "r",
            Client::Api,
            false,
        );
        let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(json["user"], serde_json::Value::Null);
    }

    #[test]
    fn a_challenge_says_invalid_token_only_for_a_refused_token() {
        let header = |reply: &Reply| {
            reply
                .headers
                .iter()
                .find(|(name, _)| name == header::WWW_AUTHENTICATE)
                .map(|(_, value)| value.clone())
        };
        let plain = challenge(false);
        assert_eq!(plain.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            header(&plain).as_deref(),
            Some("Bearer realm=\"portcullis\"")
        );
        let invalid = challenge(true);
        assert_eq!(
            header(&invalid).as_deref(),
            Some("Bearer realm=\"portcullis\", error=\"invalid_token\"")
        );
    }

    /// A length is read as pingora frames the body by it: one however many times it is said,
    /// digits only.
    #[test]
    fn a_content_length_is_one_length_however_often_said() {
        let length = |values: &[&str]| {
            let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("Content-Length", *v)).collect();
            length_of(&header_map(&pairs))
        };
        assert_eq!(length(&["2048"]), Some(2048));
        assert_eq!(length(&[" 7 "]), Some(7));
        assert_eq!(length(&["2048, 2048"]), Some(2048));
        assert_eq!(length(&["5", "5,5"]), Some(5));
        assert_eq!(length(&[]), None);
        for bad in [
            &["1, 2"][..],
            &["5", "6"],
            &["+5"],
            &[""],
            &["5,"],
            &["0x10"],
        ] {
            assert_eq!(length(bad), None, "{bad:?}");
        }
        assert_eq!(length(&["18446744073709551616"]), None, "past u64");
    }

    #[test]
    fn identity_headers_are_stripped_in_every_spelling() {
        let mut req = header_map(&[
            ("X-Portcullis-User", "mallory"),
            ("x-portcullis-groups", "admins"),
            ("X_Portcullis_User", "mallory"),
            ("X-PORTCULLIS-EMAIL", "m@evil"),
            ("x-portcullis_assertion", "forged"),
            ("X-Portcullis-User", "again"),
            ("X.Portcullis.User", "mallory"),
            ("x-portcullis.email", "m@evil"),
            ("X~Portcullis~User", "mallory"),
            ("X+Portcullis!Groups", "admins"),
            ("X-Portcullisx", "kept: not the prefix"),
            ("Accept", "text/html"),
        ]);
        strip_reserved_headers(&mut req);
        let mut names: Vec<&str> = req.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-portcullisx"]);
    }

    #[test]
    fn forwarding_and_method_override_headers_are_portcullis_own() {
        let mut req = header_map(&[
            ("Forwarded", "for=10.0.0.1;host=admin.internal"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Prefix", "/admin"),
            ("X_Forwarded_Host", "admin.internal"),
            ("X-Real-IP", "10.0.0.1"),
            ("X-Original-URL", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Method-Override", "DELETE"),
            ("X-HTTP-Method", "DELETE"),
            ("X.HTTP.Method.Override", "DELETE"),
            ("Proxy", "http://10.0.0.1:3128"),
            // Read by django-ipware past a private `X-Forwarded-For` for a public address.
            ("X-Forwarded", "198.51.100.7"),
            ("Forwarded-For", "198.51.100.7"),
            ("Via", "1.1 198.51.100.7"),
            // With it, an unpatched Next.js skips its middleware (CVE-2025-29927).
            (
                "X-Middleware-Subrequest",
                "middleware:middleware:middleware:middleware:middleware",
            ),
            // Next.js' own client sends this one: it stays.
            ("X-Middleware-Prefetch", "1"),
            ("X-Request-Id", "kept"),
        ]);
        strip_reserved_headers(&mut req);
        let mut names: Vec<&str> = req.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["x-middleware-prefetch", "x-request-id"]);
    }

    #[test]
    fn bearer_tokens_are_removed_and_other_schemes_kept() {
        let mut req = header_map(&[
            ("Authorization", "Bearer abc"),
            ("Authorization", "Basic dXNlcjpwYXNz"),
            ("Authorization", "bEaReR\tdef"),
            ("Authorization", "Bearer"),
            // Read as a token by an upstream that splits at commas and any space.
            ("Authorization", "x, Bearer ghi"),
            ("Authorization", "Basic dXNlcjpwYXNz,bearer ghi"),
            // Not a bearer token to anyone.
            ("Authorization", "Digest username=\"bearer\", realm=\"x\""),
            // Tokens of Portcullis' own, read whole: with a space, with a comma.
            ("Authorization", "Bearer  mno pqr "),
            ("Authorization", "x, Bearer stu,vw"),
            ("Authorization", "Bearer mno"),
        ]);
        let no_break_space = HeaderValue::from_bytes(b"Bearer\xA0jkl").unwrap();
        req.append(header::AUTHORIZATION, no_break_space);
        let left = |req: &http::HeaderMap| -> Vec<String> {
            let values = req.get_all(header::AUTHORIZATION).iter();
            values
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        let mut own = req.clone();
        remove_bearer_tokens(&mut req, |_| true);
        assert_eq!(
            left(&req),
            [
                "Basic dXNlcjpwYXNz",
                "Digest username=\"bearer\", realm=\"x\""
            ]
        );
        // Only the tokens picked, wherever they are in a value (one not ASCII, whatever it is).
        let picked = ["ghi", "mno pqr", "stu,vw"];
        remove_bearer_tokens(&mut own, |token| picked.contains(&token));
        // What is asked about grows as the value does, not as its square: a value of 64 KiB of
        // `bearer` words would have had every one's rest hashed, seconds of work.
        let many = "bearer ".repeat(9_000);
        let asked: usize = after_bearer(many.as_bytes()).map(<[u8]>::len).sum();
        assert!(asked <= 2 * many.len(), "{asked}");
        // A value of more words than a credential has is removed without a question for each
        // (every one a hash): a 60 KB value of one-letter words would be 30,000.
        let mut words = String::from("Bearer");
        while words.len() < 60_000 {
            words.push_str(",a");
        }
        let asked = std::cell::Cell::new(0);
        let mut crafted = header_map(&[("Authorization", &words)]);
        remove_bearer_tokens(&mut crafted, |_| {
            asked.set(asked.get() + 1);
            false
        });
        assert!(asked.get() <= 2 * MAX_BEARER_WORDS, "{}", asked.get());
        assert!(crafted.get(header::AUTHORIZATION).is_none());
        // Nor 256 values of a few words each: the questions are bounded for the request.
        asked.set(0);
        let mut values = header_map(&[]);
        for _ in 0..256 {
            values.append(
                header::AUTHORIZATION,
                HeaderValue::from_static("Bearer x y,Bearer x y,Bearer x y"),
            );
        }
        values.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer own"),
        );
        remove_bearer_tokens(&mut values, |token| {
            asked.set(asked.get() + 1);
            token == "own"
        });
        assert!(asked.get() <= MAX_BEARER_QUESTIONS, "{}", asked.get());
        // Those judged before the questions ran out kept (the first), the rest removed
        // unasked: never passed on unasked, the token of Portcullis' own at the end neither.
        let kept = values.get_all(header::AUTHORIZATION).iter().count();
        assert_eq!(kept, 1, "{kept} values kept");
        // A token of one word, the upstream's own on a session route, is asked about once.
        let asked = std::cell::Cell::new(0);
        let mut one = header_map(&[("Authorization", "Bearer eyJ.eyJ.c2ln")]);
        remove_bearer_tokens(&mut one, |_| {
            asked.set(asked.get() + 1);
            false
        });
        assert_eq!(asked.get(), 1);
        assert_eq!(
            left(&own),
            [
                "Bearer abc",
                "Basic dXNlcjpwYXNz",
                "bEaReR\tdef",
                "Bearer",
                "Digest username=\"bearer\", realm=\"x\"",
                "Bearer mno"
            ]
        );
    }

    #[test]
    fn portcullis_cookies_are_removed_and_the_others_kept_in_order() {
        let mut req = header_map(&[
            ("Cookie", "theme=dark; portcullis_session=SECRET; lang=en"),
            ("Cookie", "__Host-portcullis_session=SECRET"),
            (
                "Cookie",
                "portcullis_signin=BINDING; portcullis_session_other=kept",
            ),
            ("Cookie", "__Host-portcullis_signin_0123=BINDING; z=1"),
        ]);
        strip_own_cookies(&mut req, OwnCookies::new("portcullis_session", &[]));
        let cookies: Vec<&str> = req
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            cookies,
            ["theme=dark; lang=en; portcullis_session_other=kept; z=1"]
        );

        let mut untouched = header_map(&[("Cookie", "a=1;b=2")]);
        strip_own_cookies(&mut untouched, OwnCookies::new("portcullis_session", &[]));
        assert_eq!(untouched[header::COOKIE], "a=1;b=2", "left as sent");

        // HTTP/2's crumbs, one cookie a header, go on as one header.
        let mut crumbs = header_map(&[("Cookie", "a=1"), ("Cookie", "b=2 ")]);
        strip_own_cookies(&mut crumbs, OwnCookies::new("portcullis_session", &[]));
        let joined: Vec<_> = crumbs.get_all(header::COOKIE).iter().collect();
        assert_eq!(joined, ["a=1; b=2"]);

        // Whatever bytes another cookie holds, it stays, and the session beside it goes.
        let mut latin1 = http::HeaderMap::new();
        latin1.insert(
            header::COOKIE,
            HeaderValue::from_bytes(b"lang=fran\xe7ais; portcullis_session=SECRET").unwrap(),
        );
        strip_own_cookies(&mut latin1, OwnCookies::new("portcullis_session", &[]));
        assert_eq!(latin1[header::COOKIE].as_bytes(), b"lang=fran\xe7ais");

        // The session cookie's earlier name, which sessions held were issued in, goes too.
        let earlier: [Box<str>; 2] = ["old_session".into(), "portcullis_session".into()];
        let own = OwnCookies::new("portcullis_session", &earlier);
        let mut renamed = header_map(&[(
            "Cookie",
            "__Host-old_session=OLD; a=1; portcullis_session=NEW; old_session_x=kept",
        )]);
        strip_own_cookies(&mut renamed, own);
        assert_eq!(renamed[header::COOKIE], "a=1; old_session_x=kept");
        let mut planted = header_map(&[("Set-Cookie", "__Secure-old_session=planted")]);
        assert_eq!(strip_own_set_cookies(&mut planted, own), 1);
    }

    #[test]
    fn a_101_switches_only_when_it_accepts_the_websocket_s_key() {
        // RFC 6455 §1.3's example key and its accept value.
        let req = request(&[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]);
        let response = |headers: &[(&str, &str)]| {
            let mut response = ResponseHeader::build(101, None).unwrap();
            for (name, value) in headers {
                response.append_header(name.to_string(), *value).unwrap();
            }
            response
        };
        let accept = ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(accepts_websocket(
            &req,
            &response(&[("Upgrade", "WebSocket"), accept])
        ));
        for headers in [
            &[("Upgrade", "websocket")][..],
            &[accept],
            &[("Upgrade", "h2c"), accept],
            &[("Upgrade", "websocket"), ("Sec-WebSocket-Accept", "AAAA")],
            &[("Upgrade", "websocket"), accept, accept],
        ] {
            assert!(!accepts_websocket(&req, &response(headers)), "{headers:?}");
        }
        let keyless = request(&[]);
        assert!(!accepts_websocket(
            &keyless,
            &response(&[("Upgrade", "websocket"), accept])
        ));
    }

    #[test]
    fn an_upstream_s_set_cookie_for_portcullis_own_cookies_is_removed() {
        let mut headers = http::HeaderMap::new();
        for line in [
            "theme=dark; Path=/",
            "portcullis_session=planted; Path=/",
            "__SECURE-portcullis_session=planted",
            " portcullis_signin_0123 =planted",
            "=portcullis_session=planted; Path=/app",
            "portcullis_session_other=kept",
            "lang=en",
        ] {
            headers.append(header::SET_COOKIE, HeaderValue::from_static(line));
        }
        assert_eq!(
            strip_own_set_cookies(&mut headers, OwnCookies::new("portcullis_session", &[])),
            4
        );
        let kept: Vec<&str> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            kept,
            [
                "theme=dark; Path=/",
                "portcullis_session_other=kept",
                "lang=en"
            ]
        );
        assert_eq!(
            strip_own_set_cookies(&mut headers, OwnCookies::new("portcullis_session", &[])),
            0
        );
    }

    fn answer(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn values<'a>(answer: &'a http::response::Parts, name: &str) -> Vec<&'a str> {
        let all = answer.headers.get_all(name).iter();
        all.map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn an_answer_to_someone_identified_is_private_unless_it_says_otherwise() {
        let cookie = Some(OwnCookies::new("portcullis_session", &[]));
        let mut plain = answer(200, &[("content-type", "text/html")]);
        assert_eq!(
            edit_answer(&mut plain, cookie, true).unwrap(),
            AnswerEdits::default()
        );
        assert_eq!(values(&plain, "cache-control"), ["private"]);
        // Nobody identified, or no answer yet: nothing to mark.
        for (status, identified) in [(200, false), (103, true)] {
            let mut answer = answer(status, &[("content-type", "text/html")]);
            edit_answer(&mut answer, cookie, identified).unwrap();
            assert!(values(&answer, "cache-control").is_empty(), "{status}");
        }
        // What the upstream says of caching stands, unless its `Connection` names it: then it
        // is the hop's, taken out, and the answer is marked as one without.
        let named = "keep-alive, Cache-Control";
        for (connection, kept) in [("keep-alive", "public, max-age=60"), (named, "private")] {
            let sent = [
                ("connection", connection),
                ("cache-control", "public, max-age=60"),
            ];
            let mut answer = answer(200, &sent);
            edit_answer(&mut answer, cookie, true).unwrap();
            assert_eq!(values(&answer, "cache-control"), [kept], "{connection}");
            assert_eq!(values(&answer, "connection"), [connection]);
        }
    }

    #[test]
    fn an_answer_keeps_its_headers_bar_the_hop_s_and_portcullis_cookies() {
        let sent = [
            ("content-type", "text/html"),
            ("connection", "x-internal"),
            ("x-internal", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("set-cookie", "theme=dark"),
            ("set-cookie", "portcullis_session=planted"),
            ("clear-site-data", "\"cache\", \"cookies\""),
            ("alt-svc", "h3=\"elsewhere.corp.test:443\"; ma=2592000"),
            ("x-end-to-end", "kept"),
        ];
        let mut all = answer(200, &sent);
        let edits = edit_answer(
            &mut all,
            Some(OwnCookies::new("portcullis_session", &[])),
            false,
        )
        .unwrap();
        let expected = AnswerEdits {
            own_set_cookies: 1,
            cleared_cookies: true,
            varies: false,
        };
        assert_eq!(edits, expected);
        let mut names: Vec<&str> = all.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        let kept = ["connection", "content-type", "set-cookie", "x-end-to-end"];
        assert_eq!(names, kept);
        assert_eq!(values(&all, "set-cookie"), ["theme=dark"]);
        // A `Connection` that names nothing else leaves a `Keep-Alive` or `Proxy-Connection`
        // beside it no less the hop's; and every `Connection` counts, not the first alone.
        let cases: [&[(&str, &str)]; 3] = [
            &[("connection", "keep-alive"), ("keep-alive", "5")],
            &[
                ("connection", "keep-alive"),
                ("proxy-connection", "keep-alive"),
            ],
            &[
                ("connection", "x-internal"),
                ("connection", "keep-alive"),
                ("x-internal", "s"),
            ],
        ];
        for sent in cases {
            let mut answer = answer(200, sent);
            edit_answer(
                &mut answer,
                Some(OwnCookies::new("portcullis_session", &[])),
                false,
            )
            .unwrap();
            let names: Vec<&str> = answer.headers.keys().map(|n| n.as_str()).collect();
            assert_eq!(names, ["connection"], "{sent:?}");
        }
        // A request's `TE` is no answer's: h2 refuses it in an answer to an HTTP/2 client. A
        // length said more than once is said once.
        let cases: [&[(&str, &str)]; 3] = [
            &[("te", "gzip"), ("content-length", "5")],
            &[("content-length", "5, 5")],
            &[("content-length", "5"), ("content-length", "5")],
        ];
        for sent in cases {
            let mut answer = answer(200, sent);
            edit_answer(&mut answer, None, false).unwrap();
            let names: Vec<&str> = answer.headers.keys().map(|n| n.as_str()).collect();
            assert_eq!(names, ["content-length"], "{sent:?}");
            assert_eq!(values(&answer, "content-length"), ["5"], "{sent:?}");
        }
        // Without a runtime nothing is known of Portcullis' cookies; clearing them is refused
        // all the same.
        let mut all = answer(200, &sent);
        let edits = edit_answer(&mut all, None, false).unwrap();
        let expected = AnswerEdits {
            own_set_cookies: 0,
            cleared_cookies: true,
            varies: false,
        };
        assert_eq!(edits, expected);
        assert_eq!(values(&all, "set-cookie").len(), 2);
        assert!(values(&all, "clear-site-data").is_empty());
        // Nor do those three need a hop-by-hop header beside them to be seen.
        let sent = [
            ("set-cookie", "portcullis_session=planted"),
            ("clear-site-data", "\"*\""),
            ("alt-svc", "h3=\":443\""),
        ];
        let mut answer = answer(200, &sent);
        let edits = edit_answer(
            &mut answer,
            Some(OwnCookies::new("portcullis_session", &[])),
            false,
        )
        .unwrap();
        assert_eq!(edits.own_set_cookies, 1);
        assert!(edits.cleared_cookies);
        assert!(answer.headers.is_empty());
    }

    /// A head is as large over HTTP/2, its cookies a field each, as over HTTP/1 in one.
    #[test]
    fn cookie_crumbs_count_as_the_one_cookie_field_they_are_joined_into() {
        let mut one = RequestHeader::build("GET", b"/", None).unwrap();
        one.insert_header("cookie", "a=1; b=22; c=333").unwrap();
        let mut crumbs = RequestHeader::build("GET", b"/", None).unwrap();
        for crumb in ["a=1", "b=22", "c=333"] {
            crumbs.append_header("cookie", crumb).unwrap();
        }
        assert_eq!(head_size(&crumbs), head_size(&one));
    }

    #[test]
    fn forwarded_names_the_client_host_and_protocol() {
        let host = HeaderValue::from_static("app.test:8080");
        assert_eq!(
            forwarded(Some("10.1.2.3".parse().unwrap()), Some(&host), "https"),
            "for=10.1.2.3;host=\"app.test:8080\";proto=https"
        );
        assert_eq!(
            forwarded(Some("::1".parse().unwrap()), None, "http"),
            "for=\"[::1]\";proto=http"
        );
    }

    #[test]
    fn forwarding_headers_follow_every_change_of_client_host_and_protocol() {
        let a = HeaderValue::from_static("app.test");
        let b = HeaderValue::from_static("other.test:8443");
        let ips: [Option<std::net::IpAddr>; 3] = [
            Some("10.1.2.3".parse().unwrap()),
            Some("2001:db8::7".parse().unwrap()),
            None,
        ];
        // Every sequence of two different requests on one thread: the second never gets the
        // first one's values.
        for first in &ips {
            for second in &ips {
                for (h1, h2) in [(Some(&a), Some(&b)), (Some(&b), None), (None, Some(&a))] {
                    for (t1, t2) in [(false, false), (false, true), (true, false)] {
                        for (ip, host, tls) in
                            [(*first, h1, t1), (*second, h2, t2), (*first, h1, t1)]
                        {
                            let (fwd, xff) = forwarding_headers(ip, host, tls).unwrap();
                            let proto = if tls { "https" } else { "http" };
                            assert_eq!(fwd.to_str().unwrap(), forwarded(ip, host, proto));
                            assert_eq!(
                                xff.map(|v| v.to_str().unwrap().to_owned()),
                                ip.map(|ip| ip.to_string())
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn host_is_lower_cased_without_port() {
        let host = |value: &str| {
            let req = request(&[("Host", value)]);
            request_host(&req).map(Cow::into_owned)
        };
        assert_eq!(
            host("App.Example.com:8443").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(host("app.example.com").as_deref(), Some("app.example.com"));
        assert_eq!(host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(
            host("[::ffff:10.0.0.1]").as_deref(),
            Some("[::ffff:10.0.0.1]")
        );
        // Other spellings of the same addresses: a browser's, a hand-written one.
        assert_eq!(
            host("[::ffff:a00:1]:443").as_deref(),
            Some("[::ffff:10.0.0.1]")
        );
        assert_eq!(host("[0:0::1]").as_deref(), Some("[::1]"));
        assert_eq!(host("[::1:zz]"), None);
        assert_eq!(host("10.0.0.1:").as_deref(), Some("10.0.0.1"));
        assert_eq!(host(":80"), None);
    }

    #[test]
    fn a_host_that_is_not_a_name_or_an_address_is_no_host() {
        for value in [
            "evil.test/x.corp.test",
            "evil.test?.corp.test",
            "evil.test#.corp.test",
            "evil.test\\x.corp.test",
            "user@a.corp.test",
            "a.corp.test:80x",
            "a.corp.test:80:80",
            "[::1]evil",
            "[::1]:8x",
            "[evil.test/]",
            "[]",
            "a\"b.corp.test",
        ] {
            let req = request(&[("Host", value)]);
            assert_eq!(request_host(&req), None, "{value}");
        }
    }
}
