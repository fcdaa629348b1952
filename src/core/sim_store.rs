//! The core simulator's ledger in its own PostgreSQL database (`sql/coresim.sql`), for
//! `kunpay-coresim`: the same rules as the in-memory `sim.rs`, but a crash of the simulator
//! loses nothing, so tests can crash it and still check balances against kunpay's journal.
//! Must never: post one transaction id twice, let a balance go negative (a CHECK says so too),
//! or accept a posting on a frozen or unknown account.

use chrono::Utc;
use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};
use uuid::Uuid;

use super::sim::{Account, CODE_TTL, binding_refusal, core_customer, verification_code};
use super::{
    BindOutcome, BindRejection, BindRequest, CodeCheck, CoreError, CoreLink, Posting, PostingKind,
    PostingOutcome, Rejection, Reversal, ReversalOutcome, ReversalRefusal,
};
use crate::db::{self, Pool};

const SCHEMA: &str = include_str!("../../sql/coresim.sql");

pub struct PgLedger {
    pool: Pool,
    /// See `sim::Faults::queries_do_not_fence`.
    fence_queries: bool,
}

#[derive(QueryableByName)]
struct PostingRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<Text>)]
    core_ref: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    reason: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    kind: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    account_no: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    amount_fen: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    reversal_ref: Option<String>,
}

/// What the ledger holds under one transaction id.
enum Recorded {
    Fenced,
    Answered(PostingOutcome),
}

#[derive(QueryableByName)]
struct AccountRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    id_no: String,
    #[diesel(sql_type = Text)]
    phone: String,
    #[diesel(sql_type = BigInt)]
    balance_fen: i64,
    #[diesel(sql_type = Bool)]
    frozen: bool,
}

#[derive(QueryableByName)]
struct CodeRow {
    #[diesel(sql_type = Text)]
    code: String,
    #[diesel(sql_type = Timestamptz)]
    issued_at: chrono::DateTime<Utc>,
}

fn unavailable(e: impl std::fmt::Display) -> CoreError {
    CoreError::Unavailable(format!("simulator database: {e}"))
}

fn reason_name(r: Rejection) -> &'static str {
    match r {
        Rejection::InsufficientFunds => "INSUFFICIENT_FUNDS",
        Rejection::UnknownAccount => "UNKNOWN_ACCOUNT",
        Rejection::Frozen => "FROZEN",
        Rejection::NameMismatch => "NAME_MISMATCH",
        Rejection::TooLate => "TOO_LATE",
    }
}

fn kind_name(kind: PostingKind) -> &'static str {
    match kind {
        PostingKind::Debit => "DEBIT",
        PostingKind::Credit => "CREDIT",
    }
}

fn recorded_of(row: &PostingRow) -> Result<Recorded, CoreError> {
    match (
        row.status.as_str(),
        row.core_ref.clone(),
        row.reason.as_deref(),
    ) {
        ("FENCED", _, _) => Ok(Recorded::Fenced),
        ("POSTED", Some(core_ref), _) => {
            Ok(Recorded::Answered(PostingOutcome::Posted { core_ref }))
        }
        ("REJECTED", _, Some(reason)) => {
            Ok(Recorded::Answered(PostingOutcome::Rejected(match reason {
                "INSUFFICIENT_FUNDS" => Rejection::InsufficientFunds,
                "UNKNOWN_ACCOUNT" => Rejection::UnknownAccount,
                "FROZEN" => Rejection::Frozen,
                "NAME_MISMATCH" => Rejection::NameMismatch,
                "TOO_LATE" => Rejection::TooLate,
                other => return Err(unavailable(format!("unknown rejection {other}"))),
            })))
        }
        (status, _, _) => Err(unavailable(format!("corrupt posting status {status}"))),
    }
}

