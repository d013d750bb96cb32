//! Lookup tables from a name (group, user, domain) to the set of rules that name it, so that one
//! evaluation hashes each of the subject's names once, whatever the number of rules.
//!
//! Case-insensitive tables store the folded key ([`crate::fold`], the same folding the SCIM
//! directory uses for `userName`) and fold the probe while hashing and comparing it, so a
//! lookup never allocates. The hash is computed here, not by `std`'s SipHash: keys come from the
//! configuration, so a probe chosen by a caller can at worst land in a bucket of configured keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A set of rules, one bit per rule index, `words` 64-bit words long.
pub(crate) type RuleBits = Box<[u64]>;

pub(crate) fn empty_bits(words: usize) -> RuleBits {
    vec![0; words].into_boxed_slice()
}

pub(crate) fn set_bit(bits: &mut [u64], rule: usize) {
    if let Some(word) = bits.get_mut(rule / 64) {
        *word |= 1 << (rule % 64);
    }
}

pub(crate) fn has_bit(bits: &[u64], rule: usize) -> bool {
    bits.get(rule / 64)
        .is_some_and(|word| word & (1 << (rule % 64)) != 0)
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The key as stored: folded for case-insensitive tables.
    pub key: Box<str>,
    pub rules: RuleBits,
}

/// How a table compares names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compare {
    /// Byte for byte (`externalId`).
    Exact,
    /// ASCII letters in any case; any non-ASCII probe misses (domains, which are ASCII, so that
    /// no Unicode look-alike folds onto a configured domain).
    AsciiCase,
    /// Unicode lower-case mapping of each char (`displayName`, `userName`).
    UnicodeCase,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StrIndex {
    compare: Compare,
    words: usize,
    table: HashMap<u64, Vec<Entry>, BuildHasherDefault<PreHashed>>,
    /// A one-hash Bloom filter over (length, first byte, last byte) of the stored keys. A subject
    /// has tens of groups and a route names a few: most of its names are turned away here, for
    /// the price of reading two bytes, before being hashed. Non-ASCII probes of case-insensitive
    /// tables skip it (their folded bytes are not known without folding).
    filter: [u64; FILTER_WORDS],
}

const FILTER_WORDS: usize = 8;

fn filter_bit(bytes: &[u8], lower: bool) -> (usize, u64) {
    let lower = |b: u8| if lower { b.to_ascii_lowercase() } else { b };
    let first = bytes.first().copied().map_or(0, lower);
    let last = bytes.last().copied().map_or(0, lower);
    // Truncating the length is fine: this only spreads keys over the filter.
    let x = (bytes.len() as u32) ^ (u32::from(first) << 12) ^ (u32::from(last) << 20);
    let slot = (x.wrapping_mul(0x9E37_79B1) >> 23) as usize; // 9 bits: 0..512
    (slot / 64 % FILTER_WORDS, 1 << (slot % 64))
}

impl StrIndex {
    pub fn new(compare: Compare, words: usize) -> Self {
        Self {
            compare,
            words,
            table: HashMap::default(),
            filter: [0; FILTER_WORDS],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Records that `rule` names `key`.
    pub fn insert(&mut self, key: &str, rule: usize) {
        let key = match self.compare {
            Compare::Exact => key.to_owned(),
            Compare::AsciiCase => key.to_ascii_lowercase(),
            Compare::UnicodeCase => fold(key),
        };
        let (word, bit) = filter_bit(key.as_bytes(), false);
        if let Some(word) = self.filter.get_mut(word) {
            *word |= bit;
        }
        let bucket = self.table.entry(hash(&key, false)).or_default();
        let position = match bucket.iter().position(|e| *e.key == *key) {
            Some(position) => position,
            None => {
                bucket.push(Entry {
                    key: key.into_boxed_str(),
                    rules: empty_bits(self.words),
                });
                bucket.len() - 1
            }
        };
        if let Some(entry) = bucket.get_mut(position) {
            set_bit(&mut entry.rules, rule);
        }
    }

    pub fn get(&self, probe: &str) -> Option<&Entry> {
        if self.table.is_empty() {
            return None;
        }
        let (fold, filter) = match self.compare {
            Compare::Exact => (false, true),
            Compare::AsciiCase if !probe.is_ascii() => return None,
            Compare::AsciiCase => (true, true),
            Compare::UnicodeCase => (true, probe.is_ascii()),
        };
        if filter {
            let (word, bit) = filter_bit(probe.as_bytes(), fold);
            if self.filter.get(word).is_none_or(|word| word & bit == 0) {
                return None;
            }
        }
        let bucket = self.table.get(&hash(probe, fold))?;
        bucket.iter().find(|e| {
            if fold {
                folded_eq(&e.key, probe)
            } else {
                *e.key == *probe
            }
        })
    }
}

/// `s` folded as [`crate::fold`] folds it, owned.
pub(crate) fn fold(s: &str) -> String {
    crate::fold(s).into_owned()
}

/// `folded == fold(probe)`, without building `fold(probe)`.
fn folded_eq(folded: &str, probe: &str) -> bool {
    if probe.is_ascii() {
        folded.len() == probe.len()
            && folded
                .bytes()
                .zip(probe.bytes())
                .all(|(f, p)| f == p.to_ascii_lowercase())
    } else {
        folded
            .chars()
            .eq(probe.chars().flat_map(char::to_lowercase))
    }
}

const K: u64 = 0x517c_c1b7_2722_0a95;

/// A hash of the UTF-8 bytes of `s`, or of `fold(s)` when `fold` is set. Both spellings of the
/// same folded bytes hash alike, whichever path computes it.
fn hash(s: &str, fold: bool) -> u64 {
    let mut state = State::default();
    if !fold {
        state.bytes(s.as_bytes(), false);
    } else if s.is_ascii() {
        state.bytes(s.as_bytes(), true);
    } else {
        for c in s.chars().flat_map(char::to_lowercase) {
            let mut utf8 = [0; 4];
            for &b in c.encode_utf8(&mut utf8).as_bytes() {
                state.byte(b);
            }
        }
    }
    state.finish()
}

/// Eight bytes at a time, little-endian, zero-padded at the end, then the length; mixed with
/// the Fx step and finished with the murmur3 avalanche so the high bits `HashMap` uses are good.
#[derive(Default)]
struct State {
    h: u64,
    word: u64,
    filled: u32,
    len: u64,
}

impl State {
    fn mix(&mut self, word: u64) {
        self.h = (self.h.rotate_left(5) ^ word).wrapping_mul(K);
    }

    fn byte(&mut self, b: u8) {
        self.word |= u64::from(b) << (8 * self.filled);
        self.filled += 1;
        self.len += 1;
        if self.filled == 8 {
            self.mix(self.word);
            self.word = 0;
            self.filled = 0;
        }
    }

    /// Feeds `bytes`; with `lower`, ASCII upper-case letters are lowered on the way (only valid
    /// for ASCII input, which is the only input it is called with).
    fn bytes(&mut self, bytes: &[u8], lower: bool) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut array = [0; 8];
            array.copy_from_slice(chunk);
            let word = u64::from_le_bytes(array);
            self.mix(if lower { ascii_lower_word(word) } else { word });
            self.len += 8;
        }
        for &b in chunks.remainder() {
            self.byte(if lower { b.to_ascii_lowercase() } else { b });
        }
    }

