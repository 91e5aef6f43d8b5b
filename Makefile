# The two commands of the README's quick start, and the benchmarks. Each runs from the
# project's own virtual environment, .venv, which scripts/venv.sh makes and installs into
# (pip runs again only when pyproject.toml changes). PYTHON picks the interpreter it is
# made from, e.g. `make PYTHON=python3.12 test`; PYTEST_ARGS passes arguments to pytest.
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
export PYTHON VENV

.PHONY: run test venv bench bench-quick

run:            ## install into .venv and run the exporter with a week of demo history
	./scripts/venv.sh
	$(VENV)/bin/llm-usage-exporter serve --demo

test:           ## install the test dependencies (Debian packages; Python ones into .venv) and run every test
	./scripts/install-test-deps.sh
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

venv:           ## only make or update .venv, with the test extras
	./scripts/venv.sh test

bench:          ## performance benchmarks (full)
	./scripts/venv.sh
	$(VENV)/bin/python bench/run.py

bench-quick:    ## the reduced benchmark run
	./scripts/venv.sh
	$(VENV)/bin/python bench/run.py --quick
