//! The CDC applier: copies every committed change to kunpay's tables from the source (active)
//! database into the target (standby) database, in commit order, exactly once.
//!
//! How (docs/ARCHITECTURE.md, "High availability"): the source has a logical replication slot
//! with the `test_decoding` plugin, read through SQL functions (PostgreSQL and openGauss both
//! have them; no replication-protocol client is needed). One batch:
//!
//! 1. read the applied position from the target (`ha_cdc_position`); if the slot is behind it
//!    (a crash between the target's commit and the slot's advance, or a source crash that lost
//!    an advance), advance the slot to it first: those transactions are already applied;
//! 2. note the source's flushed WAL position and clock (for lag);
//! 3. in one target transaction (`SET LOCAL kunpay.cdc_apply = 'on'` lets it past the write
//!    guard; the role row is share-locked, so a promotion waits for the batch), stream
//!    `pg_logical_slot_peek_changes(slot, NULL, batch)` row by row and apply each change as a
//!    parameterised statement keyed by primary key, a source transaction's changes sent
//!    together as one statement where their order cannot matter ([`PendingStatement`]); every
//!    COMMIT must come after the stored position; then update the position row and commit;
//! 4. advance the slot to the last applied commit (`pg_replication_slot_advance`).
//!
//! A crash before step 3's commit leaves the target without the batch and the slot where it
//! was (no gap); a crash between 3 and 4 leaves the slot behind the stored position, and step 1
//! of the next batch skips what was applied (no duplicate). Memory is bounded by one change:
//! rows are streamed; a batch holds at most `batch` rows plus the rest of the transaction that
//! reaches the bound (PostgreSQL never splits a transaction).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection as _;
use diesel::pg::{Pg, PgConnection, PgRowByRowLoadingMode};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, SmallInt, Text, Timestamptz};

use super::decode::{self, Change, Column, DecodeError, Line, Lsn, TableName, Value};
use super::{NODE_LOCAL_TABLES, quote_ident};

/// Slot names PostgreSQL accepts: lowercase letters, digits, underscore; at most 63.
pub fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[derive(Debug, Clone)]
pub struct CdcSettings {
    /// The logical slot on the source (created with test_decoding when missing).
    pub slot: String,
    /// Rows one peek returns at most (BEGIN and COMMIT count; a transaction is never split).
    /// Every batch costs a fixed amount besides its rows (a peek that decodes the source's WAL
    /// from the slot's restart point, the slot's advance, the target transaction with its
    /// position row), so small batches cap the apply rate: at full debit load on the 2-core
    /// machine, 1,000 applied 1.03x the write rate and 10,000 applied 1.25x (2026-11-24).
    pub batch: u32,
    /// Bound on each statement on either side.
    pub statement_timeout: Duration,
}

impl Default for CdcSettings {
    fn default() -> Self {
        CdcSettings {
            slot: "kunpay_cdc".into(),
            batch: 10_000,
            statement_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// A condition a person must resolve (wrong role, divergent copy, schema drift, slot lost);
    /// retrying alone will not fix it, so the applier reports it and waits.
    #[error("CDC refused: {0}")]
    Refused(String),
    #[error("CDC database error: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("CDC cannot connect: {0}")]
    Connect(String),
    #[error("CDC cannot decode the source's change stream: {0}")]
    Decode(#[from] DecodeError),
    /// Starting a copy needs a quiet moment on the source (no business write while it is
    /// proved; under a cutover's fence also no transaction while its slot is created), which
    /// did not come this time; trying again soon succeeds.
    #[error("CDC start not possible yet: {0}")]
    NotQuiet(String),
    /// A test's fault hook fired (the applier stops as if the process died there).
    #[error("fault injected: {0}")]
    Fault(&'static str),
}

impl From<anyhow::Error> for CdcError {
    fn from(e: anyhow::Error) -> Self {
        CdcError::Refused(format!("{e:#}"))
    }
}

/// Where a test makes the applier stop as if it crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After the target committed a batch and its position, before the slot is advanced.
    AfterTargetCommit,
}

/// PostgreSQL and openGauss name a few functions differently (openGauss keeps 9.2's `xlog`).
/// The openGauss forms follow its documentation; only PostgreSQL is exercised by the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    OpenGauss,
}

impl Dialect {
    pub fn detect(conn: &mut PgConnection) -> QueryResult<Dialect> {
        let v: OneText = diesel::sql_query("SELECT version() AS v").get_result(conn)?;
        Ok(if v.v.contains("openGauss") {
            Dialect::OpenGauss
        } else {
            Dialect::Postgres
        })
    }

    /// The WAL position flushed to disk: logical decoding reads no further, so nothing
    /// committed before it can be missing from a peek.
    fn flush_lsn(self) -> &'static str {
        match self {
            Dialect::Postgres => "CAST(pg_current_wal_flush_lsn() AS TEXT)",
            Dialect::OpenGauss => "CAST(pg_current_xlog_location() AS TEXT)",
        }
    }

    /// The WAL insert position (a commit visible to a snapshot was inserted before it).
    fn insert_lsn(self) -> &'static str {
        match self {
            Dialect::Postgres => "CAST(pg_current_wal_insert_lsn() AS TEXT)",
            Dialect::OpenGauss => "CAST(pg_current_xlog_insert_location() AS TEXT)",
        }
    }

    /// The changes in a slot up to an LSN, without consuming them.
    fn peek_up_to_lsn(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "SELECT CAST(lsn AS TEXT) AS lsn, CAST(xid AS TEXT) AS xid, data \
                 FROM pg_logical_slot_peek_changes($1, CAST($2 AS pg_lsn), NULL, 'skip-empty-xacts', '1')"
            }
            Dialect::OpenGauss => {
                "SELECT CAST(location AS TEXT) AS lsn, CAST(xid AS TEXT) AS xid, data \
                 FROM pg_logical_slot_peek_changes($1, $2, NULL, 'skip-empty-xacts', '1')"
            }
        }
    }

    fn peek(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "SELECT CAST(lsn AS TEXT) AS lsn, CAST(xid AS TEXT) AS xid, data \
                 FROM pg_logical_slot_peek_changes($1, NULL, $2, 'include-xids', '1', \
                 'include-timestamp', '1', 'skip-empty-xacts', '1')"
            }
            Dialect::OpenGauss => {
                "SELECT CAST(location AS TEXT) AS lsn, CAST(xid AS TEXT) AS xid, data \
                 FROM pg_logical_slot_peek_changes($1, NULL, $2, 'include-xids', '1', \
                 'include-timestamp', '1', 'skip-empty-xacts', '1')"
            }
        }
    }

    fn advance(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "SELECT CAST(end_lsn AS TEXT) AS v FROM pg_replication_slot_advance($1, CAST($2 AS pg_lsn))"
            }
            Dialect::OpenGauss => "SELECT CAST(pg_replication_slot_advance($1, $2) AS TEXT) AS v",
        }
    }

    fn slot_position(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "SELECT plugin AS name, CAST(confirmed_flush_lsn AS TEXT) AS lsn, \
                 CAST(restart_lsn AS TEXT) AS restart, \
                 CAST(database AS TEXT) AS db FROM pg_replication_slots WHERE slot_name = $1"
            }
            Dialect::OpenGauss => {
                "SELECT plugin AS name, CAST(confirmed_flush AS TEXT) AS lsn, \
                 CAST(restart_lsn AS TEXT) AS restart, \
                 CAST(database AS TEXT) AS db FROM pg_replication_slots WHERE slot_name = $1"
            }
        }
    }
}

#[derive(QueryableByName)]
struct OneText {
    #[diesel(sql_type = Text)]
    v: String,
}

#[derive(QueryableByName)]
struct SlotRow {
    #[diesel(sql_type = Nullable<Text>)]
    name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    lsn: Option<String>,
    /// Where decoding restarts: the slot keeps the source's WAL from here on.
    #[diesel(sql_type = Nullable<Text>)]
    restart: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    db: Option<String>,
}

#[derive(QueryableByName)]
struct PeekRow {
    #[diesel(sql_type = Text)]
    lsn: String,
    #[diesel(sql_type = Text)]
    xid: String,
    #[diesel(sql_type = Text)]
    data: String,
}

