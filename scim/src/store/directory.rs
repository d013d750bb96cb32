//! [`Directory`]: the store as handlers and the proxy see it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::thread;

use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::index::{
    fold, format_id, AgentEntry, AgentRefusal, GroupEntry, Id, Index, Retired, UserEntry,
};
use super::writer::Overlay;
use super::{
    Batch, Change, Command, Entry, Feed, Loaded, Record, Row, Seq, Storage, StoreError, Written,
    MAX_BATCH,
};
use crate::error::ScimError;
use crate::eval::{check_filter, matches_checked, references_attribute};
use crate::filter::{AttrExpr, AttrOp, AttrPath, CompValue, CompareOp, Filter};
use crate::schema::ResourceType;
use crate::value::get_ci;

/// The clock the writer stamps `meta` with; a parameter so tests can move time.
pub type Clock = Box<dyn Fn() -> OffsetDateTime + Send>;

/// Receives the changes of every batch this process committed, in commit order, once they are
/// durable and before the writes are answered (the audit log). With a shared store each change
/// is thus heard once in the fleet, by the replica that made it. It runs on the writer thread,
/// so it must hand them off without blocking.
pub type ChangeSink = Box<dyn Fn(&[Change]) + Send>;

/// Holds the entries kept beside the directory ([`Entry`]) in memory for whoever owns them.
/// It is called on the writer thread, in commit order, so it must not block.
pub trait EntrySink: Send + Sync {
    /// Every kept entry, replacing what was held: at start, and after a full reload.
    fn load(&self, entries: Vec<Entry>);
    /// The entries of a committed batch, in order, before the batch's writes are answered.
    fn apply(&self, entries: &[Entry]);
}

/// Who hears of committed batches besides the index.
#[derive(Default)]
pub struct Sinks {
    pub changes: Option<ChangeSink>,
    pub entries: Option<Arc<dyn EntrySink>>,
}

enum Job {
    Write(Write),
    CatchUp(mpsc::SyncSender<Result<(Seq, Seq), StoreError>>),
}

struct Write {
    command: Command,
    actor: String,
    client: Option<String>,
    reply: oneshot::Sender<Result<Written, ScimError>>,
}

pub struct Directory {
    storage: Arc<dyn Storage>,
    index: Arc<RwLock<Index>>,
    /// `None` only while dropping, so the writer sees its queue close and stops.
    writer: Option<mpsc::Sender<Job>>,
    writer_thread: Option<thread::JoinHandle<()>>,
    /// The sequence number of the last batch made visible, for those who act on changes.
    visible: Arc<Visible>,
}

/// The sequence number of the last batch made visible: read without a lock (every request
/// reads it); and of the last that changed a resource or a membership, watched by those who
/// act on changes to who may do what.
struct Visible {
    seq: AtomicU64,
    standing: AtomicU64,
    watch: tokio::sync::watch::Sender<Seq>,
    /// The sequence after the last batch applied from the store's feed (or reload).
    foreign: AtomicU64,
}

impl Visible {
    fn new(seq: Seq) -> Self {
        Self {
            seq: AtomicU64::new(seq),
            standing: AtomicU64::new(seq),
            watch: tokio::sync::watch::Sender::new(seq),
            foreign: AtomicU64::new(0),
        }
    }

    /// `standing`: whether the batch changed a resource or a membership (or the directory was
    /// read anew), not only entries beside it (sessions, keys).
    fn set(&self, seq: Seq, standing: bool) {
        self.seq.store(seq, Ordering::Release);
        if standing {
            self.standing.store(seq, Ordering::Release);
            self.watch.send_replace(seq);
        }
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            // The writer finishes the batch in hand (answering it) and stops.
            let _ = thread.join();
        }
    }
}

/// A user's standing, as the proxy asks for it on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStatus {
    pub row: Row,
    pub id: Id,
    pub active: bool,
}

/// How the proxy finds a caller's SCIM user.
#[derive(Debug, Clone, Copy)]
pub enum SubjectKey<'a> {
    /// `userName`, case-insensitively.
    UserName(&'a str),
    /// One of the user's `emails`, case-insensitively; must name exactly one user.
    Email(&'a str),
    /// `externalId`, exactly; must name exactly one user.
    ExternalId(&'a str),
}

/// What the directory knows of a caller.
pub enum Lookup<'a> {
    /// Exactly one user.
    Found(SubjectView<'a>),
    /// Nobody has this identifier, and no deleted user had it.
    Unknown,
    /// Several users have it (emails and `externalId` need not be unique): refused rather
    /// than guessed.
    Ambiguous(usize),
    /// Nobody has it now, but a user the IdP deleted had it.
    Deleted,
}

impl<'a> Lookup<'a> {
    /// The user, when exactly one was found.
    pub fn found(self) -> Option<SubjectView<'a>> {
        match self {
            Lookup::Found(view) => Some(view),
            _ => None,
        }
    }
}

/// A user as the authorization path sees it: borrowed from the index under its read lock,
/// with every group it is in, directly or through nested groups.
pub struct SubjectView<'a> {
    pub user: &'a UserEntry,
    pub groups: Vec<&'a GroupEntry>,
    pub stamp: Stamp,
}

/// Which user a [`SubjectView`] shows, in which state of which index: two views with the same
/// stamp show the same user with the same attributes and groups. It keys caches of what is
/// derived from a view; any change to a resource or a membership makes every stamp new (an
/// entry beside the directory, a session begun or used, does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub generation: u64,
    pub seq: Seq,
    pub row: Row,
}

/// How the proxy finds a caller's SCIM Agent.
#[derive(Debug, Clone, Copy)]
pub enum AgentKey<'a> {
    /// `name`, case-insensitively.
    Name(&'a str),
    /// `externalId`, exactly; must name exactly one agent.
    ExternalId(&'a str),
}

/// What the directory knows of an agent.
pub enum AgentLookup<'a> {
    Found(AgentView<'a>),
    /// No agent has this identifier, and no deleted agent had it.
    Unknown,
    /// Several agents have this `externalId`: refused rather than guessed.
    Ambiguous(usize),
    /// No agent has it now, but one the IdP deleted had it.
    Deleted,
}

/// An agent as the authorization path sees it, with its owner chain judged.
pub struct AgentView<'a> {
    pub agent: &'a AgentEntry,
    /// Every group the agent is in, directly or through nested groups.
    pub groups: Vec<&'a GroupEntry>,
    /// Whether it may act now (see [`Index::agent_standing`]).
    pub standing: Result<(), AgentRefusal>,
    /// The owners it stands through: active owning users, and owning groups with an active
    /// member.
    pub owners: Vec<Owner<'a>>,
    /// The groups those owners are in: an owning user's groups, and an owning group with the
    /// groups it is in (its active member is in all of them).
    pub owner_groups: Vec<&'a GroupEntry>,
    /// Since when it has stood, in Unix seconds (0: not known): the later of its own
    /// `valid_since_unix` and its active applications' (deactivated and re-activated). A token
    /// issued before is not taken: one an application's deactivation refused stays refused.
    /// (Owners are not dated: a user's stamp also moves with a new email, which says nothing
    /// of whose the agent's token is.)
    pub valid_since_unix: u64,
}

