//! Several upstreams on one route: round-robin while all are healthy, failover without a
//! single failed request when one is down. An upstream named by DNS followed to its new address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_tests::client::plain_client;
use portcullis_tests::{ConfigBuilder, Echo, Portcullis, Route, Upstream};
use tokio::net::{TcpListener, TcpStream};

use crate::get_echo;

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_over_two_upstreams() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]));
    let _px = cfg.start().await;
    let client = plain_client();

    let mut order = Vec::new();
    for i in 0..20 {
        let echo = get_echo(&client, &cfg.http_url("app.test", &format!("/rr/{i}"))).await;
        order.push(echo.upstream);
    }
    let from_a = order.iter().filter(|u| *u == "a").count();
    let from_b = order.iter().filter(|u| *u == "b").count();
    assert!(
        from_a.abs_diff(from_b) <= 2,
        "20 sequential requests should be spread evenly: a={from_a} b={from_b}, order {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_when_one_upstream_is_down() {
    // Stopped below: on a port the kernel hands no other test meanwhile.
    let mut a = Upstream::start_on("a", loopback_port()).await;
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    let client = plain_client();
    for _ in 0..4 {
        get_echo(&client, &cfg.http_url("app.test", "/warm")).await;
    }

    a.stop().await;
    // Every other request is a POST with a body: a retry on the other upstream must still
    // carry the whole body.
    let mut failures = Vec::new();
    for i in 0..50 {
        let url = cfg.http_url("app.test", &format!("/failover/{i}"));
        let (request, body_len) = if i % 2 == 0 {
            (client.get(&url), 0)
        } else {
            (client.post(&url).body(vec![b'p'; 3000]), 3000)
        };
        match request.send().await {
            Ok(resp) if resp.status() == 200 => {
                let echo = portcullis_tests::Echo::parse(&resp.bytes().await.unwrap());
                assert_eq!(echo.upstream, "b", "{url}");
                assert_eq!(echo.body_len, body_len, "{url}");
            }
            Ok(resp) => failures.push(format!("{url}: {}", resp.status())),
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 50 requests failed with one upstream down: {failures:?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_of_three_upstreams_down_every_request_finds_the_third() {
    let mut a = Upstream::start_on("a", loopback_port()).await;
    let b = Upstream::start("b").await;
    let mut c = Upstream::start_on("c", loopback_port()).await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b, &c]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    // Down before any request: each request learns it by failing to connect, and a retry
    // must not pass over b for an upstream not yet known to be down.
    a.stop().await;
    c.stop().await;
    let client = plain_client();
    for i in 0..12 {
        let echo = get_echo(&client, &cfg.http_url("app.test", &format!("/only-b/{i}"))).await;
        assert_eq!(echo.upstream, "b", "request {i}");
    }
}

/// A route with more upstreams than pingora tries by default (16): a request goes on past
/// every one that refuses it, to the last, which answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_goes_on_to_the_last_of_many_upstreams() {
    let mut down = Vec::new();
    for i in 0..19 {
        down.push(Upstream::start_on(&format!("down{i}"), loopback_port()).await);
    }
    let up = Upstream::start("up").await;
    let mut all: Vec<&Upstream> = down.iter().collect();
    all.push(&up);
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &all));
    let _px = cfg.start().await;
    for upstream in &mut down {
        upstream.stop().await;
    }
    let echo = get_echo(&plain_client(), &cfg.http_url("app.test", "/first")).await;
    assert_eq!(echo.upstream, "up");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_upstream_gets_traffic_again() {
    // On a port no other socket of the machine is given meanwhile, for its restart.
    let mut a = Upstream::start_on("a", loopback_port()).await;
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/recover");

    let addr = a.addr();
    a.stop().await;
    for _ in 0..10 {
        assert_eq!(get_echo(&client, &url).await.upstream, "b");
    }
    let a = Upstream::start_on("a-again", addr).await;

    // Passive health: the upstream is skipped for a while after it refused a connection, then
    // tried again. Bounded in time and count.
    let started = std::time::Instant::now();
    let mut requests = 0;
    while a.count() == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20) && requests < 2000,
            "the restarted upstream got no request in {:?} ({requests} requests)",
            started.elapsed()
        );
        get_echo(&client, &url).await;
        requests += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Back in the rotation: both serve again.
    let mut from_a = 0;
    for _ in 0..10 {
        if get_echo(&client, &url).await.upstream == "a-again" {
            from_a += 1;
        }
    }
    assert!(
        (3..=7).contains(&from_a),
        "after recovery 10 requests gave {from_a} to the restarted upstream"
    );
}

