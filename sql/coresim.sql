-- kunpay-coresim's own database (not kunpay's): the simulated core's accounts, postings and
-- agreement codes, so balances and the at-most-once rule survive a crash of the simulator.
-- Applied by kunpay-coresim at start; idempotent. A plain file, not a migration directory:
-- kunpay's migrations are the directories next to it.
CREATE TABLE IF NOT EXISTS coresim_account (
    account_no      VARCHAR(32)  NOT NULL,
    name            VARCHAR(64)  NOT NULL,
    id_no           VARCHAR(32)  NOT NULL,
    phone           VARCHAR(16)  NOT NULL,
    balance_fen     BIGINT       NOT NULL,
    frozen          BOOLEAN      NOT NULL,
    CONSTRAINT coresim_account_pk PRIMARY KEY (account_no),
    CONSTRAINT coresim_account_balance_ck CHECK (balance_fen >= 0)
);

-- One row per transaction id ever posted: a repeat is answered from here and moves no money.
CREATE TABLE IF NOT EXISTS coresim_posting (
    txn_id          UUID         NOT NULL,
    kind            VARCHAR(8)   NOT NULL,
    account_no      VARCHAR(32)  NOT NULL,
    amount_fen      BIGINT       NOT NULL,
    status          VARCHAR(10)  NOT NULL,
    core_ref        VARCHAR(40),
    reason          VARCHAR(24),
    posted_at       TIMESTAMPTZ  NOT NULL,
    CONSTRAINT coresim_posting_pk PRIMARY KEY (txn_id),
    CONSTRAINT coresim_posting_status_ck CHECK (status IN ('POSTED', 'REJECTED')),
    CONSTRAINT coresim_posting_amount_ck CHECK (amount_fen > 0)
);

CREATE TABLE IF NOT EXISTS coresim_code (
    agreement_no    VARCHAR(64)  NOT NULL,
    code            VARCHAR(8)   NOT NULL,
    issued_at       TIMESTAMPTZ  NOT NULL,
    CONSTRAINT coresim_code_pk PRIMARY KEY (agreement_no)
);
