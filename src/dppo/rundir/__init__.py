"""The run directory's files, read and written by the recipe (:mod:`dppo.run`) and the reports (:mod:`dppo.report`)
alike, below both: ``metrics.jsonl`` (:mod:`dppo.rundir.metrics_log`), ``machine.jsonl``
(:mod:`dppo.rundir.machine`), ``config.json`` and ``method.json`` (here, as plain JSON: what a report needs of them
without building a :class:`dppo.run.config.TrainConfig`)."""

from __future__ import annotations

import json
import os

__all__ = ["read_config_json", "write_method_json", "read_method_json", "run_title"]


def _read_json(run_dir: str, name: str) -> dict | None:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_config_json(run_dir: str) -> dict | None:
    """``RUN/config.json`` as written by ``dppo train`` (nested sections), or None if the run has none."""
    return _read_json(run_dir, "config.json")


def write_method_json(run_dir: str, method: dict) -> None:
    """``RUN/method.json``: the resolved method (:meth:`dppo.methods.Method.to_dict`) the run trained with."""
    with open(os.path.join(run_dir, "method.json"), "w") as f:
        json.dump(method, f, indent=2)


def read_method_json(run_dir: str) -> dict | None:
    """``RUN/method.json`` (:meth:`dppo.methods.method_from_dict` rebuilds the Method), or None."""
    return _read_json(run_dir, "method.json")


def run_title(run_dir: str) -> str:
    """"method · task · model · seed N" from ``config.json`` (the run directory's name if it has none)."""
    c = read_config_json(run_dir)
    try:
        model = os.path.basename((c["model"]["path"] or "").rstrip("/")) or f"tiny {c['model']['arch']}"
        return f"{c['method']['name']} · {c['task']['name']} · {model} · seed {c['seed']}"
    except (KeyError, TypeError):  # no config.json, or the flat one of older runs
        return run_dir
