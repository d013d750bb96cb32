//! A count that only grows: read without a lock on the request path (every decision reads
//! it, see `streams::Marks`), and watched by those who act when it moves.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct Watched {
    count: AtomicU64,
    watch: tokio::sync::watch::Sender<u64>,
}

impl Default for Watched {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            watch: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Watched {
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Counts one more, then wakes the watchers.
    pub fn bump(&self) {
        let count = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        self.watch.send_replace(count);
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watch.subscribe()
    }
}
