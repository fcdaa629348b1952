//! Prometheus metrics: the registry and every metric kunpay exports on `/metrics`.
//!
//! Owns: metric names, help texts and label sets (labels are bounded enums or configured ids,
//! never request data, so the series count stays bounded).
//! Must never: put a card number, an amount or any request field into a label.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Request durations in seconds: fine around the figures we are held to (the seed's 40-45 ms
/// average, our 20 ms p99 bar), so that quantiles interpolated from them are close.
const REQUEST_DURATION_BUCKETS: [f64; 22] = [
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025,
    0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0,
];
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: &'static str,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoreRequestLabels {
    pub request: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JournalGroupLabels {
    pub institution: String,
    pub how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_in_flight: Family<ListenerLabels, Gauge>,
    /// Channel refusals decided at the edge whose record was dropped because the recorder's
    /// bounded queue was full (a flood); the answers were still sent.
    pub channel_rejections_unrecorded: Counter,
    pub http_duration: Family<ListenerLabels, Histogram>,
    pub db_probe: Family<ResultLabels, Counter>,
    pub db_probe_duration: Histogram,
    pub db_pool_connections: Gauge,
    pub db_pool_idle: Gauge,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub role: Family<RoleLabels, Gauge>,
    pub draining: Gauge,
    pub start_time_seconds: Gauge<f64, AtomicU64>,
    /// Postings whose core answer is owed (`core_pending`): in flight plus backlog.
    pub core_outbox_depth: Gauge,
    /// 1 while the MQ bridge is connected to its broker.
    pub core_link_connected: Gauge,
    /// Replies received on the core link by verdict (`result`: matched, late, or why refused).
    pub core_replies: Family<ResultLabels, Counter>,
    /// Debit and credit journal statements by how they committed (`how`: alone, grouped), and
    /// journal groups by outcome (`how`: committed, rolled_back, commit_failed), per institution
    /// (`payment/journal/group.rs`).
    pub journal_statements: Family<JournalGroupLabels, Counter>,
    pub journal_groups: Family<JournalGroupLabels, Counter>,
    /// Core requests that got no reply in time (or no broker confirm): UNKNOWN until resolved.
    pub core_timeouts: Counter,
    /// Round trip of every answered core request over the MQ bridge, by operation (`request`:
    /// post, query, bind, code, reverse): broker both ways plus the core's own time.
    pub core_round_trip: Family<CoreRequestLabels, Histogram>,
    /// Reversals of postings the core applied after their transaction failed, by state.
    pub core_reversals: Family<StateLabels, Gauge>,
    /// 1 for the active risk rule set's version, 0 for earlier ones.
    pub risk_ruleset: Family<VersionLabels, Gauge>,
    /// Risk directory reloads since start, and those refused (the running set stayed).
    pub risk_reloads: Gauge,
    pub risk_reload_failures: Gauge,
    /// Subjects (cards, devices, ...) with velocity events in memory.
    pub risk_velocity_subjects: Gauge,
    /// Entries of the operators' lists (`kunpayctl risk list`) in use.
    pub risk_kept_list_entries: Gauge,
    /// Audit log records acknowledged durable (`[audit]`; docs/audit.md).
    pub audit_records_appended: Counter,
    /// Records the audit log refused (a bad field, or the log stopped after an I/O error).
    pub audit_append_failures: Counter,
    /// Time from handing a record to the writer to its fdatasync, for the appends something
    /// waits on (answers, notifications, operator actions).
    pub audit_append_duration: Histogram,
    pub audit_checkpoints: Counter,
    /// The last record sealed by a signed checkpoint.
    pub audit_last_checkpoint_seq: Gauge,
    /// 1 while the audit log accepts records; 0 after it failed (readiness is 503 then).
    pub audit_log_usable: Gauge,
    /// Operator actions (kunpayctl) not yet in the audit log.
    pub audit_operator_actions_pending: Gauge,
    /// This database's fencing epoch (ha_node_role), read at start.
    pub ha_fencing_epoch: Gauge,
    /// 1 while the CDC applier's last batch succeeded (standby with [ha] only).
    pub ha_cdc_up: Gauge,
    /// Source WAL bytes the standby has not yet examined (0 when caught up).
    pub ha_cdc_lag_bytes: Gauge,
    /// Seconds of source time the standby is behind: now minus the commit time of the last
    /// applied transaction, 0 when caught up.
    pub ha_cdc_lag_seconds: Gauge<f64, AtomicU64>,
    pub ha_cdc_applied_transactions: Counter,
    pub ha_cdc_applied_changes: Counter,
    pub ha_cdc_failures: Counter,
}

