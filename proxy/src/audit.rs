//! The audit log: a record for every committed SCIM change, every refusal (a 403, a revoked
//! session, a credential that does not verify), every sign-in and sign-out, every console
//! action and a sample of allowed requests, as JSON
//! lines: appended to `data_dir/audit.jsonl` on one machine. With `[postgres]`, every replica
//! appends its refusals and allows to the fleet's table, `portcullis_audit`, and the SCIM
//! changes are the directory's own change table, written by the very commit that makes each
//! (exactly once); `portcullis audit` reads both, in time order. A request for a route that
//! presents no credential at all is asked for one (a sign-in, a 401), not recorded; one for
//! SCIM or the admin endpoints, which have no sign-in, is.
//!
//! Recording never blocks the request path: records go over a bounded channel to one writer
//! thread, which appends whatever has queued up at once (one write and fsync, or one INSERT).
//! With PostgreSQL, records it cannot take wait in a file beside the log until it can
//! ([`Spool`]). If the channel is full (the store cannot keep up), the record is dropped,
//! counted and logged; SCIM changes dropped that way, or lost to a crash before the write, are still in
//! the directory's own change table, and the file gets them at the next start
//! ([`Audit::recover_changes`]; the position kept beside the log stays short of the first
//! change dropped, see [`Losses`]). The file may be rotated by moving it away: the writer then
//! starts a new one ([`LogFile`]). A
//! graceful exit waits for the writer ([`Audit::flush`]). Every
//! record is also emitted through `tracing` (target `audit`), dropped or not. Refusals are
//! recorded one by one up to a rate per caller and route, and counted past it
//! ([`Audit::refusal`], [`Audit::unverified_refusal`]).
//!
//! Records hold names, routes, paths and reasons, never tokens, cookies, passwords or query
//! strings. `portcullis audit` reads the file back ([`run_cli`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use portcullis_scim::store::postgres::{AuditLog, AuditRow};
use portcullis_scim::store::{Change, ChangeSink};

pub const FILE_NAME: &str = "audit.jsonl";
/// With `[postgres]`, where the records PostgreSQL could not take wait for it, in `data_dir`.
pub const SPOOL_NAME: &str = "audit-spool.jsonl";

/// The `user` of a record of a request that names nobody Portcullis can trust.
const ANONYMOUS: &str = "anonymous";

/// Records that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16_384;
/// Records the writer appends with one write and one fsync (or one INSERT) at most.
const MAX_BATCH: usize = 1024;

/// Refusals of credentials that name nobody recorded one by one each second on a route (see
/// [`Audit::unverified_refusal`]); past it, they are counted instead.
const UNVERIFIED_PER_SECOND: u32 = 100;

/// Of those, the first this many each second go to whoever comes first; the rest only to
/// client addresses (an IPv6 one by its /64) with fewer than [`UNVERIFIED_PER_CLIENT`]
/// recorded that second. So one address flooding a route (bad SCIM tokens, forged logout
/// tokens) leaves half its budget to others, an IdP whose token has expired among them; and
/// clients that share an address (behind a load balancer without `trusted_proxies`) still
/// have half of it.
const UNVERIFIED_SHARED: u32 = 50;
const UNVERIFIED_PER_CLIENT: u32 = 10;

/// Refusals of one person's (or machine's, or agent's) requests recorded one by one each
/// second on a route (see [`Audit::refusal`]); past it, they are counted instead. A browser's
/// page of refused resources fits; a script looping on a forbidden path does not fill the log.
const NAMED_PER_SECOND: u32 = 20;

/// The longest reason recorded for a refusal of a request that names nobody, in bytes.
const MAX_REASON: usize = 512;

/// The longest reason recorded for any refusal, in bytes: one of someone named may quote
/// what their token claims.
const MAX_NAMED_REASON: usize = 2048;

/// The longest path, method and user name a record keeps, in bytes: a request line may be
/// far longer (64 KiB and more), and anyone can send one to be refused.
const MAX_PATH: usize = 1024;
const MAX_METHOD: usize = 32;
const MAX_USER: usize = 256;

/// `text`, or its first `max` bytes (on a character boundary) and how much was left out.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let kept = crate::reply::cut(text, max);
    format!("{kept}…({} bytes more)", text.len() - kept.len())
}

/// How often the writer tries to append a batch before it drops it; it waits a second after
/// each failure (a full disk), while new records queue up.
const ATTEMPTS: u32 = 10;

/// Where the records are kept.
pub enum Destination {
    /// `data_dir/audit.jsonl`: one machine's log.
    File(PathBuf),
    /// The fleet's table in PostgreSQL (`[postgres]`), and the file records wait in while it
    /// cannot take them ([`Spool`]).
    Postgres(Box<AuditLog>, PathBuf),
}

impl Destination {
    /// Where the records of the configuration in `data_dir`, with `postgres`, are kept.
    pub fn of(data_dir: &Path, postgres: Option<AuditLog>) -> Destination {
        match postgres {
            Some(log) => Destination::Postgres(Box::new(log), data_dir.join(SPOOL_NAME)),
            None => Destination::File(data_dir.join(FILE_NAME)),
        }
    }
}

/// The agent behind a request: its name, the owners it stands through (users' `userName`s,
/// groups' `displayName`s) and, for a delegated token, the person it acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    #[serde(default)]
    pub owners: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

/// Who the refusal of a bearer token older than a record names, and why: the caller (`who`),
/// or the person an agent's delegated token acts for, whose record it is older than; or the
/// agent the token acts through, whose record it is older than (named as the agent, or as the
/// person it acts for).
pub fn outdated_token(who: &str, outdated: Option<&crate::gate::Outdated>) -> (String, String) {
    let reason = |whose: &str, or: &str| {
        format!(
            "the bearer token was issued before {whose} was last created, re-activated or \
             given a new identifier in the directory{or} (or carries no iat): it is not \
             theirs, or no longer, and its client needs a new one"
        )
    };
    match outdated {
        Some(crate::gate::Outdated::Agent(agent)) => (
            agent
                .on_behalf_of
                .clone()
                .unwrap_or_else(|| crate::gate::agent_user(&agent.name)),
            reason(
                &format!("the agent {}", agent.name),
                ", or its application was re-activated",
            ),
        ),
        Some(crate::gate::Outdated::Caller(Some(AgentRecord {
            on_behalf_of: Some(person),
            ..
        }))) => (person.clone(), reason(person, "")),
        _ => (who.to_owned(), reason(who, "")),
    }
}

impl AgentRecord {
    /// `NAME (owners: A, B)`, and `for PERSON` when delegated.
    pub fn human(&self) -> String {
        let owners = match self.owners.as_slice() {
            [] => "none active".to_owned(),
            owners => owners.join(", "),
        };
        let mut text = format!("{} (owners: {owners})", self.name);
        if let Some(person) = &self.on_behalf_of {
            text.push_str(&format!(" for {person}"));
        }
        text
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Entry {
    /// A committed SCIM change; `actor` is the SCIM token's name, `client` the address its
    /// request came from (none in a change made before it was kept, or by Portcullis itself).
    Change {
        seq: u64,
        time: String,
        actor: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        op: String,
        resource_type: String,
        id: String,
        summary: String,
    },
    Refusal {
        time: String,
        user: String,
        route: String,
        #[serde(default)]
        rule: Option<String>,
        reason: String,
        method: String,
        path: String,
        /// The address the request came from (see `trusted_proxies`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentRecord>,
    },
    Allow {
        time: String,
        user: String,
        route: String,
        method: String,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentRecord>,
    },
    /// An action taken in the console: `actor` (the `userName` of who took it) did `action`
    /// (`end_sessions`, `reload`) to `target`, with `outcome`.
    Action {
        time: String,
        actor: String,
        action: String,
        target: String,
        outcome: String,
        /// The address the console was used from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// A person's session began or ended: `user` signed in (`what` `sign_in`) or out
    /// (`sign_out`), or the identity provider ended their sessions (`idp_logout`, by
    /// back-channel logout) or would not renew one (`idp_ended`); `detail` says more.
    Session {
        time: String,
        user: String,
        what: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
        /// The address of the request that began or ended it; none when the identity
        /// provider ended it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// `count` records of any kind were not kept, since the record of such before this one:
    /// dropped as the queue was full, or as the log could not be written (`why`). SCIM
    /// changes among them are appended at the next start (see [`Audit::recover_changes`]).
    Lost {
        time: String,
        count: u64,
        why: String,
    },
}

/// Whom a record of records not kept ([`Entry::Lost`]) names.
pub const LOST_BY: &str = "portcullis";

impl From<&Change> for Entry {
    fn from(c: &Change) -> Self {
        Entry::Change {
            seq: c.seq,
            time: c.time.clone(),
            actor: c.actor.clone(),
            client: c.client.clone(),
            op: c.op.clone(),
            resource_type: c.resource_type.clone(),
            id: c.id.clone(),
            summary: c.summary.clone(),
        }
    }
}

impl Entry {
    pub fn time(&self) -> &str {
        match self {
            Entry::Change { time, .. }
            | Entry::Refusal { time, .. }
            | Entry::Allow { time, .. }
            | Entry::Action { time, .. }
            | Entry::Session { time, .. }
            | Entry::Lost { time, .. } => time,
        }
    }

    /// The person or token the record is about.
    pub fn who(&self) -> &str {
        match self {
            Entry::Change { actor, .. } | Entry::Action { actor, .. } => actor,
            Entry::Refusal { user, .. }
            | Entry::Allow { user, .. }
            | Entry::Session { user, .. } => user,
            Entry::Lost { .. } => LOST_BY,
        }
    }

    /// The `event` it is stored as.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Change { .. } => "change",
            Entry::Refusal { .. } => "refusal",
            Entry::Allow { .. } => "allow",
            Entry::Action { .. } => "action",
            Entry::Session { .. } => "session",
            Entry::Lost { .. } => "lost",
        }
    }

    /// The address the request came from, where a request made the record.
    pub fn client(&self) -> Option<&str> {
        match self {
            Entry::Change { client, .. }
            | Entry::Refusal { client, .. }
            | Entry::Allow { client, .. }
            | Entry::Action { client, .. }
            | Entry::Session { client, .. } => client.as_deref(),
            Entry::Lost { .. } => None,
        }
    }

    /// The route of a refusal or an allow.
    pub fn route(&self) -> Option<&str> {
        match self {
            Entry::Refusal { route, .. } | Entry::Allow { route, .. } => Some(route),
            Entry::Change { .. }
            | Entry::Action { .. }
            | Entry::Session { .. }
            | Entry::Lost { .. } => None,
        }
    }

    /// One line a person can read. Control characters are shown escaped: a name pushed over
    /// SCIM or a requested path cannot start a line of its own or restyle the terminal.
    pub fn human(&self) -> String {
        let line = match self {
            Entry::Change {
                seq,
                time,
                actor,
                client,
                op,
                resource_type,
                id,
                summary,
            } => format!(
                "{time} change  #{seq} by {actor}{}: {op} {resource_type} {id} ({summary})",
                from(client)
            ),
            Entry::Refusal {
                time,
                user,
                route,
                rule,
                reason,
                method,
                path,
                client,
                agent,
            } => format!(
                "{time} refusal {user}{}{} {method} {path} on route {route}{}: {reason}",
                from(client),
                through(agent),
                by_rule(rule)
            ),
            Entry::Allow {
                time,
                user,
                route,
                method,
                path,
                client,
                agent,
            } => format!(
                "{time} allow   {user}{}{} {method} {path} on route {route}",
                from(client),
                through(agent)
            ),
            Entry::Action {
                time,
                actor,
                action,
                target,
                outcome,
                client,
            } => format!(
                "{time} action  {actor}{}: {action} {target} ({outcome})",
                from(client)
            ),
            Entry::Session {
                time,
                user,
                what,
                detail,
                client,
            } => match detail.as_str() {
                "" => format!("{time} session {user}{}: {what}", from(client)),
                detail => format!("{time} session {user}{}: {what} ({detail})", from(client)),
            },
            Entry::Lost { time, count, why } => {
                format!("{time} lost    {count} records were not kept: {why}")
            }
        };
        crate::human::printable(&line).into_owned()
    }
}

fn from(client: &Option<String>) -> String {
    client
        .as_deref()
        .map_or_else(String::new, |client| format!(" from {client}"))
}

fn through(agent: &Option<AgentRecord>) -> String {
    agent
        .as_ref()
        .map_or_else(String::new, |agent| format!(" [agent {}]", agent.human()))
}

fn by_rule(rule: &Option<String>) -> String {
    rule.as_deref()
        .map_or_else(String::new, |rule| format!(" by {rule}"))
}

/// What the writer thread is sent. Records are the traffic, sent as they are (no box each);
/// a flush is once per process.
#[allow(clippy::large_enum_variant)]
enum Queued {
    Record(Entry),
    /// Write everything sent before this, and the refusals counted so far, then say so.
    Flush(SyncSender<()>),
    /// Every SCIM change up to this one is in the log once what was sent before this is:
    /// recovery has appended all the file lacked.
    Through(u64),
}

/// The request a refusal or an allow is about: its method, its path (as judged), and the
/// address it came from (see `trusted_proxies`).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub client: Option<IpAddr>,
}

/// The sending side of the audit log, shared by every request.
pub struct Audit {
    queue: SyncSender<Queued>,
    /// The log, to read back (the console's timeline).
    reader: Arc<Reader>,
    losses: Arc<Losses>,
    /// Whether SCIM changes are recorded by the store itself (PostgreSQL), not here.
    changes_in_store: bool,
    /// The file appended to, when it is one.
    file: Option<PathBuf>,
    budgets: Arc<Mutex<Budgets>>,
}

/// What the log has lost since the process started: how many records, and the first SCIM
/// change among them, short of which the log's position is kept ([`LogFile`]), so that the
/// next start appends it ([`Audit::recover_changes`]) though later changes were written.
struct Losses {
    dropped: AtomicU64,
    /// Records dropped as the queue was full, and in appends that kept failing, since the
    /// writer last recorded such ([`Entry::Lost`]).
    unrecorded_full: AtomicU64,
    unrecorded_failed: AtomicU64,
    /// The sequence of the first change lost; `u64::MAX`: none.
    first_change: AtomicU64,
    /// The Unix second drops were last logged in.
    told: AtomicU64,
}

impl Default for Losses {
    fn default() -> Self {
        Self {
            dropped: AtomicU64::new(0),
            unrecorded_full: AtomicU64::new(0),
            unrecorded_failed: AtomicU64::new(0),
            first_change: AtomicU64::new(u64::MAX),
            told: AtomicU64::new(0),
        }
    }
}

impl Losses {
    /// Whether a drop at `second` is to be logged: the first of each second, so that a flood
    /// of drops is not a flood of lines, and every incident, however late, is told (a clock
    /// stepped back too, whose seconds were told before).
    fn worth_telling(&self, second: u64) -> bool {
        let told = self.told.load(Ordering::Relaxed);
        told != second
            && (self.told)
                .compare_exchange(told, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn lost_change(&self, seq: u64) {
        self.first_change.fetch_min(seq, Ordering::SeqCst);
    }

    /// The position a log holding changes up to `last` may keep: every change before the
    /// first lost one is written.
    fn position(&self, last: u64) -> u64 {
        last.min(self.first_change.load(Ordering::SeqCst).saturating_sub(1))
    }
}

/// Refusals per route and caller: how many were recorded one by one this second, and how many
/// were counted instead since the writer last recorded that count. Only callers refused this
/// second, or with a count to record, are kept.
#[derive(Debug, Default)]
struct Budgets {
    second: u64,
    routes: HashMap<String, HashMap<Caller, Budget>>,
}

/// Whose refusals a budget counts: requests that name nobody, or someone's (a person named
/// `anonymous` included, whose budget is their own).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Caller {
    Anonymous,
    Named(String),
}

#[derive(Debug, Default)]
struct Budget {
    recorded: u32,
    unrecorded: u64,
    /// Of refusals that named nobody, those recorded this second by client address (see
    /// [`UNVERIFIED_SHARED`]): at most as many addresses as were recorded.
    by_client: HashMap<IpAddr, u32>,
}

impl Budgets {
    /// Whether a refusal of `who` on `route` at `second` is recorded one by one (at most
    /// [`Caller::per_second`]); if not, it is counted.
    /// One that names nobody from `client` is recorded within its share (see
    /// [`UNVERIFIED_SHARED`]).
    fn take(&mut self, who: &Caller, route: &str, client: Option<IpAddr>, second: u64) -> bool {
        if second != self.second {
            self.second = second;
            for callers in self.routes.values_mut() {
                callers.retain(|_, b| b.unrecorded > 0);
                callers.values_mut().for_each(|b| {
                    b.recorded = 0;
                    b.by_client.clear();
                });
            }
            self.routes.retain(|_, callers| !callers.is_empty());
        }
        let callers = match self.routes.get_mut(route) {
            Some(callers) => callers,
            None => self.routes.entry(route.to_owned()).or_default(),
        };
        let budget = match callers.get_mut(who) {
            Some(budget) => budget,
            None => callers.entry(who.clone()).or_default(),
        };
        let client = client.filter(|_| *who == Caller::Anonymous).map(network_of);
        let by_client = client.map_or(0, |c| budget.by_client.get(&c).copied().unwrap_or(0));
        let shared = budget.recorded < UNVERIFIED_SHARED || by_client < UNVERIFIED_PER_CLIENT;
        if budget.recorded < who.per_second() && (client.is_none() || shared) {
            budget.recorded += 1;
            if let Some(client) = client {
                *budget.by_client.entry(client).or_default() += 1;
            }
            return true;
        }
        budget.unrecorded += 1;
        if budget.unrecorded == 1 {
            let (user, budget) = (bounded(who.name(), MAX_USER), who.budget());
            tracing::warn!(
                target: "audit",
                route,
                user,
                // The user only as a field, written escaped: a name from the directory may hold
                // a line break, which would forge a line in the plain format's message.
                "refusals of this user's requests {budget}: the rest are counted, not recorded \
                 one by one"
            );
        }
        false
    }

