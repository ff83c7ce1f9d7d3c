"""Tests of the materialized-logits losses in ``logitlab.losses``.

``cross_entropy`` is checked against a float64 numpy reference written from the
formula (dense smoothed target ``q``, ``sum q log q - sum q log p + z_loss lse^2``)
and its analytic gradient; the optax-compatible arguments against optax itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import logitlab

RTOL = 1e-5
ATOL = 1e-5

# Hyperparameter sets of cross_entropy, by test id.
OPTIONS = {
    "plain": {},
    "uniform": dict(label_smoothing=0.1),
    "t5x": dict(label_smoothing=0.1, smoothing="t5x"),
    "t5x_eps1": dict(label_smoothing=1.0, smoothing="t5x"),
    "zloss1e-4": dict(z_loss=1e-4),
    "zloss1e-2": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "uniform_zloss_softcap": dict(label_smoothing=0.1, z_loss=1e-2, softcap=5.0),
    "t5x_zloss_softcap": dict(label_smoothing=0.1, smoothing="t5x", z_loss=1e-4, softcap=5.0),
}
# Options under which the loss is invariant to a per-row shift of the logits.
SHIFT_INVARIANT = ("plain", "uniform", "t5x", "t5x_eps1")


def each_option(names=tuple(OPTIONS)):
  """Parametrizes a test's ``opts`` over the named entries of ``OPTIONS``."""
  return pytest.mark.parametrize("opts", [OPTIONS[n] for n in names], ids=list(names))


# ----------------------------------------------------------------------------
# Data and float64 numpy references.
# ----------------------------------------------------------------------------


def make_logits(shape, seed=0, scale=3.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def make_labels(batch_shape, num_classes, seed=1):
  return np.random.default_rng(seed).integers(0, num_classes, batch_shape).astype(np.int32)


def make_probs(shape, seed=2, zero_fraction=0.0):
  """Random distributions over the last axis, with about ``zero_fraction`` exact zeros."""
  rng = np.random.default_rng(seed)
  p = np.exp(rng.standard_normal(shape)) * (rng.random(shape) >= zero_fraction)
  p[..., 0] += 1e-3  # no all-zero row
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def np_logsumexp(z, axis=-1):
  peak = np.max(z, axis=axis, keepdims=True)
  return np.squeeze(peak, axis) + np.log(np.sum(np.exp(z - peak), axis=axis))


def smoothed_target(labels, num_classes, eps, smoothing):
  """Dense ``q[..., C]`` of the smoothing convention (float64)."""
  onehot = np.asarray(labels)[..., None] == np.arange(num_classes)
  if smoothing == "uniform":
    return (1 - eps) * onehot + eps / num_classes
  return np.where(onehot, 1 - eps, eps / (num_classes - 1))


def ref_cross_entropy(logits, labels, *, label_smoothing=0.0, smoothing="uniform", z_loss=0.0,
                      softcap=None):
  """Returns float64 ``(loss, lse, dloss/dlogits)`` computed from the formula."""
  x = np.asarray(logits, np.float64)
  z = x if softcap is None else softcap * np.tanh(x / softcap)
  lse = np_logsumexp(z)
  log_p = z - lse[..., None]
  q = smoothed_target(labels, z.shape[-1], label_smoothing, smoothing)
  q_log_q = 0.0
  if smoothing == "t5x":  # KL(q || p); the uniform convention has no entropy term
    q_log_q = np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)
  loss = q_log_q - np.sum(q * log_p, axis=-1) + z_loss * lse**2
  grad = (1 + 2 * z_loss * lse)[..., None] * np.exp(log_p) - q
  if softcap is not None:
    grad = grad * (1 - np.tanh(x / softcap) ** 2)
  return loss, lse, grad


