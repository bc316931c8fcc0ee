# The two commands of the README. Both do all the set-up first (idempotent).
# `make test`: lint, type check (mypy over src/, configured in pyproject.toml), then the tests.
.PHONY: setup setup-test run test lint bench

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

run: setup
	.venv/bin/saescope run

test: setup-test
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy
	.venv/bin/pytest -q

bench: setup
	.venv/bin/python bench/bench_harvest.py