    /// The refusals counted and not recorded, by route and caller, since this was last asked;
    /// and the count starts again.
    fn unrecorded(&mut self) -> Vec<Unrecorded> {
        let mut counts: Vec<Unrecorded> = self
            .routes
            .iter_mut()
            .flat_map(|(route, callers)| {
                callers
                    .iter_mut()
                    .filter(|(_, b)| b.unrecorded > 0)
                    .map(|(who, b)| Unrecorded {
                        route: route.clone(),
                        who: who.clone(),
                        count: std::mem::take(&mut b.unrecorded),
                    })
            })
            .collect();
        counts.sort();
        counts
    }
}

/// The address a client's share of a budget is kept by: an IPv4 one, or an IPv6 one's /64
/// (one host may have all of it).
fn network_of(ip: IpAddr) -> IpAddr {
    // An IPv4 caller as a dual-stack socket names it (`::ffff:a.b.c.d`) is that IPv4 address.
    let ip = ip.to_canonical();
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

impl Caller {
    /// The `user` of the caller's records.
    fn name(&self) -> &str {
        match self {
            Caller::Anonymous => ANONYMOUS,
            Caller::Named(name) => name,
        }
    }

    /// How many of the caller's refusals on a route are recorded one by one each second.
    fn per_second(&self) -> u32 {
        match self {
            Caller::Anonymous => UNVERIFIED_PER_SECOND,
            Caller::Named(_) => NAMED_PER_SECOND,
        }
    }

    /// The budget its refusals went past, in words: for nobody's, the route's or, once half
    /// of it is taken, one address's share (see [`Budgets::take`]).
    fn budget(&self) -> String {
        match self {
            Caller::Anonymous => format!(
                "past the route's {UNVERIFIED_PER_SECOND} a second, or one address's share of \
                 them ({UNVERIFIED_PER_CLIENT} once {UNVERIFIED_SHARED} are taken)"
            ),
            Caller::Named(_) => format!("past {NAMED_PER_SECOND} a second"),
        }
    }
}

/// Refusals of `who` on `route` counted but not recorded one by one (see [`Budgets`]).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Unrecorded {
    route: String,
    who: Caller,
    count: u64,
}

/// The records of `counts` (see [`Budgets::unrecorded`]).
fn unrecorded_records(counts: Vec<Unrecorded>) -> impl Iterator<Item = Entry> {
    counts.into_iter().map(|Unrecorded { route, who, count }| {
        let budget = who.budget();
        let whose = match &who {
            Caller::Anonymous => "requests that named nobody".to_owned(),
            Caller::Named(name) => format!("{}'s requests", bounded(name, MAX_USER)),
        };
        let reason = format!(
            "{count} {UNRECORDED} of {whose}, {budget}, were counted but not recorded one by one"
        );
        let user = bounded(who.name(), MAX_USER);
        // On stdout too, as every refusal is: a flood is the count's to tell.
        tracing::warn!(target: "audit", event = "refusal", user, route, count, reason);
        Entry::Refusal {
            time: now(),
            user,
            route,
            rule: None,
            reason,
            method: "-".to_owned(),
            path: "-".to_owned(),
            client: None,
            agent: None,
        }
    })
}

/// Records of the records not kept since the last such, one for each cause that lost any
/// ([`Entry::Lost`]). Written by the writer itself, they wait in no queue; one whose append
/// fails is among the records that append loses, and counted in the next.
fn lost_records(losses: &Losses) -> Vec<Entry> {
    let causes = [
        (
            &losses.unrecorded_full,
            "the queue was full (the log could not keep up)",
        ),
        (&losses.unrecorded_failed, "the log could not be written"),
    ];
    let causes = causes.into_iter().filter_map(|(unrecorded, why)| {
        let count = unrecorded.swap(0, Ordering::Relaxed);
        (count > 0).then(|| Entry::Lost {
            time: now(),
            count,
            why: why.to_owned(),
        })
    });
    causes.collect()
}

/// What a record of refusals counted but not recorded one by one says after their number.
const UNRECORDED: &str = "more refusals";

/// How many refusals `entry` records: one, or as many as a record of those counted but not
/// recorded one by one says ([`unrecorded_records`]).
pub fn refusals_in(entry: &Entry) -> usize {
    match entry {
        Entry::Refusal {
            method,
            path,
            reason,
            ..
        } if method == "-" && path == "-" => reason
            .split_once(' ')
            .filter(|(_, rest)| rest.starts_with(UNRECORDED))
            .and_then(|(count, _)| count.parse().ok())
            .unwrap_or(1),
        Entry::Refusal { .. } => 1,
        _ => 0,
    }
}

impl Audit {
    /// Starts the writer to `destination`; a file is opened (created with mode 0600) for
    /// appending first. `read_from` is the same log, for reading it back (with `[postgres]`,
    /// a connection of its own).
    pub fn open(destination: Destination, read_from: Destination) -> Result<Self, String> {
        let changes_in_store = matches!(destination, Destination::Postgres(..));
        let file = match &destination {
            Destination::File(path) => Some(path.clone()),
            Destination::Postgres(..) => None,
        };
        let mut store = match destination {
            Destination::File(path) => {
                let mut log = LogFile::open(path)?;
                take_back_spool(&mut log);
                Store::File(log)
            }
            Destination::Postgres(log, spool) => Store::Postgres(log, Spool::open(spool)?),
        };
        let (queue, records) = mpsc::sync_channel(QUEUE);
        let budgets = Arc::new(Mutex::new(Budgets::default()));
        let counted = budgets.clone();
        let losses = Arc::new(Losses::default());
        let lost = losses.clone();
        thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || write_loop(&mut store, &records, &counted, &lost))
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
        Ok(Self {
            queue,
            reader: Arc::new(Reader::new(read_from)),
            losses,
            changes_in_store,
            file,
            budgets,
        })
    }

    /// Appends the SCIM changes the directory committed that the log lacks: those a crash
    /// took before they were written, or a full queue or a failed write dropped, also before
    /// later ones that were written. `last` is the directory's last change and
    /// `changes(after, limit)` reads its own change table. Run at start, before the directory
    /// takes writes; returns how many were appended. Nothing to do when the store records the
    /// changes itself (PostgreSQL).
    pub fn recover_changes(
        &self,
        last: u64,
        changes: impl Fn(u64, usize) -> Result<Vec<Change>, String>,
    ) -> Result<usize, String> {
        const PAGE: usize = 1024;
        let Some(path) = self.file.as_deref().filter(|_| !self.changes_in_store) else {
            return Ok(0);
        };
        let (mut after, mut written) = log_position(path)?;
        if after > last {
            // The log stands past the directory's last change: it recorded another directory
            // (`directory.redb` moved out, or an older copy put back), whose sequences this
            // one's would be taken for. It is moved aside, as a rotation moves it, and this
            // one's changes are recovered from its last on.
            let aside = move_aside(path)?;
            tracing::warn!(
                target: "audit",
                "the audit log stood at change {after}, past the directory's last ({last}): it \
                 recorded another directory, and is moved to {}",
                aside.display()
            );
            // Kept now: a start that found it kept no further would move the next log aside.
            keep_position(path, last)?;
            (after, written) = (last, HashSet::new());
        }
        let mut recovered = 0;
        loop {
            let page = changes(after, PAGE)?;
            let Some(last) = page.last() else {
                // The position moves past what the file held already, not only to the last
                // change appended now.
                if self.queue.send(Queued::Through(after)).is_err() {
                    return Err("the audit writer has stopped".to_owned());
                }
                return Ok(recovered);
            };
            after = last.seq;
            for change in page.iter().filter(|c| !written.contains(&c.seq)) {
                recovered += 1;
                // Waits for room: nothing else is queued this early, and none may be lost.
                if self
                    .queue
                    .send(Queued::Record(Entry::from(change)))
                    .is_err()
                {
                    return Err("the audit writer has stopped".to_owned());
                }
            }
        }
    }

