//! TLS listeners: certificate chosen by SNI among several, HTTP/2 negotiated by ALPN,
//! HTTP/1.1 still served, `X-Forwarded-Proto: https`.

use http::Version;
use portcullis_tests::client::{
    peer_certificate, plain_client, plain_client_builder, tls_client, tls_client_any_cert,
    tls_client_http1,
};
use portcullis_tests::tls::san_dns_names;
use portcullis_tests::{ConfigBuilder, Echo, Route, TestCa, Upstream};

use crate::{SCIM_HOST, SCIM_TOKEN};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread")]
async fn sni_selects_the_certificate() {
    let ca = TestCa::new();
    let cert_a = ca.leaf("a", &["a.test"]);
    let cert_b = ca.leaf("b", &["b.test", "www.b.test"]);
    let cert_w = ca.leaf("w", &["*.w.test"]);
    let up_a = Upstream::start("a").await;
    let up_b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert_a, cert_b, cert_w])
        .route(Route::new("https://x.w.test", &[&up_b]))
        .route(Route::new("https://a.test", &[&up_a]))
        .route(Route::new("https://b.test", &[&up_b]))
        .route(Route::new("https://www.b.test", &[&up_b]));
    let _px = cfg.start().await;
    let port = cfg.https_addr().port();

    for (host, upstream, other) in [
        ("a.test", "a", "b.test"),
        ("b.test", "b", "a.test"),
        ("www.b.test", "b", "a.test"),
        ("x.w.test", "b", "a.test"),
    ] {
        // A fresh client per host, so no pooled connection (and its certificate) is reused.
        let client = tls_client_http1(&ca);
        let url = cfg.https_url(host, "/sni");
        let resp = client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        let names = san_dns_names(&peer_certificate(&resp));
        let covers = |n: &String| {
            n == host
                || n.strip_prefix('*')
                    .is_some_and(|suffix| host.ends_with(suffix))
        };
        assert!(
            names.iter().any(covers) && !names.iter().any(|n| n == other),
            "{url}: presented certificate has SAN {names:?}"
        );
        let echo = Echo::parse(&resp.bytes().await.unwrap());
        assert_eq!(echo.upstream, upstream, "{url}");
        assert_eq!(echo.header_all("x-forwarded-proto"), vec!["https"], "{url}");
        assert_eq!(
            echo.header_all("x-forwarded-host"),
            vec![format!("{host}:{port}")],
            "{url}"
        );
        assert_eq!(
            echo.header_all("x-forwarded-for"),
            vec!["127.0.0.1"],
            "{url}"
        );
    }

    // No configured name matches (or no SNI at all): the first certificate is the default.
    for url in [
        cfg.https_url("unknown.test", "/"),
        format!("https://127.0.0.1:{port}/"),
    ] {
        let resp = tls_client_any_cert()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
        let names = san_dns_names(&peer_certificate(&resp));
        assert_eq!(names, vec!["a.test"], "{url}: default certificate");
    }
}

/// A plain-HTTP route for a whole host does not serve the paths an HTTPS route of that host
/// guards: the longest prefix decides, and a plain request for one of them is sent to HTTPS.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_route_does_not_take_the_paths_an_https_route_of_its_host_narrows() {
    let ca = TestCa::new();
    let guarded = Upstream::start("guarded").await;
    let open = Upstream::start("open").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .https_listener(vec![ca.leaf("a", &["a.test"])])
        .route(Route::new("https://a.test/admin", &[&guarded]))
        .route(Route::new("http://a.test", &[&open]));
    let _px = cfg.start().await;
    let plain = plain_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build reqwest client");
    let https_port = cfg.https_addr().port();

    for (path, to) in [
        ("/admin/users?x=1", "/admin/users?x=1"),
        ("/ADMIN/users", "/ADMIN/users"),
        ("/admin;x/users", "/admin;x/users"),
    ] {
        let url = cfg.http_url("a.test", path);
        let resp = plain.get(&url).send().await.expect("GET");
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT, "{url}");
        assert_eq!(
            resp.headers()["location"],
            format!("https://a.test:{https_port}{to}").as_str(),
            "{url}"
        );
        assert_eq!(guarded.count(), 0, "{url}");
        assert_eq!(open.count(), 0, "{url}");
    }
    // The rest of the host is the plain route's, and the guarded paths are served over HTTPS.
    let resp = plain
        .get(cfg.http_url("a.test", "/other"))
        .send()
        .await
        .expect("GET /other");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(Echo::parse(&resp.bytes().await.unwrap()).upstream, "open");
    let resp = tls_client_http1(&ca)
        .get(cfg.https_url("a.test", "/admin/users"))
        .send()
        .await
        .expect("GET https /admin/users");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        Echo::parse(&resp.bytes().await.unwrap()).upstream,
        "guarded"
    );
}

