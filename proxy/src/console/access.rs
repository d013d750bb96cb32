//! Who can reach what: each route's rules and the users and agents they let in, the routes a
//! user can reach, and the inline explain form. Every answer is the gate's: people are judged
//! by [`admits_person`] (what the gate answers for someone who has just signed in, from the
//! index, so a million users take a moment), agents as `portcullis explain` judges them
//! ([`crate::explain::lets_in`]). The e2e tests hold the console's lists to `explain`'s
//! answers for every user.

use portcullis_config::{AgentAttribute, Credential, Route};
use portcullis_policy::{Request, RuleSpec};
use portcullis_scim::schema::ResourceType;
use portcullis_scim::store::{format_id, AgentEntry, Id, Index, Row};

use super::{
    count, escape, field, flag, link, page_skip, pager, Console, Params, Shown, PAGE_SIZE,
};
use crate::explain::{explain, lets_in, Who};
use crate::gate::{admits_machine, admits_person, Gate};
use crate::path;
use crate::routes::Match;

/// Most group members [`named_users`] walks in one read of the index. Past it the groups are
/// large, and everyone is judged instead, a few thousand at a time: a million-member group
/// walked at once would hold up SCIM writes, and the requests waiting behind them. (A group's
/// members are a hash set, walked whole or not at all; judging everyone costs more in a large
/// directory, on up to four cores, and holds up nobody.)
const NAMED_WALK: usize = 4_096;

/// Every user an allow rule of `route` could let in, in no order and perhaps more than once
/// (sorted by the caller, once the index is no longer held), when its rules name only groups
/// (`groups`, `group_ids`: their members, through nested groups too) of at most `walk` members
/// in all, and users (`users`); `None` when a rule may let in anyone (`any_signed_in`,
/// `email_domains`, `machines`, `public`) or the groups hold more. Agent criteria let in no
/// user.
fn named_users(route: &Route, index: &Index, walk: usize) -> Option<Vec<Row>> {
    let mut groups: Vec<Row> = Vec::new();
    let mut users: Vec<Row> = Vec::new();
    for rule in &route.allow {
        if rule.any_signed_in || rule.public || rule.machines || !rule.email_domains.is_empty() {
            return None;
        }
        for name in &rule.groups {
            groups.extend(index.group_by_folded_name(&portcullis_policy::fold(name)));
        }
        for id in &rule.group_ids {
            groups.extend(index.groups_by_external_id(id));
        }
        for name in &rule.users {
            users.extend(index.user_by_folded_name(&portcullis_policy::fold(name)));
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut walked = 0usize;
    while let Some(group) = groups.pop() {
        if !seen.insert(group) {
            continue;
        }
        walked = walked.saturating_add(index.member_count(group));
        if walked > walk {
            return None;
        }
        for member in index.members_of(group) {
            if index.group(member).is_some() {
                groups.push(member);
            } else if index.user(member).is_some() {
                users.push(member);
            }
        }
    }
    Some(users)
}

fn agent_presents(attribute: AgentAttribute, agent: &AgentEntry) -> Option<String> {
    match attribute {
        AgentAttribute::Name => Some(agent.name.to_string()),
        AgentAttribute::ExternalId => agent.external_id.as_deref().map(str::to_owned),
    }
}

/// The users and agents a route lets in for one request, in creation order: users by row
/// (named only for the page shown) with how they get in, agents by `(id, name)`.
pub struct Reach {
    pub users: Vec<(Row, Via)>,
    pub agents: Vec<(Id, String)>,
}

/// How a user gets in: signed in as a person, with a machine token as a service account, or
/// either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via {
    pub person: bool,
    pub machine: bool,
}

impl Via {
    fn words(self) -> &'static str {
        match (self.person, self.machine) {
            (true, true) => "signed in, or as a machine",
            (true, false) => "signed in",
            _ => "as a machine",
        }
    }
}

/// The request a route page judges: a method and a normalized path.
struct Asked {
    method: String,
    path: String,
    /// Why the proxy refuses `path` before it asks who calls, if it does.
    refused: Option<String>,
}

