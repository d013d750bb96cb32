//! The one reading of a `Cookie` header (RFC 6265 §4.2): `name=value` pairs separated by `;`,
//! each trimmed of spaces; a value may be quoted. Pairs without `=` are not cookies. Used to
//! find Portcullis' own cookies and to remove them before a request goes upstream.
//!
//! Depends on nothing else in the crate, so the fuzz targets include it as it is.
//!
//! `;` and `=` are found with `memchr`, not `str::split`: it reads a header of a few dozen
//! bytes in a few steps, where `str`'s searcher takes several instructions a byte, and every
//! request with a cookie is read here.

/// The cookies in one `Cookie` header value, in order, as `(name, value)`; a quoted value
/// without its quotes.
pub fn pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    parts(header).filter_map(|pair| {
        let (name, value) = split_once(pair, b'=')?;
        Some((name.trim(), unquote(value.trim())))
    })
}

/// The value of the first cookie named `name` in `headers` (each one `Cookie` header value).
pub fn find<'a>(headers: impl IntoIterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    // As `pairs` reads them, with a value trimmed only for the cookie asked for.
    headers.into_iter().flat_map(parts).find_map(|pair| {
        let (n, value) = split_once(pair, b'=')?;
        (n.trim() == name).then(|| unquote(value.trim()))
    })
}

/// `header` without the cookies whose names `drop` picks, the rest joined as a browser joins
/// them (`; `), in order; `None` when nothing is left. Anything that is not a `name=value` pair
/// stays as it was sent: it is no cookie of ours.
pub fn without(header: &str, drop: impl Fn(&str) -> bool) -> Option<String> {
    let mut kept = String::new();
    for pair in parts(header).map(str::trim) {
        let name = split_once(pair, b'=').map_or(pair, |(name, _)| name).trim();
        if pair.is_empty() || drop(name) {
            continue;
        }
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(pair);
    }
    (!kept.is_empty()).then_some(kept)
}

/// The `;`-separated parts of `header`, as `header.split(';')` gives them.
fn parts(header: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(header);
    std::iter::from_fn(move || {
        let text = rest?;
        let (part, after) = split_once(text, b';').map_or((text, None), |(p, a)| (p, Some(a)));
        rest = after;
        Some(part)
    })
}

/// `text` before and after the first `delimiter`, an ASCII byte, as `str::split_once` gives
/// them.
fn split_once(text: &str, delimiter: u8) -> Option<(&str, &str)> {
    let at = memchr::memchr(delimiter, text.as_bytes())?;
    // An ASCII byte is a whole character: both sides are on character boundaries.
    Some((text.get(..at)?, text.get(at + 1..)?))
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_as_browsers_send_them() {
        let header = "theme=dark; portcullis_session=abc ;junk; q=\"quoted\"; empty=; =nameless";
        let all: Vec<(&str, &str)> = pairs(header).collect();
        assert_eq!(
            all,
            [
                ("theme", "dark"),
                ("portcullis_session", "abc"),
                ("q", "quoted"),
                ("empty", ""),
                ("", "nameless"),
            ]
        );
        assert_eq!(find([header], "portcullis_session"), Some("abc"));
        assert_eq!(find(["a=1", "a=2; b=3"], "b"), Some("3"));
        assert_eq!(find(["a=1", "a=2"], "a"), Some("1"), "the first wins");
        assert_eq!(find([header], "junk"), None, "not a pair");
        assert_eq!(find([header], "Theme"), None, "names are case-sensitive");
        for header in ["", ";", "a", "a=1;", ";;b=2;", "é=ü; x = \"y\" ;z"] {
            let split: Vec<&str> = header.split(';').collect();
            assert_eq!(parts(header).collect::<Vec<_>>(), split, "{header:?}");
        }
    }

    #[test]
    fn own_cookies_are_removed_and_the_rest_kept_in_order() {
        let own =
            |name: &str| name == "portcullis_session" || name.starts_with("portcullis_signin");
        assert_eq!(
            without("theme=dark; portcullis_session=abc; lang=en", own).as_deref(),
            Some("theme=dark; lang=en")
        );
        assert_eq!(
            without("portcullis_signin_0123=x;portcullis_session=y", own),
            None
        );
        assert_eq!(
            without(" junk ;a=1; ;", own).as_deref(),
            Some("junk; a=1"),
            "what is not a pair stays"
        );
    }
}
