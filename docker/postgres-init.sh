#!/usr/bin/env bash
# Run once by the postgres image on an empty data directory: MLflow's own database and
# role next to Airflow's (POSTGRES_DB). Passwords come from the environment (.env).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --set=mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
