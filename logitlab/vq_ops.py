"""Memory-critical VQ-Logits paths: segment sums over codes, dense-teacher distillation, top-k.

A VQ-Logits head (:mod:`logitlab.vq`) assigns every vocabulary token ``v`` a code
``m(v)``; its vocabulary logits are ``z_{m(v)} + b_v`` with code logits
``z = hidden @ codebook.T`` ([..., K]) and an optional per-token bias ``b[V]``.
This module holds the operations whose naive form builds an ``[N, V]`` tensor:

* :func:`vq_segment_sum`: ``P[..., k] = sum_{v: m(v)=k} probs[..., v]`` (V -> K).
* :func:`vq_teacher_code_mass`: the same segment sum of a *dense* teacher's
  ``softmax(teacher_hidden @ teacher_weight.T / T)``, streamed over vocabulary
  tiles with an online softmax so that the teacher's ``[N, V]`` never exists.
* :func:`vq_distillation_loss`: KL(teacher || VQ student) over the full vocabulary
  from those per-code masses, in ``O(N K)`` memory (plus one tile).
* :func:`vq_lse`, :func:`vq_top_k`, :func:`vq_log_probs`: log-sum-exp, top-k
  tokens and log-probabilities of the vocabulary logits from the code logits.

Distillation identity (METHODS.md, VQ-Logits), with ``u = z / T`` and
``p_t = softmax(teacher logits / T)``::

  sum_v p_t(v) log p_s(v) = sum_k P_t(k) u_k + sum_v p_t(v) b_v / T - lse_s
  P_t(k) = sum_{v: m(v)=k} p_t(v),   lse_s = logsumexp_k(u_k + B_k),
  B_k = logsumexp_{v: m(v)=k} b_v / T

References:
  Shao et al., VQ-Logits: Compressing the Output Bottleneck of Large Language
  Models via Vector Quantized Logits, arXiv:2505.10202.
  Hinton et al., Distilling the Knowledge in a Neural Network, arXiv:1503.02531.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from logitlab import _validation as v
from logitlab import _vq_kernels
from logitlab import debug
from logitlab import _tiling as tiling
from logitlab.vq import _check_assignment, _check_token_bias, code_log_mass, vq_code_logits

__all__ = [
    "TeacherCodeMass",
    "vq_distillation_loss",
    "vq_log_probs",
    "vq_lse",
    "vq_segment_sum",
    "vq_teacher_code_mass",
    "vq_top_k",
]

DEFAULT_BLOCK_TOKENS = 512
DEFAULT_BLOCK_VOCAB = 1024
SEGMENT_METHODS = ("onehot", "scatter")


# --------------------------------------------------------------------------- segment sum

def vq_segment_sum(probs: jax.typing.ArrayLike, assignment: jax.typing.ArrayLike,
                   num_codes: int, *, impl: str = "xla", interpret: bool = False) -> jax.Array:
  r"""Per-code sums ``P[..., k] = sum_{v: m(v)=k} probs[..., v]``: ``[..., V] -> [..., K]``.

  Accumulated in float32 whatever the dtype of ``probs``; a code that holds no
  token gets 0. Differentiable in ``probs`` (the gradient gathers ``dP[..., m(v)]``).

  Args:
    probs: ``[..., V]`` float values, usually probabilities.
    assignment: ``[V]`` integer code of each vocabulary token, in ``[0, num_codes)``.
    num_codes: ``K``, a static Python int.
    impl: ``"xla"`` (a scatter-add), ``"pallas_tpu"`` or ``"pallas_gpu"`` (the
      ``segment_sum`` kernels of ``pallas_kernels.vq``: per vocabulary tile an exact
      one-hot matmul into a float32 ``[rows, K]`` accumulator; their gradient is
      the ``scatter_logits`` kernel).
    interpret: run the Pallas kernel in the interpreter (any platform, for tests).

  Returns:
    float32 ``[..., K]``.

  Example:
    >>> import jax.numpy as jnp, logitlab
    >>> logitlab.vq_segment_sum(jnp.array([0.5, 0.25, 0.25]), jnp.array([1, 0, 1]), 3).tolist()
    [0.25, 0.75, 0.0]

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202.
  """
  fn = "vq_segment_sum"
  impl = _vq_kernels.check_impl(fn, impl, interpret)
  num_codes = v.static_int(fn, "num_codes", num_codes, minimum=1)
  probs = v.float_array(fn, "probs", probs)
  assignment = _check_assignment(fn, assignment, num_codes)
  if probs.ndim < 1 or probs.shape[-1] != assignment.shape[0]:
    raise ValueError(f"{fn}: `probs` must be [..., V] with V = len(assignment) = "
                     f"{assignment.shape[0]}, got shape {probs.shape}.")
  if impl != "xla" and probs.size:
    return _vq_kernels.segment_sum(impl, interpret, probs, assignment, num_codes)
  out = jnp.zeros(probs.shape[:-1] + (num_codes,), jnp.float32)
  return out.at[..., assignment].add(probs.astype(jnp.float32))


# --------------------------------------------------------------------------- teacher streaming

class TeacherCodeMass(NamedTuple):
  """Per-token statistics of a dense teacher ``p_t = softmax(logits / T)``, all float32.

  Attributes:
    code_mass: ``[N, K]`` ``P_t(k) = sum_{v: m(v)=k} p_t(v)`` (rows sum to 1).
    lse: ``[N]`` ``logsumexp_v(logits_v / T)``.
    neg_entropy: ``[N]`` ``sum_v p_t(v) log p_t(v)`` (minus the teacher entropy, nats).
    bias_mean: ``[N]`` ``sum_v p_t(v) b_v`` for the student ``token_bias`` ``b``
      (not divided by ``T``), or None when no ``token_bias`` was given.
  """
  code_mass: jax.Array
  lse: jax.Array
  neg_entropy: jax.Array
  bias_mean: jax.Array | None


def _segment_add(e, codes, fresh, num_codes, method):
  """``e[bn, bv]`` summed into codes ``[bn, K]`` (masked columns hold ``e = 0``)."""
  if method == "onehot":
    # A [bv, K] one-hot matmul: MXU / tensor-core work instead of a serial scatter.
    # HIGHEST keeps float32 (TPU would otherwise round `e` to bfloat16).
    onehot = (fresh[:, None] & (codes[:, None] == jnp.arange(num_codes))).astype(jnp.float32)
    return jnp.dot(e, onehot, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  return jnp.zeros((e.shape[0], num_codes), jnp.float32).at[:, codes].add(e)


def _stream_teacher(hidden, weight, bias, assignment, token_bias, *, num_codes, inv_temp,
                    block_tokens, block_vocab, segment):
  """``TeacherCodeMass`` of ``hidden @ weight.T + bias`` (shapes [N, D], [V, D], [V]).

  Per token tile, one pass over vocabulary tiles keeps, for ``u = logits / T``
  and the running max ``m``, the float32 accumulators::

    l = sum exp(u - m),  P_k = sum_{m(v)=k} exp(u - m),  c = sum exp(u - m) (u - m),
    s = sum exp(u - m) b

  and rescales them by ``exp(m - m')`` when the max grows to ``m'`` (``c`` also
  gains ``(m - m') l``). Centring ``u`` on ``m`` keeps ``sum p log p = c / l - log l``
  free of the cancellation of ``E[u] - lse`` for peaked teachers.
  """
  rows = tiling.Tiles.over(hidden.shape[0], block_tokens or DEFAULT_BLOCK_TOKENS)
  cols = tiling.Tiles.over(weight.shape[0], block_vocab or DEFAULT_BLOCK_VOCAB)
  with_bias = token_bias is not None
  refs = (hidden, weight, bias, token_bias)

  def token_tile(i, outputs):
    r0 = rows.start(i)
    h = rows.take(hidden, i)

    def vocab_tile(j, acc):
      run_max, l, mass, c, s = acc
      c0 = cols.start(j)
      fresh = cols.fresh(j, c0)
      u = tiling.tile_logits(h, cols.take(weight, j), cols.take(bias, j), None) * inv_temp
      new_max = jnp.maximum(run_max, jnp.max(jnp.where(fresh, u, -jnp.inf), axis=1))
      scale = jnp.exp(run_max - new_max)
      centred = u - new_max[:, None]
      e = jnp.where(fresh, jnp.exp(centred), 0.0)
      # (run_max - new_max) * l: 0 * 0 on the first tile, where run_max = -inf.
      shift = jnp.where(l > 0, (run_max - new_max) * l, 0.0)
      c = scale * (c + shift) + jnp.sum(jnp.where(fresh, e * centred, 0.0), axis=1)
      l = scale * l + jnp.sum(e, axis=1)
      mass = scale[:, None] * mass + _segment_add(e, cols.take(assignment, j), fresh,
                                                  num_codes, segment)
      if with_bias:
        b = jnp.where(fresh, cols.take(token_bias, j).astype(jnp.float32), 0.0)
        s = scale * s + jnp.dot(e, b, precision=lax.Precision.HIGHEST)
      return new_max, l, mass, c, s

    zeros = jnp.zeros((rows.block,), jnp.float32)
    init = tiling.varying_like((jnp.full((rows.block,), -jnp.inf), zeros,
                          jnp.zeros((rows.block, num_codes), jnp.float32), zeros, zeros), *refs)
    run_max, l, mass, c, s = lax.fori_loop(0, cols.count, vocab_tile, init)
    tile_stats = (mass / l[:, None], run_max + jnp.log(l), c / l - jnp.log(l), s / l)
    return tuple(lax.dynamic_update_slice_in_dim(out, t, r0, 0)
                 for out, t in zip(outputs, tile_stats))

  n = hidden.shape[0]
  init = tiling.varying_like((jnp.zeros((n, num_codes), jnp.float32), jnp.zeros((n,), jnp.float32),
                        jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32)), *refs)
  mass, lse, neg_entropy, bias_mean = lax.fori_loop(0, rows.count, token_tile, init)
  return TeacherCodeMass(mass, lse, neg_entropy, bias_mean if with_bias else None)


def _check_blocks(fn, block_tokens, block_vocab):
  for name, value in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
    if value is not None:
      v.static_int(fn, name, value, minimum=1)


def _check_teacher(fn, teacher_hidden, teacher_weight, teacher_bias, vocab_size, batch_shape):
  teacher_hidden = v.float_array(fn, "teacher_hidden", teacher_hidden)
  teacher_weight = v.float_array(fn, "teacher_weight", teacher_weight)
  if (teacher_weight.ndim != 2 or teacher_hidden.ndim < 1
      or teacher_hidden.shape[-1] != teacher_weight.shape[1]):
    raise ValueError(f"{fn}: expected teacher_hidden [..., D_t] and teacher_weight [V, D_t], got "
                     f"shapes {teacher_hidden.shape} and {teacher_weight.shape}.")
  if teacher_weight.shape[0] != vocab_size:
    raise ValueError(f"{fn}: `teacher_weight` has {teacher_weight.shape[0]} rows but "
                     f"`assignment` covers V = {vocab_size} tokens.")
  if batch_shape is not None and teacher_hidden.shape[:-1] != tuple(batch_shape):
    raise ValueError(f"{fn}: teacher_hidden.shape[:-1] = {teacher_hidden.shape[:-1]} must equal "
                     f"the student's batch shape {tuple(batch_shape)}.")
  teacher_bias = v.optional_vector(fn, "teacher_bias", teacher_bias, vocab_size, "`assignment`")
  return teacher_hidden, teacher_weight, teacher_bias


def vq_teacher_code_mass(
    teacher_hidden: jax.typing.ArrayLike,
    teacher_weight: jax.typing.ArrayLike,
    assignment: jax.typing.ArrayLike,
    num_codes: int,
    *,
    teacher_bias: jax.typing.ArrayLike | None = None,
    token_bias: jax.typing.ArrayLike | None = None,
    temperature: float = 1.0,
    block_tokens: int | None = None,
    block_vocab: int | None = None,
    segment: str = "onehot",
    impl: str = "xla",
    interpret: bool = False,
) -> TeacherCodeMass:
  r"""Code masses of a dense teacher head, streamed: the teacher's ``[N, V]`` never exists.

  With teacher logits ``t = teacher_hidden @ teacher_weight.T + teacher_bias`` and
  ``p_t = softmax(t / T)``::

    code_mass[n, k] = sum_{v: m(v)=k} p_t[n, v]        lse[n] = logsumexp_v t[n, v] / T
    neg_entropy[n]  = sum_v p_t log p_t                 bias_mean[n] = sum_v p_t[n, v] b_v

  Computed per token tile in one pass over vocabulary tiles with an online
  softmax (accumulators rescaled when the running max grows), float32 throughout:
  memory ``O(N K)`` plus one ``[block_tokens, block_vocab]`` tile. Ragged ``V``
  and ``N`` need no padding copy (the last tile is shifted back and its overlap
  masked). All inputs are ``stop_gradient``'ed: the teacher is a constant.

  Args:
    teacher_hidden: ``[..., D_t]`` teacher hidden states (leading axes flattened to ``N``).
    teacher_weight: ``[V, D_t]`` teacher output embedding.
    assignment: ``[V]`` integer code of each vocabulary token, in ``[0, num_codes)``.
    num_codes: ``K``.
    teacher_bias: optional ``[V]`` teacher output bias.
    token_bias: optional ``[V]`` student per-token bias ``b``; gives ``bias_mean``.
    temperature: ``T > 0`` applied to the teacher logits.
    block_tokens, block_vocab: tile sizes (defaults 512 x 1024).
    segment: ``"onehot"`` (default; the per-tile segment sum as a ``[bv, K]`` one-hot
      matmul, accelerator friendly) or ``"scatter"`` (a scatter-add, no ``K``-wide
      temporary); ``impl="xla"`` only.
    impl: ``"xla"`` (plain JAX, any platform), ``"pallas_tpu"`` (the Mosaic kernel
      of ``pallas_kernels.vq.tpu``; its blocks must be multiples of (8, 128) unless
      they cover the axis) or ``"pallas_gpu"`` (the Triton kernel of
      ``pallas_kernels.vq.gpu``; its blocks must be powers of two >= 16).
    interpret: run the Pallas kernel in the interpreter (any platform, for tests).

  Returns:
    :class:`TeacherCodeMass` with arrays shaped ``teacher_hidden.shape[:-1] (+ (K,))``.

  Example:
    >>> import jax, jax.numpy as jnp, logitlab
    >>> h = jax.random.normal(jax.random.key(0), (4, 8))
    >>> w = jax.random.normal(jax.random.key(1), (6, 8))
    >>> m = jnp.array([0, 2, 2, 1, 0, 2])
    >>> out = logitlab.vq_teacher_code_mass(h, w, m, 3, block_vocab=4)
    >>> dense = logitlab.vq_segment_sum(jax.nn.softmax(h @ w.T), m, 3)
    >>> bool(jnp.allclose(out.code_mass, dense, atol=1e-6))
    True

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202.
  """
  fn = "vq_teacher_code_mass"
  _vq_kernels.check_impl(fn, impl, interpret)
  _check_blocks(fn, block_tokens, block_vocab)
  v.choice(fn, "segment", segment, SEGMENT_METHODS)
  num_codes = v.static_int(fn, "num_codes", num_codes, minimum=1)
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  assignment = _check_assignment(fn, assignment, num_codes)
  vocab_size = assignment.shape[0]
  teacher_hidden, teacher_weight, teacher_bias = _check_teacher(
      fn, teacher_hidden, teacher_weight, teacher_bias, vocab_size, None)
  token_bias = _check_token_bias(fn, token_bias, vocab_size)
  batch_shape = teacher_hidden.shape[:-1]
  sg = lambda x: None if x is None else lax.stop_gradient(x)
  if impl in ("pallas_tpu", "pallas_gpu"):
    out = TeacherCodeMass(*_vq_kernels.kernels(impl).teacher_code_mass(
        sg(teacher_hidden.reshape(-1, teacher_hidden.shape[-1])), sg(teacher_weight),
        sg(teacher_bias), assignment, sg(token_bias), num_codes=num_codes,
        temperature=temperature, block_tokens=block_tokens, block_vocab=block_vocab,
        interpret=interpret))
  else:
    out = _stream_teacher(
      sg(teacher_hidden.reshape(-1, teacher_hidden.shape[-1])), sg(teacher_weight),
        sg(teacher_bias), assignment, sg(token_bias), num_codes=num_codes,
        inv_temp=1.0 / temperature, block_tokens=block_tokens, block_vocab=block_vocab,
        segment=segment)
  return TeacherCodeMass(
      out.code_mass.reshape(batch_shape + (num_codes,)), out.lse.reshape(batch_shape),
      out.neg_entropy.reshape(batch_shape),
      None if out.bias_mean is None else out.bias_mean.reshape(batch_shape))


# --------------------------------------------------------------------------- distillation

def vq_distillation_loss(
    student_hidden: jax.typing.ArrayLike,
    codebook: jax.typing.ArrayLike,
    assignment: jax.typing.ArrayLike,
    teacher_hidden: jax.typing.ArrayLike,
    teacher_weight: jax.typing.ArrayLike,
    *,
    token_bias: jax.typing.ArrayLike | None = None,
    teacher_bias: jax.typing.ArrayLike | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = True,
    where: jax.typing.ArrayLike | None = None,
    kl: bool = True,
    block_tokens: int | None = None,
    block_vocab: int | None = None,
    segment: str = "onehot",
    impl: str = "xla",
    interpret: bool = False,
) -> jax.Array:
  r"""Distills a dense teacher head into a VQ-Logits student over the full vocabulary.

  Teacher ``p_t = softmax((teacher_hidden @ teacher_weight.T + teacher_bias) / T)``;
  student ``p_s = softmax((z_{m(v)} + b_v) / T)``, ``z = student_hidden @ codebook.T``.
  Per token (``u = z / T``)::

    CE = -sum_v p_t log p_s = lse_s - sum_k P_t(k) u_k - sum_v p_t(v) b_v / T
    KL = sum_v p_t log p_t + CE
    loss = T^2 * (KL if kl else CE)      (T^2 only with ``t2_scaling``)

  with ``P_t`` the teacher's per-code mass (:func:`vq_teacher_code_mass`, streamed
  over vocabulary tiles: no ``[N, V]`` tensor of teacher or student exists) and
  ``lse_s = logsumexp_k(u_k + B_k)``. The teacher is ``stop_gradient``'ed; the
  gradients w.r.t. ``student_hidden``, ``codebook`` and ``token_bias`` are exact
  (autodiff of the ``O(N K + V)`` student side).

  Args:
    student_hidden: ``[..., D]`` student hidden states.
    codebook: ``[K, D]`` code embeddings.
    assignment: ``[V]`` integer code of each token, in ``[0, K)`` (codes may be empty).
    teacher_hidden: ``[..., D_t]`` teacher hidden states, same batch shape.
    teacher_weight: ``[V, D_t]`` teacher output embedding.
    token_bias: optional ``[V]`` student per-token bias (None: the paper's head).
    teacher_bias: optional ``[V]`` teacher output bias.
    temperature: ``T > 0``, dividing teacher and student logits alike (Hinton KD).
    t2_scaling: multiply by ``T^2`` so gradient magnitudes do not shrink with ``T``
      (Hinton; mdistiller KD, the default). Liger and TRL-GKD do not: pass False.
      Irrelevant at ``T = 1``.
    where: boolean mask of the batch shape; masked positions give loss 0, gradient 0.
    kl: True for ``KL(p_t || p_s)`` (0 when the student matches), False for the
      cross-entropy ``-sum p_t log p_s`` (the teacher entropy omitted).
    block_tokens, block_vocab, segment, impl, interpret: the teacher stream, see
      :func:`vq_teacher_code_mass`. The ``token_bias`` gradient (a re-stream of the
      teacher into ``[V]``) always runs the XLA path.

  Returns:
    float32 losses of the batch shape ``student_hidden.shape[:-1]``.

  Example:
    >>> import jax, jax.numpy as jnp, logitlab
    >>> hs, c = jnp.ones((2, 4)), jax.random.normal(jax.random.key(0), (3, 4))
    >>> ht, w = jnp.ones((2, 5)), jax.random.normal(jax.random.key(1), (6, 5))
    >>> m = jnp.array([0, 2, 2, 1, 0, 2])
    >>> loss = logitlab.vq_distillation_loss(hs, c, m, ht, w)
    >>> log_ps = jax.nn.log_softmax(logitlab.vq_scatter(hs @ c.T, m))
    >>> dense = logitlab.kl_divergence(log_ps, jax.nn.softmax(ht @ w.T))
    >>> bool(jnp.allclose(loss, dense, atol=1e-5))
    True

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202.
    Hinton et al., Distilling the Knowledge in a Neural Network, arXiv:1503.02531.
  """
  fn = "vq_distillation_loss"
  _vq_kernels.check_impl(fn, impl, interpret)
  _check_blocks(fn, block_tokens, block_vocab)
  v.choice(fn, "segment", segment, SEGMENT_METHODS)
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  student_hidden = v.float_array(fn, "student_hidden", student_hidden)
  codebook = v.float_array(fn, "codebook", codebook)
  if codebook.ndim != 2 or student_hidden.ndim < 1 or student_hidden.shape[-1] != codebook.shape[1]:
    raise ValueError(f"{fn}: expected student_hidden [..., D] and codebook [K, D], got shapes "
                     f"{student_hidden.shape} and {codebook.shape}.")
  batch_shape = student_hidden.shape[:-1]
  num_codes = codebook.shape[0]
  assignment = _check_assignment(fn, assignment, num_codes)
  vocab_size = assignment.shape[0]
  token_bias = _check_token_bias(fn, token_bias, vocab_size)
  teacher_hidden, teacher_weight, teacher_bias = _check_teacher(
      fn, teacher_hidden, teacher_weight, teacher_bias, vocab_size, batch_shape)
  valid = (jnp.ones(batch_shape, bool) if where is None
           else v.bool_mask(fn, "where", where, batch_shape))
  debug.check_finite(fn, student_hidden=student_hidden, codebook=codebook, token_bias=token_bias,
                     teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                     teacher_bias=teacher_bias)

  # Masked rows see zero hidden states: nothing non-finite there reaches the loss or a gradient.
  teacher = vq_teacher_code_mass(
      jnp.where(valid[..., None], teacher_hidden, 0), teacher_weight, assignment, num_codes,
      teacher_bias=teacher_bias,
      token_bias=None if token_bias is None else lax.stop_gradient(token_bias),
      temperature=temperature, block_tokens=block_tokens, block_vocab=block_vocab,
      segment=segment, impl=impl, interpret=interpret)
  u = vq_code_logits(jnp.where(valid[..., None], student_hidden, 0), codebook) / temperature
  lse_s = jax.nn.logsumexp(
      u + code_log_mass(assignment, num_codes, token_bias, temperature=temperature), axis=-1)
  loss = lse_s - jnp.sum(teacher.code_mass * u, axis=-1)
  if token_bias is not None:
    xla_blocks = (None, None) if impl != "xla" else (block_tokens, block_vocab)
    # d/db_v of sum_v p_t(v) b_v / T is p_t(v) / T: an [N, V] sum of teacher
    # probabilities over tokens. Its gradient flows through a custom rule that
    # re-streams the teacher (see `_bias_term`), so it is added separately.
    loss = loss - _bias_term(token_bias, teacher, valid, teacher_hidden, teacher_weight,
                             teacher_bias, assignment, num_codes, temperature, *xla_blocks)
  if kl:
    loss = loss + teacher.neg_entropy
  if t2_scaling:
    loss = loss * temperature ** 2
  return jnp.where(valid, loss, 0.0)


def _stream_token_mass(hidden, weight, bias, lse, weights, *, inv_temp, block_tokens,
                       block_vocab):
  """``out[v] = sum_n weights[n] p_t[n, v]`` (float32 ``[V]``) with ``p_t = exp(t / T - lse)``.

  The transposed segment sum of the teacher: per token tile, the logit tiles are
  recomputed from the saved ``lse`` and their weighted column sums added into the
  ``[V]`` output (the clamped last vocabulary tile adds only its fresh columns).
  """
  rows = tiling.Tiles.over(hidden.shape[0], block_tokens or DEFAULT_BLOCK_TOKENS)
  cols = tiling.Tiles.over(weight.shape[0], block_vocab or DEFAULT_BLOCK_VOCAB)

  def token_tile(i, out):
    h, lse_i = rows.take(hidden, i), rows.take(lse, i)
    # Rows of the clamped last tile that the tile before already covered weigh 0.
    w_i = jnp.where(rows.fresh(i, rows.start(i)), rows.take(weights, i), 0.0)

    def vocab_tile(j, out):
      c0 = cols.start(j)
      u = tiling.tile_logits(h, cols.take(weight, j), cols.take(bias, j), None) * inv_temp
      p = jnp.exp(u - lse_i[:, None])
      col_sum = jnp.dot(w_i, p, precision=lax.Precision.HIGHEST)
      col_sum = jnp.where(cols.fresh(j, c0), col_sum, 0.0)
      return lax.dynamic_update_slice_in_dim(out, cols.take(out, j) + col_sum, c0, 0)

    return lax.fori_loop(0, cols.count, vocab_tile, out)

  init = tiling.varying_like(jnp.zeros((weight.shape[0],), jnp.float32), hidden, weight, bias, lse,
                       weights)
  return lax.fori_loop(0, rows.count, token_tile, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _teacher_bias_mean(inv_temp, block_tokens, block_vocab, token_bias, bias_mean, hidden,
                       weight, bias, lse):
  """``sum_v p_t(v) b_v`` per token: ``bias_mean``, already streamed, with its gradient in ``b``.

  ``d/db_v = sum_n ct_n p_t[n, v]`` is re-streamed from the teacher in the
  backward pass (:func:`_stream_token_mass`): ``O(V)`` memory, never ``[N, V]``.
  The teacher arguments are constants (zero cotangents).
  """
  del inv_temp, block_tokens, block_vocab, token_bias, hidden, weight, bias, lse
  return bias_mean


def _teacher_bias_mean_fwd(inv_temp, block_tokens, block_vocab, token_bias, bias_mean, hidden,
                           weight, bias, lse):
  return bias_mean, (token_bias, hidden, weight, bias, lse)


def _teacher_bias_mean_bwd(inv_temp, block_tokens, block_vocab, residuals, ct):
  token_bias, hidden, weight, bias, lse = residuals
  d_bias = _stream_token_mass(hidden, weight, bias, lse, ct.astype(jnp.float32),
                              inv_temp=inv_temp, block_tokens=block_tokens,
                              block_vocab=block_vocab)
  return d_bias.astype(token_bias.dtype), None, None, None, None, None


_teacher_bias_mean.defvjp(_teacher_bias_mean_fwd, _teacher_bias_mean_bwd)


def _bias_term(token_bias, teacher, valid, teacher_hidden, teacher_weight, teacher_bias,
               assignment, num_codes, temperature, block_tokens, block_vocab):
  """``sum_v p_t(v) b_v / T`` per token, differentiable in ``token_bias`` without ``[N, V]``."""
  del assignment, num_codes
  sg = lambda x: None if x is None else lax.stop_gradient(x)
  d_t = teacher_hidden.shape[-1]
  hidden = sg(jnp.where(valid[..., None], teacher_hidden, 0).reshape(-1, d_t))
  mean = _teacher_bias_mean(1.0 / temperature, block_tokens, block_vocab, token_bias,
                            sg(teacher.bias_mean.reshape(-1)), hidden, sg(teacher_weight),
                            sg(teacher_bias), sg(teacher.lse.reshape(-1)))
  return mean.reshape(valid.shape) / temperature


# --------------------------------------------------------------------------- fused code-logit ops

def _check_code_logits(fn, code_logits, assignment, token_bias):
  code_logits = v.float_array(fn, "code_logits", code_logits)
  if code_logits.ndim < 1:
    raise ValueError(f"{fn}: `code_logits` must be [..., K], got a scalar.")
  assignment = _check_assignment(fn, assignment, code_logits.shape[-1])
  token_bias = _check_token_bias(fn, token_bias, assignment.shape[0])
  return code_logits, assignment, token_bias


def vq_lse(code_logits: jax.typing.ArrayLike, assignment: jax.typing.ArrayLike,
           token_bias: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""``logsumexp_v (z_{m(v)} + b_v) = logsumexp_k (z_k + B_k)``: ``[..., K] -> [...]``, float32.

  ``B_k`` is :func:`logitlab.code_log_mass` (``log n_k`` without a bias, ``-inf``
  for an empty code): ``O(K + V)``, no ``[..., V]`` tensor. There is deliberately
  no Pallas kernel for it: a stream over vocabulary tiles costs ``O(N V)`` where
  this identity costs ``O(N K + V)``; :func:`vq_log_probs` and the kernels'
  callers take their normalizer from here.

  Example:
    >>> import jax.numpy as jnp, logitlab
    >>> round(float(logitlab.vq_lse(jnp.array([0.0, 1.0]), jnp.array([1, 0, 1]))), 4)
    1.862

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202.
  """
  code_logits, assignment, token_bias = _check_code_logits("vq_lse", code_logits, assignment,
                                                           token_bias)
  mass = code_log_mass(assignment, code_logits.shape[-1], token_bias)
  return jax.nn.logsumexp(code_logits.astype(jnp.float32) + mass, axis=-1)


def vq_log_probs(code_logits: jax.typing.ArrayLike, assignment: jax.typing.ArrayLike,
                 token_bias: jax.typing.ArrayLike | None = None, *, impl: str = "xla",
                 interpret: bool = False) -> jax.Array:
  r"""Full-vocabulary log-probabilities ``z_{m(v)} + b_v - lse``: ``[..., K] -> [..., V]``, float32.

  This materializes ``[..., V]`` because it is the output asked for; the
  normalizer comes from :func:`vq_lse` in ``O(N K + V)``. With a Pallas ``impl``
  the ``scatter_logits`` kernel writes each vocabulary tile once, straight from
  the code logits (no gathered ``[..., V]`` temporary before the subtraction).
  Differentiable in ``code_logits`` and ``token_bias`` with every ``impl``.

  Args:
    code_logits: ``[..., K]`` code logits.
    assignment: ``[V]`` integer code of each token, in ``[0, K)``.
    token_bias: optional ``[V]`` per-token bias.
    impl: ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"``.
    interpret: run the Pallas kernel in the interpreter (any platform, for tests).

  Example:
    >>> import jax, jax.numpy as jnp, logitlab
    >>> lp = logitlab.vq_log_probs(jnp.array([0.0, 1.0]), jnp.array([1, 0, 1]))
    >>> bool(jnp.allclose(jnp.exp(lp).sum(), 1.0))
    True

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202.
  """
  fn = "vq_log_probs"
  impl = _vq_kernels.check_impl(fn, impl, interpret)
  code_logits, assignment, token_bias = _check_code_logits(fn, code_logits, assignment,
                                                           token_bias)
  z = code_logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z + code_log_mass(assignment, z.shape[-1], token_bias), axis=-1)
  if impl != "xla" and z.size:
    return _vq_kernels.scatter(impl, interpret, z, assignment, token_bias, lse, jnp.float32)
  logits = jnp.take(z, assignment, axis=-1)
  if token_bias is not None:
    logits = logits + token_bias.astype(jnp.float32)
  return logits - lse[..., None]


def vq_top_k(code_logits: jax.typing.ArrayLike, assignment: jax.typing.ArrayLike,
             token_bias: jax.typing.ArrayLike | None = None, k: int = 1, *,
             block_vocab: int | None = None, impl: str = "xla",
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  r"""The ``k`` largest vocabulary logits ``z_{m(v)} + b_v`` and their token ids, streamed.

  Equal to ``jax.lax.top_k(vq_scatter(code_logits, assignment, token_bias), k)``
  (ties to the lower token id, as ``lax.top_k``) without the ``[..., V]`` logits:
  vocabulary tiles are gathered from the code logits one at a time and merged
  into a running top-k with ``lax.top_k`` on ``[N, k + block_vocab]``. Tokens whose
  logit is ``-inf`` (a ``-inf`` bias) come in no guaranteed order.

  Args:
    code_logits: ``[..., K]`` code logits.
    assignment: ``[V]`` integer code of each token.
    token_bias: optional ``[V]`` per-token bias.
    k: how many tokens, ``1 <= k <= V``.
    block_vocab: vocabulary tile (``impl="xla"``: default 1024, raised to ``k``;
      a kernel's: its default, and its block rules apply).
    impl: ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"`` (the ``scatter_top_k``
      kernels of ``pallas_kernels.vq``: the same stream with the running top-k
      on-chip, merged by selection rounds only for tiles that hold a new
      candidate). The values are differentiable in ``code_logits`` and
      ``token_bias`` with every ``impl`` (the kernels' ids are gathered again).
    interpret: run the Pallas kernel in the interpreter (any platform, for tests).

  Returns:
    ``(values, token_ids)``: float32 ``[..., k]`` in descending order and int32 ``[..., k]``.

  Example:
    >>> import jax.numpy as jnp, logitlab
    >>> vals, ids = logitlab.vq_top_k(jnp.array([0.0, 1.0]), jnp.array([1, 0, 1]),
    ...                               jnp.array([0.0, 0.0, 0.5]), 2)
    >>> vals.tolist(), ids.tolist()
    ([1.5, 1.0], [2, 0])

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202.
  """
  fn = "vq_top_k"
  impl = _vq_kernels.check_impl(fn, impl, interpret)
  code_logits, assignment, token_bias = _check_code_logits(fn, code_logits, assignment,
                                                           token_bias)
  vocab_size = assignment.shape[0]
  k = v.static_int(fn, "k", k, minimum=1)
  if k > vocab_size:
    raise ValueError(f"{fn}: `k` = {k} exceeds the vocabulary size V = {vocab_size}.")
  if block_vocab is not None:
    v.static_int(fn, "block_vocab", block_vocab, minimum=1)
  batch_shape = code_logits.shape[:-1]
  if impl != "xla" and code_logits.size:
    ids = _vq_kernels.top_k_ids(impl, interpret, code_logits, assignment, token_bias, k,
                                 block_vocab)
    vals = jnp.take_along_axis(code_logits.astype(jnp.float32), assignment[ids], axis=-1)
    if token_bias is not None:
      vals = vals + token_bias.astype(jnp.float32)[ids]
    return vals, ids
  z = code_logits.astype(jnp.float32).reshape(-1, code_logits.shape[-1])
  # Tiles of at least k tokens: the first (never shifted) tile fills the running top-k.
  cols = tiling.Tiles.over(vocab_size, max(block_vocab or DEFAULT_BLOCK_VOCAB, k))

  def tile_logits(j):
    c0 = cols.start(j)
    logits = jnp.take(z, cols.take(assignment, j), axis=1)
    if token_bias is not None:
      logits = logits + cols.take(token_bias, j).astype(jnp.float32)
    ids = c0 + jnp.arange(cols.block, dtype=jnp.int32)
    return jnp.where(cols.fresh(j, c0), logits, -jnp.inf), ids

  def merge(j, best):
    vals, ids = best
    tile_vals, tile_ids = tile_logits(j)
    # The running entries come first and hold lower token ids: ties keep the lower id.
    vals, pos = lax.top_k(jnp.concatenate([vals, tile_vals], axis=1), k)
    all_ids = jnp.concatenate([ids, jnp.broadcast_to(tile_ids, tile_vals.shape)], axis=1)
    return vals, jnp.take_along_axis(all_ids, pos, axis=1)

  first_vals, first_ids = tile_logits(0)
  vals, pos = lax.top_k(first_vals, k)
  best = (vals, jnp.take(first_ids, pos))
  vals, ids = lax.fori_loop(1, cols.count, merge, best)
  return vals.reshape(batch_shape + (k,)), ids.reshape(batch_shape + (k,))
