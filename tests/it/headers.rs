//! Headers the proxy adds, rewrites and removes on the way to the upstream: X-Forwarded-*,
//! Host, hop-by-hop headers, and client-supplied identity headers (which must never reach an
//! upstream, whatever their spelling).

use portcullis_tests::client::plain_client;
use portcullis_tests::{raw_request, ConfigBuilder, Echo, Route, Upstream};
use reqwest::StatusCode;

use crate::get_echo;

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_describe_the_client_request() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    let echo = get_echo(&plain_client(), &cfg.http_url("app.test", "/fwd")).await;
    assert_eq!(echo.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(echo.header_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        echo.header_all("x-forwarded-host"),
        vec![format!("app.test:{port}")]
    );
}

/// Behind a load balancer, the client is the address the balancer names, and only the
/// balancer's word counts: Debian's nginx in front, reached by the client from 127.0.0.2 and
/// connecting to Portcullis from 127.0.0.3, the listener's only trusted proxy.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_the_client_is_the_address_it_names() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .http_listener_setting("trusted_proxies = [\"127.0.0.3\"]")
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let balancer =
        portcullis_tests::Nginx::in_front_of(cfg.http_addr(), [127, 0, 0, 3].into()).await;
    let client = portcullis_tests::Nginx::client_from([127, 0, 0, 2].into());
    let forwarded = |echo: &Echo| {
        (
            echo.header_all("x-forwarded-for").join(", "),
            echo.header_all("forwarded").join(", "),
        )
    };

    // What the client claims itself is not taken, through the balancer or round it.
    let through = format!("http://app.test:{}/via-balancer", balancer.addr().port());
    let round = cfg.http_url("app.test", "/direct");
    for url in [&through, &round] {
        let resp = client
            .get(url)
            .header("x-forwarded-for", "198.51.100.1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        let (xff, rfc7239) = forwarded(&Echo::parse(&resp.bytes().await.unwrap()));
        assert_eq!(xff, "127.0.0.2", "{url}");
        assert!(rfc7239.starts_with("for=127.0.0.2;"), "{url}: {rfc7239}");
    }

    // The same listener from an address it does not trust: the connection's address.
    let echo = get_echo(&plain_client(), &cfg.http_url("app.test", "/from-1")).await;
    assert_eq!(forwarded(&echo).0, "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_is_the_upstreams_unless_preserve_host() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://plain.test", &[&up]).preserve_host(false))
        .route(Route::new("http://keep.test", &[&up]).preserve_host(true))
        .route(Route::new("http://default.test", &[&up]));
    let _px = cfg.start().await;
    let client = plain_client();
    let port = cfg.http_addr().port();
    let upstream_host = up.addr().to_string();

    let echo = get_echo(&client, &cfg.http_url("plain.test", "/")).await;
    assert_eq!(echo.header_all("host"), vec![upstream_host.as_str()]);
    let echo = get_echo(&client, &cfg.http_url("default.test", "/")).await;
    assert_eq!(
        echo.header_all("host"),
        vec![upstream_host.as_str()],
        "preserve_host defaults to false"
    );
    let echo = get_echo(&client, &cfg.http_url("keep.test", "/")).await;
    assert_eq!(echo.header_all("host"), vec![format!("keep.test:{port}")]);
    // X-Forwarded-Host is the client's Host either way.
    let echo = get_echo(&client, &cfg.http_url("plain.test", "/")).await;
    assert_eq!(
        echo.header_all("x-forwarded-host"),
        vec![format!("plain.test:{port}")]
    );
}

/// True for header names Portcullis reserves for identity: lower-cased, `_` read as `-`,
/// starting with `x-portcullis-`.
fn is_identity_header(name: &str) -> bool {
    name.to_ascii_lowercase()
        .replace('_', "-")
        .starts_with("x-portcullis-")
}

