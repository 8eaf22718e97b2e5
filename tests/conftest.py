"""One torch thread in the test process: the tests' tensors and models are tiny, and on a busy 2-core machine a
second thread costs a scheduler wait per operation (measured: 8 TRL steps took 15 s with 2 threads, 1.1 s with 1).
Subprocesses the tests start set their own (OMP_NUM_THREADS or --threads)."""

import torch

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Markers. `unit`: pure functions on small tensors, seconds in all (`make test-fast`, the inner loop). `system`: a file
# that trains, starts processes (torchrun, the async worker, a CLI run) or runs a peer (vLLM, TRL, verl) for real.
# `make test` runs both. A test file is one or the other; new files are unit unless listed here.
# The heaviest system files come first, so that `pytest -n 2 --dist loadfile` does not leave one of them for the end.
SYSTEM_FILES = [  # heaviest first (seconds of one run under load: test_staleness 330, … test_experiments 0.5)
    "test_staleness.py", "test_vllm_distributed.py", "test_trainer_resume.py", "test_distributed.py",
    "test_vllm_train.py", "test_trainer.py", "test_packaging.py", "test_vllm_engine.py", "test_integration_trl.py",
    "test_integration_trl_vllm.py", "test_lora.py", "test_reliability.py", "test_shared_prompt.py", "test_tasks.py",
    "test_logging.py", "test_demo.py", "test_hf_engine_chunks.py", "test_learning.py", "test_compare.py",
    "test_vllm_sleep.py", "test_experiments.py", "test_peer_trl.py", "test_verl_plugin.py",
]


def pytest_collection_modifyitems(config, items):
    import pytest

    rank = {name: i for i, name in enumerate(SYSTEM_FILES)}
    for item in items:
        item.add_marker(pytest.mark.system if item.path.name in rank else pytest.mark.unit)
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: the order within a file is kept