/// One owner an agent stands through.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
    User(&'a UserEntry),
    Group(&'a GroupEntry),
}

impl Owner<'_> {
    /// The owner's `userName`, or the group's `displayName`.
    pub fn name(&self) -> &str {
        match self {
            Owner::User(user) => &user.user_name,
            Owner::Group(group) => &group.display_name,
        }
    }
}

/// One member of a group, for rendering `members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub rt: ResourceType,
    pub display: Option<String>,
}

/// Member `row` of a group as it is shown: users without a `display`, agents and groups with
/// their names.
fn member(index: &Index, row: Row) -> Option<Member> {
    let (id, rt, display) = if let Some(user) = index.user(row) {
        (user.id, ResourceType::User, None)
    } else if let Some(agent) = index.agent(row) {
        (agent.id, ResourceType::Agent, Some(agent.name.to_string()))
    } else {
        let group = index.group(row)?;
        (
            group.id,
            ResourceType::Group,
            Some(group.display_name.to_string()),
        )
    };
    Some(Member {
        id: format_id(id),
        rt,
        display,
    })
}

/// One group a user or group is in, for rendering a User's `groups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberOf {
    pub id: String,
    pub display: String,
    pub direct: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    #[default]
    Ascending,
    Descending,
}

#[derive(Debug, Clone, Default)]
pub struct Query {
    pub filter: Option<Filter>,
    pub sort_by: Option<AttrPath>,
    pub sort_order: SortOrder,
    /// 1-based, as in SCIM.
    pub start_index: usize,
    pub count: Option<usize>,
}

#[derive(Debug)]
pub struct Page {
    pub total: usize,
    /// For Groups, `members` is not included (see [`Directory::members`]).
    pub records: Vec<Record>,
}

impl Directory {
    /// Closes the store at shutdown (see [`Storage::close`]): writes after it fail.
    pub fn close(&self) {
        self.storage.close();
    }

    /// Loads `storage` into a fresh index and starts the writer thread.
    pub fn open(storage: Arc<dyn Storage>, clock: Clock) -> Result<Self, StoreError> {
        Self::open_with_sinks(storage, clock, Sinks::default())
    }

    /// [`Directory::open`], also handing every committed batch's changes and entries to
    /// `sinks`.
    pub fn open_with_sinks(
        storage: Arc<dyn Storage>,
        clock: Clock,
        sinks: Sinks,
    ) -> Result<Self, StoreError> {
        let (index, entries) = load_index(&*storage)?;
        if let Some(sink) = &sinks.entries {
            sink.load(entries);
        }
        Self::start(storage, index, clock, sinks)
    }

    /// Starts on an empty index, for a shared store: the first [`Directory::catch_up`] loads
    /// it (or replays it from the store's feed). Until then it knows nobody, and callers
    /// that need to be sure it is current ask their lease (see `postgres::Freshness`).
    pub fn open_unloaded(
        storage: Arc<dyn Storage>,
        clock: Clock,
        sinks: Sinks,
    ) -> Result<Self, StoreError> {
        Self::start(storage, Index::default(), clock, sinks)
    }

    fn start(
        storage: Arc<dyn Storage>,
        index: Index,
        clock: Clock,
        sinks: Sinks,
    ) -> Result<Self, StoreError> {
        let seq = index.seq;
        let index = Arc::new(RwLock::new(index));
        let (writer, jobs) = mpsc::channel();
        let visible = Arc::new(Visible::new(seq));
        let writer_thread = {
            let storage = storage.clone();
            let index = index.clone();
            let visible = visible.clone();
            thread::Builder::new()
                .name("directory-writer".to_owned())
                .spawn(move || {
                    let writer = Writer {
                        storage: &*storage,
                        index: &index,
                        clock: &clock,
                        sinks: &sinks,
                        visible: &visible,
                    };
                    writer.run(&jobs)
                })
                .map_err(|e| StoreError::Backend(format!("cannot start the writer: {e}")))?
        };
        Ok(Self {
            storage,
            index,
            writer: Some(writer),
            writer_thread: Some(writer_thread),
            visible,
        })
    }

