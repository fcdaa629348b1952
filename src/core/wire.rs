//! The core link's message format: what travels between kunpay and core banking on any queue.
//!
//! Owns: the envelope every message has (type, message id, correlation id, time, body), the
//! HMAC-SM3 over it under a shared key with a key id, and the JSON bodies of requests and
//! replies (documented field by field in docs/core-link.md, which the core team implements).
//! Pure: no I/O, so both ends (the bridge, `kunpay-coresim`) and the tests share it.
//! Must never: accept a message whose MAC does not verify, or whose key id is unknown; carry a
//! float amount; print a body (account numbers travel in it).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{
    BindOutcome, BindRejection, BindRequest, CodeCheck, Posting, PostingKind, PostingOutcome,
    Rejection, Reversal, ReversalOutcome, ReversalRefusal,
};
use crate::crypto::sm3;

/// Domain separation for the MAC, so a tag made for this format never verifies anything else.
const MAC_CONTEXT: &[u8] = b"kunpay-core-link-v1\n";
/// Upper bound of a body; anything larger is refused before it is parsed.
pub const MAX_BODY: usize = 16 * 1024;
/// Bounds of the textual envelope fields (message type, ids, key id).
const MAX_FIELD: usize = 64;
/// Shortest shared key accepted: 128 bits.
pub const MIN_KEY_LEN: usize = 16;

/// The message types, as carried in the AMQP `type` property (or the transport's equivalent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    PostRequest,
    PostReply,
    QueryRequest,
    QueryReply,
    BindRequest,
    BindReply,
    CodeRequest,
    CodeReply,
    ReverseRequest,
    ReverseReply,
}

impl MessageType {
    pub const ALL: [MessageType; 10] = [
        MessageType::PostRequest,
        MessageType::PostReply,
        MessageType::QueryRequest,
        MessageType::QueryReply,
        MessageType::BindRequest,
        MessageType::BindReply,
        MessageType::CodeRequest,
        MessageType::CodeReply,
        MessageType::ReverseRequest,
        MessageType::ReverseReply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MessageType::PostRequest => "kunpay.post.request",
            MessageType::PostReply => "kunpay.post.reply",
            MessageType::QueryRequest => "kunpay.query.request",
            MessageType::QueryReply => "kunpay.query.reply",
            MessageType::BindRequest => "kunpay.bind.request",
            MessageType::BindReply => "kunpay.bind.reply",
            MessageType::CodeRequest => "kunpay.code.request",
            MessageType::CodeReply => "kunpay.code.reply",
            MessageType::ReverseRequest => "kunpay.reverse.request",
            MessageType::ReverseReply => "kunpay.reverse.reply",
        }
    }

    /// The operation a message belongs to, request and reply alike ("post", "query", "bind",
    /// "code", "reverse"): the label of the core round-trip metric.
    pub fn operation(self) -> &'static str {
        match self {
            MessageType::PostRequest | MessageType::PostReply => "post",
            MessageType::QueryRequest | MessageType::QueryReply => "query",
            MessageType::BindRequest | MessageType::BindReply => "bind",
            MessageType::CodeRequest | MessageType::CodeReply => "code",
            MessageType::ReverseRequest | MessageType::ReverseReply => "reverse",
        }
    }

    pub fn parse(name: &str) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn is_reply(self) -> bool {
        matches!(
            self,
            MessageType::PostReply
                | MessageType::QueryReply
                | MessageType::BindReply
                | MessageType::CodeReply
                | MessageType::ReverseReply
        )
    }

    /// The reply type that answers this request type.
    pub fn reply(self) -> Option<MessageType> {
        match self {
            MessageType::PostRequest => Some(MessageType::PostReply),
            MessageType::QueryRequest => Some(MessageType::QueryReply),
            MessageType::BindRequest => Some(MessageType::BindReply),
            MessageType::CodeRequest => Some(MessageType::CodeReply),
            MessageType::ReverseRequest => Some(MessageType::ReverseReply),
            _ => None,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One message on the core link. A transport must carry every field unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    pub message_type: MessageType,
    /// Unique per message (a repeated publish of one posting has a new message id).
    pub message_id: String,
    /// Requests: the id replies are matched by (a posting's transaction id, so every publish of
    /// one posting shares it). Replies: the correlation id of the request they answer.
    pub correlation_id: String,
    /// Milliseconds since the Unix epoch when the sender built the message.
    pub sent_at_ms: u64,
    pub body: Vec<u8>,
    /// Id of the shared key the MAC was made with.
    pub key_id: String,
    /// HMAC-SM3 over `mac_input()`, 32 bytes.
    pub mac: Vec<u8>,
}

// Bodies carry account numbers and names: never printed.
impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("message_type", &self.message_type)
            .field("message_id", &self.message_id)
            .field("correlation_id", &self.correlation_id)
            .field("sent_at_ms", &self.sent_at_ms)
            .field("body_len", &self.body.len())
            .field("key_id", &self.key_id)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown message type \"{0}\"")]
    UnknownType(String),
    #[error("{field} is missing or malformed")]
    BadField { field: &'static str },
    #[error("body of {0} bytes is over the limit of {MAX_BODY}")]
    TooLarge(usize),
    #[error("unknown MAC key id \"{0}\"")]
    UnknownKey(String),
    #[error("the MAC does not verify")]
    BadMac,
    #[error("body does not match {message_type}: {reason}")]
    BadBody {
        message_type: MessageType,
        reason: String,
    },
}

