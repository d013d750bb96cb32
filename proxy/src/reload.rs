//! Reload on `SIGHUP` or when the config file changes; drain on shutdown.
//!
//! A reload compiles the new file into a new [`Runtime`] and swaps it in whole: requests already
//! running keep the one they started with. A file with problems changes nothing; each problem is
//! logged. What is read only at start ([`AtStart`]: listeners, the admin address, threads,
//! `data_dir`, `[log]`, `[postgres]`, ...) needs a restart: a reload that changes it installs
//! the rest and names each such setting, in the log and on the console, until a restart. Reloads
//! take turns: one that read the file earlier never installs its configuration over one that
//! read it later. The file poll installs a change once it has held for one interval, so a file
//! caught half-written is not taken for the new configuration: what it installs is the bytes it
//! saw twice, still the file's in its turn, not a read a moment later (an edit begun since).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{
    ShutdownSignal, ShutdownSignalWatch, ShutdownWatch, UnixShutdownSignalWatch,
};
use pingora::services::background::BackgroundService;
use portcullis_config::{Config, LogConfig, PostgresConfig};
use tokio::signal::unix::{signal, SignalKind};

use crate::state::{InFlight, Runtime, Shared};
use crate::tls::CertSet;

pub struct Reloader {
    shared: Arc<Shared>,
    /// The config file as it was read before it was loaded at start.
    started_with: Option<Vec<u8>>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>, started_with: Option<Vec<u8>>) -> Self {
        Self {
            shared,
            started_with,
        }
    }

    /// Whether it reloaded the file as `read` (`None`: as it is now); problems are logged by
    /// `reload`.
    fn reload(&self, why: &str, read: Option<&[u8]>) -> bool {
        reload(&self.shared, why, read).is_ok()
    }
}

/// The bound on an HTTP/2 request's header list that lets a head of up to
/// `max_request_header_bytes` (as Portcullis counts it) reach its own check: HTTP/2 counts
/// each field 28 bytes more, and its pseudo-headers too, and a cookie after the first 36 more
/// (Portcullis counts it as joined to the first with `; `). Room for a field per 112 bytes of
/// the bound (at least 128 fields): browsers send each cookie as a field of its own (180 at
/// most, in Chromium and Firefox: below a bound of about 26 KiB, the room for sign-ins in
/// progress takes the rest). And room
/// for the sign-ins in progress a browser keeps, which that check does not count.
pub fn h2_header_list_size(max_request_header_bytes: usize) -> u32 {
    let room = (max_request_header_bytes / 4).max(128 * 32);
    let bound = max_request_header_bytes.saturating_add(room);
    u32::try_from(bound.saturating_add(crate::auth::PENDING_SIGN_IN_BYTES)).unwrap_or(u32::MAX)
}

/// How many streams an HTTP/2 client may have open at once, given the bound on each one's
/// header list: pingora's 100, fewer where heads may be large, so that what a connection's
/// heads can hold decoded (HPACK lets a client repeat a large field for a few bytes) stays
/// near 16 MiB.
pub fn h2_max_streams(header_list_size: u32) -> u32 {
    (16 * 1024 * 1024 / header_list_size.max(1)).clamp(8, 100)
}

/// The settings read only at start: the listeners, the admin listener's address, threads,
/// `data_dir`, `[log]`, `[postgres]`, the reload poll's interval and (past their values at
/// start) the shutdown timeout and, over HTTP/2, the request head bound, as the process
/// started with them.
#[derive(Debug, Clone, PartialEq)]
pub struct AtStart {
    /// Each listener's address and whether it terminates TLS.
    listeners: Vec<(SocketAddr, bool)>,
    admin: Option<SocketAddr>,
    threads: usize,
    max_request_header_bytes: usize,
    client_idle_timeout: Duration,
    shutdown_timeout: Duration,
    reload_poll_interval: Duration,
    data_dir: PathBuf,
    log: LogConfig,
    postgres: Option<PostgresConfig>,
}

