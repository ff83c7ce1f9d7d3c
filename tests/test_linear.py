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
  case = make_case(n, v, d, batch=batch, seed=len(name), bias=spec.get("bias", True),
                   ignored=spec.get("ignored", 0.0))
  where = None
  if spec.get("where") is True:
    where = random_mask(case.labels.shape, len(name))
  elif spec.get("where") == "broadcast":     # one mask for every batch row
    where = random_mask((1,) * len(batch) + (n,), len(name))
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

BF16_SHAPE = (96, 200, 64)
BF16_BLOCKS = dict(block_tokens=32, block_vocab=64)


@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1, smoothing="t5x", z_loss=1e-3, softcap=4.0),
], ids=["plain", "all_options"])
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
