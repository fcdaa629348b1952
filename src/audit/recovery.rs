//! What the writer finds on open: the end of the chain, the records not yet sealed by a
//! checkpoint, and a torn tail left by a crash, which it moves aside so the chain goes on.
//!
//! Owns: the rule that tells a crash's torn tail from damage to durable data. The writer never
//! has more than one batch (at most `MAX_UNSYNCED_BYTES`) written but not yet fdatasync'ed, so a
//! crash can only spoil the last `MAX_UNSYNCED_BYTES` of the last segment. Bad bytes there, or
//! bad bytes that nothing valid follows, are a torn tail: they are copied into a quarantine file
//! `<segment>.torn-<offset>`, the segment is cut back to its last valid frame, and a recovery
//! record naming the quarantine file (its length and SM3) is the next record of the chain.
//! Anything else is damage, and open refuses.
//! Must never: cut off bytes without first keeping them in a synced quarantine file, or append
//! after damage that a crash cannot explain.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::AuditError;
use super::merkle::to_hex;
use super::record::{Frame, GENESIS_HASH, Hash, HeaderError, MAX_FRAME_LEN, SegmentHeader};
use super::segment::{self, Frames, SegmentFile, Step};
use super::{Checkpoint, FILE_MODE};
use crate::crypto::sm3;

/// One group commit writes at most this many bytes before its fdatasync (plus one record).
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Bytes a crash can leave unsynced at the end of the last segment: a whole batch, whose last
/// record may overshoot the batch bound, and its checkpoint.
pub const MAX_UNSYNCED_BYTES: usize = MAX_BATCH_BYTES + 2 * MAX_FRAME_LEN;

/// The message type of the records the log writes about itself.
pub const RECOVERY_MESSAGE_TYPE: &str = "AUDIT_RECOVERY";
/// The peer of those records.
pub const RECOVERY_PEER: &str = "audit";
pub const RECOVERY_TITLE: &str = "kunpay audit recovery v1";

/// The state of the log's end, as the writer continues it.
pub(super) struct Recovered {
    /// The segment to continue; None when the only segment had a torn header and was moved
    /// aside (the writer starts segment 1 afresh).
    pub last: Option<LastSegment>,
    pub next_seq: u64,
    pub head: Hash,
    /// Hashes of the records after the last checkpoint, from `pending_first` on.
    pub pending_first: u64,
    pub pending: Vec<Hash>,
    /// Payloads of the recovery records to append before anything else.
    pub markers: Vec<Vec<u8>>,
}

pub(super) struct LastSegment {
    pub file: SegmentFile,
    pub header: SegmentHeader,
    /// Length of the valid part (after any torn tail was cut).
    pub len: u64,
    pub records: u64,
}

/// A quarantined region, as the recovery record states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantine {
    pub segment: String,
    pub offset: u64,
    pub length: u64,
    pub sm3: Hash,
    pub file: String,
    pub reason: String,
}

impl Quarantine {
    pub fn to_payload(&self) -> Vec<u8> {
        format!(
            "{RECOVERY_TITLE}\naction: quarantined\nsegment: {}\noffset: {}\nlength: {}\nsm3: {}\n\
             file: {}\nreason: {}\n",
            self.segment,
            self.offset,
            self.length,
            to_hex(&self.sm3),
            self.file,
            self.reason.replace('\n', " ")
        )
        .into_bytes()
    }

