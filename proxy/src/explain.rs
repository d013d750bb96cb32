//! `portcullis explain`: the decision a person's or an agent's request would get, and the rule
//! behind it, judged by the gate ([`crate::gate`]) against the live directory, exactly as a
//! request is.
//!
//! A running proxy holds the directory's file open, so the command asks it, over the admin
//! listener (`GET /explain?user=…&url=…&method=…`), to judge from memory. With no proxy
//! running, the command opens the directory itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use portcullis_config::{Config, Credential, IdentityClaim, Scheme};
use portcullis_scim::store::postgres::{PgOptions, PgStorage};
use portcullis_scim::store::redb::RedbStorage;
use portcullis_scim::store::{Directory, Storage, StoreError};

use crate::caller::{Actor, Claims, Identity, Machine, Principal};
use crate::gate::{
    Admission, AgentRecord, Client, ClientOf, DirectoryView, Facts, Presented, Refused,
};
use crate::path;
use crate::routes::Match;
use crate::state::Runtime;

/// Longest `user`, `agent`, `url` or `method` accepted.
const MAX_INPUT: usize = 4096;

/// Whose request is explained.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// The person who signs in as this (the value of the claim `[identity]` maps to a
    /// directory user: their email by default), as if they had just signed in.
    Person(&'a str),
    /// The agent whose token's `agent_claim` is `name` (its `name` by default), calling for
    /// itself or, with a delegated token, for the person `on_behalf_of` names (as `Person`).
    Agent {
        name: &'a str,
        on_behalf_of: Option<&'a str>,
    },
    /// A machine calling with its client's own token, whose `machine_claim` is this (what
    /// finds its service account), from a client that is no agent.
    Machine(&'a str),
}

impl Who<'_> {
    fn inputs(&self) -> [Option<&str>; 2] {
        match *self {
            Who::Person(user) | Who::Machine(user) => [Some(user), None],
            Who::Agent { name, on_behalf_of } => [Some(name), on_behalf_of],
        }
    }
}

/// The answer, as printed (or sent as JSON by the admin listener).
#[derive(Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub allowed: bool,
    pub method: String,
    pub url: String,
    /// The URL's path as the proxy normalizes it, what routes and rules are matched against
    /// (none when it refuses the path as it is). Absent from an older server's answer.
    #[serde(default)]
    pub path: Option<String>,
    /// The route the URL is served by, if any.
    pub route: Option<String>,
    /// The directory user the sign-in maps to (for an agent, the person it acts for), as it
    /// is right now.
    pub directory_user: Option<DirectoryView>,
    /// The agent, its owners and whom it acts for, when an agent asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentRecord>,
    /// The deciding rule, when a rule decided.
    pub rule: Option<String>,
    pub reason: String,
}

/// The person who signs in as `user` (the value of the claim `[identity]` maps to a directory
/// user: their email by default), as if they had signed in just now: their sign-in counts from
/// the directory as it is.
fn signed_in_now(runtime: &Runtime, directory: &Directory, user: &str) -> Identity {
    let claim = &runtime.config.identity.claim;
    let (subject, email) = match claim {
        IdentityClaim::Email => (user.to_owned(), Some(user.to_owned())),
        IdentityClaim::Sub | IdentityClaim::Named(_) => (user.to_owned(), None),
    };
    let mut claims = crate::caller::Claims::new();
    if let IdentityClaim::Named(name) = claim {
        claims.insert(name.clone(), user.to_owned());
    }
    Identity {
        issuer: runtime
            .config
            .oidc
            .as_ref()
            .map(|o| o.issuer.clone())
            .unwrap_or_default(),
        subject,
        email,
        email_verified: None,
        name: None,
        idp_session: None,
        created: 0,
        expires: u64::MAX,
        id_token: None,
        directory_seq: directory.seq(),
        groups: Vec::new(),
        groups_unlisted: Some(false),
        claims,
    }
}

/// A verified token of the client `client`, for `subject`, with `claims`; for every audience
/// an issuer takes (whichever a route asks for).
fn client_token(runtime: &Runtime, client: &str, subject: &str, claims: Claims) -> Machine {
    Machine {
        issuer: String::new(),
        subject: subject.to_owned(),
        client_id: Some(client.to_owned()),
        groups: Vec::new(),
        groups_unlisted: false,
        audiences: runtime
            .config
            .jwt_issuers
            .iter()
            .flat_map(|issuer| issuer.audiences.iter().cloned())
            .collect(),
        for_itself: true,
        email: None,
        email_verified: None,
        claims,
        expires: u64::MAX,
        // Issued just now, after every change so far.
        issued: Some(u64::MAX),
        act: None,
        signed: None,
    }
}

