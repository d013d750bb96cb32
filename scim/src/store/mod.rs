//! The directory store: durable Users, Groups, Agents, AgenticApplications and memberships,
//! and the in-memory index that answers the hot questions without touching disk.
//!
//! - [`Directory`] is what handlers and the proxy use. Writes are [`Command`]s: a single writer
//!   thread evaluates them in order against the current state, commits a whole batch of them in
//!   one durable transaction (group commit), then makes the batch visible in the index at once
//!   and only then answers. So a write answered 2xx is on disk, and every read that starts after
//!   the answer sees it.
//! - [`Storage`] is the one trait a backend implements; it persists batches stamped with a
//!   monotonically increasing change sequence and loads them back at start. Two backends:
//!   redb on the local disk ([`redb::RedbStorage`]), and PostgreSQL shared by several replicas
//!   ([`postgres::PgStorage`]), whose changes every replica follows into its own index.
//! - [`Index`] holds every User, Group, Agent and AgenticApplication in compact form,
//!   memberships in both directions, and the unique names. It also judges an agent's owner
//!   chain ([`Index::agent_standing`]). Group member lists live only as rows, never inside the Group's
//!   stored resource, so adding one member to a 100,000-member group writes one row.

mod directory;
mod index;
pub mod memory;
pub mod postgres;
pub mod redb;
mod writer;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ScimError;
use crate::patch::PatchOp;
use crate::schema::ResourceType;

pub use directory::{
    AgentKey, AgentLookup, AgentView, ChangeSink, Directory, EntrySink, Lookup, Member, MemberOf,
    Owner, Page, Query, Sinks, SortOrder, Stamp, SubjectKey, SubjectView, UserStatus,
};
pub use index::{
    etag_matches, format_id, parse_id, AgentEntry, AgentRefusal, ApplicationEntry, GroupEntry, Id,
    Index, UserEntry,
};

/// Internal, stable row number of a resource: creation order, never reused.
pub type Row = u64;
/// The change sequence: one more for every change that was committed.
pub type Seq = u64;

/// Largest number of commands committed in one transaction.
pub const MAX_BATCH: usize = 256;

/// A resource as stored: its SCIM representation (a Group's without `members`) and what never
/// leaves the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub resource: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// For a User: the change sequence from which sign-ins count. Set at creation, whenever
    /// the user is deactivated or re-activated, and when it gains a `userName`, email or
    /// `externalId` it did not have, or is left alone with one that another user gave up, so a
    /// session that began before it is over for good: one from before a deactivation stays
    /// over after a re-activation, one begun while inactive does not come to life with it,
    /// and one signed in by a value another user had (a deleted one's), or shared, does not
    /// pass to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_since: Option<Seq>,
    /// When `valid_since` last moved, in Unix seconds by the writer's clock: a bearer token
    /// issued (`iat`) before it was issued to someone else, or before a deactivation. For an
    /// Agent too: set at creation, (de)activation and a new `name` or `externalId`; and for an
    /// AgenticApplication at (de)activation, which its agents' tokens are judged by. `None` in
    /// records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_since_unix: Option<u64>,
    /// A deleted User, kept as its identifiers only (`userName`, `emails`, `externalId`), so
    /// that a token naming them is known to name someone the IdP removed ([`Lookup::Deleted`]).
    /// Never served, never found by id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
    /// What a later build keeps in a record and this one does not know: carried through a
    /// rewrite, so that replicas of two builds side by side (a rolling upgrade) never erase
    /// what the newer one relies on. Carried as it was: a field added later that must move
    /// with `valid_since` (at a re-activation, say) is to be trusted only as far as it agrees
    /// with it, since an earlier build moves `valid_since` alone.
    #[serde(flatten)]
    pub later: serde_json::Map<String, Value>,
}

/// A write, evaluated by the writer against the state left by the writes before it.
#[derive(Debug, Clone)]
pub enum Command {
    /// `resource` has been validated; `id` and `meta` are assigned here.
    Create {
        rt: ResourceType,
        resource: Value,
        password_hash: Option<String>,
    },
    Replace {
        rt: ResourceType,
        id: String,
        resource: Value,
        password_hash: Option<String>,
        if_match: Option<String>,
    },
    Patch {
        rt: ResourceType,
        id: String,
        ops: Vec<PatchOp>,
        password_hash: Option<String>,
        if_match: Option<String>,
    },
    Delete {
        rt: ResourceType,
        id: String,
        if_match: Option<String>,
    },
    /// Keeps (or, with no value, forgets) entries beside the directory; never refused.
    Put(Vec<Entry>),
}

impl Command {
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Replace { .. } => "replace",
            Self::Patch { .. } => "patch",
            Self::Delete { .. } => "delete",
            Self::Put(_) => "put",
        }
    }
}

/// The result of a committed write.
#[derive(Debug, Clone)]
pub struct Written {
    /// The change sequence of this write; unchanged (the current one) when it changed nothing.
    pub seq: Seq,
    pub id: String,
    /// The resource after the write; `None` after a delete.
    pub record: Option<Record>,
}

/// One committed change, as kept for audit and for replicas following the sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub seq: Seq,
    /// RFC 3339 time of the commit.
    pub time: String,
    /// Name of the SCIM token that made the change.
    pub actor: String,
    /// The address its request came from (none for the proxy's own writes, and in changes
    /// from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub op: String,
    pub resource_type: String,
    pub id: String,
    /// What changed, in a few words a person can read (no secrets).
    pub summary: String,
}

