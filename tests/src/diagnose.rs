//! Why a child process is not ready: what a start-up wait prints when it gives up.
//!
//! A bare "not ready after 60s" says nothing about the cause. [`report`] says what the process
//! was doing at that moment, from `/proc`: its state and that of each thread (running, sleeping,
//! stopped by a signal, waiting on the disk), where the kernel has it waiting (`wchan`, `stack`
//! where readable), how much CPU it has had against how long it has lived (starved or blocked),
//! the signals pending, blocked and ignored, which loopback ports it listens on, and the
//! machine's load.

use std::fmt::Write as _;
use std::fs;
use std::time::Duration;

/// A report on process `pid` for a wait that gave up after `waited`.
pub fn report(pid: u32, waited: Duration) -> String {
    let proc = format!("/proc/{pid}");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "----- process {pid} after {waited:?} (from {proc}) -----"
    );
    let Ok(status) = fs::read_to_string(format!("{proc}/status")) else {
        let _ = writeln!(out, "  (gone: {proc}/status cannot be read)");
        return out;
    };
    for line in status.lines() {
        let wanted = [
            "Name:",
            "State:",
            "PPid:",
            "Threads:",
            "SigPnd:",
            "ShdPnd:",
            "SigBlk:",
            "SigIgn:",
            "voluntary_ctxt_switches:",
            "nonvoluntary_ctxt_switches:",
        ];
        if wanted.iter().any(|w| line.starts_with(w)) {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some((user, system)) = cpu_seconds(&proc) {
        let _ = writeln!(out, "  CPU: {user:.2}s user, {system:.2}s system");
    }
    let _ = writeln!(out, "  wchan: {}", read_trimmed(&format!("{proc}/wchan")));
    let stack = read_trimmed(&format!("{proc}/stack"));
    if !stack.is_empty() && !stack.starts_with('(') {
        let _ = writeln!(out, "  kernel stack:");
        for frame in stack.lines() {
            let _ = writeln!(out, "    {frame}");
        }
    }
    let _ = writeln!(out, "  threads:");
    let mut tids: Vec<u32> = fs::read_dir(format!("{proc}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    for tid in tids {
        let task = format!("{proc}/task/{tid}");
        let comm = read_trimmed(&format!("{task}/comm"));
        let state = stat_field(&task, 2).unwrap_or_default();
        let wchan = read_trimmed(&format!("{task}/wchan"));
        let cpu = cpu_seconds(&task)
            .map(|(u, s)| format!("{:.2}s", u + s))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    {tid} {comm:<16} state {state} cpu {cpu} wchan {wchan}"
        );
    }
    let listening = listening_ports(&proc);
    let _ = writeln!(
        out,
        "  listening on: {}",
        if listening.is_empty() {
            "nothing".to_owned()
        } else {
            listening.join(", ")
        }
    );
    let _ = writeln!(out, "  machine load: {}", read_trimmed("/proc/loadavg"));
    out
}

fn read_trimmed(path: &str) -> String {
    match fs::read_to_string(path) {
        Ok(text) => text.trim().to_owned(),
        Err(e) => format!("({e})"),
    }
}

/// Field `index` (0-based, after the command name) of `/proc/…/stat`: 2 is the state.
fn stat_field(dir: &str, index: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after its closing one.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(index - 2).map(str::to_owned)
}

/// User and system CPU seconds of a process or thread.
fn cpu_seconds(dir: &str) -> Option<(f64, f64)> {
    // utime and stime are fields 14 and 15 of stat as proc(5) counts them from 1 (13 and 14
    // from 0), in clock ticks (100 a second on Linux).
    let user: f64 = stat_field(dir, 13)?.parse().ok()?;
    let system: f64 = stat_field(dir, 14)?.parse().ok()?;
    Some((user / 100.0, system / 100.0))
}

/// `address:port` of every TCP socket of the process in the LISTEN state.
fn listening_ports(proc: &str) -> Vec<String> {
    let inodes: Vec<String> = fs::read_dir(format!("{proc}/fd"))
        .map(|dir| {
            dir.filter_map(|e| {
                let target = fs::read_link(e.ok()?.path()).ok()?;
                let target = target.to_str()?;
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_owned(),
                )
            })
            .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("{proc}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (hex IP:port), st is field 3 (0A = LISTEN), inode is 9.
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or_default();
                found.push(format!("{table} port {port}"));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_live_process_and_its_listening_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = report(std::process::id(), Duration::from_secs(1));
        assert!(text.contains("State:"), "{text}");
        assert!(text.contains(&format!("tcp port {port}")), "{text}");
        assert!(text.contains("threads:"), "{text}");
    }

    #[test]
    fn a_gone_process_says_so() {
        assert!(report(u32::MAX, Duration::ZERO).contains("gone"));
    }
}
