"""The on-disk store both checkpoint writers share (:mod:`dppo.checkpoint.local`, one process, and
:mod:`dppo.checkpoint.sharded`, torchrun): the ``RUN/checkpoints/step-NNNNNNNN/`` layout, atomic commit, pruning, the
safe reader of ``state.pt`` and the RNG state. The guarantees are listed in :mod:`dppo.checkpoint`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import torch

__all__ = ["CheckpointWriteError", "CheckpointLoadError", "UnsafeCheckpointError", "checkpoints_root",
           "list_checkpoints", "latest_step", "frozen_keys", "trained_state", "rng_state", "restore_rng", "write_state",
           "commit", "write_error", "prune", "read_state", "fresh_dir"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous checkpoints are intact."""


class CheckpointLoadError(RuntimeError):
    """No checkpoint of the run directory could be read."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A state.pt holds Python objects beyond tensors and plain types (tampered with, or not written by dppo)."""


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``[(step, directory), …]`` of the complete checkpoints of ``run_dir``, oldest first."""
    root = checkpoints_root(run_dir)
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


def frozen_keys(model) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trained_state(model) -> dict:
    frozen = frozen_keys(model)
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


def fresh_dir(tmp: str) -> None:
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


def read_state(path: str, map_location, mmap: bool = False) -> dict:
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
    # a checkpoint written under torchrun keeps model and optimizer in dcp/ (dppo.checkpoint.sharded)
    need = {"step", "scheduler", "rng"} | (set() if isinstance(state, dict) and state.get("sharded")
                                           else {"model", "optimizer"})
    if not isinstance(state, dict) or not need <= set(state):
        raise CheckpointLoadError(f"{path} is not a dppo checkpoint (missing keys)")
    return state


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
