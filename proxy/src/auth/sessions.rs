//! Server-side sessions: the cookie holds only a random id; the session lives here, so any
//! session can be ended at once (sign-out, back-channel logout, deprovisioning).
//!
//! Sessions are entries kept beside the directory ([`Entry`], kind [`SESSION`]): committed by
//! its writer, in `directory.redb` on one machine or in PostgreSQL for several replicas, and
//! fed to every replica in commit order. Each replica holds them all in memory ([`Kept`]), so a
//! request never reads the store, and a session created or ended on one replica is known to
//! all of them once the write is answered (as for any directory write). Only the SHA-256 of a
//! session id is stored or indexed: a copy of the store does not let anyone present a session.
//!
//! Each replica sees only its own requests, so it writes a session's `last_seen` back now and
//! then ([`Sessions::maintain`]); the others keep the later of theirs and the stored one. The
//! same sweep forgets sessions that have expired or idled out.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dashmap::DashMap;
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use portcullis_scim::store::{Command, Directory, Entry, EntrySink};

use super::sealed::Sealer;
use crate::caller::{Identity, SessionKey};

/// The entry kind of a session: keyed by the SHA-256 of its id (URL-safe base64).
pub const SESSION: &str = "session";
/// The entry kind of a key that seals sign-ins in progress (see [`super::sealed`]).
pub const SEALING_KEY: &str = "sealing-key";

/// The directory writer's actor name for session writes.
const ACTOR: &str = "portcullis sessions";

/// Length of a session id in bytes (encoded as 43 URL-safe base64 characters in the cookie).
const ID_BYTES: usize = 32;

/// The IdP's tokens kept to refresh a session (`[oidc] refresh = true`). Never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    pub refresh_token: String,
    /// Unix seconds when the current ID token expires: the next refresh is due then.
    pub due: u64,
}

impl std::fmt::Debug for Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresh")
            .field("due", &self.due)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Session {
    /// Shared with every request's caller: never copied per request.
    pub identity: Arc<Identity>,
    /// Unix seconds of the last request, for the idle timeout.
    last_seen: AtomicU64,
    /// `last_seen` as the store has it.
    stored_seen: u64,
    /// Present when the session is refreshed with the IdP; one refresh at a time.
    pub refresh: Option<tokio::sync::Mutex<Refresh>>,
}

impl Session {
    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    pub fn touch(&self, now: u64) {
        // Only ever moves forward; a coarse store keeps the cache line quiet.
        if self.last_seen() + 5 <= now {
            self.last_seen.store(now, Ordering::Relaxed);
        }
    }

    /// Whether the session may be used at `now`.
    pub fn is_live(&self, now: u64, idle_timeout: u64) -> bool {
        now < self.identity.expires && now < self.last_seen().saturating_add(idle_timeout)
    }

