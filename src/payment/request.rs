//! Typed requests: each message type's fields, checked for presence, form and range.
//!
//! Owns: the field list of every request message type (mirrored in docs/protocol.md) and the
//! validation that turns a verified `<MsgBody>` into a request, naming the field and what is
//! wrong with it.
//! Must never: accept a field a message type does not define (a typo must not be ignored),
//! or an amount that is not a positive integer number of fen.

use chrono::{DateTime, FixedOffset};
use zeroize::Zeroizing;

use crate::channel::codes::ResultCode;
use crate::channel::envelope::{MessageKey, SENSITIVE_FIELDS};
use crate::channel::message::Element;

/// Every request message type, its `<MsgTp>` and the path it is posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    AgreementApply,
    AgreementConfirm,
    AgreementTerminate,
    Debit,
    Credit,
    Refund,
    Query,
    QueryRange,
}

impl MsgType {
    pub const ALL: [MsgType; 8] = [
        MsgType::AgreementApply,
        MsgType::AgreementConfirm,
        MsgType::AgreementTerminate,
        MsgType::Debit,
        MsgType::Credit,
        MsgType::Refund,
        MsgType::Query,
        MsgType::QueryRange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MsgType::AgreementApply => "AGREEMENT_APPLY",
            MsgType::AgreementConfirm => "AGREEMENT_CONFIRM",
            MsgType::AgreementTerminate => "AGREEMENT_TERMINATE",
            MsgType::Debit => "DEBIT",
            MsgType::Credit => "CREDIT",
            MsgType::Refund => "REFUND",
            MsgType::Query => "QUERY",
            MsgType::QueryRange => "QUERY_RANGE",
        }
    }

    pub fn response_name(self) -> String {
        format!("{}_RSP", self.name())
    }

    pub fn path(self) -> &'static str {
        match self {
            MsgType::AgreementApply => "/gateway/agreement/apply",
            MsgType::AgreementConfirm => "/gateway/agreement/confirm",
            MsgType::AgreementTerminate => "/gateway/agreement/terminate",
            MsgType::Debit => "/gateway/debit",
            MsgType::Credit => "/gateway/credit",
            MsgType::Refund => "/gateway/refund",
            MsgType::Query => "/gateway/query",
            MsgType::QueryRange => "/gateway/query-range",
        }
    }

    pub fn from_path(path: &str) -> Option<MsgType> {
        MsgType::ALL.into_iter().find(|t| t.path() == path)
    }

    /// (required, optional) body fields.
    pub fn fields(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            MsgType::AgreementApply => (
                &["ReqSerial", "AcctNo", "AcctNm", "IdTp", "IdNo", "PhoneNo"],
                &[],
            ),
            MsgType::AgreementConfirm => (&["ReqSerial", "AgrmtNo", "VrfyCd"], &[]),
            MsgType::AgreementTerminate => (&["ReqSerial", "AgrmtNo"], &["Rsn"]),
            MsgType::Debit => (
                &["ReqSerial", "AgrmtNo", "Amt", "Ccy"],
                &["Memo", "DevId", "PyerIp", "MrchntNo", "IdNo"],
            ),
            MsgType::Credit => (
                &["ReqSerial", "AcctNo", "AcctNm", "Amt", "Ccy"],
                &["Memo", "DevId", "PyerIp", "MrchntNo"],
            ),
            MsgType::Refund => (&["ReqSerial", "OrigReqSerial", "Amt", "Ccy"], &["Memo"]),
            MsgType::Query => (&["QrySerial"], &[]),
            MsgType::QueryRange => (&["StartDtTm", "EndDtTm", "PageNo", "PageSize"], &[]),
        }
    }
}

/// A field problem: which field, what is wrong, and the code the institution receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: ResultCode,
    pub detail: String,
}

impl FieldError {
    fn missing(field: &str) -> FieldError {
        FieldError {
            code: ResultCode::MissingField,
            detail: format!("<{field}> is required"),
        }
    }
    fn invalid(field: &str, why: impl Into<String>) -> FieldError {
        FieldError {
            code: ResultCode::InvalidField,
            detail: format!("<{field}> {}", why.into()),
        }
    }
}

pub const MAX_PAGE_SIZE: i64 = 100;