def ref_class_masked(logits, labels, class_mask, **opts):
  """``ref_cross_entropy`` row by row on the selected classes (rows with none score 0)."""
  x = np.asarray(logits, np.float64)
  loss, lse, grad = np.zeros(len(x)), np.zeros(len(x)), np.zeros_like(x)
  for row, selected in enumerate(class_mask):
    cols = np.flatnonzero(selected)
    if cols.size:
      label = np.searchsorted(cols, labels[row])
      l, s, g = ref_cross_entropy(x[row, cols][None], np.array([label]), **opts)
      loss[row], lse[row], grad[row, cols] = l[0], s[0], g[0]
  return loss, lse, grad


def naive_cross_entropy(logits, labels, *, label_smoothing=0.0, smoothing="uniform", z_loss=0.0,
                        softcap=None):
  """The loss computed entirely in the dtype of ``logits`` (the low-precision baseline)."""
  z = logits if softcap is None else softcap * jnp.tanh(logits / softcap)
  log_p = jax.nn.log_softmax(z, axis=-1)
  lse = jax.nn.logsumexp(z, axis=-1)
  q = jnp.asarray(smoothed_target(labels, z.shape[-1], label_smoothing, smoothing), z.dtype)
  q_log_q = jnp.sum(jax.scipy.special.xlogy(q, q), axis=-1) if smoothing == "t5x" else 0.0
  return q_log_q - jnp.sum(q * log_p, axis=-1) + z_loss * lse**2


def loss_and_grad(fn, logits, *args, **kwargs):
  """Per-example loss of ``fn`` and the gradient of its sum w.r.t. ``logits``."""
  def total(x):
    loss = fn(x, *args, **kwargs)
    return jnp.sum(loss), loss
  (_, loss), grad = jax.value_and_grad(total, has_aux=True)(logits)
  return np.asarray(loss), np.asarray(grad)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# Values and gradients against the references.
# ----------------------------------------------------------------------------


@each_option()
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 11)], ids=["2d", "3d"])
def test_cross_entropy_matches_reference(opts, shape):
  logits, labels = make_logits(shape), make_labels(shape[:-1], shape[-1])
  loss = logitlab.cross_entropy(logits, labels, **opts)
  assert loss.dtype == jnp.float32 and loss.shape == shape[:-1]
  assert_close(loss, ref_cross_entropy(logits, labels, **opts)[0])


@each_option()
def test_cross_entropy_grad_matches_analytic_grad(opts):
  logits, labels = make_logits((4, 9)), make_labels(4, 9)
  _, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, **opts)
  assert_close(grad, ref_cross_entropy(logits, labels, **opts)[2])


@each_option(("plain", "uniform", "t5x", "zloss1e-2", "softcap", "t5x_zloss_softcap"))
def test_cross_entropy_check_grads(opts):
  logits, labels = make_logits((3, 5), scale=1.0), make_labels(3, 5)
  loss = functools.partial(logitlab.cross_entropy, labels=labels, **opts)
  check_grads(loss, (jnp.asarray(logits),), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@settings(max_examples=25, deadline=None)
@given(
    num_classes=st.integers(2, 40),
    batch=st.integers(1, 6),
    smoothing=st.sampled_from(["uniform", "t5x"]),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]) | st.floats(0.0, 1.0),
    z_loss=st.sampled_from([0.0, 1e-4, 1e-2]),
    softcap=st.none() | st.floats(1.0, 50.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_cross_entropy_property(num_classes, batch, smoothing, label_smoothing, z_loss, softcap,
                                scale, seed):
  opts = dict(label_smoothing=label_smoothing, smoothing=smoothing, z_loss=z_loss, softcap=softcap)
  logits = make_logits((batch, num_classes), seed=seed, scale=scale)
  labels = make_labels(batch, num_classes, seed=seed + 1)
  keep = np.random.default_rng(seed + 2).random(batch) < 0.7
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, where=keep, **opts)
  ref_loss, _, ref_grad = ref_cross_entropy(logits, labels, **opts)
  # Cancellation between lse and the logit sums: absolute error scales with the logits.
  atol = ATOL * (1.0 + np.max(np.abs(logits)))
  assert_close(loss, np.where(keep, ref_loss, 0.0), atol=atol)
  assert_close(grad, np.where(keep[:, None], ref_grad, 0.0))


