-- A planned cutover's drain (docs/operations.md, "Planned cutover"): kunpayctl asks the active
-- node to stop taking business requests by setting drain_requested_at in that node's own
-- database; the daemon, which watches its role row, answers 503 from then on, lets the requests
-- in flight finish, and records drained_at. Both are cleared whenever the role or the epoch
-- changes (a drain belongs to one role at one epoch). The table stays node-local.
ALTER TABLE ha_node_role ADD COLUMN drain_requested_at TIMESTAMPTZ;
ALTER TABLE ha_node_role ADD COLUMN drained_at TIMESTAMPTZ;
