"""One registry of every metric dppo logs: its name, what it means, how it is pooled, and (for the loss's metrics)
how it is computed from one batch.

The loss (:func:`dppo.policy_loss`) returns per-call metrics; the trainer pools them over the micro-batches and
mini-batches of a step; the step record goes to ``metrics.jsonl``, TensorBoard and W&B; ``dppo plot`` and
``dppo compare`` draw and summarise them. All of them read the names, meanings and pooling rules from here.

Pooling of one step's policy-loss metrics over its micro-batches (so a step's figures do not depend on
``--micro_batch_size``):

    token     mean weighted by the call's response tokens (a token-level mean over the whole step)
    seq       mean weighted by the call's sequences with ≥ 1 response token
    max, min  extreme over all calls
    update    summed over the calls, then divided by the number of optimizer updates (micro-batch losses add up to
              their mini-batch's loss, so this is the mean loss per update)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

from dppo import divergence as div
from dppo.parts import INF, MAX_LOG_RATIO

if TYPE_CHECKING:
    from dppo.methods import Method
    from dppo.token_loss import TokenContext, TokenTerms

__all__ = ["Metric", "LOSS_METRICS", "STEP_METRICS", "METRICS", "MetricPool", "describe", "loss_metrics"]

Pool = Literal["token", "seq", "max", "min", "update", "last"]


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    pool: Pool = "last"  # how the trainer pools per-call values within a step ("last": a step-level value)
    of: Callable[[LossBatch], Tensor] | None = None  # a loss metric's value on one batch (LOSS_METRICS only)


def _table(rows: dict[str, tuple]) -> dict[str, Metric]:
    """{name: (pool, meaning)} or {name: (pool, meaning, value of a batch)} → {name: Metric}."""
    return {k: Metric(k, meaning, pool, *of) for k, (pool, meaning, *of) in rows.items()}


class LossBatch:
    """The per-token quantities of one policy-loss call that its metrics read ([B, T], ``lp`` detached), with
    reductions over the response tokens: ``mean`` (a token mean; padding may hold inf, so it is filled, not
    multiplied), ``max``/``min`` (0 for a batch without a response token)."""

    def __init__(self, m: Method, loss: Tensor, lp: Tensor, ctx: TokenContext, terms: TokenTerms, seq_over: Tensor,
                 resp: Tensor):
        self.m, self.loss, self.lp, self.ctx, self.terms = m, loss, lp, ctx, terms
        self.seq_over, self.resp = seq_over, resp
        lmu = ctx.rollout_logp
        self.n = resp.sum()
        self.denom = self.n.clamp(min=1).float()
        self.diff = torch.exp(lp) - torch.exp(lmu)
        self.absdiff = div.binary_tv(lp, lmu)
        self.masked = (terms.mask == 0) & resp
        self.up = lp > ctx.anchor_logp
        self.has_seq = resp.any(dim=-1)
        self.b = torch.exp((ctx.anchor_logp - lmu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # behaviour ratio π_θ′/μ
        self.log_r = (lp - lmu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        bw = m.behavior
        self.band = (bw.low, bw.high, bw.cap) if bw is not None else (0.0, INF, INF)

    def mean(self, x: Tensor) -> Tensor:
        return x.float().masked_fill(~self.resp, 0.0).sum() / self.denom

    def _ext(self, x: Tensor, largest: bool) -> Tensor:
        v = x.masked_fill(~self.resp, float("-inf") if largest else float("inf"))
        v = v.max() if largest else v.min()
        return torch.where(self.n > 0, v, torch.zeros_like(v))

    def max(self, x: Tensor) -> Tensor:
        return self._ext(x, True)

    def min(self, x: Tensor) -> Tensor:
        return self._ext(x, False)


# What dppo.policy_loss returns (logged as loss/<name>; the first mini-batch's again as mismatch/<name>): the one
# list of the loss's metrics, each with its pooling rule, meaning and value.
LOSS_METRICS = _table({
    "loss": ("update", "the aggregated loss (mean per optimizer update)", lambda s: s.loss.detach().float()),
    "tokens": ("update", "response tokens per optimizer update", lambda s: s.n.float()),
    "abs_diff_mean": ("token", "mean |π(a_t) − μ(a_t)|: the paper's mismatch metric (Fig. 3)",
                      lambda s: s.mean(s.absdiff)),
    "abs_diff_max": ("max", "max |π − μ|", lambda s: s.max(s.absdiff)),
    "abs_diff_min": ("min", "min |π − μ|", lambda s: s.min(s.absdiff)),
    "abs_dlogp_mean": ("token", "mean |log π(a_t) − log μ(a_t)| (open-instruct's vllm_vs_local_logprob_diff_mean)",
                       lambda s: s.mean((s.lp - s.ctx.rollout_logp).abs())),
    "diff_max": ("max", "max of the signed π − μ (Fig. 3, 'Max & Min')", lambda s: s.max(s.diff)),
    "diff_min": ("min", "min of the signed π − μ", lambda s: s.min(s.diff)),
    "div_mean": ("token", "mean of the estimate the token mask thresholds (ratio mask: |r − 1|; no mask: "
                 "Binary-TV)", lambda s: s.mean(s.terms.estimate)),
    "div_max": ("max", "max of that estimate", lambda s: s.max(s.terms.estimate)),
    "masked_frac": ("token", "fraction of tokens whose gradient the token mask removes (M_t = 0)",
                    lambda s: s.mean(s.masked)),
    "masked_frac_pos": ("token", "… of them with Â > 0 and π pushed above the anchor (positive side)",
                        lambda s: s.mean(s.masked & (s.ctx.advantages > 0) & s.up)),
    "masked_frac_neg": ("token", "… of them with Â < 0 and π pushed below the anchor (negative side; a mask with "
                        "sides='any' also removes tokens counted in neither)",
                        lambda s: s.mean(s.masked & (s.ctx.advantages < 0) & ~s.up)),
    "ratio_mean": ("token", "mean r_t = π/μ", lambda s: s.mean(s.terms.ratio)),
    "ratio_max": ("max", "max r_t", lambda s: s.max(s.terms.ratio)),
    "capped_frac": ("token", "fraction of tokens with r_t > C (IS weight truncated to C)",
                    lambda s: s.mean(s.terms.ratio > s.m.cap)),
    "seq_masked_frac": ("seq", "fraction of sequences (with ≥ 1 response token) whose statistic crosses a sequence "
                        "gate's threshold (TRM: dropped whole; VACO: their tokens moving away are dropped; "
                        "off-policy sequence mask: dropped where Â < 0)",
                        lambda s: (s.seq_over & s.has_seq).float().sum() / s.has_seq.float().sum().clamp(min=1.0)),
    "seq_dropped_frac": ("token", "fraction of tokens the sequence gates weigh 0",
                         lambda s: s.mean(s.ctx.seq_keep == 0)),
    "behavior_masked_frac": ("token", "fraction of tokens whose behaviour ratio π_θ′/μ lies outside the "
                             "BehaviorWeight band (IcePop: weight 0)",
                             lambda s: s.mean((s.b < s.band[0]) | (s.b > s.band[1]))),
    "behavior_capped_frac": ("token", "fraction of tokens whose behaviour ratio π_θ′/μ is above the BehaviorWeight "
                             "cap (VACO: weight truncated)", lambda s: s.mean(s.b > s.band[2])),
    "logratio_sq_mean": ("token", "mean (log π − log μ)²: the LogRatioPenalty before its coefficient (IPO, KPop, DRO)",
                         lambda s: s.mean(s.log_r**2)),
})


def loss_metrics(m: Method, loss: Tensor, lp: Tensor, ctx: TokenContext, terms: TokenTerms, seq_over: Tensor,
                 resp: Tensor) -> dict[str, float]:
    """Every metric of :data:`LOSS_METRICS` for one batch, as floats (one device sync for all of them)."""
    with torch.no_grad():
        s = LossBatch(m, loss, lp, ctx, terms, seq_over, resp)
        vals = torch.stack([metric.of(s).double() for metric in LOSS_METRICS.values()])  # type: ignore[misc]
        return dict(zip(LOSS_METRICS, vals.tolist()))

# What the trainer writes per step besides loss/* and mismatch/*.
STEP_METRICS = _table({
    "reward": ("last", "mean reward over the rollout batch"),
    "reward_std": ("last", "standard deviation of the rewards"),
    "reward/bad": ("last", "responses whose reward function failed and were scored 0 (--on_bad_reward zero)"),
    "accuracy": ("last", "fraction of correct responses in the rollout batch"),
    "groups_all_equal": ("last", "fraction of prompts whose G rewards are all equal (Â = 0 for all of them)"),
    "response_len": ("last", "mean response length (tokens)"),
    "truncated_frac": ("last", "fraction of responses cut at max_new_tokens"),
    "entropy": ("last", "mean policy entropy H(π(·|s_t)) over the step's response tokens (nats)"),
    "adv_abs_mean": ("last", "mean |Â|"),
    "grad_norm": ("last", "mean gradient norm over the step's updates (before clipping)"),
    "grad_norm_max": ("last", "max gradient norm over the step's updates"),
    "lr": ("last", "learning rate after the step"),
    "tokens": ("last", "response tokens in the rollout batch"),
    "tokens_per_s": ("last", "response tokens per second of the whole step"),
    "time/rollout": ("last", "seconds sampling (and scoring) the rollout batch; with --async_rollout, the seconds the "
                     "trainer waited for the worker's batch (and scored it)"),
    "time/sync": ("last", "seconds giving the rollout engine its weights for the step's batch (gathering the sharded "
                  "policy in the engine's dtype and loading it; a snapshot with --rollout_lag / --async_rollout), "
                  "part of time/rollout"),
    "time/rollout_worker": ("last", "--async_rollout: seconds the worker process spent sampling this step's batch "
                            "(overlapping the previous step's training)"),
    "rollout/lag": ("last", "staleness of the batch: steps between the policy that sampled it and the one trained "
                    "(--rollout_lag / --async_rollout k, min(k, step − 1))"),
    "time/recompute": ("last", "seconds in the no-grad forward of the recomputed anchor π_θ′"),
    "time/train": ("last", "seconds in the forward/backward/optimizer of the step's updates"),
    "time/step": ("last", "seconds of the whole step"),
    "time/eval": ("last", "seconds of the held-out evaluation"),
    "eval/accuracy": ("last", "held-out accuracy, mean over --eval_samples samples per problem (Avg@k)"),
    "eval/greedy_accuracy": ("last", "held-out accuracy, greedy decoding"),
    "eval/response_len": ("last", "mean held-out response length (tokens)"),
})

METRICS: dict[str, Metric] = {
    **STEP_METRICS,
    **{f"loss/{k}": Metric(f"loss/{k}", m.meaning + " (over the step's updates)", m.pool)
       for k, m in LOSS_METRICS.items()},
    **{f"mismatch/{k}": Metric(f"mismatch/{k}", m.meaning + " (first mini-batch, before any update: the "
                               "training–inference mismatch alone; with --rollout_lag k also the policy's k steps "
                               "of drift since the weights the engine sampled with)", m.pool)
       for k, m in LOSS_METRICS.items() if k in ("abs_diff_mean", "abs_diff_max", "abs_dlogp_mean")},
}


def describe(name: str) -> str:
    """The meaning of a logged metric name (per-level accuracies eval/accuracy_level<N> included)."""
    if name in METRICS:
        return METRICS[name].meaning
    if name.startswith("eval/accuracy_level"):
        return f"held-out accuracy on difficulty level {name[len('eval/accuracy_level'):]}"
    return name


class MetricPool:
    """policy_loss metrics of one step, pooled over its calls by each metric's registered rule (module docstring).
    A metric the registry does not know is an error: it would otherwise be pooled by a guess."""

    def __init__(self) -> None:
        self.wsum: dict[str, float] = {}
        self.wden: dict[str, float] = {}
        self.ext: dict[str, float] = {}
        self.sums: dict[str, float] = {}

    def add(self, met: dict[str, float], *, n_seqs: float) -> None:
        tok = met["tokens"]
        for key, v in met.items():
            if key not in LOSS_METRICS:
                raise KeyError(f"policy_loss metric {key!r} is not in dppo.metrics.LOSS_METRICS: register it with its "
                               "meaning and pooling rule")
            pool = LOSS_METRICS[key].pool
            if pool == "update":
                self.sums[key] = self.sums.get(key, 0.0) + v
            elif pool == "max":
                self.ext[key] = max(self.ext.get(key, -math.inf), v)
            elif pool == "min":
                self.ext[key] = min(self.ext.get(key, math.inf), v)
            else:
                w = n_seqs if pool == "seq" else tok
                self.wsum[key] = self.wsum.get(key, 0.0) + v * w
                self.wden[key] = self.wden.get(key, 0.0) + w

    def merge(self, other: "MetricPool") -> None:
        """Pool another process's calls of the same step into this one (dppo.run.distributed): weighted sums and
        update sums add, extremes compare; the result is the pool of all the calls, up to float summation order."""
        for mine, theirs in ((self.wsum, other.wsum), (self.wden, other.wden), (self.sums, other.sums)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v
        for k, v in other.ext.items():
            pick = max if LOSS_METRICS[k].pool == "max" else min
            self.ext[k] = pick(self.ext[k], v) if k in self.ext else v

    def result(self, *, n_updates: int) -> dict[str, float]:
        out = {k: self.wsum[k] / self.wden[k] if self.wden[k] > 0 else 0.0 for k in self.wsum}
        out.update(self.ext)
        out.update({k: v / max(n_updates, 1) for k, v in self.sums.items()})
        return out
