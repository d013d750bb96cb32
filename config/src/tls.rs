//! Reading the PEM files a configuration refers to: listener certificates and keys, upstream CAs.

use std::path::Path;

use rustls::crypto::ring::default_provider;
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

/// Which of the two files a problem is about.
pub(crate) enum PairError {
    Cert(String),
    Key(String),
}

/// Loads a certificate chain and its key, checks they match, and returns them with the DNS
/// names in the leaf's subjectAltName, lower-cased.
pub(crate) fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(CertifiedKey, Vec<String>), Vec<PairError>> {
    let chain = read_certificates(cert).map_err(PairError::Cert);
    let private_key = read_private_key(key).map_err(PairError::Key);
    let (chain, private_key) = match (chain, private_key) {
        (Ok(chain), Ok(private_key)) => (chain, private_key),
        (chain, private_key) => {
            return Err([chain.err(), private_key.err()]
                .into_iter()
                .flatten()
                .collect());
        }
    };
    let names = dns_names(&chain[0]).map_err(|e| vec![PairError::Cert(e)])?;
    match CertifiedKey::from_der(chain, private_key, &default_provider()) {
        Ok(certified) => Ok((certified, names)),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(vec![PairError::Key(format!(
                "{} does not match the certificate in {}",
                key.display(),
                cert.display()
            ))])
        }
        Err(e) => Err(vec![PairError::Key(format!(
            "unusable private key in {}: {e}",
            key.display()
        ))]),
    }
}

/// All PEM certificates in a file; at least one.
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("no PEM certificate in {}", path.display()));
    }
    Ok(chain)
}

/// The CA certificates an upstream is verified against: every PEM certificate in the file, each
/// checked to parse as X.509 (as the TLS client will parse it).
pub(crate) fn read_ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = read_certificates(path)?;
    for (i, der) in certificates.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|e| {
            format!(
                "certificate {} in {} is not X.509: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "no PEM private key (PKCS#8, PKCS#1 or SEC1) in {}",
            path.display()
        ),
        e => format!("bad PEM in {}: {e}", path.display()),
    })
}

fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("cannot parse the first certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName in the first certificate: {e}"))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}