# ----------------------------------------------------------------------------
# optax equivalence.
# ----------------------------------------------------------------------------

# (logits shape, axis, where): where is None, "examples" (batch-shaped) or "classes".
OPTAX_CASES = [
    ((4, 7), -1, None),
    ((4, 7), -1, "examples"),
    ((4, 7), -1, "classes"),
    ((3, 6, 2), 1, None),
    ((3, 6, 2), 1, "examples"),
    ((3, 6, 2), -2, "classes"),
    ((2, 3, 4), (1, 2), None),
    ((2, 3, 4), (-2, -1), "examples"),
    ((2, 3, 4), (1, 2), "classes"),
    ((3, 4, 5), (0, 2), None),
    ((2, 3, 4), (2, 1), None),  # optax flattens the class axes in the order given
    ((2, 3, 4), (2, 1), "classes"),
]


def optax_case(shape, axis, where, seed=3):
  """Returns ``(logits, batch_shape, num_classes, where)`` for one ``OPTAX_CASES`` entry."""
  axes = [a % len(shape) for a in np.atleast_1d(axis)]
  batch_shape = tuple(n for a, n in enumerate(shape) if a not in axes)
  num_classes = int(np.prod([shape[a] for a in axes]))
  rng = np.random.default_rng(seed)
  mask = {None: None, "examples": batch_shape, "classes": shape}[where]
  if mask is not None:
    mask = rng.random(mask) < 0.7
  return make_logits(shape, seed=seed), batch_shape, num_classes, mask


@pytest.mark.parametrize("shape, axis, where", OPTAX_CASES)
def test_cross_entropy_matches_optax(shape, axis, where):
  logits, batch_shape, num_classes, mask = optax_case(shape, axis, where)
  labels = make_labels(batch_shape, num_classes)
  expected = optax.softmax_cross_entropy_with_integer_labels(
      logits, labels, axis=axis, where=None if mask is None else jnp.asarray(mask))
  assert_close(logitlab.cross_entropy(logits, labels, axis=axis, where=mask), expected)


@pytest.mark.parametrize("shape, axis, where", OPTAX_CASES)
def test_softmax_cross_entropy_matches_optax(shape, axis, where):
  logits, _, _, mask = optax_case(shape, axis, where)
  labels = make_probs(shape)
  expected = optax.softmax_cross_entropy(
      logits, labels, axis=axis, where=None if mask is None else jnp.asarray(mask))
  assert_close(logitlab.softmax_cross_entropy(logits, labels, axis=axis, where=mask), expected)


@pytest.mark.parametrize("shape, axis, where", OPTAX_CASES)
def test_kl_divergence_matches_optax(shape, axis, where):
  logits, _, _, mask = optax_case(shape, axis, where)
  log_predictions = jax.nn.log_softmax(logits, axis=axis)
  targets = make_probs(shape, zero_fraction=0.3)
  optax_where = mask
  if mask is not None and mask.ndim < len(shape):  # optax's kl masks terms only
    optax_where = np.broadcast_to(np.expand_dims(mask, axis), shape)
  expected = optax.kl_divergence(log_predictions, targets, axis=axis,
                                 where=None if mask is None else jnp.asarray(optax_where))
  actual = logitlab.kl_divergence(log_predictions, targets, axis=axis, where=mask)
  assert actual.dtype == jnp.float32
  assert_close(actual, expected)


