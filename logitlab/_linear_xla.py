"""Streaming fused linear cross-entropy in plain JAX: the ``impl="xla"`` backend.

It runs on every platform. ``forward`` / ``backward`` follow the same contract as
the Pallas backends in ``pallas_kernels.linear_cross_entropy``; the custom VJP
that joins them to the loss lives in :mod:`logitlab.linear`.

The ``[N, V]`` logits never exist. The forward pass walks vocabulary tiles for
each token tile, keeping a float32 running max / sum-of-exponentials (online
log-sum-exp) and the label logit. The backward pass recomputes each logit tile
from the saved per-token ``lse`` (the only new residual, ``O(N)``) and
accumulates ``d_hidden += g @ W_tile`` and ``d_W_tile = g^T @ hidden`` in
float32, with ``g = dloss/dz`` from :mod:`logitlab._ce`.

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

  def token_tile(i, outputs):
    r0 = rows.start(i)
    h, y = rows.take(hidden, i), rows.take(labels, i)

    def vocab_tile(j, stats):
      run_max, run_sum, label_logit, logit_sum = stats
      c0 = cols.start(j)
      fresh = cols.fresh(j, c0)
      z = tiling.tile_logits(h, cols.take(weight, j), cols.take(bias, j), softcap)
      z_fresh = jnp.where(fresh, z, -jnp.inf)
      new_max = jnp.maximum(run_max, jnp.max(z_fresh, axis=1))
      run_sum = (run_sum * jnp.exp(run_max - new_max)
                 + jnp.sum(jnp.exp(z_fresh - new_max[:, None]), axis=1))
      is_label = fresh & (c0 + jnp.arange(cols.block) == y[:, None])
      label_logit += jnp.sum(jnp.where(is_label, z, 0.0), axis=1)
      if with_logit_sum:
        logit_sum += jnp.sum(jnp.where(fresh, z, 0.0), axis=1)
      return new_max, run_sum, label_logit, logit_sum

    zeros = jnp.zeros((rows.block,), jnp.float32)
    init = tiling.varying_like((jnp.full((rows.block,), -jnp.inf), zeros, zeros, zeros),
                         hidden, weight, bias, labels)
    run_max, run_sum, label_logit, logit_sum = lax.fori_loop(0, cols.count, vocab_tile, init)
    tile_stats = (run_max + jnp.log(run_sum), label_logit, logit_sum)
    return tuple(lax.dynamic_update_slice_in_dim(out, s, r0, 0)
                 for out, s in zip(outputs, tile_stats))

  n = hidden.shape[0]
  init = tiling.varying_like(tuple(jnp.zeros((n,), jnp.float32) for _ in range(3)),
                       hidden, weight, bias, labels)
  return lax.fori_loop(0, rows.count, token_tile, init)


def backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off, z_loss,
             softcap, filter_eps, block_tokens=None, block_vocab=None):
  """``(d_hidden, d_weight, d_bias)`` for ``g = dL/dz`` recomputed tile by tile::

    g = where(valid, (p_scale * softmax(z) - d_loss * (on * onehot(labels) + off)) * cap'(z), 0)
    d_hidden = g @ weight,  d_weight = g^T @ hidden,  d_bias = sum_n g (float32; None without bias)

  With ``filter_eps``, a tile whose every ``|(1 + 2 z_loss lse) softmax - target|`` is
  below it is skipped (Cut Cross-Entropy's gradient filtering).
  """
  rows = tiling.Tiles.over(hidden.shape[0], block_tokens or DEFAULT_BLOCK_TOKENS)
  cols = tiling.Tiles.over(weight.shape[0], block_vocab or DEFAULT_BLOCK_VOCAB)
  lse_scale = 1.0 + 2.0 * z_loss * lse
  dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  vary = lambda tree: tiling.varying_like(tree, hidden, weight, bias, labels, valid, d_loss, p_scale)

  def vocab_tile(j, grads):
    d_hidden, d_weight, d_bias = grads
    c0 = cols.start(j)
    fresh_cols = cols.fresh(j, c0)
    col_ids = c0 + jnp.arange(cols.block)
    w, b = cols.take(weight, j), cols.take(bias, j)

    def token_tile(i, acc):
      d_hidden, dw, db = acc
      r0 = rows.start(i)
      h, y, lse_i = rows.take(hidden, i), rows.take(labels, i), rows.take(lse, i)
      keep = (rows.fresh(i, r0) & rows.take(valid, i))[:, None] & fresh_cols
      z = tiling.tile_logits(h, w, b, softcap)
      probs = jnp.exp(z - lse_i[:, None])
      target = (col_ids == y[:, None]) * on + off

      def tile_grads():
        g = rows.take(p_scale, i)[:, None] * probs - rows.take(d_loss, i)[:, None] * target
        g = jnp.where(keep, g * _ce.cap_derivative(z, softcap), 0.0)
        g_in = g.astype(dtype)
        return (jnp.dot(g_in, w.astype(dtype), preferred_element_type=jnp.float32),
                lax.dot_general(g_in, h.astype(dtype), (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32),
                jnp.sum(g, axis=0))

      if filter_eps is None:
        dh, dw_tile, db_tile = tile_grads()
      else:
        # Cut Cross-Entropy's gradient filtering: skip a tile whose every entry of
        # dloss/dz (before the upstream cotangent) is below filter_eps.
        unscaled = jnp.where(keep, rows.take(lse_scale, i)[:, None] * probs - target, 0.0)
        skip = jnp.max(jnp.abs(unscaled)) < filter_eps
        dh, dw_tile, db_tile = lax.cond(
            skip, lambda: vary((jnp.zeros((rows.block, h.shape[1]), jnp.float32),
                                jnp.zeros((cols.block, h.shape[1]), jnp.float32),
                                jnp.zeros((cols.block,), jnp.float32))),
            tile_grads)
      d_hidden = lax.dynamic_update_slice_in_dim(d_hidden, rows.take(d_hidden, i) + dh, r0, 0)
      return d_hidden, dw + dw_tile, db + db_tile

    init = (d_hidden, *vary((jnp.zeros((cols.block, weight.shape[1]), jnp.float32),
                             jnp.zeros((cols.block,), jnp.float32))))
    d_hidden, dw, db = lax.fori_loop(0, rows.count, token_tile, init)
    # Rows of this tile already written by the previous tile got dw = 0 here.
    d_weight = lax.dynamic_update_slice_in_dim(
        d_weight, cols.take(d_weight, j) + dw.astype(d_weight.dtype), c0, 0)
    d_bias = lax.dynamic_update_slice_in_dim(d_bias, cols.take(d_bias, j) + db, c0, 0)
    return d_hidden, d_weight, d_bias

  init = vary((jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, weight.dtype),
               jnp.zeros((weight.shape[0],), jnp.float32)))
  d_hidden, d_weight, d_bias = lax.fori_loop(0, cols.count, vocab_tile, init)
  return d_hidden.astype(hidden.dtype), d_weight, None if bias is None else d_bias


