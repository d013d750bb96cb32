//! Bearer JWTs for machines (issue 4): client-credentials tokens from the real IdP accepted on
//! routes with `accept = ["bearer"]`, and every kind of bad token refused with 401: forged,
//! expired, for another audience, signed by an unknown key, `alg: none`, followed by trailing
//! bytes, or HMAC-signed with a public key. Forgeries are made with the `jsonwebtoken` crate
//! and keys this file generates; a second issuer whose key set this file serves shows that
//! the same keys are accepted when they should be, so each refusal is for the reason tested.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use portcullis_tests::idp::{jwt_claims, jwt_header, random_token};
use portcullis_tests::{Echo, IdpOutage, JwtIssuer, Route};
use rcgen::PublicKeyData as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::signin::{
    bare_client, client, header, now_unix, Fixture, Options, ALICE, ALICE_PASSWORD, API, API_AUD,
    BROWSER_ACCEPT, CLIENT_ID, MACHINE_ID, MACHINE_SECRET, OTHER_API, SESSION_COOKIE, SHORT_API,
};

/// The audience of the tokens of this file's own issuer.
const OWN_AUD: &str = "own-api";

/// Sends `GET url` with `Authorization: <authorization>`; returns the status and body.
async fn with_authorization(url: &str, authorization: &str) -> (StatusCode, String) {
    let resp = bare_client()
        .get(url)
        .header(AUTHORIZATION, authorization)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED {
        let challenge = header(&resp, WWW_AUTHENTICATE.as_str());
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer")),
            "a 401 without a Bearer challenge: {challenge:?}"
        );
    }
    (status, resp.text().await.unwrap_or_default())
}

async fn bearer(url: &str, token: &str) -> (StatusCode, String) {
    with_authorization(url, &format!("Bearer {token}")).await
}

/// Asserts `token` is accepted on `url` and the upstream answered; returns its echo.
async fn assert_accepted(url: &str, token: &str, what: &str) -> Echo {
    let (status, body) = bearer(url, token).await;
    assert_eq!(status, StatusCode::OK, "{what} must be accepted: {body}");
    Echo::parse(body.as_bytes())
}

async fn assert_refused(url: &str, token: &str, what: &str) {
    let (status, body) = bearer(url, token).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "{what} must be refused: {body}"
    );
}

/// Asserts `token` is refused unchecked on `url`: its issuer's keys cannot be had (503, to try
/// again; not `invalid_token`, which would have its client throw it away).
async fn assert_unchecked(url: &str, token: &str, what: &str) {
    let (status, body) = bearer(url, token).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what} must be refused unchecked: {body}"
    );
    assert!(body.contains("temporarily_unavailable"), "{what}: {body}");
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT made by hand from a header and claims, with `signature` as its third part.
fn hand_made(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// `alg: none` variants of a token with `claims`.
fn unsigned_tokens(claims: &Value, kid: &str, some_signature: &str) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({ "alg": alg, "typ": "JWT" });
        tokens.push((
            format!("alg {alg}, empty signature"),
            hand_made(&header, claims, ""),
        ));
        tokens.push((
            format!("alg {alg}, no signature part"),
            hand_made(&header, claims, "")
                .trim_end_matches('.')
                .to_owned(),
        ));
        tokens.push((
            format!("alg {alg} with a kid and a signature"),
            hand_made(
                &json!({ "alg": alg, "typ": "JWT", "kid": kid }),
                claims,
                some_signature,
            ),
        ));
    }
    tokens
}

/// A valid token followed by bytes that are not part of it.
fn with_trailing_bytes(token: &str) -> Vec<(String, String)> {
    [
        ".", "..", "=", "==", ".x", "x", ".e30", " garbage", ",x", ";x", "\\",
    ]
    .iter()
    .map(|tail| (format!("token + {tail:?}"), format!("{token}{tail}")))
    .collect()
}

/// The same token with its claims replaced (the signature kept).
fn tampered(token: &str, change: impl Fn(&mut Value)) -> String {
    let mut claims = jwt_claims(token);
    change(&mut claims);
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// HS256 tokens keyed with each usual encoding of a public key.
fn hmac_with(claims: &Value, kid: &str, secrets: &[(&str, Vec<u8>)]) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    for (name, secret) in secrets {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut header = Header::new(alg);
            header.kid = Some(kid.to_owned());
            let token =
                jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap();
            tokens.push((
                format!("{alg:?} keyed with the public key as {name}"),
                token,
            ));
        }
    }
    tokens
}

// ----- keys of our own ---------------------------------------------------------------------

/// A signing key this test generated, with its public halves in the usual encodings.
struct OwnKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
    spki_der: Vec<u8>,
    spki_pem: String,
    raw: Vec<u8>,
}

impl OwnKey {
    /// A token of `iss` for the agent `agent-9` (its client), for this file's audience, living
    /// ten minutes from now.
    fn agent_9_token(&self, iss: &str) -> String {
        let now = now_unix();
        self.sign(
            Some(&self.kid),
            &json!({
                "iss": iss, "aud": OWN_AUD, "sub": "agent-9", "client_id": "agent-9",
                "iat": now, "exp": now + 600,
            }),
        )
    }

    fn es256(kid: &str) -> OwnKey {
        OwnKey::generate(kid, &rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256)
    }

    fn ed25519(kid: &str) -> OwnKey {
        OwnKey::generate(kid, &rcgen::PKCS_ED25519, Algorithm::EdDSA)
    }

