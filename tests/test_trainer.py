"""End-to-end trainer tests on a tiny model: smoke run, CLI, bad configs, NaN stop, real-model path, method paths.

Every run uses the same tiny settings (hidden 32, 1 layer, 20 warm-up steps cached once per session), so the whole
file takes well under a minute on 2 CPU cores. The SIGKILL-resume test lives in test_trainer_resume.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from dppo.run.cli import build_parser, parse_config
from dppo.run.config import ConfigError, TrainConfig
from dppo.run.metrics_log import read_metrics

TINY = dict(hidden=32, layers=1, heads=2, warmup_steps=20, warmup_batch=32, task_digits=2, eval_per_level=10,
            prompts_per_step=4, group_size=4, minibatches=2, steps=3, eval_every=2, eval_samples=1, ckpt_every=2,
            threads=1, progress=False, lr=1e-3)

REQUIRED_KEYS = [
    "reward", "accuracy", "response_len", "entropy", "loss/abs_diff_mean", "loss/abs_diff_max", "loss/abs_diff_min",
    "loss/diff_max", "loss/diff_min", "loss/masked_frac", "loss/masked_frac_pos", "loss/masked_frac_neg",
    "loss/div_mean", "loss/ratio_max", "grad_norm", "tokens_per_s", "time/rollout", "time/train", "time/recompute",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dppo_cache"))


def tiny_cfg(out, cache_dir, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), cache_dir=cache_dir, **{**TINY, **kw})


def test_smoke_run(tmp_path, cache_dir):
    from dppo.run.trainer import train

    out = tmp_path / "run"
    logged = []
    train(tiny_cfg(out, cache_dir), log=logged.append)
    rows = read_metrics(str(out / "metrics.jsonl"))
    a, b = rows[0]["eval/accuracy"], rows[3]["eval/accuracy"]
    assert f"held-out accuracy {a:.3f} (step 0) → {b:.3f} (step 3)" in logged[-2]  # before the "curves:" line
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[3]
    for r in rows[1:]:
        for k in REQUIRED_KEYS:
            assert k in r, k
        assert 0 <= r["reward"] <= 1 and r["loss/abs_diff_mean"] >= 0
        assert r["loss/diff_min"] <= r["loss/diff_max"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "dppo-binary-tv" and saved["seed"] == 0
    assert os.path.isfile(out / "checkpoint" / "state.pt")
    assert os.path.isfile(out / "curves.png")
    assert os.path.isdir(out / "tb") and os.listdir(out / "tb")
    assert os.path.isfile(out / "final" / "config.json")  # loadable with --model
    (machine,) = [json.loads(x) for x in (out / "machine.jsonl").read_text().splitlines()]
    assert machine["start_step"] == 0 and machine["torch"] == torch.__version__
    assert machine["cpu_count"] == os.cpu_count() and machine["torch_threads"] == 1  # TINY sets threads=1


def test_cli_subprocess_smoke_and_plot(tmp_path, cache_dir):
    """`python -m dppo train` and `python -m dppo plot` as a user runs them."""
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "dppo", "train", "--out", str(out), "--cache_dir", cache_dir, "--no-plot",
            "--no-tensorboard"]
    for k, v in TINY.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no-{k}")
        else:
            args += [f"--{k}", str(v)]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)
    assert len(read_metrics(str(out / "metrics.jsonl"))) == 4
    r = subprocess.run([sys.executable, "-m", "dppo", "plot", str(out)], check=True, capture_output=True, text=True)
    assert r.stdout.strip().endswith("curves.png") and os.path.isfile(out / "curves.png")


def test_help_lists_every_option_with_default_and_citation():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    assert "default: dppo-binary-tv" in text and "§5.1" in text and "Table 1" in text
    cfg = parse_config(["--method", "grpo", "--ratio_cap", "inf", "--no-tensorboard"])
    assert cfg.method == "grpo" and cfg.ratio_cap == float("inf") and cfg.tensorboard is False


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(method="ppo2"), "--method 'ppo2' is not a preset"),
        (dict(group_size=1), "--group_size 1"),
        (dict(prompts_per_step=3, group_size=3, minibatches=4), "--minibatches"),
        (dict(model="/nonexistent/model"), "--model '/nonexistent/model' is not a directory"),
        (dict(micro_batch_size=3), "--micro_batch_size"),
        (dict(task="jsonl"), "needs a real model"),
        (dict(delta_low=0.0), "--delta_low"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, monkeypatch, kw, needle):
    import dppo.run.warmup
    from dppo.run.trainer import train

    def boom(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(dppo.run.warmup, "warm_start", boom)
    monkeypatch.setattr("dppo.hf.model.load_model", boom)
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        train(tiny_cfg(tmp_path / "bad", str(tmp_path / "c"), **kw), log=lambda m: None)
    assert not os.path.exists(tmp_path / "bad")


def test_bad_config_cli_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dppo", "train", "--out", str(tmp_path / "x"), "--group_size", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--group_size 1" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    import dppo.run.trainer as tr

    real = tr.policy_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, m = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 2 * TINY["minibatches"]:  # steps 1–2 fine, step 3 blows up
            loss = loss * float("nan")
        return loss, m

    monkeypatch.setattr(tr, "policy_loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(tr.NonFiniteError, match=r"step 3.*last good checkpoint \(step 2\)"):
        tr.train(tiny_cfg(out, cache_dir, steps=5), log=lambda m: None)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [0, 1, 2]


@pytest.mark.parametrize("method", ["dppo-binary-kl-recompute", "dppo-topk-tv", "grpo", "drpo"])
def test_method_paths_run(tmp_path, cache_dir, method):
    """Recompute anchors get the extra forward (timed), Top-K methods get μ's top-K from the rollout."""
    from dppo.run.trainer import train

    rows = train(tiny_cfg(tmp_path / method, cache_dir, method=method, steps=1, eval_every=0, plot=False,
                          tensorboard=False), log=lambda m: None)
    r = rows[-1]
    assert r["step"] == 1 and all(k in r for k in REQUIRED_KEYS)
    if method.endswith("recompute"):
        assert r["time/recompute"] > 0
    else:
        assert r["time/recompute"] < 1e-3


