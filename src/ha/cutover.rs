//! A planned cutover and its rollback, as library functions for `kunpayctl cutover` and
//! `kunpayctl rollback`: [`dry_run`] checks both databases and lists what each step would do,
//! changing nothing; [`execute`] does it, reporting every step with its duration.
//!
//! Owns: the order of the steps and the checks before them. Before the pause, the pre-verify
//! digests both databases in full and follows them (`verify.rs`), so the verify step in the pause
//! re-reads only what changed since; it never refuses (without it the verify step reads every
//! row). Then, still serving, "close the gap" waits until the standby has applied what the
//! active wrote meanwhile (the pre-verify's reads slow the copy), so the pause does not start
//! with a backlog; a standby that cannot catch up under the load is refused there, before
//! anything changed. The order is the safety argument:
//! drain the old active (503 on /primary, in-flight work finishes) -> fence it (FENCED at the new
//! epoch: from here nothing writes there) -> note its flushed WAL position -> wait until the
//! standby has applied everything up to that position -> verify both databases table by table
//! (rows and SM3) -> move the standby's sequences past the copied ids -> start the reverse copy
//! (slot on the standby, position in the fenced old active, started while both are quiet) ->
//! promote the standby (ACTIVE at the new epoch) -> make the old active its STANDBY (its daemon
//! restarts and copies from the new active) -> drop the old direction's slot. Rollback is the
//! same in reverse.
//! A failure before the promotion puts the old active back (ACTIVE at the next epoch, its
//! drain withdrawn, a half-made reverse copy removed) and reports a refusal; only a failure
//! that cannot be put back is reported as failed, with what a person must decide.
//! Must never: promote before the fence and the catch-up; promote at an epoch not above both
//! databases' epochs; change anything in a dry run; leave both databases ACTIVE (the old one
//! is fenced before the new one is promoted, and put back only while the new one is not).

use std::time::{Duration, Instant};

use diesel::pg::PgConnection;

use super::decode::Lsn;
use super::{NodeRole, guard_is_current, read_role, unguarded_tables};
use super::{cdc, verify};

#[derive(Debug, Clone)]
pub struct CutoverSettings {
    /// The slot the standby's applier reads on the active; the reverse copy uses the same name
    /// on the new active (`ha.slot` is the same on both nodes).
    pub slot: String,
    /// Refuse when the standby is further behind than this (Patroni's default: 1 MB).
    pub max_lag_bytes: u64,
    pub max_lag_seconds: f64,
    /// How long the old active may take to finish the business requests in flight.
    pub drain_timeout: Duration,
    /// How long the standby may take to apply everything up to the fence.
    pub catch_up_timeout: Duration,
    /// Statement timeout on every connection the cutover opens (the digests read whole tables).
    pub statement_timeout: Duration,
}

/// The reason a cutover writes on the old active when it makes it the standby of the new one;
/// a rollback checks for it.
pub const DEMOTED_REASON_PREFIX: &str = "cutover: standby of the new active";

/// One check or step, timed, with what was found.
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
        if !(a.is_empty() && s.is_empty()) {
            return Ok((
                false,
                format!(
                    "unguarded on the active: {a:?}, on the standby: {s:?}; run `kunpayctl db migrate`"
                ),
            ));
        }
        let outdated: Vec<&str> = [
            ("the active", guard_is_current(active)?),
            ("the standby", guard_is_current(standby)?),
        ]
        .into_iter()
        .filter(|(_, current)| !current)
        .map(|(which, _)| which)
        .collect();
        Ok(if outdated.is_empty() {
            (
                true,
                "every replicated table is guarded on both, by this version's guard".into(),
            )
        } else {
            (
                false,
                format!(
                    "the write guard on {} is not this version's (the fence step counts on it taking a \
                     transaction id before it reads the role); run `kunpayctl db migrate` there",
                    outdated.join(" and ")
                ),
            )
        })
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
        "pre-verify while serving: digest both databases in full and follow their changes (own slots), so the verify in the pause re-reads only rows written since".to_string(),
        "close the gap while serving: let the digests follow, then wait until the standby has applied what the active had written (in rounds, until one is short or they stop shrinking), so the pause starts with little to copy and re-read".to_string(),
        "drain the old active: /primary answers 503 so F5 stops sending; wait for in-flight requests".to_string(),
        format!("fence the old active's database: FENCED at epoch {new_epoch} (every write there is refused from now on)"),
        "note the old active's flushed WAL position (the fence position)".to_string(),
        "wait until the standby has applied everything up to the fence position".to_string(),
        "verify both databases table by table: row counts and SM3 digests equal (re-reading only rows changed since the pre-verify)".to_string(),
        "move the standby's serial sequences past the copied ids".to_string(),
        "start the reverse copy while both are quiet: slot on the standby, position in the fenced old active, both proved equal".to_string(),
        format!("promote the standby's database: ACTIVE at epoch {new_epoch}; its node answers 200 on /primary"),
        format!("make the old active's database STANDBY at epoch {new_epoch}: its kunpayd restarts and copies from the new active (rollback = the same in reverse)"),
        "drop the old direction's slot on the old active".to_string(),
    ];
    Plan {
        checks,
        steps,
        new_epoch,
    }
}

