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

    /// `accept = [...]`: which credentials the route takes (`"session"`, `"bearer"`, or
    /// `"public"` alone).
    pub fn accept(self, credentials: &[&str]) -> Route {
        let list: Vec<String> = credentials.iter().map(|c| toml_str(c)).collect();
        self.set(&format!("accept = [{}]", list.join(", ")))
    }

    /// Lets in anyone who signed in or presents a valid token, judged on the token's own claims
    /// when they are not in the SCIM directory (for tests of sign-in itself).
    pub fn any_signed_in(self) -> Route {
        self.set("allow = { any_signed_in = true }")
            .set("token_groups = true")
    }

    /// Adds a raw `key = value` line to the route table.
    pub fn set(mut self, line: &str) -> Route {
        self.extra.push(line.to_owned());
        self
    }
}

/// One `[[scim.tokens]]` entry.
#[derive(Debug, Clone)]
pub struct ScimToken {
    pub name: String,
    /// The clear token, as clients send it after `Bearer `.
    pub secret: String,
    /// RFC 3339 time after which the token is refused.
    pub expires: Option<String>,
    /// Writes `secret_sha256` (the hash) instead of `secret`.
    pub as_sha256: bool,
}

impl ScimToken {
    /// A token (at least 24 characters, as the config requires) that never expires.
    pub fn new(name: &str, secret: &str) -> ScimToken {
        ScimToken {
            name: name.to_owned(),
            secret: secret.to_owned(),
            expires: None,
            as_sha256: false,
        }
    }

    pub fn expires(mut self, rfc3339: &str) -> ScimToken {
        self.expires = Some(rfc3339.to_owned());
        self
    }

    pub fn as_sha256(mut self) -> ScimToken {
        self.as_sha256 = true;
        self
    }
}

/// The `[scim]` section.
#[derive(Debug, Clone)]
struct Scim {
    host: String,
    tokens: Vec<ScimToken>,
    settings: Vec<(String, String)>,
}

/// The `[oidc]` section: browser sign-in with OpenID Connect.
#[derive(Debug, Clone)]
pub struct Oidc {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub auth_host: String,
    /// Other keys, `(key, raw TOML value)`, e.g. `("cookie_domain", "\".corp.test\"")`.
    pub settings: Vec<(String, String)>,
}

impl Oidc {
    /// `[oidc]` with the four required keys and `auth_scheme = "http"` (tests speak plain
    /// HTTP); `auth_host` is `host[:port]`.
    pub fn new(issuer: &str, client_id: &str, client_secret: &str, auth_host: &str) -> Oidc {
        Oidc {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            auth_host: auth_host.to_owned(),
            settings: vec![("auth_scheme".to_owned(), "\"http\"".to_owned())],
        }
    }

    /// Sets `key = value`, `value` being raw TOML (`"8h"` with its quotes, `true`, `[..]`).
    pub fn set(mut self, key: &str, value: &str) -> Oidc {
        self.settings.retain(|(k, _)| k != key);
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// One `[[jwt_issuers]]` entry: an issuer of bearer JWTs for machines.
#[derive(Debug, Clone)]
pub struct JwtIssuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Other keys, `(key, raw TOML value)`: `jwks_uri`, `algorithms`, `leeway`.
    pub settings: Vec<(String, String)>,
}

impl JwtIssuer {
    pub fn new(issuer: &str, audiences: &[&str]) -> JwtIssuer {
        JwtIssuer {
            issuer: issuer.to_owned(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            settings: Vec::new(),
        }
    }

    /// Sets `key = value`, `value` being raw TOML.
    pub fn set(mut self, key: &str, value: &str) -> JwtIssuer {
        self.settings.retain(|(k, _)| k != key);
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `jwks_uri = "<uri>"` (instead of the issuer's discovery document).
    pub fn jwks_uri(self, uri: &str) -> JwtIssuer {
        let value = toml_str(uri);
        self.set("jwks_uri", &value)
    }

    /// `leeway = "<duration>"`, e.g. `"0s"`.
    pub fn leeway(self, leeway: &str) -> JwtIssuer {
        let value = toml_str(leeway);
        self.set("leeway", &value)
    }
}

/// The whole config file. Ports are picked when a listener is added, so the test knows them
/// before the proxy starts.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    admin: SocketAddr,
    /// `[admin] token`, raw TOML.
    admin_token: Option<String>,
    http: Option<SocketAddr>,
    /// The HTTP listener is bound to 0.0.0.0 (its port is `http`'s).
    http_any_interface: bool,
    /// Settings of the HTTP listener beyond its address, raw TOML lines.
    http_settings: Vec<String>,
    https: Option<(SocketAddr, Vec<CertFiles>)>,
    /// Settings of the TLS listener beyond its address and certificates, raw TOML lines.
    https_settings: Vec<String>,
    server: Vec<(String, String)>,
    routes: Vec<Route>,
    scim: Option<Scim>,
    oidc: Option<Oidc>,
    jwt_issuers: Vec<JwtIssuer>,
    /// `[postgres]` as `(key, raw TOML value)` lines.
    postgres: Vec<(String, String)>,
    /// `[console]` as raw TOML lines; no section when empty.
    console: Vec<String>,
    /// `[identity]` as raw TOML lines; no section when empty.
    identity: Vec<String>,
}

impl ConfigBuilder {
    /// An admin listener and nothing else.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder {
            admin: loopback(free_port()),
            admin_token: None,
            http: None,
            http_any_interface: false,
            http_settings: Vec::new(),
            https_settings: Vec::new(),
            https: None,
            server: vec![
                ("threads".to_owned(), "2".to_owned()),
                ("shutdown_timeout".to_owned(), "\"10s\"".to_owned()),
                ("reload_poll_interval".to_owned(), "\"500ms\"".to_owned()),
            ],
            routes: Vec::new(),
            scim: None,
            oidc: None,
            jwt_issuers: Vec::new(),
            postgres: Vec::new(),
            console: Vec::new(),
            identity: Vec::new(),
        }
    }

