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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A record on its way to the disk whose outcome is awaited without holding a thread (the
/// writer completes it when the batch's fdatasync returned).
pub struct Durable {
    pending: Option<(DurableAnswer, Arc<Inner>)>,
    refused: Option<AuditFailure>,
}

/// What the writer thread sends once a record is on disk (or refused).
type DurableAnswer = tokio::sync::oneshot::Receiver<Result<u64, AuditError>>;

impl Durable {
    /// The record's sequence number once it is on disk (0 at once without `[audit]`).
    pub async fn wait(self) -> Result<u64, AuditFailure> {
        if let Some(failure) = self.refused {
            return Err(failure);
        }
        match self.pending {
            None => Ok(0),
            Some((answer, inner)) => match answer.await {
                Ok(result) => result.map_err(|e| inner.fail(&e)),
                Err(_) => Err(inner.fail(&AuditError::Closed)),
            },
        }
    }
}

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

    /// Hands `record` to the writer (blocking only while its bounded queue is full) and
    /// returns what an async task awaits until the record is durable: a worker thread logs an
    /// answer this way and goes on to its next request while the disk works; the answer is
    /// sent once the wait is over. `timed`: the wait counts in the append-latency histogram.
    pub fn submit_durable(&self, record: NewRecord, timed: bool) -> Durable {
        let Some(inner) = &self.inner else {
            return Durable {
                pending: None,
                refused: None,
            };
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        let metrics = inner.state.metrics.clone();
        let handed = inner.log.submit_then(record, move |result| {
            if timed && result.is_ok() {
                metrics
                    .audit_append_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            let _ = done.send(result);
        });
        match handed {
            Ok(()) => Durable {
                pending: Some((answer, inner.clone())),
                refused: None,
            },
            Err(error) => Durable {
                pending: None,
                refused: Some(inner.fail(&error)),
            },
        }
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
