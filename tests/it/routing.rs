//! Route selection: host (case-insensitive, port ignored) and longest path prefix at a segment
//! boundary.

use portcullis_tests::client::plain_client;
use portcullis_tests::{raw_request, ConfigBuilder, Echo, Route, Upstream};
use reqwest::StatusCode;

use crate::get_echo;

#[tokio::test(flavor = "multi_thread")]
async fn longest_prefix_wins_at_segment_boundaries() {
    let root = Upstream::start("root").await;
    let v1 = Upstream::start("v1").await;
    let admin = Upstream::start("admin").await;
    let api = Upstream::start("api").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        // Declared shortest-last on purpose: order in the file must not matter.
        .route(Route::new("http://app.test/v1/admin", &[&admin]))
        .route(Route::new("http://app.test", &[&root]))
        .route(Route::new("http://app.test/v1", &[&v1]))
        .route(Route::new("http://api.test/v1", &[&api]));
    let _px = cfg.start().await;
    let client = plain_client();

    let cases: &[(&str, &str, Option<&str>)] = &[
        ("app.test", "/", Some("root")),
        ("app.test", "/other", Some("root")),
        ("app.test", "/v1", Some("v1")),
        ("app.test", "/v1/", Some("v1")),
        ("app.test", "/v1/users?id=3", Some("v1")),
        ("app.test", "/v1?q=1", Some("v1")),
        ("app.test", "/v1x", Some("root")),
        ("app.test", "/v10/a", Some("root")),
        ("app.test", "/v1/admin", Some("admin")),
        ("app.test", "/v1/admin/users", Some("admin")),
        ("app.test", "/v1/adminx", Some("v1")),
        ("api.test", "/v1/x", Some("api")),
        ("api.test", "/v1", Some("api")),
        ("api.test", "/v1x", None),
        ("api.test", "/", None),
        ("api.test", "/v2/x", None),
    ];
    for (host, path, expected) in cases {
        let url = cfg.http_url(host, path);
        let resp = client.get(&url).send().await.unwrap();
        match expected {
            Some(name) => {
                assert_eq!(resp.status(), StatusCode::OK, "{url}");
                let echo = Echo::parse(&resp.bytes().await.unwrap());
                assert_eq!(&echo.upstream, name, "{url}");
                assert_eq!(echo.uri, *path, "{url}: the path is forwarded unchanged");
            }
            None => assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{url}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_matching_ignores_case_and_port() {
    let up = Upstream::start("a").await;
    let mixed = Upstream::start("mixed").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&up]))
        // The host in `from` is lower-cased by the config.
        .route(Route::new("http://Mixed.Test", &[&mixed]))
        // An IPv6 literal, in any of its spellings, is the one a `Host` header carries.
        .route(Route::new("http://[0:0::1]", &[&mixed]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    let cases = [
        (format!("APP.TEST:{port}"), "a"),
        (format!("App.Test:{port}"), "a"),
        ("app.test".to_owned(), "a"),
        ("app.test:1".to_owned(), "a"),
        (format!("mixed.test:{port}"), "mixed"),
        (format!("MIXED.test:{port}"), "mixed"),
        (format!("[::1]:{port}"), "mixed"),
        ("[::1]".to_owned(), "mixed"),
        ("[0:0:0::1]".to_owned(), "mixed"),
    ];
    for (host, expected) in cases {
        let req = format!("GET /case HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let resp = raw_request(cfg.http_addr(), req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("Host {host}: {e}"));
        assert_eq!(resp.status, 200, "Host {host}: {}", resp.body_text());
        assert_eq!(Echo::parse(&resp.body).upstream, expected, "Host {host}");
    }
    // An absolute target (as pingora takes one: as Host spells it) with an address in
    // another spelling than the route's.
    let req = format!(
        "GET http://[0::1]:{port}/case HTTP/1.1\r\nHost: [0::1]:{port}\r\nConnection: close\r\n\r\n"
    );
    let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 200, "absolute target: {}", resp.body_text());
    // An HTTP/1.0 request may have no Host: an absolute target's host is the one it asks for
    // (RFC 9112 §3.2.2), told upstream as any Host is. Not a URL in an origin-form target's
    // query, though: without a Host, that request names no host.
    let req = format!("GET http://App.Test:{port}/case?q HTTP/1.0\r\n\r\n");
    let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
    assert_eq!(
        resp.status,
        200,
        "HTTP/1.0 absolute target: {}",
        resp.body_text()
    );
    let echo = Echo::parse(&resp.body);
    assert_eq!(
        (echo.upstream.as_str(), echo.uri.as_str()),
        ("a", "/case?q")
    );
    let forwarded_host = echo.headers.iter().find(|(n, _)| n == "x-forwarded-host");
    let expected = format!("App.Test:{port}");
    assert_eq!(
        forwarded_host.map(|(_, v)| v),
        Some(&expected),
        "{:?}",
        echo.headers
    );
    for target in ["/case", "/case?to=http://app.test/"] {
        let req = format!("GET {target} HTTP/1.0\r\n\r\n");
        let resp = raw_request(cfg.http_addr(), req.as_bytes()).await.unwrap();
        assert_eq!(
            resp.status,
            400,
            "{target} without Host: {}",
            resp.body_text()
        );
    }
    // reqwest lower-cases the URL's host; checked too, so the raw requests are not the only path.
    let echo = get_echo(&plain_client(), &cfg.http_url("APP.test", "/")).await;
    assert_eq!(echo.upstream, "a");
}

/// Routing (and, later, policy) must judge the path the upstream will see: the proxy normalizes
/// the path once, routes on it and forwards it. Raw requests, because HTTP clients normalize
/// dot segments themselves.
#[tokio::test(flavor = "multi_thread")]
async fn routing_uses_and_forwards_the_normalized_path() {
    let root = Upstream::start("root").await;
    let v1 = Upstream::start("v1").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&root]))
        .route(Route::new("http://app.test/v1", &[&v1]));
    let _px = cfg.start().await;
    let port = cfg.http_addr().port();

    // (request target, expected upstream and forwarded target, or expected error status)
    type Expected = Result<(&'static str, &'static str), u16>;
    let cases: &[(&str, Expected)] = &[
        ("/v1/../x", Ok(("root", "/x"))),
        ("/x/../v1/a", Ok(("v1", "/v1/a"))),
        ("/v1/%2e%2e/x", Ok(("root", "/x"))),
        ("/v1/%2E%2E/x", Ok(("root", "/x"))),
        ("/x/%2e%2e/v1/a", Ok(("v1", "/v1/a"))),
        ("//v1//a", Ok(("v1", "/v1/a"))),
        ("/v1/./a", Ok(("v1", "/v1/a"))),
        ("/%76%31/a", Ok(("v1", "/v1/a"))),
        ("/../../v1", Ok(("v1", "/v1"))),
        ("/v1/a?next=../../x", Ok(("v1", "/v1/a?next=../../x"))),
        ("/v1%2fa", Err(400)),
        ("/v1%2Fa", Err(400)),
        // Starlette and older Werkzeug route /v1%0A as /v1.
        ("/v1%0A", Err(400)),
        // CodeIgniter decodes twice (/%25761 is /v1), trims spaces off the path's ends and
        // routes a query that begins with `/` as the path of the root or its script.
        ("/%25761/a", Err(400)),
        // Read so, a path of /v1/, and as written the root's: refused, as any spelling two
        // routes would each take.
        ("/+/v1/a", Err(400)),
        ("/v1%20", Err(400)),
        ("/?/v1/a", Err(400)),
        ("/index.php?/v1/a", Err(400)),
        ("/x/index.php?/../v1/a", Err(400)),
        ("/x?/v1/a", Ok(("root", "/x?/v1/a"))),
        ("/v1/?/a", Ok(("v1", "/v1/?/a"))),
        ("/?/v1/a%2F", Err(400)),
        // SvelteKit's named form actions, and Jenkins' branch feature/x.
        ("/login?/register", Ok(("root", "/login?/register"))),
        (
            "/login?/login&to=%2Fhome",
            Ok(("root", "/login?/login&to=%2Fhome")),
        ),
        (
            "/job/r/job/feature%252Fx/",
            Ok(("root", "/job/r/job/feature%252Fx/")),
        ),
        // nginx passes %3B on as `;` when its proxy_pass names a path, and Tomcat drops it:
        // /v1/'s to Tomcat, the root's as written.
        ("/v1%3Bx/a", Err(400)),
    ];
    for (target, expected) in cases {
        let req =
            format!("GET {target} HTTP/1.1\r\nHost: app.test:{port}\r\nConnection: close\r\n\r\n");
        let resp = raw_request(cfg.http_addr(), req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        match expected {
            Ok((upstream, forwarded)) => {
                assert_eq!(resp.status, 200, "{target}: {}", resp.body_text());
                let echo = Echo::parse(&resp.body);
                assert_eq!(&echo.upstream, upstream, "{target}");
                assert_eq!(&echo.uri, forwarded, "{target}");
            }
            Err(status) => assert_eq!(resp.status, *status, "{target}: {}", resp.body_text()),
        }
    }
}
