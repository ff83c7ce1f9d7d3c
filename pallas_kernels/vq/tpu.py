"""VQ-Logits Pallas kernels for TPU (Mosaic): teacher code mass, scatter, top-k, segment sum.

A VQ-Logits head has code logits ``z[N, K]``, an assignment ``m: V -> K`` (codes
may hold no token) and an optional per-token bias ``b[V]``; its vocabulary
logits are ``z[n, m(v)] + b[v]``. Four kernels, none of which needs the
``[N, V]`` logits in HBM unless they are the output asked for:

* :func:`teacher_code_mass`: for a dense teacher head
  ``u = (hidden @ weight.T + bias) / T``, per token::

    code_mass[n, k] = sum_{v: m(v)=k} softmax(u)[n, v]     lse[n] = logsumexp_v u[n, v]
    neg_entropy[n]  = sum_v p log p                        bias_mean[n] = sum_v p[n, v] b_v

* :func:`scatter_logits`: ``out[n, v] = z[n, m(v)] + b[v] - shift[n]`` (``[N, V]``).
* :func:`scatter_top_k`: ``lax.top_k(z[:, m] + b, k)``, streamed.
* :func:`segment_sum`: ``P[n, k] = sum_{v: m(v)=k} probs[n, v]``, the transpose
  of the scatter.

Grids are token tiles x vocabulary tiles. Neither gather nor segment sum uses a
scatter or a dynamic gather: both are MXU matmuls with the one-hot
``onehot[k, v] = (m(v) == k)`` built in VMEM from a lane row of codes. The
gather ``z @ onehot`` has one nonzero term per output, so at HIGHEST precision
(one pass for bfloat16 ``z``) it is exact; non-finite code logits are zeroed
before it and restored after from a second, single-pass one-hot product of a
small-integer flag (-1: -inf, 1: +inf, 2: NaN), so that ``inf * 0`` never puts a
NaN on another token. The segment sum ``probs @ onehot.T`` (HIGHEST) accumulates
in its held float32 ``[bn, K]`` output block.

teacher_code_mass: vocabulary tiles are sequential; an online softmax keeps the
running max ``m`` and, centred on it, the float32 accumulators ``l = sum e``,
``c = sum e (u - m)``, ``s = sum e b`` and the ``[bn, K]`` code mass
``sum e onehot``, with ``e = exp(u - m)``; they are rescaled by ``exp(m - m')``
when the max grows (``c`` also gains ``(m - m') l``).

scatter_top_k: vocabulary tiles are sequential; a running top-k of width
``kp = k`` rounded up to 128 lanes lives in VMEM scratch as int32 order keys
(the float32 bits with negative magnitudes flipped: ``lax.top_k``'s total order)
and token ids, empty slots below every token. A tile is merged only when some
row's tile max is strictly above that row's k-th key (tiles come in increasing
id, so an equal key never enters); the merge is ``k`` selection rounds, each
taking the largest remaining key of (running list, tile), the lowest id among
the entries equal to it, and marking that id taken. The result equals
``lax.top_k`` exactly, ties (``-inf`` included) to the lower token id (NaN code
logits aside: the gather returns them as ``+NaN``, which ranks first).

Ragged ``N`` / ``V`` need no padding copy: the last tiles read past the arrays'
ends, and the extra columns are masked with ``jnp.where`` (never by multiplying:
interpret mode fills them with NaN); extra rows only reach output rows that are
dropped on write-back.

References:
  Shao et al., VQ-Logits, arXiv:2505.10202.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_BLOCK_VOCAB",
    "scatter_logits",
    "scatter_top_k",
    "scatter_vmem_bytes",
    "segment_sum",
    "segment_sum_vmem_bytes",
    "teacher_code_mass",
    "top_k_vmem_bytes",
    "vmem_bytes",
]

DEFAULT_BLOCK_TOKENS = 256
DEFAULT_BLOCK_VOCAB = 512
VMEM_BUDGET_BYTES = 16 * 1024 * 1024
_LANES, _SUBLANES = 128, 8
_NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _padded(rows: int, cols: int, itemsize: int) -> int:
  sub = _SUBLANES * (4 // itemsize)
  return -(-rows // sub) * sub * -(-cols // _LANES) * _LANES * itemsize


def vmem_bytes(block_tokens: int, block_vocab: int, d: int, k: int, dtype) -> int:
  """Estimated VMEM of the kernel: blocks (weight and per-vocab rows double-buffered),
  the ``[bn, K]`` output, the ``[K, bv]`` one-hot and four float32 logit-tile temporaries."""
  b = jnp.dtype(dtype).itemsize
  bn, bv = block_tokens, block_vocab
  return (_padded(bn, d, b) + 2 * _padded(bv, d, b) + 6 * _padded(1, bv, 4)
          + 2 * _padded(bn, k, 4) + _padded(k, bv, 4) + 4 * _padded(bn, bv, 4)
          + 7 * _padded(bn, 1, 4))


def _block(fn: str, name: str, block: int, size: int, multiple: int) -> int:
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise ValueError(f"{fn}: {name} must be a positive int, got {block!r}.")
  if block < size and block % multiple:
    raise ValueError(f"{fn}: {name}={block} must be a multiple of {multiple} or "
                     f"cover the whole axis (size {size}).")
  return min(block, -(-size // multiple) * multiple)


def _kernel(*refs, v: int, block_vocab: int, num_codes: int, inv_temp: float, compute_dtype,
            has_bias: bool, has_token_bias: bool):
  h_ref, w_ref, codes_ref, *refs = refs
  b_ref = refs.pop(0) if has_bias else None
  tb_ref = refs.pop(0) if has_token_bias else None
  mass_ref, lse_ref, ent_ref, bm_ref, max_ref, l_ref, c_ref, s_ref = refs
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    for ref in (l_ref, c_ref, s_ref, mass_ref):
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  u = lax.dot_general(h_ref[...].astype(compute_dtype), w_ref[...].astype(compute_dtype),
                      _NT_DIMS, preferred_element_type=jnp.float32)
  if b_ref is not None:
    u = u + b_ref[...]
  u = u * inv_temp
  col_ok = j * block_vocab + lax.broadcasted_iota(jnp.int32, u.shape, 1) < v
  prev_max = max_ref[...]
  new_max = jnp.maximum(prev_max, jnp.max(jnp.where(col_ok, u, -jnp.inf), axis=1,
                                          keepdims=True))
  scale = jnp.exp(prev_max - new_max)
  centred = jnp.where(col_ok, u - new_max, 0.0)
  e = jnp.where(col_ok, jnp.exp(centred), 0.0)
  l_prev = l_ref[...]
  shift = jnp.where(l_prev > 0, (prev_max - new_max) * l_prev, 0.0)
  c_ref[...] = scale * (c_ref[...] + shift) + jnp.sum(e * centred, axis=1, keepdims=True)
  l_ref[...] = scale * l_prev + jnp.sum(e, axis=1, keepdims=True)
  max_ref[...] = new_max
  if tb_ref is not None:
    tb = jnp.where(col_ok[:1], tb_ref[...], 0.0)
    s_ref[...] = scale * s_ref[...] + jnp.sum(e * tb, axis=1, keepdims=True)
  # onehot[k, v] = (m(v) == k); codes past V may be anything, their e is 0.
  onehot = (lax.broadcasted_iota(jnp.int32, (num_codes, block_vocab), 0)
            == codes_ref[...]).astype(jnp.float32)
  mass_ref[...] = scale * mass_ref[...] + lax.dot_general(
      e, onehot, _NT_DIMS, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    l = l_ref[...]
    mass_ref[...] = mass_ref[...] / l
    lse_ref[...] = max_ref[...] + jnp.log(l)
    ent_ref[...] = c_ref[...] / l - jnp.log(l)
    bm_ref[...] = s_ref[...] / l


def teacher_code_mass(hidden, weight, bias, assignment, token_bias, *, num_codes: int,
                      temperature: float = 1.0, block_tokens: int | None = None,
                      block_vocab: int | None = None, interpret: bool = False):
  """``(code_mass[N, K], lse[N], neg_entropy[N], bias_mean[N] | None)``, float32.

  Args:
    hidden: ``[N, D]`` float32 or bfloat16 teacher hidden states.
    weight: ``[V, D]`` float32 or bfloat16 teacher output embedding.
    bias: ``[V]`` teacher bias or None.
    assignment: ``[V]`` int code of each token in ``[0, num_codes)``.
    token_bias: ``[V]`` student per-token bias or None (then ``bias_mean`` is None).
    num_codes: ``K``.
    temperature: ``T > 0`` dividing the teacher logits.
    block_tokens, block_vocab: the logit tile, multiples of 8 and 128 unless they
      cover the axis (defaults 256 x 512).
    interpret: run in the Pallas interpreter (any platform).
  """
  for name, x in (("hidden", hidden), ("weight", weight)):
    if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
      raise ValueError(f"teacher_code_mass: {name} must be float32 or bfloat16, got {x.dtype}.")
  if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
    raise ValueError(f"teacher_code_mass: expected hidden [N, D] and weight [V, D], got "
                     f"{hidden.shape} and {weight.shape}.")
  (n, d), v = hidden.shape, weight.shape[0]
  compute_dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  bn = _block("teacher_code_mass", "block_tokens", block_tokens or DEFAULT_BLOCK_TOKENS, n,
              _SUBLANES)
  bv = _block("teacher_code_mass", "block_vocab", block_vocab or DEFAULT_BLOCK_VOCAB, v, _LANES)
  k = num_codes
  held = lambda shape: pl.BlockSpec(shape, lambda i, j: (i, 0), pipeline_mode=pl.Buffered(1))
  lane_row = pl.BlockSpec((1, bv), lambda i, j: (0, j))
  in_specs = [held((bn, d)), pl.BlockSpec((bv, d), lambda i, j: (j, 0)), lane_row]
  operands = [hidden, weight, assignment.astype(jnp.int32).reshape(1, v)]
  for x in (bias, token_bias):
    if x is not None:
      in_specs.append(lane_row)
      operands.append(x.astype(jnp.float32).reshape(1, v))
  need = vmem_bytes(bn, bv, d, k, compute_dtype)
  mass, lse, ent, bias_mean = pl.pallas_call(
      functools.partial(_kernel, v=v, block_vocab=bv, num_codes=k, inv_temp=1.0 / temperature,
                        compute_dtype=compute_dtype, has_bias=bias is not None,
                        has_token_bias=token_bias is not None),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=in_specs,
      out_specs=[held((bn, k))] + [held((bn, 1))] * 3,
      out_shape=[jax.ShapeDtypeStruct((n, k), jnp.float32)]
      + [jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 3,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 4,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary"),
          vmem_limit_bytes=max(VMEM_BUDGET_BYTES, need + need // 4)),
      interpret=interpret,
  )(*operands)
  return mass, lse[:, 0], ent[:, 0], None if token_bias is None else bias_mean[:, 0]


# --------------------------------------------------------------------------- scatter kernels
# Shared by scatter_logits, scatter_top_k and segment_sum: the code logits z[N, K]
# (or probabilities [N, V]) and the assignment m[V] as a lane row of int32 codes.

_NN_DIMS = (((1,), (0,)), ((), ()))   # a @ b
_INT32_MAX = 2**31 - 1
_TAKEN = -2**31                       # a selected entry of the running merge
_PAD = _TAKEN + 1                     # an empty slot: below every token's order key
_KEY_FLOOR = _TAKEN + 2               # the lowest order key of a token (see _order_key)


def _static_int(fn: str, name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not hasattr(value, "__index__"):
    raise ValueError(f"{fn}: {name} must be an int, got {value!r}.")
  value = int(value.__index__())
  if value < minimum:
    raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}.")
  return value


def _float_operand(fn: str, name: str, x, ndim: int):
  x = jnp.asarray(x)
  if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
    raise ValueError(f"{fn}: {name} must be float32 or bfloat16, got {x.dtype}.")
  if x.ndim != ndim:
    raise ValueError(f"{fn}: {name} must have rank {ndim}, got shape {x.shape}.")
  return x


def _codes_row(fn: str, assignment):
  """``assignment`` [V] as an int32 lane row ``[1, V]``."""
  assignment = jnp.asarray(assignment)
  if not jnp.issubdtype(assignment.dtype, jnp.integer) or assignment.ndim != 1:
    raise ValueError(f"{fn}: assignment must be an integer [V] array, got "
                     f"{assignment.dtype}{list(assignment.shape)}.")
  if assignment.shape[0] < 1:
    raise ValueError(f"{fn}: assignment must hold at least one token.")
  return assignment.astype(jnp.int32).reshape(1, -1)


def _code_logits_and_codes(fn: str, code_logits, assignment):
  """Validated code logits ``[N, K]`` (``K >= 1``) and the int32 code row ``[1, V]``."""
  code_logits = _float_operand(fn, "code_logits", code_logits, 2)
  if code_logits.shape[1] < 1:
    raise ValueError(f"{fn}: code_logits must hold at least one code, got shape "
                     f"{code_logits.shape}.")
  return code_logits, _codes_row(fn, assignment)


def _vector_row(fn: str, name: str, x, size: int, of: str):
  """An optional float ``[size]`` operand as float32 ``[1, size]`` (or None)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.shape != (size,):
    raise ValueError(f"{fn}: {name} must be a float [{size}] array ({of}) or None, got "
                     f"{x.dtype}{list(x.shape)}.")
  return x.astype(jnp.float32).reshape(1, size)


