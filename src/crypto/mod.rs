//! SM2/SM3/SM4 for kunpay: the only place where the daemon touches key material.
//!
//! This module owns the error type shared by the primitives and the start-up self-test. The
//! primitives themselves live in `sm2`, `sm3` and `sm4`; reading and writing key files lives in
//! `keyfile`. Nothing in here may log, print or put key bytes, passphrases or plaintexts into an
//! error message: errors say what was wrong and where, never with which bytes.

mod fixed_base;
pub mod keyfile;
pub mod sm2;
pub mod sm3;
pub mod sm4;

use std::fmt;

pub use self::keyfile::{
    KeyFileError, PassphraseSource, load_private_key, load_public_key, write_private_key,
    write_public_key,
};
pub use self::sm2::{
    CipherOrder, DEFAULT_DISTID, PrivateKey, PublicKey, SignatureFormat, Signer, Verifier,
};
pub use self::sm3::{Sm3, hmac_sm3, hmac_sm3_verify};

/// What went wrong in a cryptographic operation. Messages name the operation and the defect and
/// never contain key bytes, passphrases or plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("{what}: not valid PEM ({reason})")]
    Pem { what: &'static str, reason: String },

    #[error("{what}: expected a PEM block labelled \"{expected}\" but found \"{found}\"{hint}")]
    PemLabel {
        what: &'static str,
        expected: &'static str,
        found: String,
        hint: &'static str,
    },

    #[error("{what}: malformed ({reason})")]
    MalformedKey { what: &'static str, reason: String },

    #[error("{what}: not an SM2 key ({detail})")]
    NotSm2Key { what: &'static str, detail: String },

    #[error(
        "private key is encrypted (PEM label \"ENCRYPTED PRIVATE KEY\") and no passphrase was given"
    )]
    KeyIsEncrypted,

    #[error(
        "a passphrase was given but the private key is not encrypted (PEM label \"PRIVATE KEY\")"
    )]
    KeyIsNotEncrypted,

    #[error("wrong passphrase for the encrypted private key (or the encrypted data is corrupted)")]
    WrongPassphrase,

    #[error("refusing an empty passphrase for private key encryption")]
    EmptyPassphrase,

    #[error("encrypted private key uses an unsupported protection scheme: {0}")]
    UnsupportedKeyEncryption(String),

    #[error("could not encode {what}: {reason}")]
    KeyEncoding { what: &'static str, reason: String },

    #[error("invalid SM2 distinguishing id: {0}")]
    InvalidDistId(&'static str),

    #[error("invalid {setting} {value:?}: expected {expected}")]
    InvalidSetting {
        setting: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("malformed SM2 signature in {format} encoding: {reason}")]
    MalformedSignature {
        format: sm2::SignatureFormat,
        reason: &'static str,
    },

    #[error(
        "SM2 signature does not verify for this message, public key and distinguishing id \
         (a wrong distinguishing id is the usual cause when the peer uses OpenSSL defaults)"
    )]
    SignatureMismatch,

    #[error("SM2 signing failed ({0})")]
    SigningFailed(&'static str),

    #[error("SM2 encryption failed ({0})")]
    Sm2EncryptFailed(&'static str),

    #[error("malformed SM2 ciphertext: {0}")]
    MalformedSm2Ciphertext(String),

    #[error(
        "SM2 decryption failed: the C3 hash does not match (wrong private key, ciphertext not in \
         {order} order, or tampered ciphertext)"
    )]
    Sm2DecryptFailed { order: sm2::CipherOrder },

    #[error("SM4-CBC ciphertext length {len} is not a positive multiple of 16 bytes")]
    Sm4CbcLength { len: usize },

    #[error(
        "SM4-CBC padding is invalid after decryption (wrong key or IV, or tampered ciphertext)"
    )]
    Sm4CbcPadding,

    #[error("SM4-GCM input is {len} bytes, shorter than the 16-byte authentication tag")]
    Sm4GcmTooShort { len: usize },

    #[error("SM4-GCM input or associated data exceeds the GCM length limits")]
    Sm4GcmTooLong,

    #[error(
        "SM4-GCM authentication failed (wrong key, nonce or associated data, or tampered ciphertext)"
    )]
    Sm4GcmAuthentication,

    #[error("the operating system random number generator failed: {0}")]
    Rng(String),

    #[error("crypto self-test \"{test}\" failed: {reason}")]
    SelfTest { test: &'static str, reason: String },
}

