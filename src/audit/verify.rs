//! The offline verifier behind `kunpay-audit verify`: reads a log directory and checks every
//! segment header, frame hash, sequence number, chain link, checkpoint (signature with the key
//! of its key id, contiguous ranges, chain head, Merkle root), the quarantine files named by
//! recovery records, and each institution's SM2 signature on the inbound messages kunpay acted
//! on.
//!
//! Owns: what counts as a failure (the log does not hold) and what as a warning (explained and
//! harmless to the records before it: a torn tail, the unsealed records after the last
//! checkpoint, a missing quarantine file). Every finding names the segment file, the byte offset
//! and the sequence number where it has them.
//! Must never: trust anything in the directory (it reads the keys only from the auditor's
//! public-key file), stop at the first failure, or write to the directory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::merkle;
use super::pubkeys::{InstitutionKey, Pubkeys};
use super::record::{Direction, Frame, Hash, PeerSignature, Record, SegmentHeader};
use super::recovery::{Quarantine, RECOVERY_MESSAGE_TYPE};
use super::segment::{self, Frames, Step};
use crate::channel::message::split_signature;
use crate::crypto::{SignatureFormat, sm3};

/// Where a finding is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub segment: Option<String>,
    pub offset: Option<u64>,
    pub seq: Option<u64>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(segment) = &self.segment {
            parts.push(format!("segment {segment}"));
        }
        if let Some(offset) = self.offset {
            parts.push(format!("byte {offset}"));
        }
        if let Some(seq) = self.seq {
            parts.push(format!("record {seq}"));
        }
        f.write_str(&parts.join(", "))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub at: Location,
    pub what: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at == Location::default() {
            f.write_str(&self.what)
        } else {
            write!(f, "{}: {}", self.at, self.what)
        }
    }
}

/// A torn tail: the end of the last segment that is not a complete frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub segment: String,
    pub offset: u64,
    pub length: u64,
    pub reason: String,
}

/// Everything the verifier found. `holds()` is the verdict.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub dir: PathBuf,
    pub segments: Vec<String>,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_time_ms: Option<u64>,
    pub last_time_ms: Option<u64>,
    pub checkpoints: u64,
    pub checkpoints_by_key: BTreeMap<String, u64>,
    /// Last record covered by a checkpoint that verified.
    pub sealed_through: u64,
    pub inbound_verified: u64,
    pub inbound_by_institution: BTreeMap<String, u64>,
    /// Inbound records kunpay refused at its edge (their signature is not required to hold).
    pub inbound_refused: u64,
    pub recoveries: Vec<Quarantine>,
    /// Kept checkpoints (`--expect-checkpoint`) found in the log.
    pub anchors_found: u64,
    pub torn_tail: Option<TornTail>,
    pub warnings: Vec<Finding>,
    pub failures: Vec<Finding>,
}

impl Report {
    /// True when everything checked holds (warnings allowed).
    pub fn holds(&self) -> bool {
        self.failures.is_empty() && !self.segments.is_empty()
    }
}

/// A reason the verifier could not run at all (exit code 2, not a verdict on the log).
#[derive(Debug, thiserror::Error)]
#[error("cannot read audit log directory {}: {reason}", dir.display())]
pub struct VerifyError {
    pub dir: PathBuf,
    pub reason: String,
}

/// An inbound signature to check once its segment is read (in parallel, they dominate).
struct SignatureJob {
    at: Location,
    institution: String,
    payload: Vec<u8>,
}

struct Walk<'k> {
    keys: &'k Pubkeys,
    report: Report,
    node_id: Option<String>,
    expected_seq: u64,
    head: Hash,
    head_at: Location,
    /// (seq, hash) of the records since the last checkpoint.
    range: Vec<(u64, Hash)>,
    checkpointed_to: u64,
    jobs: Vec<SignatureJob>,
    /// Checkpoints the auditor kept from an earlier export, and whether the log still has them.
    anchors: Vec<(Vec<u8>, bool)>,
}

