#!/bin/sh
# One server, two databases: Prefect's own, and edgedeploy's results. The passwords come from the environment
# (docker/.env, never this file); psql's :'name' quotes each as a literal, whatever it holds.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
     -v prefect_pw="$PREFECT_DB_PASSWORD" -v edgedeploy_pw="$EDGEDEPLOY_DB_PASSWORD" <<'SQL'
CREATE USER prefect WITH PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE USER edgedeploy WITH PASSWORD :'edgedeploy_pw';
CREATE DATABASE edgedeploy OWNER edgedeploy;
SQL
