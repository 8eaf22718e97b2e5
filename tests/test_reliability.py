"""Nothing is lost when things go wrong: tampered and corrupt checkpoints, checkpoint writes that fail, torn metric
logs and reward functions that fail. Each test asserts on the files left behind, not only on the error. (SIGKILL and
SIGTERM mid-run: test_trainer_resume.py.)"""

from __future__ import annotations

import errno
import os
import pickle
import re

import pytest
import torch

from dppo.checkpoint import (CheckpointLoadError, CheckpointWriteError, UnsafeCheckpointError, latest_step,
                             list_checkpoints)
from dppo.rundir.metrics_log import read_metrics
from metrics_check import TIMING
from test_trainer import tiny_cfg

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dppo_cache_rel"))


def _run(out, cache_dir, log=None, **kw):
    from dppo.run.loop import train

    base = dict(eval_every=0, plot=False, ckpt_every=2, tensorboard=False)
    return train(tiny_cfg(out, cache_dir, **{**base, **kw}), log=log or (lambda m: None))


def _snapshot(run_dir) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(run_dir):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, run_dir)] = fh.read()
    return out


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith(TIMING) and isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9), (ra["step"], k)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-4"])
def test_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path, cache_dir, how):
    """A state.pt replaced by a pickle that would run a shell command when unpickled (as torch.save writes it, or as
    a plain pickle): refused with an error naming the file, the payload never runs, the directory is unchanged."""
    out = tmp_path / "run"
    _run(out, cache_dir, steps=2)
    (step, d), = [c for c in list_checkpoints(str(out)) if c[0] == 2]
    marker = tmp_path / "pwned"
    path = os.path.join(d, "state.pt")
    evil = {"step": 2, "model": _Evil(marker)}
    if how == "torch.save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=int(how[-1]))
    before = _snapshot(out)
    # protocols that name os.system are recognised as unsafe; pickle-4's framing fails to parse before that
    err = UnsafeCheckpointError if how != "pickle-4" else CheckpointLoadError
    with pytest.raises(err, match=re.escape(path)):
        _run(out, cache_dir, steps=4)
    assert not marker.exists()  # the payload never ran
    assert _snapshot(out) == before  # and the run directory is exactly as it was
    pickle.loads(pickle.dumps(_Evil(marker)))  # the payload is live: loaded without weights_only it runs
    assert marker.exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, cache_dir):
    ref, out = tmp_path / "ref", tmp_path / "run"
    _run(ref, cache_dir, steps=6)
    _run(out, cache_dir, steps=4)  # checkpoints of steps 2 and 4 (the newest two)
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    newest = os.path.join(list_checkpoints(str(out))[-1][1], "state.pt")
    with open(newest, "r+b") as f:  # truncated, as by a disk that filled up under a foreign writer
        f.truncate(os.path.getsize(newest) // 3)
    logged = []
    _run(out, cache_dir, steps=6, log=logged.append)
    text = "\n".join(logged)
    assert "checkpoint of step 4 is corrupt" in text and "falling back to the checkpoint of step 2" in text
    assert os.path.isdir(os.path.join(str(out), "checkpoints", "step-00000004.corrupt"))  # set aside, not deleted
    _same_metrics(read_metrics(str(ref / "metrics.jsonl")), read_metrics(str(out / "metrics.jsonl")))


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, cache_dir):
    out = tmp_path / "run"
    _run(out, cache_dir, steps=1, ckpt_every=0)
    (_, d), = list_checkpoints(str(out))
    with open(os.path.join(d, "state.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    before = _snapshot(out)
    with pytest.raises(CheckpointLoadError, match=r"no checkpoint .* could be read: .*state\.pt is unreadable"):
        _run(out, cache_dir, steps=2, ckpt_every=0)
    assert _snapshot(out) == before


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, cache_dir, monkeypatch, err):
    import dppo.checkpoint.store as ck

    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4; step 2's went through
            real_save(obj, f, *a, **k)  # half a file is on disk when the error comes
            raise OSError(err, os.strerror(err))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=re.escape(os.strerror(err)) + r".*step-00000002\) is intact"):
        _run(out, cache_dir, steps=6)
    assert latest_step(str(out)) == 2 and not [n for n in os.listdir(out / "checkpoints") if ".tmp" in n]
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))][-1] == 4
    monkeypatch.setattr(ck.torch, "save", real_save)
    _run(out, cache_dir, steps=6)  # the run directory is usable: it resumes from step 2
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(7))


