"""Checkpoints of a run: everything needed to continue as if never interrupted, written so that nothing is lost.

Layout: ``RUN/checkpoints/step-00000050/state.pt`` (model and optimizer state dicts, scheduler, RNG states, step, data
position) and ``meta.json`` beside it. The newest ``keep`` checkpoints are kept (2 by default).

* **Atomic.** A checkpoint is written into ``step-….tmp-<pid>/``, fsynced, then renamed: a run killed while saving,
  or a write that fails (full disk, permission denied), leaves the previous checkpoints as they were. A failed write
  raises :class:`CheckpointWriteError` naming the path and the cause.
* **Safe to load.** ``state.pt`` holds tensors and plain Python types only and is read with
  ``torch.load(weights_only=True)``: a ``state.pt`` from someone else cannot run code. A file that holds anything else
  is refused with :class:`UnsafeCheckpointError` (the run directory is left as it was).
* **Corrupt newest checkpoint.** A truncated or unreadable ``state.pt`` is set aside (renamed ``….corrupt``) and the
  one before it is loaded, with a log line saying so; if none is readable, :class:`CheckpointLoadError` names them.

Frozen parameters (the base model under LoRA) are left out of the model state: they never change, and the resumed
run loads them again from the model directory. A LoRA checkpoint is the adapter and its optimizer state, not a copy
of the model.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import torch

__all__ = ["save_checkpoint", "load_latest", "list_checkpoints", "latest_step", "CheckpointWriteError",
           "CheckpointLoadError", "UnsafeCheckpointError", "rng_state", "restore_rng", "write_state", "commit",
           "write_error", "prune"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous checkpoints are intact."""


class CheckpointLoadError(RuntimeError):
    """No checkpoint of the run directory could be read."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A state.pt holds Python objects beyond tensors and plain types (tampered with, or not written by dppo)."""


def _root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``[(step, directory), …]`` of the complete checkpoints of ``run_dir``, oldest first."""
    root = _root(run_dir)
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_DIR.match(name)
            d = os.path.join(root, name)
            if m and os.path.isfile(os.path.join(d, "state.pt")) and os.path.isfile(os.path.join(d, "meta.json")):
                out.append((int(m.group(1)), d))
    return sorted(out)


def latest_step(run_dir: str) -> int | None:
    """Step of the newest complete checkpoint (None if there is none); reads no state."""
    cks = list_checkpoints(run_dir)
    return cks[-1][0] if cks else None


def _frozen_keys(model) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _trained_state(model) -> dict:
    frozen = _frozen_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(run_dir: str, *, step: int, model, optimizer, scheduler, data_position: int,
                    extra: dict | None = None, keep: int = 2) -> str:
    """Write the checkpoint of ``step`` atomically and keep the newest ``keep``; returns its directory."""
    final = os.path.join(_root(run_dir), f"step-{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    state = {
        "step": int(step),
        "data_position": int(data_position),
        "model": _trained_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    try:
        _fresh_dir(tmp)
        write_state(tmp, state)
        commit(tmp, final)
    except OSError as e:
        raise write_error(run_dir, step, tmp, e) from e
    prune(run_dir, keep)
    return final


def _fresh_dir(tmp: str) -> None:
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def write_state(tmp: str, state: dict, meta: dict | None = None) -> None:
    """``state.pt`` and ``meta.json`` into the directory ``tmp``, fsynced (files and directory)."""
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": int(state["step"]), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def commit(tmp: str, final: str) -> None:
    """Rename the complete directory ``tmp`` to ``final`` (replacing a checkpoint of the same step)."""
    if os.path.isdir(final):  # the same step saved again (a resumed run re-reaching it): replace it
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def write_error(run_dir: str, step: int, tmp: str, e: Exception) -> CheckpointWriteError:
    """The error of a failed write (``tmp`` removed), naming the path, the cause and what is still there."""
    shutil.rmtree(tmp, ignore_errors=True)
    prev = list_checkpoints(run_dir)
    kept = f"the previous checkpoint ({prev[-1][1]}) is intact" if prev else "no earlier checkpoint exists"
    cause = getattr(e, "strerror", None) or e
    return CheckpointWriteError(f"could not write the checkpoint of step {step} to {tmp}: {cause} "
                                f"({type(e).__name__}); {kept}")


def prune(run_dir: str, keep: int) -> None:
    for _, d in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def _read(path: str, map_location, mmap: bool = False) -> dict:
    """``mmap``: tensors stay in the file's pages (shared by the processes of one machine that all read it)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file; classified below
        if "GLOBAL" in str(e):  # the pickle names a callable that is not allowed: what an exploit needs
            raise UnsafeCheckpointError(
                f"refused to load {path}: it holds Python objects beyond tensors and plain types, which could run "
                "code when unpickled (tampered with, or not written by dppo). Nothing was loaded and the run "
                "directory is unchanged; remove the file if you do not trust it") from None
        raise CheckpointLoadError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    # a checkpoint written under torchrun keeps model and optimizer in dcp/ (dppo.run.dist_checkpoint)
    need = {"step", "scheduler", "rng"} | (set() if isinstance(state, dict) and state.get("sharded")
                                           else {"model", "optimizer"})
    if not isinstance(state, dict) or not need <= set(state):
        raise CheckpointLoadError(f"{path} is not a dppo checkpoint (missing keys)")
    return state


def _restore(state: dict, path: str, *, model, optimizer, scheduler) -> None:
    if not state.get("sharded"):
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = set(missing) - _frozen_keys(model)
        if missing or unexpected:
            raise RuntimeError(f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected "
                               f"{sorted(unexpected)[:5]} (a checkpoint of another model or LoRA setting?)")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


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
            state = _read(path, map_location)
            if state.get("sharded"):  # written under torchrun: model and optimizer from its dcp/ files, any layout
                from dppo.run.dist_checkpoint import load_dcp

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