/// A rolling restart: the first upstream back while still marked down, the second stopped,
/// requests go to the first (a refused connection costs nothing to try past).
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_fails_no_request() {
    // On a port no other socket of the machine is given meanwhile, for its restart.
    let mut a = Upstream::start_on("a", loopback_port()).await;
    let mut b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/rolling");
    let addr = a.addr();
    a.stop().await;
    for _ in 0..4 {
        assert_eq!(get_echo(&client, &url).await.upstream, "b");
    }
    // a is back within its 5 s marked down, and b goes.
    let _a = Upstream::start_on("a-again", addr).await;
    b.stop().await;
    for _ in 0..4 {
        assert_eq!(get_echo(&client, &url).await.upstream, "a-again");
    }
}

/// A listener that accepts nothing, its queue filled: further connections go unanswered (a
/// dead VM, a firewall dropping packets). Silent while what it returns is kept.
async fn silent_listener() -> (SocketAddr, (TcpListener, Vec<TcpStream>)) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = socket.listen(0).unwrap();
    let address = silent.local_addr().unwrap();
    (address, (silent, fill_queue(address).await))
}

/// Connects to `address`, a listener of a queue of one (`listen(0)`) that takes no more
/// connections, until its queue is full; the connections that fill it.
async fn fill_queue(address: SocketAddr) -> Vec<TcpStream> {
    let mut queued = Vec::new();
    for attempt in 0.. {
        assert!(
            attempt < 20,
            "no connection to the listener was ever queued"
        );
        let connect = TcpStream::connect(address);
        match tokio::time::timeout(Duration::from_millis(500), connect).await {
            Ok(Ok(stream)) => queued.push(stream),
            // Still pending: the queue is full (once one is queued: a loaded machine may be
            // slow to take even the first).
            _ if !queued.is_empty() => break,
            _ => {}
        }
        assert!(queued.len() < 16, "the listener's queue never filled");
    }
    queued
}

/// An upstream that drops connections unanswered (a dead VM, a firewall dropping packets)
/// holds up one request per try once its time out is over, not every request sent its way
/// while that try waits for its connect timeout.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_drops_connections_holds_up_one_request_per_try() {
    let (address, queued) = silent_listener().await;
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::to_urls(
            "http://app.test",
            vec![format!("http://{address}"), b.url()],
        )
        .set("connect_timeout = \"3s\""),
    );
    let _px = cfg.start().await;
    let url = cfg.http_url("app.test", "/steady");
    // Eight callers at once, for 14 s; the first second, when every caller may find the
    // silent upstream before it is known to be, is not counted.
    let started = Instant::now();
    let callers = (0..8).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let client = plain_client();
            let (mut slow, mut sent) = (0, 0);
            while started.elapsed() < Duration::from_secs(15) && sent < 1000 {
                let asked = Instant::now();
                assert_eq!(get_echo(&client, &url).await.upstream, "b");
                // Held up by a try (3 s), not by a loaded machine's stall.
                if asked.elapsed() >= Duration::from_millis(2_700)
                    && asked.duration_since(started) >= Duration::from_secs(1)
                {
                    slow += 1;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            slow
        })
    });
    let mut slow = 0;
    for caller in callers.collect::<Vec<_>>() {
        slow += caller.await.unwrap();
    }
    // Down 5 s after the first failures, then one try (held up 3 s) every 8 s: about one in
    // the counted window (eight, one per caller, if the upstream were not tried by one request
    // alone).
    assert!(
        slow <= 4,
        "{slow} requests waited on the silent upstream's connect timeout"
    );
    drop(queued);
}

/// While every upstream of a route is known to be down, a request waits for one connect
/// timeout (its one try), not one for each upstream.
#[tokio::test(flavor = "multi_thread")]
async fn with_every_upstream_down_a_request_waits_one_connect_timeout() {
    let (first, _silent) = silent_listener().await;
    let (second, _also_silent) = silent_listener().await;
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::to_urls(
            "http://app.test",
            vec![format!("http://{first}"), format!("http://{second}")],
        )
        .set("connect_timeout = \"1500ms\""),
    );
    let _px = cfg.start().await;
    let url = cfg.http_url("app.test", "/");
    let client = plain_client();
    // The first request finds both down (1.5 s each), each then known to be for 5 s: the
    // first one's mark lapses 2 s after this request's try.
    let status = client.get(&url).send().await.unwrap().status();
    assert_eq!(status, 504);
    let asked = Instant::now();
    let status = client.get(&url).send().await.unwrap().status();
    let took = asked.elapsed();
    assert_eq!(status, 504);
    // One try (1.5 s), not two (3 s), with 1.4 s for a loaded machine's stalls.
    assert!(took < Duration::from_millis(2_900), "took {took:?}");
}

