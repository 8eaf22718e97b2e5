"""Stale and asynchronous rollouts (--rollout_lag k, --async_rollout k) and the FP8 engine (--rollout_dtype fp8).

- ``--rollout_lag k``: step t's batch is sampled with the policy of the start of step max(t−k, 0), checked against a
  recomputation: an engine loaded with that saved policy and the same per-prompt seeds samples the same tokens, and
  a fresh forward of that policy gives the recorded log μ; the current policy does not.
- ``--async_rollout 1`` computes exactly what ``--rollout_lag 1`` does (same samples, same updates: every metric
  equal), and learns (reward rises on a task a tiny model masters in seconds).
- A rollout worker killed mid-run stops the run with status 8 and a message naming it and the step; a SIGTERM
  checkpoints and exits 75; a killed trainer takes its worker with it. Each resumed run equals the uninterrupted one.
- FP8 weights: :func:`fp8_quantize` against a round-to-nearest over the 256 e4m3 codes; the FP8 engine's mismatch
  is larger than the bf16 engine's on the same weights and tokens.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metrics_check import assert_same_records, metric_lines
from test_trainer import cache_dir, tiny_cfg  # noqa: F401 (the session's cached warm-up)

DATA = os.path.join(os.path.dirname(__file__), "data")


# ---------------------------------------------------------------------------------------------------------------------
# --rollout_lag: the batch of step t comes from w_{t−k}
@pytest.mark.parametrize("lag", [1, 2])
def test_lag_samples_with_the_policy_of_k_steps_before(tmp_path, cache_dir, lag, monkeypatch):
    from dppo.engines import HFEngine
    from dppo.hf.model import response_stats
    from dppo.run.trainer import Trainer

    monkeypatch.syspath_prepend(DATA)  # a reward the tiny model gets partly right: non-zero advantages, a moving policy
    tr = Trainer(tiny_cfg(tmp_path / "run", cache_dir, rollout_lag=lag, rollout_dtype="fp32", steps=4, lr=1e-2,
                          eval_every=0, reward="my_rewards:share_of_ones", prompts_per_step=8, group_size=8), log=lambda m: None)
    saved, captured = [], {}
    rollout = tr.rollout

    def capture(step):
        captured[step] = out = rollout(step)
        return out

    tr.rollout = capture
    for step in range(4):
        saved.append(copy.deepcopy(tr.model.state_dict()))  # w_step
        rec = tr.step(step)
        assert rec["rollout/lag"] == min(step, lag)
    tr.close()
    g = tr.cfg.rollout.group_size
    for step in range(1, 4):
        ro = captured[step][0]
        old = copy.deepcopy(tr.model)
        old.load_state_dict(saved[max(step - lag, 0)])
        # the same tokens from an engine holding w_{step−k} and the step's per-prompt seeds
        _, ids, mask, seeds = tr._batch_inputs(step)
        again = HFEngine(old, eos_token_id=tr.engine.eos.tolist(), pad_token_id=tr.tok.pad_token_id,
                         dtype="fp32").generate(ids, mask, tr.sampling, num_samples=g, seeds=seeds)
        assert torch.equal(again.response_ids, ro.response_ids)
        # log μ recorded = log π_{w_{step−k}} at those tokens; the policy of the step itself differs
        m = ro.response_mask

        def logp(model):
            with torch.no_grad():
                return response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0).logp

        assert (logp(old) - ro.rollout_logp)[m].abs().max() < 1e-5
        now = copy.deepcopy(tr.model)
        now.load_state_dict(saved[step])
        assert (logp(now) - ro.rollout_logp)[m].abs().max() > 1e-3  # lr 1e-2: the policy moved in between


# ---------------------------------------------------------------------------------------------------------------------
# --async_rollout: the same run as --rollout_lag, overlapped; it learns; failures and resume
ARGS = dict(hidden=32, layers=1, heads=2, warmup_steps=20, warmup_batch=32, task_digits=2, eval_per_level=10,
            prompts_per_step=8, group_size=8, minibatches=2, steps=12, eval_every=4, eval_samples=1, ckpt_every=3,
            threads=1, lr=1e-2, reward="my_rewards:starts_with_seven")


def _cmd(out, cache, *extra):
    cmd = [sys.executable, "-m", "dppo", "train", "--out", str(out), "--cache_dir", str(cache), "--no-progress",
           "--no-plot", "--no-tensorboard"]
    for k, v in ARGS.items():
        cmd += [f"--{k}", str(v)]
    return cmd + list(extra)


@pytest.fixture(scope="module")
def lag_reference(tmp_path_factory):
    """(cache, run) of the synchronous --rollout_lag 1 run every async run below must reproduce."""
    base = tmp_path_factory.mktemp("lag1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [DATA, os.environ.get("PYTHONPATH")]))}
    subprocess.run(_cmd(base / "ref", base / "cache", "--rollout_lag", "1"), check=True, capture_output=True,
                   timeout=300, env=env)
    return base / "cache", base / "ref"


@pytest.fixture
def data_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [DATA, os.environ.get("PYTHONPATH")])))


def test_async_equals_lag_and_learns(tmp_path, lag_reference, data_path):
    cache, ref = lag_reference
    run = tmp_path / "async"
    subprocess.run(_cmd(run, cache, "--async_rollout", "1"), check=True, capture_output=True, timeout=300)
    a, b = metric_lines(ref / "metrics.jsonl"), metric_lines(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(ARGS["steps"] + 1))
    assert_same_records(a, b)  # same samples, same updates, step by step
    steps = [r for r in b if "reward" in r]
    assert [r["rollout/lag"] for r in steps] == [0.0] + [1.0] * (ARGS["steps"] - 1)
    assert all(r["time/rollout_worker"] > 0 for r in steps)
    rewards = [r["reward"] for r in steps]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3 and last > 0.6, rewards  # it learns (a sign error would make the reward fall)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _worker_of(pid: int) -> int:
    """The rollout worker: the child of the trainer whose command line is multiprocessing's spawn entry."""
    for c in _children(pid):
        with open(f"/proc/{c}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return c
    raise AssertionError(f"no rollout worker among the children of {pid}")


@pytest.mark.parametrize("what", ["worker-SIGKILL", "trainer-SIGTERM", "trainer-SIGKILL"])
def test_async_failures_and_resume(tmp_path, lag_reference, data_path, what):
    cache, ref = lag_reference
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(run, cache, "--async_rollout", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and len(metric_lines(run / "metrics.jsonl")) < 5:
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be stopped; make it longer"
    worker = _worker_of(p.pid)
    if what == "worker-SIGKILL":
        os.kill(worker, signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 8, err[-2000:]
        assert f"the rollout worker process (pid {worker}) died (killed by signal 9)" in err
        assert "run the same command again to resume" in err and "step " in err
    elif what == "trainer-SIGTERM":
        os.kill(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 75, err[-2000:]
    else:  # nothing is left behind; resuming after a SIGKILL is the synchronous path's (test_trainer_resume)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        t0 = time.time()
        while os.path.exists(f"/proc/{worker}") and time.time() - t0 < 10:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{worker}"), "the worker outlived its killed trainer"
        return
    assert not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z"
    subprocess.run(_cmd(run, cache, "--async_rollout", "1"), check=True, capture_output=True, timeout=300)
    a, b = metric_lines(ref / "metrics.jsonl"), metric_lines(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(ARGS["steps"] + 1)), "a metric line was lost or duplicated"
    assert_same_records(a, b)


def test_config_errors(tmp_path):
    from dppo.run.config import ConfigError, make_config
    from dppo.run.validate import validate

    for kw, msg in [(dict(rollout_lag=-1), "--rollout_lag must be >= 0"),
                    (dict(async_rollout=2, rollout_lag=1), "give one of them"),
                    (dict(rollout_threads=-1), "--rollout_threads must be >= 0")]:
        with pytest.raises(ConfigError, match=msg):
            validate(make_config(out=str(tmp_path), **kw))
    if __import__("importlib").util.find_spec("vllm") is not None:
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            validate(make_config(out=str(tmp_path), engine="vllm", rollout_dtype="fp8"))


def test_resume_with_another_lag_is_refused(tmp_path, cache_dir):
    from dppo.run.config import ConfigError
    from dppo.run.loop import train

    out = tmp_path / "run"
    train(tiny_cfg(out, cache_dir, steps=2, ckpt_every=1, eval_every=0, rollout_lag=1, plot=False,
                   tensorboard=False), log=lambda m: None)
    with pytest.raises(ConfigError, match="rollout.lag"):
        train(tiny_cfg(out, cache_dir, steps=3, ckpt_every=1, eval_every=0, rollout_lag=2, plot=False,
                       tensorboard=False), log=lambda m: None)


# ---------------------------------------------------------------------------------------------------------------------
# FP8 weights
def _nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round each fp32 value to the nearest finite float8 e4m3fn value by search over all 256 codes (ties to the
    code with an even mantissa, i.e. an even code)."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ok = torch.isfinite(codes)
    vals, idx = codes[ok].double(), torch.arange(256)[ok]
    d = (x.double().reshape(-1, 1) - vals).abs()
    best = d.min(1, keepdim=True).values
    cand = (d == best)
    even = cand & (idx % 2 == 0)
    pick = torch.where(even.any(1, keepdim=True), even, cand).float().argmax(1)
    return vals[pick].float().view(x.shape)


def test_fp8_quantize_is_per_channel_round_to_nearest():
    from dppo.engines.weights import FP8_MAX, fp8_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=g) * torch.logspace(-3, 1, 7)[:, None]
    w[3] = 0.0  # a zero row
    got = fp8_quantize(w, torch.float32)
    amax = w.abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    want = _nearest_e4m3(w / scale) * scale
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.equal(got[3], torch.zeros(33))
    rows = [i for i in range(7) if i != 3]
    assert torch.allclose(got[rows].abs().amax(1), amax[rows, 0], rtol=1e-6)  # each row's max is exact
    rel = ((got - w).abs() / amax)[rows].max()
    assert 0 < rel <= 2 ** -4  # e4m3 has 3 mantissa bits: at most half an ulp (2^-4 of the binade) of the row's max
    assert got.dtype == torch.float32 and fp8_quantize(w).dtype == torch.bfloat16


def test_fp8_engine_mismatch_exceeds_bf16_on_the_same_weights(tmp_path, cache_dir):
    """The same fp32 policy, the same sampled tokens: the FP8 engine's |π − μ| at them is larger than the bf16
    engine's; its embedding and head are left in bf16 (only the linear layers are FP8)."""
    from dppo.engines import HFEngine
    from dppo.hf.model import response_stats
    from dppo.run.trainer import Trainer

    tr = Trainer(tiny_cfg(tmp_path / "run", cache_dir, rollout_dtype="fp32", prompts_per_step=8, group_size=8,
                          eval_every=0), log=lambda m: None)
    ro = tr.rollout(0)[0]
    m = ro.response_mask

    def probs(model):
        with torch.no_grad():
            return response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0).logp.exp()

    pi = probs(tr.model)
    gaps = {}
    for dt in ("bf16", "fp8"):
        eng = HFEngine(tr.model, eos_token_id=2, pad_token_id=tr.tok.pad_token_id, dtype=dt)
        eng.sync(tr.model)
        gaps[dt] = float((probs(eng.model).float() - pi)[m].abs().mean())
        if dt == "fp8":
            emb = eng.model.get_input_embeddings().weight
            assert torch.equal(emb, tr.model.get_input_embeddings().weight.to(torch.bfloat16))
            q = eng.model.model.layers[0].self_attn.q_proj.weight
            assert not torch.equal(q, tr.model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16))
    tr.close()
    assert gaps["fp8"] > 1.2 * gaps["bf16"] > 0, gaps