    fn stored(&self) -> Stored {
        Stored {
            identity: Identity::clone(&self.identity),
            last_seen: self.last_seen(),
            refresh: self
                .refresh
                .as_ref()
                .and_then(|r| r.try_lock().ok().map(|r| r.clone())),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    identity: Identity,
    last_seen: u64,
    #[serde(default)]
    refresh: Option<Refresh>,
}

impl Stored {
    fn entry(&self, key: &SessionKey) -> Result<Entry, String> {
        Ok(Entry {
            kind: SESSION.to_owned(),
            key: URL_SAFE_NO_PAD.encode(key),
            value: Some(serde_json::to_string(self).map_err(|e| e.to_string())?),
        })
    }
}

fn forget(key: &SessionKey) -> Entry {
    Entry {
        kind: SESSION.to_owned(),
        key: URL_SAFE_NO_PAD.encode(key),
        value: None,
    }
}

fn key_of(id: &str) -> SessionKey {
    Sha256::digest(id.as_bytes()).into()
}

/// What sign-in keeps beside the directory, held in memory and kept current by the
/// directory's writer (it is the directory's [`EntrySink`]): every session, and the keys that
/// seal sign-ins in progress.
#[derive(Default)]
pub struct Kept {
    sessions: DashMap<SessionKey, Arc<Session>>,
    /// How many times sessions were ended, for those who act on it (open connections).
    ended: tokio::sync::watch::Sender<u64>,
    /// By name; the first one seals (so every replica seals with the same key).
    sealing: ArcSwap<Vec<(String, Arc<Sealer>)>>,
}

impl Kept {
    /// The key new sign-ins are sealed with, and every key one may have been sealed with.
    pub fn sealers(&self) -> Arc<Vec<(String, Arc<Sealer>)>> {
        self.sealing.load_full()
    }

    /// Applies one entry; returns whether it ended a session.
    fn keep(&self, entry: &Entry) -> bool {
        match entry.kind.as_str() {
            SESSION => {
                let Some(key) = parse_key(&entry.key) else {
                    return false;
                };
                // A record this build cannot read is treated as signed out.
                let stored = entry
                    .value
                    .as_deref()
                    .and_then(|v| serde_json::from_str::<Stored>(v).ok());
                match stored {
                    Some(stored) => {
                        let seen_here = self.sessions.get(&key).map_or(0, |s| s.last_seen());
                        let session = Session {
                            identity: Arc::new(stored.identity),
                            last_seen: AtomicU64::new(stored.last_seen.max(seen_here)),
                            stored_seen: stored.last_seen,
                            refresh: stored.refresh.map(tokio::sync::Mutex::new),
                        };
                        self.sessions.insert(key, Arc::new(session));
                        false
                    }
                    None => self.sessions.remove(&key).is_some(),
                }
            }
            SEALING_KEY => {
                let sealer = entry.value.as_deref().and_then(Sealer::from_encoded_key);
                let mut keys = Vec::clone(&self.sealing.load());
                keys.retain(|(name, _)| *name != entry.key);
                if let Some(sealer) = sealer {
                    keys.push((entry.key.clone(), Arc::new(sealer)));
                    keys.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.sealing.store(Arc::new(keys));
                false
            }
            _ => false,
        }
    }
}

fn parse_key(name: &str) -> Option<SessionKey> {
    URL_SAFE_NO_PAD.decode(name).ok()?.try_into().ok()
}

impl EntrySink for Kept {
    fn load(&self, entries: Vec<Entry>) {
        // Replaced in place, never emptied first: a session held all along stays usable.
        let mut loaded = std::collections::HashSet::new();
        self.sealing.store(Arc::new(Vec::new()));
        for entry in &entries {
            self.keep(entry);
            if entry.kind == SESSION {
                loaded.extend(parse_key(&entry.key));
            }
        }
        let before = self.sessions.len();
        self.sessions.retain(|key, _| loaded.contains(key));
        if self.sessions.len() < before {
            self.ended.send_modify(|ended| *ended += 1);
        }
    }

    fn apply(&self, entries: &[Entry]) {
        let mut ended = false;
        for entry in entries {
            ended |= self.keep(entry);
        }
        if ended {
            self.ended.send_modify(|ended| *ended += 1);
        }
    }
}

/// The sessions, over what [`Kept`] holds and the directory that stores them.
pub struct Sessions {
    kept: Arc<Kept>,
    directory: Arc<Directory>,
}

impl Sessions {
    pub fn new(kept: Arc<Kept>, directory: Arc<Directory>) -> Self {
        Self { kept, directory }
    }

    async fn put(&self, entries: Vec<Entry>) -> Result<(), String> {
        self.directory
            .write(Command::Put(entries), ACTOR)
            .await
            .map(drop)
            .map_err(|e| e.detail)
    }

    /// Creates a session for `identity`; returns the id for the cookie. Durable on return,
    /// and known to every replica.
    pub async fn create(
        &self,
        identity: Identity,
        refresh: Option<Refresh>,
        now: u64,
    ) -> Result<String, String> {
        let mut raw = [0u8; ID_BYTES];
        rand::rng().fill_bytes(&mut raw);
        let id = URL_SAFE_NO_PAD.encode(raw);
        let stored = Stored {
            identity,
            last_seen: now,
            refresh,
        };
        self.put(vec![stored.entry(&key_of(&id))?]).await?;
        Ok(id)
    }

    /// Saves a session's new refresh state (after a refresh with the IdP).
    pub async fn save_refresh(
        &self,
        key: &SessionKey,
        session: &Session,
        refresh: &Refresh,
    ) -> Result<(), String> {
        let stored = Stored {
            refresh: Some(refresh.clone()),
            ..session.stored()
        };
        self.put(vec![stored.entry(key)?]).await
    }

    /// The session a cookie value names, if any. Malformed values are simply "no session".
    pub fn get(&self, id: &str) -> Option<(SessionKey, Arc<Session>)> {
        if id.len() != 43
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        let key = key_of(id);
        self.kept.sessions.get(&key).map(|s| (key, s.clone()))
    }

    /// Whether the session `key` names is on and may be used at `now` (see
    /// [`Session::is_live`]).
    pub fn is_live(&self, key: &SessionKey, now: u64, idle_timeout: u64) -> bool {
        self.kept
            .sessions
            .get(key)
            .is_some_and(|session| session.is_live(now, idle_timeout))
    }

    /// Counts the times sessions were ended.
    pub fn ends(&self) -> u64 {
        *self.kept.ended.borrow()
    }

    /// Wakes whenever sessions are ended.
    pub fn subscribe_ends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.kept.ended.subscribe()
    }

    /// Ends the sessions for which `matches` is true. Durable on return.
    pub async fn end_where(&self, matches: impl Fn(&Identity) -> bool) -> Result<usize, String> {
        let keys: Vec<SessionKey> = self
            .kept
            .sessions
            .iter()
            .filter(|entry| matches(&entry.value().identity))
            .map(|entry| *entry.key())
            .collect();
        self.end(&keys).await?;
        Ok(keys.len())
    }

    /// Ends the given sessions: gone from this replica's memory first (so no request is served
    /// by them here from this moment), then from the store and every other replica.
    pub async fn end(&self, keys: &[SessionKey]) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            self.kept.sessions.remove(key);
        }
        self.kept.ended.send_modify(|ended| *ended += 1);
        self.put(keys.iter().map(forget).collect()).await
    }

