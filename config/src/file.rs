//! Serde structs that mirror the configuration file, key for key.
//!
//! Nothing here checks a value. Anything that can be wrong is kept as written (strings, `i64`,
//! `Option` for required keys) so that `validate` sees the whole file and can report every
//! problem at once, instead of serde stopping at the first. Unknown keys are not rejected here
//! either: `parse` collects them all with `serde_ignored`.

use std::path::PathBuf;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct File {
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub server: Server,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub routes: Vec<Route>,
    pub scim: Option<Scim>,
    pub oidc: Option<Oidc>,
    #[serde(default)]
    pub jwt_issuers: Vec<JwtIssuer>,
    #[serde(default)]
    pub identity: Identity,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Log {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Server {
    pub threads: Option<i64>,
    pub shutdown_timeout: Option<String>,
    pub max_request_header_bytes: Option<i64>,
    pub max_request_body_bytes: Option<i64>,
    pub reload_poll_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Admin {
    pub address: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Listener {
    pub address: Option<String>,
    pub tls: Option<Tls>,
}

/// `cert` + `key`, `certificates`, or both (then `cert` + `key` comes first).
#[derive(Debug, Deserialize)]
pub(crate) struct Tls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub certificates: Option<Vec<CertificatePair>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CertificatePair {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Route {
    pub from: Option<String>,
    pub to: Option<Vec<String>>,
    pub preserve_host: Option<bool>,
    pub websockets: Option<bool>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub max_request_body_bytes: Option<i64>,
    pub tls_verify: Option<bool>,
    pub tls_ca: Option<PathBuf>,
    pub accept: Option<Vec<String>>,
    pub allow: Option<Rules>,
    pub deny: Option<Rules>,
    pub identity_headers: Option<bool>,
    pub assertion: Option<bool>,
    pub token_groups: Option<bool>,
}

/// A route's `allow` or `deny`: one rule as a table (`allow = { groups = ["sre"] }`) or several
/// as an array of tables (`[[routes.allow]]`).
///
/// Deserialized by hand rather than as an untagged enum: an untagged enum buffers the value and
/// deserializes it again out of sight of `serde_ignored`, so unknown keys inside a rule would
/// pass unreported.
#[derive(Debug)]
pub(crate) enum Rules {
    One(Rule),
    Many(Vec<Rule>),
}

impl<'de> Deserialize<'de> for Rules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RulesVisitor;

        impl<'de> Visitor<'de> for RulesVisitor {
            type Value = Rules;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a rule (a table such as { groups = [\"sre\"] }) or an array of rules")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Rules, A::Error> {
                Rule::deserialize(de::value::MapAccessDeserializer::new(map)).map(Rules::One)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Rules, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Rules::Many)
            }
        }

        deserializer.deserialize_any(RulesVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    expecting = "a rule: a table of groups, group_ids, users, email_domains, \
                     any_signed_in, machines, public, methods and paths"
)]
pub(crate) struct Rule {
    pub groups: Option<Vec<String>>,
    pub group_ids: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    pub email_domains: Option<Vec<String>>,
    pub any_signed_in: Option<bool>,
    pub machines: Option<bool>,
    pub public: Option<bool>,
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Scim {
    pub host: Option<String>,
    pub max_request_body_bytes: Option<i64>,
    pub max_bulk_operations: Option<i64>,
    pub max_results: Option<i64>,
    #[serde(default)]
    pub tokens: Vec<ScimToken>,
}

/// `Debug` is written by hand: `secret` may be the clear token, and so may a mistaken
/// `secret_sha256`.
#[derive(Deserialize)]
pub(crate) struct ScimToken {
    pub name: Option<String>,
    pub secret: Option<String>,
    pub secret_sha256: Option<String>,
    pub expires: Option<String>,
}

impl std::fmt::Debug for ScimToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScimToken")
            .field("name", &self.name)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field(
                "secret_sha256",
                &self.secret_sha256.as_ref().map(|_| "<redacted>"),
            )
            .field("expires", &self.expires)
            .finish()
    }
}

/// `Debug` is written by hand: `client_secret` may be the clear secret.
#[derive(Deserialize)]
pub(crate) struct Oidc {
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub auth_host: Option<String>,
    pub auth_scheme: Option<String>,
    pub cookie_domain: Option<String>,
    pub cookie_name: Option<String>,
    pub session_idle_timeout: Option<String>,
    pub session_lifetime: Option<String>,
    pub refresh: Option<bool>,
    pub id_token_algorithms: Option<Vec<String>>,
    pub post_logout_redirect: Option<String>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("scopes", &self.scopes)
            .field("auth_host", &self.auth_host)
            .field("auth_scheme", &self.auth_scheme)
            .field("cookie_domain", &self.cookie_domain)
            .field("cookie_name", &self.cookie_name)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .field("session_lifetime", &self.session_lifetime)
            .field("refresh", &self.refresh)
            .field("id_token_algorithms", &self.id_token_algorithms)
            .field("post_logout_redirect", &self.post_logout_redirect)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Identity {
    pub claim: Option<String>,
    pub scim_attribute: Option<String>,
    pub machine_claim: Option<String>,
    pub machine_scim_attribute: Option<String>,
    pub header_user: Option<String>,
    pub header_email: Option<String>,
    pub header_groups: Option<String>,
    pub allow_sample_rate: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct JwtIssuer {
    pub issuer: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub jwks_uri: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<String>,
}
