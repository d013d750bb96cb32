//! Portcullis' own sign-in endpoints, on every host under `/.portcullis/`:
//!
//! - `sign_in?rd=URL` starts a sign-in that returns to `rd` (checked, see [`super::redirect`]);
//! - `callback` completes it (the IdP's redirect URI);
//! - `sign_out`: GET shows a confirmation form, POST (same-origin only) ends the session and
//!   continues to the IdP's `end_session_endpoint` when it has one;
//! - `backchannel_logout`: the IdP's logout token ends the matching sessions at once;
//! - `me`: who you are signed in as (HTML, or JSON for `Accept: application/json`).

use bytes::Bytes;
use http::{header, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use portcullis_config::{Config, OidcConfig, Scheme};

use super::oidc::{now_unix, SignInError};
use super::redirect::{safe_return_url, Hosts};
use super::{cookie, is_browser_navigation, session_cookie_name, Auth, Caller};

/// The cookie binding a sign-in in progress to the browser that started it.
const BROWSER_COOKIE: &str = "portcullis_signin";
/// Largest back-channel logout request body.
const MAX_LOGOUT_BODY: usize = 64 * 1024;

/// The request as the endpoints need it.
pub struct Request<'a> {
    /// `scheme://host[:port]` of this request, as the client sent it.
    pub origin: &'a str,
    /// Lower-case host without port.
    pub host: &'a str,
    pub tls: bool,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1>{body}<p><small>Portcullis</small></p></body></html>\n",
        t = escape(title)
    )
}

pub async fn respond(
    session: &mut Session,
    status: StatusCode,
    headers: &[(header::HeaderName, String)],
    content_type: &str,
    body: String,
) -> Result<bool> {
    let body = Bytes::from(body);
    let mut head = ResponseHeader::build(status, Some(headers.len() + 3))?;
    head.insert_header(header::CONTENT_TYPE, content_type)?;
    head.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    head.insert_header(header::CACHE_CONTROL, "no-store")?;
    for (name, value) in headers {
        head.append_header(name.clone(), value.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(head), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(true)
}

async fn html(session: &mut Session, status: StatusCode, title: &str, body: &str) -> Result<bool> {
    respond(
        session,
        status,
        &[],
        "text/html; charset=utf-8",
        page(title, body),
    )
    .await
}

async fn redirect(session: &mut Session, location: &str, cookies: Vec<String>) -> Result<bool> {
    let mut headers = vec![(header::LOCATION, location.to_owned())];
    headers.extend(cookies.into_iter().map(|c| (header::SET_COOKIE, c)));
    respond(
        session,
        StatusCode::FOUND,
        &headers,
        "text/html; charset=utf-8",
        String::new(),
    )
    .await
}

/// Hosts Portcullis serves: where a return URL may point.
pub fn served_hosts(config: &Config) -> Hosts {
    let auth_host = config
        .oidc
        .as_ref()
        .map(|o| o.auth_host.split(':').next().unwrap_or_default().to_owned());
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
    let mut cookie = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}",
        session_cookie_name(oidc, tls)
    );
    if tls {
        cookie.push_str("; Secure");
    }
    if let Some(domain) = &oidc.cookie_domain {
        cookie.push_str("; Domain=");
        cookie.push_str(domain.trim_start_matches('.'));
    }
    cookie
}

fn browser_cookie(tls: bool, value: &str, max_age: u64) -> String {
    let secure = if tls { "; Secure" } else { "" };
    format!("{BROWSER_COOKIE}={value}; Path=/.portcullis/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}")
}

impl Auth {
    /// Answers a request that needs a caller and has none.
    pub async fn challenge(
        &self,
        session: &mut Session,
        config: &Config,
        req: &Request<'_>,
        sessions_accepted: bool,
    ) -> Result<bool> {
        let navigation = is_browser_navigation(session.req_header());
        if let (true, true, Some(oidc)) = (sessions_accepted, navigation, &config.oidc) {
            let path_and_query = session
                .req_header()
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            let return_to = format!("{}{path_and_query}", req.origin);
            return self
                .start_sign_in(session, config, oidc, req, return_to)
                .await;
        }
        let scheme = if sessions_accepted && !navigation {
            "Bearer realm=\"portcullis\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"portcullis\""
        };
        respond(
            session,
            StatusCode::UNAUTHORIZED,
            &[(header::WWW_AUTHENTICATE, scheme.to_owned())],
            "application/json",
            "{\"error\":\"unauthenticated\",\"detail\":\"sign in or present a valid bearer token\"}"
                .to_owned(),
        )
        .await
    }

