"""A miniature RL lab for the paper's claims on a 2-core CPU: task, tokenizer, tiny Qwen3, SFT warm-up, bf16 rollout,
fp32 training with dppo's ``policy_loss``, one ``metrics.jsonl`` line per rollout batch.

Why this exists beside ``dppo train``: the experiments need knobs the paper's sanity test turns (rollout precision,
extra rollout-logit noise to scale the mismatch, gradient steps per batch, a *fixed* small problem set) and they must
run in seconds per step. Everything here is deliberately small and self-contained (no download, no tokenizer files):

* task ``add``: "a+b=" → the digits of a+b then <eos>, a, b ∈ [0, 30); reward 1 for an exact answer, else 0;
* tokenizer: one id per character; the model's vocabulary is padded to ``VOCAB`` = 512 ids so it has a long tail of
  tokens the data never uses (what Top-K's "other" cell summarises);
* model: Qwen3 from config, hidden 64, 2 layers (≈0.1 M parameters + embeddings), SFT warm-up cached under
  ``runs/minilab/``;
* rollout: a bf16 copy of the weights samples at temperature 1 and records log μ(a_t) and μ's top-K; training
  recomputes log π_θ in fp32 — the paper's deliberate training–inference mismatch (§5.1), in miniature.

    python experiments/minilab.py train --method dppo-binary-tv --seed 0 --out runs/x --steps 40
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "minilab"
CHARS = "0123456789+="
PAD, EOS = 0, 1
STOI = {c: i + 2 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()} | {PAD: "<pad>", EOS: "<eos>"}
VOCAB = 512
MAX_NEW = 4  # up to 3 digits + <eos>
NMAX = 30  # operands in [0, NMAX)


def token_str(i: int) -> str:
    return ITOS.get(int(i), f"<unused{int(i)}>")


def encode(s: str) -> list[int]:
    return [STOI[c] for c in s]


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(NMAX), rng.randrange(NMAX)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def make_model(seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "qwen3", hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, vocab_size=VOCAB, tie_word_embeddings=True,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(cfg)


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        att[i, L - len(s):] = 1
    return ids, att


def sft_model(steps: int = 400, seed: int = 0, lr: float = 3e-3, batch: int = 64):
    """Teacher-forced warm-up on random sums, cached. Stopped early on purpose: held-out accuracy ≈ 0.3–0.5, so RL
    has room to improve and the policy is uncertain enough to sample varied answers."""
    path = CACHE / f"sft_s{seed}_n{steps}_max{NMAX}.pt"
    model = make_model(seed)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        probs = problems(batch, seed * 100_000 + step)
        seqs = [encode(p) + encode(a) + [EOS] for p, a in probs]
        ids, att = _left_pad(seqs)
        labels = ids.clone()
        for i, (p, _) in enumerate(probs):  # loss on the answer only
            labels[i, : ids.shape[1] - (len(seqs[i]) - len(p))] = -100
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@dataclasses.dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, P+T]
    attention: torch.Tensor  # [N, P+T]
    response: torch.Tensor  # [N, T]
    response_mask: torch.Tensor  # [N, T] bool
    rollout_logp: torch.Tensor  # [N, T] log μ(a_t)
    rollout_logits: torch.Tensor  # [N, T, V] fp32 (μ's full distribution: exact divergences, top-K)
    rewards: torch.Tensor  # [N]
    texts: list[str]


@torch.no_grad()
def rollout(gen_model, probs: list[tuple[str, str]], group: int, *, logit_noise: float = 0.0,
            generator: torch.Generator | None = None) -> Rollout:
    """Sample ``group`` answers per prompt at temperature 1 with ``gen_model`` (the "inference engine")."""
    seqs = [encode(p) for p, _ in probs for _ in range(group)]
    ids, att = _left_pad(seqs)
    N, P = ids.shape
    past = None
    cur_ids, cur_att = ids, att
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    cur_pos = pos
    out_tok, out_logits = [], []
    done = torch.zeros(N, dtype=torch.bool)
    for t in range(MAX_NEW):
        o = gen_model(input_ids=cur_ids, attention_mask=cur_att, position_ids=cur_pos, past_key_values=past,
                      use_cache=True)
        past = o.past_key_values
        logits = o.logits[:, -1].float()
        if logit_noise > 0:
            logits = logits + logit_noise * torch.randn(logits.shape, generator=generator)
        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        out_tok.append(tok)
        out_logits.append(logits)
        done = done | (tok == EOS)
        cur_ids = tok[:, None]
        att = torch.cat([att, torch.ones(N, 1, dtype=torch.long)], 1)
        cur_att = att
        cur_pos = cur_pos[:, -1:] + 1
    resp = torch.stack(out_tok, 1)
    rlogits = torch.stack(out_logits, 1)
    # response mask: tokens up to and including the first <eos>
    is_eos = resp == EOS
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    rmask = before == 0
    rlogp = torch.log_softmax(rlogits, -1).gather(-1, resp[..., None]).squeeze(-1)
    texts, rewards = [], []
    for i in range(N):
        s = "".join(ITOS.get(int(x), "?") for x, m in zip(resp[i], rmask[i]) if m and int(x) != EOS)
        texts.append(s)
        ended = bool(is_eos[i][rmask[i]].any())
        rewards.append(float(ended and s == probs[i // group][1]))
    full = torch.cat([ids, resp], 1)
    full_att = torch.cat([att[:, :P], rmask.long()], 1)
    return Rollout(full, full_att, resp, rmask, rlogp, rlogits, torch.tensor(rewards), texts)


def response_logits(model, ro: Rollout, idx=None) -> torch.Tensor:
    """[n, T, V] fp32 logits of ``model`` at the response positions (teacher-forced on the rollout)."""
    ids, att = ro.input_ids, ro.attention
    if idx is not None:
        ids, att = ids[idx], att[idx]
    T = ro.response.shape[1]
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    att_full = att.clone()
    att_full[:, -T:] = 1  # masked response tokens still attend (their loss is masked); keeps shapes simple
    logits = model(input_ids=ids, attention_mask=att_full, position_ids=pos).logits
    return logits[:, -T - 1 : -1].float()


def cast_copy(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    m.eval()
    return m


def pg_is_updated(model, ro: Rollout, lr: float, steps: int = 4, seed: int = 0):
    """An fp32 copy of ``model`` after ``steps`` PG-IS minibatch steps (Adam) on ``ro``: a policy π that has moved
    away from the rollout policy μ by a controlled amount."""
    from dppo import group_advantages, policy_loss

    pi = cast_copy(model, torch.float32)
    pi.train()
    opt = torch.optim.Adam(pi.parameters(), lr=lr)
    adv = group_advantages(ro.rewards, 8)
    g = torch.Generator().manual_seed(seed)
    for idx in torch.randperm(len(adv), generator=g).chunk(steps):
        lg = response_logits(pi, ro, idx)
        logp = torch.log_softmax(lg, -1).gather(-1, ro.response[idx][..., None]).squeeze(-1)
        loss, _ = policy_loss("pg-is", logp, ro.rollout_logp[idx], adv[idx], ro.response_mask[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    pi.eval()
    return pi


@torch.no_grad()
def accuracy(model, probs: list[tuple[str, str]]) -> float:
    """Greedy held-out accuracy (fp32)."""
    seqs = [encode(p) for p, _ in probs]
    ids, att = _left_pad(seqs)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = []
    past, cur, cur_pos = None, ids, pos
    for _ in range(MAX_NEW):
        o = model(input_ids=cur, attention_mask=att, position_ids=cur_pos, past_key_values=past, use_cache=True)
        past = o.past_key_values
        tok = o.logits[:, -1].argmax(-1)
        out.append(tok)
        cur = tok[:, None]
        att = torch.cat([att, torch.ones(len(seqs), 1, dtype=torch.long)], 1)
        cur_pos = cur_pos[:, -1:] + 1
    resp = torch.stack(out, 1)
    ok = 0
    for i, (_, a) in enumerate(probs):
        s = ""
        for x in resp[i].tolist():
            if x == EOS:
                ok += s == a
                break
            s += ITOS.get(x, "?")
    return ok / len(probs)


# --------------------------------------------------------------------------------------------------------------------
# RL loop
# --------------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    from dppo import group_advantages, policy_loss
    from dppo.methods import get_method, replace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    method = get_method(args.method)
    over = json.loads(args.method_overrides) if args.method_overrides else {}
    if over:
        method = replace(method, **over)
    K = max(method.topk, 0)
    cfg = dict(vars(args), method_resolved=dataclasses.asdict(method))
    (out / "config.json").write_text(json.dumps(cfg, indent=1, default=str))

    model = sft_model(args.sft_steps, seed=0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = 0
    ckpt = out / "checkpoint.pt"
    metrics_path = out / "metrics.jsonl"
    if ckpt.exists():  # resume
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"] + 1
        torch.set_rng_state(st["rng"])
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        metrics_path.write_text("".join(l + "\n" for l in lines[:start]))
    gen = torch.Generator().manual_seed(args.seed * 7919 + start)
    train_set = problems(args.num_problems, 12345)  # fixed small problem set (sanity test)
    held_out = problems(200, 999)
    rdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.rollout_dtype]
    rng = random.Random(args.seed * 31 + start)
    t_start = time.time()
    for step in range(start, args.steps):
        t0 = time.time()
        batch = rng.sample(train_set, args.prompts)
        gen_model = cast_copy(model, rdtype)
        ro = rollout(gen_model, batch, args.group, logit_noise=args.rollout_noise, generator=gen)
        t_roll = time.time() - t0
        adv = group_advantages(ro.rewards, args.group)
        N = ro.response.shape[0]
        with torch.no_grad():
            logits0 = response_logits(model, ro)
            old_logp = torch.log_softmax(logits0, -1).gather(-1, ro.response[..., None]).squeeze(-1)
            ent = -(torch.softmax(logits0, -1) * torch.log_softmax(logits0, -1)).sum(-1)
            entropy = float((ent * ro.response_mask).sum() / ro.response_mask.sum())
        topk_ids = None
        if K:
            rl = torch.log_softmax(ro.rollout_logits, -1)
            rtop, topk_ids = rl.topk(K, -1)
            in_topk = (topk_ids == ro.response[..., None]).any(-1)
        perm = torch.randperm(N, generator=gen)
        mbs = perm.chunk(args.grad_steps)
        agg: dict[str, list[float]] = {}
        first = None
        for j, idx in enumerate(mbs):
            logits = response_logits(model, ro, idx)
            lsm = torch.log_softmax(logits, -1)
            logp = lsm.gather(-1, ro.response[idx][..., None]).squeeze(-1)
            kw = {}
            if method.needs_old_logp:
                kw["old_logp"] = old_logp[idx]
            if K:
                kw.update(topk_logp=lsm.gather(-1, topk_ids[idx]), rollout_topk_logp=rtop[idx],
                          sampled_in_topk=in_topk[idx])
            loss, m = policy_loss(method, logp, ro.rollout_logp[idx], adv[idx], ro.response_mask[idx], **kw)
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            opt.zero_grad()
            if j == 0:
                first = m
            for k, v in m.items():
                agg.setdefault(k, []).append(v)
        # mismatch before any update on this batch: π_θ (fp32) vs μ (rollout engine), same parameters (Fig. 3)
        with torch.no_grad():
            pm = (old_logp.exp() - ro.rollout_logp.exp())[ro.response_mask]
        rec = dict(
            step=step, reward=float(ro.rewards.mean()), mismatch_abs_mean=float(pm.abs().mean()),
            mismatch_max=float(pm.max()), mismatch_min=float(pm.min()), entropy=entropy,
            response_len=float(ro.response_mask.sum(-1).float().mean()),
            **{f"{k}": float(sum(v) / len(v)) for k, v in agg.items() if k not in ("tokens",)},
            abs_diff_max_all=max(agg["abs_diff_max"]), time_rollout_s=t_roll, time_step_s=time.time() - t0,
        )
        rec["abs_diff_mean_first_mb"] = first["abs_diff_mean"] if first else None
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps - 1):
            model.eval()
            rec["heldout_acc"] = accuracy(model, held_out)
            rec["train_acc_greedy"] = accuracy(model, train_set)
            model.train()
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps - 1):
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, rng=torch.get_rng_state()),
                       ckpt)
    (out / "done.json").write_text(json.dumps(dict(steps=args.steps, wall_s=time.time() - t_start)))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one RL run → OUT/metrics.jsonl")
    t.add_argument("--method", default="dppo-binary-tv")
    t.add_argument("--method-overrides", default="", help='JSON, e.g. \'{"ratio_cap": 3}\'')
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=40, help="rollout batches")
    t.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch")
    t.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    t.add_argument("--grad-steps", type=int, default=4, help="optimizer steps per rollout batch (mini-batches)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--max-grad-norm", type=float, default=0.0)
    t.add_argument("--rollout-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    t.add_argument("--rollout-noise", type=float, default=0.0, help="std of Gaussian noise added to rollout logits")
    t.add_argument("--num-problems", type=int, default=64, help="size of the fixed training problem set")
    t.add_argument("--sft-steps", type=int, default=400)
    t.add_argument("--eval-every", type=int, default=10)
    t.add_argument("--checkpoint-every", type=int, default=5)
    t.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("sft", help="build the cached SFT warm-up model and print its accuracy")
    s.add_argument("--sft-steps", type=int, default=400)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        train(args)
    else:
        t0 = time.time()
        m = sft_model(args.sft_steps)
        m.eval()
        print(json.dumps(dict(sft_steps=args.sft_steps, heldout_acc=accuracy(m, problems(200, 999)),
                              train_acc=accuracy(m, problems(64, 12345)), wall_s=time.time() - t0)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
