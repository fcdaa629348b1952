//! Known-answer and negative tests for kunpay::crypto: published SM2/SM3/SM4 vectors, HMAC-SM3
//! cross-checked against the `openssl` command line, and the failure modes that must fail.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kunpay::crypto::sm2::{decrypt, encrypt};
use kunpay::crypto::sm3::digest;
use kunpay::crypto::sm4::{cbc_decrypt, cbc_encrypt, gcm_decrypt, gcm_encrypt};
use kunpay::crypto::{
    CipherOrder, CryptoError, DEFAULT_DISTID, PrivateKey, PublicKey, SignatureFormat, Signer, Sm3,
    Verifier, hmac_sm3, hmac_sm3_verify,
};

fn annex_a_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/sm2-gbt32918-annex-a")
}

fn annex_a() -> (Vec<u8>, PublicKey, Vec<u8>) {
    let dir = annex_a_dir();
    let message = std::fs::read(dir.join("msg")).expect("Annex A message");
    let public_pem = std::fs::read_to_string(dir.join("pub.pem")).expect("Annex A public key");
    let signature = std::fs::read(dir.join("sig.der")).expect("Annex A signature");
    (
        message,
        PublicKey::from_public_key_pem(&public_pem).unwrap(),
        signature,
    )
}

/// Small deterministic generator so that failures can be reproduced from the printed seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn sm3_standard_vectors() {
    assert_eq!(
        hex::encode(digest(b"abc")),
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    );
    assert_eq!(
        hex::encode(digest(&b"abcd".repeat(16))),
        "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
    );
}

#[test]
fn sm3_streaming_equals_one_shot() {
    let mut rng = SplitMix64(0x5eed_0001);
    for len in [0usize, 1, 63, 64, 65, 1000, 4096, 100_000] {
        let data = rng.bytes(len);
        let mut hasher = Sm3::new();
        let mut offset = 0;
        while offset < data.len() {
            let chunk = ((rng.next() % 97) as usize + 1).min(data.len() - offset);
            hasher.update(&data[offset..offset + chunk]);
            offset += chunk;
        }
        assert_eq!(hasher.finalize(), digest(&data), "length {len}");
    }
}

fn openssl_hmac_sm3(key: &[u8], data: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["mac", "-digest", "SM3", "-macopt"])
        .arg(format!("hexkey:{}", hex::encode(key)))
        .arg("HMAC")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl must be installed to cross-check HMAC-SM3");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "openssl mac failed");
    String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .to_ascii_lowercase()
}

#[test]
fn hmac_sm3_matches_openssl() {
    let mut rng = SplitMix64(0x5eed_0002);
    // Key lengths around the 64-byte SM3 block, where HMAC switches to hashing the key.
    let cases = [
        (1, 0),
        (16, 3),
        (32, 64),
        (63, 100),
        (64, 1000),
        (65, 55),
        (200, 4096),
    ];
    for (key_len, data_len) in cases {
        let key = rng.bytes(key_len);
        let data = rng.bytes(data_len);
        let ours = hmac_sm3(&key, &data);
        assert_eq!(
            hex::encode(ours),
            openssl_hmac_sm3(&key, &data),
            "key {key_len} bytes, data {data_len} bytes"
        );
        assert!(hmac_sm3_verify(&key, &data, &ours));
        let mut wrong = ours;
        wrong[0] ^= 0x01;
        assert!(!hmac_sm3_verify(&key, &data, &wrong));
    }
}

#[test]
fn sm2_annex_a_signature_verifies_only_with_its_message_and_distid() {
    let (message, public_key, signature) = annex_a();
    let verifier = Verifier::new(&public_key, "1234567812345678").unwrap();
    verifier
        .verify(&message, &signature, SignatureFormat::Der)
        .expect("GB/T 32918 Annex A signature must verify");

    let other_distid = Verifier::new(&public_key, "ALICE123@YAHOO.COM").unwrap();
    assert!(matches!(
        other_distid.verify(&message, &signature, SignatureFormat::Der),
        Err(CryptoError::SignatureMismatch)
    ));

    for index in 0..message.len() {
        let mut flipped = message.clone();
        flipped[index] ^= 0x01;
        assert!(
            matches!(
                verifier.verify(&flipped, &signature, SignatureFormat::Der),
                Err(CryptoError::SignatureMismatch)
            ),
            "flipped byte {index} still verifies"
        );
    }
}

