//! SM2 (GB/T 32918) keys, signatures and public-key encryption.
//!
//! Owns SM2 key objects and their PEM encodings (PKCS#8, encrypted PKCS#8, SPKI, as written and
//! read by `openssl genpkey -algorithm SM2` / `openssl pkey`), signing and verification with an
//! explicit distinguishing id, and SM2 encryption in C1C3C2 or C1C2C3 order.
//!
//! Must never: print, log or put private-key bytes, passphrases or decrypted plaintext into an
//! error or `Debug` output; default the distinguishing id silently (OpenSSL's default is the
//! empty id, which does not interoperate with the GB/T default `1234567812345678`).
//!
//! Zeroization: `PrivateKey` holds an `elliptic_curve::SecretKey`, which wipes its scalar on drop
//! (checked at compile time below). sm2 0.14's `SigningKey` and `DecryptingKey` keep a copy of the
//! scalar that they do NOT wipe on drop; a `Signer` should therefore be created once per key and
//! kept, not created per request, and `decrypt` keeps its copy for the shortest possible time.

use std::fmt;
use std::str::FromStr;

use ::sm2::dsa::signature::RandomizedSigner;
use ::sm2::dsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use ::sm2::elliptic_curve::sec1::ToSec1Point;
use ::sm2::pke::{Cipher, DecryptingKey, EncryptingKey, Mode};
use ::sm2::{SecretKey, Sm2};
use getrandom::SysRng;
use pkcs8::der::AnyRef;
use pkcs8::der::pem;
use pkcs8::pkcs5::pbes2;
use pkcs8::spki::EncodePublicKey;
use pkcs8::{
    AlgorithmIdentifierRef, AssociatedOid, EncodePrivateKey, EncryptedPrivateKeyInfoRef,
    LineEnding, ObjectIdentifier, PrivateKeyInfoRef, SubjectPublicKeyInfoRef,
};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use super::CryptoError;

/// The GB/T 32918 / GM/T 0009 default distinguishing id. Peers that use OpenSSL without
/// `-pkeyopt distid:...` sign with an empty id instead; UnionPay uses the certificate serial in
/// decimal. Make the id configurable per counterparty.
pub const DEFAULT_DISTID: &str = "1234567812345678";

/// PBKDF2-HMAC-SHA256 iteration count for encrypted private keys written by us (OWASP 2023
/// guidance for PBKDF2-SHA256). OpenSSL's own default is only 2048; we read those too.
pub const PBKDF2_ITERATIONS: u32 = 600_000;

/// Bytes in an SM2 field element / scalar.
const FIELD_LEN: usize = 32;
/// Bytes in an uncompressed SEC1 point: 0x04 || x || y.
pub const UNCOMPRESSED_POINT_LEN: usize = 1 + 2 * FIELD_LEN;
/// Bytes in a raw r || s signature.
pub const RAW_SIGNATURE_LEN: usize = 2 * FIELD_LEN;
/// Bytes in the SM3 hash C3 of an SM2 ciphertext.
const C3_LEN: usize = 32;
/// ENTL, the bit length of the distinguishing id, is a 16-bit field.
const MAX_DISTID_LEN: usize = (u16::MAX / 8) as usize;

const SM2_CURVE_OID: ObjectIdentifier = <Sm2 as AssociatedOid>::OID;
const EC_PUBLIC_KEY_OID: ObjectIdentifier = ::sm2::elliptic_curve::ALGORITHM_OID;

const PRIVATE_KEY_LABEL: &str = "PRIVATE KEY";
const ENCRYPTED_PRIVATE_KEY_LABEL: &str = "ENCRYPTED PRIVATE KEY";
const PUBLIC_KEY_LABEL: &str = "PUBLIC KEY";

const WHAT_PRIVATE_KEY: &str = "SM2 private key";
const WHAT_ENCRYPTED_PRIVATE_KEY: &str = "encrypted SM2 private key";
const WHAT_PUBLIC_KEY: &str = "SM2 public key";

// The claim "PrivateKey is wiped on drop" rests on this bound; if a future elliptic-curve release
// dropped the impl, the build fails here instead of silently leaving keys in memory.
const _: () = {
    const fn wiped_on_drop<T: ZeroizeOnDrop>() {}
    wiped_on_drop::<SecretKey>();
};

/// How a signature is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureFormat {
    /// ASN.1 DER `SEQUENCE { r INTEGER, s INTEGER }`, as OpenSSL and most Java stacks produce.
    Der,
    /// 64 bytes, r || s, each big-endian and zero-padded to 32 bytes.
    Raw,
}

impl fmt::Display for SignatureFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureFormat::Der => "der",
            SignatureFormat::Raw => "raw",
        })
    }
}

impl FromStr for SignatureFormat {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("der") {
            Ok(SignatureFormat::Der)
        } else if text.eq_ignore_ascii_case("raw") {
            Ok(SignatureFormat::Raw)
        } else {
            Err(CryptoError::InvalidSetting {
                setting: "SM2 signature format",
                value: text.to_owned(),
                expected: "\"der\" or \"raw\"",
            })
        }
    }
}