    fn generate(kid: &str, rc: &'static rcgen::SignatureAlgorithm, alg: Algorithm) -> OwnKey {
        let pair = rcgen::KeyPair::generate_for(rc).expect("generate a key");
        // PKCS#8 DER, which is what jsonwebtoken's signers read.
        let pkcs8 = pair.serialize_der();
        let raw = pair.public_key_raw();
        let (encoding, jwk) = match alg {
            Algorithm::EdDSA => (
                EncodingKey::from_ed_der(&pkcs8),
                json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(raw) }),
            ),
            _ => {
                // An uncompressed P-256 point: 0x04 ‖ X ‖ Y.
                assert_eq!(raw.len(), 65);
                (
                    EncodingKey::from_ec_der(&pkcs8),
                    json!({ "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]) }),
                )
            }
        };
        let mut jwk = jwk;
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(format!("{alg:?}"));
        let jwk: Jwk = serde_json::from_value(jwk).expect("a JWK");
        OwnKey {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
            spki_der: pair.subject_public_key_info(),
            spki_pem: pair.public_key_pem(),
            raw: pair.public_key_raw().to_vec(),
        }
    }

    /// Signs `claims` with this key, naming `kid` in the header (or none).
    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }

    /// The public key in the encodings an attacker would try as an HMAC secret.
    fn public_encodings(&self) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("SPKI PEM", self.spki_pem.clone().into_bytes()),
            ("SPKI DER", self.spki_der.clone()),
            ("raw point", self.raw.clone()),
            (
                "JWK JSON",
                serde_json::to_vec(&self.jwk).expect("JWK serializes"),
            ),
        ]
    }
}

/// A tiny HTTP server publishing a key set at every path, counting fetches.
struct KeyServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl KeyServer {
    async fn start(jwks: &JwkSet) -> KeyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let body = Arc::new(Mutex::new(serde_json::to_string(jwks).expect("JWKS JSON")));
        let published = body.clone();
        let fetches = Arc::new(AtomicUsize::new(0));
        let counter = fetches.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let body = body.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let text = body.lock().expect("JWKS body").clone();
                        async move {
                            let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                            resp.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        KeyServer {
            addr,
            body: published,
            fetches,
            task,
        }
    }

