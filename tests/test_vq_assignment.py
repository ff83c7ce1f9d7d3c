"""Tests of ``logitlab.vq_assignment``: k-means (plain and capped), baselines, re-assignment.

References are float64 numpy: squared distances ``((x[:, None] - c[None]) ** 2).sum(-1)``,
``argmin`` (first minimum, i.e. the lowest code id on ties), member means with
``np.add.at``, and the capped greedy written from the documented order (tokens by
distance to their nearest code, each taking its nearest code that is not full). Most
tests share a few small shapes so that compiled programs are reused; the memory test
compiles (never runs) at the real V=256000, D=4096, K=2048.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab
from logitlab import vq_assignment as vqa

KEY = jax.random.key(0)


# ------------------------------------------------------------------------ data, refs

def blobs(num_clusters=6, per_cluster=20, dim=5, seed=0, spread=0.3, distance=20.0):
  """Well-separated Gaussian clusters; rows shuffled. Returns (x float32 [V, D], truth [V])."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_clusters, dim)) * distance
  truth = np.repeat(np.arange(num_clusters), per_cluster)
  x = centres[truth] + rng.normal(size=(truth.size, dim)) * spread
  perm = rng.permutation(truth.size)
  return x[perm].astype(np.float32), truth[perm]


def random_data(v=120, d=6, k=7, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(v, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32))


def sq_dist(x, c):
  x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
  return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def inertia(x, c, m):
  x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
  return float(((x - c[np.asarray(m)]) ** 2).sum())


def member_means(x, m, k):
  x = np.asarray(x, np.float64)
  sums, sizes = np.zeros((k, x.shape[1])), np.zeros(k)
  np.add.at(sums, np.asarray(m), x)
  np.add.at(sizes, np.asarray(m), 1)
  return np.where(sizes[:, None] > 0, sums / np.maximum(sizes, 1)[:, None], 0.0)


def greedy_reference(x, c, cap):
  """The documented capped greedy, from the full float64 distance matrix."""
  d = sq_dist(x, c)
  order = np.argsort(d.min(axis=1), kind="stable")
  sizes, out = np.zeros(c.shape[0], int), np.full(x.shape[0], -1)
  for token in order:
    code = int(np.argmin(np.where(sizes < cap, d[token], np.inf)))
    out[token] = code
    sizes[code] += 1
  return out


def same_partition(a, b):
  """True when assignments ``a`` and ``b`` are equal up to relabelling the codes."""
  pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
  return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def purity(pred, truth):
  """Fraction of tokens whose predicted cluster's majority true label is their own."""
  pred, truth = np.asarray(pred), np.asarray(truth)
  total = 0
  for p in np.unique(pred):
    total += np.bincount(truth[pred == p]).max()
  return total / truth.size


# ------------------------------------------------------------------------- k-means

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_well_separated_clusters(seed):
  x, truth = blobs(seed=seed)
  codebook, assignment = vqa.kmeans_assignment(x, 6, key=jax.random.key(seed), iterations=10)
  assert assignment.dtype == jnp.int32 and assignment.shape == (120,)
  assert codebook.dtype == jnp.float32 and codebook.shape == (6, 5)
  # Adjusted purity 1 in both directions: the contingency table is a permutation matrix.
  assert purity(assignment, truth) == 1.0 and purity(truth, assignment) == 1.0
  assert same_partition(assignment, truth)
  np.testing.assert_allclose(codebook, member_means(x, assignment, 6), rtol=1e-5, atol=1e-5)


def test_balanced_kmeans_recovers_equal_clusters_and_respects_cap():
  x, truth = blobs(seed=3)          # 6 clusters of 20: the cap 20 (= ceil(V / K)) is exact
  codebook, assignment = vqa.kmeans_assignment(x, 6, key=KEY, iterations=10, balanced=True,
                                               max_bucket=20)
  assert same_partition(assignment, truth)
  assert np.bincount(assignment, minlength=6).tolist() == [20] * 6


def test_inertia_history_is_non_increasing_and_consistent():
  x, _ = random_data(v=150, d=4, seed=5)     # no cluster structure: many Lloyd moves
  codebook, assignment, history = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12,
                                                        return_inertia=True)
  history = np.asarray(history, np.float64)
  assert history.shape == (13,)
  assert np.all(np.diff(history) <= 1e-5 * history[:-1]), history
  assert history[-1] < history[0]            # it did move
  # J_T is the inertia of what is returned, and the assignment is the nearest code.
  np.testing.assert_allclose(history[-1], inertia(x, codebook, assignment), rtol=1e-5)
  np.testing.assert_array_equal(assignment, sq_dist(x, codebook).argmin(axis=1))


