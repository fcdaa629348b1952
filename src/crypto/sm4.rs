//! SM4 (GB/T 32907) in CBC mode with PKCS#7 padding and in GCM mode (RFC 8998), plus random
//! keys and IVs from the operating system.
//!
//! Owns symmetric encryption. Keys and decrypted plaintexts are secrets: decryption output is
//! returned in wiped-on-drop buffers, and nothing here may log or format keys or plaintexts.
//! CBC has no integrity protection: callers must authenticate CBC ciphertexts (HMAC-SM3 or an
//! SM2 signature) before decrypting them, and must not tell a remote peer whether padding or
//! something else failed, or they build a padding oracle.

use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload, consts::U12};
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
use zeroize::Zeroizing;

use super::CryptoError;

pub const KEY_LEN: usize = 16;
pub const BLOCK_LEN: usize = 16;
pub const IV_LEN: usize = 16;
pub const GCM_NONCE_LEN: usize = 12;
pub const GCM_TAG_LEN: usize = 16;

type Sm4CbcEncryptor = cbc::Encryptor<sm4::Sm4>;
type Sm4CbcDecryptor = cbc::Decryptor<sm4::Sm4>;
/// RFC 8998 SM4-GCM: the generic GCM construction over SM4 with a 96-bit nonce and 128-bit tag.
type Sm4Gcm = aes_gcm::AesGcm<sm4::Sm4, U12>;

/// SM4-CBC encryption with PKCS#7 padding; the output is 1 to 16 bytes longer than the input.
/// Never reuse an IV with the same key: use [`random_iv`].
pub fn cbc_encrypt(key: &[u8; KEY_LEN], iv: &[u8; IV_LEN], plaintext: &[u8]) -> Vec<u8> {
    Sm4CbcEncryptor::new(key.into(), iv.into()).encrypt_padded_vec::<Pkcs7>(plaintext)
}

/// SM4-CBC decryption and PKCS#7 unpadding.
pub fn cbc_decrypt(
    key: &[u8; KEY_LEN],
    iv: &[u8; IV_LEN],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(BLOCK_LEN) {
        return Err(CryptoError::Sm4CbcLength {
            len: ciphertext.len(),
        });
    }
    // Decrypt in a buffer that is wiped however we leave this function, including the
    // bad-padding path where it holds garbage derived from the key.
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let plaintext_len = Sm4CbcDecryptor::new(key.into(), iv.into())
        .decrypt_padded::<Pkcs7>(buffer.as_mut_slice())
        .map_err(|_| CryptoError::Sm4CbcPadding)?
        .len();
    buffer.truncate(plaintext_len);
    Ok(buffer)
}

/// SM4-GCM encryption; returns ciphertext || 16-byte tag. A nonce must never repeat under one
/// key (random 96-bit nonces are safe for up to 2^32 messages per key).
pub fn gcm_encrypt(
    key: &[u8; KEY_LEN],
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    Sm4Gcm::new(key.into())
        .encrypt(
            nonce.into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Sm4GcmTooLong)
}

/// SM4-GCM decryption of ciphertext || tag. The tag is checked (in constant time) before any
/// plaintext is produced.
pub fn gcm_decrypt(
    key: &[u8; KEY_LEN],
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if ciphertext_and_tag.len() < GCM_TAG_LEN {
        return Err(CryptoError::Sm4GcmTooShort {
            len: ciphertext_and_tag.len(),
        });
    }
    let mut buffer = Zeroizing::new(ciphertext_and_tag.to_vec());
    let buffer_vec: &mut Vec<u8> = &mut buffer;
    Sm4Gcm::new(key.into())
        .decrypt_in_place(nonce.into(), aad, buffer_vec)
        .map_err(|_| CryptoError::Sm4GcmAuthentication)?;
    Ok(buffer)
}

/// A fresh SM4 key from the operating system RNG.
pub fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(key.as_mut_slice()).map_err(|error| CryptoError::Rng(error.to_string()))?;
    Ok(key)
}

/// A fresh CBC IV from the operating system RNG.
pub fn random_iv() -> Result<[u8; IV_LEN], CryptoError> {
    let mut iv = [0u8; IV_LEN];
    getrandom::fill(&mut iv).map_err(|error| CryptoError::Rng(error.to_string()))?;
    Ok(iv)
}

/// A fresh 96-bit GCM nonce from the operating system RNG.
pub fn random_gcm_nonce() -> Result<[u8; GCM_NONCE_LEN], CryptoError> {
    let mut nonce = [0u8; GCM_NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|error| CryptoError::Rng(error.to_string()))?;
    Ok(nonce)
}

