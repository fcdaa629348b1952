//! The database: connection pools, embedded migrations, and the node's run record.
//!
//! Owns: how kunpay connects to PostgreSQL/openGauss (r2d2 pools of diesel connections with a
//! statement timeout on every connection), the schema migrations embedded from `sql/`, and the
//! `node_run` table the health probe reads.
//! Must never: build SQL from strings that carry request data, use constructs openGauss lacks
//! (see sql/ and ../shared/notes/opengauss-sql.md), or print a database password.

pub mod cluster;
pub mod schema;

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use thiserror::Error;

use crate::config::{Role, Secret};

pub type Pool = r2d2::Pool<ConnectionManager<PgConnection>>;
pub type PooledConnection = r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Every migration under `sql/`, compiled into the binary so an installed daemon never depends
/// on files beside it.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("sql");

/// Serialises concurrent `migrate` calls (two nodes, or kunpayctl racing a starting daemon).
/// An arbitrary constant: "kunpay" in ASCII.
const MIGRATION_LOCK_KEY: i64 = 0x6b75_6e70_6179;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("cannot connect to the database at {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("no database connection available within {0:?} (pool exhausted or database down)")]
    PoolTimeout(Duration),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error(
        "the database schema is behind this binary: {pending} migration(s) not applied ({names}); \
         run `kunpayctl db migrate` or set database.migrate_on_start = true"
    )]
    SchemaBehind { pending: usize, names: String },
}

/// Connection parameters after secrets have been read (before the privilege drop).
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    pub url: Secret,
    pub password: Option<Secret>,
    pub pool_max_size: u32,
    pub pool_min_idle: u32,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub application_name: String,
}

impl ConnectSettings {
    /// Where we connect, without credentials, for error messages and logs.
    pub fn display_target(&self) -> String {
        redact_url(self.url.expose())
    }

    /// The libpq URL with application name, connect timeout and password: a secret.
    pub fn full_url(&self) -> Secret {
        let mut url = self.url.expose().to_string();
        let separator = if url.contains('?') { '&' } else { '?' };
        url.push(separator);
        url.push_str("application_name=");
        url.push_str(&percent_encode(&self.application_name));
        url.push_str(&format!(
            "&connect_timeout={}",
            self.connect_timeout.as_secs().max(1)
        ));
        if let Some(password) = &self.password {
            url.push_str("&password=");
            url.push_str(&percent_encode(password.expose()));
        }
        Secret::new(url)
    }
}

/// The fencing epoch this process writes under, once the daemon has read it from its database
/// (-1: not yet). Every connection a pool opens afterwards declares it, whichever pool (main or
/// an institution's): the HA guard then refuses the process's writes once a cutover has moved
/// the database to a later epoch.
static PROCESS_EPOCH: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);

/// Sets the epoch every connection opened from now on declares (see [`PROCESS_EPOCH`]).
pub fn set_process_epoch(epoch: i64) {
    assert!(epoch >= 0, "fencing epochs are never negative");
    PROCESS_EPOCH.store(epoch, std::sync::atomic::Ordering::SeqCst);
}

fn process_epoch() -> Option<i64> {
    let epoch = PROCESS_EPOCH.load(std::sync::atomic::Ordering::SeqCst);
    (epoch >= 0).then_some(epoch)
}

/// Applies per-connection settings when the pool opens a connection.
#[derive(Debug)]
struct SessionSettings {
    statement_timeout: Duration,
}

impl r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for SessionSettings {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        // Integers only: nothing from outside reaches this string.
        conn.batch_execute(&format!(
            "SET statement_timeout = {}; SET TIME ZONE 'UTC'",
            self.statement_timeout.as_millis()
        ))
        .map_err(diesel::r2d2::Error::QueryError)?;
        if let Some(epoch) = process_epoch() {
            crate::ha::claim_epoch(conn, epoch).map_err(diesel::r2d2::Error::QueryError)?;
        }
        Ok(())
    }
}

/// Opens a pool and proves it works with one round trip, so a wrong URL fails at start with one
/// clear line instead of at the first request.
/// Once [`set_process_epoch`] ran, every connection declares that fencing epoch.
pub fn connect(settings: &ConnectSettings) -> Result<Pool, DbError> {
    let manager = ConnectionManager::<PgConnection>::new(settings.full_url().expose());
    let pool = r2d2::Pool::builder()
        .max_size(settings.pool_max_size)
        .min_idle(Some(settings.pool_min_idle))
        .connection_timeout(settings.connect_timeout)
        .test_on_check_out(false)
        .connection_customizer(Box::new(SessionSettings {
            statement_timeout: settings.statement_timeout,
        }))
        .build_unchecked(manager);
    // r2d2 hides the underlying error behind "timed out"; a direct connection attempt gives the
    // operator libpq's own reason (refused, unknown host, authentication failed...).
    let mut probe =
        PgConnection::establish(settings.full_url().expose()).map_err(|e| DbError::Connect {
            target: settings.display_target(),
            reason: first_line(&e.to_string()),
        })?;
    diesel::sql_query("SELECT 1")
        .execute(&mut probe)
        .map_err(|e| DbError::Connect {
            target: settings.display_target(),
            reason: first_line(&e.to_string()),
        })?;
    Ok(pool)
}

/// One connection outside any pool (kunpayctl, tests).
pub fn connect_one(settings: &ConnectSettings) -> Result<PgConnection, DbError> {
    PgConnection::establish(settings.full_url().expose()).map_err(|e| DbError::Connect {
        target: settings.display_target(),
        reason: first_line(&e.to_string()),
    })
}

