//! The audit timeline: the records of the audit log, newest first, filtered and paged, and a
//! chart of refusals and SCIM changes per hour over the last day. Read from the log itself on
//! every page (the file, or PostgreSQL's tables with `[postgres]`), from its newest record
//! back, and never more than [`READ_LIMIT`] records a page.

use std::collections::HashSet;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use portcullis_scim::store::{format_id, Index, Row};

use super::{count, escape, field, link, pager, Console, Params, Shown, PAGE_SIZE};
use crate::audit::{parse_since, refusals_in, Entry, Filter, Order};
use crate::human::relative;

/// Pages of the timeline one may ask for.
const MAX_PAGE: usize = 2_000;
/// Hours the chart covers.
const HOURS: usize = 24;
/// Records a page reads at most, the newest first: what a page costs stays bounded however
/// long the log grows, and anyone can make it grow (refusals are recorded). `portcullis
/// audit` reads the whole log.
pub(super) const READ_LIMIT: usize = 100_000;
/// How far back of `since` a reading goes: records are written in the order they happen,
/// give or take the moments they wait to be written.
const SINCE_SLACK: i64 = 60;

/// What a reading of the log found for a page.
pub(super) struct Found {
    /// The page's records, newest first.
    entries: Vec<Entry>,
    /// How many of the records read the filter selects.
    selected: usize,
    /// How many records were read.
    pub(super) read: usize,
    /// Whether every record the filter could select was read (not: the reading stopped at
    /// [`READ_LIMIT`], or once it had what it was asked for).
    whole: bool,
    chart: PerHour,
}

/// The timeline's query: the filter, as typed (to show it back), and as understood.
struct Asked {
    who: String,
    kind: String,
    route: String,
    since: String,
    until: String,
    filter: Filter,
    /// Why each time not understood was not, by its field.
    problems: Vec<String>,
}

fn asked(query: &str, now: OffsetDateTime) -> Asked {
    let field = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().chars().take(256).collect::<String>())
            .unwrap_or_default()
    };
    let (who, kind, route, since, until) = (
        field("who"),
        field("kind"),
        field("route"),
        field("since"),
        field("until"),
    );
    let mut problems = Vec::new();
    let mut time = |name: &str, text: &str| {
        (!text.is_empty())
            .then(|| parse_since(text, now))
            .and_then(|parsed| {
                parsed
                    .map_err(|e| problems.push(format!("{name} {e}")))
                    .ok()
            })
    };
    let filter = Filter {
        user: (!who.is_empty()).then(|| who.clone()),
        // The console knows the directory; `Console::audit_page` looks the user up.
        about: None,
        aliases: HashSet::new(),
        since: time("since", &since),
        until: time("until", &until),
        kind: KINDS
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(k, _)| (*k).to_owned()),
        route: (!route.is_empty()).then(|| route.clone()),
    };
    Asked {
        who,
        kind,
        route,
        since,
        until,
        filter,
        problems,
    }
}

const KINDS: [(&str, &str); 6] = [
    ("change", "SCIM changes"),
    ("refusal", "refusals"),
    ("allow", "allowed requests"),
    ("action", "console actions"),
    ("session", "sign-ins and sign-outs"),
    ("lost", "records not kept"),
];

/// Refusals and changes in each of the last [`HOURS`] hours, oldest first.
#[derive(Default)]
struct PerHour {
    refusals: [usize; HOURS],
    changes: [usize; HOURS],
    /// Whether the records read go back further than the chart (or to the log's start).
    whole: bool,
}

impl PerHour {
    /// Counts `entry`, made at `at` (Unix seconds).
    fn add(&mut self, entry: &Entry, at: Option<i64>, now: i64) {
        let Some(at) = at else {
            return;
        };
        let ago = now - at;
        if !(0..(HOURS as i64) * 3600).contains(&ago) {
            return;
        }
        let slot = HOURS - 1 - (ago / 3600) as usize;
        match entry {
            Entry::Refusal { .. } => {
                self.refusals[slot] = (self.refusals[slot]).saturating_add(refusals_in(entry))
            }
            Entry::Change { .. } => self.changes[slot] += 1,
            _ => {}
        }
    }

