#!/usr/bin/env bash
# A throwaway PostgreSQL for tests, in a directory of its own, on a loopback port.
#   scripts/postgres.sh start DATADIR PORT    initdb when DATADIR is new, then start
#   scripts/postgres.sh stop DATADIR [MODE]   MODE: fast (default) or immediate
# Runs the server as the postgres user when called as root (initdb refuses root).
# Trust authentication on 127.0.0.1 only: never point this at anything but tests.
set -euo pipefail
bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$bin/pg_ctl" ] || { echo "postgres.sh: no PostgreSQL server binaries (set PG_BIN)" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd=${1:?start|stop}
dir=${2:?data directory}
case "$cmd" in
  start)
    port=${3:?port}
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then
      chmod a+x "$(dirname "$dir")"
      chown postgres "$dir"
    fi
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_pg "$bin/initdb" -D "$dir" -A trust -U postgres --no-sync >/dev/null
    fi
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null
    ;;
  stop)
    as_pg "$bin/pg_ctl" -D "$dir" -m "${3:-fast}" -w -t 60 stop >/dev/null
    ;;
  *) echo "usage: postgres.sh start DATADIR PORT | stop DATADIR [fast|immediate]" >&2; exit 2 ;;
esac
