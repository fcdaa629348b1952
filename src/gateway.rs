//! The institutions' edge: HTTPS in, verification in a fixed order, a bulkhead per
//! institution, the payment flows, a signed answer out.
//!
//! Order of checks for every request (each failure is answered with its documented code and
//! leaves only a `channel_rejection` row): size -> well-formed -> MsgTp matches the path ->
//! institution known and enabled -> SgnSN -> signature over the exact bytes -> send time in
//! window -> MsgId not seen -> envelope opens -> fields valid. Only then do the flows run.
//!
//! Bulkheads: every institution has its own worker threads, bounded queue, database pool,
//! rate limit and circuit breaker toward the core, so a slow or failing institution cannot
//! starve another.
//! Audit log (`[audit]`, docs/audit.md): every request is logged with its exact bytes and every
//! answer before it leaves. On the worker thread: the request is handed to the log as soon as
//! its signature verified (`verified`, before anything acts on it) or when it is refused
//! (`not-verified`, before or at the signature check), then the answer; the handler awaits the
//! answer's fdatasync, which covers the request too (one writer, one order), and only then
//! sends it, while the worker already serves its next request. Refusals at the edge are logged
//! the same way through `spawn_blocking`. If the log fails, nothing is acted on any more and
//! the answer is a signed 9999 with HTTP 500, the one answer that is not in the log.
//! Must never: run a flow for a message whose signature was not verified, block the async
//! runtime on the database, the core or the audit log, send an answer before it is logged, or
//! queue without bound (a full queue answers 9001).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::audit::{
    AuditFailure, AuditSink, Direction, NewRecord, PeerSignature, SubmittedRequest,
};
use crate::channel::codes::ResultCode;
use crate::channel::envelope::MessageKey;
use crate::channel::message::{self, Element};
use crate::config::InstitutionConfig;
use crate::core::{
    BindOutcome, BindRequest, CodeCheck, CoreError, CoreLink, Posting, PostingOutcome, Reversal,
    ReversalOutcome,
};
use crate::crypto::sm2::{CipherOrder, PrivateKey, Verifier};
use crate::db::{self, Pool};
use crate::payment::request::{self, MsgType};
use crate::payment::{Executed, Flows, Reply, journal};

/// Opens its circuit after consecutive core failures and refuses core calls while open.
pub struct CircuitBreaker {
    inner: Arc<dyn CoreLink>,
    threshold: u32,
    open_for: Duration,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl CircuitBreaker {
    pub fn new(inner: Arc<dyn CoreLink>, threshold: u32, open_for: Duration) -> CircuitBreaker {
        CircuitBreaker {
            inner,
            threshold,
            open_for,
            failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
        }
    }

    pub fn is_open(&self) -> bool {
        let guard = self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        guard.is_some_and(|until| Instant::now() < until)
    }

    fn call<T>(
        &self,
        f: impl FnOnce(&dyn CoreLink) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        if self.is_open() {
            return Err(CoreError::Unavailable(
                "circuit open after repeated core failures".into(),
            ));
        }
        let result = f(self.inner.as_ref());
        match &result {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            // The broker is away, not the core: queueing is the designed answer, and an open
            // circuit would turn queued postings into failures.
            Err(CoreError::Queued(_)) => {}
            Err(_) => {
                if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.threshold {
                    *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + self.open_for);
                    self.failures.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        open_for_ms = self.open_for.as_millis() as u64,
                        "core circuit opened"
                    );
                }
            }
        }
        result
    }
}

