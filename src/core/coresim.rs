//! `kunpay-coresim`: the core-banking simulator as a service on the broker.
//!
//! Owns: consuming the request queue, checking each request's MAC, running it against the
//! simulator's ledger (`sim.rs`, the same logic the in-process core uses), publishing the
//! signed reply to the request's `reply_to` before acknowledging the request, and the fault
//! injection that makes it a useful adversary: latency, dropped and duplicated replies, replies
//! held back so they arrive out of order, forced rejections, and a crash after N requests.
//! Must never: answer a request whose MAC failed (dead-lettered instead), post one transaction
//! id twice (the ledger's rule), or acknowledge a request whose reply is not with the broker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::amqp::{AmqpLink, AmqpSettings};
use super::transport::{self, Connect, Disposition, Handler, RawMessage, Transport};
use super::wire::{CoreReply, CoreRequest, Envelope, MacKeys, now_ms};
use super::{CoreError, CoreLink, PostingOutcome, Rejection};

/// The ledger behind the service: the in-memory simulator, or its PostgreSQL twin.
pub type Ledger = Arc<dyn CoreLink>;

/// Deliberate misbehaviour, changeable while running (`set_faults`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceFaults {
    /// Added before every reply.
    pub latency: Duration,
    /// Postings wait this long before they are applied (a core slow to post, overtaken by
    /// the queries and reversals that arrive meanwhile).
    pub post_delay: Duration,
    /// Every Nth request is processed but its reply never sent (0: never).
    pub drop_every: u64,
    /// Every Nth reply is sent twice (0: never).
    pub duplicate_every: u64,
    /// Every Nth reply is held back by `hold_back` while later ones go first (0: never).
    pub reorder_every: u64,
    pub hold_back: Duration,
    /// Every Nth posting is rejected with this reason instead of being applied (0: never).
    pub reject_every: u64,
    pub reject_reason: Option<Rejection>,
    /// The process exits abruptly (no reply, no ack) on the Nth request (0: never).
    pub crash_at: u64,
}

pub struct CoreSimService {
    core: Ledger,
    link: Arc<dyn Transport>,
    faults: Arc<Mutex<ServiceFaults>>,
    handled: Arc<AtomicU64>,
}

impl CoreSimService {
    /// Serves the request queue named in `amqp` on the AMQP broker.
    pub fn start(
        runtime: tokio::runtime::Handle,
        amqp: AmqpSettings,
        keys: Arc<MacKeys>,
        core: Ledger,
        faults: ServiceFaults,
    ) -> CoreSimService {
        CoreSimService::start_with(
            Box::new(move |handler| Arc::new(AmqpLink::start(runtime, amqp, handler))),
            keys,
            core,
            faults,
        )
    }

    /// The same over any transport; `connect` starts it consuming the request queue.
    pub fn start_with(
        connect: Connect,
        keys: Arc<MacKeys>,
        core: Ledger,
        faults: ServiceFaults,
    ) -> CoreSimService {
        let faults = Arc::new(Mutex::new(faults));
        let handled = Arc::new(AtomicU64::new(0));
        let link_cell: Arc<OnceLock<Arc<dyn Transport>>> = Arc::new(OnceLock::new());
        let handler: Handler = {
            let (core, faults, handled, link_cell, keys) = (
                core.clone(),
                faults.clone(),
                handled.clone(),
                link_cell.clone(),
                keys.clone(),
            );
            Arc::new(move |message: RawMessage| {
                let (core, faults, handled, link_cell, keys) = (
                    core.clone(),
                    faults.clone(),
                    handled.clone(),
                    link_cell.clone(),
                    keys.clone(),
                );
                Box::pin(async move {
                    let Some(link) = link_cell.get().cloned() else {
                        // Not started yet: give it back rather than lose it.
                        return Disposition::Requeue;
                    };
                    handle(core, link, &keys, &faults, &handled, message).await
                })
            })
        };
        let link = connect(handler);
        let _ = link_cell.set(link.clone());
        CoreSimService {
            core,
            link,
            faults,
            handled,
        }
    }

    pub fn core(&self) -> &Ledger {
        &self.core
    }

    pub fn faults(&self) -> ServiceFaults {
        self.faults.lock().expect("faults lock").clone()
    }

    pub fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    pub fn set_faults(&self, faults: ServiceFaults) {
        *self.faults.lock().expect("faults lock") = faults;
    }

    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }

    pub fn wait_connected(&self, within: Duration) -> bool {
        self.link.wait_connected(within)
    }

    pub fn stop(&self) {
        self.link.stop();
    }
}

fn every(n: u64, count: u64) -> bool {
    n > 0 && count.is_multiple_of(n)
}

