"""``dppo train`` and ``dppo plot``: the train command line is :class:`dppo.run.config.TrainConfig` parsed by tyro,
so ``--help`` lists every field with its default and its help text (citations included)."""

from __future__ import annotations

import argparse
import sys

from dppo.run.config import EXIT, ConfigError, TrainConfig, flat_names, load_config

__all__ = ["train_main", "plot_main", "parse_config", "EXIT"]


def parse_config(argv: list[str]) -> TrainConfig:
    """``TrainConfig`` from command-line arguments; ``--config FILE`` (anywhere) loads a saved config first and the
    other arguments override it."""
    import tyro

    argv = list(argv)
    base = TrainConfig()
    for flag in ("--config",):
        while flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path: dppo train --config RUN/config.json [--flag value ...]")
            base = load_config(argv[i + 1], base)
            del argv[i: i + 2]
    dotted = {path: flat for flat, path in flat_names().items()}
    for a in argv:  # the section.field spelling of an earlier version: say the one name there is
        key = a[2:].partition("=")[0] if a.startswith("--") else ""
        if key in dotted:
            raise ConfigError(f"--{key}: the flag is --{dotted[key]} (every option has one flat name; the section "
                              f"{key.split('.')[0]!r} is only its group in dppo train --help)")
    return tyro.cli(TrainConfig, args=argv, default=base, prog="dppo train", use_underscores=True)


def train_main(argv: list[str]) -> int:
    from dppo.checkpoint import CheckpointLoadError, CheckpointWriteError
    from dppo.rollout import RolloutEngineError
    from dppo.run.distributed import ProcessLost
    from dppo.run.loop import NonFiniteError, Preempted, train
    from dppo.tasks.scoring import RewardError

    try:
        cfg = parse_config(argv)
        train(cfg)
    except ConfigError as e:
        print(f"dppo train: configuration error: {e}", file=sys.stderr)
        return EXIT["config"]
    except NonFiniteError as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["nonfinite"]
    except CheckpointWriteError as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["checkpoint_write"]
    except CheckpointLoadError as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["checkpoint_load"]
    except RewardError as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["bad_reward"]
    except ProcessLost as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["process_lost"]
    except RolloutEngineError as e:  # the engine failed mid-rollout, or the --async_rollout worker died
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["rollout_engine"]
    except Preempted as e:
        print(f"dppo train: {e}", file=sys.stderr)
        return EXIT["preempted"]
    return EXIT["ok"]


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
