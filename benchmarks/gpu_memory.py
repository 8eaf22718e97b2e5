"""Measured GPU memory of one dppo training step of a Qwen2.5-1.5B-shaped model (random weights, no download),
against the README's memory planning arithmetic.

The model is built from a config with Qwen2.5-Math-1.5B's shape (28 layers, hidden 1536, 12 heads / 2 KV heads,
intermediate 8960, vocabulary 151,936, tied embeddings) in fp32 on the GPU, trained with AdamW (fp32 states) as
`dppo train --train_dtype bf16` does: bf16 autocast forward, the response hidden states of one micro-batch
(dppo.hf.model.response_hidden_states, prompts shared across each group of 8), the fused policy loss
(dppo.policy_loss_from_hidden, "dppo-binary-tv-scaling") and an optimiser step. Reported after the second step (AdamW
states allocated): the persistent state (weights + gradients + AdamW moments) and the peak allocated memory of the
step, with and without gradient checkpointing, for 8 responses of --response_len tokens after a --prompt_len prompt.

    python benchmarks/gpu_memory.py --out benchmarks/results/gpu_memory.json      # ~1 min on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from dppo import policy_loss_from_hidden  # noqa: E402
from dppo.hf.model import (  # noqa: E402
    decoder_and_head, enable_gradient_checkpointing, response_hidden_states, training_mode,
)


DEV = "cuda"


def build(layers: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model


def step(model, opt, ids, mask, t, g, ckpt_modules):
    body, head = decoder_and_head(model)
    n = ids.shape[0]
    # the trainer's forward: prompts shared within a group, except under checkpointing (no KV cache there)
    share = None if ckpt_modules else torch.arange(n, device=DEV) // g
    with torch.autocast(DEV, dtype=torch.bfloat16), training_mode(ckpt_modules):
        h = response_hidden_states(body, ids, mask, t, prompt_index=share)
    resp = ids[:, -t:]
    loss, _ = policy_loss_from_hidden("dppo-binary-tv-scaling", h.float(), head.weight, resp,
                                      torch.full(resp.shape, -1.0, device=DEV),
                                      torch.randn(n, device=DEV), torch.ones_like(resp, dtype=torch.bool))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop that keeps them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--responses", type=int, default=8, help="responses per micro-batch (one group)")
    ap.add_argument("--prompt_len", type=int, default=200)
    ap.add_argument("--response_len", type=int, default=3000)
    ap.add_argument("--out", default="benchmarks/results/gpu_memory.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (no memory figures)")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    cuda = DEV == "cuda"
    res = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__, args=vars(a),
               rows=[])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for ckpt in (False, True):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build(a.layers)
        n_params = sum(p.numel() for p in model.parameters())
        mods = enable_gradient_checkpointing(model) if ckpt else []
        model.eval()  # as the trainer: no dropout; training_mode switches checkpointing on around the forward
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        g = torch.Generator(device=DEV).manual_seed(0)
        ids = torch.randint(0, 151_936, (a.responses, a.prompt_len + a.response_len), generator=g, device=DEV)
        ids[:, : a.prompt_len] = ids[:1, : a.prompt_len]  # one group: the same prompt
        mask = torch.ones_like(ids, dtype=torch.bool)
        row = dict(gradient_checkpointing=ckpt, params=n_params)
        try:
            step(model, opt, ids, mask, a.response_len, a.responses, mods)  # allocates gradients, AdamW moments
            sync()
            state = torch.cuda.memory_allocated() if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(model, opt, ids, mask, a.response_len, a.responses, mods)
            sync()
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            row.update(step_s=time.perf_counter() - t0, state_gb=state / 1e9, peak_gb=peak / 1e9,
                       activations_gb=(peak - state) / 1e9, predicted_state_gb=16 * n_params / 1e9)
        except torch.cuda.OutOfMemoryError as e:
            row.update(error=f"out of memory: {str(e)[:200]}")
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        del model, opt
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
