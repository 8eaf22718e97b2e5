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

from dppo.methods import method_from_dict, replace
from dppo.run.cli import parse_config
from dppo.run.config import ConfigError, TrainConfig, config_dict, flat_names, make_config
from dppo.rundir.metrics_log import read_metrics

TINY = dict(hidden=32, layers=1, heads=2, warmup_steps=20, warmup_batch=32, task_digits=2, eval_per_level=10,
            prompts_per_step=4, group_size=4, minibatches=2, steps=3, eval_every=2, eval_samples=1, ckpt_every=2,
            threads=1, progress=False, lr=1e-3)

REQUIRED_KEYS = [
    "reward", "accuracy", "response_len", "entropy", "loss/abs_diff_mean", "loss/abs_diff_max", "loss/abs_diff_min",
    "loss/diff_max", "loss/diff_min", "loss/masked_frac", "loss/masked_frac_pos", "loss/masked_frac_neg",
    "loss/div_mean", "loss/ratio_max", "grad_norm", "tokens_per_s", "time/rollout", "time/train", "time/recompute",
    "time/sync",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dppo_cache"))


def tiny_cfg(out, cache_dir, **kw) -> TrainConfig:
    return make_config(out=str(out), cache_dir=cache_dir, **{**TINY, **kw})


def test_smoke_run(tmp_path, cache_dir):
    from dppo.run.loop import train

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
    assert saved["method"]["name"] == "dppo-binary-tv" and saved["seed"] == 0
    method = json.loads((out / "method.json").read_text())
    assert method["mask.estimator"] == "binary_tv" and method["mask.delta_low"] == 0.15 and method["max_len_norm"] == 4
    assert method_from_dict(method) == replace("dppo-binary-tv", max_len_norm=4)  # every field, readable back
    assert os.path.isfile(out / "checkpoints" / "step-00000003" / "state.pt")
    assert os.path.isfile(out / "checkpoints" / "step-00000002" / "state.pt")  # the newest two are kept
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
    r = subprocess.run([sys.executable, "-m", "dppo", "train", "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    for flat, path in flat_names().items():  # every field under its one flat name, in its section's group
        assert f"--{flat}" in text and f"--{path}" not in text, path
    for sec in ("model", "task", "rollout", "method", "optim", "lora", "log"):
        assert f"{sec} options" in text, sec
    assert "(default: dppo-binary-tv)" in text and "§5.1" in text and "Table 1" in text
    cfg = parse_config(["--method", "grpo", "--ratio_cap", "inf", "--no-tensorboard", "--lr", "2e-5"])
    assert cfg.method.name == "grpo" and cfg.method.ratio_cap == float("inf") and cfg.log.tensorboard is False
    assert cfg.optim.lr == 2e-5 and cfg.method.delta_low is None  # None = the preset's value
    with pytest.raises(ConfigError, match=r"--optim\.lr: the flag is --lr"):
        parse_config(["--optim.lr", "2e-5"])


def test_config_file_round_trip_and_overrides(tmp_path):
    """--config loads a saved config.json (nested), a flat one (older runs) or TOML; flags after it override it."""
    from dppo.run.config import save_config

    cfg = make_config(lr=3e-5, lora_rank=8, method="cispo@ratio_cap=3", steps=7)
    save_config(cfg, str(tmp_path / "config.json"))
    back = parse_config(["--config", str(tmp_path / "config.json"), "--steps", "9"])
    assert config_dict(back) == {**config_dict(cfg), "steps": 9}
    (tmp_path / "flat.json").write_text(json.dumps({"lr": 1e-3, "rollout_dtype": "fp32", "method": "grpo"}))
    flat = parse_config(["--config", str(tmp_path / "flat.json")])
    assert (flat.optim.lr, flat.rollout.dtype, flat.method.name) == (1e-3, "fp32", "grpo")
    (tmp_path / "c.toml").write_text('steps = 3\n[optim]\nlr = 2e-6\n[lora]\nrank = 4\n')
    toml = parse_config(["--config", str(tmp_path / "c.toml")])
    assert (toml.steps, toml.optim.lr, toml.lora.rank) == (3, 2e-6, 4)
    with pytest.raises(ConfigError, match="unknown option 'lrr'"):
        make_config(lrr=1)


def test_method_spec_overrides_reach_the_run():
    from dppo.run.validate import fix_length_norm, resolve_method, validate

    m = resolve_method(make_config(method="cispo@ratio_cap=3"))
    assert validate(make_config(method="cispo@ratio_cap=3")) == m
    assert m.ratio_cap == 3.0 and m.name == "cispo@ratio_cap=3"
    m = fix_length_norm(resolve_method(make_config(method="dppo-binary-tv", delta_low=0.2, delta_high=0.25)), 9)
    assert (m.delta_low, m.delta_high, m.max_len_norm) == (0.2, 0.25, 9)
    with pytest.raises(ConfigError, match="unknown Method field"):
        resolve_method(make_config(method="cispo@ratio_capp=3"))


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(method="ppo2"), "--method 'ppo2': unknown method 'ppo2'"),
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
    from dppo.run.loop import train

    def boom(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(dppo.run.warmup, "warm_start_for", boom)
    monkeypatch.setattr("dppo.hf.model.load_model", boom)
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        train(tiny_cfg(tmp_path / "bad", str(tmp_path / "c"), **kw), log=lambda m: None)
    assert not os.path.exists(tmp_path / "bad")


def test_bad_config_cli_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dppo", "train", "--out", str(tmp_path / "x"), "--group_size", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--group_size 1" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    import dppo.run.loop as tr
    from dppo.run.trainer import Trainer

    real = Trainer._loss
    calls = {"n": 0}

    def flaky(self, *a, **k):
        loss, m, ent = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] > 2 * TINY["minibatches"]:  # steps 1–2 fine, step 3 blows up
            loss = loss * float("nan")
        return loss, m, ent

    monkeypatch.setattr(Trainer, "_loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(tr.NonFiniteError, match=r"step 3.*last good checkpoint \(step 2\)"):
        tr.train(tiny_cfg(out, cache_dir, steps=5), log=lambda m: None)
    from dppo.checkpoint import latest_step

    assert latest_step(str(out)) == 2
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [0, 1, 2]


@pytest.mark.parametrize("method", ["dppo-binary-kl-recompute", "dppo-topk-tv", "grpo", "drpo"])
def test_method_paths_run(tmp_path, cache_dir, method):
    """Recompute anchors get the extra forward (timed), Top-K methods get μ's top-K from the rollout."""
    from dppo.run.loop import train

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
    from dppo.run.loop import train
    from dppo.run.trainer import Trainer

    model_dir = tmp_path / "model"
    _save_tiny_real_model(str(model_dir))
    cfg = make_config(out=str(tmp_path / "real"), model=str(model_dir), task="jsonl", max_new_tokens=6,
                      prompts_per_step=2, group_size=2, minibatches=2, steps=1, eval_every=0, eval_samples=1,
                      threads=1, progress=False, plot=False, tensorboard=False, rollout_dtype="fp32")
    rows = train(cfg, log=lambda m: None)
    assert rows[-1]["step"] == 1 and rows[-1]["response_len"] <= 6
    t = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "r2")), log=lambda m: None)
    seen = {}
    real_generate = t.engine.generate

    def spy(ids, mask, *a, **k):
        seen["prompt"] = t.tok.decode(ids[0][mask[0]])
        return real_generate(ids, mask, *a, **k)

    t.engine.generate = spy
    t.step(0)
    assert seen["prompt"].startswith("<|user|>") and seen["prompt"].endswith("<|assistant|>")  # chat template