impl AtStart {
    pub fn of(config: &Config) -> Self {
        Self {
            // In any order: the file's order means nothing to the listeners.
            listeners: {
                let mut listeners: Vec<_> = config
                    .listeners
                    .iter()
                    .map(|l| (l.address, l.tls.is_some()))
                    .collect();
                listeners.sort();
                listeners
            },
            admin: config.admin.as_ref().map(|a| a.address),
            threads: config.server.threads,
            max_request_header_bytes: config.server.max_request_header_bytes,
            client_idle_timeout: config.server.client_idle_timeout,
            shutdown_timeout: config.server.shutdown_timeout,
            reload_poll_interval: config.server.reload_poll_interval,
            data_dir: config.data_dir.clone(),
            log: config.log.clone(),
            postgres: config.postgres.clone(),
        }
    }

    /// The directory the process keeps its data in.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// How long shutting down waits for requests in flight: as configured now, but no longer
    /// than at start, which bounds the process' own wait.
    pub fn shutdown_timeout(&self, now: &Config) -> Duration {
        now.server.shutdown_timeout.min(self.shutdown_timeout)
    }

    /// Why this process cannot take `new`, if it cannot: an admin token where the admin
    /// listener is bound (until a restart) to an address that is not loopback, without
    /// `allow_plain_http` (the file's own check sees only the address the file names).
    pub fn refuses(&self, new: &Config) -> Option<String> {
        let (admin, bound) = (new.admin.as_ref()?, self.admin?);
        admin.token_in_clear(bound).then(|| {
            format!(
                "admin.token: would cross the network in clear: the admin listener is bound to \
                 {bound} until a restart, which is not loopback; set `allow_plain_http = true` \
                 on a network you trust, or restart"
            )
        })
    }

    /// The settings of `new` that differ from these, by name: they wait for a restart.
    pub fn awaiting_restart(&self, new: &Config) -> Vec<&'static str> {
        let new = Self::of(new);
        // HTTP/2 is spoken on TLS listeners only.
        let http2 = self.listeners.iter().any(|(_, tls)| *tls);
        [
            ("listeners", self.listeners != new.listeners),
            ("admin.address", self.admin != new.admin),
            ("server.threads", self.threads != new.threads),
            // Lower applies at once (Portcullis' own check); HTTP/2's bound is set at start.
            (
                "server.max_request_header_bytes (HTTP/2)",
                http2 && new.max_request_header_bytes > self.max_request_header_bytes,
            ),
            // HTTP/1's applies at once (Portcullis sets it per request), and so does the bound on
            // an HTTP/2 stream's writes and reads; an idle HTTP/2 connection's is set at start.
            (
                "server.client_idle_timeout (HTTP/2)",
                http2 && new.client_idle_timeout != self.client_idle_timeout,
            ),
            // Shorter applies at once; the process' own bound on shutting down is set at start.
            (
                "server.shutdown_timeout",
                new.shutdown_timeout > self.shutdown_timeout,
            ),
            (
                "server.reload_poll_interval",
                self.reload_poll_interval != new.reload_poll_interval,
            ),
            ("data_dir", self.data_dir != new.data_dir),
            ("log", self.log != new.log),
            ("postgres", self.postgres != new.postgres),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }
}

/// What `new` says of the sockets bound at start (`running`, as installed now, which a reload
/// never adds to): for each, `new`'s listener of the same address and TLS-ness (its
/// certificates, `trusted_proxies`, `behind_tls_proxy`, ...), else the one installed now (with
/// the certificates it serves now). A listener `new` adds, moves or switches to or from TLS
/// waits for a restart; meanwhile the bound ones keep serving as they were configured, not as
/// nothing (requests find their listener's settings by the address that took them).
fn bound_listeners(
    running: &[portcullis_config::Listener],
    new: &[portcullis_config::Listener],
) -> Vec<portcullis_config::Listener> {
    running
        .iter()
        .map(|bound| {
            new.iter()
                .find(|l| l.address == bound.address && l.tls.is_some() == bound.tls.is_some())
                .unwrap_or(bound)
                .clone()
        })
        .collect()
}