/// An HTTP/2 client that sits idle is closed after `client_idle_timeout`, as an HTTP/1 one is
/// (pingora holds it for good otherwise, and each holds a file descriptor and TLS buffers).
/// A TLS connection to `cfg`'s HTTPS listener for `host` (a name `ca`'s certificate has) that
/// offers HTTP/2 alone, for tests that write its frames by hand.
async fn raw_http2(
    cfg: &ConfigBuilder,
    ca: &TestCa,
    host: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca.ca_pem().as_bytes()) {
        roots.add(der.expect("the CA's PEM")).expect("the CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(cfg.https_addr())
        .await
        .unwrap();
    let name = ServerName::try_from(host.to_owned()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame: its type, flags, stream and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// A header field as HPACK writes one "without indexing", its name given by its index in the
/// static table (RFC 7541 §6.2.2), its value as it is (no Huffman coding).
fn hpack_field(name_index: u8, value: &str) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut n: usize) {
        let max = (1usize << prefix_bits) - 1;
        if n < max {
            out.push(first | n as u8);
            return;
        }
        out.push(first | max as u8);
        n -= max;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    let mut out = Vec::new();
    integer(&mut out, 0x00, 4, usize::from(name_index));
    integer(&mut out, 0x00, 7, value.len());
    out.extend(value.as_bytes());
    out
}

/// The first whole frame in `buffered`, taken out of it: its type, flags and stream.
fn take_frame(buffered: &mut Vec<u8>) -> Option<(u8, u8, u32)> {
    let head = buffered.get(..9)?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if buffered.len() < 9 + len {
        return None;
    }
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let frame = (head[3], head[4], stream);
    buffered.drain(..9 + len);
    Some(frame)
}

/// Reads frames until `done` says so for one of them (given its type, flags and stream), or
/// the connection ends (then true); false if neither came within 30 s.
async fn h2_until(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    mut done: impl FnMut(u8, u8, u32) -> bool,
) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut buffered = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        while let Some((kind, flags, stream)) = take_frame(&mut buffered) {
            if done(kind, flags, stream) {
                return true;
            }
        }
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => buffered.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_http2_connection_is_closed() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .server("client_idle_timeout", "\"1s\"")
        .route(Route::new("https://app.test", &[&up]));
    let _px = cfg.start().await;
    let mut tls = raw_http2(&cfg, &ca, "app.test").await;
    // The connection preface and an empty SETTINGS frame; then nothing.
    tls.write_all(&[H2_PREFACE, &h2_frame(4, 0, 0, &[])].concat())
        .await
        .unwrap();
    // Closed (after a GOAWAY, or as TLS ends); the server's SETTINGS and its acknowledgement
    // of ours come first.
    let closed = h2_until(&mut tls, |_, _, _| false).await;
    assert!(
        closed,
        "an idle HTTP/2 connection was still open after 30 s"
    );
}

/// An HTTP/2 client that resets each stream it opened (CVE-2023-44487, "rapid reset") frees its
/// place among the streams it may have open at once (100), while its request goes on here until
/// it is written upstream: against an upstream slow to connect, one connection could have any
/// number of connections to it under way. It has no more than twice as many requests under way
/// as it may have open; those past them are refused (429) before anything is done for them.
/// Fewer where heads may be large (12 streams open with a bound of 1 MiB on a head, so 24);
/// more for a proxy the listener trusts (16 times as many), which brings many clients' requests.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_resets_its_streams_has_only_so_many_requests_under_way() {
    let plain = |cfg: ConfigBuilder| cfg;
    let (connected, refused) = reset_in_rounds(plain, 4, 100).await;
    assert!(
        connected <= 200,
        "{connected} connections upstream for one client connection"
    );
    assert!(refused >= 200, "the rest were refused: {refused}");

    let large_heads = |cfg: ConfigBuilder| cfg.server("max_request_header_bytes", "1048576");
    let (connected, refused) = reset_in_rounds(large_heads, 4, 12).await;
    assert!(
        connected <= 24,
        "{connected} connections with heads of up to 1 MiB"
    );
    assert!(refused >= 24, "the rest were refused: {refused}");

    let trusted =
        |cfg: ConfigBuilder| cfg.https_listener_setting("trusted_proxies = [\"127.0.0.1\"]");
    let (connected, refused) = reset_in_rounds(trusted, 4, 100).await;
    assert_eq!(
        (connected, refused),
        (400, 0),
        "a trusted proxy's connection"
    );
    // Bound all the same: 16 times 24, with heads of up to 1 MiB.
    let both = |cfg: ConfigBuilder| trusted(large_heads(cfg));
    let (connected, refused) = reset_in_rounds(both, 34, 12).await;
    assert_eq!(
        (connected, refused),
        (384, 24),
        "through a trusted proxy, with large heads"
    );
}

