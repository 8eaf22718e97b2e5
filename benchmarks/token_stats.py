"""Benchmark: per-token statistics + policy loss at vocabulary scale: naive (materialised logits) vs dppo.token_stats
+ policy_loss (tiled, 4 GEMMs) vs dppo.policy_loss_from_hidden (fused, 3 GEMMs).

One forward+backward of a policy loss on N tokens of a model with hidden size H = 1536 and vocabulary V = 151,936
(Qwen2.5-1.5B's lm-head shape), from the final hidden states h [N, H] and the lm-head weight W [V, H]:

  naive      Top-K DPPO, as peers do it: logits = h·Wᵀ [N, V] (input dtype) → .float() → log_softmax [N, V] fp32 →
             gather log π(a_t) and log π at the rollout's 20 top-K ids; entropy −Σ p log p as a metric (no grad);
             loss = dppo.policy_loss("dppo-topk-tv", ...); backward.
  stats      the same Top-K DPPO loss and entropy metric from dppo.token_stats(h, W, a, gather_ids=topk_ids) +
             dppo.policy_loss (tiled; the backward recomputes the logits: 4 GEMMs).
  fused      the same Top-K DPPO loss and entropy metric from dppo.policy_loss_from_hidden (3 GEMMs, dh and dW built
             in the forward, the backward scales them).
  fused_ppo  the lean fused baseline: policy_loss_from_hidden("dppo-binary-tv", ..., entropy=False): log π(a_t) only.

Peak memory: each case in a fresh subprocess; peak RSS (VmHWM, reset through /proc/self/clear_refs once the inputs
h, W and the rollout data exist) minus the RSS at that moment = the extra memory of one forward + backward,
gradients dW, dh included. Time: a second fresh subprocess runs the cases interleaved (one warm-up each, then
``reps`` rounds, order rotated per round) and takes the median wall time; an N planned with 0 repetitions reuses the
single cold iteration of the memory run (n = 1). The parent waits for the (shared) machine to be idle before each
subprocess, records the CPU other processes used meanwhile, and repeats a timing run that was shared.

Usage:
  OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/token_stats.py          # full run → results JSON + docs table
  ... --plan "fp32:1024x5,4096x2;bf16:1024x0,4096x0"                        # dtype: N x repetitions (0 = cold run)
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/token_stats.py --tune        # tile-size sweep (fused, --n)
  .venv/bin/python benchmarks/token_stats.py --mem fused --n 1024 --dtype bf16          # child: one case's peak
  .venv/bin/python benchmarks/token_stats.py --time fused,stats --n 1024 --dtype bf16   # child: interleaved timing
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "token_stats.json"
DOCS = ROOT / "docs" / "benchmarks.md"
H, V, K, SEQ = 1536, 151_936, 20, 512
BEGIN, END = "<!-- token_stats:begin -->", "<!-- token_stats:end -->"


# ---------------------------------------------------------------------------------------------------------------
# Child: one case.
# ---------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets the peak-RSS high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0, proc(5)).
    Path("/proc/self/clear_refs").write_text("5")


def setup(n: int, dtype_name: str, tile_mb: int | None):
    """Inputs and the three case closures for N tokens. Returns (cases, hidden, weight, chunk_size)."""
    import torch
    import torch.nn.functional as F

    import dppo._tiles as tiles
    from dppo import policy_loss, policy_loss_from_hidden, token_stats

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if tile_mb:
        tiles.DEFAULT_TILE_BYTES = tile_mb * 2**20
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    # Logit std ≈ 2.5: a peaked-enough distribution; the cost does not depend on the values.
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * (2.5 / H**0.5)).requires_grad_()
    hidden = torch.randn(n, H, generator=g, dtype=dtype).requires_grad_()
    b, t = max(1, n // SEQ), min(n, SEQ)
    # Rollout data (what the inference engine returns), from the same policy: 90 % of sampled tokens drawn from
    # its top-K, the rest uniform. Built with the tiled path under no_grad so the setup peak stays small.
    with torch.no_grad():
        rnd = torch.randint(0, V, (n,), generator=g)
        st = token_stats(hidden, weight, rnd, topk=K, entropy=False)
        j = torch.randint(0, K, (n, 1), generator=g)
        from_topk = torch.rand(n, generator=g) < 0.9
        target = torch.where(from_topk, st.topk_ids.gather(1, j)[:, 0], rnd)
        rollout_logp = torch.where(from_topk, st.topk_logp.gather(1, j)[:, 0], st.logp)
        topk_ids, rollout_topk_logp = st.topk_ids, st.topk_logp
        sampled_in = (topk_ids == target[:, None]).any(-1)
        del st
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    rl = rollout_logp.view(b, t)
    topk_kw = dict(rollout_topk_logp=rollout_topk_logp.view(b, t, K), sampled_in_topk=sampled_in.view(b, t))

    def naive():
        logits = F.linear(hidden, weight).float()  # [N, V]; a no-op .float() for fp32, a copy for bf16
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, target[:, None])[:, 0]
        topk_logp = logp_all.gather(-1, topk_ids)
        with torch.no_grad():  # entropy as a metric, the lean way (no graph kept)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        loss, _ = policy_loss(
            "dppo-topk-tv", logp.view(b, t), rl, adv, mask, logp_at_rollout_topk=topk_logp.view(b, t, K), **topk_kw
        )
        loss.backward()
        return entropy.mean().item()

    def stats():
        st = token_stats(hidden, weight, target, gather_ids=topk_ids)  # entropy on: a metric, as in naive
        loss, _ = policy_loss(
            "dppo-topk-tv", st.logp.view(b, t), rl, adv, mask, logp_at_rollout_topk=st.gathered_logp.view(b, t, K),
            **topk_kw,
        )
        loss.backward()
        return st.entropy.mean().item()

    h3, tgt2, ids3 = hidden.view(b, t, H), target.view(b, t), topk_ids.view(b, t, K)

    def fused():
        loss, met = policy_loss_from_hidden("dppo-topk-tv", h3, weight, tgt2, rl, adv, mask, rollout_topk_ids=ids3,
                                            rollout_topk_logp=topk_kw["rollout_topk_logp"])  # entropy metric on
        loss.backward()
        return met["entropy"]

    def fused_ppo():
        loss, _ = policy_loss_from_hidden("dppo-binary-tv", h3, weight, tgt2, rl, adv, mask, entropy=False)
        loss.backward()
        return 0.0

    cases = {"naive": naive, "stats": stats, "fused": fused, "fused_ppo": fused_ppo}
    return cases, hidden, weight, tiles.default_chunk_size(V)


def run_mem(case: str, n: int, dtype_name: str, tile_mb: int | None) -> dict:
    """Peak extra RSS of one forward+backward of ``case`` in this (fresh) process, and its (cold) wall time."""
    cases, hidden, weight, chunk = setup(n, dtype_name, tile_mb)
    gc.collect()
    _reset_peak()
    base_kb = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    cases[case]()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = _status_kb("VmHWM")
    return {"case": case, "n": n, "dtype": dtype_name, "peak_mb": (peak_kb - base_kb) / 1024,
            "base_rss_mb": base_kb / 1024, "cold_time_s": dt, "cold_cpu_s": dc, "chunk_size": chunk}


def run_time(names: list[str], n: int, dtype_name: str, reps: int, tile_mb: int | None) -> dict:
    """Wall time of each case: one warm-up each, then ``reps`` rounds with the cases interleaved (order rotated
    every round), so that drifts of the shared machine hit every case alike. Median per case."""
    cases, hidden, weight, chunk = setup(n, dtype_name, tile_mb)
    times: dict[str, list[float]] = {c: [] for c in names}
    cpu: dict[str, list[float]] = {c: [] for c in names}
    for c in names:
        hidden.grad = weight.grad = None
        cases[c]()
    for r in range(reps):
        for c in names[r % len(names):] + names[: r % len(names)]:
            hidden.grad = weight.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            cases[c]()
            times[c].append(time.perf_counter() - t0)
            cpu[c].append(time.process_time() - c0)  # CPU seconds of this process (all threads)
    return {"n": n, "dtype": dtype_name, "reps": reps, "chunk_size": chunk,
            "time_s": {c: statistics.median(v) for c, v in times.items()},
            "times_s": {c: [round(x, 3) for x in v] for c, v in times.items()},
            "cpu_s": {c: statistics.median(v) for c, v in cpu.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Parent: each measurement in a fresh subprocess.
# ---------------------------------------------------------------------------------------------------------------


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


MAX_WAIT_S = 300.0  # --max-wait
MEM_TIMEOUT_S = 1800  # one memory subprocess (one cold forward + backward)


def wait_idle(max_wait_s: float | None = None, threshold: float = 0.3) -> float:
    """Wait until other processes use < ``threshold`` cores (2 s samples). The machine is shared with other
    sessions' jobs; timing under their load would be meaningless. Returns the seconds waited."""
    t0 = time.perf_counter()
    max_wait_s = MAX_WAIT_S if max_wait_s is None else max_wait_s
    while time.perf_counter() - t0 < max_wait_s:
        b0 = _busy_s()
        time.sleep(2)
        if (_busy_s() - b0) / 2 < threshold:
            break
        time.sleep(8)
    return round(time.perf_counter() - t0 - 2, 1)


