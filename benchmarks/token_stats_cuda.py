"""Token statistics + policy loss on a CUDA GPU: dppo's fused loss (Triton tiles and PyTorch tiles) against the naive
path, the GEMMs' own time and Liger-Kernel's fused losses.

The CPU benchmark (benchmarks/token_stats.py) on a GPU: one forward + backward of a policy loss over N response tokens
from the final hidden states h [N, H] and the lm-head weight W [V, H] (both trainable), V = 151,936 (the Qwen2.5
vocabulary), H = 1536 (Qwen2.5-1.5B) and 4096 (7–8B heads), K = 20 rollout top-K ids, groups of 8 sequences of
≤ 1024 tokens. Cases (``--cases``; the first eight are the default):

    naive        logits = h·Wᵀ [N, V] → fp32 log_softmax → gather log π(a_t) and the top-K → entropy (no_grad) →
                 dppo.policy_loss("dppo-topk-tv") → backward (what the peers' trainers do)
    fused        dppo.policy_loss_from_hidden("dppo-topk-tv") (3 GEMMs, tiled, entropy metric on), tiles through the
                 Triton kernels (dppo._triton_tiles; DPPO_TILE_KERNEL=triton)
    fused_torch  the same through the PyTorch tile path (DPPO_TILE_KERNEL=torch): the fused path before the kernels
    fused_ppo    dppo.policy_loss_from_hidden("dppo-binary-tv", entropy=False), Triton tiles: the lean reference
    fused_grpo   dppo.policy_loss_from_hidden("grpo-clip-higher", entropy=False), Triton tiles
    gemm_floor   only the fused path's 3 GEMMs over the same tiles (logits h·Wᵀ, dh = dz·W, dW += dzᵀ·h, in the
                 input dtype, into preallocated buffers): the time no fused loss can beat (the issue's "limit")
    liger_grpo   liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(loss_type="dr_grpo", ε 0.2/0.28, β = 0,
                 torch.compile'd loss math, chunk of 1 sequence): the same loss as fused_grpo
    liger_ce     liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss(reduction="sum"): −Σ log π(a_t) only
                 (no policy loss, no top-K, no entropy): a floor for any fused log-prob + backward
    stats        dppo.token_stats(h, W, a, gather_ids=top-K) + dppo.policy_loss("dppo-topk-tv") (4 GEMMs, tiled)
    fused_big, fused_torch_big, fused_grpo_big: fused, fused_torch, fused_grpo with a --big_tile_mb tile

Time: median of ``--reps`` CUDA-synchronised wall times (3 when a call takes over 0.25 s) after one warm-up call (two
for Liger, whose first call compiles its loss). Memory: peak allocated bytes during one call minus what was allocated
before it (inputs; gradients of the previous call freed), so it counts dW and dh. TF32 stays off (torch's default), so
fp32 GEMMs are true fp32. Checked once per (H, dtype) at the smallest N, on the same tensors: fused (Triton) against
fused_torch (loss, entropy metric, gradients), and fused_grpo against liger_grpo (an independent implementation).

``--sweep bf16,fp32`` first times the two Triton kernels alone on one default-size tile for BLOCK_V × num_warps
choices (effective bandwidth: the stats kernel reads the tile once, dz reads and writes it), against the PyTorch tile
ops they replace. The report ends with the issue's goals: fused ≤ 1.0× naive's time at every N, and fused within 1.2×
of gemm_floor.

    python benchmarks/token_stats_cuda.py --sweep bf16,fp32 --out runs/token_stats_cuda.json   # ~4-5 min on an H200
    (or, with the CUDA tests first: OUT=runs/cuda_tiles PARTS=tiles bash benchmarks/cuda_check.sh)

A smoke run of this script's own code on a CPU (Triton's interpreter; its times mean nothing, its agreement lines do:
they compare the kernels with the PyTorch tiles at the real V):
    TRITON_INTERPRET=1 python benchmarks/token_stats_cuda.py --device cpu --hs 16 --ns "fp32:32;bf16:32" --reps 1 \
        --out /tmp/ts.json      # ~20 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dppo import policy_loss, policy_loss_from_hidden, token_stats  # noqa: E402
from dppo import _triton_tiles as tt  # noqa: E402
from dppo._tiles import _tile_stats, default_chunk_size  # noqa: E402

V, K, SEQ = 151_936, 20, 1024
DEFAULT_CASES = "naive,fused,fused_torch,fused_ppo,fused_grpo,gemm_floor,liger_grpo,liger_ce"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def setup(n: int, h: int, dtype: torch.dtype, dev: str) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (torch.randn(V, h, generator=g, device=dev, dtype=dtype) * (2.5 / h**0.5)).requires_grad_()
    hidden = torch.randn(n, h, generator=g, device=dev, dtype=dtype).requires_grad_()
    b, t = max(1, n // SEQ), min(n, SEQ)
    with torch.no_grad():  # rollout data from the same policy: 90 % of a_t from its top-K
        rnd = torch.randint(0, V, (n,), generator=g, device=dev)
        st = token_stats(hidden, weight, rnd, topk=K, entropy=False)
        j = torch.randint(0, K, (n, 1), generator=g, device=dev)
        from_topk = torch.rand(n, generator=g, device=dev) < 0.9
        target = torch.where(from_topk, st.topk_ids.gather(1, j)[:, 0], rnd)
        # a perturbed μ (engine noise), so that masks and clips act on some tokens
        rollout_logp = torch.where(from_topk, st.topk_logp.gather(1, j)[:, 0], st.logp).float()
        rollout_logp = (rollout_logp + 0.3 * torch.randn(n, generator=g, device=dev)).clamp(max=0)
        topk_ids, topk_logp = st.topk_ids, st.topk_logp.float()
    adv = torch.randn(b, generator=g, device=dev)
    mask = torch.ones(b, t, dtype=torch.bool, device=dev)
    return dict(hidden=hidden, weight=weight, h=h, b=b, t=t, target=target, rl=rollout_logp.view(b, t), adv=adv,
                mask=mask, topk_ids=topk_ids, topk_logp=topk_logp.view(b, t, K),
                sampled_in=(topk_ids == target[:, None]).any(-1).view(b, t))


@contextlib.contextmanager
def kernel(choice: str):
    """DPPO_TILE_KERNEL for the duration of a call (dppo._triton_tiles reads it on every call)."""
    old = os.environ.get(tt.KERNEL_ENV)
    os.environ[tt.KERNEL_ENV] = choice
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(tt.KERNEL_ENV, None)
        else:
            os.environ[tt.KERNEL_ENV] = old


def cases(d: dict, big_chunk: int, names: list[str]) -> dict:
    hidden, weight, target, b, t, h = d["hidden"], d["weight"], d["target"], d["b"], d["t"], d["h"]
    rl, adv, mask, ids = d["rl"], d["adv"], d["mask"], d["topk_ids"]
    topk_kw = dict(rollout_topk_logp=d["topk_logp"], sampled_in_topk=d["sampled_in"])
    h3, tgt2, ids3 = hidden.view(b, t, h), target.view(b, t), ids.view(b, t, K)

    def naive():
        logp_all = F.linear(hidden, weight).float().log_softmax(-1)
        logp = logp_all.gather(-1, target[:, None])[:, 0]
        topk_logp = logp_all.gather(-1, ids)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        loss, _ = policy_loss("dppo-topk-tv", logp.view(b, t), rl, adv, mask,
                              logp_at_rollout_topk=topk_logp.view(b, t, K), **topk_kw)
        loss.backward()
        return entropy

    def stats():
        st = token_stats(hidden, weight, target, gather_ids=ids)
        loss, _ = policy_loss("dppo-topk-tv", st.logp.view(b, t), rl, adv, mask,
                              logp_at_rollout_topk=st.gathered_logp.view(b, t, K), **topk_kw)
        loss.backward()

    def topk_dppo(choice, chunk=None):
        def run():
            with kernel(choice):
                loss, met = policy_loss_from_hidden("dppo-topk-tv", h3, weight, tgt2, rl, adv, mask,
                                                    rollout_topk_ids=ids3, rollout_topk_logp=d["topk_logp"],
                                                    chunk_size=chunk)
                loss.backward()
            return loss, met
        return run

    def lean(method, choice, chunk=None):
        def run():
            with kernel(choice):
                loss, met = policy_loss_from_hidden(method, h3, weight, tgt2, rl, adv, mask, entropy=False,
                                                    chunk_size=chunk)
                loss.backward()
            return loss
        return run

    def gemm_floor():
        n = hidden.shape[0]
        chunk = default_chunk_size(V, hidden.dtype, hidden.device)
        chunk = -(-n // -(-n // chunk))  # the fused path's balanced tiles
        x, w = hidden.detach(), weight.detach()
        buf = torch.empty(min(chunk, n) * V, dtype=x.dtype, device=x.device)
        dh, dw = torch.empty_like(x), torch.empty_like(w)
        for s0 in range(0, n, chunk):
            s1 = min(n, s0 + chunk)
            z = torch.mm(x[s0:s1], w.t(), out=buf[: (s1 - s0) * V].view(s1 - s0, V))
            torch.mm(z, w, out=dh[s0:s1])
            if s0 == 0:
                torch.mm(z.t(), x[s0:s1], out=dw)
            else:
                dw.addmm_(z.t(), x[s0:s1])
        return dh, dw

    out = dict(naive=naive, stats=stats, fused=topk_dppo("triton"), fused_torch=topk_dppo("torch"),
               fused_ppo=lean("dppo-binary-tv", "triton"), fused_grpo=lean("grpo-clip-higher", "triton"),
               fused_grpo_torch=lean("grpo-clip-higher", "torch"), gemm_floor=gemm_floor,
               fused_big=topk_dppo("triton", big_chunk), fused_torch_big=topk_dppo("torch", big_chunk),
               fused_grpo_big=lean("grpo-clip-higher", "triton", big_chunk))
    if {"liger_grpo", "liger_ce"} & set(names):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:  # the peer is optional: the dppo cases still run
            print(f"liger-kernel not importable ({e}); its cases are skipped", flush=True)
        else:
            grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dr_grpo", epsilon_low=0.2,
                                            epsilon_high=0.28, max_completion_length=t, compiled=True)
            ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            def liger_grpo():
                res = grpo(h3, weight, tgt2, mask.long(), adv, old_per_token_logps=rl)
                loss = res[0] if isinstance(res, tuple) else res
                loss.backward()
                return loss

            def liger_ce():
                ce(weight, hidden, target).backward()

            out.update(liger_grpo=liger_grpo, liger_ce=liger_ce)
    return {k: out[k] for k in names if k in out}


def clear(d: dict) -> None:
    d["hidden"].grad = None
    d["weight"].grad = None


CUDA = True  # False for a CPU smoke run of the script (--device cpu): no synchronisation, no memory figures


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def measure(fn, d: dict, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        clear(d)
        fn()
    sync()
    times = []
    while len(times) < reps:
        clear(d)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if times[0] > 0.25:  # big shapes: 3 calls are enough (GPU times vary by ~1 %)
            reps = min(reps, 3)
    clear(d)
    sync()
    base = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base if CUDA else 0
    clear(d)
    return dict(time_ms=1e3 * statistics.median(times), peak_gb=peak / 1e9, reps=len(times))


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _grads(d: dict, fn) -> tuple:
    clear(d)
    res = fn()
    g = (d["hidden"].grad.float().clone(), d["weight"].grad.float().clone())
    clear(d)
    return res, g


def agreement(d: dict, cs: dict) -> dict:
    """On the same tensors: fused (Triton tiles) vs fused_torch (PyTorch tiles), fused_grpo vs liger_grpo."""
    out = {}
    if "fused" in cs and "fused_torch" in cs:
        (la, ma), ga = _grads(d, cs["fused"])
        (lb, mb), gb = _grads(d, cs["fused_torch"])
        out["triton_vs_torch"] = dict(
            loss_triton=la.item(), loss_torch=lb.item(), loss_rel=abs(la.item() - lb.item()) / max(abs(lb.item()),
            1e-30), entropy_rel=abs(ma["entropy"] - mb["entropy"]) / max(abs(mb["entropy"]), 1e-30),
            grad_h_rel=_rel(ga[0], gb[0]), grad_w_rel=_rel(ga[1], gb[1]))
    if "fused_grpo" in cs and "liger_grpo" in cs:
        la, ga = _grads(d, cs["fused_grpo"])
        lb, gb = _grads(d, cs["liger_grpo"])
        out["dppo_vs_liger_grpo"] = dict(
            loss_dppo=la.item(), loss_liger=lb.item(), loss_rel=abs(la.item() - lb.item()) / max(abs(lb.item()),
            1e-30), grad_h_rel=_rel(ga[0], gb[0]), grad_w_rel=_rel(ga[1], gb[1]))
    return out


def sweep(dname: str, blocks: list[int], warps: list[int]) -> dict:
    """The two kernels alone on one default-size tile [c, V] (c = the CUDA default chunk), per BLOCK_V × num_warps,
    and the PyTorch tile ops they replace (upcast, _tile_stats with top-K gather and entropy, dz, cast back)."""
    from triton.testing import do_bench

    dtype = DTYPES[dname]
    c = default_chunk_size(V, dtype, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    z0 = (torch.randn(c, V, generator=g, device="cuda") * 3).to(dtype)
    tgt = torch.randint(0, V, (c,), generator=g, device="cuda")
    gids = torch.randint(0, V, (c, K), generator=g, device="cuda")
    coef = torch.full((c,), 1e-3, device="cuda")
    z = z0.clone()
    gb = z.numel() * z.element_size() / 1e9
    rows = []
    for bv in blocks:
        for nw in warps:
            try:
                ts = do_bench(lambda: tt.tile_stats(z, 1.0, tgt, gids, True, block_v=bv, num_warps=nw))
                lse = tt.tile_stats(z, 1.0, tgt, gids, True, block_v=bv, num_warps=nw)[3]
                td = do_bench(lambda: tt.tile_dz_(z, 1.0, tgt, lse, coef, block_v=bv, num_warps=nw))
                rows.append(dict(block_v=bv, num_warps=nw, stats_ms=ts, dz_ms=td, stats_gbps=gb / ts * 1e3,
                                 dz_gbps=2 * gb / td * 1e3))
            except Exception as e:  # a config the compiler rejects (registers) is reported, not fatal
                rows.append(dict(block_v=bv, num_warps=nw, error=f"{type(e).__name__}: {str(e)[:120]}"))
            print(dname, json.dumps(rows[-1]), flush=True)
            z.copy_(z0)
    low = dtype != torch.float32
    acc = torch.empty(c, V, device="cuda") if low else None
    scratch = torch.empty(c, V, device="cuda")

    def torch_tile():  # as dppo.fused's PyTorch path: upcast (bf16), statistics, dz, cast back (bf16)
        zf = acc.copy_(z) if low else z
        _, x, ent, _, _, gt, e, s = _tile_stats(zf, scratch, tgt, gids, 0, True)
        dz = e.mul_((-coef / s)[:, None])
        dz[torch.arange(c, device="cuda"), tgt] += coef
        return z.copy_(dz) if low else dz

    t_torch = do_bench(torch_tile)
    ok = [r for r in rows if "error" not in r]
    best = min(ok, key=lambda r: r["stats_ms"] + r["dz_ms"]) if ok else None
    default = next((r for r in ok if r["block_v"] == tt.MAX_BLOCK_V and r["num_warps"] == tt.NUM_WARPS), None)
    return dict(dtype=dname, tile_rows=c, tile_gb=gb, rows=rows, torch_tile_ms=t_torch, best=best, default=default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hs", default="1536,4096", help="hidden sizes H")
    ap.add_argument("--ns", default="fp32:1024,16384;bf16:1024,16384,65536", help="DTYPE:N,N;... for every H")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up calls (+1 for Liger, whose first call compiles)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/token_stats_cuda_triton.json")
    ap.add_argument("--big_tile_mb", type=int, default=2048, help="tile of the *_big cases (fp32 logits)")
    ap.add_argument("--sweep", default="", help="dtypes (bf16,fp32) whose kernels are timed alone first")
    ap.add_argument("--sweep_blocks", default="8192,16384,32768")
    ap.add_argument("--sweep_warps", default="8,16,32")
    ap.add_argument("--profile", default="", help="[H:]DTYPE:N: torch.profiler table of the fused case there")
    ap.add_argument("--naive_max_gb", type=float, default=0.8, help="skip naive above this fraction of GPU memory")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (TRITON_INTERPRET=1, tiny H)")
    ap.add_argument("--report", default="", help="print the report of a results file (a .partial one too) and exit")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            print(markdown(json.load(f)))
        return
    global CUDA
    dev = args.device
    CUDA = dev == "cuda"
    name, total = (torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory) if CUDA else (
        "cpu (smoke run)", 2**40)
    import triton

    res = dict(device=name, memory_gb=total / 1e9, torch=torch.__version__,
               triton=triton.__version__, tf32=torch.backends.cuda.matmul.allow_tf32, V=V, K=K,
               kernel_defaults=dict(max_block_v=tt.MAX_BLOCK_V, num_warps=tt.NUM_WARPS),
               command=" ".join(sys.argv), rows=[], agreement={}, sweep=[])
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        res["liger_kernel"] = version("liger-kernel")
    except Exception:
        res["liger_kernel"] = None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(path):
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    for dname in [x for x in args.sweep.split(",") if x and CUDA]:
        res["sweep"].append(sweep(dname, [int(x) for x in args.sweep_blocks.split(",")],
                                  [int(x) for x in args.sweep_warps.split(",")]))
        save(args.out + ".partial")
    names = args.cases.split(",")
    for h in (int(x) for x in args.hs.split(",")):
        for part in args.ns.split(";"):
            dname, ns = part.split(":")
            dtype = DTYPES[dname]
            for i, n in enumerate(int(x) for x in ns.split(",")):
                torch._dynamo.reset()  # Liger's compiled loss: a fresh compile per shape (a recompile failed)
                d = setup(n, h, dtype, dev)
                cs = cases(d, max(1, args.big_tile_mb * 2**20 // (4 * V)), names)
                if i == 0:
                    key = f"H{h}_{dname}_N{n}"
                    try:
                        res["agreement"][key] = agreement(d, cs)
                    except Exception as e:
                        res["agreement"][key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                    print(key, "agreement", res["agreement"][key], flush=True)
                naive_gb = 3 * n * V * 4 / 1e9  # logits (fp32), log_softmax, its gradient
                for name, fn in cs.items():
                    row = dict(h=h, dtype=dname, n=n, case=name)
                    if name == "naive" and naive_gb > args.naive_max_gb * total / 1e9:
                        row["skipped"] = f"needs ~{naive_gb:.0f} GB"
                    else:
                        try:
                            row.update(measure(fn, d, args.warmup + name.startswith("liger"), args.reps))
                        except torch.cuda.OutOfMemoryError:
                            row["skipped"] = "out of memory"
                        except Exception as e:  # a failure is reported, not fatal
                            row["skipped"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                        if CUDA:
                            torch.cuda.empty_cache()
                    print(json.dumps(row), flush=True)
                    res["rows"].append(row)
                    save(args.out + ".partial")  # what a timeout leaves behind
                del d, cs
                if CUDA:
                    torch.cuda.empty_cache()
    if args.profile:
        res["profile"] = profile(*args.profile.split(":"))
        print(res["profile"])
    res["markdown"] = markdown(res)
    save(args.out)
    print(res["markdown"])


def profile(*spec: str) -> str:
    """Where the fused case's time goes: the CUDA kernels with the most self time over 3 calls."""
    h, dname, n = spec if len(spec) == 3 else ("1536", *spec)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    d = setup(int(n), int(h), DTYPES[dname], "cuda")
    fn = cases(d, 1, ["fused"])["fused"]
    clear(d)
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            clear(d)
            fn()
        torch.cuda.synchronize()
    return p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)


