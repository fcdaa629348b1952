DROP TABLE node_run;
