"""Checkpoints of a run under torchrun: sharded with torch.distributed.checkpoint (DCP), with the guarantees of
:mod:`dppo.checkpoint`.

Layout: ``RUN/checkpoints/step-00000050/`` holds ``dcp/`` (model and AdamW state, each process writing its own
shards: ``__<rank>_0.distcp`` and a ``.metadata`` index), ``state.pt`` (step, data position, scheduler, the RNG state
of every rank; no tensors of the model) and ``meta.json`` (``"format": "dcp"``, ``world_size``).

* **Atomic, keep N.** Every process writes into the same ``step-….tmp-dist/``; rank 0 renames it once all shards are
  on disk and fsynced, and removes all but the newest ``--keep_checkpoints``. A failed write on any process stops every
  process with :class:`CheckpointWriteError`; the previous checkpoints are untouched.
* **Any number of processes.** DCP re-slices the shards to the reading processes' layout: a checkpoint written by 2
  processes resumes under 4, or under one plain ``python -m dppo train`` (no process group: :func:`load_dcp`); a
  one-process checkpoint (``state.pt`` with the full state) resumes under torchrun, each process keeping its shard.
* **Safe to load.** DCP itself unpickles its ``.metadata`` index and ``torch.load``\\ s non-tensor entries with
  ``weights_only=False``; here the index is read by an unpickler that admits DCP's own record classes and torch's
  sizes and dtypes only, and the entries with ``weights_only=True``: a tampered checkpoint cannot run code
  (:class:`UnsafeCheckpointError`).
* **Corrupt newest checkpoint.** Every process must read it; if any cannot, all fall back to the one before it
  (rank 0 sets the bad one aside as ``….corrupt``).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings

import torch

from dppo.checkpoint.store import (CheckpointLoadError, UnsafeCheckpointError, checkpoints_root, commit,
                                   list_checkpoints, prune, read_state, restore_rng, rng_state, trained_state,
                                   write_error, write_state)

__all__ = ["save_sharded", "load_latest_sharded", "load_dcp", "save_final_sharded"]


def _failure(e: BaseException) -> str:
    """One line naming the cause; DCP's CheckpointException (a BaseException) carries every process's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        rank, (exc, _) = next(iter(e.failures.items()))
        e = exc
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300] if text else ''}"


