//! End-to-end tests of the `portcullis` binary, one test binary for the whole suite.
//!
//! Each test starts its own upstreams and its own `portcullis serve` on ephemeral loopback
//! ports (see the `portcullis-tests` harness), so tests are independent and run in parallel.
//! Build the binary first: `cargo build -p portcullis`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod balancing;
mod config_check;
mod headers;
mod lifecycle;
mod limits;
mod proxying;
mod reload;
mod routing;
mod tls;
mod websocket;

use portcullis_tests::Echo;
use reqwest::StatusCode;

/// Sends a GET and parses the upstream's echo; panics (with the body) on anything but 200.
async fn get_echo(client: &reqwest::Client, url: &str) -> Echo {
    let resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let body = resp.bytes().await.expect("read body");
    assert_eq!(
        status,
        StatusCode::OK,
        "GET {url}: body {}",
        String::from_utf8_lossy(&body)
    );
    Echo::parse(&body)
}
