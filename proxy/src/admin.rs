//! The admin listener: `/healthz`, `/readyz`, `/metrics` and `/explain` (for
//! `portcullis explain`), apart from proxied traffic.
//!
//! The probes (`/healthz`, `/readyz`) answer anyone. `/metrics` and `/explain` tell about the
//! directory and the traffic, so they answer only:
//! - with `[admin] token`, a request presenting it as a bearer token (compared by SHA-256, in
//!   constant time); a request refused for want of it is audited (route `admin`);
//! - without one, on a loopback address only, and only to a request whose `Host` is a loopback
//!   name (`localhost`, `127.0.0.1`, `[::1]`), so a web page a browser on the machine loads
//!   cannot reach them by pointing a DNS name of its own at 127.0.0.1 (DNS rebinding).
//!
//! `/readyz` says ready only once this process listens on every proxy listener's port. pingora
//! reports its proxy service ready before it binds the listeners (and retries for 30 seconds
//! while another process holds a port; past a minute the process stops: see
//! `services::ListenerWatch`), so a probe that trusted that would send traffic to a port
//! nobody serves, or someone else does. Until then the answer is 503, naming the listener.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use portcullis_config::AdminConfig;

use crate::explain::Who;
use crate::state::Shared;

/// The route a refused `/metrics` or `/explain` request is audited under.
const AUDIT_ROUTE: &str = "admin";

pub struct Admin {
    shared: Arc<Shared>,
    /// As the configuration had it at start: its address needs a restart to change. Its token
    /// is read from the configuration in force, so a reload that rotates it takes effect.
    config: Option<AdminConfig>,
    /// The proxy's listener addresses, as bound at start (changing them needs a restart).
    listeners: Vec<SocketAddr>,
    /// Set once every listener has accepted a connection.
    listening: AtomicBool,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        let runtime = shared.runtime.load();
        let listeners = runtime.config.listeners.iter().map(|l| l.address).collect();
        let config = runtime.config.admin.clone();
        drop(runtime);
        Self {
            shared,
            config,
            listeners,
            listening: AtomicBool::new(false),
        }
    }

    /// Whether a request for `/metrics` or `/explain` may be answered; the refusal otherwise.
    /// A refusal is audited with the address it came from, `client`.
    fn guard(
        &self,
        req: &http::request::Parts,
        client: Option<std::net::IpAddr>,
    ) -> Result<(), (StatusCode, &'static str, Vec<u8>)> {
        let runtime = self.shared.runtime.load();
        let refuse = |why: &str| {
            let request = crate::audit::Request {
                method: req.method.as_str(),
                path: req.uri.path(),
                client,
            };
            self.shared
                .audit
                .unverified_refusal(AUDIT_ROUTE, why, &request);
        };
        let Some(admin) = &runtime.config.admin else {
            // `[admin]` removed by a reload: the listener stays open until a restart, and
            // answers none of this, rather than all of it to loopback without a token.
            refuse("the [admin] section was removed: the admin listener closes at a restart");
            return Err((
                StatusCode::FORBIDDEN,
                "text/plain",
                b"[admin] was removed from the configuration: restart to close this listener\n"
                    .to_vec(),
            ));
        };
        match &admin.token {
            Some(token) => {
                let presented = req
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| crate::auth::own_bearer(v.as_bytes()))
                    .map(|presented| is_token(token, presented));
                let why = match presented {
                    Some(true) => return Ok(()),
                    Some(false) => "the bearer token is not the [admin] token",
                    None => "no [admin] bearer token was presented",
                };
                refuse(why);
                Err((
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    b"the [admin] token is required\n".to_vec(),
                ))
            }
            None => {
                let on_loopback = self
                    .config
                    .as_ref()
                    .is_some_and(|c| c.address.ip().is_loopback());
                if !on_loopback {
                    refuse("no [admin] token is set, and the admin listener is not on loopback");
                    return Err((
                        StatusCode::FORBIDDEN,
                        "text/plain",
                        b"set [admin] token to reach /metrics and /explain on an address other than loopback\n"
                            .to_vec(),
                    ));
                }
                let host = req
                    .headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !is_loopback_name(host) {
                    // A page in a browser on this machine, through a name pointed at 127.0.0.1.
                    refuse("no [admin] token is set, and the Host is not a loopback name");
                    return Err((
                        StatusCode::FORBIDDEN,
                        "text/plain",
                        b"not a loopback Host: without [admin] token, /metrics and /explain answer only to localhost\n"
                            .to_vec(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Alive, unless only a restart can bring it back (see [`Admin::readiness`]).
    fn liveness(&self) -> (StatusCode, &'static str, Vec<u8>) {
        match self.shared.directory.wedged() {
            None => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            Some(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"needs a restart: the directory file holds changes this process cannot read\n"
                    .to_vec(),
            ),
        }
    }

    async fn readiness(&self) -> (StatusCode, &'static str, Vec<u8>) {
        if self.shared.is_draining() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"draining\n".to_vec(),
            );
        }
        if !self.listening.load(Ordering::Acquire) {
            if let Some(missing) = not_listening(self.listeners.iter().copied()) {
                let text = format!("starting: not listening on {missing} yet\n");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    text.into_bytes(),
                );
            }
            self.listening.store(true, Ordering::Release);
        }
        if let Some(freshness) = self.shared.freshness.as_ref().filter(|f| !f.is_current()) {
            let text = format!("not ready: {}\n", freshness.problem());
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                text.into_bytes(),
            );
        }
        if let Some(seq) = self.shared.directory.wedged() {
            let text = format!(
                "not ready: the directory file may hold changes from {seq} on that a failed \
                 write left unread; restart to read them\n"
            );
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                text.into_bytes(),
            );
        }
        if let Some(missing) = self.shared.missing_key() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("starting: {missing}\n").into_bytes(),
            );
        }
        (StatusCode::OK, "text/plain", b"ready\n".to_vec())
    }

    /// `?user=…&url=…[&method=…]`, or `?agent=…[&on_behalf_of=…]&url=…[&method=…]`: the
    /// [`Explanation`](crate::explain::Explanation) as JSON.
    fn explain(&self, query: &str) -> (StatusCode, &'static str, Vec<u8>) {
        let (mut user, mut agent, mut machine, mut on_behalf_of, mut url, mut method) =
            (None, None, None, None, None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "user" => user = Some(value),
                "agent" => agent = Some(value),
                "machine" => machine = Some(value),
                "on_behalf_of" => on_behalf_of = Some(value),
                "url" => url = Some(value),
                "method" => method = Some(value),
                _ => {}
            }
        }
        let who = match (&user, &agent, &machine) {
            (Some(user), None, None) => Some(Who::Person(user)),
            (None, Some(agent), None) => Some(Who::Agent {
                name: agent,
                on_behalf_of: on_behalf_of.as_deref(),
            }),
            (None, None, Some(machine)) => Some(Who::Machine(machine)),
            _ => None,
        };
        let (Some(who), Some(url)) = (who, url) else {
            return (
                StatusCode::BAD_REQUEST,
                "text/plain",
                b"url and one of user, agent or machine are required\n".to_vec(),
            );
        };
        let runtime = self.shared.runtime.load();
        let explained = crate::explain::explain(
            &runtime,
            &self.shared.directory,
            self.shared.not_current(),
            who,
            &url,
            method.as_deref().unwrap_or("GET"),
        );
        match explained.and_then(|e| serde_json::to_vec(&e).map_err(|e| e.to_string())) {
            Ok(json) => (StatusCode::OK, "application/json", json),
            Err(problem) => (
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{problem}\n").into_bytes(),
            ),
        }
    }
}

