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

-- One row per transaction id the core has answered for: a repeat is answered from here and
-- moves no money. FENCED: a query or a reversal found nothing under the id, so the posting is
-- refused if it arrives later (the primary key makes the fence and a concurrent posting
-- exclude each other). reversal_ref: the posting was undone by a reversal.
CREATE TABLE IF NOT EXISTS coresim_posting (
    txn_id          UUID         NOT NULL,
    kind            VARCHAR(8),
    account_no      VARCHAR(32),
    amount_fen      BIGINT,
    status          VARCHAR(10)  NOT NULL,
    core_ref        VARCHAR(40),
    reason          VARCHAR(24),
    posted_at       TIMESTAMPTZ  NOT NULL,
    reversal_ref    VARCHAR(40),
    reversed_at     TIMESTAMPTZ,
    CONSTRAINT coresim_posting_pk PRIMARY KEY (txn_id),
    CONSTRAINT coresim_posting_status_ck CHECK (status IN ('POSTED', 'REJECTED', 'FENCED')),
    CONSTRAINT coresim_posting_fields_ck CHECK (status = 'FENCED'
        OR (kind IS NOT NULL AND account_no IS NOT NULL AND amount_fen IS NOT NULL)),
    CONSTRAINT coresim_posting_amount_ck CHECK (amount_fen > 0),
    CONSTRAINT coresim_posting_reversal_ck CHECK (reversal_ref IS NULL OR status = 'POSTED')
);

CREATE TABLE IF NOT EXISTS coresim_code (
    agreement_no    VARCHAR(64)  NOT NULL,
    code            VARCHAR(8)   NOT NULL,
    issued_at       TIMESTAMPTZ  NOT NULL,
    CONSTRAINT coresim_code_pk PRIMARY KEY (agreement_no)
);
