"""The HF engine: sampling with any transformers causal LM through its own decode loop (prefill + KV cache).

It runs its own loop instead of ``model.generate()``: generate's logits processors take defaults from the model's
``generation_config`` (e.g. a repetition penalty or top-k = 20 shipped with an instruct model) that the recorded μ
would silently have to replicate; owning the loop makes μ the sampling distribution by construction and keeps memory
at one [N, V] row of logits per step.

Rollout precision is the engine's own: ``dtype="bf16"`` keeps a bf16 copy of the policy (synced before every
rollout, as an inference engine's weights are), so π (fp32 trainer) and μ (bf16 engine) differ for identical
parameters: the training–inference mismatch of the paper (§5.1, Fig. 3) reproduced on a CPU. ``dtype="fp8"`` keeps
a bf16 copy whose linear weights are FP8 (e4m3, one scale per output channel; :func:`dppo.engines.weights.fp8_quantize`):
the larger mismatch of an FP8 rollout (verl#7519, OpenRLHF#1155; DRPO's FP8-rollout runs).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from dppo.hf.heads import lm_head
from dppo.engines.weights import fp8_linear_names, fp8_quantize, full_tensor, load_named, policy_weights  # noqa: F401
from dppo.hf.model import decoder_and_head, has_meta_params, materialize, position_ids_from_mask
from dppo.rollout import (Rollout, RolloutEngine, SamplingParams, mask_padding, prompt_seeds, sample_tokens,
                          sampling_logprobs)

__all__ = ["HFEngine", "ENGINE_DTYPES"]

# the rollout precisions: the engine copy's dtype, and whether its linear weights are FP8-quantised
ENGINE_DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
                 "fp8": (torch.bfloat16, True)}


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
            engine from the model *before* ``dppo.hf.lora.apply_lora``: the engine's copy stays a plain model and
            ``sync`` pushes the merged weights (shared mode samples with the adapted module itself, unmerged).
        eos_token_id, pad_token_id: ids from the tokenizer (``eos_token_id`` may be a list: any of them ends a
            response).
        dtype: "fp32" | "bf16" | "fp16" | "fp8": the rollout precision. "fp8" = a bf16 copy whose linear weights
            (all but the lm head) are rounded to float8 e4m3 with per-output-channel scales at every ``sync``.
        fp32_head: with a low-precision ``dtype``, run the lm-head GEMM in fp32: the decoder body runs in ``dtype``,
            its last hidden state is upcast, and the logits are h·W32ᵀ (+ b) with an fp32 copy W32 of the policy's
            head weight, refreshed by ``sync`` (no rounding of W to ``dtype``; costs one fp32 [V, H] copy). The
            "FP32 LM head" of ScaleRL / MiniMax-M1 (trl#4303, open-instruct#1387) against the mismatch. The trainer's
            own head is already fp32 (fp32 master weights; the head GEMM is outside autocast, ``dppo.hf.model``), so
            this gives both sides an fp32 head. No effect when the engine shares the fp32 policy.
        own_copy: keep an own copy even when ``dtype`` is the policy's: a policy that will be sharded across
            processes (``dppo.run.distributed``) cannot be sampled with, and ``sync`` then gathers its full weights;
            a lagged rollout (``--rollout_lag``) loads older weights than the policy's.
        device: where the own copy lives when ``model`` has its parameters on the meta device (a skeleton:
            :func:`dppo.hf.model.load_skeleton`); the copy is then allocated there uninitialised, and the first
            ``sync`` / ``load_weights`` writes every parameter. Otherwise the copy stays on the model's device.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_id: int | list[int], pad_token_id: int, dtype: str = "fp32",
                 fp32_head: bool = False, own_copy: bool = False, batch_size: int = 256, device=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (responses generated at a time), got {batch_size}")
        self.batch_size = int(batch_size)
        policy_dtype = next(model.parameters()).dtype
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(ENGINE_DTYPES)}")
        self.dtype, self.fp8 = ENGINE_DTYPES[dtype]
        skeleton = has_meta_params(model)
        if skeleton and device is None:
            raise ValueError("the model has parameters on the meta device: pass the device of the engine's copy")
        if self.dtype == policy_dtype and not own_copy and not self.fp8 and not skeleton:
            self.model = model
            self.shared = True
        else:
            self.model = copy.deepcopy(model).to(self.dtype)
            if skeleton:
                materialize(self.model, device)
            self.shared = False
        self.model.eval()
        self._body = self._head32 = None
        if fp32_head and self.dtype != torch.float32:  # an fp32 engine (shared or its own copy) has one
            parts = decoder_and_head(self.model)
            if parts is None:
                raise ValueError(f"fp32_head: {type(self.model).__name__} changes its logits after the lm head "
                                 "(soft-capping or scaling) or has no plain Linear head; use fp32_head=False")
            self._body = parts[0]
            self._head32 = [None if t is None else torch.empty(t.shape, dtype=torch.float32, device=device)
                            if t.is_meta else t.detach().float().clone() for t in lm_head(model)]
        # the fp32 head is refreshed from the incoming tensors of the head's names (every alias of a tied head)
        self._head_names = {} if self._head32 is None else {
            n: i for i, t in enumerate(lm_head(self.model)) if t is not None
            for n, p in self.model.named_parameters(remove_duplicate=False) if p is t}
        self._fp8_names = fp8_linear_names(self.model) if self.fp8 else set()
        if self.fp8 and not skeleton:
            self.load_weights(policy_weights(model))
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = torch.tensor(sorted(set(int(e) for e in eos if e is not None)), dtype=torch.long)
        self.pad = int(pad_token_id)
        params = inspect.signature((self._body or self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights into the engine's copy, cast to the engine dtype. A LoRA policy (peft) pushes its
        merged weights W + (α/r)·B·A (the engine was built from the model before the adapters were added). A sharded
        policy (FSDP2 DTensors) is gathered one tensor at a time: every process must call this together."""
        if self.shared:
            return
        # gathered in the engine dtype, except what is quantised or kept in fp32 from the master weights
        self.load_weights(policy_weights(policy, self.dtype, keep=self._fp8_names | set(self._head_names)))

    @torch.no_grad()
    def load_weights(self, weights) -> None:
        """Load named tensors (:func:`dppo.engines.weights.policy_weights` or a :func:`~dppo.engines.weights.snapshot`
        of an earlier step) into the engine's copy: cast to the engine dtype, FP8-quantised for ``dtype="fp8"``, the
        fp32 head refreshed from the incoming tensors themselves (not from the rounded engine copy). Every parameter
        of the engine must be written."""
        if self.shared:
            raise RuntimeError("this engine samples with the policy module itself (same dtype, no own copy): it "
                               "cannot hold other weights; build it with own_copy=True")
        items = weights.items() if hasattr(weights, "items") else weights
        head: dict[int, torch.Tensor] = {}

        def put(name, w):
            if name in self._head_names:
                head[self._head_names[name]] = w
            return fp8_quantize(w, self.dtype) if name in self._fp8_names else w

        load_named(self.model, items, transform=put)
        if self._head32 is not None:
            for i, dst in enumerate(self._head32):
                if dst is not None:
                    dst.copy_(head[i])

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
                 generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> Rollout:
        """Sample in chunks of whole groups, at most ``batch_size`` responses (at least one group) per chunk, so the
        KV cache and the [N, V] logits of a decode step grow with the chunk, not with prompts × G.

        Prompt b's G responses are a function of ``seeds[b]`` alone (:func:`dppo.rollout.prompt_seeds`; without
        ``seeds``, per-prompt seeds are drawn from ``generator``), so the rollout is the same tensor for tensor
        whatever the chunk size: chunks keep the batch's prompt width P and are right-padded to the longest
        response with the canonical padding (:func:`dppo.rollout.mask_padding`)."""
        b = prompt_ids.shape[0]
        if seeds is None:
            gdev = generator.device if generator is not None else "cpu"
            seeds = prompt_seeds(int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev)), b)
        if len(seeds) != b:
            raise ValueError(f"seeds: expected one per prompt ({b}), got {len(seeds)}")
        per = max(1, self.batch_size // num_samples)
        parts = [self._generate(prompt_ids[i: i + per], prompt_mask[i: i + per], params, num_samples,
                                list(seeds[i: i + per])) for i in range(0, b, per)]
        return mask_padding(parts[0] if len(parts) == 1 else _concat(parts), self.pad)

    def _generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams, num_samples: int,
                  seeds: list[int]) -> Rollout:
        dev = prompt_ids.device
        ids = prompt_ids.repeat_interleave(num_samples, dim=0)
        pmask = prompt_mask.bool().repeat_interleave(num_samples, dim=0)
        n = ids.shape[0]
        draws = _Draws(num_samples, params, dev, seeds)
        eos = self.eos.to(dev)
        cache = _new_cache(self.model)
        pos = position_ids_from_mask(pmask)
        logits = self._forward(ids, pmask, pos, cache)
        next_pos = pos[:, -1:] + 1
        attn = pmask
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        toks, lps, masks, tk_ids, tk_lps, full = [], [], [], [], [], []
        for t in range(params.max_new_tokens):
            if params.logit_noise > 0:
                logits = logits.float() + params.logit_noise * draws.noise(logits.shape[-1])
            logmu = sampling_logprobs(logits, params.temperature, params.top_k, params.top_p)  # [N, V] fp32
            if params.temperature == 0:
                a = logmu.argmax(-1)
            else:
                a = sample_tokens(logmu, draws.uniforms[:, t])
            live = ~done
            a = torch.where(live, a, torch.full_like(a, self.pad))
            toks.append(a)
            masks.append(live)
            lps.append(torch.where(live, logmu.gather(-1, a[:, None]).squeeze(-1), torch.zeros(n, device=dev)))
            if params.record_topk:
                v, i = torch.topk(logmu, min(params.record_topk, logmu.shape[-1]), dim=-1)  # K ≤ V
                tk_ids.append(i)
                tk_lps.append(v)
            if params.record_logp:
                full.append(logmu)
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
            rollout_logp=torch.stack(lps, 1),
            rollout_topk_ids=torch.stack(tk_ids, 1) if tk_ids else None,
            rollout_topk_logp=torch.stack(tk_lps, 1) if tk_lps else None,
            finished=done,
            rollout_full_logp=torch.stack(full, 1) if full else None,
        )


