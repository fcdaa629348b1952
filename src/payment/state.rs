//! The transaction state machine: which state may follow which.
//!
//! RECEIVED -> RISK_CHECKED -> SENT_TO_CORE -> SUCCEEDED | FAILED | UNKNOWN
//! UNKNOWN -> SUCCEEDED | FAILED            (resolved by asking the core, never by guessing)
//! SUCCEEDED -> REVERSED                    (a posting undone after a later failure)
//! RECEIVED | RISK_CHECKED -> FAILED        (declined before anything reached the core)
//! RECEIVED -> IN_REVIEW -> RISK_CHECKED     (risk said REVIEW; a person approved)
//! IN_REVIEW -> FAILED                      (a person declined; nothing reached the core)
//!
//! Owns: the transition table. Must never: allow leaving a final state except SUCCEEDED ->
//! REVERSED, or skip SENT_TO_CORE on the way to an outcome the core decided.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnState {
    Received,
    InReview,
    RiskChecked,
    SentToCore,
    Succeeded,
    Failed,
    Unknown,
    Reversed,
}

impl TxnState {
    pub const ALL: [TxnState; 8] = [
        TxnState::Received,
        TxnState::InReview,
        TxnState::RiskChecked,
        TxnState::SentToCore,
        TxnState::Succeeded,
        TxnState::Failed,
        TxnState::Unknown,
        TxnState::Reversed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Received => "RECEIVED",
            TxnState::InReview => "IN_REVIEW",
            TxnState::RiskChecked => "RISK_CHECKED",
            TxnState::SentToCore => "SENT_TO_CORE",
            TxnState::Succeeded => "SUCCEEDED",
            TxnState::Failed => "FAILED",
            TxnState::Unknown => "UNKNOWN",
            TxnState::Reversed => "REVERSED",
        }
    }

    pub fn can_become(self, next: TxnState) -> bool {
        use TxnState::*;
        matches!(
            (self, next),
            (Received, RiskChecked)
                | (Received, Failed)
                | (Received, InReview)
                | (InReview, RiskChecked)
                | (InReview, Failed)
                | (RiskChecked, SentToCore)
                | (RiskChecked, Failed)
                | (SentToCore, Succeeded)
                | (SentToCore, Failed)
                | (SentToCore, Unknown)
                | (Unknown, Succeeded)
                | (Unknown, Failed)
                | (Succeeded, Reversed)
        )
    }

    /// No further automatic transition will happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TxnState::Succeeded | TxnState::Failed | TxnState::Reversed
        )
    }
}

impl fmt::Display for TxnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TxnState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TxnState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown transaction state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_stay_final_except_a_reversal() {
        for from in TxnState::ALL {
            for to in TxnState::ALL {
                if from.is_final() && from.can_become(to) {
                    assert_eq!((from, to), (TxnState::Succeeded, TxnState::Reversed));
                }
            }
            assert!(
                !from.can_become(from),
                "{from} -> {from} is not a transition"
            );
        }
    }

    #[test]
    fn outcomes_decided_by_the_core_pass_through_sent_to_core() {
        assert!(!TxnState::RiskChecked.can_become(TxnState::Succeeded));
        assert!(!TxnState::Received.can_become(TxnState::Unknown));
        assert!(TxnState::Unknown.can_become(TxnState::Succeeded));
        assert!(!TxnState::Unknown.can_become(TxnState::Reversed));
        // A held transaction reaches the core only through RISK_CHECKED (a person's approval).
        assert!(!TxnState::InReview.can_become(TxnState::SentToCore));
        assert!(!TxnState::InReview.can_become(TxnState::Succeeded));
        assert!(!TxnState::InReview.is_final());
    }

    #[test]
    fn names_round_trip() {
        for state in TxnState::ALL {
            assert_eq!(state.as_str().parse::<TxnState>().unwrap(), state);
        }
    }
}
