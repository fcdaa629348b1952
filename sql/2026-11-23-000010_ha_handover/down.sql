ALTER TABLE ha_node_role DROP COLUMN drained_at;
ALTER TABLE ha_node_role DROP COLUMN drain_requested_at;
