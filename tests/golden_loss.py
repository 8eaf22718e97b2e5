"""The golden record of every preset's loss, metrics and gradients (tests/data/loss_golden.pt.gz) and how to replay it.

Recorded once, on the commit before the Method was rebuilt from typed parts (issue 23), with

    PYTHONPATH=src python tests/golden_loss.py --record

and replayed by tests/test_loss_golden.py, which asserts that today's code gives the same bits (torch.equal on the
loss and every gradient, == on every metric). The file holds the inputs too, so the replay does not depend on how
this machine's random generators or vectorised kernels produce them, and it records the platform (torch version, CPU
capability): on another platform, libm/SLEEF may round exp/log in the last place, and the replay then compares to
rounding instead (stated in the test's output).

Coverage, for each of the 29 presets that existed before issue 23:
  * ``dppo.policy_loss``: 3 shapes × seeds, fp32 and fp64 (and one bf16 input), each with the method's required inputs
    alone, + old_logp, + top-K, + token_weights, + denominator, and per-token advantages [B, T]; responses of uneven
    length (one empty), Â = 0 on some sequences, a near-deterministic token (π → 1), −inf in μ's padding.
    Recorded: the loss, every metric, ∂loss/∂log π.
  * ``dppo.policy_loss_from_hidden`` (the fused path; TRM falls back to two passes): fp32 and fp64, with and without
    padding, with bias, temperature and a small tile size. Recorded: the loss, every metric, ∂loss/∂(h, W, b).
"""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "loss_golden.pt.gz"

# The presets of the record: every preset before issue 23 (the later ones have their own reference tests).
PRESETS_BEFORE = (
    "dppo-binary-tv", "dppo-binary-kl", "dppo-topk-tv", "dppo-topk-kl", "dppo-binary-tv-recompute",
    "dppo-binary-kl-recompute", "grpo", "grpo-clip-higher", "pg-is", "cispo", "minirl", "minirl-tis",
    "minimal-negative-mask", "relax-low", "relax-high", "relax-both", "dppo-binary-tv-scaling",
    "dppo-binary-kl-scaling", "dppo-binary-tv-lora", "dppo-topk-tv-scaling", "dppo-topk-kl-scaling",
    "grpo-clip-higher-scaling", "cispo-scaling", "drpo", "trm", "ipo", "ipo-kl", "icepop", "vaco",
)
NEEDS_OLD = {"dppo-binary-tv-recompute", "dppo-binary-kl-recompute", "minirl", "minirl-tis", "icepop", "vaco"}
NEEDS_TOPK = {"dppo-topk-tv", "dppo-topk-kl", "dppo-topk-tv-scaling", "dppo-topk-kl-scaling"}
VARIANTS = ("base", "old", "topk", "weights", "den", "adv_bt")


def load() -> dict:
    return torch.load(io.BytesIO(gzip.decompress(GOLDEN.read_bytes())), weights_only=False)


def platform() -> dict:
    return dict(torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability(), threads=1)


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, ids[..., None]).squeeze(-1)


