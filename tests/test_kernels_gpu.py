"""Triton-Pallas kernels of the fused linear cross-entropy, run in interpret mode on CPU.

Values are compared with a float64 numpy reference of the kernel contract; the
kernels are also cross-lowered for ``cuda`` so one that cannot be compiled for
a GPU fails here without one.
"""

import math
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels.linear_cross_entropy import gpu

SMALL_BLOCKS = dict(block_tokens=16, block_vocab=32, block_d=16)


# ---------------------------------------------------------------- references

def _f64(x):
  return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _ref_logits(hidden, weight, bias, softcap):
  z = _f64(hidden) @ _f64(weight).T
  if bias is not None:
    z = z + _f64(bias)
  return z if softcap is None else softcap * np.tanh(z / softcap)


def ref_forward(hidden, weight, bias, labels, *, softcap):
  """Float64 ``(lse, label_logit, logit_sum)`` of the contract."""
  z = _ref_logits(hidden, weight, bias, softcap)
  top = z.max(axis=1)
  lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
  labels = np.asarray(labels)
  in_range = (labels >= 0) & (labels < z.shape[1])
  label_logit = np.where(in_range, z[np.arange(len(labels)), np.clip(labels, 0, z.shape[1] - 1)],
                         0.0)
  return lse, label_logit, z.sum(axis=1)


def _ref_tiles(shape, block_tokens, block_vocab):
  """Slices of the (token tile, vocabulary tile) blocks of an ``[N, V]`` array."""
  return [(slice(r, r + block_tokens), slice(c, c + block_vocab))
          for r in range(0, shape[0], block_tokens) for c in range(0, shape[1], block_vocab)]


def ref_backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off, z_loss,
                 softcap, filter_eps, block_tokens, block_vocab, unscaled_only=False):
  """Float64 ``(d_hidden, d_weight, d_bias)`` of the contract, filtering per tile.

  With ``unscaled_only``, returns the filter's ``|(1 + 2 z_loss lse) p - target|``
  (0 on invalid rows) instead.
  """
  valid = np.asarray(valid)[:, None]
  h = np.where(valid, _f64(hidden), 0.0)
  z = _ref_logits(h, weight, bias, softcap)
  lse, d_loss, p_scale = (np.where(valid[:, 0], _f64(x), 0.0) for x in (lse, d_loss, p_scale))
  probs = np.exp(z - lse[:, None])
  target = on * (np.arange(z.shape[1]) == np.asarray(labels)[:, None]) + off
  unscaled = np.where(valid, np.abs((1 + 2 * z_loss * lse)[:, None] * probs - target), 0.0)
  if unscaled_only:
    return unscaled
  g = p_scale[:, None] * probs - d_loss[:, None] * target
  if softcap is not None:
    g = g * (1.0 - (z / softcap) ** 2)
  g = np.where(valid, g, 0.0)
  if filter_eps is not None:
    for tile in _ref_tiles(g.shape, block_tokens, block_vocab):
      if unscaled[tile].max() < filter_eps:
        g[tile] = 0.0
  d_bias = None if bias is None else g.sum(axis=0)
  return g @ _f64(weight), g.T @ h, d_bias


def naive_backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off,
                   softcap):
  """The materialized computation done in the inputs' low precision (tolerance baseline)."""
  dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  z = jnp.dot(jnp.where(valid[:, None], hidden, 0), weight.T)
  if bias is not None:
    z = z + bias.astype(dtype)
  if softcap is not None:
    z = softcap * jnp.tanh(z / softcap)
  target = jnp.where(jnp.arange(z.shape[1]) == labels[:, None], on + off, off).astype(dtype)
  g = (p_scale[:, None].astype(dtype) * jnp.exp(z - lse[:, None].astype(dtype))
       - d_loss[:, None].astype(dtype) * target)
  if softcap is not None:
    g = g * (1 - jnp.square(z / softcap))
  g = jnp.where(valid[:, None], g, 0).astype(dtype)
  d_bias = None if bias is None else jnp.sum(g, axis=0)
  return g @ weight, g.T @ jnp.where(valid[:, None], hidden, 0), d_bias


