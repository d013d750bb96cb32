//! The one function that turns a request path into the path Portcullis routes, authorizes and
//! sends upstream ([`normalize`]), and the one that reads the request target it comes from
//! ([`target`]).
//!
//! Routing and policy must see exactly what the upstream will see, so the path is normalized once
//! and the normalized form is forwarded. Two spellings an upstream decodes alike (`/a:b` and
//! `/a%3Ab`, `/café` and `/caf%C3%A9`) normalize alike, so a rule on one holds for the other.
//! Anything whose meaning depends on how the upstream would decode it (an encoded `/` or `\`, a
//! NUL, a malformed escape) is refused rather than guessed.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    #[error("the path holds a malformed percent-escape")]
    BadEscape,
    #[error(
        "the path holds an encoded '/', '\\' or control character, a raw '\\' or control \
         character, a dot segment with ';' parameters or a segment ASP.NET cuts out as a \
         cookieless session's ('(S(x))'), whose meaning is ambiguous"
    )]
    Ambiguous,
    #[error("the request target is neither a path nor an http(s) URL of a host")]
    BadTarget,
}

/// A request target, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The host of an absolute-form target (`http://host[:port]/…`), lower-cased by nobody yet,
    /// without the port; `None` for an origin-form target (`/…`).
    pub host: Option<&'a str>,
    /// The path, as sent (not normalized).
    pub path: &'a str,
    /// What follows the `?`, if anything.
    pub query: Option<&'a str>,
}

/// Reads a request target as an upstream would have to: origin-form (`/path?query`) or
/// absolute-form (`http://host/path?query`, `https://…`) only. Anything else (`*`, an
/// authority, `foo:/admin`, a fragment, userinfo) is refused: upstreams read such targets in
/// different ways (Go's `net/http` serves `foo:/admin` as `/admin`), so none is passed on.
/// (pingora cuts a request line's fragment off before Portcullis reads it; one in a WebDAV
/// `Destination` is refused here.)
pub fn target(raw: &[u8]) -> Result<Target<'_>, PathError> {
    let raw = std::str::from_utf8(raw).map_err(|_| PathError::BadTarget)?;
    if raw.contains('#') {
        return Err(PathError::BadTarget);
    }
    let (host, rest) = if raw.starts_with('/') {
        (None, raw)
    } else {
        let (authority, rest) = absolute(raw).ok_or(PathError::BadTarget)?;
        if authority.is_empty() || authority.contains('@') {
            return Err(PathError::BadTarget);
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => &authority[..v6.find(']').ok_or(PathError::BadTarget)? + 2],
            None => authority.split(':').next().unwrap_or(authority),
        };
        (Some(host), rest)
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    // `http://host` and `http://host?q` ask for the root.
    let path = if path.is_empty() { "/" } else { path };
    Ok(Target { host, path, query })
}

/// The authority of an absolute-form target (`http://host[:port]`, the scheme `http` or
/// `https` in any case) and what follows it; `None` for any other form.
pub fn absolute(raw: &str) -> Option<(&str, &str)> {
    let (scheme, after) = raw.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    Some(after.split_at(after.find(['/', '?']).unwrap_or(after.len())))
}

