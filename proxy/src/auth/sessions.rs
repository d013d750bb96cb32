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
//! A session never changes once created; what does is kept in entries of its own: when it was
//! last used (each replica sees only its own requests, so it writes that back now and then,
//! [`Sessions::maintain`], and every replica keeps the latest it knows) and its refresh state.
//! Writing those can never bring back a session that ended meanwhile. The same sweep forgets
//! sessions that have expired or idled out.

use std::collections::HashSet;
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

use portcullis_config::OidcConfig;

use crate::auth::oidc::PENDING_FOR;
use portcullis_scim::store::{Command, Directory, Entry, EntrySink};

use super::sealed::Sealer;
use crate::assertion::ASSERTION_KEY;
use crate::caller::{Identity, SessionKey};
use crate::watched::Watched;

/// The entry kind of a session: keyed by the SHA-256 of its id (URL-safe base64).
pub const SESSION: &str = "session";
/// When a session was last used, as far as the store knows (Unix seconds), by the same key.
pub const SESSION_SEEN: &str = "session-seen";
/// A session's refresh state ([`Refresh`]), by the same key.
pub const SESSION_REFRESH: &str = "session-refresh";
/// The entry kind of a key that seals sign-ins in progress (see [`super::sealed`]).
pub const SEALING_KEY: &str = "sealing-key";
/// A back-channel logout token used: keyed by the SHA-256 of its issuer and `jti`, until the
/// Unix second it could no longer be taken. Shared, so that one sent again to another replica,
/// or after a restart, ends nothing (a session signed in since, say).
pub const LOGOUT_TOKEN: &str = "logout-token";

/// The directory writer's actor name for session writes.
const ACTOR: &str = "portcullis sessions";

/// Length of a session id in bytes (encoded as 43 URL-safe base64 characters in the cookie).
const ID_BYTES: usize = 32;

/// The IdP's tokens kept to refresh a session (`[oidc] refresh = true`). Never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    /// As the IdP gave it, or, as sessions keep it ([`Refresh::sealed`]), sealed.
    pub refresh_token: String,
    /// Unix seconds when the current ID token expires: the next refresh is due then.
    pub due: u64,
    /// Whether `refresh_token` is sealed under its session's id (every one kept since sealing
    /// began; those kept before hold it as given, until their next refresh).
    #[serde(default)]
    pub sealed: bool,
}

/// What a session's refresh token is sealed for.
const REFRESH_TOKEN: &[u8] = b"refresh_token";

impl Refresh {
    /// This state as sessions keep it: the token sealed under a key derived from the
    /// session's `id`, which is never stored (its hash is), so a copy of the store refreshes
    /// nobody's session with the IdP.
    fn sealed_for(self, id: &str) -> Refresh {
        if self.sealed {
            return self;
        }
        Refresh {
            refresh_token: token_sealer(id).seal(REFRESH_TOKEN, self.refresh_token.as_bytes()),
            sealed: true,
            ..self
        }
    }

    /// This state with the token as the IdP gave it, for the session `id`; `None` if it
    /// does not open (another session's, or damaged).
    pub fn opened(&self, id: &str) -> Option<Refresh> {
        if !self.sealed {
            return Some(self.clone());
        }
        let plain = token_sealer(id).open(REFRESH_TOKEN, &self.refresh_token)?;
        Some(Refresh {
            refresh_token: String::from_utf8(plain).ok()?,
            due: self.due,
            sealed: false,
        })
    }
}

/// The sealer of session `id`'s refresh token.
fn token_sealer(id: &str) -> Sealer {
    Sealer::derived(id.as_bytes(), b"portcullis session refresh token")
}

/// What a session's ID token is sealed for.
const ID_TOKEN: &[u8] = b"id_token";

/// The sealer of session `id`'s ID token.
fn id_token_sealer(id: &str) -> Sealer {
    Sealer::derived(id.as_bytes(), b"portcullis session id token")
}

/// The ID token a session keeps for `id_token_hint` at sign-out. Never logged.
enum IdToken {
    /// Sealed under a key derived from the session's id, which is never stored (its hash
    /// is): a copy of the store holds no one's ID token.
    Sealed(String),
    /// As the IdP gave it, in a session begun before ID tokens were sealed.
    Plain(String),
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
    stored_seen: AtomicU64,
    /// Present when the session is refreshed with the IdP.
    pub refresh: Option<Refreshing>,
    /// The name of the cookie it was issued in (`None` for sessions begun before that was
    /// kept).
    cookie: Option<String>,
    /// The domain that cookie was set for, `""` for a cookie per host (`None` for sessions
    /// begun before that was kept).
    cookie_domain: Option<String>,
    /// With a cookie per host, that host (`None` for sessions begun before it was kept).
    host: Option<String>,
    id_token: Option<IdToken>,
}

/// The cookie a session is issued in: `[oidc] cookie_name` and `cookie_domain`, or without
/// one, the host it is for.
#[derive(Clone, Copy)]
pub struct IssuedIn<'a> {
    pub name: &'a str,
    pub domain: Option<&'a str>,
    /// Where `domain` is `None`: the host (lower case, without port) the cookie is that of.
    pub host: Option<&'a str>,
}

impl<'a> IssuedIn<'a> {
    /// The cookie of a sign-in finished on `host`.
    pub fn of(oidc: &'a OidcConfig, host: &'a str) -> Self {
        Self {
            name: &oidc.cookie_name,
            domain: oidc.cookie_domain.as_deref(),
            host: Some(host),
        }
    }
}

/// A cookie per host, of that name, for any host (as sessions begun before the host was kept).
impl<'a> From<&'a str> for IssuedIn<'a> {
    fn from(name: &'a str) -> Self {
        Self {
            name,
            domain: None,
            host: None,
        }
    }
}

impl Session {
    fn new(mut stored: Stored) -> Self {
        let id_token = match (stored.id_token, stored.identity.id_token.take()) {
            (Some(sealed), _) => Some(IdToken::Sealed(sealed)),
            (None, plain) => plain.map(IdToken::Plain),
        };
        Self {
            cookie: stored.cookie,
            cookie_domain: stored.cookie_domain,
            host: stored.host,
            id_token,
            identity: Arc::new(stored.identity),
            last_seen: AtomicU64::new(stored.last_seen),
            stored_seen: AtomicU64::new(stored.last_seen),
            refresh: stored.refresh.map(|state| Refreshing {
                turn: tokio::sync::Mutex::new(()),
                state: std::sync::Mutex::new(state),
            }),
        }
    }

    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    pub fn touch(&self, now: u64) {
        // Only ever moves forward; a coarse store keeps the cache line quiet.
        if self.last_seen() + 5 <= now {
            self.last_seen.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Whether the session may be used at `now`.
    pub fn is_live(&self, now: u64, idle_timeout: u64) -> bool {
        now < self.identity.expires && now < self.last_seen().saturating_add(idle_timeout)
    }

    /// Whether the session vouches for its person at `now` under the sign-in configuration
    /// as it is now, not as it was at sign-in: it is live, no older than `session_lifetime`
    /// (which a reload may have shortened), from the configured provider (a reload that
    /// moves to another one, say off a compromised one, ends the old one's sessions), and
    /// issued in a cookie of the configured name (browsers keep sending the old name's, which
    /// upstreams are then sent: renamed, sessions end rather than be worth something there)
    /// and domain (narrowed, or taken away, after a host under it was found reading its
    /// visitors' cookies: the ids it read are worth nothing).
    pub fn vouches(&self, now: u64, oidc: &OidcConfig) -> bool {
        let domain = oidc.cookie_domain.as_deref().unwrap_or_default();
        self.cookie
            .as_deref()
            .is_none_or(|name| name == oidc.cookie_name)
            && (self.cookie_domain.as_deref()).is_none_or(|issued| issued == domain)
            && self.holds_under(now, oidc, 0)
    }

    /// Whether the session's cookie is one `host` may present: with a cookie per host, only the
    /// host it was issued on. Its id read anywhere else (a sign-in code a host's page caught
    /// and finished in another browser, a cookie a host's upstream was sent in error) is
    /// worth nothing on the other hosts.
    pub fn issued_on(&self, host: &str) -> bool {
        self.host.as_deref().is_none_or(|issued| issued == host)
    }

    /// Whether the session is of `oidc`'s provider, no older than its `session_lifetime`, and
    /// used within its `session_idle_timeout` plus `idle_margin` seconds: what
    /// [`Session::vouches`] judges, bar the cookie's name and domain (changed back, or on a
    /// replica not changed yet, a session in the old one vouches again).
    fn holds_under(&self, now: u64, oidc: &OidcConfig, idle_margin: u64) -> bool {
        let lifetime = oidc.session_lifetime.as_secs();
        let idle = oidc.session_idle_timeout.as_secs();
        self.identity.issuer == oidc.issuer
            && now < self.identity.created.saturating_add(lifetime)
            && self.is_live(now, idle.saturating_add(idle_margin))
    }

    /// The store says the session was used at `seen` (here or on another replica).
    fn seen(&self, seen: u64) {
        self.last_seen.fetch_max(seen, Ordering::Relaxed);
        self.stored_seen.fetch_max(seen, Ordering::Relaxed);
    }

    /// The ID token this session (whose id is `id`) began with, if the IdP gave one and it
    /// opens under `id`.
    pub fn id_token(&self, id: &str) -> Option<String> {
        match self.id_token.as_ref()? {
            IdToken::Plain(token) => Some(token.clone()),
            IdToken::Sealed(sealed) => {
                let plain = id_token_sealer(id).open(ID_TOKEN, sealed)?;
                String::from_utf8(plain).ok()
            }
        }
    }
}

impl std::fmt::Debug for IdToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdToken(not shown)")
    }
}

/// A session's refresh with the IdP: its state, and a turn, so that one request at a time
/// refreshes it here.
#[derive(Debug)]
pub struct Refreshing {
    pub turn: tokio::sync::Mutex<()>,
    state: std::sync::Mutex<Refresh>,
}

impl Refreshing {
    pub fn state(&self) -> Refresh {
        lock(&self.state).clone()
    }

    /// When the next refresh is due (unix seconds), read without copying the state.
    pub fn due(&self) -> u64 {
        lock(&self.state).due
    }

