# The two set-up commands of the README; both install what they need (scripts/setup.sh is idempotent).
PY := .venv/bin/python
RUN_DATE ?= $(shell date -u +%F)

.PHONY: setup nightly test test-fast bench clean-lakehouse cluster-start cluster-stop package

setup:
	@bash scripts/setup.sh

nightly: setup  ## the nightly pipeline on the embedded default (local Spark, ./lakehouse)
	$(PY) jobs/nightly.py --run-date $(RUN_DATE) $(ARGS)

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q $(ARGS)

test-fast: setup  ## without the slow (distributed, crash) tests
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(PY) bench/featurize.py && $(PY) bench/score.py && $(PY) bench/train.py && $(PY) bench/quality.py

clean-lakehouse:
	rm -rf lakehouse

cluster-start: setup  ## a local Spark standalone cluster (master + 2 workers on 127.0.0.1); see README "Running on a cluster"
	bash scripts/cluster.sh start

cluster-stop:
	bash scripts/cluster.sh stop

package: setup  ## dist/: the code zip (--py-files) and the wheel (Databricks)
	bash scripts/package.sh code && bash scripts/package.sh wheel
