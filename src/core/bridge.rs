//! The MQ bridge: `CoreLink` over a message queue, request/reply matched by correlation id.
//!
//! Owns: sealing requests (MAC), publishing them with confirms, the bounded table of requests
//! waiting for a reply, the reply timeout, and the verdict on every received reply (bad MAC,
//! unknown correlation id, wrong type, duplicate, late). A posting reply nobody waits for any
//! more goes to the late-reply queue, where the payment flows reconcile it with the journal.
//! Audit log: every request is handed to the log (outbound, properties and exact body) before
//! it is published, every received message (inbound, as received, whatever its verdict: late,
//! duplicate, bad MAC) before its verdict is acted on, so the answer to an institution that
//! depends on a reply is appended after it. Neither waits for the disk here: the answer's
//! append does (docs/audit.md).
//! Must never: apply a reply itself (the journal's compare-and-set does that, once), match a
//! reply whose MAC failed, wait without a deadline, or hold more requests than its bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::amqp::{AmqpLink, AmqpSettings};
use super::transport::{Connect, Disposition, PublishError, RawMessage, Transport};
use super::wire::{CoreReply, CoreRequest, Envelope, MacKeys, MessageType, now_ms};
use super::{
    BindOutcome, BindRequest, CodeCheck, CoreError, CoreLink, Posting, PostingOutcome, Reversal,
    ReversalOutcome,
};
use crate::audit::{AuditSink, Direction, NewRecord, PeerSignature};

/// A posting reply that arrived when nobody waited for it: after the timeout, a duplicate, or
/// after a restart. The flows compare it with the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateReply {
    pub txn_id: Uuid,
    pub outcome: PostingOutcome,
}

/// Why a received message was not matched (counted in /metrics, logged with its ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// MAC missing, wrong, or under an unknown key id.
    BadMac,
    /// The MAC verified but the message is not a valid reply.
    Malformed,
    /// A reply type other than the one the request expects.
    WrongType,
    /// No request waits under this correlation id and it is not a posting reply.
    UnknownCorrelation,
    /// The late-reply queue was full; the reply is dead-lettered for a person.
    LateQueueFull,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadMac => "bad_mac",
            Refusal::Malformed => "malformed",
            Refusal::WrongType => "wrong_type",
            Refusal::UnknownCorrelation => "unknown_correlation",
            Refusal::LateQueueFull => "late_queue_full",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub request_queue: String,
    pub reply_queue: String,
    pub reply_timeout: Duration,
    /// Requests waiting for a reply at once; beyond it a request fails as unavailable.
    pub max_in_flight: usize,
    /// Late posting replies held for the flows to reconcile.
    pub late_queue: usize,
    /// Postings the outbox may hold while the broker is away; beyond it a posting fails as
    /// unavailable (and readiness says 503 so F5 stops sending).
    pub max_queued: u64,
}

struct Waiter {
    expects: MessageType,
    reply: tokio::sync::oneshot::Sender<CoreReply>,
}

/// Counters for /metrics and tests.
#[derive(Default)]
pub struct BridgeCounters {
    pub published: AtomicU64,
    pub replies_matched: AtomicU64,
    pub replies_late: AtomicU64,
    pub refused: Mutex<HashMap<&'static str, u64>>,
    pub timeouts: AtomicU64,
}

