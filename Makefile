# The two commands of the README's quick start, and the benchmarks.
.PHONY: run test bench bench-quick

run:            ## install and run the exporter with a week of demo history
	python3 -m pip install -q -e .
	llm-usage-exporter serve --demo

test:           ## install the test dependencies (Python and Debian) and run every test
	./scripts/install-test-deps.sh
	python3 -m pytest -q

bench:          ## performance benchmarks (full)
	python3 bench/run.py

bench-quick:    ## the reduced benchmark run
	python3 bench/run.py --quick
