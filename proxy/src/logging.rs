//! Log output: plain or JSON lines through `tracing`, written off the request path.
//!
//! A request's thread only appends its line to a buffer; a writer thread of its own takes what
//! has gathered and writes it in one system call, at most every [`BATCH_WINDOW`]. So an
//! access-log line costs a request a copy, not a write and a wake-up of another thread each
//! (which, with a writer thread per line, cost about as much as the rest of the request's own
//! work). Lines wait at most that long; past [`MAX_PENDING`] bytes waiting (stdout blocked),
//! new lines are dropped and counted, and the count is written once it drains.

use std::io::{ErrorKind, IsTerminal, Write};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use portcullis_config::{LogConfig, LogFormat};

/// How long the writer lets lines gather after the first one, before writing them at once.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// Bytes of lines that may wait for the writer; past it, lines are dropped.
const MAX_PENDING: usize = 8 << 20;

/// Stops the writer thread once everything sent is written; taken by [`flush`] at exit.
static GUARD: Mutex<Option<Guard>> = Mutex::new(None);

pub fn init(config: &LogConfig) {
    let json = matches!(config.format, LogFormat::Json);
    let (writer, guard) = batched(std::io::stdout(), json);
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(true);
    let lines = match config.format {
        LogFormat::Plain => lines.boxed(),
        LogFormat::Json => lines.json().flatten_event(true).boxed(),
    };
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(lines.with_filter(filter_fn(is_written)))
        .try_init();
    if let Err(e) = result {
        eprintln!("portcullis: logging already initialised: {e}");
    }
    *lock(&GUARD) = Some(guard);
}

/// Whatever level the configuration asks for, the libraries' own lines are written only from
/// `info` up: below it, pingora prints every request and answer head it sends and receives
/// (`Debug` of the headers: session cookies, bearer tokens, the signed assertion), and other
/// libraries what they send and receive. Portcullis' own lines, which name no secret at any
/// level, follow the configured level.
///
/// Nor, at any level, pingora's lines about the admin listener's exchanges: one that cannot be
/// read is logged with its head quoted, the admin token in it.
fn is_written(meta: &Metadata<'_>) -> bool {
    (*meta.level() <= Level::INFO && meta.target() != "pingora_core::apps::http_app")
        || is_own(meta.target())
}

/// Portcullis' own targets: its crates' modules, and the access and audit lines.
fn is_own(target: &str) -> bool {
    target.starts_with("portcullis") || matches!(target, "access" | "audit")
}

/// Writes out every buffered log line. Call before `process::exit`.
pub fn flush() {
    lock(&GUARD).take();
}

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// Lines dropped since the last write, for lack of room.
    dropped: u64,
    /// The writer is waiting for a first line, to be woken by it.
    idle: bool,
    /// No more lines: write what is left and stop.
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Everything guarded is left whole between statements: a panic elsewhere breaks nothing.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where `tracing` writes its lines: the buffer of the writer thread that [`batched`] started.
#[derive(Clone)]
struct Lines(Arc<Shared>, bool);

impl Write for &Lines {
    /// `buf` is one whole line: `tracing`'s formatter writes each event with one call.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = match self.1 {
            true => json_shown(buf),
            false => std::borrow::Cow::Borrowed(buf),
        };
        let mut pending = lock(&self.0.pending);
        if pending.lines.len() + line.len() > MAX_PENDING {
            pending.dropped += 1;
        } else {
            pending.lines.extend_from_slice(&line);
            if pending.idle {
                pending.idle = false;
                self.0.wake.notify_one();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// How long an exit waits for the writer to finish: stdout may be a pipe nobody reads.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Stops the writer thread when dropped, once it has written every line sent before (or
/// after [`EXIT_WAIT`], if it cannot).
struct Guard {
    shared: Arc<Shared>,
    /// Says the writer is done, by closing.
    done: Option<Receiver<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(EXIT_WAIT);
        }
    }
}

/// Writes `batch` whole: a stdout made non-blocking by whoever shares it is waited for, so
/// that no line is cut; one closed or failing loses the batch (nowhere is left to say so).
fn write_whole(out: &mut impl Write, batch: &[u8]) {
    let mut rest = batch;
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
}

/// A writer for `tracing` whose lines a thread of its own writes to `out` in batches.
/// `json`: the lines are JSON objects, and so is the note of lines dropped (a shipper parsing
/// them would drop a line of text, and with it the word that lines were lost).
fn batched<W: Write + Send + 'static>(mut out: W, json: bool) -> (Lines, Guard) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
    });
    let theirs = shared.clone();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let write = move || {
        let _done = done_tx;
        let mut batch = Vec::new();
        loop {
            let (dropped, closed) = {
                let mut pending = lock(&theirs.pending);
                while pending.lines.is_empty() && pending.dropped == 0 && !pending.closed {
                    pending.idle = true;
                    pending = theirs
                        .wake
                        .wait(pending)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                if !pending.closed {
                    // Let the lines of the next moments join this one's.
                    drop(pending);
                    std::thread::sleep(BATCH_WINDOW);
                    pending = lock(&theirs.pending);
                }
                std::mem::swap(&mut batch, &mut pending.lines);
                (std::mem::take(&mut pending.dropped), pending.closed)
            };
            write_whole(&mut out, &batch);
            if dropped > 0 {
                let words = "log lines dropped: stdout is slower than the log";
                let note = if json {
                    let note = serde_json::json!({
                        "level": "WARN",
                        "target": "portcullis::logging",
                        "dropped": dropped,
                        "message": format!("{dropped} {words}"),
                    });
                    format!("{note}\n")
                } else {
                    format!("portcullis: {dropped} {words}\n")
                };
                write_whole(&mut out, note.as_bytes());
            }
            let _ = out.flush();
            batch.clear();
            if closed && lock(&theirs.pending).lines.is_empty() {
                return;
            }
        }
    };
    let started = std::thread::Builder::new()
        .name("log-writer".to_owned())
        .spawn(write)
        .map_err(|e| eprintln!("portcullis: cannot start the log writer thread: {e}"));
    let guard = Guard {
        shared: shared.clone(),
        done: started.ok().map(|_| done),
    };
    (Lines(shared, json), guard)
}

