"""LoRA adapters (Hu et al., arXiv 2106.09685) through ``peft``, and the merged weights a rollout engine samples with.

With ``--lora_rank r`` the policy is W·x + (α/r)·B·A·x on the targeted Linear layers, with W frozen and only A [r, in]
and B [out, r] trained (B starts at 0, so step 0 is the loaded model). The trainer keeps the adapter unmerged (the
gradients need it); the rollout engine gets the *merged* weights W + (α/r)·B·A, cast to its dtype, as an inference
server that is pushed merged weights would (:func:`merged_named_parameters`). Its μ is therefore the adapted policy
up to the rounding of the rollout dtype, exactly as with full fine-tuning.

Only this module imports ``peft``, and only when LoRA is asked for (``pip install 'dppo[lora]'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["is_peft_model", "base_model", "apply_lora", "lora_targets", "merged_named_parameters", "load_merged", "ADAPTER"]

ADAPTER = "default"  # peft's name of the one adapter


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (checked without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper, or ``model`` itself (no adapters). Its lm head is the
    policy's: :func:`apply_lora` never adapts the head."""
    return model.get_base_model() if is_peft_model(model) else model


def lora_targets(spec: str) -> str | list[str]:
    """``--lora_target`` as peft takes it: the string "all-linear", or a list of module names."""
    if spec.strip().lower() == "all-linear":
        return "all-linear"
    return [t.strip() for t in spec.split(",") if t.strip()]


def apply_lora(model: nn.Module, *, rank: int, alpha: float = 0.0, dropout: float = 0.0,
               target: str = "all-linear") -> nn.Module:
    """Wrap ``model`` (a transformers causal LM, modified in place) in a ``peft`` LoRA model; returns the PeftModel.

    Only ``torch.nn.Linear`` layers of the transformer body may be targeted: the lm-head is left out (``all-linear``
    leaves it out too) because its weight is often tied to the input embedding, which an adapter on the head would
    silently leave un-adapted. Raises ``ValueError`` naming the model's Linear layers for a target that matches none.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and m is not head})
    only = f"only the body's Linear layers are supported: {', '.join(linear)}"
    targets = lora_targets(target)
    if head_name and isinstance(targets, list) and head_name.rsplit(".", 1)[-1] in targets:
        raise ValueError(f"--lora_target {target!r} names the output layer {head_name}; {only}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets,
                     bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing; not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ValueError(f"--lora_target {target!r}: {str(e).rstrip('.')}. The model's Linear layers are: "
                         f"{', '.join(linear)}") from None
    for name, m in peft_model.get_base_model().named_modules():
        if isinstance(m, LoraLayer) and (name == head_name or not isinstance(m, LoraLinear)):
            raise ValueError(f"--lora_target {target!r} adapts {name} ({type(m.get_base_layer()).__name__}); {only}")
    return peft_model


def _lora_layers(base: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_named_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the plain transformers model that ``model`` computes, named as in that model's
    ``named_parameters()`` (tied parameters once): W + (α/r)·B·A for every adapted layer, the parameter itself
    elsewhere. One merged tensor at a time (no second copy of the model). A model without adapters yields its own
    parameters."""
    if not is_peft_model(model):
        yield from model.named_parameters()
        return
    base = model.get_base_model()
    layers = _lora_layers(base)
    seen: set[int] = set()
    inside = None  # the adapted layer whose submodules (base_layer, lora_A, lora_B) named_modules() is walking
    for mname, mod in base.named_modules():
        if inside is not None and mname.startswith(inside):
            continue
        inside = None
        prefix = f"{mname}." if mname else ""
        params = mod.named_parameters(recurse=False)
        if mname in layers:
            inside = prefix
            if mod.merged:
                raise RuntimeError(f"{mname}: the adapter is merged into the base weight; unmerge it first")
            params = mod.get_base_layer().named_parameters(recurse=False)
        for pname, p in params:
            if id(p) in seen:  # tied weights: once, under the first name, as named_parameters() does
                continue
            seen.add(id(p))
            if mname in layers and pname == "weight" and ADAPTER in mod.active_adapters:
                p = p + mod.get_delta_weight(ADAPTER).to(p.dtype)
            yield prefix + pname, p


@torch.no_grad()
def load_merged(model: nn.Module, target: nn.Module) -> None:
    """Copy the merged weights of ``model`` (:func:`merged_named_parameters`) into ``target``, a plain model of the
    same architecture (any dtype and device: the copy casts). Every parameter of ``target`` must be written."""
    dst = dict(target.named_parameters())
    written = set()
    for name, w in merged_named_parameters(model):
        if name not in dst:
            raise KeyError(f"{name} of the policy has no counterpart in {type(target).__name__}")
        dst[name].copy_(w.full_tensor() if hasattr(w, "full_tensor") else w)  # a sharded (FSDP2) policy: gathered
        written.add(name)
    missing = set(dst) - written
    if missing:
        raise KeyError(f"parameters of {type(target).__name__} not written by the policy: {sorted(missing)[:5]}")
