//! Signed JWTs from identity providers: key sets fetched from each issuer, cached, and
//! refetched when a token names a key we don't have (the IdP rotated), at most once per
//! [`REFETCH_AFTER`], and as they age (see `services::IdpKeys`), so that a key the IdP
//! withdraws stops verifying; verification with an explicit algorithm allow-list, never `none`
//! and never HMAC (a public key must not become an HMAC secret).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use portcullis_config::{CaBundle, JwtAlgorithm};

/// Shortest time between two fetches of one key set triggered by unknown keys.
pub const REFETCH_AFTER: Duration = Duration::from_secs(10);
/// Longest JWT accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest key set document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A NumericDate (RFC 7519 §2: seconds since the epoch, which may be a non-integer value),
/// rounded down to a whole second: a token's `exp` read no later than it says, and its `iat`
/// no later either, so it is never taken as issued after a re-activation it came before. A
/// negative, infinite or non-numeric one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumericDate(pub u64);

impl<'de> serde::Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Seconds;
        impl serde::de::Visitor<'_> for Seconds {
            type Value = NumericDate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("seconds since the epoch")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<NumericDate, E> {
                Ok(NumericDate(value))
            }
            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<NumericDate, E> {
                // `u64::MAX as f64` is 2^64, itself out of range.
                if value.is_finite() && value >= 0.0 && value < u64::MAX as f64 {
                    Ok(NumericDate(value.floor() as u64))
                } else {
                    Err(E::custom("a date out of range"))
                }
            }
        }
        deserializer.deserialize_any(Seconds)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is not a compact JWS")]
    Malformed,
    #[error("the token's algorithm is not allowed")]
    Algorithm,
    #[error("no key of the issuer matches the token")]
    UnknownKey,
    #[error("the issuer's keys could not be had (not fetched, or none Portcullis can use yet)")]
    KeysUnavailable,
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

pub fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::RS512 => Algorithm::RS512,
        JwtAlgorithm::PS256 => Algorithm::PS256,
        JwtAlgorithm::PS384 => Algorithm::PS384,
        JwtAlgorithm::PS512 => Algorithm::PS512,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// The JOSE header of a compact JWS `token`. One jsonwebtoken cannot read because its `alg` is
/// none it knows (`none`, `ES512`, an encryption algorithm) is a token of an algorithm not
/// allowed, as an `HS256` one is, not a malformed one: an audit of downgrade attempts finds
/// them all under one reason. One it cannot read for another field is malformed.
pub fn decode_header(token: &str) -> Result<jsonwebtoken::Header, JwtError> {
    jsonwebtoken::decode_header(token).map_err(|_| {
        let names_unknown_alg = token
            .split('.')
            .next()
            .and_then(|header| {
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                    .ok()
            })
            .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
            .is_some_and(|header| {
                (header.get("alg").and_then(serde_json::Value::as_str))
                    .is_some_and(|alg| alg.parse::<Algorithm>().is_err())
            });
        match names_unknown_alg {
            true => JwtError::Algorithm,
            false => JwtError::Malformed,
        }
    })
}

/// Three non-empty base64url segments and nothing else, of at most [`MAX_TOKEN_BYTES`]: a
/// token with trailing bytes, spaces or padding is not a token.
pub fn is_compact_jws(token: &str) -> bool {
    is_compact_jws_within(token, MAX_TOKEN_BYTES)
}

/// [`is_compact_jws`], of at most `max_bytes`.
fn is_compact_jws_within(token: &str, max_bytes: usize) -> bool {
    token.len() <= max_bytes
        && token.split('.').count() == 3
        && token.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A signing key of a set, and the one algorithm it is for, when the set says (`alg`).
#[derive(Clone)]
struct Key {
    alg: Option<Algorithm>,
    key: Arc<DecodingKey>,
    thumbprint: Thumbprint,
}

/// What names a public key whatever its `kid` and other labels: its RFC 7638 thumbprint.
pub type Thumbprint = Arc<str>;

/// The key that verified a bearer token, and the set it came from: the token vouches for its
/// caller only while its issuer still publishes the key there.
#[derive(Clone)]
pub struct SignedWith {
    /// The issuer's `jwks_uri` as configured when it was verified (`None`: discovered).
    pub jwks_uri: Option<String>,
    /// The issuer's `tls_ca` as configured when it was verified (`None`: the bundled roots).
    pub tls_ca: Option<CaBundle>,
    /// The issuer's `leeway` and `iat_backdate` as configured when it was verified: its
    /// `expires` and `issued` were reckoned with them.
    pub leeway: Duration,
    pub iat_backdate: Duration,
    pub set: Arc<Jwks>,
    /// The token's `kid`, `alg` and the key that verified it.
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: Thumbprint,
}

impl PartialEq for SignedWith {
    fn eq(&self, other: &Self) -> bool {
        self.jwks_uri == other.jwks_uri
            && self.tls_ca == other.tls_ca
            && self.leeway == other.leeway
            && self.iat_backdate == other.iat_backdate
            && Arc::ptr_eq(&self.set, &other.set)
            && self.kid == other.kid
            && self.alg == other.alg
            && self.key == other.key
    }
}

impl Eq for SignedWith {}

impl std::fmt::Debug for SignedWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedWith")
            .field("set", &self.set.uri)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("key", &self.key)
            .finish()
    }
}