@pytest.mark.parametrize("iterations", [3])
def test_inertia_history_entries_are_the_shorter_runs(iterations):
  """J_t of a long run is the final inertia of the run with ``iterations=t`` (same key)."""
  x, _ = random_data(v=150, d=4, seed=5)
  _, _, long_history = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12, return_inertia=True)
  codebook, assignment = vqa.kmeans_assignment(x, 9, key=KEY, iterations=iterations)
  np.testing.assert_allclose(inertia(x, codebook, assignment), long_history[iterations],
                             rtol=1e-5)


def test_empty_codes_are_reseeded_from_the_farthest_tokens():
  # Codes 1 and 2 start far from every token: both are empty at t=0. The farthest tokens
  # from code 0 are 10 (d=100) then 2 (d=4): code 1 gets {10}, code 2 gets {2}, and code 0
  # keeps {0, 1} (mean 0.5). J_0 = 0 + 1 + 4 + 100, J_1 = 0.25 + 0.25.
  x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]], np.float32)
  init = np.array([[0.0, 0.0], [1e3, 1e3], [-1e3, 1e3]], np.float32)
  codebook, assignment, history = vqa.kmeans_assignment(x, 3, init=init, iterations=1,
                                                        return_inertia=True)
  np.testing.assert_allclose(codebook, [[0.5, 0.0], [10.0, 0.0], [2.0, 0.0]])
  assert assignment.tolist() == [0, 0, 2, 1]
  np.testing.assert_allclose(history, [105.0, 0.5])


def test_empty_codes_reseeded_inside_long_runs():
  x, _ = random_data(v=80, d=3, seed=9)
  init = np.concatenate([x[:4], np.full((4, 3), 50.0, np.float32)])    # 4 far, empty codes
  codebook, assignment, history = vqa.kmeans_assignment(x, 8, init=init, iterations=5,
                                                        return_inertia=True)
  assert np.all(np.bincount(assignment, minlength=8) > 0)
  assert np.all(np.diff(np.asarray(history, np.float64)) <= 1e-5 * np.asarray(history[:-1]))


def test_kmeans_plus_plus_picks_distinct_points():
  x, truth = blobs(num_clusters=4, per_cluster=5, dim=3, seed=4)
  for key in range(4):
    seeds = np.asarray(vqa.kmeans_plus_plus(x, 20, key=jax.random.key(key)))
    assert seeds.dtype == np.int32 and sorted(seeds.tolist()) == list(range(20))  # K = V
    # Well-separated clusters: the first 4 seeds land in 4 different clusters.
    assert sorted(truth[seeds[:4]].tolist()) == [0, 1, 2, 3]
  # Duplicated rows: D^2 sampling never draws a copy of a seed while another point is
  # left; once only copies remain, the indices still differ.
  dup = np.concatenate([x[:10], x[:10]])
  seeds = np.asarray(vqa.kmeans_plus_plus(dup, 20, key=KEY))
  assert sorted(seeds.tolist()) == list(range(20))
  assert len({tuple(dup[i]) for i in seeds[:10]}) == 10


def test_kmeans_plus_plus_samples_proportional_to_squared_distance():
  x = jnp.array([[0.0], [1.0], [3.0]])
  keys = jax.random.split(jax.random.key(7), 3000)
  seeds = np.asarray(jax.vmap(lambda k: vqa.kmeans_plus_plus(x, 2, key=k))(keys))
  expected = {0: {1: 1 / 10, 2: 9 / 10}, 1: {0: 1 / 5, 2: 4 / 5}, 2: {0: 9 / 13, 1: 4 / 13}}
  for first, probs in expected.items():
    second = seeds[seeds[:, 0] == first, 1]
    assert 800 < second.size < 1200
    for index, p in probs.items():
      assert abs(np.mean(second == index) - p) < 0.06, (first, index, np.mean(second == index))