#[derive(QueryableByName)]
struct WalNow {
    #[diesel(sql_type = Text)]
    lsn: String,
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

/// The same text forms on both sides, whatever the servers' defaults: values cross as text.
const SESSION_SETUP: &str = "SET TIME ZONE 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'; SET extra_float_digits = 3";

fn setup_session(conn: &mut PgConnection, statement_timeout: Duration) -> QueryResult<()> {
    conn.batch_execute(SESSION_SETUP)?;
    // Integers only reach the string.
    conn.batch_execute(&format!(
        "SET statement_timeout = {}",
        statement_timeout.as_millis()
    ))
}

/// A replicated table as the target knows it.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    /// name -> (type as test_decoding prints it, the type for a cast: "pg_catalog"."int4").
    columns: HashMap<String, (String, String)>,
    key: Vec<String>,
    /// A unique index besides the primary key (the applier's statements order changes to such
    /// a table).
    other_unique: bool,
}

/// The target's replicated tables, read from its catalog: identifiers that reach SQL come from
/// here, never from the change stream. The cutover's verify reads each database's own.
#[derive(Debug, Clone)]
pub(crate) struct Catalog {
    schema: String,
    tables: HashMap<String, TableInfo>,
}

#[derive(QueryableByName)]
struct CatalogColumn {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = SmallInt)]
    attnum: i16,
    #[diesel(sql_type = Text)]
    base_type: String,
    #[diesel(sql_type = Text)]
    type_schema: String,
    #[diesel(sql_type = Text)]
    type_name: String,
}

#[derive(QueryableByName)]
struct NameOnly {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct CatalogKey {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    key: String,
}

impl TableInfo {
    /// The primary-key columns in key order, each with the type to cast its text to.
    pub(crate) fn key_casts(&self) -> Vec<(&str, &str)> {
        self.key
            .iter()
            .map(|k| (k.as_str(), self.columns[k].1.as_str()))
            .collect()
    }
}

impl Catalog {
    pub(crate) fn load(conn: &mut PgConnection) -> Result<Catalog, CdcError> {
        let schema: OneText = diesel::sql_query("SELECT current_schema() AS v").get_result(conn)?;
        let columns: Vec<CatalogColumn> = diesel::sql_query(
            "SELECT c.relname AS table_name, a.attname AS column_name, a.attnum, \
             format_type(a.atttypid, NULL) AS base_type, tn.nspname AS type_schema, \
             t.typname AS type_name \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY c.relname, a.attnum",
        )
        .load(conn)?;
        let keys: Vec<CatalogKey> = diesel::sql_query(
            "SELECT c.relname AS table_name, CAST(i.indkey AS TEXT) AS key \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND i.indisprimary",
        )
        .load(conn)?;
        let other_unique: Vec<NameOnly> = diesel::sql_query(
            "SELECT DISTINCT c.relname AS name \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND i.indisunique AND NOT i.indisprimary",
        )
        .load(conn)?;
        let mut tables: HashMap<String, TableInfo> = HashMap::new();
        let mut attnames: HashMap<(String, i16), String> = HashMap::new();
        for c in columns {
            if NODE_LOCAL_TABLES.contains(&c.table_name.as_str()) {
                continue;
            }
            attnames.insert((c.table_name.clone(), c.attnum), c.column_name.clone());
            // Qualified typname: no SQL-standard length defaults (`bit` alone means bit(1),
            // `character` char(1)), so a cast never truncates; the column's own type modifier
            // then checks the value on assignment.
            let cast = format!(
                "{}.{}",
                quote_ident(&c.type_schema),
                quote_ident(&c.type_name)
            );
            tables
                .entry(c.table_name)
                .or_insert_with(|| TableInfo {
                    columns: HashMap::new(),
                    key: Vec::new(),
                    other_unique: false,
                })
                .columns
                .insert(c.column_name, (c.base_type, cast));
        }
        for k in keys {
            let Some(table) = tables.get_mut(&k.table_name) else {
                continue;
            };
            for attnum in k.key.split_whitespace() {
                let attnum: i16 = attnum.parse().map_err(|_| {
                    CdcError::Refused(format!(
                        "unexpected primary key {:?} of {}",
                        k.key, k.table_name
                    ))
                })?;
                let name = attnames
                    .get(&(k.table_name.clone(), attnum))
                    .cloned()
                    .ok_or_else(|| {
                        CdcError::Refused(format!(
                            "primary key of {} names column {attnum}, which the catalog lacks",
                            k.table_name
                        ))
                    })?;
                table.key.push(name);
            }
        }
        for unique in other_unique {
            if let Some(table) = tables.get_mut(&unique.name) {
                table.other_unique = true;
            }
        }
        for (name, table) in &tables {
            if table.key.is_empty() {
                return Err(CdcError::Refused(format!(
                    "table {name} on the target has no primary key: CDC applies updates and deletes by primary key"
                )));
            }
        }
        Ok(Catalog {
            schema: schema.v,
            tables,
        })
    }

    /// Every replicated table by name.
    pub(crate) fn tables(&self) -> impl Iterator<Item = (&str, &TableInfo)> {
        self.tables.iter().map(|(name, t)| (name.as_str(), t))
    }

    /// `Ok(None)`: a table CDC leaves alone (node-local, or outside kunpay's schema).
    pub(crate) fn table(&self, name: &TableName) -> Result<Option<&TableInfo>, CdcError> {
        if name.schema != self.schema || NODE_LOCAL_TABLES.contains(&name.name.as_str()) {
            return Ok(None);
        }
        match self.tables.get(&name.name) {
            Some(t) => Ok(Some(t)),
            None => Err(CdcError::Refused(format!(
                "the source changed table {name}, which the target does not have: \
                 migrate the standby (`kunpayctl db migrate`) so both have the same schema"
            ))),
        }
    }
}

fn column_cast<'a>(
    table: &'a TableInfo,
    table_name: &TableName,
    column: &Column,
) -> Result<&'a str, CdcError> {
    let (base, cast) = table.columns.get(&column.name).ok_or_else(|| {
        CdcError::Refused(format!(
            "the source has column {table_name}.{} which the target lacks: migrate the standby",
            column.name
        ))
    })?;
    if *base != column.type_name {
        return Err(CdcError::Refused(format!(
            "column {table_name}.{} is {} on the source but {base} on the target: migrate the standby",
            column.name, column.type_name
        )));
    }
    Ok(cast)
}

fn value_of(column: &Column) -> Option<&str> {
    match &column.value {
        Value::Text(text) => Some(text),
        Value::Null | Value::UnchangedToast => None,
    }
}

/// Where a bound parameter goes in an applier statement: NUL, which no identifier or type name
/// from the catalog can contain.
pub(crate) const PARAM: &str = "\0";

/// An applier statement: SQL built from the target's catalog with [`PARAM`] for each value,
/// and the values (text, or NULL). Unlike `sql_query` it lets diesel keep the statement
/// prepared per connection (the cache key is the SQL text): the same (table, operation,
/// columns) is parsed and planned once, not per row.
pub(crate) struct Statement<'a> {
    sql: String,
    binds: Vec<Option<&'a str>>,
    /// Whether diesel keeps it prepared (see [`PREPARED_SHAPES`]).
    kept: bool,
}

impl<'a> Statement<'a> {
    pub(crate) fn new(sql: String, binds: Vec<Option<&'a str>>) -> Self {
        debug_assert_eq!(sql.matches(PARAM).count(), binds.len());
        Statement {
            sql,
            binds,
            kept: true,
        }
    }

    fn kept(mut self, kept: bool) -> Self {
        self.kept = kept;
        self
    }
}

impl diesel::query_builder::QueryId for Statement<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::QueryFragment<Pg> for Statement<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> QueryResult<()> {
        if !self.kept {
            out.unsafe_to_cache_prepared();
        }
        let mut binds = self.binds.iter();
        for (index, part) in self.sql.split(PARAM).enumerate() {
            if index > 0 {
                let value = binds.next().ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError("fewer values than parameters".into())
                })?;
                out.push_bind_param::<Nullable<Text>, _>(value)?;
            }
            out.push_sql(part);
        }
        if binds.next().is_some() {
            return Err(diesel::result::Error::QueryBuilderError(
                "more values than parameters".into(),
            ));
        }
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for Statement<'_> {}

/// Rows read by name, as `sql_query` reads them (the verify's lookups).
impl diesel::query_builder::Query for Statement<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

