-- Result notifications to institutions (best-effort notification): one row per final state of
-- a transaction, inserted in the statement that records that state, delivered to the
-- institution's callback URL on a retry schedule until it is acknowledged or the schedule is
-- exhausted (DEAD, listed for operators). No foreign key to txn: the row is written on the
-- payment's hot path and always in the same statement as the transaction's own update.
CREATE TABLE notification (
    event_id        UUID         NOT NULL,
    txn_id          UUID         NOT NULL,
    inst_id         VARCHAR(32)  NOT NULL,
    txn_state       VARCHAR(16)  NOT NULL,
    status          VARCHAR(12)  NOT NULL,
    attempts        INTEGER      NOT NULL,
    next_at         TIMESTAMPTZ  NOT NULL,
    created_at      TIMESTAMPTZ  NOT NULL,
    finished_at     TIMESTAMPTZ,
    last_error      VARCHAR(300),
    CONSTRAINT notification_pk PRIMARY KEY (event_id),
    CONSTRAINT notification_status_ck CHECK (status IN ('PENDING', 'DELIVERED', 'DEAD', 'SKIPPED')),
    CONSTRAINT notification_attempts_ck CHECK (attempts >= 0)
);
-- The notifier's scan: an institution's due notifications, oldest first.
CREATE INDEX notification_due_idx ON notification (inst_id, status, next_at);
CREATE INDEX notification_txn_idx ON notification (txn_id);

-- Every delivery attempt, kept for operators and auditors.
CREATE TABLE notification_attempt (
    id              BIGSERIAL    NOT NULL,
    event_id        UUID         NOT NULL REFERENCES notification (event_id),
    attempt         INTEGER      NOT NULL,
    at              TIMESTAMPTZ  NOT NULL,
    txn_state       VARCHAR(16)  NOT NULL,
    http_status     INTEGER,
    error           VARCHAR(300),
    duration_ms     INTEGER      NOT NULL,
    CONSTRAINT notification_attempt_pk PRIMARY KEY (id)
);
CREATE INDEX notification_attempt_event_idx ON notification_attempt (event_id, id);
