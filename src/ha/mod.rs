//! High availability: two nodes, each with its own database; the active node's changes flow to
//! the standby's database by CDC; a fencing role and epoch in each database decide which one
//! may write.
//!
//! Owns: the node role row (`ha_node_role`: ACTIVE / STANDBY / FENCED and the fencing epoch) and
//! the write guard (the `kunpay_ha_guard` trigger on every replicated table, installed by
//! [`install_guards`] after every migration), which tables are replicated and which are node-local
//! ([`NODE_LOCAL_TABLES`]), the per-table SM3 digest both databases are compared with
//! ([`table_digest`]); `decode.rs` the pure parser of `test_decoding` output; `cdc.rs` the applier
//! that copies committed source transactions into the target with its position
//! (`ha_cdc_position`) in the same target transaction.
//! Must never: let a database that is not ACTIVE take a write from kunpay (only the applier, on a
//! STANDBY, passes the guard); apply a source transaction twice or skip one; advance the source
//! slot past what the target has committed; interpolate a value into SQL (values are bound
//! parameters, identifiers come from the target's catalog and are quoted); replicate a
//! node-local table (each node's role, position and run records are its own).

pub mod cdc;
pub mod cutover;
pub mod decode;
pub mod verify;

use std::fmt;
use std::str::FromStr;

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz};

use crate::crypto::sm3::Sm3;

/// Tables that belong to one node and are neither replicated nor guarded: the node's role and
/// epoch (they must differ between the nodes), the applier's position (it describes this copy),
/// the daemon's run records (each node writes its own, also as a standby), and diesel's record of
/// applied migrations (each node migrates itself; test_decoding does not carry DDL).
pub const NODE_LOCAL_TABLES: &[&str] = &[
    "ha_node_role",
    "ha_cdc_position",
    "node_run",
    "__diesel_schema_migrations",
];

/// The SQLSTATE the guard raises (read_only_sql_transaction): drivers and operators read it as
/// "this server does not take writes now".
pub const FENCED_SQLSTATE: &str = "25006";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Active,
    Standby,
    Fenced,
}

impl NodeRole {
    pub fn as_db(self) -> &'static str {
        match self {
            NodeRole::Active => "ACTIVE",
            NodeRole::Standby => "STANDBY",
            NodeRole::Fenced => "FENCED",
        }
    }
}

impl FromStr for NodeRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "ACTIVE" => Ok(NodeRole::Active),
            "STANDBY" => Ok(NodeRole::Standby),
            "FENCED" => Ok(NodeRole::Fenced),
            _ => Err(format!(
                "\"{s}\" is not a node role; use active, standby or fenced"
            )),
        }
    }
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_db())
    }
}

/// The database's own statement of who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRecord {
    pub role: NodeRole,
    pub epoch: i64,
    pub changed_at: chrono::DateTime<chrono::Utc>,
    pub reason: String,
    /// A planned cutover asked this (ACTIVE) node to drain at this time ([`request_drain`]).
    pub drain_requested_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The node's daemon finished the requests in flight at this time ([`report_drained`]).
    pub drained_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl RoleRecord {
    /// Same role at the same epoch: a running daemon keeps serving as it started. Anything
    /// else means a restart (the new epoch must be claimed by fresh connections).
    pub fn same_standing(&self, other: &RoleRecord) -> bool {
        self.role == other.role && self.epoch == other.epoch
    }
}

#[derive(QueryableByName)]
struct RoleRow {
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = BigInt)]
    epoch: i64,
    #[diesel(sql_type = Timestamptz)]
    changed_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<Timestamptz>)]
    drain_requested_at: Option<chrono::DateTime<chrono::Utc>>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Timestamptz>)]
    drained_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl RoleRow {
    fn into_record(self) -> anyhow::Result<RoleRecord> {
        Ok(RoleRecord {
            role: self.role.parse().map_err(anyhow::Error::msg)?,
            epoch: self.epoch,
            changed_at: self.changed_at,
            reason: self.reason,
            drain_requested_at: self.drain_requested_at,
            drained_at: self.drained_at,
        })
    }
}

const ROLE_COLUMNS: &str = "role, epoch, changed_at, reason, drain_requested_at, drained_at";

