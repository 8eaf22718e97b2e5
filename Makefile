# The two commands of the README. Each one sets up .venv by itself (scripts/bootstrap.sh).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: run test demo bench clean

run:
	@bash scripts/bootstrap.sh train
	$(PY) -m dppo train

demo:
	@bash scripts/bootstrap.sh ""
	$(PY) -m dppo demo

test:
	@bash scripts/bootstrap.sh test,train
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
