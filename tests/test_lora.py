"""LoRA (``--lora_rank``, through peft) and ``--gradient_checkpointing`` in the trainer, on the tiny model of
test_trainer.py.

The warm-up of these tests is too short for the arithmetic reward to vary within a group (all-zero advantages, zero
gradients), so the runs that must move the policy use the partial-credit reward of tests/data/my_rewards.py.

Tolerances:
- base weights, optimizer contents, engine weights vs bf16(merged): exact (bit-identical);
- bf16 engine log μ vs fp32 adapted policy log π: max 0.05, mean 5e-3 nats (bf16 weights/activations: mean |π−μ| is
  ~1e-3 on this model before any update), while the same updates move log π by a mean of > 0.05 nats;
- merged fp32 model vs base + adapter, and the fp32 engine vs the policy: 1e-5 (fp32 rounding of W + B·A, and of the
  KV-cache decode vs the full forward);
- gradient checkpointing on vs off: rtol 1e-6 / atol 1e-9 on loss metrics and gradients (the recompute runs the same
  kernels on the same inputs; on CPU they come out bit-identical).
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

peft = pytest.importorskip("peft")

from dppo.run.config import ConfigError  # noqa: E402
from dppo.rundir.metrics_log import read_metrics  # noqa: E402
from dppo.hf.model import load_model, response_stats  # noqa: E402
from metrics_check import TIMING, assert_same_records  # noqa: E402
from test_trainer import tiny_cfg  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dppo_cache_lora"))


@pytest.fixture
def partial_reward(monkeypatch):
    monkeypatch.syspath_prepend(DATA)
    return "my_rewards:contains_answer"


def lora_cfg(out, cache_dir, reward, **kw):
    base = dict(lora_rank=4, reward=reward, lr=1e-2, eval_every=0, plot=False, tensorboard=False)
    return tiny_cfg(out, cache_dir, **{**base, **kw})


def _trainer(cfg):
    from dppo.run.trainer import Trainer

    return Trainer(cfg, log=lambda m: None)


def _analytic_lora_count(model_path: str, rank: int, names: set[str] | None) -> int:
    """r·(in + out) over the plain model's Linear layers, the output layer excluded (what all-linear adapts), or only
    those whose last name component is in ``names``."""
    model, _ = load_model(model_path)
    head = model.get_output_embeddings()
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head
               and (names is None or n.rsplit(".", 1)[-1] in names))


@pytest.mark.parametrize("target, names", [("all-linear", None), ("q_proj,v_proj", {"q_proj", "v_proj"})])
def test_only_adapters_train_and_count_is_analytic(tmp_path, cache_dir, partial_reward, target, names):
    t = _trainer(lora_cfg(tmp_path / "r", cache_dir, partial_reward, lora_target=target))
    assert t.n_trainable == _analytic_lora_count(t.model_path, 4, names)
    assert {id(p) for g in t.optimizer.param_groups for p in g["params"]} == {id(p) for p in t.params}
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    norms = [t.step(s)["grad_norm"] for s in range(2)]
    assert max(norms) > 0
    for n, p in t.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, trained[n]) for n, p in t.model.named_parameters() if n in trained)


def test_engine_samples_the_adapted_policy(tmp_path, cache_dir, partial_reward):
    """After LoRA updates the bf16 engine holds exactly bf16(W + (α/r)·B·A) (peft's own merge as the reference), and its
    log μ matches the fp32 policy's log π to bf16 precision, while the updates moved log π far more than that."""
    t = _trainer(lora_cfg(tmp_path / "r", cache_dir, partial_reward))
    ro0, *_ = t.rollout(0)
    before = t.logp(ro0)
    for s in range(3):
        t.step(s)
    ro, *_ = t.rollout(3)  # syncs the engine
    merged = copy.deepcopy(t.model).merge_and_unload()
    ref = dict(merged.named_parameters())
    for n, p in t.engine.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ref[n].to(torch.bfloat16)), n
    now, moved = t.logp(ro), t.logp(ro0)
    m = ro.response_mask
    diff = (now - ro.rollout_logp).abs()[m]
    assert diff.max() < 0.05 and diff.mean() < 5e-3, (diff.max(), diff.mean())
    assert (moved - before).abs()[ro0.response_mask].mean() > 0.05  # the check above would see a stale engine

    # the hidden-state path of response_stats (decoder body + lm-head through the PeftModel) is the adapted forward
    from dppo.token_stats import token_stats_from_logits

    with torch.no_grad():
        pos = (ro.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = t.model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
        T = ro.response_ids.shape[1]
        via_logits = token_stats_from_logits(logits[:, -T - 1:-1], ro.response_ids, temperature=1.0).logp
    torch.testing.assert_close(now[m], via_logits[m], rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_fp32_head_engine_follows_the_policy(tmp_path, cache_dir, partial_reward, lora_rank):
    """--rollout_fp32_head through the trainer: after updates and a sync, the engine's fp32 head is the policy's head
    weight bit for bit (through the peft wrapper with LoRA, which never adapts the head) and log μ tracks log π."""
    t = _trainer(lora_cfg(tmp_path / "r", cache_dir, partial_reward, lora_rank=lora_rank, rollout_fp32_head=True))
    head = (t.model.get_base_model() if lora_rank else t.model).get_output_embeddings().weight
    start = head.detach().clone()
    for s in range(2):
        t.step(s)
    ro, *_ = t.rollout(2)  # syncs the engine
    assert lora_rank or not torch.equal(head, start)  # full fine-tuning moved the (tied) head
    assert t.engine._head32[0].dtype == torch.float32 and torch.equal(t.engine._head32[0], head.detach())
    lp = t.logp(ro)
    diff = (lp - ro.rollout_logp).abs()[ro.response_mask]
    assert diff.max() < 0.05 and diff.mean() < 5e-3, (diff.max(), diff.mean())


def test_fp32_engine_shares_the_adapted_module(tmp_path, cache_dir, partial_reward):
    t = _trainer(lora_cfg(tmp_path / "r", cache_dir, partial_reward, rollout_dtype="fp32"))
    assert t.engine.shared
    for s in range(2):
        t.step(s)
    ro, *_ = t.rollout(2)
    lp = t.logp(ro)
    torch.testing.assert_close(lp[ro.response_mask], ro.rollout_logp[ro.response_mask], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # inside peft's from_pretrained
def test_final_merged_model_loads_and_matches_adapter(tmp_path, cache_dir, partial_reward):
    from peft import PeftModel

    from dppo.run.loop import train

    out = tmp_path / "run"
    cfg = lora_cfg(out, cache_dir, partial_reward, steps=3)
    train(cfg, log=lambda m: None)
    assert os.path.isfile(out / "final" / "config.json") and not os.path.exists(out / "final" / "adapter_config.json")
    assert os.path.isfile(out / "final_adapter" / "adapter_config.json")
    state = torch.load(out / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    assert state["model"] and all("lora_" in k for k in state["model"])  # the adapter, not a copy of the model

    merged, tok = load_model(str(out / "final"))  # what --model RUN/final does
    base_path = state["extra"]["model_path"]
    adapted = PeftModel.from_pretrained(load_model(base_path)[0], str(out / "final_adapter")).eval()
    plain = load_model(base_path)[0].eval()
    ids = tok(["12+34=46", "7+8=15"], padding=True, return_tensors="pt")
    x, mask = ids["input_ids"], ids["attention_mask"].bool()
    resp = x[:, -3:]
    with torch.no_grad():
        a = response_stats(merged, x, mask, resp, temperature=1.0).logp
        b = response_stats(adapted, x, mask, resp, temperature=1.0).logp
        c = response_stats(plain, x, mask, resp, temperature=1.0).logp
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter did something


def test_resume_matches_uninterrupted(tmp_path, cache_dir, partial_reward):
    """Stopped after step 2 and started again on the same directory = one run of 4 steps (rel 1e-6; bit-identical
    on CPU): the adapter, its AdamW moments and the RNG come from the checkpoint, the frozen base from the model."""
    from dppo.run.loop import train

    kw = dict(steps=4, ckpt_every=2, eval_every=2)
    train(lora_cfg(tmp_path / "ref", cache_dir, partial_reward, **kw), log=lambda m: None)
    train(lora_cfg(tmp_path / "run", cache_dir, partial_reward, **{**kw, "steps": 2}), log=lambda m: None)
    train(lora_cfg(tmp_path / "run", cache_dir, partial_reward, **kw), log=lambda m: None)
    a, b = read_metrics(str(tmp_path / "ref" / "metrics.jsonl")), read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert any(r.get("grad_norm", 0) > 0 for r in a[3:])
    assert_same_records(a, b)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(lora_rank=-1), "--lora_rank must be >= 0"),
        (dict(lora_alpha=-1.0), "--lora_alpha must be >= 0"),
        (dict(lora_dropout=1.0), "--lora_dropout must be in [0, 1)"),
        (dict(lora_rank=4, lora_target="q_proj,,v_proj"), "--lora_target 'q_proj,,v_proj'"),
    ],
)
def test_bad_lora_config_fails_before_any_work(tmp_path, monkeypatch, kw, needle):
    import dppo.run.warmup
    from dppo.run.loop import train

    def boom(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(dppo.run.warmup, "warm_start_for", boom)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        train(tiny_cfg(tmp_path / "bad", str(tmp_path / "c"), **kw), log=lambda m: None)
    assert not os.path.exists(tmp_path / "bad")


def test_missing_peft_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from dppo.run.validate import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("pip install 'dppo[lora]'")):
        validate(tiny_cfg(tmp_path / "x", str(tmp_path / "c"), lora_rank=8))
    validate(tiny_cfg(tmp_path / "x", str(tmp_path / "c")))  # full fine-tuning does not need peft


@pytest.mark.parametrize("target, needle", [
    ("nonexistent_proj", "The model's Linear layers are: down_proj, gate_proj"),
    ("lm_head", "names the output layer lm_head; only the body's Linear layers are supported"),
])
def test_bad_lora_target_names_the_linear_layers(tmp_path, cache_dir, target, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _trainer(tiny_cfg(tmp_path / "r", cache_dir, lora_rank=4, lora_target=target))


def test_core_does_not_import_peft():
    import subprocess
    import sys

    code = ("import sys, dppo, dppo.run.trainer, dppo.rollout, dppo.hf.model, dppo.hf.lora, dppo.checkpoint; "
            "print('peft' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_same_loss_and_gradients(tmp_path, cache_dir, partial_reward, lora_rank):
    """One RL step with and without --gradient_checkpointing: same metrics, same gradients, same updated weights;
    and the checkpointed run really recomputes (each decoder layer's MLP runs again in the backward)."""
    runs = []
    for gc in (False, True):
        t = _trainer(lora_cfg(tmp_path / f"gc{gc}", cache_dir, partial_reward, lora_rank=lora_rank,
                              gradient_checkpointing=gc, method="dppo-binary-kl-recompute",
                              share_prompts=False))  # the same forward both ways; sharing: test_shared_prompt.py
        calls = []
        layer = t.model.get_decoder().layers[0]
        # a pre-hook: the recompute stops early (torch's non-reentrant checkpoint) once down_proj's input is back
        layer.mlp.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
        rec = t.step(0)
        runs.append((t, rec, calls))
    (t0, r0, c0), (t1, r1, c1) = runs
    assert r0["grad_norm"] > 0
    # with grad: one forward per mini-batch, plus its recompute in the backward when checkpointing
    assert c1.count(True) == c0.count(True) * 2 == 2 * t0.cfg.optim.minibatches
    for k in r0:
        if not k.startswith(TIMING):
            assert r1[k] == pytest.approx(r0[k], rel=1e-6, abs=1e-9), k
    named1 = dict(t1.model.named_parameters())
    for n, p in t0.model.named_parameters():
        q = named1[n]
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=n)
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-9, msg=n)
    # the engine (no grad) and evaluation are untouched by the switch
    assert t1.train_modules and all(not m.training for m in t1.train_modules)
    ev0, ev1 = t0.evaluate(1), t1.evaluate(1)
    assert {k: v for k, v in ev0.items() if not k.startswith(TIMING)} == \
        {k: v for k, v in ev1.items() if not k.startswith(TIMING)}



def test_lora_dropout_acts_in_the_training_forward_only(tmp_path, cache_dir, partial_reward):
    """--lora_dropout > 0: the adapters' dropout is on in the training forward (two forwards differ) and off in the
    rollout engine, the recomputed anchor and evaluation (they stay deterministic); a step still trains."""
    from dppo.run.batch import Batch

    t = _trainer(lora_cfg(tmp_path / "r", cache_dir, partial_reward, lora_dropout=0.5, rollout_dtype="fp32"))
    assert t.train_modules and all(isinstance(m, torch.nn.Dropout) for m in t.train_modules)
    t.step(0)  # B != 0 after an update, so dropout on the adapter input changes the output
    ro, *_ = t.rollout(1)
    b = Batch.from_rollout(ro, torch.zeros(ro.response_ids.shape[0]))
    a1, a2 = t.logp(ro), t.logp(ro)
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)  # no dropout without grad
    torch.testing.assert_close(a1[ro.response_mask], ro.rollout_logp[ro.response_mask], rtol=0, atol=1e-5)
    g1 = t._stats(b, grad=True).logp.detach()
    g2 = t._stats(b, grad=True).logp.detach()
    assert (g1 - g2).abs()[ro.response_mask].max() > 1e-6  # dropout is live in the training forward
    assert all(not m.training for m in t.train_modules)  # and switched off again afterwards
