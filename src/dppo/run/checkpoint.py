"""Checkpoints of a run: everything needed to continue as if never interrupted.

``RUN/checkpoint/state.pt`` holds the model and optimizer state dicts, the scheduler, the RNG states (Python, torch
CPU, CUDA), the step and the data position. It is written to a temporary file and renamed, so a run killed while
saving keeps the previous checkpoint intact.

Frozen parameters (the base model under LoRA) are left out of the model state: they never change, and the resumed
run loads them again from the model directory. A LoRA checkpoint is the adapter and its optimizer state, not a copy
of the model.
"""

from __future__ import annotations

import os
import random

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_path"]


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoint", "state.pt")


def _frozen_keys(model) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _trained_state(model) -> dict:
    frozen = _frozen_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def save_checkpoint(run_dir: str, *, step: int, model, optimizer, scheduler, data_position: int, extra: dict | None = None) -> str:
    path = checkpoint_path(run_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {
        "step": step,
        "data_position": data_position,
        "model": _trained_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "extra": extra or {},
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str, *, model, optimizer, scheduler, map_location="cpu") -> dict | None:
    """Restore into the given objects; returns the checkpoint dict (``step``, ``data_position``, ``extra``) or None
    if the run directory has no checkpoint."""
    path = checkpoint_path(run_dir)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location=map_location, weights_only=False)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = set(missing) - _frozen_keys(model)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]} (a checkpoint of another model or LoRA setting?)")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
