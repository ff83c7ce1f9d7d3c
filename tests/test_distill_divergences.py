"""Tests of ``logitlab.distill.divergences`` against float64 numpy written from the formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from logitlab.distill import divergences as dv
from numeric import fd_grad

B, S, V = 3, 5, 11


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  with np.errstate(invalid="ignore"):                # -inf - max on tokens of probability 0
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def xlogy_ratio(p, q):
  """sum p log(p / q) with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def np_divergence(name, zs, zt, temperature=1.0, beta=0.5, lam=0.1, kl=False):
  ps = np.exp(np_log_softmax(np.asarray(zs, np.float64) / temperature))
  pt = np.exp(np_log_softmax(np.asarray(zt, np.float64) / temperature))
  if name == "kl":
    return xlogy_ratio(pt, ps)
  if name == "reverse_kl":
    return xlogy_ratio(ps, pt)
  if name == "jsd":
    if beta == 0:
      return xlogy_ratio(pt, ps)
    if beta == 1:
      return xlogy_ratio(ps, pt)
    m = (1 - beta) * ps + beta * pt
    return beta * xlogy_ratio(pt, m) + (1 - beta) * xlogy_ratio(ps, m)
  if name == "skew_kl":
    m = lam * pt + (1 - lam) * ps
    ce = -np.where(pt > 0, pt * np.log(m), 0.0).sum(-1)
    return ce + np.where(pt > 0, pt * np.log(np.where(pt > 0, pt, 1)), 0).sum(-1) if kl else ce
  if name == "skew_reverse_kl":
    return xlogy_ratio(ps, (1 - lam) * pt + lam * ps)
  if name == "tv":
    return 0.5 * np.abs(ps - pt).sum(-1)
  raise ValueError(name)


PUBLIC = {
    "kl": dv.kl_divergence,
    "reverse_kl": dv.reverse_kl,
    "jsd": dv.generalized_jsd,
    "skew_kl": dv.skew_kl,
    "skew_reverse_kl": dv.skew_reverse_kl,
    "tv": dv.total_variation,
}
# (divergence, options) pairs covering the defaults and the special cases.
CASES = [
    ("kl", {}), ("reverse_kl", {}),
    ("jsd", {}), ("jsd", dict(beta=0.0)), ("jsd", dict(beta=1.0)), ("jsd", dict(beta=0.2)),
    ("skew_kl", {}), ("skew_kl", dict(kl=True)), ("skew_kl", dict(lam=0.0)),
    ("skew_kl", dict(lam=0.5, kl=True)), ("skew_kl", dict(lam=1.0)),
    ("skew_reverse_kl", {}), ("skew_reverse_kl", dict(lam=0.0)), ("skew_reverse_kl", dict(lam=1.0)),
    ("tv", {}),
]


def logits(seed, shape=(B, S, V), scale=2.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_match_float64(name, options, temperature):
  zs, zt = logits(0), logits(1)
  out = PUBLIC[name](zs, zt, temperature=temperature, **options)
  ref = np_divergence(name, zs, zt, temperature, **options)
  assert out.shape == (B, S) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,options", CASES)
def test_zero_at_a_match_except_the_cross_entropy_form(name, options):
  z = logits(2)
  out = PUBLIC[name](z, z, **options)
  if name == "skew_kl" and not options.get("kl", False):
    # The official DistiLLM form is a cross-entropy: at a match it is the teacher entropy.
    entropy = -np.sum(np.exp(np_log_softmax(z)) * np_log_softmax(z), -1)
    np.testing.assert_allclose(out, entropy, rtol=1e-5)
  else:
    np.testing.assert_allclose(out, 0.0, atol=3e-6)


@pytest.mark.parametrize("name,options", [c for c in CASES if c[0] != "tv"])  # |x|: see below
def test_student_gradient_matches_float64_finite_differences(name, options):
  zs, zt = logits(3, (2, 6), 1.0), logits(4, (2, 6), 1.0)
  f = lambda zs: jnp.sum(PUBLIC[name](zs, zt, temperature=1.5, **options) * jnp.array([1.0, 0.5]))
  grad = np.asarray(jax.grad(f)(zs), np.float64)
  ref = fd_grad(lambda z: np_divergence(name, z, zt, 1.5, **options) * np.array([1.0, 0.5]), zs)
  np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


def test_total_variation_gradient_is_the_sign_formula():
  zs, zt = logits(5, (2, 6), 1.0), logits(6, (2, 6), 1.0)
  grad = jax.grad(lambda zs: jnp.sum(dv.total_variation(zs, zt)))(zs)
  ps = np.exp(np_log_softmax(zs))
  pt = np.exp(np_log_softmax(zt))
  sign = np.sign(ps - pt)
  # d/dz_j 1/2 sum_v |p_v - q_v| = 1/2 p_j (sign_j - sum_v sign_v p_v)
  ref = 0.5 * ps * (sign - np.sum(sign * ps, -1, keepdims=True))
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-7)


def test_jsd_half_is_symmetric_and_bounded_by_log2():
  zs, zt = logits(7), logits(8, scale=6.0)
  a = dv.generalized_jsd(zs, zt, beta=0.5)
  b = dv.generalized_jsd(zt, zs, beta=0.5)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.all(np.asarray(a) <= np.log(2) + 1e-6)


