//! Turning the file as written ([`crate::file`]) into the validated [`Config`]: the only place
//! that checks anything.
//!
//! Every check adds its problem to [`Problems`] and carries on, so one run reports everything
//! that is wrong. A helper returns `None` (or a default) only after adding a problem, and the
//! assembled [`Config`] is returned only if no problem was found at all, so placeholder values
//! never escape.
//!
//! A value of the wrong type is reported while the file is read, and is absent here. Where
//! whether a key is given changes what other keys may be, such a value counts as given
//! ([`Problems::skipped`]), so that `tls = true` is reported once, and not again as a missing
//! TLS listener for every https route.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use portcullis_policy::{Policy, RuleSpec};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::file;
use crate::model::{
    AdminConfig, AdminToken, AgentAttribute, CaBundle, CertificateFiles, Config, Credential,
    IdentityClaim, IdentityConfig, JwtAlgorithm, JwtIssuer, Listener, ListenerTls, LoadedKey,
    LogConfig, LogFormat, MachineClaim, OidcConfig, PostgresConfig, Route, Scheme, ScimAttribute,
    ScimConfig, ScimToken, ServerConfig, Upstream, UserInfo, CONSOLE_PATH, CONSOLE_ROUTE,
    JWKS_REFRESH, MAX_UPSTREAMS,
};
use crate::problems::{KeyPath, Problems};
use crate::tls::{self, PairError};
use crate::{resolve_secret, Resolve};

const MISSING: &str = "missing required key";

/// What reading the file reaches beyond it: the directory its relative paths start from, and
/// how upstream names resolve.
pub(crate) struct Reach<'a> {
    pub base_dir: &'a Path,
    pub resolve: Resolve<'a>,
}

pub(crate) fn convert(
    file: file::File,
    reach: &Reach<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems<'_>,
) -> Option<Config> {
    let base_dir = reach.base_dir;
    let root = KeyPath::default();
    let data_dir = required(file.data_dir, &root.key("data_dir"), p).map(|d| base_dir.join(d));
    let log = log(file.log, &root.key("log"), p);
    let server = server(file.server, &root.key("server"), p);

    let listeners_path = root.key("listeners");
    if file.listeners.is_empty() {
        p.add(&listeners_path, "at least one [[listeners]] is required");
    }
    // Listeners that could not be read may be of either kind.
    let unread_listeners = p.skipped(&listeners_path);
    // A listener behind a proxy that terminates TLS serves https routes, not http ones.
    let behind_tls_proxy = |l: &file::Listener| l.behind_tls_proxy == Some(true);
    let has_tls_listener = unread_listeners
        || file.listeners.iter().enumerate().any(|(i, l)| {
            l.tls.is_some() || behind_tls_proxy(l) || p.skipped(&listeners_path.index(i).key("tls"))
        });
    let has_plain_listener = unread_listeners
        || file
            .listeners
            .iter()
            .any(|l| l.tls.is_none() && !behind_tls_proxy(l));
    let mut listeners = Vec::new();
    let mut addresses: Vec<(SocketAddr, usize)> = Vec::new();
    for (i, raw) in file.listeners.into_iter().enumerate() {
        let path = listeners_path.index(i);
        let address = socket_addr(raw.address, &path.key("address"), p);
        if let Some(address) = address {
            match addresses.iter().find(|(a, _)| binds_over(*a, address)) {
                Some((_, first)) => p.add(
                    &path.key("address"),
                    format!("{address} is already used by listeners[{first}]"),
                ),
                None => addresses.push((address, i)),
            }
        }
        let allow_plain_http = raw.allow_plain_http.unwrap_or(false);
        let behind_tls_proxy = raw.behind_tls_proxy.unwrap_or(false);
        for (key, set) in [
            ("allow_plain_http", allow_plain_http),
            ("behind_tls_proxy", behind_tls_proxy),
        ] {
            if set && raw.tls.is_some() {
                p.add(
                    &path.key(key),
                    "is for plain-HTTP listeners, and this one serves TLS",
                );
            }
        }
        if allow_plain_http && behind_tls_proxy {
            p.add(
                &path.key("allow_plain_http"),
                "says its requests stay http ones, and `behind_tls_proxy` that they are https \
                 ones: choose one",
            );
        }
        let tls = match raw.tls {
            None => Some(None),
            Some(tls) => listener_tls(tls, &path.key("tls"), base_dir, p).map(Some),
        };
        let trusted_proxies = trusted_proxies(
            raw.trusted_proxies.unwrap_or_default(),
            &path.key("trusted_proxies"),
            p,
        );
        listeners.push(address.zip(tls).map(|(address, tls)| Listener {
            address,
            tls,
            allow_plain_http,
            behind_tls_proxy,
            trusted_proxies,
        }));
    }

    let admin = match file.admin {
        None => Some(None),
        Some(admin) => {
            let path = root.key("admin").key("address");
            let address = socket_addr(admin.address, &path, p);
            if let Some((_, i)) = addresses
                .iter()
                .find(|(a, _)| address.is_some_and(|address| binds_over(*a, address)))
            {
                p.add(&path, format!("same address as listeners[{i}]"));
            }
            let token_path = root.key("admin").key("token");
            let token = match admin.token {
                None => Some(None),
                Some(raw) => resolve_secret(&raw, env, base_dir)
                    .and_then(|secret| {
                        let sha256 = token_secret_hash(&raw, env, base_dir)?;
                        Ok(Some(AdminToken { secret, sha256 }))
                    })
                    .map_err(|message| p.add(&token_path, message))
                    .ok(),
            };
            address.zip(token).map(|(address, token)| {
                let admin = AdminConfig {
                    address,
                    token,
                    allow_plain_http: admin.allow_plain_http == Some(true),
                };
                if admin.token_in_clear(address) {
                    p.add(
                        &token_path,
                        "would cross the network in clear: the admin listener has no TLS, and \
                         its address is not loopback; bind it to a loopback address (behind a \
                         TLS-terminating proxy or a sidecar), or set `allow_plain_http = true` \
                         on a network you trust",
                    );
                }
                Some(admin)
            })
        }
    };

    let sign_in = SignIn {
        oidc: file.oidc.is_some() || p.skipped(&root.key("oidc")),
        jwt_issuers: !file.jwt_issuers.is_empty() || p.skipped(&root.key("jwt_issuers")),
    };
    let mut routes = Vec::new();
    let mut route_keys: Vec<(Scheme, String, String, usize)> = Vec::new();
    for (i, raw) in file.routes.into_iter().enumerate() {
        let path = root.key("routes").index(i);
        let from_path = path.key("from");
        let from = required(raw.from.clone(), &from_path, p).and_then(|from| {
            route_from(&from)
                .map_err(|message| p.add(&from_path, message))
                .ok()
        });
        if let Some(from) = &from {
            match from.scheme {
                Scheme::Https if !has_tls_listener => p.add(
                    &from_path,
                    "an https route needs a listener with `tls` (or `behind_tls_proxy`)",
                ),
                Scheme::Http if !has_plain_listener => p.add(
                    &from_path,
                    "an http route needs a listener without `tls` (nor `behind_tls_proxy`)",
                ),
                _ => {}
            }
            // Prefixes are compared as routes read them (see `loosely_same`): `/Admin/` and
            // `/admin` are one prefix, and only one of two such routes could be reached.
            let same = |(scheme, host, prefix, _): &&(Scheme, String, String, usize)| {
                *scheme == from.scheme
                    && *host == from.host
                    && loosely_same(prefix, &from.path_prefix)
            };
            match route_keys.iter().find(same) {
                Some((_, _, _, first)) => p.add(
                    &from_path,
                    format!(
                        "duplicate route: same scheme, host and path as routes[{first}] (paths \
                         are read as upstreams read them: in any case, a trailing `/` optional)"
                    ),
                ),
                None => {
                    route_keys.push((from.scheme, from.host.clone(), from.path_prefix.clone(), i))
                }
            }
        }
        routes.push(route(raw, from, &path, &server, sign_in, reach, p));
    }
    denies_shadowed(&routes, &root.key("routes"), p);
    wildcards_shadowed(&routes, &root.key("routes"), p);

    // The SCIM host may equal a route's host on purpose (see `ScimConfig`): only a route
    // all of whose paths SCIM answers first, as they are spelled, is refused.
    let scim = match file.scim {
        None => Some(None),
        Some(raw) => scim(raw, &root.key("scim"), base_dir, env, p).map(Some),
    };
    if let Some(Some(scim)) = &scim {
        for (_, host, prefix, i) in &route_keys {
            if *host == scim.host && crate::model::under_scim_base(prefix) {
                p.add(
                    &root.key("routes").index(*i).key("from"),
                    format!(
                        "SCIM answers every request under `/scim/v2` on `{host}`, before any \
                         route is looked up: this route would get none of its paths as \
                         written; give SCIM another host, or the route another path"
                    ),
                );
            }
        }
    }

    // Each token says who holds it: a monitoring system given the admin token to scrape
    // `/metrics` must not also be able to write the directory, nor an IdP to read `/explain`.
    if let (Some(Some(admin)), Some(Some(scim))) = (&admin, &scim) {
        let same = admin.token.as_ref().and_then(|admin| {
            scim.tokens
                .iter()
                .position(|token| token.sha256 == admin.sha256)
        });
        if let Some(i) = same {
            p.add(
                &root.key("admin").key("token"),
                format!(
                    "the same token as scim.tokens[{i}]: whoever holds one could use the \
                     other's listener too; give the admin listener a token of its own"
                ),
            );
        }
    }

    let oidc = match file.oidc {
        None => Some(None),
        Some(raw) => {
            let path = root.key("oidc");
            oidc(
                raw,
                &path,
                has_tls_listener,
                has_plain_listener,
                base_dir,
                env,
                p,
            )
            .map(Some)
        }
    };
    let jwt_issuers = jwt_issuers(file.jwt_issuers, &root.key("jwt_issuers"), base_dir, p);
    // A route's audience no issuer takes would refuse every token. (Issuers that had problems
    // may have been read without some of their audiences: not judged against.)
    if let (Some(issuers), false) = (&jwt_issuers, p.troubled(&root.key("jwt_issuers"))) {
        for (i, route) in routes.iter().enumerate() {
            let Some(route) = route else { continue };
            for (j, audience) in route.audiences.iter().enumerate() {
                if !issuers
                    .iter()
                    .any(|issuer| issuer.audiences.contains(audience))
                {
                    p.add(
                        &root.key("routes").index(i).key("audiences").index(j),
                        "no [[jwt_issuers]] takes tokens for this audience (add it to an \
                         issuer's `audiences`)",
                    );
                }
            }
        }
    }
    // Under a `cookie_domain` every host signs in with the one cookie the auth host sets. A
    // route outside the domain never gets it, nor (named `__Secure-` when the auth host is
    // https) a plain-HTTP one: each sign-in would end where it began, again and again.
    if let Some(Some(oidc)) = &oidc {
        if let Some(domain) = &oidc.cookie_domain {
            for (i, route) in routes.iter().enumerate() {
                let Some(route) = route
                    .as_ref()
                    .filter(|r| r.accept.contains(&Credential::Session))
                else {
                    continue;
                };
                let host = route.host.strip_prefix('*').unwrap_or(&route.host);
                let problem = if !oidc.session_cookie_reaches(host, true) {
                    format!(
                        "takes sessions, but its host is not under cookie_domain `{domain}`: the \
                         session cookie never reaches it, and sign-in would start over and over \
                         (serve it under the domain, or take only bearer tokens here)"
                    )
                } else if !oidc.session_cookie_reaches(host, route.scheme == Scheme::Https) {
                    format!(
                        "takes sessions over plain HTTP, but the session cookie shared under \
                         `{domain}` is sent only over https (auth_scheme): sign-in would start \
                         over and over (serve it over https)"
                    )
                } else {
                    continue;
                };
                p.add(&root.key("routes").index(i).key("from"), problem);
            }
        }
    }
    let identity = identity(file.identity, &root.key("identity"), p);
    // Entra ID puts `oid` in an ID token only when the sign-in asks for `profile`, and its
    // UserInfo has no `oid`: without it, everyone would be refused.
    if let (Some(Some(oidc)), IdentityClaim::Named(claim)) = (&oidc, &identity.claim) {
        if claim == "oid" && !oidc.scopes.iter().any(|s| s == "profile") {
            p.add(
                &root.key("oidc").key("scopes"),
                "must include \"profile\" where people are found by `oid`: Entra ID puts `oid` \
                 in an ID token only when the sign-in asks for `profile`",
            );
        }
    }
    let postgres = match file.postgres {
        None => Some(None),
        Some(raw) => postgres(raw, &root.key("postgres"), base_dir, env, p).map(Some),
    };

    let console = match file.console {
        None => Some(None),
        Some(raw) => console(raw, &root.key("console"), oidc.as_ref(), &server, p).map(Some),
    };

    if !p.is_empty() {
        return None;
    }
    Some(Config {
        data_dir: data_dir?,
        log,
        server,
        admin: admin?,
        listeners: listeners.into_iter().collect::<Option<_>>()?,
        routes: routes.into_iter().collect::<Option<_>>()?,
        scim: scim?,
        oidc: oidc?,
        jwt_issuers: jwt_issuers?,
        identity,
        postgres: postgres?,
        console: console?,
    })
}

