//! The link to core banking: what kunpay asks of the bank's core and what it gets back.
//!
//! Owns: the `CoreLink` trait every transport implements (the in-process simulator here, the
//! MQ bridge later) and the request/reply types. Postings are identified by kunpay's
//! transaction id, and a core must treat a repeated id as the same posting: that is what makes
//! retries and UNKNOWN resolution safe.
//! Must never: decide a transaction's outcome by guessing; a timeout is `CoreError::Timeout`,
//! which the flow records as UNKNOWN and resolves with `query_posting`. A posting the core
//! applied after kunpay recorded it as failed is undone with `reverse`, never left silent.

pub mod amqp;
pub mod bridge;
pub mod coresim;
pub mod coresim_config;
pub mod coresim_control;
pub mod sim;
pub mod sim_store;
pub mod transport;
pub mod wire;

use thiserror::Error;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostingKind {
    /// Take money from the customer's account (protocol payment).
    Debit,
    /// Pay money into the customer's account (payout, refund).
    Credit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub txn_id: Uuid,
    pub kind: PostingKind,
    pub account_no: String,
    pub amount_fen: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    InsufficientFunds,
    UnknownAccount,
    Frozen,
    /// The account holder's name does not match the account (credits to a card).
    NameMismatch,
    /// The posting arrived after the core had answered a query for its transaction id with
    /// "never received": that answer stands, so the posting is refused and moves no money.
    TooLate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostingOutcome {
    Posted { core_ref: String },
    Rejected(Rejection),
}

/// Who is binding which account: the core checks the holder's details and sends a code to
/// the phone number it has on file.
#[derive(Debug, Clone)]
pub struct BindRequest {
    pub agreement_no: String,
    pub account_no: String,
    pub account_name: String,
    pub id_no: String,
    pub phone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindOutcome {
    /// The details match; a code went to the customer's phone.
    CodeSent {
        core_customer: String,
    },
    Rejected(BindRejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindRejection {
    UnknownAccount,
    Frozen,
    /// Name, id number or phone do not match the core's records.
    DetailsMismatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    Valid,
    Wrong,
    Expired,
}

/// A request to undo an earlier posting that the core applied after kunpay had already
/// recorded the transaction as failed (冲正). Identified by its own id (the correlation id on a
/// message link) and idempotent by `txn_id`: a transaction is reversed at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reversal {
    pub reversal_id: Uuid,
    /// The posting to undo; `kind`, `account_no` and `amount_fen` are the original posting's,
    /// so the core can check it undoes what it thinks it posted.
    pub txn_id: Uuid,
    pub kind: PostingKind,
    pub account_no: String,
    pub amount_fen: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversalOutcome {
    /// The posting was undone (now or by an earlier delivery of this reversal).
    Reversed { core_ref: String },
    /// The core never applied the posting (rejected, or never received); it now refuses it
    /// for good, so there is nothing to undo.
    NothingPosted,
    /// The core cannot undo it automatically: a person must.
    Refused(ReversalRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReversalRefusal {
    /// Undoing a credit would overdraw the account (the customer spent the money).
    InsufficientFunds,
    Frozen,
    /// Kind, account or amount differ from the posting the core applied under that id.
    DoesNotMatch,
}

impl ReversalRefusal {
    pub fn name(self) -> &'static str {
        match self {
            ReversalRefusal::InsufficientFunds => "INSUFFICIENT_FUNDS",
            ReversalRefusal::Frozen => "FROZEN",
            ReversalRefusal::DoesNotMatch => "DOES_NOT_MATCH",
        }
    }

    pub fn parse(name: &str) -> Option<ReversalRefusal> {
        [
            ReversalRefusal::InsufficientFunds,
            ReversalRefusal::Frozen,
            ReversalRefusal::DoesNotMatch,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// No answer in time: the posting may or may not have happened.
    #[error("core banking did not answer in time")]
    Timeout,
    /// The request certainly did not reach the core.
    #[error("core banking is unavailable: {0}")]
    Unavailable(String),
    /// A posting that could not be handed to the transport now (the broker is away) but is
    /// durably journaled: it is delivered from the outbox (`core_pending`) when the link is
    /// back. The flow records UNKNOWN and answers "processing".
    #[error("queued for core banking: {0}")]
    Queued(String),
}

/// What kunpay needs from core banking. Implementations are called from an institution's
/// worker threads and must be safe to call concurrently.
pub trait CoreLink: Send + Sync {
    fn request_binding(&self, request: &BindRequest) -> Result<BindOutcome, CoreError>;
    fn check_code(&self, agreement_no: &str, code: &str) -> Result<CodeCheck, CoreError>;
    /// Idempotent by `posting.txn_id`: a repeat returns the first outcome and moves no money.
    fn post(&self, posting: &Posting) -> Result<PostingOutcome, CoreError>;
    /// The outcome of an earlier `post`, or `None` if the core never received it. A `None`
    /// is final: a core must refuse the posting if it arrives later (`Rejection::TooLate`),
    /// because kunpay records the transaction as failed on that answer.
    fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError>;
    /// Undoes a posting applied after kunpay recorded its transaction as failed. Idempotent by
    /// `reversal.txn_id`; an id the core never saw is fenced (a later posting is `TooLate`).
    fn reverse(&self, reversal: &Reversal) -> Result<ReversalOutcome, CoreError>;
}
