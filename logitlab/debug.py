"""Opt-in run-time value checks that work under ``jax.jit``.

Shape and dtype errors are caught at trace time, always. Value errors (a label
outside ``[0, V)``, a NaN in the hidden states) cannot be seen at trace time, and
checking them costs a device-to-host round trip, so they are opt-in::

  with logitlab.debug_checks():
    loss = jax.jit(train_step)(params, batch)   # raises on bad values

or ``LOGITLAB_DEBUG=1`` in the environment before ``logitlab`` is imported.
Inside a jitted function the error surfaces as ``jax.errors.JaxRuntimeError``
whose message contains the logitlab message. Entering and leaving the context
clears JAX's compilation caches, so functions traced before are traced again
with (or without) the checks, never silently stale.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp

_enabled = os.environ.get("LOGITLAB_DEBUG", "0").lower() not in ("", "0", "false")


def enabled() -> bool:
  """Whether value checks are inserted into functions traced now."""
  return _enabled


@contextlib.contextmanager
def debug_checks(enable: bool = True):
  """Context manager that turns the run-time value checks on (or off)."""
  global _enabled
  previous = _enabled
  _enabled = enable
  jax.clear_caches()
  try:
    yield
  finally:
    _enabled = previous
    jax.clear_caches()


def _raise_if(bad, count, example, *, message):
  if bad:
    raise ValueError(message.format(count=int(count), example=example))


def check_labels(fn: str, labels: jax.Array, valid: jax.Array, num_classes: int) -> None:
  """Checks (when enabled) that every unmasked label lies in ``[0, num_classes)``."""
  if not _enabled:
    return
  bad = (valid & ((labels < 0) | (labels >= num_classes))).ravel()
  jax.debug.callback(
      _raise_if, jnp.any(bad), jnp.sum(bad), labels.ravel()[jnp.argmax(bad)],
      message=(f"{fn}: {{count}} unmasked label(s) outside [0, {num_classes}), "
               "e.g. {example}; mask them with `where` or `ignore_index`."))


def check_finite(fn: str, **arrays: jax.Array | None) -> None:
  """Checks (when enabled) that each named array holds only finite values."""
  if not _enabled:
    return
  for name, x in arrays.items():
    if x is None:
      continue
    bad = ~jnp.isfinite(x)
    jax.debug.callback(
        _raise_if, jnp.any(bad), jnp.sum(bad), jnp.argmax(bad.ravel()),
        message=(f"{fn}: `{name}` of shape {x.shape} holds {{count}} non-finite "
                 "value(s), the first at flat index {example}."))
