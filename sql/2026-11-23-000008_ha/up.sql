-- High availability (docs/operations.md, "CDC and fencing"): each node's database says which
-- role it has, the CDC applier records how far it has copied the other node's changes, and a
-- guard makes every write to kunpay's tables fail unless this database is ACTIVE.
-- These two tables are node-local: never replicated, never guarded (src/ha/mod.rs).

-- The role of this database and its fencing epoch. One row. A cutover fences the old active
-- (FENCED, epoch + 1) before it promotes the standby (ACTIVE, same new epoch); a kunpayd
-- started with a stale configuration still finds FENCED here and cannot write.
-- A fresh database is ACTIVE at epoch 0, so a single node works without any HA setup; a
-- standby is declared with `kunpayctl ha set-role standby`.
CREATE TABLE ha_node_role (
    id          INTEGER      NOT NULL,
    role        VARCHAR(16)  NOT NULL,
    epoch       BIGINT       NOT NULL,
    changed_at  TIMESTAMPTZ  NOT NULL,
    reason      VARCHAR(200) NOT NULL,
    CONSTRAINT ha_node_role_pk PRIMARY KEY (id),
    CONSTRAINT ha_node_role_one_ck CHECK (id = 1),
    CONSTRAINT ha_node_role_role_ck CHECK (role IN ('ACTIVE', 'STANDBY', 'FENCED')),
    CONSTRAINT ha_node_role_epoch_ck CHECK (epoch >= 0)
);
INSERT INTO ha_node_role (id, role, epoch, changed_at, reason)
VALUES (1, 'ACTIVE', 0, now(), 'created by migration 2026-11-23-000008_ha');

-- How far this database has applied a source's changes, updated in the same transaction as
-- the changes it covers: after a crash of either side the applier resumes after applied_lsn,
-- so nothing is applied twice and nothing is skipped. LSNs as BIGINT bytes (X/Y in text).
-- complete_lsn / complete_at: the source WAL position and source clock up to which this copy
-- was last known to hold every committed change (for lag in bytes and seconds).
CREATE TABLE ha_cdc_position (
    source_id       VARCHAR(64)  NOT NULL,   -- the source's system identifier
    slot_name       VARCHAR(64)  NOT NULL,
    applied_lsn     BIGINT       NOT NULL,   -- end of the last applied commit record
    applied_xid     BIGINT,
    commit_time     TIMESTAMPTZ,             -- the source's commit time of that transaction
    complete_lsn    BIGINT       NOT NULL,
    complete_at     TIMESTAMPTZ,
    transactions    BIGINT       NOT NULL,
    changes         BIGINT       NOT NULL,
    created_at      TIMESTAMPTZ  NOT NULL,
    updated_at      TIMESTAMPTZ  NOT NULL,
    CONSTRAINT ha_cdc_position_pk PRIMARY KEY (source_id, slot_name),
    CONSTRAINT ha_cdc_position_lsn_ck CHECK (applied_lsn >= 0 AND complete_lsn >= 0),
    CONSTRAINT ha_cdc_position_counts_ck CHECK (transactions >= 0 AND changes >= 0)
);

-- The write guard (the kunpay_ha_guard() trigger function and a statement-level trigger on every
-- replicated table) is installed by src/ha/mod.rs install_guards after every migration, so a
-- table added by a later migration is guarded too, and the function's body can use what each
-- server offers (PostgreSQL's current_setting(name, true); exception blocks on openGauss).
