//! Long-lived connections (websockets and event streams) and cutting them the moment their
//! caller loses access.
//!
//! A request is judged when it arrives, but a websocket or an event stream can then live for
//! hours. Two mechanisms hold such connections to the same rule as requests, and both judge
//! with the same gate, under the configuration current at that moment:
//!
//! - Every body chunk and websocket frame, in either direction, is checked before it crosses
//!   the proxy ([`Recheck::still_allowed`]): if the directory changed or the configuration was
//!   reloaded since the last decision, the decision is made again, and a refusal ends the
//!   connection (nobody's, let in by a public rule, is judged by the configuration alone: only
//!   a reload moves it); if only sessions were ended (a sign-out, a back-channel logout:
//!   anyone's), a person's connection is asked whether their own still holds, and a machine's
//!   nothing. A directory write is
//!   visible before it is answered, so once the SCIM answer is sent, nothing more is let
//!   through for a caller it removed (chunks let through just before may still be in
//!   pingora's queues, up to five of 64 KiB each way, on their way out).
//! - An idle connection has no chunk to check, so on each such change every open connection is
//!   judged again ([`Streams::sweep`]) and the upstream socket of each refused one is shut
//!   down; pingora then ends the request and closes the client's connection.
//!
//! A stream makes no requests, so nothing on the request path refreshes its person's session
//! with the IdP: each keeps the session cookie it was let in with
//! ([`Recheck::keep_session_cookie`]), for the watcher to refresh it when due (`services.rs`).
//!
//! This module keeps the connections and knows when to judge again; what the judgement is, is
//! the caller's closure (the gate, see `state.rs`).

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use portcullis_config::Scheme;
use portcullis_scim::store::Seq;

use crate::caller::{Caller, SessionKey};
use crate::gate::{
    Admission, Cause, Client, ClientOf, Facts, Forward, Gate, Presented, Refusal, Refused,
};
use crate::routes::{Match, RouteTable};

/// Where everything a decision depends on stands: read it before deciding, so a change that
/// lands during the decision forces another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Marks {
    /// The directory's visible change sequence, of changes to resources and memberships
    /// ([`portcullis_scim::store::Directory::standing_seq`]).
    pub directory: Seq,
    /// How many times sessions were ended.
    pub session_ends: u64,
    /// How many times the configuration was reloaded.
    pub config: u64,
    /// The unix second: grants end with time (a session's expiry, a token's `exp`), so a
    /// caller's open connection is judged again at least once a second while it carries
    /// anything.
    pub second: u64,
    /// Whether the directory is known to be current: open connections are judged again the
    /// moment a replica loses its lease on the shared store's feed.
    pub current: bool,
}

/// What an allowed request was let in as, to judge it again later.
pub struct Recheck {
    /// `None`: let in with no caller, by a public rule.
    pub caller: Option<Caller>,
    pub target: Target,
    /// Who the upstream was told the caller is, when it was let in as its caller (not by a
    /// public rule as anyone): then it carries on only while that still holds (the same user,
    /// email and agent, in every group it was told of; see [`Forward::still_true_of`]). The
    /// upstream judged the connection by what it was told when it opened: a caller removed
    /// from a group it checked must not keep it.
    pub told: Option<Forward>,
    /// The marks read just before the last allowing decision.
    directory: AtomicU64,
    session_ends: AtomicU64,
    config: AtomicU64,
    second: AtomicU64,
    current: AtomicBool,
    /// Set once the connection has been refused, so the refusal is reported once.
    cut: AtomicBool,
    /// Refused because this replica lost touch with the directory, not its caller access (set
    /// before `cut`).
    unavailable: AtomicBool,
    /// A person's session cookie (its value, a secret), for the watcher to refresh the session
    /// with the IdP when due, as a request would: a stream makes no requests.
    session_cookie: std::sync::OnceLock<Box<str>>,
    /// What a request refused since it was let in, before its answer began, is told (see
    /// [`Recheck::note_refusal`]).
    refusal_note: std::sync::OnceLock<RefusalNote>,
}

/// What a request refused after it was let in is told, as one refused at once is: who it is,
/// as the 403 page names them (`None` for nobody, or for a caller no longer signed in), and
/// why.
#[derive(Debug)]
pub struct RefusalNote {
    pub who: Option<String>,
    pub reason: String,
}

