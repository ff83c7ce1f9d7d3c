"""Tests of ``linear_distillation``, the divergences fused with the student and teacher heads.

The reference is the materialized form: the public functions of
:mod:`logitlab.distill.divergences` on ``h @ W.T + b`` logits (the smaller
vocabulary padded with ``-inf`` logits) plus ``logitlab.cross_entropy`` for the
hard term, differentiated by autodiff. Gradients are those of ``sum(cot * loss)``
for a random positive cotangent, w.r.t. the student's hidden states, weight and bias.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab
from logitlab import distill
from logitlab.distill.linear import linear_distillation

REFERENCES = {"kl": distill.kl_divergence, "reverse_kl": distill.reverse_kl,
              "jsd": distill.generalized_jsd, "skew_kl": distill.skew_kl,
              "skew_reverse_kl": distill.skew_reverse_kl, "tv": distill.total_variation}
# (divergence, its options): every divergence, JSD at both ends and inside, skew KL both forms.
CASES = [("kl", {}), ("reverse_kl", {}), ("jsd", dict(beta=0.0)), ("jsd", dict(beta=0.5)),
         ("jsd", dict(beta=1.0)), ("skew_kl", dict(lam=0.1)), ("skew_kl", dict(lam=0.3, kl=True)),
         ("skew_reverse_kl", dict(lam=0.1)), ("tv", {})]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in CASES]

BLOCKS = dict(block_tokens=5, block_vocab=8)        # ragged against N = 14, V = 29 / 23
IGNORE = -100


class Inputs(NamedTuple):
  hs: jax.Array       # [*batch, D_s]
  ws: jax.Array       # [V_s, D_s]
  bs: jax.Array       # [V_s]
  ht: jax.Array       # [*batch, D_t]
  wt: jax.Array       # [V_t, D_t]
  bt: jax.Array       # [V_t]
  labels: jax.Array   # [*batch], some IGNORE
  where: jax.Array    # [*batch] bool
  cot: jax.Array      # [*batch] cotangent of the loss


def make_inputs(*, vs=29, vt=29, ds=6, dt=9, batch=(2, 7), seed=0, dtype=jnp.float32,
                scale=1.0) -> Inputs:
  rng = np.random.default_rng(seed)
  as_dtype = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
  labels = rng.integers(0, vs, size=batch)
  labels = np.where(rng.random(batch) < 0.25, IGNORE, labels)
  return Inputs(
      hs=as_dtype(rng.normal(size=batch + (ds,)) * scale),
      ws=as_dtype(rng.normal(size=(vs, ds)) * 1.5 / np.sqrt(ds)),
      bs=as_dtype(rng.normal(size=(vs,)) * 0.5),
      ht=as_dtype(rng.normal(size=batch + (dt,)) * scale),
      wt=as_dtype(rng.normal(size=(vt, dt)) * 1.5 / np.sqrt(dt)),
      bt=as_dtype(rng.normal(size=(vt,)) * 0.5),
      labels=jnp.asarray(labels, jnp.int32),
      where=jnp.asarray(rng.random(batch) < 0.75),
      cot=jnp.asarray(rng.uniform(0.2, 2.0, size=batch), jnp.float32))


def materialized(hs, ws, bs, ht, wt, bt, labels=None, *, divergence="kl", beta=0.5, lam=0.1,
                 kl=False, temperature=1.0, hard_weight=0.0, soft_weight=1.0,
                 student_bias=True, teacher_bias=True, where=None, ignore_index=None):
  """The loss from materialized logits, with the same arguments as the fused call."""
  zs = hs @ ws.T + (bs if student_bias else 0)
  zt = ht @ wt.T + (bt if teacher_bias else 0)
  vocab = max(zs.shape[-1], zt.shape[-1])
  pad = lambda z: jnp.pad(z.astype(jnp.float32), [(0, 0)] * (z.ndim - 1) + [
      (0, vocab - z.shape[-1])], constant_values=-jnp.inf)
  options = {"jsd": dict(beta=beta), "skew_kl": dict(lam=lam, kl=kl),
             "skew_reverse_kl": dict(lam=lam)}.get(divergence, {})
  loss = soft_weight * REFERENCES[divergence](pad(zs), pad(zt), temperature=temperature,
                                              where=where, **options)
  if hard_weight:
    loss += hard_weight * logitlab.cross_entropy(pad(zs), labels, where=where,
                                                 ignore_index=ignore_index)
  return loss


def fused(hs, ws, bs, ht, wt, bt, labels=None, *, student_bias=True, teacher_bias=True,
          **options):
  return linear_distillation(hs, ws, ht, wt, labels, student_bias=bs if student_bias else None,
                             teacher_bias=bt if teacher_bias else None, **options)


def loss_and_grads(loss_fn, x: Inputs, **options):
  """Jitted ``(loss, (d_hs, d_ws, d_bs))`` of ``sum(cot * loss)``."""
  def objective(hs, ws, bs):
    loss = loss_fn(hs, ws, bs, x.ht, x.wt, x.bt, x.labels, **options)
    return jnp.sum(x.cot * loss), loss

  step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
  (_, loss), grads = step(x.hs, x.ws, x.bs)
  return loss, grads


def assert_close(got, want, rtol, name):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-6)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def assert_matches(got, want, rtol=2e-5):
  (loss, grads), (ref_loss, ref_grads) = got, want
  assert loss.dtype == jnp.float32
  assert_close(loss, ref_loss, rtol, "loss")
  for name, g, r in zip(("d_student_hidden", "d_student_weight", "d_student_bias"), grads,
                        ref_grads):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert_close(g, r, 10 * rtol, name)


def with_nan_rows(x: Inputs) -> Inputs:
  """Masked positions' hidden states set to NaN (student and teacher)."""
  nan = lambda h: jnp.where(x.where[..., None], h, jnp.nan)
  return x._replace(hs=nan(x.hs), ht=nan(x.ht))


