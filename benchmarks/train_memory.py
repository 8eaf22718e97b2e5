"""Memory of a training step with and without LoRA and gradient checkpointing (`dppo train` options).

Each option string runs in a fresh subprocess (with ``MALLOC_MMAP_THRESHOLD_=65536``, so that RSS follows the live
tensors; see CHILD_ENV): it builds the Trainer (policy, bf16 rollout engine, AdamW), resets the peak-RSS high-water
mark (VmHWM, through /proc/self/clear_refs), runs ``--steps`` RL steps, and reports the peak RSS above the RSS it
had before the first step. That delta holds what training adds: gradients, AdamW's two moments
(allocated at the first update), activations kept for the backward, and the rollout's KV cache. It also reports the
trained parameters, and counts from the tensors themselves the gradient and AdamW state bytes and what autograd keeps
for the backward of one mini-batch (saved_tensors_hooks).

The default job's model (0.74 M parameters) is too small for any of this to show, so the model is wider and deeper
(``--model-args``, default hidden 512, 8 layers: 25 M parameters) with a short warm-up (cached after the first run),
and the task has 4-digit operands so that responses are longer.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_memory.py          # ≈ 3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train_memory.json"
OPTIONS = ["", "--lora_rank 8", "--gradient_checkpointing", "--lora_rank 8 --gradient_checkpointing"]
MODEL_ARGS = "--hidden 512 --layers 8 --heads 8 --warmup_steps 40 --task_digits 4"
# Every allocation ≥ 64 KB gets its own mmap, returned to the OS when freed: RSS then follows the live tensors. With
# glibc's defaults freed heap memory stays resident, and the peak reflects the allocator's history (measured: LoRA's
# extra per-layer temporaries left +290 MB resident after one forward that kept 434 MB of activations).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _saved_for_backward_mb(t) -> float:
    """MB of tensors autograd keeps for the backward of one mini-batch's forward (the activations), counted through
    saved_tensors_hooks with each storage once; allocator-independent. Inside a checkpointed layer the checkpoint's
    own hooks take over, so what it recomputes instead of keeping is not counted, as it should not be."""
    import torch

    ro, *_ = t.rollout(0)
    idx = torch.arange(ro.response_ids.shape[0] // t.cfg.optim.minibatches)
    seen: dict[int, int] = {}

    def pack(x):
        if x.device.type == "cpu" and x.untyped_storage().nbytes():
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        st = t._stats(ro, idx, grad=True)
    params = {p.untyped_storage().data_ptr() for p in t.model.parameters()}
    del st
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20  # weights are not activations


def child(extra: str, steps: int, model_args: str) -> dict:
    import torch

    from dppo.run.cli import parse_config
    from dppo.run.trainer import Trainer
    from token_stats import _reset_peak, _status_kb  # sibling benchmark: the same VmHWM reader

    cfg = parse_config(["--out", "/tmp/dppo-bench-mem", "--steps", str(steps), "--no-progress", "--no-tensorboard",
                        "--no-plot", "--threads", "2", *shlex.split(model_args), *shlex.split(extra)])
    t = Trainer(cfg, log=lambda m: None)
    saved_mb = _saved_for_backward_mb(t)
    rss0 = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    tokens = 0.0
    for s in range(steps):
        tokens += t.step(s)["tokens"]
    peak = _status_kb("VmHWM")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in t.params if p.grad is not None)
    adam = sum(v.numel() * v.element_size() for st in t.optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))
    return dict(options=extra, params=sum(p.numel() for p in t.model.parameters()), trained=t.n_trainable,
                saved_for_backward_mb=saved_mb,
                rss_before_mb=rss0 / 1024, peak_delta_mb=(peak - rss0) / 1024, grad_mb=grads / 2**20,
                adam_mb=adam / 2**20, s_per_step_mmap_malloc=(time.perf_counter() - t0) / steps,
                tokens_per_step=tokens / steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model-args", default=MODEL_ARGS, help="`dppo train` options of the model and task")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child, a.steps, a.model_args)))
        return 0
    from dppo.rundir.machine import machine_info, machine_line

    from dppo.run.cli import parse_config
    from dppo.run.warmup import warm_start_for

    # the warm-up model first (cached), so that no child measures the warm-up's own allocations
    warm_start_for(parse_config(["--out", "/tmp/dppo-bench-mem", *shlex.split(a.model_args)]), log=lambda m: None)
    rows = []
    for extra in OPTIONS:
        cmd = [sys.executable, __file__, f"--child={extra}", f"--steps={a.steps}", f"--model-args={a.model_args}"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=CHILD_ENV)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    info = machine_info()
    print(f"\nMachine: {machine_line(info)}.  \nCommand: `OMP_NUM_THREADS=2 .venv/bin/python "
          f"benchmarks/train_memory.py` (model: `{a.model_args}`, {a.steps} steps per row)\n")
    print("| options | parameters trained | gradients | AdamW state | kept for backward (1 mini-batch) | "
          "peak RSS over the steps (Δ) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {('`' + r['options'] + '`') if r['options'] else '–'} | {r['trained'] / 1e6:.2f} M of "
              f"{r['params'] / 1e6:.2f} M | {r['grad_mb']:.0f} MB | {r['adam_mb']:.0f} MB | "
              f"{r['saved_for_backward_mb']:.0f} MB | +{r['peak_delta_mb']:.0f} MB |")
    if not a.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(dict(rows=rows, machine=info, model_args=a.model_args, steps=a.steps),
                                      indent=1) + "\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