    /// An inline SVG bar chart, each hour a pair of bars.
    fn svg(&self) -> String {
        let top = self
            .refusals
            .iter()
            .chain(&self.changes)
            .copied()
            .max()
            .unwrap_or(0)
            .max(1);
        let (width, height, base) = (24 * 20 + 40, 140, 120);
        let mut svg = format!(
            "<svg class=\"chart\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
             aria-label=\"Refusals and SCIM changes per hour, last 24 hours\">"
        );
        for hour in 0..HOURS {
            let x = 30 + hour * 20;
            for (offset, value, class) in [
                (0, self.refusals[hour], "refusals"),
                (9, self.changes[hour], "changes"),
            ] {
                let h = value * 100 / top;
                svg.push_str(&format!(
                    "<rect class=\"{class}\" x=\"{}\" y=\"{}\" width=\"8\" height=\"{h}\">\
                     <title>{value} {class}</title></rect>",
                    x + offset,
                    base - h
                ));
            }
        }
        svg.push_str(&format!(
            "<text x=\"30\" y=\"{}\">24 h ago</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">now</text>\
             <text x=\"0\" y=\"12\">{top}</text></svg>",
            base + 15,
            width - 10,
            base + 15
        ));
        let total = |v: &[usize; HOURS]| v.iter().sum::<usize>();
        let of = if self.whole {
            String::new()
        } else {
            format!(", of the newest {} records", count(READ_LIMIT))
        };
        format!(
            "<figure>{svg}<figcaption><span class=\"no\">■</span> {} refusals · \
             <span class=\"accent\">■</span> {} SCIM changes in the last 24 hours{of}\
             </figcaption></figure>",
            count(total(&self.refusals)),
            count(total(&self.changes))
        )
    }
}

impl Console {
    fn now_time(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.now).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The records `filter` selects for page `page` (newest first), how many it selects in the
    /// records read, and the chart of the last day. Reads from the newest record back, at most
    /// [`READ_LIMIT`] of them; without `count`, only until the page and the chart are full.
    pub(super) fn newest(
        &self,
        filter: &Filter,
        page: usize,
        count: bool,
    ) -> Result<Found, String> {
        let skip = (page.clamp(1, MAX_PAGE) - 1) * PAGE_SIZE;
        let day_ago = self.now - (HOURS as i64) * 3600;
        let since = filter
            .since
            .map(|since| since.unix_timestamp() - SINCE_SLACK);
        let mut found = Found {
            entries: Vec::new(),
            selected: 0,
            read: 0,
            whole: true,
            chart: PerHour::default(),
        };
        let mut past_day = false;
        self.audit
            .reader()
            .each(Order::NewestFirst, &mut |_, entry, back| {
                if found.read == READ_LIMIT {
                    found.whole = false;
                    return false;
                }
                found.read += 1;
                let at = OffsetDateTime::parse(entry.time(), &Rfc3339)
                    .ok()
                    .map(|at| at.unix_timestamp());
                // How far back the reading is (see `Back`): not a change a file got late, and
                // with PostgreSQL, when a record was written, not when it was made.
                let older = |than: i64| back.is_some_and(|back| back < than);
                found.chart.add(&entry, at, self.now);
                past_day |= older(day_ago);
                if filter.matches(&entry) {
                    if found.selected >= skip && found.entries.len() < PAGE_SIZE {
                        found.entries.push(entry);
                    }
                    found.selected += 1;
                }
                // Past `since`, nothing more is selected; past the day, nothing more is charted.
                if past_day && since.is_some_and(older) {
                    return false;
                }
                if !count && past_day && found.entries.len() == PAGE_SIZE {
                    found.whole = false;
                    return false;
                }
                true
            })?;
        found.chart.whole = past_day || found.whole;
        Ok(found)
    }

    /// What the page says when the reading stopped at [`READ_LIMIT`].
    fn read_limit_note(found: &Found) -> String {
        if found.whole {
            return String::new();
        }
        format!(
            "<p class=\"muted\">Only the newest {} records are read here. \
             <code>portcullis audit</code> reads the whole log.</p>",
            count(READ_LIMIT)
        )
    }

