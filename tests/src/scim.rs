//! A small SCIM 2.0 client for the tests: a base URL (`http://auth.test:<port>/scim/v2`), a
//! bearer token, and requests that come back as status, headers and parsed JSON. It checks
//! nothing about the answers; the tests do.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use serde_json::{json, Value};

use crate::client::plain_client;

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_USER_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub const AGENT_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Agent";
pub const AGENTIC_APPLICATION_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:core:2.0:AgenticApplication";
pub const PORTCULLIS_AGENT_SCHEMA: &str = "urn:portcullis:params:scim:schemas:extension:2.0:Agent";
pub const LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
pub const BULK_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
pub const BULK_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";

/// A SCIM answer. `body` is `Value::Null` when the body is empty or not JSON (`text` has it).
#[derive(Debug, Clone)]
pub struct ScimResponse {
    pub method: Method,
    pub url: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub body: Value,
}

impl ScimResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn etag(&self) -> Option<&str> {
        self.header("etag")
    }

    /// Panics, showing the request and the whole answer, unless the status is `status`.
    #[track_caller]
    pub fn expect(self, status: u16) -> ScimResponse {
        assert_eq!(
            self.status, status,
            "{} {}: expected {status}, got {}: {}",
            self.method, self.url, self.status, self.text
        );
        self
    }

    /// Panics, showing the request and the answer, unless the status is 2xx (a PATCH may be
    /// answered 200 with the resource or 204 without).
    #[track_caller]
    pub fn expect_success(self) -> ScimResponse {
        assert!(
            (200..300).contains(&self.status),
            "{} {}: expected 2xx, got {}: {}",
            self.method,
            self.url,
            self.status,
            self.text
        );
        self
    }

    /// The resource's `id` (panics if the body has none).
    #[track_caller]
    pub fn id(&self) -> String {
        match self.body.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => panic!("{} {}: no id in {}", self.method, self.url, self.text),
        }
    }

    /// `Resources` of a ListResponse (panics if absent).
    #[track_caller]
    pub fn resources(&self) -> Vec<Value> {
        match self.body.get("Resources").and_then(Value::as_array) {
            Some(list) => list.clone(),
            None => panic!(
                "{} {}: no Resources array in {}",
                self.method, self.url, self.text
            ),
        }
    }

    /// Asserts an RFC 7644 §3.12 error body with this status (as a string) and `scimType`
    /// (`None`: no expectation on it).
    #[track_caller]
    pub fn expect_error(self, status: u16, scim_type: Option<&str>) -> ScimResponse {
        let resp = self.expect(status);
        assert_eq!(
            resp.body["schemas"],
            json!([ERROR_SCHEMA]),
            "{} {}: error body without the Error schema: {}",
            resp.method,
            resp.url,
            resp.text
        );
        assert_eq!(
            resp.body["status"],
            json!(status.to_string()),
            "{} {}: error `status` must be the status as a string: {}",
            resp.method,
            resp.url,
            resp.text
        );
        if let Some(scim_type) = scim_type {
            assert_eq!(
                resp.body["scimType"],
                json!(scim_type),
                "{} {}: scimType: {}",
                resp.method,
                resp.url,
                resp.text
            );
        }
        resp
    }
}

/// A client for one SCIM base URL with one bearer token (or none).
#[derive(Debug, Clone)]
pub struct ScimClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ScimClient {
    /// `base` without a trailing slash, e.g. `http://auth.test:41234/scim/v2`.
    pub fn new(base: &str, token: &str) -> ScimClient {
        ScimClient {
            http: plain_client(),
            base: base.trim_end_matches('/').to_owned(),
            token: Some(token.to_owned()),
        }
    }