impl Metrics {
    pub fn new(node_id: &str) -> Metrics {
        let mut registry = Registry::with_prefix("kunpay");
        registry.register(
            "build",
            "Build of the running kunpayd",
            Info::new(vec![
                ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
                ("node".to_string(), node_id.to_string()),
            ]),
        );
        let metrics = Metrics {
            http_requests: Family::default(),
            http_in_flight: Family::default(),
            channel_rejections_unrecorded: Counter::default(),
            http_duration: Family::new_with_constructor(|| {
                Histogram::new(REQUEST_DURATION_BUCKETS.iter().copied())
            }),
            db_probe: Family::default(),
            db_probe_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            db_pool_connections: Gauge::default(),
            db_pool_idle: Gauge::default(),
            config_reloads: Family::default(),
            role: Family::default(),
            draining: Gauge::default(),
            start_time_seconds: Gauge::default(),
            core_outbox_depth: Gauge::default(),
            core_link_connected: Gauge::default(),
            core_replies: Family::default(),
            journal_statements: Family::default(),
            journal_groups: Family::default(),
            core_timeouts: Counter::default(),
            core_round_trip: Family::new_with_constructor(|| {
                Histogram::new(REQUEST_DURATION_BUCKETS.iter().copied())
            }),
            core_reversals: Family::default(),
            risk_ruleset: Family::default(),
            risk_reloads: Gauge::default(),
            risk_reload_failures: Gauge::default(),
            risk_velocity_subjects: Gauge::default(),
            risk_kept_list_entries: Gauge::default(),
            audit_records_appended: Counter::default(),
            audit_append_failures: Counter::default(),
            // 50 us .. 3.3 s: an fdatasync is ~0.1-10 ms on a healthy disk.
            audit_append_duration: Histogram::new(exponential_buckets(0.00005, 2.0, 17)),
            audit_checkpoints: Counter::default(),
            audit_last_checkpoint_seq: Gauge::default(),
            audit_log_usable: Gauge::default(),
            audit_operator_actions_pending: Gauge::default(),
            ha_fencing_epoch: Gauge::default(),
            ha_cdc_up: Gauge::default(),
            ha_cdc_lag_bytes: Gauge::default(),
            ha_cdc_lag_seconds: Gauge::default(),
            ha_cdc_applied_transactions: Counter::default(),
            ha_cdc_applied_changes: Counter::default(),
            ha_cdc_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered",
            metrics.http_requests.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being served",
            metrics.http_in_flight.clone(),
        );
        registry.register(
            "channel_rejections_unrecorded",
            "Channel refusals whose rejection record was dropped because the recorder queue was full",
            metrics.channel_rejections_unrecorded.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            metrics.http_duration.clone(),
        );
        registry.register(
            "db_probe",
            "Database health probes by result",
            metrics.db_probe.clone(),
        );
        registry.register(
            "db_probe_duration_seconds",
            "Time taken by the database health probe",
            metrics.db_probe_duration.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Open connections in the main database pool",
            metrics.db_pool_connections.clone(),
        );
        registry.register(
            "db_pool_idle_connections",
            "Idle connections in the main database pool",
            metrics.db_pool_idle.clone(),
        );
        registry.register(
            "config_reloads",
            "SIGHUP configuration reloads by result",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "node_role",
            "1 for the node's current role",
            metrics.role.clone(),
        );
        registry.register(
            "draining",
            "1 while the daemon drains before stopping",
            metrics.draining.clone(),
        );
        registry.register(
            "core_outbox_depth",
            "Postings whose core answer is owed (in flight and queued)",
            metrics.core_outbox_depth.clone(),
        );
        registry.register(
            "core_link_connected",
            "1 while the MQ bridge to core banking is connected to its broker",
            metrics.core_link_connected.clone(),
        );
        registry.register(
            "journal_statements",
            "Debit and credit journal statements committed alone or in a journal group",
            metrics.journal_statements.clone(),
        );
        registry.register(
            "journal_groups",
            "Journal groups (several statements in one transaction) by outcome",
            metrics.journal_groups.clone(),
        );
        registry.register(
            "core_replies",
            "Replies received on the core link, by verdict (matched, late, or why refused)",
            metrics.core_replies.clone(),
        );
        registry.register(
            "core_timeouts",
            "Core requests without a reply in time",
            metrics.core_timeouts.clone(),
        );
        registry.register(
            "core_round_trip_seconds",
            "Time from publishing a core request to its reply in hand, for answered requests, by operation",
            metrics.core_round_trip.clone(),
        );
        registry.register(
            "risk_ruleset",
            "The active risk rule set (1) by version: the strategy's label and a digest of the files",
            metrics.risk_ruleset.clone(),
        );
        registry.register(
            "risk_reloads",
            "Risk directory reloads applied since start",
            metrics.risk_reloads.clone(),
        );
        registry.register(
            "risk_reload_failures",
            "Risk directory reloads refused since start (the running set stayed; the log names the file and line)",
            metrics.risk_reload_failures.clone(),
        );
        registry.register(
            "risk_velocity_subjects",
            "Subjects (cards, devices, IPs...) with velocity events in memory",
            metrics.risk_velocity_subjects.clone(),
        );
        registry.register(
            "risk_kept_list_entries",
            "Entries of the black and white lists kept with kunpayctl risk list, as the daemon uses them",
            metrics.risk_kept_list_entries.clone(),
        );
        registry.register(
            "core_reversals",
            "Reversals of postings the core applied after their transaction failed, by state (REFUSED needs a person)",
            metrics.core_reversals.clone(),
        );
        registry.register(
            "audit_records_appended",
            "Audit log records acknowledged durable",
            metrics.audit_records_appended.clone(),
        );
        registry.register(
            "audit_append_failures",
            "Audit log records refused (the log stops after an I/O error; see the error log line)",
            metrics.audit_append_failures.clone(),
        );
        registry.register(
            "audit_append_duration_seconds",
            "Time from handing a record to the audit writer until it is fdatasync'ed, for appends an answer waits on",
            metrics.audit_append_duration.clone(),
        );
        registry.register(
            "audit_checkpoints",
            "Signed audit checkpoints written",
            metrics.audit_checkpoints.clone(),
        );
        registry.register(
            "audit_last_checkpoint_seq",
            "Sequence number of the last audit record sealed by a signed checkpoint",
            metrics.audit_last_checkpoint_seq.clone(),
        );
        registry.register(
            "audit_log_usable",
            "1 while the audit log accepts records, 0 after it failed (readiness answers 503)",
            metrics.audit_log_usable.clone(),
        );
        registry.register(
            "audit_operator_actions_pending",
            "Operator actions (kunpayctl) committed in the database and not yet in the audit log",
            metrics.audit_operator_actions_pending.clone(),
        );
        registry.register(
            "ha_fencing_epoch",
            "This database's fencing epoch (ha_node_role), read at start",
            metrics.ha_fencing_epoch.clone(),
        );
        registry.register(
            "ha_cdc_up",
            "1 while the CDC applier's last batch succeeded (standby with [ha])",
            metrics.ha_cdc_up.clone(),
        );
        registry.register(
            "ha_cdc_lag_bytes",
            "Source WAL bytes the standby has not examined yet (0 when caught up)",
            metrics.ha_cdc_lag_bytes.clone(),
        );
        registry.register(
            "ha_cdc_lag_seconds",
            "Seconds the standby is behind: now minus the source commit time of the last applied transaction, 0 when caught up",
            metrics.ha_cdc_lag_seconds.clone(),
        );
        registry.register(
            "ha_cdc_applied_transactions",
            "Source transactions the CDC applier committed into this standby",
            metrics.ha_cdc_applied_transactions.clone(),
        );
        registry.register(
            "ha_cdc_applied_changes",
            "Row changes (insert, update, delete, truncate) the CDC applier applied",
            metrics.ha_cdc_applied_changes.clone(),
        );
        registry.register(
            "ha_cdc_failures",
            "CDC applier failures (each followed by a reconnect after a pause; the log says why)",
            metrics.ha_cdc_failures.clone(),
        );
        registry.register(
            "start_time_seconds",
            "Start time of the process since the Unix epoch",
            metrics.start_time_seconds.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
