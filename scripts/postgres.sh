#!/usr/bin/env bash
# Start, stop or check a local PostgreSQL server for the tests and `make server`.
#
# usage: scripts/postgres.sh start|stop|status
#
# The server listens on 127.0.0.1:$PGPORT only, keeps its data under $PGROOT (default .cache/postgres,
# or /tmp/harness-postgres-$PGPORT when the postgres user cannot reach that folder) and its unix socket
# in $PGROOT/run. It runs as the `postgres` system user when this script runs as
# root, because PostgreSQL refuses to run as root. `start` installs Debian's postgresql package when
# no server binaries are found (as root, with PG_INSTALL=1) and creates the databases in $PGDATABASES.
# When a server already accepts connections on the port, `start` uses it and `stop` leaves it running:
# `stop` only stops the server whose data folder is $PGROOT/data.
#
# Authentication is `trust` for connections over 127.0.0.1 and the socket: any local user can connect
# as any role. This is a test and development database; do not keep data there that needs protection.
set -euo pipefail

PGPORT=${PGPORT:-55432}
PGROOT=${PGROOT:-.cache/postgres}
PGDATABASES=${PGDATABASES:-harness_test mlflow}
PG_INSTALL=${PG_INSTALL:-1}
PGSUPERUSER=postgres

die() {
  echo "postgres.sh: $*" >&2
  exit 1
}

case "$PGPORT" in
  '' | *[!0-9]*) die "invalid PGPORT='$PGPORT': expected a TCP port number, e.g. 55432" ;;
esac
mkdir -p "$PGROOT"
PGROOT=$(cd "$PGROOT" && pwd)

# the postgres user (the server's user when this runs as root) must reach the folder, else use /tmp
if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$PGROOT/.."; then
  echo "postgres.sh: user postgres cannot reach $PGROOT; using /tmp/harness-postgres-$PGPORT" >&2
  PGROOT=/tmp/harness-postgres-$PGPORT
  mkdir -p "$PGROOT"
fi
DATA="$PGROOT/data"
SOCKETS="$PGROOT/run"
LOG="$PGROOT/server.log"

# Find the newest installed server binaries (Debian keeps them outside PATH).
find_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
    echo "$dir"
  elif command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
  fi
}

install_server() {
  if [ "$PG_INSTALL" != 1 ]; then
    die "PostgreSQL server binaries (initdb, pg_ctl) not found and PG_INSTALL=$PG_INSTALL; install the postgresql package"
  fi
  if [ "$(id -u)" -ne 0 ]; then
    die "PostgreSQL server binaries (initdb, pg_ctl) not found; install the postgresql package (apt-get install postgresql needs root)"
  fi
  echo "postgres.sh: installing Debian's postgresql package"

  # refresh the package index only when the first attempt fails
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; } \
    || die "apt-get install postgresql failed"
}

# Run a server command as the postgres system user when root, else as the current user.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

accepting() {
  "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT"
}

create_databases() {
  local name exists
  for name in $PGDATABASES; do
    case "$name" in
      '' | [!a-z_]* | *[!a-z0-9_]*) die "invalid database name '$name' in PGDATABASES: use lower-case letters, digits and _" ;;
    esac
    exists=$("$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U "$PGSUPERUSER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$name'") || die "cannot connect to 127.0.0.1:$PGPORT as $PGSUPERUSER"
    if [ "$exists" != 1 ]; then
      "$BIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U "$PGSUPERUSER" "$name"
      echo "postgres.sh: created database $name"
    fi
  done
}

init_cluster() {
  mkdir -p "$DATA" "$SOCKETS"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "the postgres system user is missing; reinstall the postgresql package"
    chown postgres: "$PGROOT" "$DATA" "$SOCKETS"
    runuser -u postgres -- test -w "$DATA" || die "user postgres cannot write to $DATA; set PGROOT to another folder"
  fi
  chmod 700 "$DATA"
  if [ -f "$DATA/PG_VERSION" ]; then
    return
  fi
  echo "postgres.sh: creating a cluster in $DATA"
  as_owner "$BIN/initdb" -D "$DATA" -U "$PGSUPERUSER" --auth=trust --encoding=UTF8 --no-instructions >/dev/null

  # loopback only. synchronous_commit=off may lose the last commits on a crash but never corrupts data
  cat >>"$DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCKETS'
synchronous_commit = off
EOF
}

start() {
  BIN=$(find_bindir)
  if [ -z "$BIN" ]; then
    install_server
    BIN=$(find_bindir)
    [ -n "$BIN" ] || die "postgresql was installed but initdb was not found under /usr/lib/postgresql/*/bin"
  fi
  if accepting; then
    echo "postgres.sh: a server already accepts connections on 127.0.0.1:$PGPORT; using it"
    create_databases
    return
  fi
  init_cluster
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o "-p $PGPORT" start >/dev/null \
    || die "pg_ctl start failed; see $LOG"
  create_databases
  echo "postgres.sh: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT, data in $DATA"
}

stop() {
  if [ ! -f "$DATA/postmaster.pid" ]; then
    echo "postgres.sh: no server running from $DATA"
    return
  fi
  BIN=$(find_bindir)
  [ -n "$BIN" ] || die "pg_ctl not found; stop the server with: kill \$(head -n 1 $DATA/postmaster.pid)"
  as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
  echo "postgres.sh: stopped the server of $DATA"
}

status() {
  BIN=$(find_bindir)
  [ -n "$BIN" ] || die "PostgreSQL server binaries not found"
  if accepting; then
    echo "postgres.sh: accepting connections on 127.0.0.1:$PGPORT"
  else
    echo "postgres.sh: no server on 127.0.0.1:$PGPORT"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "unknown command '${1:-}': expected start, stop or status" ;;
esac