#[derive(Debug)]
pub enum Request {
    AgreementApply {
        serial: String,
        account_no: Zeroizing<String>,
        account_name: Zeroizing<String>,
        id_no: Zeroizing<String>,
        phone: Zeroizing<String>,
    },
    AgreementConfirm {
        serial: String,
        agreement_no: String,
        code: String,
    },
    AgreementTerminate {
        serial: String,
        agreement_no: String,
    },
    Debit {
        serial: String,
        agreement_no: String,
        amount_fen: i64,
        context: PaymentContext,
    },
    Credit {
        serial: String,
        account_no: Zeroizing<String>,
        account_name: Zeroizing<String>,
        amount_fen: i64,
        context: PaymentContext,
    },
    Refund {
        serial: String,
        orig_serial: String,
        amount_fen: i64,
    },
    Query {
        serial: String,
    },
    QueryRange {
        start: DateTime<FixedOffset>,
        end: DateTime<FixedOffset>,
        page_no: i64,
        page_size: i64,
    },
}

impl Request {
    pub fn serial(&self) -> Option<&str> {
        match self {
            Request::AgreementApply { serial, .. }
            | Request::AgreementConfirm { serial, .. }
            | Request::AgreementTerminate { serial, .. }
            | Request::Debit { serial, .. }
            | Request::Credit { serial, .. }
            | Request::Refund { serial, .. } => Some(serial),
            Request::Query { .. } | Request::QueryRange { .. } => None,
        }
    }
}

/// What an institution may tell about the circumstances of a payment, for risk control
/// (docs/protocol.md: `DevId`, `PyerIp`, `MrchntNo`, all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentContext {
    /// The payer's device as the institution identifies it.
    pub device: Option<String>,
    /// The payer's IP address as the institution saw it.
    pub ip: Option<std::net::IpAddr>,
    /// The merchant the payment is for.
    pub merchant: Option<String>,
    /// Debits: the payer's id number as the institution knows it (`IdNo`, encrypted); risk
    /// compares it with the agreement holder's.
    pub payer_id_no: Option<Zeroizing<String>>,
}

fn payment_context(text: &dyn Fn(&str) -> String) -> Result<PaymentContext, FieldError> {
    let identifier = |field: &str, max: usize| -> Result<Option<String>, FieldError> {
        let value = text(field);
        if value.is_empty() {
            return Ok(None);
        }
        if value.len() > max || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FieldError::invalid(
                field,
                format!("must be 1 to {max} printable ASCII characters without spaces"),
            ));
        }
        Ok(Some(value))
    };
    let ip = match text("PyerIp") {
        value if value.is_empty() => None,
        value => Some(
            value
                .parse()
                .map_err(|_| FieldError::invalid("PyerIp", "must be an IPv4 or IPv6 address"))?,
        ),
    };
    Ok(PaymentContext {
        device: identifier("DevId", 64)?,
        ip,
        merchant: identifier("MrchntNo", 32)?,
        payer_id_no: None,
    })
}

fn canonical_fields(
    body: &Element,
    key: Option<&MessageKey>,
) -> Result<DecryptedFields, FieldError> {
    body.children
        .iter()
        .map(|c| {
            let value = if SENSITIVE_FIELDS.contains(&c.name.as_str()) {
                let key = key.ok_or(FieldError {
                    code: ResultCode::EnvelopeInvalid,
                    detail: format!(
                        "<{}> is encrypted but the header has no <DgtlEnvlp>",
                        c.name
                    ),
                })?;
                key.decrypt_field(&c.name, c.text.trim())
                    .map_err(|e| FieldError {
                        code: ResultCode::EnvelopeInvalid,
                        detail: e.to_string(),
                    })?
            } else {
                Zeroizing::new(c.text.trim().to_string())
            };
            Ok((c.name.clone(), value))
        })
        .collect()
}

/// Body fields by element name, sensitive ones decrypted, in document order.
pub type DecryptedFields = Vec<(String, Zeroizing<String>)>;