    /// Waits, up to `wait`, until every record sent so far (and every refusal counted) is
    /// written: before the process exits, so that nothing queued in its last moments is lost.
    /// Whether they were.
    pub fn flush(&self, wait: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        let (ack, done) = mpsc::sync_channel(1);
        let mut flush = Queued::Flush(ack);
        loop {
            match self.queue.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if std::time::Instant::now() < deadline => {
                    flush = again;
                    thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }

    /// The log, to read back.
    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    /// What the directory calls with each batch of SCIM changes this process committed.
    pub fn change_sink(&self) -> ChangeSink {
        let queue = self.queue.clone();
        let losses = self.losses.clone();
        let record = !self.changes_in_store;
        Box::new(move |changes: &[Change]| {
            for change in changes {
                tracing::info!(
                    target: "audit",
                    event = "change",
                    seq = change.seq,
                    actor = %change.actor,
                    client = change.client.as_deref().unwrap_or("-"),
                    op = %change.op,
                    resource_type = %change.resource_type,
                    id = %change.id,
                    summary = %change.summary,
                );
                if record {
                    enqueue(&queue, &losses, Entry::from(change));
                }
            }
        })
    }

    /// Records an action taken in the console, from `client`.
    pub fn action(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        client: Option<IpAddr>,
    ) {
        let client = client.map(|ip| ip.to_string());
        let shown = client.as_deref().unwrap_or("-");
        // `on`, not `target`: a JSON log line's own `target` (`audit`) would stand beside it,
        // and readers keep the last of two keys.
        tracing::warn!(
            target: "audit",
            event = "action",
            actor,
            client = shown,
            action,
            on = target,
            outcome
        );
        self.send(Entry::Action {
            time: now(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: outcome.to_owned(),
            client,
        });
    }

    /// Records the refusal of a request from `user` (a person, machine or agent the directory
    /// or a verified token names) on `route`, by `rule` when one decided it.
    ///
    /// So that someone looping on a forbidden path does not fill the disk, at most
    /// [`NAMED_PER_SECOND`] of one caller's refusals on a route are recorded one by one each
    /// second. The rest are counted, and the writer records each count about once a second
    /// (and at [`Audit::flush`]), as for [`Audit::unverified_refusal`].
    pub fn refusal(
        &self,
        user: &str,
        route: &str,
        rule: Option<&str>,
        reason: &str,
        request: &Request<'_>,
        agent: Option<&AgentRecord>,
    ) {
        // An agent's refusals share the agent's budget, for whomever it acts: one looping on
        // the tokens of hundreds of people is still one caller.
        let budgeted = match agent {
            Some(agent) => crate::gate::agent_user(&agent.name),
            None => user.to_owned(),
        };
        if self.within_budget(&Caller::Named(budgeted), route, None) {
            self.record_refusal(user, route, rule, reason, request, agent);
        }
    }

    /// Records the refusal of `user`'s token on `route`, held by `client`, which the token's
    /// issuer takes none of a person's tokens from: within the client's budget, as an agent's
    /// refusals are within the agent's (an application replaying the tokens of hundreds of
    /// people who sign in to it is one caller).
    pub fn refusal_of_a_client(
        &self,
        user: &str,
        client: &str,
        route: &str,
        reason: &str,
        request: &Request<'_>,
    ) {
        let budgeted = Caller::Named(format!("client {client}"));
        if self.within_budget(&budgeted, route, None) {
            self.record_refusal(user, route, None, reason, request, None);
        }
    }

    /// Whether a refusal of `who` on `route` is recorded one by one (see [`Budgets::take`]).
    fn within_budget(&self, who: &Caller, route: &str, client: Option<IpAddr>) -> bool {
        match self.budgets.lock() {
            Ok(mut budgets) => budgets.take(who, route, client, crate::clock::now_unix()),
            Err(_) => true,
        }
    }

    fn record_refusal(
        &self,
        user: &str,
        route: &str,
        rule: Option<&str>,
        reason: &str,
        request: &Request<'_>,
        agent: Option<&AgentRecord>,
    ) {
        let (user, method, path) = (
            bounded(user, MAX_USER),
            bounded(request.method, MAX_METHOD),
            bounded(request.path, MAX_PATH),
        );
        let reason = bounded(reason, MAX_NAMED_REASON);
        let client = request.client.map(|ip| ip.to_string());
        tracing::warn!(
            target: "audit",
            event = "refusal",
            user,
            client = client.as_deref().unwrap_or("-"),
            route,
            rule = rule.unwrap_or("-"),
            method,
            path,
            reason,
            agent = agent.map(|a| a.name.as_str()).unwrap_or("-"),
        );
        self.send(Entry::Refusal {
            time: now(),
            user,
            route: route.to_owned(),
            rule: rule.map(str::to_owned),
            reason,
            method,
            path,
            client,
            agent: agent.cloned(),
        });
    }

    /// Records the refusal of a session that began before its user `who` was deactivated or
    /// re-created in the directory, or a stranger's that cannot be judged on its groups
    /// (`outdated` says which; see [`crate::gate::Outdated::session_reason`]), and is ended for
    /// it, wherever it was presented.
    /// Always recorded: the session is ended by it, so its next request asks for a sign-in and
    /// is not refused again.
    pub fn revoked_session(
        &self,
        who: &str,
        route: &str,
        outdated: Option<&crate::gate::Outdated>,
        request: &Request<'_>,
    ) {
        let deactivated = crate::gate::Outdated::Caller(None);
        let reason = outdated.unwrap_or(&deactivated).session_reason(who);
        self.record_refusal(who, route, None, &reason, request, None);
    }

    /// Records that `user`'s session began or ended (see [`Entry::Session`]), in a request
    /// from `client` (none when the identity provider ended it).
    pub fn session(&self, user: &str, what: &str, detail: &str, client: Option<IpAddr>) {
        // The detail may quote the IdP (a refresh's error): cut as a named refusal's reason.
        let detail = &bounded(detail, MAX_NAMED_REASON);
        let client = client.map(|ip| ip.to_string());
        let shown = client.as_deref().unwrap_or("-");
        tracing::info!(target: "audit", event = "session", user, client = shown, what, detail);
        self.send(Entry::Session {
            time: now(),
            user: user.to_owned(),
            what: what.to_owned(),
            detail: detail.to_owned(),
            client,
        });
    }

    /// Records the refusal of a request that names nobody Portcullis can trust: a bearer
    /// token that does not verify, a SCIM or admin token that is not one of ours, a sign-in
    /// that fails, a request with no credential outside a public route's public paths, a
    /// session cookie a replica out of touch does not hold. The
    /// user is `anonymous` (an unverified token's claims are anyone's to
    /// write) and `reason` says what was wrong with it, never what it was; it is cut to
    /// [`MAX_REASON`] bytes, as it may quote what the caller sent (an IdP's error description).
    ///
    /// Anyone can send these, as fast as they like; so that a flood of them neither fills the
    /// disk nor crowds out the records of real people, at most [`UNVERIFIED_PER_SECOND`] a
    /// route are recorded one by one each second. The rest are counted, and the writer records
    /// each route's count about once a second (and at [`Audit::flush`], before an exit).
    pub fn unverified_refusal(&self, route: &str, reason: &str, request: &Request<'_>) {
        if self.within_budget(&Caller::Anonymous, route, request.client) {
            let reason = bounded(reason, MAX_REASON);
            self.record_refusal(ANONYMOUS, route, None, &reason, request, None);
        }
    }

    /// Records a bearer token refused for the reason `why` (see [`Self::unverified_refusal`]).
    pub fn refused_bearer(&self, route: &str, why: &str, request: &Request<'_>) {
        let reason = format!("a bearer token was refused: {why}");
        self.unverified_refusal(route, &reason, request);
    }

    /// Records an allowed request with probability `rate` (`0.0` never, `1.0` always).
    pub fn allow_sampled(
        &self,
        rate: f64,
        user: &str,
        route: &str,
        request: &Request<'_>,
        agent: Option<&AgentRecord>,
    ) {
        if rate <= 0.0 || (rate < 1.0 && rand::random::<f64>() >= rate) {
            return;
        }
        let (user, method, path) = (
            bounded(user, MAX_USER),
            bounded(request.method, MAX_METHOD),
            bounded(request.path, MAX_PATH),
        );
        let client = request.client.map(|ip| ip.to_string());
        let shown = client.as_deref().unwrap_or("-");
        tracing::info!(target: "audit", event = "allow", user, client = shown, route, method, path);
        self.send(Entry::Allow {
            time: now(),
            user,
            route: route.to_owned(),
            method,
            path,
            client,
            agent: agent.cloned(),
        });
    }

    fn send(&self, entry: Entry) {
        enqueue(&self.queue, &self.losses, entry);
    }
}

fn enqueue(queue: &SyncSender<Queued>, losses: &Losses, entry: Entry) {
    let lost_change = |refused: &Queued| {
        if let Queued::Record(Entry::Change { seq, .. }) = refused {
            losses.lost_change(*seq);
        }
    };
    let dropped = &losses.dropped;
    match queue.try_send(Queued::Record(entry)) {
        Ok(()) => {}
        Err(TrySendError::Full(refused)) => {
            lost_change(&refused);
            crate::metrics::count_audit_lost("queue_full", 1);
            losses.unrecorded_full.fetch_add(1, Ordering::Relaxed);
            let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if losses.worth_telling(crate::clock::now_unix()) {
                tracing::error!(
                    target: "audit",
                    dropped = n,
                    "the audit log cannot keep up; records dropped so far: {n}"
                );
            }
        }
        Err(TrySendError::Disconnected(refused)) => {
            lost_change(&refused);
            crate::metrics::count_audit_lost("writer_stopped", 1);
            dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(target: "audit", "the audit writer has stopped; record dropped");
        }
    }
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// An open [`Destination`].
enum Store {
    File(LogFile),
    Postgres(Box<AuditLog>, Spool),
}

impl Store {
    /// Appends `lines` (each a record and its newline) durably; `position`, if any, is where
    /// the log then stands: the last SCIM change up to which every change is written. With
    /// PostgreSQL, records it cannot take now are kept in the [`Spool`] (durably too), and
    /// go to it after those kept before them once it can. `urgent` (a flush, the process
    /// stopping): these are kept in the spool first, then the spool is moved on while
    /// PostgreSQL takes it: one that does not answer holds up the move past the flush's time,
    /// not the records, which the next process on the `data_dir` moves.
    fn append(
        &mut self,
        lines: &[String],
        position: Option<u64>,
        urgent: bool,
    ) -> Result<(), String> {
        match self {
            Store::File(file) => file.append(lines, position),
            Store::Postgres(log, spool) => {
                spool.look();
                // (One the spool cannot take, a full disk say, goes on as any other: to
                // PostgreSQL if it takes them now.)
                if urgent && (lines.is_empty() || spool.append(lines).is_ok()) {
                    if !spool.failing() {
                        spool.move_to(log);
                    }
                    return Ok(());
                }
                let none_waits = spool.is_empty() || spool.move_to(log);
                if lines.is_empty() {
                    return Ok(());
                }
                if none_waits {
                    let records: Vec<&str> = lines.iter().map(|line| line.trim_end()).collect();
                    match log.append(&records) {
                        Ok(()) => return Ok(()),
                        Err(e) => spool.postgres_failed(&e.to_string()),
                    }
                }
                spool.append(lines)
            }
        }
    }

    /// Whether records wait to be moved on though no new one comes ([`Spool`]): this
    /// process's, or (looked for once a second) another's that left them on the same
    /// `data_dir` (a process stopped while this one started).
    fn waits(&mut self) -> bool {
        match self {
            Store::File(_) => false,
            Store::Postgres(_, spool) => {
                spool.look();
                !spool.is_empty()
            }
        }
    }
}

/// The records PostgreSQL could not take (down, restarting, unreachable), kept in
/// `data_dir/audit-spool.jsonl` until it can: appended and synced as the log file is, and
/// moved to the table oldest first, before any record written after them, a batch per
/// transaction. How far the moves have gone is kept beside it (`audit-spool.moved`, synced
/// after each), and the file is emptied once all are moved. PostgreSQL is asked again after
/// a second, then after twice as long each time it fails, up to [`SPOOL_RETRY_MAX`]. A crash
/// (or a lost answer) between a batch's commit and the note of it has that batch moved again:
/// kept twice, never lost (on a disk too full for the note, every batch noted only in memory
/// since the last note that was written). The file is locked while it is written or moved from, so two
/// processes on one `data_dir` lose none of each other's.
struct Spool {
    path: PathBuf,
    /// `audit-spool.moved`: the bytes of the spool already moved.
    moved: PathBuf,
    /// How far this process has moved the spool, where the note could not be written (a full
    /// disk): the moves go on, and a crash moves those again.
    noted: Option<Noted>,
    /// Whether records wait in the file, as this process last saw it, and when it looked.
    waiting: bool,
    looked: std::time::Instant,
    /// When PostgreSQL may be asked again, and how long after that if it fails again.
    retry_at: std::time::Instant,
    backoff: std::time::Duration,
    /// [`SPOOL_MAX_BYTES`] (less in tests).
    max_bytes: u64,
}

/// [`Spool::noted`]: the spool's inode, how far it is moved, and the bytes it begins with and
/// those just before that, by which a file emptied and written again by another process
/// meanwhile (as the same file, cut to nothing) is told apart: the file only grows between
/// emptyings, and its first record then begins with a time of its own.
struct Noted {
    ino: u64,
    from: u64,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Noted {
    const BYTES: u64 = 128;

    fn of(spool: &File, ino: u64, from: u64) -> Option<Noted> {
        use std::os::unix::fs::FileExt;
        let read = |start: u64, end: u64| {
            let mut bytes = vec![0; usize::try_from(end - start).ok()?];
            spool.read_exact_at(&mut bytes, start).ok()?;
            Some(bytes)
        };
        Some(Noted {
            ino,
            from,
            head: read(0, from.min(Self::BYTES))?,
            tail: read(from.saturating_sub(Self::BYTES), from)?,
        })
    }

    /// Whether it is of `spool` (its inode `ino`, `len` long) as it is now.
    fn holds(&self, spool: &File, ino: u64, len: u64) -> bool {
        self.ino == ino
            && self.from <= len
            && Noted::of(spool, ino, self.from)
                .is_some_and(|now| now.head == self.head && now.tail == self.tail)
    }
}

const SPOOL_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const SPOOL_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(32);
/// The most the spool holds waiting to be moved; past it, records are dropped (and counted).
/// The file, with those moved already, grows to at most twice that before it is compacted
/// ([`Spool::compact`]): while PostgreSQL takes them back, new records are not dropped for
/// the room the moved ones took.
const SPOOL_MAX_BYTES: u64 = 256 << 20;
/// The longest one turn of the writer moves records for, before it sees to new ones.
const SPOOL_MOVE_TURN: std::time::Duration = std::time::Duration::from_secs(1);
/// The most read of the spool at once: a batch of records, or more for one record longer
/// than that (a group's change naming a million members), up to the spool's whole size.
const SPOOL_READ_BYTES: usize = 4 << 20;

impl Spool {
    /// The spool at `path`, holding what an earlier run could not move (if anything).
    fn open(path: PathBuf) -> Result<Self, String> {
        let waiting = match std::fs::metadata(&path) {
            Ok(meta) => meta.len() > 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        // A copy a crash left before it was put in place (see `Spool::compact`).
        let _ = std::fs::remove_file(path.with_extension("compacted"));
        Ok(Self {
            moved: path.with_extension("moved"),
            noted: None,
            path,
            waiting,
            looked: std::time::Instant::now(),
            retry_at: std::time::Instant::now(),
            backoff: SPOOL_RETRY_FIRST,
            max_bytes: SPOOL_MAX_BYTES,
        })
    }

    fn is_empty(&self) -> bool {
        !self.waiting
    }

    /// Whether PostgreSQL failed a moment ago (and is not to be asked again yet).
    fn failing(&self) -> bool {
        std::time::Instant::now() < self.retry_at
    }

    /// Looks (at most once a second) whether another process left records in the file.
    fn look(&mut self) {
        if self.waiting || self.looked.elapsed() < SPOOL_RETRY_FIRST {
            return;
        }
        self.looked = std::time::Instant::now();
        self.waiting = std::fs::metadata(&self.path).is_ok_and(|meta| meta.len() > 0);
    }

    fn postgres_failed(&mut self, why: &str) {
        if self.is_empty() {
            tracing::warn!(
                target: "audit",
                "PostgreSQL cannot take audit records ({why}): keeping them in {} until it can",
                self.path.display()
            );
        }
        self.retry_at = std::time::Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(SPOOL_RETRY_MAX);
    }

    /// The spool file, opened and locked (for as long as it is held): the one at its path
    /// once locked, not one another process put a compacted file in the place of meanwhile.
    fn locked(&self) -> std::io::Result<File> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)?;
            file.lock()?;
            let held = file.metadata()?;
            match std::fs::metadata(&self.path) {
                Ok(at) if (at.dev(), at.ino()) == (held.dev(), held.ino()) => return Ok(file),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends `lines` and syncs them.
    fn append(&mut self, lines: &[String]) -> Result<(), String> {
        let cannot = |e: std::io::Error| format!("cannot write {}: {e}", self.path.display());
        let mut file = self.locked().map_err(cannot)?;
        let len = file.metadata().map_err(cannot)?.len();
        if len == 0 {
            // A note of moves from a file emptied since (by hand, say) says nothing of this one.
            self.noted = None;
            remove_synced(&self.moved).map_err(cannot)?;
        }
        let bytes: u64 = lines.iter().map(|line| line.len() as u64).sum();
        let moved = self.moved_through(&file, len);
        if (len - moved).saturating_add(bytes) > self.max_bytes {
            return Err(format!(
                "{} holds {} MiB already, waiting for PostgreSQL",
                self.path.display(),
                self.max_bytes >> 20
            ));
        }
        // Full of records moved already (they are moved a batch at a time, and the file is
        // emptied only once all are): their room is given back, copying at most the bound to
        // give back about as much.
        let mut len = len;
        if len.saturating_add(bytes) > self.max_bytes.saturating_mul(2) {
            self.compact(&file, len, moved).map_err(cannot)?;
            self.noted = None;
            file = self.locked().map_err(cannot)?;
            len = file.metadata().map_err(cannot)?.len();
        }
        // A record a crash cut short stands alone, unread (it is no JSON), taking none after
        // it down.
        let text = on_a_line_of_their_own(&file, len, lines).map_err(cannot)?;
        // A write that fails part way (a full disk), or whose sync fails, is cut off again, as
        // the log file's is: the retry neither follows a torn record nor repeats the ones that
        // made it (each would be moved to PostgreSQL twice).
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data());
        if written.is_err() {
            let _ = file.set_len(len);
        }
        written.map_err(cannot)?;
        self.waiting = true;
        Ok(())
    }

    /// Moves the records waiting to PostgreSQL, a batch at a time, for at most
    /// [`SPOOL_MOVE_TURN`], if it is time to ask it; whether none waits any longer.
    fn move_to(&mut self, log: &mut AuditLog) -> bool {
        if std::time::Instant::now() < self.retry_at {
            return false;
        }
        let started = std::time::Instant::now();
        let mut insert = |records: &[&str]| log.append(records).map_err(|e| e.to_string());
        match self.move_batches(&mut insert, started) {
            Ok(true) => {
                tracing::info!(
                    target: "audit",
                    "moved the audit records kept while PostgreSQL could not take them"
                );
                self.waiting = false;
                self.backoff = SPOOL_RETRY_FIRST;
                true
            }
            Ok(false) => false,
            Err(Moving::Postgres(e)) => {
                self.postgres_failed(&e);
                false
            }
            Err(Moving::File(e)) => {
                tracing::error!(target: "audit", "cannot move {}: {e}", self.path.display());
                self.retry_at = std::time::Instant::now() + SPOOL_RETRY_MAX;
                false
            }
        }
    }

    /// Gives back the room of the records moved already: those still to move, from `moved` to
    /// `len`, are copied to a new file put in the spool's place. The note of moves names the
    /// file it is of ([`Spool::moved_through`]), so a crash at any point moves none twice and
    /// loses none. The spool is held locked meanwhile, and the other processes on the
    /// `data_dir` lock the new file once it is in place ([`Spool::locked`]). (One that locks it
    /// before this one is done may move some records twice, as a crash after a batch's commit
    /// does: kept twice, never lost.)
    fn compact(&self, spool: &File, len: u64, moved: u64) -> std::io::Result<()> {
        let aside = self.copy_aside(spool, len, moved)?;
        std::fs::rename(&aside, &self.path)?;
        sync_parent(&self.path)?;
        remove_synced(&self.moved)
    }

    /// [`Spool::compact`]'s copy, made beside the spool (and synced); where it is.
    fn copy_aside(&self, spool: &File, len: u64, moved: u64) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::FileExt;
        let aside = self.path.with_extension("compacted");
        let mut copy = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)?;
        let mut chunk = vec![0u8; SPOOL_READ_BYTES];
        let mut from = moved;
        while from < len {
            let want =
                usize::try_from(len - from).map_or(chunk.len(), |left| left.min(chunk.len()));
            spool.read_exact_at(&mut chunk[..want], from)?;
            copy.write_all(&chunk[..want])?;
            from += want as u64;
        }
        copy.sync_all()?;
        Ok(aside)
    }

    /// How many bytes of `spool`, `len` long, are moved already, as `audit-spool.moved` says:
    /// its file's inode and a length (a length alone, as builds before compaction wrote it,
    /// is of the file in place). Of another file (the one a compaction replaced), unreadable
    /// or past the end (the file was emptied by hand): none. Or further, as far as this
    /// process moved it where the note could not be written.
    fn moved_through(&self, spool: &File, len: u64) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(ino) = spool.metadata().map(|meta| meta.ino()) else {
            return 0;
        };
        let text = std::fs::read_to_string(&self.moved).unwrap_or_default();
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        let noted = match (fields.next(), fields.next(), fields.next()) {
            (Some(Ok(of)), Some(Ok(from)), None) if of == ino && from <= len => from,
            (Some(Ok(from)), None, None) if from <= len => from,
            _ => 0,
        };
        match &self.noted {
            Some(kept) if kept.holds(spool, ino, len) => noted.max(kept.from),
            _ => noted,
        }
    }

    /// Notes that `from` bytes of `spool` are moved: in `audit-spool.moved`, else (a full
    /// disk) in memory. The records are in PostgreSQL: moved again, they would be kept twice,
    /// and on a disk that stays full the spool would never empty, holding up every record
    /// after them, which PostgreSQL could take, till each was dropped.
    fn note_moved(&mut self, spool: &File, from: u64) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let ino = spool.metadata()?.ino();
        match write_synced(&self.moved, format!("{ino} {from}").as_bytes()) {
            Ok(()) => self.noted = None,
            Err(e) => {
                if self.noted.is_none() {
                    tracing::warn!(
                        target: "audit",
                        "cannot note the audit records moved to PostgreSQL in {} ({e}): noting \
                         them in memory, and a crash would move them again",
                        self.moved.display()
                    );
                }
                self.noted = Noted::of(spool, ino, from);
            }
        }
        Ok(())
    }

    /// [`Spool::move_to`]'s moves, each batch by `insert` (in one transaction), under the
    /// file's lock: `Ok(true)` once all are moved, `Ok(false)` when the turn ends first.
    fn move_batches(
        &mut self,
        insert: &mut dyn FnMut(&[&str]) -> Result<(), String>,
        started: std::time::Instant,
    ) -> Result<bool, Moving> {
        use std::os::unix::fs::FileExt;
        let file = self.locked().map_err(Moving::File)?;
        let len = file.metadata().map_err(Moving::File)?.len();
        let mut from = self.moved_through(&file, len);
        let mut chunk = vec![0u8; SPOOL_READ_BYTES];
        loop {
            let want =
                usize::try_from(len - from).map_or(chunk.len(), |left| left.min(chunk.len()));
            file.read_exact_at(&mut chunk[..want], from)
                .map_err(Moving::File)?;
            // Whole records only; a last line a crash cut short is none, nor is a line
            // that is no JSON (such a line, ended by the next append).
            let mut consumed = 0;
            let mut records = Vec::new();
            for line in chunk[..want].split_inclusive(|&b| b == b'\n') {
                if !line.ends_with(b"\n") || records.len() == MAX_BATCH {
                    break;
                }
                consumed += line.len();
                let record = std::str::from_utf8(line).ok().map(str::trim_end);
                if let Some(record) =
                    record.filter(|r| serde_json::from_str::<serde::de::IgnoredAny>(r).is_ok())
                {
                    records.push(record);
                }
            }
            if consumed == 0 && want == chunk.len() {
                // A record longer than the read: read it whole (the spool holds at most
                // SPOOL_MAX_BYTES, and so does this).
                chunk.resize(chunk.len() * 2, 0);
                continue;
            }
            if consumed == 0 {
                // Nothing whole is left: all moved. The note of how far goes first: a crash
                // before the file is emptied then has them moved again, never skipped.
                self.noted = None;
                remove_synced(&self.moved).map_err(Moving::File)?;
                file.set_len(0).map_err(Moving::File)?;
                file.sync_all().map_err(Moving::File)?;
                return Ok(true);
            }
            if !records.is_empty() {
                insert(&records).map_err(Moving::Postgres)?;
            }
            from += consumed as u64;
            chunk.truncate(SPOOL_READ_BYTES);
            self.note_moved(&file, from).map_err(Moving::File)?;
            if started.elapsed() >= SPOOL_MOVE_TURN {
                return Ok(false);
            }
        }
    }
}

/// Moves into the log file `log` the records a run with `[postgres]` left in the spool beside
/// it (PostgreSQL could not take them, then `[postgres]` was taken out): they would wait there
/// for ever, shown by nothing. SCIM changes were PostgreSQL's own: none is taken from it.
fn take_back_spool(log: &mut LogFile) {
    let path = log.path.with_file_name(SPOOL_NAME);
    let mut spool = match Spool::open(path.clone()) {
        Ok(spool) if !spool.is_empty() => spool,
        Ok(_) => return,
        Err(e) => return tracing::error!(target: "audit", "{e}"),
    };
    let mut taken = 0;
    let mut insert = |records: &[&str]| {
        let lines: Vec<String> = (records.iter())
            .filter(|record| change_seq(record.as_bytes()).is_none())
            .map(|record| format!("{record}\n"))
            .collect();
        taken += lines.len();
        log.append(&lines, None)
    };
    loop {
        match spool.move_batches(&mut insert, std::time::Instant::now()) {
            Ok(true) => break,
            Ok(false) => continue,
            Err(Moving::Postgres(e)) => {
                return tracing::error!(
                    target: "audit",
                    "cannot move the records left in {} to the audit log: {e}",
                    path.display()
                )
            }
            Err(Moving::File(e)) => {
                return tracing::error!(target: "audit", "cannot read {}: {e}", path.display())
            }
        }
    }
    tracing::info!(
        target: "audit",
        "{taken} records a run with [postgres] left in {} moved to the audit log",
        path.display()
    );
}

/// Why records could not be moved out of the spool.
enum Moving {
    Postgres(String),
    File(std::io::Error),
}

/// Puts a file holding `bytes` (mode 0600) at `path`, whole or not at all (written aside,
/// synced, renamed over it), durably.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let aside = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&aside)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&aside, path)?;
    sync_parent(path)
}

/// Removes the file at `path`, if there is one, durably.
fn remove_synced(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Syncs the directory holding `path`, so that a file put or removed there stays so.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => File::open(".")?.sync_all(),
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The log file, followed through rotation: when the file at its path is no longer the one
/// being written (`logrotate` moved it away, or it was deleted), the next write opens a new
/// one there. Where the log stands (the last SCIM change up to which every change is
/// written) is also kept beside it ([`position_path`]), so that [`Audit::recover_changes`]
/// knows it also when the file has just been rotated and holds none.
struct LogFile {
    file: File,
    path: PathBuf,
}

impl LogFile {
    /// Opens `path` for appending, creating it (mode 0600) if there is none. A last line a
    /// crash cut short is ended first, so that it stands alone (unread, as it cannot be) and
    /// takes no record written after it down with it.
    fn open(path: PathBuf) -> Result<Self, String> {
        let cannot =
            |e: std::io::Error| format!("cannot open the audit log {}: {e}", path.display());
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(cannot)?;
        let len = file.metadata().map_err(cannot)?.len();
        if ends_unended(&file, len).map_err(cannot)? {
            // Not the reason not to start: records still get written, if after the cut one.
            if let Err(e) = file.write_all(b"\n").and_then(|()| file.sync_data()) {
                tracing::error!(
                    target: "audit",
                    "cannot end the audit log's last line, cut short: {e}"
                );
            }
        }
        Ok(Self { file, path })
    }

    /// Whether the file at the path is no longer the one open (moved or deleted). When that
    /// cannot be told, it is taken as the same.
    fn rotated(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(there), Ok(open)) => (there.dev(), there.ino()) != (open.dev(), open.ino()),
            (Err(e), _) => e.kind() == std::io::ErrorKind::NotFound,
            (Ok(_), Err(_)) => false,
        }
    }

