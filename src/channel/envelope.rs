//! The digital envelope that protects sensitive fields (account number, account name, id number,
//! phone) inside a signed message.
//!
//! The sender draws a fresh 16-byte SM4 key per message, encrypts it to the receiver's SM2
//! encryption key (C1C3C2 unless configured otherwise) and puts it base64-encoded in
//! `<DgtlEnvlp>`. Each sensitive field is then `base64(nonce[12] || SM4-GCM(ciphertext || tag[16]))`
//! with the field's element name as associated data, so a ciphertext moved from `<PhoneNo>` to
//! `<AcctNo>` fails to open.
//!
//! Owns: sealing and opening envelopes and fields. Must never: reuse a nonce under one key
//! (nonces are random and a key encrypts at most a handful of fields), or return plaintext
//! outside a zeroizing buffer.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::crypto::sm2::{self, CipherOrder, PrivateKey, PublicKey};
use crate::crypto::sm4;

/// Fields that are always encrypted on the wire.
pub const SENSITIVE_FIELDS: &[&str] = &["AcctNo", "AcctNm", "IdNo", "PhoneNo"];

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("<DgtlEnvlp> is not base64")]
    EnvelopeNotBase64,
    #[error(
        "<DgtlEnvlp> cannot be opened with our encryption key (wrong EncSN, wrong key, or tampered)"
    )]
    EnvelopeNotOpenable,
    #[error("<DgtlEnvlp> holds {0} bytes, not a 16-byte SM4 key")]
    WrongKeyLength(usize),
    #[error("<{0}> is not base64")]
    FieldNotBase64(String),
    #[error("<{0}> is too short to hold a nonce and a tag")]
    FieldTooShort(String),
    #[error(
        "<{0}> does not decrypt under the envelope key (tampered, or encrypted for another field)"
    )]
    FieldNotOpenable(String),
    #[error("<{0}> is not UTF-8 after decryption")]
    FieldNotUtf8(String),
    #[error("encryption failed: {0}")]
    Seal(String),
}

/// The per-message SM4 key, wiped on drop.
pub struct MessageKey(Zeroizing<[u8; 16]>);

impl MessageKey {
    pub fn generate() -> Result<MessageKey, EnvelopeError> {
        sm4::random_key()
            .map(MessageKey)
            .map_err(|e| EnvelopeError::Seal(e.to_string()))
    }

    pub fn from_bytes(bytes: [u8; 16]) -> MessageKey {
        MessageKey(Zeroizing::new(bytes))
    }

    /// `<DgtlEnvlp>` content for the receiver's public encryption key.
    pub fn seal(&self, receiver: &PublicKey, order: CipherOrder) -> Result<String, EnvelopeError> {
        let ciphertext = sm2::encrypt(receiver, self.0.as_ref(), order)
            .map_err(|e| EnvelopeError::Seal(e.to_string()))?;
        Ok(BASE64.encode(ciphertext))
    }

    pub fn open(
        envelope_b64: &str,
        ours: &PrivateKey,
        order: CipherOrder,
    ) -> Result<MessageKey, EnvelopeError> {
        let ciphertext = BASE64
            .decode(envelope_b64.trim())
            .map_err(|_| EnvelopeError::EnvelopeNotBase64)?;
        let plaintext = sm2::decrypt(ours, &ciphertext, order)
            .map_err(|_| EnvelopeError::EnvelopeNotOpenable)?;
        let bytes: [u8; 16] = plaintext
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::WrongKeyLength(plaintext.len()))?;
        Ok(MessageKey::from_bytes(bytes))
    }

    pub fn encrypt_field(&self, field: &str, plaintext: &str) -> Result<String, EnvelopeError> {
        let nonce = sm4::random_gcm_nonce().map_err(|e| EnvelopeError::Seal(e.to_string()))?;
        self.encrypt_field_with_nonce(field, plaintext, &nonce)
    }

    /// Deterministic form for the documented worked example; production uses random nonces.
    pub fn encrypt_field_with_nonce(
        &self,
        field: &str,
        plaintext: &str,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<String, EnvelopeError> {
        let sealed = sm4::gcm_encrypt(&self.0, nonce, field.as_bytes(), plaintext.as_bytes())
            .map_err(|e| EnvelopeError::Seal(e.to_string()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        Ok(BASE64.encode(out))
    }

    pub fn decrypt_field(
        &self,
        field: &str,
        value_b64: &str,
    ) -> Result<Zeroizing<String>, EnvelopeError> {
        let raw = BASE64
            .decode(value_b64.trim())
            .map_err(|_| EnvelopeError::FieldNotBase64(field.to_string()))?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(EnvelopeError::FieldTooShort(field.to_string()));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        let plaintext = sm4::gcm_decrypt(&self.0, nonce, field.as_bytes(), sealed)
            .map_err(|_| EnvelopeError::FieldNotOpenable(field.to_string()))?;
        let text = String::from_utf8(plaintext.to_vec())
            .map_err(|_| EnvelopeError::FieldNotUtf8(field.to_string()))?;
        Ok(Zeroizing::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_open_only_under_their_own_name_and_key() {
        let receiver = PrivateKey::generate().unwrap();
        let key = MessageKey::generate().unwrap();
        let envelope = key
            .seal(&receiver.public_key(), CipherOrder::C1C3C2)
            .unwrap();
        let opened = MessageKey::open(&envelope, &receiver, CipherOrder::C1C3C2).unwrap();
        let account = key.encrypt_field("AcctNo", "6222021234567890123").unwrap();
        assert_eq!(
            opened.decrypt_field("AcctNo", &account).unwrap().as_str(),
            "6222021234567890123"
        );
        assert_eq!(
            opened.decrypt_field("PhoneNo", &account).unwrap_err(),
            EnvelopeError::FieldNotOpenable("PhoneNo".into())
        );
        let stranger = PrivateKey::generate().unwrap();
        assert_eq!(
            MessageKey::open(&envelope, &stranger, CipherOrder::C1C3C2).err(),
            Some(EnvelopeError::EnvelopeNotOpenable)
        );
        assert_eq!(
            MessageKey::open(&envelope, &receiver, CipherOrder::C1C2C3).err(),
            Some(EnvelopeError::EnvelopeNotOpenable),
            "the wrong ciphertext order does not open"
        );
    }
}
