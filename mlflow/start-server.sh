#!/usr/bin/env bash
# Start a shared MLflow tracking server: tracking + model registry + proxied artifacts, for a team.
#
#   mlflow/start-server.sh [--backend-store-uri URI] [--artifacts-destination URI] [--host HOST]
#                          [--port PORT] [--workers N] [--basic-auth] [-- MORE `mlflow server` OPTIONS]
#
# Defaults (each also read from the environment variable of the same name that `mlflow server` uses):
#   MLFLOW_BACKEND_STORE_URI     sqlite:///<repo>/mlflow/store/server.db   (or postgresql://user@host:5432/mlflow)
#   MLFLOW_ARTIFACTS_DESTINATION <repo>/mlflow/store/server-artifacts      (or s3://bucket/prefix)
#   MLFLOW_HOST                  127.0.0.1   (loopback: bind wider only behind TLS and auth, see mlflow/README.md)
#   MLFLOW_PORT                  5000
#   MLFLOW_WORKERS               2
# --basic-auth runs `--app-name basic-auth` (needs `pip install "mlflow[auth]"`); its config is
# MLFLOW_AUTH_CONFIG_PATH (default: mlflow/store/basic_auth.ini, written on first use, with a CSRF key beside
# it unless MLFLOW_FLASK_SERVER_SECRET_KEY is set) and the first admin password comes from
# MLFLOW_AUTH_ADMIN_PASSWORD on the first start. Clients set MLFLOW_TRACKING_USERNAME / _PASSWORD.
#
# The script `exec`s mlflow, so the PID you start is the server's: stop it with `kill PID` (SIGTERM).
set -euo pipefail
# MLflow 3's job runner (GenAI judge jobs) is off unless asked for: Transflow uses none, and it is ~8 processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
store="$here/store"

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$store/server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$store/server-artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
auth=0
extra=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --basic-auth) auth=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "start-server.sh: unknown option $1 (pass mlflow options after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if [ -x "$repo/.venv/bin/mlflow" ]; then
  mlflow="$repo/.venv/bin/mlflow"; python="$repo/.venv/bin/python"
else
  mlflow="$(command -v mlflow || true)"; python="$(command -v python3 || true)"
fi
[ -n "$mlflow" ] || { echo "start-server.sh: mlflow not found: run 'make setup' first" >&2; exit 1; }

case "$backend" in
  sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;;
  postgresql*)
    "$python" -c "import psycopg2" 2>/dev/null || {
      echo "start-server.sh: a PostgreSQL backend needs psycopg2: pip install psycopg2-binary" >&2; exit 1; } ;;
esac
case "$artifacts" in
  *://*) ;;
  *) mkdir -p "$artifacts"; artifacts="$(cd "$artifacts" && pwd)" ;;
esac

app=()
if [ "$auth" = 1 ]; then
  "$python" -c "import flask_wtf" 2>/dev/null || {
    echo "start-server.sh: --basic-auth needs MLflow's auth extra: pip install \"mlflow[auth]\" (Flask-WTF)" >&2; exit 1; }
  export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$store/basic_auth.ini}"
  auth_dir="$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
  mkdir -p "$auth_dir"
  if [ ! -f "$MLFLOW_AUTH_CONFIG_PATH" ]; then
    (umask 077; cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
# Users see nothing they were not granted; the admin grants per experiment / registered model.
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$auth_dir/basic_auth.db
admin_username = admin
# No password here: the first start takes it from MLFLOW_AUTH_ADMIN_PASSWORD.
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    )
  fi
  # CSRF tokens are signed with this key; every worker (and every restart) must share it.
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    key_file="$auth_dir/flask_secret_key"
    [ -f "$key_file" ] || (umask 077; "$python" -c "import secrets; print(secrets.token_hex(32))" >"$key_file")
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  app=(--app-name basic-auth)
fi

# Only sources the proxied artifact store produces may be registered (defence in depth against
# path-traversal sources, see mlflow/README.md); set it to '' to allow any source.
export MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX="${MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX-^mlflow-artifacts:/.*\$}"

# Transflow needs no server-side jobs (MLflow's GenAI job runner): one process fewer to run and stop.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec "$mlflow" server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" \
  --port "$port" \
  --workers "$workers" \
  "${app[@]}" "${extra[@]}"