impl PgLedger {
    /// Creates the tables if needed and opens `accounts` that do not exist yet (existing ones
    /// keep their balances).
    pub fn open(pool: Pool, accounts: &[Account]) -> Result<PgLedger, CoreError> {
        let mut conn =
            db::checkout(&pool, std::time::Duration::from_secs(10)).map_err(unavailable)?;
        conn.batch_execute(SCHEMA).map_err(unavailable)?;
        for chunk in accounts.chunks(500) {
            conn.transaction(|conn| {
                for a in chunk {
                    diesel::sql_query(
                        "INSERT INTO coresim_account (account_no, name, id_no, phone, balance_fen, frozen) \
                         SELECT $1, $2, $3, $4, $5, $6 \
                         WHERE NOT EXISTS (SELECT 1 FROM coresim_account WHERE account_no = $1)",
                    )
                    .bind::<Text, _>(&a.account_no)
                    .bind::<Text, _>(&a.name)
                    .bind::<Text, _>(&a.id_no)
                    .bind::<Text, _>(&a.phone)
                    .bind::<BigInt, _>(a.balance_fen)
                    .bind::<Bool, _>(a.frozen)
                    .execute(conn)?;
                }
                Ok::<_, diesel::result::Error>(())
            })
            .map_err(unavailable)?;
        }
        Ok(PgLedger {
            pool,
            fence_queries: true,
        })
    }

    /// A ledger whose queries do not fence (`sim::Faults::queries_do_not_fence`).
    pub fn without_query_fence(mut self) -> PgLedger {
        self.fence_queries = false;
        self
    }

    fn conn(&self) -> Result<db::PooledConnection, CoreError> {
        db::checkout(&self.pool, std::time::Duration::from_secs(5)).map_err(unavailable)
    }

    pub fn balance(&self, account_no: &str) -> Result<Option<i64>, CoreError> {
        let mut conn = self.conn()?;
        Ok(diesel::sql_query(
            "SELECT name, id_no, phone, balance_fen, frozen FROM coresim_account WHERE account_no = $1",
        )
        .bind::<Text, _>(account_no)
        .get_result::<AccountRow>(&mut *conn)
        .optional()
        .map_err(unavailable)?
        .map(|a| a.balance_fen))
    }

    fn find_row(
        conn: &mut PgConnection,
        txn_id: Uuid,
        lock: bool,
    ) -> QueryResult<Option<PostingRow>> {
        diesel::sql_query(if lock {
            "SELECT status, core_ref, reason, kind, account_no, amount_fen, reversal_ref \
             FROM coresim_posting WHERE txn_id = $1 FOR UPDATE"
        } else {
            "SELECT status, core_ref, reason, kind, account_no, amount_fen, reversal_ref \
             FROM coresim_posting WHERE txn_id = $1"
        })
        .bind::<diesel::sql_types::Uuid, _>(txn_id)
        .get_result::<PostingRow>(conn)
        .optional()
    }

    fn find_posting(conn: &mut PgConnection, txn_id: Uuid) -> Result<Option<Recorded>, CoreError> {
        Self::find_row(conn, txn_id, false)
            .map_err(unavailable)?
            .as_ref()
            .map(recorded_of)
            .transpose()
    }

    /// Records that the core answered "never received" for `txn_id`. A concurrent posting of
    /// the same id collides on the primary key: one of the two fails and is asked again.
    fn fence(conn: &mut PgConnection, txn_id: Uuid) -> QueryResult<()> {
        diesel::sql_query(
            "INSERT INTO coresim_posting (txn_id, status, posted_at) VALUES ($1, 'FENCED', $2)",
        )
        .bind::<diesel::sql_types::Uuid, _>(txn_id)
        .bind::<Timestamptz, _>(Utc::now())
        .execute(conn)
        .map(drop)
    }
}

fn as_query_error(e: CoreError) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(e.to_string().into())
}