/// A client's own token whose `machine_claim` is `value` (and so its `sub` and `client_id`).
fn machine_token(runtime: &Runtime, value: &str) -> Machine {
    let mut claims = Claims::new();
    claims.insert(
        runtime.config.identity.machine_claim.as_str().to_owned(),
        value.to_owned(),
    );
    client_token(runtime, value, value, claims)
}

/// The token an agent presents: its own (client credentials), or one delegated to it by the
/// person `on_behalf_of` names. Its `agent_claim` (and `sub`, `client_id`, and the
/// `machine_claim` a client's token carries, by which a name no agent has finds its service
/// account) is `name`.
fn agent_token(runtime: &Runtime, name: &str, on_behalf_of: Option<&str>) -> Machine {
    let identity = &runtime.config.identity;
    let mut agent_claims = Claims::new();
    let claims = [
        "sub",
        "client_id",
        identity.agent_claim.as_str(),
        identity.machine_claim.as_str(),
    ];
    for claim in claims {
        agent_claims.insert(claim.to_owned(), name.to_owned());
    }
    let token = |subject: &str, claims: Claims| client_token(runtime, name, subject, claims);
    let Some(person) = on_behalf_of else {
        return token(name, agent_claims);
    };
    // Delegated: the person by the `[identity]` mapping of a person's bearer token, the agent
    // as the actor.
    let mut claims = Claims::new();
    if let IdentityClaim::Named(claim) = &identity.bearer_claim {
        claims.insert(claim.clone(), person.to_owned());
    }
    Machine {
        for_itself: false,
        email: (identity.bearer_claim == IdentityClaim::Email).then(|| person.to_owned()),
        act: Some(Actor {
            subject: name.to_owned(),
            claims: agent_claims,
        }),
        ..token(person, claims)
    }
}

/// Why the proxy refuses a request of `method` before it asks who calls, and with what
/// status: one in lower case (Go and PHP do not read `get` as `GET`), or one the upstream
/// echoes (TRACE).
pub fn refuses_method(method: &str) -> Option<(u16, String)> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Some((
            400,
            format!(
                "{method} is a method in lower case, which Go and PHP do not read as its \
                 upper-case one"
            ),
        ));
    }
    crate::proxy::echoes_request(method).then(|| {
        (
            405,
            format!("{method} has the upstream echo what it is told"),
        )
    })
}

