"""Where metrics go: ``metrics.jsonl`` (one JSON object per line, flushed and fsynced per step), TensorBoard, and
a one-line console summary. On resume, lines beyond the checkpoint's step are dropped, so a killed-and-resumed run
has exactly one line per step."""

from __future__ import annotations

import json
import math
import os

__all__ = ["MetricsLog", "read_metrics", "summary_line"]


def read_metrics(path: str) -> list[dict]:
    """All complete lines of a metrics.jsonl (a torn last line from a killed process is skipped)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; keep them readable
    return v


class MetricsLog:
    def __init__(self, run_dir: str, *, resume_step: int | None, tensorboard: bool = True):
        """``resume_step``: the checkpoint step a resumed run restarts from (lines with a larger step are removed),
        None for a fresh run (an existing metrics.jsonl is replaced)."""
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is None:
            kept = []
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        self.f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run wrote beyond the checkpoint
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self.tb = None

    def write(self, record: dict) -> None:
        self.f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def summary_line(r: dict) -> dict:
    """The few numbers shown on the progress bar."""
    out = {}
    for key, label, fmt in (
        ("reward", "reward", "{:.3f}"),
        ("eval/accuracy", "eval", "{:.3f}"),
        ("loss/abs_diff_mean", "|π−μ|", "{:.1e}"),
        ("loss/masked_frac", "masked", "{:.3f}"),
        ("entropy", "H", "{:.3f}"),
    ):
        if key in r and isinstance(r[key], (int, float)):
            out[label] = fmt.format(r[key])
    return out