/// Runs a request against the ledger (blocking: it may be the database).
fn execute(
    core: &dyn CoreLink,
    request: &CoreRequest,
    reject: Option<Rejection>,
) -> Result<CoreReply, CoreError> {
    Ok(match request {
        CoreRequest::Post(posting) => CoreReply::Post {
            txn_id: posting.txn_id,
            outcome: match reject {
                Some(reason) => PostingOutcome::Rejected(reason),
                None => core.post(posting)?,
            },
        },
        CoreRequest::Query { txn_id } => CoreReply::Query {
            txn_id: *txn_id,
            outcome: core.query_posting(*txn_id)?,
        },
        CoreRequest::Bind(bind) => CoreReply::Bind(core.request_binding(&bind.into())?),
        CoreRequest::CheckCode { agreement_no, code } => {
            CoreReply::CheckCode(core.check_code(agreement_no, code)?)
        }
        CoreRequest::Reverse(reversal) => CoreReply::Reverse {
            reversal_id: reversal.reversal_id,
            txn_id: reversal.txn_id,
            outcome: core.reverse(reversal)?,
        },
    })
}

async fn handle(
    core: Ledger,
    link: Arc<dyn Transport>,
    keys: &MacKeys,
    faults: &Mutex<ServiceFaults>,
    handled: &AtomicU64,
    message: RawMessage,
) -> Disposition {
    let envelope = match message.open(keys) {
        Ok(envelope) => envelope,
        Err(why) => {
            tracing::error!(
                message_id = ?message.message_id,
                "coresim: request refused and dead-lettered: {why}"
            );
            return Disposition::DeadLetter;
        }
    };
    let request = match CoreRequest::decode(&envelope) {
        Ok(request) => request,
        Err(why) => {
            tracing::error!(message_id = %envelope.message_id, "coresim: request refused: {why}");
            return Disposition::DeadLetter;
        }
    };
    let Some(reply_to) = message.reply_to.clone().filter(|q| !q.is_empty()) else {
        tracing::error!(message_id = %envelope.message_id, "coresim: request without reply_to");
        return Disposition::DeadLetter;
    };
    let count = handled.fetch_add(1, Ordering::AcqRel) + 1;
    let faults = faults.lock().expect("faults lock").clone();
    if faults.crash_at != 0 && count == faults.crash_at {
        tracing::error!("coresim: crashing on purpose at request {count} (fault injection)");
        // Abrupt, like a power cut: no reply, no ack; the broker redelivers the request.
        std::process::exit(101);
    }
    let is_post = matches!(request, CoreRequest::Post(_));
    let reject = (is_post && every(faults.reject_every, count))
        .then(|| faults.reject_reason.unwrap_or(Rejection::Frozen));
    if is_post && !faults.post_delay.is_zero() {
        tokio::time::sleep(faults.post_delay).await;
    }
    let reply = match tokio::task::spawn_blocking(move || execute(&*core, &request, reject)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(why)) => {
            // The ledger could not answer (its database is away): try again later.
            tracing::warn!(message_id = %envelope.message_id, "coresim: {why}; request requeued");
            return Disposition::Requeue;
        }
        Err(panicked) => {
            tracing::error!(message_id = %envelope.message_id, "coresim: ledger panicked: {panicked}");
            return Disposition::Requeue;
        }
    };
    if every(faults.drop_every, count) {
        tracing::warn!(message_id = %envelope.message_id, "coresim: reply dropped (fault injection)");
        return Disposition::Ack;
    }
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let sealed = Envelope::seal(
        keys,
        reply.message_type(),
        &envelope.correlation_id,
        now_ms(),
        reply.encode(),
    );
    if every(faults.reorder_every, count) {
        // Acknowledge now, answer later: the replies after this one overtake it.
        let hold_back = faults.hold_back;
        tokio::spawn(async move {
            tokio::time::sleep(hold_back).await;
            if let Err(why) = transport::publish(&*link, &reply_to, &sealed, None).await {
                tracing::warn!("coresim: held-back reply not sent: {why}");
            }
        });
        return Disposition::Ack;
    }
    let copies = if every(faults.duplicate_every, count) {
        2
    } else {
        1
    };
    for _ in 0..copies {
        if let Err(why) = transport::publish(&*link, &reply_to, &sealed, None).await {
            // Not acknowledged: the broker redelivers the request and the ledger answers it
            // again from what it recorded (postings are idempotent by transaction id).
            tracing::warn!("coresim: reply not sent, the request goes back to the queue: {why}");
            return Disposition::Requeue;
        }
    }
    Disposition::Ack
}
