"""A rollout engine in its own process, so that sampling overlaps training (``--async_rollout k``).

:class:`EngineWorker` starts a worker process (spawned: a fresh interpreter, its own torch threads) that builds the
run's engine (:func:`dppo.engines.make_engine`, HF or vLLM) and serves requests in order:

    load   (version, {name: tensor})        weights in shared memory (:func:`dppo.engines.weights.snapshot`): the
                                            worker copies them into its engine (cast, FP8, merged LoRA as sent)
    generate (prompt ids, mask, params, G, per-prompt seeds)  → a :class:`dppo.rollout.Rollout`

``submit`` returns at once with a :class:`Pending` result; ``generate`` (the :class:`RolloutEngine` interface, used by
the evaluation) waits for it. The worker samples with the same engine code, the same per-prompt seeds and the same
weights as a synchronous engine would, so what it returns is what ``--rollout_lag k`` samples in-process (tested
tensor for tensor).

Failures are never silent: an exception in the worker comes back as :class:`RolloutWorkerError` with its traceback;
a worker that dies (killed, out of memory) is noticed within a second by whoever waits on it and raises
:class:`RolloutWorkerError` naming its pid, its exit code and what it was doing. The worker ignores SIGINT/SIGTERM
(the trainer decides when to stop and closes it) and exits by itself when the trainer process is gone.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dppo.rollout import Rollout, RolloutEngine, RolloutEngineError, SamplingParams

__all__ = ["EngineWorker", "EngineSpec", "Pending", "RolloutWorkerError"]


class RolloutWorkerError(RolloutEngineError):
    """The rollout worker process failed or died; the message names it and what it was doing."""


@dataclass(frozen=True)
class EngineSpec:
    """What the worker needs to build the run's engine (plain data: it crosses the process boundary)."""

    name: str
    model_path: str
    eos_token_id: list[int]
    pad_token_id: int
    dtype: str = "fp32"
    fp32_head: bool = False
    batch_size: int = 256
    max_logprobs: int = 20
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    vllm: dict = field(default_factory=dict)


@dataclass
class Pending:
    """A request in flight; ``what`` names it in errors (e.g. "step 12's batch")."""

    what: str
    done: bool = False
    value: object = None
    seconds: float = 0.0  # the worker's time on it


