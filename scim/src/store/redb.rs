//! The embedded backend: one redb database file in `data_dir`.
//!
//! Tables: `users`, `groups`, `agents` and `agentic_applications` (row → the record as
//! JSON), `members` ((group, member) → ()),
//! `changes` (seq → the change as JSON), `entries` ((kind, key) → value, see
//! [`super::Entry`]) and `meta` (the schema version, the change sequence and
//! the next row number). Each batch is one write transaction with redb's default
//! `Durability::Immediate`: when `commit` returns, the batch is on disk.
//!
//! A write that fails (a full disk) leaves redb refusing every later access until the
//! database is opened again, which also repairs it: the next commit opens it again, and so
//! does the writer's thread once a second meanwhile, so that once space is freed writes and
//! reads go on without a restart. One that failed yet is read back from
//! the file may not be on disk (its sync failed: the kernel may have dropped the pages it
//! could not write, and a sync after it finds nothing to write): it is refused, and so is
//! every write and every read of records after it (lookups answer from the index, which
//! never held it), until a restart (which reads the file as the kernel has it: an I/O
//! error needs the disk looked at).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Batch, Change, Entry, Loaded, Record, Row, Seq, Storage, StoreError};
use crate::schema::ResourceType;

/// The on-disk format version. A database of a newer version is refused at start; one of an
/// older version this build can read is upgraded in place.
///
/// - 1: Users, Groups, memberships, changes.
/// - 2: also retired Users (a deleted user's identifiers, [`super::Record::retired`]), which
///   a version-1 build would read as corrupt. Nothing to convert: 1 is stamped 2.
/// - 3: also Agents and AgenticApplications, which an older build would silently not see
///   (and so not know an agent's group memberships). Nothing to convert: 1 and 2 are
///   stamped 3.
///
/// The `entries` table came without a new version: a build that predates it ignores it (and
/// so knows no sessions).
pub const SCHEMA_VERSION: u64 = 3;

/// redb's page cache.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const USERS: TableDefinition<u64, &[u8]> = TableDefinition::new("users");
const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
const AGENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("agents");
const APPLICATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("agentic_applications");
const MEMBERS: TableDefinition<(u64, u64), ()> = TableDefinition::new("members");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const ENTRIES: TableDefinition<(&str, &str), &str> = TableDefinition::new("entries");

pub struct RedbStorage {
    /// `None` while it could not be opened again.
    db: RwLock<Option<Database>>,
    open: Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>,
    /// The sequence of a batch the database holds though this process refused it (see
    /// `commit`): once known, nothing more is written until a restart reads it.
    ahead: std::sync::OnceLock<Seq>,
    /// Closed at shutdown: nothing more is written (not even by opening it again).
    closed: std::sync::atomic::AtomicBool,
    /// Held by [`Storage::recover`] and `reopen` while they open the file (and install it when
    /// it holds what is known), and by `close`: the close waits for an opening under way,
    /// which reads never do.
    opening: std::sync::Mutex<()>,
    /// The sequence the database holds as this process knows it: opened again, it must hold
    /// that (see [`Storage::recover`]).
    known: std::sync::atomic::AtomicU64,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn table(rt: ResourceType) -> TableDefinition<'static, u64, &'static [u8]> {
    match rt {
        ResourceType::User => USERS,
        ResourceType::Group => GROUPS,
        ResourceType::Agent => AGENTS,
        ResourceType::AgenticApplication => APPLICATIONS,
    }
}

/// What opening does with a database of an older schema this build can read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Upgrade {
    InPlace,
    Refuse,
}

/// The file of the embedded directory, in `data_dir`.
pub const FILE: &str = "directory.redb";

