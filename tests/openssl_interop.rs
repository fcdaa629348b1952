//! Interoperability with the real `openssl` (3.x) command line: keys, signatures, distinguishing
//! ids, SM2 encryption, SM4-CBC and the key-file permission rules. OpenSSL is the independent
//! implementation here; every comparison goes through its CLI.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kunpay::crypto::sm2::{decrypt, encrypt};
use kunpay::crypto::sm4::{cbc_decrypt, cbc_encrypt};
use kunpay::crypto::{
    CipherOrder, CryptoError, DEFAULT_DISTID, KeyFileError, PassphraseSource, PrivateKey,
    PublicKey, SignatureFormat, Signer, Verifier, load_private_key, load_public_key,
    write_private_key, write_public_key,
};
use sm2::pkcs8::der::{Decode, Encode};
use sm2::pke::{Cipher, Mode};

const MESSAGE_COUNT: usize = 100;
const MAX_MESSAGE_LEN: usize = 4096;

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command line (3.x) must be installed for these tests")
}

fn openssl_ok(args: &[&str]) -> Output {
    let output = openssl(args);
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn openssl_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl must be installed");
    // Write from a thread so a large output cannot deadlock against a full stdin pipe.
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    output
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a POSIX shell script in `dir`: one process start for a whole batch of openssl calls.
fn run_script(dir: &Path, script: &str) -> String {
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Deterministic generator seeded from the OS, so a failure can be replayed from the printed seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn from_os() -> Self {
        let seed = getrandom::u64().unwrap();
        eprintln!("random message seed: {seed:#x}");
        Self(seed)
    }

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

fn openssl_public_pem(private_key_path: &Path, passin: Option<&str>) -> String {
    let mut args = vec!["pkey", "-in", path_str(private_key_path), "-pubout"];
    if let Some(passin) = passin {
        args.extend(["-passin", passin]);
    }
    String::from_utf8(openssl_ok(&args).stdout).unwrap()
}

#[test]
fn our_pem_files_are_read_by_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    let private_path = dir.path().join("sk.pem");
    let public_path = dir.path().join("pk.pem");
    write_private_key(&private_path, &key, None).unwrap();
    write_public_key(&public_path, &key.public_key()).unwrap();

    let text = openssl_ok(&["pkey", "-in", path_str(&private_path), "-noout", "-text"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("ASN1 OID: SM2"));
    let text = openssl_ok(&[
        "pkey",
        "-pubin",
        "-in",
        path_str(&public_path),
        "-noout",
        "-text",
    ]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("ASN1 OID: SM2"));

    // OpenSSL derives the same public key from our private key file, byte for byte.
    assert_eq!(
        openssl_public_pem(&private_path, None),
        fs::read_to_string(&public_path).unwrap()
    );
}

#[test]
fn openssl_keys_load_and_our_encrypted_key_is_read_by_openssl() {
    let dir = tempfile::tempdir().unwrap();

    // Plain key from `openssl genpkey`.
    let plain_path = dir.path().join("openssl-sk.pem");
    openssl_ok(&[
        "genpkey",
        "-algorithm",
        "SM2",
        "-out",
        path_str(&plain_path),
    ]);
    chmod(&plain_path, 0o600);
    let loaded = load_private_key(&plain_path, None, "keys.signing").unwrap();
    let expected = PublicKey::from_public_key_pem(&openssl_public_pem(&plain_path, None)).unwrap();
    assert_eq!(loaded.public_key(), expected);

    // Encrypted key from `openssl genpkey -aes-256-cbc` (PBES2, PBKDF2-SHA256, 2048 iterations).
    let encrypted_path = dir.path().join("openssl-sk-enc.pem");
    openssl_ok(&[
        "genpkey",
        "-algorithm",
        "SM2",
        "-aes-256-cbc",
        "-pass",
        "pass:correct horse",
        "-out",
        path_str(&encrypted_path),
    ]);
    chmod(&encrypted_path, 0o600);
    let passphrase_path = dir.path().join("passphrase");
    fs::write(&passphrase_path, "correct horse\n").unwrap();
    chmod(&passphrase_path, 0o600);
    let passphrase = PassphraseSource::File(passphrase_path.clone());
    let loaded = load_private_key(&encrypted_path, Some(&passphrase), "keys.signing").unwrap();
    let expected = PublicKey::from_public_key_pem(&openssl_public_pem(
        &encrypted_path,
        Some("pass:correct horse"),
    ))
    .unwrap();
    assert_eq!(loaded.public_key(), expected);

    let error = load_private_key(&encrypted_path, None, "keys.signing").unwrap_err();
    assert!(matches!(error, KeyFileError::PassphraseRequired { .. }));
    let message = error.to_string();
    assert!(
        message.contains("is encrypted")
            && message.contains("keys.signing.passphrase_file")
            && message.contains("keys.signing.passphrase_credential")
            && message.contains(path_str(&encrypted_path)),
        "{message}"
    );

    let wrong_path = dir.path().join("wrong-passphrase");
    fs::write(&wrong_path, "battery staple\n").unwrap();
    chmod(&wrong_path, 0o600);
    let error = load_private_key(
        &encrypted_path,
        Some(&PassphraseSource::File(wrong_path)),
        "keys.signing",
    )
    .unwrap_err();
    assert!(
        matches!(error, KeyFileError::WrongPassphrase { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(path_str(&encrypted_path)));

    let error = load_private_key(&plain_path, Some(&passphrase), "keys.signing").unwrap_err();
    assert!(
        matches!(error, KeyFileError::PassphraseNotNeeded { .. }),
        "{error}"
    );

    // Our encrypted key (PBES2 / PBKDF2-SHA256 / AES-256-CBC) is read by OpenSSL.
    let ours = PrivateKey::generate().unwrap();
    let ours_path = dir.path().join("ours-enc.pem");
    write_private_key(&ours_path, &ours, Some(b"correct horse")).unwrap();
    let structure = openssl_ok(&["asn1parse", "-in", path_str(&ours_path)]);
    let structure = String::from_utf8_lossy(&structure.stdout);
    for part in ["PBES2", "PBKDF2", "hmacWithSHA256", "aes-256-cbc"] {
        assert!(structure.contains(part), "missing {part} in\n{structure}");
    }
    let from_openssl = openssl_public_pem(&ours_path, Some("pass:correct horse"));
    assert_eq!(
        PublicKey::from_public_key_pem(&from_openssl).unwrap(),
        ours.public_key()
    );
    assert!(
        !openssl(&[
            "pkey",
            "-in",
            path_str(&ours_path),
            "-passin",
            "pass:wrong",
            "-noout"
        ])
        .status
        .success()
    );
    let reloaded = load_private_key(&ours_path, Some(&passphrase), "keys.signing").unwrap();
    assert_eq!(reloaded.public_key(), ours.public_key());
}

#[test]
fn signatures_interoperate_with_openssl_for_random_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::from_os();

    let our_key = PrivateKey::generate().unwrap();
    write_public_key(&dir.path().join("our-pub.pem"), &our_key.public_key()).unwrap();
    openssl_ok(&[
        "genpkey",
        "-algorithm",
        "SM2",
        "-out",
        path_str(&dir.path().join("their-sk.pem")),
    ]);
    let their_public =
        PublicKey::from_public_key_pem(&openssl_public_pem(&dir.path().join("their-sk.pem"), None))
            .unwrap();

    let signer = Signer::new(&our_key, DEFAULT_DISTID).unwrap();
    let mut messages = Vec::with_capacity(MESSAGE_COUNT);
    for index in 0..MESSAGE_COUNT {
        // Always include the empty message and a full-size one.
        let len = match index {
            0 => 0,
            1 => MAX_MESSAGE_LEN,
            _ => (rng.next() % (MAX_MESSAGE_LEN as u64 + 1)) as usize,
        };
        let message = rng.bytes(len);
        fs::write(dir.path().join(format!("msg-{index}")), &message).unwrap();
        let signature = signer.sign(&message, SignatureFormat::Der).unwrap();
        fs::write(dir.path().join(format!("our-sig-{index}.der")), &signature).unwrap();
        messages.push(message);
    }

    // One shell for the whole batch; each message still goes through its own openssl calls.
    let script = format!(
        r#"
        i=0
        while [ "$i" -lt {MESSAGE_COUNT} ]; do
          if openssl pkeyutl -verify -pubin -inkey our-pub.pem -rawin -in "msg-$i" \
               -sigfile "our-sig-$i.der" -digest sm3 -pkeyopt distid:{DEFAULT_DISTID} \
               >/dev/null 2>&1; then
            echo "verified $i"
          else
            echo "REJECTED $i"
          fi
          openssl pkeyutl -sign -inkey their-sk.pem -rawin -in "msg-$i" -digest sm3 \
            -pkeyopt distid:{DEFAULT_DISTID} -out "their-sig-$i.der" || echo "SIGN-FAILED $i"
          i=$((i + 1))
        done
        "#
    );
    let report = run_script(dir.path(), &script);
    let verified = report
        .lines()
        .filter(|l| l.starts_with("verified "))
        .count();
    assert_eq!(
        verified, MESSAGE_COUNT,
        "OpenSSL rejected some of our signatures:\n{report}"
    );

    let verifier = Verifier::new(&their_public, DEFAULT_DISTID).unwrap();
    for (index, message) in messages.iter().enumerate() {
        let signature = fs::read(dir.path().join(format!("their-sig-{index}.der"))).unwrap();
        verifier
            .verify(message, &signature, SignatureFormat::Der)
            .unwrap_or_else(|error| {
                panic!(
                    "OpenSSL signature {index} ({} bytes) rejected: {error}",
                    message.len()
                )
            });
    }
}

#[test]
fn distinguishing_id_mismatches_are_rejected_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let message_path = dir.path().join("msg");
    let message = b"pay 42.00 CNY, order 20261122-0001";
    fs::write(&message_path, message).unwrap();

    // Our signature, OpenSSL verifying with another id.
    let our_key = PrivateKey::generate().unwrap();
    let public_path = dir.path().join("our-pub.pem");
    write_public_key(&public_path, &our_key.public_key()).unwrap();
    let signature_path = dir.path().join("our-sig.der");
    let signature = Signer::new(&our_key, DEFAULT_DISTID)
        .unwrap()
        .sign(message, SignatureFormat::Der)
        .unwrap();
    fs::write(&signature_path, signature).unwrap();
    let verify_with = |distid: &str| {
        let distid_option = format!("distid:{distid}");
        openssl(&[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            path_str(&public_path),
            "-rawin",
            "-in",
            path_str(&message_path),
            "-sigfile",
            path_str(&signature_path),
            "-digest",
            "sm3",
            "-pkeyopt",
            &distid_option,
        ])
        .status
        .success()
    };
    assert!(
        verify_with(DEFAULT_DISTID),
        "control: the right id must verify"
    );
    assert!(!verify_with("8765432187654321"));

    // OpenSSL's signature with another id (and with its implicit empty id), us verifying with
    // the GB/T default.
    let their_key_path = dir.path().join("their-sk.pem");
    openssl_ok(&[
        "genpkey",
        "-algorithm",
        "SM2",
        "-out",
        path_str(&their_key_path),
    ]);
    let their_public =
        PublicKey::from_public_key_pem(&openssl_public_pem(&their_key_path, None)).unwrap();
    let sign_with = |distid: Option<&str>, out: &Path| {
        let mut args = vec![
            "pkeyutl".to_owned(),
            "-sign".to_owned(),
            "-inkey".to_owned(),
            path_str(&their_key_path).to_owned(),
            "-rawin".to_owned(),
            "-in".to_owned(),
            path_str(&message_path).to_owned(),
            "-digest".to_owned(),
            "sm3".to_owned(),
            "-out".to_owned(),
            path_str(out).to_owned(),
        ];
        if let Some(distid) = distid {
            args.extend(["-pkeyopt".to_owned(), format!("distid:{distid}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl_ok(&args);
        fs::read(out).unwrap()
    };
    let verifier = Verifier::new(&their_public, DEFAULT_DISTID).unwrap();
    let control = sign_with(Some(DEFAULT_DISTID), &dir.path().join("control.der"));
    verifier
        .verify(message, &control, SignatureFormat::Der)
        .unwrap();
    let other_id = sign_with(Some("8765432187654321"), &dir.path().join("other.der"));
    assert!(matches!(
        verifier.verify(message, &other_id, SignatureFormat::Der),
        Err(CryptoError::SignatureMismatch)
    ));
    let implicit_id = sign_with(None, &dir.path().join("implicit.der"));
    assert!(
        matches!(
            verifier.verify(message, &implicit_id, SignatureFormat::Der),
            Err(CryptoError::SignatureMismatch)
        ),
        "OpenSSL without -pkeyopt distid must not match the GB/T default id"
    );
}

#[test]
fn sm2_encryption_interoperates_with_openssl() {
    // OpenSSL writes SM2 ciphertexts as ASN.1 (x, y, C3, C2); the sm2 crate converts between that
    // and our 04 || x || y || C3 || C2 byte layout.
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    let private_path = dir.path().join("sk.pem");
    let public_path = dir.path().join("pk.pem");
    write_private_key(&private_path, &key, None).unwrap();
    write_public_key(&public_path, &key.public_key()).unwrap();

    for plaintext in [&b"x"[..], b"card 6222 0000 0000 0000", &[0x5a; 1000]] {
        let ours = encrypt(&key.public_key(), plaintext, CipherOrder::C1C3C2).unwrap();
        let asn1 = Cipher::<sm2::Sm2, sm3::Sm3>::from_slice(&ours, Mode::C1C3C2)
            .unwrap()
            .to_der()
            .unwrap();
        let output = openssl_with_stdin(
            &["pkeyutl", "-decrypt", "-inkey", path_str(&private_path)],
            &asn1,
        );
        assert!(output.status.success(), "openssl could not decrypt ours");
        assert_eq!(output.stdout, plaintext);

        let output = openssl_with_stdin(
            &[
                "pkeyutl",
                "-encrypt",
                "-pubin",
                "-inkey",
                path_str(&public_path),
            ],
            plaintext,
        );
        assert!(output.status.success());
        let theirs = Cipher::<sm2::Sm2, sm3::Sm3>::from_der(&output.stdout)
            .unwrap()
            .to_vec(Mode::C1C3C2, false)
            .unwrap();
        assert_eq!(
            decrypt(&key, &theirs, CipherOrder::C1C3C2)
                .unwrap()
                .as_slice(),
            plaintext
        );
    }
}

#[test]
fn sm4_cbc_matches_openssl_enc_both_ways() {
    let key: [u8; 16] = *b"kunpay-sm4-key!!";
    let iv: [u8; 16] = *b"initial-vector-1";
    let key_hex = hex::encode(key);
    let iv_hex = hex::encode(iv);
    let mut rng = SplitMix64(0x5eed_0004);
    for len in [0usize, 1, 15, 16, 17, 31, 32, 48, 100, 4096] {
        let plaintext = rng.bytes(len);

        let ours = cbc_encrypt(&key, &iv, &plaintext);
        let output = openssl_with_stdin(
            &["enc", "-d", "-sm4-cbc", "-K", &key_hex, "-iv", &iv_hex],
            &ours,
        );
        assert!(
            output.status.success(),
            "openssl could not decrypt {len} bytes"
        );
        assert_eq!(output.stdout, plaintext, "length {len}");

        let output = openssl_with_stdin(
            &["enc", "-sm4-cbc", "-K", &key_hex, "-iv", &iv_hex],
            &plaintext,
        );
        assert!(output.status.success());
        assert_eq!(
            output.stdout, ours,
            "OpenSSL and we disagree at length {len}"
        );
        assert_eq!(
            cbc_decrypt(&key, &iv, &output.stdout).unwrap().as_slice(),
            plaintext
        );
    }
}

#[test]
fn private_key_permissions_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("signing key.pem");
    openssl_ok(&["genpkey", "-algorithm", "SM2", "-out", path_str(&path)]);

    for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
        chmod(&path, mode);
        let error = load_private_key(&path, None, "keys.signing").unwrap_err();
        assert!(
            matches!(error, KeyFileError::InsecurePermissions { .. }),
            "mode {mode:o}: {error}"
        );
        let message = error.to_string();
        assert!(message.contains(path_str(&path)), "{message}");
        assert!(message.contains("chmod 0600"), "{message}");
        assert!(message.contains(&format!("{mode:04o}")), "{message}");
    }
    for mode in [0o600, 0o400] {
        chmod(&path, mode);
        load_private_key(&path, None, "keys.signing").unwrap();
    }
    // Public keys are public: a 0644 public key file is fine.
    let public_path = dir.path().join("pub.pem");
    fs::write(&public_path, openssl_public_pem(&path, None)).unwrap();
    chmod(&public_path, 0o644);
    load_public_key(&public_path).unwrap();
}
