"""Tests of the scatter / top-k / segment-sum TPU kernels of ``pallas_kernels.vq.tpu``.

On CPU the kernels run with ``interpret=True`` on ragged shapes (21 = 2*8 + 5
tokens, 300 = 2*128 + 44 vocabulary entries, 9 codes of which one is empty)
against float64 numpy references written from the formulas, and against the
XLA forms of ``logitlab`` (``vq_scatter``, ``vq_segment_sum``, ``vq_top_k``).
Most inputs lie on a coarse grid (multiples of 1/4 and 1/8), so that every
float32 sum is exact and many tokens share a logit: the top-k tie rule (lower
token id first) is checked exactly. ``jax.export`` for ``tpu`` checks that each
kernel lowers to Mosaic without a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import logitlab
from pallas_kernels.vq import tpu

N, V, K = 21, 300, 9
EMPTY_CODE = 4
F32, BF16 = jnp.float32, jnp.bfloat16
BLOCKS = [(8, 128), (N, V), (None, None)]   # ragged tiles, exact cover, defaults (cover)


def make_case(seed, grid=True):
  """float64 numpy ``z[N, K]``, ``m[V]`` (code 4 empty), ``b[V]``, ``shift[N]``."""
  rng = np.random.default_rng(seed)
  m = rng.integers(0, K, size=V)
  m[m == EMPTY_CODE] = EMPTY_CODE + 1
  if grid:
    z = rng.integers(-12, 12, size=(N, K)) / 4
    b = rng.integers(-6, 6, size=V) / 8
  else:
    z = rng.normal(size=(N, K)) * 2
    b = rng.normal(size=V) * 0.5
  shift = rng.normal(size=N).astype(np.float32).astype(np.float64)
  return z, m, b, shift


def j32(x):
  return None if x is None else jnp.asarray(x, F32)


def blocks(b):
  return dict(block_tokens=b[0], block_vocab=b[1])


def ref_scatter(z, m, b, shift):
  out = z[:, m]
  if b is not None:
    out = out + b
  if shift is not None:
    out = out - shift[:, None]
  return out


def ref_top_k(logits, k):
  """Descending, ties to the lower token id (a stable sort of the negated logits)."""
  ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(logits, ids, axis=1), ids


def ref_segment_sum(p, m, num_codes):
  out = np.zeros((p.shape[0], num_codes))
  np.add.at(out.T, m, p.T)
  return out


# --------------------------------------------------------------------------- scatter_logits

@pytest.mark.parametrize("blk", BLOCKS + [(16, 256)])
@pytest.mark.parametrize("with_bias, with_shift", [(True, True), (False, False)])
def test_scatter_logits_matches_references(blk, with_bias, with_shift):
  z, m, b, shift = make_case(0, grid=blk != (16, 256))
  b = b if with_bias else None
  shift = shift if with_shift else None
  out = tpu.scatter_logits(j32(z), jnp.asarray(m), j32(b), j32(shift), interpret=True,
                           **blocks(blk))
  assert out.shape == (N, V) and out.dtype == F32
  np.testing.assert_allclose(out, ref_scatter(z, m, b, shift), rtol=1e-6, atol=1e-6)
  xla = logitlab.vq_scatter(j32(z), jnp.asarray(m), j32(b))
  if shift is not None:
    xla = xla - j32(shift)[:, None]
  np.testing.assert_array_equal(out, xla)


@pytest.mark.parametrize("with_bias, with_shift", [(True, False), (False, True)])
def test_scatter_logits_bias_or_shift_alone(with_bias, with_shift):
  z, m, b, shift = make_case(1)
  b = b if with_bias else None
  shift = shift if with_shift else None
  out = tpu.scatter_logits(j32(z), jnp.asarray(m), j32(b), j32(shift), interpret=True,
                           block_tokens=16, block_vocab=256)
  np.testing.assert_allclose(out, ref_scatter(z, m, b, shift), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_scatter_logits_non_finite_code_logits_stay_on_their_tokens(dtype):
  z, m, b, shift = make_case(2)
  z[0, 1] = -np.inf
  z[1, 2] = np.inf
  z[2, 3] = np.nan
  z[3, :] = -np.inf                 # a whole row
  z[4, 5] = np.nan
  z[4, 6] = np.inf
  out = tpu.scatter_logits(jnp.asarray(z, dtype), jnp.asarray(m), j32(b), j32(shift),
                           out_dtype=F32, block_tokens=8, block_vocab=128, interpret=True)
  z32 = z.astype(np.float32)
  ref = (z32[:, m] + b.astype(np.float32)) - shift.astype(np.float32)[:, None]
  np.testing.assert_array_equal(out, ref)          # NaN exactly where the reference has NaN
  assert np.isnan(np.asarray(out)).sum() == np.isin(m, [3]).sum() + np.isin(m, [5]).sum()
  xla = logitlab.vq_scatter(jnp.asarray(z, dtype).astype(F32), jnp.asarray(m), j32(b))
  np.testing.assert_array_equal(out, xla - j32(shift)[:, None])


def test_scatter_logits_bf16_and_out_dtype():
  z, m, b, _ = make_case(3, grid=False)
  zb = jnp.asarray(z, BF16)
  zb32 = np.asarray(zb.astype(F32), np.float64)
  out = tpu.scatter_logits(zb, jnp.asarray(m), j32(b), None, block_tokens=8, block_vocab=128,
                           interpret=True)
  assert out.dtype == BF16                         # the default: code_logits.dtype
  exact = (zb32[:, m] + b.astype(np.float32)).astype(np.float32)
  np.testing.assert_array_equal(out, jnp.asarray(exact).astype(BF16))
  out32 = tpu.scatter_logits(zb, jnp.asarray(m), j32(b), None, out_dtype=F32, interpret=True)
  assert out32.dtype == F32
  np.testing.assert_array_equal(out32, exact)
  np.testing.assert_array_equal(logitlab.vq_scatter(zb, jnp.asarray(m)),
                                tpu.scatter_logits(zb, jnp.asarray(m), None, None, interpret=True))
  down = tpu.scatter_logits(j32(z), jnp.asarray(m), None, None, out_dtype=BF16, interpret=True)
  assert down.dtype == BF16
  np.testing.assert_array_equal(down, j32(z)[:, m].astype(BF16))


# --------------------------------------------------------------------------- scatter_top_k

@pytest.mark.parametrize("k, with_bias, blk", [
    (1, True, (8, 128)),
    (5, False, (8, 128)),        # no bias: every token of a code ties
    (5, True, (16, 256)),
    (5, True, (None, None)),
    (130, True, (8, 128)),       # k > block_vocab: the first tiles leave empty slots
    (V, True, (8, 128)),         # a full sort
    (V, False, (N, V)),
])
def test_scatter_top_k_matches_references(k, with_bias, blk):
  z, m, b, _ = make_case(4)
  b = b if with_bias else None
  vals, ids = tpu.scatter_top_k(j32(z), jnp.asarray(m), j32(b), k=k, interpret=True,
                                **blocks(blk))
  assert vals.shape == ids.shape == (N, k) and vals.dtype == F32 and ids.dtype == jnp.int32
  ref_vals, ref_ids = ref_top_k(ref_scatter(z, m, b, None), k)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)
  xla_vals, xla_ids = logitlab.vq_top_k(j32(z), jnp.asarray(m), j32(b), k)
  np.testing.assert_array_equal(ids, xla_ids)
  np.testing.assert_array_equal(vals, xla_vals)


@pytest.mark.parametrize("order", [1, -1])
def test_scatter_top_k_monotone_bias(order):
  """Descending bias: after the first tile no tile merges (the skip path); ascending: all do."""
  z, m, _, _ = make_case(5)
  b = -order * np.arange(V) / 64
  vals, ids = tpu.scatter_top_k(j32(z), jnp.asarray(m), j32(b), k=5, block_tokens=8,
                                block_vocab=128, interpret=True)
  ref_vals, ref_ids = ref_top_k(ref_scatter(z, m, b, None), 5)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(vals, ref_vals, rtol=1e-6)


@pytest.mark.parametrize("k", [5, V])
def test_scatter_top_k_with_minus_inf_logits(k):
  z, m, b, _ = make_case(6)
  z[:, 2] = -np.inf                 # a whole code
  z[0, :] = -np.inf                 # a whole row: every logit -inf
  z[1, 3] = -np.inf
  b[::7] = -np.inf                  # -inf bias on some tokens
  vals, ids = tpu.scatter_top_k(j32(z), jnp.asarray(m), j32(b), k=k, block_tokens=8,
                                block_vocab=128, interpret=True)
  ref_vals, ref_ids = ref_top_k(ref_scatter(z, m, b, None), k)
  np.testing.assert_array_equal(vals, ref_vals)
  # -inf tokens also come in increasing id (the order of lax.top_k).
  np.testing.assert_array_equal(ids, ref_ids)
  assert np.all(np.asarray(ids)[0] == np.arange(k))


def test_scatter_top_k_nan_and_inf_match_lax_top_k():
  z, m, b, _ = make_case(7, grid=False)
  z[2, 3] = np.nan
  z[3, 4 + 1] = np.inf
  z[5, :] = np.nan
  z[6, 1] = -np.inf
  logits = jnp.take(j32(z), jnp.asarray(m), axis=1) + j32(b)
  for k in (7, V):
    vals, ids = tpu.scatter_top_k(j32(z), jnp.asarray(m), j32(b), k=k, block_tokens=8,
                                  block_vocab=128, interpret=True)
    ref_vals, ref_ids = jax.lax.top_k(logits, k)
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(ids, ref_ids)


def test_scatter_top_k_bf16():
  z, m, b, _ = make_case(8, grid=False)
  zb = jnp.asarray(z, BF16)
  vals, ids = tpu.scatter_top_k(zb, jnp.asarray(m), j32(b), k=5, block_tokens=16,
                                block_vocab=128, interpret=True)
  ref_vals, ref_ids = jax.lax.top_k(jnp.take(zb.astype(F32), jnp.asarray(m), axis=1) + j32(b), 5)
  np.testing.assert_array_equal(vals, ref_vals)
  np.testing.assert_array_equal(ids, ref_ids)


# --------------------------------------------------------------------------- segment_sum

@pytest.mark.parametrize("blk", BLOCKS + [(16, 256)])
def test_segment_sum_matches_references(blk):
  _, m, _, _ = make_case(9)
  p = np.random.default_rng(10).dirichlet(np.ones(V), size=N)
  out = tpu.segment_sum(j32(p), jnp.asarray(m), num_codes=K, interpret=True, **blocks(blk))
  assert out.shape == (N, K) and out.dtype == F32
  np.testing.assert_allclose(out, ref_segment_sum(p, m, K), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out, logitlab.vq_segment_sum(j32(p), jnp.asarray(m), K),
                             rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(out)[:, EMPTY_CODE] == 0)


def test_segment_sum_bf16():
  _, m, _, _ = make_case(11)
  pb = jnp.asarray(np.random.default_rng(12).normal(size=(N, V)), BF16)
  out = tpu.segment_sum(pb, jnp.asarray(m), num_codes=K, block_tokens=8, block_vocab=128,
                        interpret=True)
  assert out.dtype == F32
  p64 = np.asarray(pb.astype(F32), np.float64)
  np.testing.assert_allclose(out, ref_segment_sum(p64, m, K), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, logitlab.vq_segment_sum(pb, jnp.asarray(m), K),
                             rtol=1e-5, atol=1e-5)


def test_segment_sum_nan_poisons_only_its_row():
  _, m, _, _ = make_case(13)
  p = np.random.default_rng(14).random((N, V))
  p[3, 7] = np.nan
  out = np.asarray(tpu.segment_sum(j32(p), jnp.asarray(m), num_codes=K, block_tokens=8,
                                   block_vocab=128, interpret=True))
  assert np.all(np.isnan(out[3]))
  rest = np.arange(N) != 3
  np.testing.assert_allclose(out[rest], ref_segment_sum(p[rest], m, K), rtol=1e-5)


# --------------------------------------------------------------------------- validation

def _validation_cases():
  z, m, b, shift = make_case(15)
  z, m, b, shift = j32(z), jnp.asarray(m), j32(b), j32(shift)
  p = jnp.ones((N, V), F32)
  sl, tk, ss = tpu.scatter_logits, tpu.scatter_top_k, tpu.segment_sum
  return [
      (lambda: sl(z.astype(jnp.int32), m, b, shift), "code_logits"),
      (lambda: sl(z.astype(jnp.float16), m, b, shift), "code_logits"),
      (lambda: sl(z[0], m, b, shift), "code_logits"),
      (lambda: sl(z, m.astype(F32), b, shift), "assignment"),
      (lambda: sl(z, m[None], b, shift), "assignment"),
      (lambda: sl(z, m, b[:-1], shift), "token_bias"),
      (lambda: sl(z, m, b, shift[:-1]), "shift"),
      (lambda: sl(z, m, b, shift, out_dtype=jnp.int32), "out_dtype"),
      (lambda: sl(z, m, b, shift, block_vocab=100), "block_vocab"),
      (lambda: sl(z, m, b, shift, block_tokens=12), "block_tokens"),
      (lambda: tk(z, m, b, k=0), "k"),
      (lambda: tk(z, m, b, k=V + 1), "k"),
      (lambda: tk(z, m, b, k=2.0), "k"),
      (lambda: tk(z, m, b, k=True), "k"),
      (lambda: tk(z, m, b[:5], k=1), "token_bias"),
      (lambda: tk(z.astype(jnp.int32), m, b, k=1), "code_logits"),
      (lambda: tk(z, m, b, k=1, block_vocab=200), "block_vocab"),
      (lambda: ss(p, m, num_codes=0), "num_codes"),
      (lambda: ss(p, m, num_codes=2.5), "num_codes"),
      (lambda: ss(p[:, :-1], m, num_codes=K), "probs"),
      (lambda: ss(p[None], m, num_codes=K), "probs"),
      (lambda: ss(p.astype(jnp.float16), m, num_codes=K), "probs"),
      (lambda: ss(p, m.astype(F32), num_codes=K), "assignment"),
  ]


def test_validation_errors_name_the_argument():
  for call, name in _validation_cases():
    with pytest.raises(ValueError, match=name):
      call()


def test_empty_token_axis():
  _, m, b, _ = make_case(16)
  z = jnp.zeros((0, K), F32)
  assert tpu.scatter_logits(z, jnp.asarray(m), j32(b), None).shape == (0, V)
  vals, ids = tpu.scatter_top_k(z, jnp.asarray(m), None, k=3)
  assert vals.shape == ids.shape == (0, 3)
  assert tpu.segment_sum(jnp.zeros((0, V)), jnp.asarray(m), num_codes=K).shape == (0, K)


# --------------------------------------------------------------------------- cross-lowering

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("kernel", ["scatter_logits", "scatter_top_k", "segment_sum"])
def test_kernels_cross_lower_to_mosaic(kernel, dtype):
  n, v, k = 1000, 5000, 256                # ragged against the default 256 x 512 tiles
  s = jax.ShapeDtypeStruct
  codes, row = s((v,), jnp.int32), s((v,), F32)
  if kernel == "scatter_logits":
    f = lambda z, m, b, sh: tpu.scatter_logits(z, m, b, sh)
    args, shapes = (s((n, k), dtype), codes, row, s((n,), F32)), [(n, v)]
  elif kernel == "scatter_top_k":
    f = lambda z, m, b: tpu.scatter_top_k(z, m, b, k=50)
    args, shapes = (s((n, k), dtype), codes, row), [(n, 50), (n, 50)]
  else:
    f = lambda p, m: tpu.segment_sum(p, m, num_codes=k)
    args, shapes = (s((n, v), dtype), codes), [(n, k)]
  exported = export.export(jax.jit(f), platforms=["tpu"])(*args)
  assert exported.mlir_module().count("tpu_custom_call") == 1
  assert [o.shape for o in exported.out_avals] == shapes
