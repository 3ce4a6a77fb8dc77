# Every target installs what it needs first, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REDIS_PORT ?= 6379

.PHONY: install run test lint bench redis-up redis-down clean

$(STAMP): pyproject.toml
	bash tools/ensure-redis.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python examples/run.py

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/schedules.py
	$(BIN)/python bench/worker_drain.py

redis-up: install
	mkdir -p .redis
	redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir .redis --daemonize yes \
		--pidfile $(CURDIR)/.redis/redis.pid --logfile $(CURDIR)/.redis/redis.log
	@echo "redis on redis://127.0.0.1:$(REDIS_PORT)"

redis-down:
	-test -f .redis/redis.pid && kill $$(cat .redis/redis.pid)

clean:
	rm -rf $(VENV) .bench dist build .mypy_cache .ruff_cache .pytest_cache
