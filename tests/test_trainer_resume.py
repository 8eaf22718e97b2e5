"""A run killed with SIGKILL mid-way, or stopped by SIGTERM (a scheduler's preemption notice), and started again on
the same directory ends with exactly the metrics of an uninterrupted run of the same seed, with no metric line lost
or duplicated. SIGTERM additionally writes a checkpoint of the last finished step and exits with status 75.

Tolerance: every non-timing metric must agree to 1e-6 (relative). On CPU with the same thread count the runs are in
fact bit-identical: each step's prompts, sampling and mini-batch order come from (seed, step)-keyed generators, and
the checkpoint restores model, AdamW moments, scheduler and RNG states exactly.

The LoRA variant checkpoints the adapters alone (the frozen base is reloaded from the model directory); it uses the
partial-credit reward of tests/data/my_rewards.py so that the policy actually moves within 14 steps of this tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import importlib.util
import time

import pytest

from metrics_check import assert_same_records, metric_lines

ARGS = dict(hidden=32, layers=1, heads=2, warmup_steps=20, warmup_batch=32, task_digits=2, eval_per_level=10,
            prompts_per_step=4, group_size=4, minibatches=2, steps=14, eval_every=5, eval_samples=1, ckpt_every=3,
            threads=1, lr=1e-3)
DATA = os.path.join(os.path.dirname(__file__), "data")
LORA = ["--lora_rank", "4", "--reward", "my_rewards:contains_answer", "--lr", "1e-2"]


def _cmd(out, cache, extra=()):
    cmd = [sys.executable, "-m", "dppo", "train", "--out", str(out), "--cache_dir", str(cache), "--no-progress",
           "--no-plot", "--no-tensorboard"]
    for k, v in ARGS.items():
        cmd += [f"--{k}", str(v)]
    return cmd + list(extra)




_REFERENCE: dict = {}


_NO_PEFT = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                              reason="peft not installed (pip install 'dppo[lora]')")


@pytest.mark.parametrize("extra, sig", [
    pytest.param((), signal.SIGKILL, id="full-SIGKILL"),
    pytest.param((), signal.SIGTERM, id="full-SIGTERM"),
    pytest.param(LORA, signal.SIGKILL, id="lora-SIGKILL", marks=_NO_PEFT),  # the stop path is the same with LoRA
])
def test_interrupted_resume_matches_uninterrupted(tmp_path_factory, tmp_path, monkeypatch, extra, sig):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [DATA, os.environ.get("PYTHONPATH")])))
    key = tuple(extra)
    if key not in _REFERENCE:  # one uninterrupted reference per setting, shared by both signals
        base = tmp_path_factory.mktemp("ref")
        subprocess.run(_cmd(base / "ref", base / "cache", extra), check=True, capture_output=True, timeout=180)
        _REFERENCE[key] = base
    cache, ref, run = _REFERENCE[key] / "cache", _REFERENCE[key] / "ref", tmp_path / "run"

    p = subprocess.Popen(_cmd(run, cache, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if len(metric_lines(run / "metrics.jsonl")) >= 6:  # steps 0..5 written; last periodic checkpoint at step 3
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be stopped; make it longer"
    t0 = time.time()
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=60)
    killed_at = len(metric_lines(run / "metrics.jsonl")) - 1
    assert killed_at < ARGS["steps"]
    if sig == signal.SIGTERM:
        from dppo.checkpoint import latest_step

        assert p.returncode == 75 and time.time() - t0 < 30, (p.returncode, err[-2000:])
        assert f"stopped by SIGTERM after step {killed_at} of {ARGS['steps']}" in err
        assert "run the same command again to resume" in err
        assert latest_step(str(run)) == killed_at  # a checkpoint of the last finished step, beyond the periodic one
        assert not os.path.exists(run / "final")
    else:
        assert p.returncode == -signal.SIGKILL

    subprocess.run(_cmd(run, cache, extra), check=True, capture_output=True, timeout=180)
    a, b = metric_lines(ref / "metrics.jsonl"), metric_lines(run / "metrics.jsonl")
    if extra:
        assert max(r.get("grad_norm", 0.0) for r in a) > 0, "the policy never moved: the test would prove nothing"
    assert [r["step"] for r in b] == list(range(ARGS["steps"] + 1)), "a metric line was lost or duplicated"
    assert [r["step"] for r in a] == [r["step"] for r in b]
    starts = [json.loads(x)["start_step"] for x in (run / "machine.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and len(starts) == 2 and 0 < starts[1] <= killed_at  # resumed from its checkpoint
    assert_same_records(a, b)