def assert_close(name, actual, ref, *, tol, naive=None):
  """``|ref - actual| <= |ref - naive| + tol * max|ref|`` elementwise (naive: 0 if absent)."""
  actual = _f64(actual)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  bound = tol * max(np.abs(ref).max(), 1e-30)
  if naive is not None:
    bound = bound + np.abs(ref - _f64(naive))
  err = np.abs(actual - ref)
  assert np.all(err <= bound), f"{name}: max error {err.max():.3g}, max |ref| {np.abs(ref).max():.3g}"


# -------------------------------------------------------------------- inputs

def make_inputs(n, v, d, *, dtype=jnp.float32, weight_dtype=None, with_bias=True, z_loss=0.0,
                seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  hidden = jax.random.normal(ks[0], (n, d), jnp.float32).astype(dtype)
  weight = (2.0 / np.sqrt(d) * jax.random.normal(ks[1], (v, d))).astype(weight_dtype or dtype)
  bias = jax.random.normal(ks[2], (v,), jnp.float32) if with_bias else None
  labels = jax.random.randint(ks[3], (n,), 0, v, jnp.int32)
  # A few labels outside [0, V): no label logit, no one-hot target.
  labels = labels.at[:3].set(jnp.array([-1, v, v + 7], jnp.int32)[:n])
  valid = jax.random.bernoulli(ks[4], 0.8, (n,)).at[0].set(True)
  d_loss = jax.random.uniform(ks[5], (n,), minval=0.5, maxval=1.5)
  d_lse = jax.random.uniform(ks[6], (n,), minval=-0.2, maxval=0.2)
  return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, valid=valid,
              d_loss=d_loss, d_lse=d_lse, z_loss=z_loss)


def backward_args(inputs, lse):
  """Backward inputs as the custom_vjp would form them from the forward's ``lse``."""
  lse = jnp.asarray(lse, jnp.float32)
  p_scale = inputs["d_loss"] * (1 + 2 * inputs["z_loss"] * lse) + inputs["d_lse"]
  return dict(hidden=inputs["hidden"], weight=inputs["weight"], bias=inputs["bias"],
              labels=inputs["labels"], valid=inputs["valid"], lse=lse, d_loss=inputs["d_loss"],
              p_scale=p_scale)


# --------------------------------------------------------------------- tests