/// Whether a `Host` header value names this machine: `localhost` or a loopback address, with
/// or without a port.
fn is_loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The first of `addresses` this process does not listen on.
pub(crate) fn not_listening(mut addresses: impl Iterator<Item = SocketAddr>) -> Option<SocketAddr> {
    let bound = listening_sockets();
    addresses.find(|a| !bound.contains(&(a.ip().to_canonical(), a.port())))
}

/// The addresses of the TCP sockets this process listens on, from `/proc/self/net/tcp{,6}`:
/// a socket in the LISTEN state (`0A`) whose inode is one of this process's descriptors. By
/// address and port: two listeners may share a port on two addresses, and one bound is not
/// the other.
fn listening_sockets() -> HashSet<(IpAddr, u16)> {
    let own: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|entry| {
                let target = std::fs::read_link(entry.ok()?.path()).ok()?;
                let inode = target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?;
                Some(inode.to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    let mut sockets = HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        sockets.extend(
            text.lines()
                .skip(1)
                .filter_map(|line| listening_socket(line, &own)),
        );
    }
    sockets
}

/// The local address of one `/proc/net/tcp{,6}` line, if it is a listening socket of ours:
/// the address is the kernel's 32-bit words in hex, each in this machine's byte order (an
/// IPv4-mapped IPv6 address is given as IPv4).
fn listening_socket(line: &str, own: &HashSet<String>) -> Option<(IpAddr, u16)> {
    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    if *state != "0A" || !own.contains(*inode) {
        return None;
    }
    let (address, port) = local.split_once(':')?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..address.len() / 8 {
        let word = u32::from_str_radix(address.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend(word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((ip.to_canonical(), u16::from_str_radix(port, 16).ok()?))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // As the proxy's listeners take it: an IPv4 caller of a `[::]` listener as IPv4.
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical());
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/healthz" => self.liveness(),
            "/readyz" => self.readiness().await,
            "/metrics" | "/explain" => match self.guard(session.req_header(), client) {
                Err(refusal) => refusal,
                Ok(()) if session.req_header().uri.path() == "/metrics" => (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    crate::metrics::render(),
                ),
                Ok(()) => self.explain(session.req_header().uri.query().unwrap_or_default()),
            },
            _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            header::HeaderValue::from_static("nosniff"),
        );
        // A 401 says how to authenticate (RFC 9110 §11.6.1).
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
            );
        }
        let len = response.body().len();
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
        response
    }
}

