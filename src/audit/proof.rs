//! Inclusion proofs: `kunpay-audit prove` finds one record, the checkpoint that covers it and
//! its Merkle audit path; `check-proof` verifies such a proof with nothing but the auditor's
//! public-key file.
//!
//! Owns: the proof's JSON form and its complete check (the record's hash over its exact frame
//! bytes, the checkpoint signature, the position in the range, the path to the signed root).
//! Must never: take a field of the proof on trust when it can be recomputed.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpoint;
use super::merkle::{self, from_hex, to_hex};
use super::pubkeys::Pubkeys;
use super::record::{Direction, Frame, HASH_LEN, Hash, PeerSignature, Record, read_frame};
use super::segment::{self, Frames, Step};
use super::verify::format_ms;
use crate::channel::message::split_signature;
use crate::crypto::SignatureFormat;

pub const PROOF_FORMAT: &str = "kunpay-audit inclusion proof v1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub format: String,
    pub seq: u64,
    /// Where the record was found (for people; not part of what is proven).
    pub segment: String,
    pub offset: u64,
    /// The record's complete frame, base64: its SM3 (without the last 32 bytes) is its hash.
    pub record_frame: String,
    pub record_hash: String,
    /// Position of the record in the checkpoint's range and the range's size.
    pub leaf_index: u64,
    pub tree_size: u64,
    /// Sibling hashes from the leaf up to the root (RFC 6962 PATH), hex.
    pub audit_path: Vec<String>,
    pub checkpoint: ProofCheckpoint,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofCheckpoint {
    pub key_id: String,
    /// The exact signed bytes (ASCII text).
    pub signed: String,
    /// DER SM2 signature over `signed`, base64.
    pub signature: String,
}

/// Builds the proof for record `seq` from the log in `dir`.
pub fn prove(dir: &Path, seq: u64) -> Result<InclusionProof, String> {
    let segments = segment::list(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut found: Option<(String, u64, Vec<u8>, Hash)> = None;
    let mut range: Vec<(u64, Hash)> = Vec::new();
    for file in &segments {
        let bytes =
            std::fs::read(&file.path).map_err(|e| format!("{}: {e}", file.path.display()))?;
        let start = super::record::SegmentHeader::decode(&bytes)
            .map_err(|e| {
                format!(
                    "{}: segment header: {e}; run kunpay-audit verify",
                    file.name
                )
            })?
            .1;
        for step in Frames::new(&bytes, start) {
            match step {
                Step::Frame { offset, len, frame } => match frame {
                    Frame::Record { record, hash } => {
                        if record.seq == seq {
                            let frame_bytes = bytes[offset..offset + len].to_vec();
                            found = Some((file.name.clone(), offset as u64, frame_bytes, hash));
                        }
                        range.push((record.seq, hash));
                    }
                    Frame::Checkpoint(frame) => {
                        let covered = std::mem::take(&mut range);
                        let Some((segment, offset, frame_bytes, hash)) = found.clone() else {
                            continue;
                        };
                        let checkpoint = Checkpoint::parse(&frame.signed)
                            .map_err(|e| format!("{}: checkpoint: {e}", file.name))?;
                        if !(checkpoint.first_seq..=checkpoint.last_seq).contains(&seq) {
                            continue;
                        }
                        let hashes: Vec<Hash> = covered.iter().map(|(_, h)| *h).collect();
                        let index = covered
                            .iter()
                            .position(|(s, _)| *s == seq)
                            .ok_or("the covering checkpoint's range does not hold the record; run kunpay-audit verify")?;
                        let path = merkle::audit_path(&hashes, index).unwrap_or_default();
                        return Ok(InclusionProof {
                            format: PROOF_FORMAT.into(),
                            seq,
                            segment,
                            offset,
                            record_frame: BASE64.encode(frame_bytes),
                            record_hash: to_hex(&hash),
                            leaf_index: index as u64,
                            tree_size: hashes.len() as u64,
                            audit_path: path.iter().map(to_hex).collect(),
                            checkpoint: ProofCheckpoint {
                                key_id: checkpoint.key_id,
                                signed: String::from_utf8_lossy(&frame.signed).into_owned(),
                                signature: BASE64.encode(&frame.signature),
                            },
                        });
                    }
                },
                Step::Damage { offset, error, .. } => {
                    if found.is_some() {
                        return Err(format!(
                            "{} byte {offset}: {error} before the checkpoint covering record \
                             {seq}; run kunpay-audit verify",
                            file.name
                        ));
                    }
                }
            }
        }
    }
    Err(match found {
        None => format!("record {seq} is not in {}", dir.display()),
        Some(_) => format!(
            "record {seq} is not covered by a checkpoint yet; a running node seals it within its \
             checkpoint interval (a stopped one at its next start): copy the log again and \
             prove again"
        ),
    })
}

/// What a verified proof establishes.
#[derive(Clone, Debug)]
pub struct ProvenRecord {
    pub record: Record,
    pub hash: Hash,
    pub checkpoint: Checkpoint,
    /// For an inbound message kunpay verified: whether the institution's signature verifies
    /// (None: the institution is not in the public-key file, or no signature is involved).
    pub inbound_signature: Option<Result<(), String>>,
}

impl std::fmt::Display for ProvenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.record;
        writeln!(
            f,
            "record {} is included in the log of node {}",
            r.seq, self.checkpoint.node_id
        )?;
        writeln!(f, "  time: {}", format_ms(r.time_ms))?;
        writeln!(
            f,
            "  direction: {}, peer: {}, message type: {}",
            r.direction, r.peer, r.message_type
        )?;
        if let Some(txn) = r.txn_id {
            writeln!(f, "  transaction: {txn}")?;
        }
        writeln!(
            f,
            "  bytes: {} (record hash {})",
            r.payload.len(),
            to_hex(&self.hash)
        )?;
        match &self.inbound_signature {
            Some(Ok(())) => writeln!(f, "  institution signature: verifies")?,
            Some(Err(why)) => writeln!(f, "  institution signature: DOES NOT VERIFY: {why}")?,
            None => {}
        }
        write!(
            f,
            "  sealed by checkpoint of records {}..={} signed with audit key {}",
            self.checkpoint.first_seq, self.checkpoint.last_seq, self.checkpoint.key_id
        )
    }
}

