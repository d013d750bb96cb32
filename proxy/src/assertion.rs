//! The signed identity assertion sent to upstreams (`X-Portcullis-Assertion`).
//!
//! This module owns three things:
//!
//! - **The signing keys.** ES256 (P-256) keys live in `data_dir/assertion-keys/`, one PKCS#8 PEM
//!   file per key, named `<kid>.pem` where the kid is the key's RFC 7638 JWK thumbprint. Files are
//!   created with mode 0600 (the directory 0700) and carry their creation time in a line before
//!   the PEM block, and, for a key made by a rotation (or a new fleet's first, made by a
//!   replica without keys of its own), the time it signs from (a line
//!   `Signs: <unix seconds>`, [`PUBLISH_LEAD`] later by default): a new key is published before
//!   it signs, so that an upstream that cached the JWKS a moment before the rotation (it is
//!   served `max-age=60`) has it by then. The newest key that signs by now signs; an older key
//!   stays published until every token it can have signed has expired (its successor's first
//!   signing time + the token TTL + 5 minutes of slack for clock skew and for a server that has
//!   not yet picked up a rotation), then its file is deleted.
//!   Rotation is a plain function over the directory ([`rotate_keys`]) so that the CLI can run
//!   it while a server is up; a running [`Signer`] picks the new key up on [`Signer::refresh`].
//!   With `[postgres]` the keys are instead entries kept beside the shared directory
//!   ([`ASSERTION_KEY`], the same text as a key file), so every replica signs with the same
//!   key and publishes the same JWKS; a rotation ([`rotate_shared`]) reaches every replica
//!   through the directory's feed, and each picks it up as it arrives.
//! - **The JWKS** ([`Signer::jwks_json`], served at [`JWKS_PATH`]): every published public key.
//! - **The assertion cache.** An ECDSA signature costs more than the whole proxy hop, so a token
//!   is signed once per identity and route and reused for [`REUSE_SECS`] after it is signed. A
//!   cached token is only served when *every* claim it carries (issuer, audience,
//!   subject, email, groups), the caller's `version` and the current signing kid are unchanged;
//!   so a change of groups or a key rotation never serves a stale token, whatever `version`
//!   means to the caller. There is one slot per (issuer, route, subject): a changed identity,
//!   or on a `*.` route another host served, overwrites its slot rather than adding one (a
//!   caller sending many host names behind a wildcard costs itself a signature each, and
//!   grows the cache by nothing). A full cache ([`CACHE_CAPACITY`] slots, or [`CACHE_BYTES`])
//!   keeps the slots it has, each signed again in place as it ages (one whose token grows past
//!   the bytes is let go), and signs for others on each request until the minute's upkeep
//!   drops the slots that expired: it never churns, and is never emptied on a request's
//!   thread. Tokens carry no `jti` so that they can be reused.
//!
//! Time is always a parameter (unix seconds), so that expiry and key retirement are testable.

use std::fs;
use std::hash::BuildHasher;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use http::HeaderValue;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;
use rand::TryRngCore;
use serde::Serialize;

use portcullis_scim::store::Entry;

use crate::auth::sessions::Kept;

/// The request header that carries the assertion to the upstream.
pub const ASSERTION_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-portcullis-assertion");

/// Where the JWKS of the published assertion keys is served.
pub const JWKS_PATH: &str = "/.portcullis/jwks.json";

/// The directory under `data_dir` that holds the keys.
pub const KEY_DIR: &str = "assertion-keys";

/// How long a retired key stays published beyond the token TTL.
pub const RETIREMENT_GRACE_SECS: u64 = 300;

/// How far before signing an assertion's `iat` is dated: an upstream whose clock is a few
/// seconds behind, verifying with no leeway (PyJWT's default), would otherwise refuse a fresh
/// one as issued in the future.
pub const ISSUED_EARLY_SECS: u64 = 5;

/// How long a cached token is sent for after it is signed (at most half the TTL, for very
/// short TTLs): every token sent has the TTL less this left (4 minutes of 5). An upstream
/// behind a server that reads a slow upload whole before passing it on (nginx's request
/// buffering, by default) checks the token that much later, with no leeway (PyJWT's default).
pub const REUSE_SECS: u64 = 60;

/// The most (issuer, route, subject) slots the cache holds, and the most bytes (about: a
/// person in 150 groups is some 14 KB of token and names).
pub const CACHE_CAPACITY: usize = 100_000;
pub const CACHE_BYTES: usize = 64 << 20;

/// The shortest accepted token TTL.
const MIN_TTL_SECS: u64 = 10;

/// The line before the PEM block that records when the key was created.
const CREATED_PREFIX: &str = "Created: ";

/// The line before the PEM block that records when a key signs from, if not from its creation.
const SIGNS_PREFIX: &str = "Signs: ";

/// How long a rotation publishes the new key before it signs, by default: the JWKS is served
/// `max-age=60`, and a server with its keys in `data_dir` picks a rotation up within a minute.
pub const PUBLISH_LEAD: Duration = Duration::from_secs(180);

/// The claims of one assertion. `version` changes whenever what the upstream is told does
/// (see the field); the cache additionally compares every claim, so it is a fast path, not
/// the only guard.
#[derive(Debug, Clone, Copy)]
pub struct AssertionClaims<'a> {
    /// `iss`: who asserts, e.g. `https://auth.example.com`.
    pub issuer: &'a str,
    /// `aud`: the route name.
    pub audience: &'a str,
    /// On a `*.` route, the host it served, with the route's path unless that is `/`
    /// (`https://payroll.apps.example`, `https://payroll.apps.example/admin/`): `aud` then
    /// names it too, so that no upstream behind the wildcard takes an assertion made for
    /// another host, or for another route of the same host.
    pub served: Option<&'a str>,
    /// `sub`: the identity.
    pub subject: &'a str,
    /// `email`, omitted when `None`.
    pub email: Option<&'a str>,
    /// `groups`, always present (possibly empty).
    pub groups: &'a [String],
    /// `portcullis_agent`: the SCIM Agent making the request, if an agent is; `sub` is then
    /// the agent itself, or the person it acts for (see `delegated`).
    pub agent: Option<&'a str>,
    /// Whether the agent acts for the person in `sub` (a delegated token): then `act` is
    /// `{"sub": agent}`, as in RFC 8693 §4.1.
    pub delegated: bool,
    /// A hash of the user, email and groups the upstream is told of: changes whenever they
    /// do (a deactivated caller is never forwarded, so the active state need not be in it).
    pub version: u64,
}

#[derive(Serialize)]
struct JwtClaims<'a> {
    iss: &'a str,
    aud: Audience<'a>,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    groups: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    portcullis_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<ActClaim<'a>>,
    iat: u64,
    exp: u64,
}

/// `aud`: the route's name, and on a `*.` route the host served too (RFC 7519 §4.1.3: one
/// string, or an array of them).
#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    Route(&'a str),
    RouteAndHost([&'a str; 2]),
}

/// RFC 8693 §4.1's actor.
#[derive(Serialize)]
struct ActClaim<'a> {
    sub: &'a str,
}

/// One loaded key.
struct Key {
    /// The key's RFC 7638 JWK thumbprint.
    kid: Arc<str>,
    created: u64,
    /// When it signs from (its creation, but for a key a rotation published ahead).
    signs: u64,
    encoding: EncodingKey,
    /// The public key as the JWKS publishes it.
    jwk: Jwk,
    /// The JOSE header of every token it signs.
    header: Header,
}

/// The published keys, newest (signing) first, and their JWKS.
struct KeySet {
    keys: Vec<Arc<Key>>,
    jwks: String,
}

impl KeySet {
    fn new(keys: Vec<Key>) -> Result<KeySet, String> {
        if keys.is_empty() {
            return Err("no assertion signing key".to_string());
        }
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        let jwks = serde_json::to_string(&set).map_err(|e| format!("serializing the JWKS: {e}"))?;
        Ok(KeySet {
            keys: keys.into_iter().map(Arc::new).collect(),
            jwks,
        })
    }

    /// No key yet: nothing signs, and the JWKS is empty.
    fn empty() -> KeySet {
        KeySet {
            keys: Vec::new(),
            jwks: r#"{"keys":[]}"#.to_owned(),
        }
    }