impl CoreLink for PgLedger {
    fn request_binding(&self, request: &BindRequest) -> Result<BindOutcome, CoreError> {
        let mut conn = self.conn()?;
        let account = diesel::sql_query(
            "SELECT name, id_no, phone, balance_fen, frozen FROM coresim_account WHERE account_no = $1",
        )
        .bind::<Text, _>(&request.account_no)
        .get_result::<AccountRow>(&mut *conn)
        .optional()
        .map_err(unavailable)?;
        let Some(account) = account else {
            return Ok(BindOutcome::Rejected(BindRejection::UnknownAccount));
        };
        if let Some(refused) = binding_refusal(
            &account.name,
            &account.id_no,
            &account.phone,
            account.frozen,
            request,
        ) {
            return Ok(BindOutcome::Rejected(refused));
        }
        let code = verification_code(&request.agreement_no);
        conn.transaction(|conn| {
            diesel::sql_query("DELETE FROM coresim_code WHERE agreement_no = $1")
                .bind::<Text, _>(&request.agreement_no)
                .execute(conn)?;
            diesel::sql_query(
                "INSERT INTO coresim_code (agreement_no, code, issued_at) VALUES ($1, $2, $3)",
            )
            .bind::<Text, _>(&request.agreement_no)
            .bind::<Text, _>(&code)
            .bind::<Timestamptz, _>(Utc::now())
            .execute(conn)
        })
        .map_err(unavailable)?;
        Ok(BindOutcome::CodeSent {
            core_customer: core_customer(&request.account_no),
        })
    }

    fn check_code(&self, agreement_no: &str, code: &str) -> Result<CodeCheck, CoreError> {
        let mut conn = self.conn()?;
        let pending =
            diesel::sql_query("SELECT code, issued_at FROM coresim_code WHERE agreement_no = $1")
                .bind::<Text, _>(agreement_no)
                .get_result::<CodeRow>(&mut *conn)
                .optional()
                .map_err(unavailable)?;
        let Some(pending) = pending else {
            return Ok(CodeCheck::Wrong);
        };
        let expired = Utc::now() - pending.issued_at
            > chrono::Duration::from_std(CODE_TTL).unwrap_or(chrono::Duration::minutes(5));
        if !expired && pending.code != code {
            return Ok(CodeCheck::Wrong);
        }
        diesel::sql_query("DELETE FROM coresim_code WHERE agreement_no = $1")
            .bind::<Text, _>(agreement_no)
            .execute(&mut *conn)
            .map_err(unavailable)?;
        Ok(if expired {
            CodeCheck::Expired
        } else {
            CodeCheck::Valid
        })
    }

