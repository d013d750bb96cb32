//! The cheapest proxy pingora can be: one fixed upstream, no filters, no downstream modules.
//!
//! `bench/proxy.py` runs it beside Portcullis, so the benchmark separates what
//! Portcullis adds per request from what pingora itself costs. Not a product: no TLS, no
//! configuration file, and no timeouts unless it is given headers to send (below).
//!
//! With a third argument, a file of `name: value` lines, it also sends those headers upstream
//! and drops the client's `Cookie`: the same request Portcullis sends for a signed-in caller
//! when the file holds what Portcullis added (`bench/floor.py` captures it). It adds them the
//! cheapest way, with names and values made once, so that it costs what sending them costs
//! pingora and the kernel and nothing more. It then also keeps Portcullis' default upstream
//! timeouts (connect 5 s, read and write 60 s), whose timers pingora sets for every request.
//!
//! Usage: pingora_floor LISTEN_ADDR UPSTREAM_ADDR [HEADERS_FILE]

use std::time::Duration;

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue, COOKIE};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

// The same allocator as the portcullis binary, so the comparison is about the proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor {
    upstream: HttpPeer,
    /// Sent upstream with every request, in place of the client's `Cookie`.
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if self.headers.is_empty() {
            return Ok(());
        }
        // As Portcullis edits it: as `http` parts, room reserved once.
        let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
        let mut parts =
            http::request::Parts::from(std::mem::replace(upstream_request, placeholder));
        parts.headers.remove(COOKIE);
        parts.headers.reserve(self.headers.len());
        for (name, value) in &self.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        *upstream_request = RequestHeader::from(parts);
        Ok(())
    }
}

fn read_headers(path: &str) -> std::result::Result<Vec<(HeaderName, HeaderValue)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("{path}: not a `name: value` line: {line}"))?;
            let name = HeaderName::try_from(name.trim()).map_err(|e| format!("{path}: {e}"))?;
            let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("{path}: {e}"))?;
            Ok((name, value))
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream, headers) = match args.as_slice() {
        [listen, upstream] => (listen, upstream, Vec::new()),
        [listen, upstream, file] => match read_headers(file) {
            Ok(headers) => (listen, upstream, headers),
            Err(e) => {
                eprintln!("pingora_floor: {e}");
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("usage: pingora_floor LISTEN_ADDR UPSTREAM_ADDR [HEADERS_FILE]");
            std::process::exit(2);
        }
    };
    let mut upstream = HttpPeer::new(upstream.as_str(), false, String::new());
    // Portcullis keeps idle upstream connections for as long.
    upstream.options.idle_timeout = Some(Duration::from_secs(60));
    if !headers.is_empty() {
        upstream.options.connection_timeout = Some(Duration::from_secs(5));
        upstream.options.total_connection_timeout = Some(Duration::from_secs(5));
        upstream.options.read_timeout = Some(Duration::from_secs(60));
        upstream.options.write_timeout = Some(Duration::from_secs(60));
    }

    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        // SIGTERM ends it at once (pingora waits 5 min by default), so that a build recording
        // a profile (scripts/pgo.sh) writes its record on exit.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Floor { upstream, headers });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
