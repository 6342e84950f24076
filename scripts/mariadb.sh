#!/usr/bin/env bash
# A throwaway MariaDB (or MySQL) server for tests, in a directory of its own, on a
# loopback port, with a user that has a password.
#   scripts/mariadb.sh start DIR PORT    install the data directory when DIR is new, start
#                                        the server, and (once) create the user
#                                        mqbridge@127.0.0.1 with password "mqbridge-test"
#   scripts/mariadb.sh stop DIR [MODE]   MODE: fast (clean shutdown, default) or
#                                        immediate (SIGKILL, like a crash)
# Runs the server as root when called as root (--user=root: mariadbd refuses root
# otherwise). Never point this at anything but tests.
set -euo pipefail
server=${MARIADBD:-$(command -v mariadbd || command -v mysqld || ls /usr/sbin/mariadbd /usr/sbin/mysqld 2>/dev/null | head -n 1)}
[ -x "$server" ] || { echo "mariadb.sh: no mariadbd (apt-get install mariadb-server, or set MARIADBD)" >&2; exit 1; }
client=$(command -v mariadb || command -v mysql)
user=()
[ "$(id -u)" -eq 0 ] && user=(--user=root)

cmd=${1:?start|stop}
dir=${2:?directory}
case "$cmd" in
  start)
    port=${3:?port}
    # Temporary tables in a directory of this server's own: in a shared /tmp, servers
    # installed side by side (tests run in parallel) failed on each other's files.
    mkdir -p "$dir/tmp"
    if [ ! -d "$dir/data/mysql" ]; then
      mariadb-install-db --no-defaults "${user[@]}" --datadir="$dir/data" --tmpdir="$dir/tmp" \
        --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1 \
        || { cat "$dir/install.log" >&2; exit 1; }
      fresh=1
    fi
    "$server" --no-defaults "${user[@]}" --datadir="$dir/data" --tmpdir="$dir/tmp" --socket="$dir/sock" \
      --pid-file="$dir/pid" --log-error="$dir/server.log" \
      --skip-networking=0 --bind-address=127.0.0.1 --port="$port" \
      --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --max-connections=300 \
      </dev/null >/dev/null 2>&1 &
    for _ in $(seq 600); do
      "$client" --no-defaults --socket="$dir/sock" -uroot -e 'SELECT 1' >/dev/null 2>&1 && break
      kill -0 $! 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
      sleep 0.1
    done
    if [ -n "${fresh:-}" ]; then
      "$client" --no-defaults --socket="$dir/sock" -uroot -e \
        "CREATE USER 'mqbridge'@'127.0.0.1' IDENTIFIED BY 'mqbridge-test'; GRANT ALL ON *.* TO 'mqbridge'@'127.0.0.1';"
    fi
    ;;
  stop)
    [ -f "$dir/pid" ] || exit 0
    pid=$(cat "$dir/pid")
    if [ "${3:-fast}" = immediate ]; then
      kill -9 "$pid" 2>/dev/null || true
    else
      kill "$pid" 2>/dev/null || true
    fi
    for _ in $(seq 600); do
      kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; exit 0; }
      sleep 0.1
    done
    echo "mariadb.sh: server $pid did not stop" >&2; exit 1
    ;;
  *) echo "usage: mariadb.sh start DIR PORT | stop DIR [fast|immediate]" >&2; exit 2 ;;
esac
