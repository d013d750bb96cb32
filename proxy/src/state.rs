//! The state every request reads: the compiled configuration, swapped whole on reload, and
//! the process-wide services around it ([`Shared`]). Only the top of the crate (the pingora
//! glue in `proxy.rs`, the admin listener, the background services and reload) reaches for
//! [`Shared`]; everything below it takes plain values.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use portcullis_config::{Config, OidcConfig, Scheme};
use portcullis_scim::store::postgres::Freshness;
use portcullis_scim::store::Directory;

use crate::assertion::Signer;
use crate::audit::Audit;
use crate::auth::Auth;
use crate::caller::Caller;
use crate::clock::now_unix;
use crate::gate::{Admission, Forwards, Gate, Refused};
use crate::reload::AtStart;
use crate::routes::{CompiledRoute, RouteTable};
use crate::scim_http::Scim;
use crate::streams::{Marks, Recheck, Streams};
use crate::tls::{CertSet, SniResolver};
use crate::watched::Watched;

/// One configuration, compiled for the hot path. Requests hold an `Arc` to the one they started
/// with, so a reload never changes the rules under an in-flight request.
pub struct Runtime {
    pub config: Config,
    pub routes: RouteTable,
    /// Port of the first TLS listener, used when redirecting a plain request to https.
    pub https_port: Option<u16>,
    pub scim: Option<Scim>,
    /// `iss` of the identity assertions: the sign-in origin, or `portcullis` without sign-in.
    pub assertion_issuer: String,
    /// Whether any listener is `behind_tls_proxy`: if none, no request needs its listener
    /// looked up to know whether it was made over https.
    behind_tls_proxy: bool,
    /// Whether any listener names `trusted_proxies`: if none, every client is the address its
    /// connection comes from, and no listener is looked up to know.
    trusted_proxies: bool,
    /// Set when it is installed: a bearer token verified under this configuration is taken
    /// again without verifying only by requests living by it (see `auth::verified`).
    pub tokens_epoch: u64,
    /// The settings of `config` that differ from those the process started with and wait for
    /// a restart (see `reload::AtStart`), as the console shows them.
    pub awaiting_restart: Vec<&'static str>,
    /// SHA-256 of the SCIM and `[admin]` tokens this configuration holds, then of those
    /// earlier configurations of this process held and this one does not (the newest
    /// [`MAX_FORMER_TOKENS`]): Portcullis' own, never an upstream's. An IdP goes on sending a
    /// SCIM token taken out, and the same token may be put back.
    own_tokens: Arc<Vec<[u8; 32]>>,
}

/// How many tokens taken out of the configuration are still known as Portcullis' own.
const MAX_FORMER_TOKENS: usize = 256;

/// SHA-256 of the SCIM and `[admin]` tokens `config` holds.
fn token_digests(config: &Config) -> impl Iterator<Item = [u8; 32]> + '_ {
    let scim = config.scim.iter().flat_map(|scim| &scim.tokens);
    let admin = config.admin.iter().flat_map(|admin| &admin.token);
    scim.map(|token| token.sha256)
        .chain(admin.map(|token| token.sha256))
}

/// The port a plain-HTTP request is sent to for https, of the https listeners at `tls` (a
/// listener behind a TLS proxy counted on 443): the one
/// most clients can reach (on every address, then on another than loopback, then on
/// loopback), 443 before others; not merely the first in the file (a loopback-only one for
/// operators, say).
fn https_port(tls: impl Iterator<Item = std::net::SocketAddr>) -> Option<u16> {
    let reach = |ip: std::net::IpAddr| match ip {
        ip if ip.is_unspecified() => 0,
        ip if !ip.is_loopback() => 1,
        _ => 2,
    };
    tls.min_by_key(|address| (reach(address.ip()), address.port() != 443))
        .map(|address| address.port())
}

impl Runtime {
    /// Takes over from `running` which upstreams of each route (of the same name) are down.
    pub fn keep_health_of(&self, running: &Runtime) {
        for route in self.routes.all() {
            let name = &route.config.name;
            if let Some(old) = running.routes.all().find(|old| old.config.name == *name) {
                route.upstreams.keep_health_of(&old.upstreams);
            }
        }
    }

    /// The state for `config`. It cannot fail: the configuration holds everything compiled and
    /// loaded already (see `portcullis_config::model`).
    pub fn build(config: Config, directory: &Arc<Directory>) -> Self {
        let routes = config
            .routes
            .iter()
            .map(|route| Arc::new(CompiledRoute::new(route.clone())))
            .collect();
        // A listener behind a TLS proxy is reached over https on that proxy's port: 443.
        let https_port = https_port(config.listeners.iter().filter_map(|l| {
            match (&l.tls, l.behind_tls_proxy) {
                (Some(_), _) => Some(l.address),
                (None, true) => Some(std::net::SocketAddr::new(l.address.ip(), 443)),
                (None, false) => None,
            }
        }));
        let scim = config
            .scim
            .as_ref()
            .map(|scim| Scim::new(scim, directory.clone()));
        let own_tokens = Arc::new(token_digests(&config).collect());
        Self {
            behind_tls_proxy: config.listeners.iter().any(|l| l.behind_tls_proxy),
            trusted_proxies: config
                .listeners
                .iter()
                .any(|l| !l.trusted_proxies.is_empty()),
            routes: RouteTable::new(routes),
            tokens_epoch: 0,
            awaiting_restart: Vec::new(),
            own_tokens,
            https_port,
            scim,
            assertion_issuer: config.oidc.as_ref().map_or_else(
                || "portcullis".to_owned(),
                |oidc| {
                    let scheme = match oidc.auth_scheme {
                        Scheme::Https => "https",
                        Scheme::Http => "http",
                    };
                    format!("{scheme}://{}", oidc.auth_host)
                },
            ),
            config,
        }
    }

