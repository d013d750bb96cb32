//! A real HTTP/1.1 upstream that answers every request with a JSON [`Echo`] of what it received.
//!
//! Endpoints: `/ws` is a websocket echo (when the request asks for an upgrade); `/ws-ticks`
//! is a websocket that sends `tick <stamp>` every 20 ms and records every message it receives
//! (see [`stamp`] and [`Upstream::ws_received`]); `/stream-ticks` is a streaming response
//! with one `tick <stamp>` line every 20 ms (at most 1000); `/idle-events` is an event stream that
//! sends one event, then nothing for 30 s; `/slow?ms=N` answers after N milliseconds
//! (for drain and in-flight tests); everything else echoes at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// What an upstream received, as it answers it in its JSON body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Echo {
    /// The name the upstream was started with.
    pub upstream: String,
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    /// Every header, in order, duplicates kept, names as the upstream's parser reports them.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
}

impl Echo {
    /// Parses an upstream's answer; panics with the body text when it is not an echo.
    pub fn parse(body: &[u8]) -> Echo {
        match serde_json::from_slice(body) {
            Ok(echo) => echo,
            Err(e) => panic!(
                "response body is not an upstream echo ({e}): {}",
                String::from_utf8_lossy(body)
            ),
        }
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, by case-insensitive name.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct State {
    name: String,
    seen: Mutex<Vec<Echo>>,
    /// The path and query of every request whose head arrived, its body read or not.
    heads: Mutex<Vec<String>>,
    /// Messages received on `/ws-ticks` websockets.
    ws_received: Mutex<Vec<String>>,
}

/// Microseconds since this process first asked: one clock for the tests and their upstreams,
/// to say which side of an event a message was sent on.
pub fn stamp() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A running upstream on `127.0.0.1:<ephemeral>`. Stops when dropped.
pub struct Upstream {
    state: Arc<State>,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// Tells the accept loop to close everything and end (see [`Upstream::stop`]).
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Upstream {
    /// Binds an ephemeral loopback port and starts serving on the current tokio runtime.
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts serving on `addr`, e.g. the address of a stopped upstream, to bring it back.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind upstream listener on {addr}: {e}"));
        let addr = listener.local_addr().expect("upstream local addr");
        let state = Arc::new(State {
            name: name.to_owned(),
            seen: Mutex::new(Vec::new()),
            heads: Mutex::new(Vec::new()),
            ws_received: Mutex::new(Vec::new()),
        });
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, state.clone(), stopped));
        Upstream {
            state,
            addr,
            task: Some(task),
            shutdown: Some(shutdown),
        }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, as a route's `to` entry.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far (recorded when its head and body have arrived, before any
    /// `/slow` delay).
    pub fn seen(&self) -> Vec<Echo> {
        self.state.seen.lock().expect("upstream state").clone()
    }

    /// The path and query of every request whose head arrived so far, recorded before its body
    /// is read: one whose body was cut off (refused on its way) is among them, not in
    /// [`Upstream::seen`].
    pub fn heads(&self) -> Vec<String> {
        self.state.heads.lock().expect("upstream state").clone()
    }

    /// How many requests were received so far.
    pub fn count(&self) -> usize {
        self.state.seen.lock().expect("upstream state").len()
    }

    /// Every message received on a `/ws-ticks` websocket so far, and what arrived after a
    /// `/switch` (its bytes as text).
    pub fn ws_received(&self) -> Vec<String> {
        self.state
            .ws_received
            .lock()
            .expect("upstream state")
            .clone()
    }

    /// Closes the listening socket and every open connection, as a crashed upstream would, and
    /// returns once they are closed: a pooled connection to it answers nothing after this.
    /// Websocket sessions already upgraded are left alone.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Aborting the accept loop drops its JoinSet, which aborts every connection task.
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                drop(listener);
                // Aborts every connection task and waits until each has ended (its socket
                // closed).
                connections.shutdown().await;
                return;
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(req, state.clone()));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    let _ = conn.await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    mut req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let wants_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let uri = (parts.uri.path_and_query()).map_or_else(|| "/".to_owned(), |pq| pq.to_string());
    state
        .heads
        .lock()
        .expect("upstream state")
        .push(uri.clone());
    let body_len = match body.collect().await {
        Ok(collected) => collected.to_bytes().len() as u64,
        Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "body read failed")),
    };
    let echo = Echo {
        upstream: state.name.clone(),
        method: parts.method.to_string(),
        uri,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len,
    };
    state
        .seen
        .lock()
        .expect("upstream state")
        .push(echo.clone());

    let path = parts.uri.path();
    if (path == "/ws" || path == "/ws-ticks") && wants_websocket {
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Ok(plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
        };
        let accept = derive_accept_key(key.as_bytes());
        let ticks = path == "/ws-ticks";
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            if ticks {
                return tick_and_record(ws, &state).await;
            }
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                } else if msg.is_close() {
                    break;
                }
            }
        });
        return Ok(switching(Some(&accept)));
    }
    if path == "/switch" {
        // A handler that switches protocols without being a websocket server (a status
        // echo, say): 101 without `Sec-WebSocket-Accept`. What arrives after is recorded.
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            let mut buf = vec![0u8; 4096];
            while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut io, &mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                state.ws_received.lock().expect("upstream state").push(text);
            }
        });
        return Ok(switching(None));
    }
    if path == "/idle-events" {
        // An event stream that sends one event, then nothing for 30 s.
        let first = futures_util::stream::once(async {
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(
                b"data: hello\n\n",
            )))
        });
        let quiet = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::new()))
        });
        let mut resp = Response::new(StreamBody::new(first.chain(quiet)).boxed_unsync());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        return Ok(resp);
    }
    if path == "/stream-ticks" {
        let mut resp = Response::new(ticks());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        return Ok(resp);
    }
    if path == "/big" {
        // `mb` MiB of `a`, streamed: an answer larger than every buffer on the way.
        let mb = query_number(&parts.uri, "mb").unwrap_or(1).min(256) as usize;
        let chunk = Bytes::from(vec![b'a'; 1 << 20]);
        let chunks = futures_util::stream::iter(
            (0..mb).map(move |_| Ok(hyper::body::Frame::data(chunk.clone()))),
        );
        return Ok(Response::new(StreamBody::new(chunks).boxed_unsync()));
    }
    if path == "/slow" {
        let ms = query_number(&parts.uri, "ms").unwrap_or(1000).min(30_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let body = serde_json::to_vec(&echo).unwrap_or_default();
    let mut resp = Response::new(full(Bytes::from(body)));
    if path == "/set-cookies" {
        // What an upstream could send to plant its operator's session in a visitor's
        // browser, or to clear theirs, beside a cookie of its own.
        for line in [
            "portcullis_session=planted; Path=/; HttpOnly",
            "__Host-portcullis_session=planted; Path=/; Secure",
            "__host-portcullis_session=planted; Path=/; Secure",
            "portcullis_signin_0123=planted; Path=/",
            "portcullis_session=; Max-Age=0; Domain=corp.test; Path=/",
            // Nameless: a browser sends it back as `portcullis_session=planted`.
            "=portcullis_session=planted; Path=/home",
            "theme=dark; Path=/",
        ] {
            resp.headers_mut()
                .append(header::SET_COOKIE, header::HeaderValue::from_static(line));
        }
        // And to sign them out of every host of the site at once; and a caching rule of its
        // own for this answer.
        let h = resp.headers_mut();
        h.insert(
            "clear-site-data",
            header::HeaderValue::from_static("\"cache\", \"Cookies\""),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("public, max-age=60"),
        );
    }
    if path == "/cache-control" {
        // `?cc=…[&vary=…][&<field>=…]`: this answer's caching rule, as its upstream words it
        // (`cdn-cache-control=max-age=60`, say, for a CDN in front).
        let query = parts.uri.query().unwrap_or_default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let name = match &*name {
                "cc" => header::CACHE_CONTROL,
                "vary" => header::VARY,
                other => match header::HeaderName::from_bytes(other.as_bytes()) {
                    Ok(name) => name,
                    Err(_) => continue,
                },
            };
            if let Ok(value) = header::HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, value);
            }
        }
    }
    if path == "/hop-by-hop" {
        // Headers for the proxy alone, as an upstream behind a proxy may send them: what
        // `Connection` names, and `Keep-Alive`; beside one for the client. With `?bare`, no
        // `Connection`: `Keep-Alive` and `Proxy-Connection` are hop-by-hop all the same.
        let h = resp.headers_mut();
        if parts.uri.query() != Some("bare") {
            h.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("keep-alive, X-Internal-Token"),
            );
            h.insert(
                "x-internal-token",
                header::HeaderValue::from_static("for-the-proxy-only"),
            );
        }
        h.insert(
            "keep-alive",
            header::HeaderValue::from_static("timeout=5, max=100"),
        );
        h.insert(
            "proxy-connection",
            header::HeaderValue::from_static("keep-alive"),
        );
        h.insert("x-end-to-end", header::HeaderValue::from_static("kept"));
    }
    // A CORS preflight is answered as a CORS library does, and by the handler as well (the
    // echo), as one that answers any method would.
    if parts.method == hyper::Method::OPTIONS
        && parts
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        if let Some(origin) = parts.headers.get(header::ORIGIN).cloned() {
            let h = resp.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                header::HeaderValue::from_static("true"),
            );
            h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
        }
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&state.name) {
        resp.headers_mut().insert("x-upstream", v);
    }
    Ok(resp)
}

