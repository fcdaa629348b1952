DROP TABLE risk_list_change;
DROP TABLE risk_list_entry;
DROP TABLE risk_case;
DROP TABLE risk_decision;
ALTER TABLE agreement DROP COLUMN holder_enc;
ALTER TABLE txn DROP CONSTRAINT txn_state_ck;
ALTER TABLE txn ADD CONSTRAINT txn_state_ck CHECK (state IN ('RECEIVED', 'RISK_CHECKED', 'SENT_TO_CORE',
    'SUCCEEDED', 'FAILED', 'UNKNOWN', 'REVERSED'));
