//! The daemon's side of the message log: what the edges (the gateway, the notifiers, the core
//! bridge, the operator-action relay) call to log a message that crosses kunpay's boundary,
//! and what happens when the log fails.
//!
//! Owns: the handle every edge shares (`AuditSink`, a no-op without `[audit]`), the fail-stop
//! (the first failed append marks the node's audit log failed: /readiness and /primary answer
//! 503 so F5 stops sending, every later answer is 9999 with HTTP 500, and one error line says
//! so), and the audit metrics.
//! Must never: report a record as logged before it is durable; block the async runtime (the
//! edges call it from their own threads, or through `spawn_blocking`); be read by business
//! logic (the log is a sink, data flows into it only).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::error::AuditError;
use super::writer::{AuditLog, NewRecord, Pending};
use crate::ops::NodeState;

/// Why a message could not be logged (the error says what failed and what to do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuditFailure(pub String);

/// The log as the edges see it. Cheap to clone.
#[derive(Clone, Default)]
pub struct AuditSink {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    log: AuditLog,
    state: Arc<NodeState>,
    failed: AtomicBool,
    /// Set before the shutdown's `close`, so that late appends from background threads are
    /// not reported as a failure of the log.
    closing: AtomicBool,
}

/// A record handed to the writer; `wait` says whether it is durable.
#[must_use = "wait for the record, or drop the ticket knowing that a later append covers it"]
pub struct Ticket {
    pending: Option<(Pending, Arc<Inner>)>,
    refused: Option<AuditFailure>,
}

impl Ticket {
    fn done() -> Ticket {
        Ticket {
            pending: None,
            refused: None,
        }
    }

    /// The record's sequence number once it is on disk (0 at once without `[audit]`).
    pub fn wait(self) -> Result<u64, AuditFailure> {
        if let Some(failure) = self.refused {
            return Err(failure);
        }
        match self.pending {
            None => Ok(0),
            Some((pending, inner)) => pending.wait().map_err(|e| inner.fail(&e)),
        }
    }
}

/// A request's record on its way to the disk, for the answer that follows it
/// (`submit_answer`): the writer completes records in the order they were handed over, so the
/// request's fate is known by the time its answer's is.
pub struct SubmittedRequest {
    fate: RequestFate,
}

/// Set once by the writer thread (or at hand-off, when the log is closed).
type RequestFate = Arc<OnceLock<Result<u64, AuditFailure>>>;

impl AuditSink {
    /// No log (`[audit]` absent: tests and development): every call succeeds at once.
    pub fn disabled() -> AuditSink {
        AuditSink { inner: None }
    }