impl BridgeCounters {
    /// Every reply verdict with its count so far, and the timeouts, for /metrics.
    pub fn snapshot(&self) -> (Vec<(&'static str, u64)>, u64) {
        let mut verdicts = vec![
            ("matched", self.replies_matched.load(Ordering::Relaxed)),
            ("late", self.replies_late.load(Ordering::Relaxed)),
        ];
        for refusal in [
            Refusal::BadMac,
            Refusal::Malformed,
            Refusal::WrongType,
            Refusal::UnknownCorrelation,
            Refusal::LateQueueFull,
        ] {
            verdicts.push((refusal.label(), self.refused(refusal)));
        }
        (verdicts, self.timeouts.load(Ordering::Relaxed))
    }

    fn refuse(&self, refusal: Refusal) {
        *self
            .refused
            .lock()
            .expect("counter lock")
            .entry(refusal.label())
            .or_default() += 1;
    }

    pub fn refused(&self, refusal: Refusal) -> u64 {
        self.refused
            .lock()
            .expect("counter lock")
            .get(refusal.label())
            .copied()
            .unwrap_or(0)
    }
}

struct Shared {
    keys: Arc<MacKeys>,
    waiting: Mutex<HashMap<String, Waiter>>,
    late: SyncSender<LateReply>,
    counters: BridgeCounters,
    /// The outbox depth as last counted (`set_backlog`).
    backlog: AtomicU64,
}

/// Told the round trip of every request that got its reply: from just before the publish to
/// the reply in the caller's hands (broker both ways, the core's work, and our wake-up).
pub type RoundTripObserver = Arc<dyn Fn(MessageType, Duration) + Send + Sync>;

pub struct MqCore {
    link: Arc<dyn Transport>,
    round_trips: Option<RoundTripObserver>,
    audit: AuditSink,
    /// Where the waits for replies run (the caller is a worker thread outside it).
    runtime: tokio::runtime::Handle,
    settings: BridgeSettings,
    shared: Arc<Shared>,
}

impl MqCore {
    /// Connects to the AMQP broker (in the background) and starts consuming the reply queue.
    /// Posting replies that nobody waits for come out of the returned receiver.
    pub fn start(
        runtime: tokio::runtime::Handle,
        amqp: AmqpSettings,
        settings: BridgeSettings,
        keys: Arc<MacKeys>,
    ) -> (MqCore, Receiver<LateReply>) {
        MqCore::start_logged(runtime, amqp, settings, keys, AuditSink::disabled())
    }

    /// `start`, with every message published and received handed to `audit`.
    pub fn start_logged(
        runtime: tokio::runtime::Handle,
        amqp: AmqpSettings,
        settings: BridgeSettings,
        keys: Arc<MacKeys>,
        audit: AuditSink,
    ) -> (MqCore, Receiver<LateReply>) {
        assert_eq!(amqp.consume_queue, settings.reply_queue);
        let amqp_runtime = runtime.clone();
        MqCore::start_with_log(
            runtime,
            Box::new(move |handler| Arc::new(AmqpLink::start(amqp_runtime, amqp, handler))),
            settings,
            keys,
            audit,
        )
    }

    /// The same over any transport: `connect` starts it with the bridge's reply handler, and it
    /// must consume `settings.reply_queue`.
    pub fn start_with(
        runtime: tokio::runtime::Handle,
        connect: Connect,
        settings: BridgeSettings,
        keys: Arc<MacKeys>,
    ) -> (MqCore, Receiver<LateReply>) {
        MqCore::start_with_log(runtime, connect, settings, keys, AuditSink::disabled())
    }

    /// `start_with`, logging to `audit`.
    pub fn start_with_log(
        runtime: tokio::runtime::Handle,
        connect: Connect,
        settings: BridgeSettings,
        keys: Arc<MacKeys>,
        audit: AuditSink,
    ) -> (MqCore, Receiver<LateReply>) {
        assert!(settings.max_in_flight > 0 && settings.late_queue > 0);
        let (late, late_replies) = sync_channel(settings.late_queue);
        let shared = Arc::new(Shared {
            keys,
            waiting: Mutex::new(HashMap::new()),
            late,
            counters: BridgeCounters::default(),
            backlog: AtomicU64::new(0),
        });
        let handler_shared = shared.clone();
        let handler_audit = audit.clone();
        let handler: super::transport::Handler = Arc::new(move |message: RawMessage| {
            let (shared, audit) = (handler_shared.clone(), handler_audit.clone());
            Box::pin(async move {
                if audit.is_enabled() {
                    // Logged as received before the verdict hands the reply to its waiter, so
                    // the answer that depends on it comes after it in the log. The log's queue
                    // may be full: wait for it off the runtime (deliveries are handled one at
                    // a time, so the order holds).
                    let record = received_record(&message);
                    let _ = tokio::task::spawn_blocking(move || drop(audit.submit(record))).await;
                }
                on_reply(&shared, message)
            })
        });
        let link = connect(handler);
        (
            MqCore {
                audit,
                link,
                round_trips: None,
                runtime,
                settings,
                shared,
            },
            late_replies,
        )
    }

