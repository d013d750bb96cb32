//! `/scim/v2` on the SCIM host: bearer-token authentication, the bounded request body, and
//! the SCIM service's answer written back. The protocol itself lives in `portcullis-scim`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{header, StatusCode};
use pingora::proxy::Session;
use pingora::Result;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use portcullis_config::{ScimConfig, ScimToken};
use portcullis_scim::service::{Limits, ScimRequest, ScimResponse, ScimService};
use portcullis_scim::store::Directory;
use portcullis_scim::ScimError;

use crate::audit::Audit;
use crate::reply::{self, Reply};

/// Where SCIM lives on its host.
pub const BASE_PATH: &str = portcullis_config::SCIM_BASE_PATH;

/// The route a refused SCIM request is audited under.
pub const AUDIT_ROUTE: &str = "scim";

/// SCIM as configured: the host it answers on, its tokens, and the service.
pub struct Scim {
    pub host: String,
    tokens: Vec<ScimToken>,
    service: ScimService,
}

impl Scim {
    pub fn new(config: &ScimConfig, directory: Arc<Directory>) -> Self {
        let limits = Limits {
            max_body_bytes: config.max_request_body_bytes,
            max_bulk_operations: config.max_bulk_operations,
            max_results: config.max_results,
        };
        Self {
            host: config.host.clone(),
            tokens: config.tokens.clone(),
            service: ScimService::new(directory, limits),
        }
    }

    /// Whether a request for `host` and the normalized `path` is SCIM's.
    pub fn claims(&self, host: &str, path: &str) -> bool {
        host == self.host && portcullis_config::under_scim_base(path)
    }