def test_zero_target_on_neg_inf_logit_counts_zero():
  """``0 * log 0`` and ``0 * (-inf)`` terms give 0, with finite gradients."""
  logits = make_logits((3, 6))
  logits[:, [1, 4]] = -np.inf
  targets = make_probs((3, 6))
  targets[:, [1, 4]] = 0.0
  targets /= targets.sum(-1, keepdims=True)
  finite = [0, 2, 3, 5]
  sliced_log_p = jax.nn.log_softmax(logits[:, finite])
  expected_ce = -np.sum(targets[:, finite] * sliced_log_p, -1)
  loss, grad = loss_and_grad(logitlab.softmax_cross_entropy, logits, targets)
  assert_close(loss, expected_ce)
  assert np.all(np.isfinite(grad)) and np.all(grad[:, [1, 4]] == 0)
  log_p = np.full_like(logits, -np.inf)
  log_p[:, finite] = sliced_log_p
  expected_kl = np.sum(targets[:, finite] * (np.log(targets[:, finite]) - sliced_log_p), -1)
  kl, kl_grad = loss_and_grad(logitlab.kl_divergence, log_p, targets)
  assert_close(kl, expected_kl)
  assert np.all(np.isfinite(kl_grad))


# ----------------------------------------------------------------------------
# Invariances.
# ----------------------------------------------------------------------------


@each_option(SHIFT_INVARIANT)
def test_per_row_shift_invariance(opts):
  logits, labels = make_logits((5, 8)), make_labels(5, 8)
  shift = np.linspace(-20.0, 20.0, 5, dtype=np.float32)[:, None]
  assert_close(logitlab.cross_entropy(logits + shift, labels, **opts),
               np.asarray(logitlab.cross_entropy(logits, labels, **opts), np.float64), atol=5e-5)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.5, 1.0])
def test_t5x_perfect_fit_scores_zero(label_smoothing):
  labels = make_labels(4, 6)
  q = smoothed_target(labels, 6, label_smoothing, "t5x")
  logits = (np.log(np.maximum(q, 1e-13)) + 3.0).astype(np.float32)  # eps=1: q_y = 0
  loss = logitlab.cross_entropy(logits, labels, label_smoothing=label_smoothing, smoothing="t5x")
  assert_close(loss, np.zeros(4))


def test_uniform_smoothing_at_its_target_scores_the_target_entropy():
  """The uniform convention has no entropy term: a perfect fit scores ``H(q)`` > 0."""
  labels = make_labels(4, 6)
  q = smoothed_target(labels, 6, 0.2, "uniform")
  loss = logitlab.cross_entropy(np.log(q).astype(np.float32), labels, label_smoothing=0.2)
  assert_close(loss, -np.sum(q * np.log(q), -1))


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def garbage_rows(logits, rows):
  """Fills ``rows`` of ``logits`` with -inf, huge and NaN values."""
  logits = logits.copy()
  for i, row in enumerate(rows):
    logits[row] = (-np.inf, 1e30, np.nan)[i % 3]
    logits[row, 0] = (1e30, -np.inf, 0.0)[i % 3]
  return logits


@each_option()
@pytest.mark.parametrize("mask_kind", ["where", "ignore_index"])
def test_masked_examples_zero_loss_and_grad(opts, mask_kind):
  logits, labels = make_logits((6, 5)), make_labels(6, 5)
  masked = np.array([False, True, False, True, True, False])
  bad_logits = garbage_rows(logits, np.flatnonzero(masked))
  bad_labels = np.where(masked, -100, labels)
  kwargs = dict(where=~masked) if mask_kind == "where" else dict(ignore_index=-100)
  loss, grad = loss_and_grad(logitlab.cross_entropy, bad_logits, bad_labels, **kwargs, **opts)
  assert np.all(loss[masked] == 0) and np.all(grad[masked] == 0)
  ref_loss, _, ref_grad = ref_cross_entropy(logits[~masked], labels[~masked], **opts)
  assert_close(loss[~masked], ref_loss)
  assert_close(grad[~masked], ref_grad)