/// Order of the parts of an SM2 ciphertext after C1. GB/T 32918-2016 uses C1C3C2; the 2010 draft
/// and some older peers use C1C2C3. The two cannot be told apart from the bytes alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CipherOrder {
    #[default]
    C1C3C2,
    C1C2C3,
}

impl CipherOrder {
    fn mode(self) -> Mode {
        match self {
            CipherOrder::C1C3C2 => Mode::C1C3C2,
            CipherOrder::C1C2C3 => Mode::C1C2C3,
        }
    }
}

impl fmt::Display for CipherOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CipherOrder::C1C3C2 => "C1C3C2",
            CipherOrder::C1C2C3 => "C1C2C3",
        })
    }
}

impl FromStr for CipherOrder {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("C1C3C2") {
            Ok(CipherOrder::C1C3C2)
        } else if text.eq_ignore_ascii_case("C1C2C3") {
            Ok(CipherOrder::C1C2C3)
        } else {
            Err(CryptoError::InvalidSetting {
                setting: "SM2 ciphertext order",
                value: text.to_owned(),
                expected: "\"C1C3C2\" or \"C1C2C3\"",
            })
        }
    }
}

/// An SM2 public key (a point on the SM2 curve, never the identity).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    point: ::sm2::PublicKey,
}

impl PublicKey {
    /// Reads an SPKI `PUBLIC KEY` PEM block, as written by `openssl pkey -pubout`.
    pub fn from_public_key_pem(pem_text: &str) -> Result<Self, CryptoError> {
        let (label, der) = decode_pem(WHAT_PUBLIC_KEY, pem_text)?;
        if label != PUBLIC_KEY_LABEL {
            let hint = match label.as_str() {
                "CERTIFICATE" => {
                    "; extract the key with `openssl x509 -in CERT -pubkey -noout > KEY.pem`"
                }
                PRIVATE_KEY_LABEL | ENCRYPTED_PRIVATE_KEY_LABEL | "EC PRIVATE KEY" => {
                    "; this is a PRIVATE key: never hand it out, derive the public key with \
                     `openssl pkey -in KEY -pubout`"
                }
                _ => "",
            };
            return Err(CryptoError::PemLabel {
                what: WHAT_PUBLIC_KEY,
                expected: PUBLIC_KEY_LABEL,
                found: label,
                hint,
            });
        }
        Self::from_public_key_der(&der)
    }

    fn from_public_key_der(der: &[u8]) -> Result<Self, CryptoError> {
        let spki =
            SubjectPublicKeyInfoRef::try_from(der).map_err(|error| CryptoError::MalformedKey {
                what: WHAT_PUBLIC_KEY,
                reason: format!("not an X.509 SubjectPublicKeyInfo: {error}"),
            })?;
        check_sm2_algorithm(WHAT_PUBLIC_KEY, &spki.algorithm)?;
        let normalized = SubjectPublicKeyInfoRef {
            algorithm: canonical_sm2_algorithm(),
            subject_public_key: spki.subject_public_key,
        };
        let point =
            ::sm2::PublicKey::try_from(normalized).map_err(|error| CryptoError::MalformedKey {
                what: WHAT_PUBLIC_KEY,
                reason: format!("not a valid point on the SM2 curve: {error}"),
            })?;
        Ok(Self { point })
    }

    /// Writes an SPKI `PUBLIC KEY` PEM block (id-ecPublicKey with the SM2 curve OID, the form
    /// OpenSSL 3 writes).
    pub fn to_public_key_pem(&self) -> Result<String, CryptoError> {
        self.point
            .to_public_key_pem(LineEnding::LF)
            .map_err(|error| CryptoError::KeyEncoding {
                what: WHAT_PUBLIC_KEY,
                reason: error.to_string(),
            })
    }

    /// Reads a SEC1 point: 65 bytes `04 || x || y`, or 33 bytes compressed.
    pub fn from_sec1_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        ::sm2::PublicKey::from_sec1_bytes(bytes)
            .map(|point| Self { point })
            .map_err(|_| CryptoError::MalformedKey {
                what: WHAT_PUBLIC_KEY,
                reason: format!(
                    "{} bytes are not a SEC1-encoded point on the SM2 curve (expected 65 bytes \
                     starting with 0x04, or 33 bytes starting with 0x02/0x03)",
                    bytes.len()
                ),
            })
    }

    /// `04 || x || y`.
    pub fn to_sec1_uncompressed(&self) -> [u8; UNCOMPRESSED_POINT_LEN] {
        let encoded = self.point.to_sec1_point(false);
        debug_assert_eq!(encoded.as_bytes().len(), UNCOMPRESSED_POINT_LEN);
        let mut out = [0u8; UNCOMPRESSED_POINT_LEN];
        for (dst, src) in out.iter_mut().zip(encoded.as_bytes()) {
            *dst = *src;
        }
        out
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(self.to_sec1_uncompressed()))
    }
}

/// An SM2 private key. The scalar is wiped when the value is dropped; `Debug` shows only the
/// public key. Deliberately not `Clone`: copies of secrets should be visible in the code.
pub struct PrivateKey {
    secret: SecretKey,
    public: PublicKey,
}

impl ZeroizeOnDrop for PrivateKey {}

