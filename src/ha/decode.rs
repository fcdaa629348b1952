//! A parser for the text that the `test_decoding` output plugin produces, one line per row of
//! `pg_logical_slot_peek_changes` (PostgreSQL's contrib/test_decoding; openGauss ships the same
//! plugin). Pure: no I/O, no allocation beyond the parsed line, every size bounded.
//!
//! The forms, with the options the applier passes (`include-xids` 1, `include-timestamp` 1,
//! `skip-empty-xacts` 1):
//!
//! ```text
//! BEGIN 529
//! table public.txn: INSERT: txn_id[uuid]:'0190...' amount_fen[bigint]:100 core_ref[character varying]:null
//! table public.txn: UPDATE: txn_id[uuid]:'0190...' state[character varying]:'FAILED'
//! table public.t: UPDATE: old-key: id[integer]:1 new-tuple: id[integer]:2 v[text]:'x'
//! table public.t: DELETE: id[integer]:2
//! table public.t: DELETE: (no-tuple-data)
//! table public.a, public.b: TRUNCATE: restart_seqs cascade
//! COMMIT 529 (at 2026-11-23 10:00:00.123456+00)
//! ```
//!
//! Values are each type's text output, printed by `print_literal`: integers, floats and numeric
//! bare; booleans as `true`/`false`; bit strings as `B'0101'`; everything else single-quoted with
//! quotes doubled (backslashes and newlines are literal). `null` is SQL NULL and
//! `unchanged-toast-datum` an out-of-line value an UPDATE did not touch (the applier leaves that
//! column alone). Identifiers come through `quote_identifier`: bare when they are lowercase
//! letters, digits and `_`, else double-quoted with quotes doubled. Column types come through
//! `format_type_be` (no type modifier: `character varying`, `timestamp with time zone`,
//! `integer[]`).

use std::fmt;

use chrono::{DateTime, FixedOffset};

/// A line longer than this is refused rather than parsed (one row's text output: a 16 MiB
/// bytea is 32 MiB of hex). kunpay's rows are a few hundred bytes.
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// PostgreSQL's own limit on a table's columns.
pub const MAX_COLUMNS: usize = 1600;
/// NAMEDATALEN - 1 bytes, doubled for the worst quoting, plus the quotes.
pub const MAX_IDENTIFIER: usize = 2 * 63 + 2;
/// Longest type name we accept (`timestamp without time zone[]` is 29).
pub const MAX_TYPE_NAME: usize = 256;
/// Tables one TRUNCATE line may name.
pub const MAX_TRUNCATE_TABLES: usize = 1000;

/// A WAL position (`XXX/YYY` in text, a 64-bit byte offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(text: &str) -> Result<Lsn, DecodeError> {
        let bad = || DecodeError::new(0, format!("{text:?} is not an LSN (HEX/HEX)"));
        let (hi, lo) = text.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }

    /// Bytes from `earlier` to `self`, 0 when `earlier` is ahead.
    pub fn bytes_after(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Why a line could not be parsed: the byte offset in the line and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: usize,
    pub reason: String,
}

impl DecodeError {
    fn new(offset: usize, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            offset,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test_decoding output not understood at byte {}: {}",
            self.offset, self.reason
        )
    }
}

impl std::error::Error for DecodeError {}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One column value as test_decoding printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An out-of-line (TOASTed) value the UPDATE did not change: not in the WAL, so the
    /// target's copy must be kept.
    UnchangedToast,
    /// The type's text representation, unquoted (feed it to the type's input function).
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// As `format_type_be` prints it, without modifier: `character varying`, `bigint`.
    pub type_name: String,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Insert {
        table: TableName,
        new: Vec<Column>,
    },
    /// `old_key` is present when the replica identity changed (a primary key update) or the
    /// table has REPLICA IDENTITY FULL; otherwise the key is read from `new`.
    Update {
        table: TableName,
        old_key: Option<Vec<Column>>,
        new: Vec<Column>,
    },
    /// `key` is empty when the table has no replica identity (`(no-tuple-data)`): the applier
    /// cannot say which row went and refuses.
    Delete {
        table: TableName,
        key: Vec<Column>,
    },
    Truncate {
        tables: Vec<TableName>,
        restart_seqs: bool,
        cascade: bool,
    },
}