/// `[console]`: the console is judged as a route Portcullis serves itself, on the auth host
/// under [`CONSOLE_PATH`], to people signed in with a session whom its rules let in. `oidc`
/// is `None` when `[oidc]` could not be read (a problem already).
fn console(
    raw: file::Console,
    path: &KeyPath,
    oidc: Option<&Option<OidcConfig>>,
    server: &ServerConfig,
    p: &mut Problems<'_>,
) -> Option<Route> {
    let public_rules = |rules: &Option<file::Rules>, path: KeyPath| -> Vec<KeyPath> {
        match rules {
            Some(file::Rules::One(rule)) if rule.public == Some(true) => vec![path.key("public")],
            Some(file::Rules::Many(rules)) => rules
                .iter()
                .enumerate()
                .filter(|(_, rule)| rule.public == Some(true))
                .map(|(j, _)| path.index(j).key("public"))
                .collect(),
            _ => Vec::new(),
        }
    };
    for public in public_rules(&raw.allow, path.key("allow"))
        .into_iter()
        .chain(public_rules(&raw.deny, path.key("deny")))
    {
        p.add(
            &public,
            "the console is never public: its pages show the directory and the audit log",
        );
    }
    if raw.allow.is_none() {
        p.add(
            &path.key("allow"),
            "the console lets in nobody without an allow rule: add e.g. \
             `allow = { groups = [\"sre\"] }`, or leave out [console]",
        );
        return None;
    }
    let access = Access::SignIn {
        defaulted: false,
        bearer: false,
    };
    let (allow, deny, policy) = rules(raw.allow, raw.deny, path, CONSOLE_PATH, access, p);
    let oidc = match oidc {
        Some(Some(oidc)) => oidc,
        Some(None) => {
            p.add(
                path,
                "the console is for people who sign in: it needs an [oidc] section",
            );
            return None;
        }
        None => return None,
    };
    Some(Route {
        name: CONSOLE_ROUTE.to_owned(),
        scheme: oidc.auth_scheme,
        host: oidc.auth_host_name.clone(),
        path_prefix: CONSOLE_PATH.to_owned(),
        upstreams: Vec::new(),
        preserve_host: false,
        websockets: false,
        connect_timeout: Duration::ZERO,
        read_timeout: Duration::ZERO,
        max_request_body_bytes: server.max_request_body_bytes.min(64 * 1024),
        accept: vec![Credential::Session],
        allow,
        deny,
        policy: Arc::new(policy?),
        identity_headers: false,
        assertion: false,
        token_groups: false,
        pass_authorization: false,
        audiences: Vec::new(),
        cors_preflight: false,
    })
}

fn log(raw: file::Log, path: &KeyPath, p: &mut Problems<'_>) -> LogConfig {
    let format = match raw.format.as_deref() {
        None | Some("plain") => LogFormat::Plain,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.add(
                &path.key("format"),
                format!("unknown log format `{other}`: expected \"plain\" or \"json\""),
            );
            LogFormat::Plain
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        p.add(&path.key("level"), format!("not a valid log filter: {e}"));
    }
    LogConfig { format, level }
}

fn server(raw: file::Server, path: &KeyPath, p: &mut Problems<'_>) -> ServerConfig {
    let default_threads = || {
        std::thread::available_parallelism()
            .map(|n| n.get().min(256))
            .unwrap_or(1)
    };
    ServerConfig {
        threads: raw
            .threads
            .and_then(|n| in_range(n, 1..=256, &path.key("threads"), p))
            .unwrap_or_else(default_threads),
        shutdown_timeout: duration(
            raw.shutdown_timeout,
            Duration::from_secs(30),
            Duration::ZERO,
            &path.key("shutdown_timeout"),
            p,
        ),
        max_request_header_bytes: raw
            .max_request_header_bytes
            .and_then(|n| {
                in_range(
                    n,
                    1024..=1_048_576,
                    &path.key("max_request_header_bytes"),
                    p,
                )
            })
            .unwrap_or(65_536),
        max_request_body_bytes: raw
            .max_request_body_bytes
            .and_then(|n| in_range(n, 0..=i64::MAX, &path.key("max_request_body_bytes"), p))
            .unwrap_or(10 * 1024 * 1024),
        reload_poll_interval: duration(
            raw.reload_poll_interval,
            Duration::from_secs(2),
            Duration::from_millis(100),
            &path.key("reload_poll_interval"),
            p,
        ),
        client_idle_timeout: duration(
            raw.client_idle_timeout,
            Duration::from_secs(75),
            Duration::from_secs(1),
            &path.key("client_idle_timeout"),
            p,
        ),
        upstream_dns_refresh: duration(
            raw.upstream_dns_refresh,
            Duration::from_secs(30),
            Duration::from_secs(1),
            &path.key("upstream_dns_refresh"),
            p,
        ),
    }
}

fn listener_tls(
    raw: file::Tls,
    path: &KeyPath,
    base_dir: &Path,
    p: &mut Problems<'_>,
) -> Option<ListenerTls> {
    // (where the pair is written, cert, key), the top-level `cert` + `key` first.
    let mut pairs = Vec::new();
    let mut add_pair = |path: KeyPath, cert, key, p: &mut Problems<'_>| match (cert, key) {
        (Some(cert), Some(key)) => pairs.push((path, cert, key)),
        (Some(_), None) => p.add(&path.key("key"), "`cert` is given, so `key` is required"),
        (None, Some(_)) => p.add(&path.key("cert"), "`key` is given, so `cert` is required"),
        (None, None) => {}
    };
    let none_given = raw.cert.is_none()
        && raw.key.is_none()
        && raw.certificates.as_ref().is_none_or(Vec::is_empty);
    add_pair(path.clone(), raw.cert, raw.key, p);
    for (i, pair) in raw.certificates.into_iter().flatten().enumerate() {
        let pair_path = path.key("certificates").index(i);
        if pair.cert.is_none() && pair.key.is_none() {
            p.add(&pair_path, "needs `cert` and `key`");
        }
        add_pair(pair_path, pair.cert, pair.key, p);
    }
    if none_given {
        p.add(
            path,
            "no certificate: give `cert` and `key`, or `certificates`",
        );
        return None;
    }

    let mut certificates = Vec::new();
    // The names served so far: the first certificate naming a host is the one it is served.
    let mut served = HashSet::new();
    for (pair_path, cert, key) in pairs {
        let (cert, key) = (base_dir.join(cert), base_dir.join(key));
        match tls::load_pair(&cert, &key) {
            Ok((certified, names)) => {
                // One never served (a renewed certificate listed after the one it renews, say)
                // would leave the other served until it expires.
                let first = certificates.is_empty();
                let mut new = false;
                for name in &names {
                    new |= served.insert(name.clone());
                }
                if !first && !new {
                    let shown = if names.is_empty() {
                        "it has no DNS name, and only the first certificate is served to a \
                         client naming no host one has"
                            .to_owned()
                    } else {
                        format!(
                            "every DNS name it has ({}) is one an earlier certificate has, and \
                             a host is served the first certificate naming it",
                            names.join(", ")
                        )
                    };
                    // One of the same names is the one it renews; else it names fewer hosts
                    // than one listed before it, and is served listed first.
                    let renews = !names.is_empty()
                        && certificates.iter().any(|c: &CertificateFiles| {
                            c.names.len() == names.len()
                                && names.iter().all(|n| c.names.contains(n))
                        });
                    let hint = if renews {
                        "leave out the one it renews"
                    } else {
                        "list it first"
                    };
                    p.add(
                        &pair_path,
                        format!("{} is never served: {shown}; {hint}", cert.display()),
                    );
                }
                certificates.push(CertificateFiles {
                    cert,
                    key,
                    names,
                    loaded: LoadedKey(Arc::new(certified)),
                });
            }
            Err(errors) => {
                for error in errors {
                    match error {
                        PairError::Cert(message) => p.add(&pair_path.key("cert"), message),
                        PairError::Key(message) => p.add(&pair_path.key("key"), message),
                    }
                }
            }
        }
    }
    Some(ListenerTls { certificates })
}

/// The parts of a route's `from` URL.
struct From {
    scheme: Scheme,
    host: String,
    path_prefix: String,
}

fn route_from(from: &str) -> Result<From, String> {
    let url = split_url(from)?;
    if url.port.is_some() {
        return Err("a port is not allowed in `from`: routes match by host only".to_owned());
    }
    // An IPv6 literal as requests carry it in `Host`: bracketed (and in its one text form).
    let host = match url.host.parse::<Ipv6Addr>() {
        Ok(v6) if url.bracketed => format!("[{v6}]"),
        _ => url.host.to_ascii_lowercase(),
    };
    let name = host.strip_prefix("*.").unwrap_or(&host);
    if !url.bracketed && !is_host_name(name) {
        return Err(format!(
            "`{host}` is not a host name (a leading `*.` is the only wildcard allowed)"
        ));
    }
    let path_prefix = if url.path.is_empty() { "/" } else { url.path };
    if portcullis_policy::loosely_within("/.portcullis", path_prefix) {
        return Err(
            "`/.portcullis/` is Portcullis' own on every host (sign-in, the console): no route \
             serves under it"
                .to_owned(),
        );
    }
    if portcullis_policy::holds_star(path_prefix) {
        return Err(format!(
            "`{path_prefix}`: {}",
            portcullis_policy::PREFIXES_NOT_PATTERNS
        ));
    }
    // Requests are routed by their normalized path: a prefix spelled otherwise would never
    // match, and its requests would fall to another route.
    if let Some(problem) = portcullis_policy::spelling_problem(path_prefix) {
        return Err(problem.to_string());
    }
    Ok(From {
        scheme: url.scheme,
        host,
        path_prefix: path_prefix.to_owned(),
    })
}

/// Which ways of signing in the file configures, deciding what routes may accept.
#[derive(Clone, Copy)]
struct SignIn {
    oidc: bool,
    jwt_issuers: bool,
}

fn route(
    raw: file::Route,
    from: Option<From>,
    path: &KeyPath,
    server: &ServerConfig,
    sign_in: SignIn,
    reach: &Reach<'_>,
    p: &mut Problems<'_>,
) -> Option<Route> {
    let ca = raw.tls_ca.and_then(|ca| {
        let ca = reach.base_dir.join(ca);
        let certificates = ca_bundle(&ca, &path.key("tls_ca"), p)?;
        Some((ca, certificates))
    });
    let verify_tls = raw.tls_verify.unwrap_or(true);
    if !verify_tls && ca.is_some() {
        p.add(
            &path.key("tls_verify"),
            "`tls_verify = false` checks no upstream certificate, so `tls_ca` would be ignored: \
             keep `tls_ca` to verify against it, or drop it",
        );
    }
    let to_path = path.key("to");
    // Read off the schemes as written, whatever else is wrong with an upstream (its own
    // problem is said too).
    let all_http = raw.to.as_ref().is_some_and(|to| {
        !to.is_empty()
            && to.iter().all(|url| {
                url.split_once("://")
                    .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("http"))
            })
    });
    let upstreams = match raw.to {
        None => {
            p.add(&to_path, format!("{MISSING}: at least one upstream URL"));
            Vec::new()
        }
        Some(to) if to.is_empty() => {
            p.add(&to_path, "needs at least one upstream URL");
            Vec::new()
        }
        Some(to) if to.len() > MAX_UPSTREAMS => {
            p.add(
                &to_path,
                format!("at most {MAX_UPSTREAMS} upstreams: put a balancer in front of more"),
            );
            Vec::new()
        }
        Some(to) => to
            .into_iter()
            .enumerate()
            .filter_map(|(j, url)| {
                upstream(url, verify_tls, ca.clone(), reach.resolve)
                    .map_err(|message| p.add(&to_path.index(j), message))
                    .ok()
            })
            .collect(),
    };
    // A CA trusted for upstreams reached in the clear would read as a check that never runs.
    if ca.is_some() && all_http {
        p.add(
            &path.key("tls_ca"),
            "is trusted for https upstreams, and every one of this route's is http: reached in \
             the clear, they are checked by nothing; write `https://` in `to`, or drop `tls_ca`",
        );
    }
    let connect_timeout = duration(
        raw.connect_timeout,
        Duration::from_secs(5),
        Duration::ZERO,
        &path.key("connect_timeout"),
        p,
    );
    let read_timeout = duration(
        raw.read_timeout,
        Duration::from_secs(60),
        Duration::ZERO,
        &path.key("read_timeout"),
        p,
    );
    let max_request_body_bytes = raw
        .max_request_body_bytes
        .and_then(|n| in_range(n, 0..=i64::MAX, &path.key("max_request_body_bytes"), p))
        .unwrap_or(server.max_request_body_bytes);
    let accept_path = path.key("accept");
    let access = if p.skipped(&accept_path) {
        Access::Unknown
    } else {
        Access::of(raw.accept.as_deref(), sign_in)
    };
    let accept = accept(raw.accept, &accept_path, sign_in, p);
    let pass_authorization = raw.pass_authorization.unwrap_or(false);
    if pass_authorization && !accept.contains(&Credential::Bearer) {
        p.add(
            &path.key("pass_authorization"),
            "passes on a verified bearer token, and this route does not accept \"bearer\"",
        );
    }
    let audiences_path = path.key("audiences");
    // Left out, a route takes any audience of its issuers; an empty list (a template's that
    // came out empty) would say the same while meaning to narrow them.
    let audiences = raw.audiences.map_or_else(Vec::new, |audiences| {
        let empty = "needs at least one audience; leave the key out to take any of the issuers'";
        listed(
            audiences,
            &audiences_path,
            empty,
            "an audience is never empty",
            p,
        )
    });
    if !audiences.is_empty() && !p.skipped(&accept_path) && !accept.contains(&Credential::Bearer) {
        p.add(
            &audiences_path,
            "narrows the bearer tokens taken, and this route does not accept \"bearer\"",
        );
    }
    let prefix = from.as_ref().map_or("/", |from| from.path_prefix.as_str());
    let (allow, deny, policy) = rules(raw.allow, raw.deny, path, prefix, access, p);
    let from = from?;
    Some(Route {
        name: raw.from?,
        scheme: from.scheme,
        host: from.host,
        path_prefix: from.path_prefix,
        upstreams,
        preserve_host: raw.preserve_host.unwrap_or(false),
        websockets: raw.websockets.unwrap_or(false),
        connect_timeout,
        read_timeout,
        max_request_body_bytes,
        accept,
        allow,
        deny,
        policy: Arc::new(policy?),
        identity_headers: raw.identity_headers.unwrap_or(true),
        assertion: raw.assertion.unwrap_or(true),
        token_groups: raw.token_groups.unwrap_or(false),
        pass_authorization,
        audiences,
        cors_preflight: raw.cors_preflight.unwrap_or(false),
    })
}