impl CoreLink for CircuitBreaker {
    fn request_binding(&self, request: &BindRequest) -> Result<BindOutcome, CoreError> {
        self.call(|core| core.request_binding(request))
    }
    fn check_code(&self, agreement_no: &str, code: &str) -> Result<CodeCheck, CoreError> {
        self.call(|core| core.check_code(agreement_no, code))
    }
    fn post(&self, posting: &Posting) -> Result<PostingOutcome, CoreError> {
        self.call(|core| core.post(posting))
    }
    fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError> {
        self.call(|core| core.query_posting(txn_id))
    }
    fn reverse(&self, reversal: &Reversal) -> Result<ReversalOutcome, CoreError> {
        self.call(|core| core.reverse(reversal))
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

/// A request parsed once at the edge (to learn its institution) and handed to a worker.
struct Job {
    msg_type: MsgType,
    raw: Bytes,
    /// `raw[..signed_len]` is what the signature covers.
    signed_len: usize,
    signature: Vec<u8>,
    header: Element,
    body: Element,
    received: DateTime<Utc>,
}

/// Where a worker's answer goes: the handler waiting to send it.
type ReplyTo = tokio::sync::oneshot::Sender<Answered>;

/// A worker's signed answer, handed over once the log holds it and its request (at once
/// without `[audit]`); Err: it could not be logged, so it must not be sent.
struct Answered {
    bytes: Vec<u8>,
    logged: Result<(), AuditFailure>,
}

impl Job {
    fn header(&self, name: &str) -> String {
        self.header.text_of(name).unwrap_or("").trim().to_string()
    }
}

/// A refusal decided at the edge, recorded by one thread on the main pool.
struct EdgeRejection {
    inst_id: Option<String>,
    msg_type: MsgType,
    code: ResultCode,
    detail: String,
    body_sm3: String,
    at: DateTime<Utc>,
}

/// Bound on refusals waiting to be recorded; beyond it a flood's records are dropped (and
/// counted) rather than queued without limit or taken from an institution's bulkhead.
const EDGE_REJECTION_QUEUE: usize = 4096;

fn record_edge_rejections(pool: Pool, queue: Receiver<EdgeRejection>) {
    for rejection in queue {
        let Ok(mut conn) = db::checkout(&pool, Duration::from_secs(2)) else {
            continue;
        };
        if let Err(e) = journal::record_rejection(
            &mut conn,
            &journal::Rejection {
                inst_id: rejection.inst_id.as_deref(),
                path: rejection.msg_type.path(),
                msg_id: None,
                req_serial: None,
                result_code: rejection.code.code(),
                detail: &rejection.detail,
                body_sm3: &rejection.body_sm3,
            },
            rejection.at,
        ) {
            tracing::warn!(error = %e, "recording a rejection failed");
        }
    }
}

/// One institution's bulkhead.
pub struct Institution {
    pub config: InstitutionConfig,
    verifier: Verifier,
    limiter: Limiter,
    queue: SyncSender<(Job, ReplyTo)>,
    pub breaker: Arc<CircuitBreaker>,
    pub pool: Pool,
    /// Group commit of its debit and credit statements (`payment/journal/group.rs`).
    pub journal_group: crate::payment::journal::group::Group,
}

/// What every worker shares.
pub struct Shared {
    pub flows: Flows,
    pub notify: crate::config::NotifyConfig,
    pub encrypt_key: PrivateKey,
    pub encrypt_key_serial: String,
    /// The message log every request and answer goes to (a no-op without `[audit]`).
    pub audit: AuditSink,
}

pub struct ChannelGateway {
    pub institutions: HashMap<String, Arc<Institution>>,
    shared: Arc<Shared>,
    edge_rejections: SyncSender<EdgeRejection>,
    pub metrics: Arc<crate::ops::metrics::Metrics>,
}

/// The institution's journal group counters, registered in /metrics.
fn journal_group_counters(
    metrics: &crate::ops::metrics::Metrics,
    institution: &str,
) -> crate::payment::journal::group::GroupCounters {
    use crate::ops::metrics::JournalGroupLabels;
    use prometheus_client::metrics::{counter::Counter, family::Family};
    let labels = |how: &'static str| JournalGroupLabels {
        institution: institution.to_string(),
        how,
    };
    // One call per statement: get_or_create's guard lives until the end of its statement, and
    // a second call in the same statement would wait for it to create its series.
    let counter = |family: &Family<JournalGroupLabels, Counter>, how| {
        family.get_or_create(&labels(how)).clone()
    };
    let alone = counter(&metrics.journal_statements, "alone");
    let grouped = counter(&metrics.journal_statements, "grouped");
    let groups = counter(&metrics.journal_groups, "committed");
    let rolled_back = counter(&metrics.journal_groups, "rolled_back");
    let commit_failed = counter(&metrics.journal_groups, "commit_failed");
    crate::payment::journal::group::GroupCounters {
        alone,
        grouped,
        groups,
        rolled_back,
        commit_failed,
    }
}

/// Per-institution database settings come from the main pool's settings with the
/// institution's size.
pub fn institution_pool(settings: &db::ConnectSettings, size: u32) -> Result<Pool, db::DbError> {
    let mut settings = settings.clone();
    settings.pool_max_size = size;
    settings.pool_min_idle = size.min(2);
    db::connect(&settings)
}

impl ChannelGateway {
    /// Builds every institution's bulkhead and starts its worker threads.
    /// `public_keys` holds each institution's verification key, read before the privilege drop.
    pub fn start(
        configs: &[InstitutionConfig],
        public_keys: &HashMap<String, crate::crypto::sm2::PublicKey>,
        shared: Shared,
        core: Arc<dyn CoreLink>,
        settings: &db::ConnectSettings,
        main_pool: Pool,
        metrics: Arc<crate::ops::metrics::Metrics>,
    ) -> anyhow::Result<ChannelGateway> {
        let shared = Arc::new(shared);
        // No worker of this process owns a transaction last touched before it started.
        let started = Utc::now();
        let mut institutions = HashMap::new();
        for config in configs {
            let public = public_keys.get(&config.id).ok_or_else(|| {
                anyhow::anyhow!("institutions.{}.sign_public was not loaded", config.id)
            })?;
            let verifier = Verifier::new(public, &config.distinguishing_id).map_err(|e| {
                anyhow::anyhow!("institutions.{}.distinguishing_id: {e}", config.id)
            })?;
            let quota = governor::Quota::per_second(
                NonZeroU32::new(config.rate_limit_per_second).expect("validated >= 1"),
            )
            .allow_burst(NonZeroU32::new(config.rate_limit_burst).expect("validated >= 1"));
            let pool = institution_pool(settings, config.db_pool_size)
                .map_err(|e| anyhow::anyhow!("institution {}: {e}", config.id))?;
            let (queue, jobs) = std::sync::mpsc::sync_channel::<(Job, ReplyTo)>(config.queue_depth);
            let breaker = Arc::new(CircuitBreaker::new(
                core.clone(),
                config.breaker_failure_threshold,
                config.breaker_open_for,
            ));
            let institution = Arc::new(Institution {
                config: config.clone(),
                verifier,
                limiter: governor::RateLimiter::direct(quota),
                queue,
                breaker,
                pool,
                journal_group: crate::payment::journal::group::Group::with_counters(
                    config.journal_group_max,
                    config.journal_group_leaders,
                    journal_group_counters(&metrics, &config.id),
                ),
            });
            let jobs = Arc::new(Mutex::new(jobs));
            for index in 0..config.workers {
                let institution = institution.clone();
                let shared = shared.clone();
                let jobs = jobs.clone();
                std::thread::Builder::new()
                    .name(format!("inst-{}-{index}", config.id))
                    .spawn(move || worker(&institution, &shared, &jobs))?;
            }
            {
                let institution = institution.clone();
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("inst-{}-resolve", config.id))
                    .spawn(move || resolver(&institution, &shared, started))?;
            }
            {
                let institution = institution.clone();
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("inst-{}-notify", config.id))
                    .spawn(move || {
                        crate::notify::run(
                            &institution.config,
                            &shared.flows,
                            &institution.pool,
                            &shared.notify,
                            &shared.audit,
                        )
                    })?;
            }
            institutions.insert(config.id.clone(), institution);
        }
        let (edge_rejections, queue) = std::sync::mpsc::sync_channel(EDGE_REJECTION_QUEUE);
        std::thread::Builder::new()
            .name("edge-rejections".into())
            .spawn(move || record_edge_rejections(main_pool, queue))?;
        Ok(ChannelGateway {
            institutions,
            shared,
            metrics,
            edge_rejections,
        })
    }

    pub fn router(self: Arc<Self>, max_body: usize) -> Router {
        let mut router = Router::new();
        for msg_type in MsgType::ALL {
            router = router.route(msg_type.path(), post(handle));
        }
        router
            // One byte over the limit is enough to know; the handler answers 1004 itself.
            .layer(DefaultBodyLimit::max(max_body + 1))
            .with_state(GatewayState {
                gateway: self,
                max_body,
            })
    }

    /// Answers a request refused before any institution's worker saw it, after logging the
    /// request (not verified) and the answer.
    async fn refuse(
        &self,
        inst: Option<&InstitutionConfig>,
        msg_type: MsgType,
        raw: &Bytes,
        code: ResultCode,
        detail: String,
    ) -> Response {
        let rejection = EdgeRejection {
            inst_id: inst.map(|i| i.id.clone()),
            msg_type,
            code,
            detail: detail.clone(),
            body_sm3: hex::encode(crate::crypto::sm3::digest(raw)),
            at: Utc::now(),
        };
        if self.edge_rejections.try_send(rejection).is_err() {
            self.metrics.channel_rejections_unrecorded.inc();
        }
        // The sender is known only when its institution is configured.
        let peer = inst.map_or_else(|| UNKNOWN_PEER.to_string(), |i| i.id.clone());
        let fallback;
        let inst = match inst {
            Some(inst) => inst,
            None => {
                fallback = anonymous_institution();
                &fallback
            }
        };
        let reply = match self.shared.flows.respond(
            inst,
            msg_type,
            None,
            code,
            Some(&detail),
            &[],
            Utc::now(),
        ) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a rejection");
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        };
        let audit = &self.shared.audit;
        if !audit.is_enabled() {
            return xml_response(reply.bytes);
        }
        // The bytes as received (nothing for a body over the limit: it was not read whole).
        let request = NewRecord {
            direction: Direction::In,
            peer: peer.clone(),
            message_type: msg_type.name().to_string(),
            txn_id: None,
            peer_signature: PeerSignature::NotVerified,
            bytes: if code == ResultCode::MessageTooLarge {
                Vec::new()
            } else {
                raw.to_vec()
            },
        };
        let answer = answer_record(peer, msg_type, &reply.bytes);
        let sink = audit.clone();
        // The appends wait for the disk: off the runtime. Bounded by the channel's connection
        // limit (one request in flight per connection) and the log's queue bound.
        let logged = tokio::task::spawn_blocking(move || {
            let request = sink.submit(request);
            sink.append(answer).and(request.wait())
        })
        .await;
        match logged {
            Ok(Ok(_)) => xml_response(reply.bytes),
            _ => self.unlogged(inst, msg_type),
        }
    }

    /// The answer when the log could not take a request's records: a signed 9999 with HTTP
    /// 500, the one answer that is not in the log (the sink said why, once).
    fn unlogged(&self, inst: &InstitutionConfig, msg_type: MsgType) -> Response {
        let failed = internal(&self.shared.flows, inst, msg_type);
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            xml_response(failed.bytes),
        )
            .into_response()
    }
}