def test_kmeans_is_deterministic_for_a_key():
  x, _ = random_data(v=150, d=4, seed=5)
  a = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12, return_inertia=True)
  b = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12, return_inertia=True)
  for left, right in zip(a, b):
    np.testing.assert_array_equal(left, right)
  seeds = [np.asarray(vqa.kmeans_plus_plus(x, 9, key=jax.random.key(i))) for i in range(3)]
  assert not np.array_equal(seeds[0], seeds[1]) or not np.array_equal(seeds[0], seeds[2])
  np.testing.assert_array_equal(vqa.kmeans_plus_plus(x, 9, key=jax.random.key(1)), seeds[1])


def test_kmeans_legacy_uint32_key_and_bf16_embeddings():
  x, truth = blobs(seed=0)
  _, assignment = vqa.kmeans_assignment(jnp.asarray(x, jnp.bfloat16), 6,
                                        key=jax.random.PRNGKey(0), iterations=10)
  assert same_partition(assignment, truth)


@pytest.mark.parametrize("block_size", [7])
def test_kmeans_does_not_depend_on_block_size(block_size):
  x, _ = random_data(v=150, d=4, seed=5)
  ref = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12, return_inertia=True)
  out = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12, return_inertia=True,
                              block_size=block_size)
  np.testing.assert_array_equal(out[1], ref[1])
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[2], ref[2], rtol=1e-5)


def test_kmeans_under_jit_matches_eager():
  x, _ = random_data(v=150, d=4, seed=5)
  f = jax.jit(functools.partial(vqa.kmeans_assignment, num_codes=9, iterations=12))
  jitted = f(jnp.asarray(x), key=KEY)
  eager = vqa.kmeans_assignment(x, 9, key=KEY, iterations=12)
  np.testing.assert_array_equal(jitted[1], eager[1])
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)


# -------------------------------------------------------------- capped assignment

@pytest.mark.parametrize("candidates", [1, 2, 32])
def test_balanced_reassign_matches_the_documented_greedy(candidates):
  x, c = random_data(v=120, d=6, k=7, seed=1)
  x[:60] = c[0] + 0.1 * x[:60]         # half the tokens crowd around code 0: the cap binds
  cap = 18                              # ceil(120 / 7) = 18
  out = np.asarray(vqa.reassign(x, c, balanced=True, max_bucket=cap, candidates=candidates))
  np.testing.assert_array_equal(out, greedy_reference(x, c, cap))
  sizes = np.bincount(out, minlength=7)
  assert sizes.max() <= cap and sizes.sum() == 120 and out.min() >= 0 and out.max() < 7


def test_balanced_default_cap_and_every_token_assigned():
  x, c = random_data(v=120, d=6, k=7, seed=2)
  x[:100] = c[3] + 0.01 * x[:100]
  cap = math.ceil(vqa.BUCKET_SLACK * math.ceil(120 / 7))
  assert cap == 23
  out = np.asarray(vqa.reassign(x, c, balanced=True))
  np.testing.assert_array_equal(out, greedy_reference(x, c, cap))
  assert np.bincount(out, minlength=7).max() == cap


def test_balanced_kmeans_respects_the_cap(cap=18):
  x, _ = random_data(v=120, d=6, seed=3)
  x[:90] *= 0.05                                   # a dense core and a sparse halo
  codebook, assignment = vqa.kmeans_assignment(x, 7, key=KEY, iterations=6, balanced=True,
                                               max_bucket=cap, block_size=32)
  sizes = np.bincount(np.asarray(assignment), minlength=7)
  assert sizes.max() <= cap and sizes.sum() == 120
  assert np.bincount(sq_dist(x, codebook).argmin(1), minlength=7).max() > cap  # the cap binds


# ------------------------------------------------------------------------- reassign

@pytest.mark.parametrize("block_size", [None, 1, 7, 120, 500])
def test_reassign_matches_numpy_argmin(block_size):
  x, c = random_data(v=120, d=6, k=7, seed=4)
  out = vqa.reassign(x, c, block_size=block_size)
  assert out.dtype == jnp.int32 and out.shape == (120,)
  np.testing.assert_array_equal(out, sq_dist(x, c).argmin(axis=1))


def test_reassign_ties_go_to_the_lowest_code():
  c = np.array([[0, 0], [2, 0], [0, 0], [1, 1]], np.float32)      # codes 0 and 2 coincide
  x = np.array([[1, 0], [0, 0], [0, 1], [2, 1], [1, -0.5]], np.float32)
  ref = sq_dist(x, c).argmin(axis=1)     # numpy: first minimum
  assert ref.tolist() == [0, 0, 0, 1, 0]
  np.testing.assert_array_equal(vqa.reassign(x, c), ref)
  np.testing.assert_array_equal(vqa.reassign(x, c, balanced=True, max_bucket=5), ref)


