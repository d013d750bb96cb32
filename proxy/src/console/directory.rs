//! The directory's pages: the overview, users, groups and agents, each a searchable, paged list
//! and a page per resource.

use std::collections::HashMap;
use std::sync::Arc;

use portcullis_config::IdentityConfig;
use portcullis_scim::schema::ResourceType;
use portcullis_scim::store::{format_id, AgentEntry, Directory, Index, Row, SubjectKey, UserEntry};

use super::escape;
use super::PAGE_SIZE;
use super::{
    contains_folded, count, flag, link, page_skip, pager, search_form, Console, Params, Shown,
};
use crate::auth::sessions::{Session, Sessions};
use crate::caller::SessionKey;
use crate::gate::{person_key, session_stands};
use crate::human::{relative, timestamp};
use crate::state::Runtime;

/// One page of the rows of a list that a search selects.
struct Listing {
    total: usize,
    rows: Vec<Row>,
}

/// The rows of type `rt` for which `matches` holds, the page `params` asks for, walking the
/// directory a batch at a time ([`Directory::scan`]).
fn list(
    directory: &Directory,
    rt: ResourceType,
    params: &Params,
    matches: impl Fn(&Index, Row) -> bool,
) -> Listing {
    let asked = (params.page.max(1) - 1).saturating_mul(PAGE_SIZE);
    let mut total = 0;
    let mut rows = Vec::with_capacity(PAGE_SIZE);
    directory.scan(rt, |index, row| {
        if matches(index, row) {
            // Until the page asked for is reached, each page's rows replace the last's: one
            // past the last shows the last, as the pager does, from this one reading.
            if total % PAGE_SIZE == 0 && total <= asked {
                rows.clear();
            }
            if rows.len() < PAGE_SIZE {
                rows.push(row);
            }
            total += 1;
        }
    });
    Listing { total, rows }
}

fn user_matches(user: &UserEntry, q: &str) -> bool {
    contains_folded(&user.user_name, q)
        || user.emails.iter().any(|e| contains_folded(e, q))
        || user
            .external_id
            .as_deref()
            .is_some_and(|e| contains_folded(e, q))
}

fn named_matches(name: &str, external_id: Option<&str>, q: &str) -> bool {
    contains_folded(name, q) || external_id.is_some_and(|e| contains_folded(e, q))
}

/// A link to the resource `id` in `section`, showing `text`.
fn resource_link(section: &str, id: u128, text: &str) -> String {
    format!(
        "<a href=\"{}\">{}</a>",
        link(&format!("{section}/{}", format_id(id))),
        escape(text)
    )
}

/// A row's link, whatever it is: a user, a group or an agent.
fn member_link(index: &Index, row: Row) -> Option<(&'static str, String)> {
    if let Some(user) = index.user(row) {
        return Some(("User", resource_link("users", user.id, &user.user_name)));
    }
    if let Some(group) = index.group(row) {
        return Some((
            "Group",
            resource_link("groups", group.id, &group.display_name),
        ));
    }
    index
        .agent(row)
        .map(|agent| ("Agent", resource_link("agents", agent.id, &agent.name)))
}

/// The groups `member` is in, each with the chain of groups it is in them through (empty for a
/// direct membership), by display name.
fn groups_with_paths(index: &Index, member: Row) -> Vec<(Row, Vec<Row>)> {
    // Breadth-first, so each group is reached by a shortest chain.
    let mut through: HashMap<Row, Option<Row>> = HashMap::new();
    let mut frontier: Vec<Row> = Vec::new();
    for group in index.parents_of(member) {
        if through.insert(group, None).is_none() {
            frontier.push(group);
        }
    }
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for group in frontier {
            for parent in index.parents_of(group) {
                through.entry(parent).or_insert_with(|| {
                    next.push(parent);
                    Some(group)
                });
            }
        }
        frontier = next;
    }
    let mut groups: Vec<(Row, Vec<Row>)> = through
        .keys()
        .map(|&group| {
            let mut chain = Vec::new();
            let mut at = group;
            while let Some(Some(below)) = through.get(&at) {
                chain.push(*below);
                at = *below;
                if chain.len() > through.len() {
                    break; // a cycle, which the writer refuses: shown cut short
                }
            }
            chain.reverse();
            (group, chain)
        })
        .collect();
    let name = |row: Row| index.group(row).map(|g| g.display_name.to_lowercase());
    groups.sort_by_key(|(group, chain)| (chain.len(), name(*group)));
    groups
}

