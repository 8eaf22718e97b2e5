"""The policy's weights as a rollout engine loads them, snapshots of them, and FP8 weight quantisation.

An engine samples with a *copy* of the policy (its own precision, its own process or its own library), so what
crosses from the trainer to the engine is a set of named tensors:

    policy_weights(policy)   (name, tensor) of the plain model the policy computes: LoRA merged (W + (α/r)·B·A),
                             FSDP2 shards gathered into whole tensors, every name of a tied tensor (an engine that
                             reprocesses the layers it receives must see the tied head under its own name)
    snapshot(policy)         the same, detached fp32 copies on the CPU: the policy as it was at one step, for
                             ``--rollout_lag`` / ``--async_rollout`` (:mod:`dppo.run.staleness`)

``RolloutEngine.sync(policy)`` is ``load_weights(policy_weights(policy))``; a lagged or asynchronous rollout calls
``load_weights(snapshot)`` with an older one.

FP8 weights (``--rollout_dtype fp8``, :func:`fp8_quantize`): the engine's linear weights are rounded to float8 e4m3
with one scale per output channel, s_o = max_i |W_oi| / 448, and used as bf16 values s_o·q_oi: what an FP8
weight-only checkpoint (per-channel scales, llm-compressor's FP8 schemes; vLLM / SGLang with FP8 weights) computes,
with the GEMM in bf16. Embeddings, norms and the lm head stay bf16, as in those checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["policy_weights", "snapshot", "fp8_quantize", "fp8_linear_names", "FP8_MAX", "full_tensor"]

FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a parameter sharded across processes (an FSDP2 DTensor; a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def policy_weights(policy: nn.Module, dtype: torch.dtype | None = None, *,
                   keep: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the plain transformers model ``policy`` computes (merged LoRA weights), named as in its
    ``named_parameters(remove_duplicate=False)``: a tied tensor is yielded under each of its names (the same tensor
    object). Sharded (FSDP2) parameters are gathered, one tensor at a time: every process must call this together.
    ``dtype``: cast each tensor (None: as the policy holds it), *before* a sharded one is gathered, so that the
    gather moves bf16, not fp32 (half the traffic; the same values, since rounding is elementwise); the LoRA merge
    W + (α/r)·B·A stays in the master dtype. ``keep``: names not cast (an engine that needs them at full precision:
    FP8 quantisation from the master weights, an fp32 head)."""
    from dppo.hf.lora import base_model, merged_named_parameters

    names: dict[int, list[str]] = {}
    for name, p in base_model(policy).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    aliases = {group[0]: group[1:] for group in names.values() if len(group) > 1}
    for name, w in merged_named_parameters(policy):
        w = w.detach()
        if dtype is not None and name not in keep and not any(a in keep for a in aliases.get(name, ())):
            w = w.to(dtype)  # a DTensor casts its local shard: the gather below moves `dtype`
        w = full_tensor(w)
        yield name, w
        for alias in aliases.get(name, ()):
            yield alias, w


@torch.no_grad()
def snapshot(policy: nn.Module, *, share_memory: bool = False) -> dict[str, Tensor]:
    """The policy's weights now (:func:`policy_weights`), as fp32 CPU copies that later updates do not touch; tied
    names share one tensor. ``share_memory``: in shared memory, so that handing them to a rollout worker process
    (:mod:`dppo.engines.worker`) passes a handle, not a copy. Memory: one fp32 copy of the model."""
    out: dict[str, Tensor] = {}
    last = copy = None
    for name, w in policy_weights(policy):
        if w is not last:  # policy_weights yields a tied tensor's aliases right after it, as the same object
            copy = w.detach().to("cpu", torch.float32, copy=True)
            if share_memory:
                copy.share_memory_()
            last = w
        out[name] = copy
    return out


def fp8_linear_names(model: nn.Module) -> set[str]:
    """Names of the weights FP8 checkpoints quantise: every ``nn.Linear`` weight except the lm head (and a head tied
    to the input embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(head.weight)} if head is not None and getattr(head, "weight", None) is not None else set()
    return {f"{mname}.weight" if mname else "weight" for mname, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and id(mod.weight) not in skip}


@torch.no_grad()
def fp8_quantize(w: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """W [O, I] → s_o · q_oi in ``out_dtype``, with q = float8_e4m3fn(W / s) (round to nearest even) and
    s_o = max_i |W_oi| / 448 per output channel (a zero row keeps s = 1). Computed in fp32 from ``w`` as given
    (quantise from the master weights, not from a bf16 copy)."""
    if w.dim() != 2:
        raise ValueError(f"fp8_quantize: expected a [out, in] weight, got shape {tuple(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(out_dtype)


def load_named(target: nn.Module, weights: Iterable[tuple[str, Tensor]], *, transform=None) -> None:
    """Copy named tensors into ``target``'s parameters (any dtype/device: the copy casts). Every parameter of
    ``target`` must be written, and every name must exist in it (a tied parameter may come under any of its
    names). ``transform(name, tensor)``: applied before the copy (FP8 quantisation)."""
    dst = dict(target.named_parameters(remove_duplicate=False))
    written: set[int] = set()
    for name, w in weights:
        p = dst.get(name)
        if p is None:
            raise KeyError(f"{name} of the policy has no counterpart in the engine's {type(target).__name__}")
        p.copy_(transform(name, w) if transform is not None else w)
        written.add(id(p))
    missing = sorted({n for n, p in dst.items() if id(p) not in written})
    if missing:
        raise KeyError(f"parameters of the engine's {type(target).__name__} not written by the policy: {missing[:5]}")
