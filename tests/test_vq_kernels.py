"""Tests of ``pallas_kernels.vq``: the teacher code-mass kernels against ``logitlab.vq_ops`` (XLA).

On CPU the TPU and GPU kernels run with ``interpret=True`` (ragged tiles included)
and are cross-lowered with ``jax.export`` for ``tpu`` and ``cuda``, so a kernel
that does not lower to Mosaic / Triton fails here without an accelerator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from logitlab import vq_ops
from pallas_kernels.vq import gpu, tpu

N, D, V, K = 21, 16, 300, 9   # 21 = 2*8 + 5 tokens, 300 = 2*128 + 44 tokens: both ragged
K_GPU, D_GPU = 40, 20   # 40 codes = 2*16 + 8 (ragged code chunks), 20 features = 16 + 4


def make_case(seed=0, dtype=jnp.float32, n=N, v=V, d=D, k=K):
  rng = np.random.default_rng(seed)
  f = lambda *s, sd=1.0: jnp.asarray(rng.normal(size=s) * sd, jnp.float32).astype(dtype)
  m = rng.integers(0, k, size=v)
  m[m == 4] = 5                                    # an empty code
  return dict(hidden=f(n, d, sd=2.0), weight=f(v, d, sd=1 / np.sqrt(d)), bias=f(v, sd=0.5),
              assignment=jnp.asarray(m, jnp.int32), token_bias=f(v, sd=0.5).astype(jnp.float32))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("blocks", [(8, 128), (24, 384), (256, 512)])
def test_tpu_kernel_interpret_matches_xla(with_bias, blocks):
  c = make_case(1)
  bias, tb = (c["bias"], c["token_bias"]) if with_bias else (None, None)
  out = tpu.teacher_code_mass(c["hidden"], c["weight"], bias, c["assignment"], tb, num_codes=K,
                              temperature=1.5, block_tokens=blocks[0], block_vocab=blocks[1],
                              interpret=True)
  ref = vq_ops.vq_teacher_code_mass(c["hidden"], c["weight"], c["assignment"], K,
                                    teacher_bias=bias, token_bias=tb, temperature=1.5)
  assert out[0].shape == (N, K) and all(x.dtype == jnp.float32 for x in out[:3])
  assert (out[3] is None) == (not with_bias)
  for a, r in zip(out, ref):
    if r is not None:
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=2e-6)
  assert np.all(np.asarray(out[0])[:, 4] == 0)


def test_tpu_kernel_interpret_bf16():
  c = make_case(2, dtype=jnp.bfloat16)
  out = tpu.teacher_code_mass(c["hidden"], c["weight"], c["bias"], c["assignment"], None,
                              num_codes=K, block_tokens=8, block_vocab=128, interpret=True)
  ref = vq_ops.vq_teacher_code_mass(c["hidden"], c["weight"], c["assignment"], K,
                                    teacher_bias=c["bias"])
  for a, r in zip(out[:3], ref[:3]):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_tpu_kernel_rejects_unaligned_blocks():
  c = make_case(3)
  with pytest.raises(ValueError, match="block_vocab"):
    tpu.teacher_code_mass(c["hidden"], c["weight"], None, c["assignment"], None, num_codes=K,
                          block_vocab=100, interpret=True)


@pytest.mark.parametrize("impl, shape, blocks", [
    ("pallas_tpu", {}, dict(block_tokens=8, block_vocab=128)),
    ("pallas_gpu", dict(d=D_GPU, k=K_GPU), dict(block_tokens=16, block_vocab=128)),
])
def test_distillation_through_the_kernel_matches_xla_values_and_grads(impl, shape, blocks):
  c = make_case(4, **shape)
  num_codes = shape.get("k", K)
  rng = np.random.default_rng(5)
  sh = jnp.asarray(rng.normal(size=(N, 12)), jnp.float32)
  cb = jnp.asarray(rng.normal(size=(num_codes, 12)) / 3, jnp.float32)
  where = jnp.asarray(np.arange(N) % 5 != 2)

  def loss(sh, cb, tb, **kw):
    return jnp.sum(vq_ops.vq_distillation_loss(
        sh, cb, c["assignment"], c["hidden"], c["weight"], token_bias=tb,
        teacher_bias=c["bias"], temperature=2.0, where=where, **kw))

  grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
  val, grads = grad(functools.partial(loss, impl=impl, interpret=True, **blocks))(
      sh, cb, c["token_bias"])
  ref_val, ref_grads = grad(loss)(sh, cb, c["token_bias"])
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_interpret_requires_a_pallas_impl():
  c = make_case(6)
  with pytest.raises(ValueError, match="interpret"):
    vq_ops.vq_teacher_code_mass(c["hidden"], c["weight"], c["assignment"], K, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tpu_kernel_cross_lowers_to_mosaic(dtype, with_bias):
  n, d, v, k = 1000, 256, 5000, 256                # ragged against the default 256 x 512
  s = jax.ShapeDtypeStruct
  bias = s((v,), jnp.float32) if with_bias else None
  f = lambda h, w, b, m, tb: tpu.teacher_code_mass(h, w, b, m, tb, num_codes=k, temperature=2.0)
  exported = export.export(jax.jit(f), platforms=["tpu"])(
      s((n, d), dtype), s((v, d), dtype), bias, s((v,), jnp.int32), bias)
  module = exported.mlir_module()
  assert module.count("tpu_custom_call") == 1
  assert [o.shape for o in exported.out_avals] == [(n, k), (n,), (n,)] + ([(n,)] * with_bias)


# --------------------------------------------------------------------------- GPU (Triton)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("blocks", [(16, 128, 16, 16), (None, None, None, None)])
def test_gpu_kernel_interpret_matches_xla(with_bias, blocks):
  c = make_case(7, d=D_GPU, k=K_GPU)
  bias, tb = (c["bias"], c["token_bias"]) if with_bias else (None, None)
  bn, bv, bk, bd = blocks
  out = gpu.teacher_code_mass(c["hidden"], c["weight"], bias, c["assignment"], tb,
                              num_codes=K_GPU, temperature=1.5, block_tokens=bn, block_vocab=bv,
                              block_codes=bk, block_d=bd, interpret=True)
  ref = vq_ops.vq_teacher_code_mass(c["hidden"], c["weight"], c["assignment"], K_GPU,
                                    teacher_bias=bias, token_bias=tb, temperature=1.5)
  assert out[0].shape == (N, K_GPU) and all(x.dtype == jnp.float32 for x in out[:3])
  assert (out[3] is None) == (not with_bias)
  for a, r in zip(out, ref):
    if r is not None:
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=2e-6)
  assert np.all(np.asarray(out[0])[:, 4] == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_kernel_interpret_16bit(dtype):
  c = make_case(8, dtype=dtype, d=D_GPU, k=K_GPU)
  out = gpu.teacher_code_mass(c["hidden"], c["weight"], c["bias"], c["assignment"],
                              c["token_bias"], num_codes=K_GPU, temperature=0.7,
                              block_tokens=16, block_vocab=128, block_codes=32, block_d=16,
                              interpret=True)
  ref = vq_ops.vq_teacher_code_mass(c["hidden"], c["weight"], c["assignment"], K_GPU,
                                    teacher_bias=c["bias"], token_bias=c["token_bias"],
                                    temperature=0.7)
  for a, r in zip(out, ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_gpu_kernel_rejects_non_power_of_two_blocks():
  c = make_case(3)
  for name in ("block_tokens", "block_vocab", "block_codes", "block_d"):
    with pytest.raises(ValueError, match=name):
      gpu.teacher_code_mass(c["hidden"], c["weight"], None, c["assignment"], None, num_codes=K,
                            interpret=True, **{name: 24})


@pytest.mark.parametrize("dtype,with_bias", [(jnp.float32, True), (jnp.bfloat16, False),
                                             (jnp.float16, True)])
def test_gpu_kernel_cross_lowers_to_triton(dtype, with_bias):
  n, d, v, k = 1000, 200, 5000, 300                # ragged against every default block
  s = jax.ShapeDtypeStruct
  bias = s((v,), jnp.float32) if with_bias else None
  f = lambda h, w, b, m, tb: gpu.teacher_code_mass(h, w, b, m, tb, num_codes=k, temperature=2.0)
  exported = export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          s((n, d), dtype), s((v, d), dtype), bias, s((v,), jnp.int32), bias)
  module = exported.mlir_module()
  assert "__gpu$xla.gpu.triton" in module
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton(") == 1
  assert [o.shape for o in exported.out_avals] == [(n, k), (n,), (n,)] + ([(n,)] * with_bias)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_gpu_default_blocks_fit_a100_shared_memory(dtype):
  used = gpu.smem_bytes(gpu.DEFAULT_BLOCK_TOKENS, gpu.DEFAULT_BLOCK_VOCAB,
                        gpu.DEFAULT_BLOCK_CODES, gpu.default_block_d(dtype), dtype)
  assert used <= 163 * 1024 == gpu.SMEM_LIMIT_BYTES["A100"]


def test_gpu_smem_bytes_counts_operands_logits_and_one_hot_matmul():
  assert (gpu.smem_bytes(32, 128, 128, 64, jnp.bfloat16, 3)
          == 3 * 160 * 64 * 2 + 32 * 128 * 4 + 32 * 128 * 2 + 128 * 128 * 2)
