"""Streaming fused linear cross-entropy in plain JAX: the ``impl="xla"`` backend.

It runs on every platform. ``forward`` / ``backward`` follow the same contract as
the Pallas backends in ``pallas_kernels.linear_cross_entropy``; the custom VJP
that joins them to the loss lives in :mod:`logitlab.linear`.

The ``[N, V]`` logits never exist. The forward pass walks vocabulary tiles for
each token tile (:func:`logitlab._tiling.per_token_tile`), keeping a float32
running max / sum-of-exponentials (online log-sum-exp) and the label logit. The
backward pass recomputes each logit tile from the saved per-token ``lse`` (the
only new residual, ``O(N)``) and accumulates ``d_hidden += g @ W_tile`` and
``d_W_tile = g^T @ hidden`` in float32, with ``g = dloss/dz`` from
:mod:`logitlab._ce`; the loop is the generic :func:`logitlab._tiling.head_backward`,
shared with the fused distillation loss.

Ragged sizes need no padding copy of ``hidden`` or ``weight``: the last tile is
shifted back to end at the array's edge, and the rows / columns it shares with
the tile before are masked out of every sum.

References:
  Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models (Cut
  Cross-Entropy), arXiv:2411.09009.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from logitlab import _ce
from logitlab import _tiling as tiling

DEFAULT_BLOCK_TOKENS = 1024
DEFAULT_BLOCK_VOCAB = 1024


def forward(hidden, weight, bias, labels, *, softcap, with_logit_sum,
            block_tokens=None, block_vocab=None):
  """Per-token float32 ``(lse, label_logit, logit_sum)`` of ``cap(hidden @ weight.T + bias)``.

  ``logit_sum`` is zeros unless ``with_logit_sum``. Shapes: hidden [N, D], weight
  [V, D], bias [V] or None, labels [N].
  """
  rows = tiling.Tiles.over(hidden.shape[0], block_tokens or DEFAULT_BLOCK_TOKENS)
  cols = tiling.Tiles.over(weight.shape[0], block_vocab or DEFAULT_BLOCK_VOCAB)
  refs = (hidden, weight, bias, labels)

  def token_tile(i):
    h, y = rows.take(hidden, i), rows.take(labels, i)

    def vocab_tile(j, stats):
      run_max, run_sum, label_logit, logit_sum = stats
      c0 = cols.start(j)
      fresh = cols.fresh(j, c0)
      z = tiling.tile_logits(h, *cols.take_many(j, weight, bias), softcap)
      run_max, run_sum = tiling.online_logsumexp(run_max, run_sum, jnp.where(fresh, z, -jnp.inf))
      is_label = fresh & (c0 + jnp.arange(cols.block) == y[:, None])
      label_logit += jnp.sum(jnp.where(is_label, z, 0.0), axis=1)
      if with_logit_sum:
        logit_sum += jnp.sum(jnp.where(fresh, z, 0.0), axis=1)
      return run_max, run_sum, label_logit, logit_sum

    zeros = jnp.zeros((rows.block,), jnp.float32)
    init = tiling.varying_like((jnp.full((rows.block,), -jnp.inf), zeros, zeros, zeros), *refs)
    run_max, run_sum, label_logit, logit_sum = lax.fori_loop(0, cols.count, vocab_tile, init)
    return tiling.finish_logsumexp(run_max, run_sum), label_logit, logit_sum

  return tiling.per_token_tile(rows, token_tile, 3, refs)


def backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off, z_loss,
             softcap, filter_eps, block_tokens=None, block_vocab=None):
  """``(d_hidden, d_weight, d_bias)`` for ``g = dL/dz`` recomputed tile by tile::

    g = where(valid, (p_scale * softmax(z) - d_loss * (on * onehot(labels) + off)) * cap'(z), 0)
    d_hidden = g @ weight,  d_weight = g^T @ hidden,  d_bias = sum_n g (float32; None without bias)

  With ``filter_eps``, a tile whose every ``|(1 + 2 z_loss lse) softmax - target|`` is
  below it is skipped (Cut Cross-Entropy's gradient filtering). The loop itself is
  :func:`logitlab._tiling.head_backward`; this function supplies the tile's ``g``.
  """
  rows = tiling.Tiles.over(hidden.shape[0], block_tokens or DEFAULT_BLOCK_TOKENS)
  cols = tiling.Tiles.over(weight.shape[0], block_vocab or DEFAULT_BLOCK_VOCAB)
  lse_scale = 1.0 + 2.0 * z_loss * lse

  def tile_dlogits(i, j, z, keep):
    z = _ce.cap(z, softcap)
    keep = keep & rows.take(valid, i)[:, None]
    probs = jnp.exp(z - rows.take(lse, i)[:, None])
    col_ids = cols.start(j) + jnp.arange(cols.block)
    target = (col_ids == rows.take(labels, i)[:, None]) * on + off
    g = rows.take(p_scale, i)[:, None] * probs - rows.take(d_loss, i)[:, None] * target
    g = jnp.where(keep, g * _ce.cap_derivative(z, softcap), 0.0)
    if filter_eps is None:
      return g, None
    # Cut Cross-Entropy's gradient filtering: skip a tile whose every entry of
    # dloss/dz (before the upstream cotangent) is below filter_eps.
    unscaled = jnp.where(keep, rows.take(lse_scale, i)[:, None] * probs - target, 0.0)
    return g, jnp.max(jnp.abs(unscaled)) < filter_eps

  return tiling.head_backward(hidden, weight, bias, tile_dlogits, rows=rows, cols=cols,
                              refs=(labels, valid, d_loss, p_scale))