/// Verifies a proof using only `keys`. Err says what does not hold.
pub fn check_proof(proof: &InclusionProof, keys: &Pubkeys) -> Result<ProvenRecord, String> {
    if proof.format != PROOF_FORMAT {
        return Err(format!(
            "not a {PROOF_FORMAT:?} document (format {:?})",
            proof.format
        ));
    }
    let frame = BASE64
        .decode(&proof.record_frame)
        .map_err(|e| format!("record_frame is not base64: {e}"))?;
    let (record, hash) = match read_frame(&frame) {
        Ok((Frame::Record { record, hash }, len)) if len == frame.len() => (record, hash),
        Ok(_) => return Err("record_frame is not exactly one record frame".into()),
        Err(e) => return Err(format!("record_frame: {e}")),
    };
    if from_hex(&proof.record_hash) != Some(hash) {
        return Err("record_hash is not the SM3 hash of record_frame".into());
    }
    if record.seq != proof.seq {
        return Err(format!(
            "the record is number {}, the proof claims {}",
            record.seq, proof.seq
        ));
    }
    let signed = proof.checkpoint.signed.as_bytes();
    let checkpoint = Checkpoint::parse(signed).map_err(|e| format!("checkpoint: {e}"))?;
    if checkpoint.key_id != proof.checkpoint.key_id {
        return Err("the checkpoint's key id differs from the proof's key_id".into());
    }
    let verifier = keys.audit_keys.get(&checkpoint.key_id).ok_or_else(|| {
        format!(
            "audit key {:?} is not in the public-key file",
            checkpoint.key_id
        )
    })?;
    let signature = BASE64
        .decode(&proof.checkpoint.signature)
        .map_err(|e| format!("checkpoint signature is not base64: {e}"))?;
    verifier
        .verify(signed, &signature, SignatureFormat::Der)
        .map_err(|e| {
            format!(
                "the checkpoint signature does not verify with audit key {:?}: {e}",
                checkpoint.key_id
            )
        })?;
    if !(checkpoint.first_seq..=checkpoint.last_seq).contains(&record.seq) {
        return Err(format!(
            "record {} is outside the checkpoint's range {}..={}",
            record.seq, checkpoint.first_seq, checkpoint.last_seq
        ));
    }
    if proof.leaf_index != record.seq - checkpoint.first_seq
        || proof.tree_size != checkpoint.records()
    {
        return Err(
            "leaf_index/tree_size do not match the record's place in the checkpoint".into(),
        );
    }
    let path: Vec<Hash> = proof
        .audit_path
        .iter()
        .map(|h| {
            from_hex(h)
                .ok_or_else(|| format!("audit path entry {h:?} is not {} hex bytes", HASH_LEN))
        })
        .collect::<Result<_, _>>()?;
    let root = merkle::root_from_path(&hash, proof.leaf_index, proof.tree_size, &path)
        .ok_or("the audit path has the wrong length for this position")?;
    if root != checkpoint.root {
        return Err("the audit path does not lead to the checkpoint's Merkle root".into());
    }
    if record.seq == checkpoint.last_seq && hash != checkpoint.head {
        return Err("the record is the checkpoint's last but not its chain head".into());
    }
    let inbound_signature = (record.direction == Direction::In
        && record.peer_signature == PeerSignature::Verified)
        .then(|| keys.institutions.get(&record.peer))
        .flatten()
        .map(|institution_keys| {
            let (signed, signature) =
                split_signature(&record.payload).map_err(|e| e.to_string())?;
            if institution_keys
                .iter()
                .any(|k| k.verifier.verify(signed, &signature, k.format).is_ok())
            {
                Ok(())
            } else {
                Err(format!("not with {}'s public key", record.peer))
            }
        });
    Ok(ProvenRecord {
        record,
        hash,
        checkpoint,
        inbound_signature,
    })
}