    /// Takes `refresh` unless it is older than the state held (a late or replayed write): a
    /// refresh token the IdP has rotated away never comes back.
    fn set(&self, refresh: Refresh) {
        let mut state = lock(&self.state);
        if refresh.due >= state.due {
            *state = refresh;
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are replaced whole: a panic elsewhere leaves them consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A session as it is created. It never changes after that: when it was last used and its
/// refresh state are entries of their own ([`SESSION_SEEN`], [`SESSION_REFRESH`]), so that
/// writing one never brings back a session that ended meanwhile, nor an older refresh token.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    identity: Identity,
    last_seen: u64,
    #[serde(default)]
    refresh: Option<Refresh>,
    /// `[oidc] cookie_name` when it began; absent from sessions begun before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
    /// `[oidc] cookie_domain` when it began, `""` for none; absent from sessions begun before
    /// it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie_domain: Option<String>,
    /// With a cookie per host (`cookie_domain` `""`), that host; absent from sessions begun
    /// before it was kept, and with a `cookie_domain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    /// The ID token, sealed (see [`IdToken::Sealed`]); sessions begun before it was sealed
    /// keep it in `identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

fn entry(kind: &str, key: &SessionKey, value: Option<String>) -> Entry {
    Entry {
        kind: kind.to_owned(),
        key: URL_SAFE_NO_PAD.encode(key),
        value,
    }
}

fn encode(value: &impl Serialize) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

/// Forgets a session and its parts.
fn forget(key: &SessionKey) -> [Entry; 3] {
    [SESSION, SESSION_SEEN, SESSION_REFRESH].map(|kind| entry(kind, key, None))
}

fn key_of(id: &str) -> SessionKey {
    Sha256::digest(id.as_bytes()).into()
}

/// A [`LOGOUT_TOKEN`]'s key: the SHA-256 of its issuer and `jti` (URL-safe base64).
fn logout_token_key(issuer: &str, jti: &str) -> String {
    let digest = Sha256::new()
        .chain_update(issuer.as_bytes())
        .chain_update([0])
        .chain_update(jti.as_bytes())
        .finalize();
    URL_SAFE_NO_PAD.encode(digest)
}

/// What a back-channel logout signed out, kept (as a [`LOGOUT_TOKEN`] entry) for as long as a
/// sign-in begun before it may be finishing: as [`crate::auth::oidc::LoggedOut::ends`] reads
/// it, the IdP session `sid`, every session of the subject `sub` (a token without `sid`), or
/// the subject's sessions that have no `sid` (a token with both).
#[derive(Clone, Copy)]
enum SignedOut {
    Sid = 1,
    Subject = 2,
    SubjectWithoutSid = 3,
}

/// The key of the [`LOGOUT_TOKEN`] entry that keeps `value` of `issuer` signed out as `what`:
/// the SHA-256 of the issuer, `what` and the value (apart from any `jti`'s).
fn signed_out_key(issuer: &str, what: SignedOut, value: &str) -> String {
    let digest = Sha256::new()
        .chain_update(issuer.as_bytes())
        .chain_update([what as u8])
        .chain_update(value.as_bytes())
        .finalize();
    URL_SAFE_NO_PAD.encode(digest)
}

/// What Portcullis keeps beside the directory, held in memory and kept current by the
/// directory's writer (it is the directory's [`EntrySink`], and only its thread calls it):
/// every session, the keys that seal sign-ins in progress, and (with a shared store) the
/// identity-assertion keys.
#[derive(Default)]
pub struct Kept {
    /// Keyed by the SHA-256 of the cookie: foldhash, not SipHash, for the map's own hash (a
    /// lookup never inserts, and only Portcullis makes the tokens of what is in it).
    sessions: DashMap<SessionKey, Arc<Session>, foldhash::fast::RandomState>,
    /// Parts of sessions that had ended when they were written: forgotten by the next
    /// [`Sessions::maintain`].
    orphans: std::sync::Mutex<HashSet<(String, String)>>,
    /// Sessions taken out of memory by [`Sessions::end`] whose end the store has not applied
    /// yet, with how many ends are writing it: found by the ends that come meanwhile (a second
    /// sign-out writes its own end, which holds if the first's fails), and put back if every
    /// end's write fails, so that a retry finds them.
    ending: DashMap<SessionKey, (Arc<Session>, usize)>,
    /// How many sessions were put back from `ending` (see [`Sessions::find`]).
    put_back: AtomicU64,
    /// How many times sessions were ended, for those who act on it (open connections).
    ended: Watched,
    /// The names of the cookies sessions held here were issued in (`[oidc] cookie_name` then,
    /// on any replica): an earlier name's cookie still holds a session id, which a rename back
    /// (or a replica not renamed yet) takes, so it is never sent upstream either. Only grows.
    cookie_names: ArcSwap<Vec<Box<str>>>,
    /// The [`LOGOUT_TOKEN`]s used, by key, with the second until which each is kept.
    logout_tokens: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Sign-in as configured now ([`Sessions::configured`]): a sign-in that began under
    /// another is judged again under it once its session is held.
    sign_in: arc_swap::ArcSwapOption<OidcConfig>,
    /// By name; the first one seals (so every replica seals with the same key).
    sealing: ArcSwap<Vec<(String, Arc<Sealer>)>>,
    /// The shared identity-assertion keys, `(kid, text)` (see [`crate::assertion`]), and who
    /// is told when they change.
    assertion_keys: ArcSwap<Vec<(String, String)>>,
    assertion_keys_changed: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Kept {
    /// The key new sign-ins are sealed with, and every key one may have been sealed with.
    pub fn sealers(&self) -> Arc<Vec<(String, Arc<Sealer>)>> {
        self.sealing.load_full()
    }

    /// The shared assertion keys, `(kid, text)`.
    pub fn assertion_keys(&self) -> Arc<Vec<(String, String)>> {
        self.assertion_keys.load_full()
    }

    /// Calls `changed` whenever the assertion keys change (once: the first caller is the one).
    pub fn on_assertion_keys(&self, changed: Box<dyn Fn() + Send + Sync>) {
        let _ = self.assertion_keys_changed.set(changed);
    }

    fn assertion_keys_changed(&self) {
        if let Some(changed) = self.assertion_keys_changed.get() {
            changed();
        }
    }

    /// Notes that sessions are (or were) issued in a cookie named `name`: by the writer for
    /// each session held, and for the configured name at start and at each reload (sessions
    /// stored before the name was kept vouch in any).
    fn note_cookie_name(&self, name: Option<&str>) {
        let Some(name) = name else { return };
        if self
            .cookie_names
            .load()
            .iter()
            .any(|known| &**known == name)
        {
            return;
        }
        self.cookie_names.rcu(|names| {
            let mut more = Vec::clone(names);
            if !more.iter().any(|known| &**known == name) {
                more.push(name.into());
            }
            more
        });
    }

    /// Applies one entry (not a key); returns whether it ended a session.
    fn keep(&self, entry: &Entry) -> bool {
        if entry.kind == LOGOUT_TOKEN {
            let mut used = lock(&self.logout_tokens);
            match entry.value.as_deref().map(str::parse) {
                Some(Ok(until)) => used.insert(entry.key.clone(), until),
                _ => used.remove(&entry.key),
            };
            return false;
        }
        let Some(key) = parse_key(&entry.key) else {
            return false;
        };
        // Or being ended: its use and refresh stay with it, should the end fail.
        let held = || {
            (self.sessions.get(&key).map(|s| s.clone()))
                .or_else(|| self.ending.get(&key).map(|e| e.0.clone()))
        };
        match (entry.kind.as_str(), entry.value.as_deref()) {
            (SESSION, Some(value)) => {
                // A record this build cannot read is treated as signed out.
                if let Ok(stored) = serde_json::from_str::<Stored>(value) {
                    self.note_cookie_name(stored.cookie.as_deref());
                    self.sessions
                        .entry(key)
                        .or_insert_with(|| Arc::new(Session::new(stored)));
                }
                false
            }
            (SESSION, None) => {
                // With its entry among those being ended held, as an end takes it: an end
                // that comes meanwhile finds it in one table or gone from both.
                let ending = self.ending.entry(key);
                let ended = self.sessions.remove(&key).is_some();
                if let dashmap::Entry::Occupied(ending) = ending {
                    ending.remove();
                }
                ended
            }
            (SESSION_SEEN, Some(value)) => {
                match (held(), value.parse()) {
                    (Some(session), Ok(seen)) => session.seen(seen),
                    _ => self.orphan(entry),
                }
                false
            }
            (SESSION_REFRESH, Some(value)) => {
                let refresh = serde_json::from_str::<Refresh>(value).ok();
                match (held(), refresh) {
                    (Some(session), Some(refresh)) => match &session.refresh {
                        Some(refreshing) => refreshing.set(refresh),
                        None => self.orphan(entry),
                    },
                    _ => self.orphan(entry),
                }
                false
            }
            (SESSION_SEEN | SESSION_REFRESH, None) => {
                lock(&self.orphans).remove(&(entry.kind.clone(), entry.key.clone()));
                false
            }
            _ => false,
        }
    }

    fn orphan(&self, entry: &Entry) {
        lock(&self.orphans).insert((entry.kind.clone(), entry.key.clone()));
    }

    fn keep_assertion_key(keys: &mut Vec<(String, String)>, entry: &Entry) {
        keys.retain(|(kid, _)| *kid != entry.key);
        if let Some(text) = &entry.value {
            keys.push((entry.key.clone(), text.clone()));
        }
    }

    fn keep_sealing_key(keys: &mut Vec<(String, Arc<Sealer>)>, entry: &Entry) {
        keys.retain(|(name, _)| *name != entry.key);
        if let Some(sealer) = entry.value.as_deref().and_then(Sealer::from_encoded_key) {
            keys.push((entry.key.clone(), Arc::new(sealer)));
            keys.sort_by(|a, b| a.0.cmp(&b.0));
        }
    }

    fn ended(&self) {
        self.ended.bump();
    }
}

fn parse_key(name: &str) -> Option<SessionKey> {
    URL_SAFE_NO_PAD.decode(name).ok()?.try_into().ok()
}

impl EntrySink for Kept {
    fn load(&self, entries: Vec<Entry>) {
        let mut sealing = Vec::new();
        for entry in entries.iter().filter(|e| e.kind == SEALING_KEY) {
            Self::keep_sealing_key(&mut sealing, entry);
        }
        self.sealing.store(Arc::new(sealing));
        let mut assertion_keys = Vec::new();
        for entry in entries.iter().filter(|e| e.kind == ASSERTION_KEY) {
            Self::keep_assertion_key(&mut assertion_keys, entry);
        }
        self.assertion_keys.store(Arc::new(assertion_keys));
        self.assertion_keys_changed();
        // Sessions first, then their parts. Sessions held all along keep their state and
        // stay usable throughout; those no longer stored are gone, and not put back by an
        // end whose write fails after this.
        let mut stored = HashSet::new();
        for entry in entries.iter().filter(|e| e.kind == SESSION) {
            let Some(key) = parse_key(&entry.key) else {
                continue;
            };
            // One an end has taken out of memory stays out: it lets no one in meanwhile.
            if let dashmap::Entry::Vacant(_held) = self.ending.entry(key) {
                self.keep(entry);
            }
            stored.insert(key);
        }
        self.ending.retain(|key, _| stored.contains(key));
        let mut removed = 0;
        self.sessions.retain(|key, _| {
            let kept = stored.contains(key);
            removed += usize::from(!kept);
            kept
        });
        lock(&self.orphans).clear();
        for entry in entries
            .iter()
            .filter(|e| e.kind == SESSION_SEEN || e.kind == SESSION_REFRESH)
        {
            self.keep(entry);
        }
        // Made whole, then swapped in: a logout token checked meanwhile is never missed.
        let used = entries
            .iter()
            .filter(|e| e.kind == LOGOUT_TOKEN)
            .filter_map(|e| Some((e.key.clone(), e.value.as_deref()?.parse().ok()?)))
            .collect();
        *lock(&self.logout_tokens) = used;
        if removed > 0 {
            self.ended();
        }
    }

    fn apply(&self, entries: &[Entry]) {
        let (mut ended, mut assertion_keys) = (false, false);
        for entry in entries {
            if entry.kind == SEALING_KEY {
                let mut keys = Vec::clone(&self.sealing.load());
                Self::keep_sealing_key(&mut keys, entry);
                self.sealing.store(Arc::new(keys));
            } else if entry.kind == ASSERTION_KEY {
                let mut keys = Vec::clone(&self.assertion_keys.load());
                Self::keep_assertion_key(&mut keys, entry);
                self.assertion_keys.store(Arc::new(keys));
                assertion_keys = true;
            } else {
                ended |= self.keep(entry);
            }
        }
        // Once per batch: a rotation and the retirements it brings are seen together.
        if assertion_keys {
            self.assertion_keys_changed();
        }
        if ended {
            self.ended();
        }
    }
}

/// Sessions [`Sessions::take`]n out of memory, their end still to be written.
#[must_use = "the end is still to be written (`Sessions::write_end`)"]
pub struct Taken(Vec<SessionKey>);

/// The sessions, over what [`Kept`] holds and the directory that stores them. A clone is
/// another handle on the same sessions.
#[derive(Clone)]
pub struct Sessions {
    kept: Arc<Kept>,
    directory: Arc<Directory>,
}

impl Sessions {
    pub fn new(kept: Arc<Kept>, directory: Arc<Directory>) -> Self {
        Self { kept, directory }
    }

    /// Sign-in is configured as `oidc` from now on: told before a reload's sessions that
    /// configuration does not hold are ended (so a session stored meanwhile is either among
    /// them or judged under it: see [`Sessions::holds_as_configured`]).
    pub fn configured(&self, oidc: Option<&OidcConfig>) {
        self.kept.sign_in.store(oidc.cloned().map(Arc::new));
    }

    /// Whether `session`, just stored, is held as sign-in is configured now: a reload to
    /// another provider (off a compromised one, say), or off sign-in, while it began ended the
    /// sessions held then, and a reload back would bring it back.
    pub fn holds_as_configured(&self, session: &Session, now: u64) -> bool {
        self.kept
            .sign_in
            .load_full()
            .is_some_and(|oidc| self.holds(session, now, &oidc))
    }

    /// Creates a session for `identity`, in the cookie `cookie`; returns the id for the
    /// cookie. Durable on return, and known to every replica.
    pub async fn create<'a>(
        &self,
        mut identity: Identity,
        refresh: Option<Refresh>,
        cookie: impl Into<IssuedIn<'a>>,
        now: u64,
    ) -> Result<String, String> {
        let cookie = cookie.into();
        let mut raw = [0u8; ID_BYTES];
        rand::rng().fill_bytes(&mut raw);
        let id = URL_SAFE_NO_PAD.encode(raw);
        let id_token = identity
            .id_token
            .take()
            .map(|token| id_token_sealer(&id).seal(ID_TOKEN, token.as_bytes()));
        let stored = Stored {
            identity,
            last_seen: now,
            refresh: refresh.map(|r| r.sealed_for(&id)),
            cookie: Some(cookie.name.to_owned()),
            cookie_domain: Some(cookie.domain.unwrap_or_default().to_owned()),
            host: cookie
                .host
                .filter(|_| cookie.domain.is_none())
                .map(str::to_owned),
            id_token,
        };
        let value = encode(&stored)?;
        put(
            &self.directory,
            vec![entry(SESSION, &key_of(&id), Some(value))],
        )
        .await?;
        Ok(id)
    }

    /// A refresh with the IdP renewed the session `id` (`key`): its new state holds here at
    /// once, and is stored (for every replica) in the background, so the request that
    /// refreshed does not wait for the store.
    pub fn refreshed(&self, id: &str, key: &SessionKey, refreshing: &Refreshing, refresh: Refresh) {
        let refresh = refresh.sealed_for(id);
        let value = encode(&refresh);
        refreshing.set(refresh);
        let directory = self.directory.clone();
        let key = *key;
        tokio::spawn(async move {
            let saved = match value {
                Ok(value) => put(&directory, vec![entry(SESSION_REFRESH, &key, Some(value))]).await,
                Err(e) => Err(e),
            };
            if let Err(e) = saved {
                tracing::warn!("cannot save the refreshed session: {e}");
            }
        });
    }

    /// The session a cookie value names, if any. Malformed values are simply "no session":
    /// only the length is checked, since any other value of it hashes to a key no session has.
    pub fn get(&self, id: &str) -> Option<(SessionKey, Arc<Session>)> {
        if id.len() != 43 {
            return None;
        }
        let key = key_of(id);
        self.kept.sessions.get(&key).map(|s| (key, s.clone()))
    }

    /// [`Sessions::get`], and also a session another end is ending (it lets no one in, but
    /// that end's write may fail): to be ended.
    pub fn get_to_end(&self, id: &str) -> Option<(SessionKey, Arc<Session>)> {
        // No session's id is of another length: not hashed (a sign-out may carry thousands).
        if id.len() != 43 {
            return None;
        }
        // Its entry among those being ended held, as an end moves it: in one table or the
        // other, never missed between the two.
        let key = key_of(id);
        match self.kept.ending.entry(key) {
            dashmap::Entry::Occupied(ending) => Some((key, ending.get().0.clone())),
            dashmap::Entry::Vacant(_) => self.get(id),
        }
    }

    /// [`Session::vouches`] for the session `key`, if held.
    pub fn vouches(&self, key: &SessionKey, now: u64, oidc: &OidcConfig) -> bool {
        self.kept
            .sessions
            .get(key)
            .is_some_and(|session| session.vouches(now, oidc))
    }

    /// Counts the times sessions were ended.
    pub fn ends(&self) -> u64 {
        self.kept.ended.get()
    }

    /// Wakes whenever sessions are ended.
    pub fn subscribe_ends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.kept.ended.subscribe()
    }

    /// Ends the sessions for which `matches` is true. Durable on return.
    pub async fn end_where(&self, matches: impl Fn(&Identity) -> bool) -> Result<usize, String> {
        let keys: Vec<SessionKey> = self.find(matches).into_iter().map(|(key, _)| key).collect();
        self.end(&keys).await?;
        Ok(keys.len())
    }

    /// Ends the sessions [`Sessions::not_held`] names. Returns how many were ended.
    pub async fn end_not_held(
        &self,
        now: u64,
        before: &OidcConfig,
        after: Option<&OidcConfig>,
    ) -> Result<usize, String> {
        let keys = self.not_held(now, before, after);
        self.end(&keys).await?;
        Ok(keys.len())
    }

    /// Whether sign-in as configured by `oidc` holds `session` at `now`: of its provider, within
    /// its lifetime and idle timeout (with a shared store, plus [`SHARED_USE_LATE_BY`]: its use
    /// on another replica may reach this one that late).
    pub fn holds(&self, session: &Session, now: u64, oidc: &OidcConfig) -> bool {
        let margin = if self.directory.is_shared() {
            SHARED_USE_LATE_BY
        } else {
            0
        };
        session.holds_under(now, oidc, margin)
    }

    /// The sessions that sign-in as configured `before` a reload did not hold (past its
    /// lifetime, idle, another provider's) or as configured `after` it does not (`None`:
    /// sign-in is off), to be ended so that no change brings back a session another had
    /// ended: a lifetime shortened after an incident and lengthened again, an idle timeout
    /// raised, a move to another provider and back. With a shared store a session's use on
    /// another replica reaches this one up to [`SHARED_USE_LATE_BY`] late, and idleness is
    /// judged with that margin.
    pub fn not_held(
        &self,
        now: u64,
        before: &OidcConfig,
        after: Option<&OidcConfig>,
    ) -> Vec<SessionKey> {
        (self.kept.sessions.iter())
            .filter(|held| {
                // By the configuration before, only the sessions of its provider: with a shared
                // store, a replica reloaded later than others (a rolling change) holds sessions
                // they began with the new provider, which its old configuration never held.
                let session = held.value();
                let of_before = session.identity.issuer == before.issuer;
                (of_before && !self.holds(session, now, before))
                    || after.is_none_or(|after| !self.holds(session, now, after))
            })
            .map(|held| *held.key())
            .collect()
    }

    /// Whose sessions among `keys` ([`Sessions::not_held`] by a reload from `before` to
    /// `after`) the reload ends, as the audit log names them, and why, each once. A session
    /// `before` already did not hold (idled out or past its lifetime, not yet swept) ended by
    /// itself, and is not named.
    pub fn ended_by_reload(
        &self,
        keys: &[SessionKey],
        now: u64,
        before: &OidcConfig,
        after: Option<&OidcConfig>,
    ) -> Vec<(String, &'static str)> {
        let mut ended: Vec<(String, &'static str)> = (keys.iter())
            .filter_map(|key| self.kept.sessions.get(key))
            .filter_map(|held| {
                let identity = &held.identity;
                let of_before = identity.issuer == before.issuer;
                let why = match after {
                    _ if of_before && !self.holds(&held, now, before) => return None,
                    None => "sign-in was turned off",
                    Some(after) if identity.issuer != after.issuer => {
                        "sign-in moved to another provider"
                    }
                    Some(_) => "past the session lifetime or idle timeout a reload set",
                };
                Some((crate::caller::Principal::Person(identity).log_name(), why))
            })
            .collect();
        ended.sort();
        ended.dedup();
        ended
    }

    /// Ends the sessions of `newest`'s person (its issuer and subject) but the newest `keep`,
    /// `newest` (just made, under the id `id`) among them: someone who signs in again and
    /// again (a script with an IdP account) cannot fill every replica's memory and the store.
    /// Sessions begun in the same second are ended only past `keep` more, so two sign-ins that
    /// finish at once never end each other's, and callbacks saved up and sent at once (codes
    /// collected, then redeemed in one second) leave at most twice `keep`. Returns how many
    /// were ended.
    pub async fn end_all_but_newest(
        &self,
        newest: &Identity,
        id: &str,
        keep: usize,
    ) -> Result<usize, String> {
        let mut theirs = self.find(|i| i.issuer == newest.issuer && i.subject == newest.subject);
        // Those another end is ending are not counted: they are going.
        theirs.retain(|(k, _)| !self.kept.ending.contains_key(k));
        if theirs.len() <= keep {
            return Ok(0);
        }
        let key = key_of(id);
        theirs.retain(|(k, _)| *k != key);
        theirs.sort_by_key(|(_, s)| std::cmp::Reverse(s.identity.created));
        let mut at_once = 0;
        let older: Vec<SessionKey> = theirs
            .iter()
            .skip(keep.saturating_sub(1))
            .filter(|(_, s)| {
                let earlier = s.identity.created < newest.created;
                at_once += usize::from(!earlier);
                earlier || at_once > keep
            })
            .map(|(k, _)| *k)
            .collect();
        self.end(&older).await?;
        Ok(older.len())
    }

    /// The sessions held here for which `matches` is true, those another end is ending
    /// included (to be ended too: that end's write may fail).
    pub fn find(&self, matches: impl Fn(&Identity) -> bool) -> Vec<(SessionKey, Arc<Session>)> {
        // Those being ended read before and after the others: one put back meanwhile is found
        // by the second reading, one taken out by the third; one taken out and put back while
        // the others are read may be missed by all three, and then they are read again.
        let mut found = Vec::new();
        let ending = |found: &mut Vec<_>| {
            let ending = self.kept.ending.iter();
            found.extend(
                (ending.filter(|entry| matches(&entry.value().0.identity)))
                    .map(|entry| (*entry.key(), entry.value().0.clone())),
            );
        };
        for _ in 0..4 {
            found.clear();
            let put_back = self.kept.put_back.load(Ordering::SeqCst);
            ending(&mut found);
            let held = self.kept.sessions.iter();
            found.extend(
                (held.filter(|entry| matches(&entry.value().identity)))
                    .map(|entry| (*entry.key(), entry.value().clone())),
            );
            ending(&mut found);
            if self.kept.put_back.load(Ordering::SeqCst) == put_back {
                break;
            }
        }
        found.sort_unstable_by_key(|(key, _)| *key);
        found.dedup_by_key(|(key, _)| *key);
        found
    }

    /// Ends the given sessions: gone from this replica's memory first (so no request is served
    /// by them here from this moment), then from the store and every other replica (or, where
    /// their progress cannot be read, once the store is read holding it: see
    /// [`Sessions::write_end`]).
    ///
    /// If the store refuses, the sessions are put back here (unless another end reached them
    /// meanwhile): not ended anywhere, they must still be found by a retry.
    pub async fn end(&self, keys: &[SessionKey]) -> Result<(), String> {
        self.end_with(keys, Vec::new()).await
    }

    /// [`Sessions::end`], keeping `entries` in the same write.
    async fn end_with(&self, keys: &[SessionKey], entries: Vec<Entry>) -> Result<(), String> {
        if keys.is_empty() && entries.is_empty() {
            return Ok(());
        }
        let taken = self.take(keys);
        let written = self.write_end(keys, taken, entries).await;
        written.map_err(|(e, taken)| {
            self.put_back(taken);
            e
        })
    }

    /// [`Sessions::end`] begun now, before anything awaits: from the moment this returns, no
    /// request is served by these sessions here. The end is written by [`Sessions::write_end`].
    pub fn take(&self, keys: &[SessionKey]) -> Taken {
        // Moved (or counted) while `ending`'s entry is held, as it is put back: another end
        // finds it in one map or the other, never in neither. (`ending` before `sessions`,
        // always; nothing holds the two in the other order.)
        let mut taken = Vec::new();
        for key in keys {
            let counted = match self.kept.ending.entry(*key) {
                dashmap::Entry::Occupied(mut ending) => {
                    ending.get_mut().1 += 1;
                    self.kept.sessions.remove(key);
                    true
                }
                dashmap::Entry::Vacant(ending) => match self.kept.sessions.remove(key) {
                    Some((_, session)) => {
                        ending.insert((session, 1));
                        true
                    }
                    None => false,
                },
            };
            if counted {
                taken.push(*key);
            }
        }
        if !keys.is_empty() {
            self.kept.ended();
        }
        Taken(taken)
    }

    /// [`Sessions::take`] of the session `id` only where no other end is taking it: this end
    /// is then the one that ends it (and records it).
    pub fn take_held(&self, id: &str) -> Option<(SessionKey, Taken)> {
        let key = key_of(id);
        // `ending` before `sessions`, as `take` holds them.
        let taken = match self.kept.ending.entry(key) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(ending) => {
                let (_, session) = self.kept.sessions.remove(&key)?;
                ending.insert((session, 1));
                Some((key, Taken(vec![key])))
            }
        };
        if taken.is_some() {
            self.kept.ended();
        }
        taken
    }

    /// Ends the sessions `keys` for good, whatever another end does meanwhile: out of memory
    /// here at once, and returns once their end is written. If the store refuses that first
    /// write, it returns, and the end is tried again in the background
    /// ([`Sessions::write_end_until_it_holds`], which logs it): they let nobody in here
    /// meanwhile, but other replicas may not have their end yet.
    pub async fn end_for_good(&self, keys: &[SessionKey], what: String) {
        if keys.is_empty() {
            return;
        }
        let taken = self.take(keys);
        if let Err((e, taken)) = self.write_end(keys, taken, Vec::new()).await {
            tracing::error!("cannot end {what} (they let nobody in here meanwhile): {e}");
            self.write_end_until_it_holds(keys.to_vec(), taken, what, || {});
        }
    }

    /// Writes the end of the sessions `keys`, [`Sessions::take`]n, until the store takes it: at
    /// once, then again after a second, doubling up to a minute. They stay out of memory here
    /// meanwhile (put back, they would let in again; with a shared store nothing else ends
    /// them). `done` runs once it is written; `what` names them in the log.
    pub fn write_end_until_it_holds(
        &self,
        keys: Vec<SessionKey>,
        taken: Taken,
        what: String,
        done: impl FnOnce() + Send + 'static,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // (Every caller runs on a runtime.) Out of memory here, they let nobody in.
            tracing::error!("cannot end {what}: no runtime to write it on");
            return;
        };
        let sessions = self.clone();
        runtime.spawn(async move {
            let (mut taken, mut pause) = (taken, std::time::Duration::from_secs(1));
            loop {
                match sessions.write_end(&keys, taken, Vec::new()).await {
                    Ok(()) => return done(),
                    Err((e, back)) => {
                        taken = back;
                        tracing::error!(
                            "cannot end {what} (they let nobody in here meanwhile); trying again \
                             in {pause:?}: {e}"
                        );
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(60));
            }
        });
    }

    /// Writes the end of the sessions `keys`, [`Sessions::take`]n, with `entries`. If the store
    /// refuses, they are still out of memory here, [`Sessions::put_back`] or to be written again.
    /// An end the store holds, though the other replicas' progress could not be read, is
    /// written: a retry by its requester would find it made (the sessions ended, a logout token
    /// used), and those replicas have it as soon as they read the store.
    pub async fn write_end(
        &self,
        keys: &[SessionKey],
        taken: Taken,
        entries: Vec<Entry>,
    ) -> Result<(), (String, Taken)> {
        let written = keys.iter().flat_map(forget).chain(entries).collect();
        match self.directory.write(Command::Put(written), ACTOR).await {
            Ok(_) => Ok(()),
            Err(e) if e.saved() => {
                tracing::warn!("an end of sessions is saved, not confirmed by every replica");
                Ok(())
            }
            Err(e) => Err((e.detail, taken)),
        }
    }

    /// Puts back sessions whose end the store refused: not ended anywhere, they must still be
    /// found by a retry. Put back by the last end whose write fails (unless one whose write
    /// held, or a reading anew of the store, took it out of `ending` meanwhile).
    fn put_back(&self, Taken(taken): Taken) {
        for key in taken {
            if let dashmap::Entry::Occupied(mut ending) = self.kept.ending.entry(key) {
                ending.get_mut().1 -= 1;
                if ending.get().1 == 0 {
                    self.kept.sessions.insert(key, ending.get().0.clone());
                    self.kept.put_back.fetch_add(1, Ordering::SeqCst);
                    ending.remove();
                }
            }
        }
    }

    /// Whether a back-channel logout token of `issuer` with this `jti` was used, here or on
    /// another replica, and is still kept.
    pub fn logout_token_used(&self, issuer: &str, jti: &str) -> bool {
        lock(&self.kept.logout_tokens).contains_key(&logout_token_key(issuer, jti))
    }

    /// Whether a back-channel logout, here or on another replica, signed out `identity`'s
    /// session after its sign-in began (at `started`, Unix seconds) and before it was held here.
    /// With a shared store, the replica that began the sign-in may have a clock ahead of the
    /// one the logout came to: a sign-in begun within a minute after it counts as begun before.
    pub fn signed_out_by_idp(&self, identity: &Identity, started: u64) -> bool {
        let skew = if self.directory.is_shared() { 60 } else { 0 };
        let used = lock(&self.kept.logout_tokens);
        let logged_out = |what, value: &str| {
            used.get(&signed_out_key(&identity.issuer, what, value))
                .is_some_and(|until| started <= until.saturating_sub(PENDING_FOR) + skew)
        };
        let subject = &identity.subject;
        logged_out(SignedOut::Subject, subject)
            || match &identity.idp_session {
                Some(sid) => logged_out(SignedOut::Sid, sid),
                None => logged_out(SignedOut::SubjectWithoutSid, subject),
            }
    }

    /// Ends the sessions `keys` for `logout`, a back-channel logout token of `issuer`, and keeps
    /// the token as used until its `until` (Unix seconds), in one write. Whom it signed out is
    /// kept too (from `now`), as long as a sign-in begun before may take to finish: one
    /// finishing meanwhile was not among the sessions held here (see
    /// [`Sessions::signed_out_by_idp`]).
    pub async fn end_for_logout(
        &self,
        keys: &[SessionKey],
        issuer: &str,
        logout: &crate::auth::oidc::LoggedOut,
        now: u64,
    ) -> Result<(), String> {
        let kept = |key| Entry {
            kind: LOGOUT_TOKEN.to_owned(),
            key,
            value: Some(now.saturating_add(PENDING_FOR).to_string()),
        };
        let mut used = vec![Entry {
            kind: LOGOUT_TOKEN.to_owned(),
            key: logout_token_key(issuer, &logout.jti),
            value: Some(logout.until.to_string()),
        }];
        match (&logout.sid, &logout.sub) {
            (Some(sid), sub) => {
                used.push(kept(signed_out_key(issuer, SignedOut::Sid, sid)));
                if let Some(sub) = sub {
                    let what = SignedOut::SubjectWithoutSid;
                    used.push(kept(signed_out_key(issuer, what, sub)));
                }
            }
            (None, Some(sub)) => used.push(kept(signed_out_key(issuer, SignedOut::Subject, sub))),
            (None, None) => {}
        }
        self.end_with(keys, used).await
    }

    /// Whether the refresh of session `id` that the refresh token `used` was refused for has
    /// been done by another replica (on a shared store only). The IdP refuses a rotated token
    /// it has just renewed, and that must not end the session. The other replica had the
    /// IdP's answer before this one was refused: its write is waited for a moment
    /// ([`REFRESH_WRITE`]), then the store is read, as this replica may lag behind it (up to
    /// its `max_staleness`). A refusal with no refresh elsewhere (the IdP ended the grant)
    /// costs that moment and one read; a store that cannot be read within another second
    /// leaves the IdP's refusal standing. (The same token sealed again is no new one: each
    /// seal differs.)
    pub async fn refreshed_elsewhere(&self, id: &str, refreshing: &Refreshing, used: &str) -> bool {
        let renewed = || {
            let now = refreshing.state().opened(id);
            now.is_some_and(|now| now.refresh_token != used)
        };
        if renewed() || !self.directory.is_shared() {
            return renewed();
        }
        let deadline = std::time::Instant::now() + REFRESH_WRITE;
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if renewed() {
                return true;
            }
        }
        // Unread, nothing says another replica renewed: the IdP's refusal stands (at worst,
        // someone signs in again).
        if let Err(why) = self.catch_up().await {
            tracing::warn!("cannot read the shared store for a refused refresh: {why}");
        }
        renewed()
    }

    /// Reads what other replicas have written to the shared store since this one last did
    /// (a session another replica refreshed, say); at once on an embedded store. Gives up
    /// after a second, saying why.
    pub async fn catch_up(&self) -> Result<(), String> {
        if !self.directory.is_shared() {
            return Ok(());
        }
        let directory = self.directory.clone();
        let read = tokio::task::spawn_blocking(move || directory.catch_up());
        match tokio::time::timeout(REFRESH_WRITE, read).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("it did not answer within a second".to_owned()),
        }
    }

