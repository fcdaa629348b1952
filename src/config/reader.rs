//! Typed, span-aware access to a parsed TOML document.
//!
//! Owns: turning TOML items into typed values while collecting *every* problem (file, line, key,
//! reason) instead of stopping at the first, and reporting keys nobody asked for as unknown.
//! Must never: print a value it was asked to read as secret, or guess a default for a key that
//! is present but malformed (a typo in a limit must not silently become the default).

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use toml_edit::{Document, Item, Table};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `ops.listen`; empty for a syntax error.
    pub key: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub reason: String,
}

/// Every problem found in one configuration file. Display prints one line per problem in the
/// `FILE:LINE: KEY: REASON` form that editors and operators can jump to.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, issue) in self.issues.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = issue.line {
                write!(f, ":{line}")?;
            }
            if issue.key.is_empty() {
                write!(f, ": {}", issue.reason)?;
            } else {
                write!(f, ": {}: {}", issue.key, issue.reason)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub(crate) struct Reader<'d> {
    doc: &'d Document<String>,
    accessed: BTreeSet<String>,
    pub(crate) issues: Vec<ConfigIssue>,
}

impl<'d> Reader<'d> {
    pub(crate) fn new(doc: &'d Document<String>) -> Self {
        Reader {
            doc,
            accessed: BTreeSet::new(),
            issues: Vec::new(),
        }
    }

    pub(crate) fn line_of(&self, offset: usize) -> usize {
        line_of(self.doc.raw(), offset)
    }

    /// Records a problem with a key that was read successfully but fails a cross-field check.
    pub(crate) fn reject(&mut self, path: &str, reason: impl Into<String>) {
        let line = self
            .item(path)
            .and_then(|(_, item)| item.span())
            .map(|s| self.line_of(s.start));
        self.issues.push(ConfigIssue {
            key: path.to_string(),
            line,
            reason: reason.into(),
        });
    }

    fn item(&self, path: &str) -> Option<(&'d Table, &'d Item)> {
        let (section, key) = path.rsplit_once('.').unwrap_or(("", path));
        let table = if section.is_empty() {
            self.doc.as_table()
        } else {
            let mut table = self.doc.as_table();
            for part in section.split('.') {
                table = table.get(part)?.as_table()?;
            }
            table
        };
        table.get(key).map(|item| (table, item))
    }

