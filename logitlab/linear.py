"""Cross-entropy fused with the output layer: ``loss(hidden @ weight.T + bias, labels)``.

The public entry point validates arguments, applies masks and ``shift``, and
dispatches to an implementation. Implementations (``impl``):

* ``"xla"``: :mod:`logitlab._linear_xla`, a streaming ``jax.custom_vjp`` in plain
  JAX that runs on every backend and never builds the ``[N, V]`` logits.
* ``"auto"``: the best implementation for the platform; today always ``"xla"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from logitlab import _ce
from logitlab import _linear_xla
from logitlab import _validation as v
from logitlab import debug

IMPLEMENTATIONS = ("auto", "xla")
DEFAULT_BLOCK_TOKENS = 1024
DEFAULT_BLOCK_VOCAB = 1024


def _shift_left(x: jax.Array, shift: int, fill) -> jax.Array:
  """``x[..., t + shift]`` at position ``t``, ``fill`` past the end (last axis)."""
  kept = x[..., shift:]
  pad = jnp.full(x.shape[:-1] + (x.shape[-1] - kept.shape[-1],), fill, x.dtype)
  return jnp.concatenate([kept, pad], axis=-1)


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    smoothing: str = "uniform",
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    return_lse: bool = False,
    filter_eps: float | None = None,
    impl: str = "auto",
    block_tokens: int | None = None,
    block_vocab: int | None = None,
):
  r"""Per-token cross-entropy of a linear head without materializing the logits.

  Equal to ``cross_entropy(hidden @ weight.T + bias, labels, ...)`` with the same
  options (see :func:`logitlab.cross_entropy` for the smoothing conventions,
  z-loss and softcap), computed by streaming over vocabulary tiles with a
  float32 online log-sum-exp::

    z = softcap(hidden @ weight.T + bias)            # never stored, [N, V]
    loss_n = lse_n - sum_v q_{n,v} z_{n,v} + sum_v q log q + z_loss * lse_n**2

  Memory beyond inputs and gradients is ``O(N * D + tiles)`` instead of
  ``O(N * V)``; the backward recomputes logit tiles (8 N D V FLOPs in all,
  against 6 N D V for the materialized form) and keeps only ``lse`` as residual.

  Args:
    hidden: ``[..., D]`` float hidden states (any leading shape; with ``shift``
      the last leading axis is the sequence).
    weight: ``[V, D]`` output embedding, one row per class (the layout of
      ``nn.Embed`` / a tied embedding; transpose a ``[D, V]`` kernel first).
    labels: ``[...]`` integer labels, ``hidden.shape[:-1]``.
    bias: optional ``[V]`` bias.
    where: boolean mask broadcastable to ``labels.shape``; False positions give
      loss 0 and gradient 0.
    ignore_index: label value that marks a position as masked (e.g. -100).
    label_smoothing, smoothing, z_loss, softcap: as in :func:`logitlab.cross_entropy`.
    shift: predict the ``shift``-th next token: position ``t`` is scored on
      ``labels[..., t + shift]`` (and ``where`` / ``ignore_index`` are read there);
      the last ``shift`` positions give 0. ``hidden`` is not copied.
    return_lse: also return the per-token log-sum-exp (0 where masked).
    filter_eps: Cut Cross-Entropy's gradient filtering: in the backward, skip a
      tile whose every ``|dloss/dz|`` is below this (e.g. ``2**-12`` for bf16).
      Approximate; None (default) is exact.
    impl: ``"auto"`` or ``"xla"`` (the streaming plain-JAX path).
    block_tokens, block_vocab: tile sizes of the token and vocabulary loops
      (defaults 1024 and 1024; clipped to N and V).

  Returns:
    float32 losses of ``labels.shape``; with ``return_lse``, ``(loss, lse)``.

  Example:
    >>> import jax, jax.numpy as jnp, logitlab
    >>> h = jax.random.normal(jax.random.key(0), (4, 8))
    >>> w = jax.random.normal(jax.random.key(1), (11, 8))
    >>> y = jnp.array([1, 5, 0, 10])
    >>> fused = logitlab.linear_cross_entropy(h, w, y)
    >>> bool(jnp.allclose(fused, logitlab.cross_entropy(h @ w.T, y), atol=1e-5))
    True

  References:
    Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models,
    arXiv:2411.09009.
  """
  fn = "linear_cross_entropy"
  hidden = v.float_array(fn, "hidden", hidden)
  weight = v.float_array(fn, "weight", weight)
  labels = v.int_array(fn, "labels", labels)
  if weight.ndim != 2:
    raise ValueError(f"{fn}: `weight` must be [V, D], got shape {weight.shape}.")
  if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
    raise ValueError(f"{fn}: `hidden` must be [..., D] with D = weight.shape[1] = "
                     f"{weight.shape[1]}, got hidden shape {hidden.shape} and weight shape "
                     f"{weight.shape}.")
  num_classes = weight.shape[0]
  if num_classes == 0:
    raise ValueError(f"{fn}: `weight` has no rows (shape {weight.shape}).")
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(f"{fn}: `labels` of shape {labels.shape} must equal hidden.shape[:-1] = "
                     f"{hidden.shape[:-1]}.")
  if bias is not None:
    bias = v.float_array(fn, "bias", bias)
    if bias.shape != (num_classes,):
      raise ValueError(f"{fn}: `bias` must have shape ({num_classes},) to match weight shape "
                       f"{weight.shape}, got {bias.shape}.")
  options = _ce.Options.create(fn, label_smoothing=label_smoothing, smoothing=smoothing,
                               z_loss=z_loss, softcap=softcap)
  options.check_num_classes(fn, num_classes)
  shift = v.static_int(fn, "shift", shift, minimum=0)
  if shift and labels.ndim == 0:
    raise ValueError(f"{fn}: `shift`={shift} needs a sequence axis, but `labels` is a scalar.")
  if filter_eps is not None:
    filter_eps = v.static_number(fn, "filter_eps", filter_eps, minimum=0.0, min_open=True)
  v.choice(fn, "impl", impl, IMPLEMENTATIONS)
  config = _linear_xla.Config(
      options=options,
      block_tokens=v.static_int(fn, "block_tokens", DEFAULT_BLOCK_TOKENS if block_tokens is None
                                else block_tokens, minimum=1),
      block_vocab=v.static_int(fn, "block_vocab", DEFAULT_BLOCK_VOCAB if block_vocab is None
                               else block_vocab, minimum=1),
      filter_eps=filter_eps)

  valid = jnp.ones(labels.shape, bool) if where is None else v.bool_mask(fn, "where", where, labels.shape)
  valid = v.label_mask(fn, labels, valid, ignore_index)
  if shift:
    labels, valid = _shift_left(labels, shift, 0), _shift_left(valid, shift, False)
  debug.check_labels(fn, labels, valid, num_classes)
  debug.check_finite(fn, hidden=hidden, weight=weight, bias=bias)

  if labels.size == 0:
    loss = lse = jnp.zeros(labels.shape, jnp.float32)
  else:
    loss, lse = _linear_xla.fused_cross_entropy(
        config, hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        labels.reshape(-1), valid.reshape(-1))
    loss, lse = loss.reshape(labels.shape), lse.reshape(labels.shape)
  return (loss, lse) if return_lse else loss
