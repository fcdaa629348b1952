-- One row per daemon process lifetime: when it started, became ready and stopped, and why.
-- /health reads this node's row, so the probe proves both connectivity and a migrated schema.
-- Portable to openGauss (PG compatibility mode): BIGSERIAL, TIMESTAMPTZ, CHECK; no IDENTITY.
CREATE TABLE node_run (
    run_id      BIGSERIAL    PRIMARY KEY,
    node_id     VARCHAR(64)  NOT NULL,
    version     VARCHAR(32)  NOT NULL,
    pid         INTEGER      NOT NULL,
    role        VARCHAR(16)  NOT NULL,
    started_at  TIMESTAMPTZ  NOT NULL,
    ready_at    TIMESTAMPTZ,
    stopped_at  TIMESTAMPTZ,
    stop_reason VARCHAR(200),
    CONSTRAINT node_run_role_ck CHECK (role IN ('active', 'standby')),
    CONSTRAINT node_run_stop_ck CHECK (stopped_at IS NULL OR stopped_at >= started_at)
);

CREATE INDEX node_run_node_started_idx ON node_run (node_id, started_at);