/// Reads `ha_node_role`; an error names the migration when the table or its row is missing.
pub fn read_role(conn: &mut PgConnection) -> anyhow::Result<RoleRecord> {
    let rows: Vec<RoleRow> =
        diesel::sql_query(format!("SELECT {ROLE_COLUMNS} FROM ha_node_role WHERE id = 1"))
            .load(conn)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read ha_node_role ({e}); run `kunpayctl db migrate` (migrations 000008_ha, 000010_ha_handover)"
                )
            })?;
    let row = rows.into_iter().next().ok_or_else(|| {
        anyhow::anyhow!(
            "ha_node_role has no row: every write is refused; set the role with `kunpayctl ha set-role`"
        )
    })?;
    row.into_record()
}

/// Sets this database's role at `epoch`. The epoch never goes back. Promotion to ACTIVE needs
/// an epoch higher than the current one, so two databases that took part in one cutover are
/// ordered and a stale promotion cannot win; fencing or demoting is allowed at the same epoch
/// (it grants nothing). Setting the same role at the same epoch is a no-op (a retried step).
/// Returns the record as it was before.
pub fn set_role(
    conn: &mut PgConnection,
    role: NodeRole,
    epoch: i64,
    reason: &str,
) -> anyhow::Result<RoleRecord> {
    anyhow::ensure!(epoch >= 0, "a fencing epoch is never negative");
    let reason: String = reason.chars().take(200).collect();
    conn.transaction(|conn| {
        let rows: Vec<RoleRow> = diesel::sql_query(format!(
            "SELECT {ROLE_COLUMNS} FROM ha_node_role WHERE id = 1 FOR UPDATE"
        ))
        .load(conn)?;
        let before = match rows.into_iter().next() {
            Some(row) => row.into_record()?,
            None => anyhow::bail!("ha_node_role has no row; run `kunpayctl db migrate`"),
        };
        if before.role == role && before.epoch == epoch {
            return Ok(before);
        }
        anyhow::ensure!(
            epoch >= before.epoch,
            "refused: this database is {} at fencing epoch {}; epochs never go back (asked {epoch})",
            before.role,
            before.epoch
        );
        anyhow::ensure!(
            role != NodeRole::Active || epoch > before.epoch,
            "refused: this database is {} at fencing epoch {}; promotion to ACTIVE needs a higher epoch than that (asked {epoch})",
            before.role,
            before.epoch
        );
        // A drain belongs to the role it was asked of: a new standing starts without one.
        diesel::sql_query(
            "UPDATE ha_node_role SET role = $1, epoch = $2, changed_at = now(), reason = $3, \
             drain_requested_at = NULL, drained_at = NULL WHERE id = 1",
        )
        .bind::<Text, _>(role.as_db())
        .bind::<BigInt, _>(epoch)
        .bind::<Text, _>(&reason)
        .execute(conn)?;
        Ok(before)
    })
}

/// Asks this database's node to drain (a planned cutover's first step): the daemon watching the
/// role row stops taking business requests (503, /primary 503), lets the ones in flight finish
/// and records [`report_drained`]. Only an ACTIVE database is drained, and only at the epoch the
/// caller saw (a cutover that raced another is refused). Returns the request's time, which the
/// daemon's report must match. Asking again restarts the wait (the old report is cleared).
pub fn request_drain(
    conn: &mut PgConnection,
    epoch: i64,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    #[derive(QueryableByName)]
    struct At {
        #[diesel(sql_type = Timestamptz)]
        at: chrono::DateTime<chrono::Utc>,
    }
    let rows: Vec<At> = diesel::sql_query(
        "UPDATE ha_node_role SET drain_requested_at = clock_timestamp(), drained_at = NULL \
         WHERE id = 1 AND role = 'ACTIVE' AND epoch = $1 RETURNING drain_requested_at AS at",
    )
    .bind::<BigInt, _>(epoch)
    .load(conn)?;
    match rows.into_iter().next() {
        Some(row) => Ok(row.at),
        None => {
            let now = read_role(conn)?;
            anyhow::bail!(
                "refused: the database to drain is {} at fencing epoch {}, not ACTIVE at epoch {epoch}",
                now.role,
                now.epoch
            )
        }
    }
}

/// Withdraws a drain request (a cutover refused before the fence): the node serves again.
pub fn cancel_drain(conn: &mut PgConnection) -> QueryResult<usize> {
    diesel::sql_query(
        "UPDATE ha_node_role SET drain_requested_at = NULL, drained_at = NULL \
         WHERE id = 1 AND drain_requested_at IS NOT NULL",
    )
    .execute(conn)
}

