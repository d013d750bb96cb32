//! The admin listener: probes and Prometheus metrics.

use portcullis_tests::client::plain_client;
use portcullis_tests::{ConfigBuilder, Portcullis, Route, Upstream};
use reqwest::StatusCode;
use serde_json::Value;

use crate::get_echo;

/// One sample of a Prometheus text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_and_labels, value) = match line.rfind('}') {
            Some(close) => (&line[..=close], line[close + 1..].trim()),
            None => match line.split_once(' ') {
                Some((n, v)) => (n, v.trim()),
                None => panic!("bad metrics line {line:?}"),
            },
        };
        let value_text = value.split_whitespace().next().unwrap_or_default();
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in metrics line {line:?}")),
        };
        let (name, labels) = match name_and_labels.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (name_and_labels, Vec::new()),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(match escaped {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((name.trim().trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    labels
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_metrics() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test/", &[&up]));
    let px = cfg.start().await;
    let client = plain_client();

    let resp = client.get(px.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap().trim(), "ok");
    let resp = client.get(px.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    for i in 0..7 {
        get_echo(&client, &cfg.http_url("app.test", &format!("/m/{i}"))).await;
    }
    // One more that waits for the upstream's `100 Continue` before its body: one upstream
    // answer all the same, observed once.
    let port = cfg.http_addr().port();
    let upload = format!(
        "POST /m/upload HTTP/1.1\r\nHost: app.test:{port}\r\nExpect: 100-continue\r\n\
         Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    let answer = portcullis_tests::raw_request(cfg.http_addr(), upload.as_bytes())
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    let resp = client
        .get(cfg.http_url("nowhere.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // A request the route refuses before it is judged is the route's too.
    let resp = client
        .request(
            reqwest::Method::from_bytes(b"MOVE").unwrap(),
            cfg.http_url("app.test", "/m/a"),
        )
        .header("Destination", "http://elsewhere.test/m/b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let resp = client.get(px.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "metrics content-type {content_type:?}"
    );
    let text = resp.text().await.unwrap();
    let samples = parse_metrics(&text);

    let ok_requests: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == "portcullis_requests_total"
                && s.label("route") == Some("http://app.test/")
                && s.label("status") == Some("200")
        })
        .collect();
    assert_eq!(
        ok_requests.iter().map(|s| s.value).sum::<f64>(),
        8.0,
        "portcullis_requests_total{{route=\"http://app.test/\",status=\"200\"}} after 8 requests:\n{text}"
    );
    let refused = samples.iter().find(|s| {
        s.name == "portcullis_requests_total"
            && s.label("route") == Some("http://app.test/")
            && s.label("status") == Some("400")
    });
    assert_eq!(refused.map(|s| s.value), Some(1.0), "{text}");

    assert!(
        text.lines()
            .any(|l| l.starts_with("# TYPE portcullis_upstream_duration_seconds histogram")),
        "portcullis_upstream_duration_seconds is declared a histogram:\n{text}"
    );
    let count: f64 = samples
        .iter()
        .filter(|s| s.name == "portcullis_upstream_duration_seconds_count")
        .map(|s| s.value)
        .sum();
    assert_eq!(count, 8.0, "upstream duration observations:\n{text}");
    let inf_buckets: f64 = samples
        .iter()
        .filter(|s| {
            s.name == "portcullis_upstream_duration_seconds_bucket" && s.label("le") == Some("+Inf")
        })
        .map(|s| s.value)
        .sum();
    assert_eq!(inf_buckets, count, "+Inf buckets equal the count:\n{text}");
}

/// A client that leaves after an interim answer (`103 Early Hints`) was given no answer: it is
/// counted under status 0, as the metric's help says, not as a 103.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_after_an_interim_answer_is_counted_as_given_none() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that hints, then says nothing more until the test ends.
    let hinting = portcullis_tests::raw_upstream::answering(
        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    )
    .await;
    const ROUTE: &str = "http://hints.test/";
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::to_urls(ROUTE, vec![format!("http://{hinting}")]));
    let px = cfg.start().await;
    let mut stream = tokio::net::TcpStream::connect(cfg.http_addr())
        .await
        .unwrap();
    let port = cfg.http_addr().port();
    let request = format!("GET / HTTP/1.1\r\nHost: hints.test:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            other => panic!("no interim answer: {other:?} after {got:?}"),
        }
    }
    assert!(got.starts_with(b"HTTP/1.1 103"), "{got:?}");
    drop(stream);

    // Counted once Portcullis sees the client gone (bounded).
    let client = plain_client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let counted = loop {
        let text = client
            .get(px.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted: Vec<(String, f64)> = parse_metrics(&text)
            .into_iter()
            .filter(|s| s.name == "portcullis_requests_total" && s.label("route") == Some(ROUTE))
            .filter(|s| s.value > 0.0)
            .map(|s| (s.label("status").unwrap_or_default().to_owned(), s.value))
            .collect();
        if !counted.is_empty() || std::time::Instant::now() > deadline {
            break counted;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(counted, vec![("0".to_owned(), 1.0)]);
}

/// An upstream's answer is timed whatever Portcullis then makes of it: a `101` that does not
/// accept the websocket asked for, answered 502, still took the upstream its time.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_answer_portcullis_refuses_is_timed_all_the_same() {
    let switching = portcullis_tests::raw_upstream::answering(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    const ROUTE: &str = "http://switch.test/";
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::to_urls(ROUTE, vec![format!("http://{switching}")]).websockets(true));
    let px = cfg.start().await;
    let client = plain_client();
    let resp = client
        .get(cfg.http_url("switch.test", "/ws"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let text = client
        .get(px.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timed: f64 = parse_metrics(&text)
        .iter()
        .filter(|s| {
            s.name == "portcullis_upstream_duration_seconds_count"
                && s.label("route") == Some(ROUTE)
        })
        .map(|s| s.value)
        .sum();
    assert_eq!(timed, 1.0, "{text}");
}

/// `/readyz` is the signal everything waits on (load balancers, the test harness): it says
/// ready only once the proxy listens on its port, not while another process holds it.
#[tokio::test(flavor = "multi_thread")]
async fn not_ready_until_the_proxy_listens_on_its_port() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test/", &[&up]));
    // Another process's listener on the proxy's port (std binds it as pingora would, with
    // SO_REUSEADDR, and pingora's bind fails for as long as it is open).
    let squatter = std::net::TcpListener::bind(cfg.http_addr()).expect("bind the port first");
    let mut px = Portcullis::spawn(&cfg.toml());
    let client = plain_client();

    // Up and answering on the admin listener, but the proxy's port is someone else's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let body = loop {
        if let Ok(resp) = client.get(px.admin_url("/readyz")).send().await {
            assert_ne!(
                resp.status(),
                StatusCode::OK,
                "ready while another process holds the port"
            );
            break resp.text().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the admin listener never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        body.contains(&format!("not listening on {}", cfg.http_addr())),
        "{body}"
    );

    // Once the port is free, pingora binds it, and only then is the proxy ready.
    drop(squatter);
    px.wait_ready().await;
    get_echo(&client, &cfg.http_url("app.test", "/after")).await;
}

/// A listener that cannot be bound stops the process (exit 1), for its supervisor to start it
/// again: an address this machine does not have, at start; a port another process holds
/// past pingora's retries (30 s), a minute after start. It stayed up, its `/healthz` 200,
/// serving nothing for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_listener_that_cannot_be_bound_stops_the_process() {
    let until_exit = |px: &mut Portcullis, within: std::time::Duration| {
        let deadline = std::time::Instant::now() + within;
        let status = loop {
            if let Some(status) = px.try_exit() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running after {within:?}:\n{}",
                px.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert_eq!(status.code(), Some(1), "{}", px.log());
    };
    let cfg = ConfigBuilder::new().http_listener();
    // TEST-NET-1: no machine has it.
    let elsewhere = format!(
        "{}\n[[listeners]]\naddress = \"192.0.2.1:8443\"\n",
        cfg.toml()
    );
    let mut px = Portcullis::spawn(&elsewhere);
    until_exit(&mut px, std::time::Duration::from_secs(30));
    assert!(
        px.log().contains("cannot listen on 192.0.2.1:8443"),
        "{}",
        px.log()
    );

    let squatter = std::net::TcpListener::bind(cfg.http_addr()).expect("bind the port first");
    let mut px = Portcullis::spawn(&cfg.toml());
    let started = std::time::Instant::now();
    until_exit(&mut px, std::time::Duration::from_secs(120));
    assert!(started.elapsed() >= std::time::Duration::from_secs(55));
    let said = format!("not listening on {}", cfg.http_addr());
    assert!(px.log().contains(&said), "{}", px.log());
    drop(squatter);
}

/// `/metrics` and `/explain` tell about the directory and the traffic: without `[admin] token`
/// they answer only to loopback Host names (so a page in a browser on the machine cannot reach
/// them through a DNS name pointed at 127.0.0.1); the probes answer anyone.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_metrics_and_explain_answer_only_loopback_hosts() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test/", &[&up]));
    let px = cfg.start().await;
    let client = plain_client();
    let get = |path: &str, host: Option<&str>| {
        let mut request = client.get(px.admin_url(path));
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request.send()
    };
    for path in [
        "/metrics",
        "/explain?user=a%40b.example&url=http%3A%2F%2Fapp.test%2F",
    ] {
        assert_eq!(
            get(path, None).await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
        assert_eq!(
            get(path, Some("localhost")).await.unwrap().status(),
            StatusCode::OK
        );
        for host in ["attacker.example", "attacker.example:80", "10.0.0.1"] {
            let resp = get(path, Some(host)).await.unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::FORBIDDEN,
                "{path} for Host {host}"
            );
        }
    }
    for probe in ["/healthz", "/readyz"] {
        let resp = get(probe, Some("attacker.example")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{probe} answers anyone");
    }
    // Each refusal is audited, as anyone's.
    let records = crate::audit::audit_json_until(&px, &[], |r| {
        crate::audit::of_event(r, "refusal").len() == 6
    })
    .await;
    for refusal in &records {
        assert_eq!(refusal["route"], "admin", "{refusal}");
        assert_eq!(refusal["user"], "anonymous", "{refusal}");
        assert_eq!(
            refusal["reason"], "no [admin] token is set, and the Host is not a loopback name",
            "{refusal}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_metrics_and_explain_need_it_and_the_cli_presents_it() {
    const TOKEN: &str = "admin-token-0123456789abcdefghij";
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .admin_token(TOKEN)
        .route(Route::new("http://app.test/", &[&up]));
    let px = cfg.start().await;
    let client = plain_client();
    let metrics = px.admin_url("/metrics");
    let challenged = |resp: &reqwest::Response| {
        let challenge = resp.headers().get("www-authenticate");
        assert_eq!(
            challenge.and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"portcullis-admin\""),
            "a 401 says how to authenticate"
        );
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    };
    let resp = client.get(&metrics).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "no token");
    challenged(&resp);
    let resp = client
        .get(&metrics)
        .bearer_auth("admin-token-0123456789abcdefghiJ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "a wrong token");
    challenged(&resp);
    let resp = client
        .get(&metrics)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client.get(px.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "probes need no token");
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    // Both refusals are audited, by what was wrong, never with the token.
    let records = crate::audit::audit_json_until(&px, &[], |r| {
        crate::audit::of_event(r, "refusal").len() == 2
    })
    .await;
    let reasons: Vec<&Value> = records.iter().map(|r| &r["reason"]).collect();
    assert_eq!(
        reasons,
        [
            "no [admin] bearer token was presented",
            "the bearer token is not the [admin] token"
        ],
        "{records:#?}"
    );
    for refusal in &records {
        assert_eq!(refusal["route"], "admin", "{refusal}");
        assert_eq!(refusal["user"], "anonymous", "{refusal}");
        assert_eq!(refusal["path"], "/metrics", "{refusal}");
    }
    let log = std::fs::read_to_string(px.dir().join("data/audit.jsonl")).unwrap();
    assert!(!log.contains("admin-token-"), "{log}");
    // Nor in the log, from a head the listener cannot read (a field name with a control
    // character): pingora's error for it quotes the head.
    let malformed = format!(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
         X\x01: y\r\n\r\n"
    );
    let answer = portcullis_tests::client::raw_request(px.admin_addr(), malformed.as_bytes()).await;
    assert!(answer.is_err(), "{answer:?}");
    // A refusal logged after it: by then its lines are written too.
    let resp = client.get(&metrics).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "served on after it"
    );
    let refused = "no [admin] bearer token was presented";
    let log = px.log_until(|log| log.matches(refused).count() == 2).await;
    assert!(!log.contains(TOKEN), "{log}");

    // `portcullis explain` reads the token from the configuration and presents it.
    let config = px.config_path().display().to_string();
    let out = portcullis_tests::process::run(
        px.dir(),
        &[
            "explain",
            "--config",
            &config,
            "--user",
            "a@b.example",
            "--url",
            "http://app.test/",
        ],
    )
    .await;
    assert!(out.status.code() == Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("ALLOW GET http://app.test/"),
        "{out:?}"
    );

    // A reload that rotates the token: the old one is refused at once, the new one works (one
    // not all ASCII: a header may carry it, as configuration may).
    const ROTATED: &str = "rotated-admin-tokén-0123456789abcd";
    px.rewrite_config(&cfg.clone().admin_token(ROTATED).toml());
    px.reload_and_wait().await;
    let with = |token: &'static str| client.get(&metrics).bearer_auth(token).send();
    let resp = with(TOKEN).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "the rotated-out token"
    );
    let resp = with(ROTATED).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the new token");

    // A reload that removes `[admin]`: the listener stays until a restart, and answers no
    // one, not everyone on loopback as a listener without a token would.
    let toml = cfg.toml();
    let (before, after) = toml.split_once("\n[admin]\n").expect("an [admin] section");
    let after = after.find("\n[").map_or("", |at| &after[at..]);
    px.rewrite_config(&format!("{before}{after}"));
    px.reload_and_wait().await;
    for token in [None, Some(ROTATED)] {
        let mut asked = client.get(&metrics).header("host", "localhost");
        if let Some(token) = token {
            asked = asked.bearer_auth(token);
        }
        let resp = asked.send().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::FORBIDDEN,
            "[admin] removed, {token:?}"
        );
    }
    let resp = client.get(px.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "probes still answer");
}