/// Says which upstreams routes pass callers' bearer tokens on to (`pass_authorization`) over
/// plain HTTP off loopback: they cross the network in clear there, as Portcullis refuses them
/// from a client; or over https without checking the upstream's certificate. Said at start and
/// at every reload.
pub fn warn_of_tokens_passed_in_clear(config: &portcullis_config::Config) {
    for route in config.routes.iter().filter(|r| r.pass_authorization) {
        let in_clear = route.upstreams.iter().filter(|u| {
            let literal = u.host.parse::<std::net::IpAddr>().ok();
            // (A name other than `localhost` may move off loopback: it is looked up again.)
            !u.tls && u.host != "localhost" && !literal.is_some_and(|ip| ip.is_loopback())
        });
        for upstream in in_clear {
            tracing::warn!(
                route = %route.name,
                upstream = %upstream.url,
                "pass_authorization sends the callers' bearer tokens to this upstream over plain \
                 HTTP off loopback, in clear for anyone on the way to replay: use https"
            );
        }
        // An https upstream whose certificate is not checked is anyone's who can get in the
        // way of its connections.
        for upstream in route.upstreams.iter().filter(|u| u.tls && !u.verify_tls) {
            tracing::warn!(
                route = %route.name,
                upstream = %upstream.url,
                "pass_authorization sends the callers' bearer tokens to this upstream over https \
                 without checking its certificate (tls_verify = false): anyone able to get in the \
                 way of its connections gets them; give the route its CA in tls_ca instead"
            );
        }
    }
}

