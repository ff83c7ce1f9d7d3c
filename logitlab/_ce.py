"""The cross-entropy algebra shared by every implementation.

With logits ``z`` over ``V`` classes, ``lse = logsumexp(z)`` and label ``y``,
every supported loss is the KL divergence from a smoothed target ``q`` to
``softmax(z)`` plus an optional z-loss::

  q_c  = on * [c == y] + off                 (sum_c q_c = 1)
  loss = lse - on * z_y - off * sum_c z_c + sum_c q_c log q_c + z_loss * lse**2
  dloss/dz_c = (1 + 2 * z_loss * lse) * softmax(z)_c - on * [c == y] - off

so a forward pass needs only ``lse``, ``z_y`` and ``sum_c z_c`` per row, which is
what lets the fused head stream over vocabulary tiles.

Conventions (see ``label_smoothing`` / ``smoothing`` in the public functions):
  * ``"uniform"`` (PyTorch, Liger): ``(1 - eps) CE + eps * mean_c(-log p_c)``,
    i.e. ``on = 1 - eps``, ``off = eps / V``, no entropy term.
  * ``"t5x"``: ``1 - eps`` on the label, ``eps / (V - 1)`` on each other class,
    minus the entropy of that target (a perfect fit scores 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from logitlab import _validation as v


def cap(z: jax.Array, softcap: float | None) -> jax.Array:
  """Applies the softcap ``c * tanh(z / c)`` (identity when ``softcap`` is None)."""
  return z if softcap is None else softcap * jnp.tanh(z / softcap)


def cap_derivative(capped: jax.Array, softcap: float | None):
  """``d cap(z) / dz`` in terms of the capped value: ``1 - (cap / c)**2`` (1 without a cap)."""
  return 1.0 if softcap is None else 1.0 - jnp.square(capped / softcap)


@dataclasses.dataclass(frozen=True)
class Options:
  """Validated, static loss options (hashable, so usable as a jit static)."""
  label_smoothing: float = 0.0
  smoothing: str = "uniform"
  z_loss: float = 0.0
  softcap: float | None = None

  @classmethod
  def create(cls, fn: str, *, label_smoothing, smoothing, z_loss, softcap) -> "Options":
    return cls(
        label_smoothing=v.static_number(fn, "label_smoothing", label_smoothing,
                                        minimum=0.0, maximum=1.0),
        smoothing=v.choice(fn, "smoothing", smoothing, v.SMOOTHING_CONVENTIONS),
        z_loss=v.static_number(fn, "z_loss", z_loss, minimum=0.0),
        softcap=None if softcap is None else v.static_number(
            fn, "softcap", softcap, minimum=0.0, min_open=True),
    )

  def check_num_classes(self, fn: str, num_classes: int) -> None:
    if self.smoothing == "t5x" and self.label_smoothing > 0 and num_classes < 2:
      raise ValueError(f"{fn}: smoothing='t5x' spreads mass over V - 1 classes and "
                       f"needs V >= 2, got V={num_classes}.")

  @property
  def needs_logit_sum(self) -> bool:
    return self.label_smoothing > 0

  def cap(self, z: jax.Array) -> jax.Array:
    return cap(z, self.softcap)

  def target_weights(self, num_classes):
    """Returns ``(on, off, sum_c q_c log q_c)`` of the smoothed target ``q``.

    ``num_classes`` may be an array (classes selected per row by a mask); under
    t5x a row with a single class has nowhere to spread ``eps`` and keeps the
    one-hot target.
    """
    eps = self.label_smoothing
    if self.smoothing == "uniform":
      return 1.0 - eps, eps / num_classes, 0.0
    eps = jnp.where(num_classes > 1, eps, 0.0)
    others = jnp.maximum(num_classes - 1, 1)
    off = eps / others
    # eps * log(eps / others) written so a tiny eps cannot underflow off to 0 (log 0).
    neg_entropy = xlogy(1.0 - eps, 1.0 - eps) + xlogy(eps, eps) - eps * jnp.log(others)
    return 1.0 - eps - off, off, neg_entropy

  def loss(self, lse, label_logit, logit_sum, num_classes) -> jax.Array:
    """Per-row loss from ``lse``, ``z_y`` and ``sum_c z_c`` (unused without smoothing)."""
    loss = lse - label_logit
    if self.needs_logit_sum:
      on, off, neg_entropy = self.target_weights(num_classes)
      loss = lse - on * label_logit - off * logit_sum + neg_entropy
    if self.z_loss:
      loss = loss + self.z_loss * jnp.square(lse)
    return loss
