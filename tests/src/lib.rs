//! The end-to-end test harness of Portcullis: real peers on ephemeral loopback ports and the real
//! `portcullis` binary, started and torn down per test.
//!
//! It owns: an in-process upstream that echoes what it received ([`upstream`]), throw-away
//! certificates ([`tls`]), a config-file builder ([`config`]), the child process running
//! `portcullis serve` ([`process`], which can also kill it with `SIGKILL` and restart it on
//! the same data), clients, including a raw one for bytes a normal client would normalise
//! ([`client`]), a SCIM client ([`scim`]), a seeded random generator ([`rng`]), a real OpenID
//! provider (`oidc-provider` under Node, [`idp`]), a headless Chromium driven over WebDriver
//! ([`browser`]) and a stand-in relying party that records what it receives ([`recorder`]).
//! It does not own any assertion about the proxy: those are the tests in `it/`, compiled as
//! one binary. Read `it/proxying.rs` first, `it/scim_okta.rs` for SCIM, and
//! `it/idp_harness.rs` for the IdP and the browser.
//!
//! Nothing here uses a fixed port or kills processes by name: each test starts its own
//! upstreams and its own `portcullis`, so tests run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod browser;
pub mod client;
pub mod config;
pub mod diagnose;
pub mod idp;
pub mod nginx;
pub mod postgres;
pub mod process;
pub mod raw_upstream;
pub mod recorder;
pub mod rng;
pub mod scim;
pub mod tls;
pub mod upstream;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

pub use browser::{Browser, BrowserCookie, BrowserOptions};
pub use client::{raw_request, RawResponse};
pub use config::{ConfigBuilder, JwtIssuer, Oidc, Route, ScimToken};
pub use idp::{Idp, IdpClient, IdpOutage, IdpProfile, IdpResource, IdpSetup, IdpUser, Pkce};
pub use nginx::Nginx;
pub use postgres::Postgres;
pub use process::Portcullis;
pub use recorder::{Recorded, Recorder};
pub use scim::{ScimClient, ScimResponse};
pub use tls::{CertFiles, TestCa, TlsTerminator};
pub use upstream::{Echo, Upstream};

/// A loopback port for a server a test starts later (a Portcullis listener, say), free now and
/// never handed out before by this process.
///
/// The port comes from below the kernel's ephemeral range (`ip_local_port_range`), which is
/// where every `bind(…:0)` gets its port: the IdP, chromedriver, the upstreams and the clients'
/// own sockets all take theirs there. A port reserved here and released until the server binds
/// it (or between a server's kill and its restart) can therefore not be taken by any of them.
/// Where a process starts in the range is random, so two test processes rarely probe the
/// same ports, and each port is checked free by binding it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (low, high) = reserved_range();
    let span = u32::from(high - low);
    let offset = rand::random::<u32>() % span;
    for step in 0..span {
        let port = low + u16::try_from((offset + step) % span).expect("within the span");
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.insert(port);
        return port;
    }
    panic!("no free loopback port in {low}..{high}");
}

/// Ports `free_port` hands out: from 10000 up to the start of the ephemeral range.
fn reserved_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    assert!(
        ephemeral_low > 11_000,
        "the ephemeral port range starts at {ephemeral_low}: the tests need ports below it"
    );
    (10_000, ephemeral_low)
}
