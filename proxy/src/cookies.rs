//! The one reading of a `Cookie` header (RFC 6265 §4.2): `name=value` pairs separated by `;`,
//! each trimmed of spaces; a value may be quoted. Pairs without `=` are not cookies. Used to
//! find Portcullis' own cookies and to remove them before a request goes upstream.
//!
//! A header is read as the bytes it is: a cookie of someone else's that is not UTF-8 (an
//! app's `lang=français` sent as Latin-1, or any byte a browser passes on) must neither hide
//! the session beside it nor take the other cookies with it on the way upstream.
//!
//! Depends on nothing else in the crate, so the fuzz targets include it as it is.
//!
//! `;` and `=` are found with `memchr`: it reads a header of a few dozen bytes in a few steps,
//! and every request with a cookie is read here.

/// The cookies in one `Cookie` header value, in order, as `(name, value)`; a quoted value
/// without its quotes.
pub fn pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    parts(header).filter_map(|pair| {
        let (name, value) = split_once(pair, b'=')?;
        Some((name.trim_ascii(), unquote(value.trim_ascii())))
    })
}

/// The value of the first cookie named `name` in `headers` (each one `Cookie` header value).
pub fn find<'a>(headers: impl IntoIterator<Item = &'a [u8]>, name: &[u8]) -> Option<&'a [u8]> {
    find_all(headers, name).next()
}

/// The values of every cookie named `name` in `headers`, in order.
pub fn find_all<'a, 'n, I: IntoIterator<Item = &'a [u8]>>(
    headers: I,
    name: &'n [u8],
) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n, I> {
    // As `pairs` reads them, with a value trimmed only for the cookies asked for.
    headers.into_iter().flat_map(parts).filter_map(move |pair| {
        let (n, value) = split_once(pair, b'=')?;
        (n.trim_ascii() == name).then(|| unquote(value.trim_ascii()))
    })
}

/// `header` without the cookies whose names `drop` picks, the rest joined as a browser joins
/// them (`; `), in order; `None` when nothing is left. Anything that is not a `name=value` pair
/// stays as it was sent: it is no cookie of ours.
pub fn without(header: &[u8], drop: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let mut kept = Vec::new();
    for pair in parts(header).map(<[u8]>::trim_ascii) {
        let name = split_once(pair, b'=')
            .map_or(pair, |(name, _)| name)
            .trim_ascii();
        if pair.is_empty() || drop(name) {
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    (!kept.is_empty()).then_some(kept)
}

/// The `;`-separated parts of `header`, as `header.split(|&b| b == b';')` gives them.
fn parts(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(header);
    std::iter::from_fn(move || {
        let text = rest?;
        let (part, after) = split_once(text, b';').map_or((text, None), |(p, a)| (p, Some(a)));
        rest = after;
        Some(part)
    })
}

/// `text` before and after the first `delimiter`.
fn split_once(text: &[u8], delimiter: u8) -> Option<(&[u8], &[u8])> {
    let at = memchr::memchr(delimiter, text)?;
    Some((&text[..at], &text[at + 1..]))
}

fn unquote(value: &[u8]) -> &[u8] {
    value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn cookies_are_read_as_browsers_send_them() {
        let header = b"theme=dark; portcullis_session=abc ;junk; q=\"quoted\"; empty=; =nameless";
        let all: Vec<(&str, &str)> = pairs(header).map(|(n, v)| (text(n), text(v))).collect();
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
        let find = |headers: &[&'static str], name: &str| {
            find(headers.iter().map(|h| h.as_bytes()), name.as_bytes()).map(text)
        };
        let header = std::str::from_utf8(header).unwrap();
        assert_eq!(find(&[header], "portcullis_session"), Some("abc"));
        assert_eq!(find(&["a=1", "a=2; b=3"], "b"), Some("3"));
        assert_eq!(find(&["a=1", "a=2"], "a"), Some("1"), "the first wins");
        let all: Vec<&[u8]> = find_all([&b"a=1; b=2"[..], b" a = \"3\" "], b"a").collect();
        assert_eq!(all, [&b"1"[..], b"3"]);
        assert_eq!(find(&[header], "junk"), None, "not a pair");
        assert_eq!(find(&[header], "Theme"), None, "names are case-sensitive");
        for header in ["", ";", "a", "a=1;", ";;b=2;", "é=ü; x = \"y\" ;z"] {
            let split: Vec<&[u8]> = header.as_bytes().split(|&b| b == b';').collect();
            assert_eq!(
                parts(header.as_bytes()).collect::<Vec<_>>(),
                split,
                "{header:?}"
            );
        }
    }

    #[test]
    fn a_cookie_that_is_not_utf_8_hides_nothing() {
        // `lang=français` in Latin-1, before and after the session.
        let header = b"lang=fran\xe7ais; portcullis_session=abc; x=\xff";
        assert_eq!(
            find([&header[..]], b"portcullis_session"),
            Some(&b"abc"[..])
        );
        assert_eq!(
            without(header, |name| name == b"portcullis_session").as_deref(),
            Some(&b"lang=fran\xe7ais; x=\xff"[..])
        );
    }

    #[test]
    fn own_cookies_are_removed_and_the_rest_kept_in_order() {
        let own =
            |name: &[u8]| name == b"portcullis_session" || name.starts_with(b"portcullis_signin");
        assert_eq!(
            without(b"theme=dark; portcullis_session=abc; lang=en", own).as_deref(),
            Some(&b"theme=dark; lang=en"[..])
        );
        assert_eq!(
            without(b"portcullis_signin_0123=x;portcullis_session=y", own),
            None
        );
        assert_eq!(
            without(b" junk ;a=1; ;", own).as_deref(),
            Some(&b"junk; a=1"[..]),
            "what is not a pair stays"
        );
    }
}