impl RedbStorage {
    /// Opens (or creates) `directory.redb` in `data_dir`, upgrading one of an older schema.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_in(data_dir, Upgrade::InPlace)
    }

    /// Opens `directory.redb` in `data_dir` for a command run beside the service (`explain`):
    /// one of an older schema is refused, not upgraded, so the build that wrote it still opens it.
    pub fn open_as_is(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_in(data_dir, Upgrade::Refuse)
    }

    fn open_in(data_dir: &Path, upgrade: Upgrade) -> Result<Self, StoreError> {
        let path = data_dir.join(FILE);
        let cannot = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("cannot open {}: {e}", path.display()))
        };
        // Made open to this user alone (redb makes it with the umask's mode): it holds names,
        // emails and password hashes, and the keys that seal sign-ins in progress.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| cannot(&e))?;
        let open = move || {
            // Lookups are answered by the in-memory index; redb's cache only serves record
            // reads, so it is kept small rather than redb's 1 GiB default.
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
                .map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => {
                        StoreError::Held(path.display().to_string())
                    }
                    e => StoreError::Backend(format!("cannot open {}: {e}", path.display())),
                })
        };
        Self::opened_by(Box::new(open), upgrade)
    }

    /// The store `open` opens (and opens again after a failed write).
    pub(super) fn opened_by(
        open: Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>,
        upgrade: Upgrade,
    ) -> Result<Self, StoreError> {
        let db = open()?;
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let version = meta
                .get("schema_version")
                .map_err(backend)?
                .map(|v| v.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(backend)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found @ (1 | 2)) if upgrade == Upgrade::InPlace => {
                    if found == 1 {
                        // What such a build deleted left no identifier behind: nothing to
                        // bring back, but the operator is told what it means.
                        tracing::warn!(
                            "the directory file was written by a build that kept no deleted \
                             user's identifiers: a person the IdP deleted before this upgrade \
                             is not known here as deleted, so one who can still sign in at the \
                             IdP is a stranger, judged by the IdP's groups on token_groups routes \
                             (require assignment to the app at the IdP)"
                        );
                    }
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(backend)?;
                }
                Some(found) => {
                    return Err(StoreError::Version {
                        found,
                        expected: SCHEMA_VERSION,
                    })
                }
            }
            for rt in ResourceType::ALL {
                txn.open_table(table(rt)).map_err(backend)?;
            }
            txn.open_table(MEMBERS).map_err(backend)?;
            txn.open_table(CHANGES).map_err(backend)?;
            txn.open_table(ENTRIES).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let known = sequence(&db)?;
        Ok(Self {
            db: RwLock::new(Some(db)),
            open,
            ahead: std::sync::OnceLock::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            opening: std::sync::Mutex::new(()),
            known: std::sync::atomic::AtomicU64::new(known),
        })
    }

    /// A read of the database, which is not opened again while it lasts (nor by it: see
    /// [`Storage::recover`]). Nothing is read from a database holding changes this process
    /// refused (see `commit`).
    fn begin_read(&self) -> Result<Reading<'_>, StoreError> {
        if let Some(&seq) = self.ahead.get() {
            return Err(self.unknown(seq));
        }
        let held = self.db.read().map_err(|_| poisoned())?;
        let txn = (held.as_ref().ok_or_else(not_open)?)
            .begin_read()
            .map_err(backend)?;
        Ok(Reading { txn, _held: held })
    }

    /// The refusal of every write (and read) once the database holds changes, from `seq` on,
    /// that this process refused: only a restart reads them.
    fn unknown(&self, seq: Seq) -> StoreError {
        let seq = *self.ahead.get_or_init(|| seq);
        StoreError::Backend(format!(
            "the database may hold changes to {seq} that this process refused, not knowing \
             them to be on disk; restart to read them"
        ))
    }

    /// Writes `batch`; `None` if the database is not open (it could not be opened again after
    /// a failed write).
    fn write(&self, batch: &Batch) -> Result<Option<Result<(), StoreError>>, StoreError> {
        let held = self.db.read().map_err(|_| poisoned())?;
        let written = held.as_ref().map(|db| write(db, batch));
        // Known while the database cannot be opened again (under `held`): see `recover`.
        if matches!(written, Some(Ok(()))) {
            (self.known).store(batch.seq, std::sync::atomic::Ordering::Release);
        }
        Ok(written)
    }

    /// Opens the database again (redb takes nothing more after a failed write until then),
    /// and returns its sequence, which should be `base`: one past it holds a write this process
    /// refused, and is left closed, as [`Storage::recover`] leaves it (see
    /// [`RedbStorage::unknown`]). Opened as `recover` opens it: with no lock reads take, so
    /// that they fail at once meanwhile rather than wait on a repair's walk of the file; a
    /// close waits for it.
    fn reopen(&self, base: Seq) -> Result<Seq, StoreError> {
        let _opening = self.opening.lock().map_err(|_| poisoned())?;
        {
            let mut db = self.db.write().map_err(|_| poisoned())?;
            // Checked under the lock `close` sets it under: a commit that passed its own
            // check before the close does not open the file again after it.
            if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(StoreError::Backend("closed at shutdown".to_owned()));
            }
            // Closed first: the file is locked while it is open.
            drop(db.take());
        }
        let opened = (self.open)()?;
        let seq = sequence(&opened)?;
        if seq != base {
            drop(self.unknown(seq));
            return Ok(seq);
        }
        *self.db.write().map_err(|_| poisoned())? = Some(opened);
        Ok(seq)
    }
}