def with_zero_rows(x: Inputs) -> Inputs:
  zero = lambda h: jnp.where(x.where[..., None], h, 0.0)
  return x._replace(hs=zero(x.hs), ht=zero(x.ht))


# ------------------------------------------------------------- 1. against the materialized form

ALL_TERMS = dict(temperature=2.0, hard_weight=0.3, soft_weight=0.7, ignore_index=IGNORE)


@pytest.mark.parametrize("divergence, options", CASES, ids=CASE_IDS)
def test_matches_materialized_with_every_option(divergence, options):
  """Temperature, hard + soft terms, biases, ignore_index, `where` with NaN in masked rows."""
  x = make_inputs(seed=len(CASE_IDS[CASES.index((divergence, options))]))
  kwargs = dict(divergence=divergence, **options, **ALL_TERMS, where=x.where)
  got = loss_and_grads(fused, with_nan_rows(x), **kwargs, **BLOCKS)
  want = loss_and_grads(materialized, with_zero_rows(x), **kwargs)
  assert_matches(got, want)
  loss, (d_hs, _, _) = got
  assert np.all(np.asarray(loss)[~np.asarray(x.where)] == 0.0)
  assert np.all(np.asarray(d_hs)[~np.asarray(x.where)] == 0.0)
  assert float(np.max(np.abs(np.asarray(loss)))) > 1e-3    # not a vacuous match


@pytest.mark.parametrize("divergence", ["kl", "tv"])
def test_defaults_and_temperature_one_with_hard_term(divergence):
  """T = 1 shares the hard term's normalizer with the soft one; no bias, no mask, one tile."""
  x = make_inputs(seed=3)
  x = x._replace(labels=jnp.where(x.labels == IGNORE, 0, x.labels))
  kwargs = dict(divergence=divergence, hard_weight=0.5, student_bias=False, teacher_bias=False)
  got = loss_and_grads(fused, x, **kwargs)
  want = loss_and_grads(materialized, x, **kwargs)
  assert_matches(got, want)
  assert got[1][2] is None or not np.any(got[1][2])          # no student bias: no gradient


def test_hard_term_alone_is_the_fused_cross_entropy():
  x = make_inputs(seed=4)
  got = loss_and_grads(fused, x, soft_weight=0.0, hard_weight=1.0, ignore_index=IGNORE, **BLOCKS)
  want = loss_and_grads(lambda hs, ws, bs, *_: logitlab.linear_cross_entropy(
      hs, ws, x.labels, bias=bs, ignore_index=IGNORE), x)
  assert_matches(got, want)