/// RFC 8998 Appendix A.1 SM4-GCM test vector, shared by the start-up self-test and unit tests.
pub(crate) struct GcmVector {
    pub key: [u8; KEY_LEN],
    pub nonce: [u8; GCM_NONCE_LEN],
    pub aad_hex: &'static str,
    pub plaintext_hex: &'static str,
    pub ciphertext_hex: &'static str,
    pub tag_hex: &'static str,
}

pub(crate) const RFC8998_GCM_VECTOR: GcmVector = GcmVector {
    key: [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ],
    nonce: [
        0x00, 0x00, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x00, 0x00, 0xab, 0xcd,
    ],
    aad_hex: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
    plaintext_hex: "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd\
                    eeeeeeeeeeeeeeeeffffffffffffffffeeeeeeeeeeeeeeeeaaaaaaaaaaaaaaaa",
    ciphertext_hex: "17f399f08c67d5ee19d0dc9969c4bb7d5fd46fd3756489069157b282bb200735\
                     d82710ca5c22f0ccfa7cbf93d496ac15a56834cbcf98c397b4024a2691233b8d",
    tag_hex: "83de3541e4c2b58177e065a9bf7b62ec",
};

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; KEY_LEN] = [7u8; KEY_LEN];
    const IV: [u8; IV_LEN] = [9u8; IV_LEN];

    #[test]
    fn cbc_roundtrip_and_padding_lengths() {
        for len in [0usize, 1, 15, 16, 17, 31, 32, 100] {
            let plaintext = vec![0x42u8; len];
            let ciphertext = cbc_encrypt(&KEY, &IV, &plaintext);
            assert_eq!(ciphertext.len(), (len / 16 + 1) * 16, "length {len}");
            assert_eq!(
                cbc_decrypt(&KEY, &IV, &ciphertext).unwrap().as_slice(),
                plaintext
            );
        }
    }

    #[test]
    fn cbc_rejects_bad_lengths_and_padding() {
        assert!(matches!(
            cbc_decrypt(&KEY, &IV, &[]),
            Err(CryptoError::Sm4CbcLength { len: 0 })
        ));
        assert!(matches!(
            cbc_decrypt(&KEY, &IV, &[0u8; 17]),
            Err(CryptoError::Sm4CbcLength { len: 17 })
        ));
        // Decrypting under the wrong key yields random padding bytes; over many keys almost all
        // must be rejected, and none may panic.
        let ciphertext = cbc_encrypt(&KEY, &IV, b"sixteen byte msg");
        let rejected = (0..=255u8)
            .filter(|&b| {
                let mut wrong_key = KEY;
                wrong_key[0] = b;
                b != KEY[0] && cbc_decrypt(&wrong_key, &IV, &ciphertext).is_err()
            })
            .count();
        assert!(rejected > 230, "only {rejected} of 255 wrong keys rejected");
    }

    #[test]
    fn gcm_rejects_tampering_and_short_input() {
        let nonce = [1u8; GCM_NONCE_LEN];
        let sealed = gcm_encrypt(&KEY, &nonce, b"aad", b"payload").unwrap();
        assert_eq!(sealed.len(), 7 + GCM_TAG_LEN);
        assert_eq!(
            gcm_decrypt(&KEY, &nonce, b"aad", &sealed)
                .unwrap()
                .as_slice(),
            b"payload"
        );
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x80;
            assert!(matches!(
                gcm_decrypt(&KEY, &nonce, b"aad", &tampered),
                Err(CryptoError::Sm4GcmAuthentication)
            ));
        }
        assert!(gcm_decrypt(&KEY, &nonce, b"AAD", &sealed).is_err());
        assert!(gcm_decrypt(&KEY, &[2u8; GCM_NONCE_LEN], b"aad", &sealed).is_err());
        assert!(matches!(
            gcm_decrypt(&KEY, &nonce, b"aad", &sealed[..15]),
            Err(CryptoError::Sm4GcmTooShort { len: 15 })
        ));
        let empty = gcm_encrypt(&KEY, &nonce, b"", b"").unwrap();
        assert_eq!(empty.len(), GCM_TAG_LEN);
        assert!(gcm_decrypt(&KEY, &nonce, b"", &empty).unwrap().is_empty());
    }

    #[test]
    fn random_values_differ() {
        assert_ne!(*random_key().unwrap(), *random_key().unwrap());
        assert_ne!(random_iv().unwrap(), random_iv().unwrap());
        assert_ne!(random_gcm_nonce().unwrap(), random_gcm_nonce().unwrap());
    }
}
