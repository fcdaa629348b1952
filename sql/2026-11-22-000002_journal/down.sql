DROP TABLE channel_rejection;
DROP TABLE seen_message;
DROP TABLE channel_request;
DROP TABLE txn_state_history;
DROP TABLE txn;
DROP TABLE agreement;