/// The daemon's answer to [`request_drain`]: nothing is in flight since the request at
/// `requested_at`. Matches on that time, so a report never answers a later request. Returns
/// whether the row still asked for it.
pub fn report_drained(
    conn: &mut PgConnection,
    requested_at: chrono::DateTime<chrono::Utc>,
) -> QueryResult<bool> {
    let changed = diesel::sql_query(
        "UPDATE ha_node_role SET drained_at = clock_timestamp() \
         WHERE id = 1 AND drain_requested_at = $1 AND drained_at IS NULL",
    )
    .bind::<Timestamptz, _>(requested_at)
    .execute(conn)?;
    Ok(changed == 1)
}

/// Declares the fencing epoch this session writes under: the guard refuses its writes once the
/// database's epoch has moved on (a process from an earlier epoch must restart and re-read).
/// Integers only reach the string.
pub fn claim_epoch(conn: &mut PgConnection, epoch: i64) -> QueryResult<()> {
    conn.batch_execute(&format!("SET kunpay.epoch = '{epoch}'"))
}

#[derive(QueryableByName)]
struct NameRow {
    #[diesel(sql_type = Text)]
    name: String,
}

/// kunpay's tables in the current schema that CDC copies and the guard protects: every ordinary
/// table except [`NODE_LOCAL_TABLES`], sorted by name.
pub fn replicated_tables(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    let rows: Vec<NameRow> = diesel::sql_query(
        "SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY c.relname",
    )
    .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| r.name)
        .filter(|name| !NODE_LOCAL_TABLES.contains(&name.as_str()))
        .collect())
}

/// Replicated tables that lack the guard trigger.
pub fn unguarded_tables(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    let guarded: Vec<NameRow> = diesel::sql_query(
        "SELECT c.relname AS name FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND t.tgname = 'kunpay_ha_guard'",
    )
    .load(conn)?;
    let guarded: std::collections::HashSet<String> = guarded.into_iter().map(|r| r.name).collect();
    Ok(replicated_tables(conn)?
        .into_iter()
        .filter(|t| !guarded.contains(t))
        .collect())
}