/// A token's verified claims, its `kid` and `alg`, and the key that verified them.
pub struct Verified<T> {
    pub claims: T,
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: Thumbprint,
}

struct Keys {
    /// Several keys may share a `kid` (one per algorithm, say).
    by_kid: HashMap<String, Vec<Key>>,
    /// Keys without a `kid`, tried when the token has none.
    anonymous: Vec<Key>,
    /// The raw document, for other parsers of the same set (the ID-token verifier).
    raw: Arc<serde_json::Value>,
}

/// RSA keys shorter than this verify nothing: 1024-bit RSA is within reach of factoring, and
/// NIST SP 800-131A has disallowed it for signatures since 2013. A set that still publishes
/// one (an old key left beside new ones) keeps its others.
const MIN_RSA_BITS: usize = 2048;

/// The length in bits of an RSA modulus given as a JWK's `n` (base64url, big-endian); 0 when
/// it is not one.
fn modulus_bits(n: &str) -> usize {
    use base64::Engine;
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(n.trim_end_matches('='))
    else {
        return 0;
    };
    let significant = bytes
        .iter()
        .position(|b| *b != 0)
        .map_or(&[][..], |at| &bytes[at..]);
    significant.first().map_or(0, |first| {
        (significant.len() - 1) * 8 + (8 - first.leading_zeros() as usize)
    })
}

impl Keys {
    /// A key set document: its signing keys, by `kid`.
    fn parse(bytes: &[u8]) -> Result<Keys, String> {
        let mut raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        // Out of the set for every verifier, ID tokens' (which read `raw`) too: short RSA
        // keys, and a key published twice (GitHub Enterprise Server's set does), which the
        // ID-token verifier refuses as two keys for one `kid`.
        if let Some(keys) = raw.get_mut("keys").and_then(|k| k.as_array_mut()) {
            let mut seen = std::collections::HashSet::new();
            keys.retain(|key| {
                let long_enough = key.get("kty").and_then(|k| k.as_str()) != Some("RSA")
                    || key
                        .get("n")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| modulus_bits(n) >= MIN_RSA_BITS);
                long_enough && seen.insert(key.to_string())
            });
        }
        let set: JwkSet = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
        let mut by_kid = HashMap::new();
        let mut anonymous = Vec::new();
        for jwk in &set.keys {
            // A symmetric key in a public key set is never used, nor one published for
            // encryption (`use`, or an `alg` that signs nothing); a key of a type we cannot
            // use is skipped, not fatal.
            if matches!(
                jwk.algorithm,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
            ) || jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|used| *used != jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            // jsonwebtoken takes an Ed25519 key of any length and slices its first 32 bytes
            // when it verifies: a shorter one would panic the request.
            if let jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(okp) = &jwk.algorithm {
                use base64::Engine;
                let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&okp.x);
                if okp.curve != jsonwebtoken::jwk::EllipticCurve::Ed25519
                    || x.map_or(true, |x| x.len() != 32)
                {
                    continue;
                }
            }
            let alg = match &jwk.common.key_algorithm {
                None => None,
                Some(alg) => match alg.to_string().parse::<Algorithm>() {
                    Ok(alg) => Some(alg),
                    Err(_) => continue,
                },
            };
            let (Ok(key), Ok(thumbprint)) = (
                DecodingKey::from_jwk(jwk),
                jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256),
            ) else {
                continue;
            };
            let key = Key {
                alg,
                key: Arc::new(key),
                thumbprint: thumbprint.into(),
            };
            match &jwk.common.key_id {
                Some(kid) => by_kid.entry(kid.clone()).or_insert_with(Vec::new).push(key),
                None => anonymous.push(key),
            }
        }
        Ok(Keys {
            by_kid,
            anonymous,
            raw: Arc::new(raw),
        })
    }

    /// The keys that may have signed a token with this `kid` and `alg`: a key the set names
    /// an algorithm for verifies only that one (an RSA key for RS256 is no PS512 key).
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<Key> {
        self.fitting(kid, alg).cloned().collect()
    }

    fn fitting<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        let named: Box<dyn Iterator<Item = &Key>> = match kid {
            Some(kid) => Box::new(self.by_kid.get(kid).into_iter().flatten()),
            None => Box::new(self.anonymous.iter().chain(self.by_kid.values().flatten())),
        };
        named.filter(move |key| key.alg.is_none_or(|only| only == alg))
    }

    /// Whether a token with this `kid` and `alg` would still be verified with the key
    /// `thumbprint` names.
    fn publishes(&self, kid: Option<&str>, alg: Algorithm, thumbprint: &str) -> bool {
        self.fitting(kid, alg)
            .any(|key| &*key.thumbprint == thumbprint)
    }

    fn is_empty(&self) -> bool {
        self.by_kid.is_empty() && self.anonymous.is_empty()
    }
}

