.PHONY: setup test test-fast lint format up
setup:
	./scripts/setup.sh

test:
	./scripts/test.sh

# every test that starts no Label Studio, service process, browser or multi-process training
test-fast:
	./scripts/test.sh tests --ignore=tests/system -m "not slow and not e2e" -q

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

up:
	.venv/bin/sam2unet-assist up