#[tokio::test(flavor = "multi_thread")]
async fn client_identity_headers_never_reach_the_upstream() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    // Every spoofed value carries the marker "spoof" so that any survivor is found whatever
    // name it arrives under.
    let spoofed: &[(&str, &str)] = &[
        ("X-Portcullis-User", "spoof-user"),
        ("x-portcullis-groups", "spoof-groups"),
        ("X_Portcullis_User", "spoof-underscore"),
        ("X-PORTCULLIS-EMAIL", "spoof-email"),
        ("x-portcullis_user", "spoof-mixed"),
        ("X_PORTCULLIS_GROUPS", "spoof-upper-underscore"),
        ("x-PortCullis-Assertion", "spoof-assertion"),
        ("X-Portcullis-User", "spoof-duplicate"),
        ("x-portcullis-user", "spoof-duplicate-lower"),
        ("X-Portcullis-", "spoof-bare-prefix"),
        ("X_PORTCULLIS_", "spoof-bare-prefix-underscore"),
        ("X-Portcullis-Named", "spoof-named-in-connection"),
        // Rack before 2.2.20 reads these from the request (CVE-2025-61780).
        ("X-Sendfile-Type", "spoof-sendfile"),
        ("X-Accel-Mapping", "spoof-accel=/internal/"),
        // An unpatched Next.js skips its middleware for this (CVE-2025-29927).
        ("X-Middleware-Subrequest", "spoof-next-middleware"),
    ];
    // Each case: the spoofed headers, plus one request where they are also named in Connection.
    for (case, connection, drop_me_named) in [
        ("plain", "keep-alive", false),
        (
            "named in Connection",
            "keep-alive, X-Portcullis-Named, x_portcullis_user, X-Drop-Me",
            true,
        ),
    ] {
        let mut req = format!("GET /identity HTTP/1.1\r\nHost: app.test:{port}\r\n");
        for (name, value) in spoofed {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str(&format!("Connection: {connection}\r\n"));
        req.push_str("X-Drop-Me: named\r\n");
        req.push_str("X-Ordinary: kept\r\nX-Ordinary: kept-twice\r\nUser-Agent: raw-test\r\n\r\n");

        let resp = raw_request(cfg.http_addr(), req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(resp.status, 200, "{case}: {}", resp.body_text());
        let echo = Echo::parse(&resp.body);

        let leaked: Vec<&(String, String)> = echo
            .headers
            .iter()
            .filter(|(n, v)| is_identity_header(n) || v.contains("spoof"))
            .collect();
        assert!(
            leaked.is_empty(),
            "{case}: client identity headers reached the upstream: {leaked:?}"
        );
        assert_eq!(
            echo.header_all("x-ordinary"),
            vec!["kept", "kept-twice"],
            "{case}: ordinary headers are forwarded, duplicates kept in order"
        );
        assert_eq!(echo.header("user-agent"), Some("raw-test"), "{case}");
        let expected_drop_me = if drop_me_named { None } else { Some("named") };
        assert_eq!(
            echo.header("x-drop-me"),
            expected_drop_me,
            "{case}: a header is removed exactly when Connection names it"
        );
    }
}

/// Without [oidc] (a reload took it out, say) browsers still send the session cookie they were
/// given: it never reaches the upstream. Cookies sent as several headers (HTTP/2's crumbs)
/// reach it as one, as RFC 9113 §8.2.3 has them joined.
#[tokio::test(flavor = "multi_thread")]
async fn without_sign_in_the_session_cookie_still_stays_out_and_cookies_go_as_one_header() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();
    let req = format!(
        "GET /c HTTP/1.1\r\nHost: app.test:{port}\r\nCookie: a=1\r\n\
         Cookie: portcullis_session=SECRET-SESSION-ID\r\nCookie: csrftoken=x\r\n\r\n"
    );
    let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    let echo = Echo::parse(&resp.body);
    assert_eq!(echo.header_all("cookie"), ["a=1; csrftoken=x"]);
    // Nor can an upstream plant one meanwhile, to be found once sign-in is back.
    let req = format!("GET /set-cookies HTTP/1.1\r\nHost: app.test:{port}\r\n\r\n");
    let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
    assert_eq!(resp.header_all("set-cookie"), ["theme=dark; Path=/"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]))
        // Upgrade handling differs on websocket routes; hop-by-hop removal must not.
        .route(Route::new("http://ws.test", &[&up]).websockets(true));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    for host in ["app.test", "ws.test"] {
        let req = format!(
            "GET /hop HTTP/1.1\r\n\
             Host: {host}:{port}\r\n\
             Connection: keep-alive, X-Custom-Hop, x-other-hop\r\n\
             Keep-Alive: timeout=5, max=100\r\n\
             Proxy-Connection: keep-alive\r\n\
             TE: trailers\r\n\
             Trailer: X-Checksum\r\n\
             Upgrade: h2c\r\n\
             Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
             X-Custom-Hop: hop-1\r\n\
             X-Other-Hop: hop-2\r\n\
             X-End-To-End: e2e\r\n\
             \r\n"
        );
        let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
        assert_eq!(resp.status, 200, "{host}: {}", resp.body_text());
        let echo = Echo::parse(&resp.body);

        for name in [
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
            "x-custom-hop",
            "x-other-hop",
        ] {
            assert!(
                echo.header(name).is_none(),
                "{host}: hop-by-hop header {name} reached the upstream: {:?}",
                echo.headers
            );
        }
        // The proxy may manage its own connection to the upstream, but the client's Connection
        // header (with the names it lists) must not be passed along.
        for value in echo.header_all("connection") {
            let tokens: Vec<String> = value
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect();
            assert!(
                tokens.iter().all(|t| t == "keep-alive" || t == "close"),
                "{host}: client Connection header reached the upstream: {value:?}"
            );
        }
        assert_eq!(echo.header("x-end-to-end"), Some("e2e"), "{host}");

        // Nor those of the upstream's answer to the client, named in its `Connection` or not.
        for target in ["/hop-by-hop", "/hop-by-hop?bare"] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
            let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
            assert_eq!(resp.status, 200, "{host}{target}: {}", resp.body_text());
            for name in ["x-internal-token", "keep-alive", "proxy-connection"] {
                assert!(
                    resp.header_all(name).is_empty(),
                    "{host}{target}: the upstream's hop-by-hop {name} reached the client: {:?}",
                    resp.headers
                );
            }
            assert_eq!(
                resp.header_all("connection"),
                ["keep-alive"],
                "{host}{target}"
            );
            assert_eq!(resp.header_all("x-end-to-end"), ["kept"], "{host}{target}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_forwarded_headers_cannot_fake_scheme_host_or_peer() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    for (case, connection) in [
        ("sent by the client", "keep-alive"),
        (
            "also named in Connection",
            "keep-alive, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host",
        ),
    ] {
        let path = format!("/xf/{}", case.replace(' ', "-"));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: app.test:{port}\r\nConnection: {connection}\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\
             X-Forwarded-For: 203.0.113.9\r\nFront-End-Https: on\r\nX-Proxied-Https: on\r\n\
             Proxy-Ssl-Id: 0a1b\r\nProxy-Auth-Cert: TLS_AES_128_GCM_SHA256\r\n\
             Client-Cert: :MIIB:\r\nClient-Cert-Chain: :MIIC:\r\nX-Client-Cert: MIIB\r\n\
             X-ARR-ClientCert: MIIB\r\nX-ARR-SSL: 2048|256|CN=ca|CN=app\r\n\
             X-SSL-Client-Cert: MIIB\r\nX-SSL-Client-Verify: SUCCESS\r\n\
             X-SSL-Client-S-DN: CN=admin\r\nX-Client-Cert-Present: true\r\n\
             X-Amzn-Mtls-Clientcert: MIIB\r\nSsl-Client-Verify: SUCCESS\r\n\
             Ssl-Client-Subject-Dn: CN=admin\r\n\r\n"
        );
        let resp = raw_request(cfg.http_addr(), req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        if connection != "keep-alive" && resp.status == 400 {
            // pingora refuses a Connection header nominating Host or X-Forwarded-*: a refusal
            // is as good as a correct rewrite, provided nothing reached the upstream.
            assert!(
                !up.seen().iter().any(|e| e.uri == path),
                "{case}: refused with 400 but the upstream saw it"
            );
            continue;
        }
        assert_eq!(resp.status, 200, "{case}: {}", resp.body_text());
        let echo = Echo::parse(&resp.body);
        assert_eq!(
            echo.header_all("x-forwarded-proto"),
            vec!["http"],
            "{case}: the scheme is the one the client really used"
        );
        // Which CodeIgniter reads when X-Forwarded-Proto says http, and Jetty beside it.
        for https in [
            "front-end-https",
            "x-proxied-https",
            "proxy-ssl-id",
            "proxy-auth-cert",
        ] {
            assert!(echo.header_all(https).is_empty(), "{case}: {https}");
        }
        // A client certificate the caller claims to have shown a proxy in front, which an
        // application would take as who calls.
        for cert in [
            "client-cert",
            "client-cert-chain",
            "x-client-cert",
            "x-arr-clientcert",
            "x-arr-ssl",
            "x-ssl-client-cert",
            "x-ssl-client-verify",
            "x-ssl-client-s-dn",
            "x-client-cert-present",
            "x-amzn-mtls-clientcert",
            "ssl-client-verify",
            "ssl-client-subject-dn",
        ] {
            assert!(echo.header_all(cert).is_empty(), "{case}: {cert}");
        }
        assert_eq!(
            echo.header_all("x-forwarded-host"),
            vec![format!("app.test:{port}")],
            "{case}: X-Forwarded-Host is the client's Host"
        );
        let xff = echo.header_all("x-forwarded-for").join(", ");
        assert_eq!(
            xff.rsplit(',').next().map(str::trim),
            Some("127.0.0.1"),
            "{case}: the peer address is the last X-Forwarded-For entry: {xff:?}"
        );
    }
}