/// Judges `method url` for `who`, as if they had just signed in (or presented a token), as
/// the proxy would: with the directory current, or not for the reason `out_of_touch` gives
/// (see [`crate::state::Shared::out_of_touch`]).
pub fn explain(
    runtime: &Runtime,
    directory: &Directory,
    out_of_touch: Option<&str>,
    who: Who<'_>,
    url: &str,
    method: &str,
) -> Result<Explanation, String> {
    let [first, second] = who.inputs();
    let too_long = |input: Option<&str>| input.is_some_and(|i| i.is_empty() || i.len() > MAX_INPUT);
    if first.is_none() || too_long(first) || too_long(second) || url.len() > MAX_INPUT {
        return Err("user (or agent) and url must be given, each at most 4096 bytes".to_owned());
    }
    let method = method.to_owned();
    let parsed = Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let scheme = match parsed.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err(format!(
                "{url:?}: the scheme must be http or https, not {other}"
            ))
        }
    };
    // The host and the path are read from the same text: `http:/host/p` or `http://host\p`,
    // which the URL parser (and a browser) reads as `host` and `/p`, would be judged at
    // another path than a client sends.
    // So are an empty host (`http:///host/p`) and spaces and control characters, which the
    // parser drops.
    let typed = url.split_once(':').map_or("", |(_, rest)| rest);
    let authority = typed
        .strip_prefix("//")
        .and_then(|rest| rest.split(['/', '?', '#']).next());
    let dropped = url.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if dropped || authority.is_none_or(|authority| authority.is_empty() || authority.contains('\\'))
    {
        return Err(format!(
            "{url:?}: write it as a client sends it, `{}://host/path`",
            parsed.scheme()
        ));
    }
    let host = match parsed.host() {
        Some(url::Host::Ipv6(address)) => format!("[{address}]"),
        Some(_) => parsed.host_str().unwrap_or_default().to_ascii_lowercase(),
        None => return Err(format!("{url:?} has no host")),
    };
    let gate = crate::gate::Gate {
        directory,
        identity: &runtime.config.identity,
        jwt_issuers: &runtime.config.jwt_issuers,
        current: out_of_touch.is_none(),
        now: crate::clock::now_unix(),
        forwards: None,
    };
    let mut answer = Explanation {
        allowed: false,
        method: method.clone(),
        url: url.to_owned(),
        path: None,
        route: None,
        directory_user: None,
        agent: None,
        rule: None,
        reason: String::new(),
    };
    // The path exactly as typed, normalized by the proxy's one function (the URL parser's
    // own clean-up would hide what a client can send), and what the proxy refuses before it
    // asks who calls.
    let query = url
        .split('#')
        .next()
        .and_then(|url| url.split_once('?'))
        .map(|(_, query)| query);
    let normalized = path::normalize(raw_path(url));
    answer.path = normalized.as_ref().ok().map(|path| path.to_string());
    let target = match (refuses_method(&method), normalized) {
        (Some((status, why)), _) => Err(format!("refused with {status}: {why}")),
        (None, Err(e)) => Err(format!("refused with 400: {e}")),
        (None, Ok(path)) if path.starts_with("/.portcullis/") => Err(
            "not a route's: Portcullis' own endpoint (/.portcullis/), which explain does \
                 not judge"
                .to_owned(),
        ),
        (None, Ok(path))
            if runtime
                .scim
                .as_ref()
                .is_some_and(|s| s.claims(&host, &path)) =>
        {
            Err("not a route's: the SCIM endpoint, which explain does not judge".to_owned())
        }
        (None, Ok(path)) => match runtime.routes.find(scheme, &host, &path) {
            Match::Found(route) => match runtime.routes.refuses(scheme, &host, route, &path, query)
            {
                Some(why) => {
                    answer.route = Some(route.config.name.clone());
                    Err(format!("refused with 400: {why}"))
                }
                None => Ok((route, path.into_owned())),
            },
            Match::WrongScheme(route) => {
                answer.route = Some(route.config.name.clone());
                Err(format!(
                    "route {} serves this address over the other scheme only",
                    route.config.name
                ))
            }
            Match::None => Err("no route serves this address (404)".to_owned()),
        },
    };
    // A name no agent has is judged as the gate judges such a token: a client that is no
    // agent, found as a user (its service account) if one has the name.
    let unknown_agent = match who {
        Who::Agent {
            name,
            on_behalf_of: None,
        } => (!gate.agent_known(name)).then_some(name),
        _ => None,
    };
    let (view, judged) = with_principal(runtime, directory, who, |principal| {
        let view = match who {
            Who::Agent {
                on_behalf_of: None, ..
            } if unknown_agent.is_none() => None,
            _ => gate.directory_view(principal),
        };
        let judged = target.map(|(route, path)| {
            let facts = Facts {
                route: &route.config,
                method: &method,
                path: &path,
                client: ClientOf::Known(Client::Browser),
            };
            let presented = presented(runtime, scheme, principal);
            (route, gate.explain(&facts, presented))
        });
        (view, judged)
    });
    answer.directory_user = view;
    let (route, admission) = match judged {
        Ok(judged) => judged,
        Err(reason) => {
            answer.reason = reason;
            return Ok(answer);
        }
    };
    answer.route = Some(route.config.name.clone());
    match admission {
        Admission::Allow(pass) => {
            answer.allowed = true;
            answer.agent = pass.forward.and_then(|f| f.agent);
            if let Some(why) = pass.why {
                answer.rule = why.rule;
                answer.reason = why.reason;
            }
        }
        Admission::Refuse(Refused::Forbid(refusal)) => {
            answer.rule = refusal.rule;
            answer.reason = refusal.reason;
            answer.agent = refusal.agent;
        }
        Admission::Refuse(Refused::Unavailable) => {
            answer.reason = format!("refused with 503: {}", out_of_touch.unwrap_or_default());
        }
        Admission::Refuse(Refused::SignIn { .. } | Refused::Challenge { .. })
            if !runtime.takes_credentials(scheme)
                && route.config.accept.contains(&match who {
                    Who::Person(_) => Credential::Session,
                    _ => Credential::Bearer,
                }) =>
        {
            answer.reason = "refused: plain HTTP off loopback, where every listener that \
                             serves it refuses sign-ins, sessions and bearer tokens (they would \
                             cross the network in clear); serve it over TLS (an https route), \
                             or set allow_plain_http on its listener, on a network you trust"
                .to_owned();
        }
        // Someone who has just signed in is asked to sign in only where people cannot; an
        // agent's token, only where bearer tokens are not taken.
        Admission::Refuse(Refused::SignIn { .. } | Refused::Challenge { .. }) => {
            answer.reason = match who {
                Who::Person(_) => format!(
                    "route {} takes bearer tokens only: people cannot sign in to it",
                    route.config.name
                ),
                Who::Agent { .. } | Who::Machine(_) => format!(
                    "route {} does not take bearer tokens: {} cannot call it",
                    route.config.name,
                    if matches!(who, Who::Machine(_)) {
                        "machines"
                    } else {
                        "agents"
                    }
                ),
            };
        }
    }
    if let Some(name) = unknown_agent {
        answer.reason = format!(
            "no agent has the {} \"{name}\": judged as a client that is no agent; {}",
            runtime.config.identity.agent_scim_attribute.as_str(),
            answer.reason
        );
    }
    Ok(answer)
}

