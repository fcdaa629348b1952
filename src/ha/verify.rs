//! The cutover's verify without reading every row in the write pause: both databases are
//! digested in full while business still runs, then only the rows that changed since are read
//! again, in the pause.
//!
//! Each database gets its own logical slot (`kunpay_verify_<pid>_<n>`, test_decoding, temporary on
//! PostgreSQL) before its first snapshot, so the slot's stream holds every transaction that
//! snapshot does not see. A table's digest is order-free: the row count and the sum, modulo
//! 2^256, of SM3 over each row's text (length-prefixed, as [`super::table_digest`] hashes it).
//! Moving a side from an old snapshot to a newer one takes the transactions of the stream the
//! newer one sees and the older one did not (decided by transaction id against each snapshot's
//! `txid_current_snapshot()`), and for every row key they touched subtracts the row as the old
//! snapshot has it and adds it as the new one has it; the old snapshot stays open until then.
//! A TRUNCATE re-reads its table. Comparing the two sides after the fence then compares every
//! row of both databases, as the full digest does, at the cost of the rows written since the
//! last refresh.
//!
//! Must never: learn what changed from the CDC applier (each side's own slot says, so a change
//! the applier lost or an operator wrote on the standby is read again like any other); put a
//! value into SQL text (keys are bound parameters, identifiers come from the catalog, quoted);
//! hold more than [`MAX_CHANGED_ROWS`] changed keys (it gives up, and the cutover digests
//! everything instead); leave a slot behind on PostgreSQL (temporary slots end with their
//! session).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};

use super::cdc::{Catalog, Dialect, Statement};
use super::decode::{self, Change, Column, Line, Lsn, TableName, Value};
use super::{TableDigest, quote_ident};
use crate::crypto::sm3::Sm3;

/// Changed row keys one side may hold between two snapshots; beyond it the incremental verify
/// gives up (the cutover then digests every row in the pause, as without it).
pub const MAX_CHANGED_ROWS: usize = 2_000_000;
/// Keys per lookup statement: one bound parameter per key column each, far below the
/// protocol's 65,535 parameters for any kunpay key (at most four columns).
const KEYS_PER_LOOKUP: usize = 256;
/// Stream rows one read of a verify slot asks for (it returns whole transactions).
const CHANGES_PER_READ: i64 = 10_000;
/// How long the start waits for transactions that hold an id, when making its slot (which
/// waits for them) and after.
const OPEN_TRANSACTIONS_WAIT: Duration = Duration::from_secs(10);
pub const SLOT_PREFIX: &str = "kunpay_verify_";
const APPLICATION_NAME: &str = "kunpayctl verify";

/// A table's rows as an order-free digest: how many, and the sum modulo 2^256 of SM3 over each
/// row's length-prefixed text (big-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowSum {
    pub rows: u64,
    sum: [u64; 4],
}

impl RowSum {
    fn row_value(text: &str) -> [u64; 4] {
        let mut hasher = Sm3::new();
        hasher.update(&(text.len() as u64).to_be_bytes());
        hasher.update(text.as_bytes());
        let digest = hasher.finalize();
        let mut limbs = [0u64; 4];
        for (i, limb) in limbs.iter_mut().enumerate() {
            // Little-endian limbs of the big-endian 256-bit number.
            let start = 32 - 8 * (i + 1);
            *limb = u64::from_be_bytes(digest[start..start + 8].try_into().unwrap());
        }
        limbs
    }

    pub fn add_row(&mut self, text: &str) {
        let value = Self::row_value(text);
        self.add(&RowSum {
            rows: 1,
            sum: value,
        });
    }

    pub fn add(&mut self, other: &RowSum) {
        let mut carry = false;
        for (a, b) in self.sum.iter_mut().zip(other.sum) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
        self.rows = self.rows.wrapping_add(other.rows);
    }

    pub fn subtract(&mut self, other: &RowSum) {
        // Adding the two's complement subtracts modulo 2^256.
        let mut negated = RowSum {
            rows: other.rows.wrapping_neg(),
            sum: other.sum.map(|limb| !limb),
        };
        negated.add(&RowSum {
            rows: 0,
            sum: [1, 0, 0, 0],
        });
        self.add(&negated);
    }

    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, limb) in self.sum.iter().enumerate() {
            let start = 32 - 8 * (i + 1);
            out[start..start + 8].copy_from_slice(&limb.to_be_bytes());
        }
        out
    }
}