/// The CA certificates of the `tls_ca` file at `file` (already joined to the configuration's
/// directory).
fn ca_bundle(file: &Path, path: &KeyPath, p: &mut Problems<'_>) -> Option<CaBundle> {
    tls::read_ca_certificates(file)
        .map(CaBundle::from)
        .map_err(|message| p.add(path, message))
        .ok()
}

/// A route's `accept`: which credentials it takes. Without the key, routes take a session when
/// `[oidc]` is configured and are public otherwise, so a file without sign-in is a plain
/// reverse proxy.
fn accept(
    raw: Option<Vec<String>>,
    path: &KeyPath,
    sign_in: SignIn,
    p: &mut Problems<'_>,
) -> Vec<Credential> {
    let Some(names) = raw else {
        // Public by default where nobody signs in; with issuers of bearer tokens, a route left
        // without `accept` more likely meant to take them than to be open to anyone.
        if !sign_in.oidc && sign_in.jwt_issuers {
            p.add(
                path,
                "without [oidc], a route that leaves out `accept` is open to anyone, and \
                 [[jwt_issuers]] says callers bring tokens: write `accept = [\"bearer\"]` with \
                 allow rules, or `accept = [\"public\"]` to open it to anyone",
            );
        }
        return if sign_in.oidc {
            vec![Credential::Session]
        } else {
            Vec::new()
        };
    };
    if names.is_empty() {
        p.add(
            path,
            "needs \"session\", \"bearer\" or both, or [\"public\"] for no authentication",
        );
    }
    duplicates(&names, path, p);
    let mut accept = Vec::new();
    for (j, name) in names.iter().enumerate() {
        let item = path.index(j);
        match name.as_str() {
            "session" if !sign_in.oidc => p.add(
                &item,
                "\"session\" needs an [oidc] section: nobody can sign in without one",
            ),
            "session" => accept.push(Credential::Session),
            "bearer" if !sign_in.jwt_issuers => p.add(
                &item,
                "\"bearer\" needs at least one [[jwt_issuers]] to verify tokens against",
            ),
            "bearer" => accept.push(Credential::Bearer),
            "public" if names.iter().any(|n| n != "public") => p.add(
                &item,
                "\"public\" takes no authentication, so it cannot be combined with \
                 \"session\" or \"bearer\"",
            ),
            "public" => {}
            other => p.add(
                &item,
                format!(
                    "unknown credential `{other}`: expected \"session\", \"bearer\" or \"public\""
                ),
            ),
        }
    }
    accept
}

/// Whether a route asks for credentials, read off `accept` as written so that a mistake in
/// `accept` (reported there) does not also make every rule look wrong.
#[derive(Clone, Copy)]
enum Access {
    /// Nobody signs in: `accept = ["public"]` (`written`), or no `accept` and no `[oidc]`.
    Public { written: bool },
    /// Callers sign in; `defaulted` when `accept` is left out and `[oidc]` makes it
    /// `["session"]`.
    SignIn { defaulted: bool, bearer: bool },
    /// `accept` is an empty list, mixes `"public"` with credentials, is not a list of strings,
    /// or is left out beside `[[jwt_issuers]]` without `[oidc]`: already a problem.
    Unknown,
}

impl Access {
    fn of(accept: Option<&[String]>, sign_in: SignIn) -> Self {
        match accept {
            None if sign_in.oidc => Access::SignIn {
                defaulted: true,
                bearer: false,
            },
            // Refused (see `accept`): which was meant is not known.
            None if sign_in.jwt_issuers => Access::Unknown,
            None => Access::Public { written: false },
            Some([]) => Access::Unknown,
            Some(names) if names.iter().all(|n| n == "public") => Access::Public { written: true },
            Some(names) if names.iter().any(|n| n == "public") => Access::Unknown,
            Some(names) => Access::SignIn {
                defaulted: false,
                bearer: names.iter().any(|n| n == "bearer"),
            },
        }
    }
}

/// Reports the paths of deny rules that lie within a deeper route of the same host: requests
/// there go to that route, whose rules alone decide them (see README, "the route with the
/// longest prefix decides"), so the deny protects nothing there. (A deny path that also covers
/// other paths still protects those; an allow rule's path there lets nobody in that the
/// deeper route does not: neither is reported.)
fn denies_shadowed(routes: &[Option<Route>], at: &KeyPath, p: &mut Problems<'_>) {
    // `within(prefix, path)`: whether `path` is within `prefix`, as routes read paths.
    use portcullis_policy::loosely_within as within;
    for (i, route) in routes.iter().enumerate() {
        let Some(route) = route else { continue };
        let deny_at = at.index(i).key("deny");
        for (d, spec) in route.deny.iter().enumerate() {
            let rule_at = if spec.name == deny_at.to_string() {
                deny_at.clone()
            } else {
                deny_at.index(d)
            };
            for (k, rule_path) in spec.paths.iter().flatten().enumerate() {
                // As wide as the route: it means what no `paths` means.
                if within(rule_path, &route.path_prefix) {
                    continue;
                }
                // On its host, or (a `*.` route) on a host it covers that has routes of its
                // own: they take the paths they hold first. Not on a covered host with a route
                // of its own that holds this one's prefix (it never uses the `*.` route there),
                // nor where the deeper route is public or denies the path to those callers:
                // the deny still applies on every other host, and taking it away would guard
                // less.
                let opted_out = |host: &str| {
                    routes
                        .iter()
                        .flatten()
                        .any(|r| r.host == host && within(&r.path_prefix, &route.path_prefix))
                };
                let covered = |other: &Route| match route.host.strip_prefix('*') {
                    Some(suffix) => {
                        other.host.len() > suffix.len()
                            && other.host.ends_with(suffix)
                            && !opted_out(&other.host)
                            && !other.accept.is_empty()
                            && !other.deny.iter().any(|d| {
                                covers_callers(d, spec)
                                    && d.paths.as_ref().is_none_or(|paths| {
                                        paths.iter().any(|p| within(p, rule_path))
                                    })
                            })
                    }
                    None => false,
                };
                let deeper = routes.iter().enumerate().find_map(|(j, other)| {
                    let other = other.as_ref().filter(|o| {
                        j != i
                            && (o.host == route.host || covered(o))
                            && within(&route.path_prefix, &o.path_prefix)
                            && !loosely_same(&o.path_prefix, &route.path_prefix)
                            && within(&o.path_prefix, rule_path)
                    })?;
                    Some((j, other))
                });
                if let Some((j, other)) = deeper {
                    p.add(
                        &rule_at.key("paths").index(k),
                        format!(
                            "requests under `{}` go to routes[{j}], whose rules alone decide \
                             them: this deny does not apply there (deny them on routes[{j}] too)",
                            if other.host == route.host {
                                other.path_prefix.clone()
                            } else {
                                format!("{}{}", other.host, other.path_prefix)
                            }
                        ),
                    );
                }
            }
        }
    }
}

/// Whether deny rule `wide` refuses every caller and method deny rule `narrow` does (their
/// paths aside): all methods or more of them, and everyone signed in, or every group, user,
/// domain and kind `narrow` names (names compared as rules compare them, without case).
fn covers_callers(wide: &RuleSpec, narrow: &RuleSpec) -> bool {
    let within = |narrow: &[String], wide: &[String]| {
        narrow
            .iter()
            .all(|n| wide.iter().any(|w| w.eq_ignore_ascii_case(n)))
    };
    let methods = match (&wide.methods, &narrow.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(wide), Some(narrow)) => within(narrow, wide),
    };
    let callers = wide.any_signed_in
        || (!narrow.any_signed_in
            && within(&narrow.groups, &wide.groups)
            && narrow
                .group_ids
                .iter()
                .all(|id| wide.group_ids.contains(id))
            && within(&narrow.users, &wide.users)
            && within(&narrow.email_domains, &wide.email_domains)
            && (!narrow.machines || wide.machines)
            && (!narrow.agents || wide.agents)
            && within(&narrow.agent_groups, &wide.agent_groups)
            && within(&narrow.agent_owner_groups, &wide.agent_owner_groups));
    methods && callers
}

/// Whether two route prefixes are one as routes read paths (`/api` and `/API/` are): each
/// within the other, by [`portcullis_policy::loosely_within`].
fn loosely_same(a: &str, b: &str) -> bool {
    portcullis_policy::loosely_within(a, b) && portcullis_policy::loosely_within(b, a)
}

/// A `*.` route whose prefix is deeper than what a more specific host's own routes hold
/// (`https://*.apps.example/admin` beside `https://wiki.apps.example`) guards nothing there:
/// a host's own routes take every path one of them holds, so `wiki.apps.example/admin` goes to
/// the wiki's route and its rules. One who wrote the `*.` route meant it to guard `/admin` on
/// every host; that host needs a route of that prefix too.
fn wildcards_shadowed(routes: &[Option<Route>], at: &KeyPath, p: &mut Problems<'_>) {
    use portcullis_policy::{loose_depth, loosely_within as within};
    let all = || {
        routes
            .iter()
            .enumerate()
            .filter_map(|(j, r)| Some((j, r.as_ref()?)))
    };
    for (i, route) in all() {
        let Some(suffix) = route.host.strip_prefix('*') else {
            continue;
        };
        let mut hosts: Vec<&str> = Vec::new();
        for (_, other) in all() {
            let narrower = other.host != route.host
                && other.host.len() > suffix.len()
                && other.host.ends_with(suffix);
            if narrower && !hosts.contains(&other.host.as_str()) {
                hosts.push(&other.host);
            }
        }
        for host in hosts {
            let of_host = || all().filter(move |(_, r)| r.host == host);
            if of_host().any(|(_, r)| loosely_same(&r.path_prefix, &route.path_prefix)) {
                continue;
            }
            let taking = of_host()
                .filter(|(_, r)| within(&r.path_prefix, &route.path_prefix))
                .max_by_key(|(_, r)| loose_depth(&r.path_prefix));
            let Some((j, _)) = taking else { continue };
            p.add(
                &at.index(i).key("from"),
                format!(
                    "on `{host}`, requests under `{prefix}` go to routes[{j}] (a host's own \
                     routes take the paths they hold before a `*.` route does), so this \
                     route's rules do not apply there: add a route for `{scheme}://{host}{prefix}` \
                     with the rules it needs",
                    scheme = if route.scheme == Scheme::Https {
                        "https"
                    } else {
                        "http"
                    },
                    prefix = route.path_prefix,
                ),
            );
        }
    }
}

/// A route's `allow` and `deny` rules, each named by its key path, checked by compiling them
/// with [`Policy::compile`] (every problem it finds is reported at its key), and checked
/// against the route's `accept`: a route that asks for credentials must let someone in, and
/// a public route has nobody signed in for its rules to name.
/// The rules of a route (or the console) whose requests' paths are within `prefix`.
fn rules(
    allow: Option<file::Rules>,
    deny: Option<file::Rules>,
    path: &KeyPath,
    prefix: &str,
    access: Access,
    p: &mut Problems<'_>,
) -> (Vec<RuleSpec>, Vec<RuleSpec>, Option<Policy>) {
    let allow_path = path.key("allow");
    let allow_written = allow.is_some();
    let mut allow = rule_list(allow, &allow_path, p);
    let deny = rule_list(deny, &path.key("deny"), p);
    // A rule's paths are whole request paths, not relative to the route: one that no request
    // to the route can have never applies, and a deny that never applies protects nothing.
    for (rule_path, spec) in allow.iter().chain(&deny) {
        for (i, rule_prefix) in spec.paths.iter().flatten().enumerate() {
            let within = |a: &str, b: &str| portcullis_policy::loosely_within(a, b);
            let written = rule_prefix.starts_with('/');
            let own = |path: &str| within("/.portcullis", path);
            if written && own(rule_prefix) && !own(prefix) {
                // Answered before any route is looked up: a deny there protects nothing.
                p.add(
                    &rule_path.key("paths").index(i),
                    "Portcullis answers every path under `/.portcullis/` itself, before any \
                     route's rules, so the rule never applies: who reaches the console is \
                     [console]'s rules' to say",
                );
            } else if written && !within(prefix, rule_prefix) && !within(rule_prefix, prefix) {
                p.add(
                    &rule_path.key("paths").index(i),
                    format!(
                        "no request here has this path, so the rule never applies: every path \
                         on this route starts with `{prefix}` (paths are whole request paths, \
                         not relative to the route)"
                    ),
                );
            }
        }
    }

    if let (Access::SignIn { defaulted, .. }, false) = (access, allow_written) {
        let default = if defaulted {
            " (without `accept`, a route takes a session when [oidc] is configured)"
        } else {
            ""
        };
        p.add(
            &allow_path,
            format!(
                "route requires sign-in but no allow rule lets anyone in{default}: add e.g. \
                 `allow = {{ any_signed_in = true }}` or narrower rules, or \
                 `accept = [\"public\"]`"
            ),
        );
    }
    match access {
        Access::Public { written } => {
            let why = if written {
                "accept = [\"public\"]"
            } else {
                "no `accept` and no [oidc]"
            };
            for (rule_path, spec) in allow.iter().chain(&deny) {
                for key in caller_criteria(spec) {
                    p.add(
                        &rule_path.key(key),
                        format!(
                            "needs a signed-in caller, but nobody signs in on this public route \
                             ({why}): its rules can only be `public = true`"
                        ),
                    );
                }
            }
            if !allow_written {
                let spec = RuleSpec {
                    public: true,
                    ..RuleSpec::new(allow_path.to_string())
                };
                allow.push((allow_path, spec));
            }
        }
        Access::SignIn { bearer: false, .. } => {
            for (rule_path, spec) in allow.iter().chain(&deny) {
                for (key, given) in [
                    ("machines", spec.machines),
                    ("agents", spec.agents),
                    ("agent_groups", !spec.agent_groups.is_empty()),
                    ("agent_owner_groups", !spec.agent_owner_groups.is_empty()),
                ] {
                    if given {
                        p.add(
                            &rule_path.key(key),
                            "matches nobody here: machines and agents present bearer tokens, \
                             and this route does not accept \"bearer\"",
                        );
                    }
                }
            }
        }
        Access::SignIn { .. } | Access::Unknown => {}
    }
    // A rule's keys are alternatives: names beside one that already lets everyone (or every
    // signed-in caller) in add nobody, and read as if they narrowed it, which they do not.
    if !matches!(access, Access::Public { .. }) {
        for (rule_path, spec) in &allow {
            let (wide, covered) = if spec.public {
                ("public", caller_criteria(spec))
            } else if spec.any_signed_in {
                let people = ["groups", "group_ids", "users", "email_domains", "machines"];
                let named = caller_criteria(spec);
                (
                    "any_signed_in",
                    named.into_iter().filter(|k| people.contains(k)).collect(),
                )
            } else {
                continue;
            };
            for key in covered {
                p.add(
                    &rule_path.key(key),
                    format!(
                        "adds nobody: `{wide} = true` in the same rule already lets them in \
                         (a rule's keys are alternatives, not conditions; to narrow a rule, \
                         use `methods` or `paths`, or a deny rule)"
                    ),
                );
            }
        }
    }

    let allow_specs: Vec<RuleSpec> = allow.iter().map(|(_, spec)| spec.clone()).collect();
    let deny_specs: Vec<RuleSpec> = deny.iter().map(|(_, spec)| spec.clone()).collect();
    let policy = match Policy::compile(allow_specs.clone(), deny_specs.clone()) {
        Ok(policy) => Some(policy),
        Err(errors) => {
            for error in errors {
                let rule_path = allow
                    .iter()
                    .chain(&deny)
                    .find(|(_, spec)| spec.name == error.rule)
                    .map_or(path, |(rule_path, _)| rule_path);
                p.add(
                    &field_path(rule_path, &error.field),
                    error.problem.to_string(),
                );
            }
            None
        }
    };
    (allow_specs, deny_specs, policy)
}