/// The guard's trigger function. ACTIVE: a write passes unless the session declared another
/// fencing epoch (kunpayd's connections declare the one they started under in `kunpay.epoch`,
/// so a process from an earlier epoch must restart). STANDBY: only the CDC applier passes (`SET
/// LOCAL kunpay.cdc_apply = 'on'` inside its transaction). FENCED, or no role row: nothing.
///
/// Checked once per write transaction: the first write takes the transaction's id, reads the
/// role row, and marks the transaction passed (`kunpay.guard_passed`, a transaction-local
/// setting holding that id, so it ends with the transaction and a session-level value matches
/// no other transaction); the transaction's later statements pass on the mark. The cutover's
/// fence step waits for every transaction that holds an id when the fence has committed
/// ([`open_transactions`]), so whatever passed before the fence is inside the fence position.
/// Measured with pgbench running the debit's two statements (four alternating rounds of 10 s):
/// 1,605 debits/s reading the role on every statement, 1,683 checking once per transaction,
/// 1,895 with an empty guard. Checking per statement also did not close the gap the fence
/// wait closes: a statement that passed before a fence could commit after it.
///
/// PostgreSQL reads an unset setting as NULL with `current_setting(name, true)`; some openGauss
/// distributions lack that form, so there the read sits in an exception block (a
/// subtransaction per statement: dearer, measured in docs/operations.md).
pub fn guard_function_sql(dialect: cdc::Dialect) -> String {
    let read = |var: &str, setting: &str| match dialect {
        cdc::Dialect::Postgres => {
            format!("    {var} := COALESCE(current_setting('{setting}', true), '');\n")
        }
        cdc::Dialect::OpenGauss => format!(
            "    BEGIN\n        {var} := current_setting('{setting}');\n    \
             EXCEPTION WHEN undefined_object THEN\n        {var} := '';\n    END;\n"
        ),
    };
    let pass = |indent: &str| {
        format!(
            "{indent}PERFORM set_config('kunpay.guard_passed', xid, true);\n{indent}RETURN NULL;\n"
        )
    };
    // The transaction's id is taken before the role is read: a fence step that does not see it
    // committed the fence before this read. Under REPEATABLE READ or SERIALIZABLE the read uses
    // the transaction's snapshot, which may predate a fence: the share lock then fails on the
    // role row changed since (a serialization failure) instead of reading the old role.
    format!(
        "CREATE OR REPLACE FUNCTION kunpay_ha_guard() RETURNS TRIGGER AS $$\n\
         DECLARE\n    node_role VARCHAR(16);\n    node_epoch BIGINT;\n    claimed TEXT;\n    \
         applying TEXT;\n    passed TEXT;\n    xid TEXT;\n\
         BEGIN\n\
         {passed}\
         \x20   IF passed <> '' THEN\n        IF passed = CAST(txid_current() AS TEXT) THEN\n            \
         RETURN NULL;\n        END IF;\n    END IF;\n\
         \x20   xid := CAST(txid_current() AS TEXT);\n\
         \x20   IF current_setting('transaction_isolation') = 'read committed' THEN\n\
         \x20       SELECT role, epoch INTO node_role, node_epoch FROM ha_node_role WHERE id = 1;\n\
         \x20   ELSE\n\
         \x20       SELECT role, epoch INTO node_role, node_epoch FROM ha_node_role WHERE id = 1 FOR SHARE;\n\
         \x20   END IF;\n\
         {claimed}\
         \x20   IF node_role = 'ACTIVE' THEN\n\
         \x20       IF claimed <> '' AND claimed <> CAST(node_epoch AS TEXT) THEN\n\
         \x20           RAISE EXCEPTION 'kunpay fenced: % on % refused: this session writes under fencing epoch %, \
         the database is ACTIVE at epoch %; restart kunpayd so it reads the current epoch', \
         TG_OP, TG_TABLE_NAME, claimed, node_epoch USING ERRCODE = '{FENCED_SQLSTATE}';\n\
         \x20       END IF;\n{pass_active}    END IF;\n\
         \x20   IF node_role = 'STANDBY' THEN\n{applying}\
         \x20       IF applying = 'on' THEN\n{pass_applier}        END IF;\n    END IF;\n\
         \x20   RAISE EXCEPTION 'kunpay fenced: % on % refused: this database is % (fencing epoch %); \
         only the ACTIVE node writes, and a STANDBY only through CDC', TG_OP, TG_TABLE_NAME, \
         COALESCE(node_role, 'without a role row'), COALESCE(CAST(node_epoch AS TEXT), '-') \
         USING ERRCODE = '{FENCED_SQLSTATE}';\n\
         END;\n$$ LANGUAGE plpgsql",
        passed = read("passed", "kunpay.guard_passed"),
        claimed = read("claimed", "kunpay.epoch"),
        applying = read("applying", "kunpay.cdc_apply"),
        pass_active = pass("        "),
        pass_applier = pass("            "),
    )
}

/// Whether this database's guard function is the one this binary installs. A database
/// migrated by an older kunpay still has an older guard (the cutover's fence step counts on the
/// current one taking a transaction id before it reads the role); `kunpayctl db migrate`
/// replaces it.
pub fn guard_is_current(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Source {
        #[diesel(sql_type = Text)]
        body: String,
    }
    let expected = guard_function_sql(cdc::Dialect::detect(conn)?);
    let body = expected
        .split("$$")
        .nth(1)
        .expect("the guard's SQL has a $$-quoted body");
    let installed: Vec<Source> = diesel::sql_query(
        "SELECT p.prosrc AS body FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE p.proname = 'kunpay_ha_guard' AND n.nspname = current_schema()",
    )
    .load(conn)?;
    Ok(matches!(installed.as_slice(), [one] if one.body == body))
}

/// Another session's transaction that may have passed the guard: its pid, what identifies the
/// transaction (its id on PostgreSQL; its start time on openGauss, whose `pg_stat_activity`
/// has no transaction ids), and what the session says of itself.
#[derive(QueryableByName, Debug, Clone, PartialEq, Eq)]
pub struct OpenTransaction {
    #[diesel(sql_type = BigInt)]
    pub pid: i64,
    #[diesel(sql_type = Text)]
    pub transaction: String,
    #[diesel(sql_type = Text)]
    pub application: String,
    #[diesel(sql_type = Text)]
    pub state: String,
}

impl fmt::Display for OpenTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (application \"{}\", {}, transaction {})",
            self.pid, self.application, self.state, self.transaction
        )
    }
}

