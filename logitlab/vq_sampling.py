"""Exact sampling (temperature, top-k, top-p) from a VQ-Logits head without ``[..., V]`` logits.

A VQ-Logits head gives every vocabulary token ``v`` the logit ``logit_v = z_{m(v)} + b_v``
(code logits ``z[..., K]``, assignment ``m[V]``, optional token bias ``b[V]``; see
:mod:`logitlab.vq`). Sampling at temperature ``T`` factorizes over the codes::

  p_v = exp(logit_v / T) / Z = P(code k) * P(v | k),     k = m(v)
  P(code k) ∝ exp(z_k / T) * S_k,     S_k = sum_{u in k} exp(b_u / T)
  P(v | k)  = exp(b_v / T) / S_k      (uniform inside the code without a bias)

Top-k / top-p truncation keeps a prefix of the vocabulary sorted by probability
(ties: lower token id first). Inside one code that order is the code's own order
by ``(b descending, token id ascending)``, which does not depend on ``z``: the kept
set is, per code, a *prefix* of its sorted token list, of length ``n_k``. So
everything reduces to per-code prefix masses ``S_k(n) = sum of the first n`` (one
gather in a table of prefix sums):

  P(code k) ∝ exp(z_k / T) * S_k(n_k),  P(v | k) ∝ exp(b_v / T) for the first n_k tokens

Tables (:func:`vq_sampler_tables`, built once per head in ``O(V log V)``, ``O(V + K)``
memory): the token ids sorted by ``(code, b descending, id ascending)``, their biases,
per-code offsets, and per-code inclusive prefix sums of ``exp((b - max_code b) / T)``.

Per draw (:func:`vq_sample`):

* the code: a categorical (Gumbel-max) draw over ``K`` logits, ``O(K)``;
* the token inside the code: inversion of the code's prefix sums by binary
  search, ``O(log V)``;
* with top-k / top-p, first the per-code kept lengths ``n_k``: a selection in the
  union of the ``K`` sorted code lists. Each step takes a pivot token, counts in
  every code the tokens ranked before it by binary search (``O(K log V)``, fewer
  steps as the windows narrow), evaluates "fewer than k tokens before the pivot"
  (top-k) or "less than p of the mass before the pivot" (top-p, from the prefix
  sums), and so settles the pivot and, in every code, everything on its side. The
  pivot is the weighted median (weights: per-code candidate window widths) of the
  windows' middle tokens, so at least a quarter of the candidates go per step: at
  most about ``log_{4/3} V`` steps, ``O(K log V + K log K)`` each (the ``K log K``
  sorts the ``K`` middles). Top-k starts from windows of at most ``k`` tokens per
  code and a first pivot at the ``k``-th best code's top token. Nothing ``O(V)``
  runs per draw.

Order and ties are exact: tokens are ranked by the exact real value of
``z_k + b_v`` (compared through an error-free two-sum, as float64 would), ties by
lower token id. Without a bias every token of a code ties, so a truncation
boundary can split a code (and codes with equal logits): the lowest token ids are
kept, as ``top-k`` of the dense logits with a stable sort would.

Limits of float32 (the sampler's probabilities are those of :func:`vq_sampling_probs`
up to these): the prefix sums are float32, so a token's probability inside its code
carries an absolute error of up to about ``2**-24`` of the code's kept mass (a token
whose mass is below that may get none); the inner draw's
uniform has ``2**-23`` resolution; top-p compares float32 masses, so a ``top_p``
within about ``1e-6`` of a cumulative mass may fall on either side.

References:
  Shao et al., VQ-Logits: Compressing the Output Bottleneck of Large Language
  Models via Vector Quantized Logits, arXiv:2505.10202.
  Holtzman et al., The Curious Case of Neural Text Degeneration (nucleus / top-p
  sampling), arXiv:1904.09751.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from logitlab import _validation as v
from logitlab import debug
from logitlab import vq


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "sorted_bias", "offsets", "cum_mass", "code_max"],
                   meta_fields=["temperature", "has_bias"])
@dataclasses.dataclass(frozen=True, eq=False)
class VQSamplerTables:
  """Model-only tables of :func:`vq_sampler_tables` (a pytree; pass it through ``jit``).

  Tokens are listed code by code, inside a code by bias descending, then token id
  ascending. ``temperature`` and ``has_bias`` are static (part of the tree structure).

  Attributes:
    tokens: int32 ``[V]`` token ids in that order.
    sorted_bias: float32 ``[V]`` their biases ``b`` (zeros without a bias).
    offsets: int32 ``[K + 1]``: code ``k`` holds positions ``offsets[k]:offsets[k+1]``.
    cum_mass: float32 ``[V]`` inclusive per-code prefix sums of ``exp((b - b_max,k) / T)``.
    code_max: float32 ``[K]`` ``b_max,k / T`` of each code (0 for an empty code), so that
      the log-mass of the first ``n`` tokens of code ``k`` is
      ``code_max[k] + log(cum_mass[offsets[k] + n - 1])``.
    temperature: the temperature ``T`` the prefix sums were built for.
    has_bias: whether a token bias was given (without one the tables hold for any ``T``).
  """

  tokens: jax.Array
  sorted_bias: jax.Array
  offsets: jax.Array
  cum_mass: jax.Array
  code_max: jax.Array
  temperature: float
  has_bias: bool

  @property
  def vocab_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def num_codes(self) -> int:
    return self.offsets.shape[0] - 1


def _arrays(tables: VQSamplerTables) -> VQSamplerTables:
  """The tables with fixed static fields: one compiled program then serves every
  temperature and bias flag (the temperature reaches it as a traced value)."""
  return dataclasses.replace(tables, temperature=1.0, has_bias=False)


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def vq_sampler_tables(assignment: jax.typing.ArrayLike, num_codes: int,
                      token_bias: jax.typing.ArrayLike | None = None, *,
                      temperature: float = 1.0) -> VQSamplerTables:
  """Precomputes the sampling tables of a VQ-Logits head (no hidden state needed).

  ``O(V log V)`` once per head (a sort), ``O(V + K)`` memory. The tables depend on the
  temperature only through the bias: without a bias they serve any temperature.

  Args:
    assignment: ``[V]`` integer code of each token, in ``[0, num_codes)``; codes may be empty.
    num_codes: ``K``, the number of codes (static).
    token_bias: optional finite ``[V]`` per-token bias ``b`` (None: the paper's head).
    temperature: ``T > 0`` the tables (and, by default, the samplers) use.

  Returns:
    a :class:`VQSamplerTables`.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.vq_sampling import vq_sampler_tables
    >>> t = vq_sampler_tables(jnp.array([1, 0, 1, 1]), 3, jnp.array([0.0, 0.0, 1.0, 0.0]))
    >>> t.tokens.tolist(), t.offsets.tolist()
    ([1, 2, 0, 3], [0, 1, 4, 4])
  """
  fn = "vq_sampler_tables"
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  num_codes = v.static_int(fn, "num_codes", num_codes, minimum=1)
  assignment = vq._check_assignment(fn, assignment, num_codes)
  if not _is_traced(assignment):
    values = np.asarray(assignment)
    if values.min() < 0 or values.max() >= num_codes:
      bad = values[(values < 0) | (values >= num_codes)]
      raise ValueError(f"{fn}: `assignment` holds {bad.size} code id(s) outside [0, {num_codes}), "
                       f"e.g. {bad[0]}.")
  vocab_size = assignment.shape[0]
  token_bias = vq._check_token_bias(fn, token_bias, vocab_size)
  if token_bias is not None and not _is_traced(token_bias):
    if not np.all(np.isfinite(np.asarray(token_bias, np.float32))):
      raise ValueError(f"{fn}: `token_bias` must be finite (a banned token belongs in the code "
                       "logits' mask or outside the vocabulary).")
  debug.check_finite(fn, token_bias=token_bias)

  return _build_tables(assignment, token_bias, num_codes=num_codes, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("num_codes", "temperature"))
def _build_tables(assignment, token_bias, *, num_codes: int, temperature: float) -> VQSamplerTables:
  vocab_size = assignment.shape[0]
  codes = assignment.astype(jnp.int32)
  if token_bias is None:
    bias = jnp.zeros((vocab_size,), jnp.float32)
  else:
    bias = token_bias.astype(jnp.float32)
    bias = jnp.where(bias == 0, 0.0, bias)      # -0.0 -> +0.0: one key per real value
  ids = jnp.arange(vocab_size, dtype=jnp.int32)
  order = jnp.lexsort((ids, -bias, codes)).astype(jnp.int32)   # code, b desc, id asc
  sorted_codes = codes[order]
  sorted_bias = bias[order]
  counts = jnp.bincount(codes, length=num_codes).astype(jnp.int32)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
  starts = jnp.minimum(offsets[:-1], vocab_size - 1)
  scaled = sorted_bias / temperature
  code_max = jnp.where(counts > 0, scaled[starts], 0.0)           # first = largest in a code
  mass = jnp.exp(scaled - code_max[sorted_codes])
  is_start = ids == offsets[sorted_codes]

  def segmented_add(left, right):
    (left_sum, left_start), (right_sum, right_start) = left, right
    return jnp.where(right_start, right_sum, left_sum + right_sum), left_start | right_start

  cum_mass, _ = jax.lax.associative_scan(segmented_add, (mass, is_start))
  return VQSamplerTables(tokens=order, sorted_bias=sorted_bias, offsets=offsets,
                         cum_mass=cum_mass, code_max=code_max, temperature=temperature,
                         has_bias=token_bias is not None)


# ------------------------------------------------------------------- argument checks


def _check_call(fn: str, code_logits, tables, temperature, top_k=None, top_p=None):
  """Validated ``(code_logits float32, T, top_k or None, top_p or None)``."""
  if not isinstance(tables, VQSamplerTables):
    raise TypeError(f"{fn}: `tables` must come from vq_sampler_tables, got {type(tables).__name__}.")
  code_logits = v.float_array(fn, "code_logits", code_logits)
  if code_logits.ndim < 1 or code_logits.shape[-1] != tables.num_codes:
    raise ValueError(f"{fn}: `code_logits` must be [..., K] with K = {tables.num_codes} codes "
                     f"as the tables, got shape {code_logits.shape}.")
  if temperature is None:
    temperature = tables.temperature
  else:
    temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
    if tables.has_bias and temperature != tables.temperature:
      raise ValueError(f"{fn}: `temperature`={temperature} differs from the tables' "
                       f"{tables.temperature}; with a token bias the prefix sums depend on the "
                       "temperature: build the tables with vq_sampler_tables(..., "
                       f"temperature={temperature}).")
  if top_k is not None:
    top_k = v.static_int(fn, "top_k", top_k, minimum=1)
    if top_k >= tables.vocab_size:
      top_k = None
  if top_p is not None:
    top_p = v.static_number(fn, "top_p", top_p, minimum=0.0, maximum=1.0, min_open=True)
    if top_p == 1.0:
      top_p = None
  return code_logits.astype(jnp.float32), temperature, top_k, top_p


def _check_key(fn: str, key) -> jax.Array:
  """One typed PRNG key from a typed key or raw ``uint32`` key data."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    typed = key
  else:
    raw = jnp.asarray(key)
    if raw.dtype != jnp.uint32:
      raise TypeError(f"{fn}: `key` must be a PRNG key (jax.random.key or jax.random.PRNGKey), "
                      f"got dtype {raw.dtype} and shape {raw.shape}.")
    try:
      typed = jax.random.wrap_key_data(raw)
    except (TypeError, ValueError) as err:
      raise ValueError(f"{fn}: `key` of shape {raw.shape} is not PRNG key data: {err}") from None
  if typed.shape != ():
    raise ValueError(f"{fn}: `key` must be a single PRNG key, got a batch of shape {typed.shape}; "
                     "one key samples all rows of code_logits, or jax.vmap over keys and rows.")
  return typed


# --------------------------------------------------------------------- per-row core


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth's TwoSum).

  Comparing ``(s, e)`` lexicographically compares the exact sums. Non-finite sums get
  ``e = 0`` (a code masked with ``-inf``).
  """
  s = a + b
  b_virtual = s - a
  err = (a - (s - b_virtual)) + (b - b_virtual)
  return s, jnp.where(jnp.isfinite(s), err, 0.0)


def _first_false(holds: Callable[[jax.Array], jax.Array], lo: jax.Array,
                 hi: jax.Array) -> jax.Array:
  """Per element, the first index in ``[lo, hi)`` where the monotone ``holds`` is False.

  ``holds(i)`` must be True on a prefix of ``[lo, hi)`` and False after; ``hi`` if True
  everywhere. Binary search: ``ceil(log2(max(hi - lo) + 1))`` steps, so narrow windows
  cost little.
  """
  def step(bounds):
    a, b = bounds
    mid = (a + b) // 2
    right = holds(mid)
    active = a < b
    return jnp.where(active & right, mid + 1, a), jnp.where(active & ~right, mid, b)

  return jax.lax.while_loop(lambda bounds: jnp.any(bounds[0] < bounds[1]), step, (lo, hi))[0]


def _prefix_mass(tables: VQSamplerTables, n: jax.Array) -> jax.Array:
  """``S_k(n_k) / exp(code_max[k])``: mass of the first ``n_k`` tokens of each code."""
  last = jnp.clip(tables.offsets[:-1] + n - 1, 0, tables.vocab_size - 1)
  return jnp.where(n > 0, tables.cum_mass[last], 0.0)


class _Row:
  """Quantities of one row of code logits ``z[K]`` shared by the samplers."""

  def __init__(self, z: jax.Array, tables: VQSamplerTables, temperature: float):
    self.z, self.tables, self.temperature = z, tables, temperature
    # The kept set is piecewise constant in z: the searches see z without a gradient,
    # the outputs (log-probabilities, masses) keep theirs.
    self.z_fixed = jax.lax.stop_gradient(z)
    self.sizes = tables.offsets[1:] - tables.offsets[:-1]
    log_weight = jnp.where(self.sizes > 0, z / temperature + tables.code_max, -jnp.inf)
    top = jnp.max(log_weight)
    self.shift = jnp.where(jnp.isfinite(top), top, 0.0)
    self.log_weight = log_weight - self.shift            # per unit of cum_mass, <= 0
    self.weight = jnp.exp(self.log_weight)

  def mass(self, n: jax.Array, *, fixed: bool = False) -> jax.Array:
    """Unnormalized mass ``sum_k exp(z_k/T) S_k(n_k)`` (times ``exp(-shift)``)."""
    weight = jax.lax.stop_gradient(self.weight) if fixed else self.weight
    return jnp.sum(weight * _prefix_mass(self.tables, n))

  def log_partition(self) -> jax.Array:
    return self.shift + jnp.log(self.mass(self.sizes))

  def key_at(self, position_in_code: jax.Array):
    """Ranking key ``(s, e, id)`` of the token at the given position of every code."""
    t = self.tables
    pos = jnp.clip(t.offsets[:-1] + position_in_code, 0, t.vocab_size - 1)
    s, e = _two_sum(self.z_fixed, t.sorted_bias[pos])
    return s, e, t.tokens[pos]

  def pivot_step(self, bounds, pivot: jax.Array, pivot_pos: jax.Array, keep):
    """Evaluates ``keep`` at the token ``pivot_pos`` of code ``pivot`` and shrinks the windows.

    ``bounds = (lo, hi)``: per code, positions ``< lo`` are known kept and ``>= hi`` known
    dropped; the pivot must lie in its code's window. Tokens ranked before the pivot
    include every known-kept one and no known-dropped one, so they are counted inside
    the windows (binary search per code). Kept: everything up to the pivot is kept;
    else everything from the pivot on is dropped.
    """
    lo, hi = bounds
    t = self.tables
    pos = jnp.clip(t.offsets[pivot] + pivot_pos, 0, t.vocab_size - 1)
    ps, pe = _two_sum(self.z_fixed[pivot], t.sorted_bias[pos])
    pid = t.tokens[pos]

    def before_pivot(i):
      s2, e2, ids2 = self.key_at(i)
      return (s2 > ps) | ((s2 == ps) & ((e2 > pe) | ((e2 == pe) & (ids2 < pid))))

    before = _first_false(before_pivot, lo, hi)
    kept = keep(before)
    is_pivot = jnp.arange(self.tables.num_codes) == pivot
    return jnp.where(kept, before + is_pivot, lo), jnp.where(kept, hi, before)

  def select(self, bounds, keep: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per-code lengths ``n_k`` of the longest prefix of the ranking on which ``keep`` holds.

    The ranking orders all tokens by ``z_k + b_v`` descending (exact), ties by id.
    ``keep(c)`` gets, for a pivot token, the per-code counts ``c[K]`` of tokens ranked
    before it, and must be monotone (True, then False along the ranking). ``bounds``:
    the initial windows ``(lo, hi)`` (see :meth:`pivot_step`).
    """
    def body(bounds):
      lo, hi = bounds
      width = hi - lo
      mid = lo + width // 2
      s, e, ids = self.key_at(mid)
      # The pivot: weighted median (by window width) of the windows' middles in ranking
      # order. At least half the candidate weight lies on each side, and every window on
      # the pivot's losing side is at least halved: >= 1/4 of the candidates go per step.
      order = jnp.lexsort((ids, -e, -s))
      cum_width = jnp.cumsum(width[order])
      pivot = order[jnp.argmax(2 * cum_width >= cum_width[-1])]
      return self.pivot_step(bounds, pivot, mid[pivot], keep)

    lo, _ = jax.lax.while_loop(lambda bounds: jnp.any(bounds[0] < bounds[1]), body, bounds)
    return lo

  def top_k_bounds(self, top_k: jax.Array):
    """Initial windows for top-k: at most ``k`` tokens of a code, and a first pivot.

    The first pivot is the ``k``-th best of the codes' first tokens (or the last
    non-empty code's, for ``k`` above the number of codes): ``k`` tokens rank at or
    before it, so the top-k set usually shrinks to a few tokens per code in one step.
    """
    hi = jnp.minimum(self.sizes, top_k)
    s, e, ids = self.key_at(jnp.zeros_like(hi))
    order = jnp.lexsort((ids, -e, -s, self.sizes == 0))       # non-empty codes first
    nonempty = jnp.sum(self.sizes > 0)
    pivot = order[jnp.clip(jnp.minimum(top_k, nonempty) - 1, 0, self.tables.num_codes - 1)]
    return self.pivot_step((jnp.zeros_like(hi), hi), pivot, jnp.zeros((), jnp.int32),
                           lambda before: jnp.sum(before) < top_k)

  def truncate(self, top_k: jax.Array | None, top_p: jax.Array | None) -> jax.Array:
    """Per-code kept lengths ``n[K]``: top-k first, then top-p of the renormalized rest."""
    n = self.sizes
    if top_k is not None:
      n = self.select(self.top_k_bounds(top_k), lambda before: jnp.sum(before) < top_k)
    if top_p is not None:
      target = top_p * self.mass(n, fixed=True)
      n = self.select((jnp.zeros_like(n), n),
                      lambda before: self.mass(before, fixed=True) < target)
    return n

  def code_logits_kept(self, n: jax.Array) -> jax.Array:
    """Log-probabilities (unnormalized) of drawing each code when ``n`` tokens are kept."""
    return self.log_weight + jnp.log(_prefix_mass(self.tables, n))


def _draw_row(z, gumbel, uniform, tables, temperature, top_k, top_p):
  """One token from ``z[K]`` with the row's noise: Gumbel ``[K]`` and a uniform in [0, 1)."""
  row = _Row(z, tables, temperature)
  n = row.truncate(top_k, top_p)
  code = jnp.argmax(row.code_logits_kept(n) + gumbel)      # Gumbel-max: categorical over codes
  start, count = tables.offsets[code], n[code]
  u = uniform * _prefix_mass(tables, n)[code]
  # Inversion: the first kept position whose inclusive prefix mass exceeds u.
  inside = _first_false(
      lambda i: tables.cum_mass[jnp.clip(start + i, 0, tables.vocab_size - 1)] <= u,
      jnp.zeros((), jnp.int32), count)
  inside = jnp.clip(inside, 0, count - 1)
  return tables.tokens[jnp.clip(start + inside, 0, tables.vocab_size - 1)]


def _probs_row(z, tables, temperature, top_k, top_p):
  row = _Row(z, tables, temperature)
  n = row.truncate(top_k, top_p)
  code_prob = jax.nn.softmax(row.code_logits_kept(n))
  kept_mass = _prefix_mass(tables, n)
  position = jnp.arange(tables.vocab_size, dtype=jnp.int32)
  code = jnp.searchsorted(tables.offsets[1:], position, side="right")
  inside = position - tables.offsets[code]
  previous = jnp.where(inside > 0, tables.cum_mass[jnp.maximum(position - 1, 0)], 0.0)
  token_mass = tables.cum_mass - previous          # what the inversion assigns to each position
  prob = jnp.where(inside < n[code],
                   code_prob[code] * token_mass / jnp.where(kept_mass > 0, kept_mass, 1.0)[code],
                   0.0)
  return jnp.zeros((tables.vocab_size,), jnp.float32).at[tables.tokens].set(prob)


def _topk_row(z, tables, temperature, k):
  row = _Row(z, tables, temperature)
  n = row.select(row.top_k_bounds(k), lambda before: jnp.sum(before) < k)
  ends = jnp.cumsum(n)
  slot = jnp.arange(k, dtype=jnp.int32)
  code = jnp.searchsorted(ends, slot, side="right")
  pos = tables.offsets[code] + slot - (ends - n)[code]
  s, e = _two_sum(row.z_fixed[code], tables.sorted_bias[pos])
  ids = tables.tokens[pos]
  order = jnp.lexsort((ids, -e, -s))
  code, pos = code[order], pos[order]
  log_probs = z[code] / temperature + tables.sorted_bias[pos] / temperature - row.log_partition()
  return ids[order], log_probs


def _map_rows(row_fn, batch: tuple[int, ...], *arrays):
  """``row_fn`` applied to every row: each array is ``batch + row shape``."""
  if not batch:
    return row_fn(*arrays)
  flat = [x.reshape((math.prod(batch),) + x.shape[len(batch):]) for x in arrays]
  out = jax.vmap(row_fn)(*flat)
  return jax.tree.map(lambda x: x.reshape(batch + x.shape[1:]), out)


def _dynamic_options(temperature, top_k, top_p):
  """The validated options as arrays, so that one compiled program serves all their values."""
  return (jnp.float32(temperature), None if top_k is None else jnp.int32(top_k),
          None if top_p is None else jnp.float32(top_p))


# ---------------------------------------------------------------------------- public


def vq_sample(key: jax.Array, code_logits: jax.typing.ArrayLike, tables: VQSamplerTables, *,
              temperature: float | None = None, top_k: int | None = None,
              top_p: float | None = None) -> jax.Array:
  r"""Draws tokens exactly from a VQ-Logits head's distribution, with top-k / top-p.

  Samples ``v`` with probability ``p_v ∝ exp((z_{m(v)} + b_v) / T)`` restricted to the
  ``top_k`` most probable tokens, then to the smallest set of most probable tokens
  whose (renormalized) mass is ``>= top_p`` (the token that crosses ``top_p`` is kept;
  HF/vLLM order: top-k first). Ranking ties go to the lower token id. The same as
  applying these filters to the dense logits ``vq_scatter(code_logits, assignment,
  token_bias)``, without building them: ``O(K + log V)`` per draw, plus, with
  truncation, ``O(log V)`` selection steps of ``O(K log V)`` (module docstring).

  Args:
    key: one PRNG key (typed or raw); it samples every row of ``code_logits``. For
      one key per row, ``jax.vmap`` over keys and rows.
    code_logits: ``[..., K]`` code logits ``z`` (``-inf`` masks a code; each row needs
      a finite logit for some non-empty code).
    tables: :func:`vq_sampler_tables` of the head.
    temperature: ``T > 0``; None: the tables' temperature. With a token bias it must
      equal the tables' (their prefix sums depend on it).
    top_k: keep the ``top_k >= 1`` most probable tokens (None: all).
    top_p: nucleus mass in ``(0, 1]`` (None or 1: no nucleus truncation).

  Returns:
    int32 token ids of shape ``code_logits.shape[:-1]``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from logitlab.vq_sampling import vq_sampler_tables, vq_sample
    >>> tables = vq_sampler_tables(jnp.array([1, 0, 1, 1]), 2)
    >>> z = jnp.array([0.0, 3.0])    # tokens 0, 2, 3 tie at logit 3, token 1 has 0
    >>> int(vq_sample(jax.random.key(0), z, tables, top_k=1))    # the tie goes to id 0
    0
    >>> vq_sample(jax.random.key(0), jnp.zeros((5, 2)), tables).shape
    (5,)

  References:
    Shao et al., VQ-Logits, arXiv:2505.10202; Holtzman et al., arXiv:1904.09751 (top-p).
  """
  fn = "vq_sample"
  code_logits, temperature, top_k, top_p = _check_call(fn, code_logits, tables, temperature,
                                                       top_k, top_p)
  key = _check_key(fn, key)
  return _sample(key, code_logits, _arrays(tables), *_dynamic_options(temperature, top_k, top_p))


# Compiled once per shape, table layout and set of options used (not per option value).
@jax.jit
def _sample(key, code_logits, tables, temperature, top_k, top_p):
  batch = code_logits.shape[:-1]
  key_code, key_token = jax.random.split(key)
  gumbel = jax.random.gumbel(key_code, code_logits.shape, jnp.float32)
  uniform = jax.random.uniform(key_token, batch, jnp.float32)
  row_fn = functools.partial(_draw_row, tables=tables, temperature=temperature, top_k=top_k,
                             top_p=top_p)
  return _map_rows(row_fn, batch, code_logits, gumbel, uniform)


def vq_sampling_probs(code_logits: jax.typing.ArrayLike, tables: VQSamplerTables, *,
                      temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None) -> jax.Array:
  """The probabilities :func:`vq_sample` draws with, as a dense ``[..., V]`` float32 array.

  Computed from the same truncation and prefix sums as the sampler (a token's
  probability is its code's probability times its step in the code's prefix sums,
  over the kept prefix mass; the sampler's float32 uniform resolves these to
  ``2**-23`` of the code's kept mass). Materializes ``[..., V]``: for tests and
  inspection.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.vq_sampling import vq_sampler_tables, vq_sampling_probs
    >>> tables = vq_sampler_tables(jnp.array([1, 0, 1, 1]), 2)
    >>> vq_sampling_probs(jnp.array([0.0, 3.0]), tables, top_k=2).tolist()
    [0.5, 0.0, 0.5, 0.0]
  """
  fn = "vq_sampling_probs"
  code_logits, temperature, top_k, top_p = _check_call(fn, code_logits, tables, temperature,
                                                       top_k, top_p)
  return _probs(code_logits, _arrays(tables), *_dynamic_options(temperature, top_k, top_p))


@jax.jit
def _probs(code_logits, tables, temperature, top_k, top_p):
  return _map_rows(functools.partial(_probs_row, tables=tables, temperature=temperature,
                                     top_k=top_k, top_p=top_p), code_logits.shape[:-1],
                   code_logits)


def vq_log_probs_topk(code_logits: jax.typing.ArrayLike, tables: VQSamplerTables, k: int, *,
                      temperature: float | None = None) -> tuple[jax.Array, jax.Array]:
  r"""The ``k`` most probable tokens of a VQ-Logits head and their exact log-probabilities.

  ``log p_v = (z_{m(v)} + b_v) / T - logsumexp_k(z_k / T + B_k)`` of the full (untruncated)
  distribution, for the ``k`` tokens first in the ranking (probability descending, ties:
  lower token id), in that order. No ``[..., V]`` tensor: a top-k selection over the
  per-code sorted lists (``O(log V)`` steps of ``O(K log V)``), then ``O(k log k)``.

  Args:
    code_logits: ``[..., K]`` code logits.
    tables: :func:`vq_sampler_tables` of the head.
    k: number of tokens, ``1 <= k <= V`` (static).
    temperature: as in :func:`vq_sample`.

  Returns:
    ``(tokens, log_probs)``: int32 and float32 arrays of shape ``code_logits.shape[:-1] + (k,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.vq_sampling import vq_sampler_tables, vq_log_probs_topk
    >>> tables = vq_sampler_tables(jnp.array([1, 0, 1, 1]), 2)
    >>> tokens, log_probs = vq_log_probs_topk(jnp.array([0.0, jnp.log(3.0)]), tables, 2)
    >>> tokens.tolist(), [round(x, 4) for x in log_probs.tolist()]
    ([0, 2], [-1.204, -1.204])
  """
  fn = "vq_log_probs_topk"
  code_logits, temperature, _, _ = _check_call(fn, code_logits, tables, temperature)
  k = v.static_int(fn, "k", k, minimum=1)
  if k > tables.vocab_size:
    raise ValueError(f"{fn}: `k`={k} exceeds the vocabulary size {tables.vocab_size}.")
  return _log_probs_topk(code_logits, _arrays(tables), jnp.float32(temperature), k=k)


@functools.partial(jax.jit, static_argnames="k")
def _log_probs_topk(code_logits, tables, temperature, *, k):
  return _map_rows(functools.partial(_topk_row, tables=tables, temperature=temperature, k=k),
                   code_logits.shape[:-1], code_logits)