    pub(super) fn audit_page(&self, query: &str, params: &Params) -> Shown {
        let mut asked = asked(query, self.now_time());
        if let Some((id, aliases)) = self.user_keys(&asked.who) {
            asked.filter.about = Some(id);
            asked.filter.aliases = aliases;
        }
        let mut html = format!(
            "<form class=\"inline\" method=\"get\" action=\"{}\">\
             <input type=\"text\" name=\"who\" value=\"{}\" placeholder=\"actor or user\" aria-label=\"Actor or user\">\
             <select name=\"kind\" aria-label=\"Event\"><option value=\"\">every event</option>{}</select>\
             <input type=\"text\" name=\"route\" value=\"{}\" placeholder=\"route\" aria-label=\"Route\">\
             <input type=\"text\" name=\"since\" value=\"{}\" placeholder=\"since (1h, 2d, RFC 3339)\" aria-label=\"Since\">\
             <input type=\"text\" name=\"until\" value=\"{}\" placeholder=\"until\" aria-label=\"Until\">\
             <button type=\"submit\">Filter</button></form>",
            link("audit"),
            field(&asked.who),
            KINDS
                .iter()
                .map(|(k, name)| {
                    let mark = if *k == asked.kind { " selected" } else { "" };
                    format!("<option value=\"{k}\"{mark}>{name}</option>")
                })
                .collect::<String>(),
            field(&asked.route),
            field(&asked.since),
            field(&asked.until)
        );
        for problem in &asked.problems {
            html.push_str(&format!("<p class=\"no\">{}</p>", escape(problem)));
        }
        // A page past the last (a relative `since` moved on between two clicks, say) is shown
        // as the last, as the pager names it.
        let found = self
            .newest(&asked.filter, params.page, true)
            .and_then(|found| {
                let shown = found.selected.min(MAX_PAGE * PAGE_SIZE);
                let last = shown.div_ceil(PAGE_SIZE).max(1);
                if found.entries.is_empty() && found.selected > 0 && params.page > last {
                    self.newest(&asked.filter, last, true)
                } else {
                    Ok(found)
                }
            });
        match found {
            Ok(found) => {
                html.insert_str(0, &found.chart.svg());
                html.push_str(&self.timeline(&found.entries));
                let fixed = [
                    ("who", asked.who.as_str()),
                    ("kind", asked.kind.as_str()),
                    ("route", asked.route.as_str()),
                    ("since", asked.since.as_str()),
                    ("until", asked.until.as_str()),
                ];
                let fixed: Vec<(&str, &str)> =
                    fixed.into_iter().filter(|(_, v)| !v.is_empty()).collect();
                let shown_total = found.selected.min(MAX_PAGE * PAGE_SIZE);
                html.push_str(&pager("audit", &fixed, params, shown_total, "record"));
                html.push_str(&Self::read_limit_note(&found));
            }
            Err(e) => html.push_str(&format!(
                "<p class=\"no\">The audit log cannot be read: {}</p>",
                escape(&e)
            )),
        }
        Shown {
            title: "Audit".to_owned(),
            content: html,
        }
    }

    /// The last day in a chart, and the newest records, for the overview.
    pub(super) fn activity(&self) -> String {
        match self.newest(&Filter::default(), 1, false) {
            Ok(found) => format!(
                "<h2>The last 24 hours</h2>{}<h2>Newest records</h2>{}<p><a href=\"{}\">The whole timeline</a></p>",
                found.chart.svg(),
                self.timeline(&found.entries[..found.entries.len().min(10)]),
                link("audit")
            ),
            Err(e) => format!(
                "<p class=\"no\">The audit log cannot be read: {}</p>",
                escape(&e)
            ),
        }
    }

    /// The id of the directory user `user_name`, and the other names their records go by.
    fn user_keys(&self, user_name: &str) -> Option<(String, HashSet<String>)> {
        self.directory.read(|index| {
            let row = index.user_by_name(user_name)?;
            Some((format_id(index.user(row)?.id), aliases(index, row)))
        })
    }

