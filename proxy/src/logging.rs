//! Log output: plain or JSON lines through `tracing`, written off the request path.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use portcullis_config::{LogConfig, LogFormat};

/// Keeps the background writer alive; taken by [`flush`] at exit so buffered lines are written.
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

pub fn init(config: &LogConfig) {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(true);
    let result = match config.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = result {
        eprintln!("portcullis: logging already initialised: {e}");
    }
    if let Ok(mut slot) = GUARD.lock() {
        *slot = Some(guard);
    }
}

/// Writes out every buffered log line. Call before `process::exit`.
pub fn flush() {
    if let Ok(mut slot) = GUARD.lock() {
        slot.take();
    }
}