/// Where an open connection went, and how: judged again as a request made then would be.
#[derive(Debug, Clone)]
pub struct Target {
    /// The route's name: the connection is judged again under the route a request to the same
    /// place would reach in the configuration current then, and only while that is the route
    /// of this name (one that is gone, or that a more specific route now shadows, lets nothing
    /// through).
    pub route: String,
    pub scheme: Scheme,
    /// Lower-cased, without port.
    pub host: String,
    pub method: String,
    /// The judged path.
    pub path: String,
    /// The query, as sent.
    pub query: Option<String>,
    pub client: Client,
    /// The address it came from.
    pub client_ip: Option<std::net::IpAddr>,
    /// A websocket (not an event stream): cut once its route no longer takes websockets.
    pub websocket: bool,
    /// The listener it came in on (its address), and whether that listener's own TLS carried
    /// it: judged again as the listener takes requests now (see `Shared::still_allowed`).
    pub local: Option<std::net::SocketAddr>,
    pub own_tls: bool,
}

impl Recheck {
    pub fn new(
        caller: Option<Caller>,
        target: Target,
        told: Option<Forward>,
        decided_at: Marks,
    ) -> Self {
        Self {
            caller,
            target,
            told,
            directory: AtomicU64::new(decided_at.directory),
            session_ends: AtomicU64::new(decided_at.session_ends),
            config: AtomicU64::new(decided_at.config),
            second: AtomicU64::new(decided_at.second),
            current: AtomicBool::new(decided_at.current),
            cut: AtomicBool::new(false),
            unavailable: AtomicBool::new(false),
            session_cookie: std::sync::OnceLock::new(),
            refusal_note: std::sync::OnceLock::new(),
        }
    }

    /// Whether the connection has been refused since it was let in.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// The status a request (of `method`, `sent` upstream or not yet) refused since it was let
    /// in is answered with, if no answer has begun: 503 (try again) when this replica lost
    /// touch with the directory and the request was not sent, or may be sent again as it is
    /// (an idempotent method); else 403 (a POST the upstream may have acted on already is not
    /// to be sent again blindly).
    pub fn refusal_status(&self, method: &http::Method, sent: bool) -> u16 {
        let again = !sent || method.is_idempotent();
        match self.unavailable.load(Ordering::Acquire) && again {
            true => 503,
            false => 403,
        }
    }

    /// Keeps what a request refused since it was let in is told (the first time only).
    pub fn note_refusal(&self, note: RefusalNote) {
        let _ = self.refusal_note.set(note);
    }

    /// What [`Recheck::note_refusal`] kept, if anything.
    pub fn refusal_note(&self) -> Option<&RefusalNote> {
        self.refusal_note.get()
    }

    /// Whether it was refused because this replica lost touch with the directory.
    pub fn lost_touch(&self) -> bool {
        self.unavailable.load(Ordering::Acquire)
    }

    /// Keeps the session cookie `id` the connection's person was let in with.
    pub fn keep_session_cookie(&self, id: &str) {
        let _ = self.session_cookie.set(id.into());
    }

    /// The session cookie kept with [`Recheck::keep_session_cookie`].
    pub fn session_cookie(&self) -> Option<&str> {
        self.session_cookie.get().map(|id| &**id)
    }

    /// Who it was opened by, for the audit log: the caller (an agent acting for itself as the
    /// upstream was told of it, `agent:<name>`, as its requests are recorded), or `anonymous`.
    pub fn who(&self) -> String {
        self.named(self.caller.as_ref())
            .unwrap_or_else(|| "anonymous".to_owned())
    }

    /// The name `caller` (its own caller, or none) goes by in the audit log: an agent acting
    /// for itself as the upstream was told of it, `agent:<name>`, else the caller's own.
    fn named(&self, caller: Option<&Caller>) -> Option<String> {
        match &self.told {
            Some(told)
                if caller.is_some()
                    && told
                        .agent
                        .as_ref()
                        .is_some_and(|a| a.on_behalf_of.is_none()) =>
            {
                Some(told.named.user.clone())
            }
            _ => caller.map(Caller::log_name),
        }
    }

    fn decided_at(&self) -> Marks {
        Marks {
            directory: self.directory.load(Ordering::Acquire),
            session_ends: self.session_ends.load(Ordering::Acquire),
            config: self.config.load(Ordering::Acquire),
            second: self.second.load(Ordering::Acquire),
            current: self.current.load(Ordering::Acquire),
        }
    }

