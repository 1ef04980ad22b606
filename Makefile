# Two commands set everything up on a fresh Debian machine (as root):
#   make run    start a local mesh on loopback and print how to connect
#   make test   install what is missing and run the test suite
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed

.PHONY: run test lint system-deps venv clients bench bench-migration bench-failover soak-failover clean chaos chaos-deps

system-deps:
	@command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || { \
	  echo "installing redis-server and redis-tools from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools; }
	@command -v systemd-analyze >/dev/null || { \
	  echo "installing systemd (systemd-analyze checks deploy/systemd units)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver (the dashboard's browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# the clients tests/integration/test_client_compat.py runs: redis-py 4.x-8.x in
# .venv-clients/, ioredis and node-redis from tests/clients/package-lock.json (idempotent)
clients: venv
	bash tools/install_clients.sh

# ruff (style, import order, banned imports), mypy, and the layering test
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q tests/unit/test_layering.py

test: system-deps chaos-deps venv clients lint
	$(VENV)/bin/pytest -q

run: system-deps venv
	$(VENV)/bin/umctl-mesh up

bench: system-deps venv
	@command -v nutcracker >/dev/null || [ -x /usr/sbin/nutcracker ] || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nutcracker; }
	$(PY) tools/bench_proxy.py

# online resharding, Moonmesh against native redis-cli (2->3, 3->4, 4->3) on the same data, the
# defaults being the issue's data set (2,000,000 keys of 512 B): keys/s, MB/s, the ratio, client
# ops/s and p99 before / during / after, the checker's verdict, the longest source Redis stall;
# BENCH_ARGS="--keys 50000 --cases 2to3 --json" narrows a run, "--cases bigkeys" adds big keys
bench-migration: system-deps venv
	$(PY) tools/bench_migration.py $(BENCH_ARGS)

# kill -9 / SIGSTOP of a master, Moonmesh and native Redis Cluster side by side (BENCH_ARGS="--runs 1")
bench-failover: system-deps venv
	$(PY) tools/bench_failover.py $(BENCH_ARGS)

# false failovers: a 3x1 cluster under full redis-benchmark load, no fault, SOAK_MINUTES long
SOAK_MINUTES ?= 30
soak-failover: system-deps venv
	$(PY) tools/soak_failover.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .venv-clients tests/clients/node_modules build *.egg-info

# what the chaos harness (chaos/) needs: network namespaces (iproute2), nft for partitions
chaos-deps:
	@command -v ip >/dev/null && command -v nft >/dev/null || { \
	  echo "installing iproute2 and nftables from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 nftables; }

# many rounds of every fault under load, hosts in network namespaces, then the history check;
# CHAOS_ARGS="--seed N --rounds M --faults a,b --min-replicas-ack 1" replays or narrows a run
chaos: system-deps venv chaos-deps
	$(PY) -m chaos.run $(CHAOS_ARGS)