@pytest.mark.parametrize("name,options", CASES)
def test_teacher_gets_no_gradient(name, options):
  zs, zt = logits(9), logits(10)
  grad = jax.grad(lambda zt: jnp.sum(PUBLIC[name](zs, zt, **options)))(zt)
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("name,options", CASES)
def test_mask_gives_zero_loss_and_gradient_even_with_nan(name, options):
  zs = logits(11).at[1, 2].set(jnp.nan)
  zt = logits(12).at[0, 4].set(jnp.inf)
  where = np.ones((B, S), bool)
  where[1, 2] = where[0, 4] = False
  f = lambda zs: PUBLIC[name](zs, zt, where=jnp.asarray(where), **options)
  out = f(zs)
  grad = jax.grad(lambda zs: jnp.sum(f(zs)))(zs)
  assert out[1, 2] == 0 and out[0, 4] == 0
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[1, 2] == 0)
  ref = np_divergence(name, zs, zt, **options)
  np.testing.assert_allclose(np.asarray(out)[where], ref[where], rtol=2e-5, atol=2e-6)


def test_zero_probabilities_follow_the_0_log_0_convention():
  # The teacher gives -inf to token 0, the student to token 1.
  zs = jnp.array([[0.0, -jnp.inf, 1.0, 2.0]])
  zt = jnp.array([[-jnp.inf, 0.5, 1.0, 2.0]])
  assert np.isinf(dv.kl_divergence(zs, zt)[0])         # the teacher's mass on token 1
  assert np.isinf(dv.reverse_kl(zs, zt)[0])            # the student's mass on token 0
  for name in ("jsd", "skew_kl", "skew_reverse_kl", "tv"):
    out = PUBLIC[name](zs, zt)
    np.testing.assert_allclose(out, np_divergence(name, zs, zt), rtol=1e-5)
    grad = jax.grad(lambda z: jnp.sum(PUBLIC[name](z, zt)))(zs)
    assert np.all(np.isfinite(grad)), name
  # Both sides -inf on one token: that token contributes nothing to any divergence.
  both = jnp.array([[-jnp.inf, 0.0, 1.0]])
  other = jnp.array([[-jnp.inf, 1.0, 0.0]])
  for name, fn in PUBLIC.items():
    np.testing.assert_allclose(fn(both, other), fn(both[:, 1:], other[:, 1:]), rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda z: jnp.sum(fn(z, other)))(both))), name


def test_bf16_inputs_give_float32_within_the_bf16_rule():
  zs, zt = logits(13), logits(14)
  out = dv.generalized_jsd(zs.astype(jnp.bfloat16), zt.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32
  ref = np_divergence("jsd", zs, zt)
  naive = np_divergence("jsd", zs.astype(jnp.bfloat16).astype(jnp.float32),
                        zt.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.all(np.abs(np.asarray(out) - ref) <= np.abs(naive - ref) + 1e-5)


def test_jit_and_vmap():
  zs, zt = logits(15), logits(16)
  f = functools.partial(dv.skew_reverse_kl, lam=0.3)
  np.testing.assert_allclose(jax.jit(f)(zs, zt), f(zs, zt), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(zs, zt), f(zs, zt), rtol=1e-6)


def test_divergence_terms_sum_to_the_public_functions():
  zs, zt = logits(17), logits(18)
  ls, lt = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
  for name, options in CASES:
    total = jnp.sum(dv.divergence_terms(name, ls, lt, **options), -1)
    np.testing.assert_allclose(total, PUBLIC[name](zs, zt, **options), rtol=1e-6, atol=1e-7)


def test_reduce_tokens_both_reductions():
  rng = np.random.default_rng(19)
  loss = rng.uniform(size=(B, S)).astype(np.float32)
  mask = rng.uniform(size=(B, S)) > 0.3
  loss_nan = np.where(mask, loss, np.nan)
  tok = dv.reduce_tokens(jnp.asarray(loss_nan), jnp.asarray(mask))
  bat = dv.reduce_tokens(jnp.asarray(loss_nan), jnp.asarray(mask), reduction="batch_mean")
  tot = dv.reduce_tokens(jnp.asarray(loss_nan), jnp.asarray(mask), reduction="sum")
  np.testing.assert_allclose(tok, loss[mask].sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(bat, loss[mask].sum() / B, rtol=1e-6)
  np.testing.assert_allclose(tot, loss[mask].sum(), rtol=1e-6)
  zero = dv.reduce_tokens(jnp.asarray(loss), jnp.zeros((B, S), bool))
  assert zero == 0
  np.testing.assert_allclose(dv.reduce_tokens(jnp.asarray(loss)), loss.mean(), rtol=1e-6)


def test_rejects_bad_arguments():
  zs, zt = logits(20), logits(21)
  with pytest.raises(ValueError, match="one shape"):
    dv.kl_divergence(zs, zt[..., :-1])
  with pytest.raises(ValueError, match="temperature"):
    dv.kl_divergence(zs, zt, temperature=0.0)
  with pytest.raises(ValueError, match="beta"):
    dv.generalized_jsd(zs, zt, beta=1.5)
  with pytest.raises(ValueError, match="lam"):
    dv.skew_kl(zs, zt, lam=-0.1)
  with pytest.raises(TypeError, match="where"):
    dv.reverse_kl(zs, zt, where=jnp.ones((B, S)))
  with pytest.raises(ValueError, match="where"):
    dv.reverse_kl(zs, zt, where=jnp.ones((B, S + 1), bool))
  with pytest.raises(TypeError, match="student_logits"):
    dv.total_variation(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="reduction"):
    dv.reduce_tokens(jnp.ones((2, 3)), reduction="mean")
  with pytest.raises(ValueError, match="unknown divergence"):
    dv.divergence_terms("hellinger", zs, zt)
