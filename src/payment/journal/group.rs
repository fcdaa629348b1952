//! Group commit of the debit path's journal statements, per institution. While one of an
//! institution's workers runs its statement, the statements its other workers bring meanwhile
//! wait, then run together in one database transaction on the connection of one of those
//! workers (the leader). PostgreSQL's fixed cost of a transaction (start, commit record, WAL
//! flush, the HA write guard's check) is then paid once per group instead of once per
//! statement. There is no timer: a statement that finds a free leader slot and nobody waiting
//! runs alone at once, exactly as without grouping, so a quiet institution's latency does not
//! change; groups form only while the database is busy.
//!
//! Owns: the queue of waiting statements (at most one per worker of the institution: each
//! worker waits for its own statement, so the institution's `workers` bounds it), who leads,
//! the order statements run in a group (by their lock key, so two groups take the rows they
//! share in the same order), and settling every member: committed with its result, handed back
//! to run alone (one statement of the group failed, so the group rolled back and each runs
//! again by itself, where its own error reaches its own flow), or failed (the COMMIT failed:
//! whether it committed is unknown, as it is for a lone statement whose connection broke).
//! Must never: report a statement as done before its group committed; keep the result of a
//! rolled-back group; leave a member unsettled (its worker would wait for ever); hold more
//! than `max_batch` statements in one transaction or run more than `max_leaders` groups at
//! once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::Thread;

use diesel::connection::{AnsiTransactionManager, Connection, TransactionManager};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::{PgConnection, QueryResult};
use prometheus_client::metrics::counter::Counter;

/// What a statement locks, to order a group by: a debit's statements lock its agreement's row
/// and its account's usage row (keyed by the agreement), a credit's its account's usage row
/// (keyed by the account's hash). Borrowed: nothing is allocated unless the statement waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LockKey<'a> {
    kind: &'static str,
    id: &'a str,
}

