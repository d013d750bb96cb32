//! The wall clock, read in one place. Code that checks expiry takes `now` as a parameter (unix
//! seconds), so tests can move it; only the edges (a request arriving, a background loop
//! ticking) call [`now_unix`].

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is set before it).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
