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

/// A duration as a command line gives it: a whole number and a unit (`s`, `m`, `h`, `d`, `w`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?}: expected a duration like 30s, 3m, 1h");
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    let seconds = number.checked_mul(seconds).ok_or_else(bad)?;
    Ok(std::time::Duration::from_secs(seconds))
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