/// One change as a part of the statement that carries its source transaction to the target
/// (see [`PendingStatement`]). Returns whether the change is for this target.
fn apply_change(
    conn: &mut PgConnection,
    catalog: &Catalog,
    change: &Change,
    pending: &mut PendingStatement,
    shapes: &mut PreparedShapes,
) -> Result<bool, CdcError> {
    match change {
        Change::Insert { table: name, new } => {
            let Some(table) = catalog.table(name)? else {
                return Ok(false);
            };
            let mut columns = Vec::with_capacity(new.len());
            let mut values = Vec::with_capacity(new.len());
            for c in new {
                if c.value == Value::UnchangedToast {
                    return Err(CdcError::Refused(format!(
                        "INSERT into {name} carries an unchanged-toast marker for {}",
                        c.name
                    )));
                }
                let cast = column_cast(table, name, c)?;
                columns.push(quote_ident(&c.name));
                values.push(format!("CAST({PARAM} AS {cast})"));
            }
            let part = Part {
                rows: vec![format!("({})", values.join(", "))],
                ..Part::new(
                    PartKind::Insert,
                    table,
                    name,
                    format!(
                        "INSERT INTO {} ({}) VALUES ",
                        qualified(name),
                        columns.join(", ")
                    ),
                    new.iter()
                        .map(|c| value_of(c).map(str::to_string))
                        .collect(),
                )
            };
            let keys = row_key(table, name, new).into_iter().collect();
            pending.add(conn, shapes, part, keys)?;
            Ok(true)
        }
        Change::Update {
            table: name,
            old_key,
            new,
        } => {
            let Some(table) = catalog.table(name)? else {
                return Ok(false);
            };
            let key_source = old_key.as_ref().unwrap_or(new);
            let mut sets = Vec::new();
            let mut binds: Vec<Option<String>> = Vec::new();
            for c in new {
                if c.value == Value::UnchangedToast {
                    // Not in the WAL because it did not change: keep the target's copy.
                    continue;
                }
                let cast = column_cast(table, name, c)?;
                binds.push(value_of(c).map(str::to_string));
                sets.push(format!(
                    "{} = CAST({PARAM} AS {cast})",
                    quote_ident(&c.name)
                ));
            }
            let wheres = key_conditions(table, name, key_source, &mut binds)?;
            if sets.is_empty() {
                return Ok(true);
            }
            // The row before and, when the key changed, after: both are this change's.
            let keys = [row_key(table, name, key_source), row_key(table, name, new)]
                .into_iter()
                .flatten()
                .collect();
            let part = Part::new(
                PartKind::Update,
                table,
                name,
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    qualified(name),
                    sets.join(", "),
                    wheres.join(" AND ")
                ),
                binds,
            );
            pending.add(conn, shapes, part, keys)?;
            Ok(true)
        }
        Change::Delete { table: name, key } => {
            let Some(table) = catalog.table(name)? else {
                return Ok(false);
            };
            if key.is_empty() {
                return Err(CdcError::Refused(format!(
                    "DELETE on {name} came without its key (the source table has REPLICA IDENTITY NOTHING): \
                     give it a primary key and the default replica identity"
                )));
            }
            let mut binds = Vec::new();
            let wheres = key_conditions(table, name, key, &mut binds)?;
            let part = Part::new(
                PartKind::Delete,
                table,
                name,
                format!(
                    "DELETE FROM {} WHERE {}",
                    qualified(name),
                    wheres.join(" AND ")
                ),
                binds,
            );
            let keys = row_key(table, name, key).into_iter().collect();
            pending.add(conn, shapes, part, keys)?;
            Ok(true)
        }
        Change::Truncate {
            tables,
            restart_seqs,
            cascade,
        } => {
            let mut names = Vec::new();
            for name in tables {
                if catalog.table(name)?.is_some() {
                    names.push(qualified(name));
                }
            }
            if names.is_empty() {
                return Ok(false);
            }
            // Everything before it first; nothing after it joins what came before.
            pending.flush(conn, shapes)?;
            let sql = format!(
                "TRUNCATE TABLE {}{}{}",
                names.join(", "),
                if *restart_seqs {
                    " RESTART IDENTITY"
                } else {
                    ""
                },
                if *cascade { " CASCADE" } else { "" }
            );
            conn.batch_execute(&sql)?;
            Ok(true)
        }
    }
}

/// `"schema"."table"`.
fn qualified(name: &TableName) -> String {
    format!("{}.{}", quote_ident(&name.schema), quote_ident(&name.name))
}

/// `"k" = CAST($n AS type)` for each primary-key column, from the old key (or the new row).
fn key_conditions(
    table: &TableInfo,
    name: &TableName,
    key_source: &[Column],
    binds: &mut Vec<Option<String>>,
) -> Result<Vec<String>, CdcError> {
    let mut wheres = Vec::with_capacity(table.key.len());
    for key_column in &table.key {
        let c = key_source
            .iter()
            .find(|c| &c.name == key_column)
            .ok_or_else(|| {
                CdcError::Refused(format!(
                    "a change to {name} lacks primary-key column {key_column}: the source's replica \
                     identity must cover the target's primary key (the default, a primary key, does)"
                ))
            })?;
        let Some(value) = value_of(c) else {
            return Err(CdcError::Refused(format!(
                "a change to {name} has no value for primary-key column {key_column}"
            )));
        };
        let cast = column_cast(table, name, c)?;
        binds.push(Some(value.to_string()));
        wheres.push(format!(
            "{} = CAST({PARAM} AS {cast})",
            quote_ident(key_column)
        ));
    }
    Ok(wheres)
}

/// The row a change touches, as (table, primary-key values): `None` when `columns` lack a key
/// value (the change then goes to the target in a statement of its own).
fn row_key(table: &TableInfo, name: &TableName, columns: &[Column]) -> Option<RowKey> {
    let mut values = Vec::with_capacity(table.key.len());
    for key_column in &table.key {
        values.push(value_of(columns.iter().find(|c| &c.name == key_column)?)?.to_string());
    }
    Some((name.name.clone(), values))
}

type RowKey = (String, Vec<String>);

/// Rows an applier INSERT carries at most: consecutive inserts into one table with the same
/// columns go to the target as one multi-row INSERT (the target sees the same rows in the same
/// order). Bounded so the prepared-statement cache holds few shapes.
const INSERT_ROWS_PER_STATEMENT: usize = 32;
/// Parts (one data-modifying CTE each) one statement carries at most: a debit's opening has
/// five, its outcome four; a bigger source transaction goes in several statements.
const PARTS_PER_STATEMENT: usize = 16;
/// Bound values one statement carries at most (the protocol allows 65,535).
const BINDS_PER_STATEMENT: usize = 4_096;
/// Distinct shapes of combined statements kept prepared on the target connection. diesel's
/// cache of prepared statements has no eviction, and combined shapes are combinations of
/// single changes: a source with unusual transactions could otherwise grow it without end.
/// Shapes beyond the bound are planned on every use; a single change's statement is always
/// kept (its shapes are bounded by the schema).
const PREPARED_SHAPES: usize = 256;

/// Which combined statements the target connection keeps prepared (see [`PREPARED_SHAPES`]).
#[derive(Default)]
pub(crate) struct PreparedShapes {
    kept: std::collections::HashSet<String>,
}

impl PreparedShapes {
    fn keep(&mut self, sql: &str) -> bool {
        if self.kept.contains(sql) {
            return true;
        }
        if self.kept.len() < PREPARED_SHAPES {
            self.kept.insert(sql.to_string());
            return true;
        }
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Insert,
    Update,
    Delete,
}

impl PartKind {
    fn what(self) -> &'static str {
        match self {
            PartKind::Insert => "INSERT into",
            PartKind::Update => "UPDATE of",
            PartKind::Delete => "DELETE from",
        }
    }
}

/// One change (or a run of inserts into one table) of a pending statement.
struct Part {
    kind: PartKind,
    table: TableName,
    /// The table has a unique index besides its primary key (see [`PendingStatement::add`]).
    other_unique: bool,
    /// The whole statement, or for an INSERT its `INSERT INTO schema.table (columns) VALUES `.
    head: String,
    /// An INSERT's rows, `(CAST(? AS type), ...)` each; empty otherwise.
    rows: Vec<String>,
    binds: Vec<Option<String>>,
}

impl Part {
    /// A part without rows of its own (an UPDATE or DELETE, or an INSERT whose caller sets them).
    fn new(
        kind: PartKind,
        table: &TableInfo,
        name: &TableName,
        head: String,
        binds: Vec<Option<String>>,
    ) -> Part {
        Part {
            kind,
            table: name.clone(),
            other_unique: table.other_unique,
            head,
            rows: Vec::new(),
            binds,
        }
    }