def test_reassign_in_a_jitted_training_loop():
  x, c = random_data(v=120, d=6, k=7, seed=4)
  every = 3

  @jax.jit
  def step(carry, t):
    codebook, assignment = carry
    codebook = codebook * 0.9 + 0.1         # a stand-in for an optimizer update
    assignment = jax.lax.cond(t % every == 0, lambda: vqa.reassign(x, codebook, balanced=True),
                              lambda: assignment)
    return (codebook, assignment), assignment

  init = (jnp.asarray(c), jnp.zeros((120,), jnp.int32))
  (codebook, assignment), trace = jax.lax.scan(step, init, jnp.arange(7))
  expected = greedy_reference(x, np.asarray(c) * 0.9 ** 7 + 0.1 * sum(0.9 ** i for i in range(7)),
                              23)
  np.testing.assert_array_equal(assignment, expected)          # last refresh at t = 6
  np.testing.assert_array_equal(trace[4], trace[3])            # unchanged between refreshes
  # No host round trip: the compiled step holds no callback.
  text = jax.jit(lambda c: vqa.reassign(x, c, balanced=True)).lower(c).as_text()
  assert "callback" not in text


# -------------------------------------------------------------- baselines, codebook

@pytest.mark.parametrize("vocab_size,num_codes", [(7, 3), (10, 10), (1000, 64), (5, 8)])
def test_contiguous_assignment(vocab_size, num_codes):
  m = np.asarray(vqa.contiguous_assignment(vocab_size, num_codes))
  assert m.dtype == np.int32 and m.shape == (vocab_size,)
  assert np.all(np.diff(m) >= 0) and np.all(np.diff(m) <= 1)            # consecutive ids
  sizes = np.bincount(m, minlength=num_codes)
  assert sizes.max() - sizes.min() <= 1 and sizes.sum() == vocab_size
  expected = np.concatenate([np.full(len(p), i) for i, p in
                             enumerate(np.array_split(np.arange(vocab_size), num_codes))])
  np.testing.assert_array_equal(m, expected)


def test_random_assignment():
  m = np.asarray(vqa.random_assignment(1000, 64, key=KEY))
  base = np.asarray(vqa.contiguous_assignment(1000, 64))
  assert m.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(m, minlength=64), np.bincount(base, minlength=64))
  assert not np.array_equal(m, base)
  np.testing.assert_array_equal(m, vqa.random_assignment(1000, 64, key=KEY))
  assert not np.array_equal(m, vqa.random_assignment(1000, 64, key=jax.random.key(1)))
  jitted = jax.jit(lambda k: vqa.random_assignment(1000, 64, key=k))(KEY)
  np.testing.assert_array_equal(jitted, m)


@pytest.mark.parametrize("dtype,block_size", [(jnp.float32, None), (jnp.float32, 8),
                                              (jnp.bfloat16, 5)])
def test_codebook_from_assignment_is_the_member_mean(dtype, block_size):
  x, _ = random_data(v=37, d=4)
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))            # values dtype holds
  m = np.random.default_rng(0).integers(0, 6, 37)
  m[m == 4] = 5                                                        # code 4 is empty
  out = vqa.codebook_from_assignment(jnp.asarray(x, dtype), m.astype(np.int32), 7,
                                     block_size=block_size)
  assert out.dtype == jnp.float32 and out.shape == (7, 4)
  np.testing.assert_allclose(out, member_means(x, m, 7), rtol=1e-5, atol=1e-6)
  assert not np.any(out[4]) and not np.any(out[6])


def test_codebook_from_assignment_out_of_range_in_debug_mode():
  x, _ = random_data(v=10, d=3)
  with logitlab.debug_checks():
    with pytest.raises(Exception, match="outside"):
      jax.block_until_ready(vqa.codebook_from_assignment(x, np.full(10, 3, np.int32), 3))


# ------------------------------------------------------------------------ bad input

