//! Responses from identity providers, read no further than a bound: discovery documents, key
//! sets, token and UserInfo responses. An IdP (or whatever answers in its name, for a key set
//! URL of a third-party issuer) sending without end cannot make Portcullis hold it all.

use std::future::Future;
use std::pin::Pin;

use openidconnect::{AsyncHttpClient, HttpClientError, HttpRequest, HttpResponse};

/// The largest response read from an identity provider. Key sets, discovery documents and
/// token responses are a few kB; a UserInfo response with every group of a large directory
/// stays well under this.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Why a response's body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// It is larger than the bound: an answer, of no use.
    #[error("the response is larger than {0} bytes")]
    TooLarge(usize),
    /// It did not arrive whole (the connection was cut, or timed out): no answer.
    #[error("{0}")]
    Cut(String),
}

impl From<BodyError> for String {
    fn from(e: BodyError) -> String {
        e.to_string()
    }
}

/// `response`'s body, or an error as soon as it is known to be larger than `limit` (at once
/// when `Content-Length` says so).
pub async fn body(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = (response.chunk().await).map_err(|e| BodyError::Cut(e.to_string()))? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Whether an IdP endpoint's answer of `status` is no answer of the endpoint's: one in trouble
/// ([`in_trouble`]), or one not there, sent elsewhere (a redirect to a maintenance page) or not
/// found (a gateway's 404 while the IdP is deployed, whose JSON, Spring's say, may hold an
/// `error` in its own words).
pub fn elsewhere(status: reqwest::StatusCode) -> bool {
    in_trouble(status) || status.is_redirection() || status == reqwest::StatusCode::NOT_FOUND
}

/// Whether an IdP's answer of `status` says it is in trouble (5xx, 429 Too Many Requests,
/// 408): an outage, whatever its body says. An endpoint refusing what it was sent answers 400
/// or 401 (RFC 6749 §5.2), 403 (RFC 6750 §3.1).
pub fn in_trouble(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
}

/// The HTTP client the OpenID Connect flows are given: reqwest's, with bounded responses.
#[derive(Clone)]
pub struct Client(pub reqwest::Client);

impl<'c> AsyncHttpClient<'c> for Client {
    type Error = HttpClientError<reqwest::Error>;
    type Future =
        Pin<Box<dyn Future<Output = Result<HttpResponse, Self::Error>> + Send + Sync + 'c>>;

    /// Refuses a URL that is not https (http only to a loopback host), as the issuer must be:
    /// a provider's discovery document names the rest (its keys, token and UserInfo
    /// endpoints), and any one over plain http could be answered by the network.
    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let url = request.uri().to_string();
            portcullis_config::check_fetch_url(&url).map_err(|e| {
                // Not quoted where it may hold a password (as configuration problems).
                let shown = if url.contains('@') {
                    "a URL holding `@`"
                } else {
                    url.as_str()
                };
                HttpClientError::Other(format!("{shown} {e}"))
            })?;
            let request = reqwest::Request::try_from(request).map_err(Box::new)?;
            // Said without the URL, which the discovery document gave: the page a sign-in
            // fails with shows why.
            let response =
                (self.0.execute(request).await).map_err(|e| Box::new(e.without_url()))?;
            // No answer, even one whose body reads as an OAuth error (Keycloak's 500
            // `{"error":"unknown_error"}`, a gateway's JSON error page, Spring's 404 `{"error":
            // "Not Found"}`): a refresh it ended, or a sign-in it refused, would be ended for
            // the IdP's outage.
            if elsewhere(response.status()) {
                return Err(HttpClientError::Other(format!(
                    "the IdP answered {}",
                    response.status()
                )));
            }
            let mut answer = http::Response::builder()
                .status(response.status())
                .version(response.version());
            for (name, value) in response.headers() {
                answer = answer.header(name, value);
            }
            let body = body(response, MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| HttpClientError::Other(e.to_string()))?;
            answer.body(body).map_err(HttpClientError::Http)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every connection with `chunks` chunks of 32 bytes and no length
    /// said in advance (chunked), as a server sending without end does; without its last
    /// chunk, and the connection closed, when `cut`.
    async fn chunked_server(chunks: usize) -> String {
        serve_chunks(chunks, false).await
    }

    async fn serve_chunks(chunks: usize, cut: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for _ in 0..chunks {
                    answer.extend_from_slice(format!("20\r\n{}\r\n", "x".repeat(32)).as_bytes());
                }
                if !cut {
                    answer.extend_from_slice(b"0\r\n\r\n");
                }
                let _ = stream.write_all(&answer).await;
            }
        });
        format!("http://{address}/")
    }

    /// A server that answers every connection with `head`, then sends 32-byte chunks until
    /// the client goes (`chunked`), or nothing more, holding the connection open: a body
    /// without end, or one that never comes.
    async fn endless_server(head: &'static str, chunked: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("20\r\n{}\r\n", "x".repeat(32));
                    while chunked && stream.write_all(chunk.as_bytes()).await.is_ok() {}
                    // Held open until the client goes.
                    let _ = stream.read(&mut request).await;
                });
            }
        });
        format!("http://{address}/")
    }

    #[tokio::test]
    async fn a_body_is_read_up_to_the_bound_and_no_further() {
        let url = chunked_server(3).await;
        let get = |url: String| async move { reqwest::get(&url).await.unwrap() };
        assert_eq!(
            body(get(url.clone()).await, 96).await.map(|b| b.len()).ok(),
            Some(96)
        );
        // No length said: refused as the chunks arrive past the bound, of a body without end
        // (read whole, it would never be done).
        let within = |read| tokio::time::timeout(std::time::Duration::from_secs(10), read);
        let endless = endless_server(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
        )
        .await;
        let read = within(body(get(endless).await, 64)).await;
        assert!(matches!(read, Ok(Err(BodyError::TooLarge(64)))), "{read:?}");
        // Said in advance: refused before reading (the body never comes).
        let said = endless_server(
            "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n",
            false,
        )
        .await;
        let read = within(body(get(said).await, 64)).await;
        assert!(matches!(read, Ok(Err(BodyError::TooLarge(64)))), "{read:?}");
        // Cut short: no answer, which a caller tells from one too large.
        let cut = serve_chunks(2, true).await;
        let response = reqwest::get(&cut).await.unwrap();
        assert!(matches!(body(response, 96).await, Err(BodyError::Cut(_))));
    }
}