    /// Keeps `entries` of kinds other than sessions (keys), as given.
    pub async fn keep(&self, entries: Vec<Entry>) -> Result<(), String> {
        put(&self.directory, entries).await
    }

    /// Sessions are issued in a cookie named `name` (`[oidc] cookie_name`, now).
    pub fn issued_in(&self, name: &str) {
        self.kept.note_cookie_name(Some(name));
    }

    /// The names sessions held were issued in, the configured one's and earlier ones (see
    /// [`Kept`]'s `cookie_names`).
    pub fn cookie_names(&self) -> arc_swap::Guard<Arc<Vec<Box<str>>>> {
        self.kept.cookie_names.load()
    }

    /// Whether a key to seal sign-ins with is kept (sign-in needs one).
    pub fn can_seal(&self) -> bool {
        !self.kept.sealers().is_empty()
    }

    /// Keeps a first key to seal sign-ins with, unless one is kept already. Replicas that
    /// do this at once each keep one; all of them then seal with the same (the first by name)
    /// and open with any.
    pub async fn keep_sealing_key(&self) -> Result<bool, String> {
        if self.can_seal() {
            return Ok(false);
        }
        let mut name = [0u8; 16];
        rand::rng().fill_bytes(&mut name);
        let entry = Entry {
            kind: SEALING_KEY.to_owned(),
            key: URL_SAFE_NO_PAD.encode(name),
            value: Some(Sealer::generate_encoded_key()),
        };
        put(&self.directory, vec![entry]).await?;
        Ok(true)
    }

