//! The compiled route table: built once per configuration, read by every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use portcullis_config::{Route, Scheme, Upstream};

use crate::upstream::UpstreamSet;

/// A route ready for the hot path: its upstreams, limits and metric handles resolved at load.
pub struct CompiledRoute {
    pub config: Route,
    pub upstreams: UpstreamSet,
    pub metrics: crate::metrics::RouteMetrics,
    /// The other names of what its prefix names, where that is a page's file (see
    /// [`RouteTable::refuses`]).
    pub pages: portcullis_policy::PageNames,
    /// How many segments its prefix holds, as paths are read
    /// ([`portcullis_policy::loose_depth`]).
    pub depth: usize,
    /// Its configuration as it judges requests ([`judging`]).
    judged: Route,
}

impl CompiledRoute {
    pub fn new(config: Route) -> Self {
        Self {
            upstreams: UpstreamSet::new(&config),
            metrics: crate::metrics::RouteMetrics::new(&config.name),
            pages: portcullis_policy::PageNames::of(&config.path_prefix),
            depth: portcullis_policy::loose_depth(&config.path_prefix),
            judged: judging(&config),
            config,
        }
    }
}

/// Keyed by what the configuration names (hosts, route names): foldhash rather than SipHash, as
/// nothing a client sends is ever inserted.
type Named<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Routes indexed by host. Within a host, routes are ordered by how many segments their prefix
/// holds, as paths are read ([`portcullis_policy::loose_depth`]), so the first match is the
/// narrowest prefix.
#[derive(Default)]
pub struct RouteTable {
    exact: Named<Vec<Arc<CompiledRoute>>>,
    /// `*.example.com` routes, keyed by the suffix including its leading dot (`.example.com`).
    wildcard: Vec<(String, Vec<Arc<CompiledRoute>>)>,
    /// Whether some route's prefix names a page's file ([`CompiledRoute::pages`]).
    pages: bool,
}

