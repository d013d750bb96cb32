//! The `/scim/v2` HTTP API (RFC 7644) over a [`Directory`], independent of any HTTP server:
//! the proxy hands it a [`ScimRequest`] after authenticating the bearer token and sends back
//! the [`ScimResponse`].
//!
//! Endpoints: `/ServiceProviderConfig`, `/ResourceTypes[/{name}]`, `/Schemas[/{urn}]`,
//! `/Users` and `/Groups` (list with filter, sort, paging and projection; create), their
//! `/{id}` (get with `If-None-Match`, replace, patch, delete with `If-Match`), `/.search` at
//! the root and under each type, and `/Bulk` with `bulkId` references and `failOnErrors`.
//!
//! Passwords are hashed (Argon2id, off the async threads) before a write reaches the store,
//! and are never returned. Reads of the store that may wait or take long (any from PostgreSQL,
//! any that may read more than a page of records, any of Groups) run off the async threads
//! too: the proxy's workers go on serving requests while one waits or scans.
//!
//! A PATCH of a Group answers 204, with no body, unless the request asked for attributes
//! (`attributes`), so a change to a 100,000-member group never renders the list.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::Method;
use serde_json::{json, Map, Value};

use crate::error::{ScimError, ScimType};
use crate::filter::Filter;
use crate::patch::{parse_patch_request, OpKind, PatchOp};
use crate::project::Projection;
use crate::schema::{
    all_schemas, resource_type_json, resource_types_json, schema_json, ResourceType,
    PORTCULLIS_AGENT_SCHEMA,
};
use crate::store::{etag_matches, Command, Directory, Query, Record, SortOrder, Written};
use crate::validate::{password_not_a_string, validate_resource, Mode};
use crate::value::{get_ci, get_mut_ci};

pub const LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const SEARCH_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";
pub const BULK_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
pub const BULK_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";
pub const SP_CONFIG_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_bulk_operations: usize,
    pub max_results: usize,
}

/// One request, as the HTTP layer hands it over.
pub struct ScimRequest<'a> {
    pub method: &'a Method,
    /// The path below the SCIM base, e.g. `/Users/2819c223`.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    pub if_match: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub body: &'a [u8],
    /// The absolute base URL, e.g. `https://auth.corp.example.com/scim/v2`.
    pub base_url: &'a str,
    /// The name of the token that authenticated the request.
    pub actor: &'a str,
    /// The address the request came from, which the changes it makes record.
    pub client: Option<&'a str>,
    /// Whether the token still stands (not removed nor expired since the request was let in),
    /// asked before each write the request makes: a Bulk's operations, each a write of its
    /// own, and a write that waited its turn to hash a password.
    pub stands: &'a (dyn Fn() -> bool + Sync),
}

impl ScimRequest<'_> {
    fn author(&self) -> Author<'_> {
        Author {
            actor: self.actor,
            client: self.client,
            stands: self.stands,
        }
    }
}

/// Who makes a write: the SCIM token's name, the address its request came from, and whether
/// the token still stands.
#[derive(Clone, Copy)]
struct Author<'a> {
    actor: &'a str,
    client: Option<&'a str>,
    stands: &'a (dyn Fn() -> bool + Sync),
}

impl Author<'_> {
    /// Refused where the token no longer stands (see [`ScimRequest::stands`]).
    fn standing(&self) -> Result<()> {
        if (self.stands)() {
            return Ok(());
        }
        Err(ScimError::new(
            401,
            None,
            "the token that sent this request was removed or has expired since: nothing more it \
             sends is written",
        ))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScimResponse {
    pub status: u16,
    pub etag: Option<String>,
    pub location: Option<String>,
    pub body: Option<Value>,
}

impl ScimResponse {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            etag: None,
            location: None,
            body: Some(body),
        }
    }

    pub fn error(e: &ScimError) -> Self {
        Self::json(e.status, e.to_json())
    }
}

#[derive(Clone)]
pub struct ScimService {
    directory: Arc<Directory>,
    limits: Limits,
}

type Result<T> = std::result::Result<T, ScimError>;

fn not_found(what: impl std::fmt::Display) -> ScimError {
    ScimError::new(404, None, format!("{what} not found"))
}

fn syntax(detail: impl Into<String>) -> ScimError {
    ScimError::bad_request(ScimType::InvalidSyntax, detail)
}

/// The answer to a request no endpoint serves: 405 where the path is an endpoint's (the
/// methods it takes are [`allowed`]'s), else 404.
fn unserved(req: &ScimRequest<'_>) -> ScimError {
    match allowed(req.path) {
        Some(_) => method_not_allowed(req.method, req.path),
        None => not_found(if req.path.is_empty() { "/" } else { req.path }),
    }
}

fn method_not_allowed(method: &Method, path: &str) -> ScimError {
    ScimError::new(405, None, format!("{method} is not supported on {path}"))
}

/// The methods the SCIM endpoint at `path` (below the base path) takes, for a 405's `Allow`
/// (RFC 9110 §15.5.6); `None` where no endpoint is. What [`ScimService::handle`] does not
/// serve, it answers by this ([`unserved`]).
pub fn allowed(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["ServiceProviderConfig"]
        | ["ResourceTypes" | "Schemas"]
        | ["ResourceTypes" | "Schemas", _] => Some("GET, HEAD"),
        ["Bulk"] | [".search"] => Some("POST"),
        [kind, rest @ ..] if ResourceType::from_endpoint(kind).is_some() => match rest {
            [] => Some("GET, HEAD, POST"),
            [".search"] => Some("POST"),
            [_] => Some("GET, HEAD, PUT, PATCH, DELETE"),
            _ => None,
        },
        _ => None,
    }
}