    fn sql(&self) -> String {
        match self.kind {
            PartKind::Insert => format!("{}{}", self.head, self.rows.join(", ")),
            PartKind::Update | PartKind::Delete => self.head.clone(),
        }
    }

    /// Rows the part must touch on the target: each INSERT row lands, an UPDATE or DELETE by
    /// primary key finds its row.
    fn expected(&self) -> usize {
        match self.kind {
            PartKind::Insert => self.rows.len(),
            PartKind::Update | PartKind::Delete => 1,
        }
    }
}

#[derive(QueryableByName)]
struct PartRows {
    #[diesel(sql_type = Integer)]
    part: i32,
    #[diesel(sql_type = BigInt)]
    rows: i64,
}

/// The changes of one source transaction not yet sent to the target. They go as one
/// statement, each change a data-modifying CTE that reports the rows it touched: one round
/// trip per source transaction instead of one per change (a debit's opening is five changes,
/// its outcome four), with every change's row count checked as before.
///
/// The CTEs of one statement run in no defined order and do not see each other's rows, so a
/// change joins only when that cannot matter: it touches no row an earlier part touches (same
/// table and primary key), and on a table with another unique index, an UPDATE or DELETE does
/// not share the statement with any other change of that table (a unique value freed by one
/// and taken by another must be freed first). Foreign keys are checked at the end of the
/// statement, after every part, as the daemon's own combined statements rely on. A change
/// that cannot join sends what is pending first, so the target applies the source's changes
/// in an order that gives the same rows; the source transaction's COMMIT sends the rest.
#[derive(Default)]
struct PendingStatement {
    parts: Vec<Part>,
    binds: usize,
    touched: std::collections::HashSet<RowKey>,
    /// A part without a known key is pending: nothing may join it.
    closed: bool,
}

impl PendingStatement {
    /// Adds `part`, which touches `keys` (empty: unknown), sending what is pending first when
    /// it cannot join.
    fn add(
        &mut self,
        conn: &mut PgConnection,
        shapes: &mut PreparedShapes,
        part: Part,
        keys: Vec<RowKey>,
    ) -> Result<(), CdcError> {
        let conflicts = self.closed
            || keys.is_empty()
            || keys.iter().any(|k| self.touched.contains(k))
            || (part.other_unique
                && self.parts.iter().any(|p| {
                    p.table == part.table
                        && (p.kind != PartKind::Insert || part.kind != PartKind::Insert)
                }))
            || self.parts.len() >= PARTS_PER_STATEMENT
            || self.binds + part.binds.len() > BINDS_PER_STATEMENT;
        if conflicts {
            self.flush(conn, shapes)?;
        }
        self.closed = keys.is_empty();
        self.touched.extend(keys);
        self.binds += part.binds.len();
        if let Some(last) = self.parts.last_mut()
            && part.kind == PartKind::Insert
            && last.kind == PartKind::Insert
            && last.head == part.head
            && last.rows.len() < INSERT_ROWS_PER_STATEMENT
        {
            last.rows.extend(part.rows);
            last.binds.extend(part.binds);
            return Ok(());
        }
        self.parts.push(part);
        Ok(())
    }

    /// Sends the pending parts as one statement; every part must touch its rows.
    fn flush(
        &mut self,
        conn: &mut PgConnection,
        shapes: &mut PreparedShapes,
    ) -> Result<(), CdcError> {
        let parts = std::mem::take(&mut self.parts);
        self.binds = 0;
        self.touched.clear();
        self.closed = false;
        let binds = || {
            parts
                .iter()
                .flat_map(|p| p.binds.iter().map(Option::as_deref))
                .collect()
        };
        match parts.as_slice() {
            [] => Ok(()),
            [one] => expect_rows(
                Statement::new(one.sql(), binds()).execute(conn)?,
                one.expected(),
                one.kind.what(),
                &one.table,
            ),
            _ => {
                let mut sql = String::from("WITH ");
                for (at, part) in parts.iter().enumerate() {
                    if at > 0 {
                        sql.push_str(", ");
                    }
                    sql.push_str(&format!("p{at} AS ({} RETURNING 1)", part.sql()));
                }
                for at in 0..parts.len() {
                    sql.push_str(if at == 0 {
                        " SELECT "
                    } else {
                        " UNION ALL SELECT "
                    });
                    sql.push_str(&format!(
                        "{at} AS part, CAST(COUNT(*) AS BIGINT) AS rows FROM p{at}"
                    ));
                }
                let keep = shapes.keep(&sql);
                let counts: Vec<PartRows> = Statement::new(sql, binds()).kept(keep).load(conn)?;
                if counts.len() != parts.len() {
                    return Err(CdcError::Refused(format!(
                        "the target answered {} row counts for a statement of {} changes",
                        counts.len(),
                        parts.len()
                    )));
                }
                for count in counts {
                    let part = usize::try_from(count.part)
                        .ok()
                        .and_then(|at| parts.get(at))
                        .ok_or_else(|| {
                            CdcError::Refused(format!(
                                "the target answered a row count for part {} of a statement of {} changes",
                                count.part,
                                parts.len()
                            ))
                        })?;
                    expect_rows(
                        usize::try_from(count.rows).unwrap_or(usize::MAX),
                        part.expected(),
                        part.kind.what(),
                        &part.table,
                    )?;
                }
                Ok(())
            }
        }
    }
}

fn expect_rows(rows: usize, expected: usize, what: &str, name: &TableName) -> Result<(), CdcError> {
    if rows == expected {
        Ok(())
    } else {
        Err(CdcError::Refused(format!(
            "{what} {name} touched {rows} rows on the target instead of {expected}: the standby's copy \
             differs from the active's (divergence); compare them with `kunpayctl ha status` and re-seed the standby"
        )))
    }
}

/// The stored position of one (source, slot) in the target.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct Position {
    #[diesel(sql_type = Text)]
    pub source_id: String,
    #[diesel(sql_type = Text)]
    pub slot_name: String,
    #[diesel(sql_type = BigInt)]
    pub applied_lsn: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub applied_xid: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub commit_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    pub complete_lsn: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub complete_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    pub transactions: i64,
    #[diesel(sql_type = BigInt)]
    pub changes: i64,
}

const POSITION_COLUMNS: &str = "source_id, slot_name, applied_lsn, applied_xid, commit_time, \
     complete_lsn, complete_at, transactions, changes";

/// The target's positions (one per source and slot it has applied from).
pub fn positions(conn: &mut PgConnection) -> QueryResult<Vec<Position>> {
    diesel::sql_query(format!(
        "SELECT {POSITION_COLUMNS} FROM ha_cdc_position ORDER BY updated_at DESC"
    ))
    .load(conn)
}

fn read_position(
    conn: &mut PgConnection,
    source_id: &str,
    slot: &str,
    lock: bool,
) -> QueryResult<Option<Position>> {
    let rows: Vec<Position> = diesel::sql_query(format!(
        "SELECT {POSITION_COLUMNS} FROM ha_cdc_position WHERE source_id = $1 AND slot_name = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    ))
    .bind::<Text, _>(source_id)
    .bind::<Text, _>(slot)
    .load(conn)?;
    Ok(rows.into_iter().next())
}

/// This server's flushed WAL position (a cutover's fence position).
pub fn flush_lsn(conn: &mut PgConnection) -> Result<Lsn, CdcError> {
    let dialect = Dialect::detect(conn)?;
    let row: OneText =
        diesel::sql_query(format!("SELECT {} AS v", dialect.flush_lsn())).get_result(conn)?;
    Ok(Lsn::parse(&row.v)?)
}

/// Drops a slot on this server when it exists; `Ok(false)` when there was none. Fails while an
/// applier is reading it (PostgreSQL refuses to drop an active slot): retry.
pub fn drop_slot(conn: &mut PgConnection, slot: &str) -> QueryResult<bool> {
    let dialect = Dialect::detect(conn)?;
    let rows: Vec<SlotRow> = diesel::sql_query(dialect.slot_position())
        .bind::<Text, _>(slot)
        .load(conn)?;
    if rows.is_empty() {
        return Ok(false);
    }
    diesel::sql_query("SELECT pg_drop_replication_slot($1)")
        .bind::<Text, _>(slot)
        .execute(conn)?;
    Ok(true)
}

/// Removes a target's position for (source, slot): the copy from that source is over (a
/// cutover reversed the direction), so a later copy from it starts afresh, proved equal.
pub fn forget_position(
    target: &mut PgConnection,
    source_id: &str,
    slot: &str,
) -> QueryResult<usize> {
    diesel::sql_query("DELETE FROM ha_cdc_position WHERE source_id = $1 AND slot_name = $2")
        .bind::<Text, _>(source_id)
        .bind::<Text, _>(slot)
        .execute(target)
}

/// The source's identity: its system identifier (differs between two initdb'ed servers).
pub fn source_id(conn: &mut PgConnection) -> QueryResult<String> {
    let row: OneText =
        diesel::sql_query("SELECT CAST(system_identifier AS TEXT) AS v FROM pg_control_system()")
            .get_result(conn)?;
    Ok(row.v)
}

#[derive(QueryableByName)]
struct MigrationVersion {
    #[diesel(sql_type = Text)]
    v: String,
}

/// The migrations a database has applied, in order.
pub fn schema_versions(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    let rows: Vec<MigrationVersion> = diesel::sql_query(
        "SELECT CAST(version AS TEXT) AS v FROM __diesel_schema_migrations ORDER BY version",
    )
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.v).collect())
}

