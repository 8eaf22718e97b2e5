"""Rollout: sample G responses per prompt and record, per generated token, what the loss needs of μ.

A :class:`RolloutEngine` turns left-padded prompt ids into a :class:`Rollout` holding, for every response token,

    log μ(a_t | s_t)                     the log-probability of the sampled token under the distribution it was
                                         *actually* sampled from, and
    top-K ids and log μ at them          the K most probable tokens of that same distribution (Top-K DPPO, §4.4).

"Actually sampled from" means: logits z_t of the rollout model (in its precision), divided by the temperature τ,
then truncated by top-k / top-p if asked and renormalised over the kept support S_t:

    μ(a | s_t) = softmax(z_t/τ)[a] / Σ_{b∈S_t} softmax(z_t/τ)[b]   for a ∈ S_t, 0 otherwise.

Truncation therefore *changes* μ: with top-p = 0.9 every kept token's log μ rises by −log Σ_{S_t} (≈ 0.1 nats),
and a trust region anchored to that μ measures the policy's distance from the truncated distribution (the ratio π/μ
picks up that factor, trl#6789). The paper samples at τ = 1.0 without truncation (Table 1), which is the default
here (top_k = 0, top_p = 1.0). Recording the processed distribution (not the raw logits) is also what fixed
trl#4159 / open-instruct#1678 at τ ≠ 1.

:class:`HFEngine` runs any transformers causal LM with its own decode loop (prefill + KV cache) instead of
``model.generate()``: generate's logits processors take defaults from the model's ``generation_config`` (e.g. a
repetition penalty or top-k = 20 shipped with an instruct model) that the recorded μ would silently have to replicate;
owning the loop makes μ the sampling distribution by construction and keeps memory at one [N, V] row of logits per
step. A vLLM engine can implement the same interface (``SamplingParams(logprobs=K)`` returns the same records).

Rollout precision is the engine's own: ``dtype="bf16"`` keeps a bf16 copy of the policy (synced before every
rollout, as an inference engine's weights are), so π (fp32 trainer) and μ (bf16 engine) differ for identical
parameters: the training–inference mismatch of the paper (§5.1, Fig. 3) reproduced on a CPU.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dppo.hf import lm_head
from dppo.lora import base_model
from dppo.model import DTYPES, decoder_and_head, position_ids_from_mask

__all__ = ["SamplingParams", "Rollout", "RolloutEngine", "HFEngine", "sampling_logprobs", "encode_prompts"]


@dataclass(frozen=True)
class SamplingParams:
    """How the engine samples. ``temperature=0`` is greedy (evaluation only: μ is then a point mass)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0  # 1.0 = no nucleus truncation
    record_topk: int = 0  # K top ids/log-probs of μ to record per token (Top-K methods; 20 in the paper; ≤ V)


@dataclass
class Rollout:
    """N = B·G responses, each prompt's G samples contiguous. Prompts are left-padded to P, responses right-padded
    to T (the longest response of the batch), so response token t of every row sits at column P+t."""

    prompt_ids: Tensor  # [N, P] int64
    prompt_mask: Tensor  # [N, P] bool
    response_ids: Tensor  # [N, T] int64, pad after <eos>
    response_mask: Tensor  # [N, T] bool: generated tokens, up to and including <eos>
    logp: Tensor  # [N, T] fp32: log μ(a_t|s_t) of the sampling distribution (0 where response_mask is 0)
    topk_ids: Tensor | None = None  # [N, T, K] int64: ids of μ's top-K
    topk_logp: Tensor | None = None  # [N, T, K] fp32: log μ at topk_ids
    finished: Tensor | None = None  # [N] bool: ended with <eos> (False = cut at max_new_tokens)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def sampled_in_topk(self) -> Tensor | None:
        if self.topk_ids is None:
            return None
        return (self.topk_ids == self.response_ids[..., None]).any(-1)

    def select(self, index: Tensor) -> "Rollout":
        """Rows ``index`` (a mini-batch)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[index] if isinstance(v, Tensor) else v
        return Rollout(**out)


class RolloutEngine:
    """Interface. ``sync`` loads the trainer's current weights; ``generate`` samples."""

    def sync(self, policy: torch.nn.Module) -> None:
        raise NotImplementedError

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, *, num_samples: int = 1,
                 generator: torch.Generator | None = None) -> Rollout:
        """Sample ``num_samples`` responses for each of the B prompts ([B, P] left-padded) → Rollout of N = B·G."""
        raise NotImplementedError


def sampling_logprobs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """log μ(·|s) of the distribution sampled from: log_softmax(z/τ) in fp32, truncated to top-k / top-p and
    renormalised over the kept support (−inf elsewhere). ``temperature == 0``: greedy (0 at the argmax).

    Args: logits [N, V] any float dtype. Returns [N, V] fp32.
    """
    z = logits.float()
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


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


