#!/usr/bin/env bash
# The test command (README "Testing"): installs what the tests need when it is missing,
# then runs every test. The tests start their own throwaway Mosquitto brokers on free
# loopback ports in temp dirs and stop them when done; nothing needs to be running.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto mosquitto-clients)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: please install: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  # policy-rc.d keeps Debian from starting the system-wide broker on port 1883.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

exec cargo test --all-targets "$@"
