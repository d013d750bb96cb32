//! Reload on `SIGHUP` or when the config file changes; drain on shutdown.
//!
//! A reload compiles the new file into a new [`Runtime`] and swaps it in whole: requests already
//! running keep the one they started with. A file with problems changes nothing; each problem is
//! logged. Listener addresses, threads and the admin listener's address are fixed at start:
//! changing them needs a restart, and the reload says so. Reloads take turns: one that read the
//! file earlier never installs its configuration over one that read it later.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::state::{InFlight, Runtime, Shared};
use crate::tls::CertSet;

pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn reload(&self, why: &str) {
        // Problems are logged by `reload`.
        let _ = reload(&self.shared, why);
    }
}

/// Reads the config file again and, if it has no problems, swaps it in (see the module doc);
/// `why` is logged. Returns the problems of a file that changed nothing.
pub fn reload(shared: &Shared, why: &str) -> Result<(), Vec<String>> {
    match try_reload(shared) {
        Ok(()) => {
            crate::metrics::count_reload(true);
            tracing::info!(reason = why, "configuration reloaded");
            Ok(())
        }
        Err(problems) => {
            crate::metrics::count_reload(false);
            for problem in &problems {
                tracing::error!(reason = why, "configuration not reloaded: {problem}");
            }
            Err(problems)
        }
    }
}

fn try_reload(shared: &Shared) -> Result<(), Vec<String>> {
    // Held from reading the file to installing what it says (the console's "Re-read", SIGHUP
    // and the file poll run apart).
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let config = portcullis_config::load(&shared.config_path).map_err(|errors| {
        errors
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    let current = shared.runtime.load();
    let old = &current.config;
    if config
        .listeners
        .iter()
        .map(|l| l.address)
        .ne(old.listeners.iter().map(|l| l.address))
        || config.admin.as_ref().map(|a| a.address) != old.admin.as_ref().map(|a| a.address)
        || config.server.threads != old.server.threads
        || config.data_dir != old.data_dir
    {
        tracing::warn!(
            "listener addresses, the admin address, threads and data_dir take effect only after a restart"
        );
    }
    // Loading the file loaded its certificates: nothing past this point can fail.
    for listener in &config.listeners {
        if let (Some(tls), Some(resolver)) =
            (&listener.tls, shared.resolvers.get(&listener.address))
        {
            resolver.replace(CertSet::new(tls));
        }
    }
    let runtime = Runtime::build(config, &shared.directory);
    shared.install(runtime);
    Ok(())
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload by signal is off: {e}");
                return;
            }
        };
        let poll = self
            .shared
            .runtime
            .load()
            .config
            .server
            .reload_poll_interval;
        let mut ticker = tokio::time::interval(poll);
        let mut last_seen = std::fs::read(&self.shared.config_path).ok();
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    last_seen = std::fs::read(&self.shared.config_path).ok();
                    self.reload("SIGHUP");
                }
                _ = ticker.tick() => {
                    let now = std::fs::read(&self.shared.config_path).ok();
                    if now.is_some() && now != last_seen {
                        last_seen = now;
                        self.reload("config file changed");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Waits for the shutdown signal, then lets in-flight requests finish (up to the configured
/// timeout) and exits. pingora alone would wait its whole grace period even with nothing to do.
pub struct Drainer {
    shared: Arc<Shared>,
}

impl Drainer {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        self.shared.start_draining();
        let timeout = self.shared.runtime.load().config.server.shutdown_timeout;
        let deadline = Instant::now() + timeout;
        tracing::info!(in_flight = InFlight::count(), "draining before exit");
        while InFlight::count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = InFlight::count();
        if left > 0 {
            tracing::warn!(in_flight = left, "shutdown timeout reached, exiting");
        } else {
            tracing::info!("drained, exiting");
        }
        if let Some(freshness) = self.shared.freshness.clone() {
            // Writers on other replicas stop waiting for this one at once.
            let wait = freshness.max_staleness();
            let left = tokio::task::spawn_blocking(move || freshness.leave(wait)).await;
            if !matches!(left, Ok(true)) {
                tracing::warn!("left the fleet without deleting this replica's lease");
            }
        }
        // Records queued in the last moments (a sign-out during the drain) are written first.
        let audit = self.shared.audit.clone();
        let flushed =
            tokio::task::spawn_blocking(move || audit.flush(Duration::from_secs(5))).await;
        if !matches!(flushed, Ok(true)) {
            tracing::warn!("exiting before the audit log was written to the end");
        }
        crate::logging::flush();
        std::process::exit(0);
    }
}
