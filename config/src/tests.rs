#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use portcullis_policy::{Policy, RuleSpec};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::*;

/// A directory holding test certificates, made fresh by each test with rcgen:
/// `a.pem`/`a-key.pem` for `App.Example.com` and `*.example.com`, `b.pem`/`b-key.pem` for
/// `b.example.org`, `c.pem`/`c-key.pem` for `app.example.com` alone, and `ca.pem` (a
/// self-signed certificate used as a CA bundle).
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write_pair = |name: &str, sans: &[&str]| {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let pair = rcgen::generate_simple_self_signed(sans).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), pair.cert.pem()).unwrap();
            let key = pair.signing_key.serialize_pem();
            std::fs::write(dir.path().join(format!("{name}-key.pem")), key).unwrap();
        };
        write_pair("a", &["App.Example.com", "*.example.com"]);
        write_pair("b", &["b.example.org"]);
        write_pair("c", &["app.example.com"]);
        write_pair("ca", &["upstream-ca.test"]);
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigErrors> {
        parse(text, self.path(), &|_| None)
    }
}

/// A clear SCIM token long enough to be accepted; `SECRET` in a case's text is replaced by it.
const TOKEN: &str = "a-scim-token-long-enough-to-pass";

/// One plain and one TLS listener, so routes of both schemes are allowed.
const LISTENERS: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a.pem", key = "a-key.pem" }
"#;

/// The required keys of `[oidc]`, four lines without a final newline; `auth_host` is left to
/// each case.
const OIDC: &str = r#"[oidc]
issuer = "https://idp.example.com"
client_id = "portcullis"
client_secret = "SECRET""#;

struct Case {
    name: &'static str,
    /// `LISTENERS` is replaced by [`LISTENERS`], `OIDC` by [`OIDC`], then `SECRET` by [`TOKEN`].
    text: &'static str,
    /// Every problem expected, as (path, line if it matters, part of the message).
    problems: &'static [(&'static str, Option<usize>, &'static str)],
}

