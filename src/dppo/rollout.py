"""Rollout records: what an engine returns for every sampled token, with μ's tensors named ``rollout_*``.

A rollout engine (:mod:`dppo.engines`) turns left-padded prompt ids into a :class:`Rollout` holding, for every
response token,

    rollout_logp          log μ(a_t | s_t): the sampled token under the distribution it was *actually* sampled from
    rollout_topk_ids/logp the K most probable tokens of that same distribution and log μ at them (Top-K DPPO, §4.4)

Every tensor that holds μ (the behaviour policy, the inference engine at sampling time) is named ``rollout_*``; the
trainer's log π_θ never is. The trust region is anchored to these tensors (§5.2, App. E), so a swap of μ and π is the
one bug a trust region cannot survive: the names make it visible.

"Actually sampled from" means: logits z_t of the rollout model (in its precision), divided by the temperature τ,
then truncated by top-k / top-p if asked and renormalised over the kept support S_t:

    μ(a | s_t) = softmax(z_t/τ)[a] / Σ_{b∈S_t} softmax(z_t/τ)[b]   for a ∈ S_t, 0 otherwise.

Truncation therefore *changes* μ: with top-p = 0.9 every kept token's log μ rises by −log Σ_{S_t} (≈ 0.1 nats),
and a trust region anchored to that μ measures the policy's distance from the truncated distribution (the ratio π/μ
picks up that factor, trl#6789). The paper samples at τ = 1.0 without truncation (Table 1), which is the default
here (top_k = 0, top_p = 1.0). Recording the processed distribution (not the raw logits) is also what fixed
trl#4159 / open-instruct#1678 at τ ≠ 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "Rollout", "RolloutEngine", "RolloutEngineError", "sampling_logprobs", "encode_prompts",
           "prompt_seeds", "mask_padding", "sample_tokens"]


@dataclass(frozen=True)
class SamplingParams:
    """How the engine samples. ``temperature=0`` is greedy (evaluation only: μ is then a point mass).

    ``logit_noise`` σ > 0 adds N(0, σ²) noise to every logit the engine samples from (drawn from the rollout's
    generator) and records log μ of that noisy distribution: a stress knob that makes the engine a worse copy of
    the trainer, scaling the training–inference mismatch far beyond bf16 rounding (not in the paper, and not a
    mismatch a real engine has: docs/results.md uses an FP8 engine and ``--rollout_lag`` instead). ``record_logp`` keeps μ's whole distribution ([N, T, V] fp32 log μ) for studies of the exact
    divergence: memory N·T·V·4 bytes, small vocabularies only."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0  # 1.0 = no nucleus truncation
    record_topk: int = 0  # K top ids/log-probs of μ to record per token (Top-K methods; 20 in the paper; ≤ V)
    logit_noise: float = 0.0  # σ of Gaussian noise on the engine's logits (stress knob; 0 = off)
    record_logp: bool = False  # keep the full [N, T, V] log μ (exact-divergence studies)


@dataclass
class Rollout:
    """N = B·G responses, each prompt's G samples contiguous. Prompts are left-padded to P, responses right-padded
    to T (the longest response of the batch), so response token t of every row sits at column P+t. Every tensor
    of μ is named ``rollout_*``."""

    prompt_ids: Tensor  # [N, P] int64
    prompt_mask: Tensor  # [N, P] bool
    response_ids: Tensor  # [N, T] int64, pad after <eos>
    response_mask: Tensor  # [N, T] bool: generated tokens, up to and including <eos>
    rollout_logp: Tensor  # [N, T] fp32: log μ(a_t|s_t) of the sampling distribution (0 where response_mask is 0)
    rollout_topk_ids: Tensor | None = None  # [N, T, K] int64: ids of μ's top-K, by decreasing μ
    rollout_topk_logp: Tensor | None = None  # [N, T, K] fp32: log μ at rollout_topk_ids
    finished: Tensor | None = None  # [N] bool: ended with <eos> (False = cut at max_new_tokens)
    rollout_full_logp: Tensor | None = None  # [N, T, V] fp32: μ's whole distribution (SamplingParams.record_logp)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def sampled_in_topk(self) -> Tensor | None:
        """[N, T] bool: a_t is among the rollout's top-K ids (None without a recorded top-K)."""
        if self.rollout_topk_ids is None:
            return None
        return (self.rollout_topk_ids == self.response_ids[..., None]).any(-1)