/// Verifies the log in `dir` against the keys in `keys`.
pub fn verify(dir: &Path, keys: &Pubkeys) -> Result<Report, VerifyError> {
    verify_with_anchors(dir, keys, &[])
}

/// Like [`verify`], and also requires the log to still contain each of `anchors`: the signed
/// bytes of checkpoints kept from an earlier export (`CP-n.bin`). A log cut back together with
/// its last checkpoints verifies on its own; it no longer contains the checkpoints kept.
pub fn verify_with_anchors(
    dir: &Path,
    keys: &Pubkeys,
    anchors: &[Vec<u8>],
) -> Result<Report, VerifyError> {
    let error = |reason: String| VerifyError {
        dir: dir.to_owned(),
        reason,
    };
    let segments = segment::list(dir).map_err(|e| error(e.to_string()))?;
    let quarantined = segment::list_quarantined(dir).map_err(|e| error(e.to_string()))?;
    let mut walk = Walk {
        keys,
        report: Report {
            dir: dir.to_owned(),
            ..Report::default()
        },
        node_id: None,
        expected_seq: 1,
        head: super::record::GENESIS_HASH,
        head_at: Location::default(),
        range: Vec::new(),
        checkpointed_to: 0,
        jobs: Vec::new(),
        anchors: anchors.iter().map(|a| (a.clone(), false)).collect(),
    };
    if segments.is_empty() {
        walk.fail(
            Location::default(),
            format!(
                "no segment files (audit-YYYYMMDD-NNNNNN.seg) in {}",
                dir.display()
            ),
        );
    }
    let mut expected_number = 1;
    for (index, file) in segments.iter().enumerate() {
        walk.report.segments.push(file.name.clone());
        let at = Location {
            segment: Some(file.name.clone()),
            ..Location::default()
        };
        if file.number != expected_number {
            let what = if expected_number == 1 {
                format!(
                    "the log starts with segment number {}: segments 1..={} are missing (if they \
                     were archived, copy them back into the directory)",
                    file.number,
                    file.number - 1
                )
            } else {
                format!(
                    "segment number {} follows {}: segments {}..={} are missing",
                    file.number,
                    expected_number - 1,
                    expected_number,
                    file.number - 1
                )
            };
            walk.fail(at.clone(), what);
        }
        expected_number = file.number + 1;
        let bytes = match std::fs::read(&file.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                walk.fail(at, format!("cannot read: {e}"));
                continue;
            }
        };
        let is_last = index + 1 == segments.len();
        walk.segment(&file.name, file.number, &bytes, is_last);
        walk.check_signatures();
    }
    walk.finish(dir, &quarantined);
    Ok(walk.report)
}

