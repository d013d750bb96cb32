//! The background services the server runs beside the listeners. Each is a thin loop around
//! work that lives elsewhere, woken by a timer, a signal or a change.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::assertion::{self, Signer};
use crate::auth::oidc;
use crate::auth::sessions::upkeep_every;
use crate::clock::now_unix;
use crate::state::Shared;

/// Waits `how_long`; false when the server is shutting down.
async fn pause(shutdown: &mut ShutdownWatch, how_long: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(how_long) => true,
        _ = shutdown.changed() => false,
    }
}

/// Discovers the configured OpenID provider, and again when `[oidc] issuer` changes (see
/// [`oidc::discovery_loop`]).
pub struct Discovery {
    shared: Arc<Shared>,
}

impl Discovery {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, shutdown: ShutdownWatch) {
        let shared = self.shared.clone();
        let config = move || shared.runtime.load().config.oidc.clone();
        let reloads = self.shared.subscribe_reloads();
        oidc::discovery_loop(self.shared.auth.oidc.clone(), config, reloads, shutdown).await;
    }
}

/// Keeps sessions and sign-in right across replicas and restarts (see
/// [`crate::auth::sessions`]): at start, moves sessions kept by an older version and keeps a
/// first sign-in sealing key; then, every eighth of the idle timeout (5 s to 5 min), stores
/// when sessions were last used here and forgets those that are over.
pub struct SessionKeeper {
    shared: Arc<Shared>,
}

impl SessionKeeper {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Keeps a first sign-in sealing key, and with a shared store the first assertion keys,
    /// unless they are kept already.
    async fn keep_first_keys(&self, data_dir: &std::path::Path) -> Result<(), String> {
        let (sessions, signer) = (&self.shared.auth.sessions, &self.shared.signer);
        if sessions
            .keep_sealing_key()
            .await
            .map_err(|e| format!("no sign-in sealing key yet: {e}"))?
        {
            tracing::info!("sign-in sealing key made");
        }
        if signer.needs_first_keys() {
            let first = assertion::first_shared_keys(data_dir, now_unix())?;
            let kids: Vec<String> = first.iter().map(|e| e.key.clone()).collect();
            sessions
                .keep(first)
                .await
                .map_err(|e| format!("no assertion signing key yet: {e}"))?;
            tracing::info!(?kids, "first shared assertion keys kept");
        }
        if signer.is_shared() {
            match assertion::forget_local_keys(data_dir) {
                Ok(kids) if kids.is_empty() => {}
                Ok(kids) => tracing::info!(
                    ?kids,
                    "this machine's assertion keys removed from data_dir: the fleet's are kept \
                     in PostgreSQL"
                ),
                Err(e) => tracing::warn!("this machine's assertion keys not removed: {e}"),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for SessionKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = &self.shared;
        let sessions = &shared.auth.sessions;
        // Until the directory is current (with PostgreSQL, caught up), what is kept is unknown.
        while !shared.directory_is_current() {
            if !pause(&mut shutdown, Duration::from_millis(200)).await {
                return;
            }
        }
        let data_dir = shared.at_start.data_dir().to_path_buf();
        match sessions.import(&data_dir, now_unix()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "sessions moved from sessions.redb"),
            Err(e) => tracing::error!("sessions of sessions.redb not moved: {e}"),
        }
        loop {
            match self.keep_first_keys(&data_dir).await {
                Ok(()) if shared.missing_key().is_none() => break,
                Ok(()) => {}
                Err(e) => tracing::warn!("{e}"),
            }
            if !pause(&mut shutdown, Duration::from_secs(1)).await {
                return;
            }
        }
        loop {
            let idle = |runtime: &crate::state::Runtime| {
                (runtime.config.oidc.as_ref()).map_or(0, |o| o.session_idle_timeout.as_secs())
            };
            let every = upkeep_every(idle(&shared.runtime.load()));
            if !pause(&mut shutdown, Duration::from_secs(every)).await {
                return;
            }
            // The configuration as it is now, after the pause (a reload may have moved it).
            let runtime = shared.runtime.load_full();
            if !shared.directory_is_current() {
                continue;
            }
            // Sign-in removed (by a restart, say, off a compromised provider): with the
            // embedded store every session is forgotten (see `maintain`), so that none comes
            // back with it; a fleet's other replicas may still sign people in.
            let oidc = runtime.config.oidc.as_ref();
            if oidc.is_none() && shared.freshness.is_some() {
                continue;
            }
            match sessions.maintain(now_unix(), every, oidc).await {
                Ok((0, 0)) => {}
                Ok((touched, forgotten)) => {
                    tracing::debug!(touched, forgotten, "sessions maintained")
                }
                Err(e) => tracing::warn!("sessions not maintained: {e}"),
            }
        }
    }
}

/// Re-reads the assertion key directory every minute, so a rotation by `portcullis
/// rotate-assertion-key` is picked up and retired keys are dropped from the JWKS.
pub struct KeyRefresher {
    signer: Arc<Signer>,
}

impl KeyRefresher {
    pub fn new(signer: Arc<Signer>) -> Self {
        Self { signer }
    }
}

#[async_trait]
impl BackgroundService for KeyRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while pause(&mut shutdown, Duration::from_secs(60)).await {
            if let Err(e) = self.signer.refresh(now_unix()) {
                tracing::warn!("assertion keys not refreshed: {e}");
            }
        }
    }
}

