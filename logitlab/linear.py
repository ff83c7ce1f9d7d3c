"""Cross-entropy fused with the output layer: ``loss(hidden @ weight.T + bias, labels)``.

The public entry point validates arguments, applies masks and ``shift``, and
runs one ``jax.custom_vjp`` whose forward and backward come from a backend, all
with one contract (per-token ``lse`` / label logit / logit sum forward; ``g = dL/dz``
recomputed tile by tile backward; see :mod:`logitlab._linear_xla`):

* ``"xla"``: :mod:`logitlab._linear_xla`, streaming plain JAX, runs on every platform.
* ``"pallas_tpu"``: ``pallas_kernels.linear_cross_entropy.tpu`` (Mosaic TPU).
* ``"pallas_gpu"``: ``pallas_kernels.linear_cross_entropy.gpu`` (Triton; Ampere or newer).
* ``"pallas"``: the Pallas kernel of the platform; ``"auto"``: that kernel where it
  applies (TPU; CUDA GPU of compute capability >= 8.0), else ``"xla"``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from logitlab import _ce
from logitlab import _linear_xla
from logitlab import _validation as v
from logitlab import debug

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_tpu", "pallas_gpu")
_KERNEL_MODULES = {"pallas_tpu": "pallas_kernels.linear_cross_entropy.tpu",
                   "pallas_gpu": "pallas_kernels.linear_cross_entropy.gpu"}


def _gpu_runs_triton() -> bool:
  """Whether the default GPU is a CUDA device of compute capability >= 8.0 (Ampere+)."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  return capability is not None and float(capability) >= 8.0


