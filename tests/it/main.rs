//! End-to-end tests of the `portcullis` binary, one test binary for the whole suite.
//!
//! Each test starts its own upstreams and its own `portcullis serve` on ephemeral loopback
//! ports (see the `portcullis-tests` harness), so tests are independent and run in parallel.
//! Build the binary first: `cargo build -p portcullis`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod agents;
mod audit;
mod authz;
mod balancing;
mod config_check;
mod console;
mod hardening;
mod headers;
mod idp_harness;
mod idp_profiles;
mod lifecycle;
mod limits;
mod proxying;
mod reload;
mod replicas;
mod routing;
mod scim_agents;
mod scim_crash;
mod scim_entra;
mod scim_okta;
mod scim_protocol;
mod signin;
mod signin_machine;
mod tls;
mod websocket;

use portcullis_tests::{ConfigBuilder, Echo, Portcullis, ScimClient};
use reqwest::StatusCode;

/// The SCIM host of every SCIM test.
const SCIM_HOST: &str = "auth.test";
/// The bearer token of [`scim_server`]'s one `[[scim.tokens]]` entry, named `okta`.
const SCIM_TOKEN: &str = "okta-token-0123456789abcdefghij";

/// The config of a `portcullis` that serves SCIM on `auth.test` over plain HTTP, with one
/// token ([`SCIM_TOKEN`]).
fn scim_config() -> ConfigBuilder {
    ConfigBuilder::new()
        .http_listener()
        .scim(SCIM_HOST, &[("okta", SCIM_TOKEN)])
}

/// A running `portcullis` from [`scim_config`] and a client holding its token.
async fn scim_server() -> (Portcullis, ScimClient) {
    let cfg = scim_config();
    let px = cfg.start().await;
    (px, ScimClient::new(&cfg.scim_base_url(), SCIM_TOKEN))
}

/// Sends a GET and parses the upstream's echo; panics (with the body) on anything but 200.
async fn get_echo(client: &reqwest::Client, url: &str) -> Echo {
    let resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    // An answer to nobody in particular is left as cacheable as the upstream made it.
    assert_eq!(resp.headers().get("cache-control"), None, "GET {url}");
    let body = resp.bytes().await.expect("read body");
    assert_eq!(
        status,
        StatusCode::OK,
        "GET {url}: body {}",
        String::from_utf8_lossy(&body)
    );
    Echo::parse(&body)
}
