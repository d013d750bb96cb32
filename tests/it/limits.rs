//! Size limits on untrusted input: request bodies (per route and server-wide, with
//! Content-Length and chunked) and request heads.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use portcullis_tests::client::{chunked, read_response_head};
use portcullis_tests::{raw_request, ConfigBuilder, Echo, Portcullis, Route, Upstream};

use crate::audit::{audit_json_until, of_event};

fn post_with_length(host: &str, path: &str, len: usize) -> Vec<u8> {
    post_saying_length(host, path, &len.to_string(), len)
}

/// A POST of `len` bytes whose `Content-Length` says `says`.
fn post_saying_length(host: &str, path: &str, says: &str, len: usize) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {says}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(b'a', len));
    req
}

fn post_chunked(host: &str, path: &str, len: usize) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend(chunked(&vec![b'a'; len], 256));
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_are_413() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("max_request_body_bytes", "4096")
        .route(Route::new("http://small.test", &[&up]).set("max_request_body_bytes = 1024"))
        .route(Route::new("http://big.test", &[&up]));
    let px = cfg.start().await;
    let port = cfg.http_addr().port();
    let small = format!("small.test:{port}");
    let big = format!("big.test:{port}");

    // (request, expected status, what it is)
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            post_with_length(&small, "/ok-cl", 1000),
            200,
            "route limit, under, Content-Length",
        ),
        (
            post_with_length(&small, "/ok-cl-exact", 1024),
            200,
            "route limit, exact, Content-Length",
        ),
        (
            post_with_length(&small, "/over-cl", 2048),
            413,
            "route limit, over, Content-Length",
        ),
        // One length said twice (RFC 9110 §8.6), as pingora reads it.
        (
            post_saying_length(&small, "/over-cl-list", "2048, 2048", 2048),
            413,
            "route limit, over, a Content-Length list",
        ),
        (
            post_saying_length(&small, "/ok-cl-list", "1000,1000", 1000),
            200,
            "route limit, under, a Content-Length list",
        ),
        (
            post_chunked(&small, "/ok-chunked", 1000),
            200,
            "route limit, under, chunked",
        ),
        (
            post_chunked(&small, "/over-chunked", 2048),
            413,
            "route limit, over, chunked",
        ),
        (
            post_with_length(&big, "/ok-server", 4000),
            200,
            "server limit, under, Content-Length",
        ),
        (
            post_with_length(&big, "/over-server", 5000),
            413,
            "server limit, over, Content-Length",
        ),
        (
            post_chunked(&big, "/over-server-chunked", 8192),
            413,
            "server limit, over, chunked",
        ),
    ];
    for (req, expected, what) in cases {
        let resp = raw_request(cfg.http_addr(), &req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status, expected, "{what}: {}", resp.body_text());
        if expected == 200 {
            Echo::parse(&resp.body);
        }
    }
    let bodies: Vec<(String, u64)> = up.seen().into_iter().map(|e| (e.uri, e.body_len)).collect();
    assert!(
        bodies.contains(&("/ok-cl".to_owned(), 1000))
            && bodies.contains(&("/ok-cl-list".to_owned(), 1000))
            && bodies.contains(&("/ok-chunked".to_owned(), 1000))
            && bodies.contains(&("/ok-server".to_owned(), 4000)),
        "accepted bodies reach the upstream whole: {bodies:?}"
    );
    // Not even its head: an upstream may act on that alone (begin an upload).
    let heads = up.heads();
    assert!(
        !heads
            .iter()
            .any(|uri| ["/over-cl", "/over-cl-list", "/over-server"].contains(&uri.as_str())),
        "a body refused by its Content-Length must not reach the upstream: {heads:?}"
    );
    // Each refusal is audited, whether the length was said or counted.
    let over = [
        "/over-cl",
        "/over-cl-list",
        "/over-chunked",
        "/over-server",
        "/over-server-chunked",
    ];
    let refused_paths = |records: &[serde_json::Value]| -> Vec<String> {
        let mut paths: Vec<String> = of_event(records, "refusal")
            .iter()
            .filter(|r| {
                r["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("larger than the route takes"))
            })
            .filter_map(|r| r["path"].as_str().map(str::to_owned))
            .collect();
        paths.sort();
        paths
    };
    let mut expected: Vec<String> = over.iter().map(|p| p.to_string()).collect();
    expected.sort();
    let records = audit_json_until(&px, &[], |r| refused_paths(r).len() >= over.len()).await;
    assert_eq!(refused_paths(&records), expected);
    // Refused by the length said before the body was read, or counted as it came.
    for refusal in of_event(&records, "refusal") {
        let (Some(path), Some(reason)) = (refusal["path"].as_str(), refusal["reason"].as_str())
        else {
            continue;
        };
        let said = ["/over-cl", "/over-cl-list", "/over-server"].contains(&path);
        let how = if said {
            "said by its Content-Length"
        } else {
            "as it was sent"
        };
        if over.contains(&path) {
            assert!(reason.contains(how), "{path}: {reason}");
        }
    }
}