    /// Stores when sessions used here more than `every` seconds after the store last had it
    /// were last used, and forgets sessions that are over: past the lifetime they began with,
    /// or idle for `oidc`'s `session_idle_timeout` plus three times `every` (more than another
    /// replica's use can be late: its sweeps come every `every`, plus the time their writes
    /// take), and parts of sessions that had ended. On an embedded store it forgets instead
    /// those `oidc` does not hold (another provider's, past its lifetime, or idle past its
    /// timeout; every one when `None`, sign-in is off): a restart that shortened the lifetime,
    /// raised the idle timeout or moved sign-in off a provider must not have them come back.
    /// Returns how many sessions it wrote and forgot. Run it every `every` seconds ([`upkeep_every`]).
    pub async fn maintain(
        &self,
        now: u64,
        every: u64,
        oidc: Option<&OidcConfig>,
    ) -> Result<(usize, usize), String> {
        let margin = 3 * every;
        let idle = oidc.map_or(0, |oidc| oidc.session_idle_timeout.as_secs());
        let mut entries = Vec::new();
        let (mut touched, mut over) = (0, 0);
        for held in self.kept.sessions.iter() {
            let (key, session) = (held.key(), held.value());
            let last_seen = session.last_seen();
            // Not so with a shared store: the fleet's other replicas may still be configured
            // as before (a rolling change, or one replica's mistake), and would have their
            // sessions ended every few minutes. A reload ends them there (`end_not_held`).
            let ended = match oidc {
                _ if self.directory.is_shared() => {
                    !session.is_live(now, idle.saturating_add(margin))
                }
                // Used only here: the idle timeout holds to the second, so that a restart under
                // a longer one finds none that idled out while this process ran.
                Some(oidc) => !session.holds_under(now, oidc, 0),
                None => true,
            };
            if ended {
                over += 1;
                entries.extend(forget(key));
            } else if last_seen >= session.stored_seen.load(Ordering::Relaxed) + every {
                touched += 1;
                entries.push(entry(SESSION_SEEN, key, Some(last_seen.to_string())));
            }
        }
        let orphans: Vec<(String, String)> = lock(&self.kept.orphans).iter().cloned().collect();
        // With the margin sessions get: a replica whose clock is behind this one's still
        // refuses the token as long as it could take it.
        let spent: Vec<String> = lock(&self.kept.logout_tokens)
            .iter()
            .filter(|(_, until)| until.saturating_add(3 * every) < now)
            .map(|(key, _)| key.clone())
            .collect();
        entries.extend(spent.into_iter().map(|key| Entry {
            kind: LOGOUT_TOKEN.to_owned(),
            key,
            value: None,
        }));
        entries.extend(orphans.into_iter().map(|(kind, key)| Entry {
            kind,
            key,
            value: None,
        }));
        for chunk in entries.chunks(MAX_ENTRIES_PER_WRITE) {
            put(&self.directory, chunk.to_vec()).await?;
        }
        Ok((touched, over))
    }