/// The peer of a request whose sender is not a configured institution.
const UNKNOWN_PEER: &str = "unknown";

/// An answer as logged: outbound, with the transaction it is about when it names one.
fn answer_record(peer: String, msg_type: MsgType, bytes: &[u8]) -> NewRecord {
    NewRecord {
        direction: Direction::Out,
        peer,
        message_type: msg_type.response_name(),
        txn_id: answered_txn_id(msg_type, bytes),
        peer_signature: PeerSignature::None,
        bytes: bytes.to_vec(),
    }
}

/// The `<TxnId>` our own answer carries (debit, credit, refund, query); a range query lists
/// many, so none.
fn answered_txn_id(msg_type: MsgType, bytes: &[u8]) -> Option<Uuid> {
    if msg_type == MsgType::QueryRange {
        return None;
    }
    const OPEN: &[u8] = b"<TxnId>";
    let start = bytes.windows(OPEN.len()).position(|w| w == OPEN)? + OPEN.len();
    let rest = &bytes[start..];
    let end = rest.iter().position(|&b| b == b'<')?;
    Uuid::try_parse_ascii(&rest[..end]).ok()
}

/// For answering a sender we do not know: sign in the default DER form.
fn anonymous_institution() -> InstitutionConfig {
    InstitutionConfig {
        id: "UNKNOWN".into(),
        name: "unknown".into(),
        enabled: false,
        sign_public: Default::default(),
        sign_key_serial: String::new(),
        distinguishing_id: crate::crypto::sm2::DEFAULT_DISTID.into(),
        signature_format: crate::crypto::sm2::SignatureFormat::Der,
        cipher_order: CipherOrder::C1C3C2,
        send_time_window: Duration::ZERO,
        single_limit_fen: 1,
        daily_limit_fen: 1,
        callback_url: None,
        workers: 1,
        queue_depth: 1,
        db_pool_size: 1,
        journal_group_max: 1,
        journal_group_leaders: 1,
        rate_limit_per_second: 1,
        rate_limit_burst: 1,
        breaker_failure_threshold: 1,
        breaker_open_for: Duration::from_secs(1),
        risk_budget: None,
        risk_fail_open: None,
    }
}

