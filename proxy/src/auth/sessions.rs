//! Server-side sessions: the cookie holds only a random id; the session lives here, so any
//! session can be ended at once (sign-out, back-channel logout, deprovisioning).
//!
//! Sessions are kept in memory for lookups and in `sessions.redb` in `data_dir` so they survive
//! a restart. Only the SHA-256 of a session id is stored or indexed: a copy of the database
//! does not let anyone present a session.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::caller::{Identity, SessionKey};

const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

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
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    identity: Identity,
    last_seen: u64,
    #[serde(default)]
    refresh: Option<Refresh>,
}

pub struct Sessions {
    db: Database,
    live: DashMap<SessionKey, Arc<Session>>,
    /// How many times sessions were ended, for those who act on it (open connections).
    ended: tokio::sync::watch::Sender<u64>,
}

fn key_of(id: &str) -> SessionKey {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Opens `sessions.redb` in `data_dir` and loads every session that has not expired.
    pub fn open(data_dir: &Path, now: u64) -> Result<Self, String> {
        let path = data_dir.join("sessions.redb");
        let db = Database::builder()
            .set_cache_size(8 * 1024 * 1024)
            .create(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(SESSIONS).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        let live = DashMap::new();
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(SESSIONS).map_err(|e| e.to_string())?;
        for entry in table.iter().map_err(|e| e.to_string())? {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            let Ok(key) = SessionKey::try_from(key.value()) else {
                continue;
            };
            // A record this build cannot read is treated as signed out.
            let Ok(stored) = serde_json::from_slice::<Stored>(value.value()) else {
                continue;
            };
            if stored.identity.expires > now {
                live.insert(
                    key,
                    Arc::new(Session {
                        identity: Arc::new(stored.identity),
                        last_seen: AtomicU64::new(stored.last_seen),
                        refresh: stored.refresh.map(tokio::sync::Mutex::new),
                    }),
                );
            }
        }
        drop(table);
        drop(txn);
        Ok(Self {
            db,
            live,
            ended: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Creates a session for `identity`; returns the id for the cookie. Durable on return.
    pub fn create(
        &self,
        identity: Identity,
        refresh: Option<Refresh>,
        now: u64,
    ) -> Result<String, String> {
        let mut raw = [0u8; ID_BYTES];
        rand::rng().fill_bytes(&mut raw);
        let id = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
        let key = key_of(&id);
        let stored = Stored {
            identity,
            last_seen: now,
            refresh,
        };
        self.write(&key, &stored)?;
        self.live.insert(
            key,
            Arc::new(Session {
                identity: Arc::new(stored.identity),
                last_seen: AtomicU64::new(now),
                refresh: stored.refresh.map(tokio::sync::Mutex::new),
            }),
        );
        Ok(id)
    }

    /// Saves a session's new refresh state (after a refresh with the IdP).
    pub fn save_refresh(
        &self,
        key: &SessionKey,
        session: &Session,
        refresh: &Refresh,
    ) -> Result<(), String> {
        let stored = Stored {
            identity: Identity::clone(&session.identity),
            last_seen: session.last_seen(),
            refresh: Some(refresh.clone()),
        };
        self.write(key, &stored)
    }

    fn write(&self, key: &SessionKey, stored: &Stored) -> Result<(), String> {
        let bytes = serde_json::to_vec(stored).map_err(|e| e.to_string())?;
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(SESSIONS).map_err(|e| e.to_string())?;
            table
                .insert(key.as_slice(), bytes.as_slice())
                .map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())
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
        self.live.get(&key).map(|s| (key, s.clone()))
    }

    /// Whether the session `key` names is on and may be used at `now` (see
    /// [`Session::is_live`]).
    pub fn is_live(&self, key: &SessionKey, now: u64, idle_timeout: u64) -> bool {
        self.live
            .get(key)
            .is_some_and(|session| session.is_live(now, idle_timeout))
    }

    /// Counts the calls to [`Sessions::end`] that ended something.
    pub fn ends(&self) -> u64 {
        *self.ended.borrow()
    }

    /// Wakes whenever sessions are ended.
    pub fn subscribe_ends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// Ends the sessions for which `matches` is true. Durable on return.
    pub fn end_where(&self, matches: impl Fn(&Identity) -> bool) -> Result<usize, String> {
        let keys: Vec<SessionKey> = self
            .live
            .iter()
            .filter(|entry| matches(&entry.value().identity))
            .map(|entry| *entry.key())
            .collect();
        self.end(&keys)?;
        Ok(keys.len())
    }

    /// Ends the given sessions: gone from memory first (so no request is served by them from
    /// this moment), then from disk.
    pub fn end(&self, keys: &[SessionKey]) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            self.live.remove(key);
        }
        self.ended.send_modify(|ended| *ended += 1);
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(SESSIONS).map_err(|e| e.to_string())?;
            for key in keys {
                table.remove(key.as_slice()).map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.live.len()
    }
}

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

    #[test]
    fn sessions_survive_a_restart_and_end_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob) = {
            let sessions = Sessions::open(dir.path(), 100).unwrap();
            let alice = sessions
                .create(identity("alice", 10_000), None, 100)
                .unwrap();
            let refresh = Refresh {
                refresh_token: "rt".into(),
                due: 500,
            };
            let bob = sessions
                .create(identity("bob", 10_000), Some(refresh), 100)
                .unwrap();
            assert_eq!(alice.len(), 43);
            assert!(sessions.get(&alice).is_some());
            (alice, bob)
        };
        let sessions = Sessions::open(dir.path(), 200).unwrap();
        assert_eq!(sessions.count(), 2);
        let (_, session) = sessions.get(&alice).unwrap();
        assert!(session.is_live(200, 3600));
        assert!(!session.is_live(100 + 3600, 3600), "idle timeout");
        assert!(!session.is_live(10_000, 1_000_000), "absolute lifetime");

        assert_eq!(sessions.end_where(|i| i.subject == "alice").unwrap(), 1);
        assert!(sessions.get(&alice).is_none());
        assert!(sessions.get(&bob).is_some());
        drop(sessions);
        let sessions = Sessions::open(dir.path(), 300).unwrap();
        assert!(sessions.get(&alice).is_none(), "ending is durable");
        let (_, bob) = sessions.get(&bob).unwrap();
        let refresh = bob.refresh.as_ref().unwrap().try_lock().unwrap();
        assert_eq!(refresh.due, 500, "refresh state survives a restart");
        assert!(
            !format!("{refresh:?}").contains("rt\""),
            "refresh token never in Debug"
        );
    }

    #[test]
    fn malformed_and_unknown_ids_are_no_session() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::open(dir.path(), 0).unwrap();
        for bad in ["", "x", &"a".repeat(43), &"é".repeat(22), &"a".repeat(4096)] {
            assert!(sessions.get(bad).is_none());
        }
    }
}