impl Console {
    #[cfg(test)]
    pub(super) fn gate_for_tests(&self) -> Gate<'_> {
        self.gate()
    }

    fn gate(&self) -> Gate<'_> {
        Gate {
            directory: &self.directory,
            identity: &self.runtime.config.identity,
            jwt_issuers: &self.runtime.config.jwt_issuers,
            current: true,
            now: u64::try_from(self.now).unwrap_or_default(),
            forwards: None,
        }
    }

    /// Who `route` lets in for `method path`: every user of the directory, each judged as the
    /// gate judges a person who has just signed in ([`admits_person`]), and every agent, each
    /// judged by the gate as `explain` judges it.
    ///
    /// When the route's allow rules name only groups and users, only their members can get in,
    /// and only they are judged; otherwise everyone is.
    pub fn reach(&self, route: &Route, method: &str, path: &str) -> Reach {
        let identity = &self.runtime.config.identity;
        let request = Request { method, path };
        let machines = route.accept.contains(&Credential::Bearer);
        let in_clear = self.in_clear(route, &request);
        let judge = |index: &Index, row: Row, users: &mut Vec<(Row, Via)>| {
            let via = match in_clear {
                Some(anyone) => Via {
                    person: anyone,
                    machine: machines && anyone,
                },
                None => Via {
                    person: admits_person(identity, route, &request, index, row),
                    machine: machines && admits_machine(identity, route, &request, index, row),
                },
            };
            if via.person || via.machine {
                users.push((row, via));
            }
        };
        let users = match self
            .directory
            .read(|index| named_users(route, index, NAMED_WALK))
        {
            Some(mut candidates) => {
                candidates.sort_unstable();
                candidates.dedup();
                let mut users = Vec::new();
                // A few thousand at a time, as `Directory::scan` walks.
                for batch in candidates.chunks(4_096) {
                    self.directory.read(|index| {
                        for &row in batch {
                            judge(index, row, &mut users);
                        }
                    });
                }
                users
            }
            // Everyone is judged: a part of the directory on each core, in row order.
            None => {
                let end = self.directory.row_end();
                let parts = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
                let step = end.div_ceil(parts as Row).max(1);
                std::thread::scope(|scope| {
                    let walks: Vec<_> = (0..parts as Row)
                        .map(|part| {
                            let rows = part * step..((part + 1) * step).min(end);
                            scope.spawn(move || {
                                let mut users = Vec::new();
                                self.directory
                                    .scan_rows(ResourceType::User, rows, |index, row| {
                                        judge(index, row, &mut users)
                                    });
                                users
                            })
                        })
                        .collect();
                    let mut users = Vec::new();
                    for walk in walks {
                        match walk.join() {
                            Ok(part) => users.extend(part),
                            // A part that failed is no part of the answer: fail the page.
                            Err(panic) => std::panic::resume_unwind(panic),
                        }
                    }
                    users
                })
            }
        };
        // On a route that takes no tokens too: an agent's goes unread there, and a public rule
        // lets it in as anyone, as `explain` judges it.
        let mut agents = Vec::new();
        // Read first, judged after: the gate takes the directory's lock for each.
        let mut candidates = Vec::new();
        self.directory.scan(ResourceType::Agent, |index, row| {
            if let Some(agent) = index.agent(row) {
                let presents = agent_presents(identity.agent_scim_attribute, agent);
                candidates.push((agent.id, agent.name.to_string(), presents));
            }
        });
        let gate = self.gate();
        for (id, name, presents) in candidates {
            let Some(presents) = presents else { continue };
            let who = Who::Agent {
                name: &presents,
                on_behalf_of: None,
            };
            if lets_in(&self.runtime, &gate, who, route, method, path) {
                agents.push((id, name));
            }
        }
        Reach { users, agents }
    }

    /// Where the proxy refuses every credential a request to `route` could carry (plain HTTP
    /// off loopback: see [`crate::state::Runtime::takes_credentials`]), whether anyone is let
    /// in, as no one; `None` where callers are judged.
    fn in_clear(&self, route: &Route, request: &Request<'_>) -> Option<bool> {
        (!self.runtime.takes_credentials(route.scheme))
            .then(|| route.policy.evaluate(None, request).allowed)
    }

    pub(super) fn routes(&self) -> Shown {
        let mut html = String::from(
            "<div class=\"table\"><table><thead><tr><th>Route</th><th>Takes</th>\
             <th>Allow rules</th><th>Deny rules</th></tr></thead><tbody>",
        );
        for (i, route) in self.runtime.config.routes.iter().enumerate() {
            html.push_str(&format!(
                "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                link(&format!("routes/{i}")),
                escape(&route.name),
                takes(route),
                route.allow.len(),
                route.deny.len()
            ));
        }
        html.push_str("</tbody></table></div>");
        html.push_str(&format!(
            "<p><a href=\"{}\">Re-read the configuration</a></p>",
            link("reload")
        ));
        html.push_str(&self.explain_form("", "", "", "", "GET"));
        Shown {
            title: "Routes".to_owned(),
            content: html,
        }
    }

    pub(super) fn route(&self, index: &str, query: &str, params: &Params) -> Option<Shown> {
        let route = self
            .runtime
            .config
            .routes
            .get(index.parse::<usize>().ok()?)?;
        let asked = asked(route, query);
        let mut html = format!("<p>Takes {}.</p>", takes(route));
        html.push_str("<h2>Rules</h2>");
        html.push_str(&rules_table(route));
        html.push_str(&self.named_groups(route));
        html.push_str(&format!(
            "<h2>Who can reach it</h2><form class=\"inline\" method=\"get\" action=\"{}\">\
             <select name=\"method\" aria-label=\"Method\">{}</select>\
             <input type=\"text\" name=\"path\" value=\"{}\" aria-label=\"Path\">\
             <button type=\"submit\">Judge</button></form>",
            link(&format!("routes/{index}")),
            method_options(&asked.method),
            field(&asked.path)
        ));
        let not_served = asked.refused.clone();
        if let Some(why) = not_served.or_else(|| self.not_served(route, &asked.path)) {
            html.push_str(&format!(
                "<p>Nobody reaches this route at {} {}: {}.</p>",
                escape(&asked.method),
                escape(&asked.path),
                escape(&why)
            ));
            return Some(Shown {
                title: route.name.clone(),
                content: html,
            });
        }
        let reach = self.reach(route, &asked.method, &asked.path);
        let total = self.directory.read(|index| index.count(ResourceType::User));
        html.push_str(&format!(
            "<p><strong>{}</strong> of {} users and <strong>{}</strong> agents may {} {}.</p>",
            count(reach.users.len()),
            count(total),
            count(reach.agents.len()),
            escape(&asked.method),
            escape(&asked.path)
        ));
        html.push_str(
            "<div class=\"table\"><table><thead><tr><th>User</th><th>Gets in</th></tr></thead><tbody>",
        );
        // One page number for both lists, each showing its own last past its end, as its
        // pager names it.
        let page: Vec<(Row, Via)> = reach
            .users
            .iter()
            .skip(page_skip(params, reach.users.len()))
            .take(PAGE_SIZE)
            .copied()
            .collect();
        html.push_str(&self.directory.read(|index| {
            let mut rows = String::new();
            for (user, via) in page
                .iter()
                .filter_map(|&(row, via)| Some((index.user(row)?, via)))
            {
                rows.push_str(&format!(
                    "<tr><td><a href=\"{}\">{}</a></td><td>{}</td></tr>",
                    link(&format!("users/{}", format_id(user.id))),
                    escape(&user.user_name),
                    via.words()
                ));
            }
            rows
        }));
        html.push_str("</tbody></table></div>");
        // Users and agents are paged by the same page number.
        let paged = |total: usize, noun: &str| {
            let fixed = [
                ("method", asked.method.as_str()),
                ("path", asked.path.as_str()),
            ];
            pager(&format!("routes/{index}"), &fixed, params, total, noun)
        };
        html.push_str(&paged(reach.users.len(), "user"));
        if !reach.agents.is_empty() {
            html.push_str("<h2>Agents</h2><ul>");
            let skip = page_skip(params, reach.agents.len());
            for (id, name) in reach.agents.iter().skip(skip).take(PAGE_SIZE) {
                html.push_str(&format!(
                    "<li><a href=\"{}\">{}</a></li>",
                    link(&format!("agents/{}", format_id(*id))),
                    escape(name)
                ));
            }
            html.push_str("</ul>");
            html.push_str(&paged(reach.agents.len(), "agent"));
        }
        Some(Shown {
            title: route.name.clone(),
            content: html,
        })
    }

    /// Why a request for `path` on `route`'s host never reaches `route`: the proxy gives it
    /// to another route, to none, or to itself, or refuses it before it asks who calls, as it
    /// would a request (and as `explain` says). On a wildcard host, as on a host it serves
    /// that no route names exactly.
    fn not_served(&self, route: &Route, path: &str) -> Option<String> {
        if path.starts_with("/.portcullis/") {
            return Some("Portcullis' own endpoint serves it".to_owned());
        }
        let runtime = &self.runtime;
        if (runtime.scim.as_ref()).is_some_and(|scim| scim.claims(&route.host, path)) {
            return Some("the SCIM endpoint serves it".to_owned());
        }
        match runtime.routes.find(route.scheme, &route.host, path) {
            Match::Found(found) if found.config.name == route.name => (runtime.routes)
                .refuses(route.scheme, &route.host, found, path, None)
                .map(|why| format!("the proxy refuses it with 400, {why}")),
            Match::Found(other) => Some(format!("route {} serves it", other.config.name)),
            Match::WrongScheme(other) => Some(format!(
                "only route {} serves it, over the other scheme",
                other.config.name
            )),
            Match::None => Some("no route serves it".to_owned()),
        }
    }

    /// The groups the route's rules name, each with what names it and its direct members.
    fn named_groups(&self, route: &Route) -> String {
        let mut named: Vec<(Row, String)> = Vec::new();
        self.directory.read(|index| {
            let rules = route
                .allow
                .iter()
                .map(|r| (r, "allow"))
                .chain(route.deny.iter().map(|r| (r, "deny")));
            for (rule, effect) in rules {
                let by_name = [
                    (&rule.groups, "groups"),
                    (&rule.agent_groups, "agent_groups"),
                    (&rule.agent_owner_groups, "agent_owner_groups"),
                ];
                for (names, key) in by_name {
                    for name in names {
                        let folded = portcullis_policy::fold(name);
                        if let Some(row) = index.group_by_folded_name(&folded) {
                            named.push((row, format!("{} ({effect}, {key})", rule.name)));
                        }
                    }
                }
                for id in &rule.group_ids {
                    for row in index.groups_by_external_id(id) {
                        named.push((row, format!("{} ({effect}, group_ids)", rule.name)));
                    }
                }
            }
        });
        if named.is_empty() {
            return String::new();
        }
        self.directory.read(|index| {
            let mut html = String::from(
                "<h2>Groups its rules name</h2><div class=\"table\"><table><thead><tr>\
                 <th>Group</th><th>Named by</th><th>Direct members</th></tr></thead><tbody>",
            );
            for (row, by) in &named {
                let Some(group) = index.group(*row) else {
                    continue;
                };
                html.push_str(&format!(
                    "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
                    link(&format!("groups/{}", format_id(group.id))),
                    escape(&group.display_name),
                    escape(by),
                    count(index.member_count(*row))
                ));
            }
            html.push_str("</tbody></table></div>");
            html
        })
    }

    /// The routes the user at `row` can reach, each judged for `GET` at its path prefix: signed
    /// in as a person, and with a machine token as a service account.
    pub(super) fn routes_of(&self, index: &Index, row: Row) -> String {
        let identity = &self.runtime.config.identity;
        let mut html = String::from(
            "<div class=\"table\"><table><thead><tr><th>Route</th><th>GET at its root, signed in</th>\
             <th>as a machine</th></tr></thead><tbody>",
        );
        for (i, route) in self.runtime.config.routes.iter().enumerate() {
            let request = Request {
                method: "GET",
                path: &route.path_prefix,
            };
            // Refused before anyone is asked where the proxy does not give the route that
            // path (`/admin/` beside a route for `/admin/index.php`), as `explain` says.
            let served = self.not_served(route, &route.path_prefix).is_none();
            let judged = |admits: bool| flag(served && admits, "allowed", "refused");
            let in_clear = self.in_clear(route, &request);
            html.push_str(&format!(
                "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
                link(&format!("routes/{i}")),
                escape(&route.name),
                judged(
                    in_clear
                        .unwrap_or_else(|| admits_person(identity, route, &request, index, row))
                ),
                judged(
                    in_clear
                        .unwrap_or_else(|| admits_machine(identity, route, &request, index, row))
                )
            ));
        }
        html.push_str("</tbody></table></div>");
        html
    }

    /// The explain page: the form, and the answer when one was asked: of the names and the
    /// method as given, as `portcullis explain` judges them (a `get`, which the proxy refuses,
    /// is not a `GET`; a user named with a space at its end is not one named without).
    pub(super) fn explain_page(&self, query: &str) -> Shown {
        let field = |name: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let (user, agent, machine) = (field("user"), field("agent"), field("machine"));
        let url = field("url").trim().to_owned();
        let method = match field("method") {
            m if m.is_empty() => "GET".to_owned(),
            m => m,
        };
        let mut html = self.explain_form(&user, &agent, &machine, &url, &method);
        let who = match (user.is_empty(), agent.is_empty(), machine.is_empty()) {
            (false, true, true) => Some(Who::Person(&user)),
            (true, false, true) => Some(Who::Agent {
                name: &agent,
                on_behalf_of: None,
            }),
            (false, false, true) => Some(Who::Agent {
                name: &agent,
                on_behalf_of: Some(&user),
            }),
            (true, true, false) => Some(Who::Machine(&machine)),
            _ => None,
        };
        let asked = !(user.is_empty() && agent.is_empty() && machine.is_empty() && url.is_empty());
        if asked && (who.is_none() || url.is_empty()) {
            html.push_str(
                "<p class=\"no\">Give a URL, and a user, an agent (with the user it acts for, \
                 if it does) or a machine.</p>",
            );
        }
        if let (Some(who), false) = (who, url.is_empty()) {
            // The viewer was let in by the gate just now: the directory is current.
            match explain(&self.runtime, &self.directory, None, who, &url, &method) {
                Ok(answer) => {
                    html.push_str(&format!(
                        "<h2>{}</h2><dl class=\"facts\"><dt>Route</dt><dd>{}</dd><dt>Rule</dt>\
                         <dd>{}</dd><dt>Reason</dt><dd>{}</dd></dl>",
                        flag(answer.allowed, "Allowed", "Refused"),
                        escape(answer.route.as_deref().unwrap_or("none")),
                        escape(answer.rule.as_deref().unwrap_or("none")),
                        escape(&answer.reason)
                    ));
                }
                Err(e) => html.push_str(&format!("<p class=\"no\">{}</p>", escape(&e))),
            }
        }
        Shown {
            title: "Explain".to_owned(),
            content: html,
        }
    }

    fn explain_form(
        &self,
        user: &str,
        agent: &str,
        machine: &str,
        url: &str,
        method: &str,
    ) -> String {
        format!(
            "<h2>Explain a request</h2><form class=\"inline\" method=\"get\" action=\"{}\">\
             <input type=\"text\" name=\"user\" value=\"{}\" placeholder=\"user (as they sign in)\" aria-label=\"User\">\
             <input type=\"text\" name=\"agent\" value=\"{}\" placeholder=\"or agent\" aria-label=\"Agent\">\
             <input type=\"text\" name=\"machine\" value=\"{}\" placeholder=\"or machine\" aria-label=\"Machine\">\
             <input type=\"url\" name=\"url\" value=\"{}\" placeholder=\"https://app.example.com/path\" aria-label=\"URL\">\
             <select name=\"method\" aria-label=\"Method\">{}</select>\
             <button type=\"submit\">Explain</button></form>",
            link("explain"),
            field(user),
            field(agent),
            field(machine),
            field(url),
            method_options(method)
        )
    }
}