/// Loads the config file as `read` from it (`None`: reads it now) and, if it has no problems,
/// swaps it in (see the module doc); `why` is logged. Returns the settings installed but waiting
/// for a restart, or the problems of a file that changed nothing.
pub fn reload(
    shared: &Shared,
    why: &str,
    read: Option<&[u8]>,
) -> Result<Vec<&'static str>, Vec<String>> {
    match try_reload(shared, read) {
        Ok(awaiting) => {
            crate::metrics::count_reload(true);
            warn_of_tokens_passed_in_clear(&shared.runtime.load().config);
            if awaiting.is_empty() {
                tracing::info!(reason = why, "configuration reloaded");
            } else {
                tracing::warn!(
                    reason = why,
                    "configuration reloaded; these settings differ from the ones in use and \
                     take effect only after a restart: {}",
                    awaiting.join(", ")
                );
            }
            Ok(awaiting)
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

fn try_reload(shared: &Shared, read: Option<&[u8]>) -> Result<Vec<&'static str>, Vec<String>> {
    // Held from reading the file to installing what it says (the console's "Re-read", SIGHUP
    // and the file poll run apart).
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let running = shared.runtime.load_full();
    // An upstream's name keeps the address it is reached at while the name still lists it (a
    // failure may have moved it off the first), and also while the name does not resolve just
    // now (a DNS outage), as between reloads: a reload (a renewed certificate, a rule taken
    // away) sends nothing back to an address that failed, and is not refused for a name that
    // does not resolve. A name no upstream has yet must resolve. Each name is looked up once.
    let looked_up = RefCell::new(HashMap::<(String, u16), Result<SocketAddr, String>>::new());
    let kept = RefCell::new(Vec::new());
    let resolve = |host: &str, port: u16| {
        let key = (host.to_ascii_lowercase(), port);
        if let Some(known) = looked_up.borrow().get(&key) {
            return known.clone();
        }
        let in_use = |port| {
            running
                .routes
                .all()
                .find_map(|route| route.upstreams.address_of(host, port))
        };
        let found = match portcullis_config::resolve_all(host, port) {
            Ok(all) => in_use(Some(port))
                .map(|ip| SocketAddr::new(ip, port))
                .filter(|address| all.contains(address))
                .or_else(|| all.first().copied())
                .ok_or_else(|| format!("`{host}` resolves to no address")),
            Err(problem) => in_use(None)
                .map(|ip| {
                    kept.borrow_mut().push(format!("{problem}: kept {ip}"));
                    SocketAddr::new(ip, port)
                })
                .ok_or(problem),
        };
        looked_up.borrow_mut().insert(key, found.clone());
        found
    };
    let path = &shared.config_path;
    // Bytes read before this reload's turn are what the file holds in it, or they are not
    // installed: a reload that read the file later may have installed it meanwhile.
    if read.is_some() && std::fs::read(path).ok().as_deref() != read {
        return Err(vec![
            "the file changed as it was read; it is reloaded once it holds still".to_owned(),
        ]);
    }
    let loaded = match read {
        Some(bytes) => portcullis_config::load_read(path, bytes, &resolve),
        None => portcullis_config::load_resolving(path, &resolve),
    };
    let mut config = loaded.map_err(|errors| {
        errors
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    if let Some(problem) = shared.at_start.refuses(&config) {
        return Err(vec![problem]);
    }
    let awaiting = shared.at_start.awaiting_restart(&config);
    config.listeners = bound_listeners(&running.config.listeners, &config.listeners);
    // Loading the file loaded its certificates: nothing past this point can fail.
    for listener in &config.listeners {
        if let (Some(tls), Some(resolver)) =
            (&listener.tls, shared.resolvers.get(&listener.address))
        {
            resolver.replace(CertSet::new(tls));
        }
    }
    let mut runtime = Runtime::build(config, &shared.directory);
    runtime.awaiting_restart = awaiting.clone();
    runtime.keep_health_of(&running);
    runtime.keep_tokens_of(&running);
    shared.install(runtime);
    for kept in kept.into_inner() {
        tracing::warn!(
            "upstream name not resolved at reload ({kept}, the address it is reached at)"
        );
    }
    Ok(awaiting)
}

/// The file poll's view of the config file: a change is reloaded once the next poll, an
/// interval later, finds the same bytes, so a file read while an editor was still writing it
/// is not installed.
///
/// A reload of the file that failed is tried again while the file stays as it is, after one
/// interval, then two, four, … up to [`MOST_POLLS_BETWEEN_RETRIES`]: what it lacked may come
/// without an edit (a `file:` secret written after the file, as Kubernetes updates a Secret
/// apart from a ConfigMap; an upstream name not resolving yet).
#[derive(Debug, Default)]
struct Poll {
    /// The bytes last reloaded (or the file as it was at start, or at the last `SIGHUP`).
    installed: Option<Vec<u8>>,
    /// A change seen by the last poll, not yet reloaded.
    pending: Option<Vec<u8>>,
    /// After a failed reload of `installed`: the polls until it is tried again (0: not to be),
    /// and how many were waited last.
    retry_in: u32,
    retry_gap: u32,
}

/// The most polls between two tries of a file whose reload keeps failing.
const MOST_POLLS_BETWEEN_RETRIES: u32 = 64;

impl Poll {
    fn new(installed: Option<Vec<u8>>) -> Self {
        Self {
            installed,
            ..Self::default()
        }
    }

    /// Takes the file's bytes (`None`: unreadable) as read now; true if it should be reloaded.
    fn saw(&mut self, now: Option<Vec<u8>>) -> bool {
        let Some(now) = now else {
            return false;
        };
        if self.installed.as_ref() == Some(&now) {
            self.pending = None;
            if self.retry_in > 0 {
                self.retry_in -= 1;
                return self.retry_in == 0;
            }
            return false;
        }
        if self.pending.as_ref() == Some(&now) {
            self.installed = self.pending.take();
            (self.retry_in, self.retry_gap) = (0, 0);
            return true;
        }
        self.pending = Some(now);
        false
    }

    /// The reload `saw` asked for failed: it is tried again later, unless the file changes.
    fn failed(&mut self) {
        self.retry_gap = (self.retry_gap * 2).clamp(1, MOST_POLLS_BETWEEN_RETRIES);
        self.retry_in = self.retry_gap;
    }

    /// Whether the reload `saw` just asked for is a try again of one that failed.
    fn retrying(&self) -> bool {
        self.retry_gap > 0
    }

    /// The file was installed otherwise (the console's Re-read): no more tries.
    fn settled(&mut self) {
        (self.retry_in, self.retry_gap) = (0, 0);
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Without SIGHUP, the file is still watched.
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(e) => {
                tracing::error!(
                    "cannot listen for SIGHUP, reload by signal is off (the file's edits are \
                     still read): {e}"
                );
                None
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
        // Two reads an interval apart, even after a reload that outlasted ticks: ticks missed
        // meanwhile must not come back to back.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let read = || std::fs::read(&self.shared.config_path).ok();
        // An edit made during start-up (a directory load can take a while) is caught up with
        // by the poll: a SIGHUP sent then is not heard here.
        let mut file = Poll::new(self.started_with.clone());
        // How many configurations were installed when a reload last failed: one installed
        // since (by the console's Re-read) leaves nothing to try again.
        let mut failed_at = 0;
        loop {
            tokio::select! {
                _ = async {
                    match hangup.as_mut() {
                        Some(hangup) => hangup.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = read();
                    file = Poll::new(now.clone());
                    if !self.reload("SIGHUP", now.as_deref()) {
                        file.failed();
                        failed_at = self.shared.reloads();
                    }
                }
                _ = ticker.tick() => {
                    if !file.saw(read()) {
                        continue;
                    }
                    let retrying = file.retrying();
                    if retrying && self.shared.reloads() != failed_at {
                        file.settled();
                        continue;
                    }
                    let why = if retrying {
                        "retry of a failed reload"
                    } else {
                        "config file changed"
                    };
                    // The bytes the poll saw twice, not the file as it is a moment later (an
                    // edit begun since could be caught half-written).
                    if !self.reload(why, file.installed.as_deref()) {
                        file.failed();
                        failed_at = self.shared.reloads();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The signals that stop Portcullis: `SIGTERM`, `SIGINT` (Ctrl-C) and `SIGQUIT` alike drain
/// and exit through [`Drainer`]. pingora reads `SIGQUIT` as a graceful upgrade, handing every
/// listening socket to whoever listens at its upgrade socket: Portcullis is never started to
/// take them, so only another process could (one of any user, at pingora's default path in
/// `/tmp`), and it would take the ports, and read what plain listeners carry. pingora's own `SIGINT`
/// stops its runtimes at once instead: without the drain, the audit queue's last records and
/// the fleet lease are left behind, and a listener's accept loop can spin on the stopped
/// runtime, and never exit.
pub struct StopSignals;

#[async_trait]
impl ShutdownSignalWatch for StopSignals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut interrupt), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::warn!("could not watch for SIGTERM, SIGINT and SIGQUIT: pingora's handling");
            return UnixShutdownSignalWatch.recv().await;
        };
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received: stopping as for SIGTERM");
                ShutdownSignal::GracefulTerminate
            }
            _ = quit.recv() => {
                tracing::info!("SIGQUIT received: stopping as for SIGTERM");
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}

/// Waits for the shutdown signal, then lets in-flight requests finish (up to the configured
/// timeout) and exits. pingora alone would wait its whole grace period even with nothing to do.
pub struct Drainer {
    shared: Arc<Shared>,
}

/// The longest the drain writes the audit log out for.
const AUDIT_FLUSH: Duration = Duration::from_secs(5);

impl Drainer {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The longest a drain under `config` takes: in-flight requests, storing sessions' last
    /// use, leaving the fleet, writing the audit log out and closing the store (each of the
    /// three writes bounded by [`AUDIT_FLUSH`]).
    pub fn longest(config: &Config) -> Duration {
        let leave = config.postgres.as_ref().map(|p| p.max_staleness);
        config
            .server
            .shutdown_timeout
            .saturating_add(leave.unwrap_or_default())
            .saturating_add(AUDIT_FLUSH * 3)
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
        let timeout = self
            .shared
            .at_start
            .shutdown_timeout(&self.shared.runtime.load().config);
        let deadline = Instant::now().checked_add(timeout);
        // A Ctrl-C during the drain stops the wait (the drain goes on to leave the fleet and
        // write the audit log out), as at a terminal one expects of a second Ctrl-C. Watched
        // before the drain is announced: one sent on seeing that is not missed.
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        tracing::info!(in_flight = InFlight::count(), "draining before exit");
        let interrupted = async {
            match &mut interrupt {
                Some(interrupt) => interrupt.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(interrupted);
        while InFlight::count() > 0 && deadline.is_none_or(|deadline| Instant::now() < deadline) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = &mut interrupted => {
                    tracing::warn!("SIGINT during the drain: not waiting for in-flight requests");
                    break;
                }
            }
        }
        let left = InFlight::count();
        if left > 0 {
            tracing::warn!(in_flight = left, "shutdown timeout reached, exiting");
        } else {
            tracing::info!("drained, exiting");
        }
        write_out(&self.shared).await;
        crate::logging::flush();
        std::process::exit(0);
    }
}

/// What a stopping process writes before it exits (a drain, or a start that cannot listen):
/// when sessions were last used, its leaving of the fleet, the audit log to its end, and the
/// embedded store closed. Each step bounded ([`Drainer::longest`] counts them).
pub async fn write_out(shared: &Shared) {
    // When sessions were last used, so a restart does not end them before their idle
    // timeout: up to twice the upkeep's interval (at most 10 minutes) early otherwise. On an
    // embedded store, the sessions that are over (idle, past their lifetime) are forgotten
    // too: a restart under a longer idle timeout would find one that idled out (while this
    // process ran) alive.
    let sessions = &shared.auth.sessions;
    let oidc = shared.runtime.load().config.oidc.clone();
    let stored = tokio::time::timeout(AUDIT_FLUSH, async {
        sessions.store_last_use().await?;
        match oidc.as_ref().filter(|_| !shared.directory.is_shared()) {
            Some(oidc) => {
                sessions
                    .end_not_held(crate::clock::now_unix(), oidc, Some(oidc))
                    .await
            }
            None => Ok(0),
        }
    });
    match stored.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!("cannot store when sessions were last used, or forget those over: {e}")
        }
        Err(_) => tracing::warn!("sessions' last use not stored within {AUDIT_FLUSH:?}"),
    }
    if let Some(freshness) = shared.freshness.clone() {
        // Writers on other replicas stop waiting for this one at once.
        let wait = freshness.max_staleness();
        let left = tokio::task::spawn_blocking(move || freshness.leave(wait)).await;
        if !matches!(left, Ok(true)) {
            tracing::warn!("left the fleet without deleting this replica's lease");
        }
    }
    // Records queued in the last moments (a sign-out during the drain) are written first.
    let audit = shared.audit.clone();
    let flushed = tokio::task::spawn_blocking(move || audit.flush(AUDIT_FLUSH)).await;
    if !matches!(flushed, Ok(true)) {
        tracing::warn!(
            "exiting before the audit log was written to the end (with PostgreSQL, \
             those kept in data_dir's audit spool wait there for the next start)"
        );
    }
    // Closed cleanly, the embedded store opens at the next start without a repair.
    let directory = shared.directory.clone();
    let closed = tokio::task::spawn_blocking(move || directory.close());
    if tokio::time::timeout(AUDIT_FLUSH, closed).await.is_err() {
        tracing::warn!("exiting before the directory store was closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop forgets, on an embedded store, the sessions that idled out since the last
    /// upkeep: a restart under a longer idle timeout would find them alive.
    #[tokio::test]
    async fn a_stop_forgets_the_sessions_that_idled_out() {
        let dir = tempfile::tempdir().unwrap();
        let text = crate::testing::CONFIG.replace(
            "auth_scheme = \"http\"",
            "auth_scheme = \"http\"\nsession_idle_timeout = \"1m\"",
        );
        let config = crate::testing::parse(&text);
        let shared = crate::testing::shared(dir.path(), dir.path().join("c.toml"), config);
        let world = crate::testing::World::new();
        let now = crate::clock::now_unix();
        let sessions = &shared.auth.sessions;
        let create = |email: &str, at: u64| {
            let identity = crate::caller::Identity {
                created: at,
                ..world.person(email)
            };
            sessions.create(identity, None, "portcullis_session", at)
        };
        let idle = create("idle@corp.example", now - 120).await.unwrap();
        let used = create("used@corp.example", now).await.unwrap();
        write_out(&shared).await;
        assert!(sessions.get(&idle).is_none(), "idled out");
        assert!(sessions.get(&used).is_some());
    }

    /// A reload cannot set an admin token where the listener stays bound off loopback until a
    /// restart (a file that also moves it to loopback passes the file's own check).
    #[test]
    fn an_admin_token_is_not_taken_on_a_listener_bound_off_loopback() {
        let config = crate::testing::World::new().config;
        let admin = |address: &str, token: bool, allow_plain_http| {
            let mut config = config.clone();
            let token = token.then(|| portcullis_config::AdminToken {
                secret: portcullis_config::Secret::new("a-token-long-enough-to-be-one".into()),
                sha256: [0; 32],
            });
            config.admin = Some(portcullis_config::AdminConfig {
                address: address.parse().unwrap(),
                token,
                allow_plain_http,
            });
            config
        };
        let bound_off = AtStart::of(&admin("0.0.0.0:9090", false, false));
        let refused = bound_off.refuses(&admin("127.0.0.1:9090", true, false));
        assert!(refused.is_some_and(|p| p.contains("bound to 0.0.0.0:9090")));
        assert_eq!(
            bound_off.refuses(&admin("127.0.0.1:9090", true, true)),
            None
        );
        assert_eq!(
            bound_off.refuses(&admin("127.0.0.1:9090", false, false)),
            None
        );
        let bound_on = AtStart::of(&admin("127.0.0.1:9090", false, false));
        assert_eq!(
            bound_on.refuses(&admin("127.0.0.1:9090", true, false)),
            None
        );
    }

    #[test]
    fn a_raised_head_bound_waits_for_a_restart_and_a_lowered_one_does_not() {
        let mut config = crate::testing::World::new().config;
        // A plain-HTTP listener speaks no HTTP/2: nothing of it waits.
        let plain = AtStart::of(&config);
        let mut idle = config.clone();
        idle.server.max_request_header_bytes *= 2;
        idle.server.client_idle_timeout *= 2;
        assert!(plain.awaiting_restart(&idle).is_empty());
        config.listeners[0].tls = Some(portcullis_config::ListenerTls {
            certificates: vec![],
        });
        let at_start = AtStart::of(&config);
        let with = |bytes: usize| {
            let mut new = config.clone();
            new.server.max_request_header_bytes = bytes;
            at_start.awaiting_restart(&new)
        };
        let bytes = config.server.max_request_header_bytes;
        assert!(with(bytes).is_empty());
        assert!(with(bytes / 2).is_empty());
        assert_eq!(
            with(bytes * 2),
            ["server.max_request_header_bytes (HTTP/2)"]
        );
        // HTTP/2's idle timeout is set at start too.
        let mut idle = config.clone();
        idle.server.client_idle_timeout *= 2;
        assert_eq!(
            at_start.awaiting_restart(&idle),
            ["server.client_idle_timeout (HTTP/2)"]
        );
        // Every head Portcullis takes reaches its own check, with room for many fields.
        // And room for the sign-ins in progress a browser keeps, which it does not count.
        let signing_in = 16 * 4_096;
        assert_eq!(h2_header_list_size(65_536), 65_536 + 16_384 + signing_in);
        assert_eq!(h2_header_list_size(4_096), 4_096 + 4_096 + signing_in);
        assert_eq!(h2_max_streams(h2_header_list_size(65_536)), 100);
        // As the README says: 100 up to about 80 KiB, fewer past it.
        assert_eq!(h2_max_streams(h2_header_list_size(81_789)), 100);
        assert_eq!(h2_max_streams(h2_header_list_size(81_920)), 99);
        assert_eq!(h2_max_streams(h2_header_list_size(131_072)), 73);
        assert_eq!(h2_max_streams(h2_header_list_size(1_048_576)), 12);
    }

    #[test]
    fn a_bound_listener_takes_the_new_file_s_settings_if_it_has_it_else_keeps_those_it_serves_with()
    {
        let listener = |address: &str, behind_tls_proxy: bool| portcullis_config::Listener {
            address: address.parse().unwrap(),
            tls: None,
            allow_plain_http: false,
            behind_tls_proxy,
            trusted_proxies: Vec::new(),
        };
        let running = [
            listener("127.0.0.1:8080", true),
            listener("127.0.0.1:8081", true),
        ];
        // 8080 kept and changed; 8081 moved to 9000, which nothing is bound to.
        let new = [
            listener("127.0.0.1:8080", false),
            listener("127.0.0.1:9000", false),
        ];
        assert_eq!(
            bound_listeners(&running, &new),
            [
                listener("127.0.0.1:8080", false),
                listener("127.0.0.1:8081", true)
            ]
        );
    }

    /// What a reload installs is the bytes its caller read (the file poll's, seen twice), and
    /// only while the file still holds them in the reload's turn: never a later read of a file
    /// that an edit begun since may have left half-written.
    #[tokio::test]
    async fn a_reload_installs_the_bytes_read_and_only_while_the_file_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        let with_route = |host: &str| {
            format!(
                "{}\n[[routes]]\nfrom = \"http://{host}.test\"\nto = [\"http://127.0.0.1:3\"]\n\
                 allow = {{ any_signed_in = true }}\n",
                crate::testing::CONFIG
            )
        };
        let shared = crate::testing::shared(dir.path(), path.clone(), crate::testing::config(""));
        let routes = || {
            let runtime = shared.runtime.load();
            let hosts = runtime.config.routes.iter().map(|route| route.host.clone());
            hosts
                .filter(|host| host.starts_with("new-"))
                .collect::<Vec<_>>()
        };
        let (a, b) = (with_route("new-a"), with_route("new-b"));
        std::fs::write(&path, &a).unwrap();
        assert!(reload(&shared, "test", Some(a.as_bytes())).is_ok());
        assert_eq!(routes(), ["new-a.test"]);
        // An edit since the bytes were read: neither they nor the file's new text is installed.
        std::fs::write(&path, with_route("new-c")).unwrap();
        let problems = reload(&shared, "test", Some(b.as_bytes())).unwrap_err();
        assert!(
            problems[0].contains("changed as it was read"),
            "{problems:?}"
        );
        assert_eq!(routes(), ["new-a.test"]);
        // Read now (the console's Re-read): the file as it is.
        assert!(reload(&shared, "test", None).is_ok());
        assert_eq!(routes(), ["new-c.test"]);
    }

    #[test]
    fn the_poll_reloads_a_change_once_it_has_held_for_one_interval() {
        let file = |text: &str| Some(text.as_bytes().to_vec());
        let mut poll = Poll::new(file("a"));
        assert!(!poll.saw(file("a")), "unchanged");
        // Half-written, then whole before the next poll: the half is never installed.
        assert!(!poll.saw(file("a + half")));
        assert!(!poll.saw(file("a + half of b")));
        assert!(!poll.saw(file("b")));
        assert!(!poll.saw(None), "unreadable (being replaced): no decision");
        assert!(poll.saw(file("b")), "held for an interval: reloaded");
        assert!(!poll.saw(file("b")), "reloaded once");
        // A change undone before it held is no change.
        assert!(!poll.saw(file("c")));
        assert!(!poll.saw(file("b")));
        assert!(!poll.saw(file("b")));
    }

    #[test]
    fn a_failed_reload_is_tried_again_less_and_less_often_until_the_file_changes() {
        let file = |text: &str| Some(text.as_bytes().to_vec());
        let mut poll = Poll::new(file("a"));
        assert!(!poll.saw(file("b")));
        assert!(poll.saw(file("b")));
        // Its reload failed: tried again after 1 poll, then 2, 4, …, at most 64 apart.
        let mut gaps = Vec::new();
        for _ in 0..9 {
            poll.failed();
            let mut polls = 1;
            while !poll.saw(file("b")) {
                polls += 1;
                assert!(polls <= 64, "never tried again");
            }
            gaps.push(polls);
            assert!(poll.retrying());
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        // Once it reloads, no more tries; a change is reloaded as any is.
        assert!((0..200).all(|_| !poll.saw(file("b"))));
        poll.failed();
        assert!(!poll.saw(file("c")));
        assert!(poll.saw(file("c")));
        assert!(!poll.retrying(), "a change, not a try again");
        assert!(
            (0..200).all(|_| !poll.saw(file("c"))),
            "a reload that worked"
        );
    }
}
