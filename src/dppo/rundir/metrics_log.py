"""Where metrics go: ``metrics.jsonl`` (one JSON object per line, flushed and fsynced per step), TensorBoard, W&B
(``--report_to wandb``), and a one-line console summary.

On resume, ``metrics.jsonl`` is rewritten with exactly the records up to the checkpoint's step: a record written
after the checkpoint is dropped (the resumed run writes it again) and a torn last line left by a killed process is
dropped and reported, so a killed-and-resumed run has exactly one line per step. TensorBoard drops its events past
the checkpoint too (``purge_step``); a W&B run is resumed by its id (``RUN/wandb_id``).
"""

from __future__ import annotations

import json
import math
import os
import uuid

__all__ = ["MetricsLog", "read_metrics", "summary_line"]


def _parse(path: str) -> tuple[list[dict], list[str]]:
    """(complete records, unparseable lines) of a metrics.jsonl."""
    out, bad = [], []
    if not os.path.isfile(path):
        return out, bad
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(line.rstrip("\n"))
    return out, bad


def read_metrics(path: str) -> list[dict]:
    """All complete lines of a metrics.jsonl (a torn last line from a killed process is skipped)."""
    return _parse(path)[0]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; keep them readable
    return v


class MetricsLog:
    def __init__(self, run_dir: str, *, resume_step: int | None, tensorboard: bool = True,
                 report_to: tuple[str, ...] = (), config: dict | None = None, log=print):
        """``resume_step``: the checkpoint step a resumed run restarts from (records with a larger step are removed),
        None for a fresh run (an existing metrics.jsonl is replaced)."""
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is None:
            kept = []
        else:
            rows, torn = _parse(self.path)
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            for line in torn:
                log(f"metrics.jsonl: dropped an incomplete line left by the interrupted run: {line[:80]!r}")
            if len(rows) > len(kept):
                log(f"metrics.jsonl: dropped {len(rows) - len(kept)} record(s) past the checkpoint's step "
                    f"{resume_step}; the resumed run writes them again")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
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
        self.wandb = None
        if "wandb" in report_to:
            import wandb

            id_path = os.path.join(run_dir, "wandb_id")
            run_id = open(id_path).read().strip() if os.path.isfile(id_path) else uuid.uuid4().hex[:8]
            with open(id_path, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(id=run_id, resume="allow", dir=run_dir, config=config or {},
                                    name=os.path.basename(os.path.abspath(run_dir)),
                                    project=os.environ.get("WANDB_PROJECT", "dppo"))

    def write(self, record: dict) -> None:
        self.f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        step = int(record["step"])
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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