    fn take(&mut self, path: &str) -> Option<&'d Item> {
        self.accessed.insert(path.to_string());
        let mut prefix = String::new();
        for part in path.split('.') {
            if !prefix.is_empty() {
                self.accessed.insert(prefix.clone());
                prefix.push('.');
            }
            prefix.push_str(part);
        }
        self.item(path).map(|(_, item)| item)
    }

    fn wrong(&mut self, path: &str, item: &Item, reason: String) {
        let line = item.span().map(|s| self.line_of(s.start));
        self.issues.push(ConfigIssue {
            key: path.to_string(),
            line,
            reason,
        });
    }

    /// Names of the sub-tables of `path` (e.g. the ids under `[institutions.*]`).
    pub(crate) fn table_names(&mut self, path: &str) -> Vec<String> {
        let Some(item) = self.take(path) else {
            return Vec::new();
        };
        match item.as_table() {
            Some(table) => table.iter().map(|(k, _)| k.to_string()).collect(),
            None => {
                self.wrong(
                    path,
                    item,
                    format!("expected a section of tables, found {}", item.type_name()),
                );
                Vec::new()
            }
        }
    }

    pub(crate) fn section_exists(&self, path: &str) -> bool {
        self.item(path).is_some_and(|(_, item)| item.is_table())
    }

    pub(crate) fn opt_str(&mut self, path: &str) -> Option<String> {
        let item = self.take(path)?;
        match item.as_str() {
            Some(value) => Some(value.to_string()),
            None => {
                self.wrong(
                    path,
                    item,
                    format!("expected a string, found {}", item.type_name()),
                );
                None
            }
        }
    }

    pub(crate) fn str_or(&mut self, path: &str, default: &str) -> String {
        self.opt_str(path).unwrap_or_else(|| default.to_string())
    }

    pub(crate) fn bool_or(&mut self, path: &str, default: bool) -> bool {
        let Some(item) = self.take(path) else {
            return default;
        };
        match item.as_bool() {
            Some(value) => value,
            None => {
                self.wrong(
                    path,
                    item,
                    format!("expected true or false, found {}", item.type_name()),
                );
                default
            }
        }
    }

    pub(crate) fn int_or(
        &mut self,
        path: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        let Some(item) = self.take(path) else {
            return default;
        };
        match item.as_integer() {
            Some(value) if range.contains(&value) => value,
            Some(value) => {
                self.wrong(
                    path,
                    item,
                    format!(
                        "{value} is out of range; allowed {}..={}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
            None => {
                self.wrong(
                    path,
                    item,
                    format!("expected an integer, found {}", item.type_name()),
                );
                default
            }
        }
    }

    /// A duration with a unit: `500ms`, `30s`, `5min`, `1h`. A bare number is rejected because
    /// the unit is exactly what an operator gets wrong.
    pub(crate) fn duration_or(
        &mut self,
        path: &str,
        default: Duration,
        range: (Duration, Duration),
    ) -> Duration {
        let Some(text) = self.opt_str(path) else {
            return default;
        };
        match parse_duration(&text) {
            Ok(value) if value >= range.0 && value <= range.1 => value,
            Ok(_) => {
                let item = self.take(path).expect("key was just read");
                self.wrong(
                    path,
                    item,
                    format!(
                        "\"{text}\" is out of range; allowed {} to {}",
                        humantime::format_duration(range.0),
                        humantime::format_duration(range.1)
                    ),
                );
                default
            }
            Err(reason) => {
                let item = self.take(path).expect("key was just read");
                self.wrong(path, item, reason);
                default
            }
        }
    }

    /// A size with a unit: `512B`, `64KiB`, `8MiB`, `1GB`.
    pub(crate) fn size_or(&mut self, path: &str, default: u64, range: (u64, u64)) -> u64 {
        let Some(text) = self.opt_str(path) else {
            return default;
        };
        match parse_size_with_unit(&text) {
            Ok(value) if value >= range.0 && value <= range.1 => value,
            Ok(_) => {
                let item = self.take(path).expect("key was just read");
                self.wrong(
                    path,
                    item,
                    format!(
                        "\"{text}\" is out of range; allowed {} to {} bytes",
                        range.0, range.1
                    ),
                );
                default
            }
            Err(reason) => {
                let item = self.take(path).expect("key was just read");
                self.wrong(path, item, reason);
                default
            }
        }
    }

    /// Any `FromStr` value (enums, socket addresses); `what` describes the accepted form.
    pub(crate) fn parsed_or<T: FromStr>(&mut self, path: &str, default: T, what: &str) -> T {
        let Some(text) = self.opt_str(path) else {
            return default;
        };
        match text.parse::<T>() {
            Ok(value) => value,
            Err(_) => {
                let item = self.take(path).expect("key was just read");
                self.wrong(path, item, format!("\"{text}\" is not {what}"));
                default
            }
        }
    }

    pub(crate) fn opt_path(&mut self, path: &str) -> Option<PathBuf> {
        let text = self.opt_str(path)?;
        if text.is_empty() {
            let item = self.take(path).expect("key was just read");
            self.wrong(path, item, "must not be empty".to_string());
            return None;
        }
        Some(PathBuf::from(text))
    }

    /// Reports every key and section that no part of the program read.
    pub(crate) fn finish(mut self) -> Vec<ConfigIssue> {
        let mut unknown = Vec::new();
        collect_unknown(
            self.doc.as_table(),
            "",
            &self.accessed,
            self.doc.raw(),
            &mut unknown,
        );
        self.issues.extend(unknown);
        self.issues.sort_by_key(|issue| issue.line.unwrap_or(0));
        self.issues
    }
}

fn collect_unknown(
    table: &Table,
    prefix: &str,
    accessed: &BTreeSet<String>,
    raw: &str,
    out: &mut Vec<ConfigIssue>,
) {
    for (key, item) in table.iter() {
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        let line = table
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| item.span())
            .map(|s| line_of(raw, s.start));
        if !accessed.contains(&path) {
            let known_here: Vec<&str> = accessed
                .iter()
                .filter_map(|known| {
                    let rest = if prefix.is_empty() {
                        Some(known.as_str())
                    } else {
                        known.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'))
                    };
                    rest.filter(|r| !r.contains('.'))
                })
                .collect();
            let what = if item.is_table() { "section" } else { "key" };
            out.push(ConfigIssue {
                key: path,
                line,
                reason: format!("unknown {what}; known here: {}", known_here.join(", ")),
            });
        } else if let Some(sub) = item.as_table() {
            collect_unknown(sub, &path, accessed, raw, out);
        }
    }
}

pub(crate) fn line_of(raw: &str, offset: usize) -> usize {
    raw.as_bytes()[..offset.min(raw.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses `30s`, `500ms`, `5min`, `1h 30min`. Requires a unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "\"{text}\" has no unit; write it with one, e.g. \"{trimmed}s\" or \"{trimmed}ms\""
        ));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("\"{text}\" is not a duration ({e}); use a number with a unit, e.g. \"30s\", \"500ms\", \"5min\""))
}

/// Parses `64KiB`, `8MiB`, `512B`, `1GB`. Requires a unit.
pub fn parse_size_with_unit(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "\"{text}\" has no unit; write it with one, e.g. \"{trimmed}B\" or \"{trimmed}KiB\""
        ));
    }
    parse_size::parse_size(trimmed).map_err(|e| {
        format!(
            "\"{text}\" is not a size ({e}); use a number with a unit, e.g. \"64KiB\", \"8MiB\""
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5min").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn sizes_need_units() {
        assert_eq!(parse_size_with_unit("64KiB").unwrap(), 65536);
        assert_eq!(parse_size_with_unit("8MiB").unwrap(), 8 * 1024 * 1024);
        assert_eq!(parse_size_with_unit("512B").unwrap(), 512);
        assert!(parse_size_with_unit("64").unwrap_err().contains("no unit"));
        assert!(
            parse_size_with_unit("lots")
                .unwrap_err()
                .contains("not a size")
        );
    }

    #[test]
    fn reader_collects_every_problem_with_lines() {
        let text = "[a]\nx = \"30\"\ny = 7\nz = true\n[b]\nw = 1\n";
        let doc = Document::parse(text.to_string()).unwrap();
        let mut reader = Reader::new(&doc);
        reader.duration_or(
            "a.x",
            Duration::from_secs(1),
            (Duration::ZERO, Duration::MAX),
        );
        reader.opt_str("a.y");
        let issues = reader.finish();
        let summary: Vec<(String, Option<usize>)> =
            issues.iter().map(|i| (i.key.clone(), i.line)).collect();
        assert_eq!(
            summary,
            vec![
                ("a.x".to_string(), Some(2)),
                ("a.y".to_string(), Some(3)),
                ("a.z".to_string(), Some(4)),
                ("b".to_string(), Some(5)),
            ]
        );
        assert!(issues[2].reason.contains("unknown key"));
        assert!(issues[3].reason.contains("unknown section"));
    }
}
