//! A payment institution for tests: signs requests, seals sensitive fields in a digital
//! envelope to kunpay's encryption key, posts them, and verifies kunpay's signed answers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kunpay::channel::envelope::{MessageKey, SENSITIVE_FIELDS};
use kunpay::channel::message::{self, MessageWriter, attach_signature};
use kunpay::crypto::keyfile;
use kunpay::crypto::sm2::{CipherOrder, PrivateKey, PublicKey, SignatureFormat, Signer, Verifier};
use kunpay::payment::request::MsgType;

pub struct TestInstitution {
    pub id: String,
    pub sign_serial: String,
    pub signer: Signer,
    pub bank_encrypt: PublicKey,
    /// The serial of the bank's encryption key (`EncSN`).
    pub bank_encrypt_serial: String,
    pub bank_verifier: Verifier,
    pub base_url: String,
    counter: std::sync::atomic::AtomicU64,
}

/// kunpay's answer, verified and flattened.
#[derive(Debug)]
pub struct Answer {
    pub raw: Vec<u8>,
    pub fields: BTreeMap<String, String>,
    pub txns: Vec<BTreeMap<String, String>>,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.fields.get("RsltCd").map(String::as_str).unwrap_or("")
    }
    pub fn get(&self, name: &str) -> &str {
        self.fields.get(name).map(String::as_str).unwrap_or("")
    }
}

impl TestInstitution {
    /// Writes the institution's key pair into `dir` and returns it with the config section that
    /// registers it.
    pub fn create(
        dir: &Path,
        id: &str,
        bank_keys: &Path,
        base_url: &str,
    ) -> (TestInstitution, String) {
        let key = PrivateKey::generate().unwrap();
        let public_path = dir.join(format!("{id}-sign.pub.pem"));
        keyfile::write_public_key(&public_path, &key.public_key()).unwrap();
        let bank_encrypt =
            keyfile::load_public_key(&bank_keys.join("node-encrypt.pub.pem")).unwrap();
        let bank_sign = keyfile::load_public_key(&bank_keys.join("node-sign.pub.pem")).unwrap();
        let section = format!(
            "[institutions.{id}]\nname = \"{id} test\"\nsign_public = \"{}\"\nsign_key_serial = \"{id}-01\"\n",
            public_path.display()
        );
        (
            TestInstitution {
                id: id.to_string(),
                sign_serial: format!("{id}-01"),
                signer: Signer::new(&key, "1234567812345678").unwrap(),
                bank_encrypt,
                bank_encrypt_serial: "test-enc-01".to_string(),
                bank_verifier: Verifier::new(&bank_sign, "1234567812345678").unwrap(),
                base_url: base_url.to_string(),
                counter: std::sync::atomic::AtomicU64::new(0),
            },
            section,
        )
    }

