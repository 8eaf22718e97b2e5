"""`dppo train` with 1 process and under torchrun with 2, HF and vLLM engines, on a 47 M-parameter model built from a
config (no download): peak CPU RSS per process and time per step, for this checkout's code ("after") and for an
earlier commit's ("before": every process loads the whole fp32 model; by default the merge-base with main).

    python benchmarks/vllm_torchrun.py                          # CPU, gloo: the figures of docs/distributed.md
    python benchmarks/vllm_torchrun.py --before 0123abc --steps 6
    python benchmarks/vllm_torchrun.py --runs after:vllm:2,after:vllm-lora:2

Each run is `dppo train --model DIR` (2 processes: `torchrun --standalone --nproc_per_node 2`), one torch thread per
process, started through benchmarks/_peak_rss.py, which writes each process's peak resident set (VmHWM of
/proc/self/status, the whole run: load, engine start-up, rollouts, training, final export) when it exits. Times are
medians over the steps after the first (`time/step`, `time/rollout`, `time/sync`, `time/train` of metrics.jsonl);
the 1-minute load average before and after each run is recorded (other jobs on the machine slow both alike).
The "before" code is `git archive`d into a temporary directory and put first on PYTHONPATH. Writes
benchmarks/results/vllm_torchrun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNS = ("before:hf:1,before:hf:2,after:hf:1,after:hf:2,before:vllm:1,before:vllm:2,after:vllm:1,after:vllm:2,"
        "after:vllm-lora:2")


def build_model(path: str, hidden: int, layers: int, vocab: int) -> int:
    """A Qwen3 of hidden × layers, MLP 4·hidden, 32-dim heads (2 KV heads), tied embeddings, saved with a char
    tokenizer padded to ``vocab`` ids; returns the parameter count."""
    import torch

    from dppo.hf.model import build_char_tokenizer, build_tiny_model

    torch.manual_seed(0)
    tok = build_char_tokenizer("0123456789+= ", vocab_size=vocab)
    model = build_tiny_model(len(tok), hidden_size=hidden, num_layers=layers, num_heads=hidden // 32,
                             max_positions=256)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def git_src(rev: str, dest: str) -> str:
    """``src/`` of commit ``rev`` in ``dest``; returns the full commit id."""
    full = subprocess.run(["git", "-C", REPO, "rev-parse", rev], capture_output=True, text=True, check=True)
    tar = subprocess.run(["git", "-C", REPO, "archive", full.stdout.strip(), "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=tar.stdout, check=True)
    return full.stdout.strip()


def one_run(code: str, engine: str, nproc: int, src: str, model: str, out: str, steps: int) -> dict:
    rss_dir = os.path.join(out, "rss")
    os.makedirs(rss_dir)
    args = ["--model", model, "--out", os.path.join(out, "run"), "--steps", str(steps), "--prompts_per_step", "8",
            "--group_size", "4", "--minibatches", "2", "--eval_every", "0", "--eval_max_problems", "8",
            "--eval_samples", "1", "--ckpt_every", "0", "--threads", "1", "--no-progress", "--no-plot",
            "--no-tensorboard", "--rollout_dtype", "bf16"]
    if engine.startswith("vllm"):
        args += ["--engine", "vllm", "--vllm_enforce_eager", "--vllm_max_model_len", "64"]
    if engine.endswith("lora"):
        args += ["--lora_rank", "8", "--lr", "1e-4"]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                 if nproc > 1 else [])
    cmd = launch + [os.path.join(HERE, "_peak_rss.py"), "train", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DPPO_PEAK_RSS_DIR": rss_dir}
    t0, load0 = time.time(), os.getloadavg()[0]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, load1 = time.time() - t0, os.getloadavg()[0]
    rows = []
    mpath = os.path.join(out, "run", "metrics.jsonl")
    if os.path.exists(mpath):
        from dppo.rundir.metrics_log import read_metrics

        rows = [x for x in read_metrics(mpath) if "time/step" in x][1:]  # the first step compiles and warms caches
    rss = {}
    for f in sorted(os.listdir(rss_dir)):
        with open(os.path.join(rss_dir, f)) as fh:
            d = json.load(fh)
        rss[f"rank{d['rank']}"] = round(d["peak_rss_gb"], 3)

    def med(k):
        vals = [x[k] for x in rows if k in x]
        return round(statistics.median(vals), 3) if vals else None

    res = {"code": code, "engine": engine, "processes": nproc, "exit_code": r.returncode, "wall_s": round(wall, 1),
           "peak_rss_gb": rss, "median_s": {k: med(f"time/{k}") for k in ("step", "rollout", "sync", "train")},
           "final_exported": os.path.isfile(os.path.join(out, "run", "final", "config.json")),
           "load_average_1min": [round(load0, 2), round(load1, 2)]}
    if r.returncode:
        res["error"] = [line for line in r.stderr.splitlines() if "Error" in line][-3:]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="", help="commit of the 'before' code (default: git merge-base HEAD main)")
    p.add_argument("--runs", default=RUNS, help="comma list of code:engine:processes (code before|after, engine "
                   "hf|vllm|vllm-lora)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=os.path.join(HERE, "results", "vllm_torchrun.json"))
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "src"))
    from dppo.rundir.machine import machine_info, machine_line

    tmp = tempfile.mkdtemp(prefix="dppo-vllm-torchrun-")
    model = os.path.join(tmp, "model")
    n_params = build_model(model, a.hidden, a.layers, a.vocab)
    before = a.before or subprocess.run(["git", "-C", REPO, "merge-base", "HEAD", "main"], capture_output=True,
                                        text=True, check=True).stdout.strip()
    src = {"after": os.path.join(REPO, "src")}
    os.makedirs(os.path.join(tmp, "before"))
    commits = {"before": git_src(before, os.path.join(tmp, "before")),
               "after": subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                                       check=True).stdout.strip()}
    src["before"] = os.path.join(tmp, "before", "src")
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "src"], capture_output=True, text=True,
                           check=True).stdout.strip()
    if dirty:
        commits["after"] += " + uncommitted changes in src/"
    results = []
    for i, spec in enumerate(a.runs.split(",")):
        code, engine, nproc = spec.split(":")
        res = one_run(code, engine, int(nproc), src[code], model, os.path.join(tmp, f"run{i}"), a.steps)
        print(json.dumps(res), flush=True)
        results.append(res)
    out = {"command": "python benchmarks/vllm_torchrun.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_line(machine_info()), "model": {"parameters": n_params, "hidden": a.hidden,
           "layers": a.layers, "vocab": a.vocab, "tied": True}, "steps": a.steps, "commits": commits,
           "job": "8 prompts x 4 responses per step, 2 mini-batches, bf16 rollout, fp32 training, 1 thread/process",
           "runs": results}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