    /// Stores when each session used here since the store last had it was last used, at once:
    /// at shutdown, so that a restart judges idleness from the last use, not from the last
    /// upkeep's write (up to twice its interval before). Returns how many it wrote.
    pub async fn store_last_use(&self) -> Result<usize, String> {
        let entries: Vec<Entry> = (self.kept.sessions.iter())
            .filter(|held| held.last_seen() > held.stored_seen.load(Ordering::Relaxed))
            .map(|held| entry(SESSION_SEEN, held.key(), Some(held.last_seen().to_string())))
            .collect();
        for chunk in entries.chunks(MAX_ENTRIES_PER_WRITE) {
            put(&self.directory, chunk.to_vec()).await?;
        }
        Ok(entries.len())
    }

    /// Moves the sessions of `data_dir/sessions.redb`, where sessions were kept before they
    /// moved beside the directory, into the directory, once: the file is renamed first, so
    /// a session ended after the move can never come back from it (if the move fails, its
    /// sessions are lost: their people sign in again), and removed once read, as it holds
    /// refresh tokens and ID tokens in the clear. Sessions past their lifetime at `now` are
    /// left behind, and so are those dated later than this directory has reached: of another
    /// directory's history (the embedded one moved aside, or left for PostgreSQL), they
    /// would outlive a deactivation here dated earlier.
    pub async fn import(&self, data_dir: &Path, now: u64) -> Result<usize, String> {
        let path = data_dir.join(OLD_FILE);
        let moved = data_dir.join(format!("{OLD_FILE}.imported"));
        let remove = |moved: &Path| match std::fs::remove_file(moved) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", moved.display()),
        };
        if !path.exists() {
            // Left by an import of an earlier version, or one cut short: read then, or lost.
            remove(&moved);
            return Ok(0);
        }
        std::fs::rename(&path, &moved)
            .map_err(|e| format!("cannot rename {}: {e}", path.display()))?;
        let read = moved.clone();
        let seq = self.directory.seq();
        let entries = tokio::task::spawn_blocking(move || read_old_sessions(&read, now, seq))
            .await
            .map_err(|e| e.to_string())??;
        remove(&moved);
        for chunk in entries.chunks(MAX_ENTRIES_PER_WRITE) {
            put(&self.directory, chunk.to_vec()).await?;
        }
        Ok(entries.len())
    }

    /// How many sessions are held here.
    pub fn count(&self) -> usize {
        self.kept.sessions.len()
    }
}

async fn put(directory: &Directory, entries: Vec<Entry>) -> Result<(), String> {
    directory
        .write(Command::Put(entries), ACTOR)
        .await
        .map(drop)
        .map_err(|e| e.detail)
}

/// The sessions in a `sessions.redb` of an older version that are live at `now` and dated no
/// later than the directory's change `seq`, as entries.
fn read_old_sessions(path: &Path, now: u64, seq: u64) -> Result<Vec<Entry>, String> {
    let db = Database::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
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
            if stored.identity.expires > now && stored.identity.directory_seq <= seq {
                entries.push(entry(SESSION, &key, Some(encode(&stored)?)));
            }
        }
    }
    Ok(entries)
}

/// How long another replica's write of a refresh it did is waited for: see
/// [`Sessions::refreshed_elsewhere`].
const REFRESH_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// How often session upkeep ([`Sessions::maintain`]) runs under an idle timeout of `idle`
/// seconds: an eighth of it, from 5 s to 5 minutes.
pub fn upkeep_every(idle: u64) -> u64 {
    (idle / 8).clamp(5, 300)
}

