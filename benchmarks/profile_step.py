"""Where a training step's time goes: torch.profiler over a few steps of `dppo train`'s Trainer, with the training
path's speed options off ("before": the two-pass token_stats + policy_loss, every response with its own prompt) and
on ("after": the fused statistics + loss, each group's prompt run once), in the same process, alternating.

For each variant: the phase times the trainer records (rollout, train) and the operators with the most self CPU
time over the profiled steps, grouped into GEMMs, attention, elementwise/softmax, optimizer and the rest.

    .venv/bin/python benchmarks/profile_step.py                       # the default job
    .venv/bin/python benchmarks/profile_step.py -- --task addition-steps --task_digits 4 --vocab_pad 4096 \\
        --hidden 256 --layers 4 --heads 4 --warmup_steps 800 --warmup_noise 0 --warmup_seed 0 --prompts_per_step 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from dppo.run.cli import parse_config  # noqa: E402
from dppo.rundir.machine import machine_info, machine_line  # noqa: E402
from dppo.run.trainer import Trainer  # noqa: E402

VARIANTS = {"before": ["--no-fused_loss", "--no-share_prompts"], "after": []}
GROUPS = {  # operator name fragments → group (first match wins)
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "attention"),
    "optimizer": ("_foreach", "adam", "Optimizer"),
    "softmax / log-sum-exp / elementwise": ("softmax", "logsumexp", "exp", "log", "mul", "sub", "add", "div", "copy_",
                                            "where", "gather", "sum", "max", "to", "clamp", "neg", "pow", "rsqrt",
                                            "mean", "silu", "cat", "index", "fill", "zero"),
}


def group_of(name: str) -> str:
    for g, keys in GROUPS.items():
        if any(k.lower() in name.lower() for k in keys):
            return g
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/profile_step.json")
    ap.add_argument("train_args", nargs="*", help="`dppo train` flags after --")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    trainers = {}
    for name, flags in VARIANTS.items():
        out = tempfile.mkdtemp(prefix="dppo-prof-")
        cfg = parse_config([*a.train_args, *flags, "--out", out, "--no-progress", "--threads", str(a.threads),
                            "--steps", "1000"])
        trainers[name] = Trainer(cfg, log=lambda m: None)
    res = {"machine": machine_line(machine_info()), "command": "python benchmarks/profile_step.py " +
           " ".join(sys.argv[1:]), "variants": {}}
    step_no = {k: 0 for k in trainers}
    for name, tr in trainers.items():
        for _ in range(a.warm):
            tr.step(step_no[name])
            step_no[name] += 1
    acc = {k: {"ops": {}, "rollout": [], "train": [], "step": []} for k in trainers}
    for _ in range(a.rounds):
        for name, tr in trainers.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    rec = tr.step(step_no[name])
                    step_no[name] += 1
                    acc[name]["step"].append(time.perf_counter() - t0)
                    acc[name]["rollout"].append(rec["time/rollout"])
                    acc[name]["train"].append(rec["time/train"])
            for ev in prof.key_averages():
                if ev.self_cpu_time_total > 0:
                    acc[name]["ops"][ev.key] = acc[name]["ops"].get(ev.key, 0.0) + ev.self_cpu_time_total / 1e6
    for name, d in acc.items():
        total = sum(d["ops"].values())
        groups: dict[str, float] = {}
        for op, t in d["ops"].items():
            groups[group_of(op)] = groups.get(group_of(op), 0.0) + t
        top = sorted(d["ops"].items(), key=lambda kv: -kv[1])[:12]
        res["variants"][name] = dict(
            flags=VARIANTS[name], step_s=statistics.median(d["step"]), rollout_s=statistics.median(d["rollout"]),
            train_s=statistics.median(d["train"]), groups={g: t / total for g, t in sorted(groups.items())},
            top_ops=[(op, t / total) for op, t in top])
    b, f = res["variants"]["before"], res["variants"]["after"]
    res["after_over_before"] = dict(step=f["step_s"] / b["step_s"], train=f["train_s"] / b["train_s"])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "variants"}, indent=1))
    for name, v in res["variants"].items():
        print(f"\n{name} {v['flags']}: step {v['step_s']:.3f} s (rollout {v['rollout_s']:.3f}, train {v['train_s']:.3f})")
        print("  groups of self CPU time: " + ", ".join(f"{g} {x:.1%}" for g, x in v["groups"].items()))
        for op, x in v["top_ops"]:
            print(f"  {x:6.1%}  {op}")


if __name__ == "__main__":
    main()
