-- What each account has used of its daily limit, per institution, kind and business day.
-- A counter, so that the limit check is one row lock and one comparison made under it (correct
-- under concurrency), not a sum over the day's transactions that grows with every payment.
-- A transaction that fails gives its amount back in the same database transaction.
CREATE TABLE daily_usage (
    inst_id         VARCHAR(32)  NOT NULL,
    account_hash    VARCHAR(64)  NOT NULL,
    kind            VARCHAR(8)   NOT NULL,
    business_date   DATE         NOT NULL,
    used_fen        BIGINT       NOT NULL,
    CONSTRAINT daily_usage_pk PRIMARY KEY (inst_id, account_hash, kind, business_date),
    CONSTRAINT daily_usage_kind_ck CHECK (kind IN ('DEBIT', 'CREDIT')),
    CONSTRAINT daily_usage_used_ck CHECK (used_fen >= 0)
);

-- Carry over what the journal already holds, so an upgrade in the middle of a day keeps limits.
INSERT INTO daily_usage (inst_id, account_hash, kind, business_date, used_fen)
SELECT inst_id, account_hash, kind, business_date, CAST(SUM(amount_fen) AS BIGINT)
FROM txn
WHERE kind IN ('DEBIT', 'CREDIT') AND state <> 'FAILED'
GROUP BY inst_id, account_hash, kind, business_date;

-- The daily check no longer sums the day's transactions per account.
DROP INDEX txn_daily_idx;