/// How late a session's use on one replica can reach the others through a shared store, at
/// most: three periods of the longest upkeep.
const SHARED_USE_LATE_BY: u64 = 3 * 300;

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
            groups_unlisted: Some(false),
            claims: Default::default(),
        }
    }

    /// A session for `identity` begun at `now` in the default cookie; its id.
    async fn begin(sessions: &Sessions, identity: Identity, now: u64) -> String {
        sessions
            .create(identity, None, "portcullis_session", now)
            .await
            .unwrap()
    }

    /// Sign-in with `issuer`, an idle timeout of `idle` seconds and the default lifetime.
    fn oidc(issuer: &str, idle: u64) -> OidcConfig {
        let mut oidc = crate::testing::config("").oidc.unwrap();
        oidc.issuer = issuer.to_owned();
        oidc.session_idle_timeout = std::time::Duration::from_secs(idle);
        oidc
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

    /// A store whose next commit, once `armed`, waits for `release` and then fails. Once
    /// `shared`, it is another replica's too, whose settles cannot read the others' progress
    /// once `unconfirmed` is armed: it is read holding the commit, or, once `unknown` is armed
    /// too, not.
    #[derive(Default)]
    struct Gated {
        inner: portcullis_scim::store::memory::MemoryStorage,
        armed: std::sync::atomic::AtomicBool,
        entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
        release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        shared: bool,
        unconfirmed: std::sync::atomic::AtomicBool,
        unknown: std::sync::atomic::AtomicBool,
    }

    impl portcullis_scim::store::Storage for Gated {
        fn load(
            &self,
            visit: &mut dyn FnMut(portcullis_scim::store::Loaded<'_>),
        ) -> Result<(u64, u64), portcullis_scim::store::StoreError> {
            self.inner.load(visit)
        }
        fn records(
            &self,
            rt: portcullis_scim::schema::ResourceType,
            rows: &[u64],
        ) -> Result<Vec<(u64, portcullis_scim::store::Record)>, portcullis_scim::store::StoreError>
        {
            self.inner.records(rt, rows)
        }
        fn commit(
            &self,
            batch: &portcullis_scim::store::Batch,
        ) -> Result<(), portcullis_scim::store::StoreError> {
            if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                if let Some(entered) = self.entered.lock().unwrap().take() {
                    let _ = entered.send(());
                }
                if let Some(release) = self.release.lock().unwrap().take() {
                    let _ = release.recv();
                }
                return Err(portcullis_scim::store::StoreError::Backend(
                    "refused".into(),
                ));
            }
            self.inner.commit(batch)
        }
        fn changes(
            &self,
            after: u64,
            limit: usize,
        ) -> Result<Vec<portcullis_scim::store::Change>, portcullis_scim::store::StoreError>
        {
            self.inner.changes(after, limit)
        }
        fn is_shared(&self) -> bool {
            self.shared
        }
        fn settle(
            &self,
            _seq: u64,
            _committed: std::time::Instant,
        ) -> Result<(), portcullis_scim::store::StoreError> {
            use portcullis_scim::store::StoreError;
            match (
                self.unconfirmed.load(Ordering::SeqCst),
                self.unknown.load(Ordering::SeqCst),
            ) {
                (false, _) => Ok(()),
                (true, false) => Err(StoreError::Backend("cannot read their progress".into())),
                (true, true) => Err(StoreError::Unsettled("cannot read anything".into())),
            }
        }
    }

    /// An end the store is read holding, though the other replicas' progress could not be read,
    /// is answered as written (a retry would find it made); one it may not hold is not.
    #[tokio::test]
    async fn an_end_saved_but_not_confirmed_is_written_and_one_perhaps_not_saved_is_not() {
        let store = Arc::new(Gated {
            shared: true,
            ..Gated::default()
        });
        let sessions = sessions_over(store.clone());
        let mut ids = Vec::new();
        for _ in 0..2 {
            let created = sessions.create(identity("alice", 10_000), None, "s", 100);
            ids.push(created.await.unwrap());
        }
        store.unconfirmed.store(true, Ordering::SeqCst);
        let (key, _) = sessions.get(&ids[0]).unwrap();
        assert_eq!(
            sessions.end(&[key]).await,
            Ok(()),
            "saved: answered as ended"
        );
        assert!(sessions.get(&ids[0]).is_none());
        store.unknown.store(true, Ordering::SeqCst);
        let (key, _) = sessions.get(&ids[1]).unwrap();
        let ended = sessions.end(&[key]).await;
        assert!(
            ended
                .as_ref()
                .is_err_and(|e| e.contains("may not have been saved")),
            "{ended:?}"
        );
    }

    /// A write of an end the store refuses leaves the sessions out of memory, to be written
    /// again: a reload's end is tried until it holds, and they serve nobody meanwhile.
    #[tokio::test]
    async fn an_end_whose_write_is_refused_stays_taken_until_written() {
        let (sessions, store, _entered, release) = gated();
        drop(release);
        let id = sessions
            .create(identity("alice", 10_000), None, "s", 100)
            .await
            .unwrap();
        let (key, _) = sessions.get(&id).unwrap();
        let taken = sessions.take(&[key]);
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let Err((_, taken)) = sessions.write_end(&[key], taken, Vec::new()).await else {
            panic!("the store refused the write");
        };
        assert!(sessions.get(&id).is_none(), "put back by a refused write");
        assert!(sessions.write_end(&[key], taken, Vec::new()).await.is_ok());
        assert!(sessions.get(&id).is_none());
        assert!(sessions.find(|_| true).is_empty(), "ended");
    }

    /// An end for good (a back-channel logout's sessions signed in as it came) returns once
    /// it is written, so that every replica has it when the IdP is answered; one the store
    /// refuses is written again until it holds, and lets nobody in here meanwhile.
    #[tokio::test]
    async fn an_end_for_good_returns_once_written_and_is_written_until_it_holds() {
        let (sessions, store, entered, release) = gated();
        let alice = begin(&sessions, identity("alice", 10_000), 100).await;
        let bob = begin(&sessions, identity("bob", 10_000), 100).await;
        // Another replica, as it reads the store now.
        let elsewhere = || sessions_over(store.clone()).find(|_| true).len();
        assert_eq!(elsewhere(), 2);
        let (bob_key, _) = sessions.get(&bob).unwrap();
        sessions.end_for_good(&[bob_key], "bob's".into()).await;
        assert_eq!(elsewhere(), 1, "written when it returns");

        let (key, _) = sessions.get(&alice).unwrap();
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let ending = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.end_for_good(&[key], "alice's".into()).await }
        });
        tokio::task::spawn_blocking(move || entered.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(sessions.get(&alice).is_none(), "out of memory at once");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!ending.is_finished(), "returned before its end was written");
        release.send(()).unwrap();
        ending.await.unwrap();
        assert!(
            sessions.get(&alice).is_none(),
            "put back by a refused write"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while elsewhere() != 0 {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Sessions over a [`Gated`] store; the receiver says when its commit is waiting, the
    /// sender releases it.
    fn gated() -> (
        Arc<Sessions>,
        Arc<Gated>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let store = Arc::new(Gated {
            entered: Some(entered_tx).into(),
            release: Some(release_rx).into(),
            ..Gated::default()
        });
        let sessions = Arc::new(sessions_over(store.clone()));
        (sessions, store, entered, release)
    }

    /// Sessions over `store`, as a replica opening it now reads them.
    fn sessions_over(store: Arc<Gated>) -> Sessions {
        let kept = Arc::new(Kept::default());
        let sinks = portcullis_scim::store::Sinks {
            changes: None,
            entries: Some(kept.clone()),
        };
        let clock = Box::new(time::OffsetDateTime::now_utc);
        let directory = Directory::open_with_sinks(store, clock, sinks).unwrap();
        Sessions::new(kept, Arc::new(directory))
    }

    /// Sign-ins finished in one second do not end each other's, but callbacks saved up and
    /// sent at once leave at most twice `max_sessions_per_person`.
    #[tokio::test]
    async fn sessions_begun_at_once_are_kept_up_to_twice_the_limit() {
        let sessions = open(tempfile::tempdir().unwrap().path()).sessions;
        let alice = identity("alice", 10_000);
        let (keep, at) = (3, 100);
        let mut ended = 0;
        for _ in 0..5 * keep {
            let id = begin(&sessions, alice.clone(), at).await;
            ended += sessions
                .end_all_but_newest(&alice, &id, keep)
                .await
                .unwrap();
        }
        let left = sessions.find(|i| i.subject == alice.subject).len();
        assert_eq!(left, 2 * keep);
        assert_eq!(ended, 5 * keep - 2 * keep);
        // Two at once, with a limit of one: neither ends the other.
        let bob = identity("bob", 10_000);
        let first = begin(&sessions, bob.clone(), at).await;
        let second = begin(&sessions, bob.clone(), at).await;
        assert_eq!(sessions.end_all_but_newest(&bob, &second, 1).await, Ok(0));
        assert!(sessions.get(&first).is_some());
    }

    /// A session another end is ending does not count towards a person's sessions: signing
    /// out on the phone as the tablet's sign-in finishes does not sign the laptop out.
    #[tokio::test]
    async fn a_session_being_ended_is_not_counted_against_a_new_one() {
        let (sessions, store, entered, release) = gated();
        let alice = identity("alice", 10_000);
        let at = |created| Identity {
            created,
            ..alice.clone()
        };
        let laptop = sessions.create(at(100), None, "s", 100).await.unwrap();
        let phone = sessions.create(at(150), None, "s", 150).await.unwrap();
        let tablet = sessions.create(at(200), None, "s", 200).await.unwrap();
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let (phone_key, _) = sessions.get(&phone).unwrap();
        let signing_out = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.end(&[phone_key]).await }
        });
        tokio::task::spawn_blocking(move || entered.recv())
            .await
            .unwrap()
            .unwrap();
        // The tablet's sign-in keeps the newest two of alice's sessions.
        let trimming = tokio::spawn({
            let (sessions, newest) = (sessions.clone(), at(200));
            async move { sessions.end_all_but_newest(&newest, &tablet, 2).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        release.send(()).unwrap();
        assert!(signing_out.await.unwrap().is_err());
        assert_eq!(trimming.await.unwrap(), Ok(0));
        assert!(
            sessions.get(&laptop).is_some(),
            "the laptop is still signed in"
        );
    }

    /// A second end of a session while a first is writing its end (a double-click on "Sign
    /// out", two tabs) finds it, and writes its own: the first's write failing does not bring
    /// back a session the second said was over, nor its sign-in's session on another host.
    #[tokio::test]
    async fn a_second_end_holds_when_the_first_end_s_write_fails() {
        let (sessions, store, entered, release) = gated();
        // alice's sign-in, on two hosts: one sid.
        let on_a = begin(&sessions, identity("alice", 10_000), 100).await;
        let on_b = begin(&sessions, identity("alice", 10_000), 100).await;
        let sid = |i: &Identity| i.idp_session.as_deref() == Some("sid-alice");
        assert_eq!(sessions.find(sid).len(), 2);

        // The first sign-out takes both out of memory; its write waits, then fails.
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let keys: Vec<SessionKey> = sessions.find(sid).into_iter().map(|(k, _)| k).collect();
        let first = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.end(&keys).await }
        });
        tokio::task::spawn_blocking(move || entered.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(sessions.get(&on_a).is_none(), "out of memory at once");
        // The second, as a sign-out with a's cookie finds them: the cookie's, then its sid's.
        let (key, session) = sessions
            .get_to_end(&on_a)
            .expect("being ended, still found");
        let mut keys = vec![key];
        keys.extend(
            (sessions.find(|i| i.idp_session == session.identity.idp_session))
                .into_iter()
                .map(|(k, _)| k),
        );
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 2, "both found");
        let second = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.end(&keys).await }
        });
        release.send(()).unwrap();
        assert!(
            first.await.unwrap().is_err(),
            "the first end's write failed"
        );
        assert!(second.await.unwrap().is_ok());
        assert!(sessions.get(&on_a).is_none() && sessions.get(&on_b).is_none());
        assert!(sessions.find(sid).is_empty(), "nothing put back");
    }

    /// A session vouches only under the cookie domain it was issued for: narrowed or taken
    /// away (a host under it was found reading its visitors' cookies), the ids that host
    /// read are worth nothing, sent in any cookie. One stored before the domain was kept
    /// vouches under any.
    #[tokio::test]
    async fn a_session_vouches_only_under_the_cookie_domain_it_was_issued_for() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let under = |domain: Option<&str>| {
            let mut oidc = oidc("https://idp.test", 3_600);
            oidc.cookie_name = "portcullis_session".to_owned();
            oidc.cookie_domain = domain.map(str::to_owned);
            oidc
        };
        let corp = under(Some(".corp.test"));
        let issued = IssuedIn::of(&corp, "app.corp.example");
        let id = sessions
            .create(identity("alice", 10_000), None, issued, 100)
            .await
            .unwrap();
        let per_host = begin(&sessions, identity("bob", 10_000), 100).await;
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        let vouches = |id: &str, oidc: &OidcConfig| sessions.get(id).unwrap().1.vouches(100, oidc);
        assert!(vouches(&id, &corp));
        assert!(!vouches(&id, &under(None)), "taken away");
        assert!(!vouches(&id, &under(Some(".apps.corp.test"))), "narrowed");
        assert!(vouches(&per_host, &under(None)));
        assert!(!vouches(&per_host, &corp), "widened");
        let older = Session::new(Stored {
            identity: identity("carol", 10_000),
            last_seen: 100,
            refresh: None,
            cookie: Some("portcullis_session".to_owned()),
            cookie_domain: None,
            host: None,
            id_token: None,
        });
        for oidc in [&corp, &under(None)] {
            assert!(
                older.vouches(100, oidc),
                "stored before the domain was kept"
            );
        }
    }

    /// A session in a cookie per host is presented by that host alone: its id, read on
    /// another (a sign-in code a hostile page caught, finished in another browser), is worth
    /// nothing there. Under a cookie domain, and stored before the host was kept, any host.
    #[tokio::test]
    async fn a_session_in_a_cookie_per_host_is_that_host_s_alone() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let mut per_host = oidc("https://idp.test", 3_600);
        per_host.cookie_name = "portcullis_session".to_owned();
        let mut shared = per_host.clone();
        shared.cookie_domain = Some(".corp.test".to_owned());
        let wiki = sessions
            .create(
                identity("alice", 10_000),
                None,
                IssuedIn::of(&per_host, "wiki.corp.test"),
                100,
            )
            .await
            .unwrap();
        let everywhere = sessions
            .create(
                identity("bob", 10_000),
                None,
                IssuedIn::of(&shared, "auth.corp.test"),
                100,
            )
            .await
            .unwrap();
        let older = begin(&sessions, identity("carol", 10_000), 100).await;
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        let on = |id: &str, host: &str| sessions.get(id).unwrap().1.issued_on(host);
        assert!(on(&wiki, "wiki.corp.test"));
        assert!(!on(&wiki, "payroll.corp.test"), "another host");
        assert!(
            on(&everywhere, "payroll.corp.test"),
            "under the cookie domain"
        );
        assert!(
            on(&older, "payroll.corp.test"),
            "stored before the host was kept"
        );
    }

    /// The names of the cookies sessions were issued in are known across a restart (from the
    /// sessions held) and as configured (where a session stored before the name was kept
    /// vouches in any): an earlier one's cookie is Portcullis' own, never an upstream's.
    #[tokio::test]
    async fn the_names_sessions_were_issued_in_are_known() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        sessions
            .create(identity("alice", 10_000), None, "old_session", 100)
            .await
            .unwrap();
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        let names = |sessions: &Sessions| -> Vec<String> {
            sessions
                .cookie_names()
                .iter()
                .map(|name| name.to_string())
                .collect()
        };
        assert_eq!(names(&sessions), ["old_session"]);
        sessions.issued_in("configured");
        sessions.issued_in("configured");
        assert_eq!(names(&sessions), ["old_session", "configured"]);
    }

    /// A logout token used is kept with the sessions (so across a restart) until it could no
    /// longer be taken, then forgotten by `maintain`; so is the IdP session it signed out, as
    /// long as a sign-in of it may be finishing.
    #[tokio::test]
    async fn a_used_logout_token_is_kept_until_it_could_no_longer_be_taken() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let issuer = "https://idp.test";
        let logout = crate::auth::oidc::LoggedOut {
            sub: None,
            sid: Some("sid-alice".to_owned()),
            jti: "jti-1".to_owned(),
            until: 1_000,
        };
        sessions
            .end_for_logout(&[], issuer, &logout, 900)
            .await
            .unwrap();
        assert!(sessions.logout_token_used(issuer, "jti-1"));
        assert!(!sessions.logout_token_used(issuer, "jti-2"));
        assert!(!sessions.logout_token_used("https://other.example", "jti-1"));
        let (alice, bob) = (identity("alice", 5_000), identity("bob", 5_000));
        assert!(sessions.signed_out_by_idp(&alice, 900));
        assert!(!sessions.signed_out_by_idp(&bob, 900));
        let elsewhere = Identity {
            issuer: "https://other.example".into(),
            ..identity("alice", 5_000)
        };
        assert!(!sessions.signed_out_by_idp(&elsewhere, 900));
        // The sid itself is no jti.
        assert!(!sessions.logout_token_used(issuer, "sid-alice"));
        // A sign-in begun after the logout is not its (the IdP kept its own session, say).
        assert!(!sessions.signed_out_by_idp(&alice, 901));
        // A token with no sid signs out every session of its subject begun before it.
        let everywhere = crate::auth::oidc::LoggedOut {
            sub: Some("bob".to_owned()),
            sid: None,
            jti: "jti-2".to_owned(),
            until: 1_000,
        };
        sessions
            .end_for_logout(&[], issuer, &everywhere, 950)
            .await
            .unwrap();
        assert!(sessions.signed_out_by_idp(&bob, 950));
        assert!(!sessions.signed_out_by_idp(&bob, 951));
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        assert!(
            sessions.logout_token_used(issuer, "jti-1"),
            "kept across a restart"
        );
        assert!(
            sessions.signed_out_by_idp(&alice, 900),
            "kept across a restart"
        );
        // Kept with the margin sessions get (three times `every`), for clocks behind.
        sessions
            .maintain(1_180, 60, Some(&oidc("https://idp.test", 3600)))
            .await
            .unwrap();
        assert!(
            sessions.logout_token_used(issuer, "jti-1"),
            "still kept at 1180"
        );
        sessions
            .maintain(1_181, 60, Some(&oidc("https://idp.test", 3600)))
            .await
            .unwrap();
        assert!(
            !sessions.logout_token_used(issuer, "jti-1"),
            "forgotten after"
        );
        // The IdP session, PENDING_FOR after the logout came (and the same margin).
        assert!(sessions.signed_out_by_idp(&alice, 900));
        sessions
            .maintain(1_681, 60, Some(&oidc("https://idp.test", 3600)))
            .await
            .unwrap();
        assert!(!sessions.signed_out_by_idp(&alice, 900));
        drop(sessions);
        assert!(!open(dir.path()).sessions.logout_token_used(issuer, "jti-1"));
    }

    /// A session stored just after a reload to another provider, or off sign-in, is not held
    /// as sign-in is configured now (its callback gives it no cookie).
    #[tokio::test]
    async fn a_session_is_judged_as_sign_in_is_configured_now() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let id = begin(&sessions, identity("alice", 10_000), 100).await;
        let (_, session) = sessions.get(&id).unwrap();
        assert!(
            !sessions.holds_as_configured(&session, 100),
            "nothing configured"
        );
        sessions.configured(Some(&oidc("https://idp.test", 3600)));
        assert!(sessions.holds_as_configured(&session, 100));
        sessions.configured(Some(&oidc("https://another.test", 3600)));
        assert!(
            !sessions.holds_as_configured(&session, 100),
            "another provider"
        );
        sessions.configured(None);
        assert!(!sessions.holds_as_configured(&session, 100), "sign-in off");
    }

    #[tokio::test]
    async fn sessions_survive_a_restart_and_end_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob) = {
            let sessions = open(dir.path()).sessions;
            let alice = begin(&sessions, identity("alice", 10_000), 100).await;
            let refresh = Refresh {
                refresh_token: "first-refresh-token".into(),
                due: 500,
                sealed: false,
            };
            let bob = sessions
                .create(
                    identity("bob", 10_000),
                    Some(refresh),
                    "portcullis_session",
                    100,
                )
                .await
                .unwrap();
            assert_eq!(alice.len(), 43);
            assert!(sessions.get(&alice).is_some(), "held once created");
            (alice, bob)
        };
        let bob_id = bob.clone();
        let sessions = open(dir.path()).sessions;
        assert_eq!(sessions.count(), 2);
        let (_, session) = sessions.get(&alice).unwrap();
        assert!(session.is_live(200, 3600));
        assert!(!session.is_live(100 + 3600, 3600), "idle timeout");
        assert!(!session.is_live(10_000, 1_000_000), "absolute lifetime");
        // Under the sign-in configuration as it is now: its provider, its lifetime.
        let mut oidc = crate::testing::config("").oidc.unwrap();
        oidc.issuer = session.identity.issuer.clone();
        oidc.session_idle_timeout = std::time::Duration::from_secs(3600);
        oidc.session_lifetime = std::time::Duration::from_secs(3600);
        assert!(session.vouches(200, &oidc));
        let created = session.identity.created;
        let shortened = portcullis_config::OidcConfig {
            session_lifetime: std::time::Duration::from_secs(60),
            ..oidc.clone()
        };
        assert!(session.vouches(created + 59, &shortened));
        assert!(
            !session.vouches(created + 60, &shortened),
            "lifetime shortened"
        );
        let moved = portcullis_config::OidcConfig {
            issuer: "https://elsewhere.example".to_owned(),
            ..oidc
        };
        assert!(!session.vouches(200, &moved), "another provider");
        let renamed = portcullis_config::OidcConfig {
            cookie_name: "renamed_session".to_owned(),
            issuer: session.identity.issuer.clone(),
            ..moved
        };
        assert!(!session.vouches(200, &renamed), "a cookie of another name");

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
        let (bob_key, bob) = sessions.get(&bob).unwrap();
        let refreshing = bob.refresh.as_ref().unwrap();
        let refresh = refreshing.state();
        assert_eq!(refresh.due, 500, "refresh state survives a restart");
        let shown = format!("{refresh:?}");
        assert!(
            !shown.contains("first-refresh-token") && !shown.contains(&refresh.refresh_token),
            "refresh token never in Debug: {shown}"
        );
        // A refresh holds at once and is stored in the background.
        // Kept sealed under bob's id: it opens with that id only.
        assert!(refresh.sealed && !refresh.refresh_token.contains("first-refresh-token"));
        let opened = refresh.opened(&bob_id).unwrap();
        assert_eq!(opened.refresh_token, "first-refresh-token");
        assert!(refresh.opened(&alice).is_none(), "another session's id");
        // A state kept before sealing began reads as it was written.
        let legacy: Refresh = serde_json::from_str(r#"{"refresh_token":"old","due":1}"#).unwrap();
        assert_eq!(legacy.opened(&bob_id).unwrap().refresh_token, "old");
        let next = Refresh {
            refresh_token: "second-refresh-token".into(),
            due: 900,
            sealed: false,
        };
        sessions.refreshed(&bob_id, &bob_key, refreshing, next);
        assert_eq!(refreshing.state().due, 900);
        tokio::task::yield_now().await;
        // Written after the refresh's write was queued, so after it is stored.
        begin(&sessions, identity("carol", 10_000), 300).await;
        drop((bob, sessions));
        // The refresh's task lets go of the directory a moment after its write.
        let mut storage = None;
        for _ in 0..1000 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            storage = portcullis_scim::store::redb::RedbStorage::open(dir.path()).ok();
            if storage.is_some() {
                break;
            }
        }
        drop(storage.expect("the directory is free again"));
        let sessions = open(dir.path()).sessions;
        let (_, bob) = sessions.get(&bob_id).unwrap();
        let state = bob.refresh.as_ref().unwrap().state();
        assert_eq!(state.due, 900, "stored");
        assert_eq!(
            state.opened(&bob_id).unwrap().refresh_token,
            "second-refresh-token"
        );
        // Only the hash of the id is stored, and no refresh token as the IdP gave it.
        drop((bob, sessions));
        let raw = std::fs::read(dir.path().join("directory.redb")).unwrap();
        for secret in [
            alice.as_str(),
            &bob_id,
            "first-refresh-token",
            "second-refresh-token",
        ] {
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret}"
            );
        }
    }

    /// Sessions of a provider no longer configured (sign-in moved off it by a restart, which
    /// no reload saw) are forgotten: moved back, they do not come back.
    #[tokio::test]
    async fn sessions_of_another_provider_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let id = begin(&sessions, identity("ann", 100_000), 100).await;
        let kept = sessions
            .maintain(150, 60, Some(&oidc("https://idp.test", 3_600)))
            .await;
        assert_eq!(kept.unwrap(), (0, 0));
        assert!(sessions.get(&id).is_some());
        let moved = sessions
            .maintain(150, 60, Some(&oidc("https://elsewhere.example", 3_600)))
            .await;
        assert_eq!(moved.unwrap(), (0, 1));
        assert!(sessions.get(&id).is_none());
        // Sign-in off altogether (no `[oidc]`): every session is another provider's.
        let id = begin(&sessions, identity("bob", 100_000), 100).await;
        assert_eq!(sessions.maintain(150, 5, None).await.unwrap(), (0, 1));
        assert!(sessions.get(&id).is_none());
        // A lifetime shortened (by a restart, which no reload saw): a session past it is
        // forgotten, and a restart back does not bring it back.
        let id = begin(&sessions, identity("cy", 100_000), 100).await;
        let mut shortened = oidc("https://idp.test", 3_600);
        shortened.session_lifetime = std::time::Duration::from_secs(60);
        assert_eq!(
            sessions.maintain(160, 60, Some(&shortened)).await.unwrap(),
            (0, 1)
        );
        assert!(sessions.get(&id).is_none());
    }

    /// A reload ends the sessions sign-in as configured before or after it refuses: a
    /// lifetime shortened, then lengthened again, or an idle timeout raised, brings none back.
    #[tokio::test]
    async fn a_reload_ends_the_sessions_either_configuration_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let begun_at = |sub: &str, created: u64| Identity {
            created,
            ..identity(sub, 100_000)
        };
        let old = begin(&sessions, begun_at("old", 100), 100).await;
        let idle = begin(&sessions, begun_at("idle", 800), 800).await;
        let young = begin(&sessions, begun_at("young", 900), 900).await;
        sessions.get(&old).unwrap().1.touch(990);
        let before = oidc("https://idp.test", 150);
        // The idle timeout raised: `idle` had idled out before it.
        let raised = oidc("https://idp.test", 3_600);
        // Whose, and why, for the audit log: none, for a session that had ended by itself.
        let why = |before: &OidcConfig, after: Option<&OidcConfig>| {
            let keys = sessions.not_held(1_000, before, after);
            (sessions
                .ended_by_reload(&keys, 1_000, before, after)
                .into_iter())
            .map(|(_, why)| why)
            .collect::<Vec<_>>()
        };
        assert_eq!(why(&before, Some(&raised)), Vec::<&str>::new());
        assert_eq!(
            sessions.end_not_held(1_000, &before, Some(&raised)).await,
            Ok(1)
        );
        assert!(sessions.get(&idle).is_none());
        // The lifetime shortened: `old` is past it.
        let mut shortened = raised.clone();
        shortened.session_lifetime = std::time::Duration::from_secs(600);
        assert_eq!(
            why(&raised, Some(&shortened)),
            ["past the session lifetime or idle timeout a reload set"]
        );
        let ended = sessions
            .end_not_held(1_000, &raised, Some(&shortened))
            .await;
        assert_eq!(ended, Ok(1));
        assert!(sessions.get(&old).is_none());
        assert!(sessions.get(&young).is_some());
        // A session begun with the new provider (on a replica of a fleet reloaded first) is
        // judged by the configuration after alone.
        let moved = oidc("https://new.example", 3_600);
        let theirs = Identity {
            issuer: moved.issuer.clone(),
            ..begun_at("new", 900)
        };
        let new = begin(&sessions, theirs, 900).await;
        assert_eq!(
            why(&shortened, Some(&moved)),
            ["sign-in moved to another provider"]
        );
        let ended = sessions.end_not_held(1_000, &shortened, Some(&moved)).await;
        assert_eq!(ended, Ok(1), "young, of the old provider");
        assert!(sessions.get(&new).is_some());
        // Sign-in off: every session.
        assert_eq!(why(&moved, None), ["sign-in was turned off"]);
        assert_eq!(sessions.end_not_held(1_000, &moved, None).await, Ok(1));
        assert!(sessions.get(&young).is_none());
        drop(sessions);
        assert_eq!(open(dir.path()).sessions.count(), 0, "ending is durable");
    }

    /// At shutdown every use the store lacks is written, however recent: a restart judges
    /// idleness from it, not from the last upkeep's write.
    #[tokio::test]
    async fn the_last_use_is_stored_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let used = begin(&sessions, identity("used", 100_000), 100).await;
        let unused = begin(&sessions, identity("unused", 100_000), 100).await;
        // Less than an upkeep's interval after the store had it: no upkeep would write it.
        sessions.get(&used).unwrap().1.touch(130);
        assert_eq!(sessions.store_last_use().await, Ok(1));
        assert_eq!(sessions.store_last_use().await, Ok(0), "written once");
        drop(sessions);
        let sessions = open(dir.path()).sessions;
        assert_eq!(sessions.get(&used).unwrap().1.last_seen(), 130);
        assert_eq!(sessions.get(&unused).unwrap().1.last_seen(), 100);
    }

    #[tokio::test]
    async fn use_is_written_back_and_sessions_that_are_over_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let used = begin(&sessions, identity("used", 100_000), 100).await;
        let idle = begin(&sessions, identity("idle", 100_000), 100).await;
        let expired = begin(&sessions, identity("expired", 1_000), 100).await;
        // Nothing is due a moment later.
        assert_eq!(
            sessions
                .maintain(150, 60, Some(&oidc("https://idp.test", 3_600)))
                .await
                .unwrap(),
            (0, 0)
        );
        sessions.get(&used).unwrap().1.touch(3_000);
        // Idle past the timeout, or past its lifetime: forgotten (on an embedded store, at
        // once: no other replica's use can be late), so that a restart under a longer idle
        // timeout finds it over.
        assert_eq!(
            sessions
                .maintain(3_701, 60, Some(&oidc("https://idp.test", 3_600)))
                .await
                .unwrap(),
            (1, 2)
        );
        assert!(sessions.get(&expired).is_none());
        assert!(sessions.get(&idle).is_none());
        // Written back: a replica (or a restart) that never saw the use has it.
        drop(sessions);
        let Opened { sessions, kept } = open(dir.path());
        assert_eq!(sessions.count(), 1);
        assert_eq!(sessions.get(&used).unwrap().1.last_seen(), 3_000);
        assert_eq!(
            sessions
                .maintain(3_900, 60, Some(&oidc("https://idp.test", 3_600)))
                .await
                .unwrap(),
            (0, 0)
        );

        // A use written back after the session ended (a late replica) does not bring it back,
        // and the orphaned part is forgotten.
        let (key, _) = sessions.get(&used).unwrap();
        sessions.end(&[key]).await.unwrap();
        kept.apply(&[entry(SESSION_SEEN, &key, Some("3950".to_owned()))]);
        assert!(sessions.get(&used).is_none());
        assert_eq!(lock(&kept.orphans).len(), 1);
        sessions
            .maintain(4_000, 60, Some(&oidc("https://idp.test", 3_600)))
            .await
            .unwrap();
        assert!(lock(&kept.orphans).is_empty());
    }

    /// Another replica's refresh is told from this one's by the token it holds, not by its
    /// seal: the same token sealed again (an IdP that does not rotate them) is no new one.
    #[tokio::test]
    async fn a_refresh_elsewhere_is_a_new_token_not_a_new_seal() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = open(dir.path()).sessions;
        let first = Refresh {
            refresh_token: "t1".into(),
            due: 500,
            sealed: false,
        };
        let id = sessions
            .create(
                identity("erin", 10_000),
                Some(first),
                "portcullis_session",
                100,
            )
            .await
            .unwrap();
        let (key, session) = sessions.get(&id).unwrap();
        let refreshing = session.refresh.as_ref().unwrap();
        let again = |token: &str, due| Refresh {
            refresh_token: token.into(),
            due,
            sealed: false,
        };
        sessions.refreshed(&id, &key, refreshing, again("t1", 600));
        assert!(!sessions.refreshed_elsewhere(&id, refreshing, "t1").await);
        sessions.refreshed(&id, &key, refreshing, again("t2", 700));
        assert!(sessions.refreshed_elsewhere(&id, refreshing, "t1").await);
    }

    /// Every file under `dir`, read whole.
    fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(files(&path));
            } else {
                found.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
        found
    }

    /// A copy of the store holds no one's ID token: it is sealed under the session's id,
    /// which only the browser's cookie holds, and opens with that id at sign-out.
    #[tokio::test]
    async fn the_id_token_is_kept_sealed_and_opens_only_with_the_session_s_id() {
        let dir = tempfile::tempdir().unwrap();
        let signature = "c2lnbmF0dXJlLW9mLWZyYW4tcy1pZC10b2tlbg";
        let token = format!("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmcmFuIn0.{signature}");
        let id = {
            let sessions = open(dir.path()).sessions;
            let mut fran = identity("fran", 10_000);
            fran.id_token = Some(token.clone());
            let id = sessions.create(fran, None, "portcullis_session", 100).await;
            id.unwrap()
        };
        let stored = files(dir.path());
        assert!(!stored.is_empty());
        for (path, bytes) in stored {
            let found = bytes
                .windows(signature.len())
                .any(|w| w == signature.as_bytes());
            assert!(!found, "{} holds the ID token", path.display());
        }
        let sessions = open(dir.path()).sessions;
        let (_, fran) = sessions.get(&id).unwrap();
        assert_eq!(fran.id_token(&id), Some(token));
        assert_eq!(
            fran.identity.id_token, None,
            "not shared with every request"
        );
        assert_eq!(fran.id_token(&"x".repeat(43)), None, "another session's id");
    }

    #[tokio::test]
    async fn sessions_of_an_older_version_are_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        // As an older version kept them: no cookie name, no host, the ID token in the clear.
        let stored = |identity| Stored {
            identity,
            last_seen: 100,
            refresh: None,
            cookie: None,
            cookie_domain: None,
            host: None,
            id_token: None,
        };
        let old = stored(Identity {
            id_token: Some("carols.id.token".to_owned()),
            ..identity("carol", 10_000)
        });
        let gone = stored(identity("dave", 150));
        // Dated by another directory's history, further than this one has reached.
        let foreign = stored(Identity {
            directory_seq: 1_000_000,
            ..identity("erin", 10_000)
        });
        {
            let db = Database::create(dir.path().join(OLD_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(OLD_TABLE).unwrap();
                let rows = [
                    ("c".repeat(43), &old),
                    ("d".repeat(43), &gone),
                    ("e".repeat(43), &foreign),
                ];
                for (id, stored) in rows {
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
        let (_, carol) = sessions.get(&"c".repeat(43)).unwrap();
        // Its ID token as it was kept then, for the sign-out's hint.
        assert_eq!(
            carol.id_token(&"c".repeat(43)).as_deref(),
            Some("carols.id.token")
        );
        // No cookie name was kept then: it vouches under any.
        let mut oidc = crate::testing::config("").oidc.unwrap();
        oidc.issuer = carol.identity.issuer.clone();
        oidc.cookie_name = "renamed_session".to_owned();
        assert!(carol.vouches(200, &oidc));
        assert!(
            sessions.get(&"d".repeat(43)).is_none(),
            "expired: left behind"
        );
        assert!(
            sessions.get(&"e".repeat(43)).is_none(),
            "of another directory: left behind"
        );
        assert!(!dir.path().join(OLD_FILE).exists());
        // Nor is it kept under another name: it holds every old session's tokens in clear.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap().file_name())
            .filter(|name| name.to_string_lossy().starts_with(OLD_FILE))
            .collect();
        assert!(left.is_empty(), "{left:?}");
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
        let stored = |sub: &str, key: &SessionKey| {
            let value = encode(&Stored {
                identity: identity(sub, 10_000),
                last_seen: 100,
                refresh: None,
                cookie: None,
                cookie_domain: None,
                host: None,
                id_token: None,
            });
            entry(SESSION, key, Some(value.unwrap()))
        };
        let (a, b) = (key_of(&"a".repeat(43)), key_of(&"b".repeat(43)));
        kept.apply(&[stored("a", &a), stored("b", &b)]);
        let held = kept.sessions.get(&a).unwrap().clone();
        held.touch(500);
        let ends = kept.ended.subscribe();
        // Reloaded in full: `b` is gone, `a` is the very session held before (its use here
        // kept), and the use another replica stored counts.
        kept.load(vec![
            entry(SESSION_SEEN, &a, Some("450".to_owned())),
            stored("a", &a),
        ]);
        assert_eq!(kept.sessions.len(), 1);
        assert!(Arc::ptr_eq(&kept.sessions.get(&a).unwrap(), &held));
        assert_eq!(held.last_seen(), 500);
        assert_eq!(held.stored_seen.load(Ordering::Relaxed), 450);
        assert!(ends.has_changed().unwrap());
        // A session this build cannot read is no session.
        let c = key_of(&"c".repeat(43));
        kept.apply(&[entry(SESSION, &c, Some("{".to_owned()))]);
        assert!(kept.sessions.get(&c).is_none());
        // Values never show in Debug.
        let shown = format!("{:?}", stored("a", &a));
        assert!(!shown.contains("corp.test"), "{shown}");
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
