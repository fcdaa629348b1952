//! Operator actions in the audit log: kunpayctl runs as a separate process and the log has one
//! writer (the daemon holds the directory lock), so an action reaches the log through the
//! database.
//!
//! 1. kunpayctl writes an `operator_action` row in the same database transaction as the change
//!    it makes ([`record`]): the change and its row commit together or not at all, so no action
//!    is lost, even when no daemon runs.
//! 2. The active daemon's relay ([`relay_round`]) takes the rows not yet logged, in order;
//!    for each it *claims* the row (node, time; committed), appends the record (durable), then
//!    *marks* the row with the record's sequence number (committed).
//! 3. A row found claimed by this node but not marked is in doubt (a crash, or a failed
//!    database write, between the append and the mark): the relay looks for the record in its
//!    own log, from the segment that was current at the claim onwards ([`find_in_log`]), and
//!    marks it if it is there; otherwise it was never durable and is appended now. So no
//!    action is logged twice by a node. A row claimed by another node (a failover in that
//!    window) is logged here with a line saying so, since the other node's log may hold it.
//!
//! Must never: log an action that did not commit, skip a committed one, or put a card, id or
//! phone number in plaintext into the record (kunpayctl passes masked values and digests).

use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::record::{Direction, Frame, MAX_MESSAGE_TYPE_LEN, MAX_PEER_LEN, PeerSignature};
use super::segment::{self, Frames, Step};
use super::sink::AuditSink;
use super::writer::NewRecord;
use crate::db::schema::operator_action;

/// First line of every operator-action record (docs/audit.md, "Operator actions").
pub const FORMAT_LINE: &str = "kunpay operator action v1";
/// Rows the relay takes per round, at most.
pub const RELAY_BATCH: i64 = 100;
/// Clocks of a node are not perfectly monotonic: look a little further back than the claim.
const SEARCH_MARGIN_MS: u64 = 60_000;

/// What an operator did, as kunpayctl records it.
#[derive(Debug, Clone)]
pub struct OperatorAction<'a> {
    /// Who (the `--by` name or the operating-system user).
    pub operator: &'a str,
    /// The command, e.g. `RISK_CASE_APPROVE` (also the record's message type).
    pub command: &'a str,
    pub txn_id: Option<Uuid>,
    /// `name: value` pairs saying what was done; values are masked where they could identify
    /// a customer.
    pub detail: &'a [(&'a str, String)],
}

/// A row as the relay reads it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = operator_action)]
pub struct ActionRow {
    pub action_id: i64,
    pub at: DateTime<Utc>,
    pub operator: String,
    pub command: String,
    pub txn_id: Option<Uuid>,
    pub detail: String,
    pub claimed_by: Option<String>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub audit_node: Option<String>,
    pub audit_seq: Option<i64>,
}

fn one_line(text: &str, max_chars: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect()
}

/// Writes the action's row. Call it inside the transaction that makes the change (diesel
/// nests it as a savepoint otherwise); returns the action id.
pub fn record(
    conn: &mut PgConnection,
    action: &OperatorAction<'_>,
    now: DateTime<Utc>,
) -> QueryResult<i64> {
    let command = one_line(action.command, MAX_MESSAGE_TYPE_LEN);
    assert!(
        !command.is_empty() && !command.contains(' '),
        "commands are fixed identifiers"
    );
    let mut detail = String::new();
    for (name, value) in action.detail {
        detail.push_str(name);
        detail.push_str(": ");
        detail.push_str(&one_line(value, 1000));
        detail.push('\n');
    }
    let detail: String = detail.chars().take(4000).collect();
    diesel::insert_into(operator_action::table)
        .values((
            operator_action::at.eq(now),
            operator_action::operator.eq(one_line(action.operator, 64)),
            operator_action::command.eq(command),
            operator_action::txn_id.eq(action.txn_id),
            operator_action::detail.eq(detail),
        ))
        .returning(operator_action::action_id)
        .get_result(conn)
}