    /// Adds a line (raw TOML, `preset = "entra"` say) to `[identity]`.
    pub fn identity(mut self, line: &str) -> ConfigBuilder {
        self.identity.push(line.to_owned());
        self
    }

    /// Adds a line (raw TOML, `allow = { groups = ["sre"] }` say) to `[console]`.
    pub fn console(mut self, line: &str) -> ConfigBuilder {
        self.console.push(line.to_owned());
        self
    }

    /// Keeps the directory in PostgreSQL at `url` (`[postgres]`), with this `max_staleness`.
    pub fn postgres(mut self, url: &str, max_staleness: &str) -> ConfigBuilder {
        self.postgres = vec![
            ("url".to_owned(), toml_str(url)),
            ("max_staleness".to_owned(), toml_str(max_staleness)),
        ];
        self
    }

    /// Adds a plain HTTP listener on a free port.
    pub fn http_listener(mut self) -> ConfigBuilder {
        self.http = Some(loopback(free_port()));
        self
    }

    /// Like [`ConfigBuilder::http_listener`], but bound to every interface (`0.0.0.0`), as a
    /// listener that is not on loopback. The clients still reach it on 127.0.0.1.
    pub fn http_listener_on_all_interfaces(mut self) -> ConfigBuilder {
        self.http = Some(loopback(free_port()));
        self.http_any_interface = true;
        self
    }

    /// Sets `allow_plain_http = true` on the listener of
    /// [`ConfigBuilder::http_listener_on_all_interfaces`].
    pub fn allow_plain_http(self) -> ConfigBuilder {
        self.http_listener_setting("allow_plain_http = true")
    }

    /// Sets `behind_tls_proxy = true` on the listener of
    /// [`ConfigBuilder::http_listener_on_all_interfaces`]: a proxy in front terminates TLS.
    pub fn behind_tls_proxy(self) -> ConfigBuilder {
        self.http_listener_setting("behind_tls_proxy = true")
    }

    /// Adds `line` (raw TOML: `trusted_proxies = ["127.0.0.3"]`) to the HTTP listener.
    pub fn http_listener_setting(mut self, line: &str) -> ConfigBuilder {
        self.http_settings.push(line.to_owned());
        self
    }

