//! Where a person may be sent after signing in: only to a URL on a host Portcullis serves.
//!
//! The return URL comes from the request that triggered sign-in, or from `rd=` on
//! `/.portcullis/sign_in`, which anyone can craft; an open redirect there would let a phishing
//! link borrow the company's sign-in page. So the rule is strict and simple: an absolute
//! `http`/`https` URL whose host is exactly a configured host (or matches a configured
//! `*.` wildcard), without user info, and `https` when sign-in is (an `http` one on the
//! default port is taken as its `https` twin); or a path on the current
//! host that cannot be read as anything else. Everything else — protocol-relative `//x`,
//! backslashes, control characters, `https:x` without slashes, percent-encoded slashes,
//! look-alike hosts — is refused.

use std::borrow::Cow;

/// Hosts a return URL may point at: lower-case names, and `*.suffix` wildcards.
#[derive(Debug, Default, Clone)]
pub struct Hosts {
    exact: Vec<String>,
    /// Suffixes including the leading dot (`.corp.example.com` for `*.corp.example.com`).
    wildcard: Vec<String>,
}

impl Hosts {
    pub fn new<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for host in hosts {
            let host = host.to_ascii_lowercase();
            match host.strip_prefix('*') {
                Some(suffix) => set.wildcard.push(suffix.to_owned()),
                None => set.exact.push(host),
            }
        }
        set
    }

    pub fn contains(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.exact.contains(&host)
            || self
                .wildcard
                .iter()
                .any(|suffix| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
    }
}

/// The URL to send the person to, or `None` when `raw` is not safe. `origin` is
/// `scheme://host[:port]` of the request being served, for path-only return URLs.
pub fn safe_return_url(raw: &str, origin: &str, hosts: &Hosts) -> Option<String> {
    if raw.is_empty()
        || raw.len() > 2048
        || raw.contains('\\')
        || raw.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return None;
    }
    if raw.starts_with('/') {
        // A path on this host. `//x` and `/%2f…` could be read as another host by someone;
        // the query may hold encoded slashes (`?next=%2Fhome`).
        let path = raw
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if path.as_bytes().get(1) == Some(&b'/') || path.contains("%2f") || path.contains("%5c") {
            return None;
        }
        return Some(format!("{origin}{raw}"));
    }
    let lower = raw.to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return None;
    }
    let mut url = url::Url::parse(raw).ok()?;
    if !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    // Signed in over TLS, the session's cookie is `Secure`: sent back over plain http it
    // would carry none, and the page there is anyone's on the network to answer. An address
    // on the default port (an application that built it ignoring `X-Forwarded-Proto`) is
    // the same page over https; one on another port is not known to be.
    let downgrade = origin.starts_with("https://") && url.scheme() != "https";
    if downgrade && (url.port().is_some() || url.set_scheme("https").is_err()) {
        return None;
    }
    // An IPv6 address in the text form routes are written in (the URL's is the URL
    // standard's, `::ffff:a00:1` for `::ffff:10.0.0.1`).
    let host = match url.host()? {
        url::Host::Ipv6(address) => Cow::Owned(format!("[{address}]")),
        _ => Cow::Borrowed(url.host_str()?),
    };
    hosts.contains(&host).then(|| url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_redirect_table() {
        let hosts = Hosts::new([
            "corp.example.com",
            "auth.corp.example.com",
            "*.apps.example.com",
            "[::ffff:10.0.0.1]",
        ]);
        let origin = "https://corp.example.com";
        let allowed = [
            // An IPv6 route's address as a browser writes it.
            ("https://[::ffff:a00:1]/a", "https://[::ffff:a00:1]/a"),
            ("/dashboard?x=1", "https://corp.example.com/dashboard?x=1"),
            (
                "/search?next=%2Fhome",
                "https://corp.example.com/search?next=%2Fhome",
            ),
            ("https://corp.example.com/a", "https://corp.example.com/a"),
            (
                "https://CORP.example.com:8443/a",
                "https://corp.example.com:8443/a",
            ),
            (
                "https://grafana.apps.example.com/d",
                "https://grafana.apps.example.com/d",
            ),
            // Built by an application that took its own address for http: the same page over
            // https, as sign-in is.
            ("HTTP://corp.example.com/a", "https://corp.example.com/a"),
            (
                "http://auth.corp.example.com:80/",
                "https://auth.corp.example.com/",
            ),
        ];
        for (raw, want) in allowed {
            assert_eq!(
                safe_return_url(raw, origin, &hosts).as_deref(),
                Some(want),
                "{raw:?}"
            );
        }
        let refused = [
            "//evil.com",
            "//evil.com/path",
            "/\\evil.com",
            "/\t/evil.com",
            "/\n/evil.com",
            "\\\\evil.com",
            "https:evil.com",
            "https:/evil.com",
            "http:\\\\evil.com",
            "/%2f/evil.com",
            "/%2F%2Fevil.com",
            "/%5cevil.com",
            "https://evil.com",
            "https://corp.example.com.evil.com/",
            "https://evilcorp.example.com/",
            "https://corp.example.com@evil.com/",
            "https://user:pass@corp.example.com/",
            "https://apps.example.com/",
            "javascript:alert(1)",
            "data:text/html,hi",
            "ftp://corp.example.com/",
            "http://auth.corp.example.com:8080/",
            " https://corp.example.com/",
            "",
        ];
        for raw in refused {
            assert_eq!(
                safe_return_url(raw, origin, &hosts),
                None,
                "{raw:?} must be refused"
            );
        }
        // Where sign-in itself is over plain http (a demo, a lab), so may the return be.
        assert_eq!(
            safe_return_url(
                "http://auth.corp.example.com/",
                "http://corp.example.com",
                &hosts
            )
            .as_deref(),
            Some("http://auth.corp.example.com/")
        );
    }
}
