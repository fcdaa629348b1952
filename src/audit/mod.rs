//! The SM-signed message log: every message that crosses kunpay's boundary, append-only,
//! hash-chained with SM3, sealed by SM2-signed checkpoints over Merkle roots, and the offline
//! verifier that auditors run on it (docs/audit.md is the auditors' description, byte by byte).
//!
//! Owns: the on-disk format (`record.rs`, `checkpoint.rs`, `segment.rs`), the Merkle tree
//! (`merkle.rs`), the durable writer with group commit (`writer.rs`) and its crash recovery
//! (`recovery.rs`), and the auditor's side: public-key file (`pubkeys.rs`), verifier
//! (`verify.rs`), inclusion proofs (`proof.rs`) and the OpenSSL export (`export.rs`).
//! Must never: return from `append` before the record is fdatasync'ed; rewrite or delete a
//! byte that was acknowledged (a torn tail is moved to a quarantine file, never dropped); log or
//! keep the audit private key anywhere but in the writer's `Signer`; let the verifier trust
//! anything in the log directory.
//!
//! # How the daemon uses it
//!
//! ```ignore
//! let log = Arc::new(AuditLog::open(
//!     Path::new("/var/lib/kunpay/audit"),
//!     AuditSettings {
//!         node_id: "node-a".into(),
//!         max_segment_bytes: 256 << 20,
//!         checkpoint_every_records: 10_000,
//!         checkpoint_every: Duration::from_secs(60),
//!         queue_bound: 4096,
//!     },
//!     AuditKey { key_id: "audit-2026a".into(), signer: Signer::new(&key, DEFAULT_DISTID)? },
//! )?);
//! // before acting on a verified request:
//! log.append(NewRecord { direction: Direction::In, peer: "TENPAY".into(),
//!     message_type: "DEBIT".into(), txn_id: None,
//!     peer_signature: PeerSignature::Verified, bytes: raw_request.to_vec() })?;
//! // before sending the answer (returns once it is on disk):
//! log.append(NewRecord { direction: Direction::Out, peer_signature: PeerSignature::None, .. })?;
//! log.close()?; // at shutdown: seals the last records
//! ```
//!
//! - `append` blocks until durable (group commit: concurrent callers share one fdatasync; a
//!   few ms on a disk, less on NVMe) and while the bounded queue is full. Call it from worker
//!   threads, or through `spawn_blocking` from async code; never on a tokio worker.
//! - An error from `append` means the message is NOT logged: do not send what depends on it.
//!   After an I/O error every later append fails (`AuditError::Unusable`): the node must stop
//!   serving and be restarted once the disk is fixed.
//! - Inbound institution messages: `PeerSignature::Verified` when kunpay verified the
//!   signature and acts on the message (the verifier re-verifies it, so log the exact bytes as
//!   received, `{S:...}` included); `NotVerified` for what the edge refused; `None` elsewhere.
//! - Peers: the institution id, `core`, `operator:NAME`. `audit` is the log's own (recovery
//!   records, message type `AUDIT_RECOVERY`).
//! - Key rotation: `rotate_key` (seals with the old key first), or restart with the new key.
//!   Publish every audit public key with its key id to the auditors.

pub mod checkpoint;
mod error;
pub mod export;
pub mod merkle;
pub mod operator;
pub mod proof;
pub mod pubkeys;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod sink;
pub mod verify;
mod writer;

pub use self::checkpoint::Checkpoint;
pub use self::error::AuditError;
pub use self::pubkeys::Pubkeys;
pub use self::record::{Direction, FORMAT_VERSION, PeerSignature};
pub use self::sink::{AuditFailure, AuditSink, SubmittedRequest, Ticket};
pub use self::verify::{Report, verify, verify_with_anchors};
pub use self::writer::{
    AuditKey, AuditLog, AuditSettings, AuditStats, CheckpointInfo, MAX_CHECKPOINT_EVERY_RECORDS,
    MAX_QUEUE_BOUND, NewRecord, Pending,
};

/// Segment and quarantine files: the service writes, its group (auditors' tooling) reads.
const FILE_MODE: u32 = 0o640;
const DIR_MODE: u32 = 0o750;
