//! The writer: one thread owns the segment file; callers hand records over a bounded channel
//! and wait until their record is on disk (group commit: one fdatasync covers every record
//! written since the previous one).
//!
//! Owns: sequence numbers (assigned here, in arrival order, from 1 without gaps), the chain
//! head, segment rolls (UTC day, size bound; each segment sealed by a checkpoint before the next
//! starts), checkpoints (every N records, every T, on demand, at key rotation and at close), and
//! fail-stop on I/O errors.
//! Must never: answer an append before the fdatasync that covers it returned; write after a
//! failed write or fdatasync; hold more than `queue_bound` waiting records, or more than
//! `MAX_BATCH_RECORDS` / `MAX_BATCH_BYTES` in one batch.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::NaiveDate;
use uuid::Uuid;

use super::checkpoint::Checkpoint;
use super::error::AuditError;
use super::merkle;
use super::record::{
    CheckpointFrame, Direction, FORMAT_VERSION, GENESIS_HASH, HASH_LEN, Hash, MAX_KEY_ID_LEN,
    MAX_NODE_ID_LEN, PeerSignature, Record, SegmentHeader, check_identifier,
};
use super::recovery::{
    self, MAX_BATCH_BYTES, RECOVERY_MESSAGE_TYPE, RECOVERY_PEER, Recovered, sync_dir,
};
use super::segment::{self, SegmentFile, utc_day};
use super::{DIR_MODE, FILE_MODE};
use crate::crypto::{DEFAULT_DISTID, SignatureFormat, Signer};

/// Records taken from the queue into one group commit, at most.
pub const MAX_BATCH_RECORDS: usize = 4096;
/// Bounds on the settings, so that a typo cannot make memory or latency unbounded.
pub const MAX_QUEUE_BOUND: usize = 65_536;
pub const MAX_CHECKPOINT_EVERY_RECORDS: u64 = 1_000_000;
pub const MIN_SEGMENT_BYTES: u64 = 1024;
/// Room kept in a segment for the checkpoint that seals it.
const SEAL_RESERVE: u64 = 1024;
const LOCK_FILE: &str = "LOCK";

/// How the log is kept. The daemon maps its `[audit]` configuration onto this.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// Names this node in every segment header and checkpoint (A-Z a-z 0-9 . _ -, at most 64).
    pub node_id: String,
    /// A segment is closed when the next record would take it past this size (a record larger
    /// than the bound gets a segment of its own).
    pub max_segment_bytes: u64,
    /// A checkpoint after this many records...
    pub checkpoint_every_records: u64,
    /// ...or once the oldest unsealed record is this old, whichever comes first.
    pub checkpoint_every: Duration,
    /// Appends that may wait for the writer; more block their caller (back-pressure).
    pub queue_bound: usize,
}

impl AuditSettings {
    fn validate(&self) -> Result<(), AuditError> {
        let bad = |setting, reason: String| Err(AuditError::Settings { setting, reason });
        if let Err(error) = check_identifier("node id", &self.node_id, MAX_NODE_ID_LEN) {
            return bad("node_id", error.to_string());
        }
        if self.max_segment_bytes < MIN_SEGMENT_BYTES {
            return bad(
                "max_segment_bytes",
                format!("{} is below {MIN_SEGMENT_BYTES}", self.max_segment_bytes),
            );
        }
        if !(1..=MAX_CHECKPOINT_EVERY_RECORDS).contains(&self.checkpoint_every_records) {
            return bad(
                "checkpoint_every_records",
                format!(
                    "{} is outside 1..={MAX_CHECKPOINT_EVERY_RECORDS}",
                    self.checkpoint_every_records
                ),
            );
        }
        if self.checkpoint_every < Duration::from_millis(10)
            || self.checkpoint_every > Duration::from_secs(86_400)
        {
            return bad(
                "checkpoint_every",
                format!("{:?} is outside 10ms..=1 day", self.checkpoint_every),
            );
        }
        if !(1..=MAX_QUEUE_BOUND).contains(&self.queue_bound) {
            return bad(
                "queue_bound",
                format!("{} is outside 1..={MAX_QUEUE_BOUND}", self.queue_bound),
            );
        }
        Ok(())
    }
}