impl Walk<'_> {
    fn fail(&mut self, at: Location, what: String) {
        self.report.failures.push(Finding { at, what });
    }

    fn warn(&mut self, at: Location, what: String) {
        self.report.warnings.push(Finding { at, what });
    }

    fn segment(&mut self, name: &str, number: u64, bytes: &[u8], is_last: bool) {
        let at = |offset: usize, seq: Option<u64>| Location {
            segment: Some(name.to_owned()),
            offset: Some(offset as u64),
            seq,
        };
        let start = match SegmentHeader::decode(bytes) {
            Ok((header, len)) => {
                self.header(&header, name, number, at(0, None));
                len
            }
            Err(error) => match super::record::resync(bytes, 1) {
                Some(resume) => {
                    self.fail(at(0, None), format!("segment header: {error}"));
                    resume
                }
                // A crash while the writer was creating the last segment.
                None if is_last => {
                    self.warn(
                        at(0, Some(self.expected_seq)),
                        format!(
                            "torn tail: the segment holds no complete header ({error}); a                              crash interrupted its creation, the records before it are not                              affected"
                        ),
                    );
                    self.report.torn_tail = Some(TornTail {
                        segment: name.to_owned(),
                        offset: 0,
                        length: bytes.len() as u64,
                        reason: error.to_string(),
                    });
                    return;
                }
                None => {
                    self.fail(at(0, None), format!("segment header: {error}"));
                    return;
                }
            },
        };
        for step in Frames::new(bytes, start) {
            match step {
                Step::Frame { offset, frame, .. } => match frame {
                    Frame::Record { record, hash } => {
                        self.record(record, hash, at(offset, None));
                    }
                    Frame::Checkpoint(frame) => {
                        self.checkpoint(&frame.signed, &frame.signature, at(offset, None));
                    }
                },
                Step::Damage {
                    offset,
                    error,
                    resumes_at,
                } => {
                    let here = at(offset, Some(self.expected_seq));
                    match resumes_at {
                        None if is_last => {
                            self.warn(
                                here.clone(),
                                format!(
                                    "torn tail: the last {} bytes are not a complete frame \
                                     ({error}); a crash interrupted a write that was never \
                                     acknowledged, the records before it are not affected",
                                    bytes.len() - offset
                                ),
                            );
                            self.report.torn_tail = Some(TornTail {
                                segment: name.to_owned(),
                                offset: offset as u64,
                                length: (bytes.len() - offset) as u64,
                                reason: error.to_string(),
                            });
                        }
                        None => self.fail(
                            here,
                            format!(
                                "{error}; the rest of the segment ({} bytes) holds no valid \
                                 frame, and this is not the last segment (a crash cannot \
                                 leave this)",
                                bytes.len() - offset
                            ),
                        ),
                        Some(resume) => self.fail(
                            here,
                            format!(
                                "{error}; bytes {offset}..{resume} are not a valid frame (the \
                                 next valid frame starts at byte {resume})"
                            ),
                        ),
                    }
                }
            }
        }
    }

    fn header(&mut self, header: &SegmentHeader, name: &str, number: u64, at: Location) {
        match &self.node_id {
            None => self.node_id = Some(header.node_id.clone()),
            Some(node) if *node != header.node_id => {
                let what = format!(
                    "segment header names node {:?}, earlier segments node {node:?}",
                    header.node_id
                );
                self.fail(at.clone(), what);
            }
            Some(_) => {}
        }
        let named_day = name
            .strip_prefix("audit-")
            .and_then(|rest| rest.get(..8))
            .unwrap_or_default()
            .to_owned();
        let created_day = segment::utc_day(header.created_ms)
            .format("%Y%m%d")
            .to_string();
        if named_day != created_day {
            let what = format!(
                "the file name says day {named_day}, the header says the segment was started \
                 on {created_day} (renamed file?)"
            );
            self.fail(at.clone(), what);
        }
        if header.segment_number != number {
            let what = format!(
                "header says segment number {}, the file name says {number} (renamed file?)",
                header.segment_number
            );
            self.fail(at.clone(), what);
        }
        if header.first_seq != self.expected_seq {
            let what = format!(
                "segment starts at record {}, but the log so far ends at record {}",
                header.first_seq,
                self.expected_seq - 1
            );
            self.fail(at.clone(), what);
            self.expected_seq = header.first_seq;
        } else if header.prev_hash != self.head {
            let what = format!(
                "segment header's link to the previous segment does not match the hash of \
                 record {} ({})",
                self.expected_seq - 1,
                self.head_at
            );
            self.fail(at, what);
        }
        self.head = header.prev_hash;
    }

    fn record(&mut self, record: Record, hash: Hash, mut at: Location) {
        at.seq = Some(record.seq);
        let seq = record.seq;
        if seq != self.expected_seq {
            let what = if seq > self.expected_seq {
                format!(
                    "records {}..={} are missing: record {seq} follows record {}",
                    self.expected_seq,
                    seq - 1,
                    self.expected_seq - 1
                )
            } else {
                format!(
                    "record {seq} is out of order or duplicated: record {} was expected",
                    self.expected_seq
                )
            };
            self.fail(at.clone(), what);
        } else if record.prev_hash != self.head {
            let what = if seq == 1 {
                "the first record does not link to the start of the log (all zeros)".to_owned()
            } else {
                format!(
                    "chain broken: the record does not link to record {} ({}); one of the two \
                     was altered",
                    seq - 1,
                    self.head_at
                )
            };
            self.fail(at.clone(), what);
        }
        self.expected_seq = seq + 1;
        self.head = hash;
        self.head_at = at.clone();
        self.range.push((seq, hash));
        let report = &mut self.report;
        report.records += 1;
        report.first_seq.get_or_insert(seq);
        report.last_seq = Some(seq);
        report.first_time_ms = Some(
            report
                .first_time_ms
                .map_or(record.time_ms, |t| t.min(record.time_ms)),
        );
        report.last_time_ms = Some(
            report
                .last_time_ms
                .map_or(record.time_ms, |t| t.max(record.time_ms)),
        );
        if record.message_type == RECOVERY_MESSAGE_TYPE && record.direction == Direction::Internal {
            match Quarantine::from_payload(&record.payload) {
                Some(quarantine) => self.report.recoveries.push(quarantine),
                None => self.fail(at, "recovery record that cannot be read".into()),
            }
            return;
        }
        match (record.direction, record.peer_signature) {
            (Direction::In, PeerSignature::Verified) => self.jobs.push(SignatureJob {
                at,
                institution: record.peer,
                payload: record.payload,
            }),
            (Direction::In, PeerSignature::NotVerified) => self.report.inbound_refused += 1,
            _ => {}
        }
    }

    fn checkpoint(&mut self, signed: &[u8], signature: &[u8], at: Location) {
        let checkpoint = match Checkpoint::parse(signed) {
            Ok(checkpoint) => checkpoint,
            Err(reason) => {
                self.fail(at, format!("checkpoint: {reason}"));
                return;
            }
        };
        let range = std::mem::take(&mut self.range);
        let covered = format!(
            "checkpoint of records {}..={}",
            checkpoint.first_seq, checkpoint.last_seq
        );
        let mut holds = true;
        match self.keys.audit_keys.get(&checkpoint.key_id) {
            None => {
                holds = false;
                self.fail(
                    at.clone(),
                    format!(
                        "{covered}: key id {:?} is not in the public-key file; add its public \
                         key under [audit_keys]",
                        checkpoint.key_id
                    ),
                );
            }
            Some(verifier) => {
                if let Err(error) = verifier.verify(signed, signature, SignatureFormat::Der) {
                    holds = false;
                    self.fail(
                        at.clone(),
                        format!(
                            "{covered}: the SM2 signature does not verify with audit key {:?} \
                             ({error})",
                            checkpoint.key_id
                        ),
                    );
                }
            }
        }
        if let Some(node) = &self.node_id
            && *node != checkpoint.node_id
        {
            holds = false;
            let what = format!(
                "{covered}: names node {:?}, the segments {node:?}",
                checkpoint.node_id
            );
            self.fail(at.clone(), what);
        }
        if checkpoint.first_seq != self.checkpointed_to + 1 {
            holds = false;
            let what = if checkpoint.first_seq > self.checkpointed_to + 1 {
                format!(
                    "{covered}: records {}..={} are covered by no checkpoint (a checkpoint was \
                     removed?)",
                    self.checkpointed_to + 1,
                    checkpoint.first_seq - 1
                )
            } else {
                format!(
                    "{covered}: overlaps the previous checkpoint, which ended at record {}",
                    self.checkpointed_to
                )
            };
            self.fail(at.clone(), what);
        }
        let expected: Vec<u64> = (checkpoint.first_seq..=checkpoint.last_seq).collect();
        let seen: Vec<u64> = range.iter().map(|(seq, _)| *seq).collect();
        if seen != expected {
            holds = false;
            let what = format!(
                "{covered}: the records before it in the log are {} (it must directly follow \
                 the records it covers)",
                describe_seqs(&seen)
            );
            self.fail(at.clone(), what);
        } else {
            let hashes: Vec<Hash> = range.iter().map(|(_, hash)| *hash).collect();
            if checkpoint.head != self.head {
                holds = false;
                self.fail(
                    at.clone(),
                    format!(
                        "{covered}: its chain head is not the hash of record {}",
                        checkpoint.last_seq
                    ),
                );
            }
            if merkle::root(&hashes) != checkpoint.root {
                holds = false;
                self.fail(
                    at.clone(),
                    format!("{covered}: its Merkle root does not match the records' hashes"),
                );
            }
        }
        for (anchor, found) in &mut self.anchors {
            if anchor.as_slice() == signed {
                *found = true;
            }
        }
        self.report.checkpoints += 1;
        *self
            .report
            .checkpoints_by_key
            .entry(checkpoint.key_id.clone())
            .or_default() += 1;
        if holds {
            self.report.sealed_through = checkpoint.last_seq;
        }
        self.checkpointed_to = checkpoint.last_seq;
    }

    /// Verifies the queued inbound signatures on all cores.
    fn check_signatures(&mut self) {
        let jobs = std::mem::take(&mut self.jobs);
        if jobs.is_empty() {
            return;
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(jobs.len());
        let chunk = jobs.len().div_ceil(threads);
        let keys = self.keys;
        let results: Vec<Option<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|job| check_inbound(keys, job))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| vec![Some("verification thread panicked".into())])
                })
                .collect()
        });
        for (job, result) in jobs.into_iter().zip(results) {
            match result {
                None => {
                    self.report.inbound_verified += 1;
                    *self
                        .report
                        .inbound_by_institution
                        .entry(job.institution)
                        .or_default() += 1;
                }
                Some(what) => self.fail(job.at, what),
            }
        }
    }

    fn finish(&mut self, dir: &Path, quarantined: &[String]) {
        for (anchor, found) in std::mem::take(&mut self.anchors) {
            if found {
                self.report.anchors_found += 1;
                continue;
            }
            let what = match Checkpoint::parse(&anchor) {
                Ok(kept) => format!(
                    "the log no longer contains the checkpoint of records {}..={} (key {}, \
                     signed at {}) kept from an earlier export: it was cut back or rewritten",
                    kept.first_seq,
                    kept.last_seq,
                    kept.key_id,
                    format_ms(kept.time_ms)
                ),
                Err(reason) => format!("a kept checkpoint is not a checkpoint: {reason}"),
            };
            self.fail(Location::default(), what);
        }
        if let (Some(first), Some(last)) = (self.range.first(), self.range.last()) {
            let (first, last) = (first.0, last.0);
            self.warn(
                Location {
                    seq: Some(first),
                    ..Location::default()
                },
                format!(
                    "records {first}..={last} after the last checkpoint are chained but not yet \
                     sealed by a signed checkpoint (a running node seals them within its \
                     checkpoint interval; a crashed node at its next start)"
                ),
            );
        }
        let mut named = Vec::new();
        for quarantine in self.report.recoveries.clone() {
            named.push(quarantine.file.clone());
            let at = Location {
                segment: Some(quarantine.segment.clone()),
                offset: Some(quarantine.offset),
                seq: None,
            };
            match std::fs::read(dir.join(&quarantine.file)) {
                Err(_) => self.warn(
                    at,
                    format!(
                        "quarantine file {} named by a recovery record is missing (it held only \
                         bytes of an interrupted, unacknowledged write)",
                        quarantine.file
                    ),
                ),
                Ok(bytes) => {
                    if bytes.len() as u64 != quarantine.length
                        || sm3::digest(&bytes) != quarantine.sm3
                    {
                        self.fail(
                            at,
                            format!(
                                "quarantine file {} does not match the length and SM3 its \
                                 recovery record states: it was altered",
                                quarantine.file
                            ),
                        );
                    } else if let Some(what) = complete_records_in(&bytes) {
                        let what = format!(
                            "quarantine file {} holds {what}: records written in the last \
                             batch before a crash but not all of it reached the disk; they \
                             were never acknowledged, and they are not part of the chain",
                            quarantine.file
                        );
                        self.warn(at, what);
                    }
                }
            }
        }
        for name in quarantined {
            if !named.contains(name) {
                self.warn(
                    Location::default(),
                    format!("quarantine file {name} is named by no recovery record"),
                );
            }
        }
    }
}

