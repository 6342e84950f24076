#!/usr/bin/env bash
# The test command (README "Testing"): installs what the tests need when it is missing,
# starts a throwaway PostgreSQL on a free loopback port in a temp dir (unless
# MQBRIDGE_TEST_DATABASE_URL points at one), runs every test, and stops it again.
# The tests start their own throwaway Mosquitto brokers, InfluxDB, MariaDB and NATS servers
# (and, for restart tests, their own PostgreSQL); nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto mosquitto-clients)
fi
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && [ -z "${PG_BIN:-}" ]; then
  missing+=(postgresql)
fi
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# MariaDB for the mysql sink's tests (tests/e2e/mysql.rs, via scripts/mariadb.sh); another
# server binary can be named with MARIADBD.
if [ -z "${MARIADBD:-}" ] && ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
  missing+=(mariadb-server)
fi
# InfluxDB 1.x for the influxdb sink's tests (tests/e2e/influx.rs); another influxd can be
# named with INFLUXD.
if [ -z "${INFLUXD:-}" ] && ! command -v influxd >/dev/null 2>&1; then
  missing+=(influxdb)
fi
# NATS with JetStream for the nats sink's tests (tests/e2e/nats.rs).
if ! command -v nats-server >/dev/null 2>&1 && [ -z "${NATS_SERVER:-}" ]; then
  missing+=(nats-server)
fi
# Headless Chromium for the dashboard's browser test (tests/e2e/dashboard.rs); a browser
# elsewhere can be named with MQBRIDGE_CHROMIUM.
if [ -z "${MQBRIDGE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: please install: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  # policy-rc.d keeps Debian from starting system-wide services on their default ports.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# A third-party client for the embedded broker's tests: its test fails without it.
if ! python3 -c 'import paho.mqtt.client' >/dev/null 2>&1; then
  if ! python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=2,<3' >/dev/null; then
    echo "scripts/test.sh: cannot install the Python paho-mqtt client (pip install 'paho-mqtt>=2,<3')" >&2
    exit 1
  fi
fi

if [ -z "${MQBRIDGE_TEST_DATABASE_URL:-}" ]; then
  pgtmp=$(mktemp -d)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  scripts/postgres.sh start "$pgtmp/data" "$port"
  trap 'scripts/postgres.sh stop "$pgtmp/data" immediate || true; rm -rf "$pgtmp"' EXIT
  export MQBRIDGE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi

# --no-fail-fast: every test target runs even when an earlier one fails, so one failure
# never hides the others.
cargo test --all-targets --no-fail-fast "$@"