/// The change sequence `db` holds.
fn sequence(db: &Database) -> Result<Seq, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let meta = txn.open_table(META).map_err(backend)?;
    Ok(meta.get("seq").map_err(backend)?.map_or(0, |v| v.value()))
}

/// A read transaction, and the lock that keeps its database open until it ends (fields drop
/// in order: the transaction first).
struct Reading<'a> {
    txn: redb::ReadTransaction,
    _held: RwLockReadGuard<'a, Option<Database>>,
}

fn not_open() -> StoreError {
    backend("the database could not be opened again after a failed write")
}

fn poisoned() -> StoreError {
    backend("the store's lock is poisoned")
}

/// Writes `batch` in one transaction.
fn write(db: &Database, batch: &Batch) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        // By `ResourceType as usize`.
        let mut tables = Vec::with_capacity(ResourceType::ALL.len());
        for rt in ResourceType::ALL {
            tables.push(txn.open_table(table(rt)).map_err(backend)?);
        }
        for (rt, row, record) in &batch.records {
            let resources = tables
                .get_mut(*rt as usize)
                .ok_or_else(|| backend("no table for this resource type"))?;
            match record {
                Some(record) => {
                    let bytes = serde_json::to_vec(record).map_err(backend)?;
                    resources.insert(*row, bytes.as_slice()).map_err(backend)?;
                }
                None => {
                    resources.remove(*row).map_err(backend)?;
                }
            }
        }
        let mut members = txn.open_table(MEMBERS).map_err(backend)?;
        for &(group, member, present) in &batch.members {
            if present {
                members.insert((group, member), ()).map_err(backend)?;
            } else {
                members.remove((group, member)).map_err(backend)?;
            }
        }
        let mut changes = txn.open_table(CHANGES).map_err(backend)?;
        for change in &batch.changes {
            let bytes = serde_json::to_vec(change).map_err(backend)?;
            changes
                .insert(change.seq, bytes.as_slice())
                .map_err(backend)?;
        }
        let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
        for entry in &batch.entries {
            let key = (entry.kind.as_str(), entry.key.as_str());
            match &entry.value {
                Some(value) => entries.insert(key, value.as_str()).map(drop),
                None => entries.remove(key).map(drop),
            }
            .map_err(backend)?;
        }
        let mut meta = txn.open_table(META).map_err(backend)?;
        meta.insert("seq", batch.seq).map_err(backend)?;
        meta.insert("next_row", batch.next_row).map_err(backend)?;
    }
    txn.commit().map_err(backend)
}

fn decode(row: Row, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("row {row}: {e}")))
}

impl Storage for RedbStorage {
    fn load(&self, visit: &mut dyn FnMut(Loaded<'_>)) -> Result<(Seq, Row), StoreError> {
        let reading = self.begin_read()?;
        let txn = &reading.txn;
        for rt in ResourceType::ALL {
            let resources = txn.open_table(table(rt)).map_err(backend)?;
            for entry in resources.iter().map_err(backend)? {
                let (row, bytes) = entry.map_err(backend)?;
                visit(Loaded::Resource(rt, row.value(), bytes.value()));
            }
        }
        let members = txn.open_table(MEMBERS).map_err(backend)?;
        for entry in members.iter().map_err(backend)? {
            let (key, _) = entry.map_err(backend)?;
            let (group, member) = key.value();
            visit(Loaded::Member { group, member });
        }
        let entries = txn.open_table(ENTRIES).map_err(backend)?;
        for entry in entries.iter().map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let (kind, key) = key.value();
            visit(Loaded::Entry(Entry {
                kind: kind.to_owned(),
                key: key.to_owned(),
                value: Some(value.value().to_owned()),
            }));
        }
        let meta = txn.open_table(META).map_err(backend)?;
        let seq = meta.get("seq").map_err(backend)?.map_or(0, |v| v.value());
        let next_row = meta
            .get("next_row")
            .map_err(backend)?
            .map_or(1, |v| v.value());
        Ok((seq, next_row))
    }

