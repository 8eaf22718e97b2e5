"""Checkpoints of a run (one interface over two stores: :mod:`dppo.checkpoint.local` for one process,
:mod:`dppo.checkpoint.sharded` under torchrun; :mod:`dppo.checkpoint.store` is the layout both write): everything needed to continue as if never interrupted, written so that nothing is lost.

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

from dppo.checkpoint.export import save_final
from dppo.checkpoint.local import load_latest, save_checkpoint
from dppo.checkpoint.sharded import load_dcp, load_latest_sharded, save_final_sharded, save_sharded
from dppo.checkpoint.store import (CheckpointLoadError, CheckpointWriteError, UnsafeCheckpointError, latest_step,
                                   list_checkpoints)

__all__ = ["save_checkpoint", "load_latest", "save_sharded", "load_latest_sharded", "load_dcp", "save_final",
           "save_final_sharded", "list_checkpoints", "latest_step", "CheckpointWriteError", "CheckpointLoadError",
           "UnsafeCheckpointError"]
