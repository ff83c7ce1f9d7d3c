r"""Token-to-code assignments for VQ-Logits heads: k-means, baselines and re-assignment.

A VQ-Logits head (:mod:`logitlab.vq`) needs a codebook ``C[K, D]`` and an
assignment ``m: [V] -> [K]``. Shao et al. use a "learned or pre-assigned
mapping"; no official code is public, so the formulations below are ours:

* **Pre-assigned** (:func:`kmeans_assignment`): k-means on a pretrained output
  embedding ``E[V, D]`` (e.g. the dense model's unembedding); the centroids
  become the codebook, the cluster labels the assignment. k-means++ seeding
  (:func:`kmeans_plus_plus`), Lloyd iterations, empty codes re-seeded, and an
  optional capacity cap (``balanced=True``) so that no code holds more than
  ``max_bucket`` tokens.
* **Baselines**: :func:`contiguous_assignment` (consecutive token ids share a
  code) and :func:`random_assignment` (a balanced random partition), with
  :func:`codebook_from_assignment` (member means) to build a codebook for any
  assignment.
* **Learned mapping / periodic re-assignment** (:func:`reassign`): nearest code
  under squared Euclidean distance, with the same optional cap, at fixed shapes
  and without host synchronisation, so it can run inside a jitted training step
  every ``N`` steps. The recipe we use for the paper's "learned mapping":

  1. Keep per-token vectors ``e_v`` that say where token ``v`` *should* sit in
     code space. Two choices we support equally (both are plain arrays):
     (a) ``e = E_teacher`` fixed, the dense teacher's output embedding, while the
     codebook ``C`` is trained by the loss (:func:`logitlab.vq_cross_entropy`):
     tokens migrate to the trained code that now represents them best;
     (b) ``e_v = sg(C[m(v)]) + r_v`` with a learned residual ``r[V, D]`` trained
     by an auxiliary dense term (e.g. a sampled-softmax or distillation loss on
     ``h . e_v``); ``reassign`` then moves a token whose residual has carried it
     closer to another code.
  2. Every ``N`` steps, inside the jitted step::

       m = lax.cond(step % N == 0, lambda: reassign(e, C), lambda: m)

     optionally followed by one k-means update ``C = codebook_from_assignment(e, m, K)``
     (re-clustering from the current effective embeddings), or a few Lloyd
     iterations warm-started with ``kmeans_assignment(e, K, init=C, iterations=n)``.
     For (b), reset ``r_v <- e_v - C[m_new(v)]`` after a move so ``e_v`` is unchanged.
  3. Between re-assignments ``m`` is a constant of the loss; its change is not
     differentiated (it is a discrete argmin).

Distances are always squared Euclidean, computed blockwise as
``||x||^2 - 2 x.c + ||c||^2`` over ``block_size`` rows of the vocabulary at a
time, so no ``[V, K]`` matrix is ever built; ties go to the lowest code id.
All outputs: codebooks float32 ``[K, D]``, assignments int32 ``[V]``.

References:
  Shao et al., VQ-Logits: Compressing the Output Bottleneck of Large Language
  Models via Vector Quantized Logits, arXiv:2505.10202.
  Lloyd, Least squares quantization in PCM, IEEE Trans. Inf. Theory 28(2), 1982.
  Arthur and Vassilvitskii, k-means++: The Advantages of Careful Seeding, SODA 2007.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from logitlab import _validation as v
from logitlab import debug

__all__ = [
    "BUCKET_SLACK",
    "codebook_from_assignment",
    "contiguous_assignment",
    "kmeans_assignment",
    "kmeans_plus_plus",
    "random_assignment",
    "reassign",
]

# Default capacity of the balanced variants: max_bucket = ceil(BUCKET_SLACK * ceil(V / K)).
# With a cap c, at most V / c codes can ever be full, so every token, the last one
# processed included, still chooses among at least K (1 - V / (K c)) ~ K (1 - 1/s) open
# codes: 20% of the codebook at s = 1.25. s -> 1 forces equal buckets and pushes the last
# tokens into whichever codes remain, however far; a large s no longer bounds the largest
# bucket (the tokens that share one probability in the paper's bias-free head). 1.25 keeps
# the largest bucket within 25% of the mean while leaving a fifth of the codes open, and
# with ``candidates`` = 32 nearest codes per token a token falls back to the full
# search only when all 32 are full (about 0.8**32 ~ 1e-3 if fullness were independent).
BUCKET_SLACK = 1.25

_BLOCK_BUDGET_BYTES = 64 * 2**20   # default block: [B, K] distances + [B, D] rows <= 64 MiB
_PRECISIONS = {None: None, "default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}


# ----------------------------------------------------------------------------- checks

def _check_embeddings(fn: str, name: str, x) -> jax.Array:
  x = v.float_array(fn, name, x)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{fn}: `{name}` must be a non-empty [V, D] matrix, got shape {x.shape}.")
  return x


def _check_bool(fn: str, name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{fn}: `{name}` must be a Python bool, got {value!r}.")
  return bool(value)


def _check_key(fn: str, key) -> jax.Array:
  if key is None:
    raise TypeError(f"{fn}: `key` is required (a jax.random.key or a legacy uint32[2] key).")
  if not hasattr(key, "dtype") or not hasattr(key, "shape"):
    raise TypeError(f"{fn}: `key` must be a jax.random.key or a legacy uint32[2] key, got {key!r}.")
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"{fn}: `key` must be a single key (shape ()), got shape {key.shape}.")
    return key
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise TypeError(f"{fn}: `key` must be a jax.random.key or a legacy uint32[2] key, got dtype "
                    f"{key.dtype} and shape {key.shape}.")
  return jnp.asarray(key)


def _check_precision(fn: str, precision):
  if isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str):
    precision = precision.lower()
  if precision not in _PRECISIONS:
    raise ValueError(f"{fn}: `precision` must be None, a jax.lax.Precision or one of "
                     f"'default', 'high', 'highest', got {precision!r}.")
  return _PRECISIONS[precision]


def _check_num_codes(fn: str, num_codes, vocab_size: int | None = None) -> int:
  num_codes = v.static_int(fn, "num_codes", num_codes, minimum=1)
  if vocab_size is not None and num_codes > vocab_size:
    raise ValueError(f"{fn}: `num_codes`={num_codes} exceeds the number of tokens {vocab_size}; "
                     "k-means needs at least one token per code.")
  return num_codes


def _block_rows(fn: str, block_size, vocab_size: int, num_codes: int, dim: int) -> int:
  """Rows per block: ``block_size``, or the largest multiple of 8 within the 64 MiB budget."""
  if block_size is None:
    rows = _BLOCK_BUDGET_BYTES // (4 * (num_codes + dim))
    block_size = max(8, rows - rows % 8)
  else:
    block_size = v.static_int(fn, "block_size", block_size, minimum=1)
  return min(block_size, vocab_size)


def _cap(fn: str, balanced: bool, max_bucket, vocab_size: int, num_codes: int) -> int | None:
  """The capacity of each code (None when not balanced), after feasibility checks."""
  if not balanced:
    if max_bucket is not None:
      raise ValueError(f"{fn}: `max_bucket` only applies with balanced=True; got "
                       f"max_bucket={max_bucket!r} and balanced=False.")
    return None
  least = -(-vocab_size // num_codes)
  if max_bucket is None:
    return math.ceil(BUCKET_SLACK * least)
  max_bucket = v.static_int(fn, "max_bucket", max_bucket, minimum=1)
  if max_bucket < least:
    raise ValueError(f"{fn}: `max_bucket`={max_bucket} cannot hold {vocab_size} tokens in "
                     f"{num_codes} codes; it must be >= ceil(V / K) = {least}.")
  return max_bucket


# ------------------------------------------------------------------- blockwise passes
#
# Block i covers rows [s_i, s_i + B) with s_i = min(i B, V - B): the last block is
# shifted back instead of padded (padding would copy the whole [V, D] matrix). Its rows
# below i B were handled by an earlier block; ``fresh`` masks them out of every sum and
# keeps their earlier results.

def _num_blocks(vocab_size: int, block: int) -> int:
  return -(-vocab_size // block)


def _slice_as_float32(x: jax.Array, start, size: int) -> jax.Array:
  """Rows ``x[start:start+size]`` in float32, converting only those rows.

  XLA:CPU has no bf16/f16 dynamic-slice: it slices the whole input converted to
  float32 and, inside a loop, hoists that conversion out of it: a ``[V, D]`` float32
  copy (4 GiB at V=256000, D=4096). Passing ``x`` through an optimization barrier
  together with the (loop-variant) start makes the conversion loop-variant, so XLA
  fuses it into the slice and converts one block only.
  """
  if x.dtype != jnp.float32:
    x, start = jax.lax.optimization_barrier((x, start))
  return jax.lax.dynamic_slice_in_dim(x, start, size).astype(jnp.float32)


def _take_as_float32(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Rows ``x[indices]`` in float32, converting only those rows (see :func:`_slice_as_float32`)."""
  if x.dtype != jnp.float32:
    x, indices = jax.lax.optimization_barrier((x, indices))
  return x[indices].astype(jnp.float32)


