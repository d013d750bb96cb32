//! Values sealed for the client to carry: encrypted and authenticated (ChaCha20-Poly1305)
//! under a key that never leaves Portcullis' store (every replica holds the same keys, see
//! [`super::sessions::SEALING_KEY`]), and bound to a context (the associated data) they must
//! be opened with. A sealed value the client altered, or one shown with another context, does
//! not open.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

/// Seals and opens values under one key.
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// A new random key, as URL-safe base64: what [`Sealer::from_encoded_key`] takes.
    pub fn generate_encoded_key() -> String {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The sealer of a key made by [`Sealer::generate_encoded_key`]; `None` for anything else.
    pub fn from_encoded_key(encoded: &str) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(encoded).ok()?;
        if raw.len() != 32 {
            return None;
        }
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &raw).ok()?;
        Some(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// The sealer of a key derived (HKDF-SHA256) from `secret`, for `purpose`: the same
    /// secret and purpose give the same key, and nothing else does.
    pub fn derived(secret: &[u8], purpose: &[u8]) -> Self {
        use ring::hkdf::{Salt, HKDF_SHA256};
        let mut raw = [0u8; 32];
        let filled = Salt::new(HKDF_SHA256, purpose)
            .extract(secret)
            .expand(&[b"portcullis sealer"], HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut raw));
        // Expanding to the hash's own length always succeeds, and 32 bytes make a key.
        let key = filled
            .ok()
            .and_then(|()| UnboundKey::new(&CHACHA20_POLY1305, &raw).ok());
        match key {
            Some(unbound) => Self {
                key: LessSafeKey::new(unbound),
            },
            None => unreachable!("HKDF-SHA256 fills a 32-byte ChaCha20-Poly1305 key"),
        }
    }

    /// `plain` sealed for `context`, as URL-safe base64 (nonce, ciphertext, tag). Nonces are
    /// random: 96 bits are far beyond what one key seals in a process' life.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut sealed = Vec::with_capacity(NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plain);
        let mut in_out = sealed.split_off(NONCE_LEN);
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut in_out,
            )
            .is_err()
        {
            // Only for inputs beyond ChaCha20's 256 GiB limit.
            unreachable!("a value far smaller than the cipher's limit");
        }
        sealed.extend_from_slice(&in_out);
        URL_SAFE_NO_PAD.encode(sealed)
    }

    /// The value sealed for `context`; `None` when it was altered, sealed for another context
    /// or by another key, or is not base64 at all.
    pub fn open(&self, context: &[u8], sealed: &str) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut in_out)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Sealer {
        pub fn random() -> Self {
            Self::from_encoded_key(&Self::generate_encoded_key()).unwrap()
        }
    }

    #[test]
    fn only_32_byte_keys_make_a_sealer() {
        assert!(Sealer::from_encoded_key(&Sealer::generate_encoded_key()).is_some());
        for bad in ["", "!!", &URL_SAFE_NO_PAD.encode([7u8; 16])] {
            assert!(Sealer::from_encoded_key(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_sealed_value_opens_only_unaltered_with_its_context_and_key() {
        let sealer = Sealer::random();
        let sealed = sealer.seal(b"state-1", b"the verifier");
        assert_eq!(
            sealer.open(b"state-1", &sealed).as_deref(),
            Some(&b"the verifier"[..])
        );
        // The plain text does not show through.
        assert!(!sealed.contains("verifier"));
        let raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap_or_default();
        assert!(!raw.windows(8).any(|w| w == b"verifier"));

        assert_eq!(sealer.open(b"state-2", &sealed), None, "another context");
        assert_eq!(
            Sealer::random().open(b"state-1", &sealed),
            None,
            "another key"
        );
        for at in [0, NONCE_LEN, raw.len() - 1] {
            let mut altered = raw.clone();
            altered[at] ^= 1;
            let altered = URL_SAFE_NO_PAD.encode(altered);
            assert_eq!(sealer.open(b"state-1", &altered), None, "byte {at} altered");
        }
        for junk in ["", "!!!", "AAAA", &sealed[..sealed.len() - 4]] {
            assert_eq!(sealer.open(b"state-1", junk), None, "{junk:?}");
        }
        // Sealing twice gives different texts (fresh nonces).
        assert_ne!(sealed, sealer.seal(b"state-1", b"the verifier"));
    }
}
