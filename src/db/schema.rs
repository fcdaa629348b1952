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

diesel::table! {
    agreement (agreement_no) {
        agreement_no -> Varchar,
        inst_id -> Varchar,
        state -> Varchar,
        account_hash -> Varchar,
        account_masked -> Varchar,
        account_enc -> Varchar,
        core_customer -> Nullable<Varchar>,
        code_attempts -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        holder_enc -> Nullable<Varchar>,
    }
}

diesel::table! {
    txn (txn_id) {
        txn_id -> Uuid,
        inst_id -> Varchar,
        req_serial -> Varchar,
        kind -> Varchar,
        state -> Varchar,
        amount_fen -> Int8,
        refunded_fen -> Int8,
        agreement_no -> Nullable<Varchar>,
        orig_txn_id -> Nullable<Uuid>,
        account_hash -> Varchar,
        account_masked -> Varchar,
        account_enc -> Varchar,
        result_code -> Nullable<Varchar>,
        core_ref -> Nullable<Varchar>,
        business_date -> Date,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    txn_state_history (id) {
        id -> Int8,
        txn_id -> Uuid,
        from_state -> Nullable<Varchar>,
        to_state -> Varchar,
        reason -> Varchar,
        at -> Timestamptz,
    }
}

diesel::table! {
    channel_request (inst_id, req_serial) {
        inst_id -> Varchar,
        req_serial -> Varchar,
        msg_type -> Varchar,
        field_digests -> Text,
        response -> Bytea,
        result_code -> Varchar,
        txn_id -> Nullable<Uuid>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    seen_message (inst_id, msg_id) {
        inst_id -> Varchar,
        msg_id -> Varchar,
        seen_at -> Timestamptz,
    }
}

diesel::table! {
    channel_rejection (id) {
        id -> Int8,
        inst_id -> Nullable<Varchar>,
        path -> Varchar,
        msg_id -> Nullable<Varchar>,
        req_serial -> Nullable<Varchar>,
        result_code -> Varchar,
        detail -> Varchar,
        body_sm3 -> Varchar,
        at -> Timestamptz,
    }
}

diesel::table! {
    daily_usage (inst_id, account_hash, kind, business_date) {
        inst_id -> Varchar,
        account_hash -> Varchar,
        kind -> Varchar,
        business_date -> Date,
        used_fen -> Int8,
    }
}

diesel::table! {
    core_pending (txn_id) {
        txn_id -> Uuid,
        inst_id -> Varchar,
        since -> Timestamptz,
    }
}

diesel::table! {
    notification (event_id) {
        event_id -> Uuid,
        txn_id -> Uuid,
        inst_id -> Varchar,
        txn_state -> Varchar,
        status -> Varchar,
        attempts -> Int4,
        next_at -> Timestamptz,
        created_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        last_error -> Nullable<Varchar>,
    }
}

diesel::table! {
    notification_attempt (id) {
        id -> Int8,
        event_id -> Uuid,
        attempt -> Int4,
        at -> Timestamptz,
        txn_state -> Varchar,
        http_status -> Nullable<Int4>,
        error -> Nullable<Varchar>,
        duration_ms -> Int4,
    }
}

diesel::table! {
    core_reversal (reversal_id) {
        reversal_id -> Uuid,
        txn_id -> Uuid,
        inst_id -> Varchar,
        state -> Varchar,
        reason -> Varchar,
        posted_ref -> Nullable<Varchar>,
        core_ref -> Nullable<Varchar>,
        refusal -> Nullable<Varchar>,
        attempts -> Int4,
        next_at -> Timestamptz,
        last_error -> Nullable<Varchar>,
        created_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    risk_decision (txn_id) {
        txn_id -> Uuid,
        inst_id -> Varchar,
        kind -> Varchar,
        outcome -> Varchar,
        ruleset -> Varchar,
        score -> Int8,
        fired -> Varchar,
        seen -> Text,
        errors -> Varchar,
        budget_exceeded -> Bool,
        elapsed_us -> Int8,
        amount_fen -> Int8,
        near_limit -> Bool,
        subjects_enc -> Varchar,
        decided_at -> Timestamptz,
    }
}

diesel::table! {
    risk_case (txn_id) {
        txn_id -> Uuid,
        inst_id -> Varchar,
        state -> Varchar,
        opened_at -> Timestamptz,
        resolved_at -> Nullable<Timestamptz>,
        resolved_by -> Nullable<Varchar>,
        note -> Nullable<Varchar>,
        sent_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    risk_list_entry (colour, dimension, entry_key) {
        colour -> Varchar,
        dimension -> Varchar,
        entry_key -> Varchar,
        shown -> Varchar,
        reason -> Varchar,
        added_by -> Varchar,
        added_at -> Timestamptz,
    }
}

diesel::table! {
    risk_list_change (change_id) {
        change_id -> Int8,
        action -> Varchar,
        colour -> Varchar,
        dimension -> Varchar,
        entry_key -> Varchar,
        shown -> Varchar,
        reason -> Varchar,
        changed_by -> Varchar,
        changed_at -> Timestamptz,
    }
}

diesel::joinable!(notification_attempt -> notification (event_id));
diesel::joinable!(txn_state_history -> txn (txn_id));
diesel::joinable!(core_pending -> txn (txn_id));
diesel::joinable!(core_reversal -> txn (txn_id));
diesel::joinable!(risk_decision -> txn (txn_id));
diesel::joinable!(risk_case -> txn (txn_id));
diesel::allow_tables_to_appear_in_same_query!(
    agreement,
    txn,
    txn_state_history,
    core_pending,
    notification,
    notification_attempt,
    core_reversal,
    risk_decision,
    risk_case
);

diesel::table! {
    operator_action (action_id) {
        action_id -> Int8,
        at -> Timestamptz,
        operator -> Varchar,
        command -> Varchar,
        txn_id -> Nullable<Uuid>,
        detail -> Varchar,
        claimed_by -> Nullable<Varchar>,
        claimed_at -> Nullable<Timestamptz>,
        audit_node -> Nullable<Varchar>,
        audit_seq -> Nullable<Int8>,
    }
}
