"""Tests of ``logitlab.distill.llm`` (AlignDistil, GLD) against float64 numpy from the formulas.

The AlignDistil references follow the official trainer's arithmetic
(songmzhang/AlignDistil ``aligndistil_offpolicy_trainer.py``) mode by mode; the GLD
reference builds the dense co-activation graphs on the union of the teacher's
top-k channels and evaluates the Gromov-Wasserstein sum over all node pairs at
the sorted coupling directly (``O(m^2)``), not the closed form the library uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from logitlab.distill.divergences import reduce_tokens
from logitlab.distill.llm import (ALIGNDISTIL_MODES, aligndistil_loss, aligndistil_teacher,
                                  gld)
from numeric import fd_grad

B, S, V = 2, 4, 7

# Jitted once per shape and option set: eager op-by-op dispatch would dominate the run time.
# (The eager functions are exercised by the doctests, the jit and the error tests.)
GLD = jax.jit(gld, static_argnames=("top_k", "activation", "temperature"))
TEACHER = jax.jit(aligndistil_teacher, static_argnames=("mode", "beta", "beta2", "eps"))
LOSS = jax.jit(aligndistil_loss, static_argnames=("beta", "temperature"))


def logits(seed, shape=(B, S, V), scale=2.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------
# AlignDistil references.
# ----------------------------------------------------------------------------


def np_teacher(zd, zr, mode, beta=0.1, beta2=10.0, eps=1e-3):
  zd, zr = np.asarray(zd, np.float64), np.asarray(zr, np.float64)
  if mode in ("aligndistil", "theorem1_adaptive"):
    alpha = beta2 * np.abs(np_softmax(zd) - np_softmax(zr)).sum(-1) + eps
  else:
    alpha = np.full(zd.shape[:-1], beta / beta2)
  a = alpha[..., None]
  if mode in ("aligndistil", "theorem1_contrast"):
    return zd + a * (zd - zr), alpha
  return a * zd + (1 - a) * zr, alpha


def np_reverse_kl(zs, zt, temperature=1.0):
  ls = np_log_softmax(np.asarray(zs, np.float64) / temperature)
  lt = np_log_softmax(np.asarray(zt, np.float64) / temperature)
  return (np.exp(ls) * (ls - lt)).sum(-1)


def np_official(zs, zd, zr, mode, beta=0.1, beta2=10.0, temperature=1.0):
  """The official per-token ``rlhf_loss`` before masking, branch by branch."""
  zd, zr = np.asarray(zd, np.float64), np.asarray(zr, np.float64)
  tvd = np.abs(np_softmax(zd) - np_softmax(zr)).sum(-1)
  if mode == "theorem1":
    w = beta / beta2
    final, scale = w * zd + (1 - w) * zr, beta2
  elif mode == "theorem1_contrast":
    w = beta / beta2
    final, scale = w * (zd - zr) + zd, beta2
  elif mode == "theorem1_adaptive":
    w = tvd * beta2 + 1e-3
    final, scale = w[..., None] * zd + (1 - w[..., None]) * zr, beta / w
  else:
    w = tvd * beta2 + 1e-3
    final, scale = w[..., None] * (zd - zr) + zd, beta / w
  return np_reverse_kl(zs, final, temperature) * scale


HYPER = [dict(), dict(beta=0.2, beta2=5.0), dict(beta=0.1, beta2=15.0)]


@pytest.mark.parametrize("mode", ALIGNDISTIL_MODES)
@pytest.mark.parametrize("hyper", HYPER, ids=["default", "b0.2_b2_5", "b2_15"])
def test_teacher_matches_float64(mode, hyper):
  zd, zr = logits(0), logits(1)
  teacher, alpha = TEACHER(zd, zr, mode=mode, **hyper)
  ref_teacher, ref_alpha = np_teacher(zd, zr, mode, **hyper)
  assert teacher.shape == (B, S, V) and alpha.shape == (B, S)
  assert teacher.dtype == alpha.dtype == jnp.float32
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(teacher, ref_teacher, rtol=1e-5, atol=1e-4)


def test_alpha_floor_and_fixed_weights():
  zd, zr = logits(2), logits(3)
  for mode in ("aligndistil", "theorem1_adaptive"):
    _, alpha = TEACHER(zd, zr, mode=mode)
    assert np.all(np.asarray(alpha) >= 1e-3)
    # Identical models: TVD = 0, the weight is the floor and the teacher is the DPO model.
    teacher, alpha = TEACHER(zd, zd, mode=mode, eps=1e-3)
    # atol: once fused, the two (equal) softmaxes may round apart by an ulp.
    np.testing.assert_allclose(alpha, 1e-3, rtol=0, atol=1e-6)
    np.testing.assert_allclose(teacher, zd, rtol=1e-6, atol=1e-6)
  # TVD is the L1 distance (up to 2, not 1): disjoint supports give beta2 * 2 + eps.
  peaked = jnp.array([[60.0, 0.0, 0.0], [0.0, 0.0, 60.0]])
  _, alpha = TEACHER(peaked[0], peaked[1], beta2=10.0)
  np.testing.assert_allclose(alpha, 20.001, rtol=1e-6)
  for mode in ("theorem1", "theorem1_contrast"):
    _, alpha = TEACHER(zd, zr, mode=mode, beta=0.1, beta2=10.0)
    np.testing.assert_allclose(alpha, np.full((B, S), 0.01), rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_float64(temperature, beta):
  zs, zstar = logits(6), logits(7)
  alpha = jnp.asarray(np.random.default_rng(8).uniform(1e-3, 5.0, (B, S)), jnp.float32)
  out = LOSS(zs, zstar, alpha, beta=beta, temperature=temperature)
  ref = beta / np.asarray(alpha, np.float64) * np_reverse_kl(zs, zstar, temperature)
  assert out.shape == (B, S) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ALIGNDISTIL_MODES)
@pytest.mark.parametrize("hyper", [dict(), dict(beta=0.2, beta2=5.0, temperature=2.0)],
                         ids=["scripts", "other"])
def test_teacher_then_loss_is_the_official_rlhf_loss(mode, hyper):
  # At T = 2 this also checks that TVD (hence alpha_t) stays at temperature 1.
  zs, zd, zr = logits(9), logits(10), logits(11)
  beta, beta2 = hyper.get("beta", 0.1), hyper.get("beta2", 10.0)
  temperature = hyper.get("temperature", 1.0)
  teacher, alpha = TEACHER(zd, zr, mode=mode, beta=beta, beta2=beta2)
  out = LOSS(zs, teacher, alpha, beta=beta, temperature=temperature)
  ref = np_official(zs, zd, zr, mode, beta, beta2, temperature)
  np.testing.assert_allclose(out, ref, rtol=5e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ALIGNDISTIL_MODES)
def test_loss_is_zero_when_the_student_is_the_teacher(mode):
  teacher, alpha = TEACHER(logits(12), logits(13), mode=mode)
  np.testing.assert_allclose(LOSS(teacher, teacher, alpha), 0.0, atol=1e-5)


def test_loss_accepts_a_python_float_weight():
  zs, zstar = logits(14), logits(15)
  np.testing.assert_allclose(LOSS(zs, zstar, 0.01),
                             LOSS(zs, zstar, jnp.full((B, S), 0.01)), rtol=1e-6)


def test_student_gradient_matches_float64_finite_differences():
  zs, zstar = logits(16, (2, 5), 1.0), logits(17, (2, 5), 1.0)
  alpha = jnp.array([0.3, 2.0])
  weights = np.array([1.0, 0.5])
  f = lambda z: jnp.sum(LOSS(z, zstar, alpha, beta=0.1, temperature=1.5) * weights)
  grad = np.asarray(jax.grad(f)(zs), np.float64)
  ref = fd_grad(
      lambda z: 0.1 / np.asarray(alpha, np.float64) * np_reverse_kl(z, zstar, 1.5) * weights, zs)
  np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)
  check_grads(lambda z: LOSS(z, zstar, alpha, temperature=1.5), (zs,), order=1,
              modes=("rev",), atol=1e-2, rtol=1e-2)


def test_no_gradient_reaches_the_teacher_side():
  zs, zd, zr = logits(18), logits(19), logits(20)

  def total(zs, zd, zr):
    teacher, alpha = TEACHER(zd, zr)
    return jnp.sum(LOSS(zs, teacher, alpha))

  g_s, g_d, g_r = jax.grad(total, argnums=(0, 1, 2))(zs, zd, zr)
  assert np.any(np.asarray(g_s) != 0)
  np.testing.assert_array_equal(g_d, 0.0)
  np.testing.assert_array_equal(g_r, 0.0)
  teacher, alpha = TEACHER(zd, zr)
  g_t, g_a = jax.grad(lambda t, a: jnp.sum(LOSS(zs, t, a)), argnums=(0, 1))(
      teacher, alpha)
  np.testing.assert_array_equal(g_t, 0.0)
  np.testing.assert_array_equal(g_a, 0.0)


def test_mask_gives_zero_loss_and_gradient_even_with_nan():
  zs, zd, zr = (np.array(logits(s)) for s in (21, 22, 23))
  mask = np.ones((B, S), bool)
  mask[0, 2:] = False
  mask[1, 0] = False
  for z in (zs, zd, zr):
    z[~mask] = np.nan
  alpha_nan = np.array(TEACHER(zd, zr, where=mask)[1])
  alpha_nan[~mask] = np.nan                   # a weight nobody cleaned: still no NaN out

  def total(zs):
    teacher, alpha = TEACHER(zd, zr, where=mask)
    return LOSS(zs, teacher, alpha, where=mask)

  out = total(zs)
  grad = jax.grad(lambda z: jnp.sum(total(z)))(jnp.asarray(zs))
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(out)[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
  ref = np_official(zs, zd, zr, "aligndistil")
  np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], rtol=5e-5)
  teacher, _ = TEACHER(zd, zr, where=mask)
  assert np.all(np.isfinite(teacher))
  out2 = LOSS(zs, teacher, alpha_nan, where=mask)
  np.testing.assert_allclose(out2, out, rtol=1e-6)


def test_sequence_reductions_match_the_official_normalisation():
  zs, zd, zr = logits(24, (3, 5, V)), logits(25, (3, 5, V)), logits(26, (3, 5, V))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], bool)
  teacher, alpha = TEACHER(zd, zr, where=mask)
  per_token = LOSS(zs, teacher, alpha, where=mask)
  ref = np.where(mask, np_official(zs, zd, zr, "aligndistil"), 0.0)
  # Without --reward_len_norm: sum over each sequence, mean over the batch.
  np.testing.assert_allclose(reduce_tokens(per_token, mask, reduction="batch_mean"),
                             ref.sum(-1).mean(), rtol=2e-5)
  # With it and the scripts' micro-batch of 1: the mean over the sequence's tokens.
  for b in range(3):
    np.testing.assert_allclose(reduce_tokens(per_token[b:b + 1], mask[b:b + 1]),
                               ref[b].sum() / mask[b].sum(), rtol=2e-5)
  np.testing.assert_allclose(reduce_tokens(per_token, mask), ref.sum() / mask.sum(), rtol=2e-5)


def test_bf16_inputs_give_float32():
  zs, zd, zr = (logits(s).astype(jnp.bfloat16) for s in (27, 28, 29))
  teacher, alpha = TEACHER(zd, zr)
  out = LOSS(zs, teacher, alpha)
  assert teacher.dtype == alpha.dtype == out.dtype == jnp.float32
  up = lambda z: z.astype(jnp.float32)
  t32, a32 = TEACHER(up(zd), up(zr))
  np.testing.assert_allclose(out, LOSS(up(zs), t32, a32), rtol=1e-6)
  # Computed in float32 from the bf16 values: as the float64 reference on those values.
  ref = np_official(up(zs), up(zd), up(zr), "aligndistil")
  np.testing.assert_allclose(out, ref, rtol=5e-5, atol=1e-5)


def test_jit_matches_eager():
  zs, zd, zr = logits(30), logits(31), logits(32)
  mask = jnp.asarray(np.random.default_rng(33).random((B, S)) > 0.3)

  def f(zs, zd, zr, mask):
    teacher, alpha = aligndistil_teacher(zd, zr, mode="theorem1_adaptive", where=mask)
    return aligndistil_loss(zs, teacher, alpha, temperature=2.0, where=mask)

  np.testing.assert_allclose(jax.jit(f)(zs, zd, zr, mask), f(zs, zd, zr, mask), rtol=1e-6)


def test_aligndistil_rejects_bad_arguments():
  z = logits(34)
  with pytest.raises(ValueError, match="mode"):
    aligndistil_teacher(z, z, mode="contrast")
  with pytest.raises(ValueError, match="beta2"):
    aligndistil_teacher(z, z, beta2=0.0)
  with pytest.raises(ValueError, match="eps"):
    aligndistil_teacher(z, z, eps=0.0)
  with pytest.raises(ValueError, match="one shape"):
    aligndistil_teacher(z, z[..., :-1])
  with pytest.raises(TypeError, match="floating"):
    aligndistil_teacher(z.astype(jnp.int32), z)
  with pytest.raises(TypeError, match="boolean"):
    aligndistil_teacher(z, z, where=jnp.ones((B, S)))
  with pytest.raises(ValueError, match="beta"):
    aligndistil_loss(z, z, 1.0, beta=-0.1)
  with pytest.raises(ValueError, match="alpha_t"):
    aligndistil_loss(z, z, jnp.ones((B, S + 1)))
  with pytest.raises(TypeError, match="alpha_t"):
    aligndistil_loss(z, z, jnp.ones((B, S), jnp.int32))
  with pytest.raises(ValueError, match="temperature"):
    aligndistil_loss(z, z, 1.0, temperature=0.0)
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda b: aligndistil_loss(z, z, 1.0, beta=b))(0.1)


# ----------------------------------------------------------------------------
# GLD reference: dense graphs on the union of the teacher's top-k, O(m^2) GW sum.
# ----------------------------------------------------------------------------


def np_gld(zs, zt, top_k, activation="logits", temperature=1.0, mask=None):
  zs = np.asarray(zs, np.float64) / temperature
  zt = np.asarray(zt, np.float64) / temperature
  lead = zs.shape[:-2]
  zs = zs.reshape(-1, *zs.shape[-2:])
  zt = zt.reshape(-1, *zt.shape[-2:])
  mask = (np.ones(zs.shape[:2], bool) if mask is None
          else np.broadcast_to(np.asarray(mask), (*lead, zs.shape[1])).reshape(zs.shape[:2]))
  out = np.zeros(zs.shape[0])
  for b in range(zs.shape[0]):
    ts = np.flatnonzero(mask[b])
    if ts.size == 0:
      continue
    chosen = {t: np.argsort(-zt[b, t], kind="stable")[:top_k] for t in ts}
    nodes = sorted(set(np.concatenate(list(chosen.values())).tolist()))
    where_node = {c: i for i, c in enumerate(nodes)}
    degrees = []
    for z in (zs[b], zt[b]):
      f = np_softmax(z) if activation == "probs" else z
      x = np.zeros((ts.size, len(nodes)))
      for row, t in enumerate(ts):
        for c in chosen[t]:
          x[row, where_node[c]] = f[t, c]
      graph = x.T @ x / ts.size
      degrees.append(np.sort(graph.sum(1)))
    ds, dt = degrees
    cs, ct = np.subtract.outer(ds, ds) ** 2, np.subtract.outer(dt, dt) ** 2
    out[b] = ((cs - ct) ** 2).sum() / len(nodes) ** 2
  return out.reshape(lead)


@pytest.mark.parametrize("activation,top_k,temperature", [
    ("logits", 1, 1.0), ("logits", 3, 1.0), ("logits", V, 2.0), ("probs", 3, 2.0),
    ("probs", V, 1.0)])
def test_gld_matches_float64(activation, top_k, temperature):
  zs, zt = logits(40, scale=1.0), logits(41, scale=1.0)
  mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)
  out = GLD(zs, zt, top_k=top_k, activation=activation, temperature=temperature, where=mask)
  ref = np_gld(zs, zt, top_k, activation, temperature, mask)
  assert out.shape == (B,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=1e-7)


def test_gld_closed_form_keeps_precision_near_a_match():
  zt = logits(42, scale=3.0)
  zs = zt + logits(43, scale=1e-3)
  out = GLD(zs, zt, top_k=3)
  ref = np_gld(zs, zt, 3)
  assert np.all(ref > 0)
  np.testing.assert_allclose(out, ref, rtol=2e-2)


@pytest.mark.parametrize("activation", ["logits", "probs"])
def test_gld_zero_at_a_match_and_non_negative(activation):
  zt = logits(44)
  np.testing.assert_allclose(GLD(zt, zt, top_k=3, activation=activation), 0.0, atol=1e-6)
  for seed in range(5):
    out = GLD(logits(45 + seed, scale=3.0), zt, top_k=4, activation=activation)
    assert np.all(np.asarray(out) >= 0)


def test_gld_invariances():
  rng = np.random.default_rng(50)
  zs, zt = logits(51), logits(52)
  base = GLD(zs, zt, top_k=3)
  assert np.all(np.asarray(base) > 0)
  vocab = rng.permutation(V)                      # one relabelling of the channels
  np.testing.assert_allclose(GLD(zs[..., vocab], zt[..., vocab], top_k=3), base, rtol=1e-5)
  seq = rng.permutation(S)                        # A sums over positions
  np.testing.assert_allclose(GLD(zs[:, seq], zt[:, seq], top_k=3), base, rtol=1e-5)
  # With activation="logits", channels the teacher never ranks in its top-k (at any
  # position of the example) do not enter either graph: the student's values there are free.
  zs, zt = np.array(logits(53, (2, 3, 12))), logits(54, (2, 3, 12))
  ranked = np.argsort(-np.asarray(zt), axis=-1)[..., :2]
  moved = zs.copy()
  for b in range(2):
    free = np.setdiff1d(np.arange(12), ranked[b])
    assert free.size > 0
    moved[b][:, free] = 55.0
  np.testing.assert_allclose(GLD(moved, zt, top_k=2), GLD(zs, zt, top_k=2), rtol=1e-6)


@pytest.mark.parametrize("activation", ["logits", "probs"])
def test_gld_student_gradient_matches_float64_finite_differences(activation):
  zs, zt = logits(60, (2, 3, 6), 0.7), logits(61, (2, 3, 6), 0.7)
  weights = np.array([1.0, 0.5])
  f = lambda z: jnp.sum(GLD(z, zt, top_k=2, activation=activation) * weights)
  grad = np.asarray(jax.grad(f)(zs), np.float64)
  ref = fd_grad(lambda z: np_gld(z, zt, 2, activation) * weights, zs)
  assert np.abs(ref).max() > 0
  np.testing.assert_allclose(grad, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
  # The teacher gets none.
  np.testing.assert_array_equal(jax.grad(lambda t: jnp.sum(GLD(zs, t, top_k=2)))(zt), 0.0)


def test_gld_mask_drops_positions_even_with_nan():
  zs, zt = np.array(logits(70)), np.array(logits(71))
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool)  # second example fully masked
  zs[~mask] = np.nan
  zt[~mask] = np.nan
  out = GLD(zs, zt, top_k=3, where=mask)
  grad = jax.grad(lambda z: jnp.sum(GLD(z, zt, top_k=3, where=mask)))(jnp.asarray(zs))
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  kept = GLD(zs[:1, mask[0]], zt[:1, mask[0]], top_k=3)
  np.testing.assert_allclose(out[0], kept[0], rtol=1e-6)
  assert float(out[1]) == 0.0
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
  assert np.any(np.asarray(grad)[mask] != 0)


def test_gld_shapes_dtypes_and_jit():
  zs, zt = logits(80, (2, 3, S, V)), logits(81, (2, 3, S, V))
  mask = jnp.asarray(np.random.default_rng(82).random((2, 3, S)) > 0.3)
  out = gld(zs, zt, top_k=2, where=mask)                        # eager
  assert out.shape == (2, 3)
  flat = GLD(zs.reshape(6, S, V), zt.reshape(6, S, V), top_k=2, where=mask.reshape(6, S))
  np.testing.assert_allclose(out.reshape(6), flat, rtol=1e-6)
  assert GLD(zs[0, 0], zt[0, 0], top_k=2).shape == ()
  np.testing.assert_allclose(GLD(zs, zt, top_k=2, where=mask), out, rtol=1e-6)
  low = GLD(zs.astype(jnp.bfloat16), zt.astype(jnp.bfloat16), top_k=2, where=mask)
  assert low.dtype == jnp.float32
  up = GLD(zs.astype(jnp.bfloat16).astype(jnp.float32),
           zt.astype(jnp.bfloat16).astype(jnp.float32), top_k=2, where=mask)
  np.testing.assert_allclose(low, up, rtol=1e-6)


def test_gld_rejects_bad_arguments():
  z = logits(90)
  with pytest.raises(ValueError, match="top_k"):
    gld(z, z, top_k=V + 1)
  with pytest.raises(ValueError, match="top_k"):
    gld(z, z, top_k=0)
  with pytest.raises(TypeError, match="top_k"):
    gld(z, z, top_k=2.0)
  with pytest.raises(ValueError, match="activation"):
    gld(z, z, activation="softmax")
  with pytest.raises(ValueError, match=r"\[..., S, V\]"):
    gld(z[0, 0], z[0, 0])
  with pytest.raises(ValueError, match="one shape"):
    gld(z, z[:, :-1])
  with pytest.raises(ValueError, match="broadcast"):
    gld(z, z, top_k=2, where=jnp.ones((B, S + 1), bool))
  with pytest.raises(ValueError, match="temperature"):
    gld(z, z, top_k=2, temperature=-1.0)
