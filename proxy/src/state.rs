//! The state every request reads: the compiled configuration, swapped whole on reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use portcullis_config::{Config, Scheme};
use portcullis_policy::Policy;
use portcullis_scim::store::Directory;

use crate::assertion::Signer;
use crate::audit::Audit;
use crate::auth::Auth;
use crate::metrics::RouteMetrics;
use crate::routes::{CompiledRoute, RouteTable};
use crate::scim_http::Scim;
use crate::streams::Streams;
use crate::tls::{CertSet, SniResolver};
use crate::upstream::UpstreamSet;

/// One configuration, compiled for the hot path. Requests hold an `Arc` to the one they started
/// with, so a reload never changes the rules under an in-flight request.
pub struct Runtime {
    pub config: Config,
    pub routes: RouteTable,
    /// Port of the first TLS listener, used when redirecting a plain request to https.
    pub https_port: Option<u16>,
    pub scim: Option<Scim>,
    /// The identity header names, parsed once.
    pub headers: IdentityHeaders,
    /// `iss` of the identity assertions: the sign-in origin, or `portcullis` without sign-in.
    pub assertion_issuer: String,
}

pub struct IdentityHeaders {
    pub user: http::HeaderName,
    pub email: http::HeaderName,
    pub groups: http::HeaderName,
}

impl IdentityHeaders {
    fn new(identity: &portcullis_config::IdentityConfig) -> Result<Self, String> {
        let name = |s: &str| {
            http::HeaderName::try_from(s.to_ascii_lowercase())
                .map_err(|e| format!("identity header {s}: {e}"))
        };
        Ok(Self {
            user: name(&identity.header_user)?,
            email: name(&identity.header_email)?,
            groups: name(&identity.header_groups)?,
        })
    }
}

impl Runtime {
    pub fn build(config: Config, directory: &Arc<Directory>) -> Result<Self, String> {
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let upstreams =
                    UpstreamSet::new(route).map_err(|e| format!("route {}: {e}", route.name))?;
                // check-config compiled these already; a failure here is a bug, and the route
                // is refused rather than left open.
                let policy =
                    Policy::compile(route.allow.clone(), route.deny.clone()).map_err(|errors| {
                        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                        format!("route {}: {}", route.name, list.join("; "))
                    })?;
                Ok(Arc::new(CompiledRoute {
                    config: route.clone(),
                    upstreams,
                    metrics: RouteMetrics::new(&route.name),
                    policy,
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let https_port = config
            .listeners
            .iter()
            .find(|l| l.tls.is_some())
            .map(|l| l.address.port());
        let scim = config
            .scim
            .as_ref()
            .map(|scim| Scim::new(scim, directory.clone()));
        Ok(Self {
            routes: RouteTable::new(routes),
            https_port,
            scim,
            headers: IdentityHeaders::new(&config.identity)?,
            assertion_issuer: config.oidc.as_ref().map_or_else(
                || "portcullis".to_owned(),
                |oidc| {
                    let scheme = match oidc.auth_scheme {
                        Scheme::Https => "https",
                        Scheme::Http => "http",
                    };
                    format!("{scheme}://{}", oidc.auth_host)
                },
            ),
            config,
        })
    }

    pub fn scheme_of(tls: bool) -> Scheme {
        if tls {
            Scheme::Https
        } else {
            Scheme::Http
        }
    }
}

/// Process-wide state shared by the proxy, the admin listener and the reloader.
pub struct Shared {
    pub config_path: PathBuf,
    /// The directory outlives configurations: a reload keeps it (changing `data_dir` needs a
    /// restart).
    pub directory: Arc<Directory>,
    /// Sessions, the OIDC provider and issuers' keys: kept across reloads.
    pub auth: Arc<Auth>,
    /// Signs the identity assertions sent upstream.
    pub signer: Arc<Signer>,
    /// The audit log's sender; its writer thread lives as long as the process.
    pub audit: Arc<Audit>,
    pub runtime: ArcSwap<Runtime>,
    /// The SNI resolver of each TLS listener, by address, so reload can swap certificates.
    pub resolvers: HashMap<SocketAddr, Arc<SniResolver>>,
    /// Open websockets and event streams, cut when their caller loses access.
    pub streams: Arc<Streams>,
    draining: AtomicBool,
}

impl Shared {
    pub fn new(
        config_path: PathBuf,
        directory: Arc<Directory>,
        auth: Arc<Auth>,
        signer: Arc<Signer>,
        audit: Arc<Audit>,
        runtime: Runtime,
    ) -> Result<Self, String> {
        let mut resolvers = HashMap::new();
        for listener in &runtime.config.listeners {
            if let Some(tls) = &listener.tls {
                let certs = CertSet::load(tls)?;
                resolvers.insert(listener.address, Arc::new(SniResolver::new(certs)));
            }
        }
        Ok(Self {
            config_path,
            directory,
            auth,
            signer,
            audit,
            runtime: ArcSwap::from_pointee(runtime),
            resolvers,
            streams: Arc::default(),
            draining: AtomicBool::new(false),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// Requests currently being served, across all listeners.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts a request as in flight for as long as it lives, so shutdown can wait for it.
pub struct InFlight(());

impl InFlight {
    pub fn begin() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        Self(())
    }

    pub fn count() -> usize {
        IN_FLIGHT.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}