fn version_of(record: &Record) -> Option<String> {
    record
        .resource
        .get("meta")
        .and_then(|m| m.get("version"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn endpoint(rt: ResourceType) -> &'static str {
    rt.endpoint().trim_start_matches('/')
}

/// The query parameters that shape a listing, from a query string or a SearchRequest body.
#[derive(Default)]
struct ListParams {
    filter: Option<String>,
    sort_by: Option<String>,
    sort_order: Option<String>,
    start_index: Option<i64>,
    count: Option<i64>,
    attributes: Option<String>,
    excluded: Option<String>,
}

/// The longest `attributes` or `excludedAttributes` list taken, in bytes (every attribute of
/// every schema, each named in full, is shorter): each name in it is parsed before a reading is
/// found small enough to run on the threads that proxy traffic.
const MAX_ATTRIBUTE_LIST_LEN: usize = 8192;

impl ListParams {
    /// `self`, unless a list of attributes is longer than [`MAX_ATTRIBUTE_LIST_LEN`].
    fn bounded(self) -> Result<Self> {
        let lists = [
            ("attributes", &self.attributes),
            ("excludedAttributes", &self.excluded),
        ];
        for (name, list) in lists {
            if list
                .as_ref()
                .is_some_and(|l| l.len() > MAX_ATTRIBUTE_LIST_LEN)
            {
                return Err(ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!("{name} is longer than {MAX_ATTRIBUTE_LIST_LEN} bytes"),
                ));
            }
        }
        Ok(self)
    }

    fn from_query(query: Option<&str>) -> Result<Self> {
        let mut params = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value = value.into_owned();
            let number = |v: &str| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| syntax(format!("{key} must be an integer, not {v:?}")))
            };
            // In any case, as a SearchRequest's: `Filter` ignored would list everyone.
            match &*key.to_ascii_lowercase() {
                "filter" => params.filter = Some(value),
                "sortby" => params.sort_by = Some(value),
                "sortorder" => params.sort_order = Some(value),
                "startindex" => params.start_index = Some(number(&value)?),
                "count" => params.count = Some(number(&value)?),
                "attributes" => params.attributes = Some(value),
                "excludedattributes" => params.excluded = Some(value),
                // Unknown parameters are ignored, as HTTP servers do.
                _ => {}
            }
        }
        params.bounded()
    }

    fn from_search(body: &Value) -> Result<Self> {
        let body = body
            .as_object()
            .ok_or_else(|| syntax("a SearchRequest must be a JSON object"))?;
        // Its names in any case (RFC 7643 §2.1): `Filter` ignored would list everyone.
        let text = |name: &str| -> Result<Option<String>> {
            match crate::value::get_ci(body, name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Array(list)) => Ok(Some(
                    list.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","),
                )),
                Some(_) => Err(syntax(format!("{name} must be a string"))),
            }
        };
        let number = |name: &str| -> Result<Option<i64>> {
            match crate::value::get_ci(body, name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| syntax(format!("{name} must be an integer"))),
            }
        };
        Self {
            filter: text("filter")?,
            sort_by: text("sortBy")?,
            sort_order: text("sortOrder")?,
            start_index: number("startIndex")?,
            count: number("count")?,
            attributes: text("attributes")?,
            excluded: text("excludedAttributes")?,
        }
        .bounded()
    }

    fn projection(&self, rt: ResourceType) -> Projection {
        Projection::new(rt, self.attributes.as_deref(), self.excluded.as_deref())
    }
}