pub enum Match<'a> {
    Found(&'a Arc<CompiledRoute>),
    /// A route exists for this host and path, but for the other scheme.
    WrongScheme(&'a Arc<CompiledRoute>),
    None,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<CompiledRoute>>) -> Self {
        let pages = routes.iter().any(|r| !r.pages.is_empty());
        let mut exact: Named<Vec<Arc<CompiledRoute>>> = Named::default();
        let mut wildcard: HashMap<String, Vec<Arc<CompiledRoute>>> = HashMap::new();
        for route in routes {
            match route.config.host.strip_prefix('*') {
                Some(suffix) => wildcard.entry(suffix.to_owned()).or_default().push(route),
                None => exact
                    .entry(route.config.host.clone())
                    .or_default()
                    .push(route),
            }
        }
        let by_depth = |routes: &mut Vec<Arc<CompiledRoute>>| {
            routes.sort_by_key(|r| std::cmp::Reverse(r.depth));
        };
        exact.values_mut().for_each(by_depth);
        let mut wildcard: Vec<_> = wildcard.into_iter().collect();
        wildcard.iter_mut().for_each(|(_, routes)| by_depth(routes));
        // The most specific wildcard (longest suffix) is tried first.
        wildcard.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Self {
            exact,
            wildcard,
            pages,
        }
    }

    /// Every route, in no particular order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<CompiledRoute>> {
        self.exact
            .values()
            .chain(self.wildcard.iter().map(|(_, routes)| routes))
            .flatten()
    }

    /// Whether some route serves the lower-cased `host`.
    pub fn serves(&self, host: &str) -> bool {
        self.exact.contains_key(host)
            || self
                .wildcard
                .iter()
                .any(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
    }

    /// Finds the route for a lower-cased `host` (without port) and a normalized `path`. Path
    /// prefixes are read as the most lenient upstream reads a path (`;` parameters dropped, any
    /// case: [`portcullis_policy::loosely_within`]), so no spelling an upstream reads as
    /// inside a route's prefix lands on another route.
    ///
    /// The narrowest prefix that holds the path decides, whatever its scheme: a route of the
    /// other scheme with a wider prefix does not take the paths it narrows (a plain-HTTP
    /// `http://app/` does not serve what `https://app/admin` guards). Only a route of the same
    /// prefix, as paths are read (`/api` and `/API/` are one), serves the other scheme.
    pub fn find(&self, scheme: Scheme, host: &str, path: &str) -> Match<'_> {
        let read = portcullis_policy::LoosePath::new(path);
        for routes in self.candidates(host) {
            let mut holding =
                (routes.iter()).filter(|route| read.within(&route.config.path_prefix));
            let Some(longest) = holding.next() else {
                continue;
            };
            if longest.config.scheme == scheme {
                return Match::Found(longest);
            }
            // Another scheme's: a route of this one serves the path only with the same prefix.
            let depth = longest.depth;
            return holding
                .take_while(|route| route.depth == depth)
                .find(|route| route.config.scheme == scheme)
                .map_or(Match::WrongScheme(longest), Match::Found);
        }
        Match::None
    }

    /// The routes that may serve `host`: its exact host's, then each wildcard's that covers it,
    /// the most specific first.
    fn candidates<'t: 'h, 'h>(
        &'t self,
        host: &'h str,
    ) -> impl Iterator<Item = &'t [Arc<CompiledRoute>]> + 'h {
        self.exact.get(host).map(Vec::as_slice).into_iter().chain(
            self.wildcard
                .iter()
                .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
                .map(|(_, routes)| routes.as_slice()),
        )
    }

    /// Why a request to `route` (found for `scheme`, `host` and the normalized `path`) is
    /// refused with 400 before anyone is asked for, if it is; the proxy and `explain` both
    /// ask.
    ///
    /// - A path that only the lenient reading of [`Self::find`] puts on this route (another
    ///   case, `;` parameters, `%2B` for `+`), where a wider route holds it as written: see
    ///   below.
    /// - A PHP front controller routes what follows its script (`/index.php/admin` is
    ///   `/admin` to Laravel, Symfony, Drupal): a path that reads as another route's that way
    ///   would be served by this route's upstream past that route's rules. Unless this route
    ///   names the script itself (`/remote.php/` beside `/`, for Nextcloud's DAV clients):
    ///   then its operator routed what follows the script.
    /// - Apache's MultiViews, nginx's `try_files $uri $uri.php` and clean-URL hosts serve a
    ///   page's file by its name without the extension, and Apache, nginx's
    ///   `fastcgi_split_path_info` and IIS run a page's file with path info as that page: a
    ///   path that reads as a narrower route's page either way (`/adminer` beside an
    ///   `/adminer.php` route, `/admin.php` and `/admin.php/x` beside an `/admin/` one)
    ///   would be served by this route's upstream past that route's rules.
    /// - Laravel and Symfony take a POST's `_method` parameter as its method: where a rule
    ///   names methods, one in the `query` would dodge it. (One in a form body is not read
    ///   here: the README says so.)
    /// - CodeIgniter decodes the path it routes twice (`/%2561dmin` is `/admin`), and routes a
    ///   query that begins with `/` as the path when the path names nothing but where it is
    ///   installed or its script (`/?/admin`, `/crm/index.php?/admin`, `/crm?/admin`): a path,
    ///   or such a query where it could be installed at the path (or its script's directory),
    ///   that reads as another route's path that way is refused. (Not every one: Jenkins'
    ///   branch `feature/x` is `/job/feature%252Fx`, SvelteKit's form actions are
    ///   `/login?/register`.)
    pub fn refuses(
        &self,
        scheme: Scheme,
        host: &str,
        route: &Arc<CompiledRoute>,
        path: &str,
        query: Option<&str>,
    ) -> Option<&'static str> {
        // Routes are chosen reading the path leniently (any case, `;` parameters dropped), so
        // that no spelling an upstream reads as a route's lands on another. An upstream that
        // reads it as written takes a spelling only that reading puts here (`/PUBLIC/x`,
        // `/;a/public/x` on a `/public/` route) as another route's path (a wider one's, or
        // the other scheme's): judged by this route's rules, it would be served past that
        // one's (a public `/public/` route beside a `/` for staff). Any other route that holds
        // it, of either scheme, and a `*.` route's too: how the upstream reads the path
        // depends on neither.
        // (A route of the same prefix as written, the other scheme's or a `*.` one, takes
        // the path as this one does: no other reading.)
        // The path read once for all the routes of the host, not once a route (a 60 KiB path
        // against 50 routes), and only where it is asked of them.
        let read = std::cell::OnceCell::new();
        let read = || read.get_or_init(|| portcullis_policy::LoosePath::new(path));
        if !portcullis_policy::strictly_within(&route.config.path_prefix, path) {
            let depth = route.depth;
            let wider = self.candidates(host).flatten().any(|other| {
                let prefix = &other.config.path_prefix;
                !Arc::ptr_eq(other, route)
                    && (portcullis_policy::strictly_within(prefix, path)
                        || (other.depth < depth && read().within(prefix)))
            });
            if wider {
                return Some(
                    "a path that reads as this route's only in another case, with \
                     parameters or with `+` escaped, and as a wider route's as written",
                );
            }
        }
        let script = portcullis_policy::script_routed(path)
            .filter(|(_, end)| route.depth < portcullis_policy::loose_depth(&path[..*end]));
        if let Some((routed, _)) = script {
            let other = match self.find(scheme, host, &routed) {
                Match::Found(other) | Match::WrongScheme(other) => !Arc::ptr_eq(other, route),
                Match::None => false,
            };
            if other {
                return Some(
                    "a path that a PHP front controller reads as another route's \
                     (/index.php/admin is /admin)",
                );
            }
        }
        let info = portcullis_policy::page_with_info(path);
        if self.pages || info.is_some() {
            // Among the routes `find` chose this one from: those of another group of the host
            // (a `*.` one behind its own) never take its paths.
            let group = (self.candidates(host))
                .find(|group| group.iter().any(|other| Arc::ptr_eq(other, route)))
                .unwrap_or_default();
            let depth = route.depth;
            let page = info.as_deref().map(portcullis_policy::LoosePath::new);
            // Narrower by the name it holds the path by (`/admin` for `/index.php/admin`). One
            // as narrow as the route found holds it as well: refused too, unless the two judge
            // alike (`/crm/` beside `/index.php/crm` for the same people: both spellings are
            // served).
            let narrower_page = group.iter().any(|other| {
                let prefix = &other.config.path_prefix;
                let named = (!other.pages.is_empty())
                    .then(|| other.pages.holding(read()))
                    .flatten();
                named.is_some_and(|named| {
                    named > depth || (named == depth && other.judged != route.judged)
                }) || (other.depth > depth && page.as_ref().is_some_and(|page| page.within(prefix)))
            });
            if narrower_page {
                return Some(
                    "a path that servers read as a narrower route's page (/admin is \
                     admin.php, /admin.php/x is /admin/x)",
                );
            }
        }
        if route.config.policy.names_methods()
            && query.is_some_and(portcullis_policy::path::overrides_method)
        {
            return Some(
                "a method override (_method, X-HTTP-Method-Override) in the query, where rules \
                 name methods",
            );
        }
        // As CodeIgniter reads a path: decoded twice. A reading that is no path (a `\` or a
        // control character in it) is refused.
        let another =
            |routed: &str| match portcullis_policy::path::normalize(&twice_decoded(routed)) {
                Ok(routed) => match self.find(scheme, host, &routed) {
                    Match::Found(other) | Match::WrongScheme(other) => !Arc::ptr_eq(other, route),
                    Match::None => false,
                },
                Err(_) => true,
            };
        if path.contains("%25") && another(path) {
            return Some("a path that CodeIgniter, decoding it twice, reads as another route's");
        }
        if let Some(routed) = query.and_then(|query| query_routed(path, query)) {
            if another(&routed) {
                return Some(
                    "a query that CodeIgniter reads as another route's path (/?/admin is /admin)",
                );
            }
        }
        None
    }
}

