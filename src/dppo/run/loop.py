"""The run around the steps: start or resume, evaluate, checkpoint, log, stop cleanly, export.

* **Resume.** Starting again on a run directory with a checkpoint resumes from the newest readable one (a corrupt
  newest one falls back to the one before, :mod:`dppo.checkpoint`); ``metrics.jsonl`` is cut to that step.
  Resumed runs reproduce the uninterrupted run's metrics (tested).
* **Preemption.** SIGTERM or SIGINT (a scheduler's preemption notice, Ctrl-C) requests a stop: a step that has not
  made its first update yet is abandoned, one that has is finished; then a checkpoint is written, the logs are
  flushed and the run exits with status 75 and a line saying how to resume. A second signal stops at once.
* **Failures.** A NaN/inf loss or gradient stops the run and keeps the last good checkpoint; a checkpoint write that
  fails stops the run naming the path and the cause (the previous checkpoint stays usable); a reward function that
  fails stops it naming the prompt and response (or scores it 0 with ``--on_bad_reward zero``); a rollout engine
  that fails (vLLM's error, a dead worker process) stops it naming the engine and the step, the last checkpoint kept.
* **Several processes** (``torchrun``, :mod:`dppo.run.distributed`): every process runs this loop; rank 0 alone
  writes the configuration, metrics and final model, the checkpoints are sharded, and a stop request is agreed by
  all processes at each poll. A process that dies ends the others at their next collective (ProcessLost).
"""

from __future__ import annotations

import os
import signal
import sys

from dppo.checkpoint import latest_step
from dppo.rollout import RolloutEngineError
from dppo.run.config import (RESUME_MAY_CHANGE, ConfigError, TrainConfig, config_dict, load_config, rollout_lag,
                             save_config)
from dppo.run.distributed import setup
from dppo.run.evaluate import eval_summary
from dppo.run.trainer import NonFiniteError, StepAbandoned, Trainer
from dppo.run.validate import validate
from dppo.rundir import write_method_json
from dppo.rundir.machine import record_machine
from dppo.rundir.metrics_log import MetricsLog, read_metrics, summary_line

__all__ = ["train", "NonFiniteError", "Preempted"]


class Preempted(RuntimeError):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; rerunning the same command resumes it."""


class _StopRequest:
    """SIGTERM/SIGINT set a flag the loop polls; the second one restores the default handlers and re-raises."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no clean stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _check_resume(cfg: TrainConfig) -> None:
    """A run directory holding another run's checkpoint is an error, not a silent resume with new settings."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.isfile(path):
        return
    old_cfg = load_config(path)
    old, new = config_dict(old_cfg), config_dict(cfg)
    # --async_rollout k and --rollout_lag k compute the same run: a resume may switch between them
    same = RESUME_MAY_CHANGE | ({"rollout.lag", "rollout.async_rollout"} if rollout_lag(old_cfg) == rollout_lag(cfg)
                                else set())
    diff = [k for k in new if k not in same and old.get(k) != new[k]]
    if diff:
        lines = ", ".join(f"{k}: {old.get(k)!r} → {new[k]!r}" for k in diff)
        raise ConfigError(f"{cfg.out} holds a checkpoint of a run with other settings ({lines}); pass a new --out "
                          "directory, or the same settings to resume it")


class _NoLog:
    """Metrics of the processes other than rank 0: computed (they take part in the collectives), not written."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: TrainConfig, log=None) -> list[dict]:
    """Run (or resume) the training job of ``cfg``; returns the metric records written by this invocation. Under
    torchrun every process calls it (:mod:`dppo.run.distributed`)."""
    if log is None:
        def log(msg):
            print(msg, file=sys.stderr, flush=True)
    method = validate(cfg)
    with setup(cfg) as dist:  # [dist] torchrun's environment: a process group; otherwise one process
        return _train(cfg, method, log if dist.is_main else (lambda msg: None), dist)


