"""The checkpoints of a one-process run: ``state.pt`` with the full model and optimizer state (guarantees:
:mod:`dppo.checkpoint`). :func:`load_latest` also reads a checkpoint written under torchrun (its ``dcp/`` shards,
any layout, through :func:`dppo.checkpoint.sharded.load_dcp`)."""

from __future__ import annotations

import os

from dppo.checkpoint.sharded import load_dcp
from dppo.checkpoint.store import (CheckpointLoadError, UnsafeCheckpointError, checkpoints_root, commit, fresh_dir,
                                   frozen_keys, list_checkpoints, prune, read_state, restore_rng, rng_state,
                                   trained_state, write_error, write_state)

__all__ = ["save_checkpoint", "load_latest"]


def save_checkpoint(run_dir: str, *, step: int, model, optimizer, scheduler, data_position: int,
                    extra: dict | None = None, keep: int = 2) -> str:
    """Write the checkpoint of ``step`` atomically and keep the newest ``keep``; returns its directory."""
    final = os.path.join(checkpoints_root(run_dir), f"step-{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    state = {
        "step": int(step),
        "data_position": int(data_position),
        "model": trained_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    try:
        fresh_dir(tmp)
        write_state(tmp, state)
        commit(tmp, final)
    except OSError as e:
        raise write_error(run_dir, step, tmp, e) from e
    prune(run_dir, keep)
    return final


def _restore(state: dict, path: str, *, model, optimizer, scheduler) -> None:
    if not state.get("sharded"):
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = set(missing) - frozen_keys(model)
        if missing or unexpected:
            raise RuntimeError(f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected "
                               f"{sorted(unexpected)[:5]} (a checkpoint of another model or LoRA setting?)")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])


def load_latest(run_dir: str, *, model, optimizer, scheduler, map_location="cpu", log=print) -> dict | None:
    """Restore the newest readable checkpoint into the given objects; returns its state (``step``,
    ``data_position``, ``extra``) or None when the run directory has none. A corrupt newest checkpoint is renamed
    ``….corrupt`` and the one before it is tried (logged); an unsafe one stops with :class:`UnsafeCheckpointError`."""
    cks = list_checkpoints(run_dir)
    if not cks:
        return None
    errors = []
    for step, d in reversed(cks):
        path = os.path.join(d, "state.pt")
        try:
            state = read_state(path, map_location)
            if state.get("sharded"):  # written under torchrun: model and optimizer from its dcp/ files, any layout
                load_dcp(d, model, optimizer)
        except UnsafeCheckpointError:
            raise
        except CheckpointLoadError as e:
            errors.append(str(e))
            continue
        if errors:
            for (s, bad), msg in zip(reversed(cks), errors):
                os.replace(bad, f"{bad}.corrupt")
                log(f"checkpoint of step {s} is corrupt, set aside as {bad}.corrupt: {msg}")
            log(f"falling back to the checkpoint of step {step} ({d})")
        _restore(state, path, model=model, optimizer=optimizer, scheduler=scheduler)
        return state
    raise CheckpointLoadError("no checkpoint of " + run_dir + " could be read: " + "; ".join(errors)
                              + ". The run directory is unchanged; start a new --out, or remove the checkpoints to "
                              "start this one over")
