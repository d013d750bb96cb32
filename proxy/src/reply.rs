//! Every answer Portcullis writes itself (its pages, JSON errors, SCIM bodies and redirects)
//! goes through [`send`]: one HTML template, one escaper and one keep-alive rule.
//!
//! - **Template.** [`Reply::page`] wraps a title and already-escaped HTML content in the one
//!   page every Portcullis page uses; [`escape`] is the one escaper (`& < > " '`).
//! - **Keep-alive.** After its own answer Portcullis reuses the connection only when the whole
//!   request has been read and it was understood: a request body left unread would be parsed as
//!   the next request, and after a 400 nothing more on the connection can be trusted.
//! - **HEAD** gets the head of the answer, never its body.
//!
//! A [`Reply`] is a plain value, so everything that decides what to answer is tested without a
//! connection; only [`send`] touches pingora.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// An answer, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    /// `None` for an answer without a body.
    pub content_type: Option<&'static str>,
    pub body: Bytes,
    /// Further headers, in order (`Location`, `Set-Cookie`, `WWW-Authenticate`, …).
    pub headers: Vec<(HeaderName, String)>,
}

impl Reply {
    /// An HTML page: `title` (plain text) and `content` (HTML, with every value in it escaped).
    pub fn page(status: StatusCode, title: &str, content: &str) -> Reply {
        Reply::html(status, document(title, "", content))
    }

    /// An HTML document made by [`document`].
    pub fn html(status: StatusCode, html: String) -> Reply {
        Reply::with_body(status, "text/html; charset=utf-8", html.into())
    }

    /// The page for a status Portcullis answers without more to say (404, 413, 502, …).
    pub fn status_page(status: StatusCode) -> Reply {
        let explanation = match status.as_u16() {
            200 => "ok",
            308 => "This address is served over HTTPS.",
            400 => "The request could not be understood.",
            404 => "Nothing is served at this address.",
            413 => "The request body is larger than this service accepts.",
            431 => "The request headers are larger than this service accepts.",
            502 => "The service behind this address could not be reached. Try again shortly.",
            503 => "The service is not available right now. Try again shortly.",
            504 => "The service behind this address did not answer in time.",
            _ => "The request could not be completed.",
        };
        let title = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        Reply::page(status, &title, &format!("<p>{}</p>", escape(explanation)))
    }

    /// A JSON answer.
    pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
        Reply::with_body(status, "application/json", value.to_string().into())
    }

    /// A body of any type.
    pub fn with_body(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
        Reply {
            status,
            content_type: Some(content_type),
            body,
            headers: Vec::new(),
        }
    }

    /// An answer with no body.
    pub fn empty(status: StatusCode) -> Reply {
        Reply {
            status,
            content_type: None,
            body: Bytes::new(),
            headers: Vec::new(),
        }
    }

    /// A redirect (`status` is 302, 303 or 308) to `location`, with no body.
    pub fn redirect(status: StatusCode, location: &str) -> Reply {
        Reply::empty(status).header(header::LOCATION, location)
    }

    /// Adds a header.
    pub fn header(mut self, name: HeaderName, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// Whether the connection may carry another request after this answer, for a request
    /// whose body was read to the end or not.
    pub fn keeps_connection(&self, request_body_read: bool) -> bool {
        request_body_read && self.status != StatusCode::BAD_REQUEST
    }
}

/// Writes `reply` and ends the request; `Ok(true)`, as `request_filter` answers when it has
/// responded itself. Boxed: a request refused here pays for the allocation, where the state of
/// the write would otherwise make every request's `request_filter` that much larger (pingora
/// boxes that hook's future, and copies it, for every request).
pub fn send(
    session: &mut Session,
    reply: Reply,
) -> Pin<Box<dyn Future<Output = Result<bool>> + Send + '_>> {
    Box::pin(write(session, reply))
}