#[derive(Clone)]
struct GatewayState {
    gateway: Arc<ChannelGateway>,
    max_body: usize,
}

fn xml_response(bytes: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        bytes,
    )
        .into_response()
}

async fn handle(
    State(state): State<GatewayState>,
    uri: Uri,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let gateway = &state.gateway;
    let msg_type = MsgType::from_path(uri.path()).expect("routes exist only for message types");
    let body = match body {
        Ok(body) if body.len() <= state.max_body => body,
        Ok(body) => {
            return gateway
                .refuse(
                    None,
                    msg_type,
                    &body,
                    ResultCode::MessageTooLarge,
                    format!("the limit is {} bytes", state.max_body),
                )
                .await;
        }
        Err(_) => {
            return gateway
                .refuse(
                    None,
                    msg_type,
                    &Bytes::new(),
                    ResultCode::MessageTooLarge,
                    format!("the limit is {} bytes", state.max_body),
                )
                .await;
        }
    };
    let (signed_len, signature, header, body_element) = match message::parse(&body) {
        Ok(message) => (
            message.signed.len(),
            message.signature,
            message.header,
            message.body,
        ),
        Err(e) => {
            return gateway
                .refuse(
                    None,
                    msg_type,
                    &body,
                    ResultCode::MalformedMessage,
                    e.to_string(),
                )
                .await;
        }
    };
    let sender = header.text_of("SndInstId").unwrap_or("").to_string();
    let Some(institution) = gateway.institutions.get(&sender) else {
        return gateway
            .refuse(
                None,
                msg_type,
                &body,
                ResultCode::UnknownInstitution,
                format!(
                    "SndInstId {:?} is not configured",
                    sender.chars().take(32).collect::<String>()
                ),
            )
            .await;
    };
    if institution.limiter.check().is_err() {
        return gateway
            .refuse(
                Some(&institution.config),
                msg_type,
                &body,
                ResultCode::SystemBusy,
                "rate limit reached".into(),
            )
            .await;
    }
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let job = Job {
        msg_type,
        raw: body.clone(),
        signed_len,
        signature,
        header,
        body: body_element,
        received: Utc::now(),
    };
    let refusal = match institution.queue.try_send((job, reply_tx)) {
        // Handed over only once the log holds it (and the request before it).
        Ok(()) => match reply_rx.await {
            Ok(Answered {
                bytes,
                logged: Ok(()),
            }) => return xml_response(bytes),
            Ok(Answered { logged: Err(_), .. }) => {
                return gateway.unlogged(&institution.config, msg_type);
            }
            Err(_) => (ResultCode::InternalError, "the worker failed"),
        },
        Err(TrySendError::Full(_)) => (ResultCode::SystemBusy, "queue full"),
        Err(TrySendError::Disconnected(_)) => (ResultCode::InternalError, "workers stopped"),
    };
    gateway
        .refuse(
            Some(&institution.config),
            msg_type,
            &body,
            refusal.0,
            refusal.1.into(),
        )
        .await
}