class HFEngine(RolloutEngine):
    """Sampling with a transformers causal LM: prefill the prompts, then one token per step with a KV cache.

    Args:
        model: the policy (a ``PreTrainedModel``). With ``dtype`` equal to the policy's dtype the engine samples with
            the policy module itself (``sync`` is a no-op); otherwise it keeps its own copy in ``dtype`` and ``sync``
            copies the weights into it (like pushing weights to an inference server). For a LoRA policy, build the
            engine from the model *before* ``dppo.lora.apply_lora``: the engine's copy stays a plain model and
            ``sync`` pushes the merged weights (shared mode samples with the adapted module itself, unmerged).
        eos_token_id, pad_token_id: ids from the tokenizer (``eos_token_id`` may be a list: any of them ends a
            response).
        dtype: "fp32" | "bf16" | "fp16": the rollout precision.
        fp32_head: with a low-precision ``dtype``, run the lm-head GEMM in fp32: the decoder body runs in ``dtype``,
            its last hidden state is upcast, and the logits are h·W32ᵀ (+ b) with an fp32 copy W32 of the policy's
            head weight, refreshed by ``sync`` (no rounding of W to ``dtype``; costs one fp32 [V, H] copy). The
            "FP32 LM head" of ScaleRL / MiniMax-M1 (trl#4303, open-instruct#1387) against the mismatch. The trainer's
            own head is already fp32 (fp32 master weights; the head GEMM is outside autocast, ``dppo.model``), so
            this gives both sides an fp32 head. No effect when the engine shares the fp32 policy.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_id: int | list[int], pad_token_id: int, dtype: str = "fp32",
                 fp32_head: bool = False):
        policy_dtype = next(model.parameters()).dtype
        self.dtype = DTYPES[dtype]
        if self.dtype == policy_dtype:
            self.model = model
            self.shared = True
        else:
            self.model = copy.deepcopy(model).to(self.dtype)
            self.shared = False
        self.model.eval()
        self._body = self._head32 = None
        if fp32_head and not self.shared:
            parts = decoder_and_head(self.model)
            if parts is None:
                raise ValueError(f"fp32_head: {type(self.model).__name__} changes its logits after the lm head "
                                 "(soft-capping or scaling) or has no plain Linear head; use fp32_head=False")
            self._body = parts[0]
            self._head32 = [None if t is None else t.detach().float().clone() for t in lm_head(model)]
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = torch.tensor(sorted(set(int(e) for e in eos if e is not None)), dtype=torch.long)
        self.pad = int(pad_token_id)
        params = inspect.signature((self._body or self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights into the engine's copy, cast to the engine dtype. A LoRA policy (peft) pushes its
        merged weights W + (α/r)·B·A (the engine was built from the model before the adapters were added)."""
        if self.shared:
            return
        with torch.no_grad():
            if hasattr(policy, "peft_config"):
                from dppo.lora import load_merged

                load_merged(policy, self.model)
            else:
                for dst, src in zip(self.model.parameters(), policy.parameters()):
                    dst.copy_(src)  # cast to the engine dtype
            if self._head32 is not None:  # from the policy's (fp32) head itself, not from the rounded engine copy
                for dst, src in zip(self._head32, lm_head(base_model(policy))):
                    if dst is not None:
                        dst.copy_(src)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> Tensor:
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._head32 is not None:
            h = self._body(input_ids=ids, attention_mask=mask.long(), position_ids=pos, **kw).last_hidden_state
            return torch.nn.functional.linear(h[:, -1].float(), *self._head32)
        if self._keep_kw:
            kw[self._keep_kw] = 1
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, **kw)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, *, num_samples: int = 1,
                 generator: torch.Generator | None = None) -> Rollout:
        dev = prompt_ids.device
        ids = prompt_ids.repeat_interleave(num_samples, dim=0)
        pmask = prompt_mask.bool().repeat_interleave(num_samples, dim=0)
        n = ids.shape[0]
        eos = self.eos.to(dev)
        cache = _new_cache(self.model)
        pos = position_ids_from_mask(pmask)
        logits = self._forward(ids, pmask, pos, cache)
        next_pos = pos[:, -1:] + 1
        attn = pmask
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        toks, lps, masks, tk_ids, tk_lps = [], [], [], [], []
        for _ in range(params.max_new_tokens):
            logmu = sampling_logprobs(logits, params.temperature, params.top_k, params.top_p)  # [N, V] fp32
            if params.temperature == 0:
                a = logmu.argmax(-1)
            else:
                a = torch.multinomial(logmu.exp(), 1, generator=generator).squeeze(-1)
            live = ~done
            a = torch.where(live, a, torch.full_like(a, self.pad))
            toks.append(a)
            masks.append(live)
            lps.append(torch.where(live, logmu.gather(-1, a[:, None]).squeeze(-1), torch.zeros(n, device=dev)))
            if params.record_topk:
                v, i = torch.topk(logmu, min(params.record_topk, logmu.shape[-1]), dim=-1)  # K ≤ V
                tk_ids.append(i)
                tk_lps.append(v)
            done = done | (live & torch.isin(a, eos))
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(n, 1, dtype=torch.bool, device=dev)], dim=1)
            logits = self._forward(a[:, None], attn, next_pos, cache)
            next_pos = next_pos + 1
        return Rollout(
            prompt_ids=ids,
            prompt_mask=pmask,
            response_ids=torch.stack(toks, 1),
            response_mask=torch.stack(masks, 1),
            logp=torch.stack(lps, 1),
            topk_ids=torch.stack(tk_ids, 1) if tk_ids else None,
            topk_logp=torch.stack(tk_lps, 1) if tk_lps else None,
            finished=done,
        )
