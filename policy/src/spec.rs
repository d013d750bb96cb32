//! The rule as the configuration hands it over ([`RuleSpec`]), the problems compiling it can find
//! ([`PolicyError`]), and the checks shared by compile time and evaluation time (HTTP tokens,
//! normalized paths, email domains).

use crate::path::PathError;

/// One allow or deny rule, as built by the configuration crate. Plain data: every check happens in
/// [`Policy::compile`](crate::Policy::compile), which reports every problem at once.
///
/// A rule matches a request when its conditions (`methods`, `paths`) match **and** at least one of
/// its who-criteria (`groups`, `group_ids`, `users`, `email_domains`, `any_signed_in`,
/// `machines`, `agents`, `agent_groups`, `agent_owner_groups`, `public`) matches the caller.
/// An allow rule lets an agent in only by the `agent*` criteria (or `public`); a deny rule
/// refuses it by those and by its own name and groups (`users`, `groups`, `group_ids`) and
/// `any_signed_in`. People and machines are never matched by the `agent*` criteria.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// Shown in decisions and audit records, e.g. `routes[2].allow[0]`: the key path of the rule
    /// in the configuration file is a good choice.
    pub name: String,
    /// Group `displayName`s, compared case-insensitively.
    pub groups: Vec<String>,
    /// Group `externalId`s (the IdP's own id), compared exactly.
    pub group_ids: Vec<String>,
    /// User `userName`s, compared case-insensitively.
    pub users: Vec<String>,
    /// Domains compared with the part after the only `@` of the subject's email:
    /// `corp.example` matches exactly that domain (any letter case); `*.corp.example` matches
    /// any subdomain of it (`x.corp.example`, `a.b.corp.example`) but not `corp.example` itself.
    pub email_domains: Vec<String>,
    /// Any active subject, person or machine.
    pub any_signed_in: bool,
    /// Any active machine ([`SubjectKind::Machine`](crate::SubjectKind::Machine)): a service
    /// account presenting a bearer token, whatever its name or groups.
    pub machines: bool,
    /// Any active agent ([`SubjectKind::Agent`](crate::SubjectKind::Agent)): one whose owner
    /// chain holds.
    pub agents: bool,
    /// Agents in these groups (`displayName`, case-insensitively), directly or not.
    pub agent_groups: Vec<String>,
    /// Agents whose owners are in these groups (`displayName`, case-insensitively).
    pub agent_owner_groups: Vec<String>,
    /// Everyone, including callers who are not signed in and deactivated accounts.
    /// Only allowed in allow rules.
    pub public: bool,
    /// HTTP methods, case-insensitive. `None` matches every method.
    pub methods: Option<Vec<String>>,
    /// Path prefixes matched at segment boundaries, like route prefixes: `/admin` matches
    /// `/admin` and `/admin/x` but not `/adminx`; `/admin/` matches `/admin/x` but not `/admin`.
    /// Case-sensitive. `None` matches every path.
    pub paths: Option<Vec<String>>,
}

