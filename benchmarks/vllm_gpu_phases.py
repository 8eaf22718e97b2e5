"""GPU memory per phase of `dppo train --engine vllm` on CUDA, with and without vLLM's sleep mode (issue 21's GPU
check; CUDA only).

    python3 benchmarks/vllm_gpu_phases.py --build 1.5b --out phases.json -- --device cuda --engine vllm --vllm_sleep 2
    torchrun --standalone --nproc_per_node 2 benchmarks/vllm_gpu_phases.py --build 1.5b --out phases.json -- \
        --device cuda --engine vllm --vllm_sleep 0

Everything after ``--`` is `dppo train`'s options (``--model`` may be left out with ``--build``). ``--build 1.5b``
saves a Qwen2.5-Math-1.5B-shaped model with random weights (1.54 B parameters, bf16 safetensors) and a character
tokenizer padded to its vocabulary into a temporary directory first (no download; rewards stay 0 on random weights,
which does not change the memory). The steps run in this process through dppo's Trainer (under torchrun one process
per GPU, as `dppo train` does). A thread samples the device's used memory (``torch.cuda.mem_get_info``: vLLM's
allocations included, which torch's allocator statistics do not see) every 10 ms and keeps each phase's peak:

    start-up   model load, FSDP sharding, engine start-up (and its first sleep)
    sync       the weights into the engine (waking them under sleep mode)
    generate   the rollout (the KV cache woken under sleep mode)
    asleep     right after the engine went back to sleep (its memory released: level 1 offloads, level 2 discards)
    train      forward/backward/AdamW of the step's updates

Writes one JSON (rank 0: every process's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time


class Sampler:
    def __init__(self, interval: float = 0.01):
        import torch

        self.torch, self.phase, self.peak, self.interval = torch, "start-up", {}, interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def used_gb(self) -> float:
        free, total = self.torch.cuda.mem_get_info()
        return (total - free) / 1e9

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            u = self.used_gb()
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), u)

    def enter(self, phase: str) -> None:
        u = self.used_gb()
        self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), u)
        self.phase = phase
        self.peak[phase] = max(self.peak.get(phase, 0.0), u)

    def stop(self) -> None:
        self._stop.set()


def build_15b(path: str) -> None:
    """Qwen2.5-Math-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV, MLP 8960, vocab 151936, tied), random."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dppo.hf.model import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+= ", vocab_size=151936)
    cfg = AutoConfig.for_model("qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                               tie_word_embeddings=True, max_position_embeddings=4096, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def main() -> int:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", choices=["1.5b"], default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(own)

    import torch

    from dppo.run.cli import parse_config
    from dppo.run.config import vllm_sleep_level
    from dppo.run.distributed import setup
    from dppo.run.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    if a.build:
        path = f"/tmp/dppo-vllm-phases-{a.build}"
        if rank == 0 and not os.path.isfile(os.path.join(path, "config.json")):
            build_15b(path)
        while not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            time.sleep(1)
        rest = ["--model", path, "--max_new_tokens", "256", "--prompts_per_step", "64", "--group_size", "8",
                "--micro_batch_size", "8", "--train_dtype", "bf16", "--gradient_checkpointing", *rest]
    cfg = parse_config(["--out", f"/tmp/dppo-vllm-phases-run-{os.getpid()}", "--steps", str(a.steps),
                        "--eval_every", "0", "--ckpt_every", "0", "--no-progress", "--no-plot", "--no-tensorboard",
                        *rest])
    s = Sampler()
    with setup(cfg) as dist:
        t0 = time.time()
        tr = Trainer(cfg, log=print if dist.is_main else (lambda m: None), dist=dist)
        startup = time.time() - t0
        s.enter("idle")
        eng = tr.engine
        gen, sleep, sync, updates = eng.generate, eng.sleep, tr._engine_weights, tr._updates

        def phased(name, fn):
            def run(*args, **kw):
                s.enter(name)
                try:
                    return fn(*args, **kw)
                finally:
                    s.enter("idle")
            return run

        def sleeping():
            sleep()
            s.enter("asleep")
            time.sleep(0.2)  # let the sampler see the released memory
            s.enter("idle")

        eng.generate, eng.sleep = phased("generate", gen), sleeping
        tr._engine_weights, tr._updates = phased("sync", sync), phased("train", updates)
        records = []
        for step in range(cfg.steps):
            rec = tr.step(step)
            records.append({k: v for k, v in rec.items() if k.startswith("time/") or k in ("step", "tokens")})
        tr.close()
        s.stop()
        mine = {"rank": dist.rank, "device": torch.cuda.get_device_name(), "startup_s": round(startup, 1),
                "peak_used_gb": {k: round(v, 2) for k, v in s.peak.items()}, "steps": records,
                "total_gb": round(torch.cuda.mem_get_info()[1] / 1e9, 1)}
        every = dist.gather_objects(mine)
        if dist.is_main:
            out = {"command": "python3 benchmarks/vllm_gpu_phases.py " + " ".join(argv),
                   "world_size": dist.world, "vllm_sleep": vllm_sleep_level(cfg), "processes": every}
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)
            print(json.dumps({r["rank"]: r["peak_used_gb"] for r in every}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