    /// Whether the connection may carry on, given where things stand `now` (read before
    /// calling). When nothing moved since the last decision this costs five reads; when only
    /// sessions ended (anyone's: a sign-out, a sign-in past `max_sessions_per_person`), a
    /// person's is asked only whether their session is still `held`, and a machine's nothing;
    /// otherwise `judge` decides again, and the first refusal is handed to `on_cut` (to be
    /// recorded), once per connection.
    pub fn still_allowed(
        &self,
        now: Marks,
        held: impl FnOnce(&SessionKey) -> bool,
        judge: impl FnOnce(&Recheck) -> Admission,
        on_cut: impl FnOnce(&Recheck, Admission),
    ) -> bool {
        if self.cut.load(Ordering::Acquire) {
            return false;
        }
        let decided = self.decided_at();
        // Nobody's (let in by a public rule) is judged by the configuration alone: only a
        // reload can change its answer.
        let unchanged = match self.caller {
            None => now.config == decided.config,
            Some(_) => now == decided,
        };
        if unchanged {
            return true;
        }
        // Every sign-out would have every open connection judged again otherwise.
        if now
            == (Marks {
                session_ends: now.session_ends,
                ..decided
            })
        {
            let still = match &self.caller {
                Some(Caller::Person { session, .. }) => held(session),
                _ => true,
            };
            if still {
                self.session_ends.store(now.session_ends, Ordering::Release);
                return true;
            }
        }
        match judge(self) {
            Admission::Allow(_) => {
                self.directory.store(now.directory, Ordering::Release);
                self.session_ends.store(now.session_ends, Ordering::Release);
                self.config.store(now.config, Ordering::Release);
                self.second.store(now.second, Ordering::Release);
                self.current.store(now.current, Ordering::Release);
                true
            }
            refused => {
                if matches!(refused, Admission::Refuse(Refused::Unavailable)) {
                    self.unavailable.store(true, Ordering::Release);
                }
                if !self.cut.swap(true, Ordering::AcqRel) {
                    on_cut(self, refused);
                }
                false
            }
        }
    }
}

/// Judges an open connection again with the gate: under the route a request to the same place
/// reaches in `routes` (the current configuration's), which must still be the one of its name,
/// for its caller as they are at `now`. A machine whose token has expired, or a caller
/// `vouched` no longer vouches for (a person whose session has ended or expired, a machine
/// whose issuer no longer takes its token), is no longer a caller.
pub fn rejudge(
    gate: &Gate<'_>,
    routes: &RouteTable,
    open: &Recheck,
    now: u64,
    vouched: impl Fn(&Caller) -> bool,
    listener_refuses: Option<&str>,
) -> Admission {
    let target = &open.target;
    // Whether its caller still is one: a machine's token not expired, a caller `vouched` for.
    let holds = |caller: &Caller| match caller {
        Caller::Machine(machine)
            if now >= crate::auth::expires_under(gate.jwt_issuers, machine) =>
        {
            false
        }
        caller => vouched(caller),
    };
    let caller = open.caller.as_ref().filter(|caller| holds(caller));
    // Named as the 403 page names a caller: nobody (or one no longer signed in) is nobody,
    // not "anonymous". An agent's connection is its agent's (with the person it acts for), as
    // its upstream was told when it opened.
    let who = || open.named(caller);
    let agent = || open.told.as_ref().and_then(|told| told.agent.clone());
    let gone = |reason: &str| {
        Admission::Refuse(Refused::Forbid(Refusal {
            who: who(),
            rule: None,
            cause: Cause::RouteRemoved,
            reason: reason.to_owned(),
            agent: agent(),
        }))
    };
    // Its listener no longer takes such a request as it came (a reload took
    // `allow_plain_http` or `behind_tls_proxy` off it).
    if let Some(why) = listener_refuses {
        return gone(why);
    }
    let route = match routes.find(target.scheme, &target.host, &target.path) {
        Match::Found(route) if route.config.name == target.route => route,
        _ => return gone("the route is no longer in the configuration for this request"),
    };
    // A path a PHP front controller reads as another route's, which a reload may have added
    // (`/index.php/admin/events` once `/admin` is a route of its own), or a query CodeIgniter
    // reads so (`/?/admin/events`).
    let query = target.query.as_deref();
    if (routes.refuses(target.scheme, &target.host, route, &target.path, query)).is_some() {
        return gone("a request to this place would now be refused");
    }
    if target.websocket && !route.config.websockets {
        return gone("the route no longer takes websockets");
    }
    let presented = match (&open.caller, caller) {
        (None, _) => Presented::Nothing,
        (Some(_), Some(caller)) => Presented::Caller(caller.principal()),
        (Some(caller), None) => Presented::Invalid {
            bearer: matches!(caller, Caller::Machine(_)),
        },
    };
    let facts = Facts {
        route: &route.config,
        method: &target.method,
        path: &target.path,
        client: ClientOf::Known(target.client),
    };
    let changed = |cause, reason: &str| {
        Admission::Refuse(Refused::Forbid(Refusal {
            who: who(),
            rule: None,
            cause,
            reason: reason.to_owned(),
            agent: agent(),
        }))
    };
    match (gate.admit(&facts, presented), &open.told) {
        // Let in only as anyone because this replica cannot tell who its caller is now: cut
        // for that (try again), not as if the caller had lost access.
        (Admission::Allow(pass), Some(_))
            if pass.forward.is_none() && !gate.current && caller.is_some() =>
        {
            Admission::Refuse(Refused::Unavailable)
        }
        // Let in now only as anyone (deactivated, signed out, its token expired, on a public
        // path): not as the caller the upstream was told of when it was opened.
        (Admission::Allow(pass), Some(_)) if pass.forward.is_none() => changed(
            Cause::AsAnyoneOnly,
            "the connection was opened as its caller, who is now let in only as anyone",
        ),
        (Admission::Allow(pass), Some(told))
            if pass
                .forward
                .as_ref()
                .is_some_and(|now| !now.still_true_of(told)) =>
        {
            changed(
                Cause::IdentityChanged,
                "what the upstream was told of the caller when the connection was opened no \
                 longer holds (user, email, a group, or agent)",
            )
        }
        (admission, _) => admission,
    }
}

