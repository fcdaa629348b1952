//! `kunpay-audit export-openssl`: every checkpoint's signed bytes and DER signature as files,
//! and the audit public keys as PEM, so that the OpenSSL 3 command line verifies each
//! checkpoint with no kunpay code (commands in docs/audit.md and in the written `verify.sh`).
//!
//! Owns: the export layout (`CP-<n>.bin`, `CP-<n>.sig`, `KEY-<key id>.pem`, `checkpoints.tsv`,
//! `verify.sh`). Must never: overwrite files (an export goes into a new or empty directory).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::checkpoint::Checkpoint;
use super::pubkeys::Pubkeys;
use super::record::{Frame, SegmentHeader};
use super::segment::{self, Frames, Step};
use crate::crypto::DEFAULT_DISTID;

#[derive(Clone, Debug, Default)]
pub struct ExportSummary {
    pub checkpoints: u64,
    pub keys: Vec<String>,
    /// Checkpoints whose key id is not in the public-key file (exported, but no PEM for them).
    pub unknown_keys: Vec<String>,
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            format!(
                "cannot create {}: {e} (export into a new, empty directory)",
                path.display()
            )
        })?;
    file.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The command that verifies checkpoint `n` signed with `key_id`, run inside the export.
pub fn openssl_command(n: u64, key_id: &str) -> String {
    format!(
        "openssl pkeyutl -verify -pubin -inkey KEY-{key_id}.pem -rawin -in CP-{n}.bin \
         -sigfile CP-{n}.sig -digest sm3 -pkeyopt distid:{DEFAULT_DISTID}"
    )
}

pub fn export_openssl(dir: &Path, out: &Path, keys: &Pubkeys) -> Result<ExportSummary, String> {
    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut summary = ExportSummary::default();
    for (key_id, verifier) in &keys.audit_keys {
        let pem = verifier
            .public_key()
            .to_public_key_pem()
            .map_err(|e| format!("audit key {key_id}: {e}"))?;
        write_new(&out.join(format!("KEY-{key_id}.pem")), pem.as_bytes())?;
        summary.keys.push(key_id.clone());
    }
    let mut index = String::from("checkpoint\tkey_id\tfirst_seq\tlast_seq\tsegment\n");
    let mut script = String::from(
        "#!/bin/sh\n# Verifies every exported checkpoint with OpenSSL only; stops at the first \
         failure.\nset -e\ncd \"$(dirname \"$0\")\"\n",
    );
    let segments = segment::list(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for file in &segments {
        let bytes = fs::read(&file.path).map_err(|e| format!("{}: {e}", file.path.display()))?;
        let start = match SegmentHeader::decode(&bytes) {
            Ok((_, len)) => len,
            Err(_) => super::record::resync(&bytes, 1).unwrap_or(bytes.len()),
        };
        for step in Frames::new(&bytes, start) {
            let Step::Frame {
                frame: Frame::Checkpoint(frame),
                ..
            } = step
            else {
                continue;
            };
            summary.checkpoints += 1;
            let n = summary.checkpoints;
            write_new(&out.join(format!("CP-{n}.bin")), &frame.signed)?;
            write_new(&out.join(format!("CP-{n}.sig")), &frame.signature)?;
            let (key_id, first, last) = match Checkpoint::parse(&frame.signed) {
                Ok(c) => (c.key_id, c.first_seq.to_string(), c.last_seq.to_string()),
                Err(_) => ("?".to_owned(), "?".to_owned(), "?".to_owned()),
            };
            index.push_str(&format!("{n}\t{key_id}\t{first}\t{last}\t{}\n", file.name));
            if keys.audit_keys.contains_key(&key_id) {
                script.push_str(&format!(
                    "printf 'CP-{n}: '; {}\n",
                    openssl_command(n, &key_id)
                ));
            } else if !summary.unknown_keys.contains(&key_id) {
                summary.unknown_keys.push(key_id);
            }
        }
    }
    write_new(&out.join("checkpoints.tsv"), index.as_bytes())?;
    write_new(&out.join("verify.sh"), script.as_bytes())?;
    Ok(summary)
}