#[test]
fn bad_configs() {
    let cases = [
        Case {
            name: "unknown top-level key",
            text: "data_dir = \"data\"\nfoo = 1\nLISTENERS",
            problems: &[("foo", Some(2), "unknown key")],
        },
        Case {
            name: "allow_plain_http on a TLS listener",
            text: "data_dir = \"data\"\n[[listeners]]\naddress = \"127.0.0.1:8443\"\ntls = { cert = \"a.pem\", key = \"a-key.pem\" }\nallow_plain_http = true\n",
            problems: &[("listeners[0].allow_plain_http", Some(5), "plain-HTTP listeners")],
        },
        Case {
            name: "behind_tls_proxy on a TLS listener, and an http route on it alone",
            text: "data_dir = \"data\"\n[[listeners]]\naddress = \"127.0.0.1:8443\"\ntls = { cert = \"a.pem\", key = \"a-key.pem\" }\nbehind_tls_proxy = true\n[[listeners]]\naddress = \"0.0.0.0:8080\"\nbehind_tls_proxy = true\nallow_plain_http = true\n[[routes]]\nfrom = \"http://app.example.com\"\nto = [\"http://127.0.0.1:3000\"]\n",
            problems: &[
                ("listeners[0].behind_tls_proxy", Some(5), "plain-HTTP listeners"),
                ("listeners[1].allow_plain_http", Some(9), "choose one"),
                ("routes[0].from", Some(11), "needs a listener without `tls`"),
            ],
        },
        Case {
            name: "trusted_proxies that are not addresses, or every address",
            text: "data_dir = \"data\"\n[[listeners]]\naddress = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/8\", \"lb.internal\", \"0.0.0.0/0\", \"10.0.0.0/33\", \"10.1.2.3/8\", \"::ffff:10.0.0.5\", \"::ffff:10.0.0.0/104\", \"::ffff:10.1.2.3/104\"]\n",
            problems: &[
                ("listeners[0].trusted_proxies[1]", Some(4), "`lb.internal` is not an IP address"),
                ("listeners[0].trusted_proxies[2]", Some(4), "trusts every address"),
                ("listeners[0].trusted_proxies[3]", Some(4), "not an IP address"),
                ("listeners[0].trusted_proxies[4]", Some(4), "write `10.0.0.0/8` for the network"),
                ("listeners[0].trusted_proxies[5]", Some(4), "IPv4 address or network itself (10.0.0.5)"),
                ("listeners[0].trusted_proxies[6]", Some(4), "IPv4 address or network itself (10.0.0.0/8)"),
                ("listeners[0].trusted_proxies[7]", Some(4), "(10.0.0.0/8 for the network, or 10.1.2.3 alone)"),
            ],
        },
        Case {
            name: "trusted_proxies that add up to every address",
            text: "data_dir = \"data\"\n[[listeners]]\naddress = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/8\", \"0.0.0.0/1\", \"128.0.0.0/2\", \"192.0.0.0/2\"]\n",
            problems: &[("listeners[0].trusted_proxies", Some(4), "add up to `0.0.0.0/0`")],
        },
        Case {
            name: "a duration in `M`, months to humantime, minutes to ISO 8601",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"http://a.example.com\"\nto = [\"http://127.0.0.1:1\"]\nread_timeout = \"5M\"\nconnect_timeout = \"1h 30M\"\n",
            problems: &[
                ("routes[0].read_timeout", None, "`M` is months here"),
                ("routes[0].connect_timeout", None, "`M` is months here"),
            ],
        },
        Case {
            name: "pass_authorization on a route that takes no bearer token",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"http://a.example.com\"\nto = [\"http://127.0.0.1:1\"]\npass_authorization = true\n",
            problems: &[("routes[0].pass_authorization", None, "does not accept \"bearer\"")],
        },
        Case {
            name: "unknown nested keys, all reported",
            text: "data_dir = \"data\"\n[server]\nthreds = 2\n[log]\nformatt = \"json\"\nLISTENERS",
            problems: &[
                ("server.threds", Some(3), "unknown key"),
                ("log.formatt", Some(5), "unknown key"),
            ],
        },
        Case {
            name: "unknown keys in arrays of tables and inline tables",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a.pem", key = "a-key.pem", chain = "x.pem" }
[[routes]]
from = "https://a.example.com"
to = ["http://127.0.0.1:3000"]
[[routes]]
from = "https://b.example.com"
to = ["http://127.0.0.1:3000"]
timeout = "5s"
"#,
            problems: &[
                ("listeners[0].tls.chain", Some(4), "unknown key"),
                ("routes[1].timeout", Some(11), "unknown key"),
            ],
        },
        Case {
            name: "console without [oidc]",
            text: "data_dir = \"data\"\nLISTENERS\n[console]\nallow = { groups = [\"sre\"] }\n",
            problems: &[("console", None, "needs an [oidc] section")],
        },
        Case {
            name: "console: no allow rule, public rules, machines",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\n[console]\ndeny = [{ public = true }]\n",
            problems: &[
                ("console.deny[0].public", None, "never public"),
                ("console.allow", None, "lets in nobody without an allow rule"),
            ],
        },
        Case {
            name: "console: rules checked as a route's",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\n[console]\nallow = { public = true, machines = true, groups = [\"\"] }\n",
            problems: &[
                ("console.allow.public", None, "never public"),
                ("console.allow.machines", None, "does not accept \"bearer\""),
                ("console.allow.groups", None, "adds nobody: `public = true`"),
                ("console.allow.machines", None, "adds nobody: `public = true`"),
                ("console.allow.groups[0]", None, "is empty"),
            ],
        },
        Case {
            // Read as "sre, if signed in" or "alice, publicly": the keys are alternatives.
            name: "names beside a key that lets everyone in",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = [{ groups = ["sre"], any_signed_in = true }, { users = ["alice@example.com"], public = true }]
deny = { groups = ["contractors"], any_signed_in = true }
"#,
            problems: &[
                ("routes[0].allow[0].groups", None, "adds nobody: `any_signed_in = true`"),
                ("routes[0].allow[1].users", None, "adds nobody: `public = true`"),
            ],
        },
        Case {
            name: "postgres: what is wrong with a URL is said, never a password",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=verify-full\"\n",
            problems: &[("postgres.url", None, "sslmode must be require")],
        },
        Case {
            name: "postgres: a libpq option named",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&sslrootcert=/x\"\n",
            problems: &[("postgres.url", None, "`sslrootcert` is libpq's")],
        },
        Case {
            name: "postgres: options that would weaken a commit's answer",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options=-c%20synchronous_commit%3Doff\"\n",
            problems: &[("postgres.url", None, "synchronous_commit=off")],
        },
        Case {
            name: "postgres: options in another spelling",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options=--synchronous-commit%3DLocal\"\n",
            problems: &[("postgres.url", None, "synchronous_commit=local")],
        },
        Case {
            name: "postgres: options as the server reads them, escaped or after another flag",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options=-c%20synchronous_commit%3Dof%5Cf\"\n",
            problems: &[("postgres.url", None, "synchronous_commit=off")],
        },
        Case {
            name: "postgres: options after another flag in one word",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options=-ec%20synchronous%5C_commit%3Doff\"\n",
            problems: &[("postgres.url", None, "synchronous_commit=off")],
        },
        Case {
            name: "postgres: options asking a standby only to write",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options=-c%20synchronous_commit%3Dremote_write\"\n",
            problems: &[("postgres.url", None, "synchronous_commit=remote_write")],
        },
        Case {
            name: "postgres: the stalled-commit timeout is Portcullis'",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options=-cidle_in_transaction_session_timeout%3D0\"\n",
            problems: &[("postgres.url", None, "idle_in_transaction_session_timeout")],
        },
        Case {
            name: "postgres: TLS asked of a Unix socket",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgresql:///portcullis?host=/run/postgresql&sslmode=require\"\n",
            problems: &[("postgres.url", None, "Unix socket, which takes no TLS")],
        },
        Case {
            name: "postgres: a password spilled into the query is not quoted",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://u:pa@ss?secretword=y@h/db?sslmode=require\"\n",
            problems: &[("postgres.url", None, "names an option this driver does not take")],
        },
        Case {
            name: "postgres: every key checked",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=sometimes\"\npool_size = 0\nmax_staleness = \"10m\"\n",
            problems: &[
                ("postgres.url", None, "not a PostgreSQL connection URL"),
                ("postgres.pool_size", None, "must be 1 to 64"),
                ("postgres.max_staleness", None, "at most 1m"),
            ],
        },
        Case {
            name: "rule paths no request to the route has",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://a.example.com/api/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true, paths = ["/api/v1", "/", "/API/x"] }
deny = [{ any_signed_in = true, paths = ["/admin/", "/api"] }, { any_signed_in = true, paths = ["/apix"] }]
"#,
            problems: &[
                ("routes[0].deny[0].paths[0]", None, "starts with `/api/`"),
                ("routes[0].deny[1].paths[0]", None, "never applies"),
            ],
        },
        Case {
            name: "a deny whose paths a deeper route of the host takes",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = [{ groups = ["contractors"], paths = ["/admin/users"] }, { groups = ["contractors"], paths = ["/billing", "/", "/admin"] }]
[[routes]]
from = "https://app.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["contractors"], paths = ["/admin/x"] }
[[routes]]
from = "https://other.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
"#,
            // `/admin` is reported too: of what it names, only spellings like `/admin.json`
            // stay on routes[0]. `/` covers all of routes[0], and `/billing` none of routes[1].
            problems: &[
                (
                    "routes[0].deny[0].paths[0]",
                    None,
                    "requests under `/admin/` go to routes[1]",
                ),
                ("routes[0].deny[1].paths[2]", None, "deny them on routes[1] too"),
            ],
        },
        Case {
            name: "a `*.` route's deny whose paths a host's own deeper route takes",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://*.apps.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["contractors"], paths = ["/admin", "/billing"] }
[[routes]]
from = "https://wiki.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://apps.example.com/billing/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://docs.apps.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://docs.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://blog.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["contractors"] }
[[routes]]
from = "https://status.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
"#,
            // `apps.example.com` itself is no host `*.apps.example.com` covers; `docs` has
            // its own `/` route (the `*.` route is not its), `blog`'s route denies the path
            // to the same callers, `status`'s is public.
            problems: &[(
                "routes[0].deny.paths[0]",
                None,
                "requests under `wiki.apps.example.com/admin/` go to routes[1]",
            )],
        },
        Case {
            name: "a `*.` route's deny that a covered host's route denies to others only",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://*.apps.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["contractors"], paths = ["/admin"] }
[[routes]]
from = "https://app.apps.example.com/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://app.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://ops.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["interns", "Contractors"] }
[[routes]]
from = "https://tools.test/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://*.test"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://intern.apps.example.com/admin/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["interns"] }
"#,
            // `app` has its own `/` route: the `*.` route is never its. `ops` denies the path
            // to those callers and more (named in another case); `intern`, to others only.
            // (A host's deeper route is named first in the file's order: `app` and `ops` come
            // before.) `*.test`, over a one-label domain, is a route like any.
            problems: &[(
                "routes[0].deny.paths[0]",
                None,
                "requests under `intern.apps.example.com/admin/` go to routes[6]",
            )],
        },
        Case {
            name: "patterns where rules and routes compare whole names and prefixes",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes.deny]]
groups = ["contractors"]
paths = ["/admin/*", "/.portcullis/console/", "/admin/%2A"]
[[routes.deny]]
users = ["*@contractor.example"]
groups = ["*"]
methods = ["*"]
agent_groups = ["*"]
[[routes]]
from = "https://app.example.com/admin/*"
to = ["http://127.0.0.1:3000"]
allow = { groups = ["admins"] }
"#,
            problems: &[
                (
                    "routes[0].deny[0].paths[0]",
                    Some(21),
                    "\"/admin/*\" is a pattern, and rules compare what they name whole: paths \
                     are prefixes",
                ),
                ("routes[0].deny[0].paths[1]", Some(21), "[console]'s rules' to say"),
                ("routes[0].deny[0].paths[2]", Some(21), "\"/admin/%2A\" is a pattern"),
                ("routes[0].deny[1].users[0]", Some(23), "\"*@contractor.example\" is a pattern"),
                ("routes[0].deny[1].groups[0]", Some(24), "\"*\" is a pattern"),
                ("routes[0].deny[1].methods[0]", Some(25), "leave `methods` out"),
                ("routes[0].deny[1].agent_groups[0]", Some(26), "`agents = true` for every agent"),
                // And as every agent rule on a route that takes no bearer token.
                ("routes[0].deny[1].agent_groups", Some(26), "does not accept \"bearer\""),
                ("routes[1].from", Some(28), "`/admin/*`: paths are prefixes, not patterns"),
            ],
        },
        Case {
            name: "routes that could never serve",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com/.portcullis/x/"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://app.example.com/.Portcullis"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://zero.example.com"
to = ["http://127.0.0.1:0"]
allow = { any_signed_in = true }
"#,
            problems: &[
                ("routes[0].from", None, "Portcullis' own"),
                ("routes[1].from", None, "Portcullis' own"),
                ("routes[2].to[0]", None, "not a port an upstream listens on"),
            ],
        },
        Case {
            name: "session routes a shared cookie never reaches",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.corp.example.com"
cookie_domain = ".corp.example.com"
[[routes]]
from = "https://grafana.corp.example.net"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "http://wiki.corp.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://*.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://*.apps.corp.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://corp.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://public.example.net"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
"#,
            // Under the domain over https, the domain itself, and public routes are fine.
            problems: &[
                ("routes[0].from", None, "not under cookie_domain `.corp.example.com`"),
                ("routes[1].from", None, "sessions over plain HTTP"),
                ("routes[2].from", None, "not under cookie_domain"),
            ],
        },
        Case {
            name: "a `*.` route deeper than a host's own route",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://*.apps.example.com/admin"
to = ["http://127.0.0.1:3000"]
allow = { groups = ["platform-admins"] }
[[routes]]
from = "https://wiki.apps.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://wiki.apps.example.com/api"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://ci.apps.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
[[routes]]
from = "https://ci.apps.example.com/ADMIN/"
to = ["http://127.0.0.1:3000"]
allow = { groups = ["platform-admins"] }
[[routes]]
from = "https://docs.apps.example.com/public"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
"#,
            // ci has a route of its own for `/admin`; docs' routes do not hold `/admin`.
            problems: &[(
                "routes[0].from",
                None,
                "on `wiki.apps.example.com`, requests under `/admin` go to routes[1]",
            )],
        },
        Case {
            name: "names with spaces around them",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { any_signed_in = true }
deny = { groups = ["contractors "], users = [" mallory@example.com", "Agent:helpdesk-bot"] }
"#,
            problems: &[
                ("routes[0].deny.groups[0]", None, "write \"contractors\""),
                ("routes[0].deny.users[0]", None, "has spaces around it"),
                ("routes[0].deny.users[1]", None, "write \"helpdesk-bot\""),
            ],
        },
        Case {
            name: "postgres: TLS that may be declined in the clear",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://h/db?sslmode=prefer\"\n",
            problems: &[("postgres.url", None, "must say sslmode=require")],
        },
        Case {
            name: "postgres: no host",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres:///portcullis?sslmode=disable\"\n",
            problems: &[("postgres.url", None, "names no host")],
        },
        Case {
            name: "postgres: an address alone, TLS on",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"hostaddr=10.0.0.5 dbname=portcullis sslmode=require\"\n",
            problems: &[("postgres.url", None, "without `host`")],
        },
        Case {
            name: "postgres: an address alone, TLS left to chance",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"postgres://p@/portcullis?hostaddr=10.0.0.5\"\n",
            problems: &[("postgres.url", None, "without `host`")],
        },
        Case {
            name: "postgres: no sslmode at all",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nurl = \"host=db.internal dbname=portcullis\"\n",
            problems: &[("postgres.url", None, "must say sslmode=require")],
        },
        Case {
            name: "postgres: url required, max_staleness not too short",
            text: "data_dir = \"data\"\nLISTENERS\n[postgres]\nmax_staleness = \"10ms\"\n",
            problems: &[
                ("postgres.url", None, "missing required key"),
                ("postgres.max_staleness", None, "at least 200ms"),
            ],
        },
        Case {
            name: "missing data_dir",
            text: "LISTENERS",
            problems: &[("data_dir", None, "missing required key")],
        },
        Case {
            name: "no listeners",
            text: "data_dir = \"data\"\n",
            problems: &[("listeners", None, "at least one [[listeners]]")],
        },
        Case {
            name: "listener without address",
            text: "data_dir = \"data\"\n[[listeners]]\n",
            problems: &[("listeners[0].address", Some(2), "missing required key")],
        },
        Case {
            name: "host name as listener address",
            text: "data_dir = \"data\"\n[[listeners]]\naddress = \"localhost:8080\"\n",
            problems: &[("listeners[0].address", Some(3), "not an IP:port address")],
        },
        Case {
            name: "duplicate listener address",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8080"
[[listeners]]
address = "127.0.0.1:8080"
"#,
            problems: &[(
                "listeners[1].address",
                Some(5),
                "already used by listeners[0]",
            )],
        },
        Case {
            // Both cannot be bound: `serve` would retry for 30 s and serve nothing.
            name: "listener addresses one of which takes the other",
            text: r#"data_dir = "data"
[[listeners]]
address = "0.0.0.0:8080"
[[listeners]]
address = "127.0.0.1:8080"
[[listeners]]
address = "[::]:8443"
[[listeners]]
address = "127.0.0.1:8443"
[[listeners]]
address = "127.0.0.1:0"
[[listeners]]
address = "[::ffff:10.0.0.1]:8080"
"#,
            problems: &[
                ("listeners[1].address", Some(5), "already used by listeners[0]"),
                ("listeners[3].address", Some(9), "already used by listeners[2]"),
                ("listeners[4].address", Some(11), "port 0"),
                ("listeners[5].address", Some(13), "write the IPv4 address itself"),
            ],
        },
        Case {
            // [::1] and 0.0.0.0 share no address (the IPv4 wildcard takes IPv4 only): both
            // are bound, and only the port 0 listener is refused.
            name: "listeners of one port on addresses that do not overlap",
            text: "data_dir = \"data\"\n[[listeners]]\naddress = \"0.0.0.0:8080\"\n[[listeners]]\naddress = \"[::1]:8080\"\n[[listeners]]\naddress = \"[::1]:0\"\n",
            problems: &[("listeners[2].address", Some(7), "port 0")],
        },
        Case {
            name: "admin on an address a listener takes",
            text: "data_dir = \"data\"\nadmin = { address = \"127.0.0.1:9090\" }\n[[listeners]]\naddress = \"0.0.0.0:9090\"\n",
            problems: &[("admin.address", Some(2), "same address as listeners[0]")],
        },
        Case {
            name: "admin on a listener's address",
            text: "data_dir = \"data\"\nadmin = { address = \"127.0.0.1:8080\" }\nLISTENERS",
            problems: &[("admin.address", Some(2), "same address as listeners[0]")],
        },
        Case {
            name: "missing cert file",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "missing.pem", key = "a-key.pem" }
"#,
            problems: &[("listeners[0].tls.cert", Some(4), "cannot read")],
        },
        Case {
            name: "cert file without a certificate",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a-key.pem", key = "a-key.pem" }
"#,
            problems: &[("listeners[0].tls.cert", None, "no PEM certificate")],
        },
        Case {
            name: "key file without a key",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a.pem", key = "a.pem" }
"#,
            problems: &[("listeners[0].tls.key", None, "no PEM private key")],
        },
        Case {
            name: "key not matching cert",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { certificates = [{ cert = "a.pem", key = "a-key.pem" }, { cert = "a.pem", key = "b-key.pem" }] }
"#,
            problems: &[(
                "listeners[0].tls.certificates[1].key",
                Some(4),
                "does not match the certificate",
            )],
        },
        Case {
            // A renewed certificate listed after the one it renews: the old one would be
            // served until it expired.
            name: "certificate whose every name an earlier one has",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { certificates = [{ cert = "a.pem", key = "a-key.pem" }, { cert = "b.pem", key = "b-key.pem" }, { cert = "a.pem", key = "a-key.pem" }] }
"#,
            problems: &[(
                "listeners[0].tls.certificates[2]",
                Some(4),
                "is never served: every DNS name it has (app.example.com, *.example.com) is one an earlier certificate has, and a host is served the first certificate naming it; leave out the one it renews",
            )],
        },
        Case {
            // One for fewer hosts than one before it: served if listed first.
            name: "certificate whose names are some of an earlier one's",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { certificates = [{ cert = "a.pem", key = "a-key.pem" }, { cert = "c.pem", key = "c-key.pem" }] }
"#,
            problems: &[(
                "listeners[0].tls.certificates[1]",
                Some(4),
                "is never served: every DNS name it has (app.example.com) is one an earlier certificate has, and a host is served the first certificate naming it; list it first",
            )],
        },
        Case {
            name: "cert without key",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a.pem" }
"#,
            problems: &[("listeners[0].tls.key", Some(4), "`key` is required")],
        },
        Case {
            name: "tls without certificates",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = {}
"#,
            problems: &[("listeners[0].tls", Some(4), "no certificate")],
        },
        Case {
            name: "https route without a TLS listener",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8080"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
"#,
            problems: &[("routes[0].from", Some(5), "needs a listener with `tls`")],
        },
        Case {
            name: "http route without a plain listener",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a.pem", key = "a-key.pem" }
[[routes]]
from = "http://app.example.com"
to = ["http://127.0.0.1:3000"]
"#,
            problems: &[("routes[0].from", Some(6), "needs a listener without `tls`")],
        },
        Case {
            name: "route with a port in from",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com:8443/\"\nto = [\"http://127.0.0.1:3000\"]\n",
            problems: &[("routes[0].from", None, "port is not allowed")],
        },
        Case {
            name: "a route prefix not spelled as requests are compared",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com/%7Eops//\"\nto = [\"http://127.0.0.1:3000\"]\n",
            problems: &[("routes[0].from", None, "write \"/~ops/\"")],
        },
        Case {
            name: "rule paths not spelled as requests are compared",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"http://a.example.com\"\nto = [\"http://127.0.0.1:1\"]\nallow = { public = true, paths = [\"/wiki/Special%3AExport\", \"/caf\u{e9}\", \"/a%2fb\"] }\n",
            problems: &[
                ("routes[0].allow.paths[0]", None, "write \"/wiki/Special:Export\""),
                ("routes[0].allow.paths[1]", None, "write \"/caf%C3%A9\""),
                ("routes[0].allow.paths[2]", None, "an encoded '/'"),
            ],
        },
        Case {
            name: "route with a query",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com/?a=b\"\nto = [\"http://127.0.0.1:3000\"]\n",
            problems: &[("routes[0].from", None, "query")],
        },
        Case {
            name: "route with userinfo",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://me@app.example.com/\"\nto = [\"http://127.0.0.1:3000\"]\n",
            problems: &[("routes[0].from", None, "user information")],
        },
        Case {
            name: "wildcard not at the start",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.*.example.com/\"\nto = [\"http://127.0.0.1:3000\"]\n",
            problems: &[("routes[0].from", None, "leading `*.`")],
        },
        Case {
            name: "route without to",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\n",
            problems: &[("routes[0].to", None, "missing required key")],
        },
        Case {
            name: "route with empty to",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = []\n",
            problems: &[("routes[0].to", None, "at least one upstream")],
        },
        Case {
            name: "to with a path",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"http://127.0.0.1:3000\", \"http://127.0.0.1:3001/api\"]\n",
            problems: &[("routes[0].to[1]", None, "an upstream URL has no path")],
        },
        Case {
            name: "to with an unknown scheme",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"ftp://127.0.0.1\"]\n",
            problems: &[("routes[0].to[0]", None, "unknown scheme `ftp`")],
        },
        Case {
            name: "an https upstream with `_` in its first label",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"https://billing_api.svc.corp:8443\"]\n",
            problems: &[("routes[0].to[0]", None, "verified as if it were `-`")],
        },
        Case {
            name: "unresolvable upstream host",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"http://no-such-host.invalid:3000\"]\n",
            problems: &[("routes[0].to[0]", None, "no-such-host.invalid")],
        },
        Case {
            name: "missing upstream CA file",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"https://127.0.0.1:3000\"]\ntls_ca = \"nope.pem\"\n",
            problems: &[("routes[0].tls_ca", None, "cannot read")],
        },
        Case {
            name: "missing issuer CA file",
            text: "data_dir = \"data\"\nLISTENERS\n[[jwt_issuers]]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\ntls_ca = \"nope.pem\"\n",
            problems: &[("jwt_issuers[0].tls_ca", None, "cannot read")],
        },
        Case {
            name: "upstream CA with verification off",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"https://127.0.0.1:3000\"]\ntls_verify = false\ntls_ca = \"ca.pem\"\n",
            problems: &[("routes[0].tls_verify", None, "would be ignored")],
        },
        Case {
            name: "upstream CA for upstreams reached in the clear",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"http://127.0.0.1:3000\"]\ntls_ca = \"ca.pem\"\n",
            problems: &[("routes[0].tls_ca", None, "every one of this route's is http")],
        },
        Case {
            name: "upstream CA for upstreams reached in the clear, one refused for another reason",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"http://127.0.0.1:3000\", \"http://127.0.0.1:3001?x\"]\ntls_ca = \"ca.pem\"\n",
            problems: &[
                ("routes[0].to[1]", None, ""),
                ("routes[0].tls_ca", None, "every one of this route's is http"),
            ],
        },
        Case {
            name: "upstream CA beside an https upstream refused for another reason",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"http://127.0.0.1:3000\", \"https://billing_api.svc.corp\"]\ntls_ca = \"ca.pem\"\n",
            problems: &[("routes[0].to[1]", None, "first label has `_`")],
        },
        Case {
            name: "duplicate route",
            text: r#"data_dir = "data"
LISTENERS
[[routes]]
from = "https://App.example.com/api"
to = ["http://127.0.0.1:3000"]

[[routes]]
from = "https://app.example.com/api"
to = ["http://127.0.0.1:3001"]
"#,
            problems: &[("routes[1].from", None, "duplicate route")],
        },
        Case {
            name: "route audiences no issuer takes, or on a route without bearer",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://idp.example.com"
audiences = ["api-a"]
[[routes]]
from = "https://api.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["bearer"]
allow = { machines = true }
audiences = ["api-b", ""]
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
audiences = ["api-a"]
[[routes]]
from = "https://billing.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["bearer"]
allow = { machines = true }
audiences = []
"#,
            problems: &[
                ("routes[0].audiences[0]", None, "no [[jwt_issuers]] takes"),
                ("routes[0].audiences[1]", None, "never empty"),
                ("routes[0].audiences[1]", None, "no [[jwt_issuers]] takes"),
                ("routes[1].audiences", None, "does not accept \"bearer\""),
                ("routes[2].audiences", None, "at least one audience"),
            ],
        },
        Case {
            // Rust reads `+8443` as a port; URL parsers, and so sign-in and key fetches, do not.
            name: "a port with a sign",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com:+8443\"\n",
            problems: &[("oidc.auth_host", None, "is not a port number")],
        },
        Case {
            // The issuer's audiences could not be read: route audiences are not judged
            // against what is left of it.
            name: "route audiences beside an issuer whose audiences have the wrong type",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://idp.example.com"
audiences = "api-a"
[[routes]]
from = "https://api.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["bearer"]
allow = { machines = true }
audiences = ["api-a"]
"#,
            problems: &[("jwt_issuers[0].audiences", None, "")],
        },
        Case {
            // Routes read paths in any case, a trailing `/` optional: the second is unreachable.
            name: "duplicate route, as upstreams read paths",
            text: r#"data_dir = "data"
LISTENERS
[[routes]]
from = "https://app.example.com/Admin/"
to = ["http://127.0.0.1:3000"]

[[routes]]
from = "https://app.example.com/admin"
to = ["http://127.0.0.1:3001"]

[[routes]]
from = "https://app.example.com/admin/x"
to = ["http://127.0.0.1:3001"]
"#,
            problems: &[("routes[1].from", None, "in any case, a trailing `/` optional")],
        },
        Case {
            name: "bad duration",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://app.example.com\"\nto = [\"http://127.0.0.1:3000\"]\nconnect_timeout = \"5 parsecs\"\n",
            problems: &[("routes[0].connect_timeout", None, "not a duration")],
        },
        Case {
            name: "zero duration",
            text: "data_dir = \"data\"\n[server]\nshutdown_timeout = \"0s\"\nLISTENERS",
            problems: &[("server.shutdown_timeout", Some(3), "greater than zero")],
        },
        Case {
            name: "a duration no clock can add",
            text: "data_dir = \"data\"\n[server]\nshutdown_timeout = \"400000000000y\"\nLISTENERS",
            problems: &[("server.shutdown_timeout", Some(3), "at most 10 years")],
        },
        Case {
            name: "reload poll interval too short",
            text: "data_dir = \"data\"\n[server]\nreload_poll_interval = \"10ms\"\nLISTENERS",
            problems: &[("server.reload_poll_interval", Some(3), "at least 100ms")],
        },
        Case {
            name: "client idle timeout of nothing",
            text: "data_dir = \"data\"\n[server]\nclient_idle_timeout = \"0s\"\nLISTENERS",
            problems: &[("server.client_idle_timeout", Some(3), "greater than zero")],
        },
        Case {
            name: "upstream DNS refreshed too often",
            text: "data_dir = \"data\"\n[server]\nupstream_dns_refresh = \"100ms\"\nLISTENERS",
            problems: &[("server.upstream_dns_refresh", Some(3), "at least 1s")],
        },
        Case {
            name: "threads = 0",
            text: "data_dir = \"data\"\n[server]\nthreads = 0\nLISTENERS",
            problems: &[("server.threads", Some(3), "must be 1 to 256")],
        },
        Case {
            name: "header limit out of range",
            text: "data_dir = \"data\"\n[server]\nmax_request_header_bytes = 100\nLISTENERS",
            problems: &[(
                "server.max_request_header_bytes",
                Some(3),
                "must be 1024 to 1048576",
            )],
        },
        Case {
            name: "negative body limit",
            text: "data_dir = \"data\"\n[server]\nmax_request_body_bytes = -1\nLISTENERS",
            problems: &[("server.max_request_body_bytes", Some(3), "at least 0")],
        },
        Case {
            name: "bad log format",
            text: "data_dir = \"data\"\n[log]\nformat = \"xml\"\nLISTENERS",
            problems: &[("log.format", Some(3), "unknown log format `xml`")],
        },
        Case {
            name: "bad log level",
            text: "data_dir = \"data\"\n[log]\nlevel = \"info,=[\"\nLISTENERS",
            problems: &[("log.level", Some(3), "not a valid log filter")],
        },
        Case {
            name: "scim without host",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[("scim.host", Some(10), "missing required key")],
        },
        Case {
            name: "scim host with a scheme",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"https://auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[("scim.host", Some(11), "has a scheme")],
        },
        Case {
            name: "scim host with a path",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com/scim\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[("scim.host", Some(11), "has a path")],
        },
        Case {
            name: "scim host with a port",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com:8443\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[("scim.host", Some(11), "has a port")],
        },
        Case {
            name: "scim host not in lower case",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"Auth.Example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[("scim.host", Some(11), "lower case: `auth.example.com`")],
        },
        Case {
            // Only a route whose every path SCIM takes first: `/scim` on the SCIM host, and
            // `/scim/v2` on another host, are reached.
            name: "a route under /scim/v2 on the SCIM host",
            text: "data_dir = \"data\"\nLISTENERS\n[[routes]]\nfrom = \"https://auth.example.com/scim/v2/\"\nto = [\"http://127.0.0.1:3000\"]\n[[routes]]\nfrom = \"http://auth.example.com/scim/v2/Users\"\nto = [\"http://127.0.0.1:3000\"]\n[[routes]]\nfrom = \"https://auth.example.com/scim\"\nto = [\"http://127.0.0.1:3000\"]\n[[routes]]\nfrom = \"https://app.example.com/scim/v2\"\nto = [\"http://127.0.0.1:3000\"]\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[
                ("routes[0].from", Some(11), "SCIM answers every request under `/scim/v2` on `auth.example.com`"),
                ("routes[1].from", Some(14), "this route would get none of its paths"),
            ],
        },
        Case {
            name: "scim host with a wildcard",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"*.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\n",
            problems: &[("scim.host", Some(11), "not a host name")],
        },
        Case {
            name: "scim limits out of range",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
max_request_body_bytes = 100
max_bulk_operations = 0
max_results = 10001
[[scim.tokens]]
name = "okta"
secret = "SECRET"
"#,
            problems: &[
                ("scim.max_request_body_bytes", Some(12), "must be 1024 to 67108864"),
                ("scim.max_bulk_operations", Some(13), "must be 1 to 10000"),
                ("scim.max_results", Some(14), "must be 1 to 10000"),
            ],
        },
        Case {
            name: "scim without tokens",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n",
            problems: &[("scim.tokens", Some(10), "at least one [[scim.tokens]]")],
        },
        Case {
            name: "scim token without name",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nsecret = \"SECRET\"\n",
            problems: &[("scim.tokens[0].name", Some(12), "missing required key")],
        },
        Case {
            name: "bad scim token names",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta prod"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[[scim.tokens]]
name = ""
secret = "SECRET"
[[scim.tokens]]
name = "a-name-that-goes-on-for-more-than-sixty-four-characters-0123456789"
secret = "another-token-long-enough-0001"
"#,
            problems: &[
                ("scim.tokens[0].name", Some(13), "not a token name"),
                ("scim.tokens[1].name", Some(16), "not a token name"),
                ("scim.tokens[2].name", Some(19), "not a token name"),
            ],
        },
        Case {
            name: "duplicate scim token name",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta"
secret = "SECRET"
[[scim.tokens]]
name = "okta"
secret = "another-token-long-enough-0001"
"#,
            problems: &[(
                "scim.tokens[1].name",
                Some(16),
                "duplicate token name `okta`: already used by scim.tokens[0]",
            )],
        },
        Case {
            name: "scim token with secret and secret_sha256",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta"
secret = "SECRET"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#,
            problems: &[("scim.tokens[0].secret_sha256", Some(15), "not both")],
        },
        Case {
            name: "scim token with neither secret nor secret_sha256",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\n",
            problems: &[(
                "scim.tokens[0].secret",
                Some(12),
                "give `secret` or `secret_sha256`",
            )],
        },
        Case {
            name: "scim token too short",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"only-23-characters-long\"\n",
            problems: &[("scim.tokens[0].secret", Some(14), "at least 24 characters")],
        },
        Case {
            // An editor's second newline at the end of a secret file, say.
            name: "scim token that no client could send",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"a-token-of-enough-characters\\n\"\n",
            problems: &[("scim.tokens[0].secret", Some(14), "spaces or control characters")],
        },
        Case {
            name: "scim token from an unset variable and a missing file",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta"
secret = "env:OKTA_SCIM_TOKEN"
[[scim.tokens]]
name = "azure"
secret = "file:no-such-token"
"#,
            problems: &[
                ("scim.tokens[0].secret", Some(14), "OKTA_SCIM_TOKEN is not set, or is not UTF-8 text"),
                ("scim.tokens[1].secret", Some(17), "cannot read secret file"),
            ],
        },
        Case {
            name: "bad secret_sha256",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "short"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0"
[[scim.tokens]]
name = "not-hex"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0g"
[[scim.tokens]]
name = "signed"
secret_sha256 = "+f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#,
            problems: &[
                ("scim.tokens[0].secret_sha256", Some(14), "64 hexadecimal characters"),
                ("scim.tokens[1].secret_sha256", Some(17), "64 hexadecimal characters"),
                ("scim.tokens[2].secret_sha256", Some(20), "64 hexadecimal characters"),
            ],
        },
        Case {
            name: "the same scim token twice",
            text: r#"data_dir = "data"
LISTENERS
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta"
secret = "SECRET"
[[scim.tokens]]
name = "okta-again"
secret = "SECRET"
[[scim.tokens]]
name = "test"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[[scim.tokens]]
name = "test-again"
secret_sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
"#,
            problems: &[
                ("scim.tokens[1].secret", Some(17), "the same token as scim.tokens[0]"),
                (
                    "scim.tokens[3].secret_sha256",
                    Some(23),
                    "the same token as scim.tokens[2]",
                ),
            ],
        },
        Case {
            name: "bad scim token expiry",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\nexpires = \"2027-01-01\"\n",
            problems: &[("scim.tokens[0].expires", Some(15), "not an RFC 3339 time")],
        },
        Case {
            name: "unknown key in a scim token",
            text: "data_dir = \"data\"\nLISTENERS\n[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"SECRET\"\nexpiry = \"2027-01-01T00:00:00Z\"\n",
            problems: &[("scim.tokens[0].expiry", Some(15), "unknown key")],
        },
        Case {
            name: "oidc without its required keys",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\n",
            problems: &[
                ("oidc.issuer", Some(10), "missing required key"),
                ("oidc.client_id", Some(10), "missing required key"),
                ("oidc.client_secret", Some(10), "missing required key"),
                ("oidc.auth_host", Some(10), "missing required key"),
            ],
        },
        Case {
            name: "oidc issuer over plain http to another machine",
            text: r#"data_dir = "data"
LISTENERS
[oidc]
issuer = "http://idp.example.com"
client_id = "portcullis"
client_secret = "SECRET"
auth_host = "auth.example.com"
"#,
            problems: &[("oidc.issuer", Some(11), "must be https")],
        },
        Case {
            name: "empty client id, empty client secret",
            text: r#"data_dir = "data"
LISTENERS
[oidc]
issuer = "https://idp.example.com"
client_id = " "
client_secret = ""
auth_host = "auth.example.com"
"#,
            problems: &[
                ("oidc.client_id", Some(12), "must not be empty"),
                ("oidc.client_secret", Some(13), "the client secret is empty"),
            ],
        },
        Case {
            // A second newline at the end of the secret's file, an `echo`ed variable.
            name: "client id and secret that the IdP would not recognize",
            text: r#"data_dir = "data"
LISTENERS
[oidc]
issuer = "https://idp.example.com"
client_id = "portcullis "
client_secret = "SECRET\n"
auth_host = "auth.example.com"
"#,
            problems: &[
                ("oidc.client_id", Some(12), "spaces around it or control characters"),
                ("oidc.client_secret", Some(13), "spaces around it or control characters"),
            ],
        },
        Case {
            name: "client secret from an unset variable",
            text: r#"data_dir = "data"
LISTENERS
[oidc]
issuer = "https://idp.example.com"
client_id = "portcullis"
client_secret = "env:IDP_CLIENT_KEY"
auth_host = "auth.example.com"
"#,
            problems: &[("oidc.client_secret", Some(13), "IDP_CLIENT_KEY is not set")],
        },
        Case {
            name: "scopes without openid, with a space, twice",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\nscopes = [\"email\", \"read write\", \"email\"]\n",
            problems: &[
                ("oidc.scopes[1]", Some(15), "not a scope"),
                ("oidc.scopes[2]", Some(15), "`email` is listed twice"),
                ("oidc.scopes", Some(15), "must include \"openid\""),
            ],
        },
        Case {
            name: "Entra ID's v1.0 issuer, for sign-in; its tokens are bearer tokens",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\nissuer = \"https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/\"\nclient_id = \"portcullis\"\nclient_secret = \"SECRET\"\nauth_host = \"auth.example.com\"\n[[jwt_issuers]]\nissuer = \"https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/\"\naudiences = [\"api\"]\n",
            problems: &[(
                "oidc.issuer",
                None,
                "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0",
            )],
        },
        Case {
            name: "Entra ID's v1.0 issuer in the China cloud",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\nissuer = \"https://sts.chinacloudapi.cn/72f988bf-86f1-41af-91ab-2d7cd011db47/\"\nclient_id = \"portcullis\"\nclient_secret = \"SECRET\"\nauth_host = \"auth.example.com\"\n",
            problems: &[(
                "oidc.issuer",
                None,
                "https://login.partner.microsoftonline.cn/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0",
            )],
        },
        Case {
            name: "an issuer on another of Entra ID's names for its sign-in host",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\nissuer = \"https://login.chinacloudapi.cn/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0\"\nclient_id = \"portcullis\"\nclient_secret = \"SECRET\"\nauth_host = \"auth.example.com\"\n[[jwt_issuers]]\nissuer = \"https://login.microsoft.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0\"\naudiences = [\"api\"]\n",
            problems: &[
                ("oidc.issuer", None, "https://login.partner.microsoftonline.cn/<tenant-id>/v2.0"),
                ("jwt_issuers[0].issuer", None, "https://login.microsoftonline.com/<tenant-id>/v2.0"),
            ],
        },
        Case {
            name: "Entra ID's issuer naming its tenant otherwise than by its id",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\nissuer = \"https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0\"\nclient_id = \"portcullis\"\nclient_secret = \"SECRET\"\nauth_host = \"auth.example.com\"\n[[jwt_issuers]]\nissuer = \"https://login.microsoftonline.com/72F988BF-86F1-41AF-91AB-2D7CD011DB47/v2.0\"\naudiences = [\"api\"]\n",
            problems: &[
                ("oidc.issuer", None, "`contoso.onmicrosoft.com` here"),
                ("jwt_issuers[0].issuer", None, "a lower-case GUID"),
            ],
        },
        Case {
            name: "Entra ID's issuer without /v2.0, or with a / after it",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\nissuer = \"https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47\"\nclient_id = \"portcullis\"\nclient_secret = \"SECRET\"\nauth_host = \"auth.example.com\"\n[[jwt_issuers]]\nissuer = \"https://login.microsoftonline.us/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0/\"\naudiences = [\"api\"]\n[[jwt_issuers]]\nissuer = \"https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/\"\naudiences = [\"api\"]\n",
            problems: &[
                ("oidc.issuer", None, "without `/v2.0`, that is the v1.0 endpoint"),
                ("jwt_issuers[0].issuer", None, "`/v2.0/` is not it"),
                ("jwt_issuers[1].issuer", None, "without `/v2.0`"),
            ],
        },
        Case {
            name: "Entra ID's multi-tenant issuers",
            text: "data_dir = \"data\"\nLISTENERS\n[oidc]\nissuer = \"https://login.microsoftonline.com/organizations/v2.0\"\nclient_id = \"portcullis\"\nclient_secret = \"SECRET\"\nauth_host = \"auth.example.com\"\n[[jwt_issuers]]\nissuer = \"https://login.microsoftonline.com/common/v2.0\"\naudiences = [\"api\"]\n",
            problems: &[
                ("oidc.issuer", None, "`organizations` endpoint names no one issuer"),
                ("jwt_issuers[0].issuer", None, "`common` endpoint names no one issuer"),
            ],
        },
        Case {
            name: "an issuer dating its tokens far too early",
            text: "data_dir = \"data\"\nLISTENERS\n[[jwt_issuers]]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\niat_backdate = \"1h\"\n",
            problems: &[("jwt_issuers[0].iat_backdate", Some(13), "at most 10m")],
        },
        Case {
            name: "people found by oid without the profile scope",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\nscopes = [\"openid\", \"email\"]\n[identity]\npreset = \"entra\"\n",
            problems: &[("oidc.scopes", None, "must include \"profile\"")],
        },
        Case {
            name: "auth host with a scheme",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"https://auth.example.com\"\n",
            problems: &[("oidc.auth_host", Some(14), "has a scheme")],
        },
        Case {
            name: "auth host with a path",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com/login\"\n",
            problems: &[("oidc.auth_host", Some(14), "has a path")],
        },
        Case {
            name: "auth host not in lower case",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"Auth.Example.com:8443\"\n",
            problems: &[(
                "oidc.auth_host",
                Some(14),
                "lower case: `auth.example.com:8443`",
            )],
        },
        Case {
            name: "auth host with a wildcard",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"*.example.com\"\n",
            problems: &[("oidc.auth_host", Some(14), "not a host name")],
        },
        Case {
            name: "auth host with a bad port",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com:https\"\n",
            problems: &[("oidc.auth_host", Some(14), "not a port number")],
        },
        Case {
            name: "unknown auth scheme",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\nauth_scheme = \"HTTPS\"\n",
            problems: &[("oidc.auth_scheme", Some(15), "unknown scheme `HTTPS`")],
        },
        Case {
            name: "https sign-in (the default) without a TLS listener",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8080"
OIDC
auth_host = "auth.example.com"
"#,
            problems: &[("oidc.auth_scheme", Some(4), "needs a listener with `tls`")],
        },
        Case {
            name: "http sign-in without a plain listener",
            text: r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "a.pem", key = "a-key.pem" }
OIDC
auth_host = "auth.example.com"
auth_scheme = "http"
"#,
            problems: &[(
                "oidc.auth_scheme",
                Some(10),
                "needs a listener without `tls`",
            )],
        },
        Case {
            name: "cookie domain without a leading dot",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.corp.example.com\"\ncookie_domain = \"corp.example.com\"\n",
            problems: &[("oidc.cookie_domain", Some(15), "must start with `.`")],
        },
        Case {
            name: "cookie domain not covering the auth host",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.corp.example.com:8443\"\ncookie_domain = \".p.example.com\"\n",
            problems: &[(
                "oidc.cookie_domain",
                Some(15),
                "auth_host `auth.corp.example.com` is not under `.p.example.com`",
            )],
        },
        Case {
            name: "cookie domain not in lower case",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.corp.example.com\"\ncookie_domain = \".Corp.example.com\"\n",
            problems: &[(
                "oidc.cookie_domain",
                Some(15),
                "lower case: `.corp.example.com`",
            )],
        },
        Case {
            name: "cookie domain that is a top-level domain",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.corp\"\ncookie_domain = \".corp\"\n",
            problems: &[("oidc.cookie_domain", Some(15), "`.corp` is a top-level domain")],
        },
        Case {
            name: "cookie domain with an IP auth host",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"10.0.0.1\"\ncookie_domain = \".0.0.1\"\n",
            problems: &[("oidc.cookie_domain", Some(15), "not an IP address")],
        },
        Case {
            name: "cookie name with a dot",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\ncookie_name = \"portcullis.session\"\n",
            problems: &[("oidc.cookie_name", Some(15), "not a cookie name")],
        },
        Case {
            name: "cookie name too long",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\ncookie_name = \"a-cookie-name-that-goes-on-for-more-than-sixty-four-characters-01\"\n",
            problems: &[("oidc.cookie_name", Some(15), "1 to 64 characters")],
        },
        Case {
            name: "cookie name with the __Host- prefix",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\ncookie_name = \"__host-session\"\n",
            problems: &[("oidc.cookie_name", Some(15), "without its prefix")],
        },
        Case {
            name: "session timeouts too short or not durations",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
session_idle_timeout = "30s"
session_lifetime = "a day"
"#,
            problems: &[
                ("oidc.session_idle_timeout", Some(15), "at least 1m"),
                ("oidc.session_lifetime", Some(16), "not a duration"),
            ],
        },
        Case {
            name: "id token algorithms: none, HMAC, wrong case, unknown, twice",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
id_token_algorithms = ["RS256", "none", "HS256", "es256", "RS1024", "RS256"]
"#,
            problems: &[
                ("oidc.id_token_algorithms[1]", Some(15), "`none` is never allowed"),
                ("oidc.id_token_algorithms[2]", Some(15), "`HS256` is not allowed"),
                ("oidc.id_token_algorithms[3]", Some(15), "write `ES256`"),
                (
                    "oidc.id_token_algorithms[4]",
                    Some(15),
                    "`RS1024` is not a supported algorithm: expected one of RS256",
                ),
                ("oidc.id_token_algorithms[5]", Some(15), "listed twice"),
            ],
        },
        Case {
            name: "no id token algorithms",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\nid_token_algorithms = []\n",
            problems: &[(
                "oidc.id_token_algorithms",
                Some(15),
                "at least one algorithm",
            )],
        },
        Case {
            name: "relative post-logout redirect",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\npost_logout_redirect = \"/signed-out\"\n",
            problems: &[("oidc.post_logout_redirect", Some(15), "is not a URL")],
        },
        Case {
            name: "post-logout redirect with a fragment",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\npost_logout_redirect = \"https://corp.example.com/#bye\"\n",
            problems: &[("oidc.post_logout_redirect", Some(15), "fragment")],
        },
        Case {
            name: "unknown key in oidc",
            text: "data_dir = \"data\"\nLISTENERS\nOIDC\nauth_host = \"auth.example.com\"\nrefresh_tokens = true\n",
            problems: &[("oidc.refresh_tokens", Some(15), "unknown key")],
        },
        Case {
            name: "jwt issuer without its required keys",
            text: "data_dir = \"data\"\nLISTENERS\n[[jwt_issuers]]\njwks_uri = \"https://idp.example.com/keys\"\n",
            problems: &[
                ("jwt_issuers[0].issuer", Some(10), "missing required key"),
                ("jwt_issuers[0].audiences", Some(10), "missing required key"),
            ],
        },
        Case {
            name: "jwt issuer URLs: http, query, fragment, upper case, not a URL",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "http://idp.example.com"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://idp.example.com/?tenant=1"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://idp.example.com/#x"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://IdP.example.com"
audiences = ["api"]
[[jwt_issuers]]
issuer = "idp.example.com"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://idp.example.com /"
audiences = ["api"]
"#,
            problems: &[
                ("jwt_issuers[0].issuer", Some(11), "must be https"),
                ("jwt_issuers[1].issuer", Some(14), "query"),
                ("jwt_issuers[2].issuer", Some(17), "fragment"),
                ("jwt_issuers[3].issuer", Some(20), "lower case"),
                ("jwt_issuers[4].issuer", Some(23), "not a URL"),
                ("jwt_issuers[5].issuer", Some(26), "no spaces"),
            ],
        },
        Case {
            name: "the same jwt issuer twice",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://idp.example.com/"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://idp.example.com/"
audiences = ["other-api"]
"#,
            problems: &[(
                "jwt_issuers[1].issuer",
                Some(14),
                "already listed in jwt_issuers[0]",
            )],
        },
        Case {
            name: "jwt issuer audiences: none, empty, twice",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://a.example.com"
audiences = []
[[jwt_issuers]]
issuer = "https://b.example.com"
audiences = ["api", "", "api"]
"#,
            problems: &[
                ("jwt_issuers[0].audiences", Some(12), "at least one audience"),
                ("jwt_issuers[1].audiences[1]", Some(15), "never empty"),
                ("jwt_issuers[1].audiences[2]", Some(15), "`api` is listed twice"),
            ],
        },
        Case {
            name: "jwt issuer person clients: none, empty, twice",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://a.example.com"
audiences = ["api"]
person_clients = []
[[jwt_issuers]]
issuer = "https://b.example.com"
audiences = ["api"]
person_clients = ["cli", "", "cli"]
"#,
            problems: &[
                ("jwt_issuers[0].person_clients", Some(13), "at least one client"),
                ("jwt_issuers[1].person_clients[1]", Some(17), "never empty"),
                ("jwt_issuers[1].person_clients[2]", Some(17), "`cli` is listed twice"),
            ],
        },
        Case {
            name: "jwks uri over plain http, with a fragment",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://a.example.com"
audiences = ["api"]
jwks_uri = "http://a.example.com/keys"
[[jwt_issuers]]
issuer = "https://b.example.com"
audiences = ["api"]
jwks_uri = "https://b.example.com/keys#1"
"#,
            problems: &[
                ("jwt_issuers[0].jwks_uri", Some(13), "must be https"),
                ("jwt_issuers[1].jwks_uri", Some(17), "fragment"),
            ],
        },
        Case {
            name: "jwt issuer algorithms and leeway",
            text: r#"data_dir = "data"
LISTENERS
[[jwt_issuers]]
issuer = "https://a.example.com"
audiences = ["api"]
algorithms = ["HS512", "None"]
leeway = "10m"
[[jwt_issuers]]
issuer = "https://b.example.com"
audiences = ["api"]
leeway = "soon"
jwks_refresh = "1s"
"#,
            problems: &[
                ("jwt_issuers[0].algorithms[0]", Some(13), "`HS512` is not allowed"),
                ("jwt_issuers[0].algorithms[1]", Some(13), "`none` is never allowed"),
                ("jwt_issuers[0].leeway", Some(14), "at most 5m"),
                ("jwt_issuers[1].leeway", Some(18), "not a duration"),
                ("jwt_issuers[1].jwks_refresh", Some(19), "at least 10s"),
            ],
        },
        Case {
            name: "route accepting a session without oidc, bearer without issuers",
            text: r#"data_dir = "data"
LISTENERS
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["session", "bearer"]
"#,
            problems: &[
                ("routes[0].accept[0]", Some(13), "needs an [oidc] section"),
                ("routes[0].accept[1]", Some(13), "needs at least one [[jwt_issuers]]"),
                // Still true once `accept` is fixed.
                ("routes[0].allow", Some(10), "no allow rule lets anyone in"),
            ],
        },
        Case {
            name: "route accept: public with others, twice, unknown, empty",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["public", "session"]
[[routes]]
from = "https://b.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["session", "session", "cookie"]
[[routes]]
from = "https://c.example.com"
to = ["http://127.0.0.1:3000"]
accept = []
"#,
            problems: &[
                ("routes[0].accept[0]", Some(18), "cannot be combined"),
                ("routes[1].accept[1]", Some(22), "`session` is listed twice"),
                ("routes[1].accept[2]", Some(22), "unknown credential `cookie`"),
                ("routes[1].allow", Some(19), "no allow rule lets anyone in"),
                ("routes[2].accept", Some(26), "[\"public\"] for no authentication"),
            ],
        },
        Case {
            name: "rules of both forms: every compile problem at its key",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { groups = ["sre", ""], methods = ["GET", "BAD METHOD"] }
deny = { public = true, users = ["mallory@corp.example"] }
[[routes]]
from = "https://b.example.com"
to = ["http://127.0.0.1:3000"]
[[routes.allow]]
email_domains = ["*.corp.*"]
paths = ["admin"]
[[routes.allow]]
methods = []
[[routes.deny]]
group_ids = [""]
"#,
            problems: &[
                ("routes[0].allow.groups[1]", Some(18), "is empty"),
                ("routes[0].allow.methods[1]", Some(18), "not a valid HTTP method"),
                ("routes[0].deny.public", Some(19), "only allowed in allow rules"),
                (
                    "routes[1].allow[0].email_domains[0]",
                    Some(24),
                    "\"*.corp.*\" is not a valid email domain",
                ),
                ("routes[1].allow[0].paths[0]", Some(25), "does not start with /"),
                ("routes[1].allow[1]", Some(26), "the rule names nobody"),
                ("routes[1].allow[1].methods", Some(27), "is an empty list"),
                ("routes[1].deny[0].group_ids[0]", Some(29), "is empty"),
            ],
        },
        Case {
            name: "unknown keys inside rules of both forms",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { groups = ["sre"], group = ["ops"] }
[[routes.deny]]
users = ["mallory@corp.example"]
method = ["DELETE"]
"#,
            problems: &[
                ("routes[0].allow.group", Some(18), "unknown key"),
                ("routes[0].deny[0].method", Some(21), "unknown key"),
            ],
        },
        Case {
            name: "a rule that is not a table",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = "sre"
"#,
            problems: &[("routes[0].allow", Some(18), "expected a rule")],
        },
        Case {
            name: "routes that require sign-in but let nobody in",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
[[routes]]
from = "https://api.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["session"]
deny = { users = ["mallory@corp.example"] }
[[routes]]
from = "https://c.example.com"
to = ["http://127.0.0.1:3000"]
allow = []
deny = []
"#,
            problems: &[
                (
                    "routes[0].allow",
                    Some(15),
                    "route requires sign-in but no allow rule lets anyone in (without `accept`, \
                     a route takes a session when [oidc] is configured)",
                ),
                (
                    "routes[1].allow",
                    Some(18),
                    "route requires sign-in but no allow rule lets anyone in: add",
                ),
                ("routes[2].allow", Some(26), "is an empty list of rules"),
                ("routes[2].deny", Some(27), "is an empty list of rules"),
            ],
        },
        Case {
            name: "rules naming callers on public routes",
            text: r#"data_dir = "data"
LISTENERS
[[routes]]
from = "https://status.example.com"
to = ["http://127.0.0.1:3000"]
allow = { public = true, paths = ["/status"] }
[[routes]]
from = "https://open.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
allow = { groups = ["sre"], any_signed_in = true }
[[routes]]
from = "https://plain.example.com"
to = ["http://127.0.0.1:3000"]
[[routes.deny]]
users = ["mallory@corp.example"]
[[routes.deny]]
public = true
"#,
            problems: &[
                (
                    "routes[1].allow.groups",
                    Some(18),
                    "nobody signs in on this public route (accept = [\"public\"])",
                ),
                ("routes[1].allow.any_signed_in", Some(18), "needs a signed-in caller"),
                (
                    "routes[2].deny[0].users",
                    Some(23),
                    "nobody signs in on this public route (no `accept` and no [oidc])",
                ),
                ("routes[2].deny[1].public", Some(25), "only allowed in allow rules"),
            ],
        },
        Case {
            name: "agent rules on a route that takes no bearer tokens, or naming nobody",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = [{ agents = true }, { agent_owner_groups = ["eng"], agent_groups = [" "] }]
"#,
            problems: &[
                ("routes[0].allow[0].agents", Some(18), "does not accept \"bearer\""),
                (
                    "routes[0].allow[1].agent_groups",
                    Some(18),
                    "does not accept \"bearer\"",
                ),
                (
                    "routes[0].allow[1].agent_owner_groups",
                    Some(18),
                    "does not accept \"bearer\"",
                ),
                ("routes[0].allow[1].agent_groups[0]", Some(18), "is empty"),
            ],
        },
        Case {
            name: "machines on a route that takes no bearer tokens",
            text: r#"data_dir = "data"
LISTENERS
OIDC
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { groups = ["sre"], machines = true }
"#,
            problems: &[(
                "routes[0].allow.machines",
                Some(18),
                "this route does not accept \"bearer\"",
            )],
        },
        Case {
            name: "identity: claims that name nobody, bad header names, sample rate, unknown key",
            text: r#"data_dir = "data"
LISTENERS
[identity]
claim = "groups"
scim_attribute = "username"
machine_claim = "exp"
machine_scim_attribute = "emails"
header_user = "X-User"
header_email = "X-Portcullis User"
header_groups = "X-Portcullis-"
allow_sample_rate = 1.5
colour = "blue"
"#,
            problems: &[
                (
                    "identity.claim",
                    Some(11),
                    "`groups` lists many values, not one caller",
                ),
                ("identity.scim_attribute", Some(12), "write \"userName\""),
                ("identity.machine_claim", Some(13), "`exp` is a time"),
                ("identity.machine_scim_attribute", Some(14), "carries no email address"),
                ("identity.header_user", Some(15), "must start with X-Portcullis-"),
                ("identity.header_email", Some(16), "is not a header name"),
                ("identity.header_groups", Some(17), "and go on after it"),
                ("identity.allow_sample_rate", Some(18), "1.5 is out of range"),
                ("identity.colour", Some(19), "unknown key"),
            ],
        },
        Case {
            name: "identity: sub against emails, headers that clash",
            text: r#"data_dir = "data"
LISTENERS
[identity]
claim = "sub"
scim_attribute = "emails"
machine_scim_attribute = "ExternalID"
header_user = "X-Portcullis-Who_Am_I"
header_email = "x-portcullis-who-am-i"
header_groups = "X-PORTCULLIS-ASSERTION"
allow_sample_rate = nan
"#,
            problems: &[
                ("identity.scim_attribute", Some(12), "not an email address"),
                ("identity.machine_scim_attribute", Some(13), "write \"externalId\""),
                (
                    "identity.header_email",
                    Some(15),
                    "the same header as identity.header_user",
                ),
                ("identity.header_groups", Some(16), "is taken: X-Portcullis-Assertion carries the signed assertion"),
                ("identity.allow_sample_rate", Some(17), "out of range"),
            ],
        },
        Case {
            name: "identity: a header named like a default one",
            text: "data_dir = \"data\"\nLISTENERS\n[identity]\nheader_groups = \"X-Portcullis-user\"\n",
            problems: &[(
                "identity.header_groups",
                Some(11),
                "the same header as identity.header_user",
            )],
        },
        Case {
            name: "identity: headers apart only by a character PHP or lighttpd reads as `_`",
            text: "data_dir = \"data\"\nLISTENERS\n[identity]\nheader_user = \"X-Portcullis-User-Name\"\nheader_email = \"X-Portcullis-User.Name\"\nheader_groups = \"X-Portcullis-User~Name\"\n",
            problems: &[
                (
                    "identity.header_email",
                    Some(12),
                    "the same header as identity.header_user",
                ),
                (
                    "identity.header_groups",
                    Some(13),
                    "the same header as identity.header_user",
                ),
            ],
        },
        Case {
            name: "TOML syntax error",
            text: "data_dir = \"data\"\n[server\nthreads = 2\n",
            problems: &[("", Some(2), "")],
        },
        Case {
            name: "wrong type",
            text: "data_dir = \"data\"\n[server]\nthreads = \"two\"\nLISTENERS",
            problems: &[("server.threads", Some(3), "expected an integer, found a string")],
        },
    ];

    let fixture = Fixture::new();
    for case in cases {
        let text = case
            .text
            .replace("LISTENERS", LISTENERS)
            .replace("OIDC", OIDC)
            .replace("SECRET", TOKEN);
        let errors = match fixture.parse(&text) {
            Ok(_) => panic!("{}: expected problems, the file was accepted", case.name),
            Err(errors) => errors,
        };
        for secret in literal_secrets(&text) {
            assert!(
                !errors.to_string().contains(secret),
                "{}: a problem shows a secret:\n{errors}",
                case.name
            );
        }
        let found = &errors.problems;
        assert_eq!(
            found.len(),
            case.problems.len(),
            "{}: expected {} problem(s), got:\n{errors}",
            case.name,
            case.problems.len()
        );
        for (path, line, message) in case.problems {
            // A key may have several problems: the one whose message says this.
            let problem = found
                .iter()
                .find(|p| p.path == *path && p.message.contains(message))
                .unwrap_or_else(|| {
                    panic!(
                        "{}: no problem at `{path}` saying `{message}`, got:\n{errors}",
                        case.name
                    )
                });
            if line.is_some() {
                assert_eq!(problem.line, *line, "{}: line of `{path}`", case.name);
            }
        }
    }
}

