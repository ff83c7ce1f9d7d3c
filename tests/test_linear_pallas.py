"""``linear_cross_entropy`` through the Pallas kernels (interpret mode) equals the XLA path.

The kernels are tested against float64 references in test_kernels_{tpu,gpu}.py; this
file checks the wiring: options, masks, shift, lse and every gradient through the
custom VJP, for each kernel backend.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab

KERNEL_BLOCKS = {"pallas_gpu": dict(block_tokens=16, block_vocab=32),
                 "pallas_tpu": dict(block_tokens=128, block_vocab=128)}
OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, smoothing="t5x", z_loss=1e-3, softcap=5.0),
    dict(label_smoothing=0.2, smoothing="uniform", ignore_index=-100, shift=1),
    dict(z_loss=1e-4, filter_eps=1e-30),
]


def inputs(dtype, b=2, t=126, d=123, v=507, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
  weight = jnp.asarray(rng.normal(size=(v, d)) / np.sqrt(d), dtype)
  bias = jnp.asarray(rng.normal(size=(v,)) * 0.3, dtype)
  labels = jnp.asarray(np.where(rng.random((b, t)) < 0.1, -100, rng.integers(0, v, (b, t))),
                       jnp.int32)
  where = jnp.asarray(rng.random((b, t)) < 0.85)
  cot = jnp.asarray(rng.uniform(0.5, 1.5, (b, t)), jnp.float32)
  return hidden, weight, bias, labels, where, cot


def value_and_grads(impl, args, options):
  hidden, weight, bias, labels, where, cot = args
  extra = {} if impl == "xla" else dict(KERNEL_BLOCKS[impl], interpret=True)

  def total(h, w, b):
    loss, lse = logitlab.linear_cross_entropy(h, w, labels, bias=b, where=where,
                                              return_lse=True, impl=impl, **options, **extra)
    return jnp.sum(loss * cot) + 0.1 * jnp.sum(lse), (loss, lse)

  (_, (loss, lse)), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(
      hidden, weight, bias)
  return loss, lse, grads


SHAPES = {"ragged": dict(t=126, d=123, v=507), "tile_multiples": dict(t=128, d=128, v=512)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "all", "smooth_shift", "filter"])
@pytest.mark.parametrize("impl", sorted(KERNEL_BLOCKS))
def test_kernel_matches_xla_float32(impl, options, shape):
  args = inputs(jnp.float32, **SHAPES[shape])
  expected, got = value_and_grads("xla", args, options), value_and_grads(impl, args, options)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert g.dtype == e.dtype
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("impl", sorted(KERNEL_BLOCKS))
def test_kernel_matches_xla_bfloat16(impl):
  """bf16: both paths accumulate in float32, so they agree to bf16 rounding of the outputs."""
  args = inputs(jnp.bfloat16)
  expected, got = value_and_grads("xla", args, OPTIONS[1]), value_and_grads(impl, args, OPTIONS[1])
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert g.dtype == e.dtype
    e, g = np.asarray(e, np.float32), np.asarray(g, np.float32)
    np.testing.assert_allclose(g, e, rtol=1e-2, atol=1e-2 * np.abs(e).max())


@pytest.mark.parametrize("impl, platform, custom_call", [
    ("pallas_tpu", "tpu", "tpu_custom_call"),
    ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton"),
])
def test_value_and_grad_cross_lowers_for_the_kernel_platform(impl, platform, custom_call):
  """jax.export of jit(value_and_grad) through the public API, bf16, every option, default blocks."""
  n, v, d = 252, 507, 128

  def loss(hidden, weight, bias, labels, where):
    return logitlab.linear_cross_entropy(
        hidden, weight, labels, bias=bias, where=where, shift=1, label_smoothing=0.1,
        smoothing="t5x", z_loss=1e-4, softcap=30.0, filter_eps=2.0**-12, impl=impl).mean()

  specs = (jax.ShapeDtypeStruct((2, n // 2, d), jnp.bfloat16),
           jax.ShapeDtypeStruct((v, d), jnp.bfloat16), jax.ShapeDtypeStruct((v,), jnp.bfloat16),
           jax.ShapeDtypeStruct((2, n // 2), jnp.int32), jax.ShapeDtypeStruct((2, n // 2), bool))
  exported = jax.export.export(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
  module = exported.mlir_module()
  # One forward kernel and the backward's kernel(s) (two on TPU, at least one on GPU).
  assert module.count(custom_call) >= 2
  assert not re.search(rf"tensor<{n}x{v}x", module)
