//! The cheapest proxy pingora can be: one fixed upstream, no filters, no downstream modules.
//!
//! `bench/proxy.py` runs it beside Portcullis, so the benchmark separates what
//! Portcullis adds per request from what pingora itself costs. Not a product: no TLS, no
//! timeouts, no configuration file.
//!
//! Usage: pingora_floor LISTEN_ADDR UPSTREAM_ADDR

use std::time::Duration;

use async_trait::async_trait;
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
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.clone()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: pingora_floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let mut upstream = HttpPeer::new(upstream.as_str(), false, String::new());
    // Portcullis keeps idle upstream connections for as long.
    upstream.options.idle_timeout = Some(Duration::from_secs(60));

    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