@pytest.mark.parametrize("fn", [logitlab.softmax_cross_entropy, logitlab.kl_divergence])
def test_soft_losses_masked_examples_zero_loss_and_grad(fn):
  masked = np.array([False, True, True, False])
  logits = garbage_rows(make_logits((4, 5)), np.flatnonzero(masked))
  targets = make_probs((4, 5))
  targets[masked] = np.nan
  loss, grad = loss_and_grad(fn, logits, targets, where=~masked)
  assert np.all(loss[masked] == 0) and np.all(grad[masked] == 0)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  assert_close(loss[~masked], fn(logits[~masked], targets[~masked]))


# Classes 1, 4 and 6 of 7 are masked out for every row.
SELECTED = np.array([True, False, True, True, False, True, False])


@each_option()
def test_class_mask_equals_sliced_logits(opts):
  logits = make_logits((3, 7))
  logits[0, 1], logits[1, 4], logits[2, 6] = -np.inf, 1e30, -1e30
  labels = np.array([0, 3, 5], np.int32)  # selected classes
  mask = np.broadcast_to(SELECTED, logits.shape)
  (loss, lse), vjp = jax.vjp(
      lambda x: logitlab.cross_entropy(x, labels, where=mask, return_lse=True, **opts), logits)
  sliced = logits[:, SELECTED]
  sliced_labels = np.searchsorted(np.flatnonzero(SELECTED), labels).astype(np.int32)
  (ref_loss, ref_lse), ref_vjp = jax.vjp(
      lambda x: logitlab.cross_entropy(x, sliced_labels, return_lse=True, **opts), sliced)
  assert_close(loss, np.asarray(ref_loss, np.float64))
  assert_close(lse, np.asarray(ref_lse, np.float64))
  ones = jnp.ones(3)
  grad, ref_grad = vjp((ones, jnp.zeros(3)))[0], ref_vjp((ones, jnp.zeros(3)))[0]
  assert np.all(grad[:, ~SELECTED] == 0)
  assert_close(grad[:, SELECTED], np.asarray(ref_grad, np.float64))


@each_option(("plain", "uniform", "t5x", "uniform_zloss_softcap", "t5x_zloss_softcap"))
def test_row_varying_class_mask_matches_reference(opts):
  """Each row keeps its own classes (at least two, or none in the last row)."""
  logits, labels = make_logits((5, 9)), make_labels(5, 9)
  mask = np.random.default_rng(4).random((5, 9)) < 0.5
  rows = np.arange(5)
  mask[rows, labels] = mask[rows, (labels + 1) % 9] = True
  mask[-1] = False
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, where=mask, **opts)
  _, lse = logitlab.cross_entropy(logits, labels, where=mask, return_lse=True, **opts)
  ref_loss, ref_lse, ref_grad = ref_class_masked(logits, labels, mask, **opts)
  assert_close(loss, ref_loss)
  assert_close(lse, ref_lse)
  assert_close(grad, ref_grad)


@pytest.mark.parametrize("fn", [logitlab.softmax_cross_entropy, logitlab.kl_divergence])
def test_soft_losses_class_mask_equals_sliced(fn):
  logits = make_logits((3, 7))
  logits[:, ~SELECTED] = -np.inf
  targets = make_probs((3, 7))
  sliced_targets = make_probs((3, int(SELECTED.sum())), seed=5)
  targets[:, SELECTED] = sliced_targets
  loss, grad = loss_and_grad(fn, logits, targets, where=np.broadcast_to(SELECTED, (3, 7)))
  ref_loss, ref_grad = loss_and_grad(fn, logits[:, SELECTED], sliced_targets)
  assert_close(loss, np.asarray(ref_loss, np.float64))
  assert np.all(grad[:, ~SELECTED] == 0)
  assert_close(grad[:, SELECTED], np.asarray(ref_grad, np.float64))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_nan_in_masked_class_gives_zero_gradient(softcap):
  """A class outside ``where`` contributes 0 loss and 0 gradient, whatever its value."""
  logits = make_logits((2, 5))
  logits[:, 3] = np.nan
  mask = np.broadcast_to(np.arange(5) != 3, (2, 5))
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, np.array([0, 4], np.int32),
                             where=mask, softcap=softcap)
  assert np.all(np.isfinite(loss))
  assert np.all(grad[:, 3] == 0) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("smoothing", ["uniform", "t5x"])