/// The method and path a route page judges (`?method=&path=`), by default `GET` at the
/// route's prefix. A path the proxy refuses as it reads it (one that does not normalize) is
/// shown as asked, and said so.
fn asked(route: &Route, query: &str) -> Asked {
    let mut asked = Asked {
        method: "GET".to_owned(),
        path: route.path_prefix.clone(),
        refused: None,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            // Any method, as the proxy would take it: one it refuses is said so (below).
            "method" if !value.is_empty() && value.len() <= 32 => asked.method = value.into_owned(),
            // An empty box asks about the prefix.
            "path" if !value.is_empty() && value.len() <= 4096 => match path::normalize(&value) {
                Ok(path) => (asked.path, asked.refused) = (path.into_owned(), None),
                Err(e) => {
                    let why = format!("the proxy refuses it with 400, {e}");
                    (asked.path, asked.refused) = (value.into_owned(), Some(why));
                }
            },
            _ => {}
        }
    }
    // Refused for its method before its path is read, as the proxy does.
    if let Some((status, why)) = crate::explain::refuses_method(&asked.method) {
        asked.refused = Some(format!("the proxy refuses it with {status}, {why}"));
    }
    asked
}

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

fn method_options(selected: &str) -> String {
    // A method asked that the list lacks (`get`, by a link) stays what is asked, selected.
    let asked = (!METHODS.contains(&selected))
        .then(|| format!("<option selected>{}</option>", escape(selected)));
    METHODS
        .iter()
        .map(|m| {
            let mark = if *m == selected { " selected" } else { "" };
            format!("<option{mark}>{m}</option>")
        })
        .chain(asked)
        .collect()
}