/// How long a transaction may sit in SENT_TO_CORE before the resolver treats its worker as gone.
pub const STALE_SENT_TO_CORE: Duration = Duration::from_secs(60);
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
const RESOLVE_BATCH: i64 = 100;

/// Settles this institution's transactions without a recorded outcome (after a crash, or a
/// core timeout nobody queried) and drives its reversals, through the institution's own pool
/// and circuit breaker.
fn resolver(institution: &Institution, shared: &Shared, started: chrono::DateTime<Utc>) {
    let mut pause = RESOLVE_EVERY;
    loop {
        std::thread::sleep(pause);
        pause = RESOLVE_EVERY;
        let Ok(mut conn) = db::checkout(&institution.pool, Duration::from_secs(5)) else {
            continue;
        };
        // SENT_TO_CORE older than a live worker ever takes, or from before this process
        // started (a crash): nobody will record its outcome, the resolver must.
        let now = Utc::now();
        let stale = (now - started).min(
            chrono::Duration::from_std(STALE_SENT_TO_CORE).unwrap_or(chrono::Duration::minutes(1)),
        );
        match shared.flows.resolve_unrecorded(
            &mut conn,
            institution.breaker.as_ref(),
            &institution.config.id,
            stale,
            RESOLVE_BATCH,
            now,
        ) {
            Ok(resolved) if resolved.looked_at == 0 => {}
            Ok(resolved) => {
                tracing::info!(
                    institution = %institution.config.id,
                    looked_at = resolved.looked_at,
                    settled = resolved.settled,
                    "resolved transactions without a recorded outcome"
                );
                // A full batch that made progress: a backlog is draining (after a broker
                // outage), so go on at once rather than at the resolver's pace.
                if resolved.looked_at as i64 == RESOLVE_BATCH && resolved.settled > 0 {
                    pause = Duration::ZERO;
                }
            }
            Err(e) => {
                tracing::warn!(institution = %institution.config.id, error = %e, "resolving unrecorded transactions failed")
            }
        }
        match shared.flows.send_approved(
            &mut conn,
            institution.breaker.as_ref(),
            &institution.config,
            RESOLVE_BATCH,
            Utc::now(),
        ) {
            Ok(0) => {}
            Ok(sent) => tracing::info!(
                institution = %institution.config.id,
                sent,
                "sent transactions approved after review to the core"
            ),
            Err(e) => {
                tracing::warn!(institution = %institution.config.id, error = %e, "sending approved transactions failed")
            }
        }
        match shared.flows.drive_reversals(
            &mut conn,
            institution.breaker.as_ref(),
            &institution.config.id,
            RESOLVE_BATCH,
            Utc::now(),
        ) {
            Ok(driven) if driven.looked_at == 0 => {}
            Ok(driven) => tracing::info!(
                institution = %institution.config.id,
                looked_at = driven.looked_at,
                finished = driven.finished,
                "drove reversals"
            ),
            Err(e) => {
                tracing::warn!(institution = %institution.config.id, error = %e, "driving reversals failed")
            }
        }
    }
}

