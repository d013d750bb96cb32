//! Bearer tokens already verified, so that a machine sending the same token on every request
//! pays for its signature check once, not per request (an RS256 check costs far more than
//! the whole proxy hop: `bench/proxy.py`'s machine-JWT row).
//!
//! An entry is used only while everything its verification relied on still holds: the token
//! has not expired (with the issuer's leeway), the issuer's key set is the one it was checked
//! against (any refetch starts over), and the configuration has not been reloaded since. Only
//! the token's SHA-256 is kept, never the token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use sha2::{Digest, Sha256};

use super::jwt::Jwks;
use crate::caller::Caller;

/// Most tokens remembered; past this, expired ones are dropped, and if that is not enough,
/// all of them (each is then verified again once).
const MAX_ENTRIES: usize = 100_000;

pub type TokenHash = [u8; 32];

/// One verification and what it relied on.
pub struct Entry {
    pub caller: Caller,
    /// Unix seconds until which the token is valid (its `exp` plus the leeway).
    pub valid_until: u64,
    pub jwks: Arc<Jwks>,
    /// The key set's generation, read before verifying.
    pub keys: u64,
    /// [`Verified::epoch`], read before verifying.
    pub epoch: u64,
}

#[derive(Default)]
pub struct Verified {
    /// Keyed by the SHA-256 of the token: foldhash, not SipHash, for the map's own hash.
    entries: DashMap<TokenHash, Entry, foldhash::fast::RandomState>,
    /// Bumped on every reload: issuers' rules (audiences, algorithms, leeway) may have changed.
    epoch: AtomicU64,
}

impl Verified {
    pub fn hash(token: &str) -> TokenHash {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The caller a token was verified as, if that verification still holds at `now`.
    pub fn get(&self, hash: &TokenHash, now: u64) -> Option<Caller> {
        let entry = self.entries.get(hash)?;
        let holds = now < entry.valid_until
            && entry.keys == entry.jwks.generation()
            && entry.epoch == self.epoch.load(Ordering::Acquire);
        holds.then(|| entry.caller.clone())
    }

    /// Remembers a verification.
    pub fn insert(&self, hash: TokenHash, entry: Entry, now: u64) {
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, entry| now < entry.valid_until);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(hash, entry);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Forgets every verification: the configuration changed.
    pub fn config_changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Caller {
        Caller::Machine(Arc::new(crate::testing::machine("build-agent")))
    }

    fn jwks() -> Arc<Jwks> {
        Arc::new(Jwks::new(
            "http://127.0.0.1:9/jwks".to_owned(),
            reqwest::Client::new(),
        ))
    }

    fn entry(verified: &Verified, jwks: &Arc<Jwks>, valid_until: u64) -> Entry {
        Entry {
            caller: machine(),
            valid_until,
            jwks: jwks.clone(),
            keys: jwks.generation(),
            epoch: verified.epoch(),
        }
    }

    #[test]
    fn a_verification_holds_until_the_token_expires_or_the_config_changes() {
        let verified = Verified::default();
        let jwks = jwks();
        let token = Verified::hash("header.payload.signature");
        assert!(verified.get(&token, 100).is_none());

        verified.insert(token, entry(&verified, &jwks, 200), 100);
        assert!(verified.get(&token, 199).is_some());
        assert!(verified.get(&token, 200).is_none(), "expired");
        assert!(verified.get(&Verified::hash("other"), 100).is_none());

        verified.config_changed();
        assert!(verified.get(&token, 150).is_none(), "reloaded");
        // Verified before the reload, stored after it: never used.
        let stale = Entry {
            epoch: verified.epoch() - 1,
            ..entry(&verified, &jwks, 200)
        };
        verified.insert(token, stale, 100);
        assert!(verified.get(&token, 150).is_none());
    }

    #[test]
    fn the_cache_is_bounded() {
        let verified = Verified::default();
        let jwks = jwks();
        for n in 0..MAX_ENTRIES + 10 {
            let valid_until = if n % 2 == 0 { 50 } else { 200 };
            let e = entry(&verified, &jwks, valid_until);
            verified.insert(Verified::hash(&n.to_string()), e, 100);
        }
        assert!(verified.entries.len() <= MAX_ENTRIES);
    }
}