impl RuleSpec {
    /// A rule named `name` that matches nobody yet: set at least one who-criterion.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// One problem found in one rule. `Display` reads `routes[0].allow[1].groups[2]: is empty`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}{field}: {problem}")]
pub struct PolicyError {
    /// The rule's name, or `allow[i]` / `deny[i]` when the name itself is missing.
    pub rule: String,
    /// Where in the rule, e.g. `.groups[2]`; empty when the problem is the rule as a whole.
    pub field: String,
    pub problem: Problem,
}

/// Why a `*` in a path prefix (a route's or a rule's) is refused: `/admin/*` is a path whose
/// last segment is `*`, so a deny or a narrower route written so would apply to nobody.
pub const PREFIXES_NOT_PATTERNS: &str = "paths are prefixes, not patterns: `/admin/` covers \
     every path under /admin, and a `*` matches only a `*`";

/// Whether a path prefix as written holds a `*`, as it is or escaped (which normalizes to it).
pub fn holds_star(path: &str) -> bool {
    path.contains('*') || path.contains("%2A") || path.contains("%2a")
}

/// What is wrong, in words the author of the configuration can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the rule has no name")]
    NoName,
    #[error(
        "the rule names nobody: give at least one of groups, group_ids, users, email_domains, \
         any_signed_in, machines, agents, agent_groups, agent_owner_groups or public"
    )]
    NoWho,
    #[error("`public` is only allowed in allow rules")]
    PublicInDeny,
    #[error("is empty")]
    Empty,
    #[error(
        "{value:?} has spaces around it, and names nobody as written: a name is compared \
         whole (write {trimmed:?})"
    )]
    Padded { value: String, trimmed: String },
    #[error(
        "{value:?} names nobody: rules name an agent by its own name, as SCIM has it (write \
         {bare:?}); `agent:` is how the upstream and the audit log are told it is one"
    )]
    AgentPrefixed { value: String, bare: String },
    #[error("is an empty list, which would match nothing; leave it out to match everything")]
    EmptyList,
    #[error("{value:?} is not a valid email domain: {why}")]
    BadDomain { value: String, why: &'static str },
    #[error("{value:?} is not a valid HTTP method")]
    BadMethod { value: String },
    #[error("{value:?} is a pattern, and rules compare what they name whole: {instead}")]
    Pattern {
        value: String,
        instead: &'static str,
    },
    #[error(
        "lets HEAD in but not GET: upstream frameworks (Express, Flask, Spring, Go) answer HEAD \
         with the GET handler, whose side effects happen and whose headers tell; add \"GET\", or \
         leave \"HEAD\" out"
    )]
    HeadWithoutGet,
    #[error("{value:?} is not a valid path prefix: {why}")]
    BadPath { value: String, why: &'static str },
    #[error("{value:?} is not a valid path prefix: {error}")]
    Unreadable { value: String, error: PathError },
    #[error(
        "{value:?} is not spelled as Portcullis compares paths: write {normal:?} (letters, \
         digits and -._~!$&'()*,=:@ as they are, a raw ; or + as it is, every other byte as an \
         upper-case %XX)"
    )]
    NotNormal { value: String, normal: String },
}

/// `tchar` of RFC 9110 §5.6.2: what an HTTP method may be made of.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Why `path` is not a normalized absolute path, if it is not. The proxy normalizes every path
/// once before routing; a path that still has `//`, a `.` or `..` segment, a `?`, a `#` or a
/// control character did not go through that function, and prefix matching on it could be
/// bypassed, so both rule prefixes and request paths must pass this check.
pub(crate) fn path_problem(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Some("it does not start with /");
    }
    // One pass over the bytes, judging each segment at the `/` (or end) that closes it. The
    // segment after a final `/` is empty, which is fine.
    let mut segment_start = 1;
    for i in 1..=bytes.len() {
        let byte = bytes.get(i).copied();
        match byte {
            Some(b'/') | None => {
                match bytes.get(segment_start..i) {
                    Some(b"." | b"..") => return Some("it holds a . or .. segment"),
                    Some(b"") if byte.is_some() => {
                        return Some("it holds an empty segment (//)");
                    }
                    _ => {}
                }
                segment_start = i + 1;
            }
            Some(b'?' | b'#') => return Some("it holds ? or #"),
            Some(b) if b.is_ascii_control() => return Some("it holds a control character"),
            Some(_) => {}
        }
    }
    None
}

/// Why `path`, a prefix from the configuration, is not in the one spelling requests are
/// compared in ([`crate::path::normalize`]), if it is not: a rule on `/caf%c3%a9` would
/// otherwise never match `/café`, which arrives as `/caf%C3%A9`.
pub fn spelling_problem(path: &str) -> Option<Problem> {
    match crate::path::normalize(path) {
        Ok(normal) if normal == path => None,
        Ok(normal) => Some(Problem::NotNormal {
            value: path.to_owned(),
            normal: normal.into_owned(),
        }),
        Err(error) => Some(Problem::Unreadable {
            value: path.to_owned(),
            error,
        }),
    }
}

