//! Plain HTTP/1.1 proxying: what the client sends reaches the upstream, what the upstream
//! answers reaches the client, and the error statuses when no route or no upstream is there.

use portcullis_tests::client::plain_client;
use portcullis_tests::{free_port, ConfigBuilder, Echo, Portcullis, Route, Upstream};
use reqwest::StatusCode;

use crate::get_echo;

#[tokio::test(flavor = "multi_thread")]
async fn get_reaches_upstream_with_path_and_query() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let client = plain_client();

    let resp = client
        .get(cfg.http_url("app.test", "/hello/world?x=1&y=two"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("x-upstream").map(|v| v.as_bytes()),
        Some(&b"a"[..]),
        "upstream response headers reach the client"
    );
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert_eq!(echo.upstream, "a");
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.uri, "/hello/world?x=1&y=two");
    assert_eq!(echo.body_len, 0);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn methods_and_request_bodies_are_forwarded() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/items");

    let body = vec![b'x'; 5000];
    let resp = client.post(&url).body(body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.body_len, 5000);

    for method in ["PUT", "PATCH", "DELETE", "OPTIONS"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = client.request(m, &url).body("{}").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
        let echo = Echo::parse(&resp.bytes().await.unwrap());
        assert_eq!(echo.method, method);
        assert_eq!(echo.body_len, 2, "{method} body");
    }

    let resp = client.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "HEAD");
    assert_eq!(
        up.seen().last().map(|e| e.method.clone()).as_deref(),
        Some("HEAD")
    );
}

/// `[log] level = "debug"`, as an operator sets it to find a fault: the libraries' own debug
/// lines (pingora prints every head it sends and receives) would write what requests carry.
#[tokio::test(flavor = "multi_thread")]
async fn debug_logging_writes_no_credential_a_request_carries() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let toml = cfg.toml();
    assert!(toml.contains("level = \"info\""), "{toml}");
    let px = Portcullis::start(&toml.replace("level = \"info\"", "level = \"debug\"")).await;
    let (password, cookie) = ("c2VjcmV0LXBhc3N3b3Jk", "cookie-secret-0123456789");
    let resp = plain_client()
        .get(cfg.http_url("app.test", "/debugged"))
        .header("authorization", format!("Basic {password}"))
        .header("cookie", format!("app_session={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo = Echo::parse(&resp.bytes().await.unwrap());
    assert!(
        echo.headers.iter().any(|(_, v)| v.contains(cookie)),
        "the upstream's own cookie reaches it: {:?}",
        echo.headers
    );
    // The access line comes after every line the request made. (Without the ceiling on the
    // libraries' lines, pingora's would have named both: tried.)
    let log = px.log_until(|log| log.contains("path=/debugged")).await;
    for secret in [password, cookie] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// An upstream answer pingora cannot parse fails the request with 502, and the log says so
/// without the answer's bytes: pingora's own line quotes the whole head it read, a session
/// cookie it sets or a token in its `Location` (PHP's `header()` lets a control character
/// through, which the parser refuses).
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_answer_that_does_not_parse_is_logged_without_its_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = "HTTP/1.1 302 Found\r\nSet-Cookie: app_session=s3cret-cookie\r\n\
                              Location: /\x01\r\nContent-Length: 0\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let cfg = ConfigBuilder::new().http_listener().route(Route::to_urls(
        "http://app.test",
        vec![format!("http://{at}")],
    ));
    let px = cfg.start().await;
    let resp = plain_client()
        .get(cfg.http_url("app.test", "/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let log = px
        .log_until(|log| log.contains(" access: ") && log.contains("path=/login"))
        .await;
    assert!(
        log.contains(&format!(
            "Fail to proxy: upstream {at}: Upstream InvalidHTTPHeader"
        )),
        "the failure is logged, with its upstream:\n{log}"
    );
    assert!(
        !log.contains("s3cret-cookie"),
        "the upstream's answer reached the log:\n{log}"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_host_is_404() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]));
    let _px = cfg.start().await;
    let client = plain_client();

    for url in [
        cfg.http_url("other.test", "/"),
        cfg.http_url("app.test.evil", "/"),
        cfg.http_url("sub.app.test", "/x"),
    ] {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{url}");
    }
    assert_eq!(up.count(), 0, "no request reached the upstream");
    // The known host still works, so the 404s are about routing, not a dead proxy.
    get_echo(&client, &cfg.http_url("app.test", "/")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn all_upstreams_down_is_502_with_html_page() {
    // Stopped below: on ports the kernel hands no other test meanwhile.
    let loopback = || std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut a = Upstream::start_on("a", loopback()).await;
    let mut b = Upstream::start_on("b", loopback()).await;
    let nothing = format!("http://127.0.0.1:{}", free_port());
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]).set("connect_timeout = \"1s\""))
        .route(Route::to_urls("http://never.test", vec![nothing]).set("connect_timeout = \"1s\""));
    let px = cfg.start().await;
    let client = plain_client();
    get_echo(&client, &cfg.http_url("app.test", "/")).await;

    a.stop().await;
    b.stop().await;
    // A query may carry what must never be logged (a sign-in's code, a client's token).
    let query = "?access_token=secret-in-the-query";
    for url in [
        cfg.http_url("app.test", &format!("/down{query}")),
        cfg.http_url("never.test", &format!("/down{query}")),
    ] {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{url}");
        // The connection is closed after the page, and the page says so.
        assert_eq!(
            resp.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{url}"
        );
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp.text().await.unwrap();
        assert!(
            content_type.starts_with("text/html"),
            "{url}: 502 content-type is {content_type:?}"
        );
        assert!(
            body.to_ascii_lowercase().contains("<html") && body.len() < 4096,
            "{url}: 502 body is not a short HTML page: {body:?}"
        );
    }
    // The failures are logged (in the line that replaces pingora's), without the query: read once
    // both requests' access lines are there, the last lines they made.
    let both = |log: &str| {
        let access = |l: &&str| l.contains(" access: ") && l.contains("path=/down");
        log.lines().filter(access).count() == 2
    };
    let log = px.log_until(both).await;
    assert!(log.contains("GET /down"), "{log}");
    assert!(
        !log.contains("secret-in-the-query"),
        "a query reached the log:\n{log}"
    );
}