/// The table of `member`'s groups.
fn groups_table(index: &Index, member: Row) -> String {
    let groups = groups_with_paths(index, member);
    if groups.is_empty() {
        return "<p class=\"muted\">In no group.</p>".to_owned();
    }
    let mut html = String::from(
        "<div class=\"table\"><table><thead><tr><th>Group</th><th>Membership</th></tr></thead><tbody>",
    );
    for (group, chain) in groups {
        let Some(entry) = index.group(group) else {
            continue;
        };
        let how = if chain.is_empty() {
            "direct".to_owned()
        } else {
            let names: Vec<String> = chain
                .iter()
                .filter_map(|&row| index.group(row))
                .map(|g| escape(&g.display_name))
                .collect();
            format!("<span class=\"path\">through {}</span>", names.join(" → "))
        };
        html.push_str(&format!(
            "<tr><td>{}</td><td>{how}</td></tr>",
            resource_link("groups", entry.id, &entry.display_name)
        ));
    }
    html.push_str("</tbody></table></div>");
    html
}

/// Most members of a group copied in one read of the index (as `access::NAMED_WALK`).
const COPIED_AT_ONCE: usize = 4_096;

/// The direct members of group `row`, in row order (creation order). Those of a group of more
/// than `at_once` members are found a few thousand rows at a time: a million-member set copied
/// at once would hold up SCIM writes, and the requests waiting behind them, for as long as that
/// takes. (Sorted once the index is no longer held.)
pub(super) fn members_of(directory: &Directory, row: Row, at_once: usize) -> Vec<Row> {
    let (mut members, copied) = directory.read(|index| {
        let count = index.member_count(row);
        match count <= at_once {
            true => (index.members_of(row).collect(), true),
            false => (Vec::with_capacity(count), false),
        }
    });
    if !copied {
        for rt in [ResourceType::User, ResourceType::Group, ResourceType::Agent] {
            directory.scan(rt, |index, member| {
                if index.is_member(row, member) {
                    members.push(member);
                }
            });
        }
    }
    members.sort_unstable();
    members
}

/// The sessions held here of the person who signs in as `user`: not those the gate refuses
/// for who they are (begun before the user was re-created or re-activated, or of a deactivated
/// user), which are ended at their next use. Those sign-in no longer holds are among them (see
/// [`holding`]): ended with the rest, as a restart that raises the idle timeout, or a replica
/// still on the configuration before a rolling change, would let them in again.
pub(super) fn sessions_of(
    sessions: &Sessions,
    identity: &IdentityConfig,
    user: &UserEntry,
) -> Vec<(SessionKey, Arc<Session>)> {
    sessions.find(|who| {
        person_key(identity, who).is_some_and(|key| names_user(key, user))
            && session_stands(who, user)
    })
}

/// Of `found`, the sessions sign-in still holds at `now` (within their lifetime and idle
/// timeout, as a reload judges them): those the console shows and counts.
pub(super) fn holding(
    mut found: Vec<(SessionKey, Arc<Session>)>,
    sessions: &Sessions,
    runtime: &Runtime,
    now: i64,
) -> Vec<(SessionKey, Arc<Session>)> {
    let now = u64::try_from(now).unwrap_or_default();
    match &runtime.config.oidc {
        Some(oidc) => found.retain(|(_, session)| sessions.holds(session, now, oidc)),
        None => found.clear(),
    }
    found
}