impl CryptoError {
    fn self_test(test: &'static str, reason: impl fmt::Display) -> Self {
        CryptoError::SelfTest {
            test,
            reason: reason.to_string(),
        }
    }
}

/// GB/T 32918 / GM/T 0003 example: the signer's key pair and "message digest" signed with the
/// distinguishing id 1234567812345678 (the same vector as `../shared/testdata/sm2-gbt32918-annex-a`).
mod annex_a {
    /// Published in the standard; a test vector, not a secret.
    pub const PRIVATE_KEY: &str =
        "3945208f7b2144b13f36e38ac6d39f95889393692860b51a42fb81ef4df7c5b8";
    pub const PUBLIC_KEY_SEC1: &str = "04\
        09f9df311e5421a150dd7d161e4bc5c672179fad1833fc076bb08ff356f35020\
        ccea490ce26775a52dc6ea718cc1aa600aed05fbf35e084a6632f6072da9ad13";
    pub const MESSAGE: &[u8] = b"message digest";
    pub const DISTID: &str = "1234567812345678";
    pub const SIGNATURE_RAW: &str = "\
        f5a03b0648d2c4630eeac513e1bb81a15944da3827d5b74143ac7eaceee720b3\
        b1b6aa29df212fd8763182bc0d421ca1bb9038fd1f7f42d4840b69c485bbc1aa";
}

/// Known-answer tests run once at daemon start, so that a miscompiled or tampered build refuses to
/// handle money instead of producing wrong signatures. Takes a few milliseconds in release builds.
pub fn self_test() -> Result<(), CryptoError> {
    self_test_sm3()?;
    self_test_sm4()?;
    self_test_sm2()?;
    Ok(())
}

fn expect_equal(test: &'static str, actual: &[u8], expected_hex: &str) -> Result<(), CryptoError> {
    let expected = hex::decode(expected_hex)
        .map_err(|error| CryptoError::self_test(test, format!("bad constant: {error}")))?;
    if actual == expected.as_slice() {
        Ok(())
    } else {
        Err(CryptoError::self_test(
            test,
            format!("got {}, expected {expected_hex}", hex::encode(actual)),
        ))
    }
}

fn self_test_sm3() -> Result<(), CryptoError> {
    expect_equal(
        "SM3 \"abc\"",
        &sm3::digest(b"abc"),
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
    )?;
    // Value computed with `openssl mac -digest SM3 -macopt key:kunpay-self-test HMAC`.
    let tag = hmac_sm3(b"kunpay-self-test", b"abc");
    expect_equal(
        "HMAC-SM3",
        &tag,
        "00834099e9ccafb9a44e948840cf5c333f0cfa7ee6dd0dec40b3c744f048314f",
    )?;
    if !hmac_sm3_verify(b"kunpay-self-test", b"abc", &tag) {
        return Err(CryptoError::self_test(
            "HMAC-SM3",
            "verify rejected a correct tag",
        ));
    }
    Ok(())
}

fn self_test_sm4() -> Result<(), CryptoError> {
    const GBT_32907_KEY_AND_PLAINTEXT: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ];
    let key = GBT_32907_KEY_AND_PLAINTEXT;
    // With a zero IV the first CBC block is the bare block cipher output.
    let ciphertext = sm4::cbc_encrypt(&key, &[0u8; 16], &GBT_32907_KEY_AND_PLAINTEXT);
    expect_equal(
        "SM4 GB/T 32907 block",
        ciphertext.get(..16).unwrap_or_default(),
        "681edf34d206965e86b3e94f536e4246",
    )?;
    let decrypted = sm4::cbc_decrypt(&key, &[0u8; 16], &ciphertext)
        .map_err(|error| CryptoError::self_test("SM4-CBC roundtrip", error))?;
    if decrypted.as_slice() != GBT_32907_KEY_AND_PLAINTEXT {
        return Err(CryptoError::self_test(
            "SM4-CBC roundtrip",
            "decryption did not return the plaintext",
        ));
    }

    let vector = &sm4::RFC8998_GCM_VECTOR;
    let decode = |hex_text: &str| {
        hex::decode(hex_text).map_err(|error| {
            CryptoError::self_test("SM4-GCM RFC 8998", format!("bad constant: {error}"))
        })
    };
    let aad = decode(vector.aad_hex)?;
    let plaintext = decode(vector.plaintext_hex)?;
    let sealed = sm4::gcm_encrypt(&vector.key, &vector.nonce, &aad, &plaintext)
        .map_err(|error| CryptoError::self_test("SM4-GCM RFC 8998", error))?;
    expect_equal(
        "SM4-GCM RFC 8998",
        &sealed,
        &format!("{}{}", vector.ciphertext_hex, vector.tag_hex),
    )?;
    let opened = sm4::gcm_decrypt(&vector.key, &vector.nonce, &aad, &sealed)
        .map_err(|error| CryptoError::self_test("SM4-GCM RFC 8998 decrypt", error))?;
    if opened.as_slice() != plaintext.as_slice() {
        return Err(CryptoError::self_test(
            "SM4-GCM RFC 8998 decrypt",
            "decryption did not return the plaintext",
        ));
    }
    Ok(())
}

