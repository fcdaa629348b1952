//! The reversal records (`core_reversal`): requesting the undo of a posting the core applied
//! after the journal recorded its transaction as FAILED, the resolver's list of due reversals,
//! and each attempt's result.
//! Must never: request a reversal for a transaction that is not FAILED (the check is made
//! under the transaction's row lock), request two for one transaction, or finish one without
//! the history row that tells the transaction's story.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::JournalError;
use crate::db::schema::{core_reversal, txn, txn_state_history};
use crate::payment::state::TxnState;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = core_reversal)]
pub struct ReversalRow {
    pub reversal_id: Uuid,
    pub txn_id: Uuid,
    pub inst_id: String,
    pub state: String,
    pub reason: String,
    pub posted_ref: Option<String>,
    pub core_ref: Option<String>,
    pub refusal: Option<String>,
    pub attempts: i32,
    pub next_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// A new reversal, to be driven by the resolver.
    New(Uuid),
    /// One was requested before (a duplicate late reply): nothing written.
    Existing(Uuid),
    /// The transaction is not FAILED: nothing to undo from kunpay's side.
    NotFailed(TxnState),
    NoSuchTransaction,
}

/// Where one attempt left a reversal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult<'a> {
    Finished {
        /// REVERSED, NOTHING_POSTED or REFUSED.
        state: &'static str,
        core_ref: Option<&'a str>,
        refusal: Option<&'static str>,
    },
    Retry {
        error: &'a str,
        next_at: DateTime<Utc>,
    },
}