/// Sends `tick <stamp>` every 20 ms and records every text message, until either side fails.
async fn tick_and_record<S>(mut ws: WebSocketStream<S>, state: &State)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let tick = format!("tick {}", stamp());
                if ws.send(tokio_tungstenite::tungstenite::Message::text(tick)).await.is_err() {
                    return;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(msg)) if msg.is_text() => {
                    if let Ok(text) = msg.into_text() {
                        state.ws_received.lock().expect("upstream state").push(text.to_string());
                    }
                }
                Some(Ok(msg)) if !msg.is_close() => {}
                _ => return,
            }
        }
    }
}

/// 101 to a websocket, with the `Sec-WebSocket-Accept` value `accept` if given.
fn switching(accept: Option<&str>) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Some(Ok(v)) = accept.map(header::HeaderValue::from_str) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// The number the query parameter `name` holds, if any.
fn query_number(uri: &http::Uri, name: &str) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed_unsync()
}

/// One `tick <stamp>` line every 20 ms, at most 1000.
fn ticks() -> Body {
    let ticks = futures_util::stream::unfold(0u32, |n| async move {
        if n >= 1000 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let line = Bytes::from(format!("tick {}\n", stamp()));
        Some((Ok(hyper::body::Frame::data(line)), n + 1))
    });
    StreamBody::new(ticks).boxed_unsync()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// An upstream that accepts connections and never says a word (a TLS handshake to it never
/// completes) until told to hang up: [`Mute::accepted`] waits for its next connection, the
/// sign that a request is on its way to it.
pub struct Mute {
    addr: SocketAddr,
    accepted: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>,
    hang_up: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl Mute {
    pub async fn start() -> Mute {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tell, accepted) = tokio::sync::mpsc::channel(64);
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let told = hang_up.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { return };
                        held.push(stream);
                        let _ = tell.try_send(());
                    }
                    _ = told.notified() => held.clear(),
                }
            }
        });
        Mute {
            addr,
            accepted: tokio::sync::Mutex::new(accepted),
            hang_up,
            task,
        }
    }

    /// Closes the connections it holds: their handshakes fail at once.
    pub fn hang_up(&self) {
        self.hang_up.notify_one();
    }

    /// `https://` to it: Portcullis connects, and waits for a handshake that never comes.
    pub fn tls_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits (at most 60 s) until it accepts a connection.
    pub async fn accepted(&self) {
        let mut accepted = self.accepted.lock().await;
        tokio::time::timeout(Duration::from_secs(60), accepted.recv())
            .await
            .expect("no connection to the mute upstream within 60 s")
            .expect("the mute upstream stopped");
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        self.task.abort();
    }
}
