//! The black and white lists operators keep in the database (`kunpayctl risk list`), beside
//! the analysts' list files: every change recorded with who, when and why; the daemon polls
//! the change log and swaps in the whole set when it moves.
//!
//! Owns: the SQL on `risk_list_entry` and `risk_list_change`, and turning a value into what is
//! stored (card, id and phone numbers become subject keys, shown masked).
//! Must never: store a card, id or phone number in plaintext, or change an entry without its
//! change record (both in one database transaction).

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;

use super::features::Dimension;
use super::lists::{Colour, LISTED, Lists};
use super::subject_key;
use crate::db::schema::{risk_list_change, risk_list_entry};
use crate::logging::mask;

/// Entries loaded at most; past it loading fails loudly rather than truncating a list.
pub const MAX_ENTRIES: i64 = 1_000_000;

pub fn colour_name(colour: Colour) -> &'static str {
    match colour {
        Colour::Black => "BLACK",
        Colour::White => "WHITE",
    }
}

pub fn parse_colour(name: &str) -> Option<Colour> {
    match name.to_ascii_uppercase().as_str() {
        "BLACK" => Some(Colour::Black),
        "WHITE" => Some(Colour::White),
        _ => None,
    }
}

/// What is stored for `value`: its key and how it is shown. Err says what is wrong with it.
pub fn stored_form(dimension: Dimension, value: &str) -> Result<(String, String), String> {
    let value = value.trim();
    if !LISTED.contains(&dimension) {
        return Err(format!(
            "\"{}\" is not a list kind; use card, id, phone, device, ip or merchant",
            dimension.name()
        ));
    }
    // The same checks a list file's entry gets.
    let mut probe = Lists::default();
    probe.add(Colour::Black, dimension, value)?;
    Ok(match dimension {
        Dimension::Ip => {
            let network = value
                .parse::<ipnet::IpNet>()
                .unwrap_or_else(|_| {
                    ipnet::IpNet::from(value.parse::<std::net::IpAddr>().expect("checked"))
                })
                .trunc()
                .to_string();
            (network.clone(), network)
        }
        Dimension::Card => (key_hex(dimension, value), mask::card_number(value)),
        Dimension::IdNo => (key_hex(dimension, value), mask::id_number(value)),
        Dimension::Phone => (key_hex(dimension, value), mask::phone_number(value)),
        _ => (key_hex(dimension, value), value.chars().take(64).collect()),
    })
}

fn key_hex(dimension: Dimension, value: &str) -> String {
    format!("{:016x}", subject_key(dimension, value))
}

#[derive(Debug, Clone, Queryable)]
pub struct Entry {
    pub colour: String,
    pub dimension: String,
    pub entry_key: String,
    pub shown: String,
    pub reason: String,
    pub added_by: String,
    pub added_at: DateTime<Utc>,
}

/// Who changes a list and why.
pub struct Change<'a> {
    pub by: &'a str,
    pub reason: &'a str,
    pub at: DateTime<Utc>,
}

fn record_change(
    conn: &mut PgConnection,
    action: &str,
    entry: &Entry,
    change: &Change<'_>,
) -> Result<(), DieselError> {
    diesel::insert_into(risk_list_change::table)
        .values((
            risk_list_change::action.eq(action),
            risk_list_change::colour.eq(&entry.colour),
            risk_list_change::dimension.eq(&entry.dimension),
            risk_list_change::entry_key.eq(&entry.entry_key),
            risk_list_change::shown.eq(&entry.shown),
            risk_list_change::reason.eq(truncate(change.reason, 400)),
            risk_list_change::changed_by.eq(truncate(change.by, 64)),
            risk_list_change::changed_at.eq(change.at),
        ))
        .execute(conn)?;
    Ok(())
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Adds an entry; false (nothing changed) when it is on that list already.
pub fn add(
    conn: &mut PgConnection,
    colour: Colour,
    dimension: Dimension,
    key: &str,
    shown: &str,
    change: &Change<'_>,
) -> Result<bool, DieselError> {
    let entry = Entry {
        colour: colour_name(colour).into(),
        dimension: dimension.name().into(),
        entry_key: key.into(),
        shown: shown.into(),
        reason: truncate(change.reason, 400),
        added_by: truncate(change.by, 64),
        added_at: change.at,
    };
    // No ON CONFLICT (openGauss lacks it): look first, and let the primary key settle a race.
    let added = conn.transaction(|conn| {
        let exists = risk_list_entry::table
            .find((&entry.colour, &entry.dimension, &entry.entry_key))
            .count()
            .get_result::<i64>(conn)?
            > 0;
        if exists {
            return Ok(false);
        }
        diesel::insert_into(risk_list_entry::table)
            .values((
                risk_list_entry::colour.eq(&entry.colour),
                risk_list_entry::dimension.eq(&entry.dimension),
                risk_list_entry::entry_key.eq(&entry.entry_key),
                risk_list_entry::shown.eq(&entry.shown),
                risk_list_entry::reason.eq(&entry.reason),
                risk_list_entry::added_by.eq(&entry.added_by),
                risk_list_entry::added_at.eq(entry.added_at),
            ))
            .execute(conn)?;
        record_change(conn, "ADD", &entry, change)?;
        Ok(true)
    });
    match added {
        Err(DieselError::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)) => {
            Ok(false)
        }
        other => other,
    }
}