def _block(x: jax.Array, i, block: int):
  vocab_size = x.shape[0]
  start = jnp.minimum(i * block, vocab_size - block)
  rows = _slice_as_float32(x, start, block)
  fresh = start + jnp.arange(block) >= i * block
  return start, rows, fresh


def _put(buffer: jax.Array, values: jax.Array, start, fresh: jax.Array) -> jax.Array:
  """Writes ``values`` at rows ``start...`` of ``buffer``, keeping the rows not ``fresh``."""
  old = jax.lax.dynamic_slice_in_dim(buffer, start, values.shape[0])
  mask = fresh.reshape(fresh.shape + (1,) * (values.ndim - 1))
  return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(mask, values, old), start, 0)


def _scores(rows: jax.Array, codebook: jax.Array, code_norms: jax.Array, precision) -> jax.Array:
  """``||c_k||^2 - 2 x.c_k`` for a block of rows: ``[B, K]`` (the distance minus ``||x||^2``)."""
  return code_norms[None, :] - 2.0 * jnp.dot(rows, codebook.T, precision=precision,
                                             preferred_element_type=jnp.float32)


def _nearest(x, codebook, *, block: int, precision) -> jax.Array:
  """Nearest code of every row (ties: lowest code id), ``[V]`` int32."""
  code_norms = jnp.sum(codebook * codebook, axis=1)

  def body(i, labels):
    start, rows, fresh = _block(x, i, block)
    nearest = jnp.argmin(_scores(rows, codebook, code_norms, precision), axis=1).astype(jnp.int32)
    return _put(labels, nearest, start, fresh)

  return jax.lax.fori_loop(0, _num_blocks(x.shape[0], block), body,
                           jnp.zeros((x.shape[0],), jnp.int32))


