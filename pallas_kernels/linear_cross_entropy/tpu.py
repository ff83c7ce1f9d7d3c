"""Fused linear cross-entropy: Pallas kernels for TPU (Mosaic).

The ``[N, V]`` logits ``z = cap(hidden @ weight.T + bias)`` never reach HBM. Three
kernels each hold one tile in VMEM ("held", the parallel grid axis) and stream
the other operand past it (the sequential grid axis), recomputing the logit
tile from ``hidden`` and ``weight`` on the MXU with float32 accumulation:

* ``forward`` (grid: token tiles x vocab tiles). Online log-sum-exp: a running
  max and sum of exponentials per token in VMEM scratch, plus the label logit
  and, with label smoothing, the logit sum; ``lse = max + log(sum)`` at the last
  vocabulary tile.
* ``d_hidden`` (grid: token tiles x vocab tiles). ``g = dloss/dz`` from the
  saved ``lse``, then ``d_hidden += g @ W_tile`` into a float32 accumulator.
* ``d_weight`` (grid: vocab tiles x token tiles). The tile is computed
  transposed, ``zT = W_tile @ hidden_tile.T``, so that ``d_weight += gT @
  hidden_tile`` and ``d_bias += sum(gT)`` are plain matmuls / lane reductions
  (Mosaic needs no transpose). TPU has no atomics, so this pass recomputes the
  logits instead of sharing ``g`` with ``d_hidden``.

With ``g`` from the cross-entropy algebra (smoothed target ``on * [v == y] +
off``, z-loss folded into ``p_scale`` by the caller)::

  p = exp(z - lse),   g = where(valid, (p_scale * p - d_loss * target) * cap'(z), 0)

and Cut Cross-Entropy's gradient filtering: a (token tile x vocab tile) block
whose every entry of ``|(1 + 2 z_loss lse) p - target|`` is below ``filter_eps``
adds nothing (``pl.when`` skips its matmul).

In every kernel the held axis is the sublane axis of the logit tile (blocks of 8)
and the streamed axis its lane axis (blocks of 128). Operands that stay put while
the sequential axis runs are single-buffered (``pl.Buffered(1)``); only the
streamed operand is double-buffered. Ragged sizes need no copy of ``hidden`` or
``weight``: the last tile reads past the array's end, its extra logit columns and
rows are masked with ``jnp.where`` (never by multiplying: the padding may hold
NaN), and the extra rows of an operand that a matmul contracts over are zeroed in
VMEM first.

References:
  Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models (Cut
  Cross-Entropy), arXiv:2411.09009.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["KERNELS", "VMEM_BUDGET_BYTES", "backward", "default_blocks", "forward", "vmem_bytes"]

VMEM_BUDGET_BYTES = 16 * 1024 * 1024
"""VMEM the default blocks may use: the default scoped VMEM limit of TPU v5e."""

KERNELS = ("forward", "d_hidden", "d_weight")
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LANES, _SUBLANES = 128, 8
# Candidate held / streamed block sizes for the defaults, see `default_blocks`.
_HELD_BLOCKS = (1024, 512, 256, 128, 64, 32, 16)
_STREAMED_BLOCKS = (512, 256, 128)
# Live float32 copies of the logit tile counted by `vmem_bytes` (z, its masked
# form, exponentials / probabilities, the gradient and the masks between them).
_LOGIT_TILE_TEMPORARIES = 4
_NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T


# --------------------------------------------------------------------------- blocks and VMEM

def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
  """VMEM bytes of a ``[rows, cols]`` array padded to the native tile (8 * packing, 128)."""
  sublanes = _SUBLANES * (4 // itemsize)
  return -(-rows // sublanes) * sublanes * -(-cols // _LANES) * _LANES * itemsize


def vmem_bytes(kernel: str, block_tokens: int, block_vocab: int, d: int, dtype) -> int:
  """Estimated VMEM use of one of the ``KERNELS`` for the given blocks.

  Counts the blocks of every operand (two buffers where streamed, one where
  held), the scratch accumulators, the float32 matmul product added into them,
  and ``_LOGIT_TILE_TEMPORARIES`` float32 copies of the logit tile plus its cast
  to ``dtype``, the dtype of ``hidden`` and ``weight`` (the kernels take the bias
  in float32). Vectors count at their padded size: a ``[bn, 1]`` block takes
  ``bn x 128`` words.
  """
  if kernel not in KERNELS:
    raise ValueError(f"vmem_bytes: kernel must be one of {KERNELS}, got {kernel!r}.")
  b = jnp.dtype(dtype).itemsize
  bn, bv = block_tokens, block_vocab
  if kernel == "forward":
    return (_tile_bytes(bn, d, b)                  # hidden
            + 2 * _tile_bytes(bv, d, b)            # weight
            + 2 * _tile_bytes(1, bv, 4)            # bias
            + 6 * _tile_bytes(bn, 1, 4)            # labels, 3 outputs, 2 scratch vectors
            + _LOGIT_TILE_TEMPORARIES * _tile_bytes(bn, bv, 4))
  if kernel == "d_hidden":
    return (2 * _tile_bytes(bn, d, b)              # hidden, d_hidden
            + 2 * _tile_bytes(bv, d, b)            # weight
            + 2 * _tile_bytes(1, bv, 4)            # bias
            + 5 * _tile_bytes(bn, 1, 4)            # per-token vectors
            + 2 * _tile_bytes(bn, d, 4)            # accumulator, matmul product
            + _LOGIT_TILE_TEMPORARIES * _tile_bytes(bn, bv, 4) + _tile_bytes(bn, bv, b))
  return (2 * _tile_bytes(bv, d, b)                # weight, d_weight
          + 2 * _tile_bytes(bn, d, b)              # hidden
          + 2 * _tile_bytes(bv, 1, 4)              # bias, d_bias
          + 10 * _tile_bytes(1, bn, 4)             # per-token rows
          + 2 * _tile_bytes(bv, d, 4)              # accumulator, matmul product
          + _LOGIT_TILE_TEMPORARIES * _tile_bytes(bv, bn, 4) + _tile_bytes(bv, bn, b))


def _as_blocks(kernel: str, held: int, streamed: int) -> tuple[int, int]:
  """``(block_tokens, block_vocab)`` of a kernel from its held / streamed block sizes."""
  return (streamed, held) if kernel == "d_weight" else (held, streamed)


def default_blocks(kernel: str, d: int, dtype) -> tuple[int, int]:
  """Default ``(block_tokens, block_vocab)`` of a kernel for hidden size ``d``.

  The held block sets the arithmetic intensity (FLOPs per byte streamed from
  HBM), so it is the largest that fits ``VMEM_BUDGET_BYTES`` with a streamed
  (lane) block of at least 256, which fills the 256-wide MXU of recent TPUs;
  the streamed block then grows up to 512. Only when nothing fits that way is a
  128-wide streamed block used (large ``d`` in float32).
  """
  if kernel not in KERNELS:
    raise ValueError(f"default_blocks: kernel must be one of {KERNELS}, got {kernel!r}.")
  candidates = sorted(((h, s) for h in _HELD_BLOCKS for s in _STREAMED_BLOCKS),
                      key=lambda hs: (hs[1] >= 256, hs[0], hs[1]), reverse=True)
  for held, streamed in candidates:
    blocks = _as_blocks(kernel, held, streamed)
    if vmem_bytes(kernel, *blocks, d, dtype) <= VMEM_BUDGET_BYTES:
      return blocks
  return _as_blocks(kernel, _HELD_BLOCKS[-1], _STREAMED_BLOCKS[-1])


def _resolve_blocks(fn: str, kernel: str, n: int, v: int, d: int, dtype,
                    block_tokens: int | None, block_vocab: int | None) -> tuple[int, int]:
  """Blocks of one kernel: the caller's or the defaults, checked and clipped.

  On the logit tile's lane axis a block is a multiple of 128, on its sublane
  axis a multiple of 8, unless it covers the whole axis; then it is clipped to
  the axis size rounded up to that multiple (a single, ragged tile), which keeps
  every array in the kernel tile-aligned.
  """
  default_bn, default_bv = default_blocks(kernel, d, dtype)
  blocks = []
  for name, given, default, size, lane in (
      ("block_tokens", block_tokens, default_bn, n, kernel == "d_weight"),
      ("block_vocab", block_vocab, default_bv, v, kernel != "d_weight")):
    block = default if given is None else given
    if not isinstance(block, int) or block < 1:
      raise ValueError(f"{fn}: {name} must be a positive int, got {block!r}.")
    multiple = _LANES if lane else _SUBLANES
    if block < size and block % multiple:
      axis = "lane" if lane else "sublane"
      raise ValueError(
          f"{fn}: {name}={block} must be a multiple of {multiple} (it is the {axis} axis of "
          f"the {kernel} kernel's logit tile) or cover the whole axis (size {size}).")
    block = min(block, -(-size // multiple) * multiple)
    blocks.append(block)
  return blocks[0], blocks[1]


def _compiler_params(kernel: str, block_tokens: int, block_vocab: int, d: int, dtype):
  """Parallel held axis, sequential streamed axis, and a VMEM limit that fits the blocks."""
  need = vmem_bytes(kernel, block_tokens, block_vocab, d, dtype)
  # A quarter on top of the estimate for Mosaic's own temporaries.
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                              vmem_limit_bytes=max(VMEM_BUDGET_BYTES, need + need // 4))


# --------------------------------------------------------------------------- input checks

def _compute_dtype(fn: str, hidden, weight, bias) -> jnp.dtype:
  """Checks shapes and dtypes; returns the matmul dtype ``promote_types(hidden, weight)``."""
  for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
    if x is not None and jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
      raise ValueError(f"{fn}: {name} must be float32 or bfloat16, got dtype {x.dtype}.")
  if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
    raise ValueError(f"{fn}: expected hidden [N, D] and weight [V, D], got shapes "
                     f"{hidden.shape} and {weight.shape}.")
  if bias is not None and bias.shape != (weight.shape[0],):
    raise ValueError(f"{fn}: bias must have shape [V]={weight.shape[:1]}, got {bias.shape}.")
  return jnp.promote_types(hidden.dtype, weight.dtype)


def _labels_in_range(labels, v: int):
  """int32 labels with every label outside ``[0, v)`` replaced by -1 (it matches no class)."""
  labels = labels.astype(jnp.int32)
  return jnp.where((labels >= 0) & (labels < v), labels, -1)


# --------------------------------------------------------------------------- kernel pieces

@dataclasses.dataclass(frozen=True)
class _Static:
  """Static description of one call, shared by its kernels."""
  n: int
  v: int
  block_tokens: int
  block_vocab: int
  compute_dtype: jnp.dtype
  softcap: float | None


def _logit_tile(cfg: _Static, rows, cols, bias):
  """``cap(rows @ cols.T + bias)`` in float32; the float32 ``bias`` broadcasts (or is None)."""
  z = lax.dot_general(rows.astype(cfg.compute_dtype), cols.astype(cfg.compute_dtype), _NT_DIMS,
                      preferred_element_type=jnp.float32)
  if bias is not None:
    z = z + bias
  return z if cfg.softcap is None else cfg.softcap * jnp.tanh(z / cfg.softcap)


def _index_below(shape, axis: int, offset, size: int):
  """``offset + iota(axis) < size`` over ``shape``."""
  return offset + lax.broadcasted_iota(jnp.int32, shape, axis) < size


def _zero_rows_from(ref, first: int) -> None:
  """Zeroes rows ``first:`` of a VMEM block (the part of a ragged tile past the array's end).

  Only the rows from the last (16, 128)-tile boundary at or below ``first`` are
  rewritten, so the slice stays aligned for 16-bit dtypes too; the select runs
  in float32.
  """
  start = first // 16 * 16
  tail = ref[start:, :].astype(jnp.float32)
  keep = _index_below(tail.shape, 0, start, first)
  ref[start:, :] = jnp.where(keep, tail, 0.0).astype(ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Grad:
  """Static options of ``g = dloss/dz``."""
  on: float
  off: float
  z_loss: float
  softcap: float | None
  filter_eps: float | None


def _grad_tile(opt: _Grad, z, is_label, keep, lse, d_loss, p_scale):
  """``g`` for a logit tile, zero outside ``keep``; and the tile's filter statistic.

  The per-token ``lse``, ``d_loss``, ``p_scale`` broadcast against ``z``. The
  statistic is ``max |(1 + 2 z_loss lse) p - target|`` over ``keep`` (None
  without filtering).
  """
  probs = jnp.exp(z - lse)
  target = jnp.where(is_label, opt.on, 0.0) + opt.off
  g = p_scale * probs - d_loss * target
  if opt.softcap is not None:
    g = g * (1.0 - jnp.square(z / opt.softcap))
  g = jnp.where(keep, g, 0.0)
  if opt.filter_eps is None:
    return g, None
  unscaled = (1.0 + 2.0 * opt.z_loss * lse) * probs - target
  return g, jnp.max(jnp.abs(jnp.where(keep, unscaled, 0.0)))


def _unless_filtered(opt: _Grad, statistic, accumulate) -> None:
  """Runs ``accumulate`` unless gradient filtering drops the tile."""
  if opt.filter_eps is None:
    accumulate()
  else:  # Not `statistic >= eps`: a NaN statistic must not hide a NaN gradient.
    pl.when(jnp.logical_not(statistic < opt.filter_eps))(accumulate)


def _held(block_shape, index_map) -> pl.BlockSpec:
  """Spec of a block that stays put while the sequential axis runs: one buffer."""
  return pl.BlockSpec(block_shape, index_map, pipeline_mode=pl.Buffered(1))


# --------------------------------------------------------------------------- forward

def _forward_kernel(*refs, cfg: _Static, has_bias: bool, with_logit_sum: bool):
  h_ref, w_ref, *refs = refs
  b_ref = refs.pop(0) if has_bias else None
  y_ref, lse_ref, label_ref, *refs = refs
  sum_ref = refs.pop(0) if with_logit_sum else None
  max_ref, exp_sum_ref = refs
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    exp_sum_ref[...] = jnp.zeros(exp_sum_ref.shape, jnp.float32)
    label_ref[...] = jnp.zeros(label_ref.shape, jnp.float32)
    if with_logit_sum:
      sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)

  z = _logit_tile(cfg, h_ref[...], w_ref[...], None if b_ref is None else b_ref[...])
  cols = j * cfg.block_vocab + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  col_ok = None if cfg.v % cfg.block_vocab == 0 else cols < cfg.v
  z_in = z if col_ok is None else jnp.where(col_ok, z, -jnp.inf)

  prev_max = max_ref[...]
  new_max = jnp.maximum(prev_max, jnp.max(z_in, axis=1)[:, None])
  exp_sum_ref[...] = (exp_sum_ref[...] * jnp.exp(prev_max - new_max)
                      + jnp.sum(jnp.exp(z_in - new_max), axis=1)[:, None])
  max_ref[...] = new_max
  # Labels are in [0, V) or -1, so they never select a column past V.
  label_ref[...] += jnp.sum(jnp.where(cols == y_ref[...], z, 0.0), axis=1)[:, None]
  if with_logit_sum:
    sum_ref[...] += jnp.sum(z if col_ok is None else jnp.where(col_ok, z, 0.0), axis=1)[:, None]

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    lse_ref[...] = max_ref[...] + jnp.log(exp_sum_ref[...])


def forward(hidden, weight, bias, labels, *, softcap, with_logit_sum, block_tokens=None,
            block_vocab=None, interpret=False):
  """Per-token statistics of the logits ``z = cap(hidden @ weight.T + bias)``.

  Args:
    hidden: ``[N, D]`` float32 or bfloat16.
    weight: ``[V, D]`` float32 or bfloat16 (the matmul runs in the promoted dtype).
    bias: ``[V]`` or None.
    labels: ``[N]`` int; a label outside ``[0, V)`` gives a label logit of 0.
    softcap: ``c`` of ``cap(x) = c * tanh(x / c)``, or None for no cap.
    with_logit_sum: whether to compute ``sum_v z`` (zeros otherwise).
    block_tokens, block_vocab: logit tile, multiples of 8 and 128 unless they cover
      the axis; None for ``default_blocks("forward", ...)``.
    interpret: run the kernel in the Pallas interpreter (any platform).

  Returns:
    float32 ``[N]`` arrays ``(lse, label_logit, logit_sum)``.
  """
  compute_dtype = _compute_dtype("forward", hidden, weight, bias)
  (n, d), v = hidden.shape, weight.shape[0]
  bn, bv = _resolve_blocks("forward", "forward", n, v, d, compute_dtype, block_tokens, block_vocab)
  cfg = _Static(n, v, bn, bv, compute_dtype, softcap)
  token = lambda i, j: (i, 0)
  in_specs = [_held((bn, d), token), pl.BlockSpec((bv, d), lambda i, j: (j, 0))]
  operands = [hidden, weight]
  if bias is not None:
    in_specs.append(pl.BlockSpec((1, bv), lambda i, j: (0, j)))
    operands.append(bias.astype(jnp.float32).reshape(1, v))
  in_specs.append(_held((bn, 1), token))
  operands.append(_labels_in_range(labels, v).reshape(n, 1))
  num_outputs = 3 if with_logit_sum else 2
  outputs = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg, has_bias=bias is not None,
                        with_logit_sum=with_logit_sum),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=in_specs,
      out_specs=[_held((bn, 1), token)] * num_outputs,
      out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * num_outputs,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 2,
      compiler_params=_compiler_params("forward", bn, bv, d, compute_dtype),
      interpret=interpret,
  )(*operands)
  outputs = [x[:, 0] for x in outputs]
  if not with_logit_sum:
    outputs.append(jnp.zeros((n,), jnp.float32))
  return tuple(outputs)


# --------------------------------------------------------------------------- backward

def _d_hidden_kernel(*refs, cfg: _Static, opt: _Grad, has_bias: bool):
  h_ref, w_ref, *refs = refs
  b_ref = refs.pop(0) if has_bias else None
  y_ref, valid_ref, lse_ref, d_loss_ref, p_scale_ref, out_ref, acc_ref = refs
  j = pl.program_id(1)
  last = pl.num_programs(1) - 1

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  ragged = cfg.v % cfg.block_vocab
  if ragged:
    # g @ W contracts over the tile's classes: rows of W past V must be finite.
    pl.when(j == last)(functools.partial(_zero_rows_from, w_ref, ragged))
  w = w_ref[...]
  z = _logit_tile(cfg, h_ref[...], w, None if b_ref is None else b_ref[...])
  cols = j * cfg.block_vocab + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  keep = jnp.broadcast_to(valid_ref[...], z.shape) != 0
  if ragged:
    keep = keep & (cols < cfg.v)
  g, statistic = _grad_tile(opt, z, cols == y_ref[...], keep, lse_ref[...], d_loss_ref[...],
                            p_scale_ref[...])

  def accumulate():
    acc_ref[...] += jnp.dot(g.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)

  _unless_filtered(opt, statistic, accumulate)

  @pl.when(j == last)
  def _finish():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _d_weight_kernel(*refs, cfg: _Static, opt: _Grad, has_bias: bool):
  w_ref, h_ref, *refs = refs
  b_ref = refs.pop(0) if has_bias else None
  y_ref, valid_ref, lse_ref, d_loss_ref, p_scale_ref, dw_ref, *refs = refs
  db_ref = refs.pop(0) if has_bias else None
  (acc_ref,) = refs
  i = pl.program_id(1)
  last = pl.num_programs(1) - 1

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if has_bias:
      db_ref[...] = jnp.zeros(db_ref.shape, jnp.float32)

  ragged = cfg.n % cfg.block_tokens
  if ragged:
    # gT @ hidden contracts over the tile's tokens: rows of hidden past N must be finite.
    pl.when(i == last)(functools.partial(_zero_rows_from, h_ref, ragged))
  h = h_ref[...]
  z_t = _logit_tile(cfg, w_ref[...], h, None if b_ref is None else b_ref[...])  # [bv, bn]
  classes = pl.program_id(0) * cfg.block_vocab + lax.broadcasted_iota(jnp.int32, z_t.shape, 0)
  keep = jnp.broadcast_to(valid_ref[...], z_t.shape) != 0
  if cfg.v % cfg.block_vocab:
    keep = keep & (classes < cfg.v)
  g_t, statistic = _grad_tile(opt, z_t, classes == y_ref[...], keep, lse_ref[...],
                              d_loss_ref[...], p_scale_ref[...])

  def accumulate():
    acc_ref[...] += jnp.dot(g_t.astype(cfg.compute_dtype), h.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
    if has_bias:
      db_ref[...] += jnp.sum(g_t, axis=1)[:, None]

  _unless_filtered(opt, statistic, accumulate)

  @pl.when(i == last)
  def _finish():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off, z_loss,
             softcap, filter_eps, block_tokens=None, block_vocab=None, interpret=False):
  """Gradients of ``sum_n loss_n`` through ``z = cap(hidden @ weight.T + bias)``.

  With ``p = exp(z - lse)`` and ``target = on * [v == labels] + off``::

    g = where(valid, (p_scale * p - d_loss * target) * cap'(z), 0)

  Args:
    hidden, weight, bias, labels: as in :func:`forward`.
    valid: ``[N]`` bool; invalid tokens get zero gradient whatever their values.
    lse: ``[N]`` float32 from :func:`forward`.
    d_loss, p_scale: ``[N]`` float32 coefficients of the target and of ``p``.
    on, off, z_loss: the smoothed target's weights and the z-loss coefficient.
    softcap: as in :func:`forward`.
    filter_eps: None, or Cut Cross-Entropy's threshold: a tile where every valid
      ``|(1 + 2 z_loss lse) p - target|`` is below it contributes nothing.
    block_tokens, block_vocab: logit tile of both kernels, multiples of 128 unless
      they cover the axis (tokens are the lane axis of the d_weight kernel's
      transposed tile); None for each kernel's ``default_blocks``.
    interpret: run the kernels in the Pallas interpreter (any platform).

  Returns:
    ``(d_hidden, d_weight, d_bias)``: shapes and dtypes of ``hidden`` and
    ``weight``, and float32 ``[V]`` (None without bias).
  """
  compute_dtype = _compute_dtype("backward", hidden, weight, bias)
  (n, d), v = hidden.shape, weight.shape[0]
  opt = _Grad(float(on), float(off), float(z_loss), softcap, filter_eps)
  has_bias = bias is not None
  labels = _labels_in_range(labels, v)
  per_token = [lse, d_loss, p_scale]
  # `valid` (as int32, Mosaic's friendliest mask type) is padded to whole tiles:
  # it is what masks the ragged tile's padding rows.
  valid = valid.astype(jnp.int32)

  # d_hidden: token tiles (parallel) x vocabulary tiles (sequential).
  bn, bv = _resolve_blocks("backward", "d_hidden", n, v, d, compute_dtype, block_tokens,
                           block_vocab)
  cfg = _Static(n, v, bn, bv, compute_dtype, softcap)
  grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
  token = lambda i, j: (i, 0)
  in_specs = [_held((bn, d), token), pl.BlockSpec((bv, d), lambda i, j: (j, 0))]
  operands = [hidden, weight]
  if has_bias:
    in_specs.append(pl.BlockSpec((1, bv), lambda i, j: (0, j)))
    operands.append(bias.astype(jnp.float32).reshape(1, v))
  in_specs += [_held((bn, 1), token)] * 5
  padded_valid = jnp.pad(valid, (0, grid[0] * bn - n))
  operands += [x.reshape(-1, 1) for x in [labels, padded_valid, *per_token]]
  d_hidden = pl.pallas_call(
      functools.partial(_d_hidden_kernel, cfg=cfg, opt=opt, has_bias=has_bias),
      grid=grid,
      in_specs=in_specs,
      out_specs=_held((bn, d), token),
      out_shape=jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
      scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
      compiler_params=_compiler_params("d_hidden", bn, bv, d, compute_dtype),
      interpret=interpret,
  )(*operands)

  # d_weight, d_bias: vocabulary tiles (parallel) x token tiles (sequential), transposed tile.
  bn, bv = _resolve_blocks("backward", "d_weight", n, v, d, compute_dtype, block_tokens,
                           block_vocab)
  cfg = _Static(n, v, bn, bv, compute_dtype, softcap)
  grid = (pl.cdiv(v, bv), pl.cdiv(n, bn))
  vocab = lambda j, i: (j, 0)
  token_row = pl.BlockSpec((1, bn), lambda j, i: (0, i))
  in_specs = [_held((bv, d), vocab), pl.BlockSpec((bn, d), lambda j, i: (i, 0))]
  operands = [weight, hidden]
  if has_bias:
    in_specs.append(_held((bv, 1), vocab))
    operands.append(bias.astype(jnp.float32).reshape(v, 1))
  in_specs += [token_row] * 5
  padded_valid = jnp.pad(valid, (0, grid[1] * bn - n))
  operands += [x.reshape(1, -1) for x in [labels, padded_valid, *per_token]]
  out_specs = [_held((bv, d), vocab)]
  out_shape = [jax.ShapeDtypeStruct(weight.shape, weight.dtype)]
  if has_bias:
    out_specs.append(_held((bv, 1), vocab))
    out_shape.append(jax.ShapeDtypeStruct((v, 1), jnp.float32))
  grads = pl.pallas_call(
      functools.partial(_d_weight_kernel, cfg=cfg, opt=opt, has_bias=has_bias),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bv, d), jnp.float32)],
      compiler_params=_compiler_params("d_weight", bn, bv, d, compute_dtype),
      interpret=interpret,
  )(*operands)
  d_bias = grads[1][:, 0] if has_bias else None
  return d_hidden, grads[0], d_bias
