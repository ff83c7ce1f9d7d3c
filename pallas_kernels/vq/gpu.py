"""Teacher code mass of VQ-Logits distillation: a Pallas kernel for GPUs, lowered through Triton.

Same contract as :mod:`pallas_kernels.vq.tpu` (and ``logitlab.vq_ops``,
``impl="xla"``). For a dense teacher head ``u = (hidden @ weight.T + bias) / T``
and a code assignment ``m: V -> K``, one kernel computes per token, without the
``[N, V]`` logits reaching HBM::

  code_mass[n, k] = sum_{v: m(v)=k} softmax(u)[n, v]     lse[n] = logsumexp_v u[n, v]
  neg_entropy[n]  = sum_v p log p                        bias_mean[n] = sum_v p[n, v] b_v

Grid: (token tiles, code chunks), both parallel. A program owns ``block_tokens``
rows and ``block_codes`` codes and walks the whole vocabulary in tiles of
``block_vocab`` with ``lax.fori_loop``. Each logit tile is built by an inner loop
over ``block_d`` feature chunks (``plgpu.dot``, float32 accumulation). An online
softmax carries, in registers, the running max ``m`` and, centred on it, the
float32 accumulators ``l = sum e``, ``c = sum e (u - m)``, ``s = sum e b`` and the
``[block_tokens, block_codes]`` code mass ``sum e onehot`` with ``e = exp(u - m)``;
they are rescaled by ``exp(m - m')`` when the max grows (``c`` also gains
``(m - m') l``). The segment sum is a matmul ``e @ onehot`` with
``onehot[v, k] = (m(v) == k)`` built in registers from the tile's codes: no
scatter, no atomics.

Exact one-hot matmul on tensor cores. ``e`` is float32; a bfloat16 matmul would
round it to 8 bits and a float32 (IEEE) Triton dot runs on the CUDA cores. The
one-hot is exact in bfloat16, so ``e`` is split into three bfloat16 parts
``e = hi + mid + lo`` (8 significand bits each: float32's 24, and bfloat16 has
float32's exponent range) and the three bfloat16 dots are summed in float32.

Large ``K``: the code axis is a grid axis. A ``[block_tokens, K]`` float32
accumulator does not fit in registers for the ``K`` of VQ-Logits heads (thousands
of codes), so each program accumulates ``block_codes`` codes (default 128) and
the ``cdiv(K, block_codes)`` programs of a token tile recompute the same logit
tiles and softmax statistics (the code chunk 0 program writes ``lse``,
``neg_entropy`` and ``bias_mean``). The alternative, one program per token tile
keeping the code mass in its rows of the output in global memory (a
read-modify-write of all ``K`` columns per vocabulary tile), recomputes nothing
but relies on a program reading back its own global stores in a different thread
layout, which Triton does not order; the grid axis needs no such ordering and
costs nothing while ``K <= block_codes``. Pass a larger ``block_codes`` (up to
``next_power_of_2(K)``) to trade registers and shared memory (see
:func:`smem_bytes`) for fewer recomputations.

Ragged ``N`` / ``V`` / ``D`` / ``K``: no HBM copy or padding of ``hidden`` or
``weight``. Every load is masked (``other=0``; codes ``other=-1``) and masks are
applied with ``jnp.where``, never by multiplying (interpret mode fills
out-of-bounds reads with NaN). Out-of-range rows and codes are not stored.

Why Triton and not Mosaic GPU: as for ``pallas_kernels.linear_cross_entropy.gpu``,
Mosaic GPU targets Hopper and later and its primitives do not run in interpret
mode on CPU; the Triton lowering runs on Ampere and later, runs in interpret mode
in CI, and is cross-lowered there for ``cuda``. Blocks are powers of two >= 16
(Triton's ``tl.dot``); the defaults fit the A100's 163 KiB of shared memory.

References:
  Shao et al., VQ-Logits, arXiv:2505.10202.
  Henry, Tang and Heinecke, Leveraging the bfloat16 Artificial Intelligence
  Datatype For Higher-Precision Computations, arXiv:1904.06376 (the bf16x3 split).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._triton import (NUM_STAGES, NUM_WARPS, SMEM_LIMIT_BYTES, SUPPORTED_DTYPES,
                                    default_block_d, load_chunk, load_rows, power_of_two_block)

__all__ = ["DEFAULT_BLOCK_CODES", "DEFAULT_BLOCK_TOKENS", "DEFAULT_BLOCK_VOCAB",
           "SMEM_LIMIT_BYTES", "default_block_d", "smem_bytes", "teacher_code_mass"]

DEFAULT_BLOCK_TOKENS = 32
DEFAULT_BLOCK_VOCAB = 128
DEFAULT_BLOCK_CODES = 128


def smem_bytes(block_tokens: int, block_vocab: int, block_codes: int, block_d: int, dtype,
               num_stages: int = NUM_STAGES) -> int:
  """Estimated shared memory of one program.

  ``num_stages`` pipelined copies of the hidden and weight chunks, the float32
  logit tile, and the operands of the one-hot matmul: a bfloat16 part of ``e``
  (``[block_tokens, block_vocab]``) and the bfloat16 one-hot
  (``[block_vocab, block_codes]``). The code mass accumulator stays in registers.
  """
  itemsize = jnp.dtype(dtype).itemsize
  operands = num_stages * (block_tokens + block_vocab) * block_d * itemsize
  logits = block_tokens * block_vocab * 4
  one_hot_matmul = block_tokens * block_vocab * 2 + block_vocab * block_codes * 2
  return operands + logits + one_hot_matmul


def _exact_one_hot_dot(e, onehot):
  """``e @ onehot`` in float32 from three bfloat16 tensor-core dots (``onehot`` is bf16 0/1)."""
  hi = e.astype(jnp.bfloat16)
  rest = e - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
  return plgpu.dot(hi, onehot) + plgpu.dot(mid, onehot) + plgpu.dot(lo, onehot)


def _kernel(*refs, has_bias, has_token_bias, num_codes, inv_temp, block_tokens, block_vocab,
            block_codes, block_d, dtype):
  """One (token tile, code chunk): stream all vocabulary tiles with an online softmax."""
  hidden_ref, weight_ref, codes_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  tb_ref = refs.pop(0) if has_token_bias else None
  mass_ref, lse_ref, ent_ref, bm_ref = refs
  (n, d), v = hidden_ref.shape, weight_ref.shape[0]
  r0 = pl.program_id(0) * block_tokens
  k0 = pl.program_id(1) * block_codes
  rows = r0 + jnp.arange(block_tokens) < n
  code_ids = k0 + jnp.arange(block_codes)

  def vocab_tile(j, carry):
    run_max, l, c, s, mass = carry
    c0 = j * block_vocab
    cols = c0 + jnp.arange(block_vocab) < v

    def feature_chunk(t, acc):
      h = load_chunk(hidden_ref, r0, rows, t * block_d, block_d).astype(dtype)
      w = load_chunk(weight_ref, c0, cols, t * block_d, block_d).astype(dtype)
      return acc + plgpu.dot(h, w, trans_b=True)

    z = lax.fori_loop(0, pl.cdiv(d, block_d), feature_chunk,
                      jnp.zeros((block_tokens, block_vocab), jnp.float32))
    if bias_ref is not None:
      z = z + load_rows(bias_ref, c0, cols, 0.0).astype(jnp.float32)[None, :]
    u = z * inv_temp
    col_ok = cols[None, :]
    new_max = jnp.maximum(run_max, jnp.max(jnp.where(col_ok, u, -jnp.inf), axis=1))
    scale = jnp.exp(run_max - new_max)
    centred = jnp.where(col_ok, u - new_max[:, None], 0.0)
    e = jnp.where(col_ok, jnp.exp(centred), 0.0)
    # (run_max - new_max) * l: 0 * 0 on the first tile, where run_max = -inf.
    shift = jnp.where(l > 0, (run_max - new_max) * l, 0.0)
    c = scale * (c + shift) + jnp.sum(e * centred, axis=1)
    l = scale * l + jnp.sum(e, axis=1)
    if tb_ref is not None:
      tb = load_rows(tb_ref, c0, cols, 0.0).astype(jnp.float32)
      s = scale * s + jnp.sum(e * tb[None, :], axis=1)
    # onehot[v, k] = (m(v) == k0 + k); columns past V load code -1 (and have e = 0).
    codes = load_rows(codes_ref, c0, cols, -1)
    onehot = (codes[:, None] == code_ids[None, :]).astype(jnp.bfloat16)
    mass = scale[:, None] * mass + _exact_one_hot_dot(e, onehot)
    return new_max, l, c, s, mass

  zeros = jnp.zeros((block_tokens,), jnp.float32)
  init = (jnp.full((block_tokens,), -jnp.inf, jnp.float32), zeros, zeros, zeros,
          jnp.zeros((block_tokens, block_codes), jnp.float32))
  run_max, l, c, s, mass = lax.fori_loop(0, pl.cdiv(v, block_vocab), vocab_tile, init)

  plgpu.store(mass_ref.at[pl.ds(r0, block_tokens), pl.ds(k0, block_codes)], mass / l[:, None],
              mask=rows[:, None] & (code_ids < num_codes)[None, :])

  @pl.when(pl.program_id(1) == 0)
  def _stats():
    log_l = jnp.log(l)
    for ref, value in ((lse_ref, run_max + log_l), (ent_ref, c / l - log_l), (bm_ref, s / l)):
      plgpu.store(ref.at[pl.ds(r0, block_tokens)], value, mask=rows)


def teacher_code_mass(hidden, weight, bias, assignment, token_bias, *, num_codes: int,
                      temperature: float = 1.0, block_tokens: int | None = None,
                      block_vocab: int | None = None, block_codes: int | None = None,
                      block_d: int | None = None, interpret: bool = False):
  """``(code_mass[N, K], lse[N], neg_entropy[N], bias_mean[N] | None)``, float32.

  Args:
    hidden: ``[N, D]`` float32, bfloat16 or float16 teacher hidden states.
    weight: ``[V, D]`` teacher output embedding (computed in the dtype promoted
      with ``hidden``'s, float32 accumulation).
    bias: ``[V]`` teacher bias or None.
    assignment: ``[V]`` int code of each token in ``[0, num_codes)``.
    token_bias: ``[V]`` student per-token bias or None (then ``bias_mean`` is None).
    num_codes: ``K``.
    temperature: ``T > 0`` dividing the teacher logits.
    block_tokens, block_vocab, block_codes, block_d: powers of two >= 16
      (defaults 32, 128, 128 and :func:`default_block_d`), clamped to what the
      shapes need.
    interpret: run in the Pallas interpreter (any platform, CPU included).
  """
  fn = "teacher_code_mass"
  for name, x in (("hidden", hidden), ("weight", weight)):
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
      raise ValueError(f"{fn}: {name} must be float32, bfloat16 or float16, got {x.dtype}.")
  if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
    raise ValueError(f"{fn}: expected hidden [N, D] and weight [V, D], got {hidden.shape} and "
                     f"{weight.shape}.")
  (n, d), v = hidden.shape, weight.shape[0]
  if min(n, d, v) < 1:
    raise ValueError(f"{fn}: N, V and D must be >= 1, got hidden {hidden.shape} and weight "
                     f"{weight.shape}.")
  for name, x in (("assignment", assignment), ("bias", bias), ("token_bias", token_bias)):
    if x is not None and x.shape != (v,):
      raise ValueError(f"{fn}: {name} must have shape ({v},), got {x.shape}.")
  if not isinstance(num_codes, int) or num_codes < 1:
    raise ValueError(f"{fn}: num_codes must be a positive int, got {num_codes!r}.")
  dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  block = functools.partial(power_of_two_block, "teacher_code_mass")
  bn = block("block_tokens", block_tokens, DEFAULT_BLOCK_TOKENS, n)
  bv = block("block_vocab", block_vocab, DEFAULT_BLOCK_VOCAB, v)
  bk = block("block_codes", block_codes, DEFAULT_BLOCK_CODES, num_codes)
  bd = block("block_d", block_d, default_block_d(dtype), d)
  operands = [hidden, weight, assignment.astype(jnp.int32)]
  operands += [x.astype(jnp.float32) for x in (bias, token_bias) if x is not None]
  kernel = functools.partial(
      _kernel, has_bias=bias is not None, has_token_bias=token_bias is not None,
      num_codes=num_codes, inv_temp=1.0 / temperature, block_tokens=bn, block_vocab=bv,
      block_codes=bk, block_d=bd, dtype=dtype)
  stats = jax.ShapeDtypeStruct((n,), jnp.float32)
  mass, lse, ent, bias_mean = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((n, num_codes), jnp.float32), stats, stats, stats),
      grid=(pl.cdiv(n, bn), pl.cdiv(num_codes, bk)),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="vq_teacher_code_mass",
  )(*operands)
  return mass, lse, ent, None if token_bias is None else bias_mean