class RolloutEngineError(RuntimeError):
    """The rollout engine failed while sampling (or its worker process died); the message names the engine and the
    step. The run stops; its last checkpoint is kept."""


class RolloutEngine:
    """Interface. ``sync`` loads the trainer's current weights; ``generate`` samples; ``sleep`` releases what the
    engine holds between rollouts (vLLM's sleep mode; a no-op by default). ``needs_weights``: the engine holds no
    weights until its next ``sync`` / ``load_weights`` (after a sleep that discarded them)."""

    needs_weights = False

    def sleep(self) -> None:
        pass

    def sync(self, policy: torch.nn.Module) -> None:
        raise NotImplementedError

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, *, num_samples: int = 1,
                 generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> Rollout:
        """Sample ``num_samples`` responses for each of the B prompts ([B, P] left-padded) → Rollout of N = B·G.

        ``seeds``: one per prompt (:func:`prompt_seeds`); prompt b's responses are then a function of ``seeds[b]`` and
        its own logits alone, whatever other prompts share the call (a different batch, chunk or process gives the
        same samples). Without them, ``generator`` (or torch's global RNG) drives the whole batch."""
        raise NotImplementedError


def mask_padding(ro: Rollout, pad: int) -> Rollout:
    """Write canonical values at the positions after each response's end (``response_mask`` 0), in place: ``pad`` in
    ``response_ids``, 0 in ``rollout_logp``, (pad, −inf) in the top-K record (μ lists no token there), a point mass at
    ``pad`` in ``rollout_full_logp``. No loss reads them (every loss is masked), but fixed values make two rollouts
    comparable tensor for tensor (engines, chunk sizes). Returns ``ro``."""
    off = ~ro.response_mask
    ro.response_ids.masked_fill_(off, pad)
    ro.rollout_logp.masked_fill_(off, 0.0)
    if ro.rollout_topk_ids is not None:
        ro.rollout_topk_ids.masked_fill_(off[..., None], pad)
        ro.rollout_topk_logp.masked_fill_(off[..., None], float("-inf"))
    if ro.rollout_full_logp is not None:
        point = torch.full_like(ro.rollout_full_logp[0, 0], float("-inf"))
        point[pad] = 0.0
        ro.rollout_full_logp[off] = point
    return ro


def prompt_seeds(base: int, n: int) -> list[int]:
    """``n`` per-prompt seeds (63-bit) from one base seed; prompt i's depends on (base, i) alone (*ours*)."""
    return [int.from_bytes(hashlib.sha256(f"{base}/prompt/{i}".encode()).digest()[:8], "little") >> 1
            for i in range(n)]


def sample_tokens(logmu: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: row n's token is the first a with Σ_{b≤a} μ(b) > u_n · Σ_b μ(b), so it depends on that
    row's μ and uniform u_n alone (no shared random stream across rows; :meth:`RolloutEngine.generate`'s seeds).
    Cumulative sums in fp64; a token with μ = 0 (truncated away) is never picked.

    Args: logmu [N, V] log μ (−inf allowed); u [N] uniforms in [0, 1). Returns [N] int64."""
    cdf = logmu.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def sampling_logprobs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, *,
                      logit_noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """log μ(·|s) of the distribution sampled from: log_softmax((z + σε)/τ) in fp32, truncated to top-k / top-p and
    renormalised over the kept support (−inf elsewhere). ``temperature == 0``: greedy (0 at the argmax).
    ε ~ N(0, 1) per logit from ``generator`` when ``logit_noise`` σ > 0 (:class:`SamplingParams`).

    Args: logits [N, V] any float dtype. Returns [N, V] fp32.
    """
    z = logits.float()
    if logit_noise > 0:
        z = z + logit_noise * torch.randn(z.shape, generator=generator, device=z.device)
    if temperature == 0:
        out = torch.full_like(z, float("-inf"))
        return out.scatter_(-1, z.argmax(-1, keepdim=True), 0.0)
    z = z / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # keep a token if the mass strictly before it is < p: the smallest prefix with mass >= p (always >= 1 token)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def encode_prompts(tokenizer, prompts: list[str], use_chat_template: bool, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Tokenise prompts, through the chat template when asked and the tokenizer has one; left-pad.
    Returns ([B, P] int64 ids, [B, P] bool mask)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, add_special_tokens=False)
    else:
        enc = tokenizer(prompts)
    rows = enc["input_ids"]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


