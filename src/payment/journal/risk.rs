//! The risk stage in the journal: decisions (written by the opening statement, read back for
//! the velocity rebuild and the statistics), the cases reviews open, and the reviewers'
//! verdicts.
//!
//! Owns: every SQL statement on `risk_decision` and `risk_case`, and the transitions a verdict
//! makes (IN_REVIEW -> RISK_CHECKED on approval, IN_REVIEW -> FAILED on decline, RISK_CHECKED
//! -> SENT_TO_CORE when the daemon sends an approved transaction).
//! Must never: resolve a case that is not OPEN, move a transaction whose case says otherwise,
//! or send an approved transaction twice (the case's `sent_at` and the state are set together).

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use uuid::Uuid;

use super::{JournalError, OutcomeRecord, TxnRow, record_outcome, transition};
use crate::db::schema::{agreement, core_pending, risk_case, risk_decision, txn};
use crate::payment::state::TxnState;

/// A decision as the opening statement stores it.
#[derive(Debug, Clone)]
pub struct DecisionRow<'a> {
    pub kind: &'a str,
    pub outcome: &'a str,
    pub ruleset: &'a str,
    pub score: i64,
    /// `id@version:ACTION` per fired rule, `,`-separated; shadow rules end in `(shadow)`.
    pub fired: &'a str,
    /// `name=value` per variable, `;`-separated.
    pub seen: &'a str,
    pub errors: &'a str,
    pub budget_exceeded: bool,
    pub elapsed_us: i64,
    pub amount_fen: i64,
    pub near_limit: bool,
    /// The velocity subjects, sealed under the data key.
    pub subjects_enc: &'a str,
    /// The velocity event's time.
    pub decided_at: DateTime<Utc>,
}

/// What a debit's decision needs from its agreement.
#[derive(Debug, Clone, Queryable)]
pub struct AgreementForRisk {
    pub state: String,
    pub account_enc: String,
    pub holder_enc: Option<String>,
    /// When it last changed: for an ACTIVE agreement, when it was confirmed.
    pub updated_at: DateTime<Utc>,
}

pub fn agreement_for_risk(
    conn: &mut PgConnection,
    inst_id: &str,
    agreement_no: &str,
) -> Result<Option<AgreementForRisk>, DieselError> {
    agreement::table
        .filter(agreement::agreement_no.eq(agreement_no))
        .filter(agreement::inst_id.eq(inst_id))
        .select((
            agreement::state,
            agreement::account_enc,
            agreement::holder_enc,
            agreement::updated_at,
        ))
        .first(conn)
        .optional()
}

/// A case with its transaction and decision, as a reviewer sees it.
#[derive(Debug, Clone)]
pub struct CaseView {
    pub txn_id: Uuid,
    pub inst_id: String,
    pub state: String,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub note: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub req_serial: String,
    pub kind: String,
    pub amount_fen: i64,
    pub account_masked: String,
    pub txn_state: String,
    pub ruleset: String,
    pub score: i64,
    pub fired: String,
    pub seen: String,
}

type CaseColumns = (
    (
        Uuid,
        String,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<String>,
        Option<DateTime<Utc>>,
    ),
    (String, String, i64, String, String),
    (String, i64, String, String),
);

fn case_view(row: CaseColumns) -> CaseView {
    let (
        (txn_id, inst_id, state, opened_at, resolved_at, resolved_by, note, sent_at),
        (req_serial, kind, amount_fen, account_masked, txn_state),
        (ruleset, score, fired, seen),
    ) = row;
    CaseView {
        txn_id,
        inst_id,
        state,
        opened_at,
        resolved_at,
        resolved_by,
        note,
        sent_at,
        req_serial,
        kind,
        amount_fen,
        account_masked,
        txn_state,
        ruleset,
        score,
        fired,
        seen,
    }
}

macro_rules! case_query {
    () => {
        risk_case::table
            .inner_join(txn::table.on(txn::txn_id.eq(risk_case::txn_id)))
            .inner_join(risk_decision::table.on(risk_decision::txn_id.eq(risk_case::txn_id)))
            .select((
                (
                    risk_case::txn_id,
                    risk_case::inst_id,
                    risk_case::state,
                    risk_case::opened_at,
                    risk_case::resolved_at,
                    risk_case::resolved_by,
                    risk_case::note,
                    risk_case::sent_at,
                ),
                (
                    txn::req_serial,
                    txn::kind,
                    txn::amount_fen,
                    txn::account_masked,
                    txn::state,
                ),
                (
                    risk_decision::ruleset,
                    risk_decision::score,
                    risk_decision::fired,
                    risk_decision::seen,
                ),
            ))
    };
}