impl PrivateKey {
    /// A fresh key from the operating system RNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut scalar_bytes = Zeroizing::new([0u8; FIELD_LEN]);
        // Rejection sampling: fewer than 2^-32 of 256-bit strings are >= n or zero.
        loop {
            getrandom::fill(scalar_bytes.as_mut_slice())
                .map_err(|error| CryptoError::Rng(error.to_string()))?;
            if let Ok(secret) = SecretKey::from_slice(scalar_bytes.as_slice()) {
                return Ok(Self::from_secret(secret));
            }
        }
    }

    fn from_secret(secret: SecretKey) -> Self {
        let public = PublicKey {
            point: secret.public_key(),
        };
        Self { secret, public }
    }

    /// Reads an unencrypted PKCS#8 `PRIVATE KEY` PEM block (`openssl genpkey -algorithm SM2`).
    /// Both the id-ecPublicKey + SM2-curve form (OpenSSL 3) and the form with the SM2 OID as the
    /// algorithm (OpenSSL 1.1.1 with the SM2 alias, some other tools) are accepted.
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self, CryptoError> {
        let label = pem_label(WHAT_PRIVATE_KEY, pem_text)?;
        match label.as_str() {
            PRIVATE_KEY_LABEL => {}
            ENCRYPTED_PRIVATE_KEY_LABEL => return Err(CryptoError::KeyIsEncrypted),
            _ => return Err(private_key_label_error(label, PRIVATE_KEY_LABEL)),
        }
        let (_, der) = decode_pem(WHAT_PRIVATE_KEY, pem_text)?;
        let info = parse_private_key_info(WHAT_PRIVATE_KEY, &der)?;
        secret_key_from_private_key_info(WHAT_PRIVATE_KEY, info).map(Self::from_secret)
    }

    /// Reads a PKCS#8 `ENCRYPTED PRIVATE KEY` PEM block protected with PBES2 (PBKDF2 or scrypt,
    /// AES-CBC/GCM), e.g. from `openssl genpkey -algorithm SM2 -aes-256-cbc`.
    pub fn from_pkcs8_encrypted_pem(
        pem_text: &str,
        passphrase: &[u8],
    ) -> Result<Self, CryptoError> {
        let label = pem_label(WHAT_ENCRYPTED_PRIVATE_KEY, pem_text)?;
        match label.as_str() {
            ENCRYPTED_PRIVATE_KEY_LABEL => {}
            PRIVATE_KEY_LABEL => return Err(CryptoError::KeyIsNotEncrypted),
            _ => return Err(private_key_label_error(label, ENCRYPTED_PRIVATE_KEY_LABEL)),
        }
        let (_, der) = decode_pem(WHAT_ENCRYPTED_PRIVATE_KEY, pem_text)?;
        let encrypted = EncryptedPrivateKeyInfoRef::try_from(der.as_slice()).map_err(|error| {
            CryptoError::MalformedKey {
                what: WHAT_ENCRYPTED_PRIVATE_KEY,
                reason: format!(
                    "not a PKCS#8 EncryptedPrivateKeyInfo with supported parameters: {error}"
                ),
            }
        })?;
        let decrypted = encrypted
            .decrypt(passphrase)
            .map_err(map_key_decryption_error)?;
        // A wrong passphrase passes the CBC padding check about once in 256 tries and then yields
        // garbage; garbage that does not even parse as PrivateKeyInfo is reported as a wrong
        // passphrase, while a well-formed key of the wrong kind gets the specific error.
        let info = PrivateKeyInfoRef::try_from(decrypted.as_bytes())
            .map_err(|_| CryptoError::WrongPassphrase)?;
        secret_key_from_private_key_info(WHAT_PRIVATE_KEY, info).map(Self::from_secret)
    }

    /// PKCS#8 `PRIVATE KEY` PEM, readable by `openssl pkey`. The result is wiped on drop.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, CryptoError> {
        self.secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|error| CryptoError::KeyEncoding {
                what: WHAT_PRIVATE_KEY,
                reason: error.to_string(),
            })
    }

    /// PKCS#8 `ENCRYPTED PRIVATE KEY` PEM with PBES2 / PBKDF2-HMAC-SHA256
    /// ([`PBKDF2_ITERATIONS`], 16-byte random salt) / AES-256-CBC, readable by
    /// `openssl pkey -passin`.
    pub fn to_pkcs8_encrypted_pem(
        &self,
        passphrase: &[u8],
    ) -> Result<Zeroizing<String>, CryptoError> {
        if passphrase.is_empty() {
            return Err(CryptoError::EmptyPassphrase);
        }
        let encoding_error = |error: &dyn fmt::Display| CryptoError::KeyEncoding {
            what: WHAT_ENCRYPTED_PRIVATE_KEY,
            reason: error.to_string(),
        };
        let plain_document = self
            .secret
            .to_pkcs8_der()
            .map_err(|error| encoding_error(&error))?;
        let info = PrivateKeyInfoRef::try_from(plain_document.as_bytes())
            .map_err(|error| encoding_error(&error))?;

        let mut salt = [0u8; 16];
        let mut iv = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|error| CryptoError::Rng(error.to_string()))?;
        getrandom::fill(&mut iv).map_err(|error| CryptoError::Rng(error.to_string()))?;
        let parameters =
            pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(PBKDF2_ITERATIONS, &salt, iv)
                .map_err(|error| encoding_error(&error))?;

        info.encrypt_with_params(parameters, passphrase)
            .map_err(|error| encoding_error(&error))?
            .to_pem(ENCRYPTED_PRIVATE_KEY_LABEL, LineEnding::LF)
            .map_err(|error| encoding_error(&error))
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("public_key", &self.public)
            .finish_non_exhaustive()
    }
}

