"""``dppo train`` and ``dppo plot``: argument parsing generated from the :class:`dppo.run.config.TrainConfig` dataclass,
so ``--help`` lists every field with its default and its help text (citations included)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing

from dppo.run.config import ConfigError, TrainConfig

__all__ = ["train_main", "plot_main", "build_parser", "parse_config"]


def _float(s: str) -> float:
    v = float(s)  # accepts "inf", "1e-6"
    if math.isnan(v):
        raise argparse.ArgumentTypeError("nan is not a valid value")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dppo train",
        description="RL fine-tuning with a divergence trust region (DPPO, arXiv 2602.04879). With no options: the "
        "built-in arithmetic task on a tiny Qwen3 model, CPU, no downloads. Starting again on the same --out resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        typ = hints[f.name]
        help_text = f.metadata.get("help", "").replace("%", "%%")
        kw: dict = {"default": f.default, "help": help_text}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ is float:
            kw["type"] = _float
            kw["metavar"] = "F"
        elif typ is int:
            kw["type"] = int
            kw["metavar"] = "N"
        else:
            kw["type"] = str
            if "choices" not in kw:
                kw["metavar"] = "S"
        p.add_argument(f"--{f.name}", **kw)
    return p


def parse_config(argv: list[str]) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    return TrainConfig(**vars(ns))


def train_main(argv: list[str]) -> int:
    from dppo.run.trainer import NonFiniteError, train

    cfg = parse_config(argv)
    try:
        train(cfg)
    except ConfigError as e:
        print(f"dppo train: configuration error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return 3
    return 0


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dppo plot", description="PNG curves of a run directory (from metrics.jsonl).")
    p.add_argument("run_dir", help="a run directory written by `dppo train`")
    p.add_argument("--out", default="", help="output PNG (default RUN_DIR/curves.png)")
    ns = p.parse_args(argv)
    from dppo.report.plot import plot_run

    try:
        path = plot_run(ns.run_dir, ns.out or None)
    except FileNotFoundError as e:
        print(f"dppo plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