    /// Reports every answered request's round trip to `observer` (/metrics).
    pub fn with_round_trip_observer(mut self, observer: RoundTripObserver) -> MqCore {
        self.round_trips = Some(observer);
        self
    }

    pub fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    pub fn wait_connected(&self, within: Duration) -> bool {
        self.link.wait_connected(within)
    }

    pub fn counters(&self) -> &BridgeCounters {
        &self.shared.counters
    }

    pub fn in_flight(&self) -> usize {
        self.shared.waiting.lock().expect("waiting lock").len()
    }

    pub fn stop(&self) {
        self.link.stop();
    }

    /// The outbox depth (postings whose answer is owed), counted by the daemon from the journal.
    pub fn set_backlog(&self, pending: u64) {
        self.shared.backlog.store(pending, Ordering::Release);
    }

    /// Whether the outbox holds as many postings as it may.
    pub fn outbox_full(&self) -> bool {
        self.shared.backlog.load(Ordering::Acquire) >= self.settings.max_queued
    }

    /// Publishes `request` under `correlation_id` and waits for its reply. A posting that
    /// certainly was not sent is `Queued` while the outbox has room (it is journaled and the
    /// resolver delivers it later); anything else not sent is `Unavailable`.
    fn call(&self, request: &CoreRequest, correlation_id: String) -> Result<CoreReply, CoreError> {
        let message_type = request.message_type();
        let expects = message_type.reply().expect("requests have a reply type");
        let (reply_tx, mut reply_rx) = tokio::sync::oneshot::channel();
        {
            let mut waiting = self.shared.waiting.lock().expect("waiting lock");
            if waiting.len() >= self.settings.max_in_flight {
                return Err(CoreError::Unavailable(format!(
                    "{} requests already wait for the core (core.amqp.max_in_flight)",
                    waiting.len()
                )));
            }
            if waiting.contains_key(&correlation_id) {
                // One owner per transaction is the journal's rule; a second caller cannot know
                // what the first one's posting did, so it must not claim anything.
                return Err(CoreError::Timeout);
            }
            waiting.insert(
                correlation_id.clone(),
                Waiter {
                    expects,
                    reply: reply_tx,
                },
            );
        }
        let envelope = Envelope::seal(
            &self.shared.keys,
            message_type,
            &correlation_id,
            now_ms(),
            request.encode(),
        );
        // Into the log before it leaves; not waited for here: the institution's answer that
        // depends on this call is appended after it and waits for both.
        drop(self.audit.submit(published_record(
            &envelope,
            request_txn_id(request),
            &self.settings.reply_queue,
        )));
        // The reply and the broker's confirm are awaited together: the core can answer before
        // the broker has synced the request to disk, and a persisted request whose reply is
        // already here needs no confirm to be acted on.
        let (request_queue, reply_queue, timeout) = (
            self.settings.request_queue.as_str(),
            self.settings.reply_queue.as_str(),
            self.settings.reply_timeout,
        );
        let link = &self.link;
        assert!(
            tokio::runtime::Handle::try_current().is_err(),
            "core calls come from worker threads, never from the runtime"
        );
        let started = std::time::Instant::now();
        let awaited: Result<CoreReply, PublishError> = self.runtime.block_on(async {
            let confirm = link
                .send(request_queue, &envelope, Some(reply_queue))
                .await?;
            tokio::pin!(confirm);
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut confirmed = false;
            loop {
                tokio::select! {
                    reply = &mut reply_rx => match reply {
                        Ok(reply) => return Ok(reply),
                        // The waiter was removed: only this call removes it after a timeout.
                        Err(_) => return Err(PublishError::Unconfirmed("reply channel closed".into())),
                    },
                    result = &mut confirm, if !confirmed => {
                        result?;
                        confirmed = true;
                    }
                    _ = &mut deadline => {
                        return Err(PublishError::Unconfirmed(format!("no reply within {timeout:?}")));
                    }
                }
            }
        });
        let forget = || {
            self.shared
                .waiting
                .lock()
                .expect("waiting lock")
                .remove(&correlation_id);
        };
        match awaited {
            Ok(reply) => {
                if let Some(observe) = &self.round_trips {
                    observe(message_type, started.elapsed());
                }
                self.shared
                    .counters
                    .published
                    .fetch_add(1, Ordering::Relaxed);
                Ok(reply)
            }
            Err(PublishError::NotSent(why)) => {
                forget();
                if !matches!(request, CoreRequest::Post(_)) {
                    return Err(CoreError::Unavailable(why));
                }
                if self.outbox_full() {
                    return Err(CoreError::Unavailable(format!(
                        "{why}; the outbox is full ({} postings owed, core.amqp.max_queued = {})",
                        self.shared.backlog.load(Ordering::Acquire),
                        self.settings.max_queued
                    )));
                }
                Err(CoreError::Queued(why))
            }
            Err(PublishError::Unconfirmed(why)) => {
                forget();
                self.shared
                    .counters
                    .timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%correlation_id, "core link: {why}; the outcome is unknown");
                Err(CoreError::Timeout)
            }
        }
    }
}