    /// Whether a key to seal sign-ins with is kept (sign-in needs one).
    pub fn can_seal(&self) -> bool {
        !self.kept.sealers().is_empty()
    }

    /// Keeps a first key to seal sign-ins with, unless one is kept already. Replicas that
    /// do this at once each keep one; all of them then seal with the same (the first by name)
    /// and open with any.
    pub async fn keep_sealing_key(&self) -> Result<bool, String> {
        if !self.kept.sealers().is_empty() {
            return Ok(false);
        }
        let mut name = [0u8; 16];
        rand::rng().fill_bytes(&mut name);
        let entry = Entry {
            kind: SEALING_KEY.to_owned(),
            key: URL_SAFE_NO_PAD.encode(name),
            value: Some(Sealer::generate_encoded_key()),
        };
        self.put(vec![entry]).await?;
        Ok(true)
    }

    /// Writes back the `last_seen` of sessions used here more than `every` seconds after the
    /// store last had it, and forgets sessions past their lifetime or idle for `idle_timeout`.
    /// Returns how many sessions it wrote and forgot. Run it every `every` seconds.
    pub async fn maintain(
        &self,
        now: u64,
        idle_timeout: u64,
        every: u64,
    ) -> Result<(usize, usize), String> {
        let mut touched = Vec::new();
        let mut over = Vec::new();
        for entry in self.kept.sessions.iter() {
            let session = entry.value();
            if !session.is_live(now, idle_timeout) {
                over.push(*entry.key());
            } else if session.last_seen() >= session.stored_seen.saturating_add(every) {
                touched.push(session.stored().entry(entry.key())?);
            }
        }
        let counts = (touched.len(), over.len());
        let mut entries = touched;
        entries.extend(over.iter().map(forget));
        for chunk in entries.chunks(MAX_ENTRIES_PER_WRITE) {
            self.put(chunk.to_vec()).await?;
        }
        Ok(counts)
    }

