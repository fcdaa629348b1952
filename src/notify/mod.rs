//! Result notifications to institutions (best-effort notification, seed 003).
//!
//! Owns: delivering each queued notification (queued by the outcome statement in the journal,
//! one per final state) to the institution's callback URL, signed like a response, with the
//! transaction's state read again before every attempt; the retry schedule; recording every
//! attempt; marking a notification DELIVERED (HTTP 2xx), DEAD (schedule exhausted) or SKIPPED
//! (no callback URL). One notifier thread per institution, so a hanging endpoint delays only
//! its own institution, each attempt bounded by `notify.timeout`.
//! Audit log: each attempt's signed bytes are appended (outbound, durable) before the POST, and
//! the institution's answer (status and body) is appended as an inbound record after it; with
//! the log failed no attempt is made (the notification stays due).
//! Must never: announce a state the journal does not hold, retry without bound, run on the
//! payment path (the query API stays the source of truth), or POST what is not in the log.

pub mod store;

use std::time::{Duration, Instant};

use chrono::Utc;

use crate::audit::{AuditSink, Direction, NewRecord, PeerSignature};
use crate::config::{InstitutionConfig, NotifyConfig};
use crate::db::{self, Pool};
use crate::payment::Flows;
use crate::payment::journal;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The institution answered 2xx.
    Acknowledged(u16),
    /// Another HTTP status.
    Refused(u16),
    /// No answer: connection refused, TLS failure, timeout.
    Failed(String),
}

/// `MsgTp`-like name of an institution's answer to a notification in the audit log.
pub const NOTIFY_ANSWER_TYPE: &str = "TXN_NOTIFY_ANSWER";
/// Audit record type of a notification attempt that got no HTTP answer (refused connection,
/// TLS failure, timeout): written by kunpay itself, since nothing came back to log.
pub const NOTIFY_UNANSWERED_TYPE: &str = "TXN_NOTIFY_UNANSWERED";
/// Bytes of an institution's answer read (and logged) at most.
pub const MAX_ANSWER_BODY: u64 = 64 * 1024;

/// Sends one signed notification; with the institution's answer (status and body, the body
/// cut at [`MAX_ANSWER_BODY`]) when there was one.
pub fn deliver(agent: &ureq::Agent, url: &str, body: &[u8]) -> (Delivery, Option<(u16, Vec<u8>)>) {
    match agent
        .post(url)
        .header("Content-Type", "application/xml; charset=utf-8")
        .send(body)
    {
        Ok(mut response) => {
            let status = response.status().as_u16();
            // Read (bounded) so the connection can be reused, and for the audit log.
            let answer = response
                .body_mut()
                .with_config()
                .limit(MAX_ANSWER_BODY)
                .read_to_vec()
                .unwrap_or_default();
            let delivery = if (200..300).contains(&status) {
                Delivery::Acknowledged(status)
            } else {
                Delivery::Refused(status)
            };
            (delivery, Some((status, answer)))
        }
        Err(e) => (Delivery::Failed(e.to_string()), None),
    }
}

