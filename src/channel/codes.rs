//! The result codes institutions receive: one table, used by every flow and documented in
//! docs/protocol.md (a test checks the two agree).
//!
//! Owns: the code, its meaning and whether a retry with the same request serial can help.
//! Must never: reuse a code for another meaning once published, or expose internal details
//! (SQL, stack traces) in the text sent to an institution.

use std::fmt;

/// Every outcome an institution can see in `<RsltCd>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    Success,
    /// Accepted, final result not known yet (core timeout, risk review): query or wait for the
    /// notification.
    Processing,

    MalformedMessage,
    MissingField,
    InvalidField,
    MessageTooLarge,
    WrongMessageType,
    UnexpectedField,

    UnknownInstitution,
    BadSignature,
    UnknownSignKeySerial,
    SendTimeOutsideWindow,
    DuplicateMessageId,
    EnvelopeInvalid,
    InstitutionDisabled,

    AmountNotPositive,
    OverSingleLimit,
    OverDailyLimit,
    AgreementNotFound,
    AgreementNotActive,
    RefundExceedsRemaining,
    OriginalNotRefundable,
    VerificationCodeInvalid,
    SerialReusedWithDifferentContent,
    InsufficientFunds,
    AccountUnknown,
    AccountFrozen,
    TransactionNotFound,
    AgreementAlreadyActive,
    RiskDeclined,

    SystemBusy,
    CoreUnavailable,
    InternalError,
}

impl ResultCode {
    pub const ALL: &'static [ResultCode] = &[
        ResultCode::Success,
        ResultCode::Processing,
        ResultCode::MalformedMessage,
        ResultCode::MissingField,
        ResultCode::InvalidField,
        ResultCode::MessageTooLarge,
        ResultCode::WrongMessageType,
        ResultCode::UnexpectedField,
        ResultCode::UnknownInstitution,
        ResultCode::BadSignature,
        ResultCode::UnknownSignKeySerial,
        ResultCode::SendTimeOutsideWindow,
        ResultCode::DuplicateMessageId,
        ResultCode::EnvelopeInvalid,
        ResultCode::InstitutionDisabled,
        ResultCode::AmountNotPositive,
        ResultCode::OverSingleLimit,
        ResultCode::OverDailyLimit,
        ResultCode::AgreementNotFound,
        ResultCode::AgreementNotActive,
        ResultCode::RefundExceedsRemaining,
        ResultCode::OriginalNotRefundable,
        ResultCode::VerificationCodeInvalid,
        ResultCode::SerialReusedWithDifferentContent,
        ResultCode::InsufficientFunds,
        ResultCode::AccountUnknown,
        ResultCode::AccountFrozen,
        ResultCode::TransactionNotFound,
        ResultCode::AgreementAlreadyActive,
        ResultCode::RiskDeclined,
        ResultCode::SystemBusy,
        ResultCode::CoreUnavailable,
        ResultCode::InternalError,
    ];

    /// The four-character code on the wire.
    pub fn code(self) -> &'static str {
        use ResultCode::*;
        match self {
            Success => "0000",
            Processing => "0001",
            MalformedMessage => "1001",
            MissingField => "1002",
            InvalidField => "1003",
            MessageTooLarge => "1004",
            WrongMessageType => "1005",
            UnexpectedField => "1006",
            UnknownInstitution => "2001",
            BadSignature => "2002",
            UnknownSignKeySerial => "2003",
            SendTimeOutsideWindow => "2004",
            DuplicateMessageId => "2005",
            EnvelopeInvalid => "2006",
            InstitutionDisabled => "2007",
            AmountNotPositive => "3001",
            OverSingleLimit => "3002",
            OverDailyLimit => "3003",
            AgreementNotFound => "3004",
            AgreementNotActive => "3005",
            RefundExceedsRemaining => "3006",
            OriginalNotRefundable => "3007",
            VerificationCodeInvalid => "3008",
            SerialReusedWithDifferentContent => "3009",
            InsufficientFunds => "3010",
            AccountUnknown => "3011",
            AccountFrozen => "3012",
            TransactionNotFound => "3013",
            AgreementAlreadyActive => "3014",
            RiskDeclined => "3015",
            SystemBusy => "9001",
            CoreUnavailable => "9002",
            InternalError => "9999",
        }
    }

    /// What the code means, as documented for institutions.
    pub fn meaning(self) -> &'static str {
        use ResultCode::*;
        match self {
            Success => "success",
            Processing => {
                "accepted; the final result is not known yet: query it or wait for the notification"
            }
            MalformedMessage => "the message is not well-formed (XML, signature suffix, encoding)",
            MissingField => "a required field is missing",
            InvalidField => "a field has an invalid value or format",
            MessageTooLarge => "the message is larger than the configured limit",
            WrongMessageType => "MsgTp does not match the path the message was posted to",
            UnexpectedField => "the message carries a field this message type does not have",
            UnknownInstitution => "SndInstId is not a configured institution",
            BadSignature => "the signature does not verify over the signed bytes",
            UnknownSignKeySerial => "SgnSN is not the institution's configured sign-key serial",
            SendTimeOutsideWindow => "SndDtTm is outside the allowed window (replay protection)",
            DuplicateMessageId => "MsgId was used before (replay protection)",
            EnvelopeInvalid => {
                "the digital envelope or an encrypted field cannot be opened, or EncSN is unknown"
            }
            InstitutionDisabled => "the institution is disabled in kunpay's configuration",
            AmountNotPositive => "the amount must be a positive integer number of fen",
            OverSingleLimit => "the amount is over the per-transaction limit",
            OverDailyLimit => "the amount would exceed the daily limit",
            AgreementNotFound => "no agreement with this number exists for this institution",
            AgreementNotActive => {
                "the agreement is not active (pending confirmation or terminated)"
            }
            RefundExceedsRemaining => {
                "the refund is larger than what remains refundable of the original debit"
            }
            OriginalNotRefundable => {
                "the original transaction does not exist, is not a debit, or did not succeed"
            }
            VerificationCodeInvalid => "the verification code is wrong or expired",
            SerialReusedWithDifferentContent => {
                "ReqSerial was used before with different content; RsltMsg lists the fields"
            }
            InsufficientFunds => "the core rejected the posting: insufficient funds",
            AccountUnknown => "the core does not know the account",
            AccountFrozen => "the core rejected the posting: the account is frozen",
            TransactionNotFound => "no transaction with this serial exists for this institution",
            AgreementAlreadyActive => {
                "an active agreement already exists for this account at this institution"
            }
            RiskDeclined => {
                "declined by the bank's risk control; do not retry this payment unchanged"
            }
            SystemBusy => {
                "kunpay is at its configured capacity for this institution; retry later with the same ReqSerial"
            }
            CoreUnavailable => "core banking is unavailable and nothing was posted; retry later",
            InternalError => "internal error; retry later with the same ReqSerial",
        }
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.meaning())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_and_four_digits() {
        let mut seen = HashSet::new();
        for code in ResultCode::ALL {
            assert_eq!(code.code().len(), 4);
            assert!(code.code().chars().all(|c| c.is_ascii_digit()));
            assert!(seen.insert(code.code()), "duplicate {}", code.code());
        }
    }

    #[test]
    fn docs_list_every_code_with_its_meaning() {
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
                .unwrap();
        for code in ResultCode::ALL {
            let row = format!("| `{}` | {} |", code.code(), code.meaning());
            assert!(docs.contains(&row), "docs/protocol.md lacks the row {row}");
        }
    }
}
