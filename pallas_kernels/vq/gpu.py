"""VQ-Logits Pallas kernels for GPUs, lowered through Triton.

A VQ-Logits head has code logits ``z[N, K]``, an assignment ``m: V -> K`` (the
code of each vocabulary token; a code may hold no token) and an optional
per-token bias ``b[V]``; its vocabulary logits are ``z[n, m(v)] + b[v]``. Four
kernels, none of which stores more than its own output in HBM:

* :func:`teacher_code_mass` (same contract as :mod:`pallas_kernels.vq.tpu` and
  ``logitlab.vq_ops``, ``impl="xla"``): for a dense teacher head
  ``u = (hidden @ weight.T + bias) / T``, per token, without the ``[N, V]``
  logits reaching HBM::

    code_mass[n, k] = sum_{v: m(v)=k} softmax(u)[n, v]     lse[n] = logsumexp_v u[n, v]
    neg_entropy[n]  = sum_v p log p                        bias_mean[n] = sum_v p[n, v] b_v

* :func:`scatter_logits`: ``out[n, v] = z[n, m(v)] + b[v] - shift[n]`` (the
  vocabulary logits, or log-probabilities when ``shift`` is the log-normalizer).
* :func:`scatter_top_k`: ``lax.top_k(z[:, m] + b, k)`` streamed over vocabulary
  tiles, the ``[N, V]`` logits never in HBM.
* :func:`segment_sum`: ``P[n, k] = sum_{v: m(v)=k} probs[n, v]``, the transpose
  of the scatter (its backward pass, and the scatter is the segment sum's).

Teacher code mass. Grid: (token tiles, code chunks), both parallel. A program
owns ``block_tokens`` rows and ``block_codes`` codes and walks the whole
vocabulary in tiles of ``block_vocab`` with ``lax.fori_loop``. Each logit tile is
built by an inner loop over ``block_d`` feature chunks (``plgpu.dot``, float32
accumulation). An online softmax carries, in registers, the running max ``m``
and, centred on it, the float32 accumulators ``l = sum e``, ``c = sum e (u - m)``,
``s = sum e b`` and the ``[block_tokens, block_codes]`` code mass
``sum e onehot`` with ``e = exp(u - m)``; they are rescaled by ``exp(m - m')``
when the max grows (``c`` also gains ``(m - m') l``). The segment sum is a matmul
``e @ onehot`` with ``onehot[v, k] = (m(v) == k)`` built in registers from the
tile's codes: no scatter, no atomics.

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

Scatter: a gather, not a matmul. Grid (token tiles, vocabulary tiles), both
parallel. A program loads its tile's codes ``m(c0 : c0 + block_vocab)`` and then
``z[r0 + i, m(c0 + j)]`` with one masked load whose indexer holds two integer
arrays (``z_ref.at[rows[:, None], codes[None, :]]``), which the Triton lowering
turns into a pointer tensor ``z + row * K + code``: one load per output element,
served from L1/L2 after the first touch of a ``z`` row (``K`` values), and
``-inf`` / ``+inf`` / NaN code logits stay on their own tokens. Rows and codes
are clamped into ``z`` before the load (ragged lanes are masked anyway; an
out-of-range code reads a clamped code instead of memory outside ``z``: the
assignment is validated by the callers, e.g. ``logitlab``), so no address ever
leaves the array, not even a masked one or one the interpreter evaluates.

Top-k: grid over token tiles; a program walks the vocabulary tiles with
``lax.fori_loop`` and keeps, in registers, a running top-k of ``(key, id)``
pairs of width ``kp = max(16, next_power_of_2(k))`` (padding: key ``INT32_MIN``,
id ``INT32_MAX``). The key of a float32 logit is its bit pattern with the 31 low
bits flipped when negative: an int32 whose signed order is IEEE's total order
``-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN``, the order ``lax.top_k``
sorts by, so ``-inf``, ``+inf`` and NaN logits are ranked exactly as there (NaN
first) with no NaN-unaware ``max`` in the way. Ragged columns get the padding
key and id. Each tile is merged by ``k`` selection rounds: round ``r`` takes the
largest key left among the running list and the tile, the smallest id among the
entries holding it (ties to the lower token id), writes them into slot ``r`` of
the new list (``jnp.where`` on an iota) and turns the taken entry into padding.
A tile is merged only when some valid row's tile max key is strictly greater
than its k-th key, or its list is not full yet (``lax.cond``, lowered to
``scf.if``): an equal key loses to the lower ids already kept. The merge costs
``k`` rounds of four reductions over ``kp + block_vocab`` entries, so this is
meant for small ``k``; any ``k <= V`` is exact.

Segment sum (the transpose of the scatter): grid (token tiles, code chunks of
``block_codes``), both parallel, like the teacher kernel: each program loops
over vocabulary tiles accumulating ``probs_tile @ onehot`` with the exact
one-hot matmul above (one bfloat16 part for bfloat16 ``probs``, two for float16,
three for float32) in registers: deterministic, no atomics. Cost: each code
chunk re-reads its token tile's ``probs`` rows, so ``probs`` is read
``cdiv(K, block_codes)`` times. ``probs`` must be finite: the matmul multiplies
every entry by the zeros of the other codes, so an inf / NaN turns its row NaN
over the whole code chunk.

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
           "SMEM_LIMIT_BYTES", "default_block_d", "scatter_logits", "scatter_top_k",
           "segment_sum", "smem_bytes", "teacher_code_mass"]

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


def _exact_one_hot_dot(e, onehot, parts: int = 3):
  """``e @ onehot`` in float32 from ``parts`` bfloat16 tensor-core dots (``onehot`` is bf16 0/1).

  ``e`` (float32) is split into bfloat16 parts of 8 significand bits each: three
  hold any float32 exactly, one a value converted from bfloat16 and two one
  converted from float16 (11 bits).
  """
  out, rest = None, e
  for i in range(parts):
    part = rest.astype(jnp.bfloat16)
    if i + 1 < parts:
      rest = rest - part.astype(jnp.float32)
    term = plgpu.dot(part, onehot)
    out = term if out is None else out + term
  return out


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


# ------------------------------------------------------------- scatter, top-k, segment sum

_INT32_MIN = -(2 ** 31)
_INT32_MAX = 2 ** 31 - 1
_LOW_31_BITS = 2 ** 31 - 1
# bfloat16 parts that hold a value of each input dtype exactly (see _exact_one_hot_dot).
_ONE_HOT_PARTS = {jnp.dtype(jnp.float32): 3, jnp.dtype(jnp.float16): 2,
                  jnp.dtype(jnp.bfloat16): 1}


def _check_dtype(fn, name, x):
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"{fn}: {name} must be float32, bfloat16 or float16, got {x.dtype}.")


def _check_matrix(fn, name, x, rows_name, cols_name):
  _check_dtype(fn, name, x)
  if x.ndim != 2 or min(x.shape) < 1:
    raise ValueError(f"{fn}: {name} must be a non-empty [{rows_name}, {cols_name}] matrix, got "
                     f"shape {x.shape}.")


def _check_assignment(fn, assignment):
  if not jnp.issubdtype(assignment.dtype, jnp.integer) or assignment.ndim != 1:
    raise ValueError(f"{fn}: assignment must be an integer [V] vector, got {assignment.dtype} "
                     f"{assignment.shape}.")
  if assignment.shape[0] < 1:
    raise ValueError(f"{fn}: assignment must hold at least one token, got shape "
                     f"{assignment.shape}.")
  return assignment.shape[0]


def _check_vector(fn, name, x, size, what):
  if x is None:
    return None
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.shape != (size,):
    raise ValueError(f"{fn}: {name} must be a float [{what}] = ({size},) vector or None, got "
                     f"{x.dtype} {x.shape}.")
  return x.astype(jnp.float32)


def _check_positive_int(fn, name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}.")


def _gather_logits(z_ref, codes_ref, tb_ref, r0, c0, block_tokens, block_vocab):
  """``z[r0 + i, m(c0 + j)] + b[c0 + j]`` in float32, ``[block_tokens, block_vocab]``.

  One masked load whose indexer holds two integer arrays: a Triton pointer tensor
  ``z + row * K + code``, each element loaded from its own address. Rows and codes
  are clamped into ``z`` (ragged rows re-read row ``N - 1``, ragged columns code
  0) so that no address leaves the array, masked or not; what those lanes hold is
  for the caller to mask.
  """
  (n, num_codes), v = z_ref.shape, codes_ref.shape[0]
  row_ids = r0 + jnp.arange(block_tokens)
  cols = c0 + jnp.arange(block_vocab) < v
  codes = load_rows(codes_ref, c0, cols, 0)
  codes = jnp.minimum(jnp.maximum(jnp.where(cols, codes, 0), 0), num_codes - 1)
  safe_rows = jnp.minimum(row_ids, n - 1)
  mask = (row_ids < n)[:, None] & cols[None, :]
  z = plgpu.load(z_ref.at[safe_rows[:, None], codes[None, :]], mask=mask, other=0.0)
  z = z.astype(jnp.float32)
  if tb_ref is not None:
    z = z + load_rows(tb_ref, c0, cols, 0.0)[None, :]
  return z


def _scatter_kernel(*refs, has_token_bias, has_shift, block_tokens, block_vocab):
  """One (token tile, vocabulary tile) of ``z[n, m(v)] + b[v] - shift[n]``."""
  z_ref, codes_ref, *refs = refs
  tb_ref = refs.pop(0) if has_token_bias else None
  shift_ref = refs.pop(0) if has_shift else None
  (out_ref,) = refs
  n, v = out_ref.shape
  r0 = pl.program_id(0) * block_tokens
  c0 = pl.program_id(1) * block_vocab
  rows = r0 + jnp.arange(block_tokens) < n
  cols = c0 + jnp.arange(block_vocab) < v
  logits = _gather_logits(z_ref, codes_ref, tb_ref, r0, c0, block_tokens, block_vocab)
  if shift_ref is not None:
    logits = logits - load_rows(shift_ref, r0, rows, 0.0)[:, None]
  plgpu.store(out_ref.at[pl.ds(r0, block_tokens), pl.ds(c0, block_vocab)],
              logits.astype(out_ref.dtype), mask=rows[:, None] & cols[None, :])


def scatter_logits(code_logits, assignment, token_bias, shift, *, out_dtype=None,
                   block_tokens: int | None = None, block_vocab: int | None = None,
                   interpret: bool = False):
  """``out[n, v] = z[n, m(v)] + b[v] - shift[n]``, ``[N, K] -> [N, V]``.

  Computed in float32 (one gathered load per output, see :func:`_gather_logits`)
  and stored as ``out_dtype``. Non-finite code logits stay on their own tokens.

  Args:
    code_logits: ``[N, K]`` float32, bfloat16 or float16 ``z``.
    assignment: ``[V]`` int code of each token, in ``[0, K)`` (not checked here; an
      out-of-range code reads a clamped one, never memory outside ``z``).
    token_bias: ``[V]`` float ``b`` or None.
    shift: ``[N]`` float (used as float32) or None.
    out_dtype: float32, bfloat16 or float16; default ``code_logits.dtype``.
    block_tokens, block_vocab: powers of two >= 16 (defaults 32 and 128), clamped
      to what the shapes need.
    interpret: run in the Pallas interpreter (any platform, CPU included).
  """
  fn = "scatter_logits"
  _check_matrix(fn, "code_logits", code_logits, "N", "K")
  n = code_logits.shape[0]
  v = _check_assignment(fn, assignment)
  token_bias = _check_vector(fn, "token_bias", token_bias, v, "V")
  shift = _check_vector(fn, "shift", shift, n, "N")
  out_dtype = jnp.dtype(code_logits.dtype if out_dtype is None else out_dtype)
  if out_dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"{fn}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}.")
  block = functools.partial(power_of_two_block, fn)
  bn = block("block_tokens", block_tokens, DEFAULT_BLOCK_TOKENS, n)
  bv = block("block_vocab", block_vocab, DEFAULT_BLOCK_VOCAB, v)
  operands = [code_logits, assignment.astype(jnp.int32)]
  operands += [x for x in (token_bias, shift) if x is not None]
  kernel = functools.partial(_scatter_kernel, has_token_bias=token_bias is not None,
                             has_shift=shift is not None, block_tokens=bn, block_vocab=bv)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n, v), out_dtype),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="vq_scatter_logits",
  )(*operands)


def _order_key(x):
  """float32 -> int32 whose signed order is IEEE's total order (an involution on the bits).

  Non-negative floats keep their bits; negative ones flip their 31 low bits, so
  ``-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN``: the order of ``lax.top_k``.
  """
  bits = lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ _LOW_31_BITS, bits)


def _from_order_key(key):
  bits = jnp.where(key < 0, key ^ _LOW_31_BITS, key)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _top_k_kernel(*refs, has_token_bias, k, k_pad, block_tokens, block_vocab):
  """One token tile: a running top-k of (key, id) pairs merged with every vocabulary tile."""
  z_ref, codes_ref, *refs = refs
  tb_ref = refs.pop(0) if has_token_bias else None
  vals_ref, ids_ref = refs
  n, v = z_ref.shape[0], codes_ref.shape[0]
  r0 = pl.program_id(0) * block_tokens
  rows = r0 + jnp.arange(block_tokens) < n
  slots = jnp.arange(k_pad)[None, :]

  def select(run_key, run_id, tile_key, tile_id):
    """The ``k`` largest (key, lowest id on ties) of both lists, by ``k`` selection rounds."""

    def one_round(r, state):
      run_key, run_id, tile_key, tile_id, new_key, new_id = state
      best = jnp.maximum(jnp.max(run_key, axis=1), jnp.max(tile_key, axis=1))[:, None]
      pick = jnp.minimum(jnp.min(jnp.where(run_key == best, run_id, _INT32_MAX), axis=1),
                         jnp.min(jnp.where(tile_key == best, tile_id, _INT32_MAX), axis=1))
      pick = pick[:, None]
      new_key = jnp.where(slots == r, best, new_key)
      new_id = jnp.where(slots == r, pick, new_id)
      # Taken entries become padding (ids are unique but for the padding's INT32_MAX).
      run_key = jnp.where(run_id == pick, _INT32_MIN, run_key)
      run_id = jnp.where(run_id == pick, _INT32_MAX, run_id)
      tile_key = jnp.where(tile_id == pick, _INT32_MIN, tile_key)
      tile_id = jnp.where(tile_id == pick, _INT32_MAX, tile_id)
      return run_key, run_id, tile_key, tile_id, new_key, new_id

    pad_key = jnp.full((block_tokens, k_pad), _INT32_MIN, jnp.int32)
    pad_id = jnp.full((block_tokens, k_pad), _INT32_MAX, jnp.int32)
    state = lax.fori_loop(0, k, one_round, (run_key, run_id, tile_key, tile_id, pad_key, pad_id))
    return state[4], state[5]

  def vocab_tile(j, best):
    run_key, run_id = best
    c0 = j * block_vocab
    token_ids = c0 + jnp.arange(block_vocab, dtype=jnp.int32)
    cols = (token_ids < v)[None, :]
    logits = _gather_logits(z_ref, codes_ref, tb_ref, r0, c0, block_tokens, block_vocab)
    tile_key = jnp.where(cols, _order_key(logits), _INT32_MIN)
    tile_id = jnp.where(cols, jnp.broadcast_to(token_ids[None, :], logits.shape), _INT32_MAX)
    # The k-th entry of each row: the bar a tile must pass (strictly: ties keep lower ids).
    kth_key = jnp.max(jnp.where(slots == k - 1, run_key, _INT32_MIN), axis=1)
    kth_id = jnp.max(jnp.where(slots == k - 1, run_id, _INT32_MIN), axis=1)
    needed = (jnp.max(tile_key, axis=1) > kth_key) | (kth_id == _INT32_MAX)
    any_needed = jnp.max(jnp.where(rows & needed, 1, 0)) > 0
    return lax.cond(any_needed, lambda: select(run_key, run_id, tile_key, tile_id),
                    lambda: (run_key, run_id))

  init = (jnp.full((block_tokens, k_pad), _INT32_MIN, jnp.int32),
          jnp.full((block_tokens, k_pad), _INT32_MAX, jnp.int32))
  run_key, run_id = lax.fori_loop(0, pl.cdiv(v, block_vocab), vocab_tile, init)
  mask = rows[:, None] & (slots < k)
  plgpu.store(vals_ref.at[pl.ds(r0, block_tokens), pl.ds(0, k_pad)], _from_order_key(run_key),
              mask=mask)
  plgpu.store(ids_ref.at[pl.ds(r0, block_tokens), pl.ds(0, k_pad)], run_id, mask=mask)


def scatter_top_k(code_logits, assignment, token_bias, *, k: int,
                  block_tokens: int | None = None, block_vocab: int | None = None,
                  interpret: bool = False):
  """``lax.top_k(z[:, m] + b, k)`` without the ``[N, V]`` logits: float32 values, int32 ids.

  Descending in IEEE total order (``+NaN`` first, then ``+inf``, ..., ``+0.0``
  before ``-0.0``, ``-inf``), ties to the lower token id: exactly ``lax.top_k``,
  ``-inf`` and NaN logits included (a NaN logit is returned, as NaN, ahead of
  every number). Meant for small ``k`` (the merge costs ``k`` rounds over
  ``max(16, next_power_of_2(k)) + block_vocab`` entries per merged tile); any
  ``k <= V`` is correct.

  Args:
    code_logits: ``[N, K]`` float32, bfloat16 or float16 ``z``.
    assignment: ``[V]`` int code of each token, in ``[0, K)``.
    token_bias: ``[V]`` float ``b`` or None.
    k: ``1 <= k <= V``.
    block_tokens, block_vocab: powers of two >= 16 (defaults 32 and 128).
    interpret: run in the Pallas interpreter.

  Returns:
    ``(values float32 [N, k], token_ids int32 [N, k])``.
  """
  fn = "scatter_top_k"
  _check_matrix(fn, "code_logits", code_logits, "N", "K")
  n = code_logits.shape[0]
  v = _check_assignment(fn, assignment)
  token_bias = _check_vector(fn, "token_bias", token_bias, v, "V")
  _check_positive_int(fn, "k", k)
  if k > v:
    raise ValueError(f"{fn}: k = {k} exceeds the vocabulary size V = {v}.")
  block = functools.partial(power_of_two_block, fn)
  bn = block("block_tokens", block_tokens, DEFAULT_BLOCK_TOKENS, n)
  bv = block("block_vocab", block_vocab, DEFAULT_BLOCK_VOCAB, v)
  k_pad = max(16, pl.next_power_of_2(k))
  operands = [code_logits, assignment.astype(jnp.int32)]
  operands += [token_bias] if token_bias is not None else []
  kernel = functools.partial(_top_k_kernel, has_token_bias=token_bias is not None, k=k,
                             k_pad=k_pad, block_tokens=bn, block_vocab=bv)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((n, k), jnp.float32),
                 jax.ShapeDtypeStruct((n, k), jnp.int32)),
      grid=(pl.cdiv(n, bn),),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="vq_scatter_top_k",
  )(*operands)


def _segment_sum_kernel(probs_ref, codes_ref, out_ref, *, parts, block_tokens, block_vocab,
                        block_codes):
  """One (token tile, code chunk): ``sum_j probs_tile_j @ onehot_j`` over vocabulary tiles."""
  (n, v), num_codes = probs_ref.shape, out_ref.shape[1]
  r0 = pl.program_id(0) * block_tokens
  k0 = pl.program_id(1) * block_codes
  rows = r0 + jnp.arange(block_tokens) < n
  code_ids = k0 + jnp.arange(block_codes)

  def vocab_tile(j, acc):
    c0 = j * block_vocab
    cols = c0 + jnp.arange(block_vocab) < v
    mask = rows[:, None] & cols[None, :]
    p = plgpu.load(probs_ref.at[pl.ds(r0, block_tokens), pl.ds(c0, block_vocab)], mask=mask,
                   other=0.0)
    p = jnp.where(mask, p.astype(jnp.float32), 0.0)
    codes = load_rows(codes_ref, c0, cols, -1)
    onehot = (jnp.where(cols, codes, -1)[:, None] == code_ids[None, :]).astype(jnp.bfloat16)
    return acc + _exact_one_hot_dot(p, onehot, parts)

  acc = lax.fori_loop(0, pl.cdiv(v, block_vocab), vocab_tile,
                      jnp.zeros((block_tokens, block_codes), jnp.float32))
  plgpu.store(out_ref.at[pl.ds(r0, block_tokens), pl.ds(k0, block_codes)], acc,
              mask=rows[:, None] & (code_ids < num_codes)[None, :])


def segment_sum(probs, assignment, *, num_codes: int, block_tokens: int | None = None,
                block_vocab: int | None = None, block_codes: int | None = None,
                interpret: bool = False):
  """``P[n, k] = sum_{v: m(v)=k} probs[n, v]``, float32 ``[N, num_codes]``; empty codes give 0.

  Grid (token tiles, code chunks of ``block_codes``), both parallel; each program
  loops over vocabulary tiles accumulating an exact one-hot tensor-core matmul in
  registers (deterministic, no atomics). Each code chunk re-reads its token
  tile's ``probs`` rows: ``probs`` is read ``cdiv(num_codes, block_codes)`` times.
  ``probs`` must be finite: the one-hot matmul multiplies every entry by 0 for
  the other codes, so an inf / NaN entry turns its row NaN across its code chunk.

  Args:
    probs: ``[N, V]`` float32, bfloat16 or float16.
    assignment: ``[V]`` int code of each token, in ``[0, num_codes)`` (a token
      with a code outside is dropped).
    num_codes: ``K``.
    block_tokens, block_vocab, block_codes: powers of two >= 16 (defaults 32, 128,
      128), clamped to what the shapes need.
    interpret: run in the Pallas interpreter.
  """
  fn = "segment_sum"
  _check_matrix(fn, "probs", probs, "N", "V")
  n, v = probs.shape
  if _check_assignment(fn, assignment) != v:
    raise ValueError(f"{fn}: assignment must have shape ({v},) to match probs {probs.shape}, "
                     f"got {assignment.shape}.")
  _check_positive_int(fn, "num_codes", num_codes)
  block = functools.partial(power_of_two_block, fn)
  bn = block("block_tokens", block_tokens, DEFAULT_BLOCK_TOKENS, n)
  bv = block("block_vocab", block_vocab, DEFAULT_BLOCK_VOCAB, v)
  bk = block("block_codes", block_codes, DEFAULT_BLOCK_CODES, num_codes)
  kernel = functools.partial(_segment_sum_kernel, parts=_ONE_HOT_PARTS[jnp.dtype(probs.dtype)],
                             block_tokens=bn, block_vocab=bv, block_codes=bk)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n, num_codes), jnp.float32),
      grid=(pl.cdiv(n, bn), pl.cdiv(num_codes, bk)),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="vq_segment_sum",
  )(probs, assignment.astype(jnp.int32))
