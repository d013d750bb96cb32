//! Long-lived connections — websockets and event streams — and cutting them the moment their
//! caller loses access.
//!
//! A request is authorized when it arrives, but a websocket or an event stream can then live
//! for hours. Two mechanisms hold such connections to the same rule as requests:
//!
//! - Every body chunk and websocket frame, in either direction, is checked before it crosses
//!   the proxy ([`Recheck::still_allowed`]): if the directory changed, or sessions were ended
//!   (sign-out, back-channel logout), since the last decision, the decision is made again, and
//!   a refusal ends the connection. A directory write is
//!   visible before it is answered, so once the SCIM answer is sent, nothing more crosses for a
//!   caller it removed.
//! - An idle connection has no chunk to check, so the [`Watcher`] decides again for every open
//!   websocket and event stream on each directory change and each ended session, and shuts down the upstream socket
//!   of each refused one; pingora then ends the request and closes the client's connection.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use portcullis_scim::store::Seq;

use crate::auth::Caller;
use crate::authorize::{self, Verdict};
use crate::routes::CompiledRoute;
use crate::state::Shared;

/// What an allowed request was let in as, to decide again later.
pub struct Recheck {
    pub caller: Caller,
    pub route: Arc<CompiledRoute>,
    pub method: String,
    pub path: String,
    /// The directory's sequence number and the count of session ends, read just before the
    /// last allowing decision.
    decided_at: AtomicU64,
    sessions_at: AtomicU64,
    /// Set once the connection has been refused, so the refusal is recorded once.
    cut: AtomicBool,
}

impl Recheck {
    pub fn new(
        caller: Caller,
        route: Arc<CompiledRoute>,
        method: &str,
        path: &str,
        (decided_at, sessions_at): (Seq, u64),
    ) -> Self {
        Self {
            caller,
            route,
            method: method.to_owned(),
            path: path.to_owned(),
            decided_at: AtomicU64::new(decided_at),
            sessions_at: AtomicU64::new(sessions_at),
            cut: AtomicBool::new(false),
        }
    }

    /// Whether the caller may still use this connection. Costs two counter reads unless the
    /// directory changed or sessions ended since the last decision. A refusal is audited (once
    /// per connection).
    pub fn still_allowed(&self, shared: &Shared) -> bool {
        if self.cut.load(Ordering::Acquire) {
            return false;
        }
        // Read before deciding: a change that lands during the decision forces another one.
        let (seq, ends) = at(shared);
        if seq == self.decided_at.load(Ordering::Acquire)
            && ends == self.sessions_at.load(Ordering::Acquire)
        {
            return true;
        }
        let verdict = match &self.caller {
            Caller::Person { session, .. } if !shared.auth.sessions.exists(session) => {
                Verdict::Deny {
                    who: self.caller.log_name(),
                    rule: None,
                    reason: "the session has ended".to_owned(),
                }
            }
            caller => authorize::decide(
                &shared.directory,
                &shared.runtime.load().config.identity,
                &self.route.policy,
                self.route.config.token_groups,
                caller,
                &self.method,
                &self.path,
            ),
        };
        let (who, rule, reason) = match verdict {
            Verdict::Allow(_) => {
                self.decided_at.store(seq, Ordering::Release);
                self.sessions_at.store(ends, Ordering::Release);
                return true;
            }
            Verdict::SessionRevoked => (
                self.caller.log_name(),
                None,
                "the user was deactivated or re-created since signing in".to_owned(),
            ),
            Verdict::Deny { who, rule, reason } => (who, rule, reason),
        };
        if !self.cut.swap(true, Ordering::AcqRel) {
            shared.audit.refusal(
                &who,
                &self.route.config.name,
                rule.as_deref(),
                &format!("open connection closed: {reason}"),
                &self.method,
                &self.path,
            );
        }
        false
    }
}

/// Where the directory and the sessions are now, for [`Recheck::new`]: read it before deciding.
pub fn at(shared: &Shared) -> (Seq, u64) {
    (shared.directory.visible_seq(), shared.auth.sessions.ends())
}

/// One open websocket or event stream.
struct Open {
    recheck: Arc<Recheck>,
    /// A duplicate of the upstream socket: shutting it down ends the proxied connection.
    upstream: Arc<TcpStream>,
}

/// The open long-lived connections of authorized callers.
#[derive(Default)]
pub struct Streams {
    open: Mutex<HashMap<u64, Open>>,
    next: AtomicU64,
}

/// Keeps a connection in [`Streams`] for as long as its request lives.
pub struct Registration {
    streams: Arc<Streams>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        // The map is consistent after every operation on it; a panic elsewhere can't tear it.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches the connection whose upstream socket is `fd`. Call only from
    /// `connected_to_upstream`, while pingora holds `fd` open.
    pub fn register(
        self: &Arc<Self>,
        fd: RawFd,
        recheck: Arc<Recheck>,
    ) -> io::Result<Registration> {
        let upstream = duplicate(fd)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Open {
                recheck,
                upstream: Arc::new(upstream),
            },
        );
        Ok(Registration {
            streams: self.clone(),
            id,
        })
    }

    /// Decides again for every open connection; shuts down those refused.
    fn sweep(&self, shared: &Shared) {
        let open: Vec<(Arc<Recheck>, Arc<TcpStream>)> = self
            .lock()
            .values()
            .map(|open| (open.recheck.clone(), open.upstream.clone()))
            .collect();
        for (recheck, upstream) in open {
            if recheck.still_allowed(shared) {
                continue;
            }
            match upstream.shutdown(Shutdown::Both) {
                Ok(()) => {}
                // Already closed by either side: nothing left to cut.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => tracing::error!(
                    route = %recheck.route.config.name,
                    "cannot close a connection whose caller lost access: {e}"
                ),
            }
        }
    }
}

/// Duplicates the descriptor of an upstream socket.
#[allow(unsafe_code)]
fn duplicate(fd: RawFd) -> io::Result<TcpStream> {
    // SAFETY: `fd` is the socket pingora passes to `connected_to_upstream`; it stays open for
    // at least the duration of that call, which is the only caller (via `Streams::register`),
    // and the borrow ends before it returns. The duplicate is ours to own and close.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().map(TcpStream::from)
}

/// Decides again for every open long-lived connection whenever the directory changes.
pub struct Watcher {
    shared: Arc<Shared>,
}

impl Watcher {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.shared.directory.subscribe();
        let mut ends = self.shared.auth.sessions.subscribe_ends();
        loop {
            tokio::select! {
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
                _ = shutdown.changed() => return,
            }
            self.shared.streams.sweep(&self.shared);
        }
    }
}
