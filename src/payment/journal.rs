//! The journal: every statement the payment flows run against the database.
//!
//! Owns: inserting transactions and agreements, state transitions as compare-and-set
//! (`UPDATE ... WHERE state = <expected>`: lock, check and update in one statement, zero rows
//! means someone else moved it first), the state history, the idempotency records and the
//! replay window.
//! Must never: update a state without naming the state it expects, or write a transition
//! without its history row in the same database transaction.

use chrono::{DateTime, NaiveDate, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

use crate::db::schema::{
    agreement, channel_rejection, channel_request, seen_message, txn, txn_state_history,
};

use super::state::TxnState;

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

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = txn)]
pub struct NewTxn<'a> {
    pub txn_id: Uuid,
    pub inst_id: &'a str,
    pub req_serial: &'a str,
    pub kind: &'a str,
    pub state: &'a str,
    pub amount_fen: i64,
    pub agreement_no: Option<&'a str>,
    pub orig_txn_id: Option<Uuid>,
    pub account_hash: &'a str,
    pub account_masked: &'a str,
    pub account_enc: &'a str,
    pub business_date: NaiveDate,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Inserts a transaction in RECEIVED with its first history row.
pub fn insert_txn(
    conn: &mut PgConnection,
    new: &NewTxn<'_>,
    now: DateTime<Utc>,
) -> Result<(), DieselError> {
    debug_assert_eq!(new.state, TxnState::Received.as_str());
    debug_assert!(new.amount_fen > 0);
    diesel::insert_into(txn::table).values(new).execute(conn)?;
    diesel::insert_into(txn_state_history::table)
        .values((
            txn_state_history::txn_id.eq(new.txn_id),
            txn_state_history::from_state.eq(None::<&str>),
            txn_state_history::to_state.eq(TxnState::Received.as_str()),
            txn_state_history::reason.eq("request received"),
            txn_state_history::at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
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

pub fn set_result(
    conn: &mut PgConnection,
    txn_id: Uuid,
    code: &str,
    core_ref: Option<&str>,
) -> Result<(), DieselError> {
    diesel::update(txn::table.find(txn_id))
        .set((txn::result_code.eq(code), txn::core_ref.eq(core_ref)))
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
pub fn unresolved(
    conn: &mut PgConnection,
    inst_id: &str,
    stale_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<TxnRow>, DieselError> {
    txn::table
        .filter(txn::inst_id.eq(inst_id))
        .filter(
            txn::state.eq(TxnState::Unknown.as_str()).or(txn::state
                .eq(TxnState::SentToCore.as_str())
                .and(txn::updated_at.lt(stale_before))),
        )
        .order(txn::updated_at.asc())
        .limit(limit)
        .select(TxnRow::as_select())
        .load(conn)
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

/// Sum of today's transactions of one kind for one account that did not fail.
pub fn daily_total(
    conn: &mut PgConnection,
    inst_id: &str,
    account_hash: &str,
    kind: &str,
    day: NaiveDate,
) -> Result<i64, DieselError> {
    txn::table
        .filter(txn::inst_id.eq(inst_id))
        .filter(txn::account_hash.eq(account_hash))
        .filter(txn::business_date.eq(day))
        .filter(txn::kind.eq(kind))
        .filter(txn::state.ne(TxnState::Failed.as_str()))
        .select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "CAST(COALESCE(SUM(amount_fen), 0) AS BIGINT)",
        ))
        .first(conn)
}

/// Serialises work on one customer at one institution for the rest of the database
/// transaction (limit checks must not race each other).
pub fn lock_customer(
    conn: &mut PgConnection,
    inst_id: &str,
    account_hash: &str,
) -> Result<(), DieselError> {
    let digest = crate::crypto::sm3::digest(format!("{inst_id}\u{0}{account_hash}").as_bytes());
    let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(key)
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

#[derive(Debug, Clone, Queryable, Selectable)]
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