async fn write(session: &mut Session, reply: Reply) -> Result<bool> {
    let mut head = ResponseHeader::build(reply.status, Some(reply.headers.len() + 5))?;
    if let Some(content_type) = reply.content_type {
        head.insert_header(header::CONTENT_TYPE, content_type)?;
        // Read as what it says: some answers carry text from the IdP or the directory.
        if !reply
            .headers
            .iter()
            .any(|(name, _)| name == header::X_CONTENT_TYPE_OPTIONS)
        {
            head.insert_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")?;
        }
    }
    // None on an answer that has no body (RFC 9110 §8.6: never on a 204; on a 304, only the
    // length the 200 would have).
    let bodiless = reply.status.is_informational()
        || matches!(
            reply.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    if !bodiless {
        head.insert_header(header::CONTENT_LENGTH, reply.body.len().to_string())?;
    }
    if !reply
        .headers
        .iter()
        .any(|(name, _)| name == header::CACHE_CONTROL)
    {
        head.insert_header(header::CACHE_CONTROL, "no-store")?;
    }
    for (name, value) in &reply.headers {
        head.append_header(name.clone(), value.as_str())?;
    }
    // No page of Portcullis' is shown inside another site's frame, where a click on it (sign
    // out, sign in again) could be someone else's doing. The console sets a stricter policy.
    if reply
        .content_type
        .is_some_and(|t| t.starts_with("text/html"))
    {
        let has = |wanted: &HeaderName| reply.headers.iter().any(|(name, _)| name == wanted);
        if !has(&header::X_FRAME_OPTIONS) {
            head.insert_header(header::X_FRAME_OPTIONS, "DENY")?;
        }
        if !has(&header::CONTENT_SECURITY_POLICY) {
            head.insert_header(header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'")?;
        }
        // Nor read by the page that opened it: a host's page that opened a sign-in in a
        // window of its own would read the callback's address, its code, off the page the
        // callback answers a browser that did not start it.
        head.insert_header("cross-origin-opener-policy", "same-origin")?;
    }
    if !reply.keeps_connection(session.is_body_done()) {
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD || reply.body.is_empty();
    session
        .write_response_header(Box::new(head), head_only)
        .await?;
    if !head_only {
        // In pieces, each write timed on its own (over HTTP/2 every write is, see
        // `request_filter`): a client reading a large answer (a group of every member) slowly
        // but steadily is not cut for the time the whole takes.
        let mut body = reply.body;
        while body.len() > WRITE_PIECE {
            let piece = body.split_to(WRITE_PIECE);
            session.write_response_body(Some(piece), false).await?;
        }
        session.write_response_body(Some(body), true).await?;
    }
    linger(session).await;
    Ok(true)
}

/// After an answer to a request whose body is left unread (a refusal: the connection then
/// closes, see [`Reply::keeps_connection`]), over HTTP/1, what more of the body comes is read
/// and dropped before the connection closes, as nginx's lingering close does: closed with data
/// unread, the socket answers what still comes with a reset, which may erase the answer from
/// the client's buffers before it reads it (RFC 9112 §9.6; Windows does). A client still
/// uploading sees its 413 or 401, not a reset, while its body keeps coming (a read at least
/// every [`LINGER_READ`]), for up to [`LINGER`] and [`LINGER_BYTES`]: no longer than a slow
/// upload to a route holds a connection anyway.
async fn linger(session: &mut Session) {
    if session.is_body_done() || session.req_header().version == http::Version::HTTP_2 {
        return;
    }
    let drained = async {
        let mut read = 0;
        while read < LINGER_BYTES {
            match tokio::time::timeout(LINGER_READ, session.read_request_body()).await {
                Ok(Ok(Some(chunk))) => read += chunk.len(),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drained).await;
}

/// How long a refused request's body is read and dropped, at most, before its connection
/// closes (nginx's `lingering_time`).
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a read of it is waited for (nginx's `lingering_timeout` is 5 s).
const LINGER_READ: std::time::Duration = std::time::Duration::from_secs(2);
/// How much of it is read, at most.
const LINGER_BYTES: usize = 64 << 20;

/// The most of an answer's body written at once (see `write`).
const WRITE_PIECE: usize = 64 * 1024;

/// Where Portcullis serves its stylesheet, on every host.
pub const STYLESHEET: &str = "/.portcullis/style.css";

/// The stylesheet itself.
pub fn stylesheet() -> Reply {
    Reply::with_body(
        StatusCode::OK,
        "text/css; charset=utf-8",
        Bytes::from_static(include_bytes!("../assets/style.css")),
    )
    .header(header::CACHE_CONTROL, "public, max-age=3600")
}

/// The one page template: `title` (plain text), `nav` (HTML for the top bar, after the name;
/// empty on pages outside the console) and `content` (HTML, with every value in it escaped).
pub fn document(title: &str, nav: &str, content: &str) -> String {
    let title = escape(title);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><link rel=\"stylesheet\" href=\"{STYLESHEET}\"></head>\
         <body><header class=\"bar\"><span class=\"brand\">Portcullis</span>{nav}</header>\
         <main><h1>{title}</h1>{content}</main></body></html>\n"
    )
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `s` safe inside HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Whether a body Portcullis reads itself (SCIM, the console, back-channel logout) may come:
/// false when its declared length is over `limit` (answer 413 at once). If so, an HTTP/1.1
/// client that asked (`Expect: 100-continue`) is told to send it: pingora sends no
/// `100 Continue` of its own (an upstream does, for what is proxied), and such a client waits
/// for one before its body (curl a second, others until they time out). Call once the
/// request is otherwise let in.
pub async fn ready_for_body(session: &mut Session, limit: u64) -> Result<bool> {
    let req = session.req_header();
    if crate::proxy::length_of(&req.headers).is_some_and(|len| len > limit) {
        return Ok(false);
    }
    let expects = req.version == http::Version::HTTP_11
        && req
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects && !session.is_body_done() {
        session.write_continue_response().await?;
    }
    Ok(true)
}

/// The next chunk of a request body Portcullis reads itself (SCIM, the console, the
/// back-channel logout), `None` at its end. A client that sends none of it for `idle`
/// (`[server] client_idle_timeout`) fails the request: pingora bounds each read of an HTTP/1
/// body (60 s unless told otherwise: told `idle` here) but none of an HTTP/2 one, whose stream
/// would hold its task (and the configuration it began under) for ever. A body that cannot be
/// read (a malformed chunk, a client gone half way) is the client's failure (400, or no answer
/// to one gone), not Portcullis' (500).
pub async fn read_body(session: &mut Session, idle: std::time::Duration) -> Result<Option<Bytes>> {
    session.set_read_timeout(Some(idle));
    match tokio::time::timeout(idle, session.read_request_body()).await {
        Ok(read) => read.map_err(|e| e.into_down()),
        Err(_) => Err(pingora::Error::explain(
            pingora::ErrorType::ReadTimedout,
            "reading the request body",
        )
        .into_down()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(reply: &Reply) -> &str {
        std::str::from_utf8(&reply.body).unwrap()
    }

    #[test]
    fn text_is_cut_on_a_character_boundary() {
        assert_eq!(cut("ééé", 3), "é");
        assert_eq!(cut("abc", 512), "abc");
    }

    #[test]
    fn the_escaper_covers_text_and_both_quotes() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(escape("alice@corp.example"), "alice@corp.example");
    }

    #[test]
    fn pages_share_one_template_and_escape_the_title() {
        let page = Reply::page(StatusCode::OK, "Who's <here>", "<p>x</p>");
        let html = text(&page);
        assert!(html.starts_with("<!doctype html>"), "{html}");
        assert!(
            html.contains("<title>Who&#39;s &lt;here&gt;</title>"),
            "{html}"
        );
        assert!(
            html.contains("<h1>Who&#39;s &lt;here&gt;</h1><p>x</p>"),
            "{html}"
        );
        assert_eq!(page.content_type, Some("text/html; charset=utf-8"));
        let status = Reply::status_page(StatusCode::NOT_FOUND);
        assert!(text(&status).contains("<h1>404 Not Found</h1>"));
        assert!(text(&status).contains("Nothing is served at this address."));
    }

    #[test]
    fn the_connection_is_kept_only_after_a_whole_understood_request() {
        let forbidden = Reply::json(StatusCode::FORBIDDEN, &serde_json::json!({}));
        assert!(forbidden.keeps_connection(true));
        assert!(!forbidden.keeps_connection(false), "a body is left unread");
        assert!(!Reply::status_page(StatusCode::BAD_REQUEST).keeps_connection(true));
        assert!(Reply::redirect(StatusCode::FOUND, "/x").keeps_connection(true));
    }

    #[test]
    fn redirects_carry_their_location_and_no_body() {
        let reply = Reply::redirect(StatusCode::FOUND, "https://idp.example/auth?x=1")
            .header(header::SET_COOKIE, "a=b");
        assert!(reply.body.is_empty());
        assert_eq!(reply.content_type, None);
        assert_eq!(
            reply.headers,
            vec![
                (header::LOCATION, "https://idp.example/auth?x=1".to_owned()),
                (header::SET_COOKIE, "a=b".to_owned()),
            ]
        );
    }
}