    /// Applies what other processes committed to a shared store since this index was last
    /// brought up to date (reloading in full if the store no longer keeps the batches in
    /// between). Blocks until done; returns the sequence number now visible, and the
    /// sequence number after the last batch ever applied from the store rather than written
    /// here (which other writers may be waiting for).
    pub fn catch_up(&self) -> Result<(Seq, Seq), StoreError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.writer
            .as_ref()
            .ok_or_else(|| StoreError::Backend("the directory is closing".to_owned()))?
            .send(Job::CatchUp(reply))
            .map_err(|_| StoreError::Backend("the directory writer has stopped".to_owned()))?;
        answer
            .recv()
            .map_err(|_| StoreError::Backend("the directory writer has stopped".to_owned()))?
    }

    /// Performs a write on behalf of `actor` (the SCIM token's name). Returns once the write
    /// is durable and visible to every later read.
    pub async fn write(&self, command: Command, actor: &str) -> Result<Written, ScimError> {
        self.write_from(command, actor, None).await
    }

    /// [`Directory::write`], for a request from the address `client`, which its change
    /// records.
    pub async fn write_from(
        &self,
        command: Command,
        actor: &str,
        client: Option<&str>,
    ) -> Result<Written, ScimError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Write(Write {
            command,
            actor: actor.to_owned(),
            client: client.map(str::to_owned),
            reply,
        });
        self.writer
            .as_ref()
            .ok_or_else(|| ScimError::new(503, None, "the directory is closing"))?
            .send(job)
            .map_err(|_| ScimError::new(503, None, "the directory writer has stopped"))?;
        answer
            .await
            .map_err(|_| ScimError::new(503, None, "the directory writer has stopped"))?
    }

    fn index(&self) -> RwLockReadGuard<'_, Index> {
        // A poisoned lock means a panic while applying a batch: the index may be half-updated,
        // and no answer from it can be trusted, allow or deny. Stop the process; a restart
        // rebuilds the index from storage.
        match self.index.read() {
            Ok(guard) => guard,
            Err(_) => {
                tracing::error!("directory index poisoned by a panic; stopping");
                std::process::abort()
            }
        }
    }

    /// Whether other processes write to the same store (see [`Storage::is_shared`]).
    pub fn is_shared(&self) -> bool {
        self.storage.is_shared()
    }

    /// Whether the store holds changes this process refused and only a restart reads (see
    /// [`Storage::wedged`]): the first of them.
    pub fn wedged(&self) -> Option<Seq> {
        self.storage.wedged()
    }
    /// Whether `query` reads at most `limit` records, all from this process' own storage (not
    /// PostgreSQL, which is a round trip away), and costs little on each: a page without a
    /// filter or sort, or the rows the index finds for a filter that compares a few values
    /// ([`compares_little`]).
    pub fn is_small(&self, rt: ResourceType, query: &Query, limit: usize) -> bool {
        if self.is_shared() {
            return false;
        }
        match &query.filter {
            None => query.sort_by.is_none() && query.count.is_some_and(|count| count <= limit),
            Some(filter) => {
                compares_little(filter)
                    && candidates(&self.index(), rt, filter).is_some_and(|rows| rows.len() <= limit)
            }
        }
    }

    /// The sequence number of the last committed change.
    pub fn seq(&self) -> Seq {
        self.index().seq()
    }

    /// The sequence number of the last batch made visible to reads. Cheaper than
    /// [`Directory::seq`]; a write is counted here before it is answered.
    pub fn visible_seq(&self) -> Seq {
        self.visible.seq.load(Ordering::Acquire)
    }

    /// The sequence number after the last batch of another replica applied here.
    pub fn foreign_seq(&self) -> Seq {
        self.visible.foreign.load(Ordering::Acquire)
    }

    /// The sequence number of the last batch made visible that changed a resource or a
    /// membership, or after which the directory was read anew: what may change who is let in.
    /// Entries beside the directory (a session begun, a session used, a key) do not move it:
    /// every sign-in would have every open connection judged again.
    pub fn standing_seq(&self) -> Seq {
        self.visible.standing.load(Ordering::Acquire)
    }

    /// Wakes on every committed batch that moves [`Directory::standing_seq`], once it is
    /// visible to reads (and before the writes in it are answered); the value is
    /// [`Directory::seq`] after the batch.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Seq> {
        self.visible.watch.subscribe()
    }

    pub fn counts(&self) -> (usize, usize) {
        let index = self.index();
        (index.user_count(), index.group_count())
    }

    /// Runs `f` on what `key` finds, from memory, under one consistent view of the
    /// directory: a write answered before this call is visible, one answered after is not.
    pub fn with_subject<R>(&self, key: SubjectKey<'_>, f: impl FnOnce(Lookup<'_>) -> R) -> R {
        let index = self.index();
        let found = |row: Row| match index.user(row) {
            Some(user) => Lookup::Found(SubjectView {
                user,
                groups: index
                    .groups_of(row)
                    .into_iter()
                    .filter_map(|(group, _)| index.group(group))
                    .collect(),
                stamp: Stamp {
                    generation: index.generation(),
                    seq: index.standing(),
                    row,
                },
            }),
            None => Lookup::Unknown,
        };
        // Retired identifiers are consulted only on a miss: a live user is who a name names.
        let missed = |kind: Retired, value: &str| match index.was_deleted(kind, value) {
            true => Lookup::Deleted,
            false => Lookup::Unknown,
        };
        let lookup = match key {
            // userName is unique: at most one row, and no list to build on the request path.
            SubjectKey::UserName(name) => match index.user_by_name(name) {
                Some(row) => found(row),
                None => missed(Retired::UserName, name),
            },
            SubjectKey::Email(email) => match index.users_by_email(email).as_slice() {
                [row] => found(*row),
                [] => missed(Retired::Email, email),
                more => Lookup::Ambiguous(more.len()),
            },
            SubjectKey::ExternalId(id) => match index.users_by_external_id(id).as_slice() {
                [row] => found(*row),
                [] => missed(Retired::ExternalId, id),
                more => Lookup::Ambiguous(more.len()),
            },
        };
        f(lookup)
    }

    /// Runs `f` on the agent `key` finds, its owner chain judged at Unix time `now`, under one
    /// consistent view of the directory (as [`Directory::with_subject`]).
    pub fn with_agent<R>(
        &self,
        key: AgentKey<'_>,
        now: i64,
        f: impl FnOnce(AgentLookup<'_>) -> R,
    ) -> R {
        let index = self.index();
        let found = |row: Row| {
            let Some(agent) = index.agent(row) else {
                return AgentLookup::Unknown;
            };
            let group = |row: Row| index.group(row);
            let mut owners = Vec::with_capacity(agent.owners().len());
            let mut owner_groups: Vec<&GroupEntry> = Vec::new();
            // Since when it has stood: its own stamp, and every application's (an inactive
            // one refuses it anyway).
            let mut valid_since_unix = agent.valid_since_unix;
            for &id in agent.applications() {
                let application = index
                    .row_of_id(id)
                    .and_then(|(_, row)| index.application(row));
                if let Some(application) = application.filter(|a| a.active) {
                    valid_since_unix = valid_since_unix.max(application.valid_since_unix);
                }
            }
            for (rt, row) in index.active_owners(agent) {
                if rt == ResourceType::User {
                    owners.extend(index.user(row).map(Owner::User));
                } else if let Some(owning) = group(row) {
                    owners.push(Owner::Group(owning));
                    owner_groups.push(owning);
                }
                let groups = index.groups_of(row).into_iter();
                owner_groups.extend(groups.filter_map(|(g, _)| group(g)));
            }
            if owner_groups.len() > 1 {
                owner_groups.sort_unstable_by_key(|g| std::ptr::from_ref(*g));
                owner_groups.dedup_by(|a, b| std::ptr::eq(*a, *b));
            }
            let standing =
                index
                    .agent_standing_but_owners(agent, now)
                    .and(match owners.is_empty() {
                        true => Err(AgentRefusal::NoActiveOwner),
                        false => Ok(()),
                    });
            AgentLookup::Found(AgentView {
                agent,
                groups: index
                    .groups_of(row)
                    .into_iter()
                    .filter_map(|(g, _)| group(g))
                    .collect(),
                standing,
                owners,
                owner_groups,
                valid_since_unix,
            })
        };
        let missed = |kind: Retired, value: &str| match index.was_deleted(kind, value) {
            true => AgentLookup::Deleted,
            false => AgentLookup::Unknown,
        };
        let lookup = match key {
            AgentKey::Name(name) => match index.agent_by_name(name) {
                Some(row) => found(row),
                None => missed(Retired::AgentName, name),
            },
            AgentKey::ExternalId(id) => match index.agents_by_external_id(id).as_slice() {
                [row] => found(*row),
                [] => missed(Retired::AgentExternalId, id),
                more => AgentLookup::Ambiguous(more.len()),
            },
        };
        f(lookup)
    }

    /// The user whose `userName` is `user_name` (case-insensitively).
    pub fn user_by_name(&self, user_name: &str) -> Option<UserStatus> {
        let index = self.index();
        let row = index.user_by_name(user_name)?;
        let entry = index.user(row)?;
        Some(UserStatus {
            row,
            id: entry.id,
            active: entry.active,
        })
    }

    /// Reads the index under one consistent view, for pages that show the directory (the
    /// console). Writes wait while `f` runs (and requests wait for a waiting write): keep it
    /// short; walk many rows with [`Directory::scan`].
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.index())
    }

    /// Calls `f` with every row of type `rt`, in order, a few thousand rows at a time, each
    /// batch under one consistent view: a write waits for one batch at most, never for the
    /// whole walk. A write between batches may or may not be seen by the walk.
    pub fn scan(&self, rt: ResourceType, f: impl FnMut(&Index, Row)) {
        self.scan_rows(rt, 0..Row::MAX, f);
    }

    /// [`Directory::scan`] over the rows in `rows` only (so that parts of one walk can run on
    /// several threads).
    pub fn scan_rows(
        &self,
        rt: ResourceType,
        rows: std::ops::Range<Row>,
        mut f: impl FnMut(&Index, Row),
    ) {
        const BATCH: Row = 4_096;
        let mut start = rows.start;
        loop {
            let index = self.index();
            let end = start.saturating_add(BATCH).min(rows.end);
            for row in index.rows_between(rt, start, end) {
                f(&index, row);
            }
            if end >= rows.end || end >= index.row_end() {
                return;
            }
            start = end;
        }
    }

    /// One past the highest row there has been: where a walk of every row ends.
    pub fn row_end(&self) -> Row {
        self.index().row_end()
    }

    /// The type of the resource whose id is `id`, if there is one.
    pub fn kind_of(&self, id: &str) -> Option<ResourceType> {
        self.index().row_of(id).map(|(rt, _)| rt)
    }

    pub fn get(&self, rt: ResourceType, id: &str) -> Result<Option<Record>, ScimError> {
        let Some((kind, row)) = self.index().row_of(id) else {
            return Ok(None);
        };
        if kind != rt {
            return Ok(None);
        }
        // A deleted user's remains are no record: with a shared store, another replica's
        // delete may be stored before this index has it.
        Ok(self
            .storage
            .records(rt, &[row])?
            .into_iter()
            .next()
            .map(|(_, r)| r)
            .filter(|r| !r.retired))
    }

    /// Whether the index holds the group `record` (read from storage) at its version: the
    /// members it shows are then that version's. Not for a moment after a write committed
    /// and not yet applied here (another replica's, with a shared store).
    pub fn shows_members_of(&self, record: &Record) -> bool {
        let Some(id) = record
            .resource
            .get("id")
            .and_then(serde_json::Value::as_str)
        else {
            return false;
        };
        let index = self.index();
        index
            .row_of(id)
            .and_then(|(_, row)| index.group(row))
            .is_some_and(|group| group.version == super::index::version_of(&record.resource))
    }

    /// The direct members of group `id`, in creation order of the members.
    pub fn members(&self, id: &str) -> Vec<Member> {
        self.members_as(id, None, member)
    }

    /// `f` of each direct member of group `id` (all of them, or, given `only`, those of these
    /// ids that are members), in creation order, read a few thousand at a time, each batch
    /// under one consistent view, as [`Directory::scan`] does: a write waits for one batch at
    /// most, never for a whole group of a hundred thousand members (and every request waits
    /// for a waiting write). A member gone meanwhile is in no table of the index (`f` finds
    /// nothing); after the directory is read anew (a failover), a row may be another
    /// resource's, and the reading starts again.
    fn members_as<T>(
        &self,
        id: &str,
        only: Option<&[&str]>,
        f: impl Fn(&Index, Row) -> Option<T>,
    ) -> Vec<T> {
        const BATCH: usize = 4_096;
        let rows = |index: &Index| -> Vec<Row> {
            let Some((ResourceType::Group, group)) = index.row_of(id) else {
                return Vec::new();
            };
            match only {
                Some(ids) => (ids.iter())
                    .filter_map(|id| index.row_of(id))
                    .map(|(_, member)| member)
                    .filter(|&member| index.is_member(group, member))
                    .collect(),
                None => index.members_of(group).collect(),
            }
        };
        for _ in 0..2 {
            let (mut rows, generation) = {
                let index = self.index();
                (rows(&index), index.generation())
            };
            rows.sort_unstable();
            rows.dedup();
            let mut found = Vec::with_capacity(rows.len());
            let whole = rows.chunks(BATCH).all(|batch| {
                let index = self.index();
                let same = index.generation() == generation;
                if same {
                    found.extend(batch.iter().filter_map(|&row| f(&index, row)));
                }
                same
            });
            if whole {
                return found;
            }
        }
        // Read anew twice meanwhile: once more, under one view.
        let index = self.index();
        let mut rows = rows(&index);
        rows.sort_unstable();
        rows.dedup();
        rows.into_iter().filter_map(|row| f(&index, row)).collect()
    }

    /// The groups `id` is in, directly or through nested groups.
    pub fn groups_of(&self, id: &str) -> Vec<MemberOf> {
        let index = self.index();
        let Some((_, row)) = index.row_of(id) else {
            return Vec::new();
        };
        index
            .groups_of(row)
            .into_iter()
            .filter_map(|(group, direct)| {
                index.group(group).map(|g| MemberOf {
                    id: format_id(g.id),
                    display: g.display_name.to_string(),
                    direct,
                })
            })
            .collect()
    }

    /// Committed changes after `after`, oldest first.
    pub fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, ScimError> {
        Ok(self.storage.changes(after, limit)?)
    }

    /// Lists resources matching `query`, in a stable order (creation order unless sorted).
    pub fn query(&self, rt: ResourceType, query: &Query) -> Result<Page, ScimError> {
        if let Some(filter) = &query.filter {
            check_filter(filter, rt)?;
        }
        let needs_members = rt == ResourceType::Group
            && query
                .filter
                .as_ref()
                .is_some_and(|f| references_attribute(f, "members"));
        // A user's (or agent's) `groups` is not stored either: read from the index, as shown.
        let needs_groups = matches!(rt, ResourceType::User | ResourceType::Agent)
            && query
                .filter
                .as_ref()
                .is_some_and(|f| references_attribute(f, "groups"));
        let deciding = query
            .filter
            .as_ref()
            .filter(|_| needs_members)
            .and_then(deciding_members);
        let start = query.start_index.max(1) - 1;
        let count = query.count.unwrap_or(usize::MAX);

        // Without a filter or sort, only the page itself is read: its rows from the index (not
        // a list of every row, which made each page of an import cost the whole directory),
        // then its records from storage.
        if query.filter.is_none() && query.sort_by.is_none() {
            let (total, page) = {
                let index = self.index();
                let page: Vec<Row> = index.rows(rt).skip(start).take(count).collect();
                (index.count(rt), page)
            };
            let records = self.storage.records(rt, &page)?;
            return Ok(Page {
                total,
                records: records
                    .into_iter()
                    .map(|(_, r)| r)
                    .filter(|r| !r.retired)
                    .collect(),
            });
        }

        let rows: Vec<Row> = {
            let index = self.index();
            match query
                .filter
                .as_ref()
                .and_then(|f| candidates(&index, rt, f))
            {
                Some(mut rows) => {
                    rows.sort_unstable();
                    rows.dedup();
                    rows
                }
                None => index.rows(rt).collect(),
            }
        };

        // Unsorted, only the page's matches are kept; sorted, every match's sort key and row
        // (not its record: a sort of a million users would hold them all), and the page's
        // records are read again once sorted.
        let in_page = |n: usize| n >= start && n - start < count;
        let mut total = 0;
        let mut matched: Vec<Record> = Vec::new();
        let mut keyed: Vec<(Option<String>, Row)> = Vec::new();
        let passes = |row: Row, record: &Record| -> Result<bool, ScimError> {
            Ok(match &query.filter {
                None => true,
                Some(filter) if needs_members => {
                    let mut resource = record.resource.clone();
                    let id = record.resource.get("id").and_then(Value::as_str);
                    self.attach_member_values(
                        id.unwrap_or_default(),
                        deciding.as_deref(),
                        &mut resource,
                    );
                    matches_checked(filter, &resource, rt)?
                }
                Some(filter) if needs_groups => {
                    let mut resource = record.resource.clone();
                    self.attach_group_values(row, &mut resource);
                    matches_checked(filter, &resource, rt)?
                }
                Some(filter) => matches_checked(filter, &record.resource, rt)?,
            })
        };
        for chunk in rows.chunks(1024) {
            for (row, record) in self.storage.records(rt, chunk)? {
                if record.retired {
                    continue; // deleted by another replica, not yet in this index
                }
                if passes(row, &record)? {
                    match &query.sort_by {
                        Some(by) => keyed.push((sort_key(&record, by), row)),
                        None if in_page(total) => matched.push(record),
                        None => {}
                    }
                    total += 1;
                }
            }
        }
        if query.sort_by.is_none() {
            return Ok(Page {
                total,
                records: matched,
            });
        }
        sort_keyed(&mut keyed, query.sort_order);
        let rows: Vec<Row> = keyed
            .into_iter()
            .skip(start)
            .take(count)
            .map(|(_, row)| row)
            .collect();
        let mut read: std::collections::HashMap<Row, Record> =
            self.storage.records(rt, &rows)?.into_iter().collect();
        // One deleted since it was matched, or changed so that it no longer matches, is left
        // out (as a listing a moment later would leave it out).
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            match read.remove(row) {
                Some(record) if !record.retired && passes(*row, &record)? => records.push(record),
                _ => {}
            }
        }
        Ok(Page { total, records })
    }

    /// Puts group `id`'s members into `resource`, as a filter sees them: all of them, or, when
    /// the filter's member comparisons are decided by the ids in `deciding` alone, those of
    /// them that are members (looked up one by one, whatever the size of the group).
    fn attach_member_values(&self, id: &str, deciding: Option<&[&str]>, resource: &mut Value) {
        let members = self.members_as(id, deciding, |index, m| {
            let member = member(index, m)?;
            let mut value = json!({ "value": member.id, "type": member.rt.name() });
            if let (Some(display), Some(obj)) = (member.display, value.as_object_mut()) {
                obj.insert("display".to_owned(), Value::String(display));
            }
            Some(value)
        });
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("members".to_owned(), Value::Array(members));
        }
    }

    /// Puts the groups member `row` is in into `resource`, as it is shown ([`Self::groups_of`]):
    /// `value`, `display` and `type` (`direct` or `indirect`).
    fn attach_group_values(&self, row: Row, resource: &mut Value) {
        let index = self.index();
        let groups: Vec<Value> = index
            .groups_of(row)
            .into_iter()
            .filter_map(|(group, direct)| {
                index.group(group).map(|g| {
                    json!({
                        "value": format_id(g.id),
                        "display": &*g.display_name,
                        "type": if direct { "direct" } else { "indirect" },
                    })
                })
            })
            .collect();
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("groups".to_owned(), Value::Array(groups));
        }
    }
}