fn names_user(key: SubjectKey<'_>, user: &UserEntry) -> bool {
    match key {
        SubjectKey::UserName(name) => portcullis_policy::fold(name) == *user.user_name,
        SubjectKey::Email(email) => {
            let email = portcullis_policy::fold(email);
            user.emails.iter().any(|e| **e == *email)
        }
        SubjectKey::ExternalId(id) => user.external_id.as_deref() == Some(id),
    }
}

impl Console {
    pub(super) fn overview(&self) -> Shown {
        let counts = self.directory.read(|index| {
            [
                ("users", "Users", index.count(ResourceType::User)),
                ("groups", "Groups", index.count(ResourceType::Group)),
                ("agents", "Agents", index.count(ResourceType::Agent)),
            ]
        });
        let mut content = String::new();
        let awaiting = &self.runtime.awaiting_restart;
        if !awaiting.is_empty() {
            content.push_str(&format!(
                "<p class=\"no\">The configuration file changes settings that take effect only \
                 after a restart: {}. Until then the ones Portcullis started with are in use.</p>",
                escape(&awaiting.join(", "))
            ));
        }
        content.push_str("<div class=\"cards\">");
        for (path, name, n) in counts {
            content.push_str(&format!(
                "<a class=\"card\" href=\"{}\"><strong>{}</strong>{name}</a>",
                link(path),
                count(n)
            ));
        }
        content.push_str(&format!(
            "<div class=\"card\"><strong>{}</strong>Sessions</div></div>",
            count(self.sessions.count())
        ));
        content.push_str(&self.activity());
        Shown {
            title: "Console".to_owned(),
            content,
        }
    }