    /// Takes over from `running` the tokens it, or a configuration before it, held and this
    /// one does not ([`Runtime::own_tokens`]).
    pub fn keep_tokens_of(&mut self, running: &Runtime) {
        let held: Vec<[u8; 32]> = token_digests(&self.config).collect();
        // The newest first: those running holds, then those it kept, the last kept first.
        let newest_first =
            token_digests(&running.config).chain(running.own_tokens.iter().rev().copied());
        let mut former: Vec<[u8; 32]> = Vec::new();
        for digest in newest_first {
            if !held.contains(&digest) && !former.contains(&digest) {
                former.push(digest);
            }
        }
        former.truncate(MAX_FORMER_TOKENS);
        former.reverse();
        self.own_tokens = Arc::new(held.into_iter().chain(former).collect());
    }

    /// Whether Portcullis answers for the lower-cased `host` (without port): a route's host,
    /// the SCIM host or the sign-in host.
    pub fn serves(&self, host: &str) -> bool {
        self.routes.serves(host)
            || self.scim.as_ref().is_some_and(|scim| scim.host == host)
            || self
                .config
                .oidc
                .as_ref()
                .is_some_and(|oidc| oidc.auth_host_name == host)
    }

    /// Whether SCIM, sign-in, sessions and bearer tokens may be taken from a request that
    /// arrived at `local` (see `Listener::carries_credentials`). A request on no listener of this configuration (a
    /// reload removed it) may not: fail closed.
    pub fn carries_credentials(&self, local: Option<SocketAddr>, tls: bool) -> bool {
        tls || self
            .plain_listener(local)
            .is_some_and(|l| l.carries_credentials())
    }

    /// Whether a request of `scheme` can carry a credential on some listener of this
    /// configuration ([`Runtime::carries_credentials`]): not a plain HTTP one where every
    /// listener that takes those (no TLS, none in front) is off loopback, without
    /// `allow_plain_http`. `explain` and the console judge callers by it, as the proxy refuses
    /// what they present there.
    pub fn takes_credentials(&self, scheme: Scheme) -> bool {
        scheme == Scheme::Https
            || (self.config.listeners.iter())
                .any(|l| l.tls.is_none() && !l.behind_tls_proxy && l.carries_credentials())
    }

    /// The session cookie's name (without a `__Host-` prefix): `[oidc] cookie_name`, or the
    /// default one without [oidc], which browsers may still send (a reload took it out).
    pub fn session_cookie(&self) -> &str {
        self.config
            .oidc
            .as_ref()
            .map_or(portcullis_config::DEFAULT_COOKIE_NAME, |oidc| {
                oidc.cookie_name.as_str()
            })
    }

