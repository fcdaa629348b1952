//! The signed checkpoint text, pure. Text rather than binary so that an auditor can read with
//! `cat` exactly what the SM2 signature covers; canonical (one spelling per checkpoint), so the
//! verifier parses it strictly and re-renders it to the same bytes.
//!
//! Owns: the checkpoint statement, its exact byte form and its strict parser.
//! Must never: accept a text that does not re-render to the identical bytes.

use super::merkle::{from_hex, to_hex};
use super::record::{Hash, MAX_KEY_ID_LEN, MAX_NODE_ID_LEN, check_identifier};

pub const CHECKPOINT_TITLE: &str = "kunpay audit checkpoint v1";

/// What one checkpoint states: "records `first..=last` of node `node_id` have these hashes",
/// sealed by the key `key_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub node_id: String,
    pub key_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hash of record `last_seq`: the chain head, which commits to every record before it.
    pub head: Hash,
    /// Merkle root over the hashes of records `first_seq..=last_seq`.
    pub root: Hash,
    pub time_ms: u64,
}

impl Checkpoint {
    /// The exact bytes that are signed. Every line ends with LF; no other whitespace.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "{CHECKPOINT_TITLE}\nnode: {}\nkey: {}\nfirst: {}\nlast: {}\nhead: {}\nroot: {}\n\
             time: {}\n",
            self.node_id,
            self.key_id,
            self.first_seq,
            self.last_seq,
            to_hex(&self.head),
            to_hex(&self.root),
            self.time_ms
        )
        .into_bytes()
    }

    pub fn records(&self) -> u64 {
        self.last_seq - self.first_seq + 1
    }

    /// Parses signed bytes strictly: field order, spelling and the canonical form are checked.
    pub fn parse(signed: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(signed).map_err(|_| "checkpoint text is not UTF-8")?;
        let mut lines = text.split('\n');
        if lines.next() != Some(CHECKPOINT_TITLE) {
            return Err(format!(
                "checkpoint text does not start with {CHECKPOINT_TITLE:?}"
            ));
        }
        let mut field = |name: &str| -> Result<&str, String> {
            let line = lines
                .next()
                .ok_or_else(|| format!("checkpoint text ends before {name:?}"))?;
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(": "))
                .ok_or_else(|| format!("checkpoint line {line:?} where {name:?} was expected"))
        };
        let number = |name: &str, value: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("checkpoint {name} {value:?} is not a number"))
        };
        let hash = |name: &str, value: &str| -> Result<Hash, String> {
            from_hex(value)
                .ok_or_else(|| format!("checkpoint {name} {value:?} is not 64 hex digits"))
        };
        let node_id = field("node")?.to_owned();
        let key_id = field("key")?.to_owned();
        let first_seq = number("first", field("first")?)?;
        let last_seq = number("last", field("last")?)?;
        let head = hash("head", field("head")?)?;
        let root = hash("root", field("root")?)?;
        let time_ms = number("time", field("time")?)?;
        check_identifier("node id", &node_id, MAX_NODE_ID_LEN).map_err(|e| e.to_string())?;
        check_identifier("key id", &key_id, MAX_KEY_ID_LEN).map_err(|e| e.to_string())?;
        if first_seq == 0 || last_seq < first_seq {
            return Err(format!(
                "checkpoint range {first_seq}..{last_seq} is empty or starts at 0"
            ));
        }
        let checkpoint = Checkpoint {
            node_id,
            key_id,
            first_seq,
            last_seq,
            head,
            root,
            time_ms,
        };
        if checkpoint.signed_bytes() != signed {
            return Err("checkpoint text is not in canonical form (extra or altered bytes)".into());
        }
        Ok(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            node_id: "node-a".into(),
            key_id: "audit-2026".into(),
            first_seq: 1,
            last_seq: 1000,
            head: [0xab; 32],
            root: [0xcd; 32],
            time_ms: 1_763_164_800_000,
        }
    }

    #[test]
    fn text_round_trip() {
        let bytes = sample().signed_bytes();
        assert!(bytes.starts_with(b"kunpay audit checkpoint v1\nnode: node-a\nkey: audit-2026\n"));
        assert_eq!(Checkpoint::parse(&bytes).unwrap(), sample());
    }

    #[test]
    fn non_canonical_spellings_are_refused() {
        let text = String::from_utf8(sample().signed_bytes()).unwrap();
        for bad in [
            text.replace("first: 1\n", "first: 01\n"),
            text.replace("head: ab", "head: AB"),
            format!("{text}\n"),
            text.replace('\n', "\r\n"),
            text.replace("last: 1000", "last: 0"),
        ] {
            assert!(Checkpoint::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