/// A value kept beside the directory for the proxy (its sessions, its sign-in keys), committed
/// and fed to every replica exactly as Users and Groups are, so that all of them hold the same
/// entries in the same order (see [`EntrySink`]). Opaque here: `kind` names the table.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: String,
    pub key: String,
    /// `None` forgets the entry. May be secret (a key, a refresh token): never in `Debug`.
    pub value: Option<String>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("key", &self.key)
            .field(
                "value",
                &self.value.as_ref().map(|v| format!("<{} bytes>", v.len())),
            )
            .finish()
    }
}

/// Everything one transaction writes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Batch {
    /// The sequence number this batch was built on: the store's, when it is committed.
    pub base: Seq,
    /// The sequence number after this batch.
    pub seq: Seq,
    pub next_row: Row,
    /// New state of each changed resource; `None` deletes it.
    pub records: Vec<(ResourceType, Row, Option<Record>)>,
    /// `(group, member, present)`.
    pub members: Vec<(Row, Row, bool)>,
    pub changes: Vec<Change>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.members.is_empty()
            && self.changes.is_empty()
            && self.entries.is_empty()
    }
}

/// What [`Storage::load`] hands back, in any order. A resource comes as the JSON of its
/// [`Record`], so loading can read just the indexed fields.
pub enum Loaded<'a> {
    Resource(ResourceType, Row, &'a [u8]),
    Member {
        group: Row,
        member: Row,
    },
    /// A kept entry (its value is always present).
    Entry(Entry),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the directory store failed: {0}")]
    Backend(String),
    #[error("the directory data is corrupt: {0}")]
    Corrupt(String),
    #[error("the directory data has schema version {found}; this build reads version {expected}")]
    Version { found: u64, expected: u64 },
    /// The database cannot keep what Portcullis writes as it must (a server encoding other
    /// than UTF8, a session without the settings asked for).
    #[error("the database cannot hold the directory: {0}")]
    Unsuitable(String),
    /// A shared store moved on since the batch was built: the writer catches up and retries.
    #[error("another replica changed the directory first")]
    Behind,
    /// A commit the shared store answered is no longer in it (a failover lost it): what was
    /// judged against it, a refusal too, is judged against what never was.
    #[error("the directory store lost a change: {0}")]
    Lost(String),
    /// A commit the shared store answered may not be in it: neither the other replicas'
    /// progress nor whether it holds the commit could be read since.
    #[error("the directory store may not hold a change: {0}")]
    Unsettled(String),
    /// The directory's file is open in another process (it takes the file for itself).
    #[error("{0} is open in another process")]
    Held(String),
}

/// What a shared store has committed since a given sequence number ([`Storage::feed`]).
pub enum Feed {
    /// The batches, oldest first, each built on the one before; empty when nothing is new.
    Batches(Vec<Batch>),
    /// The batches right after it are no longer kept: reload in full.
    Gap,
}

/// What the IdP is told when the store fails: that it may try again. What failed (a driver's
/// message, a host name, a statement) goes to the log, not to the client.
impl From<StoreError> for ScimError {
    fn from(e: StoreError) -> Self {
        tracing::error!("a SCIM request failed in the directory store: {e}");
        ScimError::new(
            503,
            None,
            "the directory store is unavailable; try again later".to_owned(),
        )
    }
}

/// A durable backend for the directory.
pub trait Storage: Send + Sync + 'static {
    /// Visits every stored resource and membership; returns `(seq, next_row)`.
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError>;
    /// Reads the records at `rows` (missing ones are skipped), in one consistent view.
    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError>;
    /// [`Storage::records`], for the directory's writer. With a shared store the writer also
    /// applies the feed that keeps this replica's lease, so it must not wait long on anything
    /// (a table another session has locked): a read that would fails, and fails that write.
    fn records_for_writer(
        &self,
        rt: ResourceType,
        rows: &[Row],
    ) -> Result<Vec<(Row, Record)>, StoreError> {
        self.records(rt, rows)
    }
    /// Writes `batch` durably: when this returns `Ok`, the batch survives a crash.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Changes with a sequence above `after`, oldest first, at most `limit`.
    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError>;

    /// Whether other processes write to this store too. Then [`Storage::commit`] refuses a
    /// batch not built on the store's latest sequence ([`StoreError::Behind`]), the writer
    /// catches up through [`Storage::feed`], and writes are answered after
    /// [`Storage::settle`].
    fn is_shared(&self) -> bool {
        false
    }
    /// The first change the store may hold that this process refused, not knowing it to be
    /// on disk (a write whose last step failed): from then on nothing is read or written
    /// until a restart reads it, and the directory in memory may lack what the IdP has since
    /// sent (refused). `None` while the store is in step with this process.
    fn wedged(&self) -> Option<Seq> {
        None
    }
    /// Closes the store at shutdown, once nothing more is written: a database file closed so
    /// is not repaired as after a crash when it is opened again. Writes after it are refused.
    fn close(&self) {}
    /// Makes the store readable again after a failure that closed it, if it can be: called by
    /// the directory's writer before each batch and once a second while it has none.
    fn recover(&self) {}
    /// The batches committed after `after`, by any process.
    fn feed(&self, _after: Seq) -> Result<Feed, StoreError> {
        Ok(Feed::Batches(Vec::new()))
    }

    /// Returns once no other process can admit anyone on a directory older than `seq`,
    /// whose batch was committed at (or before) `committed`.
    fn settle(&self, _seq: Seq, _committed: std::time::Instant) -> Result<(), StoreError> {
        Ok(())
    }

    /// A write is to be answered at `seq`, the last batch this process applied, without a
    /// commit of its own (it changed nothing): [`Storage::settle`] of `seq` asks for that
    /// batch as it is now, not for whatever batch has the number by then.
    fn answering_at(&self, _seq: Seq) {}
}