/// The shared keys of the core link: the one used to send, and every id accepted on receipt
/// (during a key rotation both ends accept the old and the new key).
pub struct MacKeys {
    send_id: String,
    keys: Vec<(String, Zeroizing<Vec<u8>>)>,
}

impl MacKeys {
    /// `keys` must contain `send_id`; every key at least `MIN_KEY_LEN` bytes.
    pub fn new(send_id: &str, keys: Vec<(String, Zeroizing<Vec<u8>>)>) -> Result<MacKeys, String> {
        for (id, key) in &keys {
            if id.is_empty() || id.len() > MAX_FIELD || !id.is_ascii() {
                return Err(format!(
                    "MAC key id \"{id}\" must be 1-{MAX_FIELD} ASCII characters"
                ));
            }
            if key.len() < MIN_KEY_LEN {
                return Err(format!(
                    "MAC key \"{id}\" has {} bytes; at least {MIN_KEY_LEN} are needed",
                    key.len()
                ));
            }
        }
        if !keys.iter().any(|(id, _)| id == send_id) {
            return Err(format!("no MAC key with the sending id \"{send_id}\""));
        }
        Ok(MacKeys {
            send_id: send_id.to_string(),
            keys,
        })
    }

    /// One key under one id, for both directions.
    pub fn single(id: &str, key: Zeroizing<Vec<u8>>) -> Result<MacKeys, String> {
        MacKeys::new(id, vec![(id.to_string(), key)])
    }

    fn key(&self, id: &str) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, key)| key.as_slice())
    }

    pub fn send_id(&self) -> &str {
        &self.send_id
    }
}

impl fmt::Debug for MacKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("MacKeys")
            .field("send_id", &self.send_id)
            .field("ids", &ids)
            .finish()
    }
}

/// The bytes the MAC covers: every envelope field but the MAC, each length-prefixed so no two
/// different envelopes share an input.
fn mac_input(
    message_type: MessageType,
    message_id: &str,
    correlation_id: &str,
    sent_at_ms: u64,
    key_id: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut input = Vec::with_capacity(MAC_CONTEXT.len() + 160 + body.len());
    input.extend_from_slice(MAC_CONTEXT);
    for field in [
        message_type.name().as_bytes(),
        message_id.as_bytes(),
        correlation_id.as_bytes(),
        sent_at_ms.to_string().as_bytes(),
        key_id.as_bytes(),
        body,
    ] {
        input.extend_from_slice(&(field.len() as u32).to_be_bytes());
        input.extend_from_slice(field);
    }
    input
}

impl Envelope {
    /// Builds and authenticates a message under the sending key.
    pub fn seal(
        keys: &MacKeys,
        message_type: MessageType,
        correlation_id: &str,
        sent_at_ms: u64,
        body: Vec<u8>,
    ) -> Envelope {
        assert!(
            body.len() <= MAX_BODY,
            "bodies we build stay under MAX_BODY"
        );
        assert!(correlation_id.len() <= MAX_FIELD);
        let message_id = Uuid::now_v7().simple().to_string();
        let key_id = keys.send_id.clone();
        let key = keys
            .key(&key_id)
            .expect("MacKeys::new checked the send key");
        let mac = sm3::hmac_sm3(
            key,
            &mac_input(
                message_type,
                &message_id,
                correlation_id,
                sent_at_ms,
                &key_id,
                &body,
            ),
        )
        .to_vec();
        Envelope {
            message_type,
            message_id,
            correlation_id: correlation_id.to_string(),
            sent_at_ms,
            body,
            key_id,
            mac,
        }
    }