/// The transactions of other sessions in this database that may have written: on PostgreSQL
/// those holding a transaction id (the guard takes one before it reads the role, so every
/// transaction it passed is here); on openGauss every open transaction. `pg_stat_activity`
/// shows transaction ids of every user's sessions; openGauss shows another user's start time
/// only to a system administrator.
pub fn open_transactions(conn: &mut PgConnection) -> QueryResult<Vec<OpenTransaction>> {
    let (column, condition) = match cdc::Dialect::detect(conn)? {
        cdc::Dialect::Postgres => ("backend_xid", "backend_xid IS NOT NULL"),
        cdc::Dialect::OpenGauss => ("xact_start", "xact_start IS NOT NULL"),
    };
    diesel::sql_query(format!(
        "SELECT CAST(pid AS BIGINT) AS pid, CAST({column} AS TEXT) AS transaction, \
         COALESCE(application_name, '') AS application, COALESCE(state, '') AS state \
         FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND {condition} \
         ORDER BY pid"
    ))
    .load(conn)
}

/// Waits, at most `timeout`, until none of `open` (an earlier [`open_transactions`]) is open any
/// more; returns those still open then (empty: all ended).
pub fn wait_until_ended(
    conn: &mut PgConnection,
    open: &[OpenTransaction],
    timeout: std::time::Duration,
) -> QueryResult<Vec<OpenTransaction>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now = open_transactions(conn)?;
        // The same transaction by session and transaction id (openGauss: start time), whatever
        // its session's state now: one that runs a statement is no longer "idle in transaction"
        // but has not ended.
        let lingering: Vec<OpenTransaction> = open
            .iter()
            .filter(|t| {
                now.iter()
                    .any(|n| n.pid == t.pid && n.transaction == t.transaction)
            })
            .cloned()
            .collect();
        if lingering.is_empty() || std::time::Instant::now() >= deadline {
            return Ok(lingering);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// (Re)defines the guard function for this server and puts the guard on every replicated table
/// that lacks it; returns the tables it guarded. Run after every migration (`db::migrate`), so
/// a table a later migration adds is guarded without that migration having to remember.
/// Statement-level triggers, checking once per transaction (see [`guard_function_sql`]).
pub fn install_guards(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    let dialect = cdc::Dialect::detect(conn)?;
    conn.batch_execute(&guard_function_sql(dialect))?;
    let missing = unguarded_tables(conn)?;
    for table in &missing {
        // The name comes from the catalog and is quoted; nothing from outside reaches it.
        conn.batch_execute(&format!(
            "CREATE TRIGGER kunpay_ha_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} \
             FOR EACH STATEMENT EXECUTE PROCEDURE kunpay_ha_guard()",
            quote_ident(table)
        ))?;
    }
    Ok(missing)
}

#[derive(QueryableByName)]
struct SerialColumn {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    sequence: String,
}

#[derive(QueryableByName)]
struct SequenceMove {
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    moved_to: Option<i64>,
}

/// Moves every replicated table's serial sequence past the largest id in its column. CDC copies
/// rows, not sequences, so a standby's sequences stay where its own (unused) writes left them;
/// a promotion must run this before the node takes writes, or its first inserts collide with
/// copied ids. Never moves a sequence back. Returns (table.column, new value) for each move.
pub fn advance_sequences(conn: &mut PgConnection) -> QueryResult<Vec<(String, i64)>> {
    let serials: Vec<SerialColumn> = diesel::sql_query(
        "SELECT c.relname AS table_name, a.attname AS column_name, \
         pg_get_serial_sequence(quote_ident(c.relname), a.attname) AS sequence \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' \
         AND pg_get_serial_sequence(quote_ident(c.relname), a.attname) IS NOT NULL \
         ORDER BY c.relname, a.attnum",
    )
    .load(conn)?;
    let mut moved = Vec::new();
    for s in serials {
        if NODE_LOCAL_TABLES.contains(&s.table_name.as_str()) {
            continue;
        }
        // Catalog names only: the table and column quoted here, the sequence as PostgreSQL's
        // pg_get_serial_sequence quoted it.
        let row: SequenceMove = diesel::sql_query(format!(
            "SELECT CASE WHEN m.top IS NOT NULL AND m.top > s.last_value OR (m.top IS NOT NULL AND NOT s.is_called AND m.top >= s.last_value) \
             THEN setval(CAST($1 AS regclass), m.top, true) END AS moved_to \
             FROM (SELECT MAX({col}) AS top FROM {table}) m, \
             (SELECT last_value, is_called FROM {seq}) s",
            col = quote_ident(&s.column_name),
            table = quote_ident(&s.table_name),
            seq = s.sequence,
        ))
        .bind::<Text, _>(&s.sequence)
        .get_result(conn)?;
        if let Some(value) = row.moved_to {
            moved.push((format!("{}.{}", s.table_name, s.column_name), value));
        }
    }
    Ok(moved)
}

/// `"name"` with inner quotes doubled: an identifier that can be put into SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Session settings under which both databases print every value identically (the digests),
/// and key text decoded from a slot parses back as it was printed (`verify.rs`).
pub(crate) const DIGEST_SETTINGS: &str = "SET TIME ZONE 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'; SET extra_float_digits = 3";

/// A connection for a cutover tool: its statement timeout and application name set, a failure
/// naming which database and where (password hidden).
pub(crate) fn connect_for(
    url: &str,
    statement_timeout: std::time::Duration,
    which: &str,
    application: &str,
) -> anyhow::Result<PgConnection> {
    let mut conn = PgConnection::establish(url).map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the {which} database {}: {}",
            crate::db::redact_url(url),
            e.to_string().lines().next().unwrap_or("")
        )
    })?;
    conn.batch_execute(&format!(
        "SET statement_timeout = {}; SET application_name = '{application}'",
        statement_timeout.as_millis()
    ))?;
    Ok(conn)
}