/// Whether `presented` is the `[admin]` token, compared in constant time.
pub fn is_token(token: &portcullis_config::AdminToken, presented: &[u8]) -> bool {
    let digest = Sha256::digest(presented);
    bool::from(digest.as_slice().ct_eq(&token.sha256))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_are_loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST:9090",
            "127.0.0.1",
            "127.0.0.1:9090",
            "[::1]:9090",
            "127.8.9.10",
        ] {
            assert!(is_loopback_name(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:9090",
            "10.0.0.1",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_name(host), "{host}");
        }
    }

    /// A store that holds changes from `at` on that this process refused, once `at` is set.
    #[derive(Default)]
    struct Wedging {
        inner: portcullis_scim::store::memory::MemoryStorage,
        at: std::sync::atomic::AtomicU64,
    }

    impl portcullis_scim::store::Storage for Wedging {
        fn load(
            &self,
            visit: &mut dyn FnMut(portcullis_scim::store::Loaded<'_>),
        ) -> Result<(u64, portcullis_scim::store::Row), portcullis_scim::store::StoreError>
        {
            self.inner.load(visit)
        }
        fn records(
            &self,
            rt: portcullis_scim::schema::ResourceType,
            rows: &[portcullis_scim::store::Row],
        ) -> Result<
            Vec<(portcullis_scim::store::Row, portcullis_scim::store::Record)>,
            portcullis_scim::store::StoreError,
        > {
            self.inner.records(rt, rows)
        }
        fn commit(
            &self,
            batch: &portcullis_scim::store::Batch,
        ) -> Result<(), portcullis_scim::store::StoreError> {
            self.inner.commit(batch)
        }
        fn changes(
            &self,
            after: u64,
            limit: usize,
        ) -> Result<Vec<portcullis_scim::store::Change>, portcullis_scim::store::StoreError>
        {
            self.inner.changes(after, limit)
        }
        fn wedged(&self) -> Option<u64> {
            Some(self.at.load(Ordering::Relaxed)).filter(|&at| at > 0)
        }
    }

    /// A directory file that holds changes a failed write left unread (only a restart reads
    /// them, while the IdP's writes are refused) leaves the process not ready, not alive, and
    /// not current: identified callers are refused, as a replica out of touch refuses them.
    #[tokio::test]
    async fn a_directory_file_only_a_restart_reads_is_told_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Wedging::default());
        let config = crate::testing::config("");
        let path = dir.path().join("portcullis.toml");
        let shared = crate::testing::shared_on(dir.path(), path, config, storage.clone());
        let shared = Arc::new(shared);
        let admin = Admin::new(shared.clone());
        admin.listening.store(true, Ordering::Release);
        let said = |(_, _, body): (StatusCode, &str, Vec<u8>)| String::from_utf8(body).unwrap();
        assert!(shared.directory_is_current());
        assert_eq!(admin.liveness().0, StatusCode::OK);
        assert!(!said(admin.readiness().await).contains("restart"));

        storage.at.store(7, Ordering::Relaxed);
        assert!(!shared.directory_is_current());
        let (status, _, _) = admin.liveness();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, kind, body) = admin.readiness().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let text = said((status, kind, body));
        assert!(
            text.contains("from 7 on") && text.contains("restart"),
            "{text}"
        );
    }

    #[test]
    fn readiness_sees_the_listeners_of_this_process_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let loopback = IpAddr::from([127, 0, 0, 1]);
        assert!(listening_sockets().contains(&(loopback, port)));
        // The same port on another address is another listener.
        let other = IpAddr::from([127, 0, 0, 2]);
        assert!(!listening_sockets().contains(&(other, port)));
        if let Ok(six) = std::net::TcpListener::bind("[::1]:0") {
            let port = six.local_addr().unwrap().port();
            assert!(
                listening_sockets().contains(&(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), port))
            );
        }
        drop(listener);
        assert!(!listening_sockets().contains(&(loopback, port)));

        // A socket of another process (an inode not among ours) does not count.
        let own: HashSet<String> = ["1234".to_owned()].into();
        // The kernel's words in this machine's byte order.
        let address = u32::from_ne_bytes([127, 0, 0, 1]);
        let line = |state: &str, inode: &str| {
            format!("0: {address:08X}:1F90 00000000:0000 {state} 00000000:00000000 00:00000000 00000000 0 0 {inode} 1")
        };
        assert_eq!(
            listening_socket(&line("0A", "1234"), &own),
            Some((loopback, 8080))
        );
        assert_eq!(listening_socket(&line("0A", "999"), &own), None);
        assert_eq!(
            listening_socket(&line("01", "1234"), &own),
            None,
            "established"
        );
        assert_eq!(listening_socket("garbage", &own), None);
    }
}
