//! Payment flows: what each verified request does to the journal and the core, and the signed
//! answer it gets.
//!
//! Owns: agreement signing (apply, confirm), termination, debit, credit, refund, and the two
//! queries; idempotency by (institution, request serial); limits; the order of writes around
//! the core call (the transaction is durably SENT_TO_CORE before the core hears of it, so a
//! crash leaves something to resolve, never something forgotten).
//! Must never: post to the core twice for one transaction id, answer from memory what the
//! journal does not hold, or turn a core timeout into a success or a failure by guessing.

pub mod journal;
pub mod request;
pub mod screening;
pub mod state;

use chrono::{DateTime, SecondsFormat, Utc};
use diesel::Connection as _;
use diesel::pg::PgConnection;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::channel::codes::ResultCode;
use crate::channel::envelope::MessageKey;
use crate::channel::message::{MessageWriter, attach_signature};
use crate::config::InstitutionConfig;
use crate::core::{
    BindOutcome, BindRejection, BindRequest, CodeCheck, CoreError, CoreLink, Posting, PostingKind,
    PostingOutcome, Rejection, Reversal, ReversalOutcome,
};
use crate::crypto::sm2::Signer;
use crate::logging::mask;
use journal::{FirstSight, JournalError, NewTxn};
use request::{MsgType, Request};
use state::TxnState;

/// Wrong verification codes allowed before an agreement application expires.
pub const MAX_CODE_ATTEMPTS: i32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("signing the response failed: {0}")]
    Sign(String),
    #[error("stored account data cannot be decrypted: {0}")]
    DataKey(String),
}

/// Everything a flow needs that does not change per request.
pub struct Flows {
    pub bank_id: String,
    pub sign_key_serial: String,
    pub signer: Signer,
    data_key: MessageKey,
    /// Keys the idempotency digests so they cannot be brute-forced back to card numbers.
    digest_key: Zeroizing<[u8; 16]>,
    /// An UNKNOWN transaction younger than this is settled by delivering its posting again
    /// (the core answers a repeat with its first outcome, or applies it now if it never got
    /// it: the outbox); an older one only by a query. Zero: query only.
    redeliver_within: chrono::Duration,
    /// The risk stage; `None` when the configuration has no `[risk]` section.
    screening: Option<screening::Screening>,
}

/// The answer for one request: signed bytes, and the code for metrics and logs.
#[derive(Debug, Clone)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub code: ResultCode,
}

/// The risk stage's verdict until rules exist (issue 5): every transaction passes, and the
/// history says so.
const NO_RISK_RULES: journal::Opening<'static> = journal::Opening {
    risk_reason: "approved: no risk rules configured",
    open_as: journal::OpenAs::SentToCore,
    decision: None,
};

/// A refund returns money of a debit that passed risk; it is not decided again.
const REFUND_NOT_SCREENED: journal::Opening<'static> = journal::Opening {
    risk_reason: "approved: a refund returns part of a debit that passed risk control",
    open_as: journal::OpenAs::SentToCore,
    decision: None,
};

/// A debit or credit as it arrived, verified and parsed.
struct Arriving<'a> {
    inst: &'a InstitutionConfig,
    /// The institution's group commit for the opening and outcome statements.
    group: &'a journal::group::Group,
    msg_id: &'a str,
    serial: &'a str,
    amount_fen: i64,
    context: &'a request::PaymentContext,
    digests: &'a str,
    now: DateTime<Utc>,
}

/// What answering a debit or credit from its first statement needs to know of the request.
struct FirstRequest<'a> {
    inst: &'a InstitutionConfig,
    msg_type: MsgType,
    serial: &'a str,
    amount_fen: i64,
    digests: &'a str,
    now: DateTime<Utc>,
}

fn new_posting<'a>(
    inst: &'a InstitutionConfig,
    serial: &'a str,
    amount_fen: i64,
    now: DateTime<Utc>,
) -> journal::NewPosting<'a> {
    journal::NewPosting {
        txn_id: Uuid::now_v7(),
        inst_id: &inst.id,
        req_serial: serial,
        amount_fen,
        daily_limit_fen: inst.daily_limit_fen,
        business_date: business_date(now),
        now,
    }
}

/// What a posting's result means for its transaction: the state, the code, the history reason
/// and the core's reference.
fn posting_result(
    outcome: &Result<PostingOutcome, CoreError>,
) -> (TxnState, ResultCode, String, Option<&str>) {
    match outcome {
        Ok(PostingOutcome::Posted { core_ref }) => (
            TxnState::Succeeded,
            ResultCode::Success,
            "core posted".to_string(),
            Some(core_ref.as_str()),
        ),
        Ok(PostingOutcome::Rejected(rejection)) => {
            let code = rejection_code(*rejection);
            (
                TxnState::Failed,
                code,
                format!("core rejected: {}", code.meaning()),
                None,
            )
        }
        Err(CoreError::Timeout) => (
            TxnState::Unknown,
            ResultCode::Processing,
            "core did not answer in time; to be resolved by query".to_string(),
            None,
        ),
        Err(CoreError::Queued(why)) => (
            TxnState::Unknown,
            ResultCode::Processing,
            format!("queued for the core ({why}); delivered from the outbox when the link is back"),
            None,
        ),
        Err(CoreError::Unavailable(why)) => (
            TxnState::Failed,
            ResultCode::CoreUnavailable,
            format!("core unavailable, nothing posted: {why}"),
            None,
        ),
    }
}

