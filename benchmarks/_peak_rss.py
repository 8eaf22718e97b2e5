"""``python benchmarks/_peak_rss.py train …`` = ``python -m dppo train …``, and at exit this process's peak resident
set size (VmHWM) is written to $DPPO_PEAK_RSS_DIR/rank<RANK>.json (used by benchmarks/vllm_torchrun.py)."""

import atexit
import json
import os
import sys


def _write() -> None:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))  # kB
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(os.environ["DPPO_PEAK_RSS_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "peak_rss_gb": hwm / 2**20}, f)


atexit.register(_write)

from dppo.__main__ import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