/// The clear secrets written in `text`: every `secret = "..."` or `client_secret = "..."` that
/// is not `env:` or `file:`.
fn literal_secrets(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| {
            line.strip_prefix("secret = \"")
                .or_else(|| line.strip_prefix("client_secret = \""))
        })
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|secret| !secret.is_empty())
        .filter(|secret| !secret.starts_with("env:") && !secret.starts_with("file:"))
        .collect()
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[log]
format = "xml"
colour = true

[[listeners]]
address = "nowhere"

[[routes]]
from = "https://app.example.com:443"
to = ["gopher://127.0.0.1"]
"#;
    let errors = Fixture::new().parse(text).unwrap_err();
    let paths: Vec<&str> = errors.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "log.colour",
            "data_dir",
            "log.format",
            "listeners[0].address",
            "routes[0].from",
            "routes[0].to[0]",
        ]
    );
}

#[test]
fn problems_display_with_line_and_path() {
    let errors = ConfigErrors {
        problems: vec![
            Problem {
                path: "routes[2].to[0]".into(),
                line: Some(12),
                message: "unknown scheme `ftp`".into(),
            },
            Problem {
                path: "data_dir".into(),
                line: None,
                message: "missing required key".into(),
            },
        ],
    };
    assert_eq!(
        errors.to_string(),
        "line 12: routes[2].to[0]: unknown scheme `ftp`\ndata_dir: missing required key"
    );
}

