-- Triggers go with the function (install_guards recreates them after an up migration).
DROP FUNCTION kunpay_ha_guard() CASCADE;
DROP TABLE ha_cdc_position;
DROP TABLE ha_node_role;