/// One issuer's key set.
pub struct Jwks {
    uri: String,
    http: reqwest::Client,
    keys: ArcSwapOption<Keys>,
    /// Counts the key sets installed, so what was verified against an older one is known.
    generation: AtomicU64,
    fetches: Mutex<Fetches>,
}

/// When the key set was fetched, and since when it has held no key Portcullis can use.
#[derive(Default)]
struct Fetches {
    /// When the last fetch began, when it ended, and whether it failed.
    began: Option<Instant>,
    last: Option<Instant>,
    failed: bool,
    /// Since when every fetch has found a set with no usable key, while the last usable one
    /// is kept (see [`Jwks::refresh`]).
    unusable_since: Option<Instant>,
}

impl Jwks {
    pub fn new(uri: String, http: reqwest::Client) -> Self {
        Self {
            uri,
            http,
            keys: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            fetches: Mutex::new(Fetches::default()),
        }
    }

    /// Which key set is installed; changes with every fetch. Read it before verifying.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the installed set holds a key Portcullis can use.
    pub fn has_usable_key(&self) -> bool {
        self.keys
            .load()
            .as_ref()
            .is_some_and(|keys| !keys.is_empty())
    }

    /// The key set as last fetched, as JSON.
    pub fn raw(&self) -> Option<Arc<serde_json::Value>> {
        self.keys.load().as_ref().map(|k| k.raw.clone())
    }

    /// Whether the key set was last fetched (or tried) at least `age` ago, or [`REFETCH_AFTER`]
    /// ago while a set with no usable key waits to be confirmed. False while a fetch is under
    /// way.
    pub fn older_than(&self, age: Duration) -> bool {
        self.fetches.try_lock().is_ok_and(|fetches| {
            let age = match fetches.unusable_since {
                Some(_) => age.min(REFETCH_AFTER),
                None => age,
            };
            fetches.last.is_none_or(|at| at.elapsed() >= age)
        })
    }

    /// Fetches the key set unless it was fetched less than [`REFETCH_AFTER`] ago (or `force`);
    /// whether it did. A fetch that failed, less than that ago, stands: `KeysUnavailable`,
    /// fetching nothing. A failed fetch keeps the last good set (an outage at the IdP). A set
    /// that has not changed is kept as it is, and so is what was verified with it.
    ///
    /// The set the issuer publishes is the keys it vouches for, even when Portcullis can use
    /// none of them: a key left out was withdrawn (the IdP's admin disabled every key, or it
    /// moved to an algorithm Portcullis does not take) and stops verifying. But a set with no
    /// usable key is also what an IdP node serves for a moment when its keys fail to load: it
    /// is taken only once a fetch at least [`REFETCH_AFTER`] later finds the same, and till
    /// then the last usable set is kept.
    pub async fn refresh(&self, force: bool) -> Result<bool, JwtError> {
        self.refresh_unless(|f| !force && f.last.is_some_and(|at| at.elapsed() < REFETCH_AFTER))
            .await
    }

    /// Fetches the key set unless a fetch began at `seen` or after (as [`Jwks::refresh`] does
    /// otherwise): for a key missing from the set at `seen` that the issuer itself used, in
    /// an ID token from its token endpoint, which no client can make up. One under way then
    /// may have been answered before the key was published. Those who saw the same at once
    /// take one fetch's outcome.
    pub async fn refresh_since(&self, seen: Instant) -> Result<bool, JwtError> {
        self.refresh_unless(|f| f.began.is_some_and(|at| at >= seen))
            .await
    }

    /// Fetches the key set again for a token the issuer itself handed over (an ID token from
    /// its token endpoint) that it does not verify, read at `seen`: for a key missing from the
    /// set ([`Jwks::refresh_since`]), or (a signature no key of its kid verifies) as a
    /// client's token would, rate limited.
    pub async fn refresh_for_issuers_own(
        &self,
        missing_key: bool,
        seen: Instant,
    ) -> Result<bool, JwtError> {
        match missing_key {
            true => self.refresh_since(seen).await,
            false => self.refresh(false).await,
        }
    }

