"""Tests of ``logitlab.vq_sampling``: exact top-k / top-p sampling from a VQ-Logits head.

The reference is a float64 numpy computation on the dense vocabulary logits
``z[m(v)] + b_v`` (exact for float32 inputs): rank by logit descending with a stable
sort (ties: lower token id), keep the first ``top_k``, then the shortest prefix of the
renormalized rest whose mass reaches ``top_p``, and renormalize. The sampler is checked
against it three ways: its implied probabilities (``vq_sampling_probs``, to 1e-6),
chi-square goodness of fit of 20k draws, and ``vq_log_probs_topk`` against an argsort of
the dense log-softmax. Most tests share one head (V=40, K=6, code sizes 1..18 with an
empty code) so that compiled programs are reused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from logitlab import vq
from logitlab.vq_sampling import (VQSamplerTables, vq_log_probs_topk, vq_sample,
                                  vq_sampler_tables, vq_sampling_probs)

V, K = 40, 6
CODE_SIZES = (1, 3, 0, 6, 12, 18)          # very different sizes, code 2 empty
NUM_DRAWS = 20_000


def make_assignment(sizes=CODE_SIZES, seed=0) -> np.ndarray:
  codes = np.repeat(np.arange(len(sizes)), sizes)
  return np.random.default_rng(seed).permutation(codes).astype(np.int32)


ASSIGNMENT = make_assignment()
BIAS = np.random.default_rng(1).normal(size=V).astype(np.float32)
# Code logits: small codes get larger logits so that every code carries mass.
Z = np.array([2.0, 1.2, 0.3, 0.4, -0.2, -0.9], np.float32)


@functools.cache
def tables_for(bias: bool, temperature: float = 1.0) -> VQSamplerTables:
  return vq_sampler_tables(ASSIGNMENT, K, BIAS if bias else None, temperature=temperature)


def dense_reference(z, assignment, bias=None, *, temperature=1.0, top_k=None, top_p=None):
  """float64 ``(probs[V], margin)``; ``margin``: distance of ``top_p`` to the nearest cut."""
  z = np.asarray(z, np.float64)
  logits = z[assignment] + (0.0 if bias is None else np.asarray(bias, np.float64))
  vocab = logits.shape[0]
  probs = np.exp((logits - logits.max()) / temperature)
  probs /= probs.sum()
  ranked = np.lexsort((np.arange(vocab), -logits))          # logit desc, then id asc
  if top_k is not None:
    ranked = ranked[:top_k]
  margin = np.inf
  if top_p is not None:
    q = probs[ranked] / probs[ranked].sum()
    through = np.cumsum(q)
    before = np.concatenate([[0.0], through[:-1]])
    margin = np.min(np.abs(through - top_p))
    ranked = ranked[before < top_p]
  kept = np.zeros(vocab)
  kept[ranked] = probs[ranked]
  return kept / kept.sum(), margin


def probs_of(z, tables, **options) -> np.ndarray:
  """``vq_sampling_probs`` of one row, run as a [4, K] batch to reuse the compiled program."""
  return np.asarray(vq_sampling_probs(np.broadcast_to(z, (4, K)), tables, **options))[0]


def pooled_chisquare(counts, expected):
  """Chi-square p-value, bins with expected count < 5 pooled into one."""
  small = expected < 5
  obs, exp = counts[~small], expected[~small]
  if small.any():
    obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
  return scipy.stats.chisquare(obs, exp).pvalue


CONFIGS = {
    "plain": dict(),
    "T0.7": dict(temperature=0.7),
    "top_k5": dict(top_k=5),
    "top_p0.8": dict(top_p=0.8),
}


# ----------------------------------------------------------------------- tables


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tables_layout_and_code_log_mass(bias, temperature):
  t = tables_for(bias, temperature)
  b = BIAS if bias else np.zeros(V, np.float32)
  expected_order = np.lexsort((np.arange(V), -b, ASSIGNMENT))
  np.testing.assert_array_equal(t.tokens, expected_order)
  np.testing.assert_array_equal(t.offsets, np.concatenate([[0], np.cumsum(CODE_SIZES)]))
  np.testing.assert_array_equal(t.sorted_bias, b[expected_order])
  # Every code's total: code_max + log(last prefix sum) is code_log_mass (-inf when empty).
  sizes = np.array(CODE_SIZES)
  last = np.asarray(t.cum_mass)[np.maximum(np.asarray(t.offsets[1:]) - 1, 0)]
  log_mass = np.where(sizes > 0, np.asarray(t.code_max) + np.log(np.where(sizes > 0, last, 1)),
                      -np.inf)
  want = vq.code_log_mass(jnp.asarray(ASSIGNMENT), K, jnp.asarray(BIAS) if bias else None,
                          temperature=temperature)
  np.testing.assert_allclose(log_mass, want, rtol=1e-6, atol=1e-6)
  assert t.vocab_size == V and t.num_codes == K and t.has_bias == bias


def test_tables_under_jit_equal_eager():
  jitted = jax.jit(vq_sampler_tables, static_argnums=1,
                   static_argnames="temperature")(ASSIGNMENT, K, BIAS, temperature=0.7)
  eager = tables_for(True, 0.7)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------- implied probabilities


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("options", [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(top_k=1),
    dict(top_k=39), dict(top_p=0.05), dict(top_k=12, top_p=0.6), dict(temperature=0.7, top_k=5)
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_sampler_probabilities_equal_dense_reference(bias, options):
  temperature = options.get("temperature", 1.0)
  t = tables_for(bias, temperature)
  rows = np.stack([Z] + [np.random.default_rng(s).normal(size=K).astype(np.float32) * 2
                         for s in (1, 3, 4)])
  got = np.asarray(vq_sampling_probs(rows, t, **options))
  assert got.shape == (4, V)
  for z, row in zip(rows, got):
    want, margin = dense_reference(z, ASSIGNMENT, BIAS if bias else None, **options)
    assert margin > 1e-3, "top_p within float32 reach of a cut: pick other rows"
    np.testing.assert_allclose(row, want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(row > 0, want > 0)     # exactly the same kept set


def test_random_heads_with_many_ties():
  """Integer logits and biases (ties within and across codes), random sizes and options."""
  for seed in range(12):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.multinomial(V, rng.dirichlet(np.full(K, 0.5)))
    assignment = make_assignment(sizes, seed)
    bias = rng.integers(-2, 2, V).astype(np.float32) if seed % 2 else None
    z = rng.integers(-2, 3, K).astype(np.float32)
    t = vq_sampler_tables(assignment, K, bias)
    for options in (dict(top_k=3), dict(top_k=20), dict(top_p=0.5), dict(top_k=7, top_p=0.9)):
      want, margin = dense_reference(z, assignment, bias, **options)
      if margin < 1e-4:
        continue
      got = probs_of(z, t, **options)
      np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=f"{seed} {options}")
      np.testing.assert_array_equal(got > 0, want > 0)


# ------------------------------------------------------------------- chi-square


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_draws_fit_dense_distribution(bias, config):
  options = CONFIGS[config]
  temperature = options.get("temperature", 1.0)
  # Bias-free tables serve any temperature; with a bias they are built for it.
  t = tables_for(bias, temperature if bias else 1.0)
  want, _ = dense_reference(Z, ASSIGNMENT, BIAS if bias else None, **options)
  draws = vq_sample(jax.random.key(7), jnp.broadcast_to(Z, (NUM_DRAWS, K)), t, **options)
  assert draws.shape == (NUM_DRAWS,) and draws.dtype == jnp.int32
  counts = np.bincount(np.asarray(draws), minlength=V)
  assert counts[want == 0].sum() == 0, "drew a token outside the kept set"
  support = want > 0
  assert pooled_chisquare(counts[support], NUM_DRAWS * want[support]) > 1e-3
  if config == "top_k5":
    assert support.sum() == 5


# ------------------------------------------------------------------------- ties


def test_top_k_splits_a_code_by_token_id():
  t = tables_for(False)
  # Codes 1 (3 tokens) and 3 (6 tokens) tie at the top: the 9 tokens all have logit 2.
  z = np.array([0.0, 2.0, 0.0, 2.0, -1.0, -1.0], np.float32)
  tied = np.flatnonzero(np.isin(ASSIGNMENT, [1, 3]))
  assert len(tied) == 9
  for top_k in (2, 5):            # splits the union of two codes (and code 3 itself)
    expected = np.sort(tied)[:top_k]
    probs = probs_of(z, t, top_k=top_k)
    np.testing.assert_array_equal(np.flatnonzero(probs), expected)
    np.testing.assert_allclose(probs[expected], 1 / top_k, rtol=1e-6)
    draws = np.asarray(vq_sample(jax.random.key(3), jnp.broadcast_to(z, (NUM_DRAWS, K)), t,
                                 top_k=top_k))
    assert set(draws.tolist()) == set(expected.tolist())
  # Code 3 alone on top: top_k=4 keeps its 4 lowest ids, whatever the other codes hold.
  z = np.array([0.0, 1.0, 0.0, 2.0, -1.0, -1.0], np.float32)
  code3 = np.flatnonzero(ASSIGNMENT == 3)
  probs = probs_of(z, t, top_k=4)
  np.testing.assert_array_equal(np.flatnonzero(probs), code3[:4])
  # top_p inside the tie: 9 equal tokens, p=0.5 needs 5 of them (4/9 < 0.5 <= 5/9).
  z = np.array([-30.0, 2.0, 0.0, 2.0, -30.0, -30.0], np.float32)
  probs = probs_of(z, t, top_p=0.5)
  np.testing.assert_array_equal(np.flatnonzero(probs), np.sort(tied)[:5])
  tokens, _ = vq_log_probs_topk(z, t, 6)
  np.testing.assert_array_equal(tokens, np.sort(tied)[:6])


def test_ranking_is_exact_beyond_float32_rounding():
  """``1 + 2**-29`` beats ``1 + 2**-30`` although both round to 1.0 in float32."""
  assignment = np.array([0, 0, 1, 1], np.int32)
  bias = np.array([2.0**-30, -1.0, 2.0**-29, -1.0], np.float32)
  z = np.ones(2, np.float32)
  assert np.float32(z[0] + bias[0]) == np.float32(z[1] + bias[2])     # a float32 tie
  t = vq_sampler_tables(assignment, 2, bias)
  want, _ = dense_reference(z, assignment, bias, top_k=1)
  np.testing.assert_array_equal(np.flatnonzero(want), [2])
  assert int(vq_sample(jax.random.key(0), z, t, top_k=1)) == 2
  np.testing.assert_array_equal(vq_log_probs_topk(z, t, 3)[0], [2, 0, 1])


# --------------------------------------------------------------- top-k log-probs


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("k", [1, 5, V])
def test_log_probs_topk_against_dense_argsort(bias, k):
  t = tables_for(bias, 0.7)
  rows = np.stack([Z, np.array([1.0, 1.0, 0.0, 1.0, -1.0, 0.5], np.float32),
                   np.random.default_rng(5).normal(size=K).astype(np.float32)])
  tokens, log_probs = vq_log_probs_topk(rows, t, k)
  assert tokens.shape == log_probs.shape == (3, k)
  for z, tok, lp in zip(rows, np.asarray(tokens), np.asarray(log_probs)):
    logits = np.asarray(z, np.float64)[ASSIGNMENT] + (BIAS.astype(np.float64) if bias else 0)
    dense = logits / 0.7 - scipy.special.logsumexp(logits / 0.7)
    want = np.argsort(-dense, kind="stable")[:k]       # ties: lower id first
    np.testing.assert_array_equal(tok, want)
    np.testing.assert_allclose(lp, dense[want], atol=1e-5, rtol=0)


def test_log_probs_topk_gradient_equals_dense():
  """The log-probabilities are differentiable in the code logits (the selection is not)."""
  t = tables_for(True, 0.7)
  rows = jnp.asarray(np.stack([Z, np.random.default_rng(5).normal(size=K)]), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5)), jnp.float32)
  tokens, _ = vq_log_probs_topk(rows, t, 5)

  def dense(z):
    log_p = jax.nn.log_softmax(vq.vq_scatter(z, ASSIGNMENT, BIAS) / 0.7, axis=-1)
    return jnp.sum(weights * jnp.take_along_axis(log_p, tokens, axis=-1))

  got = jax.grad(lambda z: jnp.sum(weights * vq_log_probs_topk(z, t, 5)[1]))(rows)
  np.testing.assert_allclose(got, jax.grad(dense)(rows), atol=1e-5)
  assert np.abs(got).max() > 0.1


# ------------------------------------------------------------------ jit / vmap


def test_jit_and_vmap():
  t = tables_for(True)
  rows = jnp.asarray(np.random.default_rng(9).normal(size=(4, K)), jnp.float32)
  keys = jax.random.split(jax.random.key(11), 4)
  sample = functools.partial(vq_sample, top_k=5, top_p=0.8)
  each = np.array([int(sample(keys[i], rows[i], t)) for i in range(4)])
  batched = jax.jit(jax.vmap(sample, in_axes=(0, 0, None)))(keys, rows, t)
  np.testing.assert_array_equal(batched, each)
  # Raw uint32 keys work and draw what the typed key draws.
  assert int(sample(jax.random.PRNGKey(3), rows[0], t)) == int(sample(jax.random.key(3), rows[0], t))
  tok, lp = jax.jit(jax.vmap(lambda z, t: vq_log_probs_topk(z, t, 5), in_axes=(0, None)))(rows, t)
  tok_all, lp_all = vq_log_probs_topk(rows, t, 5)
  np.testing.assert_array_equal(tok, tok_all)
  np.testing.assert_allclose(lp, lp_all, atol=1e-6)
  assert len(set(map(tuple, np.asarray(tok)))) > 1        # the rows differ


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns"):
          yield from _equations(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _equations(sub.jaxpr)


def test_no_vocabulary_sized_work_per_draw():
  """No operation of a draw (or of the top-k log-probs) produces an array of size >= V."""
  vocab, codes = 1000, 7
  assignment = np.random.default_rng(0).integers(0, codes, vocab).astype(np.int32)
  t = vq_sampler_tables(assignment, codes, np.random.default_rng(1).normal(size=vocab)
                        .astype(np.float32))
  z = jnp.zeros((3, codes))
  programs = {
      "sample": jax.make_jaxpr(lambda z: vq_sample(jax.random.key(0), z, t, top_k=50,
                                                    top_p=0.9))(z),
      "topk": jax.make_jaxpr(lambda z: vq_log_probs_topk(z, t, 20))(z),
      "probs": jax.make_jaxpr(lambda z: vq_sampling_probs(z, t, top_k=50))(z),
  }
  sizes = {name: max(np.prod(var.aval.shape, dtype=int) for eqn in _equations(p.jaxpr)
                     for var in eqn.outvars if hasattr(var.aval, "shape"))
           for name, p in programs.items()}
  assert sizes["sample"] < vocab and sizes["topk"] < vocab, sizes
  assert sizes["probs"] >= vocab, sizes       # the dense helper does: the check can fail
  # The searches are loops (a selection while-loop, binary-search fori-loops).
  names = {eqn.primitive.name for eqn in _equations(programs["sample"].jaxpr)}
  assert "while" in names


# --------------------------------------------------------------------- bad input


def test_bad_inputs_raise():
  t, tb = tables_for(False), tables_for(True)
  key = jax.random.key(0)
  z = jnp.asarray(Z)
  cases = [
      (ValueError, r"top_k.*>= 1.*got 0", lambda: vq_sample(key, z, t, top_k=0)),
      (ValueError, r"top_k.*>= 1.*got -3", lambda: vq_sample(key, z, t, top_k=-3)),
      (TypeError, r"top_k.*Python int", lambda: vq_sample(key, z, t, top_k=2.5)),
      (ValueError, r"top_p.*\(0\.0, 1\.0\].*got 0\.0", lambda: vq_sample(key, z, t, top_p=0.0)),
      (ValueError, r"top_p.*got 1\.5", lambda: vq_sample(key, z, t, top_p=1.5)),
      (ValueError, r"top_p.*got -0\.1", lambda: vq_sampling_probs(z, t, top_p=-0.1)),
      (ValueError, r"temperature.*got 0\.0", lambda: vq_sample(key, z, t, temperature=0.0)),
      (ValueError, r"temperature.*got -1\.0", lambda: vq_sample(key, z, t, temperature=-1.0)),
      (ValueError, r"temperature.*got 0\.0",
       lambda: vq_sampler_tables(ASSIGNMENT, K, temperature=0.0)),
      (ValueError, r"differs from the tables' 1\.0",
       lambda: vq_sample(key, z, tb, temperature=0.7)),
      (ValueError, r"\[\.\.\., K\] with K = 6.*\(5,\)", lambda: vq_sample(key, z[:5], t)),
      (ValueError, r"\[\.\.\., K\] with K = 6.*\(2, 7\)",
       lambda: vq_log_probs_topk(jnp.zeros((2, 7)), t, 3)),
      (ValueError, r"got shape \(\)", lambda: vq_sampling_probs(jnp.float32(1.0), t)),
      (TypeError, r"code_logits.*floating", lambda: vq_sample(key, jnp.zeros(K, int), t)),
      (TypeError, r"tables.*vq_sampler_tables", lambda: vq_sample(key, z, (1, 2))),
      (ValueError, r"single PRNG key.*\(2,\)",
       lambda: vq_sample(jax.random.split(key, 2), z, t)),
      (TypeError, r"key.*PRNG key.*float32", lambda: vq_sample(jnp.zeros(2), z, t)),
      (ValueError, r"k.*>= 1", lambda: vq_log_probs_topk(z, t, 0)),
      (ValueError, r"exceeds the vocabulary size 40", lambda: vq_log_probs_topk(z, t, 41)),
      (ValueError, r"outside \[0, 6\).*e\.g\. 6",
       lambda: vq_sampler_tables(np.full(V, 6, np.int32), K)),
      (ValueError, r"assignment.*\[V\] vector", lambda: vq_sampler_tables(np.zeros((2, 3), int), K)),
      (ValueError, r"token_bias.*\(40,\).*\(39,\)",
       lambda: vq_sampler_tables(ASSIGNMENT, K, np.zeros(39, np.float32))),
      (ValueError, r"token_bias.*finite",
       lambda: vq_sampler_tables(ASSIGNMENT, K, np.full(V, np.inf, np.float32))),
      (ValueError, r"num_codes.*>= 1", lambda: vq_sampler_tables(ASSIGNMENT, 0)),
  ]
  for error, pattern, call in cases:
    with pytest.raises(error, match=pattern):
      call()


def test_options_that_keep_everything_are_no_ops():
  t = tables_for(True)
  plain = vq_sample(jax.random.key(4), jnp.broadcast_to(Z, (64, K)), t)
  np.testing.assert_array_equal(
      vq_sample(jax.random.key(4), jnp.broadcast_to(Z, (64, K)), t, top_k=V, top_p=1.0), plain)
  np.testing.assert_array_equal(
      vq_sample(jax.random.key(4), jnp.broadcast_to(Z, (64, K)), t, temperature=1.0), plain)
