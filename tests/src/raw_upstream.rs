//! An upstream that records every request head exactly as its bytes arrived: the request line
//! and each header line, before any parser has read them. What an upstream framework serves
//! depends on those bytes (Go's `net/http` reads `GET foo:/admin` as `/admin`; Tomcat drops
//! `;` parameters), so tests of what reaches an upstream look at them, not at a parsed echo.
//!
//! It answers each request `200 ok` (a 2-byte body) and keeps the connection open. Request
//! bodies are read by `Content-Length`; a chunked body closes the connection after the answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Largest request head recorded; a larger one closes the connection.
const MAX_HEAD: usize = 64 * 1024;

/// One request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    /// The request line, without its CRLF (`GET /x HTTP/1.1`).
    pub line: String,
    /// Each header line, as sent (`Name: value`), in order.
    pub headers: Vec<String>,
    /// Which of the upstream's connections it came on, counted from 1 as they were accepted:
    /// requests on one connection are one client's to an upstream that logs in connections
    /// (IIS with Windows authentication).
    pub connection: usize,
}

impl RawRequest {
    /// The values of every header named `name` (any case), as sent.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// The request target of the request line.
    pub fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or_default()
    }
}

/// A running raw upstream on `127.0.0.1:<ephemeral>`. Stops when dropped.
pub struct RawUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw upstream");
        let addr = listener.local_addr().expect("raw upstream address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let accepted = AtomicUsize::new(0);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let connection = accepted.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::spawn(serve(stream, connection, recorded.clone()));
            }
        });
        RawUpstream { addr, seen, task }
    }

    /// `http://127.0.0.1:<port>`, to put in a route's `to`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last request received; panics if there was none.
    pub fn last(&self) -> RawRequest {
        self.requests()
            .pop()
            .expect("the raw upstream received no request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, connection: usize, seen: Arc<Mutex<Vec<RawRequest>>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = Vec::new();
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            head.extend_from_slice(&line);
            if head.len() > MAX_HEAD {
                return;
            }
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if text.is_empty() {
                break;
            }
            lines.push(text);
        }
        let Some((line, headers)) = lines.split_first() else {
            return;
        };
        let request = RawRequest {
            line: line.clone(),
            headers: headers.to_vec(),
            connection,
        };
        let length: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let chunked = request
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(request);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let close = if chunked { "Connection: close\r\n" } else { "" };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n{close}\r\nok"
        );
        if reader.get_mut().write_all(answer.as_bytes()).await.is_err() || chunked {
            return;
        }
    }
}

/// An upstream that keeps, for each connection, every byte that came on it: it answers `200
/// ok` (closing the connection) once a request's head and a chunked body's last chunk are in,
/// and hands over the connection's bytes once Portcullis has closed it. For tests of the
/// bytes of a request body, which [`RawUpstream`] does not keep.
pub struct Uploads {
    addr: SocketAddr,
    received: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    task: JoinHandle<()>,
}

impl Uploads {
    pub async fn start() -> Uploads {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the uploads upstream");
        let addr = listener.local_addr().expect("uploads upstream address");
        let (sent, received) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(keep_upload(stream, sent.clone()));
            }
        });
        Uploads {
            addr,
            received,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`, to put in a route's `to`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bytes of the next connection to end, split into its head and what followed it;
    /// panics if none ends within 30 s.
    pub async fn next(&mut self) -> (String, String) {
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), self.received.recv())
            .await
            .expect("an upstream connection ended within 30 s")
            .expect("the uploads upstream runs");
        let text = String::from_utf8_lossy(&got).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, rest)) => (head.to_owned(), rest.to_owned()),
            None => (text, String::new()),
        }
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_upload(mut stream: TcpStream, sent: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut answered = false;
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        got.extend_from_slice(&buf[..n]);
        if got.len() > MAX_HEAD {
            break;
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
        let body_end =
            head_end.is_some_and(|at| got[at + 4..].windows(5).any(|w| w == b"0\r\n\r\n"));
        if body_end && !answered {
            answered = true;
            let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
            if stream.write_all(answer.as_bytes()).await.is_err() {
                break;
            }
        }
    }
    let _ = sent.send(got);
}

/// An upstream that answers every request's head with `answer`, byte for byte (an answer of
/// any shape a test needs, whether HTTP allows it or not), then holds the connection open for
/// two minutes; its address.
pub async fn answering(answer: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the answering upstream");
    let addr = listener.local_addr().expect("answering upstream address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                crate::client::read_request_head(&mut stream).await;
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                }
            });
        }
    });
    addr
}