/// Cases, oldest first (the reviewers' queue), optionally only in `state`.
pub fn cases(
    conn: &mut PgConnection,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<CaseView>, DieselError> {
    let mut query = case_query!()
        .order(risk_case::opened_at.asc())
        .limit(limit)
        .into_boxed();
    if let Some(state) = state {
        query = query.filter(risk_case::state.eq(state.to_string()));
    }
    Ok(query
        .load::<CaseColumns>(conn)?
        .into_iter()
        .map(case_view)
        .collect())
}

pub fn case(conn: &mut PgConnection, txn_id: Uuid) -> Result<Option<CaseView>, DieselError> {
    Ok(case_query!()
        .filter(risk_case::txn_id.eq(txn_id))
        .first::<CaseColumns>(conn)
        .optional()?
        .map(case_view))
}

/// What a reviewer's verdict did.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Applied: approved (the daemon sends it to the core) or declined (FAILED now).
    Applied,
    NoSuchCase,
    /// Resolved before (by whom, how): nothing changed.
    AlreadyResolved {
        state: String,
        by: Option<String>,
    },
}

/// Who decided and why, for the case and the history row.
pub struct Reviewer<'a> {
    pub name: &'a str,
    pub note: &'a str,
}

fn resolve_case(
    conn: &mut PgConnection,
    txn_id: Uuid,
    to: &str,
    reviewer: &Reviewer<'_>,
    now: DateTime<Utc>,
) -> Result<Option<Verdict>, DieselError> {
    let found: Option<(String, Option<String>)> = risk_case::table
        .find(txn_id)
        .select((risk_case::state, risk_case::resolved_by))
        .for_update()
        .first(conn)
        .optional()?;
    match found {
        None => return Ok(Some(Verdict::NoSuchCase)),
        Some((state, by)) if state != "OPEN" => {
            return Ok(Some(Verdict::AlreadyResolved { state, by }));
        }
        Some(_) => {}
    }
    let moved = diesel::update(
        risk_case::table
            .find(txn_id)
            .filter(risk_case::state.eq("OPEN")),
    )
    .set((
        risk_case::state.eq(to),
        risk_case::resolved_at.eq(Some(now)),
        risk_case::resolved_by.eq(Some(truncate(reviewer.name, 64))),
        risk_case::note.eq(Some(truncate(reviewer.note, 400))),
    ))
    .execute(conn)?;
    assert_eq!(moved, 1, "the case row is locked in OPEN");
    Ok(None)
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Approves a held transaction: the case becomes APPROVED and the transaction RISK_CHECKED, in
/// one database transaction. The daemon's resolver then sends it to the core.
pub fn approve(
    conn: &mut PgConnection,
    txn_id: Uuid,
    reviewer: &Reviewer<'_>,
    now: DateTime<Utc>,
) -> Result<Verdict, JournalError> {
    conn.transaction(|conn| {
        if let Some(verdict) = resolve_case(conn, txn_id, "APPROVED", reviewer, now)? {
            return Ok(verdict);
        }
        transition(
            conn,
            txn_id,
            TxnState::InReview,
            TxnState::RiskChecked,
            &format!("approved by reviewer {}: {}", reviewer.name, reviewer.note),
            now,
        )?;
        Ok(Verdict::Applied)
    })
}

/// Declines a held transaction: the case becomes DECLINED and the transaction FAILED with
/// `result_code` (its usage given back, a notification queued when `notify`), in one database
/// transaction.
pub fn decline(
    conn: &mut PgConnection,
    txn_id: Uuid,
    reviewer: &Reviewer<'_>,
    result_code: &str,
    notify: bool,
    now: DateTime<Utc>,
) -> Result<Verdict, JournalError> {
    conn.transaction(|conn| {
        if let Some(verdict) = resolve_case(conn, txn_id, "DECLINED", reviewer, now)? {
            return Ok(verdict);
        }
        let reason = format!("declined by reviewer {}: {}", reviewer.name, reviewer.note);
        let recorded = record_outcome(
            conn,
            &OutcomeRecord {
                txn_id,
                from: TxnState::InReview,
                to: TxnState::Failed,
                reason: &reason,
                result_code,
                core_ref: None,
                now,
                notify,
            },
            None,
        )?;
        if !recorded {
            return Err(JournalError::StateMoved {
                txn_id,
                expected: TxnState::InReview,
            });
        }
        Ok(Verdict::Applied)
    })
}

/// Approved transactions of one institution not yet sent to the core, oldest first.
pub fn approved_unsent(
    conn: &mut PgConnection,
    inst_id: &str,
    limit: i64,
) -> Result<Vec<TxnRow>, DieselError> {
    risk_case::table
        .inner_join(txn::table.on(txn::txn_id.eq(risk_case::txn_id)))
        .filter(risk_case::inst_id.eq(inst_id))
        .filter(risk_case::state.eq("APPROVED"))
        .filter(risk_case::sent_at.is_null())
        .filter(txn::state.eq(TxnState::RiskChecked.as_str()))
        .order(risk_case::resolved_at.asc())
        .limit(limit)
        .select(TxnRow::as_select())
        .load(conn)
}

/// RISK_CHECKED -> SENT_TO_CORE for an approved transaction, with its outbox entry and the
/// case's `sent_at`, in one database transaction: durably sent before the core hears of it.
pub fn start_sending(
    conn: &mut PgConnection,
    row: &TxnRow,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    conn.transaction(|conn| {
        transition(
            conn,
            row.txn_id,
            TxnState::RiskChecked,
            TxnState::SentToCore,
            "posting sent to core after review",
            now,
        )?;
        diesel::insert_into(core_pending::table)
            .values((
                core_pending::txn_id.eq(row.txn_id),
                core_pending::inst_id.eq(&row.inst_id),
                core_pending::since.eq(now),
            ))
            .execute(conn)?;
        let marked = diesel::update(
            risk_case::table
                .find(row.txn_id)
                .filter(risk_case::state.eq("APPROVED"))
                .filter(risk_case::sent_at.is_null()),
        )
        .set(risk_case::sent_at.eq(Some(now)))
        .execute(conn)?;
        assert_eq!(
            marked, 1,
            "a RISK_CHECKED transaction has its approved, unsent case"
        );
        Ok(())
    })
}

/// A stored decision's velocity event: time, transaction, amount, near-limit flag, sealed
/// subjects.
pub type RebuildRow = (DateTime<Utc>, Uuid, i64, bool, String);

/// Decisions since `since` for the velocity rebuild: (time, txn id) after `after`, oldest first.
pub fn decisions_for_rebuild(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<RebuildRow>, DieselError> {
    let mut query = risk_decision::table
        .filter(risk_decision::decided_at.gt(since))
        .order((risk_decision::decided_at.asc(), risk_decision::txn_id.asc()))
        .limit(limit)
        .select((
            risk_decision::decided_at,
            risk_decision::txn_id,
            risk_decision::amount_fen,
            risk_decision::near_limit,
            risk_decision::subjects_enc,
        ))
        .into_boxed();
    if let Some((at, id)) = after {
        query = query.filter(
            risk_decision::decided_at
                .gt(at)
                .or(risk_decision::decided_at
                    .eq(at)
                    .and(risk_decision::txn_id.gt(id))),
        );
    }
    query.load(conn)
}

/// Per-rule figures for one period: decisions that fired rules, with the case's verdict.
pub fn fired_between(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(String, String, Option<String>)>, DieselError> {
    risk_decision::table
        .left_join(risk_case::table.on(risk_case::txn_id.eq(risk_decision::txn_id)))
        .filter(risk_decision::decided_at.ge(from))
        .filter(risk_decision::decided_at.lt(to))
        .filter(risk_decision::fired.ne(""))
        .limit(limit)
        .select((
            risk_decision::fired,
            risk_decision::outcome,
            risk_case::state.nullable(),
        ))
        .load(conn)
}

/// Decisions in a period by outcome.
pub fn outcomes_between(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, DieselError> {
    risk_decision::table
        .filter(risk_decision::decided_at.ge(from))
        .filter(risk_decision::decided_at.lt(to))
        .group_by(risk_decision::outcome)
        .select((risk_decision::outcome, diesel::dsl::count_star()))
        .load(conn)
}