/// The node's audit signing key and the id auditors know its public key by. The signer must
/// use the distinguishing id `1234567812345678` (what the verifier and the OpenSSL commands in
/// docs/audit.md assume).
pub struct AuditKey {
    pub key_id: String,
    pub signer: Signer,
}

impl AuditKey {
    fn validate(&self) -> Result<(), AuditError> {
        if let Err(error) = check_identifier("key id", &self.key_id, MAX_KEY_ID_LEN) {
            return Err(AuditError::Settings {
                setting: "key_id",
                reason: error.to_string(),
            });
        }
        if self.signer.distid() != DEFAULT_DISTID {
            return Err(AuditError::Settings {
                setting: "signer",
                reason: format!(
                    "the audit key must sign with distinguishing id {DEFAULT_DISTID}, not {:?}",
                    self.signer.distid()
                ),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A message to log. The writer adds the sequence number, the time and the chain hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    pub direction: Direction,
    /// Institution id, `core`, or `operator:NAME`.
    pub peer: String,
    /// The channel or core message type (`DEBIT`, `NOTIFY`, ...) or the operator command.
    pub message_type: String,
    pub txn_id: Option<Uuid>,
    pub peer_signature: PeerSignature,
    /// The exact bytes as received or sent, signature included.
    pub bytes: Vec<u8>,
}

/// What a checkpoint sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub first_seq: u64,
    pub last_seq: u64,
    pub key_id: String,
    pub segment: String,
}

/// Who hears of an append's outcome: a caller blocked on a channel, or a callback the writer
/// runs once the batch is durable (it must be quick: it runs on the writer thread).
enum AppendReply {
    Channel(SyncSender<Result<u64, AuditError>>),
    Callback(OnDurable),
}

impl AppendReply {
    fn send(self, result: Result<u64, AuditError>) {
        match self {
            // A caller that gave up waiting is gone; nothing to tell it.
            AppendReply::Channel(reply) => {
                let _ = reply.send(result);
            }
            AppendReply::Callback(callback) => callback.run(result),
        }
    }
}

/// A `submit_then` callback that runs exactly once: with the record's outcome, or with
/// `Closed` when it is dropped unrun (the log closed, or its thread gone, with the record
/// still queued). A caller waiting on it is never left waiting forever.
struct OnDurable(Option<DurableCallback>);

type DurableCallback = Box<dyn FnOnce(Result<u64, AuditError>) + Send>;

impl OnDurable {
    fn run(mut self, result: Result<u64, AuditError>) {
        if let Some(callback) = self.0.take() {
            callback(result);
        }
    }
}

impl Drop for OnDurable {
    fn drop(&mut self) {
        if let Some(callback) = self.0.take() {
            callback(Err(AuditError::Closed));
        }
    }
}

enum Command {
    Append {
        record: NewRecord,
        reply: AppendReply,
    },
    Checkpoint {
        reply: SyncSender<Result<Option<CheckpointInfo>, AuditError>>,
    },
    RotateKey {
        key: AuditKey,
        reply: SyncSender<Result<Option<CheckpointInfo>, AuditError>>,
    },
    Close {
        reply: SyncSender<Result<(), AuditError>>,
    },
}

/// An answer held back until the batch's fdatasync.
enum Answer {
    Append {
        result: Result<u64, AuditError>,
        reply: AppendReply,
    },
    Checkpoint {
        result: Result<Option<CheckpointInfo>, AuditError>,
        reply: SyncSender<Result<Option<CheckpointInfo>, AuditError>>,
    },
    Close {
        reply: SyncSender<Result<(), AuditError>>,
    },
}

/// The append-only, SM2-sealed message log. Share it (`Arc<AuditLog>`) between threads.
pub struct AuditLog {
    sender: SyncSender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    durable_seq: Arc<AtomicU64>,
    stats: Arc<Counters>,
    recovery: Vec<String>,
}

/// A record handed to the writer with [`AuditLog::submit`]. `wait` returns its sequence number
/// once it is on disk. Dropping it without waiting is allowed (the writer still writes the
/// record and counts its outcome in [`AuditStats`]); anything sent afterwards that depends on
/// it must be covered by a later `append` or `wait`, which returns only after every record
/// submitted before it is durable (one writer, one order).
pub struct Pending {
    answer: Receiver<Result<u64, AuditError>>,
}

impl Pending {
    pub fn wait(self) -> Result<u64, AuditError> {
        self.answer.recv().map_err(|_| AuditError::Closed)?
    }
}

/// What the writer did so far, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records acknowledged durable (recovery records at open not counted).
    pub appended: u64,
    /// Records refused (a bad field, or the log unusable).
    pub refused: u64,
    /// Checkpoints written since open (the ones open writes included).
    pub checkpoints: u64,
    /// The last record sealed by a checkpoint (0: none yet).
    pub last_checkpoint_seq: u64,
    /// The highest sequence number on disk.
    pub durable_seq: u64,
    /// Why the log stopped, once it did (fail-stop after an I/O or signing error).
    pub unusable: Option<String>,
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    refused: AtomicU64,
    checkpoints: AtomicU64,
    last_checkpoint_seq: AtomicU64,
    unusable: Mutex<Option<String>>,
}

impl AuditLog {
    /// Opens (creating if needed) the log in `dir`, recovers its end (a torn tail is moved to a
    /// quarantine file and a recovery record continues the chain; see `recovery.rs`), seals any
    /// records left unsealed, and starts the writer thread.
    pub fn open(dir: &Path, settings: AuditSettings, key: AuditKey) -> Result<Self, AuditError> {
        settings.validate()?;
        key.validate()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| AuditError::Io {
                action: "create directory",
                path: dir.to_owned(),
                source,
            })?;
        let lock = lock_dir(dir)?;
        let recovered = recovery::recover(dir, &settings.node_id)?;
        let mut writer = Writer::start(dir, settings, key, lock, recovered)?;
        let recovery_notes = writer.notes.clone();
        writer.flush();
        if let Some(reason) = &writer.failed {
            return Err(AuditError::Unusable {
                reason: reason.clone(),
            });
        }
        let (sender, receiver) = sync_channel(writer.settings.queue_bound);
        let durable_seq = Arc::clone(&writer.durable_seq);
        let stats = Arc::clone(&writer.stats);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| AuditError::Io {
                action: "start the writer thread for",
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            sender,
            thread: Mutex::new(Some(thread)),
            durable_seq,
            stats,
            recovery: recovery_notes,
        })
    }