impl<'a> LockKey<'a> {
    pub fn debit(agreement_no: &'a str) -> LockKey<'a> {
        LockKey {
            kind: "debit",
            id: agreement_no,
        }
    }

    pub fn credit(account_hash: &'a str) -> LockKey<'a> {
        LockKey {
            kind: "credit",
            id: account_hash,
        }
    }
}

/// What a group did (shared with /metrics: `kunpay_journal_statements`, `kunpay_journal_groups`).
#[derive(Debug, Default, Clone)]
pub struct GroupCounters {
    /// Statements that ran alone because nobody else was waiting (or grouping is off).
    pub alone: Counter,
    /// Groups of two or more statements committed, and the statements in them.
    pub groups: Counter,
    pub grouped: Counter,
    /// Groups rolled back because one statement failed (each member then ran alone).
    pub rolled_back: Counter,
    /// Groups whose COMMIT failed (every member reported the failure).
    pub commit_failed: Counter,
}

/// One institution's group commit. `max_batch` 1 turns grouping off.
pub struct Group {
    queue: Mutex<Queue>,
    max_batch: usize,
    max_leaders: usize,
    pub counters: GroupCounters,
}

struct Queue {
    waiting: VecDeque<Arc<dyn Member>>,
    leaders: usize,
}

/// A statement in the queue, seen by the leader that runs it.
trait Member: Send + Sync {
    fn lock_key(&self) -> LockKey<'_>;
    /// The worker thread waiting for it: woken when it is settled, or to lead.
    fn waiter(&self) -> &Thread;
    /// Runs the statement; its result is kept until the group is settled. False if it failed.
    fn run(&self, conn: &mut PgConnection) -> bool;
    fn settle(&self, how: &Settle);
    fn is_settled(&self) -> bool;
}

enum Settle {
    /// Alone (autocommit) or in a committed group: the result stands, error or value.
    Committed,
    /// The group rolled back: the statement's worker runs it again alone.
    RunAlone,
    /// The group's COMMIT failed.
    Failed(String),
}

enum Slot<T> {
    Waiting,
    Ran(QueryResult<T>),
    Done(QueryResult<T>),
    RunAlone,
    Failed(String),
}

struct Pending<T, F> {
    lock_kind: &'static str,
    lock_id: String,
    waiter: Thread,
    statement: F,
    slot: Mutex<Slot<T>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing runs user code while holding these locks; a poisoned one holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T, F> Member for Pending<T, F>
where
    T: Send + 'static,
    F: Fn(&mut PgConnection) -> QueryResult<T> + Send + Sync + 'static,
{
    fn lock_key(&self) -> LockKey<'_> {
        LockKey {
            kind: self.lock_kind,
            id: &self.lock_id,
        }
    }

    fn waiter(&self) -> &Thread {
        &self.waiter
    }

    fn run(&self, conn: &mut PgConnection) -> bool {
        let result = (self.statement)(conn);
        let ok = result.is_ok();
        let mut slot = lock(&self.slot);
        assert!(
            matches!(*slot, Slot::Waiting),
            "a member runs once per group"
        );
        *slot = Slot::Ran(result);
        ok
    }

    fn settle(&self, how: &Settle) {
        let mut slot = lock(&self.slot);
        let ran = std::mem::replace(&mut *slot, Slot::Waiting);
        *slot = match (how, ran) {
            (Settle::Committed, Slot::Ran(result)) => Slot::Done(result),
            (Settle::Committed, _) => unreachable!("a committed member ran"),
            (Settle::RunAlone, Slot::Waiting | Slot::Ran(_)) => Slot::RunAlone,
            (Settle::Failed(reason), Slot::Waiting | Slot::Ran(_)) => Slot::Failed(reason.clone()),
            (_, _) => unreachable!("a member is settled once"),
        };
        drop(slot);
        self.waiter.unpark();
    }

    fn is_settled(&self) -> bool {
        matches!(
            *lock(&self.slot),
            Slot::Done(_) | Slot::RunAlone | Slot::Failed(_)
        )
    }
}

impl<T, F> Pending<T, F>
where
    F: Fn(&mut PgConnection) -> QueryResult<T>,
{
    fn take(&self, conn: &mut PgConnection) -> QueryResult<T> {
        let settled = std::mem::replace(&mut *lock(&self.slot), Slot::Waiting);
        match settled {
            Slot::Done(result) => result,
            Slot::RunAlone => (self.statement)(conn),
            Slot::Failed(reason) => Err(DieselError::DatabaseError(
                DatabaseErrorKind::Unknown,
                Box::new(reason),
            )),
            Slot::Waiting | Slot::Ran(_) => unreachable!("taken only once settled"),
        }
    }
}

/// A leader's hold on its slot and its group: whatever happens (a panic included), every
/// member gets settled and the slot is given back.
struct Leading<'g> {
    group: &'g Group,
    members: Vec<Arc<dyn Member>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        for member in &self.members {
            if !member.is_settled() {
                member.settle(&Settle::Failed(
                    "the journal group's leader stopped before settling it".into(),
                ));
            }
        }
        let mut queue = lock(&self.group.queue);
        assert!(queue.leaders > 0, "a leader holds a slot");
        queue.leaders -= 1;
        // The slot is free: the longest-waiting worker takes it (one wake-up, not one per
        // waiting worker).
        let next = queue.waiting.front().map(|member| member.waiter().clone());
        drop(queue);
        if let Some(next) = next {
            next.unpark();
        }
    }
}

impl Group {
    pub fn new(max_batch: usize, max_leaders: usize) -> Group {
        Group::with_counters(max_batch, max_leaders, GroupCounters::default())
    }

