//! Several upstreams on one route: round-robin while all are healthy, failover without a
//! single failed request when one is down.

use portcullis_tests::client::plain_client;
use portcullis_tests::{ConfigBuilder, Route, Upstream};

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
    let mut a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    let client = plain_client();
    for _ in 0..4 {
        get_echo(&client, &cfg.http_url("app.test", "/warm")).await;
    }

    a.stop();
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
    let mut a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut c = Upstream::start("c").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b, &c]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    // Down before any request: each request learns it by failing to connect, and a retry
    // must not pass over b for an upstream not yet known to be down.
    a.stop();
    c.stop();
    let client = plain_client();
    for i in 0..12 {
        let echo = get_echo(&client, &cfg.http_url("app.test", &format!("/only-b/{i}"))).await;
        assert_eq!(echo.upstream, "b", "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_upstream_gets_traffic_again() {
    let mut a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .route(Route::new("http://app.test", &[&a, &b]).set("connect_timeout = \"1s\""));
    let _px = cfg.start().await;
    let client = plain_client();
    let url = cfg.http_url("app.test", "/recover");

    let addr = a.addr();
    a.stop();
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