/// Portcullis with one route, `small.test`, that takes bodies of 1 KiB at most; and its upstream.
async fn small_bodies_only() -> (ConfigBuilder, Portcullis, Upstream) {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://small.test", &[&up]).set("max_request_body_bytes = 1024"));
    let px = cfg.start().await;
    (cfg, px, up)
}

/// A client that waits for `100 Continue` before its body (curl does, for a large upload) and
/// then sends too much gets the 413, not a connection closed without an answer.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_sent_after_100_continue_is_answered_413() {
    let (cfg, _px, _up) = small_bodies_only().await;
    let port = cfg.http_addr().port();
    let mut stream = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: small.test:{port}\r\nExpect: 100-continue\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = read_response_head(&mut stream, Duration::from_secs(10)).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    let _ = stream.write_all(&chunked(&[b'a'; 2048], 256)).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 413"),
        "after 100 Continue: {rest:?}"
    );
}

/// A client still uploading a body too large (a browser, which asks no `100 Continue`) reads
/// its 413 and then the connection's end, and its upload is not cut: the rest of its body is
/// read and dropped while it keeps coming before the connection closes (closed with it unread,
/// the socket would answer the rest with a reset, which Windows lets erase the 413 before it
/// is read). Both ways Portcullis finds a body too large: by its length, and counting a
/// chunked one.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_still_uploading_reads_its_413_and_a_clean_close() {
    const BODY: usize = 1 << 20;
    let (cfg, _px, _up) = small_bodies_only().await;
    let port = cfg.http_addr().port();
    let host = format!("small.test:{port}");
    for (how, request) in [
        ("by its length", post_with_length(&host, "/upload", BODY)),
        ("chunked", post_chunked(&host, "/upload", BODY)),
    ] {
        let stream = tokio::net::TcpStream::connect(cfg.http_addr())
            .await
            .unwrap();
        let (mut reading, mut writing) = stream.into_split();
        let upload = tokio::spawn(async move {
            // As a browser on a network sends it: in pieces, still coming after the 413. Into a
            // connection closed at once, the second piece after the close fails.
            // Over 3 s in all (nginx lingers 30 s; a piece at least every 2 s keeps it reading).
            for piece in request.chunks(BODY / 8) {
                writing.write_all(piece).await?;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Ok::<_, std::io::Error>(writing)
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), reading.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{how}: the connection was not closed"));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "{how}: {text:?}");
        assert!(
            read.is_ok(),
            "{how}: the connection was reset after the 413: {read:?}"
        );
        let uploaded = upload.await.unwrap();
        assert!(uploaded.is_ok(), "{how}: the upload was cut: {uploaded:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_head_is_refused() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("max_request_header_bytes", "1024")
        .route(Route::new("http://app.test", &[&up]));
    let px = cfg.start().await;
    let port = cfg.http_addr().port();

    let ok = format!(
        "GET /small-head HTTP/1.1\r\nHost: app.test:{port}\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "p".repeat(200)
    );
    let resp = raw_request(cfg.http_addr(), ok.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    for (what, req) in [
        (
            "one large header",
            format!(
                "GET /large-head HTTP/1.1\r\nHost: app.test:{port}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
                "b".repeat(4000)
            ),
        ),
        (
            "many headers",
            format!(
                "GET /large-head HTTP/1.1\r\nHost: app.test:{port}\r\n{}Connection: close\r\n\r\n",
                (0..100)
                    .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(40)))
                    .collect::<String>()
            ),
        ),
        (
            "long request line",
            format!(
                "GET /large-head?{} HTTP/1.1\r\nHost: app.test:{port}\r\nConnection: close\r\n\r\n",
                "q".repeat(4000)
            ),
        ),
    ] {
        let resp = raw_request(cfg.http_addr(), req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{what}: no HTTP error status: {e}"));
        // Each is far within pingora's own bounds (1 MiB, 256 fields): Portcullis' to refuse.
        assert_eq!(resp.status, 431, "{what}");
    }
    let uris: Vec<String> = up.seen().into_iter().map(|e| e.uri).collect();
    assert!(
        !uris.iter().any(|u| u.starts_with("/large-head")),
        "an oversized head reached the upstream: {uris:?}"
    );
    // Each is audited.
    let head_refusals = |records: &[serde_json::Value]| {
        of_event(records, "refusal")
            .iter()
            .filter(|r| {
                r["path"] == "/large-head"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("its head is larger than 1024 bytes"))
            })
            .count()
    };
    audit_json_until(&px, &[], |r| head_refusals(r) == 3).await;
}

/// A head refused for its size leaves a log line of bounded size: its path and host are cut,
/// as pingora reads heads of up to 1 MiB, each of which would otherwise be one line.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_head_leaves_a_short_access_log_line() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("max_request_header_bytes", "1024")
        .route(Route::new("http://app.test", &[&up]));
    let px = cfg.start().await;
    let port = cfg.http_addr().port();
    let path = format!("/long-path/{}", "a".repeat(8_000));
    let host = format!("{}.app.test:{port}", "h".repeat(50_000));
    for (what, req) in [
        (
            "a long path",
            format!("GET {path} HTTP/1.1\r\nHost: app.test:{port}\r\nConnection: close\r\n\r\n"),
        ),
        (
            "a long host",
            format!("GET /long-host HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        ),
        (
            "a long method",
            format!(
                "{} /long-method HTTP/1.1\r\nHost: app.test:{port}\r\nConnection: close\r\n\r\n",
                "M".repeat(8_000)
            ),
        ),
    ] {
        let resp = raw_request(cfg.http_addr(), req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{what}: no HTTP error status: {e}"));
        assert!((400..500).contains(&resp.status), "{what}: {}", resp.status);
    }
    let log = px
        .log_until(|log| {
            let access = |mark: &str| {
                log.lines()
                    .any(|l| l.contains(" access: ") && l.contains(mark))
            };
            access("/long-path/") && access("/long-host") && access("/long-method")
        })
        .await;
    for line in log.lines().filter(|l| l.contains("/long-")) {
        assert!(line.len() < 4096, "a log line of {} bytes", line.len());
    }
}

/// Reads `stream` until it ends (or `limit` passes): how many bytes came, and whether it ended.
async fn read_to_end_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> (usize, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
            Err(_) => return (total, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_connections_that_sit_idle_or_read_nothing_are_closed() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("client_idle_timeout", "\"1s\"")
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let host = format!("app.test:{}", cfg.http_addr().port());

    // A kept-alive connection, idle after its answer: closed (pingora's default keeps it for
    // ever, and every such connection holds a file descriptor).
    let mut idle = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    let request = format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n");
    idle.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = idle.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    let (_, ended) = read_to_end_within(&mut idle, Duration::from_secs(20)).await;
    assert!(ended, "an idle kept-alive connection was not closed");

    // A client that asks for a large answer and reads none of it: dropped, not waited on.
    const MB: usize = 64;
    let mut stalled = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    let request = format!("GET /big?mb={MB} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.unwrap();
    // Every buffer on the way fills, then the proxy's write waits on the client.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (read, ended) = read_to_end_within(&mut stalled, Duration::from_secs(60)).await;
    assert!(
        ended,
        "the stalled connection was neither closed nor finished"
    );
    assert!(
        read < MB << 20,
        "the whole answer ({read} bytes) waited for a client that read nothing"
    );
}

/// A request pingora sends again (its pooled upstream connection closed as the request went
/// out, the keep-alive race) has its body counted once: a body within the limit is not
/// refused for being counted twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_again_on_a_new_upstream_connection_is_counted_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // An upstream that answers the first request on each connection, and reads the second
    // (head and 600-byte body) and closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (answered, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, closed) = (answered.clone(), dropped.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let (counted, closed) = (counted.clone(), closed.clone());
            tokio::spawn(async move {
                for nth in 0.. {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    // A head, then its 600-byte body.
                    loop {
                        let end = seen.windows(4).position(|w| w == b"\r\n\r\n");
                        if end.is_some_and(|end| seen.len() >= end + 4 + 600) {
                            break;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    if nth == 1 {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::to_urls("http://small.test", vec![format!("http://{addr}")])
            .set("max_request_body_bytes = 1000"),
    );
    let _px = cfg.start().await;
    let host = format!("small.test:{}", cfg.http_addr().port());
    // Until one goes out on a pooled connection (pingora pools the first's connection a
    // moment after answering it), which closes on it: that one is sent again. At most 20.
    let mut sent = 0;
    while dropped.load(Ordering::SeqCst) == 0 && sent < 20 {
        let put = post_with_length(&host, "/item", 600);
        let put = [b"PUT".as_slice(), &put[4..]].concat();
        let resp = raw_request(cfg.http_addr(), &put).await.unwrap();
        assert_eq!(resp.status, 200, "PUT {sent}: {}", resp.body_text());
        sent += 1;
    }
    // Once at least; twice when two connections were pooled, both at their second request
    // (the second request of the test came before the first's connection was pooled): the
    // body then went out three times, and was counted once each time.
    assert!(
        dropped.load(Ordering::SeqCst) >= 1,
        "the race was not run in {sent} requests"
    );
    assert_eq!(answered.load(Ordering::SeqCst), sent);
    server.abort();
}

/// An upstream that stops taking a request body (here: it reads the head and nothing more)
/// holds the request no longer than the route's `read_timeout`: the client gets a 504, as it
/// does from an upstream that stops answering.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_stops_taking_the_body_is_answered_504_within_the_read_timeout() {
    // A small receive buffer: the body cannot all sit in the kernel's buffers, however large
    // the host lets them grow.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            // Kept open, never read again.
            held.push(stream);
        }
    });
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::to_urls("http://slow.test", vec![format!("http://{addr}")])
            .set("read_timeout = \"1s\"")
            .set("max_request_body_bytes = 67108864"),
    );
    let _px = cfg.start().await;
    let host = format!("slow.test:{}", cfg.http_addr().port());
    let mut stream = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    const BODY: usize = 32 << 20;
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {BODY}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // The body goes as fast as Portcullis takes it, until it stops taking it.
    let _sending = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..BODY / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), reader.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer 20 s into a 1 s read_timeout"),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    // The write times out, then the answer is waited for: two read timeouts, and room.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
}