    /// The SCIM token `token` is. Every configured token is compared, in constant time,
    /// whatever matches.
    fn find(&self, token: &[u8]) -> Option<&ScimToken> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for candidate in &self.tokens {
            if bool::from(candidate.sha256.ct_eq(&digest)) && found.is_none() {
                found = Some(candidate);
            }
        }
        found
    }

    /// The name of the token presented in `Authorization`, if it is one of ours and not
    /// expired; otherwise what was wrong with it (never the token itself). Every configured
    /// token is compared, in constant time, whatever matches.
    fn authenticate(&self, authorization: Option<&[u8]>, now_unix: i64) -> Result<&str, String> {
        let not_bearer = || "the Authorization header holds no bearer token".to_owned();
        let value = authorization.ok_or_else(|| "no SCIM bearer token was presented".to_owned())?;
        let token = crate::auth::own_bearer(value).ok_or_else(not_bearer)?;
        let token = self
            .find(token)
            .ok_or_else(|| "the bearer token is not one of the SCIM tokens".to_owned())?;
        if token.expires_at.is_some_and(|at| now_unix >= at) {
            return Err(format!("the SCIM token \"{}\" has expired", token.name));
        }
        Ok(&token.name)
    }

    /// Serves one SCIM request (the caller has checked [`Self::claims`]).
    /// A refused token is audited (see [`Audit::unverified_refusal`]) with the address it
    /// came from, `client`. A body that does not come for `idle` fails the request, as does
    /// an answer the client takes nothing of for as long. The token is judged again once the
    /// body is in, under `runtimes`' configuration then (refused, it is recorded as the
    /// token's, by its name). A replica whose directory is not `current` (it lost touch with
    /// the shared one, or a process whose file only a `restart` reads) answers 503, recorded
    /// as the token's.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve(
        &self,
        session: &mut Session,
        path: &str,
        tls: bool,
        client: Option<std::net::IpAddr>,
        audit: &Audit,
        idle: std::time::Duration,
        runtimes: &arc_swap::ArcSwap<crate::state::Runtime>,
        current: bool,
        restart: bool,
    ) -> Result<bool> {
        // An answer (a group of every member, a page of a large directory) a client takes
        // nothing of is not waited on for ever, over HTTP/1 as over HTTP/2.
        session.set_write_timeout(Some(idle));
        let now_unix = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        let refusal = || {
            ScimResponse::error(&ScimError::new(
                401,
                None,
                "a valid SCIM bearer token is required",
            ))
        };
        let actor = match self.authenticate(authorization(session), now_unix()) {
            Ok(actor) => actor.to_owned(),
            Err(why) => {
                let request = crate::audit::Request {
                    method: session.req_header().method.as_str(),
                    path,
                    client,
                };
                audit.unverified_refusal(AUDIT_ROUTE, &why, &request);
                return write(session, &refusal()).await;
            }
        };
        if !current {
            let request = crate::audit::Request {
                method: session.req_header().method.as_str(),
                path,
                client,
            };
            let lost = match restart {
                true => crate::proxy::NEEDS_RESTART,
                false => crate::proxy::LOST_TOUCH,
            };
            audit.refusal(&actor, AUDIT_ROUTE, None, lost, &request, None);
            return unavailable(session, restart).await;
        }
        let req = session.req_header();

        let limit = self.service.limits().max_body_bytes;
        let header_value = |name: header::HeaderName| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let if_match = tag_list(&req.headers, header::IF_MATCH);
        let if_none_match = tag_list(&req.headers, header::IF_NONE_MATCH);
        let host = header_value(header::HOST)
            .or_else(|| req.uri.authority().map(|a| a.as_str().to_owned()))
            .unwrap_or_else(|| self.host.clone());
        let base_url = format!("{}://{host}{BASE_PATH}", if tls { "https" } else { "http" });
        let method = req.method.clone();
        let query = req.uri.query().map(str::to_owned);

        // Refusals once the token was taken: recorded as the token's, as a proxied request's
        // are as its caller's.
        let refused_as_token = |reason: &str| {
            let request = crate::audit::Request {
                method: method.as_str(),
                path,
                client,
            };
            audit.refusal(&actor, AUDIT_ROUTE, None, reason, &request, None);
        };
        let audit_too_large = || {
            refused_as_token(&format!(
                "the request body is larger than SCIM takes ({limit} bytes)"
            ));
        };
        if !crate::reply::ready_for_body(session, limit as u64).await? {
            audit_too_large();
            return too_large(session, limit).await;
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = crate::reply::read_body(session, idle).await? {
            if body.len() + chunk.len() > limit {
                audit_too_large();
                return too_large(session, limit).await;
            }
            body.extend_from_slice(&chunk);
        }
        // The body took its time (a chunk may idle `idle` each): a token a reload removed,
        // or that expired, meanwhile has what it sends undone, as its next request is; and
        // so is what it would write later (see `ScimRequest::stands`). (The configuration
        // read is let go at once, not held across a write.)
        let token = authorization(session).map(<[u8]>::to_vec);
        let standing = || match &runtimes.load().scim {
            Some(scim) => scim.authenticate(token.as_deref(), now_unix()).map(drop),
            None => Err("SCIM is no longer configured".to_owned()),
        };
        // Recorded as the token's, good when the request began (a leaked one, rotated out).
        if let Err(why) = standing() {
            refused_as_token(&format!(
                "a SCIM request was refused once its body was in: {why}"
            ));
            return write(session, &refusal()).await;
        }
        // Recorded once when it no longer stands.
        let told = std::sync::atomic::AtomicBool::new(false);
        let stands = || {
            let Err(why) = standing() else { return true };
            if !told.swap(true, std::sync::atomic::Ordering::Relaxed) {
                refused_as_token(&format!("a SCIM write was refused mid-request: {why}"));
            }
            false
        };
        let client = client.map(|address| address.to_string());
        let endpoint = path.strip_prefix(BASE_PATH).unwrap_or_default();
        let response = self
            .service
            .handle(ScimRequest {
                method: &method,
                path: endpoint,
                query: query.as_deref(),
                if_match: if_match.as_deref(),
                if_none_match: if_none_match.as_deref(),
                body: &body,
                base_url: &base_url,
                actor: &actor,
                client: client.as_deref(),
                stands: &stands,
            })
            .await;
        let mut response = response;
        let body = match rendered(response.body.take()).await {
            Ok(body) => body,
            // (A blocking task that never ran, the runtime going down: no answer is one.)
            Err(()) => {
                let failed = ScimError::new(500, None, "the answer could not be written out");
                response = ScimResponse::error(&failed);
                response.body.as_ref().map(render)
            }
        };
        let mut reply = scim_reply(&response, body);
        if response.status == 405 {
            if let Some(methods) = portcullis_scim::service::allowed(endpoint) {
                reply = reply.header(header::ALLOW, methods);
            }
        }
        reply::send(session, reply).await
    }
}

/// The request's `Authorization` value.
fn authorization(session: &Session) -> Option<&[u8]> {
    let headers = &session.req_header().headers;
    headers.get(header::AUTHORIZATION).map(|v| v.as_bytes())
}

/// Answers a SCIM request with a 403 SCIM error saying `why`, without looking at it.
pub async fn refuse(session: &mut Session, why: &str) -> Result<bool> {
    let error = ScimError::new(403, None, why);
    write(session, &ScimResponse::error(&error)).await
}

/// 503: this replica is not known to hold the current directory (a shared store's feed), or
/// this process cannot read its directory file until it is restarted.
async fn unavailable(session: &mut Session, restart: bool) -> Result<bool> {
    let detail = match restart {
        true => {
            "the directory file holds changes a failed write left unread: no SCIM request is \
             answered until Portcullis is restarted"
        }
        false => {
            "this replica is not in step with the shared directory just now (out of touch \
             with it, or catching up); retry"
        }
    };
    let error = ScimError::new(503, None, detail);
    write(session, &ScimResponse::error(&error)).await
}