    pub(super) fn users(&self, params: &Params) -> Shown {
        let q = portcullis_policy::fold(&params.q);
        let listing = list(&self.directory, ResourceType::User, params, |index, row| {
            index.user(row).is_some_and(|u| user_matches(u, &q))
        });
        let content = self.directory.read(|index| {
            let mut html = search_form("users", params, "userName, email or externalId");
            html.push_str(
                "<div class=\"table\"><table><thead><tr><th>userName</th><th>Email</th>\
                 <th>externalId</th><th>Active</th><th>Groups</th></tr></thead><tbody>",
            );
            for user in listing.rows.iter().filter_map(|&row| index.user(row)) {
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    resource_link("users", user.id, &user.user_name),
                    escape(user.emails.first().map_or("", |e| e)),
                    escape(user.external_id.as_deref().unwrap_or("")),
                    flag(user.active, "active", "deactivated"),
                    user.parents.len()
                ));
            }
            html.push_str("</tbody></table></div>");
            html.push_str(&pager("users", &[], params, listing.total, "user"));
            html
        });
        Shown {
            title: "Users".to_owned(),
            content,
        }
    }

    pub(super) fn user(&self, id: &str) -> Option<Shown> {
        let (title, user, mut content, routes) = self.directory.read(|index| {
            let (ResourceType::User, row) = index.row_of(id)? else {
                return None;
            };
            let user = index.user(row)?.clone();
            let mut html = String::from("<dl class=\"facts\">");
            html.push_str(&format!(
                "<dt>Active</dt><dd>{}</dd><dt>id</dt><dd>{}</dd><dt>externalId</dt><dd>{}</dd>\
                 <dt>Emails</dt><dd>{}</dd></dl><h2>Groups</h2>{}",
                flag(user.active, "active", "deactivated"),
                escape(&format_id(user.id)),
                escape(user.external_id.as_deref().unwrap_or("none")),
                escape(&user.emails.join(", ")),
                groups_table(index, row)
            ));
            let routes = self.routes_of(index, row);
            Some((user.user_name.to_string(), user, html, routes))
        })?;
        content.push_str("<h2>Routes</h2>");
        content.push_str(&routes);
        content.push_str("<h2>Recent records</h2>");
        content.push_str(&self.recent_records(&user.user_name));
        // Sessions are held beside the directory, not under its lock.
        let found = sessions_of(&self.sessions, &self.runtime.config.identity, &user);
        let sessions = holding(found, &self.sessions, &self.runtime, self.now);
        content.push_str("<h2>Sessions</h2>");
        match sessions.iter().map(|(_, s)| s.last_seen()).max() {
            None => content.push_str("<p class=\"muted\">No session.</p>"),
            Some(seen) => {
                let ago = i64::try_from(seen).unwrap_or(i64::MAX) - self.now;
                content.push_str(&format!(
                    "<p>{} session{}, last seen <time datetime=\"{}\">{}</time>. \
                     <a href=\"{}\">End them</a></p>",
                    count(sessions.len()),
                    if sessions.len() == 1 { "" } else { "s" },
                    timestamp(self.now + ago),
                    relative(ago),
                    link(&format!("users/{}/end_sessions", format_id(user.id)))
                ));
            }
        }
        Some(Shown { title, content })
    }

    pub(super) fn groups(&self, params: &Params) -> Shown {
        let q = portcullis_policy::fold(&params.q);
        let listing = list(
            &self.directory,
            ResourceType::Group,
            params,
            |index, row| {
                index
                    .group(row)
                    .is_some_and(|g| named_matches(&g.display_name, g.external_id.as_deref(), &q))
            },
        );
        let content = self.directory.read(|index| {
            let mut html = search_form("groups", params, "displayName or externalId");
            html.push_str(
                "<div class=\"table\"><table><thead><tr><th>displayName</th><th>externalId</th>\
                 <th>Direct members</th></tr></thead><tbody>",
            );
            for &row in &listing.rows {
                let Some(group) = index.group(row) else {
                    continue;
                };
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    resource_link("groups", group.id, &group.display_name),
                    escape(group.external_id.as_deref().unwrap_or("")),
                    count(index.member_count(row))
                ));
            }
            html.push_str("</tbody></table></div>");
            html.push_str(&pager("groups", &[], params, listing.total, "group"));
            html
        });
        Shown {
            title: "Groups".to_owned(),
            content,
        }
    }

    pub(super) fn group(&self, id: &str, params: &Params) -> Option<Shown> {
        let row = self.directory.read(|index| match index.row_of(id)? {
            (ResourceType::Group, row) => Some(row),
            _ => None,
        })?;
        let members = members_of(&self.directory, row, COPIED_AT_ONCE);
        let skip = page_skip(params, members.len());
        let page: Vec<Row> = members.iter().skip(skip).take(PAGE_SIZE).copied().collect();
        self.directory.read(|index| {
            let group = index.group(row)?;
            let mut html = format!(
                "<dl class=\"facts\"><dt>id</dt><dd>{}</dd><dt>externalId</dt><dd>{}</dd></dl>\
                 <h2>In groups</h2>{}<h2>Members</h2>",
                escape(&format_id(group.id)),
                escape(group.external_id.as_deref().unwrap_or("none")),
                groups_table(index, row)
            );
            html.push_str(
                "<div class=\"table\"><table><thead><tr><th>Member</th><th>Type</th>\
                 <th>Active</th></tr></thead><tbody>",
            );
            for &member in &page {
                let Some((kind, name)) = member_link(index, member) else {
                    continue;
                };
                let active = match (index.user(member), index.agent(member)) {
                    (Some(user), _) => flag(user.active, "active", "deactivated"),
                    (_, Some(agent)) => flag(agent.active, "active", "deactivated"),
                    _ => String::new(),
                };
                html.push_str(&format!(
                    "<tr><td>{name}</td><td>{kind}</td><td>{active}</td></tr>"
                ));
            }
            html.push_str("</tbody></table></div>");
            let here = format!("groups/{}", format_id(group.id));
            let no_search = Params {
                q: String::new(),
                page: params.page,
            };
            html.push_str(&pager(
                &here,
                &[],
                &no_search,
                members.len(),
                "direct member",
            ));
            Some(Shown {
                title: group.display_name.to_string(),
                content: html,
            })
        })
    }

    pub(super) fn agents(&self, params: &Params) -> Shown {
        let q = portcullis_policy::fold(&params.q);
        let listing = list(
            &self.directory,
            ResourceType::Agent,
            params,
            |index, row| {
                index
                    .agent(row)
                    .is_some_and(|a| named_matches(&a.name, a.external_id.as_deref(), &q))
            },
        );
        let content = self.directory.read(|index| {
            let mut html = search_form("agents", params, "name or externalId");
            html.push_str(
                "<div class=\"table\"><table><thead><tr><th>name</th><th>externalId</th>\
                 <th>May act</th></tr></thead><tbody>",
            );
            for agent in listing.rows.iter().filter_map(|&row| index.agent(row)) {
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    resource_link("agents", agent.id, &agent.name),
                    escape(agent.external_id.as_deref().unwrap_or("")),
                    standing(index, agent, self.now)
                ));
            }
            html.push_str("</tbody></table></div>");
            html.push_str(&pager("agents", &[], params, listing.total, "agent"));
            html
        });
        Shown {
            title: "Agents".to_owned(),
            content,
        }
    }

    pub(super) fn agent(&self, id: &str) -> Option<Shown> {
        self.directory.read(|index| {
            let (ResourceType::Agent, row) = index.row_of(id)? else {
                return None;
            };
            let agent = index.agent(row)?;
            let names = |ids: &[u128]| -> String {
                let links: Vec<String> = ids
                    .iter()
                    .map(|&id| match index.row_of_id(id) {
                        Some((_, row)) => match member_link(index, row) {
                            Some((_, link)) => link,
                            None => index.application(row).map_or_else(
                                || "(unknown)".to_owned(),
                                |app| {
                                    format!(
                                        "{} {}",
                                        escape(&app.name),
                                        flag(app.active, "", "(deactivated)")
                                    )
                                },
                            ),
                        },
                        None => "(deleted)".to_owned(),
                    })
                    .collect();
                if links.is_empty() {
                    "none".to_owned()
                } else {
                    links.join(", ")
                }
            };
            let expires = if agent.expires == i64::MAX {
                "never".to_owned()
            } else if agent.expires == i64::MIN {
                flag(false, "", "unreadable, so the agent is refused")
            } else {
                format!(
                    "<time datetime=\"{}\">{}</time>",
                    timestamp(agent.expires),
                    relative(agent.expires.saturating_sub(self.now))
                )
            };
            let content = format!(
                "<dl class=\"facts\"><dt>May act</dt><dd>{}</dd><dt>Active</dt><dd>{}</dd>\
                 <dt>Expires</dt><dd>{expires}</dd><dt>Owners</dt><dd>{}</dd>\
                 <dt>Applications</dt><dd>{}</dd><dt>id</dt><dd>{}</dd><dt>externalId</dt>\
                 <dd>{}</dd></dl><h2>Groups</h2>{}",
                standing(index, agent, self.now),
                flag(agent.active, "active", "deactivated"),
                names(agent.owners()),
                names(agent.applications()),
                escape(&format_id(agent.id)),
                escape(agent.external_id.as_deref().unwrap_or("none")),
                groups_table(index, row)
            );
            Some(Shown {
                title: agent.name.to_string(),
                content,
            })
        })
    }
}

/// Whether `agent` may act now, or why not.
fn standing(index: &Index, agent: &AgentEntry, now: i64) -> String {
    match index.agent_standing(agent, now) {
        Ok(()) => flag(true, "yes", ""),
        Err(refusal) => flag(false, "", &escape(refusal.as_str())),
    }
}
