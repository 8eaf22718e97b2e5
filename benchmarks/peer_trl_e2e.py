"""End-to-end half of benchmarks/peer_trl.py: ``dppo train`` vs ``trl.GRPOTrainer`` on the same job.

Two jobs (``--job``): ``toy``, the default job (0.74 M parameters, a 16-token vocabulary, 4-token answers); and
``long``, a 5 M-parameter Qwen3 (hidden 256, 4 layers) with a vocabulary padded to 4,096 ids and the addition-steps
task at 4 digits (long addition written out: ~35-token responses), 16 prompts × 8 per step.

Matched: the model (dppo's cached SFT warm-up directory of the job, loaded by both), the task (the dppo run's task
and digits, its exact reward), prompts per step, group size (8), generation length (the task's hint),
sampling (T = 1, no top-k/top-p, fp32 rollout on both sides: TRL's HF generate has no bf16 engine), one optimizer
step per rollout batch, AdamW lr 2e-4 (long job: 2e-5; β 0.9/0.999, wd 0), grad-norm clip 1.0, constant lr, no KL
term, advantages R − mean(group) without std scaling, and the loss: dppo ``grpo`` (ε 0.2, seq-mean-token-sum-norm)
= TRL ``dr_grpo`` (ε 0.2, ÷ B·max_completion_length) — the gradient-identical pair of the loss-agreement table.
Each side runs in its own process with one torch thread; peak RSS is that process's ``ru_maxrss``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
G, LR = 8, 2e-4
# `dppo train` options of each job beyond the matched ones; prompts per step P.
JOBS = {
    "toy": dict(P=32, lr=LR, args=[]),
    # one warm-up model for every seed (--warmup_seed 0): the seeds vary the RL run, not the starting policy
    # lr 2e-5: at the toy job's 2e-4 both trainers lost the warm-up's reward within 20 steps (0.19 → 0.02 / 0.06)
    "long": dict(P=16, lr=2e-5, args=["--task", "addition-steps", "--task_digits", "4", "--vocab_pad", "4096",
                                      "--hidden", "256", "--layers", "4", "--heads", "4", "--warmup_steps", "800",
                                      "--warmup_noise", "0.0", "--warmup_seed", "0", "--eval_per_level", "20"]),
}


def _child_dppo(out: str, steps: int, seed: int, job: str = "toy") -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    from dppo.__main__ import main

    t0 = time.perf_counter()
    rc = main(["train", "--out", out, "--steps", str(steps), "--seed", str(seed), "--method", "grpo",
               "--prompts_per_step", str(JOBS[job]["P"]), "--group_size", str(G), "--minibatches", "1", "--lr",
               str(JOBS[job]["lr"]), "--rollout_dtype", "fp32", "--threads", "1", "--eval_every", "0", "--no-progress",
               "--no-tensorboard", "--no-plot", "--ckpt_every", "0", *JOBS[job]["args"]])
    wall = time.perf_counter() - t0
    recs = [json.loads(l) for l in Path(out, "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps_ = [r for r in recs if "reward" in r]
    cfg = json.loads(Path(out, "config.json").read_text())
    return dict(rc=rc, wall_s=wall, step_times=[r["time/step"] for r in steps_], rewards=[r["reward"] for r in steps_],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, config=cfg)


def _child_trl(out: str, steps: int, seed: int, model_dir: str, digits: int, task_name: str = "arithmetic",
               prompts: int = 32, eval_per_level: int = 100, lr: float = LR) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dppo.tasks import Example, make_task

    P = prompts
    task = make_task(task_name, digits=digits, eval_per_level=eval_per_level)  # the dppo run's task: same prompts
    rows = [dict(prompt=e.prompt, answer=e.answer) for s in range(steps) for e in task.train_examples(s, P, seed)]
    ds = Dataset.from_list(rows)

    def reward(completions, prompts, answer, **_):  # the task's own reward, as dppo scores it
        return [float(task.reward(Example(p, a), c)) for c, p, a in zip(completions, prompts, answer)]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=out, use_cpu=True, seed=seed, per_device_train_batch_size=P * G, num_generations=G,
        max_completion_length=task.max_new_tokens_hint, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=0.0,
        loss_type="dr_grpo", epsilon=0.2, scale_rewards="none", temperature=1.0, top_k=0, top_p=1.0,
        logging_steps=1, report_to=[], save_strategy="no", bf16=False, disable_dropout=True,
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return dict(rc=0, wall_s=wall, step_times=times, rewards=rewards,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _spawn(kind: str, out: str, steps: int, seed: int, model_dir: str = "", digits: int = 0, job: str = "toy",
           task_name: str = "arithmetic", eval_per_level: int = 100) -> dict:
    extra = (f",{model_dir!r},{digits},{task_name!r},{JOBS[job]['P']},{eval_per_level},{JOBS[job]['lr']!r}"
             if kind == "trl"
             else f",{job!r}")
    code = (f"import json,sys; sys.path.insert(0,{str(ROOT / 'src')!r}); sys.path.insert(0,{str(ROOT / 'benchmarks')!r});"
            f"import peer_trl_e2e as m; r=m._child_{kind}({out!r},{steps},{seed}{extra}); print('RESULT'+json.dumps(r))")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    if p.returncode or not line:
        raise RuntimeError(f"{kind} run failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[-1][6:])


def _one_seed(steps: int, seed: int, tmp: str, job: str = "toy") -> dict:
    d = _spawn("dppo", os.path.join(tmp, f"dppo{job}{seed}"), steps, seed, job=job)
    from dppo.run.config import config_dict, load_config
    from dppo.run.warmup import warm_start_for

    cfg = load_config(os.path.join(tmp, f"dppo{job}{seed}", "config.json"))
    model_dir = cfg.model.path or warm_start_for(cfg, log=lambda *a: None)  # the warm-up directory the run used
    c = config_dict(cfg)
    digits, task_name = int(c["task.digits"]), c["task.name"]
    t = _spawn("trl", os.path.join(tmp, f"trl{job}{seed}"), steps, seed, model_dir, digits, job=job, task_name=task_name,
               eval_per_level=int(c["task.eval_per_level"]))
    k = max(1, steps // 4)

    def med(x):  # median step time, first step (warm-up of lazy init) excluded
        return statistics.median(x[1:] if len(x) > 1 else x)

    def side(r):
        return dict(median_step_s=med(r["step_times"]), wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
                    reward_first_mean=statistics.mean(r["rewards"][:k]),
                    reward_last_mean=statistics.mean(r["rewards"][-k:]), rewards=r["rewards"])

    res = dict(seed=seed, job=job, task=task_name, task_digits=digits, model_dir=model_dir, dppo=side(d), trl=side(t))
    res["ratio_step_time_dppo_over_trl"] = res["dppo"]["median_step_s"] / res["trl"]["median_step_s"]
    res["ratio_peak_rss_dppo_over_trl"] = res["dppo"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"]
    return res


def run_e2e(steps: int = 50, seeds: tuple[int, ...] = (0, 1, 2), job: str = "toy") -> dict:
    """Both trainers, seed by seed (dppo then TRL, never concurrently); ratios are per seed, then summarised."""
    tmp = tempfile.mkdtemp(prefix="peer_e2e_")
    runs = [_one_seed(steps, s, tmp, job) for s in seeds]
    k = max(1, steps // 4)

    def ms(xs):
        return dict(mean=statistics.mean(xs), sd=statistics.stdev(xs) if len(xs) > 1 else 0.0, n=len(xs))

    summary = dict(
        ratio_step_time_dppo_over_trl=dict(median=statistics.median(r["ratio_step_time_dppo_over_trl"] for r in runs),
                                           per_seed=[r["ratio_step_time_dppo_over_trl"] for r in runs]),
        ratio_peak_rss_dppo_over_trl=dict(median=statistics.median(r["ratio_peak_rss_dppo_over_trl"] for r in runs),
                                          per_seed=[r["ratio_peak_rss_dppo_over_trl"] for r in runs]),
        **{f"{side}_{key}": ms([r[side][key] for r in runs]) for side in ("dppo", "trl")
           for key in ("reward_first_mean", "reward_last_mean", "median_step_s", "peak_rss_mb")},
    )
    return dict(
        job=job, dppo_args=JOBS[job]["args"], steps=steps, seeds=list(seeds), prompts_per_step=JOBS[job]["P"],
        group_size=G, lr=JOBS[job]["lr"], summary=summary, runs=runs,
        command=f"python benchmarks/peer_trl.py --part e2e --job {job} --steps {steps} "
                f"--seeds {','.join(map(str, seeds))}",
        note=(f"reward_first_mean / reward_last_mean = mean training reward over the first / last {k} steps. "
              "wall_s includes model loading and (dppo) the cached warm-up lookup; median_step_s excludes the first "
              "step. Each side runs alone in its own process with one torch thread."),
    )