    pub fn from_payload(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut lines = text.lines();
        if lines.next()? != RECOVERY_TITLE {
            return None;
        }
        let mut value = |name: &str| {
            lines
                .next()
                .and_then(|line| line.strip_prefix(name))
                .and_then(|rest| rest.strip_prefix(": "))
                .map(str::to_owned)
        };
        if value("action")? != "quarantined" {
            return None;
        }
        Some(Quarantine {
            segment: value("segment")?,
            offset: value("offset")?.parse().ok()?,
            length: value("length")?.parse().ok()?,
            sm3: super::merkle::from_hex(&value("sm3")?)?,
            file: value("file")?,
            reason: value("reason")?,
        })
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.to_owned();
    move |source| AuditError::Io {
        action,
        path,
        source,
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// Writes `bytes` into a new quarantine file and syncs it (and the directory).
fn write_quarantine(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AuditError> {
    let path = dir.join(name);
    // A quarantine of the same offset can only come from an earlier recovery of the same tail
    // that crashed before it cut the segment: the bytes are the same, so replacing is safe.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(io_error("create quarantine file", &path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write quarantine file", &path))?;
    sync_dir(dir)
}

/// Scans the end of the log in `dir` and repairs a torn tail. None: the directory holds no
/// segment yet.
pub(super) fn recover(dir: &Path, node_id: &str) -> Result<Option<Recovered>, AuditError> {
    let mut segments = segment::list(dir).map_err(io_error("list", dir))?;
    let mut markers = Vec::new();
    loop {
        let Some(last) = segments.last().cloned() else {
            if markers.is_empty() {
                return Ok(None);
            }
            // Only a torn header was there: start afresh, but keep the story of what happened
            // (the new segment 1 carries the recovery record as its first record).
            return Ok(Some(Recovered {
                last: None,
                next_seq: 1,
                head: GENESIS_HASH,
                pending_first: 1,
                pending: Vec::new(),
                markers,
            }));
        };
        let bytes = fs::read(&last.path).map_err(io_error("read", &last.path))?;
        let header = match SegmentHeader::decode(&bytes) {
            Ok((header, header_len)) => (header, header_len),
            Err(error) => {
                // A segment is created, its header written and synced before any record goes
                // in: a bad header at the end of the log is a crash during creation, unless
                // valid frames follow it.
                if super::record::resync(&bytes, 1).is_some() {
                    return Err(AuditError::Damaged {
                        dir: dir.to_owned(),
                        segment: last.path.clone(),
                        offset: 0,
                        reason: format!("segment header: {error}"),
                    });
                }
                let reason = match error {
                    HeaderError::Incomplete { have } => {
                        format!("segment header incomplete ({have} bytes)")
                    }
                    HeaderError::Invalid(why) => format!("segment header: {why}"),
                };
                markers.push(quarantine_region(dir, &last, &bytes, 0, reason)?);
                fs::remove_file(&last.path).map_err(io_error("remove", &last.path))?;
                sync_dir(dir)?;
                segments.pop();
                continue;
            }
        };
        return finish(dir, node_id, &segments, last, bytes, header, markers).map(Some);
    }
}

fn quarantine_region(
    dir: &Path,
    segment: &SegmentFile,
    bytes: &[u8],
    offset: usize,
    reason: String,
) -> Result<Vec<u8>, AuditError> {
    let torn = &bytes[offset..];
    let name = segment::quarantine_name(&segment.name, offset as u64);
    write_quarantine(dir, &name, torn)?;
    tracing::warn!(
        segment = %segment.name,
        offset,
        length = torn.len(),
        quarantine = %name,
        "audit log: torn tail moved to a quarantine file ({reason})"
    );
    Ok(Quarantine {
        segment: segment.name.clone(),
        offset: offset as u64,
        length: torn.len() as u64,
        sm3: sm3::digest(torn),
        file: name,
        reason,
    }
    .to_payload())
}

fn finish(
    dir: &Path,
    node_id: &str,
    segments: &[SegmentFile],
    last: SegmentFile,
    bytes: Vec<u8>,
    (header, header_len): (SegmentHeader, usize),
    mut markers: Vec<Vec<u8>>,
) -> Result<Recovered, AuditError> {
    if header.node_id != node_id {
        return Err(AuditError::WrongNode {
            dir: dir.to_owned(),
            found: header.node_id,
            expected: node_id.to_owned(),
        });
    }
    let damaged = |offset: usize, reason: String| AuditError::Damaged {
        dir: dir.to_owned(),
        segment: last.path.clone(),
        offset: offset as u64,
        reason,
    };
    let mut next_seq = header.first_seq;
    let mut head = header.prev_hash;
    let mut records = 0u64;
    let mut since_checkpoint: Vec<Hash> = Vec::new();
    let mut saw_checkpoint = false;
    let mut checkpointed_to = 0u64;
    let mut valid_end = bytes.len();
    let mut last_payload: Option<Vec<u8>> = None;
    for step in Frames::new(&bytes, header_len) {
        match step {
            Step::Frame { offset, frame, .. } => match frame {
                Frame::Record { record, hash } => {
                    if record.seq != next_seq || record.prev_hash != head {
                        return Err(damaged(
                            offset,
                            format!(
                                "record {} does not continue the chain (expected record \
                                 {next_seq} linked to the one before)",
                                record.seq
                            ),
                        ));
                    }
                    next_seq += 1;
                    head = hash;
                    records += 1;
                    since_checkpoint.push(hash);
                    last_payload =
                        (record.message_type == RECOVERY_MESSAGE_TYPE).then_some(record.payload);
                }
                Frame::Checkpoint(frame) => {
                    let checkpoint = Checkpoint::parse(&frame.signed)
                        .map_err(|reason| damaged(offset, reason))?;
                    checkpointed_to = checkpoint.last_seq;
                    saw_checkpoint = true;
                    since_checkpoint.clear();
                }
            },
            Step::Damage {
                offset,
                error,
                resumes_at,
            } => {
                let within_last_batch = bytes.len() - offset <= MAX_UNSYNCED_BYTES;
                if resumes_at.is_some() && !within_last_batch {
                    return Err(damaged(offset, error.to_string()));
                }
                let reason = format!("torn tail: {error}");
                markers.push(quarantine_region(dir, &last, &bytes, offset, reason)?);
                let file = OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(io_error("open", &last.path))?;
                file.set_len(offset as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(io_error("truncate torn tail of", &last.path))?;
                valid_end = offset;
                break;
            }
        }
    }
    // A crash between cutting the tail and logging the recovery record leaves the quarantine
    // file with no record naming it: name it now.
    if markers.is_empty() {
        let orphan = segment::quarantine_name(&last.name, valid_end as u64);
        let orphan_path = dir.join(&orphan);
        let already_named = last_payload
            .as_deref()
            .and_then(Quarantine::from_payload)
            .is_some_and(|q| q.file == orphan);
        if orphan_path.exists() && !already_named {
            let torn = fs::read(&orphan_path).map_err(io_error("read", &orphan_path))?;
            markers.push(
                Quarantine {
                    segment: last.name.clone(),
                    offset: valid_end as u64,
                    length: torn.len() as u64,
                    sm3: sm3::digest(&torn),
                    file: orphan,
                    reason: "torn tail (recovery record written at the next start)".into(),
                }
                .to_payload(),
            );
        }
    }
    let (pending_first, pending) = if saw_checkpoint {
        (checkpointed_to + 1, since_checkpoint)
    } else {
        unsealed_before(dir, segments, header.first_seq, since_checkpoint)?
    };
    debug_assert_eq!(pending_first + pending.len() as u64, next_seq);
    Ok(Recovered {
        last: Some(LastSegment {
            file: last,
            header,
            len: valid_end as u64,
            records,
        }),
        next_seq,
        head,
        pending_first,
        pending,
        markers,
    })
}

/// The last segment has no checkpoint: the records after the last checkpoint may start in an
/// earlier segment (normally each segment is sealed before the next starts, so this reads one
/// segment back and finds its sealing checkpoint at the end).
fn unsealed_before(
    dir: &Path,
    segments: &[SegmentFile],
    first_seq_of_last: u64,
    mut pending: Vec<Hash>,
) -> Result<(u64, Vec<Hash>), AuditError> {
    let mut first = first_seq_of_last;
    for earlier in segments.iter().rev().skip(1) {
        let bytes = fs::read(&earlier.path).map_err(io_error("read", &earlier.path))?;
        let damaged = |offset: usize, reason: String| AuditError::Damaged {
            dir: dir.to_owned(),
            segment: earlier.path.clone(),
            offset: offset as u64,
            reason,
        };
        let (header, header_len) =
            SegmentHeader::decode(&bytes).map_err(|error| damaged(0, error.to_string()))?;
        let mut hashes = Vec::new();
        let mut checkpointed_to = None;
        for step in Frames::new(&bytes, header_len) {
            match step {
                Step::Frame {
                    frame: Frame::Record { hash, .. },
                    ..
                } => hashes.push(hash),
                Step::Frame {
                    offset,
                    frame: Frame::Checkpoint(frame),
                    ..
                } => {
                    let checkpoint = Checkpoint::parse(&frame.signed)
                        .map_err(|reason| damaged(offset, reason))?;
                    checkpointed_to = Some(checkpoint.last_seq);
                    hashes.clear();
                }
                Step::Damage { offset, error, .. } => {
                    return Err(damaged(offset, error.to_string()));
                }
            }
        }
        hashes.extend(pending);
        pending = hashes;
        match checkpointed_to {
            Some(last) => return Ok((last + 1, pending)),
            None => first = header.first_seq,
        }
    }
    Ok((first, pending))
}