def markdown(res: dict) -> str:
    """The table, the kernel sweep and the issue's goals (fused ≤ 1.0× naive; fused ≤ 1.2× gemm_floor)."""
    rows: dict = {}
    for r in res["rows"]:
        rows.setdefault((r["h"], r["dtype"], r["n"]), {})[r["case"]] = r
    names = [c for c in DEFAULT_CASES.split(",") + ["stats", "fused_grpo_torch", "fused_big", "fused_torch_big",
                                                       "fused_grpo_big"]
             if any(c in v for v in rows.values())]

    def cell(r):
        if r is None:
            return "–"
        if "skipped" in r:
            return f"not run ({r['skipped']})"
        return f"{r['time_ms']:.1f} ms / {r['peak_gb']:.2f} GB"

    def ratio(a, b, k="time_ms"):
        if a is None or b is None or "skipped" in a or "skipped" in b or not b[k]:
            return None
        return a[k] / b[k]

    def f(x):
        return "–" if x is None else f"{x:.2f}"

    lines = [f"{res['device']}, torch {res['torch']}, triton {res['triton']}, liger-kernel {res['liger_kernel']}, "
             f"V = {res['V']}, K = {res['K']}; command: {res['command']}", "",
             "| H | dtype | N | " + " | ".join(names) + " | fused/naive time, mem | fused/gemm_floor | "
             "fused/fused_torch | fused_grpo/liger_grpo time, mem |", "|" + "---|" * (len(names) + 7)]
    goals = []
    for (h, dname, n), c in rows.items():
        g = c.get
        fn, fg = ratio(g("fused"), g("naive")), ratio(g("fused"), g("gemm_floor"))
        lines.append(f"| {h} | {dname} | {n} | " + " | ".join(cell(g(x)) for x in names)
                     + f" | {f(fn)}, {f(ratio(g('fused'), g('naive'), 'peak_gb'))} | {f(fg)}"
                     + f" | {f(ratio(g('fused'), g('fused_torch')))}"
                     + f" | {f(ratio(g('fused_grpo'), g('liger_grpo')))}, "
                       f"{f(ratio(g('fused_grpo'), g('liger_grpo'), 'peak_gb'))} |")
        goals.append((h, dname, n, fn, fg))
    lines += ["", "Goals (issue 24): fused Top-K DPPO ≤ 1.0× naive time at every N; ≤ 1.2× the GEMMs' own time."]
    for h, dname, n, fn, fg in goals:
        a = "naive not run" if fn is None else f"{fn:.2f}× naive: {'met' if fn <= 1.0 else 'missed'}"
        b = "no floor" if fg is None else f"{fg:.2f}× GEMMs: {'met' if fg <= 1.2 else 'missed'}"
        lines.append(f"- H {h}, {dname}, N {n}: {a}; {b}")
    for s in res.get("sweep", []):
        lines += ["", f"Kernel sweep, {s['dtype']} tile [{s['tile_rows']}, {res['V']}] ({s['tile_gb']:.2f} GB): "
                  f"PyTorch tile ops {s['torch_tile_ms']:.3f} ms; "
                  f"default {s['default'] and round(s['default']['stats_ms'] + s['default']['dz_ms'], 3)} ms; "
                  f"best {s['best']}"]
    for k, v in res.get("agreement", {}).items():
        lines.append(f"- agreement {k}: {v}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