impl Change {
    /// The tables the change touches (one, or several for a TRUNCATE).
    pub fn tables(&self) -> Vec<&TableName> {
        match self {
            Change::Insert { table, .. }
            | Change::Update { table, .. }
            | Change::Delete { table, .. } => vec![table],
            Change::Truncate { tables, .. } => tables.iter().collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Begin {
        xid: u64,
    },
    Commit {
        xid: u64,
        /// Present with `include-timestamp`: the source's commit time, for lag in seconds.
        at: Option<DateTime<FixedOffset>>,
    },
    Change(Change),
    /// `pg_logical_emit_message` output; kunpay writes none and the applier ignores them.
    Message {
        transactional: bool,
    },
}

/// Parses one row's `data` column.
pub fn parse_line(line: &str) -> Result<Line, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::new(
            MAX_LINE,
            format!(
                "line of {} bytes is over the {MAX_LINE}-byte bound",
                line.len()
            ),
        ));
    }
    let mut c = Cursor { s: line, pos: 0 };
    if c.eat("BEGIN") {
        let xid = parse_xid(&mut c)?;
        c.end()?;
        return Ok(Line::Begin { xid });
    }
    if c.eat("COMMIT") {
        let xid = parse_xid(&mut c)?;
        let mut at = None;
        if c.eat(" (at ") {
            let start = c.pos;
            let close = c.rest().find(')').ok_or_else(|| {
                c.error("commit timestamp without its closing parenthesis".to_string())
            })?;
            let text = &c.rest()[..close];
            at = Some(parse_commit_time(text).map_err(|e| DecodeError::new(start, e))?);
            c.pos += close + 1;
        }
        // openGauss appends the commit sequence number; it carries nothing the applier needs.
        if c.eat(" CSN ") {
            c.take_while(|b| b.is_ascii_digit());
        }
        c.end()?;
        return Ok(Line::Commit { xid, at });
    }
    if c.eat("message: transactional: ") {
        let transactional = match c.take_while(|b| b.is_ascii_digit()) {
            "1" => true,
            "0" => false,
            other => return Err(c.error(format!("message flag {other:?} is not 0 or 1"))),
        };
        // The prefix and content are free text; the applier does not use them.
        return Ok(Line::Message { transactional });
    }
    if c.eat("table ") {
        return parse_table_line(&mut c).map(Line::Change);
    }
    Err(c.error(format!(
        "expected BEGIN, COMMIT, table or message, found {:?}",
        snippet(line)
    )))
}

fn parse_xid(c: &mut Cursor) -> Result<u64, DecodeError> {
    if !c.eat(" ") {
        return Err(
            c.error("a transaction id (the slot must be read with include-xids = 1)".to_string())
        );
    }
    let digits = c.take_while(|b| b.is_ascii_digit());
    if digits.is_empty() || digits.len() > 20 {
        return Err(c.error(format!("{:?} is not a transaction id", snippet(digits))));
    }
    digits
        .parse()
        .map_err(|_| c.error(format!("{digits} is not a transaction id")))
}

/// `2026-11-23 10:00:00.123456+00`, `...+05:30`, `...-08`: ISO style, which test_decoding always
/// uses for the commit time, in the decoding session's time zone.
pub fn parse_commit_time(text: &str) -> Result<DateTime<FixedOffset>, String> {
    let (main, offset) = split_offset(text)
        .ok_or_else(|| format!("{text:?} is not a timestamp with a UTC offset"))?;
    let naive = chrono::NaiveDateTime::parse_from_str(main, "%Y-%m-%d %H:%M:%S%.f")
        .map_err(|e| format!("{text:?} is not a timestamp: {e}"))?;
    naive
        .and_local_timezone(offset)
        .single()
        .ok_or_else(|| format!("{text:?} is not a valid local time"))
}