    /// Logs one message; returns its sequence number once it is on disk (fdatasync'ed). Call
    /// it before sending anything that depends on the message being logged. Blocks while the
    /// queue is full.
    pub fn append(&self, record: NewRecord) -> Result<u64, AuditError> {
        self.submit(record)?.wait()
    }

    /// Hands one message to the writer without waiting for the disk (blocks only while the
    /// queue is full). Records keep the order of their `submit` calls, so a later `append`
    /// that returned Ok proves this one durable too; `Pending::wait` tells this one's fate.
    pub fn submit(&self, record: NewRecord) -> Result<Pending, AuditError> {
        let (reply, answer) = sync_channel(1);
        self.sender
            .send(Command::Append {
                record,
                reply: AppendReply::Channel(reply),
            })
            .map_err(|_| AuditError::Closed)?;
        Ok(Pending { answer })
    }

    /// `submit`, with `on_durable` run by the writer thread once the record is on disk (or
    /// refused) instead of a `Pending` to wait on: for callers that must not block while the
    /// disk works (an async task completing a oneshot). `on_durable` must return quickly.
    /// It runs exactly once: when the log is closed (Err(Closed) returned) it has already run,
    /// with Err(Closed), on this thread; a record still queued when the writer stops gets
    /// Err(Closed) too.
    pub fn submit_then(
        &self,
        record: NewRecord,
        on_durable: impl FnOnce(Result<u64, AuditError>) + Send + 'static,
    ) -> Result<(), AuditError> {
        self.sender
            .send(Command::Append {
                record,
                reply: AppendReply::Callback(OnDurable(Some(Box::new(on_durable)))),
            })
            // The refused command, dropped here, runs the callback with Closed.
            .map_err(|_| AuditError::Closed)
    }

