//! The wall clock, read in one place. Code that checks expiry takes `now` as a parameter (unix
//! seconds), so tests can move it; only the edges (a request arriving, a background loop
//! ticking) call [`now_unix`].

use std::time::{SystemTime, UNIX_EPOCH};

use nix::time::{clock_gettime, ClockId};

/// Seconds since the Unix epoch (0 if the clock is set before it).
///
/// Read from `CLOCK_REALTIME_COARSE`: the time of the last timer tick, a few milliseconds
/// behind at most, which is nothing at the resolution of a second. It is read for every
/// request and every body chunk, and costs a few nanoseconds where the precise clock (the
/// time stamp counter, in a VM) costs tens.
pub fn now_unix() -> u64 {
    match clock_gettime(ClockId::CLOCK_REALTIME_COARSE) {
        Ok(now) => u64::try_from(now.tv_sec()).unwrap_or(0),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_keeps_to_the_wall_clock() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = now_unix();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // At most one timer tick behind: it may still show the second before.
        assert!(
            before.saturating_sub(1) <= now && now <= after,
            "{before} {now} {after}"
        );
    }
}
