"""Vocabulary / token tiling shared by the streaming plain-JAX implementations.

Tiles of a fixed block along an axis, the last one shifted back to end at the
array's edge (so ragged sizes need no padded copy; the overlap is masked with
``fresh``), the logit tile of a linear head, the shard_map typing of loop
carries, and the two loops every fused head is made of:

* forward, :func:`per_token_tile`: token tiles, each folding per-token statistics
  over vocabulary tiles (e.g. :func:`online_logsumexp`) into ``[N]`` outputs;
* backward, :func:`head_backward`: vocabulary tiles outer, token tiles inner,
  recomputing each logit tile and turning the loss's ``dL/dz`` tile (a callback)
  into ``d_hidden``, ``d_weight`` and ``d_bias``.

:mod:`logitlab._linear_xla` (fused cross-entropy) and
:mod:`logitlab.distill.linear` (fused distillation) differ only in their callbacks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from logitlab import _ce


class Tiles(NamedTuple):
  """Tiles of ``block`` along an axis of ``size``; the last one ends at ``size``."""
  size: int
  block: int
  count: int

  @classmethod
  def over(cls, size: int, block: int) -> "Tiles":
    block = min(block, size)
    return cls(size, block, -(-size // block))

  def start(self, i):
    return jnp.minimum(i * self.block, self.size - self.block)

  def fresh(self, i, start):
    """Marks the positions of tile ``i`` that no earlier tile covered."""
    return start + jnp.arange(self.block) >= i * self.block

  def take(self, x, i):
    """Tile ``i`` of ``x`` along axis 0 (None passes through)."""
    return self.take_many(i, x)[0]

  def take_many(self, i, *xs):
    """Tile ``i`` of each of ``xs`` along axis 0 (None passes through), one branch for all."""
    def dynamic(x):
      return None if x is None else lax.dynamic_slice_in_dim(x, self.start(i), self.block)
    half = [k for k, x in enumerate(xs)
            if x is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4]
    tiles = [None if k in half else dynamic(x) for k, x in enumerate(xs)]
    if half:
      # XLA:CPU runs a dynamic slice of a 16-bit float array in float32 by converting
      # the whole array, and hoists that conversion out of the loop: a float32 copy of
      # all of `weight`. On CPU, a switch over static slices avoids it (one switch for
      # all the arrays of a tile: each switch of `count` branches costs compile time).
      static_starts = [min(t * self.block, self.size - self.block) for t in range(self.count)]
      slices = lambda s: lambda arrays: tuple(lax.slice_in_dim(x, s, s + self.block)
                                              for x in arrays)
      half_tiles = lax.platform_dependent(
          tuple(xs[k] for k in half), i,
          cpu=lambda arrays, i: lax.switch(i, [slices(s) for s in static_starts], arrays),
          default=lambda arrays, i: tuple(lax.dynamic_slice_in_dim(x, self.start(i), self.block)
                                          for x in arrays))
      for k, tile in zip(half, half_tiles):
        tiles[k] = tile
    return tuple(tiles)


def varying_like(tree, *refs):
  """Returns ``tree`` typed as varying over every mesh axis one of ``refs`` varies over.

  Inside ``jax.shard_map`` (with ``check_vma``) a loop carry must keep its type,
  but fresh zeros are invariant while what accumulates into them is not. Adding
  an exact scalar zero derived from ``refs`` gives the carry their axes; outside
  shard_map it is a no-op that XLA folds away.
  """
  # The sum over an empty slice reads no value of `r` and keeps no sharding of its
  # (a zeros_like of `r` would carry its sharding spec onto a scalar).
  zero = sum(jnp.sum(jnp.expand_dims(r, 0)[:0], dtype=jnp.float32)
             for r in refs if r is not None)
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def tile_logits(h, w, b, softcap):
  """``cap(h @ w^T + b)`` for one tile, float32 whatever the input dtype."""
  dtype = jnp.promote_types(h.dtype, w.dtype)
  z = lax.dot_general(h.astype(dtype), w.astype(dtype), (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32)
  if b is not None:
    z = z + b.astype(jnp.float32)
  return _ce.cap(z, softcap)


def online_logsumexp(run_max, run_sum, z):
  """One step of a float32 online log-sum-exp over axis 1 of ``z`` (``-inf`` = excluded).

  ``(run_max, run_sum)`` start at ``(-inf, 0)``; the result is
  ``run_max + log(run_sum)`` (:func:`finish_logsumexp`). A row with nothing seen yet
  stays at ``(-inf, 0)`` instead of turning NaN.
  """
  new_max = jnp.maximum(run_max, jnp.max(z, axis=1))
  shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
  run_sum = run_sum * jnp.exp(run_max - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
  return new_max, run_sum


def finish_logsumexp(run_max, run_sum):
  return run_max + jnp.log(run_sum)


def per_token_tile(rows: Tiles, tile_stats, num_outputs: int, refs):
  """``num_outputs`` float32 ``[N]`` vectors, computed one token tile at a time.

  ``tile_stats(i)`` returns a tuple of ``[rows.block]`` float32 statistics of the
  rows of token tile ``i`` (typically a ``lax.fori_loop`` over vocabulary tiles);
  rows the clamped last tile shares with the one before are written twice with
  the same values. ``refs``: the arrays the statistics depend on (for shard_map).
  """
  def body(i, outputs):
    r0 = rows.start(i)
    return tuple(lax.dynamic_update_slice_in_dim(out, s, r0, 0)
                 for out, s in zip(outputs, tile_stats(i)))

  init = varying_like(tuple(jnp.zeros((rows.size,), jnp.float32) for _ in range(num_outputs)),
                      *refs)
  return lax.fori_loop(0, rows.count, body, init)


def head_backward(hidden, weight, bias, tile_dlogits, *, rows: Tiles, cols: Tiles, refs=(),
                  row_mask=None, col_arrays=()):
  """``(d_hidden, d_weight, d_bias)`` of a loss of ``z = hidden @ weight.T + bias`` from ``dL/dz``.

  The ``[N, V]`` gradient never exists: vocabulary tiles outer, token tiles
  inner, each logit tile ``z`` (float32) recomputed and handed to
  ``tile_dlogits(i, j, z, keep, *col_tiles)``, which returns ``(g, skip)``: ``g`` the float32
  ``dL/dz`` tile, ``skip`` None or a scalar bool that drops the tile's matmuls
  (gradient filtering). ``keep`` marks the entries this tile is the first to
  cover; ``g`` is zeroed elsewhere (with ``where``, so NaN there does not leak).
  Then, in float32::

    d_hidden += g @ W_tile,   d_W_tile = sum_i g_i^T @ h_i (written once),   d_b_tile = sum_n g

  ``row_mask`` ([N] bool, optional) zeros the hidden rows it marks False before
  use, so NaN in masked rows reaches neither ``z`` nor ``d_weight``. ``col_tiles``
  are the vocabulary tiles ``j`` of ``col_arrays`` (``[V, ...]`` arrays, e.g. a
  teacher's weight), sliced once per vocabulary tile.
  Shapes: hidden [N, D], weight [V, D], bias [V] or None; returns d_hidden in
  ``hidden.dtype``, d_weight in ``weight.dtype``, d_bias float32 (None without bias).
  """
  dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  d_model = hidden.shape[1]
  vary = lambda tree: varying_like(tree, hidden, weight, bias, row_mask, *refs)

  def vocab_tile(j, grads):
    d_hidden, d_weight, d_bias = grads
    c0 = cols.start(j)
    fresh_cols = cols.fresh(j, c0)
    w, b, d_weight_tile, *col_tiles = cols.take_many(j, weight, bias, d_weight, *col_arrays)

    def token_tile(i, acc):
      d_hidden, dw, db = acc
      r0 = rows.start(i)
      h = rows.take(hidden, i)
      if row_mask is not None:
        h = jnp.where(rows.take(row_mask, i)[:, None], h, jnp.zeros((), h.dtype))
      keep = rows.fresh(i, r0)[:, None] & fresh_cols
      g, skip = tile_dlogits(i, j, tile_logits(h, w, b, None), keep, *col_tiles)
      g = jnp.where(keep, g, 0.0)

      def tile_grads():
        g_in = g.astype(dtype)
        return (jnp.dot(g_in, w.astype(dtype), preferred_element_type=jnp.float32),
                lax.dot_general(g_in, h.astype(dtype), (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32),
                jnp.sum(g, axis=0))

      if skip is None:
        dh, dw_tile, db_tile = tile_grads()
      else:
        dh, dw_tile, db_tile = lax.cond(
            skip, lambda: vary((jnp.zeros((rows.block, d_model), jnp.float32),
                                jnp.zeros((cols.block, d_model), jnp.float32),
                                jnp.zeros((cols.block,), jnp.float32))),
            tile_grads)
      d_hidden = lax.dynamic_update_slice_in_dim(d_hidden, rows.take(d_hidden, i) + dh, r0, 0)
      return d_hidden, dw + dw_tile, db + db_tile

    init = (d_hidden, *vary((jnp.zeros((cols.block, d_model), jnp.float32),
                             jnp.zeros((cols.block,), jnp.float32))))
    d_hidden, dw, db = lax.fori_loop(0, rows.count, token_tile, init)
    # Rows of this tile already written by the previous tile got dw = 0 here.
    d_weight = lax.dynamic_update_slice_in_dim(
        d_weight, d_weight_tile + dw.astype(d_weight.dtype), c0, 0)
    d_bias = lax.dynamic_update_slice_in_dim(d_bias, cols.take(d_bias, j) + db, c0, 0)
    return d_hidden, d_weight, d_bias

  init = vary((jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, weight.dtype),
               jnp.zeros((weight.shape[0],), jnp.float32)))
  d_hidden, d_weight, d_bias = lax.fori_loop(0, cols.count, vocab_tile, init)
  return d_hidden.astype(hidden.dtype), d_weight, None if bias is None else d_bias
