//! What may be used once: a back-channel logout token (its `jti`) and a sign-in (its
//! `state`). Each use is kept as long as the same thing could be presented again, and no more
//! than a bound of them at once: anyone can start sign-ins.

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

/// Whether a use is the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    First,
    Again,
    /// As many uses as may be kept are kept, none of them old enough to forget: this one is
    /// not recorded.
    Full,
}

pub struct UsedOnce {
    /// Each use, with the Unix second it is kept `keep` from.
    used: DashMap<String, u64>,
    keep: u64,
    max: usize,
}

impl UsedOnce {
    pub fn new(keep: u64, max: usize) -> Self {
        Self {
            used: DashMap::new(),
            keep,
            max,
        }
    }

    /// Records a use of `key`, kept until `keep` after `from`.
    pub fn record(&self, key: &str, from: u64, now: u64) -> Use {
        if self.used.contains_key(key) {
            return Use::Again;
        }
        if self.used.len() >= self.max {
            self.sweep(now);
            if self.used.len() >= self.max {
                return Use::Full;
            }
        }
        match self.used.entry(key.to_owned()) {
            Entry::Occupied(_) => Use::Again,
            Entry::Vacant(vacant) => {
                vacant.insert(from);
                Use::First
            }
        }
    }

    /// Forgets a use of `key`: what it was for did not happen.
    pub fn forget(&self, key: &str) {
        self.used.remove(key);
    }

    /// Forgets the uses kept long enough.
    pub fn sweep(&self, now: u64) {
        self.used
            .retain(|_, from| from.saturating_add(self.keep) > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_is_first_once_and_kept_within_its_time_and_the_bound() {
        let once = UsedOnce::new(600, 2);
        assert_eq!(once.record("a", 1000, 1000), Use::First);
        assert_eq!(once.record("a", 1000, 1001), Use::Again);
        assert_eq!(once.record("b", 1000, 1001), Use::First);
        // Full of uses still kept: a new one is not recorded, and so not first either.
        assert_eq!(once.record("c", 1000, 1002), Use::Full);
        assert_eq!(once.record("a", 1000, 1002), Use::Again);
        // Once they are old enough to be forgotten, there is room again.
        assert_eq!(once.record("c", 1600, 1600), Use::First);
        assert_eq!(once.record("a", 1600, 1600), Use::First);
        once.forget("a");
        assert_eq!(once.record("a", 1600, 1601), Use::First);
    }
}
