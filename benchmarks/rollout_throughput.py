"""Rollout throughput of the two engines on the same prompts and weights: generated tokens per second.

Each case samples G = 8 responses to each of 32 prompts (the default job's batch, 256 responses; 16 prompts for the
10M model) at temperature 1 with no stop token, so every response has exactly the asked length and both engines
generate the same number of tokens. Reported: generated tokens per CPU second of this process
(``time.process_time``, all its threads; the vLLM engine runs in-process) and per wall second, medians of 3 timed
calls (1 for the 10M model) after an untimed 4-token call (vLLM's first calls compile kernels), and the engine's
start time (HF: copying the model to the rollout dtype; vLLM: ``LLM(...)``). One thread by default: then CPU time
is what the wall time would be on an idle machine, and the figure does not depend on what else runs (the machine
this was written on was shared); the 1-minute load average is recorded beside it.

Models (random weights, saved with ``save_pretrained`` for vLLM, the same tensors for the HF engine):
  default  the default job's architecture: Qwen3, hidden 128, 3 layers, 4 heads (2 KV), vocabulary 16 (the
           arithmetic alphabet), 0.74 M parameters; prompts are the default job's "47+38=" problems;
  10M      Qwen3, hidden 256, 3 layers, 4 heads (2 KV), vocabulary 32,000, tied embeddings, 11.1 M parameters;
           prompts are 16 random token ids.

Engines: ``hf`` (dppo's own decode loop, one chunk of 256), ``vllm-eager`` (vLLM, ``enforce_eager=True``) and
``vllm`` (vLLM's default compiled mode; ~25 s start on a CPU). ``K`` is the number of top-K log-probs recorded per
token (0 for the binary methods, 20 for Top-K).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout_throughput.py     (≈ 15 min idle; needs vllm)
     --models 10M reruns one model and keeps the other's rows in the results file.
     --device cuda --engines hf   the HF engine on a GPU (results/rollout_throughput_cuda.json; tokens per wall s)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dppo.engines import HFEngine
from dppo.hf.model import build_char_tokenizer, build_tiny_model
from dppo.rollout import SamplingParams, encode_prompts
from dppo.rundir.machine import machine_info, machine_line

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_throughput.json"
G = 8


def models(tmp: str):
    tok = build_char_tokenizer("0123456789+=")
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    small = build_tiny_model(len(tok), hidden_size=128, num_layers=3, num_heads=4).eval()
    prompts = [f"{int(x)}+{int(y)}=" for x, y in torch.randint(0, 100, (32, 2), generator=g)]
    ids, mask = encode_prompts(tok, prompts, use_chat_template=False)
    torch.manual_seed(0)
    big = build_tiny_model(32_000, hidden_size=256, num_layers=3, num_heads=4, max_positions=256).eval()
    big_ids = torch.randint(3, 32_000, (16, 16), generator=g)
    out = []
    for name, model, ids, mask, lengths in (("default", small, ids, mask, (4, 64)),
                                            ("10M", big, big_ids, torch.ones_like(big_ids, dtype=torch.bool), (64,))):
        path = os.path.join(tmp, name)
        model.save_pretrained(path)
        out.append((name, model, path, ids, mask, lengths))
    return out


def make(engine: str, model, path: str, dtype: str, k: int, device: str = "cpu"):
    if engine == "hf":
        return HFEngine(model.to(device), eos_token_id=[], pad_token_id=0, dtype=dtype, batch_size=256)
    from dppo.engines.vllm import VLLMEngine

    return VLLMEngine(path, eos_token_id=[], pad_token_id=0, dtype=dtype, max_logprobs=max(20, k), max_model_len=128,
                      max_num_seqs=256, enforce_eager=engine == "vllm-eager")


def measure(eng, ids, mask, new_tokens: int, k: int, repeats: int) -> dict:
    t = time.perf_counter()  # untimed: vLLM compiles its kernels on its first calls; 4 tokens suffice
    eng.generate(ids, mask, SamplingParams(min(4, new_tokens), record_topk=k), num_samples=G)
    first = time.perf_counter() - t
    sp = SamplingParams(new_tokens, record_topk=k)
    wall, cpu, tokens = [], [], 0
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        ro = eng.generate(ids, mask, sp, num_samples=G, generator=torch.Generator().manual_seed(r))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        tokens = int(ro.response_mask.sum())
    return dict(tokens=tokens, tokens_per_cpu_s=tokens / statistics.median(cpu),
                tokens_per_s=tokens / statistics.median(wall), first_call_s=first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm-eager,vllm")
    ap.add_argument("--models", default="default,10M", help="a subset reruns those; the others' rows are kept")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (10M model: 1)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the HF engine only: vLLM's CPU build here)")
    a = ap.parse_args(argv)
    results = RESULTS if a.device == "cpu" else RESULTS.with_name(f"rollout_throughput_{a.device.split(':')[0]}.json")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    rows = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, path, ids, mask, lengths in models(tmp):
            if name not in a.models.split(","):
                continue
            n_params = sum(p.numel() for p in model.parameters())
            for engine in a.engines.split(","):
                for dtype, ks in (("bf16", (0, 20)), ("fp32", (0,))):
                    t = time.perf_counter()
                    eng = make(engine, model, path, dtype, max(ks), a.device)
                    start = time.perf_counter() - t
                    for new_tokens in lengths:
                        for k in ks:
                            r = dict(model=name, params=n_params, vocab=model.config.vocab_size, engine=engine,
                                     dtype=dtype, new_tokens=new_tokens, k=k, start_s=start,
                                     **measure(eng, ids.to(a.device), mask.to(a.device), new_tokens, k,
                                               1 if name == "10M" else a.repeats))
                            rows.append(r)
                            print(json.dumps(r), file=sys.stderr, flush=True)
                    if hasattr(eng, "close"):
                        eng.close()
                    load.append(os.getloadavg()[0])
    info = machine_info()
    if results.exists() and not a.no_write:  # keep the rows of the models not rerun
        old = json.loads(results.read_text())
        rows = [r for r in old["rows"] if r["model"] not in a.models.split(",")] + rows
        load = old["machine"].get("loadavg_1min_during_run", []) + load
    info["loadavg_1min_during_run"] = [round(x, 2) for x in load]
    print(f"\nMachine: {machine_line(info)}; 1-minute load average between engines "
          f"{min(load):.1f}–{max(load):.1f}.  \nCommand: `OMP_NUM_THREADS={threads} .venv/bin/python "
          f"benchmarks/rollout_throughput.py`\n")
    print("Generated tokens per CPU second (wall-clock tokens/s in brackets):\n")
    print("| model | params | V | response | K | rollout | hf | vllm-eager | vllm |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["model"], r["new_tokens"], r["k"], r["dtype"]) for r in rows},
                  key=lambda x: (x[0] != "default", x[1], x[3] != "bf16", x[2]))
    for mdl, n, k, dt in keys:
        sel = {r["engine"]: r for r in rows if (r["model"], r["new_tokens"], r["k"], r["dtype"]) == (mdl, n, k, dt)}
        any_r = next(iter(sel.values()))
        cells = [f"{sel[e]['tokens_per_cpu_s']:,.0f} ({sel[e]['tokens_per_s']:,.0f})" if e in sel else "–"
                 for e in ("hf", "vllm-eager", "vllm")]
        print(f"| {mdl} | {any_r['params'] / 1e6:.2f} M | {any_r['vocab']:,} | {n} | {k} | {dt} | " + " | ".join(cells)
              + " |")
    print("\nEngine start, wall seconds:\n")
    print("| engine | rollout | default model | 10M |")
    print("|---|---|---|---|")
    for e in a.engines.split(","):
        for dt in ("bf16", "fp32"):
            s = {r["model"]: r["start_s"] for r in rows if r["engine"] == e and r["dtype"] == dt}
            print(f"| {e} | {dt} | {s.get('default', float('nan')):.1f} | {s.get('10M', float('nan')):.1f} |")
    if not a.no_write:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(dict(rows=rows, machine=info), indent=1) + "\n")
        print(f"\nwrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
