//! The notification tables: what is due, each attempt, and the operators' list and replay.
//! Every change of a notification is written with its attempt row in one database transaction.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::db::schema::{notification, notification_attempt};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = notification)]
pub struct Notification {
    pub event_id: Uuid,
    pub txn_id: Uuid,
    pub inst_id: String,
    pub txn_state: String,
    pub status: String,
    pub attempts: i32,
    pub next_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = notification_attempt)]
pub struct Attempt {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub txn_state: String,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// After an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Delivered,
    RetryAt(DateTime<Utc>),
    Dead,
}

/// Errors are stored cut to the column's size.
fn cut(text: &str) -> &str {
    match text.char_indices().nth(300) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// An institution's pending notifications whose time has come, oldest first.
pub fn due(
    conn: &mut PgConnection,
    inst_id: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> QueryResult<Vec<Notification>> {
    notification::table
        .filter(notification::inst_id.eq(inst_id))
        .filter(notification::status.eq("PENDING"))
        .filter(notification::next_at.le(now))
        .order(notification::next_at.asc())
        .limit(limit)
        .select(Notification::as_select())
        .load(conn)
}

/// Records one attempt and moves the notification on, compare-and-set on its attempt count
/// so two notifiers (never configured, but an operator's replay may race) cannot both count.
#[allow(clippy::too_many_arguments)]
pub fn record_attempt(
    conn: &mut PgConnection,
    n: &Notification,
    attempt: i32,
    txn_state: &str,
    http_status: Option<u16>,
    error: Option<&str>,
    took: std::time::Duration,
    next: Next,
    now: DateTime<Utc>,
) -> QueryResult<bool> {
    assert_eq!(attempt, n.attempts + 1, "attempts are counted one by one");
    conn.transaction(|conn| {
        let target = notification::table
            .filter(notification::event_id.eq(n.event_id))
            .filter(notification::status.eq("PENDING"))
            .filter(notification::attempts.eq(n.attempts));
        let moved = match next {
            Next::Delivered => diesel::update(target)
                .set((
                    notification::status.eq("DELIVERED"),
                    notification::attempts.eq(attempt),
                    notification::finished_at.eq(Some(now)),
                    notification::last_error.eq(None::<String>),
                ))
                .execute(conn)?,
            Next::RetryAt(at) => diesel::update(target)
                .set((
                    notification::attempts.eq(attempt),
                    notification::next_at.eq(at),
                    notification::last_error.eq(error.map(cut)),
                ))
                .execute(conn)?,
            Next::Dead => diesel::update(target)
                .set((
                    notification::status.eq("DEAD"),
                    notification::attempts.eq(attempt),
                    notification::finished_at.eq(Some(now)),
                    notification::last_error.eq(error.map(cut)),
                ))
                .execute(conn)?,
        };
        if moved == 0 {
            return Ok(false);
        }
        diesel::insert_into(notification_attempt::table)
            .values((
                notification_attempt::event_id.eq(n.event_id),
                notification_attempt::attempt.eq(attempt),
                notification_attempt::at.eq(now),
                notification_attempt::txn_state.eq(txn_state),
                notification_attempt::http_status.eq(http_status.map(i32::from)),
                notification_attempt::error.eq(error.map(cut)),
                notification_attempt::duration_ms.eq(took.as_millis().min(i32::MAX as u128) as i32),
            ))
            .execute(conn)?;
        Ok(true)
    })
}

/// The institution has no callback URL: nothing to send (the query API answers instead).
pub fn skip(conn: &mut PgConnection, event_id: Uuid, now: DateTime<Utc>) -> QueryResult<()> {
    diesel::update(
        notification::table
            .filter(notification::event_id.eq(event_id))
            .filter(notification::status.eq("PENDING")),
    )
    .set((
        notification::status.eq("SKIPPED"),
        notification::finished_at.eq(Some(now)),
        notification::last_error.eq(Some("the institution has no callback_url")),
    ))
    .execute(conn)?;
    Ok(())
}

/// Given up without an attempt (the transaction is gone: restored from a backup?).
pub fn finish_dead(
    conn: &mut PgConnection,
    n: &Notification,
    now: DateTime<Utc>,
    why: &str,
) -> QueryResult<()> {
    diesel::update(
        notification::table
            .filter(notification::event_id.eq(n.event_id))
            .filter(notification::status.eq("PENDING")),
    )
    .set((
        notification::status.eq("DEAD"),
        notification::finished_at.eq(Some(now)),
        notification::last_error.eq(Some(cut(why))),
    ))
    .execute(conn)?;
    Ok(())
}

/// Notifications for operators, newest first.
pub fn list(
    conn: &mut PgConnection,
    status: Option<&str>,
    inst_id: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<Notification>> {
    let mut query = notification::table
        .select(Notification::as_select())
        .order(notification::created_at.desc())
        .limit(limit)
        .into_boxed();
    if let Some(status) = status {
        query = query.filter(notification::status.eq(status.to_string()));
    }
    if let Some(inst_id) = inst_id {
        query = query.filter(notification::inst_id.eq(inst_id.to_string()));
    }
    query.load(conn)
}

pub fn get(conn: &mut PgConnection, event_id: Uuid) -> QueryResult<Option<Notification>> {
    notification::table
        .find(event_id)
        .select(Notification::as_select())
        .first(conn)
        .optional()
}

pub fn attempts(conn: &mut PgConnection, event_id: Uuid) -> QueryResult<Vec<Attempt>> {
    notification_attempt::table
        .filter(notification_attempt::event_id.eq(event_id))
        .order(notification_attempt::id.asc())
        .select(Attempt::as_select())
        .load(conn)
}

/// Sends a DEAD, SKIPPED or DELIVERED notification once more, now (attempts keep counting, so
/// a replay past the schedule's end that fails is dead again at once). False if there is no
/// such notification or it is still pending.
pub fn replay(conn: &mut PgConnection, event_id: Uuid, now: DateTime<Utc>) -> QueryResult<bool> {
    let moved = diesel::update(
        notification::table
            .filter(notification::event_id.eq(event_id))
            .filter(notification::status.ne("PENDING")),
    )
    .set((
        notification::status.eq("PENDING"),
        notification::next_at.eq(now),
        notification::finished_at.eq(None::<DateTime<Utc>>),
    ))
    .execute(conn)?;
    Ok(moved == 1)
}
