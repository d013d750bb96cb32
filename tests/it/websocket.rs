//! Websocket upgrades: passed through on routes with `websockets = true`, not on others.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use portcullis_tests::{ConfigBuilder, Route, Upstream};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const STEP: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_proxy() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        // A bound on request bodies, not on what a websocket carries after the upgrade: the
        // frames below are 25 times as much.
        .route(
            Route::new("http://ws.test", &[&up])
                .websockets(true)
                .set("max_request_body_bytes = 4096"),
        );
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    let mut request = format!("ws://ws.test:{port}/ws")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-portcullis-user", HeaderValue::from_static("spoof-ws"));
    // A login that holds for its connection (SignalR on IIS with Windows authentication): the
    // handshake still says it upgrades, as the upstream checks.
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_static("Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag"),
    );
    let stream = TcpStream::connect(cfg.http_addr()).await.unwrap();
    let (mut ws, resp) = timeout(STEP, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);

    let messages = [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text("x".repeat(100_000)),
    ];
    for msg in messages {
        timeout(STEP, ws.send(msg.clone()))
            .await
            .expect("send timed out")
            .unwrap();
        let echoed = timeout(STEP, ws.next())
            .await
            .expect("echo timed out")
            .expect("stream ended")
            .unwrap();
        assert_eq!(echoed, msg);
    }
    let _ = timeout(STEP, ws.close(None)).await;

    let handshake = up.seen();
    assert_eq!(
        handshake.len(),
        1,
        "one upgrade request reached the upstream"
    );
    assert!(
        !handshake[0]
            .headers
            .iter()
            .any(|(_, v)| v.contains("spoof")),
        "an identity header on the websocket handshake reached the upstream: {:?}",
        handshake[0].headers
    );
    let connection = handshake[0].header("connection").unwrap_or_default();
    assert!(
        connection.to_ascii_lowercase().contains("upgrade"),
        "Connection: {connection}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_is_refused_when_disabled() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://nows.test", &[&up]).websockets(false))
        .route(Route::new("http://default.test", &[&up]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    for host in ["nows.test", "default.test"] {
        let stream = TcpStream::connect(cfg.http_addr()).await.unwrap();
        let result = timeout(
            STEP,
            tokio_tungstenite::client_async(format!("ws://{host}:{port}/ws"), stream),
        )
        .await
        .expect("websocket handshake timed out");
        match result {
            Ok((_, resp)) => panic!(
                "{host}: websocket upgraded ({}) on a route without websockets",
                resp.status()
            ),
            Err(e) => {
                // Either refused by the proxy or forwarded without Upgrade; never switched.
                if let tokio_tungstenite::tungstenite::Error::Http(resp) = &e {
                    assert_ne!(resp.status(), 101, "{host}");
                }
            }
        }
    }
    for echo in up.seen() {
        assert!(
            echo.header("upgrade").is_none(),
            "the upstream saw an Upgrade header on a route without websockets: {:?}",
            echo.headers
        );
    }
}

/// A request that offers an upgrade (`curl --http2` on `http:` asks for `h2c`) on a route
/// without websockets is an ordinary request: answered in full however long the upstream
/// takes, not cut as a websocket its route does not take.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_offered_on_a_route_without_websockets_is_an_ordinary_request() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://nows.test", &[&up]).websockets(false));
    let _px = cfg.start().await;
    // Past at least one turn of the second, when open connections are judged again.
    let resp = crate::signin::bare_client()
        .get(cfg.http_url("nows.test", "/slow?ms=2500"))
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .send()
        .await
        .expect("an answer");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("the whole body");
    assert!(body.contains("/slow?ms=2500"), "{body}");
}

/// After a 101 every byte goes through unjudged: an upstream handler that answers 101 without
/// accepting the websocket (a status echo, say) must not turn the rest of the connection into
/// requests Portcullis never sees, with identity headers of the client's choosing.
#[tokio::test(flavor = "multi_thread")]
async fn a_101_that_does_not_accept_the_websocket_opens_no_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://ws.test", &[&up]).websockets(true));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    let mut stream = TcpStream::connect(cfg.http_addr()).await.unwrap();
    let requests = format!(
        "GET /switch HTTP/1.1\r\nHost: ws.test:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n\
         GET /admin HTTP/1.1\r\nHost: ws.test\r\nX-Portcullis-User: admin@corp.test\r\n\r\n"
    );
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the status line is in (or the proxy closes).
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match timeout(STEP, stream.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => answer.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!("no answer to the upgrade"),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    // No tunnel: the bytes after the upgrade request never reached the upstream.
    assert!(up.ws_received().is_empty(), "{:?}", up.ws_received());
}