pub fn checkout(pool: &Pool, timeout: Duration) -> Result<PooledConnection, DbError> {
    pool.get_timeout(timeout)
        .map_err(|_| DbError::PoolTimeout(timeout))
}

/// Names of the migrations this binary has that the database lacks.
pub fn pending_migrations(conn: &mut PgConnection) -> Result<Vec<String>, DbError> {
    let pending = conn
        .pending_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(pending.iter().map(|m| m.name().to_string()).collect())
}

/// Applies pending migrations under an advisory lock; returns the names applied.
pub fn migrate(conn: &mut PgConnection) -> Result<Vec<String>, DbError> {
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")).execute(conn)?;
    // Names ("2026-11-22-000001_node_run") rather than bare versions: they say what changed,
    // and a 14-digit version would be masked in logs as if it were a card number.
    let result = pending_migrations(conn).and_then(|names| {
        conn.run_pending_migrations(MIGRATIONS)
            .map_err(|e| DbError::Migration(e.to_string()))?;
        // Every replicated table carries the HA write guard, including tables a migration just
        // added without knowing about it (src/ha/mod.rs).
        crate::ha::install_guards(conn)
            .map_err(|e| DbError::Migration(format!("installing the HA write guard: {e}")))?;
        Ok(names)
    });
    // Unlock even when the migration failed, or the next attempt would wait forever.
    let unlock =
        diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).execute(conn);
    let applied = result?;
    unlock?;
    Ok(applied)
}

/// Refuses to run against a schema older than the binary.
pub fn ensure_schema_current(conn: &mut PgConnection) -> Result<(), DbError> {
    let pending = pending_migrations(conn)?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(DbError::SchemaBehind {
            pending: pending.len(),
            names: pending.join(", "),
        })
    }
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = schema::node_run)]
pub struct NodeRun {
    pub run_id: i64,
    pub node_id: String,
    pub version: String,
    pub pid: i32,
    pub role: String,
    pub started_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub stop_reason: Option<String>,
}

/// Records this process's start; the returned id is what /health looks for.
pub fn record_start(conn: &mut PgConnection, node_id: &str, role: Role) -> Result<i64, DbError> {
    use schema::node_run::dsl;
    let run_id = diesel::insert_into(dsl::node_run)
        .values((
            dsl::node_id.eq(node_id),
            dsl::version.eq(env!("CARGO_PKG_VERSION")),
            dsl::pid.eq(std::process::id() as i32),
            dsl::role.eq(role.to_string()),
            dsl::started_at.eq(Utc::now()),
        ))
        .returning(dsl::run_id)
        .get_result(conn)?;
    Ok(run_id)
}

pub fn record_ready(conn: &mut PgConnection, run_id: i64) -> Result<(), DbError> {
    use schema::node_run::dsl;
    let updated = diesel::update(dsl::node_run.find(run_id).filter(dsl::ready_at.is_null()))
        .set(dsl::ready_at.eq(Utc::now()))
        .execute(conn)?;
    debug_assert!(updated <= 1, "run_id is a primary key");
    Ok(())
}

pub fn record_stop(conn: &mut PgConnection, run_id: i64, reason: &str) -> Result<(), DbError> {
    use schema::node_run::dsl;
    let reason: String = reason.chars().take(200).collect();
    diesel::update(dsl::node_run.find(run_id).filter(dsl::stopped_at.is_null()))
        .set((dsl::stopped_at.eq(Utc::now()), dsl::stop_reason.eq(reason)))
        .execute(conn)?;
    Ok(())
}

/// The health probe: one indexed read of this node's run row, bounded by `timeout` both for
/// getting a connection and for the statement itself.
pub fn probe(pool: &Pool, run_id: i64, timeout: Duration) -> Result<(), DbError> {
    use schema::node_run::dsl;
    let mut conn = checkout(pool, timeout)?;
    conn.transaction(|conn| {
        conn.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis()
        ))?;
        dsl::node_run
            .find(run_id)
            .select(dsl::run_id)
            .first::<i64>(conn)
    })?;
    Ok(())
}

pub fn recent_runs(
    conn: &mut PgConnection,
    node_id: &str,
    limit: i64,
) -> Result<Vec<NodeRun>, DbError> {
    use schema::node_run::dsl;
    Ok(dsl::node_run
        .filter(dsl::node_id.eq(node_id))
        .order(dsl::run_id.desc())
        .limit(limit)
        .select(NodeRun::as_select())
        .load(conn)?)
}

/// `postgres://user:pw@host:5432/db?x=y` -> `postgres://user@host:5432/db`
pub fn redact_url(url: &str) -> String {
    let without_query = url.split('?').next().unwrap_or(url);
    match without_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or("");
                    format!("{user}@{host}")
                }
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => "(unparsable database URL)".to_string(),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_string()
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_for_messages() {
        assert_eq!(
            redact_url("postgres://kunpay:pw@db:5432/kunpay?sslmode=require"),
            "postgres://kunpay@db:5432/kunpay"
        );
        assert_eq!(redact_url("postgres://db/kunpay"), "postgres://db/kunpay");
    }

    #[test]
    fn passwords_are_percent_encoded_into_the_url() {
        let settings = ConnectSettings {
            url: Secret::new("postgres://kunpay@db/kunpay".into()),
            password: Some(Secret::new("p@ss w&rd".into())),
            pool_max_size: 1,
            pool_min_idle: 0,
            connect_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(1),
            application_name: "kunpayd node-a".into(),
        };
        assert_eq!(
            settings.full_url().expose(),
            "postgres://kunpay@db/kunpay?application_name=kunpayd%20node-a&connect_timeout=3&password=p%40ss%20w%26rd"
        );
        assert_eq!(settings.display_target(), "postgres://kunpay@db/kunpay");
    }
}