class EngineWorker(RolloutEngine):
    """The client side: sends requests to the worker process and collects the answers in order."""

    def __init__(self, spec: EngineSpec, start_timeout: float = 600.0):
        ctx = torch.multiprocessing.get_context("spawn")
        self._requests = ctx.Queue()
        self._answers = ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(spec, self._requests, self._answers, os.getpid()),
                                 name="dppo-rollout-worker", daemon=True)
        self._proc.start()
        # a trainer never closed (an error, a script that just ends) still stops its worker at exit, before
        # multiprocessing's own exit handler would SIGTERM it (which the worker ignores) and wait for it forever
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._requests, 30.0)
        self._pending: deque[Pending] = deque()
        self._version: object = None  # the weights the worker holds (or will, once its queue reaches them)
        ready = Pending("starting the engine")
        self._pending.append(ready)
        self._wait(ready, timeout=start_timeout)
        self.description = ready.value

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- requests --------------------------------------------------------------------------------------------------
    def load_weights(self, weights: dict, version: object = None) -> None:
        """Queue ``weights`` (shared-memory tensors: passed by handle) for the worker's engine; with a ``version``
        that the worker already holds, nothing is sent."""
        if version is not None and version == self._version:
            return
        self._send(("load", weights), Pending(f"loading the weights of {version!r}"))
        self._version = version

    def sync(self, policy: torch.nn.Module) -> None:
        from dppo.engines.weights import snapshot

        self.load_weights(snapshot(policy, share_memory=True), version=None)

    def submit(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, *,
               num_samples: int, seeds: Sequence[int], what: str = "a rollout") -> Pending:
        """Queue a generation; returns at once. :meth:`result` waits for it."""
        p = Pending(what)
        self._send(("generate", prompt_ids.cpu(), prompt_mask.cpu(), params, int(num_samples), list(seeds)), p)
        return p

    def result(self, p: Pending, device: str | torch.device = "cpu") -> Rollout:
        self._wait(p)
        ro = p.value
        return Rollout(**{k: None if v is None else v.to(device) for k, v in vars(ro).items()})

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, *,
                 num_samples: int = 1, generator: torch.Generator | None = None,
                 seeds: Sequence[int] | None = None) -> Rollout:
        if seeds is None:
            raise ValueError("the rollout worker samples with per-prompt seeds only (dppo.rollout.prompt_seeds)")
        return self.result(self.submit(prompt_ids, prompt_mask, params, num_samples=num_samples, seeds=seeds),
                           prompt_ids.device)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker (after the requests already queued are answered or dropped) and reap it."""
        if self._proc is None:
            return
        try:
            _stop(self._proc, self._requests, timeout)
        finally:
            self._finalizer.detach()
            self._proc = None
            self._pending.clear()

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _send(self, msg: tuple, p: Pending) -> None:
        if self._proc is None:
            raise RolloutWorkerError("the rollout worker is closed")
        self._check_alive(p)
        self._pending.append(p)
        self._requests.put(msg)

    def _check_alive(self, p: Pending) -> None:
        if not self._proc.is_alive():
            code = self._proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RolloutWorkerError(f"the rollout worker process (pid {self._proc.pid}) died ({how}) while "
                                     f"{p.what}")

    def _wait(self, p: Pending, timeout: float | None = None) -> None:
        """Collect answers, oldest request first, until ``p`` has its own."""
        t0 = time.monotonic()
        while not p.done:
            try:
                kind, value, seconds = self._answers.get(timeout=1.0)
            except queue.Empty:
                self._check_alive(self._pending[0] if self._pending else p)
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise RolloutWorkerError(f"the rollout worker (pid {self._proc.pid}) did not answer within "
                                             f"{timeout:.0f} s while {p.what}") from None
                continue
            head = self._pending.popleft()
            if kind == "error":
                raise RolloutWorkerError(f"the rollout worker (pid {self._proc.pid}) failed while {head.what}:\n"
                                         f"{value}")
            head.done, head.value, head.seconds = True, value, seconds


_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def _stop(proc, requests, timeout: float) -> None:
    """Ask the worker to stop after its queued requests; SIGKILL it if it has not within ``timeout`` seconds (it
    ignores SIGTERM)."""
    if proc.is_alive():
        try:
            requests.put(("stop",))
        except (OSError, ValueError):  # the queue is gone (interpreter shutdown)
            pass
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _serve(spec: EngineSpec, requests, answers, parent: int) -> None:
    """The worker process: build the engine, then answer requests in order until "stop" or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles preemption and closes the worker
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the worker is a one-process engine, never a member of the trainer's torchrun job: an engine that reads
    # torchrun's variables (vLLM's distributed setup does) must not try to join the trainer's store or process group
    for var in _TORCHRUN_ENV:
        os.environ.pop(var, None)
    try:
        torch.set_num_threads(max(1, spec.threads))
        spec = _pin_gpu(spec)
        engine = _build(spec)
        answers.put(("ok", f"{spec.name} engine, {spec.dtype}, pid {os.getpid()}, {torch.get_num_threads()} threads",
                     0.0))
    except BaseException:  # noqa: BLE001 - reported to the trainer
        answers.put(("error", traceback.format_exc(), 0.0))
        return
    while True:
        try:
            msg = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the trainer is gone (killed): nobody will read what we sample
                return
            continue
        if msg[0] == "stop":
            break
        t0 = time.perf_counter()
        try:
            if msg[0] == "load":
                engine.load_weights(msg[1])
                answers.put(("ok", None, time.perf_counter() - t0))
            elif msg[0] == "generate":
                _, ids, mask, params, g, seeds = msg
                ro = engine.generate(ids.to(spec.device), mask.to(spec.device), params, num_samples=g, seeds=seeds)
                ro = Rollout(**{k: None if v is None else v.cpu() for k, v in vars(ro).items()})
                answers.put(("ok", ro, time.perf_counter() - t0))
            else:
                raise ValueError(f"unknown request {msg[0]!r}")
        except BaseException:  # noqa: BLE001 - reported to the trainer, which stops the run
            answers.put(("error", traceback.format_exc(), time.perf_counter() - t0))
    if hasattr(engine, "close"):
        engine.close()


def _pin_gpu(spec: EngineSpec) -> EngineSpec:
    """On ``cuda:N``, make GPU N the worker's only visible device (before CUDA starts in this fresh process) and
    build the engine on ``cuda:0``: vLLM's one-process executor takes device 0 of what it sees, so without this
    every torchrun process's worker would put its engine on the first GPU."""
    import dataclasses

    dev = torch.device(spec.device)
    if dev.type != "cuda" or dev.index is None:
        return spec
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(dev.index + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[dev.index]
    return dataclasses.replace(spec, device="cuda:0")


def _build(spec: EngineSpec) -> RolloutEngine:
    from dppo.engines import make_engine

    model = None
    if spec.name == "hf":
        from dppo.hf.model import load_model

        model, _ = load_model(spec.model_path, dtype="fp32", device=spec.device)
        model.eval()
    engine = make_engine(spec.name, model, spec.model_path, eos_token_id=spec.eos_token_id,
                         pad_token_id=spec.pad_token_id, dtype=spec.dtype, fp32_head=spec.fp32_head, own_copy=True,
                         batch_size=spec.batch_size, max_logprobs=spec.max_logprobs, seed=spec.seed, **spec.vllm)
    del model  # the engine keeps its own copy, overwritten by the first "load"
    return engine