    /// Rebuilds a received message from the transport's fields and checks its MAC. Nothing in
    /// the body is looked at before the MAC verified.
    // One argument per envelope field, each optional as a transport may lack it.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        keys: &MacKeys,
        message_type: Option<&str>,
        message_id: Option<&str>,
        correlation_id: Option<&str>,
        sent_at_ms: Option<u64>,
        key_id: Option<&str>,
        mac_hex: Option<&str>,
        body: &[u8],
    ) -> Result<Envelope, WireError> {
        fn field<'a>(value: Option<&'a str>, name: &'static str) -> Result<&'a str, WireError> {
            match value {
                Some(v) if !v.is_empty() && v.len() <= MAX_FIELD && v.is_ascii() => Ok(v),
                _ => Err(WireError::BadField { field: name }),
            }
        }
        let type_name = field(message_type, "type")?;
        let message_type = MessageType::parse(type_name)
            .ok_or_else(|| WireError::UnknownType(type_name.to_string()))?;
        let message_id = field(message_id, "message_id")?;
        let correlation_id = field(correlation_id, "correlation_id")?;
        let sent_at_ms = sent_at_ms.ok_or(WireError::BadField { field: "timestamp" })?;
        let key_id = field(key_id, "kunpay-mac-key-id")?;
        let mac = hex::decode(field(mac_hex, "kunpay-mac")?).map_err(|_| WireError::BadField {
            field: "kunpay-mac",
        })?;
        if body.len() > MAX_BODY {
            return Err(WireError::TooLarge(body.len()));
        }
        let key = keys
            .key(key_id)
            .ok_or_else(|| WireError::UnknownKey(key_id.to_string()))?;
        let input = mac_input(
            message_type,
            message_id,
            correlation_id,
            sent_at_ms,
            key_id,
            body,
        );
        if !sm3::hmac_sm3_verify(key, &input, &mac) {
            return Err(WireError::BadMac);
        }
        Ok(Envelope {
            message_type,
            message_id: message_id.to_string(),
            correlation_id: correlation_id.to_string(),
            sent_at_ms,
            body: body.to_vec(),
            key_id: key_id.to_string(),
            mac,
        })
    }

    pub fn mac_hex(&self) -> String {
        hex::encode(&self.mac)
    }
}

