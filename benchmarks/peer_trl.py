"""Peer benchmark: dppo against TRL's GRPOTrainer (trl 1.16), two parts.

1. **Loss agreement on identical tensors** (``--part loss``). The same per-token log-probs log π_θ (a leaf tensor),
   rollout log-probs log μ, advantages and response mask go into TRL's ``GRPOTrainer._compute_loss`` (with
   ``_get_per_token_logps_and_entropies`` patched to return our log π, and μ fed as ``old_per_token_logps``, the
   tensor TRL takes its ratio against) and into :func:`dppo.policy_loss`. We compare ∂loss/∂log π token by token.
   The TRL loss type and the dppo preset are matched case by case; where the defaults differ (aggregation, CISPO's
   cap) the table says so and measures the difference.

2. **End to end** (``--part e2e``): the same tiny model (the trainer's bundled SFT warm-up model), task, prompts per
   step, group size, generation length, optimiser and number of steps, once through ``dppo train`` and once
   through ``trl.GRPOTrainer``; wall time per step, reward after N steps and peak RSS of each, in one run.

Results go to ``benchmarks/results/peer_trl*.json`` and the "Peer: TRL" section of ``docs/benchmarks.md``.

    .venv/bin/python benchmarks/peer_trl.py --part loss      # seconds
    .venv/bin/python benchmarks/peer_trl.py --part e2e       # minutes (2 CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from dppo.rundir.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# --------------------------------------------------------------------------------------------------------------------
# A tiny, offline TRL GRPOTrainer (no download: a character tokenizer and a from-config Qwen3).
# --------------------------------------------------------------------------------------------------------------------


def char_tokenizer():
    """A character-level fast tokenizer (digits, arithmetic, lower-case letters), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-*/= abcdefghijklmnopqrstuvwxyz?.,:")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def tiny_trl_trainer(loss_type: str, *, epsilon: float = 0.2, epsilon_high: float | None = None,
                     max_completion_length: int = 16, num_generations: int = 4):
    """A GRPOTrainer over a 1-layer from-config Qwen3, used only to call its ``_compute_loss``."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = char_tokenizer()
    cfg = AutoConfig.for_model(
        "qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=len(tok), tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    kw = dict(epsilon=epsilon, loss_type=loss_type)
    if epsilon_high is not None:
        kw["epsilon_high"] = epsilon_high
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_peer_"), use_cpu=True, per_device_train_batch_size=num_generations,
        num_generations=num_generations, max_completion_length=max_completion_length, report_to=[], bf16=False,
        **kw,
    )
    ds = Dataset.from_list([{"prompt": "1+2="}] * 8)
    trainer = GRPOTrainer(
        model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args, train_dataset=ds,
        processing_class=tok,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.training_step during training
    return trainer


def synthetic_batch(B: int = 16, T: int = 16, group: int = 4, seed: int = 0, dtype=torch.float64):
    """Per-token tensors that exercise every branch: μ from 1e-4 to ~1, log π/μ with a spread that crosses the
    clip bounds (0.8, 1.2/1.28) and the CISPO cap (5), ragged response lengths, and ±/0 group advantages."""
    from dppo import group_advantages

    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, T, generator=g, dtype=dtype)
    rollout_logp = torch.log(u.pow(4).clamp(min=1e-4))  # many low-μ tokens, like a long-tailed vocabulary
    noise = 0.6 * torch.randn(B, T, generator=g, dtype=dtype)
    rollout_logp[0, :4] = math.log(1e-3)
    noise[0, :4] = torch.tensor([2.0, 2.5, -2.0, 3.0], dtype=dtype)  # rare tokens with r = e^2…e^3 > 5: the cap bites
    logp = (rollout_logp + noise).clamp(max=-1e-6)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (B,), generator=g).to(dtype)
    adv = group_advantages(rewards.float(), group).to(dtype)
    return logp, rollout_logp, adv, mask


def trl_grad(trainer, logp, rollout_logp, adv, mask):
    """(loss, ∂loss/∂log π) from TRL's own ``_compute_loss``, with our tensors substituted for its forward pass."""
    leaf = logp.detach().clone().requires_grad_(True)
    B, T = logp.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf), None)
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask.to(logp.dtype),
        "advantages": adv, "old_per_token_logps": rollout_logp,
        "num_items_in_batch": mask.sum().to(logp.dtype),
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), leaf.grad.detach()


