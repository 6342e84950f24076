#!/usr/bin/env bash
# The test command (README "Testing"): installs what the tests need when it is missing
# (scripts/install-deps.sh, and Tansu), starts a throwaway PostgreSQL on a free loopback
# port in a temp dir (unless MQBRIDGE_TEST_DATABASE_URL points at one), runs every test,
# and stops it again. The tests start their own throwaway Mosquitto brokers, InfluxDB,
# MariaDB, NATS and Tansu (Kafka) servers (and, for restart tests, their own
# PostgreSQL); nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Tansu 0.6, a Kafka-API broker, for the kafka sink's tests (tests/e2e/kafka.rs): built
# once with cargo into a cache outside the work tree (about 11 minutes on 2 cores), unless
# TANSU names a tansu binary.
if [ -z "${TANSU:-}" ]; then
  tansu_root="${XDG_CACHE_HOME:-$HOME/.cache}/mqbridge/tansu-0.6.0"
  if [ ! -x "$tansu_root/bin/tansu" ]; then
    echo "scripts/test.sh: building Tansu 0.6.0 once, into $tansu_root" >&2
    cargo install tansu --locked --features dynostore --version 0.6.0 --root "$tansu_root" --quiet
  fi
  export TANSU="$tansu_root/bin/tansu"
fi

if [ -z "${MQBRIDGE_TEST_DATABASE_URL:-}" ]; then
  pgtmp=$(mktemp -d)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  scripts/postgres.sh start "$pgtmp/data" "$port"
  trap 'scripts/postgres.sh stop "$pgtmp/data" immediate || true; rm -rf "$pgtmp"' EXIT
  export MQBRIDGE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi

# Every target, unless the arguments pick some (`--test e2e`, `--lib`): cargo adds the
# targets it is given to --all-targets instead of narrowing them.
targets=(--all-targets)
for arg in "$@"; do
  case "$arg" in
    --) break ;;
    --lib | --bins | --bin | --bin=* | --tests | --test | --test=* | --benches | --bench | \
      --bench=* | --examples | --example | --example=* | --doc | --all-targets)
      targets=()
      break
      ;;
  esac
done
# --no-fail-fast: every test target runs even when an earlier one fails, so one failure
# never hides the others.
cargo test "${targets[@]}" --no-fail-fast "$@"