impl ScimService {
    pub fn new(directory: Arc<Directory>, limits: Limits) -> Self {
        Self { directory, limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub async fn handle(&self, req: ScimRequest<'_>) -> ScimResponse {
        match self.route(&req).await {
            Ok(response) => response,
            Err(e) => ScimResponse::error(&e),
        }
    }

    async fn route(&self, req: &ScimRequest<'_>) -> Result<ScimResponse> {
        if req.body.len() > self.limits.max_body_bytes {
            return Err(ScimError::new(
                413,
                None,
                format!(
                    "the body is larger than {} bytes",
                    self.limits.max_body_bytes
                ),
            ));
        }
        let path = req.path.trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        // A HEAD is answered as its GET, without the body (RFC 9110 §9.3.2).
        let method = match req.method {
            &Method::HEAD => &Method::GET,
            method => method,
        };
        match (segments.as_slice(), method) {
            (["ServiceProviderConfig"], &Method::GET) => Ok(self.service_provider_config(req)),
            (["ResourceTypes"], &Method::GET) => Ok(list_of(resource_types_json(req.base_url))),
            (["ResourceTypes", name], &Method::GET) => {
                let rt = ResourceType::named(name).ok_or_else(|| not_found(name))?;
                Ok(ScimResponse::json(
                    200,
                    resource_type_json(rt, req.base_url),
                ))
            }
            (["Schemas"], &Method::GET) => Ok(list_of(
                all_schemas()
                    .iter()
                    .map(|s| schema_json(s, req.base_url))
                    .collect(),
            )),
            (["Schemas", urn], &Method::GET) => all_schemas()
                .iter()
                .find(|s| s.id.eq_ignore_ascii_case(urn))
                .map(|s| ScimResponse::json(200, schema_json(s, req.base_url)))
                .ok_or_else(|| not_found(urn)),
            ([".search"], &Method::POST) => {
                // A root search spans both types; list Users then Groups.
                let params = ListParams::from_search(&parse_json(req.body)?)?;
                let base = req.base_url.to_owned();
                self.reading(false, move |scim| scim.list_all(&base, &params))
                    .await
            }
            (["Bulk"], &Method::POST) => self.bulk(req).await,
            ([kind, rest @ ..], _) => {
                let rt = ResourceType::from_endpoint(kind).ok_or_else(|| unserved(req))?;
                match (rest, method) {
                    ([], &Method::GET) => {
                        let params = ListParams::from_query(req.query)?;
                        let base = req.base_url.to_owned();
                        let here = self.is_small(rt, &params);
                        self.reading(here, move |scim| scim.list(&base, rt, &params))
                            .await
                    }
                    ([".search"], &Method::POST) => {
                        let params = ListParams::from_search(&parse_json(req.body)?)?;
                        let base = req.base_url.to_owned();
                        let here = self.is_small(rt, &params);
                        self.reading(here, move |scim| scim.list(&base, rt, &params))
                            .await
                    }
                    // A search is a POST; no resource has that id.
                    ([".search"], _) => Err(unserved(req)),
                    ([], &Method::POST) => {
                        let params = ListParams::from_query(req.query)?;
                        let body = parse_json(req.body)?;
                        let written = self.create(rt, &body, req.author()).await?;
                        Ok(self.written(req, rt, written, 201, &params.projection(rt)))
                    }
                    ([id], &Method::GET) => {
                        let params = ListParams::from_query(req.query)?;
                        let (base, id) = (req.base_url.to_owned(), (*id).to_owned());
                        let tags = req.if_none_match.map(str::to_owned);
                        // One record, from this process' own store: read here.
                        let here = rt != ResourceType::Group && !self.directory.is_shared();
                        self.reading(here, move |scim| {
                            scim.get(&base, rt, &id, tags.as_deref(), &params)
                        })
                        .await
                    }
                    ([id], &Method::PUT) => {
                        let params = ListParams::from_query(req.query)?;
                        let body = parse_json(req.body)?;
                        let written = self
                            .replace(rt, id, &body, req.if_match, req.author())
                            .await?;
                        Ok(self.written(req, rt, written, 200, &params.projection(rt)))
                    }
                    ([id], &Method::PATCH) => {
                        let params = ListParams::from_query(req.query)?;
                        let body = parse_json(req.body)?;
                        let written = self
                            .patch(rt, id, &body, req.if_match, req.author())
                            .await?;
                        // (A blank `attributes` is none given.)
                        let asked = params
                            .attributes
                            .as_deref()
                            .is_some_and(|a| !a.trim().is_empty());
                        if rt == ResourceType::Group && !asked {
                            // 204, as Okta expects for groups: rendering the group would mean
                            // listing its members (see the module doc).
                            return Ok(ScimResponse {
                                status: 204,
                                etag: written.record.as_ref().and_then(version_of),
                                location: None,
                                body: None,
                            });
                        }
                        Ok(self.written(req, rt, written, 200, &params.projection(rt)))
                    }
                    ([id], &Method::DELETE) => {
                        self.delete(rt, id, req.if_match, req.author()).await?;
                        Ok(ScimResponse {
                            status: 204,
                            etag: None,
                            location: None,
                            body: None,
                        })
                    }
                    _ => Err(unserved(req)),
                }
            }
            _ => Err(unserved(req)),
        }
    }

    fn service_provider_config(&self, req: &ScimRequest<'_>) -> ScimResponse {
        let limits = self.limits;
        ScimResponse::json(
            200,
            json!({
                "schemas": [SP_CONFIG_SCHEMA],
                "documentationUri": "https://github.com/portcullis/portcullis#readme",
                "patch": {"supported": true},
                "bulk": {
                    "supported": true,
                    "maxOperations": limits.max_bulk_operations,
                    "maxPayloadSize": limits.max_body_bytes,
                },
                "filter": {"supported": true, "maxResults": limits.max_results},
                "changePassword": {"supported": true},
                "sort": {"supported": true},
                "etag": {"supported": true},
                // No `agentExtension` (draft-abbey-scim-agent-extension-00 §4.1): strict RFC
                // 7643 clients refuse an attribute the ServiceProviderConfig schema lacks.
                // Agents and AgenticApplications are announced in /ResourceTypes instead.
                "authenticationSchemes": [{
                    "type": "oauthbearertoken",
                    "name": "Bearer token",
                    "description": "A token declared in Portcullis' configuration under [[scim.tokens]].",
                    "primary": true,
                }],
                "meta": {
                    "resourceType": "ServiceProviderConfig",
                    "location": format!("{}/ServiceProviderConfig", req.base_url),
                },
            }),
        )
    }

    /// Runs a read of the store off the async threads, as a blocking task: a read may wait on
    /// the disk or on PostgreSQL, or go through every resource for a filter no index answers,
    /// and the proxy's worker thread it would otherwise hold serves every request on its
    /// connections meanwhile. A few at once; the rest wait their turn without a thread, for
    /// [`READ_TURN`] at most. A read that is `here` (see [`ScimService::is_small`]) runs where
    /// it is asked: handing it to another thread would cost more than it does.
    async fn reading<T: Send + 'static>(
        &self,
        here: bool,
        read: impl FnOnce(&ScimService) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if here {
            return read(self);
        }
        let unavailable = || ScimError::new(503, None, "the directory cannot be read now");
        let busy = || {
            let detail = "the directory is busy with other reads (one waiting on PostgreSQL, \
                          say): try again later";
            ScimError::new(503, None, detail)
        };
        // The turn goes with the task: a caller that goes away does not end the read.
        let turn = tokio::time::timeout(READ_TURN, READING.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| unavailable())?;
        let scim = self.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            read(&scim)
        })
        .await
        .map_err(|_| ScimError::new(500, None, "a directory read failed"))?
    }

    /// Whether a list of `rt` with `params` reads little enough to run where it is asked: at
    /// most [`SMALL_READ`] records, found through the index, from this process' own store (not
    /// PostgreSQL), and no Group (one renders all its members).
    fn is_small(&self, rt: ResourceType, params: &ListParams) -> bool {
        rt != ResourceType::Group
            && self
                .query_of(params)
                .is_ok_and(|query| self.directory.is_small(rt, &query, SMALL_READ))
    }

    fn get(
        &self,
        base: &str,
        rt: ResourceType,
        id: &str,
        if_none_match: Option<&str>,
        params: &ListParams,
    ) -> Result<ScimResponse> {
        let record = self
            .directory
            .get(rt, id)?
            .ok_or_else(|| not_found(format!("{} {id}", rt.name())))?;
        let etag = self.version_shown(rt, &record);
        if let (Some(tags), Some(current)) = (if_none_match, etag.as_deref()) {
            if etag_matches(tags, current) {
                return Ok(ScimResponse {
                    status: 304,
                    etag,
                    location: None,
                    body: None,
                });
            }
        }
        let body = self.render_as(base, rt, record, &params.projection(rt), etag.as_deref());
        Ok(ScimResponse {
            status: 200,
            etag,
            location: None,
            body: Some(body),
        })
    }

    fn query_of(&self, params: &ListParams) -> Result<Query> {
        // A blank filter is none the grammar has: refused, not taken as no filter (listing
        // everyone, where a client asked whether one of them exists).
        let filter = params
            .filter
            .as_deref()
            .map(Filter::parse)
            .transpose()
            .map_err(ScimError::from)?;
        let sort_by = params
            .sort_by
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(|s| crate::path::PatchPath::parse(s.trim()).map(|p| p.attr))
            .transpose()
            .map_err(|e| ScimError::bad_request(ScimType::InvalidValue, format!("sortBy: {e}")))?;
        let sort_order = match params
            .sort_order
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("ascending") => SortOrder::Ascending,
            Some("descending") => SortOrder::Descending,
            Some(other) => {
                return Err(ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!("sortOrder must be ascending or descending, not {other:?}"),
                ))
            }
        };
        // RFC 7644 §3.4.2.4: startIndex below 1 means 1; a negative count means 0.
        let start_index = usize::try_from(params.start_index.unwrap_or(1).max(1)).unwrap_or(1);
        let count = params
            .count
            .map(|c| usize::try_from(c.max(0)).unwrap_or(0))
            .unwrap_or(self.limits.max_results)
            .min(self.limits.max_results);
        Ok(Query {
            filter,
            sort_by,
            sort_order,
            start_index,
            count: Some(count),
        })
    }

    fn list(&self, base: &str, rt: ResourceType, params: &ListParams) -> Result<ScimResponse> {
        let query = self.query_of(params)?;
        let page = self.directory.query(rt, &query)?;
        let projection = params.projection(rt);
        let resources: Vec<Value> = page
            .records
            .into_iter()
            .map(|r| self.render(base, rt, r, &projection))
            .collect();
        Ok(list_response(page.total, query.start_index, resources))
    }

    /// A root search (RFC 7644 §3.4.3): every type's matches, one type after another, paged
    /// as one list. Each type is asked only for the part of the page that falls in it, so a
    /// page costs what it holds, not the whole directory. A filter that names an attribute
    /// some type lacks matches nothing of that type; one that no type can read is refused.
    fn list_all(&self, base: &str, params: &ListParams) -> Result<ScimResponse> {
        let query = self.query_of(params)?;
        let mut skip = query.start_index - 1;
        let mut room = query.count.unwrap_or(self.limits.max_results);
        let (mut total, mut resources, mut unreadable) = (0, Vec::new(), Vec::new());
        for rt in ResourceType::ALL {
            let part = Query {
                start_index: skip + 1,
                count: Some(room),
                ..query.clone()
            };
            let page = match self.directory.query(rt, &part) {
                Ok(page) => page,
                Err(e) if e.scim_type == Some(ScimType::InvalidFilter) => {
                    unreadable.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            total += page.total;
            skip = skip.saturating_sub(page.total);
            room = room.saturating_sub(page.records.len());
            let projection = params.projection(rt);
            resources.extend(
                page.records
                    .into_iter()
                    .map(|r| self.render(base, rt, r, &projection)),
            );
        }
        if unreadable.len() == ResourceType::ALL.len() {
            return Err(unreadable.swap_remove(0));
        }
        Ok(list_response(total, query.start_index, resources))
    }

    /// The version of `record` an answer showing it claims. A group's members are the
    /// index's: until it holds the version just read from storage, the answer is of no one
    /// version, and claims none (no ETag, no `meta.version`: no 304 to a client holding the
    /// new one, which would confirm a copy without the change).
    fn version_shown(&self, rt: ResourceType, record: &Record) -> Option<String> {
        let lagging = rt == ResourceType::Group && !self.directory.shows_members_of(record);
        version_of(record).filter(|_| !lagging)
    }

    /// The resource as a client sees it: `meta.location`, a Group's `members` and a User's
    /// `groups` (each only when the projection wants them), then the projection; with the
    /// version it claims ([`ScimService::version_shown`]).
    fn render(
        &self,
        base: &str,
        rt: ResourceType,
        record: Record,
        projection: &Projection,
    ) -> Value {
        let version = self.version_shown(rt, &record);
        self.render_as(base, rt, record, projection, version.as_deref())
    }

    /// [`ScimService::render`], claiming `version` (read once for its ETag too).
    fn render_as(
        &self,
        base: &str,
        rt: ResourceType,
        record: Record,
        projection: &Projection,
        version: Option<&str>,
    ) -> Value {
        let mut resource = record.resource;
        let Some(obj) = resource.as_object_mut() else {
            return resource;
        };
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if let Some(meta) = obj.get_mut("meta").and_then(Value::as_object_mut) {
            meta.insert(
                "location".to_owned(),
                Value::String(format!("{base}/{}/{id}", endpoint(rt))),
            );
            match version {
                Some(version) => meta.insert("version".to_owned(), json!(version)),
                None => meta.remove("version"),
            };
        }
        match rt {
            ResourceType::Group if projection.includes("members") => {
                let members: Vec<Value> = self
                    .directory
                    .members(&id)
                    .into_iter()
                    .map(|m| {
                        let mut member = Map::new();
                        member.insert("value".to_owned(), json!(&*m.id));
                        member.insert(
                            "$ref".to_owned(),
                            json!(format!("{base}/{}/{}", endpoint(m.rt), m.id)),
                        );
                        member.insert("type".to_owned(), json!(m.rt.name()));
                        if let Some(display) = m.display {
                            member.insert("display".to_owned(), json!(display));
                        }
                        Value::Object(member)
                    })
                    .collect();
                obj.insert("members".to_owned(), Value::Array(members));
            }
            ResourceType::User | ResourceType::Agent if projection.includes("groups") => {
                let groups: Vec<Value> = self
                    .directory
                    .groups_of(&id)
                    .into_iter()
                    .map(|g| {
                        json!({
                            "value": &*g.id,
                            "$ref": format!("{base}/Groups/{}", g.id),
                            "display": g.display,
                            "type": if g.direct { "direct" } else { "indirect" },
                        })
                    })
                    .collect();
                if !groups.is_empty() {
                    obj.insert("groups".to_owned(), Value::Array(groups));
                }
            }
            _ => {}
        }
        if rt == ResourceType::Agent {
            self.mirror_agent_links(base, obj);
        }
        projection.apply(resource)
    }

    /// The draft's read-only `owners` and `applications`, filled from Portcullis' extension,
    /// where the IdP sets them (see [`crate::schema::AGENT`]).
    fn mirror_agent_links(&self, base: &str, agent: &mut Map<String, Value>) {
        let Some(extension) = get_ci(agent, PORTCULLIS_AGENT_SCHEMA).and_then(Value::as_object)
        else {
            return;
        };
        let mut mirrored = Vec::new();
        for name in ["owners", "applications"] {
            let links: Vec<Value> = get_ci(extension, name)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|link| {
                    let id = link.get("value").and_then(Value::as_str)?;
                    let mut out = Map::new();
                    out.insert("value".to_owned(), json!(id));
                    if let Some(rt) = self.directory.kind_of(id) {
                        out.insert(
                            "$ref".to_owned(),
                            json!(format!("{base}/{}/{id}", endpoint(rt))),
                        );
                    }
                    Some(Value::Object(out))
                })
                .collect();
            if !links.is_empty() {
                mirrored.push((name, links));
            }
        }
        for (name, links) in mirrored {
            agent.insert(name.to_owned(), Value::Array(links));
        }
    }

    fn written(
        &self,
        req: &ScimRequest<'_>,
        rt: ResourceType,
        written: Written,
        status: u16,
        projection: &Projection,
    ) -> ScimResponse {
        let Some(record) = written.record else {
            return ScimResponse {
                status: 204,
                etag: None,
                location: None,
                body: None,
            };
        };
        let location = format!("{}/{}/{}", req.base_url, endpoint(rt), written.id);
        let etag = self.version_shown(rt, &record);
        let body = self.render_as(req.base_url, rt, record, projection, etag.as_deref());
        ScimResponse {
            status,
            etag,
            location: (status == 201).then_some(location),
            body: Some(body),
        }
    }

    /// Makes `command` as `by`, if its token still stands: a token removed or expired while
    /// its request ran (a long Bulk, a turn waited to hash a password) writes nothing more.
    async fn write(&self, command: Command, by: Author<'_>) -> Result<Written> {
        by.standing()?;
        self.directory
            .write_from(command, by.actor, by.client)
            .await
    }

    async fn create(&self, rt: ResourceType, body: &Value, by: Author<'_>) -> Result<Written> {
        let mut resource = validate_resource(rt, body, Mode::Create)?;
        let password_hash = hash_password(take_password(rt, &mut resource)?).await?;
        self.write(
            Command::Create {
                rt,
                resource,
                password_hash,
            },
            by,
        )
        .await
    }

    async fn replace(
        &self,
        rt: ResourceType,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        by: Author<'_>,
    ) -> Result<Written> {
        // `id` is read-only: a PUT may repeat it but not change it. (Validation drops read-only
        // attributes, so this is checked on the body as sent.)
        let sent_id = body
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("id")))
            .map(|(_, v)| v);
        if let Some(sent) = sent_id.filter(|v| v.as_str() != Some(id)) {
            return Err(ScimError::bad_request(
                ScimType::Mutability,
                format!("id is read-only: this resource's id is {id}, not {sent}"),
            ));
        }
        let mut resource = validate_resource(rt, body, Mode::Replace)?;
        let password_hash = hash_password(take_password(rt, &mut resource)?).await?;
        self.write(
            Command::Replace {
                rt,
                id: id.to_owned(),
                resource,
                password_hash,
                if_match: if_match.map(str::to_owned),
            },
            by,
        )
        .await
    }

    async fn patch(
        &self,
        rt: ResourceType,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        by: Author<'_>,
    ) -> Result<Written> {
        let mut ops = parse_patch_request(body)?;
        let password = take_patch_password(rt, &mut ops)?;
        let password_hash = hash_password(password).await?;
        self.write(
            Command::Patch {
                rt,
                id: id.to_owned(),
                ops,
                password_hash,
                if_match: if_match.map(str::to_owned),
            },
            by,
        )
        .await
    }

    async fn delete(
        &self,
        rt: ResourceType,
        id: &str,
        if_match: Option<&str>,
        by: Author<'_>,
    ) -> Result<Written> {
        self.write(
            Command::Delete {
                rt,
                id: id.to_owned(),
                if_match: if_match.map(str::to_owned),
            },
            by,
        )
        .await
    }

    /// RFC 7644 §3.7. Operations run in order, each durable before the next; `bulkId:` refs
    /// in paths and data are replaced by the ids created earlier in the same request.
    async fn bulk(&self, req: &ScimRequest<'_>) -> Result<ScimResponse> {
        let body = parse_json(req.body)?;
        let body = body
            .as_object()
            .ok_or_else(|| syntax("a BulkRequest must be a JSON object"))?;
        // Attribute names and schema URNs are case-insensitive (RFC 7643 §2.1): a `Version` is
        // a precondition as `version` is, never dropped.
        let declares = get_ci(body, "schemas")
            .and_then(Value::as_array)
            .is_some_and(|s| {
                s.iter().any(|v| {
                    v.as_str()
                        .is_some_and(|v| v.eq_ignore_ascii_case(BULK_REQUEST_SCHEMA))
                })
            });
        if !declares {
            return Err(syntax(format!(
                "schemas must contain {BULK_REQUEST_SCHEMA}"
            )));
        }
        let ops = get_ci(body, "Operations")
            .and_then(Value::as_array)
            .ok_or_else(|| syntax("Operations must be a list"))?;
        if ops.len() > self.limits.max_bulk_operations {
            return Err(ScimError::new(
                413,
                None,
                format!(
                    "a bulk request may hold at most {} operations",
                    self.limits.max_bulk_operations
                ),
            ));
        }
        let fail_on_errors = match get_ci(body, "failOnErrors") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| syntax("failOnErrors must be a positive integer"))?,
            ),
        };

        // A bulkId names one resource of the request (RFC 7644 §3.7): one named twice would
        // have the references after both go to whichever was created last. Refused before
        // anything is done.
        let mut named = HashSet::new();
        for op in ops {
            let bulk_id = op.as_object().and_then(|op| get_ci(op, "bulkId"));
            if let Some(bulk_id) = bulk_id.and_then(Value::as_str) {
                if !named.insert(bulk_id) {
                    return Err(ScimError::bad_request(
                        ScimType::InvalidValue,
                        format!("bulkId {bulk_id} names more than one operation"),
                    ));
                }
            }
        }

        let mut bulk_ids: HashMap<String, String> = HashMap::new();
        let mut results = Vec::with_capacity(ops.len());
        let mut errors = 0u64;
        for op in ops {
            if fail_on_errors.is_some_and(|limit| errors >= limit) {
                break;
            }
            let outcome = self.bulk_operation(req, op, &mut bulk_ids).await;
            let field = |name| op.as_object().and_then(|op| get_ci(op, name)).cloned();
            let (method, bulk_id) = (field("method").unwrap_or(Value::Null), field("bulkId"));
            let post = method
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case("POST"));
            let mut entry = Map::new();
            entry.insert("method".to_owned(), method);
            if let Some(bulk_id) = bulk_id {
                entry.insert("bulkId".to_owned(), bulk_id);
            }
            match outcome {
                Ok(response) => {
                    entry.insert("status".to_owned(), json!(response.status.to_string()));
                    if let Some(location) = response.location {
                        entry.insert("location".to_owned(), json!(location));
                    }
                    if let Some(etag) = response.etag {
                        entry.insert("version".to_owned(), json!(etag));
                    }
                }
                Err(e) => {
                    errors += 1;
                    // Every result but a failed POST's names its resource (RFC 7644 §3.7).
                    let path = field("path");
                    let path = path.as_ref().and_then(Value::as_str);
                    let target = path.and_then(|path| substitute(path, &bulk_ids).ok());
                    if let (false, Some((rt, Some(id)))) =
                        (post, target.as_deref().and_then(bulk_target))
                    {
                        let location = format!("{}/{}/{id}", req.base_url, endpoint(rt));
                        entry.insert("location".to_owned(), json!(location));
                    }
                    entry.insert("status".to_owned(), json!(e.status.to_string()));
                    entry.insert("response".to_owned(), e.to_json());
                }
            }
            results.push(Value::Object(entry));
        }
        Ok(ScimResponse::json(
            200,
            json!({"schemas": [BULK_RESPONSE_SCHEMA], "Operations": results}),
        ))
    }

    async fn bulk_operation(
        &self,
        req: &ScimRequest<'_>,
        op: &Value,
        bulk_ids: &mut HashMap<String, String>,
    ) -> Result<ScimResponse> {
        // Before any work (a turn to hash a password): an operation after the token fell
        // would only be refused at its write.
        req.author().standing()?;
        let op = op
            .as_object()
            .ok_or_else(|| syntax("each bulk operation must be an object"))?;
        let method = get_ci(op, "method")
            .and_then(Value::as_str)
            .and_then(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
            .ok_or_else(|| syntax("each bulk operation needs a method"))?;
        let path = get_ci(op, "path")
            .and_then(Value::as_str)
            .ok_or_else(|| syntax("each bulk operation needs a path"))?;
        let path = substitute(path, bulk_ids)?;
        let mut data = get_ci(op, "data").cloned().unwrap_or(Value::Null);
        substitute_value(&mut data, bulk_ids)?;
        if method == Method::PATCH {
            substitute_in_paths(&mut data, bulk_ids)?;
        }
        // A precondition not written as an ETag is refused, never dropped: the write would
        // run unconditionally.
        let if_match = match get_ci(op, "version") {
            None | Some(Value::Null) => None,
            Some(Value::String(version)) => Some(version.as_str()),
            Some(_) => return Err(syntax("version must be a string: an ETag")),
        };
        let (rt, id) = bulk_target(&path).ok_or_else(|| not_found(&path))?;
        let written = match (&method, id) {
            (&Method::POST, None) => {
                let bulk_id = get_ci(op, "bulkId")
                    .and_then(Value::as_str)
                    .ok_or_else(|| syntax("a bulk POST needs a bulkId"))?;
                let written = self.create(rt, &data, req.author()).await?;
                bulk_ids.insert(bulk_id.to_owned(), written.id.clone());
                (written, 201)
            }
            (&Method::PUT, Some(id)) => (
                self.replace(rt, id, &data, if_match, req.author()).await?,
                200,
            ),
            (&Method::PATCH, Some(id)) => (
                self.patch(rt, id, &data, if_match, req.author()).await?,
                200,
            ),
            (&Method::DELETE, Some(id)) => {
                (self.delete(rt, id, if_match, req.author()).await?, 204)
            }
            _ => return Err(method_not_allowed(&method, &path)),
        };
        let (written, status) = written;
        // A Bulk result carries no resource, so none is rendered: a group's would list every
        // member.
        Ok(ScimResponse {
            status: if written.record.is_some() {
                status
            } else {
                204
            },
            etag: written.record.as_ref().and_then(version_of),
            location: Some(format!("{}/{}/{}", req.base_url, endpoint(rt), written.id)),
            body: None,
        })
    }
}

