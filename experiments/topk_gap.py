"""Binary vs Top-K vs exact (claims 3 and 9): how far below the exact full-vocabulary divergence each estimate lies,
and how often its mask decision agrees with the exact one.

Rollouts: the bf16 copy of the policy samples 256 prompts × 8 answers and records μ's full distribution. The policy
is the minilab SFT warm-up model, or a trained checkpoint (``--checkpoint runs/.../checkpoint.pt``). π: the fp32
policy after 4 optimizer steps (PG-IS) on those rollouts, at two step sizes (Adam lr 2e-4 and 1e-3), pooled — the
range of drift a trust region meets. For every response token: exact TV and KL(μ‖π) over all 512 ids, Binary TV/KL,
Top-K TV/KL for K ∈ {1, 5, 20, 50}. Gap = exact − estimate (≥ 0: every estimate is a lower bound, App. B). Mask
agreement: estimate > δ vs exact > δ, δ_TV = 0.15, δ_KL = 0.05 (direction is the same for all, so it is left out).

    python experiments/topk_gap.py [--checkpoint PATH]     # ≈ 1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import minilab as ml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 5, 20, 50)
DELTA = {"tv": 0.15, "kl": 0.05}


@torch.no_grad()
def estimates(pi_model, ro) -> dict[str, torch.Tensor]:
    from dppo import divergence as dv

    m = ro.response_mask
    lg = ml.response_logits(pi_model, ro)[m]  # [n, V]
    rlg = ro.rollout_logits[m]
    tok = ro.response[m]
    lpi, lmu = torch.log_softmax(lg, -1), torch.log_softmax(rlg, -1)
    logp, rlogp = lpi.gather(-1, tok[:, None])[:, 0], lmu.gather(-1, tok[:, None])[:, 0]
    out = dict(exact_tv=dv.exact_tv(lg, rlg), exact_kl=dv.exact_kl(lg, rlg),
               binary_tv=dv.binary_tv(logp, rlogp), binary_kl=dv.binary_kl(logp, rlogp))
    for k in KS:
        rtop, ids = lmu.topk(k, -1)
        inn = (ids == tok[:, None]).any(-1)
        ptop = lpi.gather(-1, ids)
        out[f"top{k}_tv"] = dv.topk_tv(logp, rlogp, ptop, rtop, inn)
        out[f"top{k}_kl"] = dv.topk_kl(logp, rlogp, ptop, rtop, inn)
        out[f"top{k}_mu_mass"] = rtop.exp().sum(-1)
    return out


def summary(est: dict[str, torch.Tensor]) -> dict:
    rows = []
    for kind in ("tv", "kl"):
        exact = est[f"exact_{kind}"]
        ex_mask = exact > DELTA[kind]
        for name in ["binary"] + [f"top{k}" for k in KS]:
            e = est[f"{name}_{kind}"]
            gap = exact - e
            rel = gap / exact.clamp(min=1e-12)
            em = e > DELTA[kind]
            rows.append(dict(
                divergence=kind, estimator=name, tokens=int(e.numel()),
                gap_median=float(gap.median()), gap_p90=float(gap.quantile(0.9)), gap_max=float(gap.max()),
                rel_gap_median=float(rel.median()), min_gap=float(gap.min()),
                mask_agreement=float((em == ex_mask).float().mean()),
                exact_mask_frac=float(ex_mask.float().mean()), est_mask_frac=float(em.float().mean()),
                recall=float((em & ex_mask).sum() / ex_mask.sum().clamp(min=1)),
                false_positive=int((em & ~ex_mask).sum()),
            ))
    mass = {f"top{k}": float(est[f"top{k}_mu_mass"].mean()) for k in KS}
    return dict(rows=rows, mean_topk_mu_mass=mass)


def plot(est: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind in zip(axes, ("tv", "kl")):
        exact = est[f"exact_{kind}"]
        data, labels = [], []
        for name in ["binary"] + [f"top{k}" for k in KS]:
            gap = (exact - est[f"{name}_{kind}"]).clamp(min=1e-9)
            data.append(gap.log10().numpy())
            labels.append(name.replace("top", "Top-"))
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel(f"log10(exact {kind.upper()} − estimate)")
        ax.set_title(f"{kind.upper()}: gap to the exact divergence (per token)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a minilab checkpoint.pt (default: the SFT warm-up model)")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    model = ml.sft_model(400)
    src = "minilab SFT warm-up (400 steps)"
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=False)["model"])
        src = f"minilab checkpoint {args.checkpoint}"
    model.eval()
    ro = ml.rollout(ml.cast_copy(model, torch.bfloat16), ml.problems(256, 777), 8,
                    generator=torch.Generator().manual_seed(0))
    parts = [estimates(ml.pg_is_updated(model, ro, lr, seed=1), ro) for lr in (2e-4, 1e-3)]
    est = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    res = summary(est)
    img = ROOT / "docs" / "img" / "results_topk_gap.png"
    plot(est, img)
    res.update(wall_s=time.time() - t0, model=src, vocab=ml.VOCAB, command="python experiments/topk_gap.py"
               + (f" --checkpoint {args.checkpoint}" if args.checkpoint else ""), image=str(img.relative_to(ROOT)))
    out = ROOT / "experiments" / "results" / "topk_gap.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for r in res["rows"]:
        print(f"{r['divergence']} {r['estimator']:7s} gap med {r['gap_median']:.2e} p90 {r['gap_p90']:.2e} "
              f"max {r['gap_max']:.2e} min {r['min_gap']:.1e} | agree {r['mask_agreement']:.4f} recall "
              f"{r['recall']:.3f} exact-mask {r['exact_mask_frac']:.4f} fp {r['false_positive']}")
    print(res["mean_topk_mu_mass"], f"{res['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
