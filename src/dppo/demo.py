"""`python -m dppo demo`: the loss library on synthetic tensors, printed as tables (no model, no download).

Part 1 recomputes the worked examples of the paper (§4.2) for one token each. Part 2 builds a batch whose rollout
distribution is long-tailed like an LLM's, perturbs the logits the way a bf16 inference engine and a few updates
would, and shows what every preset masks.
"""

from __future__ import annotations

import math

import torch

from dppo import PRESETS, policy_loss
from dppo.divergence import binary_kl, binary_tv, topk_kl, topk_tv


def _worked_examples() -> str:
    rows = [("rare token rises", 1e-4, 1e-2, +1.0), ("common token falls", 0.99, 0.80, -1.0),
            ("confident token rises", 0.9, 0.99, +1.0)]
    out = ["Worked examples (paper §4.2): one token, μ → π",
           f"{'case':<22}{'μ':>8}{'π':>8}{'r=π/μ':>9}{'Bin-TV':>9}{'Bin-KL':>9}  {'GRPO ε=.2/.28':<15}"
           f"{'DPPO-TV δ=.15':<15}{'DPPO-KL δ=.05':<15}"]
    for name, mu, pi, a in rows:
        lmu, lpi = torch.tensor([[math.log(mu)]]), torch.tensor([[math.log(pi)]])
        adv, m = torch.tensor([a]), torch.ones(1, 1)
        verdict = []
        for method in ("grpo-clip-higher", "dppo-binary-tv", "dppo-binary-kl"):
            _, met = policy_loss(method, lpi, lmu, adv, m)
            verdict.append("masked" if met["masked_frac"] > 0 else "kept")
        out.append(f"{name:<22}{mu:>8.4g}{pi:>8.4g}{pi / mu:>9.3f}{binary_tv(lpi, lmu).item():>9.4f}"
                   f"{binary_kl(lpi, lmu).item():>9.4f}  {verdict[0]:<15}{verdict[1]:<15}{verdict[2]:<15}"
                   f"  (Â {'>' if a > 0 else '<'} 0)")
    return "\n".join(out)


def _batch(seed: int = 0, B: int = 16, T: int = 64, V: int = 2000, K: int = 20, drift: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    # Zipf-like logits: a long tail, a few dominant tokens, as in an LLM's next-token distribution.
    base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))[torch.randperm(V, generator=g)]
    mu_logits = base + 3.0 * torch.randn(B, T, V, generator=g)
    pi_logits = mu_logits + drift * torch.randn(B, T, V, generator=g)  # policy has moved from the rollout
    lmu_all, lpi_all = torch.log_softmax(mu_logits, -1), torch.log_softmax(pi_logits, -1)
    ids = torch.distributions.Categorical(logits=mu_logits).sample()
    lmu = lmu_all.gather(-1, ids[..., None]).squeeze(-1)
    lpi = lpi_all.gather(-1, ids[..., None]).squeeze(-1)
    top_lmu, top_ids = lmu_all.topk(K, dim=-1)
    top_lpi = lpi_all.gather(-1, top_ids)
    in_top = (top_ids == ids[..., None]).any(-1)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = lpi + 0.05 * torch.randn(B, T, generator=g)  # a recomputed π_θ′ near π
    return dict(lpi=lpi, lmu=lmu, top_lpi=top_lpi, top_lmu=top_lmu, in_top=in_top, adv=adv, mask=mask,
                old=old.clamp(max=0.0))


def _presets_table() -> str:
    b = _batch()
    tv = (binary_tv(b["lpi"], b["lmu"])[b["mask"]].mean().item(),
          topk_tv(b["lpi"], b["lmu"], b["top_lpi"], b["top_lmu"], b["in_top"])[b["mask"]].mean().item())
    kl = (binary_kl(b["lpi"], b["lmu"])[b["mask"]].mean().item(),
          topk_kl(b["lpi"], b["lmu"], b["top_lpi"], b["top_lmu"], b["in_top"])[b["mask"]].mean().item())
    out = ["Synthetic batch: B=16 sequences, ≤64 tokens, V=2000 long-tailed, policy drifted from rollout.",
           f"mean Binary-TV {tv[0]:.4f} ≤ Top-20-TV {tv[1]:.4f};  mean Binary-KL {kl[0]:.4f} ≤ Top-20-KL {kl[1]:.4f}",
           "",
           f"{'preset':<26}{'loss':>9}{'masked':>8}{'A>0,π↑':>8}{'A<0,π↓':>8}{'capped':>8}{'seq drop':>9}"
           f"{'ratio max':>11}{'|π−μ| mean':>11}"]
    for name in PRESETS:
        lp = b["lpi"].clone().requires_grad_(True)
        loss, met = policy_loss(name, lp, b["lmu"], b["adv"], b["mask"], old_logp=b["old"],
                                logp_at_rollout_topk=b["top_lpi"], rollout_topk_logp=b["top_lmu"],
                                sampled_in_topk=b["in_top"])
        loss.backward()
        assert torch.isfinite(lp.grad).all()
        out.append(f"{name:<26}{met['loss']:>9.4f}{met['masked_frac']:>8.3f}{met['masked_frac_pos']:>8.3f}"
                   f"{met['masked_frac_neg']:>8.3f}{met['capped_frac']:>8.3f}{met['seq_masked_frac']:>9.3f}"
                   f"{met['ratio_max']:>11.3g}{met['abs_diff_mean']:>11.4f}")
    return "\n".join(out)


def main() -> None:
    torch.manual_seed(0)
    print(_worked_examples())
    print()
    print(_presets_table())


if __name__ == "__main__":
    main()
