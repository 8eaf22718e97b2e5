"""Several processes, GPUs and machines: ``torchrun --nproc_per_node N -m dppo train …`` (torchrun's ``--nnodes`` and
rendezvous flags for several machines). torch.distributed with NCCL on CUDA and gloo on CPU; the policy is sharded
with FSDP2 (``fully_shard`` on every decoder layer and a root over the rest), as prime-rl and TRL (through
accelerate's FSDP2 plug-in) do. Plain ``python -m dppo train`` gets :class:`Local`, whose hooks are the identity and
which imports nothing of torch.distributed.

**What a run computes does not depend on the number of processes W** (tests/test_distributed.py):

* prompts: every process draws the step's B prompts (a function of seed and step) and samples its B/W consecutive
  ones, whole groups of G responses: a group never spans processes;
* samples: prompt b's responses are drawn from its own seed (:func:`dppo.rollout.prompt_seeds`), so they are the
  same whichever process, batch or chunk samples them;
* advantages and the step's figures come from the whole batch's rewards, lengths and flags (gathered);
* updates: the same mini-batches (one permutation of all B·G rows, from seed and step). Each process runs the
  forward/backward of its rows of a mini-batch with the loss divided by the *whole* mini-batch's aggregation
  denominator (the micro-batch accumulation rule of :func:`dppo.loss.aggregation_denominator`, across processes),
  and FSDP2 *sums* the gradients across processes: ∇ Σ_w L_w = ∇L of one process, up to float summation order.
  (FSDP2 would divide by W: ``set_gradient_divide_factor(1)``; plain SUM collectives,
  ``set_force_sum_reduction_for_comms``, because gloo has no PREMUL_SUM and its AVG is wrong, pytorch#162338.)
  Every process runs as many forwards as the busiest one (a piece with no rows of its own is a fully masked row:
  zero loss and gradient), since every FSDP2 forward is a collective;
* metrics: the loss metrics are pooled across processes by the registry's rules (:meth:`MetricPool.merge`).

**Loading once.** Rank 0 alone reads the model's weights (fp32, on the CPU); every other process builds the same
model with its parameters on the meta device (:func:`dppo.hf.model.load_skeleton`: no storage), and after sharding
each process receives its shards from rank 0, one tensor at a time (``set_model_state_dict`` with
``broadcast_from_rank0``): N processes do not each hold the whole fp32 model.

Each process samples with its own engine copy, refreshed from the sharded policy one gathered tensor at a time
(``full_tensor()``, in the engine's dtype).

**Phases and failures.** Every process records the phase it is in (model load, warm-up, engine start-up, weight
sync, rollout, train, evaluation, checkpoint, final export) and the step. A collective waits at most
``--dist_timeout``; the phases one process works through on its own for long (model load, warm-up, engine start-up,
rollout generation and scoring, evaluation, checkpoint writes, rank 0's final export) end at :meth:`Distributed.arrive`,
a barrier on a gloo group of its own with the longer ``--dist_phase_timeout`` (gloo's monitored barrier: rank 0 names
the processes that did not arrive). A failed collective or barrier ends the job with :class:`ProcessLost`, whose
message names the process, the phase, the step and how to resume. On CUDA a collective with a dead peer blocks
rather than fails (NCCL); a watchdog thread then reports the same message and exits with status 7 after
``--dist_timeout`` without progress, before NCCL's own watchdog (given 60 s more) would abort the process with no
word of which phase it was in.

Checkpoints are sharded (torch.distributed.checkpoint, :mod:`dppo.checkpoint.sharded`) and resumable under another
number of processes, one included; rank 0 alone writes metrics, configuration and the final model. A stop request (SIGTERM/SIGINT) is agreed by all processes at each poll, so they all write the same step.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from contextlib import contextmanager

import torch

from dppo.metrics import MetricPool
from dppo.run.config import EXIT, ConfigError, TrainConfig

__all__ = ["Local", "Distributed", "setup", "ProcessLost", "under_torchrun", "LONG_PHASES"]

# the phases a process may work through alone for long: they end at Distributed.arrive (--dist_phase_timeout)
LONG_PHASES = ("model load", "warm-up", "engine start-up", "rollout", "evaluation", "checkpoint", "checkpoint load",
               "final export")
NCCL_GRACE_S = 60.0  # NCCL's own timeout is --dist_timeout + this: dppo's watchdog reports first


class ProcessLost(RuntimeError):
    """A collective failed: another process died, or waited longer than ``--dist_timeout``."""


def under_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every process it starts."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextmanager
def setup(cfg: TrainConfig):
    """:class:`Distributed` under torchrun (the process group is destroyed on exit), else :class:`Local`."""
    if not under_torchrun():
        yield Local()
        return
    d = Distributed(cfg)
    try:
        yield d
    except RuntimeError as e:  # DistError subclasses it; dppo's own errors subclass it too and pass unchanged
        if isinstance(e, torch.distributed.DistError) or (type(e) is RuntimeError and _is_comm_failure(e)):
            cause = " ".join(str(e).split())[:300]
            raise ProcessLost(d.lost_message(f"{type(e).__name__}: {cause}")) from e
        raise
    finally:
        d.close()


def _is_comm_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("connection closed", "connection reset", "broken pipe", "timed out", "gloo",
                                   "nccl", "socket", "monitoredbarrier"))


class Local:
    """One process: every hook the trainer and the loop call is the identity (or the one-process code itself)."""

    rank, world, active = 0, 1, False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def first(self, fn):
        """``fn()``; with several processes rank 0 runs it first (a warm-up filling a cache), the others after."""
        return fn()

    def load_policy(self, path: str, device: str):
        """``(model, tokenizer)``: the fp32 policy from ``path`` (with several processes: rank 0 reads it, the others
        get a skeleton on the meta device that :meth:`shard` fills from rank 0)."""
        from dppo.hf.model import load_model

        return load_model(path, dtype="fp32", device=device)

    def enter(self, phase: str, step: int | None = None) -> None:
        """Record the phase this process is in (and the 0-based step), for the messages of a failure."""

    def beat(self) -> None:
        """Progress within a phase (a micro-batch done): the watchdog's clock starts again."""

    def arrive(self, phase: str) -> None:
        """The end of a long phase: wait (up to --dist_phase_timeout) until every process has finished it."""

    def shard(self, model, optim) -> None:
        """Shard ``model`` across the processes (``optim``: the OptimConfig's FSDP precision); nothing here."""

    def forward(self, fn, model, *args, **kw):
        """``fn(model, ...)``: a training forward (under FSDP2 it must run inside the root's forward)."""
        return fn(model, *args, **kw)

    def share(self, n: int) -> slice:
        """This process's consecutive share of ``n`` items (prompts, or rows of whole groups)."""
        return slice(0, n)

    def gather_rows(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Every process's rows of each tensor, concatenated in rank order (2-D ones right-padded with zeros)."""
        return list(xs)

    def micro_batches(self, batch, rows: torch.Tensor, micro: int) -> list[tuple]:
        """``(Batch, real)`` pieces of this process's rows of the mini-batch ``rows`` (indices into the whole batch),
        ``micro`` rows each (0 = all); ``real`` is False for a padding piece (none with one process)."""
        mb = batch.rows(rows)
        return [(b, True) for b in mb.split(micro or len(mb))]

    def all_true(self, flag) -> bool:
        return bool(flag)

    def sum(self, *xs: float) -> list[float]:
        return list(xs)

    def merge(self, pool: MetricPool) -> MetricPool:
        return pool

    def gather_objects(self, obj) -> list:
        return [obj]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        return obj

    def value(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def agreed(self, stop):
        return stop

    def describe(self) -> dict:
        return {"world_size": 1}

    def close(self) -> None:
        pass

    def save(self, run_dir: str, **kw) -> str:
        from dppo.checkpoint import save_checkpoint

        return save_checkpoint(run_dir, **kw)

    def load(self, run_dir: str, **kw) -> dict | None:
        from dppo.checkpoint import load_latest

        return load_latest(run_dir, **kw)

    def save_final(self, trainer, path: str) -> None:
        from dppo.checkpoint.export import save_final

        save_final(trainer.model, trainer.tok, path, base_model_path=trainer.model_path)


class _Root(torch.nn.Module):
    """FSDP2's root: its forward gathers the parameters outside the decoder layers (embedding, final norm, head),
    so a training forward that reads the head weight directly (:func:`dppo.hf.model.response_stats`) runs inside it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kw):
        return fn(self.model, *args, **kw)


class Distributed(Local):
    """This process's share of a torchrun job (environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""

    active = True

    def __init__(self, cfg: TrainConfig):
        import torch.distributed as dist

        self.cfg = cfg
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(cfg.device)
        if dev.type == "cuda":
            if dev.index is not None:
                raise ConfigError(f"--device {cfg.device}: under torchrun pass --device cuda; each process takes "
                                  "the GPU of its LOCAL_RANK")
            torch.cuda.set_device(self.local_rank)
            backend = "cpu:gloo,cuda:nccl"  # NCCL for the model's collectives, gloo for small CPU ones
        elif dev.type == "cpu":
            backend = "gloo"
        else:
            raise ConfigError(f"--device {cfg.device}: torchrun runs dppo on cpu (gloo) or cuda (NCCL)")
        b = cfg.rollout.prompts_per_step
        if b % self.world:
            raise ConfigError(f"--prompts_per_step {b} does not split over {self.world} processes (a group of "
                              f"responses never spans processes): use a multiple of {self.world}")
        self.device_type = dev.type
        self.device = torch.device("cuda", self.local_rank) if dev.type == "cuda" else dev
        self.phase, self.step = "start-up", None
        self._deadline: float | None = None  # the watchdog's: monotonic time by which this phase must progress
        # the processes reach the rendezvous at different times (imports, a GPU's start): the long bound first
        dist.init_process_group(backend, timeout=datetime.timedelta(
            seconds=max(cfg.dist_timeout, cfg.dist_phase_timeout)))
        # the long phases' barriers: gloo (a monitored barrier names who is missing) with their own timeout
        self._long = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.dist_phase_timeout))
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(dev.type, (self.world,))
        # from here each collective waits --dist_timeout; NCCL, which blocks on a dead peer, 60 s more, so that
        # dppo's watchdog (which names the phase) reports first
        grace = NCCL_GRACE_S if dev.type == "cuda" else 0.0
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=cfg.dist_timeout + grace))
        self.root: _Root | None = None
        self._from_rank0 = False  # load_policy: the weights come from rank 0 at shard()
        self._watchdog = _Watchdog(self) if dev.type == "cuda" else None

    # -- phases ---------------------------------------------------------------------------------------------------
    def enter(self, phase: str, step: int | None = None) -> None:
        import time

        self.phase, self.step = phase, step
        self._deadline = None if phase in LONG_PHASES else time.monotonic() + self.cfg.dist_timeout

    def beat(self) -> None:
        import time

        if self._deadline is not None:
            self._deadline = time.monotonic() + self.cfg.dist_timeout

    def arrive(self, phase: str) -> None:
        """Every process at the end of ``phase`` (a gloo monitored barrier, --dist_phase_timeout): a process that
        does not arrive in time is named in the error rank 0 raises; the others fail when rank 0 does."""
        import time

        import torch.distributed as dist

        self.phase = phase
        dist.monitored_barrier(group=self._long, timeout=datetime.timedelta(seconds=self.cfg.dist_phase_timeout),
                               wait_all_ranks=True)
        self._deadline = time.monotonic() + self.cfg.dist_timeout  # short collectives follow

    def lost_message(self, cause: str) -> str:
        where = self.phase + (f" of step {self.step + 1}" if self.step is not None else "")
        return (f"process {self.rank} of {self.world} lost contact with the others during {where} ({cause}): a "
                f"process died, or waited longer than --dist_timeout {self.cfg.dist_timeout:g} s in a collective "
                f"(--dist_phase_timeout {self.cfg.dist_phase_timeout:g} s at the end of a long phase). The "
                f"checkpoints in {self.cfg.out}/checkpoints are intact; run the same command again to resume from "
                "the newest")

    # -- setup ----------------------------------------------------------------------------------------------------
    def first(self, fn):
        self.enter("warm-up")
        if self.rank == 0:
            out = fn()
            self.arrive("warm-up")
            return out
        self.arrive("warm-up")
        return fn()

    def load_policy(self, path: str, device: str):
        """Rank 0 reads the fp32 weights (on the CPU: :meth:`shard` sends them on one tensor at a time); the other
        processes build the model with its parameters on the meta device and read no weights."""
        from dppo.hf.model import load_model, load_skeleton

        self.enter("model load")
        if self.rank == 0:
            model, tok = load_model(path, dtype="fp32", device="cpu")
        else:
            model, tok = load_skeleton(path)
        self._from_rank0 = True
        self.arrive("model load")
        return model, tok

    def shard(self, model, optim) -> None:
        """FSDP2 on every decoder layer (the model's ``_no_split_modules``) and a root over the rest. Gradients are
        summed across processes, never averaged. A policy from :meth:`load_policy` (rank 0's weights, a meta skeleton
        elsewhere) gets its shards from rank 0 here; one loaded by every process is checked to be the same."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        from dppo.hf.lora import base_model
        from dppo.hf.model import DTYPES, has_meta_params, materialize

        self.enter("model load")
        full = None
        if self._from_rank0:
            if self.rank == 0:
                if has_meta_params(model):
                    raise RuntimeError("rank 0's policy has meta parameters: it must hold the weights it sends")
                full = model.state_dict()  # the whole fp32 model, kept until the broadcast below
        else:
            self._check_same_weights(model)
        gathered = None if optim.fsdp_param_dtype == "fp32" else DTYPES[optim.fsdp_param_dtype]
        mp = MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=DTYPES[optim.fsdp_reduce_dtype])
        names = set(getattr(base_model(model), "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise ConfigError(f"{type(base_model(model)).__name__} names no decoder layer class (_no_split_modules): "
                              "FSDP2 cannot shard it layer by layer")
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        self.root = fully_shard(_Root(model), mesh=self.mesh, mp_policy=mp)
        if self._from_rank0:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            if has_meta_params(model):
                materialize(model, self.device)  # storage for this process's shards; every one is written below
            set_model_state_dict(model, full if self.rank == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            del full
        for m in self.root.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # each process's loss already has the whole batch's denominator
                m.set_force_sum_reduction_for_comms(True)  # SUM collectives only (gloo: no PREMUL_SUM, AVG bug)
        # the root returns ResponseStats views; nothing modifies them in place, which is what the warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    def _check_same_weights(self, model) -> None:
        with torch.no_grad():
            total = sum(float(p.detach().double().sum()) for p in model.parameters())
        sums = self.gather_objects(total)
        if any(s != sums[0] for s in sums):
            raise ConfigError(f"the processes loaded different initial weights (checksums {sums}): every process must "
                              "read the same --model directory (or the same --cache_dir warm-up)")

    # -- the trainer's hooks --------------------------------------------------------------------------------------
    def forward(self, fn, model, *args, **kw):
        return self.root(fn, *args, **kw)

    def share(self, n: int) -> slice:
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def gather_rows(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        parts = self.gather_objects([x.detach().cpu() for x in xs])
        out = []
        for i, x in enumerate(xs):
            chunks = [p[i] for p in parts]
            if x.dim() == 2:
                width = max(c.shape[1] for c in chunks)
                chunks = [torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks]
            out.append(torch.cat(chunks).to(x.device))
        return out

    def micro_batches(self, batch, rows: torch.Tensor, micro: int) -> list[tuple]:
        n = len(batch)  # every process holds n rows: rows r·n … (r+1)·n − 1 of the whole batch
        owner = rows // n
        mine = rows[owner == self.rank] - self.rank * n
        busiest = int(torch.bincount(owner, minlength=self.world).max())
        size = micro or busiest
        pieces = [(batch.rows(mine[i: i + size]), True) for i in range(0, len(mine), size)]
        while len(pieces) < -(-busiest // size):
            pieces.append((_padding_piece(batch), False))
        return pieces

    def all_true(self, flag) -> bool:
        import torch.distributed as dist

        t = torch.tensor([1 if bool(flag) else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def sum(self, *xs: float) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(xs, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, x: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def merge(self, pool: MetricPool) -> MetricPool:
        out = MetricPool()
        for p in self.gather_objects(pool):
            out.merge(p)
        return out

    def gather_objects(self, obj) -> list:
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def value(self, t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def agreed(self, stop):
        return _AgreedStop(stop, self)

    def describe(self) -> dict:
        dev = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})" if self.device_type == "cuda" \
            else "cpu"
        me = {"rank": self.rank, "local_rank": self.local_rank, "host": socket.gethostname(), "device": dev}
        import torch.distributed as dist

        return {"world_size": self.world, "backend": str(dist.get_backend()), "ranks": self.gather_objects(me)}

    def close(self) -> None:
        import torch.distributed as dist

        if self._watchdog is not None:
            self._watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- checkpoints and the final model (dppo.checkpoint.sharded) -----------------------------------------------
    def save(self, run_dir: str, **kw) -> str:
        from dppo.checkpoint.sharded import save_sharded

        return save_sharded(self, run_dir, **kw)

    def load(self, run_dir: str, **kw) -> dict | None:
        from dppo.checkpoint.sharded import load_latest_sharded

        return load_latest_sharded(self, run_dir, **kw)

    def save_final(self, trainer, path: str) -> None:
        from dppo.checkpoint.sharded import save_final_sharded

        save_final_sharded(self, trainer, path)


def _padding_piece(batch):
    """One row of ``batch`` with no response token: its loss is 0 and its gradient 0, and its forward and backward
    take part in FSDP2's collectives like any other."""
    import dataclasses

    one = batch.rows(torch.tensor([0]))
    return dataclasses.replace(one, response_mask=torch.zeros_like(one.response_mask),
                               advantages=torch.zeros_like(one.advantages))