    /// Whether a bearer `token` is one of Portcullis' own credentials, never an upstream's: a
    /// JWT of one of its issuers for one of their audiences, a SCIM token or the admin token
    /// this configuration or an earlier one held (compared in constant time).
    pub fn is_own_token(&self, token: &str) -> bool {
        if crate::auth::meant_for_portcullis(&self.config, token) {
            return true;
        }
        if self.own_tokens.is_empty() {
            return false;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for own in self.own_tokens.iter() {
            found |= own.ct_eq(&digest);
        }
        found.into()
    }

    /// Whether a request on the listener at `local` was made over https: to that listener's
    /// own TLS (`own_tls`), or to a proxy's in front of it.
    pub fn over_https(&self, local: Option<SocketAddr>, own_tls: bool) -> bool {
        own_tls || self.behind_tls_proxy(local)
    }

    /// Whether a request that arrived at `local` without TLS was made over https all the same:
    /// on a listener behind a proxy that terminates TLS (`behind_tls_proxy`).
    pub fn behind_tls_proxy(&self, local: Option<SocketAddr>) -> bool {
        self.behind_tls_proxy
            && self
                .plain_listener(local)
                .is_some_and(|l| l.behind_tls_proxy)
    }

    /// The address of the client a request came from: `peer`, the address its connection
    /// comes from, unless the listener (at `local`, with its own TLS or not) trusts `peer` as
    /// a proxy in front. Then it is the last address `X-Forwarded-For` names, or the one
    /// before it while that is a trusted proxy too (each appends the address it was reached
    /// from; what a client wrote itself comes before). An entry that is not an address ends
    /// the walk at the last proxy: what it was reached from is not known.
    pub fn client_ip(
        &self,
        peer: Option<IpAddr>,
        local: Option<SocketAddr>,
        own_tls: bool,
        headers: &http::HeaderMap,
    ) -> Option<IpAddr> {
        let peer = peer?.to_canonical();
        if !self.trusted_proxies {
            return Some(peer);
        }
        let Some(listener) = self.listener(local, own_tls) else {
            return Some(peer);
        };
        let trusted = |ip: &IpAddr| listener.trusted_proxies.iter().any(|net| net.contains(ip));
        let mut client = peer;
        if !trusted(&client) {
            return Some(client);
        }
        let named = headers
            .get_all(crate::proxy::X_FORWARDED_FOR)
            .iter()
            .rev()
            .flat_map(|value| value.as_bytes().rsplit(|&b| b == b','));
        for entry in named {
            match forwarded_address(entry) {
                Some(ip) => client = ip,
                None => break,
            }
            if !trusted(&client) {
                break;
            }
        }
        Some(client)
    }

    /// Whether a connection from `peer` to `local` (on a listener with its own TLS or not) comes
    /// from a proxy the listener trusts (`trusted_proxies`).
    pub fn from_trusted_proxy(
        &self,
        peer: Option<IpAddr>,
        local: Option<SocketAddr>,
        own_tls: bool,
    ) -> bool {
        let Some(peer) = peer.map(|peer| peer.to_canonical()) else {
            return false;
        };
        self.trusted_proxies
            && self
                .listener(local, own_tls)
                .is_some_and(|l| l.trusted_proxies.iter().any(|net| net.contains(&peer)))
    }

    /// The plain-HTTP listener of this configuration that took a connection at `local`.
    fn plain_listener(&self, local: Option<SocketAddr>) -> Option<&portcullis_config::Listener> {
        self.listener(local, false)
    }

    /// The listener of this configuration, with TLS or without, that took a connection at
    /// `local`: the one bound to that very address, else a wildcard of its family (`0.0.0.0`
    /// takes IPv4 only, `[::]` both).
    fn listener(
        &self,
        local: Option<SocketAddr>,
        tls: bool,
    ) -> Option<&portcullis_config::Listener> {
        let local = local?;
        let of_kind = || {
            self.config
                .listeners
                .iter()
                .filter(move |l| l.tls.is_some() == tls && l.address.port() == local.port())
        };
        of_kind()
            .find(|l| l.address.ip() == local.ip().to_canonical())
            .or_else(|| {
                of_kind().find(|l| portcullis_config::address_takes(l.address.ip(), local.ip()))
            })
    }

    pub fn scheme_of(tls: bool) -> Scheme {
        if tls {
            Scheme::Https
        } else {
            Scheme::Http
        }
    }
}

/// One entry of `X-Forwarded-For`: an address, IPv6 in brackets or not, with a port as some
/// load balancers add (`192.0.2.7:5123`, `[2001:db8::7]:5123`).
fn forwarded_address(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?.trim();
    let bare = entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(entry);
    bare.parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Process-wide state shared by the proxy, the admin listener and the reloader.
pub struct Shared {
    pub config_path: PathBuf,
    /// The directory outlives configurations: a reload keeps it (changing `data_dir` needs a
    /// restart).
    pub directory: Arc<Directory>,
    /// With a shared store (`[postgres]`): this replica's lease on the change feed.
    pub freshness: Option<Arc<Freshness>>,
    /// Sessions, the OIDC provider and issuers' keys: kept across reloads.
    pub auth: Arc<Auth>,
    /// Signs the identity assertions sent upstream.
    pub signer: Arc<Signer>,
    /// The audit log's sender; its writer thread lives as long as the process.
    pub audit: Arc<Audit>,
    pub runtime: ArcSwap<Runtime>,
    /// The settings as the process started with them, which a reload cannot change.
    pub at_start: AtStart,
    /// The SNI resolver of each TLS listener, by address, so reload can swap certificates.
    pub resolvers: HashMap<SocketAddr, Arc<SniResolver>>,
    /// Open websockets and event streams, cut when their caller loses access.
    pub streams: Arc<Streams>,
    /// What directory users' requests tell the upstream, kept while the directory holds still.
    forwards: Forwards,
    /// Counts the configurations installed after the first; wakes whoever re-judges open
    /// connections.
    reloads: Watched,
    draining: AtomicBool,
}

impl Shared {
    pub fn new(
        config_path: PathBuf,
        directory: Arc<Directory>,
        freshness: Option<Arc<Freshness>>,
        auth: Arc<Auth>,
        signer: Arc<Signer>,
        audit: Arc<Audit>,
        runtime: Runtime,
    ) -> Self {
        let resolvers = runtime
            .config
            .listeners
            .iter()
            .filter_map(|listener| {
                let certs = CertSet::new(listener.tls.as_ref()?);
                Some((listener.address, Arc::new(SniResolver::new(certs))))
            })
            .collect();
        auth.sessions.issued_in(runtime.session_cookie());
        auth.sessions.configured(runtime.config.oidc.as_ref());
        Self {
            config_path,
            directory,
            freshness,
            auth,
            signer,
            audit,
            at_start: AtStart::of(&runtime.config),
            runtime: ArcSwap::from_pointee(runtime),
            resolvers,
            streams: Arc::default(),
            forwards: Forwards::default(),
            reloads: Watched::default(),
            draining: AtomicBool::new(false),
        }
    }

    /// Installs a new configuration: new requests use it, open connections are judged again
    /// under it, and bearer tokens are verified afresh (issuers' rules may have changed).
    pub fn install(&self, mut runtime: Runtime) {
        runtime.tokens_epoch = self.auth.verified.config_changed();
        self.auth.keep_key_sets_of(&runtime.config);
        self.auth.sessions.issued_in(runtime.session_cookie());
        let before = self.runtime.load().config.oidc.clone();
        let after = runtime.config.oidc.clone();
        // Sign-in moved to another provider (off a compromised one, say), or off any, or its
        // sessions' lifetime or idle timeout changed: the sessions either configuration would
        // refuse end, so that a reload back does not bring them back (those begun while the
        // provider was compromised, those it logged out meanwhile, which it could not tell
        // Portcullis of; those a lifetime shortened after an incident had cut off). Taken out
        // before the new configuration is in use: under a longer idle timeout, a request
        // would find one that idled out before alive, and keep it so.
        self.auth.sessions.configured(after.as_ref());
        if let Some(before) = before.filter(|before| Some(before) != after.as_ref()) {
            self.end_sessions_not_held(before, after);
        }
        self.runtime.store(Arc::new(runtime));
        self.reloads.bump();
    }

    /// Ends the sessions sign-in as configured `before` a reload or `after` it would refuse
    /// (see [`crate::auth::sessions::Sessions::not_held`]): out of memory at once, the end
    /// written in the background. Until the store takes the write, it is tried again (after a
    /// second, doubling up to a minute): with a shared store nothing else ends them, and a
    /// reload back would find them held again.
    fn end_sessions_not_held(&self, before: OidcConfig, after: Option<OidcConfig>) {
        let sessions = &self.auth.sessions;
        let now = now_unix();
        let keys = sessions.not_held(now, &before, after.as_ref());
        if keys.is_empty() {
            return;
        }
        // Whose sessions a reload ended, and why, is audited as their other ends are.
        let people = sessions.ended_by_reload(&keys, now, &before, after.as_ref());
        let audit = self.audit.clone();
        let taken = sessions.take(&keys);
        let ended = keys.len();
        let what = "the sessions the sign-in configuration no longer holds".to_owned();
        sessions.write_end_until_it_holds(keys, taken, what, move || {
            tracing::info!(
                ended,
                "sessions the sign-in configuration no longer holds ended"
            );
            for (who, why) in &people {
                audit.session(who, "config_ended", why, None);
            }
        });
    }

    /// How many configurations were installed after the first. Read before the runtime a
    /// decision uses, it is never ahead of that runtime (installs store, then count).
    pub fn reloads(&self) -> u64 {
        self.reloads.get()
    }

    /// Wakes whenever a configuration is installed.
    pub fn subscribe_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Whether the directory is known to be current: with the embedded store, unless its file
    /// holds changes this process refused (a write whose last step failed), which only a
    /// restart reads, while the IdP's writes are refused; with a shared one, while this
    /// replica's lease on its change feed holds.
    pub fn directory_is_current(&self) -> bool {
        self.freshness.as_ref().is_none_or(|f| f.is_current()) && self.directory.wedged().is_none()
    }

    /// Whether the directory is not current for good: its file holds changes a failed write
    /// left unread, which only a restart reads (see [`Shared::directory_is_current`]).
    pub fn needs_restart(&self) -> bool {
        self.directory.wedged().is_some()
    }

    /// Why callers who need the directory are refused, while it is not current.
    pub fn not_current(&self) -> Option<&'static str> {
        (!self.directory_is_current()).then(|| self.out_of_touch())
    }

    /// Why callers who need the directory are refused while it is not current.
    pub fn out_of_touch(&self) -> &'static str {
        match self.needs_restart() {
            true => crate::proxy::NEEDS_RESTART,
            false => crate::proxy::LOST_TOUCH,
        }
    }