def test_ignore_index_drops_only_the_hard_term():
  x = make_inputs(seed=5)
  both = fused(*x[:7], hard_weight=1.0, ignore_index=IGNORE, **BLOCKS)
  soft = fused(*x[:7], **BLOCKS)
  ignored = np.asarray(x.labels == IGNORE)
  assert ignored.any() and (~ignored).any()
  np.testing.assert_allclose(np.asarray(both)[ignored], np.asarray(soft)[ignored], rtol=1e-6)
  assert np.all(np.asarray(both)[~ignored] > np.asarray(soft)[~ignored])


# ----------------------------------------------------------------- 2. vocabularies that differ

# Divergences finite whichever model lacks tokens; JSD both ways.
UNEQUAL_VOCABULARIES = [("jsd", dict(beta=0.5), 29, 23), ("jsd", dict(beta=0.5), 23, 29),
                        ("skew_kl", dict(lam=0.1), 29, 23),
                        ("skew_reverse_kl", dict(lam=0.1), 23, 29), ("tv", {}, 23, 29)]


@pytest.mark.parametrize("divergence, options, vs, vt", UNEQUAL_VOCABULARIES,
                         ids=[f"{n}-vs={vs}-vt={vt}" for n, _, vs, vt in UNEQUAL_VOCABULARIES])
def test_vocabularies_of_different_sizes(divergence, options, vs, vt):
  x = make_inputs(vs=vs, vt=vt, seed=vs)
  kwargs = dict(divergence=divergence, **options, **ALL_TERMS, where=x.where)
  got = loss_and_grads(fused, x, **kwargs, **BLOCKS)
  want = loss_and_grads(materialized, x, **kwargs)
  assert_matches(got, want)


def test_kl_is_finite_or_infinite_by_which_model_lacks_tokens():
  """Forward KL: +inf iff the teacher has mass the student cannot have; reverse KL the opposite."""
  for vs, vt in [(29, 23), (23, 29)]:
    x = make_inputs(vs=vs, vt=vt, seed=11)
    for divergence, expect_finite in [("kl", vs > vt), ("reverse_kl", vs < vt)]:
      got = fused(*x[:7], divergence=divergence, **BLOCKS)
      want = materialized(*x[:7], divergence=divergence)
      assert np.all(np.isfinite(got)) == expect_finite, (divergence, vs, vt)
      assert_close(np.where(np.isfinite(want), got, 0), np.where(np.isfinite(want), want, 0),
                   1e-5, divergence)
      assert np.array_equal(np.isposinf(got), np.isposinf(want))
  x = make_inputs(vs=29, vt=23, seed=12)
  assert_matches(loss_and_grads(fused, x, divergence="kl", **BLOCKS),
                 loss_and_grads(materialized, x, divergence="kl"))


# ----------------------------------------------------------------------------------- 3. bf16

BF16_CASES = [("kl", {}), ("reverse_kl", {}), ("jsd", dict(beta=0.5)), ("skew_kl", dict(lam=0.1)),
              ("skew_reverse_kl", dict(lam=0.1)), ("tv", {})]


@pytest.mark.parametrize("divergence, options", BF16_CASES, ids=[n for n, _ in BF16_CASES])
def test_bf16_is_at_least_as_accurate_as_naive_bf16(divergence, options):
  x = make_inputs(vs=200, vt=200, ds=32, dt=48, batch=(96,), seed=7, dtype=jnp.bfloat16,
                  scale=2.0)
  x = x._replace(labels=jnp.where(x.labels == IGNORE, 0, x.labels))
  kwargs = dict(divergence=divergence, **options, temperature=1.5, hard_weight=0.2)
  impl = loss_and_grads(fused, x, **kwargs, block_tokens=32, block_vocab=64)
  naive = loss_and_grads(materialized, x, **kwargs)
  up = lambda a: a.astype(jnp.float32)
  x32 = x._replace(hs=up(x.hs), ws=up(x.ws), bs=up(x.bs), ht=up(x.ht), wt=up(x.wt), bt=up(x.bt))
  ref = loss_and_grads(materialized, x32, **kwargs)
  assert [g.dtype for g in impl[1]] == [jnp.bfloat16] * 3
  for name, got, low, want in [("loss", impl[0], naive[0], ref[0]),
                               *zip(("d_hidden", "d_weight", "d_bias"), impl[1], naive[1],
                                    ref[1])]:
    assert_bf16_rule(name, got, low, want)