/// What would reach a later caller on a pooled upstream connection is kept off it: a HEAD
/// goes upstream on a connection of its own (an upstream that answers HEAD as GET, as
/// `do_HEAD = do_GET` in Python's `http.server` does, sends a body after the head that
/// pingora does not read, which the next request on that connection would take for its
/// answer: one made for another caller). And an answer whose body has a coding besides its
/// chunks is refused (502), as such a request is (501): an HTTP/1.0 or HTTP/2 client, whose
/// `Transfer-Encoding` goes, would take the coded bytes for the body.
#[tokio::test(flavor = "multi_thread")]
async fn no_answer_is_left_on_a_pooled_connection_nor_passed_with_its_coding_lost() {
    let raw = portcullis_tests::raw_upstream::RawUpstream::start().await;
    let coding = portcullis_tests::raw_upstream::answering(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    )
    .await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::to_urls("http://raw.test", vec![raw.url()]).websockets(true))
        .route(Route::to_urls(
            "http://coded.test",
            vec![format!("http://{coding}")],
        ));
    let _px = cfg.start().await;
    let client = plain_client();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        // A HEAD asking to upgrade to a websocket too (a handshake is a GET).
        let resp = client
            .request(method.clone(), cfg.http_url("raw.test", "/page"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
        let sent = raw.last();
        let closes = sent.header("connection") == Some("close");
        assert_eq!(
            closes,
            method == reqwest::Method::HEAD,
            "{method}: {sent:?}"
        );
    }
    let resp = client
        .get(cfg.http_url("coded.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

/// An HTTP/1.0 client (a monitoring probe, `curl -0`) reads no chunked body and no interim
/// answer: a streamed answer reaches it without chunk framing, ended by the connection's
/// close, and an upstream's `103 Early Hints` never reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn an_http_1_0_client_gets_no_chunked_body_and_no_interim_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("a").await;
    // An upstream that hints before it answers.
    let hints = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hinting = hints.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = hints.accept().await {
            tokio::spawn(async move {
                let head = portcullis_tests::client::read_request_head(&mut stream).await;
                // Told to expect, it says to go on; else it hints.
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let expects = head.contains("expect: 100-continue");
                let interim = match expects {
                    true => "HTTP/1.1 100 Continue\r\n\r\n",
                    false => "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                };
                if stream.write_all(interim.as_bytes()).await.is_err() {
                    return;
                }
                // The request's body is read before the answer: a server that closed with it
                // unread would have the connection reset under Portcullis, still sending it.
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let mut sent = vec![0u8; length];
                if stream.read_exact(&mut sent).await.is_err() {
                    return;
                }
                let body = if expects { "expect" } else { "ok" };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]))
        .route(Route::to_urls(
            "http://hints.test",
            vec![format!("http://{hinting}")],
        ));
    let _px = cfg.start().await;
    let (addr, port) = (cfg.http_addr(), cfg.http_addr().port());
    // What the client has read once `done` says it has enough (bounded in time).
    let read = |request: String, done: fn(&[u8]) -> bool| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done(&got) {
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    for connection in ["", "Connection: keep-alive\r\n"] {
        let request =
            format!("GET /stream-ticks HTTP/1.0\r\nHost: app.test:{port}\r\n{connection}\r\n");
        let got = read(request, |got| {
            got.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .is_some_and(|at| got.len() > at + 10)
        })
        .await;
        let (head, body) = got.split_once("\r\n\r\n").expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{connection:?}: {head}"
        );
        assert!(
            body.starts_with("tick "),
            "{connection:?}: chunk framing: {body:?}"
        );
    }
    let request = format!("GET / HTTP/1.0\r\nHost: hints.test:{port}\r\n\r\n");
    let got = read(request, |got| got.ends_with(b"ok")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(!got.contains("103"), "{got}");
    // Nor a `100 Continue` to an `Expect` it may not send (its own is none).
    let request = format!(
        "POST / HTTP/1.0\r\nHost: hints.test:{port}\r\nExpect: 100-continue\r\n\
         Content-Length: 2\r\n\r\nhi"
    );
    let got = read(request, |got| {
        got.ends_with(b"ok") || got.ends_with(b"expect")
    })
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.ends_with("\r\n\r\nok"),
        "the upstream was told to expect: {got}"
    );
}