/// Normalizes `path` (the part of the request target before any `?`).
///
/// - each byte has one spelling: the characters a path may hold as they are (RFC 3986's
///   `pchar` but `;` and `+`: letters, digits, `-._~!$&'()*,=:@`) are decoded (`%61` → `a`,
///   `%3A` → `:`), every other byte is an upper-case escape (`%c3` → `%C3`, `é` → `%C3%A9`,
///   `|` → `%7C`). A raw `;` or `+` stays raw and its escape stays an escape, since upstreams
///   read them differently: `;` begins parameters to some, `+` is a space to form-style
///   decoders;
/// - empty segments collapse (`//a` → `/a`), `.` segments vanish, `..` removes the segment
///   before it and never climbs above the root; `%2e` counts as `.`;
/// - a trailing `/` is kept;
/// - `;` parameters are kept (`/a;jsessionid=1/b`), but a dot segment with parameters
///   (`..;x`, `.;`), which some servers resolve as a dot segment and others read as a name, is
///   refused;
/// - a segment that ASP.NET on the .NET Framework cuts out of every path as a cookieless
///   session's before it routes (`(S(x))`, `(A(x)F(y))`: a letter and a value in parentheses,
///   in parentheses) is refused: `/(S(x))/admin` is `/admin` to it and another path to
///   everyone else.
///
/// Letter case is preserved: `/Admin` and `/admin` are different paths to an allow rule. (Deny
/// rules and route selection read them alike: `portcullis_policy::loosely_within`.)
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }

    let decoded = one_spelling(bytes)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        // `..;x` is `..` to Tomcat, Jetty and Spring, and a plain name to everyone else:
        // refused rather than guessed. So is `..%3Bx`, which an nginx in front of them passes
        // on as `..;x`.
        let parameters = [segment.find(';'), segment.find("%3B")]
            .into_iter()
            .flatten()
            .min();
        if parameters.is_some_and(|at| matches!(&segment[..at], ".." | ".")) {
            return Err(PathError::Ambiguous);
        }
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    refusing_cookieless(Cow::Owned(out))
}

/// `path`, normalized, unless a segment of it is one ASP.NET takes for a cookieless session's
/// (see [`normalize`]). ASP.NET looks only at segments of the shape `(X(`…`)`, which nothing
/// else names a path by: any such segment is refused, whatever follows the letter.
fn refusing_cookieless(path: Cow<'_, str>) -> Result<Cow<'_, str>, PathError> {
    if path.contains("/(") && path.split('/').any(|s| is_cookieless(s.as_bytes())) {
        return Err(PathError::Ambiguous);
    }
    Ok(path)
}

/// Whether `segment` is one ASP.NET takes for a cookieless session's (see [`normalize`]).
fn is_cookieless(segment: &[u8]) -> bool {
    segment.len() >= 4
        && segment[0] == b'('
        && segment[1].is_ascii_alphabetic()
        && segment[2] == b'('
        && segment[segment.len() - 1] == b')'
}

/// Whether byte `b` is spelled as it is in a normalized path, however it came: the unreserved
/// characters, the sub-delimiters but `;` and `+`, `:` and `@`.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// Whether byte `b`, raw, stays raw, though its escape stays an escape too: `/` (the
/// structure), `;` and `+` (see [`normalize`]).
fn stays_raw(b: u8) -> bool {
    matches!(b, b'/' | b';' | b'+')
}

/// Whether `b` is the byte of an escape in its one spelling (`%3B`, `%C3`): neither plain nor
/// one that is refused.
fn stays_escaped(b: u8) -> bool {
    !is_plain(b) && b != b'/' && !is_refused(b)
}

/// Whether byte `b`, raw or escaped, is refused in a path: `\` (a separator to some servers)
/// and control characters. Python's (Starlette's, older Werkzeug's and Django's) and Java's
/// patterns match `$` before a final newline, so to them `/admin%0A` is `/admin`: no path
/// under a route's `/admin`, nor one a deny rule on `/admin` names.
fn is_refused(b: u8) -> bool {
    matches!(b, b'\\' | 0..=0x1F | 0x7F)
}

/// True when `normalize` would return the path unchanged: every byte in its one spelling, no
/// empty or dot segments. This is the common case and costs one pass with no allocation.
fn is_normal(bytes: &[u8]) -> bool {
    let mut previous = b'/';
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'/' if previous == b'/' && i > 0 => return false,
            b'.' if previous == b'/' => {
                let rest = &bytes[i + 1..];
                if rest.is_empty()
                    || rest[0] == b'/'
                    || rest[0] == b';'
                    || rest.starts_with(b"./")
                    || rest.starts_with(b".;")
                    || rest.starts_with(b"%3B")
                    || rest.starts_with(b".%3B")
                    || rest == b"."
                {
                    return false;
                }
            }
            b'%' => {
                let upper_hex = |at: usize| {
                    bytes
                        .get(at)
                        .copied()
                        .filter(|d| matches!(d, b'0'..=b'9' | b'A'..=b'F'))
                        .and_then(hex)
                };
                match (upper_hex(i + 1), upper_hex(i + 2)) {
                    (Some(h), Some(l)) if stays_escaped(h << 4 | l) => {
                        previous = b'%';
                        i += 3;
                        continue;
                    }
                    _ => return false,
                }
            }
            // Not left as it is (refused): looked at only where a segment begins with `(`.
            b'(' if previous == b'/' => {
                let end = bytes[i..].iter().position(|&b| b == b'/');
                if is_cookieless(&bytes[i..end.map_or(bytes.len(), |end| i + end)]) {
                    return false;
                }
            }
            b if stays_raw(b) || is_plain(b) => {}
            _ => return false,
        }
        previous = b;
        i += 1;
    }
    true
}