fn cut(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

fn history(
    conn: &mut PgConnection,
    txn_id: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> QueryResult<()> {
    // A reversal leaves the transaction FAILED (what the institution was told); the history
    // row records why money moved and moved back.
    diesel::insert_into(txn_state_history::table)
        .values((
            txn_state_history::txn_id.eq(txn_id),
            txn_state_history::from_state.eq(Some(TxnState::Failed.as_str())),
            txn_state_history::to_state.eq(TxnState::Failed.as_str()),
            txn_state_history::reason.eq(cut(reason, 200)),
            txn_state_history::at.eq(now),
        ))
        .execute(conn)
        .map(drop)
}

/// Requests the reversal of `txn_id`'s posting, which the core applied (`posted_ref`) although
/// the journal says FAILED.
pub fn request(
    conn: &mut PgConnection,
    txn_id: Uuid,
    posted_ref: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Requested, JournalError> {
    conn.transaction(|conn| {
        let row: Option<(String, String)> = txn::table
            .find(txn_id)
            .select((txn::state, txn::inst_id))
            .for_update()
            .first(conn)
            .optional()?;
        let Some((state, inst_id)) = row else {
            return Ok(Requested::NoSuchTransaction);
        };
        let state: TxnState = state.parse().map_err(JournalError::Corrupt)?;
        if state != TxnState::Failed {
            return Ok(Requested::NotFailed(state));
        }
        let existing: Option<Uuid> = core_reversal::table
            .filter(core_reversal::txn_id.eq(txn_id))
            .select(core_reversal::reversal_id)
            .first(conn)
            .optional()?;
        if let Some(id) = existing {
            return Ok(Requested::Existing(id));
        }
        let reversal_id = Uuid::now_v7();
        let reason = format!(
            "the core posted it (ref {}) after FAILED was recorded",
            posted_ref.unwrap_or("none")
        );
        diesel::insert_into(core_reversal::table)
            .values((
                core_reversal::reversal_id.eq(reversal_id),
                core_reversal::txn_id.eq(txn_id),
                core_reversal::inst_id.eq(&inst_id),
                core_reversal::state.eq("PENDING"),
                core_reversal::reason.eq(cut(&reason, 200)),
                core_reversal::posted_ref.eq(posted_ref.map(|r| cut(r, 64))),
                core_reversal::attempts.eq(0),
                core_reversal::next_at.eq(now),
                core_reversal::created_at.eq(now),
            ))
            .execute(conn)?;
        history(
            conn,
            txn_id,
            &format!("{reason}: reversal {} requested", reversal_id.simple()),
            now,
        )?;
        Ok(Requested::New(reversal_id))
    })
}

/// An institution's pending reversals whose time has come, oldest first.
pub fn due(
    conn: &mut PgConnection,
    inst_id: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> QueryResult<Vec<ReversalRow>> {
    core_reversal::table
        .filter(core_reversal::inst_id.eq(inst_id))
        .filter(core_reversal::state.eq("PENDING"))
        .filter(core_reversal::next_at.le(now))
        .order(core_reversal::next_at.asc())
        .limit(limit)
        .select(ReversalRow::as_select())
        .load(conn)
}

/// Records one attempt, compare-and-set on the attempt count the caller saw. False: someone
/// else recorded an attempt first (theirs stands; nothing written).
pub fn record_attempt(
    conn: &mut PgConnection,
    row: &ReversalRow,
    result: &AttemptResult<'_>,
    now: DateTime<Utc>,
) -> Result<bool, JournalError> {
    conn.transaction(|conn| {
        let target = core_reversal::table
            .find(row.reversal_id)
            .filter(core_reversal::state.eq("PENDING"))
            .filter(core_reversal::attempts.eq(row.attempts));
        let moved = match result {
            AttemptResult::Finished {
                state,
                core_ref,
                refusal,
            } => {
                assert!(
                    matches!(*state, "REVERSED" | "NOTHING_POSTED" | "REFUSED"),
                    "a reversal finishes in a final state"
                );
                diesel::update(target)
                    .set((
                        core_reversal::state.eq(*state),
                        core_reversal::core_ref.eq(core_ref.map(|r| cut(r, 64))),
                        core_reversal::refusal.eq(*refusal),
                        core_reversal::attempts.eq(row.attempts + 1),
                        core_reversal::last_error.eq(None::<String>),
                        core_reversal::finished_at.eq(Some(now)),
                    ))
                    .execute(conn)?
            }
            AttemptResult::Retry { error, next_at } => diesel::update(target)
                .set((
                    core_reversal::attempts.eq(row.attempts + 1),
                    core_reversal::next_at.eq(*next_at),
                    core_reversal::last_error.eq(Some(cut(error, 300))),
                ))
                .execute(conn)?,
        };
        if moved == 0 {
            return Ok(false);
        }
        if let AttemptResult::Finished {
            state,
            core_ref,
            refusal,
        } = result
        {
            let outcome = match (*state, core_ref, refusal) {
                ("REVERSED", Some(r), _) => format!("the core undid the posting (ref {r})"),
                ("REFUSED", _, Some(why)) => {
                    format!("the core refused to undo it ({why}): a person must settle it")
                }
                ("NOTHING_POSTED", _, _) => "the core had nothing posted to undo".to_string(),
                (other, _, _) => other.to_string(),
            };
            history(
                conn,
                row.txn_id,
                &format!("reversal {}: {outcome}", row.reversal_id.simple()),
                now,
            )?;
        }
        Ok(true)
    })
}

/// Reversals for operators, newest first; `state` filters (PENDING, REFUSED, ...).
pub fn list(
    conn: &mut PgConnection,
    state: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<ReversalRow>> {
    let mut query = core_reversal::table
        .select(ReversalRow::as_select())
        .order(core_reversal::created_at.desc())
        .limit(limit)
        .into_boxed();
    if let Some(state) = state {
        query = query.filter(core_reversal::state.eq(state.to_string()));
    }
    query.load(conn)
}

/// How many reversals are in each state, for /metrics.
pub fn counts(conn: &mut PgConnection) -> QueryResult<Vec<(String, i64)>> {
    core_reversal::table
        .group_by(core_reversal::state)
        .select((core_reversal::state, diesel::dsl::count_star()))
        .load(conn)
}
