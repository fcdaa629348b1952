//! Segment files: their names, listing a log directory in order, and walking the frames of a
//! segment's bytes with damage located to the byte.
//!
//! Owns: the file-name scheme `audit-YYYYMMDD-NNNNNN.seg` (UTC day the segment was started, and
//! the segment number, which counts up across days and gives the order), quarantine names, and
//! the frame walk shared by the writer's recovery and the verifier.
//! Must never: order segments by anything but their number, or skip damage silently.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate};

use super::record::{Frame, FrameError, read_frame, resync};

const PREFIX: &str = "audit-";
pub const SUFFIX: &str = ".seg";
/// `<segment file name>.torn-<byte offset>`: bytes a recovery moved out of a segment.
pub const QUARANTINE_INFIX: &str = ".torn-";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    pub number: u64,
    pub name: String,
    pub path: PathBuf,
}

/// The UTC day of a time in ms since the epoch (times beyond chrono's range count as day 0).
pub fn utc_day(time_ms: u64) -> NaiveDate {
    DateTime::from_timestamp_millis(i64::try_from(time_ms).unwrap_or(i64::MAX))
        .unwrap_or_default()
        .date_naive()
}

pub fn file_name(number: u64, day: NaiveDate) -> String {
    format!("{PREFIX}{}-{number:06}{SUFFIX}", day.format("%Y%m%d"))
}

/// The segment number in a segment file name, None for any other name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let (date, number) = rest.split_once('-')?;
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
    if number.len() < 6 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

pub fn quarantine_name(segment_name: &str, offset: u64) -> String {
    format!("{segment_name}{QUARANTINE_INFIX}{offset}")
}

/// The segment files of `dir`, by segment number. Two files with one number is an error.
pub fn list(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(number) = parse_file_name(&name) {
            segments.push(SegmentFile {
                number,
                path: entry.path(),
                name,
            });
        }
    }
    segments.sort_by(|a, b| a.number.cmp(&b.number).then(a.name.cmp(&b.name)));
    if let Some(pair) = segments.windows(2).find(|w| w[0].number == w[1].number) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "two segment files carry number {}: {} and {}; move the one that does not \
                 belong out of the directory",
                pair[0].number, pair[0].name, pair[1].name
            ),
        ));
    }
    Ok(segments)
}

/// Quarantine files in `dir` (names only), sorted.
pub fn list_quarantined(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str()
            && name.contains(QUARANTINE_INFIX)
            && name.starts_with(PREFIX)
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// One step of a walk over a segment's frames.
#[derive(Debug)]
pub enum Step {
    Frame {
        offset: usize,
        len: usize,
        frame: Frame,
    },
    /// The bytes at `offset` are not a valid frame. `resumes_at` is where the next valid frame
    /// starts; None means nothing valid follows (at the end of the last segment: a torn tail).
    Damage {
        offset: usize,
        error: FrameError,
        resumes_at: Option<usize>,
    },
}

/// Walks the frames of `bytes` from `start` (the end of the header).
pub struct Frames<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Frames<'a> {
    pub fn new(bytes: &'a [u8], start: usize) -> Self {
        Self { bytes, at: start }
    }
}

impl Iterator for Frames<'_> {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let offset = self.at;
        match read_frame(&self.bytes[offset..]) {
            Ok((frame, len)) => {
                self.at += len;
                Some(Step::Frame { offset, len, frame })
            }
            Err(error) => {
                let resumes_at = resync(self.bytes, offset + 1);
                self.at = resumes_at.unwrap_or(self.bytes.len());
                Some(Step::Damage {
                    offset,
                    error,
                    resumes_at,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 15).unwrap();
        let name = file_name(42, day);
        assert_eq!(name, "audit-20261115-000042.seg");
        assert_eq!(parse_file_name(&name), Some(42));
        assert_eq!(
            parse_file_name("audit-20261115-1234567.seg"),
            Some(1_234_567)
        );
        for stranger in [
            "audit-20261115-000042.seg.torn-99",
            "audit-2026111-000042.seg",
            "audit-20261315-000042.seg",
            "audit-20261115-42.seg",
            "notes.txt",
        ] {
            assert_eq!(parse_file_name(stranger), None, "{stranger}");
        }
        assert_eq!(utc_day(0), NaiveDate::from_ymd_opt(1970, 1, 1).unwrap());
    }
}