/// The server's `wal_level` (CDC from it needs `logical`).
pub fn wal_level(conn: &mut PgConnection) -> QueryResult<String> {
    let row: OneText =
        diesel::sql_query("SELECT setting AS v FROM pg_settings WHERE name = 'wal_level'")
            .get_result(conn)?;
    Ok(row.v)
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub transactions: u64,
    /// Row changes applied (node-local and foreign-schema changes not counted).
    pub changes: u64,
    /// Rows the peek returned (BEGIN, changes, COMMIT).
    pub rows: u64,
    /// The peek ended before its bound: everything committed before the batch began is applied.
    pub caught_up: bool,
    pub applied_lsn: Lsn,
    pub commit_time: Option<DateTime<Utc>>,
    /// The source's flushed WAL position and clock read before the peek.
    pub source_flush: Lsn,
    pub source_now: Option<DateTime<Utc>>,
}

impl BatchOutcome {
    /// Source WAL the standby has not examined after this batch: 0 when it caught up.
    pub fn lag_bytes(&self) -> u64 {
        if self.caught_up {
            0
        } else {
            self.source_flush.bytes_after(self.applied_lsn)
        }
    }

    /// Source time the standby is behind after this batch: 0 when it caught up, else the
    /// source's clock minus the commit time of the last transaction applied.
    pub fn lag_seconds(&self) -> f64 {
        match (self.caught_up, self.source_now, self.commit_time) {
            (true, _, _) => 0.0,
            (false, Some(now), Some(at)) => ((now - at).num_milliseconds().max(0) as f64) / 1000.0,
            _ => 0.0,
        }
    }
}

/// How the first start of a copy proves that the target equals the source at the slot's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartProof {
    /// Digests of both in a source snapshot, and a peek of the new slot up to it.
    Digests,
    /// A cutover already proved both equal (its verify step) with the target FENCED and the
    /// source a STANDBY whose applier has everything up to the fence: from then on neither can
    /// change a replicated table, so the slot's start is that proved state. Checked again:
    /// both roles after the slot exists, and a peek of the slot finds no replicated change.
    VerifiedUnderFence,
}

/// Connected applier for one (source, slot) -> target.
pub struct Applier {
    source: PgConnection,
    target: PgConnection,
    settings: CdcSettings,
    dialect: Dialect,
    source_id: String,
    catalog: Catalog,
    /// When an idle batch last refreshed `complete_*` in the target.
    last_idle_write: Option<Instant>,
    start_proof: StartProof,
    /// The combined statements kept prepared on `target`.
    shapes: PreparedShapes,
    pub fault: Option<Fault>,
}

/// How long a cutover's reverse-copy slot creation may wait for the source's running
/// transactions (see [`Applier::start_copy`]); the cutover tries again, within its own bound.
const SLOT_CREATION_QUIET: Duration = Duration::from_millis(500);