/// Removes an entry; false when it was not on that list.
pub fn remove(
    conn: &mut PgConnection,
    colour: Colour,
    dimension: Dimension,
    key: &str,
    change: &Change<'_>,
) -> Result<bool, DieselError> {
    conn.transaction(|conn| {
        let removed: Option<Entry> = diesel::delete(risk_list_entry::table.find((
            colour_name(colour),
            dimension.name(),
            key,
        )))
        .returning(risk_list_entry::all_columns)
        .get_result(conn)
        .optional()?;
        match removed {
            Some(entry) => {
                record_change(conn, "REMOVE", &entry, change)?;
                Ok(true)
            }
            None => Ok(false),
        }
    })
}

pub fn entries(conn: &mut PgConnection) -> Result<Vec<Entry>, DieselError> {
    risk_list_entry::table
        .order((
            risk_list_entry::colour,
            risk_list_entry::dimension,
            risk_list_entry::added_at,
        ))
        .limit(MAX_ENTRIES + 1)
        .load(conn)
}

#[derive(Debug, Clone, Queryable)]
pub struct ChangeRow {
    pub change_id: i64,
    pub action: String,
    pub colour: String,
    pub dimension: String,
    pub entry_key: String,
    pub shown: String,
    pub reason: String,
    pub changed_by: String,
    pub changed_at: DateTime<Utc>,
}

/// The change log, newest first.
pub fn changes(conn: &mut PgConnection, limit: i64) -> Result<Vec<ChangeRow>, DieselError> {
    risk_list_change::table
        .order(risk_list_change::change_id.desc())
        .limit(limit)
        .load(conn)
}

/// The change log's position: it moves with every change.
pub fn generation(conn: &mut PgConnection) -> Result<i64, DieselError> {
    risk_list_change::table
        .select(diesel::dsl::max(risk_list_change::change_id))
        .first::<Option<i64>>(conn)
        .map(|max| max.unwrap_or(0))
}

/// The lists as a decision consults them, and the generation they are from.
pub fn load(conn: &mut PgConnection) -> Result<(Lists, i64), String> {
    conn.transaction(|conn| -> Result<(Lists, i64), DieselError> {
        let generation = generation(conn)?;
        let rows = entries(conn)?;
        let mut lists = Lists::default();
        if rows.len() as i64 > MAX_ENTRIES {
            return Err(DieselError::QueryBuilderError(
                format!("more than {MAX_ENTRIES} list entries in risk_list_entry").into(),
            ));
        }
        for row in rows {
            let (Some(colour), Some(dimension)) =
                (parse_colour(&row.colour), Dimension::parse(&row.dimension))
            else {
                continue;
            };
            if dimension == Dimension::Ip {
                if let Err(e) = lists.add(colour, dimension, &row.entry_key) {
                    tracing::error!(entry = %row.entry_key, error = %e, "an ip list entry in the database does not parse; ignored");
                }
            } else if let Ok(key) = u64::from_str_radix(&row.entry_key, 16) {
                lists.add_key(colour, dimension, key);
            }
        }
        Ok((lists, generation))
    })
    .map_err(|e| format!("loading the lists from risk_list_entry: {e}"))
}