    /// Copies the sessions of `data_dir/sessions.redb`, where sessions were kept before they
    /// moved beside the directory, into the directory, then renames the file so that this
    /// happens once. Sessions past their lifetime at `now` are left behind.
    pub async fn import(&self, data_dir: &Path, now: u64) -> Result<usize, String> {
        let path = data_dir.join(OLD_FILE);
        if !path.exists() {
            return Ok(0);
        }
        let entries = {
            let db = Database::open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let mut entries = Vec::new();
            if let Ok(table) = txn.open_table(OLD_TABLE) {
                for row in table.iter().map_err(|e| e.to_string())? {
                    let (key, value) = row.map_err(|e| e.to_string())?;
                    let Ok(key) = SessionKey::try_from(key.value()) else {
                        continue;
                    };
                    let Ok(stored) = serde_json::from_slice::<Stored>(value.value()) else {
                        continue;
                    };
                    if stored.identity.expires > now {
                        entries.push(stored.entry(&key)?);
                    }
                }
            }
            entries
        };
        for chunk in entries.chunks(MAX_ENTRIES_PER_WRITE) {
            self.put(chunk.to_vec()).await?;
        }
        let done = data_dir.join(format!("{OLD_FILE}.imported"));
        std::fs::rename(&path, &done)
            .map_err(|e| format!("cannot rename {}: {e}", path.display()))?;
        Ok(entries.len())
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.kept.sessions.len()
    }
}

/// Entries per directory write when many sessions are written at once.
const MAX_ENTRIES_PER_WRITE: usize = 1_000;