    /// Counters and state for metrics and health checks.
    pub fn stats(&self) -> AuditStats {
        let c = &self.stats;
        AuditStats {
            appended: c.appended.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            last_checkpoint_seq: c.last_checkpoint_seq.load(Ordering::Relaxed),
            durable_seq: self.durable_seq(),
            unusable: c
                .unusable
                .lock()
                .map(|u| u.clone())
                .unwrap_or_else(|p| p.into_inner().clone()),
        }
    }

    /// Seals the records not yet covered by a checkpoint, now; None when there were none.
    pub fn checkpoint_now(&self) -> Result<Option<CheckpointInfo>, AuditError> {
        let (reply, answer) = sync_channel(1);
        self.sender
            .send(Command::Checkpoint { reply })
            .map_err(|_| AuditError::Closed)?;
        answer.recv().map_err(|_| AuditError::Closed)?
    }

    /// Seals the unsealed records with the current key, then signs every later checkpoint with
    /// `key`. Old checkpoints keep verifying with the old public key.
    pub fn rotate_key(&self, key: AuditKey) -> Result<Option<CheckpointInfo>, AuditError> {
        key.validate()?;
        let (reply, answer) = sync_channel(1);
        self.sender
            .send(Command::RotateKey { key, reply })
            .map_err(|_| AuditError::Closed)?;
        answer.recv().map_err(|_| AuditError::Closed)?
    }

    /// Seals the last records, syncs and stops the writer. Later appends fail with `Closed`.
    pub fn close(&self) -> Result<(), AuditError> {
        let (reply, answer) = sync_channel(1);
        let result = match self.sender.send(Command::Close { reply }) {
            Ok(()) => answer.recv().unwrap_or(Err(AuditError::Closed)),
            Err(_) => Err(AuditError::Closed),
        };
        if let Ok(mut thread) = self.thread.lock()
            && let Some(handle) = thread.take()
        {
            let _ = handle.join();
        }
        result
    }