CASES = {
    # name: (N, V, D, dtype, weight dtype, bias, softcap, smoothing eps, z_loss)
    "ragged_f32": (52, 301, 40, jnp.float32, None, True, None, 0.1, 1e-3),
    "exact_f32_softcap": (64, 256, 32, jnp.float32, None, False, 5.0, 0.0, 0.0),
    "tiny_f32": (5, 3, 1, jnp.float32, None, True, 2.0, 0.2, 0.0),
    "ragged_bf16_softcap": (52, 301, 40, jnp.bfloat16, None, True, 3.0, 0.1, 1e-2),
    "ragged_f16": (52, 301, 40, jnp.float16, None, False, None, 0.0, 1e-3),
    "mixed_f16_bf16": (37, 97, 24, jnp.float16, jnp.bfloat16, True, None, 0.05, 0.0),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_reference(case):
  n, v, d, dtype, weight_dtype, with_bias, softcap, eps, z_loss = CASES[case]
  x = make_inputs(n, v, d, dtype=dtype, weight_dtype=weight_dtype, with_bias=with_bias,
                  z_loss=z_loss)
  with_logit_sum = eps > 0
  forward_tol = 1e-5
  lse, label_logit, logit_sum = gpu.forward(
      x["hidden"], x["weight"], x["bias"], x["labels"], softcap=softcap,
      with_logit_sum=with_logit_sum, interpret=True, **SMALL_BLOCKS)
  ref = ref_forward(x["hidden"], x["weight"], x["bias"], x["labels"], softcap=softcap)
  for name, got, want in zip(("lse", "label_logit"), (lse, label_logit), ref):
    assert got.dtype == jnp.float32 and got.shape == (n,)
    assert_close(name, got, want, tol=forward_tol)
  if with_logit_sum:
    assert_close("logit_sum", logit_sum, ref[2], tol=forward_tol)
  else:
    np.testing.assert_array_equal(logit_sum, np.zeros(n, np.float32))
  assert float(label_logit[0]) == 0.0 and float(label_logit[1]) == 0.0  # labels -1 and V

  args = backward_args(x, lse)
  smoothing = dict(on=1.0 - eps, off=eps / v, z_loss=z_loss, softcap=softcap)
  grads = gpu.backward(**args, **smoothing, filter_eps=None, interpret=True, **SMALL_BLOCKS)
  want = ref_backward(**args, **smoothing, filter_eps=None, block_tokens=16, block_vocab=32)
  naive = (naive_backward(**args, on=smoothing["on"], off=smoothing["off"], softcap=softcap)
           if jnp.promote_types(dtype, weight_dtype or dtype) != jnp.float32
           else (None, None, None))
  for name, got, ref_grad, naive_grad, like in zip(
      ("d_hidden", "d_weight", "d_bias"), grads, want, naive, (x["hidden"], x["weight"], None)):
    if ref_grad is None:
      assert got is None
      continue
    expected_dtype = jnp.float32 if like is None else like.dtype
    assert got.dtype == expected_dtype and got.shape == ref_grad.shape, name
    # The output's rounding: one ulp at the largest entry for 16-bit outputs.
    tol = float(jnp.finfo(got.dtype).eps) if jnp.dtype(got.dtype).itemsize == 2 else 1e-5
    assert_close(name, got, ref_grad, tol=tol, naive=naive_grad)
  invalid = ~np.asarray(x["valid"])
  np.testing.assert_array_equal(np.asarray(grads[0], np.float32)[invalid], 0.0)


def test_gradient_filtering():
  # A large z_loss, so that a filter that left out its (1 + 2 z_loss lse) factor fails.
  x = make_inputs(52, 301, 40, z_loss=0.1)
  lse = ref_forward(x["hidden"], x["weight"], x["bias"], x["labels"], softcap=None)[0]
  args = backward_args(x, lse)
  opts = dict(on=0.95, off=0.05 / 301, z_loss=0.1, softcap=None)
  run = lambda eps: gpu.backward(**args, **opts, filter_eps=eps, interpret=True, **SMALL_BLOCKS)
  reference = lambda eps, **kw: ref_backward(**args, **opts, filter_eps=eps, block_tokens=16,
                                             block_vocab=32, **kw)
  unfiltered = run(None)

  for got in run(1e9):
    np.testing.assert_array_equal(got, np.zeros_like(got))
  for got, want in zip(run(1e-30), unfiltered):
    np.testing.assert_array_equal(got, want)

  # A threshold in the widest gap between tile maxima (middle half): some tiles
  # are skipped, the others kept.
  unscaled = reference(None, unscaled_only=True)
  maxima = np.sort([unscaled[tile].max() for tile in _ref_tiles(unscaled.shape, 16, 32)])
  quarter = len(maxima) // 4
  k = quarter + int(np.argmax((np.diff(maxima) / maxima[1:])[quarter:-quarter]))
  eps = float(np.sqrt(maxima[k] * maxima[k + 1]))
  want = reference(eps)
  for name, got, ref_grad in zip(("d_hidden", "d_weight", "d_bias"), run(eps), want):
    assert_close(name, got, ref_grad, tol=1e-5)
  full = reference(None)
  assert np.abs(want[1] - full[1]).max() > 1e-3 * np.abs(full[1]).max()  # some skipped
  assert np.abs(want[1]).max() > 0  # some kept


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_invalid_rows_with_huge_values_give_zero_gradient(dtype):
  x = make_inputs(52, 301, 40, dtype=dtype)
  invalid = ~x["valid"]
  x["hidden"] = jnp.where(invalid[:, None], jnp.asarray(3e38, dtype), x["hidden"])
  lse, _, _ = gpu.forward(x["hidden"], x["weight"], x["bias"], x["labels"], softcap=None,
                          with_logit_sum=False, interpret=True, **SMALL_BLOCKS)
  assert not np.all(np.isfinite(np.asarray(lse)[np.asarray(invalid)]))
  args = backward_args(x, lse)
  args["d_loss"] = jnp.where(invalid, jnp.nan, args["d_loss"])
  args["p_scale"] = jnp.where(invalid, jnp.inf, args["p_scale"])
  opts = dict(on=0.9, off=0.1 / 301, z_loss=0.0, softcap=None)
  for filter_eps in (None, 1e-6):
    d_hidden, d_weight, d_bias = gpu.backward(**args, **opts, filter_eps=filter_eps,
                                              interpret=True, **SMALL_BLOCKS)
    np.testing.assert_array_equal(np.asarray(d_hidden, np.float32)[np.asarray(invalid)], 0.0)
    want = ref_backward(**args, **opts, filter_eps=None, block_tokens=16, block_vocab=32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_close("d_weight", d_weight, want[1], tol=tol)
    assert_close("d_bias", d_bias, want[2], tol=tol)


def _backward_grids(fn, *args):
  """The grid of each backward ``pallas_call`` that ``fn(*args)`` traces, in order."""
  eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  return [tuple(e.params["grid_mapping"].grid) for e in eqns if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("budget_tiles,slab_grids,filter_eps", [
    # A budget below one tile: one tile per slab.
    (1, [(4, 1)] * 10, None),
    # A ragged last slab (1 tile, 13 of its 32 columns in V); the filter skips
    # 15 of the 40 tiles.
    (3, [(4, 3)] * 3 + [(4, 1)], 0.1),
])
def test_backward_in_vocabulary_slabs(budget_tiles, slab_grids, filter_eps):
  # N=52, V=301, D=40 in 16 x 32 x 16 blocks: 4 token tiles, 10 vocabulary
  # tiles, and 32 * 48 * 4 bytes of float32 d_weight buffer per vocabulary tile.
  x = make_inputs(52, 301, 40, z_loss=1e-2)
  lse = ref_forward(x["hidden"], x["weight"], x["bias"], x["labels"], softcap=3.0)[0]
  args = backward_args(x, lse)
  opts = dict(on=0.9, off=0.1 / 301, z_loss=1e-2, softcap=3.0, filter_eps=filter_eps)
  budget = budget_tiles * 32 * 48 * 4 + 100
  run = lambda **kw: gpu.backward(**args, **opts, interpret=True, **SMALL_BLOCKS, **kw)
  assert _backward_grids(lambda: run(d_weight_buffer_bytes=budget)) == slab_grids
  assert _backward_grids(run) == [(4, 10)]  # the default budget: one slab

  got = run(d_weight_buffer_bytes=budget)
  want = ref_backward(**args, **opts, block_tokens=16, block_vocab=32)
  for name, grad, ref_grad in zip(("d_hidden", "d_weight", "d_bias"), got, want):
    assert_close(name, grad, ref_grad, tol=1e-5)
  # Interpret mode runs the programs in order, and slabs keep each buffer
  # entry's order of additions (token tiles, then vocabulary tiles, ascending).
  for grad, one_slab in zip(got, run()):
    np.testing.assert_array_equal(grad, one_slab)


def test_slab_vocab_tiles():
  tile = 128 * 2304 * 4  # Gemma-2-2B head, default blocks
  assert gpu.slab_vocab_tiles(2000, tile, gpu.D_WEIGHT_BUFFER_BYTES) == 56
  assert gpu.slab_vocab_tiles(10, 100, 1) == 1  # at least one tile
  assert gpu.slab_vocab_tiles(10, 100, 10**9) == 10  # never more than there are
  assert gpu.slab_vocab_tiles(10, 100, 900) == 5  # 9 fit: 5 + 5, not 9 + 1


def test_backward_float32_scratch_is_bounded_at_gemma_head():
  # Gemma-2-2B: V=256000, D=2304, bfloat16; 8192 tokens, default blocks.
  n, v, d = 8192, 256000, 2304

  def f(hidden, weight, bias, labels, valid, lse, d_loss, p_scale):
    return gpu.backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, on=0.9,
                        off=0.1 / v, z_loss=1e-4, softcap=30.0, filter_eps=2.0**-12)

  spec = jax.ShapeDtypeStruct
  per_token = spec((n,), jnp.float32)
  exported = export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          spec((n, d), jnp.bfloat16), spec((v, d), jnp.bfloat16), spec((v,), jnp.float32),
          spec((n,), jnp.int32), spec((n,), jnp.bool_), per_token, per_token, per_token)
  module = exported.mlir_module()
  f32_shapes = {tuple(int(k) for k in dims.split("x"))
                for dims in re.findall(r"tensor<(\d+(?:x\d+)*)xf32>", module)}
  too_big = {s for s in f32_shapes
             if 4 * math.prod(s) > gpu.D_WEIGHT_BUFFER_BYTES and s != (n, d)}  # d_hidden
  assert not too_big, too_big
  # 56 vocabulary tiles (7168 x 2304 float32, 63 MiB) a slab; 2000 tiles in 36 slabs,
  # the last of 40.
  assert {(7168, d), (5120, d)} <= f32_shapes
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton(") == 36


def _export_forward_backward(dtype, *, with_bias, softcap, filter_eps, shapes):
  """The StableHLO text of forward + backward (default blocks) exported for ``cuda``."""
  n, v, d = shapes

  def f(hidden, weight, bias, labels, valid):
    lse, label_logit, logit_sum = gpu.forward(hidden, weight, bias, labels, softcap=softcap,
                                              with_logit_sum=True)
    return gpu.backward(hidden, weight, bias, labels, valid, lse, label_logit, logit_sum,
                        on=0.9, off=0.1 / v, z_loss=1e-4, softcap=softcap,
                        filter_eps=filter_eps)

  specs = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype),
           jax.ShapeDtypeStruct((v,), jnp.float32) if with_bias else None,
           jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_))
  exported = export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
  return exported.mlir_module()


