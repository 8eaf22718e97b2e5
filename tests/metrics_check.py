"""Shared by the tests that compare two runs' metrics records (resume vs uninterrupted, LoRA resume, vLLM resume)."""

from __future__ import annotations

import math
import os

import pytest

from dppo.rundir.metrics_log import read_metrics

TIMING = ("time/", "tokens_per_s")  # wall-clock metrics: never equal between two runs


def metric_lines(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (empty before the file exists)."""
    return read_metrics(str(path)) if os.path.exists(path) else []


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    """Record by record: the same keys apart from timings, finite floats equal to rel 1e-6 (abs 1e-9), everything
    else exactly equal."""
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(TIMING)}
        assert keys == {k for k in rb if not k.startswith(TIMING)}, ra["step"]
        for k in keys:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and math.isfinite(va):
                assert vb == pytest.approx(va, rel=1e-6, abs=1e-9), (ra["step"], k)
            else:
                assert va == vb, (ra["step"], k)
