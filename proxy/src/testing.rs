//! Test fixtures for the crate's unit tests: a real directory (in memory, written through the
//! SCIM service exactly as an IdP writes it) and a real configuration (parsed and validated
//! from TOML), with no sockets and no disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::Method;
use serde_json::{json, Value};

use portcullis_config::Config;
use portcullis_scim::service::{Limits, ScimRequest, ScimService};
use portcullis_scim::store::memory::MemoryStorage;
use portcullis_scim::store::{Directory, Sinks};

use crate::assertion::Signer;
use crate::audit::Audit;
use crate::auth::sessions::{Kept, Sessions};
use crate::auth::Auth;

use crate::caller::{Identity, Machine};
use crate::gate::{Forwards, Gate};
use crate::state::{Runtime, Shared};

/// The configuration the tests judge against. Routes, in order:
/// - `routes[0]` `http://app.test`: sessions and bearer tokens; group `eng` allowed, `/public`
///   open to anyone, `/admin` denied to `eng`;
/// - `routes[1]` `http://api.test`: bearer tokens only; group `eng` allowed;
/// - `routes[2]` `http://open.test`: public, `/open` only;
/// - `routes[3]` `http://tg.test`: sessions and tokens, `token_groups`; group `contractors`;
/// - `routes[4]` `http://odysseus.test`: sessions; the user `ΟΔΥΣΣΕΥΣ` only;
/// - `routes[5]` `http://mail.test`: sessions; anyone with an email at `corp.example`;
/// - `routes[6]` `http://app.test/v1/`: bearer tokens; group `eng`.
pub const CONFIG: &str = r#"
data_dir = "/nonexistent"

[[listeners]]
address = "127.0.0.1:1"

[oidc]
issuer = "http://127.0.0.1:2"
client_id = "portcullis"
client_secret = "test-secret-0123456789abcdef0123456789"
auth_host = "app.test"
auth_scheme = "http"

[[jwt_issuers]]
issuer = "http://127.0.0.1:2"
audiences = ["api"]

[[routes]]
from = "http://app.test"
to = ["http://127.0.0.1:3"]
accept = ["session", "bearer"]
allow = [{ groups = ["eng"] }, { public = true, paths = ["/public"] }]
deny = { groups = ["eng"], paths = ["/admin"] }

[[routes]]
from = "http://api.test"
to = ["http://127.0.0.1:3"]
accept = ["bearer"]
allow = { groups = ["eng"] }

[[routes]]
from = "http://open.test"
to = ["http://127.0.0.1:3"]
accept = ["public"]
allow = { public = true, paths = ["/open"] }

[[routes]]
from = "http://tg.test"
to = ["http://127.0.0.1:3"]
accept = ["session", "bearer"]
token_groups = true
allow = { groups = ["contractors"] }

[[routes]]
from = "http://odysseus.test"
to = ["http://127.0.0.1:3"]
accept = ["session"]
allow = { users = ["ΟΔΥΣΣΕΥΣ"] }

[[routes]]
from = "http://mail.test"
to = ["http://127.0.0.1:3"]
accept = ["session"]
allow = { email_domains = ["corp.example"] }

[[routes]]
from = "http://app.test/v1/"
to = ["http://127.0.0.1:3"]
accept = ["bearer"]
allow = { groups = ["eng"] }
"#;

/// `CONFIG` with `extra` appended (an `[identity]` table, say), validated.
pub fn config(extra: &str) -> Config {
    parse(&format!("{CONFIG}\n{extra}"))
}

/// [`CONFIG`] with a route for the agents of `eng`'s people (`http://bots.test`, the last),
/// on a listener off loopback: where it allows plain HTTP (`false`), and where credentials
/// sent over plain HTTP are refused (`true`).
pub fn off_loopback() -> [(Config, bool); 2] {
    let bots = "[[routes]]\nfrom = \"http://bots.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                accept = [\"bearer\"]\nallow = { agent_owner_groups = [\"eng\"] }\n";
    let in_clear = format!("{CONFIG}\n{bots}").replace("127.0.0.1:1", "10.0.0.1:1");
    let allowed = in_clear.replace("\"10.0.0.1:1\"", "\"10.0.0.1:1\"\nallow_plain_http = true");
    [(parse(&allowed), false), (parse(&in_clear), true)]
}

/// A configuration file's text, validated.
pub fn parse(text: &str) -> Config {
    match portcullis_config::parse(text, Path::new("/"), &|_| None) {
        Ok(config) => config,
        Err(errors) => panic!("the test configuration has problems: {errors:?}"),
    }
}

/// The process-wide state of a server started with `config` from the file at `config_path`,
/// its audit log and assertion keys in `dir`: the directory in memory, no sockets.
pub fn shared(dir: &Path, config_path: PathBuf, config: Config) -> Shared {
    shared_on(dir, config_path, config, Arc::new(MemoryStorage::default()))
}

