//! kunpayctl keygen / sign / verify: standard PEM, standard DER signatures, interoperable with
//! the openssl command line both ways, and exit codes scripts can rely on (0 valid, 1 invalid,
//! 2 usage or I/O error).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use common::*;

const DISTID: &str = "1234567812345678";

fn openssl(args: &[&str]) -> (i32, String, String) {
    run(Command::new("openssl").args(args))
}

#[test]
fn keys_signatures_and_exit_codes_interoperate_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (code, _, stderr) = run(kunpayctl().args([
        "keygen",
        "--private",
        &path("sk.pem"),
        "--public",
        &path("pub.pem"),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::metadata(path("sk.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        openssl(&["pkey", "-noout", "-in", &path("sk.pem")]).0,
        0,
        "openssl reads our private key"
    );
    assert_eq!(
        openssl(&["pkey", "-noout", "-pubin", "-in", &path("pub.pem")]).0,
        0,
        "and our public key"
    );

    std::fs::write(
        path("msg"),
        b"<root><MsgHeader/><MsgBody>amount=100</MsgBody></root>",
    )
    .unwrap();
    let (code, _, stderr) = run(kunpayctl().args([
        "sign",
        "--key",
        &path("sk.pem"),
        "--in",
        &path("msg"),
        "--out",
        &path("sig.der"),
    ]));
    assert_eq!(code, 0, "{stderr}");
    // We sign, openssl verifies.
    let (code, stdout, stderr) = openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        &path("pub.pem"),
        "-rawin",
        "-in",
        &path("msg"),
        "-sigfile",
        &path("sig.der"),
        "-digest",
        "sm3",
        "-pkeyopt",
        &format!("distid:{DISTID}"),
    ]);
    assert_eq!(code, 0, "openssl rejects our signature: {stdout} {stderr}");
    // kunpayctl verifies its own.
    let verify = |msg: &str, sig: &str, id: &str| {
        run(kunpayctl().args([
            "verify",
            "--pubkey",
            &path("pub.pem"),
            "--in",
            &path(msg),
            "--sig",
            &path(sig),
            "--id",
            id,
        ]))
    };
    assert_eq!(verify("msg", "sig.der", DISTID).0, 0);

    // openssl signs, kunpayctl verifies.
    let (code, _, stderr) = openssl(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        &path("sk.pem"),
        "-rawin",
        "-in",
        &path("msg"),
        "-digest",
        "sm3",
        "-pkeyopt",
        &format!("distid:{DISTID}"),
        "-out",
        &path("ossl.der"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, _) = verify("msg", "ossl.der", DISTID);
    assert_eq!(code, 0, "{stdout}");

    // Invalid: another message, another distinguishing id -> exit 1.
    std::fs::write(
        path("other"),
        b"<root><MsgHeader/><MsgBody>amount=900</MsgBody></root>",
    )
    .unwrap();
    let (code, stdout, _) = verify("other", "sig.der", DISTID);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("INVALID"));
    assert_eq!(
        verify("msg", "sig.der", "9999999999999999").0,
        1,
        "wrong distinguishing id fails"
    );

    // I/O and usage errors -> exit 2.
    assert_eq!(verify("missing", "sig.der", DISTID).0, 2);
    assert_eq!(
        run(kunpayctl().args(["verify", "--pubkey", &path("pub.pem")])).0,
        2
    );
    std::fs::write(path("garbage.der"), b"not a signature").unwrap();
    assert_eq!(
        verify("msg", "garbage.der", DISTID).0,
        1,
        "a malformed signature is not valid"
    );
}

#[test]
fn keygen_never_overwrites_and_encrypted_keys_need_their_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("pass"), "correct horse battery staple\n").unwrap();
    std::fs::set_permissions(path("pass"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, stderr) = run(kunpayctl().args([
        "keygen",
        "--private",
        &path("sk.pem"),
        "--public",
        &path("pub.pem"),
        "--passphrase-file",
        &path("pass"),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        std::fs::read_to_string(path("sk.pem"))
            .unwrap()
            .contains("ENCRYPTED PRIVATE KEY")
    );
    let (code, _, stderr) = openssl(&[
        "pkey",
        "-noout",
        "-in",
        &path("sk.pem"),
        "-passin",
        "pass:correct horse battery staple",
    ]);
    assert_eq!(code, 0, "openssl decrypts our encrypted key: {stderr}");

    let (code, _, stderr) = run(kunpayctl().args([
        "keygen",
        "--private",
        &path("sk.pem"),
        "--public",
        &path("pub2.pem"),
    ]));
    assert_eq!(code, 2);
    assert!(stderr.contains(&path("sk.pem")), "{stderr}");
    std::fs::write(path("msg"), b"x").unwrap();
    let (code, _, stderr) = run(kunpayctl().args([
        "sign",
        "--key",
        &path("sk.pem"),
        "--in",
        &path("msg"),
        "--out",
        &path("s"),
    ]));
    assert_eq!(code, 2, "an encrypted key without a passphrase is refused");
    assert!(stderr.contains("encrypted"), "{stderr}");
    let (code, _, stderr) = run(kunpayctl().args([
        "sign",
        "--key",
        &path("sk.pem"),
        "--in",
        &path("msg"),
        "--out",
        &path("s"),
        "--passphrase-file",
        &path("pass"),
    ]));
    assert_eq!(code, 0, "{stderr}");
}