    /// The highest sequence number known to be on disk (0: none yet).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// What `open` found and did (torn tails quarantined, records sealed), one line each.
    pub fn recovery_notes(&self) -> &[String] {
        &self.recovery
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        let running = self.thread.lock().map(|t| t.is_some()).unwrap_or(false);
        if running {
            let _ = self.close();
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|source| AuditError::Io {
            action: "open lock file",
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(AuditError::Locked {
            dir: dir.to_owned(),
            lock: path,
        });
    }
    Ok(file)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct OpenSegment {
    file: File,
    name: String,
    number: u64,
    day: NaiveDate,
    /// Bytes in the file (written, not counting the batch buffer).
    len: u64,
    records: u64,
}

struct Writer {
    dir: PathBuf,
    settings: AuditSettings,
    key: AuditKey,
    _lock: File,
    segment: OpenSegment,
    next_seq: u64,
    head: Hash,
    pending_first: u64,
    /// Record hashes since the last checkpoint (bounded by `checkpoint_every_records`).
    pending: Vec<Hash>,
    /// When the oldest unsealed record was appended.
    pending_since: Option<Instant>,
    /// Frames written into this batch and not yet in the file.
    buffer: Vec<u8>,
    durable_seq: Arc<AtomicU64>,
    stats: Arc<Counters>,
    failed: Option<String>,
    notes: Vec<String>,
}

impl Writer {
    fn start(
        dir: &Path,
        settings: AuditSettings,
        key: AuditKey,
        lock: File,
        recovered: Option<Recovered>,
    ) -> Result<Self, AuditError> {
        let now = now_ms();
        let (segment, next_seq, head, pending_first, pending, markers) = match recovered {
            None => {
                let segment = create_segment(dir, &settings.node_id, 1, now, 1, GENESIS_HASH)?;
                (segment, 1, GENESIS_HASH, 1, Vec::new(), Vec::new())
            }
            Some(recovered) => {
                let segment = match recovered.last {
                    Some(last) => reopen_segment(&last.file, &last.header, last.len, last.records)?,
                    None => create_segment(dir, &settings.node_id, 1, now, 1, GENESIS_HASH)?,
                };
                (
                    segment,
                    recovered.next_seq,
                    recovered.head,
                    recovered.pending_first,
                    recovered.pending,
                    recovered.markers,
                )
            }
        };
        let mut notes = Vec::new();
        let mut writer = Writer {
            dir: dir.to_owned(),
            settings,
            key,
            _lock: lock,
            segment,
            next_seq,
            head,
            pending_first,
            pending_since: (!pending.is_empty()).then(Instant::now),
            pending,
            buffer: Vec::new(),
            durable_seq: Arc::new(AtomicU64::new(next_seq - 1)),
            stats: Arc::new(Counters::default()),
            failed: None,
            notes: Vec::new(),
        };
        let unsealed = (!writer.pending.is_empty())
            .then(|| format!("{}..={}", writer.pending_first, writer.next_seq - 1));
        for payload in markers {
            notes.push(String::from_utf8_lossy(&payload).replace('\n', "; "));
            let record = NewRecord {
                direction: Direction::Internal,
                peer: RECOVERY_PEER.into(),
                message_type: RECOVERY_MESSAGE_TYPE.into(),
                txn_id: None,
                peer_signature: PeerSignature::None,
                bytes: payload,
            };
            writer.append_to_batch(record)?;
        }
        if let Some(range) = unsealed {
            notes.push(format!(
                "records {range} were not sealed by a checkpoint (the node stopped without \
                 closing the log): sealed now"
            ));
        }
        writer.write_checkpoint()?;
        writer.notes = notes;
        Ok(writer)
    }

    fn run(mut self, receiver: Receiver<Command>) {
        let mut answers: Vec<Answer> = Vec::with_capacity(MAX_BATCH_RECORDS);
        let mut stop = false;
        while !stop {
            let first = match self.checkpoint_deadline() {
                Some(deadline) => {
                    match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        Ok(command) => Some(command),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match receiver.recv() {
                    Ok(command) => Some(command),
                    Err(_) => break,
                },
            };
            if let Some(command) = first {
                stop = self.handle(command, &mut answers);
                while !stop
                    && answers.len() < MAX_BATCH_RECORDS
                    && self.buffer.len() < MAX_BATCH_BYTES
                {
                    match receiver.try_recv() {
                        Ok(command) => stop = self.handle(command, &mut answers),
                        Err(_) => break,
                    }
                }
            }
            if self
                .checkpoint_deadline()
                .is_some_and(|d| d <= Instant::now())
            {
                self.automatic_checkpoint();
            }
            self.flush();
            self.answer(&mut answers);
        }
        if !stop {
            // Every handle was dropped without close: seal what is left anyway.
            self.automatic_checkpoint();
            self.flush();
        }
    }

    fn checkpoint_deadline(&self) -> Option<Instant> {
        if self.failed.is_some() {
            return None;
        }
        self.pending_since
            .map(|since| since + self.settings.checkpoint_every)
    }

    /// Applies one command to the batch; true when the writer must stop after this batch.
    fn handle(&mut self, command: Command, answers: &mut Vec<Answer>) -> bool {
        match command {
            Command::Append { record, reply } => {
                let result = match &self.failed {
                    Some(reason) => Err(AuditError::Unusable {
                        reason: reason.clone(),
                    }),
                    None => self.append_to_batch(record),
                };
                answers.push(Answer::Append { result, reply });
                false
            }
            Command::Checkpoint { reply } => {
                let result = self.checkpoint_if_usable();
                answers.push(Answer::Checkpoint { result, reply });
                false
            }
            Command::RotateKey { key, reply } => {
                let result = self.checkpoint_if_usable();
                if result.is_ok() {
                    tracing::info!(
                        old = %self.key.key_id,
                        new = %key.key_id,
                        "audit log: checkpoints are signed with a new key from here on"
                    );
                    self.key = key;
                }
                answers.push(Answer::Checkpoint { result, reply });
                false
            }
            Command::Close { reply } => {
                if self.failed.is_none() {
                    self.automatic_checkpoint();
                }
                answers.push(Answer::Close { reply });
                true
            }
        }
    }

    fn checkpoint_if_usable(&mut self) -> Result<Option<CheckpointInfo>, AuditError> {
        match &self.failed {
            Some(reason) => Err(AuditError::Unusable {
                reason: reason.clone(),
            }),
            None => self.write_checkpoint(),
        }
    }

    /// A checkpoint nobody waits for: a failure to sign stops the log (fail-stop: records
    /// that can never be sealed must not pile up unnoticed).
    fn automatic_checkpoint(&mut self) {
        if let Err(error) = self.write_checkpoint() {
            tracing::error!(error = %error, "audit log: checkpoint failed; the log stops");
            self.failed = Some(error.to_string());
        }
    }

    /// Assigns the next sequence number and encodes the record into the batch.
    fn append_to_batch(&mut self, new: NewRecord) -> Result<u64, AuditError> {
        let record = Record {
            seq: self.next_seq,
            time_ms: now_ms(),
            direction: new.direction,
            peer_signature: new.peer_signature,
            txn_id: new.txn_id,
            prev_hash: self.head,
            peer: new.peer,
            message_type: new.message_type,
            payload: new.bytes,
        };
        record.check()?;
        let frame_len =
            (record.payload.len() + record.peer.len() + record.message_type.len()) as u64 + 200;
        self.roll_if_needed(record.time_ms, frame_len)?;
        let start = self.buffer.len();
        let hash = record.encode_frame(&mut self.buffer)?;
        debug_assert!(self.buffer.len() > start);
        assert_eq!(
            self.pending_first + self.pending.len() as u64,
            self.next_seq,
            "audit writer: unsealed records must end just before the next sequence number"
        );
        self.head = hash;
        self.pending.push(hash);
        self.pending_since.get_or_insert_with(Instant::now);
        self.segment.records += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.pending.len() as u64 >= self.settings.checkpoint_every_records {
            // The record is in the batch already: a checkpoint failure stops the log, and the
            // answer step then fails every record of the batch, this one included.
            self.automatic_checkpoint();
        }
        Ok(seq)
    }

    fn roll_if_needed(&mut self, time_ms: u64, frame_len: u64) -> Result<(), AuditError> {
        let size = self.segment.len + self.buffer.len() as u64;
        let full = size + frame_len + SEAL_RESERVE > self.settings.max_segment_bytes;
        let new_day = utc_day(time_ms) != self.segment.day;
        if self.segment.records == 0 || !(full || new_day) {
            return Ok(());
        }
        // Seal this segment, make everything in it durable, then start the next one.
        self.automatic_checkpoint();
        self.flush();
        if let Some(reason) = &self.failed {
            return Err(AuditError::Unusable {
                reason: reason.clone(),
            });
        }
        let next = create_segment(
            &self.dir,
            &self.settings.node_id,
            self.segment.number + 1,
            time_ms,
            self.next_seq,
            self.head,
        );
        match next {
            Ok(segment) => {
                self.segment = segment;
                Ok(())
            }
            Err(error) => {
                self.failed = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Signs a checkpoint over the unsealed records and puts it into the batch.
    fn write_checkpoint(&mut self) -> Result<Option<CheckpointInfo>, AuditError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let checkpoint = Checkpoint {
            node_id: self.settings.node_id.clone(),
            key_id: self.key.key_id.clone(),
            first_seq: self.pending_first,
            last_seq: self.next_seq - 1,
            head: self.head,
            root: merkle::root(&self.pending),
            time_ms: now_ms(),
        };
        let signed = checkpoint.signed_bytes();
        let signature = self
            .key
            .signer
            .sign(&signed, SignatureFormat::Der)
            .map_err(AuditError::Signing)?;
        CheckpointFrame { signed, signature }.encode_frame(&mut self.buffer)?;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_checkpoint_seq
            .store(checkpoint.last_seq, Ordering::Relaxed);
        self.pending.clear();
        self.pending_first = self.next_seq;
        self.pending_since = None;
        Ok(Some(CheckpointInfo {
            first_seq: checkpoint.first_seq,
            last_seq: checkpoint.last_seq,
            key_id: checkpoint.key_id,
            segment: self.segment.name.clone(),
        }))
    }

    /// Writes the batch and fdatasyncs it. After any failure the writer is failed for good.
    fn flush(&mut self) {
        if self.buffer.is_empty() || self.failed.is_some() {
            self.buffer.clear();
            return;
        }
        let result = self
            .segment
            .file
            .write_all(&self.buffer)
            .and_then(|()| self.segment.file.sync_data());
        match result {
            Ok(()) => {
                self.segment.len += self.buffer.len() as u64;
                self.buffer.clear();
                self.durable_seq.store(self.next_seq - 1, Ordering::Release);
            }
            Err(error) => {
                let reason = format!("writing segment {}: {error}", self.segment.name);
                tracing::error!(%reason, "audit log: write failed; the log stops");
                self.failed = Some(reason);
                self.buffer.clear();
            }
        }
    }

    fn answer(&mut self, answers: &mut Vec<Answer>) {
        let durable = self.durable_seq.load(Ordering::Acquire);
        let unusable = |reason: &Option<String>| AuditError::Unusable {
            reason: reason.clone().unwrap_or_default(),
        };
        if let Some(reason) = &self.failed
            && let Ok(mut shown) = self.stats.unusable.lock()
            && shown.is_none()
        {
            *shown = Some(reason.clone());
        }
        for answer in answers.drain(..) {
            // A caller that gave up waiting is gone; nothing to tell it.
            match answer {
                Answer::Append { result, reply } => {
                    let result = match result {
                        Ok(seq) if seq <= durable => Ok(seq),
                        Ok(_) => Err(unusable(&self.failed)),
                        Err(error) => Err(error),
                    };
                    let counter = match &result {
                        Ok(_) => &self.stats.appended,
                        Err(_) => &self.stats.refused,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    reply.send(result);
                }
                Answer::Checkpoint { result, reply } => {
                    let result = match (result, &self.failed) {
                        (Ok(_), Some(_)) => Err(unusable(&self.failed)),
                        (result, _) => result,
                    };
                    let _ = reply.send(result);
                }
                Answer::Close { reply } => {
                    let result = match &self.failed {
                        Some(_) => Err(unusable(&self.failed)),
                        None => Ok(()),
                    };
                    let _ = reply.send(result);
                }
            }
        }
    }
}

fn create_segment(
    dir: &Path,
    node_id: &str,
    number: u64,
    created_ms: u64,
    first_seq: u64,
    prev_hash: Hash,
) -> Result<OpenSegment, AuditError> {
    let day = utc_day(created_ms);
    let name = segment::file_name(number, day);
    let path = dir.join(&name);
    let header = SegmentHeader {
        version: FORMAT_VERSION,
        segment_number: number,
        created_ms,
        first_seq,
        prev_hash,
        node_id: node_id.to_owned(),
    }
    .encode()?;
    let io = |action, source| AuditError::Io {
        action,
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|e| io("create segment", e))?;
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write the header of segment", e))?;
    sync_dir(dir)?;
    debug_assert_eq!(prev_hash.len(), HASH_LEN);
    Ok(OpenSegment {
        file,
        name,
        number,
        day,
        len: header.len() as u64,
        records: 0,
    })
}

fn reopen_segment(
    file: &SegmentFile,
    header: &SegmentHeader,
    len: u64,
    records: u64,
) -> Result<OpenSegment, AuditError> {
    let handle = OpenOptions::new()
        .append(true)
        .open(&file.path)
        .map_err(|source| AuditError::Io {
            action: "open segment",
            path: file.path.clone(),
            source,
        })?;
    Ok(OpenSegment {
        file: handle,
        name: file.name.clone(),
        number: file.number,
        day: utc_day(header.created_ms),
        len,
        records,
    })
}