/// A websocket let in by a public rule, with no caller, is judged again on a reload as any
/// other: once the rule no longer lets anyone in there, it ends, and the closing is audited.
#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_websocket_ends_when_a_reload_takes_its_public_rule_away() {
    let up = Upstream::start("a").await;
    let route = |allow: &str| {
        Route::new("http://open.test", &[&up])
            .websockets(true)
            .accept(&["public"])
            .set(&format!("allow = {allow}"))
    };
    let cfg = ConfigBuilder::new().http_listener();
    let open = cfg.clone().route(route("{ public = true }"));
    let px = open.start().await;
    let mut ws = portcullis_tests::client::websocket(
        cfg.http_addr(),
        "open.test",
        "/ws",
        ("x-request", "anonymous"),
    )
    .await;
    // A reload that has nothing to do with it keeps it open.
    px.rewrite_config(&open.toml().replace("[[routes]]", "# kept\n[[routes]]"));
    px.reload_and_wait().await;
    assert!(
        !portcullis_tests::client::closed_within(&mut ws, Duration::from_secs(2)).await,
        "closed by a reload that changed nothing for it"
    );
    let closed = cfg
        .clone()
        .route(route("{ public = true, paths = [\"/status\"] }"));
    px.rewrite_config(&closed.toml());
    px.reload();
    assert!(
        portcullis_tests::client::closed_within(&mut ws, Duration::from_secs(15)).await,
        "the websocket stayed open after its public rule was taken away"
    );
    let audit = px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.contains("open connection closed")
        })
        .await;
    assert!(audit.contains("anonymous"), "{audit}");
}

/// A plain streaming answer let in by a public rule (a log tail, an NDJSON feed: no
/// `Accept: text/event-stream`) ends at its next chunk once a reload takes that rule away, as
/// a websocket or an event stream does.
#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_plain_stream_ends_when_a_reload_takes_its_public_rule_away() {
    let up = Upstream::start("a").await;
    let route = |allow: &str| {
        Route::new("http://open.test", &[&up])
            .accept(&["public"])
            .set(&format!("allow = {allow}"))
    };
    let cfg = ConfigBuilder::new().http_listener();
    let px = cfg.clone().route(route("{ public = true }")).start().await;
    // One line every 20 ms for 20 s.
    let mut resp = portcullis_tests::client::plain_client()
        .get(format!("http://{}/stream-ticks", cfg.http_addr()))
        .header("host", "open.test")
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let first = timeout(STEP, resp.chunk()).await.expect("a tick arrives");
    assert!(matches!(first, Ok(Some(_))), "{first:?}");

    let closed = cfg
        .clone()
        .route(route("{ public = true, paths = [\"/status\"] }"));
    px.rewrite_config(&closed.toml());
    px.reload_and_wait().await;
    let ended = timeout(STEP, async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => {}
                Ok(None) => return "completed",
                Err(_) => return "cut",
            }
        }
    })
    .await;
    assert_eq!(
        ended,
        Ok("cut"),
        "the stream went on after its public rule was taken away"
    );
}

/// A websocket whose upstream sends nothing for the route's `read_timeout` ends, as the README
/// says: an idle stream needs pings, or a longer `read_timeout` on its route.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_whose_upstream_is_silent_for_the_read_timeout_ends() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::new("http://ws.test", &[&up])
            .websockets(true)
            .set("read_timeout = \"2s\""),
    );
    let _px = cfg.start().await;
    let mut ws =
        portcullis_tests::client::websocket(cfg.http_addr(), "ws.test", "/ws", ("x-test", "1"))
            .await;
    // Before the last frame Portcullis forwards: its timer starts later, whenever this test
    // gets to read the echo on a loaded machine.
    let idle = std::time::Instant::now();
    timeout(STEP, ws.send(Message::text("hello")))
        .await
        .expect("send timed out")
        .unwrap();
    let echoed = timeout(STEP, ws.next()).await.expect("echo timed out");
    assert!(matches!(echoed, Some(Ok(Message::Text(_)))), "{echoed:?}");
    assert!(
        portcullis_tests::client::closed_within(&mut ws, Duration::from_secs(30)).await,
        "still open 30 s into a 2 s read_timeout"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(1500),
        "ended after {:?}, before the read_timeout",
        idle.elapsed()
    );
}

