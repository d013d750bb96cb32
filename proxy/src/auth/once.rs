//! What may be used once: a back-channel logout token (its `jti`) and a sign-in (its
//! `state`). Each use is kept as long as the same thing could be presented again, and no more
//! than a bound of them at once (anyone can start sign-ins): past it, the oldest kept is
//! forgotten. Every operation is constant time, whatever is kept: a flood costs its senders
//! more than it costs Portcullis.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Whether a use is the first (that Portcullis knows of).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    First,
    Again,
}

pub struct UsedOnce {
    kept: Mutex<Kept>,
    keep: u64,
    max: usize,
}

#[derive(Default)]
struct Kept {
    /// Each use kept: the Unix second it is kept `keep` from, and its place in `order`.
    uses: HashMap<String, (u64, u64)>,
    /// The uses in the order they were recorded, by place; a place no longer in `uses` is
    /// one forgotten since.
    order: VecDeque<(u64, String)>,
    next: u64,
}

impl Kept {
    /// Forgets the oldest recorded use; false when there is none.
    fn forget_oldest(&mut self) -> bool {
        let Some((place, key)) = self.order.pop_front() else {
            return false;
        };
        if self.uses.get(&key).is_some_and(|&(_, at)| at == place) {
            self.uses.remove(&key);
        }
        true
    }

    /// Forgets, oldest first, the uses kept long enough.
    fn forget_old(&mut self, keep: u64, now: u64) {
        while let Some((place, key)) = self.order.front() {
            match self.uses.get(key) {
                Some(&(from, at)) if at == *place && from.saturating_add(keep) > now => return,
                _ => {
                    self.forget_oldest();
                }
            }
        }
    }
}

impl UsedOnce {
    pub fn new(keep: u64, max: usize) -> Self {
        Self {
            kept: Mutex::new(Kept::default()),
            keep,
            max,
        }
    }

    /// Records a use of `key`, kept until `keep` after `from` (or until `max` later ones).
    pub fn record(&self, key: &str, from: u64, now: u64) -> Use {
        let mut kept = self.kept();
        kept.forget_old(self.keep, now);
        if kept.uses.contains_key(key) {
            return Use::Again;
        }
        // (The order also holds the places of uses forgotten since: bounded too.)
        while (kept.uses.len() >= self.max || kept.order.len() >= 2 * self.max)
            && kept.forget_oldest()
        {}
        let place = kept.next;
        kept.next += 1;
        kept.uses.insert(key.to_owned(), (from, place));
        kept.order.push_back((place, key.to_owned()));
        Use::First
    }

    /// Forgets a use of `key`: what it was for did not happen.
    pub fn forget(&self, key: &str) {
        self.kept().uses.remove(key);
    }

    /// Forgets the uses kept long enough.
    pub fn sweep(&self, now: u64) {
        self.kept().forget_old(self.keep, now);
    }

    /// The uses kept, also after a panic while they were held: a use kept then is still
    /// known (a replay is refused, never taken for a first use); a place in `order` that
    /// outlived its use is one forgotten since, as any other.
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while the uses were held does not make every later use a first one (a logout
    /// token or a sign-in replayed).
    #[test]
    fn a_use_kept_stays_known_after_a_panic_while_the_uses_were_held() {
        let once = std::sync::Arc::new(UsedOnce::new(600, 10));
        assert_eq!(once.record("a", 1000, 1000), Use::First);
        let held = once.clone();
        let panicked = std::thread::spawn(move || {
            let _kept = held.kept.lock();
            panic!("while the uses were held");
        })
        .join();
        assert!(panicked.is_err() && once.kept.is_poisoned());
        assert_eq!(once.record("a", 1000, 1001), Use::Again);
        assert_eq!(once.record("b", 1000, 1001), Use::First);
    }

    #[test]
    fn a_use_is_first_once_kept_for_its_time_and_the_oldest_gives_way() {
        let once = UsedOnce::new(600, 2);
        assert_eq!(once.record("a", 1000, 1000), Use::First);
        assert_eq!(once.record("a", 1000, 1001), Use::Again);
        assert_eq!(once.record("b", 1000, 1001), Use::First);
        // Full: the oldest kept gives way to the new one.
        assert_eq!(once.record("c", 1001, 1002), Use::First);
        assert_eq!(once.record("b", 1000, 1002), Use::Again);
        assert_eq!(once.record("c", 1001, 1002), Use::Again);
        assert_eq!(once.record("a", 1000, 1002), Use::First, "a gave way");
        // Forgotten, then recorded again: its old place does not take the new one away.
        once.forget("c");
        assert_eq!(once.record("c", 1002, 1003), Use::First);
        assert_eq!(once.record("c", 1002, 1003), Use::Again);
        // Kept long enough: forgotten.
        assert_eq!(once.record("c", 1002, 1601), Use::Again);
        assert_eq!(
            once.record("c", 1002, 1602),
            Use::First,
            "kept 600 s from 1002"
        );
        once.sweep(5000);
        assert_eq!(once.record("a", 5000, 5000), Use::First);
    }
}