    /// The key that signs at `now`: the newest that signs by then, else (all of them are
    /// published ahead) the oldest.
    fn signing(&self, now: u64) -> Option<&Arc<Key>> {
        self.keys
            .iter()
            .find(|key| key.signs <= now)
            .or_else(|| self.keys.last())
    }

    fn same_keys(&self, other: &[Key]) -> bool {
        self.keys.len() == other.len()
            && self
                .keys
                .iter()
                .zip(other)
                .all(|(a, b)| a.kid == b.kid && a.created == b.created && a.signs == b.signs)
    }
}

/// A cached token and everything it was signed for.
struct Cached {
    issuer: Box<str>,
    audience: Box<str>,
    served: Option<Box<str>>,
    subject: Box<str>,
    email: Option<Box<str>>,
    groups: Box<[Box<str>]>,
    agent: Option<Box<str>>,
    delegated: bool,
    version: u64,
    /// The token (as a header value: checked once, when signed, and shared by every request
    /// it is sent with), and its key and dates.
    signed: Signed,
}

/// A signed assertion, with the key that signed it (`kid`) and when it was signed for (`iat`:
/// the second it was made) and until (`exp`).
#[derive(Clone)]
pub struct Signed {
    pub token: HeaderValue,
    kid: Arc<str>,
    iat: u64,
    exp: u64,
}

impl Signed {
    /// Whether it is what is sent for its claims at `now`, `kid` signing then: made with that
    /// key, and expiring more than `margin` from now.
    fn fresh(&self, kid: &str, now: u64, margin: u64) -> bool {
        &*self.kid == kid && self.iat <= now && self.exp > now.saturating_add(margin)
    }
}

impl Cached {
    /// About the memory it holds.
    fn bytes(&self) -> usize {
        let text = [&self.issuer, &self.audience, &self.subject]
            .iter()
            .map(|t| t.len())
            .sum::<usize>()
            + self.served.as_ref().map_or(0, |t| t.len())
            + self.email.as_ref().map_or(0, |t| t.len())
            + self.agent.as_ref().map_or(0, |t| t.len());
        let groups: usize = (self.groups.iter())
            .map(|g| g.len() + std::mem::size_of::<Box<str>>())
            .sum();
        std::mem::size_of::<Cached>() + text + groups + self.signed.token.len()
    }

    fn serves(&self, c: &AssertionClaims<'_>, kid: &str, now: u64, margin: u64) -> bool {
        self.version == c.version
            && self.signed.fresh(kid, now, margin)
            && &*self.subject == c.subject
            && &*self.audience == c.audience
            && self.served.as_deref() == c.served
            && &*self.issuer == c.issuer
            && self.email.as_deref() == c.email
            && self.agent.as_deref() == c.agent
            && self.delegated == c.delegated
            && self.groups.len() == c.groups.len()
            && self.groups.iter().zip(c.groups).all(|(a, b)| **a == **b)
    }
}

/// The entry kind of a shared assertion key: keyed by its kid, the value is the key file's
/// text.
pub const ASSERTION_KEY: &str = "assertion-key";

/// Where the keys live.
enum KeyStore {
    /// `data_dir/assertion-keys/`: one machine's.
    Dir(PathBuf),
    /// Kept beside the shared directory: every replica's.
    Shared(Arc<Kept>),
}

/// Signs assertions and publishes the keys that verify them. Cheap to share behind an `Arc`.
pub struct Signer {
    store: KeyStore,
    ttl: u64,
    margin: u64,
    keys: ArcSwap<KeySet>,
    cache: DashMap<u64, Cached, foldhash::fast::RandomState>,
    /// What the cache holds, about ([`Cached::bytes`]).
    cache_bytes: AtomicUsize,
    slot_hasher: foldhash::quality::RandomState,
    /// Serializes rotation and refresh within this process.
    maintenance: Mutex<()>,
}

impl Signer {
    /// Loads the keys in `data_dir/assertion-keys/` (creating the directory and a first key if
    /// there is none), deleting keys retired by `now`.
    pub fn open(data_dir: &Path, now: u64, token_ttl: Duration) -> Result<Signer, String> {
        let ttl = check_ttl(token_ttl)?;
        let dir = key_dir(data_dir);
        ensure_dir(&dir)?;
        let mut keys = load_published(&dir, now, ttl)?;
        if keys.is_empty() {
            keys.push(generate_key(&dir, now, now)?);
        }
        let set = KeySet::new(keys)?;
        Ok(Signer {
            store: KeyStore::Dir(dir),
            ttl,
            margin: ttl - REUSE_SECS.min(ttl / 2),
            keys: ArcSwap::from_pointee(set),
            cache: DashMap::default(),
            cache_bytes: AtomicUsize::new(0),
            slot_hasher: foldhash::quality::RandomState::default(),
            maintenance: Mutex::new(()),
        })
    }

    /// Signs with the keys `kept` holds (see [`ASSERTION_KEY`]): none until the first is kept
    /// ([`first_shared_keys`]); `kept` tells the signer whenever they change.
    pub fn shared(kept: Arc<Kept>, now: u64, token_ttl: Duration) -> Result<Arc<Signer>, String> {
        let ttl = check_ttl(token_ttl)?;
        let keys = shared_keys(&kept, now, ttl)?;
        let signer = Arc::new(Signer {
            store: KeyStore::Shared(kept.clone()),
            ttl,
            margin: ttl - REUSE_SECS.min(ttl / 2),
            keys: ArcSwap::from_pointee(KeySet::new(keys).unwrap_or_else(|_| KeySet::empty())),
            cache: DashMap::default(),
            cache_bytes: AtomicUsize::new(0),
            slot_hasher: foldhash::quality::RandomState::default(),
            maintenance: Mutex::new(()),
        });
        let weak = Arc::downgrade(&signer);
        kept.on_assertion_keys(Box::new(move || {
            if let Some(signer) = weak.upgrade() {
                if let Err(e) = signer.refresh(crate::clock::now_unix()) {
                    tracing::warn!("assertion keys not refreshed: {e}");
                }
            }
        }));
        Ok(signer)
    }

    /// Whether the keys are the fleet's, kept with the shared store.
    pub fn is_shared(&self) -> bool {
        matches!(self.store, KeyStore::Shared(_))
    }

    /// Whether the fleet has no keys yet (with a shared store), so this replica makes the first
    /// ([`first_shared_keys`]).
    pub fn needs_first_keys(&self) -> bool {
        match &self.store {
            KeyStore::Shared(kept) => kept.assertion_keys().is_empty(),
            KeyStore::Dir(_) => false,
        }
    }

    /// Whether there is a key to sign with.
    pub fn can_sign(&self) -> bool {
        !self.keys.load().keys.is_empty()
    }

    /// The kid of the key that signs new assertions at `now`.
    #[cfg(test)]
    pub fn signing_kid(&self, now: u64) -> Option<Arc<str>> {
        self.keys.load().signing(now).map(|k| k.kid.clone())
    }

    /// The JWKS (`{"keys":[...]}`) of every published key, to serve at [`JWKS_PATH`].
    pub fn jwks_json(&self) -> String {
        self.keys.load().jwks.clone()
    }

    /// The assertion for `claims` at `now`: the cached token if it was signed for exactly these
    /// claims and version by the current signing key and expires more than the refresh margin
    /// from now, else a freshly signed one (`iat` = now - [`ISSUED_EARLY_SECS`], `exp` = now +
    /// TTL).
    pub fn assertion(&self, claims: &AssertionClaims<'_>, now: u64) -> Result<HeaderValue, String> {
        self.signed(claims, now).map(|signed| signed.token)
    }

    /// Whether `signed` is still what [`Signer::assertion`] gives for the claims it was signed
    /// for at `now`: its key still signs, and it expires more than the refresh margin from now.
    pub fn still_serves(&self, signed: &Signed, now: u64) -> bool {
        (self.keys.load().signing(now)).is_some_and(|key| signed.fresh(&key.kid, now, self.margin))
    }

