//! Statements whose SQL text is fixed at compile time, with their binds: diesel prepares each
//! once per connection and keeps it in its statement cache (keyed by a marker type), which it
//! does not do for `sql_query`. The journal's combined statements (several writes in one
//! round trip) are written this way, because diesel's query builder has no writable CTEs.
//!
//! Must never: splice a value into the SQL text (every value is a bind, `?` in the text).

use std::marker::PhantomData;

use chrono::{DateTime, NaiveDate, Utc};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types;
use diesel::{PgConnection, QueryResult, RunQueryDsl};
use uuid::Uuid;

/// One statement: its SQL with a `?` where each bind goes, and the SQL types of its rows.
pub trait FixedSql: 'static {
    const SQL: &'static str;
    type Row: 'static;
}

/// One bind value.
pub enum Bind<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    BigInt(i64),
    Uuid(Uuid),
    OptUuid(Option<Uuid>),
    Date(NaiveDate),
    Time(DateTime<Utc>),
    Bytes(&'a [u8]),
    Bool(bool),
}

impl Bind<'_> {
    /// The same value, owned: for a statement another thread runs (`group.rs`).
    pub fn to_owned_bind(&self) -> OwnedBind {
        match self {
            Bind::Text(value) => OwnedBind::Text((*value).to_owned()),
            Bind::OptText(value) => OwnedBind::OptText(value.map(str::to_owned)),
            Bind::BigInt(value) => OwnedBind::BigInt(*value),
            Bind::Uuid(value) => OwnedBind::Uuid(*value),
            Bind::OptUuid(value) => OwnedBind::OptUuid(*value),
            Bind::Date(value) => OwnedBind::Date(*value),
            Bind::Time(value) => OwnedBind::Time(*value),
            Bind::Bytes(value) => OwnedBind::Bytes(value.to_vec()),
            Bind::Bool(value) => OwnedBind::Bool(*value),
        }
    }
}

/// A [`Bind`] that owns its value.
#[derive(Debug, Clone)]
pub enum OwnedBind {
    Text(String),
    OptText(Option<String>),
    BigInt(i64),
    Uuid(Uuid),
    OptUuid(Option<Uuid>),
    Date(NaiveDate),
    Time(DateTime<Utc>),
    Bytes(Vec<u8>),
    Bool(bool),
}

impl OwnedBind {
    pub fn as_bind(&self) -> Bind<'_> {
        match self {
            OwnedBind::Text(value) => Bind::Text(value),
            OwnedBind::OptText(value) => Bind::OptText(value.as_deref()),
            OwnedBind::BigInt(value) => Bind::BigInt(*value),
            OwnedBind::Uuid(value) => Bind::Uuid(*value),
            OwnedBind::OptUuid(value) => Bind::OptUuid(*value),
            OwnedBind::Date(value) => Bind::Date(*value),
            OwnedBind::Time(value) => Bind::Time(*value),
            OwnedBind::Bytes(value) => Bind::Bytes(value),
            OwnedBind::Bool(value) => Bind::Bool(*value),
        }
    }
}

/// A [`FixedSql`] statement with owned binds: `Send + Sync + 'static`, so another thread can
/// run it, and it can run more than once (a group that rolled back hands it back).
pub struct Owned<S: FixedSql> {
    binds: Vec<OwnedBind>,
    statement: PhantomData<fn() -> S>,
}

impl<S: FixedSql> Owned<S> {
    pub fn new(binds: &[Bind<'_>]) -> Self {
        Owned {
            binds: binds.iter().map(Bind::to_owned_bind).collect(),
            statement: PhantomData,
        }
    }

    /// The statement, ready to run.
    pub fn fixed(&self) -> Fixed<'_, S> {
        Fixed::new(self.binds.iter().map(OwnedBind::as_bind).collect())
    }
}

/// A [`FixedSql`] statement with its binds, ready to run.
pub struct Fixed<'a, S: FixedSql> {
    binds: Vec<Bind<'a>>,
    statement: PhantomData<S>,
}

impl<'a, S: FixedSql> Fixed<'a, S> {
    pub fn new(binds: Vec<Bind<'a>>) -> Self {
        debug_assert_eq!(
            S::SQL.matches('?').count(),
            binds.len(),
            "binds of {}",
            std::any::type_name::<S>()
        );
        Fixed {
            binds,
            statement: PhantomData,
        }
    }
}

impl<S: FixedSql> QueryId for Fixed<'_, S> {
    type QueryId = S;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: FixedSql> Query for Fixed<'_, S> {
    type SqlType = S::Row;
}

impl<S: FixedSql> RunQueryDsl<PgConnection> for Fixed<'_, S> {}

impl<S: FixedSql> QueryFragment<Pg> for Fixed<'_, S> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let mut binds = self.binds.iter();
        for (index, part) in S::SQL.split('?').enumerate() {
            if index > 0 {
                let bind = binds.next().ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!("{}: fewer binds than `?`", std::any::type_name::<S>()).into(),
                    )
                })?;
                match bind {
                    Bind::Text(value) => out.push_bind_param::<sql_types::Text, str>(value)?,
                    Bind::OptText(value) => {
                        out.push_bind_param::<sql_types::Nullable<sql_types::Text>, _>(value)?
                    }
                    Bind::BigInt(value) => out.push_bind_param::<sql_types::BigInt, _>(value)?,
                    Bind::Uuid(value) => out.push_bind_param::<sql_types::Uuid, _>(value)?,
                    Bind::OptUuid(value) => {
                        out.push_bind_param::<sql_types::Nullable<sql_types::Uuid>, _>(value)?
                    }
                    Bind::Date(value) => out.push_bind_param::<sql_types::Date, _>(value)?,
                    Bind::Time(value) => out.push_bind_param::<sql_types::Timestamptz, _>(value)?,
                    Bind::Bytes(value) => out.push_bind_param::<sql_types::Binary, [u8]>(value)?,
                    Bind::Bool(value) => out.push_bind_param::<sql_types::Bool, _>(value)?,
                }
            }
            out.push_sql(part);
        }
        if binds.next().is_some() {
            return Err(diesel::result::Error::QueryBuilderError(
                format!("{}: more binds than `?`", std::any::type_name::<S>()).into(),
            ));
        }
        Ok(())
    }
}
