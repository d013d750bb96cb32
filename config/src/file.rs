//! Serde structs that mirror the configuration file, key for key, and [`read`], which fills
//! them from the TOML document.
//!
//! Nothing here checks a value. Anything that can be wrong is kept as written (strings, `i64`,
//! `Option` for required keys) so that `validate` sees the whole file and can report every
//! problem at once, instead of serde stopping at the first. What serde itself rejects, a value
//! of the wrong type, does not stop the rest either: [`read`] reports it at its key path and
//! reads the file without it. Unknown keys are not rejected but collected, all of them, with
//! `serde_ignored`.

use std::path::PathBuf;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::problems::{line_of, remove, value_at, KeyPath, Problems};

/// Reads `doc` into a [`File`], adding to `p` every unknown key and every value of the wrong
/// type, each at its key path, in the order they are written.
///
/// serde stops at the first value of the wrong type. So each one is reported, the table entry
/// holding it is removed from the document (the whole array, for an element, so that the
/// indexes of the others still match the file), and the document is read again, until it
/// reads. What is removed is skipped ([`Problems::skip`]): the checks do not report it again
/// as missing. `Err` is an error serde gives no value for, reported for the whole file.
pub(crate) fn read(
    doc: &Spanned<DeTable<'_>>,
    p: &mut Problems<'_>,
) -> Result<File, toml::de::Error> {
    let mut readable = doc.clone();
    let mut found: Vec<(KeyPath, String)> = Vec::new();
    let mut removed = Vec::new();
    let file = loop {
        let mut unknown = Vec::new();
        let deserializer = toml::de::Deserializer::from(readable.clone());
        let error = match serde_ignored::deserialize(deserializer, |path| {
            unknown.push(KeyPath::from_ignored(&path));
        }) {
            Ok(file) => {
                found.extend(
                    unknown
                        .into_iter()
                        .map(|path| (path, "unknown key".to_owned())),
                );
                break file;
            }
            Err(error) => error,
        };
        let Some((path, value)) = error
            .span()
            .and_then(|span| value_at(readable.get_ref(), &span))
        else {
            return Err(error);
        };
        let message = wrong_type(error.message(), value);
        let entry = path.entry();
        if !remove(readable.get_mut(), &entry) {
            return Err(error);
        }
        found.push((path, message));
        removed.push(entry);
    };
    // serde visits keys in the order of toml's map, not of the file.
    found.sort_by_key(|(path, _)| line_of(doc.get_ref(), path));
    for (path, message) in found {
        p.add(&path, message);
    }
    for entry in removed {
        p.skip(entry);
    }
    Ok(file)
}

/// serde's "invalid type: integer `42`, expected a string" as "expected a string, found an
/// integer": types named as in TOML rather than Rust, and without the value, which may be a
/// secret written under the wrong key. Any other message is kept as it is.
fn wrong_type(message: &str, found: &DeValue<'_>) -> String {
    let expected = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.rsplit_once(", expected "));
    let Some((_, expected)) = expected else {
        return message.to_owned();
    };
    let expected = match expected {
        "i64" => "an integer",
        "f64" => "a number",
        "path string" => "a string",
        "a boolean" => "true or false",
        "a sequence" => "an array",
        name if name.starts_with("struct ") => "a table",
        custom => custom,
    };
    let found = match found {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    };
    format!("expected {expected}, found {found}")
}

/// Gives the tables of the file a `Deserialize` that takes a table and nothing else.
///
/// Each is derived with `#[serde(remote = "Self")]`, which puts the derived code in an inherent
/// `deserialize`, for this impl to call. A derived struct would also take an array, reading its
/// elements as the fields in order: `server = [4]` would set `threads`, and `[[oidc]]` would be
/// reported as an `issuer` of the wrong type instead of an array where a table goes.
macro_rules! tables {
    ($($name:ident),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                $name::deserialize(TableOnly(deserializer))
            }
        }
    )*};
}

tables!(
    Log,
    Server,
    Admin,
    Listener,
    Tls,
    CertificatePair,
    Route,
    Rule,
    Scim,
    ScimToken,
    Oidc,
    Identity,
    JwtIssuer,
    Postgres,
    Console,
);

/// A deserializer that hands its visitor a table, and reports anything else as a value of the
/// wrong type, worded by the visitor.
struct TableOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for TableOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(TableVisitor(visitor))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct TableVisitor<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for TableVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(map)
    }
}

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
    pub postgres: Option<Postgres>,
    pub console: Option<Console>,
}

/// `[console]`: who may open the console, in the rule syntax of routes.
#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Console {
    pub allow: Option<Rules>,
    pub deny: Option<Rules>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Postgres {
    pub url: Option<String>,
    pub pool_size: Option<i64>,
    pub max_staleness: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Log {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Server {
    pub threads: Option<i64>,
    pub shutdown_timeout: Option<String>,
    pub max_request_header_bytes: Option<i64>,
    pub max_request_body_bytes: Option<i64>,
    pub reload_poll_interval: Option<String>,
    pub client_idle_timeout: Option<String>,
    pub upstream_dns_refresh: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Admin {
    pub address: Option<String>,
    pub token: Option<String>,
    pub allow_plain_http: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Listener {
    pub address: Option<String>,
    pub tls: Option<Tls>,
    pub allow_plain_http: Option<bool>,
    pub behind_tls_proxy: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
}

/// `cert` + `key`, `certificates`, or both (then `cert` + `key` comes first).
#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Tls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub certificates: Option<Vec<CertificatePair>>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct CertificatePair {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
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
    pub pass_authorization: Option<bool>,
    pub audiences: Option<Vec<String>>,
    pub cors_preflight: Option<bool>,
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
                     any_signed_in, machines, agents, agent_groups, agent_owner_groups, public, \
                     methods and paths"
)]
#[serde(remote = "Self")]
pub(crate) struct Rule {
    pub groups: Option<Vec<String>>,
    pub group_ids: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    pub email_domains: Option<Vec<String>>,
    pub any_signed_in: Option<bool>,
    pub machines: Option<bool>,
    pub agents: Option<bool>,
    pub agent_groups: Option<Vec<String>>,
    pub agent_owner_groups: Option<Vec<String>>,
    pub public: Option<bool>,
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
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
#[serde(remote = "Self")]
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
#[serde(remote = "Self")]
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
    pub max_sessions_per_person: Option<i64>,
    pub refresh: Option<bool>,
    pub userinfo: Option<String>,
    pub id_token_algorithms: Option<Vec<String>>,
    pub post_logout_redirect: Option<String>,
    pub tls_ca: Option<PathBuf>,
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
            .field("max_sessions_per_person", &self.max_sessions_per_person)
            .field("refresh", &self.refresh)
            .field("userinfo", &self.userinfo)
            .field("id_token_algorithms", &self.id_token_algorithms)
            .field("post_logout_redirect", &self.post_logout_redirect)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct Identity {
    pub preset: Option<String>,
    pub claim: Option<String>,
    pub bearer_claim: Option<String>,
    pub scim_attribute: Option<String>,
    pub machine_claim: Option<String>,
    pub machine_scim_attribute: Option<String>,
    pub agent_claim: Option<String>,
    pub agent_scim_attribute: Option<String>,
    pub header_user: Option<String>,
    pub header_email: Option<String>,
    pub header_groups: Option<String>,
    pub allow_sample_rate: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self")]
pub(crate) struct JwtIssuer {
    pub issuer: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub person_clients: Option<Vec<String>>,
    pub jwks_uri: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<String>,
    pub jwks_refresh: Option<String>,
    pub iat_backdate: Option<String>,
    pub tls_ca: Option<PathBuf>,
}
