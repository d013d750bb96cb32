//! The data plane: pingora's `ProxyHttp` phases for every request.
//!
//! 1. `request_filter`: snapshot the configuration, bound the request head, answer Portcullis'
//!    own endpoints, normalize the path once, find the route, check the body size.
//! 2. `upstream_peer`: choose an upstream (round-robin over the healthy ones).
//! 3. `upstream_request_filter`: strip client-sent identity headers, set `X-Forwarded-*` and
//!    `Host`, send the normalized path.
//! 4. `connected_to_upstream`: watch websockets and event streams of signed-in callers, so
//!    they can be cut when access is revoked (see [`crate::streams`]).
//! 5. `request_body_filter` / `response_body_filter`: enforce the body limit on streamed
//!    bodies; let no chunk or frame cross for a caller who has lost access since.
//! 6. `fail_to_connect` / `fail_to_proxy`: mark dead upstreams and retry, or answer with a page.
//! 7. `logging`: metrics and one access-log line.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::StatusCode;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use portcullis_config::Credential;

use crate::assertion::{AssertionClaims, ASSERTION_HEADER};
use crate::auth;
use crate::authorize::{self, Verdict};
use crate::pages;
use crate::path;
use crate::routes::{CompiledRoute, Match};
use crate::state::{InFlight, Runtime, Shared};
use crate::streams::{Recheck, Registration};

/// Headers whose names start with this (case-insensitively, `_` read as `-`) are Portcullis'
/// own and are never taken from a client.
const IDENTITY_PREFIX: &[u8] = b"x-portcullis-";

pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<CompiledRoute>>,
    /// The normalized path when it differs from what the client sent.
    normalized_path: Option<String>,
    tls: bool,
    round_robin_start: usize,
    attempt: usize,
    upstream: Option<usize>,
    upstream_started: Option<Instant>,
    body_bytes: u64,
    /// Answered by the SCIM endpoint rather than proxied.
    scim: bool,
    /// Who is calling, once authenticated but refused.
    caller: Option<auth::Caller>,
    /// Who is calling and what they were let in for, once authorized.
    recheck: Option<Arc<Recheck>>,
    /// What the upstream is told about the caller, once authorized.
    forward: Option<authorize::Forward>,
    /// A websocket or event stream: watched while open, see [`crate::streams`].
    long_lived: bool,
    registration: Option<Registration>,
    _in_flight: InFlight,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Instant::now(),
            route: None,
            normalized_path: None,
            tls: false,
            round_robin_start: 0,
            attempt: 0,
            upstream: None,
            upstream_started: None,
            body_bytes: 0,
            scim: false,
            caller: None,
            recheck: None,
            forward: None,
            long_lived: false,
            registration: None,
            _in_flight: InFlight::begin(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let runtime = self.shared.runtime.load_full();
        let server = &runtime.config.server;
        ctx.tls = session
            .digest()
            .is_some_and(|digest| digest.ssl_digest.is_some());

        let req = session.req_header();
        if head_size(req) > server.max_request_header_bytes {
            return pages::respond(session, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await;
        }

        let raw_path = req.uri.path();
        let normalized = match path::normalize(raw_path) {
            Ok(normalized) => normalized,
            Err(_) => return pages::respond(session, StatusCode::BAD_REQUEST).await,
        };
        let Some(host) = request_host(req) else {
            return pages::respond(session, StatusCode::BAD_REQUEST).await;
        };
        // `host` and `normalized` borrow the request on the common path; the branches that
        // answer from here (needing the session mutably) take owned copies first.
        if let Some(own) = normalized.strip_prefix("/.portcullis/") {
            let endpoint = own.to_owned();
            let host = host.into_owned();
            let origin = request_origin(req, ctx.tls);
            if normalized == crate::assertion::JWKS_PATH {
                let jwks = self.shared.signer.jwks_json();
                return auth::endpoints::respond(
                    session,
                    StatusCode::OK,
                    &[(header::CACHE_CONTROL, "public, max-age=60".to_owned())],
                    "application/json",
                    jwks,
                )
                .await;
            }
            let status = match endpoint.as_str() {
                "healthz" => StatusCode::OK,
                "readyz" if self.shared.is_draining() => StatusCode::SERVICE_UNAVAILABLE,
                "readyz" => StatusCode::OK,
                endpoint => {
                    let auth_request = auth::endpoints::Request {
                        origin: &origin,
                        host: &host,
                        tls: ctx.tls,
                    };
                    let served = self
                        .shared
                        .auth
                        .serve(session, &runtime.config, endpoint, &auth_request)
                        .await?;
                    match served {
                        Some(done) => return Ok(done),
                        None => StatusCode::NOT_FOUND,
                    }
                }
            };
            return pages::respond(session, status).await;
        }

        if let Some(scim) = runtime
            .scim
            .as_ref()
            .filter(|s| s.claims(&host, &normalized))
        {
            ctx.scim = true;
            let path = normalized.into_owned();
            return scim.serve(session, &path, ctx.tls).await;
        }
        let route = match runtime
            .routes
            .find(Runtime::scheme_of(ctx.tls), &host, &normalized)
        {
            Match::Found(route) => route.clone(),
            Match::WrongScheme(route)
                if route.config.scheme == portcullis_config::Scheme::Https =>
            {
                let location = https_location(&host, runtime.https_port, req);
                return pages::redirect(session, &location).await;
            }
            Match::WrongScheme(_) | Match::None => {
                return pages::respond(session, StatusCode::NOT_FOUND).await;
            }
        };
        if let Cow::Owned(normalized) = normalized {
            ctx.normalized_path = Some(normalized);
        }

        {
            let policy = &route.policy;
            // Read before deciding, so a later change is always noticed by `Recheck`.
            let decided_at = crate::streams::at(&self.shared);
            let caller = self
                .shared
                .auth
                .authenticate(
                    &runtime.config,
                    &route.config.accept,
                    req,
                    ctx.tls,
                    auth::oidc::now_unix(),
                )
                .await;
            let path = ctx.normalized_path.as_deref().unwrap_or(req.uri.path());
            let method = req.method.as_str();
            let verdict = caller.as_ref().map(|caller| {
                authorize::decide(
                    &self.shared.directory,
                    &runtime.config.identity,
                    policy,
                    route.config.token_groups,
                    caller,
                    method,
                    path,
                )
            });
            // Without a caller, only a public rule can let the request in.
            let anonymous_ok = caller.is_none()
                && policy
                    .evaluate(None, &portcullis_policy::Request { method, path })
                    .allowed;
            match (caller, verdict) {
                (Some(caller), Some(Verdict::Allow(forward))) => {
                    self.shared.audit.allow_sampled(
                        runtime.config.identity.allow_sample_rate,
                        &forward.user,
                        &route.config.name,
                        method,
                        path,
                    );
                    ctx.recheck = Some(Arc::new(Recheck::new(
                        caller,
                        route.clone(),
                        method,
                        path,
                        decided_at,
                    )));
                    ctx.forward = Some(forward);
                    ctx.long_lived = is_long_lived(req);
                }
                (Some(caller), Some(Verdict::Deny { who, rule, reason })) => {
                    self.shared.audit.refusal(
                        &who,
                        &route.config.name,
                        rule.as_deref(),
                        &reason,
                        method,
                        path,
                    );
                    ctx.caller = Some(caller);
                    ctx.route = Some(route.clone());
                    let browser = auth::is_browser_navigation(req)
                        || req
                            .headers
                            .get(header::ACCEPT)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.contains("text/html"));
                    return pages::forbidden(session, &who, &route.config.name, &reason, browser)
                        .await;
                }
                (_, _) if anonymous_ok => {
                    self.shared.audit.allow_sampled(
                        runtime.config.identity.allow_sample_rate,
                        "anonymous",
                        &route.config.name,
                        method,
                        path,
                    );
                }
                (None, _) if route.config.accept.is_empty() => {
                    // A public route whose public rules don't cover this request: there is no
                    // way to sign in here, so it is simply refused.
                    self.shared.audit.refusal(
                        "anonymous",
                        &route.config.name,
                        None,
                        "this address is not public",
                        method,
                        path,
                    );
                    ctx.route = Some(route.clone());
                    return pages::forbidden(
                        session,
                        "anonymous",
                        &route.config.name,
                        "this address is not public",
                        auth::is_browser_navigation(req),
                    )
                    .await;
                }
                (caller, verdict) => {
                    if let (
                        Some(auth::Caller::Person { session: key, .. }),
                        Some(Verdict::SessionRevoked),
                    ) = (&caller, &verdict)
                    {
                        // Deactivated (or re-created) since this person signed in: the
                        // session is over for good.
                        if let Err(e) = self.shared.auth.sessions.end(&[*key]) {
                            tracing::error!("cannot end a revoked session: {e}");
                        }
                    }
                    let host = host.into_owned();
                    let origin = request_origin(req, ctx.tls);
                    let auth_request = auth::endpoints::Request {
                        origin: &origin,
                        host: &host,
                        tls: ctx.tls,
                    };
                    let sessions = route.config.accept.contains(&Credential::Session);
                    return self
                        .shared
                        .auth
                        .challenge(session, &runtime.config, &auth_request, sessions)
                        .await;
                }
            }
        }

        if content_length(req).is_some_and(|len| len > route.config.max_request_body_bytes) {
            return pages::respond(session, StatusCode::PAYLOAD_TOO_LARGE).await;
        }
        ctx.round_robin_start = route.upstreams.start();
        ctx.route = Some(route);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let now = Instant::now();
        let (index, peer) = route
            .upstreams
            .pick(ctx.round_robin_start, ctx.attempt, now);
        ctx.attempt += 1;
        ctx.upstream = Some(index);
        ctx.upstream_started = Some(now);
        Ok(Box::new(peer.clone()))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(route), Some(index)) = (&ctx.route, ctx.upstream) {
            route.upstreams.mark_down(index, Instant::now());
            // Nothing has been sent upstream yet, so any request may go to the next upstream.
            if ctx.attempt < route.upstreams.count() {
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
        strip_identity_headers(upstream_request);
        if let (Some(route), Some(forward)) = (&ctx.route, &ctx.forward) {
            if route.config.identity_headers {
                let headers = &self.shared.runtime.load().headers;
                upstream_request.insert_header(headers.user.clone(), forward.user.as_str())?;
                if let Some(email) = &forward.email {
                    upstream_request.insert_header(headers.email.clone(), email.as_str())?;
                }
                upstream_request.insert_header(headers.groups.clone(), forward.groups.as_str())?;
            }
            if route.config.assertion {
                let runtime = self.shared.runtime.load();
                let issuer = runtime.assertion_issuer.as_str();
                let groups: Vec<&str> = forward.group_names.iter().map(String::as_str).collect();
                let claims = AssertionClaims {
                    issuer,
                    audience: &route.config.name,
                    subject: &forward.user,
                    email: forward.email.as_deref(),
                    groups: &groups,
                    version: forward.version,
                };
                // Fail closed: an upstream that relies on the assertion never gets the request
                // without it.
                let token = self
                    .shared
                    .signer
                    .assertion(&claims, auth::oidc::now_unix())
                    .or_err(
                        ErrorType::InternalError,
                        "cannot sign the identity assertion",
                    )?;
                upstream_request.insert_header(ASSERTION_HEADER, &*token)?;
            }
        }

        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            upstream_request.insert_header("x-forwarded-for", addr.ip().to_string())?;
        }
        let proto = if ctx.tls { "https" } else { "http" };
        upstream_request.insert_header("x-forwarded-proto", proto)?;
        let client_host = session
            .req_header()
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                let authority = session.req_header().uri.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            });
        if let Some(client_host) = client_host {
            upstream_request.insert_header("x-forwarded-host", client_host.clone())?;
            let route = ctx.route.as_ref().filter(|r| r.config.preserve_host);
            if route.is_some() {
                upstream_request.insert_header(header::HOST, client_host)?;
            }
        }
        if let (Some(route), Some(index)) = (&ctx.route, ctx.upstream) {
            if !route.config.preserve_host {
                if let Some(host) = route.upstreams.host_header(index) {
                    upstream_request.insert_header(header::HOST, host.clone())?;
                }
            }
        }

        if let Some(path) = &ctx.normalized_path {
            let target = match upstream_request.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
            let uri = http::Uri::builder().path_and_query(target).build().or_err(
                ErrorType::InvalidHTTPHeader,
                "normalized path is not a valid URI",
            )?;
            upstream_request.set_uri(uri);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let (Some(route), Some(index)) = (&ctx.route, ctx.upstream) {
            route.upstreams.mark_up(index);
            if let Some(started) = ctx.upstream_started {
                route
                    .metrics
                    .observe_upstream(started.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
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
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.still_allowed(&self.shared)?;
        if let (Some(chunk), Some(route)) = (body.as_ref(), &ctx.route) {
            ctx.body_bytes = ctx.body_bytes.saturating_add(chunk.len() as u64);
            if ctx.body_bytes > route.config.max_request_body_bytes {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        ctx.still_allowed(&self.shared)?;
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        // A response already started cannot be replaced; the connection is simply closed.
        if code > 0 && session.response_written().is_none() {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Err(write_error) = pages::send(session, status, None).await {
                tracing::debug!(error = %write_error, "could not send the error page");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
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
            client = %session.client_addr().map(ToString::to_string).unwrap_or_default(),
            method = %req.method,
            host = req.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default(),
            path = %req.uri.path(),
            status,
            route,
            user = ctx.caller().map(auth::Caller::log_name),
            upstream = ctx.upstream,
            duration_us = ctx.started.elapsed().as_micros() as u64,
            error = e.map(|e| e.etype().as_str()),
        );
    }
}

impl RequestCtx {
    fn caller(&self) -> Option<&auth::Caller> {
        match &self.recheck {
            Some(recheck) => Some(&recheck.caller),
            None => self.caller.as_ref(),
        }
    }

    /// Refuses to pass on one more chunk or frame for a caller who has lost access.
    fn still_allowed(&self, shared: &Shared) -> Result<()> {
        match &self.recheck {
            Some(recheck) if !recheck.still_allowed(shared) => {
                Error::e_explain(ErrorType::HTTPStatus(403), "access revoked")
            }
            _ => Ok(()),
        }
    }
}

/// A websocket upgrade or an event stream: a request that may stay open for hours.
fn is_long_lived(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE)
        || req.headers.get_all(header::ACCEPT).iter().any(|v| {
            v.as_bytes()
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
        })
}

/// Removes every header a client might use to pose as Portcullis: `X-Portcullis-*` in any case,
/// with `_` standing for `-`. Header names arrive lower-cased.
fn strip_identity_headers(request: &mut RequestHeader) {
    let is_identity = |name: &[u8]| {
        name.len() >= IDENTITY_PREFIX.len()
            && name
                .iter()
                .zip(IDENTITY_PREFIX)
                .all(|(&b, &want)| b.to_ascii_lowercase() == want || (want == b'-' && b == b'_'))
    };
    if !request
        .headers
        .keys()
        .any(|name| is_identity(name.as_str().as_bytes()))
    {
        return;
    }
    let doomed: Vec<http::HeaderName> = request
        .headers
        .keys()
        .filter(|name| is_identity(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in doomed {
        request.remove_header(&name);
    }
}

/// Size of the request head as it arrived, near enough to bound it: request line and headers.
fn head_size(req: &RequestHeader) -> usize {
    let headers: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    req.raw_path().len() + req.method.as_str().len() + 12 + headers
}

fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The host the client asked for, lower-cased and without port: `Host` for HTTP/1, the
/// `:authority` for HTTP/2.
fn request_host(req: &RequestHeader) -> Option<Cow<'_, str>> {
    let raw = match req.headers.get(header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => req.uri.authority()?.as_str(),
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        let end = rest.find(']')?;
        &raw[..end + 2]
    } else {
        raw.rsplit_once(':').map_or(raw, |(host, _port)| host)
    };
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
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

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    #[test]
    fn identity_headers_are_stripped_in_every_spelling() {
        let mut req = request(&[
            ("X-Portcullis-User", "mallory"),
            ("x-portcullis-groups", "admins"),
            ("X_Portcullis_User", "mallory"),
            ("X-PORTCULLIS-EMAIL", "m@evil"),
            ("x-portcullis_assertion", "forged"),
            ("X-Portcullis-User", "again"),
            ("X-Portcullisx", "kept: not the prefix"),
            ("Accept", "text/html"),
        ]);
        strip_identity_headers(&mut req);
        let mut names: Vec<&str> = req.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-portcullisx"]);
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
        assert_eq!(host(":80"), None);
    }
}