def _candidates(x, codebook, *, block: int, count: int, precision):
  """The ``count`` nearest codes of every row, nearest first (ties: lowest id), and their
  squared distances: ``[V, count]`` int32 and float32."""
  vocab_size = x.shape[0]
  code_norms = jnp.sum(codebook * codebook, axis=1)

  def body(i, carry):
    codes, dists = carry
    start, rows, fresh = _block(x, i, block)
    neg, top = jax.lax.top_k(-_scores(rows, codebook, code_norms, precision), count)
    dist = jnp.maximum(jnp.sum(rows * rows, axis=1, keepdims=True) - neg, 0.0)
    return _put(codes, top.astype(jnp.int32), start, fresh), _put(dists, dist, start, fresh)

  init = (jnp.zeros((vocab_size, count), jnp.int32), jnp.zeros((vocab_size, count), jnp.float32))
  return jax.lax.fori_loop(0, _num_blocks(vocab_size, block), body, init)


def _capped(x, codebook, *, cap: int, block: int, count: int, precision) -> jax.Array:
  """Greedy capacitated assignment (the order is documented in :func:`reassign`)."""
  vocab_size, num_codes = x.shape[0], codebook.shape[0]
  codes, dists = _candidates(x, codebook, block=block, count=count, precision=precision)
  order = jnp.argsort(dists[:, 0], stable=True).astype(jnp.int32)
  code_norms = jnp.sum(codebook * codebook, axis=1)

  def body(i, carry):
    labels, sizes = carry
    token = order[i]
    mine = codes[token]
    open_ = sizes[mine] < cap

    def full_search(_):   # every candidate is full: nearest open code among all K
      row = _slice_as_float32(x, token, 1)[0]
      score = code_norms - 2.0 * jnp.dot(codebook, row, precision=precision,
                                         preferred_element_type=jnp.float32)
      return jnp.argmin(jnp.where(sizes < cap, score, jnp.inf)).astype(jnp.int32)

    code = jax.lax.cond(jnp.any(open_), lambda _: mine[jnp.argmax(open_)], full_search, None)
    return labels.at[token].set(code), sizes.at[code].add(1)

  labels, _ = jax.lax.fori_loop(
      0, vocab_size, body,
      (jnp.zeros((vocab_size,), jnp.int32), jnp.zeros((num_codes,), jnp.int32)))
  return labels


def _assign(x, codebook, *, cap, block, count, precision):
  if cap is None:
    return _nearest(x, codebook, block=block, precision=precision)
  return _capped(x, codebook, cap=cap, block=block, count=count, precision=precision)