/// Opens `per_round` streams at once on one HTTP/2 connection to a route `setup` configures,
/// `rounds` times; waits until each is under way (connecting to an upstream whose TLS handshake
/// never completes) or answered, then resets them all. How many connections reached the
/// upstream, and how many streams were answered (refused).
async fn reset_in_rounds(
    setup: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    rounds: usize,
    per_round: u32,
) -> (usize, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let holding = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("https://{}", holding.local_addr().unwrap());
    let connected = Arc::new(AtomicUsize::new(0));
    let counting = connected.clone();
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = holding.accept().await {
            held.push(stream);
            counting.fetch_add(1, Ordering::SeqCst);
        }
    });
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let cfg = setup(ConfigBuilder::new().https_listener(vec![cert])).route(
        Route::to_urls("https://app.test", vec![upstream])
            .accept(&["public"])
            .set("connect_timeout = \"60s\""),
    );
    let _px = cfg.start().await;
    let tls = raw_http2(&cfg, &ca, "app.test").await;
    let (mut from, mut to) = tokio::io::split(tls);
    // The answers' heads (HEADERS frames), counted as they come.
    let answered = Arc::new(AtomicUsize::new(0));
    let counting = answered.clone();
    let reading = tokio::spawn(async move {
        let (mut buffered, mut buf) = (Vec::new(), [0u8; 16384]);
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            buffered.extend_from_slice(&buf[..n]);
            while let Some((kind, _, _)) = take_frame(&mut buffered) {
                if kind == 1 {
                    counting.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    to.write_all(&[H2_PREFACE, &h2_frame(4, 0, 0, &[])].concat())
        .await
        .unwrap();
    let get = |stream: u32| {
        // :method GET, :scheme https, then :path and :authority; END_STREAM | END_HEADERS.
        let mut head = vec![0x82, 0x87];
        head.extend(hpack_field(4, "/reports"));
        head.extend(hpack_field(1, "app.test"));
        h2_frame(1, 0x05, stream, &head)
    };
    let mut next = 1u32;
    for round in 1..=rounds {
        let streams: Vec<u32> = (0..per_round).map(|i| next + 2 * i).collect();
        next += 2 * per_round;
        to.write_all(&streams.iter().flat_map(|&s| get(s)).collect::<Vec<u8>>())
            .await
            .unwrap();
        // Each of the round's is under way (connecting upstream) or refused.
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = round * per_round as usize;
        while connected.load(Ordering::SeqCst) + answered.load(Ordering::SeqCst) < done {
            assert!(
                Instant::now() < deadline,
                "round {round} never got under way"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // RST_STREAM (CANCEL) for each: their places among the open ones are free again.
        let cancel = 8u32.to_be_bytes();
        let resets: Vec<u8> = streams
            .iter()
            .flat_map(|&s| h2_frame(3, 0, s, &cancel))
            .collect();
        to.write_all(&resets).await.unwrap();
    }
    let counts = (
        connected.load(Ordering::SeqCst),
        answered.load(Ordering::SeqCst),
    );
    reading.abort();
    accepting.abort();
    counts
}

/// An HTTP/2 client that takes nothing of an answer (its window at 0), or sends nothing of a
/// body Portcullis reads itself, is not waited on for ever: every answer over HTTP/2 waits on
/// the client's window, the upstream's connection held meanwhile, small answers too.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_takes_or_sends_nothing_is_not_waited_on() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test", SCIM_HOST]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .server("client_idle_timeout", "\"1s\"")
        .route(Route::new("https://app.test", &[&up]))
        .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)]);
    let _px = cfg.start().await;

    // SETTINGS_INITIAL_WINDOW_SIZE 0: no stream may be sent a byte of body.
    let closed_window = h2_frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]);
    let get = |stream: u32, path: &str| {
        // :method GET, :scheme https (static table 2 and 7), then :path and :authority.
        let mut head = vec![0x82, 0x87];
        head.extend(hpack_field(4, path));
        head.extend(hpack_field(1, "app.test"));
        // END_STREAM | END_HEADERS
        h2_frame(1, 0x05, stream, &head)
    };
    let mut tls = raw_http2(&cfg, &ca, "app.test").await;
    // 1: the upstream's answer (small, with its length); 3: an answer of Portcullis' own.
    let frames = [
        H2_PREFACE,
        &closed_window,
        &get(1, "/small"),
        &get(3, "/.portcullis/style.css"),
    ];
    tls.write_all(&frames.concat()).await.unwrap();
    let mut reset = std::collections::BTreeSet::new();
    // RST_STREAM (3), or the connection ended.
    let ended = h2_until(&mut tls, |kind, _, stream| {
        if kind == 3 {
            reset.insert(stream);
        }
        reset.len() == 2
    })
    .await;
    assert!(
        ended,
        "answers an HTTP/2 client takes nothing of were waited on for 30 s (reset: {reset:?})"
    );

    // A SCIM request whose body never comes.
    let mut tls = raw_http2(&cfg, &ca, SCIM_HOST).await;
    let mut head = vec![0x83, 0x87]; // :method POST, :scheme https
    head.extend(hpack_field(4, "/scim/v2/Users"));
    head.extend(hpack_field(1, SCIM_HOST));
    head.extend(hpack_field(23, &format!("Bearer {SCIM_TOKEN}")));
    head.extend(hpack_field(31, "application/scim+json"));
    // END_HEADERS alone: a body is to follow.
    let post = h2_frame(1, 0x04, 1, &head);
    let settings = h2_frame(4, 0, 0, &[]);
    tls.write_all(&[H2_PREFACE, &settings, &post].concat())
        .await
        .unwrap();
    // An answer's HEADERS (1) ending the stream, a reset (3), or the connection ended.
    let answered = h2_until(&mut tls, |kind, flags, stream| {
        stream == 1 && (kind == 3 || (kind == 1 && flags & 0x01 != 0) || kind == 0)
    })
    .await;
    assert!(
        answered,
        "a SCIM request whose body never came was waited on for 30 s"
    );
}

