# Everything installs itself: a fresh Debian 12 with Python 3.11 needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSDEPS := $(VENV)/.system-deps

# pytest-xdist workers for make test (tests/parallel.py: the suite mostly waits, and its
# heaviest tests run on one worker, one after another).
TEST_WORKERS ?= 3

.PHONY: test lint demo demo-chaos bench bench-prometheus bench-cluster soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Real peers for tests and the demo (Prometheus, systemd-analyze, systemd-nspawn, Chromium),
# from Debian.
$(SYSDEPS): scripts/install-system-deps.sh | $(STAMP)
	bash scripts/install-system-deps.sh
	touch $(SYSDEPS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) $(SYSDEPS)
	$(BIN)/ruff check .
	$(BIN)/mypy tgdaemon
	$(BIN)/pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup

# The daemon with three demo accounts on the local stand-in DC, scraped by a real Prometheus.
demo: $(STAMP) $(SYSDEPS)
	$(BIN)/python scripts/demo.py

# The same, with faults injected (drops, a flood wait, a revoked key) to watch recovery.
demo-chaos: $(STAMP) $(SYSDEPS)
	$(BIN)/python scripts/demo.py --chaos

# tgdaemon vs plain Telethon at N = 100, 1,000, 10,000 on the local DC: bench/RESULTS.md
# (about 45 minutes on 2 cores; see bench/run.py --help for smaller runs). The second run is
# N = 10,000 at connect_rate 250/s (N/40) with a 2 s burst, what a large fleet should set: all
# back within N/rate = 40 s of a short outage, at most 7.5 % of N attempts in a second; the
# default 20/s suits small fleets. The third is N = 100 at a rate that keeps the reconnect
# wave within 10 % of N per second (3/s, burst 6), issue 17's peak rule.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/run.py --large-repeats 3
	$(BIN)/python bench/run.py --sizes 10000 --fast-rate 250 --fast-burst 500 --fleets daemon \
		--outage-sizes 10000 --merge
	$(BIN)/python bench/run.py --sizes 100 --repeats 1 --fast-rate 3 --fast-burst 6 \
		--fleets daemon --outage-sizes 100 --flood-sizes --merge

# The daemon at 10,000 accounts scraped by Debian's Prometheus every 15 s for 5 minutes, once
# per metrics_histograms setting (issue 17; about 25 minutes on a quiet 2-core machine): its
# own section of bench/RESULTS.md and results.json's prometheus_scrape, which make bench keeps.
bench-prometheus: $(STAMP) $(SYSDEPS)
	$(BIN)/python bench/metrics_scrape.py --prometheus --accounts 10000 --duration 300

# One fleet of 40,000 accounts over 4 daemons on one SQLite store, one daemon SIGKILLed
# (issue 15): bench/CLUSTER.md. About 10-15 minutes on a quiet 2-core machine (seeding ~1.5,
# connecting ~3, idle window 1, takeover ~2, stops ~1), at most ~35 (every budget used up);
# run it with nothing else on the machine (bench/cluster.py --help for smaller runs).
bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster.py --accounts 40000 --daemons 4

# Random faults + SIGKILLs for SOAK_SECONDS (default 600), then the store's kill test at 500
# kills; writes bench/SOAK.md.
soak: $(STAMP)
	$(BIN)/python bench/soak.py
	TGDAEMON_CRASH_KILLS=500 $(BIN)/pytest -q --timeout=1800 tests/store/test_store_crash.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