def _spawn(args: list[str], timeout: int = 1800) -> dict:
    waited = wait_idle()
    cmd = [sys.executable, __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0, b0, c0 = time.perf_counter(), _busy_s(), _children_cpu_s()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timeout {timeout} s"}
    wall = time.perf_counter() - t0
    # CPU time other processes took while this measurement ran, in cores (0 = we had the machine to ourselves).
    foreign = max(0.0, (_busy_s() - b0) - (_children_cpu_s() - c0)) / wall
    if p.returncode != 0:
        # rc -9: the kernel's OOM killer.
        return {"status": f"failed rc={p.returncode}", "stderr": p.stderr[-2000:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out.update(status="ok", wall_s=round(wall, 1), foreign_load_cores=round(foreign, 2), waited_idle_s=waited)
    return out


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


CASES = ("naive", "stats", "fused", "fused_ppo")


def parse_plan(plan: str) -> list[tuple[str, int, int]]:
    """``"fp32:1024x5,4096x2;bf16:1024x0"`` → [("fp32", 1024, 5), ("fp32", 4096, 2), ("bf16", 1024, 0)]."""
    out = []
    for part in filter(None, plan.split(";")):
        dtype, _, ns = part.partition(":")
        for item in filter(None, ns.split(",")):
            n, _, reps = item.partition("x")
            out.append((dtype.strip(), int(n), int(reps or 0)))
    return out


def full(plan: list[tuple[str, int, int]]) -> dict:
    """For every (dtype, N, reps): a memory subprocess per case, then (reps > 0) one interleaved timing subprocess."""
    rows = []
    last_naive: dict[str, dict] = {}
    for dtype, n, reps in plan:
        row: dict = {"dtype": dtype, "n": n, "cases": {}}
        ran = []
        for case in CASES:
            prev = last_naive.get(dtype)
            if case == "naive" and prev is not None:
                # The naive peak is N·V-dominated: scale the last measured one linearly, plus the inputs; the same
                # for its time (a run past the subprocess timeout would be lost anyway).
                est_mb = (prev["peak_mb"] + prev["base_rss_mb"]) * n / prev["n"]
                est_s = prev["wall_s"] * n / prev["n"]
                msg = None
                if est_mb > 0.85 * _mem_available_mb():
                    msg = (f"not run: est. {est_mb / 1024:.0f} GB (peak measured at N={prev['n']} scaled "
                           f"linearly, with inputs) > 85% of the {_mem_available_mb() / 1024:.1f} GB available")
                elif est_s > MEM_TIMEOUT_S:
                    msg = (f"not run: est. {est_s / 60:.0f} min (wall time at N={prev['n']} scaled linearly) > the "
                           f"{MEM_TIMEOUT_S / 60:.0f} min limit")
                if msg:
                    print(f"  {dtype} N={n:>5} {case:>9}: {msg}", flush=True)
                    row["cases"][case] = {"status": msg, "est_gb": round(est_mb / 1024, 1), "est_s": round(est_s)}
                    continue
            r = _spawn(["--mem", case, "--n", str(n), "--dtype", dtype], timeout=MEM_TIMEOUT_S)
            row["cases"][case] = r
            if r["status"] == "ok":
                ran.append(case)
                print(f"  {dtype} N={n:>5} {case:>9}: peak +{r['peak_mb']:.0f} MB, cold {r['cold_time_s']:.2f} s "
                      f"[{r['wall_s']} s wall, foreign load {r['foreign_load_cores']}]", flush=True)
                if case == "naive":
                    last_naive[dtype] = r | {"n": n}
            else:
                print(f"  {dtype} N={n:>5} {case:>9}: {r['status']}", flush=True)
        row["mem_foreign_load_cores"] = max((row["cases"][c].get("foreign_load_cores", 0) for c in ran), default=0)
        if reps > 0 and ran:
            targs = ["--time", ",".join(ran), "--n", str(n), "--dtype", dtype, "--reps", str(reps)]
            r = _spawn(targs, timeout=7200)
            if r["status"] == "ok" and r["foreign_load_cores"] > 0.25:  # another job shared the cores: redo once
                print(f"  {dtype} N={n:>5} times: foreign load {r['foreign_load_cores']} cores, retrying", flush=True)
                r2 = _spawn(targs, timeout=7200)
                if r2["status"] == "ok" and r2["foreign_load_cores"] < r["foreign_load_cores"]:
                    r = r2
            row["timing_foreign_load_cores"] = r.get("foreign_load_cores")
            if r["status"] == "ok":
                for c in ran:
                    row["cases"][c].update(time_s=r["time_s"][c], times_s=r["times_s"][c], reps=r["reps"],
                                           cpu_s=r["cpu_s"][c])
                print(f"  {dtype} N={n:>5} times: " + ", ".join(f"{c} {r['time_s'][c]:.2f} s" for c in ran)
                      + f" (median of {reps}) [{r['wall_s']} s wall]", flush=True)
            else:
                print(f"  {dtype} N={n:>5} times: {r['status']} {r.get('stderr', '')[-500:]}", flush=True)
        if not (reps > 0 and row.get("timing_foreign_load_cores") is not None):
            for c in ran:  # the single cold iteration of the memory subprocess
                rc = row["cases"][c]
                rc.update(time_s=rc["cold_time_s"], cpu_s=rc["cold_cpu_s"], reps=1)
        ok = {c: v for c, v in row["cases"].items() if v.get("status") == "ok" and "time_s" in v}
        for a_, b_ in (("fused", "naive"), ("stats", "naive"), ("fused", "stats"), ("fused", "fused_ppo")):
            if a_ in ok and b_ in ok:
                row[f"{a_}/{b_}"] = {"time": ok[a_]["time_s"] / ok[b_]["time_s"],
                                     "mem": ok[a_]["peak_mb"] / ok[b_]["peak_mb"],
                                     "cpu": ok[a_]["cpu_s"] / ok[b_]["cpu_s"]}
        rows.append(row)
    return {"rows": rows}


def markdown(data: dict) -> str:
    """Per case: wall time / process CPU time / peak extra memory; ratios of the fused Top-K DPPO path."""
    lines = [
        "| dtype | N | naive | token_stats + policy_loss | **fused** (Top-K DPPO) | fused PPO path | "
        "fused/naive: wall, CPU, mem | fused/PPO: wall, CPU, mem | fused/stats: wall, CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r):
        if r is None:
            return "–"
        if r.get("status") != "ok":
            return r["status"].split(" (")[0]
        return f"{r['time_s']:.1f} s / {r['cpu_s']:.1f} s (n={r['reps']}) / {r['peak_mb'] / 1024:.2f} GB"

    def ratio(row, key, fields):
        return ", ".join(f"{row[key][f]:.2f}" for f in fields) if key in row else "–"

    for row in data["rows"]:
        c = [cell(row["cases"].get(k)) for k in CASES]
        lines.append(
            f"| {row['dtype']} | {row['n']} | {c[0]} | {c[1]} | {c[2]} | {c[3]} | "
            f"{ratio(row, 'fused/naive', ('time', 'cpu', 'mem'))} | "
            f"{ratio(row, 'fused/fused_ppo', ('time', 'cpu', 'mem'))} | {ratio(row, 'fused/stats', ('time', 'cpu'))} |"
        )
    return "\n".join(lines)


DEFAULT_PLAN = "fp32:1024x5,4096x2;bf16:1024x0,4096x0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", choices=list(CASES), help="child: peak memory of one case")
    ap.add_argument("--time", help="child: comma-separated cases to time, interleaved")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tile-mb", type=int, default=None)
    ap.add_argument("--tune", action="store_true", help="sweep the tile size of the fused path at --n, --dtypes")
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="dtype:NxREPS,...;dtype:... (REPS 0 = one cold iteration)")
    ap.add_argument("--dtypes", default="fp32", help="--tune only")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for an idle machine per run")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing results JSON that this plan does not measure")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    global MAX_WAIT_S
    MAX_WAIT_S = a.max_wait
    if a.mem:
        print(json.dumps(run_mem(a.mem, a.n, a.dtype, a.tile_mb)))
        return
    if a.time:
        print(json.dumps(run_time(a.time.split(","), a.n, a.dtype, a.reps, a.tile_mb)))
        return
    if a.tune:
        for dtype in a.dtypes.split(","):
            for mb in (64, 128, 256, 512):
                m = _spawn(["--mem", "fused", "--n", str(a.n), "--dtype", dtype, "--tile-mb", str(mb)])
                t = _spawn(["--time", "fused", "--n", str(a.n), "--dtype", dtype, "--reps", str(a.reps),
                            "--tile-mb", str(mb)])
                print(f"  {dtype} N={a.n} tile {mb:>3} MB (chunk {m.get('chunk_size')} tokens): "
                      f"{t['time_s']['fused']:.3f} s {t['times_s']['fused']}, peak +{m['peak_mb']:.0f} MB "
                      f"(foreign load {t['foreign_load_cores']} cores)", flush=True)
        return
    t0 = time.perf_counter()
    data = full(parse_plan(a.plan))
    from dppo.rundir.machine import machine_info, machine_line

    data["machine"] = f"{machine_line(machine_info())}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}"
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')} nice .venv/bin/python benchmarks/token_stats.py"
    data["command"] = cmd + (f' --plan "{a.plan}"' if a.plan != DEFAULT_PLAN else "") + (
        f" --max-wait {a.max_wait:g}" if a.max_wait != 300 else "")
    data["plan"] = a.plan
    data["shape"] = {"H": H, "V": V, "K": K, "seq_len": SEQ, "temperature": 1.0}
    data["total_s"] = round(time.perf_counter() - t0, 1)
    if a.merge and RESULTS.exists():  # one table from several runs: each row keeps the run it came from
        old = json.loads(RESULTS.read_text())
        new_keys = {(r["dtype"], r["n"]) for r in data["rows"]}
        for r in data["rows"]:
            r["run"] = {k: data[k] for k in ("machine", "command", "total_s")}
        kept = [r | {"run": r.get("run", {k: old[k] for k in ("machine", "command", "total_s")})}
                for r in old["rows"] if (r["dtype"], r["n"]) not in new_keys]
        order = {"fp32": 0, "bf16": 1}
        data["rows"] = sorted(kept + data["rows"], key=lambda r: (order.get(r["dtype"], 2), r["n"]))
        data["command"] = "; ".join(dict.fromkeys(r["run"]["command"] for r in data["rows"]))
        data["total_s"] = sum({r["run"]["command"]: r["run"]["total_s"] for r in data["rows"]}.values())
    print(markdown(data))
    if not a.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {RESULTS}")
        update_docs(data)


def update_docs(data: dict) -> None:
    """Replace the generated table between the markers in docs/benchmarks.md (the prose around it is by hand)."""
    if not DOCS.exists() or BEGIN not in DOCS.read_text():
        print(f"{DOCS} has no {BEGIN} marker: table not inserted")
        return
    text = DOCS.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    loads = [max(r.get("timing_foreign_load_cores") or 0, r.get("mem_foreign_load_cores") or 0) for r in data["rows"]]
    gen = (f"{BEGIN}\n<!-- generated by benchmarks/token_stats.py; edit the prose outside the markers -->\n\n"
           f"Machine: {data['machine']}.  \nCommand: `{data['command']}` (total {data['total_s'] / 60:.0f} min; "
           f"other processes' load during the measurements: max {max(loads, default=0):.2f} cores).\n\n"
           f"{markdown(data)}\n{END}")
    DOCS.write_text(head + gen + tail)
    print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