class _AgreedStop:
    """A stop request of any process, agreed by all at every poll (an all-reduce): they all abandon or finish the
    same step and write the same checkpoint. ``signal``: this process's signal, or the one another process got."""

    def __init__(self, local, dist: Distributed):
        self.local, self.dist = local, dist
        self.stopped, self._signal = False, None

    def __call__(self) -> bool:
        if not self.stopped:
            sig = self.dist.max(float(self.local.signal or 0))
            if sig:
                self.stopped, self._signal = True, int(sig)
        return self.stopped

    @property
    def signal(self) -> int | None:
        return self.local.signal or self._signal


class _Watchdog:
    """A daemon thread that ends the process with dppo's message (status 7) when a phase of collectives makes no
    progress for --dist_timeout (no :meth:`Distributed.beat` / :meth:`~Distributed.enter`): on CUDA a collective
    with a dead peer blocks instead of failing, and NCCL's own watchdog (60 s later) would abort the process without
    naming the phase. Long phases have no deadline here (their end is a gloo barrier, which fails by itself)."""

    def __init__(self, dist: "Distributed", poll_s: float = 5.0, on_fire=None):
        import threading

        self.dist, self.poll_s = dist, poll_s
        self.on_fire = on_fire or _exit_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dppo-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        while not self._stop.wait(self.poll_s):
            deadline = self.dist._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.on_fire(self.dist.lost_message(f"no progress for {self.dist.cfg.dist_timeout:g} s: a "
                                                    "collective is waiting for a process that is gone or stuck"))
                return

    def stop(self) -> None:
        self._stop.set()


def _exit_lost(message: str) -> None:
    import sys

    print(f"dppo train: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT["process_lost"])
