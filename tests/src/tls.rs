//! Test certificates, generated per test with rcgen: one CA and leaf certificates it signs,
//! written as PEM files into a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// The PEM files of one leaf certificate.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The leaf certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// A throw-away certificate authority.
pub struct TestCa {
    dir: TempDir,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir for certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Portcullis test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        let ca_pem = cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        TestCa {
            dir,
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate in PEM, to trust in clients.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a server certificate for `dns_names` and writes `<file_stem>.pem` and
    /// `<file_stem>-key.pem`.
    pub fn leaf(&self, file_stem: &str, dns_names: &[&str]) -> CertFiles {
        let names: Vec<String> = dns_names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        if let Some(first) = dns_names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file_stem}.pem")),
            key: self.dir.path().join(format!("{file_stem}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write leaf cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write leaf key");
        files
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// The DNS names in a DER certificate's subjectAltName.
pub fn san_dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse peer certificate");
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}