fn worker(institution: &Institution, shared: &Shared, jobs: &Mutex<Receiver<(Job, ReplyTo)>>) {
    loop {
        let (job, reply_to) = {
            let receiver = jobs.lock().unwrap_or_else(|p| p.into_inner());
            match receiver.recv() {
                Ok(queued) => queued,
                Err(_) => return,
            }
        };
        serve(institution, shared, &job, reply_to);
    }
}

/// The request's record, handed to the log once the request is verified or refused.
struct RequestLog<'a> {
    audit: &'a AuditSink,
    inst_id: &'a str,
    job: &'a Job,
    request: Option<SubmittedRequest>,
}

impl RequestLog<'_> {
    fn record(&self, peer_signature: PeerSignature) -> NewRecord {
        NewRecord {
            direction: Direction::In,
            peer: self.inst_id.to_string(),
            message_type: self.job.msg_type.name().to_string(),
            txn_id: None,
            peer_signature,
            bytes: self.job.raw.to_vec(),
        }
    }

    /// The signature verified: log the request before anything acts on it. False when the
    /// log has failed, so nothing may act on it.
    fn verified(&mut self) -> bool {
        if self.audit.is_enabled() {
            self.request = Some(
                self.audit
                    .submit_request(self.record(PeerSignature::Verified)),
            );
        }
        !self.audit.is_failed()
    }

    /// Hands the answer to the log (and the request, as refused, if it was not logged as
    /// verified); the log hands it to the handler once both are durable.
    fn answer(mut self, reply: Reply, reply_to: ReplyTo) {
        let record = self
            .audit
            .is_enabled()
            .then(|| answer_record(self.inst_id.to_string(), self.job.msg_type, &reply.bytes));
        let hand_over = move |logged| {
            // A handler that gave up (its client went away) is gone; nothing to tell it.
            let _ = reply_to.send(Answered {
                bytes: reply.bytes,
                logged,
            });
        };
        let Some(answer) = record else {
            hand_over(Ok(()));
            return;
        };
        let request = match self.request.take() {
            Some(request) => request,
            None => self
                .audit
                .submit_request(self.record(PeerSignature::NotVerified)),
        };
        self.audit.submit_answer(request, answer, hand_over);
    }
}

/// One request on a worker: verification and the flow; the answer is handed to the log here,
/// which hands it to the handler once it is on disk. The worker does not wait: it takes its
/// next request while the fdatasync runs (the worker pool, with its database connections, is
/// what bounds an institution's throughput).
fn serve(institution: &Institution, shared: &Shared, job: &Job, reply_to: ReplyTo) {
    let mut log = RequestLog {
        audit: &shared.audit,
        inst_id: &institution.config.id,
        job,
        request: None,
    };
    let reply = process(institution, shared, job, &mut log);
    log.answer(reply, reply_to);
}