    /// Publishes `jwks` from now on (the issuer rotated).
    fn publish(&self, jwks: &JwkSet) {
        *self.body.lock().expect("JWKS body") = serde_json::to_string(jwks).expect("JWKS JSON");
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    fn jwks_uri(&self) -> String {
        format!("http://127.0.0.1:{}/keys.json", self.addr.port())
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----- the IdP's public RSA key as PEM, for the HMAC confusion attack ------------------------

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    let mut content = Vec::new();
    if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend(trimmed);
    der(0x02, &content)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// An RSA JWK's public key as (SPKI PEM, PKCS#1 PEM, SPKI DER, PKCS#1 DER, modulus).
fn rsa_public_encodings(jwk: &Jwk) -> (String, String, Vec<u8>, Vec<u8>, Vec<u8>) {
    let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
        panic!("not an RSA key: {jwk:?}");
    };
    let n = URL_SAFE_NO_PAD.decode(&rsa.n).unwrap();
    let e = URL_SAFE_NO_PAD.decode(&rsa.e).unwrap();
    let pkcs1 = der(0x30, &[der_uint(&n), der_uint(&e)].concat());
    let rsa_encryption = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend(&pkcs1);
    let spki = der(
        0x30,
        &[der(0x30, &rsa_encryption), der(0x03, &bits)].concat(),
    );
    (
        pem("PUBLIC KEY", &spki),
        pem("RSA PUBLIC KEY", &pkcs1),
        spki,
        pkcs1,
        n,
    )
}

// ----- (d) a real machine token --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_client_credentials_token_from_the_idp_is_accepted_on_machine_routes() {
    let fx = Fixture::start_with(Options {
        ..Options::default()
    })
    .await;
    let token = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_eq!(jwt_claims(&token)["aud"], API_AUD);

    let echo = assert_accepted(
        &fx.url("api.test", "/v1/jobs?state=queued"),
        &token,
        "the token",
    )
    .await;
    assert_eq!(echo.upstream, "api");
    assert_eq!(echo.uri, "/v1/jobs?state=queued");
    // Also on a route taking sessions and tokens, and with the scheme in any case.
    assert_accepted(&fx.url("both.test", "/v1/jobs"), &token, "the token").await;
    let (status, _) =
        with_authorization(&fx.url("api.test", "/v1"), &format!("bearer {token}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the auth scheme is case-insensitive"
    );
    let (status, _) =
        with_authorization(&fx.url("api.test", "/v1"), &format!("Bearer   {token}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "RFC 6750 puts one or more spaces before the token"
    );
    // POSTs too: a machine is not a browser.
    let resp = bare_client()
        .post(fx.url("api.test", "/v1/jobs"))
        .bearer_auth(&token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // /me knows it is a machine.
    let (status, body) = bearer(&fx.url("api.test", "/.portcullis/me"), &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let me: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(me["kind"], "machine", "{me}");
    assert!(
        me["subject"].as_str().is_some_and(|s| !s.is_empty()),
        "{me}"
    );

    // Where tokens are not accepted, a token is not a credential.
    assert_refused(
        &fx.app_url("/page"),
        &token,
        "a token on a session-only route",
    )
    .await;
    let resp = bare_client()
        .get(fx.app_url("/page"))
        .bearer_auth(&token)
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::FOUND,
        "a navigation with a token to a session-only route is sent to sign in"
    );

    // A session is not a credential where only tokens are accepted, and where both are, a
    // request presenting a token is judged by the token alone. (Signed in on that route's
    // host: a session in a cookie per host is its host's alone.)
    let alice = fx
        .sign_in(&client(), &fx.url("both.test", "/"), ALICE, ALICE_PASSWORD)
        .await;
    let with_cookie = |url: String, authorization: Option<String>| {
        let cookie = format!("{SESSION_COOKIE}={}", alice.cookie);
        async move {
            let mut request = bare_client()
                .get(&url)
                .header(COOKIE, cookie)
                .header(ACCEPT, "application/json");
            if let Some(a) = authorization {
                request = request.header(AUTHORIZATION, a);
            }
            request.send().await.unwrap().status()
        }
    };
    assert_eq!(
        with_cookie(fx.url("api.test", "/v1"), None).await,
        StatusCode::UNAUTHORIZED,
        "a session on a bearer-only route"
    );
    assert_eq!(
        with_cookie(fx.url("both.test", "/v1"), None).await,
        StatusCode::OK,
        "a session on a route taking both"
    );
    assert_eq!(
        with_cookie(
            fx.url("both.test", "/v1"),
            Some("Bearer not.a.token".into())
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "a bad token next to a good session"
    );

    // Two Authorization headers are not two chances.
    let resp = bare_client()
        .get(fx.url("api.test", "/v1"))
        .header(AUTHORIZATION, "Bearer not.a.token")
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Other schemes are not bearer tokens.
    let (status, _) =
        with_authorization(&fx.url("api.test", "/v1"), &format!("Basic {token}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = with_authorization(&fx.url("api.test", "/v1"), &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        fx.api.seen().len(),
        6,
        "only the accepted requests reached the upstream"
    );
}

// ----- (e) bad tokens ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn forged_expired_and_misaddressed_tokens_of_the_idp_are_refused() {
    let fx = Fixture::start_with(Options {
        idp_issuer_settings: vec![("leeway", "\"0s\"")],
        ..Options::default()
    })
    .await;
    let url = fx.url("api.test", "/v1/secrets");
    let good = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_accepted(&url, &good, "a valid token").await;
    let claims = jwt_claims(&good);
    let rs_kid = jwt_header(&good)["kid"].as_str().unwrap().to_owned();
    let signature = good.split('.').nth(2).unwrap().to_owned();
    let jwks = fx.idp.jwks().await;
    let rsa_jwk = jwks
        .find(&rs_kid)
        .expect("the RS256 key is published")
        .clone();
    let es_kid = jwks
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .find(|k| *k != rs_kid)
        .expect("an ES256 key is published");

    let mut bad: Vec<(String, String)> = Vec::new();

    // Wrong audience: a real token of the same IdP, for another resource.
    let other = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(OTHER_API))
        .await;
    assert_ne!(jwt_claims(&other)["aud"], API_AUD);
    bad.push(("a token for another audience".into(), other));

    // An ID token of the same IdP: its audience is the client, not the API.
    let tokens = fx.code_flow_tokens(ALICE, ALICE_PASSWORD).await;
    bad.push((
        "an ID token".into(),
        tokens["id_token"].as_str().unwrap().to_owned(),
    ));
    bad.push((
        "the IdP's opaque or JWT access token for userinfo".into(),
        tokens["access_token"].as_str().unwrap().to_owned(),
    ));

    // The real token with its claims changed.
    bad.push((
        "a tampered subject".into(),
        tampered(&good, |c| c["sub"] = json!("admin")),
    ));
    bad.push((
        "a tampered expiry".into(),
        tampered(&good, |c| c["exp"] = json!(now_unix() + 86_400 * 365)),
    ));
    let mut broken = good.clone();
    broken.truncate(broken.len() - 6);
    broken.push_str("AAAAAA");
    bad.push(("a broken signature".into(), broken));

    // Signed by a key of ours, naming the IdP as issuer.
    let rogue = OwnKey::es256("rogue");
    bad.push((
        "a key the IdP never published".into(),
        rogue.sign(Some("rogue"), &claims),
    ));
    bad.push((
        "a key of ours under the IdP's ES256 kid".into(),
        rogue.sign(Some(&es_kid), &claims),
    ));
    bad.push((
        "a key of ours under the IdP's RS256 kid".into(),
        rogue.sign(Some(&rs_kid), &claims),
    ));
    bad.push((
        "a key of ours without a kid".into(),
        rogue.sign(None, &claims),
    ));
    let mut unknown_issuer = claims.clone();
    unknown_issuer["iss"] = json!("http://127.0.0.1:1");
    bad.push((
        "an issuer Portcullis does not know".into(),
        rogue.sign(Some("rogue"), &unknown_issuer),
    ));

    // alg: none.
    bad.extend(unsigned_tokens(&claims, &rs_kid, &signature));

    // HMAC keyed with the IdP's public RSA key. The DER built here is right: it verifies the
    // IdP's real token.
    let (spki_pem, pkcs1_pem, spki_der, pkcs1_der, modulus) = rsa_public_encodings(&rsa_jwk);
    let mut check = Validation::new(Algorithm::RS256);
    check.set_audience(&[API_AUD]);
    jsonwebtoken::decode::<Value>(&good, &DecodingKey::from_rsa_der(&pkcs1_der), &check)
        .expect("the hand-built DER is the IdP's key");
    bad.extend(hmac_with(
        &claims,
        &rs_kid,
        &[
            ("SPKI PEM", spki_pem.into_bytes()),
            ("PKCS#1 PEM", pkcs1_pem.into_bytes()),
            ("SPKI DER", spki_der),
            ("PKCS#1 DER", pkcs1_der),
            ("modulus", modulus),
            ("JWK JSON", serde_json::to_vec(&rsa_jwk).unwrap()),
        ],
    ));

    // Trailing bytes.
    bad.extend(with_trailing_bytes(&good));

    for (what, token) in &bad {
        assert_refused(&url, token, what).await;
    }
    assert_accepted(&url, &good, "the valid token, still").await;

    // Expired: a real token living 8 s, with no leeway configured, stops working.
    let short = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(SHORT_API))
        .await;
    let exp = jwt_claims(&short)["exp"].as_u64().unwrap();
    assert_accepted(&url, &short, "a short-lived token, still valid").await;
    let deadline = Instant::now() + Duration::from_secs(crate::signin::SHORT_TTL + 10);
    loop {
        // Read before it is sent: a 200 says the token held when Portcullis answered, and
        // the answer may be read late on a loaded machine.
        let sent = now_unix();
        let (status, body) = bearer(&url, &short).await;
        if status == StatusCode::UNAUTHORIZED {
            // (Read after the answer: no earlier than Portcullis' own reading of the clock.)
            assert!(
                now_unix() >= exp,
                "refused before its expiry at {exp}: {body}"
            );
            break;
        }
        // A request let in the second before expiry has its response checked again; in the
        // next second the token has expired and the request is cut, closed, with a 403 page
        // (or, before the answer began, a 403 saying why).
        let cut_at_expiry = status == StatusCode::FORBIDDEN
            && (body.contains("could not be completed") || body.contains("token has expired"))
            && now_unix() >= exp;
        assert!(
            status == StatusCode::OK || cut_at_expiry,
            "{status}: {body}"
        );
        assert!(
            (status != StatusCode::OK || sent <= exp) && Instant::now() < deadline,
            "a token that expired at {exp} is still accepted at {}",
            now_unix()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_refused(&url, &short, "an expired token").await;
}

/// Where the sign-in provider's bearer tokens may be for the sign-in client too (an Entra API
/// in the same app registration), an ID token verifies as one; it is still no credential: it
/// travels through the browser at sign-out (`id_token_hint`) and outlives the session.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_token_is_no_bearer_token_even_where_its_audience_is_accepted() {
    let fx = Fixture::start_with(Options {
        more_idp_audiences: vec![CLIENT_ID],
        ..Options::default()
    })
    .await;
    let tokens = fx.code_flow_tokens(ALICE, ALICE_PASSWORD).await;
    let id_token = tokens["id_token"].as_str().unwrap();
    let claims = jwt_claims(id_token);
    assert_eq!(claims["aud"], CLIENT_ID, "{claims}");
    assert!(claims.get("nonce").is_some(), "{claims}");
    let url = fx.url("api.test", "/v1/jobs");
    assert_refused(&url, id_token, "an ID token of the sign-in client").await;
    // The IdP's access tokens for the API still pass.
    let token = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_accepted(&url, &token, "a client-credentials token").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_signed_with_keys_the_issuer_publishes_follow_its_rules() {
    // A second issuer whose keys are ours: an ES256 key and an Ed25519 key are published,
    // but only ES256 is allowed.
    let es = OwnKey::es256("own-es256");
    let ed = OwnKey::ed25519("own-ed25519");
    let keys = KeyServer::start(&JwkSet {
        keys: vec![es.jwk.clone(), ed.jwk.clone()],
    })
    .await;
    let fx = Fixture::start_with(Options {
        extra_issuers: vec![JwtIssuer::new(&keys.issuer(), &[OWN_AUD, "own-api-2"])
            .jwks_uri(&keys.jwks_uri())
            .set("algorithms", "[\"ES256\"]")],
        // An API that takes only tokens minted for it, of the issuer's two audiences.
        extra_routes: vec![|api| {
            Route::new("http://api2.test", &[api])
                .accept(&["bearer"])
                .any_signed_in()
                .set("audiences = [\"own-api-2\"]")
        }],
        ..Options::default()
    })
    .await;
    let url = fx.url("api.test", "/v1/own");
    let now = now_unix();
    let claims = |change: &dyn Fn(&mut Value)| {
        let mut c = json!({
            "iss": keys.issuer(),
            "aud": OWN_AUD,
            "sub": "agent-7",
            "client_id": "agent-7",
            "iat": now,
            "exp": now + 600,
        });
        change(&mut c);
        c
    };
    let valid = es.sign(Some(&es.kid), &claims(&|_| {}));
    let typed = |typ: &str| {
        let mut header = Header::new(es.alg);
        header.kid = Some(es.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, &claims(&|_| {}), &es.encoding).expect("sign")
    };

    // What must be accepted (so the refusals below are for the reason named).
    assert_accepted(&url, &valid, "a valid token of our own issuer").await;
    let (_, body) = bearer(&fx.url("api.test", "/.portcullis/me"), &valid).await;
    let me: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(me["kind"], "machine", "{me}");
    assert_eq!(me["subject"], "agent-7", "{me}");
    for (what, token) in [
        (
            "an audience list holding ours",
            es.sign(
                Some(&es.kid),
                &claims(&|c| c["aud"] = json!(["someone", OWN_AUD])),
            ),
        ),
        (
            "the second audience",
            es.sign(Some(&es.kid), &claims(&|c| c["aud"] = json!("own-api-2"))),
        ),
        (
            "expired 20 s ago, within the default 60 s leeway",
            es.sign(Some(&es.kid), &claims(&|c| c["exp"] = json!(now - 20))),
        ),
        (
            "not before 20 s from now, within the leeway",
            es.sign(Some(&es.kid), &claims(&|c| c["nbf"] = json!(now + 20))),
        ),
        (
            // RFC 7519 §2: a NumericDate may be a non-integer value.
            "dates with fractions of a second",
            es.sign(
                Some(&es.kid),
                &claims(&|c| {
                    c["iat"] = json!(now as f64 - 0.25);
                    c["nbf"] = json!(now as f64 - 1.5);
                    c["exp"] = json!(now as f64 + 600.75);
                }),
            ),
        ),
    ] {
        assert_accepted(&url, &token, what).await;
    }

    let mut bad: Vec<(String, String)> = vec![
        (
            "expired 10 minutes ago".into(),
            es.sign(Some(&es.kid), &claims(&|c| c["exp"] = json!(now - 600))),
        ),
        (
            "expired 10 minutes ago, with a fraction of a second".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| c["exp"] = json!(now as f64 - 600.5)),
            ),
        ),
        (
            "issued 10 minutes from now, with a fraction of a second".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| c["iat"] = json!(now as f64 + 600.5)),
            ),
        ),
        (
            "not valid for 10 minutes".into(),
            es.sign(Some(&es.kid), &claims(&|c| c["nbf"] = json!(now + 600))),
        ),
        (
            "without exp".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
        ),
        (
            "without sub".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
            ),
        ),
        (
            "without aud".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
            ),
        ),
        (
            "for another audience".into(),
            es.sign(Some(&es.kid), &claims(&|c| c["aud"] = json!("own-api-3"))),
        ),
        (
            "for an audience that merely starts like ours".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| c["aud"] = json!("own-api-extra")),
            ),
        ),
        (
            "an issuer with a trailing slash".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| c["iss"] = json!(format!("{}/", keys.issuer()))),
            ),
        ),
        (
            "our key naming the IdP as issuer".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| c["iss"] = json!(fx.idp.issuer())),
            ),
        ),
        (
            "EdDSA: a published key, but not an allowed algorithm".into(),
            ed.sign(Some(&ed.kid), &claims(&|_| {})),
        ),
        (
            "an unknown kid".into(),
            es.sign(Some("own-es256-next"), &claims(&|_| {})),
        ),
        (
            "a rogue key under our kid".into(),
            OwnKey::es256("x").sign(Some(&es.kid), &claims(&|_| {})),
        ),
        (
            "a tampered subject".into(),
            tampered(&valid, |c| c["sub"] = json!("root")),
        ),
        (
            // `iat` dates it against its user's record: one from the future could outlast
            // a re-activation it came before.
            "issued 10 minutes from now".into(),
            es.sign(Some(&es.kid), &claims(&|c| c["iat"] = json!(now + 600))),
        ),
        (
            "a logout token (events)".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| {
                    c["events"] = json!({"http://schemas.openid.net/event/backchannel-logout": {}})
                }),
            ),
        ),
        (
            // RFC 9449 §7.2: a DPoP-bound token sent as a bearer token may be a stolen one.
            "bound to a key (cnf)".into(),
            es.sign(
                Some(&es.kid),
                &claims(&|c| {
                    c["cnf"] = json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"})
                }),
            ),
        ),
        (
            "another type of token (typ logout+jwt)".into(),
            typed("logout+jwt"),
        ),
        ("a DPoP proof (typ dpop+jwt)".into(), typed("dpop+jwt")),
        ("critical header extensions (crit)".into(), {
            let mut header = Header::new(es.alg);
            header.kid = Some(es.kid.clone());
            header.crit = Some(vec!["urn:example:must-understand".to_owned()]);
            let mut c = claims(&|_| {});
            c["urn:example:must-understand"] = json!(true);
            jsonwebtoken::encode(&header, &c, &es.encoding).expect("sign")
        }),
    ];
    bad.extend(unsigned_tokens(
        &claims(&|_| {}),
        &es.kid,
        valid.split('.').nth(2).unwrap(),
    ));
    bad.extend(hmac_with(&claims(&|_| {}), &es.kid, &es.public_encodings()));
    bad.extend(hmac_with(&claims(&|_| {}), &ed.kid, &ed.public_encodings()));
    bad.extend(with_trailing_bytes(&valid));
    for (what, token) in &bad {
        assert_refused(&url, token, what).await;
    }
    assert_accepted(&url, &valid, "the valid token, still").await;
    assert_accepted(&url, &typed("application/at+jwt"), "an access token's type").await;
    assert_accepted(&url, &typed("JOSE"), "RFC 7515's own type").await;
    assert_accepted(&url, &typed("Application/AT+JWT"), "a type in any case").await;
    // A route's own audiences: a token minted for another API of the issuer is not taken
    // there (RFC 8725 §3.9), though it verifies.
    let api2 = fx.url("api2.test", "/v1/own");
    assert_refused(
        &api2,
        &valid,
        "a token for own-api on a route for own-api-2",
    )
    .await;
    // Recorded by whose token it is, as a replay of a token for another API would be.
    let audited = fx
        .px
        .audit_log_until(Duration::from_secs(10), |text| {
            text.contains("none of this route's audiences")
        })
        .await;
    assert!(
        audited
            .lines()
            .any(|line| line.contains("none of this route's audiences")
                && line.contains("agent-7@")
                && line.contains("\"refusal\"")),
        "the refused token is not in the audit log:\n{audited}"
    );
    let for_api2 = es.sign(
        Some(&es.kid),
        &claims(&|c| c["aud"] = json!(["x", "own-api-2"])),
    );
    assert_accepted(&api2, &for_api2, "a token for own-api-2").await;
    assert_accepted(
        &url,
        &for_api2,
        "the same on a route for any of the issuer's",
    )
    .await;
    // Unknown kids refetch the key set, but not once per request.
    assert!(
        keys.fetches() <= 3,
        "the key set was fetched {} times",
        keys.fetches()
    );
}