#[test]
fn sm2_raw_and_der_formats_both_work() {
    // Annex A signature converted from DER to raw r || s by hand-checked component offsets.
    let (message, public_key, der) = annex_a();
    assert_eq!(
        der.len(),
        72,
        "Annex A DER has 33-byte r and s (leading zero)"
    );
    let mut raw = Vec::new();
    raw.extend_from_slice(&der[5..37]);
    raw.extend_from_slice(&der[40..72]);
    let verifier = Verifier::new(&public_key, DEFAULT_DISTID).unwrap();
    verifier
        .verify(&message, &raw, SignatureFormat::Raw)
        .unwrap();

    let key = PrivateKey::generate().unwrap();
    let signer = Signer::new(&key, DEFAULT_DISTID).unwrap();
    let verifier = Verifier::new(&key.public_key(), DEFAULT_DISTID).unwrap();
    for format in [SignatureFormat::Der, SignatureFormat::Raw] {
        for message in [&b""[..], b"x", &[0xa5; 1000]] {
            let signature = signer.sign(message, format).unwrap();
            verifier.verify(message, &signature, format).unwrap();
        }
    }
    let raw = signer.sign(b"payload", SignatureFormat::Raw).unwrap();
    assert_eq!(raw.len(), 64);
    let der = signer.sign(b"payload", SignatureFormat::Der).unwrap();
    assert_eq!(der[0], 0x30);
    assert!(matches!(
        verifier.verify(b"payload", &raw, SignatureFormat::Der),
        Err(CryptoError::MalformedSignature { .. })
    ));
    assert!(matches!(
        verifier.verify(b"payload", &der, SignatureFormat::Raw),
        Err(CryptoError::MalformedSignature { .. })
    ));
}

#[test]
fn sm2_signatures_are_bound_to_the_distid() {
    let key = PrivateKey::generate().unwrap();
    let signature = Signer::new(&key, "1234567812345678")
        .unwrap()
        .sign(b"payload", SignatureFormat::Der)
        .unwrap();
    let verifier = Verifier::new(&key.public_key(), "8765432187654321").unwrap();
    assert!(matches!(
        verifier.verify(b"payload", &signature, SignatureFormat::Der),
        Err(CryptoError::SignatureMismatch)
    ));
}

#[test]
fn sm4_gbt_32907_block_vector_via_cbc_with_zero_iv() {
    let key: [u8; 16] = hex::decode("0123456789abcdeffedcba9876543210")
        .unwrap()
        .try_into()
        .unwrap();
    let ciphertext = cbc_encrypt(&key, &[0u8; 16], &key);
    assert_eq!(
        ciphertext.len(),
        32,
        "one data block plus one padding block"
    );
    assert_eq!(
        hex::encode(&ciphertext[..16]),
        "681edf34d206965e86b3e94f536e4246"
    );
    assert_eq!(
        cbc_decrypt(&key, &[0u8; 16], &ciphertext)
            .unwrap()
            .as_slice(),
        key
    );
}

#[test]
fn sm4_gcm_rfc8998_vector() {
    let key: [u8; 16] = hex::decode("0123456789ABCDEFFEDCBA9876543210")
        .unwrap()
        .try_into()
        .unwrap();
    let nonce: [u8; 12] = hex::decode("00001234567800000000ABCD")
        .unwrap()
        .try_into()
        .unwrap();
    let aad = hex::decode("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2").unwrap();
    let plaintext = hex::decode(concat!(
        "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB",
        "CCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD",
        "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFF",
        "EEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
    ))
    .unwrap();
    let expected = concat!(
        "17f399f08c67d5ee19d0dc9969c4bb7d",
        "5fd46fd3756489069157b282bb200735",
        "d82710ca5c22f0ccfa7cbf93d496ac15",
        "a56834cbcf98c397b4024a2691233b8d",
        "83de3541e4c2b58177e065a9bf7b62ec"
    );
    let sealed = gcm_encrypt(&key, &nonce, &aad, &plaintext).unwrap();
    assert_eq!(hex::encode(&sealed), expected);
    assert_eq!(
        gcm_decrypt(&key, &nonce, &aad, &sealed).unwrap().as_slice(),
        plaintext
    );
    let mut tampered = sealed.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(matches!(
        gcm_decrypt(&key, &nonce, &aad, &tampered),
        Err(CryptoError::Sm4GcmAuthentication)
    ));
}