    /// [`Signer::assertion`], with what it was signed with and when.
    pub fn signed(&self, claims: &AssertionClaims<'_>, now: u64) -> Result<Signed, String> {
        let keys = self.keys.load();
        let key = keys
            .signing(now)
            .ok_or_else(|| "no assertion signing key".to_string())?;
        let slot = self
            .slot_hasher
            .hash_one((claims.issuer, claims.audience, claims.subject));
        // What the slot holds now, if anything (its token is for other claims, or aged).
        let kept = match self.cache.get(&slot) {
            Some(hit) if hit.serves(claims, &key.kid, now, self.margin) => {
                return Ok(hit.signed.clone())
            }
            Some(hit) => Some(hit.bytes()),
            None => None,
        };
        let exp = now.saturating_add(self.ttl);
        let iat = now.saturating_sub(ISSUED_EARLY_SECS);
        let token = HeaderValue::from_maybe_shared(Bytes::from(sign(key, claims, iat, exp)?))
            .map_err(|e| format!("the signed assertion is no header value: {e}"))?;
        let signed = Signed {
            token: token.clone(),
            kid: key.kid.clone(),
            iat: now,
            exp,
        };
        let cached = Cached {
            issuer: claims.issuer.into(),
            audience: claims.audience.into(),
            served: claims.served.map(Into::into),
            subject: claims.subject.into(),
            email: claims.email.map(Into::into),
            groups: claims.groups.iter().map(|g| g.as_str().into()).collect(),
            agent: claims.agent.map(Into::into),
            delegated: claims.delegated,
            version: claims.version,
            signed: signed.clone(),
        };
        // Full: the slots kept stay (see the module's doc), and this one is signed per request;
        // a slot whose token grows past what the cache holds (its caller put in many more
        // groups) is let go.
        let (bytes, held) = (cached.bytes(), self.cache_bytes.load(Ordering::Relaxed));
        let fits = match kept {
            Some(old) => (held + bytes).saturating_sub(old) <= CACHE_BYTES,
            None => self.cache.len() < CACHE_CAPACITY && held + bytes <= CACHE_BYTES,
        };
        if !fits {
            if kept.is_some() {
                if let Some((_, gone)) = self.cache.remove(&slot) {
                    self.cache_bytes.fetch_sub(gone.bytes(), Ordering::Relaxed);
                }
            }
            return Ok(signed);
        }
        // Counted before it is in, so that the upkeep never takes away more than was counted.
        self.cache_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(replaced) = self.cache.insert(slot, cached) {
            self.cache_bytes
                .fetch_sub(replaced.bytes(), Ordering::Relaxed);
        }
        Ok(signed)
    }

    /// Generates a new signing key in the directory, signing `lead` from `now`, retires keys
    /// whose tokens have all expired, and publishes the new key. Returns the new kid.
    #[cfg(test)]
    pub fn rotate(&self, now: u64, lead: u64) -> Result<String, String> {
        let _guard = self.maintenance.lock().map_err(|_| "poisoned key lock")?;
        let KeyStore::Dir(dir) = &self.store else {
            return Err("shared keys rotate through the directory".to_owned());
        };
        let kid = rotate_dir(dir, now, lead, self.ttl)?;
        self.refresh_locked(now)?;
        Ok(kid)
    }

    /// Re-reads the key directory (picking up a rotation made by the CLI), retires keys whose
    /// tokens have all expired, and drops expired cache entries. Call it periodically (every
    /// minute is plenty). On error the current keys stay in use.
    pub fn refresh(&self, now: u64) -> Result<(), String> {
        let _guard = self.maintenance.lock().map_err(|_| "poisoned key lock")?;
        self.refresh_locked(now)
    }

    fn refresh_locked(&self, now: u64) -> Result<(), String> {
        self.cache.retain(|_, c| {
            let live = c.signed.exp > now;
            if !live {
                self.cache_bytes.fetch_sub(c.bytes(), Ordering::Relaxed);
            }
            live
        });
        let keys = match &self.store {
            KeyStore::Dir(dir) => load_published(dir, now, self.ttl)?,
            KeyStore::Shared(kept) => shared_keys(kept, now, self.ttl)?,
        };
        if keys.is_empty() {
            return Err(match &self.store {
                KeyStore::Dir(dir) => format!(
                    "{}: no assertion keys left on disk; keeping the keys in memory",
                    dir.display()
                ),
                KeyStore::Shared(_) => "no shared assertion key kept yet".to_owned(),
            });
        }
        if !self.keys.load().same_keys(&keys) {
            let set = KeySet::new(keys)?;
            tracing::info!(
                signing_kid = set.signing(now).map(|k| &*k.kid).unwrap_or(""),
                newest_signs_from = set.keys.first().map_or(0, |k| k.signs),
                published = set.keys.len(),
                "assertion keys updated"
            );
            self.keys.store(Arc::new(set));
        }
        Ok(())
    }
}

/// `data_dir/assertion-keys`.
pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_DIR)
}

/// Generates a new signing key in `data_dir/assertion-keys/`, signing `lead` from `now`, and
/// deletes keys whose tokens have all expired by `now`. For `portcullis rotate-assertion-key`:
/// a running server publishes the new key on its next [`Signer::refresh`]. Returns the new
/// kid and when it signs from. A `data_dir` not there yet is not made: Portcullis makes it at
/// its first start, as its user (made by a rotation run as root, it would be root's, and the
/// server could not open it).
pub fn rotate_keys(
    data_dir: &Path,
    now: u64,
    lead: Duration,
    token_ttl: Duration,
) -> Result<(String, u64), String> {
    let ttl = check_ttl(token_ttl)?;
    if !data_dir.is_dir() {
        return Err(format!(
            "no data_dir at {}: Portcullis makes it at its first start, with a key; start it \
             first, then rotate",
            data_dir.display()
        ));
    }
    let dir = key_dir(data_dir);
    let made = !dir.exists();
    ensure_dir(&dir)?;
    if made {
        give_to_owner_of(data_dir, &dir)?;
    }
    // Root writes keys (and prunes them) only in a directory, never through a link the service
    // user, who owns `data_dir`, could have put in its place.
    let linked = fs::symlink_metadata(&dir).map(|meta| meta.is_symlink());
    if nix::unistd::geteuid().is_root() && linked.unwrap_or(true) {
        return Err(format!(
            "{} is not a directory (a link?): run as root, the keys are written only into one",
            dir.display()
        ));
    }
    let kid = rotate_dir(&dir, now, lead.as_secs(), ttl)?;
    Ok((kid, now.saturating_add(lead.as_secs())))
}

/// Deletes the keys in `data_dir/assertion-keys/` whose tokens have all expired by `now` (never
/// the newest). Returns the kids of the keys still published, newest first.
#[cfg(test)]
pub fn prune_keys(data_dir: &Path, now: u64, token_ttl: Duration) -> Result<Vec<String>, String> {
    let ttl = check_ttl(token_ttl)?;
    let keys = load_published(&key_dir(data_dir), now, ttl)?;
    Ok(keys.iter().map(|k| k.kid.to_string()).collect())
}

fn check_ttl(token_ttl: Duration) -> Result<u64, String> {
    let ttl = token_ttl.as_secs();
    if ttl < MIN_TTL_SECS {
        return Err(format!(
            "assertion token TTL must be at least {MIN_TTL_SECS} s, not {token_ttl:?}"
        ));
    }
    Ok(ttl)
}

/// When a key made at `now` after `existing` (newest first) was created: it must be the newest
/// even if the clock went backwards.
fn successor_created(existing: &[Key], now: u64) -> u64 {
    match existing.first() {
        Some(newest) if newest.created >= now => newest.created.saturating_add(1),
        _ => now,
    }
}

fn rotate_dir(dir: &Path, now: u64, lead: u64, ttl: u64) -> Result<String, String> {
    let existing = read_keys(dir)?;
    let created = successor_created(&existing, now);
    let key = generate_key(dir, created, now.saturating_add(lead))?;
    let kid = key.kid.to_string();
    load_published(dir, now, ttl)?;
    tracing::info!(kid = %kid, "generated a new assertion signing key");
    Ok(kid)
}

/// How many of `keys` (newest first) are still published at `now`: the newest always; an older
/// one while tokens it signed before its successor took over can still be valid.
fn retained(keys: &[Key], now: u64, ttl: u64) -> usize {
    let mut keep = keys.len().min(1);
    while keep < keys.len() {
        let successor = &keys[keep - 1];
        // (Its creation is past its predecessor's even where the clock went back.)
        let retires = successor
            .signs
            .max(successor.created)
            .saturating_add(ttl)
            .saturating_add(RETIREMENT_GRACE_SECS);
        if now > retires {
            break;
        }
        keep += 1;
    }
    keep
}