/// The resource type and id a bulk operation's `path` names (`/Users`, `/Users/<id>`).
fn bulk_target(path: &str) -> Option<(ResourceType, Option<&str>)> {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let rt = ResourceType::from_endpoint(segments.next()?)?;
    let id = segments.next();
    segments.next().is_none().then_some((rt, id))
}

fn list_of(resources: Vec<Value>) -> ScimResponse {
    let total = resources.len();
    list_response(total, 1, resources)
}

fn list_response(total: usize, start_index: usize, resources: Vec<Value>) -> ScimResponse {
    ScimResponse::json(
        200,
        json!({
            "schemas": [LIST_RESPONSE_SCHEMA],
            "totalResults": total,
            "startIndex": start_index,
            "itemsPerPage": resources.len(),
            "Resources": resources,
        }),
    )
}

fn parse_json(body: &[u8]) -> Result<Value> {
    if body.is_empty() {
        return Err(syntax("the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map(|Unique(value)| value)
        .map_err(|e| syntax(format!("the body is not valid JSON: {e}")))
}

/// A JSON value in which no object names a key twice. serde_json keeps the last of two: a
/// body naming an attribute twice as sent (`"active": false, "active": true`), or a Bulk
/// operation its `method`, would be answered as done with the other dropped unseen, where one
/// naming it twice in two letter cases is refused.
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut values = Vec::new();
        while let Some(Unique(value)) = seq.next_element()? {
            values.push(value);
        }
        Ok(Value::Array(values))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "'{key}' is given twice"
                )));
            }
            let Unique(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Takes `password` out of a resource or a path-less PATCH value of type `rt`, so that only its
/// hash reaches the store: under its own name or its schema's full one (`urn:…:User:password`,
/// as clients that qualify every attribute send it). Two spellings of it are refused, as any
/// attribute given twice is: which would be kept is the order keys are walked in, not as sent.
/// One that is not a string is refused, never dropped: the request would be answered as done
/// with the password unchanged.
fn take_password(rt: ResourceType, resource: &mut Value) -> Result<Option<String>> {
    let Some(obj) = resource.as_object_mut() else {
        return Ok(None);
    };
    let names_password = |key: &str| {
        let name = match key.rsplit_once(':') {
            Some((schema, name)) if schema.eq_ignore_ascii_case(rt.core_schema().id) => name,
            Some(_) => return false,
            None => key,
        };
        name.eq_ignore_ascii_case("password")
    };
    let keys: Vec<String> = obj.keys().filter(|k| names_password(k)).cloned().collect();
    if let [first, second, ..] = keys.as_slice() {
        return Err(syntax(format!(
            "'{second}' names what '{first}' names: an attribute is given once"
        )));
    }
    let mut password = None;
    for key in keys {
        match obj.remove(&key) {
            Some(Value::String(sent)) => password = Some(sent),
            _ => return Err(password_not_a_string()),
        }
    }
    Ok(password)
}

/// Takes a new password out of PATCH operations (`path: password`, or a `password` key in a
/// path-less value) so that only its hash reaches the store. A resource whose schema has no
/// `password` keeps such operations, and the patch refuses them as it refuses any attribute
/// the schema lacks.
fn take_patch_password(rt: ResourceType, ops: &mut Vec<PatchOp>) -> Result<Option<String>> {
    if rt.core_schema().attribute("password").is_none() {
        return Ok(None);
    }
    let mut password = None;
    let mut kept = Vec::with_capacity(ops.len());
    for mut op in ops.drain(..) {
        let names_password = op.path.as_ref().filter(|p| p.attr.name_is("password"));
        if let Some(path) = names_password {
            // Only the core schema's own, as a whole: one under another schema's URN, with a
            // filter or a sub-attribute is no path to it (RFC 7644 §3.5.2), and must not set it.
            let core = path
                .attr
                .schema
                .as_deref()
                .is_none_or(|schema| schema.eq_ignore_ascii_case(rt.core_schema().id));
            if !core || path.value_filter.is_some() || path.attr.sub_attr.is_some() {
                return Err(ScimError::bad_request(
                    ScimType::InvalidPath,
                    "password is a single-valued attribute of the core schema: its path is \
                     `password`",
                ));
            }
            match (op.op, op.value.take()) {
                (OpKind::Add | OpKind::Replace, Some(Value::String(p))) => password = Some(p),
                _ => return Err(password_not_a_string()),
            }
            continue;
        }
        if op.path.is_none() {
            if let Some(value) = op.value.as_mut() {
                if let Some(p) = take_password(rt, value)? {
                    password = Some(p);
                }
            }
        }
        kept.push(op);
    }
    *ops = kept;
    Ok(password)
}

/// Reads of the store at once (see [`ScimService::reading`]): each holds a blocking thread,
/// and a client that sends many searches at once gets them answered a few at a time.
static READING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Records a read may take from the store and still run on the async thread that was asked.
const SMALL_READ: usize = 100;

/// How long a read waits for its turn before it is answered 503: reads that do not end (each
/// waiting on a lock another PostgreSQL session holds, say) do not hold up the rest for ever.
const READ_TURN: std::time::Duration = std::time::Duration::from_secs(10);

/// Passwords hashed at once: each takes Argon2's 19 MiB and a core for a while, and a SCIM
/// client may send many creates at once; the rest wait their turn.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn hash_password(password: Option<String>) -> Result<Option<String>> {
    let Some(password) = password else {
        return Ok(None);
    };
    // The turn goes with the task: a client that goes away does not end the hashing.
    let turn = HASHING
        .acquire()
        .await
        .map_err(|_| ScimError::new(503, None, "password hashing is unavailable"))?;
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let _turn = turn;
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| ScimError::new(500, None, format!("could not hash the password: {e}")))
    })
    .await
    .map_err(|_| ScimError::new(500, None, "password hashing failed"))?
    .map(Some)
}

