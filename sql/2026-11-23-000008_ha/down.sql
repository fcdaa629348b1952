-- The guard's triggers go with its function (install_guards created both).
DROP FUNCTION IF EXISTS kunpay_ha_guard() CASCADE;
DROP TABLE ha_cdc_position;
DROP TABLE ha_node_role;
