"""Binary vs Top-K vs exact (claims 3 and 9), on the shipped trainer: how far below the exact full-vocabulary
divergence each estimate lies, and how often its mask decision agrees with the exact one at the *same* δ.

Rollouts: the trainer's bf16 engine samples the miniature's first RL batch (experiments/miniature.toml) and records
μ's whole distribution over the padded vocabulary. π: the trainer's fp32 policy after its own 4 mini-batch updates
of that batch (PG-IS), at the miniature's learning rate and at 10× it, pooled: the range of drift a trust region
meets. Per response token: exact TV and KL(μ‖π) (``dppo.divergence.exact_tv/exact_kl``), Binary TV/KL, Top-K TV/KL
for K ∈ {1, 5, 20, 50} (μ's top K, the sampled token added to the cells as the paper's estimator does). Gap = exact −
estimate (≥ 0: every estimate is a lower bound, App. B). Mask agreement: estimate > δ vs exact > δ at one δ for all
estimators (δ_TV = 0.15, δ_KL = 0.05). The side condition of Eq. 12 is the same for all estimators, so it is left out.
The library computes in fp32; every gap is also computed in float64 from the definitions (``fp64_min_gap``), where
the lower-bound property holds without rounding.

    python experiments/topk_gap.py [dppo train flags ...]      # ≈ 3 min on a busy 2-core CPU
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from first_batch import ROOT, first_batch, make_trainer, policy_logits, update  # noqa: E402

from dppo import divergence as dv  # noqa: E402
from dppo.rundir.machine import machine_info, machine_line  # noqa: E402

KS = (1, 5, 20, 50)
DELTA = {"tv": 0.15, "kl": 0.05}


@torch.no_grad()
def estimates(logits: torch.Tensor, ro) -> dict[str, torch.Tensor]:
    m = ro.response_mask
    lg, lmu = logits[m], ro.rollout_full_logp[m]  # [n, V]
    tok = ro.response_ids[m]
    lpi = torch.log_softmax(lg, -1)
    logp, rlogp = lpi.gather(-1, tok[:, None])[:, 0], ro.rollout_logp[m]
    out = dict(exact_tv=dv.exact_tv(lg, lmu), exact_kl=dv.exact_kl(lg, lmu),
               binary_tv=dv.binary_tv(logp, rlogp), binary_kl=dv.binary_kl(logp, rlogp),
               mu=rlogp.exp())
    for k in KS:
        rtop, ids = lmu.topk(k, -1)
        inn = (ids == tok[:, None]).any(-1)
        ptop = lpi.gather(-1, ids)
        out[f"top{k}_tv"] = dv.topk_tv(logp, rlogp, ptop, rtop, inn)
        out[f"top{k}_kl"] = dv.topk_kl(logp, rlogp, ptop, rtop, inn)
        out[f"top{k}_mu_mass"] = rtop.exp().sum(-1)
    return out


@torch.no_grad()
def fp64_gaps(logits: torch.Tensor, ro) -> dict[str, torch.Tensor]:
    """exact − estimate for every estimator in float64, each written from its definition (Eqs. 13–16 over the
    cells {a_t} ∪ top-K(μ) and "other"): the lower-bound property without fp32 rounding."""
    m = ro.response_mask
    lpi = torch.log_softmax(logits[m].double(), -1)
    lmu = torch.log_softmax(ro.rollout_full_logp[m].double(), -1)
    pi, mu = lpi.exp(), lmu.exp()
    tok = ro.response_ids[m]
    exact = {"tv": 0.5 * (pi - mu).abs().sum(-1), "kl": (mu * (lmu - lpi)).sum(-1)}

    def coarse(cells: torch.Tensor) -> dict[str, torch.Tensor]:  # cells: [n, V] bool, the listed ids
        p, q = (pi * cells).sum(-1, keepdim=True), (mu * cells).sum(-1, keepdim=True)
        pc, qc = torch.cat([pi * cells, 1 - p], -1), torch.cat([mu * cells, 1 - q], -1)
        keep = qc > 0
        kl = torch.where(keep, qc * (qc.clamp(min=1e-300).log() - pc.clamp(min=1e-300).log()), 0).sum(-1)
        return {"tv": 0.5 * (pc - qc).abs().sum(-1), "kl": kl}

    out = {}
    onehot = torch.zeros_like(pi, dtype=torch.bool).scatter_(-1, tok[:, None], True)
    for name, cells in [("binary", onehot)] + [
            (f"top{k}", onehot.clone().scatter_(-1, lmu.topk(k, -1).indices, True)) for k in KS]:
        est = coarse(cells)
        for kind in ("tv", "kl"):
            out[f"{name}_{kind}"] = exact[kind] - est[kind]
    return out


def summary(est: dict[str, torch.Tensor], gaps64: dict[str, torch.Tensor]) -> dict:
    rows = []
    for kind in ("tv", "kl"):
        exact = est[f"exact_{kind}"]
        ex_mask = exact > DELTA[kind]
        for name in ["binary"] + [f"top{k}" for k in KS]:
            e = est[f"{name}_{kind}"]
            gap = exact - e
            em = e > DELTA[kind]
            rows.append(dict(
                divergence=kind, estimator=name, tokens=int(e.numel()),
                gap_median=float(gap.median()), gap_p90=float(gap.quantile(0.9)), gap_max=float(gap.max()),
                min_gap=float(gap.min()), exact_at_min_gap=float(exact[gap.argmin()]),
                fp64_min_gap=float(gaps64[f"{name}_{kind}"].min()),
                mask_agreement=float((em == ex_mask).float().mean()),
                exact_mask_frac=float(ex_mask.float().mean()), est_mask_frac=float(em.float().mean()),
                recall=float((em & ex_mask).sum() / ex_mask.sum().clamp(min=1)),
                missed=int((~em & ex_mask).sum()), exact_masked=int(ex_mask.sum()),
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
        ax.set_ylabel(f"log10(exact {kind.upper()} − estimate), floor 1e-9")
        ax.set_title(f"{kind.upper()}: gap to the exact divergence (per token)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> int:
    t0 = time.time()
    parts, parts64, lrs = [], [], []
    for scale in (1.0, 10.0):
        tr = make_trainer(argv if scale == 1 else [*argv, "--lr", repr(lrs[0] * scale)], "pg-is")
        lrs.append(tr.cfg.optim.lr)
        batch = first_batch(tr)
        update(tr, batch)
        logits = policy_logits(tr, batch["ro"])
        parts.append(estimates(logits, batch["ro"]))
        parts64.append(fp64_gaps(logits, batch["ro"]))
    est = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    res = summary(est, {k: torch.cat([p[k] for p in parts64]) for k in parts64[0]})
    img = ROOT / "docs" / "img" / "results_topk_gap.png"
    plot(est, img)
    res.update(wall_s=time.time() - t0, machine=machine_line(machine_info()), model=tr.model_path,
               vocab=len(tr.tok), lrs=lrs, command="python experiments/topk_gap.py " + " ".join(argv),
               image=str(img.relative_to(ROOT)))
    out = ROOT / "experiments" / "results" / "topk_gap.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for r in res["rows"]:
        print(f"{r['divergence']} {r['estimator']:7s} gap med {r['gap_median']:.2e} p90 {r['gap_p90']:.2e} "
              f"max {r['gap_max']:.2e} min {r['min_gap']:.1e} (at exact {r['exact_at_min_gap']:.2g}; fp64 {r['fp64_min_gap']:.1e}) | agree "
              f"{r['mask_agreement']:.4f} recall "
              f"{r['recall']:.3f} exact-mask {r['exact_mask_frac']:.4f} missed {r['missed']}")
    print(res["mean_topk_mu_mass"], f"{res['wall_s']:.0f}s on {res['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
