"""Teacher code mass of VQ-Logits distillation: a Pallas kernel for TPU (Mosaic).

For a dense teacher head ``u = (hidden @ weight.T + bias) / T`` and a code
assignment ``m: V -> K``, one kernel computes per token, without the ``[N, V]``
logits reaching HBM::

  code_mass[n, k] = sum_{v: m(v)=k} softmax(u)[n, v]     lse[n] = logsumexp_v u[n, v]
  neg_entropy[n]  = sum_v p log p                        bias_mean[n] = sum_v p[n, v] b_v

Grid: token tiles (parallel, held in VMEM) x vocabulary tiles (sequential,
streamed). An online softmax keeps the running max ``m`` and, centred on it, the
float32 accumulators ``l = sum e``, ``c = sum e (u - m)``, ``s = sum e b`` and the
``[bn, K]`` code mass ``sum e onehot``, with ``e = exp(u - m)``; they are rescaled
by ``exp(m - m')`` when the max grows (``c`` also gains ``(m - m') l``). The segment
sum is an MXU matmul ``e @ onehot.T`` with ``onehot[k, v] = (m(v) == k)`` built
in VMEM from the lane vector of codes: no scatter. The code mass accumulates
directly in its (held, float32) output block.

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

__all__ = ["DEFAULT_BLOCK_TOKENS", "DEFAULT_BLOCK_VOCAB", "teacher_code_mass", "vmem_bytes"]

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


def _block(name: str, block: int, size: int, multiple: int) -> int:
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"teacher_code_mass: {name} must be a positive int, got {block!r}.")
  if block < size and block % multiple:
    raise ValueError(f"teacher_code_mass: {name}={block} must be a multiple of {multiple} or "
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
  bn = _block("block_tokens", block_tokens or DEFAULT_BLOCK_TOKENS, n, _SUBLANES)
  bv = _block("block_vocab", block_vocab or DEFAULT_BLOCK_VOCAB, v, _LANES)
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