/// Calls `f` with what `who` presents: a person as if they had just signed in, or an agent's
/// token (see [`Who`]).
fn with_principal<R>(
    runtime: &Runtime,
    directory: &Directory,
    who: Who<'_>,
    f: impl FnOnce(Principal<'_>) -> R,
) -> R {
    match who {
        Who::Person(user) => f(Principal::Person(&signed_in_now(runtime, directory, user))),
        Who::Machine(value) => f(Principal::Machine(&machine_token(runtime, value))),
        Who::Agent { name, on_behalf_of } => f(Principal::Machine(&agent_token(
            runtime,
            name,
            on_behalf_of,
        ))),
    }
}

/// Whether `route` lets `who` in for `method path` (normalized), judged by the gate exactly
/// as [`explain`] judges: the console's "who can reach" asks this of every user and agent.
pub fn lets_in(
    runtime: &Runtime,
    gate: &crate::gate::Gate<'_>,
    who: Who<'_>,
    route: &portcullis_config::Route,
    method: &str,
    path: &str,
) -> bool {
    let facts = Facts {
        route,
        method,
        path,
        client: ClientOf::Known(Client::Browser),
    };
    let scheme = route.scheme;
    with_principal(runtime, gate.directory, who, |principal| {
        matches!(
            gate.admit(&facts, presented(runtime, scheme, principal)),
            Admission::Allow(_)
        )
    })
}

/// What `principal` presents on a request of `scheme`: nothing that verifies where the proxy
/// refuses credentials on every listener that could take it ([`Runtime::takes_credentials`]).
fn presented<'a>(runtime: &Runtime, scheme: Scheme, principal: Principal<'a>) -> Presented<'a> {
    match principal {
        _ if runtime.takes_credentials(scheme) => Presented::Caller(principal),
        Principal::Person(_) => Presented::Nothing,
        Principal::Machine(_) => Presented::Invalid { bearer: true },
    }
}

/// `portcullis explain`: asks the running proxy over its admin listener, or, when none is
/// running, opens the directory in `data_dir` and judges from it.
pub fn run_cli(
    config: Config,
    who: Who<'_>,
    url: &str,
    method: &str,
) -> Result<Explanation, String> {
    if let Some(admin) = &config.admin {
        let token = admin.token.as_ref().map(|t| t.secret.expose());
        match ask_running(admin.address, token, who, url, method)? {
            Some(answer) => return Ok(answer),
            None => tracing::debug!("no proxy answers on the admin listener"),
        }
    }
    let storage: Arc<dyn Storage> = match &config.postgres {
        Some(postgres) => {
            let fail = |e: StoreError| format!("cannot open the directory in PostgreSQL: {e}");
            let storage = PgStorage::open(&PgOptions {
                url: postgres.url.expose().to_owned(),
                pool_size: 1,
                max_staleness: postgres.max_staleness,
            })
            .map_err(fail)?;
            // Read as this build reads its own schema, a newer one's rows could be misjudged.
            if !storage.check_schema().map_err(fail)? {
                return Err(
                    "no directory in PostgreSQL yet: a replica makes it at its first \
                     start, and the IdP fills it; explain judges from it, and makes none"
                        .to_owned(),
                );
            }
            Arc::new(storage)
        }
        // Opening makes a directory where there is none: an empty one to judge from, and a
        // file of the user running this (root, say) that the service could not open.
        None if config
            .data_dir
            .join(portcullis_scim::store::redb::FILE)
            .try_exists()
            .is_ok_and(|exists| !exists) =>
        {
            return Err(format!(
                "no directory in {}: Portcullis makes it at its first start there, and the IdP \
                 fills it; explain judges from it, and makes none",
                config.data_dir.display()
            ))
        }
        None => Arc::new(
            RedbStorage::open_as_is(&config.data_dir).map_err(|e| match e {
                // Upgraded, the build that wrote it could no longer open it.
                StoreError::Version { found, expected } if found < expected => format!(
                    "cannot open the directory in {}: {e}; explain upgrades none (this build's \
                 Portcullis does, at its start)",
                    config.data_dir.display()
                ),
                e @ StoreError::Version { .. } => {
                    format!(
                        "cannot open the directory in {}: {e}",
                        config.data_dir.display()
                    )
                }
                e @ StoreError::Held(_) => format!(
                    "cannot open the directory in {}: {e}\n(a running Portcullis holds it: give \
                     it an [admin] listener and explain asks it instead)",
                    config.data_dir.display()
                ),
                e => format!(
                    "cannot open the directory in {}: {e}",
                    config.data_dir.display()
                ),
            })?,
        ),
    };
    let directory = Arc::new(
        Directory::open(storage, Box::new(time::OffsetDateTime::now_utc))
            .map_err(|e| format!("cannot load the directory: {e}"))?,
    );
    let runtime = Runtime::build(config, &directory);
    // Just loaded from the store: current.
    explain(&runtime, &directory, None, who, url, method)
}