/// Reads the directory, deletes the files of retired keys, returns the published ones.
fn load_published(dir: &Path, now: u64, ttl: u64) -> Result<Vec<Key>, String> {
    let mut keys = read_keys(dir)?;
    let keep = retained(&keys, now, ttl);
    for old in keys.drain(keep..) {
        let path = key_path(dir, &old.kid);
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(kid = %old.kid, "deleted retired assertion key"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "could not delete retired assertion key; it is no longer published"
            ),
        }
    }
    Ok(keys)
}

fn key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}.pem"))
}

fn ensure_dir(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// Every `*.pem` key in `dir`, newest first (ties broken by kid, so the order is stable).
fn read_keys(dir: &Path) -> Result<Vec<Key>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut keys = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue; // temporary files of an interrupted write
        }
        let Some(kid) = name.strip_suffix(".pem") else {
            continue;
        };
        let path = entry.path();
        keys.push(read_key(&path, kid)?);
    }
    keys.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.kid.cmp(&a.kid)));
    Ok(keys)
}

fn read_key(path: &Path, kid_from_name: &str) -> Result<Key, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("assertion key {}: {e}", path.display()))?;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "assertion key is readable by other users; chmod 600 it");
        }
    }
    parse_key(&text, kid_from_name, &path.display().to_string())
}

/// The key in `text` (a key file's), which must be the one `kid_from_name` names; `what` says
/// where it came from, in errors.
fn parse_key(text: &str, kid_from_name: &str, what: &str) -> Result<Key, String> {
    let bad = |why: String| format!("assertion key {what}: {why}");
    let begin = text
        .find("-----BEGIN")
        .ok_or_else(|| bad("no PEM block".to_string()))?;
    let created = text[..begin]
        .lines()
        .find_map(|l| l.trim().strip_prefix(CREATED_PREFIX))
        .ok_or_else(|| {
            bad(format!(
                "no `{CREATED_PREFIX}<unix seconds>` line before the PEM block"
            ))
        })?
        .trim()
        .parse::<u64>()
        .map_err(|e| bad(format!("bad creation time: {e}")))?;
    let signs = match text[..begin]
        .lines()
        .find_map(|l| l.trim().strip_prefix(SIGNS_PREFIX))
    {
        Some(signs) => signs
            .trim()
            .parse::<u64>()
            .map_err(|e| bad(format!("bad signing time: {e}")))?,
        None => created,
    };
    let secret = SecretKey::from_pkcs8_pem(text[begin..].trim_end())
        .map_err(|e| bad(format!("not a PKCS#8 P-256 private key: {e}")))?;
    let key = Key::new(&secret, created, signs)?;
    if &*key.kid != kid_from_name {
        return Err(bad(format!(
            "the file name does not match the key's id {}",
            key.kid
        )));
    }
    Ok(key)
}

impl Key {
    fn new(secret: &SecretKey, created: u64, signs: u64) -> Result<Key, String> {
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| format!("encoding the assertion key: {e}"))?;
        let encoding = EncodingKey::from_ec_der(der.as_bytes());
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)
            .map_err(|e| format!("the assertion key's public part: {e}"))?;
        let kid = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| format!("the assertion key's thumbprint: {e}"))?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.clone());
        Ok(Key {
            kid: kid.into(),
            created,
            signs,
            encoding,
            jwk,
            header,
        })
    }
}

/// A new key created at `created` that signs from `signs`, and its text as a key file holds
/// it.
fn new_key(created: u64, signs: u64) -> Result<(Key, String), String> {
    let secret = random_secret()?;
    let key = Key::new(&secret, created, signs)?;
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| format!("encoding the assertion key: {e}"))?;
    let text = format!(
        "Portcullis assertion signing key {}\n{CREATED_PREFIX}{created}\n{SIGNS_PREFIX}{signs}\n{}",
        key.kid,
        pem.as_str()
    );
    Ok((key, text))
}

/// Run as root, gives what the command made at `path` (a key, the key directory) to the owner
/// of `like` where it is another's: `sudo portcullis rotate-assertion-key` would otherwise leave
/// root's 0600 key, or root's key directory, which the server, running as that owner, cannot
/// read. Only what is root's, and never through a link (`lchown`): the service user, who owns
/// `data_dir`, could otherwise put a link in its place and have root give it what it points at.
fn give_to_owner_of(like: &Path, path: &Path) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let reading = |path: &Path, e: std::io::Error| format!("reading {}: {e}", path.display());
    let owner = fs::metadata(like).map_err(|e| reading(like, e))?;
    let made = fs::symlink_metadata(path).map_err(|e| reading(path, e))?;
    if made.is_symlink() || made.uid() != 0 || owner.uid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(owner.uid()), Some(owner.gid())).map_err(|e| {
        let (path, like) = (path.display(), like.display());
        format!("giving {path} to the owner of {like}: {e}")
    })
}

/// Generates a key and writes it to `dir/<kid>.pem` (mode 0600, `dir`'s owner's, written to a
/// temporary file, synced and renamed into place).
fn generate_key(dir: &Path, created: u64, signs: u64) -> Result<Key, String> {
    let (key, contents) = new_key(created, signs)?;
    let path = key_path(dir, &key.kid);
    let tmp = dir.join(format!(".{}.pem.tmp", key.kid));
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", tmp.display());
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(fail("removing", e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| fail("creating", e))?;
    give_to_owner_of(dir, &tmp)?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| fail("writing", e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| fail("renaming", e))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(key)
}

/// The shared keys `kept` holds that are published at `now`, newest first.
/// A key this build cannot read is left out (and said so), never the reason to sign with none.
fn shared_keys(kept: &Kept, now: u64, ttl: u64) -> Result<Vec<Key>, String> {
    let mut keys: Vec<Key> = kept
        .assertion_keys()
        .iter()
        .filter_map(|(kid, text)| {
            parse_key(text, kid, &format!("{kid} (shared)"))
                .inspect_err(|e| tracing::warn!("{e}; not published"))
                .ok()
        })
        .collect();
    keys.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.kid.cmp(&a.kid)));
    keys.truncate(retained(&keys, now, ttl));
    Ok(keys)
}

fn shared_entry(kid: &str, text: Option<String>) -> Entry {
    Entry {
        kind: ASSERTION_KEY.to_owned(),
        key: kid.to_owned(),
        value: text,
    }
}

/// The first shared keys, for a fleet that has none: the keys this machine has in
/// `data_dir/assertion-keys/` (so that a machine joining a fleet keeps its upstreams'
/// trust), or a new one. Keys taken from the machine count as created at `now` (in their
/// order): should several replicas start at once and each bring its own, every key is then
/// published a whole token lifetime after another takes over, as after a rotation. A new one
/// is published [`PUBLISH_LEAD`] before it signs, as a rotation's is: alone, it signs at once
/// (no key signs before it); beside a machine's, started at once on another replica, it does
/// not take over from the key that machine's upstreams trust before they have seen it. (Two
/// replicas started at once that each bring a machine's key still do: the one kept second
/// signs at once, before the other machine's upstreams have fetched it; start one first.)
pub fn first_shared_keys(data_dir: &Path, now: u64) -> Result<Vec<Entry>, String> {
    let dir = key_dir(data_dir);
    let mut entries = Vec::new();
    // Those still published: a key retired (but not yet deleted, the machine stopped) is not
    // published again.
    let published = load_published(&dir, now, check_ttl(TOKEN_TTL)?)?;
    for (age, key) in (0u64..).zip(published) {
        let text = fs::read_to_string(key_path(&dir, &key.kid))
            .map_err(|e| format!("assertion key {}: {e}", key.kid))?;
        let begin = text.find("-----BEGIN").unwrap_or(0);
        let created = now.saturating_sub(age);
        // A key rotated in with a lead still waits for it.
        let signs = key.signs.max(created);
        let restamped = format!(
            "Portcullis assertion signing key {}\n{CREATED_PREFIX}{created}\n{SIGNS_PREFIX}{signs}\n{}",
            key.kid,
            &text[begin..]
        );
        entries.push(shared_entry(&key.kid, Some(restamped)));
    }
    if entries.is_empty() {
        let (key, text) = new_key(now, now + PUBLISH_LEAD.as_secs())?;
        entries.push(shared_entry(&key.kid, Some(text)));
    }
    Ok(entries)
}