#[test]
fn full_example() {
    let fixture = Fixture::new();
    let text = r#"
data_dir = "./data"

[log]
format = "json"
level = "portcullis=debug,info"

[server]
threads = 4
shutdown_timeout = "10s"
max_request_header_bytes = 16384
max_request_body_bytes = 1000
reload_poll_interval = "500ms"
client_idle_timeout = "3m"
upstream_dns_refresh = "5s"

[admin]
address = "127.0.0.1:9090"

[[listeners]]
address = "127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/64"]

[[listeners]]
address = "[::1]:8443"
tls = { cert = "a.pem", key = "a-key.pem", certificates = [{ cert = "b.pem", key = "b-key.pem" }] }

[[routes]]
from = "https://App.Example.com/prefix"
to = ["http://127.0.0.1:3000", "https://[::1]:8443/"]
preserve_host = true
websockets = true
connect_timeout = "1s"
read_timeout = "2m"
max_request_body_bytes = 2048
tls_ca = "ca.pem"

[[routes]]
from = "http://*.example.com"
to = ["http://127.0.0.1"]
"#;
    let config = fixture.parse(text).unwrap();
    let dir = fixture.path();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    // What was loaded: each listener key with its own chain, the upstream CA's certificates.
    let pem_certs = |file: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(dir.join(file))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let tls = config.listeners[1].tls.as_ref().unwrap();
    let loaded = |i: usize| tls.certificates[i].loaded.clone();
    assert_eq!(loaded(0).0.cert, pem_certs("a.pem"));
    assert_eq!(loaded(1).0.cert, pem_certs("b.pem"));
    let ca: Arc<[CertificateDer<'static>]> = pem_certs("ca.pem").into();
    let public = |name: &str| Arc::new(Policy::compile(vec![public_rule(name)], vec![]).unwrap());
    let expected = Config {
        data_dir: dir.join("./data"),
        log: LogConfig {
            format: LogFormat::Json,
            level: "portcullis=debug,info".into(),
        },
        server: ServerConfig {
            threads: 4,
            shutdown_timeout: Duration::from_secs(10),
            max_request_header_bytes: 16384,
            max_request_body_bytes: 1000,
            reload_poll_interval: Duration::from_millis(500),
            client_idle_timeout: Duration::from_secs(180),
            upstream_dns_refresh: Duration::from_secs(5),
        },
        admin: Some(AdminConfig {
            address: addr("127.0.0.1:9090"),
            token: None,
            allow_plain_http: false,
        }),
        listeners: vec![
            Listener {
                address: addr("127.0.0.1:8080"),
                tls: None,
                allow_plain_http: false,
                behind_tls_proxy: false,
                trusted_proxies: ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/64"]
                    .map(|net| net.parse().unwrap())
                    .to_vec(),
            },
            Listener {
                address: addr("[::1]:8443"),
                allow_plain_http: false,
                behind_tls_proxy: false,
                trusted_proxies: Vec::new(),
                tls: Some(ListenerTls {
                    certificates: vec![
                        CertificateFiles {
                            cert: dir.join("a.pem"),
                            key: dir.join("a-key.pem"),
                            names: vec!["app.example.com".into(), "*.example.com".into()],
                            loaded: loaded(0),
                        },
                        CertificateFiles {
                            cert: dir.join("b.pem"),
                            key: dir.join("b-key.pem"),
                            names: vec!["b.example.org".into()],
                            loaded: loaded(1),
                        },
                    ],
                }),
            },
        ],
        routes: vec![
            Route {
                name: "https://App.Example.com/prefix".into(),
                scheme: Scheme::Https,
                host: "app.example.com".into(),
                path_prefix: "/prefix".into(),
                upstreams: vec![
                    Upstream {
                        url: "http://127.0.0.1:3000".into(),
                        tls: false,
                        host: "127.0.0.1".into(),
                        port: 3000,
                        address: addr("127.0.0.1:3000"),
                        verify_tls: true,
                        ca_file: Some(dir.join("ca.pem")),
                        ca: Some(ca.clone()),
                        host_header: HeaderValue::from_static("127.0.0.1:3000"),
                    },
                    Upstream {
                        url: "https://[::1]:8443/".into(),
                        tls: true,
                        host: "::1".into(),
                        port: 8443,
                        address: addr("[::1]:8443"),
                        verify_tls: true,
                        ca_file: Some(dir.join("ca.pem")),
                        ca: Some(ca.clone()),
                        host_header: HeaderValue::from_static("[::1]:8443"),
                    },
                ],
                preserve_host: true,
                websockets: true,
                connect_timeout: Duration::from_secs(1),
                read_timeout: Duration::from_secs(120),
                max_request_body_bytes: 2048,
                accept: vec![],
                allow: vec![public_rule("routes[0].allow")],
                deny: vec![],
                policy: public("routes[0].allow"),
                identity_headers: true,
                assertion: true,
                token_groups: false,
                pass_authorization: false,
                cors_preflight: false,
                audiences: Vec::new(),
            },
            Route {
                name: "http://*.example.com".into(),
                scheme: Scheme::Http,
                host: "*.example.com".into(),
                path_prefix: "/".into(),
                upstreams: vec![Upstream {
                    url: "http://127.0.0.1".into(),
                    tls: false,
                    host: "127.0.0.1".into(),
                    port: 80,
                    address: addr("127.0.0.1:80"),
                    verify_tls: true,
                    ca_file: None,
                    ca: None,
                    host_header: HeaderValue::from_static("127.0.0.1"),
                }],
                preserve_host: false,
                websockets: false,
                connect_timeout: Duration::from_secs(5),
                read_timeout: Duration::from_secs(60),
                max_request_body_bytes: 1000,
                accept: vec![],
                allow: vec![public_rule("routes[1].allow")],
                deny: vec![],
                policy: public("routes[1].allow"),
                identity_headers: true,
                assertion: true,
                token_groups: false,
                pass_authorization: false,
                cors_preflight: false,
                audiences: Vec::new(),
            },
        ],
        scim: None,
        oidc: None,
        jwt_issuers: vec![],
        identity: IdentityConfig::default(),
        postgres: None,
        console: None,
    };
    assert_eq!(config, expected);
}