/// [`shared`], its directory in `storage`.
pub fn shared_on(
    dir: &Path,
    config_path: PathBuf,
    config: Config,
    storage: Arc<dyn portcullis_scim::store::Storage>,
) -> Shared {
    let kept = Arc::new(Kept::default());
    let sinks = Sinks {
        changes: None,
        entries: Some(kept.clone()),
    };
    let clock = Box::new(time::OffsetDateTime::now_utc);
    let directory = Directory::open_with_sinks(storage, clock, sinks)
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("open the directory: {e}"));
    let log = || crate::audit::Destination::of(dir, None);
    let audit = Audit::open(log(), log())
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("open the audit log: {e}"));
    let signer = Signer::open(dir, crate::clock::now_unix(), crate::assertion::TOKEN_TTL)
        .unwrap_or_else(|e| panic!("open the assertion keys: {e}"));
    let auth = Auth::new(directory.clone(), kept, audit.clone())
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("start sign-in: {e}"));
    let runtime = Runtime::build(config, &directory);
    Shared::new(
        config_path,
        directory,
        None,
        auth,
        Arc::new(signer),
        audit,
        runtime,
    )
}

/// A directory in memory and the SCIM service in front of it.
pub struct World {
    pub directory: Arc<Directory>,
    /// Sessions kept beside the directory, as the server keeps them.
    pub sessions: Sessions,
    scim: ScimService,
    pub config: Config,
    /// Kept as the server keeps them, so every test of the gate also tests that what a user's
    /// requests tell the upstream is never kept past a change.
    forwards: Forwards,
}

impl World {
    pub fn new() -> World {
        World::with(config(""))
    }

    pub fn with(config: Config) -> World {
        let storage = Arc::new(MemoryStorage::default());
        let kept = Arc::new(Kept::default());
        let sinks = Sinks {
            changes: None,
            entries: Some(kept.clone()),
        };
        let clock = Box::new(time::OffsetDateTime::now_utc);
        let directory = match Directory::open_with_sinks(storage, clock, sinks) {
            Ok(directory) => Arc::new(directory),
            Err(e) => panic!("open the directory: {e}"),
        };
        let limits = Limits {
            max_body_bytes: 1 << 20,
            max_bulk_operations: 100,
            max_results: 100,
        };
        World {
            scim: ScimService::new(directory.clone(), limits),
            sessions: Sessions::new(kept, directory.clone()),
            directory,
            config,
            forwards: Forwards::default(),
        }
    }

