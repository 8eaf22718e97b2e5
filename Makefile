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

# lora: peft (+ accelerate, psutil) and wandb install in seconds, so the LoRA and W&B tests run in CI too
test:
	@bash scripts/bootstrap.sh test,train,lora,wandb
	$(PY) -m pytest -q tests

# Peer and trainer benchmarks (minutes; installs trl). The token-statistics benchmark (30 min) runs on its own:
#   .venv/bin/python benchmarks/token_stats.py
bench:
	@bash scripts/bootstrap.sh train,bench
	$(PY) benchmarks/peer_trl.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/rollout_precision.py
	$(PY) benchmarks/train_memory.py
	$(PY) benchmarks/distributed.py

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