/// The verification steps and the flow, on an institution's worker thread.
fn process(
    institution: &Institution,
    shared: &Shared,
    job: &Job,
    log: &mut RequestLog<'_>,
) -> Reply {
    let inst = &institution.config;
    let flows = &shared.flows;
    let now = job.received;
    let mut conn = match db::checkout(&institution.pool, Duration::from_secs(5)) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::error!(institution = %inst.id, error = %e, "no database connection");
            return internal(flows, inst, job.msg_type);
        }
    };
    let header = |name: &str| job.header(name);
    let msg_id = header("MsgId");
    let fail = |conn: &mut db::PooledConnection, code: ResultCode, detail: String| {
        reject(conn, flows, inst, job, code, detail)
    };
    if header("MsgTp") != job.msg_type.name() {
        return fail(
            &mut conn,
            ResultCode::WrongMessageType,
            format!(
                "MsgTp {:?} posted to {}, which takes {}",
                header("MsgTp"),
                job.msg_type.path(),
                job.msg_type.name()
            ),
        );
    }
    if !inst.enabled {
        return fail(
            &mut conn,
            ResultCode::InstitutionDisabled,
            format!("institution {} is disabled", inst.id),
        );
    }
    if header("SgnSN") != inst.sign_key_serial {
        return fail(
            &mut conn,
            ResultCode::UnknownSignKeySerial,
            format!("SgnSN {:?} is not the configured serial", header("SgnSN")),
        );
    }
    if let Err(e) = institution.verifier.verify(
        &job.raw[..job.signed_len],
        &job.signature,
        inst.signature_format,
    ) {
        return fail(&mut conn, ResultCode::BadSignature, e.to_string());
    }
    // From here on the message is authentic: its content may be trusted to mean what it says.
    // It is logged before anything acts on it; with the log failed nothing may.
    if !log.verified() {
        return internal(flows, inst, job.msg_type);
    }
    let sent = match request::time(&header("SndDtTm"), "SndDtTm") {
        Ok(sent) => sent.with_timezone(&Utc),
        Err(e) => return fail(&mut conn, e.code, e.detail),
    };
    let skew = (now - sent).abs();
    if skew > chrono::Duration::from_std(inst.send_time_window).unwrap_or(chrono::Duration::MAX) {
        return fail(
            &mut conn,
            ResultCode::SendTimeOutsideWindow,
            format!(
                "SndDtTm is {}s away from our clock; the window is {}s",
                skew.num_seconds(),
                inst.send_time_window.as_secs()
            ),
        );
    }
    if msg_id.is_empty() || msg_id.len() > 64 {
        return fail(
            &mut conn,
            ResultCode::InvalidField,
            "<MsgId> must be 1-64 characters".into(),
        );
    }
    // A refusal after this point still spends the message id: a replay is refused as one.
    let refuse_after_remembering = |conn: &mut db::PooledConnection,
                                    code: ResultCode,
                                    detail: String| {
        match journal::remember_message(conn, &inst.id, &msg_id, now) {
            Ok(true) => fail(conn, code, detail),
            Ok(false) => fail(
                conn,
                ResultCode::DuplicateMessageId,
                format!("MsgId {msg_id} was used before"),
            ),
            Err(e) => {
                tracing::error!(institution = %inst.id, error = %e, "recording the message id failed");
                internal(flows, inst, job.msg_type)
            }
        }
    };
    let envelope = header("DgtlEnvlp");
    let key = if envelope.is_empty() {
        None
    } else {
        if header("EncSN") != shared.encrypt_key_serial {
            return refuse_after_remembering(
                &mut conn,
                ResultCode::EnvelopeInvalid,
                format!(
                    "EncSN {:?} is not our encryption key's serial",
                    header("EncSN")
                ),
            );
        }
        match MessageKey::open(&envelope, &shared.encrypt_key, inst.cipher_order) {
            Ok(key) => Some(key),
            Err(e) => {
                return refuse_after_remembering(
                    &mut conn,
                    ResultCode::EnvelopeInvalid,
                    e.to_string(),
                );
            }
        }
    };
    let (parsed, fields) = match request::parse(job.msg_type, &job.body, key.as_ref()) {
        Ok(ok) => ok,
        Err(e) => return refuse_after_remembering(&mut conn, e.code, e.detail),
    };
    let digests = flows.field_digests(&fields);
    match flows.execute(
        &mut conn,
        &institution.journal_group,
        institution.breaker.as_ref(),
        inst,
        job.msg_type,
        &msg_id,
        parsed,
        &digests,
        now,
    ) {
        Ok(Executed::Replay) => fail(
            &mut conn,
            ResultCode::DuplicateMessageId,
            format!("MsgId {msg_id} was used before"),
        ),
        Ok(Executed::Answered(reply)) => reply,
        Err(e) => {
            tracing::error!(institution = %inst.id, msg_id = %msg_id, error = %e, "flow failed");
            internal(flows, inst, job.msg_type)
        }
    }
}

fn reject(
    conn: &mut db::PooledConnection,
    flows: &Flows,
    inst: &InstitutionConfig,
    job: &Job,
    code: ResultCode,
    detail: String,
) -> Reply {
    let text = |name: &str| {
        job.header
            .text_of(name)
            .or_else(|| job.body.text_of(name))
            .map(str::to_string)
    };
    let digest = hex::encode(crate::crypto::sm3::digest(&job.raw));
    if let Err(e) = journal::record_rejection(
        conn,
        &journal::Rejection {
            inst_id: Some(&inst.id),
            path: job.msg_type.path(),
            msg_id: text("MsgId").as_deref(),
            req_serial: text("ReqSerial").as_deref(),
            result_code: code.code(),
            detail: &detail,
            body_sm3: &digest,
        },
        job.received,
    ) {
        tracing::error!(institution = %inst.id, error = %e, "recording a rejection failed");
    }
    tracing::info!(institution = %inst.id, code = code.code(), detail = %detail, "request rejected");
    match flows.respond(
        inst,
        job.msg_type,
        text("ReqSerial").as_deref(),
        code,
        Some(&detail),
        &[],
        Utc::now(),
    ) {
        Ok(reply) => reply,
        Err(_) => internal(flows, inst, job.msg_type),
    }
}

fn internal(flows: &Flows, inst: &InstitutionConfig, msg_type: MsgType) -> Reply {
    flows
        .respond(
            inst,
            msg_type,
            None,
            ResultCode::InternalError,
            None,
            &[],
            Utc::now(),
        )
        .unwrap_or(Reply {
            bytes: b"internal error".to_vec(),
            code: ResultCode::InternalError,
        })
}