    /// An institution whose private key already exists (`make run`'s DEMO institution).
    pub fn from_key(
        id: &str,
        sign_serial: &str,
        private_key: &Path,
        bank_keys: &Path,
        bank_encrypt_serial: &str,
        base_url: &str,
    ) -> TestInstitution {
        let key = keyfile::load_private_key(private_key, None, "the institution's key").unwrap();
        let bank_encrypt =
            keyfile::load_public_key(&bank_keys.join("node-encrypt.pub.pem")).unwrap();
        let bank_sign = keyfile::load_public_key(&bank_keys.join("node-sign.pub.pem")).unwrap();
        TestInstitution {
            id: id.to_string(),
            sign_serial: sign_serial.to_string(),
            signer: Signer::new(&key, "1234567812345678").unwrap(),
            bank_encrypt,
            bank_encrypt_serial: bank_encrypt_serial.to_string(),
            bank_verifier: Verifier::new(&bank_sign, "1234567812345678").unwrap(),
            base_url: base_url.to_string(),
            counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn next_id(&self, prefix: &str) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("{prefix}{}{}", std::process::id(), n)
    }

    /// A signed request; sensitive fields are encrypted under a fresh envelope.
    pub fn message(&self, msg_type: MsgType, fields: &[(&str, &str)]) -> Vec<u8> {
        self.message_with(
            msg_type,
            msg_type.name(),
            fields,
            &chrono::Utc::now().to_rfc3339(),
            &self.next_id("M"),
        )
    }

    pub fn message_with(
        &self,
        _msg_type: MsgType,
        msg_tp: &str,
        fields: &[(&str, &str)],
        send_time: &str,
        msg_id: &str,
    ) -> Vec<u8> {
        let key = MessageKey::generate().unwrap();
        let needs_envelope = fields
            .iter()
            .any(|(name, _)| SENSITIVE_FIELDS.contains(name));
        let mut w = MessageWriter::new();
        w.field("MsgTp", msg_tp)
            .field("SndInstId", &self.id)
            .field("SgnSN", &self.sign_serial)
            .field("SndDtTm", send_time)
            .field("MsgId", msg_id);
        if needs_envelope {
            w.field("EncSN", &self.bank_encrypt_serial).field(
                "DgtlEnvlp",
                &key.seal(&self.bank_encrypt, CipherOrder::C1C3C2).unwrap(),
            );
        }
        w.body();
        for (name, value) in fields {
            if SENSITIVE_FIELDS.contains(name) {
                w.field(name, &key.encrypt_field(name, value).unwrap());
            } else {
                w.field(name, value);
            }
        }
        let signed = w.finish().into_bytes();
        let signature = self.signer.sign(&signed, SignatureFormat::Der).unwrap();
        attach_signature(signed, &signature)
    }

    pub fn post_raw(&self, msg_type: MsgType, body: &[u8]) -> (u16, Vec<u8>) {
        self.try_post(msg_type, body)
            .expect("the daemon answers over HTTP")
    }

    /// Posts; `None` when the connection failed (the daemon is gone), for tests that kill it.
    pub fn try_post(&self, msg_type: MsgType, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        post_to(&self.base_url, msg_type, body)
    }

    /// Posts and verifies kunpay's signature on the answer.
    pub fn send(&self, msg_type: MsgType, body: &[u8]) -> Answer {
        let (status, raw) = self.post_raw(msg_type, body);
        assert_eq!(
            status,
            200,
            "HTTP status; body {}",
            String::from_utf8_lossy(&raw)
        );
        self.verify_answer(raw)
    }

    pub fn verify_answer(&self, raw: Vec<u8>) -> Answer {
        let parsed = message::parse(&raw)
            .unwrap_or_else(|e| panic!("unparsable answer {e}: {}", String::from_utf8_lossy(&raw)));
        self.bank_verifier
            .verify(parsed.signed, &parsed.signature, SignatureFormat::Der)
            .expect("kunpay's answer is signed with its key");
        let mut fields = BTreeMap::new();
        let mut txns = Vec::new();
        for child in parsed
            .header
            .children
            .iter()
            .chain(parsed.body.children.iter())
        {
            if child.name == "Txns" {
                for txn in &child.children {
                    txns.push(
                        txn.children
                            .iter()
                            .map(|c| (c.name.clone(), c.text.clone()))
                            .collect(),
                    );
                }
            } else {
                fields.insert(child.name.clone(), child.text.clone());
            }
        }
        Answer { raw, fields, txns }
    }

    pub fn call(&self, msg_type: MsgType, fields: &[(&str, &str)]) -> Answer {
        self.send(msg_type, &self.message(msg_type, fields))
    }

    /// Signs an agreement in the protocol's two steps (the code comes from the simulator's
    /// rule) for the account (number, name, id number, phone); returns the agreement number.
    pub fn sign_agreement(&self, account: (&str, &str, &str, &str)) -> String {
        let apply = self.call(
            MsgType::AgreementApply,
            &[
                ("ReqSerial", &self.next_id("AP")),
                ("AcctNo", account.0),
                ("AcctNm", account.1),
                ("IdTp", "01"),
                ("IdNo", account.2),
                ("PhoneNo", account.3),
            ],
        );
        assert_eq!(apply.code(), "0000", "agreement apply: {:?}", apply.fields);
        let agreement = apply.get("AgrmtNo").to_string();
        let confirm = self.call(
            MsgType::AgreementConfirm,
            &[
                ("ReqSerial", &self.next_id("CF")),
                ("AgrmtNo", &agreement),
                ("VrfyCd", &kunpay::core::sim::verification_code(&agreement)),
            ],
        );
        assert_eq!(
            confirm.code(),
            "0000",
            "agreement confirm: {:?}",
            confirm.fields
        );
        agreement
    }
}

/// Posts `body` to `base` on the message type's path; `None` when the connection failed.
pub fn post_to(base: &str, msg_type: MsgType, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent
        .post(&format!("{base}{}", msg_type.path()))
        .header("Content-Type", "application/xml")
        .send(body)
        .ok()?;
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(16 * 1024 * 1024)
        .read_to_vec()
        .ok()?;
    Some((status, bytes))
}
