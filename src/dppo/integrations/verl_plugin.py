"""verl's ``verl.plugins`` entry point for dppo (pyproject.toml), loaded by ``import verl``.

It imports :mod:`dppo.integrations.verl`, which registers ``dppo/<preset>`` in verl's policy-loss registry. verl 0.9.1
catches a plug-in that fails to import and logs it at DEBUG only, so the user would see nothing until the trainer
says "Unsupported loss mode: dppo/..."; here the failure becomes a warning at ``import verl`` that names its cause.
"""

import warnings

try:
    import dppo.integrations.verl  # noqa: F401  (registers the losses)
except Exception as e:  # noqa: BLE001 - any failure must reach the user, whatever it is
    warnings.warn(f"dppo's verl plug-in failed to import, so no dppo/* policy loss is registered (verl will report "
                  f"'Unsupported loss mode'): {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