/// A cutover, or the rollback of the last one (the same steps; a rollback also checks that the
/// standby is the old active of the last cutover and that nothing moved the epochs since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cutover,
    Rollback,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cutover => "cutover",
            Kind::Rollback => "rollback",
        }
    }
}

/// A step of [`execute`] reports what a check does.
pub type Step = Check;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The standby is ACTIVE at `epoch`, the old active its standby.
    Done { epoch: i64 },
    /// Nothing changed, or everything changed was put back: the old active serves.
    Refused { reason: String },
    /// A step failed and could not be put back: a person must decide (the reason says what).
    Failed { reason: String },
}

#[derive(Debug, Clone)]
pub struct Execution {
    pub plan: Plan,
    pub steps: Vec<Step>,
    pub outcome: Outcome,
    /// From the drain request (the old active's last new business) to the promotion (the new
    /// active's first): the business write pause this cutover caused, before F5 notices.
    pub write_pause: Option<Duration>,
}

fn open(url: &str, statement_timeout: Duration, which: &str) -> anyhow::Result<PgConnection> {
    super::connect_for(url, statement_timeout, which, "kunpayctl cutover")
}

struct Runner<'a> {
    steps: Vec<Step>,
    on_step: &'a mut dyn FnMut(&Step),
}

impl Runner<'_> {
    /// Runs one step; `Err` carries the reason the cutover stops there.
    fn step<T>(
        &mut self,
        name: &'static str,
        run: impl FnOnce() -> anyhow::Result<(T, String)>,
    ) -> Result<T, String> {
        let started = Instant::now();
        let result = run();
        let (ok, detail, value) = match result {
            Ok((value, detail)) => (true, detail, Some(value)),
            Err(e) => (false, format!("{e:#}"), None),
        };
        let step = Step {
            name,
            ok,
            detail: detail.clone(),
            took: started.elapsed(),
        };
        (self.on_step)(&step);
        self.steps.push(step);
        value.ok_or(detail)
    }
}

/// Refresh rounds the pre-verify runs after its full digests, each catching up with what was
/// written during the one before (shorter each time while the databases keep up).
const PRE_VERIFY_ROUNDS: usize = 4;
/// Rows re-read in a round below which another round gains nothing worth waiting for.
const PRE_VERIFY_SETTLED_ROWS: usize = 2_000;

/// The pre-verify step: never refuses; without it (`None`) the verify step reads every row in
/// the pause. The text says which, and why.
fn pre_verify(
    active_url: &str,
    standby_url: &str,
    settings: &CutoverSettings,
) -> (Option<verify::Incremental>, String) {
    let fallback = "the verify step reads every row in the write pause";
    let mut started =
        match verify::Incremental::start(active_url, standby_url, settings.statement_timeout) {
            Ok(started) => started,
            Err(e) => return (None, format!("not available ({e:#}): {fallback}")),
        };
    let rows = |digests: Vec<super::TableDigest>| digests.iter().map(|d| d.rows).sum::<u64>();
    let mut rounds = Vec::new();
    for _ in 0..PRE_VERIFY_ROUNDS {
        match started.refresh() {
            Ok((a, s)) => {
                rounds.push(format!("{a}+{s}"));
                if a + s < PRE_VERIFY_SETTLED_ROWS {
                    break;
                }
            }
            Err(e) => {
                started.finish();
                return (
                    None,
                    format!("following the changes failed ({e:#}): {fallback}"),
                );
            }
        }
    }
    let detail = format!(
        "both databases digested while serving ({} rows on the active, {} on the standby); rows \
         re-read per refresh (active+standby): {}; the verify step re-reads only what is written from here",
        rows(started.active.digests()),
        rows(started.standby.digests()),
        rounds.join(", ")
    );
    (Some(started), detail)
}

