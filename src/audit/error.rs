//! Errors of the audit log writer: each says what failed, where, and what to do.

use std::io;
use std::path::PathBuf;

use super::record::FormatError;
use crate::crypto::CryptoError;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log setting {setting}: {reason}")]
    Settings {
        setting: &'static str,
        reason: String,
    },

    #[error("audit log: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error(
        "audit log directory {} is in use by another process (lock {}); run one writer per \
         directory",
        dir.display(), lock.display()
    )]
    Locked { dir: PathBuf, lock: PathBuf },

    #[error(
        "audit log {} belongs to node {found:?}, not {expected:?}; give each node its own \
         directory",
        dir.display()
    )]
    WrongNode {
        dir: PathBuf,
        found: String,
        expected: String,
    },

    #[error(
        "audit segment {} is damaged at byte {offset}: {reason}; this is not a torn tail left \
         by a crash, so kunpay will not append to it: run `kunpay-audit verify {}` and keep the \
         directory for the auditors",
        segment.display(), dir.display()
    )]
    Damaged {
        dir: PathBuf,
        segment: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error("audit record refused: {0}")]
    Record(#[from] FormatError),

    #[error("audit checkpoint could not be signed: {0}")]
    Signing(#[source] CryptoError),

    /// The writer hit an I/O error earlier: after a failed write or fdatasync the file's state
    /// is unknown, so nothing more is appended (retrying an fsync can report success falsely).
    #[error(
        "audit log unusable since an earlier failure ({reason}); nothing more can be logged: \
         fix the disk and restart kunpay"
    )]
    Unusable { reason: String },

    #[error("audit log closed")]
    Closed,
}