/// Fetches the IdPs' key sets again as they age (see [`crate::auth::Auth::refresh_aged_key_sets`]),
/// looking every second.
pub struct IdpKeys {
    shared: Arc<Shared>,
}

impl IdpKeys {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for IdpKeys {
    /// Through a graceful stop's drain too, until the runtime itself ends: the connections it
    /// keeps open are still cut when the IdP withdraws the key that signed their tokens (see
    /// [`Watcher`]).
    async fn start(&self, _shutdown: ShutdownWatch) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let runtime = self.shared.runtime.load_full();
            self.shared.auth.refresh_aged_key_sets(&runtime.config);
        }
    }
}

/// Resolves the routes' upstream DNS names again every `[server] upstream_dns_refresh` (see
/// [`crate::upstream`]).
pub struct UpstreamDns {
    shared: Arc<Shared>,
}

impl UpstreamDns {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for UpstreamDns {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut reloads = self.shared.subscribe_reloads();
        let mut since = tokio::time::Instant::now();
        loop {
            // As configured now: a reload that shortens it does not wait out the longer one.
            let every = self
                .shared
                .runtime
                .load()
                .config
                .server
                .upstream_dns_refresh;
            tokio::select! {
                _ = tokio::time::sleep_until(since + every) => {}
                reloaded = reloads.changed() => {
                    if reloaded.is_err() {
                        return;
                    }
                    reloads.borrow_and_update();
                    continue;
                }
                _ = shutdown.changed() => return,
            }
            // The routes at once: a name that hangs holds up no other.
            let runtime = self.shared.runtime.load_full();
            let mut resolving = tokio::task::JoinSet::new();
            for route in runtime.routes.all() {
                let route = route.clone();
                resolving.spawn(async move {
                    route
                        .upstreams
                        .resolve_again(&route.config.name, None)
                        .await;
                });
            }
            while resolving.join_next().await.is_some() {}
            since = tokio::time::Instant::now();
        }
    }
}

/// Judges every open websocket and event stream again whenever the directory changes,
/// sessions end or the configuration is reloaded, and at least once a second (grants end with
/// time: a session's expiry, a token's `exp`), and cuts those refused (see `streams.rs`); and
/// refreshes with the IdP the sessions of open streams whose refresh is due (see
/// [`Watcher::refresh_late_by`]).
pub struct Watcher {
    shared: Arc<Shared>,
    /// Refreshes of streams' sessions under way: at most [`STREAM_REFRESHES`] at once.
    refreshing: Arc<tokio::sync::Semaphore>,
    /// This process' keys for [`Watcher::refresh_late_by`].
    spread: std::collections::hash_map::RandomState,
}

/// The most refreshes of streams' sessions under way at once: an IdP back from an outage is
/// not met with every stream's at once.
const STREAM_REFRESHES: usize = 8;

/// A stream's session is refreshed up to this many seconds after it is due (see
/// [`Watcher::refresh_late_by`]).
const STREAM_REFRESH_SPREAD: u64 = 30;