/// Waits, at most `bound`, until no other session of `conn`'s database holds a transaction
/// id (a slot created then is usable at once); returns either way, the creation's own bound
/// decides.
fn wait_for_no_writers(conn: &mut PgConnection, bound: Duration) -> Result<(), CdcError> {
    let deadline = Instant::now() + bound;
    while !super::open_transactions(conn)?.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Idle batches record "still complete" in the target at most this often. A planned cutover
/// waits for this record after the fence, so it bounds part of the cutover's write
/// unavailability; five one-row updates a second on an idle standby cost nothing.
const IDLE_WRITE_EVERY: Duration = Duration::from_millis(200);

impl Applier {
    /// Connects both sides, checks them (wal_level, slot, schemas, roles, the position's
    /// source) and creates the slot when it is missing.
    pub fn connect(
        source_url: &str,
        target_url: &str,
        settings: CdcSettings,
    ) -> Result<Applier, CdcError> {
        let (source, target) = Applier::establish(source_url, target_url)?;
        Applier::with_connections(source, target, settings)
    }

    pub fn with_connections(
        source: PgConnection,
        target: PgConnection,
        settings: CdcSettings,
    ) -> Result<Applier, CdcError> {
        Applier::open(source, target, settings, false, StartProof::Digests)
    }

    /// Starts a copy (slot on the source, position on the target) into a FENCED target without
    /// applying anything, for a cutover that has just verified both databases equal (row
    /// counts and SM3 digests) after fencing the target and letting the source apply
    /// everything up to the fence. The copy starts from that proof instead of digesting both
    /// again (half the digest work inside the cutover's pause), and it is made before the
    /// promotion, while the old active is still FENCED, so no applier of that node's own daemon
    /// can race it (it starts one only once its database is STANDBY, and then finds the copy
    /// started). Refused unless the target is FENCED and the source STANDBY.
    pub fn prepare_after_verify(
        source_url: &str,
        target_url: &str,
        settings: CdcSettings,
    ) -> Result<(), CdcError> {
        let (source, target) = Applier::establish(source_url, target_url)?;
        Applier::open(
            source,
            target,
            settings,
            true,
            StartProof::VerifiedUnderFence,
        )
        .map(|_| ())
    }

    fn establish(
        source_url: &str,
        target_url: &str,
    ) -> Result<(PgConnection, PgConnection), CdcError> {
        let source = PgConnection::establish(source_url).map_err(|e| {
            CdcError::Connect(format!(
                "source database {}: {}",
                crate::db::redact_url(source_url),
                first_line(&e.to_string())
            ))
        })?;
        let target = PgConnection::establish(target_url).map_err(|e| {
            CdcError::Connect(format!(
                "target database {}: {}",
                crate::db::redact_url(target_url),
                first_line(&e.to_string())
            ))
        })?;
        Ok((source, target))
    }

    fn open(
        mut source: PgConnection,
        mut target: PgConnection,
        settings: CdcSettings,
        fenced_target_allowed: bool,
        start_proof: StartProof,
    ) -> Result<Applier, CdcError> {
        if !valid_slot_name(&settings.slot) {
            return Err(CdcError::Refused(format!(
                "slot name {:?} must be 1-63 of a-z 0-9 _",
                settings.slot
            )));
        }
        if settings.batch == 0 {
            return Err(CdcError::Refused(
                "the batch bound must be at least 1".into(),
            ));
        }
        setup_session(&mut source, settings.statement_timeout)?;
        setup_session(&mut target, settings.statement_timeout)?;
        let dialect = Dialect::detect(&mut source)?;

        let level = wal_level(&mut source)?;
        if level != "logical" {
            return Err(CdcError::Refused(format!(
                "the source database has wal_level = {level}; CDC reads its changes by logical decoding, \
                 which needs wal_level = logical (set it in postgresql.conf and restart the source server)"
            )));
        }
        let target_role = super::read_role(&mut target)?;
        let acceptable = target_role.role == super::NodeRole::Standby
            || (fenced_target_allowed && target_role.role == super::NodeRole::Fenced);
        if !acceptable {
            return Err(CdcError::Refused(format!(
                "the target database is {} (epoch {}), not STANDBY: CDC writes only into a standby \
                 (`kunpayctl ha set-role standby` on the standby node)",
                target_role.role, target_role.epoch
            )));
        }
        let (source_versions, target_versions) =
            (schema_versions(&mut source)?, schema_versions(&mut target)?);
        if source_versions != target_versions {
            let only = |a: &[String], b: &[String]| {
                a.iter()
                    .filter(|v| !b.contains(v))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(CdcError::Refused(format!(
                "the two databases have different schemas (only on the source: [{}]; only on the target: [{}]); \
                 run `kunpayctl db migrate` on both nodes",
                only(&source_versions, &target_versions),
                only(&target_versions, &source_versions)
            )));
        }
        let source_id = source_id(&mut source)?;
        let catalog = Catalog::load(&mut target)?;
        let mut applier = Applier {
            source,
            target,
            settings,
            dialect,
            source_id,
            catalog,
            last_idle_write: None,
            start_proof,
            shapes: PreparedShapes::default(),
            fault: None,
        };
        applier.ensure_slot_and_position()?;
        Ok(applier)
    }

    pub fn source_id(&self) -> &str {
        &self.source_id
    }

    pub fn slot(&self) -> &str {
        &self.settings.slot
    }

    fn slot_row(&mut self) -> QueryResult<Option<SlotRow>> {
        let rows: Vec<SlotRow> = diesel::sql_query(self.dialect.slot_position())
            .bind::<Text, _>(&self.settings.slot)
            .load(&mut self.source)?;
        Ok(rows.into_iter().next())
    }

    fn ensure_slot_and_position(&mut self) -> Result<(), CdcError> {
        let slot = self.settings.slot.clone();
        let position = read_position(&mut self.target, &self.source_id, &slot, false)?;
        let current_db: OneText =
            diesel::sql_query("SELECT current_database() AS v").get_result(&mut self.source)?;
        let existing = self.slot_row()?;
        if let Some(row) = &existing {
            if row.name.as_deref() != Some("test_decoding") {
                return Err(CdcError::Refused(format!(
                    "slot {slot} on the source uses plugin {:?}, not test_decoding; drop it or name another ha.slot",
                    row.name
                )));
            }
            if row.db.as_deref() != Some(current_db.v.as_str()) {
                return Err(CdcError::Refused(format!(
                    "slot {slot} on the source belongs to database {:?}, not {}",
                    row.db, current_db.v
                )));
            }
        }
        match (&position, &existing) {
            (Some(_), Some(_)) => return Ok(()),
            (Some(p), None) => {
                // Changes after the position may have been lost with the slot.
                return Err(CdcError::Refused(format!(
                    "slot {slot} is missing on the source, but this standby has applied its changes up to {}: \
                     changes after that may be lost (a gap); re-seed the standby and remove its ha_cdc_position row",
                    Lsn(p.applied_lsn.max(0) as u64)
                )));
            }
            (None, Some(_)) => {
                // A slot no position refers to (an earlier start that stopped half-way): its
                // starting point is older than the check below, so it is made again.
                diesel::sql_query("SELECT pg_drop_replication_slot($1)")
                    .bind::<Text, _>(&slot)
                    .execute(&mut self.source)?;
                tracing::info!(slot = %slot, "CDC: dropped a slot no position refers to; creating it again");
            }
            (None, None) => {}
        }
        self.start_copy(&slot)
    }

    /// The first start of a copy. The standby must equal the source at the slot's starting
    /// point, and everything after that point is in the slot. Proved without a snapshot that the
    /// SQL interface cannot export: the slot is created first; then the source's tables are
    /// digested in one snapshot, and the slot is peeked (not consumed) up to the WAL position
    /// that snapshot can see. If no transaction in between changed a replicated table, the
    /// snapshot shows the state at the slot's start; and if the target's digests equal it, the
    /// target is that state. Node-local writes (a standby's own applier recording its position,
    /// run records) may go on meanwhile: the applier skips them anyway. Otherwise the slot is
    /// dropped again and the start refused (retried later): a copy starts while the source takes
    /// no business for a moment.
    fn start_copy(&mut self, slot: &str) -> Result<(), CdcError> {
        // A new logical slot is usable once the server has logged a moment when none of the
        // transactions that were running at its creation still run. The creation logs one
        // itself, so on a source without running transactions it is immediate; otherwise it
        // waits for the next such record, which the background writer logs every 15 s. A
        // cutover creates the reverse copy's slot inside the write pause, on the database
        // about to be promoted, where only its own daemon's applier still commits (its
        // position, every 200 ms): there the creation is bounded and tried again rather than
        // left to wait up to 15 s or more (11.7 s was seen once under load).
        let quick = self.start_proof == StartProof::VerifiedUnderFence;
        if quick {
            wait_for_no_writers(&mut self.source, SLOT_CREATION_QUIET)?;
            self.source.batch_execute(&format!(
                "SET statement_timeout = {}",
                SLOT_CREATION_QUIET.as_millis()
            ))?;
        }
        let started = Instant::now();
        let created = diesel::sql_query(
            "SELECT CAST(slot_name AS TEXT) AS v FROM pg_create_logical_replication_slot($1, 'test_decoding')",
        )
        .bind::<Text, _>(slot)
        .execute(&mut self.source);
        if quick {
            setup_session(&mut self.source, self.settings.statement_timeout)?;
        }
        created.map_err(|e| {
            if quick && started.elapsed() >= SLOT_CREATION_QUIET {
                return CdcError::NotQuiet(format!(
                    "creating slot {slot} on the source waited {} ms for transactions running there \
                     to end ({e}); nothing was created; it is tried again",
                    started.elapsed().as_millis()
                ));
            }
            CdcError::Refused(format!(
                "cannot create logical replication slot {slot} on the source ({e}); the source needs \
                 wal_level = logical, a free max_replication_slots entry and a user with REPLICATION"
            ))
        })?;
        let proved = match self.start_proof {
            StartProof::Digests => self.prove_start(slot),
            StartProof::VerifiedUnderFence => self.prove_start_under_fence(slot),
        };
        match proved {
            Ok(tables) => {
                let inserted = diesel::sql_query(
                    "INSERT INTO ha_cdc_position (source_id, slot_name, applied_lsn, complete_lsn, \
                     transactions, changes, created_at, updated_at) \
                     SELECT $1, $2, 0, 0, 0, 0, now(), now() WHERE NOT EXISTS \
                     (SELECT 1 FROM ha_cdc_position WHERE source_id = $1 AND slot_name = $2)",
                )
                .bind::<Text, _>(&self.source_id)
                .bind::<Text, _>(slot)
                .execute(&mut self.target)?;
                tracing::info!(slot = %slot, source = %self.source_id, inserted, tables,
                    "CDC: slot created on the source and the copy's position on the target (both sides equal)");
                Ok(())
            }
            Err(e) => {
                // Best effort: a slot no position refers to is dropped at the next start too.
                let _ = setup_session(&mut self.source, self.settings.statement_timeout);
                let _ = diesel::sql_query("SELECT pg_drop_replication_slot($1)")
                    .bind::<Text, _>(slot)
                    .execute(&mut self.source);
                Err(e)
            }
        }
    }

    /// [`StartProof::VerifiedUnderFence`]: the roles still fence both sides, and nothing in the
    /// new slot up to now touched a replicated table. Returns 0 (no tables compared here).
    fn prove_start_under_fence(&mut self, slot: &str) -> Result<usize, CdcError> {
        let (source_role, target_role) = (
            super::read_role(&mut self.source)?,
            super::read_role(&mut self.target)?,
        );
        if source_role.role != super::NodeRole::Standby
            || target_role.role != super::NodeRole::Fenced
        {
            return Err(CdcError::Refused(format!(
                "a copy started from a cutover's proof needs a STANDBY source and a FENCED target; \
                 found {} and {}",
                source_role.role, target_role.role
            )));
        }
        let at: OneText = diesel::sql_query(format!("SELECT {} AS v", self.dialect.insert_lsn()))
            .get_result(&mut self.source)?;
        self.no_replicated_change_in_slot(slot, Lsn::parse(&at.v)?)?;
        Ok(0)
    }

    /// Peeks the new slot up to `up_to` (waiting until that is flushed, as decoding reads only
    /// flushed WAL) and refuses when any change there touched a replicated table.
    fn no_replicated_change_in_slot(&mut self, slot: &str, up_to: Lsn) -> Result<(), CdcError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while flush_lsn(&mut self.source)? < up_to {
            if Instant::now() > deadline {
                return Err(CdcError::Refused(format!(
                    "the source did not flush its WAL up to {up_to} within 10 s; tried again later"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let rows: Vec<PeekRow> = diesel::sql_query(self.dialect.peek_up_to_lsn())
            .bind::<Text, _>(slot)
            .bind::<Text, _>(up_to.to_string())
            .load(&mut self.source)?;
        for row in &rows {
            if let Line::Change(change) = decode::parse_line(&row.data)? {
                for table in change.tables() {
                    if self.catalog.table(table)?.is_some() {
                        return Err(CdcError::NotQuiet(format!(
                            "the active database was writing ({table}) while this standby's copy was being \
                             started; nothing was started; it is tried again, and succeeds once the active \
                             takes no business for a moment"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The proof of [`Applier::start_copy`] for a freshly created slot; returns the number of
    /// tables compared.
    fn prove_start(&mut self, slot: &str) -> Result<usize, CdcError> {
        let dialect = self.dialect;
        // Both sides at once (a thread each): the target is compared with the source's snapshot
        // only after the slot is shown quiet below, so reading it meanwhile changes nothing.
        let (source_side, target) = super::at_once(
            || {
                self.source.transaction::<_, CdcError, _>(|source| {
                    source.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")?;
                    // The snapshot is taken by the first statement; every commit it shows was
                    // inserted into the WAL before the position read after it.
                    let digest = super::database_digest(source)?;
                    let at: OneText =
                        diesel::sql_query(format!("SELECT {} AS v", dialect.insert_lsn()))
                            .get_result(source)?;
                    Ok((digest, Lsn::parse(&at.v)?))
                })
            },
            || super::database_digest(&mut self.target),
        );
        let (source, visible_up_to) = source_side?;
        let target = target?;
        setup_session(&mut self.source, self.settings.statement_timeout)?;
        self.no_replicated_change_in_slot(slot, visible_up_to)?;
        let differences = super::digest_differences(&source, &target);
        if !differences.is_empty() {
            return Err(CdcError::Refused(format!(
                "the standby does not start as a copy of the active ({}); seed it while the active \
                 is quiet (docs/operations.md, CDC and fencing) and start again",
                differences.join("; ")
            )));
        }
        Ok(source.len())
    }

    /// Advances the slot to `lsn` when it is behind (never backwards).
    fn advance_slot_to(&mut self, lsn: Lsn) -> Result<(), CdcError> {
        let row = self.slot_row()?.ok_or_else(|| {
            CdcError::Refused(format!(
                "slot {} disappeared from the source",
                self.settings.slot
            ))
        })?;
        let confirmed = row
            .lsn
            .as_deref()
            .map(Lsn::parse)
            .transpose()?
            .unwrap_or_default();
        if confirmed >= lsn {
            return Ok(());
        }
        diesel::sql_query(self.dialect.advance())
            .bind::<Text, _>(&self.settings.slot)
            .bind::<Text, _>(lsn.to_string())
            .execute(&mut self.source)?;
        Ok(())
    }

    /// One batch (see the module comment). `Ok` with `transactions == 0` and `caught_up` when
    /// there was nothing to apply.
    pub fn apply_batch(&mut self) -> Result<BatchOutcome, CdcError> {
        let slot = self.settings.slot.clone();
        let Some(stored) = read_position(&mut self.target, &self.source_id, &slot, false)? else {
            // A cutover retires the copy of a database it promoted: its position goes as soon
            // as the target is ACTIVE, possibly before this applier's daemon has noticed. Say
            // that, not "vanished", when it is so.
            let role = crate::ha::read_role(&mut self.target)?.role;
            return Err(CdcError::Refused(if role == crate::ha::NodeRole::Standby {
                "the position row vanished from the target".into()
            } else {
                format!(
                    "the target database became {role} and its copy was retired (a cutover): CDC stops writing into it"
                )
            }));
        };
        let stored_lsn = Lsn(stored.applied_lsn as u64);
        // Step 1: whatever the target holds is never asked for again.
        self.advance_slot_to(stored_lsn)?;
        // Step 2.
        let wal: WalNow = diesel::sql_query(format!(
            "SELECT {} AS lsn, now() AS now",
            self.dialect.flush_lsn()
        ))
        .get_result(&mut self.source)?;
        let source_flush = Lsn::parse(&wal.lsn)?;
        if source_flush < stored_lsn {
            return Err(CdcError::Refused(format!(
                "the source's WAL ends at {source_flush}, before this standby's applied position {stored_lsn}: \
                 the source was restored or replaced; re-seed the standby"
            )));
        }

        // Step 3.
        let Applier {
            source,
            target,
            settings,
            dialect,
            source_id,
            catalog,
            shapes,
            ..
        } = self;
        let peek_sql = dialect.peek();
        let batch = settings.batch;
        let outcome = target.transaction::<_, CdcError, _>(|target| {
            target.batch_execute("SET LOCAL kunpay.cdc_apply = 'on'")?;
            let role: OneText = diesel::sql_query("SELECT role AS v FROM ha_node_role WHERE id = 1 FOR SHARE")
                .get_result(target)?;
            if role.v != "STANDBY" {
                return Err(CdcError::Refused(format!(
                    "the target database became {}: CDC stops writing into it",
                    role.v
                )));
            }
            let locked = read_position(target, source_id, &slot, true)?
                .ok_or_else(|| CdcError::Refused("the position row vanished from the target".into()))?;
            if locked.applied_lsn != stored.applied_lsn {
                return Err(CdcError::Refused(format!(
                    "the position of slot {slot} moved under this applier (another applier is running against this standby?)"
                )));
            }
            let mut out = BatchOutcome {
                source_flush,
                source_now: Some(wal.now),
                applied_lsn: stored_lsn,
                ..BatchOutcome::default()
            };
            let mut open: Option<u64> = None;
            let mut last_xid: Option<u64> = None;
            let mut pending = PendingStatement::default();
            let rows = diesel::sql_query(peek_sql)
                .bind::<Text, _>(&slot)
                .bind::<Integer, _>(batch as i32)
                .load_iter::<PeekRow, PgRowByRowLoadingMode>(source)?;
            for row in rows {
                let row = row?;
                out.rows += 1;
                match decode::parse_line(&row.data)? {
                    Line::Begin { xid } => {
                        if let Some(previous) = open {
                            return Err(CdcError::Refused(format!(
                                "BEGIN {xid} inside transaction {previous} in the change stream"
                            )));
                        }
                        open = Some(xid);
                    }
                    Line::Change(change) => {
                        if open.is_none() {
                            return Err(CdcError::Refused(format!(
                                "a change outside a transaction in the change stream (xid {})",
                                row.xid
                            )));
                        }
                        if apply_change(target, catalog, &change, &mut pending, shapes)? {
                            out.changes += 1;
                        }
                    }
                    Line::Commit { xid, at } => {
                        if open != Some(xid) {
                            return Err(CdcError::Refused(format!(
                                "COMMIT {xid} without its BEGIN in the change stream"
                            )));
                        }
                        open = None;
                        pending.flush(target, shapes)?;
                        let lsn = Lsn::parse(&row.lsn)?;
                        // The slot was advanced to the stored position before this peek, so a
                        // transaction at or before it means the slot went back; applying it
                        // again would duplicate it. Nothing of this batch is kept.
                        if lsn <= out.applied_lsn {
                            return Err(CdcError::Refused(format!(
                                "the slot returned transaction {xid} committed at {lsn}, at or before the applied \
                                 position {}; refusing to apply it twice",
                                out.applied_lsn
                            )));
                        }
                        out.applied_lsn = lsn;
                        out.commit_time = at.map(|t| t.with_timezone(&Utc));
                        out.transactions += 1;
                        last_xid = Some(xid);
                    }
                    Line::Message { .. } => {}
                }
            }
            if let Some(xid) = open {
                return Err(CdcError::Refused(format!(
                    "the change stream ended inside transaction {xid}"
                )));
            }
            pending.flush(target, shapes)?;
            out.caught_up = out.rows < u64::from(batch);
            let (complete_lsn, complete_at) = if out.caught_up {
                (out.applied_lsn.max(source_flush), Some(wal.now))
            } else {
                (out.applied_lsn, out.commit_time.or(stored.complete_at))
            };
            if out.transactions > 0 {
                diesel::sql_query(
                    "UPDATE ha_cdc_position SET applied_lsn = $1, applied_xid = $2, commit_time = $3, \
                     complete_lsn = $4, complete_at = $5, transactions = transactions + $6, \
                     changes = changes + $7, updated_at = now() WHERE source_id = $8 AND slot_name = $9",
                )
                .bind::<BigInt, _>(out.applied_lsn.0 as i64)
                .bind::<Nullable<BigInt>, _>(last_xid.map(|x| x as i64))
                .bind::<Nullable<Timestamptz>, _>(out.commit_time)
                .bind::<BigInt, _>(complete_lsn.0 as i64)
                .bind::<Nullable<Timestamptz>, _>(complete_at)
                .bind::<BigInt, _>(out.transactions as i64)
                .bind::<BigInt, _>(out.changes as i64)
                .bind::<Text, _>(&*source_id)
                .bind::<Text, _>(&slot)
                .execute(target)?;
            }
            Ok((out, complete_lsn, complete_at))
        });
        let (out, complete_lsn, complete_at) = outcome?;

        if out.transactions == 0 && out.caught_up {
            // Idle: say so in the target (lag in seconds for `kunpayctl ha status`), not on
            // every poll, and let the slot release the WAL it no longer needs.
            let due = self
                .last_idle_write
                .is_none_or(|at| at.elapsed() >= IDLE_WRITE_EVERY);
            if due {
                diesel::sql_query(
                    "UPDATE ha_cdc_position SET complete_lsn = $1, complete_at = $2, updated_at = now() \
                     WHERE source_id = $3 AND slot_name = $4 AND applied_lsn = $5",
                )
                .bind::<BigInt, _>(complete_lsn.0 as i64)
                .bind::<Nullable<Timestamptz>, _>(complete_at)
                .bind::<Text, _>(&self.source_id)
                .bind::<Text, _>(&slot)
                .bind::<BigInt, _>(stored.applied_lsn)
                .execute(&mut self.target)?;
                self.last_idle_write = Some(Instant::now());
            }
        }
        if out.transactions > 0 && self.fault.take() == Some(Fault::AfterTargetCommit) {
            return Err(CdcError::Fault(
                "after the target commit, before the slot advance",
            ));
        }
        // Step 4. The flushed position read before an exhausted peek is safe too: every commit
        // before it was in the peek.
        let advance_to = if out.caught_up {
            out.applied_lsn.max(source_flush)
        } else {
            out.applied_lsn
        };
        if advance_to > stored_lsn {
            self.advance_slot_to(advance_to)?;
        }
        Ok(out)
    }

    /// Applies batches until one finds nothing more (or `max_batches` ran); for tests and for
    /// a cutover's final catch-up.
    pub fn drain(&mut self, max_batches: usize) -> Result<BatchOutcome, CdcError> {
        let mut total = BatchOutcome::default();
        for _ in 0..max_batches {
            let out = self.apply_batch()?;
            total.transactions += out.transactions;
            total.changes += out.changes;
            total.rows += out.rows;
            total.applied_lsn = out.applied_lsn;
            total.commit_time = out.commit_time.or(total.commit_time);
            total.source_flush = out.source_flush;
            total.source_now = out.source_now;
            if out.caught_up {
                total.caught_up = true;
                return Ok(total);
            }
        }
        Ok(total)
    }
}

/// What the applier loop reports after each batch or failure (for metrics and logs).
#[derive(Debug)]
pub enum Event<'a> {
    Applied(&'a BatchOutcome),
    Failed(&'a CdcError),
}

/// Pause after the n-th consecutive failure: 0.5 s doubling up to 30 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(30))
}

/// The applier as a long-running loop: connects (and reconnects after any error, with
/// [`backoff`]), applies batches back to back while there is work and every `poll_every` when
/// caught up, until `stop` is set. Every outcome goes to `observe`. A refusal (wrong role,
/// divergence, schema drift) is retried too, slowly: a person fixes the cause and the applier
/// continues by itself.
pub fn run(
    source_url: &str,
    target_url: &str,
    settings: &CdcSettings,
    poll_every: Duration,
    stop: &std::sync::atomic::AtomicBool,
    mut observe: impl FnMut(Event<'_>),
) {
    use std::sync::atomic::Ordering;
    let mut applier: Option<Applier> = None;
    let mut failures = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let result = match applier.as_mut() {
            Some(a) => a.apply_batch(),
            None => match Applier::connect(source_url, target_url, settings.clone()) {
                Ok(a) => {
                    tracing::info!(slot = %settings.slot, source = %a.source_id(), "CDC applier connected");
                    applier = Some(a);
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(outcome) => {
                failures = 0;
                observe(Event::Applied(&outcome));
                if outcome.caught_up {
                    sleep_unless_stopped(poll_every, stop);
                }
            }
            Err(e) => {
                // Both connections are dropped: a half-read stream or an aborted transaction
                // is never reused.
                applier = None;
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "CDC applier failed; reconnecting after a pause");
                observe(Event::Failed(&e));
                sleep_unless_stopped(backoff(failures - 1), stop);
            }
        }
    }
}

fn sleep_unless_stopped(pause: Duration, stop: &std::sync::atomic::AtomicBool) {
    let until = Instant::now() + pause;
    while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_string()
}

/// How far a standby is behind its source.
#[derive(Debug, Clone, PartialEq)]
pub struct CdcStatus {
    pub slot: String,
    pub position: Option<Position>,
    pub source_flush: Lsn,
    pub slot_confirmed: Option<Lsn>,
    /// Where the slot's decoding restarts: every read of the slot decodes from here, and the
    /// source keeps its WAL from here on. Far behind `slot_confirmed` (a long transaction, a
    /// burst of deletes), each read of the applier decodes much more than it returns.
    pub slot_restart: Option<Lsn>,
    pub source_now: DateTime<Utc>,
    /// Source WAL after the point up to which the standby is known complete.
    pub lag_bytes: u64,
    /// Source time since the standby was last known complete (0 when no WAL is pending).
    pub lag_seconds: Option<f64>,
}

/// Reads both sides without touching the slot's stream (a peek here would collide with a
/// running applier: a slot serves one reader at a time).
pub fn status(
    source: &mut PgConnection,
    target: &mut PgConnection,
    slot: &str,
) -> Result<CdcStatus, CdcError> {
    let dialect = Dialect::detect(source)?;
    let source_id = source_id(source)?;
    let position = read_position(target, &source_id, slot, false)?;
    let wal: WalNow = diesel::sql_query(format!(
        "SELECT {} AS lsn, now() AS now",
        dialect.flush_lsn()
    ))
    .get_result(source)?;
    let source_flush = Lsn::parse(&wal.lsn)?;
    let rows: Vec<SlotRow> = diesel::sql_query(dialect.slot_position())
        .bind::<Text, _>(slot)
        .load(source)?;
    let (slot_confirmed, slot_restart) = match rows.into_iter().next() {
        Some(row) => (
            row.lsn.map(|l| Lsn::parse(&l)).transpose()?,
            row.restart.map(|l| Lsn::parse(&l)).transpose()?,
        ),
        None => (None, None),
    };
    let (lag_bytes, lag_seconds) = match &position {
        None => (source_flush.0, None),
        Some(p) => {
            let complete = Lsn(p.applied_lsn.max(p.complete_lsn) as u64);
            let bytes = source_flush.bytes_after(complete);
            let seconds = if bytes == 0 {
                Some(0.0)
            } else {
                p.complete_at
                    .or(p.commit_time)
                    .map(|t| ((wal.now - t).num_milliseconds().max(0) as f64) / 1000.0)
            };
            (bytes, seconds)
        }
    };
    Ok(CdcStatus {
        slot: slot.to_string(),
        position,
        source_flush,
        slot_confirmed,
        slot_restart,
        source_now: wal.now,
        lag_bytes,
        lag_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_statements_stay_prepared_up_to_the_bound_and_no_further() {
        let mut shapes = PreparedShapes::default();
        for n in 0..PREPARED_SHAPES {
            assert!(shapes.keep(&format!("shape {n}")));
        }
        assert!(!shapes.keep("one shape too many"), "beyond the bound");
        assert!(shapes.keep("shape 0"), "a kept shape stays kept");
        assert_eq!(shapes.kept.len(), PREPARED_SHAPES);
    }

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(6), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn slot_names_follow_postgresql_rules() {
        assert!(valid_slot_name("kunpay_cdc"));
        assert!(valid_slot_name("a1"));
        for bad in ["", "Kunpay", "kunpay-cdc", "a b", &"x".repeat(64)] {
            assert!(!valid_slot_name(bad), "{bad:?}");
        }
    }
}
