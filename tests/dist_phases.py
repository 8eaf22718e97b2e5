"""Under torchrun (2 processes, gloo): the long phases' own timeout, as tests/test_distributed.py checks it.

``torchrun --standalone --nproc_per_node 2 tests/dist_phases.py OUT DIST_TIMEOUT PHASE_TIMEOUT SLOW``: process 1
spends SLOW seconds generating (longer than DIST_TIMEOUT, shorter than PHASE_TIMEOUT: the others wait for it at the
end of the phase), then process 0 exports the final model for longer than PHASE_TIMEOUT: process 1 stops with
dppo's message, exit status 7.
"""

from __future__ import annotations

import sys
import time

from dppo.run.cli import EXIT
from dppo.run.config import make_config
from dppo.run.distributed import ProcessLost, setup

out, timeout, phase_timeout, slow = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
cfg = make_config(out=out, dist_timeout=timeout, dist_phase_timeout=phase_timeout, prompts_per_step=2)
try:
    with setup(cfg) as d:
        d.enter("rollout", 4)
        if d.rank == 1:
            time.sleep(slow)
        d.arrive("rollout")
        d.enter("train", 4)
        d.sum(1.0)  # a collective right after: every process is there
        print(f"rank {d.rank}: rollout and train done", file=sys.stderr, flush=True)
        d.enter("final export")
        t0 = time.monotonic()
        if d.rank == 0:
            time.sleep(10 * phase_timeout)
        d.arrive("final export")
except ProcessLost as e:
    print(f"dppo train: {e}", file=sys.stderr, flush=True)
    print(f"rank {d.rank}: stopped after {time.monotonic() - t0:.1f} s of the final export", file=sys.stderr,
          flush=True)
    sys.exit(EXIT["process_lost"])
