//! The on-disk format of the audit log, pure: segment headers and frames (records and
//! checkpoints), encoded and decoded byte for byte as docs/audit.md describes them.
//!
//! Owns: every byte layout, the limits on every field, and the frame hash that lets a reader
//! tell a complete frame from a torn or altered one.
//! Must never: do I/O, accept a field beyond its limit, or decode a frame without checking its
//! hash (a frame that fails its hash is reported, never half-used).

use std::fmt;

use uuid::Uuid;

use crate::crypto::sm3;

/// Version of the segment and frame formats; written into every segment header.
pub const FORMAT_VERSION: u16 = 1;
pub const SEGMENT_MAGIC: &[u8; 8] = b"KPAUDSEG";
pub const HASH_LEN: usize = sm3::DIGEST_LEN;
pub type Hash = [u8; HASH_LEN];
/// The "hash of record 0": what the first record of a log links to.
pub const GENESIS_HASH: Hash = [0u8; HASH_LEN];

pub const MAX_NODE_ID_LEN: usize = 64;
pub const MAX_KEY_ID_LEN: usize = 64;
pub const MAX_PEER_LEN: usize = 128;
pub const MAX_MESSAGE_TYPE_LEN: usize = 64;
/// The largest message the channel accepts (`channel.max_body`, 16 MiB) plus room for headers.
pub const MAX_PAYLOAD_LEN: usize = 17 * 1024 * 1024;
/// A checkpoint's signed text is a few hundred bytes; a DER SM2 signature at most 72.
pub const MAX_SIGNED_LEN: usize = 4096;
pub const MAX_SIGNATURE_LEN: usize = 128;

pub const FRAME_RECORD: u8 = b'R';
pub const FRAME_CHECKPOINT: u8 = b'C';
/// kind (1) + body length (4).
pub const FRAME_PREFIX_LEN: usize = 5;
/// seq, time, direction, peer signature, txn flag, txn id, prev hash, peer len, type len,
/// payload len: everything but the three variable fields.
const RECORD_FIXED_LEN: usize = 8 + 8 + 1 + 1 + 1 + 16 + HASH_LEN + 1 + 1 + 4;
pub const MAX_RECORD_BODY_LEN: usize =
    RECORD_FIXED_LEN + MAX_PEER_LEN + MAX_MESSAGE_TYPE_LEN + MAX_PAYLOAD_LEN;
const MAX_CHECKPOINT_BODY_LEN: usize = 4 + MAX_SIGNED_LEN + 2 + MAX_SIGNATURE_LEN;
/// No valid frame is longer than this; a length field above it is damage, not a big record.
pub const MAX_FRAME_LEN: usize = FRAME_PREFIX_LEN + MAX_RECORD_BODY_LEN + HASH_LEN;

/// Which way a message crossed kunpay's boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received by kunpay (an institution's request, a core reply).
    In,
    /// Sent by kunpay (an answer, a notification attempt, a core request).
    Out,
    /// Inside kunpay: operator actions and the log's own recovery markers.
    Internal,
}

impl Direction {
    fn code(self) -> u8 {
        match self {
            Direction::In => 1,
            Direction::Out => 2,
            Direction::Internal => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Direction::In),
            2 => Some(Direction::Out),
            3 => Some(Direction::Internal),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::In => "IN",
            Direction::Out => "OUT",
            Direction::Internal => "INTERNAL",
        })
    }
}

/// What kunpay did with the peer's SM2 signature on an inbound message. The verifier re-checks
/// every `Verified` one (non-repudiation of what kunpay acted on); a message refused at the edge
/// is logged too, and its signature may well be invalid, which is why the flag exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerSignature {
    /// No peer SM2 signature involved: core link (HMAC), operator actions, our own messages.
    None,
    /// kunpay verified the institution's signature on these exact bytes and acted on them.
    Verified,
    /// Inbound, but refused before or at the signature check; not acted on.
    NotVerified,
}

impl PeerSignature {
    fn code(self) -> u8 {
        match self {
            PeerSignature::None => 0,
            PeerSignature::Verified => 1,
            PeerSignature::NotVerified => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(PeerSignature::None),
            1 => Some(PeerSignature::Verified),
            2 => Some(PeerSignature::NotVerified),
            _ => None,
        }
    }
}