/// The transaction a request is about (none for bindings and code checks).
fn request_txn_id(request: &CoreRequest) -> Option<Uuid> {
    match request {
        CoreRequest::Post(posting) => Some(posting.txn_id),
        CoreRequest::Query { txn_id } => Some(*txn_id),
        CoreRequest::Reverse(reversal) => Some(reversal.txn_id),
        _ => None,
    }
}

/// A core-link message as the audit log keeps it (docs/audit.md): its properties, one
/// `name: value` line each (control bytes and `%` percent-escaped, absent ones left out), an
/// empty line, then the body exactly as published or received.
pub fn audit_bytes(properties: &[(&str, Option<String>)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    for (name, value) in properties {
        let Some(value) = value else { continue };
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        for byte in value.bytes() {
            if byte < 0x20 || byte == 0x7f || byte == b'%' {
                out.extend_from_slice(format!("%{byte:02X}").as_bytes());
            } else {
                out.push(byte);
            }
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// The audit record of a request about to be published.
fn published_record(envelope: &Envelope, txn_id: Option<Uuid>, reply_to: &str) -> NewRecord {
    NewRecord {
        direction: Direction::Out,
        peer: CORE_PEER.into(),
        message_type: envelope.message_type.name().into(),
        txn_id,
        peer_signature: PeerSignature::None,
        bytes: audit_bytes(
            &[
                ("type", Some(envelope.message_type.name().into())),
                ("message-id", Some(envelope.message_id.clone())),
                ("correlation-id", Some(envelope.correlation_id.clone())),
                ("reply-to", Some(reply_to.into())),
                ("sent-at-ms", Some(envelope.sent_at_ms.to_string())),
                ("key-id", Some(envelope.key_id.clone())),
                ("mac", Some(envelope.mac_hex())),
            ],
            &envelope.body,
        ),
    }
}

/// The audit record of a received message, nothing verified: its type when it names one we
/// know, its transaction from the body's `txn_id` when there is one.
fn received_record(message: &RawMessage) -> NewRecord {
    let message_type = message
        .message_type
        .as_deref()
        .and_then(MessageType::parse)
        .map_or("kunpay.unknown", MessageType::name);
    #[derive(serde::Deserialize)]
    struct TxnOnly {
        txn_id: Option<Uuid>,
    }
    let txn_id = serde_json::from_slice::<TxnOnly>(&message.body)
        .ok()
        .and_then(|b| b.txn_id);
    NewRecord {
        direction: Direction::In,
        peer: CORE_PEER.into(),
        message_type: message_type.into(),
        txn_id,
        peer_signature: PeerSignature::None,
        bytes: audit_bytes(
            &[
                ("type", message.message_type.clone()),
                ("message-id", message.message_id.clone()),
                ("correlation-id", message.correlation_id.clone()),
                ("reply-to", message.reply_to.clone()),
                ("sent-at-ms", message.sent_at_ms.map(|v| v.to_string())),
                ("key-id", message.key_id.clone()),
                ("mac", message.mac.clone()),
                ("redelivered", Some(message.redelivered.to_string())),
            ],
            &message.body,
        ),
    }
}

/// The peer of core-link records in the audit log.
pub const CORE_PEER: &str = "core";

/// The verdict on one received message. Runs on the runtime: no blocking.
fn on_reply(shared: &Shared, message: RawMessage) -> Disposition {
    let ids = (
        message.message_id.clone().unwrap_or_default(),
        message.correlation_id.clone().unwrap_or_default(),
    );
    let envelope = match message.open(&shared.keys) {
        Ok(envelope) => envelope,
        Err(why) => {
            shared.counters.refuse(Refusal::BadMac);
            tracing::error!(
                message_id = %ids.0, correlation_id = %ids.1,
                "core link: reply refused and dead-lettered: {why}"
            );
            return Disposition::DeadLetter;
        }
    };
    let reply = match CoreReply::decode(&envelope) {
        Ok(reply) => reply,
        Err(why) => {
            shared.counters.refuse(Refusal::Malformed);
            tracing::error!(
                message_id = %ids.0, correlation_id = %ids.1,
                "core link: reply refused and dead-lettered: {why}"
            );
            return Disposition::DeadLetter;
        }
    };
    let waiter = {
        let mut waiting = shared.waiting.lock().expect("waiting lock");
        match waiting.get(&envelope.correlation_id) {
            Some(w) if w.expects != envelope.message_type => {
                shared.counters.refuse(Refusal::WrongType);
                tracing::error!(
                    message_id = %ids.0, correlation_id = %ids.1,
                    "core link: a {} answers a request expecting {}; dead-lettered",
                    envelope.message_type, w.expects
                );
                return Disposition::DeadLetter;
            }
            Some(_) => waiting.remove(&envelope.correlation_id),
            None => None,
        }
    };
    if let Some(waiter) = waiter {
        // The waiter may have timed out a moment ago and gone: then the reply is late.
        if waiter.reply.send(reply.clone()).is_ok() {
            shared
                .counters
                .replies_matched
                .fetch_add(1, Ordering::Relaxed);
            return Disposition::Ack;
        }
    }
    match reply {
        CoreReply::Post { txn_id, outcome } => {
            match shared.late.try_send(LateReply { txn_id, outcome }) {
                Ok(()) => {
                    shared.counters.replies_late.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        %txn_id, message_id = %ids.0,
                        "core link: posting reply after its request stopped waiting; reconciling with the journal"
                    );
                    Disposition::Ack
                }
                Err(_) => {
                    shared.counters.refuse(Refusal::LateQueueFull);
                    tracing::error!(
                        %txn_id, message_id = %ids.0,
                        "core link: late posting reply dead-lettered, the reconciliation queue is full"
                    );
                    Disposition::DeadLetter
                }
            }
        }
        _ => {
            shared.counters.refuse(Refusal::UnknownCorrelation);
            tracing::warn!(
                message_id = %ids.0, correlation_id = %ids.1,
                "core link: {} with no request waiting for it; acknowledged and dropped",
                envelope.message_type
            );
            Disposition::Ack
        }
    }
}

fn unexpected(reply: CoreReply) -> CoreError {
    // The waiter table matches types, so this is a bug, not a core fault.
    unreachable!(
        "reply type checked against the waiter: {:?}",
        reply.message_type()
    )
}

impl CoreLink for MqCore {
    fn request_binding(&self, request: &BindRequest) -> Result<BindOutcome, CoreError> {
        match self.call(
            &CoreRequest::Bind(request.into()),
            Uuid::now_v7().simple().to_string(),
        )? {
            CoreReply::Bind(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    fn check_code(&self, agreement_no: &str, code: &str) -> Result<CodeCheck, CoreError> {
        match self.call(
            &CoreRequest::CheckCode {
                agreement_no: agreement_no.to_string(),
                code: code.to_string(),
            },
            Uuid::now_v7().simple().to_string(),
        )? {
            CoreReply::CheckCode(check) => Ok(check),
            other => Err(unexpected(other)),
        }
    }

    fn post(&self, posting: &Posting) -> Result<PostingOutcome, CoreError> {
        match self.call(
            &CoreRequest::Post(posting.clone()),
            posting.txn_id.simple().to_string(),
        )? {
            CoreReply::Post { txn_id, outcome } => {
                assert_eq!(
                    txn_id, posting.txn_id,
                    "decode checks txn_id = correlation id"
                );
                Ok(outcome)
            }
            other => Err(unexpected(other)),
        }
    }

    fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError> {
        match self.call(
            &CoreRequest::Query { txn_id },
            Uuid::now_v7().simple().to_string(),
        )? {
            CoreReply::Query {
                txn_id: answered,
                outcome,
            } => {
                if answered != txn_id {
                    tracing::error!(%txn_id, %answered, "core link: query answered for another transaction");
                    return Err(CoreError::Timeout);
                }
                Ok(outcome)
            }
            other => Err(unexpected(other)),
        }
    }

    fn reverse(&self, reversal: &Reversal) -> Result<ReversalOutcome, CoreError> {
        // Its own correlation id: a redelivery of the original posting may be waiting under
        // the transaction id at the same moment.
        match self.call(
            &CoreRequest::Reverse(reversal.clone()),
            reversal.reversal_id.simple().to_string(),
        )? {
            CoreReply::Reverse {
                txn_id, outcome, ..
            } => {
                if txn_id != reversal.txn_id {
                    tracing::error!(txn_id = %reversal.txn_id, answered = %txn_id, "core link: reversal answered for another transaction");
                    return Err(CoreError::Timeout);
                }
                Ok(outcome)
            }
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::coresim::{CoreSimService, ServiceFaults};
    use crate::core::sim::CoreSimulator;
    use crate::core::transport::memory::MemoryBroker;
    use crate::core::{PostingKind, ReversalOutcome};
    use zeroize::Zeroizing;

    const ACCOUNT: &str = "6222021234567890123";

    struct Rig {
        _runtime: tokio::runtime::Runtime,
        broker: Arc<MemoryBroker>,
        core: Arc<CoreSimulator>,
        coresim: CoreSimService,
        bridge: MqCore,
        late: Receiver<LateReply>,
    }

    fn keys() -> Arc<MacKeys> {
        Arc::new(MacKeys::single("k", Zeroizing::new(vec![9u8; 32])).unwrap())
    }

    fn rig(faults: ServiceFaults, reply_timeout: Duration) -> Rig {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let broker = MemoryBroker::new(runtime.handle().clone());
        let core = Arc::new(CoreSimulator::with_demo_accounts());
        let coresim =
            CoreSimService::start_with(broker.connect("request"), keys(), core.clone(), faults);
        let (bridge, late) = MqCore::start_with(
            runtime.handle().clone(),
            broker.connect("reply"),
            BridgeSettings {
                request_queue: "request".into(),
                reply_queue: "reply".into(),
                reply_timeout,
                max_in_flight: 64,
                late_queue: 16,
                max_queued: 100,
            },
            keys(),
        );
        Rig {
            _runtime: runtime,
            broker,
            core,
            coresim,
            bridge,
            late,
        }
    }

    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn debit(amount_fen: i64) -> Posting {
        Posting {
            txn_id: Uuid::now_v7(),
            kind: PostingKind::Debit,
            account_no: ACCOUNT.into(),
            amount_fen,
        }
    }

    #[test]
    fn every_request_type_round_trips_over_any_transport() {
        let rig = rig(ServiceFaults::default(), Duration::from_secs(5));
        let before = rig.core.balance(ACCOUNT).unwrap();
        let posting = debit(250);
        let posted = rig.bridge.post(&posting).unwrap();
        assert!(matches!(posted, PostingOutcome::Posted { .. }));
        assert_eq!(
            rig.bridge.query_posting(posting.txn_id).unwrap(),
            Some(posted)
        );
        let reversal = Reversal {
            reversal_id: Uuid::now_v7(),
            txn_id: posting.txn_id,
            kind: posting.kind,
            account_no: posting.account_no.clone(),
            amount_fen: posting.amount_fen,
        };
        assert!(matches!(
            rig.bridge.reverse(&reversal).unwrap(),
            ReversalOutcome::Reversed { .. }
        ));
        assert_eq!(rig.core.balance(ACCOUNT).unwrap(), before);
        let bind = BindRequest {
            agreement_no: "A1".into(),
            account_no: ACCOUNT.into(),
            account_name: "张三".into(),
            id_no: "110101199003077774".into(),
            phone: "13812345678".into(),
        };
        assert!(matches!(
            rig.bridge.request_binding(&bind).unwrap(),
            BindOutcome::CodeSent { .. }
        ));
        let code = crate::core::sim::verification_code("A1");
        assert_eq!(
            rig.bridge.check_code("A1", &code).unwrap(),
            CodeCheck::Valid
        );
        // The handler counts a match just after handing the reply over: allow it a moment.
        assert!(eventually(|| rig
            .bridge
            .counters()
            .replies_matched
            .load(Ordering::SeqCst)
            == 5));
        assert_eq!(rig.bridge.in_flight(), 0);
        assert_eq!(rig.coresim.handled(), 5);
    }

    /// Replies held back so later ones overtake them are still matched to their own request.
    #[test]
    fn out_of_order_replies_reach_the_request_they_answer() {
        let Rig {
            _runtime,
            core,
            bridge,
            late: _late,
            ..
        } = rig(
            ServiceFaults {
                reorder_every: 2,
                hold_back: Duration::from_millis(300),
                ..ServiceFaults::default()
            },
            Duration::from_secs(5),
        );
        let (bridge, core) = (Arc::new(bridge), core);
        let before = core.balance(ACCOUNT).unwrap();
        let threads: Vec<_> = (1..=8)
            .map(|i| {
                let (bridge, core) = (bridge.clone(), core.clone());
                std::thread::spawn(move || {
                    let posting = debit(i);
                    let outcome = bridge.post(&posting).unwrap();
                    let PostingOutcome::Posted { core_ref } = outcome else {
                        panic!("{outcome:?}");
                    };
                    // The simulator's reference for this very posting, from its own ledger.
                    assert_eq!(
                        core.query_posting(posting.txn_id).unwrap(),
                        Some(PostingOutcome::Posted { core_ref })
                    );
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(core.balance(ACCOUNT).unwrap(), before - 36);
        assert!(eventually(|| bridge
            .counters()
            .replies_matched
            .load(Ordering::SeqCst)
            == 8));
        assert_eq!(bridge.counters().replies_late.load(Ordering::SeqCst), 0);
    }

    /// A reply after the timeout is late (handed to reconciliation, never to a new caller); a
    /// reply with a bad MAC is dead-lettered; one for nobody is dropped.
    #[test]
    fn late_forged_and_unmatched_replies_are_never_applied() {
        let rig = rig(
            ServiceFaults {
                latency: Duration::from_millis(400),
                ..ServiceFaults::default()
            },
            Duration::from_millis(100),
        );
        let posting = debit(10);
        assert_eq!(rig.bridge.post(&posting), Err(CoreError::Timeout));
        let late = rig.late.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(late.txn_id, posting.txn_id);
        assert!(matches!(late.outcome, PostingOutcome::Posted { .. }));

        let reply = CoreReply::Post {
            txn_id: Uuid::now_v7(),
            outcome: PostingOutcome::Posted {
                core_ref: "FORGED".into(),
            },
        };
        let other_keys = MacKeys::single("k", Zeroizing::new(vec![1u8; 32])).unwrap();
        let correlation = match &reply {
            CoreReply::Post { txn_id, .. } => txn_id.simple().to_string(),
            _ => unreachable!(),
        };
        let forged = Envelope::seal(
            &other_keys,
            reply.message_type(),
            &correlation,
            now_ms(),
            reply.encode(),
        );
        rig.broker
            .inject("reply", RawMessage::from_envelope(&forged, None));
        let unmatched = CoreReply::CheckCode(CodeCheck::Valid);
        let sealed = Envelope::seal(
            &keys(),
            unmatched.message_type(),
            "nobody",
            now_ms(),
            unmatched.encode(),
        );
        rig.broker
            .inject("reply", RawMessage::from_envelope(&sealed, None));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rig.bridge.counters().refused(Refusal::UnknownCorrelation) == 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(rig.bridge.counters().refused(Refusal::BadMac), 1);
        assert_eq!(
            rig.bridge.counters().refused(Refusal::UnknownCorrelation),
            1
        );
        assert_eq!(rig.broker.dead_lettered.load(Ordering::SeqCst), 1);
        assert!(
            rig.late.try_recv().is_err(),
            "nothing forged reached reconciliation"
        );
    }
}