/// A snapshot's view of which transactions committed before it (`txid_current_snapshot()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotIds {
    xmin: u64,
    xmax: u64,
    in_progress: HashSet<u64>,
}

impl SnapshotIds {
    /// `xmin:xmax:xip,xip,...`
    pub fn parse(text: &str) -> Result<SnapshotIds, String> {
        let bad = || format!("{text:?} is not a txid_snapshot (xmin:xmax:xip,...)");
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let in_progress = match parts.next() {
            None | Some("") => HashSet::new(),
            Some(list) => list
                .split(',')
                .map(|v| v.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        if xmin > xmax {
            return Err(bad());
        }
        Ok(SnapshotIds {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether a committed transaction (its 64-bit id) is visible in the snapshot.
    pub fn sees(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.in_progress.contains(&txid))
    }
}

/// The 64-bit transaction id of a 32-bit one from a decoded stream, given an id no older than it
/// from the same server (the newest at the time of the read): the latest id at or below
/// `reference` with those low 32 bits. Ids already wider than 32 bits (openGauss) stay.
pub fn widen_xid(xid: u64, reference: u64) -> u64 {
    if xid > u64::from(u32::MAX) {
        return xid;
    }
    let candidate = (reference & !u64::from(u32::MAX)) | xid;
    if candidate > reference {
        candidate.checked_sub(1 << 32).unwrap_or(candidate)
    } else {
        candidate
    }
}

/// One committed transaction from a verify slot: the row keys it touched per table.
#[derive(Debug, Default)]
struct StreamTransaction {
    txid: u64,
    keys: BTreeMap<TableName, BTreeSet<Vec<String>>>,
    truncated: BTreeSet<TableName>,
}

impl StreamTransaction {
    fn rows(&self) -> usize {
        self.keys.values().map(BTreeSet::len).sum()
    }
}

#[derive(QueryableByName)]
struct TextValue {
    #[diesel(sql_type = Text)]
    v: String,
}

#[derive(QueryableByName)]
struct StreamRow {
    #[diesel(sql_type = Text)]
    data: String,
}

#[derive(QueryableByName)]
struct RowText {
    #[diesel(sql_type = Nullable<Text>)]
    row: Option<String>,
}

fn open(url: &str, statement_timeout: Duration, which: &str) -> anyhow::Result<PgConnection> {
    let mut conn = super::connect_for(url, statement_timeout, which, APPLICATION_NAME)?;
    conn.batch_execute(super::DIGEST_SETTINGS)?;
    Ok(conn)
}

/// A REPEATABLE READ, READ ONLY transaction kept open: the database as of one moment.
struct Snapshot {
    conn: PgConnection,
    pid: i64,
    ids: SnapshotIds,
}

impl Snapshot {
    fn take(url: &str, timeout: Duration, which: &str) -> anyhow::Result<Self> {
        let mut conn = open(url, timeout, which)?;
        conn.batch_execute("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
        let ids: TextValue = diesel::sql_query("SELECT CAST(txid_current_snapshot() AS TEXT) AS v")
            .get_result(&mut conn)?;
        let ids = SnapshotIds::parse(&ids.v).map_err(|e| anyhow::anyhow!(e))?;
        let pid: TextValue = diesel::sql_query("SELECT CAST(pg_backend_pid() AS TEXT) AS v")
            .get_result(&mut conn)?;
        Ok(Snapshot {
            conn,
            pid: pid.v.parse()?,
            ids,
        })
    }
}

/// One database's side of an incremental verify.
pub struct Side {
    which: &'static str,
    url: String,
    timeout: Duration,
    dialect: Dialect,
    slot: String,
    slot_conn: PgConnection,
    /// This database's replicated tables and their keys, as the CDC applier reads them.
    catalog: Catalog,
    snapshot: Snapshot,
    sums: BTreeMap<String, RowSum>,
    /// Transactions read from the slot that the current snapshot does not see yet.
    pending: Vec<StreamTransaction>,
}

impl Side {
    /// Creates the side's slot, waits for every transaction that held an id at that moment to
    /// end (one that committed just before the slot's start could otherwise be in neither the
    /// first snapshot nor the stream), takes the first snapshot and digests every replicated
    /// table in it. Reads every row: run it while business runs, not in the pause.
    pub fn start(url: &str, which: &'static str, timeout: Duration) -> anyhow::Result<Side> {
        let mut slot_conn = open(url, timeout, which)?;
        slot_conn.batch_execute("SET synchronous_commit = on")?;
        let dialect = Dialect::detect(&mut slot_conn)?;
        // Unique per process and start: a cutover and a check of it may overlap.
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = format!("{SLOT_PREFIX}{}_{start}", std::process::id());
        let create = match dialect {
            Dialect::Postgres => {
                "SELECT CAST(slot_name AS TEXT) AS v \
                 FROM pg_create_logical_replication_slot($1, 'test_decoding', true)"
            }
            Dialect::OpenGauss => {
                "SELECT CAST(slot_name AS TEXT) AS v \
                 FROM pg_create_logical_replication_slot($1, 'test_decoding')"
            }
        };
        // Making a slot waits for every transaction that holds an id: an operator's session
        // left open must not hold the cutover for the whole statement timeout.
        slot_conn.batch_execute(&format!(
            "SET statement_timeout = {}",
            OPEN_TRANSACTIONS_WAIT.as_millis()
        ))?;
        let created = diesel::sql_query(create)
            .bind::<Text, _>(&slot)
            .execute(&mut slot_conn);
        if let Err(e) = created {
            let holding = super::open_transactions(&mut slot_conn)
                .map(|open| {
                    open.iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            anyhow::bail!(
                "cannot create the verify slot {slot} on the {which} database ({}); it needs a free \
                 max_replication_slots entry and no transaction open there for more than {:?}{}",
                e.to_string().lines().next().unwrap_or(""),
                OPEN_TRANSACTIONS_WAIT,
                if holding.is_empty() {
                    String::new()
                } else {
                    format!(" (open now: {holding})")
                }
            );
        }
        slot_conn.batch_execute(&format!("SET statement_timeout = {}", timeout.as_millis()))?;
        let side = Side::after_slot(url, which, timeout, dialect, slot.clone(), slot_conn);
        if side.is_err() && dialect == Dialect::OpenGauss {
            // No temporary slots there: take it away again.
            if let Ok(mut conn) = open(url, timeout, which) {
                let _ = super::cdc::drop_slot(&mut conn, &slot);
            }
        }
        side
    }

    fn after_slot(
        url: &str,
        which: &'static str,
        timeout: Duration,
        dialect: Dialect,
        slot: String,
        mut slot_conn: PgConnection,
    ) -> anyhow::Result<Side> {
        let open_then = super::open_transactions(&mut slot_conn)?;
        let lingering =
            super::wait_until_ended(&mut slot_conn, &open_then, OPEN_TRANSACTIONS_WAIT)?;
        anyhow::ensure!(
            lingering.is_empty(),
            "{} transaction(s) open on the {which} database when its verify slot was made did not end \
             within {OPEN_TRANSACTIONS_WAIT:?}: {}",
            lingering.len(),
            lingering
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
        let catalog = Catalog::load(&mut slot_conn)?;
        let mut snapshot = Snapshot::take(url, timeout, which)?;
        let mut sums = BTreeMap::new();
        for (table, _) in catalog.tables() {
            sums.insert(table.to_string(), full_sum(&mut snapshot.conn, table)?);
        }
        Ok(Side {
            which,
            url: url.to_string(),
            timeout,
            dialect,
            slot,
            slot_conn,
            catalog,
            snapshot,
            sums,
            pending: Vec::new(),
        })
    }

    /// Moves the side to a new snapshot of now: reads the slot up to it and re-reads, in the
    /// old snapshot and the new one, every row the transactions between them touched. Returns
    /// the rows re-read (per snapshot).
    pub fn refresh(&mut self) -> anyhow::Result<usize> {
        let mut next = Snapshot::take(&self.url, self.timeout, self.which)?;
        // Every transaction the new snapshot sees has its commit record in the WAL before this
        // one's, and this commit is flushed before it returns (synchronous_commit is on in this
        // session): decoding up to the flushed position then reads all of them. It writes no
        // row, so neither slot shows it (skip-empty-xacts).
        diesel::sql_query("SELECT CAST(txid_current() AS TEXT) AS v")
            .get_result::<TextValue>(&mut self.slot_conn)?;
        let upto = super::cdc::flush_lsn(&mut self.slot_conn)?;
        self.read_slot(upto)?;
        let (seen, unseen): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|t| next.ids.sees(t.txid));
        self.pending = unseen;
        let mut keys: BTreeMap<TableName, BTreeSet<Vec<String>>> = BTreeMap::new();
        let mut truncated = BTreeSet::new();
        for transaction in seen {
            truncated.extend(transaction.truncated);
            for (table, touched) in transaction.keys {
                keys.entry(table).or_default().extend(touched);
            }
        }
        let mut reread = 0;
        for table in &truncated {
            self.sums
                .insert(table.name.clone(), full_sum(&mut next.conn, &table.name)?);
        }
        for (table, touched) in &keys {
            if truncated.contains(table) {
                continue;
            }
            let key = self
                .catalog
                .table(table)?
                .expect("only replicated tables are noted")
                .key_casts();
            let touched: Vec<&Vec<String>> = touched.iter().collect();
            let old = keyed_sum(&mut self.snapshot.conn, &table.name, &key, &touched)?;
            let new = keyed_sum(&mut next.conn, &table.name, &key, &touched)?;
            let sum = self
                .sums
                .get_mut(&table.name)
                .expect("every replicated table has a sum");
            sum.subtract(&old);
            sum.add(&new);
            reread += touched.len();
        }
        self.snapshot = next;
        Ok(reread)
    }

    /// Reads (and consumes) the slot's transactions that committed before `upto`.
    fn read_slot(&mut self, upto: Lsn) -> anyhow::Result<()> {
        let sql = match self.dialect {
            Dialect::Postgres => {
                "SELECT data FROM pg_logical_slot_get_changes($1, CAST($2 AS pg_lsn), \
                 CAST($3 AS INTEGER), 'include-xids', '1', 'skip-empty-xacts', '1')"
            }
            Dialect::OpenGauss => {
                "SELECT data FROM pg_logical_slot_get_changes($1, $2, CAST($3 AS INTEGER), \
                 'include-xids', '1', 'skip-empty-xacts', '1')"
            }
        };
        loop {
            let rows: Vec<StreamRow> = diesel::sql_query(sql)
                .bind::<Text, _>(&self.slot)
                .bind::<Text, _>(upto.to_string())
                .bind::<BigInt, _>(CHANGES_PER_READ)
                .load(&mut self.slot_conn)?;
            if rows.is_empty() {
                return Ok(());
            }
            // Every transaction id in what was just read is at most this one.
            let newest: TextValue = diesel::sql_query(
                "SELECT CAST(txid_snapshot_xmax(txid_current_snapshot()) AS TEXT) AS v",
            )
            .get_result(&mut self.slot_conn)?;
            let newest: u64 = newest.v.parse()?;
            let mut current: Option<StreamTransaction> = None;
            for row in rows {
                match decode::parse_line(&row.data)? {
                    Line::Begin { xid } => {
                        anyhow::ensure!(
                            current.is_none(),
                            "BEGIN inside a transaction in {}",
                            self.slot
                        );
                        current = Some(StreamTransaction {
                            txid: widen_xid(xid, newest),
                            ..StreamTransaction::default()
                        });
                    }
                    Line::Commit { .. } => {
                        let done = current.take().ok_or_else(|| {
                            anyhow::anyhow!("COMMIT without BEGIN in {}", self.slot)
                        })?;
                        self.pending.push(done);
                    }
                    Line::Change(change) => {
                        let transaction = current.as_mut().ok_or_else(|| {
                            anyhow::anyhow!("a change outside a transaction in {}", self.slot)
                        })?;
                        self.note(transaction, &change)?;
                    }
                    Line::Message { .. } => {}
                }
            }
            anyhow::ensure!(
                current.is_none(),
                "a read of {} ended inside a transaction",
                self.slot
            );
            let held: usize = self.pending.iter().map(StreamTransaction::rows).sum();
            anyhow::ensure!(
                held <= MAX_CHANGED_ROWS,
                "{held} changed rows on the {} database since its last snapshot, over the bound of \
                 {MAX_CHANGED_ROWS}",
                self.which
            );
        }
    }

    /// Records the row keys one change touched (both keys of an update that moved its key).
    fn note(&self, transaction: &mut StreamTransaction, change: &Change) -> anyhow::Result<()> {
        let (table, keys): (_, Vec<&[Column]>) = match change {
            Change::Insert { table, new } => (table, vec![new]),
            Change::Update {
                table,
                old_key,
                new,
            } => (
                table,
                old_key
                    .iter()
                    .map(Vec::as_slice)
                    .chain([new.as_slice()])
                    .collect(),
            ),
            Change::Delete { table, key } => (table, vec![key]),
            Change::Truncate { tables, .. } => {
                for t in tables {
                    if self.catalog.table(t)?.is_some() {
                        transaction.truncated.insert(t.clone());
                    }
                }
                return Ok(());
            }
        };
        let Some(info) = self.catalog.table(table)? else {
            // A node-local table, or one outside kunpay's schema.
            return Ok(());
        };
        let key_columns = info.key_casts();
        for columns in keys {
            let mut key = Vec::with_capacity(key_columns.len());
            for &(name, _) in &key_columns {
                let value = columns.iter().find(|c| c.name == name).map(|c| &c.value);
                match value {
                    Some(Value::Text(text)) => key.push(text.clone()),
                    _ => anyhow::bail!(
                        "a change to {table} on the {} database carries no value for primary-key \
                         column {name}",
                        self.which
                    ),
                }
            }
            transaction
                .keys
                .entry(table.clone())
                .or_default()
                .insert(key);
        }
        Ok(())
    }

    /// The session holding the side's snapshot: a read-only transaction, which a fence need
    /// not wait for (openGauss lists every open transaction, not only those that wrote).
    pub fn snapshot_pid(&self) -> i64 {
        self.snapshot.pid
    }

    /// The side's tables as digests (the sum in place of the ordered SM3).
    pub fn digests(&self) -> Vec<TableDigest> {
        self.sums
            .iter()
            .map(|(table, sum)| TableDigest {
                table: table.clone(),
                rows: sum.rows,
                sm3: sum.bytes(),
            })
            .collect()
    }

    /// Drops the slot (on openGauss, where it is not temporary; on PostgreSQL closing the
    /// session does) and ends the snapshot.
    pub fn finish(self) {
        let Side {
            dialect,
            slot,
            mut slot_conn,
            ..
        } = self;
        if dialect == Dialect::OpenGauss {
            if let Err(e) = super::cdc::drop_slot(&mut slot_conn, &slot) {
                tracing::warn!(slot = %slot, error = %e, "the verify slot could not be dropped: drop it by hand");
            }
        }
    }
}

/// Every row of a table in the connection's snapshot, summed. Rows stream one at a time.
fn full_sum(conn: &mut PgConnection, table: &str) -> anyhow::Result<RowSum> {
    let mut sum = RowSum::default();
    let query = format!(
        "SELECT CAST(t AS TEXT) AS row FROM {} t",
        quote_ident(table)
    );
    for row in
        diesel::sql_query(query).load_iter::<RowText, diesel::pg::PgRowByRowLoadingMode>(conn)?
    {
        sum.add_row(&row?.row.unwrap_or_default());
    }
    Ok(sum)
}

/// The rows with the given keys in the connection's snapshot, summed (a key without a row adds
/// nothing).
fn keyed_sum(
    conn: &mut PgConnection,
    table: &str,
    key: &[(&str, &str)],
    keys: &[&Vec<String>],
) -> anyhow::Result<RowSum> {
    let columns: Vec<String> = key
        .iter()
        .map(|(name, _)| format!("t.{}", quote_ident(name)))
        .collect();
    let one_key = format!(
        "({})",
        key.iter()
            .map(|(_, cast)| format!("CAST({} AS {cast})", super::cdc::PARAM))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut sum = RowSum::default();
    for chunk in keys.chunks(KEYS_PER_LOOKUP) {
        let sql = format!(
            "SELECT CAST(t AS TEXT) AS row FROM {} t WHERE ({}) IN ({})",
            quote_ident(table),
            columns.join(", "),
            vec![one_key.as_str(); chunk.len()].join(", ")
        );
        let binds: Vec<Option<&str>> = chunk
            .iter()
            .flat_map(|k| k.iter().map(|v| Some(v.as_str())))
            .collect();
        let rows: Vec<RowText> = Statement::new(sql, binds).load(conn)?;
        for row in rows {
            sum.add_row(&row.row.unwrap_or_default());
        }
    }
    Ok(sum)
}

/// Both databases' sides, started and refreshed side by side.
pub struct Incremental {
    pub active: Side,
    pub standby: Side,
}

impl Incremental {
    pub fn start(active_url: &str, standby_url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let (active, standby) = super::at_once(
            || Side::start(active_url, "active", timeout),
            || Side::start(standby_url, "standby", timeout),
        );
        match (active, standby) {
            (Ok(active), Ok(standby)) => Ok(Incremental { active, standby }),
            (Err(e), other) => {
                if let Ok(s) = other {
                    s.finish();
                }
                Err(e)
            }
            (Ok(a), Err(e)) => {
                a.finish();
                Err(e)
            }
        }
    }

    /// Refreshes both sides at once; the rows re-read on each.
    pub fn refresh(&mut self) -> anyhow::Result<(usize, usize)> {
        let Incremental { active, standby } = self;
        let (a, s) = super::at_once(|| active.refresh(), || standby.refresh());
        Ok((a?, s?))
    }

    pub fn finish(self) {
        self.active.finish();
        self.standby.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_sums_do_not_depend_on_order_and_subtract_exactly() {
        let mut a = RowSum::default();
        let mut b = RowSum::default();
        for row in ["(1,x)", "(2,y)", "(3,z)"] {
            a.add_row(row);
        }
        for row in ["(3,z)", "(1,x)", "(2,y)"] {
            b.add_row(row);
        }
        assert_eq!(a, b);
        assert_eq!(a.rows, 3);
        let mut one = RowSum::default();
        one.add_row("(2,y)");
        b.subtract(&one);
        assert_ne!(a, b);
        let mut two_rows = RowSum::default();
        two_rows.add_row("(1,x)");
        two_rows.add_row("(3,z)");
        assert_eq!(b, two_rows);
        // A changed row differs; the same row twice is not the same as once.
        let mut changed = two_rows;
        changed.add_row("(2,Y)");
        assert_ne!(changed, a);
        let mut twice = RowSum::default();
        twice.add_row("(1,x)");
        twice.add_row("(1,x)");
        let mut once = RowSum::default();
        once.add_row("(1,x)");
        assert_ne!(twice, once);
        // Wrapping past 2^256 and back.
        let mut big = RowSum::default();
        for i in 0..1000 {
            big.add_row(&format!("({i})"));
        }
        let copy = big;
        for i in 0..1000 {
            let mut r = RowSum::default();
            r.add_row(&format!("({i})"));
            big.subtract(&r);
        }
        assert_eq!(big, RowSum::default());
        assert_ne!(copy, RowSum::default());
    }

    #[test]
    fn the_row_value_is_the_sm3_of_the_length_prefixed_text() {
        let mut sum = RowSum::default();
        sum.add_row("abc");
        let mut prefixed = 3u64.to_be_bytes().to_vec();
        prefixed.extend_from_slice(b"abc");
        assert_eq!(sum.bytes(), crate::crypto::sm3::digest(&prefixed));
    }

    #[test]
    fn snapshots_see_what_committed_before_them() {
        let s = SnapshotIds::parse("100:110:103,107").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(100));
        assert!(s.sees(104));
        assert!(!s.sees(103));
        assert!(!s.sees(107));
        assert!(!s.sees(110));
        assert!(!s.sees(111));
        assert!(SnapshotIds::parse("5:5:").unwrap().sees(4));
        assert!(SnapshotIds::parse("5:4:").is_err());
        assert!(SnapshotIds::parse("x:5:").is_err());
        assert!(SnapshotIds::parse("1:5:2,q").is_err());
    }

    #[test]
    fn stream_xids_widen_against_a_newer_id() {
        let epoch = 3u64 << 32;
        assert_eq!(widen_xid(500, epoch + 1000), epoch + 500);
        // Wrapped: the xid is from the previous epoch.
        assert_eq!(widen_xid(u64::from(u32::MAX) - 5, epoch + 10), epoch - 6);
        assert_eq!(widen_xid(1000, 1000), 1000);
        // openGauss prints 64-bit ids.
        assert_eq!(widen_xid(epoch + 7, 12), epoch + 7);
    }
}
