DROP TABLE core_pending;