/// `config` without what only names it (its name, its prefix, its rules' key paths, where its
/// upstreams' names resolved to): two routes whose copies are equal let in the same callers,
/// the same way, to the same upstreams, with the same settings.
fn judging(config: &Route) -> Route {
    // One name for every rule (a rule must have one to compile).
    let unnamed = |rules: &[portcullis_policy::RuleSpec]| -> Vec<portcullis_policy::RuleSpec> {
        let unnamed = |rule: &portcullis_policy::RuleSpec| portcullis_policy::RuleSpec {
            name: "rule".to_owned(),
            ..rule.clone()
        };
        rules.iter().map(unnamed).collect()
    };
    let (allow, deny) = (unnamed(&config.allow), unnamed(&config.deny));
    // The rules compile (validation compiled them); were it not so, the route's own policy
    // names them, and the copy is alike to none.
    let policy = portcullis_policy::Policy::compile(allow.clone(), deny.clone())
        .map(Arc::new)
        .unwrap_or_else(|_| config.policy.clone());
    // Each upstream's name was looked up on its own at start: a DNS server that rotates a
    // name's addresses gives two routes to one upstream two of them.
    let unresolved = |upstream: &Upstream| Upstream {
        address: SocketAddr::from(([0, 0, 0, 0], upstream.port)),
        ..upstream.clone()
    };
    Route {
        name: String::new(),
        path_prefix: String::new(),
        allow,
        deny,
        policy,
        upstreams: config.upstreams.iter().map(unresolved).collect(),
        ..config.clone()
    }
}