/// The rules under `path`, each with its key path, which is also its name: `path` itself for
/// one rule written as a table, `path[j]` for an array of them.
fn rule_list(
    raw: Option<file::Rules>,
    path: &KeyPath,
    p: &mut Problems<'_>,
) -> Vec<(KeyPath, RuleSpec)> {
    match raw {
        None => Vec::new(),
        Some(file::Rules::One(rule)) => vec![(path.clone(), rule_spec(rule, path))],
        Some(file::Rules::Many(rules)) => {
            if rules.is_empty() {
                p.add(
                    path,
                    "is an empty list of rules: give at least one, or leave the key out",
                );
            }
            rules
                .into_iter()
                .enumerate()
                .map(|(j, rule)| {
                    let path = path.index(j);
                    let spec = rule_spec(rule, &path);
                    (path, spec)
                })
                .collect()
        }
    }
}

fn rule_spec(raw: file::Rule, path: &KeyPath) -> RuleSpec {
    RuleSpec {
        name: path.to_string(),
        groups: raw.groups.unwrap_or_default(),
        group_ids: raw.group_ids.unwrap_or_default(),
        users: raw.users.unwrap_or_default(),
        email_domains: raw.email_domains.unwrap_or_default(),
        any_signed_in: raw.any_signed_in.unwrap_or(false),
        machines: raw.machines.unwrap_or(false),
        agents: raw.agents.unwrap_or(false),
        agent_groups: raw.agent_groups.unwrap_or_default(),
        agent_owner_groups: raw.agent_owner_groups.unwrap_or_default(),
        public: raw.public.unwrap_or(false),
        methods: raw.methods,
        paths: raw.paths,
    }
}

/// The keys of the rule's who-criteria that name a signed-in caller (all but `public`).
fn caller_criteria(spec: &RuleSpec) -> Vec<&'static str> {
    [
        ("groups", !spec.groups.is_empty()),
        ("group_ids", !spec.group_ids.is_empty()),
        ("users", !spec.users.is_empty()),
        ("email_domains", !spec.email_domains.is_empty()),
        ("any_signed_in", spec.any_signed_in),
        ("machines", spec.machines),
        ("agents", spec.agents),
        ("agent_groups", !spec.agent_groups.is_empty()),
        ("agent_owner_groups", !spec.agent_owner_groups.is_empty()),
    ]
    .into_iter()
    .filter_map(|(key, given)| given.then_some(key))
    .collect()
}

/// The key path of a [`portcullis_policy::PolicyError`]'s `field` (`.groups[2]`, `.methods`,
/// or empty for the rule as a whole) under the rule's own path.
fn field_path(rule: &KeyPath, field: &str) -> KeyPath {
    let Some(field) = field.strip_prefix('.') else {
        return rule.clone();
    };
    match field.split_once('[') {
        None => rule.key(field),
        Some((key, index)) => {
            let path = rule.key(key);
            match index.strip_suffix(']').and_then(|i| i.parse().ok()) {
                Some(index) => path.index(index),
                None => path,
            }
        }
    }
}

/// A claim that can name a caller: a claim name whose value is a string. The claims that are
/// never one caller's string (times, audiences, lists, flags) are refused with the reason.
fn claim_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control() || c == ' ') {
        return Err("expected a claim name: 1 to 128 characters, no spaces".to_owned());
    }
    let why = match name {
        "exp" | "iat" | "nbf" | "auth_time" | "updated_at" => "is a time",
        "aud" => "is the token's audience, not the caller",
        "iss" => "is the issuer, the same for every caller",
        "nonce" | "jti" | "at_hash" | "c_hash" | "sid" => "changes with every sign-in",
        "groups" | "roles" | "scp" | "scope" | "amr" | "wids" => {
            "lists many values, not one caller"
        }
        "email_verified" | "phone_number_verified" => "is a flag",
        "tid" | "ver" | "uti" | "aio" | "idp" => "is the same for many callers",
        _ => return Ok(()),
    };
    Err(format!("`{name}` {why}: it cannot name a directory user"))
}

/// A claim that can name a person: one of [`claim_name`], but not one that names the client
/// a person signed in through, which is the same for everyone who uses it.
fn person_claim_name(name: &str) -> Result<(), String> {
    claim_name(name)?;
    match name {
        "azp" | "client_id" | "cid" | "appid" => Err(format!(
            "`{name}` names the application a person signs in through, the same for everyone \
             who uses it: it cannot name a person (it may name a machine, as machine_claim)"
        )),
        _ => Ok(()),
    }
}

/// The mapping each IdP's SCIM provisioning matches (as its guide sets it up), by preset name: `(claim,
/// scim_attribute, machine_claim, machine_scim_attribute, agent_claim, bearer_claim)`.
/// Explicit keys override it; `bearer_claim` is the preset's only where `claim` and
/// `scim_attribute` are the preset's, left to it or written the same (else it is `claim`, as
/// without a preset).
///
/// - `entra`: Microsoft Entra ID provisioning set up as docs/entra-id.md says, a user's object
///   id as `externalId` (its default maps `mailNickname` there) and the UPN as `userName`; its
///   tokens carry the object id as `oid`, for people and for an app's service principal alike.
/// - `okta`: Okta provisions its user id (`00u…`) as `externalId` (and the login as
///   `userName`); its ID tokens carry that id as `sub`. A client-credentials token's `sub` is
///   the client id (`0oa…`), the service account's `userName`; Okta names the client `cid`
///   (no `client_id`), so that is the claim that names an agent. Its access tokens name a
///   person by their login as `sub`, and by their user id as `uid`.
/// - Entra ID's v2 tokens name the client `azp`, which the default `client_id` reads.
const PRESETS: &[(&str, [&str; 6])] = &[
    (
        "entra",
        ["oid", "externalId", "oid", "externalId", "client_id", "oid"],
    ),
    (
        "okta",
        ["sub", "externalId", "sub", "userName", "cid", "uid"],
    ),
];

/// `[identity]`: how callers are found in the directory and named to upstreams.
fn identity(mut raw: file::Identity, path: &KeyPath, p: &mut Problems<'_>) -> IdentityConfig {
    if let Some(preset) = raw.preset.take() {
        match PRESETS.iter().find(|(name, _)| *name == preset) {
            Some((
                _,
                [claim, attribute, machine_claim, machine_attribute, agent_claim, bearer],
            )) => {
                let fill = |key: &mut Option<String>, value: &str| {
                    key.get_or_insert_with(|| value.to_owned());
                };
                // A person's bearer token is read by the preset's claim where the person is
                // found as the preset finds them (left to it, or written the same).
                let as_preset = raw.claim.as_deref().is_none_or(|c| c == *claim)
                    && (raw.scim_attribute.as_deref()).is_none_or(|a| a == *attribute);
                if as_preset {
                    fill(&mut raw.bearer_claim, bearer);
                }
                fill(&mut raw.claim, claim);
                fill(&mut raw.scim_attribute, attribute);
                fill(&mut raw.machine_claim, machine_claim);
                fill(&mut raw.machine_scim_attribute, machine_attribute);
                fill(&mut raw.agent_claim, agent_claim);
            }
            None => {
                let names: Vec<String> = PRESETS.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                p.add(
                    &path.key("preset"),
                    format!("unknown preset `{preset}`: expected {}", names.join(" or ")),
                );
            }
        }
    }
    let default = IdentityConfig::default();
    let person =
        |raw: Option<String>, key: &str, default: IdentityClaim, p: &mut Problems<'_>| match raw {
            None => default,
            Some(name) => match person_claim_name(&name) {
                Err(message) => {
                    p.add(&path.key(key), message);
                    default
                }
                Ok(()) => match name.as_str() {
                    "email" => IdentityClaim::Email,
                    "sub" => IdentityClaim::Sub,
                    _ => IdentityClaim::Named(name),
                },
            },
        };
    let claim = person(raw.claim, "claim", default.claim, p);
    let bearer_claim = person(raw.bearer_claim, "bearer_claim", claim.clone(), p);
    let attribute_path = path.key("scim_attribute");
    let scim_attribute = choice(
        raw.scim_attribute,
        &[
            ("userName", ScimAttribute::UserName),
            ("emails", ScimAttribute::Emails),
            ("externalId", ScimAttribute::ExternalId),
        ],
        default.scim_attribute,
        "SCIM attribute",
        &attribute_path,
        p,
    );
    let bearer = (bearer_claim != claim).then_some(("bearer_claim", &bearer_claim));
    for (key, claim) in [("claim", &claim)].into_iter().chain(bearer) {
        if *claim == IdentityClaim::Sub && scim_attribute == ScimAttribute::Emails {
            p.add(
                &attribute_path,
                format!(
                    "{key} = \"sub\" is the IdP's id for the person, not an email address: \
                     match it against \"externalId\" or \"userName\", or set {key} = \"email\""
                ),
            );
        }
    }
    let client_claim =
        |raw: Option<String>, key: &str, default: MachineClaim, p: &mut Problems<'_>| match raw {
            None => default,
            Some(name) => match claim_name(&name) {
                Err(message) => {
                    p.add(&path.key(key), message);
                    default
                }
                Ok(()) => match name.as_str() {
                    "sub" => MachineClaim::Sub,
                    "client_id" => MachineClaim::ClientId,
                    _ => MachineClaim::Named(name),
                },
            },
        };
    let machine_claim = client_claim(raw.machine_claim, "machine_claim", default.machine_claim, p);
    let agent_claim = client_claim(
        raw.agent_claim,
        "agent_claim",
        default.agent_claim.clone(),
        p,
    );
    // It must name the client in a person's token too: an agent holding one (issued to its
    // client) is judged as its agent by it, and a claim that names the person there would
    // have it judged as that person alone, past its own standing and its owners.
    let names_the_client = match &agent_claim {
        MachineClaim::ClientId => true,
        MachineClaim::Named(name) => matches!(name.as_str(), "azp" | "cid" | "appid"),
        MachineClaim::Sub => false,
    };
    if !names_the_client {
        p.add(
            &path.key("agent_claim"),
            "must be a claim that names the client in every token it holds, a person's too: \
             \"client_id\" (which also reads azp), \"azp\", \"cid\" (Okta) or \"appid\" (Entra \
             ID v1 tokens); sub and oid name the person in a person's token",
        );
    }
    let agent_scim_attribute = choice(
        raw.agent_scim_attribute,
        &[
            ("name", AgentAttribute::Name),
            ("externalId", AgentAttribute::ExternalId),
        ],
        default.agent_scim_attribute,
        "Agent attribute",
        &path.key("agent_scim_attribute"),
        p,
    );
    let machine_attribute_path = path.key("machine_scim_attribute");
    let machine_scim_attribute = if raw.machine_scim_attribute.as_deref() == Some("emails") {
        p.add(
            &machine_attribute_path,
            "a machine's token carries no email address: expected \"userName\" or \
             \"externalId\"",
        );
        default.machine_scim_attribute
    } else {
        choice(
            raw.machine_scim_attribute,
            &[
                ("userName", ScimAttribute::UserName),
                ("externalId", ScimAttribute::ExternalId),
            ],
            default.machine_scim_attribute,
            "SCIM attribute",
            &machine_attribute_path,
            p,
        )
    };

    // Each header with its key, checked alone first, then against the others and the
    // assertion's header.
    let headers = [
        ("header_user", raw.header_user, default.header_user),
        ("header_email", raw.header_email, default.header_email),
        ("header_groups", raw.header_groups, default.header_groups),
    ]
    .map(|(key, raw, default)| {
        let header_path = path.key(key);
        let name = match raw {
            None => default,
            Some(name) => identity_header(&name)
                .map_err(|message| p.add(&header_path, message))
                .unwrap_or(default),
        };
        (key, header_path, name)
    });
    // As CGI-style servers read names: `_` as `-`, and PHP `.` and lighttpd any other
    // character too (`X-Portcullis-User.Name` is `X-Portcullis-User-Name` to them).
    let normalized = |name: &HeaderName| -> String {
        let dashed = |c: char| if c.is_ascii_alphanumeric() { c } else { '-' };
        name.as_str().chars().map(dashed).collect()
    };
    for (j, (_, header_path, name)) in headers.iter().enumerate() {
        if normalized(name) == ASSERTION_HEADER.to_ascii_lowercase() {
            p.add(
                header_path,
                format!("`{name}` is taken: {ASSERTION_HEADER} carries the signed assertion"),
            );
        } else if normalized(name) == AGENT_HEADER.to_ascii_lowercase() {
            p.add(
                header_path,
                format!("`{name}` is taken: {AGENT_HEADER} names the agent making a request"),
            );
        } else if let Some((first, _, _)) = headers[..j]
            .iter()
            .find(|(_, _, other)| normalized(other) == normalized(name))
        {
            p.add(
                header_path,
                format!(
                    "the same header as identity.{first} (header names compare in any case, \
                     and any character but a letter or digit as `-`)"
                ),
            );
        }
    }
    let [(_, _, header_user), (_, _, header_email), (_, _, header_groups)] = headers;

    let allow_sample_rate = match raw.allow_sample_rate {
        None => default.allow_sample_rate,
        Some(rate) if (0.0..=1.0).contains(&rate) => rate,
        Some(rate) => {
            p.add(
                &path.key("allow_sample_rate"),
                format!(
                    "{rate} is out of range: must be 0.0 (log no allowed request) to 1.0 (log \
                     every one)"
                ),
            );
            default.allow_sample_rate
        }
    };
    IdentityConfig {
        claim,
        bearer_claim,
        scim_attribute,
        machine_claim,
        machine_scim_attribute,
        agent_claim,
        agent_scim_attribute,
        header_user,
        header_email,
        header_groups,
        allow_sample_rate,
    }
}