    /// The newest records by or about the user `user_name`, and a link to them all.
    pub(super) fn recent_records(&self, user_name: &str) -> String {
        let Some((id, aliases)) = self.user_keys(user_name) else {
            return "<p class=\"muted\">No record.</p>".to_owned();
        };
        let filter = Filter {
            user: Some(user_name.to_owned()),
            about: Some(id),
            aliases,
            ..Filter::default()
        };
        match self.newest(&filter, 1, true) {
            Ok(found) if found.selected > 0 => {
                let mut html = self.timeline(&found.entries[..found.entries.len().min(10)]);
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("who", user_name);
                let of = if found.whole {
                    ""
                } else {
                    " of the newest read"
                };
                html.push_str(&format!(
                    "<p><a href=\"{}?{}\">All {} records{of}</a></p>",
                    link("audit"),
                    escape(&query.finish()),
                    count(found.selected)
                ));
                html
            }
            Ok(found) if !found.whole => format!(
                "<p class=\"muted\">No record among the newest {} read. <code>portcullis audit \
                 --user {}</code> reads the whole log.</p>",
                count(READ_LIMIT),
                escape(user_name)
            ),
            Ok(_) => "<p class=\"muted\">No record.</p>".to_owned(),
            Err(e) => format!(
                "<p class=\"no\">The audit log cannot be read: {}</p>",
                escape(&e)
            ),
        }
    }

    /// The records as a table, in the order given.
    fn timeline(&self, entries: &[Entry]) -> String {
        let mut html = String::from(
            "<div class=\"table\"><table><thead><tr><th>When</th><th>Event</th><th>Who</th>\
             <th>What</th></tr></thead><tbody>",
        );
        for entry in entries {
            let when = OffsetDateTime::parse(entry.time(), &Rfc3339).map_or_else(
                |_| escape(entry.time()),
                |at| {
                    format!(
                        "<time datetime=\"{}\" title=\"{}\">{}</time>",
                        escape(entry.time()),
                        escape(entry.time()),
                        relative(at.unix_timestamp() - self.now)
                    )
                },
            );
            let what = match entry {
                Entry::Change {
                    seq,
                    op,
                    resource_type,
                    id,
                    summary,
                    ..
                } => {
                    let section = match resource_type.as_str() {
                        "User" => Some("users"),
                        "Group" => Some("groups"),
                        "Agent" => Some("agents"),
                        _ => None,
                    };
                    let target = match section {
                        Some(section) if op != "delete" => format!(
                            "<a href=\"{}\">{}</a>",
                            link(&format!("{section}/{}", escape(id))),
                            escape(id)
                        ),
                        _ => escape(id),
                    };
                    format!(
                        "#{seq} {} {} {target} <span class=\"muted\">({})</span>",
                        escape(op),
                        escape(resource_type),
                        escape(summary)
                    )
                }
                Entry::Refusal {
                    route,
                    rule,
                    reason,
                    method,
                    path,
                    agent,
                    ..
                } => format!(
                    "{} {} on {}{}: {} <span class=\"muted\">(rule {})</span>",
                    escape(method),
                    escape(path),
                    escape(route),
                    through(agent),
                    escape(reason),
                    escape(rule.as_deref().unwrap_or("none"))
                ),
                Entry::Allow {
                    route,
                    method,
                    path,
                    agent,
                    ..
                } => format!(
                    "{} {} on {}{}",
                    escape(method),
                    escape(path),
                    escape(route),
                    through(agent)
                ),
                Entry::Action {
                    action,
                    target,
                    outcome,
                    ..
                } => format!("{} {}: {}", escape(action), escape(target), escape(outcome)),
                Entry::Session { what, detail, .. } if detail.is_empty() => escape(what),
                Entry::Session { what, detail, .. } => format!(
                    "{} <span class=\"muted\">({})</span>",
                    escape(what),
                    escape(detail)
                ),
                Entry::Lost {
                    count: lost, why, ..
                } => {
                    let lost = count(usize::try_from(*lost).unwrap_or(usize::MAX));
                    format!("{lost} records were not kept: {}", escape(why))
                }
            };
            let kind = match entry {
                Entry::Refusal { .. } => "<span class=\"no\">refusal</span>".to_owned(),
                Entry::Lost { .. } => "<span class=\"no\">lost</span>".to_owned(),
                other => other.kind().to_owned(),
            };
            let from = entry.client().map_or_else(String::new, |client| {
                format!(" <span class=\"muted\">from {}</span>", escape(client))
            });
            html.push_str(&format!(
                "<tr><td>{when}</td><td>{kind}</td><td>{}{from}</td><td>{what}</td></tr>",
                escape(entry.who())
            ));
        }
        html.push_str("</tbody></table></div>");
        html
    }
}