def test_custom_reward_function(tmp_path, cache_dir, monkeypatch):
    from dppo.run.loop import train

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "data"))
    rows = train(tiny_cfg(tmp_path / "cr", cache_dir, reward="my_rewards:contains_answer", steps=1, eval_every=0,
                          plot=False, tensorboard=False), log=lambda m: None)
    assert rows[-1]["reward"] >= rows[-1]["accuracy"]  # partial credit 0.5 for any digit


@pytest.mark.parametrize("rollout_dtype", ["fp32", "bf16"])
def test_pre_update_mismatch_isolates_the_engine(tmp_path, cache_dir, monkeypatch, rollout_dtype):
    """mismatch/* is measured before the step's first update, so with an fp32 engine (same weights, same precision,
    only KV-cache vs full-sequence kernels differ) it is ~0: the whole pipeline (temperature, position ids, response
    offsets) lines up. A bf16 engine shows a real mismatch, and the all-updates |π−μ| includes the policy's drift."""
    from dppo.run.loop import train

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
    from dppo.run.loop import train

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


def test_addition_steps_task_trains(tmp_path, cache_dir):
    """The long-response task runs through the whole trainer on the tiny model: its own warm-up (alphabet and
    demonstrations of the task), responses of tens of tokens, a reward in [0, 1], the response cap from the task."""
    from dppo.run.loop import train

    out = tmp_path / "steps"
    train(tiny_cfg(out, cache_dir, task="addition-steps", task_digits=2, task_num_problems=8, steps=2,
                   eval_every=0), log=lambda m: None)
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 0 <= r["reward"] <= 1 and 5 <= r["response_len"] <= 22  # 10·2 + 2 tokens at most
    assert json.loads((out / "config.json").read_text())["task"]["name"] == "addition-steps"


def test_leave_one_out_baseline_reaches_the_advantages(tmp_path, cache_dir, monkeypatch):
    """--adv_baseline leave-one-out (RLOO): Â_i = R_i − mean of the other G−1 = G/(G−1)·(R_i − group mean), on the
    same rollout as the default baseline."""
    from dppo.run.trainer import Trainer

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "data"))
    recs = [Trainer(tiny_cfg(tmp_path / b, cache_dir, adv_baseline=b, reward="my_rewards:share_of_ones"),
                    log=lambda m: None).step(0) for b in ("mean", "leave-one-out")]
    g = TINY["group_size"]
    assert recs[0]["reward"] == recs[1]["reward"] and recs[0]["adv_abs_mean"] > 0
    assert recs[1]["adv_abs_mean"] == pytest.approx(recs[0]["adv_abs_mean"] * g / (g - 1), rel=1e-6)
