"""Stale rollouts: step t's batch sampled with the policy of an earlier step (``--rollout_lag k``, ``--async_rollout k``).

Write w_j for the policy's weights at the start of step j (after j updates of whole steps; w_0 = the initial policy).
With staleness k,

    step t's batch  y ~ μ_{w_{max(t−k, 0)}}(·|x),   log μ recorded by the engine that sampled it
    the update      anchored to that μ (the trust region, the IS ratio π_θ/μ);  π_θ′ (recompute anchor) = w_t

so k = 0 is the on-policy rollout of the paper, and k = 1 is what a one-step-off asynchronous trainer samples (verl's
``one_step_off_policy``, prime-rl's ``max_off_policy_steps = 1``): the engine samples step t+1's batch while the
trainer trains on step t's, with w_t. :class:`WeightHistory` keeps the snapshots a run still needs, w_{t−k} … w_t,
as fp32 CPU copies (k + 1 copies of the model at most; :func:`dppo.engines.weights.snapshot`), and a checkpoint
stores those a resumed run will need, so a resumed stale run samples exactly what the uninterrupted one did.
"""

from __future__ import annotations

import torch

from dppo.engines.weights import snapshot

__all__ = ["WeightHistory"]


class WeightHistory:
    """Snapshots w_j of the policy, kept while a later step's rollout may still sample with them.

    ``lag`` k >= 1. ``share_memory``: snapshots live in shared memory (handed to a rollout worker process by handle).
    """

    def __init__(self, lag: int, *, share_memory: bool = False):
        if lag < 1:
            raise ValueError(f"WeightHistory needs a lag >= 1, got {lag}")
        self.lag = int(lag)
        self.share_memory = share_memory
        self._w: dict[int, dict[str, torch.Tensor]] = {}

    def version_for(self, step: int) -> int:
        """j = max(step − k, 0): the index of the weights step ``step``'s batch is sampled with."""
        return max(step - self.lag, 0)

    def push(self, step: int, policy: torch.nn.Module) -> None:
        """Record w_step (the policy now, at the start of step ``step``) unless it is recorded already, and forget the
        snapshots no step from ``step`` on samples with (j < step − k). Gathers a sharded policy: every process of a
        torchrun job calls it together."""
        if step not in self._w:
            self._w[step] = snapshot(policy, share_memory=self.share_memory)
        for j in [j for j in self._w if j < step - self.lag]:
            del self._w[j]

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        if version not in self._w:
            raise KeyError(f"the policy of step {version} is not kept (kept: {sorted(self._w)}); a resumed stale run "
                           "needs the snapshots of its checkpoint")
        return self._w[version]

    def state(self, done: int) -> dict[str, dict[str, torch.Tensor]]:
        """The snapshots a run resumed after ``done`` steps needs: w_j for max(done − k, 0) <= j < done (w_done is the
        checkpoint's model itself); keys are str(j) (a checkpoint holds plain types and tensors only)."""
        need = range(max(done - self.lag, 0), done)
        missing = [j for j in need if j not in self._w]
        if missing:
            raise RuntimeError(f"cannot checkpoint a stale run after step {done}: the policy of steps {missing} is "
                               "not kept")
        return {str(j): self._w[j] for j in need}

    def load(self, state: dict, done: int) -> None:
        """Restore :meth:`state` of a checkpoint taken after ``done`` steps."""
        need = set(range(max(done - self.lag, 0), done))
        have = {int(j) for j in state}
        if not need <= have:
            raise RuntimeError(f"the checkpoint of step {done} holds the policy of steps {sorted(have)}, a run with "
                               f"--rollout_lag {self.lag} needs {sorted(need)}: was it written with another lag?")
        self._w = {}
        for j, w in state.items():
            if int(j) in need:
                if self.share_memory:
                    w = {n: t.share_memory_() for n, t in w.items()}
                self._w[int(j)] = w
