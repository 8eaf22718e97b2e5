"""dppo.integrations.trl against the real TRL GRPOTrainer (1.16.0) on CPU, with a tiny Qwen3 saved to a temp dir.

* drift guard: the GRPOTrainer surface DPPOTrainer relies on (signatures, the options its loss reads, batch keys, the
  private members it names in PRIVATE_TRL);
* settings that cannot give the rollout's μ refused when the trainer is built (tools, unrecordable sampling, ...);
* on one fixed batch from a real rollout, for every preset: DPPOTrainer's loss and gradient = ``dppo.policy_loss`` on
  log π recomputed naively (full log_softmax of the logits), in float64; also across gradient accumulation;
* training runs for every preset with nothing but the method passed; the mask fires with several iterations per
  batch; the reward rises on a task the tiny model learns in seconds; the README example and examples/trl_dppo.py
  run as written.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import dppo  # noqa: E402
from dppo.hf.model import build_char_tokenizer, build_tiny_model  # noqa: E402
from dppo.integrations import trl as dtrl  # noqa: E402
from dppo.integrations.trl import DPPOConfig, DPPOTrainer  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_dppo.py"
PROMPTS = ["1+2=", "13+4=", "7+7=", "2+30="]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: with 2 threads every op of it waits for the second thread, which on a busy machine costs a
    scheduler quantum per op (measured: 8 training steps 15 s with 2 threads vs 1.1 s with 1 under load 9)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_char_tokenizer("0123456789+=ab")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _args(tmp_path, **kw) -> DPPOConfig:
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=8, max_steps=1, report_to=[], logging_steps=1, disable_tqdm=True, seed=0,
                save_strategy="no")
    return DPPOConfig(**{**base, **kw})


def _count_ones(completions, **_):
    return [c.count("1") / 8 for c in completions]


def _trainer(model_dir, args, reward=_count_ones, **kw):
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    return DPPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=ds, **kw)


# ------------------------------------------------------------------------------------------------ drift guard
# What TRL 1.16.0's GRPOTrainer._compute_loss reads (recorded from its source). A change means DPPOTrainer's override
# may now ignore a new option or key: check it, then handle or refuse it (DPPOConfig's _REPLACED) and update these.
COMPUTE_LOSS_ARGS = {"delta", "entropy_coef_delta", "entropy_coef_max", "entropy_coef_min", "entropy_target",
                     "sapo_temperature_neg", "sapo_temperature_pos", "steps_per_generation",
                     "use_bias_correction_kl", "vespo_k_neg", "vespo_k_pos", "vespo_lambda_neg", "vespo_lambda_pos"}
COMPUTE_LOSS_SELF = {"_entropy_bonus_enabled", "_entropy_window_stats", "_get_per_token_logps_and_entropies",
                     "_last_world_entropy", "_metrics", "accelerator", "aux_loss_enabled", "beta",
                     "current_gradient_accumulation_steps", "entropy_coef", "epsilon_high", "epsilon_low",
                     "get_gamma_weights", "get_high_entropy_mask", "get_off_policy_mask", "importance_sampling_level",
                     "loss_type", "max_completion_length", "model", "off_policy_mask_threshold",
                     "router_aux_loss_coef", "top_entropy_quantile", "use_adaptive_entropy", "use_vllm",
                     "vllm_importance_sampling_correction"}
COMPUTE_LOSS_INPUTS = {"advantages", "completion_ids", "completion_mask", "image_grid_thw", "image_position_ids",
                       "image_sizes", "importance_sampling_ratio", "mm_token_type_ids", "num_images",
                       "num_items_in_batch", "num_tiles", "old_per_token_logps", "pixel_attention_mask",
                       "pixel_values", "prompt_ids", "prompt_mask", "ref_per_token_logps",
                       "sampling_per_token_logps", "spatial_shapes", "token_type_ids", "tool_mask"}


def _diff(name, found, expected):
    assert found == expected, (
        f"TRL drift in {name}: new {sorted(found - expected)}, gone {sorted(expected - found)}. DPPOTrainer overrides "
        "GRPOTrainer._compute_loss: decide whether dppo's loss must honour or refuse these, then update this test")


def test_drift_trl_version_is_a_tested_one():
    import trl

    assert trl.__version__ in dtrl.TESTED_TRL, (
        f"TRL {trl.__version__} installed, dppo.integrations.trl is tested with {dtrl.TESTED_TRL}: rerun this file, "
        "fix what the drift tests report, then add it to TESTED_TRL and the `trl` extra in pyproject.toml")


def test_drift_what_grpo_compute_loss_reads():
    src = inspect.getsource(GRPOTrainer._compute_loss)
    _diff("self.args.*", set(re.findall(r"self\.args\.(\w+)", src)), COMPUTE_LOSS_ARGS)
    _diff("self.*", set(re.findall(r"self\.(?!args\.)(\w+)", src)), COMPUTE_LOSS_SELF)
    _diff("inputs keys", set(re.findall(r"inputs(?:\[|\.get\()\"(\w+)\"", src)), COMPUTE_LOSS_INPUTS)


def test_drift_signatures_dppo_relies_on():
    def params(f):
        return list(inspect.signature(f).parameters)

    assert params(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert params(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(GRPOTrainer._tokenize_prompts) == ["self", "prompts"]
    lp = params(GRPOTrainer._get_per_token_logps_and_entropies)
    assert lp[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"], lp
    missing = {"compute_entropy", "compute_aux_loss", *dtrl._MM_KEYS} - set(lp)
    assert not missing, f"_get_per_token_logps_and_entropies lost {missing}"
    assert GRPOTrainer.loss_is_scaled_for_ga is True, "DPPOTrainer scales its loss for accumulation itself"
    src = inspect.getsource(GRPOTrainer._generate)
    assert "self.rollout_func(prompts, self)" in src and '"logprobs"' in src, "rollout_func contract changed"


def test_drift_private_surface_is_what_dppo_names(model_dir, tmp_path):
    """DPPOTrainer overrides the public compute_loss and, for the Top-K transport, the private
    _generate_and_score_completions; every private GRPOTrainer member it uses is listed in PRIVATE_TRL and exists."""
    overridden = {k for k, v in vars(DPPOTrainer).items() if callable(v) and hasattr(GRPOTrainer, k)}
    assert overridden == {"__init__", "compute_loss", "_generate_and_score_completions"}, overridden
    src = inspect.getsource(dtrl)
    own = {k for k in vars(DPPOTrainer) if not hasattr(GRPOTrainer, k)}
    used = set(re.findall(r"(?:self|trainer|super\(\))\.(_[a-z]\w*)", src)) - own
    assert used == set(dtrl.PRIVATE_TRL), (
        f"private TRL members used {sorted(used)}, named {dtrl.PRIVATE_TRL}")
    t = _trainer(model_dir, _args(tmp_path))
    assert all(hasattr(t, name) for name in dtrl.PRIVATE_TRL)
    # TRL's public compute_loss only delegates to _compute_loss (whose reads the test above records): replacing it
    # replaces the whole loss and nothing else
    body = re.sub(r"\s+", " ", inspect.getsource(GRPOTrainer.compute_loss))
    assert body.strip().endswith("return self._compute_loss(model, inputs)"), body
    assert list(inspect.signature(GRPOTrainer.compute_loss).parameters) == list(
        inspect.signature(DPPOTrainer.compute_loss).parameters)


def test_drift_replaced_options_keep_trl_defaults():
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for name, (default, _) in dtrl._REPLACED.items():
        assert name in fields, f"GRPOConfig has no {name} any more"
        if name != "vllm_importance_sampling_correction":  # DPPOConfig changes this default on purpose
            assert fields[name].default == default, f"GRPOConfig.{name} default is now {fields[name].default!r}"
    assert DPPOConfig(output_dir="x", use_cpu=True).vllm_importance_sampling_correction is False


# ------------------------------------------------------------------------------------------------ refusals
_NON_DEFAULT = {"loss_type": "grpo", "epsilon": 0.3, "epsilon_high": 0.28, "delta": 3.0,
                "importance_sampling_level": "sequence", "beta": 0.04, "top_entropy_quantile": 0.2,
                "entropy_coef": 0.01, "use_adaptive_entropy": True, "off_policy_mask_threshold": 0.5,
                "vllm_importance_sampling_correction": True, "use_transformers_continuous_batching": True}


@pytest.mark.parametrize("name", sorted(dtrl._REPLACED))
def test_config_refuses_trl_loss_options(tmp_path, name):
    with pytest.raises(ValueError, match=rf"{name}=.*dppo's loss replaces"):
        _args(tmp_path, **{name: _NON_DEFAULT[name]})


def test_config_refuses_bad_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        _args(tmp_path, method="nope")
    with pytest.raises(ValueError, match="delta_low"):
        _args(tmp_path, delta_low=-1.0)


def test_batch_without_mu_is_refused(model_dir, tmp_path):
    def no_logprobs(prompts, trainer):
        ids = trainer.processing_class(text=prompts)["input_ids"]
        return {"prompt_ids": ids, "completion_ids": [[5, 6, 2]] * len(prompts), "logprobs": None}

    t = _trainer(model_dir, _args(tmp_path), rollout_func=no_logprobs)
    with pytest.raises(ValueError, match="no sampling_per_token_logps"):
        t.train()


def test_topk_needs_the_rollout_topk(model_dir, tmp_path):
    def no_topk(prompts, trainer):
        ids = trainer.processing_class(text=prompts)["input_ids"]
        n = len(prompts)
        return {"prompt_ids": ids, "completion_ids": [[5, 6, 2]] * n, "logprobs": [[-1.0] * 3] * n}

    t = _trainer(model_dir, _args(tmp_path, method="dppo-topk-tv"), rollout_func=no_topk)
    with pytest.raises(ValueError, match="rollout_topk_ids"):
        t.train()


def test_settings_that_lose_mu_are_refused_at_construction(model_dir, tmp_path):
    """Before any sampling: tools (TRL regenerates without log-probs unless it samples with its own vLLM), sampling
    options dppo's engines cannot record, two samplers at once, and a GRPOConfig."""
    def lookup(x: int) -> int:
        """Look a number up.

        Args:
            x: the number.
        """
        return x

    with pytest.raises(ValueError, match="tools / environment_factory need use_vllm=True"):
        _trainer(model_dir, _args(tmp_path), tools=[lookup])
    with pytest.raises(ValueError, match="with tools"):
        _trainer(model_dir, _args(tmp_path, method="dppo-topk-kl"), tools=[lookup])
    with pytest.raises(ValueError, match="repetition_penalty"):
        _trainer(model_dir, _args(tmp_path, repetition_penalty=1.1))
    with pytest.raises(ValueError, match="rollout_engine='hf' and a rollout_func"):
        _trainer(model_dir, _args(tmp_path, rollout_engine="hf"), rollout_func=dtrl.hf_rollout)
    with pytest.raises(ValueError, match="set one of them"):
        _args(tmp_path, use_vllm=True, rollout_engine="vllm")
    with pytest.raises(TypeError, match="DPPOConfig"):
        DPPOTrainer(model=model_dir, reward_funcs=_count_ones, args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
    with pytest.warns(UserWarning, match="truncation"):
        t = _trainer(model_dir, _args(tmp_path, top_p=0.9))
    assert t.rollout_func.fn is dtrl.hf_rollout


# ------------------------------------------------------------------------------------------------ loss = policy_loss
@pytest.fixture(scope="module")
def fixed(model_dir, tmp_path_factory):
    """One generation batch from a real rollout (8 completions, Top-K recorded), π_old before a random perturbation
    of the weights, then the model in float64 so that the comparison is exact up to float64 rounding."""
    t = _trainer(model_dir, _args(tmp_path_factory.mktemp("fixed"), method="dppo-topk-tv", bf16=False))
    t.model.train()
    torch.manual_seed(1)
    batch = t._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2] for _ in range(4)])
    assert set(batch) == {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                          "num_items_in_batch", "sampling_per_token_logps", *dtrl.TOPK_FIELDS}
    assert len(t.rollout_func.last["completion_ids"]) == 8  # TRL hands the rollout every prompt G times
    t.model.double()
    old = _naive(t.model, batch, t.temperature)[0].detach()
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    t.current_gradient_accumulation_steps = 1
    return t, batch, old