/// The running proxy's answer, or `None` when nothing listens on `admin`.
fn ask_running(
    admin: SocketAddr,
    token: Option<&str>,
    who: Who<'_>,
    url: &str,
    method: &str,
) -> Result<Option<Explanation>, String> {
    let mut admin = admin;
    if admin.ip().is_unspecified() {
        admin.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    match who {
        Who::Person(user) => query.append_pair("user", user),
        Who::Machine(machine) => query.append_pair("machine", machine),
        Who::Agent { name, on_behalf_of } => {
            query.append_pair("agent", name);
            match on_behalf_of {
                Some(user) => query.append_pair("on_behalf_of", user),
                None => &mut query,
            }
        }
    };
    let query = query
        .append_pair("url", url)
        .append_pair("method", method)
        .finish();
    let endpoint = format!("http://{admin}/explain?{query}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let mut request = client.get(&endpoint);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_connect() => return Ok(None),
            Err(e) => return Err(format!("the admin listener at {admin} did not answer: {e}")),
        };
        let status = response.status();
        let body = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            // Shown on a terminal: whatever answers there (not Portcullis, perhaps) writes no
            // control sequence to it.
            let body = crate::human::printable(body.trim());
            return Err(format!("{admin} answered {status}: {body}"));
        }
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| format!("{admin} answered something else than an explanation: {e}"))
    })
}

/// The path of `url` as written: after the authority, before any `?` or `#`.
fn raw_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    rest.find('/').map_or("/", |slash| &rest[slash..])
}

impl Explanation {
    /// The answer as JSON, for a terminal as well as a program: with the characters that move
    /// a terminal (names come from the directory: any character) escaped, as `audit --json`
    /// prints them.
    pub fn to_json(&self) -> Result<String, String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        Ok(crate::logging::json_text_shown(text))
    }
}

