"""One torch thread in the test process: the tests' tensors and models are tiny, and on a busy 2-core machine a
second thread costs a scheduler wait per operation (measured: 8 TRL steps took 15 s with 2 threads, 1.1 s with 1).
Subprocesses the tests start set their own (OMP_NUM_THREADS or --threads)."""

import torch

torch.set_num_threads(1)