def _resolve_impl(fn: str, impl: str, interpret: bool, dtypes) -> str:
  """Maps ``impl`` to ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"`` for this platform."""
  platform = jax.default_backend()
  kernel = {"tpu": "pallas_tpu", "gpu": "pallas_gpu" if _gpu_runs_triton() else None}.get(platform)
  if impl == "auto":
    supported = kernel is not None and not (kernel == "pallas_tpu" and jnp.dtype("float16") in dtypes)
    impl = kernel if supported else "xla"
  elif impl == "pallas":
    if kernel is None:
      raise ValueError(f"{fn}: impl='pallas' has no kernel for platform {platform!r} "
                       "(TPU, or a CUDA GPU of compute capability >= 8.0, is needed); on CPU "
                       "pass impl='pallas_tpu' or 'pallas_gpu' with interpret=True.")
    impl = kernel
  if impl == "xla" and interpret:
    raise ValueError(f"{fn}: interpret=True applies to the Pallas implementations, not impl='xla'.")
  # An explicit kernel is not checked against the default backend: jax.export may be
  # lowering for another platform. Compiling it for the wrong device fails in Pallas.
  return impl


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static choices of one call: loss options, backend, tiles."""
  options: _ce.Options
  impl: str
  block_tokens: int | None
  block_vocab: int | None
  filter_eps: float | None
  interpret: bool

  @property
  def backend(self):
    if self.impl == "xla":
      return _linear_xla
    return importlib.import_module(_KERNEL_MODULES[self.impl])

  @property
  def kernel_options(self) -> dict:
    options = dict(block_tokens=self.block_tokens, block_vocab=self.block_vocab)
    return options if self.impl == "xla" else dict(options, interpret=self.interpret)


def _fused_fwd(plan: _Plan, hidden, weight, bias, labels, valid):
  options = plan.options
  lse, label_logit, logit_sum = plan.backend.forward(
      hidden, weight, bias, labels, softcap=options.softcap,
      with_logit_sum=options.needs_logit_sum, **plan.kernel_options)
  loss = options.loss(lse, label_logit, logit_sum, weight.shape[0])
  outputs = (jnp.where(valid, loss, 0.0), jnp.where(valid, lse, 0.0))
  return outputs, (hidden, weight, bias, labels, valid, lse)


def _fused_bwd(plan: _Plan, residuals, cotangents):
  hidden, weight, bias, labels, valid, lse = residuals
  d_loss, d_lse = cotangents
  options = plan.options
  with jax.ensure_compile_time_eval():  # V is static: the target weights are constants
    on, off, _ = options.target_weights(weight.shape[0])
  # dL/dz = p_scale * softmax(z) - d_loss * (on * onehot(y) + off) on valid rows.
  d_loss = jnp.where(valid, d_loss, 0.0)
  p_scale = d_loss * (1.0 + 2.0 * options.z_loss * lse) + jnp.where(valid, d_lse, 0.0)
  d_hidden, d_weight, d_bias = plan.backend.backward(
      hidden, weight, bias, labels, valid, lse, d_loss, p_scale, on=float(on), off=float(off),
      z_loss=options.z_loss, softcap=options.softcap, filter_eps=plan.filter_eps,
      **plan.kernel_options)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  return d_hidden, d_weight, d_bias, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_cross_entropy(plan: _Plan, hidden, weight, bias, labels, valid):
  """Per-token ``(loss, lse)`` of ``hidden[N, D] @ weight[V, D]^T + bias``; 0 where invalid."""
  return _fused_fwd(plan, hidden, weight, bias, labels, valid)[0]


_fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)


def _shift_left(x: jax.Array, shift: int, fill) -> jax.Array:
  """``x[..., t + shift]`` at position ``t``, ``fill`` past the end (last axis)."""
  kept = x[..., shift:]
  pad = jnp.full(x.shape[:-1] + (x.shape[-1] - kept.shape[-1],), fill, x.dtype)
  return jnp.concatenate([kept, pad], axis=-1)


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    smoothing: str = "uniform",
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    return_lse: bool = False,
    filter_eps: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
    block_tokens: int | None = None,
    block_vocab: int | None = None,
):
  r"""Per-token cross-entropy of a linear head without materializing the logits.

  Equal to ``cross_entropy(hidden @ weight.T + bias, labels, ...)`` with the same
  options (see :func:`logitlab.cross_entropy` for the smoothing conventions,
  z-loss and softcap), computed by streaming over vocabulary tiles with a
  float32 online log-sum-exp::

    z = softcap(hidden @ weight.T + bias)            # never stored, [N, V]
    loss_n = lse_n - sum_v q_{n,v} z_{n,v} + sum_v q log q + z_loss * lse_n**2

  Memory beyond inputs and gradients is ``O(N * D + tiles)`` instead of
  ``O(N * V)``; the backward recomputes logit tiles (8 N D V FLOPs in all,
  against 6 N D V for the materialized form) and keeps only ``lse`` as residual.

  Args:
    hidden: ``[..., D]`` float hidden states (any leading shape; with ``shift``
      the last leading axis is the sequence).
    weight: ``[V, D]`` output embedding, one row per class (the layout of
      ``nn.Embed`` / a tied embedding; transpose a ``[D, V]`` kernel first).
    labels: ``[...]`` integer labels, ``hidden.shape[:-1]``.
    bias: optional ``[V]`` bias.
    where: boolean mask broadcastable to ``labels.shape``; False positions give
      loss 0 and gradient 0.
    ignore_index: label value that marks a position as masked (e.g. -100).
    label_smoothing, smoothing, z_loss, softcap: as in :func:`logitlab.cross_entropy`.
    shift: predict the ``shift``-th next token: position ``t`` is scored on
      ``labels[..., t + shift]`` (and ``where`` / ``ignore_index`` are read there);
      the last ``shift`` positions give 0. ``hidden`` is not copied.
    return_lse: also return the per-token log-sum-exp (0 where masked).
    filter_eps: Cut Cross-Entropy's gradient filtering: in the backward, skip a
      tile whose every ``|dloss/dz|`` is below this (e.g. ``2**-12`` for bf16).
      Approximate; None (default) is exact.
    impl: ``"auto"`` (the platform's Pallas kernel where it applies, else
      ``"xla"``), ``"xla"`` (streaming plain JAX, any platform), ``"pallas"`` (the
      platform's kernel, or an error), ``"pallas_tpu"`` or ``"pallas_gpu"``.
    interpret: run a Pallas kernel in interpret mode (any platform, e.g. CPU tests).
    block_tokens, block_vocab: tile sizes (None: the backend's defaults, 1024 x 1024
      for ``"xla"``, sized to VMEM / shared memory for the kernels).

  Returns:
    float32 losses of ``labels.shape``; with ``return_lse``, ``(loss, lse)``.

  Example:
    >>> import jax, jax.numpy as jnp, logitlab
    >>> h = jax.random.normal(jax.random.key(0), (4, 8))
    >>> w = jax.random.normal(jax.random.key(1), (11, 8))
    >>> y = jnp.array([1, 5, 0, 10])
    >>> fused = logitlab.linear_cross_entropy(h, w, y)
    >>> bool(jnp.allclose(fused, logitlab.cross_entropy(h @ w.T, y), atol=1e-5))
    True

  References:
    Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models,
    arXiv:2411.09009.
  """
  fn = "linear_cross_entropy"
  hidden = v.float_array(fn, "hidden", hidden)
  weight = v.float_array(fn, "weight", weight)
  labels = v.int_array(fn, "labels", labels)
  if weight.ndim != 2:
    raise ValueError(f"{fn}: `weight` must be [V, D], got shape {weight.shape}.")
  if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
    raise ValueError(f"{fn}: `hidden` must be [..., D] with D = weight.shape[1] = "
                     f"{weight.shape[1]}, got hidden shape {hidden.shape} and weight shape "
                     f"{weight.shape}.")
  num_classes = weight.shape[0]
  if num_classes == 0:
    raise ValueError(f"{fn}: `weight` has no rows (shape {weight.shape}).")
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(f"{fn}: `labels` of shape {labels.shape} must equal hidden.shape[:-1] = "
                     f"{hidden.shape[:-1]}.")
  bias = v.optional_vector(fn, "bias", bias, num_classes, f"weight shape {weight.shape}")
  options = _ce.Options.create(fn, label_smoothing=label_smoothing, smoothing=smoothing,
                               z_loss=z_loss, softcap=softcap)
  options.check_num_classes(fn, num_classes)
  shift = v.static_int(fn, "shift", shift, minimum=0)
  if shift and labels.ndim == 0:
    raise ValueError(f"{fn}: `shift`={shift} needs a sequence axis, but `labels` is a scalar.")
  if filter_eps is not None:
    filter_eps = v.static_number(fn, "filter_eps", filter_eps, minimum=0.0, min_open=True)
  v.choice(fn, "impl", impl, IMPLEMENTATIONS)
  if not isinstance(interpret, bool):
    raise TypeError(f"{fn}: `interpret` must be a bool, got {interpret!r}.")
  plan = _Plan(
      options=options,
      impl=_resolve_impl(fn, impl, interpret, {hidden.dtype, weight.dtype}),
      block_tokens=None if block_tokens is None else v.static_int(
          fn, "block_tokens", block_tokens, minimum=1),
      block_vocab=None if block_vocab is None else v.static_int(
          fn, "block_vocab", block_vocab, minimum=1),
      filter_eps=filter_eps, interpret=interpret)

  valid = jnp.ones(labels.shape, bool) if where is None else v.bool_mask(fn, "where", where, labels.shape)
  valid = v.label_mask(fn, labels, valid, ignore_index)
  if shift:
    labels, valid = _shift_left(labels, shift, 0), _shift_left(valid, shift, False)
  debug.check_labels(fn, labels, valid, num_classes)
  debug.check_finite(fn, hidden=hidden, weight=weight, bias=bias)

  if labels.size == 0:
    loss = lse = jnp.zeros(labels.shape, jnp.float32)
  else:
    loss, lse = _fused_cross_entropy(
        plan, hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        labels.reshape(-1).astype(jnp.int32), valid.reshape(-1))
    loss, lse = loss.reshape(labels.shape), lse.reshape(labels.shape)
  return (loss, lse) if return_lse else loss