#[test]
fn sm2_encryption_roundtrips_in_both_orders_and_rejects_the_wrong_order() {
    let key = PrivateKey::generate().unwrap();
    let public_key = key.public_key();
    for order in [CipherOrder::C1C3C2, CipherOrder::C1C2C3] {
        for len in [1usize, 31, 32, 33, 200] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ciphertext = encrypt(&public_key, &plaintext, order).unwrap();
            assert_eq!(ciphertext.len(), 65 + 32 + len);
            assert_eq!(ciphertext[0], 0x04);
            assert_eq!(
                decrypt(&key, &ciphertext, order).unwrap().as_slice(),
                plaintext,
                "{order}, {len} bytes"
            );
            let wrong_order = match order {
                CipherOrder::C1C3C2 => CipherOrder::C1C2C3,
                CipherOrder::C1C2C3 => CipherOrder::C1C3C2,
            };
            assert!(
                matches!(
                    decrypt(&key, &ciphertext, wrong_order),
                    Err(CryptoError::Sm2DecryptFailed { .. })
                ),
                "{order} ciphertext of {len} bytes decrypted as {wrong_order}"
            );
        }
    }
    let other_key = PrivateKey::generate().unwrap();
    let ciphertext = encrypt(&public_key, b"for key one", CipherOrder::C1C3C2).unwrap();
    assert!(decrypt(&other_key, &ciphertext, CipherOrder::C1C3C2).is_err());
}

#[test]
fn sm2_tampered_ciphertext_fails() {
    let key = PrivateKey::generate().unwrap();
    let plaintext = b"transfer 100.00 CNY to account 6222";
    let ciphertext = encrypt(&key.public_key(), plaintext, CipherOrder::C1C3C2).unwrap();
    // Every byte of C1 (coordinates), C3 and C2; C1 changes may also make the point invalid.
    for index in 1..ciphertext.len() {
        let mut tampered = ciphertext.clone();
        tampered[index] ^= 0x01;
        let result = decrypt(&key, &tampered, CipherOrder::C1C3C2);
        assert!(
            matches!(
                result,
                Err(CryptoError::Sm2DecryptFailed { .. } | CryptoError::MalformedSm2Ciphertext(_))
            ),
            "tampered byte {index} was accepted"
        );
    }
    let mut truncated = ciphertext.clone();
    truncated.pop();
    assert!(decrypt(&key, &truncated, CipherOrder::C1C3C2).is_err());
}

#[test]
fn private_key_debug_shows_no_key_material() {
    let key = PrivateKey::generate().unwrap();
    let pem = key.to_pkcs8_pem().unwrap();
    // Independent decoding of the scalar, so the test does not trust our own accessors.
    let scalar = {
        use sm2::pkcs8::DecodePrivateKey;
        hex::encode(sm2::SecretKey::from_pkcs8_pem(&pem).unwrap().to_bytes())
    };
    let signer = Signer::new(&key, DEFAULT_DISTID).unwrap();
    for rendered in [
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{signer:?}"),
    ] {
        assert!(rendered.contains("PublicKey("), "{rendered}");
        for window in scalar.as_bytes().windows(12) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(
                !rendered.to_ascii_lowercase().contains(window),
                "Debug output contains private key bytes: {rendered}"
            );
        }
    }
}

#[test]
fn self_test_passes() {
    kunpay::crypto::self_test().unwrap();
}