    async fn start_sign_in(
        &self,
        session: &mut Session,
        config: &Config,
        oidc: &OidcConfig,
        req: &Request<'_>,
        return_to: String,
    ) -> Result<bool> {
        // With one cookie for every host, sign-in runs on the auth host, where the callback
        // lands and the browser-binding cookie must be set.
        let auth_host = oidc.auth_host.split(':').next().unwrap_or_default();
        if oidc.cookie_domain.is_some() && req.host != auth_host {
            let location = format!(
                "{}/.portcullis/sign_in?rd={}",
                auth_origin(oidc),
                form_urlencoded::byte_serialize(return_to.as_bytes()).collect::<String>()
            );
            return redirect(session, &location, Vec::new()).await;
        }
        let _ = config;
        match self
            .oidc
            .start(oidc, &redirect_uri(oidc, req), return_to, now_unix())
        {
            Ok(started) => {
                let cookie = browser_cookie(req.tls, &started.browser_cookie, 600);
                redirect(session, &started.authorize_url, vec![cookie]).await
            }
            Err(e) => sign_in_failed(session, &e).await,
        }
    }

    /// Serves `/.portcullis/<endpoint>`; returns `Ok(false)` for an endpoint that isn't ours.
    pub async fn serve(
        &self,
        session: &mut Session,
        config: &Config,
        endpoint: &str,
        req: &Request<'_>,
    ) -> Result<Option<bool>> {
        let Some(oidc) = &config.oidc else {
            return Ok(None);
        };
        let method = session.req_header().method.clone();
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
        let answer = match (endpoint, &method) {
            ("sign_in", &http::Method::GET) => {
                let hosts = served_hosts(config);
                let rd = param("rd").unwrap_or_else(|| "/".to_owned());
                match safe_return_url(&rd, req.origin, &hosts) {
                    Some(return_to) => self.start_sign_in(session, config, oidc, req, return_to).await?,
                    None => {
                        html(
                            session,
                            StatusCode::BAD_REQUEST,
                            "Sign-in link refused",
                            "<p>This sign-in link would send you to an address Portcullis does not serve.</p>",
                        )
                        .await?
                    }
                }
            }
            ("callback", &http::Method::GET) => self.callback(session, oidc, req, &param).await?,
            ("sign_out", &http::Method::GET) => {
                html(
                    session,
                    StatusCode::OK,
                    "Sign out",
                    "<form method=\"post\" action=\"/.portcullis/sign_out\"><button type=\"submit\">Sign out</button></form>",
                )
                .await?
            }
            ("sign_out", &http::Method::POST) => self.sign_out(session, oidc, req).await?,
            ("backchannel_logout", &http::Method::POST) => {
                self.backchannel_logout(session, oidc).await?
            }
            ("me", &http::Method::GET) => self.me(session, config, req).await?,
            _ => return Ok(None),
        };
        Ok(Some(answer))
    }

