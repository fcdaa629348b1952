//! The ops listener: what F5, Prometheus, systemd and operators ask the node.
//!
//! Owns: the node's operational state (role, ready, draining, heartbeat) and the endpoints that
//! expose it with Patroni's semantics: `/primary` 200 only on the active node, `/standby` (alias
//! `/replica`) 200 only on a healthy standby, `/health`, `/liveness`, `/readiness`, `/metrics`,
//! and `/status` for `kunpayctl status`.
//! Must never: serve business traffic, answer 200 on `/primary` from a node that is draining,
//! not ready or cannot reach its database, or block longer than `ops.health_timeout` on the
//! database.

pub mod metrics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::db::Pool;
use metrics::{Metrics, RoleLabels};

/// Everything the ops endpoints report, shared with the lifecycle that changes it.
pub struct NodeState {
    pub node_id: String,
    role: AtomicU8,
    ready: AtomicBool,
    draining: AtomicBool,
    /// The core link's outbox is over `core.amqp.max_queued`: F5 must stop sending.
    outbox_full: AtomicBool,
    /// The audit log stopped (an append failed): nothing can be answered as logged, so F5 must
    /// stop sending until the node is restarted with a working log directory.
    audit_failed: AtomicBool,
    /// A standby's copy is unhealthy (CDC failing) or beyond `ha.max_lag`: /standby says 503.
    standby_unfit: AtomicBool,
    /// A planned cutover asked this active node to drain: business requests and /primary get
    /// 503 until the cutover fences the database (or withdraws the request).
    handing_over: AtomicBool,
    /// Business requests admitted by [`business_gate`] and not yet answered.
    business_in_flight: AtomicUsize,
    heartbeat_unix_ms: AtomicU64,
    health_timeout_ms: AtomicU64,
    liveness_ttl_ms: AtomicU64,
    run_id: AtomicI64,
    started: Instant,
    pool: Pool,
    pub metrics: Arc<Metrics>,
}

