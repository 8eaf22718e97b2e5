"""Rollout engines: sample G responses per prompt and return a :class:`dppo.rollout.Rollout`.

- :class:`HFEngine`: dppo's own decode loop over a transformers model (any device, no extra package);
- :class:`VLLMEngine` (:mod:`dppo.engines.vllm`): vLLM in the trainer's process (``pip install 'dppo[vllm]'``).

:func:`make_engine` builds either from the trainer's settings.
"""

from __future__ import annotations

import torch

from dppo.engines.hf import HFEngine
from dppo.rollout import RolloutEngine

__all__ = ["HFEngine", "VLLMEngine", "make_engine", "ENGINES"]

ENGINES = ("hf", "vllm")


def make_engine(name: str, model: torch.nn.Module, model_path: str, *, eos_token_id: int | list[int],
                pad_token_id: int, dtype: str = "fp32", batch_size: int = 256, fp32_head: bool = False,
                own_copy: bool = False, device: str | None = None, max_logprobs: int = 20, seed: int = 0, vllm_max_model_len: int = 0,
                vllm_gpu_memory_utilization: float = 0.3, vllm_enforce_eager: bool = False,
                vllm_sleep: int = 0) -> RolloutEngine:
    """The rollout engine ``name`` ("hf" or "vllm") for the policy ``model`` loaded from ``model_path``.

    ``batch_size``: responses generated at a time (HF: chunk size; vLLM: ``max_num_seqs``). ``fp32_head``,
    ``own_copy`` (never sample with the policy module itself: under FSDP2) and ``device`` (where the own copy of a
    ``model`` on the meta device is allocated) are HF-engine options; ``max_logprobs``
    and the ``vllm_*`` settings are vLLM's (:class:`VLLMEngine`, always its own copy)."""
    if name == "hf":
        return HFEngine(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, dtype=dtype,
                        fp32_head=fp32_head, own_copy=own_copy, batch_size=batch_size, device=device)
    if name == "vllm":
        if fp32_head:
            raise ValueError("fp32_head (--rollout_fp32_head) is an HF-engine option; vLLM computes its logits "
                             "with its own head in the engine dtype (use --rollout_dtype fp32 or --engine hf)")
        from dppo.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, eos_token_id=eos_token_id, pad_token_id=pad_token_id, dtype=dtype,
                          max_logprobs=max(20, max_logprobs), max_model_len=vllm_max_model_len,
                          max_num_seqs=batch_size, gpu_memory_utilization=vllm_gpu_memory_utilization,
                          enforce_eager=vllm_enforce_eager, seed=seed, sleep_level=vllm_sleep)
    raise ValueError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")


def __getattr__(name: str):  # VLLMEngine without importing vllm until it is asked for
    if name == "VLLMEngine":
        from dppo.engines.vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(name)
