#!/usr/bin/env bash
# Installs the Redis clients that tests/integration/test_client_compat.py runs against the
# proxies, and nothing when they are installed already (a second run takes well under a second):
#   .venv-clients/redis<N>/    one virtualenv per pinned redis-py (REDIS_PY below)
#   tests/clients/node_modules ioredis and node-redis, exactly as tests/clients/package-lock.json
# Node.js and npm come from Debian when missing. Run from anywhere; `make clients` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-py versions, one virtualenv each; the newest redis-py is the one in .venv
REDIS_PY=(4.6.0 5.3.1 6.4.0 7.4.1 8.0.1)
VENVS=.venv-clients
CLIENTS=tests/clients

for version in "${REDIS_PY[@]}"; do
  dir="$VENVS/redis${version%%.*}"
  stamp="$dir/.installed"
  if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "redis==$version" ]]; then
    continue
  fi
  echo "install_clients: redis-py $version into $dir"
  rm -rf "$dir"
  if [[ -x .venv/bin/pip ]]; then  # the project's pip installs into it: no pip of its own
    python3 -m venv --without-pip "$dir"
    .venv/bin/pip --python "$dir/bin/python" install -q --disable-pip-version-check "redis==$version"
  else
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "redis==$version"
  fi
  echo "redis==$version" > "$stamp"
done

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "install_clients: installing nodejs and npm from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi

lock_sum="$(sha256sum "$CLIENTS/package-lock.json" | cut -d' ' -f1)"
stamp="$CLIENTS/node_modules/.moonmesh-installed"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$lock_sum" ]]; then
  echo "install_clients: npm ci in $CLIENTS"
  (cd "$CLIENTS" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" > "$stamp"
fi
