//! The journal: every statement the payment flows run against the database.
//!
//! Owns: inserting transactions and agreements, state transitions as compare-and-set
//! (`UPDATE ... WHERE state = <expected>`: lock, check and update in one statement, zero rows
//! means someone else moved it first), the state history, the idempotency records, the replay
//! window and the daily-limit counters. The hot path's statements are combined (several writes
//! in one statement, so one round trip and one commit) and run prepared (`fixed.rs`).
//! Must never: update a state without naming the state it expects, or write a transition
//! without its history row in the same database transaction.

use std::borrow::Cow;
use std::marker::PhantomData;

use chrono::{DateTime, NaiveDate, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

use crate::db::schema::{
    agreement, channel_rejection, channel_request, daily_usage, seen_message, txn,
    txn_state_history,
};

use super::state::TxnState;

mod fixed;
pub mod group;
pub mod reversal;
pub mod risk;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("database: {0}")]
    Db(#[from] DieselError),
    /// The row was not in the expected state: a concurrent actor got there first.
    #[error("transaction {txn_id} is no longer {expected}")]
    StateMoved { txn_id: Uuid, expected: TxnState },
    #[error("the journal holds an unknown value: {0}")]
    Corrupt(String),
}

pub fn is_unique_violation(error: &DieselError) -> bool {
    matches!(
        error,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Runs a fixed statement alone, or through `group` (its lock key orders it in a group). With
/// grouping off it runs at once on borrowed binds: the owned copy a waiting statement needs is
/// made only when statements may wait.
fn get_result_via<S, R>(
    conn: &mut PgConnection,
    via: Option<(&group::Group, group::LockKey<'_>)>,
    binds: Vec<fixed::Bind<'_>>,
) -> Result<R, DieselError>
where
    S: fixed::FixedSql,
    R: Send + 'static,
    for<'b> fixed::Fixed<'b, S>: diesel::query_dsl::LoadQuery<'b, PgConnection, R>,
{
    match via {
        Some((group, lock_key)) if group.groups_statements() => {
            let owned = fixed::Owned::<S>::new(&binds);
            group.run(conn, lock_key, move |conn| owned.fixed().get_result(conn))
        }
        Some((group, _)) => {
            group.counters.alone.inc();
            fixed::Fixed::<S>::new(binds).get_result(conn)
        }
        None => fixed::Fixed::<S>::new(binds).get_result(conn),
    }
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = txn)]
pub struct TxnRow {
    pub txn_id: Uuid,
    pub inst_id: String,
    pub req_serial: String,
    pub kind: String,
    pub state: String,
    pub amount_fen: i64,
    pub refunded_fen: i64,
    pub agreement_no: Option<String>,
    pub orig_txn_id: Option<Uuid>,
    pub account_hash: String,
    pub account_masked: String,
    pub account_enc: String,
    pub result_code: Option<String>,
    pub core_ref: Option<String>,
    pub business_date: NaiveDate,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TxnRow {
    pub fn state(&self) -> Result<TxnState, JournalError> {
        self.state.parse().map_err(JournalError::Corrupt)
    }
}

/// A transaction [`insert_opened`] writes (in SENT_TO_CORE, created and updated at `created_at`).
#[derive(Debug, Clone)]
pub struct NewTxn<'a> {
    pub txn_id: Uuid,
    pub inst_id: &'a str,
    pub req_serial: &'a str,
    pub kind: &'a str,
    pub amount_fen: i64,
    pub agreement_no: Option<&'a str>,
    pub orig_txn_id: Option<Uuid>,
    pub account_hash: &'a str,
    pub account_masked: &'a str,
    pub account_enc: &'a str,
    pub business_date: NaiveDate,
    pub created_at: DateTime<Utc>,
}

/// Moves `txn_id` from `from` to `to` and records why; fails if it is not in `from`.
pub fn transition(
    conn: &mut PgConnection,
    txn_id: Uuid,
    from: TxnState,
    to: TxnState,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    assert!(
        from.can_become(to),
        "{from} -> {to} is not a transition of the state machine"
    );
    let moved = diesel::update(txn::table.find(txn_id).filter(txn::state.eq(from.as_str())))
        .set((txn::state.eq(to.as_str()), txn::updated_at.eq(now)))
        .execute(conn)?;
    if moved != 1 {
        return Err(JournalError::StateMoved {
            txn_id,
            expected: from,
        });
    }
    let reason: String = reason.chars().take(200).collect();
    diesel::insert_into(txn_state_history::table)
        .values((
            txn_state_history::txn_id.eq(txn_id),
            txn_state_history::from_state.eq(Some(from.as_str())),
            txn_state_history::to_state.eq(to.as_str()),
            txn_state_history::reason.eq(reason),
            txn_state_history::at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn find_txn(
    conn: &mut PgConnection,
    inst_id: &str,
    serial: &str,
) -> Result<Option<TxnRow>, DieselError> {
    txn::table
        .filter(txn::inst_id.eq(inst_id))
        .filter(txn::req_serial.eq(serial))
        .select(TxnRow::as_select())
        .first(conn)
        .optional()
}

pub fn txn_by_id(conn: &mut PgConnection, txn_id: Uuid) -> Result<Option<TxnRow>, DieselError> {
    txn::table
        .find(txn_id)
        .select(TxnRow::as_select())
        .first(conn)
        .optional()
}

pub fn lock_txn(
    conn: &mut PgConnection,
    inst_id: &str,
    serial: &str,
) -> Result<Option<TxnRow>, DieselError> {
    txn::table
        .filter(txn::inst_id.eq(inst_id))
        .filter(txn::req_serial.eq(serial))
        .select(TxnRow::as_select())
        .for_update()
        .first(conn)
        .optional()
}

/// Transactions whose outcome is not recorded: UNKNOWN, or SENT_TO_CORE for longer than a
/// live worker ever takes (the process stopped during the core call).
///
/// Read from the outbox (`core_pending`, in-flight and backlog only), oldest first, so a
/// backlog drains in the order it was accepted; never a scan of the journal.
pub fn unresolved(
    conn: &mut PgConnection,
    inst_id: &str,
    stale_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<TxnRow>, DieselError> {
    use crate::db::schema::core_pending;
    core_pending::table
        .inner_join(txn::table)
        .filter(core_pending::inst_id.eq(inst_id))
        .filter(
            txn::state.eq(TxnState::Unknown.as_str()).or(txn::state
                .eq(TxnState::SentToCore.as_str())
                .and(txn::updated_at.lt(stale_before))),
        )
        .order(core_pending::since.asc())
        .limit(limit)
        .select(TxnRow::as_select())
        .load(conn)
}

/// Outbox entries whose transaction has a final state (a path that recorded it without the
/// outbox in mind): removed, so nothing is delivered twice for nothing. Returns how many.
pub fn prune_settled_pending(conn: &mut PgConnection) -> Result<usize, DieselError> {
    diesel::sql_query(
        "DELETE FROM core_pending WHERE txn_id IN ( \
             SELECT p.txn_id FROM core_pending p JOIN txn t ON t.txn_id = p.txn_id \
             WHERE t.state NOT IN ('SENT_TO_CORE', 'UNKNOWN'))",
    )
    .execute(conn)
}

/// Postings whose core answer is still owed (the outbox depth).
pub fn pending_count(conn: &mut PgConnection) -> Result<i64, DieselError> {
    use crate::db::schema::core_pending;
    core_pending::table.count().get_result(conn)
}

pub fn add_refunded(
    conn: &mut PgConnection,
    txn_id: Uuid,
    delta_fen: i64,
) -> Result<(), DieselError> {
    diesel::update(txn::table.find(txn_id))
        .set(txn::refunded_fen.eq(txn::refunded_fen + delta_fen))
        .execute(conn)?;
    Ok(())
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = agreement)]
pub struct AgreementRow {
    pub agreement_no: String,
    pub inst_id: String,
    pub state: String,
    pub account_hash: String,
    pub account_masked: String,
    pub account_enc: String,
    pub core_customer: Option<String>,
    pub code_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewAgreement<'a> {
    pub agreement_no: &'a str,
    pub inst_id: &'a str,
    pub account_hash: &'a str,
    pub account_masked: &'a str,
    pub account_enc: &'a str,
    /// The holder's id and phone numbers, sealed (risk control's subjects for debits).
    pub holder_enc: &'a str,
    pub core_customer: &'a str,
}

pub fn insert_agreement(
    conn: &mut PgConnection,
    new: &NewAgreement<'_>,
    now: DateTime<Utc>,
) -> Result<(), DieselError> {
    diesel::insert_into(agreement::table)
        .values((
            agreement::agreement_no.eq(new.agreement_no),
            agreement::inst_id.eq(new.inst_id),
            agreement::state.eq("PENDING"),
            agreement::account_hash.eq(new.account_hash),
            agreement::account_masked.eq(new.account_masked),
            agreement::account_enc.eq(new.account_enc),
            agreement::holder_enc.eq(Some(new.holder_enc)),
            agreement::core_customer.eq(Some(new.core_customer)),
            agreement::created_at.eq(now),
            agreement::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn lock_agreement(
    conn: &mut PgConnection,
    inst_id: &str,
    agreement_no: &str,
) -> Result<Option<AgreementRow>, DieselError> {
    agreement::table
        .find(agreement_no)
        .filter(agreement::inst_id.eq(inst_id))
        .select(AgreementRow::as_select())
        .for_update()
        .first(conn)
        .optional()
}

pub fn active_agreement_exists(
    conn: &mut PgConnection,
    inst_id: &str,
    account_hash: &str,
) -> Result<bool, DieselError> {
    let count: i64 = agreement::table
        .filter(agreement::inst_id.eq(inst_id))
        .filter(agreement::account_hash.eq(account_hash))
        .filter(agreement::state.eq("ACTIVE"))
        .count()
        .get_result(conn)?;
    Ok(count > 0)
}

/// Moves an agreement between states under its row lock; returns false if it was not in `from`.
pub fn set_agreement_state(
    conn: &mut PgConnection,
    agreement_no: &str,
    from: &str,
    to: &str,
    now: DateTime<Utc>,
) -> Result<bool, DieselError> {
    let moved = diesel::update(
        agreement::table
            .find(agreement_no)
            .filter(agreement::state.eq(from)),
    )
    .set((agreement::state.eq(to), agreement::updated_at.eq(now)))
    .execute(conn)?;
    Ok(moved == 1)
}

pub fn count_code_attempt(conn: &mut PgConnection, agreement_no: &str) -> Result<i32, DieselError> {
    diesel::update(agreement::table.find(agreement_no))
        .set(agreement::code_attempts.eq(agreement::code_attempts + 1))
        .returning(agreement::code_attempts)
        .get_result(conn)
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = channel_request)]
pub struct StoredResponse {
    pub msg_type: String,
    pub field_digests: String,
    pub response: Vec<u8>,
    pub result_code: String,
}

pub fn find_response(
    conn: &mut PgConnection,
    inst_id: &str,
    serial: &str,
) -> Result<Option<StoredResponse>, DieselError> {
    channel_request::table
        .find((inst_id, serial))
        .select(StoredResponse::as_select())
        .first(conn)
        .optional()
}

#[allow(clippy::too_many_arguments)]
pub fn store_response(
    conn: &mut PgConnection,
    inst_id: &str,
    serial: &str,
    msg_type: &str,
    field_digests: &str,
    response: &[u8],
    result_code: &str,
    txn_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<(), DieselError> {
    diesel::insert_into(channel_request::table)
        .values((
            channel_request::inst_id.eq(inst_id),
            channel_request::req_serial.eq(serial),
            channel_request::msg_type.eq(msg_type),
            channel_request::field_digests.eq(field_digests),
            channel_request::response.eq(response),
            channel_request::result_code.eq(result_code),
            channel_request::txn_id.eq(txn_id),
            channel_request::created_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Records a message id; false if it was seen before (a replay).
pub fn remember_message(
    conn: &mut PgConnection,
    inst_id: &str,
    msg_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, DieselError> {
    match diesel::insert_into(seen_message::table)
        .values((
            seen_message::inst_id.eq(inst_id),
            seen_message::msg_id.eq(msg_id),
            seen_message::seen_at.eq(now),
        ))
        .execute(conn)
    {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Drops message ids older than the widest send-time window; a replay older than that is
/// already refused by its send time.
pub fn prune_seen_messages(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<usize, DieselError> {
    diesel::sql_query(
        "DELETE FROM seen_message WHERE (inst_id, msg_id) IN \
         (SELECT inst_id, msg_id FROM seen_message WHERE seen_at < $1 LIMIT $2)",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(before)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .execute(conn)
}

pub struct Rejection<'a> {
    pub inst_id: Option<&'a str>,
    pub path: &'a str,
    pub msg_id: Option<&'a str>,
    pub req_serial: Option<&'a str>,
    pub result_code: &'a str,
    pub detail: &'a str,
    pub body_sm3: &'a str,
}

pub fn record_rejection(
    conn: &mut PgConnection,
    rejection: &Rejection<'_>,
    now: DateTime<Utc>,
) -> Result<(), DieselError> {
    let clip = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    diesel::insert_into(channel_rejection::table)
        .values((
            channel_rejection::inst_id.eq(rejection.inst_id.map(|s| clip(s, 32))),
            channel_rejection::path.eq(clip(rejection.path, 64)),
            channel_rejection::msg_id.eq(rejection.msg_id.map(|s| clip(s, 64))),
            channel_rejection::req_serial.eq(rejection.req_serial.map(|s| clip(s, 64))),
            channel_rejection::result_code.eq(rejection.result_code),
            channel_rejection::detail.eq(clip(rejection.detail, 400)),
            channel_rejection::body_sm3.eq(rejection.body_sm3),
            channel_rejection::at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn history(
    conn: &mut PgConnection,
    txn_id: Uuid,
) -> Result<Vec<(Option<String>, String, String)>, DieselError> {
    txn_state_history::table
        .filter(txn_state_history::txn_id.eq(txn_id))
        .order(txn_state_history::id.asc())
        .select((
            txn_state_history::from_state,
            txn_state_history::to_state,
            txn_state_history::reason,
        ))
        .load(conn)
}

pub fn page(
    conn: &mut PgConnection,
    inst_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    offset: i64,
    limit: i64,
) -> Result<(i64, Vec<TxnRow>), DieselError> {
    let base = || {
        txn::table
            .filter(txn::inst_id.eq(inst_id))
            .filter(txn::created_at.ge(start))
            .filter(txn::created_at.lt(end))
    };
    let total: i64 = base().count().get_result(conn)?;
    let rows = base()
        .order((txn::created_at.asc(), txn::txn_id.asc()))
        .offset(offset)
        .limit(limit)
        .select(TxnRow::as_select())
        .load(conn)?;
    Ok((total, rows))
}

// ---------------------------------------------------------------------------------------------
// Combined statements: the hot path of a payment in two or three round trips (a debit: open it,
// with its message id and stored-answer lookup; record the outcome with the stored answer).
// Each is one statement and so one database transaction: its parts commit together or not at
// all.
// ---------------------------------------------------------------------------------------------

/// The history rows that take a new transaction from nothing to SENT_TO_CORE, inserted with
/// it, and its entry in `core_pending` (the core's answer is owed from now on). `opened` is the
/// CTE that inserted the transaction (returning txn_id, inst_id, created_at). Its binds, pushed
/// by [`Opening::push_history_binds`]: the time, three steps of (from, to, reason) with a flag
/// for the second and third, the outbox flag, and with `decided` the risk decision (thirteen
/// values) and the case flag.
///
/// Two forms, `plain` and `decided`, because a data-modifying CTE costs the database even when
/// it writes nothing: its table's statement-level guard trigger fires (`ha::install_guards`)
/// and its executor node is set up. An opening without a risk decision (no `[risk]`) leaves the
/// decision and case CTEs out (docs/ARCHITECTURE.md, BENCHMARKS.md).
macro_rules! opening_history_cte {
    (plain) => {
        concat!(opening_history_cte!(steps), ")")
    };
    (decided) => {
        concat!(
            opening_history_cte!(steps),
            "), decided AS ( \
                INSERT INTO risk_decision (txn_id, inst_id, kind, outcome, ruleset, score, fired, \
                                           seen, errors, budget_exceeded, elapsed_us, amount_fen, \
                                           near_limit, subjects_enc, decided_at) \
                SELECT txn_id, inst_id, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM opened \
            ), held AS ( \
                INSERT INTO risk_case (txn_id, inst_id, state, opened_at) \
                SELECT txn_id, inst_id, 'OPEN', created_at FROM opened WHERE ? \
            )"
        )
    };
    (steps) => {
        "history AS ( \
            INSERT INTO txn_state_history (txn_id, from_state, to_state, reason, at) \
            SELECT opened.txn_id, step.from_state, step.to_state, step.reason, ? \
            FROM opened, (SELECT 1 AS seq, CAST(? AS VARCHAR(16)) AS from_state, \
                                 CAST(? AS VARCHAR(16)) AS to_state, CAST(? AS VARCHAR(200)) AS reason \
                          UNION ALL SELECT 2, ?, ?, ? WHERE ? \
                          UNION ALL SELECT 3, ?, ?, ? WHERE ?) AS step \
            ORDER BY step.seq \
        ), pending AS ( \
            INSERT INTO core_pending (txn_id, inst_id, since) \
            SELECT txn_id, inst_id, created_at FROM opened WHERE ? \
        "
    };
}

/// The state a transaction is opened in, by the risk decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAs {
    /// Approved: RECEIVED -> RISK_CHECKED -> SENT_TO_CORE, with its outbox entry.
    SentToCore,
    /// Held for a person: RECEIVED -> IN_REVIEW, a case opened, the day's usage reserved.
    InReview,
    /// Declined: RECEIVED only; the caller records RECEIVED -> FAILED with the answer.
    Received,
}

impl OpenAs {
    pub fn state(self) -> TxnState {
        match self {
            OpenAs::SentToCore => TxnState::SentToCore,
            OpenAs::InReview => TxnState::InReview,
            OpenAs::Received => TxnState::Received,
        }
    }
}

/// Why each step of the opening was taken, where it ends, and the risk decision stored with it.
pub struct Opening<'a> {
    pub risk_reason: &'a str,
    pub open_as: OpenAs,
    pub decision: Option<&'a risk::DecisionRow<'a>>,
}

impl<'a> Opening<'a> {
    /// Appends the binds of [`opening_history_cte`], after asserting the steps are the state
    /// machine's.
    fn push_history_binds(&self, now: DateTime<Utc>, binds: &mut Vec<fixed::Bind<'a>>) {
        use fixed::Bind;
        let second = match self.open_as {
            OpenAs::SentToCore => Some(TxnState::RiskChecked),
            OpenAs::InReview => Some(TxnState::InReview),
            OpenAs::Received => None,
        };
        let third = (self.open_as == OpenAs::SentToCore).then_some(TxnState::SentToCore);
        binds.push(Bind::Time(now));
        binds.push(Bind::OptText(None));
        binds.push(Bind::Text(TxnState::Received.as_str()));
        binds.push(Bind::Text("request received"));
        for (from, to, reason) in [
            (TxnState::Received, second, self.risk_reason),
            (TxnState::RiskChecked, third, "posting sent to core"),
        ] {
            if let Some(to) = to {
                assert!(from.can_become(to), "{from} -> {to} is not a transition");
            }
            binds.push(Bind::OptText(Some(from.as_str())));
            binds.push(Bind::Text(to.map_or("", |t| t.as_str())));
            binds.push(Bind::Text(truncate_reason(reason)));
            binds.push(Bind::Bool(to.is_some()));
        }
        binds.push(Bind::Bool(self.open_as == OpenAs::SentToCore));
        assert!(
            self.open_as == OpenAs::SentToCore || self.decision.is_some(),
            "only a risk decision holds or declines a transaction"
        );
        let Some(decision) = self.decision else {
            return;
        };
        binds.extend([
            Bind::Text(decision.kind),
            Bind::Text(decision.outcome),
            Bind::Text(decision.ruleset),
            Bind::BigInt(decision.score),
            Bind::Text(truncate_to(decision.fired, 2000)),
            Bind::Text(decision.seen),
            Bind::Text(truncate_to(decision.errors, 2000)),
            Bind::Bool(decision.budget_exceeded),
            Bind::BigInt(decision.elapsed_us),
            Bind::BigInt(decision.amount_fen),
            Bind::Bool(decision.near_limit),
            Bind::Text(decision.subjects_enc),
            Bind::Time(decision.decided_at),
            Bind::Bool(self.open_as == OpenAs::InReview),
        ]);
    }
}

fn truncate_to(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn truncate_reason(reason: &str) -> &str {
    truncate_to(reason, 200)
}

/// What remembering a message id found.
pub enum Remembered {
    /// The message id was used before: a replay.
    Replay,
    /// First sight of this message id; the stored answer for its serial, if any.
    Fresh(Option<StoredResponse>),
}

struct RememberAndFind;
impl fixed::FixedSql for RememberAndFind {
    const SQL: &'static str = "WITH seen AS ( \
            INSERT INTO seen_message (inst_id, msg_id, seen_at) VALUES (?, ?, ?) RETURNING msg_id \
        ) \
        SELECT r.msg_type, r.field_digests, r.response, r.result_code \
        FROM seen, channel_request r WHERE r.inst_id = ? AND r.req_serial = ?";
    type Row = (
        diesel::sql_types::Text,
        diesel::sql_types::Text,
        diesel::sql_types::Binary,
        diesel::sql_types::Text,
    );
}

/// Records a message id and reads the stored answer for `serial`, in one round trip.
pub fn remember_and_find(
    conn: &mut PgConnection,
    inst_id: &str,
    msg_id: &str,
    serial: &str,
    now: DateTime<Utc>,
) -> Result<Remembered, DieselError> {
    use fixed::Bind;
    let found = fixed::Fixed::<RememberAndFind>::new(vec![
        Bind::Text(inst_id),
        Bind::Text(msg_id),
        Bind::Time(now),
        Bind::Text(inst_id),
        Bind::Text(serial),
    ])
    .get_result::<(String, String, Vec<u8>, String)>(conn)
    .optional();
    match found {
        Ok(stored) => Ok(Remembered::Fresh(stored.map(
            |(msg_type, field_digests, response, result_code)| StoredResponse {
                msg_type,
                field_digests,
                response,
                result_code,
            },
        ))),
        Err(e) if is_unique_violation(&e) => Ok(Remembered::Replay),
        Err(e) => Err(e),
    }
}

/// What the first statement of a debit or credit found.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstSight {
    /// The message id was used before: nothing was done.
    Replay,
    /// The serial was answered before: this is the stored answer (nothing was opened).
    Answered(StoredResponse),
    /// Over the per-transaction limit: the message id was recorded, nothing opened.
    OverSingleLimit,
    /// Debits only: no agreement with this number at this institution.
    NoAgreement,
    /// Debits only: the agreement is in this state, not ACTIVE.
    AgreementNotActive(String),
    /// The amount would pass the daily limit; `used` is what the account used today already.
    OverDailyLimit { used: i64 },
    /// Journaled durably in SENT_TO_CORE.
    Opened,
}

/// The message a request arrived in, recorded with the first statement that touches it.
pub struct Arrival<'a> {
    pub msg_id: &'a str,
    /// False when an earlier statement for this request recorded it already.
    pub record: bool,
}

/// The parts of a new transaction the combined statements need.
pub struct NewPosting<'a> {
    pub txn_id: Uuid,
    pub inst_id: &'a str,
    pub req_serial: &'a str,
    pub amount_fen: i64,
    pub daily_limit_fen: i64,
    pub business_date: NaiveDate,
    pub now: DateTime<Utc>,
}

/// The first two CTEs of an opening statement: the message id recorded (`seen`, when its
/// fourth bind is true) and the stored answer for the serial (`stored`). Six binds.
macro_rules! first_sight_ctes {
    () => {
        "WITH seen AS ( \
            INSERT INTO seen_message (inst_id, msg_id, seen_at) SELECT ?, ?, ? WHERE ? \
            RETURNING msg_id \
        ), stored AS ( \
            SELECT msg_type, field_digests, response, result_code FROM channel_request \
            WHERE inst_id = ? AND req_serial = ? \
        ), "
    };
}

/// The last columns of an opening statement's one row, read by [`Sighting`].
macro_rules! first_sight_columns {
    () => {
        "(SELECT COUNT(*) FROM opened), (SELECT COUNT(*) FROM seen), \
         s.msg_type, s.field_digests, s.response, s.result_code \
         FROM (SELECT 1 AS one) AS one LEFT JOIN stored s ON TRUE"
    };
}

type SightingSql = (
    diesel::sql_types::BigInt,
    diesel::sql_types::BigInt,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Nullable<diesel::sql_types::Binary>,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
);

type SightingRow = (
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
);

/// What every opening statement reports besides its own columns.
struct Sighting {
    opened: i64,
    stored: Option<StoredResponse>,
}

impl Sighting {
    fn read(row: SightingRow, recorded: bool) -> Sighting {
        let (opened, seen, msg_type, field_digests, response, result_code) = row;
        assert_eq!(seen, i64::from(recorded), "the message id is recorded once");
        assert!(
            (0..=1).contains(&opened),
            "one transaction inserted at most"
        );
        let stored = match (msg_type, field_digests, response, result_code) {
            (Some(msg_type), Some(field_digests), Some(response), Some(result_code)) => {
                assert_eq!(opened, 0, "nothing opens under a stored answer");
                Some(StoredResponse {
                    msg_type,
                    field_digests,
                    response,
                    result_code,
                })
            }
            _ => None,
        };
        Sighting { opened, stored }
    }

    /// The answer decided before the opening's own checks: a stored answer, or the single
    /// limit.
    fn settled(&mut self, within_single_limit: bool) -> Option<FirstSight> {
        if let Some(stored) = self.stored.take() {
            return Some(FirstSight::Answered(stored));
        }
        (!within_single_limit).then_some(FirstSight::OverSingleLimit)
    }
}

/// The binds of [`first_sight_ctes`].
fn first_sight_binds<'a>(
    new: &NewPosting<'a>,
    arrival: &Arrival<'a>,
    record: bool,
) -> [fixed::Bind<'a>; 6] {
    use fixed::Bind;
    [
        Bind::Text(new.inst_id),
        Bind::Text(arrival.msg_id),
        Bind::Time(new.now),
        Bind::Bool(record),
        Bind::Text(new.inst_id),
        Bind::Text(new.req_serial),
    ]
}

fn is_replay(error: &DieselError) -> bool {
    matches!(
        error,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name() == Some("seen_message_pk")
    )
}

/// Runs an opening statement at most twice: the first debit or credit of the day on an
/// account finds no usage row to raise, creates it and tries again (without recording the
/// message id a second time). `run` returns its own columns' verdict (`Ok(Some(..))` ends it),
/// the [`Sighting`], and the account's hash for the usage row. The first run goes through
/// `group` (with `lock_key`); the rare second and third run alone.
#[allow(clippy::too_many_arguments)]
fn open_with_usage<'a, 'h>(
    conn: &mut PgConnection,
    group: &group::Group,
    lock_key: group::LockKey<'_>,
    new: &NewPosting<'a>,
    arrival: &Arrival<'a>,
    kind: &str,
    within_single_limit: bool,
    mut run: impl FnMut(
        &mut PgConnection,
        Option<(&group::Group, group::LockKey<'_>)>,
        [fixed::Bind<'a>; 6],
    ) -> Result<(Option<FirstSight>, SightingRow, Cow<'h, str>), DieselError>,
) -> Result<FirstSight, DieselError> {
    debug_assert!(new.amount_fen > 0);
    let mut record = arrival.record;
    let mut via = Some((group, lock_key));
    // At most: create the day's row, then see it; one more for a row another debit created
    // after our statement's snapshot.
    for _ in 0..3 {
        let (verdict, row, account_hash) =
            match run(conn, via.take(), first_sight_binds(new, arrival, record)) {
                Ok(found) => found,
                Err(e) if is_replay(&e) => return Ok(FirstSight::Replay),
                Err(e) => return Err(e),
            };
        let mut sighting = Sighting::read(row, record);
        record = false;
        if let Some(settled) = sighting.settled(within_single_limit) {
            return Ok(settled);
        }
        if let Some(verdict) = verdict {
            return Ok(verdict);
        }
        if sighting.opened == 1 {
            return Ok(FirstSight::Opened);
        }
        match usage_today(conn, new.inst_id, &account_hash, kind, new.business_date)? {
            Some(used) if used.saturating_add(new.amount_fen) > new.daily_limit_fen => {
                return Ok(FirstSight::OverDailyLimit { used });
            }
            // The day's row appeared after our statement took its snapshot (a concurrent first
            // debit of the day created it): not over the limit, so try again.
            Some(_) => {}
            None => create_usage(conn, new.inst_id, &account_hash, kind, new.business_date)?,
        }
    }
    Err(DieselError::QueryBuilderError(
        "the daily usage row was created but is not visible".into(),
    ))
}

/// The two forms of an opening statement ([`opening_history_cte`]): without a risk decision
/// (`plain`) and with one (`decided`).
struct WithoutDecision;
struct WithDecision;

/// An opening statement `$name<WithoutDecision | WithDecision>` from its SQL macro.
macro_rules! opening_statement {
    ($name:ident, $sql:ident, $row:ty) => {
        struct $name<Form>(PhantomData<Form>);
        impl fixed::FixedSql for $name<WithoutDecision> {
            const SQL: &'static str = $sql!(plain);
            type Row = $row;
        }
        impl fixed::FixedSql for $name<WithDecision> {
            const SQL: &'static str = $sql!(decided);
            type Row = $row;
        }
    };
}

/// Runs the form of an opening statement that `opening` needs: `Decided` with a risk decision,
/// `Plain` without.
fn get_opening_via<Plain, Decided, R>(
    conn: &mut PgConnection,
    via: Option<(&group::Group, group::LockKey<'_>)>,
    opening: &Opening<'_>,
    binds: Vec<fixed::Bind<'_>>,
) -> Result<R, DieselError>
where
    Plain: fixed::FixedSql,
    Decided: fixed::FixedSql,
    R: Send + 'static,
    for<'b> fixed::Fixed<'b, Plain>: diesel::query_dsl::LoadQuery<'b, PgConnection, R>,
    for<'b> fixed::Fixed<'b, Decided>: diesel::query_dsl::LoadQuery<'b, PgConnection, R>,
{
    if opening.decision.is_some() {
        get_result_via::<Decided, R>(conn, via, binds)
    } else {
        get_result_via::<Plain, R>(conn, via, binds)
    }
}

macro_rules! open_debit_sql {
    ($form:tt) => {
        concat!(
            first_sight_ctes!(),
            "agr AS ( \
                SELECT agreement_no, state, account_hash, account_masked, account_enc \
                FROM agreement WHERE agreement_no = ? AND inst_id = ? AND ? \
                  AND NOT EXISTS (SELECT 1 FROM stored) \
                FOR SHARE \
            ), quota AS ( \
                UPDATE daily_usage SET used_fen = used_fen + ? \
                WHERE inst_id = ? AND kind = 'DEBIT' AND business_date = ? AND used_fen + ? <= ? \
                  AND account_hash = (SELECT account_hash FROM agr WHERE state = 'ACTIVE') \
                RETURNING used_fen \
            ), opened AS ( \
                INSERT INTO txn (txn_id, inst_id, req_serial, kind, state, amount_fen, agreement_no, \
                                 account_hash, account_masked, account_enc, business_date, \
                                 created_at, updated_at) \
                SELECT ?, ?, ?, 'DEBIT', ?, ?, agr.agreement_no, agr.account_hash, \
                       agr.account_masked, agr.account_enc, ?, ?, ? \
                FROM agr, quota \
                RETURNING txn_id, inst_id, created_at \
            ), ",
            opening_history_cte!($form),
            " SELECT (SELECT state FROM agr), (SELECT account_hash FROM agr), \
                     (SELECT account_enc FROM agr), ",
            first_sight_columns!()
        )
    };
}

type OpenDebitRow = (
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    diesel::sql_types::Nullable<diesel::sql_types::Text>,
    SightingSql,
);

opening_statement!(OpenDebit, open_debit_sql, OpenDebitRow);

/// A debit's first statement: records its message id (a duplicate is a replay), reads the
/// stored answer for its serial, and (when there is none and `within_single_limit`) opens
/// it: the agreement is read under a share lock (a termination waits for it, and it sees a
/// termination that committed first), today's usage is raised under its row lock only if the
/// limit allows, and the transaction is inserted in SENT_TO_CORE with its three history
/// rows. One statement: all of it or none of it. On `Opened`, also the agreement's sealed
/// account number to post against.
pub fn open_debit(
    conn: &mut PgConnection,
    group: &group::Group,
    new: &NewPosting<'_>,
    arrival: &Arrival<'_>,
    agreement_no: &str,
    within_single_limit: bool,
    opening: &Opening<'_>,
) -> Result<(FirstSight, Option<String>), DieselError> {
    use fixed::Bind;
    let mut sealed = None;
    let sight = open_with_usage(
        conn,
        group,
        group::LockKey::debit(agreement_no),
        new,
        arrival,
        "DEBIT",
        within_single_limit,
        |conn, via, first| {
            let mut binds = Vec::with_capacity(40);
            binds.extend(first);
            binds.extend([
                Bind::Text(agreement_no),
                Bind::Text(new.inst_id),
                Bind::Bool(within_single_limit),
                Bind::BigInt(new.amount_fen),
                Bind::Text(new.inst_id),
                Bind::Date(new.business_date),
                Bind::BigInt(new.amount_fen),
                Bind::BigInt(new.daily_limit_fen),
                Bind::Uuid(new.txn_id),
                Bind::Text(new.inst_id),
                Bind::Text(new.req_serial),
                Bind::Text(opening.open_as.state().as_str()),
                Bind::BigInt(new.amount_fen),
                Bind::Date(new.business_date),
                Bind::Time(new.now),
                Bind::Time(new.now),
            ]);
            opening.push_history_binds(new.now, &mut binds);
            type Found = (Option<String>, Option<String>, Option<String>, SightingRow);
            let (state, account_hash, account_enc, row) =
                get_opening_via::<OpenDebit<WithoutDecision>, OpenDebit<WithDecision>, Found>(
                    conn, via, opening, binds,
                )?;
            sealed = account_enc;
            let verdict = match state {
                None => Some(FirstSight::NoAgreement),
                Some(state) if state != "ACTIVE" => Some(FirstSight::AgreementNotActive(state)),
                Some(_) => None,
            };
            Ok((verdict, row, Cow::Owned(account_hash.unwrap_or_default())))
        },
    )?;
    Ok((sight, sealed))
}

/// The account a credit or refund goes to.
pub struct Payee<'a> {
    pub account_hash: &'a str,
    pub account_masked: &'a str,
    pub account_enc: &'a str,
}

macro_rules! open_credit_sql {
    ($form:tt) => {
        concat!(
            first_sight_ctes!(),
            "quota AS ( \
                UPDATE daily_usage SET used_fen = used_fen + ? \
                WHERE inst_id = ? AND account_hash = ? AND kind = 'CREDIT' AND business_date = ? \
                  AND used_fen + ? <= ? AND ? AND NOT EXISTS (SELECT 1 FROM stored) \
                RETURNING used_fen \
            ), opened AS ( \
                INSERT INTO txn (txn_id, inst_id, req_serial, kind, state, amount_fen, \
                                 account_hash, account_masked, account_enc, business_date, \
                                 created_at, updated_at) \
                SELECT ?, ?, ?, 'CREDIT', ?, ?, ?, ?, ?, ?, ?, ? \
                FROM quota \
                RETURNING txn_id, inst_id, created_at \
            ), ",
            opening_history_cte!($form),
            " SELECT ",
            first_sight_columns!()
        )
    };
}

opening_statement!(OpenCredit, open_credit_sql, SightingSql);

/// A credit's first statement, as [`open_debit`] for a debit: records its message id (a
/// duplicate is a replay), reads the stored answer for its serial, and (when there is none and
/// `within_single_limit`) raises today's usage under its row lock only if the limit allows and
/// inserts the transaction in SENT_TO_CORE with its history. All of it or none of it.
pub fn open_credit(
    conn: &mut PgConnection,
    group: &group::Group,
    new: &NewPosting<'_>,
    arrival: &Arrival<'_>,
    payee: &Payee<'_>,
    within_single_limit: bool,
    opening: &Opening<'_>,
) -> Result<FirstSight, DieselError> {
    use fixed::Bind;
    open_with_usage(
        conn,
        group,
        group::LockKey::credit(payee.account_hash),
        new,
        arrival,
        "CREDIT",
        within_single_limit,
        |conn, via, first| {
            let mut binds = Vec::with_capacity(40);
            binds.extend(first);
            binds.extend([
                Bind::BigInt(new.amount_fen),
                Bind::Text(new.inst_id),
                Bind::Text(payee.account_hash),
                Bind::Date(new.business_date),
                Bind::BigInt(new.amount_fen),
                Bind::BigInt(new.daily_limit_fen),
                Bind::Bool(within_single_limit),
                Bind::Uuid(new.txn_id),
                Bind::Text(new.inst_id),
                Bind::Text(new.req_serial),
                Bind::Text(opening.open_as.state().as_str()),
                Bind::BigInt(new.amount_fen),
                Bind::Text(payee.account_hash),
                Bind::Text(payee.account_masked),
                Bind::Text(payee.account_enc),
                Bind::Date(new.business_date),
                Bind::Time(new.now),
                Bind::Time(new.now),
            ]);
            opening.push_history_binds(new.now, &mut binds);
            let row = get_opening_via::<
                OpenCredit<WithoutDecision>,
                OpenCredit<WithDecision>,
                SightingRow,
            >(conn, via, opening, binds)?;
            Ok((None, row, Cow::Borrowed(payee.account_hash)))
        },
    )
}

macro_rules! insert_opened_sql {
    ($form:tt) => {
        concat!(
            "WITH opened AS ( \
                INSERT INTO txn (txn_id, inst_id, req_serial, kind, state, amount_fen, agreement_no, \
                                 orig_txn_id, account_hash, account_masked, account_enc, \
                                 business_date, created_at, updated_at) \
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                RETURNING txn_id, inst_id, created_at \
            ), ",
            opening_history_cte!($form),
            " SELECT COUNT(*) FROM opened"
        )
    };
}

opening_statement!(InsertOpened, insert_opened_sql, diesel::sql_types::BigInt);

/// Inserts a transaction in SENT_TO_CORE with its three history rows, in the caller's database
/// transaction (a refund, which checks and reserves against its original first).
pub fn insert_opened(
    conn: &mut PgConnection,
    new: &NewTxn<'_>,
    opening: &Opening<'_>,
) -> Result<(), DieselError> {
    use fixed::Bind;
    assert!(new.amount_fen > 0);
    let mut binds = vec![
        Bind::Uuid(new.txn_id),
        Bind::Text(new.inst_id),
        Bind::Text(new.req_serial),
        Bind::Text(new.kind),
        Bind::Text(opening.open_as.state().as_str()),
        Bind::BigInt(new.amount_fen),
        Bind::OptText(new.agreement_no),
        Bind::OptUuid(new.orig_txn_id),
        Bind::Text(new.account_hash),
        Bind::Text(new.account_masked),
        Bind::Text(new.account_enc),
        Bind::Date(new.business_date),
        Bind::Time(new.created_at),
        Bind::Time(new.created_at),
    ];
    assert_eq!(opening.open_as, OpenAs::SentToCore, "refunds are not held");
    opening.push_history_binds(new.created_at, &mut binds);
    let opened = get_opening_via::<InsertOpened<WithoutDecision>, InsertOpened<WithDecision>, i64>(
        conn, None, opening, binds,
    )?;
    assert_eq!(opened, 1, "an INSERT ... VALUES inserts its row or fails");
    Ok(())
}

fn usage_today(
    conn: &mut PgConnection,
    inst_id: &str,
    account_hash: &str,
    kind: &str,
    day: NaiveDate,
) -> Result<Option<i64>, DieselError> {
    daily_usage::table
        .find((inst_id, account_hash, kind, day))
        .select(daily_usage::used_fen)
        .first(conn)
        .optional()
}

/// Creates an account's usage row for the day; a concurrent creator winning is as good.
fn create_usage(
    conn: &mut PgConnection,
    inst_id: &str,
    account_hash: &str,
    kind: &str,
    day: NaiveDate,
) -> Result<(), DieselError> {
    match diesel::insert_into(daily_usage::table)
        .values((
            daily_usage::inst_id.eq(inst_id),
            daily_usage::account_hash.eq(account_hash),
            daily_usage::kind.eq(kind),
            daily_usage::business_date.eq(day),
            daily_usage::used_fen.eq(0i64),
        ))
        .execute(conn)
    {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Drops up to `limit` usage rows of business days before `before` (limits are per day; older
/// rows say nothing the journal does not); returns how many it dropped.
pub fn prune_daily_usage(
    conn: &mut PgConnection,
    before: NaiveDate,
    limit: i64,
) -> Result<usize, DieselError> {
    diesel::sql_query(
        "DELETE FROM daily_usage WHERE (inst_id, account_hash, kind, business_date) IN \
         (SELECT inst_id, account_hash, kind, business_date FROM daily_usage \
          WHERE business_date < $1 LIMIT $2)",
    )
    .bind::<diesel::sql_types::Date, _>(before)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .execute(conn)
}

/// The answer to store with an outcome, for a repeat of the request to receive byte for byte.
pub struct AnswerToStore<'a> {
    pub inst_id: &'a str,
    pub req_serial: &'a str,
    pub msg_type: &'a str,
    pub field_digests: &'a str,
    pub response: &'a [u8],
}

/// A transaction's outcome: the state it leaves and the one it reaches, with why.
pub struct OutcomeRecord<'a> {
    pub txn_id: Uuid,
    pub from: TxnState,
    pub to: TxnState,
    pub reason: &'a str,
    pub result_code: &'a str,
    pub core_ref: Option<&'a str>,
    pub now: DateTime<Utc>,
    /// Queue a result notification to the institution (it has a callback URL). Only final
    /// states are announced.
    pub notify: bool,
}

/// The outcome statement, in the forms a call needs: `give_back` (an outcome of FAILED: the
/// day's usage, or a refund's reservation on its original, returned) and `announce` (a result
/// notification queued). Separate forms rather than one statement with flags, because every
/// data-modifying CTE costs the database even when it writes nothing (see
/// [`opening_history_cte`]); a successful debit without a callback URL runs neither.
macro_rules! record_outcome_sql {
    (give_back: $give_back:tt, announce: $announce:tt) => {
        concat!(
            "WITH moved AS ( \
                UPDATE txn SET state = ?, result_code = ?, core_ref = ?, updated_at = ? \
                WHERE txn_id = ? AND state = ? \
                RETURNING txn_id, inst_id, account_hash, kind, business_date, amount_fen, \
                          orig_txn_id \
            ), history AS ( \
                INSERT INTO txn_state_history (txn_id, from_state, to_state, reason, at) \
                SELECT txn_id, ?, ?, ?, ? FROM moved \
            ), ",
            record_outcome_sql!(give_back $give_back),
            "settled AS ( \
                DELETE FROM core_pending WHERE ? <> 'UNKNOWN' \
                  AND txn_id IN (SELECT txn_id FROM moved) \
            ), ",
            record_outcome_sql!(announce $announce),
            "stored AS ( \
                INSERT INTO channel_request (inst_id, req_serial, msg_type, field_digests, \
                                             response, result_code, txn_id, created_at) \
                SELECT ?, ?, ?, ?, ?, ?, txn_id, ? FROM moved WHERE ? \
            ) \
            SELECT COUNT(*) FROM moved"
        )
    };
    (give_back false) => {
        ""
    };
    (give_back true) => {
        "released AS ( \
            UPDATE daily_usage SET used_fen = daily_usage.used_fen - moved.amount_fen \
            FROM moved \
            WHERE daily_usage.inst_id = moved.inst_id \
              AND daily_usage.account_hash = moved.account_hash \
              AND daily_usage.kind = moved.kind \
              AND daily_usage.business_date = moved.business_date \
        ), unreserved AS ( \
            UPDATE txn SET refunded_fen = txn.refunded_fen - moved.amount_fen \
            FROM moved \
            WHERE moved.kind = 'REFUND' AND txn.txn_id = moved.orig_txn_id \
        ), "
    };
    (announce false) => {
        ""
    };
    (announce true) => {
        "announced AS ( \
            INSERT INTO notification (event_id, txn_id, inst_id, txn_state, status, attempts, \
                                      next_at, created_at) \
            SELECT ?, txn_id, inst_id, ?, 'PENDING', 0, ?, ? FROM moved \
        ), "
    };
}

struct RecordOutcome<const GIVE_BACK: bool, const ANNOUNCE: bool>;
macro_rules! record_outcome_forms {
    ($(($give_back:tt, $announce:tt)),*) => {
        $(impl fixed::FixedSql for RecordOutcome<$give_back, $announce> {
            const SQL: &'static str =
                record_outcome_sql!(give_back: $give_back, announce: $announce);
            type Row = diesel::sql_types::BigInt;
        })*
    };
}
record_outcome_forms!((false, false), (false, true), (true, false), (true, true));

/// Records an outcome in one statement: the compare-and-set transition with its history row,
/// on FAILED the day's usage (debit, credit) or the original's reservation (refund) given
/// back, and the answer stored when given. False if the transaction was no longer in
/// `record.from` (someone else recorded an outcome first): then nothing was written.
pub fn record_outcome(
    conn: &mut PgConnection,
    record: &OutcomeRecord<'_>,
    answer: Option<&AnswerToStore<'_>>,
) -> Result<bool, DieselError> {
    record_outcome_via(conn, None, record, answer)
}

/// [`record_outcome`] through the institution's journal group when `via` names it, with the
/// lock key of the transaction's opening.
pub fn record_outcome_via(
    conn: &mut PgConnection,
    via: Option<(&group::Group, group::LockKey<'_>)>,
    record: &OutcomeRecord<'_>,
    answer: Option<&AnswerToStore<'_>>,
) -> Result<bool, DieselError> {
    use fixed::Bind;
    assert!(
        record.from.can_become(record.to),
        "{} -> {} is not a transition of the state machine",
        record.from,
        record.to
    );
    let give_back = record.to == TxnState::Failed;
    let announce = record.notify && record.to.is_final();
    // The transition, its history and settling (11), the notification (4), the answer (8).
    let mut binds = Vec::with_capacity(23);
    binds.extend([
        Bind::Text(record.to.as_str()),
        Bind::Text(record.result_code),
        Bind::OptText(record.core_ref),
        Bind::Time(record.now),
        Bind::Uuid(record.txn_id),
        Bind::Text(record.from.as_str()),
        Bind::Text(record.from.as_str()),
        Bind::Text(record.to.as_str()),
        Bind::Text(truncate_reason(record.reason)),
        Bind::Time(record.now),
        Bind::Text(record.to.as_str()),
    ]);
    if announce {
        binds.extend([
            Bind::Uuid(Uuid::now_v7()),
            Bind::Text(record.to.as_str()),
            Bind::Time(record.now),
            Bind::Time(record.now),
        ]);
    }
    binds.extend([
        Bind::Text(answer.map_or("", |a| a.inst_id)),
        Bind::Text(answer.map_or("", |a| a.req_serial)),
        Bind::Text(answer.map_or("", |a| a.msg_type)),
        Bind::Text(answer.map_or("", |a| a.field_digests)),
        Bind::Bytes(answer.map_or(&[], |a| a.response)),
        Bind::Text(record.result_code),
        Bind::Time(record.now),
        Bind::Bool(answer.is_some()),
    ]);
    let moved = match (give_back, announce) {
        (false, false) => get_result_via::<RecordOutcome<false, false>, i64>(conn, via, binds)?,
        (false, true) => get_result_via::<RecordOutcome<false, true>, i64>(conn, via, binds)?,
        (true, false) => get_result_via::<RecordOutcome<true, false>, i64>(conn, via, binds)?,
        (true, true) => get_result_via::<RecordOutcome<true, true>, i64>(conn, via, binds)?,
    };
    assert!(moved <= 1, "txn_id is the primary key");
    Ok(moved == 1)
}

/// The SQL of a debit's two statements (open, record the outcome) in the forms the payments
/// benchmark's debits take (no risk decision; succeeded; no callback URL), with `?` for each
/// bind in the order the functions above bind them: for the benchmark that measures what the
/// database alone can do with them.
pub fn debit_path_sql() -> [&'static str; 2] {
    use fixed::FixedSql;
    [
        OpenDebit::<WithoutDecision>::SQL,
        RecordOutcome::<false, false>::SQL,
    ]
}

/// The SQL of every combined statement in every form, for the openGauss portability check.
pub fn combined_statements_sql() -> [&'static str; 11] {
    use fixed::FixedSql;
    [
        RememberAndFind::SQL,
        OpenDebit::<WithoutDecision>::SQL,
        OpenDebit::<WithDecision>::SQL,
        OpenCredit::<WithoutDecision>::SQL,
        OpenCredit::<WithDecision>::SQL,
        InsertOpened::<WithoutDecision>::SQL,
        InsertOpened::<WithDecision>::SQL,
        RecordOutcome::<false, false>::SQL,
        RecordOutcome::<false, true>::SQL,
        RecordOutcome::<true, false>::SQL,
        RecordOutcome::<true, true>::SQL,
    ]
}