    async fn refresh_unless(&self, recent: impl Fn(&Fetches) -> bool) -> Result<bool, JwtError> {
        let mut fetches = self.fetches.lock().await;
        if recent(&fetches) {
            // Fetched a moment ago (perhaps while this request waited its turn): its outcome
            // stands. A set with no usable key that waits to be confirmed is not the issuer's
            // word either.
            return match fetches.failed || fetches.unusable_since.is_some() {
                true => Err(JwtError::KeysUnavailable),
                false => Ok(false),
            };
        }
        // Kept only once it ended (the lock is held throughout): a fetch given up half way,
        // its request gone, vouches for nothing.
        let began = Instant::now();
        let fetched = self.fetch().await;
        fetches.began = Some(began);
        // Dated from its end: the requests that waited for it take its outcome, where each
        // would have fetched in turn, an IdP that does not answer holding the n-th of them up
        // for n of its timeouts.
        let now = Instant::now();
        fetches.last = Some(now);
        fetches.failed = fetched.is_err();
        let keys = match fetched {
            Ok(keys) => keys,
            Err(e) => {
                // Two sets with no usable key an outage apart are two glitches, not one set.
                fetches.unusable_since = None;
                tracing::warn!(uri = %self.uri, "could not fetch the key set: {e}");
                return Err(JwtError::KeysUnavailable);
            }
        };
        let keeps_usable = self.has_usable_key();
        if !keys.is_empty() {
            fetches.unusable_since = None;
        } else if keeps_usable {
            let since = *fetches.unusable_since.get_or_insert(now);
            if since.elapsed() < REFETCH_AFTER {
                tracing::warn!(
                    uri = %self.uri,
                    "the key set has no signing key Portcullis can use; keeping the last one \
                     until a fetch {}s from now finds the same",
                    REFETCH_AFTER.as_secs()
                );
                return Err(JwtError::KeysUnavailable);
            }
            tracing::warn!(
                uri = %self.uri,
                "the key set still has no signing key Portcullis can use: no token of this \
                 issuer verifies until it publishes one"
            );
            fetches.unusable_since = None;
        }
        if self.raw().is_some_and(|raw| *raw == *keys.raw) {
            return Ok(true);
        }
        self.keys.store(Some(Arc::new(keys)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// A key set holding `set`, as if fetched from `uri`.
    #[cfg(test)]
    pub fn holding(uri: &str, set: &[u8]) -> Jwks {
        let jwks = Jwks::new(uri.to_owned(), reqwest::Client::new());
        jwks.keys
            .store(Some(Arc::new(Keys::parse(set).expect("a key set"))));
        jwks
    }

    /// As if the set had last been fetched [`REFETCH_AFTER`] earlier than it was.
    #[cfg(test)]
    pub async fn age_fetches(&self) {
        let mut fetches = self.fetches.lock().await;
        fetches.last = fetches.last.and_then(|at| at.checked_sub(REFETCH_AFTER));
    }

    /// As if a set with no usable key had been found [`REFETCH_AFTER`] earlier than it was.
    #[cfg(test)]
    pub async fn age_unusable(&self) {
        let mut fetches = self.fetches.lock().await;
        fetches.unusable_since = fetches
            .unusable_since
            .and_then(|since| since.checked_sub(REFETCH_AFTER));
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let response = self
            .http
            .get(&self.uri)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| portcullis_scim::error::with_causes(&e))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let bytes = super::bounded::body(response, MAX_JWKS_BYTES).await?;
        Keys::parse(&bytes)
    }

    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<Key> {
        self.keys
            .load()
            .as_ref()
            .map_or_else(Vec::new, |keys| keys.candidates(kid, alg))
    }

    /// Whether the key set as last fetched still publishes, for a token with this `kid` and
    /// `alg`, the key `thumbprint` names: a token stops vouching for its caller once its
    /// issuer withdraws the key that verified it.
    pub fn publishes(&self, kid: Option<&str>, alg: Algorithm, thumbprint: &str) -> bool {
        self.keys
            .load()
            .as_ref()
            .is_some_and(|keys| keys.publishes(kid, alg, thumbprint))
    }

    /// Verifies `token`'s signature and the checks in `validation`, returning its claims.
    pub async fn verify<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<T, JwtError> {
        Ok(self.verify_keyed(token, validation).await?.claims)
    }

    /// As [`Jwks::verify`], for a signed answer of the issuer's (its UserInfo): as long as an
    /// answer may be, not a token sent in a request's head (a person in many groups).
    pub async fn verify_answer<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<T, JwtError> {
        let longest = super::bounded::MAX_RESPONSE_BYTES;
        Ok(self.verify_within(token, validation, longest).await?.claims)
    }

    /// As [`Jwks::verify_answer`], for an answer the issuer itself handed over (a signed
    /// UserInfo answer, from its endpoint), which no client can make up: a key the set lacks
    /// may be one the IdP has just rotated to, within the [`REFETCH_AFTER`] in which what
    /// anyone posts does not fetch the set again. It is fetched unless a fetch began since the
    /// answer was read ([`Jwks::refresh_since`]), and the answer tried once more.
    pub async fn verify_issuers_answer<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<T, JwtError> {
        let seen = Instant::now();
        match self.verify_answer(token, validation).await {
            Err(JwtError::UnknownKey) => {
                self.refresh_since(seen).await?;
                self.verify_answer(token, validation).await
            }
            other => other,
        }
    }

    /// As [`Jwks::verify`], also saying which key verified it.
    pub async fn verify_keyed<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<Verified<T>, JwtError> {
        self.verify_within(token, validation, MAX_TOKEN_BYTES).await
    }

    async fn verify_within<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
        max_bytes: usize,
    ) -> Result<Verified<T>, JwtError> {
        if !is_compact_jws_within(token, max_bytes) {
            return Err(JwtError::Malformed);
        }
        let header = decode_header(token)?;
        // RFC 7515 §4.1.11: extensions the token says must be understood; Portcullis
        // understands none.
        if header.crit.is_some() {
            return Err(JwtError::Invalid(
                "it names critical header extensions (crit)".into(),
            ));
        }
        if !validation.algorithms.contains(&header.alg) {
            return Err(JwtError::Algorithm);
        }
        // Verify with exactly the token's (allowed) algorithm: jsonwebtoken refuses a key whose
        // family differs from any algorithm in the list, and the list spans families.
        let mut exact = validation.clone();
        exact.algorithms = vec![header.alg];
        let kid = header.kid.as_deref();
        let generation = self.generation.load(Ordering::Acquire);
        let verified = match verify_with(token, &self.candidates(kid, header.alg), &exact) {
            // An unknown key, or a signature no key of the name verifies (an issuer whose
            // tokens name no key, or that kept a key's name for a new key): the IdP may have
            // rotated. Refetch (rate-limited) and try again with what it publishes now.
            Err(refused @ (Refused::NoKey | Refused::Signature)) => {
                let refreshed = self.refresh(false).await;
                if self.generation.load(Ordering::Acquire) == generation {
                    // What the issuer publishes now could not be had: not known to be no key
                    // of its.
                    match refreshed {
                        Err(JwtError::KeysUnavailable) => {
                            Err(Refused::Other(JwtError::KeysUnavailable))
                        }
                        _ => Err(refused),
                    }
                } else {
                    verify_with(token, &self.candidates(kid, header.alg), &exact)
                }
            }
            other => other,
        };
        let (key, claims) = verified.map_err(|refused| match refused {
            Refused::NoKey => JwtError::UnknownKey,
            Refused::Signature => JwtError::Invalid(SIGNATURE.into()),
            Refused::Other(e) => e,
        })?;
        Ok(Verified {
            claims,
            kid: header.kid,
            alg: header.alg,
            key: key.thumbprint,
        })
    }
}

const SIGNATURE: &str = "its signature does not verify";

/// Why no key verified a token.
enum Refused {
    NoKey,
    /// Some keys, none that verifies the signature.
    Signature,
    /// A key verified the signature, and the token was refused for what it says.
    Other(JwtError),
}

/// The first of `keys` that verifies `token`, and its claims. A key of another family than
/// the token's algorithm (a key that names no `alg` is a candidate for every one) verifies no
/// signature, as a key of the family whose signature does not verify.
fn verify_with<T: DeserializeOwned>(
    token: &str,
    keys: &[Key],
    exact: &Validation,
) -> Result<(Key, T), Refused> {
    let mut last = Refused::NoKey;
    for key in keys {
        match jsonwebtoken::decode::<T>(token, &key.key, exact) {
            Ok(data) => return Ok((key.clone(), data.claims)),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::InvalidSignature
                        | ErrorKind::InvalidAlgorithm
                        | ErrorKind::InvalidEcdsaKey
                        | ErrorKind::InvalidRsaKey(_)
                        | ErrorKind::InvalidKeyFormat
                ) =>
            {
                if matches!(last, Refused::NoKey) {
                    last = Refused::Signature;
                }
            }
            Err(e) => last = Refused::Other(JwtError::Invalid(refusal(e.kind()).into())),
        }
    }
    Err(last)
}

