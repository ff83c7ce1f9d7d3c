"""Fused linear cross-entropy for GPUs: Pallas kernels lowered through Triton.

The ``[N, V]`` logits ``z = cap(hidden @ weight^T + bias)`` never reach HBM.

Forward (grid over token tiles). Each program owns ``block_tokens`` rows and
walks the vocabulary in tiles of ``block_vocab`` with ``lax.fori_loop``. A logit
tile is built by a second loop over chunks of ``block_d`` features (``plgpu.dot``,
float32 accumulation); an online float32 log-sum-exp (running max and rescaled
sum of exponentials), the label logit and, on request, the sum of the logits
are carried from tile to tile. Only ``lse``, ``label_logit`` and ``logit_sum``
(float32 ``[N]``) are written.

Backward (grid over (token tile, vocab tile) pairs, as in Cut Cross-Entropy).
Each program recomputes its logit tile, forms ``g = dloss/dz`` from the saved
``lse``, and, unless gradient filtering skips the tile, walks the ``block_d``
chunks once more and atomically adds ``g @ W[:, chunk]`` into a float32
``d_hidden`` buffer, ``g^T @ H[:, chunk]`` into a float32 ``d_weight`` buffer and
the column sums of ``g`` into a float32 ``d_bias`` buffer. The buffers are cast
to the input dtypes outside the kernel.

Vocabulary slabs. A float32 ``d_weight`` buffer of the whole ``[V, D]`` would be
2.36 GB at the Gemma-2-2B head (V=256000, D=2304). So the backward kernel runs
once per slab of whole vocabulary tiles, as many as keep the slab's float32
``d_weight`` buffer within ``D_WEIGHT_BUFFER_BYTES`` (64 MiB: 56 tiles of 128
rows at D=2304, 36 slabs; see :func:`slab_vocab_tiles`). A slab's grid is
(token tiles x the slab's vocabulary tiles); its first row is a static offset
into the full ``weight`` and ``bias`` refs, so ``weight`` is never copied or
sliced. Each slab's buffer is cast to ``weight``'s dtype and written (in place,
as XLA does) into the ``[V, D]`` result with ``lax.dynamic_update_slice``; the
``d_hidden`` and ``d_bias`` buffers are shared, handed from one slab's call to the
next through ``input_output_aliases``. Every (token tile, vocab tile) pair is
still computed once, and each buffer entry receives its additions in the same
order as with one slab. Float32 scratch: ``d_hidden`` (``[N, D]``), one slab and
``d_bias`` (``[V]``).

Ragged sizes: no HBM copy or padding of ``hidden`` or ``weight``. Every load of
a tile is masked (``other=0``) and the masks are applied with ``jnp.where``, so
out-of-range rows, columns and features never reach a sum or a matmul (Pallas'
interpret mode fills out-of-bounds reads with NaN, which a multiplicative mask
would spread). The float32 gradient buffers are the exception: they are
allocated rounded up to whole tiles, so every atomic add stays in bounds and
needs no mask (interpret mode cannot run masked atomics), and the padding is
sliced off when the buffers are cast. Float atomics make the gradients' last
bits depend on the programs' order on a GPU (run-to-run differences at float32
rounding level); interpret mode runs the programs in order.

Atomics rather than two kernels (d_hidden over token tiles, d_weight over
vocabulary tiles): one pass recomputes each logit tile once instead of twice,
and a program never holds a ``[block, D]`` accumulator, so large ``D`` needs no
extra tiling.

Why Triton and not Mosaic GPU: jax 0.10 lowers ``pallas_call`` on GPU to Mosaic
GPU unless Triton ``CompilerParams`` are given. Mosaic GPU targets Hopper and
later (warpgroup MMA, TMA), so it would leave A100s without a kernel, and its
warpgroup / TMA primitives cannot be run in interpret mode on a CPU. The Triton
lowering runs on Ampere and later, and the same kernels run in interpret mode
on CPU with the same semantics, so CI tests them without a GPU (and
cross-lowers them for ``cuda`` to prove they compile to a Triton call).

Block sizes are powers of two >= 16 (Triton's ``tl.dot``); defaults fit the
A100's shared memory (see :func:`smem_bytes`). Float32 operands are multiplied
in full float32 (Triton's IEEE input precision, not TF32), as interpret mode does.

References:
  Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models (Cut
  Cross-Entropy), arXiv:2411.09009.
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

DEFAULT_BLOCK_TOKENS = 64
DEFAULT_BLOCK_VOCAB = 128
D_WEIGHT_BUFFER_BYTES = 64 * 2**20  # float32 d_weight of one backward slab


def smem_bytes(kernel: str, block_tokens: int, block_vocab: int, block_d: int, dtype,
               num_stages: int = NUM_STAGES) -> int:
  """Estimated shared memory of one program of ``kernel`` ("forward" or "backward").

  ``num_stages`` pipelined copies of the hidden and weight chunks, plus the
  float32 logit tile; the backward pass also stages ``g`` in the operand dtype
  for its two matmuls.
  """
  itemsize = jnp.dtype(dtype).itemsize
  operands = num_stages * (block_tokens + block_vocab) * block_d * itemsize
  logits = block_tokens * block_vocab * 4
  if kernel == "forward":
    return operands + logits
  if kernel == "backward":
    return operands + logits + block_tokens * block_vocab * itemsize
  raise ValueError(f"smem_bytes: kernel must be 'forward' or 'backward', got {kernel!r}.")


def _compute_dtype(fn, hidden, weight):
  """The promoted operand dtype; ValueError naming an unsupported dtype."""
  for name, x in (("hidden", hidden), ("weight", weight)):
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
      raise ValueError(f"{fn}: {name} has dtype {jnp.dtype(x.dtype).name}; expected float32, "
                       "bfloat16 or float16.")
  return jnp.promote_types(hidden.dtype, weight.dtype)


def _check_shapes(fn, hidden, weight, bias, labels, **per_token):
  """ValueError naming the argument and the shapes unless they fit the contract."""
  if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
    raise ValueError(f"{fn}: expected hidden [N, D] and weight [V, D], got hidden "
                     f"{hidden.shape} and weight {weight.shape}.")
  if min(*hidden.shape, weight.shape[0]) < 1:
    raise ValueError(f"{fn}: N, V and D must be >= 1, got hidden {hidden.shape} and "
                     f"weight {weight.shape}.")
  if bias is not None and bias.shape != weight.shape[:1]:
    raise ValueError(f"{fn}: bias must have shape {weight.shape[:1]}, got {bias.shape}.")
  for name, x in {"labels": labels, **per_token}.items():
    if x.shape != hidden.shape[:1]:
      raise ValueError(f"{fn}: {name} must have shape {hidden.shape[:1]}, got {x.shape}.")


def _blocks(fn, n, v, d, dtype, block_tokens, block_vocab, block_d):
  """``(block_tokens, block_vocab, block_d)`` for the shapes (defaults where None)."""
  return (power_of_two_block(fn, "block_tokens", block_tokens, DEFAULT_BLOCK_TOKENS, n),
          power_of_two_block(fn, "block_vocab", block_vocab, DEFAULT_BLOCK_VOCAB, v),
          power_of_two_block(fn, "block_d", block_d, default_block_d(dtype), d))


def _logit_tile(hidden_ref, weight_ref, bias_ref, r0, rows, c0, cols, *, block_d, dtype,
                softcap):
  """``cap(h @ w^T + b)`` in float32 for rows ``r0 + ...`` and columns ``c0 + ...``.

  ``rows`` / ``cols`` are boolean masks of the rows and columns to load; the
  others are read as 0.
  """

  def chunk(k, acc):
    h = load_chunk(hidden_ref, r0, rows, k * block_d, block_d).astype(dtype)
    w = load_chunk(weight_ref, c0, cols, k * block_d, block_d).astype(dtype)
    return acc + plgpu.dot(h, w, trans_b=True)

  z = lax.fori_loop(0, pl.cdiv(hidden_ref.shape[1], block_d), chunk,
                    jnp.zeros((rows.shape[0], cols.shape[0]), jnp.float32))
  if bias_ref is not None:
    z = z + load_rows(bias_ref, c0, cols, 0.0).astype(jnp.float32)[None, :]
  if softcap:
    z = softcap * jnp.tanh(z / softcap)
  return z


def _forward_kernel(*refs, has_bias, with_logit_sum, softcap, block_tokens, block_vocab,
                    block_d, dtype):
  """One token tile: online log-sum-exp, label logit and logit sum over all vocab tiles."""
  if has_bias:
    hidden_ref, weight_ref, bias_ref, labels_ref, lse_ref, label_ref, sum_ref = refs
  else:
    hidden_ref, weight_ref, labels_ref, lse_ref, label_ref, sum_ref = refs
    bias_ref = None
  r0 = pl.program_id(0) * block_tokens
  rows = r0 + jnp.arange(block_tokens) < hidden_ref.shape[0]
  labels = load_rows(labels_ref, r0, rows, -1)

  def vocab_tile(j, carry):
    run_max, run_sum, label_logit, logit_sum = carry
    c0 = j * block_vocab
    col_ids = c0 + jnp.arange(block_vocab)
    cols = col_ids < weight_ref.shape[0]
    z = _logit_tile(hidden_ref, weight_ref, bias_ref, r0, rows, c0, cols,
                    block_d=block_d, dtype=dtype, softcap=softcap)
    z_in = jnp.where(cols[None, :], z, -jnp.inf)
    new_max = jnp.maximum(run_max, jnp.max(z_in, axis=1))
    run_sum = (run_sum * jnp.exp(run_max - new_max)
               + jnp.sum(jnp.exp(z_in - new_max[:, None]), axis=1))
    is_label = cols[None, :] & (col_ids[None, :] == labels[:, None])
    label_logit = label_logit + jnp.sum(jnp.where(is_label, z, 0.0), axis=1)
    if with_logit_sum:
      logit_sum = logit_sum + jnp.sum(jnp.where(cols[None, :], z, 0.0), axis=1)
    return new_max, run_sum, label_logit, logit_sum

  zeros = jnp.zeros((block_tokens,), jnp.float32)
  init = (jnp.full((block_tokens,), -jnp.inf, jnp.float32), zeros, zeros, zeros)
  run_max, run_sum, label_logit, logit_sum = lax.fori_loop(
      0, pl.cdiv(weight_ref.shape[0], block_vocab), vocab_tile, init)
  for ref, value in ((lse_ref, run_max + jnp.log(run_sum)), (label_ref, label_logit),
                     (sum_ref, logit_sum)):
    plgpu.store(ref.at[pl.ds(r0, block_tokens)], value, mask=rows)


def forward(hidden, weight, bias, labels, *, softcap, with_logit_sum, block_tokens=None,
            block_vocab=None, block_d=None, interpret=False):
  """Per-token float32 ``(lse, label_logit, logit_sum)`` of ``cap(hidden @ weight^T + bias)``.

  Args:
    hidden: ``[N, D]`` float32 / bfloat16 / float16.
    weight: ``[V, D]`` (may differ in dtype from ``hidden``; computed in the
      promoted dtype with float32 accumulation).
    bias: ``[V]`` or None.
    labels: ``[N]`` int32; a label outside ``[0, V)`` has ``label_logit = 0``.
    softcap: None, or ``c`` for ``cap(x) = c * tanh(x / c)``.
    with_logit_sum: whether to compute ``logit_sum`` (zeros otherwise).
    block_tokens, block_vocab, block_d: powers of two >= 16 (defaults: 64, 128,
      :func:`default_block_d`).
    interpret: run in Pallas interpret mode (any backend, CPU included).
  """
  fn = "linear_cross_entropy.gpu.forward"
  dtype = _compute_dtype(fn, hidden, weight)
  _check_shapes(fn, hidden, weight, bias, labels)
  (n, d), v = hidden.shape, weight.shape[0]
  block_tokens, block_vocab, block_d = _blocks(fn, n, v, d, dtype, block_tokens,
                                               block_vocab, block_d)
  kernel = functools.partial(
      _forward_kernel, has_bias=bias is not None, with_logit_sum=with_logit_sum,
      softcap=softcap, block_tokens=block_tokens, block_vocab=block_vocab, block_d=block_d,
      dtype=dtype)
  args = [hidden, weight, *([] if bias is None else [bias]), labels.astype(jnp.int32)]
  stats = jax.ShapeDtypeStruct((n,), jnp.float32)
  lse, label_logit, logit_sum = pl.pallas_call(
      kernel,
      out_shape=(stats, stats, stats),
      grid=(pl.cdiv(n, block_tokens),),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="linear_cross_entropy_fwd",
  )(*args)
  return lse, label_logit, logit_sum


def _backward_kernel(*refs, has_bias, vocab_offset, on, off, z_loss, softcap, filter_eps,
                     block_tokens, block_vocab, block_d, dtype):
  """One (token tile, vocab tile): recompute z, form g, atomically add its gradients.

  The vocabulary tile is ``program_id(1)`` of the slab whose first row is
  ``vocab_offset``: rows of ``weight``, ``bias`` and ``d_bias`` are global,
  rows of ``d_weight`` (the slab's buffer) are local.
  """
  if has_bias:
    (hidden_ref, weight_ref, bias_ref, labels_ref, valid_ref, lse_ref, d_loss_ref,
     p_scale_ref, _, _, _, d_hidden_ref, d_bias_ref, d_weight_ref) = refs
  else:
    (hidden_ref, weight_ref, labels_ref, valid_ref, lse_ref, d_loss_ref, p_scale_ref,
     _, _, d_hidden_ref, d_weight_ref) = refs
    bias_ref = d_bias_ref = None
  r0 = pl.program_id(0) * block_tokens
  local_c0 = pl.program_id(1) * block_vocab  # row of the slab's d_weight buffer
  c0 = vocab_offset + local_c0  # row of weight, column of the logits
  in_range = r0 + jnp.arange(block_tokens) < hidden_ref.shape[0]
  # Invalid rows are treated as absent: their hidden states are never loaded,
  # so whatever they hold cannot turn into NaN.
  rows = in_range & (load_rows(valid_ref, r0, in_range, 0) != 0)
  col_ids = c0 + jnp.arange(block_vocab)
  cols = col_ids < weight_ref.shape[0]
  labels = load_rows(labels_ref, r0, rows, -1)
  lse, d_loss, p_scale = (load_rows(ref, r0, rows, 0.0)
                          for ref in (lse_ref, d_loss_ref, p_scale_ref))

  z = _logit_tile(hidden_ref, weight_ref, bias_ref, r0, rows, c0, cols,
                  block_d=block_d, dtype=dtype, softcap=softcap)
  keep = rows[:, None] & cols[None, :]
  probs = jnp.exp(z - lse[:, None])
  target = jnp.where(col_ids[None, :] == labels[:, None], on + off, off)
  g = p_scale[:, None] * probs - d_loss[:, None] * target
  if softcap:
    g = g * (1.0 - jnp.square(z / softcap))
  g = jnp.where(keep, g, 0.0)

  def accumulate():
    g_in = g.astype(dtype)

    @pl.loop(0, pl.cdiv(hidden_ref.shape[1], block_d))
    def _(k):
      d0 = k * block_d
      w = load_chunk(weight_ref, c0, cols, d0, block_d).astype(dtype)
      h = load_chunk(hidden_ref, r0, rows, d0, block_d).astype(dtype)
      features = pl.ds(d0, block_d)
      plgpu.atomic_add(d_hidden_ref, (pl.ds(r0, block_tokens), features), plgpu.dot(g_in, w))
      plgpu.atomic_add(d_weight_ref, (pl.ds(local_c0, block_vocab), features),
                       plgpu.dot(g_in, h, trans_a=True))

    if has_bias:
      plgpu.atomic_add(d_bias_ref, pl.ds(c0, block_vocab), jnp.sum(g, axis=0))

  if filter_eps is None:
    accumulate()
  else:
    # Cut Cross-Entropy's gradient filtering: skip a tile whose every entry of
    # dloss/dz (before the upstream cotangent) is below filter_eps.
    unscaled = jnp.where(keep, jnp.abs((1.0 + 2.0 * z_loss * lse)[:, None] * probs - target),
                         0.0)
    pl.when(jnp.max(jnp.max(unscaled, axis=1), axis=0) >= filter_eps)(accumulate)


def slab_vocab_tiles(num_vocab_tiles: int, tile_bytes: int, budget_bytes: int) -> int:
  """Vocabulary tiles per backward slab.

  As many as keep a slab's float32 ``d_weight`` buffer (``tile_bytes`` per
  tile) within ``budget_bytes``, but at least one; then spread evenly over the
  slabs that this takes, so the last slab is not needlessly small (it may still
  have fewer tiles than the others).
  """
  most = max(1, budget_bytes // tile_bytes)
  return pl.cdiv(num_vocab_tiles, pl.cdiv(num_vocab_tiles, most))


def backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off, z_loss,
             softcap, filter_eps, block_tokens=None, block_vocab=None, block_d=None,
             interpret=False, d_weight_buffer_bytes=None):
  """``(d_hidden, d_weight, d_bias)`` of the fused head from the saved ``lse``.

  With ``p = exp(z - lse)`` and ``target = on * [v == label] + off``::

    g = where(valid, (p_scale * p - d_loss * target) * cap'(z), 0)
    d_hidden = g @ weight,  d_weight = g^T @ hidden,  d_bias = sum_n g

  A (token tile x vocabulary tile) block is skipped when ``filter_eps`` is not
  None and every valid entry of ``|(1 + 2 z_loss lse) p - target|`` is below it.

  Args:
    hidden, weight, bias, labels: as in :func:`forward`.
    valid: ``[N]`` bool; invalid rows get zero gradient.
    lse, d_loss, p_scale: ``[N]`` float32.
    on, off, z_loss: Python floats (target weights, z-loss coefficient).
    softcap: None or the softcap ``c``.
    filter_eps: None or the gradient-filtering threshold.
    block_tokens, block_vocab, block_d, interpret: as in :func:`forward`.
    d_weight_buffer_bytes: the most bytes of one slab's float32 ``d_weight``
      buffer (default :data:`D_WEIGHT_BUFFER_BYTES`; a slab has at least one
      vocabulary tile whatever the budget).

  Returns:
    ``d_hidden`` (shape and dtype of ``hidden``), ``d_weight`` (of ``weight``),
    ``d_bias`` (float32 ``[V]``, or None without ``bias``).
  """
  fn = "linear_cross_entropy.gpu.backward"
  dtype = _compute_dtype(fn, hidden, weight)
  _check_shapes(fn, hidden, weight, bias, labels, valid=valid, lse=lse, d_loss=d_loss,
                p_scale=p_scale)
  budget = D_WEIGHT_BUFFER_BYTES if d_weight_buffer_bytes is None else d_weight_buffer_bytes
  if not isinstance(budget, int) or budget < 1:
    raise ValueError(f"{fn}: d_weight_buffer_bytes must be a positive int, got {budget!r}.")
  (n, d), v = hidden.shape, weight.shape[0]
  block_tokens, block_vocab, block_d = _blocks(fn, n, v, d, dtype, block_tokens,
                                               block_vocab, block_d)
  token_tiles, vocab_tiles = pl.cdiv(n, block_tokens), pl.cdiv(v, block_vocab)
  d_pad = pl.cdiv(d, block_d) * block_d
  slab_tiles = slab_vocab_tiles(vocab_tiles, block_vocab * d_pad * 4, budget)

  args = [hidden, weight, *([] if bias is None else [bias]), labels.astype(jnp.int32),
          valid.astype(jnp.int32), *(x.astype(jnp.float32) for x in (lse, d_loss, p_scale))]
  # Shared by all slabs, passed from one slab's call to the next.
  shared = [jnp.zeros((token_tiles * block_tokens, d_pad), jnp.float32)]
  if bias is not None:
    shared.append(jnp.zeros((vocab_tiles * block_vocab,), jnp.float32))
  d_weight = jnp.zeros((v, d), weight.dtype)
  for first_tile in range(0, vocab_tiles, slab_tiles):
    tiles = min(slab_tiles, vocab_tiles - first_tile)
    start = first_tile * block_vocab
    buffers = [*shared, jnp.zeros((tiles * block_vocab, d_pad), jnp.float32)]
    kernel = functools.partial(
        _backward_kernel, has_bias=bias is not None, vocab_offset=start, on=float(on),
        off=float(off), z_loss=float(z_loss), softcap=softcap, filter_eps=filter_eps,
        block_tokens=block_tokens, block_vocab=block_vocab, block_d=block_d, dtype=dtype)
    *shared, slab = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(b.shape, b.dtype) for b in buffers],
        grid=(token_tiles, tiles),
        input_output_aliases={len(args) + k: k for k in range(len(buffers))},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="linear_cross_entropy_bwd",
    )(*args, *buffers)
    rows = min(tiles * block_vocab, v - start)
    d_weight = lax.dynamic_update_slice(d_weight, slab[:rows, :d].astype(weight.dtype),
                                        (start, 0))
  d_hidden = shared[0][:n, :d].astype(hidden.dtype)
  d_bias = None if bias is None else shared[1][:v]
  return d_hidden, d_weight, d_bias
