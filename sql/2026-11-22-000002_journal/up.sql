-- The payment journal: what institutions asked, what kunpay decided, and every state change.
-- Money is BIGINT fen. Ids are UUIDs generated in Rust (openGauss cannot generate them in SQL).
-- Uniqueness does the idempotency work: a repeat hits a unique key and is answered from
-- channel_request, never applied twice.

-- Agreements (authorised-payment protocols) between an institution's user and a bank account.
CREATE TABLE agreement (
    agreement_no    VARCHAR(32)  PRIMARY KEY,
    inst_id         VARCHAR(32)  NOT NULL,
    state           VARCHAR(16)  NOT NULL,
    account_hash    VARCHAR(64)  NOT NULL,   -- SM3 of the account number: lookups without plaintext
    account_masked  VARCHAR(32)  NOT NULL,   -- 622202*********0123, for counter staff
    account_enc     VARCHAR(200) NOT NULL,   -- SM4-GCM under the data key: postings need the number
    core_customer   VARCHAR(64),             -- the core's reference for the account holder
    code_attempts   INTEGER      NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ  NOT NULL,
    updated_at      TIMESTAMPTZ  NOT NULL,
    CONSTRAINT agreement_state_ck CHECK (state IN ('PENDING', 'ACTIVE', 'TERMINATED', 'EXPIRED'))
);
CREATE INDEX agreement_account_idx ON agreement (inst_id, account_hash, state);

-- One row per financial transaction (debit, credit, refund).
CREATE TABLE txn (
    txn_id          UUID         PRIMARY KEY,
    inst_id         VARCHAR(32)  NOT NULL,
    req_serial      VARCHAR(64)  NOT NULL,
    kind            VARCHAR(8)   NOT NULL,
    state           VARCHAR(16)  NOT NULL,
    amount_fen      BIGINT       NOT NULL,
    refunded_fen    BIGINT       NOT NULL DEFAULT 0,
    agreement_no    VARCHAR(32),
    orig_txn_id     UUID,
    account_hash    VARCHAR(64)  NOT NULL,
    account_masked  VARCHAR(32)  NOT NULL,
    account_enc     VARCHAR(200) NOT NULL,
    result_code     VARCHAR(4),
    core_ref        VARCHAR(64),
    business_date   DATE         NOT NULL,
    created_at      TIMESTAMPTZ  NOT NULL,
    updated_at      TIMESTAMPTZ  NOT NULL,
    CONSTRAINT txn_serial_uk UNIQUE (inst_id, req_serial),
    CONSTRAINT txn_kind_ck CHECK (kind IN ('DEBIT', 'CREDIT', 'REFUND')),
    CONSTRAINT txn_state_ck CHECK (state IN ('RECEIVED', 'RISK_CHECKED', 'SENT_TO_CORE', 'SUCCEEDED',
                                             'FAILED', 'UNKNOWN', 'REVERSED')),
    CONSTRAINT txn_amount_ck CHECK (amount_fen > 0),
    CONSTRAINT txn_refunded_ck CHECK (refunded_fen >= 0 AND refunded_fen <= amount_fen)
);
CREATE INDEX txn_inst_created_idx ON txn (inst_id, created_at);
CREATE INDEX txn_daily_idx ON txn (inst_id, account_hash, business_date);
CREATE INDEX txn_orig_idx ON txn (orig_txn_id);

-- Every transition, with the state it left (checked under a row lock) and why.
CREATE TABLE txn_state_history (
    id              BIGSERIAL    PRIMARY KEY,
    txn_id          UUID         NOT NULL REFERENCES txn (txn_id),
    from_state      VARCHAR(16),
    to_state        VARCHAR(16)  NOT NULL,
    reason          VARCHAR(200) NOT NULL,
    at              TIMESTAMPTZ  NOT NULL
);
CREATE INDEX txn_state_history_txn_idx ON txn_state_history (txn_id, id);

-- The answer given to each state-changing request, byte for byte, so a repeat gets the same
-- bytes back (signature included). field_digests lets a repeat with other content be told
-- which fields differ without keeping sensitive plaintext.
CREATE TABLE channel_request (
    inst_id         VARCHAR(32)  NOT NULL,
    req_serial      VARCHAR(64)  NOT NULL,
    msg_type        VARCHAR(32)  NOT NULL,
    field_digests   TEXT         NOT NULL,
    response        BYTEA        NOT NULL,
    result_code     VARCHAR(4)   NOT NULL,
    txn_id          UUID,
    created_at      TIMESTAMPTZ  NOT NULL,
    CONSTRAINT channel_request_pk PRIMARY KEY (inst_id, req_serial)
);

-- Message ids seen inside the send-time window (replay protection); older rows are pruned.
CREATE TABLE seen_message (
    inst_id         VARCHAR(32)  NOT NULL,
    msg_id          VARCHAR(64)  NOT NULL,
    seen_at         TIMESTAMPTZ  NOT NULL,
    CONSTRAINT seen_message_pk PRIMARY KEY (inst_id, msg_id)
);
CREATE INDEX seen_message_at_idx ON seen_message (seen_at);

-- Requests refused before they became transactions: the only trace a rejection leaves.
CREATE TABLE channel_rejection (
    id              BIGSERIAL    PRIMARY KEY,
    inst_id         VARCHAR(32),
    path            VARCHAR(64)  NOT NULL,
    msg_id          VARCHAR(64),
    req_serial      VARCHAR(64),
    result_code     VARCHAR(4)   NOT NULL,
    detail          VARCHAR(400) NOT NULL,
    body_sm3        VARCHAR(64)  NOT NULL,
    at              TIMESTAMPTZ  NOT NULL
);
CREATE INDEX channel_rejection_at_idx ON channel_rejection (at);