/// A hosts file of the test's own for Portcullis' name lookups: nss_wrapper (Debian's
/// libnss-wrapper, preloaded) makes `getaddrinfo` read it instead of /etc/hosts and DNS, and
/// reads it again when it changes. Rewriting it moves a name to another address, as a cloud
/// load balancer's name moves. (Without the library, Portcullis does not start: the name
/// resolves to nothing.)
struct Hosts {
    dir: tempfile::TempDir,
}

impl Hosts {
    fn new(name: &str, ips: &[&str]) -> Hosts {
        let hosts = Hosts {
            dir: tempfile::tempdir().expect("tempdir for a hosts file"),
        };
        hosts.point(name, ips);
        hosts
    }

    fn path(&self) -> String {
        self.dir.path().join("hosts").display().to_string()
    }

    /// `name` resolves to `ips`, in that order, from now on (the file is replaced whole, never
    /// read half written).
    fn point(&self, name: &str, ips: &[&str]) {
        let next = self.dir.path().join("hosts.next");
        let lines: String = ips.iter().map(|ip| format!("{ip} {name}\n")).collect();
        std::fs::write(&next, lines).expect("write hosts file");
        std::fs::rename(&next, self.path()).expect("replace hosts file");
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".to_owned(), "libnss_wrapper.so".to_owned()),
            ("NSS_WRAPPER_HOSTS".to_owned(), self.path()),
        ]
    }
}

/// `svc.test` at 127.0.0.1, where `old` serves, with `new` on the same port at 127.0.0.2,
/// routed from `http://app.test` and resolved again every `refresh`; `url` answered by `old`.
struct Moving {
    old: Upstream,
    _new: Upstream,
    hosts: Hosts,
    px: Portcullis,
    client: reqwest::Client,
    url: String,
}

impl Moving {
    async fn start(refresh: &str) -> Moving {
        // A port no client socket takes (see `free_port`), on 127.0.0.2 as on 127.0.0.1.
        let port = portcullis_tests::free_port();
        let old = Upstream::start_on("old", SocketAddr::from(([127, 0, 0, 1], port))).await;
        let new = Upstream::start_on("new", SocketAddr::from(([127, 0, 0, 2], port))).await;
        let hosts = Hosts::new("svc.test", &["127.0.0.1"]);
        let cfg = svc_route(port, refresh);
        let px = start_resolving(&cfg, &hosts).await;
        let client = plain_client();
        let url = cfg.http_url("app.test", "/where");
        assert_eq!(get_echo(&client, &url).await.upstream, "old");
        Moving {
            old,
            _new: new,
            hosts,
            px,
            client,
            url,
        }
    }
}

/// `http://app.test` routed to `http://svc.test:<port>`, its name resolved again every `refresh`.
fn svc_route(port: u16, refresh: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .http_listener()
        .server("upstream_dns_refresh", &format!("\"{refresh}\""))
        .route(
            Route::to_urls("http://app.test", vec![format!("http://svc.test:{port}")])
                .set("connect_timeout = \"2s\""),
        )
}

/// Portcullis on `cfg`, resolving names through `hosts`.
async fn start_resolving(cfg: &ConfigBuilder, hosts: &Hosts) -> Portcullis {
    let env = hosts.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Portcullis::start_with_env(&cfg.toml(), &env).await
}