impl Watcher {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            refreshing: Arc::new(tokio::sync::Semaphore::new(STREAM_REFRESHES)),
            spread: std::collections::hash_map::RandomState::new(),
        }
    }

    /// How long after its refresh fell `due` this process refreshes the session of a stream
    /// with session cookie `id`: a while of its own for each process, session and refresh, so
    /// that replicas holding streams of one session seldom refresh it at once (an IdP that
    /// rotates refresh tokens takes a token spent twice for a stolen one, and revokes them
    /// all). The one that goes later reads the shared store first and finds the session
    /// refreshed (`Auth::refresh_for_stream`); and sessions refreshed together once do not
    /// stay in step.
    fn refresh_late_by(&self, id: &str, due: u64) -> u64 {
        use std::hash::BuildHasher;
        self.spread.hash_one((id, due)) % STREAM_REFRESH_SPREAD
    }
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.shared.directory.subscribe();
        let mut ends = self.shared.auth.sessions.subscribe_ends();
        let mut reloads = self.shared.subscribe_reloads();
        let mut seconds = tokio::time::interval(Duration::from_secs(1));
        seconds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A graceful stop keeps open connections for as long as its drain lasts (see
        // `reload::Drainer`): they are still cut when their callers lose access, until the
        // runtime itself ends.
        let mut draining = false;
        loop {
            tokio::select! {
                _ = seconds.tick() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    changes.borrow_and_update();
                }
                ended = ends.changed() => {
                    if ended.is_err() {
                        return;
                    }
                    ends.borrow_and_update();
                }
                reloaded = reloads.changed() => {
                    if reloaded.is_err() {
                        return;
                    }
                    reloads.borrow_and_update();
                }
                _ = shutdown.changed(), if !draining => draining = true,
            }
            let shared = &self.shared;
            // Left the fleet at the drain's end: the lease is given up, not lost, and what is
            // still open ends with the process, not as cut off from the directory.
            if shared.freshness.as_ref().is_some_and(|f| f.is_leaving()) {
                continue;
            }
            shared.streams.sweep(|open| shared.still_allowed(open));
            // A stream makes no requests, so its person's session is refreshed with the IdP
            // here when due, as a request would (an IdP's refusal then ends it, and the next
            // sweep cuts the stream). One at a time per session (its turn), a few at once in
            // all. Not while draining: what is open ends with the process, and a refresh cut
            // short by the exit could leave a refresh token the IdP has replaced.
            if draining {
                continue;
            }
            let runtime = shared.runtime.load_full();
            let now = crate::clock::now_unix();
            for open in shared.streams.open() {
                let Some(id) = open.session_cookie() else {
                    continue;
                };
                let Some(due) = shared.auth.refresh_due(&runtime.config, id, now) else {
                    continue;
                };
                if due.saturating_add(self.refresh_late_by(id, due)) > now {
                    continue;
                }
                let Ok(permit) = self.refreshing.clone().try_acquire_owned() else {
                    break;
                };
                let (shared, runtime, id) = (shared.clone(), runtime.clone(), id.to_owned());
                tokio::spawn(async move {
                    (shared.auth)
                        .refresh_for_stream(&runtime.config, &id, now)
                        .await;
                    drop(permit);
                });
            }
        }
    }
}

/// Stops the process when a listener is still not bound a minute after start. pingora tries a
/// port another process holds 30 times, a second apart, then gives up in a task of its own
/// (and drops the listeners it had bound): the process would stay up, its `/healthz` 200,
/// serving nothing until someone restarted it. Exiting 1 lets its supervisor do that.
pub struct ListenerWatch {
    shared: Arc<Shared>,
    addresses: Vec<std::net::SocketAddr>,
}

/// How long after start every listener must be bound.
pub const LISTENERS_BOUND_WITHIN: Duration = Duration::from_secs(60);

impl ListenerWatch {
    pub fn new(shared: Arc<Shared>, addresses: Vec<std::net::SocketAddr>) -> Self {
        Self { shared, addresses }
    }
}

#[async_trait]
impl BackgroundService for ListenerWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let started = std::time::Instant::now();
        while let Some(missing) = crate::admin::not_listening(self.addresses.iter().copied()) {
            if started.elapsed() >= LISTENERS_BOUND_WITHIN {
                tracing::error!(
                    "not listening on {missing} {}s after start (another process holds the \
                     port?); stopping",
                    LISTENERS_BOUND_WITHIN.as_secs()
                );
                crate::reload::write_out(&self.shared).await;
                crate::logging::flush();
                std::process::exit(1);
            }
            if !pause(&mut shutdown, Duration::from_secs(1)).await {
                return;
            }
        }
    }
}
