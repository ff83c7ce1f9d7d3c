"""Tests of the VQ-Logits head functions: code logits, scatter, code log-mass, exact loss."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab

N, D, K, V = 24, 8, 7, 60


def make(seed=0, bias=True, dtype=jnp.float32, empty_codes=(5, 6), skew=True):
  """Random head; codes in ``empty_codes`` hold no token, code 0 holds about half the vocabulary."""
  rng = np.random.default_rng(seed)
  used = [c for c in range(K) if c not in empty_codes]
  p = np.array([8.0 if (skew and c == 0) else 1.0 for c in used])
  assignment = rng.choice(used, size=V, p=p / p.sum())
  return dict(
      hidden=jnp.asarray(rng.normal(size=(N, D)), dtype),
      codebook=jnp.asarray(rng.normal(size=(K, D)) * 0.7, dtype),
      assignment=jnp.asarray(assignment, jnp.int32),
      labels=jnp.asarray(rng.integers(0, V, N), jnp.int32),
      token_bias=jnp.asarray(rng.normal(size=V), dtype) if bias else None,
      cot=jnp.asarray(rng.uniform(0.5, 1.5, N), jnp.float32))


def dense_logits_np(h):
  """float64 vocabulary logits of the head, written from the definition."""
  z = np.asarray(h["hidden"], np.float64) @ np.asarray(h["codebook"], np.float64).T
  logits = z[:, np.asarray(h["assignment"])]
  return logits if h["token_bias"] is None else logits + np.asarray(h["token_bias"], np.float64)


def ref_loss_np(h, *, label_smoothing=0.0, smoothing="uniform", z_loss=0.0, valid=None):
  logits = dense_logits_np(h)
  top = logits.max(1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
  log_p = logits - lse[:, None]
  onehot = np.eye(V)[np.asarray(h["labels"])]
  eps = label_smoothing
  if smoothing == "uniform":
    q, neg_entropy = (1 - eps) * onehot + eps / V, 0.0
  else:
    q = np.where(onehot > 0, 1 - eps, eps / (V - 1))
    neg_entropy = np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), 1)
  loss = -(q * log_p).sum(1) + neg_entropy + z_loss * lse**2
  return loss if valid is None else np.where(valid, loss, 0.0)


def vq_loss(h, **options):
  return logitlab.vq_cross_entropy(h["hidden"], h["codebook"], h["assignment"], h["labels"],
                                   token_bias=h["token_bias"], **options)


OPTIONS = [dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.1, smoothing="t5x"),
           dict(z_loss=1e-2), dict(label_smoothing=0.2, smoothing="t5x", z_loss=1e-3)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("options", OPTIONS)
def test_values_match_float64_dense_reference(options, bias):
  h = make(bias=bias)
  np.testing.assert_allclose(vq_loss(h, **options), ref_loss_np(h, **options), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("options", OPTIONS[::2])
def test_gradients_match_the_materialized_dense_head(options, bias):
  h = make(bias=bias)
  names = ["hidden", "codebook"] + (["token_bias"] if bias else [])

  def total(fn, *params):
    p = dict(h, **dict(zip(names, params)))
    return jnp.sum(fn(p) * h["cot"])

  def dense(p):
    logits = logitlab.vq_scatter(logitlab.vq_code_logits(p["hidden"], p["codebook"]),
                                 p["assignment"], p["token_bias"])
    return logitlab.cross_entropy(logits, p["labels"], **options)

  params = [h[n] for n in names]
  got = jax.grad(lambda *p: total(lambda q: vq_loss(q, **options), *p), argnums=tuple(range(len(names))))(*params)
  want = jax.grad(lambda *p: total(dense, *p), argnums=tuple(range(len(names))))(*params)
  for g, w in zip(got, want):
    assert not np.isnan(np.asarray(g)).any()
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_code_log_mass_against_numpy():
  h = make()
  b = np.asarray(h["token_bias"], np.float64)
  m = np.asarray(h["assignment"])
  for temperature in (1.0, 0.5):
    got = logitlab.code_log_mass(h["assignment"], K, h["token_bias"], temperature=temperature)
    for k in range(K):
      members = b[m == k] / temperature
      want = -np.inf if members.size == 0 else np.log(np.exp(members).sum())
      np.testing.assert_allclose(got[k], want, rtol=1e-6)
  counts = np.bincount(m, minlength=K)
  np.testing.assert_allclose(logitlab.code_log_mass(h["assignment"], K),
                             np.where(counts > 0, np.log(np.maximum(counts, 1)), -np.inf))


def test_empty_codes_get_no_gradient_and_no_nan():
  h = make()
  grads = jax.grad(lambda c, b: vq_loss(dict(h, codebook=c, token_bias=b)).sum(), argnums=(0, 1))(
      h["codebook"], h["token_bias"])
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_array_equal(grads[0][5:], 0.0)    # codes 5 and 6 hold no token


def test_scatter_and_code_logits():
  h = make()
  z = logitlab.vq_code_logits(h["hidden"], h["codebook"])
  assert z.shape == (N, K) and z.dtype == jnp.float32
  np.testing.assert_allclose(logitlab.vq_scatter(z, h["assignment"], h["token_bias"]),
                             dense_logits_np(h), rtol=1e-5, atol=1e-5)


def test_masks_give_zero_loss_zero_gradient_and_no_nan():
  h = make()
  where = jnp.arange(N) % 3 != 0
  hidden = h["hidden"].at[::3].set(jnp.inf)              # masked rows hold inf
  labels = jnp.where(jnp.arange(N) % 4 == 1, -100, h["labels"])
  valid = np.asarray(where) & (np.asarray(labels) != -100)

  def total(x):
    return jnp.sum(logitlab.vq_cross_entropy(x, h["codebook"], h["assignment"], labels,
                                             token_bias=h["token_bias"], where=where,
                                             ignore_index=-100))

  loss = logitlab.vq_cross_entropy(hidden, h["codebook"], h["assignment"], labels,
                                   token_bias=h["token_bias"], where=where, ignore_index=-100)
  grad = jax.grad(total)(hidden)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(loss)[~valid], 0.0)
  np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
  np.testing.assert_allclose(np.asarray(loss)[valid],
                             ref_loss_np(dict(h, labels=jnp.where(labels < 0, 0, labels)))[valid],
                             rtol=2e-5)


def test_bf16_inputs_give_float32_losses_within_the_bf16_rule():
  h16 = make(dtype=jnp.bfloat16)
  got = vq_loss(h16)
  assert got.dtype == jnp.float32
  h32 = {k: (x.astype(jnp.float32) if hasattr(x, "dtype") and x.dtype == jnp.bfloat16 else x)
         for k, x in h16.items()}
  ref = ref_loss_np(h32)
  naive = logitlab.cross_entropy(
      logitlab.vq_scatter(jnp.einsum("nd,kd->nk", h16["hidden"], h16["codebook"]),
                          h16["assignment"], h16["token_bias"]).astype(jnp.bfloat16), h16["labels"])
  assert np.all(np.abs(ref - got) <= np.abs(ref - np.asarray(naive, np.float64)) + 1e-4)


def test_jit_vmap_and_no_vocabulary_sized_tensor():
  h = make()
  batched = {k: (jnp.stack([x, x * 0.5]) if k in ("hidden",) else x) for k, x in h.items()}
  fn = lambda x: logitlab.vq_cross_entropy(x, h["codebook"], h["assignment"], h["labels"],
                                           token_bias=h["token_bias"], label_smoothing=0.1)
  out = jax.jit(jax.vmap(fn))(batched["hidden"])
  np.testing.assert_allclose(out[0], vq_loss(h, label_smoothing=0.1), rtol=1e-6)
  module = jax.jit(jax.grad(lambda x: fn(x).sum())).lower(h["hidden"]).as_text()
  assert not re.search(rf"tensor<{N}x{V}x", module)


@pytest.mark.parametrize("call, error, match", [
    (lambda h: logitlab.vq_cross_entropy(h["hidden"], h["codebook"][:, :3], h["assignment"],
                                         h["labels"]), ValueError, "codebook"),
    (lambda h: logitlab.vq_cross_entropy(h["hidden"], h["codebook"], h["assignment"][None],
                                         h["labels"]), ValueError, "assignment"),
    (lambda h: logitlab.vq_cross_entropy(h["hidden"], h["codebook"], h["assignment"] * 1.0,
                                         h["labels"]), TypeError, "assignment"),
    (lambda h: logitlab.vq_cross_entropy(h["hidden"], h["codebook"], h["assignment"],
                                         h["labels"][:3]), ValueError, "labels"),
    (lambda h: logitlab.vq_cross_entropy(h["hidden"], h["codebook"], h["assignment"], h["labels"],
                                         token_bias=jnp.ones(V + 1)), ValueError, "token_bias"),
    (lambda h: logitlab.vq_scatter(h["hidden"], h["assignment"], jnp.ones(3)), ValueError,
     "token_bias"),
    (lambda h: logitlab.vq_cross_entropy(h["hidden"], h["codebook"], h["assignment"], h["labels"],
                                         z_loss=-1.0), ValueError, "z_loss"),
], ids=["d_mismatch", "assignment_rank", "assignment_dtype", "labels_shape", "bias_shape",
        "scatter_bias", "negative_z_loss"])
def test_bad_inputs_raise(call, error, match):
  with pytest.raises(error, match=match):
    call(make())


def test_debug_mode_catches_assignment_out_of_range():
  h = make()
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"outside \[0, 7\)"):
      jax.block_until_ready(jax.jit(lambda m: logitlab.vq_cross_entropy(
          h["hidden"], h["codebook"], m, h["labels"]))(h["assignment"].at[3].set(K)))