def test_torn_metrics_line_is_repaired_once(tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref, out = tmp_path / "ref", tmp_path / "run"
    _run(ref, cache_dir, steps=4, tensorboard=True)
    _run(out, cache_dir, steps=3, tensorboard=True)
    # as if killed in step 4 after the checkpoint of step 2: step 3's checkpoint gone, a record half-written
    for s, d in list_checkpoints(str(out)):
        if s == 3:
            import shutil

            shutil.rmtree(d)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward": 0.2')
    logged = []
    _run(out, cache_dir, steps=4, tensorboard=True, log=logged.append)
    text = "\n".join(logged)
    assert "dropped an incomplete line" in text and "dropped 1 record(s) past the checkpoint's step 2" in text
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # nothing lost, nothing doubled
    _same_metrics(read_metrics(str(ref / "metrics.jsonl")), rows)
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("reward")]
    assert steps == [1, 2, 3, 4]  # TensorBoard dropped the first attempt's step-3 event (purge_step)
    want = {r["step"]: r["reward"] for r in rows if "reward" in r}
    assert all(e.value == pytest.approx(want[e.step]) for e in acc.Scalars("reward"))


@pytest.mark.parametrize("fn, needle", [
    ("nan_on_seven", "returned nan"),
    ("raises_on_seven", "ZeroDivisionError: the grader divided by zero"),
    ("string_on_seven", "returned 'correct' (str), not a real number"),
])
def test_bad_reward_stops_naming_the_response(tmp_path, cache_dir, monkeypatch, fn, needle):
    from dppo.tasks.scoring import RewardError

    monkeypatch.syspath_prepend(DATA)
    out = tmp_path / "run"
    with pytest.raises(RewardError, match=r"response \d+ \(prompt \d+: '.*'; response: '.*7.*'\): .*" + re.escape(needle)):
        _run(out, cache_dir, steps=3, reward=f"my_rewards:{fn}")
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert all(r.get("reward") is None or r["reward"] == r["reward"] for r in rows)  # no NaN was ever logged
    rows = _run(tmp_path / "zero", cache_dir, steps=3, reward=f"my_rewards:{fn}", on_bad_reward="zero")
    bad = [r["reward/bad"] for r in rows if "reward/bad" in r]
    assert len(bad) == 3 and sum(bad) > 0 and all(r["reward"] == 0.0 for r in rows if "reward" in r)


def test_scoring_accepts_numbers_and_rejects_the_rest():
    from dppo.tasks.base import Example, Task
    from dppo.tasks.scoring import RewardError, score

    class T(Task):
        def __init__(self, values):
            self.values = values

        def reward(self, ex, resp):
            return self.values[int(resp)]

    ex = [Example("p", "a")] * 4
    r, bad = score(T([1, True, torch.tensor(0.5), 2.0]), ex, ["0", "1", "2", "3"])
    assert r.tolist() == [1.0, 1.0, 0.5, 2.0] and bad == 0
    for v in (None, float("inf"), torch.ones(2), "1"):
        with pytest.raises(RewardError):
            score(T([v]), ex[:1], ["0"])
    r, bad = score(T([float("-inf")]), ex[:1], ["0"], on_bad="zero")
    assert r.tolist() == [0.0] and bad == 1


def test_engine_failure_mid_rollout_keeps_the_last_checkpoint(tmp_path, cache_dir, monkeypatch):
    """The engine raises while sampling step 3 (an injected fault; vLLM's real one under torchrun:
    test_vllm_distributed.py): the run stops with RolloutEngineError naming the engine and the step, the checkpoint
    of step 2 stays, and the same command resumes from it to the end."""
    from dppo.engines.hf import HFEngine
    from dppo.rollout import RolloutEngineError

    real, calls = HFEngine.generate, []

    def failing(self, *a, **k):
        calls.append(k["num_samples"])  # the evaluation samples 1 per problem, a training rollout 4 per prompt
        if calls.count(4) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, *a, **k)

    monkeypatch.setattr(HFEngine, "generate", failing)
    out = tmp_path / "run"
    with pytest.raises(RolloutEngineError, match=r"step 3: the hf rollout engine failed while sampling step 3's "
                       r"batch: RuntimeError: CUDA error: .*\nStopping\. The last checkpoint \(step 2\) is kept"):
        _run(out, cache_dir, steps=4)
    assert latest_step(str(out)) == 2 and [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [0, 1, 2]
    monkeypatch.setattr(HFEngine, "generate", real)
    rows = _run(out, cache_dir, steps=4)
    assert [r["step"] for r in rows] == [3, 4] and latest_step(str(out)) == 4
