//! SM3 hashing (GB/T 32905) and HMAC-SM3.
//!
//! Owns message digests and MACs. HMAC keys are secrets: they are only ever held in buffers that
//! are wiped on drop and must never be logged or copied into error messages. MAC comparison must
//! stay constant-time.

use hmac::{KeyInit, Mac};
use sm3::Digest;
use zeroize::Zeroizing;

/// Length of an SM3 digest and of an HMAC-SM3 tag, in bytes.
pub const DIGEST_LEN: usize = 32;

/// SM3 input block length in bytes; HMAC keys longer than this are hashed first (RFC 2104).
const BLOCK_LEN: usize = 64;

type HmacSm3 = hmac::Hmac<sm3::Sm3>;

/// One-shot SM3 digest.
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    sm3::Sm3::digest(data).into()
}

/// Streaming SM3 hasher for inputs that arrive in pieces; gives the same result as [`digest`]
/// over the concatenation.
#[derive(Clone, Default)]
pub struct Sm3 {
    state: sm3::Sm3,
}

impl Sm3 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        Digest::update(&mut self.state, data);
    }

    pub fn finalize(self) -> [u8; DIGEST_LEN] {
        self.state.finalize().into()
    }
}

// The hash state can be derived from secret input (e.g. when hashing a long HMAC key), so it is
// never printed.
impl std::fmt::Debug for Sm3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sm3 { .. }")
    }
}

/// HMAC-SM3 (RFC 2104 with SM3) over `data`, for keys of any length.
pub fn hmac_sm3(key: &[u8], data: &[u8]) -> [u8; DIGEST_LEN] {
    let mut mac = keyed_hmac(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Checks an HMAC-SM3 tag in constant time. A tag of the wrong length is simply rejected (the
/// length is not secret).
pub fn hmac_sm3_verify(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    let mut mac = keyed_hmac(key);
    mac.update(data);
    mac.verify_slice(tag).is_ok()
}

/// RFC 2104 §2 key preparation done here rather than by `new_from_slice`, so that building the
/// MAC is infallible without an `expect`: keys longer than the block are replaced by their hash,
/// and all keys are zero-padded to the block length (which is exactly what HMAC does with them).
fn keyed_hmac(key: &[u8]) -> HmacSm3 {
    let mut block = Zeroizing::new([0u8; BLOCK_LEN]);
    if key.len() > BLOCK_LEN {
        let hashed_key = Zeroizing::new(digest(key));
        block[..DIGEST_LEN].copy_from_slice(hashed_key.as_slice());
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let hmac_key: &hmac::digest::Key<HmacSm3> = (&*block).into();
    HmacSm3::new(hmac_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_matches_one_shot_across_block_boundaries() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for split in [0, 1, 55, 56, 63, 64, 65, 128, 999, 1000] {
            let mut hasher = Sm3::new();
            hasher.update(&data[..split]);
            hasher.update(&data[split..]);
            assert_eq!(hasher.finalize(), digest(&data), "split at {split}");
        }
    }

    #[test]
    fn hmac_key_preparation_matches_rfc2104() {
        // A key of exactly one block is used as is; a longer key is hashed. Both must agree with
        // the definition HMAC(K, m) = H((K0 ^ opad) || H((K0 ^ ipad) || m)).
        fn reference(key: &[u8], data: &[u8]) -> [u8; 32] {
            let mut k0 = [0u8; BLOCK_LEN];
            if key.len() > BLOCK_LEN {
                k0[..32].copy_from_slice(&digest(key));
            } else {
                k0[..key.len()].copy_from_slice(key);
            }
            let mut inner = Sm3::new();
            inner.update(&k0.map(|b| b ^ 0x36));
            inner.update(data);
            let inner = inner.finalize();
            let mut outer = Sm3::new();
            outer.update(&k0.map(|b| b ^ 0x5c));
            outer.update(&inner);
            outer.finalize()
        }
        for key_len in [0, 1, 16, 63, 64, 65, 200] {
            let key = vec![0xa5u8; key_len];
            assert_eq!(
                hmac_sm3(&key, b"payload"),
                reference(&key, b"payload"),
                "key length {key_len}"
            );
        }
    }

    #[test]
    fn hmac_verify_rejects_wrong_or_truncated_tags() {
        let tag = hmac_sm3(b"key", b"data");
        assert!(hmac_sm3_verify(b"key", b"data", &tag));
        let mut flipped = tag;
        flipped[31] ^= 1;
        assert!(!hmac_sm3_verify(b"key", b"data", &flipped));
        assert!(!hmac_sm3_verify(b"key", b"data", &tag[..16]));
        assert!(!hmac_sm3_verify(b"key", b"data", &[]));
        assert!(!hmac_sm3_verify(b"other key", b"data", &tag));
    }
}