/// What a failed cutover must undo before it can report a refusal.
struct Undo<'a> {
    settings: &'a CutoverSettings,
    /// The epoch the cutover moved to: the old active comes back above it.
    epoch: i64,
    /// Whether the old active was fenced (or demoted) yet.
    fenced: bool,
    /// Whether a reverse copy (slot on the standby, position on the old active) may exist.
    reverse_started: bool,
}

impl Undo<'_> {
    /// Puts the old active back; the text says what was put back.
    fn run(&self, active: &mut PgConnection, standby: &mut PgConnection) -> anyhow::Result<String> {
        let mut done = Vec::new();
        let standby_role = read_role(standby)?;
        anyhow::ensure!(
            standby_role.role != NodeRole::Active,
            "the standby's database is ACTIVE (epoch {}): it was promoted, so the old active is not put back",
            standby_role.epoch
        );
        if self.reverse_started {
            let standby_id = cdc::source_id(standby)?;
            retry_while_busy(|| cdc::drop_slot(standby, &self.settings.slot))?;
            cdc::forget_position(active, &standby_id, &self.settings.slot)?;
            done.push("the reverse copy's slot and position removed");
        }
        let now = read_role(active)?;
        if self.fenced && now.role != NodeRole::Active {
            let back = now.epoch.max(self.epoch) + 1;
            super::set_role(
                active,
                NodeRole::Active,
                back,
                "cutover refused after the fence: the old active serves again",
            )?;
            done.push(
                "the old active is ACTIVE again, one epoch higher (its kunpayd restarts into it)",
            );
        } else if super::cancel_drain(active)? > 0 {
            done.push("the drain request withdrawn: the old active takes business again");
        }
        Ok(if done.is_empty() {
            "nothing had changed".into()
        } else {
            done.join("; ")
        })
    }
}

