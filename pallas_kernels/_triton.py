"""Pieces shared by the Triton-lowered (GPU) kernels: dtypes, launch settings, blocks, loads."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_LIMIT_BYTES = {"H100/H200": 227 * 1024, "A100": 163 * 1024}
NUM_WARPS = 4
NUM_STAGES = 3
MIN_BLOCK = 16  # Triton's tl.dot needs every block dimension >= 16


def default_block_d(dtype) -> int:
  """Feature chunk: 64 for 16-bit operands, 32 for float32 (same shared-memory bytes)."""
  return 64 if jnp.dtype(dtype).itemsize <= 2 else 32


def power_of_two_block(fn: str, name: str, requested, default: int, size: int) -> int:
  """A power-of-two block >= ``MIN_BLOCK``, no larger than ``size`` needs."""
  if requested is not None and (not isinstance(requested, int) or requested < MIN_BLOCK
                                or requested & (requested - 1)):
    raise ValueError(f"{fn}: {name} must be a power of two >= {MIN_BLOCK}, got {requested!r}.")
  block = default if requested is None else requested
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(size)))


def load_rows(ref, start, mask, other):
  """``ref[start:start + len(mask)]`` of a 1-D ref; ``other`` where ``mask`` is False."""
  return plgpu.load(ref.at[pl.ds(start, mask.shape[0])], mask=mask, other=other)


def load_chunk(ref, start, row_mask, d0, block_d):
  """Rows ``start + arange(len(row_mask))``, features ``d0:d0 + block_d``; 0 outside."""
  features = d0 + jnp.arange(block_d)
  mask = row_mask[:, None] & (features < ref.shape[1])[None, :]
  return plgpu.load(ref.at[pl.ds(start, row_mask.shape[0]), pl.ds(d0, block_d)],
                    mask=mask, other=0.0)