/// Why jsonwebtoken refused a token, in words that never quote it: its own messages may
/// repeat a character of the token or the value of a claim (it reads the claims before it
/// checks them), and what was refused goes to the log and the audit.
fn refusal(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "it is not a well-formed JWT"
        }
        ErrorKind::InvalidSignature => SIGNATURE,
        ErrorKind::ExpiredSignature => "it has expired",
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "it is from another issuer",
        ErrorKind::InvalidAudience => "it is meant for another audience",
        ErrorKind::InvalidSubject => "its subject is not the one expected",
        ErrorKind::MissingRequiredClaim(_) => "a claim it must have is missing",
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => "a claim has the wrong type",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => "its algorithm is not allowed",
        _ => "it could not be checked against the issuer's keys",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/1.1 answer of `body` as JSON, the connection closed after it.
    fn json_answer(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A key-set endpoint on loopback: counts the connections it takes, and hands each, with
    /// its turn (0 first), to `serve`.
    async fn key_set_server<F, Fut>(
        serve: F,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let turn = counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, turn));
            }
        });
        (address, asked)
    }

    #[test]
    fn a_date_may_have_a_fraction_of_a_second() {
        let read = |json: &str| serde_json::from_str::<NumericDate>(json).ok();
        assert_eq!(read("1700000000"), Some(NumericDate(1_700_000_000)));
        assert_eq!(read("1700000000.25"), Some(NumericDate(1_700_000_000)));
        assert_eq!(read("1700000000.75"), Some(NumericDate(1_700_000_000)));
        assert_eq!(read("1.7e9"), Some(NumericDate(1_700_000_000)));
        for refused in ["-1", "-0.5", "1e300", "\"1700000000\"", "null", "[1]"] {
            assert_eq!(read(refused), None, "{refused}");
        }
    }

    /// A signed answer of the issuer's own (UserInfo's) under a key it rotated to a moment
    /// after the set was fetched is verified: the set is fetched again for it, where a token
    /// anyone posts is not, within [`REFETCH_AFTER`], fetched for.
    #[tokio::test]
    async fn an_issuers_own_answer_under_a_key_just_rotated_to_is_verified() {
        use base64::Engine;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = |key: &rcgen::KeyPair, kid: &str| {
            let point = key.public_key_raw();
            serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            })
        };
        let (old, new) = (
            rcgen::KeyPair::generate().unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        );
        let sets = Arc::new([
            serde_json::json!({ "keys": [jwk(&old, "old")] }).to_string(),
            serde_json::json!({ "keys": [jwk(&old, "old"), jwk(&new, "new")] }).to_string(),
        ]);
        let (address, asked) = key_set_server(move |mut stream, turn| {
            let body = sets[turn.min(1)].clone();
            async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(json_answer(&body).as_bytes()).await;
            }
        })
        .await;
        let set = Jwks::new(format!("http://{address}/jwks"), reqwest::Client::new());
        assert_eq!(set.refresh(true).await, Ok(true));
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some("new".to_owned());
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&new.serialize_der());
        let claims = serde_json::json!({ "sub": "alice" });
        let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_required_spec_claims::<&str>(&[]);
        validation.validate_exp = false;
        // Anyone's token under it: not fetched for, within the 10 s.
        let anyones = set
            .verify_answer::<serde_json::Value>(&token, &validation)
            .await;
        assert_eq!(anyones.err(), Some(JwtError::UnknownKey));
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        let own = set
            .verify_issuers_answer::<serde_json::Value>(&token, &validation)
            .await;
        assert_eq!(own.ok(), Some(claims));
        assert_eq!(asked.load(Ordering::SeqCst), 2, "fetched once for it");
        // A set that cannot be had says nothing of the answer: no key of the issuer's lacks.
        let (hanging_up, _) = key_set_server(|stream, _| async move { drop(stream) }).await;
        let set = Jwks::new(format!("http://{hanging_up}/jwks"), reqwest::Client::new());
        let own = set
            .verify_issuers_answer::<serde_json::Value>(&token, &validation)
            .await;
        assert_eq!(own.err(), Some(JwtError::KeysUnavailable));
    }

    /// An IdP whose key set stops answering holds a token with a new key up for one of its
    /// timeouts at most, however many wait: those that waited take the fetch's failure, and
    /// are told the keys could not be had, not that the issuer has no such key.
    #[tokio::test]
    async fn requests_that_wait_on_a_fetch_that_fails_take_its_failure() {
        let (address, asked) = key_set_server(|stream, _| async move {
            tokio::time::sleep(Duration::from_secs(120)).await;
            drop(stream);
        })
        .await;
        let key = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"a"}"#;
        let set = Arc::new(Jwks::holding(
            &format!("http://{address}/jwks"),
            format!(r#"{{"keys":[{key}]}}"#).as_bytes(),
        ));
        let part = |bytes: &[u8]| {
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
        };
        let token = [
            part(br#"{"alg":"ES256","kid":"rotated"}"#),
            part(b"{}"),
            part(&[7; 64]),
        ]
        .join(".");
        let started = Instant::now();
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let (set, token) = (set.clone(), token.clone());
                tokio::spawn(async move {
                    let validation = Validation::new(Algorithm::ES256);
                    set.verify::<serde_json::Value>(&token, &validation).await
                })
            })
            .collect();
        for waited in waiting {
            let refused = waited.await.unwrap();
            assert!(
                matches!(refused, Err(JwtError::KeysUnavailable)),
                "{refused:?}"
            );
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1, "fetched in turn");
        assert!(
            started.elapsed() < Duration::from_secs(18),
            "{:?}",
            started.elapsed()
        );
    }

    /// A key the issuer itself used (an ID token's) is fetched for unless a fetch began since
    /// it was missed, 10 s or not since the last: those that missed it together share one
    /// fetch, and its failure.
    #[tokio::test]
    async fn a_key_missed_is_fetched_for_unless_a_fetch_began_since() {
        // Each fetch fails at once: the connection is closed unanswered.
        let (address, asked) = key_set_server(|stream, _| async move { drop(stream) }).await;
        let set = Arc::new(Jwks::holding(
            &format!("http://{address}/jwks"),
            br#"{"keys":[]}"#,
        ));
        let seen = Instant::now();
        let missed: Vec<_> = (0..3)
            .map(|_| {
                let set = set.clone();
                tokio::spawn(async move { set.refresh_since(seen).await })
            })
            .collect();
        for refreshed in missed {
            let refreshed = refreshed.await.unwrap();
            assert!(
                matches!(refreshed, Err(JwtError::KeysUnavailable)),
                "{refreshed:?}"
            );
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1, "one fetch for the three");
        assert!(matches!(
            set.refresh(false).await,
            Err(JwtError::KeysUnavailable)
        ));
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "a client's token waits 10 s"
        );
        let refreshed = set.refresh_since(Instant::now()).await;
        assert!(matches!(refreshed, Err(JwtError::KeysUnavailable)));
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "missed again: fetched again"
        );
    }

    /// A fetch under way when a key was missed may have been answered before the key was
    /// published: it is not taken for a fetch since. Nor is one begun since but given up half
    /// way (its request gone): it fetched nothing.
    #[tokio::test]
    async fn a_key_missed_while_a_fetch_is_under_way_is_fetched_for_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (address, asked) = key_set_server(|mut stream, turn| async move {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            // The third is held until it is given up, whatever the machine's load.
            let slow = match turn {
                2 => Duration::from_secs(120),
                _ => Duration::from_millis(300),
            };
            tokio::time::sleep(slow).await;
            let _ = stream
                .write_all(json_answer(r#"{"keys":[]}"#).as_bytes())
                .await;
        })
        .await;
        let set = Arc::new(Jwks::holding(
            &format!("http://{address}/jwks"),
            br#"{"keys":[]}"#,
        ));
        let fetches_begun = |count: usize| {
            let asked = asked.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while asked.load(Ordering::SeqCst) < count {
                    assert!(Instant::now() < deadline, "fetch {count} never came");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let under_way = {
            let set = set.clone();
            tokio::spawn(async move { set.refresh(true).await })
        };
        fetches_begun(1).await;
        let seen = Instant::now();
        let _ = set.refresh_since(seen).await;
        let _ = under_way.await;
        assert_eq!(asked.load(Ordering::SeqCst), 2, "fetched again after");

        // Missed, then a fetch begun and given up: fetched again.
        let seen = Instant::now();
        let given_up = {
            let set = set.clone();
            tokio::spawn(async move { set.refresh(true).await })
        };
        fetches_begun(3).await;
        given_up.abort();
        let _ = given_up.await;
        let _ = set.refresh_since(seen).await;
        assert_eq!(
            asked.load(Ordering::SeqCst),
            4,
            "fetched again after one given up"
        );
    }

    #[test]
    fn a_header_of_an_algorithm_without_a_name_here_is_of_one_not_allowed() {
        let token = |header: &str| {
            let part = |bytes: &[u8]| {
                base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
            };
            [part(header.as_bytes()), part(b"{}"), part(&[7; 64])].join(".")
        };
        for unknown in [r#"{"alg":"none"}"#, r#"{"alg":"ES512","kid":"a"}"#] {
            let decoded = decode_header(&token(unknown));
            assert!(matches!(decoded, Err(JwtError::Algorithm)), "{unknown}");
        }
        // An algorithm it knows, in a header it cannot read for another field.
        for malformed in [r#"{"alg":"RS256","kid":7}"#, r#"{"kid":"a"}"#, "[]"] {
            let decoded = decode_header(&token(malformed));
            assert!(matches!(decoded, Err(JwtError::Malformed)), "{malformed}");
        }
    }

    #[test]
    fn only_bare_compact_tokens_pass_the_syntax_check() {
        assert!(is_compact_jws("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "a..c",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln ",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln garbage",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln==",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n",
        ] {
            assert!(!is_compact_jws(bad), "{bad:?}");
        }
        assert!(!is_compact_jws(&format!(
            "a.b.{}",
            "c".repeat(MAX_TOKEN_BYTES)
        )));
    }

    #[test]
    fn an_rsa_key_shorter_than_2048_bits_verifies_nothing() {
        use base64::Engine;
        let n = |bytes: usize| {
            let mut modulus = vec![0xc5u8; bytes];
            modulus.insert(0, 0);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(modulus)
        };
        assert_eq!(modulus_bits(&n(256)), 2048);
        assert_eq!(modulus_bits(&n(128)), 1024);
        assert_eq!(modulus_bits("not base64!"), 0);
        let key = |kid: &str, bytes| {
            format!(
                r#"{{"kty":"RSA","kid":"{kid}","n":"{}","e":"AQAB"}}"#,
                n(bytes)
            )
        };
        let set = format!(r#"{{"keys":[{},{}]}}"#, key("old", 128), key("new", 256));
        let keys = Keys::parse(set.as_bytes()).unwrap();
        assert_eq!(keys.candidates(Some("old"), Algorithm::RS256).len(), 0);
        assert_eq!(keys.candidates(Some("new"), Algorithm::RS256).len(), 1);
        // Nor does the set ID tokens are verified with hold it.
        assert_eq!(keys.raw["keys"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn an_ed25519_key_of_the_wrong_length_verifies_nothing() {
        // RFC 8037's example Ed25519 public key, and the same cut short.
        let set = r#"{"keys":[
            {"kty":"OKP","crv":"Ed25519","kid":"good","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"short","x":"AAAA"}]}"#;
        let keys = Keys::parse(set.as_bytes()).unwrap();
        assert_eq!(keys.candidates(Some("good"), Algorithm::EdDSA).len(), 1);
        assert_eq!(keys.candidates(Some("short"), Algorithm::EdDSA).len(), 0);
        // A token no key verifies is refused, not a panic.
        let token = "eyJhbGciOiJFZERTQSIsImtpZCI6InNob3J0In0.eyJzdWIiOiJ4In0.\
                     c2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2lnc2ln";
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        let candidates = keys.candidates(None, Algorithm::EdDSA);
        assert!(verify_with::<serde_json::Value>(token, &candidates, &validation).is_err());
    }

    #[test]
    fn a_key_verifies_only_what_its_set_publishes_it_for() {
        // RFC 7517's example P-256 public key, published five ways.
        let key = |extra: &str| {
            format!(
                r#"{{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"{extra}}}"#
            )
        };
        let set = format!(
            r#"{{"keys":[{},{},{},{},{}]}}"#,
            key(r#","kid":"shared","use":"enc""#),
            key(r#","kid":"shared","use":"sig","alg":"ES256""#),
            key(r#","kid":"labelled","alg":"ES384""#),
            key(r#","kid":"wrapping","alg":"ECDH-ES""#),
            key(r#","kid":"plain""#),
        );
        let keys = Keys::parse(set.as_bytes()).unwrap();
        let count = |kid, alg| keys.candidates(kid, alg).len();
        // Two keys share a kid: the encryption one is dropped, the signing one kept.
        assert_eq!(count(Some("shared"), Algorithm::ES256), 1);
        // A key published for ES384 is no ES256 key.
        assert_eq!(count(Some("labelled"), Algorithm::ES256), 0);
        assert_eq!(count(Some("labelled"), Algorithm::ES384), 1);
        assert_eq!(count(Some("wrapping"), Algorithm::ES256), 0);
        assert_eq!(count(Some("plain"), Algorithm::ES256), 1);
        // Without a kid, every key that fits the algorithm.
        assert_eq!(count(None, Algorithm::ES256), 2);
    }

    #[test]
    fn a_key_is_published_while_a_set_holds_it_as_a_token_names_it() {
        let key = |extra: &str| {
            format!(
                r#"{{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"{extra}}}"#
            )
        };
        let set = |keys: &[String]| {
            Keys::parse(format!(r#"{{"keys":[{}]}}"#, keys.join(",")).as_bytes()).unwrap()
        };
        let first = set(&[key(r#","kid":"a""#)]);
        let thumbprint = first.candidates(Some("a"), Algorithm::ES256)[0]
            .thumbprint
            .clone();
        let published = |keys: &Keys, kid| keys.publishes(kid, Algorithm::ES256, &thumbprint);
        assert!(published(&first, Some("a")));
        assert!(!published(&first, Some("b")), "another kid");
        let grown = set(&[key(r#","kid":"b""#), key(r#","kid":"a""#)]);
        assert!(published(&grown, Some("a")), "kept beside a new key");
        // As a request made now would be judged: a token naming kid "a" finds no key.
        assert!(
            !published(&set(&[key(r#","kid":"b""#)]), Some("a")),
            "renamed"
        );
        assert!(!published(&set(&[key("")]), Some("a")), "unnamed");
        assert!(published(&set(&[key("")]), None), "a token naming none");
        let narrowed = set(&[key(r#","kid":"a","alg":"ES384""#)]);
        assert!(!published(&narrowed, Some("a")), "for ES384 only");
        assert!(!published(&set(&[]), Some("a")), "withdrawn");
        assert!(set(&[]).is_empty());
        assert!(
            set(&[key(r#","kid":"a","use":"enc""#)]).is_empty(),
            "no signing key"
        );
    }
}