/// The rule a public route gets when the file gives it no `allow`.
fn public_rule(name: &str) -> RuleSpec {
    RuleSpec {
        public: true,
        ..RuleSpec::new(name)
    }
}

#[test]
fn entra_issuers_date_their_tokens_five_minutes_early_by_default() {
    let text = r#"
data_dir = "/var/lib/portcullis"
[[listeners]]
address = "0.0.0.0:8080"
[[jwt_issuers]]
issuer = "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/"
audiences = ["api://portcullis"]
iat_backdate = "0s"
[[jwt_issuers]]
issuer = "https://72f988bf-86f1-41af-91ab-2d7cd011db47.ciamlogin.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://corp.okta.com/oauth2/default"
audiences = ["api"]
[[jwt_issuers]]
issuer = "https://corp.b2clogin.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0/"
audiences = ["api"]
"#;
    let config = Fixture::new().parse(text).unwrap();
    let backdates: Vec<Duration> = config.jwt_issuers.iter().map(|i| i.iat_backdate).collect();
    let entra = Duration::from_secs(300);
    // Azure AD B2C's tokens are not dated early.
    assert_eq!(
        backdates,
        [entra, Duration::ZERO, entra, Duration::ZERO, Duration::ZERO]
    );
}

#[test]
fn defaults() {
    let text = r#"
data_dir = "/var/lib/portcullis"
[[listeners]]
address = "0.0.0.0:8080"
[[routes]]
from = "http://app.example.com"
to = ["https://127.0.0.1"]
"#;
    let config = Fixture::new().parse(text).unwrap();
    assert_eq!(config.data_dir, Path::new("/var/lib/portcullis"));
    assert_eq!(
        config.log,
        LogConfig {
            format: LogFormat::Plain,
            level: "info".into()
        }
    );
    let server = &config.server;
    assert!((1..=256).contains(&server.threads));
    assert_eq!(server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(server.max_request_header_bytes, 65536);
    assert_eq!(server.max_request_body_bytes, 10 * 1024 * 1024);
    assert_eq!(server.reload_poll_interval, Duration::from_secs(2));
    assert_eq!(server.client_idle_timeout, Duration::from_secs(75));
    assert_eq!(server.upstream_dns_refresh, Duration::from_secs(30));
    assert_eq!(config.admin, None);
    assert_eq!(config.scim, None);
    assert_eq!(config.oidc, None);
    assert_eq!(config.jwt_issuers, []);
    let route = &config.routes[0];
    // Without [oidc] Portcullis is a plain reverse proxy: routes are public.
    assert_eq!(route.accept, []);
    assert_eq!(route.path_prefix, "/");
    assert!(!route.preserve_host && !route.websockets);
    assert_eq!(route.connect_timeout, Duration::from_secs(5));
    assert_eq!(route.read_timeout, Duration::from_secs(60));
    assert_eq!(route.max_request_body_bytes, 10 * 1024 * 1024);
    let upstream = &route.upstreams[0];
    assert!(upstream.tls && upstream.verify_tls);
    assert_eq!(upstream.port, 443);
    assert_eq!(upstream.ca_file, None);
    // A public route without `allow` is open to everyone through one implicit public rule.
    assert_eq!(route.allow, [public_rule("routes[0].allow")]);
    assert_eq!(route.deny, []);
    assert!(route.identity_headers && route.assertion && !route.token_groups);
    let identity = &config.identity;
    assert_eq!(identity.claim, IdentityClaim::Email);
    assert_eq!(identity.scim_attribute, ScimAttribute::UserName);
    assert_eq!(identity.machine_claim, MachineClaim::Sub);
    assert_eq!(identity.machine_scim_attribute, ScimAttribute::UserName);
    assert_eq!(identity.header_user, "X-Portcullis-User");
    assert_eq!(identity.header_email, "X-Portcullis-Email");
    assert_eq!(identity.header_groups, "X-Portcullis-Groups");
    assert_eq!(identity.allow_sample_rate, 0.0);
    assert_eq!(*identity, IdentityConfig::default());
}

#[test]
fn authorization_rules_in_both_forms() {
    let text = format!(
        r#"
data_dir = "data"
{LISTENERS}
[oidc]
issuer = "https://idp.example.com"
client_id = "portcullis"
client_secret = "a-literal-client-secret"
auth_host = "auth.example.com"

[[jwt_issuers]]
issuer = "https://idp.example.com"
audiences = ["api"]

# One rule each, written as a table.
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = {{ groups = ["sre"], methods = ["GET"] }}
deny = {{ users = ["mallory@corp.example"] }}

# Several, as arrays of tables; every key of a rule.
[[routes]]
from = "https://api.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["session", "bearer"]
identity_headers = false
assertion = false
token_groups = true

[[routes.allow]]
groups = ["sre", "Platform Engineering"]
group_ids = ["00gSRE"]
users = ["alice@corp.example"]
email_domains = ["corp.example", "*.corp.example"]

[[routes.allow]]
machines = true
methods = ["GET", "HEAD"]
paths = ["/v1/", "/v2"]

[[routes.deny]]
any_signed_in = true
paths = ["/admin"]

# Public where a public rule applies, sign-in elsewhere.
[[routes]]
from = "https://docs.example.com"
to = ["http://127.0.0.1:3000"]

[[routes.allow]]
public = true
paths = ["/public/"]

[[routes.allow]]
any_signed_in = true

# Public routes: public rules only, or none.
[[routes]]
from = "https://status.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
allow = {{ public = true, methods = ["GET"] }}

[[routes]]
from = "https://open.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
"#
    );
    let config = Fixture::new().parse(&text).unwrap();
    let strings =
        |values: &[&str]| -> Vec<String> { values.iter().map(|v| v.to_string()).collect() };
    let rule = RuleSpec::new;
    let expected: [(Vec<RuleSpec>, Vec<RuleSpec>); 5] = [
        (
            vec![RuleSpec {
                groups: strings(&["sre"]),
                methods: Some(strings(&["GET"])),
                ..rule("routes[0].allow")
            }],
            vec![RuleSpec {
                users: strings(&["mallory@corp.example"]),
                ..rule("routes[0].deny")
            }],
        ),
        (
            vec![
                RuleSpec {
                    groups: strings(&["sre", "Platform Engineering"]),
                    group_ids: strings(&["00gSRE"]),
                    users: strings(&["alice@corp.example"]),
                    email_domains: strings(&["corp.example", "*.corp.example"]),
                    ..rule("routes[1].allow[0]")
                },
                RuleSpec {
                    machines: true,
                    methods: Some(strings(&["GET", "HEAD"])),
                    paths: Some(strings(&["/v1/", "/v2"])),
                    ..rule("routes[1].allow[1]")
                },
            ],
            vec![RuleSpec {
                any_signed_in: true,
                paths: Some(strings(&["/admin"])),
                ..rule("routes[1].deny[0]")
            }],
        ),
        (
            vec![
                RuleSpec {
                    public: true,
                    paths: Some(strings(&["/public/"])),
                    ..rule("routes[2].allow[0]")
                },
                RuleSpec {
                    any_signed_in: true,
                    ..rule("routes[2].allow[1]")
                },
            ],
            vec![],
        ),
        (
            vec![RuleSpec {
                public: true,
                methods: Some(strings(&["GET"])),
                ..rule("routes[3].allow")
            }],
            vec![],
        ),
        (vec![public_rule("routes[4].allow")], vec![]),
    ];
    for (route, (allow, deny)) in config.routes.iter().zip(expected) {
        assert_eq!(route.allow, allow, "{}", route.name);
        assert_eq!(route.deny, deny, "{}", route.name);
        // What validation accepted compiles.
        let policy = portcullis_policy::Policy::compile(allow, deny).unwrap();
        assert!(!policy.is_empty());
    }
    let flags: Vec<(bool, bool, bool)> = config
        .routes
        .iter()
        .map(|r| (r.identity_headers, r.assertion, r.token_groups))
        .collect();
    let on = (true, true, false);
    assert_eq!(flags, [on, (false, false, true), on, on, on]);
}

#[test]
fn identity() {
    let text = format!(
        r#"
data_dir = "data"
{LISTENERS}
[identity]
claim = "sub"
bearer_claim = "uid"
scim_attribute = "externalId"
machine_claim = "client_id"
machine_scim_attribute = "externalId"
agent_claim = "azp"
agent_scim_attribute = "externalId"
header_user = "x-portcullis-login"
header_email = "X-PORTCULLIS-MAIL"
header_groups = "X-Portcullis-Member_Of"
allow_sample_rate = 1
"#
    );
    let config = Fixture::new().parse(&text).unwrap();
    let expected = IdentityConfig {
        claim: IdentityClaim::Sub,
        bearer_claim: IdentityClaim::Named("uid".to_owned()),
        scim_attribute: ScimAttribute::ExternalId,
        machine_claim: MachineClaim::ClientId,
        machine_scim_attribute: ScimAttribute::ExternalId,
        agent_claim: MachineClaim::Named("azp".to_owned()),
        agent_scim_attribute: AgentAttribute::ExternalId,
        header_user: HeaderName::from_static("x-portcullis-login"),
        header_email: HeaderName::from_static("x-portcullis-mail"),
        header_groups: HeaderName::from_static("x-portcullis-member_of"),
        allow_sample_rate: 1.0,
    };
    assert_eq!(config.identity, expected);

    // Every combination but a `sub` against `emails`.
    for (claim, attribute) in [
        ("email", "userName"),
        ("email", "emails"),
        ("email", "externalId"),
        ("sub", "userName"),
        ("sub", "externalId"),
        ("oid", "externalId"),
        ("preferred_username", "userName"),
        ("upn", "emails"),
        ("https://corp.example/employee_id", "externalId"),
    ] {
        let text = format!(
            "data_dir = \"data\"\n{LISTENERS}\n[identity]\nclaim = \"{claim}\"\n\
             scim_attribute = \"{attribute}\"\nallow_sample_rate = 0.25\n"
        );
        let identity = Fixture::new().parse(&text).unwrap().identity;
        assert_eq!(identity.claim.as_str(), claim);
        assert_eq!(
            identity.bearer_claim.as_str(),
            claim,
            "bearer tokens read it too"
        );
        assert_eq!(identity.scim_attribute.as_str(), attribute);
        assert_eq!(identity.allow_sample_rate, 0.25);
    }
    assert_eq!(MachineClaim::ClientId.as_str(), "client_id");
    let text = format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\nmachine_claim = \"azp\"\n");
    let identity = Fixture::new().parse(&text).unwrap().identity;
    assert_eq!(identity.machine_claim, MachineClaim::Named("azp".into()));

    // Presets fill what each IdP's default SCIM provisioning matches; explicit keys win. A
    // person's bearer token is read by the preset's claim only where the person's claim and
    // attribute are the preset's (left to it, or written the same).
    for (preset, extra, expected) in [
        (
            "entra",
            "",
            ("oid", "externalId", "oid", "externalId", "client_id", "oid"),
        ),
        (
            "okta",
            "",
            ("sub", "externalId", "sub", "userName", "cid", "uid"),
        ),
        (
            "entra",
            "claim = \"preferred_username\"\nscim_attribute = \"userName\"\n",
            (
                "preferred_username",
                "userName",
                "oid",
                "externalId",
                "client_id",
                "preferred_username",
            ),
        ),
        (
            "okta",
            "agent_claim = \"azp\"\n",
            ("sub", "externalId", "sub", "userName", "azp", "uid"),
        ),
        (
            "okta",
            "claim = \"email\"\nscim_attribute = \"emails\"\n",
            ("email", "emails", "sub", "userName", "cid", "email"),
        ),
        (
            "okta",
            "bearer_claim = \"email\"\n",
            ("sub", "externalId", "sub", "userName", "cid", "email"),
        ),
        (
            "okta",
            "scim_attribute = \"externalId\"\n",
            ("sub", "externalId", "sub", "userName", "cid", "uid"),
        ),
        (
            "entra",
            "claim = \"oid\"\nscim_attribute = \"externalId\"\n",
            ("oid", "externalId", "oid", "externalId", "client_id", "oid"),
        ),
    ] {
        let text =
            format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\npreset = \"{preset}\"\n{extra}");
        let identity = Fixture::new().parse(&text).unwrap().identity;
        let got = (
            identity.claim.as_str(),
            identity.scim_attribute.as_str(),
            identity.machine_claim.as_str(),
            identity.machine_scim_attribute.as_str(),
            identity.agent_claim.as_str(),
            identity.bearer_claim.as_str(),
        );
        assert_eq!(got, expected, "{preset} {extra:?}");
    }
    // An agent holding a person's token is found by the client it names: a claim that names
    // the person there is no agent claim.
    for claim in ["sub", "oid", "preferred_username"] {
        let text =
            format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\nagent_claim = \"{claim}\"\n");
        let errors = Fixture::new().parse(&text).unwrap_err();
        assert_eq!(errors.problems[0].path, "identity.agent_claim", "{claim}");
        assert!(
            errors.problems[0].message.contains("names the client"),
            "{claim}"
        );
    }
    for claim in ["client_id", "azp", "cid", "appid"] {
        let text =
            format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\nagent_claim = \"{claim}\"\n");
        let identity = Fixture::new().parse(&text).unwrap().identity;
        assert_eq!(identity.agent_claim.as_str(), claim);
    }
    let text = format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\npreset = \"Entra\"\n");
    let errors = Fixture::new().parse(&text).unwrap_err();
    assert_eq!(errors.problems[0].path, "identity.preset");
    assert!(
        errors.problems[0]
            .message
            .contains("expected \"entra\" or \"okta\""),
        "{}",
        errors.problems[0].message
    );

    // A client's id names no person, but may name a machine.
    let text = format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\nclaim = \"azp\"\n");
    let errors = Fixture::new().parse(&text).unwrap_err();
    assert!(
        errors.problems[0].message.contains("cannot name a person"),
        "{}",
        errors.problems[0].message
    );

    // Claims that never name one caller, and names that are no claim, say why.
    for (claim, says) in [
        ("groups", "lists many values"),
        ("aud", "audience"),
        ("exp", "is a time"),
        ("email_verified", "is a flag"),
        ("", "1 to 128 characters"),
        ("two words", "no spaces"),
        ("tid", "same for many callers"),
    ] {
        for key in ["claim", "machine_claim"] {
            let text =
                format!("data_dir = \"data\"\n{LISTENERS}\n[identity]\n{key} = \"{claim}\"\n");
            let errors = Fixture::new().parse(&text).unwrap_err();
            let problem = &errors.problems[0];
            assert_eq!(problem.path, format!("identity.{key}"), "{claim:?}");
            assert!(
                problem.message.contains(says),
                "{claim:?}: {}",
                problem.message
            );
        }
    }
}

