#!/usr/bin/env bash
# Installs what building and testing mqbridge needs, when it is missing (from Debian as
# root, and the Python paho-mqtt client from PyPI): cmake and OpenSSL's headers to build
# librdkafka (the kafka sink), and the servers the tests start. scripts/test.sh and
# .ci/run call it; nothing needs to be installed beforehand.
set -euo pipefail

missing=()
# Building: librdkafka (feature `kafka`) is compiled with cmake, against OpenSSL.
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
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
    echo "scripts/install-deps.sh: please install: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "scripts/install-deps.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  # policy-rc.d keeps Debian from starting system-wide services on their default ports.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# A third-party client for the embedded broker's tests: its test fails without it.
if ! python3 -c 'import paho.mqtt.client' >/dev/null 2>&1; then
  if ! python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=2,<3' >/dev/null; then
    echo "scripts/install-deps.sh: cannot install the Python paho-mqtt client (pip install 'paho-mqtt>=2,<3')" >&2
    exit 1
  fi
fi
