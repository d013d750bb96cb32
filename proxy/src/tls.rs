//! Downstream TLS: certificates chosen by SNI, swappable on reload without dropping listeners.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use portcullis_config::{CertificateFiles, ListenerTls};

/// The certificates of one listener, indexed by DNS name.
pub struct CertSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates keyed by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSet {
    pub fn load(tls: &ListenerTls) -> Result<Self, String> {
        let mut default = None;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for files in &tls.certificates {
            let key = Arc::new(load_certified_key(files)?);
            default.get_or_insert_with(|| key.clone());
            for name in &files.names {
                // The first certificate naming a host wins, as the config lists them.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| key.clone());
            }
        }
        let default = default.ok_or("a TLS listener needs at least one certificate")?;
        Ok(Self {
            default,
            exact,
            wildcard,
        })
    }

    fn select(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return key.clone();
            }
        }
        self.default.clone()
    }
}

fn load_certified_key(files: &CertificateFiles) -> Result<CertifiedKey, String> {
    let cert_pem = std::fs::read(&files.cert)
        .map_err(|e| format!("cannot read {}: {e}", files.cert.display()))?;
    let key_pem = std::fs::read(&files.key)
        .map_err(|e| format!("cannot read {}: {e}", files.key.display()))?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", files.cert.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("bad private key in {}: {e}", files.key.display()))?
        .ok_or_else(|| format!("no private key in {}", files.key.display()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key in {}: {e}", files.key.display()))?;
    Ok(CertifiedKey::new(chain, signing_key))
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
        Some(self.certs.load().select(client_hello.server_name()))
    }
}
