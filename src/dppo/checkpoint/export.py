"""The trained policy as a plain transformers model + tokenizer (``RUN/final``), loadable with ``--model``."""

from __future__ import annotations

import torch

from dppo.hf.lora import is_peft_model, load_merged

__all__ = ["save_final"]


def save_final(model, tok, path: str, *, base_model_path: str) -> None:
    """Write ``model`` and ``tok`` to ``path`` with ``save_pretrained``.

    With LoRA, the adapter alone goes to ``{path}_adapter`` (peft format) and ``path`` gets the merged weights
    W + (α/r)·B·A, written into a fresh fp32 CPU copy of the base model loaded from ``base_model_path`` (the same
    merge the rollout engine receives; no second copy of the model on the training device)."""
    if is_peft_model(model):
        from transformers import AutoModelForCausalLM

        model.save_pretrained(f"{path}_adapter")
        plain = AutoModelForCausalLM.from_pretrained(base_model_path, local_files_only=True, dtype=torch.float32)
        load_merged(model, plain)
        plain.save_pretrained(path)
    else:
        model.save_pretrained(path)
    tok.save_pretrained(path)
