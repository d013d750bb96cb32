//! Clients: reqwest (HTTP/1.1, and HTTP/2 over TLS via ALPN) with every host name resolved to
//! 127.0.0.1, and a raw HTTP/1.1 client that sends bytes exactly as written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::TestCa;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves every name to 127.0.0.1 (reqwest then uses the URL's port), so tests can use
/// host names like `app.test` and never leave the machine.
struct Loopback;

impl Resolve for Loopback {
    fn resolve(&self, _name: Name) -> Resolving {
        Box::pin(async {
            let addrs: Addrs = Box::new(std::iter::once(SocketAddr::from(([127, 0, 0, 1], 0))));
            Ok(addrs)
        })
    }
}

fn base() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(Loopback))
        .timeout(CLIENT_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
}

/// A plain-HTTP/1.1 client.
pub fn plain_client() -> reqwest::Client {
    plain_client_builder()
        .build()
        .expect("build reqwest client")
}

/// The builder of [`plain_client`], to change a setting (e.g. the timeout) before building.
pub fn plain_client_builder() -> reqwest::ClientBuilder {
    base().http1_only()
}

/// A TLS client trusting only `ca`, offering `h2` and `http/1.1` by ALPN, recording TLS info.
pub fn tls_client(ca: &TestCa) -> reqwest::Client {
    tls_builder(ca).build().expect("build reqwest TLS client")
}

/// A TLS client trusting only `ca` that offers only `http/1.1`.
pub fn tls_client_http1(ca: &TestCa) -> reqwest::Client {
    tls_builder(ca)
        .http1_only()
        .build()
        .expect("build reqwest TLS client")
}

/// A TLS client that accepts any certificate, to see which one the server presents when no
/// configured name matches (or no SNI is sent, for IP addresses).
pub fn tls_client_any_cert() -> reqwest::Client {
    base()
        .http1_only()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .expect("build reqwest TLS client")
}

/// The builder of [`tls_client`], to change a setting (cookies, redirects) before building.
pub fn tls_client_builder(ca: &TestCa) -> reqwest::ClientBuilder {
    tls_builder(ca)
}

fn tls_builder(ca: &TestCa) -> reqwest::ClientBuilder {
    let root = reqwest::Certificate::from_pem(ca.ca_pem().as_bytes()).expect("CA PEM");
    base()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .tls_info(true)
}

/// The DER certificate the server presented, from a response of a [`tls_client`].
pub fn peer_certificate(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("response carries TLS info with a peer certificate")
        .to_vec()
}

/// A response as read off the wire by [`raw_request`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines as received (names unchanged).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The values of every header named `name` (any case), in the order received.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` byte for byte to `addr` and reads one response (Content-Length, chunked or
/// until close). `Err` when the connection closes before a complete response head, or after
/// 15 s.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    match tokio::time::timeout(CLIENT_TIMEOUT, raw_exchange(addr, request)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no complete response within {CLIENT_TIMEOUT:?}")),
    }
}

async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // The server may answer (e.g. 413, 431) and close before reading everything: a failed
    // write is not the end of the exchange, the response may already be there.
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(pos) = find(&buf, b"\r\n\r\n") {
                break pos + 4;
            }
            if buf.len() > 1024 * 1024 {
                return Err("response head larger than 1 MiB".into());
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    return Err(format!(
                        "connection closed before a complete response head; got {:?}",
                        String::from_utf8_lossy(&buf)
                    ))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
            .collect();
        let rest = buf.split_off(head_end);
        if (100..200).contains(&status) && status != 101 {
            // Interim response (100 Continue): the final one follows.
            buf = rest;
            continue;
        }
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        // A response to HEAD has no body, whatever its Content-Length says.
        if !request.starts_with(b"HEAD ") {
            resp.body = read_body(&mut stream, &resp, rest).await?;
        }
        return Ok(resp);
    }
}

async fn read_body(
    stream: &mut TcpStream,
    resp: &RawResponse,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut chunk = [0u8; 16 * 1024];
    if resp.status == 101 || resp.status == 204 || resp.status == 304 {
        return Ok(Vec::new());
    }
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            if let Some(body) = decode_chunked(&buf)? {
                return Ok(body);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err("connection closed inside a chunked body".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
    if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        while buf.len() < len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    return Err(format!(
                        "connection closed after {} of {len} body bytes",
                        buf.len()
                    ))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.truncate(len);
        return Ok(buf);
    }
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The decoded body if `buf` holds a complete chunked body, `None` if more bytes are needed.
fn decode_chunked(buf: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_end) = find(&buf[pos..], b"\r\n") else {
            return Ok(None);
        };
        let size_text = String::from_utf8_lossy(&buf[pos..pos + line_end]).into_owned();
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            return Ok(find(&buf[pos..], b"\r\n").map(|_| body));
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Encodes `body` as chunks of `chunk_size` bytes plus the last chunk, for hand-written
/// chunked requests.
pub fn chunked(body: &[u8], chunk_size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(chunk_size.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A websocket opened through a proxy listener.
pub type Websocket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a websocket to `ws://<host>:<listener's port><path>` over a connection to the
/// listener at `addr`, with one extra request header; asserts the `101` (bounded wait).
pub async fn websocket(
    addr: SocketAddr,
    host: &str,
    path: &str,
    header: (&str, &str),
) -> Websocket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut request = format!("ws://{host}:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        HeaderName::from_bytes(header.0.as_bytes()).unwrap(),
        HeaderValue::from_str(header.1).unwrap(),
    );
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("the websocket handshake timed out")
    .expect("the websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

/// Waits (at most `within`) for the other end to close `ws`; reads and drops whatever arrives
/// meanwhile. True if it was closed.
pub async fn closed_within(ws: &mut Websocket, within: Duration) -> bool {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => return true,
            Ok(Some(Ok(_))) => {}
            Err(_) => return false,
        }
    }
}

/// Reads one request head from `stream`, as a raw upstream does: through its blank line, a byte
/// at a time so that nothing after it (a body) is taken; what came, when it closes first.
pub async fn read_request_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    head
}

/// Reads one response head from `stream`, through its blank line, a byte at a time so that
/// nothing after it is taken (a `100 Continue`, then the answer); panics if none comes within
/// `within` or the connection closes first.
pub async fn read_response_head(stream: &mut TcpStream, within: Duration) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(within, stream.read(&mut byte))
            .await
            .unwrap_or_else(|_| panic!("no response head within {within:?}: {head:?}"))
            .unwrap_or_else(|e| panic!("reading a response head: {e}"));
        assert_eq!(read, 1, "closed before a response head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