    fn records(&self, rt: ResourceType, rows: &[Row]) -> Result<Vec<(Row, Record)>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let reading = self.begin_read()?;
        let txn = &reading.txn;
        let resources = txn.open_table(table(rt)).map_err(backend)?;
        let mut out = Vec::with_capacity(rows.len());
        for &row in rows {
            if let Some(bytes) = resources.get(row).map_err(backend)? {
                out.push((row, decode(row, bytes.value())?));
            }
        }
        Ok(out)
    }

    fn wedged(&self) -> Option<Seq> {
        self.ahead.get().copied()
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        // A batch refused though the file may hold it (a step failed after it was written:
        // its sync, so that it may be lost yet; or the database could not be read again) is
        // one this process never knew: only a restart reads it, and nothing is written over
        // it meanwhile.
        let unknown = |seq| self.unknown(seq);
        if let Some(&seq) = self.ahead.get() {
            return Err(unknown(seq));
        }
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Backend("closed at shutdown".to_owned()));
        }
        let written = match self.write(batch)? {
            Some(written) => written,
            // Not open since a failed write: opened (as the writer does between batches),
            // then written.
            None => {
                self.recover();
                match self.write(batch)? {
                    Some(written) => written,
                    None => return Err(self.ahead.get().map_or_else(not_open, |&s| unknown(s))),
                }
            }
        };
        let Err(failed) = written else {
            return Ok(());
        };
        // Whether the file holds the batch after all is read back: if it does not, nothing
        // was written; if it does, it may not be on disk (Linux marks pages it failed to
        // write as clean, and a sync on the file opened again reports no error).
        match self.reopen(batch.base)? {
            seq if seq == batch.base => Err(failed),
            seq => Err(unknown(seq)),
        }
    }

    /// Drops the database, which redb then marks closed cleanly (a process that exits with
    /// it open leaves it to be repaired, walking the whole file, at the next open).
    fn close(&self) {
        // After an opening by `recover` under way (it installs what it opened, dropped here),
        // and set under the lock a commit holds while it writes (one under way ends first) and
        // `reopen` takes before it opens the file: none after it opens the file again.
        let _opening = self.opening.lock();
        if let Ok(mut db) = self.db.write() {
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            drop(db.take());
        }
    }

    /// Opens the database again if a failed write left it closed and opening it then failed
    /// too, provided it holds what this process knows: reads find it open again once there is
    /// room, with no write to open it first (an IdP that looks users up and patches them, as
    /// Okta does before each write). On the writer's thread, never a read's: opening may walk
    /// the whole file to repair it.
    fn recover(&self) {
        let shut =
            || self.closed.load(std::sync::atomic::Ordering::Acquire) || self.ahead.get().is_some();
        // Open (nearly always): nothing to do, and no write lock for reads to wait behind.
        if self.db.read().map_or(true, |db| db.is_some()) || shut() {
            return;
        }
        // Opened with no lock reads take: they fail at once meanwhile (not open) rather than
        // wait on a repair's walk of the file. Only this thread, the writer's, opens it (a
        // commit too), and no commit moves `known` while it is closed; a close waits for it.
        let Ok(_opening) = self.opening.lock() else {
            return;
        };
        if shut() {
            return;
        }
        let (seq, opened) = match (self.open)().and_then(|opened| Ok((sequence(&opened)?, opened)))
        {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!("the directory store is still closed after a failed write: {e}");
                return;
            }
        };
        let Ok(mut db) = self.db.write() else {
            return;
        };
        if db.is_some() || shut() {
            return;
        }
        match seq == self.known.load(std::sync::atomic::Ordering::Acquire) {
            true => *db = Some(opened),
            false => drop(self.unknown(seq)),
        }
    }

    fn changes(&self, after: Seq, limit: usize) -> Result<Vec<Change>, StoreError> {
        let reading = self.begin_read()?;
        let txn = &reading.txn;
        let changes = txn.open_table(CHANGES).map_err(backend)?;
        let mut out = Vec::new();
        for entry in changes
            .range(after.saturating_add(1)..)
            .map_err(backend)?
            .take(limit)
        {
            let (seq, bytes) = entry.map_err(backend)?;
            let change = serde_json::from_slice(bytes.value())
                .map_err(|e| StoreError::Corrupt(format!("change {}: {e}", seq.value())))?;
            out.push(change);
        }
        Ok(out)
    }
}