/// A transaction as a `QUERY` answer and a notification show it (docs/protocol.md).
fn txn_fields(row: &journal::TxnRow) -> [(&'static str, String); 8] {
    [
        ("TxnId", row.txn_id.simple().to_string()),
        ("TxnKind", row.kind.clone()),
        ("TxnStatus", row.state.clone()),
        ("TxnRsltCd", row.result_code.clone().unwrap_or_default()),
        ("Amt", row.amount_fen.to_string()),
        ("RefundedAmt", row.refunded_fen.to_string()),
        ("AcctNoMasked", row.account_masked.clone()),
        (
            "TxnDtTm",
            row.created_at
                .with_timezone(&china())
                .to_rfc3339_opts(SecondsFormat::Secs, false),
        ),
    ]
}

/// `MsgTp` of a result notification.
pub const NOTIFY_MSG_TP: &str = "TXN_NOTIFY";

/// What [`Flows::execute`] did with a request.
#[derive(Debug)]
pub enum Executed {
    /// Its message id was used before: nothing was done; refuse it as a replay.
    Replay,
    Answered(Reply),
}

/// The business part of an answer, before header and signature.
struct Answer {
    code: ResultCode,
    detail: Option<String>,
    fields: Vec<(&'static str, String)>,
    txn_id: Option<Uuid>,
}

impl Answer {
    fn code(code: ResultCode) -> Answer {
        Answer {
            code,
            detail: None,
            fields: Vec::new(),
            txn_id: None,
        }
    }
    fn detail(code: ResultCode, detail: impl Into<String>) -> Answer {
        Answer {
            detail: Some(detail.into()),
            ..Answer::code(code)
        }
    }
}

fn sm3_hex(data: &[u8]) -> String {
    hex::encode(crate::crypto::sm3::digest(data))
}

/// SM3 over institution id and account number: lookups and limits without plaintext.
fn account_hash(inst_id: &str, account_no: &str) -> String {
    sm3_hex(format!("{inst_id}\u{0}{account_no}").as_bytes())
}

impl Flows {
    /// `data_key` encrypts account numbers at rest in the journal (postings need them back).
    pub fn new(
        bank_id: String,
        sign_key_serial: String,
        signer: Signer,
        data_key: [u8; 16],
    ) -> Flows {
        Flows {
            bank_id,
            sign_key_serial,
            signer,
            data_key: MessageKey::from_bytes(data_key),
            digest_key: Zeroizing::new(
                crate::crypto::sm3::hmac_sm3(&data_key, b"kunpay idempotency digest v1")[..16]
                    .try_into()
                    .expect("16 bytes"),
            ),
            redeliver_within: chrono::Duration::zero(),
            screening: None,
        }
    }

    /// Settle UNKNOWN transactions younger than `within` by delivering their posting again.
    pub fn with_redelivery(mut self, within: std::time::Duration) -> Flows {
        self.redeliver_within =
            chrono::Duration::from_std(within).unwrap_or(chrono::Duration::zero());
        self
    }

    /// The posting a journaled transaction stands for.
    fn posting_of(&self, row: &journal::TxnRow) -> Result<Posting, FlowError> {
        Ok(Posting {
            txn_id: row.txn_id,
            kind: match row.kind.as_str() {
                "DEBIT" => PostingKind::Debit,
                "CREDIT" | "REFUND" => PostingKind::Credit,
                other => {
                    return Err(JournalError::Corrupt(format!("transaction kind {other}")).into());
                }
            },
            account_no: self.open_account(&row.account_enc)?.to_string(),
            amount_fen: row.amount_fen,
        })
    }

    /// Per-field keyed digests of a request's decrypted body, in a stable text form: a retry
    /// that re-encrypts the same values under a new envelope has the same digests.
    pub fn field_digests(&self, fields: &request::DecryptedFields) -> String {
        let mut sorted: Vec<&(String, Zeroizing<String>)> = fields.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted
            .iter()
            .map(|(name, value)| {
                let mac = crate::crypto::sm3::hmac_sm3(
                    self.digest_key.as_ref(),
                    format!("{name}\u{0}{}", value.as_str()).as_bytes(),
                );
                format!("{name}={}", hex::encode(&mac[..12]))
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Builds and signs a response in the institution's signature format.
    #[allow(clippy::too_many_arguments)]
    pub fn respond(
        &self,
        inst: &InstitutionConfig,
        msg_type: MsgType,
        serial: Option<&str>,
        code: ResultCode,
        detail: Option<&str>,
        fields: &[(&str, String)],
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        let mut w = self.header(
            inst,
            &msg_type.response_name(),
            &Uuid::now_v7().simple().to_string(),
            now,
        );
        w.field("RsltCd", code.code())
            .field("RsltMsg", detail.unwrap_or(code.meaning()));
        if let Some(serial) = serial {
            w.field("ReqSerial", serial);
        }
        for (name, value) in fields {
            if *name == "Txns" {
                // Pre-rendered list (range query): value holds escaped <Txn> elements.
                w.open("Txns");
                w.raw(value);
                w.close("Txns");
            } else {
                w.field(name, value);
            }
        }
        Ok(Reply {
            bytes: self.sign(inst, w)?,
            code,
        })
    }

    /// A message to `inst` with our header, ready for its body.
    fn header(
        &self,
        inst: &InstitutionConfig,
        msg_tp: &str,
        msg_id: &str,
        now: DateTime<Utc>,
    ) -> MessageWriter {
        let mut w = MessageWriter::new();
        w.field("MsgTp", msg_tp)
            .field("SndInstId", &self.bank_id)
            .field("RcvInstId", &inst.id)
            .field("SgnSN", &self.sign_key_serial)
            .field(
                "SndDtTm",
                &now.with_timezone(&china())
                    .to_rfc3339_opts(SecondsFormat::Secs, false),
            )
            .field("MsgId", msg_id)
            .body();
        w
    }

    /// Closes the message and appends our signature over its exact bytes.
    fn sign(&self, inst: &InstitutionConfig, w: MessageWriter) -> Result<Vec<u8>, FlowError> {
        let signed = w.finish().into_bytes();
        let signature = self
            .signer
            .sign(&signed, inst.signature_format)
            .map_err(|e| FlowError::Sign(e.to_string()))?;
        Ok(attach_signature(signed, &signature))
    }

    /// The signed result notification for a transaction as it stands now: `MsgTp`
    /// `TXN_NOTIFY`, `MsgId` the event id (the same on every attempt, so the institution can
    /// deduplicate), the fields of a single-transaction query (docs/protocol.md).
    pub fn notification(
        &self,
        inst: &InstitutionConfig,
        row: &journal::TxnRow,
        event_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Vec<u8>, FlowError> {
        let mut w = self.header(inst, NOTIFY_MSG_TP, &event_id.simple().to_string(), now);
        w.field("EventId", &event_id.simple().to_string())
            .field("ReqSerial", &row.req_serial);
        for (name, value) in txn_fields(row) {
            w.field(name, &value);
        }
        self.sign(inst, w)
    }

    /// Runs one verified, parsed request: records its `msg_id` (a replay is refused), then
    /// answers a repeated serial from the stored answer or runs the flow. `digests` identifies
    /// the request's content for idempotency.
    #[allow(clippy::too_many_arguments)]
    pub fn execute(
        &self,
        conn: &mut PgConnection,
        group: &journal::group::Group,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        msg_type: MsgType,
        msg_id: &str,
        request: Request,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Executed, FlowError> {
        // Debits and credits record their message id and look up their serial in the statement
        // that opens them (one round trip fewer); the others do both first.
        if let Request::Debit {
            serial,
            agreement_no,
            amount_fen,
            context,
        } = &request
        {
            return self.debit(
                conn,
                core,
                &Arriving {
                    inst,
                    group,
                    msg_id,
                    serial,
                    amount_fen: *amount_fen,
                    context,
                    digests,
                    now,
                },
                agreement_no,
            );
        }
        if let Request::Credit {
            serial,
            account_no,
            amount_fen,
            context,
            ..
        } = &request
        {
            return self.credit(
                conn,
                core,
                &Arriving {
                    inst,
                    group,
                    msg_id,
                    serial,
                    amount_fen: *amount_fen,
                    context,
                    digests,
                    now,
                },
                account_no,
            );
        }
        let serial = request.serial().map(str::to_string);
        let stored = match &serial {
            Some(serial) => {
                match journal::remember_and_find(conn, &inst.id, msg_id, serial, now)? {
                    journal::Remembered::Replay => return Ok(Executed::Replay),
                    journal::Remembered::Fresh(stored) => stored,
                }
            }
            None => {
                if !journal::remember_message(conn, &inst.id, msg_id, now)? {
                    return Ok(Executed::Replay);
                }
                None
            }
        };
        self.run(
            conn, core, inst, msg_type, serial, stored, request, digests, now,
        )
        .map(Executed::Answered)
    }

    /// A serial seen before: its stored answer byte for byte if the content is the same,
    /// otherwise 3009 naming the fields that differ.
    fn answer_repeat(
        &self,
        inst: &InstitutionConfig,
        msg_type: MsgType,
        serial: &str,
        stored: journal::StoredResponse,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        if stored.field_digests == digests && stored.msg_type == msg_type.name() {
            return Ok(Reply {
                code: code_from(&stored.result_code),
                bytes: stored.response,
            });
        }
        let differing = differing_fields(
            &stored.field_digests,
            digests,
            &stored.msg_type,
            msg_type.name(),
        );
        self.respond(
            inst,
            msg_type,
            Some(serial),
            ResultCode::SerialReusedWithDifferentContent,
            Some(&format!(
                "ReqSerial {serial} was used before with different {differing}"
            )),
            &[],
            now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        msg_type: MsgType,
        serial: Option<String>,
        stored: Option<journal::StoredResponse>,
        request: Request,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        if let (Some(serial), Some(stored)) = (&serial, stored) {
            return self.answer_repeat(inst, msg_type, serial, stored, digests, now);
        }
        let answer = match request {
            Request::AgreementApply {
                serial,
                account_no,
                account_name,
                id_no,
                phone,
            } => self.agreement_apply(
                conn,
                core,
                inst,
                &serial,
                account_no,
                account_name,
                id_no,
                phone,
                digests,
                now,
            )?,
            Request::AgreementConfirm {
                serial,
                agreement_no,
                code,
            } => self.agreement_confirm(
                conn,
                core,
                inst,
                &serial,
                &agreement_no,
                &code,
                digests,
                now,
            )?,
            Request::AgreementTerminate {
                serial,
                agreement_no,
            } => self.agreement_terminate(conn, inst, &serial, &agreement_no, digests, now)?,
            Request::Debit { .. } => unreachable!("execute runs debits itself"),
            Request::Credit { .. } => unreachable!("execute runs credits itself"),
            Request::Refund {
                serial,
                orig_serial,
                amount_fen,
            } => self.refund(
                conn,
                core,
                inst,
                &serial,
                &orig_serial,
                amount_fen,
                digests,
                now,
            )?,
            Request::Query { serial } => return self.query(conn, core, inst, &serial, now),
            Request::QueryRange {
                start,
                end,
                page_no,
                page_size,
            } => {
                return self.query_range(
                    conn,
                    inst,
                    start.with_timezone(&Utc),
                    end.with_timezone(&Utc),
                    page_no,
                    page_size,
                    now,
                );
            }
        };
        match answer {
            Stored(reply) => Ok(reply),
            Unstored(answer) => self.respond(
                inst,
                msg_type,
                serial.as_deref(),
                answer.code,
                answer.detail.as_deref(),
                &answer.fields,
                now,
            ),
        }
    }

    /// Signs the answer and stores it as the idempotent response in the caller's transaction.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        conn: &mut PgConnection,
        inst: &InstitutionConfig,
        msg_type: MsgType,
        serial: &str,
        digests: &str,
        answer: Answer,
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        let reply = self.respond(
            inst,
            msg_type,
            Some(serial),
            answer.code,
            answer.detail.as_deref(),
            &answer.fields,
            now,
        )?;
        journal::store_response(
            conn,
            &inst.id,
            serial,
            msg_type.name(),
            digests,
            &reply.bytes,
            answer.code.code(),
            answer.txn_id,
            now,
        )?;
        Ok(reply)
    }

    /// The account number as the journal stores it (SM4-GCM under the data key).
    pub fn seal_account(&self, account_no: &str) -> Result<String, FlowError> {
        self.data_key
            .encrypt_field("account", account_no)
            .map_err(|e| FlowError::DataKey(e.to_string()))
    }

    fn open_account(&self, sealed: &str) -> Result<Zeroizing<String>, FlowError> {
        self.data_key
            .decrypt_field("account", sealed)
            .map_err(|e| FlowError::DataKey(e.to_string()))
    }

    #[allow(clippy::too_many_arguments)]
    fn agreement_apply(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        serial: &str,
        account_no: Zeroizing<String>,
        account_name: Zeroizing<String>,
        id_no: Zeroizing<String>,
        phone: Zeroizing<String>,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, FlowError> {
        let hash = account_hash(&inst.id, &account_no);
        if journal::active_agreement_exists(conn, &inst.id, &hash)? {
            return Ok(Unstored(Answer::code(ResultCode::AgreementAlreadyActive)));
        }
        let agreement_no = Uuid::new_v4().simple().to_string();
        let outcome = core.request_binding(&BindRequest {
            agreement_no: agreement_no.clone(),
            account_no: account_no.to_string(),
            account_name: account_name.to_string(),
            id_no: id_no.to_string(),
            phone: phone.to_string(),
        });
        let core_customer = match outcome {
            Ok(BindOutcome::CodeSent { core_customer }) => core_customer,
            Ok(BindOutcome::Rejected(BindRejection::UnknownAccount)) => {
                return Ok(Unstored(Answer::code(ResultCode::AccountUnknown)));
            }
            Ok(BindOutcome::Rejected(BindRejection::Frozen)) => {
                return Ok(Unstored(Answer::code(ResultCode::AccountFrozen)));
            }
            Ok(BindOutcome::Rejected(BindRejection::DetailsMismatch)) => {
                return Ok(Unstored(Answer::detail(
                    ResultCode::InvalidField,
                    "the account holder's name, id number or phone do not match the bank's records",
                )));
            }
            Err(e) => return Ok(Unstored(core_unavailable(&e))),
        };
        let sealed = self.seal_account(&account_no)?;
        let holder = self.seal_holder(&id_no, &phone)?;
        let masked = mask::card_number(&account_no);
        conn.transaction(|conn| {
            journal::insert_agreement(
                conn,
                &journal::NewAgreement {
                    agreement_no: &agreement_no,
                    inst_id: &inst.id,
                    account_hash: &hash,
                    account_masked: &masked,
                    account_enc: &sealed,
                    holder_enc: &holder,
                    core_customer: &core_customer,
                },
                now,
            )?;
            let answer = Answer {
                fields: vec![
                    ("AgrmtNo", agreement_no.clone()),
                    ("AgrmtStatus", "PENDING".into()),
                    ("AcctNoMasked", masked.clone()),
                ],
                ..Answer::code(ResultCode::Success)
            };
            self.store(
                conn,
                inst,
                MsgType::AgreementApply,
                serial,
                digests,
                answer,
                now,
            )
        })
        .map(Stored)
    }

    #[allow(clippy::too_many_arguments)]
    fn agreement_confirm(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        serial: &str,
        agreement_no: &str,
        code: &str,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, FlowError> {
        conn.transaction(|conn| {
            let Some(agreement) = journal::lock_agreement(conn, &inst.id, agreement_no)? else {
                return Ok(Unstored(Answer::code(ResultCode::AgreementNotFound)));
            };
            match agreement.state.as_str() {
                "PENDING" => {}
                "ACTIVE" => return Ok(Unstored(Answer::code(ResultCode::AgreementAlreadyActive))),
                _ => return Ok(Unstored(Answer::code(ResultCode::AgreementNotActive))),
            }
            let check = match core.check_code(agreement_no, code) {
                Ok(check) => check,
                Err(e) => return Ok(Unstored(core_unavailable(&e))),
            };
            let answer = match check {
                CodeCheck::Valid => {
                    let moved = journal::set_agreement_state(conn, agreement_no, "PENDING", "ACTIVE", now)?;
                    assert!(moved, "the agreement row is locked in PENDING");
                    Answer {
                        fields: vec![("AgrmtNo", agreement_no.to_string()), ("AgrmtStatus", "ACTIVE".into())],
                        ..Answer::code(ResultCode::Success)
                    }
                }
                CodeCheck::Wrong => {
                    let attempts = journal::count_code_attempt(conn, agreement_no)?;
                    if attempts >= MAX_CODE_ATTEMPTS {
                        journal::set_agreement_state(conn, agreement_no, "PENDING", "EXPIRED", now)?;
                        Answer::detail(
                            ResultCode::VerificationCodeInvalid,
                            format!("wrong verification code; {MAX_CODE_ATTEMPTS} attempts used, the application expired"),
                        )
                    } else {
                        // Not stored: the customer may retype the code under a new serial.
                        return Ok(Unstored(Answer::detail(
                            ResultCode::VerificationCodeInvalid,
                            format!("wrong verification code; {} attempt(s) left", MAX_CODE_ATTEMPTS - attempts),
                        )));
                    }
                }
                CodeCheck::Expired => {
                    journal::set_agreement_state(conn, agreement_no, "PENDING", "EXPIRED", now)?;
                    Answer::detail(ResultCode::VerificationCodeInvalid, "the verification code expired; apply again")
                }
            };
            self.store(conn, inst, MsgType::AgreementConfirm, serial, digests, answer, now).map(Stored)
        })
    }

    fn agreement_terminate(
        &self,
        conn: &mut PgConnection,
        inst: &InstitutionConfig,
        serial: &str,
        agreement_no: &str,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, FlowError> {
        conn.transaction(|conn| {
            let Some(agreement) = journal::lock_agreement(conn, &inst.id, agreement_no)? else {
                return Ok(Unstored(Answer::code(ResultCode::AgreementNotFound)));
            };
            if agreement.state != "ACTIVE" {
                return Ok(Unstored(Answer::detail(
                    ResultCode::AgreementNotActive,
                    format!("the agreement is {}", agreement.state),
                )));
            }
            let moved =
                journal::set_agreement_state(conn, agreement_no, "ACTIVE", "TERMINATED", now)?;
            assert!(moved, "the agreement row is locked in ACTIVE");
            let answer = Answer {
                fields: vec![
                    ("AgrmtNo", agreement_no.to_string()),
                    ("AgrmtStatus", "TERMINATED".into()),
                ],
                ..Answer::code(ResultCode::Success)
            };
            self.store(
                conn,
                inst,
                MsgType::AgreementTerminate,
                serial,
                digests,
                answer,
                now,
            )
            .map(Stored)
        })
    }

    /// A debit from first sight: the risk decision (when configured), then message id, stored
    /// answer, limits and opening in one statement, then the core and the outcome.
    fn debit(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        arriving: &Arriving<'_>,
        agreement_no: &str,
    ) -> Result<Executed, FlowError> {
        let inst = arriving.inst;
        let within_single_limit = arriving.amount_fen <= inst.single_limit_fen;
        let screened = match &self.screening {
            Some(screening) if within_single_limit => match self.screen_debit(
                conn,
                screening,
                inst,
                agreement_no,
                arriving.amount_fen,
                arriving.context,
                arriving.now,
            )? {
                Ok(screened) => Some(screened),
                Err(undecidable) => {
                    return self.answer_undecidable(conn, arriving, MsgType::Debit, undecidable);
                }
            },
            _ => None,
        };
        let new = new_posting(inst, arriving.serial, arriving.amount_fen, arriving.now);
        let row = screened
            .as_ref()
            .map(|s| s.row("DEBIT", arriving.amount_fen));
        let opening = match (&screened, &row) {
            (Some(screened), Some(row)) => screened.opening(row),
            _ => NO_RISK_RULES,
        };
        let opened = journal::open_debit(
            conn,
            arriving.group,
            &new,
            &journal::Arrival {
                msg_id: arriving.msg_id,
                record: true,
            },
            agreement_no,
            within_single_limit,
            &opening,
        );
        let (sight, sealed) = match opened {
            Ok((sight, sealed)) => (Ok(sight), sealed),
            Err(e) => (Err(e), None),
        };
        if let Some(answered) =
            self.answer_unopened(conn, arriving, MsgType::Debit, sight, screened.as_ref())?
        {
            return Ok(answered);
        }
        if let Some(answered) =
            self.answer_screened(conn, arriving, MsgType::Debit, &new, &screened)?
        {
            return Ok(answered);
        }
        let sealed = sealed.expect("an opened debit has its agreement's account");
        let posting = Posting {
            txn_id: new.txn_id,
            kind: PostingKind::Debit,
            account_no: self.open_account(&sealed)?.to_string(),
            amount_fen: arriving.amount_fen,
        };
        self.finish_posting(
            conn,
            Some((arriving.group, journal::group::LockKey::debit(agreement_no))),
            core,
            inst,
            MsgType::Debit,
            arriving.serial,
            arriving.digests,
            &posting,
            arriving.now,
        )
        .map(Executed::Answered)
    }

    /// A credit from first sight, as [`Flows::debit`]: the risk decision, then message id,
    /// stored answer, limits and opening in one statement, then the core and the outcome.
    fn credit(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        arriving: &Arriving<'_>,
        account_no: &str,
    ) -> Result<Executed, FlowError> {
        let inst = arriving.inst;
        let within_single_limit = arriving.amount_fen <= inst.single_limit_fen;
        let screened = match &self.screening {
            Some(screening) if within_single_limit => Some(self.screen_credit(
                screening,
                inst,
                account_no,
                arriving.amount_fen,
                arriving.context,
                arriving.now,
            )?),
            _ => None,
        };
        let new = new_posting(inst, arriving.serial, arriving.amount_fen, arriving.now);
        let hash = account_hash(&inst.id, account_no);
        let masked = mask::card_number(account_no);
        let sealed = match self.seal_account(account_no) {
            Ok(sealed) => sealed,
            Err(e) => {
                if let Some(screened) = &screened {
                    self.withdraw(screened);
                }
                return Err(e);
            }
        };
        let row = screened
            .as_ref()
            .map(|s| s.row("CREDIT", arriving.amount_fen));
        let opening = match (&screened, &row) {
            (Some(screened), Some(row)) => screened.opening(row),
            _ => NO_RISK_RULES,
        };
        let sight = journal::open_credit(
            conn,
            arriving.group,
            &new,
            &journal::Arrival {
                msg_id: arriving.msg_id,
                record: true,
            },
            &journal::Payee {
                account_hash: &hash,
                account_masked: &masked,
                account_enc: &sealed,
            },
            within_single_limit,
            &opening,
        );
        if let Some(answered) =
            self.answer_unopened(conn, arriving, MsgType::Credit, sight, screened.as_ref())?
        {
            return Ok(answered);
        }
        if let Some(answered) =
            self.answer_screened(conn, arriving, MsgType::Credit, &new, &screened)?
        {
            return Ok(answered);
        }
        let posting = Posting {
            txn_id: new.txn_id,
            kind: PostingKind::Credit,
            account_no: account_no.to_string(),
            amount_fen: arriving.amount_fen,
        };
        self.finish_posting(
            conn,
            Some((arriving.group, journal::group::LockKey::credit(&hash))),
            core,
            inst,
            MsgType::Credit,
            arriving.serial,
            arriving.digests,
            &posting,
            arriving.now,
        )
        .map(Executed::Answered)
    }

    /// The answer when the opening statement did not open the transaction (`None`: it did).
    /// A decision made for it is withdrawn from the velocity store: nothing was journaled.
    fn answer_unopened(
        &self,
        conn: &mut PgConnection,
        arriving: &Arriving<'_>,
        msg_type: MsgType,
        sight: Result<FirstSight, diesel::result::Error>,
        screened: Option<&screening::Screened>,
    ) -> Result<Option<Executed>, FlowError> {
        let opened = matches!(sight, Ok(FirstSight::Opened));
        if !opened && let Some(screened) = screened {
            self.withdraw(screened);
        }
        let first = FirstRequest {
            inst: arriving.inst,
            msg_type,
            serial: arriving.serial,
            amount_fen: arriving.amount_fen,
            digests: arriving.digests,
            now: arriving.now,
        };
        self.answer_first_sight(conn, &first, sight)
    }

    /// A debit whose agreement cannot be debited, found before risk decided: its message id
    /// is recorded (a replay is refused), a stored answer for its serial wins, otherwise the
    /// agreement's refusal.
    fn answer_undecidable(
        &self,
        conn: &mut PgConnection,
        arriving: &Arriving<'_>,
        msg_type: MsgType,
        undecidable: screening::Undecidable,
    ) -> Result<Executed, FlowError> {
        let sight = match journal::remember_and_find(
            conn,
            &arriving.inst.id,
            arriving.msg_id,
            arriving.serial,
            arriving.now,
        )? {
            journal::Remembered::Replay => FirstSight::Replay,
            journal::Remembered::Fresh(Some(stored)) => FirstSight::Answered(stored),
            journal::Remembered::Fresh(None) => match undecidable {
                screening::Undecidable::NoAgreement => FirstSight::NoAgreement,
                screening::Undecidable::NotActive(state) => FirstSight::AgreementNotActive(state),
            },
        };
        let answered = self.answer_unopened(conn, arriving, msg_type, Ok(sight), None)?;
        Ok(answered.expect("nothing was opened"))
    }

    /// The answer of an opened transaction that risk held or declined (`None`: approved, go
    /// on to the core).
    fn answer_screened(
        &self,
        conn: &mut PgConnection,
        arriving: &Arriving<'_>,
        msg_type: MsgType,
        new: &journal::NewPosting<'_>,
        screened: &Option<screening::Screened>,
    ) -> Result<Option<Executed>, FlowError> {
        let Some(screened) = screened else {
            return Ok(None);
        };
        let inst = arriving.inst;
        let fields = |state: TxnState| {
            vec![
                ("TxnId", new.txn_id.simple().to_string()),
                ("TxnStatus", state.as_str().to_string()),
                ("Amt", arriving.amount_fen.to_string()),
            ]
        };
        match screened.open_as() {
            journal::OpenAs::SentToCore => Ok(None),
            journal::OpenAs::InReview => {
                let answer = Answer {
                    detail: Some(
                        "held for review by the bank's risk control; the result follows as a notification"
                            .into(),
                    ),
                    fields: fields(TxnState::InReview),
                    txn_id: Some(new.txn_id),
                    ..Answer::code(ResultCode::Processing)
                };
                let reply = self.store(
                    conn,
                    inst,
                    msg_type,
                    arriving.serial,
                    arriving.digests,
                    answer,
                    arriving.now,
                )?;
                Ok(Some(Executed::Answered(reply)))
            }
            journal::OpenAs::Received => {
                let code = ResultCode::RiskDeclined;
                let reply = self.respond(
                    inst,
                    msg_type,
                    Some(arriving.serial),
                    code,
                    None,
                    &fields(TxnState::Failed),
                    arriving.now,
                )?;
                let recorded = journal::record_outcome(
                    conn,
                    &journal::OutcomeRecord {
                        txn_id: new.txn_id,
                        from: TxnState::Received,
                        to: TxnState::Failed,
                        reason: screened.reason(),
                        result_code: code.code(),
                        core_ref: None,
                        now: arriving.now,
                        notify: inst.callback_url.is_some(),
                    },
                    Some(&journal::AnswerToStore {
                        inst_id: &inst.id,
                        req_serial: arriving.serial,
                        msg_type: msg_type.name(),
                        field_digests: arriving.digests,
                        response: &reply.bytes,
                    }),
                )?;
                if !recorded {
                    return Err(JournalError::StateMoved {
                        txn_id: new.txn_id,
                        expected: TxnState::Received,
                    }
                    .into());
                }
                Ok(Some(Executed::Answered(reply)))
            }
        }
    }

    /// The answer to a debit or credit whose first statement did not open it (`None`: opened,
    /// go on to the core).
    fn answer_first_sight(
        &self,
        conn: &mut PgConnection,
        first: &FirstRequest<'_>,
        sight: Result<FirstSight, diesel::result::Error>,
    ) -> Result<Option<Executed>, FlowError> {
        let inst = first.inst;
        let refusal = match sight {
            Ok(FirstSight::Opened) => return Ok(None),
            Ok(FirstSight::Replay) => return Ok(Some(Executed::Replay)),
            Ok(FirstSight::Answered(stored)) => {
                let reply = self.answer_repeat(
                    inst,
                    first.msg_type,
                    first.serial,
                    stored,
                    first.digests,
                    first.now,
                )?;
                return Ok(Some(Executed::Answered(reply)));
            }
            // A concurrent request with the same serial inserted it first.
            Err(e) if journal::is_unique_violation(&e) => {
                match self.concurrent_repeat(conn, inst, first.serial)? {
                    Stored(reply) => return Ok(Some(Executed::Answered(reply))),
                    Unstored(answer) => answer,
                }
            }
            Err(e) => return Err(e.into()),
            Ok(FirstSight::OverSingleLimit) => over_single_limit(inst, first.amount_fen),
            Ok(FirstSight::NoAgreement) => Answer::code(ResultCode::AgreementNotFound),
            Ok(FirstSight::AgreementNotActive(state)) => Answer::detail(
                ResultCode::AgreementNotActive,
                format!("the agreement is {state}"),
            ),
            Ok(FirstSight::OverDailyLimit { used }) => {
                over_daily_limit(inst, used, first.amount_fen)
            }
        };
        let reply = self.respond(
            inst,
            first.msg_type,
            Some(first.serial),
            refusal.code,
            refusal.detail.as_deref(),
            &refusal.fields,
            first.now,
        )?;
        Ok(Some(Executed::Answered(reply)))
    }

    #[allow(clippy::too_many_arguments)]
    fn refund(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        serial: &str,
        orig_serial: &str,
        amount_fen: i64,
        digests: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, FlowError> {
        let txn_id = Uuid::now_v7();
        let prepared = conn.transaction(|conn| -> Result<Result<String, Answer>, FlowError> {
            let Some(original) = journal::lock_txn(conn, &inst.id, orig_serial)? else {
                return Ok(Err(Answer::detail(
                    ResultCode::OriginalNotRefundable,
                    format!("no transaction with ReqSerial {orig_serial}"),
                )));
            };
            if original.kind != "DEBIT" || original.state()? != TxnState::Succeeded {
                return Ok(Err(Answer::detail(
                    ResultCode::OriginalNotRefundable,
                    format!(
                        "the original is a {} in state {}",
                        original.kind, original.state
                    ),
                )));
            }
            let remaining = original.amount_fen - original.refunded_fen;
            if amount_fen > remaining {
                return Ok(Err(Answer::detail(
                    ResultCode::RefundExceedsRemaining,
                    format!(
                        "refund of {amount_fen} fen asked, {remaining} fen of {} remain refundable",
                        original.amount_fen
                    ),
                )));
            }
            journal::insert_opened(
                conn,
                &NewTxn {
                    txn_id,
                    inst_id: &inst.id,
                    req_serial: serial,
                    kind: "REFUND",
                    amount_fen,
                    agreement_no: original.agreement_no.as_deref(),
                    orig_txn_id: Some(original.txn_id),
                    account_hash: &original.account_hash,
                    account_masked: &original.account_masked,
                    account_enc: &original.account_enc,
                    business_date: business_date(now),
                    created_at: now,
                },
                if self.screening.is_some() {
                    &REFUND_NOT_SCREENED
                } else {
                    &NO_RISK_RULES
                },
            )?;
            // Reserve now, under the original's row lock: two refunds cannot both fit.
            journal::add_refunded(conn, original.txn_id, amount_fen)?;
            Ok(Ok(original.account_enc))
        });
        let sealed = match self.after_journaling(conn, inst, serial, prepared)? {
            Ok(found) => found,
            Err(outcome) => return Ok(outcome),
        };
        let account_no = self.open_account(&sealed)?;
        let posting = Posting {
            txn_id,
            kind: PostingKind::Credit,
            account_no: account_no.to_string(),
            amount_fen,
        };
        self.finish_posting(
            conn,
            None,
            core,
            inst,
            MsgType::Refund,
            serial,
            digests,
            &posting,
            now,
        )
        .map(Stored)
    }

    /// Calls the core and records the outcome with the stored response in one statement
    /// (through the institution's journal group when `grouped` names it and the lock key).
    #[allow(clippy::too_many_arguments)]
    fn finish_posting(
        &self,
        conn: &mut PgConnection,
        grouped: Option<(&journal::group::Group, journal::group::LockKey<'_>)>,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        msg_type: MsgType,
        serial: &str,
        digests: &str,
        posting: &Posting,
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        let (txn_id, amount_fen) = (posting.txn_id, posting.amount_fen);
        let outcome = core.post(posting);
        let done = Utc::now().max(now);
        let (to, code, reason, core_ref) = posting_result(&outcome);
        let answer = Answer {
            fields: vec![
                ("TxnId", txn_id.simple().to_string()),
                ("TxnStatus", to.as_str().to_string()),
                ("Amt", amount_fen.to_string()),
            ],
            txn_id: Some(txn_id),
            ..Answer::code(code)
        };
        let reply = self.respond(
            inst,
            msg_type,
            Some(serial),
            answer.code,
            answer.detail.as_deref(),
            &answer.fields,
            done,
        )?;
        let record = journal::OutcomeRecord {
            txn_id,
            from: TxnState::SentToCore,
            to,
            reason: &reason,
            result_code: code.code(),
            core_ref,
            now: done,
            notify: inst.callback_url.is_some(),
        };
        let answer = journal::AnswerToStore {
            inst_id: &inst.id,
            req_serial: serial,
            msg_type: msg_type.name(),
            field_digests: digests,
            response: &reply.bytes,
        };
        let recorded = journal::record_outcome_via(conn, grouped, &record, Some(&answer))?;
        if !recorded {
            return Err(JournalError::StateMoved {
                txn_id,
                expected: TxnState::SentToCore,
            }
            .into());
        }
        Ok(reply)
    }

    /// Reads the result of the transaction that journals a request before the core call: the
    /// value to go on with, or the outcome to answer with (a rejection, or a concurrent repeat
    /// of the same serial that hit the unique key).
    fn after_journaling<T>(
        &self,
        conn: &mut PgConnection,
        inst: &InstitutionConfig,
        serial: &str,
        prepared: Result<Result<T, Answer>, FlowError>,
    ) -> Result<Result<T, Outcome>, FlowError> {
        match prepared {
            Ok(Ok(value)) => Ok(Ok(value)),
            Ok(Err(answer)) => Ok(Err(Unstored(answer))),
            Err(FlowError::Db(e)) if journal::is_unique_violation(&e) => {
                self.concurrent_repeat(conn, inst, serial).map(Err)
            }
            Err(e) => Err(e),
        }
    }

    /// Another request with this serial is being processed or has just finished.
    fn concurrent_repeat(
        &self,
        conn: &mut PgConnection,
        inst: &InstitutionConfig,
        serial: &str,
    ) -> Result<Outcome, FlowError> {
        match journal::find_response(conn, &inst.id, serial)? {
            Some(stored) => Ok(Stored(Reply {
                code: code_from(&stored.result_code),
                bytes: stored.response,
            })),
            None => Ok(Unstored(Answer::detail(
                ResultCode::Processing,
                "a request with this ReqSerial is being processed; query it for the result",
            ))),
        }
    }

    fn query(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        serial: &str,
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        let Some(mut row) = journal::find_txn(conn, &inst.id, serial)? else {
            return self.respond(
                inst,
                MsgType::Query,
                None,
                ResultCode::TransactionNotFound,
                None,
                &[("QrySerial", serial.to_string())],
                now,
            );
        };
        if row.state()? == TxnState::Unknown {
            let _settled = self.resolve_unknown(conn, core, &row, now)?;
            row = journal::find_txn(conn, &inst.id, serial)?.expect("the row exists");
        }
        let mut fields = vec![("QrySerial", serial.to_string())];
        fields.extend(txn_fields(&row));
        self.respond(
            inst,
            MsgType::Query,
            None,
            ResultCode::Success,
            None,
            &fields,
            now,
        )
    }

    /// Resolves up to `limit` transactions of one institution whose outcome is not recorded;
    /// returns how many were looked at and settled. SENT_TO_CORE older than `stale_after` first becomes
    /// UNKNOWN (its worker is gone), then every UNKNOWN is settled by asking the core.
    pub fn resolve_unrecorded(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst_id: &str,
        stale_after: chrono::Duration,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Resolved, FlowError> {
        let rows = journal::unresolved(conn, inst_id, now - stale_after, limit)?;
        let mut settled = 0;
        for row in &rows {
            if row.state()? == TxnState::SentToCore {
                match journal::transition(
                    conn,
                    row.txn_id,
                    TxnState::SentToCore,
                    TxnState::Unknown,
                    "no outcome recorded: the process stopped during the core call",
                    now,
                ) {
                    Ok(()) | Err(JournalError::StateMoved { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if self.resolve_unknown(conn, core, row, now)? {
                settled += 1;
            }
        }
        Ok(Resolved {
            looked_at: rows.len(),
            settled,
        })
    }

    /// Sends up to `limit` transactions of one institution that a reviewer approved: each is
    /// durably SENT_TO_CORE (with its outbox entry) before the core hears of it, then its
    /// outcome is recorded and announced like any other. Returns how many were sent.
    pub fn send_approved(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst: &InstitutionConfig,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<usize, FlowError> {
        let rows = journal::risk::approved_unsent(conn, &inst.id, limit)?;
        for row in &rows {
            journal::risk::start_sending(conn, row, now)?;
            let posting = self.posting_of(row)?;
            let outcome = core.post(&posting);
            let done = Utc::now().max(now);
            let (to, code, reason, core_ref) = posting_result(&outcome);
            let recorded = journal::record_outcome(
                conn,
                &journal::OutcomeRecord {
                    txn_id: row.txn_id,
                    from: TxnState::SentToCore,
                    to,
                    reason: &reason,
                    result_code: code.code(),
                    core_ref,
                    now: done,
                    notify: inst.callback_url.is_some(),
                },
                None,
            )?;
            if !recorded {
                return Err(JournalError::StateMoved {
                    txn_id: row.txn_id,
                    expected: TxnState::SentToCore,
                }
                .into());
            }
        }
        Ok(rows.len())
    }

    /// A posting reply that came when nobody waited for it any more (after the worker's
    /// timeout, a duplicate, or after a restart). It settles an UNKNOWN transaction exactly
    /// like a query answer would; against a recorded outcome it is only compared, never applied.
    pub fn reconcile_late_reply(
        conn: &mut PgConnection,
        txn_id: Uuid,
        outcome: &PostingOutcome,
        now: DateTime<Utc>,
    ) -> Result<LateReplyVerdict, FlowError> {
        let (to, code, core_ref) = match outcome {
            PostingOutcome::Posted { core_ref } => (
                TxnState::Succeeded,
                ResultCode::Success,
                Some(core_ref.as_str()),
            ),
            PostingOutcome::Rejected(rejection) => {
                (TxnState::Failed, rejection_code(*rejection), None)
            }
        };
        let settled = journal::record_outcome(
            conn,
            &journal::OutcomeRecord {
                txn_id,
                from: TxnState::Unknown,
                to,
                reason: "late core reply",
                result_code: code.code(),
                core_ref,
                now,
                notify: true,
            },
            None,
        )?;
        if settled {
            return Ok(LateReplyVerdict::Settled(to));
        }
        let Some(row) = journal::txn_by_id(conn, txn_id)? else {
            return Ok(LateReplyVerdict::NoSuchTransaction);
        };
        let state = row.state()?;
        if state == TxnState::Failed && to == TxnState::Succeeded {
            return Ok(
                match journal::reversal::request(conn, txn_id, core_ref, now)? {
                    journal::reversal::Requested::New(reversal_id) => {
                        LateReplyVerdict::ReversalRequested {
                            reversal_id,
                            new: true,
                        }
                    }
                    journal::reversal::Requested::Existing(reversal_id) => {
                        LateReplyVerdict::ReversalRequested {
                            reversal_id,
                            new: false,
                        }
                    }
                    // Moved since it was read: FAILED is final, so only a bug gets here.
                    journal::reversal::Requested::NotFailed(recorded) => {
                        LateReplyVerdict::Conflict {
                            recorded,
                            core_says: to,
                        }
                    }
                    journal::reversal::Requested::NoSuchTransaction => {
                        LateReplyVerdict::NoSuchTransaction
                    }
                },
            );
        }
        Ok(match state {
            // Its worker is still between the timeout and recording UNKNOWN, or the process
            // stopped: the resolver asks the core, which gives this same answer.
            TxnState::SentToCore | TxnState::Unknown => LateReplyVerdict::LeftToResolver,
            recorded
                if recorded == to
                    && (to != TxnState::Succeeded || row.core_ref.as_deref() == core_ref) =>
            {
                LateReplyVerdict::Duplicate
            }
            recorded => LateReplyVerdict::Conflict {
                recorded,
                core_says: to,
            },
        })
    }

    /// Sends this institution's due reversals to the core and records each answer; a core
    /// that cannot answer now is asked again later (`reversal_retry_after`).
    pub fn drive_reversals(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        inst_id: &str,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<ReversalsDriven, FlowError> {
        use journal::reversal::AttemptResult;
        let due = journal::reversal::due(conn, inst_id, now, limit).map_err(JournalError::from)?;
        let mut driven = ReversalsDriven {
            looked_at: due.len(),
            finished: 0,
        };
        for row in &due {
            let txn = journal::txn_by_id(conn, row.txn_id)?.ok_or_else(|| {
                JournalError::Corrupt(format!(
                    "reversal {} without its transaction",
                    row.reversal_id
                ))
            })?;
            let posting = self.posting_of(&txn)?;
            let reversal = Reversal {
                reversal_id: row.reversal_id,
                txn_id: posting.txn_id,
                kind: posting.kind,
                account_no: posting.account_no,
                amount_fen: posting.amount_fen,
            };
            let answer = core.reverse(&reversal);
            let error_text;
            let result = match &answer {
                Ok(ReversalOutcome::Reversed { core_ref }) => AttemptResult::Finished {
                    state: "REVERSED",
                    core_ref: Some(core_ref),
                    refusal: None,
                },
                Ok(ReversalOutcome::NothingPosted) => AttemptResult::Finished {
                    state: "NOTHING_POSTED",
                    core_ref: None,
                    refusal: None,
                },
                Ok(ReversalOutcome::Refused(why)) => AttemptResult::Finished {
                    state: "REFUSED",
                    core_ref: None,
                    refusal: Some(why.name()),
                },
                Err(e) => {
                    error_text = e.to_string();
                    AttemptResult::Retry {
                        error: &error_text,
                        next_at: now + reversal_retry_after(row.attempts),
                    }
                }
            };
            let recorded = journal::reversal::record_attempt(conn, row, &result, now)?;
            match (&answer, recorded) {
                (Ok(ReversalOutcome::Refused(why)), true) => tracing::error!(
                    txn_id = %row.txn_id, reversal_id = %row.reversal_id,
                    "the core refused to reverse a posting it applied after the transaction failed ({}); settle it by hand",
                    why.name()
                ),
                (Ok(outcome), true) => {
                    tracing::info!(txn_id = %row.txn_id, reversal_id = %row.reversal_id, "reversal finished: {outcome:?}")
                }
                (Err(e), true) => {
                    tracing::warn!(txn_id = %row.txn_id, reversal_id = %row.reversal_id, attempts = row.attempts + 1, "reversal not answered ({e}); retried later")
                }
                (_, false) => {}
            }
            if recorded && answer.is_ok() {
                driven.finished += 1;
            }
        }
        Ok(driven)
    }

    /// UNKNOWN is resolved by asking the core, never by guessing: while young, by delivering
    /// the posting again (idempotent at the core by transaction id), later by a query.
    pub fn resolve_unknown(
        &self,
        conn: &mut PgConnection,
        core: &dyn CoreLink,
        row: &journal::TxnRow,
        now: DateTime<Utc>,
    ) -> Result<bool, FlowError> {
        let redeliver = now - row.created_at <= self.redeliver_within;
        let answer = if redeliver {
            match core.post(&self.posting_of(row)?) {
                Ok(outcome) => Some(outcome),
                // Still unknown: leave it for the next round.
                Err(_) => return Ok(false),
            }
        } else {
            match core.query_posting(row.txn_id) {
                Ok(answer) => answer,
                Err(_) => return Ok(false),
            }
        };
        let (to, code, reason, core_ref) = match answer {
            Some(PostingOutcome::Posted { core_ref }) => (
                TxnState::Succeeded,
                ResultCode::Success,
                if redeliver {
                    "core redelivery: posted"
                } else {
                    "core query: posted"
                },
                Some(core_ref),
            ),
            Some(PostingOutcome::Rejected(rejection)) => (
                TxnState::Failed,
                rejection_code(rejection),
                if redeliver {
                    "core redelivery: rejected"
                } else {
                    "core query: rejected"
                },
                None,
            ),
            None => (
                TxnState::Failed,
                ResultCode::CoreUnavailable,
                "core query: never received, nothing posted",
                None,
            ),
        };
        // False: someone resolved it first, and their answer stands.
        Ok(journal::record_outcome(
            conn,
            &journal::OutcomeRecord {
                txn_id: row.txn_id,
                from: TxnState::Unknown,
                to,
                reason,
                result_code: code.code(),
                core_ref: core_ref.as_deref(),
                now,
                notify: true,
            },
            None,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    fn query_range(
        &self,
        conn: &mut PgConnection,
        inst: &InstitutionConfig,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        page_no: i64,
        page_size: i64,
        now: DateTime<Utc>,
    ) -> Result<Reply, FlowError> {
        let (total, rows) = journal::page(
            conn,
            &inst.id,
            start,
            end,
            (page_no - 1) * page_size,
            page_size,
        )?;
        let mut list = String::new();
        for row in &rows {
            list.push_str("<Txn>");
            for (name, value) in [
                ("ReqSerial", row.req_serial.as_str()),
                ("TxnId", &row.txn_id.simple().to_string()),
                ("TxnKind", row.kind.as_str()),
                ("TxnStatus", row.state.as_str()),
                ("Amt", &row.amount_fen.to_string()),
                (
                    "TxnDtTm",
                    &row.created_at
                        .with_timezone(&china())
                        .to_rfc3339_opts(SecondsFormat::Secs, false),
                ),
            ] {
                list.push_str(&format!(
                    "<{name}>{}</{name}>",
                    quick_xml::escape::escape(value)
                ));
            }
            list.push_str("</Txn>");
        }
        let fields = [
            ("TotalCount", total.to_string()),
            ("PageNo", page_no.to_string()),
            ("PageSize", page_size.to_string()),
            ("Txns", list),
        ];
        self.respond(
            inst,
            MsgType::QueryRange,
            None,
            ResultCode::Success,
            None,
            &fields,
            now,
        )
    }
}

enum Outcome {
    /// Signed and stored as the idempotent answer.
    Stored(Reply),
    /// A rejection before anything was journaled: signed fresh, not stored, so the institution
    /// may correct and resend under the same serial.
    Unstored(Answer),
}
use Outcome::{Stored, Unstored};

fn core_unavailable(error: &CoreError) -> Answer {
    Answer::detail(
        ResultCode::CoreUnavailable,
        format!("core banking: {error}"),
    )
}

/// What one round of reversals did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReversalsDriven {
    pub looked_at: usize,
    /// Reached a final state (REVERSED, NOTHING_POSTED, REFUSED).
    pub finished: usize,
}

/// The pause before a reversal's next attempt: 5 s doubling, at most 10 min. Never given up:
/// money the core moved by mistake is returned or handed to a person (REFUSED), not forgotten.
pub fn reversal_retry_after(attempts: i32) -> chrono::Duration {
    let doublings = attempts.clamp(0, 7) as u32;
    chrono::Duration::seconds((5i64 << doublings).min(600))
}

/// What one resolver round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub looked_at: usize,
    pub settled: usize,
}

/// What a late posting reply did to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateReplyVerdict {
    /// It settled an UNKNOWN transaction.
    Settled(TxnState),
    /// The journal already holds the same outcome.
    Duplicate,
    /// No outcome recorded yet; the resolver settles it by query.
    LeftToResolver,
    /// The core posted what the journal records as FAILED: a reversal is requested (or was,
    /// by an earlier copy of this reply) and the resolver drives it to completion.
    ReversalRequested { reversal_id: Uuid, new: bool },
    /// The journal recorded another outcome than the core reports and no reversal can mend
    /// it (the core says it rejected what the journal records as SUCCEEDED): a person must.
    Conflict {
        recorded: TxnState,
        core_says: TxnState,
    },
    /// The reply names a transaction this database never had.
    NoSuchTransaction,
}

fn rejection_code(rejection: Rejection) -> ResultCode {
    match rejection {
        Rejection::InsufficientFunds => ResultCode::InsufficientFunds,
        Rejection::UnknownAccount => ResultCode::AccountUnknown,
        Rejection::Frozen => ResultCode::AccountFrozen,
        Rejection::NameMismatch => ResultCode::InvalidField,
        // The core had already told kunpay it never received the posting.
        Rejection::TooLate => ResultCode::CoreUnavailable,
    }
}

fn over_single_limit(inst: &InstitutionConfig, amount_fen: i64) -> Answer {
    Answer::detail(
        ResultCode::OverSingleLimit,
        format!(
            "{amount_fen} fen is over the per-transaction limit of {} fen",
            inst.single_limit_fen
        ),
    )
}

fn over_daily_limit(inst: &InstitutionConfig, used: i64, amount_fen: i64) -> Answer {
    Answer::detail(
        ResultCode::OverDailyLimit,
        format!(
            "{used} fen already today; {amount_fen} more would pass the daily limit of {} fen",
            inst.daily_limit_fen
        ),
    )
}

/// Business days follow Beijing time, as the bank's do.
pub fn business_date(now: DateTime<Utc>) -> chrono::NaiveDate {
    now.with_timezone(&china()).date_naive()
}

fn china() -> chrono::FixedOffset {
    chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

fn code_from(stored: &str) -> ResultCode {
    ResultCode::ALL
        .iter()
        .copied()
        .find(|c| c.code() == stored)
        .unwrap_or(ResultCode::InternalError)
}

fn differing_fields(stored: &str, current: &str, stored_type: &str, current_type: &str) -> String {
    if stored_type != current_type {
        return format!("message type ({stored_type}, now {current_type})");
    }
    let parse = |s: &str| -> std::collections::BTreeMap<String, String> {
        s.split(';')
            .filter_map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    };
    let (a, b) = (parse(stored), parse(current));
    let mut names: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    format!("fields: {}", names.join(", "))
}
