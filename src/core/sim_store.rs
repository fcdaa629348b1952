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
    PostingOutcome, Rejection,
};
use crate::db::{self, Pool};

const SCHEMA: &str = include_str!("../../sql/coresim.sql");

pub struct PgLedger {
    pool: Pool,
}

#[derive(QueryableByName)]
struct PostingRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<Text>)]
    core_ref: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    reason: Option<String>,
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
    }
}

fn outcome_of(row: PostingRow) -> Result<PostingOutcome, CoreError> {
    match (row.status.as_str(), row.core_ref, row.reason.as_deref()) {
        ("POSTED", Some(core_ref), _) => Ok(PostingOutcome::Posted { core_ref }),
        ("REJECTED", _, Some(reason)) => Ok(PostingOutcome::Rejected(match reason {
            "INSUFFICIENT_FUNDS" => Rejection::InsufficientFunds,
            "UNKNOWN_ACCOUNT" => Rejection::UnknownAccount,
            "FROZEN" => Rejection::Frozen,
            "NAME_MISMATCH" => Rejection::NameMismatch,
            other => return Err(unavailable(format!("unknown rejection {other}"))),
        })),
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
        Ok(PgLedger { pool })
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

    fn find_posting(
        conn: &mut PgConnection,
        txn_id: Uuid,
    ) -> Result<Option<PostingOutcome>, CoreError> {
        diesel::sql_query("SELECT status, core_ref, reason FROM coresim_posting WHERE txn_id = $1")
            .bind::<diesel::sql_types::Uuid, _>(txn_id)
            .get_result::<PostingRow>(conn)
            .optional()
            .map_err(unavailable)?
            .map(outcome_of)
            .transpose()
    }
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
            if let Some(first) = Self::find_posting(conn, posting.txn_id)
                .map_err(|e| diesel::result::Error::QueryBuilderError(e.to_string().into()))?
            {
                return Ok(first);
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
            .bind::<Text, _>(match posting.kind {
                PostingKind::Debit => "DEBIT",
                PostingKind::Credit => "CREDIT",
            })
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
        Self::find_posting(&mut conn, txn_id)
    }
}