/// Rows and SM3 digest of one table, to compare two databases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    pub table: String,
    pub rows: u64,
    pub sm3: [u8; 32],
}

impl TableDigest {
    pub fn hex(&self) -> String {
        hex::encode(self.sm3)
    }
}

#[derive(QueryableByName)]
struct KeyColumn {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    collatable: bool,
}

#[derive(QueryableByName)]
struct RowText {
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    row: Option<String>,
}

/// SM3 over a table's rows in primary-key order: each row as its record text (`(a,"b c",)`),
/// length-prefixed, then the row count. The session is set to UTC, ISO dates and hex bytea so
/// both nodes print identical values identically; text keys sort with COLLATE "C" so the order
/// does not depend on either database's locale. Rows stream one at a time (bounded memory).
pub fn table_digest(conn: &mut PgConnection, table: &str) -> anyhow::Result<TableDigest> {
    conn.batch_execute(DIGEST_SETTINGS)?;
    let key: Vec<KeyColumn> = diesel::sql_query(
        "SELECT a.attname AS name, a.attcollation <> 0 AS collatable \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
         WHERE i.indisprimary AND c.relname = $1 AND n.nspname = current_schema() \
         ORDER BY array_position(i.indkey, a.attnum)",
    )
    .bind::<Text, _>(table)
    .load(conn)
    .or_else(|_| {
        // openGauss (9.2-based) lacks array_position; fall back to column order, which is the
        // key order for every kunpay table.
        diesel::sql_query(
            "SELECT a.attname AS name, a.attcollation <> 0 AS collatable \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
             WHERE i.indisprimary AND c.relname = $1 AND n.nspname = current_schema() \
             ORDER BY a.attnum",
        )
        .bind::<Text, _>(table)
        .load(conn)
    })?;
    anyhow::ensure!(
        !key.is_empty(),
        "table {table} has no primary key (or does not exist): CDC and the digest need one"
    );
    let order: Vec<String> = key
        .iter()
        .map(|k| {
            if k.collatable {
                format!("t.{} COLLATE \"C\"", quote_ident(&k.name))
            } else {
                format!("t.{}", quote_ident(&k.name))
            }
        })
        .collect();
    let query = format!(
        "SELECT CAST(t AS TEXT) AS row FROM {} t ORDER BY {}",
        quote_ident(table),
        order.join(", ")
    );
    let mut hasher = Sm3::new();
    let mut rows = 0u64;
    for row in
        diesel::sql_query(query).load_iter::<RowText, diesel::pg::PgRowByRowLoadingMode>(conn)?
    {
        let text = row?.row.unwrap_or_default();
        hasher.update(&(text.len() as u64).to_be_bytes());
        hasher.update(text.as_bytes());
        rows += 1;
    }
    hasher.update(&rows.to_be_bytes());
    Ok(TableDigest {
        table: table.to_string(),
        rows,
        sm3: hasher.finalize(),
    })
}

/// [`table_digest`] of every replicated table.
pub fn database_digest(conn: &mut PgConnection) -> anyhow::Result<Vec<TableDigest>> {
    let tables = replicated_tables(conn)?;
    tables.iter().map(|t| table_digest(conn, t)).collect()
}