// ----- (c) key rotation, for machines ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_follow_idp_key_rotation_without_a_restart() {
    let fx = Fixture::start_with(Options {
        ..Options::default()
    })
    .await;
    let url = fx.url("api.test", "/v1");
    let before = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_accepted(&url, &before, "a token before the rotation").await;
    let fetched = Instant::now();

    // Refetches may be rate-limited (10 s); let that pass, then rotate, dropping old keys.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(fetched.elapsed())).await;
    fx.idp.rotate_keys(false).await;
    let after = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_ne!(jwt_header(&after)["kid"], jwt_header(&before)["kid"]);
    assert_accepted(&url, &after, "a token signed with the new key").await;
    assert_refused(&url, &before, "a token signed with a key the IdP withdrew").await;
    assert_accepted(&url, &after, "the new token, again").await;
}

/// A graceful stop keeps open connections for as long as its drain lasts (`shutdown_timeout`),
/// and the IdP's key sets are fetched again meanwhile: a websocket whose token's key the IdP
/// withdraws after the `SIGTERM` ends once the set is `jwks_refresh` old, not with the drain.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_withdrawn_during_a_graceful_stop_still_ends_the_websockets_it_opened() {
    let fx = Fixture::start_with(Options {
        idp_issuer_settings: vec![("jwks_refresh", "\"10s\"")],
        server_settings: vec![("shutdown_timeout", "\"120s\"")],
        extra_routes: vec![|api| {
            Route::new("http://api.test/ws", &[api])
                .accept(&["bearer"])
                .websockets(true)
                .any_signed_in()
        }],
        ..Options::default()
    })
    .await;
    let token = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    let bearer = format!("Bearer {token}");
    let addr = fx.cfg.http_addr();
    let mut ws =
        portcullis_tests::client::websocket(addr, "api.test", "/ws", ("authorization", &bearer))
            .await;
    fx.px.signal(nix::sys::signal::Signal::SIGTERM);
    fx.idp.rotate_keys(false).await;
    // 10 s after the last fetch, and a second to look; what more is allowed is for a loaded
    // machine, far below the drain's 120 s.
    assert!(
        portcullis_tests::client::closed_within(&mut ws, Duration::from_secs(30)).await,
        "the websocket was still open 30 s after the IdP withdrew its token's key"
    );
}