#[test]
fn load_resolves_relative_paths_against_the_file() {
    let fixture = Fixture::new();
    let sub = fixture.path().join("etc");
    std::fs::create_dir(&sub).unwrap();
    let file = sub.join("portcullis.toml");
    let text = r#"
data_dir = "../data"
[[listeners]]
address = "127.0.0.1:8443"
tls = { cert = "../a.pem", key = "../a-key.pem" }
"#;
    std::fs::write(&file, text).unwrap();
    let config = load(&file).unwrap();
    assert_eq!(config.data_dir, sub.join("../data"));
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.certificates[0].cert, sub.join("../a.pem"));
    assert_eq!(tls.certificates[0].key, sub.join("../a-key.pem"));
}

#[test]
fn load_reports_an_unreadable_file() {
    let fixture = Fixture::new();
    let errors = load(&fixture.path().join("missing.toml")).unwrap_err();
    assert_eq!(errors.problems.len(), 1);
    assert!(errors.problems[0].message.contains("cannot read"));
}

#[test]
fn postgres_urls_say_whether_tls_is_required_unless_on_a_unix_socket() {
    let fixture = Fixture::new();
    for url in [
        "postgres://u@db.internal/portcullis?sslmode=require",
        "postgres://u@127.0.0.1:5432/portcullis?sslmode=disable",
        // A Unix socket carries no TLS: nothing to decline.
        "host=/run/postgresql dbname=portcullis",
        "postgres://u@%2Frun%2Fpostgresql/portcullis",
    ] {
        let text = format!("data_dir = \"data\"\n{LISTENERS}\n[postgres]\nurl = \"{url}\"\n");
        if let Err(e) = fixture.parse(&text) {
            panic!("{url}: {e}");
        }
    }
    // What a password spilled into (an option's name, a query) is never quoted.
    for url in [
        "postgres://u:pa@ss?secretword=y@h/db?sslmode=require",
        "host=h password=pa ss secretword=x",
    ] {
        let text = format!("data_dir = \"data\"\n{LISTENERS}\n[postgres]\nurl = \"{url}\"\n");
        let refused = fixture.parse(&text).expect_err("refused").to_string();
        assert!(refused.contains("postgres.url"), "{refused}");
        for word in ["secretword", "pa@ss", "pa ss", "`ss`"] {
            assert!(!refused.contains(word), "{url}: {refused}");
        }
    }
}

