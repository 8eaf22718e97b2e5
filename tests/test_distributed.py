"""Training under torchrun: 2 processes on the CPU (gloo, FSDP2) give what one process gives, survive a killed
process, a SIGTERM and a change of the number of processes, and learn.

Tolerances ("fp32 reduction tolerance"): the sampled responses, rewards and every figure computed from them are
*identical* (each prompt samples from its own seed; the engines see bit-identical weights in these 3-step runs). The
loss, gradient norm and entropy agree to 1e-5 relative or 1e-7 absolute: they are fp32 sums of ~10²–10⁴ terms taken
in another order (two partial sums instead of one), whose rounding error is bounded by n·ε·Σ|term| ≈ 10²·6e-8·Σ|term|.
The loss needs the absolute bound: its terms have both signs (advantages have zero mean per group) and nearly cancel,
so its error scales with Σ|term| ≈ 0.1, not with the loss itself (measured: 3.7e-9 on a loss of 3e-4). Parameters
agree to 1e-5 absolute, 1 % of one AdamW step at lr 1e-3: AdamW divides each coordinate by its own running RMS, so a
coordinate whose gradient nearly cancels turns a rounding difference into a visible fraction of a step (measured up to
1.4e-6 here and 1.3e-6 over 8 more seeds of the default setting, 0 for most coordinates; the wrong reductions below
move them by ≥ 1.7e-4).
The negative controls show what a wrong reduction gives: FSDP's default averaging halves the gradient norm, and
each process's own mean averaged (plain data parallelism) moves the token-mean loss by tens of percent.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import dist_worker
from dppo.checkpoint import latest_step
from dppo.run.distributed import Local
from dppo.rundir.metrics_log import read_metrics

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
EXACT = ("reward", "reward_std", "accuracy", "groups_all_equal", "response_len", "truncated_frac", "adv_abs_mean",
         "tokens", "reward/bad", "lr", "step")
CLOSE = ("loss/loss", "loss/tokens", "grad_norm", "grad_norm_max", "entropy")


def _env():
    # CPU and gloo even on a machine with GPUs; one thread per process (2 processes on 2 cores)
    path = os.pathsep.join(filter(None, [DATA, HERE, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dppo_cache_dist"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Every setting of dist_worker.SETTINGS under torchrun (one launch) and in this process (the reference)."""
    tmp = tmp_path_factory.mktemp("dist")
    one = dist_worker.run_all(["default"], str(tmp / "one"), cache_dir, Local())  # fills the warm-up cache first
    t0 = time.time()
    r = subprocess.run(TORCHRUN + [os.path.join(HERE, "dist_worker.py"), str(tmp / "two.pt"), cache_dir],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    two = torch.load(tmp / "two.pt", weights_only=True)
    print(f"torchrun worker: {time.time() - t0:.1f}s")
    # "learns" needs no reference: it checks the 2-process reward curve alone
    one.update(dist_worker.run_all([n for n in dist_worker.SETTINGS if n not in ("default", "learns")],
                                   str(tmp / "one"), cache_dir, Local()))
    return one, two, tmp


def _differences(a: dict, b: dict) -> list[str]:
    """What differs between a one-process and a two-process run of a setting beyond the tolerances above."""
    out = []
    for i, (sa, sb) in enumerate(zip(a["steps"], b["steps"]), 1):
        if sa["texts"] != sb["texts"] or sa["rewards"] != sb["rewards"]:
            out.append(f"step {i}: sampled responses or rewards differ")
        ra, rb = sa["record"], sb["record"]
        assert ra.keys() == rb.keys()
        for k in ra:
            if k in EXACT and ra[k] != rb[k]:
                out.append(f"step {i}: {k} {ra[k]} != {rb[k]}")
            elif k in CLOSE and not math.isclose(ra[k], rb[k], rel_tol=1e-5, abs_tol=1e-7):
                out.append(f"step {i}: {k} {ra[k]} vs {rb[k]}")
            elif k.startswith(("loss/", "mismatch/")) and not math.isclose(ra[k], rb[k], rel_tol=1e-3, abs_tol=1e-7):
                out.append(f"step {i}: {k} {ra[k]} vs {rb[k]}")  # |π − μ| figures: bf16 rounding of the engine
        for n, p in sa["params"].items():
            d = float((p - sb["params"][n]).abs().max())
            if d > 1e-5:
                out.append(f"step {i}: parameter {n} differs by {d:.2e}")
    return out


@pytest.mark.parametrize("name", ["default", "uneven", "topk", "recompute", "lora", "async"])
def test_two_processes_give_the_one_process_run(runs, name):
    one, two, _ = runs
    a, b = one[name], two[name]
    assert len(a["steps"]) == len(b["steps"]) == dist_worker.SETTINGS[name][1]
    diffs = _differences(a, b)
    assert diffs == [], "\n".join(diffs)
    assert all(s["record"]["grad_norm"] > 0 for s in a["steps"]), "no update moved the policy: nothing was compared"
    assert len(a["steps"][0]["params"]) > 0
    assert a["reads"] == [1] and b["reads"] == [1, 0]  # rank 0 alone read the weights; rank 1 got its shards
    if name == "default":  # a bf16 engine: the sharded fp32 policy is cast before it is gathered (half the traffic)
        assert b["gathered"] == [["torch.bfloat16"]] * 2, b["gathered"]
    if name == "lora":
        assert b["peft"] and all(".lora_" in n for n in a["steps"][0]["params"])  # only the adapters train
    if name == "uneven":  # the processes hold different numbers of response tokens (the global denominator
        # matters) and responses of different widths (the gathered masks are padded)
        assert all(len(set(s["tokens_per_rank"])) > 1 for s in b["steps"]), [s["tokens_per_rank"] for s in b["steps"]]
        assert any(len(set(s["width_per_rank"])) > 1 for s in b["steps"]), [s["width_per_rank"] for s in b["steps"]]


@pytest.mark.parametrize("name, needle, ratio, rel", [("averaged", "grad_norm", 0.5, 1e-5),
                                                      ("naive_ddp", "loss/loss", None, None),
                                                      ("summed", "grad_norm", 2.0, 0.25)])
def test_a_wrong_reduction_is_caught(runs, name, needle, ratio, rel):
    """Negative controls run under torchrun, each against the one-process run: gradients averaged over the processes
    (FSDP's default) instead of the sum of partial losses over the whole batch's denominator; each process's own mean,
    averaged (plain DDP: wrong when the processes hold different numbers of tokens, as here under token-mean); and each
    process's own mean, summed (what gloo's AVG does, pytorch#162338). They sample the same responses and all fail the
    comparison the tests above pass. Averaging scales the gradient by exactly 1/2; summing per-process means by about 2
    (exactly 2 only when the processes hold equally many rows of each mini-batch)."""
    one, two, _ = runs
    diffs = _differences(one[name], two[name])
    assert any(needle in d for d in diffs), diffs
    if ratio is not None:
        got = two[name]["steps"][0]["record"]["grad_norm"] / one[name]["steps"][0]["record"]["grad_norm"]
        assert got == pytest.approx(ratio, rel=rel)


def test_bf16_gathered_weights_stay_close(runs):
    """--fsdp_param_dtype bf16: the forward/backward runs on bf16 copies of the fp32 master weights, so the loss and
    gradient norm move by bf16 rounding (≈ 1e-3 relative), not more; the responses of these steps are the same."""
    one, two, _ = runs
    for sa, sb in zip(one["bf16_params"]["steps"], two["bf16_params"]["steps"]):
        assert sa["texts"] == sb["texts"]
        ra, rb = sa["record"], sb["record"]
        assert rb["loss/loss"] != ra["loss/loss"]  # the option does something
        assert rb["loss/loss"] == pytest.approx(ra["loss/loss"], rel=2e-2)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-1)