    /// The key this process still lacks, made once at start (see `services::Keeper`), if any.
    pub fn missing_key(&self) -> Option<&'static str> {
        if !self.auth.sessions.can_seal() {
            return Some("no sign-in sealing key yet");
        }
        if !self.signer.can_sign() {
            return Some("no assertion signing key yet");
        }
        None
    }

    /// Where the directory, the sessions and the configuration stand: read before deciding.
    pub fn marks(&self) -> Marks {
        Marks {
            directory: self.directory.standing_seq(),
            session_ends: self.auth.sessions.ends(),
            config: self.reloads.get(),
            second: now_unix(),
            current: self.directory_is_current(),
        }
    }

    /// [`Shared::marks`] of a decision under the runtime loaded just after the reload count
    /// `reloads` was read: a reload installed since is one the decision did not see, and what
    /// it let through is judged again under it.
    pub fn marks_as_of(&self, reloads: u64) -> Marks {
        Marks {
            config: reloads,
            ..self.marks()
        }
    }

    /// The gate over the live directory and `runtime`'s `[identity]`, deciding as of `marks`
    /// (read just before, with whether the directory is current: the lease is read once per
    /// decision).
    pub fn gate<'a>(&'a self, runtime: &'a Runtime, marks: &Marks) -> Gate<'a> {
        Gate {
            directory: &self.directory,
            identity: &runtime.config.identity,
            jwt_issuers: &runtime.config.jwt_issuers,
            current: marks.current,
            now: marks.second,
            forwards: Some(&self.forwards),
        }
    }

    /// Whether an open connection may carry on: judged again by the gate, under the current
    /// configuration, when anything changed since its last decision. The first refusal is
    /// audited. Used for every chunk and frame and by the sweep of idle connections alike.
    pub fn still_allowed(&self, open: &Recheck) -> bool {
        let marks = self.marks();
        // One configuration and one "now" for the decision and the record of it.
        let runtime = self.runtime.load();
        let now = crate::clock::now_unix();
        let oidc = runtime.config.oidc.as_ref();
        open.still_allowed(
            marks,
            |session| oidc.is_some_and(|oidc| self.auth.sessions.vouches(session, now, oidc)),
            |open| self.rejudge(open, &marks, &runtime, now),
            |open, refused| self.audit_cut(open, &refused, &runtime, now),
        )
    }

    fn rejudge(&self, open: &Recheck, marks: &Marks, runtime: &Runtime, now: u64) -> Admission {
        // A session that has ended, or idled or lived past its time, or whose provider is no
        // longer the configured one, no longer vouches; nor does a token whose issuer is no
        // longer configured to take it.
        let oidc = runtime.config.oidc.as_ref();
        let gate = self.gate(runtime, marks);
        // Its listener, as this configuration has it: a request over plain HTTP is taken for
        // https only from a TLS proxy in front, and a credential only where one may cross.
        let target = &open.target;
        let https = runtime.over_https(target.local, target.own_tls);
        let listener_refuses = if target.scheme == Scheme::Https && !https {
            Some("its listener no longer takes https requests from a TLS proxy in front")
        } else if open.caller.is_some() && !runtime.carries_credentials(target.local, https) {
            Some("its listener no longer takes credentials over plain HTTP")
        } else {
            None
        };
        let vouched = |caller: &Caller| match caller {
            Caller::Person { session, .. } => {
                oidc.is_some_and(|oidc| self.auth.sessions.vouches(session, now, oidc))
            }
            Caller::Machine(machine) => {
                crate::auth::no_longer_takes(&runtime.config, machine).is_none()
            }
        };
        crate::streams::rejudge(&gate, &runtime.routes, open, now, vouched, listener_refuses)
    }

    /// The client holding `caller`'s token, a person's, that its issuer takes none of theirs
    /// from and that is no agent (see [`Gate::unlisted_holder`]).
    fn unlisted_client<'c>(&self, runtime: &Runtime, caller: &'c Caller) -> Option<&'c str> {
        let Caller::Machine(machine) = caller else {
            return None;
        };
        self.gate(runtime, &self.marks()).unlisted_holder(machine)
    }

    /// Records why an open connection (or a request let in) was refused, and keeps what the
    /// request is told if its answer has not begun (see [`Recheck::note_refusal`]).
    fn audit_cut(&self, open: &Recheck, refused: &Admission, runtime: &Runtime, now: u64) {
        let who = open.who();
        let outdated: String;
        let (who, rule, reason) = match (refused, &open.caller) {
            (Admission::Refuse(Refused::Forbid(refusal)), _) => (
                refusal.who.clone().unwrap_or(who),
                refusal.rule.as_deref(),
                refusal.reason.as_str(),
            ),
            // Left the fleet at the drain's end (see `reload::write_out`): the lease was given
            // up, not lost.
            (Admission::Refuse(Refused::Unavailable), _)
                if self.freshness.as_ref().is_some_and(|f| f.is_leaving()) =>
            {
                (who, None, "this replica is shutting down")
            }
            (Admission::Refuse(Refused::Unavailable), _) => (who, None, self.out_of_touch()),
            // Let in by a public rule, which no longer lets anyone in there.
            (_, None) => (who, None, "the address is no longer open to anyone"),
            (Admission::Refuse(r), Some(caller)) if r.revoked() => match caller {
                Caller::Person { .. }
                    if matches!(r.outdated(), Some(crate::gate::Outdated::Unlisted)) =>
                {
                    // Said as a request's refusal says it.
                    outdated = crate::gate::Outdated::Unlisted.session_reason(&who);
                    (who, None, outdated.as_str())
                }
                Caller::Person { .. } => (
                    who,
                    None,
                    "the user was deactivated, re-created or given a new identifier since \
                     signing in",
                ),
                Caller::Machine(_) => {
                    let (who, reason) = crate::audit::outdated_token(&who, r.outdated());
                    outdated = reason;
                    (who, None, outdated.as_str())
                }
            },
            (
                Admission::Refuse(Refused::Challenge {
                    invalid_token: true,
                    ..
                }),
                Some(caller),
            ) => (
                who,
                None,
                // In the order the connection is judged again (see `rejudge`).
                match caller {
                    Caller::Machine(m)
                        if now >= crate::auth::expires_under(&runtime.config.jwt_issuers, m) =>
                    {
                        "the bearer token has expired"
                    }
                    Caller::Machine(m) => match crate::auth::no_longer_takes(&runtime.config, m) {
                        Some(why) => why,
                        None => match self.unlisted_client(runtime, caller) {
                            Some(client) => {
                                outdated = crate::gate::unlisted_client_reason(client);
                                outdated.as_str()
                            }
                            None => "the bearer token is no longer for this route's audiences",
                        },
                    },
                    Caller::Person { .. } => "the session has ended or expired",
                },
            ),
            // A token that no longer verifies is an invalid token (above): a machine is here
            // only because the route no longer takes bearer tokens.
            (_, Some(Caller::Machine(_))) => (who, None, "the route no longer takes bearer tokens"),
            _ => (
                who,
                None,
                "the session has ended or expired, or the route no longer takes sessions",
            ),
        };
        let recorded = match refused {
            Admission::Refuse(Refused::Forbid(refusal)) => refusal.agent.clone(),
            Admission::Refuse(refused) => refused.outdated_agent().cloned(),
            Admission::Allow(_) => None,
        };
        // Else (but for a refusal of the gate's or `rejudge`'s, which names whom it refused
        // and its agent as it should) an agent's connection is recorded with the agent (and as
        // the agent's, when it acted for itself), as its requests were: as its upstream was
        // told when it opened, or, let in as no one, as the agent acting with its token, no
        // longer taken.
        let (who, agent) = match (recorded, &open.told, refused, &open.caller) {
            (Some(agent), ..) => (who, Some(agent)),
            (_, _, Admission::Refuse(Refused::Forbid(_)), _) => (who, None),
            // (`rejudge`'s own name the agent, also for a caller no longer signed in.)
            // (Named already: see `Recheck::who`.)
            (
                None,
                Some(crate::gate::Forward {
                    agent: Some(agent), ..
                }),
                ..,
            ) => (who, Some(agent.clone())),
            (
                None,
                _,
                Admission::Refuse(Refused::Challenge {
                    invalid_token: true,
                    revoked: None,
                }),
                Some(Caller::Machine(machine)),
            ) => match self.gate(runtime, &self.marks()).token_refused_as(machine) {
                (who, Some(agent)) => (who, Some(agent)),
                (_, None) => (who, None),
            },
            (None, ..) => (who, None),
        };
        self.audit.refusal(
            &who,
            &open.target.route,
            rule,
            &format!("open connection closed: {reason}"),
            &crate::audit::Request {
                method: &open.target.method,
                path: &open.target.path,
                client: open.target.client_ip,
            },
            agent.as_ref(),
        );
        // A request whose answer has not begun is told as one refused at once would be: a
        // rule's refusal names whom it refused; a caller no longer signed in (a session ended,
        // a token expired) is nobody now. (One cut because the replica lost touch is told
        // that: see `Recheck::lost_touch`.)
        if !matches!(refused, Admission::Refuse(Refused::Unavailable)) {
            let who = match refused {
                Admission::Refuse(Refused::Forbid(refusal)) => refusal.who.clone(),
                _ => None,
            };
            let reason = reason.to_owned();
            open.note_refusal(crate::streams::RefusalNote { who, reason });
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// Requests currently being served, across all listeners.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts a request as in flight for as long as it lives, so shutdown can wait for it.
pub struct InFlight(());

impl InFlight {
    pub fn begin() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        Self(())
    }

    pub fn count() -> usize {
        IN_FLIGHT.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many requests of one HTTP/2 connection are served at once, at most: twice as many as
/// it may have streams open (set at start, as that is: [`set_h2_streams`]). A client that
/// resets each stream it opened (CVE-2023-44487, "rapid reset") frees its place among the open
/// ones at once, while its request goes on here (routed, judged, sent upstream): without this
/// bound, one connection could have any number under way, each holding its head.
static MAX_H2_UNDER_WAY: AtomicUsize = AtomicUsize::new(200);

/// HTTP/2 clients may have `streams` open at once: each connection may have twice as many
/// requests under way ([`h2_under_way_bound`]).
pub fn set_h2_streams(streams: u32) {
    let bound = usize::try_from(streams)
        .unwrap_or(usize::MAX)
        .saturating_mul(2);
    MAX_H2_UNDER_WAY.store(bound, Ordering::Relaxed);
}

/// How many requests of one HTTP/2 connection may be under way at once: 16 times as many on
/// one from a proxy the listener trusts, which brings many clients' requests on it and resets
/// those its own timeouts give up on (still bounded: it may pass its clients' resets on).
pub fn h2_under_way_bound(from_trusted_proxy: bool) -> usize {
    let bound = MAX_H2_UNDER_WAY.load(Ordering::Relaxed);
    match from_trusted_proxy {
        true => bound.saturating_mul(16),
        false => bound,
    }
}

/// The requests under way on each HTTP/2 connection, by the address of its digest (which its
/// streams share, and which lives as long as one of them does).
static H2_UNDER_WAY: std::sync::LazyLock<dashmap::DashMap<usize, usize>> =
    std::sync::LazyLock::new(dashmap::DashMap::new);

/// A request counted among its HTTP/2 connection's under way for as long as it lives.
pub struct H2UnderWay(usize);

impl H2UnderWay {
    /// Counts a request of the connection whose streams share `digest`; with how many of its
    /// are under way now, this one too.
    pub fn begin(digest: &pingora::protocols::Digest) -> (H2UnderWay, usize) {
        let connection = std::ptr::from_ref(digest).addr();
        let mut count = H2_UNDER_WAY.entry(connection).or_insert(0);
        *count += 1;
        let now = *count;
        drop(count);
        (H2UnderWay(connection), now)
    }
}

impl Drop for H2UnderWay {
    fn drop(&mut self) {
        H2_UNDER_WAY.remove_if_mut(&self.0, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_request_is_sent_to_the_tls_listener_most_clients_reach() {
        let port = |addresses: &[&str]| {
            https_port(
                addresses
                    .iter()
                    .map(|a| a.parse::<std::net::SocketAddr>().unwrap()),
            )
        };
        assert_eq!(port(&[]), None);
        assert_eq!(port(&["127.0.0.1:9443", "0.0.0.0:443"]), Some(443));
        assert_eq!(port(&["127.0.0.1:9443", "0.0.0.0:8443"]), Some(8443));
        assert_eq!(port(&["127.0.0.1:443", "10.0.0.5:8443"]), Some(8443));
        assert_eq!(port(&["[::]:8443", "0.0.0.0:443"]), Some(443));
        assert_eq!(
            port(&["0.0.0.0:8443", "0.0.0.0:9443"]),
            Some(8443),
            "the first"
        );
        assert_eq!(port(&["127.0.0.1:9443"]), Some(9443));
    }

    /// A reload that raises the idle timeout brings back no session that idled out before it,
    /// not even for a request made before the end is written: such a session is out of memory
    /// before the new configuration is in use (a request under it would otherwise find the
    /// session alive, and keep it so).
    #[tokio::test]
    async fn a_reload_that_raises_the_idle_timeout_revives_no_session_at_any_moment() {
        let dir = tempfile::tempdir().unwrap();
        let now = now_unix();
        let with_idle = |seconds| {
            let mut config = crate::testing::config("");
            let oidc = config.oidc.as_mut().unwrap();
            oidc.session_idle_timeout = std::time::Duration::from_secs(seconds);
            config
        };
        let path = dir.path().join("portcullis.toml");
        let shared = crate::testing::shared(dir.path(), path, with_idle(60));
        let directory = shared.directory.clone();
        let sessions = &shared.auth.sessions;
        let oidc = with_idle(60).oidc.unwrap();
        let identity = crate::caller::Identity {
            issuer: oidc.issuer.clone(),
            subject: "alice".to_owned(),
            email: Some("alice@corp.example".to_owned()),
            email_verified: None,
            name: None,
            idp_session: None,
            created: now - 120,
            expires: now + 3_600,
            id_token: None,
            directory_seq: 0,
            groups: Vec::new(),
            groups_unlisted: Some(false),
            claims: Default::default(),
        };
        let cookie = oidc.cookie_name.as_str();
        let id = sessions.create(identity, None, cookie, now - 120).await;
        let (key, _) = sessions.get(&id.unwrap()).expect("held");
        assert!(!sessions.vouches(&key, now, &oidc), "idled out");

        let raised = with_idle(3_600);
        shared.install(Runtime::build(raised.clone(), &directory));
        // Nothing awaited since: the end is not written yet.
        let raised = raised.oidc.unwrap();
        assert!(
            !sessions.vouches(&key, now, &raised),
            "a session that idled out before the reload is alive under it"
        );
    }

    /// A plain-HTTP listener at `address`, with nothing else set.
    fn plain(address: &str) -> portcullis_config::Listener {
        portcullis_config::Listener {
            address: address.parse().unwrap(),
            tls: None,
            allow_plain_http: false,
            behind_tls_proxy: false,
            trusted_proxies: Vec::new(),
        }
    }

    #[test]
    fn a_request_is_on_the_listener_of_its_address_or_of_a_wildcard_of_its_family() {
        let world = crate::testing::World::new();
        let mut config = world.config.clone();
        let listener = |address: &str, behind_tls_proxy| portcullis_config::Listener {
            behind_tls_proxy,
            ..plain(address)
        };
        config.listeners = vec![
            listener("0.0.0.0:8080", true),
            listener("[2001:db8::5]:8080", false),
            listener("[::]:9090", true),
        ];
        let runtime = Runtime::build(config, &world.directory);
        let at = |address: &str| Some(address.parse::<SocketAddr>().unwrap());
        let behind = |address| runtime.behind_tls_proxy(at(address));
        assert!(behind("10.0.0.1:8080"));
        assert!(
            behind("[::ffff:10.0.0.1]:8080"),
            "an IPv4 client on a dual-stack socket"
        );
        // The IPv4 wildcard takes no IPv6 address: a client reaching the other listener
        // directly is not taken to be on https, nor let through to sign in.
        assert!(!behind("[2001:db8::5]:8080"));
        assert!(!runtime.carries_credentials(at("[2001:db8::5]:8080"), false));
        assert!(!behind("[2001:db8::6]:8080"));
        assert!(behind("10.0.0.1:9090") && behind("[2001:db8::6]:9090"));
        assert!(!behind("10.0.0.1:7070"));
    }

    #[test]
    fn a_client_is_the_address_a_trusted_proxy_names_and_no_one_else_s_word_counts() {
        let world = crate::testing::World::new();
        let mut config = world.config.clone();
        let listener = |address: &str, trusted: &[&str]| portcullis_config::Listener {
            trusted_proxies: trusted.iter().map(|net| net.parse().unwrap()).collect(),
            ..plain(address)
        };
        let mut tls = listener("10.0.0.2:8443", &["192.0.2.1/32"]);
        tls.tls = Some(portcullis_config::ListenerTls {
            certificates: Vec::new(),
        });
        config.listeners = vec![
            listener("0.0.0.0:8080", &["10.0.0.0/8", "192.0.2.1/32"]),
            listener("0.0.0.0:9090", &[]),
            listener("10.0.0.1:8443", &[]),
            tls,
        ];
        let runtime = Runtime::build(config, &world.directory);
        let on = |own_tls: bool, peer: &str, local: &str, forwarded: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in forwarded {
                headers.append("x-forwarded-for", value.parse().unwrap());
            }
            let local = Some(local.parse::<SocketAddr>().unwrap());
            runtime
                .client_ip(Some(peer.parse().unwrap()), local, own_tls, &headers)
                .map(|ip| ip.to_string())
                .unwrap()
        };
        let client =
            |peer: &str, local: &str, forwarded: &[&str]| on(false, peer, local, forwarded);
        // A load balancer that appends the address it was reached from.
        assert_eq!(
            client("10.0.0.9", "10.0.0.1:8080", &["203.0.113.5"]),
            "203.0.113.5"
        );
        // What the client wrote itself comes before: not believed.
        assert_eq!(
            client("10.0.0.9", "10.0.0.1:8080", &["198.51.100.1, 203.0.113.5"]),
            "203.0.113.5"
        );
        // Two proxies in a row (a CDN's 192.0.2.1, then the load balancer), in one header
        // or two, with a port as Azure's gateway writes it.
        assert_eq!(
            client(
                "10.0.0.9",
                "10.0.0.1:8080",
                &["198.51.100.1, 203.0.113.5:6001", "192.0.2.1"]
            ),
            "203.0.113.5"
        );
        // Several headers are one list, in their order: the last header's last entry is the
        // one the nearest proxy appended.
        assert_eq!(
            client(
                "10.0.0.9",
                "10.0.0.1:8080",
                &["198.51.100.1", "203.0.113.5"]
            ),
            "203.0.113.5"
        );
        assert_eq!(
            client("10.0.0.9", "10.0.0.1:8080", &["[2001:db8::8]"]),
            "2001:db8::8"
        );
        // A TLS listener on a port a plain one also has (on another address) is its own: it
        // trusts its own proxies only, and the plain one trusts none.
        assert_eq!(
            on(true, "192.0.2.1", "10.0.0.2:8443", &["203.0.113.5"]),
            "203.0.113.5"
        );
        assert_eq!(
            on(true, "10.0.0.9", "10.0.0.2:8443", &["203.0.113.5"]),
            "10.0.0.9"
        );
        assert_eq!(
            on(false, "192.0.2.1", "10.0.0.1:8443", &["203.0.113.5"]),
            "192.0.2.1"
        );
        // Not from a trusted proxy, or on a listener that trusts none: the connection's.
        assert_eq!(
            client("203.0.113.9", "10.0.0.1:8080", &["198.51.100.1"]),
            "203.0.113.9"
        );
        assert_eq!(
            client("10.0.0.9", "10.0.0.1:9090", &["198.51.100.1"]),
            "10.0.0.9"
        );
        assert_eq!(
            client("::ffff:10.0.0.9", "10.0.0.1:8080", &["[2001:db8::7]:443"]),
            "2001:db8::7"
        );
        // Nothing named, or something that is not an address: the last proxy is what is known.
        assert_eq!(client("10.0.0.9", "10.0.0.1:8080", &[]), "10.0.0.9");
        assert_eq!(
            client("10.0.0.9", "10.0.0.1:8080", &["unknown"]),
            "10.0.0.9"
        );
        assert_eq!(
            client(
                "10.0.0.9",
                "10.0.0.1:8080",
                &["203.0.113.5, _hidden, 10.0.0.3"]
            ),
            "10.0.0.3"
        );
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if hard == RLIM_INFINITY || hard < 2 {
            return;
        }
        // One below the hard limit: nothing else in the test process misses that one.
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).unwrap();
        assert_eq!(super::raise_open_files_limit(), Ok((hard - 1, hard)));
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        assert_eq!(super::raise_open_files_limit(), Ok((hard, hard)));
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does at start:
/// every connection holds a descriptor at each end (a websocket or event stream a third, see
/// `streams.rs`), and systemd's soft limit of 1024 would refuse the 500th or so connection.
/// Returns the limits before and after, or why they could not be raised (kept as they were).
pub fn raise_open_files_limit() -> Result<(u64, u64), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("cannot read the limit on open files: {e}"))?;
    // Linux takes no more than `fs.nr_open` (2^20 unless raised), and never "unlimited".
    let to = if hard == RLIM_INFINITY { 1 << 20 } else { hard };
    if soft >= to {
        return Ok((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, to, hard)
        .map_err(|e| format!("cannot raise the limit on open files from {soft} to {to}: {e}"))?;
    Ok((soft, to))
}

/// Makes `data_dir` if it is not there, open to this user alone: it holds the directory (names,
/// emails, password hashes an IdP pushed), the keys that seal sign-ins in progress, the
/// assertion signing keys and the audit log.
/// One already there keeps its mode (the operator's choice), with a warning when other users
/// can read it.
pub fn make_data_dir(data_dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", data_dir.display()))?;
    let mode = std::fs::metadata(data_dir)
        .map_err(|e| format!("cannot read data_dir {}: {e}", data_dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "data_dir {} is open to other users (mode {:o}): it holds the directory, the keys \
             that seal sign-ins in progress and the assertion signing keys; `chmod 700` it",
            data_dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

#[cfg(test)]
mod data_dir_tests {
    use super::*;

    #[test]
    fn a_data_dir_made_here_is_open_to_this_user_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let made = tmp.path().join("var/lib/portcullis");
        make_data_dir(&made).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // One already there is left as it is.
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o750)).unwrap();
        make_data_dir(&made).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
    }
}
