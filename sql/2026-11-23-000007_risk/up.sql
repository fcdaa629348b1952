-- Risk control in the journal: every decision with what explains it, the cases reviews open,
-- and the holder data a debit's decision needs from its agreement.

-- A transaction held for a person (risk said REVIEW) waits in IN_REVIEW, its day's usage
-- reserved; the reviewer's verdict moves it on (RISK_CHECKED, then the core) or fails it.
ALTER TABLE txn DROP CONSTRAINT txn_state_ck;
ALTER TABLE txn ADD CONSTRAINT txn_state_ck CHECK (state IN ('RECEIVED', 'IN_REVIEW', 'RISK_CHECKED',
    'SENT_TO_CORE', 'SUCCEEDED', 'FAILED', 'UNKNOWN', 'REVERSED'));

-- The agreement holder's id and phone numbers, sealed under the data key like account_enc, so
-- a debit's decision can see them (velocity per id number and phone) without plaintext at rest.
-- NULL for agreements signed before this migration.
ALTER TABLE agreement ADD COLUMN holder_enc VARCHAR(300);

-- One decision per transaction: the outcome, the rule set's version, the rules that fired
-- (id@version:action, shadow rules marked), every variable with the value the decision saw,
-- and the velocity event with its subjects (sealed under the data key: the subjects are
-- digests of card, id and phone numbers) so a restart rebuilds the velocity store.
CREATE TABLE risk_decision (
    txn_id          UUID          NOT NULL REFERENCES txn (txn_id),
    inst_id         VARCHAR(32)   NOT NULL,
    kind            VARCHAR(8)    NOT NULL,
    outcome         VARCHAR(8)    NOT NULL,
    ruleset         VARCHAR(80)   NOT NULL,
    score           BIGINT        NOT NULL,
    fired           VARCHAR(2000) NOT NULL,
    seen            TEXT          NOT NULL,
    errors          VARCHAR(2000) NOT NULL,
    budget_exceeded BOOLEAN       NOT NULL,
    elapsed_us      BIGINT        NOT NULL,
    amount_fen      BIGINT        NOT NULL,
    near_limit      BOOLEAN       NOT NULL,
    subjects_enc    VARCHAR(600)  NOT NULL,
    decided_at      TIMESTAMPTZ   NOT NULL,
    CONSTRAINT risk_decision_pk PRIMARY KEY (txn_id),
    CONSTRAINT risk_decision_outcome_ck CHECK (outcome IN ('APPROVE', 'REVIEW', 'DECLINE')),
    CONSTRAINT risk_decision_elapsed_ck CHECK (elapsed_us >= 0)
);
-- The rebuild at start (the velocity horizon, oldest first) and the statistics by day.
CREATE INDEX risk_decision_at_idx ON risk_decision (decided_at);

-- A review waiting for a person, and the verdict. OPEN -> APPROVED (the daemon then sends the
-- transaction to the core and sets sent_at) or DECLINED (the transaction FAILED at once).
CREATE TABLE risk_case (
    txn_id          UUID          NOT NULL REFERENCES txn (txn_id),
    inst_id         VARCHAR(32)   NOT NULL,
    state           VARCHAR(16)   NOT NULL,
    opened_at       TIMESTAMPTZ   NOT NULL,
    resolved_at     TIMESTAMPTZ,
    resolved_by     VARCHAR(64),
    note            VARCHAR(400),
    sent_at         TIMESTAMPTZ,
    CONSTRAINT risk_case_pk PRIMARY KEY (txn_id),
    CONSTRAINT risk_case_state_ck CHECK (state IN ('OPEN', 'APPROVED', 'DECLINED')),
    CONSTRAINT risk_case_resolved_ck CHECK ((state = 'OPEN') = (resolved_at IS NULL)),
    CONSTRAINT risk_case_sent_ck CHECK (sent_at IS NULL OR state = 'APPROVED')
);
-- The daemon's scan for approved cases to send, and the reviewers' queue.
CREATE INDEX risk_case_state_idx ON risk_case (inst_id, state, opened_at);

-- Black and white lists kept by operators with `kunpayctl risk list add/remove` (the files under
-- the risk directory are the analysts' lists; a decision consults both). Card, id and phone
-- numbers are kept as their risk subject keys (SM3 digests), shown masked; devices, merchants and
-- IP addresses or CIDR ranges as given.
CREATE TABLE risk_list_entry (
    colour          VARCHAR(8)    NOT NULL,
    dimension       VARCHAR(16)   NOT NULL,
    entry_key       VARCHAR(64)   NOT NULL,
    shown           VARCHAR(64)   NOT NULL,
    reason          VARCHAR(400)  NOT NULL,
    added_by        VARCHAR(64)   NOT NULL,
    added_at        TIMESTAMPTZ   NOT NULL,
    CONSTRAINT risk_list_entry_pk PRIMARY KEY (colour, dimension, entry_key),
    CONSTRAINT risk_list_entry_colour_ck CHECK (colour IN ('BLACK', 'WHITE')),
    CONSTRAINT risk_list_entry_dimension_ck CHECK (dimension IN ('card', 'id', 'phone', 'device',
                                                                 'ip', 'merchant'))
);

-- Every change to those lists, with who and when: the auditors' record, and the generation the
-- daemon polls to know the lists changed.
CREATE TABLE risk_list_change (
    change_id       BIGSERIAL     PRIMARY KEY,
    action          VARCHAR(8)    NOT NULL,
    colour          VARCHAR(8)    NOT NULL,
    dimension       VARCHAR(16)   NOT NULL,
    entry_key       VARCHAR(64)   NOT NULL,
    shown           VARCHAR(64)   NOT NULL,
    reason          VARCHAR(400)  NOT NULL,
    changed_by      VARCHAR(64)   NOT NULL,
    changed_at      TIMESTAMPTZ   NOT NULL,
    CONSTRAINT risk_list_change_action_ck CHECK (action IN ('ADD', 'REMOVE'))
);