/// The agent a request came through, as `portcullis audit` names it (a delegated token's
/// record is the person's, with the agent beside them).
fn through(agent: &Option<crate::audit::AgentRecord>) -> String {
    agent.as_ref().map_or_else(String::new, |agent| {
        format!(" <b>through the agent {}</b>", escape(&agent.human()))
    })
}

/// The other names the records of the user at `row` go by (see [`Filter::aliases`]): those of
/// their emails and their `externalId` that lead to them alone, and are no other user's
/// `userName`, so that no one else's records are taken for theirs.
fn aliases(index: &Index, row: Row) -> HashSet<String> {
    let Some(user) = index.user(row) else {
        return HashSet::new();
    };
    let theirs_alone = |rows: Vec<Row>, name: &str| {
        rows == [row] && index.user_by_name(name).is_none_or(|named| named == row)
    };
    let emails = user
        .emails
        .iter()
        .filter(|email| theirs_alone(index.users_by_email(email), email));
    let external_id = user
        .external_id
        .iter()
        .filter(|id| theirs_alone(index.users_by_external_id(id), id));
    emails
        .chain(external_id)
        .map(|name| portcullis_policy::fold(name).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_counts_the_last_day_by_hour() {
        let now = 1_000_000;
        let at = |ago: i64| {
            OffsetDateTime::from_unix_timestamp(now - ago)
                .unwrap()
                .format(&Rfc3339)
                .unwrap()
        };
        let refusal = |ago| Entry::Refusal {
            time: at(ago),
            user: "a".to_owned(),
            route: "r".to_owned(),
            rule: None,
            reason: "x".to_owned(),
            method: "GET".to_owned(),
            path: "/".to_owned(),
            client: None,
            agent: None,
        };
        let mut chart = PerHour {
            whole: true,
            ..PerHour::default()
        };
        let add = |chart: &mut PerHour, entry: &Entry| {
            let at = OffsetDateTime::parse(entry.time(), &Rfc3339).ok();
            chart.add(entry, at.map(|at| at.unix_timestamp()), now);
        };
        for ago in [10, 20, 3_700, 86_399, 86_400, -5] {
            add(&mut chart, &refusal(ago));
        }
        // As the audit log writes times: with nanoseconds.
        let mut precise = refusal(0);
        if let Entry::Refusal { time, .. } = &mut precise {
            *time = at(30).replace('Z', ".332051961Z");
        }
        add(&mut chart, &precise);
        // A flood's refusals counted but not recorded one by one are counted as many.
        let mut counted = refusal(40);
        if let Entry::Refusal {
            reason,
            method,
            path,
            ..
        } = &mut counted
        {
            *reason = "4900 more refusals of requests that named nobody, past the route's 100 \
                       a second, or one address's share of them (10 once 50 are taken), were \
                       counted but not recorded one by one"
                .to_owned();
            "-".clone_into(method);
            "-".clone_into(path);
        }
        add(&mut chart, &counted);
        assert_eq!(chart.refusals[HOURS - 1], 4903);
        assert_eq!(chart.refusals[HOURS - 2], 1);
        assert_eq!(chart.refusals[0], 1);
        assert_eq!(chart.refusals.iter().sum::<usize>(), 4905);
        let svg = chart.svg();
        assert!(svg.starts_with("<figure><svg class=\"chart\""), "{svg}");
        assert!(svg.contains("4,905 refusals"), "{svg}");
    }
}