/// Signs with one private key and one distinguishing id. Z (the hash of the id and public key)
/// is computed once here, so keep the `Signer` and reuse it; it is `Send + Sync`.
pub struct Signer {
    signing_key: SigningKey,
    public_key: PublicKey,
}

impl Signer {
    pub fn new(key: &PrivateKey, distid: &str) -> Result<Self, CryptoError> {
        validate_distid(distid)?;
        let signing_key = SigningKey::new(distid, &key.secret).map_err(|_| {
            CryptoError::InvalidDistId("rejected by the SM2 implementation when computing Z")
        })?;
        Ok(Self {
            signing_key,
            public_key: key.public,
        })
    }

    /// Signs `message` (SM3 with Z prefix, per GB/T 32918). The nonce is derived per RFC 6979
    /// from the key and message *and* 32 fresh bytes from the OS RNG ("hedged"), so a weak RNG
    /// cannot leak the key and a repeated message does not give repeatable fault-attack targets.
    pub fn sign(&self, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>, CryptoError> {
        let signature: Signature = self
            .signing_key
            .try_sign_with_rng(&mut SysRng, message)
            .map_err(|_| {
                CryptoError::SigningFailed(
                    "the OS random number generator failed, or the nonce hit a case of \
                     negligible probability; retry",
                )
            })?;
        Ok(match format {
            SignatureFormat::Raw => signature.to_bytes().to_vec(),
            SignatureFormat::Der => signature.to_der().to_vec(),
        })
    }

    pub fn distid(&self) -> &str {
        self.signing_key.distid()
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("distid", &self.distid())
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// Verifies signatures of one public key under one distinguishing id; Z is computed once. Keep
/// and reuse it; it is `Send + Sync`.
/// Verification uses precomputed tables of the key's multiples (`fixed_base.rs`, about 2.5x
/// faster than the library's generic path); the library's `VerifyingKey` is kept as the
/// reference that the tests compare against.
#[derive(Clone)]
pub struct Verifier {
    verifying_key: VerifyingKey,
    fast: std::sync::Arc<super::fixed_base::FastVerifier>,
    public_key: PublicKey,
}

impl Verifier {
    pub fn new(public_key: &PublicKey, distid: &str) -> Result<Self, CryptoError> {
        validate_distid(distid)?;
        let verifying_key = VerifyingKey::new(distid, public_key.point).map_err(|_| {
            CryptoError::InvalidDistId("rejected by the SM2 implementation when computing Z")
        })?;
        Ok(Self {
            verifying_key,
            fast: std::sync::Arc::new(super::fixed_base::FastVerifier::new(
                &public_key.point,
                distid,
            )),
            public_key: *public_key,
        })
    }

    /// `Err(MalformedSignature)` if `signature` is not a well-formed encoding in `format`;
    /// `Err(SignatureMismatch)` if it is well formed but not valid for this message.
    pub fn verify(
        &self,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
    ) -> Result<(), CryptoError> {
        let parsed = parse_signature(signature, format)?;
        if self.fast.verify(message, &parsed) {
            Ok(())
        } else {
            Err(CryptoError::SignatureMismatch)
        }
    }

    /// The library's own (constant-time, slower) verification: the reference the tests compare
    /// [`Verifier::verify`] with.
    #[cfg(test)]
    fn verify_reference(
        &self,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
    ) -> Result<(), CryptoError> {
        let parsed = parse_signature(signature, format)?;
        ::sm2::dsa::signature::Verifier::verify(&self.verifying_key, message, &parsed)
            .map_err(|_| CryptoError::SignatureMismatch)
    }

    pub fn distid(&self) -> &str {
        self.verifying_key.distid()
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("distid", &self.distid())
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

fn parse_signature(signature: &[u8], format: SignatureFormat) -> Result<Signature, CryptoError> {
    let malformed = |reason| CryptoError::MalformedSignature { format, reason };
    match format {
        SignatureFormat::Raw => {
            if signature.len() != RAW_SIGNATURE_LEN {
                return Err(malformed(if signature.first() == Some(&0x30) {
                    "expected exactly 64 bytes (r || s); this looks like DER, check the \
                     counterparty's signature format setting"
                } else {
                    "expected exactly 64 bytes (r || s)"
                }));
            }
            Signature::from_slice(signature)
                .map_err(|_| malformed("r or s is zero or not below the curve order"))
        }
        SignatureFormat::Der => {
            let der = DerSignature::try_from(signature).map_err(|_| {
                malformed(if signature.len() == RAW_SIGNATURE_LEN {
                    "not a DER SEQUENCE of two INTEGERs; 64 bytes looks like raw r || s, check \
                     the counterparty's signature format setting"
                } else {
                    "not a DER SEQUENCE of two INTEGERs of at most 32 bytes"
                })
            })?;
            Signature::try_from(der)
                .map_err(|_| malformed("r or s is zero or not below the curve order"))
        }
    }
}

/// SM2 public-key encryption (GB/T 32918.4). Output: `04 || x1 || y1` then C3 (32 bytes) and C2
/// (as long as the plaintext) in the given order.
pub fn encrypt(
    public_key: &PublicKey,
    plaintext: &[u8],
    order: CipherOrder,
) -> Result<Vec<u8>, CryptoError> {
    if plaintext.is_empty() {
        return Err(CryptoError::Sm2EncryptFailed(
            "the plaintext is empty, which SM2 encryption does not define",
        ));
    }
    EncryptingKey::new_with_mode(public_key.point, order.mode())
        .encrypt(&mut SysRng, plaintext)
        .map_err(|_| CryptoError::Sm2EncryptFailed("the OS random number generator failed"))
}

/// SM2 decryption of `04 || x1 || y1` followed by C3/C2 in `order`. The plaintext is returned in
/// a buffer that is wiped on drop.
pub fn decrypt(
    private_key: &PrivateKey,
    ciphertext: &[u8],
    order: CipherOrder,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let minimum_len = UNCOMPRESSED_POINT_LEN + C3_LEN + 1;
    if ciphertext.len() < minimum_len {
        return Err(CryptoError::MalformedSm2Ciphertext(format!(
            "{} bytes is shorter than the minimum {minimum_len} (65-byte C1, 32-byte C3, at \
             least one byte of C2)",
            ciphertext.len()
        )));
    }
    if ciphertext[0] != 0x04 {
        return Err(CryptoError::MalformedSm2Ciphertext(format!(
            "C1 must be an uncompressed point starting with 0x04, found 0x{:02x} (some peers \
             strip the 0x04 prefix; restore it before decrypting)",
            ciphertext[0]
        )));
    }
    let cipher = Cipher::<Sm2, ::sm3::Sm3>::from_slice(ciphertext, order.mode()).map_err(|_| {
        CryptoError::MalformedSm2Ciphertext("C1 is not a point on the SM2 curve".to_owned())
    })?;
    let mut plaintext = Zeroizing::new(vec![0u8; cipher.c2().len()]);
    let decrypting_key =
        DecryptingKey::new_with_mode(private_key.secret.to_nonzero_scalar(), order.mode());
    // The implementation writes C2 xor KDF output into the buffer before it checks C3; on failure
    // the buffer is wiped by Zeroizing, so no unauthenticated plaintext escapes.
    decrypting_key
        .decrypt_cipher_with_buf(&cipher, plaintext.as_mut_slice())
        .map_err(|_| CryptoError::Sm2DecryptFailed { order })?;
    Ok(plaintext)
}

fn validate_distid(distid: &str) -> Result<(), CryptoError> {
    if distid.is_empty() {
        return Err(CryptoError::InvalidDistId(
            "empty; an empty id is OpenSSL's implicit default and almost always a \
             misconfiguration (the GB/T default is 1234567812345678)",
        ));
    }
    if distid.len() > MAX_DISTID_LEN {
        return Err(CryptoError::InvalidDistId(
            "longer than 8191 bytes, the most the 16-bit ENTL field can describe",
        ));
    }
    Ok(())
}

/// The private key of the GB/T 32918 example, for the start-up known-answer test only.
pub(crate) fn public_key_from_scalar_hex(scalar_hex: &str) -> Result<PublicKey, CryptoError> {
    let malformed = |reason: &str| CryptoError::MalformedKey {
        what: WHAT_PRIVATE_KEY,
        reason: reason.to_owned(),
    };
    let scalar = Zeroizing::new(hex::decode(scalar_hex).map_err(|_| malformed("not hex"))?);
    let secret = SecretKey::from_slice(&scalar).map_err(|_| malformed("scalar out of range"))?;
    Ok(PrivateKey::from_secret(secret).public_key())
}

fn pem_label(what: &'static str, pem_text: &str) -> Result<String, CryptoError> {
    pem::decode_label(pem_text.trim().as_bytes())
        .map(str::to_owned)
        .map_err(|error| CryptoError::Pem {
            what,
            reason: error.to_string(),
        })
}

/// PEM body decoded into a buffer that is wiped on drop, since for private keys it holds the
/// scalar in the clear.
fn decode_pem(
    what: &'static str,
    pem_text: &str,
) -> Result<(String, Zeroizing<Vec<u8>>), CryptoError> {
    // Blank lines around the block are common in hand-edited files and harmless; the decoder
    // itself is strict RFC 7468 and rejects them.
    let (label, der) =
        pem::decode_vec(pem_text.trim().as_bytes()).map_err(|error| CryptoError::Pem {
            what,
            reason: error.to_string(),
        })?;
    Ok((label.to_owned(), Zeroizing::new(der)))
}

fn private_key_label_error(found: String, expected: &'static str) -> CryptoError {
    let hint = match found.as_str() {
        "EC PRIVATE KEY" => {
            "; this is a SEC1 key: convert it with `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW` \
             (or `-v2 aes-256-cbc` to encrypt it)"
        }
        PUBLIC_KEY_LABEL | "CERTIFICATE" => "; this is public material, not a private key",
        _ => "",
    };
    CryptoError::PemLabel {
        what: WHAT_PRIVATE_KEY,
        expected,
        found,
        hint,
    }
}

fn parse_private_key_info<'a>(
    what: &'static str,
    der: &'a [u8],
) -> Result<PrivateKeyInfoRef<'a>, CryptoError> {
    PrivateKeyInfoRef::try_from(der).map_err(|error| CryptoError::MalformedKey {
        what,
        reason: format!("not a PKCS#8 PrivateKeyInfo: {error}"),
    })
}

fn secret_key_from_private_key_info(
    what: &'static str,
    info: PrivateKeyInfoRef<'_>,
) -> Result<SecretKey, CryptoError> {
    check_sm2_algorithm(what, &info.algorithm)?;
    let normalized = PrivateKeyInfoRef {
        algorithm: canonical_sm2_algorithm(),
        private_key: info.private_key,
        public_key: info.public_key,
    };
    // This also checks that an embedded public key matches the private scalar.
    SecretKey::try_from(normalized).map_err(|error| CryptoError::MalformedKey {
        what,
        reason: format!("invalid SM2 ECPrivateKey: {error}"),
    })
}

/// id-ecPublicKey with the SM2 named curve: what OpenSSL 3 writes and what the sm2 crate expects.
fn canonical_sm2_algorithm() -> AlgorithmIdentifierRef<'static> {
    AlgorithmIdentifierRef {
        oid: EC_PUBLIC_KEY_OID,
        parameters: Some(AnyRef::from(&SM2_CURVE_OID)),
    }
}

/// Accepts id-ecPublicKey + SM2 curve, and the SM2 OID as the algorithm itself (with the SM2
/// curve or no parameters). Everything else is named in the error so operators can tell a P-256
/// or RSA key from a corrupted file.
fn check_sm2_algorithm(
    what: &'static str,
    algorithm: &AlgorithmIdentifierRef<'_>,
) -> Result<(), CryptoError> {
    let not_sm2 = |detail: String| CryptoError::NotSm2Key { what, detail };
    let (algorithm_oid, parameters_oid) = algorithm.oids().map_err(|_| {
        not_sm2(format!(
            "algorithm {} has parameters that are not a named-curve OID; explicit curve \
             parameters are not supported, re-encode the key with the named SM2 curve",
            algorithm.oid
        ))
    })?;
    match (algorithm_oid, parameters_oid) {
        (EC_PUBLIC_KEY_OID, Some(SM2_CURVE_OID)) | (SM2_CURVE_OID, Some(SM2_CURVE_OID) | None) => {
            Ok(())
        }
        (EC_PUBLIC_KEY_OID, Some(curve)) => Err(not_sm2(format!(
            "elliptic-curve key on curve {curve}, not the SM2 curve {SM2_CURVE_OID}"
        ))),
        (EC_PUBLIC_KEY_OID, None) => Err(not_sm2(
            "elliptic-curve key without a named curve".to_owned(),
        )),
        (other, _) => Err(not_sm2(format!(
            "key algorithm {other}, expected id-ecPublicKey ({EC_PUBLIC_KEY_OID}) with the SM2 \
             curve {SM2_CURVE_OID}"
        ))),
    }
}

fn map_key_decryption_error(error: pkcs8::Error) -> CryptoError {
    use pkcs8::pkcs5::Error as Pkcs5Error;
    match error {
        pkcs8::Error::EncryptedPrivateKey(Pkcs5Error::DecryptFailed) | pkcs8::Error::Asn1(_) => {
            CryptoError::WrongPassphrase
        }
        pkcs8::Error::EncryptedPrivateKey(Pkcs5Error::UnsupportedAlgorithm { oid }) => {
            CryptoError::UnsupportedKeyEncryption(format!(
                "algorithm {oid} is not supported (PBES2 with PBKDF2 or scrypt and AES-CBC/GCM \
                 is); re-encrypt with `openssl pkcs8 -topk8 -v2 aes-256-cbc -v2prf \
                 hmacWithSHA256 -in OLD -out NEW`"
            ))
        }
        other => CryptoError::UnsupportedKeyEncryption(format!(
            "{other}; re-encrypt with `openssl pkcs8 -topk8 -v2 aes-256-cbc -v2prf \
             hmacWithSHA256 -in OLD -out NEW`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs8::der::Encode;

    #[test]
    fn format_and_order_parse_and_display() {
        assert_eq!(
            "der".parse::<SignatureFormat>().unwrap(),
            SignatureFormat::Der
        );
        assert_eq!(
            "RAW".parse::<SignatureFormat>().unwrap(),
            SignatureFormat::Raw
        );
        assert!("base64".parse::<SignatureFormat>().is_err());
        assert_eq!(SignatureFormat::Der.to_string(), "der");
        assert_eq!(SignatureFormat::Raw.to_string(), "raw");
        assert_eq!(CipherOrder::default(), CipherOrder::C1C3C2);
        for order in [CipherOrder::C1C3C2, CipherOrder::C1C2C3] {
            assert_eq!(order.to_string().parse::<CipherOrder>().unwrap(), order);
        }
        assert_eq!(
            "c1c2c3".parse::<CipherOrder>().unwrap(),
            CipherOrder::C1C2C3
        );
        assert!("C2C1C3".parse::<CipherOrder>().is_err());
    }

    /// The table-based verification agrees with the library's on valid signatures, on every
    /// single-bit change of message or signature, on a wrong key and on a wrong id.
    #[test]
    fn fast_verification_agrees_with_the_library() {
        for round in 0..12u32 {
            let key = PrivateKey::generate().unwrap();
            let other = PrivateKey::generate().unwrap();
            let distid = if round % 3 == 0 {
                "ALICE123@YAHOO.COM"
            } else {
                DEFAULT_DISTID
            };
            let signer = Signer::new(&key, distid).unwrap();
            let verifier = Verifier::new(&key.public_key(), distid).unwrap();
            let wrong_key = Verifier::new(&other.public_key(), distid).unwrap();
            let wrong_id = Verifier::new(&key.public_key(), "8765432187654321").unwrap();
            let message: Vec<u8> = (0..(round * 37) as usize)
                .map(|i| (i * 7 + 3) as u8)
                .collect();
            for format in [SignatureFormat::Der, SignatureFormat::Raw] {
                let signature = signer.sign(&message, format).unwrap();
                assert!(verifier.verify(&message, &signature, format).is_ok());
                assert!(
                    verifier
                        .verify_reference(&message, &signature, format)
                        .is_ok()
                );
                for candidate in [&wrong_key, &wrong_id] {
                    assert!(matches!(
                        candidate.verify(&message, &signature, format),
                        Err(CryptoError::SignatureMismatch)
                    ));
                }
                let mut tampered = message.clone();
                tampered.push(0);
                assert!(verifier.verify(&tampered, &signature, format).is_err());
                if !message.is_empty() {
                    let mut flipped = message.clone();
                    flipped[round as usize % message.len()] ^= 0x10;
                    assert!(verifier.verify(&flipped, &signature, format).is_err());
                }
                for bit in 0..signature.len() * 8 {
                    if bit % 5 != round as usize % 5 {
                        continue;
                    }
                    let mut bad = signature.clone();
                    bad[bit / 8] ^= 1 << (bit % 8);
                    let fast = verifier.verify(&message, &bad, format).is_ok();
                    let reference = verifier.verify_reference(&message, &bad, format).is_ok();
                    assert_eq!(fast, reference, "bit {bit} of a {format} signature");
                    assert!(!fast, "bit {bit} flipped and still valid");
                }
            }
        }
    }

    #[test]
    fn distid_is_validated() {
        let key = PrivateKey::generate().unwrap();
        assert!(matches!(
            Signer::new(&key, ""),
            Err(CryptoError::InvalidDistId(_))
        ));
        assert!(matches!(
            Verifier::new(&key.public_key(), &"x".repeat(8192)),
            Err(CryptoError::InvalidDistId(_))
        ));
        assert!(Verifier::new(&key.public_key(), &"x".repeat(8191)).is_ok());
    }

    #[test]
    fn pem_roundtrips_and_sm2_oid_algorithm_form_is_accepted() {
        let key = PrivateKey::generate().unwrap();
        let pem_text = key.to_pkcs8_pem().unwrap();
        let reloaded = PrivateKey::from_pkcs8_pem(&pem_text).unwrap();
        assert_eq!(reloaded.public_key(), key.public_key());

        // Re-encode with the SM2 OID as the algorithm (OpenSSL 1.1.1 alias form).
        let (_, der) = decode_pem(WHAT_PRIVATE_KEY, &pem_text).unwrap();
        let info = PrivateKeyInfoRef::try_from(der.as_slice()).unwrap();
        let alias_form = PrivateKeyInfoRef {
            algorithm: AlgorithmIdentifierRef {
                oid: SM2_CURVE_OID,
                parameters: None,
            },
            private_key: info.private_key,
            public_key: None,
        };
        let alias_der = alias_form.to_der().unwrap();
        let alias_pem = pem::encode_string(PRIVATE_KEY_LABEL, LineEnding::LF, &alias_der).unwrap();
        let from_alias = PrivateKey::from_pkcs8_pem(&alias_pem).unwrap();
        assert_eq!(from_alias.public_key(), key.public_key());

        let public_pem = key.public_key().to_public_key_pem().unwrap();
        let public_der = pem::decode_vec(public_pem.as_bytes()).unwrap().1;
        let spki = SubjectPublicKeyInfoRef::try_from(public_der.as_slice()).unwrap();
        let alias_spki = SubjectPublicKeyInfoRef {
            algorithm: AlgorithmIdentifierRef {
                oid: SM2_CURVE_OID,
                parameters: Some(AnyRef::from(&SM2_CURVE_OID)),
            },
            subject_public_key: spki.subject_public_key,
        };
        let alias_public_pem = pem::encode_string(
            PUBLIC_KEY_LABEL,
            LineEnding::LF,
            &alias_spki.to_der().unwrap(),
        )
        .unwrap();
        assert_eq!(
            PublicKey::from_public_key_pem(&alias_public_pem).unwrap(),
            key.public_key()
        );
    }

    #[test]
    fn crlf_and_surrounding_blank_lines_are_accepted() {
        let key = PrivateKey::generate().unwrap();
        let pem_text = key.to_pkcs8_pem().unwrap();
        let crlf = pem_text.replace('\n', "\r\n");
        let padded = format!("\n\n{}\n\n", pem_text.as_str());
        for variant in [crlf, padded] {
            assert_eq!(
                PrivateKey::from_pkcs8_pem(&variant).unwrap().public_key(),
                key.public_key()
            );
        }
    }

    #[test]
    fn non_sm2_keys_are_named_in_the_error() {
        // A throwaway P-256 key from `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`.
        const P256_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgu4ZXbRLYRvEW/YG/
9luGNo9QYxmParmKKOjfsiZEMRyhRANCAASQl2Di0byUKpVrfXs6uwrjx0PpBgsC
+HbW5m8y0hb8s2gSeMTG8IYToGFkRW20ZDx4qv2u4WqO73yE/fQtJS6t
-----END PRIVATE KEY-----
";
        let error = PrivateKey::from_pkcs8_pem(P256_PKCS8).unwrap_err();
        assert!(matches!(error, CryptoError::NotSm2Key { .. }), "{error}");
        assert!(error.to_string().contains("1.2.840.10045.3.1.7"), "{error}");
    }

    #[test]
    fn labels_are_checked_with_hints() {
        let key = PrivateKey::generate().unwrap();
        let public_pem = key.public_key().to_public_key_pem().unwrap();
        let error = PrivateKey::from_pkcs8_pem(&public_pem).unwrap_err();
        assert!(error.to_string().contains("public material"), "{error}");
        let private_pem = key.to_pkcs8_pem().unwrap();
        let error = PublicKey::from_public_key_pem(&private_pem).unwrap_err();
        assert!(error.to_string().contains("PRIVATE key"), "{error}");
        assert!(matches!(
            PrivateKey::from_pkcs8_encrypted_pem(&private_pem, b"pass"),
            Err(CryptoError::KeyIsNotEncrypted)
        ));
    }

    #[test]
    fn malformed_signatures_are_distinguished_from_mismatches() {
        let key = PrivateKey::generate().unwrap();
        let signer = Signer::new(&key, DEFAULT_DISTID).unwrap();
        let verifier = Verifier::new(&key.public_key(), DEFAULT_DISTID).unwrap();
        let der = signer.sign(b"m", SignatureFormat::Der).unwrap();
        let raw = signer.sign(b"m", SignatureFormat::Raw).unwrap();
        assert_eq!(raw.len(), RAW_SIGNATURE_LEN);

        let error = verifier
            .verify(b"m", &der, SignatureFormat::Raw)
            .unwrap_err();
        assert!(matches!(error, CryptoError::MalformedSignature { .. }));
        assert!(error.to_string().contains("looks like DER"), "{error}");
        let error = verifier
            .verify(b"m", &raw, SignatureFormat::Der)
            .unwrap_err();
        assert!(error.to_string().contains("looks like raw"), "{error}");
        assert!(matches!(
            verifier.verify(b"m", &[0u8; 64], SignatureFormat::Raw),
            Err(CryptoError::MalformedSignature { .. })
        ));
        assert!(matches!(
            verifier.verify(b"other", &raw, SignatureFormat::Raw),
            Err(CryptoError::SignatureMismatch)
        ));
    }

    #[test]
    fn decrypt_rejects_malformed_ciphertexts_specifically() {
        let key = PrivateKey::generate().unwrap();
        // With its 0x04 stripped, a ciphertext starts with x1's first byte, which is 0x04 itself
        // once in 256 encryptions: that one would look prefixed. Take one that does not.
        let ciphertext = (0..64)
            .map(|_| encrypt(&key.public_key(), b"secret", CipherOrder::C1C3C2).unwrap())
            .find(|c| c[1] != 0x04)
            .expect("x1 starts with 0x04 in 64 encryptions in a row");
        assert_eq!(ciphertext.len(), 65 + 32 + 6);
        assert!(matches!(
            decrypt(&key, &ciphertext[..97], CipherOrder::C1C3C2),
            Err(CryptoError::MalformedSm2Ciphertext(_))
        ));
        let error = decrypt(&key, &ciphertext[1..], CipherOrder::C1C3C2).unwrap_err();
        assert!(error.to_string().contains("0x04"), "{error}");
        let mut off_curve = ciphertext.clone();
        off_curve[64] ^= 1;
        assert!(matches!(
            decrypt(&key, &off_curve, CipherOrder::C1C3C2),
            Err(CryptoError::MalformedSm2Ciphertext(_))
        ));
        assert!(matches!(
            encrypt(&key.public_key(), b"", CipherOrder::C1C3C2),
            Err(CryptoError::Sm2EncryptFailed(_))
        ));
    }
}