/// Splits `... 10:00:00.1+05:30` into the local part and its offset (`+HH`, `+HH:MM`,
/// `+HH:MM:SS`, as PostgreSQL prints them).
fn split_offset(text: &str) -> Option<(&str, FixedOffset)> {
    let time_start = text.find(' ')? + 1;
    let sign_at = time_start + text[time_start..].rfind(['+', '-'])?;
    let (main, off) = text.split_at(sign_at);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let mut parts = off[1..].split(':');
    let mut seconds = 0i32;
    for (i, scale) in [3600, 60, 1].into_iter().enumerate() {
        match parts.next() {
            Some(p) if p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()) => {
                seconds += p.parse::<i32>().ok()? * scale;
            }
            None if i > 0 => break,
            _ => return None,
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some((main, FixedOffset::east_opt(sign * seconds)?))
}

fn parse_table_line(c: &mut Cursor) -> Result<Change, DecodeError> {
    let mut tables = vec![parse_qualified(c)?];
    while c.eat(", ") {
        if tables.len() >= MAX_TRUNCATE_TABLES {
            return Err(c.error(format!(
                "more than {MAX_TRUNCATE_TABLES} tables on one line"
            )));
        }
        tables.push(parse_qualified(c)?);
    }
    if !c.eat(": ") {
        return Err(c.error("\": \" after the table name".to_string()));
    }
    let action = c.take_while(|b| b.is_ascii_uppercase());
    if !c.eat(":") {
        return Err(c.error(format!("\":\" after the action {action:?}")));
    }
    if action != "TRUNCATE" && tables.len() > 1 {
        return Err(c.error(format!("{action} names {} tables", tables.len())));
    }
    match action {
        "INSERT" => {
            let table = tables.remove(0);
            if c.eat(" (no-tuple-data)") {
                c.end()?;
                return Err(c.error(format!("INSERT into {table} without its row")));
            }
            let new = parse_columns(c, false)?;
            c.end()?;
            Ok(Change::Insert { table, new })
        }
        "UPDATE" => {
            let table = tables.remove(0);
            let old_key = if c.eat(" old-key:") {
                let key = parse_columns(c, true)?;
                if !c.eat(" new-tuple:") {
                    return Err(c.error("\" new-tuple:\" after the old key".to_string()));
                }
                Some(key)
            } else {
                None
            };
            if c.eat(" (no-tuple-data)") {
                c.end()?;
                return Err(c.error(format!("UPDATE of {table} without its new row")));
            }
            let new = parse_columns(c, false)?;
            c.end()?;
            Ok(Change::Update {
                table,
                old_key,
                new,
            })
        }
        "DELETE" => {
            let table = tables.remove(0);
            if c.eat(" (no-tuple-data)") {
                c.end()?;
                return Ok(Change::Delete { table, key: vec![] });
            }
            let key = parse_columns(c, true)?;
            c.end()?;
            Ok(Change::Delete { table, key })
        }
        "TRUNCATE" => {
            let (mut restart_seqs, mut cascade) = (false, false);
            if !c.eat(" (no-flags)") {
                loop {
                    if c.eat(" restart_seqs") {
                        restart_seqs = true;
                    } else if c.eat(" cascade") {
                        cascade = true;
                    } else {
                        break;
                    }
                }
                if !restart_seqs && !cascade {
                    return Err(c.error("TRUNCATE flags".to_string()));
                }
            }
            c.end()?;
            Ok(Change::Truncate {
                tables,
                restart_seqs,
                cascade,
            })
        }
        other => Err(c.error(format!(
            "{other:?} is not INSERT, UPDATE, DELETE or TRUNCATE"
        ))),
    }
}

fn parse_qualified(c: &mut Cursor) -> Result<TableName, DecodeError> {
    let schema = parse_identifier(c)?;
    if !c.eat(".") {
        return Err(c.error("a schema-qualified table name".to_string()));
    }
    let name = parse_identifier(c)?;
    Ok(TableName { schema, name })
}

/// A `quote_identifier` result: bare lowercase/digits/underscore, or double-quoted.
fn parse_identifier(c: &mut Cursor) -> Result<String, DecodeError> {
    let start = c.pos;
    if c.eat("\"") {
        let mut out = String::new();
        loop {
            let rest = c.rest();
            let Some(q) = rest.find('"') else {
                return Err(DecodeError::new(start, "unterminated quoted identifier"));
            };
            out.push_str(&rest[..q]);
            c.pos += q + 1;
            if c.eat("\"") {
                out.push('"');
            } else {
                break;
            }
            if c.pos - start > MAX_IDENTIFIER {
                break;
            }
        }
        if c.pos - start > MAX_IDENTIFIER || out.is_empty() {
            return Err(DecodeError::new(
                start,
                format!("identifier of {} bytes is empty or too long", out.len()),
            ));
        }
        return Ok(out);
    }
    let ident = c.take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ident.is_empty() {
        return Err(DecodeError::new(
            start,
            format!("expected an identifier, found {:?}", snippet(&c.s[start..])),
        ));
    }
    if ident.len() > MAX_IDENTIFIER {
        return Err(DecodeError::new(start, "identifier too long"));
    }
    Ok(ident.to_string())
}

/// ` name[type]:value` repeated, until the end of the line or ` new-tuple:` (after an old key).
fn parse_columns(c: &mut Cursor, is_key: bool) -> Result<Vec<Column>, DecodeError> {
    let mut columns = Vec::new();
    loop {
        if c.at_end() || (is_key && c.rest().starts_with(" new-tuple:")) {
            break;
        }
        if !c.eat(" ") {
            return Err(c.error(format!(
                "a space before the next column, found {:?}",
                snippet(c.rest())
            )));
        }
        if columns.len() >= MAX_COLUMNS {
            return Err(c.error(format!("more than {MAX_COLUMNS} columns")));
        }
        let name = parse_identifier(c)?;
        if !c.eat("[") {
            return Err(c.error(format!("\"[\" and the type after column {name}")));
        }
        let type_name = parse_type(c)?;
        if !c.eat(":") {
            return Err(c.error(format!("\":\" after the type of column {name}")));
        }
        let value = parse_value(c).map_err(|e| DecodeError {
            reason: format!("column {name}: {}", e.reason),
            ..e
        })?;
        columns.push(Column {
            name,
            type_name,
            value,
        });
    }
    if columns.is_empty() {
        return Err(c.error("a row with at least one column".to_string()));
    }
    Ok(columns)
}

/// The type between `[` (eaten) and its matching `]`: nested brackets for arrays
/// (`integer[]`), double quotes for odd type names.
fn parse_type(c: &mut Cursor) -> Result<String, DecodeError> {
    let start = c.pos;
    let bytes = c.s.as_bytes();
    let mut depth = 1usize;
    let mut in_quotes = false;
    let mut i = start;
    while i < bytes.len() {
        if i - start > MAX_TYPE_NAME {
            return Err(DecodeError::new(
                start,
                format!("type name longer than {MAX_TYPE_NAME} bytes"),
            ));
        }
        match bytes[i] {
            b'"' => in_quotes = !in_quotes,
            b'[' if !in_quotes => depth += 1,
            b']' if !in_quotes => {
                depth -= 1;
                if depth == 0 {
                    let name = &c.s[start..i];
                    if name.is_empty() {
                        return Err(DecodeError::new(start, "empty type name"));
                    }
                    c.pos = i + 1;
                    return Ok(name.to_string());
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(DecodeError::new(
        start,
        "type name without its closing \"]\"",
    ))
}

fn parse_value(c: &mut Cursor) -> Result<Value, DecodeError> {
    // Keywords first; they are followed by a space, the end, or nothing else.
    for (word, value) in [
        ("null", Value::Null),
        ("unchanged-toast-datum", Value::UnchangedToast),
    ] {
        if c.rest().starts_with(word) {
            let after = &c.rest()[word.len()..];
            if after.is_empty() || after.starts_with(' ') {
                c.pos += word.len();
                return Ok(value);
            }
        }
    }
    if c.eat("B'") {
        let bits = c.take_while(|b| b == b'0' || b == b'1');
        if !c.eat("'") {
            return Err(c.error("bit string without its closing quote".to_string()));
        }
        return Ok(Value::Text(bits.to_string()));
    }
    if c.rest().starts_with('\'') {
        return parse_quoted(c).map(Value::Text);
    }
    // Bare: integers, floats (including NaN, Infinity, 1e+30), numeric, true/false.
    let start = c.pos;
    let token = c.take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'));
    if token.is_empty() {
        return Err(DecodeError::new(
            start,
            format!("expected a value, found {:?}", snippet(c.rest())),
        ));
    }
    if !(c.at_end() || c.rest().starts_with(' ')) {
        return Err(c.error(format!(
            "unexpected {:?} after the bare value {token:?}",
            snippet(c.rest())
        )));
    }
    Ok(Value::Text(token.to_string()))
}

/// `'...'` with `''` for a quote; everything else (backslashes, newlines) is literal.
fn parse_quoted(c: &mut Cursor) -> Result<String, DecodeError> {
    let start = c.pos;
    c.pos += 1;
    let mut out = String::new();
    loop {
        let rest = c.rest();
        let Some(q) = rest.find('\'') else {
            return Err(DecodeError::new(
                start,
                "quoted value without its closing quote",
            ));
        };
        out.push_str(&rest[..q]);
        c.pos += q + 1;
        if c.rest().starts_with('\'') {
            out.push('\'');
            c.pos += 1;
        } else {
            break;
        }
    }
    if !(c.at_end() || c.rest().starts_with(' ')) {
        return Err(c.error(format!(
            "unexpected {:?} after a quoted value",
            snippet(c.rest())
        )));
    }
    Ok(out)
}

/// A short, char-boundary-safe excerpt for error messages (they are logged, through masking).
fn snippet(text: &str) -> &str {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn eat(&mut self, literal: &str) -> bool {
        if self.rest().starts_with(literal) {
            self.pos += literal.len();
            true
        } else {
            false
        }
    }

    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let rest = self.rest();
        let n = rest.bytes().take_while(|b| keep(*b)).count();
        self.pos += n;
        &rest[..n]
    }

    fn at_end(&self) -> bool {
        self.pos == self.s.len()
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.at_end() {
            Ok(())
        } else {
            Err(self.error(format!(
                "unexpected {:?} at the end of the line",
                snippet(self.rest())
            )))
        }
    }

    fn error(&self, expected: String) -> DecodeError {
        DecodeError::new(self.pos, expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    fn col(name: &str, type_name: &str, value: Value) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            value,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn lsns_parse_print_and_order() {
        assert_eq!(Lsn::parse("0/16D32A0").unwrap(), Lsn(0x16D32A0));
        assert_eq!(Lsn::parse("1/0").unwrap(), Lsn(1 << 32));
        assert_eq!(Lsn(0x1_0000_00FF).to_string(), "1/FF");
        assert!(Lsn::parse("0/16D32A0").unwrap() < Lsn::parse("1/0").unwrap());
        for bad in ["", "0", "/1", "1/", "g/0", "123456789/0", "0/1/2"] {
            assert!(Lsn::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Lsn(10).bytes_after(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_after(Lsn(10)), 0);
    }

    #[test]
    fn begin_and_commit_with_xid_and_time() {
        assert_eq!(parse_line("BEGIN 529").unwrap(), Line::Begin { xid: 529 });
        let Line::Commit { xid, at } =
            parse_line("COMMIT 529 (at 2026-11-23 10:00:00.123456+00)").unwrap()
        else {
            panic!()
        };
        assert_eq!(xid, 529);
        let at = at.unwrap();
        assert_eq!(at.to_rfc3339(), "2026-11-23T10:00:00.123456+00:00");
        // Other session time zones, whole seconds, half-hour and negative offsets.
        let at = |s: &str| match parse_line(s).unwrap() {
            Line::Commit { at, .. } => at.unwrap().to_rfc3339(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            at("COMMIT 1 (at 2026-11-23 18:00:00+08)"),
            "2026-11-23T18:00:00+08:00"
        );
        assert_eq!(
            at("COMMIT 1 (at 2026-11-23 15:30:00.5+05:30)"),
            "2026-11-23T15:30:00.500+05:30"
        );
        assert_eq!(
            at("COMMIT 1 (at 2026-11-23 02:00:00-08)"),
            "2026-11-23T02:00:00-08:00"
        );
        // openGauss's commit sequence number is tolerated.
        assert!(matches!(
            parse_line("COMMIT 7 (at 2026-11-23 10:00:00+00) CSN 2003").unwrap(),
            Line::Commit { xid: 7, .. }
        ));
        assert_eq!(
            parse_line("COMMIT 7").unwrap(),
            Line::Commit { xid: 7, at: None }
        );
    }

    #[test]
    fn begin_and_commit_errors_say_what_is_missing() {
        let e = parse_line("BEGIN").unwrap_err();
        assert!(e.reason.contains("include-xids"), "{e}");
        assert!(parse_line("BEGIN x").is_err());
        assert!(parse_line("BEGIN 5 extra").is_err());
        assert!(parse_line("COMMIT 5 (at 2026-11-23 10:00:00+00").is_err());
        let e = parse_line("COMMIT 5 (at yesterday)").unwrap_err();
        assert!(e.reason.contains("yesterday"), "{e}");
        assert!(parse_line("COMMIT 5 (at 2026-13-23 10:00:00+00)").is_err());
        let e = parse_line("ROLLBACK 5").unwrap_err();
        assert_eq!(e.offset, 0);
        assert!(e.reason.contains("ROLLBACK"), "{e}");
        assert!(parse_line("").is_err());
    }

    #[test]
    fn insert_with_every_kind_of_value() {
        let line = "table public.txn: INSERT: id[bigint]:42 amount_fen[bigint]:-100 \
                    ok[boolean]:true flags[bit]:B'0101' ratio[double precision]:1.5e+30 \
                    n[numeric]:NaN note[character varying]:null \
                    created_at[timestamp with time zone]:'2026-11-23 10:00:00.123456+08' \
                    d[date]:'2026-11-23' ids[integer[]]:'{1,2,3}' u[uuid]:'0190a3e2-7b1c-7c00-8000-000000000001'";
        let Line::Change(Change::Insert { table, new }) = parse_line(line).unwrap() else {
            panic!()
        };
        assert_eq!(table, t("public", "txn"));
        assert_eq!(
            new,
            vec![
                col("id", "bigint", text("42")),
                col("amount_fen", "bigint", text("-100")),
                col("ok", "boolean", text("true")),
                col("flags", "bit", text("0101")),
                col("ratio", "double precision", text("1.5e+30")),
                col("n", "numeric", text("NaN")),
                col("note", "character varying", Value::Null),
                col(
                    "created_at",
                    "timestamp with time zone",
                    text("2026-11-23 10:00:00.123456+08")
                ),
                col("d", "date", text("2026-11-23")),
                col("ids", "integer[]", text("{1,2,3}")),
                col("u", "uuid", text("0190a3e2-7b1c-7c00-8000-000000000001")),
            ]
        );
    }

    #[test]
    fn quoted_values_keep_quotes_spaces_backslashes_newlines_and_unicode() {
        let line = "table public.t: INSERT: a[text]:'it''s' b[text]:'two  spaces ' \
                    c[text]:'' d[text]:'''' e[text]:'back\\slash\nnew line' \
                    f[text]:'支付 ✓ null' g[text]:'null' h[text]:'x y:z[w]' \
                    i[bytea]:'\\x00ff27' j[text]:' leading'";
        let Line::Change(Change::Insert { new, .. }) = parse_line(line).unwrap() else {
            panic!()
        };
        let values: Vec<&Value> = new.iter().map(|c| &c.value).collect();
        assert_eq!(
            values,
            vec![
                &text("it's"),
                &text("two  spaces "),
                &text(""),
                &text("'"),
                &text("back\\slash\nnew line"),
                &text("支付 ✓ null"),
                &text("null"),
                &text("x y:z[w]"),
                &text("\\x00ff27"),
                &text(" leading"),
            ]
        );
    }

    #[test]
    fn quoted_identifiers_for_tables_and_columns() {
        let line = "table \"Odd Schema\".\"t\"\"q\": INSERT: \"Col A\"[text]:'x' \"select\"[integer]:1 \"old-key\"[integer]:2";
        let Line::Change(Change::Insert { table, new }) = parse_line(line).unwrap() else {
            panic!()
        };
        assert_eq!(table, t("Odd Schema", "t\"q"));
        let names: Vec<&str> = new.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["Col A", "select", "old-key"]);
    }

    #[test]
    fn updates_with_and_without_old_key_and_toast() {
        let Line::Change(Change::Update {
            table,
            old_key,
            new,
        }) = parse_line(
            "table public.txn: UPDATE: id[bigint]:1 state[character varying]:'FAILED' big[text]:unchanged-toast-datum",
        )
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(table, t("public", "txn"));
        assert_eq!(old_key, None);
        assert_eq!(new[2].value, Value::UnchangedToast);

        let Line::Change(Change::Update { old_key, new, .. }) = parse_line(
            "table public.t: UPDATE: old-key: id[integer]:1 new-tuple: id[integer]:2 v[text]:'a b'",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(old_key, Some(vec![col("id", "integer", text("1"))]));
        assert_eq!(
            new,
            vec![
                col("id", "integer", text("2")),
                col("v", "text", text("a b"))
            ]
        );

        // REPLICA IDENTITY FULL: the whole old row (nulls are left out of a key by the plugin).
        let Line::Change(Change::Update { old_key, .. }) = parse_line(
            "table public.t: UPDATE: old-key: id[integer]:1 v[text]:'old' new-tuple: id[integer]:1 v[text]:'new'",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(old_key.unwrap().len(), 2);

        assert!(
            parse_line("table public.t: UPDATE: old-key: id[integer]:1 id[integer]:2").is_err()
        );
        assert!(parse_line("table public.t: UPDATE: (no-tuple-data)").is_err());
    }

    #[test]
    fn deletes_by_key_and_without_identity() {
        assert_eq!(
            parse_line("table public.seen_message: DELETE: inst_id[character varying]:'T' msg_id[character varying]:'m 1'").unwrap(),
            Line::Change(Change::Delete {
                table: t("public", "seen_message"),
                key: vec![
                    col("inst_id", "character varying", text("T")),
                    col("msg_id", "character varying", text("m 1")),
                ]
            })
        );
        assert_eq!(
            parse_line("table public.t: DELETE: (no-tuple-data)").unwrap(),
            Line::Change(Change::Delete {
                table: t("public", "t"),
                key: vec![]
            })
        );
    }

    #[test]
    fn truncate_of_several_tables_with_flags() {
        assert_eq!(
            parse_line("table public.a, public.b: TRUNCATE: restart_seqs cascade").unwrap(),
            Line::Change(Change::Truncate {
                tables: vec![t("public", "a"), t("public", "b")],
                restart_seqs: true,
                cascade: true
            })
        );
        assert_eq!(
            parse_line("table public.a: TRUNCATE: (no-flags)").unwrap(),
            Line::Change(Change::Truncate {
                tables: vec![t("public", "a")],
                restart_seqs: false,
                cascade: false
            })
        );
        assert!(parse_line("table public.a: TRUNCATE: bogus").is_err());
        assert!(parse_line("table public.a, public.b: INSERT: id[integer]:1").is_err());
    }

    #[test]
    fn messages_are_recognised() {
        assert_eq!(
            parse_line("message: transactional: 1 prefix: p, sz: 3 content:abc").unwrap(),
            Line::Message {
                transactional: true
            }
        );
    }

    #[test]
    fn malformed_rows_are_refused_with_the_place() {
        let cases = [
            (
                "table public.t: INSERT: a[text]:'unterminated",
                "closing quote",
            ),
            (
                "table public.t: INSERT: a[text]:'x'y",
                "after a quoted value",
            ),
            ("table public.t: INSERT: a[text:'x'", "closing \"]\""),
            ("table public.t: INSERT: a[text]'x'", "\":\" after the type"),
            ("table public.t: INSERT:", "at least one column"),
            (
                "table public.t: INSERT: a[integer]:12;DROP",
                "after the bare value",
            ),
            (
                "table public.t: INSERT: A[integer]:1",
                "expected an identifier",
            ),
            ("table public.t: INSERT: a[integer]:", "expected a value"),
            ("table t: INSERT: a[integer]:1", "schema-qualified"),
            ("table public.t: UPSERT: a[integer]:1", "not INSERT"),
            (
                "table public.t: INSERT:  a[integer]:1",
                "expected an identifier",
            ),
            ("table public.t: INSERT: a[bit]:B'012'", "closing quote"),
            (
                "table \"public.t: INSERT: a[integer]:1",
                "unterminated quoted identifier",
            ),
            ("table public.t: INSERT: (no-tuple-data)", "without its row"),
        ];
        for (line, expected) in cases {
            let e = parse_line(line).unwrap_err();
            assert!(
                e.reason.contains(expected),
                "{line:?}: {e} (wanted {expected:?})"
            );
            assert!(e.offset <= line.len());
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let long_type = format!("table public.t: INSERT: a[{}]:1", "x".repeat(300));
        assert!(
            parse_line(&long_type)
                .unwrap_err()
                .reason
                .contains("longer than")
        );
        let long_ident = format!("table public.t: INSERT: \"{}\"[integer]:1", "x".repeat(200));
        assert!(parse_line(&long_ident).is_err());
        let mut many = String::from("table public.t: INSERT:");
        for i in 0..=MAX_COLUMNS {
            many.push_str(&format!(" c{i}[integer]:1"));
        }
        assert!(
            parse_line(&many)
                .unwrap_err()
                .reason
                .contains("more than 1600 columns")
        );
    }

    #[test]
    fn values_that_look_like_keywords_are_only_keywords_when_bare() {
        let Line::Change(Change::Insert { new, .. }) = parse_line(
            "table public.t: INSERT: a[text]:null b[text]:'unchanged-toast-datum' c[integer]:nullx",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(new[0].value, Value::Null);
        assert_eq!(new[1].value, text("unchanged-toast-datum"));
        // Never produced by the plugin; a bare token is handed to the type's input function,
        // which judges it on the target.
        assert_eq!(new[2].value, text("nullx"));
    }
}
