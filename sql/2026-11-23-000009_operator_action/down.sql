DROP TABLE operator_action;
