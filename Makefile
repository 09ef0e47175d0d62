# Every target bootstraps .venv from nothing; no step by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SEEDS ?= 100
JOBS ?= 2
DURATION ?= 60
SOAK_OUT ?= bench/results/soak.json

.PHONY: venv browser demo demo-pg test lint check sim bench bench-quick soak fuzz clean screenshots

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The browser tests drive Debian's Chromium through Playwright (never
# `playwright install`: its own browser download cannot work here). Missing and
# root: install it; missing and not root: say so (the browser tests skip,
# loudly); under CI=true a missing browser fails.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get) for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; \
	elif [ "$$CI" = true ]; then \
		echo "ERROR: $(CHROMIUM) is missing and we are not root to install it (apt-get install -y chromium)"; exit 1; \
	else \
		echo "WARNING: $(CHROMIUM) is missing and we are not root: the browser tests will be SKIPPED (as root: apt-get install -y chromium)"; \
	fi

# KEEP=1 leaves the relay, the nodes and DN's branch server running until Ctrl-C.
demo: $(STAMP)
	$(PY) -m harness.demo $(if $(KEEP),--linger)

# Two relays on one PostgreSQL store (a database of its own, dropped after), a branch on each.
demo-pg: $(STAMP)
	$(PY) -m harness.demo_pg $(if $(PG),--pg $(PG))

# pytest exits 5 when it collects no tests: say so loudly, but do not fail on it.
test: $(STAMP) browser
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "WARNING: pytest collected no tests"; exit 0; fi; exit $$rc

# The sync screen's reference screenshots (docs/img/sync-screen-*.png), from the browser tests.
screenshots: $(STAMP) browser
	BRANCHLINE_DOC_SCREENSHOTS=1 $(PY) -m pytest tests/test_browser.py -q

lint: $(STAMP)
	$(VENV)/bin/ruff check engine adapters harness tests bench
	$(VENV)/bin/ruff format --check engine adapters harness tests bench
	$(VENV)/bin/mypy --strict engine adapters harness

check: test lint

# Deterministic simulation: SEEDS seeds with swarm faults; a failure prints
# its seed and replay command and exits 3 (crash), 4 (liveness) or 5 (correctness).
# SCHEMA=path/to/schema.toml runs on that schema, records generated from its fields.
sim: $(STAMP)
	$(PY) -m harness.sim --seeds $(SEEDS) --jobs $(JOBS) $(if $(RELAYS),--relays $(RELAYS)) \
		$(if $(SCHEMA),--schema $(SCHEMA))

# bench.peers installs its peers itself into bench/.peers (gitignored).
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.core --quick
	$(PY) -m bench.sync --quick
	$(PY) -m bench.adapters --quick
	$(PY) -m bench.peers --quick

bench: $(BENCH_STAMP)
	$(PY) -m bench.core
	$(PY) -m bench.sync
	$(PY) -m bench.adapters
	$(PY) -m bench.peers
	$(PY) -m bench.stall

# Real relay and node processes under faults for DURATION seconds, then heal,
# converge and check (docs/reliability.md). SEED=N replays a run's schedule;
# SCHEMA=path/to/schema.toml soaks that schema instead of the built-in accounting.
# RELAYS=2 STORE=postgresql://127.0.0.1/test shares one PostgreSQL store between
# relays; STORE=private runs a PostgreSQL server of its own and restarts it too.
soak: $(STAMP)
	$(PY) -m harness.soak --duration $(DURATION) $(if $(SEED),--seed $(SEED)) --out $(SOAK_OUT) \
		$(if $(RELAYS),--relays $(RELAYS)) $(if $(STORE),--store $(STORE)) $(if $(SCHEMA),--schema $(SCHEMA))

# The hostile-relay fuzz run at full size (the suite runs 10,000 frames): a
# relay fed FRAMES hostile frames on loopback while two nodes write and sync.
FRAMES ?= 100000
fuzz: $(STAMP)
	BRANCHLINE_FUZZ_FRAMES=$(FRAMES) $(PY) -m pytest -q -s -p no:randomly tests/test_fuzz_relay.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
