-- Operator actions: every kunpayctl command that changes state (notify replay, risk case
-- approve/decline, risk list add/remove) writes one row here in the same database transaction
-- as its change, so an action cannot happen without its row. The daemon appends each row to
-- its audit log (docs/audit.md, "Operator actions") and marks it with the record's sequence
-- number: claimed_* is set before the append, audit_* after it, so a crash in between is found
-- again (claimed, not marked) and settled by looking for the record in the log, never by
-- logging it twice.
CREATE TABLE operator_action (
    action_id   BIGSERIAL     NOT NULL,
    at          TIMESTAMPTZ   NOT NULL,
    operator    VARCHAR(64)   NOT NULL,
    command     VARCHAR(64)   NOT NULL,
    txn_id      UUID,
    detail      VARCHAR(4000) NOT NULL,
    claimed_by  VARCHAR(64),
    claimed_at  TIMESTAMPTZ,
    audit_node  VARCHAR(64),
    audit_seq   BIGINT,
    CONSTRAINT operator_action_pk PRIMARY KEY (action_id),
    CONSTRAINT operator_action_claim_ck CHECK ((claimed_by IS NULL) = (claimed_at IS NULL)),
    CONSTRAINT operator_action_logged_ck CHECK ((audit_seq IS NULL) = (audit_node IS NULL)),
    CONSTRAINT operator_action_seq_ck CHECK (audit_seq IS NULL OR audit_seq > 0)
);
-- The daemon's scan for rows not yet logged, in order (NULLs are indexed on both databases).
CREATE INDEX operator_action_unlogged_idx ON operator_action (audit_seq, action_id);