    /// As [`Group::new`], counting into `counters` (the daemon's /metrics).
    pub fn with_counters(max_batch: usize, max_leaders: usize, counters: GroupCounters) -> Group {
        assert!(max_batch >= 1 && max_leaders >= 1);
        Group {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                leaders: 0,
            }),
            max_batch,
            max_leaders,
            counters,
        }
    }

    /// Each statement alone, on its own worker's connection.
    pub fn off() -> Group {
        Group::new(1, 1)
    }

    /// Whether statements may wait for each other to commit together (`max_batch` above 1).
    pub fn groups_statements(&self) -> bool {
        self.max_batch > 1
    }

    /// Runs `statement` (one statement, no transaction of its own) alone or in a group, and
    /// returns its result once it is committed. `lock_key` orders the statements of a group:
    /// statements that lock the same rows must have the same key. `conn` is this worker's
    /// connection: it may run other workers' statements while it leads.
    pub fn run<T, F>(
        &self,
        conn: &mut PgConnection,
        lock_key: LockKey<'_>,
        statement: F,
    ) -> QueryResult<T>
    where
        T: Send + 'static,
        F: Fn(&mut PgConnection) -> QueryResult<T> + Send + Sync + 'static,
    {
        // A group's transaction must be its own: inside a caller's transaction the leader would
        // put other workers' statements into it.
        assert!(
            matches!(
                AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth(),
                Ok(None)
            ),
            "a journal group statement runs outside any transaction"
        );
        if !self.groups_statements() {
            self.counters.alone.inc();
            return statement(conn);
        }
        let member = Arc::new(Pending {
            lock_kind: lock_key.kind,
            lock_id: lock_key.id.to_owned(),
            waiter: std::thread::current(),
            statement,
            slot: Mutex::new(Slot::Waiting),
        });
        let mut queue = lock(&self.queue);
        if queue.leaders < self.max_leaders && queue.waiting.is_empty() {
            queue.leaders += 1;
            drop(queue);
            let _leading = Leading {
                group: self,
                members: Vec::new(),
            };
            self.counters.alone.inc();
            return (member.statement)(conn);
        }
        queue.waiting.push_back(member.clone());
        loop {
            if member.is_settled() {
                break;
            }
            if queue.leaders < self.max_leaders && !queue.waiting.is_empty() {
                let take = queue.waiting.len().min(self.max_batch);
                let members: Vec<Arc<dyn Member>> = queue.waiting.drain(..take).collect();
                queue.leaders += 1;
                // Several leaders that finish at once all wake the same front worker; whoever
                // takes a group passes the wake-up on while slots and statements are left.
                let next = if queue.leaders < self.max_leaders {
                    queue.waiting.front().map(|member| member.waiter().clone())
                } else {
                    None
                };
                drop(queue);
                if let Some(next) = next {
                    next.unpark();
                }
                self.lead(
                    conn,
                    Leading {
                        group: self,
                        members,
                    },
                );
                queue = lock(&self.queue);
                continue;
            }
            // Woken when our statement is settled or a slot is free (or spuriously: the loop
            // checks again).
            drop(queue);
            std::thread::park();
            queue = lock(&self.queue);
        }
        drop(queue);
        member.take(conn)
    }

    fn lead(&self, conn: &mut PgConnection, mut leading: Leading<'_>) {
        debug_assert!(!leading.members.is_empty() && leading.members.len() <= self.max_batch);
        if let [alone] = leading.members.as_slice() {
            // Autocommit: one statement is its own transaction, as without grouping.
            alone.run(conn);
            alone.settle(&Settle::Committed);
            self.counters.alone.inc();
            return;
        }
        leading
            .members
            .sort_by(|a, b| a.lock_key().cmp(&b.lock_key()));
        let (mut began, mut failed_statement) = (false, false);
        let committed = conn.transaction::<(), DieselError, _>(|conn| {
            began = true;
            for member in &leading.members {
                if !member.run(conn) {
                    failed_statement = true;
                    return Err(DieselError::RollbackTransaction);
                }
            }
            Ok(())
        });
        let how = match committed {
            Ok(()) => {
                self.counters.groups.inc();
                self.counters.grouped.inc_by(leading.members.len() as u64);
                Settle::Committed
            }
            // Nothing of the group committed (it never began, or never reached COMMIT), so
            // each statement runs again alone and meets its own error there.
            Err(_) if failed_statement || !began => {
                self.counters.rolled_back.inc();
                Settle::RunAlone
            }
            Err(e) => {
                self.counters.commit_failed.inc();
                tracing::error!(error = %e, statements = leading.members.len(), "a journal group's commit failed");
                Settle::Failed(format!("the journal group's commit failed: {e}"))
            }
        };
        for member in leading.members.drain(..) {
            member.settle(&how);
        }
    }
}
