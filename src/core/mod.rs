//! The link to core banking: what kunpay asks of the bank's core and what it gets back.
//!
//! Owns: the `CoreLink` trait every transport implements (the in-process simulator here, the
//! MQ bridge later) and the request/reply types. Postings are identified by kunpay's
//! transaction id, and a core must treat a repeated id as the same posting: that is what makes
//! retries and UNKNOWN resolution safe.
//! Must never: decide a transaction's outcome by guessing; a timeout is `CoreError::Timeout`,
//! which the flow records as UNKNOWN and resolves with `query_posting`.

pub mod amqp;
pub mod bridge;
pub mod coresim;
pub mod sim;
pub mod sim_store;
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
    /// The outcome of an earlier `post`, or `None` if the core never received it.
    fn query_posting(&self, txn_id: Uuid) -> Result<Option<PostingOutcome>, CoreError>;
}