/// Runs `first` here and `second` on a thread of its own, at once; a panic in either goes on
/// here. For reading two databases side by side (digests), where the wait is then for the
/// slower of the two instead of their sum.
pub(crate) fn at_once<A, B: Send>(
    first: impl FnOnce() -> A,
    second: impl FnOnce() -> B + Send,
) -> (A, B) {
    std::thread::scope(|scope| {
        let other = scope.spawn(second);
        let mine = first();
        let other = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (mine, other)
    })
}

/// [`database_digest`] of two databases at once (the cutover's verify step, while business is
/// drained).
pub fn database_digests(
    first: &mut PgConnection,
    second: &mut PgConnection,
) -> anyhow::Result<(Vec<TableDigest>, Vec<TableDigest>)> {
    let (first, second) = at_once(|| database_digest(first), || database_digest(second));
    Ok((first?, second?))
}

/// Tables whose digests differ between two databases (or exist in only one), with both sides.
pub fn digest_differences(a: &[TableDigest], b: &[TableDigest]) -> Vec<String> {
    let mut out = Vec::new();
    for da in a {
        match b.iter().find(|db| db.table == da.table) {
            None => out.push(format!("{}: only on the first database", da.table)),
            Some(db) if db != da => out.push(format!(
                "{}: {} rows sm3 {} vs {} rows sm3 {}",
                da.table,
                da.rows,
                &da.hex()[..16],
                db.rows,
                &db.hex()[..16]
            )),
            Some(_) => {}
        }
    }
    for db in b {
        if !a.iter().any(|da| da.table == db.table) {
            out.push(format!("{}: only on the second database", db.table));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_in_any_case_and_print_as_stored() {
        assert_eq!("standby".parse::<NodeRole>().unwrap(), NodeRole::Standby);
        assert_eq!("FENCED".parse::<NodeRole>().unwrap(), NodeRole::Fenced);
        assert_eq!(NodeRole::Active.to_string(), "ACTIVE");
        assert!("leader".parse::<NodeRole>().is_err());
    }

    #[test]
    fn the_guard_reads_settings_as_each_server_allows() {
        let pg = guard_function_sql(cdc::Dialect::Postgres);
        assert!(pg.contains("current_setting('kunpay.epoch', true)"), "{pg}");
        assert!(!pg.contains("EXCEPTION WHEN"), "{pg}");
        let og = guard_function_sql(cdc::Dialect::OpenGauss);
        assert!(!og.contains("', true)"), "{og}");
        assert_eq!(
            og.matches("EXCEPTION WHEN undefined_object").count(),
            3,
            "{og}"
        );
        for body in [pg, og] {
            assert!(body.contains("USING ERRCODE = '25006'"));
            assert!(body.contains("IF applying = 'on' THEN"));
            // Both ways through (ACTIVE, the applier on a STANDBY) take the transaction's id
            // and mark it passed; the mark is read before the role row.
            assert_eq!(
                body.matches("set_config('kunpay.guard_passed', xid, true)")
                    .count(),
                2,
                "{body}"
            );
            let at = |text: &str| body.find(text).unwrap();
            assert!(
                at("IF passed =") < at("xid := CAST(txid_current()"),
                "{body}"
            );
            assert!(
                at("xid := CAST(txid_current()") < at("FROM ha_node_role"),
                "{body}"
            );
            assert!(body.contains("WHERE id = 1 FOR SHARE;"), "{body}");
        }
    }

    #[test]
    fn identifiers_are_quoted_with_inner_quotes_doubled() {
        assert_eq!(quote_ident("txn"), "\"txn\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn digest_differences_name_each_table() {
        let d = |table: &str, rows: u64, byte: u8| TableDigest {
            table: table.into(),
            rows,
            sm3: [byte; 32],
        };
        let a = vec![d("txn", 2, 1), d("agreement", 1, 2), d("only_a", 0, 0)];
        let b = vec![d("txn", 2, 1), d("agreement", 1, 3), d("only_b", 0, 0)];
        let diff = digest_differences(&a, &b);
        assert_eq!(diff.len(), 3, "{diff:?}");
        assert!(diff[0].starts_with("agreement: 1 rows"));
        assert!(diff[1].contains("only_a: only on the first"));
        assert!(diff[2].contains("only_b: only on the second"));
        assert!(digest_differences(&a, &a).is_empty());
    }
}