/// One open websocket or event stream.
struct Open {
    recheck: Arc<Recheck>,
    /// A duplicate of the upstream socket: shutting it down ends the proxied connection.
    upstream: TcpStream,
}

/// The open long-lived connections (websockets and event streams), a caller's or anyone's a
/// public rule let in.
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
        self.lock().insert(id, Open { recheck, upstream });
        Ok(Registration {
            streams: self.clone(),
            id,
        })
    }

    /// Every open connection's [`Recheck`].
    pub fn open(&self) -> Vec<Arc<Recheck>> {
        self.lock()
            .values()
            .map(|open| open.recheck.clone())
            .collect()
    }

    /// Judges every open connection again with `still_allowed`; shuts down those refused.
    pub fn sweep(&self, still_allowed: impl Fn(&Recheck) -> bool) {
        let open: Vec<(u64, Arc<Recheck>)> = self
            .lock()
            .iter()
            .map(|(id, open)| (*id, open.recheck.clone()))
            .collect();
        for (id, recheck) in open {
            if still_allowed(&recheck) {
                continue;
            }
            // Shut down only while still registered: once its request is over, pingora may
            // have pooled the connection for another caller (an upstream that refused the
            // websocket, a request refused before it went).
            let open = self.lock();
            let Some(upstream) = open.get(&id).map(|open| &open.upstream) else {
                continue;
            };
            match upstream.shutdown(Shutdown::Both) {
                Ok(()) => {}
                // Already closed by either side: nothing left to cut.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => tracing::error!(
                    route = %recheck.target.route,
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;

    use super::*;
    use crate::gate::Pass;
    use crate::testing::{parse, World, CONFIG};

    const ALICE: &str = "alice@corp.example";
    const APP: &str = "http://app.test";

    fn marks(directory: Seq) -> Marks {
        Marks {
            directory,
            ..Marks::default()
        }
    }

    /// Every session still held.
    fn held(_: &SessionKey) -> bool {
        true
    }

    fn allow() -> Admission {
        Admission::Allow(Pass {
            forward: None,
            why: None,
        })
    }

    /// An event stream from `/ws` on the route named `route` (`http://host`).
    fn target(route: &str, client: Client) -> Target {
        let host = route.trim_start_matches("http://");
        Target {
            route: route.to_owned(),
            scheme: Scheme::Http,
            host: host.split('/').next().unwrap_or(host).to_owned(),
            method: "GET".to_owned(),
            path: "/ws".to_owned(),
            query: None,
            client,
            client_ip: None,
            websocket: false,
            local: None,
            own_tls: false,
        }
    }

    fn open(world: &World, route: &str) -> Recheck {
        let caller = Caller::Person {
            session: [7; 32],
            identity: Arc::new(world.person(ALICE)),
        };
        let mut open = Recheck::new(Some(caller), target(route, Client::Browser), None, marks(0));
        open.told = told(world, &open);
        open
    }

    /// Who the upstream is told the caller of `open` is, as things stand.
    fn told(world: &World, open: &Recheck) -> Option<Forward> {
        let runtime = world.runtime();
        match rejudge(&world.gate(), &runtime.routes, open, 0, |_| true, None) {
            Admission::Allow(pass) => pass.forward,
            _ => None,
        }
    }

    /// A connection cut because this replica lost touch with the directory is answered 503
    /// (try again) if its method may be sent again, one whose caller lost access 403.
    #[test]
    fn a_cut_says_whether_to_try_again() {
        use crate::proxy::failure_status;
        use pingora::ErrorType;
        let world = World::new();
        let (get, post) = (http::Method::GET, http::Method::POST);
        let lost_touch = open(&world, APP);
        assert_eq!(lost_touch.refusal_status(&get, true), 403, "not cut yet");
        let unavailable = |_: &Recheck| Admission::Refuse(Refused::Unavailable);
        assert!(!lost_touch.still_allowed(marks(1), held, unavailable, |_, _| {}));
        assert_eq!(lost_touch.refusal_status(&get, true), 503);
        // Not to be sent again as it is once sent: the upstream may have acted on it.
        assert_eq!(lost_touch.refusal_status(&post, true), 403);
        assert_eq!(lost_touch.refusal_status(&post, false), 503);
        // What the client is answered: a POST refused before it was sent, 503; one whose
        // socket was shut once it was (or may have been), 403.
        let refusal = |status| pingora::Error::explain(ErrorType::HTTPStatus(status), "cut");
        let unsent = refusal(lost_touch.refusal_status(&post, false));
        let status = |e: &pingora::Error| failure_status(e, Some(&lost_touch), &post);
        assert_eq!(status(&unsent), 503);
        let shut = pingora::Error::explain(ErrorType::ReadError, "shut").into_up();
        assert_eq!(status(&shut), 403);
        assert_eq!(failure_status(&shut, Some(&lost_touch), &get), 503);
        let refused = open(&world, APP);
        let forbid = |open: &Recheck| {
            Admission::Refuse(Refused::Forbid(Refusal {
                who: Some(open.who()),
                rule: None,
                cause: Cause::NotInDirectory,
                reason: "gone".to_owned(),
                agent: None,
            }))
        };
        assert!(!refused.still_allowed(marks(1), held, forbid, |_, _| {}));
        assert_eq!(refused.refusal_status(&get, false), 403);
    }

    /// A connection on a public path opened as its caller, on a replica that then lost touch
    /// with the directory: cut as out of touch (503, try again), not as one whose caller was
    /// let in only as anyone now.
    #[tokio::test]
    async fn a_caller_s_connection_on_a_public_path_is_cut_as_out_of_touch() {
        let world = eng_world().await;
        let mut open = open(&world, APP);
        open.target.path = "/public/feed".to_owned();
        open.told = told(&world, &open);
        assert!(open.told.is_some(), "let in as alice");
        let runtime = world.runtime();
        let out_of_touch = crate::gate::Gate {
            current: false,
            ..world.gate()
        };
        let judge =
            |open: &Recheck| rejudge(&out_of_touch, &runtime.routes, open, 0, |_| true, None);
        assert_eq!(judge(&open), Admission::Refuse(Refused::Unavailable));
        assert!(!open.still_allowed(marks(1), held, judge, |_, _| {}));
        assert!(open.lost_touch());
        assert_eq!(open.refusal_status(&http::Method::GET, true), 503);
        // A machine whose token has expired there is let in only as anyone, out of touch or
        // not: cut as that.
        world.user("build-bot").await;
        let mut machine = crate::testing::machine("build-bot");
        machine.expires = 1_000;
        let mut target = target(APP, Client::Api);
        target.path = "/public/feed".to_owned();
        let caller = Some(Caller::Machine(Arc::new(machine)));
        let mut open = Recheck::new(caller, target, None, marks(0));
        open.told = told(&world, &open);
        assert!(open.told.is_some(), "let in as build-bot");
        let expired = rejudge(&out_of_touch, &runtime.routes, &open, 1_000, |_| true, None);
        assert!(
            matches!(&expired, Admission::Refuse(Refused::Forbid(r)) if r.cause == Cause::AsAnyoneOnly),
            "{expired:?}"
        );
    }

    #[test]
    fn nothing_changed_nothing_is_judged() {
        let world = World::new();
        let open = open(&world, APP);
        let judged = |_: &Recheck| -> Admission { panic!("judged although nothing changed") };
        assert!(open.still_allowed(marks(0), held, judged, |_, _| panic!("cut")));
    }

    /// Anyone's sign-out ends a session: a person's connection asks only whether theirs is
    /// still held (judged whole once it is not), and a machine's asks nothing.
    #[test]
    fn a_session_ended_elsewhere_is_no_reason_to_judge_a_connection_again() {
        let world = World::new();
        let ended = Marks {
            session_ends: 1,
            ..marks(0)
        };
        let judged = |_: &Recheck| -> Admission { panic!("judged for another's sign-out") };
        let person = open(&world, APP);
        assert!(person.still_allowed(ended, held, judged, |_, _| panic!("cut")));
        let again = Marks {
            session_ends: 2,
            ..marks(0)
        };
        let refuse = |_: &Recheck| Admission::Refuse(Refused::Unavailable);
        assert!(!person.still_allowed(again, |_| false, refuse, |_, _| {}));
        let machine = Recheck::new(
            Some(Caller::Machine(Arc::new(crate::testing::machine("ci-bot")))),
            target(APP, Client::Browser),
            None,
            marks(0),
        );
        let unheld = |_: &SessionKey| -> bool { panic!("a machine has no session") };
        assert!(machine.still_allowed(ended, unheld, judged, |_, _| panic!("cut")));
    }

    #[test]
    fn a_change_is_judged_once_and_an_allow_is_remembered() {
        let world = World::new();
        let open = open(&world, APP);
        let judged = Cell::new(0);
        let judge = |_: &Recheck| {
            judged.set(judged.get() + 1);
            allow()
        };
        assert!(open.still_allowed(marks(5), held, judge, |_, _| panic!("cut")));
        assert!(open.still_allowed(marks(5), held, judge, |_, _| panic!("cut")));
        assert_eq!(judged.get(), 1, "the second time nothing had moved");
        let reload = Marks {
            config: 1,
            ..marks(5)
        };
        assert!(open.still_allowed(reload, held, judge, |_, _| panic!("cut")));
        assert_eq!(judged.get(), 2, "a reload is a change");
        let a_second_later = Marks {
            second: 1,
            ..reload
        };
        assert!(open.still_allowed(a_second_later, held, judge, |_, _| panic!("cut")));
        assert_eq!(judged.get(), 3, "so is the passing of a second");
    }

    /// Nobody's connection (let in by a public rule) is judged by the configuration alone: a
    /// directory change, a session's end, the lease or the time moves nothing for it.
    #[test]
    fn nobody_s_connection_is_judged_again_only_after_a_reload() {
        let open = Recheck::new(None, target(APP, Client::Browser), None, marks(0));
        let judged = Cell::new(0);
        let judge = |_: &Recheck| {
            judged.set(judged.get() + 1);
            allow()
        };
        let moved = Marks {
            session_ends: 3,
            second: 9,
            current: true,
            ..marks(5)
        };
        assert!(open.still_allowed(moved, held, judge, |_, _| panic!("cut")));
        assert_eq!(judged.get(), 0, "nothing it is judged by moved");
        let reload = Marks { config: 1, ..moved };
        assert!(open.still_allowed(reload, held, judge, |_, _| panic!("cut")));
        assert_eq!(judged.get(), 1, "a reload");
    }

    #[test]
    fn a_refusal_cuts_for_good_and_is_reported_once() {
        let world = World::new();
        let open = open(&world, APP);
        let cuts = Cell::new(0);
        let refuse = |_: &Recheck| Admission::Refuse(Refused::SignIn { revoked: None });
        let on_cut = |_: &Recheck, _: Admission| cuts.set(cuts.get() + 1);
        assert!(!open.still_allowed(marks(1), held, refuse, on_cut));
        assert!(!open.still_allowed(marks(2), held, |_| allow(), on_cut));
        assert_eq!(cuts.get(), 1);
    }

    async fn eng_world() -> World {
        let world = World::new();
        let alice = world.user(ALICE).await;
        world.group("eng", &[&alice]).await;
        world
    }

    #[tokio::test]
    async fn an_open_connection_is_judged_by_the_gate_under_its_route() {
        let world = eng_world().await;
        let runtime = world.runtime();
        let open = open(&world, APP);
        let admission = rejudge(&world.gate(), &runtime.routes, &open, 0, |_| true, None);
        assert!(matches!(admission, Admission::Allow(_)), "{admission:?}");
    }

    #[tokio::test]
    async fn a_connection_whose_caller_left_the_group_is_refused() {
        let world = eng_world().await;
        let runtime = world.runtime();
        let open = open(&world, APP);
        let eng = world.directory.groups_of(&world.id_of(ALICE));
        let eng = eng.first().map(|g| g.id.clone()).unwrap_or_default();
        world.remove_member(&eng, &world.id_of(ALICE)).await;
        let admission = rejudge(&world.gate(), &runtime.routes, &open, 0, |_| true, None);
        assert!(
            matches!(admission, Admission::Refuse(Refused::Forbid(ref r)) if r.who.as_deref() == Some(ALICE)),
            "{admission:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_whose_session_ended_is_refused() {
        let world = eng_world().await;
        let runtime = world.runtime();
        let open = open(&world, APP);
        let admission = rejudge(&world.gate(), &runtime.routes, &open, 0, |_| false, None);
        assert_eq!(
            admission,
            Admission::Refuse(Refused::SignIn { revoked: None })
        );
    }

    #[tokio::test]
    async fn a_machine_connection_ends_when_its_token_expires() {
        let world = World::new();
        let bot = world.user("build-bot").await;
        world.group("eng", &[&bot]).await;
        let runtime = world.runtime();
        let mut machine = crate::testing::machine("build-bot");
        machine.expires = 1_000;
        let mut open = Recheck::new(
            Some(Caller::Machine(Arc::new(machine))),
            target("http://api.test", Client::Api),
            None,
            marks(0),
        );
        open.told = told(&world, &open);
        assert!(open.told.is_some());
        let at = |now| rejudge(&world.gate(), &runtime.routes, &open, now, |_| true, None);
        assert!(matches!(at(999), Admission::Allow(_)), "{:?}", at(999));
        assert_eq!(
            at(1_000),
            Admission::Refuse(Refused::Challenge {
                invalid_token: true,
                revoked: None
            })
        );
        // Taken with its issuer's leeway of 60 s (its `exp` is 940), which a reload then
        // lowers to none: it ends at its `exp`.
        let mut machine = crate::testing::machine("build-bot");
        machine.expires = 1_000;
        machine.signed = Some(crate::auth::jwt::SignedWith {
            jwks_uri: None,
            tls_ca: None,
            leeway: std::time::Duration::from_secs(60),
            iat_backdate: std::time::Duration::ZERO,
            set: Arc::new(crate::auth::jwt::Jwks::new(
                "http://127.0.0.1:2/jwks".to_owned(),
                reqwest::Client::new(),
            )),
            kid: None,
            alg: jsonwebtoken::Algorithm::ES256,
            key: "k".into(),
        });
        let open = Recheck::new(
            Some(Caller::Machine(Arc::new(machine))),
            target("http://api.test", Client::Api),
            None,
            marks(0),
        );
        let mut config = world.config.clone();
        config.jwt_issuers[0].leeway = std::time::Duration::ZERO;
        let reloaded = crate::gate::Gate {
            jwt_issuers: &config.jwt_issuers,
            ..world.gate()
        };
        let at = |now| rejudge(&reloaded, &runtime.routes, &open, now, |_| true, None);
        assert!(matches!(at(939), Admission::Allow(_)), "{:?}", at(939));
        assert!(
            matches!(at(940), Admission::Refuse(Refused::Challenge { .. })),
            "{:?}",
            at(940)
        );
    }

    #[tokio::test]
    async fn a_connection_opened_as_its_caller_ends_when_they_are_let_in_only_as_anyone() {
        let world = World::new();
        let bot = world.user("build-bot").await;
        world.group("eng", &[&bot]).await;
        let runtime = world.runtime();
        // Opened on a public path by the build bot, let in as itself (and so named to the
        // upstream); another, by the same bot let in there as anyone.
        let public = |identified| {
            let mut target = target(APP, Client::Api);
            target.path = "/public/feed".to_owned();
            let machine = Arc::new(crate::testing::machine("build-bot"));
            let mut open = Recheck::new(Some(Caller::Machine(machine)), target, None, marks(0));
            if identified {
                open.told = told(&world, &open);
                assert!(open.told.is_some());
            }
            open
        };
        let (as_itself, as_anyone) = (public(true), public(false));
        let judged =
            |open: &Recheck| rejudge(&world.gate(), &runtime.routes, open, 0, |_| true, None);
        assert!(matches!(judged(&as_itself), Admission::Allow(_)));
        // Its token no longer taken: let in only as anyone, and named as nobody (it is no
        // caller now), not as whom it was.
        let admission = rejudge(
            &world.gate(),
            &runtime.routes,
            &as_itself,
            0,
            |_| false,
            None,
        );
        assert!(
            matches!(admission, Admission::Refuse(Refused::Forbid(ref r))
                if r.cause == Cause::AsAnyoneOnly && r.who.is_none()),
            "{admission:?}"
        );
        // Deactivated: the public path still lets it in, but only as anyone.
        world.set_active(&bot, false).await;
        let admission = judged(&as_itself);
        assert!(
            matches!(admission, Admission::Refuse(Refused::Forbid(ref r)) if r.cause == Cause::AsAnyoneOnly),
            "{admission:?}"
        );
        assert!(matches!(judged(&as_anyone), Admission::Allow(_)));
    }

    #[tokio::test]
    async fn a_connection_ends_when_its_caller_is_told_of_differently() {
        let world = World::new();
        let alice = world.user(ALICE).await;
        world.group("eng", &[&alice]).await;
        let admins = world.group("admins", &[&alice]).await;
        let runtime = world.runtime();
        let open = open(&world, APP);
        let judged = || rejudge(&world.gate(), &runtime.routes, &open, 0, |_| true, None);
        assert!(matches!(judged(), Admission::Allow(_)));
        // A group added takes nothing the upstream was told away.
        world.group("ops", &[&alice]).await;
        assert!(matches!(judged(), Admission::Allow(_)), "{:?}", judged());
        // Still let in (eng), but no longer an admin, as the upstream was told at the start.
        world.remove_member(&admins, &alice).await;
        let admission = judged();
        assert!(
            matches!(admission, Admission::Refuse(Refused::Forbid(ref r)) if r.cause == Cause::IdentityChanged),
            "{admission:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_on_a_route_a_reload_removed_is_refused() {
        let world = eng_world().await;
        let runtime = world.runtime();
        let open = open(&world, "http://gone.test");
        let admission = rejudge(&world.gate(), &runtime.routes, &open, 0, |_| true, None);
        assert!(
            matches!(admission, Admission::Refuse(Refused::Forbid(ref r)) if r.cause == Cause::RouteRemoved),
            "{admission:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_is_judged_under_the_current_configuration_not_its_first() {
        let world = eng_world().await;
        let open = open(&world, APP);
        // A reload: the route's deny rule now covers /ws.
        let text = CONFIG.replace("paths = [\"/admin\"]", "paths = [\"/ws\"]");
        let runtime = crate::state::Runtime::build(parse(&text), &world.directory);
        let admission = rejudge(&world.gate(), &runtime.routes, &open, 0, |_| true, None);
        assert!(
            matches!(admission, Admission::Refuse(Refused::Forbid(ref r)) if r.cause == Cause::DenyRule),
            "{admission:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_is_cut_once_its_place_is_another_route_s_or_websockets_end() {
        let world = eng_world().await;
        let open = open(&world, APP);
        let judged = |text: &str, open: &Recheck| {
            let runtime = crate::state::Runtime::build(parse(text), &world.directory);
            rejudge(&world.gate(), &runtime.routes, open, 0, |_| true, None)
        };
        let cut = |admission: Admission| matches!(admission, Admission::Refuse(Refused::Forbid(ref r)) if r.cause == Cause::RouteRemoved);
        // A reload adds a route for /ws on the same host, for others: the route of the
        // connection's name still exists, but a request to it now would not reach it.
        let narrowed = format!(
            "{CONFIG}\n[[routes]]\nfrom = \"http://app.test/ws\"\nto = [\"http://127.0.0.1:3\"]\n\
             allow = {{ groups = [\"sre\"] }}\n"
        );
        assert!(cut(judged(&narrowed, &open)));
        // Nor one a PHP front controller reads as that route's (a request to it now is
        // refused, as another route's).
        let script = Recheck::new(
            open.caller.clone(),
            Target {
                path: "/index.php/ws".to_owned(),
                ..open.target.clone()
            },
            open.told.clone(),
            marks(0),
        );
        assert!(matches!(judged(CONFIG, &script), Admission::Allow(_)));
        assert!(cut(judged(&narrowed, &script)));
        // Nor one whose query CodeIgniter reads as that route's path.
        let routed = Recheck::new(
            open.caller.clone(),
            Target {
                path: "/".to_owned(),
                query: Some("/ws".to_owned()),
                ..open.target.clone()
            },
            open.told.clone(),
            marks(0),
        );
        assert!(matches!(judged(CONFIG, &routed), Admission::Allow(_)));
        assert!(cut(judged(&narrowed, &routed)));
        // A websocket, once its route no longer takes them; an event stream carries on.
        let websockets = CONFIG.replacen(
            "from = \"http://app.test\"\n",
            "from = \"http://app.test\"\nwebsockets = true\n",
            1,
        );
        assert!(matches!(judged(&websockets, &open), Admission::Allow(_)));
        let socket = Recheck::new(
            open.caller.clone(),
            Target {
                websocket: true,
                ..open.target.clone()
            },
            open.told.clone(),
            marks(0),
        );
        assert!(matches!(judged(&websockets, &socket), Admission::Allow(_)));
        assert!(cut(judged(CONFIG, &socket)));
    }
}