    pub fn gate(&self) -> Gate<'_> {
        Gate {
            directory: &self.directory,
            identity: &self.config.identity,
            jwt_issuers: &self.config.jwt_issuers,
            current: true,
            now: crate::clock::now_unix(),
            forwards: Some(&self.forwards),
        }
    }

    pub fn runtime(&self) -> Runtime {
        Runtime::build(self.config.clone(), &self.directory)
    }

    /// One SCIM request, as an IdP sends it, with a token that `stands` while it runs.
    pub async fn scim_answer(
        &self,
        method: &Method,
        path: &str,
        body: &Value,
        stands: &(dyn Fn() -> bool + Sync),
    ) -> portcullis_scim::service::ScimResponse {
        let body = body.to_string();
        self.scim
            .handle(ScimRequest {
                method,
                path,
                query: None,
                if_match: None,
                if_none_match: None,
                body: body.as_bytes(),
                base_url: "http://auth.test/scim/v2",
                actor: "test",
                client: None,
                stands,
            })
            .await
    }

    /// One SCIM request, as an IdP sends it; panics unless it succeeds.
    pub async fn scim(&self, method: Method, path: &str, body: Value) -> Value {
        let response = self.scim_answer(&method, path, &body, &|| true).await;
        assert!(
            (200..300).contains(&response.status),
            "SCIM {method} {path} answered {}: {:?}",
            response.status,
            response.body
        );
        response.body.unwrap_or(Value::Null)
    }

    /// Creates a user (userName = email = `name`, externalId `ext-<name>`); returns its id.
    pub async fn user(&self, name: &str) -> String {
        let user = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": name,
            "externalId": format!("ext-{name}"),
            "active": true,
            "emails": [{"type": "work", "value": name, "primary": true}],
        });
        id(&self.scim(Method::POST, "/Users", user).await)
    }

    /// Creates a user with this `externalId` and these `(email, primary)`; returns its id.
    pub async fn user_with_emails(
        &self,
        name: &str,
        external_id: &str,
        emails: &[(&str, bool)],
    ) -> String {
        let emails: Vec<Value> = emails
            .iter()
            .map(|(value, primary)| json!({ "value": value, "primary": primary }))
            .collect();
        let user = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": name,
            "externalId": external_id,
            "emails": emails,
        });
        id(&self.scim(Method::POST, "/Users", user).await)
    }

    /// Creates a group with these member ids; returns its id.
    pub async fn group(&self, name: &str, members: &[&str]) -> String {
        let members: Vec<Value> = members.iter().map(|m| json!({ "value": m })).collect();
        let group = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": name,
            "members": members,
        });
        id(&self.scim(Method::POST, "/Groups", group).await)
    }

    /// Creates an AgenticApplication; returns its id.
    pub async fn application(&self, name: &str) -> String {
        let application = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:AgenticApplication"],
            "name": name,
        });
        id(&self
            .scim(Method::POST, "/AgenticApplications", application)
            .await)
    }

    /// Creates an Agent owned by `owners` (ids), in `applications` (ids), until `expires`
    /// (RFC 3339) if given; returns its id.
    pub async fn agent(
        &self,
        name: &str,
        owners: &[&str],
        applications: &[&str],
        expires: Option<&str>,
    ) -> String {
        const EXTENSION: &str = portcullis_scim::schema::PORTCULLIS_AGENT_SCHEMA;
        let links = |ids: &[&str]| {
            ids.iter()
                .map(|id| json!({ "value": id }))
                .collect::<Vec<_>>()
        };
        let mut extension = json!({ "owners": links(owners), "applications": links(applications) });
        if let Some(at) = expires {
            extension["expires"] = json!(at);
        }
        let agent = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Agent", EXTENSION],
            "name": name,
            EXTENSION: extension,
        });
        id(&self.scim(Method::POST, "/Agents", agent).await)
    }

    /// Sets `active` on the resource at `path` (`/Agents/{id}`, say).
    pub async fn set_active_at(&self, path: &str, active: bool) {
        let ops = json!([{"op": "replace", "path": "active", "value": active}]);
        self.scim(Method::PATCH, path, patch(ops)).await;
    }

    /// The SCIM id of the user `user_name`.
    pub fn id_of(&self, user_name: &str) -> String {
        match self.directory.user_by_name(user_name) {
            Some(status) => portcullis_scim::store::format_id(status.id),
            None => panic!("no user {user_name}"),
        }
    }

    /// Okta's deactivation: a no-path replace of `active`.
    pub async fn set_active(&self, user: &str, active: bool) {
        let ops = json!([{"op": "replace", "value": {"active": active}}]);
        self.scim(Method::PATCH, &format!("/Users/{user}"), patch(ops))
            .await;
    }

    pub async fn remove_member(&self, group: &str, user: &str) {
        let ops = json!([{"op": "remove", "path": format!("members[value eq \"{user}\"]")}]);
        self.scim(Method::PATCH, &format!("/Groups/{group}"), patch(ops))
            .await;
    }

    /// A person signed in as `email` just now (after every change so far).
    pub fn person(&self, email: &str) -> Identity {
        Identity {
            issuer: "http://127.0.0.1:2".to_owned(),
            subject: format!("sub-{email}"),
            email: Some(email.to_owned()),
            email_verified: None,
            name: None,
            idp_session: None,
            created: 0,
            expires: u64::MAX,
            id_token: None,
            directory_seq: self.directory.seq(),
            groups: Vec::new(),
            groups_unlisted: Some(false),
            claims: Default::default(),
        }
    }
}

/// An agent's own client-credentials token: `client_id` names it.
pub fn agent_token(client_id: &str) -> Machine {
    Machine {
        client_id: Some(client_id.to_owned()),
        ..machine(client_id)
    }
}

/// A token delegated to the agent `client_id` by the person `email` (RFC 8693).
pub fn delegated_token(email: &str, client_id: &str) -> Machine {
    let mut claims = crate::caller::Claims::new();
    claims.insert("sub".to_owned(), client_id.to_owned());
    claims.insert("client_id".to_owned(), client_id.to_owned());
    Machine {
        client_id: Some(client_id.to_owned()),
        for_itself: false,
        email: Some(email.to_owned()),
        act: Some(crate::caller::Actor {
            subject: client_id.to_owned(),
            claims,
        }),
        ..machine(&format!("sub-{email}"))
    }
}

/// A machine whose token's `sub` is `subject`.
pub fn machine(subject: &str) -> Machine {
    Machine {
        issuer: "http://127.0.0.1:2".to_owned(),
        subject: subject.to_owned(),
        client_id: None,
        groups: Vec::new(),
        groups_unlisted: false,
        audiences: Vec::new(),
        expires: u64::MAX,
        // Issued after every change so far.
        issued: Some(u64::MAX),
        for_itself: true,
        email: None,
        email_verified: None,
        claims: Default::default(),
        act: None,
        signed: None,
    }
}

/// A SCIM PatchOp message of `ops`.
pub fn patch(ops: Value) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": ops,
    })
}

fn id(resource: &Value) -> String {
    match resource["id"].as_str() {
        Some(id) => id.to_owned(),
        None => panic!("no id in {resource}"),
    }
}
