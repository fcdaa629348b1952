DROP TABLE core_reversal;