/// The record's peer: `operator:NAME`, with anything a peer label may not hold replaced.
pub fn peer(operator: &str) -> String {
    let name: String = operator
        .chars()
        .map(|c| {
            if c.is_control() || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut peer = format!("operator:{}", if name.is_empty() { "?" } else { &name });
    while peer.len() > MAX_PEER_LEN {
        peer.pop();
    }
    peer
}

/// The exact bytes logged for a row (`extra`: lines the relay adds, e.g. an in-doubt note).
pub fn record_bytes(row: &ActionRow, extra: &[String]) -> Vec<u8> {
    let mut text = format!(
        "{FORMAT_LINE}\naction: {}\nat: {}\noperator: {}\ncommand: {}\ntxn: {}\n{}",
        row.action_id,
        row.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        row.operator,
        row.command,
        row.txn_id
            .map(|t| t.simple().to_string())
            .unwrap_or_else(|| "-".into()),
        row.detail
    );
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    text.into_bytes()
}

fn new_record(row: &ActionRow, bytes: Vec<u8>) -> NewRecord {
    NewRecord {
        direction: Direction::Internal,
        peer: peer(&row.operator),
        message_type: row.command.clone(),
        txn_id: row.txn_id,
        peer_signature: PeerSignature::None,
        bytes,
    }
}

/// Rows not yet in any audit log, oldest first.
pub fn unlogged(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<ActionRow>> {
    operator_action::table
        .filter(operator_action::audit_seq.is_null())
        .order(operator_action::action_id.asc())
        .limit(limit)
        .select(ActionRow::as_select())
        .load(conn)
}

/// How many rows wait for the log.
pub fn unlogged_count(conn: &mut PgConnection) -> QueryResult<i64> {
    operator_action::table
        .filter(operator_action::audit_seq.is_null())
        .count()
        .get_result(conn)
}

/// Every row, oldest first (tests and `kunpayctl`).
pub fn all(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<ActionRow>> {
    operator_action::table
        .order(operator_action::action_id.asc())
        .limit(limit)
        .select(ActionRow::as_select())
        .load(conn)
}

/// Claims a row for this node before appending it; false when it was logged meanwhile.
fn claim(
    conn: &mut PgConnection,
    action_id: i64,
    node_id: &str,
    now: DateTime<Utc>,
) -> QueryResult<bool> {
    let claimed = diesel::update(
        operator_action::table
            .find(action_id)
            .filter(operator_action::audit_seq.is_null()),
    )
    .set((
        operator_action::claimed_by.eq(Some(node_id)),
        operator_action::claimed_at.eq(Some(now)),
    ))
    .execute(conn)?;
    Ok(claimed == 1)
}

/// Marks a row as logged as record `seq` of `node_id`'s log.
pub fn mark(
    conn: &mut PgConnection,
    action_id: i64,
    node_id: &str,
    seq: u64,
) -> Result<(), anyhow::Error> {
    let seq = i64::try_from(seq).expect("sequence numbers stay below 2^63");
    let marked = diesel::update(
        operator_action::table
            .find(action_id)
            .filter(operator_action::audit_seq.is_null()),
    )
    .set((
        operator_action::audit_node.eq(Some(node_id)),
        operator_action::audit_seq.eq(Some(seq)),
    ))
    .execute(conn)?;
    // Only the claiming node marks; a mark by another means two relays on one database.
    if marked != 1 {
        anyhow::bail!(
            "operator action {action_id} was marked by another node while {node_id} logged it \
             (record {seq}): two nodes relay operator actions from one database; only the \
             active node may"
        );
    }
    Ok(())
}

/// The sequence number of the record in `dir` with exactly this peer, message type and bytes,
/// looking only at segments that were current at or after `since_ms` (newest first). Reads
/// complete frames only: the writer may be appending to the last segment meanwhile.
pub fn find_in_log(
    dir: &Path,
    since_ms: u64,
    record: &NewRecord,
) -> Result<Option<u64>, std::io::Error> {
    let segments = segment::list(dir)?;
    for file in segments.iter().rev() {
        let bytes = std::fs::read(&file.path)?;
        let Ok((header, start)) = super::record::SegmentHeader::decode(&bytes) else {
            continue;
        };
        for step in Frames::new(&bytes, start) {
            match step {
                Step::Frame {
                    frame: Frame::Record { record: found, .. },
                    ..
                } => {
                    if found.direction == record.direction
                        && found.peer == record.peer
                        && found.message_type == record.message_type
                        && found.payload == record.bytes
                    {
                        return Ok(Some(found.seq));
                    }
                }
                Step::Frame { .. } => {}
                // A frame still being written, or a torn tail: nothing acknowledged there.
                Step::Damage { .. } => break,
            }
        }
        // This segment was started before the claim: older ones cannot hold the record.
        if header.created_ms <= since_ms {
            break;
        }
    }
    Ok(None)
}

/// What one relay round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayRound {
    /// Appended to the log now.
    pub logged: usize,
    /// Found in the log already (in doubt after a crash) and only marked.
    pub found: usize,
}

/// Logs the operator actions not yet logged, in order (see the module comment). Stops at the
/// first failure; the rest waits for the next round.
pub fn relay_round(
    conn: &mut PgConnection,
    sink: &AuditSink,
    dir: &Path,
    node_id: &str,
) -> Result<RelayRound, anyhow::Error> {
    let mut done = RelayRound::default();
    if !sink.is_enabled() {
        // Without [audit] the rows wait (committed) for a node that logs them.
        return Ok(done);
    }
    for row in unlogged(conn, RELAY_BATCH)? {
        let mut extra = Vec::new();
        match (&row.claimed_by, row.claimed_at) {
            (Some(by), Some(at)) if by == node_id => {
                let candidate = new_record(&row, record_bytes(&row, &[]));
                let since = u64::try_from(at.timestamp_millis())
                    .unwrap_or(0)
                    .saturating_sub(SEARCH_MARGIN_MS);
                if let Some(seq) = find_in_log(dir, since, &candidate)? {
                    mark(conn, row.action_id, node_id, seq)?;
                    tracing::info!(
                        action_id = row.action_id,
                        seq,
                        "operator action found in the audit log after an interrupted relay; marked, not logged again"
                    );
                    done.found += 1;
                    continue;
                }
            }
            (Some(by), Some(at)) => extra.push(format!(
                "in-doubt: claimed by node {by} at {} without a confirmed append; that node's \
                 audit log may hold this action too",
                at.to_rfc3339_opts(SecondsFormat::Millis, true)
            )),
            _ => {}
        }
        if !claim(conn, row.action_id, node_id, Utc::now())? {
            continue;
        }
        let record = new_record(&row, record_bytes(&row, &extra));
        let seq = sink
            .append(record)
            .map_err(|e| anyhow::anyhow!("operator action {}: {e}", row.action_id))?;
        mark(conn, row.action_id, node_id, seq)?;
        done.logged += 1;
    }
    Ok(done)
}