/// The header the proxy signs the caller's identity into.
const ASSERTION_HEADER: &str = "X-Portcullis-Assertion";
/// The header that names the agent making a request.
const AGENT_HEADER: &str = "X-Portcullis-Agent";

/// An identity header's name: a valid header name starting with `X-Portcullis-`, the prefix
/// Portcullis strips from every client request, so that a client can never send it.
fn identity_header(name: &str) -> Result<HeaderName, String> {
    const PREFIX: &str = "x-portcullis-";
    if !is_token(name) {
        return Err(format!(
            "`{name}` is not a header name: letters, digits and !#$%&'*+-.^_`|~ only"
        ));
    }
    let prefixed = name
        .get(..PREFIX.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(PREFIX));
    if !prefixed || name.len() == PREFIX.len() {
        return Err(format!(
            "`{name}` must start with X-Portcullis- and go on after it: Portcullis removes such \
             headers from every client request, so a client can never send one"
        ));
    }
    HeaderName::try_from(name).map_err(|e| format!("`{name}` is not a header name: {e}"))
}

/// `tchar` of RFC 9110 §5.6.2: what a header name is made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One of `choices`, spelled exactly, or `default` when the key is left out.
fn choice<T: Copy>(
    raw: Option<String>,
    choices: &[(&str, T)],
    default: T,
    what: &str,
    path: &KeyPath,
    p: &mut Problems<'_>,
) -> T {
    let Some(raw) = raw else { return default };
    if let Some((_, value)) = choices.iter().find(|(name, _)| *name == raw) {
        return *value;
    }
    let message = match choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(&raw))
    {
        Some((name, _)) => format!("write \"{name}\": names here are case-sensitive"),
        None => {
            let names: Vec<String> = choices
                .iter()
                .map(|(name, _)| format!("\"{name}\""))
                .collect();
            let expected = match names.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => String::new(),
            };
            format!("unknown {what} `{raw}`: expected {expected}")
        }
    };
    p.add(path, message);
    default
}

fn scim(
    raw: file::Scim,
    path: &KeyPath,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems<'_>,
) -> Option<ScimConfig> {
    let host_path = path.key("host");
    let host = required(raw.host, &host_path, p).and_then(|host| {
        scim_host(&host)
            .map_err(|message| p.add(&host_path, message))
            .ok()
    });
    let limit = |value: Option<i64>, key, range, default, p: &mut Problems<'_>| {
        value
            .and_then(|n| in_range(n, range, &path.key(key), p))
            .unwrap_or(default)
    };
    let max_request_body_bytes = limit(
        raw.max_request_body_bytes,
        "max_request_body_bytes",
        1024..=64 * 1024 * 1024,
        1024 * 1024,
        p,
    );
    let max_bulk_operations = limit(
        raw.max_bulk_operations,
        "max_bulk_operations",
        1..=10_000,
        1000,
        p,
    );
    let max_results = limit(raw.max_results, "max_results", 1..=10_000, 1000, p);

    let tokens_path = path.key("tokens");
    if raw.tokens.is_empty() {
        p.add(&tokens_path, "at least one [[scim.tokens]] is required");
    }
    let mut tokens: Vec<Option<ScimToken>> = Vec::new();
    // (name, index) and (hash, index) of the tokens seen so far, to report duplicates.
    let mut names: Vec<(String, usize)> = Vec::new();
    let mut hashes: Vec<([u8; 32], usize)> = Vec::new();
    for (i, raw) in raw.tokens.into_iter().enumerate() {
        let path = tokens_path.index(i);
        let name_path = path.key("name");
        let name = required(raw.name, &name_path, p).and_then(|name| {
            token_name(&name)
                .map_err(|message| p.add(&name_path, message))
                .ok()
        });
        if let Some(name) = &name {
            match names.iter().find(|(n, _)| n == name) {
                Some((_, first)) => p.add(
                    &name_path,
                    format!("duplicate token name `{name}`: already used by scim.tokens[{first}]"),
                ),
                None => names.push((name.clone(), i)),
            }
        }
        let (hash_path, sha256) = match (raw.secret, raw.secret_sha256) {
            (Some(_), Some(_)) => {
                p.add(
                    &path.key("secret_sha256"),
                    "give either `secret` or `secret_sha256`, not both",
                );
                (path.key("secret"), None)
            }
            (None, None) => {
                if !p.skipped(&path.key("secret_sha256")) {
                    p.add(
                        &path.key("secret"),
                        format!("{MISSING}: give `secret` or `secret_sha256`"),
                    );
                }
                (path.key("secret"), None)
            }
            (Some(secret), None) => {
                let secret_path = path.key("secret");
                let sha256 = token_secret_hash(&secret, env, base_dir)
                    .map_err(|message| p.add(&secret_path, message))
                    .ok();
                (secret_path, sha256)
            }
            (None, Some(hex)) => {
                let hex_path = path.key("secret_sha256");
                let sha256 = sha256_hex(&hex)
                    .map_err(|message| p.add(&hex_path, message))
                    .ok();
                (hex_path, sha256)
            }
        };
        if let Some(sha256) = sha256 {
            match hashes.iter().find(|(h, _)| *h == sha256) {
                Some((_, first)) => p.add(
                    &hash_path,
                    format!(
                        "the same token as scim.tokens[{first}]: every token must be different"
                    ),
                ),
                None => hashes.push((sha256, i)),
            }
        }
        let expires_at = raw.expires.and_then(|expires| {
            OffsetDateTime::parse(&expires, &Rfc3339)
                .map(OffsetDateTime::unix_timestamp)
                .map_err(|e| {
                    p.add(
                        &path.key("expires"),
                        format!(
                            "`{expires}` is not an RFC 3339 time ({e}): write e.g. \"2027-01-01T00:00:00Z\""
                        ),
                    )
                })
                .ok()
        });
        tokens.push(name.zip(sha256).map(|(name, sha256)| ScimToken {
            name,
            sha256,
            expires_at,
        }));
    }

    Some(ScimConfig {
        host: host?,
        max_request_body_bytes,
        max_bulk_operations,
        max_results,
        tokens: tokens.into_iter().collect::<Option<_>>()?,
    })
}

fn oidc(
    raw: file::Oidc,
    path: &KeyPath,
    has_tls_listener: bool,
    has_plain_listener: bool,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems<'_>,
) -> Option<OidcConfig> {
    let issuer = checked(raw.issuer, &path.key("issuer"), p, sign_in_issuer);
    // Both are sent to the IdP as they are: spaces around one, or a control character (a
    // second newline at the end of a secret file, an `echo`ed variable), would have it answer
    // `invalid_client` to every sign-in.
    let sent_as_is = |value: &str| value.trim() == value && !value.chars().any(char::is_control);
    let client_id = checked(raw.client_id, &path.key("client_id"), p, |id| {
        if id.trim().is_empty() {
            return Err("must not be empty".to_owned());
        }
        if !sent_as_is(&id) {
            return Err("has spaces around it or control characters".to_owned());
        }
        Ok(id)
    });
    let client_secret = checked(raw.client_secret, &path.key("client_secret"), p, |raw| {
        let secret = resolve_secret(&raw, env, base_dir)?;
        if secret.expose().is_empty() {
            return Err("the client secret is empty".to_owned());
        }
        if !sent_as_is(secret.expose()) {
            return Err(
                "the client secret has spaces around it or control characters (a second \
                 newline at the end of its file?): write it as the IdP shows it"
                    .to_owned(),
            );
        }
        Ok(secret)
    });
    let scopes = scopes(raw.scopes, &path.key("scopes"), p);

    let auth_host = checked(raw.auth_host, &path.key("auth_host"), p, auth_host);
    let scheme_path = path.key("auth_scheme");
    let auth_scheme = match raw.auth_scheme.as_deref() {
        None | Some("https") => Scheme::Https,
        Some("http") => Scheme::Http,
        Some(other) => {
            p.add(
                &scheme_path,
                format!("unknown scheme `{other}`: expected \"https\" or \"http\""),
            );
            Scheme::Https
        }
    };
    match auth_scheme {
        Scheme::Https if !has_tls_listener => p.add(
            &scheme_path,
            "the sign-in callback is served over https (the default), which needs a listener \
             with `tls` (or `behind_tls_proxy`); auth_scheme = \"http\" is for tests and demos",
        ),
        Scheme::Http if !has_plain_listener => p.add(
            &scheme_path,
            "the sign-in callback is served over http, which needs a listener without `tls` \
             (nor `behind_tls_proxy`)",
        ),
        _ => {}
    }
    let cookie_domain_path = path.key("cookie_domain");
    let cookie_domain = raw.cookie_domain.and_then(|domain| {
        cookie_domain(domain, auth_host.as_ref())
            .map_err(|message| p.add(&cookie_domain_path, message))
            .ok()
    });
    let cookie_name_path = path.key("cookie_name");
    let cookie_name = match raw.cookie_name {
        None => crate::DEFAULT_COOKIE_NAME.to_owned(),
        Some(name) => cookie_name(&name)
            .map_err(|message| p.add(&cookie_name_path, message))
            .map(|()| name)
            .unwrap_or_default(),
    };
    let minute = Duration::from_secs(60);
    let session_idle_timeout = duration(
        raw.session_idle_timeout,
        Duration::from_secs(8 * 3600),
        minute,
        &path.key("session_idle_timeout"),
        p,
    );
    let session_lifetime = duration(
        raw.session_lifetime,
        Duration::from_secs(24 * 3600),
        minute,
        &path.key("session_lifetime"),
        p,
    );
    let userinfo = choice(
        raw.userinfo,
        &[
            ("auto", UserInfo::Auto),
            ("always", UserInfo::Always),
            ("never", UserInfo::Never),
        ],
        UserInfo::Auto,
        "userinfo setting",
        &path.key("userinfo"),
        p,
    );
    let id_token_algorithms =
        algorithms(raw.id_token_algorithms, &path.key("id_token_algorithms"), p);
    let tls_ca = (raw.tls_ca).and_then(|ca| ca_bundle(&base_dir.join(ca), &path.key("tls_ca"), p));
    let logout_path = path.key("post_logout_redirect");
    let post_logout_redirect = raw.post_logout_redirect.and_then(|url| {
        web_url(&url)
            .map_err(|message| p.add(&logout_path, message))
            .ok()?;
        Some(url)
    });

    Some(OidcConfig {
        issuer: issuer?,
        client_id: client_id?,
        client_secret: client_secret?,
        scopes,
        auth_host_name: auth_host.as_ref()?.name.clone(),
        auth_host: auth_host?.host_port,
        auth_scheme,
        cookie_domain,
        cookie_name,
        session_idle_timeout,
        session_lifetime,
        max_sessions_per_person: raw
            .max_sessions_per_person
            .and_then(|n| in_range(n, 1..=10_000, &path.key("max_sessions_per_person"), p))
            .unwrap_or(50),
        refresh: raw.refresh.unwrap_or(false),
        userinfo,
        id_token_algorithms,
        post_logout_redirect,
        tls_ca,
    })
}