/// A JSON line with the characters that change how a terminal shows it written as `\uXXXX`
/// escapes, which JSON reads back as the same characters: the JSON format writes a string as
/// it is but for its quotes, backslashes and the controls below U+0020, so a path's, a name's or
/// an IdP's direction mark (U+202E shows the rest of the line reversed), a C1 control or DEL
/// would reach a terminal or a log viewer raw, where the plain format escapes them (as
/// `human::printable` does). Lines without a byte past `~`, nearly all, are left as they are.
pub(crate) fn json_shown(line: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::fmt::Write as _;
    if !line.iter().any(|&b| b >= 0x7f) {
        return std::borrow::Cow::Borrowed(line);
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return std::borrow::Cow::Borrowed(line);
    };
    if !text.chars().any(crate::human::hidden) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut shown = String::with_capacity(text.len() + 12);
    for c in text.chars() {
        if c >= '\u{7f}' && crate::human::hidden(c) {
            let _ = write!(shown, "\\u{:04x}", u32::from(c));
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown.into_bytes())
}

/// [`json_shown`] of a JSON text (an audit record's line).
pub(crate) fn json_text_shown(line: String) -> String {
    let shown = match json_shown(line.as_bytes()) {
        std::borrow::Cow::Owned(shown) => Some(shown),
        std::borrow::Cow::Borrowed(_) => None,
    };
    match shown.map(String::from_utf8) {
        Some(Ok(shown)) => shown,
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer thread wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut out = lock(&self.0);
            out.0.extend_from_slice(buf);
            out.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_in_few_writes_by_the_time_the_guard_is_dropped() {
        let out = Out::default();
        let (lines, guard) = batched(out.clone(), false);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let line = format!("thread {t} line {i}\n");
                        (&lines).write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let (written, writes) = lock(&out.0).clone();
        let text = String::from_utf8(written).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected);
        }
        assert_eq!(text.lines().count(), 4000);
        assert!(writes < 400, "{writes} writes for 4000 lines");
    }

    /// A JSON line's direction marks, C1 controls and DEL reach stdout as `\uXXXX` escapes,
    /// which read back as the same text; a line of the plain format, which escapes them
    /// itself, and other letters beyond ASCII are left as they are.
    #[test]
    fn json_lines_show_the_characters_that_move_a_terminal_escaped() {
        let value = "/x-\u{202e}txt.exe \u{2066}\u{9b}2J\u{7f} caf\u{e9}";
        let line = format!("{}\n", serde_json::json!({ "path": value }));
        let out = Out::default();
        let (lines, guard) = batched(out.clone(), true);
        (&lines).write_all(line.as_bytes()).unwrap();
        drop(guard);
        let written = String::from_utf8(lock(&out.0).0.clone()).unwrap();
        for hidden in ['\u{202e}', '\u{2066}', '\u{9b}', '\u{7f}'] {
            assert!(!written.contains(hidden), "{written:?}");
        }
        assert!(
            written.contains("\\u202e") && written.contains("caf\u{e9}"),
            "{written}"
        );
        let read: serde_json::Value = serde_json::from_str(written.trim_end()).unwrap();
        assert_eq!(read["path"], value, "the same text, read back");
        assert_eq!(json_shown(b"plain line\n"), b"plain line\n".as_slice());
        let (lines, guard) = batched(out.clone(), false);
        let plain = format!("path={value:?}\n");
        (&lines).write_all(plain.as_bytes()).unwrap();
        drop(guard);
        let written = String::from_utf8(lock(&out.0).0.clone()).unwrap();
        assert!(written.ends_with(&plain), "left as it is: {written:?}");
    }

    #[test]
    fn lines_past_the_bound_are_dropped_and_counted() {
        for json in [false, true] {
            let out = Out::default();
            let (lines, guard) = batched(out.clone(), json);
            // Held, the writer cannot take the lines: they wait, up to the bound.
            let held = lock(&out.0);
            (&lines).write_all(b"first\n").unwrap();
            while !lock(&lines.0.pending).lines.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut line = vec![b'x'; (1 << 20) - 1];
            line.push(b'\n');
            for _ in 0..(MAX_PENDING >> 20) + 3 {
                (&lines).write_all(&line).unwrap();
            }
            drop(held);
            drop(guard);
            let text = String::from_utf8_lossy(&lock(&out.0).0).into_owned();
            assert!(text.starts_with("first\n"), "{}", &text[..20]);
            let note = text.lines().last().unwrap();
            assert!(note.contains("log lines dropped"), "{note}");
            // As the lines are: a JSON object where they are.
            let parsed = serde_json::from_str::<serde_json::Value>(note);
            assert_eq!(
                parsed.is_ok_and(|n| n["dropped"].as_u64() > Some(0)),
                json,
                "{note}"
            );
        }
    }
}