/// The id of the resource created earlier in the request under `bulk_id`.
fn resolve<'a>(bulk_id: &str, bulk_ids: &'a HashMap<String, String>) -> Result<&'a String> {
    bulk_ids.get(bulk_id).ok_or_else(|| {
        ScimError::new(
            409,
            Some(ScimType::InvalidValue),
            format!("bulkId {bulk_id} does not name a resource created earlier in this request"),
        )
    })
}

/// Replaces each `bulkId:<id>` segment of a path (an id holds no `/`).
fn substitute(text: &str, bulk_ids: &HashMap<String, String>) -> Result<String> {
    if !text.contains("bulkId:") {
        return Ok(text.to_owned());
    }
    text.split('/')
        .map(|segment| match segment.strip_prefix("bulkId:") {
            Some(bulk_id) => resolve(bulk_id, bulk_ids).cloned(),
            None => Ok(segment.to_owned()),
        })
        .collect::<Result<Vec<_>>>()
        .map(|parts| parts.join("/"))
}

/// Replaces each `"bulkId:<id>"` quoted in a PATCH operation's `path`, whose filter names a
/// resource created earlier in the request (`members[value eq "bulkId:u1"]`): unreplaced, the
/// filter would match no member, and a removal be answered 200 having removed nobody.
fn substitute_in_paths(patch: &mut Value, bulk_ids: &HashMap<String, String>) -> Result<()> {
    const REFERENCE: &str = "\"bulkId:";
    // The spellings the PATCH's reader takes (an exact one before another case's).
    let operations = (patch.as_object_mut())
        .and_then(|patch| get_mut_ci(patch, "Operations"))
        .and_then(Value::as_array_mut);
    for operation in operations.into_iter().flatten() {
        let path = (operation.as_object_mut()).and_then(|op| get_mut_ci(op, "path"));
        let Some(Value::String(path)) = path else {
            continue;
        };
        if !path.contains(REFERENCE) {
            continue;
        }
        let mut replaced = String::with_capacity(path.len());
        let mut rest = path.as_str();
        while let Some(at) = rest.find(REFERENCE) {
            let reference = &rest[at + REFERENCE.len()..];
            let Some(end) = reference.find('"') else {
                // Unclosed: the filter's parser refuses it.
                break;
            };
            replaced.push_str(&rest[..=at]);
            replaced.push_str(resolve(&reference[..end], bulk_ids)?);
            rest = &reference[end..];
        }
        replaced.push_str(rest);
        *path = replaced;
    }
    Ok(())
}