/// Reads every institution's public key (while still privileged).
pub fn load_institution_keys(
    configs: &[InstitutionConfig],
) -> anyhow::Result<HashMap<String, crate::crypto::sm2::PublicKey>> {
    configs
        .iter()
        .map(|config| {
            crate::crypto::keyfile::load_public_key(&config.sign_public)
                .map(|key| (config.id.clone(), key))
                .map_err(|e| anyhow::anyhow!("institutions.{}.sign_public: {e}", config.id))
        })
        .collect()
}

/// TLS 1.2+ with the configured certificate chain and key.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<openssl::ssl::SslAcceptor> {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    builder
        .set_certificate_chain_file(cert)
        .map_err(|e| anyhow::anyhow!("channel.tls_cert {}: {e}", cert.display()))?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .map_err(|e| anyhow::anyhow!("channel.tls_key {}: {e}", key.display()))?;
    builder
        .check_private_key()
        .map_err(|e| anyhow::anyhow!("channel.tls_key does not match channel.tls_cert: {e}"))?;
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sim::{CoreSimulator, Faults};
    use crate::core::{PostingKind, Rejection};

    /// Counts the calls that reach the core.
    struct Counting {
        core: Arc<CoreSimulator>,
        calls: AtomicU32,
    }

    impl CoreLink for Counting {
        fn request_binding(&self, request: &BindRequest) -> Result<BindOutcome, CoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.core.request_binding(request)
        }
        fn check_code(&self, agreement_no: &str, code: &str) -> Result<CodeCheck, CoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.core.check_code(agreement_no, code)
        }
        fn post(&self, posting: &Posting) -> Result<PostingOutcome, CoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.core.post(posting)
        }
        fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.core.query_posting(txn_id)
        }
        fn reverse(&self, reversal: &Reversal) -> Result<ReversalOutcome, CoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.core.reverse(reversal)
        }
    }

    fn debit(account_no: &str) -> Posting {
        Posting {
            txn_id: Uuid::now_v7(),
            kind: PostingKind::Debit,
            account_no: account_no.into(),
            amount_fen: 100,
        }
    }

    #[test]
    fn the_breaker_opens_on_repeated_failures_spares_the_core_and_closes_again() {
        let core = Arc::new(CoreSimulator::with_demo_accounts());
        let counting = Arc::new(Counting {
            core: core.clone(),
            calls: AtomicU32::new(0),
        });
        let breaker = CircuitBreaker::new(counting.clone(), 3, Duration::from_millis(300));
        core.set_faults(Faults {
            unavailable: true,
            ..Faults::default()
        });
        for _ in 0..3 {
            assert!(matches!(
                breaker.post(&debit("6222021234567890123")),
                Err(CoreError::Unavailable(_))
            ));
        }
        assert!(breaker.is_open(), "three failures in a row open it");
        assert_eq!(counting.calls.load(Ordering::SeqCst), 3);
        // While open, nothing reaches the core: a failing core is not hammered further.
        for _ in 0..10 {
            match breaker.post(&debit("6222021234567890123")) {
                Err(CoreError::Unavailable(why)) => assert!(why.contains("circuit open"), "{why}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(counting.calls.load(Ordering::SeqCst), 3);
        // The core recovers; after open_for the next call goes through and closes the circuit.
        core.set_faults(Faults::default());
        std::thread::sleep(Duration::from_millis(350));
        assert!(!breaker.is_open());
        assert!(matches!(
            breaker.post(&debit("6222021234567890123")),
            Ok(PostingOutcome::Posted { .. })
        ));
        assert_eq!(counting.calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn business_rejections_and_interleaved_successes_do_not_open_the_breaker() {
        let core = Arc::new(CoreSimulator::with_demo_accounts());
        let breaker = CircuitBreaker::new(core.clone(), 2, Duration::from_secs(60));
        // An overdraft is the core answering, not the core failing.
        for _ in 0..5 {
            assert!(matches!(
                breaker.post(&debit("6217001234567890149")),
                Ok(PostingOutcome::Rejected(Rejection::InsufficientFunds))
            ));
        }
        assert!(!breaker.is_open());
        // failure, success, failure: never two in a row.
        for _ in 0..3 {
            core.set_faults(Faults {
                unavailable: true,
                ..Faults::default()
            });
            assert!(breaker.post(&debit("6222021234567890123")).is_err());
            core.set_faults(Faults::default());
            assert!(breaker.post(&debit("6222021234567890123")).is_ok());
        }
        assert!(!breaker.is_open());
    }
}
