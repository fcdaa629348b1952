//! The role watcher: follows this node's database role row while the daemon runs.
//!
//! Owns: noticing that a cutover changed this node's standing (role or fencing epoch) and
//! telling the main loop what to do: promote in place (a standby's database became ACTIVE at a
//! higher epoch) or stop for a restart (anything else, including the old active's fence); and
//! a planned cutover's drain on the active node (refuse new business requests, wait until none
//! is in flight, report it in the role row).
//! Must never: let a process keep serving business after its database's standing changed (it
//! must restart, or be promoted with fresh connections that claim the new epoch); report a
//! drain while a business request is still in flight; act on a role row it could not read
//! (a failed read changes nothing: the guard in the database is what refuses writes).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::db;
use crate::ha::{NodeRole, RoleRecord};
use crate::ops::NodeState;

/// How often the role row is read. The cutover waits on this twice (drain, promotion), so it
/// is a direct part of the write unavailability a planned cutover causes; one indexed
/// single-row read per period is nothing next to the business load.
pub const ROLE_WATCH_EVERY: Duration = Duration::from_millis(100);

/// What the main loop must do about a changed standing.
#[derive(Debug)]
pub enum RoleEvent {
    /// A standby whose database was promoted: start taking business with connections that
    /// claim the new epoch.
    Promote(RoleRecord),
    /// Any other change: stop (draining what is in flight) and let the service manager start
    /// kunpayd again, which reads the new standing from scratch.
    Restart { from: RoleRecord, to: RoleRecord },
}

/// Whether `to` is a promotion of a node that started (or runs) as a standby from `from`:
/// ACTIVE at a higher epoch than it had. A promotion never happens at the same epoch
/// (`ha::set_role` refuses it), so an equal epoch is not one.
pub fn is_promotion(from: &RoleRecord, to: &RoleRecord) -> bool {
    from.role != NodeRole::Active && to.role == NodeRole::Active && to.epoch > from.epoch
}

/// Starts the watcher. `serving_active` says whether this process takes business now; its
/// `standing` is the role row as the process started under it.
pub fn spawn_watcher(
    pool: db::Pool,
    state: Arc<NodeState>,
    standing: RoleRecord,
    serving_active: bool,
) -> mpsc::Receiver<RoleEvent> {
    // One event is all the main loop ever needs before it acts; the watcher ends after a
    // restart event and blocks on a promotion until the main loop took it.
    let (events, receiver) = mpsc::channel(1);
    tokio::spawn(watch(pool, state, standing, serving_active, events));
    receiver
}

async fn watch(
    pool: db::Pool,
    state: Arc<NodeState>,
    mut standing: RoleRecord,
    mut serving_active: bool,
    events: mpsc::Sender<RoleEvent>,
) {
    let mut ticker = tokio::time::interval(ROLE_WATCH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u64 = 0;
    loop {
        ticker.tick().await;
        if events.is_closed() {
            // The main loop has left (the process is stopping): nothing would act on a change,
            // and the database may be going away with the process (`make run`).
            return;
        }
        let read = {
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<RoleRecord> {
                let mut conn = db::checkout(&pool, Duration::from_secs(1))?;
                crate::ha::read_role(&mut conn)
            })
            .await
        };
        let now = match read {
            Ok(Ok(record)) => {
                failures = 0;
                record
            }
            Ok(Err(e)) => {
                failures += 1;
                // The first failure and then every ~10 s: the health endpoints already say
                // the database is down; this says the watcher is blind meanwhile.
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(error = %format!("{e:#}"), failures,
                        "cannot read this node's role from its database; nothing changes until it can be read");
                }
                continue;
            }
            Err(join) => {
                tracing::error!(error = %join, "the role watcher's read panicked");
                continue;
            }
        };
        if !now.same_standing(&standing) {
            if !serving_active && is_promotion(&standing, &now) {
                tracing::warn!(
                    from = %standing.role, from_epoch = standing.epoch,
                    epoch = now.epoch, reason = %now.reason,
                    "this node's database was promoted to ACTIVE: taking business"
                );
                standing = now.clone();
                serving_active = true;
                if events.send(RoleEvent::Promote(now)).await.is_err() {
                    return;
                }
                continue;
            }
            tracing::warn!(
                from = %standing.role, from_epoch = standing.epoch,
                to = %now.role, epoch = now.epoch, reason = %now.reason,
                "this node's database changed its role: stopping so kunpayd starts again in the new role"
            );
            // Whatever else happens, this process takes no business from now on.
            state.begin_handover();
            let _ = events
                .send(RoleEvent::Restart {
                    from: standing,
                    to: now,
                })
                .await;
            return;
        }
        if serving_active {
            follow_drain(&pool, &state, &now).await;
        }
    }
}

/// The drain half of a planned cutover on the active node.
async fn follow_drain(pool: &db::Pool, state: &Arc<NodeState>, now: &RoleRecord) {
    match (now.drain_requested_at, now.drained_at) {
        (Some(requested_at), drained_at) => {
            if !state.is_handing_over() {
                state.begin_handover();
                tracing::warn!(
                    in_flight = state.business_in_flight(),
                    "planned cutover: draining (business requests and /primary answer 503; in-flight requests finish)"
                );
            }
            if drained_at.is_none() && state.business_in_flight() == 0 {
                let pool = pool.clone();
                let reported = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
                    let mut conn = db::checkout(&pool, Duration::from_secs(1))?;
                    Ok(crate::ha::report_drained(&mut conn, requested_at)?)
                })
                .await;
                match reported {
                    Ok(Ok(true)) => {
                        tracing::warn!(
                            "planned cutover: drained, nothing in flight; waiting to be fenced"
                        )
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %format!("{e:#}"), "planned cutover: cannot report the drain; trying again")
                    }
                    Err(join) => tracing::error!(error = %join, "reporting the drain panicked"),
                }
            }
        }
        (None, _) => {
            if state.is_handing_over() {
                state.end_handover();
                tracing::warn!("planned cutover withdrawn before the fence: taking business again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: NodeRole, epoch: i64) -> RoleRecord {
        RoleRecord {
            role,
            epoch,
            changed_at: chrono::Utc::now(),
            reason: "test".into(),
            drain_requested_at: None,
            drained_at: None,
        }
    }

    #[test]
    fn only_a_standby_raised_to_active_at_a_higher_epoch_is_a_promotion() {
        use NodeRole::*;
        assert!(is_promotion(&record(Standby, 1), &record(Active, 2)));
        assert!(is_promotion(&record(Fenced, 2), &record(Active, 3)));
        assert!(!is_promotion(&record(Standby, 2), &record(Active, 2)));
        assert!(!is_promotion(&record(Active, 1), &record(Active, 2)));
        assert!(!is_promotion(&record(Standby, 1), &record(Fenced, 2)));
        assert!(!is_promotion(&record(Standby, 1), &record(Standby, 2)));
    }
}