/// Removes the keys of `data_dir/assertion-keys/` once the fleet's are kept in the shared
/// store: taken by its first start (see [`first_shared_keys`]) or never the fleet's, they sign
/// nothing, and a start without `[postgres]` would sign with them again (one rotated out after
/// a leak, say). Returns the kids removed.
pub fn forget_local_keys(data_dir: &Path) -> Result<Vec<String>, String> {
    let dir = key_dir(data_dir);
    let keys = read_keys(&dir)?;
    for key in &keys {
        let path = key_path(&dir, &key.kid);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", path.display())),
        }
    }
    // Gone when nothing else is in it (its temporary files are an interrupted write's).
    let _ = fs::remove_dir(&dir);
    Ok(keys.iter().map(|k| k.kid.to_string()).collect())
}

/// Rotates the shared keys `existing` (`(kid, text)`): a new signing key, signing `lead` from
/// `now`, and the keys retired by `now` forgotten. Returns the new kid, when it signs from,
/// and the entries to keep.
pub fn rotate_shared(
    existing: &[(String, String)],
    now: u64,
    lead: Duration,
    token_ttl: Duration,
) -> Result<(String, u64, Vec<Entry>), String> {
    let ttl = check_ttl(token_ttl)?;
    if existing.is_empty() {
        return Err(
            "the fleet keeps no assertion key yet: its first start takes the first replica's \
                    (data_dir/assertion-keys/) or makes one; start a replica first, then rotate"
                .to_owned(),
        );
    }
    let mut keys = existing
        .iter()
        .map(|(kid, text)| parse_key(text, kid, &format!("{kid} (shared)")))
        .collect::<Result<Vec<Key>, String>>()?;
    keys.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.kid.cmp(&a.kid)));
    let created = successor_created(&keys, now);
    let signs = now.saturating_add(lead.as_secs());
    let (key, text) = new_key(created, signs)?;
    let kid = key.kid.to_string();
    keys.insert(0, key);
    let keep = retained(&keys, now, ttl);
    let mut entries = vec![shared_entry(&kid, Some(text))];
    entries.extend(keys[keep..].iter().map(|old| shared_entry(&old.kid, None)));
    Ok((kid, signs, entries))
}

fn random_secret() -> Result<SecretKey, String> {
    // A uniformly random 32-byte string is a valid scalar except with probability ~2^-32.
    for _ in 0..16 {
        let mut bytes = p256::FieldBytes::default();
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| format!("reading the OS random source: {e}"))?;
        let secret = SecretKey::from_bytes(&bytes);
        p256::elliptic_curve::zeroize::Zeroize::zeroize(bytes.as_mut_slice());
        if let Ok(secret) = secret {
            return Ok(secret);
        }
    }
    Err("could not generate a P-256 key".to_string())
}

fn sign(key: &Key, claims: &AssertionClaims<'_>, iat: u64, exp: u64) -> Result<String, String> {
    let claims = JwtClaims {
        iss: claims.issuer,
        aud: match claims.served {
            Some(host) => Audience::RouteAndHost([claims.audience, host]),
            None => Audience::Route(claims.audience),
        },
        sub: claims.subject,
        email: claims.email,
        groups: claims.groups,
        portcullis_agent: claims.agent,
        act: claims
            .agent
            .filter(|_| claims.delegated)
            .map(|sub| ActClaim { sub }),
        iat,
        exp,
    };
    jsonwebtoken::encode(&key.header, &claims, &key.encoding)
        .map_err(|e| format!("signing the assertion: {e}"))
}

