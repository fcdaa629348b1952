CREATE INDEX txn_daily_idx ON txn (inst_id, account_hash, business_date);
DROP TABLE daily_usage;