async fn too_large(session: &mut Session, limit: usize) -> Result<bool> {
    // The unread body may still be on the wire: `reply::send` closes the connection after it.
    let error = ScimError::new(413, None, format!("the body is larger than {limit} bytes"));
    write(session, &ScimResponse::error(&error)).await
}

/// The entity tags of every `name` field (`If-Match`, `If-None-Match`), as one list (RFC 9110
/// §5.3). A tag that is not ASCII (RFC 9110 lets one be) is read as what it can be decoded to,
/// which matches no version of ours: `If-Match` with only such a tag is answered 412, never
/// read as absent.
fn tag_list(headers: &http::HeaderMap, name: header::HeaderName) -> Option<String> {
    let mut fields = headers.get_all(name).into_iter();
    let first = String::from_utf8_lossy(fields.next()?.as_bytes()).into_owned();
    Some(fields.fold(first, |mut tags, field| {
        tags.push_str(", ");
        tags.push_str(&String::from_utf8_lossy(field.as_bytes()));
        tags
    }))
}

async fn write(session: &mut Session, response: &ScimResponse) -> Result<bool> {
    let body = response.body.as_ref().map(render);
    reply::send(session, scim_reply(response, body)).await
}

/// How many values (members, groups, resources) an answer holds at most to be written out on
/// the worker thread that serves it: a group of 100,000 members is some 15 MB of JSON, which
/// that thread's other connections would wait on, written and freed.
const RENDERED_HERE: usize = 1_000;

/// An answer's body, written out: a large one (see [`RENDERED_HERE`]) on a blocking thread,
/// where it is freed too.
async fn rendered(body: Option<serde_json::Value>) -> Result<Option<Bytes>, ()> {
    let Some(body) = body else {
        return Ok(None);
    };
    if values_in(&body) <= RENDERED_HERE {
        return Ok(Some(render(&body)));
    }
    let written = tokio::task::spawn_blocking(move || render(&body)).await;
    written.map(Some).map_err(drop)
}

/// About how many values rendering `body` writes: its members and groups, and those of each
/// resource of a list.
fn values_in(body: &serde_json::Value) -> usize {
    fn listed(v: &serde_json::Value, name: &str) -> usize {
        v.get(name).and_then(|l| l.as_array()).map_or(0, Vec::len)
    }
    let held = |v: &serde_json::Value| listed(v, "members") + listed(v, "groups");
    let resources = (body.get("Resources").and_then(|l| l.as_array())).map_or(0, |resources| {
        resources.iter().map(|r| 1 + held(r)).sum::<usize>()
    });
    held(body) + resources
}

fn render(body: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(body).unwrap_or_default())
}

