//! Diesel's view of the tables in `sql/`. Written by hand to match the migrations; the
//! `schema_matches_migrations` test in tests/database.rs fails when the two drift apart.

diesel::table! {
    node_run (run_id) {
        run_id -> Int8,
        node_id -> Varchar,
        version -> Varchar,
        pid -> Int4,
        role -> Varchar,
        started_at -> Timestamptz,
        ready_at -> Nullable<Timestamptz>,
        stopped_at -> Nullable<Timestamptz>,
        stop_reason -> Nullable<Varchar>,
    }
}