class _Draws:
    """The random numbers of one chunk: a uniform per response and token (inverse-CDF sampling) and the
    ``logit_noise`` ε. Prompt b's G responses draw from their own generator, seeded with ``seeds[b]`` and on the CPU
    so that every device gives the same numbers: the same prompt and seed give the same samples in any batch, chunk
    or process."""

    def __init__(self, g: int, params: SamplingParams, device, seeds: list[int]):
        self.g, self.device = g, device
        t = max(params.max_new_tokens, 1)
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.uniforms = torch.cat([torch.rand(g, t, generator=gen, dtype=torch.float64) for gen in self.gens])
        self.uniforms = self.uniforms.to(device)

    def noise(self, v: int) -> Tensor:
        """[N, V] standard normal ε for this token position."""
        return torch.cat([torch.randn(self.g, v, generator=gen) for gen in self.gens]).to(self.device)


def _concat(parts: list[Rollout]) -> Rollout:
    """Rollouts of the same prompt width stacked along N, responses right-padded to the longest."""
    t = max(r.response_ids.shape[1] for r in parts)

    def cat(name: str) -> Tensor | None:
        xs = [getattr(r, name) for r in parts]
        if xs[0] is None:
            return None
        if name.startswith(("response_", "rollout_")):  # [N, T, ...]: pad T (mask_padding fixes the values)
            xs = [torch.cat([x, x.new_zeros((x.shape[0], t - x.shape[1], *x.shape[2:]))], dim=1) for x in xs]
        return torch.cat(xs)

    return Rollout(**{f.name: cat(f.name) for f in dataclasses.fields(Rollout)})