def assert_bf16_rule(name, impl, naive, ref):
  """``|ref - impl| <= |ref - naive| + tol`` in the worst element, in RMS, and loosely per element.

  Both forms round ``dL/dz`` to bf16 for the gradient matmuls, at different
  values (the naive one from bf16 logits), so single elements of the gradients
  are independent draws of that rounding: the per-element bound only catches
  localized errors (``5e-3 max|ref|`` beyond naive's plus one bf16 ulp), the
  worst-element and RMS bounds compare the two whole error distributions.
  """
  impl, naive, ref = (np.asarray(a, np.float64) for a in (impl, naive, ref))
  scale = np.max(np.abs(ref))
  err, err_naive = np.abs(ref - impl), np.abs(ref - naive)
  excess = err - (err_naive + 2.0**-7 * np.abs(ref) + 5e-3 * scale)
  assert np.all(excess <= 0), f"{name}: worst element excess {np.max(excess):.3g}"
  assert np.max(err) <= np.max(err_naive) + 2.0**-8 * scale, (name, np.max(err), np.max(err_naive))
  rms = lambda e: float(np.sqrt(np.mean(e**2)))
  assert rms(err) <= rms(err_naive) + 1e-4 * scale, (name, rms(err), rms(err_naive))


# ---------------------------------------------------------- 4. teacher, shapes, transformations

def test_teacher_gets_zero_gradient():
  x = make_inputs(seed=8)
  def objective(ht, wt, bt):
    return jnp.sum(linear_distillation(x.hs, x.ws, ht, wt, divergence="jsd", teacher_bias=bt,
                                       **BLOCKS))
  grads = jax.grad(objective, argnums=(0, 1, 2))(x.ht, x.wt, x.bt)
  assert all(not np.any(np.asarray(g)) for g in grads)


def test_leading_shapes_scalar_empty_and_vmap():
  x = make_inputs(seed=9)
  batched = fused(*x[:7], divergence="tv", **BLOCKS)
  assert batched.shape == (2, 7)
  one = fused(x.hs[1, 3], x.ws, x.bs, x.ht[1, 3], x.wt, x.bt, divergence="tv")
  assert one.shape == () and np.isclose(one, batched[1, 3], rtol=1e-6)
  mapped = jax.vmap(lambda hs, ht: fused(hs, x.ws, x.bs, ht, x.wt, x.bt, divergence="tv",
                                         **BLOCKS))(x.hs, x.ht)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6)
  empty = linear_distillation(jnp.zeros((0, 3, 6)), x.ws, jnp.zeros((0, 3, 9)), x.wt)
  assert empty.shape == (0, 3) and empty.dtype == jnp.float32


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators_without_an_n_by_v_tensor(platform):
  """value_and_grad (bf16, V_s != V_t, every term) holds no [N, V] array in the exported module."""
  n, vs, vt, ds, dt = 300, 1000, 1024, 64, 96
  loss = lambda hs, ws, ht, wt, y: linear_distillation(
      hs, ws, ht, wt, y, divergence="jsd", temperature=2.0, hard_weight=0.5, block_tokens=128,
      block_vocab=256).mean()
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  bf16 = jnp.bfloat16
  specs = (jax.ShapeDtypeStruct((n, ds), bf16), jax.ShapeDtypeStruct((vs, ds), bf16),
           jax.ShapeDtypeStruct((n, dt), bf16), jax.ShapeDtypeStruct((vt, dt), bf16),
           jax.ShapeDtypeStruct((n,), jnp.int32))
  module = jax.export.export(step, platforms=[platform])(*specs).mlir_module()
  assert "stablehlo.while" in module
  assert not re.search(rf"tensor<{n}x(?:{vs}|{vt})x", module)
  # The materialized form holds one, so the check above can fail.
  naive = jax.jit(jax.value_and_grad(lambda hs, ws, ht, wt, y: distill.generalized_jsd(
      hs @ ws.T, (ht @ wt.T)[:, :vs]).mean(), argnums=(0, 1)))
  naive_module = jax.export.export(naive, platforms=[platform])(*specs).mlir_module()
  assert re.search(rf"tensor<{n}x{vs}x", naive_module)


