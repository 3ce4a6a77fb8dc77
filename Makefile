# Every target installs what it needs first, so each works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# Exact versions to install over what pyproject allows (the test matrix pins both ends).
PINS ?=
BIN := $(VENV)/bin
# WITHOUT_HIREDIS=1 removes hiredis after installing: redis-py's pure-Python parser, which is
# what installs where hiredis has no wheel (PyPy).
WITHOUT_HIREDIS ?=
# PIP_UPGRADE=1 upgrades everything to the newest releases allowed (the matrix's latest entry),
# once a day.
PIP_UPGRADE ?=
# The stamp names the pins and the parser (and the day, when upgrading), so a change reinstalls.
STAMP := $(VENV)/.installed-$(shell echo '$(PINS) $(WITHOUT_HIREDIS) \
	$(if $(PIP_UPGRADE),$(shell date +%F))' | cksum | cut -d' ' -f1)
REDIS_PORT ?= 6379

.PHONY: install run test lint chaos bench redis-up redis-down clean test-matrix test-low test-high \
	test-latest test-valkey

$(STAMP): pyproject.toml
	bash tools/ensure-redis.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(PIP_UPGRADE),--upgrade --upgrade-strategy eager) \
		-e '.[dev]' $(PINS)
	$(if $(WITHOUT_HIREDIS),$(BIN)/python -m pip uninstall -q -y hiredis)
	$(BIN)/python -m pip list 2>/dev/null | grep -iE '^(redis|taskiq|hiredis) ' | tr -s ' ' | paste -sd ' '
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python examples/run.py

# The suite mostly waits (failovers, idle timeouts, real workers), so it runs in parallel
# processes, each with servers of its own; TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 4
test: install
	bash tools/ensure-browser.sh
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

# The version matrix CI runs (README, "Compatibility"): `make test` once per entry, each in a
# virtualenv of its own. The low end is the oldest of everything pyproject allows, the high end
# the newest; the latest entry pins nothing, so it installs what `pip install` gives a user on
# the day it runs (a release newer than the high end included); the Valkey run swaps the server
# programs the suite starts, and runs without hiredis, so redis-py's pure-Python parser is
# tested too.
LOW_PYTHON := 3.10
LOW_PINS := redis==7.2.0 taskiq==0.12.0 hiredis==3.2.0
HIGH_PYTHON := 3.13
HIGH_PINS := redis==8.2.0 taskiq==0.13.0 hiredis==3.5.0
LATEST_PYTHON := 3.12
# pythonX.Y from PATH, else from pyenv's versions (a pyenv shim fails for a version not selected).
find-python = $(or $(firstword $(foreach candidate,python$(1) \
	$(wildcard $(HOME)/.pyenv/versions/$(1).*/bin/python$(1)) \
	$(wildcard /root/.pyenv/versions/$(1).*/bin/python$(1)),\
	$(shell $(candidate) -c 'print("$(candidate)")' 2>/dev/null))),\
	$(error no python$(1) found: install Python $(1), e.g. with pyenv))

test-matrix: test-low test-high test-latest test-valkey

test-low:
	$(MAKE) test VENV=.venv-matrix/low PYTHON=$(call find-python,$(LOW_PYTHON)) PINS='$(LOW_PINS)'

test-high:
	$(MAKE) test VENV=.venv-matrix/high PYTHON=$(call find-python,$(HIGH_PYTHON)) PINS='$(HIGH_PINS)'

test-latest:
	$(MAKE) test VENV=.venv-matrix/latest PYTHON=$(call find-python,$(LATEST_PYTHON)) \
		PIP_UPGRADE=1

test-valkey:
	bash tools/ensure-redis.sh valkey
	TASKIQ_REDIS_TEST_SERVER=valkey-server TASKIQ_REDIS_TEST_SENTINEL=valkey-sentinel \
		$(MAKE) test VENV=.venv-matrix/valkey PYTHON=$(call find-python,$(HIGH_PYTHON)) \
		PINS='$(HIGH_PINS)' WITHOUT_HIREDIS=1

# Two real workers under random faults for 60 s (tools/chaos.py --help for the options).
chaos: install
	$(BIN)/python tools/chaos.py --seconds 60

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/schedules.py
	$(BIN)/python bench/worker_drain.py
	$(BIN)/python bench/cancel.py
	$(BIN)/python bench/slow_reply.py

redis-up: install
	mkdir -p .redis
	redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir .redis --daemonize yes \
		--pidfile $(CURDIR)/.redis/redis.pid --logfile $(CURDIR)/.redis/redis.log
	@echo "redis on redis://127.0.0.1:$(REDIS_PORT)"

redis-down:
	-test -f .redis/redis.pid && kill $$(cat .redis/redis.pid)

clean:
	rm -rf $(VENV) .venv-matrix .bench dist build .mypy_cache .ruff_cache .pytest_cache