/// Asks until the answer comes from `upstream`, for at most a minute. Every answer must be a
/// 200, or else a 502 where `refused` allows it (the upstream's old address refusing).
async fn until_served_by(client: &reqwest::Client, url: &str, upstream: &str, refused: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
        let status = resp.status();
        let body = resp.bytes().await.expect("read body");
        if status == 200 && Echo::parse(&body).upstream == upstream {
            return;
        }
        assert!(
            status == 200 || (refused && status == 502),
            "{url}: {status} while the name moved"
        );
        assert!(
            Instant::now() < deadline,
            "requests still went to the name's old address a minute after it moved"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_named_by_dns_is_followed_to_its_new_address() {
    let t = Moving::start("1s").await;

    // The old address still answers, so only resolving the name again moves the requests.
    t.hosts.point("svc.test", &["127.0.0.2"]);
    until_served_by(&t.client, &t.url, "new", false).await;
    for _ in 0..5 {
        assert_eq!(get_echo(&t.client, &t.url).await.upstream, "new");
    }
}

/// A reload that shortens `upstream_dns_refresh` applies at once, not after the longer wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_shortens_the_dns_refresh_applies_at_once() {
    let t = Moving::start("1h").await;
    t.px.reload_with(
        "[server]",
        "upstream_dns_refresh = \"1h\"",
        "upstream_dns_refresh = \"1s\"",
    )
    .await;
    t.hosts.point("svc.test", &["127.0.0.2"]);
    until_served_by(&t.client, &t.url, "new", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_refuses_connections_has_its_name_resolved_again_at_once() {
    // Far longer than the test: only the refused connection can have the name resolved again.
    let mut t = Moving::start("1h").await;

    t.hosts.point("svc.test", &["127.0.0.2"]);
    t.old.stop().await;
    // The first request finds the old address refusing (502) and has the name resolved again.
    let resp = t
        .client
        .get(&t.url)
        .send()
        .await
        .expect("GET after the move");
    assert_eq!(resp.status(), 502, "{}", t.px.log());
    until_served_by(&t.client, &t.url, "new", true).await;
    // Said in the log, within its batching.
    t.px.log_until(|log| log.contains("upstream `svc.test` now resolves to 127.0.0.2"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_name_with_an_address_that_refuses_moves_to_its_next_address() {
    let port = portcullis_tests::free_port();
    let mut first = Upstream::start_on("first", SocketAddr::from(([127, 0, 0, 1], port))).await;
    let _second = Upstream::start_on("second", SocketAddr::from(([127, 0, 0, 2], port))).await;
    let hosts = Hosts::new("svc.test", &["127.0.0.1", "127.0.0.2"]);
    let cfg = svc_route(port, "1h");
    let px = start_resolving(&cfg, &hosts).await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/where");
    assert_eq!(get_echo(&client, &url).await.upstream, "first");

    // The first address goes away; the name still lists it, and the second.
    first.stop().await;
    until_served_by(&client, &url, "second", true).await;
    // A reload (of anything) keeps the address in use while the name lists it: it does not
    // send requests back to the first, which refuses them.
    px.reload_with(
        "[[routes]]",
        "connect_timeout = \"2s\"",
        "connect_timeout = \"3s\"",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get_echo(&client, &url).await.upstream, "second");
    }
}

/// A reload while an upstream's name resolves to nothing (a DNS outage) keeps the address the
/// upstream is reached at, rather than refusing the whole file: a renewed certificate or a
/// rule taken away is not held up by it. A name no upstream had yet must still resolve.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_while_an_upstream_s_name_does_not_resolve_keeps_its_address() {
    let svc = Upstream::start("svc").await;
    let port = svc.addr().port();
    let other = Upstream::start("other-port").await;
    let hosts = Hosts::new("svc.test", &["127.0.0.1"]);
    let cfg = svc_route(port, "1h");
    let px = start_resolving(&cfg, &hosts).await;
    let client = plain_client();
    assert_eq!(
        get_echo(&client, &cfg.http_url("app.test", "/where"))
            .await
            .upstream,
        "svc"
    );

    // The hosts file no longer has svc.test (it names another host only, so it is not empty).
    hosts.point("elsewhere.test", &["127.0.0.1"]);
    // A route added to the name as it is, and one to the name on another port.
    let to_svc =
        |from: &str, port: u16| Route::to_urls(from, vec![format!("http://SVC.test:{port}")]);
    let more = cfg
        .clone()
        .route(to_svc("http://more.test", port))
        .route(to_svc("http://other.test", other.addr().port()));
    px.rewrite_config(&more.toml());
    px.reload_and_wait().await;
    assert!(
        px.log().contains("cannot resolve `SVC.test`")
            || px.log().contains("cannot resolve `svc.test`"),
        "{}",
        px.log()
    );
    for (host, upstream) in [
        ("app.test", "svc"),
        ("more.test", "svc"),
        ("other.test", "other-port"),
    ] {
        let echo = get_echo(&client, &more.http_url(host, "/where")).await;
        assert_eq!(echo.upstream, upstream, "{host}");
    }

    // A name no upstream has must resolve: the file is refused.
    let typo = more.clone().route(Route::to_urls(
        "http://typo.test",
        vec![format!("http://svx.test:{port}")],
    ));
    px.rewrite_config(&typo.toml());
    px.reload();
    // Each lookup may wait on the machine's resolver: a generous bound.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(px.log().contains("configuration not reloaded") && px.log().contains("svx.test")) {
        assert!(
            Instant::now() < deadline,
            "the typo was not refused:\n{}",
            px.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that closes a pooled connection as a request goes out on it (the keep-alive
/// race: Node and uvicorn close idle connections after 5 s) is tried again on a new one, not
/// passed over for an upstream known to be down: with the other upstream down, every request
/// is answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_closed_under_a_request_does_not_send_it_to_a_down_upstream() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // a: answers the first request on each connection, and closes on the second.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let closed = dropped.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let closed = closed.clone();
            tokio::spawn(async move {
                for nth in 0.. {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    if nth == 1 {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // b: a port nothing listens on (out of the range other tests' servers are given one
    // from: see `free_port`).
    let b = std::net::SocketAddr::from(([127, 0, 0, 1], portcullis_tests::free_port()));
    let cfg = ConfigBuilder::new().http_listener().route(Route::to_urls(
        "http://app.test",
        vec![format!("http://{a}"), format!("http://{b}")],
    ));
    let _px = cfg.start().await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/race");
    // Until a request has gone out on a pooled connection a closed (pingora pools one a moment
    // after answering on it). At most 40.
    let mut sent = 0;
    while dropped.load(Ordering::SeqCst) < 2 && sent < 40 {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {sent}");
        sent += 1;
    }
    assert!(
        dropped.load(Ordering::SeqCst) >= 2,
        "no pooled connection was closed under a request"
    );
    server.abort();
}

/// A loopback address on a port kept out of the machine's ephemeral range (see
/// [`portcullis_tests::free_port`]): an upstream stopped and started again on it finds it
/// free, which one the kernel gave (in that range) need not be.
fn loopback_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], portcullis_tests::free_port()))
}

/// An upstream that stopped taking new connections while one made before stays open in the
/// pool (its backlog full, a firewall keeping established flows) is tried after its time out
/// on a new connection: its answer over the pooled one would put it back for every request,
/// each then waiting its connect timeout.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_answers_only_on_an_old_connection_stays_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `a` takes one connection, and answers on it for as long as it is open.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = std::sync::Arc::new(socket.listen(0).unwrap());
    let a = listener.local_addr().unwrap();
    let taking = listener.clone();
    tokio::spawn(async move {
        let Ok((mut conn, _)) = taking.accept().await else {
            return;
        };
        let mut heads = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = conn.read(&mut chunk).await {
            heads.extend_from_slice(&chunk[..n]);
            while let Some(end) = heads.windows(4).position(|w| w == b"\r\n\r\n") {
                heads.drain(..end + 4);
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na";
                if conn.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    });
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::to_urls("http://app.test", vec![format!("http://{a}"), b.url()])
            .set("connect_timeout = \"1s\""),
    );
    let _px = cfg.start().await;
    let url = cfg.http_url("app.test", "/");
    let client = plain_client();
    let ask = || async {
        let asked = Instant::now();
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        (resp.text().await.unwrap(), asked.elapsed())
    };
    // Its one connection, pooled; then no other is taken.
    let mut pooled = false;
    for _ in 0..4 {
        pooled |= ask().await.0 == "a";
    }
    assert!(pooled, "a never answered");
    let queued = fill_queue(a).await;
    // Known to be down once requests find it so.
    let burst = || futures_util::future::join_all((0..12).map(|_| ask()));
    burst().await;
    // Its time out over, one request tries it, on a new connection: held up a connect
    // timeout (over the pooled one, it would be answered at once, and taken to be up).
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let slow = |answers: Vec<(String, Duration)>| {
        (answers.iter())
            .filter(|(_, took)| *took >= Duration::from_millis(900))
            .count()
    };
    let answers = burst().await;
    assert!(
        !answers.iter().any(|(who, _)| who == "a"),
        "a answered on its pooled connection, and was taken to be up"
    );
    let trying = slow(answers);
    assert!(trying >= 1, "no request tried a on a new connection");
    // The others pass it over: no request waits on its connect timeout (one, for a loaded
    // machine's stalls).
    let after = slow(burst().await);
    assert!(after <= 1, "{after} requests waited on a's connect timeout");
    drop((queued, listener));
}
