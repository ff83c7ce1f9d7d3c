"""Tests of ``logitlab.vq_ops``: VQ segment sums, dense-teacher distillation, fused code-logit ops.

References: the naive dense forms (``vq_scatter`` to ``[N, V]``, then softmax /
segment sums / ``logitlab.kl_divergence``) and numpy float64. Streaming tile sizes
are chosen so that ``N`` and ``V`` are ragged against them (clamped last tiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab
from logitlab import vq_ops

N, D, DT, V, K = 13, 6, 5, 37, 9
BLOCKS = dict(block_tokens=5, block_vocab=8)     # 13 = 5+5+3, 37 = 4*8+5: both ragged


def make_assignment(rng, v=V, k=K, empty=(3, 7)):
  """Random codes in [0, k) with the codes in ``empty`` holding no token."""
  allowed = np.array([c for c in range(k) if c not in empty])
  m = rng.choice(allowed, size=v)
  m[: len(allowed)] = allowed                    # every allowed code used at least once
  return jnp.asarray(rng.permutation(m), jnp.int32)


def make_case(seed=0, n=N, batch=(), dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  f = lambda *s, sd=1.0: jnp.asarray(rng.normal(size=s) * sd, jnp.float32).astype(dtype)
  return dict(
      student_hidden=f(*batch, n, D, sd=scale),
      codebook=f(K, D, sd=1 / np.sqrt(D)),
      assignment=make_assignment(rng),
      teacher_hidden=f(*batch, n, DT, sd=scale),
      teacher_weight=f(V, DT, sd=1.5 / np.sqrt(DT)),
      token_bias=f(V, sd=0.5),
      teacher_bias=f(V, sd=0.5),
      cot=jnp.asarray(rng.uniform(0.2, 2.0, size=(*batch, n)), jnp.float32))


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def f64(x):
  return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def np_teacher(c, temperature=1.0, teacher_bias=True):
  t = f64(c["teacher_hidden"]) @ f64(c["teacher_weight"]).T
  if teacher_bias:
    t = t + f64(c["teacher_bias"])
  return np_log_softmax(t / temperature)


def np_distill(c, *, temperature=1.0, token_bias=True, teacher_bias=True, kl=True, t2=True):
  """float64 KL(p_t || p_s) (or the cross-entropy) over the full vocabulary."""
  log_pt = np_teacher(c, temperature, teacher_bias)
  s = (f64(c["student_hidden"]) @ f64(c["codebook"]).T)[..., np.asarray(c["assignment"])]
  if token_bias:
    s = s + f64(c["token_bias"])
  log_ps = np_log_softmax(s / temperature)
  pt = np.exp(log_pt)
  loss = np.sum(pt * ((log_pt if kl else 0.0) - log_ps), axis=-1)
  return loss * (temperature ** 2 if t2 else 1.0)


def dense_distill(student_hidden, codebook, token_bias, c, *, temperature=1.0, where=None):
  """The naive JAX form: vq_scatter to [N, V], then logitlab.kl_divergence."""
  z = logitlab.vq_scatter(logitlab.vq_code_logits(student_hidden, codebook), c["assignment"],
                          token_bias)
  log_ps = jax.nn.log_softmax(z / temperature)
  t = c["teacher_hidden"] @ c["teacher_weight"].T + c["teacher_bias"]
  p_t = jax.nn.softmax(t.astype(jnp.float32) / temperature)
  return logitlab.kl_divergence(log_ps, p_t, where=where) * temperature ** 2


def distill(c, **kw):
  kw = {**BLOCKS, "token_bias": c["token_bias"], "teacher_bias": c["teacher_bias"], **kw}
  return vq_ops.vq_distillation_loss(c["student_hidden"], c["codebook"], c["assignment"],
                                     c["teacher_hidden"], c["teacher_weight"], **kw)


# --------------------------------------------------------------------------- vq_segment_sum

def test_segment_sum_matches_numpy_with_empty_codes_and_batch():
  rng = np.random.default_rng(1)
  m = make_assignment(rng)
  probs = rng.uniform(size=(2, 3, V))
  out = vq_ops.vq_segment_sum(jnp.asarray(probs, jnp.float32), m, K)
  expected = np.stack([probs[..., np.asarray(m) == k].sum(-1) for k in range(K)], -1)
  assert out.dtype == jnp.float32 and out.shape == (2, 3, K)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(out)[..., [3, 7]] == 0)


def test_segment_sum_bf16_accumulates_in_float32_and_grad_gathers():
  rng = np.random.default_rng(2)
  m = make_assignment(rng)
  probs = jnp.asarray(rng.uniform(size=(4, V)), jnp.bfloat16)
  out = vq_ops.vq_segment_sum(probs, m, K)
  assert out.dtype == jnp.float32
  expected = np.stack([f64(probs)[:, np.asarray(m) == k].sum(-1) for k in range(K)], -1)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  g = jnp.asarray(rng.normal(size=(4, K)), jnp.float32)
  grad = jax.grad(lambda p: jnp.sum(g * vq_ops.vq_segment_sum(p, m, K)))(
      probs.astype(jnp.float32))
  np.testing.assert_allclose(grad, np.asarray(g)[:, np.asarray(m)], rtol=1e-6)


def test_segment_sum_rejects_bad_shapes():
  with pytest.raises(ValueError, match="probs"):
    vq_ops.vq_segment_sum(jnp.ones((2, 5)), jnp.zeros((4,), jnp.int32), 3)
  with pytest.raises(TypeError, match="assignment"):
    vq_ops.vq_segment_sum(jnp.ones((2, 4)), jnp.zeros((4,)), 3)


# --------------------------------------------------------------------------- teacher code mass

@pytest.mark.parametrize("segment", vq_ops.SEGMENT_METHODS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_teacher_code_mass_matches_float64(segment, temperature):
  c = make_case(3, scale=3.0)                     # peaked teachers: tests the rescaling
  out = vq_ops.vq_teacher_code_mass(
      c["teacher_hidden"], c["teacher_weight"], c["assignment"], K,
      teacher_bias=c["teacher_bias"], token_bias=c["token_bias"], temperature=temperature,
      segment=segment, **BLOCKS)
  log_pt = np_teacher(c, temperature)
  pt = np.exp(log_pt)
  m = np.asarray(c["assignment"])
  t = f64(c["teacher_hidden"]) @ f64(c["teacher_weight"]).T + f64(c["teacher_bias"])
  np.testing.assert_allclose(out.code_mass, np.stack([pt[:, m == k].sum(-1) for k in range(K)],
                                                     -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.lse, np.log(np.exp(t / temperature).sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(out.neg_entropy, (pt * log_pt).sum(-1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.bias_mean, pt @ f64(c["token_bias"]), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out.code_mass)[:, [3, 7]] == 0)


@pytest.mark.parametrize("blocks", [dict(block_tokens=4, block_vocab=37),
                                    dict(block_tokens=100, block_vocab=1),
                                    dict(block_tokens=1, block_vocab=36)])
def test_teacher_code_mass_independent_of_tiles(blocks):
  c = make_case(4, batch=(2,))
  args = (c["teacher_hidden"], c["teacher_weight"], c["assignment"], K)
  ref = vq_ops.vq_teacher_code_mass(*args, block_tokens=64, block_vocab=64)
  out = vq_ops.vq_teacher_code_mass(*args, **blocks)
  assert out.code_mass.shape == (2, N, K) and out.bias_mean is None
  for a, b in zip(out[:3], ref[:3]):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_teacher_code_mass_bf16_inputs():
  c = make_case(5, dtype=jnp.bfloat16)
  out = vq_ops.vq_teacher_code_mass(c["teacher_hidden"], c["teacher_weight"], c["assignment"],
                                    K, teacher_bias=c["teacher_bias"], **BLOCKS)
  assert all(x.dtype == jnp.float32 for x in out[:3])
  pt = np.exp(np_teacher(c))
  m = np.asarray(c["assignment"])
  np.testing.assert_allclose(out.code_mass, np.stack([pt[:, m == k].sum(-1) for k in range(K)],
                                                     -1), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- distillation loss

@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kl", [True, False])
@pytest.mark.parametrize("biases", [True, False])
def test_distillation_values_match_float64(temperature, kl, biases):
  c = make_case(6, scale=2.0)
  kw = {} if biases else dict(token_bias=None, teacher_bias=None)
  out = distill(c, temperature=temperature, kl=kl, **kw)
  expected = np_distill(c, temperature=temperature, kl=kl, token_bias=biases,
                        teacher_bias=biases)
  assert out.dtype == jnp.float32 and out.shape == (N,)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_distillation_t2_scaling_option():
  c = make_case(7)
  a = distill(c, temperature=3.0)
  b = distill(c, temperature=3.0, t2_scaling=False)
  np.testing.assert_allclose(a, 9.0 * b, rtol=1e-6)
  np.testing.assert_allclose(b, np_distill(c, temperature=3.0, t2=False), rtol=1e-5, atol=1e-6)


def test_distillation_is_zero_when_student_equals_teacher():
  # Teacher logits constant within each code + bias: a VQ student can match exactly.
  c = make_case(8)
  m = c["assignment"]
  teacher_w = c["codebook"][m]                     # [V, D]: teacher logit_v = z_{m(v)}
  loss = vq_ops.vq_distillation_loss(c["student_hidden"], c["codebook"], m, c["student_hidden"],
                                     teacher_w, token_bias=c["token_bias"],
                                     teacher_bias=c["token_bias"], temperature=1.7, **BLOCKS)
  np.testing.assert_allclose(loss, 0.0, atol=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_grads_match_dense(temperature):
  c = make_case(9, scale=1.5)
  where = jnp.asarray(np.arange(N) % 4 != 1)

  def fused(sh, cb, tb):
    return jnp.sum(c["cot"] * distill({**c, "student_hidden": sh, "codebook": cb,
                                       "token_bias": tb}, temperature=temperature, where=where))

  def dense(sh, cb, tb):
    return jnp.sum(c["cot"] * dense_distill(sh, cb, tb, c, temperature=temperature,
                                            where=where))

  args = (c["student_hidden"], c["codebook"], c["token_bias"])
  value, grads = jax.value_and_grad(fused, argnums=(0, 1, 2))(*args)
  ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(*args)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grads[0])[~np.asarray(where)] == 0)


def test_distillation_teacher_gets_no_gradient():
  c = make_case(10)
  grads = jax.grad(lambda th, tw, tb: jnp.sum(distill({**c, "teacher_hidden": th,
                                                       "teacher_weight": tw,
                                                       "teacher_bias": tb})),
                   argnums=(0, 1, 2))(c["teacher_hidden"], c["teacher_weight"], c["teacher_bias"])
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_distillation_mask_gives_zero_loss_and_grad_even_with_nan_rows():
  c = make_case(11)
  where = jnp.asarray(np.arange(N) % 3 == 0)
  bad = ~np.asarray(where)
  sh = jnp.where(bad[:, None], jnp.nan, c["student_hidden"])
  th = jnp.where(bad[:, None], jnp.inf, c["teacher_hidden"])
  c = {**c, "teacher_hidden": th}
  loss, grads = jax.value_and_grad(
      lambda sh, cb, tb: jnp.sum(distill({**c, "student_hidden": sh, "codebook": cb,
                                          "token_bias": tb}, where=where)),
      argnums=(0, 1, 2))(sh, c["codebook"], c["token_bias"])
  per_token = distill({**c, "student_hidden": sh}, where=where)
  assert np.all(np.asarray(per_token)[bad] == 0)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[bad] == 0)
  clean = make_case(11)
  np.testing.assert_allclose(np.asarray(per_token)[~bad], np_distill(clean)[~bad], rtol=1e-5,
                             atol=1e-6)


def test_distillation_fully_masked_is_zero():
  c = make_case(12)
  loss, g = jax.value_and_grad(lambda sh: jnp.sum(distill({**c, "student_hidden": sh},
                                                          where=jnp.zeros((N,), bool))))(
      c["student_hidden"])
  assert loss == 0 and np.all(np.asarray(g) == 0)


def test_distillation_bf16_inputs_within_naive_bf16_error():
  c16 = make_case(13, dtype=jnp.bfloat16, scale=2.0)
  c32 = {k: (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for k, x in c16.items()}
  out = distill(c16)
  assert out.dtype == jnp.float32
  ref = np_distill(c32)
  naive = np.asarray(dense_distill(c16["student_hidden"], c16["codebook"], c16["token_bias"],
                                   c16), np.float64)
  assert np.all(np.abs(ref - np.asarray(out)) <= np.abs(ref - naive) + 1e-3)


def test_distillation_jit_and_vmap_over_batch():
  c = make_case(14, batch=(3,))
  keys = ("student_hidden", "teacher_hidden")
  batched = jax.jit(lambda c: distill(c))(c)
  mapped = jax.vmap(lambda sh, th: distill({**c, "student_hidden": sh, "teacher_hidden": th}),
                    )(*(c[k] for k in keys))
  assert batched.shape == (3, N)
  np.testing.assert_allclose(batched, np_distill(c), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mapped, batched, rtol=1e-5, atol=1e-6)
  g_map = jax.vmap(jax.grad(lambda tb, sh, th: jnp.sum(distill(
      {**c, "token_bias": tb, "student_hidden": sh, "teacher_hidden": th}))),
      in_axes=(None, 0, 0))(c["token_bias"], c["student_hidden"], c["teacher_hidden"])
  g_ref = jax.vmap(jax.grad(lambda tb, sh, th: jnp.sum(dense_distill(sh, c["codebook"], tb, {
      **c, "teacher_hidden": th}))), in_axes=(None, 0, 0))(
          c["token_bias"], c["student_hidden"], c["teacher_hidden"])
  np.testing.assert_allclose(g_map, g_ref, rtol=1e-4, atol=1e-6)


def test_distillation_rejects_bad_arguments():
  c = make_case(15)
  with pytest.raises(ValueError, match="teacher_weight"):
    distill({**c, "teacher_weight": c["teacher_weight"][:-1]})
  with pytest.raises(ValueError, match="batch shape"):
    distill({**c, "teacher_hidden": c["teacher_hidden"][:-1]})
  with pytest.raises(ValueError, match="temperature"):
    distill(c, temperature=0.0)
  with pytest.raises(ValueError, match="impl"):
    distill(c, impl="cuda")


def test_distillation_memory_is_streamed():
  """Compile-only: value_and_grad temp bytes at N=2048, D=256, V=32768, K=256 (float32)."""
  n, d, v, k = 2048, 256, 32768, 256
  s = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
  args = (s(n, d), s(k, d), s(v, dt=jnp.int32), s(n, d), s(v, d), s(v))
  argnums = (0, 1, 5)

  def fused(sh, cb, m, th, tw, tb):
    return jnp.sum(vq_ops.vq_distillation_loss(sh, cb, m, th, tw, token_bias=tb))

  def naive(sh, cb, m, th, tw, tb):
    log_ps = jax.nn.log_softmax(logitlab.vq_scatter(sh @ cb.T, m, tb))
    return jnp.sum(logitlab.kl_divergence(log_ps, jax.nn.softmax(th @ tw.T)))

  def temp_bytes(f):
    compiled = jax.jit(jax.value_and_grad(f, argnums=argnums)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense_bytes = n * v * 4
  fused_temp, naive_temp = temp_bytes(fused), temp_bytes(naive)
  assert fused_temp < dense_bytes / 8, fused_temp
  assert naive_temp > dense_bytes, naive_temp


# --------------------------------------------------------------------------- code-logit ops

def code_case(seed, batch=(2, 3), bias=True):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=(*batch, K)) * 2, jnp.float32)
  m = make_assignment(rng)
  b = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if bias else None
  return z, m, b


@pytest.mark.parametrize("bias", [True, False])
def test_vq_lse_and_log_probs_match_dense(bias):
  z, m, b = code_case(20, bias=bias)
  dense = logitlab.vq_scatter(z, m, b)
  np.testing.assert_allclose(vq_ops.vq_lse(z, m, b), jax.nn.logsumexp(dense, -1), rtol=1e-6)
  lp = vq_ops.vq_log_probs(z, m, b)
  assert lp.shape == (2, 3, V) and lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, jax.nn.log_softmax(dense), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda z, b: jnp.sum(jnp.sin(vq_ops.vq_lse(z, m, b))), argnums=(0, 1))(
      z, jnp.zeros((V,)) if b is None else b)
  g_ref = jax.grad(lambda z, b: jnp.sum(jnp.sin(jax.nn.logsumexp(logitlab.vq_scatter(z, m, b),
                                                                  -1))), argnums=(0, 1))(
      z, jnp.zeros((V,)) if b is None else b)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_vq_lse_bf16_gives_float32():
  z, m, b = code_case(21)
  out = vq_ops.vq_lse(z.astype(jnp.bfloat16), m, b)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, jax.nn.logsumexp(logitlab.vq_scatter(
      z.astype(jnp.bfloat16).astype(jnp.float32), m, b), -1), rtol=1e-5)


@pytest.mark.parametrize("k,block_vocab", [(1, 8), (5, 8), (12, 8), (37, 8), (3, 36)])
@pytest.mark.parametrize("bias", [True, False])
def test_vq_top_k_matches_dense_lax_top_k(k, block_vocab, bias):
  z, m, b = code_case(22, bias=bias)   # without a bias, every code's tokens tie
  vals, ids = vq_ops.vq_top_k(z, m, b, k, block_vocab=block_vocab)
  ref_vals, ref_ids = jax.lax.top_k(logitlab.vq_scatter(z, m, b), k)
  assert vals.shape == ids.shape == (2, 3, k)
  np.testing.assert_array_equal(vals, ref_vals)
  np.testing.assert_array_equal(ids, ref_ids)


def test_vq_top_k_jit_vmap_and_grad():
  z, m, b = code_case(23, batch=(4,))
  f = jax.jit(lambda z: vq_ops.vq_top_k(z, m, b, 4, block_vocab=8))
  vals, ids = jax.vmap(f)(z[:, None])
  ref_vals, ref_ids = jax.lax.top_k(logitlab.vq_scatter(z, m, b), 4)
  np.testing.assert_array_equal(vals[:, 0], ref_vals)
  np.testing.assert_array_equal(ids[:, 0], ref_ids)
  g = jax.grad(lambda z: jnp.sum(vq_ops.vq_top_k(z, m, b, 4, block_vocab=8)[0]))(z)
  g_ref = jax.grad(lambda z: jnp.sum(jax.lax.top_k(logitlab.vq_scatter(z, m, b), 4)[0]))(z)
  np.testing.assert_allclose(g, g_ref)
  with pytest.raises(ValueError, match="exceeds"):
    vq_ops.vq_top_k(z, m, b, V + 1)


# --------------------------------------------------------------------------- kernel dispatch


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_impls_match_xla_values_and_gradients(impl):
  """vq_scatter / vq_log_probs / vq_segment_sum / vq_top_k through the interpreted kernels:
  batch axes flattened, the custom VJPs (each kernel's transpose is the other) exact."""
  z, m, b = code_case(24, batch=(2, 3))
  rng = np.random.default_rng(25)
  cot = jnp.asarray(rng.normal(size=(2, 3, V)), jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, V)), jnp.float32))
  kw = dict(impl=impl, interpret=True)

  def check(fn, args, argnums):
    out, ref = fn(*args, **kw), fn(*args)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    loss = lambda *a, **k: jnp.sum(fn(*a, **k) * (cot if out.shape == cot.shape else 1.0))
    grads = jax.grad(functools.partial(loss, **kw), argnums)(*args)
    for g, r in zip(grads, jax.grad(loss, argnums)(*args)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)

  check(logitlab.vq_scatter, (z, m, b), (0, 2))
  check(vq_ops.vq_log_probs, (z, m, b), (0, 2))
  check(lambda p, m, **k: vq_ops.vq_segment_sum(p, m, K, **k) * jnp.arange(K), (probs, m), (0,))
  vals, ids = vq_ops.vq_top_k(z, m, b, 5, **kw)
  ref_vals, ref_ids = vq_ops.vq_top_k(z, m, b, 5)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)
  top_sum = lambda z, b, **k: jnp.sum(vq_ops.vq_top_k(z, m, b, 5, **k)[0] ** 2)
  for g, r in zip(jax.grad(functools.partial(top_sum, **kw), (0, 1))(z, b),
                  jax.grad(top_sum, (0, 1))(z, b)):
    np.testing.assert_allclose(g, r, rtol=1e-6)


def test_kernel_impls_reject_interpret_without_a_kernel_and_unknown_impls():
  z, m, b = code_case(26)
  with pytest.raises(ValueError, match="interpret"):
    logitlab.vq_scatter(z, m, b, interpret=True)
  for fn in (logitlab.vq_scatter, vq_ops.vq_log_probs):
    with pytest.raises(ValueError, match="impl"):
      fn(z, m, b, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    vq_ops.vq_segment_sum(jnp.ones((2, V)), m, K, impl="cuda")
  with pytest.raises(ValueError, match="impl"):
    vq_ops.vq_top_k(z, m, b, 2, impl="triton")