/// An institution's HTTP answer as the audit log keeps it: `HTTP <status>`, an empty line,
/// then the body bytes as received.
pub fn answer_bytes(status: u16, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("HTTP {status}\n\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// The audit record of an attempt without an answer: UTF-8 `name: value` lines.
pub fn unanswered_bytes(event_id: uuid::Uuid, took: Duration, why: &str) -> Vec<u8> {
    // One line per field whatever the transport's error text holds.
    let why = why.replace(['\r', '\n'], " ");
    format!(
        "kunpay notification attempt v1\nevent: {event_id}\noutcome: no answer\nafter_ms: {}\nerror: {why}\n",
        took.as_millis()
    )
    .into_bytes()
}

/// An HTTP client for callbacks: OpenSSL (native-tls) with the system's trusted roots.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into()
}

/// Delivers what is due for one institution; returns how many notifications it handled. A
/// database connection is held only around each read and write, never across an HTTP call.
pub fn round(
    inst: &InstitutionConfig,
    flows: &Flows,
    pool: &Pool,
    agent: &ureq::Agent,
    settings: &NotifyConfig,
    audit: &AuditSink,
) -> Result<usize, anyhow::Error> {
    if audit.is_failed() {
        // Nothing may be sent that is not logged; the node is not ready and waits for a restart.
        return Ok(0);
    }
    let checkout = || db::checkout(pool, Duration::from_secs(5));
    let now = Utc::now();
    let due = store::due(&mut *checkout()?, &inst.id, now, settings.batch as i64)?;
    for notification in &due {
        let conn = &mut *checkout()?;
        let Some(url) = inst.callback_url.as_deref() else {
            store::skip(conn, notification.event_id, now)?;
            continue;
        };
        // The transaction as it stands now, not as it stood when the event was queued.
        let Some(row) = journal::txn_by_id(conn, notification.txn_id)? else {
            store::finish_dead(
                conn,
                notification,
                now,
                "the transaction is not in the journal",
            )?;
            continue;
        };
        let body = flows.notification(inst, &row, notification.event_id, now)?;
        let record = |direction, message_type: &str, bytes| NewRecord {
            direction,
            peer: inst.id.clone(),
            message_type: message_type.to_string(),
            txn_id: Some(row.txn_id),
            peer_signature: PeerSignature::None,
            bytes,
        };
        // Durable before it leaves; if it cannot be logged it is not sent (still due).
        audit
            .append(record(
                Direction::Out,
                crate::payment::NOTIFY_MSG_TP,
                body.clone(),
            ))
            .map_err(|e| anyhow::anyhow!("notification {} not sent: {e}", notification.event_id))?;
        let started = Instant::now();
        let (delivery, answer) = deliver(agent, url, &body);
        let took = started.elapsed();
        // What came back, or (nothing having crossed) why nothing did: an auditor reading a
        // notification in the log also reads how its attempt ended.
        let outcome = match (&answer, &delivery) {
            (Some((status, answer)), _) => record(
                Direction::In,
                NOTIFY_ANSWER_TYPE,
                answer_bytes(*status, answer),
            ),
            (None, Delivery::Failed(why)) => record(
                Direction::Internal,
                NOTIFY_UNANSWERED_TYPE,
                unanswered_bytes(notification.event_id, took, why),
            ),
            (None, _) => unreachable!("an HTTP status always comes with its answer"),
        };
        if let Err(e) = audit.append(outcome) {
            // The attempt happened: it is recorded below all the same.
            tracing::error!(institution = %inst.id, event_id = %notification.event_id, "how a notification attempt ended was not logged: {e}");
        }
        let conn = &mut *checkout()?;
        let attempt = notification.attempts + 1;
        let finished = Utc::now();
        match &delivery {
            Delivery::Acknowledged(status) => {
                store::record_attempt(
                    conn,
                    notification,
                    attempt,
                    &row.state,
                    Some(*status),
                    None,
                    took,
                    store::Next::Delivered,
                    finished,
                )?;
            }
            Delivery::Refused(_) | Delivery::Failed(_) => {
                let (status, error) = match &delivery {
                    Delivery::Refused(status) => (Some(*status), format!("HTTP {status}")),
                    Delivery::Failed(why) => (None, why.clone()),
                    Delivery::Acknowledged(_) => unreachable!(),
                };
                let next = match settings.schedule.get(attempt as usize - 1) {
                    Some(delay) => store::Next::RetryAt(
                        finished
                            + chrono::Duration::from_std(*delay)
                                .unwrap_or(chrono::Duration::hours(1)),
                    ),
                    None => store::Next::Dead,
                };
                if next == store::Next::Dead {
                    tracing::warn!(
                        institution = %inst.id,
                        event_id = %notification.event_id,
                        attempts = attempt,
                        "notification dead after its last attempt: {error}; `kunpayctl notify replay` sends it again"
                    );
                }
                store::record_attempt(
                    conn,
                    notification,
                    attempt,
                    &row.state,
                    status,
                    Some(&error),
                    took,
                    next,
                    finished,
                )?;
            }
        }
    }
    Ok(due.len())
}

/// The notifier of one institution: runs until the process ends.
pub fn run(
    inst: &InstitutionConfig,
    flows: &Flows,
    pool: &Pool,
    settings: &NotifyConfig,
    audit: &AuditSink,
) {
    let agent = agent(settings.timeout);
    loop {
        let handled = match round(inst, flows, pool, &agent, settings, audit) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(institution = %inst.id, "notification round failed: {e:#}");
                0
            }
        };
        // A full batch means more are due: go on at once.
        if handled < settings.batch {
            std::thread::sleep(settings.poll_every);
        }
    }
}
