//! Downstream TLS: certificates chosen by SNI, swappable on reload without dropping listeners.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use portcullis_config::ListenerTls;

/// The certificates of one listener, indexed by DNS name.
pub struct CertSet {
    default: Option<Arc<CertifiedKey>>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates keyed by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSet {
    /// The listener's certificates, as the configuration loaded them.
    pub fn new(tls: &ListenerTls) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for files in &tls.certificates {
            let key = &files.loaded.0;
            for name in &files.names {
                // The first certificate naming a host wins, as the config lists them.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| key.clone());
            }
        }
        Self {
            // Validation refuses a TLS listener without a certificate; without one, every
            // handshake would fail.
            default: tls.certificates.first().map(|c| c.loaded.0.clone()),
            exact,
            wildcard,
        }
    }

    fn select(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }
}

/// The resolver installed on a TLS listener. Reload swaps its `CertSet`.
#[derive(Debug)]
pub struct SniResolver {
    certs: ArcSwap<CertSet>,
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("names", &self.exact.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SniResolver {
    pub fn new(certs: CertSet) -> Self {
        Self {
            certs: ArcSwap::from_pointee(certs),
        }
    }

    pub fn replace(&self, certs: CertSet) {
        self.certs.store(Arc::new(certs));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.load().select(client_hello.server_name())
    }
}