def _statistics(x, labels, codebook, *, block: int):
  """One blockwise pass: per-code sums ``[K, D]`` and sizes ``[K]`` of the rows, each row's
  squared distance to its own code ``[V]`` (exact difference form) and their total, the
  inertia."""
  vocab_size, dim = x.shape
  num_codes = codebook.shape[0]

  def body(i, carry):
    sums, sizes, dists, inertia = carry
    start, rows, fresh = _block(x, i, block)
    own = jax.lax.dynamic_slice_in_dim(labels, start, block)
    sums = sums + jax.ops.segment_sum(jnp.where(fresh[:, None], rows, 0.0), own, num_codes)
    sizes = sizes + jax.ops.segment_sum(fresh.astype(jnp.int32), own, num_codes)
    dist = jnp.sum(jnp.square(rows - codebook[own]), axis=1)
    inertia = inertia + jnp.sum(jnp.where(fresh, dist, 0.0))
    return sums, sizes, _put(dists, dist, start, fresh), inertia

  init = (jnp.zeros((num_codes, dim), jnp.float32), jnp.zeros((num_codes,), jnp.int32),
          jnp.zeros((vocab_size,), jnp.float32), jnp.zeros((), jnp.float32))
  return jax.lax.fori_loop(0, _num_blocks(vocab_size, block), body, init)


def _member_sums(x, labels, num_codes: int, *, block: int):
  """Per-code sums ``[K, D]`` and sizes ``[K]`` of the rows of ``x`` (blockwise)."""
  vocab_size, dim = x.shape

  def body(i, carry):
    sums, sizes = carry
    start, rows, fresh = _block(x, i, block)
    own = jax.lax.dynamic_slice_in_dim(labels, start, block)
    return (sums + jax.ops.segment_sum(jnp.where(fresh[:, None], rows, 0.0), own, num_codes),
            sizes + jax.ops.segment_sum(fresh.astype(jnp.int32), own, num_codes))

  init = (jnp.zeros((num_codes, dim), jnp.float32), jnp.zeros((num_codes,), jnp.int32))
  return jax.lax.fori_loop(0, _num_blocks(vocab_size, block), body, init)


def _reseed_empty(x, labels, dists, sums, sizes):
  """Moves the farthest rows into the empty codes (sums and sizes updated in place).

  The j-th empty code (by id) receives the j-th farthest row from its own code
  (distance descending, ties: lowest token id), which leaves its donor code: the
  donor's sum and size drop by that row, the empty code becomes ``{row}``.
  """
  num_codes = sizes.shape[0]
  empty = sizes == 0

  def move(carry):
    sums, sizes = carry
    _, far = jax.lax.top_k(dists, num_codes)        # farthest first
    moved = jnp.arange(num_codes) < jnp.sum(empty)
    rows = _take_as_float32(x, far)
    donors = labels[far]
    sums = sums.at[donors].add(jnp.where(moved[:, None], -rows, 0.0))
    sizes = sizes.at[donors].add(-moved.astype(jnp.int32))
    rank = jnp.maximum(jnp.cumsum(empty) - 1, 0)
    sums = jnp.where(empty[:, None], rows[rank], sums)
    sizes = jnp.where(empty, 1, sizes)
    return sums, sizes

  return jax.lax.cond(jnp.any(empty), move, lambda carry: carry, (sums, sizes))


# --------------------------------------------------------------------- implementations

@functools.partial(jax.jit, static_argnames=("num_codes", "block"))
def _seed(x, key, *, num_codes: int, block: int):
  """k-means++ seeding: row indices ``[K]`` int32 (see :func:`kmeans_plus_plus`)."""
  vocab_size = x.shape[0]

  def nearer(index, nearest):
    """``min(nearest, ||x - x_index||^2)``, blockwise (exact difference form)."""
    centre = _slice_as_float32(x, index, 1)

    def body(i, nearest):
      start, rows, fresh = _block(x, i, block)
      dist = jnp.sum(jnp.square(rows - centre), axis=1)
      old = jax.lax.dynamic_slice_in_dim(nearest, start, block)
      return _put(nearest, jnp.minimum(old, dist), start, fresh)

    return jax.lax.fori_loop(0, _num_blocks(vocab_size, block), body, nearest)

  first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, vocab_size, jnp.int32)
  chosen = jnp.zeros((vocab_size,), bool).at[first].set(True)
  seeds = jnp.zeros((num_codes,), jnp.int32).at[0].set(first)

  def body(j, carry):
    seeds, chosen, nearest = carry
    weight = jnp.where(chosen, 0.0, nearest)
    # Only copies of chosen rows left: draw uniformly among the rows not chosen yet.
    weight = jnp.where(jnp.any(weight > 0), weight, jnp.where(chosen, 0.0, 1.0))
    logits = jnp.where(weight > 0, jnp.log(jnp.where(weight > 0, weight, 1.0)), -jnp.inf)
    index = jax.random.categorical(jax.random.fold_in(key, j), logits).astype(jnp.int32)
    return seeds.at[j].set(index), chosen.at[index].set(True), nearer(index, nearest)

  nearest = nearer(first, jnp.full((vocab_size,), jnp.inf, jnp.float32))
  seeds, _, _ = jax.lax.fori_loop(1, num_codes, body, (seeds, chosen, nearest))
  return seeds


