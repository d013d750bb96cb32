//! Portcullis configuration: the TOML file format and its validation.
//!
//! This crate owns two layers. `file` holds serde structs that mirror the file key for key;
//! [`model`] holds the validated [`Config`] the rest of Portcullis uses. `validate` converts one
//! into the other and is the only place that checks values. Every problem is reported at once,
//! each with its key path and line ([`ConfigErrors`]), so one `check-config` run lists them all:
//! an unknown key or a value of the wrong type, found while `file::read` fills the serde
//! structs, does not keep the rest of the file from being read and checked.
//! A route's `allow` and `deny` rules are checked by compiling them with
//! `portcullis_policy::Policy::compile`, the very compile the proxy runs, so a file that passes
//! here never fails there.
//!
//! It deliberately does no I/O beyond reading the configuration file, the certificate, key and
//! CA files it refers to, and secret files (`file:`), plus resolving upstream host names. It
//! binds no port and creates nothing, not even `data_dir`.
//!
//! Read `src/tests.rs` first: `bad_configs` is a table of broken snippets and the problem each
//! one produces, and `full_example` shows a whole file and the model it becomes.

mod file;
pub mod model;
mod problems;
mod tls;
mod validate;

#[cfg(test)]
mod tests;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use toml::de::DeTable;

pub use model::*;
use problems::{line_at, Problems};
pub use problems::{ConfigErrors, Problem};
pub use validate::{check_fetch_url, is_entra_issuer};

/// Reads and validates the configuration file at `path`.
///
/// Relative paths in the file are resolved against the directory holding it; `env:` secrets
/// come from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_resolving(path, &resolve_now)
}

/// How an upstream's host name and port become the address it is first connected to: by
/// [`resolve_now`], or by a running proxy that keeps the address in use for a name that does
/// not resolve just then.
pub type Resolve<'a> = &'a dyn Fn(&str, u16) -> Result<SocketAddr, String>;

/// The first address `host` resolves to now, with `port`.
pub fn resolve_now(host: &str, port: u16) -> Result<SocketAddr, String> {
    resolve_all(host, port)?
        .first()
        .copied()
        .ok_or_else(|| format!("`{host}` resolves to no address"))
}

/// Every address `host` resolves to now, with `port`, in the resolver's order.
pub fn resolve_all(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .collect();
    if found.is_empty() {
        return Err(format!("`{host}` resolves to no address"));
    }
    Ok(found)
}

/// [`load`], with upstream names resolved by `resolve`.
pub fn load_resolving(path: &Path, resolve: Resolve<'_>) -> Result<Config, ConfigErrors> {
    let bytes = std::fs::read(path).map_err(|e| unreadable(path, e))?;
    load_read(path, &bytes, resolve)
}

/// [`load_resolving`] of the file at `path` as `bytes` read from it: what the caller read (and
/// compared, as a file poll does) is what is loaded, not the file as a later read finds it.
pub fn load_read(path: &Path, bytes: &[u8], resolve: Resolve<'_>) -> Result<Config, ConfigErrors> {
    let path = std::path::absolute(path).map_err(|e| unreadable(path, e))?;
    let text = std::str::from_utf8(bytes).map_err(|e| unreadable(&path, e))?;
    let base_dir = path.parent().unwrap_or(Path::new("/"));
    parse_resolving(text, base_dir, &|name| std::env::var(name).ok(), resolve)
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> ConfigErrors {
    ConfigErrors::whole_file(None, format!("cannot read {}: {e}", path.display()))
}

/// Validates configuration `text` as if read from a file in `base_dir`, taking `env:` secrets
/// from `env`.
pub fn parse(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    parse_resolving(text, base_dir, env, &resolve_now)
}

/// [`parse`], with upstream names resolved by `resolve`.
pub fn parse_resolving(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    resolve: Resolve<'_>,
) -> Result<Config, ConfigErrors> {
    let toml_error = |e: toml::de::Error| {
        let line = e.span().map(|span| line_at(text, span.start));
        ConfigErrors::whole_file(line, e.message().to_owned())
    };
    let doc = DeTable::parse(text).map_err(toml_error)?;
    let mut problems = Problems::new(text, doc.get_ref());
    let file = file::read(&doc, &mut problems).map_err(toml_error)?;
    let reach = validate::Reach { base_dir, resolve };
    match validate::convert(file, &reach, env, &mut problems) {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems.into_errors()),
    }
}

/// Resolves a secret-typed value: `env:NAME` reads the environment variable `NAME`, `file:PATH`
/// reads the file (relative to `base_dir`) without one trailing newline, and anything else is
/// the secret itself.
///
/// Error messages name the variable or file, never the value.
pub fn resolve_secret(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
    base_dir: &Path,
) -> Result<Secret, String> {
    if let Some(name) = raw.strip_prefix("env:") {
        if name.is_empty() {
            return Err("`env:` needs a variable name".to_owned());
        }
        return env(name).map(Secret::new).ok_or_else(|| {
            format!("environment variable {name} is not set, or is not UTF-8 text")
        });
    }
    if let Some(file) = raw.strip_prefix("file:") {
        if file.is_empty() {
            return Err("`file:` needs a path".to_owned());
        }
        let path = base_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        let value = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        return Ok(Secret::new(value.to_owned()));
    }
    Ok(Secret::new(raw.to_owned()))
}