def test_learns_under_torchrun(runs):
    """The reward any policy masters in a few steps (put '7' first) rises under 2 processes too."""
    _, two, _ = runs
    rewards = [s["record"]["reward"] for s in two["learns"]["steps"]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3 and last > 0.6, rewards


# ---------------------------------------------------------------------------------------------------------------
# an fp32 engine: over 12 steps a bf16 engine would round a parameter that differs in its last fp32 bit to a
# different bf16 value now and then, and a sample may flip (the 3-step comparisons above cover the bf16 default)
ARGS = dict(hidden=32, layers=1, heads=2, warmup_steps=20, warmup_batch=32, task_digits=2, eval_per_level=10,
            prompts_per_step=4, group_size=4, minibatches=2, steps=12, eval_every=4, eval_samples=1, ckpt_every=2,
            threads=1, lr=1e-3, reward="my_rewards:contains_answer", rollout_dtype="fp32")


def _cli(out, cache, **over):
    cmd = ["-m", "dppo", "train", "--out", str(out), "--cache_dir", str(cache), "--no-progress", "--no-plot",
           "--no-tensorboard"]
    for k, v in {**ARGS, **over}.items():
        cmd += [f"--{k}" if v is True else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    return cmd


def _train_here(out, cache, **over):
    """The same command in this process (one process, no torchrun)."""
    from dppo.run.cli import parse_config
    from dppo.run.loop import train

    return train(parse_config(_cli(out, cache, **over)[3:]), log=lambda m: None)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _wait_lines(path, n, proc, timeout=180, replaced=None):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        fresh = replaced is None or (os.path.exists(path) and os.stat(path).st_ino != replaced)
        if fresh and os.path.exists(path) and len(read_metrics(str(path))) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines (torchrun exited {proc.returncode})")


def _same(ref: list[dict], got: list[dict], steps) -> None:
    """The records of ``steps`` agree: sampled figures and evaluations exactly, sums to fp32 reduction tolerance."""
    by_step = {r["step"]: r for r in got}
    for ra in (r for r in ref if r["step"] in steps):
        rb = by_step[ra["step"]]
        for k, va in ra.items():
            if k in EXACT or k.startswith("eval/") and not k.startswith("time/"):
                assert rb[k] == va, (ra["step"], k)
            elif k in CLOSE:
                assert rb[k] == pytest.approx(va, rel=1e-5, abs=1e-7), (ra["step"], k)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_kill_sigterm_and_resume_across_process_counts(tmp_path, cache_dir, monkeypatch):
    """One run, four starts: 1 process to step 2 → torchrun (2 processes) resumes that checkpoint, one process is
    SIGKILLed → the job ends non-zero within a bounded time, with a message → torchrun resumes the sharded
    checkpoint and is stopped by SIGTERM → every process writes the same step → one process resumes the sharded
    checkpoint and finishes. Every step's metrics equal the uninterrupted one-process run's."""
    monkeypatch.syspath_prepend(DATA)
    ref = _train_here(tmp_path / "ref", cache_dir)
    run = tmp_path / "run"
    _train_here(run, cache_dir, steps=2)
    assert latest_step(str(run)) == 2

    # 2 processes resume the one-process checkpoint; kill one of them once step 5 is written (checkpoint: step 4)
    p = subprocess.Popen(TORCHRUN + _cli(run, cache_dir), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_lines(run / "metrics.jsonl", 6, p)
    workers = _children(p.pid)
    assert len(workers) == 2, workers
    t0 = time.time()
    os.kill(workers[-1], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    took = time.time() - t0
    assert p.returncode != 0 and took < 60, (p.returncode, took)
    assert "lost contact with the others" in err and "run the same command again" in err, err[-3000:]
    killed_at = latest_step(str(run))
    assert 4 <= killed_at <= 6

    # 2 processes resume the sharded checkpoint; SIGTERM to torchrun: all processes checkpoint the same step
    old = os.stat(run / "metrics.jsonl").st_ino  # the resumed run replaces the file (cut at its checkpoint)
    p = subprocess.Popen(TORCHRUN + _cli(run, cache_dir), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_lines(run / "metrics.jsonl", killed_at + 2, p, replaced=old)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    stopped = len(read_metrics(str(run / "metrics.jsonl"))) - 1
    assert p.returncode != 0
    assert err.count(f"stopped by SIGTERM after step {stopped} of 12") == 2, err[-3000:]  # both processes
    assert latest_step(str(run)) == stopped < 12
    meta = json.loads((run / "checkpoints" / f"step-{stopped:08d}" / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2

    # one process resumes the 2-process checkpoint and finishes
    _train_here(run, cache_dir)
    got = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(13)), "a metric line was lost or duplicated"
    _same(ref, got, range(1, 13))
    starts = [json.loads(x) for x in (run / "machine.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["world_size"]) for s in starts] == [(0, 1), (2, 2), (killed_at, 2), (stopped, 1)]
    assert [r["device"] for r in starts[1]["ranks"]] == ["cpu", "cpu"] and starts[1]["backend"] == "gloo"
    assert os.path.isfile(run / "final" / "config.json")


def test_sharded_checkpoint_and_final_model(runs, tmp_path, cache_dir):
    """The LoRA run's sharded checkpoint (2 processes) loads into one process bit for bit, and RUN/final (gathered
    to rank 0: the adapter, and the merged weights W + (α/r)·B·A as a plain transformers model) equals the one-process
    export to the parameter tolerance."""
    from transformers import AutoModelForCausalLM

    from dppo.checkpoint.sharded import load_dcp
    from dppo.run.trainer import Trainer

    one, two, tmp = runs
    t = Trainer(dist_worker.config("lora", str(tmp_path / "fresh"), cache_dir), log=lambda m: None)
    ckpt = tmp / "runs" / "lora" / "checkpoints" / "step-00000003"
    assert json.loads((ckpt / "meta.json").read_text())["format"] == "dcp"
    load_dcp(str(ckpt), t.model, t.optimizer)
    mine = dict(t.model.named_parameters())
    for n, p in two["lora"]["steps"][-1]["params"].items():
        assert torch.equal(mine[n].detach(), p), n
    assert len(t.optimizer.state) == len(two["lora"]["steps"][-1]["params"])  # AdamW moments restored too
    a = AutoModelForCausalLM.from_pretrained(tmp / "one" / "lora" / "final", local_files_only=True)
    b = AutoModelForCausalLM.from_pretrained(tmp / "runs" / "lora" / "final", local_files_only=True)
    assert os.path.isfile(tmp / "runs" / "lora" / "final_adapter" / "adapter_config.json")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(t.model_path, local_files_only=True)
    moved = max(float((pa - pb).detach().abs().max()) for pa, pb in zip(a.parameters(), base.parameters()))
    assert moved > 1e-4  # the export holds the trained adapters merged, not the base model


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_sharded_checkpoint_tampered_or_corrupt(runs, tmp_path, cache_dir):
    """DCP unpickles its index: here a tampered index is refused before it can run code, and a truncated shard makes
    the one-process loader fall back to the checkpoint before it (set aside as ….corrupt), as for state.pt."""
    import pickle
    import shutil

    from dppo.checkpoint import CheckpointLoadError, UnsafeCheckpointError, load_latest
    from dppo.checkpoint.sharded import load_dcp
    from dppo.run.trainer import Trainer

    _, two, tmp = runs
    good = tmp / "runs" / "lora" / "checkpoints" / "step-00000003"
    t = Trainer(dist_worker.config("lora", str(tmp_path / "fresh"), cache_dir), log=lambda m: None)

    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"
    (evil / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_dcp(str(evil), t.model, t.optimizer)
    assert not marker.exists()

    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(good, run / "step-00000002")
    shutil.copytree(good, run / "step-00000003")
    shard = run / "step-00000003" / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(CheckpointLoadError, match="unreadable"):
        load_dcp(str(run / "step-00000003"), t.model, t.optimizer)
    logged = []
    state = load_latest(str(tmp_path / "run"), model=t.model, optimizer=t.optimizer, scheduler=t.scheduler,
                        log=logged.append)
    assert state["step"] == 3  # the directory of "step 2" is a copy of the step-3 checkpoint
    assert (run / "step-00000003.corrupt").is_dir()
    assert any("falling back to the checkpoint of step 2" in m for m in logged), logged
    mine = dict(t.model.named_parameters())
    for n, p in two["lora"]["steps"][-1]["params"].items():
        assert torch.equal(mine[n].detach(), p), n


@pytest.mark.parametrize("kw, needle", [(dict(prompts_per_step=5), "--prompts_per_step 5 does not split over 2"),
                                        (dict(device="cuda:1"), "pass --device cuda"),
                                        (dict(device="mps"), "cpu \\(gloo\\) or cuda")])
def test_torchrun_configuration_errors(monkeypatch, tmp_path, kw, needle):
    """Checked before any process group or model exists (each process raises the same ConfigError: status 2)."""
    from dppo.run.config import ConfigError, make_config
    from dppo.run.distributed import Distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=needle):
        Distributed(make_config(out=str(tmp_path), **kw))


def test_long_phases_have_their_own_timeout(tmp_path):
    """--dist_timeout 1 s bounds a collective; a process generating for 3 s is waited for at the end of its phase
    (--dist_phase_timeout 6 s) and the job goes on; rank 0 exporting the final model for longer than 6 s stops the
    other process with dppo's message naming it, the phase and how to resume, and a non-zero exit, within ~6 s."""
    p = subprocess.run(TORCHRUN + [os.path.join(HERE, "dist_phases.py"), str(tmp_path), "1", "6", "3"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert "rank 0: rollout and train done" in p.stderr and "rank 1: rollout and train done" in p.stderr, p.stderr
    took = re.search(r"rank 1: stopped after ([\d.]+) s of the final export", p.stderr)
    assert p.returncode != 0 and took and 5.5 < float(took.group(1)) < 30, (p.returncode, p.stderr[-3000:])
    assert re.search(r"dppo train: process 1 of 2 lost contact with the others during final export \(.*"
                     r"monitoredBarrier.*--dist_phase_timeout 6 s.*run the same command again to resume", p.stderr), \
        p.stderr[-3000:]


def test_watchdog_reports_the_phase_and_step():
    """The CUDA watchdog (a blocked NCCL collective never raises): after --dist_timeout without progress it reports
    the process, the phase and the step; a beat in time keeps it quiet."""
    from types import SimpleNamespace

    from dppo.run.distributed import Distributed, _Watchdog

    d = SimpleNamespace(rank=1, world=2, phase="train", step=6, _deadline=time.monotonic() + 0.3,
                        cfg=SimpleNamespace(dist_timeout=0.3, dist_phase_timeout=60.0, out="runs/x"))
    d.lost_message = lambda cause: Distributed.lost_message(d, cause)
    fired: list[str] = []
    w = _Watchdog(d, poll_s=0.02, on_fire=fired.append)
    for _ in range(5):  # progress every 0.1 s: no report
        time.sleep(0.1)
        d._deadline = time.monotonic() + 0.3
    assert fired == []
    time.sleep(0.6)
    w.stop()
    assert len(fired) == 1 and fired[0].startswith("process 1 of 2 lost contact with the others during train of "
                                                   "step 7 (no progress for 0.3 s"), fired


def test_skeleton_holds_no_weights_and_takes_them_whole(tmp_path):
    """What a process other than rank 0 builds: every parameter on the meta device (tied ones still one), the
    buffers and generation config as from_pretrained gives them; given storage and rank 0's state dict, the same
    function as the loaded model."""
    from dppo.hf.model import build_char_tokenizer, build_tiny_model, load_model, load_skeleton, materialize

    tok = build_char_tokenizer("0123456789+=")
    build_tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    a, _ = load_model(str(tmp_path))
    b, tok_b = load_skeleton(str(tmp_path))
    assert all(p.is_meta for p in b.parameters()) and b.lm_head.weight is b.model.embed_tokens.weight
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for (n, x), (m, y) in zip(a.named_buffers(), b.named_buffers()):
        assert n == m and torch.equal(x, y), n
    assert b.generation_config.eos_token_id == a.generation_config.eos_token_id and tok_b.padding_side == "left"
    materialize(b, "cpu").load_state_dict(a.state_dict())
    ids = torch.tensor([[1, 5, 6, 14, 7]])
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