@pytest.mark.parametrize("dtype,with_bias,softcap,filter_eps,shapes", [
    (jnp.bfloat16, True, 30.0, 2.0**-12, (300, 5000, 200)),
    (jnp.float32, False, None, None, (300, 5000, 200)),
    (jnp.float16, True, None, 1e-6, (1, 1, 1)),
])
def test_cross_lowers_to_triton_for_cuda(dtype, with_bias, softcap, filter_eps, shapes):
  module = _export_forward_backward(dtype, with_bias=with_bias, softcap=softcap,
                                    filter_eps=filter_eps, shapes=shapes)
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton(") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("dtype", gpu.SUPPORTED_DTYPES)
def test_default_blocks_fit_a100_shared_memory(dtype):
  for kernel in ("forward", "backward"):
    used = gpu.smem_bytes(kernel, gpu.DEFAULT_BLOCK_TOKENS, gpu.DEFAULT_BLOCK_VOCAB,
                          gpu.default_block_d(dtype), dtype, gpu.NUM_STAGES)
    assert used <= gpu.SMEM_LIMIT_BYTES["A100"], (kernel, dtype, used)


def test_smem_bytes_counts_pipelined_operands_and_logit_tile():
  assert gpu.smem_bytes("forward", 64, 128, 64, jnp.bfloat16, 3) == 3 * 192 * 64 * 2 + 64 * 128 * 4
  assert (gpu.smem_bytes("backward", 64, 128, 64, jnp.bfloat16, 3)
          == 3 * 192 * 64 * 2 + 64 * 128 * (4 + 2))


def test_rejects_unsupported_dtypes_and_blocks():
  x = make_inputs(8, 16, 8)
  with pytest.raises(ValueError, match="int32"):
    gpu.forward(x["hidden"].astype(jnp.int32), x["weight"], None, x["labels"], softcap=None,
                with_logit_sum=False, interpret=True)
  with pytest.raises(ValueError, match="block_vocab"):
    gpu.forward(x["hidden"], x["weight"], None, x["labels"], softcap=None,
                with_logit_sum=False, block_vocab=48, interpret=True)
  with pytest.raises(ValueError, match="weight"):
    gpu.forward(x["hidden"], x["weight"][:, :4], None, x["labels"], softcap=None,
                with_logit_sum=False, interpret=True)
  with pytest.raises(ValueError, match="d_weight_buffer_bytes"):
    gpu.backward(x["hidden"], x["weight"], None, x["labels"], x["valid"], x["d_loss"],
                 x["d_loss"], x["d_loss"], on=1.0, off=0.0, z_loss=0.0, softcap=None,
                 filter_eps=None, interpret=True, d_weight_buffer_bytes=0)