impl fmt::Display for PeerSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerSignature::None => "none",
            PeerSignature::Verified => "verified",
            PeerSignature::NotVerified => "not-verified",
        })
    }
}

/// A field that breaks the format's rules (encoding refuses it; decoding reports it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{field} is {len} bytes; the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} {value:?} has a character outside {allowed}")]
    BadCharacters {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("{0}")]
    Malformed(String),
}

/// Node ids and key ids appear in file names and in the signed checkpoint text: keep them to
/// characters that need no quoting anywhere.
pub fn check_identifier(field: &'static str, value: &str, max: usize) -> Result<(), FormatError> {
    if value.is_empty() {
        return Err(FormatError::Empty { field });
    }
    if value.len() > max {
        return Err(FormatError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(FormatError::BadCharacters {
            field,
            value: value.to_owned(),
            allowed: "A-Z a-z 0-9 . _ -",
        });
    }
    Ok(())
}

/// Peers are institution ids, `core`, `operator:NAME`, `audit`: printable, no control bytes.
fn check_label(field: &'static str, value: &str, max: usize) -> Result<(), FormatError> {
    if value.is_empty() {
        return Err(FormatError::Empty { field });
    }
    if value.len() > max {
        return Err(FormatError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FormatError::BadCharacters {
            field,
            value: value.to_owned(),
            allowed: "printable characters without spaces",
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Segment header

/// The first bytes of every segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u16,
    pub segment_number: u64,
    pub created_ms: u64,
    /// Sequence number the first record of this segment has (or will have).
    pub first_seq: u64,
    /// Hash of record `first_seq - 1` (the last record of the previous segment).
    pub prev_hash: Hash,
    pub node_id: String,
}

/// magic, version, segment number, created, first seq, prev hash, node id length.
const HEADER_FIXED_LEN: usize = 8 + 2 + 8 + 8 + 8 + HASH_LEN + 1;

impl SegmentHeader {
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        check_identifier("node id", &self.node_id, MAX_NODE_ID_LEN)?;
        let mut out = Vec::with_capacity(HEADER_FIXED_LEN + self.node_id.len() + HASH_LEN);
        out.extend_from_slice(SEGMENT_MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.segment_number.to_be_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.first_seq.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.push(self.node_id.len() as u8);
        out.extend_from_slice(self.node_id.as_bytes());
        let hash = sm3::digest(&out);
        out.extend_from_slice(&hash);
        Ok(out)
    }

    /// Decodes the header at the start of `bytes`; returns it and its length.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), HeaderError> {
        if bytes.len() < HEADER_FIXED_LEN {
            return Err(HeaderError::Incomplete { have: bytes.len() });
        }
        if &bytes[..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Invalid(
                "does not start with KPAUDSEG: not an audit segment".into(),
            ));
        }
        let node_len = bytes[HEADER_FIXED_LEN - 1] as usize;
        let total = HEADER_FIXED_LEN + node_len + HASH_LEN;
        if bytes.len() < total {
            return Err(HeaderError::Incomplete { have: bytes.len() });
        }
        let body = &bytes[..HEADER_FIXED_LEN + node_len];
        if sm3::digest(body)[..] != bytes[HEADER_FIXED_LEN + node_len..total] {
            return Err(HeaderError::Invalid(
                "header hash mismatch: the header was altered or damaged".into(),
            ));
        }
        let version = u16::from_be_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Invalid(format!(
                "format version {version}; this verifier reads version {FORMAT_VERSION}"
            )));
        }
        let node_id = std::str::from_utf8(&bytes[HEADER_FIXED_LEN..HEADER_FIXED_LEN + node_len])
            .map_err(|_| HeaderError::Invalid("node id is not UTF-8".into()))?
            .to_owned();
        check_identifier("node id", &node_id, MAX_NODE_ID_LEN)
            .map_err(|error| HeaderError::Invalid(error.to_string()))?;
        let header = SegmentHeader {
            version,
            segment_number: be_u64(&bytes[10..18]),
            created_ms: be_u64(&bytes[18..26]),
            first_seq: be_u64(&bytes[26..34]),
            prev_hash: hash_at(bytes, 34),
            node_id,
        };
        Ok((header, total))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header incomplete ({have} bytes)")]
    Incomplete { have: usize },
    #[error("{0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------------
// Records

/// One logged message, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_ms: u64,
    pub direction: Direction,
    pub peer_signature: PeerSignature,
    pub txn_id: Option<Uuid>,
    pub prev_hash: Hash,
    pub peer: String,
    pub message_type: String,
    pub payload: Vec<u8>,
}

impl Record {
    /// Refuses fields beyond their limits, so that nothing the writer accepts is unreadable.
    pub fn check(&self) -> Result<(), FormatError> {
        check_label("peer", &self.peer, MAX_PEER_LEN)?;
        check_label("message type", &self.message_type, MAX_MESSAGE_TYPE_LEN)?;
        if self.payload.len() > MAX_PAYLOAD_LEN {
            return Err(FormatError::TooLong {
                field: "message bytes",
                len: self.payload.len(),
                max: MAX_PAYLOAD_LEN,
            });
        }
        if self.peer_signature == PeerSignature::Verified && self.direction != Direction::In {
            return Err(FormatError::Malformed(
                "a peer signature can be verified only on an inbound (IN) message".into(),
            ));
        }
        Ok(())
    }

    /// Appends the complete frame (prefix, body, hash) to `out` and returns the record hash.
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<Hash, FormatError> {
        self.check()?;
        let body_len =
            RECORD_FIXED_LEN + self.peer.len() + self.message_type.len() + self.payload.len();
        let start = out.len();
        out.reserve(FRAME_PREFIX_LEN + body_len + HASH_LEN);
        out.push(FRAME_RECORD);
        out.extend_from_slice(&(body_len as u32).to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.push(self.direction.code());
        out.push(self.peer_signature.code());
        match self.txn_id {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(id.as_bytes());
            }
            None => {
                out.push(0);
                out.extend_from_slice(&[0u8; 16]);
            }
        }
        out.extend_from_slice(&self.prev_hash);
        out.push(self.peer.len() as u8);
        out.extend_from_slice(self.peer.as_bytes());
        out.push(self.message_type.len() as u8);
        out.extend_from_slice(self.message_type.as_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        let hash = sm3::digest(&out[start..]);
        out.extend_from_slice(&hash);
        debug_assert_eq!(out.len() - start, FRAME_PREFIX_LEN + body_len + HASH_LEN);
        Ok(hash)
    }

    /// Decodes a record body (the bytes between the frame prefix and the frame hash).
    pub fn decode_body(body: &[u8]) -> Result<Self, FormatError> {
        let malformed = |what: &str| FormatError::Malformed(format!("record body: {what}"));
        if body.len() < RECORD_FIXED_LEN {
            return Err(malformed("shorter than the fixed fields"));
        }
        let direction =
            Direction::from_code(body[16]).ok_or_else(|| malformed("unknown direction code"))?;
        let peer_signature = PeerSignature::from_code(body[17])
            .ok_or_else(|| malformed("unknown peer-signature code"))?;
        let txn_id = match body[18] {
            0 if body[19..35] == [0u8; 16] => None,
            1 => Some(Uuid::from_slice(&body[19..35]).map_err(|_| malformed("transaction id"))?),
            _ => return Err(malformed("bad transaction id flag")),
        };
        let prev_hash = hash_at(body, 35);
        let mut at = 35 + HASH_LEN;
        let peer = take_str(body, &mut at).ok_or_else(|| malformed("peer"))?;
        let message_type = take_str(body, &mut at).ok_or_else(|| malformed("message type"))?;
        let payload_len = body
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| malformed("payload length"))?;
        at += 4;
        if body.len() - at != payload_len {
            return Err(malformed("payload length does not match the frame length"));
        }
        let record = Record {
            seq: be_u64(&body[0..8]),
            time_ms: be_u64(&body[8..16]),
            direction,
            peer_signature,
            txn_id,
            prev_hash,
            peer,
            message_type,
            payload: body[at..].to_vec(),
        };
        record.check()?;
        Ok(record)
    }
}

fn take_str(body: &[u8], at: &mut usize) -> Option<String> {
    let len = *body.get(*at)? as usize;
    let bytes = body.get(*at + 1..*at + 1 + len)?;
    *at += 1 + len;
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Checkpoint frames

/// A checkpoint as stored: the exact signed bytes and the DER signature over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointFrame {
    pub signed: Vec<u8>,
    pub signature: Vec<u8>,
}

impl CheckpointFrame {
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        if self.signed.len() > MAX_SIGNED_LEN {
            return Err(FormatError::TooLong {
                field: "checkpoint text",
                len: self.signed.len(),
                max: MAX_SIGNED_LEN,
            });
        }
        if self.signature.len() > MAX_SIGNATURE_LEN {
            return Err(FormatError::TooLong {
                field: "checkpoint signature",
                len: self.signature.len(),
                max: MAX_SIGNATURE_LEN,
            });
        }
        let body_len = 4 + self.signed.len() + 2 + self.signature.len();
        let start = out.len();
        out.push(FRAME_CHECKPOINT);
        out.extend_from_slice(&(body_len as u32).to_be_bytes());
        out.extend_from_slice(&(self.signed.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.signed);
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        let hash = sm3::digest(&out[start..]);
        out.extend_from_slice(&hash);
        Ok(())
    }

    pub fn decode_body(body: &[u8]) -> Result<Self, FormatError> {
        let malformed = |what: &str| FormatError::Malformed(format!("checkpoint body: {what}"));
        let signed_len = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| malformed("too short"))?;
        if signed_len > MAX_SIGNED_LEN {
            return Err(malformed("signed text longer than its limit"));
        }
        let signed = body
            .get(4..4 + signed_len)
            .ok_or_else(|| malformed("signed text cut short"))?;
        let at = 4 + signed_len;
        let sig_len = body
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| malformed("signature length missing"))?;
        let signature = body
            .get(at + 2..)
            .filter(|rest| rest.len() == sig_len)
            .ok_or_else(|| malformed("signature length does not match the frame length"))?;
        Ok(CheckpointFrame {
            signed: signed.to_vec(),
            signature: signature.to_vec(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reading frames

/// A frame read from a segment, with its hash checked.
#[derive(Clone, Debug)]
pub enum Frame {
    Record { record: Record, hash: Hash },
    Checkpoint(CheckpointFrame),
}

/// Why the bytes at some offset are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The bytes end before the frame does: what a crash in the middle of a write leaves.
    #[error("frame incomplete: {need} bytes needed, {have} present")]
    Incomplete { need: usize, have: usize },
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("frame length {0} is beyond any valid frame")]
    BadLength(usize),
    #[error("frame hash mismatch: the bytes were altered or damaged")]
    HashMismatch,
    #[error("{0}")]
    Format(#[from] FormatError),
}

/// Reads the frame at the start of `bytes`: the frame and its total length.
pub fn read_frame(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    if bytes.len() < FRAME_PREFIX_LEN {
        return Err(FrameError::Incomplete {
            need: FRAME_PREFIX_LEN,
            have: bytes.len(),
        });
    }
    let kind = bytes[0];
    let body_len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let limit = match kind {
        FRAME_RECORD => MAX_RECORD_BODY_LEN,
        FRAME_CHECKPOINT => MAX_CHECKPOINT_BODY_LEN,
        other => return Err(FrameError::UnknownKind(other)),
    };
    if body_len > limit {
        return Err(FrameError::BadLength(body_len));
    }
    let total = FRAME_PREFIX_LEN + body_len + HASH_LEN;
    if bytes.len() < total {
        return Err(FrameError::Incomplete {
            need: total,
            have: bytes.len(),
        });
    }
    let hashed = &bytes[..FRAME_PREFIX_LEN + body_len];
    let hash = sm3::digest(hashed);
    if hash[..] != bytes[FRAME_PREFIX_LEN + body_len..total] {
        return Err(FrameError::HashMismatch);
    }
    let body = &hashed[FRAME_PREFIX_LEN..];
    let frame = match kind {
        FRAME_RECORD => Frame::Record {
            record: Record::decode_body(body)?,
            hash,
        },
        _ => Frame::Checkpoint(CheckpointFrame::decode_body(body)?),
    };
    Ok((frame, total))
}

/// After damage at `from`, the offset of the next byte where a valid frame starts, if any.
/// Only offsets whose kind byte and length are plausible are hashed, so this stays cheap.
pub fn resync(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(FRAME_PREFIX_LEN + HASH_LEN)).find(|&at| {
        matches!(bytes[at], FRAME_RECORD | FRAME_CHECKPOINT) && read_frame(&bytes[at..]).is_ok()
    })
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(array)
}

fn hash_at(bytes: &[u8], at: usize) -> Hash {
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(&bytes[at..at + HASH_LEN]);
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Record {
        Record {
            seq,
            time_ms: 1_763_164_800_123,
            direction: Direction::In,
            peer_signature: PeerSignature::Verified,
            txn_id: Some(Uuid::from_u128(0x1234)),
            prev_hash: [7u8; HASH_LEN],
            peer: "TENPAY".into(),
            message_type: "DEBIT".into(),
            payload: b"<root/>{S:AQID}".to_vec(),
        }
    }

    #[test]
    fn record_round_trip_and_hash_is_over_the_frame() {
        let mut out = Vec::new();
        let hash = sample(5).encode_frame(&mut out).unwrap();
        assert_eq!(&out[out.len() - HASH_LEN..], &hash);
        assert_eq!(hash, sm3::digest(&out[..out.len() - HASH_LEN]));
        let (frame, len) = read_frame(&out).unwrap();
        assert_eq!(len, out.len());
        match frame {
            Frame::Record { record, hash: h } => {
                assert_eq!(record, sample(5));
                assert_eq!(h, hash);
            }
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let mut out = Vec::new();
        sample(1).encode_frame(&mut out).unwrap();
        for at in 0..out.len() {
            let mut damaged = out.clone();
            damaged[at] ^= 0x01;
            assert!(
                read_frame(&damaged).is_err(),
                "flip at byte {at} not detected"
            );
        }
    }

    #[test]
    fn every_truncation_is_incomplete_not_garbage() {
        let mut out = Vec::new();
        sample(1).encode_frame(&mut out).unwrap();
        for len in 0..out.len() {
            assert!(
                matches!(read_frame(&out[..len]), Err(FrameError::Incomplete { .. })),
                "truncation to {len} bytes"
            );
        }
    }

    #[test]
    fn checkpoint_round_trip() {
        let frame = CheckpointFrame {
            signed: b"kunpay audit checkpoint v1\n".to_vec(),
            signature: vec![0x30, 0x44, 1, 2, 3],
        };
        let mut out = Vec::new();
        frame.encode_frame(&mut out).unwrap();
        match read_frame(&out).unwrap().0 {
            Frame::Checkpoint(read) => assert_eq!(read, frame),
            other => panic!("expected a checkpoint, got {other:?}"),
        }
    }

    #[test]
    fn header_round_trip_and_flip_detected() {
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            segment_number: 3,
            created_ms: 99,
            first_seq: 1001,
            prev_hash: [9u8; HASH_LEN],
            node_id: "node-a".into(),
        };
        let bytes = header.encode().unwrap();
        let (read, len) = SegmentHeader::decode(&bytes).unwrap();
        assert_eq!((read, len), (header, bytes.len()));
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x80;
            assert!(SegmentHeader::decode(&damaged).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn limits_are_enforced_on_encode() {
        let mut record = sample(1);
        record.peer = "x".repeat(MAX_PEER_LEN + 1);
        assert!(record.encode_frame(&mut Vec::new()).is_err());
        let mut record = sample(1);
        record.message_type = "A B".into();
        assert!(record.encode_frame(&mut Vec::new()).is_err());
        let mut record = sample(1);
        record.direction = Direction::Out;
        assert!(record.encode_frame(&mut Vec::new()).is_err());
        assert!(check_identifier("key id", "a/b", MAX_KEY_ID_LEN).is_err());
    }

    #[test]
    fn resync_finds_the_next_frame_after_damage() {
        let mut out = Vec::new();
        sample(1).encode_frame(&mut out).unwrap();
        let second = out.len();
        sample(2).encode_frame(&mut out).unwrap();
        out[10] ^= 0xff;
        assert!(read_frame(&out).is_err());
        assert_eq!(resync(&out, 1), Some(second));
    }
}