// ----- Bodies -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum WirePostingKind {
    Debit,
    Credit,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody {
    txn_id: Uuid,
    posting: WirePostingKind,
    account_no: String,
    amount_fen: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum WireRejection {
    InsufficientFunds,
    UnknownAccount,
    Frozen,
    NameMismatch,
    TooLate,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostingResultBody {
    txn_id: Uuid,
    /// POSTED, REJECTED, or (query replies only) NOT_FOUND.
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    core_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<WireRejection>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    txn_id: Uuid,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReverseBody {
    reversal_id: Uuid,
    txn_id: Uuid,
    posting: WirePostingKind,
    account_no: String,
    amount_fen: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReverseResultBody {
    reversal_id: Uuid,
    txn_id: Uuid,
    /// REVERSED, NOTHING_POSTED or REFUSED.
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    core_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindBody {
    agreement_no: String,
    account_no: String,
    account_name: String,
    id_no: String,
    phone: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindResultBody {
    /// CODE_SENT or REJECTED.
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    core_customer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    agreement_no: String,
    code: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeResultBody {
    /// VALID, WRONG or EXPIRED.
    result: String,
}

/// A request as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreRequest {
    Post(Posting),
    Query { txn_id: Uuid },
    Bind(BindRequestOwned),
    CheckCode { agreement_no: String, code: String },
    Reverse(Reversal),
}

/// `BindRequest` with equality, for the request enum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRequestOwned {
    pub agreement_no: String,
    pub account_no: String,
    pub account_name: String,
    pub id_no: String,
    pub phone: String,
}

impl From<&BindRequest> for BindRequestOwned {
    fn from(r: &BindRequest) -> Self {
        BindRequestOwned {
            agreement_no: r.agreement_no.clone(),
            account_no: r.account_no.clone(),
            account_name: r.account_name.clone(),
            id_no: r.id_no.clone(),
            phone: r.phone.clone(),
        }
    }
}

impl From<&BindRequestOwned> for BindRequest {
    fn from(r: &BindRequestOwned) -> Self {
        BindRequest {
            agreement_no: r.agreement_no.clone(),
            account_no: r.account_no.clone(),
            account_name: r.account_name.clone(),
            id_no: r.id_no.clone(),
            phone: r.phone.clone(),
        }
    }
}

/// A reply as kunpay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreReply {
    Post {
        txn_id: Uuid,
        outcome: PostingOutcome,
    },
    /// `None`: the core never received the posting.
    Query {
        txn_id: Uuid,
        outcome: Option<PostingOutcome>,
    },
    Bind(BindOutcome),
    CheckCode(CodeCheck),
    Reverse {
        reversal_id: Uuid,
        txn_id: Uuid,
        outcome: ReversalOutcome,
    },
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain structs always serialise")
}

fn bad_body(message_type: MessageType, reason: impl fmt::Display) -> WireError {
    WireError::BadBody {
        message_type,
        reason: reason.to_string(),
    }
}

/// Longest text field accepted in a body (account numbers, names, references).
const MAX_TEXT: usize = 128;

fn check_text(
    message_type: MessageType,
    name: &str,
    value: &str,
    allow_empty: bool,
) -> Result<(), WireError> {
    if (!allow_empty && value.is_empty())
        || value.len() > MAX_TEXT
        || value.chars().any(char::is_control)
    {
        return Err(bad_body(
            message_type,
            format!("{name} must be 1-{MAX_TEXT} bytes without control characters"),
        ));
    }
    Ok(())
}

impl CoreRequest {
    pub fn message_type(&self) -> MessageType {
        match self {
            CoreRequest::Post(_) => MessageType::PostRequest,
            CoreRequest::Query { .. } => MessageType::QueryRequest,
            CoreRequest::Bind(_) => MessageType::BindRequest,
            CoreRequest::CheckCode { .. } => MessageType::CodeRequest,
            CoreRequest::Reverse(_) => MessageType::ReverseRequest,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            CoreRequest::Post(p) => to_json(&PostBody {
                txn_id: p.txn_id,
                posting: kind_to_wire(p.kind),
                account_no: p.account_no.clone(),
                amount_fen: p.amount_fen,
            }),
            CoreRequest::Reverse(r) => to_json(&ReverseBody {
                reversal_id: r.reversal_id,
                txn_id: r.txn_id,
                posting: kind_to_wire(r.kind),
                account_no: r.account_no.clone(),
                amount_fen: r.amount_fen,
            }),
            CoreRequest::Query { txn_id } => to_json(&QueryBody { txn_id: *txn_id }),
            CoreRequest::Bind(b) => to_json(&BindBody {
                agreement_no: b.agreement_no.clone(),
                account_no: b.account_no.clone(),
                account_name: b.account_name.clone(),
                id_no: b.id_no.clone(),
                phone: b.phone.clone(),
            }),
            CoreRequest::CheckCode { agreement_no, code } => to_json(&CodeBody {
                agreement_no: agreement_no.clone(),
                code: code.clone(),
            }),
        }
    }

    /// The request in a verified envelope (the core's side).
    pub fn decode(envelope: &Envelope) -> Result<CoreRequest, WireError> {
        let t = envelope.message_type;
        let body = &envelope.body;
        match t {
            MessageType::PostRequest => {
                let b: PostBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                check_text(t, "account_no", &b.account_no, false)?;
                if b.amount_fen <= 0 {
                    return Err(bad_body(t, "amount_fen must be a positive integer"));
                }
                if b.txn_id.simple().to_string() != envelope.correlation_id {
                    return Err(bad_body(t, "txn_id differs from the correlation id"));
                }
                Ok(CoreRequest::Post(Posting {
                    txn_id: b.txn_id,
                    kind: kind_from_wire(b.posting),
                    account_no: b.account_no,
                    amount_fen: b.amount_fen,
                }))
            }
            MessageType::ReverseRequest => {
                let b: ReverseBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                check_text(t, "account_no", &b.account_no, false)?;
                if b.amount_fen <= 0 {
                    return Err(bad_body(t, "amount_fen must be a positive integer"));
                }
                if b.reversal_id.simple().to_string() != envelope.correlation_id {
                    return Err(bad_body(t, "reversal_id differs from the correlation id"));
                }
                Ok(CoreRequest::Reverse(Reversal {
                    reversal_id: b.reversal_id,
                    txn_id: b.txn_id,
                    kind: kind_from_wire(b.posting),
                    account_no: b.account_no,
                    amount_fen: b.amount_fen,
                }))
            }
            MessageType::QueryRequest => {
                let b: QueryBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                Ok(CoreRequest::Query { txn_id: b.txn_id })
            }
            MessageType::BindRequest => {
                let b: BindBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                for (name, value) in [
                    ("agreement_no", &b.agreement_no),
                    ("account_no", &b.account_no),
                    ("account_name", &b.account_name),
                    ("id_no", &b.id_no),
                    ("phone", &b.phone),
                ] {
                    check_text(t, name, value, false)?;
                }
                Ok(CoreRequest::Bind(BindRequestOwned {
                    agreement_no: b.agreement_no,
                    account_no: b.account_no,
                    account_name: b.account_name,
                    id_no: b.id_no,
                    phone: b.phone,
                }))
            }
            MessageType::CodeRequest => {
                let b: CodeBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                check_text(t, "agreement_no", &b.agreement_no, false)?;
                check_text(t, "code", &b.code, false)?;
                Ok(CoreRequest::CheckCode {
                    agreement_no: b.agreement_no,
                    code: b.code,
                })
            }
            reply => Err(bad_body(reply, "a reply where a request was expected")),
        }
    }
}

fn kind_to_wire(kind: PostingKind) -> WirePostingKind {
    match kind {
        PostingKind::Debit => WirePostingKind::Debit,
        PostingKind::Credit => WirePostingKind::Credit,
    }
}

fn kind_from_wire(kind: WirePostingKind) -> PostingKind {
    match kind {
        WirePostingKind::Debit => PostingKind::Debit,
        WirePostingKind::Credit => PostingKind::Credit,
    }
}

fn rejection_to_wire(r: Rejection) -> WireRejection {
    match r {
        Rejection::InsufficientFunds => WireRejection::InsufficientFunds,
        Rejection::UnknownAccount => WireRejection::UnknownAccount,
        Rejection::Frozen => WireRejection::Frozen,
        Rejection::NameMismatch => WireRejection::NameMismatch,
        Rejection::TooLate => WireRejection::TooLate,
    }
}

fn rejection_from_wire(r: WireRejection) -> Rejection {
    match r {
        WireRejection::InsufficientFunds => Rejection::InsufficientFunds,
        WireRejection::UnknownAccount => Rejection::UnknownAccount,
        WireRejection::Frozen => Rejection::Frozen,
        WireRejection::NameMismatch => Rejection::NameMismatch,
        WireRejection::TooLate => Rejection::TooLate,
    }
}

fn posting_result(txn_id: Uuid, outcome: Option<&PostingOutcome>) -> PostingResultBody {
    match outcome {
        Some(PostingOutcome::Posted { core_ref }) => PostingResultBody {
            txn_id,
            status: "POSTED".into(),
            core_ref: Some(core_ref.clone()),
            reason: None,
        },
        Some(PostingOutcome::Rejected(r)) => PostingResultBody {
            txn_id,
            status: "REJECTED".into(),
            core_ref: None,
            reason: Some(rejection_to_wire(*r)),
        },
        None => PostingResultBody {
            txn_id,
            status: "NOT_FOUND".into(),
            core_ref: None,
            reason: None,
        },
    }
}

fn parse_posting_result(
    t: MessageType,
    b: PostingResultBody,
    not_found_allowed: bool,
) -> Result<Option<PostingOutcome>, WireError> {
    match (b.status.as_str(), b.core_ref, b.reason) {
        ("POSTED", Some(core_ref), None) => {
            check_text(t, "core_ref", &core_ref, false)?;
            Ok(Some(PostingOutcome::Posted { core_ref }))
        }
        ("REJECTED", None, Some(reason)) => {
            Ok(Some(PostingOutcome::Rejected(rejection_from_wire(reason))))
        }
        ("NOT_FOUND", None, None) if not_found_allowed => Ok(None),
        (status, _, _) => Err(bad_body(
            t,
            format!(
                "status \"{status}\" with these fields is not a valid result (POSTED needs core_ref, REJECTED needs reason{})",
                if not_found_allowed {
                    ", NOT_FOUND neither"
                } else {
                    ""
                }
            ),
        )),
    }
}

impl CoreReply {
    pub fn message_type(&self) -> MessageType {
        match self {
            CoreReply::Post { .. } => MessageType::PostReply,
            CoreReply::Query { .. } => MessageType::QueryReply,
            CoreReply::Bind(_) => MessageType::BindReply,
            CoreReply::CheckCode(_) => MessageType::CodeReply,
            CoreReply::Reverse { .. } => MessageType::ReverseReply,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            CoreReply::Post { txn_id, outcome } => to_json(&posting_result(*txn_id, Some(outcome))),
            CoreReply::Query { txn_id, outcome } => {
                to_json(&posting_result(*txn_id, outcome.as_ref()))
            }
            CoreReply::Bind(BindOutcome::CodeSent { core_customer }) => to_json(&BindResultBody {
                status: "CODE_SENT".into(),
                core_customer: Some(core_customer.clone()),
                reason: None,
            }),
            CoreReply::Bind(BindOutcome::Rejected(r)) => to_json(&BindResultBody {
                status: "REJECTED".into(),
                core_customer: None,
                reason: Some(
                    match r {
                        BindRejection::UnknownAccount => "UNKNOWN_ACCOUNT",
                        BindRejection::Frozen => "FROZEN",
                        BindRejection::DetailsMismatch => "DETAILS_MISMATCH",
                    }
                    .into(),
                ),
            }),
            CoreReply::Reverse {
                reversal_id,
                txn_id,
                outcome,
            } => {
                let (status, core_ref, reason) = match outcome {
                    ReversalOutcome::Reversed { core_ref } => {
                        ("REVERSED", Some(core_ref.clone()), None)
                    }
                    ReversalOutcome::NothingPosted => ("NOTHING_POSTED", None, None),
                    ReversalOutcome::Refused(r) => ("REFUSED", None, Some(r.name().to_string())),
                };
                to_json(&ReverseResultBody {
                    reversal_id: *reversal_id,
                    txn_id: *txn_id,
                    status: status.into(),
                    core_ref,
                    reason,
                })
            }
            CoreReply::CheckCode(check) => to_json(&CodeResultBody {
                result: match check {
                    CodeCheck::Valid => "VALID",
                    CodeCheck::Wrong => "WRONG",
                    CodeCheck::Expired => "EXPIRED",
                }
                .into(),
            }),
        }
    }

    /// The reply in a verified envelope (kunpay's side).
    pub fn decode(envelope: &Envelope) -> Result<CoreReply, WireError> {
        let t = envelope.message_type;
        let body = &envelope.body;
        match t {
            MessageType::PostReply => {
                let b: PostingResultBody =
                    serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                let txn_id = b.txn_id;
                if txn_id.simple().to_string() != envelope.correlation_id {
                    return Err(bad_body(t, "txn_id differs from the correlation id"));
                }
                let outcome = parse_posting_result(t, b, false)?
                    .expect("NOT_FOUND is refused for post replies");
                Ok(CoreReply::Post { txn_id, outcome })
            }
            MessageType::QueryReply => {
                let b: PostingResultBody =
                    serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                let txn_id = b.txn_id;
                Ok(CoreReply::Query {
                    txn_id,
                    outcome: parse_posting_result(t, b, true)?,
                })
            }
            MessageType::BindReply => {
                let b: BindResultBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                match (b.status.as_str(), b.core_customer, b.reason.as_deref()) {
                    ("CODE_SENT", Some(core_customer), None) => {
                        check_text(t, "core_customer", &core_customer, false)?;
                        Ok(CoreReply::Bind(BindOutcome::CodeSent { core_customer }))
                    }
                    ("REJECTED", None, Some(reason)) => {
                        Ok(CoreReply::Bind(BindOutcome::Rejected(match reason {
                            "UNKNOWN_ACCOUNT" => BindRejection::UnknownAccount,
                            "FROZEN" => BindRejection::Frozen,
                            "DETAILS_MISMATCH" => BindRejection::DetailsMismatch,
                            other => {
                                return Err(bad_body(
                                    t,
                                    format!("unknown rejection reason \"{other}\""),
                                ));
                            }
                        })))
                    }
                    (status, _, _) => Err(bad_body(
                        t,
                        format!(
                            "status \"{status}\" with these fields is not a valid result (CODE_SENT needs core_customer, REJECTED needs reason)"
                        ),
                    )),
                }
            }
            MessageType::CodeReply => {
                let b: CodeResultBody = serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                Ok(CoreReply::CheckCode(match b.result.as_str() {
                    "VALID" => CodeCheck::Valid,
                    "WRONG" => CodeCheck::Wrong,
                    "EXPIRED" => CodeCheck::Expired,
                    other => {
                        return Err(bad_body(t, format!("unknown result \"{other}\"")));
                    }
                }))
            }
            MessageType::ReverseReply => {
                let b: ReverseResultBody =
                    serde_json::from_slice(body).map_err(|e| bad_body(t, e))?;
                if b.reversal_id.simple().to_string() != envelope.correlation_id {
                    return Err(bad_body(t, "reversal_id differs from the correlation id"));
                }
                let outcome = match (b.status.as_str(), b.core_ref, b.reason.as_deref()) {
                    ("REVERSED", Some(core_ref), None) => {
                        check_text(t, "core_ref", &core_ref, false)?;
                        ReversalOutcome::Reversed { core_ref }
                    }
                    ("NOTHING_POSTED", None, None) => ReversalOutcome::NothingPosted,
                    ("REFUSED", None, Some(reason)) => {
                        ReversalOutcome::Refused(ReversalRefusal::parse(reason).ok_or_else(
                            || bad_body(t, format!("unknown refusal reason \"{reason}\"")),
                        )?)
                    }
                    (status, _, _) => {
                        return Err(bad_body(
                            t,
                            format!(
                                "status \"{status}\" with these fields is not a valid result (REVERSED needs core_ref, REFUSED needs reason, NOTHING_POSTED neither)"
                            ),
                        ));
                    }
                };
                Ok(CoreReply::Reverse {
                    reversal_id: b.reversal_id,
                    txn_id: b.txn_id,
                    outcome,
                })
            }
            request => Err(bad_body(request, "a request where a reply was expected")),
        }
    }
}

/// Milliseconds since the Unix epoch, for `sent_at_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> MacKeys {
        MacKeys::single("k1", Zeroizing::new(vec![7u8; 32])).unwrap()
    }

    fn reopen(keys: &MacKeys, e: &Envelope) -> Result<Envelope, WireError> {
        Envelope::open(
            keys,
            Some(e.message_type.name()),
            Some(&e.message_id),
            Some(&e.correlation_id),
            Some(e.sent_at_ms),
            Some(&e.key_id),
            Some(&e.mac_hex()),
            &e.body,
        )
    }

    fn posting() -> Posting {
        Posting {
            txn_id: Uuid::now_v7(),
            kind: PostingKind::Debit,
            account_no: "6222020000000001".into(),
            amount_fen: 12_345,
        }
    }

    #[test]
    fn sealed_request_opens_and_decodes_to_the_same_posting() {
        let keys = keys();
        let p = posting();
        let request = CoreRequest::Post(p.clone());
        let e = Envelope::seal(
            &keys,
            request.message_type(),
            &p.txn_id.simple().to_string(),
            now_ms(),
            request.encode(),
        );
        let opened = reopen(&keys, &e).unwrap();
        assert_eq!(opened, e);
        assert_eq!(CoreRequest::decode(&opened).unwrap(), request);
    }

    #[test]
    fn every_changed_field_breaks_the_mac() {
        let keys = keys();
        let p = posting();
        let e = Envelope::seal(
            &keys,
            MessageType::PostRequest,
            &p.txn_id.simple().to_string(),
            1_000,
            CoreRequest::Post(p).encode(),
        );
        let mut changed = Vec::new();
        let mut x = e.clone();
        x.message_type = MessageType::QueryRequest;
        changed.push(x);
        let mut x = e.clone();
        x.message_id.push('0');
        changed.push(x);
        let mut x = e.clone();
        x.correlation_id = Uuid::now_v7().simple().to_string();
        changed.push(x);
        let mut x = e.clone();
        x.sent_at_ms += 1;
        changed.push(x);
        let mut x = e.clone();
        x.body[10] ^= 1;
        changed.push(x);
        let mut x = e.clone();
        x.mac[0] ^= 1;
        changed.push(x);
        for x in changed {
            assert_eq!(reopen(&keys, &x), Err(WireError::BadMac), "{x:?}");
        }
        let wrong = MacKeys::single("k1", Zeroizing::new(vec![8u8; 32])).unwrap();
        assert_eq!(reopen(&wrong, &e), Err(WireError::BadMac));
        let other_id = MacKeys::single("k2", Zeroizing::new(vec![7u8; 32])).unwrap();
        assert_eq!(
            reopen(&other_id, &e),
            Err(WireError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn rotation_accepts_old_and_new_key_and_sends_with_the_new() {
        let old = MacKeys::single("2025", Zeroizing::new(vec![1u8; 16])).unwrap();
        let both = MacKeys::new(
            "2026",
            vec![
                ("2025".into(), Zeroizing::new(vec![1u8; 16])),
                ("2026".into(), Zeroizing::new(vec![2u8; 16])),
            ],
        )
        .unwrap();
        let from_old = Envelope::seal(&old, MessageType::CodeReply, "c", 1, b"{}".to_vec());
        assert!(reopen(&both, &from_old).is_ok());
        let from_new = Envelope::seal(&both, MessageType::CodeReply, "c", 1, b"{}".to_vec());
        assert_eq!(from_new.key_id, "2026");
        assert_eq!(
            reopen(&old, &from_new),
            Err(WireError::UnknownKey("2026".into()))
        );
    }

    #[test]
    fn short_keys_and_missing_send_key_are_refused() {
        assert!(MacKeys::single("k", Zeroizing::new(vec![1u8; 15])).is_err());
        assert!(MacKeys::new("k", vec![("j".into(), Zeroizing::new(vec![1u8; 16]))]).is_err());
    }

    #[test]
    fn missing_envelope_fields_are_named() {
        let keys = keys();
        let e = Envelope::seal(&keys, MessageType::CodeReply, "c", 1, b"{}".to_vec());
        let err = Envelope::open(
            &keys,
            Some(e.message_type.name()),
            Some(&e.message_id),
            None,
            Some(1),
            Some("k1"),
            Some(&e.mac_hex()),
            &e.body,
        )
        .unwrap_err();
        assert_eq!(
            err,
            WireError::BadField {
                field: "correlation_id"
            }
        );
        let err = Envelope::open(
            &keys,
            Some("kunpay.nonsense"),
            Some(&e.message_id),
            Some("c"),
            Some(1),
            Some("k1"),
            Some(&e.mac_hex()),
            &e.body,
        )
        .unwrap_err();
        assert_eq!(err, WireError::UnknownType("kunpay.nonsense".into()));
    }

    #[test]
    fn replies_round_trip() {
        let txn_id = Uuid::now_v7();
        let replies = [
            CoreReply::Post {
                txn_id,
                outcome: PostingOutcome::Posted {
                    core_ref: "C000123".into(),
                },
            },
            CoreReply::Post {
                txn_id,
                outcome: PostingOutcome::Rejected(Rejection::InsufficientFunds),
            },
            CoreReply::Query {
                txn_id,
                outcome: None,
            },
            CoreReply::Query {
                txn_id,
                outcome: Some(PostingOutcome::Rejected(Rejection::Frozen)),
            },
            CoreReply::Bind(BindOutcome::CodeSent {
                core_customer: "CUST1".into(),
            }),
            CoreReply::Bind(BindOutcome::Rejected(BindRejection::DetailsMismatch)),
            CoreReply::CheckCode(CodeCheck::Expired),
        ];
        let keys = keys();
        for reply in replies {
            let e = Envelope::seal(
                &keys,
                reply.message_type(),
                &txn_id.simple().to_string(),
                5,
                reply.encode(),
            );
            assert_eq!(
                CoreReply::decode(&reopen(&keys, &e).unwrap()).unwrap(),
                reply
            );
        }
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let keys = keys();
        let txn_id = Uuid::now_v7();
        let cases: [(String, &str); 4] = [
            (
                r#"{"txn_id":"TXN","status":"POSTED"}"#.to_string(),
                "UUID parsing failed",
            ),
            (
                format!(r#"{{"txn_id":"{txn_id}","status":"POSTED"}}"#),
                "POSTED needs core_ref",
            ),
            (
                format!(r#"{{"txn_id":"{txn_id}","status":"NOT_FOUND"}}"#),
                "not a valid result",
            ),
            (
                format!(
                    r#"{{"txn_id":"{txn_id}","status":"POSTED","core_ref":"C1","amount":1.5}}"#
                ),
                "unknown field",
            ),
        ];
        for (body, expected) in cases {
            let e = Envelope::seal(
                &keys,
                MessageType::PostReply,
                &txn_id.simple().to_string(),
                5,
                body.into_bytes(),
            );
            let err = CoreReply::decode(&e).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        // A reply for another transaction than the one it claims to answer.
        let other = CoreReply::Post {
            txn_id: Uuid::now_v7(),
            outcome: PostingOutcome::Posted {
                core_ref: "C".into(),
            },
        };
        let e = Envelope::seal(
            &keys,
            MessageType::PostReply,
            &txn_id.simple().to_string(),
            5,
            other.encode(),
        );
        assert!(
            CoreReply::decode(&e)
                .unwrap_err()
                .to_string()
                .contains("correlation")
        );
        // Amounts are integers and positive.
        for amount in ["0", "-5", "1.5", "\"100\""] {
            let body = format!(
                r#"{{"txn_id":"{txn_id}","posting":"DEBIT","account_no":"6222","amount_fen":{amount}}}"#
            );
            let e = Envelope::seal(
                &keys,
                MessageType::PostRequest,
                &txn_id.simple().to_string(),
                5,
                body.into_bytes(),
            );
            assert!(CoreRequest::decode(&e).is_err(), "amount {amount} accepted");
        }
    }

    #[test]
    fn reversals_round_trip_and_are_matched_by_their_own_id() {
        let keys = keys();
        let p = posting();
        let reversal = Reversal {
            reversal_id: Uuid::now_v7(),
            txn_id: p.txn_id,
            kind: PostingKind::Credit,
            account_no: p.account_no.clone(),
            amount_fen: p.amount_fen,
        };
        let correlation = reversal.reversal_id.simple().to_string();
        let request = CoreRequest::Reverse(reversal.clone());
        let e = Envelope::seal(
            &keys,
            request.message_type(),
            &correlation,
            5,
            request.encode(),
        );
        assert_eq!(
            CoreRequest::decode(&reopen(&keys, &e).unwrap()).unwrap(),
            request
        );
        // Under the posting's id instead of its own: refused.
        let e = Envelope::seal(
            &keys,
            MessageType::ReverseRequest,
            &p.txn_id.simple().to_string(),
            5,
            request.encode(),
        );
        assert!(
            CoreRequest::decode(&e)
                .unwrap_err()
                .to_string()
                .contains("reversal_id differs from the correlation id")
        );
        for outcome in [
            ReversalOutcome::Reversed {
                core_ref: "REV1".into(),
            },
            ReversalOutcome::NothingPosted,
            ReversalOutcome::Refused(ReversalRefusal::InsufficientFunds),
            ReversalOutcome::Refused(ReversalRefusal::DoesNotMatch),
        ] {
            let reply = CoreReply::Reverse {
                reversal_id: reversal.reversal_id,
                txn_id: reversal.txn_id,
                outcome,
            };
            let e = Envelope::seal(&keys, reply.message_type(), &correlation, 5, reply.encode());
            assert_eq!(
                CoreReply::decode(&reopen(&keys, &e).unwrap()).unwrap(),
                reply
            );
        }
        let (rid, tid) = (reversal.reversal_id, reversal.txn_id);
        for (body, expected) in [
            (
                format!(r#"{{"reversal_id":"{rid}","txn_id":"{tid}","status":"REVERSED"}}"#),
                "REVERSED needs core_ref",
            ),
            (
                format!(
                    r#"{{"reversal_id":"{rid}","txn_id":"{tid}","status":"REFUSED","reason":"BORED"}}"#
                ),
                "unknown refusal reason \"BORED\"",
            ),
        ] {
            let e = Envelope::seal(
                &keys,
                MessageType::ReverseReply,
                &correlation,
                5,
                body.into_bytes(),
            );
            let err = CoreReply::decode(&e).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        // TOO_LATE travels as a posting rejection.
        let late = CoreReply::Post {
            txn_id: p.txn_id,
            outcome: PostingOutcome::Rejected(Rejection::TooLate),
        };
        let e = Envelope::seal(
            &keys,
            late.message_type(),
            &p.txn_id.simple().to_string(),
            5,
            late.encode(),
        );
        assert!(String::from_utf8_lossy(&e.body).contains("\"TOO_LATE\""));
        assert_eq!(CoreReply::decode(&e).unwrap(), late);
    }
}