    async fn callback(
        &self,
        session: &mut Session,
        oidc: &OidcConfig,
        req: &Request<'_>,
        param: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<bool> {
        if let Some(error) = param("error") {
            let detail = param("error_description").unwrap_or_default();
            return sign_in_failed(session, &SignInError::Refused(format!("{error} {detail}")))
                .await;
        }
        let (Some(state), Some(code)) = (param("state"), param("code")) else {
            return sign_in_failed(session, &SignInError::UnknownState).await;
        };
        let browser = cookie(session.req_header(), BROWSER_COOKIE).map(str::to_owned);
        let now = now_unix();
        let finished = self
            .oidc
            .finish(oidc, &state, &code, browser.as_deref(), now)
            .await;
        let (mut identity, refresh, return_to) = match finished {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, "sign-in refused");
                return sign_in_failed(session, &e).await;
            }
        };
        // Sessions count from the directory as it is now: a deactivation answered before this
        // point does not end this new session.
        identity.directory_seq = self.directory.seq();
        let who = identity
            .email
            .clone()
            .unwrap_or_else(|| identity.subject.clone());
        let lifetime = oidc.session_lifetime.as_secs();
        let id = match self.sessions.create(identity, refresh, now) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!("cannot store the session: {e}");
                return html(
                    session,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in unavailable",
                    "<p>Your sign-in could not be saved. Try again shortly.</p>",
                )
                .await;
            }
        };
        tracing::info!(user = %who, "signed in");
        let cookies = vec![
            session_cookie(oidc, req.tls, &id, lifetime),
            browser_cookie(req.tls, "", 0),
        ];
        redirect(session, &return_to, cookies).await
    }

    async fn sign_out(
        &self,
        session: &mut Session,
        oidc: &OidcConfig,
        req: &Request<'_>,
    ) -> Result<bool> {
        // CSRF: a cross-site form post must not sign anyone out. Browsers send Origin on POST;
        // without it, fall back to Referer.
        let headers = &session.req_header().headers;
        let origin = headers
            .get(header::ORIGIN)
            .or_else(|| headers.get(header::REFERER))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.to_owned());
        let same_origin = origin.as_deref().is_some_and(|o| {
            o == req.origin
                || o.strip_prefix(req.origin)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if !same_origin {
            return html(
                session,
                StatusCode::FORBIDDEN,
                "Sign-out refused",
                "<p>Sign out from the page Portcullis shows at /.portcullis/sign_out.</p>",
            )
            .await;
        }
        let name = session_cookie_name(oidc, req.tls);
        let current = cookie(session.req_header(), &name)
            .and_then(|id| self.sessions.get(id))
            .map(|(key, s)| (key, s.identity.id_token.clone()));
        let mut id_token_hint = None;
        if let Some((key, id_token)) = current {
            if let Err(e) = self.sessions.end(&[key]) {
                tracing::error!("cannot end the session: {e}");
            }
            id_token_hint = id_token;
        }
        let clear = session_cookie(oidc, req.tls, "", 0);
        let end_session = self.oidc.provider().and_then(|p| {
            p.metadata
                .additional_metadata()
                .end_session_endpoint
                .clone()
        });
        match end_session.and_then(|e| url::Url::parse(&e).ok()) {
            Some(mut url) => {
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("client_id", &oidc.client_id);
                    if let Some(hint) = &id_token_hint {
                        q.append_pair("id_token_hint", hint);
                    }
                    if let Some(after) = &oidc.post_logout_redirect {
                        q.append_pair("post_logout_redirect_uri", after);
                    }
                }
                redirect(session, url.as_str(), vec![clear]).await
            }
            None => {
                respond(
                    session,
                    StatusCode::OK,
                    &[(header::SET_COOKIE, clear)],
                    "text/html; charset=utf-8",
                    page("Signed out", "<p>You are signed out.</p>"),
                )
                .await
            }
        }
    }

    async fn backchannel_logout(&self, session: &mut Session, oidc: &OidcConfig) -> Result<bool> {
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            if body.len() + chunk.len() > MAX_LOGOUT_BODY {
                return json_error(session, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request").await;
            }
            body.extend_from_slice(&chunk);
        }
        let token = form_urlencoded::parse(&body)
            .find(|(k, _)| k == "logout_token")
            .map(|(_, v)| v.into_owned());
        let Some(token) = token else {
            return json_error(session, StatusCode::BAD_REQUEST, "invalid_request").await;
        };
        let now = now_unix();
        match self.oidc.verify_logout_token(oidc, &token, now).await {
            Ok((sub, sid)) => {
                let issuer = &oidc.issuer;
                let ended = self.sessions.end_where(|identity| {
                    identity.issuer == *issuer
                        && match (&sid, &sub) {
                            (Some(sid), _) => identity.idp_session.as_deref() == Some(sid.as_str()),
                            (None, Some(sub)) => identity.subject == *sub,
                            (None, None) => false,
                        }
                });
                match ended {
                    Ok(n) => {
                        tracing::info!(sessions = n, "back-channel logout");
                        respond(
                            session,
                            StatusCode::OK,
                            &[],
                            "application/json",
                            String::new(),
                        )
                        .await
                    }
                    Err(e) => {
                        tracing::error!("back-channel logout could not end sessions: {e}");
                        json_error(
                            session,
                            StatusCode::SERVICE_UNAVAILABLE,
                            "temporarily_unavailable",
                        )
                        .await
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "back-channel logout token refused");
                json_error(session, StatusCode::BAD_REQUEST, "invalid_request").await
            }
        }
    }

    async fn me(&self, session: &mut Session, config: &Config, req: &Request<'_>) -> Result<bool> {
        let caller = self
            .authenticate(
                config,
                &[
                    portcullis_config::Credential::Session,
                    portcullis_config::Credential::Bearer,
                ],
                session.req_header(),
                req.tls,
                now_unix(),
            )
            .await;
        let wants_json = session
            .req_header()
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        let Some(caller) = caller else {
            return self.challenge(session, config, req, true).await;
        };
        let (kind, subject, email, name, expires) = match &caller {
            Caller::Person { identity, .. } => (
                "person",
                identity.subject.clone(),
                identity.email.clone(),
                identity.name.clone(),
                Some(identity.expires),
            ),
            Caller::Machine { subject, .. } => ("machine", subject.clone(), None, None, None),
        };
        // The directory's view of this caller: their SCIM user and every group they are in.
        let directory =
            crate::authorize::directory_view(&self.directory, &config.identity, &caller);
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
            return respond(
                session,
                StatusCode::OK,
                &[],
                "application/json",
                body.to_string(),
            )
            .await;
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
            rows.push_str(&format!(
                "<p>Your session ends at the latest {} seconds from now.</p>",
                expires.saturating_sub(now_unix())
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
        rows.push_str("<form method=\"post\" action=\"/.portcullis/sign_out\"><button type=\"submit\">Sign out</button></form>");
        html(session, StatusCode::OK, "Who am I", &rows).await
    }
}

async fn json_error(session: &mut Session, status: StatusCode, error: &str) -> Result<bool> {
    respond(
        session,
        status,
        &[],
        "application/json",
        serde_json::json!({ "error": error }).to_string(),
    )
    .await
}

async fn sign_in_failed(session: &mut Session, e: &SignInError) -> Result<bool> {
    let status = match e {
        SignInError::ProviderUnavailable | SignInError::Busy | SignInError::Unreachable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        SignInError::UnknownState | SignInError::WrongBrowser | SignInError::Refused(_) => {
            StatusCode::BAD_REQUEST
        }
        SignInError::Invalid(_) => StatusCode::BAD_GATEWAY,
    };
    html(
        session,
        status,
        "Sign-in did not complete",
        &format!("<p>{}</p>", escape(&e.to_string())),
    )
    .await
}