def test_single_selected_class_scores_nonnegative(smoothing):
  """With one class selected, softmax is 1 on it: a KL-type loss cannot be negative."""
  logits = make_logits((2, 4))
  mask = np.array([[False, True, False, False], [True, True, True, True]])
  loss = logitlab.cross_entropy(logits, np.array([1, 2], np.int32), where=mask,
                                label_smoothing=0.1, smoothing=smoothing)
  assert np.all(np.asarray(loss) >= -1e-6), loss


# ----------------------------------------------------------------------------
# Dtypes and large logits.
# ----------------------------------------------------------------------------

LOW_PRECISION = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
def test_low_precision_inputs_give_float32(dtype):
  logits = jnp.asarray(make_logits((4, 6)), dtype)
  targets = jnp.asarray(make_probs((4, 6)), dtype)
  outputs = [
      logitlab.cross_entropy(logits, make_labels(4, 6), label_smoothing=0.1, z_loss=1e-4),
      logitlab.cross_entropy(logits, make_labels(4, 6), return_lse=True)[1],
      logitlab.softmax_cross_entropy(logits, targets),
      logitlab.kl_divergence(jax.nn.log_softmax(logits), targets),
  ]
  assert [o.dtype for o in outputs] == [jnp.float32] * 4
  grad = jax.grad(lambda x: jnp.sum(logitlab.cross_entropy(x, make_labels(4, 6))))(logits)
  assert grad.dtype == dtype


@each_option(("plain", "uniform", "t5x", "zloss1e-2", "softcap", "t5x_zloss_softcap"))
def test_bf16_rule(opts):
  """``|ref_f32 - impl| <= |ref_f32 - naive_bf16| + tol`` (DESIGN.md, Numerics)."""
  logits = jnp.asarray(make_logits((16, 50), scale=4.0), jnp.bfloat16)
  labels = make_labels(16, 50)
  ref = ref_cross_entropy(np.asarray(logits, np.float32), labels, **opts)[0]
  impl = np.asarray(logitlab.cross_entropy(logits, labels, **opts), np.float64)
  naive = np.asarray(naive_cross_entropy(logits, labels, **opts), np.float64)
  assert np.all(np.abs(ref - impl) <= np.abs(ref - naive) + 1e-5 * (1 + np.abs(ref)))


@each_option(("plain", "t5x", "zloss1e-2", "softcap"))
def test_float16_values_match_reference(opts):
  logits = make_logits((4, 7), dtype=np.float16)
  labels = make_labels(4, 7)
  assert_close(logitlab.cross_entropy(logits, labels, **opts),
               ref_cross_entropy(logits, labels, **opts)[0])


@each_option(("plain", "uniform_zloss_softcap", "t5x_zloss_softcap", "zloss1e-2"))
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_large_logits_are_finite(opts, softcap):
  opts = {**opts, "softcap": softcap if softcap else opts.get("softcap")}
  logits, labels = make_logits((4, 10), scale=1e4), make_labels(4, 10)
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, **opts)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  ref_loss, _, ref_grad = ref_cross_entropy(logits, labels, **opts)
  assert_close(loss, ref_loss)
  assert_close(grad, ref_grad)


# ----------------------------------------------------------------------------
# Transformations.
# ----------------------------------------------------------------------------


@each_option(("plain", "t5x_zloss_softcap"))
def test_jit_matches_reference(opts):
  logits, labels = make_logits((4, 7)), make_labels(4, 7)
  where = np.array([True, False, True, True])
  jitted = jax.jit(functools.partial(logitlab.cross_entropy, **opts))
  ref = ref_cross_entropy(logits, labels, **opts)[0]
  assert_close(jitted(logits, labels, where=where), np.where(where, ref, 0.0))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jitted(x, labels))))(logits)
  assert_close(grad, ref_cross_entropy(logits, labels, **opts)[2])


