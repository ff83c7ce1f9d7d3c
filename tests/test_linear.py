"""Tests of ``logitlab.linear_cross_entropy``, the fused (streaming) linear cross-entropy.

Two references: the materialized form ``logitlab.cross_entropy(hidden @ weight.T + bias)``
(``materialized`` below; ``shift`` applied by slicing, as the docstring defines it)
and an independent float64 numpy computation with the analytic gradient
(``numpy_reference``). Gradients are taken of ``sum(cot * loss)`` (plus
``sum(lse_cot * lse)`` with ``return_lse``) for random, non-uniform cotangents.
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import logitlab

lce = logitlab.linear_cross_entropy

FUSED_ONLY = ("block_tokens", "block_vocab", "filter_eps", "impl")
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4       # float32 against float64 / float32 references
ALL_OPTIONS = dict(label_smoothing=0.1, smoothing="t5x", z_loss=1e-3, softcap=4.0)


# --------------------------------------------------------------------------- inputs

class Case(NamedTuple):
  hidden: jax.Array          # [*batch, n, d]
  weight: jax.Array          # [v, d]
  bias: jax.Array | None     # [v]
  labels: jax.Array          # [*batch, n]
  cot: jax.Array             # [*batch, n] cotangent of the loss
  lse_cot: jax.Array         # [*batch, n] cotangent of lse (used with return_lse)


def make_case(n, v, d, *, batch=(), seed=0, bias=True, dtype=jnp.float32, scale=1.0,
              ignored=0.0) -> Case:
  """Random inputs with logits of order ``scale``; ``ignored`` of the labels are -100."""
  rng = np.random.default_rng(seed)
  shape = tuple(batch) + (n,)
  labels = rng.integers(0, v, size=shape)
  labels = np.where(rng.random(shape) < ignored, -100, labels)
  as_dtype = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
  return Case(
      hidden=as_dtype(rng.normal(size=shape + (d,)) * scale),
      weight=as_dtype(rng.normal(size=(v, d)) * 1.5 / np.sqrt(d)),
      bias=as_dtype(rng.normal(size=(v,)) * 0.5) if bias else None,
      labels=jnp.asarray(labels, jnp.int32),
      cot=jnp.asarray(rng.uniform(0.2, 2.0, size=shape), jnp.float32),
      lse_cot=jnp.asarray(rng.normal(size=shape), jnp.float32))


def seed_of(name: str) -> int:
  return zlib.crc32(name.encode()) % 2**16


def random_mask(shape, seed, p=0.7):
  return jnp.asarray(np.random.default_rng(seed + 1000).random(shape) < p)


# ----------------------------------------------------------------------- references

class Result(NamedTuple):
  loss: np.ndarray
  lse: np.ndarray | None
  grads: tuple          # (d_hidden, d_weight, d_bias or None)


def _shift_np(x, shift, fill):
  """``x[..., t + shift]`` at position ``t``, ``fill`` past the end."""
  if not shift:
    return x
  out = np.full_like(x, fill)
  out[..., :max(x.shape[-1] - shift, 0)] = x[..., shift:]
  return out


def numpy_reference(case: Case, *, where=None, ignore_index=None, shift=0,
                    label_smoothing=0.0, smoothing="uniform", z_loss=0.0, softcap=None,
                    return_lse=False, **unused) -> Result:
  """float64 loss, lse and analytic gradients, written from the math."""
  f64 = lambda x: np.asarray(x).astype(np.float64)
  hidden, weight = f64(case.hidden), f64(case.weight)
  v, d = weight.shape
  labels = np.asarray(case.labels)
  valid = np.ones(labels.shape, bool) if where is None else np.broadcast_to(where, labels.shape)
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  labels, valid = _shift_np(labels, shift, 0), _shift_np(valid, shift, False)
  y, m = labels.reshape(-1), valid.reshape(-1)
  h = hidden.reshape(-1, d)

  raw = h @ weight.T + (0.0 if case.bias is None else f64(case.bias))
  z = raw if softcap is None else softcap * np.tanh(raw / softcap)
  top = z.max(axis=1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
  log_p = z - lse[:, None]
  onehot = np.arange(v) == np.where(m, y, 0)[:, None]
  eps = label_smoothing
  if smoothing == "uniform":
    q = (1 - eps) * onehot + eps / v
    neg_entropy = 0.0
  else:
    q = np.where(onehot, 1 - eps, eps / (v - 1))
    neg_entropy = np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=1)
  loss = -np.sum(q * log_p, axis=1) + neg_entropy + z_loss * lse**2

  cot = f64(case.cot).reshape(-1)
  lse_cot = f64(case.lse_cot).reshape(-1) if return_lse else np.zeros_like(cot)
  p = np.exp(log_p)
  g = cot[:, None] * ((1 + 2 * z_loss * lse)[:, None] * p - q) + lse_cot[:, None] * p
  g = np.where(m[:, None], g, 0.0)
  if softcap is not None:
    g = g * (1 - np.tanh(raw / softcap)**2)
  grads = ((g @ weight).reshape(hidden.shape), g.T @ h,
           None if case.bias is None else g.sum(axis=0))
  return Result(np.where(m, loss, 0.0).reshape(labels.shape),
                np.where(m, lse, 0.0).reshape(labels.shape) if return_lse else None, grads)


def materialized(hidden, weight, labels, *, bias=None, where=None, shift=0, **options):
  """``cross_entropy(hidden @ weight.T + bias)``; ``shift`` by slicing and zero padding."""
  if shift:
    n = labels.shape[-1]
    kept = max(n - shift, 0)
    if where is not None:
      where = jnp.broadcast_to(where, labels.shape)[..., shift:]
    out = materialized(hidden[..., :kept, :], weight, labels[..., shift:], bias=bias,
                       where=where, **options)
    pad = lambda x: jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (n - kept,), x.dtype)], -1)
    return jax.tree.map(pad, out)
  if labels.size == 0:        # logitlab.cross_entropy cannot reshape an empty batch
    zeros = jnp.zeros(labels.shape, jnp.float32)
    return (zeros, zeros) if options.get("return_lse") else zeros
  logits = jnp.einsum("...d,vd->...v", hidden, weight)
  if bias is not None:
    logits = logits + bias
  return logitlab.cross_entropy(logits, labels, where=where, **options)


def _objective(loss_fn, params, labels, where, cot, lse_cot, options):
  """``sum(cot * loss) [+ sum(lse_cot * lse)]`` and the raw outputs."""
  hidden, weight, bias = params
  out = loss_fn(hidden, weight, labels, bias=bias, where=where, **options)
  loss, lse = out if options.get("return_lse") else (out, None)
  total = jnp.sum(loss * cot)
  if lse is not None:
    total = total + jnp.sum(lse * lse_cot)
  return total, (loss, lse)


@functools.partial(jax.jit, static_argnames=("kind", "options"))
def _run_jit(params, labels, where, cot, lse_cot, *, kind, options):
  options = dict(options)
  loss_fn = lce
  if kind == "materialized":
    loss_fn = materialized
    options = {k: val for k, val in options.items() if k not in FUSED_ONLY}
  (_, (loss, lse)), grads = jax.value_and_grad(_objective, argnums=1, has_aux=True)(
      loss_fn, params, labels, where, cot, lse_cot, options)
  return Result(loss, lse, grads)


def run(kind: str, case: Case, *, where=None, **options) -> Result:
  """Loss, lse and gradients of the fused (``kind="fused"``) or materialized form."""
  params = (case.hidden, case.weight, case.bias)
  return _run_jit(params, case.labels, where, case.cot, case.lse_cot, kind=kind,
                  options=tuple(sorted(options.items())))


# ----------------------------------------------------------------------- assertions

def assert_close(got, want, rtol, name=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def assert_results_close(got: Result, want: Result, value_rtol=VALUE_RTOL, grad_rtol=GRAD_RTOL):
  assert_close(got.loss, want.loss, value_rtol, "loss")
  assert (got.lse is None) == (want.lse is None)
  if want.lse is not None:
    assert_close(got.lse, want.lse, value_rtol, "lse")
  for name, g, w in zip(("d_hidden", "d_weight", "d_bias"), got.grads, want.grads):
    assert (g is None) == (w is None), name
    if w is not None:
      assert_close(g, w, grad_rtol, name)


def check_against_references(case, *, where=None, **options) -> Result:
  """Runs the fused form and compares it with both references; returns its result."""
  got = run("fused", case, where=where, **options)
  assert got.loss.dtype == jnp.float32 and got.loss.shape == case.labels.shape
  assert_results_close(got, run("materialized", case, where=where, **options))
  assert_results_close(got, numpy_reference(case, where=where, **options))
  return got


# ------------------------------------------------- 1. values and gradients, tilings

TILINGS = {
    # (n, v, d, block_tokens, block_vocab)
    "ragged": (252, 507, 123, 64, 128),          # both last tiles overlap the previous
    "tile_multiples": (256, 512, 64, 64, 128),
    "blocks_larger_than_n_v": (37, 61, 16, 1000, 1000),
    "block_1": (9, 13, 5, 1, 1),
}


@pytest.mark.parametrize("tiling", TILINGS)
def test_values_and_grads_match_references(tiling):
  n, v, d, block_tokens, block_vocab = TILINGS[tiling]
  case = make_case(n, v, d, seed=n + v)
  got = check_against_references(case, block_tokens=block_tokens, block_vocab=block_vocab)
  assert float(np.min(got.loss)) > 0
  assert all(g.dtype == jnp.float32 for g in got.grads)


def test_default_blocks_and_impls_agree():
  case = make_case(252, 507, 123, seed=3)
  auto = run("fused", case)
  xla = run("fused", case, impl="xla", block_tokens=64, block_vocab=128)
  assert_results_close(xla, auto)
  assert_results_close(auto, numpy_reference(case))


# --------------------------------------------------------------------- 2. options

OPTIONS_SHAPE = (60, 75, 16)                  # ragged for both block sizes below
OPTIONS_BLOCKS = dict(block_tokens=16, block_vocab=32)

OPTION_CASES = {
    "uniform_smoothing_zloss_softcap": dict(
        options=dict(label_smoothing=0.1, smoothing="uniform", z_loss=1e-3, softcap=4.0)),
    "t5x_smoothing_zloss_softcap": dict(
        options=dict(label_smoothing=0.2, smoothing="t5x", z_loss=1e-3, softcap=4.0)),
    "t5x_full_smoothing": dict(options=dict(label_smoothing=1.0, smoothing="t5x")),
    "no_bias": dict(bias=False, options=dict(z_loss=1e-2)),
    "where_with_shift": dict(where=True, options=dict(shift=2)),
    "ignore_index_with_shift": dict(ignored=0.3, options=dict(ignore_index=-100, shift=1)),
    "where_ignore_index_shift_all_options": dict(
        where=True, ignored=0.2,
        options=dict(ignore_index=-100, shift=3, label_smoothing=0.1, smoothing="t5x",
                     z_loss=1e-3, softcap=3.0)),
    "return_lse": dict(options=dict(return_lse=True)),
    "return_lse_zloss_smoothing_mask": dict(
        where=True, options=dict(return_lse=True, z_loss=1e-2, label_smoothing=0.1)),
    "batch_dims": dict(batch=(3,), options=dict(label_smoothing=0.1)),
    "batch_dims_shift_broadcast_where": dict(
        batch=(2, 3), where="broadcast", ignored=0.1,
        options=dict(shift=2, ignore_index=-100, z_loss=1e-3)),
}


@pytest.mark.parametrize("name", OPTION_CASES)
def test_options_match_references(name):
  spec = OPTION_CASES[name]
  n, v, d = OPTIONS_SHAPE
  batch = spec.get("batch", ())
  seed = seed_of(name)
  case = make_case(n, v, d, batch=batch, seed=seed, bias=spec.get("bias", True),
                   ignored=spec.get("ignored", 0.0))
  where = None
  if spec.get("where") is True:
    where = random_mask(case.labels.shape, seed)
  elif spec.get("where") == "broadcast":     # one mask for every batch row
    where = random_mask((1,) * len(batch) + (n,), seed)
  got = check_against_references(case, where=where, **spec["options"], **OPTIONS_BLOCKS)
  if spec["options"].get("return_lse"):
    assert got.lse.dtype == jnp.float32 and got.lse.shape == case.labels.shape


def test_shift_equals_unshifted_call_on_sliced_inputs():
  n, v, d = OPTIONS_SHAPE
  case = make_case(n, v, d, batch=(2,), seed=5, ignored=0.2)
  where = random_mask(case.labels.shape, 5)
  k = 3
  kwargs = dict(ignore_index=-100, return_lse=True, **OPTIONS_BLOCKS)
  shifted = lce(case.hidden, case.weight, case.labels, where=where, shift=k, **kwargs)
  sliced = lce(case.hidden[:, :-k], case.weight, case.labels[:, k:], where=where[:, k:],
               **kwargs)
  for got, want in zip(shifted, sliced):
    np.testing.assert_array_equal(got[:, -k:], 0.0)
    np.testing.assert_allclose(got[:, :-k], want, rtol=1e-6, atol=1e-6)


def test_gradient_flows_only_through_lse():
  """With only lse differentiated, dL/dz is softmax: the gradient of logsumexp."""
  case = make_case(*OPTIONS_SHAPE, seed=11)
  no_loss_cot = case._replace(cot=jnp.zeros_like(case.cot))
  got = run("fused", no_loss_cot, return_lse=True, z_loss=1e-2, **OPTIONS_BLOCKS)
  assert_results_close(got, numpy_reference(no_loss_cot, return_lse=True, z_loss=1e-2))
  assert float(np.max(np.abs(got.grads[1]))) > 1e-3


# ------------------------------------------------------------------------ 3. bf16

BF16_SHAPE = (256, 200, 64)
BF16_BLOCKS = dict(block_tokens=16, block_vocab=64)


@pytest.mark.parametrize("options", [dict(), ALL_OPTIONS], ids=["plain", "all_options"])
def test_bf16_is_at_least_as_accurate_as_naive_bf16(options):
  case = make_case(*BF16_SHAPE, seed=7, dtype=jnp.bfloat16, scale=2.0)
  impl = run("fused", case, **options, **BF16_BLOCKS)
  naive = run("materialized", case, **options)
  upcast = lambda x: None if x is None else x.astype(jnp.float32)
  case_f32 = case._replace(hidden=upcast(case.hidden), weight=upcast(case.weight),
                           bias=upcast(case.bias))
  ref = run("materialized", case_f32, **options)

  assert impl.loss.dtype == jnp.float32
  assert [g.dtype for g in impl.grads] == [jnp.bfloat16] * 3
  for name, got, low, want in [("loss", impl.loss, naive.loss, ref.loss),
                               *zip(("d_hidden", "d_weight", "d_bias"),
                                    impl.grads, naive.grads, ref.grads)]:
    assert_bf16_rule(name, got, low, want)


def assert_bf16_rule(name, impl, naive, ref):
  """``|ref - impl| <= |ref - naive| + tol``, element by element and in RMS.

  Gradients come back in bf16, so both ``impl`` and ``naive`` end with a rounding
  to bf16 that may land on either side of ``ref``: the element tolerance allows
  one bf16 ulp (at most ``2**-7 |ref|``) plus ``1e-3 max|ref|`` for the float32
  sums. The RMS error, where such luck averages out, gets only ``1e-4 max|ref|``.
  """
  impl, naive, ref = (np.asarray(x, np.float64) for x in (impl, naive, ref))
  scale = np.max(np.abs(ref))
  err_impl, err_naive = np.abs(ref - impl), np.abs(ref - naive)
  excess = err_impl - (err_naive + 2.0**-7 * np.abs(ref) + 1e-3 * scale)
  assert np.all(excess <= 0), f"{name}: worst element excess {np.max(excess):.3g}"
  rms = lambda e: float(np.sqrt(np.mean(e**2)))
  assert rms(err_impl) <= rms(err_naive) + 1e-4 * scale, (
      f"{name}: RMS error {rms(err_impl):.3g} vs naive bf16 {rms(err_naive):.3g}")


# -------------------------------------------------- 4. masked rows, large logits

@pytest.mark.parametrize("options", [dict(), ALL_OPTIONS], ids=["plain", "all_options"])
def test_masked_rows_have_zero_loss_and_exactly_zero_gradient(options):
  n, v, d = OPTIONS_SHAPE
  rows = np.arange(n)
  case = make_case(n, v, d, seed=13)
  case = case._replace(labels=jnp.where(rows % 4 == 2, -100, case.labels))
  where = jnp.asarray(rows % 4 != 1)
  masked = (rows % 4 == 1) | (rows % 4 == 2)
  # return_lse: the lse cotangent of masked rows must be dropped too.
  got = check_against_references(case, where=where, ignore_index=-100, return_lse=True,
                                 **options, **OPTIONS_BLOCKS)
  d_hidden = np.asarray(got.grads[0])
  assert np.all(np.asarray(got.loss)[masked] == 0) and np.all(np.asarray(got.lse)[masked] == 0)
  assert np.all(d_hidden[masked] == 0)
  assert np.all(np.asarray(got.loss)[~masked] > 0)
  assert np.all(np.any(d_hidden[~masked] != 0, axis=-1))


@pytest.mark.parametrize("how", ["where", "ignore_index", "shift_past_end"])
def test_fully_masked_input_gives_zero_loss_and_zero_gradients(how):
  n, v, d = OPTIONS_SHAPE
  case = make_case(n, v, d, seed=17)
  kwargs = {"where": dict(where=jnp.zeros((n,), bool)),
            "ignore_index": dict(ignore_index=int(case.labels[0])),
            "shift_past_end": dict(shift=n)}[how]
  if how == "ignore_index":
    case = case._replace(labels=jnp.full_like(case.labels, case.labels[0]))
  got = run("fused", case, return_lse=True, **kwargs, **ALL_OPTIONS, **OPTIONS_BLOCKS)
  for name, x in [("loss", got.loss), ("lse", got.lse),
                  *zip(("d_hidden", "d_weight", "d_bias"), got.grads)]:
    np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0, err_msg=name)


def test_empty_token_axis_gives_empty_loss_and_zero_weight_gradient():
  hidden, weight = jnp.zeros((2, 0, 3)), jnp.ones((5, 3))
  labels = jnp.zeros((2, 0), jnp.int32)
  loss, lse = lce(hidden, weight, labels, shift=1, return_lse=True)
  assert loss.shape == lse.shape == (2, 0) and loss.dtype == jnp.float32
  d_hidden, d_weight = jax.grad(lambda h, w: jnp.sum(lce(h, w, labels)), argnums=(0, 1))(
      hidden, weight)
  assert d_hidden.shape == hidden.shape
  np.testing.assert_array_equal(d_weight, np.zeros((5, 3)))


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["no_softcap", "softcap"])
def test_masked_rows_with_overflowing_logits_give_zero_gradient(softcap):
  """Masked (padding) rows may hold any finite values, even ones whose logits
  overflow float32 to inf / NaN: they must still contribute exactly 0, as in the
  materialized ``cross_entropy``, which masks with ``jnp.where``."""
  n, v, d = OPTIONS_SHAPE
  case = make_case(n, v, d, seed=19)
  garbage = np.where(np.arange(d) % 2 == 0, 3e38, -3e38).astype(np.float32)
  masked = np.arange(n) >= n - 5
  case = case._replace(hidden=jnp.where(masked[:, None], garbage, case.hidden))
  where = jnp.asarray(~masked)
  got = run("fused", case, where=where, softcap=softcap, **OPTIONS_BLOCKS)
  want = run("materialized", case, where=where, softcap=softcap)
  assert np.all(np.isfinite(np.asarray(want.grads[1])))       # the reference copes
  assert np.all(np.asarray(got.loss)[masked] == 0)
  assert np.all(np.asarray(got.grads[0])[masked] == 0), "d_hidden of masked rows"
  assert_results_close(got, want)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["no_softcap", "softcap"])
def test_logits_of_magnitude_1e4_give_finite_accurate_results(softcap):
  n, v, d = OPTIONS_SHAPE
  case = make_case(n, v, d, seed=23, scale=1e4)     # logits of std ~1.5e4
  got = run("fused", case, softcap=softcap, z_loss=1e-4, **OPTIONS_BLOCKS)
  want = numpy_reference(case, softcap=softcap, z_loss=1e-4)
  logit_scale = np.max(np.abs(np.asarray(case.hidden) @ np.asarray(case.weight).T))
  assert logit_scale > 1e4
  # float32 logits of size 1e4 carry absolute errors of ~1e-3 (ulp 1e-3 at 1e4),
  # which move a softmax probability by as much: compare at 1e-3 of the scale.
  assert_results_close(got, want, value_rtol=VALUE_RTOL, grad_rtol=1e-3)


# ----------------------------------------------------------------- 5. filter_eps

FILTER_SHAPE = (64, 80, 16)
FILTER_BLOCKS = dict(block_tokens=16, block_vocab=32)


def test_filter_with_tiny_eps_equals_unfiltered():
  case = make_case(*FILTER_SHAPE, seed=29)
  exact = run("fused", case, **ALL_OPTIONS, **FILTER_BLOCKS)
  filtered = run("fused", case, filter_eps=1e-30, **ALL_OPTIONS, **FILTER_BLOCKS)
  np.testing.assert_array_equal(filtered.loss, exact.loss)
  assert_results_close(filtered, exact, value_rtol=0.0, grad_rtol=1e-6)


def test_filter_with_huge_eps_skips_every_tile():
  case = make_case(*FILTER_SHAPE, seed=31)
  options = dict(return_lse=True, **ALL_OPTIONS, **FILTER_BLOCKS)
  exact = run("fused", case, **options)
  filtered = run("fused", case, filter_eps=10.0, **options)
  np.testing.assert_array_equal(filtered.loss, exact.loss)
  np.testing.assert_array_equal(filtered.lse, exact.lse)
  for name, g in zip(("d_hidden", "d_weight", "d_bias"), filtered.grads):
    np.testing.assert_array_equal(g, 0.0, err_msg=name)
  assert float(np.max(np.abs(exact.grads[1]))) > 0.1


def test_filter_on_peaked_rows_stays_within_the_skipped_mass():
  """Rows 0..31 (two token tiles) are peaked: label logit 20 above the rest, so
  every |dloss/dz| in their tiles is < 80 e^-20 << eps and those tiles are skipped;
  rows 32..63 are diffuse, so their tiles are kept. A skipped entry has
  |dloss/dz| < eps, times its cotangent, so the gradient error is bounded by
      |d_hidden err[n]| <= eps cot_n sum_v |W_v|,  |d_weight err[v]| <= eps sum_n cot_n |H_n|
  (elementwise over D); rows whose tiles are all kept keep their exact d_hidden."""
  n, v, _ = FILTER_SHAPE
  rng = np.random.default_rng(37)
  case = make_case(n, v, v, seed=37, bias=False)
  peaked = np.arange(n) < 32
  weight = np.eye(v) + 0.01 * rng.normal(size=(v, v))
  onehot = np.eye(v)[np.asarray(case.labels)]
  hidden = np.where(peaked[:, None], 20.0 * onehot + 0.01 * rng.normal(size=(n, v)),
                    rng.normal(size=(n, v)))
  case = case._replace(hidden=jnp.asarray(hidden, jnp.float32),
                       weight=jnp.asarray(weight, jnp.float32))
  eps = 2.0**-12
  exact = run("fused", case, **FILTER_BLOCKS)
  filtered = run("fused", case, filter_eps=eps, **FILTER_BLOCKS)
  np.testing.assert_array_equal(filtered.loss, exact.loss)

  d_hidden, d_weight = (np.asarray(g, np.float64) for g in filtered.grads[:2])
  exact_dh, exact_dw = (np.asarray(g, np.float64) for g in exact.grads[:2])
  cot, h, w = np.asarray(case.cot, np.float64), np.asarray(case.hidden), np.asarray(case.weight)
  assert np.all(d_hidden[peaked] == 0)                  # their tiles were skipped ...
  assert np.max(np.abs(exact_dh[peaked])) > 0           # ... though not exactly zero
  np.testing.assert_allclose(d_hidden[~peaked], exact_dh[~peaked], rtol=1e-6, atol=1e-7)
  dh_bound = eps * cot[:, None] * np.sum(np.abs(w), axis=0)[None, :]
  dw_bound = eps * np.sum(cot[:, None] * np.abs(h), axis=0)[None, :]
  assert np.all(np.abs(d_hidden - exact_dh) <= dh_bound + 1e-7)
  assert np.all(np.abs(d_weight - exact_dw) <= dw_bound + 1e-7)


# ------------------------------------------------------------- 6. transformations

TRANSFORM_SHAPE = (3, 20, 45, 8)              # batch, n, v, d
TRANSFORM_BLOCKS = dict(block_tokens=8, block_vocab=16)


def _weighted_sum(hidden, weight, labels, cot, bias=None):
  loss = lce(hidden, weight, labels, bias=bias, label_smoothing=0.1, **TRANSFORM_BLOCKS)
  return jnp.sum(loss * cot)


def _transform_case():
  b, n, v, d = TRANSFORM_SHAPE
  return make_case(n, v, d, batch=(b,), seed=41)


def _reference_grads(case):
  return numpy_reference(case, label_smoothing=0.1).grads


def test_jit_matches_eager_and_reference():
  case = _transform_case()
  kwargs = dict(bias=case.bias, label_smoothing=0.1, **TRANSFORM_BLOCKS)
  eager = lce(case.hidden, case.weight, case.labels, **kwargs)
  jitted = jax.jit(functools.partial(lce, **kwargs))(case.hidden, case.weight, case.labels)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  assert_close(jitted, numpy_reference(case, label_smoothing=0.1).loss, VALUE_RTOL)


@pytest.mark.parametrize("transform", ["grad_inside_jit", "value_and_grad"])
def test_grad_transformations_match_reference(transform):
  case = _transform_case()
  args = (case.hidden, case.weight, case.labels, case.cot, case.bias)
  if transform == "grad_inside_jit":
    grads = jax.jit(jax.grad(_weighted_sum, argnums=(0, 1, 4)))(*args)
  else:
    value, grads = jax.value_and_grad(_weighted_sum, argnums=(0, 1, 4))(*args)
    want = numpy_reference(case, label_smoothing=0.1)
    assert_close(value, np.sum(want.loss * np.asarray(case.cot)), VALUE_RTOL)
  for name, g, w in zip(("d_hidden", "d_weight", "d_bias"), grads, _reference_grads(case)):
    assert_close(g, w, GRAD_RTOL, name)


def test_vmap_over_leading_axis_with_shared_weight():
  case = _transform_case()
  kwargs = dict(bias=case.bias, label_smoothing=0.1, **TRANSFORM_BLOCKS)
  per_row = lambda h, y: lce(h, case.weight, y, **kwargs)
  mapped = jax.vmap(per_row)(case.hidden, case.labels)
  batched = lce(case.hidden, case.weight, case.labels, **kwargs)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)

  # Per-example gradients: weight shared (in_axes None), one d_weight per example.
  per_example = jax.jit(jax.vmap(jax.grad(_weighted_sum, argnums=(0, 1, 4)),
                                 in_axes=(0, None, 0, 0, None)))
  d_hidden, d_weight, d_bias = per_example(case.hidden, case.weight, case.labels, case.cot,
                                           case.bias)
  assert d_weight.shape == (TRANSFORM_SHAPE[0],) + case.weight.shape
  for i in range(TRANSFORM_SHAPE[0]):
    row = case._replace(hidden=case.hidden[i], labels=case.labels[i], cot=case.cot[i],
                        lse_cot=case.lse_cot[i])
    for name, g, w in zip(("d_hidden", "d_weight", "d_bias"),
                          (d_hidden[i], d_weight[i], d_bias[i]), _reference_grads(row)):
      assert_close(g, w, GRAD_RTOL, f"{name}[{i}]")


# ------------------------------------------------------------ 7. property test

@st.composite
def configurations(draw):
  n, v, d = draw(st.integers(1, 40)), draw(st.integers(2, 70)), draw(st.integers(1, 16))
  options = dict(
      block_tokens=draw(st.integers(1, 48)),
      block_vocab=draw(st.integers(1, 80)),
      label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.6])),
      smoothing=draw(st.sampled_from(["uniform", "t5x"])),
      z_loss=draw(st.sampled_from([0.0, 1e-2])),
      softcap=draw(st.sampled_from([None, 2.5])),
      shift=draw(st.integers(0, 3)),
      return_lse=draw(st.booleans()),
  )
  if draw(st.booleans()):
    options["ignore_index"] = -100
  shape = dict(n=n, v=v, d=d, bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
               batch=draw(st.sampled_from([(), (2,)])), masked=draw(st.booleans()))
  return shape, options


@settings(max_examples=15, deadline=None, database=None)
@given(configurations())
def test_property_matches_materialized(configuration):
  shape, options = configuration
  case = make_case(shape["n"], shape["v"], shape["d"], batch=shape["batch"], seed=shape["seed"],
                   bias=shape["bias"], ignored=0.2 if "ignore_index" in options else 0.0)
  where = random_mask(case.labels.shape, shape["seed"]) if shape["masked"] else None
  got = run("fused", case, where=where, **options)
  assert_results_close(got, run("materialized", case, where=where, **options),
                       value_rtol=2e-5, grad_rtol=2e-4)


# --------------------------------------------------------------- 8. bad inputs

def _good_arguments():
  return dict(hidden=jnp.zeros((6, 4)), weight=jnp.zeros((5, 4)),
              labels=jnp.zeros((6,), jnp.int32))


BAD_INPUTS = {
    # name: (changed arguments, exception, patterns the message must contain)
    "weight_not_2d": (dict(weight=jnp.zeros((5, 4, 1))), ValueError,
                      ["`weight`", r"\(5, 4, 1\)"]),
    "d_mismatch": (dict(weight=jnp.zeros((5, 3))), ValueError,
                   ["`hidden`", r"\(6, 4\)", r"\(5, 3\)"]),
    "bias_shape": (dict(bias=jnp.zeros((4,))), ValueError,
                   ["`bias`", r"\(4,\)", r"\(5,\)"]),
    "labels_shape": (dict(labels=jnp.zeros((5,), jnp.int32)), ValueError,
                     ["`labels`", r"\(5,\)", r"\(6,\)"]),
    "integer_hidden": (dict(hidden=jnp.zeros((6, 4), jnp.int32)), TypeError,
                       ["`hidden`", "int32", r"\(6, 4\)"]),
    "float_labels": (dict(labels=jnp.zeros((6,))), TypeError,
                     ["`labels`", "float32", r"\(6,\)"]),
    "non_bool_where": (dict(where=jnp.ones((6,), jnp.int32)), TypeError, ["`where`", "int32"]),
    "where_not_broadcastable": (dict(where=jnp.ones((4,), bool)), ValueError,
                                ["`where`", r"\(4,\)", r"\(6,\)"]),
    "negative_shift": (dict(shift=-1), ValueError, ["`shift`", "-1"]),
    "shift_scalar_labels": (dict(hidden=jnp.zeros((4,)), labels=jnp.int32(0), shift=1),
                            ValueError, ["`shift`", "scalar"]),
    "unknown_impl": (dict(impl="triton"), ValueError, ["`impl`", "triton"]),
    "block_tokens_0": (dict(block_tokens=0), ValueError, ["`block_tokens`", "0"]),
    "block_tokens_negative": (dict(block_tokens=-2), ValueError, ["`block_tokens`", "-2"]),
    "block_vocab_0": (dict(block_vocab=0), ValueError, ["`block_vocab`", "0"]),
    "block_vocab_negative": (dict(block_vocab=-2), ValueError, ["`block_vocab`", "-2"]),
    "filter_eps_0": (dict(filter_eps=0.0), ValueError, ["`filter_eps`"]),
    "filter_eps_negative": (dict(filter_eps=-1e-3), ValueError, ["`filter_eps`"]),
    "bad_smoothing": (dict(smoothing="gaussian"), ValueError, ["`smoothing`", "gaussian"]),
    "label_smoothing_above_1": (dict(label_smoothing=1.5), ValueError,
                                ["`label_smoothing`", "1.5"]),
    "t5x_with_one_class": (dict(weight=jnp.zeros((1, 4)), label_smoothing=0.1, smoothing="t5x"),
                           ValueError, ["t5x", "V=1"]),
    "weight_without_rows": (dict(weight=jnp.zeros((0, 4))), ValueError,
                            ["`weight`", r"\(0, 4\)"]),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_with_argument_and_shapes(name):
  changes, error, patterns = BAD_INPUTS[name]
  kwargs = {**_good_arguments(), **changes}
  hidden, weight, labels = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels")
  with pytest.raises(error) as info:
    lce(hidden, weight, labels, **kwargs)
  message = str(info.value)
  assert message.startswith("linear_cross_entropy:"), message
  for pattern in patterns:
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_good_arguments_are_accepted():
  """The baseline of the bad-input cases runs, so each case fails for its own change."""
  loss = lce(**_good_arguments())
  np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)


# ------------------------------------------------------------------- 9. memory

MEM_N, MEM_D, MEM_V = 2048, 256, 32768
LOGITS_BYTES = MEM_N * MEM_V * 4


def _temp_bytes(loss_fn, dtype):
  """Compile-only temp memory of value_and_grad (hidden, weight) of the mean loss."""
  f = jax.value_and_grad(lambda h, w, y: jnp.mean(loss_fn(h, w, y)), argnums=(0, 1))
  specs = (jax.ShapeDtypeStruct((MEM_N, MEM_D), dtype), jax.ShapeDtypeStruct((MEM_V, MEM_D), dtype),
           jax.ShapeDtypeStruct((MEM_N,), jnp.int32))
  return jax.jit(f).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def test_fused_temp_memory_is_far_below_the_logits():
  fused = _temp_bytes(lce, jnp.float32)
  naive = _temp_bytes(lambda h, w, y: logitlab.cross_entropy(h @ w.T, y), jnp.float32)
  assert naive > LOGITS_BYTES, naive                  # the materialized form holds [N, V]
  assert fused < LOGITS_BYTES / 8, fused


def test_fused_bf16_temp_memory_is_far_below_the_logits():
  """bf16 takes a CPU-specific tile path (no float32 copy of the whole weight)."""
  fused = _temp_bytes(lce, jnp.bfloat16)
  assert fused < LOGITS_BYTES / 8, fused


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_path_lowers_for_accelerators_without_an_n_by_v_tensor(platform):
  """Cross-lowers value_and_grad (bf16) with jax.export; no [N, V] array appears in the module."""
  n, v, d = 300, 1000, 64
  step = jax.jit(jax.value_and_grad(
      lambda h, w, y: lce(h, w, y, softcap=30.0, label_smoothing=0.1, z_loss=1e-4,
                          block_tokens=128, block_vocab=256).mean(),
      argnums=(0, 1)))
  specs = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((v, d), jnp.bfloat16),
           jax.ShapeDtypeStruct((n,), jnp.int32))
  module = jax.export.export(step, platforms=[platform])(*specs).mlir_module()
  assert "stablehlo.while" in module
  assert not re.search(rf"tensor<{n}x{v}x", module)
  # The materialized form does hold one, so the check above can fail.
  naive = jax.jit(lambda h, w, y: logitlab.cross_entropy(h @ w.T, y).mean())
  assert re.search(rf"tensor<{n}x{v}x", jax.export.export(naive, platforms=[platform])(*specs).mlir_module())


def test_eager_call_on_a_sharded_weight():
  """Outside jit, a weight with a NamedSharding (here a 1-device mesh) works as under jit."""
  mesh = jax.make_mesh((1,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 20, size=5), jnp.int32)
  sharded = jax.device_put(weight, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "vocab", None)))
  out = logitlab.linear_cross_entropy(hidden, sharded, labels, impl="xla", block_vocab=8)
  ref = logitlab.cross_entropy(hidden @ weight.T, labels)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