/// An HTTP/2 upload of no stated length that ends with an empty DATA frame (as curl ends
/// `curl --http2 -T -`) reaches an HTTP/1.1 upstream as one chunked body with one last chunk:
/// a second `0\r\n\r\n` after it is a request of its own to the upstream, which Node.js
/// answers 400 before the upload's answer, and which another upstream may read as the start
/// of the next caller's request on that connection.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_upload_ended_by_an_empty_frame_reaches_the_upstream_as_one_body() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let mut uploads = portcullis_tests::raw_upstream::Uploads::start().await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(Route::to_urls("https://app.test", vec![uploads.url()]));
    let _px = cfg.start().await;

    let mut tls = raw_http2(&cfg, &ca, "app.test").await;
    let mut head = vec![0x83, 0x87]; // :method POST, :scheme https
    head.extend(hpack_field(4, "/upload"));
    head.extend(hpack_field(1, "app.test"));
    let frames = [
        H2_PREFACE.to_vec(),
        h2_frame(4, 0, 0, &[]),
        // END_HEADERS alone: a body follows, of no stated length.
        h2_frame(1, 0x04, 1, &head),
        h2_frame(0, 0, 1, b"hello"),
        // An empty DATA frame with END_STREAM.
        h2_frame(0, 0x01, 1, b""),
    ];
    tls.write_all(&frames.concat()).await.unwrap();
    let (head, body) = uploads.next().await;
    assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
    assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n", "{head}");
}