def dppo_grad(method, logp, rollout_logp, adv, mask):
    from dppo import policy_loss

    leaf = logp.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(method, leaf, rollout_logp, adv, mask)
    loss.backward()
    return float(loss.detach()), leaf.grad.detach()


def _per_seq_len(mask):
    return mask.sum(-1, keepdim=True).to(torch.float64).clamp(min=1.0)


# Rescalings that turn TRL's gradient into dppo's where the two differ only by aggregation: applying the stated
# factor and re-checking agreement proves the explanation, not just the difference.
def _fix_seq_mean(g, mask):  # 1/(B·|y_b|) → 1/(B·T)
    return g.double() * _per_seq_len(mask) / mask.shape[1]


def _fix_token_mean(g, mask):  # 1/Σ|y_b| → 1/(B·T)
    return g.double() * mask.sum().double() / mask.numel()


# (label, TRL settings, dppo method, expectation, explanation)
def _cases():
    """(label, TRL settings, dppo method, expectation, explanation, rescale, method_after_rescale).

    ``rescale`` maps TRL's gradient onto dppo's aggregation; with ``method_after_rescale`` (or the same method) the
    rescaled gradients must agree to rounding, which checks the stated explanation of each difference.
    """
    from dppo import PRESETS
    from dppo import methods as dppo_methods

    rep = dppo_methods.replace
    return [
        ("grpo ε=0.2 · aggregation matched",
         dict(loss_type="grpo", epsilon=0.2), rep(PRESETS["grpo"], aggregation="seq-mean-token-mean"), "agree",
         "same PPO-clip surrogate on r = π/μ; TRL 'grpo' averages tokens per sequence, then sequences "
         "(dppo aggregation seq-mean-token-mean)", None, None),
        ("grpo ε=0.2/0.28 · aggregation matched",
         dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28),
         rep(PRESETS["grpo-clip-higher"], aggregation="seq-mean-token-mean"), "agree", "clip-higher bounds",
         None, None),
        ("dr_grpo ε=0.2 vs preset grpo (defaults)",
         dict(loss_type="dr_grpo", epsilon=0.2), PRESETS["grpo"], "agree",
         "TRL dr_grpo divides by B·max_completion_length = dppo's default seq-mean-token-sum-norm (L = T)",
         None, None),
        ("dr_grpo ε=0.2/0.28 vs preset grpo-clip-higher (defaults)",
         dict(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.28), PRESETS["grpo-clip-higher"], "agree",
         "as above, clip-higher bounds", None, None),
        ("cispo ε_high=5 · aggregation matched",
         dict(loss_type="cispo", epsilon_high=5.0), rep(PRESETS["cispo-scaling"], aggregation="token-mean"), "agree",
         "−sg(min(r, 5))·Â·log π; TRL 'cispo' divides by the batch's token count (dppo token-mean)", None, None),
        ("grpo (TRL default) vs preset grpo (default)",
         dict(loss_type="grpo", epsilon=0.2), PRESETS["grpo"], "differ",
         "aggregation only: TRL weights a token 1/(B·|y_b|), dppo 1/(B·T); rescaling TRL's gradient by |y_b|/T "
         "makes them agree", _fix_seq_mean, None),
        ("cispo (TRL, ε_high=5) vs preset cispo-scaling (default aggregation)",
         dict(loss_type="cispo", epsilon_high=5.0), PRESETS["cispo-scaling"], "differ",
         "aggregation only: TRL 1/Σ_b|y_b|, dppo 1/(B·T); rescaling by Σ|y_b|/(B·T) makes them agree",
         _fix_token_mean, None),
        ("cispo (TRL all defaults: cap = ε_high = ε = 0.2) vs preset cispo",
         dict(loss_type="cispo"), PRESETS["cispo"], "differ",
         "TRL's CISPO cap defaults to epsilon_high = epsilon = 0.2, so min(r, 0.2) scales every token down ≥ 5×; "
         "matches dppo cispo with ratio_cap=0.2 after the aggregation rescale. Pass epsilon_high=5 (TRL docs)",
         _fix_token_mean, rep(PRESETS["cispo"], ratio_cap=0.2)),
    ]


