//! Bearer tokens already verified, so that a machine sending the same token on every request
//! pays for its signature check once, not per request (an RS256 check costs far more than
//! the whole proxy hop: `bench/proxy.py`'s machine-JWT row).
//!
//! An entry is used only while everything its verification relied on still holds: the token
//! has not expired (with the issuer's leeway), the issuer's key set is the one it was checked
//! against (any refetch starts over), and the request asking lives by the configuration it was
//! verified under (each installed configuration has an epoch of its own). Only the token's
//! SHA-256 is kept, never the token.

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
    /// The epoch of the configuration it was verified under (`Runtime::tokens_epoch`).
    pub epoch: u64,
}

#[derive(Default)]
pub struct Verified {
    /// Keyed by the SHA-256 of the token: foldhash, not SipHash, for the map's own hash.
    entries: DashMap<TokenHash, Entry, foldhash::fast::RandomState>,
    /// The epoch of the configuration last installed: bumped on every reload, as issuers' rules
    /// (audiences, algorithms, leeway) may have changed.
    epoch: AtomicU64,
}

impl Verified {
    pub fn hash(token: &str) -> TokenHash {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The caller a token was verified as, if that verification still holds at `now` for a
    /// request living by the configuration of `epoch`.
    pub fn get(&self, hash: &TokenHash, now: u64, epoch: u64) -> Option<Caller> {
        let entry = self.entries.get(hash)?;
        let holds = now < entry.valid_until
            && entry.keys == entry.jwks.generation()
            && entry.epoch == epoch;
        holds.then(|| entry.caller.clone())
    }

    /// Remembers a verification.
    pub fn insert(&self, hash: TokenHash, entry: Entry, now: u64) {
        if self.entries.len() >= MAX_ENTRIES {
            // Also those of an earlier configuration (stored by requests that began under it).
            let epoch = self.epoch.load(Ordering::Acquire);
            self.entries
                .retain(|_, entry| now < entry.valid_until && entry.epoch == epoch);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(hash, entry);
    }

    /// Forgets every verification: a configuration is being installed. Returns its epoch.
    pub fn config_changed(&self) -> u64 {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.entries.clear();
        epoch
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

    fn entry(jwks: &Arc<Jwks>, valid_until: u64) -> Entry {
        Entry {
            caller: machine(),
            valid_until,
            jwks: jwks.clone(),
            keys: jwks.generation(),
            epoch: 0,
        }
    }

    #[test]
    fn a_verification_holds_until_the_token_expires_or_the_config_changes() {
        let verified = Verified::default();
        let jwks = jwks();
        let token = Verified::hash("header.payload.signature");
        assert!(verified.get(&token, 100, 0).is_none());

        verified.insert(token, entry(&jwks, 200), 100);
        assert!(verified.get(&token, 199, 0).is_some());
        assert!(verified.get(&token, 200, 0).is_none(), "expired");
        assert!(verified.get(&Verified::hash("other"), 100, 0).is_none());

        let reloaded = verified.config_changed();
        assert_eq!(reloaded, 1);
        assert!(verified.get(&token, 150, 0).is_none(), "reloaded");
        // Verified under the old configuration, stored after the reload: used only by
        // requests living by the old one.
        verified.insert(token, entry(&jwks, 200), 100);
        assert!(verified.get(&token, 150, reloaded).is_none());
        assert!(verified.get(&token, 150, 0).is_some());
    }

    #[test]
    fn the_cache_is_bounded() {
        let verified = Verified::default();
        let jwks = jwks();
        for n in 0..MAX_ENTRIES + 10 {
            let valid_until = if n % 2 == 0 { 50 } else { 200 };
            let e = entry(&jwks, valid_until);
            verified.insert(Verified::hash(&n.to_string()), e, 100);
        }
        assert!(verified.entries.len() <= MAX_ENTRIES);
    }
}