/// What a route takes, in words.
fn takes(route: &Route) -> String {
    if route.accept.is_empty() {
        return "anyone (public)".to_owned();
    }
    let names: Vec<&str> = route
        .accept
        .iter()
        .map(|c| match c {
            Credential::Session => "signed-in people",
            Credential::Bearer => "bearer tokens",
        })
        .collect();
    names.join(" and ")
}

/// The route's rules as written, one row each.
fn rules_table(route: &Route) -> String {
    let mut html = String::from(
        "<div class=\"table\"><table><thead><tr><th>Rule</th><th>Effect</th><th>Who</th>\
         <th>Where</th></tr></thead><tbody>",
    );
    let rows = route
        .allow
        .iter()
        .map(|r| (r, "allow"))
        .chain(route.deny.iter().map(|r| (r, "deny")));
    for (rule, effect) in rows {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&rule.name),
            flag(effect == "allow", "allow", "deny"),
            escape(&who_of(rule)),
            escape(&where_of(rule))
        ));
    }
    html.push_str("</tbody></table></div>");
    html
}

fn who_of(rule: &RuleSpec) -> String {
    let mut parts = Vec::new();
    let list = |name: &str, values: &[String]| {
        (!values.is_empty()).then(|| format!("{name} {}", values.join(", ")))
    };
    parts.extend(list("groups", &rule.groups));
    parts.extend(list("group ids", &rule.group_ids));
    parts.extend(list("users", &rule.users));
    parts.extend(list("email domains", &rule.email_domains));
    parts.extend(list("agent groups", &rule.agent_groups));
    parts.extend(list("agents owned by", &rule.agent_owner_groups));
    for (on, name) in [
        (rule.any_signed_in, "anyone signed in"),
        (rule.machines, "any machine"),
        (rule.agents, "any agent"),
        (rule.public, "anyone (public)"),
    ] {
        if on {
            parts.push(name.to_owned());
        }
    }
    parts.join("; ")
}