/// The member ids that alone decide `filter`'s comparisons of a group's `members`, when it
/// makes them only as `members eq "id"`, `members.value eq "id"` or `members[value eq "id"]`
/// (those joined by `and` and `or` inside the brackets): each such comparison holds exactly
/// when its id is a member, so the group's other members cannot change the outcome, however
/// many it has. That is how Microsoft Entra ID checks one membership (`id eq "G" and members
/// eq "U"`). `None` for any other comparison of `members` (`pr`, `ne`, `not` inside the
/// brackets, another sub-attribute), which needs every member.
pub(super) fn deciding_members(filter: &Filter) -> Option<Vec<&str>> {
    fn element<'f>(filter: &'f Filter, ids: &mut Vec<&'f str>) -> bool {
        match filter {
            Filter::And(l, r) | Filter::Or(l, r) => element(l, ids) && element(r, ids),
            Filter::Attr(expr) => match eq_string(expr) {
                Some((path, id)) if path.sub_attr.is_none() && path.name_is("value") => {
                    ids.push(id);
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }
    fn walk<'f>(filter: &'f Filter, ids: &mut Vec<&'f str>) -> bool {
        match filter {
            Filter::And(l, r) | Filter::Or(l, r) => walk(l, ids) && walk(r, ids),
            Filter::Not(inner) => walk(inner, ids),
            Filter::Attr(expr) if expr.path.name_is("members") => match eq_string(expr) {
                Some((path, id))
                    if path
                        .sub_attr
                        .as_deref()
                        .is_none_or(|s| s.eq_ignore_ascii_case("value")) =>
                {
                    ids.push(id);
                    true
                }
                _ => false,
            },
            Filter::ValuePath { attr, filter, sub } if attr.name_is("members") => {
                sub.is_none() && element(filter, ids)
            }
            Filter::Attr(_) | Filter::ValuePath { .. } => true,
        }
    }
    let mut ids = Vec::new();
    walk(filter, &mut ids).then_some(ids)
}

/// Candidate rows for `filter` from the index: a superset of the matches, or `None` when the
/// index cannot narrow the search (every row is then a candidate).
fn candidates(index: &Index, rt: ResourceType, filter: &Filter) -> Option<Vec<Row>> {
    match filter {
        Filter::And(l, r) => {
            let (l, r) = (candidates(index, rt, l), candidates(index, rt, r));
            match (l, r) {
                (Some(l), Some(r)) => Some(if l.len() <= r.len() { l } else { r }),
                (l, r) => l.or(r),
            }
        }
        Filter::Or(l, r) => {
            let mut l = candidates(index, rt, l)?;
            l.extend(candidates(index, rt, r)?);
            Some(l)
        }
        Filter::Attr(expr) => eq_string(expr).and_then(|(path, value)| {
            lookup(index, rt, &path.name, path.sub_attr.as_deref(), value)
        }),
        Filter::ValuePath { attr, filter, sub } => {
            // emails[type eq "work"].value eq "x"
            if let Some((path, value)) = sub.as_ref().and_then(eq_string) {
                if path.sub_attr.is_none() {
                    return lookup(index, rt, &attr.name, Some(&path.name), value);
                }
            }
            // emails[value eq "x" and …], members[value eq "x"]
            element_candidates(index, rt, &attr.name, filter)
        }
        Filter::Not(_) => None,
    }
}

/// At most this many comparisons in a filter read where it is asked ([`Directory::is_small`]):
/// an IdP's lookup makes one or two.
const SMALL_FILTER_TERMS: usize = 4;

/// Whether `filter` costs a record a few comparisons of one value each: at most
/// [`SMALL_FILTER_TERMS`], each of a single-valued attribute. (A filter may hold hundreds of
/// terms, and a record a thousand values of a multi-valued attribute, or of its `groups`.)
fn compares_little(filter: &Filter) -> bool {
    const SINGLE_VALUED: [&str; 5] = ["id", "externalId", "userName", "displayName", "name"];
    fn within(filter: &Filter, terms: &mut usize) -> bool {
        match filter {
            Filter::And(l, r) | Filter::Or(l, r) => within(l, terms) && within(r, terms),
            Filter::Attr(expr) => {
                *terms += 1;
                let name = &expr.path.name;
                *terms <= SMALL_FILTER_TERMS
                    && expr.path.sub_attr.is_none()
                    && SINGLE_VALUED.iter().any(|a| name.eq_ignore_ascii_case(a))
            }
            Filter::ValuePath { .. } | Filter::Not(_) => false,
        }
    }
    within(filter, &mut 0)
}

fn element_candidates(
    index: &Index,
    rt: ResourceType,
    attr: &str,
    filter: &Filter,
) -> Option<Vec<Row>> {
    match filter {
        Filter::And(l, r) => element_candidates(index, rt, attr, l)
            .or_else(|| element_candidates(index, rt, attr, r)),
        Filter::Or(l, r) => {
            let mut l = element_candidates(index, rt, attr, l)?;
            l.extend(element_candidates(index, rt, attr, r)?);
            Some(l)
        }
        Filter::Attr(expr) => eq_string(expr).and_then(|(path, value)| {
            (path.sub_attr.is_none())
                .then(|| lookup(index, rt, attr, Some(&path.name), value))
                .flatten()
        }),
        _ => None,
    }
}

fn eq_string(expr: &AttrExpr) -> Option<(&AttrPath, &str)> {
    match &expr.op {
        AttrOp::Compare(CompareOp::Eq, CompValue::String(value)) => Some((&expr.path, value)),
        _ => None,
    }
}

/// Rows whose attribute `name`(`.sub`) equals `value`, from the index, when one covers it.
fn lookup(
    index: &Index,
    rt: ResourceType,
    name: &str,
    sub: Option<&str>,
    value: &str,
) -> Option<Vec<Row>> {
    let is = |a: &str| name.eq_ignore_ascii_case(a);
    let sub_is = |s: &str| sub.is_some_and(|x| x.eq_ignore_ascii_case(s));
    match rt {
        ResourceType::User if is("userName") && sub.is_none() => {
            Some(index.user_by_name(value).into_iter().collect())
        }
        ResourceType::User if is("externalId") && sub.is_none() => {
            Some(index.users_by_external_id(value))
        }
        ResourceType::User if is("emails") && (sub.is_none() || sub_is("value")) => {
            Some(index.users_by_email(value))
        }
        ResourceType::Group if is("displayName") && sub.is_none() => Some(
            index
                .group_by_folded_name(&fold(value))
                .into_iter()
                .collect(),
        ),
        ResourceType::Group if is("externalId") && sub.is_none() => {
            Some(index.groups_by_external_id(value))
        }
        ResourceType::Group if is("members") && (sub.is_none() || sub_is("value")) => {
            let member = index.row_of(value).map(|(_, row)| row);
            Some(
                member
                    .map(|m| index.parents_of(m).collect())
                    .unwrap_or_default(),
            )
        }
        ResourceType::Agent if is("name") && sub.is_none() => {
            Some(index.agent_by_name(value).into_iter().collect())
        }
        ResourceType::Agent if is("externalId") && sub.is_none() => {
            Some(index.agents_by_external_id(value))
        }
        ResourceType::AgenticApplication if is("name") && sub.is_none() => Some(
            index
                .application_by_folded_name(&fold(value))
                .into_iter()
                .collect(),
        ),
        _ if is("id") && sub.is_none() => Some(
            index
                .row_of(value)
                .filter(|(kind, _)| *kind == rt)
                .map(|(_, row)| row)
                .into_iter()
                .collect(),
        ),
        _ => None,
    }
}

/// What `record` sorts by for `sortBy` = `by`: the value folded (strings), `None` without one.
fn sort_key(record: &Record, by: &AttrPath) -> Option<String> {
    let resource = record.resource.as_object()?;
    // An extension's attribute is in the extension's object; a core one, however written
    // (`userName`, `urn:…:core:2.0:User:userName`), at the top.
    let within = match by.schema.as_deref() {
        Some(schema) if !is_core_schema(schema) => get_ci(resource, schema)?.as_object()?,
        _ => resource,
    };
    let mut top = get_ci(within, &by.name)?;
    // A multi-valued attribute sorts by its primary value, else its first (RFC 7644
    // §3.4.2.3); a complex one's by `value` unless a sub-attribute is named.
    if let Some(values) = top.as_array() {
        let primary = values
            .iter()
            .find(|v| v.as_object().and_then(|v| get_ci(v, "primary")) == Some(&json!(true)));
        top = primary.or(values.first())?;
        if by.sub_attr.is_none() && top.is_object() {
            top = get_ci(top.as_object()?, "value")?;
        }
    }
    let leaf = match &by.sub_attr {
        Some(sub) => get_ci(top.as_object()?, sub)?,
        None => top,
    };
    Some(match leaf {
        Value::String(s) => portcullis_policy::fold(s).into_owned(),
        other => other.to_string(),
    })
}

/// Sorts matches by their [`sort_key`]s. Stable: equal keys keep creation order (the rows'
/// order as matched). Missing values are "ordered last if ascending and first if descending"
/// (RFC 7644 §3.4.2.3).
fn sort_keyed(keyed: &mut [(Option<String>, Row)], order: SortOrder) {
    match order {
        SortOrder::Ascending => {
            keyed.sort_by(|(a, _), (b, _)| (a.is_none(), a).cmp(&(b.is_none(), b)))
        }
        SortOrder::Descending => {
            keyed.sort_by(|(a, _), (b, _)| (b.is_none(), b).cmp(&(a.is_none(), a)))
        }
    }
}

/// Whether `urn` is one of SCIM's core schemas (`urn:ietf:params:scim:schemas:core:2.0:User`),
/// whose attributes are at the top of a resource.
fn is_core_schema(urn: &str) -> bool {
    const CORE: &str = "urn:ietf:params:scim:schemas:core:";
    urn.get(..CORE.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(CORE))
}

/// Reads the whole of `storage` into a new index, and the entries kept beside it.
fn load_index(storage: &dyn Storage) -> Result<(Index, Vec<Entry>), StoreError> {
    let mut index = Index::default();
    let mut members = Vec::new();
    let mut entries = Vec::new();
    let mut bad = 0usize;
    let (seq, next_row) = storage.load(&mut |loaded| match loaded {
        Loaded::Resource(rt, row, json) => {
            if !index.insert_stored(rt, row, json) {
                bad += 1;
            }
        }
        Loaded::Member { group, member } => members.push((group, member)),
        Loaded::Entry(entry) => entries.push(entry),
    })?;
    if bad > 0 {
        return Err(StoreError::Corrupt(format!(
            "{bad} stored resources lack an id or name"
        )));
    }
    for (group, member) in members {
        index.insert_member(group, member);
    }
    index.seq = seq;
    index.standing = seq;
    index.next_row = next_row;
    Ok((index, entries))
}

/// Most times a batch is rebuilt because another replica committed first.
const MAX_ATTEMPTS: usize = 16;
/// How often the writer, with nothing to write, has the store recover from a failure that
/// closed it ([`Storage::recover`]).
const RECOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The writer thread: the only one that changes the index.
struct Writer<'a> {
    storage: &'a dyn Storage,
    index: &'a RwLock<Index>,
    clock: &'a Clock,
    sinks: &'a Sinks,
    visible: &'a Visible,
}