fn role_code(role: Role) -> u8 {
    match role {
        Role::Active => 1,
        Role::Standby => 2,
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl NodeState {
    pub fn new(
        node_id: String,
        role: Role,
        pool: Pool,
        health_timeout: Duration,
        liveness_ttl: Duration,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(&node_id));
        metrics
            .start_time_seconds
            .set(now_unix_ms() as f64 / 1000.0);
        let state = Arc::new(NodeState {
            node_id,
            role: AtomicU8::new(role_code(role)),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            outbox_full: AtomicBool::new(false),
            audit_failed: AtomicBool::new(false),
            standby_unfit: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            business_in_flight: AtomicUsize::new(0),
            heartbeat_unix_ms: AtomicU64::new(now_unix_ms()),
            health_timeout_ms: AtomicU64::new(health_timeout.as_millis() as u64),
            liveness_ttl_ms: AtomicU64::new(liveness_ttl.as_millis() as u64),
            run_id: AtomicI64::new(0),
            started: Instant::now(),
            pool,
            metrics,
        });
        state.publish_role(role);
        state
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::SeqCst) {
            1 => Role::Active,
            _ => Role::Standby,
        }
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role_code(role), Ordering::SeqCst);
        self.publish_role(role);
    }

    fn publish_role(&self, role: Role) {
        for candidate in [Role::Active, Role::Standby] {
            let label = RoleLabels {
                role: if candidate == Role::Active {
                    "active"
                } else {
                    "standby"
                },
            };
            self.metrics
                .role
                .get_or_create(&label)
                .set(i64::from(candidate == role));
        }
    }

    pub fn set_timeouts(&self, health_timeout: Duration, liveness_ttl: Duration) {
        self.health_timeout_ms
            .store(health_timeout.as_millis() as u64, Ordering::SeqCst);
        self.liveness_ttl_ms
            .store(liveness_ttl.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_run_id(&self, run_id: i64) {
        assert!(run_id > 0, "run ids come from a BIGSERIAL");
        self.run_id.store(run_id, Ordering::SeqCst);
    }

    pub fn run_id(&self) -> i64 {
        self.run_id.load(Ordering::SeqCst)
    }

    pub fn mark_ready(&self) {
        assert!(self.run_id() > 0, "ready before the run was recorded");
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.draining.set(1);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set_outbox_full(&self, full: bool) {
        self.outbox_full.store(full, Ordering::SeqCst);
    }

    pub fn is_outbox_full(&self) -> bool {
        self.outbox_full.load(Ordering::SeqCst)
    }

    /// Set once, when the audit log fails; only a restart clears it.
    pub fn set_audit_failed(&self) {
        self.audit_failed.store(true, Ordering::SeqCst);
    }

    pub fn is_audit_failed(&self) -> bool {
        self.audit_failed.load(Ordering::SeqCst)
    }

    /// Whether something besides draining keeps business traffic away (outbox, audit log,
    /// a cutover's drain).
    fn refuses_traffic(&self) -> bool {
        self.is_outbox_full() || self.is_audit_failed() || self.is_handing_over()
    }

    /// A planned cutover's drain begins: from now on [`business_gate`] refuses new requests.
    pub fn begin_handover(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
    }

    /// The cutover was withdrawn before the fence: serve again.
    pub fn end_handover(&self) {
        self.handing_over.store(false, Ordering::SeqCst);
    }

    pub fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }

    /// Business requests admitted and not yet answered. Zero after [`begin_handover`] means
    /// zero for good: every later request is refused at the gate.
    pub fn business_in_flight(&self) -> usize {
        self.business_in_flight.load(Ordering::SeqCst)
    }

    /// Whether a business request may enter now: the active node, not stopping, not handing
    /// over. (Outbox and audit refusals are answered by the gateway itself, with result codes.)
    fn takes_business(&self) -> bool {
        self.role() == Role::Active && !self.is_draining() && !self.is_handing_over()
    }

    /// Counts a business request in, unless the node does not take business now. The count is
    /// raised before the second look, so a drain that sets its flag and then sees zero in
    /// flight can never miss a request that got past the first look.
    fn admit_business(&self) -> Option<BusinessTicket<'_>> {
        if !self.takes_business() {
            return None;
        }
        self.business_in_flight.fetch_add(1, Ordering::SeqCst);
        let ticket = BusinessTicket(self);
        self.takes_business().then_some(ticket)
    }

    /// Set by the CDC applier after each batch: false while it fails or lags beyond the bound.
    pub fn set_standby_fit(&self, fit: bool) {
        self.standby_unfit.store(!fit, Ordering::SeqCst);
    }

    pub fn is_standby_fit(&self) -> bool {
        !self.standby_unfit.load(Ordering::SeqCst)
    }

    pub fn beat(&self) {
        self.heartbeat_unix_ms
            .store(now_unix_ms(), Ordering::SeqCst);
        let state = self.pool.state();
        self.metrics
            .db_pool_connections
            .set(i64::from(state.connections));
        self.metrics
            .db_pool_idle
            .set(i64::from(state.idle_connections));
    }

    pub fn heartbeat_age(&self) -> Duration {
        Duration::from_millis(
            now_unix_ms().saturating_sub(self.heartbeat_unix_ms.load(Ordering::SeqCst)),
        )
    }

    fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms.load(Ordering::SeqCst))
    }

    /// Probes the database off the async threads, bounded by `ops.health_timeout`.
    pub async fn database_up(self: &Arc<Self>) -> bool {
        let run_id = self.run_id();
        if run_id == 0 {
            return false;
        }
        let timeout = self.health_timeout();
        let pool = self.pool.clone();
        let started = Instant::now();
        let probe = tokio::task::spawn_blocking(move || crate::db::probe(&pool, run_id, timeout));
        // The probe bounds itself; the extra second only guards against a wedged blocking pool.
        let up = match tokio::time::timeout(timeout + Duration::from_secs(1), probe).await {
            Ok(Ok(Ok(()))) => true,
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "database health probe failed");
                false
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "database health probe timed out"
                );
                false
            }
        };
        self.metrics
            .db_probe_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .db_probe
            .get_or_create(&metrics::ResultLabels {
                result: if up { "up" } else { "down" },
            })
            .inc();
        up
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The body of every health endpoint, in the spirit of Patroni's JSON.
/// One admitted business request; dropping it (the answer left, or the client went away)
/// counts it out.
struct BusinessTicket<'a>(&'a NodeState);

impl Drop for BusinessTicket<'_> {
    fn drop(&mut self) {
        let before = self.0.business_in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "a business request counted out twice");
    }
}