fn jwt_issuers(
    raw: Vec<file::JwtIssuer>,
    path: &KeyPath,
    base_dir: &Path,
    p: &mut Problems<'_>,
) -> Option<Vec<JwtIssuer>> {
    let mut issuers = Vec::new();
    // (issuer, index) of the issuers seen so far, to report duplicates.
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let path = path.index(i);
        let issuer_path = path.key("issuer");
        let issuer = checked(raw.issuer, &issuer_path, p, issuer);
        if let Some(issuer) = &issuer {
            match seen.iter().find(|(s, _)| s == issuer) {
                Some((_, first)) => p.add(
                    &issuer_path,
                    format!("issuer `{issuer}` is already listed in jwt_issuers[{first}]"),
                ),
                None => seen.push((issuer.clone(), i)),
            }
        }
        let audiences_path = path.key("audiences");
        let audiences = match raw.audiences {
            None => {
                p.add(
                    &audiences_path,
                    format!("{MISSING}: the audiences a token must be for"),
                );
                Vec::new()
            }
            Some(audiences) => listed(
                audiences,
                &audiences_path,
                "needs at least one audience",
                "an audience is never empty",
                p,
            ),
        };
        let person_clients = raw.person_clients.map_or_else(Vec::new, |clients| {
            let empty =
                "needs at least one client, or leave it out to take a person's token from any";
            let path = path.key("person_clients");
            listed(clients, &path, empty, "a client id is never empty", p)
        });
        let jwks_path = path.key("jwks_uri");
        let jwks_uri = raw.jwks_uri.and_then(|url| {
            web_url(&url)
                .and_then(|parts| https_or_loopback(&parts))
                .map_err(|message| p.add(&jwks_path, message))
                .ok()?;
            Some(url)
        });
        let algorithms = algorithms(raw.algorithms, &path.key("algorithms"), p);
        let leeway = leeway(raw.leeway, &path.key("leeway"), p);
        let jwks_refresh = duration(
            raw.jwks_refresh,
            JWKS_REFRESH,
            Duration::from_secs(10),
            &path.key("jwks_refresh"),
            p,
        );
        let iat_backdate = iat_backdate(
            raw.iat_backdate,
            issuer.as_deref(),
            &path.key("iat_backdate"),
            p,
        );
        let tls_ca =
            (raw.tls_ca).and_then(|ca| ca_bundle(&base_dir.join(ca), &path.key("tls_ca"), p));
        issuers.push(issuer.map(|issuer| JwtIssuer {
            issuer,
            audiences,
            person_clients,
            jwks_uri,
            algorithms,
            leeway,
            jwks_refresh,
            iat_backdate,
            tls_ca,
        }));
    }
    issuers.into_iter().collect()
}

/// An issuer identifier: an `https` URL (`http` to a loopback host, for tests and demos) with
/// no query or fragment. It is kept exactly as written, trailing `/` included, because it is
/// compared with the IdP's `iss` as a string.
fn issuer(url: String) -> Result<String, String> {
    if url.contains('?') {
        return Err("a query (`?...`) is not allowed in an issuer".to_owned());
    }
    let parts = web_url(&url)?;
    https_or_loopback(&parts)?;
    if let Some(tenant) = entra_multi_tenant(&url) {
        return Err(format!(
            "Entra ID's `{tenant}` endpoint names no one issuer (its discovery document says \
             `{{tenantid}}`), so no ID token could be checked against it: write your tenant's \
             issuer, https://login.microsoftonline.com/<tenant-id>/v2.0"
        ));
    }
    if let Some((alias, host)) = entra_alias(&url) {
        return Err(format!(
            "`{alias}` answers for Entra ID, but its issuers are on {host}: discovery would \
             refuse the document it answers, and tokens would name another issuer; write \
             https://{host}/<tenant-id>/v2.0"
        ));
    }
    if let Some(tenant) = entra_tenant_named_otherwise(&url) {
        return Err(format!(
            "Entra ID names its issuer by the tenant's id, a lower-case GUID, whatever names the \
             tenant (`{tenant}` here): discovery would refuse the document it answers, and \
             tokens would name another issuer; write the Tenant ID from the Entra admin \
             center's Overview, in lower case"
        ));
    }
    if let Some((host, after)) = entra_v2_issuer_misspelled(&url) {
        let why = match after {
            "" => "without `/v2.0`, that is the v1.0 endpoint, whose discovery document and \
                   tokens name another issuer (sts.windows.net)"
                .to_owned(),
            after => format!("`/{after}` is not it"),
        };
        return Err(format!(
            "Entra ID's issuer on {host} is https://{host}/<tenant-id>/v2.0, exactly ({why}): \
             discovery would refuse the document it answers, and tokens would name another \
             issuer"
        ));
    }
    let lower_scheme = url.starts_with("https://") || url.starts_with("http://");
    if !lower_scheme || parts.host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(
            "write the scheme and host in lower case, as the IdP does: issuers compare exactly"
                .to_owned(),
        );
    }
    Ok(url)
}

/// [`issuer`], for people to sign in with: not Entra ID's v1.0 one (`sts.windows.net`), whose
/// token endpoint answers `expires_in` as a string, which no OAuth 2.0 client library reads
/// (RFC 6749 §5.1 says a number): every sign-in would fail. Its tokens are still taken as
/// bearer tokens (`[[jwt_issuers]]`).
fn sign_in_issuer(url: String) -> Result<String, String> {
    let url = issuer(url)?;
    // Each cloud's v1.0 issuer, and its v2.0 one.
    let v1 = [
        (
            "https://sts.windows.net/",
            "https://login.microsoftonline.com/",
        ),
        (
            "https://sts.chinacloudapi.cn/",
            "https://login.partner.microsoftonline.cn/",
        ),
    ];
    let found = v1
        .iter()
        .find_map(|(v1, v2)| Some((url.strip_prefix(v1)?, v2)));
    if let Some((tenant, v2)) = found {
        let tenant = tenant.trim_end_matches('/');
        return Err(format!(
            "Entra ID's v1.0 endpoint answers sign-ins in a form no OAuth client reads \
             (`expires_in` as a string): sign in with its v2.0 issuer, {v2}{tenant}/v2.0 (its \
             tokens are still taken under [[jwt_issuers]])"
        ));
    }
    Ok(url)
}

/// The host of `url`, if it is one of Entra ID's other names for a cloud's sign-in host
/// (MSAL's instance aliases), and the host that cloud's issuers name: discovery on the alias
/// answers the issuer on the other host.
fn entra_alias(url: &str) -> Option<(&str, &'static str)> {
    const ALIASES: [(&str, &str); 4] = [
        ("login.microsoft.com", "login.microsoftonline.com"),
        ("login.windows.net", "login.microsoftonline.com"),
        ("login.chinacloudapi.cn", "login.partner.microsoftonline.cn"),
        ("login.usgovcloudapi.net", "login.microsoftonline.us"),
    ];
    let host = url.strip_prefix("https://")?.split('/').next()?;
    ALIASES
        .iter()
        .find(|(alias, _)| host.eq_ignore_ascii_case(alias))
        .map(|&(_, issuers)| (host, issuers))
}

/// The tenant segment of an Entra ID issuer that stands for many tenants (`common`,
/// `organizations`, `consumers`), if `url` is one.
fn entra_multi_tenant(url: &str) -> Option<&str> {
    let path = url
        .strip_prefix("https://login.microsoftonline.com/")
        .or_else(|| url.strip_prefix("https://login.microsoft.com/"))?;
    let tenant = path.split('/').next()?;
    ["common", "organizations", "consumers"]
        .into_iter()
        .find(|t| tenant.eq_ignore_ascii_case(t))
        .map(|_| tenant)
}

/// The tenant segment of an Entra ID issuer (in any cloud, v1.0 or v2.0) that is not the
/// tenant's id as Entra writes it in its issuers, a lower-case GUID: a domain
/// (`contoso.onmicrosoft.com`), or the id in upper case. (`common` and its kin are
/// [`entra_multi_tenant`]'s.)
fn entra_tenant_named_otherwise(url: &str) -> Option<&str> {
    const V1_HOSTS: [&str; 2] = ["sts.windows.net", "sts.chinacloudapi.cn"];
    let rest = url.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/')?;
    let mut hosts = ENTRA_SIGN_IN_HOSTS.iter().chain(&V1_HOSTS);
    if !hosts.any(|h| host.eq_ignore_ascii_case(h)) {
        return None;
    }
    let tenant = path.split('/').next()?;
    let is_id = tenant.len() == 36
        && tenant.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    (!is_id).then_some(tenant)
}

/// Entra ID's sign-in hosts, in each cloud: its v2.0 issuers are on them.
const ENTRA_SIGN_IN_HOSTS: [&str; 3] = [
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
];

/// The host of an issuer on one of Entra ID's sign-in hosts, and what follows its tenant, if
/// that is not `v2.0`: the only issuer there is `https://<host>/<tenant-id>/v2.0` (v1.0's is on
/// sts.windows.net). Without `/v2.0` it is the v1.0 endpoint; with a `/` after it, a string
/// no token names.
fn entra_v2_issuer_misspelled(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !ENTRA_SIGN_IN_HOSTS
        .iter()
        .any(|h| host.eq_ignore_ascii_case(h))
    {
        return None;
    }
    let after = path.split_once('/').map_or("", |(_, after)| after);
    (after != "v2.0").then_some((host, after))
}

/// An absolute `http(s)` URL used with an IdP, where a query is allowed but a fragment is not.
fn web_url(url: &str) -> Result<UrlParts<'_>, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a URL has no spaces or control characters".to_owned());
    }
    if url.contains('#') {
        return Err("a fragment (`#...`) is not allowed".to_owned());
    }
    let without_query = url.split_once('?').map_or(url, |(base, _)| base);
    let parts = split_url(without_query)?;
    if !parts.bracketed && !is_host_name(parts.host) {
        return Err(format!("`{}` is not a host name", parts.host));
    }
    Ok(parts)
}

/// Whether `url` may be fetched for keys or tokens, as a configured `jwks_uri` must be: an
/// absolute URL, https unless to this machine. For what an IdP's discovery document names.
pub fn check_fetch_url(url: &str) -> Result<(), String> {
    web_url(url).and_then(|parts| https_or_loopback(&parts))
}

/// Tokens and keys are fetched and trusted only over TLS, except from this machine, where
/// tests and demos run their IdP.
fn https_or_loopback(parts: &UrlParts<'_>) -> Result<(), String> {
    let loopback = ["127.0.0.1", "localhost", "::1"]
        .iter()
        .any(|host| parts.host.eq_ignore_ascii_case(host));
    if parts.scheme == Scheme::Http && !loopback {
        return Err(
            "must be https: http is allowed only to 127.0.0.1, localhost or ::1, for tests and \
             demos"
                .to_owned(),
        );
    }
    Ok(())
}

/// The scopes a sign-in asks for, by default `openid email profile`. (`offline_access`, which
/// Okta and Entra ID want before they issue a refresh token, is the operator's to add: other
/// IdPs issue one without it, and some then issue a token that outlives the IdP's session.)
fn scopes(raw: Option<Vec<String>>, path: &KeyPath, p: &mut Problems<'_>) -> Vec<String> {
    let Some(scopes) = raw else {
        return ["openid", "email", "profile"].map(String::from).to_vec();
    };
    // RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
    let scope_char = |b: u8| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e);
    for (j, scope) in scopes.iter().enumerate() {
        if scope.is_empty() || !scope.bytes().all(scope_char) {
            p.add(
                &path.index(j),
                format!("`{scope}` is not a scope: printable ASCII without spaces, `\"` or `\\`"),
            );
        }
    }
    duplicates(&scopes, path, p);
    if !scopes.iter().any(|s| s == "openid") {
        p.add(
            path,
            "must include \"openid\": without it the IdP issues no ID token",
        );
    }
    scopes
}

/// The algorithms a signature may use, by default the common asymmetric ones.
fn algorithms(raw: Option<Vec<String>>, path: &KeyPath, p: &mut Problems<'_>) -> Vec<JwtAlgorithm> {
    let Some(names) = raw else {
        return vec![
            JwtAlgorithm::RS256,
            JwtAlgorithm::ES256,
            JwtAlgorithm::PS256,
            JwtAlgorithm::EdDSA,
        ];
    };
    if names.is_empty() {
        p.add(path, "needs at least one algorithm");
    }
    duplicates(&names, path, p);
    names
        .iter()
        .enumerate()
        .filter_map(|(j, name)| {
            algorithm(name)
                .map_err(|message| p.add(&path.index(j), message))
                .ok()
        })
        .collect()
}

fn algorithm(name: &str) -> Result<JwtAlgorithm, String> {
    if let Some(algorithm) = JwtAlgorithm::ALL.into_iter().find(|a| a.as_str() == name) {
        return Ok(algorithm);
    }
    if name.eq_ignore_ascii_case("none") {
        return Err("`none` is never allowed: an unsigned token proves nothing".to_owned());
    }
    if name
        .get(..2)
        .is_some_and(|hs| hs.eq_ignore_ascii_case("hs"))
    {
        return Err(format!(
            "`{name}` is not allowed: an HMAC signature is made with a shared secret, and a \
             verifier holding only public keys can be fooled into using one as the secret"
        ));
    }
    if let Some(algorithm) = JwtAlgorithm::ALL
        .into_iter()
        .find(|a| a.as_str().eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "write `{}`: algorithm names are case-sensitive",
            algorithm.as_str()
        ));
    }
    let all: Vec<&str> = JwtAlgorithm::ALL.iter().map(|a| a.as_str()).collect();
    Err(format!(
        "`{name}` is not a supported algorithm: expected one of {}",
        all.join(", ")
    ))
}

/// `auth_host` as written, and its host part.
struct AuthHost {
    host_port: String,
    host: String,
    /// The host as a request's `Host` names it (see `OidcConfig::auth_host_name`).
    name: String,
    is_ip: bool,
}

/// The host the IdP redirects to, written as registered with it: a lower-case host and an
/// optional port (the callback URL must match the registration exactly), no scheme or path.
fn auth_host(raw: String) -> Result<AuthHost, String> {
    if raw.contains("://") {
        return Err(format!(
            "`{raw}` has a scheme: write host[:port] alone and the scheme in `auth_scheme`"
        ));
    }
    if raw.contains('/') {
        return Err(format!(
            "`{raw}` has a path: write host[:port] alone; the callback is always \
             /.portcullis/callback"
        ));
    }
    let (host, bracketed, port) = split_authority(&raw)?;
    if host.is_empty() || (!bracketed && !is_host_name(host)) {
        return Err(format!(
            "`{raw}` is not a host name with an optional port (wildcards are not allowed here)"
        ));
    }
    if port == Some(0) {
        return Err("`0` is not a port number".to_owned());
    }
    let lower = raw.to_ascii_lowercase();
    if lower != raw {
        return Err(format!("write the host in lower case: `{lower}`"));
    }
    let is_ip = bracketed || host.parse::<Ipv4Addr>().is_ok();
    let name = match host.parse::<Ipv6Addr>() {
        Ok(v6) if bracketed => format!("[{v6}]"),
        _ => host.to_owned(),
    };
    Ok(AuthHost {
        host: host.to_owned(),
        host_port: raw,
        name,
        is_ip,
    })
}