/// Checks the field set, decrypts sensitive fields with the message key, and parses values.
/// Returns the request and its decrypted fields (the input of the idempotency digest).
pub fn parse(
    msg_type: MsgType,
    body: &Element,
    key: Option<&MessageKey>,
) -> Result<(Request, DecryptedFields), FieldError> {
    let (required, optional) = msg_type.fields();
    for child in &body.children {
        if !child.children.is_empty() {
            return Err(FieldError::invalid(
                &child.name,
                "must be a single value, not a list",
            ));
        }
        if !required.contains(&child.name.as_str()) && !optional.contains(&child.name.as_str()) {
            return Err(FieldError {
                code: ResultCode::UnexpectedField,
                detail: format!("<{}> is not a field of {}", child.name, msg_type.name()),
            });
        }
    }
    for field in required {
        match body.text_of(field) {
            None => return Err(FieldError::missing(field)),
            Some(value) if value.trim().is_empty() => {
                return Err(FieldError::invalid(field, "is empty"));
            }
            Some(_) => {}
        }
    }
    // Sensitive fields are decrypted here, once; the same values feed the idempotency digest.
    let fields = canonical_fields(body, key)?;
    let text = |field: &str| body.text_of(field).unwrap_or("").trim().to_string();
    let secret = |field: &str| -> Result<Zeroizing<String>, FieldError> {
        debug_assert!(SENSITIVE_FIELDS.contains(&field));
        fields
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, value)| value.clone())
            .ok_or_else(|| FieldError::missing(field))
    };
    let request = match msg_type {
        MsgType::AgreementApply => {
            if text("IdTp") != "01" {
                return Err(FieldError::invalid(
                    "IdTp",
                    "must be 01 (resident identity card)",
                ));
            }
            let account_no = secret("AcctNo")?;
            check_account(&account_no)?;
            let id_no = secret("IdNo")?;
            check_id_number(&id_no)?;
            let phone = secret("PhoneNo")?;
            if !(phone.len() == 11
                && phone.starts_with('1')
                && phone.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(FieldError::invalid(
                    "PhoneNo",
                    "must be an 11-digit mainland mobile number",
                ));
            }
            let account_name = secret("AcctNm")?;
            check_name(&account_name)?;
            Request::AgreementApply {
                serial: serial(&text("ReqSerial"), "ReqSerial")?,
                account_no,
                account_name,
                id_no,
                phone,
            }
        }
        MsgType::AgreementConfirm => {
            let code = text("VrfyCd");
            if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FieldError::invalid("VrfyCd", "must be 6 digits"));
            }
            Request::AgreementConfirm {
                serial: serial(&text("ReqSerial"), "ReqSerial")?,
                agreement_no: serial(&text("AgrmtNo"), "AgrmtNo")?,
                code,
            }
        }
        MsgType::AgreementTerminate => Request::AgreementTerminate {
            serial: serial(&text("ReqSerial"), "ReqSerial")?,
            agreement_no: serial(&text("AgrmtNo"), "AgrmtNo")?,
        },
        MsgType::Debit => Request::Debit {
            serial: serial(&text("ReqSerial"), "ReqSerial")?,
            agreement_no: serial(&text("AgrmtNo"), "AgrmtNo")?,
            amount_fen: amount(&text("Amt"), &text("Ccy"))?,
            context: PaymentContext {
                payer_id_no: match body.text_of("IdNo") {
                    None => None,
                    Some(_) => {
                        let id_no = secret("IdNo")?;
                        check_id_number(&id_no)?;
                        Some(id_no)
                    }
                },
                ..payment_context(&text)?
            },
        },
        MsgType::Credit => {
            let account_no = secret("AcctNo")?;
            check_account(&account_no)?;
            let account_name = secret("AcctNm")?;
            check_name(&account_name)?;
            Request::Credit {
                serial: serial(&text("ReqSerial"), "ReqSerial")?,
                account_no,
                account_name,
                amount_fen: amount(&text("Amt"), &text("Ccy"))?,
                context: payment_context(&text)?,
            }
        }
        MsgType::Refund => Request::Refund {
            serial: serial(&text("ReqSerial"), "ReqSerial")?,
            orig_serial: serial(&text("OrigReqSerial"), "OrigReqSerial")?,
            amount_fen: amount(&text("Amt"), &text("Ccy"))?,
        },
        MsgType::Query => Request::Query {
            serial: serial(&text("QrySerial"), "QrySerial")?,
        },
        MsgType::QueryRange => {
            let start = time(&text("StartDtTm"), "StartDtTm")?;
            let end = time(&text("EndDtTm"), "EndDtTm")?;
            if end <= start {
                return Err(FieldError::invalid("EndDtTm", "must be after StartDtTm"));
            }
            if end - start > chrono::Duration::days(31) {
                return Err(FieldError::invalid(
                    "EndDtTm",
                    "the range may span at most 31 days",
                ));
            }
            let page_no = integer(&text("PageNo"), "PageNo", 1, 1_000_000)?;
            let page_size = integer(&text("PageSize"), "PageSize", 1, MAX_PAGE_SIZE)?;
            Request::QueryRange {
                start,
                end,
                page_no,
                page_size,
            }
        }
    };
    Ok((request, fields))
}

/// Serials and agreement numbers: 1-32 characters of A-Z a-z 0-9 - _ (ours are 32 long).
fn serial(value: &str, field: &str) -> Result<String, FieldError> {
    if value.is_empty()
        || value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(FieldError::invalid(
            field,
            "must be 1-64 characters of A-Z a-z 0-9 - _",
        ));
    }
    Ok(value.to_string())
}