/// `bytes` with each byte in its one spelling (see [`normalize`]); an encoded `/`, a byte
/// [`is_refused`], raw or encoded, or a malformed escape is an error.
fn one_spelling(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let (byte, escaped) = if bytes[i] == b'%' {
            let digit = |at: usize| bytes.get(at).copied().and_then(hex);
            let (Some(h), Some(l)) = (digit(i + 1), digit(i + 2)) else {
                return Err(PathError::BadEscape);
            };
            i += 3;
            (h << 4 | l, true)
        } else {
            i += 1;
            (bytes[i - 1], false)
        };
        match byte {
            b if is_refused(b) => return Err(PathError::Ambiguous),
            b'/' if escaped => return Err(PathError::Ambiguous),
            b if !escaped && stays_raw(b) => out.push(char::from(b)),
            b if is_plain(b) => out.push(char::from(b)),
            b => {
                out.push('%');
                out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
                out.push(char::from(HEX_UPPER[usize::from(b & 0xF)]));
            }
        }
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Whether `query` has a parameter a framework takes as the method of a POST, read as any
/// could read it: `_method` (Laravel, Symfony), read as PHP reads a name, and leniently:
/// decoded (`%5F`, and `+` as a space), cut at a NUL, leading spaces dropped, ` ` and `.` as
/// `_`, `_method[…]` as `_method`, in any case; and `X-HTTP-Method-Override` (ASP.NET MVC,
/// which reads it from the query too), decoded as ASP.NET decodes (`%u002D` too), in any case.
pub fn overrides_method(query: &str) -> bool {
    query.split(['&', ';']).any(|parameter| {
        let name = parameter.split('=').next().unwrap_or_default();
        let (bytes, mut read) = (name.as_bytes(), Vec::with_capacity(name.len()));
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'%')
                .then(|| Some(hex(*bytes.get(i + 1)?)? << 4 | hex(*bytes.get(i + 2)?)?))
                .flatten();
            // ASP.NET's `%uXXXX`: a character other than ASCII is none of a name's.
            let wide = (bytes[i] == b'%'
                && bytes.get(i + 1).is_some_and(|&u| u == b'u' || u == b'U'))
            .then(|| {
                let digits = bytes.get(i + 2..i + 6)?;
                digits
                    .iter()
                    .try_fold(0u32, |n, &d| Some(n << 4 | u32::from(hex(d)?)))
            })
            .flatten()
            .map(|code| u8::try_from(code).ok().filter(u8::is_ascii).unwrap_or(0xFF));
            let b = match (escaped, wide) {
                (Some(b), _) => {
                    i += 3;
                    b
                }
                (None, Some(b)) => {
                    i += 6;
                    b
                }
                (None, None) => {
                    i += 1;
                    bytes[i - 1]
                }
            };
            // A raw `+` is a space; an escaped one (`%2B`) is a `+`.
            read.push(if b == b'+' && escaped.is_none() && wide.is_none() {
                b' '
            } else {
                b
            });
        }
        if read.eq_ignore_ascii_case(b"x-http-method-override") {
            return true;
        }
        let name = read.split(|&b| b == 0).next().unwrap_or_default();
        let start = name.iter().position(|&b| b != b' ').unwrap_or(name.len());
        let name = &name[start..];
        let name = name.split(|&b| b == b'[').next().unwrap_or_default();
        name.len() == b"_method".len()
            && name.iter().zip(b"_method").all(|(&got, &want)| {
                let got = if got == b' ' || got == b'.' {
                    b'_'
                } else {
                    got
                };
                got.eq_ignore_ascii_case(&want)
            })
    })
}