fn self_test_sm2() -> Result<(), CryptoError> {
    let public_sec1 = hex::decode(annex_a::PUBLIC_KEY_SEC1)
        .map_err(|error| CryptoError::self_test("SM2 Annex A", error))?;
    let annex_public = PublicKey::from_sec1_bytes(&public_sec1)
        .map_err(|error| CryptoError::self_test("SM2 Annex A public key", error))?;

    // Scalar multiplication KAT: the standard's private key must give the standard's public key.
    let derived = sm2::public_key_from_scalar_hex(annex_a::PRIVATE_KEY)
        .map_err(|error| CryptoError::self_test("SM2 Annex A key pair", error))?;
    if derived != annex_public {
        return Err(CryptoError::self_test(
            "SM2 Annex A key pair",
            "private key does not yield the published public key",
        ));
    }

    let annex_signature = hex::decode(annex_a::SIGNATURE_RAW)
        .map_err(|error| CryptoError::self_test("SM2 Annex A", error))?;
    let verifier = Verifier::new(&annex_public, annex_a::DISTID)
        .map_err(|error| CryptoError::self_test("SM2 Annex A", error))?;
    verifier
        .verify(annex_a::MESSAGE, &annex_signature, SignatureFormat::Raw)
        .map_err(|error| CryptoError::self_test("SM2 Annex A signature", error))?;
    if verifier
        .verify(b"message digesT", &annex_signature, SignatureFormat::Raw)
        .is_ok()
    {
        return Err(CryptoError::self_test(
            "SM2 Annex A signature",
            "a signature over a different message was accepted",
        ));
    }

    let fresh_key = PrivateKey::generate()?;
    let signer = Signer::new(&fresh_key, DEFAULT_DISTID)
        .map_err(|error| CryptoError::self_test("SM2 sign/verify", error))?;
    let fresh_verifier = Verifier::new(&fresh_key.public_key(), DEFAULT_DISTID)
        .map_err(|error| CryptoError::self_test("SM2 sign/verify", error))?;
    let message = b"kunpay self-test";
    for format in [SignatureFormat::Der, SignatureFormat::Raw] {
        let signature = signer
            .sign(message, format)
            .map_err(|error| CryptoError::self_test("SM2 sign/verify", error))?;
        fresh_verifier
            .verify(message, &signature, format)
            .map_err(|error| CryptoError::self_test("SM2 sign/verify", error))?;
    }

    let ciphertext = sm2::encrypt(&fresh_key.public_key(), message, CipherOrder::C1C3C2)
        .map_err(|error| CryptoError::self_test("SM2 encrypt/decrypt", error))?;
    let plaintext = sm2::decrypt(&fresh_key, &ciphertext, CipherOrder::C1C3C2)
        .map_err(|error| CryptoError::self_test("SM2 encrypt/decrypt", error))?;
    if plaintext.as_slice() != message {
        return Err(CryptoError::self_test(
            "SM2 encrypt/decrypt",
            "decryption did not return the plaintext",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_passes() {
        self_test().unwrap();
    }

    #[test]
    fn crypto_types_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Signer>();
        assert_send_sync::<Verifier>();
        assert_send_sync::<PrivateKey>();
        assert_send_sync::<PublicKey>();
        assert_send_sync::<CryptoError>();
        assert_send_sync::<KeyFileError>();
    }
}