def _dcp_errors() -> tuple:
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (the base model under LoRA) never change: reloaded from the model directory, as one process
    # does; loading is then not strict about them (every trained entry is checked by DCP itself: none may be missing)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded(dist, run_dir: str, *, step: int, model, optimizer, scheduler, data_position: int,
                 extra: dict | None = None, keep: int = 2) -> str:
    """Every process calls this together; returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(checkpoints_root(run_dir), f"step-{step:08d}")
    tmp = f"{final}.tmp-dist"  # the same on every process (a leftover of a killed run is removed first)

    def agree(err: Exception | None) -> None:
        errs = [e for e in dist.gather_objects(None if err is None else (type(err).__name__, str(err))) if e]
        if errs:
            cause = OSError(f"{errs[0][1]}") if err is None else err
            raise write_error(run_dir, step, tmp, cause)

    err = None
    if dist.rank == 0:
        try:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            err = e
    agree(err)
    msd, osd = get_state_dict(model, optimizer, options=_options())
    try:  # DCP's own coordination on the long phases' group: a slow write waits --dist_phase_timeout
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(tmp, "dcp"),
                 process_group=getattr(dist, "_long", None))
    except _dcp_errors() as e:  # DCP reports any process's failure on every process
        err = OSError(_failure(e))
    agree(err)
    rngs = dist.gather_objects(rng_state())
    if dist.rank == 0:
        state = {"step": int(step), "data_position": int(data_position), "scheduler": scheduler.state_dict(),
                 "rng": rngs[0], "rng_ranks": rngs, "extra": dict(extra or {}), "sharded": True,
                 "world_size": dist.world}
        try:
            write_state(tmp, state, meta={"format": "dcp", "world_size": dist.world})
            commit(tmp, final)
        except OSError as e:
            err = e
    agree(err)
    if dist.rank == 0:
        prune(run_dir, keep)
    dist.arrive("checkpoint")
    return final


class _SafeUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` index holds its own record classes, torch sizes, dtypes and layouts, the checkpoint's path
    and plain containers; anything else (a callable an exploit needs) is refused."""

    _TORCH = {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"}
    _OTHER = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
              ("torch.serialization", "_get_layout"),  # a name → torch.layout lookup
              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem as fs
        import torch.distributed.checkpoint.metadata as md

        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(md, name, None), type):
            return getattr(md, name)
        if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            return fs._StorageInfo
        if module == "torch" and (name in self._TORCH or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in self._OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a checkpoint index")


def _reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _SafeUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)  # non-tensor entries: optimizer hyper-parameters
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def load_dcp(ckpt_dir: str, model, optimizer) -> None:
    """Load the model and optimizer state of a sharded checkpoint into ``model`` / ``optimizer``, sharded (FSDP2,
    every process calling) or not (one process, no process group), whatever number of processes wrote it. Raises
    :class:`CheckpointLoadError` (unreadable) or :class:`UnsafeCheckpointError` (a tampered index or entry)."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(ckpt_dir, "dcp")
    msd, osd = get_state_dict(model, optimizer, options=_options())
    state = {"model": msd, "optimizer": osd}
    alone = not (tdist.is_available() and tdist.is_initialized())
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_reader(path), planner=_planner(), no_dist=alone)
    except _dcp_errors() as e:  # DCP wraps every process's error in CheckpointException
        text = str(e)
        if "is not allowed in a checkpoint index" in text or "Weights only load failed" in text:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it holds Python objects beyond tensors and plain types, which could run code "
                "when unpickled (tampered with, or not written by dppo). Nothing was loaded and the run directory is "
                "unchanged; remove the checkpoint if you do not trust it") from None
        raise CheckpointLoadError(f"{path} is unreadable ({_failure(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(strict=False))


def _load_full(state: dict, model, optimizer) -> None:
    """A one-process checkpoint (the whole model and optimizer state) into a sharded model: every process reads the
    whole state and keeps its shard. The optimizer state is keyed by parameter index; DCP's by name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, state["model"], options=full)
    names = {id(p): n for n, p in model.named_parameters()}
    osd = state["optimizer"]
    index = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {index[i]: v for i, v in osd["state"].items()},
               "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def load_latest_sharded(dist, run_dir: str, *, model, optimizer, scheduler, map_location="cpu",
                        log=print) -> dict | None:
    """:func:`dppo.checkpoint.load_latest` for every process of a torchrun job at once: each checkpoint is
    tried by all of them and used only if all could read it."""
    cks = list_checkpoints(run_dir)
    if not cks:
        return None
    errors: list[str] = []

    def agree(err) -> str | None:
        errs = [e for e in dist.gather_objects(err) if e]
        unsafe = [m for kind, m in errs if kind == "unsafe"]
        if unsafe:
            raise UnsafeCheckpointError(unsafe[0])
        return errs[0][1] if errs else None

    for step, d in reversed(cks):
        path = os.path.join(d, "state.pt")
        state, err = None, None
        try:
            state = read_state(path, "cpu", mmap=True)  # a one-process state.pt: every process reads all of it
        except UnsafeCheckpointError as e:
            err = ("unsafe", str(e))
        except CheckpointLoadError as e:
            err = ("corrupt", str(e))
        if (msg := agree(err)) is None:
            dist.enter("checkpoint load")
            try:
                if state.get("sharded"):
                    load_dcp(d, model, optimizer)
                else:
                    _load_full(state, model, optimizer)
            except UnsafeCheckpointError as e:
                err = ("unsafe", str(e))
            except CheckpointLoadError as e:
                err = ("corrupt", str(e))
            except _dcp_errors() as e:  # e.g. a checkpoint of another model: fall back, as one process does
                err = ("corrupt", f"{d} does not fit the model ({_failure(e)})")
            dist.arrive("checkpoint load")
            msg = agree(err)
        if msg is not None:
            errors.append(msg)
            continue
        if errors and dist.rank == 0:
            for (s, bad), m in zip(reversed(cks), errors):
                os.replace(bad, f"{bad}.corrupt")
                log(f"checkpoint of step {s} is corrupt, set aside as {bad}.corrupt: {m}")
            log(f"falling back to the checkpoint of step {step} ({d})")
        dist.barrier()
        scheduler.load_state_dict(state["scheduler"])
        ranks = state.get("rng_ranks")
        restore_rng(ranks[dist.rank] if ranks and len(ranks) == dist.world else state["rng"])
        return state
    raise CheckpointLoadError("no checkpoint of " + run_dir + " could be read: " + "; ".join(errors)
                              + ". The run directory is unchanged; start a new --out, or remove the checkpoints to "
                              "start this one over")


def save_final_sharded(dist, trainer, path: str) -> None:
    """``RUN/final`` as one process writes it (:func:`dppo.checkpoint.export.save_final`): the trained weights are gathered
    to rank 0, which loads them into a plain copy of the model (with the same LoRA adapters) and saves that."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dppo.hf.model import load_model
    from dppo.checkpoint.export import save_final

    dist.enter("final export (gather)")
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
    if dist.rank == 0:
        plain, _ = load_model(trainer.model_path, dtype="fp32", device="cpu")
        lc = trainer.cfg.lora
        if lc.rank:
            from dppo.hf.lora import apply_lora

            plain = apply_lora(plain, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target=lc.target)
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        if unexpected or set(trained_state(plain)) - set(sd):
            raise RuntimeError(f"the gathered weights do not match the model: unexpected {sorted(unexpected)[:5]}, "
                               f"missing {sorted(set(trained_state(plain)) - set(sd))[:5]}")
        save_final(plain, trainer.tok, path, base_model_path=trainer.model_path)
    dist.arrive("final export")  # rank 0 writes alone: --dist_phase_timeout