@functools.partial(jax.jit, static_argnames=("num_codes", "iterations", "cap", "block", "count",
                                             "precision", "seeded"))
def _kmeans(x, key, init, *, num_codes, iterations, cap, block, count, precision, seeded):
  if seeded:
    codebook = _take_as_float32(x, _seed(x, key, num_codes=num_codes, block=block))
  else:
    codebook = init.astype(jnp.float32)
  assign = functools.partial(_assign, cap=cap, block=block, count=count, precision=precision)

  def lloyd(t, carry):
    codebook, history = carry
    labels = assign(x, codebook)
    sums, sizes, dists, inertia = _statistics(x, labels, codebook, block=block)
    sums, sizes = _reseed_empty(x, labels, dists, sums, sizes)
    new = jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1)[:, None], codebook)
    return new, history.at[t].set(inertia)

  history = jnp.zeros((iterations + 1,), jnp.float32)
  codebook, history = jax.lax.fori_loop(0, iterations, lloyd, (codebook, history))
  labels = assign(x, codebook)
  _, _, _, inertia = _statistics(x, labels, codebook, block=block)
  return codebook, labels, history.at[iterations].set(inertia)


@functools.partial(jax.jit, static_argnames=("cap", "block", "count", "precision"))
def _reassign(x, codebook, *, cap, block, count, precision):
  return _assign(x, codebook.astype(jnp.float32), cap=cap, block=block, count=count,
                 precision=precision)


@functools.partial(jax.jit, static_argnames=("num_codes", "block"))
def _codebook(x, labels, *, num_codes, block):
  sums, sizes = _member_sums(x, labels, num_codes, block=block)
  return jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1)[:, None], 0.0)


# -------------------------------------------------------------------------- public API

def kmeans_plus_plus(embeddings: jax.typing.ArrayLike, num_codes: int, *, key: jax.Array,
                     block_size: int | None = None) -> jax.Array:
  r"""k-means++ seeds: ``num_codes`` distinct row indices of ``embeddings[V, D]`` (int32 ``[K]``).

  The first seed is uniform over the rows; seed ``j`` is drawn with probability
  proportional to ``D(x)^2 = min_{i<j} ||x - x_{s_i}||^2`` ("D^2 sampling"), rows already
  chosen excluded. If only copies of chosen rows remain (every ``D(x) = 0``) the draw is
  uniform over the rows not chosen yet, so the indices are always distinct. Cost:
  ``K`` passes of ``O(V D)``; memory ``O(V)`` beyond the input (each pass is one fused
  blockwise pass over the rows).

  Args:
    embeddings: ``[V, D]`` floating rows (any float dtype; distances in float32).
    num_codes: ``K <= V``, the number of seeds.
    key: a ``jax.random.key`` (or legacy uint32[2] key); the seeds are a function of it.
    block_size: rows per block of the distance passes (default as :func:`kmeans_assignment`).

  Returns:
    int32 ``[K]`` row indices, in the order drawn.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from logitlab.vq_assignment import kmeans_plus_plus
    >>> x = jnp.array([[0.0, 0.0], [0.1, 0.0], [9.0, 9.0], [9.0, 9.1]])
    >>> seeds = kmeans_plus_plus(x, 2, key=jax.random.key(0))
    >>> sorted(int(i) // 2 for i in seeds)      # one seed in each far-apart pair
    [0, 1]

  References:
    Arthur and Vassilvitskii, k-means++: The Advantages of Careful Seeding, SODA 2007.
  """
  fn = "kmeans_plus_plus"
  x = _check_embeddings(fn, "embeddings", embeddings)
  num_codes = _check_num_codes(fn, num_codes, x.shape[0])
  key = _check_key(fn, key)
  block = _block_rows(fn, block_size, x.shape[0], num_codes, x.shape[1])
  debug.check_finite(fn, embeddings=x)
  return _seed(x, key, num_codes=num_codes, block=block)


