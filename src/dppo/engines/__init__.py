"""Rollout engines: sample G responses per prompt and return a :class:`dppo.rollout.Rollout`."""

from dppo.engines.hf import HFEngine

__all__ = ["HFEngine"]
