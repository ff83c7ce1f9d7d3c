"""Dispatch of the VQ-Logits ops to the Pallas kernels of ``pallas_kernels.vq``, with gradients.

The scatter ``out[n, v] = z[n, m(v)] + b_v - shift[n]`` and the segment sum
``P[n, k] = sum_{v: m(v)=k} p[n, v]`` are each other's transposes, so each
kernel's backward pass is the other kernel::

  d z = segment_sum(g),   d b = sum_n g,   d shift = -sum_v g      (scatter)
  d p = scatter(dP)                                                (segment sum)

Leading batch axes are flattened to the kernels' ``N`` here.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from logitlab import _validation as v

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
_KERNEL_MODULES = {"pallas_tpu": "pallas_kernels.vq.tpu", "pallas_gpu": "pallas_kernels.vq.gpu"}


def check_impl(fn: str, impl: str, interpret: bool) -> str:
  """``impl`` among :data:`IMPLS`; ``interpret`` only with a Pallas implementation."""
  v.choice(fn, "impl", impl, IMPLS)
  if impl == "xla" and interpret:
    raise ValueError(f"{fn}: interpret=True applies to the Pallas implementations, not "
                     "impl='xla'.")
  return impl


def kernels(impl: str):
  """The ``pallas_kernels.vq`` backend module of ``impl`` (``"pallas_tpu"`` / ``"pallas_gpu"``)."""
  return importlib.import_module(_KERNEL_MODULES[impl])


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scatter(impl, interpret, out_dtype, code_logits, assignment, token_bias, shift):
  return kernels(impl).scatter_logits(code_logits, assignment, token_bias, shift,
                                      out_dtype=out_dtype, interpret=interpret)


def _scatter_fwd(impl, interpret, out_dtype, code_logits, assignment, token_bias, shift):
  out = _scatter(impl, interpret, out_dtype, code_logits, assignment, token_bias, shift)
  return out, (code_logits, assignment, token_bias, shift)


def _scatter_bwd(impl, interpret, out_dtype, residuals, g):
  del out_dtype
  code_logits, assignment, token_bias, shift = residuals
  g = g.astype(jnp.float32)
  d_code = _segment_sum(impl, interpret, code_logits.shape[1], g, assignment)
  d_bias = None if token_bias is None else jnp.sum(g, axis=0).astype(token_bias.dtype)
  d_shift = None if shift is None else -jnp.sum(g, axis=1).astype(shift.dtype)
  return d_code.astype(code_logits.dtype), None, d_bias, d_shift


_scatter.defvjp(_scatter_fwd, _scatter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _segment_sum(impl, interpret, num_codes, probs, assignment):
  return kernels(impl).segment_sum(probs, assignment, num_codes=num_codes, interpret=interpret)


def _segment_sum_fwd(impl, interpret, num_codes, probs, assignment):
  out = _segment_sum(impl, interpret, num_codes, probs, assignment)
  return out, (jnp.zeros((), probs.dtype), assignment)


def _segment_sum_bwd(impl, interpret, num_codes, residuals, g):
  del num_codes
  dtype_carrier, assignment = residuals
  d_probs = _scatter(impl, interpret, dtype_carrier.dtype, g, assignment, None, None)
  return d_probs, None


_segment_sum.defvjp(_segment_sum_fwd, _segment_sum_bwd)


def scatter(impl: str, interpret: bool, code_logits: jax.Array, assignment: jax.Array,
            token_bias: jax.Array | None, shift: jax.Array | None, out_dtype) -> jax.Array:
  """``z[..., m(v)] + b_v - shift[...]`` ``[..., K] -> [..., V]`` by the kernel, differentiable."""
  batch = code_logits.shape[:-1]
  if shift is not None:
    shift = shift.astype(jnp.float32).reshape(-1)
  out = _scatter(impl, interpret, jnp.dtype(out_dtype), _rows(code_logits), assignment,
                 token_bias, shift)
  return out.reshape(batch + (assignment.shape[0],))


def segment_sum(impl: str, interpret: bool, probs: jax.Array, assignment: jax.Array,
                num_codes: int) -> jax.Array:
  """``P[..., k] = sum_{m(v)=k} probs[..., v]`` by the kernel, float32, differentiable."""
  out = _segment_sum(impl, interpret, num_codes, _rows(probs), assignment)
  return out.reshape(probs.shape[:-1] + (num_codes,))


def top_k_ids(impl: str, interpret: bool, code_logits: jax.Array, assignment: jax.Array,
              token_bias: jax.Array | None, k: int, block_vocab: int | None) -> jax.Array:
  """Token ids ``[..., k]`` of the ``k`` largest ``z_{m(v)} + b_v`` by the kernel (not differentiable)."""
  sg = jax.lax.stop_gradient
  _, ids = kernels(impl).scatter_top_k(sg(_rows(code_logits)), assignment,
                                       None if token_bias is None else sg(token_bias),
                                       k=k, block_vocab=block_vocab, interpret=interpret)
  return ids.reshape(code_logits.shape[:-1] + (k,))
