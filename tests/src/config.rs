//! A builder for the TOML file a test hands to `portcullis`, with every port chosen free.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::tls::CertFiles;
use crate::upstream::Upstream;
use crate::{free_port, Portcullis};

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    from: String,
    to: Vec<String>,
    extra: Vec<String>,
}

impl Route {
    /// A route from `from` (e.g. `http://app.test/v1`) to the given upstreams.
    pub fn new(from: &str, to: &[&Upstream]) -> Route {
        Route::to_urls(from, to.iter().map(|u| u.url()).collect())
    }

    /// A route to upstream URLs given as text (e.g. a port nothing listens on).
    pub fn to_urls(from: &str, to: Vec<String>) -> Route {
        Route {
            from: from.to_owned(),
            to,
            extra: Vec::new(),
        }
    }

    pub fn preserve_host(self, on: bool) -> Route {
        self.set(&format!("preserve_host = {on}"))
    }

    pub fn websockets(self, on: bool) -> Route {
        self.set(&format!("websockets = {on}"))
    }

    /// Adds a raw `key = value` line to the route table.
    pub fn set(mut self, line: &str) -> Route {
        self.extra.push(line.to_owned());
        self
    }
}

/// The whole config file. Ports are picked when a listener is added, so the test knows them
/// before the proxy starts.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    admin: SocketAddr,
    http: Option<SocketAddr>,
    https: Option<(SocketAddr, Vec<CertFiles>)>,
    server: Vec<(String, String)>,
    routes: Vec<Route>,
}

impl ConfigBuilder {
    /// An admin listener and nothing else.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder {
            admin: loopback(free_port()),
            http: None,
            https: None,
            server: vec![
                ("threads".to_owned(), "2".to_owned()),
                ("shutdown_timeout".to_owned(), "\"10s\"".to_owned()),
                ("reload_poll_interval".to_owned(), "\"500ms\"".to_owned()),
            ],
            routes: Vec::new(),
        }
    }

    /// Adds a plain HTTP listener on a free port.
    pub fn http_listener(mut self) -> ConfigBuilder {
        self.http = Some(loopback(free_port()));
        self
    }

    /// Adds a TLS listener on a free port; the first certificate is the default.
    pub fn https_listener(mut self, certificates: Vec<CertFiles>) -> ConfigBuilder {
        self.https = Some((loopback(free_port()), certificates));
        self
    }

    /// Sets `[server] key = value`, `value` being raw TOML (`"5s"` with its quotes, `1024`).
    pub fn server(mut self, key: &str, value: &str) -> ConfigBuilder {
        self.server.retain(|(k, _)| k != key);
        self.server.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn route(mut self, route: Route) -> ConfigBuilder {
        self.routes.push(route);
        self
    }

    /// The same listeners and settings with no routes, to build a replacement config.
    pub fn without_routes(mut self) -> ConfigBuilder {
        self.routes.clear();
        self
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("config has no HTTP listener")
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https.as_ref().expect("config has no TLS listener").0
    }

    /// `http://<host>:<http port><path>`; the clients resolve every name to 127.0.0.1.
    pub fn http_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http_addr().port())
    }

    /// `https://<host>:<tls port><path>`.
    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https_addr().port())
    }

    pub fn toml(&self) -> String {
        let mut out = String::new();
        out.push_str("data_dir = \"./data\"\n\n[log]\nlevel = \"info\"\n\n");
        out.push_str("[server]\n");
        for (key, value) in &self.server {
            let _ = writeln!(out, "{key} = {value}");
        }
        let _ = writeln!(out, "\n[admin]\naddress = \"{}\"", self.admin);
        if let Some(addr) = self.http {
            let _ = writeln!(out, "\n[[listeners]]\naddress = \"{addr}\"");
        }
        if let Some((addr, certs)) = &self.https {
            let list: Vec<String> = certs
                .iter()
                .map(|c| {
                    format!(
                        "{{ cert = {}, key = {} }}",
                        toml_str(&c.cert.display().to_string()),
                        toml_str(&c.key.display().to_string())
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "\n[[listeners]]\naddress = \"{addr}\"\ntls = {{ certificates = [{}] }}",
                list.join(", ")
            );
        }
        for route in &self.routes {
            let to: Vec<String> = route.to.iter().map(|u| toml_str(u)).collect();
            let _ = writeln!(
                out,
                "\n[[routes]]\nfrom = {}\nto = [{}]",
                toml_str(&route.from),
                to.join(", ")
            );
            for line in &route.extra {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }

    /// Starts `portcullis serve` on this config and waits until it is ready.
    pub async fn start(&self) -> Portcullis {
        Portcullis::start(&self.toml()).await
    }
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