def test_memory_target_at_a_llama_head():
  """Compile only: value_and_grad temp memory at N=8192, D_s=2048, D_t=4096, V=128256, bf16."""
  n, ds, dt, v = 8192, 2048, 4096, 128256
  loss = lambda hs, ws, ht, wt: linear_distillation(hs, ws, ht, wt, divergence="kl").mean()
  bf16 = jnp.bfloat16
  specs = (jax.ShapeDtypeStruct((n, ds), bf16), jax.ShapeDtypeStruct((v, ds), bf16),
           jax.ShapeDtypeStruct((n, dt), bf16), jax.ShapeDtypeStruct((v, dt), bf16))
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*specs).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 512 * 2**20, temp
  assert temp < n * v * 4 / 16           # far below one float32 [N, V] logits array (4 GiB)


# ------------------------------------------------------------------------------ 5. bad inputs

def _good():
  x = make_inputs(seed=10)
  return dict(student_hidden=x.hs, student_weight=x.ws, teacher_hidden=x.ht,
              teacher_weight=x.wt, labels=jnp.where(x.labels == IGNORE, 0, x.labels))


BAD_INPUTS = {
    "teacher_batch": (dict(teacher_hidden=jnp.zeros((2, 6, 9))), ValueError,
                      [r"leading shape", r"\(2, 7, 6\)", r"\(2, 6, 9\)"]),
    "student_d": (dict(student_weight=jnp.zeros((29, 5))), ValueError,
                  [r"`student_hidden`", r"\(2, 7, 6\)", r"\(29, 5\)"]),
    "teacher_weight_rank": (dict(teacher_weight=jnp.zeros((9,))), ValueError,
                            [r"`teacher_weight`", r"\(9,\)"]),
    "int_hidden": (dict(student_hidden=jnp.zeros((2, 7, 6), jnp.int32)), TypeError,
                   [r"`student_hidden`", "floating"]),
    "labels_shape": (dict(labels=jnp.zeros((7,), jnp.int32)), ValueError, [r"`labels`", r"\(7,\)"]),
    "labels_missing": (dict(labels=None, hard_weight=1.0), ValueError,
                       [r"`labels`", "hard_weight"]),
    "bias_shape": (dict(teacher_bias=jnp.zeros((28,))), ValueError,
                   [r"`teacher_bias`", r"\(29,\)"]),
    "divergence": (dict(divergence="js"), ValueError, [r"`divergence`", "'js'"]),
    "beta": (dict(beta=1.5), ValueError, [r"`beta`", "1.5"]),
    "temperature": (dict(temperature=0.0), ValueError, [r"`temperature`"]),
    "hard_weight": (dict(hard_weight=-1.0), ValueError, [r"`hard_weight`"]),
    "kl_flag": (dict(kl=1), TypeError, [r"`kl`"]),
    "where_dtype": (dict(where=jnp.ones((2, 7), jnp.int32)), TypeError, [r"`where`", "bool"]),
    "block": (dict(block_vocab=0), ValueError, [r"`block_vocab`"]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_raise_with_argument_and_shapes(name):
  changes, error, patterns = BAD_INPUTS[name]
  with pytest.raises(error) as info:
    linear_distillation(**{**_good(), **changes})
  message = str(info.value)
  assert message.startswith("linear_distillation:"), message
  for pattern in patterns:
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_good_arguments_are_accepted_and_hyperparameters_must_be_static():
  assert linear_distillation(**_good(), hard_weight=1.0).shape == (2, 7)
  with pytest.raises(TypeError, match="`temperature` must be a static"):
    jax.jit(lambda t: linear_distillation(**_good(), temperature=t))(2.0)


@pytest.mark.parametrize("divergence,options,passes", [
    ("kl", {}, 1), ("reverse_kl", {}, 1), ("jsd", dict(beta=0.0), 1),
    ("skew_reverse_kl", dict(lam=0.0), 1), ("jsd", {}, 2), ("tv", {}, 2),
])
def test_plain_kls_take_one_forward_pass_over_the_heads(divergence, options, passes):
  """The forward's logit matmuls: one student + one teacher per pass over the vocabulary."""
  specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((40, 8), (50, 8), (40, 12), (50, 12))]
  forward = jax.jit(lambda hs, ws, ht, wt: linear_distillation(
      hs, ws, ht, wt, divergence=divergence, block_tokens=16, block_vocab=16, **options))
  hlo = forward.lower(*specs).as_text()
  assert hlo.count("stablehlo.dot_general") == 2 * passes
