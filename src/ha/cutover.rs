//! A planned cutover's steps, as a library function for `kunpayctl cutover` (issue 8, item 3).
//! Built so far: the dry run. It checks both databases and lists what each step would do, with
//! the reason when the cutover would be refused; it changes nothing.
//!
//! Owns: the order of the steps and the checks before them. The order is the safety argument:
//! drain the old active (503 on /primary, in-flight work finishes) -> fence it (FENCED at the new
//! epoch: from here nothing writes there) -> note its flushed WAL position -> wait until the
//! standby has applied everything up to that position -> verify both databases table by table
//! (rows and SM3) -> move the standby's sequences past the copied ids -> promote it (ACTIVE at
//! the new epoch) -> make the old active the standby of the new one (reverse CDC, slot on the new
//! active, started while the new active is still quiet) so rollback is the same in reverse.
//! Must never: promote before the fence and the catch-up; promote at an epoch not above both
//! databases' epochs; change anything in a dry run.

use std::time::{Duration, Instant};

use diesel::pg::PgConnection;

use super::cdc;
use super::{NodeRole, read_role, unguarded_tables};

#[derive(Debug, Clone)]
pub struct CutoverSettings {
    /// The slot the standby's applier reads on the active.
    pub slot: String,
    /// Refuse when the standby is further behind than this (Patroni's default: 1 MB).
    pub max_lag_bytes: u64,
    pub max_lag_seconds: f64,
}

/// One check, timed, with what was found.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    pub took: Duration,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub checks: Vec<Check>,
    /// What the cutover would do, in order.
    pub steps: Vec<String>,
    /// The epoch both databases would move to: above both current ones.
    pub new_epoch: i64,
}

impl Plan {
    /// The first failed check: the cutover would refuse with this reason.
    pub fn refusal(&self) -> Option<&Check> {
        self.checks.iter().find(|c| !c.ok)
    }
}

fn check(
    checks: &mut Vec<Check>,
    name: &'static str,
    run: impl FnOnce() -> anyhow::Result<(bool, String)>,
) {
    let started = Instant::now();
    let (ok, detail) = match run() {
        Ok(result) => result,
        Err(e) => (false, format!("{e:#}")),
    };
    checks.push(Check {
        name,
        ok,
        detail,
        took: started.elapsed(),
    });
}

/// Checks everything a cutover from `active` to `standby` needs, changes nothing.
pub fn dry_run(
    active: &mut PgConnection,
    standby: &mut PgConnection,
    settings: &CutoverSettings,
) -> Plan {
    let mut checks = Vec::new();
    let mut epochs = (0i64, 0i64);
    check(&mut checks, "roles", || {
        let a = read_role(active)?;
        let s = read_role(standby)?;
        epochs = (a.epoch, s.epoch);
        let ok = a.role == NodeRole::Active && s.role == NodeRole::Standby;
        Ok((
            ok,
            format!(
                "active database is {} (epoch {}), standby database is {} (epoch {}){}",
                a.role,
                a.epoch,
                s.role,
                s.epoch,
                if ok {
                    ""
                } else {
                    "; a cutover goes from an ACTIVE to a STANDBY database"
                }
            ),
        ))
    });
    check(&mut checks, "schemas", || {
        let (a, s) = (
            cdc::schema_versions(active)?,
            cdc::schema_versions(standby)?,
        );
        Ok((
            a == s,
            if a == s {
                format!("both at {} migrations", a.len())
            } else {
                "the schemas differ; run `kunpayctl db migrate` on both nodes".into()
            },
        ))
    });
    check(&mut checks, "write guards", || {
        let (a, s) = (unguarded_tables(active)?, unguarded_tables(standby)?);
        let ok = a.is_empty() && s.is_empty();
        Ok((
            ok,
            if ok {
                "every replicated table is guarded on both".into()
            } else {
                format!(
                    "unguarded on the active: {a:?}, on the standby: {s:?}; run `kunpayctl db migrate`"
                )
            },
        ))
    });
    check(&mut checks, "CDC lag", || {
        let status = cdc::status(active, standby, &settings.slot)?;
        let Some(position) = &status.position else {
            return Ok((
                false,
                format!(
                    "the standby has no CDC position for slot {} of this active: it is not a copy of it",
                    settings.slot
                ),
            ));
        };
        if status.slot_confirmed.is_none() {
            return Ok((
                false,
                format!("slot {} is missing on the active", settings.slot),
            ));
        }
        let seconds = status.lag_seconds.unwrap_or(f64::INFINITY);
        let ok = status.lag_bytes <= settings.max_lag_bytes && seconds <= settings.max_lag_seconds;
        Ok((
            ok,
            format!(
                "{} bytes and {seconds:.1} s behind (bounds {} bytes, {} s); {} transactions applied",
                status.lag_bytes,
                settings.max_lag_bytes,
                settings.max_lag_seconds,
                position.transactions
            ),
        ))
    });
    check(&mut checks, "reverse CDC possible", || {
        let level = cdc::wal_level(standby)?;
        Ok((
            level == "logical",
            format!(
                "the standby's wal_level is {level}{}",
                if level == "logical" {
                    ": the old active can copy from it after the cutover (rollback)"
                } else {
                    "; rollback needs wal_level = logical on the standby's server too"
                }
            ),
        ))
    });
    let new_epoch = epochs.0.max(epochs.1) + 1;
    let steps = vec![
        "drain the old active: /primary answers 503 so F5 stops sending; wait for in-flight requests".to_string(),
        format!("fence the old active's database: FENCED at epoch {new_epoch} (every write there is refused from now on)"),
        "note the old active's flushed WAL position (the fence position)".to_string(),
        "wait until the standby has applied everything up to the fence position".to_string(),
        "verify both databases table by table: row counts and SM3 digests equal".to_string(),
        "move the standby's serial sequences past the copied ids".to_string(),
        format!("promote the standby's database: ACTIVE at epoch {new_epoch}; its node answers 200 on /primary"),
        format!("make the old active's database STANDBY at epoch {new_epoch} and start CDC from the new active (rollback = the same in reverse)"),
    ];
    Plan {
        checks,
        steps,
        new_epoch,
    }
}
