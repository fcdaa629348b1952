-- Reversals (冲正) of postings the core applied after kunpay had recorded the transaction as
-- FAILED (a posting that reached the core after the core had been queried, a core that broke
-- the query contract): the money is returned by undoing the posting, never by editing the
-- journal. One row per transaction at most; requested in the same database transaction as the
-- history row that explains it, then driven to a final state by the resolver, which retries
-- with a growing pause. REFUSED (the core cannot undo it automatically) is for a person and
-- listed by `kunpayctl reversal list`.
CREATE TABLE core_reversal (
    reversal_id     UUID         NOT NULL,
    txn_id          UUID         NOT NULL REFERENCES txn (txn_id),
    inst_id         VARCHAR(32)  NOT NULL,
    state           VARCHAR(16)  NOT NULL,
    reason          VARCHAR(200) NOT NULL,
    posted_ref      VARCHAR(64),
    core_ref        VARCHAR(64),
    refusal         VARCHAR(24),
    attempts        INTEGER      NOT NULL,
    next_at         TIMESTAMPTZ  NOT NULL,
    last_error      VARCHAR(300),
    created_at      TIMESTAMPTZ  NOT NULL,
    finished_at     TIMESTAMPTZ,
    CONSTRAINT core_reversal_pk PRIMARY KEY (reversal_id),
    CONSTRAINT core_reversal_txn_uk UNIQUE (txn_id),
    CONSTRAINT core_reversal_state_ck CHECK (state IN ('PENDING', 'REVERSED', 'NOTHING_POSTED', 'REFUSED')),
    CONSTRAINT core_reversal_attempts_ck CHECK (attempts >= 0),
    CONSTRAINT core_reversal_done_ck CHECK ((state = 'PENDING') = (finished_at IS NULL))
);
-- The resolver's scan: an institution's due reversals, oldest first.
CREATE INDEX core_reversal_due_idx ON core_reversal (inst_id, state, next_at);