/// Writes committed and visible here, answered once the store has settled them.
struct Settled {
    seq: Seq,
    committed: std::time::Instant,
    answers: Vec<(Write, Result<Written, ScimError>)>,
}

impl Writer<'_> {
    fn run(&self, jobs: &mpsc::Receiver<Job>) {
        // A shared store answers writes only once the other replicas have them (or cannot
        // admit anyone), which may take a while; a thread of its own waits for that, in
        // commit order, so the writer goes on committing meanwhile.
        let (settle, settled) = mpsc::channel::<Settled>();
        let settler = self.storage.is_shared().then(|| {
            let storage = self.storage;
            move || settle_loop(storage, &settled)
        });
        thread::scope(|scope| {
            if let Some(settler) = settler {
                scope.spawn(settler);
            }
            loop {
                let first = match jobs.recv_timeout(RECOVER_EVERY) {
                    Ok(first) => first,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.storage.recover();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                self.storage.recover();
                let mut writes = Vec::new();
                // Those asking to catch up at once are answered by one reading of the store:
                // the lease's renewal never waits behind a queue of them.
                let mut catching_up = Vec::new();
                let mut next = Some(first);
                while let Some(job) = next.take() {
                    match job {
                        Job::Write(write) => writes.push(write),
                        Job::CatchUp(reply) => catching_up.push(reply),
                    }
                    if writes.len() < MAX_BATCH {
                        next = jobs.try_recv().ok();
                    }
                }
                if !catching_up.is_empty() {
                    let caught_up = self.catch_up();
                    for reply in catching_up {
                        let _ = reply.send(caught_up.clone());
                    }
                }
                if !writes.is_empty() {
                    self.write(writes, &settle);
                }
            }
            drop(settle);
        });
    }

    fn write(&self, writes: Vec<Write>, settle: &mpsc::Sender<Settled>) {
        for _ in 0..MAX_ATTEMPTS {
            let now = (self.clock)();
            let (results, batch, generation) = {
                let Ok(guard) = self.index.read() else {
                    return fail_all(writes, "the directory index is unusable");
                };
                let generation = guard.generation();
                let mut overlay = Overlay::new(&guard, self.storage, now);
                let results: Vec<Result<Written, ScimError>> = writes
                    .iter()
                    .map(|write| {
                        overlay.execute(&write.command, &write.actor, write.client.as_deref())
                    })
                    .collect();
                (results, overlay.into_batch(), generation)
            };
            let mut seq = batch.seq;
            if batch.is_empty() && self.storage.is_shared() {
                // Nothing to commit, but this index may lag what another replica committed.
                // If catching up brought anything, or read the directory anew (the database
                // lost batches it held: the same number, another history), the writes are
                // built again on it (a member that replica just added is removed here, not
                // found absent); if not, the answers hold (a repeated deactivation finds the
                // user inactive in the store) and are settled at the sequence reached, as the
                // other replica's are.
                match self.catch_up() {
                    Ok((caught_up, _))
                        if caught_up != batch.base
                            || self.index.read().map(|i| i.generation()).ok()
                                != Some(generation) =>
                    {
                        continue
                    }
                    Ok((caught_up, _)) => {
                        // Answered on the batch applied now: settled as that batch.
                        self.storage.answering_at(caught_up);
                        seq = caught_up;
                    }
                    Err(e) => {
                        tracing::error!("directory catch-up failed: {e}");
                        return fail_all(writes, "the directory is not reachable; retry");
                    }
                }
            } else if !batch.is_empty() {
                match self.storage.commit(&batch) {
                    Ok(()) => {}
                    Err(StoreError::Behind) => {
                        // Built on an old directory: bring it up to date and build again.
                        if let Err(e) = self.catch_up() {
                            tracing::error!("directory catch-up failed: {e}");
                            return fail_all(writes, "the directory is not reachable; retry");
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(
                            "directory commit failed, {} writes refused: {e}",
                            writes.len()
                        );
                        return fail_all(writes, "the directory could not save the change; retry");
                    }
                }
                match self.apply(&batch, true) {
                    Some(now) => seq = now,
                    None => return fail_all(writes, "the directory index is unusable"),
                }
            }
            let answers = writes.into_iter().zip(results).collect();
            if self.storage.is_shared() {
                let settled = Settled {
                    seq,
                    committed: std::time::Instant::now(),
                    answers,
                };
                if let Err(mpsc::SendError(settled)) = settle.send(settled) {
                    // Nobody can wait for the other replicas: the writes are committed, but
                    // not answered as done before the others may still admit what they undo.
                    unconfirmed(
                        settled.answers,
                        "the write is stored, but other replicas could not be waited for; retry",
                    );
                }
            } else {
                answer(answers);
            }
            return;
        }
        fail_all(
            writes,
            "the directory is too busy with other replicas' writes; retry",
        );
    }

    /// Makes a committed batch visible (`own`: committed here, not read from the feed);
    /// returns the sequence number after it.
    fn apply(&self, batch: &Batch, own: bool) -> Option<Seq> {
        let seq = {
            let mut guard = self.index.write().ok()?;
            guard.apply(batch);
            guard.seq()
        };
        if let Some(sink) = self
            .sinks
            .entries
            .as_ref()
            .filter(|_| !batch.entries.is_empty())
        {
            sink.apply(&batch.entries);
        }
        let standing = !batch.records.is_empty() || !batch.members.is_empty();
        self.visible.set(seq, standing);
        let changed = own && !batch.changes.is_empty();
        if let Some(sink) = self.sinks.changes.as_ref().filter(|_| changed) {
            sink(&batch.changes);
        }
        Some(seq)
    }

    fn catch_up(&self) -> Result<(Seq, Seq), StoreError> {
        loop {
            let after = self.index.read().map_err(|_| unusable())?.seq();
            match self.storage.feed(after)? {
                Feed::Batches(batches) if batches.is_empty() => {
                    return Ok((after, self.visible.foreign.load(Ordering::Acquire)))
                }
                Feed::Batches(batches) => {
                    for batch in &batches {
                        let seq = self.apply(batch, false).ok_or_else(unusable)?;
                        self.visible.foreign.store(seq, Ordering::Release);
                    }
                }
                Feed::Gap => {
                    let started = std::time::Instant::now();
                    let (index, entries) = load_index(self.storage)?;
                    let (seq, users, groups) = (index.seq, index.user_count(), index.group_count());
                    // The old index (a million users' names and memberships) is freed after
                    // the lock is let go: every request's lookup waits on it meanwhile.
                    let old =
                        std::mem::replace(&mut *self.index.write().map_err(|_| unusable())?, index);
                    drop(old);
                    if let Some(sink) = &self.sinks.entries {
                        sink.load(entries);
                    }
                    self.visible.set(seq, true);
                    self.visible.foreign.store(seq, Ordering::Release);
                    tracing::info!(
                        users,
                        groups,
                        seq,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "directory loaded"
                    );
                }
            }
        }
    }
}

fn unusable() -> StoreError {
    StoreError::Backend("the directory index is unusable".to_owned())
}

fn settle_loop(storage: &dyn Storage, settled: &mpsc::Receiver<Settled>) {
    while let Ok(Settled {
        seq,
        committed,
        answers,
    }) = settled.recv()
    {
        match storage.settle(seq, committed) {
            Ok(()) => answer(answers),
            Err(e @ StoreError::Lost(_)) => {
                // Gone in a failover: every answer, a refusal too (a name taken by the lost
                // change), was judged against a directory that never was.
                tracing::error!("directory change {seq} lost: {e}");
                let writes = answers.into_iter().map(|(write, _)| write).collect();
                fail_all(writes, "the change was not kept by the database; retry");
            }
            Err(e @ StoreError::Unsettled(_)) => {
                // Not known to be saved: no success to report, nor a refusal judged against
                // it (as when lost).
                tracing::error!("directory change {seq} may not be kept: {e}");
                let writes = answers.into_iter().map(|(write, _)| write).collect();
                fail_all(
                    writes,
                    "the change may not have been saved: the database could not be read after \
                     it was committed; retry",
                );
            }
            Err(e) => {
                // Committed, but not known to be everywhere: not a success to report. SCIM
                // clients retry, and a retried write finds the change already made.
                tracing::error!("directory change {seq} not confirmed by every replica: {e}");
                unconfirmed(
                    answers,
                    "the change is saved but not yet confirmed by every replica; retry",
                );
            }
        }
    }
}

/// Answers writes committed but not known to be everywhere: a success with 503 `why`; a write
/// refused (409 for a name taken, 412 for a stale version) with its own answer, as it changed
/// nothing.
fn unconfirmed(answers: Vec<(Write, Result<Written, ScimError>)>, why: &str) {
    for (write, result) in answers {
        let answer = result.and_then(|_| Err(ScimError::saved_unconfirmed(why)));
        let _ = write.reply.send(answer);
    }
}

fn answer(answers: Vec<(Write, Result<Written, ScimError>)>) {
    for (write, result) in answers {
        // The requester may have gone away; the write stands either way.
        let _ = write.reply.send(result);
    }
}

fn fail_all(writes: Vec<Write>, why: &str) {
    for write in writes {
        let _ = write.reply.send(Err(ScimError::new(503, None, why)));
    }
}