/// A key the IdP withdraws stops verifying once the key set is `jwks_refresh` old, though no
/// token names a new key (which would have Portcullis fetch the set at once).
#[tokio::test(flavor = "multi_thread")]
async fn a_key_the_idp_withdraws_stops_verifying_within_jwks_refresh() {
    let fx = Fixture::start_with(Options {
        idp_issuer_settings: vec![("jwks_refresh", "\"10s\"")],
        ..Options::default()
    })
    .await;
    let url = fx.url("api.test", "/v1");
    let before = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_accepted(&url, &before, "a token before the rotation").await;
    fx.idp.rotate_keys(false).await;
    let rotated = Instant::now();

    // Refused once the set is fetched again: 10 s after the last fetch, and a second to look
    // (what more is allowed is for a loaded machine; a set refreshed at three times the
    // setting fails).
    let deadline = rotated + Duration::from_secs(25);
    loop {
        let (status, body) = bearer(&url, &before).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            Instant::now() < deadline,
            "a token signed with a withdrawn key still verifies 25 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_accepted(&url, &after, "a token signed with the new key").await;
}

// ----- the IdP down ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_keep_working_on_the_last_good_keys_while_the_idp_is_down() {
    let fx = Fixture::start().await;
    let url = fx.url("api.test", "/v1");
    let token = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_accepted(&url, &token, "a token").await;
    let fetched = Instant::now();
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(fetched.elapsed())).await;

    fx.idp.set_outage(IdpOutage::Unavailable).await;
    // An unknown kid makes Portcullis try to refetch the keys, which fails…
    let mut header = jwt_header(&token);
    header["kid"] = json!(format!("unknown-{}", random_token(4)));
    let unknown = hand_made(
        &header,
        &jwt_claims(&token),
        token.split('.').nth(2).unwrap(),
    );
    // Not checked, as the keys cannot be had: told to come back, not that the token is bad
    // (RFC 6750's `invalid_token` has a client throw it away and fetch another).
    // `/.portcullis/me` says the same.
    for at in [url.clone(), fx.url("api.test", "/.portcullis/me")] {
        let resp = bare_client()
            .get(&at)
            .header(AUTHORIZATION, format!("Bearer {unknown}"))
            .header(ACCEPT, "application/json")
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{at}");
        assert_eq!(resp.headers()["retry-after"], "10", "{at}");
        if at == url {
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert!(!resp.headers().contains_key("www-authenticate"));
        }
    }
    // … and the keys it had are kept: the token keeps working, and so do new ones' checks.
    assert_accepted(&url, &token, "a valid token during an outage").await;
    fx.idp.set_outage(IdpOutage::Reset).await;
    assert_accepted(
        &url,
        &token,
        "a valid token while the IdP resets connections",
    )
    .await;
    fx.idp.outage(false).await;
    assert_accepted(&url, &token, "a valid token after the outage").await;
}

