"""dppo's losses inside trainers people already run.

* :mod:`dppo.integrations.trl`: ``DPPOConfig`` / ``DPPOTrainer``, a TRL ``GRPOTrainer`` whose loss is
  :func:`dppo.policy_loss` (``pip install -e '.[trl]'`` in a dppo clone).
* :mod:`dppo.integrations.verl`: dppo's presets in verl's policy-loss registry as ``dppo/<preset>`` (a ``verl.plugins``
  entry point, :mod:`dppo.integrations.verl_plugin`, loaded by ``import verl``).

Neither module is imported here: each needs its peer installed.
"""