/// Middleware in front of every business route: a standby, a node handing over to its
/// standby, or a node stopping answers 503 at once (F5 retries on the active node), so no
/// business request ever starts on a node that must not write.
pub async fn business_gate(
    State(state): State<Arc<NodeState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.admit_business() {
        Some(ticket) => {
            let response = next.run(request).await;
            drop(ticket);
            response
        }
        None => {
            let why = if state.role() != Role::Active {
                "this node is the standby"
            } else if state.is_handing_over() {
                "this node is handing over to its standby (planned cutover)"
            } else {
                "this node is stopping"
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                format!("kunpay: {why}; business requests go to the active node\n"),
            )
                .into_response()
        }
    }
}

/// The channel listener of a node that does not take business: every request gets the gate's
/// 503, whatever its path.
pub fn standby_channel_router(state: Arc<NodeState>) -> Router {
    Router::new()
        .fallback(|| async { StatusCode::SERVICE_UNAVAILABLE })
        .layer(axum::middleware::from_fn_with_state(state, business_gate))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub role: String,
    pub state: String,
    pub database: String,
    pub version: String,
    pub run_id: i64,
    pub uptime_seconds: u64,
    pub heartbeat_age_ms: u64,
    pub pid: u32,
}

impl NodeReport {
    fn new(state: &NodeState, database_up: Option<bool>) -> NodeReport {
        NodeReport {
            node: state.node_id.clone(),
            role: state.role().to_string(),
            state: if state.is_draining() {
                "draining"
            } else if state.is_handing_over() {
                "handing over"
            } else if state.is_audit_failed() {
                "audit log failed"
            } else if state.is_outbox_full() {
                "core outbox full"
            } else if state.is_ready() {
                "running"
            } else {
                "starting"
            }
            .to_string(),
            database: match database_up {
                Some(true) => "up",
                Some(false) => "down",
                None => "not checked",
            }
            .to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            run_id: state.run_id(),
            uptime_seconds: state.uptime().as_secs(),
            heartbeat_age_ms: state.heartbeat_age().as_millis() as u64,
            pid: std::process::id(),
        }
    }
}

fn answer(ok: bool, report: NodeReport) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn primary(State(state): State<Arc<NodeState>>) -> Response {
    let serving = state.role() == Role::Active
        && state.is_ready()
        && !state.is_draining()
        && !state.refuses_traffic();
    let database_up = if serving {
        Some(state.database_up().await)
    } else {
        None
    };
    answer(
        serving && database_up == Some(true),
        NodeReport::new(&state, database_up),
    )
}

async fn standby(State(state): State<Arc<NodeState>>) -> Response {
    let candidate = state.role() == Role::Standby
        && state.is_ready()
        && !state.is_draining()
        && state.is_standby_fit();
    let database_up = if candidate {
        Some(state.database_up().await)
    } else {
        None
    };
    answer(
        candidate && database_up == Some(true),
        NodeReport::new(&state, database_up),
    )
}

async fn health(State(state): State<Arc<NodeState>>) -> Response {
    let database_up = state.database_up().await;
    answer(database_up, NodeReport::new(&state, Some(database_up)))
}

async fn liveness(State(state): State<Arc<NodeState>>) -> Response {
    let ttl = Duration::from_millis(state.liveness_ttl_ms.load(Ordering::SeqCst));
    answer(state.heartbeat_age() <= ttl, NodeReport::new(&state, None))
}

async fn readiness(State(state): State<Arc<NodeState>>) -> Response {
    let ready = state.is_ready() && !state.is_draining() && !state.refuses_traffic();
    let database_up = if ready {
        Some(state.database_up().await)
    } else {
        None
    };
    answer(
        ready && database_up == Some(true),
        NodeReport::new(&state, database_up),
    )
}

async fn status(State(state): State<Arc<NodeState>>) -> Response {
    let database_up = state.database_up().await;
    answer(true, NodeReport::new(&state, Some(database_up)))
}

async fn metrics_text(State(state): State<Arc<NodeState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/", get(primary))
        .route("/primary", get(primary))
        .route("/read-write", get(primary))
        .route("/standby", get(standby))
        .route("/replica", get(standby))
        .route("/health", get(health))
        .route("/liveness", get(liveness))
        .route("/readiness", get(readiness))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}