#[test]
fn secrets() {
    let fixture = Fixture::new();
    let dir = fixture.path();
    let env = |name: &str| (name == "SET").then(|| "from-env".to_string());
    std::fs::write(dir.join("secret"), "from-file\n").unwrap();
    std::fs::write(dir.join("two-lines"), "from-file\n\n").unwrap();

    let ok = |raw: &str| resolve_secret(raw, &env, dir).unwrap();
    assert_eq!(ok("env:SET").expose(), "from-env");
    assert_eq!(ok("file:secret").expose(), "from-file");
    assert_eq!(ok("file:two-lines").expose(), "from-file\n");
    assert_eq!(ok("literal").expose(), "literal");
    assert_eq!(format!("{:?}", ok("literal")), "Secret(<redacted>)");

    let missing_var = resolve_secret("env:UNSET", &env, dir).unwrap_err();
    assert!(missing_var.contains("UNSET"), "{missing_var}");
    let missing_file = resolve_secret("file:nope", &env, dir).unwrap_err();
    assert!(missing_file.contains(&dir.join("nope").display().to_string()));
}

#[test]
fn scim() {
    let fixture = Fixture::new();
    let dir = fixture.path();
    let okta = "okta-token-from-the-environment-0001";
    let azure = "azure-token-from-a-file-000000000001";
    std::fs::write(dir.join("azure.token"), format!("{azure}\n")).unwrap();
    let env = |name: &str| (name == "OKTA_SCIM_TOKEN").then(|| okta.to_string());
    // The scim host is also a route's host: allowed, /scim/v2 there goes to SCIM.
    let text = format!(
        r#"
data_dir = "data"
{LISTENERS}
[[routes]]
from = "https://auth.corp.example.com"
to = ["http://127.0.0.1:3000"]

[scim]
host = "auth.corp.example.com"
max_request_body_bytes = 2048
max_bulk_operations = 10
max_results = 50

[[scim.tokens]]
name = "okta"
secret = "env:OKTA_SCIM_TOKEN"
expires = "2027-01-01T00:00:00Z"

[[scim.tokens]]
name = "azure.entra_id-1"
secret = "file:azure.token"
expires = "2027-01-01T01:00:00+01:00"

[[scim.tokens]]
name = "test"
secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#
    );
    let config = parse(&text, dir, &env).unwrap();
    let sha256 = |token: &str| -> [u8; 32] { Sha256::digest(token).into() };
    let expected = ScimConfig {
        host: "auth.corp.example.com".into(),
        max_request_body_bytes: 2048,
        max_bulk_operations: 10,
        max_results: 50,
        tokens: vec![
            ScimToken {
                name: "okta".into(),
                sha256: sha256(okta),
                expires_at: Some(1_798_761_600),
            },
            ScimToken {
                name: "azure.entra_id-1".into(),
                sha256: sha256(azure),
                expires_at: Some(1_798_761_600),
            },
            ScimToken {
                name: "test".into(),
                sha256: sha256("test"),
                expires_at: None,
            },
        ],
    };
    assert_eq!(config.scim, Some(expected));

    let debug = format!("{config:?}");
    for secret in [okta, azure] {
        assert!(!debug.contains(secret), "Debug shows a secret: {debug}");
    }
}

#[test]
fn scim_defaults() {
    let text = format!(
        r#"
data_dir = "data"
{LISTENERS}
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta"
secret = "{TOKEN}"
"#
    );
    let scim = Fixture::new().parse(&text).unwrap().scim.unwrap();
    assert_eq!(scim.max_request_body_bytes, 1024 * 1024);
    assert_eq!(scim.max_bulk_operations, 1000);
    assert_eq!(scim.max_results, 1000);
    assert_eq!(scim.tokens[0].expires_at, None);
}