/// Replaces each string value of `value` that is a `bulkId:<id>` reference: all after the
/// prefix is the bulkId (one holding a `/` too, as a path's segment cannot).
fn substitute_value(value: &mut Value, bulk_ids: &HashMap<String, String>) -> Result<()> {
    match value {
        Value::String(s) if s.starts_with("bulkId:") => {
            *s = resolve(&s["bulkId:".len()..], bulk_ids)?.clone();
        }
        Value::Array(items) => {
            for item in items {
                substitute_value(item, bulk_ids)?;
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                substitute_value(item, bulk_ids)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::USER_SCHEMA;

    fn patch(ops: Value) -> Vec<PatchOp> {
        parse_patch_request(&json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": ops,
        }))
        .unwrap()
    }

    /// Every `"bulkId:<id>"` quoted in a PATCH path is replaced, one not closed is left to the
    /// filter's parser, and one naming nothing created is a 409.
    #[test]
    fn bulk_ids_quoted_in_patch_paths_are_replaced() {
        let ids = HashMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        let replaced = |path: &str| {
            let mut patch = json!({"Operations": [{"op": "remove", "Path": path}]});
            substitute_in_paths(&mut patch, &ids).map(|()| patch["Operations"][0]["Path"].clone())
        };
        assert_eq!(
            replaced(r#"members[value eq "bulkId:a" or value eq "bulkId:b"]"#).unwrap(),
            r#"members[value eq "1" or value eq "2"]"#
        );
        assert_eq!(
            replaced(r#"members[value eq "bulkId:a"] "bulkId:b"#).unwrap(),
            r#"members[value eq "1"] "bulkId:b"#
        );
        assert_eq!(
            replaced(r#"members[value eq "bulkId:c"]"#)
                .unwrap_err()
                .status,
            409
        );
        // Of two spellings, the one the PATCH's reader takes.
        let mut patch = json!({"Operations": [{
            "Path": "x", "path": r#"members[value eq "bulkId:a"]"#
        }]});
        substitute_in_paths(&mut patch, &ids).unwrap();
        assert_eq!(patch["Operations"][0]["path"], r#"members[value eq "1"]"#);
    }

    /// A body is read as serde_json reads it, but a key named twice in one object, at any
    /// depth, is refused: serde_json would keep the last unseen.
    #[test]
    fn a_body_naming_a_key_twice_is_refused() {
        let body = br#"{"n": [1, -2, 18446744073709551615, 1.5e300, 0.1], "s": "\u00e9",
            "o": {"a": null, "b": [true, {"c": false}]}}"#;
        assert_eq!(
            parse_json(body).unwrap(),
            serde_json::from_slice::<Value>(body).unwrap()
        );
        for body in [
            r#"{"userName": "a", "active": false, "active": true}"#,
            r#"{"Operations": [{"op": "replace", "value": {"active": false, "active": true}}]}"#,
            r#"{"Operations": [{"method": "DELETE", "path": "/Users/x", "method": "POST"}]}"#,
        ] {
            let refused = parse_json(body.as_bytes()).unwrap_err();
            assert_eq!(refused.scim_type, Some(ScimType::InvalidSyntax), "{body}");
            assert!(
                refused.detail.contains("is given twice"),
                "{}",
                refused.detail
            );
        }
    }

    /// A value that refers to a resource made earlier in a Bulk is that resource's id, whatever
    /// its bulkId holds (a `/` too); one naming nothing made is a 409.
    #[test]
    fn bulk_ids_in_values_are_replaced_whole() {
        let ids = HashMap::from([("team/a".to_owned(), "1".to_owned())]);
        let mut data = json!({"members": [{"value": "bulkId:team/a"}], "note": "x bulkId:team/a"});
        substitute_value(&mut data, &ids).unwrap();
        assert_eq!(data["members"][0]["value"], "1");
        assert_eq!(data["note"], "x bulkId:team/a");
        let mut unknown = json!({"members": [{"value": "bulkId:team"}]});
        assert_eq!(
            substitute_value(&mut unknown, &ids).unwrap_err().status,
            409
        );
    }

    /// A list of attributes is parsed name by name before a reading is judged small: one of
    /// any length would hold a proxy thread (a `.search` body of 64 MiB, seconds).
    #[test]
    fn a_list_of_attributes_is_bounded() {
        let long = "userName,".repeat(MAX_ATTRIBUTE_LIST_LEN / 9 + 1);
        let search = |name: &str| ListParams::from_search(&json!({ name: long, "count": 1 }));
        for name in ["attributes", "excludedAttributes"] {
            let refused = search(name).err().expect("refused");
            assert_eq!(refused.scim_type, Some(ScimType::InvalidValue), "{name}");
        }
        let query = format!("count=1&excludedAttributes={long}");
        assert!(ListParams::from_query(Some(&query)).is_err());
        let every = ListParams::from_search(&json!({"attributes": long[..MAX_ATTRIBUTE_LIST_LEN]}));
        assert!(every.is_ok());
    }

    /// However a client names the password (alone, under its schema's full name, in a value
    /// or as a path, in any case), it is taken out to be hashed, and nothing else is.
    #[test]
    fn a_patched_password_is_taken_under_any_of_its_names() {
        let qualified = format!("{USER_SCHEMA}:Password");
        for ops in [
            json!([{"op": "replace", "value": {"password": "s3cret", "title": "x"}}]),
            json!([{"op": "Replace", "value": {&qualified: "s3cret", "title": "x"}}]),
            json!([{"op": "replace", "path": &qualified, "value": "s3cret"}]),
            json!([{"op": "add", "path": "PASSWORD", "value": "s3cret"}]),
        ] {
            let mut taken = patch(ops.clone());
            let password = take_patch_password(ResourceType::User, &mut taken).unwrap();
            assert_eq!(password.as_deref(), Some("s3cret"), "{ops}");
            let left = format!("{:?}", taken.iter().map(|op| &op.value).collect::<Vec<_>>());
            assert!(!left.contains("s3cret"), "{ops} left {left}");
        }
        // An extension's attribute of that name is not the password.
        let mut other = patch(json!([{"op": "replace",
            "value": {"urn:example:params:scim:schemas:extension:x:2.0:User:password": "kept"}}]));
        assert_eq!(
            take_patch_password(ResourceType::User, &mut other).unwrap(),
            None
        );
        // Nor a number under the full name: refused, not dropped.
        let mut number = patch(json!([{"op": "replace", "value": {&qualified: 123}}]));
        assert!(take_patch_password(ResourceType::User, &mut number).is_err());
        // Two of its spellings in one value: refused, as a POST or PUT refuses them (which
        // would be kept is the order keys are walked in, not as sent).
        for value in [
            json!({"password": "a", &qualified: "b"}),
            json!({"password": "a", "Password": "b"}),
        ] {
            let mut twice = patch(json!([{"op": "replace", "value": value}]));
            let refused = take_patch_password(ResourceType::User, &mut twice).unwrap_err();
            assert!(refused.detail.contains("given once"), "{}", refused.detail);
        }
        // A path that is no path to it (another schema's, filtered, a sub-attribute) sets
        // nothing: refused.
        let enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:password";
        for path in [enterprise, "password[value eq \"a\"]", "password.value"] {
            let mut ops = patch(json!([{"op": "replace", "path": path, "value": "x"}]));
            let refused = take_patch_password(ResourceType::User, &mut ops).unwrap_err();
            assert_eq!(refused.scim_type, Some(ScimType::InvalidPath), "{path}");
        }
    }
}