    fn post(&self, posting: &Posting) -> Result<PostingOutcome, CoreError> {
        assert!(
            posting.amount_fen > 0,
            "kunpay never posts a non-positive amount"
        );
        let mut conn = self.conn()?;
        // Two deliveries of one posting at once: the second waits on the account lock, then
        // finds the first's row and answers with it.
        conn.transaction(|conn| {
            let account = diesel::sql_query(
                "SELECT name, id_no, phone, balance_fen, frozen FROM coresim_account \
                 WHERE account_no = $1 FOR UPDATE",
            )
            .bind::<Text, _>(&posting.account_no)
            .get_result::<AccountRow>(conn)
            .optional()?;
            match Self::find_posting(conn, posting.txn_id).map_err(as_query_error)? {
                Some(Recorded::Answered(first)) => return Ok(first),
                Some(Recorded::Fenced) => return Ok(PostingOutcome::Rejected(Rejection::TooLate)),
                None => {}
            }
            let outcome = match &account {
                None => PostingOutcome::Rejected(Rejection::UnknownAccount),
                Some(a) if a.frozen => PostingOutcome::Rejected(Rejection::Frozen),
                Some(a) if posting.kind == PostingKind::Debit && a.balance_fen < posting.amount_fen => {
                    PostingOutcome::Rejected(Rejection::InsufficientFunds)
                }
                Some(_) => PostingOutcome::Posted {
                    core_ref: format!("CORE{}", posting.txn_id.simple()),
                },
            };
            if matches!(outcome, PostingOutcome::Posted { .. }) {
                let delta = match posting.kind {
                    PostingKind::Debit => -posting.amount_fen,
                    PostingKind::Credit => posting.amount_fen,
                };
                diesel::sql_query(
                    "UPDATE coresim_account SET balance_fen = balance_fen + $1 WHERE account_no = $2",
                )
                .bind::<BigInt, _>(delta)
                .bind::<Text, _>(&posting.account_no)
                .execute(conn)?;
            }
            let (status, core_ref, reason) = match &outcome {
                PostingOutcome::Posted { core_ref } => ("POSTED", Some(core_ref.clone()), None),
                PostingOutcome::Rejected(r) => ("REJECTED", None, Some(reason_name(*r))),
            };
            diesel::sql_query(
                "INSERT INTO coresim_posting (txn_id, kind, account_no, amount_fen, status, core_ref, reason, posted_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind::<diesel::sql_types::Uuid, _>(posting.txn_id)
            .bind::<Text, _>(kind_name(posting.kind))
            .bind::<Text, _>(&posting.account_no)
            .bind::<BigInt, _>(posting.amount_fen)
            .bind::<Text, _>(status)
            .bind::<Nullable<Text>, _>(core_ref)
            .bind::<Nullable<Text>, _>(reason)
            .bind::<Timestamptz, _>(Utc::now())
            .execute(conn)?;
            Ok(outcome)
        })
        .map_err(|e: diesel::result::Error| unavailable(e))
    }

    fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError> {
        let mut conn = self.conn()?;
        match Self::find_posting(&mut conn, txn_id)? {
            Some(Recorded::Answered(outcome)) => Ok(Some(outcome)),
            Some(Recorded::Fenced) => Ok(None),
            None => {
                if self.fence_queries {
                    Self::fence(&mut conn, txn_id).map_err(unavailable)?;
                }
                Ok(None)
            }
        }
    }

    fn reverse(&self, reversal: &Reversal) -> Result<ReversalOutcome, CoreError> {
        let mut conn = self.conn()?;
        conn.transaction(|conn| {
            let Some(row) = Self::find_row(conn, reversal.txn_id, true)? else {
                Self::fence(conn, reversal.txn_id)?;
                return Ok(ReversalOutcome::NothingPosted);
            };
            if row.status != "POSTED" {
                return Ok(ReversalOutcome::NothingPosted);
            }
            if let Some(core_ref) = row.reversal_ref {
                return Ok(ReversalOutcome::Reversed { core_ref });
            }
            if row.kind.as_deref() != Some(kind_name(reversal.kind))
                || row.account_no.as_deref() != Some(reversal.account_no.as_str())
                || row.amount_fen != Some(reversal.amount_fen)
            {
                return Ok(ReversalOutcome::Refused(ReversalRefusal::DoesNotMatch));
            }
            let account = diesel::sql_query(
                "SELECT name, id_no, phone, balance_fen, frozen FROM coresim_account \
                 WHERE account_no = $1 FOR UPDATE",
            )
            .bind::<Text, _>(&reversal.account_no)
            .get_result::<AccountRow>(conn)?;
            if account.frozen {
                return Ok(ReversalOutcome::Refused(ReversalRefusal::Frozen));
            }
            let delta = match reversal.kind {
                PostingKind::Debit => reversal.amount_fen,
                PostingKind::Credit if account.balance_fen < reversal.amount_fen => {
                    return Ok(ReversalOutcome::Refused(ReversalRefusal::InsufficientFunds));
                }
                PostingKind::Credit => -reversal.amount_fen,
            };
            diesel::sql_query(
                "UPDATE coresim_account SET balance_fen = balance_fen + $1 WHERE account_no = $2",
            )
            .bind::<BigInt, _>(delta)
            .bind::<Text, _>(&reversal.account_no)
            .execute(conn)?;
            let core_ref = format!("REV{}", reversal.txn_id.simple());
            diesel::sql_query(
                "UPDATE coresim_posting SET reversal_ref = $1, reversed_at = $2 WHERE txn_id = $3",
            )
            .bind::<Text, _>(&core_ref)
            .bind::<Timestamptz, _>(Utc::now())
            .bind::<diesel::sql_types::Uuid, _>(reversal.txn_id)
            .execute(conn)?;
            Ok(ReversalOutcome::Reversed { core_ref })
        })
        .map_err(|e: diesel::result::Error| unavailable(e))
    }
}
