"""Token statistics + policy loss on a CUDA GPU, with Liger-Kernel's fused losses as peers.

The CPU benchmark (benchmarks/token_stats.py) on a GPU: one forward + backward of a policy loss over N response tokens
from the final hidden states h [N, H] and the lm-head weight W [V, H] (both trainable), V = 151,936 and H = 1536 (the
Qwen2.5-1.5B head), K = 20 rollout top-K ids, groups of 8 sequences of ≤ 1024 tokens. Cases:

    naive        logits = h·Wᵀ [N, V] → fp32 log_softmax → gather log π(a_t) and the top-K → entropy (no_grad) →
                 dppo.policy_loss("dppo-topk-tv") → backward (what the peers' trainers do)
    stats        dppo.token_stats(h, W, a, gather_ids=top-K) + dppo.policy_loss("dppo-topk-tv") (4 GEMMs, tiled)
    fused        dppo.policy_loss_from_hidden("dppo-topk-tv") (3 GEMMs, tiled, entropy metric on)
    fused_ppo    dppo.policy_loss_from_hidden("dppo-binary-tv", entropy=False): the lean reference
    fused_grpo   dppo.policy_loss_from_hidden("grpo-clip-higher", entropy=False)
    *_big        the same two with a --big_tile_mb (1 GB) tile of fp32 logits instead of the default 128 MB
    liger_grpo   liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(loss_type="dr_grpo", ε 0.2/0.28, β = 0,
                 torch.compile'd loss math, chunk of 1 sequence): the same loss as fused_grpo
    liger_ce     liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss(reduction="sum"): −Σ log π(a_t) only
                 (no policy loss, no top-K, no entropy): a floor for any fused log-prob + backward

Time: median of ``--reps`` CUDA-synchronised wall times after ``--warmup`` calls (the first calls compile Liger's
loss and autotune its kernels). Memory: peak allocated bytes during one call minus what was allocated before it
(inputs; gradients of the previous call freed), so it counts dW and dh. TF32 stays off (torch's default), so fp32
GEMMs are true fp32. Also checks, once per dtype at the smallest N, that fused_grpo and liger_grpo give the same loss
and gradients (an independent implementation of the same surrogate).

    python benchmarks/token_stats_cuda.py --out benchmarks/results/token_stats_cuda.json   # a few minutes on an H100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dppo import policy_loss, policy_loss_from_hidden, token_stats  # noqa: E402

V, H, K, SEQ = 151_936, 1536, 20, 1024


def setup(n: int, dtype: torch.dtype, dev: str) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (torch.randn(V, H, generator=g, device=dev, dtype=dtype) * (2.5 / H**0.5)).requires_grad_()
    hidden = torch.randn(n, H, generator=g, device=dev, dtype=dtype).requires_grad_()
    b, t = max(1, n // SEQ), min(n, SEQ)
    with torch.no_grad():  # rollout data from the same policy: 90 % of a_t from its top-K, the rest uniform
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
    return dict(hidden=hidden, weight=weight, b=b, t=t, target=target, rl=rollout_logp.view(b, t), adv=adv,
                mask=mask, topk_ids=topk_ids, topk_logp=topk_logp.view(b, t, K),
                sampled_in=(topk_ids == target[:, None]).any(-1).view(b, t))


def cases(d: dict, big_chunk: int) -> dict:
    hidden, weight, target, b, t = d["hidden"], d["weight"], d["target"], d["b"], d["t"]
    rl, adv, mask, ids = d["rl"], d["adv"], d["mask"], d["topk_ids"]
    topk_kw = dict(rollout_topk_logp=d["topk_logp"], sampled_in_topk=d["sampled_in"])
    h3, tgt2, ids3 = hidden.view(b, t, H), target.view(b, t), ids.view(b, t, K)

    def naive():
        logp_all = F.linear(hidden, weight).float().log_softmax(-1)
        logp = logp_all.gather(-1, target[:, None])[:, 0]
        topk_logp = logp_all.gather(-1, ids)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        loss, _ = policy_loss("dppo-topk-tv", logp.view(b, t), rl, adv, mask, topk_logp=topk_logp.view(b, t, K),
                              **topk_kw)
        loss.backward()
        return entropy

    def stats():
        st = token_stats(hidden, weight, target, gather_ids=ids)
        loss, _ = policy_loss("dppo-topk-tv", st.logp.view(b, t), rl, adv, mask,
                              topk_logp=st.gathered_logp.view(b, t, K), **topk_kw)
        loss.backward()

    def fused():
        loss, _ = policy_loss_from_hidden("dppo-topk-tv", h3, weight, tgt2, rl, adv, mask, rollout_topk_ids=ids3,
                                          rollout_topk_logp=d["topk_logp"])
        loss.backward()

    def fused_ppo():
        loss, _ = policy_loss_from_hidden("dppo-binary-tv", h3, weight, tgt2, rl, adv, mask, entropy=False)
        loss.backward()

    def fused_grpo():
        loss, _ = policy_loss_from_hidden("grpo-clip-higher", h3, weight, tgt2, rl, adv, mask, entropy=False)
        loss.backward()
        return loss

    def fused_big():  # the same with a larger tile (GPU memory is plentiful; fewer, larger GEMMs)
        loss, _ = policy_loss_from_hidden("dppo-topk-tv", h3, weight, tgt2, rl, adv, mask, rollout_topk_ids=ids3,
                                          rollout_topk_logp=d["topk_logp"], chunk_size=big_chunk)
        loss.backward()

    def fused_grpo_big():
        loss, _ = policy_loss_from_hidden("grpo-clip-higher", h3, weight, tgt2, rl, adv, mask, entropy=False,
                                          chunk_size=big_chunk)
        loss.backward()

    out = dict(naive=naive, stats=stats, fused=fused, fused_ppo=fused_ppo, fused_grpo=fused_grpo,
               fused_big=fused_big, fused_grpo_big=fused_grpo_big)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:  # the peer is optional: the dppo cases still run
        print(f"liger-kernel not importable ({e}); its cases are skipped", flush=True)
        return out
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
    return out


def clear(d: dict) -> None:
    d["hidden"].grad = None
    d["weight"].grad = None


def measure(fn, d: dict, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        clear(d)
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        clear(d)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    clear(d)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear(d)
    return dict(time_ms=1e3 * statistics.median(times), peak_gb=peak / 1e9, reps=reps)


def agreement(d: dict, cs: dict) -> dict | None:
    """fused_grpo vs liger_grpo on the same tensors: relative loss and gradient differences."""
    if "liger_grpo" not in cs:
        return None
    clear(d)
    la = cs["fused_grpo"]()
    ga = [d["hidden"].grad.float().clone(), d["weight"].grad.float().clone()]
    clear(d)
    lb = cs["liger_grpo"]()
    gb = [d["hidden"].grad.float().clone(), d["weight"].grad.float().clone()]
    clear(d)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return dict(loss_dppo=la.item(), loss_liger=lb.item(), loss_rel=abs(la.item() - lb.item()) / max(abs(lb.item()),
                1e-30), grad_h_rel=rel(ga[0], gb[0]), grad_w_rel=rel(ga[1], gb[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="fp32:1024,4096,16384;bf16:1024,4096,16384,65536")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/token_stats_cuda.json")
    ap.add_argument("--big_tile_mb", type=int, default=1024, help="tile of the *_big cases (fp32 logits)")
    ap.add_argument("--profile", default="", help="DTYPE:N: torch.profiler table of the fused case there")
    ap.add_argument("--naive_max_gb", type=float, default=0.8, help="skip naive above this fraction of GPU memory")
    args = ap.parse_args()
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    res = dict(device=props.name, memory_gb=props.total_memory / 1e9, torch=torch.__version__,
               tf32=torch.backends.cuda.matmul.allow_tf32, V=V, H=H, K=K, rows=[], agreement={})
    try:
        import liger_kernel
        res["liger_kernel"] = getattr(liger_kernel, "__version__", "?")
    except ImportError:
        res["liger_kernel"] = None
    for part in args.ns.split(";"):
        dname, ns = part.split(":")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        for i, n in enumerate(int(x) for x in ns.split(",")):
            torch._dynamo.reset()  # Liger's compiled loss: a fresh compile per shape (its dynamic-shape guard failed)
            d = setup(n, dtype, dev)
            cs = cases(d, max(1, args.big_tile_mb * 2**20 // (4 * V)))
            if i == 0:
                try:
                    res["agreement"][dname] = agreement(d, cs)
                except Exception as e:
                    res["agreement"][dname] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                print(dname, "agreement", res["agreement"][dname], flush=True)
            naive_gb = 3 * n * V * 4 / 1e9  # logits (fp32), log_softmax, its gradient
            for name, fn in cs.items():
                if name == "naive" and naive_gb > args.naive_max_gb * props.total_memory / 1e9:
                    row = dict(dtype=dname, n=n, case=name, skipped=f"needs ~{naive_gb:.0f} GB")
                else:
                    try:
                        row = dict(dtype=dname, n=n, case=name, **measure(fn, d, args.warmup, args.reps))
                    except torch.cuda.OutOfMemoryError:
                        row = dict(dtype=dname, n=n, case=name, skipped="out of memory")
                    except Exception as e:  # a peer's failure is reported, not fatal
                        row = dict(dtype=dname, n=n, case=name, skipped=f"error: {type(e).__name__}: {str(e)[:150]}")
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                res["rows"].append(row)
                with open(args.out + ".partial", "w") as f:  # what a timeout leaves behind
                    json.dump(res, f, indent=1)
            del d, cs
            torch.cuda.empty_cache()
    if args.profile:
        res["profile"] = profile(*args.profile.split(":"))
        print(res["profile"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))


def profile(dname: str, n: str) -> str:
    """Where the fused case's time goes: the CUDA kernels with the most self time over 3 calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    d = setup(int(n), {"fp32": torch.float32, "bf16": torch.bfloat16}[dname], "cuda")
    fn = cases(d, 1)["fused"]
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
    rows = {}
    for r in res["rows"]:
        rows.setdefault((r["dtype"], r["n"]), {})[r["case"]] = r
    names = ["naive", "stats", "fused", "fused_big", "fused_ppo", "fused_grpo", "fused_grpo_big", "liger_grpo",
             "liger_ce"]
    lines = ["| dtype | N | " + " | ".join(names) + " | fused/naive time, mem | fused/PPO time | fused_grpo/liger_grpo "
             "time, mem |", "|" + "---|" * (len(names) + 5)]

    def cell(r):
        if r is None:
            return "–"
        if "skipped" in r:
            return f"not run ({r['skipped']})"
        return f"{r['time_ms']:.1f} ms / {r['peak_gb']:.2f} GB"

    def ratio(a, b, k):
        if a is None or b is None or "skipped" in a or "skipped" in b:
            return "–"
        return f"{a[k] / b[k]:.2f}"

    for (dname, n), c in rows.items():
        g = c.get
        lines.append(f"| {dname} | {n} | " + " | ".join(cell(g(x)) for x in names)
                     + f" | {ratio(g('fused'), g('naive'), 'time_ms')}, {ratio(g('fused'), g('naive'), 'peak_gb')}"
                     + f" | {ratio(g('fused'), g('fused_ppo'), 'time_ms')}"
                     + f" | {ratio(g('fused_grpo'), g('liger_grpo'), 'time_ms')}, "
                       f"{ratio(g('fused_grpo'), g('liger_grpo'), 'peak_gb')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