// ----- the documented default algorithm list ------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn idp_tokens_are_accepted_with_the_default_algorithm_list() {
    // No `algorithms` in [[jwt_issuers]]: the README's default applies.
    let fx = Fixture::start().await;
    let token = fx
        .idp
        .client_credentials_token(MACHINE_ID, MACHINE_SECRET, Some(API))
        .await;
    assert_eq!(jwt_header(&token)["alg"], "RS256");
    assert_accepted(
        &fx.url("api.test", "/v1"),
        &token,
        "an RS256 token of the IdP",
    )
    .await;
    // An ES256 key of our own issuer, also on the default list.
    let es = OwnKey::es256("own-es256");
    let keys = KeyServer::start(&JwkSet {
        keys: vec![es.jwk.clone()],
    })
    .await;
    let own = Fixture::start_with(Options {
        extra_issuers: vec![JwtIssuer::new(&keys.issuer(), &[OWN_AUD]).jwks_uri(&keys.jwks_uri())],
        ..Options::default()
    })
    .await;
    let now = now_unix();
    let token = es.sign(
        Some(&es.kid),
        // A client-credentials token, as RFC 9068 shapes one: its `sub` is the client's id.
        &json!({
            "iss": keys.issuer(), "aud": OWN_AUD, "sub": "agent", "client_id": "agent",
            "exp": now + 600,
        }),
    );
    assert_accepted(&own.url("api.test", "/v1"), &token, "an ES256 token").await;
}