    fn append(&mut self, lines: &[String], last_change: Option<u64>) -> Result<(), String> {
        if self.rotated() {
            match Self::open(self.path.clone()) {
                Ok(new) => {
                    *self = new;
                    tracing::info!(
                        target: "audit",
                        "the audit log was moved away (rotated); writing to a new {}",
                        self.path.display()
                    );
                }
                // The moved file still takes records; the next write tries again.
                Err(e) => tracing::error!(
                    target: "audit",
                    "the audit log was moved away, and a new one cannot be made, so records \
                     still go to the moved file: {e}"
                ),
            }
        }
        // One write of whole lines: with O_APPEND, a reader never sees two records
        // interleaved. A write that fails part way (a full disk) is cut off again, so the
        // retry neither follows a torn record nor repeats the ones that made it.
        let (file, path) = (&mut self.file, &self.path);
        let before = file.metadata().map(|m| m.len());
        // After a line left unended (a newline that could not be written after a crash's cut
        // record, or a failed write that could not be cut off again: `chattr +a` refuses
        // that), as the spool's: not joined to it, unread. (Not read: as if ended.)
        let len = before.as_ref().map_or(0, |&len| len);
        let text = on_a_line_of_their_own(file, len, lines).unwrap_or_else(|_| lines.concat());
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data());
        if let (Err(_), Ok(len)) = (&written, before) {
            let _ = file.set_len(len);
        }
        written.map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(seq) = last_change {
            // The records are written: a position not kept only means a change may be
            // appended a second time after a rotation and a crash.
            if let Err(e) = keep_position(path, seq) {
                tracing::warn!(target: "audit", "{e}");
            }
        }
        Ok(())
    }
}

/// Whether the file (of `len` bytes) ends in a line a crash or a failed write left unended.
fn ends_unended(file: &File, len: u64) -> std::io::Result<bool> {
    let mut last = [b'\n'];
    if len > 0 {
        std::os::unix::fs::FileExt::read_exact_at(file, &mut last, len - 1)?;
    }
    Ok(last != [b'\n'])
}

/// `lines` as one write to the end of `file` (of `len` bytes): after a newline first where
/// the file ends in a line left unended ([`ends_unended`]), which stands alone, unread (it is
/// no JSON), taking none of them down.
fn on_a_line_of_their_own(file: &File, len: u64, lines: &[String]) -> std::io::Result<String> {
    let mut text = String::with_capacity(lines.iter().map(String::len).sum::<usize>() + 1);
    if ends_unended(file, len)? {
        text.push('\n');
    }
    lines.iter().for_each(|line| text.push_str(line));
    Ok(text)
}

/// Keeps `seq` as where the log at `path` stands ([`position_path`]).
fn keep_position(path: &Path, seq: u64) -> Result<(), String> {
    let position = position_path(path);
    let temporary = position.with_extension("tmp");
    File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(format!("{seq}\n").as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, &position))
        .map_err(|e| format!("cannot keep {}: {e}", position.display()))
}

/// Moves the log at `path`, found to have recorded another directory than the one Portcullis
/// starts on, beside it under a name of its own (`audit.jsonl.another-directory-<unix
/// seconds>`, and `-2`, `-3`, … after it): never over another file. Where it went.
fn move_aside(path: &Path) -> Result<PathBuf, String> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    move_aside_at(path, seconds, |from, to| std::fs::hard_link(from, to))
}

/// [`move_aside`] at `seconds`, linking with `link`.
fn move_aside_at(
    path: &Path,
    seconds: u64,
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> Result<PathBuf, String> {
    for n in 1..=100 {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".another-directory-{seconds}"));
        if n > 1 {
            name.push(format!("-{n}"));
        }
        let aside = PathBuf::from(name);
        // A link, which refuses a name taken, where a rename would replace its file.
        match link(path, &aside) {
            Ok(()) => {
                return std::fs::remove_file(path)
                    .map(|()| aside)
                    .map_err(|e| format!("cannot move {} aside: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // A file system without links (vfat, some network ones): renamed, once the name
            // is seen free (nothing by it, not even a link to nothing).
            Err(_) => match std::fs::symlink_metadata(&aside) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return std::fs::rename(path, &aside)
                        .map(|()| aside)
                        .map_err(|e| format!("cannot move {} aside: {e}", path.display()))
                }
                _ => continue,
            },
        }
    }
    Err(format!(
        "cannot move {} aside: every name is taken",
        path.display()
    ))
}

/// Where the log at `path` keeps where it stands: beside it, under a name rotation leaves
/// alone (`audit.last-change`).
fn position_path(path: &Path) -> PathBuf {
    path.with_extension("last-change")
}

/// The first and the last SCIM change of a batch.
type ChangeSpan = Option<(u64, u64)>;

fn write_loop(
    store: &mut Store,
    queue: &Receiver<Queued>,
    budgets: &Mutex<Budgets>,
    losses: &Losses,
) {
    const COUNTS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    let mut lines = Vec::new();
    let encode = |lines: &mut Vec<String>, changes: &mut ChangeSpan, entry: &Entry| {
        // (With the characters that move a terminal escaped, as the JSON log has them: a
        // path, a name or an IdP's words quoted here reach `portcullis audit --json` and
        // `tail -f` as they are written.)
        match serde_json::to_string(entry) {
            Ok(line) => lines.push(crate::logging::json_text_shown(line) + "\n"),
            Err(e) => {
                // Counted as lost: the position stays short of it, so the next start
                // tries again.
                tracing::error!(target: "audit", "cannot encode an audit record: {e}");
                if let Entry::Change { seq, .. } = entry {
                    losses.lost_change(*seq);
                }
                return;
            }
        }
        if let Entry::Change { seq, .. } = entry {
            *changes = Some(match *changes {
                Some((first, last)) => (first.min(*seq), last.max(*seq)),
                None => (*seq, *seq),
            });
        }
    };
    let mut counted_at = std::time::Instant::now();
    // Where the log stands at least, once recovery has said so (`Queued::Through`).
    let mut through = 0;
    loop {
        // Awake at least once a second, to record the refusals counted meanwhile.
        let wait = COUNTS_EVERY.saturating_sub(counted_at.elapsed());
        let (mut next, mut flush, mut moved, stopping) = match queue.recv_timeout(wait) {
            Ok(Queued::Record(entry)) => (Some(entry), None, false, false),
            Ok(Queued::Flush(ack)) => (None, Some(ack), false, false),
            Ok(Queued::Through(seq)) => {
                through = through.max(seq);
                (None, None, true, false)
            }
            Err(RecvTimeoutError::Timeout) => (None, None, false, false),
            Err(RecvTimeoutError::Disconnected) => (None, None, false, true),
        };
        lines.clear();
        let mut changes = None;
        while let Some(entry) = next.take() {
            encode(&mut lines, &mut changes, &entry);
            if lines.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(Queued::Record(entry)) => next = Some(entry),
                    // Written with this batch: everything sent before it is in it.
                    Ok(Queued::Flush(ack)) => flush = Some(ack),
                    Ok(Queued::Through(seq)) => {
                        through = through.max(seq);
                        moved = true;
                    }
                    Err(_) => {}
                }
            }
        }
        if flush.is_some() || stopping || counted_at.elapsed() >= COUNTS_EVERY {
            counted_at = std::time::Instant::now();
            let counted = budgets
                .lock()
                .map(|mut budgets| budgets.unrecorded())
                .unwrap_or_default();
            for entry in unrecorded_records(counted).chain(lost_records(losses)) {
                encode(&mut lines, &mut changes, &entry);
            }
        }
        if !lines.is_empty() || moved || store.waits() {
            let position = match changes {
                Some((_, last)) => Some(last.max(through)),
                None => moved.then_some(through),
            };
            let urgent = flush.is_some() || stopping;
            append(store, &lines, changes, position, losses, urgent);
        }
        if let Some(ack) = flush {
            // The flusher may have given up waiting.
            let _ = ack.try_send(());
        }
        if stopping {
            return;
        }
    }
}

/// Where recovery starts in the log file at `path`, and the changes after that the file
/// already holds: the position kept beside it (every change up to it was written, see
/// [`Losses`]), or, where none is kept (or it is damaged), the last change in the file.
fn log_position(path: &Path) -> Result<(u64, HashSet<u64>), String> {
    match kept_position(path) {
        Some(kept) => Ok((kept, changes_in(path, kept)?.1)),
        None => Ok((changes_in(path, u64::MAX)?.0, HashSet::new())),
    }
}

/// The position kept beside the log at `path` ([`position_path`]), if one is.
fn kept_position(path: &Path) -> Option<u64> {
    // Unknown (none yet, or damaged by a crash): the file alone says, and a change a rotated
    // file has may be appended again. Better than not starting.
    let position = position_path(path);
    match std::fs::read_to_string(&position) {
        Ok(text) => text.trim().parse::<u64>().ok().or_else(|| {
            tracing::warn!(
                target: "audit",
                "{} does not hold a change's sequence; the audit log's last change is taken \
                 from the log alone",
                position.display()
            );
            None
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(target: "audit", "cannot read {}: {e}", position.display());
            None
        }
    }
}

/// The sequence of the last SCIM change in the log file at `path` (0: none, or no file), and
/// those of its changes after `after`. Only lines that say they are changes are parsed.
fn changes_in(path: &Path, after: u64) -> Result<(u64, HashSet<u64>), String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, HashSet::new())),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let (mut last, mut later) = (0, HashSet::new());
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Some(seq) = change_seq(&line) {
            last = last.max(seq);
            if seq > after {
                later.insert(seq);
            }
        }
    }
    Ok((last, later))
}