X, C = random_data(v=20, d=3, k=4)
BAD = [
    (vqa.kmeans_assignment, (X.astype(np.int32), 4), dict(key=KEY), TypeError, "embeddings"),
    (vqa.kmeans_assignment, (X[0], 4), dict(key=KEY), ValueError, "embeddings"),
    (vqa.kmeans_assignment, (X, 21), dict(key=KEY), ValueError, "num_codes"),
    (vqa.kmeans_assignment, (X, 0), dict(key=KEY), ValueError, "num_codes"),
    (vqa.kmeans_assignment, (X, 4.0), dict(key=KEY), TypeError, "num_codes"),
    (vqa.kmeans_assignment, (X, 4), {}, TypeError, "key"),
    (vqa.kmeans_assignment, (X, 4), dict(key=0), TypeError, "key"),
    (vqa.kmeans_assignment, (X, 4), dict(key=jax.random.split(KEY)), ValueError, "key"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, init=C), ValueError, "init"),
    (vqa.kmeans_assignment, (X, 4), dict(init=C[:3]), ValueError, "init"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, iterations=-1), ValueError, "iterations"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, balanced=1), TypeError, "balanced"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, max_bucket=6), ValueError, "max_bucket"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, balanced=True, max_bucket=4), ValueError,
     "max_bucket"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, block_size=0), ValueError, "block_size"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, candidates=0), ValueError, "candidates"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, precision="fast"), ValueError, "precision"),
    (vqa.kmeans_assignment, (X, 4), dict(key=KEY, return_inertia=None), TypeError,
     "return_inertia"),
    (vqa.kmeans_plus_plus, (X, 30), dict(key=KEY), ValueError, "num_codes"),
    (vqa.reassign, (X, C[:, :2]), {}, ValueError, "share D"),
    (vqa.reassign, (X, C.astype(np.int32)), {}, TypeError, "codebook"),
    (vqa.reassign, (X, C), dict(balanced=True, max_bucket=2), ValueError, "max_bucket"),
    (vqa.codebook_from_assignment, (X, np.zeros(19, np.int32), 4), {}, ValueError, "assignment"),
    (vqa.codebook_from_assignment, (X, np.zeros(20), 4), {}, TypeError, "assignment"),
    (vqa.contiguous_assignment, (0, 3), {}, ValueError, "vocab_size"),
    (vqa.contiguous_assignment, (5, -1), {}, ValueError, "num_codes"),
    (vqa.random_assignment, (5, 2), dict(key=None), TypeError, "key"),
]


@pytest.mark.parametrize("fn,args,kwargs,error,name", BAD,
                         ids=[f"{b[0].__name__}-{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_naming_the_argument(fn, args, kwargs, error, name):
  with pytest.raises(error, match=f"{fn.__name__}: .*{name}"):
    fn(*args, **kwargs)


# ------------------------------------------------------------- memory at real shape

def peak_formula(vocab, dim, codes, block, candidates=None):
  """The docstring's peak temp estimate, in bytes."""
  peak = 4 * (block * (codes + dim) + 3 * codes * dim + 4 * vocab)
  if candidates is not None:
    peak += 4 * (2 * vocab * candidates + vocab)
  return peak


@pytest.mark.parametrize("dtype,balanced", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_kmeans_memory_at_real_shape_compile_only(dtype, balanced):
  vocab, dim, codes = 256000, 4096, 2048
  f = jax.jit(functools.partial(vqa.kmeans_assignment, num_codes=codes, iterations=2,
                                balanced=balanced, return_inertia=True))
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = f.lower(jax.ShapeDtypeStruct((vocab, dim), dtype), key=key).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  block = vqa._block_rows("test", None, vocab, codes, dim)
  estimate = peak_formula(vocab, dim, codes, block, 32 if balanced else None)
  assert temp < 4 * 2**30
  assert temp < 1.25 * estimate, (temp / 2**20, estimate / 2**20)
  assert temp < vocab * codes * 4 / 4          # far below one [V, K] float32 matrix (2 GiB)


def test_reassign_and_codebook_memory_at_real_shape_compile_only():
  vocab, dim, codes = 256000, 4096, 2048
  emb = jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16)
  f = jax.jit(functools.partial(vqa.reassign, balanced=True))
  temp = f.lower(emb, jax.ShapeDtypeStruct((codes, dim), jnp.float32)).compile() \
      .memory_analysis().temp_size_in_bytes
  assert temp < 256 * 2**20
  g = jax.jit(functools.partial(vqa.codebook_from_assignment, num_codes=codes))
  temp = g.lower(emb, jax.ShapeDtypeStruct((vocab,), jnp.int32)).compile() \
      .memory_analysis().temp_size_in_bytes
  assert temp < 128 * 2**20          # never the [V, D] float32 conversion of the input (4 GiB)