@each_option(("plain", "uniform_zloss_softcap"))
def test_vmap_matches_batched_call(opts):
  logits, labels = make_logits((3, 4, 7)), make_labels((3, 4), 7)
  where = np.random.default_rng(6).random((3, 4)) < 0.7
  per_example = functools.partial(logitlab.cross_entropy, **opts)
  mapped = jax.vmap(lambda x, y, w: per_example(x, y, where=w))(logits, labels, where)
  assert_close(mapped, np.asarray(per_example(logits, labels, where=where), np.float64))
  ref = ref_cross_entropy(logits, labels, **opts)[0]
  assert_close(mapped, np.where(where, ref, 0.0))
  mapped_grad = jax.vmap(jax.grad(lambda x, y: jnp.sum(per_example(x, y))))(logits, labels)
  assert_close(mapped_grad, ref_cross_entropy(logits, labels, **opts)[2])


@pytest.mark.parametrize("where", [None, "examples", "classes", "ignore_index"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_return_lse(where, softcap):
  logits, labels = make_logits((5, 6)), make_labels(5, 6)
  keep_rows = np.array([True, False, True, True, False])
  kwargs, class_mask = {}, np.ones((5, 6), bool)
  if where == "examples":
    kwargs = dict(where=keep_rows)
  elif where == "ignore_index":
    kwargs = dict(ignore_index=-1)
    labels = np.where(keep_rows, labels, -1).astype(np.int32)
  elif where == "classes":
    class_mask = np.arange(6) != (labels[:, None] + 2) % 6
    class_mask[~keep_rows] = False
    kwargs = dict(where=class_mask)
  else:
    keep_rows[:] = True
  loss, lse = logitlab.cross_entropy(logits, labels, softcap=softcap, return_lse=True, **kwargs)
  z = logits.astype(np.float64) if softcap is None else softcap * np.tanh(logits / softcap)
  expected = np_logsumexp(np.where(class_mask, z, -np.inf))
  assert lse.dtype == jnp.float32
  assert_close(lse, np.where(keep_rows, expected, 0.0))
  assert_close(loss, np.asarray(logitlab.cross_entropy(logits, labels, softcap=softcap, **kwargs),
                                np.float64))


# ----------------------------------------------------------------------------
# Argument errors.
# ----------------------------------------------------------------------------

X = np.zeros((3, 5), np.float32)
Y = np.zeros(3, np.int32)
P = np.full((3, 5), 0.2, np.float32)
ce = logitlab.cross_entropy

BAD_CALLS = {
    "int_logits": (lambda: ce(X.astype(np.int32), Y), TypeError, r"`logits`.*floating"),
    "float_labels": (lambda: ce(X, Y.astype(np.float32)), TypeError, r"`labels`.*integer"),
    "labels_shape": (lambda: ce(X, np.zeros(4, np.int32)), ValueError, r"`labels`.*\(4,\).*\(3,\)"),
    "labels_shape_axis": (lambda: ce(X, Y, axis=0), ValueError, r"`labels`.*\(3,\).*\(5,\)"),
    "smoothing_name": (lambda: ce(X, Y, smoothing="pytorch"), ValueError, r"`smoothing`.*pytorch"),
    "eps_negative": (lambda: ce(X, Y, label_smoothing=-0.1), ValueError, "`label_smoothing`"),
    "eps_above_one": (lambda: ce(X, Y, label_smoothing=1.5), ValueError, "`label_smoothing`"),
    "eps_nan": (lambda: ce(X, Y, label_smoothing=float("nan")), ValueError, "`label_smoothing`"),
    "eps_string": (lambda: ce(X, Y, label_smoothing="0.1"), TypeError, "`label_smoothing`"),
    "z_loss_negative": (lambda: ce(X, Y, z_loss=-1e-4), ValueError, "`z_loss`"),
    "softcap_zero": (lambda: ce(X, Y, softcap=0.0), ValueError, "`softcap`"),
    "softcap_negative": (lambda: ce(X, Y, softcap=-5.0), ValueError, "`softcap`"),
    "ignore_index_float": (lambda: ce(X, Y, ignore_index=1.5), TypeError, "`ignore_index`"),
    "where_float": (lambda: ce(X, Y, where=np.ones(3)), TypeError, r"`where`.*bool"),
    "where_broadcast": (lambda: ce(X, Y, where=np.ones(4, bool)), ValueError,
                        r"`where`.*\(4,\).*\(3,\)"),
    "where_class_broadcast": (lambda: ce(X, Y, where=np.ones((3, 4), bool)), ValueError,
                              r"`where`.*\(3, 4\)"),
    "axis_out_of_range": (lambda: ce(X, Y, axis=2), ValueError, r"`axis`.*range"),
    "axis_negative_out_of_range": (lambda: ce(X, Y, axis=-3), ValueError, r"`axis`.*range"),
    "axis_repeated": (lambda: ce(X[None], Y[None], axis=(2, -1)), ValueError, r"`axis`.*repeat"),
    "axis_float": (lambda: ce(X, Y, axis=1.0), TypeError, "`axis`"),
    "axis_bool": (lambda: ce(X, Y, axis=True), TypeError, "`axis`"),
    "axis_empty": (lambda: ce(X, Y, axis=()), TypeError, "`axis`"),
    "axis_list": (lambda: ce(X, Y, axis=[1]), TypeError, "`axis`"),
    "t5x_one_class": (lambda: ce(X[:, :1], Y, label_smoothing=0.1, smoothing="t5x"), ValueError,
                      r"t5x.*V=1"),
    "scalar_logits": (lambda: ce(np.float32(1.0), np.int32(0)), ValueError, "`logits`.*scalar"),
    "soft_ce_int_logits": (lambda: logitlab.softmax_cross_entropy(X.astype(np.int32), P),
                           TypeError, "`logits`"),
    "soft_ce_int_labels": (lambda: logitlab.softmax_cross_entropy(X, P.astype(np.int32)),
                           TypeError, "`labels`"),
    "soft_ce_shape": (lambda: logitlab.softmax_cross_entropy(X, P[:, :4]), ValueError,
                      r"`labels`.*\(3, 4\).*\(3, 5\)"),
    "soft_ce_where_float": (lambda: logitlab.softmax_cross_entropy(X, P, where=np.ones(3)),
                            TypeError, "`where`"),
    "soft_ce_axis": (lambda: logitlab.softmax_cross_entropy(X, P, axis=5), ValueError, "`axis`"),
    "kl_int_log_predictions": (lambda: logitlab.kl_divergence(X.astype(np.int32), P), TypeError,
                               "`log_predictions`"),
    "kl_int_targets": (lambda: logitlab.kl_divergence(X, P.astype(np.int32)), TypeError,
                       "`targets`"),
    "kl_shape": (lambda: logitlab.kl_divergence(X, P[:2]), ValueError,
                 r"`targets`.*\(2, 5\).*\(3, 5\)"),
    "kl_where_broadcast": (lambda: logitlab.kl_divergence(X, P, where=np.ones(5, bool)),
                           ValueError, "`where`"),
}


@pytest.mark.parametrize("call, error, match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_raise(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap"])
def test_traced_hyperparameter_raises_under_jit(name):
  with pytest.raises(TypeError, match=rf"`{name}`.*static"):
    jax.jit(lambda x, h: ce(x, Y, **{name: h}))(X, 0.5)


def test_traced_ignore_index_raises_under_jit():
  with pytest.raises(TypeError, match="`ignore_index`"):
    jax.jit(lambda x, i: ce(x, Y, ignore_index=i))(X, -100)