def _naive(model, batch, temperature):
    """log π at the sampled tokens and at the rollout's top-K ids from the full logits: log_softmax(z/τ)[a]."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=att).logits[:, -n - 1:-1]
    lsm = torch.log_softmax(logits.double() / temperature, -1)
    return (lsm.gather(-1, batch["completion_ids"][..., None])[..., 0],
            lsm.gather(-1, batch["rollout_topk_ids"]))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _reference(t, batch, old, m):
    """policy_loss on the same log π: TRL's own per-token log-probs (its fused fp32 lm-head kernel) for the binary
    presets, checked against the naive float64 log_softmax to fp32 precision; the naive float64 ones for Top-K."""
    t.model.zero_grad()
    logp, topk_logp = _naive(t.model, batch, t.temperature)
    if not m.needs_topk:
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        n_tok = batch["completion_ids"].shape[1]
        trl_logp = t._get_per_token_logps_and_entropies(t.model, ids, att, n_tok)[0]
        mask = batch["completion_mask"].bool()
        torch.testing.assert_close(trl_logp[mask].double(), logp[mask].detach(), rtol=0, atol=2e-6)
        logp = trl_logp
    sampled_in = (batch["rollout_topk_ids"] == batch["completion_ids"][..., None]).any(-1)
    loss, metrics = dppo.policy_loss(
        m, logp, batch["sampling_per_token_logps"].to(logp.dtype), batch["advantages"], batch["completion_mask"],
        old_logp=old.to(logp.dtype) if m.needs_old_logp else None,
        topk=dppo.TopK(topk_logp, batch["rollout_topk_logp"], sampled_in) if m.needs_topk else None)
    loss.backward()
    return loss.detach(), _grads(t.model), metrics


def _ours(t, batch, old, m):
    t.model.zero_grad()
    inputs = dict(batch, old_per_token_logps=old) if m.needs_old_logp else batch
    loss = t.compute_loss(t.model, inputs)
    loss.backward()
    return loss.detach(), _grads(t.model)


@pytest.mark.parametrize("name", list(dppo.PRESETS))
def test_every_preset_loss_and_grad_equal_policy_loss(fixed, name):
    t, batch, old = fixed
    t.args.method = name
    m = t.args.dppo_method
    assert m.max_len_norm in (None, t.args.max_completion_length)
    loss, grad = _ours(t, batch, old, m)
    ref_loss, ref_grad, metrics = _reference(t, batch, old, m)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    logged = t._metrics["train"]
    assert logged["dppo/masked_frac"][-1] == pytest.approx(metrics["masked_frac"])
    assert logged["dppo/abs_diff_mean"][-1] == pytest.approx(metrics["abs_diff_mean"], rel=1e-6)
    # the mask acts exactly where a plain recomputation of Eq. 12's condition (Binary-TV) or PPO's (ratio) says so
    if m.estimator in ("binary_tv", "ratio") and m.mask.sides == "away" and not getattr(m.mask, "relaxed", False):
        mask = batch["completion_mask"].bool()
        lp, lmu = _naive(t.model, batch, t.temperature)[0].detach(), batch["sampling_per_token_logps"].double()
        anchor = old.double() if m.needs_old_logp else lmu
        d = (lp.exp() - anchor.exp()).abs() if m.estimator == "binary_tv" else (lp - anchor).exp() - 1
        adv = batch["advantages"].double()[:, None].expand_as(lp)
        hi = d > m.delta_high if m.estimator == "binary_tv" else d > m.delta_high
        lo = d > m.delta_low if m.estimator == "binary_tv" else d < -m.delta_low
        blocked = ((adv > 0) & (lp > anchor) & hi) | ((adv < 0) & (lp < anchor) & lo)
        assert metrics["masked_frac"] == pytest.approx(float((blocked & mask).sum() / mask.sum()), abs=1e-9)
        if name == "grpo-clip-higher":  # not vacuous: the perturbation moves ~1/6 of the tokens past its ratio clip
            assert metrics["masked_frac"] > 0


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum-norm", "token-mean", "seq-mean-token-mean", "sum"])
def test_gradient_accumulation_adds_up_to_the_whole_batch(fixed, aggregation):
    """Two micro-batches of 4 (GA = 2, steps_per_generation = 2) give the loss and gradient of the 8-row batch
    (a Top-K preset: its log π comes from float64 logits, so the sums agree to float64 rounding)."""
    t, batch, old = fixed
    t.args.method, t.args.aggregation = "dppo-topk-tv", aggregation
    spg = t.args.steps_per_generation
    try:
        m = t.args.dppo_method
        ref_loss, ref_grad, _ = _reference(t, batch, old, m)
        t.current_gradient_accumulation_steps, t.args.steps_per_generation = 2, 2
        t.model.zero_grad()
        total = 0.0
        for rows in (slice(0, 4), slice(4, 8)):
            part = {k: (v[rows] if v.dim() else v) for k, v in batch.items()}
            loss = t.compute_loss(t.model, part)
            loss.backward()
            total = total + loss.detach()
        torch.testing.assert_close(total, ref_loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_grads(t.model), ref_grad, rtol=1e-9, atol=1e-12)
    finally:
        t.args.aggregation, t.args.steps_per_generation, t.current_gradient_accumulation_steps = None, spg, 1


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", ["dppo-binary-tv", "dppo-topk-tv", "grpo", "cispo"])
def test_three_steps_with_nothing_else_passed(model_dir, tmp_path, name):
    """TRL's own constructor, DPPOConfig(method=...) and TRL's defaults otherwise (bf16 autocast on CPU included)."""
    t = _trainer(model_dir, _args(tmp_path, method=name, max_steps=3, learning_rate=1e-2))
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    logs = [h for h in t.state.log_history if "dppo/masked_frac" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"]) and h["dppo/tokens"] > 0
        assert {"dppo/masked_frac_pos", "dppo/masked_frac_neg", "dppo/abs_diff_mean", "entropy"} <= set(h)
    assert logs[0]["dppo/abs_diff_max"] < 1e-3  # μ recorded by the engine = π up to bf16 autocast rounding
    assert isinstance(t.rollout_func, dtrl._Tap) and t.rollout_func.fn is dtrl.hf_rollout
    assert any(h["reward_std"] > 0 for h in t.state.log_history if "reward_std" in h)
    assert any(not torch.equal(p, b) for p, b in zip(t.model.parameters(), before))


def test_every_preset_trains_a_step(model_dir, tmp_path):
    """One training run, one step per preset: a callback sets args.method before each step (fp32)."""
    from transformers import TrainerCallback

    names = list(dppo.PRESETS)
    seen = []

    class NextPreset(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            args.method = names[state.global_step]
            seen.append(args.method)

    t = _trainer(model_dir, _args(tmp_path, max_steps=len(names), learning_rate=1e-2, bf16=False),
                 callbacks=[NextPreset()])
    t.train()
    logs = [h for h in t.state.log_history if "dppo/masked_frac" in h]
    assert seen == names and len(logs) == len(names)
    for name, h in zip(names, logs):
        assert math.isfinite(h["loss"]) and h["dppo/tokens"] > 0, name
        assert h["dppo/abs_diff_max"] < 1e-5, name  # each step samples afresh: π = μ in fp32 before its update


def test_mask_fires_with_several_iterations_per_batch(model_dir, tmp_path):
    """num_iterations = 4: every batch is reused for 4 updates; the first one sees π = μ (fp32 engine and trainer),
    the later ones a policy that has moved away from μ, where the trust region masks tokens."""
    t = _trainer(model_dir, _args(tmp_path, method="dppo-binary-tv", num_iterations=4, max_steps=8,
                                  learning_rate=0.05, bf16=False))
    t.train()
    logs = [h for h in t.state.log_history if "dppo/masked_frac" in h]
    fresh, reused = logs[0::4], [h for i, h in enumerate(logs) if i % 4]
    assert all(h["dppo/masked_frac"] == 0 and h["dppo/abs_diff_max"] < 1e-5 for h in fresh), fresh
    assert max(h["dppo/masked_frac"] for h in reused) > 0, reused
    assert max(h["dppo/masked_frac_pos"] + h["dppo/masked_frac_neg"] for h in reused) > 0


def test_learns_a_trivial_task(model_dir, tmp_path):
    """Reward = share of the 8 completion tokens that are '1': the random tiny model starts near 1/18; DPPO through
    TRL must raise it within 10 steps (measured: ~1.0 by step 7; a sign error in the loss or its wiring lowers it)."""
    t = _trainer(model_dir, _args(tmp_path, method="dppo-binary-tv", max_steps=10, learning_rate=5e-2, bf16=False))
    t.train()
    rewards = [h["reward"] for h in t.state.log_history if "reward" in h]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert last > max(3 * first, 0.5), rewards


# ------------------------------------------------------------------------------------------------ README
def _readme_block(lang: str, marker: str) -> str:
    text = README.read_text()
    section = text[text.index("## Use dppo inside TRL / verl"):]
    section = section[section.index(marker):]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_readme_trl_example_runs_as_written(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"model_path": model_dir}
    exec(compile(_readme_block("python", "### TRL"), str(README), "exec"), env)
    trainer = env["trainer"]
    assert isinstance(trainer, DPPOTrainer) and trainer.state.global_step > 0
    assert any("dppo/masked_frac" in h for h in trainer.state.log_history)


def test_example_script_runs(model_dir, tmp_path):
    """examples/trl_dppo.py with TRL's own argument parser, a Top-K preset, on the tiny model (2 steps)."""
    ns = runpy.run_path(str(EXAMPLE))
    assert ns["sum_reward"](["82", " 82 is it", "820", "8", "x82"], ["82"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    argv = ["--model_name_or_path", model_dir, "--output_dir", str(tmp_path), "--method", "dppo-topk-kl",
            "--use_cpu", "--bf16", "false", "--max_steps", "2", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--num_problems", "16",
            "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"]
    trainer = ns["main"](*ns["parse"](argv))
    assert isinstance(trainer, DPPOTrainer) and trainer.args.dppo_method.name == "dppo-topk-kl"
    logs = [h for h in trainer.state.log_history if "dppo/masked_frac" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
def _peer_batch(seed=4, b=8, t=6):
    """[B, T] float64 log π and log μ (some sequences far apart: both clamps of VESPO's w, the off-policy drop), a
    right-padded mask with one empty row, Â of both signs and 0."""
    g = torch.Generator().manual_seed(seed)
    lmu = torch.log(torch.rand(b, t, generator=g, dtype=torch.float64) * 0.8 + 0.1)
    shift = torch.tensor([0.0, -0.4, 0.5, -2.0, 1.5, -6.0, 0.1, -0.05], dtype=torch.float64)[:b, None]
    lp = torch.minimum(lmu + shift + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64),
                       torch.tensor(-1e-4, dtype=torch.float64))
    lp[5] = lmu[5] - 6.0  # w ≈ e^(−30): below VESPO's 1e-8 clamp
    mask = torch.arange(t)[None] < torch.tensor([6, 4, 5, 3, 6, 6, 2, 0])[:b, None]
    adv = torch.tensor([0.7, -1.0, 0.0, -0.5, 1.3, -0.8, 0.4, 1.0], dtype=torch.float64)[:b]
    return lp, lmu, mask, adv


@pytest.mark.parametrize("per_token", [False, True])
def test_vespo_and_offpolicy_gates_equal_trl_on_the_same_tensors(per_token):
    """The sequence weights of dppo's vespo (φ(w)) and offpolicy-seq-mask (keep/drop) against TRL's own
    GRPOTrainer.get_gamma_weights / get_off_policy_mask (trl#5199, trl#4689) on the same tensors, with Â per sequence
    or per token (TRL broadcasts a [B, T] Â per token, as dppo does)."""
    from dppo.token_loss import sequence_gate, token_context

    lp, lmu, mask, adv = _peer_batch()
    adv_in = adv[:, None].expand_as(lp).clone() if per_token else adv
    if per_token:
        adv_in[:, 1] = -adv_in[:, 1]  # a sign change inside sequences
    adv_trl = adv_in if per_token else adv[:, None]
    for name, theirs in [
        ("vespo", GRPOTrainer.get_gamma_weights(adv_trl, lp - lmu, mask.double(), None, 2.0, 3.0, 3.0, 2.0)),
        ("offpolicy-seq-mask", GRPOTrainer.get_off_policy_mask(adv_trl, lp, lmu, mask.double(), 0.5)),
    ]:
        m = dppo.PRESETS[name]
        ctx = token_context(m, lmu, adv_in, None, None, None, torch.float64)
        ours, _ = sequence_gate(m, lp, ctx, None, mask)
        theirs = theirs.expand_as(ours)
        torch.testing.assert_close(ours[mask], theirs[mask].to(ours.dtype), rtol=1e-12, atol=0, msg=name)
        if name == "offpolicy-seq-mask":  # the batch holds dropped and kept tokens
            assert (theirs[mask] == 0).any() and (theirs[mask] == 1).any()
        else:  # and φ across its range: w clamped at 1e-8 (φ ≈ 0) and w ≈ 1 (φ ≈ 1)
            assert theirs[mask].min() < 1e-6 and theirs[mask].max() > 0.5