def _onehot(codes, num_codes: int, dtype):
  """``onehot[k, j] = (codes[0, j] == k)``: ``[K, bv]`` from the ``[1, bv]`` code row."""
  hit = lax.broadcasted_iota(jnp.int32, (num_codes, codes.shape[1]), 0) == codes
  return hit.astype(jnp.float32).astype(dtype)


def _gather(z, codes, num_codes: int):
  """``z[:, codes[0]]`` as float32 ``[bn, bv]``, bit-exact, from ``z`` [bn, K] and codes [1, bv].

  ``z @ onehot``: each output column has exactly one nonzero term, so a float32
  product at HIGHEST precision (a bfloat16 one for bfloat16 ``z``: one MXU pass) is
  exact. Non-finite ``z`` would spread ``inf * 0 = NaN`` over every column, so the
  product sees ``z`` with them zeroed and a second, single-pass product carries a
  small-integer flag per code (-1: -inf, 1: +inf, 2: NaN; exact in bfloat16) that
  restores them afterwards. Codes outside ``[0, K)`` (never valid) give 0.
  """
  z32 = z.astype(jnp.float32)
  finite = jnp.abs(z32) < jnp.inf
  clean = jnp.where(finite, z32, 0.0)
  onehot16 = _onehot(codes, num_codes, jnp.bfloat16)
  if z.dtype == jnp.bfloat16:
    vals = lax.dot_general(clean.astype(jnp.bfloat16), onehot16, _NN_DIMS,
                           preferred_element_type=jnp.float32)
  else:
    vals = lax.dot_general(clean, _onehot(codes, num_codes, jnp.float32), _NN_DIMS,
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  flag = jnp.where(z32 == -jnp.inf, -1.0, jnp.where(z32 == jnp.inf, 1.0,
                                                    jnp.where(finite, 0.0, 2.0)))
  flag = lax.dot_general(flag.astype(jnp.bfloat16), onehot16, _NN_DIMS,
                         preferred_element_type=jnp.float32)
  return jnp.where(flag < -0.5, -jnp.inf,
                   jnp.where(flag > 1.5, jnp.nan, jnp.where(flag > 0.5, jnp.inf, vals)))


def _lane_row_spec(bv: int):
  return pl.BlockSpec((1, bv), lambda i, j: (0, j))


def _held(shape):
  """A block that stays put along the vocabulary axis (one buffer)."""
  return pl.BlockSpec(shape, lambda i, j: (i, 0), pipeline_mode=pl.Buffered(1))


def _limit(need: int) -> int:
  return max(VMEM_BUDGET_BYTES, need + need // 4)


# --------------------------------------------------------------------------- scatter_logits

def scatter_vmem_bytes(block_tokens: int, block_vocab: int, num_codes: int, dtype,
                       out_dtype) -> int:
  """Estimated VMEM of :func:`scatter_logits`: the held ``[bn, K]`` code logits and their
  float32 temporaries, double-buffered code / bias rows and output tiles, the
  ``[K, bv]`` one-hots (float32 and bfloat16) and four float32 tile temporaries."""
  bn, bv, k = block_tokens, block_vocab, num_codes
  return (_padded(bn, k, jnp.dtype(dtype).itemsize) + 3 * _padded(bn, k, 4)
          + 4 * _padded(1, bv, 4) + _padded(bn, 1, 4)
          + 2 * _padded(bn, bv, jnp.dtype(out_dtype).itemsize)
          + _padded(k, bv, 4) + _padded(k, bv, 2) + 4 * _padded(bn, bv, 4))


def _scatter_kernel(*refs, num_codes: int, has_bias: bool, has_shift: bool):
  z_ref, codes_ref, *refs = refs
  tb_ref = refs.pop(0) if has_bias else None
  shift_ref = refs.pop(0) if has_shift else None
  (out_ref,) = refs
  out = _gather(z_ref[...], codes_ref[...], num_codes)
  if tb_ref is not None:
    out = out + tb_ref[...]
  if shift_ref is not None:
    out = out - shift_ref[...]
  # Ragged last tiles: the extra rows / columns are dropped on write-back.
  out_ref[...] = out.astype(out_ref.dtype)


def scatter_logits(code_logits, assignment, token_bias, shift, *, out_dtype=None,
                   block_tokens: int | None = None, block_vocab: int | None = None,
                   interpret: bool = False):
  """``out[n, v] = z[n, m(v)] + b[v] - shift[n]``: ``[N, K] -> [N, V]``.

  The gather is exact (see ``_gather``): ``-inf`` / ``+inf`` / NaN code logits
  reach exactly the tokens of their code; the bias and shift are added in float32.

  Args:
    code_logits: ``[N, K]`` float32 or bfloat16 code logits ``z``.
    assignment: ``[V]`` int code of each token in ``[0, K)`` (not checked: an
      out-of-range code reads 0).
    token_bias: ``[V]`` float per-token bias ``b`` or None.
    shift: ``[N]`` float (taken as float32) per-row shift, e.g. a log-normalizer, or None.
    out_dtype: float32 or bfloat16 (default: ``code_logits.dtype``).
    block_tokens, block_vocab: the output tile, multiples of 8 and 128 unless they
      cover the axis (defaults 256 x 512).
    interpret: run in the Pallas interpreter (any platform).

  Returns:
    ``[N, V]`` in ``out_dtype``.
  """
  fn = "scatter_logits"
  code_logits, codes = _code_logits_and_codes(fn, code_logits, assignment)
  (n, k), v = code_logits.shape, codes.shape[1]
  out_dtype = jnp.dtype(code_logits.dtype if out_dtype is None else out_dtype)
  if out_dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"{fn}: out_dtype must be float32 or bfloat16, got {out_dtype}.")
  tb = _vector_row(fn, "token_bias", token_bias, v, "V = len(assignment)")
  shift = _vector_row(fn, "shift", shift, n, "N = code_logits.shape[0]")
  bn = _block(fn, "block_tokens", block_tokens or DEFAULT_BLOCK_TOKENS, n, _SUBLANES)
  bv = _block(fn, "block_vocab", block_vocab or DEFAULT_BLOCK_VOCAB, v, _LANES)
  if n == 0:
    return jnp.zeros((0, v), out_dtype)
  in_specs = [_held((bn, k)), _lane_row_spec(bv)]
  operands = [code_logits, codes]
  if tb is not None:
    in_specs.append(_lane_row_spec(bv))
    operands.append(tb)
  if shift is not None:
    in_specs.append(_held((bn, 1)))
    operands.append(shift.reshape(n, 1))
  need = scatter_vmem_bytes(bn, bv, k, code_logits.dtype, out_dtype)
  return pl.pallas_call(
      functools.partial(_scatter_kernel, num_codes=k, has_bias=tb is not None,
                        has_shift=shift is not None),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bn, bv), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n, v), out_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=_limit(need)),
      interpret=interpret,
  )(*operands)