/// Retries `run` for a few seconds while PostgreSQL says the slot is in use (an applier is in
/// the middle of reading it).
fn retry_while_busy<T>(mut run: impl FnMut() -> diesel::QueryResult<T>) -> diesel::QueryResult<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match run() {
            Err(e) if Instant::now() < deadline && e.to_string().contains("is active for PID") => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Polls `done` every 20 ms until it says yes or `timeout` passes.
fn wait_for(
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = done()? {
            return Ok(Some(found));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Some(what it holds) once the standby has applied everything up to `position` of the active.
fn standby_holds(
    active: &mut PgConnection,
    standby: &mut PgConnection,
    slot: &str,
    position: Lsn,
) -> anyhow::Result<Option<String>> {
    let status = cdc::status(active, standby, slot)?;
    let complete = status
        .position
        .as_ref()
        .map(|p| Lsn(p.applied_lsn.max(p.complete_lsn).max(0) as u64))
        .unwrap_or_default();
    Ok((complete >= position).then(|| {
        format!(
            "the standby holds everything up to {complete} ({} transactions applied in all)",
            status.position.as_ref().map_or(0, |p| p.transactions)
        )
    }))
}

/// Catch-up rounds before the drain: each waits until the standby holds what the active had
/// flushed when the round began, and the next copies what was written meanwhile. They stop
/// once a round is this short (what is left is about what the pause would copy anyway)...
const GAP_SETTLED: Duration = Duration::from_millis(300);
/// ...or when a round was not clearly shorter than the one before (the copy only just keeps
/// up with this load: more rounds gain nothing, and the pause will copy about one round's
/// writes), or after this many.
const GAP_ROUNDS: usize = 4;

/// The "close the gap" step (see `execute`); Err refuses the cutover before anything changed.
/// The digests follow first, so that the last thing before the drain is the catch-up.
fn close_the_gap(
    active: &mut PgConnection,
    standby: &mut PgConnection,
    incremental: &mut Option<verify::Incremental>,
    settings: &CutoverSettings,
) -> anyhow::Result<((), String)> {
    let digests = match incremental.as_mut().map(|following| following.refresh()) {
        None => String::new(),
        Some(Ok((on_active, on_standby))) => format!(
            "; the digests followed first ({on_active} rows re-read on the active, {on_standby} on the standby)"
        ),
        Some(Err(e)) => {
            if let Some(following) = incremental.take() {
                following.finish();
            }
            format!(
                "; following the changes failed ({e:#}): the verify step reads every row in the write pause"
            )
        }
    };
    let mut rounds: Vec<Duration> = Vec::new();
    let mut verdict = "";
    for _ in 0..GAP_ROUNDS {
        let started = Instant::now();
        let written = cdc::flush_lsn(active)?;
        let caught = wait_for(settings.catch_up_timeout, || {
            standby_holds(active, standby, &settings.slot, written)
        })?;
        anyhow::ensure!(
            caught.is_some(),
            "the standby did not apply what the active had written up to {written} within {:?} \
             while the active served: it does not keep up with this load (nothing was changed; \
             run the cutover when the load is lower, and see `kunpayctl ha status` for the lag)",
            settings.catch_up_timeout
        );
        let took = started.elapsed();
        let previous = rounds.last().copied();
        rounds.push(took);
        if took < GAP_SETTLED {
            verdict = "; settled";
            break;
        }
        if previous.is_some_and(|p| took * 3 > p * 2) {
            verdict = "; not converging: the copy only just keeps up with this load, and the pause \
                       will copy about one round's writes";
            break;
        }
    }
    Ok((
        (),
        format!(
            "the standby caught up with the serving active in {} round(s): {}{verdict}{digests}",
            rounds.len(),
            rounds
                .iter()
                .map(|r| format!("{} ms", r.as_millis()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Moves the active role from the database at `active_url` to the one at `standby_url` (see
/// the module comment for the order and why). `on_step` sees every check and step as it ends.
pub fn execute(
    kind: Kind,
    active_url: &str,
    standby_url: &str,
    settings: &CutoverSettings,
    on_step: &mut dyn FnMut(&Step),
) -> Execution {
    let mut runner = Runner {
        steps: Vec::new(),
        on_step,
    };
    let refused = |plan: Plan, steps: Vec<Step>, reason: String| Execution {
        plan,
        steps,
        outcome: Outcome::Refused { reason },
        write_pause: None,
    };
    let empty_plan = || Plan {
        checks: Vec::new(),
        steps: Vec::new(),
        new_epoch: 0,
    };
    let (mut active, mut standby) = match (
        open(active_url, settings.statement_timeout, "active"),
        open(standby_url, settings.statement_timeout, "standby"),
    ) {
        (Ok(a), Ok(s)) => (a, s),
        (Err(e), _) | (_, Err(e)) => {
            return refused(empty_plan(), Vec::new(), format!("{e:#}"));
        }
    };

    let mut plan = dry_run(&mut active, &mut standby, settings);
    if kind == Kind::Rollback {
        check(&mut plan.checks, "last cutover", || {
            let (a, s) = (read_role(&mut active)?, read_role(&mut standby)?);
            let ok = s.reason.starts_with(DEMOTED_REASON_PREFIX) && s.epoch == a.epoch;
            Ok((
                ok,
                if ok {
                    format!(
                        "the standby was the active before the cutover to epoch {}",
                        a.epoch
                    )
                } else {
                    format!(
                        "the standby is not the old active of the last cutover (its role says \"{}\" at epoch {}, \
                         the active is at epoch {}); a rollback undoes only the last cutover: use `kunpayctl cutover`",
                        s.reason, s.epoch, a.epoch
                    )
                },
            ))
        });
    }
    for c in &plan.checks {
        (runner.on_step)(c);
    }
    if let Some(refusal) = plan.refusal() {
        let reason = format!("check \"{}\" failed: {}", refusal.name, refusal.detail);
        return refused(plan, runner.steps, reason);
    }
    let epoch = plan.new_epoch;
    let mut undo = Undo {
        settings,
        epoch,
        fenced: false,
        reverse_started: false,
    };
    // 0. While business still runs: digest both databases in full and follow their changes
    // from there, so the verify step in the pause re-reads only the rows written since.
    let mut incremental = runner
        .step("pre-verify", || {
            Ok(pre_verify(active_url, standby_url, settings))
        })
        .ok()
        .flatten();
    // 0b. Still serving: the pre-verify's reads slowed the copy, so the standby is further
    // behind than the lag check saw; whatever it still lacks at the drain is copied inside the
    // pause. A standby that cannot catch up while serving is refused here, before anything
    // changed.
    if let Err(reason) = runner.step("close the gap", || {
        close_the_gap(&mut active, &mut standby, &mut incremental, settings)
    }) {
        if let Some(following) = incremental.take() {
            following.finish();
        }
        return refused(
            plan,
            runner.steps,
            format!("step \"close the gap\" failed: {reason}"),
        );
    }
    let paused_at = Instant::now();

    let result = (|| -> Result<(), String> {
        // 1. Drain: the old active answers 503 and finishes what is in flight.
        runner.step("drain", || {
            let current = read_role(&mut active)?;
            let requested = super::request_drain(&mut active, current.epoch)?;
            let drained = wait_for(settings.drain_timeout, || {
                let now = read_role(&mut active)?;
                Ok(match (now.drain_requested_at, now.drained_at) {
                    (Some(r), Some(at)) if r == requested => Some(format!(
                        "the old active refused new business and finished its requests in flight ({} ms after the request)",
                        (at - r).num_milliseconds()
                    )),
                    _ => None,
                })
            })?;
            drained.map(|d| ((), d)).ok_or_else(|| {
                anyhow::anyhow!(
                    "the old active's kunpayd did not report drained within {:?}: is it running, and is it the kunpayd \
                     of that database? (kunpayctl status on that node)",
                    settings.drain_timeout
                )
            })
        })?;
        // 2. Fence: from here nothing writes there.
        let fence = runner.step("fence", || {
            undo.fenced = true;
            super::set_role(
                &mut active,
                NodeRole::Fenced,
                epoch,
                &format!(
                    "{}: fenced at epoch {epoch}; the standby takes over",
                    kind.name()
                ),
            )?;
            // A transaction that passed the guard before the fence may still be writing and
            // commit after it: the fence position is read once every such transaction ended.
            // The pre-verify's snapshot only reads; openGauss lists it among the open ones.
            let reading = incremental.as_ref().map(|i| i.active.snapshot_pid());
            let mut open = super::open_transactions(&mut active)?;
            open.retain(|t| Some(t.pid) != reading);
            let lingering = super::wait_until_ended(&mut active, &open, settings.drain_timeout)?;
            anyhow::ensure!(
                lingering.is_empty(),
                "{} transaction(s) that may have written before the fence did not end within {:?}: {}; \
                 end them (commit, roll back, or pg_terminate_backend) and run the cutover again",
                lingering.len(),
                settings.drain_timeout,
                lingering
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let fence = cdc::flush_lsn(&mut active)?;
            Ok((
                fence,
                format!(
                    "the old active is FENCED at epoch {epoch}; {} transaction(s) open at the fence ended; \
                     fence position {fence}",
                    open.len()
                ),
            ))
        })?;
        // 3. Catch up.
        runner.step("catch up", || {
            let caught = wait_for(settings.catch_up_timeout, || {
                standby_holds(&mut active, &mut standby, &settings.slot, fence)
            })?;
            caught.map(|d| ((), d)).ok_or_else(|| {
                anyhow::anyhow!(
                    "the standby did not apply everything up to the fence position {fence} within {:?}: is its \
                     kunpayd running the CDC applier? (kunpayctl ha status on the standby)",
                    settings.catch_up_timeout
                )
            })
        })?;
        // 4. Verify.
        runner.step("verify", || {
            let followed = incremental.take().map(|mut following| {
                let refreshed = following.refresh();
                let digests = (following.active.digests(), following.standby.digests());
                following.finish();
                refreshed.map(|reread| (digests, reread))
            });
            let (a, s, how) = match followed {
                Some(Ok(((a, s), (on_active, on_standby)))) => (
                    a,
                    s,
                    format!(
                        "counts and sums of row SM3 digests equal; re-read since the pre-verify: \
                         {on_active} rows on the active, {on_standby} on the standby"
                    ),
                ),
                fallen_back => {
                    let (a, s) = super::database_digests(&mut active, &mut standby)?;
                    let how = match fallen_back {
                        Some(Err(e)) => format!(
                            "counts and SM3 digests equal (every row read: following the changes \
                             since the pre-verify failed: {e:#})"
                        ),
                        _ => "counts and SM3 digests equal (every row read)".to_string(),
                    };
                    (a, s, how)
                }
            };
            let differences = super::digest_differences(&a, &s);
            anyhow::ensure!(
                differences.is_empty(),
                "the databases differ: {}",
                differences.join("; ")
            );
            let rows: u64 = a.iter().map(|d| d.rows).sum();
            Ok(((), format!("{} tables, {rows} rows: {how}", a.len())))
        })?;
        // 5. Sequences.
        runner.step("sequences", || {
            let moved = super::advance_sequences(&mut standby)?;
            Ok((
                (),
                format!("{} sequences moved past the copied ids", moved.len()),
            ))
        })?;
        // 6. The reverse copy, started while both are still quiet (the old active stays
        // FENCED, so its own daemon runs no applier that could race this).
        runner.step("reverse CDC", || {
            undo.reverse_started = true;
            let started = Instant::now();
            loop {
                match cdc::Applier::prepare_after_verify(
                    standby_url,
                    active_url,
                    cdc::CdcSettings {
                        slot: settings.slot.clone(),
                        statement_timeout: settings.statement_timeout,
                        ..cdc::CdcSettings::default()
                    },
                ) {
                    Ok(()) => {
                        return Ok((
                            (),
                            format!(
                                "slot {} on the new active and the old active's position, from the verify step's proof",
                                settings.slot
                            ),
                        ));
                    }
                    // The standby's own applier writes its position now and then; the slot is
                    // created and the copy proved only in a quiet moment, which comes within
                    // milliseconds.
                    Err(cdc::CdcError::NotQuiet(_)) if started.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        })?;
        // 7. Promote.
        runner.step("promote", || {
            match super::set_role(
                &mut standby,
                NodeRole::Active,
                epoch,
                &format!("{}: promoted at epoch {epoch}", kind.name()),
            ) {
                Ok(_) => {}
                // The commit may have happened with only its answer lost: the database says.
                Err(e) => {
                    let now = read_role(&mut standby).map_err(|_| e)?;
                    anyhow::ensure!(
                        now.role == NodeRole::Active && now.epoch == epoch,
                        "the standby was not promoted"
                    );
                }
            }
            Ok((
                (),
                format!("the new active is ACTIVE at epoch {epoch}; its kunpayd notices and takes business"),
            ))
        })?;
        Ok(())
    })();

    let write_pause = paused_at.elapsed();
    if let Some(following) = incremental.take() {
        following.finish();
    }
    if let Err(reason) = result {
        let outcome = match undo.run(&mut active, &mut standby) {
            Ok(put_back) => Outcome::Refused {
                reason: format!("{reason} ({put_back})"),
            },
            Err(e) => Outcome::Failed {
                reason: format!(
                    "{reason}; putting the old active back failed too: {e:#}. Look at both with `kunpayctl ha status` \
                     and decide which one is ACTIVE (`kunpayctl ha set-role active --epoch N` with N above both epochs)"
                ),
            },
        };
        return Execution {
            plan,
            steps: runner.steps,
            outcome,
            write_pause: None,
        };
    }
    // 8. The old active becomes the new one's standby; its daemon restarts into it and copies
    // from the slot step 6 made. A failure here leaves it FENCED, which is safe; the report
    // says what to run.
    let _ = runner.step("demote the old active", || {
        super::set_role(
            &mut active,
            NodeRole::Standby,
            epoch,
            &format!("{DEMOTED_REASON_PREFIX} since epoch {epoch} ({})", kind.name()),
        )
        .map_err(|e| {
            e.context(format!(
                "the old active stays FENCED (safe, but it copies nothing): run `kunpayctl ha set-role standby \
                 --epoch {epoch} --reason \"{DEMOTED_REASON_PREFIX}\"` on it"
            ))
        })?;
        Ok(((), format!("the old active is STANDBY at epoch {epoch}; its kunpayd restarts and copies from the new active")))
    });
    // 9. The old direction's slot would keep WAL on the old active forever; its position on the
    // new active would be read as a gap by the next copy from there. Neither blocks the result.
    let _ = runner.step("retire the old copy", || {
        let active_id = cdc::source_id(&mut active)?;
        let dropped = retry_while_busy(|| cdc::drop_slot(&mut active, &settings.slot))
            .map_err(|e| {
                anyhow::anyhow!(
                    "slot {} on the old active could not be dropped ({e}); it keeps WAL there until \
                     `SELECT pg_drop_replication_slot('{}')` is run on the old active",
                    settings.slot,
                    settings.slot
                )
            })?;
        cdc::forget_position(&mut standby, &active_id, &settings.slot)?;
        Ok((
            (),
            if dropped {
                format!("slot {} dropped on the old active", settings.slot)
            } else {
                "no old slot to drop".into()
            },
        ))
    });
    Execution {
        plan,
        steps: runner.steps,
        outcome: Outcome::Done { epoch },
        write_pause: Some(write_pause),
    }
}
