-- One server, two databases: Prefect's own, and edgedeploy's results.
CREATE USER prefect WITH PASSWORD 'prefect';
CREATE DATABASE prefect OWNER prefect;
CREATE USER edgedeploy WITH PASSWORD 'edgedeploy';
CREATE DATABASE edgedeploy OWNER edgedeploy;