def loss_agreement(dtypes=(torch.float64, torch.float32), seeds=(0, 1, 2)) -> list[dict]:
    """One row per (case, dtype): worst max-abs and relative gradient gap over ``seeds`` synthetic batches."""
    rows = []
    for label, trl_kw, method, expect, why, rescale, method2 in _cases():
        kw = dict(trl_kw)
        trainer = tiny_trl_trainer(kw.pop("loss_type"), max_completion_length=16, **kw)
        for dtype in dtypes:
            worst_abs = worst_rel = worst_fixed = 0.0
            for seed in seeds:
                batch = synthetic_batch(seed=seed, dtype=dtype)
                _, g_trl = trl_grad(trainer, *batch)
                _, g_ours = dppo_grad(method, *batch)
                scale = max(g_ours.double().abs().max().item(), 1e-30)
                d = (g_trl.double() - g_ours.double()).abs().max().item()
                worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, d / scale)
                if rescale is not None:
                    _, g2 = dppo_grad(method2 or method, *batch)
                    fixed = (rescale(g_trl, batch[3]) - g2.double()).abs().max().item()
                    worst_fixed = max(worst_fixed, fixed / max(g2.double().abs().max().item(), 1e-30))
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            rows.append(dict(
                case=label, trl=trl_kw, dppo=method.to_dict(), dtype=str(dtype).replace("torch.", ""),
                max_abs_grad_diff=worst_abs, max_rel_grad_diff=worst_rel, expected=expect, agree=worst_rel <= tol,
                explanation=why, seeds=list(seeds),
                rel_diff_after_stated_fix=(worst_fixed if rescale is not None else None),
                fix_confirms_explanation=(worst_fixed <= tol if rescale is not None else None),
            ))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# End to end (filled in by e2e.py-style code below; needs the dppo trainer).
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["loss", "e2e", "all"], default="all")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, default=50, help="e2e: optimizer steps (one rollout batch each)")
    ap.add_argument("--seeds", default="0,1,2", help="e2e: comma-separated seeds, each run by both trainers")
    ap.add_argument("--job", choices=["toy", "long"], default="toy", help="e2e: the default job, or a 5 M-parameter "
                    "model with a 4k vocabulary and ~35-token responses")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("loss", "all"):
        t0 = time.time()
        rows = loss_agreement()
        res = dict(rows=rows, env=machine_info(), wall_s=time.time() - t0,
                   command="python benchmarks/peer_trl.py --part loss")
        (args.out / "peer_trl_loss.json").write_text(json.dumps(res, indent=1, default=str))
        for r in rows:
            flag = "AGREE " if r["agree"] else "DIFFER"
            fix = "" if r["rel_diff_after_stated_fix"] is None else f"  (after stated fix: {r['rel_diff_after_stated_fix']:.1e})"
            print(f"{flag} {r['dtype']:8s} rel {r['max_rel_grad_diff']:.2e}  {r['case']}{fix}")
        bad = [r for r in rows if (r["expected"] == "agree") != r["agree"] or r["fix_confirms_explanation"] is False]
        if bad:
            print(f"UNEXPECTED: {len(bad)} case(s) did not match expectation", file=sys.stderr)
            return 1
    if args.part in ("e2e", "all"):
        from peer_trl_e2e import run_e2e  # noqa: E402  (sibling module, needs the dppo trainer)

        res = run_e2e(steps=args.steps, seeds=tuple(int(x) for x in args.seeds.split(",")), job=args.job)
        res["env"] = machine_info()
        name = "peer_trl_e2e.json" if args.job == "toy" else f"peer_trl_e2e_{args.job}.json"
        (args.out / name).write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps(res["summary"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
