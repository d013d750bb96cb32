//! The compiled route table: built once per configuration, read by every request.

use std::collections::HashMap;
use std::sync::Arc;

use portcullis_config::{Route, Scheme};

use crate::upstream::UpstreamSet;

/// A route ready for the hot path: its upstreams, limits and metric handles resolved at load.
pub struct CompiledRoute {
    pub config: Route,
    pub upstreams: UpstreamSet,
    pub metrics: crate::metrics::RouteMetrics,
}

/// Keyed by what the configuration names (hosts, route names): foldhash rather than SipHash, as
/// nothing a client sends is ever inserted.
type Named<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Routes indexed by host. Within a host, routes are ordered by descending prefix length so the
/// first match is the longest prefix.
#[derive(Default)]
pub struct RouteTable {
    exact: Named<Vec<Arc<CompiledRoute>>>,
    /// `*.example.com` routes, keyed by the suffix including its leading dot (`.example.com`).
    wildcard: Vec<(String, Vec<Arc<CompiledRoute>>)>,
}

pub enum Match<'a> {
    Found(&'a Arc<CompiledRoute>),
    /// A route exists for this host and path, but for the other scheme.
    WrongScheme(&'a Arc<CompiledRoute>),
    None,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<CompiledRoute>>) -> Self {
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
        let by_prefix_len = |routes: &mut Vec<Arc<CompiledRoute>>| {
            routes.sort_by_key(|r| std::cmp::Reverse(r.config.path_prefix.len()));
        };
        exact.values_mut().for_each(by_prefix_len);
        let mut wildcard: Vec<_> = wildcard.into_iter().collect();
        wildcard
            .iter_mut()
            .for_each(|(_, routes)| by_prefix_len(routes));
        // The most specific wildcard (longest suffix) is tried first.
        wildcard.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Self { exact, wildcard }
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
    /// ASCII case: [`portcullis_policy::loosely_within`]), so no spelling an upstream reads as
    /// inside a route's prefix lands on another route.
    pub fn find(&self, scheme: Scheme, host: &str, path: &str) -> Match<'_> {
        let candidates = self.exact.get(host).map(Vec::as_slice).into_iter().chain(
            self.wildcard
                .iter()
                .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
                .map(|(_, routes)| routes.as_slice()),
        );
        let mut wrong_scheme = None;
        for routes in candidates {
            for route in routes {
                if !portcullis_policy::loosely_within(&route.config.path_prefix, path) {
                    continue;
                }
                if route.config.scheme == scheme {
                    return Match::Found(route);
                }
                wrong_scheme.get_or_insert(route);
            }
            if wrong_scheme.is_some() {
                break;
            }
        }
        wrong_scheme.map_or(Match::None, Match::WrongScheme)
    }
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
}