/// Amounts are integer fen in decimal, no sign, no leading zeros, no decimal point.
pub fn amount(value: &str, currency: &str) -> Result<i64, FieldError> {
    if currency != "CNY" {
        return Err(FieldError::invalid("Ccy", "must be CNY"));
    }
    if value.starts_with('-')
        || value == "0"
        || value.bytes().all(|b| b == b'0') && !value.is_empty()
    {
        return Err(FieldError {
            code: ResultCode::AmountNotPositive,
            detail: format!("<Amt> is {value}; amounts are positive integers of fen"),
        });
    }
    if value.is_empty()
        || value.len() > 15
        || value.starts_with('0')
        || !value.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(FieldError::invalid(
            "Amt",
            "must be a positive integer number of fen (e.g. 1000 for 10.00 yuan), at most 15 digits",
        ));
    }
    value
        .parse::<i64>()
        .map_err(|_| FieldError::invalid("Amt", "is out of range"))
}

fn integer(value: &str, field: &str, min: i64, max: i64) -> Result<i64, FieldError> {
    match value.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(FieldError::invalid(
            field,
            format!("must be an integer from {min} to {max}"),
        )),
    }
}

pub fn time(value: &str, field: &str) -> Result<DateTime<FixedOffset>, FieldError> {
    DateTime::parse_from_rfc3339(value).map_err(|_| {
        FieldError::invalid(
            field,
            "must be RFC 3339 with an offset, e.g. 2026-11-22T10:15:30+08:00",
        )
    })
}

fn check_account(account_no: &str) -> Result<(), FieldError> {
    if !(12..=25).contains(&account_no.len()) || !account_no.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldError::invalid("AcctNo", "must be 12-25 digits"));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), FieldError> {
    let chars = name.chars().count();
    if chars == 0 || chars > 64 || name.chars().any(char::is_control) {
        return Err(FieldError::invalid(
            "AcctNm",
            "must be 1-64 characters without control characters",
        ));
    }
    Ok(())
}

/// GB 11643 resident id: 17 digits and a check character computed over them.
fn check_id_number(id: &str) -> Result<(), FieldError> {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let bytes = id.as_bytes();
    if bytes.len() != 18 || !bytes[..17].iter().all(u8::is_ascii_digit) {
        return Err(FieldError::invalid(
            "IdNo",
            "must be an 18-character resident id number",
        ));
    }
    let sum: u32 = bytes[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    if CHECK[(sum % 11) as usize] != bytes[17].to_ascii_uppercase() {
        return Err(FieldError::invalid("IdNo", "has a wrong check character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_positive_integer_fen() {
        assert_eq!(amount("1000", "CNY"), Ok(1000));
        assert_eq!(
            amount("0", "CNY").unwrap_err().code,
            ResultCode::AmountNotPositive
        );
        assert_eq!(
            amount("-5", "CNY").unwrap_err().code,
            ResultCode::AmountNotPositive
        );
        assert_eq!(
            amount("000", "CNY").unwrap_err().code,
            ResultCode::AmountNotPositive
        );
        for bad in ["10.00", "1e3", "", "0100", "9999999999999999", "１２"] {
            assert_eq!(
                amount(bad, "CNY").unwrap_err().code,
                ResultCode::InvalidField,
                "{bad}"
            );
        }
        assert_eq!(
            amount("100", "USD").unwrap_err().detail,
            "<Ccy> must be CNY"
        );
    }

    #[test]
    fn resident_id_check_character_is_verified() {
        assert!(check_id_number("110101199003077774").is_ok());
        assert!(check_id_number("11010519491231002X").is_ok());
        assert!(
            check_id_number("11010519491231002x").is_ok(),
            "a lower-case x is the same check character"
        );
        assert_eq!(
            check_id_number("110101199003077775").unwrap_err().detail,
            "<IdNo> has a wrong check character"
        );
        assert!(check_id_number("11010119900307777").is_err());
        assert!(check_id_number("1101011990030777AB").is_err());
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let body = Element {
            name: "MsgBody".into(),
            text: String::new(),
            children: vec![
                Element {
                    name: "ReqSerial".into(),
                    text: "R1".into(),
                    children: vec![],
                },
                Element {
                    name: "AgrmtNo".into(),
                    text: "A1".into(),
                    children: vec![],
                },
                Element {
                    name: "Amount".into(),
                    text: "1".into(),
                    children: vec![],
                },
            ],
        };
        let error = parse(MsgType::Debit, &body, None).unwrap_err();
        assert_eq!(error.code, ResultCode::UnexpectedField);
        assert_eq!(error.detail, "<Amount> is not a field of DEBIT");
        let body = Element {
            children: body.children[..2].to_vec(),
            ..body
        };
        let error = parse(MsgType::Debit, &body, None).unwrap_err();
        assert_eq!(
            (error.code, error.detail.as_str()),
            (ResultCode::MissingField, "<Amt> is required")
        );
    }
}