    /// Logs through `log`; a failure marks `state` (readiness 503).
    pub fn new(log: AuditLog, state: Arc<NodeState>) -> AuditSink {
        state.metrics.audit_log_usable.set(1);
        AuditSink {
            inner: Some(Arc::new(Inner {
                log,
                state,
                failed: AtomicBool::new(false),
                closing: AtomicBool::new(false),
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// True once an append failed: nothing more can be logged until a restart.
    pub fn is_failed(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|inner| inner.failed.load(Ordering::SeqCst))
    }

    /// Hands `record` to the writer without waiting for the disk (blocks only while the
    /// writer's bounded queue is full). Records keep the order of their `submit`/`append`
    /// calls: an answer appended later is durable only after this record is.
    pub fn submit(&self, record: NewRecord) -> Ticket {
        let Some(inner) = &self.inner else {
            return Ticket::done();
        };
        match inner.log.submit(record) {
            Ok(pending) => Ticket {
                pending: Some((pending, inner.clone())),
                refused: None,
            },
            Err(error) => Ticket {
                pending: None,
                refused: Some(inner.fail(&error)),
            },
        }
    }

    /// Hands a request's record to the writer without waiting for the disk (blocking only
    /// while its bounded queue is full); `submit_answer` reads its fate. A failure to hand it
    /// over marks the log failed at once, so `is_failed` right after says whether anything
    /// may act on the request.
    pub fn submit_request(&self, record: NewRecord) -> SubmittedRequest {
        let fate = RequestFate::default();
        let Some(inner) = &self.inner else {
            let _ = fate.set(Ok(0));
            return SubmittedRequest { fate };
        };
        let noted = fate.clone();
        let failing = inner.clone();
        // On Err the callback has already run (with Closed) and noted it.
        let _ = inner.log.submit_then(record, move |result| {
            let _ = noted.set(result.map_err(|e| failing.fail(&e)));
        });
        SubmittedRequest { fate }
    }

    /// Hands the answer to `request` to the writer and returns at once; `then` runs exactly
    /// once, on the writer thread after the fdatasync that made both records durable, with Ok
    /// only when both are (a request refused on its own, a malformed record, fails its answer
    /// too: an answer is sent only for a request in the log). It must return quickly. Without
    /// `[audit]` it runs at once, with Ok.
    ///
    /// This is how a worker answers with the log on: the handler waiting for the answer is
    /// woken once, by `then`, instead of once by the worker and again by the disk.
    pub fn submit_answer(
        &self,
        request: SubmittedRequest,
        answer: NewRecord,
        then: impl FnOnce(Result<(), AuditFailure>) + Send + 'static,
    ) {
        let Some(inner) = &self.inner else {
            then(Ok(()));
            return;
        };
        let started = Instant::now();
        let failing = inner.clone();
        // On Err the callback has already run, with Closed.
        let _ = inner.log.submit_then(answer, move |result| {
            let answer = result.map_err(|e| failing.fail(&e));
            if answer.is_ok() {
                failing
                    .state
                    .metrics
                    .audit_append_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            let request = match request.fate.get() {
                Some(fate) => fate.clone(),
                // Not reachable while the writer answers in order; if it ever is, the request
                // is not known to be on disk and its answer must not be sent.
                None => Err(AuditFailure(
                    "the request's record was not confirmed before its answer's".into(),
                )),
            };
            then(answer.and(request).map(|_| ()));
        });
    }

    /// Logs `record` and returns its sequence number once it is durable (a group-committed
    /// fdatasync; 0 without `[audit]`). Call it
    /// before sending anything that depends on it, from a thread that may block.
    pub fn append(&self, record: NewRecord) -> Result<u64, AuditFailure> {
        let Some(inner) = &self.inner else {
            return Ok(0);
        };
        let started = Instant::now();
        let result = self.submit(record).wait();
        if result.is_ok() {
            inner
                .state
                .metrics
                .audit_append_duration
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// The log directory's writer stats (None without `[audit]`).
    pub fn stats(&self) -> Option<super::AuditStats> {
        self.inner.as_ref().map(|inner| inner.log.stats())
    }

    /// Seals the last records with a checkpoint and stops the writer (at shutdown, after the
    /// listeners drained).
    pub fn close(&self) -> Result<(), AuditFailure> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        inner.closing.store(true, Ordering::SeqCst);
        inner
            .log
            .close()
            .map_err(|e| AuditFailure(format!("closing the audit log: {e}")))
    }

    /// Copies the writer's counters into /metrics and notices a failure that no caller waited
    /// for (a record submitted without waiting). Runs every second until the process ends.
    pub async fn export_metrics(self) {
        let Some(inner) = self.inner else {
            return;
        };
        let metrics = inner.state.metrics.clone();
        let (mut appended, mut refused, mut checkpoints) = (0u64, 0u64, 0u64);
        loop {
            let stats = inner.log.stats();
            metrics
                .audit_records_appended
                .inc_by(stats.appended.saturating_sub(appended));
            metrics
                .audit_append_failures
                .inc_by(stats.refused.saturating_sub(refused));
            metrics
                .audit_checkpoints
                .inc_by(stats.checkpoints.saturating_sub(checkpoints));
            (appended, refused, checkpoints) = (stats.appended, stats.refused, stats.checkpoints);
            metrics
                .audit_last_checkpoint_seq
                .set(i64::try_from(stats.last_checkpoint_seq).unwrap_or(i64::MAX));
            if let Some(reason) = stats.unusable {
                inner.fail(&AuditError::Unusable { reason });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Inner {
    /// Turns a writer error into the caller's failure; an error that stops the log (I/O,
    /// signing, closed) marks the node failed, once, with one line that says what it means.
    fn fail(&self, error: &AuditError) -> AuditFailure {
        let failure = AuditFailure(error.to_string());
        if let AuditError::Record(format) = error {
            // One malformed record (a field over its limit): that message is refused, the log
            // goes on.
            tracing::error!(error = %format, "audit log: a record was refused; its message was not sent");
            return failure;
        }
        if matches!(error, AuditError::Closed) && self.closing.load(Ordering::SeqCst) {
            return failure;
        }
        if !self.failed.swap(true, Ordering::SeqCst) {
            self.state.set_audit_failed();
            self.state.metrics.audit_log_usable.set(0);
            tracing::error!(
                error = %error,
                "audit log failed: nothing more can be logged, so every request is now answered \
                 9999 with HTTP 500 and /readiness and /primary answer 503 (F5 stops sending); \
                 fix the disk of the audit directory and restart kunpayd"
            );
        }
        failure
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, channel};

    use diesel::PgConnection;
    use diesel::r2d2::ConnectionManager;

    use super::*;
    use crate::audit::writer::{AuditKey, AuditSettings};
    use crate::audit::{Direction, PeerSignature};
    use crate::crypto::sm2::{PrivateKey, Signer};

    fn sink(dir: &std::path::Path) -> AuditSink {
        let key = PrivateKey::generate().unwrap();
        let log = AuditLog::open(
            dir,
            AuditSettings {
                node_id: "node-t".into(),
                max_segment_bytes: 1 << 20,
                checkpoint_every_records: 1000,
                checkpoint_every: Duration::from_secs(60),
                queue_bound: 16,
            },
            AuditKey {
                key_id: "k1".into(),
                signer: Signer::new(&key, "1234567812345678").unwrap(),
            },
        )
        .unwrap();
        // Never connected: the sink only reports its state through it.
        let pool = r2d2::Pool::builder().build_unchecked(ConnectionManager::<PgConnection>::new(
            "postgres://127.0.0.1:1/none",
        ));
        let state = NodeState::new(
            "node-t".into(),
            crate::config::Role::Active,
            pool,
            Duration::from_secs(2),
            Duration::from_secs(10),
        );
        AuditSink::new(log, state)
    }

    fn record(direction: Direction, peer: &str) -> NewRecord {
        NewRecord {
            direction,
            peer: peer.into(),
            message_type: "DEBIT".into(),
            txn_id: None,
            peer_signature: PeerSignature::NotVerified,
            bytes: b"<root/>".to_vec(),
        }
    }

    /// Submits a request and its answer; the receiver hears each run of `then`.
    fn exchange(sink: &AuditSink, request_peer: &str) -> Receiver<Result<(), AuditFailure>> {
        let (heard, hear) = channel();
        let request = sink.submit_request(record(Direction::In, request_peer));
        sink.submit_answer(request, record(Direction::Out, "inst-a"), move |result| {
            heard.send(result).unwrap();
        });
        hear
    }

    fn once(hear: Receiver<Result<(), AuditFailure>>) -> Result<(), AuditFailure> {
        let result = hear.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            hear.recv_timeout(Duration::from_millis(50)).is_err(),
            "then ran twice"
        );
        result
    }

    #[test]
    fn an_answer_is_handed_over_once_both_records_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink(dir.path());
        assert_eq!(once(exchange(&sink, "inst-a")), Ok(()));
        assert!(sink.stats().unwrap().durable_seq >= 2);
        assert!(!sink.is_failed());
    }

    #[test]
    fn a_request_refused_on_its_own_fails_its_answer_while_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink(dir.path());
        // A peer with a space is a malformed record: refused alone, its answer appended.
        let refused = once(exchange(&sink, "inst a")).unwrap_err();
        assert!(refused.0.contains("peer"), "{refused}");
        assert!(
            !sink.is_failed(),
            "one malformed record must not stop the log"
        );
        assert_eq!(once(exchange(&sink, "inst-a")), Ok(()));
        let stats = sink.stats().unwrap();
        assert_eq!((stats.appended, stats.refused), (3, 1));
    }

    #[test]
    fn after_close_then_runs_once_with_a_failure_instead_of_never() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink(dir.path());
        sink.close().unwrap();
        assert!(once(exchange(&sink, "inst-a")).is_err());
    }

    #[test]
    fn without_a_log_then_runs_at_once() {
        let sink = AuditSink::disabled();
        assert_eq!(once(exchange(&sink, "inst-a")), Ok(()));
    }
}