def kmeans_assignment(
    embeddings: jax.typing.ArrayLike,
    num_codes: int,
    *,
    key: jax.Array | None = None,
    init: jax.typing.ArrayLike | None = None,
    iterations: int = 20,
    balanced: bool = False,
    max_bucket: int | None = None,
    candidates: int = 32,
    block_size: int | None = None,
    precision=jax.lax.Precision.HIGHEST,
    return_inertia: bool = False,
):
  r"""Pre-assigned VQ-Logits mapping: k-means on ``embeddings[V, D]`` -> ``(codebook, assignment)``.

  Minimizes the inertia ``J(C, m) = sum_v ||e_v - C_{m(v)}||^2`` by Lloyd's
  algorithm from k-means++ seeds (:func:`kmeans_plus_plus`, or ``init``). Iteration
  ``t = 0 .. iterations-1``:

  1. assignment ``m_t(v) = argmin_k ||e_v - C_t[k]||^2`` (ties: lowest ``k``); with
     ``balanced=True`` the capped greedy assignment of :func:`reassign` instead;
  2. ``J_t = J(C_t, m_t)``;
  3. empty codes are re-seeded: the j-th empty code (by id) takes the j-th farthest
     token from its own code (``||e_v - C_t[m_t(v)]||^2`` descending, ties lowest id),
     which leaves its donor code (as scikit-learn's ``KMeans``);
  4. ``C_{t+1}[k] = mean_{v: m(v)=k} e_v`` over the members after step 3 (a code left
     empty by step 3, a donor whose only token moved, keeps ``C_t[k]``).

  Finally ``m_T`` is computed for ``C_T`` and ``(C_T, m_T)`` returned, so every token's
  code is its nearest centroid (``balanced=False``); ``C_T`` holds the member means of
  ``m_{T-1}``, equal to those of ``m_T`` once the iteration has converged
  (:func:`codebook_from_assignment` refits it to ``m_T`` exactly). Without a cap the inertia history
  ``J_0 >= J_1 >= ... >= J_T`` is non-increasing (each step above can only lower ``J``,
  re-seeding included: a moved token's distance becomes 0 and the donor's mean is
  re-fitted); with the greedy cap it need not be.

  Memory (temporaries beyond the input and outputs, in bytes; ``B`` = rows per block,
  ``P`` = ``candidates``; no ``[V, K]`` matrix and no float32 copy of a bf16 input)::

    peak ~ 4 [ B (K + D) + 3 K D + 4 V ]            (+ 4 [ 2 V P + V ] if balanced)

  ``B (K + D)``: one block's scores and float32 rows; ``3 K D``: the codebook, the
  member sums and one more ``[K, D]`` buffer (the update, or the rows gathered to
  re-seed empty codes); ``4 V``: labels, distances, the seeding state; ``2 V P``: the
  candidate codes and distances of the balanced step. At V=256000, D=4096, K=2048
  with the default B=2728 (a 64 MiB block) that is 164 MiB (balanced, P=32: 227 MiB);
  XLA:CPU's compile-time figure is 162 MiB (226 MiB), float32 or bf16 input alike.
  Compute: ``2 V K D`` per iteration (the distance matmuls), plus ``K`` sequential
  seeding passes of ``3 V D``; the balanced step adds ``V`` sequential greedy steps of
  ``O(P)`` each (``O(K D)`` in the rare fall-back).

  Args:
    embeddings: ``[V, D]`` float token embeddings (e.g. a pretrained output embedding).
    num_codes: ``K``, the codebook size, ``1 <= K <= V``.
    key: PRNG key of the k-means++ seeding; required unless ``init`` is given.
    init: optional ``[K, D]`` initial codebook (warm start, e.g. the current codebook
      when re-clustering during training); excludes ``key``.
    iterations: Lloyd iterations (``>= 0``; 0 returns the seeds and their assignment).
    balanced: cap every code at ``max_bucket`` tokens in every assignment step.
    max_bucket: the cap (``balanced=True`` only), ``>= ceil(V / K)``; default
      ``ceil(BUCKET_SLACK * ceil(V / K))`` with ``BUCKET_SLACK = 1.25`` (see its comment).
    candidates: nearest codes kept per token by the balanced greedy step (``P``).
    block_size: rows of the vocabulary per distance block; default: the largest
      multiple of 8 with ``4 B (K + D) <= 64 MiB``.
    precision: precision of the distance matmul (``jax.lax.Precision``); HIGHEST by
      default so that TPU/GPU matmuls do not round the rows to bf16/tf32.
    return_inertia: also return the float32 ``[iterations + 1]`` history ``J_0 .. J_T``.

  Returns:
    ``(codebook, assignment)``: float32 ``[K, D]`` and int32 ``[V]``; plus the
    inertia history with ``return_inertia=True``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from logitlab.vq_assignment import kmeans_assignment
    >>> e = jnp.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [0.0, 0.5]])
    >>> codebook, assignment = kmeans_assignment(e, 2, key=jax.random.key(0))
    >>> assignment.tolist() in ([0, 0, 1, 1, 0], [1, 1, 0, 0, 1])
    True
    >>> sorted(codebook[:, 0].tolist())
    [0.0, 10.0]

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202 ("pre-assigned mapping").
    Lloyd, Least squares quantization in PCM, 1982. Arthur and Vassilvitskii,
    k-means++, SODA 2007.
  """
  fn = "kmeans_assignment"
  x = _check_embeddings(fn, "embeddings", embeddings)
  vocab_size, dim = x.shape
  num_codes = _check_num_codes(fn, num_codes, vocab_size)
  if init is None:
    key = _check_key(fn, key)
  else:
    if key is not None:
      raise ValueError(f"{fn}: pass either `key` (k-means++ seeding) or `init` (a starting "
                       "codebook), not both.")
    init = v.float_array(fn, "init", init)
    if init.shape != (num_codes, dim):
      raise ValueError(f"{fn}: `init` must have shape (num_codes, D) = {(num_codes, dim)}, got "
                       f"{init.shape}.")
  iterations = v.static_int(fn, "iterations", iterations, minimum=0)
  balanced = _check_bool(fn, "balanced", balanced)
  return_inertia = _check_bool(fn, "return_inertia", return_inertia)
  cap = _cap(fn, balanced, max_bucket, vocab_size, num_codes)
  count = min(v.static_int(fn, "candidates", candidates, minimum=1), num_codes)
  block = _block_rows(fn, block_size, vocab_size, num_codes, dim)
  precision = _check_precision(fn, precision)
  debug.check_finite(fn, embeddings=x, init=init)
  codebook, assignment, history = _kmeans(
      x, key, init, num_codes=num_codes, iterations=iterations, cap=cap, block=block,
      count=count, precision=precision, seeded=init is None)
  return (codebook, assignment, history) if return_inertia else (codebook, assignment)