fn where_of(rule: &RuleSpec) -> String {
    let methods = rule
        .methods
        .as_ref()
        .map_or_else(|| "any method".to_owned(), |m| m.join(", "));
    let paths = rule
        .paths
        .as_ref()
        .map_or_else(|| "any path".to_owned(), |p| p.join(", "));
    format!("{methods}; {paths}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::World;

    /// A route's groups are walked in one read of the index only while they are small: past
    /// the bound, everyone is judged a few thousand at a time instead (same answer, see
    /// `who_can_reach_agrees_with_the_gate_under_every_mapping`).
    #[tokio::test]
    async fn a_route_s_groups_are_walked_at_once_only_while_small() {
        let world = World::new();
        let a = world.user("a@corp.example").await;
        let b = world.user("b@corp.example").await;
        let c = world.user("c@corp.example").await;
        let platform = world.group("platform", &[&c]).await;
        world.group("eng", &[&a, &b, &platform]).await;
        // `http://api.test`: `allow = { groups = ["eng"] }`.
        let route = &world.config.routes[1];
        let named = |walk| {
            world
                .directory
                .read(|index| named_users(route, index, walk))
        };
        let mut users = named(4).expect("eng and platform hold 4 members");
        users.sort_unstable();
        assert_eq!(users.len(), 3, "{users:?}");
        assert_eq!(named(3), None, "past the bound, everyone is judged");
    }
}
