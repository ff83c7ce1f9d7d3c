"""Tests of the Triton VQ-Logits kernels ``scatter_logits``, ``scatter_top_k``, ``segment_sum``.

On CPU the kernels run with ``interpret=True`` at small ragged shapes (``N = 21``
tokens, ``V = 300`` vocabulary tokens, ``K = 40`` codes, one of them empty)
against float64 NumPy references written from the formulas and against the XLA
forms of ``logitlab``; each kernel is also cross-lowered for ``cuda`` with
``jax.export`` at a larger ragged shape, so a kernel that does not lower to
Triton fails here without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import logitlab
from pallas_kernels.vq import gpu

N, V, K = 21, 300, 40     # 21 = 16 + 5 rows, 300 = 2 * 128 + 44 tokens, 40 = 2 * 16 + 8 codes
EMPTY_CODE = 7
SMALL = dict(block_tokens=16, block_vocab=16)   # ragged last tiles on both axes


def make_case(seed=0, dtype=jnp.float32, tied_bias=False):
  """Code logits, an assignment with an empty code, a bias and a shift (float32 but ``z``)."""
  rng = np.random.default_rng(seed)
  m = rng.integers(0, K, size=V)
  m[m == EMPTY_CODE] = EMPTY_CODE + 1
  z = jnp.asarray(rng.normal(size=(N, K)) * 2, jnp.float32).astype(dtype)
  if tied_bias:   # a few distinct values: tokens of one code still tie
    bias = rng.integers(-2, 3, size=V) * 0.25
  else:
    bias = rng.normal(size=V) * 0.5
  return dict(z=z, m=jnp.asarray(m, jnp.int32), bias=jnp.asarray(bias, jnp.float32),
              shift=jnp.asarray(rng.normal(size=N), jnp.float32))


def f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# --------------------------------------------------------------------------- scatter_logits

def scatter_reference(z, m, bias=None, shift=None):
  """``z[n, m(v)] + b[v] - shift[n]`` in float64."""
  out = np.take(f64(z), np.asarray(m), axis=1)
  if bias is not None:
    out = out + f64(bias)[None, :]
  if shift is not None:
    out = out - f64(shift)[:, None]
  return out


@pytest.mark.parametrize("with_bias, with_shift", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("blocks", [{}, SMALL])
def test_scatter_logits_matches_references(with_bias, with_shift, blocks):
  c = make_case(1)
  bias = c["bias"] if with_bias else None
  shift = c["shift"] if with_shift else None
  out = gpu.scatter_logits(c["z"], c["m"], bias, shift, interpret=True, **blocks)
  assert out.shape == (N, V) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, scatter_reference(c["z"], c["m"], bias, shift), rtol=1e-6,
                             atol=1e-6)
  xla = logitlab.vq_scatter(c["z"], c["m"], bias)
  if shift is not None:
    xla = xla - shift[:, None]
  np.testing.assert_array_equal(out, xla)


@pytest.mark.parametrize("dtype, out_dtype", [(jnp.bfloat16, None), (jnp.float16, jnp.float32),
                                              (jnp.float32, jnp.bfloat16)])
def test_scatter_logits_16bit_and_out_dtype(dtype, out_dtype):
  c = make_case(2, dtype=dtype)
  out = gpu.scatter_logits(c["z"], c["m"], c["bias"], c["shift"], out_dtype=out_dtype,
                           interpret=True)
  expected_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  assert out.dtype == expected_dtype
  # The kernel's float32 arithmetic, ((z + b) - shift), rounded once to the output dtype.
  f32 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32))
  logits = np.take(f32(c["z"]), np.asarray(c["m"]), axis=1) + f32(c["bias"])
  ref = logits - f32(c["shift"])[:, None]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(ref).astype(out.dtype)))
  np.testing.assert_allclose(np.asarray(out, np.float64),
                             scatter_reference(c["z"], c["m"], c["bias"], c["shift"]),
                             rtol=1e-2 if out.dtype.itemsize == 2 else 1e-6, atol=1e-2)


def test_scatter_logits_non_finite_code_logits_stay_on_their_tokens():
  c = make_case(3)
  z = np.array(c["z"])
  z[0, 3], z[5, 11], z[20, 39], z[9, :] = -np.inf, np.inf, np.nan, -np.inf
  out = gpu.scatter_logits(jnp.asarray(z), c["m"], c["bias"], c["shift"], interpret=True,
                           **SMALL)
  ref = scatter_reference(z, c["m"], c["bias"], c["shift"])
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)   # NaN where ref is NaN only
  assert np.isnan(np.asarray(out)).sum() == np.sum(np.asarray(c["m"]) == 39)


# --------------------------------------------------------------------------- scatter_top_k

def top_k_reference(z, m, bias, k):
  """Descending, ties to the lower id: a stable argsort of the float32 logits (exact ties)."""
  logits = np.take(np.asarray(jnp.asarray(z).astype(jnp.float32)), np.asarray(m), axis=1)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float32)[None, :]
  ids = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :k]
  return np.take_along_axis(logits, ids, axis=1), ids


@pytest.mark.parametrize("k, with_bias, blocks", [
    (1, True, {}), (5, False, {}), (5, True, SMALL), (V, False, {}), (V, True, {}),
])
def test_scatter_top_k_matches_references(k, with_bias, blocks):
  c = make_case(4, tied_bias=True)
  bias = c["bias"] if with_bias else None
  vals, ids = gpu.scatter_top_k(c["z"], c["m"], bias, k=k, interpret=True, **blocks)
  assert vals.shape == ids.shape == (N, k)
  assert vals.dtype == jnp.float32 and ids.dtype == jnp.int32
  ref_vals, ref_ids = top_k_reference(c["z"], c["m"], bias, k)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)
  xla_vals, xla_ids = logitlab.vq_top_k(c["z"], c["m"], bias, k)
  np.testing.assert_array_equal(ids, xla_ids)
  np.testing.assert_array_equal(vals, xla_vals)


def test_scatter_top_k_has_ties():
  """The data of the test above: many exact ties (the tie-break is exercised)."""
  c = make_case(4, tied_bias=True)
  for bias in (None, c["bias"]):
    vals, _ = top_k_reference(c["z"], c["m"], bias, V)
    assert np.sum(vals[:, 1:] == vals[:, :-1]) > N * 50


def test_scatter_top_k_16bit():
  c = make_case(5, dtype=jnp.bfloat16)
  vals, ids = gpu.scatter_top_k(c["z"], c["m"], c["bias"], k=5, interpret=True, **SMALL)
  ref_vals, ref_ids = top_k_reference(c["z"], c["m"], c["bias"], 5)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)
  np.testing.assert_array_equal(ids, logitlab.vq_top_k(c["z"], c["m"], c["bias"], 5)[1])


def test_scatter_top_k_non_finite_follows_lax_top_k():
  """-inf, +inf and NaN logits are ranked as ``lax.top_k`` ranks them (NaN first)."""
  c = make_case(6)
  z = np.array(c["z"])
  z[2, :] = -np.inf                  # a row of -inf: the bias orders it
  z[3, 5], z[4, 6] = np.inf, np.nan
  bias = np.array(c["bias"])
  bias[::3] = -np.inf                # a third of the tokens can never be drawn
  z, bias = jnp.asarray(z), jnp.asarray(bias)
  for k in (5, 120):
    vals, ids = gpu.scatter_top_k(z, c["m"], bias, k=k, interpret=True, **SMALL)
    ref_vals, ref_ids = jax.lax.top_k(z[:, c["m"]] + bias, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(vals, ref_vals)   # NaN == NaN here
  assert np.isnan(np.asarray(vals)[4, 0]) and np.asarray(vals)[3, 0] == np.inf


# --------------------------------------------------------------------------- segment_sum

def segment_sum_reference(probs, m, num_codes):
  out = np.zeros((num_codes, probs.shape[0]))
  np.add.at(out, np.asarray(m), f64(probs).T)
  return out.T


@pytest.mark.parametrize("blocks", [{}, dict(block_tokens=16, block_vocab=16, block_codes=16)])
def test_segment_sum_matches_references(blocks):
  c = make_case(7)
  probs = jax.nn.softmax(c["z"][:, c["m"]] + c["bias"], axis=-1)
  out = gpu.segment_sum(probs, c["m"], num_codes=K, interpret=True, **blocks)
  assert out.shape == (N, K) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, segment_sum_reference(probs, c["m"], K), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(out, logitlab.vq_segment_sum(probs, c["m"], K), rtol=1e-6,
                             atol=1e-7)
  assert np.all(np.asarray(out)[:, EMPTY_CODE] == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_segment_sum_16bit(dtype):
  c = make_case(8)
  probs = jax.nn.softmax(c["z"][:, c["m"]], axis=-1).astype(dtype)
  out = gpu.segment_sum(probs, c["m"], num_codes=K, block_codes=16, interpret=True)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, segment_sum_reference(probs, c["m"], K), rtol=1e-6,
                             atol=1e-7)
  assert np.all(np.asarray(out)[:, EMPTY_CODE] == 0)


def test_segment_sum_is_the_transpose_of_scatter():
  """<scatter(z), p> = <z, segment_sum(p)>."""
  c = make_case(9)
  p = jnp.asarray(np.random.default_rng(10).normal(size=(N, V)), jnp.float32)
  lhs = jnp.sum(gpu.scatter_logits(c["z"], c["m"], None, None, interpret=True) * p)
  rhs = jnp.sum(c["z"] * gpu.segment_sum(p, c["m"], num_codes=K, interpret=True))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_shapes_smaller_than_one_block():
  """N = 1, V = 3, K = 2: every axis below the minimum block of 16 (the logitlab examples)."""
  z, m, b = jnp.array([[0.0, 1.0]]), jnp.array([1, 0, 1]), jnp.array([0.0, 0.0, 0.5])
  assert gpu.scatter_logits(z, m, b, None, interpret=True).tolist() == [[1.0, 0.0, 1.5]]
  vals, ids = gpu.scatter_top_k(z, m, b, k=3, interpret=True)
  assert vals.tolist() == [[1.5, 1.0, 0.0]] and ids.tolist() == [[2, 0, 1]]
  probs = jnp.array([[0.5, 0.25, 0.25]])
  assert gpu.segment_sum(probs, m, num_codes=3, interpret=True).tolist() == [[0.25, 0.75, 0.0]]


# --------------------------------------------------------------------------- validation

def _bad_calls():
  c = make_case(11)
  z, m, b, s = c["z"], c["m"], c["bias"], c["shift"]
  p = jnp.zeros((N, V), jnp.float32)
  return [
      ("code_logits", lambda: gpu.scatter_logits(z.astype(jnp.int32), m, b, s)),
      ("code_logits", lambda: gpu.scatter_logits(z[0], m, b, s)),
      ("assignment", lambda: gpu.scatter_logits(z, m.astype(jnp.float32), b, s)),
      ("assignment", lambda: gpu.scatter_logits(z, m[None], b, s)),
      ("token_bias", lambda: gpu.scatter_logits(z, m, b[:-1], s)),
      ("shift", lambda: gpu.scatter_logits(z, m, b, s[:-1])),
      ("out_dtype", lambda: gpu.scatter_logits(z, m, b, s, out_dtype=jnp.int32)),
      ("block_vocab", lambda: gpu.scatter_logits(z, m, b, s, block_vocab=100)),
      ("block_tokens", lambda: gpu.scatter_logits(z, m, b, s, block_tokens=8)),
      ("k", lambda: gpu.scatter_top_k(z, m, b, k=0)),
      ("k", lambda: gpu.scatter_top_k(z, m, b, k=V + 1)),
      ("k", lambda: gpu.scatter_top_k(z, m, b, k=2.0)),
      ("token_bias", lambda: gpu.scatter_top_k(z, m, b[None], k=1)),
      ("block_vocab", lambda: gpu.scatter_top_k(z, m, b, k=1, block_vocab=48)),
      ("probs", lambda: gpu.segment_sum(p[0], m, num_codes=K)),
      ("probs", lambda: gpu.segment_sum(p.astype(jnp.int8), m, num_codes=K)),
      ("assignment", lambda: gpu.segment_sum(p, m[:-1], num_codes=K)),
      ("num_codes", lambda: gpu.segment_sum(p, m, num_codes=0)),
      ("num_codes", lambda: gpu.segment_sum(p, m, num_codes=True)),
      ("block_codes", lambda: gpu.segment_sum(p, m, num_codes=K, block_codes=24)),
  ]


def test_validation_errors_name_the_argument():
  for name, call in _bad_calls():
    with pytest.raises(ValueError, match=name):
      call()


# --------------------------------------------------------------------------- cross-lowering

def _export_cuda(f, *specs):
  exported = export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
  assert exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton(") == 1
  return exported


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_cross_lower_to_triton(dtype):
  n, v, k = 1000, 5000, 300                      # ragged against every default block
  s = jax.ShapeDtypeStruct
  z, m, b, shift = s((n, k), dtype), s((v,), jnp.int32), s((v,), jnp.float32), s((n,), jnp.float32)
  out = _export_cuda(lambda z, m, b, sh: gpu.scatter_logits(z, m, b, sh), z, m, b, shift)
  assert [(o.shape, o.dtype) for o in out.out_avals] == [((n, v), dtype)]
  out = _export_cuda(lambda z, m, b: gpu.scatter_top_k(z, m, b, k=50), z, m, b)
  assert [(o.shape, o.dtype) for o in out.out_avals] == [((n, 50), jnp.float32),
                                                         ((n, 50), jnp.int32)]
  out = _export_cuda(lambda p, m: gpu.segment_sum(p, m, num_codes=k), s((n, v), dtype), m)
  assert [(o.shape, o.dtype) for o in out.out_avals] == [((n, k), jnp.float32)]
