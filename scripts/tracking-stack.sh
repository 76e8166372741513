#!/usr/bin/env bash
# A shared tracking stack without Docker: PostgreSQL (Debian's package, a private cluster) as the
# backend store and `mlflow server` with proxied artifacts and basic auth, both on 127.0.0.1. The same
# PostgreSQL holds the database `optuna`, for `nanosweep search`'s studies (every node of a cluster reaches it).
#
#   scripts/tracking-stack.sh start            install what is missing, start both, wait for /health
#   scripts/tracking-stack.sh env              the exports a client needs (URI, credentials, Optuna storage)
#   scripts/tracking-stack.sh test-env         the exports the server tests need (tests/integration/)
#   scripts/tracking-stack.sh status           what runs, and where
#   scripts/tracking-stack.sh restart-server [SECONDS_DOWN]   stop the MLflow server, wait, start it again
#   scripts/tracking-stack.sh stop             stop both; runs and artifacts stay in the state directory
#   scripts/tracking-stack.sh destroy          stop both and delete the state directory
#
# State (database, artifacts, logs, generated secrets) lives in NANOSWEEP_STACK_DIR (default .stack/).
# NANOSWEEP_STACK_PORT (5000) and NANOSWEEP_STACK_PG_PORT (5433) choose the ports. The admin password is
# MLFLOW_ADMIN_PASSWORD when set at the first start, else generated; both are kept in secrets.env.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STACK_DIR="${NANOSWEEP_STACK_DIR:-$ROOT/.stack}"
case "$STACK_DIR" in /*) ;; *) STACK_DIR="$PWD/$STACK_DIR" ;; esac
PORT="${NANOSWEEP_STACK_PORT:-5000}"
PG_PORT="${NANOSWEEP_STACK_PG_PORT:-5433}"
VENV="${NANOSWEEP_STACK_VENV:-$ROOT/.venv}"
URI="http://127.0.0.1:$PORT"
PG="$STACK_DIR/pg"  # owned by the postgres user when we are root: PostgreSQL refuses to run as root

say() { echo "tracking-stack: $*" >&2; }
die() { say "$*"; exit 1; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
  local version
  version="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$version" ] && echo "/usr/lib/postgresql/$version/bin"
}

install_missing() {
  if [ -z "$(pg_bin)" ]; then
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed: sudo apt-get install postgresql"
    say "installing Debian's postgresql"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  [ -x "$VENV/bin/mlflow" ] || die "no $VENV/bin/mlflow: make the venv first (bash scripts/test.sh, or the README's step 1)"
  if ! "$VENV/bin/python" -c "import psycopg, flask_wtf" 2>/dev/null; then
    say "installing psycopg and mlflow[auth] into $VENV (nanosweep's server extra)"
    "$VENV/bin/pip" install --quiet "psycopg[binary]>=3.1" \
      "mlflow[auth]==$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mlflow"))')"
  fi
}

random_hex() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

keep_secret() {  # NAME DEFAULT: the first value chosen (the environment's, else DEFAULT) is kept in secrets.env
  grep -q "^$1=" "$STACK_DIR/secrets.env" || echo "$1=${!1:-$2}" >>"$STACK_DIR/secrets.env"
}

write_secrets() {
  mkdir -p "$STACK_DIR"
  (umask 077 && touch "$STACK_DIR/secrets.env")
  keep_secret POSTGRES_PASSWORD "$(random_hex)"
  keep_secret MLFLOW_ADMIN_USERNAME admin
  keep_secret MLFLOW_ADMIN_PASSWORD "$(random_hex)"
  keep_secret MLFLOW_FLASK_SERVER_SECRET_KEY "$(random_hex)"
  # shellcheck disable=SC1091
  . "$STACK_DIR/secrets.env"
}

pg_running() { [ -d "$PG/data" ] && as_pg "$(pg_bin)/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; }

psql_admin() { as_pg "$(pg_bin)/psql" -h "$PG/run" -p "$PG_PORT" -U nanosweep -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

start_postgres() {
  local bin
  bin="$(pg_bin)"
  mkdir -p "$PG/run"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$PG"
  as_pg test -w "$PG" || die "the postgres user cannot write $PG: choose another NANOSWEEP_STACK_DIR"
  if [ ! -f "$PG/data/PG_VERSION" ]; then
    say "creating a PostgreSQL cluster in $PG/data"
    as_pg "$bin/initdb" -D "$PG/data" -U nanosweep --auth-local=trust --auth-host=scram-sha-256 >"$PG/initdb.log"
  fi
  if pg_running; then
    say "PostgreSQL already running"
  else
    as_pg "$bin/pg_ctl" -D "$PG/data" -l "$PG/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG/run" start >/dev/null ||
      die "PostgreSQL did not start: see $PG/postgres.log"
  fi
  psql_admin -c "ALTER ROLE nanosweep PASSWORD '$POSTGRES_PASSWORD'"
  for db in mlflow mlflow_auth optuna; do
    [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" = 1 ] || psql_admin -c "CREATE DATABASE $db"
  done
}

server_pid() {
  local pid
  pid="$(cat "$STACK_DIR/server.pid" 2>/dev/null)" || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

healthy() { curl -fsS --max-time 2 "$URI/health" >/dev/null 2>&1; }

start_server() {
  if server_pid >/dev/null; then
    say "MLflow server already running (pid $(server_pid))"
  else
    ! healthy || die "something else answers on $URI: stop it or set NANOSWEEP_STACK_PORT"
    local db="postgresql://nanosweep:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT"
    (
      umask 077
      printf '[mlflow]\ndefault_permission = READ\nauth_cache_ttl_seconds = 60\ndatabase_uri = %s\nadmin_username = %s\n%s\n' \
        "$db/mlflow_auth" "$MLFLOW_ADMIN_USERNAME" \
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" >"$STACK_DIR/basic_auth.ini"
    )
    mkdir -p "$STACK_DIR/artifacts"
    # its own session, so that stop ends the server and its workers together
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
      MLFLOW_AUTH_CONFIG_PATH="$STACK_DIR/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD" \
      MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_FLASK_SERVER_SECRET_KEY" \
      setsid "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$PORT" --workers 1 \
      --backend-store-uri "$db/mlflow" --artifacts-destination "$STACK_DIR/artifacts" --serve-artifacts \
      --app-name basic-auth >>"$STACK_DIR/server.log" 2>&1 </dev/null &
    echo $! >"$STACK_DIR/server.pid"
  fi
  local waited=0
  until healthy; do
    server_pid >/dev/null || { tail -n 20 "$STACK_DIR/server.log" >&2; die "MLflow server exited: see $STACK_DIR/server.log"; }
    [ "$waited" -lt 180 ] || die "MLflow server gave no /health in 180 s: see $STACK_DIR/server.log"
    sleep 1
    waited=$((waited + 1))
  done
}

stop_server() {
  local pid
  if pid="$(server_pid)"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    say "MLflow server stopped"
  fi
  rm -f "$STACK_DIR/server.pid"
}

stop_postgres() {
  if [ -n "$(pg_bin)" ] && pg_running; then
    as_pg "$(pg_bin)/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null
    say "PostgreSQL stopped"
  fi
}

optuna_storage() { echo "postgresql+psycopg://nanosweep:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT/optuna"; }

print_env() {
  write_secrets
  echo "export MLFLOW_TRACKING_URI=$URI"
  echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_ADMIN_USERNAME"
  echo "export MLFLOW_TRACKING_PASSWORD=$MLFLOW_ADMIN_PASSWORD"
  echo "export NANOSWEEP_OPTUNA_STORAGE=$(optuna_storage)"
}

print_test_env() {
  write_secrets
  echo "export NANOSWEEP_TEST_SERVER_URI=$URI"
  echo "export NANOSWEEP_TEST_SERVER_USERNAME=$MLFLOW_ADMIN_USERNAME"
  echo "export NANOSWEEP_TEST_SERVER_PASSWORD=$MLFLOW_ADMIN_PASSWORD"
  echo "export NANOSWEEP_TEST_OPTUNA_STORAGE=$(optuna_storage)"
}

case "${1:-}" in
  start)
    install_missing
    write_secrets
    start_postgres
    start_server
    say "MLflow server on $URI (PostgreSQL backend on 127.0.0.1:$PG_PORT, artifacts in $STACK_DIR/artifacts)"
    say "Optuna studies: database optuna on the same PostgreSQL (NANOSWEEP_OPTUNA_STORAGE in env)"
    say "a client needs:  eval \"\$(bash scripts/tracking-stack.sh env)\""
    ;;
  env) print_env ;;
  test-env) print_test_env ;;
  status)
    if [ -n "$(pg_bin)" ] && pg_running; then echo "postgresql: running on 127.0.0.1:$PG_PORT"; else echo "postgresql: stopped"; fi
    if pid="$(server_pid)"; then echo "mlflow server: pid $pid on $URI$(healthy && echo ', healthy')"; else echo "mlflow server: stopped"; fi
    ;;
  restart-server)
    write_secrets
    stop_server
    sleep "${2:-0}"
    start_server
    say "MLflow server back on $URI"
    ;;
  stop)
    stop_server
    stop_postgres
    ;;
  destroy)
    stop_server
    stop_postgres
    rm -rf "$STACK_DIR"
    say "removed $STACK_DIR"
    ;;
  *)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
