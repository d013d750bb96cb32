//! Upstream selection: round-robin over the healthy upstreams of a route, with passive health.
//!
//! An upstream that refuses a connection (or does not accept it in time) is marked down for a
//! short while and skipped; the request is retried on the next one, so one dead upstream costs
//! no failed requests. Once its time is out, one request tries it again, alone: the others pass
//! it over until that one has connected, so an upstream that drops connections unanswered holds
//! up one request per try, not every one sent its way meanwhile. When every upstream is marked
//! down, a request tries them anyway, one after another while each refuses it (one may have
//! come back); but not after one that let it wait its connect timeout.
//!
//! An upstream given by a DNS name is resolved again every `[server] upstream_dns_refresh`, and
//! as soon as it refuses a connection: when the address in use is no longer among the name's,
//! new connections go to the name's first address (a cloud load balancer's addresses change
//! while its name stays); after a refusal, to the next of the name's addresses. While the name
//! cannot be resolved, the last address is kept.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use http::HeaderValue;
use pingora::protocols::l4::socket::SocketAddr as PeerAddress;
use pingora::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};
use pingora::utils::tls::WrappedX509;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use portcullis_config::{Route, Upstream};

/// How long an upstream that failed to accept a connection is skipped; also the least time
/// between two resolutions of its name asked for by failures.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// Longest a resolution of an upstream's name is waited for.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct UpstreamSet {
    upstreams: Vec<Backend>,
    next: AtomicUsize,
    /// Reference point for the `down_until` timestamps, which are stored as offsets from it.
    epoch: Instant,
    /// How long the one request trying an upstream again has to connect before another may:
    /// the route's `connect_timeout`, and a second.
    probe_ms: u64,
}

struct Backend {
    /// Where requests go: its address follows `name` (see [`UpstreamSet::resolve_again`]).
    peer: ArcSwap<HttpPeer>,
    /// The upstream's DNS name and port; `None` for an IP literal.
    name: Option<(String, u16)>,
    /// `Host` sent to this upstream unless the route preserves the client's.
    host_header: HeaderValue,
    /// Milliseconds since `epoch` until which this upstream is considered down (or is being
    /// tried again by one request); 0 when up.
    down_until_ms: AtomicU64,
    /// Milliseconds since `epoch` when a failure last had `name` resolved again; 0 never.
    resolved_for_failure_ms: AtomicU64,
}

impl UpstreamSet {
    pub fn new(route: &Route) -> Self {
        let upstreams = route
            .upstreams
            .iter()
            .map(|upstream| Backend {
                peer: ArcSwap::from_pointee(build_peer(route, upstream)),
                name: upstream
                    .host
                    .parse::<std::net::IpAddr>()
                    .is_err()
                    .then(|| (upstream.host.clone(), upstream.port)),
                host_header: upstream.host_header.clone(),
                down_until_ms: AtomicU64::new(0),
                resolved_for_failure_ms: AtomicU64::new(0),
            })
            .collect();
        Self {
            upstreams,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            probe_ms: millis_of(route.connect_timeout.saturating_add(Duration::from_secs(1))),
        }
    }

    /// How many upstreams the route has.
    pub fn count(&self) -> usize {
        self.upstreams.len()
    }