/// `text` percent-decoded twice, as CodeIgniter reads the path it routes, written back as a
/// path to normalize: a `%` that is left stands for itself (`%25`).
fn twice_decoded(text: &str) -> String {
    let once: Vec<u8> = percent_encoding::percent_decode_str(text).collect();
    let bytes: Vec<u8> = percent_encoding::percent_decode(&once).collect();
    String::from_utf8_lossy(&bytes).replace('%', "%25")
}

/// The path CodeIgniter installed at `path` (or at the directory of its script, when `path`
/// names a `.php` file) routes a `query` that begins with `/` as: the query, up to any `?`,
/// below that directory.
fn query_routed(path: &str, query: &str) -> Option<String> {
    let routed = query
        .strip_prefix('/')?
        .split('?')
        .next()
        .unwrap_or_default();
    let dir = path.trim_end_matches('/');
    let script = dir.rsplit('/').next().is_some_and(|last| {
        last.len() > 4 && last.as_bytes()[last.len() - 4..].eq_ignore_ascii_case(b".php")
    });
    let dir = match script {
        true => dir.rsplit_once('/').map_or("", |(dir, _)| dir),
        false => dir,
    };
    Some(format!("{dir}/{routed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_found_by_host_and_path() {
        let runtime = crate::testing::World::new().runtime();
        let table = &runtime.routes;
        let name = |m: Match<'_>| match m {
            Match::Found(route) => route.config.name.clone(),
            Match::WrongScheme(route) => format!("wrong scheme: {}", route.config.name),
            Match::None => "none".to_owned(),
        };
        assert_eq!(
            name(table.find(Scheme::Http, "app.test", "/x")),
            "http://app.test"
        );
        assert_eq!(
            name(table.find(Scheme::Https, "app.test", "/x")),
            "wrong scheme: http://app.test"
        );
        assert_eq!(name(table.find(Scheme::Http, "nowhere.test", "/")), "none");
        // A prefix holds however an upstream could read the path, and at segment boundaries.
        // Its trailing `/` is not required: Express and Rails serve `/v1` as `/v1/`.
        for path in [
            "/v1/",
            "/v1/x",
            "/V1/x",
            "/v1;jsessionid=1/x",
            "/v1;x/",
            "/v1",
            "/V1;x",
        ] {
            assert_eq!(
                name(table.find(Scheme::Http, "app.test", path)),
                "http://app.test/v1/",
                "{path}"
            );
        }
        for path in ["/v", "/v1x/y", "/v10/"] {
            assert_eq!(
                name(table.find(Scheme::Http, "app.test", path)),
                "http://app.test",
                "{path}"
            );
        }
    }

    /// Of two `*.` routes that hold a host, the longer suffix's serves it, whatever order
    /// the configuration lists them in (they are grouped in a map of no order); where it does
    /// not hold the path, the shorter's does.
    #[test]
    fn the_longest_wildcard_suffix_that_holds_a_path_serves_it() {
        let runtime = crate::testing::World::new().runtime();
        let like_at = |host: &str, prefix: &str| {
            let mut config = runtime.routes.exact["app.test"][0].config.clone();
            config.host = host.to_owned();
            config.scheme = Scheme::Https;
            config.path_prefix = prefix.to_owned();
            config.name = format!("{host}{prefix}");
            Arc::new(CompiledRoute::new(config))
        };
        let routes = [
            like_at("*.corp.test", ""),
            like_at("*.apps.corp.test", ""),
            like_at("*.pages.corp.test", "/app/"),
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let table = RouteTable::new(order.iter().map(|&i| routes[i].clone()).collect());
            let name = |host: &str, path: &str| match table.find(Scheme::Https, host, path) {
                Match::Found(route) => route.config.name.clone(),
                _ => "none".to_owned(),
            };
            assert_eq!(
                name("x.apps.corp.test", "/x"),
                "*.apps.corp.test",
                "{order:?}"
            );
            assert_eq!(
                name("a.b.apps.corp.test", "/"),
                "*.apps.corp.test",
                "{order:?}"
            );
            assert_eq!(name("x.corp.test", "/x"), "*.corp.test", "{order:?}");
            assert_eq!(
                name("x.pages.corp.test", "/app/x"),
                "*.pages.corp.test/app/"
            );
            assert_eq!(
                name("x.pages.corp.test", "/other"),
                "*.corp.test",
                "{order:?}"
            );
        }
    }

    #[test]
    fn a_route_of_the_other_scheme_with_a_shorter_prefix_does_not_take_the_paths_it_narrows() {
        let runtime = crate::testing::World::new().runtime();
        let like_at = |host: &str, scheme: Scheme, prefix: &str| {
            let mut config = runtime.routes.exact["app.test"][0].config.clone();
            config.host = host.to_owned();
            config.scheme = scheme;
            config.path_prefix = prefix.to_owned();
            config.name = format!("{scheme:?} {prefix}");
            Arc::new(CompiledRoute::new(config))
        };
        let like = |scheme: Scheme, prefix: &str| like_at("app.test", scheme, prefix);
        let table = RouteTable::new(vec![
            like(Scheme::Http, ""),
            like(Scheme::Https, "/admin"),
            like(Scheme::Https, "/both"),
            like(Scheme::Http, "/both"),
            like(Scheme::Http, "/acme"),
            // One prefix as paths are read, however spelled.
            like(Scheme::Http, "/api/"),
            like(Scheme::Https, "/API"),
            // `/ab;x` is `/ab` to an upstream: wider than `/ab/c`, though as long.
            like(Scheme::Http, "/ab;x"),
            like(Scheme::Https, "/ab/c"),
        ]);
        let name = |scheme: Scheme, path: &str| match table.find(scheme, "app.test", path) {
            Match::Found(route) => route.config.name.clone(),
            Match::WrongScheme(route) => format!("wrong scheme: {}", route.config.name),
            Match::None => "none".to_owned(),
        };
        // The plain-HTTP route for the whole host does not serve what the HTTPS one guards,
        // however the path is spelled: it is sent to HTTPS.
        for path in ["/admin", "/admin/users", "/ADMIN;x/users"] {
            assert_eq!(
                name(Scheme::Http, path),
                "wrong scheme: Https /admin",
                "{path}"
            );
        }
        assert_eq!(name(Scheme::Https, "/admin/users"), "Https /admin");
        assert_eq!(name(Scheme::Http, "/other"), "Http ");
        // A spelling only the lenient reading puts on a narrower route, where a wider route
        // holds it as written, is refused: an upstream reading it as written serves it as the
        // wider route's path, past that route's rules.
        let refused = |scheme: Scheme, path: &str| match table.find(scheme, "app.test", path) {
            Match::Found(route) => table.refuses(scheme, "app.test", route, path, None),
            _ => panic!("{path}: no route"),
        };
        for path in ["/API/x", "/Acme", "/acme;x/y", "/;x/acme/y", "/ACME/y"] {
            assert!(refused(Scheme::Http, path).is_some(), "{path}");
        }
        for path in ["/api/x", "/api", "/acme", "/acme/Y;x", "/other"] {
            assert_eq!(refused(Scheme::Http, path), None, "{path}");
        }
        // A wider route of the other scheme counts too: the upstream reads the path the same.
        assert!(refused(Scheme::Https, "/ADMIN/users").is_some());
        // So does a `*.` route behind a host's own routes; and where no wider route takes the
        // path as written, the narrow route's rules are the only ones.
        let table = RouteTable::new(vec![
            like_at("*.corp.test", Scheme::Https, ""),
            like_at("app.corp.test", Scheme::Https, "/public/"),
            like_at("solo.test", Scheme::Https, "/public/"),
        ]);
        let refused = |host: &str, path: &str| match table.find(Scheme::Https, host, path) {
            Match::Found(route) => table.refuses(Scheme::Https, host, route, path, None),
            _ => panic!("{host}{path}: no route"),
        };
        assert!(refused("app.corp.test", "/PUBLIC/x").is_some());
        assert_eq!(refused("app.corp.test", "/public/x"), None);
        assert_eq!(refused("solo.test", "/PUBLIC/x"), None);
        // Letters beyond ASCII too (ASP.NET Core reads `/Über` as `/über`).
        let table = RouteTable::new(vec![
            like_at("app.corp.test", Scheme::Https, ""),
            like_at("app.corp.test", Scheme::Https, "/%C3%BCber/"),
            like_at("solo.test", Scheme::Https, "/%C3%BCber/"),
        ]);
        let found = |host: &str, path: &str| match table.find(Scheme::Https, host, path) {
            Match::Found(route) => (
                route.config.path_prefix.clone(),
                table.refuses(Scheme::Https, host, route, path, None),
            ),
            _ => panic!("{host}{path}: no route"),
        };
        let (prefix, refused) = found("app.corp.test", "/%C3%9Cber/x");
        assert_eq!(prefix, "/%C3%BCber/");
        assert!(refused.is_some());
        assert_eq!(
            found("solo.test", "/%C3%9CBER/x"),
            ("/%C3%BCber/".to_owned(), None)
        );
        // A route of the other scheme at the same depth, spelled otherwise, and a wider route
        // that holds the path only leniently, count too.
        let table = RouteTable::new(vec![
            like_at("app.test", Scheme::Http, "/Reports/"),
            like_at("app.test", Scheme::Https, "/reports/"),
            like_at("app.test", Scheme::Https, "/app/"),
            like_at("app.test", Scheme::Https, "/app/public/"),
        ]);
        let refused = |path: &str| match table.find(Scheme::Https, "app.test", path) {
            Match::Found(route) => table.refuses(Scheme::Https, "app.test", route, path, None),
            _ => panic!("{path}: no route"),
        };
        for path in ["/Reports/x", "/APP/public/x", "/app;x/public/y"] {
            assert!(refused(path).is_some(), "{path}");
        }
        for path in ["/reports/x", "/app/public/x", "/app/x", "/app/public"] {
            assert_eq!(refused(path), None, "{path}");
        }
        // A twin of the same prefix as written (the other scheme's, or a `*.` one) reads the
        // path as the route does: another spelling goes to the route, where nothing else holds
        // it.
        let table = RouteTable::new(vec![
            like_at("app.test", Scheme::Http, "/v1/"),
            like_at("app.test", Scheme::Https, "/v1/"),
            like_at("*.test", Scheme::Https, "/v1/"),
        ]);
        for path in ["/V1/x", "/v1;x/y"] {
            let Match::Found(route) = table.find(Scheme::Https, "app.test", path) else {
                panic!("{path}: no route");
            };
            assert_eq!(
                table.refuses(Scheme::Https, "app.test", route, path, None),
                None,
                "{path}"
            );
        }
        // A path that servers read as a narrower route's page, by its clean name or its file
        // with path info: served by the wider route's upstream, past that route's rules.
        let table = RouteTable::new(vec![
            like_at("app.test", Scheme::Https, ""),
            like_at("app.test", Scheme::Https, "/adminer.php"),
            like_at("app.test", Scheme::Https, "/admin/index.php"),
            like_at("app.test", Scheme::Https, "/tools/"),
            like_at("app.test", Scheme::Https, "/tools/report"),
            like_at("app.test", Scheme::Https, "/remote.php/"),
            like_at("app.test", Scheme::Https, "/index.php/shop-admin"),
            // Both spellings of a front controller's path routed alike.
            like_at("app.test", Scheme::Https, "/crm/"),
            {
                // Its rules named by their own key paths, as a file names them.
                let mut config = like_at("app.test", Scheme::Https, "/index.php/crm")
                    .config
                    .clone();
                for rule in config.allow.iter_mut().chain(&mut config.deny) {
                    rule.name = format!("routes[9].{}", rule.name);
                }
                config.policy = Arc::new(
                    portcullis_policy::Policy::compile(config.allow.clone(), config.deny.clone())
                        .expect("the rules compile"),
                );
                // Its upstream's name resolved, at start, to another of the name's addresses
                // (a DNS server that rotates them): the same upstream.
                for upstream in &mut config.upstreams {
                    upstream.address.set_ip([10, 0, 0, 2].into());
                }
                Arc::new(CompiledRoute::new(config))
            },
            // A directory beside its index page, judged otherwise.
            like_at("app.test", Scheme::Https, "/staff/"),
            {
                let mut config = like_at("app.test", Scheme::Https, "/staff/index.php")
                    .config
                    .clone();
                config.deny = vec![portcullis_policy::RuleSpec::new("no one")];
                Arc::new(CompiledRoute::new(config))
            },
            like_at("*.test", Scheme::Https, "/jenkins/index.php"),
        ]);
        let refused = |path: &str| match table.find(Scheme::Https, "app.test", path) {
            Match::Found(route) => table.refuses(Scheme::Https, "app.test", route, path, None),
            _ => panic!("{path}: no route"),
        };
        for path in [
            "/adminer",
            "/Adminer/x",
            "/adminer;x/y",
            "/admin/",
            "/admin",
            "/tools/report.php/x",
            "/tools/REPORT.aspx;s=1/",
            // The page's own file, as the page's clean name is served.
            "/tools/report.php",
            "/tools/REPORT.aspx;s=1",
            "/shop-admin/orders",
            "/staff/",
            "/staff",
        ] {
            assert!(refused(path).is_some(), "{path}");
        }
        for path in [
            "/adminer.php",
            "/adminer.php/x",
            "/adminerx",
            "/admin/x",
            "/tools/report.json",
            "/tools/reports.php/x",
            "/remote.php/dav/files",
            "/static/app.js",
            "/other.php/x",
            "/",
            "/crm/x",
            "/index.php/crm/x",
            "/staff/x",
            // A `*.` route's page: `find` takes the host's own routes first.
            "/jenkins/",
        ] {
            assert_eq!(refused(path), None, "{path}");
        }
        // A prefix both schemes have: each scheme's own route.
        assert_eq!(name(Scheme::Http, "/both/x"), "Http /both");
        assert_eq!(name(Scheme::Https, "/both/x"), "Https /both");
        // An HTTPS request under a plain-HTTP route's prefix is not served by it, and no
        // shorter HTTPS route takes it either.
        assert_eq!(name(Scheme::Https, "/acme/x"), "wrong scheme: Http /acme");
        assert_eq!(name(Scheme::Https, "/other"), "wrong scheme: Http ");
        assert_eq!(name(Scheme::Http, "/api/x"), "Http /api/");
        assert_eq!(name(Scheme::Https, "/api/x"), "Https /API");
        assert_eq!(name(Scheme::Http, "/ab/c/d"), "wrong scheme: Https /ab/c");
        assert_eq!(name(Scheme::Http, "/ab/d"), "Http /ab;x");
    }
}