/// A client's trailers reach no upstream, over HTTP/1.1 (after a chunked body's last chunk)
/// or HTTP/2 (a HEADERS frame after the body): an upstream may read them as headers (Go's
/// `net/http` merges them into `Request.Trailer`, some frameworks into the headers), and they
/// would come past every check of the identity headers Portcullis sets. pingora drops them
/// today; this holds that through its upgrades.
#[tokio::test(flavor = "multi_thread")]
async fn trailers_a_client_sends_reach_no_upstream() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let mut uploads = portcullis_tests::raw_upstream::Uploads::start().await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .https_listener(vec![cert])
        .route(Route::to_urls("http://plain.test", vec![uploads.url()]))
        .route(Route::to_urls("https://app.test", vec![uploads.url()]));
    let _px = cfg.start().await;

    let port = cfg.http_addr().port();
    let mut stream = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: plain.test:{port}\r\nTransfer-Encoding: chunked\r\n\
         Trailer: X-Portcullis-User\r\n\r\n5\r\nhello\r\n0\r\n\
         X-Portcullis-User: mallory@corp.test\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = uploads.next().await;
    assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
    assert!(!head.contains("mallory"), "{head}");
    assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n", "{head}");

    let mut tls = raw_http2(&cfg, &ca, "app.test").await;
    let mut head = vec![0x83, 0x87]; // :method POST, :scheme https
    head.extend(hpack_field(4, "/upload"));
    head.extend(hpack_field(1, "app.test"));
    // A literal field with a literal name, not indexed (RFC 7541 §6.2.2).
    let mut trailer = vec![0x00];
    for part in ["x-portcullis-user", "mallory@corp.test"] {
        trailer.push(u8::try_from(part.len()).unwrap());
        trailer.extend(part.as_bytes());
    }
    let frames = [
        H2_PREFACE.to_vec(),
        h2_frame(4, 0, 0, &[]),
        h2_frame(1, 0x04, 1, &head),
        h2_frame(0, 0, 1, b"hello"),
        // The trailers: END_STREAM | END_HEADERS.
        h2_frame(1, 0x05, 1, &trailer),
    ];
    tls.write_all(&frames.concat()).await.unwrap();
    let (head, body) = uploads.next().await;
    assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
    assert!(!head.contains("mallory"), "{head}");
    assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n", "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_is_negotiated_by_alpn_and_http1_still_works() {
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test", "small.test"]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(Route::new("https://app.test", &[&up]))
        .route(Route::new("https://small.test", &[&up]).set("max_request_body_bytes = 1024"))
        .server("max_request_header_bytes", "2048");
    let _px = cfg.start().await;
    let url = cfg.https_url("app.test", "/h2?x=1");

    let h2 = tls_client(&ca);
    for _ in 0..3 {
        let resp = h2.get(&url).send().await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2, "ALPN should pick h2");
        assert_eq!(resp.status(), StatusCode::OK);
        let echo = Echo::parse(&resp.bytes().await.unwrap());
        assert_eq!(echo.uri, "/h2?x=1");
        assert_eq!(echo.header_all("x-forwarded-proto"), vec!["https"]);
    }
    let resp = h2.post(&url).body(vec![7u8; 70_000]).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert_eq!(echo.method, "POST");
    assert_eq!(
        echo.body_len, 70_000,
        "an HTTP/2 request body reaches the upstream whole"
    );

    // Identity headers are stripped on HTTP/2 too (names arrive lower-cased there).
    let resp = h2
        .get(&url)
        .header("x-portcullis-user", "spoof-h2")
        .header("x_portcullis_groups", "spoof-h2-underscore")
        .header("x-ordinary", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert!(
        !echo.headers.iter().any(|(_, v)| v.contains("spoof")),
        "identity headers sent over HTTP/2 reached the upstream: {:?}",
        echo.headers
    );
    assert_eq!(echo.header("x-ordinary"), Some("kept"));

    // The body limit holds on HTTP/2.
    let resp = h2
        .post(cfg.https_url("small.test", "/h2-too-big"))
        .body(vec![1u8; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!up.heads().iter().any(|uri| uri == "/h2-too-big"));

    // So does the head limit.
    let resp = h2
        .get(cfg.https_url("app.test", "/h2-big-head"))
        .header("x-big", "b".repeat(4000))
        .send()
        .await;
    match resp {
        Ok(resp) => {
            assert!(
                (400..500).contains(&resp.status().as_u16()),
                "oversized HTTP/2 head answered {}",
                resp.status()
            );
        }
        // An h2 stream reset is also a refusal; what matters is that it went no further.
        Err(e) => eprintln!("note: oversized HTTP/2 head refused without a status: {e}"),
    }
    assert!(!up.seen().iter().any(|e| e.uri == "/h2-big-head"));

    let h1 = tls_client_http1(&ca);
    let resp = h1.get(&url).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Over TLS, a host no route serves (a browser reusing a connection for another name the
/// certificate covers) is answered 421, so that it asks again on a connection of its own; a
/// path no route of a served host takes is 404.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_a_host_served_elsewhere_is_misdirected_and_a_missing_path_not_found() {
    let ca = TestCa::new();
    let cert = ca.leaf("corp", &["app.test", "other.test"]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(Route::new("https://app.test/v1", &[&up]));
    let _px = cfg.start().await;
    let h2 = tls_client(&ca);
    let status = |url: String| {
        let h2 = h2.clone();
        async move { h2.get(url).send().await.unwrap().status() }
    };
    assert_eq!(
        status(cfg.https_url("other.test", "/v1/x")).await,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert_eq!(
        status(cfg.https_url("app.test", "/elsewhere")).await,
        StatusCode::NOT_FOUND
    );
    assert!(up.seen().is_empty(), "refused, yet sent upstream");
    assert_eq!(
        status(cfg.https_url("app.test", "/v1/x")).await,
        StatusCode::OK
    );
}

/// A raised head limit holds over HTTP/2 as over HTTP/1.1: a head under it (a browser with
/// large cookies) is let in, and one past it gets 431.
#[tokio::test(flavor = "multi_thread")]
async fn a_raised_head_limit_holds_over_http2_too() {
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(Route::new("https://app.test", &[&up]))
        .server("max_request_header_bytes", "200000");
    let px = cfg.start().await;
    let h2 = tls_client(&ca);
    for client in [&h2, &tls_client_http1(&ca)] {
        let resp = client
            .get(cfg.https_url("app.test", "/big-cookies"))
            .header("cookie", format!("big={}", "c".repeat(100_000)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.version());
    }
    let seen = up.seen();
    assert_eq!(seen.iter().filter(|e| e.uri == "/big-cookies").count(), 2);

    let resp = h2
        .get(cfg.https_url("app.test", "/too-big"))
        .header("x-big", "b".repeat(200_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(!up.seen().iter().any(|e| e.uri == "/too-big"));
    // The access log names the host an HTTP/2 request was for (its `:authority`).
    let host = format!("host=\"app.test:{}\"", cfg.https_addr().port());
    px.log_until(|log| {
        log.lines()
            .any(|l| l.contains(" access: ") && l.contains("/too-big") && l.contains(&host))
    })
    .await;
}

/// The head limit counts an HTTP/2 request's host (its `:authority`, as browsers send it, with
/// no `Host`) as HTTP/1 counts its `Host`: a head one byte over the limit gets 431 over both.
#[tokio::test(flavor = "multi_thread")]
async fn the_head_limit_counts_the_host_over_http2_as_over_http1() {
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(Route::new("https://app.test", &[&up]))
        .server("max_request_header_bytes", "4096");
    let _px = cfg.start().await;
    let (h2, h1) = (tls_client(&ca), tls_client_http1(&ca));
    let status = |client: &reqwest::Client, pad: usize| {
        let request = client
            .get(cfg.https_url("app.test", "/page"))
            .header("x-pad", "p".repeat(pad));
        async move {
            let resp = request.send().await.unwrap();
            (resp.version(), resp.status())
        }
    };
    // The least padding that puts an HTTP/1.1 head over the limit.
    let (mut fits, mut over) = (0, 4096);
    assert_eq!(
        status(&h1, over).await.1,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    while over - fits > 1 {
        let mid = (fits + over) / 2;
        match status(&h1, mid).await {
            (_, StatusCode::OK) => fits = mid,
            (_, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE) => over = mid,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        status(&h2, over).await,
        (Version::HTTP_2, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    );
    assert_eq!(status(&h2, fits).await, (Version::HTTP_2, StatusCode::OK));
}

/// A CORS preflight is an `OPTIONS` without a body: one sent over HTTP/2 with a body (DATA
/// frames, no `Content-Length`) or over HTTP/1.1 chunked is no preflight, and needs a caller.
#[tokio::test(flavor = "multi_thread")]
async fn an_options_with_a_body_is_no_cors_preflight_over_http2_or_http1() {
    let ca = TestCa::new();
    let cert = ca.leaf("api", &["api.test"]);
    let up = Upstream::start("api").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(
            Route::new("https://api.test", &[&up])
                .set("accept = [\"bearer\"]")
                .set("allow = { machines = true }")
                .set("cors_preflight = true"),
        )
        .jwt_issuer(portcullis_tests::JwtIssuer::new(
            "https://idp.invalid",
            &["api"],
        ));
    let _px = cfg.start().await;
    let url = cfg.https_url("api.test", "/data");
    let h2 = tls_client(&ca);
    let preflight = || {
        h2.request(reqwest::Method::OPTIONS, &url)
            .header("origin", "https://app.test")
            .header("access-control-request-method", "POST")
    };
    let resp = preflight().send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.count(), 1);
    // The same with a body of unknown length: DATA frames after the headers.
    let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![Ok(b"x=1"), Ok(b"&y=2")];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = preflight().body(body).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Over HTTP/1.1, chunked.
    let h1 = tls_client_http1(&ca);
    let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![Ok(b"x=1")];
    let resp = h1
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.test")
        .header("access-control-request-method", "POST")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(up.count(), 1, "only the preflight reached the upstream");
}

/// Routes that pass callers' bearer tokens on to an upstream anyone on the way could read them
/// from are named at start: over plain HTTP off loopback, and over https without checking the
/// upstream's certificate. One that checks it is not.
#[tokio::test(flavor = "multi_thread")]
async fn passing_tokens_where_anyone_on_the_way_could_read_them_is_warned_of() {
    let route = |from: &str, to: &str, more: &str| {
        Route::to_urls(from, vec![to.to_owned()])
            .set("accept = [\"bearer\"]")
            .set("allow = { machines = true }")
            .set("pass_authorization = true")
            .set(more)
    };
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(route("http://clear.test", "http://192.0.2.1:9", ""))
        .route(route(
            "http://unchecked.test",
            "https://192.0.2.2:9",
            "tls_verify = false",
        ))
        .route(route("http://checked.test", "https://192.0.2.3:9", ""))
        .jwt_issuer(portcullis_tests::JwtIssuer::new(
            "https://idp.invalid",
            &["api"],
        ));
    let px = cfg.start().await;
    let log = px
        .log_until(|log| log.contains("192.0.2.1") && log.contains("192.0.2.2"))
        .await;
    let warned = |upstream: &str| {
        log.lines()
            .any(|line| line.contains("pass_authorization sends") && line.contains(upstream))
    };
    assert!(warned("http://192.0.2.1:9"), "{log}");
    assert!(warned("https://192.0.2.2:9"), "{log}");
    assert!(!warned("https://192.0.2.3:9"), "{log}");
}

/// HTTP/2 hands a field value on with the whitespace around it, which HTTP/1 parsers drop:
/// ` Bearer <token>` is no bearer token to a reader that splits at the first space, and one to
/// an HTTP/1 upstream, which trims it. Portcullis trims such values first, as HTTP/1 would: a
/// token it never verified cannot reach an upstream that takes verified ones.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_header_value_with_whitespace_around_it_is_read_as_http1_reads_it() {
    let ca = TestCa::new();
    let cert = ca.leaf("pass", &["pass.test"]);
    let up = Upstream::start("pass").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(
            Route::new("https://pass.test", &[&up])
                .set("accept = [\"bearer\"]")
                .set("allow = [{ machines = true }, { public = true, paths = [\"/status\"] }]")
                .set("pass_authorization = true"),
        )
        .jwt_issuer(portcullis_tests::JwtIssuer::new(
            "https://idp.invalid",
            &["api"],
        ));
    let _px = cfg.start().await;
    let url = cfg.https_url("pass.test", "/status");
    let forged = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl";
    let h2 = tls_client(&ca);
    let h1 = tls_client_http1(&ca);
    for (client, version) in [(&h2, Version::HTTP_2), (&h1, Version::HTTP_11)] {
        for value in [format!(" Bearer {forged}"), format!("\tBearer {forged} \t")] {
            let resp = client
                .get(&url)
                .header("authorization", &value)
                .header("x-note", " a  b\t")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.version(), version);
            // The token is read, does not verify, and is not passed on; the public path
            // lets the request in as anyone's.
            assert_eq!(resp.status(), StatusCode::OK, "{value:?}");
            let echo = Echo::parse(&resp.bytes().await.unwrap());
            assert_eq!(echo.header("authorization"), None, "{version:?} {value:?}");
            assert_eq!(echo.header("x-note"), Some("a  b"), "{version:?}");
        }
        // A padded Negotiate login is one too: its upstream connection is not pooled for the
        // next caller (IIS keeps the login on the connection).
        let resp = client
            .get(&url)
            .header("authorization", " Negotiate YIIC ")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let echo = Echo::parse(&resp.bytes().await.unwrap());
        assert_eq!(echo.header("connection"), Some("close"), "{version:?}");
    }
}

/// An HTTP/2 request holds at most as many header fields as pingora reads of an HTTP/1 one
/// (256): its size alone would let in ten times as many small ones, and an upstream that keeps
/// the first 2,000 (Node) would drop the identity headers Portcullis sets last.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_request_with_more_fields_than_http1_takes_is_refused() {
    let ca = TestCa::new();
    let cert = ca.leaf("app", &["app.test"]);
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .https_listener(vec![cert])
        .route(Route::new("https://app.test", &[&up]));
    let px = cfg.start().await;
    let h2 = tls_client(&ca);
    let send = |fields: usize| {
        let mut request = h2.get(cfg.https_url("app.test", &format!("/fields-{fields}")));
        for i in 0..fields {
            request = request.header(format!("x-f{i}"), "v");
        }
        request.send()
    };
    // (The test upstream, on hyper, takes 100 fields at most.)
    let resp = send(50).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = send(400).await.unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // A browser's cookies, one field each over HTTP/2 (RFC 9113 §8.2.3), count as the one
    // `Cookie` line HTTP/1 sends (and the upstream gets).
    let mut crumbs = h2.get(cfg.https_url("app.test", "/crumbs"));
    for i in 0..300 {
        crumbs = crumbs.header("cookie", format!("c{i}=v"));
    }
    let resp = crumbs.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    let cookie = echo.header("cookie").unwrap_or_default();
    assert!(
        cookie.starts_with("c0=v; c1=v") && cookie.ends_with("c299=v"),
        "{cookie}"
    );
    // Refused by Portcullis, not by the upstream.
    crate::audit::audit_json_until(&px, &[], |records| {
        crate::audit::of_event(records, "refusal").iter().any(|r| {
            r["path"] == "/fields-400"
                && r["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("more than 256 header fields"))
        })
    })
    .await;
    assert_eq!(up.count(), 2);
}

/// An https upstream is trusted under its route's `tls_ca`, and a connection opened under one
/// CA is never reused where another is trusted: by another route to the same upstream, or by
/// the same route once a reload changed its CA (one no longer trusted, after a compromise).
#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_s_connection_is_reused_only_under_the_ca_it_was_checked_with() {
    let echo = Upstream::start("up").await;
    let (trusted, other) = (TestCa::new(), TestCa::new());
    let leaf = trusted.leaf("up", &["127.0.0.1"]);
    let tls = portcullis_tests::TlsTerminator::start(&leaf, echo.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let (trusted_pem, other_pem) = (dir.path().join("trusted.pem"), dir.path().join("other.pem"));
    std::fs::write(&trusted_pem, trusted.ca_pem()).unwrap();
    std::fs::write(&other_pem, other.ca_pem()).unwrap();
    let upstream = format!("https://127.0.0.1:{}", tls.addr().port());
    let ca = |pem: &std::path::Path| format!("tls_ca = {:?}", pem.display().to_string());
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::to_urls("http://a.test", vec![upstream.clone()]).set(&ca(&trusted_pem)))
        .route(Route::to_urls("http://b.test", vec![upstream]).set(&ca(&other_pem)));
    let px = cfg.start().await;
    let status = |host: &'static str| {
        let url = cfg.http_url(host, "/");
        async move { plain_client().get(&url).send().await.unwrap().status() }
    };
    assert_eq!(
        status("a.test").await,
        StatusCode::OK,
        "under the CA that issued it"
    );
    assert_eq!(
        status("b.test").await,
        StatusCode::BAD_GATEWAY,
        "under another CA, with a.test's connection pooled"
    );
    assert_eq!(status("a.test").await, StatusCode::OK);
    // a.test stops trusting the CA: its pooled connection goes with it.
    let trusting = ca(&trusted_pem);
    px.reload_with("[[routes]]", &trusting, &ca(&other_pem))
        .await;
    assert_eq!(
        status("a.test").await,
        StatusCode::BAD_GATEWAY,
        "after a reload that stopped trusting the CA"
    );
}