def policy_inputs(seed: int, b: int, t: int, k: int, dtype: torch.dtype) -> dict:
    """Log-probs of a sampled token under μ, π and π_θ′ from three nearby V = 8 distributions, with μ's top-K."""
    g = torch.Generator().manual_seed(seed)
    v = 8
    z = 2.0 * torch.randn(b, t, v, generator=g, dtype=torch.float64)
    z[:, 0, 0] += 14.0  # a near-deterministic first token: π, μ → 1 (the log1p/expm1 regime)
    a = torch.randint(0, v, (b, t), generator=g)
    a[:, 0] = 0
    lmu_all = torch.log_softmax(z, -1)
    lp_all = torch.log_softmax(z + 0.7 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    old_all = torch.log_softmax(z + 0.35 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    top = lmu_all.topk(k, dim=-1).indices
    lens = torch.randint(1, t + 1, (b,), generator=g)
    lens[0], lens[-1] = t, 0  # one full response, one empty
    mask = torch.arange(t)[None, :] < lens[:, None]
    lmu = _gather(lmu_all, a)
    lmu = lmu.masked_fill(~mask & (torch.arange(t)[None, :] % 2 == 1), float("-inf"))  # engines pad with anything
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[1] = 0.0
    c = lambda x: x.to(dtype)  # noqa: E731
    return dict(
        logp=c(_gather(lp_all, a)), rollout_logp=c(lmu), old_logp=c(_gather(old_all, a)), advantages=c(adv),
        advantages_bt=c(torch.randn(b, t, generator=g, dtype=torch.float64)), response_mask=mask,
        topk_logp=c(lp_all.gather(-1, top)), rollout_topk_logp=c(lmu_all.gather(-1, top)),
        sampled_in_topk=(top == a[..., None]).any(-1),
        token_weights=c(torch.rand(b, t, generator=g, dtype=torch.float64) * mask / 7.0),
        denominator=float(b * t + 3),
    )


POLICY_SETS = [(0, 2, 3, 2, torch.float32), (1, 4, 6, 3, torch.float32), (2, 5, 9, 3, torch.float32),
               (0, 2, 3, 2, torch.float64), (1, 4, 6, 3, torch.float64), (2, 5, 9, 3, torch.float64),
               (3, 3, 5, 2, torch.bfloat16)]


def policy_call(name: str, variant: str, x: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(loss, metrics, ∂loss/∂log π) of ``dppo.policy_loss`` for one preset, input set and variant."""
    from dppo import TopK, policy_loss

    kw: dict = {}
    if name in NEEDS_OLD or variant in ("old", "adv_bt"):
        kw["old_logp"] = x["old_logp"]
    if name in NEEDS_TOPK or variant in ("topk", "adv_bt"):
        kw["topk"] = TopK(x["topk_logp"], x["rollout_topk_logp"], x["sampled_in_topk"])
    if variant == "weights":
        kw["token_weights"] = x["token_weights"]
    if variant == "den":
        kw["denominator"] = x["denominator"]
    adv = x["advantages_bt"] if variant == "adv_bt" else x["advantages"]
    lp = x["logp"].clone().requires_grad_(True)
    loss, met = policy_loss(name, lp, x["rollout_logp"], adv, x["response_mask"], **kw)
    loss.backward()
    return loss.detach(), met, lp.grad


def fused_inputs(seed: int, padded: bool, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    b, t, h, v, k = 3, 5, 6, 11, 3
    hid = 0.8 * torch.randn(b, t, h, generator=g, dtype=torch.float64)
    w = 0.6 * torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = 0.2 * torch.randn(v, generator=g, dtype=torch.float64)
    tau = 0.9
    z = (hid @ w.T + bias) / tau
    lmu_all = torch.log_softmax(z + 0.5 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    old_all = torch.log_softmax(z + 0.25 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    ids = torch.randint(0, v, (b, t), generator=g)
    top = lmu_all.topk(k, dim=-1).indices
    mask = torch.ones(b, t, dtype=torch.bool)
    if padded:
        mask[1, 3:] = False
        mask[2, 1:] = False
    c = lambda x: x.to(dtype)  # noqa: E731
    return dict(hidden=c(hid), weight=c(w), bias=c(bias), temperature=tau, response_ids=ids,
                rollout_logp=c(_gather(lmu_all, ids)), old_logp=c(_gather(old_all, ids)),
                advantages=c(torch.tensor([0.9, -1.1, 0.4], dtype=torch.float64)), response_mask=mask,
                rollout_topk_ids=top, rollout_topk_logp=c(lmu_all.gather(-1, top)), denominator=17.0)


FUSED_SETS = [(0, False, torch.float32), (1, True, torch.float32), (0, False, torch.float64),
              (1, True, torch.float64)]


def fused_call(name: str, x: dict, with_den: bool) -> tuple[torch.Tensor, dict, tuple[torch.Tensor, ...]]:
    """(loss, metrics, (∂h, ∂W, ∂b)) of ``dppo.policy_loss_from_hidden`` for one preset and input set."""
    from dppo import policy_loss_from_hidden

    hid, w, bias = (x[n].clone().requires_grad_(True) for n in ("hidden", "weight", "bias"))
    kw: dict = dict(bias=bias, temperature=x["temperature"], chunk_size=4, entropy=True)
    if name in NEEDS_OLD:
        kw["old_logp"] = x["old_logp"]
    if name in NEEDS_TOPK:
        kw["rollout_topk_ids"], kw["rollout_topk_logp"] = x["rollout_topk_ids"], x["rollout_topk_logp"]
    if with_den:
        kw["denominator"] = x["denominator"]
    loss, met = policy_loss_from_hidden(name, hid, w, x["response_ids"], x["rollout_logp"], x["advantages"],
                                        x["response_mask"], **kw)
    loss.backward()
    return loss.detach(), met, (hid.grad, w.grad, bias.grad)


def record() -> dict:
    torch.set_num_threads(1)
    policy_sets = [policy_inputs(*s) for s in POLICY_SETS]
    fused_sets = [fused_inputs(*s) for s in FUSED_SETS]
    policy_cases, fused_cases = [], []
    for name in PRESETS_BEFORE:
        for i, x in enumerate(policy_sets):
            for variant in VARIANTS:
                loss, met, grad = policy_call(name, variant, x)
                policy_cases.append(dict(preset=name, inputs=i, variant=variant, loss=pack(loss), metrics=met,
                                         grad=pack(grad)))
        for i, x in enumerate(fused_sets):
            for with_den in (False, True):
                loss, met, grads = fused_call(name, x, with_den)
                fused_cases.append(dict(preset=name, inputs=i, denominator=with_den, loss=pack(loss), metrics=met,
                                        grads=[pack(g) for g in grads]))
    return dict(platform=platform(), policy_inputs=policy_sets, fused_inputs=fused_sets, policy=policy_cases,
                fused=fused_cases)


def pack(x: torch.Tensor) -> tuple[str, tuple[int, ...], list[float]]:
    """A tensor as (dtype, shape, Python floats): exact for fp64/fp32/bf16 values, and ~10× smaller on disk than
    thousands of tiny torch.save storages."""
    return str(x.dtype).removeprefix("torch."), tuple(x.shape), x.detach().double().reshape(-1).tolist()


def unpack(p: tuple[str, tuple[int, ...], list[float]]) -> torch.Tensor:
    dtype, shape, vals = p
    return torch.tensor(vals, dtype=torch.float64).reshape(shape).to(getattr(torch, dtype))


if __name__ == "__main__":
    if "--record" not in sys.argv:
        sys.exit("usage: PYTHONPATH=src python tests/golden_loss.py --record   (overwrites " + str(GOLDEN) + ")")
    data = record()
    buf = io.BytesIO()
    torch.save(data, buf)
    GOLDEN.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    print(f"wrote {GOLDEN}: {len(data['policy'])} policy_loss cases, {len(data['fused'])} fused cases, "
          f"{GOLDEN.stat().st_size / 1024:.0f} KiB, platform {data['platform']}")