    /// Picks the upstream for a request that started at round-robin position `start` and
    /// could not reach those in `tried`: the first healthy one not tried yet, in round-robin
    /// order; when every one left is marked down, the first of those anyway (one may have come
    /// back; whether the request goes on to it is the proxy's call). (Which are healthy
    /// changes as a request's attempts fail, so the choice goes by what was tried, never by an
    /// attempt's number.) Also whether this request is the one to try it again after its time
    /// out: that try goes on a new connection, which says whether it takes them (an answer
    /// over a pooled one, made before it stopped, says nothing of that).
    pub fn pick(&self, start: usize, tried: &[usize], now: Instant) -> (usize, HttpPeer, bool) {
        let n = self.upstreams.len();
        let now_ms = self.millis(now);
        let trying_again = std::cell::Cell::new(false);
        // Up; or down, its time out, and this request the one to try it again.
        let healthy = |i: &usize| {
            let down_until = &self.upstreams[*i].down_until_ms;
            match down_until.load(Ordering::Relaxed) {
                0 => true,
                until if until > now_ms => false,
                until => {
                    let claimed = down_until
                        .compare_exchange(
                            until,
                            now_ms.saturating_add(self.probe_ms),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok();
                    trying_again.set(claimed);
                    claimed
                }
            }
        };
        let mut untried = (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| !tried.contains(i));
        let index = untried
            .clone()
            .find(healthy)
            .or_else(|| untried.next())
            .unwrap_or(start % n.max(1));
        let peer = HttpPeer::clone(&self.upstreams[index].peer.load());
        (index, peer, trying_again.get())
    }

    /// Whether an upstream but `failed` and those in `tried` is up, or due its one try after
    /// its time out: a request that could not reach `failed` goes on only to such a one, not
    /// to wait a connect timeout more on each upstream known to be down.
    pub fn live_besides(&self, failed: usize, tried: &[usize], now: Instant) -> bool {
        let now_ms = self.millis(now);
        (self.upstreams.iter().enumerate()).any(|(i, backend)| {
            i != failed
                && !tried.contains(&i)
                && backend.down_until_ms.load(Ordering::Relaxed) <= now_ms
        })
    }

    /// The `Host` header for upstream `index`, as returned by [`Self::pick`].
    pub fn host_header(&self, index: usize) -> Option<&HeaderValue> {
        self.upstreams.get(index).map(|b| &b.host_header)
    }

    /// The address an upstream named `host` (a DNS name) on `port` (any, if `None`) is
    /// reached at now, if this set has one.
    pub fn address_of(&self, host: &str, port: Option<u16>) -> Option<std::net::IpAddr> {
        self.upstreams
            .iter()
            .find(|b| {
                b.name.as_ref().is_some_and(|(n, p)| {
                    n.eq_ignore_ascii_case(host) && port.is_none_or(|port| port == *p)
                })
            })
            .and_then(|b| Some(b.peer.load()._address.as_inet()?.ip()))
    }

    /// The round-robin starting position for a new request.
    pub fn start(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Upstream `index` failed to accept a connection at `failed_at`: skipped for `DOWN_FOR`,
    /// unless it has moved to another address since (its name resolved again meanwhile): a
    /// failure at an address it has left says nothing of the one it has now.
    pub fn mark_down(&self, index: usize, failed_at: &PeerAddress, now: Instant) {
        if let Some(backend) = self.at(index, failed_at) {
            let until = self.millis(now + DOWN_FOR);
            backend.down_until_ms.store(until, Ordering::Relaxed);
        }
    }

    /// Upstream `index`, if it is still at `address`.
    fn at(&self, index: usize, address: &PeerAddress) -> Option<&Backend> {
        (self.upstreams.get(index)).filter(|backend| backend.peer.load()._address == *address)
    }

    /// Whether upstream `index`, which just refused a connection at `failed_at`, should have
    /// its name resolved again now: it has one, is still at that address, and no failure had
    /// it resolved in the last `DOWN_FOR`.
    pub fn resolve_after_failure(
        &self,
        index: usize,
        failed_at: &PeerAddress,
        now: Instant,
    ) -> bool {
        let Some(backend) = self.at(index, failed_at) else {
            return false;
        };
        let now_ms = self.millis(now);
        let last = backend.resolved_for_failure_ms.load(Ordering::Relaxed);
        let wait = u64::try_from(DOWN_FOR.as_millis()).unwrap_or(u64::MAX);
        backend.name.is_some()
            && (last == 0 || now_ms.saturating_sub(last) >= wait)
            && backend
                .resolved_for_failure_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Resolves the names of the upstreams in `which` (all when `None`) again. An upstream
    /// whose address is no longer among its name's gets the first of them for new connections
    /// (pooled ones to the old address idle out) and counts as up; one whose name cannot be
    /// resolved keeps its address. `failed` is an upstream and the address it failed to
    /// connect to: while it still has that address, it moves to the one after it among the
    /// name's, when the name has another.
    pub async fn resolve_again(&self, route: &str, failed: Option<(usize, &PeerAddress)>) {
        for (index, backend) in self.upstreams.iter().enumerate() {
            let Some((name, port)) = &backend.name else {
                continue;
            };
            if failed.is_some_and(|(only, _)| only != index) {
                continue;
            }
            let lookup = tokio::net::lookup_host((name.as_str(), *port));
            let addresses: Vec<std::net::SocketAddr> =
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(found)) => found.collect(),
                    Ok(Err(e)) => {
                        tracing::warn!(
                            "route `{route}`: upstream `{name}` not resolved again ({e}); \
                             its last address is kept"
                        );
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(
                            "route `{route}`: upstream `{name}` not resolved again within \
                             {RESOLVE_TIMEOUT:?}; its last address is kept"
                        );
                        continue;
                    }
                };
            let current = backend.peer.load();
            let at = addresses
                .iter()
                .position(|a| current._address.as_inet() == Some(a));
            // (A failure at an address it has left already moves nothing.)
            let refused = failed.is_some_and(|(_, address)| *address == current._address);
            let next = match at {
                None => addresses.first(),
                Some(at) if refused && addresses.len() > 1 => {
                    addresses.get((at + 1) % addresses.len())
                }
                Some(_) => None,
            };
            let Some(next) = next else {
                continue;
            };
            tracing::info!(
                "route `{route}`: upstream `{name}` now resolves to {next}, not {}",
                current._address
            );
            let mut peer = HttpPeer::clone(&current);
            peer._address = (*next).into();
            // Unless another resolution moved it meanwhile.
            let before = backend.peer.compare_and_swap(&current, Arc::new(peer));
            if !Arc::ptr_eq(&before, &current) {
                continue;
            }
            // Its time out over: one request tries the new address first (see `pick`).
            backend.down_until_ms.store(1, Ordering::Relaxed);
        }
    }

    /// Upstream `index` accepted a connection at `address`; unless it has moved to another
    /// address since (as [`Self::mark_down`]).
    pub fn mark_up(&self, index: usize, address: &PeerAddress) {
        if let Some(backend) = self.at(index, address) {
            if backend.down_until_ms.load(Ordering::Relaxed) != 0 {
                backend.down_until_ms.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Takes over from `old`, the set of the route a reload replaces, which upstreams are
    /// down and until when, by address: a reload (a renewed certificate, a rule changed)
    /// sends no request back to an upstream that just failed, to wait out its connect
    /// timeout.
    pub fn keep_health_of(&self, old: &UpstreamSet) {
        for backend in &self.upstreams {
            let address = backend.peer.load()._address.clone();
            let down_until = old.upstreams.iter().find_map(|previous| {
                let ms = previous.down_until_ms.load(Ordering::Relaxed);
                (ms != 0 && previous.peer.load()._address == address)
                    .then(|| old.epoch + Duration::from_millis(ms - 1))
            });
            if let Some(until) = down_until {
                backend
                    .down_until_ms
                    .store(self.millis(until), Ordering::Relaxed);
            }
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        // +1 so that "down until the epoch" is distinguishable from "up" (0).
        millis_of(at.saturating_duration_since(self.epoch)).saturating_add(1)
    }
}

fn millis_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn build_peer(route: &Route, upstream: &Upstream) -> HttpPeer {
    let sni = if upstream.tls {
        upstream.host.clone()
    } else {
        String::new()
    };
    let mut peer = HttpPeer::new(upstream.address, upstream.tls, sni);
    let options = &mut peer.options;
    options.connection_timeout = Some(route.connect_timeout);
    options.total_connection_timeout = Some(route.connect_timeout);
    options.read_timeout = Some(route.read_timeout);
    // An upstream that stops taking a request body (stalled, or answered early and left the
    // socket open) holds it no longer than one that stops answering: pingora writes without
    // a bound otherwise, and reads nothing meanwhile.
    options.write_timeout = Some(route.read_timeout);
    options.idle_timeout = Some(Duration::from_secs(60));
    options.verify_cert = upstream.verify_tls;
    options.verify_hostname = upstream.verify_tls;
    options.http_upstream_request_policy = if route.websockets {
        HttpUpstreamRequestPolicy::standard()
    } else {
        HttpUpstreamRequestPolicy::deny_upgrades()
    };
    if let Some(ca) = &upstream.ca {
        options.ca = Some(wrap_ca(ca));
        // pingora pools connections by address, SNI and the verify flags, not by the CAs
        // trusted: without this, a connection checked under one route's CA would serve another
        // route trusting another, or this one after a reload that stopped trusting it.
        peer.group_key = ca_key(ca);
    }
    peer
}

/// A pool key for the CA certificates `ca` (0, as pingora's default, is for the system's).
fn ca_key(ca: &[CertificateDer<'static>]) -> u64 {
    let mut hash = Sha256::new();
    for der in ca {
        hash.update((der.len() as u64).to_be_bytes());
        hash.update(der);
    }
    let digest = hash.finalize();
    let mut key = [0; 8];
    key.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(key).max(1)
}

/// The upstream's CA certificates as pingora takes them. Validation parsed each with the same
/// parser, so none is dropped here; if one were, the upstream would be trusted less, not more.
fn wrap_ca(ca: &[CertificateDer<'static>]) -> Arc<[WrappedX509]> {
    ca.iter()
        .filter_map(|der| {
            WrappedX509::try_new(der.to_vec(), |der| {
                X509Certificate::from_der(der).map(|(_, parsed)| parsed)
            })
            .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(n: u16) -> UpstreamSet {
        UpstreamSet {
            upstreams: (0..n)
                .map(|i| Backend {
                    peer: ArcSwap::from_pointee(HttpPeer::new(
                        format!("127.0.0.1:{}", 9000 + i),
                        false,
                        String::new(),
                    )),
                    name: None,
                    host_header: HeaderValue::from_static("up.test"),
                    down_until_ms: AtomicU64::new(0),
                    resolved_for_failure_ms: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            probe_ms: 6_000,
        }
    }

    /// The address upstream `index` of `set` is at now.
    fn address(set: &UpstreamSet, index: usize) -> PeerAddress {
        set.upstreams[index].peer.load()._address.clone()
    }

    /// A failure at an address an upstream has left (its name resolved again meanwhile) marks
    /// nothing down, and has its name resolved again no sooner.
    #[test]
    fn a_failure_at_an_address_an_upstream_has_left_marks_it_not_down() {
        let mut set = upstreams(2);
        set.upstreams[0].name = Some(("up.test".to_owned(), 9000));
        let now = Instant::now();
        let left = address(&set, 0);
        set.upstreams[0].peer.store(Arc::new(HttpPeer::new(
            "127.0.0.1:9100",
            false,
            String::new(),
        )));
        set.mark_down(0, &left, now);
        assert_eq!(set.pick(0, &[], now).0, 0, "still up at its new address");
        assert!(!set.resolve_after_failure(0, &left, now));
        let there = address(&set, 0);
        set.mark_down(0, &there, now);
        assert_eq!(set.pick(0, &[], now).0, 1, "down at the address it has");
        assert!(set.resolve_after_failure(0, &there, now), "resolved again");
        // Nor does a late answer from the address it left mark it up.
        set.mark_up(0, &left);
        assert_eq!(
            set.pick(0, &[], now).0,
            1,
            "still down at the address it has"
        );
        set.mark_up(0, &there);
        assert_eq!(set.pick(0, &[], now).0, 0);
    }

    #[test]
    fn a_retry_goes_to_an_upstream_not_tried_yet_healthy_ones_first() {
        let set = upstreams(3);
        let now = Instant::now();
        let pick = |tried: &[usize]| set.pick(0, tried, now).0;
        // The first fails and is marked down: the next one, not the one after it.
        assert_eq!(pick(&[]), 0);
        set.mark_down(0, &address(&set, 0), now);
        assert_eq!(pick(&[0]), 1);
        // One marked down by another request is passed over while a healthy one is left...
        set.mark_down(1, &address(&set, 1), now);
        assert_eq!(pick(&[0]), 2);
        // ... and tried last, once.
        set.mark_down(2, &address(&set, 2), now);
        assert_eq!(pick(&[0, 2]), 1);
        // All down: each is tried once, in round-robin order from the request's start.
        assert_eq!(set.pick(1, &[], now).0, 1);
        assert_eq!(set.pick(1, &[1], now).0, 2);
        assert_eq!(set.pick(1, &[1, 2], now).0, 0);
    }

    /// A reload builds new sets: an upstream marked down stays down in them, until its time
    /// is out as before, and one up stays up.
    #[test]
    fn a_reload_keeps_which_upstreams_are_down() {
        let old = upstreams(3);
        let t0 = Instant::now();
        old.mark_down(1, &address(&old, 1), t0);
        let new = upstreams(3);
        new.keep_health_of(&old);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(new.pick(1, &[], at(1)).0, 2, "still down");
        assert_eq!(new.pick(0, &[], at(1)).0, 0);
        assert_eq!(new.pick(1, &[], at(5)).0, 1, "its time is out");
    }

    #[test]
    fn an_upstream_whose_time_out_is_over_is_tried_by_one_request_alone() {
        let set = upstreams(2);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        set.mark_down(0, &address(&set, 0), t0);
        assert_eq!(set.pick(0, &[], at(4)).0, 1, "down for 5 s");
        // Its time is out: the first request tries it (on a new connection), the others pass
        // it over meanwhile.
        let (index, _, trying_again) = set.pick(0, &[], at(5));
        assert_eq!((index, trying_again), (0, true));
        assert_eq!(set.pick(0, &[], at(6)).0, 1);
        assert_eq!(set.pick(0, &[], at(10)).0, 1);
        // That try did not connect within the connect timeout: another request tries.
        assert_eq!(set.pick(0, &[], at(11)).0, 0);
        // It failed: down again.
        set.mark_down(0, &address(&set, 0), at(11));
        assert_eq!(set.pick(0, &[], at(15)).0, 1);
        assert_eq!(set.pick(0, &[], at(16)).0, 0);
        // It connected: up for every request, on any connection.
        set.mark_up(0, &address(&set, 0));
        assert!(!set.pick(0, &[], at(17)).2);
        assert_eq!(set.pick(0, &[], at(17)).0, 0);
    }
}