def reassign(
    token_embeddings: jax.typing.ArrayLike,
    codebook: jax.typing.ArrayLike,
    *,
    balanced: bool = False,
    max_bucket: int | None = None,
    candidates: int = 32,
    block_size: int | None = None,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  r"""Nearest code ``m(v) = argmin_k ||e_v - C_k||^2`` (int32 ``[V]``), optionally capped.

  The re-assignment step of a learned mapping (recipe in this module's docstring):
  fixed shapes, no host synchronisation, so it runs inside a jitted training step,
  e.g. every ``N`` steps under ``lax.cond``. Distances are computed blockwise
  (``block_size`` rows at a time), never as a ``[V, K]`` matrix; ties go to the
  lowest code id.

  ``balanced=True`` caps every code at ``max_bucket`` tokens with a greedy pass in a
  fixed order: tokens sorted by the distance to their nearest code, ascending (ties:
  lowest token id); each token in turn takes its nearest code that holds fewer than
  ``max_bucket`` tokens (ties: lowest code id). The ``candidates`` nearest codes of each
  token are precomputed; only a token whose candidates are all full searches all ``K``
  codes again. Since ``K * max_bucket >= V`` is required, an open code always exists:
  every token is assigned and no code exceeds the cap. The greedy pass is ``V``
  sequential steps (a ``fori_loop``), cheap per step but not parallel.

  Args:
    token_embeddings: ``[V, D]`` float per-token vectors ``e``.
    codebook: ``[K, D]`` float codes ``C``.
    balanced: cap the bucket sizes (greedy order above).
    max_bucket: the cap, ``>= ceil(V / K)``; default ``ceil(BUCKET_SLACK * ceil(V / K))``.
    candidates: nearest codes kept per token for the balanced greedy pass.
    block_size: rows per distance block (default: ``4 B (K + D) <= 64 MiB``).
    precision: precision of the distance matmul (HIGHEST by default).

  Returns:
    int32 ``[V]`` code ids in ``[0, K)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from logitlab.vq_assignment import reassign
    >>> codebook = jnp.array([[0.0, 0.0], [1.0, 0.0]])
    >>> e = jnp.array([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [0.2, 0.0]])
    >>> reassign(e, codebook).tolist()                # 0.5 is a tie: lowest id
    [0, 1, 0, 0]
    >>> reassign(e, codebook, balanced=True, max_bucket=2).tolist()
    [0, 1, 1, 0]
    >>> every_100 = jax.jit(lambda step, e, c, m: jax.lax.cond(
    ...     step % 100 == 0, lambda: reassign(e, c), lambda: m))
    >>> every_100(200, e, codebook, jnp.zeros(4, jnp.int32)).tolist()
    [0, 1, 0, 0]

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202 ("learned mapping"; the formulation
    here is ours, the paper gives no code).
  """
  fn = "reassign"
  x = _check_embeddings(fn, "token_embeddings", token_embeddings)
  codebook = _check_embeddings(fn, "codebook", codebook)
  if codebook.shape[1] != x.shape[1]:
    raise ValueError(f"{fn}: `token_embeddings` [V, D] and `codebook` [K, D] must share D, got "
                     f"shapes {x.shape} and {codebook.shape}.")
  vocab_size, num_codes = x.shape[0], codebook.shape[0]
  balanced = _check_bool(fn, "balanced", balanced)
  cap = _cap(fn, balanced, max_bucket, vocab_size, num_codes)
  count = min(v.static_int(fn, "candidates", candidates, minimum=1), num_codes)
  block = _block_rows(fn, block_size, vocab_size, num_codes, x.shape[1])
  precision = _check_precision(fn, precision)
  debug.check_finite(fn, token_embeddings=x, codebook=codebook)
  return _reassign(x, codebook, cap=cap, block=block, count=count, precision=precision)


def codebook_from_assignment(embeddings: jax.typing.ArrayLike, assignment: jax.typing.ArrayLike,
                             num_codes: int, *, block_size: int | None = None) -> jax.Array:
  r"""Codebook of member means: ``C_k = mean_{v: m(v)=k} e_v``, float32 ``[K, D]``.

  A code that holds no token gets the zero vector (its logit is then 0 for every
  input, and :func:`logitlab.vq_cross_entropy` gives it no mass anyway, ``B_k = -inf``).
  Sums are accumulated in float32 blockwise, so a bf16 ``[V, D]`` input is never
  converted whole. One call after :func:`reassign` is one Lloyd update.

  Args:
    embeddings: ``[V, D]`` float rows.
    assignment: ``[V]`` integer codes in ``[0, K)`` (checked in debug mode).
    num_codes: ``K``.
    block_size: rows per block (default as :func:`kmeans_assignment`).

  Returns:
    float32 ``[K, D]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.vq_assignment import codebook_from_assignment
    >>> e = jnp.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    >>> codebook_from_assignment(e, jnp.array([0, 0, 2]), 3).tolist()
    [[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]]
  """
  fn = "codebook_from_assignment"
  x = _check_embeddings(fn, "embeddings", embeddings)
  num_codes = _check_num_codes(fn, num_codes)
  assignment = v.int_array(fn, "assignment", assignment)
  if assignment.shape != (x.shape[0],):
    raise ValueError(f"{fn}: `assignment` must have shape (V,) = ({x.shape[0]},) to match "
                     f"`embeddings` {x.shape}, got {assignment.shape}.")
  debug.check_labels(fn, assignment, jnp.ones(assignment.shape, bool), num_codes)
  block = _block_rows(fn, block_size, x.shape[0], num_codes, x.shape[1])
  return _codebook(x, assignment.astype(jnp.int32), num_codes=num_codes, block=block)


def contiguous_assignment(vocab_size: int, num_codes: int) -> jax.Array:
  """Baseline: consecutive token ids share a code, bucket sizes differ by at most 1.

  With ``q, r = divmod(V, K)``, codes ``0 .. r-1`` hold ``q + 1`` consecutive tokens
  and codes ``r .. K-1`` hold ``q`` (``numpy.array_split``'s convention), in token order:
  ``m = [0]*(q+1) + [1]*(q+1) + ... + [K-1]*q``. With ``K > V`` codes ``V ..`` are empty.

  Returns:
    int32 ``[V]``.

  Example:
    >>> from logitlab.vq_assignment import contiguous_assignment
    >>> contiguous_assignment(7, 3).tolist()
    [0, 0, 0, 1, 1, 2, 2]
  """
  fn = "contiguous_assignment"
  vocab_size = v.static_int(fn, "vocab_size", vocab_size, minimum=1)
  num_codes = _check_num_codes(fn, num_codes)
  q, r = divmod(vocab_size, num_codes)
  sizes = np.full((num_codes,), q, np.int64)
  sizes[:r] += 1
  return jnp.asarray(np.repeat(np.arange(num_codes, dtype=np.int32), sizes))


def random_assignment(vocab_size: int, num_codes: int, *, key: jax.Array) -> jax.Array:
  """Baseline: a balanced random partition, ``m = contiguous_assignment(V, K)[perm]``.

  ``perm`` is a uniformly random permutation of ``[0, V)`` drawn from ``key``, so the
  bucket sizes are exactly those of :func:`contiguous_assignment` (``q+1`` or ``q``)
  while the members of each code are random. Jit-able (``V``, ``K`` static).

  Returns:
    int32 ``[V]``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from logitlab.vq_assignment import random_assignment
    >>> m = random_assignment(7, 3, key=jax.random.key(0))
    >>> jnp.bincount(m, length=3).tolist()
    [3, 2, 2]
  """
  fn = "random_assignment"
  key = _check_key(fn, key)
  base = contiguous_assignment(vocab_size, num_codes)
  return base[jax.random.permutation(key, base.shape[0])]
