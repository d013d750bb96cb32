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
pub mod process;
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
pub use idp::{Idp, IdpClient, IdpOutage, IdpResource, IdpSetup, IdpUser, Pkce};
pub use process::Portcullis;
pub use recorder::{Recorded, Recorder};
pub use scim::{ScimClient, ScimResponse};
pub use tls::{CertFiles, TestCa};
pub use upstream::{Echo, Upstream};

/// A loopback port that was free a moment ago (bound to port 0, read, released), and never
/// handed out before by this process: the kernel may give a just-released port again, and two
/// listeners of one config (or of two tests running in parallel) must not get the same one.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("no loopback port that was not handed out before");
}