/// Where sessions were kept before they moved beside the directory.
const OLD_FILE: &str = "sessions.redb";
const OLD_TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sub: &str, expires: u64) -> Identity {
        Identity {
            issuer: "https://idp.test".into(),
            subject: sub.into(),
            email: Some(format!("{sub}@corp.test")),
            email_verified: None,
            name: None,
            idp_session: Some(format!("sid-{sub}")),
            created: 100,
            expires,
            id_token: None,
            directory_seq: 0,
            groups: Vec::new(),
            claims: Default::default(),
        }
    }

    struct Opened {
        sessions: Sessions,
        kept: Arc<Kept>,
    }

    /// Sessions over a directory in `dir`, as `serve` opens them.
    fn open(dir: &Path) -> Opened {
        let kept = Arc::new(Kept::default());
        let storage = portcullis_scim::store::redb::RedbStorage::open(dir).unwrap();
        let sinks = portcullis_scim::store::Sinks {
            changes: None,
            entries: Some(kept.clone()),
        };
        let directory = Directory::open_with_sinks(
            Arc::new(storage),
            Box::new(time::OffsetDateTime::now_utc),
            sinks,
        )
        .unwrap();
        Opened {
            sessions: Sessions::new(kept.clone(), Arc::new(directory)),
            kept,
        }
    }

    #[tokio::test]
    async fn sessions_survive_a_restart_and_end_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob) = {
            let sessions = open(dir.path()).sessions;
            let alice = sessions
                .create(identity("alice", 10_000), None, 100)
                .await
                .unwrap();
            let refresh = Refresh {
                refresh_token: "rt".into(),
                due: 500,
            };
            let bob = sessions
                .create(identity("bob", 10_000), Some(refresh), 100)
                .await
                .unwrap();
            assert_eq!(alice.len(), 43);
            assert!(sessions.get(&alice).is_some(), "held once created");
            (alice, bob)
        };
        let sessions = open(dir.path()).sessions;
        assert_eq!(sessions.count(), 2);
        let (_, session) = sessions.get(&alice).unwrap();
        assert!(session.is_live(200, 3600));
        assert!(!session.is_live(100 + 3600, 3600), "idle timeout");
        assert!(!session.is_live(10_000, 1_000_000), "absolute lifetime");

        let ends = sessions.subscribe_ends();
        let ended = sessions.end_where(|i| i.subject == "alice").await.unwrap();
        assert_eq!(ended, 1);
        assert!(
            ends.has_changed().unwrap(),
            "those who cut connections are told"
        );
        assert!(sessions.get(&alice).is_none());
        assert!(sessions.get(&bob).is_some());
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        assert!(sessions.get(&alice).is_none(), "ending is durable");
        let (_, bob) = sessions.get(&bob).unwrap();
        let refresh = bob.refresh.as_ref().unwrap().try_lock().unwrap();
        assert_eq!(refresh.due, 500, "refresh state survives a restart");
        assert!(
            !format!("{refresh:?}").contains("rt\""),
            "refresh token never in Debug"
        );
        // Only the hash of the id is stored.
        drop(refresh);
        drop(sessions);
        let raw = std::fs::read(dir.path().join("directory.redb")).unwrap();
        assert!(!raw.windows(43).any(|w| w == alice.as_bytes()));
    }

    #[tokio::test]
    async fn use_is_written_back_and_sessions_that_are_over_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let used = sessions
            .create(identity("used", 100_000), None, 100)
            .await
            .unwrap();
        let idle = sessions
            .create(identity("idle", 100_000), None, 100)
            .await
            .unwrap();
        let expired = sessions
            .create(identity("expired", 1_000), None, 100)
            .await
            .unwrap();
        // Nothing is due a moment later.
        assert_eq!(sessions.maintain(150, 3_600, 60).await.unwrap(), (0, 0));
        sessions.get(&used).unwrap().1.touch(3_000);
        assert_eq!(sessions.maintain(3_700, 3_600, 60).await.unwrap(), (1, 2));
        assert!(sessions.get(&idle).is_none() && sessions.get(&expired).is_none());
        // Written back: a replica (or a restart) that never saw the use has it.
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        assert_eq!(sessions.count(), 1);
        assert_eq!(sessions.get(&used).unwrap().1.last_seen(), 3_000);
        assert_eq!(sessions.maintain(3_700, 3_600, 60).await.unwrap(), (0, 0));
    }

    #[tokio::test]
    async fn sessions_of_an_older_version_are_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = Stored {
            identity: identity("carol", 10_000),
            last_seen: 100,
            refresh: None,
        };
        let gone = Stored {
            identity: identity("dave", 150),
            last_seen: 100,
            refresh: None,
        };
        {
            let db = Database::create(dir.path().join(OLD_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(OLD_TABLE).unwrap();
                for (id, stored) in [("c".repeat(43), &old), ("d".repeat(43), &gone)] {
                    let value = serde_json::to_vec(stored).unwrap();
                    table
                        .insert(key_of(&id).as_slice(), value.as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let sessions = open(dir.path()).sessions;
        assert_eq!(sessions.import(dir.path(), 200).await.unwrap(), 1);
        assert!(sessions.get(&"c".repeat(43)).is_some());
        assert!(
            sessions.get(&"d".repeat(43)).is_none(),
            "expired: left behind"
        );
        assert!(!dir.path().join(OLD_FILE).exists());
        assert_eq!(sessions.import(dir.path(), 200).await.unwrap(), 0, "once");
    }

    #[tokio::test]
    async fn one_sealing_key_is_kept_and_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = {
            let Opened { sessions, kept } = open(dir.path());
            assert!(!sessions.can_seal());
            assert!(sessions.keep_sealing_key().await.unwrap());
            assert!(!sessions.keep_sealing_key().await.unwrap(), "one is enough");
            assert!(sessions.can_seal());
            kept.sealers()[0].1.seal(b"state", b"pending")
        };
        let Opened { kept, .. } = open(dir.path());
        assert_eq!(kept.sealers().len(), 1);
        let opened = kept.sealers()[0].1.open(b"state", &sealed);
        assert_eq!(opened.as_deref(), Some(&b"pending"[..]));
    }

    #[test]
    fn a_reload_replaces_sessions_without_a_gap() {
        let kept = Kept::default();
        let stored = |sub: &str| Stored {
            identity: identity(sub, 10_000),
            last_seen: 100,
            refresh: None,
        };
        let (a, b) = (key_of(&"a".repeat(43)), key_of(&"b".repeat(43)));
        kept.apply(&[
            stored("a").entry(&a).unwrap(),
            stored("b").entry(&b).unwrap(),
        ]);
        kept.sessions.get(&a).unwrap().touch(500);
        let ends = kept.ended.subscribe();
        // Reloaded in full: `b` is gone, `a` stays with the use seen here.
        kept.load(vec![stored("a").entry(&a).unwrap()]);
        assert_eq!(kept.sessions.len(), 1);
        assert_eq!(kept.sessions.get(&a).unwrap().last_seen(), 500);
        assert!(ends.has_changed().unwrap());
        // Entries this build cannot read end the session rather than fail.
        let junk = Entry {
            kind: SESSION.to_owned(),
            key: URL_SAFE_NO_PAD.encode(a),
            value: Some("{".to_owned()),
        };
        kept.apply(&[junk]);
        assert!(kept.sessions.is_empty());
    }

    #[tokio::test]
    async fn malformed_and_unknown_ids_are_no_session() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        for bad in ["", "x", &"a".repeat(43), &"é".repeat(22), &"a".repeat(4096)] {
            assert!(sessions.get(bad).is_none());
        }
    }
}