/// A `.parent.domain` covering `auth_host`, so that the cookie the callback sets reaches
/// every host under it. (The routes that take sessions are checked to be under it once they
/// are read.)
fn cookie_domain(domain: String, auth_host: Option<&AuthHost>) -> Result<String, String> {
    let Some(name) = domain.strip_prefix('.') else {
        return Err(format!(
            "`{domain}` must start with `.`: e.g. \".corp.example.com\" shares the session \
             with every host under corp.example.com"
        ));
    };
    if !is_host_name(name) {
        return Err(format!(
            "`{domain}` is not a domain (wildcards are not allowed here)"
        ));
    }
    if !name.contains('.') {
        return Err(format!(
            "`{domain}` is a top-level domain: the session would go to every host under it; \
             name your own, e.g. \".corp.example.com\""
        ));
    }
    let lower = domain.to_ascii_lowercase();
    if lower != domain {
        return Err(format!("write the domain in lower case: `{lower}`"));
    }
    if let Some(auth) = auth_host {
        if auth.is_ip {
            return Err(
                "a cookie domain needs auth_host to be a host name, not an IP address".to_owned(),
            );
        }
        if auth.host != name && !auth.host.ends_with(&domain) {
            return Err(format!(
                "auth_host `{}` is not under `{domain}`: a browser refuses a cookie for a \
                 domain the host setting it is not in",
                auth.host
            ));
        }
    }
    Ok(domain)
}

fn cookie_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err(format!(
            "`{name}` is not a cookie name: 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("__host-") || lower.starts_with("__secure-") {
        return Err(format!(
            "write `{name}` without its prefix: Portcullis adds `__Host-` itself where it applies"
        ));
    }
    Ok(())
}

/// SCIM is served on one exact host, so unlike a route's `from` this is a bare host name: no
/// scheme, port, path or wildcard, and written in lower case so that it reads as it matches.
fn scim_host(host: &str) -> Result<String, String> {
    if host.contains("://") {
        return Err(format!(
            "`{host}` has a scheme: write the host name alone; SCIM is served on every listener"
        ));
    }
    if host.contains('/') {
        return Err(format!(
            "`{host}` has a path: write the host name alone; SCIM is always at /scim/v2"
        ));
    }
    if host.contains(':') {
        return Err(format!(
            "`{host}` has a port: write the host name alone; SCIM is served on every listener"
        ));
    }
    if !is_host_name(host) {
        return Err(format!(
            "`{host}` is not a host name (wildcards are not allowed here)"
        ));
    }
    let lower = host.to_ascii_lowercase();
    if lower != host {
        return Err(format!("write the host in lower case: `{lower}`"));
    }
    Ok(lower)
}

fn token_name(name: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err(format!(
            "`{name}` is not a token name: 1 to 64 characters of A-Z, a-z, 0-9, `.`, `_` and `-`"
        ));
    }
    Ok(name.to_owned())
}

/// The shortest clear token accepted: a bearer token is the only thing guarding SCIM writes.
const MIN_TOKEN_CHARS: usize = 24;

/// Resolves a token's `secret` and hashes it. Messages never include the secret.
fn token_secret_hash(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
    base_dir: &Path,
) -> Result<[u8; 32], String> {
    let secret = resolve_secret(raw, env, base_dir)?;
    // A client's `Authorization` value is read without spaces around it and cannot hold
    // control characters: a token with either would never match.
    let token = secret.expose();
    if token.trim() != token || token.chars().any(char::is_control) {
        return Err(
            "the token has spaces or control characters (a second newline at the end \
                    of its file?): no client could send it"
                .to_owned(),
        );
    }
    if secret.expose().chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token is too short: it must be at least {MIN_TOKEN_CHARS} characters"
        ));
    }
    Ok(Sha256::digest(secret.expose().as_bytes()).into())
}

/// 64 hex digits. The value is not repeated in the message: it may be a clear token written
/// under the wrong key.
fn sha256_hex(hex: &str) -> Result<[u8; 32], String> {
    let invalid = || {
        "not a SHA-256: write the token's SHA-256 as 64 hexadecimal characters (e.g. the output \
         of `printf %s \"$TOKEN\" | sha256sum`)"
            .to_owned()
    };
    // Checked digit by digit: `from_str_radix` alone would take a sign (`+f`).
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let mut sha256 = [0u8; 32];
    for (byte, pair) in sha256.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(sha256)
}

fn upstream(
    url: String,
    verify_tls: bool,
    ca: Option<(PathBuf, CaBundle)>,
    resolve: Resolve<'_>,
) -> Result<Upstream, String> {
    let parts = split_url(&url)?;
    if !parts.path.is_empty() && parts.path != "/" {
        // Not quoted where it may hold a password (see `split_url`).
        let found = match url.contains('@') {
            true => String::new(),
            false => format!(" (found `{}`)", parts.path),
        };
        return Err(format!(
            "an upstream URL has no path{found}: the request path is passed on as is"
        ));
    }
    if !parts.bracketed && !is_host_name(parts.host) {
        return Err(format!("`{}` is not a host name", parts.host));
    }
    if parts.port == Some(0) {
        return Err("`0` is not a port an upstream listens on".to_owned());
    }
    let tls = parts.scheme == Scheme::Https;
    // pingora reads `_` in the first label of such a name as `-` (for the name it sends and the
    // name it checks the certificate for): `billing_api.svc.corp` would be checked as
    // `billing-api.svc.corp`, another service's name.
    let first = parts
        .host
        .split_once('.')
        .filter(|(_, rest)| rest.contains('.'));
    if tls && verify_tls && first.is_some_and(|(label, _)| label.contains('_')) {
        return Err(format!(
            "`{}`: an https upstream whose first label has `_` is verified as if it were `-` \
             (pingora's reading): name it without `_`, or by another name its certificate holds",
            parts.host
        ));
    }
    let port = parts.port.unwrap_or(if tls { 443 } else { 80 });
    let host = parts.host.to_owned();
    let address = resolve(&host, port)?;
    let bracketed = if parts.bracketed {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let host_header = if port == if tls { 443 } else { 80 } {
        bracketed
    } else {
        format!("{bracketed}:{port}")
    };
    let host_header = HeaderValue::try_from(host_header)
        .map_err(|e| format!("`{host}` cannot be sent as a Host header: {e}"))?;
    let (ca_file, ca) = ca.unzip();
    Ok(Upstream {
        url,
        tls,
        host,
        port,
        address,
        verify_tls,
        ca_file,
        ca,
        host_header,
    })
}

/// The parts of an `http(s)://host[:port][/path]` URL. Userinfo, query and fragment are
/// rejected: neither `from` nor `to` has a use for them.
struct UrlParts<'a> {
    scheme: Scheme,
    /// Without brackets for IPv6 literals.
    host: &'a str,
    /// The host was a bracketed IPv6 literal.
    bracketed: bool,
    port: Option<u16>,
    /// Empty or starting with `/`.
    path: &'a str,
}

/// [`split_url_as_written`], whose problems quote the URL or its parts unless it holds `@`:
/// then it may hold a password (`user:password@host` with its scheme left out, or mistyped),
/// and problems are logged and shown on the console.
fn split_url(url: &str) -> Result<UrlParts<'_>, String> {
    split_url_as_written(url).map_err(|problem| match url.contains('@') {
        true if problem == USER_INFO => problem,
        true => "is not a URL of the form http(s)://host[:port][/path] (not shown: it holds \
                 `@`, as a password would)"
            .to_owned(),
        false => problem,
    })
}

/// The problem of a URL with `user@` or `user:password@` before its host.
const USER_INFO: &str = "user information (`user@`) is not allowed";

fn split_url_as_written(url: &str) -> Result<UrlParts<'_>, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "`{url}` is not a URL: expected http://host or https://host"
        ));
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(format!("unknown scheme `{scheme}`: expected http or https")),
    };
    if rest.contains('#') {
        return Err("a fragment (`#...`) is not allowed".to_owned());
    }
    if rest.contains('?') {
        return Err("a query (`?...`) is not allowed".to_owned());
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(USER_INFO.to_owned());
    }
    let (host, bracketed, port) = split_authority(authority)?;
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(UrlParts {
        scheme,
        host,
        bracketed,
        port,
        path,
    })
}