    /// The same client with another token, or without `Authorization` for `None`.
    pub fn with_token(&self, token: Option<&str>) -> ScimClient {
        ScimClient {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The same client, each request limited to `timeout` (for requests a crash may cut).
    pub fn with_timeout(&self, timeout: Duration) -> ScimClient {
        ScimClient {
            http: crate::client::plain_client_builder()
                .timeout(timeout)
                .build()
                .expect("build reqwest client"),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `<base><path>?<query>`, the query encoded as a form.
    pub fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut url = Url::parse(&format!("{}{path}", self.base)).expect("SCIM URL");
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url.to_string()
    }

    /// Sends one request; `Err` only when no complete answer came (connection refused or cut,
    /// timeout).
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<ScimResponse, String> {
        let raw = body.map(|b| serde_json::to_vec(b).expect("serialize JSON"));
        self.try_raw(method, path, query, raw, headers).await
    }

    /// Like [`Self::try_request`] with the body as bytes, sent exactly as given.
    pub async fn try_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<ScimResponse, String> {
        let url = self.url(path, query);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            // Unless the caller says what it is (as Okta does, with a charset).
            let typed = headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
            if !typed {
                req = req.header("content-type", "application/scim+json");
            }
            req = req.body(body);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(ScimResponse {
            method,
            url,
            status,
            headers,
            text,
            body,
        })
    }

    /// Sends one request and panics if no answer came.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> ScimResponse {
        match self.try_request(method, path, query, body, headers).await {
            Ok(resp) => resp,
            Err(e) => panic!("{e}"),
        }
    }

    pub async fn get(&self, path: &str) -> ScimResponse {
        self.request(Method::GET, path, &[], None, &[]).await
    }

    pub async fn get_query(&self, path: &str, query: &[(&str, &str)]) -> ScimResponse {
        self.request(Method::GET, path, query, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> ScimResponse {
        self.request(Method::POST, path, &[], Some(body), &[]).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> ScimResponse {
        self.request(Method::PUT, path, &[], Some(body), &[]).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> ScimResponse {
        self.request(Method::PATCH, path, &[], Some(body), &[])
            .await
    }

    pub async fn delete(&self, path: &str) -> ScimResponse {
        self.request(Method::DELETE, path, &[], None, &[]).await
    }

    /// `GET <path>?filter=<filter>` (with `count=1000` so no page cuts the answer).
    pub async fn filter(&self, path: &str, filter: &str) -> ScimResponse {
        self.get_query(path, &[("filter", filter), ("count", "1000")])
            .await
    }

    /// Creates a User with this `userName` and nothing else; panics unless 201.
    pub async fn create_user(&self, user_name: &str) -> ScimResponse {
        self.post("/Users", &user(user_name)).await.expect(201)
    }

    /// Creates a Group with this `displayName` and members (ids); panics unless 201.
    pub async fn create_group(&self, display_name: &str, members: &[&str]) -> ScimResponse {
        self.post("/Groups", &group(display_name, members))
            .await
            .expect(201)
    }

    /// Creates an Agent (see [`agent`]); panics unless 201.
    pub async fn create_agent(
        &self,
        name: &str,
        owners: &[&str],
        applications: &[&str],
    ) -> ScimResponse {
        self.post("/Agents", &agent(name, owners, applications))
            .await
            .expect(201)
    }

    /// The ids of a Group's members, as `GET /Groups/{id}` shows them, sorted.
    pub async fn member_ids(&self, group_id: &str) -> Vec<String> {
        let resp = self.get(&format!("/Groups/{group_id}")).await.expect(200);
        let mut ids: Vec<String> = match resp.body.get("members") {
            None => Vec::new(),
            Some(Value::Array(members)) => members
                .iter()
                .map(|m| {
                    m["value"]
                        .as_str()
                        .unwrap_or_else(|| panic!("member without a string value: {}", resp.text))
                        .to_owned()
                })
                .collect(),
            Some(other) => panic!("members is not an array: {other}"),
        };
        ids.sort();
        ids
    }
}

/// A minimal User body.
pub fn user(user_name: &str) -> Value {
    json!({"schemas": [USER_SCHEMA], "userName": user_name})
}

/// A Group body with these member ids.
pub fn group(display_name: &str, members: &[&str]) -> Value {
    let members: Vec<Value> = members.iter().map(|id| json!({"value": id})).collect();
    json!({"schemas": [GROUP_SCHEMA], "displayName": display_name, "members": members})
}

/// An Agent body owned by these Users or Groups (ids) and running in these
/// AgenticApplications (ids), its `externalId` `client-{name}`.
pub fn agent(name: &str, owners: &[&str], applications: &[&str]) -> Value {
    let links = |ids: &[&str]| {
        ids.iter()
            .map(|id| json!({"value": id}))
            .collect::<Vec<_>>()
    };
    json!({
        "schemas": [AGENT_SCHEMA, PORTCULLIS_AGENT_SCHEMA],
        "name": name,
        "externalId": format!("client-{name}"),
        "active": true,
        PORTCULLIS_AGENT_SCHEMA: {"owners": links(owners), "applications": links(applications)},
    })
}

/// An AgenticApplication body.
pub fn agentic_application(name: &str) -> Value {
    json!({"schemas": [AGENTIC_APPLICATION_SCHEMA], "name": name, "active": true})
}

/// A PatchOp body around `operations` (a JSON array).
pub fn patch_ops(operations: Value) -> Value {
    json!({"schemas": [PATCH_OP_SCHEMA], "Operations": operations})
}

/// A SCIM string literal for a filter: `"…"` with `"` and `\` escaped.
pub fn filter_str(s: &str) -> String {
    serde_json::to_string(s).expect("serialize string")
}
