//! Process lifecycle: `--version`, and SIGTERM draining in-flight requests before exiting 0.

use std::time::{Duration, Instant};

use portcullis_tests::client::plain_client;
use portcullis_tests::process::run;
use portcullis_tests::{ConfigBuilder, Echo, Route, Upstream};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread")]
async fn version_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["--version"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("portcullis") && out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let up = Upstream::start("a").await;
    let cfg = ConfigBuilder::new()
        .http_listener()
        .server("shutdown_timeout", "\"10s\"")
        .route(Route::new("http://app.test", &[&up]));
    let mut px = cfg.start().await;

    let slow_url = cfg.http_url("app.test", "/slow?ms=1000");
    let slow = tokio::spawn(async move {
        let resp = plain_client().get(&slow_url).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.count(), 1, "the slow request reached the upstream");

    let status = px.terminate_within(Duration::from_secs(20)).await;
    let (resp_status, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completes during shutdown");
    assert_eq!(resp_status, StatusCode::OK);
    assert_eq!(Echo::parse(&body).uri, "/slow?ms=1000");
    assert!(
        status.success(),
        "portcullis exited with {status} after SIGTERM; output:\n{}",
        px.log()
    );
}
