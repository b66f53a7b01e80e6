.PHONY: setup test lint format up
setup:
	./scripts/setup.sh

test:
	./scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

up:
	.venv/bin/sam2unet-assist up