def _save_tiny_real_model(path):
    """A tiny model + tokenizer with a chat template, saved like a hub checkpoint."""
    from dppo.hf.model import build_char_tokenizer, build_tiny_model

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?:+-*/=%^{}\\()\n<>|_"
    tok = build_char_tokenizer(alphabet)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, max_positions=256,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_local_model_path_with_chat_template_and_jsonl(tmp_path):
    from dppo.run.trainer import Trainer, train

    model_dir = tmp_path / "model"
    _save_tiny_real_model(str(model_dir))
    cfg = TrainConfig(out=str(tmp_path / "real"), model=str(model_dir), task="jsonl", max_new_tokens=6,
                      prompts_per_step=2, group_size=2, minibatches=2, steps=1, eval_every=0, eval_samples=1,
                      threads=1, progress=False, plot=False, tensorboard=False, rollout_dtype="fp32")
    rows = train(cfg, log=lambda m: None)
    assert rows[-1]["step"] == 1 and rows[-1]["response_len"] <= 6
    t = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "r2")), log=lambda m: None)
    ro, _, _, _ = t.rollout(0)
    prompt = t.tok.decode(ro.prompt_ids[0][ro.prompt_mask[0]])
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")  # chat template applied


def test_custom_reward_function(tmp_path, cache_dir, monkeypatch):
    from dppo.run.trainer import train

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "data"))
    rows = train(tiny_cfg(tmp_path / "cr", cache_dir, reward="my_rewards:contains_answer", steps=1, eval_every=0,
                          plot=False, tensorboard=False), log=lambda m: None)
    assert rows[-1]["reward"] >= rows[-1]["accuracy"]  # partial credit 0.5 for any digit


@pytest.mark.parametrize("rollout_dtype", ["fp32", "bf16"])
def test_pre_update_mismatch_isolates_the_engine(tmp_path, cache_dir, monkeypatch, rollout_dtype):
    """mismatch/* is measured before the step's first update, so with an fp32 engine (same weights, same precision,
    only KV-cache vs full-sequence kernels differ) it is ~0: the whole pipeline (temperature, position ids, response
    offsets) lines up. A bf16 engine shows a real mismatch, and the all-updates |π−μ| includes the policy's drift."""
    from dppo.run.trainer import train

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "data"))  # partial credit: Â ≠ 0, π moves
    rows = train(tiny_cfg(tmp_path / rollout_dtype, cache_dir, rollout_dtype=rollout_dtype, steps=2, eval_every=0,
                          plot=False, tensorboard=False, lr=1e-2, reward="my_rewards:contains_answer"),
                 log=lambda m: None)
    for r in rows[1:]:
        pre, dl, mx = r["mismatch/abs_diff_mean"], r["mismatch/abs_dlogp_mean"], r["mismatch/abs_diff_max"]
        assert 0 <= pre <= mx
        if rollout_dtype == "fp32":
            assert dl < 1e-5 and mx < 1e-5, r
            assert r["loss/abs_diff_mean"] > 100 * max(pre, 1e-7)  # later mini-batches see the updated policy
        else:
            assert 1e-6 < pre < 0.05 and dl > 1e-6, r  # fp32 gives ~1e-9


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_does_not_change_the_update(tmp_path, cache_dir, monkeypatch, aggregation):
    """--micro_batch_size accumulates gradients with the mini-batch's aggregation denominator, so the same step gives
    the same loss and gradient norms as one forward per mini-batch (fp32 summation order aside), even for the means
    whose micro-batches hold different numbers of tokens."""
    from dppo.run.trainer import train

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "data"))  # partial credit: Â ≠ 0
    kw = dict(steps=1, eval_every=0, plot=False, tensorboard=False, aggregation=aggregation,
              reward="my_rewards:contains_answer", max_new_tokens=4)
    whole = train(tiny_cfg(tmp_path / "whole", cache_dir, **kw), log=lambda m: None)[-1]
    micro = train(tiny_cfg(tmp_path / "micro", cache_dir, micro_batch_size=2, **kw), log=lambda m: None)[-1]
    assert whole["reward"] == micro["reward"] and whole["grad_norm"] > 0
    lens = {r["response_len"] for r in (whole, micro)}
    assert len(lens) == 1
    for key in ("loss/loss", "grad_norm", "grad_norm_max", "loss/abs_diff_mean"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-8), key