/// The sequence of the SCIM change a log line records, if it records one.
fn change_seq(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    memchr::memmem::find(line, br#""event":"change""#)?;
    serde_json::from_slice::<Seq>(line)
        .ok()
        .map(|change| change.seq)
}

/// Appends `lines`, whose SCIM changes are `changes`, trying again for a while before they
/// are dropped, and keeps the log's position at `position` (the last change in it), short of
/// the first change lost. `urgent`: see [`Store::append`].
fn append(
    store: &mut Store,
    lines: &[String],
    changes: ChangeSpan,
    position: Option<u64>,
    losses: &Losses,
    urgent: bool,
) {
    let position = position.map(|last| losses.position(last));
    for attempt in 1..=ATTEMPTS {
        match store.append(lines, position, urgent) {
            Ok(()) => return,
            Err(e) if attempt == ATTEMPTS => {
                crate::metrics::count_audit_lost("write_failed", lines.len() as u64);
                let lost = lines.len() as u64;
                losses.dropped.fetch_add(lost, Ordering::Relaxed);
                losses.unrecorded_failed.fetch_add(lost, Ordering::Relaxed);
                if let Some((first, _)) = changes {
                    losses.lost_change(first);
                }
                tracing::error!(
                    target: "audit",
                    "cannot append {} records, dropped: {e}",
                    lines.len()
                );
            }
            Err(e) => {
                tracing::warn!(target: "audit", "cannot append {} records yet: {e}", lines.len());
                thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Which records to show (`portcullis audit`, the console's timeline); `Default` selects all.
#[derive(Debug, Default)]
pub struct Filter {
    /// Matches the actor or the user in any case (as the directory folds names), and a console
    /// action on them.
    pub user: Option<String>,
    /// `user`'s directory id: with it, `user` also matches the SCIM changes to that user and
    /// to the groups whose members were added or removed by it.
    pub about: Option<String>,
    /// Other names `user`'s own records go by, folded (`portcullis_policy::fold`): a sign-in or sign-out is
    /// recorded under the person's email or the IdP's subject, which the directory holds as
    /// one of their emails or their `externalId`, not always as their `userName`.
    pub aliases: HashSet<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    /// The `event`: `change`, `refusal`, `allow`, `action`, `session` or `lost` (which every
    /// filter but the time selects).
    pub kind: Option<String>,
    /// The route (refusals and allows; `console` for the console's).
    pub route: Option<String>,
}

impl Filter {
    pub fn matches(&self, entry: &Entry) -> bool {
        // Those lost may be of anyone, any kind and any route: only the time tells.
        let lost = matches!(entry, Entry::Lost { .. });
        if let Some(named) = self.user.as_ref().filter(|_| !lost) {
            use portcullis_policy::fold;
            let user = fold(named);
            let about = match entry {
                Entry::Action { target, .. } => fold(target) == user,
                // An id is a UUID: it appears in a change's summary as a member's, outside
                // the quoted names (a group named with someone's id is not about them).
                Entry::Change { id, summary, .. } => {
                    let unquoted = summary.rsplit('"').next().unwrap_or_default();
                    self.about
                        .as_deref()
                        .is_some_and(|about| id == about || unquoted.contains(about))
                }
                // An agent's call on someone's behalf is recorded as that person's: it is the
                // agent's too (`agent:<name>`, as its own calls are recorded).
                Entry::Refusal {
                    agent: Some(agent), ..
                }
                | Entry::Allow {
                    agent: Some(agent), ..
                } => fold(&crate::gate::agent_user(&agent.name)) == user,
                _ => false,
            };
            let who = fold(entry.who());
            // A name longer than a record keeps was recorded cut (see `MAX_USER`).
            let cut = |name: &str| name.len() > MAX_USER && fold(&bounded(name, MAX_USER)) == who;
            let theirs = who == user
                || (!self.aliases.is_empty() && self.aliases.contains(who.as_ref()))
                || cut(named)
                || self.aliases.iter().any(|alias| cut(alias));
            if !about && !theirs {
                return false;
            }
        }
        if self
            .kind
            .as_deref()
            .is_some_and(|kind| kind != entry.kind() && !lost)
        {
            return false;
        }
        if let Some(route) = self.route.as_ref().filter(|_| !lost) {
            if entry.route() != Some(route.as_str()) {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(time) = OffsetDateTime::parse(entry.time(), &Rfc3339) else {
                return false;
            };
            if self.since.is_some_and(|since| time < since)
                || self.until.is_some_and(|until| time > until)
            {
                return false;
            }
        }
        true
    }
}

/// `--since`: an RFC 3339 time, or a duration back from `now` such as `90s`, `15m`, `1h`, `2d`.
pub fn parse_since(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(time);
    }
    let bad = || format!("{text:?}: expected an RFC 3339 time or a duration like 1h, 30m");
    let back = crate::clock::parse_duration(text).map_err(|_| bad())?;
    let back = time::Duration::try_from(back).map_err(|_| bad())?;
    now.checked_sub(back).ok_or_else(bad)
}

/// Records read from PostgreSQL per query.
const PAGE: i64 = 1_000;

/// `portcullis audit`: prints the records kept at `destination` that `filter` selects, in
/// `order`. Reading while the server appends is safe: only whole records are read.
pub fn run_cli(
    destination: Destination,
    filter: &Filter,
    order: Order,
    json: bool,
) -> Result<(), String> {
    print(
        destination,
        filter,
        order,
        json,
        &mut std::io::stdout().lock(),
    )
}

/// [`run_cli`], to `out`.
fn print(
    mut destination: Destination,
    filter: &Filter,
    order: Order,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), String> {
    // Read from the end, a record older than `since` ends the reading (give or take the
    // moments records wait to be written; a change written late carries its own time).
    let stop_before = filter
        .since
        .filter(|_| order == Order::NewestFirst)
        .map(|since| since.saturating_sub(time::Duration::minutes(1)));
    let stop_before = stop_before.map(OffsetDateTime::unix_timestamp);
    let mut failed = None;
    each(&mut destination, order, &mut |text, entry, back| {
        if back
            .zip(stop_before)
            .is_some_and(|(back, stop)| back < stop)
        {
            return false;
        }
        if !filter.matches(&entry) {
            return true;
        }
        // (Escaped again as it is shown: a change rebuilt from PostgreSQL's rows, or a record
        // written before its line was, holds what moves a terminal as it is.)
        let written = if json {
            let shown = crate::logging::json_shown(text.as_bytes());
            out.write_all(&shown).and_then(|()| out.write_all(b"\n"))
        } else {
            writeln!(out, "{}", entry.human())
        };
        match written {
            Ok(()) => true,
            // A reader that went away (`| head`) wants nothing more.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
            // Anything else (a full disk) leaves the copy short: not a success.
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    match failed.map_or_else(|| out.flush(), Err) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write the audit log out: {e}"))
        }
        _ => Ok(()),
    }
}

/// How far back the log is where a record was read, in Unix seconds (reading from the end, a
/// record with this before a time says nothing later is before it either): when it was
/// written where the log keeps that (PostgreSQL), else its own time; `None` for a SCIM change
/// in a file, which may have been written late (at a later start).
pub type Back = Option<i64>;

/// Reads the records kept at a destination for those who show them (the console), one
/// reader at a time.
pub struct Reader(std::sync::Mutex<Destination>);

/// Which end of the log a reading starts from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

impl Reader {
    pub fn new(destination: Destination) -> Reader {
        Reader(std::sync::Mutex::new(destination))
    }

    /// Calls `f` with each record, in `order`, until it returns false.
    pub fn each(
        &self,
        order: Order,
        f: &mut dyn FnMut(&str, Entry, Back) -> bool,
    ) -> Result<(), String> {
        let mut destination = self
            .0
            .lock()
            .map_err(|_| "the audit reader failed earlier".to_owned())?;
        each(&mut destination, order, f)
    }
}

/// Calls `f` with each record kept at `destination` (its text and what it says), in `order`,
/// until it returns false. A line that does not parse is skipped, with a note on stderr. Only
/// whole records are read, so reading while the server appends is safe.
fn each(
    destination: &mut Destination,
    order: Order,
    f: &mut dyn FnMut(&str, Entry, Back) -> bool,
) -> Result<(), String> {
    // Records are written in time order, give or take the moments they wait to be, but for
    // the SCIM changes a file got at a later start; PostgreSQL says when each was written.
    let unix = |time: &str| {
        OffsetDateTime::parse(time, &Rfc3339)
            .ok()
            .map(OffsetDateTime::unix_timestamp)
    };
    let mut visit = |text: &str, written: Option<Back>, place: &dyn Fn() -> String| -> bool {
        match serde_json::from_str::<Entry>(text) {
            Ok(entry) => {
                let back = written.unwrap_or_else(|| match entry {
                    Entry::Change { .. } => None,
                    _ => unix(entry.time()),
                });
                f(text, entry, back)
            }
            Err(e) => {
                eprintln!("{}: skipped: {e}", place());
                true
            }
        }
    };
    match destination {
        Destination::File(path) => {
            let mut file = match File::open(&path) {
                Ok(file) => file,
                // Nothing recorded yet (moved away by a rotation, say), where Portcullis ran;
                // where no data_dir is, it never did, and nothing could be said of anyone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return match path.parent().is_some_and(Path::is_dir) {
                        true => Ok(()),
                        false => Err(format!(
                            "no data_dir at {}: Portcullis never started there",
                            path.parent().unwrap_or(path).display()
                        )),
                    };
                }
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            };
            let mut visit_line = |line: &[u8], at: u64| -> bool {
                let place = || format!("{} at byte {at}", path.display());
                match std::str::from_utf8(line).map(str::trim_end) {
                    Ok("") => true,
                    Ok(text) => visit(text, None, &place),
                    Err(e) => {
                        eprintln!("{}: skipped: {e}", place());
                        true
                    }
                }
            };
            let read = match order {
                Order::OldestFirst => each_line(&mut file, &mut visit_line),
                Order::NewestFirst => each_line_from_end(&mut file, &mut visit_line),
            };
            read.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        }
        Destination::Postgres(log, _) => {
            // Two logs, each in order, merged by time.
            let fail = |e| format!("cannot read the audit log from PostgreSQL: {e}");
            let newest = order == Order::NewestFirst;
            let (mut changes, mut records) = (VecDeque::new(), VecDeque::new());
            // Where each log's next page starts (`Some(None)`: at its end); `None` once read.
            let (mut change_from, mut record_from) = (Some(None), Some(None));
            loop {
                if let (true, Some(from)) = (changes.is_empty(), change_from) {
                    changes.extend(if newest {
                        log.changes_before(from, PAGE).map_err(fail)?
                    } else {
                        log.changes(from.unwrap_or(0), PAGE).map_err(fail)?
                    });
                    change_from = changes.back().map(|c: &Change| Some(c.seq));
                }
                if let (true, Some(from)) = (records.is_empty(), record_from) {
                    records.extend(if newest {
                        log.read_before(from, PAGE).map_err(fail)?
                    } else {
                        log.read(from.unwrap_or(0), PAGE).map_err(fail)?
                    });
                    record_from = records.back().map(|row: &AuditRow| Some(row.id));
                }
                let change_first = match (changes.front(), records.front()) {
                    (None, None) => break,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    // In the order they were written (a record's own time may be earlier,
                    // if its replica's batch arrived late): how far back the reading is
                    // (`Back`) only ever goes back.
                    (Some(change), Some(row)) => {
                        let committed = unix(&change.time).unwrap_or(i64::MIN);
                        match order {
                            Order::OldestFirst => committed <= row.written,
                            Order::NewestFirst => committed >= row.written,
                        }
                    }
                };
                let more = if change_first {
                    let Some(change) = changes.pop_front() else {
                        break;
                    };
                    let text =
                        serde_json::to_string(&Entry::from(&change)).map_err(|e| e.to_string())?;
                    // Committed in order of their sequence; dated by the clock of the replica
                    // that made each (see `stop_before`'s minute for clocks apart).
                    let back = unix(&change.time);
                    visit(&text, Some(back), &|| {
                        format!("directory change {}", change.seq)
                    })
                } else {
                    let Some(row) = records.pop_front() else {
                        break;
                    };
                    visit(&row.record, Some(Some(row.written)), &|| {
                        format!("portcullis_audit id {}", row.id)
                    })
                };
                if !more {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Calls `f` with each whole line of `file` and the offset it starts at, the first first,
/// until it returns false. A last line without its newline is still being written, and is
/// left out.
fn each_line(file: &mut File, f: &mut dyn FnMut(&[u8], u64) -> bool) -> std::io::Result<()> {
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut at = 0;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 || !line.ends_with(b"\n") || !f(&line, at) {
            return Ok(());
        }
        at += read as u64;
    }
}

/// [`each_line`], the last line first: read from the end in chunks, so that the newest
/// records cost what they are, however long the log has grown.
fn each_line_from_end(
    file: &mut File,
    f: &mut dyn FnMut(&[u8], u64) -> bool,
) -> std::io::Result<()> {
    const CHUNK: u64 = 64 * 1024;
    let mut start = file.metadata()?.len();
    // `start..` of the file, up to the lines already given: the end of a line that begins
    // before `start`, in the chunks it was read in, the last first. Each chunk is searched for
    // newlines once, and a long line's bytes copied once, when it is whole: a 40 MB line (a
    // 1,000,000-member group's change) costs what it is, not its square.
    let mut tail: Vec<Vec<u8>> = Vec::new();
    // What follows the file's last newline: nothing, or a line still being written.
    let mut unfinished = true;
    let whole = |first: &[u8], tail: &mut Vec<Vec<u8>>| -> Vec<u8> {
        let mut line = first.to_vec();
        for piece in tail.drain(..).rev() {
            line.extend_from_slice(&piece);
        }
        line
    };
    while start > 0 {
        let from = start.saturating_sub(CHUNK);
        let mut chunk = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        start = from;
        let mut end = chunk.len();
        for newline in memchr::memrchr_iter(b'\n', &chunk) {
            let line = &chunk[newline + 1..end];
            let given = !std::mem::take(&mut unfinished);
            let at = start + newline as u64 + 1;
            let more = match (given, tail.is_empty()) {
                (false, _) => {
                    tail.clear();
                    true
                }
                (true, true) => f(line, at),
                (true, false) => f(&whole(line, &mut tail), at),
            };
            if !more {
                return Ok(());
            }
            end = newline;
        }
        chunk.truncate(end);
        tail.push(chunk);
    }
    // The first line, whose beginning is the file's.
    if !unfinished {
        f(&whole(&[], &mut tail), 0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where recovery starts: the changes after the position kept are found wherever they are
    /// in the log, a lost change appended by a recovery after later ones included.
    #[test]
    fn the_changes_after_the_position_kept_are_found_anywhere_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let change = |seq: u64| format!(r#"{{"event":"change","seq":{seq}}}"#);
        // 50 and 60 lost; 50 recovered since, after the later ones; 60 still missing.
        let mut lines: Vec<String> = (1..=49).map(change).collect();
        lines.extend((51..=59).chain(61..=100).map(change));
        lines.push(change(50));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        std::fs::write(position_path(&path), "59").unwrap();
        let (kept, later) = log_position(&path).unwrap();
        assert_eq!(kept, 59);
        let mut later: Vec<u64> = later.into_iter().collect();
        later.sort_unstable();
        assert_eq!(later, (61..=100).collect::<Vec<u64>>());
    }

    /// Drops are logged at most once a second, and again for a later incident however many
    /// came before (not only at the 1st, 2nd, 4th... drop since the start).
    #[test]
    fn drops_are_told_once_a_second_and_again_later() {
        let losses = Losses::default();
        assert!(losses.worth_telling(100));
        assert!(!losses.worth_telling(100), "twice in a second");
        assert!(losses.worth_telling(99), "a clock stepped back");
        assert!(!losses.worth_telling(99), "twice in that second");
        assert!(losses.worth_telling(4_000), "a later incident");
    }

    /// Records a run with `[postgres]` left in the spool are moved to the log file once
    /// `[postgres]` is taken out, where `portcullis audit` and the console read them.
    #[test]
    fn records_left_in_the_spool_are_moved_to_the_log_file_without_postgres() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path().join(SPOOL_NAME)).unwrap();
        let refusal = |path: &str| {
            format!(
                "{{\"event\":\"refusal\",\"time\":\"2026-12-06T10:00:00Z\",\"user\":\"u\",\
                 \"route\":\"r\",\"reason\":\"why\",\"method\":\"GET\",\"path\":\"{path}\"}}\n"
            )
        };
        spool
            .append(&[refusal("/left-1"), refusal("/left-2")])
            .unwrap();
        let log = || Destination::of(dir.path(), None);
        let audit = Audit::open(log(), log()).unwrap();
        assert!(audit.flush(std::time::Duration::from_secs(5)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(
            text.contains("/left-1") && text.contains("/left-2"),
            "{text}"
        );
        let spooled = std::fs::read_to_string(dir.path().join(SPOOL_NAME)).unwrap();
        assert!(spooled.is_empty(), "moved, and moved once: {spooled}");
        drop(audit);
        let audit = Audit::open(log(), log()).unwrap();
        assert!(audit.flush(std::time::Duration::from_secs(5)));
        let again = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(again.matches("/left-1").count(), 1, "{again}");
    }

    /// Records waiting in the spool move in order, in batches, each once: a batch that
    /// failed is moved again (and none before it), across a restart too, and a record a crash
    /// cut short is none.
    #[test]
    fn spooled_records_move_whole_in_order_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_NAME);
        let record = |i: usize| format!("{{\"n\":{i}}}\n");
        let mut spool = Spool::open(path.clone()).unwrap();
        assert!(spool.is_empty());
        let first: Vec<String> = (0..MAX_BATCH + 5).map(record).collect();
        spool.append(&first).unwrap();
        // A crash in the middle of a record: the next append ends it, and it is no record.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"n\":")
            .unwrap();
        let second: Vec<String> = (MAX_BATCH + 5..MAX_BATCH + 10).map(record).collect();
        spool.append(&second).unwrap();
        assert!(!spool.is_empty());

        // PostgreSQL takes the first batch, then fails.
        let mut moved: Vec<Vec<String>> = Vec::new();
        let mut fail_after_one = |records: &[&str]| -> Result<(), String> {
            if moved.len() == 1 {
                return Err("connection refused".to_owned());
            }
            moved.push(records.iter().map(|r| r.to_string()).collect());
            Ok(())
        };
        let now = std::time::Instant::now;
        assert!(matches!(
            spool.move_batches(&mut fail_after_one, now()),
            Err(Moving::Postgres(_))
        ));
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].len(), MAX_BATCH);

        // After a restart, the rest, once.
        let mut spool = Spool::open(path.clone()).unwrap();
        assert!(!spool.is_empty(), "the records wait across a restart");
        let mut take = |records: &[&str]| -> Result<(), String> {
            moved.push(records.iter().map(|r| r.to_string()).collect());
            Ok(())
        };
        assert!(matches!(spool.move_batches(&mut take, now()), Ok(true)));
        let all: Vec<String> = moved.concat();
        let expected: Vec<String> = (0..MAX_BATCH + 10)
            .map(|i| record(i).trim_end().to_owned())
            .collect();
        assert_eq!(all, expected);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        assert!(!path.with_extension("moved").exists());

        // A note of moves left from a file emptied since (by hand, or a crash) skips none
        // of the next records.
        write_synced(&path.with_extension("moved"), b"40").unwrap();
        let again: Vec<String> = (0..10).map(record).collect();
        spool.append(&again).unwrap();
        let mut taken = Vec::new();
        let mut take = |records: &[&str]| -> Result<(), String> {
            taken.extend(records.iter().map(|r| r.to_string()));
            Ok(())
        };
        assert!(matches!(spool.move_batches(&mut take, now()), Ok(true)));
        assert_eq!(taken.len(), 10, "{taken:?}");
    }

    /// A flush (the process stopping, say) keeps its records in the spool before it asks
    /// PostgreSQL to take them, behind those that wait there: a PostgreSQL that does not answer
    /// holds up the move past the flush's time, and the process' exit, not the records.
    #[test]
    fn a_flush_keeps_its_records_before_it_waits_on_postgres() {
        use portcullis_scim::store::postgres::{PgOptions, PgStorage};
        // Takes connections and never answers them.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let options = PgOptions {
            url: format!("host=127.0.0.1 port={port} user=x sslmode=disable"),
            pool_size: 1,
            max_staleness: std::time::Duration::from_secs(2),
        };
        // With records waiting in the spool, and with none.
        for waiting in [true, false] {
            let log = PgStorage::open(&options).unwrap().audit_log();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(SPOOL_NAME);
            let mut spool = Spool::open(path.clone()).unwrap();
            let mut expected = String::new();
            if waiting {
                spool.append(&["{\"n\":1}\n".to_owned()]).unwrap();
                expected.push_str("{\"n\":1}\n");
            }
            expected.push_str("{\"n\":2}\n");
            assert!(!spool.failing(), "PostgreSQL may be asked again");
            let mut store = Store::Postgres(Box::new(log), spool);
            std::thread::spawn(move || {
                let _ = store.append(&["{\"n\":2}\n".to_owned()], None, true);
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while std::fs::read_to_string(&path).unwrap_or_default() != expected {
                assert!(std::time::Instant::now() < deadline, "waited on PostgreSQL");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        drop(silent);
    }

    /// A flush whose records the spool cannot take (a full disk, here a directory that is
    /// gone) asks PostgreSQL to take them, as any other write would: not the spool, again
    /// and again, until they are dropped.
    #[test]
    fn a_flush_the_spool_cannot_take_goes_on_to_postgres() {
        use portcullis_scim::store::postgres::{PgOptions, PgStorage};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let options = PgOptions {
            url: format!("host=127.0.0.1 port={port} user=x sslmode=disable"),
            pool_size: 1,
            max_staleness: std::time::Duration::from_secs(2),
        };
        let log = PgStorage::open(&options).unwrap().audit_log();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("gone").join(SPOOL_NAME)).unwrap();
        let mut store = Store::Postgres(Box::new(log), spool);
        std::thread::spawn(move || {
            let _ = store.append(&["{\"n\":1}\n".to_owned()], None, true);
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while listener.accept().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL was not asked"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Records moved to PostgreSQL while the note of how far cannot be written (a full disk,
    /// here a directory in the way of its copy) are moved once each, and the spool empties:
    /// the records after them are not held up behind them.
    #[test]
    fn a_spool_whose_note_of_moves_cannot_be_written_is_moved_once_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_NAME);
        let mut spool = Spool::open(path.clone()).unwrap();
        let record = |i: usize| format!("{{\"n\":{i}}}\n");
        let records: Vec<String> = (0..2 * MAX_BATCH + 1).map(record).collect();
        spool.append(&records).unwrap();
        std::fs::create_dir(path.with_extension("tmp")).unwrap();
        // PostgreSQL takes a batch, then fails (the turn ends), then takes the rest.
        fn takes_but_the_second(
            taken: &mut Vec<String>,
        ) -> impl FnMut(&[&str]) -> Result<(), String> + '_ {
            let mut calls = 0;
            move |batch| {
                calls += 1;
                if calls == 2 {
                    return Err("gone a moment".to_owned());
                }
                taken.extend(batch.iter().map(|r| r.to_string()));
                Ok(())
            }
        }
        let mut taken = Vec::new();
        let mut insert = takes_but_the_second(&mut taken);
        let now = std::time::Instant::now;
        assert!(matches!(
            spool.move_batches(&mut insert, now()),
            Err(Moving::Postgres(_))
        ));
        assert!(matches!(spool.move_batches(&mut insert, now()), Ok(true)));
        drop(insert);
        let sent: Vec<String> = records.iter().map(|r| r.trim_end().to_owned()).collect();
        assert_eq!(taken, sent, "each moved once, in order");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "emptied");

        // A note in memory says nothing of the file once it is emptied by another hand (an
        // operator making room) and written again: what is written since is moved whole.
        spool.append(&records).unwrap();
        let mut taken = Vec::new();
        let mut insert = takes_but_the_second(&mut taken);
        assert!(spool.move_batches(&mut insert, now()).is_err());
        File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_len(0))
            .unwrap();
        spool.append(&records).unwrap();
        assert!(matches!(spool.move_batches(&mut insert, now()), Ok(true)));
        drop(insert);
        assert_eq!(taken[MAX_BATCH..], sent, "moved from its start");

        // Nor once another process on the `data_dir` moved it all, emptied it (the same
        // file, cut to nothing) and wrote other records in it: here of one length and ending
        // alike, as a refusal repeated ends (its reason, its path, its address), so that one
        // ends where this one's note does, with the same bytes before it.
        let alike = |i: usize| format!("{{\"n\":{i:>8},\"reason\":\"{}\"}}\n", "x".repeat(200));
        let first: Vec<String> = (0..2 * MAX_BATCH + 1).map(alike).collect();
        spool.append(&first).unwrap();
        let mut taken = Vec::new();
        let mut insert = takes_but_the_second(&mut taken);
        assert!(spool.move_batches(&mut insert, now()).is_err());
        let mut other = Spool::open(path.clone()).unwrap();
        assert!(matches!(
            other.move_batches(&mut |_| Ok(()), now()),
            Ok(true)
        ));
        let later: Vec<String> = (0..2 * MAX_BATCH + 1).map(|i| alike(10_000 + i)).collect();
        other.append(&later).unwrap();
        assert!(matches!(spool.move_batches(&mut insert, now()), Ok(true)));
        drop(insert);
        let later: Vec<String> = later.iter().map(|r| r.trim_end().to_owned()).collect();
        assert_eq!(
            taken[MAX_BATCH..],
            later,
            "the other's moved from its start"
        );
    }

    /// Records moved to PostgreSQL no longer count toward the spool's bound: records that come
    /// while the rest are moved are kept, not dropped (up to twice the bound in the file).
    #[test]
    fn a_spool_being_moved_takes_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_NAME);
        let record = |i: usize| format!("{{\"n\":{i:>8}}}\n");
        let mut spool = Spool::open(path.clone()).unwrap();
        let batch: Vec<String> = (0..MAX_BATCH).map(record).collect();
        let size = batch.iter().map(|r| r.len() as u64).sum::<u64>();
        spool.max_bytes = 2 * size;
        spool.append(&batch).unwrap();
        spool.append(&batch).unwrap();
        assert!(spool.append(&batch[..1]).is_err(), "full");
        // PostgreSQL is back: it takes a batch, then the turn ends (here, a failure).
        let mut taken = 0;
        let mut one_batch = |_: &[&str]| -> Result<(), String> {
            taken += 1;
            match taken {
                1 => Ok(()),
                _ => Err("the turn is over".to_owned()),
            }
        };
        let now = std::time::Instant::now;
        assert!(spool.move_batches(&mut one_batch, now()).is_err());
        spool.append(&batch).unwrap();
        assert!(spool.append(&batch[..1]).is_err(), "full again");
        // Records keep coming as fast as they are moved: the file is compacted, and none is
        // dropped, nor moved twice.
        let mut moved: Vec<String> = Vec::new();
        for _ in 0..6 {
            let before = moved.len();
            let mut one_batch = |records: &[&str]| -> Result<(), String> {
                if moved.len() > before {
                    return Err("the turn is over".to_owned());
                }
                moved.extend(records.iter().map(|r| r.to_string()));
                Ok(())
            };
            let _ = spool.move_batches(&mut one_batch, now());
            assert_eq!(moved.len(), before + MAX_BATCH);
            spool.append(&batch).unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(len <= 4 * size, "{len} bytes");
        }
        // All moved: the file is emptied, and takes the bound again.
        let mut take = |records: &[&str]| -> Result<(), String> {
            moved.extend(records.iter().map(|r| r.to_string()));
            Ok(())
        };
        assert!(matches!(spool.move_batches(&mut take, now()), Ok(true)));
        // Each batch appended, moved once: nine of them, the first above.
        assert_eq!(moved.len(), 8 * MAX_BATCH);
        assert!(moved
            .chunks(MAX_BATCH)
            .all(|b| b.iter().zip(&batch).all(|(m, r)| m == r.trim_end())));
        spool.append(&batch).unwrap();
        spool.append(&batch).unwrap();
    }

    /// A crash while the spool is compacted moves the records left once: before the new file
    /// is in place, the note of moves is still of the spool; after, it is of the file replaced.
    /// (And a note as builds before compaction wrote it, a length alone, is of the spool.)
    #[test]
    fn a_compaction_cut_short_moves_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_NAME);
        let record = |i: usize| format!("{{\"n\":{i}}}\n");
        let mut spool = Spool::open(path.clone()).unwrap();
        let all: Vec<String> = (0..2 * MAX_BATCH).map(record).collect();
        spool.append(&all).unwrap();
        let mut first = true;
        let mut one_batch = |_: &[&str]| -> Result<(), String> {
            std::mem::take(&mut first)
                .then_some(())
                .ok_or_else(|| "the turn is over".to_owned())
        };
        let now = std::time::Instant::now;
        assert!(spool.move_batches(&mut one_batch, now()).is_err());
        let note = std::fs::read(path.with_extension("moved")).unwrap();
        let file = spool.locked().unwrap();
        let len = file.metadata().unwrap().len();
        let moved = spool.moved_through(&file, len);
        assert!(moved > 0);
        let left: Vec<String> = (MAX_BATCH..2 * MAX_BATCH)
            .map(|i| record(i).trim_end().to_owned())
            .collect();
        // The crash before the new file is in place.
        spool.copy_aside(&file, len, moved).unwrap();
        drop(file);
        let mut taken = Vec::new();
        let mut take = |records: &[&str]| -> Result<(), String> {
            taken.extend(records.iter().map(|r| r.to_string()));
            Err("taken, and the crash".to_owned())
        };
        let _ = spool.move_batches(&mut take, now());
        assert_eq!(taken, left[..MAX_BATCH.min(left.len())]);
        write_synced(&path.with_extension("moved"), &note).unwrap();
        // The same note as a length alone.
        let legacy = String::from_utf8(note.clone()).unwrap();
        let legacy = legacy.split_whitespace().last().unwrap().to_owned();
        let file = spool.locked().unwrap();
        write_synced(&path.with_extension("moved"), legacy.as_bytes()).unwrap();
        assert_eq!(spool.moved_through(&file, len), moved);
        write_synced(&path.with_extension("moved"), &note).unwrap();
        // The crash after it is in place, before the note is gone.
        spool.compact(&file, len, moved).unwrap();
        drop(file);
        // The crash: the note of the file replaced is still there.
        write_synced(&path.with_extension("moved"), &note).unwrap();
        let mut taken = Vec::new();
        let mut take = |records: &[&str]| -> Result<(), String> {
            taken.extend(records.iter().map(|r| r.to_string()));
            Ok(())
        };
        assert!(matches!(spool.move_batches(&mut take, now()), Ok(true)));
        assert_eq!(taken, left);
    }

    /// A record longer than one read of the spool (a change naming a million members) moves
    /// whole, and so do those around it.
    #[test]
    fn a_spooled_record_longer_than_a_read_moves_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path().join(SPOOL_NAME)).unwrap();
        let long = format!("{{\"summary\":\"{}\"}}\n", "a".repeat(SPOOL_READ_BYTES * 2));
        let records = ["{\"n\":1}\n".to_owned(), long, "{\"n\":2}\n".to_owned()];
        spool.append(&records).unwrap();
        let mut moved = Vec::new();
        let mut take = |batch: &[&str]| -> Result<(), String> {
            moved.extend(batch.iter().map(|r| format!("{r}\n")));
            Ok(())
        };
        // However long the reading takes (a turn is a second), until all are moved.
        let turn = |spool: &mut Spool, take: &mut dyn FnMut(&[&str]) -> Result<(), String>| {
            matches!(
                spool.move_batches(take, std::time::Instant::now()),
                Ok(true)
            )
        };
        assert!((0..100).any(|_| turn(&mut spool, &mut take)));
        assert!(moved == records, "{} records moved", moved.len());
    }

    /// Read from the end with `--since`, the log is read no further back than that: a record
    /// written out of order before an older one is not reached.
    #[test]
    fn newest_first_since_stops_where_the_records_get_older() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let refusal = |ago: i64, path: &str| {
            let time = (now - time::Duration::seconds(ago))
                .format(&Rfc3339)
                .unwrap();
            let entry = Entry::Refusal {
                time,
                user: "mallory".to_owned(),
                route: "app".to_owned(),
                rule: None,
                reason: "no".to_owned(),
                method: "GET".to_owned(),
                path: path.to_owned(),
                client: None,
                agent: None,
            };
            serde_json::to_string(&entry).unwrap() + "\n"
        };
        let log = [
            refusal(300, "/behind-the-older-one"),
            refusal(7_200, "/two-hours-ago"),
            refusal(60, "/a-minute-ago"),
        ]
        .concat();
        std::fs::write(dir.path().join(FILE_NAME), log).unwrap();
        let filter = Filter {
            since: Some(now - time::Duration::hours(1)),
            ..Filter::default()
        };
        let printed = |order: Order| {
            let mut out = Vec::new();
            let destination = Destination::of(dir.path(), None);
            print(destination, &filter, order, true, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let newest_first = printed(Order::NewestFirst);
        assert!(newest_first.contains("/a-minute-ago"), "{newest_first}");
        assert!(
            !newest_first.contains("/behind-the-older-one"),
            "{newest_first}"
        );
        let oldest_first = printed(Order::OldestFirst);
        assert!(
            oldest_first.contains("/behind-the-older-one"),
            "{oldest_first}"
        );
        assert!(!oldest_first.contains("/two-hours-ago"), "{oldest_first}");
        // Since as far back as the calendar goes: everything, newest first.
        let always = Filter {
            since: Some(time::PrimitiveDateTime::MIN.assume_utc()),
            ..Filter::default()
        };
        let mut out = Vec::new();
        let destination = Destination::of(dir.path(), None);
        print(destination, &always, Order::NewestFirst, true, &mut out).unwrap();
        let all = String::from_utf8(out).unwrap();
        assert!(all.contains("/two-hours-ago"), "{all}");
        // No log in a data_dir is nothing recorded; no data_dir at all, a mistake: it says so,
        // not that nobody did anything.
        let empty = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        let none = Destination::of(empty.path(), None);
        print(none, &always, Order::NewestFirst, true, &mut out).unwrap();
        assert!(out.is_empty());
        let missing = Destination::of(&empty.path().join("typo"), None);
        let refused = print(missing, &always, Order::NewestFirst, true, &mut out).unwrap_err();
        assert!(refused.contains("no data_dir at"), "{refused}");

        // A copy cut short (a full disk) is no success; a reader gone (`| head`) is.
        struct Failing(std::io::ErrorKind);
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(self.0.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let to = |kind| {
            let destination = Destination::of(dir.path(), None);
            print(
                destination,
                &filter,
                Order::OldestFirst,
                true,
                &mut Failing(kind),
            )
        };
        let full = to(std::io::ErrorKind::StorageFull).unwrap_err();
        assert!(full.contains("cannot write the audit log out"), "{full}");
        assert_eq!(to(std::io::ErrorKind::BrokenPipe), Ok(()));
    }

    /// A refusal's reason may quote what a verified token claims, and a name what it says:
    /// however long, each record stays within bounds, the counted-not-recorded ones too.
    #[test]
    fn a_refusal_s_reason_and_user_are_bounded_however_long_what_they_quote() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(
            Destination::of(dir.path(), None),
            Destination::of(dir.path(), None),
        )
        .unwrap();
        let (user, reason) = ("u".repeat(10_000), "r".repeat(70_000));
        let request = Request {
            method: "GET",
            path: "/",
            client: None,
        };
        // Over two seconds at most, one of which is past the budget.
        for _ in 0..3 * NAMED_PER_SECOND + 5 {
            audit.refusal(&user, "app", None, &reason, &request, None);
        }
        assert!(audit.flush(std::time::Duration::from_secs(10)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(text.contains("more refusals"), "none was counted");
        for line in text.lines() {
            assert!(line.len() < 4096, "a record of {} bytes", line.len());
        }
    }

    /// A record's line holds the characters that move a terminal escaped (JSON reads them back
    /// as they were): `portcullis audit --json` and `tail -f` show a path or an IdP's words as
    /// they are, not reversed or restyled by them.
    #[test]
    fn a_record_s_line_holds_direction_marks_and_controls_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(
            Destination::of(dir.path(), None),
            Destination::of(dir.path(), None),
        )
        .unwrap();
        let path = "/x\u{202e}nimda\u{9b}2J\u{7f}";
        audit.unverified_refusal("-", "a request was refused", &request("GET", path));
        assert!(audit.flush(std::time::Duration::from_secs(10)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(!text.contains(['\u{202e}', '\u{9b}', '\u{7f}']), "{text:?}");
        let record: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(record["path"], path, "{text}");
        // And shown so by `portcullis audit --json`, a line written raw (before they were
        // escaped, or a change rebuilt from PostgreSQL's rows) too.
        let raw = serde_json::to_string(&record).unwrap() + "\n";
        assert!(raw.contains('\u{202e}'), "{raw}");
        std::fs::write(dir.path().join(FILE_NAME), raw).unwrap();
        let mut out = Vec::new();
        let destination = Destination::of(dir.path(), None);
        print(
            destination,
            &Filter::default(),
            Order::OldestFirst,
            true,
            &mut out,
        )
        .unwrap();
        let printed = String::from_utf8(out).unwrap();
        assert!(
            !printed.contains(['\u{202e}', '\u{9b}', '\u{7f}']),
            "{printed:?}"
        );
        let shown: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
        assert_eq!(shown["path"], path, "{printed}");
    }

    /// An agent's refusals for many people share the agent's budget: a runaway agent holding
    /// hundreds of people's tokens is still one caller.
    #[test]
    fn an_agent_s_refusals_for_many_people_share_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(
            Destination::of(dir.path(), None),
            Destination::of(dir.path(), None),
        )
        .unwrap();
        let request = Request {
            method: "GET",
            path: "/",
            client: None,
        };
        let people = 2 * NAMED_PER_SECOND + 10;
        for i in 0..people {
            let person = format!("p{i}@corp.example");
            let agent = AgentRecord {
                name: "helpdesk".to_owned(),
                owners: Vec::new(),
                on_behalf_of: Some(person.clone()),
            };
            audit.refusal(&person, "app", None, "no", &request, Some(&agent));
        }
        assert!(audit.flush(std::time::Duration::from_secs(10)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        let one_by_one = text
            .lines()
            .filter(|line| line.contains("\"event\":\"refusal\"") && line.contains("@corp"))
            .count();
        // Within at most two seconds' budgets, however many people.
        assert!(one_by_one <= 2 * NAMED_PER_SECOND as usize, "{text}");
    }

    /// The log's lines as `each_line` and `each_line_from_end` give them, with their offsets.
    fn lines(path: &Path, order: Order) -> Vec<(String, u64)> {
        let mut file = File::open(path).unwrap();
        let mut seen = Vec::new();
        let mut f = |line: &[u8], at: u64| {
            seen.push((String::from_utf8(line.to_vec()).unwrap(), at));
            true
        };
        match order {
            Order::OldestFirst => each_line(&mut file, &mut f).unwrap(),
            Order::NewestFirst => each_line_from_end(&mut file, &mut f).unwrap(),
        }
        seen
    }

    #[test]
    fn the_log_reads_the_same_from_its_end_as_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // Lines across the reading's 64 KiB chunks, longer than one, and empty ones.
        let mut text = String::new();
        for i in 0..5_000 {
            let len = [0, 1, 17, 70_000, 150_000][i % 5] * usize::from(i % 97 == 0) + i % 300;
            // And one across many chunks.
            let len = if i == 4_321 { 3_000_000 } else { len };
            text.push_str(&format!("{i}:{}\n", "x".repeat(len)));
            if i % 1_000 == 0 {
                text.push('\n');
            }
        }
        let long_unfinished = format!("{{\"being\": \"{}", "y".repeat(200_000));
        for (tail, whole) in [
            ("", true),
            ("{\"being\": \"writ", false),
            (long_unfinished.as_str(), false),
        ] {
            std::fs::write(&path, format!("{text}{tail}")).unwrap();
            let forward = lines(&path, Order::OldestFirst);
            let mut backward = lines(&path, Order::NewestFirst);
            backward.reverse();
            assert_eq!(forward.len(), 5_005, "{whole}");
            assert!(forward.iter().all(|(line, _)| line.ends_with('\n')));
            let trimmed: Vec<(&str, u64)> = forward
                .iter()
                .map(|(line, at)| (line.trim_end_matches('\n'), *at))
                .collect();
            let backward: Vec<(&str, u64)> = backward
                .iter()
                .map(|(line, at)| (line.as_str(), *at))
                .collect();
            assert_eq!(trimmed, backward, "{whole}");
        }
        // A file without a whole line has none; an empty one neither.
        for text in ["", "no newline yet"] {
            std::fs::write(&path, text).unwrap();
            assert!(lines(&path, Order::NewestFirst).is_empty(), "{text:?}");
            assert!(lines(&path, Order::OldestFirst).is_empty(), "{text:?}");
        }
        // One that ends with its only line.
        std::fs::write(&path, "only\n").unwrap();
        assert_eq!(lines(&path, Order::NewestFirst), [("only".to_owned(), 0)]);
    }

    fn request<'a>(method: &'a str, path: &'a str) -> Request<'a> {
        Request {
            method,
            path,
            client: None,
        }
    }

    #[test]
    fn since_takes_a_time_or_a_duration() {
        let now = OffsetDateTime::parse("2025-01-02T03:04:05Z", &Rfc3339).unwrap();
        let at = |s: &str| parse_since(s, now).unwrap().format(&Rfc3339).unwrap();
        assert_eq!(at("1h"), "2025-01-02T02:04:05Z");
        assert_eq!(at("30m"), "2025-01-02T02:34:05Z");
        assert_eq!(at("2d"), "2024-12-31T03:04:05Z");
        assert_eq!(at("2020-05-06T07:08:09Z"), "2020-05-06T07:08:09Z");
        for bad in ["", "h", "1", "1y", "-1h", "yesterday"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_human_line_shows_control_characters_escaped() {
        let entry = Entry::Change {
            seq: 7,
            time: "2025-01-02T03:04:05Z".to_owned(),
            actor: "okta".to_owned(),
            client: None,
            op: "create".to_owned(),
            resource_type: "User".to_owned(),
            id: "u1".to_owned(),
            summary: "created userName \"eve\n2025-01-02T03:04:06Z change  #8 by okta\u{1b}[2K\u{202e}nimda\""
                .to_owned(),
        };
        let line = entry.human();
        assert!(!line.chars().any(char::is_control), "{line}");
        assert!(
            line.contains("eve\\n2025") && line.contains("\\u{1b}[2K\\u{202e}nimda"),
            "{line}"
        );
    }

    #[test]
    fn records_round_trip_and_filter() {
        let entry = Entry::Refusal {
            time: "2025-01-02T03:04:05Z".to_owned(),
            user: "Alice@corp.example".to_owned(),
            route: "app".to_owned(),
            rule: Some("routes[0].deny[0]".to_owned()),
            reason: "member of group contractors".to_owned(),
            method: "DELETE".to_owned(),
            path: "/admin".to_owned(),
            client: Some("203.0.113.5".to_owned()),
            agent: None,
        };
        let line = serde_json::to_string(&entry).unwrap();
        assert!(line.contains(r#""event":"refusal""#), "{line}");
        assert_eq!(serde_json::from_str::<Entry>(&line).unwrap(), entry);
        let human = entry.human();
        assert!(
            human.contains("Alice@corp.example from 203.0.113.5 DELETE /admin"),
            "{human}"
        );
        // Records written before they said where requests came from are read all the same.
        let older = line.replace(r#","client":"203.0.113.5""#, "");
        assert_ne!(older, line);
        assert_eq!(
            serde_json::from_str::<Entry>(&older).unwrap().client(),
            None
        );
        let since = |s: &str| Some(OffsetDateTime::parse(s, &Rfc3339).unwrap());
        let filter = |user: Option<&str>, since| Filter {
            user: user.map(str::to_owned),
            since,
            ..Filter::default()
        };
        assert!(filter(Some("alice@CORP.example"), None).matches(&entry));
        assert!(!filter(Some("bob@corp.example"), None).matches(&entry));
        // In any case beyond ASCII too, as the directory folds names.
        let emile = Entry::Session {
            time: "2025-01-02T03:04:05Z".to_owned(),
            user: "Émile@corp.example".to_owned(),
            what: "sign_in".to_owned(),
            detail: String::new(),
            client: None,
        };
        assert!(filter(Some("émile@corp.example"), None).matches(&emile));
        let aliased = Filter {
            user: Some("emile@corp.example".to_owned()),
            aliases: ["émile@corp.example".to_owned()].into(),
            ..Filter::default()
        };
        assert!(aliased.matches(&emile));
        assert!(filter(None, since("2025-01-02T03:04:05Z")).matches(&entry));
        assert!(!filter(None, since("2025-01-02T03:04:06Z")).matches(&entry));
        // A name longer than a record keeps, recorded cut: found by the name, and by an alias.
        let long = format!("svc-{}@corp.example", "u".repeat(296));
        let Entry::Refusal {
            time,
            route,
            reason,
            method,
            path,
            ..
        } = entry.clone()
        else {
            unreachable!("a refusal")
        };
        let cut = Entry::Refusal {
            time,
            user: bounded(&long, MAX_USER),
            route,
            rule: None,
            reason,
            method,
            path,
            client: None,
            agent: None,
        };
        assert!(filter(Some(&long), None).matches(&cut));
        assert!(!filter(Some(&long[1..]), None).matches(&cut));
        let by_alias = Filter {
            user: Some("svc@corp.example".to_owned()),
            aliases: [long.clone()].into(),
            ..Filter::default()
        };
        assert!(by_alias.matches(&cut));

        // Records about a user: the console's actions on them, and, given their id, the
        // changes to them and to groups' members by it.
        let id = "0b4ad4b6-7a3e-4f1e-9d55-6a2f9c1d2e3f";
        let about = Filter {
            user: Some("carol@corp.example".to_owned()),
            about: Some(id.to_owned()),
            ..Filter::default()
        };
        // Her sign-ins, recorded under another of her emails, with it among her aliases.
        let signed_in = Entry::Session {
            time: "2025-01-02T03:04:05Z".to_owned(),
            user: "Carol.Jones@corp.example".to_owned(),
            what: "sign_in".to_owned(),
            detail: String::new(),
            client: None,
        };
        assert!(!about.matches(&signed_in));
        let aliased = Filter {
            aliases: ["carol.jones@corp.example".to_owned()].into(),
            ..about
        };
        assert!(aliased.matches(&signed_in));
        let about = Filter {
            aliases: HashSet::new(),
            ..aliased
        };
        let change = |id: &str, summary: &str| Entry::Change {
            seq: 1,
            time: "2025-01-02T03:04:05Z".to_owned(),
            actor: "okta".to_owned(),
            client: None,
            op: "patch".to_owned(),
            resource_type: "User".to_owned(),
            id: id.to_owned(),
            summary: summary.to_owned(),
        };
        assert!(about.matches(&change(id, "attributes, deactivated")));
        let group = "6f1c2d3e-0000-4000-8000-000000000001";
        assert!(about.matches(&change(group, &format!("members +[] -[{id}]"))));
        assert!(!about.matches(&change(group, "members +[] -[someone-else]")));
        // A group a SCIM client named with carol's id is not about her.
        let named = format!("created displayName \"{id}\"");
        assert!(!about.matches(&change(group, &named)));
        let named = format!("deleted displayName \"members +[{id}]\"");
        assert!(!about.matches(&change(group, &named)));
        let ended = Entry::Action {
            time: "2025-01-02T03:04:05Z".to_owned(),
            actor: "admin@corp.example".to_owned(),
            action: "end_sessions".to_owned(),
            target: "Carol@corp.example".to_owned(),
            outcome: "ended 1 session".to_owned(),
            client: None,
        };
        assert!(about.matches(&ended));
        assert!(!about.matches(&entry), "alice's refusal is not about carol");
        // Without the id (`portcullis audit --user`), changes are matched by actor only.
        assert!(!filter(Some("carol@corp.example"), None).matches(&change(id, "deactivated")));

        // An agent's call on alice's behalf, recorded as hers, is the agent's too.
        let delegated = Entry::Refusal {
            time: "2025-01-02T03:04:05Z".to_owned(),
            user: "alice@corp.example".to_owned(),
            route: "api".to_owned(),
            rule: None,
            reason: "the agent is refused: no owner of the agent is an active user".to_owned(),
            method: "GET".to_owned(),
            path: "/tickets".to_owned(),
            client: None,
            agent: Some(AgentRecord {
                name: "helper".to_owned(),
                owners: vec!["bob@corp.example".to_owned()],
                on_behalf_of: Some("alice@corp.example".to_owned()),
            }),
        };
        assert!(filter(Some("agent:Helper"), None).matches(&delegated));
        assert!(filter(Some("alice@corp.example"), None).matches(&delegated));
        assert!(!filter(Some("agent:other"), None).matches(&delegated));
        assert!(!filter(Some("helper"), None).matches(&delegated));
    }

    /// One address flooding a route with refusals that name nobody (bad SCIM tokens) spends
    /// half the route's budget at most: an IdP's expired token, refused in the same second, is
    /// still recorded one by one. An IPv6 host's /64 is one address.
    #[test]
    fn one_client_s_flood_leaves_the_route_s_budget_to_others() {
        let mut budgets = Budgets::default();
        let from = |ip: &str| Some(ip.parse::<IpAddr>().expect("an address"));
        let mut take = |client: Option<IpAddr>| budgets.take(&Caller::Anonymous, "scim", client, 7);
        let flood = (0..500)
            .filter(|i| take(from(&format!("2001:db8::{:x}", i % 7))))
            .count();
        assert_eq!(flood, UNVERIFIED_SHARED as usize);
        assert!(take(from("192.0.2.1")), "another client is recorded");
        // Many clients together still get the route's budget only.
        let many = (0..1000u32)
            .filter(|i| take(from(&format!("198.51.{}.{}", i / 250, i % 250))))
            .count();
        assert_eq!(
            many,
            (UNVERIFIED_PER_SECOND - UNVERIFIED_SHARED - 1) as usize
        );
        assert!(!take(None));
        // Clients behind one address (a load balancer) still have the shared half.
        let mut budgets = Budgets::default();
        let one = (0..500)
            .filter(|_| budgets.take(&Caller::Anonymous, "scim", from("10.0.0.1"), 7))
            .count();
        assert_eq!(one, UNVERIFIED_SHARED as usize);
        // Its count says which budget it went past: not the route's 100, for 50 recorded.
        let counted: Vec<Entry> = unrecorded_records(budgets.unrecorded()).collect();
        let [Entry::Refusal { reason, .. }] = &counted[..] else {
            panic!("one count: {counted:?}");
        };
        assert!(reason.starts_with("450 more refusals"), "{reason}");
        assert!(
            reason.contains("or one address's share of them"),
            "{reason}"
        );
        // IPv4 clients of a dual-stack listener (`::ffff:a.b.c.d`) are each their own address.
        let mut budgets = Budgets::default();
        let mut take =
            |client: Option<IpAddr>| budgets.take(&Caller::Anonymous, "admin", client, 7);
        let flood = (0..500)
            .filter(|_| take(from("::ffff:198.51.100.1")))
            .count();
        assert_eq!(flood, UNVERIFIED_SHARED as usize);
        assert!(
            take(from("::ffff:203.0.113.9")),
            "another IPv4 client is recorded"
        );
    }

    #[test]
    fn refusals_past_the_rate_are_counted_per_caller_and_route_and_the_counts_recorded() {
        let mut budgets = Budgets::default();
        let anyone = |b: &mut Budgets, route: &str, second: u64| {
            b.take(&Caller::Anonymous, route, None, second)
        };
        let named = |b: &mut Budgets, who: &str, route: &str, second: u64| {
            b.take(&Caller::Named(who.to_owned()), route, None, second)
        };
        for _ in 0..UNVERIFIED_PER_SECOND {
            assert!(anyone(&mut budgets, "api", 7));
        }
        assert!(!anyone(&mut budgets, "api", 7));
        assert!(!anyone(&mut budgets, "api", 7));
        // Another route has a budget of its own, and so has each person.
        assert!(anyone(&mut budgets, "scim", 7));
        for _ in 0..NAMED_PER_SECOND {
            assert!(named(&mut budgets, "alice", "api", 7));
        }
        assert!(!named(&mut budgets, "alice", "api", 7));
        assert!(named(&mut budgets, "bob", "api", 7));
        assert!(named(&mut budgets, "alice", "app", 7));
        // Someone named `anonymous` is not the requests that name nobody, whose budget is spent.
        assert!(named(&mut budgets, "anonymous", "api", 7));
        // A new second: recorded again; what was counted is told once; and only the callers
        // refused since, or with a count to tell, are kept.
        assert!(anyone(&mut budgets, "api", 8));
        assert_eq!(budgets.routes["api"].len(), 2, "{budgets:?}");
        let unrecorded = |route: &str, who: Caller, count| Unrecorded {
            route: route.to_owned(),
            who,
            count,
        };
        let alice = || Caller::Named("alice".to_owned());
        assert_eq!(
            budgets.unrecorded(),
            [
                unrecorded("api", Caller::Anonymous, 2),
                unrecorded("api", alice(), 1)
            ]
        );
        assert!(budgets.unrecorded().is_empty());
        named(&mut budgets, "alice", "api", 9);
        assert_eq!(budgets.routes.len(), 1, "{budgets:?}");
        assert_eq!(budgets.routes["api"].len(), 1, "{budgets:?}");

        let records: Vec<Entry> = unrecorded_records(vec![
            unrecorded("api", Caller::Anonymous, 2),
            unrecorded("api", alice(), 5),
        ])
        .collect();
        assert!(
            matches!(&records[..], [
                Entry::Refusal { route, reason, user, .. },
                Entry::Refusal { user: alice, reason: hers, .. },
            ] if route == "api" && user == "anonymous" && reason.starts_with("2 more refusals")
                && alice == "alice" && hers.starts_with("5 more refusals of alice's requests")),
            "{records:?}"
        );
    }

    /// The refusals with a reason containing `marker` in the log `text`, whether recorded one
    /// by one or counted: (one by one, counted).
    fn accounted(text: &str, marker: &str) -> (u64, u64) {
        let counted = text
            .lines()
            .filter_map(|line| {
                let reason =
                    serde_json::from_str::<serde_json::Value>(line).ok()?["reason"].clone();
                let n = reason
                    .as_str()?
                    .strip_suffix(" were counted but not recorded one by one")?;
                n.split(' ').next()?.parse::<u64>().ok()
            })
            .sum();
        let one_by_one = text.lines().filter(|l| l.contains(marker)).count() as u64;
        (one_by_one, counted)
    }

    #[test]
    fn counted_refusals_are_recorded_by_the_writer_within_a_second_or_two() {
        let dir = tempfile::tempdir().unwrap();
        let log = || Destination::of(dir.path(), None);
        let audit = Audit::open(log(), log()).unwrap();
        let burst = u64::from(UNVERIFIED_PER_SECOND) + 50;
        for _ in 0..burst {
            audit.unverified_refusal(
                "api",
                "a bearer token was refused: expired",
                &request("GET", "/"),
            );
        }
        let path = dir.path().join(FILE_NAME);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let (one_by_one, counted) = accounted(&text, "expired");
            if one_by_one + counted == burst {
                assert!(one_by_one >= u64::from(UNVERIFIED_PER_SECOND), "{text}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_person_looping_on_a_refused_path_is_counted_past_the_rate_and_names_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = || Destination::of(dir.path(), None);
        let audit = Audit::open(log(), log()).unwrap();
        let burst = u64::from(NAMED_PER_SECOND) * 3;
        for _ in 0..burst {
            let why = "alice is in none of the groups /admin allows";
            audit.refusal("alice", "app", None, why, &request("GET", "/admin"), None);
        }
        audit.refusal(
            "bob",
            "app",
            None,
            "bob too",
            &request("GET", "/admin"),
            None,
        );
        assert!(audit.flush(std::time::Duration::from_secs(30)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        let (one_by_one, counted) = accounted(&text, "none of the groups");
        assert_eq!(one_by_one + counted, burst, "{text}");
        // Within the second or two the loop took, no more than two seconds' worth one by one.
        assert!(one_by_one <= 2 * u64::from(NAMED_PER_SECOND), "{text}");
        assert!(text.contains("more refusals of alice's requests"), "{text}");
        assert!(text.contains("bob too"), "{text}");
    }

    #[test]
    fn a_flush_returns_once_everything_sent_and_counted_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = || Destination::of(dir.path(), None);
        let audit = Audit::open(log(), log()).unwrap();
        audit.session("alice@corp.example", "sign_out", "", None);
        let burst = u64::from(UNVERIFIED_PER_SECOND) + 3;
        let reason = "the bearer token is not one of the SCIM tokens";
        for _ in 0..burst {
            audit.unverified_refusal("scim", reason, &request("GET", "/"));
        }
        // No waiting: written when the flush returns, the count included.
        assert!(audit.flush(std::time::Duration::from_secs(30)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(
            text.lines().next().is_some_and(|l| l.contains("sign_out")),
            "{text}"
        );
        let (one_by_one, counted) = accounted(&text, "SCIM tokens");
        assert_eq!(one_by_one + counted, burst, "{text}");
    }

    /// A session record's detail, which may quote the IdP (the error a refresh got), is cut
    /// as a named refusal's reason is.
    #[test]
    fn a_session_record_s_detail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = || Destination::of(dir.path(), None);
        let audit = Audit::open(log(), log()).unwrap();
        let said = format!("the IdP refused: {}", "x".repeat(1 << 20));
        audit.session("alice@corp.example", "idp_ended", &said, None);
        assert!(audit.flush(std::time::Duration::from_secs(30)));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(text.len() < 2 * MAX_NAMED_REASON, "{} bytes", text.len());
        assert!(text.contains("the IdP refused: xxx"), "{text}");
        assert!(text.contains("bytes more)"), "{text}");
    }

    #[test]
    fn the_file_is_appended_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = || Destination::of(dir.path(), None);
        let audit = Audit::open(log(), log()).unwrap();
        audit.refusal("a", "r", None, "why", &request("GET", "/"), None);
        audit.allow_sampled(1.0, "b", "r", &request("GET", "/x"), None);
        audit.allow_sampled(0.0, "c", "r", &request("GET", "/y"), None);
        let path = dir.path().join(FILE_NAME);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                assert!(text.contains(r#""user":"b""#) && !text.contains(r#""user":"c""#));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            thread::sleep(std::time::Duration::from_millis(10));
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A directory four users were created in (four changes), and a data directory for its
    /// audit log.
    struct Logged {
        world: crate::testing::World,
        all: Vec<Change>,
        dir: tempfile::TempDir,
    }

    impl Logged {
        async fn new() -> Logged {
            let world = crate::testing::World::new();
            for name in ["a@x", "b@x", "c@x", "d@x"] {
                world.user(name).await;
            }
            let all = changes_of(&world)(0, 100).unwrap();
            assert_eq!(all.len(), 4);
            Logged {
                world,
                all,
                dir: tempfile::tempdir().unwrap(),
            }
        }
    }

    /// The directory's change table, as `Audit::recover_changes` reads it.
    fn changes_of(
        world: &crate::testing::World,
    ) -> impl Fn(u64, usize) -> Result<Vec<Change>, String> + Copy + '_ {
        |after, limit| {
            world
                .directory
                .changes(after, limit)
                .map_err(|e| e.detail.clone())
        }
    }

    /// The sequences of the changes in the log file at `path`, in its order.
    fn change_seqs(path: &Path) -> Vec<u64> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| match serde_json::from_str::<Entry>(line) {
                Ok(Entry::Change { seq, .. }) => Some(seq),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn changes_the_log_lacks_are_appended_from_the_directory_once() {
        let f = Logged::new().await;
        let (changes, all, dir) = (changes_of(&f.world), &f.all, f.dir.path());
        let log = || Destination::of(dir, None);
        let seqs = || change_seqs(&dir.join(FILE_NAME));
        {
            // The first two made it to the log, with a refusal after them; then a crash.
            let audit = Audit::open(log(), log()).unwrap();
            (audit.change_sink())(&all[..2]);
            audit.refusal("a", "r", None, "why", &request("GET", "/"), None);
            assert!(audit.flush(std::time::Duration::from_secs(5)));
        }
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            2
        );
        assert!(audit.flush(std::time::Duration::from_secs(5)));
        let expected: Vec<u64> = all.iter().map(|c| c.seq).collect();
        assert_eq!(seqs(), expected);
        // Nothing twice.
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            0
        );
    }

    /// A change dropped (the queue was full, or its write failed for good) before later ones
    /// were written is appended at the next start, and only it.
    #[tokio::test]
    async fn a_change_lost_before_later_ones_were_written_is_appended_at_the_next_start() {
        let f = Logged::new().await;
        let (changes, all, dir) = (changes_of(&f.world), &f.all, f.dir.path());
        let log = || Destination::of(dir, None);
        let seqs = || change_seqs(&dir.join(FILE_NAME));
        let wait = std::time::Duration::from_secs(5);
        {
            let audit = Audit::open(log(), log()).unwrap();
            (audit.change_sink())(&all[..1]);
            // The second is lost as a full queue loses it; the third and fourth are written.
            audit.losses.lost_change(all[1].seq);
            (audit.change_sink())(&all[2..]);
            assert!(audit.flush(wait));
        }
        assert_eq!(seqs(), [all[0].seq, all[2].seq, all[3].seq]);
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            1
        );
        assert!(audit.flush(wait));
        assert_eq!(seqs(), [all[0].seq, all[2].seq, all[3].seq, all[1].seq]);
        drop(audit);
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            0,
            "nothing twice"
        );
        // Rotated away before any change was written since: the position held.
        assert!(audit.flush(wait));
        drop(audit);
        std::fs::rename(dir.join(FILE_NAME), dir.join("audit.jsonl.1")).unwrap();
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            0,
            "after a rotation"
        );
    }

    /// A log that outlived its directory (`directory.redb` moved out and the IdP's users
    /// pushed again, or an older copy put back) follows the new one: a change of it that a
    /// crash took before it was written is appended at the next start, though the log stood
    /// past its sequence.
    #[tokio::test]
    async fn a_log_that_outlived_its_directory_follows_the_next() {
        let f = Logged::new().await;
        let dir = f.dir.path();
        let log = || Destination::of(dir, None);
        let wait = std::time::Duration::from_secs(5);
        {
            let audit = Audit::open(log(), log()).unwrap();
            (audit.change_sink())(&f.all);
            assert!(audit.flush(wait));
        }
        let next = crate::testing::World::new();
        let (changes, seq) = (changes_of(&next), || next.directory.seq());
        {
            let audit = Audit::open(log(), log()).unwrap();
            assert_eq!(audit.recover_changes(seq(), changes).unwrap(), 0);
            next.user("e@x").await;
            next.user("f@x").await;
            let made = changes(0, 100).unwrap();
            assert_eq!(made.len(), 2);
            assert!(made[1].seq < f.all[3].seq);
            // The first is written; a crash takes the second.
            (audit.change_sink())(&made[..1]);
            assert!(audit.flush(wait));
        }
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(audit.recover_changes(seq(), changes).unwrap(), 1);
        assert!(audit.flush(wait));
        let seqs: Vec<u64> = changes(0, 100).unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(change_seqs(&dir.join(FILE_NAME)), seqs);
        assert_eq!(
            audit.recover_changes(seq(), changes).unwrap(),
            0,
            "nothing twice"
        );
        // The other directory's log is kept whole beside it.
        let aside: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("audit.jsonl.another-directory-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let old: Vec<u64> = f.all.iter().map(|c| c.seq).collect();
        assert_eq!(change_seqs(&dir.join(&aside[0])), old);
        // Moved aside again (its position lost): kept where it stands now.
        assert!(audit.flush(wait));
        drop(audit);
        let position = dir.join("audit.last-change");
        std::fs::write(&position, format!("{}\n", f.all[3].seq)).unwrap();
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(audit.recover_changes(seq(), changes).unwrap(), 0);
        assert_eq!(change_seqs(&dir.join(&aside[0])), old);
        assert_eq!(
            std::fs::read_to_string(&position).unwrap(),
            format!("{}\n", seq())
        );
    }

    /// A log moved aside under a name another already has (moved in the same second) goes
    /// beside it, never over it.
    #[test]
    fn a_log_moved_aside_never_replaces_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let taken = dir.path().join("audit.jsonl.another-directory-7");
        std::fs::write(&taken, "the first\n").unwrap();
        std::fs::write(&path, "the second\n").unwrap();
        let aside = move_aside_at(&path, 7, |from, to| std::fs::hard_link(from, to)).unwrap();
        assert_eq!(aside, dir.path().join("audit.jsonl.another-directory-7-2"));
        assert_eq!(std::fs::read_to_string(&taken).unwrap(), "the first\n");
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), "the second\n");
        assert!(!path.exists());
        // Where no link can be made: renamed, to a name free of files and of links alike.
        std::os::unix::fs::symlink(
            "nowhere",
            dir.path().join("audit.jsonl.another-directory-7-3"),
        )
        .unwrap();
        std::fs::write(&path, "the third\n").unwrap();
        let no_links = |_: &Path, _: &Path| Err(std::io::ErrorKind::PermissionDenied.into());
        let aside = move_aside_at(&path, 7, no_links).unwrap();
        assert_eq!(aside, dir.path().join("audit.jsonl.another-directory-7-4"));
        assert_eq!(std::fs::read_to_string(&taken).unwrap(), "the first\n");
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), "the third\n");
        assert!(!path.exists());
    }

    /// A crash that cut the last line short leaves it on its own: the change recovered after
    /// it is read back, not glued to it.
    #[tokio::test]
    async fn a_last_line_a_crash_cut_short_takes_no_record_after_it_down() {
        let f = Logged::new().await;
        let (changes, all, dir) = (changes_of(&f.world), &f.all, f.dir.path());
        let log = || Destination::of(dir, None);
        let path = dir.join(FILE_NAME);
        let wait = std::time::Duration::from_secs(5);
        {
            let audit = Audit::open(log(), log()).unwrap();
            (audit.change_sink())(&all[..2]);
            assert!(audit.flush(wait));
        }
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let torn = format!(r#"{{"event":"change","seq":{},"ti"#, all[2].seq);
        file.write_all(torn.as_bytes()).unwrap();
        drop(file);
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            2
        );
        assert!(audit.flush(wait));
        let expected: Vec<u64> = all.iter().map(|c| c.seq).collect();
        assert_eq!(change_seqs(&path), expected);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("{torn}\n{{")), "{text}");
    }

    /// A line left unended while Portcullis runs (its newline could not be written after a
    /// crash's cut record, or a failed write could not be cut off again) takes no record
    /// after it down either: the next write begins on a line of its own.
    #[tokio::test]
    async fn a_line_left_unended_takes_no_record_written_after_it_down() {
        let f = Logged::new().await;
        let (all, dir) = (&f.all, f.dir.path());
        let log = || Destination::of(dir, None);
        let path = dir.join(FILE_NAME);
        let wait = std::time::Duration::from_secs(5);
        let audit = Audit::open(log(), log()).unwrap();
        (audit.change_sink())(&all[..1]);
        assert!(audit.flush(wait));
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"event":"refus"#).unwrap();
        drop(file);
        (audit.change_sink())(&all[1..2]);
        assert!(audit.flush(wait));
        assert_eq!(change_seqs(&path), vec![all[0].seq, all[1].seq]);
    }

    /// `logrotate` moves the file away while Portcullis writes it, and again while it is
    /// stopped: records go on into a new file, private like the first, and the recovery at
    /// start appends only what no file has.
    #[tokio::test]
    async fn a_rotated_log_is_followed_and_recovery_starts_where_it_stood() {
        use std::os::unix::fs::PermissionsExt;
        let f = Logged::new().await;
        let (changes, all, dir) = (changes_of(&f.world), &f.all, f.dir.path());
        let log = || Destination::of(dir, None);
        let path = dir.join(FILE_NAME);
        let seqs = change_seqs;
        let wait = std::time::Duration::from_secs(5);
        {
            let audit = Audit::open(log(), log()).unwrap();
            (audit.change_sink())(&all[..2]);
            assert!(audit.flush(wait));
            std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
            (audit.change_sink())(&all[2..3]);
            audit.refusal("a", "r", None, "why", &request("GET", "/"), None);
            assert!(audit.flush(wait));
        }
        assert_eq!(seqs(&dir.join("audit.jsonl.1")), [all[0].seq, all[1].seq]);
        assert_eq!(seqs(&path), [all[2].seq]);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains(r#""event":"refusal""#));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Rotated while stopped: the new file has no change, and only the fourth is missing.
        std::fs::rename(&path, dir.join("audit.jsonl.2")).unwrap();
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            1
        );
        assert!(audit.flush(wait));
        assert_eq!(seqs(&path), [all[3].seq]);

        // A damaged position (a crash while it was written) leaves the file alone to say:
        // the process starts, and with the file just rotated, every change is appended again.
        drop(audit);
        std::fs::rename(&path, dir.join("audit.jsonl.3")).unwrap();
        std::fs::write(dir.join("audit.last-change"), "").unwrap();
        let audit = Audit::open(log(), log()).unwrap();
        assert_eq!(
            audit
                .recover_changes(f.world.directory.seq(), changes)
                .unwrap(),
            4
        );
    }

    /// Records the queue had no room for leave a record of their number in the log, which
    /// every filter but the time selects (they may have been anyone's), so that the trail
    /// shows where it has a hole.
    #[test]
    fn records_the_queue_had_no_room_for_are_recorded_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut store = Store::File(LogFile::open(path.clone()).unwrap());
        let (queue, records) = mpsc::sync_channel(1);
        let losses = Losses::default();
        let entry = |user: &str| Entry::Session {
            time: now(),
            user: user.to_owned(),
            what: "sign_in".to_owned(),
            detail: String::new(),
            client: None,
        };
        for user in ["kept", "dropped", "dropped too"] {
            enqueue(&queue, &losses, entry(user));
        }
        drop(queue);
        write_loop(
            &mut store,
            &records,
            &Mutex::new(Budgets::default()),
            &losses,
        );
        let written: Vec<Entry> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let lost = Entry::Lost {
            time: written[1].time().to_owned(),
            count: 2,
            why: "the queue was full (the log could not keep up)".to_owned(),
        };
        assert_eq!(
            written,
            [entry("kept"), lost.clone()].map(|e| match e {
                Entry::Session { user, what, .. } => Entry::Session {
                    time: written[0].time().to_owned(),
                    user,
                    what,
                    detail: String::new(),
                    client: None,
                },
                other => other,
            })
        );
        assert!(lost.human().contains("lost    2 records were not kept"));
        let theirs = Filter {
            user: Some("dropped".to_owned()),
            kind: Some("session".to_owned()),
            route: Some("http://app.test".to_owned()),
            ..Filter::default()
        };
        assert!(theirs.matches(&lost));
        // Recorded once: the next second's record counts only what is lost after it.
        assert_eq!(lost_records(&losses), []);
    }

    #[test]
    fn a_record_the_queue_has_no_room_for_is_counted_in_the_metrics() {
        let lost = || {
            let page = String::from_utf8(crate::metrics::render()).unwrap();
            page.lines()
                .find(|l| l.starts_with("portcullis_audit_records_lost_total{why=\"queue_full\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = lost();
        let (queue, _records) = mpsc::sync_channel(1);
        let losses = Losses::default();
        let entry = || Entry::Session {
            time: now(),
            user: "u".to_owned(),
            what: "sign_in".to_owned(),
            detail: String::new(),
            client: None,
        };
        enqueue(&queue, &losses, entry());
        enqueue(&queue, &losses, entry());
        assert_eq!(losses.dropped.load(Ordering::Relaxed), 1);
        assert!(lost() > before, "counted in the metrics");
        assert_eq!(losses.position(9), 9, "no change lost");
        // A SCIM change dropped holds the log's position short of it.
        let change = |seq| Entry::Change {
            time: now(),
            seq,
            actor: "okta".to_owned(),
            client: None,
            op: "create".to_owned(),
            resource_type: "User".to_owned(),
            id: "1".to_owned(),
            summary: String::new(),
        };
        enqueue(&queue, &losses, change(7));
        enqueue(&queue, &losses, change(8));
        assert_eq!(losses.position(9), 6);
    }
}
