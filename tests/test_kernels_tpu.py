"""Tests of the TPU (Mosaic) Pallas kernels of fused linear cross-entropy.

The kernels run in the Pallas interpreter (``interpret=True``) against a float64
numpy reference written from the kernel contract, on ragged shapes (several
partial tiles along both axes) and exact tile multiples. Cross-lowering to TPU
(``jax.export`` with ``platforms=["tpu"]``) checks that the kernels lower to
Mosaic without a TPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_cross_entropy import tpu

F32, BF16 = jnp.float32, jnp.bfloat16
BLOCKS = dict(block_tokens=128, block_vocab=128)   # small tiles: ragged on both axes below
F32_TOL, BF16_TOL = 2e-5, 2e-2


# --------------------------------------------------------------------------- inputs and reference

class Case(NamedTuple):
  hidden: jax.Array       # [N, D]
  weight: jax.Array       # [V, D]
  bias: jax.Array | None  # [V]
  labels: jax.Array       # [N] int32, some outside [0, V)
  valid: jax.Array        # [N] bool
  d_loss: jax.Array       # [N] float32
  lse_cot: jax.Array      # [N] float32 cotangent of lse (it adds to p_scale)


def make_case(n, v, d, *, hidden_dtype=F32, weight_dtype=F32, bias=True, seed=0) -> Case:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, v, size=n)
  labels[::7] = v + 3            # out of range above
  labels[3::11] = -100           # and below
  return Case(
      hidden=jnp.asarray(rng.normal(size=(n, d)), hidden_dtype),
      weight=jnp.asarray(rng.normal(size=(v, d)) * 1.5 / np.sqrt(d), weight_dtype),
      bias=jnp.asarray(rng.normal(size=(v,)) * 0.5, weight_dtype) if bias else None,
      labels=jnp.asarray(labels, jnp.int32),
      valid=jnp.asarray(rng.random(n) > 0.2),
      d_loss=jnp.asarray(rng.uniform(0.2, 2.0, size=n), F32),
      lse_cot=jnp.asarray(rng.normal(size=n) * 0.3, F32))


def as64(x):
  return None if x is None else np.asarray(jnp.asarray(x, F32), np.float64)


def ref_logits(case: Case, softcap):
  z = as64(case.hidden) @ as64(case.weight).T
  if case.bias is not None:
    z = z + as64(case.bias)
  return softcap * np.tanh(z / softcap) if softcap else z


def ref_forward(case: Case, softcap):
  z = ref_logits(case, softcap)
  top = z.max(axis=1)
  lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
  labels = np.asarray(case.labels)
  in_range = (labels >= 0) & (labels < z.shape[1])
  label_logit = np.where(in_range, z[np.arange(len(z)), np.clip(labels, 0, z.shape[1] - 1)], 0.0)
  return lse, label_logit, z.sum(axis=1)


class Grad(NamedTuple):
  on: float = 1.0
  off: float = 0.0
  z_loss: float = 0.0
  softcap: float | None = None


def backward_args(case: Case, opt: Grad):
  """``lse``, ``d_loss`` and ``p_scale`` as a loss with z-loss would pass them (float32)."""
  lse = np.asarray(ref_forward(case, opt.softcap)[0], np.float32)
  d_loss = np.asarray(case.d_loss)
  p_scale = d_loss * (1.0 + 2.0 * opt.z_loss * lse) + np.asarray(case.lse_cot)
  return jnp.asarray(lse), case.d_loss, jnp.asarray(p_scale, F32)


def ref_backward(case: Case, opt: Grad, lse, d_loss, p_scale, *, filter_eps=None, blocks=None):
  """``(d_hidden, d_weight, d_bias, block statistics)`` of the contract in float64.

  With ``filter_eps``, every (block_tokens x block_vocab) block, tiled from 0,
  whose statistic is below it contributes nothing.
  """
  z = ref_logits(case, opt.softcap)
  n, v = z.shape
  lse, d_loss, p_scale = (as64(x)[:, None] for x in (lse, d_loss, p_scale))
  valid = np.asarray(case.valid)[:, None]
  p = np.exp(z - lse)
  target = opt.on * (np.arange(v)[None, :] == np.asarray(case.labels)[:, None]) + opt.off
  g = p_scale * p - d_loss * target
  if opt.softcap:
    g = g * (1.0 - (z / opt.softcap) ** 2)
  g = np.where(valid, g, 0.0)
  stat = np.where(valid, np.abs((1.0 + 2.0 * opt.z_loss * lse) * p - target), 0.0)
  block_stats = {}
  if blocks is not None:
    bn, bv = blocks
    for r in range(0, n, bn):
      for c in range(0, v, bv):
        block_stats[r, c] = stat[r:r + bn, c:c + bv].max()
        if filter_eps is not None and block_stats[r, c] < filter_eps:
          g[r:r + bn, c:c + bv] = 0.0
  d_bias = g.sum(axis=0) if case.bias is not None else None
  return g @ as64(case.weight), g.T @ as64(case.hidden), d_bias, block_stats


def assert_close(actual, expected, tol, name=""):
  actual = np.asarray(jnp.asarray(actual, F32), np.float64)
  assert np.all(np.isfinite(actual)), name
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def run_backward(case: Case, opt: Grad, *, filter_eps=None, **blocks):
  lse, d_loss, p_scale = backward_args(case, opt)
  grads = tpu.backward(case.hidden, case.weight, case.bias, case.labels, case.valid, lse, d_loss,
                       p_scale, on=opt.on, off=opt.off, z_loss=opt.z_loss, softcap=opt.softcap,
                       filter_eps=filter_eps, interpret=True, **blocks)
  return grads, (lse, d_loss, p_scale)


def check_backward(case: Case, opt: Grad, tol, *, filter_eps=None, **blocks):
  """Runs the backward against the reference; returns the gradients and the reference."""
  grads, args = run_backward(case, opt, filter_eps=filter_eps, **blocks)
  d_hidden, d_weight, d_bias = grads
  assert d_hidden.shape == case.hidden.shape and d_hidden.dtype == case.hidden.dtype
  assert d_weight.shape == case.weight.shape and d_weight.dtype == case.weight.dtype
  tiles = (blocks["block_tokens"], blocks["block_vocab"]) if blocks else None
  ref = ref_backward(case, opt, *args, filter_eps=filter_eps, blocks=tiles)
  assert_close(d_hidden, ref[0], tol, "d_hidden")
  assert_close(d_weight, ref[1], tol, "d_weight")
  if case.bias is None:
    assert d_bias is None
  else:
    assert d_bias.shape == case.bias.shape and d_bias.dtype == F32
    assert_close(d_bias, ref[2], tol, "d_bias")
  return grads, ref


# --------------------------------------------------------------------------- values

SMOOTH = Grad(on=0.9, off=0.1 / 301, z_loss=1e-3, softcap=4.0)

VALUE_CASES = {
    # name: (n, v, d, bias, grad options, with_logit_sum)
    "ragged_all_options": (200, 301, 40, True, SMOOTH, True),
    "ragged_plain": (200, 301, 40, False, Grad(), False),
    "exact_tiles_softcap": (256, 384, 32, True, Grad(softcap=3.0), False),
    "exact_tiles_smoothing": (256, 384, 32, False, Grad(on=0.95, off=0.05 / 383, z_loss=1e-2),
                              True),
}


@pytest.mark.parametrize("name", list(VALUE_CASES))
def test_forward_and_backward_match_reference(name):
  n, v, d, bias, opt, with_sum = VALUE_CASES[name]
  case = make_case(n, v, d, bias=bias)
  lse, label_logit, logit_sum = tpu.forward(
      case.hidden, case.weight, case.bias, case.labels, softcap=opt.softcap,
      with_logit_sum=with_sum, interpret=True, **BLOCKS)
  ref = ref_forward(case, opt.softcap)
  assert_close(lse, ref[0], F32_TOL, "lse")
  assert_close(label_logit, ref[1], F32_TOL, "label_logit")
  assert_close(logit_sum, ref[2] if with_sum else np.zeros(n), F32_TOL, "logit_sum")
  assert all(x.shape == (n,) and x.dtype == F32 for x in (lse, label_logit, logit_sum))
  check_backward(case, opt, F32_TOL, **BLOCKS)


@pytest.mark.parametrize("block_tokens", [8, 16])
def test_forward_small_token_blocks(block_tokens):
  # The forward's token axis is the logit tile's sublane axis: blocks of 8 are fine.
  case = make_case(52, 301, 40, seed=1)
  outputs = tpu.forward(case.hidden, case.weight, case.bias, case.labels, softcap=2.0,
                        with_logit_sum=True, block_tokens=block_tokens, block_vocab=128,
                        interpret=True)
  for actual, expected in zip(outputs, ref_forward(case, 2.0)):
    assert_close(actual, expected, F32_TOL)


def test_default_blocks_tiny_shapes():
  # Blocks round up to whole (8, 128) tiles, much larger than these arrays.
  case = make_case(3, 5, 1, seed=2)
  outputs = tpu.forward(case.hidden, case.weight, case.bias, case.labels, softcap=None,
                        with_logit_sum=True, interpret=True)
  for actual, expected in zip(outputs, ref_forward(case, None)):
    assert_close(actual, expected, F32_TOL)
  check_backward(case, SMOOTH, F32_TOL)


def test_bfloat16_inputs():
  case = make_case(200, 301, 40, hidden_dtype=BF16, weight_dtype=BF16, seed=3)
  outputs = tpu.forward(case.hidden, case.weight, case.bias, case.labels, softcap=4.0,
                        with_logit_sum=True, interpret=True, **BLOCKS)
  # float32 accumulation of exact bf16 products: float32 accuracy on the rounded inputs.
  for actual, expected in zip(outputs, ref_forward(case, 4.0)):
    assert actual.dtype == F32
    assert_close(actual, expected, 1e-4)
  # g is rounded to bf16 for the MXU and the gradients are bf16.
  check_backward(case, SMOOTH, BF16_TOL, **BLOCKS)


def test_mixed_dtypes_compute_in_float32():
  case = make_case(200, 301, 40, hidden_dtype=F32, weight_dtype=BF16, seed=4)
  outputs = tpu.forward(case.hidden, case.weight, case.bias, case.labels, softcap=None,
                        with_logit_sum=False, interpret=True, **BLOCKS)
  assert_close(outputs[0], ref_forward(case, None)[0], F32_TOL)
  (d_hidden, d_weight, _), args = run_backward(case, Grad(), **BLOCKS)
  ref = ref_backward(case, Grad(), *args)
  assert d_hidden.dtype == F32 and d_weight.dtype == BF16
  assert_close(d_hidden, ref[0], F32_TOL)       # float32 matmul: no bf16 rounding of g
  assert_close(d_weight, ref[1], BF16_TOL)


# --------------------------------------------------------------------------- filtering

def test_filter_huge_eps_drops_everything():
  case = make_case(200, 301, 40, seed=5)
  grads, _ = run_backward(case, SMOOTH, filter_eps=1e9, **BLOCKS)
  for grad in grads:
    np.testing.assert_array_equal(np.asarray(grad, np.float32), 0.0)


def test_filter_tiny_eps_changes_nothing():
  case = make_case(200, 301, 40, seed=5)
  filtered, _ = run_backward(case, SMOOTH, filter_eps=1e-30, **BLOCKS)
  unfiltered, _ = run_backward(case, SMOOTH, **BLOCKS)
  for a, b in zip(filtered, unfiltered):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_filter_drops_exactly_the_quiet_blocks():
  # Labels in the first vocabulary tile and a bias of -12 on the others: blocks there
  # hold only p ~ 1e-5, blocks of the first tile |p - 1| ~ 1.
  case = make_case(200, 301, 40, seed=6)
  case = case._replace(bias=jnp.where(jnp.arange(301) < 128, case.bias, -12.0),
                       labels=jnp.clip(case.labels, 0, 127))
  opt = Grad()
  args = backward_args(case, opt)
  stats = sorted(ref_backward(case, opt, *args, blocks=(128, 128))[3].values())
  # A threshold far (in ratio) from every block statistic, with blocks on both sides.
  gap, i = max((stats[i + 1] / max(stats[i], 1e-300), i) for i in range(len(stats) - 1))
  assert gap > 10 and stats[i] > 0
  eps = float(np.sqrt(stats[i] * stats[i + 1]))
  (_, d_weight, d_bias), ref = check_backward(case, opt, F32_TOL, filter_eps=eps, **BLOCKS)
  assert 0 < sum(s < eps for s in ref[3].values()) < len(ref[3])
  # Classes 128+ only ever appear in dropped blocks: no gradient at all (unfiltered: ~1e-5).
  np.testing.assert_array_equal(np.asarray(d_weight)[128:], 0.0)
  np.testing.assert_array_equal(np.asarray(d_bias)[128:], 0.0)


# --------------------------------------------------------------------------- NaN safety

def test_invalid_rows_with_huge_values_give_zero_gradient():
  case = make_case(200, 301, 40, seed=7)
  bad = np.zeros(200, bool)
  bad[[0, 57, 130, 199]] = True        # in several token tiles, including the ragged one
  hidden = jnp.where(bad[:, None], 3e38, case.hidden)   # logits overflow to +-inf
  case = case._replace(hidden=hidden, valid=case.valid & ~bad)
  lse, d_loss, p_scale = backward_args(case, SMOOTH)
  lse = jnp.where(bad, jnp.nan, lse)   # whatever the forward made of those rows
  d_hidden, d_weight, d_bias = tpu.backward(
      case.hidden, case.weight, case.bias, case.labels, case.valid, lse, d_loss, p_scale,
      on=SMOOTH.on, off=SMOOTH.off, z_loss=SMOOTH.z_loss, softcap=SMOOTH.softcap,
      filter_eps=1e-12, interpret=True, **BLOCKS)
  for grad in (d_hidden, d_weight, d_bias):
    assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(d_hidden)[bad], 0.0)
  # The other rows see exactly the gradients of the clean problem.
  clean = case._replace(hidden=jnp.where(bad[:, None], 0.0, case.hidden))
  ref = ref_backward(clean, SMOOTH, jnp.where(bad, 0.0, lse), d_loss, jnp.where(bad, 0.0, p_scale))
  assert_close(d_hidden, ref[0], F32_TOL)
  assert_close(d_weight, ref[1], F32_TOL)
  assert_close(d_bias, ref[2], F32_TOL)


# --------------------------------------------------------------------------- checks

def test_rejects_unsupported_dtype():
  case = make_case(16, 128, 8)
  with pytest.raises(ValueError, match="float16"):
    tpu.forward(case.hidden.astype(jnp.float16), case.weight, None, case.labels, softcap=None,
                with_logit_sum=False, interpret=True)
  with pytest.raises(ValueError, match="bias.*int32"):
    tpu.forward(case.hidden, case.weight, jnp.zeros(128, jnp.int32), case.labels, softcap=None,
                with_logit_sum=False, interpret=True)


@pytest.mark.parametrize("fn, blocks, message", [
    ("forward", dict(block_tokens=12), "block_tokens=12 must be a multiple of 8"),
    ("forward", dict(block_vocab=64), "block_vocab=64 must be a multiple of 128"),
    ("backward", dict(block_tokens=16), "block_tokens=16 must be a multiple of 128"),
    ("backward", dict(block_tokens=0), "positive int"),
])
def test_rejects_blocks_off_the_tpu_tiling(fn, blocks, message):
  case = make_case(200, 301, 8)
  with pytest.raises(ValueError, match=message):
    if fn == "forward":
      tpu.forward(case.hidden, case.weight, None, case.labels, softcap=None,
                  with_logit_sum=False, interpret=True, **blocks)
    else:
      run_backward(case, Grad(), **blocks)


@pytest.mark.parametrize("kernel", tpu.KERNELS)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("d", [2304, 4096, 8192])
def test_default_blocks_fit_the_vmem_budget(kernel, dtype, d):
  block_tokens, block_vocab = tpu.default_blocks(kernel, d, dtype)
  assert tpu.vmem_bytes(kernel, block_tokens, block_vocab, d, dtype) <= tpu.VMEM_BUDGET_BYTES
  lane, sublane = (block_tokens, block_vocab) if kernel == "d_weight" else (block_vocab,
                                                                             block_tokens)
  assert lane % 128 == 0 and sublane % 8 == 0
  # The held (sublane) block is the largest that fits with that streamed block.
  doubled = (lane, 2 * sublane) if kernel == "d_weight" else (2 * sublane, lane)
  assert sublane == 1024 or tpu.vmem_bytes(kernel, *doubled, d, dtype) > tpu.VMEM_BUDGET_BYTES


@pytest.mark.parametrize("kernel", tpu.KERNELS)
def test_vmem_estimate_grows_with_blocks(kernel):
  base = tpu.vmem_bytes(kernel, 256, 256, 2048, BF16)
  assert tpu.vmem_bytes(kernel, 512, 256, 2048, BF16) > base
  assert tpu.vmem_bytes(kernel, 256, 512, 2048, BF16) > base
  assert tpu.vmem_bytes(kernel, 256, 256, 4096, BF16) > base
  assert tpu.vmem_bytes(kernel, 256, 256, 2048, F32) > base


# --------------------------------------------------------------------------- lowering

@pytest.mark.parametrize("hidden_dtype, weight_dtype, bias, softcap, filter_eps", [
    (BF16, BF16, True, 30.0, 1e-6),
    (F32, BF16, False, None, None),
])
def test_lowers_to_mosaic(hidden_dtype, weight_dtype, bias, softcap, filter_eps):
  n, v, d = 2100, 1000, 256            # ragged against the default blocks on both axes

  def loss_and_grads(hidden, weight, bias, labels, valid, d_loss):
    lse, _, _ = tpu.forward(hidden, weight, bias, labels, softcap=softcap, with_logit_sum=True)
    return tpu.backward(hidden, weight, bias, labels, valid, lse, d_loss, d_loss, on=0.9,
                        off=1e-4, z_loss=1e-4, softcap=softcap, filter_eps=filter_eps)

  shapes = (jax.ShapeDtypeStruct((n, d), hidden_dtype), jax.ShapeDtypeStruct((v, d), weight_dtype),
            jax.ShapeDtypeStruct((v,), weight_dtype) if bias else None,
            jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_),
            jax.ShapeDtypeStruct((n,), F32))
  exported = jax.export.export(jax.jit(loss_and_grads), platforms=["tpu"])(*shapes)
  assert exported.mlir_module().count("tpu_custom_call") == 3   # forward, d_hidden, d_weight
