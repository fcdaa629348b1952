//! The channel over real TLS: a certificate the client verifies, TLS 1.2 or newer only, and a
//! signed debit flow through it.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Command;

use common::institution::TestInstitution;
use common::*;
use kunpay::payment::request::MsgType;
use openssl::ssl::{SslConnector, SslMethod, SslVersion};

fn make_certificate(dir: &std::path::Path) {
    let (code, _, stderr) = run(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        "tls.key",
        "-out",
        "tls.crt",
        "-days",
        "2",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ]));
    assert_eq!(code, 0, "{stderr}");
}

/// POST over TLS with the given protocol bounds; returns the response body.
fn post_tls(
    port: u16,
    ca: &std::path::Path,
    max: Option<SslVersion>,
    path: &str,
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let mut builder = SslConnector::builder(SslMethod::tls_client()).unwrap();
    builder.set_ca_file(ca).unwrap();
    if let Some(max) = max {
        builder
            .set_min_proto_version(Some(SslVersion::TLS1))
            .unwrap();
        builder.set_max_proto_version(Some(max)).unwrap();
        // OpenSSL 3 refuses TLS < 1.2 at its default security level; lower it so that the
        // refusal we observe is the server's.
        builder.set_cipher_list("DEFAULT:@SECLEVEL=0").unwrap();
    }
    let connector = builder.build();
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect("localhost", tcp)
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    tls.write_all(body).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?;
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response[..split])
    );
    Ok(response[split + 4..].to_vec())
}

#[test]
fn institutions_talk_to_kunpay_over_verified_tls_1_2_or_newer() {
    let db = TestDb::new();
    let dir = DaemonDir::new();
    make_certificate(dir.path());
    let port = free_port();
    let keys = dir.path().join("keys");
    let (tenpay, section) = TestInstitution::create(dir.path(), "TENPAY", &keys, "unused");
    dir.write_channel_config(db.url(), port, &section, "");
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    std::fs::write(
        dir.config_path(),
        text.replace(
            "plain_http = true",
            &format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"",
                dir.path().join("tls.crt").display(),
                dir.path().join("tls.key").display()
            ),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&dir);
    daemon.wait_ready();
    let ca = dir.path().join("tls.crt");

    // A query over TLS 1.3 (the default) is answered and signed.
    let message = tenpay.message(MsgType::Query, &[("QrySerial", "NOPE")]);
    let body = post_tls(port, &ca, None, MsgType::Query.path(), &message).unwrap();
    let answer = tenpay.verify_answer(body);
    assert_eq!(answer.code(), "3013", "{:?}", answer.fields);

    // TLS 1.2 is accepted, TLS 1.1 is refused.
    let message = tenpay.message(MsgType::Query, &[("QrySerial", "NOPE2")]);
    assert!(
        post_tls(
            port,
            &ca,
            Some(SslVersion::TLS1_2),
            MsgType::Query.path(),
            &message
        )
        .is_ok()
    );
    let message = tenpay.message(MsgType::Query, &[("QrySerial", "NOPE3")]);
    let refused = post_tls(
        port,
        &ca,
        Some(SslVersion::TLS1_1),
        MsgType::Query.path(),
        &message,
    );
    assert!(refused.is_err(), "TLS 1.1 must be refused");

    // A client that does not trust the certificate does not get through.
    let other = tempfile::tempdir().unwrap();
    make_certificate(other.path());
    let message = tenpay.message(MsgType::Query, &[("QrySerial", "NOPE4")]);
    assert!(
        post_tls(
            port,
            &other.path().join("tls.crt"),
            None,
            MsgType::Query.path(),
            &message
        )
        .is_err()
    );
}