/// Checks an `email_domains` entry and returns `(domain, is_wildcard)`, the domain lower-cased and
/// without its `*.`.
pub(crate) fn parse_domain(value: &str) -> Result<(String, bool), &'static str> {
    if value.contains('@') {
        return Err("give the domain alone, without @");
    }
    let (domain, wildcard) = match value.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (value, false),
    };
    if domain.contains('*') {
        return Err("* is only allowed as the whole first label, as in *.corp.example");
    }
    if !domain.is_ascii() {
        return Err("write internationalized domains in their ASCII (xn--) form");
    }
    if domain.is_empty() {
        return Err("the domain is missing");
    }
    if domain.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (a leading, trailing or double dot)");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("labels may only hold letters, digits and -");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with -");
        }
    }
    Ok((domain.to_ascii_lowercase(), wildcard))
}

/// The part after the address's only `@`, if it has exactly one and something on both sides.
pub(crate) fn email_domain(email: &str) -> Option<&str> {
    let (local, domain) = email.split_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return None;
    }
    Some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_must_be_tokens() {
        for ok in ["GET", "delete", "M-SEARCH", "X_CUSTOM", "PROPFIND"] {
            assert!(is_token(ok), "{ok}");
        }
        for bad in ["", "GET ", "GE T", "GET\n", "(GET)", "GÉT", "GET/1"] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn paths_must_be_normalized_and_absolute() {
        for ok in [
            "/",
            "/admin",
            "/admin/",
            "/a/b/c",
            "/.well-known/x",
            "/a..b",
            "/%2F",
        ] {
            assert_eq!(path_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "admin",
            "*",
            "//admin",
            "/a//b",
            "/./admin",
            "/a/../admin",
            "/admin/.",
            "/admin/..",
            "/admin?x",
            "/admin#x",
            "/ad\0min",
            "/admin\n",
        ] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn domains_are_lowercased_and_wildcards_only_lead() {
        assert_eq!(
            parse_domain("Corp.Example"),
            Ok(("corp.example".into(), false))
        );
        assert_eq!(
            parse_domain("*.corp.example"),
            Ok(("corp.example".into(), true))
        );
        assert_eq!(parse_domain("localhost"), Ok(("localhost".into(), false)));
        assert_eq!(
            parse_domain("xn--bcher-kva.example"),
            Ok(("xn--bcher-kva.example".into(), false))
        );
        for bad in [
            "",
            "*",
            "*.",
            "*corp.example",
            "x.*.corp.example",
            "corp.*",
            "*.*.corp.example",
            "**.corp.example",
            "@corp.example",
            "a@corp.example",
            "corp..example",
            ".corp.example",
            "corp.example.",
            "-corp.example",
            "corp-.example",
            "corp_x.example",
            "bücher.example",
            "corp example",
            "corp.example/",
        ] {
            assert!(parse_domain(bad).is_err(), "{bad:?}");
        }
        assert!(parse_domain(&format!("{}.example", "a".repeat(64))).is_err());
        assert!(parse_domain(&["abcdefghi"; 26].join(".")).is_err());
    }

    #[test]
    fn email_domain_is_after_the_only_at() {
        assert_eq!(email_domain("alice@corp.example"), Some("corp.example"));
        assert_eq!(email_domain("ALICE@CORP.EXAMPLE"), Some("CORP.EXAMPLE"));
        assert_eq!(email_domain("a@b@corp.example"), None);
        assert_eq!(email_domain("corp.example"), None);
        assert_eq!(email_domain("@corp.example"), None);
        assert_eq!(email_domain("alice@"), None);
        assert_eq!(email_domain(""), None);
    }
}