/// `host[:port]` or `[ipv6][:port]` into the host (without brackets), whether it was
/// bracketed, and the port.
fn split_authority(authority: &str) -> Result<(&str, bool, Option<u16>), String> {
    let (host, bracketed, port) = match authority.strip_prefix('[') {
        Some(literal) => {
            let Some((host, after)) = literal.split_once(']') else {
                return Err("unclosed `[` in the host".to_owned());
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(format!("`{host}` is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or("unexpected text after `]`")?),
            };
            (host, true, port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, false, Some(port)),
            None => (authority, false, None),
        },
    };
    // Digits only: `u16` parsing takes `+8443`, which URL parsers refuse.
    let port = port
        .map(|port| {
            port.parse::<u16>()
                .ok()
                .filter(|_| port.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("`{port}` is not a port number"))
        })
        .transpose()?;
    Ok((host, bracketed, port))
}

/// A DNS name or IPv4 address: letters, digits, `-`, `_` and dots between non-empty labels.
fn is_host_name(host: &str) -> bool {
    host.split('.').all(|label| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

fn required<T>(value: Option<T>, path: &KeyPath, p: &mut Problems<'_>) -> Option<T> {
    if value.is_none() {
        p.add(path, MISSING);
    }
    value
}

/// A required value, converted (and so checked) by `check`.
fn checked<T, U>(
    value: Option<T>,
    path: &KeyPath,
    p: &mut Problems<'_>,
    check: impl FnOnce(T) -> Result<U, String>,
) -> Option<U> {
    let value = required(value, path, p)?;
    check(value).map_err(|message| p.add(path, message)).ok()
}

/// A list of names given at `path` (audiences, client ids): refused empty (`empty` says what
/// to write instead), with an empty entry (`blank`), or with one listed twice.
fn listed(
    values: Vec<String>,
    path: &KeyPath,
    empty: &str,
    blank: &str,
    p: &mut Problems<'_>,
) -> Vec<String> {
    if values.is_empty() {
        p.add(path, empty);
    }
    for (j, value) in values.iter().enumerate() {
        if value.is_empty() {
            p.add(&path.index(j), blank);
        }
    }
    duplicates(&values, path, p);
    values
}

/// Reports every value of a list after its first occurrence.
fn duplicates(values: &[String], path: &KeyPath, p: &mut Problems<'_>) {
    for (j, value) in values.iter().enumerate() {
        if values[..j].contains(value) {
            p.add(&path.index(j), format!("`{value}` is listed twice"));
        }
    }
}

fn socket_addr(raw: Option<String>, path: &KeyPath, p: &mut Problems<'_>) -> Option<SocketAddr> {
    let raw = required(raw, path, p)?;
    let address: SocketAddr = raw
        .parse()
        .map_err(|_| {
            p.add(
                path,
                format!("`{raw}` is not an IP:port address (host names are not allowed here)"),
            )
        })
        .ok()?;
    if address.port() == 0 {
        // The system would pick a port no client knows, and `/readyz` could not tell it.
        p.add(path, "port 0 is not a port to listen on: name the port");
        return None;
    }
    if let std::net::IpAddr::V6(v6) = address.ip() {
        if let Some(v4) = v6.to_ipv4_mapped() {
            p.add(
                path,
                format!("write the IPv4 address itself ({v4}:{})", address.port()),
            );
            return None;
        }
    }
    Some(address)
}

/// The addresses (`10.0.0.5`) and networks (`10.0.0.0/8`) of the proxies in front of a
/// listener. Not every address, nor a network written with an address inside it (`10.1.2.3/8`
/// is more likely a mistyped `/32` than all of `10.0.0.0/8`), nor IPv4 written as IPv6: clients
/// are compared by their IPv4 address.
fn trusted_proxies(raw: Vec<String>, path: &KeyPath, p: &mut Problems<'_>) -> Vec<ipnet::IpNet> {
    let mut trusted = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let path = path.index(i);
        let parsed = raw
            .parse::<ipnet::IpNet>()
            .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        let net = match parsed {
            Ok(net) => net,
            Err(_) => {
                let message =
                    format!("`{raw}` is not an IP address or network (`10.0.0.5`, `10.0.0.0/8`)");
                p.add(&path, message);
                continue;
            }
        };
        let mapped = match net {
            ipnet::IpNet::V6(v6) => v6.addr().to_ipv4_mapped(),
            ipnet::IpNet::V4(_) => None,
        };
        if let Some(v4) = mapped {
            // `::ffff:10.0.0.0/104` is `10.0.0.0/8`; with host bits (`::ffff:10.1.2.3/104`),
            // the network or the address alone, as for an IPv4 network written so.
            let written = match net.prefix_len() {
                128 => v4.to_string(),
                bits => match ipnet::Ipv4Net::new(v4, bits.saturating_sub(96)) {
                    Ok(net) if net.trunc().addr() == v4 => net.to_string(),
                    Ok(net) => format!("{} for the network, or {v4} alone", net.trunc()),
                    Err(_) => v4.to_string(),
                },
            };
            p.add(
                &path,
                format!("write the IPv4 address or network itself ({written})"),
            );
        } else if net.prefix_len() == 0 {
            p.add(
                &path,
                format!(
                    "`{raw}` trusts every address, so any client could name itself anyone: \
                     list the proxies' own addresses or networks"
                ),
            );
        } else if net.addr() != net.network() {
            p.add(
                &path,
                format!(
                    "`{raw}` has an address inside its network: write `{}` for the network, \
                     or the address alone",
                    net.trunc()
                ),
            );
        } else {
            trusted.push(net);
        }
    }
    // Networks that each leave some addresses out can still add up to all of them
    // (`0.0.0.0/1` and `128.0.0.0/1`).
    if let Some(all) = ipnet::IpNet::aggregate(&trusted)
        .into_iter()
        .find(|net| net.prefix_len() == 0)
    {
        p.add(
            path,
            format!(
                "together these networks trust every address (they add up to `{all}`), so any \
                 client could name itself anyone: list the proxies' own addresses or networks"
            ),
        );
    }
    trusted
}

/// Whether binding `a` and `b` both would fail: the same port, and the same address or one
/// that takes every address of the other's family (`0.0.0.0`; `[::]`, which on Linux also
/// takes IPv4 unless `bindv6only` is set).
fn binds_over(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (crate::address_takes(a.ip(), b.ip()) || crate::address_takes(b.ip(), a.ip()))
}

fn in_range<T: TryFrom<i64>>(
    value: i64,
    range: RangeInclusive<i64>,
    path: &KeyPath,
    p: &mut Problems<'_>,
) -> Option<T> {
    let converted = T::try_from(value).ok().filter(|_| range.contains(&value));
    if converted.is_none() {
        let message = if *range.end() == i64::MAX {
            format!(
                "{value} is out of range: must be at least {}",
                range.start()
            )
        } else {
            format!(
                "{value} is out of range: must be {} to {}",
                range.start(),
                range.end()
            )
        };
        p.add(path, message);
    }
    converted
}

/// What is wrong with a PostgreSQL URL the driver could not read, naming only words of its
/// own: the driver's message may quote what a password spilled into (an unquoted one with a
/// space reads as an option, one with an `@` as a query).
fn unparsed(e: &tokio_postgres::Error) -> String {
    let detail = std::error::Error::source(e).map(ToString::to_string);
    let detail = detail.unwrap_or_default();
    let option = |prefix: &str| {
        detail
            .strip_prefix(prefix)
            .and_then(|r| r.split('`').next())
    };
    // Names of libpq's this driver does not take.
    const LIBPQ_ONLY: [&str; 8] = [
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "passfile",
        "service",
        "requiressl",
        "gssencmode",
    ];
    match (
        option("invalid value for option `"),
        option("unknown option `"),
    ) {
        (Some("sslmode"), _) => "sslmode must be require (TLS, the server's certificate \
                                 verified against the system's roots, as libpq's verify-full \
                                 does) or disable (prefer only over a Unix socket)"
            .to_owned(),
        // The driver names only options it knows.
        (Some(name), _) => format!("the value of `{name}` is not one this driver takes"),
        (_, Some(name)) if LIBPQ_ONLY.contains(&name) => {
            format!("`{name}` is libpq's, which this driver does not take")
        }
        (_, Some(_)) => "it names an option this driver does not take".to_owned(),
        _ => "invalid connection string".to_owned(),
    }
}

fn postgres(
    raw: file::Postgres,
    path: &KeyPath,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems<'_>,
) -> Option<PostgresConfig> {
    let url_path = path.key("url");
    let url = required(raw.url, &url_path, p).and_then(|raw| {
        let checked = resolve_secret(&raw, env, base_dir).and_then(|url| {
            let parsed = (url.expose().parse::<tokio_postgres::Config>())
                .map_err(|e| format!("is not a PostgreSQL connection URL: {}", unparsed(&e)))?;
            // Without a host the connection could only fail, after the ports are bound.
            if parsed.get_hosts().is_empty() && parsed.get_hostaddrs().is_empty() {
                return Err(
                    "names no host: give `host` (a name, an address, or a directory \
                            holding the server's Unix socket) or `hostaddr`"
                        .to_owned(),
                );
            }
            // `prefer` (also what a URL without `sslmode` means) goes on in the clear when
            // the server, or anyone in between, declines TLS: the password with it. An
            // address (`hostaddr`) is TCP too.
            let over_tcp = !parsed.get_hostaddrs().is_empty()
                || parsed
                    .get_hosts()
                    .iter()
                    .any(|host| matches!(host, tokio_postgres::config::Host::Tcp(_)));
            let named = parsed
                .get_hosts()
                .iter()
                .any(|host| matches!(host, tokio_postgres::config::Host::Tcp(_)));
            if !parsed.get_hostaddrs().is_empty()
                && !named
                && parsed.get_ssl_mode() != tokio_postgres::config::SslMode::Disable
            {
                return Err(
                    "gives `hostaddr` without `host`: TLS has no server name to verify \
                            the certificate against; add `host` (the name on the server's \
                            certificate) or say sslmode=disable (plain TCP, for a network you \
                            trust)"
                        .to_owned(),
                );
            }
            // The server answers a Unix socket's TLS request no, always: the connection
            // could only fail, after the ports are bound (libpq ignores sslmode there).
            if !over_tcp && parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                return Err(
                    "says sslmode=require for a Unix socket, which takes no TLS: the \
                            connection would always fail; leave sslmode out or say \
                            sslmode=disable"
                        .to_owned(),
                );
            }
            if let Some(why) = parsed.get_options().and_then(weakening_option) {
                return Err(why);
            }
            if over_tcp && parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
                return Err("must say sslmode=require (TLS, the server's certificate \
                            verified) or sslmode=disable (plain TCP, for a network you trust): \
                            without it, or with sslmode=prefer, the connection goes on in the \
                            clear when TLS is declined, password included"
                    .to_owned());
            }
            Ok(url)
        });
        checked.map_err(|message| p.add(&url_path, message)).ok()
    });
    let pool_size = raw
        .pool_size
        .and_then(|n| in_range(n, 1..=64, &path.key("pool_size"), p))
        .unwrap_or(4);
    let max_staleness = duration(
        raw.max_staleness,
        Duration::from_secs(2),
        Duration::from_millis(200),
        &path.key("max_staleness"),
        p,
    );
    // The longest lease a replica is granted (`MAX_LEASE` in the store, which counts on it).
    if max_staleness > Duration::from_secs(60) {
        p.add(
            &path.key("max_staleness"),
            "must be at most 1m: a dead replica holds up SCIM answers this long",
        );
    }
    Some(PostgresConfig {
        url: url?,
        pool_size,
        max_staleness,
    })
}

/// What is wrong with a PostgreSQL URL's `options` (server settings, `-c name=value` or
/// `--name=value`, which come after Portcullis' own and win): none may weaken what a commit's
/// answer promises (`synchronous_commit` off; or, past a synchronous standby, only `local`, or
/// `remote_write`, which a standby's crash and promotion may lose), nor set the time after
/// which a replica stalled within a commit is disconnected.
fn weakening_option(options: &str) -> Option<String> {
    for setting in server_settings(options) {
        let (name, value) = setting.split_once('=').unwrap_or((&setting, ""));
        let name = name.replace('-', "_").to_ascii_lowercase();
        let value = value.trim_matches(['\'', '"']).to_ascii_lowercase();
        match name.as_str() {
            "synchronous_commit"
                if ["off", "local", "remote_write", "false", "no", "0"]
                    .contains(&value.as_str()) =>
            {
                return Some(format!(
                    "sets synchronous_commit={value} in `options`: a SCIM change would be \
                     answered before it is safe from a crash (or a failover), and could be lost; \
                     leave it out (Portcullis asks for `on`) or ask for more (`remote_apply`)"
                ));
            }
            "idle_in_transaction_session_timeout" => {
                return Some(
                    "sets idle_in_transaction_session_timeout in `options`: Portcullis sets it \
                     to a quarter of max_staleness, so that a replica stalled within a commit \
                     cannot hold up every other replica's; leave it out"
                        .to_owned(),
                );
            }
            _ => {}
        }
    }
    None
}

/// The `name=value` settings in a PostgreSQL URL's `options`, as the server reads them: split
/// into words as the server does (at whitespace, a `\` taking the next character as it is, as
/// libpq's documentation says), then
/// read as the server's own switches are, by getopt: `-c name=value`, `-cname=value`,
/// `--name=value`, or after other flags in one word (`-ec name=value`); a flag that takes a
/// value takes the rest of its word, or the next word.
fn server_settings(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        if matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C') {
            words.extend(word.take());
            continue;
        }
        let c = if c == '\\' { chars.next() } else { Some(c) };
        word.get_or_insert_with(String::new).extend(c);
    }
    words.extend(word);
    // The server's switches that take a value (`-` too: `--name=value`).
    const WITH_VALUE: &str = "BCcDdfhkNprStvW-";
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let Some(flags) = word.strip_prefix('-') else {
            continue;
        };
        if let Some((at, flag)) = flags.char_indices().find(|(_, f)| WITH_VALUE.contains(*f)) {
            let rest = &flags[at + flag.len_utf8()..];
            let value = match rest {
                "" => words.next().unwrap_or_default(),
                rest => rest.to_owned(),
            };
            if matches!(flag, 'c' | '-') {
                settings.push(value);
            }
        }
    }
    settings
}

/// A humantime duration such as `30s` or `1m 30s`; never zero, and at least `min`.
fn duration(
    raw: Option<String>,
    default: Duration,
    min: Duration,
    path: &KeyPath,
    p: &mut Problems<'_>,
) -> Duration {
    // Longer than any setting needs, and short enough that no clock reading plus it overflows
    // (`400000000000y` parses, and made the drain at shutdown panic).
    // Years as humantime counts them (365.25 days), so `10y` itself is taken.
    const LONGEST: Duration = Duration::from_secs(10 * 31_557_600);
    let Some(raw) = raw else { return default };
    match parse_duration(&raw) {
        Ok(d) if d.is_zero() => p.add(path, "must be greater than zero"),
        Ok(d) if d < min => p.add(
            path,
            format!("must be at least {}", humantime::format_duration(min)),
        ),
        Ok(d) if d > LONGEST => p.add(path, "must be at most 10 years"),
        Ok(d) => return d,
        Err(message) => p.add(path, message),
    }
    default
}

/// Clock skew allowed when checking token times: zero up to five minutes, 60s by default.
fn leeway(raw: Option<String>, path: &KeyPath, p: &mut Problems<'_>) -> Duration {
    let default = Duration::from_secs(60);
    let max = Duration::from_secs(5 * 60);
    let Some(raw) = raw else { return default };
    match parse_duration(&raw) {
        Ok(d) if d > max => p.add(
            path,
            format!(
                "must be at most {}: more lets expired tokens in",
                humantime::format_duration(max)
            ),
        ),
        Ok(d) => return d,
        Err(message) => p.add(path, message),
    }
    default
}

/// Whether `issuer` is one of Microsoft Entra ID's: its v2.0 and v1.0 issuers, in the global,
/// US government and China clouds, and External ID's (`<tenant>.ciamlogin.com`).
pub fn is_entra_issuer(issuer: &str) -> bool {
    const ENTRA: [&str; 5] = [
        "https://login.microsoftonline.com/",
        "https://sts.windows.net/",
        "https://login.microsoftonline.us/",
        "https://login.partner.microsoftonline.cn/",
        "https://sts.chinacloudapi.cn/",
    ];
    ENTRA.iter().any(|prefix| issuer.starts_with(prefix))
        || issuer
            .strip_prefix("https://")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|host| host.ends_with(".ciamlogin.com"))
}

/// How early an issuer dates its tokens: at most 10 minutes; by default 5 minutes for Entra
/// ID's issuers, which date every token so (`iat` and `nbf`), and 0 for others.
fn iat_backdate(
    raw: Option<String>,
    issuer: Option<&str>,
    path: &KeyPath,
    p: &mut Problems<'_>,
) -> Duration {
    let default = if issuer.is_some_and(is_entra_issuer) {
        Duration::from_secs(5 * 60)
    } else {
        Duration::ZERO
    };
    let max = Duration::from_secs(10 * 60);
    let Some(raw) = raw else { return default };
    match parse_duration(&raw) {
        Ok(d) if d > max => p.add(
            path,
            format!(
                "must be at most {}: more lets tokens issued before a re-activation in",
                humantime::format_duration(max)
            ),
        ),
        Ok(d) => return d,
        Err(message) => p.add(path, message),
    }
    default
}

/// A duration as humantime reads it (`30s`, `5m`, `1h 30m`), but for the unit `M`, which it
/// reads as months: ISO 8601 and many a tool write minutes so, and `"30M"` would be an idle
/// timeout of two and a half years.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    if raw
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|unit| unit == "M")
    {
        return Err(format!(
            "`{raw}`: `M` is months here: write `m` for minutes (or `months`)"
        ));
    }
    humantime::parse_duration(raw)
        .map_err(|e| format!("`{raw}` is not a duration ({e}): write e.g. \"30s\" or \"500ms\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deny_covers_another_s_callers_only_if_it_refuses_all_of_them() {
        let rule = |f: &dyn Fn(&mut RuleSpec)| {
            let mut rule = RuleSpec::new("r");
            f(&mut rule);
            rule
        };
        let contractors = rule(&|r| r.groups = vec!["contractors".to_owned()]);
        let everyone = rule(&|r| r.any_signed_in = true);
        let more = rule(&|r| r.groups = vec!["Interns".to_owned(), "CONTRACTORS".to_owned()]);
        let gets = rule(&|r| {
            r.any_signed_in = true;
            r.methods = Some(vec!["GET".to_owned()]);
        });
        assert!(covers_callers(&everyone, &contractors));
        assert!(covers_callers(&more, &contractors));
        assert!(!covers_callers(&contractors, &more));
        assert!(!covers_callers(&contractors, &everyone));
        // Of GETs only, it leaves the other methods.
        assert!(!covers_callers(&gets, &contractors));
    }
}