/// Lifetime of an identity assertion. Upstreams see a fresh one at least every [`REUSE_SECS`].
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    impl Signer {
        /// [`Signer::assertion`] as text.
        fn token(&self, claims: &AssertionClaims<'_>, now: u64) -> Result<String, String> {
            self.assertion(claims, now)
                .map(|value| value.to_str().unwrap_or_default().to_owned())
        }
    }
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    const TTL: Duration = Duration::from_secs(300);
    const T0: u64 = 1_700_000_000;

    fn real_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims<'a>(aud: &'a str, groups: &'a [String], version: u64) -> AssertionClaims<'a> {
        AssertionClaims {
            issuer: "https://auth.example.com",
            audience: aud,
            served: None,
            subject: "2819c223-7f76-453a-919d-413861904646",
            email: Some("alice@corp.example"),
            groups,
            agent: None,
            delegated: false,
            version,
        }
    }

    fn kid_of(token: &str) -> String {
        jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
    }

    fn jwks_kids(signer: &Signer) -> Vec<String> {
        let set: JwkSet = serde_json::from_str(&signer.jwks_json()).unwrap();
        set.keys
            .iter()
            .map(|k| k.common.key_id.clone().unwrap())
            .collect()
    }

    fn verify(signer: &Signer, token: &str, aud: &str) -> Result<Value, String> {
        let set: JwkSet = serde_json::from_str(&signer.jwks_json()).unwrap();
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        assert_eq!(header.alg, Algorithm::ES256);
        let kid = header.kid.ok_or("no kid")?;
        let jwk = set.find(&kid).ok_or("kid not in JWKS")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.set_issuer(&["https://auth.example.com"]);
        validation.set_audience(&[aud]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
    }

    fn pem_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(key_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// On a `*.` route the assertion names the host it was made for beside the route, and one
    /// made for a host is never served for another: no app behind the wildcard takes a sibling's.
    #[test]
    fn a_wildcard_route_s_assertion_names_the_host_it_was_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let now = real_now();
        let signer = Signer::open(dir.path(), now, TTL).unwrap();
        let groups = ["eng"].map(String::from);
        let route = "https://*.apps.example";
        let for_host = |host: &'static str| AssertionClaims {
            served: Some(host),
            ..claims(route, &groups, 1)
        };
        let payroll = signer
            .token(&for_host("https://payroll.apps.example"), now)
            .unwrap();
        let wiki = signer
            .token(&for_host("https://wiki.apps.example"), now)
            .unwrap();
        assert_ne!(payroll, wiki, "one token for two hosts");
        let made = verify(&signer, &payroll, "https://payroll.apps.example").unwrap();
        assert_eq!(
            made["aud"],
            serde_json::json!([route, "https://payroll.apps.example"])
        );
        // A verifier that checks the route's name still takes it; the sibling's host does not.
        assert!(verify(&signer, &payroll, route).is_ok());
        assert!(verify(&signer, &payroll, "https://wiki.apps.example").is_err());
        // One slot for the caller on the route, whatever the host: the last host's token.
        assert_eq!(signer.cache.len(), 1);
        let again = signer
            .token(&for_host("https://wiki.apps.example"), now)
            .unwrap();
        assert_eq!(again, wiki);
        // Elsewhere `aud` stays the route's name alone.
        let exact = signer
            .token(&claims("https://app.example", &groups, 1), now)
            .unwrap();
        let made = verify(&signer, &exact, "https://app.example").unwrap();
        assert_eq!(made["aud"], "https://app.example");
    }

    #[test]
    fn token_verifies_against_the_jwks_and_carries_the_claims() {
        let dir = tempfile::tempdir().unwrap();
        let now = real_now();
        let signer = Signer::open(dir.path(), now, TTL).unwrap();
        let groups = ["admins", "eng"].map(String::from);
        let token = signer.token(&claims("grafana", &groups, 1), now).unwrap();
        let got = verify(&signer, &token, "grafana").unwrap();
        assert_eq!(got["iss"], "https://auth.example.com");
        assert_eq!(got["aud"], "grafana");
        assert_eq!(got["sub"], "2819c223-7f76-453a-919d-413861904646");
        assert_eq!(got["email"], "alice@corp.example");
        assert_eq!(got["groups"], serde_json::json!(["admins", "eng"]));
        assert_eq!(got["iat"], now - ISSUED_EARLY_SECS);
        assert_eq!(got["exp"], now + 300);
        assert!(got.get("jti").is_none());
        // Wrong audience is refused by the verifier.
        assert!(verify(&signer, &token, "other").is_err());

        // No email: the claim is omitted.
        let mut c = claims("grafana", &[], 2);
        c.email = None;
        let token = signer.token(&c, now).unwrap();
        let got = verify(&signer, &token, "grafana").unwrap();
        assert!(got.get("email").is_none());
        assert_eq!(got["groups"], serde_json::json!([]));

        // The JWKS is what the issue promises.
        let jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        let k = &jwks["keys"][0];
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(k["alg"], "ES256");
        assert_eq!(k["use"], "sig");
        assert_eq!(k["kid"], kid_of(&token).as_str());
        assert_eq!(k["kid"].as_str().unwrap().len(), 43);
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        // RFC 7638 thumbprints are over the canonical JSON; recompute from the JWKS members.
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        let k = &jwks["keys"][0];
        let canonical = serde_json::to_string(&serde_json::json!({
            "crv": k["crv"], "kty": k["kty"], "x": k["x"], "y": k["y"],
        }))
        .unwrap(); // serde_json (without preserve_order) sorts keys
        assert_eq!(
            k["kid"].as_str().unwrap(),
            URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
        );
    }

    #[test]
    fn cache_reuses_tokens_and_never_serves_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        // The very same bytes: a cached token is shared, not copied.
        let same =
            |x: &HeaderValue, y: &HeaderValue| x.as_bytes().as_ptr() == y.as_bytes().as_ptr();
        let g1 = ["eng"].map(String::from);
        let a = signer.assertion(&claims("grafana", &g1, 7), T0).unwrap();
        let b = signer
            .assertion(&claims("grafana", &g1, 7), T0 + 59)
            .unwrap();
        assert!(same(&a, &b), "same inputs reuse the token");

        // Another route, another version, other groups, another email: a new token.
        let other_route = signer.assertion(&claims("wiki", &g1, 7), T0).unwrap();
        assert_ne!(other_route, a);
        let new_version = signer.assertion(&claims("grafana", &g1, 8), T0).unwrap();
        assert!(!same(&new_version, &a));
        let g2 = ["eng", "admins"].map(String::from);
        // Even if the caller forgot to bump the version, changed groups are not served stale.
        let new_groups = signer.assertion(&claims("grafana", &g2, 8), T0).unwrap();
        assert!(!same(&new_groups, &new_version));
        let body = |t: &HeaderValue| {
            let part = t.to_str().unwrap().split('.').nth(1).unwrap();
            serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
        };
        assert_eq!(
            body(&new_groups)["groups"],
            serde_json::json!(["eng", "admins"])
        );
        let mut c = claims("grafana", &g2, 8);
        c.email = Some("alice@new.example");
        let new_email = signer.assertion(&c, T0).unwrap();
        assert_eq!(body(&new_email)["email"], "alice@new.example");

        // Re-signed a minute after it was signed, not before: every token sent has 4 of its
        // 5 minutes left, for an upstream that checks it once a slow upload is read.
        let c = claims("grafana", &g2, 8);
        let t1 = signer.assertion(&c, T0).unwrap();
        let t2 = signer.assertion(&c, T0 + 59).unwrap();
        assert!(same(&t1, &t2));
        assert!(body(&t2)["exp"].as_u64().unwrap() - (T0 + 59) > 240);
        let t3 = signer.assertion(&c, T0 + 60).unwrap();
        assert!(!same(&t1, &t3));
        assert_eq!(body(&t3)["iat"], T0 + 60 - ISSUED_EARLY_SECS);
    }

    /// `entries` applied to `kept` as the directory's writer would.
    fn keep(kept: &Kept, entries: &[Entry]) {
        use portcullis_scim::store::EntrySink;
        kept.apply(entries);
    }

    fn shared_texts(kept: &Kept) -> Vec<(String, String)> {
        Vec::clone(&kept.assertion_keys())
    }

    #[test]
    fn shared_keys_start_from_this_machines_rotate_for_all_and_retire() {
        // A machine with a key file joins a fleet without keys: its key becomes the fleet's.
        let t0 = real_now();
        let dir = tempfile::tempdir().unwrap();
        let local = Signer::open(dir.path(), t0, TTL).unwrap();
        let local_kid = local.signing_kid(t0).unwrap().to_string();
        let kept = Arc::new(Kept::default());
        let signer = Signer::shared(kept.clone(), t0, TTL).unwrap();
        assert!(
            !signer.can_sign() && jwks_kids(&signer).is_empty(),
            "none yet"
        );
        assert!(signer.token(&claims("grafana", &[], 1), t0).is_err());
        let first = first_shared_keys(dir.path(), t0).unwrap();
        keep(&kept, &first);
        assert_eq!(signer.signing_kid(t0).as_deref(), Some(local_kid.as_str()));
        let token = signer.token(&claims("grafana", &[], 1), t0).unwrap();
        verify(&local, &token, "grafana").expect("the machine's old JWKS still verifies");

        // A rotation (as the CLI makes it, from the stored keys) is picked up on arrival.
        let t1 = t0 + 1000;
        let (new_kid, _, entries) =
            rotate_shared(&shared_texts(&kept), t1, Duration::ZERO, TTL).unwrap();
        assert_eq!(entries.len(), 1, "nothing retired yet");
        keep(&kept, &entries);
        assert_eq!(signer.signing_kid(t1).as_deref(), Some(new_kid.as_str()));
        assert_eq!(jwks_kids(&signer).len(), 2);
        // Once every token of the old key has expired, the next rotation forgets it.
        let t2 = t1 + 300 + 301;
        let (newest, _, entries) =
            rotate_shared(&shared_texts(&kept), t2, Duration::ZERO, TTL).unwrap();
        let forgotten: Vec<&str> = entries
            .iter()
            .filter(|e| e.value.is_none())
            .map(|e| e.key.as_str())
            .collect();
        assert_eq!(forgotten, vec![local_kid.as_str()]);
        keep(&kept, &entries);
        let mut want = vec![new_kid, newest];
        want.sort();
        let mut got = jwks_kids(&signer);
        got.sort();
        assert_eq!(got, want);
        // A fleet without local keys starts with a new one.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(first_shared_keys(empty.path(), t0).unwrap().len(), 1);
    }

    /// Once the fleet's keys are kept, this machine's are removed: a start without the shared
    /// store makes a new one rather than sign with one the fleet may have rotated out.
    #[test]
    fn this_machine_s_keys_are_forgotten_once_the_fleet_keeps_its_own() {
        let t0 = real_now();
        let dir = tempfile::tempdir().unwrap();
        let local = Signer::open(dir.path(), t0, TTL).unwrap();
        let kid = local.signing_kid(t0).unwrap().to_string();
        assert_eq!(forget_local_keys(dir.path()).unwrap(), vec![kid.clone()]);
        assert!(!key_dir(dir.path()).exists());
        assert_eq!(forget_local_keys(dir.path()).unwrap(), Vec::<String>::new());
        let again = Signer::open(dir.path(), t0, TTL).unwrap();
        assert_ne!(again.signing_kid(t0).unwrap().to_string(), kid);
    }

    /// Before the fleet's first start there is nothing to rotate: that start takes this
    /// machine's keys (or makes one), and a rotation's own first key would sign at once, or
    /// race it.
    #[test]
    fn a_rotation_before_the_fleet_s_first_start_is_refused() {
        let refused = rotate_shared(&[], real_now(), Duration::from_secs(180), TTL);
        assert!(refused.is_err_and(|e| e.contains("start a replica first")));
    }

    /// The keys a fleet's first start takes are those still published: one retired, whose
    /// file a stopped machine had not deleted yet, is not published again.
    #[test]
    fn the_fleet_takes_only_the_keys_still_published() {
        let t0 = real_now();
        let dir = tempfile::tempdir().unwrap();
        let old = Signer::open(dir.path(), t0, TTL).unwrap();
        let old_kid = old.signing_kid(t0).unwrap().to_string();
        let t1 = t0 + 1000;
        let (new_kid, _) = rotate_keys(dir.path(), t1, Duration::ZERO, TTL).unwrap();
        assert_eq!(pem_files(dir.path()).len(), 2);
        let taken = first_shared_keys(dir.path(), t1 + 300 + 301).unwrap();
        let kids: Vec<&str> = taken.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(kids, [new_kid.as_str()], "{old_kid} retired");
    }

    #[test]
    fn rotation_publishes_both_keys_then_retires_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let old_kid = signer.signing_kid(T0).unwrap().to_string();
        let eng = ["eng"].map(String::from);
        let c = claims("grafana", &eng, 1);
        let before = signer.token(&c, T0).unwrap();
        assert_eq!(kid_of(&before), old_kid);

        let t1 = T0 + 1000;
        let new_kid = signer.rotate(t1, 0).unwrap();
        assert_ne!(new_kid, old_kid);
        assert_eq!(&*signer.signing_kid(t1).unwrap(), new_kid);
        let after = signer.token(&c, t1).unwrap();
        assert_eq!(
            kid_of(&after),
            new_kid,
            "a cached token of the old key is not served"
        );
        let mut kids = jwks_kids(&signer);
        kids.sort();
        let mut want = vec![old_kid.clone(), new_kid.clone()];
        want.sort();
        assert_eq!(kids, want);
        assert_eq!(pem_files(dir.path()).len(), 2);

        // Still published at the end of the grace period...
        signer.refresh(t1 + 300 + 300).unwrap();
        assert_eq!(jwks_kids(&signer).len(), 2);
        // ...and gone, file included, right after.
        signer.refresh(t1 + 300 + 301).unwrap();
        assert_eq!(jwks_kids(&signer), vec![new_kid.clone()]);
        assert_eq!(pem_files(dir.path()), vec![format!("{new_kid}.pem")]);
    }

    /// A rotated key is published before it signs: an upstream that fetched the JWKS just
    /// before the rotation verifies every assertion until it signs, by when it has fetched
    /// the JWKS again.
    #[test]
    fn a_rotated_key_is_published_for_its_lead_before_it_signs() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let c = claims("grafana", &[], 1);
        let old_kid = signer.signing_kid(T0).unwrap().to_string();
        let t1 = T0 + 1000;
        let lead = PUBLISH_LEAD.as_secs();
        let (new_kid, signs) = rotate_keys(dir.path(), t1, PUBLISH_LEAD, TTL).unwrap();
        assert_eq!(signs, t1 + lead);
        signer.refresh(t1).unwrap();
        assert_eq!(jwks_kids(&signer), vec![new_kid.clone(), old_kid.clone()]);
        for now in [t1, t1 + lead - 1] {
            assert_eq!(kid_of(&signer.token(&c, now).unwrap()), old_kid, "at {now}");
        }
        assert_eq!(kid_of(&signer.token(&c, t1 + lead).unwrap()), new_kid);
        // Kept across a restart, in the key file.
        let again = Signer::open(dir.path(), t1 + 1, TTL).unwrap();
        assert_eq!(&*again.signing_kid(t1 + 1).unwrap(), old_kid);
        assert_eq!(&*again.signing_kid(t1 + lead).unwrap(), new_kid);
        // The old key is published until its tokens have expired after the new one took over.
        signer.refresh(t1 + lead + 300 + 300).unwrap();
        assert_eq!(jwks_kids(&signer).len(), 2);
        signer.refresh(t1 + lead + 300 + 301).unwrap();
        assert_eq!(jwks_kids(&signer), vec![new_kid.clone()]);

        // So with shared keys (which a signer refreshes at the real time as they arrive).
        let (t0, kept) = (real_now(), Arc::new(Kept::default()));
        let shared = Signer::shared(kept.clone(), t0, TTL).unwrap();
        keep(&kept, &first_shared_keys(dir.path(), t0).unwrap());
        let first = shared.signing_kid(t0).unwrap().to_string();
        let t1 = t0 + 10;
        let (next, signs, entries) =
            rotate_shared(&shared_texts(&kept), t1, PUBLISH_LEAD, TTL).unwrap();
        keep(&kept, &entries);
        assert_eq!(signs, t1 + lead);
        assert!(jwks_kids(&shared).contains(&next));
        assert_eq!(&*shared.signing_kid(t1 + lead - 1).unwrap(), first);
        assert_eq!(&*shared.signing_kid(t1 + lead).unwrap(), next);
        // A machine's keys that join a fleet keep their lead.
        let machine = tempfile::tempdir().unwrap();
        let signer = Signer::open(machine.path(), t0, TTL).unwrap();
        let signing = signer.signing_kid(t0).unwrap().to_string();
        let (ahead, _) = rotate_keys(machine.path(), t0, PUBLISH_LEAD, TTL).unwrap();
        let kept = Arc::new(Kept::default());
        let fleet = Signer::shared(kept.clone(), t0, TTL).unwrap();
        keep(&kept, &first_shared_keys(machine.path(), t0).unwrap());
        assert_eq!(&*fleet.signing_kid(t0).unwrap(), signing);
        assert_eq!(&*fleet.signing_kid(t0 + lead).unwrap(), ahead);
    }

    /// Two replicas of a new fleet start at once: one brings its machine's key, the other
    /// makes one. The machine's, which its upstreams trust, signs until the new one has been
    /// published as long as a rotation's lead.
    #[test]
    fn a_fleet_started_at_once_keeps_signing_with_the_machine_s_key() {
        let t0 = real_now();
        let lead = PUBLISH_LEAD.as_secs();
        let machine = tempfile::tempdir().unwrap();
        let signer = Signer::open(machine.path(), t0, TTL).unwrap();
        let trusted = signer.signing_kid(t0).unwrap().to_string();
        let kept = Arc::new(Kept::default());
        let fleet = Signer::shared(kept.clone(), t0, TTL).unwrap();
        keep(&kept, &first_shared_keys(machine.path(), t0).unwrap());
        let fresh = tempfile::tempdir().unwrap();
        let made = first_shared_keys(fresh.path(), t0 + 1).unwrap();
        keep(&kept, &made);
        assert_eq!(&*fleet.signing_kid(t0 + 1).unwrap(), trusted);
        assert_eq!(&*fleet.signing_kid(t0 + 1 + lead).unwrap(), made[0].key);
        // Alone, a new fleet's first key signs at once.
        let kept = Arc::new(Kept::default());
        let alone = Signer::shared(kept.clone(), t0, TTL).unwrap();
        keep(&kept, &first_shared_keys(fresh.path(), t0).unwrap());
        assert!(alone.token(&claims("grafana", &[], 1), t0).is_ok());
    }

    #[test]
    fn cli_rotation_is_picked_up_by_refresh_and_old_keys_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let k1 = signer.signing_kid(T0).unwrap().to_string();
        let (k2, _) = rotate_keys(dir.path(), T0 + 10, Duration::ZERO, TTL).unwrap();
        // Rotated twice in a row: every key is still published (k1 signed until k2 appeared).
        let (k3, _) = rotate_keys(dir.path(), T0 + 20, Duration::ZERO, TTL).unwrap();
        assert_eq!(
            &*signer.signing_kid(T0 + 30).unwrap(),
            k1,
            "not before a refresh"
        );
        signer.refresh(T0 + 30).unwrap();
        assert_eq!(&*signer.signing_kid(T0 + 30).unwrap(), k3);
        assert_eq!(jwks_kids(&signer), vec![k3.clone(), k2.clone(), k1.clone()]);
        // k1 retires at k2's creation + ttl + grace, k2 at k3's.
        assert_eq!(
            prune_keys(dir.path(), T0 + 10 + 600, TTL).unwrap(),
            vec![k3.clone(), k2.clone(), k1.clone()]
        );
        assert_eq!(
            prune_keys(dir.path(), T0 + 10 + 601, TTL).unwrap(),
            vec![k3.clone(), k2.clone()]
        );
        assert_eq!(
            prune_keys(dir.path(), T0 + 20 + 601, TTL).unwrap(),
            vec![k3.clone()]
        );
        // The newest is kept forever.
        assert_eq!(
            prune_keys(dir.path(), T0 + 10_000_000, TTL).unwrap(),
            vec![k3.clone()]
        );
        signer.refresh(T0 + 10_000_000).unwrap();
        assert_eq!(jwks_kids(&signer), vec![k3]);
    }

    /// `sudo portcullis rotate-assertion-key` writes a key (and its directory, if it makes
    /// it) the server, running as the owner of the data directory (or of the key directory it
    /// made), can read.
    #[test]
    fn a_key_written_by_root_is_its_directory_s_owner_s() {
        let dir = tempfile::tempdir().unwrap();
        let owned = |path: &Path| {
            let meta = fs::metadata(path).unwrap();
            (meta.uid(), meta.gid())
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: a directory of another user's cannot be made here");
            return;
        }
        // The service user's directory, as root writes into it.
        let nobody = (65_534, 65_534);
        std::os::unix::fs::chown(dir.path(), Some(nobody.0), Some(nobody.1)).unwrap();
        let (kid, _) = rotate_keys(dir.path(), T0, Duration::ZERO, TTL).unwrap();
        let keys = key_dir(dir.path());
        assert_eq!(owned(&keys), nobody);
        assert_eq!(owned(&key_path(&keys, &kid)), nobody);
        // A key directory already there is left as it is, and its keys are its owner's (a
        // data directory of root's the server writes in as a group's member).
        std::os::unix::fs::chown(dir.path(), Some(0), Some(0)).unwrap();
        let (kid, _) = rotate_keys(dir.path(), T0 + 1, Duration::ZERO, TTL).unwrap();
        assert_eq!(owned(&keys), nobody);
        assert_eq!(owned(&key_path(&keys, &kid)), nobody);
        // A link the service user put where the key directory is made gives it nothing,
        // whatever it points at.
        let victim = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(victim.path(), &link).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(nobody.0), Some(nobody.1)).unwrap();
        give_to_owner_of(dir.path(), &link).unwrap();
        assert_eq!(owned(victim.path()), (0, 0));
        // Nor are keys written through it.
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(victim.path(), key_dir(linked.path())).unwrap();
        assert!(rotate_keys(linked.path(), T0, Duration::ZERO, TTL).is_err());
        assert_eq!(fs::read_dir(victim.path()).unwrap().count(), 0);
    }

    /// Before the first start there is no data_dir: a rotation (run as root, say) makes none.
    #[test]
    fn a_rotation_makes_no_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let refused = rotate_keys(&data_dir, T0, Duration::ZERO, TTL);
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("first start")),
            "{refused:?}"
        );
        assert!(!data_dir.exists());
    }

    #[test]
    fn rotation_with_a_clock_behind_still_makes_the_new_key_the_signer() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let new_kid = signer.rotate(T0 - 100, 0).unwrap();
        assert_eq!(&*signer.signing_kid(T0 - 100).unwrap(), new_kid);
    }

    #[test]
    fn restart_keeps_the_signing_key_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = Signer::open(dir.path(), T0, TTL).unwrap();
        let kid = first.signing_kid(T0).unwrap();
        let rotated = first.rotate(T0 + 5, 0).unwrap();
        drop(first);
        let again = Signer::open(dir.path(), T0 + 60, TTL).unwrap();
        assert_eq!(&*again.signing_kid(T0 + 60).unwrap(), rotated);
        assert_eq!(jwks_kids(&again).len(), 2);
        assert!(jwks_kids(&again).contains(&kid.to_string()));

        let keys = key_dir(dir.path());
        assert_eq!(
            fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for name in pem_files(dir.path()) {
            let mode = fs::metadata(keys.join(&name)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        // The file is a standard PKCS#8 PEM after the preamble.
        let text = fs::read_to_string(keys.join(format!("{rotated}.pem"))).unwrap();
        assert!(text.contains("-----BEGIN PRIVATE KEY-----"));
        assert!(text.contains(&format!("{CREATED_PREFIX}{}", T0 + 5)));
    }

    #[test]
    fn corrupt_or_misnamed_key_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let kid = signer.signing_kid(T0).unwrap();
        let keys = key_dir(dir.path());
        let path = keys.join(format!("{kid}.pem"));
        let good = fs::read_to_string(&path).unwrap();

        fs::write(
            &path,
            format!("{CREATED_PREFIX}{T0}\n-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        let err = Signer::open(dir.path(), T0, TTL).err().unwrap();
        assert!(
            err.contains(&*kid) && err.contains("not a PKCS#8 P-256 private key"),
            "{err}"
        );
        // A running signer keeps its keys when a refresh finds garbage.
        assert!(signer.refresh(T0).is_err());
        assert_eq!(signer.signing_kid(T0).unwrap(), kid);

        fs::write(&path, "garbage").unwrap();
        let err = Signer::open(dir.path(), T0, TTL).err().unwrap();
        assert!(err.contains("no PEM block"), "{err}");

        let no_created = good
            .lines()
            .filter(|l| !l.starts_with(CREATED_PREFIX))
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(&path, no_created).unwrap();
        let err = Signer::open(dir.path(), T0, TTL).err().unwrap();
        assert!(err.contains("Created:"), "{err}");

        fs::remove_file(&path).unwrap();
        fs::write(keys.join("renamed.pem"), &good).unwrap();
        let err = Signer::open(dir.path(), T0, TTL).err().unwrap();
        assert!(err.contains("does not match"), "{err}");

        // Temporary files and non-PEM files are ignored.
        fs::remove_file(keys.join("renamed.pem")).unwrap();
        fs::write(keys.join(".abc.pem.tmp"), "partial").unwrap();
        fs::write(keys.join("README"), "hello").unwrap();
        assert!(Signer::open(dir.path(), T0, TTL).is_ok());

        assert!(Signer::open(dir.path(), T0, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        for i in 0..CACHE_CAPACITY {
            // Fill without signing: the bound is about slots, not tokens.
            signer.cache.insert(
                i as u64,
                Cached {
                    issuer: "".into(),
                    audience: "".into(),
                    served: None,
                    subject: "".into(),
                    email: None,
                    groups: Box::new([]),
                    agent: None,
                    delegated: false,
                    version: 0,
                    signed: Signed {
                        token: HeaderValue::from_static(""),
                        kid: "".into(),
                        iat: T0,
                        exp: T0 + 300,
                    },
                },
            );
        }
        let held: usize = signer.cache.iter().map(|c| c.bytes()).sum();
        signer.cache_bytes.store(held, Ordering::Relaxed);
        // Full: what it holds stays, and a new slot's token is signed, not kept.
        let token = signer.token(&claims("grafana", &[], 1), T0).unwrap();
        assert!(!token.is_empty());
        assert_eq!(signer.cache.len(), CACHE_CAPACITY);
        signer.refresh(T0 + 301).unwrap();
        assert_eq!(signer.cache.len(), 0, "expired entries are dropped");
        assert_eq!(signer.cache_bytes.load(Ordering::Relaxed), 0);
        signer.token(&claims("grafana", &[], 1), T0 + 301).unwrap();
        assert_eq!(signer.cache.len(), 1);

        // And in bytes: a person in many groups fills it sooner.
        let many: Vec<String> = (0..150).map(|g| format!("group-{g:024}")).collect();
        let before = signer.cache_bytes.load(Ordering::Relaxed);
        signer.token(&claims("wiki", &many, 1), T0 + 301).unwrap();
        let one = signer.cache_bytes.load(Ordering::Relaxed) - before;
        assert!(one > 150 * 30, "{one}");
        signer
            .cache_bytes
            .store(CACHE_BYTES - one / 2, Ordering::Relaxed);
        signer.token(&claims("docs", &many, 1), T0 + 301).unwrap();
        assert_eq!(signer.cache.len(), 2, "past the bytes it holds");
        // A slot whose token grows past them is let go; one that keeps its size stays.
        signer
            .token(&claims("grafana", &many, 2), T0 + 301)
            .unwrap();
        assert_eq!(signer.cache.len(), 1, "grown past the bytes it holds");
        assert!(signer.cache_bytes.load(Ordering::Relaxed) <= CACHE_BYTES);
        signer.token(&claims("wiki", &many, 2), T0 + 301).unwrap();
        assert_eq!(signer.cache.len(), 1);
        let slot = signer.cache.iter().next().map(|c| c.version);
        assert_eq!(slot, Some(2), "signed again in its slot");
    }

    #[test]
    fn bench_sign_vs_cached() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path(), T0, TTL).unwrap();
        let groups = ["eng", "admins", "oncall"].map(String::from);
        let n = 200u64;
        let start = Instant::now();
        for v in 0..n {
            signer.token(&claims("grafana", &groups, v), T0).unwrap();
        }
        let sign = start.elapsed() / n as u32;
        let c = claims("grafana", &groups, n);
        signer.token(&c, T0).unwrap();
        let hits = 100_000u32;
        let start = Instant::now();
        for _ in 0..hits {
            std::hint::black_box(signer.assertion(std::hint::black_box(&c), T0).unwrap());
        }
        let hit = start.elapsed() / hits;
        println!("assertion: sign {sign:?}/token, cached hit {hit:?}/token");
    }
}
