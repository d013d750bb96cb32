//! The admin listener: `/healthz`, `/readyz`, `/metrics` and `/explain` (for
//! `portcullis explain`), apart from proxied traffic. It answers anyone who can reach it, so
//! keep it on loopback or a private network.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::state::Shared;

pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// `?user=…&url=…[&method=…]`: the [`Explanation`](crate::explain::Explanation) as JSON.
    fn explain(&self, query: &str) -> (StatusCode, &'static str, Vec<u8>) {
        let (mut user, mut url, mut method) = (None, None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "user" => user = Some(value),
                "url" => url = Some(value),
                "method" => method = Some(value),
                _ => {}
            }
        }
        let (Some(user), Some(url)) = (user, url) else {
            return (
                StatusCode::BAD_REQUEST,
                "text/plain",
                b"user and url are required\n".to_vec(),
            );
        };
        let runtime = self.shared.runtime.load();
        let explained = crate::explain::explain(
            &runtime,
            &self.shared.directory,
            &user,
            &url,
            method.as_deref().unwrap_or("GET"),
        );
        match explained.and_then(|e| serde_json::to_vec(&e).map_err(|e| e.to_string())) {
            Ok(json) => (StatusCode::OK, "application/json", json),
            Err(problem) => (
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{problem}\n").into_bytes(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.shared.is_draining() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"draining\n".to_vec(),
            ),
            "/readyz" => (StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::metrics::render(),
            ),
            "/explain" => self.explain(session.req_header().uri.query().unwrap_or_default()),
            _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        let len = response.body().len();
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
        response
    }
}