/// What a person reads on a terminal (names come from the directory: any character).
impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::human::printable as p;
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        writeln!(f, "{verdict} {} {}", p(&self.method), p(&self.url))?;
        if let Some(path) = &self.path {
            writeln!(f, "  path:   {}", p(path))?;
        }
        writeln!(
            f,
            "  route:  {}",
            p(self.route.as_deref().unwrap_or("(none)"))
        )?;
        match &self.directory_user {
            Some(user) => writeln!(
                f,
                "  user:   {} ({}; groups: {})",
                p(&user.user_name),
                if user.active { "active" } else { "inactive" },
                if user.groups.is_empty() {
                    "none".to_owned()
                } else {
                    p(&user.groups.join(", ")).into_owned()
                }
            )?,
            None if self.agent.is_some() => {}
            None => writeln!(f, "  user:   not in the directory")?,
        }
        if let Some(agent) = &self.agent {
            writeln!(f, "  agent:  {}", p(&agent.human()))?;
        }
        writeln!(
            f,
            "  rule:   {}",
            p(self.rule.as_deref().unwrap_or("(none)"))
        )?;
        write!(f, "  reason: {}", p(&self.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::World;

    const ALICE: &str = "alice@corp.example";

    async fn world() -> World {
        let world = World::new();
        let alice = world.user(ALICE).await;
        world.group("eng", &[&alice]).await;
        world
    }

    fn ask(world: &World, user: &str, url: &str, method: &str) -> Explanation {
        match explain(
            &world.runtime(),
            &world.directory,
            None,
            Who::Person(user),
            url,
            method,
        ) {
            Ok(answer) => answer,
            Err(e) => panic!("{user} {method} {url}: {e}"),
        }
    }

    #[test]
    fn a_data_dir_without_a_directory_is_left_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::testing::config("");
        config.data_dir = dir.path().to_owned();
        let refused = run_cli(config, Who::Person(ALICE), "http://app.test/", "GET");
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.starts_with("no directory in")),
            "{:?}",
            refused.map(|e| e.allowed)
        );
        let file = dir.path().join(portcullis_scim::store::redb::FILE);
        assert!(!file.exists());
    }

    /// The service of the build that wrote an older directory must still open it: explain,
    /// run beside it, neither upgrades it nor says a running Portcullis holds it. A newer one
    /// it refuses too, without saying this build's start would upgrade it.
    #[test]
    fn a_directory_of_another_schema_is_refused_and_left_as_it_is() {
        use redb::ReadableDatabase;
        // An older schema, which this build's start would upgrade; a newer, which it refuses.
        let this = portcullis_scim::store::redb::SCHEMA_VERSION;
        for (version, upgraded_at_start) in [(this - 1, true), (this + 1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join(portcullis_scim::store::redb::FILE);
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let db = redb::Database::create(&file).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(meta)
                .unwrap()
                .insert("schema_version", version)
                .unwrap();
            txn.commit().unwrap();
            drop(db);
            let mut config = crate::testing::config("");
            config.data_dir = dir.path().to_owned();
            let refused = run_cli(config, Who::Person(ALICE), "http://app.test/", "GET");
            let said = |e: &String| {
                e.contains(&format!("schema version {version}"))
                    && e.contains("explain upgrades none") == upgraded_at_start
                    && !e.contains("a running Portcullis holds it")
            };
            assert!(
                refused.as_ref().is_err_and(said),
                "{version}: {:?}",
                refused.map(|e| e.allowed)
            );
            let db = redb::Database::open(&file).unwrap();
            let kept = db.begin_read().unwrap().open_table(meta).unwrap();
            assert_eq!(
                kept.get("schema_version").unwrap().unwrap().value(),
                version
            );
        }
    }

    #[test]
    fn the_path_is_taken_as_written() {
        assert_eq!(raw_path("https://app.example"), "/");
        assert_eq!(
            raw_path("https://app.example/x/../admin?a=/b"),
            "/x/../admin"
        );
        assert_eq!(raw_path("https://app.example//admin#/frag"), "//admin");
        assert_eq!(raw_path("http://app.example:8080/%61dmin"), "/%61dmin");
    }

    #[tokio::test]
    async fn an_allow_names_the_route_the_user_and_the_rule() {
        let world = world().await;
        let answer = ask(&world, ALICE, "http://app.test/work", "GET");
        assert!(answer.allowed);
        assert_eq!(answer.method, "GET");
        assert_eq!(answer.route.as_deref(), Some("http://app.test"));
        assert_eq!(answer.rule.as_deref(), Some("routes[0].allow[0]"));
        let user = answer
            .directory_user
            .clone()
            .expect("alice is in the directory");
        assert_eq!((user.user_name.as_str(), user.active), (ALICE, true));
        assert_eq!(user.groups, ["eng"]);
        assert!(answer
            .to_string()
            .starts_with("ALLOW GET http://app.test/work"));
    }

    /// Where every plain listener is off loopback, without TLS in front or
    /// `allow_plain_http`, the proxy refuses the credentials an http route's callers present
    /// (they would cross the network in clear): explain says so, and only what is public
    /// is let in, as the console's lists say.
    #[tokio::test]
    async fn credentials_in_clear_off_loopback_let_no_one_in() {
        // Where plain HTTP is allowed, a person, a machine and an agent of eng are let in;
        // where it is not, none of them, but where the route is open to anyone.
        for (config, in_clear) in crate::testing::off_loopback() {
            let world = World::with(config);
            let alice = world.user(ALICE).await;
            world.group("eng", &[&alice]).await;
            world.agent("helper", &[&alice], &[], None).await;
            let ask = |who, url| {
                explain(&world.runtime(), &world.directory, None, who, url, "GET").unwrap()
            };
            let helper = Who::Agent {
                name: "helper",
                on_behalf_of: None,
            };
            for (who, url) in [
                (Who::Person(ALICE), "http://app.test/work"),
                (Who::Machine(ALICE), "http://app.test/work"),
                (helper, "http://bots.test/x"),
            ] {
                let answer = ask(who, url);
                assert_eq!(answer.allowed, !in_clear, "{answer}");
                if in_clear {
                    assert!(
                        answer.reason.contains("plain HTTP off loopback"),
                        "{answer}"
                    );
                }
            }
            for who in [Who::Person(ALICE), Who::Machine(ALICE), helper] {
                let public = ask(who, "http://app.test/public");
                assert!(public.allowed, "{public}");
            }
            if !in_clear {
                continue;
            }
            // A caller the route takes no credential of is told so, not of plain HTTP: over
            // TLS it would still be refused.
            let answer = ask(Who::Person(ALICE), "http://api.test/x");
            assert!(
                answer.reason.contains("takes bearer tokens only"),
                "{answer}"
            );
            let answer = ask(Who::Machine(ALICE), "http://odysseus.test/x");
            assert!(
                answer.reason.contains("does not take bearer tokens"),
                "{answer}"
            );
        }
    }

    /// A name no agent has is judged as the proxy judges its token, as a client that is no
    /// agent (a service account of that name here), and explain says so.
    #[tokio::test]
    async fn a_name_no_agent_has_is_said_to_be_judged_as_a_client() {
        let world = World::new();
        let alice = world.user(ALICE).await;
        let bot = world.user("build-bot").await;
        world.group("eng", &[&alice, &bot]).await;
        let owner = world.id_of(ALICE);
        world.agent("helper", &[&owner], &[], None).await;
        let ask_agent = |name| {
            let who = Who::Agent {
                name,
                on_behalf_of: None,
            };
            explain(
                &world.runtime(),
                &world.directory,
                None,
                who,
                "http://api.test/x",
                "GET",
            )
            .unwrap()
        };
        let answer = ask_agent("build-bot");
        assert!(
            answer
                .reason
                .starts_with("no agent has the name \"build-bot\": judged as a client"),
            "{answer}"
        );
        let user = answer.directory_user.as_ref().map(|u| u.user_name.as_str());
        assert_eq!(user, Some("build-bot"), "{answer}");
        assert!(
            !answer.to_string().contains("not in the directory"),
            "{answer}"
        );
        let answer = ask_agent("helper");
        assert!(!answer.reason.contains("no agent"), "{answer}");
    }

    /// Where a client's token names its service account by a claim of its own (`azp`, or
    /// Entra's `oid`), a name no agent has finds that account as the proxy would.
    #[tokio::test]
    async fn a_name_no_agent_has_finds_its_service_account_by_the_machine_claim() {
        let world = World::with(crate::testing::config(
            "[identity]\nmachine_claim = \"azp\"",
        ));
        world.user("build-bot").await;
        let who = Who::Agent {
            name: "build-bot",
            on_behalf_of: None,
        };
        let runtime = world.runtime();
        let url = "http://api.test/x";
        let answer = explain(&runtime, &world.directory, None, who, url, "GET").unwrap();
        let user = answer.directory_user.as_ref().map(|u| u.user_name.as_str());
        assert_eq!(user, Some("build-bot"), "{answer}");
        assert!(!answer.reason.contains("carries no"), "{answer}");
    }

    #[tokio::test]
    async fn the_path_is_judged_as_the_proxy_normalizes_it() {
        let world = world().await;
        for url in [
            "http://app.test/admin",
            "http://app.test/x/../admin",
            "http://app.test//admin",
            "http://app.test/%61dmin/users",
        ] {
            let answer = ask(&world, ALICE, url, "POST");
            assert!(!answer.allowed, "{url}");
            assert_eq!(answer.rule.as_deref(), Some("routes[0].deny"), "{url}");
            // And says how it read the path.
            let path = answer.path.as_deref().unwrap_or_default();
            assert!(path.starts_with("/admin"), "{url}: {path}");
            assert!(answer
                .to_string()
                .contains(&format!("\n  path:   {path}\n")));
        }
        let answer = ask(&world, ALICE, "http://app.test/admin%2fx", "GET");
        assert!(
            answer.reason.starts_with("refused with 400"),
            "{}",
            answer.reason
        );
        // A URL a browser reads otherwise than it is written is not judged at all.
        for url in [
            "http:/app.test/admin",
            "http:app.test/admin",
            "http://app.test\\admin",
            "http:\\\\app.test\\admin",
            "http:///app.test/admin",
            "http:////app.test/admin",
            "http://\t/app.test/admin",
            " http://app.test/ad\nmin",
        ] {
            let runtime = world.runtime();
            let who = Who::Person(ALICE);
            let refused = explain(&runtime, &world.directory, None, who, url, "POST");
            assert!(
                refused.is_err_and(|e| e.contains("as a client sends it")),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn strangers_and_unserved_addresses_are_explained() {
        let world = world().await;
        let answer = ask(&world, "mallory@example.com", "http://app.test/work", "GET");
        assert!(!answer.allowed);
        assert!(answer.directory_user.is_none());
        assert!(answer.reason.contains("not a user in the directory"));
        let answer = ask(&world, ALICE, "http://nowhere.test/", "GET");
        assert!(answer.reason.contains("no route serves this address"));
        let answer = ask(&world, ALICE, "https://app.test/", "GET");
        assert!(
            answer.reason.contains("over the other scheme only"),
            "{}",
            answer.reason
        );
    }

    /// An IPv6 route is found whichever way the URL spells its address (a browser writes
    /// `::ffff:10.0.0.1` as `::ffff:a00:1`), as the proxy finds it.
    #[tokio::test]
    async fn an_ipv6_route_is_found_in_any_spelling() {
        let world = World::with(crate::testing::config(
            "[[routes]]\nfrom = \"http://[::ffff:10.0.0.1]\"\nto = [\"http://127.0.0.1:3\"]\nallow = { groups = [\"eng\"] }\n",
        ));
        let alice = world.user(ALICE).await;
        world.group("eng", &[&alice]).await;
        for url in ["http://[::ffff:10.0.0.1]/x", "http://[0::ffff:a00:1]/x"] {
            let answer = ask(&world, ALICE, url, "GET");
            assert!(answer.allowed, "{url}: {}", answer.reason);
            assert_eq!(answer.route.as_deref(), Some("http://[::ffff:10.0.0.1]"));
        }
    }

    #[tokio::test]
    async fn people_cannot_sign_in_to_a_route_for_bearer_tokens() {
        let world = world().await;
        let answer = ask(&world, ALICE, "http://api.test/v1", "GET");
        assert!(!answer.allowed);
        assert!(
            answer.reason.contains("takes bearer tokens only"),
            "{}",
            answer.reason
        );
    }

    #[tokio::test]
    async fn public_addresses_are_open_to_anyone_and_others_on_a_public_route_are_not() {
        let world = world().await;
        let open = ask(
            &world,
            "anyone@example.com",
            "http://open.test/open/x",
            "GET",
        );
        assert!(open.allowed);
        assert_eq!(open.rule.as_deref(), Some("routes[2].allow"));
        let closed = ask(
            &world,
            "anyone@example.com",
            "http://open.test/closed",
            "GET",
        );
        assert!(!closed.allowed);
        assert_eq!(closed.reason, "this address is not public");
    }

    #[tokio::test]
    async fn a_change_in_the_directory_shows_at_once() {
        let world = world().await;
        assert!(ask(&world, ALICE, "http://app.test/work", "GET").allowed);
        world.set_active(&world.id_of(ALICE), false).await;
        let answer = ask(&world, ALICE, "http://app.test/work", "GET");
        assert!(!answer.allowed);
        assert!(answer.reason.contains("deactivated"), "{}", answer.reason);
        assert!(
            answer.to_string().contains("(inactive; groups: eng)"),
            "{answer}"
        );
    }

    /// Names from the directory are shown with their control characters escaped: a group's
    /// name cannot move the terminal's cursor over the verdict.
    #[tokio::test]
    async fn names_are_printed_with_their_control_characters_escaped() {
        let world = World::new();
        let alice = world.user(ALICE).await;
        world.group("ops\u{1b}[2A\r\u{1b}[2KALLOW", &[&alice]).await;
        let text = ask(&world, ALICE, "http://app.test/work", "GET").to_string();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.contains("\\u{1b}[2A\\r"), "{text}");
        // So are the route's and the rule's, as a running proxy (or whatever answers on its
        // admin address) sends them.
        let sent = Explanation {
            route: Some("http://app.test\u{1b}[2A".to_owned()),
            rule: Some("routes[0]\u{1b}[2K".to_owned()),
            ..ask(&world, ALICE, "http://app.test/work", "GET")
        };
        let text = sent.to_string();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        // And as JSON, the same answer, its direction marks and controls escaped.
        let mut marked = ask(&world, ALICE, "http://app.test/work", "GET");
        marked.reason = "ops\u{202e}\u{9b}31m\u{7f}".to_owned();
        let json = marked.to_json().unwrap();
        let shown = |c: char| c == '\n' || !crate::human::hidden(c);
        assert!(json.chars().all(shown), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["reason"], "ops\u{202e}\u{9b}31m\u{7f}");
    }

    /// What the proxy refuses before it asks who calls, explain refuses too, and it judges as
    /// the proxy does when the directory is not current, in the proxy's words.
    #[tokio::test]
    async fn what_the_proxy_refuses_before_the_gate_is_refused_here_too() {
        let world = world().await;
        let refused = |url: &str, method: &str| ask(&world, ALICE, url, method).reason;
        // /v1/ is a route of its own (bearer tokens only): a PHP front controller on app.test
        // would serve it past that route's rules.
        assert!(ask(&world, ALICE, "http://app.test/index.php/work", "GET").allowed);
        let why = refused("http://app.test/index.php/v1/builds", "GET");
        assert!(why.contains("PHP front controller"), "{why}");
        let why = refused("http://app.test/work", "TRACE");
        assert!(why.starts_with("refused with 405"), "{why}");
        for method in ["get", "patch", "trace"] {
            let why = refused("http://app.test/work", method);
            assert!(why.starts_with("refused with 400"), "{why}");
        }
        let why = refused("http://app.test/.portcullis/me", "GET");
        assert!(why.contains("Portcullis' own endpoint"), "{why}");
        for why in [crate::proxy::LOST_TOUCH, crate::proxy::NEEDS_RESTART] {
            let stale = explain(
                &world.runtime(),
                &world.directory,
                Some(why),
                Who::Person(ALICE),
                "http://app.test/work",
                "GET",
            )
            .unwrap();
            assert!(!stale.allowed);
            assert_eq!(stale.reason, format!("refused with 503: {why}"));
        }
    }

    #[tokio::test]
    async fn bad_questions_are_errors() {
        let world = world().await;
        let runtime = world.runtime();
        let err = |user: &str, url: &str| {
            explain(
                &runtime,
                &world.directory,
                None,
                Who::Person(user),
                url,
                "GET",
            )
        };
        assert!(err("", "http://app.test/").is_err());
        assert!(err(ALICE, "ftp://app.test/").is_err());
        assert!(err(ALICE, "not a url").is_err());
        assert!(err(ALICE, &format!("http://app.test/{}", "a".repeat(5000))).is_err());
    }
}