/// An HTTP proxy as a locked-down network has one: it tunnels each CONNECT (to this machine,
/// whatever host it names) and refuses anything else, recording every request line.
struct ConnectProxy {
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let head = portcullis_tests::client::read_request_head(&mut client).await;
                    let head = String::from_utf8_lossy(&head);
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    seen.lock().expect("lines").push(line.clone());
                    let port = (line.strip_prefix("CONNECT "))
                        .and_then(|target| target.split_whitespace().next()?.rsplit_once(':'))
                        .and_then(|(_, port)| port.parse::<u16>().ok());
                    let Some(port) = port else {
                        let refused = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n";
                        let _ = client.write_all(refused).await;
                        return;
                    };
                    let Ok(mut upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    let open = b"HTTP/1.1 200 Connection established\r\n\r\n";
                    if client.write_all(open).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        ConnectProxy { addr, lines, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the environment names an https proxy (`HTTPS_PROXY`, as a network that lets nothing
/// out directly has), an issuer's keys elsewhere are fetched through it, their TLS checked end to
/// end; nothing to this machine goes through a proxy, the sign-in provider's plain http (with its
/// client secret) above all, whatever `HTTP_PROXY` and `ALL_PROXY` say.
#[tokio::test(flavor = "multi_thread")]
async fn keys_elsewhere_go_through_the_environment_s_https_proxy_and_nothing_here_does() {
    let es = OwnKey::es256("proxied");
    let keys = KeyServer::start(&JwkSet {
        keys: vec![es.jwk.clone()],
    })
    .await;
    let ca = portcullis_tests::TestCa::new();
    let tls =
        portcullis_tests::TlsTerminator::start(&ca.leaf("keys", &["keys.test"]), keys.addr).await;
    let here =
        portcullis_tests::TlsTerminator::start(&ca.leaf("here", &["localhost"]), keys.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, ca.ca_pem()).unwrap();
    let ca_pem = format!("{:?}", pem.display().to_string());
    let proxy = ConnectProxy::start().await;
    let (proxied, local) = ("https://proxied.example", "https://local.example");
    let mut env: Vec<(&str, String)> = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]
        .into_iter()
        .chain(["ALL_PROXY"])
        .map(|name| (name, proxy.url()))
        .collect();
    // Not the runner's own exceptions.
    env.extend(["NO_PROXY", "no_proxy"].map(|name| (name, "x.invalid".to_owned())));
    let uri = |host: &str, port: u16| format!("https://{host}:{port}/keys.json");
    let fx = Fixture::start_with(Options {
        extra_issuers: vec![
            JwtIssuer::new(proxied, &[OWN_AUD])
                .jwks_uri(&uri("keys.test", tls.addr().port()))
                .set("tls_ca", &ca_pem),
            JwtIssuer::new(local, &[OWN_AUD])
                .jwks_uri(&uri("localhost", here.addr().port()))
                .set("tls_ca", &ca_pem),
            JwtIssuer::new(&keys.issuer(), &[OWN_AUD]).jwks_uri(&keys.jwks_uri()),
        ],
        env,
        ..Options::default()
    })
    .await;
    let url = fx.url("api.test", "/v1/own");
    let token = |iss: &str| es.agent_9_token(iss);
    assert_accepted(&url, &token(proxied), "keys fetched through the proxy").await;
    assert_accepted(&url, &token(local), "keys fetched here over https").await;
    assert_accepted(&url, &token(&keys.issuer()), "keys fetched here").await;
    // A person signs in at the IdP on this machine: discovery, the code's exchange, UserInfo.
    let page = fx.url("app.test", "/page");
    fx.sign_in(&client(), &page, ALICE, ALICE_PASSWORD).await;
    let tunnel = format!("CONNECT keys.test:{} HTTP/1.1", tls.addr().port());
    let lines = proxy.lines();
    assert!(
        !lines.is_empty() && lines.iter().all(|line| *line == tunnel),
        "the proxy saw {lines:?}, where only {tunnel:?} goes through it"
    );
}

/// An issuer whose keys are served over https under a private CA (an internal Keycloak, say)
/// is trusted by its `tls_ca`, never by the bundled roots, and no longer once a reload names
/// another CA (one no longer trusted, after a compromise).
#[tokio::test(flavor = "multi_thread")]
async fn an_issuer_behind_a_private_ca_is_trusted_under_its_tls_ca() {
    let es = OwnKey::es256("private-ca");
    let keys = KeyServer::start(&JwkSet {
        keys: vec![es.jwk.clone()],
    })
    .await;
    let (private, other) = (
        portcullis_tests::TestCa::new(),
        portcullis_tests::TestCa::new(),
    );
    let tls =
        portcullis_tests::TlsTerminator::start(&private.leaf("keys", &["127.0.0.1"]), keys.addr)
            .await;
    let jwks_uri = format!("https://127.0.0.1:{}/keys.json", tls.addr().port());
    let dir = tempfile::tempdir().unwrap();
    let (private_pem, other_pem) = (dir.path().join("private.pem"), dir.path().join("other.pem"));
    std::fs::write(&private_pem, private.ca_pem()).unwrap();
    std::fs::write(&other_pem, other.ca_pem()).unwrap();
    let toml_path = |pem: &std::path::Path| format!("{:?}", pem.display().to_string());
    // The same keys, also for an issuer that names no CA.
    let untrusting = "https://untrusting.example";
    let fx = Fixture::start_with(Options {
        extra_issuers: vec![
            JwtIssuer::new(&keys.issuer(), &[OWN_AUD])
                .jwks_uri(&jwks_uri)
                .set("tls_ca", &toml_path(&private_pem)),
            JwtIssuer::new(untrusting, &[OWN_AUD]).jwks_uri(&jwks_uri),
        ],
        ..Options::default()
    })
    .await;
    let url = fx.url("api.test", "/v1/own");
    let token = |iss: &str| es.agent_9_token(iss);
    assert_accepted(&url, &token(&keys.issuer()), "keys fetched under tls_ca").await;
    // Refused unchecked: its keys cannot be had (their server is not trusted), which is
    // Portcullis' trouble, not the token's.
    assert_unchecked(
        &url,
        &token(untrusting),
        "keys fetched under the bundled roots",
    )
    .await;
    assert_eq!(
        keys.fetches(),
        1,
        "the untrusting issuer's fetch never got past TLS"
    );
    // And the log says why: a certificate of an issuer not trusted (a private CA wants
    // `tls_ca`).
    fx.px
        .log_until(|log| log.contains("invalid peer certificate: UnknownIssuer"))
        .await;

    fx.px
        .reload_with(
            "[[jwt_issuers]]",
            &toml_path(&private_pem),
            &toml_path(&other_pem),
        )
        .await;
    assert_unchecked(
        &url,
        &token(&keys.issuer()),
        "a new token, after a reload to another CA",
    )
    .await;
}

/// An issuer that kept a key's name for its new key (or names no key in its tokens) rotates:
/// a token the new key signed makes Portcullis fetch the set again (at most every 10 s), as a
/// token naming an unknown key does, rather than refusing it until `jwks_refresh` (5 minutes).
/// Also where a key of another family has the same name and no `alg` (a candidate for every
/// algorithm, which verifies none of this one's).
#[tokio::test(flavor = "multi_thread")]
async fn a_new_key_under_an_old_key_s_name_is_fetched_when_a_token_needs_it() {
    let beside = OwnKey::ed25519("signing");
    for (kid, mixed) in [
        (Some("signing"), false),
        (None, false),
        (Some("signing"), true),
    ] {
        let published = |key: &OwnKey| {
            let mut jwk = key.jwk.clone();
            if kid.is_none() {
                jwk.common.key_id = None;
            }
            if !mixed {
                return JwkSet { keys: vec![jwk] };
            }
            let mut other = beside.jwk.clone();
            other.common.key_algorithm = None;
            jwk.common.key_algorithm = None;
            JwkSet {
                keys: vec![other, jwk],
            }
        };
        let (old, new) = (OwnKey::es256("signing"), OwnKey::es256("signing"));
        let keys = KeyServer::start(&published(&old)).await;
        let fx = Fixture::start_with(Options {
            extra_issuers: vec![JwtIssuer::new(&keys.issuer(), &[OWN_AUD])
                .jwks_uri(&keys.jwks_uri())
                .set("algorithms", "[\"ES256\", \"EdDSA\"]")],
            ..Options::default()
        })
        .await;
        let url = fx.url("api.test", "/v1/own");
        let claims = json!({
            "iss": keys.issuer(), "aud": OWN_AUD, "sub": "agent-7", "client_id": "agent-7",
            "exp": now_unix() + 600,
        });
        let what = format!("kid {kid:?}, mixed {mixed}");
        assert_accepted(&url, &old.sign(kid, &claims), &what).await;
        keys.publish(&published(&new));
        let token = new.sign(kid, &claims);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = bearer(&url, &token).await;
            if status == StatusCode::OK {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: a token of the new key still refused 60 s after the rotation: {body}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Tokens no published key verifies have the set fetched at most every 10 s.
        let fetched = keys.fetches();
        for _ in 0..5 {
            assert_refused(
                &url,
                &old.sign(kid, &claims),
                "a token of the withdrawn key",
            )
            .await;
        }
        assert!(
            keys.fetches() <= fetched + 1,
            "{what}: {} fetches",
            keys.fetches() - fetched
        );
    }
}