/// Complete record frames inside quarantined bytes (which a crash can leave when the disk
/// wrote later pages of the last batch but not earlier ones), described; None if there are none.
fn complete_records_in(bytes: &[u8]) -> Option<String> {
    let seqs: Vec<u64> = Frames::new(bytes, 0)
        .filter_map(|step| match step {
            Step::Frame {
                frame: Frame::Record { record, .. },
                ..
            } => Some(record.seq),
            _ => None,
        })
        .collect();
    (!seqs.is_empty()).then(|| format!("complete record frames ({})", describe_seqs(&seqs)))
}

fn describe_seqs(seqs: &[u64]) -> String {
    match (seqs.first(), seqs.last()) {
        (None, _) | (_, None) => "none".into(),
        (Some(first), Some(last)) => format!("{} records, {first}..{last}", seqs.len()),
    }
}

/// None when one of the institution's keys verifies the signature on the exact bytes before
/// `{S:`; otherwise why not.
fn check_inbound(keys: &Pubkeys, job: &SignatureJob) -> Option<String> {
    let Some(institution_keys) = keys.institutions.get(&job.institution) else {
        return Some(format!(
            "inbound message from {:?}, which kunpay verified, cannot be re-verified: the \
             institution is not in the public-key file (add [institutions.{}])",
            job.institution, job.institution
        ));
    };
    let (signed, signature) = match split_signature(&job.payload) {
        Ok(parts) => parts,
        Err(error) => {
            return Some(format!(
                "inbound message from {} carries no readable signature: {error}",
                job.institution
            ));
        }
    };
    let verifies =
        |key: &InstitutionKey| key.verifier.verify(signed, &signature, key.format).is_ok();
    if institution_keys.iter().any(verifies) {
        None
    } else {
        Some(format!(
            "inbound message from {}: its SM2 signature does not verify with the institution's \
             public key ({} key(s) tried): the bytes are not what the institution signed",
            job.institution,
            institution_keys.len()
        ))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "audit log: {}", self.dir.display())?;
        match (self.segments.first(), self.segments.last()) {
            (Some(first), Some(last)) => {
                writeln!(f, "segments: {} ({first} .. {last})", self.segments.len())?
            }
            _ => writeln!(f, "segments: 0")?,
        }
        match (self.first_seq, self.last_seq) {
            (Some(first), Some(last)) => {
                writeln!(f, "records: {} (seq {first}..={last})", self.records)?
            }
            _ => writeln!(f, "records: 0")?,
        }
        if let (Some(from), Some(to)) = (self.first_time_ms, self.last_time_ms) {
            writeln!(
                f,
                "time range: {} .. {} (UTC)",
                format_ms(from),
                format_ms(to)
            )?;
        }
        let by_key: Vec<String> = self
            .checkpoints_by_key
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        writeln!(
            f,
            "checkpoints: {} ({}); records sealed through seq {}",
            self.checkpoints,
            by_key.join(", "),
            self.sealed_through
        )?;
        let by_institution: Vec<String> = self
            .inbound_by_institution
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        writeln!(
            f,
            "inbound signatures re-verified: {} ({}); inbound refused at the edge, not required: {}",
            self.inbound_verified,
            by_institution.join(", "),
            self.inbound_refused
        )?;
        if self.anchors_found > 0 {
            writeln!(
                f,
                "kept checkpoints found in the log: {}",
                self.anchors_found
            )?;
        }
        for recovery in &self.recoveries {
            writeln!(
                f,
                "recovery: {} bytes of {} from byte {} quarantined in {} ({})",
                recovery.length, recovery.segment, recovery.offset, recovery.file, recovery.reason
            )?;
        }
        for warning in &self.warnings {
            writeln!(f, "WARNING: {warning}")?;
        }
        for failure in &self.failures {
            writeln!(f, "FAILED: {failure}")?;
        }
        if self.holds() {
            write!(f, "RESULT: OK, the log holds")
        } else {
            write!(f, "RESULT: FAILED, {} problem(s)", self.failures.len())
        }
    }
}

pub fn format_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}