/// A websocket silent both ways lasts its route's `read_timeout` (a browser sends no pings):
/// not a minute, pingora's own bound on a client's body.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_silent_both_ways_lasts_its_route_s_read_timeout() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::new("http://ws.test", &[&up])
            .websockets(true)
            .set("read_timeout = \"3m\""),
    );
    let _px = cfg.start().await;
    let mut ws =
        portcullis_tests::client::websocket(cfg.http_addr(), "ws.test", "/ws", ("x-test", "1"))
            .await;
    assert!(
        !portcullis_tests::client::closed_within(&mut ws, Duration::from_secs(65)).await,
        "closed within 65 s of silence, with a read_timeout of 3 minutes"
    );
    timeout(STEP, ws.send(Message::text("still here")))
        .await
        .expect("send timed out")
        .unwrap();
    let echoed = timeout(STEP, ws.next()).await.expect("echo timed out");
    assert!(matches!(echoed, Some(Ok(Message::Text(_)))), "{echoed:?}");
}

/// An event stream's upstream connection is not pooled (`Connection: close`): the stream
/// watcher may shut its socket down until the request is over, which is after pingora has
/// pooled the connection, and the next request on it would be someone else's. Other requests'
/// connections are pooled as before.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_s_upstream_connection_is_not_pooled() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let client = portcullis_tests::client::plain_client();
    let told = |accept: &'static str| {
        let request = client
            .get(cfg.http_url("app.test", "/events"))
            .header("accept", accept);
        async move {
            let resp = request.send().await.expect("an answer");
            assert_eq!(resp.status(), 200);
            let echo = portcullis_tests::Echo::parse(&resp.bytes().await.unwrap());
            echo.header("connection").map(str::to_owned)
        }
    };
    assert_eq!(told("text/event-stream").await.as_deref(), Some("close"));
    assert_ne!(told("application/json").await.as_deref(), Some("close"));
}

/// A websocket that fails after its upgrade (its upstream silent past the route's
/// `read_timeout`) is closed: no error page is written into it, as if it were still HTTP.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_that_fails_after_its_upgrade_gets_no_error_page_inside_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new().http_listener().route(
        Route::new("http://ws.test", &[&up])
            .websockets(true)
            .set("read_timeout = \"1s\""),
    );
    let _px = cfg.start().await;
    let mut stream = TcpStream::connect(cfg.http_addr()).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: ws.test:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        cfg.http_addr().port()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    // Closed (cut or ended): a read that ends, whatever it read.
    let _ = timeout(Duration::from_secs(30), stream.read_to_end(&mut received))
        .await
        .expect("the websocket was not closed within 30 s");
    let received = String::from_utf8_lossy(&received);
    let (switched, after) = received
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {received:?}"));
    assert!(switched.starts_with("HTTP/1.1 101"), "{switched}");
    assert!(
        !after.contains("HTTP/1.1") && !after.contains("<html"),
        "an error page inside the websocket: {after:?}"
    );
}

/// A page's request, then its websocket to the same upstream (a browser's every visit): the
/// websocket is not torn down as it opens. Over the request's pooled connection, pingora 0.9
/// ended it at once whenever it read the upstream's 101 before the handshake's empty body had
/// gone (cloudflare/pingora#946); each handshake takes a connection of its own. A race: each
/// round lost it a fifth of the time or so on a loaded machine, so twenty rounds.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_opened_after_a_request_to_its_upstream_stays_open() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://ws.test", &[&up]).websockets(true));
    let _px = cfg.start().await;
    let client = portcullis_tests::client::plain_client();
    for round in 0..20 {
        let page = cfg.http_url("ws.test", "/page");
        let resp = client.get(&page).send().await.unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        resp.bytes().await.unwrap();
        let mut ws = portcullis_tests::client::websocket(
            cfg.http_addr(),
            "ws.test",
            "/ws",
            ("x-round", "1"),
        )
        .await;
        timeout(STEP, ws.send(Message::text(format!("round {round}"))))
            .await
            .expect("send timed out")
            .unwrap();
        let echoed = timeout(STEP, ws.next()).await.expect("echo timed out");
        assert!(
            matches!(&echoed, Some(Ok(m)) if *m == Message::text(format!("round {round}"))),
            "round {round}: {echoed:?}"
        );
    }
}