    /// Adds `line` (raw TOML: `trusted_proxies = ["127.0.0.1"]`) to the TLS listener.
    pub fn https_listener_setting(mut self, line: &str) -> ConfigBuilder {
        self.https_settings.push(line.to_owned());
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

    /// Sets `[admin] token` to `token`.
    pub fn admin_token(mut self, token: &str) -> ConfigBuilder {
        self.admin_token = Some(toml_str(token));
        self
    }

    pub fn route(mut self, route: Route) -> ConfigBuilder {
        self.routes.push(route);
        self
    }

    /// Turns browser sign-in on with this `[oidc]` section (replacing any set before).
    pub fn oidc(mut self, oidc: Oidc) -> ConfigBuilder {
        self.oidc = Some(oidc);
        self
    }

    /// Adds a `[[jwt_issuers]]` entry.
    pub fn jwt_issuer(mut self, issuer: JwtIssuer) -> ConfigBuilder {
        self.jwt_issuers.push(issuer);
        self
    }

    /// The same listeners and settings with no routes, to build a replacement config.
    pub fn without_routes(mut self) -> ConfigBuilder {
        self.routes.clear();
        self
    }

    /// Turns SCIM on at `<scheme>://<host>/scim/v2` with these `(name, secret)` tokens,
    /// replacing any tokens set before (limits set by [`Self::scim_setting`] stay).
    pub fn scim(self, host: &str, tokens: &[(&str, &str)]) -> ConfigBuilder {
        let tokens = tokens
            .iter()
            .map(|(name, secret)| ScimToken::new(name, secret))
            .collect();
        self.scim_tokens(host, tokens)
    }

    /// Like [`Self::scim`], with tokens that may expire or be given by their hash.
    pub fn scim_tokens(mut self, host: &str, tokens: Vec<ScimToken>) -> ConfigBuilder {
        let settings = self.scim.take().map(|s| s.settings).unwrap_or_default();
        self.scim = Some(Scim {
            host: host.to_owned(),
            tokens,
            settings,
        });
        self
    }

    /// Sets `[scim] key = value` (`max_request_body_bytes`, `max_bulk_operations`,
    /// `max_results`), `value` being raw TOML.
    pub fn scim_setting(mut self, key: &str, value: &str) -> ConfigBuilder {
        let scim = self
            .scim
            .as_mut()
            .expect("call .scim(host, tokens) before .scim_setting");
        scim.settings.retain(|(k, _)| k != key);
        scim.settings.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `http://<scim host>:<http port>/scim/v2`.
    pub fn scim_base_url(&self) -> String {
        let scim = self.scim.as_ref().expect("config has no [scim] section");
        self.http_url(&scim.host, "/scim/v2")
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
        if let Some(token) = &self.admin_token {
            let _ = writeln!(out, "token = {token}");
        }
        if let Some(addr) = self.http {
            let _ = match self.http_any_interface {
                false => writeln!(out, "\n[[listeners]]\naddress = \"{addr}\""),
                true => writeln!(
                    out,
                    "\n[[listeners]]\naddress = \"0.0.0.0:{}\"",
                    addr.port()
                ),
            };
            for line in &self.http_settings {
                let _ = writeln!(out, "{line}");
            }
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
            for line in &self.https_settings {
                let _ = writeln!(out, "{line}");
            }
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
        if let Some(oidc) = &self.oidc {
            let _ = writeln!(
                out,
                "\n[oidc]\nissuer = {}\nclient_id = {}\nclient_secret = {}\nauth_host = {}",
                toml_str(&oidc.issuer),
                toml_str(&oidc.client_id),
                toml_str(&oidc.client_secret),
                toml_str(&oidc.auth_host)
            );
            for (key, value) in &oidc.settings {
                let _ = writeln!(out, "{key} = {value}");
            }
        }
        if !self.identity.is_empty() {
            out.push_str("\n[identity]\n");
            for line in &self.identity {
                let _ = writeln!(out, "{line}");
            }
        }
        if !self.console.is_empty() {
            out.push_str("\n[console]\n");
            for line in &self.console {
                let _ = writeln!(out, "{line}");
            }
        }
        if !self.postgres.is_empty() {
            out.push_str("\n[postgres]\n");
            for (key, value) in &self.postgres {
                let _ = writeln!(out, "{key} = {value}");
            }
        }
        for issuer in &self.jwt_issuers {
            let audiences: Vec<String> = issuer.audiences.iter().map(|a| toml_str(a)).collect();
            let _ = writeln!(
                out,
                "\n[[jwt_issuers]]\nissuer = {}\naudiences = [{}]",
                toml_str(&issuer.issuer),
                audiences.join(", ")
            );
            for (key, value) in &issuer.settings {
                let _ = writeln!(out, "{key} = {value}");
            }
        }
        if let Some(scim) = &self.scim {
            let _ = writeln!(out, "\n[scim]\nhost = {}", toml_str(&scim.host));
            for (key, value) in &scim.settings {
                let _ = writeln!(out, "{key} = {value}");
            }
            for token in &scim.tokens {
                let _ = writeln!(out, "\n[[scim.tokens]]\nname = {}", toml_str(&token.name));
                if token.as_sha256 {
                    let _ = writeln!(out, "secret_sha256 = \"{}\"", sha256_hex(&token.secret));
                } else {
                    let _ = writeln!(out, "secret = {}", toml_str(&token.secret));
                }
                if let Some(expires) = &token.expires {
                    let _ = writeln!(out, "expires = {}", toml_str(expires));
                }
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

/// SHA-256 of `text` as lower-case hex, by coreutils' `sha256sum` (as the README tells users
/// to compute `secret_sha256`), which spares the harness a hashing dependency.
fn sha256_hex(text: &str) -> String {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("sha256sum stdin")
        .write_all(text.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    let hex = String::from_utf8_lossy(&out.stdout);
    hex.split_whitespace()
        .next()
        .expect("sha256sum printed a hash")
        .to_owned()
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