/// The SCIM service's answer as a reply: `application/scim+json`, with its `ETag` and
/// `Location`, and the bearer challenge on every 401 (RFC 6750 §3), the service's own (a
/// token that fell while its request waited to write) as well as the token's check's; `body`
/// its body, written out.
fn scim_reply(response: &ScimResponse, body: Option<Bytes>) -> Reply {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = match body {
        Some(body) => Reply::with_body(status, "application/scim+json", body),
        None => Reply::empty(status),
    };
    if let Some(etag) = &response.etag {
        reply = reply.header(header::ETAG, etag.as_str());
    }
    if let Some(location) = &response.location {
        reply = reply.header(header::LOCATION, location.as_str());
    }
    if status == StatusCode::UNAUTHORIZED {
        reply = reply.header(header::WWW_AUTHENTICATE, "Bearer realm=\"portcullis-scim\"");
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group's members, a user's groups and a page's resources and theirs count toward what
    /// is written out off the worker thread; a record of attributes alone does not.
    #[test]
    fn an_answer_of_many_values_is_written_out_elsewhere() {
        let members: Vec<_> = (0..RENDERED_HERE)
            .map(|i| serde_json::json!({"value": i}))
            .collect();
        let group = serde_json::json!({"id": "g", "members": members});
        assert_eq!(values_in(&group), RENDERED_HERE);
        assert_eq!(
            values_in(&serde_json::json!({"id": "u", "userName": "x".repeat(10_000)})),
            0
        );
        let page = serde_json::json!({"Resources": [group.clone(), {"groups": [{"value": "g"}]}]});
        assert_eq!(values_in(&page), RENDERED_HERE + 3);
    }

    fn scim(tokens: Vec<ScimToken>) -> Scim {
        let dir = tempfile::tempdir().unwrap();
        let storage =
            Arc::new(portcullis_scim::store::redb::RedbStorage::open(dir.path()).unwrap());
        let directory =
            Arc::new(Directory::open(storage, Box::new(time::OffsetDateTime::now_utc)).unwrap());
        Scim::new(
            &ScimConfig {
                host: "auth.test".into(),
                max_request_body_bytes: 1024,
                max_bulk_operations: 10,
                max_results: 10,
                tokens,
            },
            directory,
        )
    }

    fn token(name: &str, secret: &str, expires_at: Option<i64>) -> ScimToken {
        ScimToken {
            name: name.into(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            expires_at,
        }
    }

    #[test]
    fn tokens_are_checked_by_hash_scheme_and_expiry() {
        let scim = scim(vec![
            token("okta", "okta-secret-0123456789abcdef", None),
            token("old", "old-secret-0123456789abcdef", Some(100)),
        ]);
        let auth = |v: &str, now| {
            scim.authenticate(Some(v.as_bytes()), now)
                .map(str::to_owned)
                .ok()
        };
        assert_eq!(
            auth("Bearer okta-secret-0123456789abcdef", 0).as_deref(),
            Some("okta")
        );
        assert_eq!(
            auth("bearer okta-secret-0123456789abcdef", 0).as_deref(),
            Some("okta")
        );
        assert_eq!(
            auth("Bearer old-secret-0123456789abcdef", 99).as_deref(),
            Some("old")
        );
        assert_eq!(auth("Bearer old-secret-0123456789abcdef", 100), None);
        assert_eq!(auth("Bearer okta-secret-0123456789abcdeX", 0), None);
        assert_eq!(auth("Basic okta-secret-0123456789abcdef", 0), None);
        assert_eq!(auth("Bearer ", 0), None);
        assert_eq!(auth("Bearer", 0), None);
        assert_eq!(scim.authenticate(None, 0).ok(), None);
    }

    #[test]
    fn a_refused_token_is_told_apart_without_being_repeated() {
        let scim = scim(vec![token("old", "old-secret-0123456789abcdef", Some(100))]);
        let why = |v: Option<&str>| scim.authenticate(v.map(str::as_bytes), 100).unwrap_err();
        assert_eq!(why(None), "no SCIM bearer token was presented");
        assert_eq!(
            why(Some("Basic b2xkLXNlY3JldA==")),
            "the Authorization header holds no bearer token"
        );
        assert_eq!(
            why(Some("Bearer ")),
            "the Authorization header holds no bearer token"
        );
        assert_eq!(
            why(Some("Bearer wrong-secret-0123456789abcdef")),
            "the bearer token is not one of the SCIM tokens"
        );
        assert_eq!(
            why(Some("Bearer old-secret-0123456789abcdef")),
            "the SCIM token \"old\" has expired"
        );
    }

    #[test]
    fn claims_only_the_scim_base_on_the_scim_host() {
        let scim = scim(vec![]);
        assert!(scim.claims("auth.test", "/scim/v2"));
        assert!(scim.claims("auth.test", "/scim/v2/Users"));
        assert!(!scim.claims("auth.test", "/scim/v20"));
        assert!(!scim.claims("app.test", "/scim/v2/Users"));
    }

    /// Every 401 carries the bearer challenge, the service's own too (a token that fell while
    /// a write waited for its turn), as RFC 6750 asks; no other answer does.
    #[test]
    fn every_401_carries_the_bearer_challenge() {
        let challenge = |status: u16| {
            let response = ScimResponse::error(&ScimError::new(status, None, "x"));
            let reply = scim_reply(&response, response.body.as_ref().map(render));
            let found = reply
                .headers
                .iter()
                .find(|(name, _)| name == header::WWW_AUTHENTICATE);
            found.map(|(_, value)| value.clone())
        };
        assert!(challenge(401).is_some_and(|v| v.starts_with("Bearer ")));
        assert_eq!(challenge(403), None);
        assert_eq!(challenge(503), None);
    }

    /// A token removed or expired while its request runs writes nothing more: of a Bulk's
    /// operations, those after it fell are refused, each as it comes.
    #[tokio::test]
    async fn a_token_that_falls_mid_request_writes_nothing_more() {
        let world = crate::testing::World::new();
        let user = |name: &str| {
            serde_json::json!({
                "method": "POST",
                "path": "/Users",
                "bulkId": name,
                "data": {
                    "schemas": [portcullis_scim::schema::USER_SCHEMA],
                    "userName": name,
                },
            })
        };
        let bulk = serde_json::json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
            "Operations": [user("ann"), user("ben"), user("cy")],
        });
        // Stands for the first operation (asked before its work and at its write), and no
        // longer.
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let stands = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2;
        let answer = world
            .scim_answer(&http::Method::POST, "/Bulk", &bulk, &stands)
            .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let body = answer.body.unwrap_or_default();
        let statuses: Vec<&str> = body["Operations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|op| op["status"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(statuses, ["201", "401", "401"], "{body}");
        let listed = world
            .scim(http::Method::GET, "/Users", serde_json::Value::Null)
            .await;
        assert_eq!(listed["totalResults"], 1, "{listed}");
    }
}