pub(crate) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_method_override_is_found_however_it_is_spelled() {
        for query in [
            "_method=DELETE",
            "a=1&_METHOD=delete",
            "%5Fmethod=DELETE",
            "%5fmethod",
            ".method=DELETE",
            "_method[]=DELETE",
            "x;_method=PUT",
            // PHP drops leading spaces and stops at a NUL.
            "+_method=DELETE",
            "%20%20_method=DELETE",
            "_method%00x=DELETE",
            // ASP.NET MVC reads `X-HTTP-Method-Override` from the query too.
            "X-HTTP-Method-Override=DELETE",
            "a=1&x-http-method-override=put",
            "X%2DHTTP-Method-Override=DELETE",
            "X%u002DHTTP-Method-Override=DELETE",
            "x-http-method-override",
        ] {
            assert!(super::overrides_method(query), "{query}");
        }
        for query in [
            "",
            "method=DELETE",
            "a=_method",
            "__method=x",
            "_methods=x",
            "%5",
            // A leading space is dropped, not read as `_`; an escaped `+` is no space.
            "+method=DELETE",
            "%2B_method=DELETE",
            "X-HTTP-Method=DELETE",
            "X-HTTP-Method-Overrides=DELETE",
            "a=X-HTTP-Method-Override",
            "X%u00E9HTTP-Method-Override=DELETE",
            "%u",
        ] {
            assert!(!super::overrides_method(query), "{query}");
        }
    }

    use super::*;

    #[test]
    fn normalizes_the_bypass_table() {
        let table = [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/./admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/x/%2e%2e/admin", "/admin"),
            ("/x/%2E./admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/..", "/"),
            ("/a//b///c", "/a/b/c"),
            ("/ADMIN", "/ADMIN"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/café", "/caf%C3%A9"),
            ("/wiki/Special%3AExport", "/wiki/Special:Export"),
            ("/wiki/Special:Export", "/wiki/Special:Export"),
            ("/%40admin", "/@admin"),
            ("/%21%24%26%27%28%29%2A%2C%3D", "/!$&'()*,="),
            ("/a+b%2bc", "/a+b%2Bc"),
            ("/a%3Bb;c", "/a%3Bb;c"),
            ("/a%3fb%23c%25d", "/a%3Fb%23c%25d"),
            ("/a|b", "/a%7Cb"),
            ("/a%7cb", "/a%7Cb"),
            ("/{x}^`\"<>[]", "/%7Bx%7D%5E%60%22%3C%3E%5B%5D"),
            ("/a%20b", "/a%20b"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/.b", "/a/.b"),
            ("/a/..b", "/a/..b"),
            ("/%7euser", "/~user"),
            ("/a;jsessionid=1/b", "/a;jsessionid=1/b"),
            ("/a/..b;x", "/a/..b;x"),
        ];
        for (input, want) in table {
            assert_eq!(normalize(input).as_deref(), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn refuses_ambiguous_paths() {
        let table = [
            ("/admin%2f", PathError::Ambiguous),
            ("/admin%2F..", PathError::Ambiguous),
            ("/a%5cb", PathError::Ambiguous),
            ("/a\\b", PathError::Ambiguous),
            ("/a%00", PathError::Ambiguous),
            ("/admin%0A", PathError::Ambiguous),
            ("/admin%0a", PathError::Ambiguous),
            ("/admin%0D%0A/x", PathError::Ambiguous),
            ("/a%09b", PathError::Ambiguous),
            ("/a%7F", PathError::Ambiguous),
            ("/a\nb", PathError::Ambiguous),
            ("/public/..;/admin", PathError::Ambiguous),
            ("/public/..;x=1/admin", PathError::Ambiguous),
            ("/a/.;/b", PathError::Ambiguous),
            ("/a/%2e%2e;/b", PathError::Ambiguous),
            ("/static/..%3B/admin", PathError::Ambiguous),
            ("/x/%2e%2e%3bp/admin", PathError::Ambiguous),
            ("/a/.%3B/b", PathError::Ambiguous),
            ("/a/..%3B", PathError::Ambiguous),
            ("/(S(x))/admin", PathError::Ambiguous),
            ("/(A(x)F(y))/Admin/users", PathError::Ambiguous),
            ("/%28S%28x%29%29/admin", PathError::Ambiguous),
            ("/app/(S(abc))/", PathError::Ambiguous),
            ("/app/(S(abc))", PathError::Ambiguous),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("admin", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
        ];
        for (input, want) in table {
            assert_eq!(normalize(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn request_targets_are_paths_or_urls_of_a_host() {
        fn t(raw: &str) -> Result<Target<'_>, PathError> {
            target(raw.as_bytes())
        }
        let origin = |path, query| Target {
            host: None,
            path,
            query,
        };
        assert_eq!(t("/a/b?x=1&y"), Ok(origin("/a/b", Some("x=1&y"))));
        assert_eq!(t("/"), Ok(origin("/", None)));
        assert_eq!(
            t("http://App.Test:8080/admin?x"),
            Ok(Target {
                host: Some("App.Test"),
                path: "/admin",
                query: Some("x"),
            })
        );
        assert_eq!(
            t("HTTPS://[::1]:8443"),
            Ok(Target {
                host: Some("[::1]"),
                path: "/",
                query: None,
            })
        );
        for bad in [
            "foo:/admin",
            "*",
            "app.test:443",
            "ftp://app.test/",
            "http://user@app.test/",
            "http:///admin",
            "/a#frag",
            "admin",
            "",
        ] {
            assert_eq!(t(bad), Err(PathError::BadTarget), "{bad:?}");
        }
        assert_eq!(target(b"/caf\xff"), Err(PathError::BadTarget));
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(normalize("/api/v1/items"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a/.b/c"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a:b@c;d=1/e"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn the_fast_path_takes_exactly_the_paths_normalize_leaves_as_they_are() {
        let pieces = [
            "/", "a", ".", "..", ";", "+", "%2B", "%2b", "%3B", "%41", "%20", "%e9", "%E9", "é",
            "%2F", "%2E", "\\", "%", "%4", "~", "|", "(S(x))", "(",
        ];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            paths = paths
                .iter()
                .flat_map(|p| pieces.iter().map(move |piece| format!("{p}{piece}")))
                .collect();
            for path in &paths {
                let path = format!("/{path}");
                let unchanged = normalize(&path).is_ok_and(|n| n == path);
                assert_eq!(is_normal(path.as_bytes()), unchanged, "{path:?}");
            }
        }
    }

    #[test]
    fn every_byte_has_one_spelling() {
        // Any byte, raw or escaped, normalizes alike (bar those refused and the `;` that
        // begins parameters), and the result is normal.
        for byte in 1..=255u8 {
            if is_refused(byte) {
                assert_eq!(
                    normalize(&format!("/a%{byte:02x}b")),
                    Err(PathError::Ambiguous)
                );
                continue;
            }
            if matches!(byte, b'/' | b'%' | b'?' | b'#' | b';' | b'+') {
                continue;
            }
            let escaped = format!("/a%{byte:02x}b");
            let normal = normalize(&escaped).expect("an escape").into_owned();
            assert_eq!(
                normalize(&normal).as_deref(),
                Ok(normal.as_str()),
                "{escaped}"
            );
            if let Some(raw) = char::from_u32(u32::from(byte)).filter(|_| byte < 0x80) {
                let raw = format!("/a{raw}b");
                assert_eq!(normalize(&raw).as_deref(), Ok(normal.as_str()), "{raw:?}");
            }
        }
    }

    #[test]
    fn normalization_is_idempotent() {
        for input in [
            "/x/../a//b/./c/",
            "/%61%2e%2e/b",
            "/a/b/..",
            "/caf%c3%a9/%2e/",
        ] {
            let once = normalize(input).map(|p| p.into_owned());
            let Ok(once) = once else { continue };
            assert_eq!(
                normalize(&once).as_deref(),
                Ok(once.as_str()),
                "input {input:?}"
            );
        }
    }
}