#[test]
fn sign_in() {
    let fixture = Fixture::new();
    let dir = fixture.path();
    let client_secret = "oidc-client-secret-from-the-environment";
    let env = |name: &str| (name == "OIDC_CLIENT_SECRET").then(|| client_secret.to_string());
    let text = format!(
        r#"
data_dir = "data"
{LISTENERS}
[oidc]
issuer = "https://corp.okta.com/"
client_id = "portcullis"
client_secret = "env:OIDC_CLIENT_SECRET"
scopes = ["openid", "email", "groups", "offline_access"]
auth_host = "auth.corp.example.com:8443"
auth_scheme = "http"
cookie_domain = ".corp.example.com"
cookie_name = "pc_session-1"
session_idle_timeout = "30m"
session_lifetime = "12h"
max_sessions_per_person = 3
refresh = true
userinfo = "always"
id_token_algorithms = ["RS384", "RS512", "PS384", "PS512", "ES384", "EdDSA"]
post_logout_redirect = "https://corp.example.com/signed-out?from=portcullis"
tls_ca = "ca.pem"

[[jwt_issuers]]
issuer = "https://corp.okta.com/oauth2/default"
audiences = ["api://portcullis", "api://grafana"]
person_clients = ["0oacli", "0oagrafana"]
jwks_uri = "https://login.example.com/discovery/v2.0/keys?appid=42"
algorithms = ["ES256"]
leeway = "0s"
jwks_refresh = "1m"
iat_backdate = "30s"
tls_ca = "ca.pem"

[[jwt_issuers]]
issuer = "http://127.0.0.1:9000"
audiences = ["test"]

[[routes]]
from = "https://app.corp.example.com"
to = ["http://127.0.0.1:3000"]
allow = {{ any_signed_in = true }}

[[routes]]
from = "https://api.corp.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["bearer"]
allow = {{ machines = true }}

[[routes]]
from = "https://both.corp.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["bearer", "session"]
allow = {{ any_signed_in = true }}

[[routes]]
from = "https://status.corp.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
"#
    );
    let config = parse(&text, dir, &env).unwrap();
    let ca: CaBundle = CertificateDer::pem_file_iter(dir.join("ca.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = OidcConfig {
        issuer: "https://corp.okta.com/".into(),
        client_id: "portcullis".into(),
        client_secret: Secret::new(client_secret.into()),
        scopes: vec![
            "openid".into(),
            "email".into(),
            "groups".into(),
            "offline_access".into(),
        ],
        auth_host: "auth.corp.example.com:8443".into(),
        auth_host_name: "auth.corp.example.com".into(),
        auth_scheme: Scheme::Http,
        cookie_domain: Some(".corp.example.com".into()),
        cookie_name: "pc_session-1".into(),
        session_idle_timeout: Duration::from_secs(30 * 60),
        session_lifetime: Duration::from_secs(12 * 3600),
        max_sessions_per_person: 3,
        refresh: true,
        userinfo: UserInfo::Always,
        id_token_algorithms: vec![
            JwtAlgorithm::RS384,
            JwtAlgorithm::RS512,
            JwtAlgorithm::PS384,
            JwtAlgorithm::PS512,
            JwtAlgorithm::ES384,
            JwtAlgorithm::EdDSA,
        ],
        post_logout_redirect: Some("https://corp.example.com/signed-out?from=portcullis".into()),
        tls_ca: Some(ca.clone()),
    };
    assert_eq!(config.oidc, Some(expected));
    let expected = vec![
        JwtIssuer {
            issuer: "https://corp.okta.com/oauth2/default".into(),
            audiences: vec!["api://portcullis".into(), "api://grafana".into()],
            person_clients: vec!["0oacli".into(), "0oagrafana".into()],
            jwks_uri: Some("https://login.example.com/discovery/v2.0/keys?appid=42".into()),
            algorithms: vec![JwtAlgorithm::ES256],
            leeway: Duration::ZERO,
            jwks_refresh: Duration::from_secs(60),
            iat_backdate: Duration::from_secs(30),
            tls_ca: Some(ca.clone()),
        },
        JwtIssuer {
            issuer: "http://127.0.0.1:9000".into(),
            audiences: vec!["test".into()],
            person_clients: Vec::new(),
            jwks_uri: None,
            algorithms: vec![
                JwtAlgorithm::RS256,
                JwtAlgorithm::ES256,
                JwtAlgorithm::PS256,
                JwtAlgorithm::EdDSA,
            ],
            leeway: Duration::from_secs(60),
            jwks_refresh: JWKS_REFRESH,
            iat_backdate: Duration::ZERO,
            tls_ca: None,
        },
    ];
    assert_eq!(config.jwt_issuers, expected);
    let accept: Vec<&[Credential]> = config.routes.iter().map(|r| &r.accept[..]).collect();
    use Credential::{Bearer, Session};
    assert_eq!(accept, [&[Session][..], &[Bearer], &[Bearer, Session], &[]]);

    let debug = format!("{config:?}");
    assert!(
        !debug.contains(client_secret),
        "Debug shows a secret: {debug}"
    );
}

#[test]
fn sign_in_defaults() {
    let fixture = Fixture::new();
    let text = format!(
        r#"
data_dir = "data"
{LISTENERS}
[oidc]
issuer = "https://idp.example.com"
client_id = "portcullis"
client_secret = "a-literal-client-secret"
auth_host = "auth.example.com"

[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = {{ any_signed_in = true }}
"#
    );
    let config = fixture.parse(&text).unwrap();
    let oidc = config.oidc.as_ref().unwrap();
    assert_eq!(oidc.auth_host_name, "auth.example.com");
    // An IPv6 literal as a request's Host names it: bracketed, in its one text form.
    for (written, name) in [("[0:0::1]:8443", "[::1]"), ("[::1]", "[::1]")] {
        let text = text.replace("\"auth.example.com\"", &format!("\"{written}\""));
        let config = fixture.parse(&text).unwrap();
        assert_eq!(config.oidc.unwrap().auth_host_name, name, "{written}");
    }
    assert_eq!(oidc.issuer, "https://idp.example.com");
    assert_eq!(oidc.client_secret.expose(), "a-literal-client-secret");
    assert_eq!(oidc.scopes, ["openid", "email", "profile"]);
    assert_eq!(oidc.auth_scheme, Scheme::Https);
    assert_eq!(oidc.cookie_domain, None);
    assert_eq!(oidc.cookie_name, "portcullis_session");
    assert_eq!(oidc.session_idle_timeout, Duration::from_secs(8 * 3600));
    assert_eq!(oidc.session_lifetime, Duration::from_secs(24 * 3600));
    assert_eq!(oidc.max_sessions_per_person, 50);
    assert!(!oidc.refresh);
    assert_eq!(
        oidc.id_token_algorithms,
        [
            JwtAlgorithm::RS256,
            JwtAlgorithm::ES256,
            JwtAlgorithm::PS256,
            JwtAlgorithm::EdDSA
        ]
    );
    assert_eq!(oidc.post_logout_redirect, None);
    assert_eq!(config.jwt_issuers, []);
    // With [oidc], a route without `accept` takes a browser session.
    assert_eq!(config.routes[0].accept, [Credential::Session]);
    assert!(!format!("{config:?}").contains("a-literal-client-secret"));
}

/// Without [oidc] a route is public by default, and says so where bearer tokens are taken:
/// one left without `accept` beside [[jwt_issuers]] is refused, not opened to anyone.
#[test]
fn routes_are_public_by_default_without_oidc_and_say_so_with_jwt_issuers() {
    let route = |accept: &str| {
        format!(
            r#"
data_dir = "data"
{LISTENERS}
[[jwt_issuers]]
issuer = "https://idp.example.com"
audiences = ["api"]

[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
{accept}

[[routes]]
from = "https://api.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["bearer"]
allow = {{ machines = true }}
"#
        )
    };
    let fixture = Fixture::new();
    let config = fixture.parse(&route("accept = [\"public\"]")).unwrap();
    assert_eq!(config.routes[0].accept, []);
    assert_eq!(config.routes[1].accept, [Credential::Bearer]);
    let errors = fixture.parse(&route("")).unwrap_err();
    let problems: Vec<&str> = errors.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(problems, ["routes[0].accept"], "{errors}");
    // Its rules are not judged as a public route's: that is what is not known.
    let errors = fixture
        .parse(&route("allow = { machines = true }"))
        .unwrap_err();
    let problems: Vec<&str> = errors.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(problems, ["routes[0].accept"], "{errors}");
    // Without issuers either, nobody signs in: public, as a plain reverse proxy is.
    let plain = route("").replace(
        "[[jwt_issuers]]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\n",
        "",
    );
    let plain = plain.replace("accept = [\"bearer\"]\nallow = { machines = true }\n", "");
    assert_eq!(fixture.parse(&plain).unwrap().routes[0].accept, []);
}

#[test]
fn issuers_over_http_only_on_loopback_and_kept_as_written() {
    let fixture = Fixture::new();
    for issuer in [
        "http://127.0.0.1:9000/",
        "http://localhost:3000",
        "http://[::1]:8080/realms/test/",
        "https://idp.example.com/tenant/",
    ] {
        let text = format!(
            "data_dir = \"data\"\n{LISTENERS}\n[oidc]\nissuer = \"{issuer}\"\nclient_id = \"c\"\n\
             client_secret = \"s\"\nauth_host = \"127.0.0.1:8443\"\n\
             [[jwt_issuers]]\nissuer = \"{issuer}\"\naudiences = [\"api\"]\n"
        );
        let config = fixture.parse(&text).unwrap();
        assert_eq!(config.oidc.unwrap().issuer, issuer);
        assert_eq!(config.jwt_issuers[0].issuer, issuer);
    }
}

#[test]
fn jwt_algorithm_names() {
    let names: Vec<&str> = JwtAlgorithm::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(
        names,
        ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
    );
}

/// What `check-config` prints for `text`: every problem, one a line.
fn check_config_output(text: &str) -> String {
    match Fixture::new().parse(text) {
        Ok(_) => panic!("expected problems, the file was accepted:\n{text}"),
        Err(errors) => errors.to_string(),
    }
}

#[test]
fn a_value_of_the_wrong_type_hides_no_other_problem() {
    let text = r#"data_dir = "data"
[log]
colour = "blue"
[[listeners]]
address = "127.0.0.1:8080"
[[routes]]
from = 42
to = ["http://127.0.0.1:3000"]
read_timeout = "soon"
[[routes]]
from = "http://b.example.com"
"#;
    // The route whose `from` cannot be read is still checked, and is not also told that
    // `from` is missing.
    assert_eq!(
        check_config_output(text),
        "line 3: log.colour: unknown key\n\
         line 7: routes[0].from: expected a string, found an integer\n\
         line 9: routes[0].read_timeout: `soon` is not a duration (expected number at 0): \
         write e.g. \"30s\" or \"500ms\"\n\
         line 10: routes[1].to: missing required key: at least one upstream URL"
    );
}

#[test]
fn a_value_of_the_wrong_type_inside_a_rule() {
    let text = r#"data_dir = "data"
[[listeners]]
address = "127.0.0.1:8080"
[oidc]
issuer = "https://idp.example.com"
client_id = "portcullis"
client_secret = "a-literal-client-secret"
auth_host = "auth.example.com"
auth_scheme = "http"
[[routes]]
from = "http://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = { groups = "sre", paths = ["admin"] }
[[routes.deny]]
users = ["mallory@corp.example"]
methods = ["DELETE", 3]
"#;
    // Without `groups` the allow rule names nobody, and without `methods` the deny rule
    // denies everything: neither is said, as both go away with the type errors.
    assert_eq!(
        check_config_output(text),
        "line 13: routes[0].allow.groups: expected an array, found a string\n\
         line 16: routes[0].deny[0].methods[1]: expected a string, found an integer\n\
         line 13: routes[0].allow.paths[0]: \"admin\" is not a valid path prefix: it does not \
         start with /"
    );
}

#[test]
fn a_value_of_the_wrong_type_in_server_and_a_bad_value_in_oidc() {
    let text = r#"data_dir = "data"
[server]
threads = "two"
[[listeners]]
address = "127.0.0.1:8080"
[oidc]
issuer = "http://idp.example.com"
client_id = "portcullis"
client_secret = "a-literal-client-secret"
auth_host = "auth.example.com"
auth_scheme = "http"
"#;
    assert_eq!(
        check_config_output(text),
        "line 3: server.threads: expected an integer, found a string\n\
         line 7: oidc.issuer: must be https: http is allowed only to 127.0.0.1, localhost or \
         ::1, for tests and demos"
    );
}

#[test]
fn every_value_of_the_wrong_type_is_reported() {
    let text = r#"data_dir = 7
[server]
threads = "two"
shutdown_timeout = 30
[[listeners]]
address = "127.0.0.1:8443"
tls = true
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000", 3000]
preserve_host = "yes"
accept = "bearer"
[scim]
host = "auth.example.com"
[[scim.tokens]]
name = "okta"
secret_sha256 = 1234
expires = 2027-01-01T00:00:00Z
"#;
    // Each key that cannot be read counts as given: the listener as one with `tls` for the
    // https route, `accept` as not known for the rules, `secret_sha256` as the token's hash.
    assert_eq!(
        check_config_output(text),
        "line 1: data_dir: expected a string, found an integer\n\
         line 3: server.threads: expected an integer, found a string\n\
         line 4: server.shutdown_timeout: expected a string, found an integer\n\
         line 7: listeners[0].tls: expected a table, found a boolean\n\
         line 10: routes[0].to[1]: expected a string, found an integer\n\
         line 11: routes[0].preserve_host: expected true or false, found a string\n\
         line 12: routes[0].accept: expected an array, found a string\n\
         line 17: scim.tokens[0].secret_sha256: expected a string, found an integer\n\
         line 18: scim.tokens[0].expires: expected a string, found a date-time"
    );
}

#[test]
fn tables_and_arrays_of_tables_mistaken_for_each_other() {
    let text = r#"data_dir = "data"
server = [4]
[[listeners]]
address = "127.0.0.1:8080"
[[oidc]]
issuer = "https://idp.example.com"
[jwt_issuers]
issuer = "https://idp.example.com"
audiences = ["api"]
[[routes]]
from = "http://app.example.com"
to = ["http://127.0.0.1:3000"]
accept = ["session", "bearer"]
allow = { any_signed_in = true }
"#;
    // A table is never read from an array, element by field (`server = [4]` is not
    // `threads = 4`). The route is not told that "session" needs [oidc] and "bearer"
    // [[jwt_issuers]].
    assert_eq!(
        check_config_output(text),
        "line 2: server: expected a table, found an array\n\
         line 5: oidc: expected a table, found an array\n\
         line 7: jwt_issuers: expected an array, found a table"
    );
}

#[test]
fn a_value_of_the_wrong_type_is_not_quoted() {
    // A token written where the list of tokens goes.
    let text = format!(
        "data_dir = \"data\"\n[[listeners]]\naddress = \"127.0.0.1:8080\"\n[scim]\n\
         host = \"auth.example.com\"\ntokens = \"{TOKEN}\"\n"
    );
    assert_eq!(
        check_config_output(&text),
        "line 6: scim.tokens: expected an array, found a string"
    );
}

#[test]
fn a_toml_syntax_error_is_the_only_problem_reported() {
    // Nothing can be read from a file that is not TOML, so nothing else is reported.
    let text = "data_dir = 7\n[server\nthreads = \"two\"\n";
    assert_eq!(
        check_config_output(text),
        "line 2: unclosed table, expected `]`"
    );
}

#[test]
fn a_route_lists_at_most_32_upstreams() {
    let fixture = Fixture::new();
    let text = |n: u16| {
        let to: Vec<String> = (0..n)
            .map(|i| format!("\"http://127.0.0.1:{}\"", 9000 + i))
            .collect();
        format!(
            "data_dir = \"data\"\n{LISTENERS}\n[[routes]]\nfrom = \"http://app.example.com\"\n\
             to = [{}]\nallow = {{ public = true }}\n",
            to.join(", ")
        )
    };
    assert!(fixture.parse(&text(32)).is_ok());
    let errors = fixture.parse(&text(33)).unwrap_err();
    let problem = &errors.problems[0];
    assert_eq!(problem.path, "routes[0].to");
    assert!(problem.message.contains("at most 32"), "{problem}");
}

#[test]
fn the_admin_token_is_a_secret_kept_with_its_hash() {
    let fixture = Fixture::new();
    let text = |token: &str| {
        format!("data_dir = \"data\"\n{LISTENERS}\n[admin]\naddress = \"127.0.0.1:9\"\ntoken = \"{token}\"\n")
    };
    let config = fixture.parse(&text(TOKEN)).unwrap();
    let token = config.admin.and_then(|a| a.token).unwrap();
    assert_eq!(token.secret.expose(), TOKEN);
    assert_eq!(
        token.sha256,
        <[u8; 32]>::from(Sha256::digest(TOKEN.as_bytes()))
    );
    assert!(!format!("{token:?}").contains(TOKEN), "never in Debug");

    // Off loopback, the token crosses the network in clear: only where the file says so.
    let off_loopback = text(TOKEN).replace("127.0.0.1:9", "0.0.0.0:9");
    let errors = fixture.parse(&off_loopback).unwrap_err();
    let problem = &errors.problems[0];
    assert_eq!(problem.path, "admin.token");
    assert!(problem.message.contains("in clear"), "{problem}");
    assert!(!problem.message.contains(TOKEN), "{problem}");
    let allowed = format!("{off_loopback}allow_plain_http = true\n");
    let admin = fixture.parse(&allowed).unwrap().admin.unwrap();
    assert!(admin.token.is_some());

    // A token of its own: not one an IdP holds for SCIM.
    let with_scim = |admin_token: &str| {
        format!("{}[scim]\nhost = \"auth.example.com\"\n[[scim.tokens]]\nname = \"okta\"\nsecret = \"{TOKEN}\"\n", text(admin_token))
    };
    let errors = fixture.parse(&with_scim(TOKEN)).unwrap_err();
    let problem = &errors.problems[0];
    assert_eq!(problem.path, "admin.token");
    assert!(problem.message.contains("scim.tokens[0]"), "{problem}");
    assert!(!problem.message.contains(TOKEN), "{problem}");
    let other = "another-token-long-enough-to-pass";
    assert!(fixture.parse(&with_scim(other)).is_ok());

    let errors = fixture.parse(&text("short")).unwrap_err();
    let problem = &errors.problems[0];
    assert_eq!(problem.path, "admin.token");
    assert!(problem.message.contains("too short"), "{problem}");
    assert!(
        !problem.message.contains("short\""),
        "the value is not repeated"
    );
}

#[test]
fn the_console_is_a_route_on_the_auth_host_for_sessions() {
    let fx = Fixture::new();
    let text = format!(
        "data_dir = \"data\"\n{LISTENERS}\n{OIDC}\nauth_host = \"auth.example.com:8443\"\n[console]\nallow = {{ groups = [\"sre\"] }}\ndeny = {{ users = [\"mallory@example.com\"] }}\n"
    )
    .replace("SECRET", TOKEN);
    let config = fx.parse(&text).unwrap();
    let console = config.console.unwrap();
    assert_eq!(console.host, "auth.example.com");
    assert_eq!(console.path_prefix, CONSOLE_PATH);
    assert_eq!(console.accept, vec![Credential::Session]);
    assert_eq!(console.allow[0].name, "console.allow");
    assert_eq!(console.deny[0].name, "console.deny");
    assert!(console.upstreams.is_empty());
    assert!(!console.token_groups && !console.assertion && !console.identity_headers);
    let without = fx
        .parse(&format!("data_dir = \"data\"\n{LISTENERS}"))
        .unwrap();
    assert!(without.console.is_none());
}

/// A deny path that covers a deeper route of the host, and more, still protects the rest: it
/// is taken.
#[test]
fn a_deny_wider_than_a_deeper_route_is_taken() {
    let text = format!(
        r#"data_dir = "data"
{LISTENERS}
{OIDC}
auth_host = "auth.example.com"
[[routes]]
from = "https://app.example.com"
to = ["http://127.0.0.1:3000"]
allow = {{ any_signed_in = true }}
deny = {{ groups = ["contractors"], paths = ["/api"] }}
[[routes]]
from = "https://app.example.com/api/public/"
to = ["http://127.0.0.1:3000"]
accept = ["public"]
"#
    );
    let config = Fixture::new().parse(&text).unwrap();
    assert_eq!(config.routes[0].deny.len(), 1);
}

/// A URL written without its scheme may hold a password (`user:password@host`): the problem
/// names the key, not the value.
#[test]
fn a_url_that_may_hold_a_password_is_not_quoted_in_its_problem() {
    let text = format!(
        r#"data_dir = "data"
{LISTENERS}
{OIDC}
auth_host = "auth.example.com"
post_logout_redirect = "signed-out@hunter2"
[[routes]]
from = "https://app.example.com"
to = ["admin:hunter2@10.0.0.5:3000", "https://x:hunter2@y://z", "http:///admin:hunter2@h",
      "http://u:pa/hunter2@h", "http://u:1234/hunter2@h"]
allow = {{ any_signed_in = true }}
"#
    );
    let errors = Fixture::new().parse(&text).unwrap_err().to_string();
    assert!(!errors.contains("hunter2"), "{errors}");
    assert_eq!(errors.matches("not shown").count(), 4, "{errors}");
}

/// Options that ask for more than Portcullis does, or for something else, are taken.
#[test]
fn postgres_options_that_keep_a_commit_s_promise_are_taken() {
    for options in [
        "-c%20synchronous_commit%3Dremote_apply",
        "-csynchronous_commit%3Don%20-c%20statement_timeout%3D5s",
        "--search-path%3Dportcullis",
        // A flag taking a value takes the rest of its word: `c` here is `-B`'s value.
        "-Bc%20synchronous_commit%3Doff",
        "-c%20application_name%3Dsynchronous%5C%20commit",
    ] {
        let text = format!(
            "data_dir = \"data\"\n{LISTENERS}\n[postgres]\nurl = \"postgres://h/db?sslmode=require&options={options}\"\n"
        );
        let config = Fixture::new().parse(&text);
        assert!(config.is_ok(), "{options}: {:?}", config.err());
    }
}
