"""Vocabulary / token tiling shared by the streaming plain-JAX implementations.

Tiles of a fixed block along an axis, the last one shifted back to end at the
array's edge (so ragged sizes need no padded copy; the overlap is masked with
``fresh``), the logit tile of a linear head, and the shard_map typing of loop
carries.
"""

from __future__ import annotations

import functools
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
    if x is None:
      return None
    if not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4):
      return lax.dynamic_slice_in_dim(x, self.start(i), self.block)
    # XLA:CPU runs a dynamic slice of a 16-bit float array in float32 by converting
    # the whole array, and hoists that conversion out of the loop: a float32 copy of
    # all of `weight`. On CPU, a switch over static slices avoids it.
    static_starts = [min(t * self.block, self.size - self.block) for t in range(self.count)]
    return lax.platform_dependent(
        x, i,
        cpu=lambda x, i: lax.switch(i, [functools.partial(
            lax.slice_in_dim, start_index=s, limit_index=s + self.block) for s in static_starts], x),
        default=lambda x, i: lax.dynamic_slice_in_dim(x, self.start(i), self.block))


def varying_like(tree, *refs):
  """Returns ``tree`` typed as varying over every mesh axis one of ``refs`` varies over.

  Inside ``jax.shard_map`` (with ``check_vma``) a loop carry must keep its type,
  but fresh zeros are invariant while what accumulates into them is not. Adding
  an exact scalar zero derived from ``refs`` gives the carry their axes; outside
  shard_map it is a no-op that XLA folds away.
  """
  zero = sum(jnp.zeros_like(r, jnp.float32, shape=()) for r in refs if r is not None)
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def tile_logits(h, w, b, softcap):
  """``cap(h @ w^T + b)`` for one tile, float32 whatever the input dtype."""
  dtype = jnp.promote_types(h.dtype, w.dtype)
  z = lax.dot_general(h.astype(dtype), w.astype(dtype), (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32)
  if b is not None:
    z = z + b.astype(jnp.float32)
  return _ce.cap(z, softcap)