def _train(cfg: TrainConfig, method, log, dist) -> list[dict]:
    resuming = latest_step(cfg.out) is not None
    if resuming:
        _check_resume(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with _StopRequest() as signals:
        stop = dist.agreed(signals)  # [dist] any process's SIGTERM stops all of them at the same step
        trainer = Trainer(cfg, log=log, should_stop=stop, dist=dist, method=method)
        start = 0
        if resuming:  # before anything is written: a checkpoint that cannot be loaded leaves the directory as it was
            state = dist.load(cfg.out, model=trainer.model, optimizer=trainer.optimizer,
                              scheduler=trainer.scheduler, map_location=cfg.device, log=log)
            start = int(state["step"])
            trainer.restore(state)
            log(f"resuming {cfg.out} from step {start}")
        machine = dist.describe()  # [dist] world size and every process's device
        mlog = _NoLog()
        if dist.is_main:
            save_config(cfg, os.path.join(cfg.out, "config.json"))
            write_method_json(cfg.out, trainer.method.to_dict())  # dppo.methods.method_from_dict reads it back
            record_machine(cfg.out, start, log, **machine)
            mlog = MetricsLog(cfg.out, resume_step=start if resuming else None, tensorboard=cfg.log.tensorboard,
                              report_to=cfg.log.report_to, config=config_dict(cfg), log=log)
        initial_eval = dist.broadcast(dist.is_main and not any(r.get("step") == 0 for r in read_metrics(mlog.path)))
        written: list[dict] = []
        try:
            written = _steps(cfg, trainer, mlog, start, stop, log, initial_eval=initial_eval,
                             show_bar=dist.is_main)
        finally:
            mlog.close()
            trainer.close()  # vLLM: its KV cache and process-wide state; --async_rollout: the worker process
    if start < cfg.steps:
        dist.save_final(trainer, os.path.join(cfg.out, "final"))  # [dist] gathered, written by rank 0
        summary = eval_summary(read_metrics(os.path.join(cfg.out, "metrics.jsonl")))
        if summary:
            log(summary)
    if cfg.log.plot and dist.is_main:
        try:
            from dppo.report.plot import plot_run

            log(f"curves: {plot_run(cfg.out)}")
        except ImportError:
            pass
    return written


def _steps(cfg: TrainConfig, trainer: Trainer, mlog: MetricsLog, start: int, stop: _StopRequest, log, *,
           initial_eval: bool, show_bar: bool = True) -> list[dict]:
    written: list[dict] = []
    if initial_eval:
        rec = {"step": 0, **trainer.evaluate(0)}
        mlog.write(rec)
        written.append(rec)
        log(f"step 0 (before RL): held-out accuracy {rec['eval/accuracy']:.3f}"
            + (f", greedy {rec['eval/greedy_accuracy']:.3f}" if "eval/greedy_accuracy" in rec else ""))
    bar = None
    if cfg.log.progress and start < cfg.steps and show_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="dppo", unit="step", dynamic_ncols=True)
    last_eval: dict = {}
    done = start
    for step in range(start, cfg.steps):
        try:
            rec = trainer.step(step)
        except StepAbandoned:
            break
        except NonFiniteError as e:
            kept = latest_step(cfg.out)
            raise NonFiniteError(
                f"{e}: stopping. The last good checkpoint (step {kept if kept is not None else 'none'}) is kept in "
                f"{cfg.out}/checkpoints; lower --lr, set --grad_clip, or pick a method with a trust region, then start "
                "again on the same --out to resume from it") from None
        except RolloutEngineError as e:
            kept = latest_step(cfg.out)
            raise type(e)(
                f"step {step + 1}: {e}\nStopping. The last checkpoint (step {kept if kept is not None else 'none'}) "
                f"is kept in {cfg.out}/checkpoints; run the same command again to resume from it (the batches in "
                "flight are sampled again from their seeds)") from None
        done = step + 1
        if done == cfg.steps or (cfg.eval.every and done % cfg.eval.every == 0):
            last_eval = trainer.evaluate(done)
            rec.update(last_eval)
        mlog.write(rec)
        written.append(rec)
        if done == cfg.steps or (cfg.log.ckpt_every and done % cfg.log.ckpt_every == 0):
            trainer.save(done)
        if bar is not None:
            bar.set_postfix({**summary_line({**last_eval, **rec})}, refresh=False)
            bar.update(1)
        if stop():
            break
    if bar is not None:
        bar.close()
    if stop() and done < cfg.steps:
        if latest_step(cfg.out) != done:
            trainer.save(done)
        name = signal.Signals(stop.signal).name
        raise Preempted(f"stopped by {name} after step {done} of {cfg.steps}: checkpoint of step {done} written to "
                        f"{cfg.out}/checkpoints and the logs flushed; run the same command again to resume")
    return written
