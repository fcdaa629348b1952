//! The worked example in docs/protocol.md is true: every key, envelope, ciphertext and
//! signature in it checks out, with kunpay's code and with the openssl command line.
//! `cargo test --test protocol_example -- --ignored --nocapture` prints a fresh example.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kunpay::channel::envelope::MessageKey;
use kunpay::channel::message::{self, MessageWriter, attach_signature};
use kunpay::crypto::sm2::{CipherOrder, PrivateKey, PublicKey, SignatureFormat, Signer, Verifier};

/// Fenced blocks labelled ```text example:NAME.
fn blocks(doc: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line.trim().strip_prefix("```text example:") {
            let mut body = Vec::new();
            for inner in lines.by_ref() {
                if inner.trim() == "```" {
                    break;
                }
                body.push(inner);
            }
            out.insert(name.trim().to_string(), body.join("\n"));
        }
    }
    out
}

fn example_message(
    institution: &PrivateKey,
    key: &MessageKey,
    envelope: &str,
    nonce: &[u8; 12],
) -> String {
    let account = key
        .encrypt_field_with_nonce("AcctNo", "6222021234567890123", nonce)
        .unwrap();
    let name_nonce = {
        let mut n = *nonce;
        n[11] ^= 1;
        n
    };
    let name = key
        .encrypt_field_with_nonce("AcctNm", "张三", &name_nonce)
        .unwrap();
    let mut w = MessageWriter::new();
    w.field("MsgTp", "CREDIT")
        .field("SndInstId", "TENPAY")
        .field("SgnSN", "01")
        .field("SndDtTm", "2026-11-22T10:15:30+08:00")
        .field("MsgId", "TENPAY20261122101530000001")
        .field("EncSN", "01")
        .field("DgtlEnvlp", envelope)
        .body();
    w.field("ReqSerial", "TP202611220001")
        .field("AcctNo", &account)
        .field("AcctNm", &name)
        .field("Amt", "12345")
        .field("Ccy", "CNY");
    let _ = institution;
    w.finish()
}

#[test]
#[ignore = "prints a fresh worked example for docs/protocol.md"]
fn print_worked_example() {
    let institution = PrivateKey::generate().unwrap();
    let kunpay = PrivateKey::generate().unwrap();
    let key_bytes: [u8; 16] = *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10";
    let key = MessageKey::from_bytes(key_bytes);
    let nonce: [u8; 12] = [
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b,
    ];
    let envelope = key.seal(&kunpay.public_key(), CipherOrder::C1C3C2).unwrap();
    let signed = example_message(&institution, &key, &envelope, &nonce);
    let signature = Signer::new(&institution, "1234567812345678")
        .unwrap()
        .sign(signed.as_bytes(), SignatureFormat::Der)
        .unwrap();
    let block = |name: &str, body: &str| println!("```text example:{name}\n{body}\n```\n");
    block(
        "institution-private-key",
        institution.to_pkcs8_pem().unwrap().trim(),
    );
    block(
        "institution-public-key",
        institution.public_key().to_public_key_pem().unwrap().trim(),
    );
    block(
        "kunpay-encryption-private-key",
        kunpay.to_pkcs8_pem().unwrap().trim(),
    );
    block("sm4-key", &hex::encode(key_bytes));
    block("acctno-nonce", &hex::encode(nonce));
    block("signed-bytes", &signed);
    block("signature", &BASE64.encode(&signature));
}

#[test]
fn the_worked_example_in_the_protocol_document_checks_out() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let b = blocks(&doc);
    for name in [
        "institution-private-key",
        "institution-public-key",
        "kunpay-encryption-private-key",
        "sm4-key",
        "acctno-nonce",
        "signed-bytes",
        "signature",
    ] {
        assert!(
            b.contains_key(name),
            "docs/protocol.md lacks the example block {name}"
        );
    }
    let institution = PrivateKey::from_pkcs8_pem(&b["institution-private-key"]).unwrap();
    let public = PublicKey::from_public_key_pem(&b["institution-public-key"]).unwrap();
    assert_eq!(
        institution.public_key().to_sec1_uncompressed(),
        public.to_sec1_uncompressed(),
        "the key pair belongs together"
    );
    let kunpay = PrivateKey::from_pkcs8_pem(&b["kunpay-encryption-private-key"]).unwrap();
    let signed = &b["signed-bytes"];
    assert!(
        !signed.contains('\n'),
        "the signed bytes are one line, no trailing newline"
    );

    // The envelope opens to the documented SM4 key.
    let parsed = message::parse(attach_signature(signed.clone().into_bytes(), b"x").as_slice())
        .unwrap()
        .header;
    let envelope = parsed.text_of("DgtlEnvlp").unwrap();
    let opened = MessageKey::open(envelope, &kunpay, CipherOrder::C1C3C2).unwrap();
    let key_bytes: [u8; 16] = hex::decode(&b["sm4-key"]).unwrap().try_into().unwrap();
    let documented = MessageKey::from_bytes(key_bytes);
    let nonce: [u8; 12] = hex::decode(&b["acctno-nonce"]).unwrap().try_into().unwrap();
    // Rebuilding the message from the documented inputs gives the documented bytes exactly.
    assert_eq!(
        &example_message(&institution, &documented, envelope, &nonce),
        signed
    );
    let body = message::parse(attach_signature(signed.clone().into_bytes(), b"x").as_slice())
        .unwrap()
        .body;
    assert_eq!(
        opened
            .decrypt_field("AcctNo", body.text_of("AcctNo").unwrap())
            .unwrap()
            .as_str(),
        "6222021234567890123"
    );
    assert_eq!(
        opened
            .decrypt_field("AcctNm", body.text_of("AcctNm").unwrap())
            .unwrap()
            .as_str(),
        "张三"
    );

    // The signature verifies with kunpay's code...
    let signature = BASE64.decode(b["signature"].trim()).unwrap();
    Verifier::new(&public, "1234567812345678")
        .unwrap()
        .verify(signed.as_bytes(), &signature, SignatureFormat::Der)
        .unwrap();
    // ...and with the openssl command line, as an institution's engineer would check it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.pem"), &b["institution-public-key"]).unwrap();
    std::fs::write(dir.path().join("msg"), signed).unwrap();
    std::fs::write(dir.path().join("sig.der"), &signature).unwrap();
    let status = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-rawin",
            "-in",
            "msg",
            "-sigfile",
            "sig.der",
            "-digest",
            "sm3",
            "-pkeyopt",
            "distid:1234567812345678",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}
