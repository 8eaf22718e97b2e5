"""Training–inference mismatch by rollout precision, with and without an fp32 lm head (``--rollout_fp32_head``).

For each model, one batch of prompts is sampled by a low-precision HFEngine (bf16 or fp16 copy of the policy, lm head
rounded like the body, or computed in fp32 from the upcast hidden state), and the fp32 policy scores the same tokens
with ``response_stats``. Reported over the sampled tokens: mean and max |π − μ| and mean |log π − log μ|.

Models:
  default-job  the default job's warm-up model (tiny Qwen3, hidden 128, vocabulary 16), built by ``dppo train``'s
               warm-up on first use (cached, ~2 min).
  wide-vocab   a tiny Qwen3 (hidden 128, 2 layers) with a 32,768-token vocabulary, random weights, the tied
               embedding scaled so logits have std ≈ 4 (peaked next-token distributions, as a trained LLM's are):
               the setting where bf16 logits lose the most, since each logit is rounded to 8 significant bits.

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rollout_precision.py      (≈ 1 min once the warm-up is cached)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dppo.run.config import make_config
from dppo.rundir.machine import machine_info, machine_line
from dppo.hf.model import build_tiny_model, load_model, response_stats
from dppo.engines import HFEngine
from dppo.rollout import SamplingParams, encode_prompts
from dppo.run.warmup import warm_start_for

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_precision.json"


def wide_vocab_model(vocab: int = 32_768, logit_std: float = 4.0):
    torch.manual_seed(0)
    model = build_tiny_model(vocab, hidden_size=128, num_layers=2, num_heads=4).eval()
    # An untied head with logit std ≈ logit_std (the final RMSNorm output has norm ≈ √H). Tied to the embedding, the
    # residual stream would make every position predict its own input token with p ≈ 1.
    h = model.config.hidden_size
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, h) * logit_std / h**0.5)
    return model


def mismatch(model, ids, mask, eos, pad, dtype: str, fp32_head: bool, new_tokens: int) -> dict:
    eng = HFEngine(model, eos_token_id=eos, pad_token_id=pad, dtype=dtype, fp32_head=fp32_head)
    ro = eng.generate(ids, mask, SamplingParams(new_tokens), num_samples=8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        st = response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0)
    m = ro.response_mask
    d = (st.logp.exp() - ro.rollout_logp.exp()).abs()[m]
    dl = (st.logp - ro.rollout_logp).abs()[m]
    return dict(dtype=dtype, fp32_head=fp32_head, tokens=int(m.sum()), abs_diff_mean=float(d.mean()),
                abs_diff_max=float(d.max()), abs_dlogp_mean=float(dl.mean()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    cases = []
    model, tok = load_model(warm_start_for(make_config(), log=lambda m: print(m, file=sys.stderr)))
    g = torch.Generator().manual_seed(7)
    prompts = [f"{int(x)}+{int(y)}=" for x, y in torch.randint(0, 100, (64, 2), generator=g)]
    ids, mask = encode_prompts(tok, prompts, use_chat_template=False)
    cases.append(("default-job", model.eval(), ids, mask, tok.eos_token_id, tok.pad_token_id, 6))
    wide = wide_vocab_model()
    ids = torch.randint(3, wide.config.vocab_size, (64, 8), generator=g)
    cases.append(("wide-vocab", wide, ids, torch.ones_like(ids, dtype=torch.bool), 2, 0, 16))
    rows = []
    for name, mdl, ids, mask, eos, pad, n_new in cases:
        for dtype in ("bf16", "fp16"):
            for fh in (False, True):
                m = mismatch(mdl, ids, mask, eos, pad, dtype, fh, n_new)
                r = dict(model=name, vocab=mdl.config.vocab_size, **m)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    info = machine_info()
    print(f"\nMachine: {machine_line(info)}.  \nCommand: `OMP_NUM_THREADS=2 .venv/bin/python "
          f"benchmarks/rollout_precision.py`\n")
    print("| model | V | rollout | lm head | tokens | mean \\|π−μ\\| | max \\|π−μ\\| | mean \\|log π − log μ\\| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['vocab']:,} | {r['dtype']} | {'fp32' if r['fp32_head'] else r['dtype']} "
              f"| {r['tokens']} | {r['abs_diff_mean']:.2e} | {r['abs_diff_max']:.2e} | {r['abs_dlogp_mean']:.2e} |")
    if not a.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(dict(rows=rows, machine=info), indent=1) + "\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