# --------------------------------------------------------------------------- scatter_top_k

def _order_key(x):
  """float32 -> int32 with the order of ``lax.top_k`` (the IEEE total order):
  ``-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN``; negative floats flip their
  magnitude bits. Clamped at ``_KEY_FLOOR`` (only the two lowest -NaN patterns move)."""
  bits = lax.bitcast_convert_type(x, jnp.int32)
  key = bits ^ (lax.shift_right_arithmetic(bits, 31) & 0x7FFFFFFF)
  return jnp.maximum(key, _KEY_FLOOR)


def _key_value(key):
  """The inverse of ``_order_key`` (the flip is an involution)."""
  bits = key ^ (lax.shift_right_arithmetic(key, 31) & 0x7FFFFFFF)
  return lax.bitcast_convert_type(bits, jnp.float32)


def top_k_vmem_bytes(block_tokens: int, block_vocab: int, num_codes: int, k: int,
                     dtype) -> int:
  """Estimated VMEM of :func:`scatter_top_k`: the held code logits, code / bias rows,
  the held ``[bn, k]`` outputs, four ``[bn, kp]`` running-list scratches and one
  ``[bn, bv]`` tile scratch, the one-hots and eight tile-sized temporaries."""
  bn, bv, kc = block_tokens, block_vocab, num_codes
  kp = -(-k // _LANES) * _LANES
  return (_padded(bn, kc, jnp.dtype(dtype).itemsize) + 3 * _padded(bn, kc, 4)
          + 4 * _padded(1, bv, 4) + 2 * _padded(bn, k, 4) + 4 * _padded(bn, kp, 4)
          + _padded(bn, bv, 4) + _padded(kc, bv, 4) + _padded(kc, bv, 2)
          + 8 * _padded(bn, bv, 4) + 6 * _padded(bn, kp, 4))


def _top_k_kernel(*refs, n: int, v: int, block_tokens: int, block_vocab: int, num_codes: int,
                  k: int, has_bias: bool):
  z_ref, codes_ref, *refs = refs
  tb_ref = refs.pop(0) if has_bias else None
  vals_ref, ids_ref, run_key, run_id, new_key, new_id, tile_key = refs
  i, j = pl.program_id(0), pl.program_id(1)
  bn, bv = block_tokens, block_vocab
  kp = run_key.shape[1]

  @pl.when(j == 0)
  def _init():
    run_key[...] = jnp.full(run_key.shape, _PAD, jnp.int32)
    run_id[...] = jnp.full(run_id.shape, _INT32_MAX, jnp.int32)

  logits = _gather(z_ref[...], codes_ref[...], num_codes)
  if tb_ref is not None:
    logits = logits + tb_ref[...]
  def tile_ids():
    # Token ids of the tile; ragged columns are empty slots (id INT32_MAX).
    col = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    return jnp.where(col < v, col, _INT32_MAX)

  # Ragged rows are never written back; their keys are made empty too, so that
  # they do not trigger merges.
  row = i * bn + lax.broadcasted_iota(jnp.int32, (bn, bv), 0)
  key = jnp.where((tile_ids() < _INT32_MAX) & (row < n), _order_key(logits), _PAD)
  # Tiles come in increasing token id: a tile entry beats the running k-th entry
  # exactly when its key is strictly greater (an equal key has a higher id).
  slot = lax.broadcasted_iota(jnp.int32, (bn, kp), 1)
  kth = jnp.max(jnp.where(slot == k - 1, run_key[...], _TAKEN), axis=1, keepdims=True)
  enters = jnp.max(key, axis=1, keepdims=True) > kth
  needed = jnp.max(jnp.where(enters, 1.0, 0.0)) > 0.0

  @pl.when(needed)
  def _merge():
    tile_key[...] = key
    new_key[...] = jnp.full(new_key.shape, _PAD, jnp.int32)
    new_id[...] = jnp.full(new_id.shape, _INT32_MAX, jnp.int32)

    def select(r, carry):
      rk, rid, tk, ids = run_key[...], run_id[...], tile_key[...], tile_ids()
      slot = lax.broadcasted_iota(jnp.int32, (bn, kp), 1)
      best = jnp.maximum(jnp.max(rk, axis=1, keepdims=True), jnp.max(tk, axis=1, keepdims=True))
      pick = jnp.minimum(
          jnp.min(jnp.where(rk == best, rid, _INT32_MAX), axis=1, keepdims=True),
          jnp.min(jnp.where(tk == best, ids, _INT32_MAX), axis=1, keepdims=True))
      # Everything taken (fewer than k tokens seen yet): an empty slot.
      done = best == _TAKEN
      pick = jnp.where(done, _INT32_MAX, pick)
      new_key[...] = jnp.where(slot == r, jnp.where(done, _PAD, best), new_key[...])
      new_id[...] = jnp.where(slot == r, pick, new_id[...])
      run_key[...] = jnp.where(rid == pick, _TAKEN, rk)
      tile_key[...] = jnp.where(ids == pick, _TAKEN, tk)
      return carry

    lax.fori_loop(0, k, select, 0)
    run_key[...] = new_key[...]
    run_id[...] = new_id[...]

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    vals_ref[...] = _key_value(run_key[...][:, :k])
    ids_ref[...] = run_id[...][:, :k]


def scatter_top_k(code_logits, assignment, token_bias, *, k: int,
                  block_tokens: int | None = None, block_vocab: int | None = None,
                  interpret: bool = False):
  """``lax.top_k(z[:, m] + b, k)`` without the ``[N, V]`` logits: ``(values, ids)``.

  Streams vocabulary tiles (gathered exactly as in :func:`scatter_logits`, plus the
  bias in float32) into a running top-k held in VMEM. The order is ``lax.top_k``'s,
  exactly: descending in the IEEE total order (``+NaN`` above ``+inf``, ``-inf``
  and ``-NaN`` last, ``+0`` above ``-0``), ties to the lower token id; tokens whose
  logit is ``-inf`` therefore also come in increasing id. NaN code logits are
  gathered as ``+NaN`` (they rank first); NaN payloads are not kept.

  Args:
    code_logits: ``[N, K]`` float32 or bfloat16 code logits.
    assignment: ``[V]`` int code of each token in ``[0, K)`` (not checked).
    token_bias: ``[V]`` float per-token bias or None.
    k: how many tokens, ``1 <= k <= V``.
    block_tokens, block_vocab: the logit tile, multiples of 8 and 128 unless they
      cover the axis (defaults 256 x 512).
    interpret: run in the Pallas interpreter (any platform).

  Returns:
    float32 values ``[N, k]`` in descending order and int32 token ids ``[N, k]``.
  """
  fn = "scatter_top_k"
  code_logits, codes = _code_logits_and_codes(fn, code_logits, assignment)
  (n, kc), v = code_logits.shape, codes.shape[1]
  k = _static_int(fn, "k", k, 1)
  if k > v:
    raise ValueError(f"{fn}: k = {k} exceeds the vocabulary size V = {v}.")
  tb = _vector_row(fn, "token_bias", token_bias, v, "V = len(assignment)")
  bn = _block(fn, "block_tokens", block_tokens or DEFAULT_BLOCK_TOKENS, n, _SUBLANES)
  bv = _block(fn, "block_vocab", block_vocab or DEFAULT_BLOCK_VOCAB, v, _LANES)
  if n == 0:
    return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
  kp = -(-k // _LANES) * _LANES
  in_specs = [_held((bn, kc)), _lane_row_spec(bv)]
  operands = [code_logits, codes]
  if tb is not None:
    in_specs.append(_lane_row_spec(bv))
    operands.append(tb)
  need = top_k_vmem_bytes(bn, bv, kc, k, code_logits.dtype)
  vals, ids = pl.pallas_call(
      functools.partial(_top_k_kernel, n=n, v=v, block_tokens=bn, block_vocab=bv,
                        num_codes=kc, k=k, has_bias=tb is not None),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=in_specs,
      out_specs=[_held((bn, k)), _held((bn, k))],
      out_shape=[jax.ShapeDtypeStruct((n, k), jnp.float32),
                 jax.ShapeDtypeStruct((n, k), jnp.int32)],
      scratch_shapes=[pltpu.VMEM((bn, kp), jnp.int32)] * 4 + [pltpu.VMEM((bn, bv), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=_limit(need)),
      interpret=interpret,
  )(*operands)
  return vals, ids


# --------------------------------------------------------------------------- segment_sum

def segment_sum_vmem_bytes(block_tokens: int, block_vocab: int, num_codes: int, dtype) -> int:
  """Estimated VMEM of :func:`segment_sum`: double-buffered probability tiles and code
  rows, the held float32 ``[bn, K]`` output, the ``[K, bv]`` one-hot, two float32
  tile temporaries and the matmul result."""
  bn, bv, k = block_tokens, block_vocab, num_codes
  return (2 * _padded(bn, bv, jnp.dtype(dtype).itemsize) + 2 * _padded(1, bv, 4)
          + 2 * _padded(bn, k, 4) + _padded(k, bv, 4) + 2 * _padded(bn, bv, 4))


def _segment_sum_kernel(p_ref, codes_ref, out_ref, *, v: int, block_vocab: int, num_codes: int):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

  col_ok = j * block_vocab + lax.broadcasted_iota(jnp.int32, (1, block_vocab), 1) < v
  e = jnp.where(col_ok, p_ref[...].astype(jnp.float32), 0.0)
  if p_ref.dtype == jnp.bfloat16:
    # bfloat16 values times 0/1, accumulated in float32: exact in one MXU pass.
    part = lax.dot_general(e.astype(jnp.bfloat16), _onehot(codes_ref[...], num_codes,
                                                           jnp.bfloat16),
                           _NT_DIMS, preferred_element_type=jnp.float32)
  else:
    part = lax.dot_general(e, _onehot(codes_ref[...], num_codes, jnp.float32), _NT_DIMS,
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  out_ref[...] += part


def segment_sum(probs, assignment, *, num_codes: int, block_tokens: int | None = None,
                block_vocab: int | None = None, interpret: bool = False):
  """``P[n, k] = sum_{v: m(v)=k} probs[n, v]``: ``[N, V] -> [N, K]`` float32.

  The transpose of :func:`scatter_logits`. Per vocabulary tile the segment sum is
  the matmul ``probs_tile @ onehot.T`` (HIGHEST precision: float32 products; a
  code that holds no token gets 0), accumulated in the held float32 output block.
  ``probs`` should be finite: a NaN or infinite entry turns its whole row NaN
  (the matmul multiplies it by the zeros of the other codes).

  Args:
    probs: ``[N, V]`` float32 or bfloat16.
    assignment: ``[V]`` int code of each token in ``[0, num_codes)`` (not checked:
      a token with an out-of-range code is dropped).
    num_codes: ``K >= 1``.
    block_tokens, block_vocab: the tile, multiples of 8 and 128 unless they cover
      the axis (defaults 256 x 512).
    interpret: run in the Pallas interpreter (any platform).
  """
  fn = "segment_sum"
  probs = _float_operand(fn, "probs", probs, 2)
  codes = _codes_row(fn, assignment)
  num_codes = _static_int(fn, "num_codes", num_codes, 1)
  n, v = probs.shape
  if codes.shape[1] != v:
    raise ValueError(f"{fn}: probs must be [N, V] with V = len(assignment) = "
                     f"{codes.shape[1]}, got shape {probs.shape}.")
  bn = _block(fn, "block_tokens", block_tokens or DEFAULT_BLOCK_TOKENS, n, _SUBLANES)
  bv = _block(fn, "block_vocab", block_vocab or DEFAULT_BLOCK_VOCAB, v, _LANES)
  if n == 0:
    return jnp.zeros((0, num_codes), jnp.float32)
  need = segment_sum_vmem_bytes(bn, bv, num_codes, probs.dtype)
  return pl.pallas_call(
      functools.partial(_segment_sum_kernel, v=v, block_vocab=bv, num_codes=num_codes),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=[pl.BlockSpec((bn, bv), lambda i, j: (i, j)), _lane_row_spec(bv)],
      out_specs=_held((bn, num_codes)),
      out_shape=jax.ShapeDtypeStruct((n, num_codes), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=_limit(need)),
      interpret=interpret,
  )(probs, codes)
