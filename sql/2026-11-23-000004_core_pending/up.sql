-- The transactions whose posting has no recorded outcome yet (SENT_TO_CORE or UNKNOWN): the
-- core link's durable outbox. A row is inserted in the statement that journals the transaction
-- and deleted in the statement that records its final outcome, so it exists exactly while the
-- core's answer is owed. The resolver delivers from here, oldest first, after a crash, a broker
-- outage or a lost reply; readiness counts it against core.amqp.max_queued.
-- Small by design (in-flight and backlog only): no index beyond the key, no foreign key (it is
-- a work list; txn and its history are the record).
CREATE TABLE core_pending (
    txn_id      UUID         NOT NULL,
    inst_id     VARCHAR(32)  NOT NULL,
    since       TIMESTAMPTZ  NOT NULL,
    CONSTRAINT core_pending_pk PRIMARY KEY (txn_id)
);

-- Carry over what an upgrade finds unresolved.
INSERT INTO core_pending (txn_id, inst_id, since)
SELECT txn_id, inst_id, created_at FROM txn WHERE state IN ('SENT_TO_CORE', 'UNKNOWN');