    fn finish(mut self) -> u64 {
        if self.filled > 0 {
            self.mix(self.word);
        }
        self.mix(self.len);
        let mut h = self.h;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Lowers the ASCII capitals among eight ASCII bytes at once.
fn ascii_lower_word(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // With every byte below 0x80 no addition carries into the next byte.
    let at_least_a = word.wrapping_add(ONES * (0x80 - u64::from(b'A')));
    let above_z = word.wrapping_add(ONES * (0x80 - u64::from(b'Z') - 1));
    let upper = at_least_a & !above_z & HIGH;
    word | (upper >> 2)
}

/// The tables are keyed by the hash computed above; hashing it again would only cost time.
#[derive(Default)]
pub(crate) struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used for `u64` keys; this keeps any other use correct.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_lowering_of_words_matches_bytes() {
        let all: Vec<u8> = (0u8..0x80).collect();
        for chunk in all.chunks(8) {
            let mut array = [0; 8];
            array.copy_from_slice(chunk);
            let lowered = ascii_lower_word(u64::from_le_bytes(array)).to_le_bytes();
            let expected: Vec<u8> = chunk.iter().map(u8::to_ascii_lowercase).collect();
            assert_eq!(lowered.as_slice(), expected.as_slice());
        }
    }

    #[test]
    fn folded_hash_agrees_across_spellings() {
        for (a, b) in [
            ("SRE", "sre"),
            ("Platform-Engineering-Leads", "platform-engineering-leads"),
            ("ÉQUIPE Ops", "équipe ops"),
            ("\u{212A}", "k"), // KELVIN SIGN lowers to an ASCII k
            ("", ""),
        ] {
            assert_eq!(hash(a, true), hash(&fold(b), false), "{a} / {b}");
            assert!(folded_eq(&fold(b), a), "{a} / {b}");
        }
        assert_ne!(hash("ab", false), hash("ab\0", false));
        assert!(!folded_eq("sre", "sres"));
        assert!(!folded_eq("équipe", "EQUIPE"));
    }

    #[test]
    fn lookups_fold_only_when_asked() {
        let mut folded = StrIndex::new(Compare::UnicodeCase, 1);
        folded.insert("SRE", 0);
        folded.insert("sre", 3);
        folded.insert("Équipe", 1);
        let entry = folded.get("sRe").map(|e| e.rules.clone());
        assert_eq!(entry.as_deref(), Some([0b1001].as_slice()));
        assert!(folded.get("éQUIPE").is_some());
        assert!(folded.get("sr").is_none());

        let mut ascii = StrIndex::new(Compare::AsciiCase, 1);
        ascii.insert("Corp.Example", 0);
        assert!(ascii.get("CORP.example").is_some());
        assert!(ascii.get("\u{212A}orp.example").is_none());
        let mut unicode = StrIndex::new(Compare::UnicodeCase, 1);
        unicode.insert("kim", 0);
        assert!(unicode.get("\u{212A}IM").is_some());

        let mut exact = StrIndex::new(Compare::Exact, 2);
        exact.insert("00gAbC", 70);
        assert!(exact.get("00gabc").is_none());
        let entry = exact.get("00gAbC").map(|e| e.rules.clone());
        assert_eq!(entry.as_deref(), Some([0, 1 << 6].as_slice()));
        assert!(has_bit(&[0, 1 << 6], 70));
        assert!(!has_bit(&[0, 1 << 6], 6));
        assert!(!has_bit(&[0, 1 << 6], 1000));
    }
}
