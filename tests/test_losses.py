"""Tests of the materialized-logits losses in ``logitlab.losses``.

``cross_entropy`` is checked against a float64 numpy reference written from the
formula (dense smoothed target ``q``: ``sum q log q - sum q log p + z_loss lse^2``)
and its analytic gradient; the optax-compatible arguments against optax itself.
Most tests share one ``[4, 7]`` shape so that compiled programs are reused.
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
SHAPE = (4, 7)  # (batch, classes) of most tests
BATCH, NUM_CLASSES = SHAPE

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
# Option sets that exercise every term, for the more expensive tests.
MIXED = ("plain", "t5x", "uniform_zloss_softcap", "t5x_zloss_softcap")


def each_option(names=tuple(OPTIONS)):
  """Parametrizes a test's ``opts`` over the named entries of ``OPTIONS``."""
  return pytest.mark.parametrize("opts", [OPTIONS[n] for n in names], ids=list(names))


# ----------------------------------------------------------------------------
# Data and float64 numpy references.
# ----------------------------------------------------------------------------


def make_logits(shape=SHAPE, seed=0, scale=3.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def make_labels(batch_shape=BATCH, num_classes=NUM_CLASSES, seed=1):
  return np.random.default_rng(seed).integers(0, num_classes, batch_shape).astype(np.int32)


def make_probs(shape=SHAPE, seed=2, zero_fraction=0.0):
  """Random distributions over the last axis, with about ``zero_fraction`` exact zeros."""
  rng = np.random.default_rng(seed)
  p = np.exp(rng.standard_normal(shape)) * (rng.random(shape) >= zero_fraction)
  p[..., 0] += 1e-3  # no all-zero row
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def np_logsumexp(z):
  """float64 logsumexp over the last axis (-inf for an all -inf row)."""
  peak = np.max(z, axis=-1, keepdims=True)
  peak = np.where(np.isfinite(peak), peak, 0.0)
  with np.errstate(divide="ignore"):
    return peak[..., 0] + np.log(np.sum(np.exp(z - peak), axis=-1))


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
  q = jnp.asarray(smoothed_target(labels, z.shape[-1], label_smoothing, smoothing), z.dtype)
  q_log_q = jnp.sum(jax.scipy.special.xlogy(q, q), axis=-1) if smoothing == "t5x" else 0.0
  return q_log_q - jnp.sum(q * log_p, axis=-1) + z_loss * jax.nn.logsumexp(z, axis=-1) ** 2


# Keyword arguments that select code paths: static under jit.
STATIC_KWARGS = ("axis", "ignore_index", "label_smoothing", "smoothing", "z_loss", "softcap")


@functools.partial(jax.jit, static_argnums=0, static_argnames=STATIC_KWARGS)
def loss_and_grad(fn, logits, *args, **kwargs):
  """Per-example loss of ``fn`` and the gradient of its sum w.r.t. ``logits`` (jitted)."""
  def total(x):
    loss = fn(x, *args, **kwargs)
    return jnp.sum(loss), loss
  (_, loss), grad = jax.value_and_grad(total, has_aux=True)(logits)
  return loss, grad


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# Values and gradients against the references.
# ----------------------------------------------------------------------------


@each_option()
@pytest.mark.parametrize("shape", [SHAPE, (2, 3, 4)], ids=["2d", "3d"])
def test_cross_entropy_matches_reference(opts, shape):
  """Values and the analytic gradient ``((1 + 2 z_loss lse) p - q) (1 - tanh^2)``."""
  logits, labels = make_logits(shape), make_labels(shape[:-1], shape[-1])
  loss = logitlab.cross_entropy(logits, labels, **opts)
  assert loss.dtype == jnp.float32 and loss.shape == shape[:-1]
  ref_loss, _, ref_grad = ref_cross_entropy(logits, labels, **opts)
  assert_close(loss, ref_loss)
  assert_close(loss_and_grad(logitlab.cross_entropy, logits, labels, **opts)[1], ref_grad)


@each_option(("plain", "uniform_zloss_softcap", "t5x_zloss_softcap"))
def test_cross_entropy_check_grads(opts):
  loss = jax.jit(functools.partial(logitlab.cross_entropy, labels=make_labels(), **opts))
  check_grads(loss, (jnp.asarray(make_logits(scale=1.0)),), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)


@settings(max_examples=25, deadline=None)
@given(
    num_classes=st.integers(2, 40),
    batch=st.integers(1, 6),
    smoothing=st.sampled_from(["uniform", "t5x"]),
    label_smoothing=st.sampled_from([0.0, 0.05, 1.0]) | st.floats(0.0, 1.0),
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
    (SHAPE, -1, None),
    (SHAPE, -1, "examples"),
    (SHAPE, -1, "classes"),
    ((2, 3, 4), 1, None),
    ((2, 3, 4), 1, "examples"),
    ((2, 3, 4), -2, "classes"),
    ((2, 3, 4), (1, 2), None),
    ((2, 3, 4), (-2, -1), "examples"),
    ((2, 3, 4), (1, 2), "classes"),
    ((2, 3, 4), (0, 2), "examples"),
    ((2, 3, 4), (2, 1), None),  # optax flattens the class axes in the order given
    ((2, 3, 4), (2, 1), "classes"),
]


def optax_case(shape, axis, where, seed=3):
  """Returns ``(logits, batch_shape, num_classes, mask or None)`` for an ``OPTAX_CASES`` entry."""
  axes = [a % len(shape) for a in np.atleast_1d(axis)]
  batch_shape = tuple(n for a, n in enumerate(shape) if a not in axes)
  num_classes = int(np.prod([shape[a] for a in axes]))
  mask_shape = {None: None, "examples": batch_shape, "classes": shape}[where]
  mask = None if where is None else np.random.default_rng(seed).random(mask_shape) < 0.7
  return make_logits(shape, seed=seed), batch_shape, num_classes, mask


def as_jax(mask):
  """optax calls ``where.ndim``, so it needs an array (or None)."""
  return None if mask is None else jnp.asarray(mask)


@pytest.mark.parametrize("shape, axis, where", OPTAX_CASES)
def test_cross_entropy_matches_optax(shape, axis, where):
  logits, batch_shape, num_classes, mask = optax_case(shape, axis, where)
  labels = make_labels(batch_shape, num_classes)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis=axis,
                                                             where=as_jax(mask))
  assert_close(logitlab.cross_entropy(logits, labels, axis=axis, where=mask), expected)


@pytest.mark.parametrize("shape, axis, where", OPTAX_CASES)
def test_softmax_cross_entropy_matches_optax(shape, axis, where):
  logits, _, _, mask = optax_case(shape, axis, where)
  labels = make_probs(shape)
  expected = optax.softmax_cross_entropy(logits, labels, axis=axis, where=as_jax(mask))
  actual = logitlab.softmax_cross_entropy(logits, labels, axis=axis, where=mask)
  assert actual.dtype == jnp.float32
  assert_close(actual, expected)


@pytest.mark.parametrize("shape, axis, where", OPTAX_CASES)
def test_kl_divergence_matches_optax(shape, axis, where):
  logits, _, _, mask = optax_case(shape, axis, where)
  log_predictions = jax.nn.log_softmax(logits, axis=axis)
  targets = make_probs(shape, zero_fraction=0.3)
  optax_mask = mask
  if where == "examples":  # optax's kl_divergence masks terms only
    optax_mask = np.broadcast_to(np.expand_dims(mask, axis), shape)
  expected = optax.kl_divergence(log_predictions, targets, axis=axis, where=as_jax(optax_mask))
  actual = logitlab.kl_divergence(log_predictions, targets, axis=axis, where=mask)
  assert actual.dtype == jnp.float32
  assert_close(actual, expected)


# Classes 1, 4 and 6 of 7 are left out (set to -inf, or masked with `where`).
SELECTED = np.array([True, False, True, True, False, True, False])


@pytest.mark.parametrize("fn", [logitlab.softmax_cross_entropy, logitlab.kl_divergence])
def test_zero_target_on_neg_inf_logit_counts_zero(fn):
  """``0 * log 0`` and ``0 * (-inf)`` terms give 0 (not NaN), with finite gradients."""
  targets = np.zeros(SHAPE, np.float32)
  targets[:, SELECTED] = make_probs((BATCH, SELECTED.sum()))
  t = targets[:, SELECTED].astype(np.float64)
  log_p = np.asarray(jax.nn.log_softmax(make_logits()[:, SELECTED]), np.float64)
  inputs = np.full(SHAPE, -np.inf, np.float32)  # logits or log-predictions alike
  inputs[:, SELECTED] = log_p
  loss, grad = loss_and_grad(fn, inputs, targets)
  entropy = np.sum(t * np.log(t), -1) if fn is logitlab.kl_divergence else 0.0
  assert_close(loss, entropy - np.sum(t * log_p, -1))
  assert np.all(np.isfinite(grad)) and np.all(grad[:, ~SELECTED] == 0)


# ----------------------------------------------------------------------------
# Invariances.
# ----------------------------------------------------------------------------


@each_option(("plain", "uniform", "t5x", "t5x_eps1"))
def test_per_row_shift_invariance(opts):
  """Without z-loss and softcap the loss depends on ``z`` only through ``softmax(z)``."""
  logits, labels = make_logits(), make_labels()
  shift = np.linspace(-20.0, 20.0, BATCH, dtype=np.float32)[:, None]
  assert_close(logitlab.cross_entropy(logits + shift, labels, **opts),
               logitlab.cross_entropy(logits, labels, **opts), atol=5e-5)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.5, 1.0])
def test_t5x_perfect_fit_scores_zero(label_smoothing):
  labels = make_labels()
  q = smoothed_target(labels, NUM_CLASSES, label_smoothing, "t5x")
  logits = (np.log(np.maximum(q, 1e-13)) + 3.0).astype(np.float32)  # eps=1: q_y = 0
  loss = logitlab.cross_entropy(logits, labels, label_smoothing=label_smoothing, smoothing="t5x")
  assert_close(loss, np.zeros(BATCH))


def test_uniform_smoothing_at_its_target_scores_the_target_entropy():
  """The uniform convention has no entropy term: a perfect fit scores ``H(q)`` > 0."""
  labels = make_labels()
  q = smoothed_target(labels, NUM_CLASSES, 0.2, "uniform")
  loss = logitlab.cross_entropy(np.log(q).astype(np.float32), labels, label_smoothing=0.2)
  assert_close(loss, -np.sum(q * np.log(q), -1))


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------

MASKED_ROWS = np.array([False, True, False, True])


def with_garbage_rows(x, rows=MASKED_ROWS):
  """A copy of ``x`` whose ``rows`` hold -inf, huge and NaN values."""
  x = x.copy()
  garbage = np.array([-np.inf, 1e30, np.nan, -1e30, np.inf], np.float32)
  for shift, row in enumerate(np.flatnonzero(rows)):
    x[row] = np.resize(np.roll(garbage, shift), x.shape[-1])
  return x


@each_option(MIXED)
@pytest.mark.parametrize("mask_kind", ["where", "ignore_index"])
def test_masked_examples_zero_loss_and_grad(opts, mask_kind):
  logits, labels = make_logits(), make_labels()
  bad_labels = np.where(MASKED_ROWS, -100, labels).astype(np.int32)
  kwargs = dict(where=~MASKED_ROWS) if mask_kind == "where" else dict(ignore_index=-100)
  loss, grad = loss_and_grad(logitlab.cross_entropy, with_garbage_rows(logits), bad_labels,
                             **kwargs, **opts)
  assert np.all(loss[MASKED_ROWS] == 0) and np.all(grad[MASKED_ROWS] == 0)
  ref_loss, _, ref_grad = ref_cross_entropy(logits, labels, **opts)
  assert_close(loss[~MASKED_ROWS], ref_loss[~MASKED_ROWS])
  assert_close(grad[~MASKED_ROWS], ref_grad[~MASKED_ROWS])


@pytest.mark.parametrize("fn", [logitlab.softmax_cross_entropy, logitlab.kl_divergence])
def test_soft_losses_masked_examples_zero_loss_and_grad(fn):
  logits, targets = make_logits(), make_probs()
  loss, grad = loss_and_grad(fn, with_garbage_rows(logits), with_garbage_rows(targets),
                             where=~MASKED_ROWS)
  assert np.all(loss[MASKED_ROWS] == 0) and np.all(grad[MASKED_ROWS] == 0)
  assert np.all(np.isfinite(grad))
  assert_close(loss[~MASKED_ROWS], fn(logits, targets)[~MASKED_ROWS])


@each_option(("plain", "uniform", "t5x", "zloss1e-2", "t5x_zloss_softcap"))
def test_class_mask_equals_sliced_logits(opts):
  """Masked classes hold -inf or huge values; the result is that of the sliced logits."""
  logits = make_logits()
  logits[0, 1], logits[1, 4], logits[2, 6], logits[3, 1] = -np.inf, 1e30, -1e30, np.inf
  labels = np.array([0, 3, 5, 2], np.int32)  # selected classes
  mask = np.broadcast_to(SELECTED, SHAPE)
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, where=mask, **opts)
  sliced_labels = np.searchsorted(np.flatnonzero(SELECTED), labels).astype(np.int32)
  ref_loss, ref_grad = loss_and_grad(logitlab.cross_entropy, logits[:, SELECTED], sliced_labels,
                                     **opts)
  assert_close(loss, ref_loss)
  assert np.all(grad[:, ~SELECTED] == 0)
  assert_close(grad[:, SELECTED], ref_grad)


@each_option(("uniform", "t5x_zloss_softcap"))
def test_row_varying_class_mask_matches_reference(opts):
  """Each row keeps its own classes (at least two), the last row none."""
  logits, labels = make_logits(), make_labels()
  mask = np.random.default_rng(4).random(SHAPE) < 0.5
  rows = np.arange(BATCH)
  mask[rows, labels] = mask[rows, (labels + 1) % NUM_CLASSES] = True
  mask[-1] = False
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, where=mask, **opts)
  _, lse = logitlab.cross_entropy(logits, labels, where=mask, return_lse=True, **opts)
  ref_loss, ref_lse, ref_grad = ref_class_masked(logits, labels, mask, **opts)
  assert_close(loss, ref_loss)
  assert_close(lse, ref_lse)
  assert_close(grad, ref_grad)


@pytest.mark.parametrize("fn", [logitlab.softmax_cross_entropy, logitlab.kl_divergence])
def test_soft_losses_class_mask_equals_sliced(fn):
  logits = make_logits()
  logits[:, ~SELECTED] = -np.inf
  targets = make_probs()
  sliced_targets = make_probs((BATCH, SELECTED.sum()), seed=5)
  targets[:, SELECTED] = sliced_targets
  loss, grad = loss_and_grad(fn, logits, targets, where=np.broadcast_to(SELECTED, SHAPE))
  ref_loss, ref_grad = loss_and_grad(fn, logits[:, SELECTED], sliced_targets)
  assert_close(loss, ref_loss)
  assert np.all(grad[:, ~SELECTED] == 0)
  assert_close(grad[:, SELECTED], ref_grad)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_nan_in_masked_class_gives_zero_gradient(softcap):
  """A class outside ``where`` contributes 0 loss and 0 gradient, whatever its value."""
  logits = make_logits()
  logits[:, 3] = np.nan
  labels = np.where(make_labels() == 3, 0, make_labels()).astype(np.int32)
  mask = np.broadcast_to(np.arange(NUM_CLASSES) != 3, SHAPE)
  loss, grad = loss_and_grad(logitlab.cross_entropy, logits, labels, where=mask, softcap=softcap)
  assert np.all(np.isfinite(loss))
  assert np.all(grad[:, 3] == 0) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("smoothing", ["uniform", "t5x"])
def test_single_selected_class_scores_nonnegative(smoothing):
  """With one class selected, softmax is 1 on it: a KL-type loss cannot be negative."""
  labels = make_labels()
  mask = np.ones(SHAPE, bool)
  mask[0] = np.arange(NUM_CLASSES) == labels[0]
  loss = logitlab.cross_entropy(make_logits(), labels, where=mask, label_smoothing=0.1,
                                smoothing=smoothing)
  assert np.all(np.asarray(loss) >= -1e-6), loss


# ----------------------------------------------------------------------------
# Dtypes and large logits.
# ----------------------------------------------------------------------------


LOW_PRECISION_CALLS = {
    "cross_entropy": lambda x, p: logitlab.cross_entropy(x, make_labels(), label_smoothing=0.1,
                                                         z_loss=1e-4),
    "lse": lambda x, p: logitlab.cross_entropy(x, make_labels(), return_lse=True)[1],
    "softmax_cross_entropy": logitlab.softmax_cross_entropy,
    "kl_divergence": lambda x, p: logitlab.kl_divergence(jax.nn.log_softmax(x), p),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("call", LOW_PRECISION_CALLS.values(), ids=LOW_PRECISION_CALLS.keys())
def test_low_precision_inputs_give_float32(call, dtype):
  assert call(jnp.asarray(make_logits(), dtype), jnp.asarray(make_probs(), dtype)).dtype == \
      jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_low_precision_gradient_keeps_the_input_dtype(dtype):
  logits = jnp.asarray(make_logits(), dtype)
  assert loss_and_grad(logitlab.cross_entropy, logits, make_labels())[1].dtype == dtype


@each_option(("plain", "t5x", "zloss1e-2", "uniform_zloss_softcap"))
def test_bf16_rule(opts):
  """``|ref_f32 - impl| <= |ref_f32 - naive_bf16| + tol`` (DESIGN.md, Numerics)."""
  logits = jnp.asarray(make_logits((8, 64), scale=4.0), jnp.bfloat16)
  labels = make_labels(8, 64)
  ref = ref_cross_entropy(np.asarray(logits, np.float32), labels, **opts)[0]
  impl = np.asarray(logitlab.cross_entropy(logits, labels, **opts), np.float64)
  naive = np.asarray(naive_cross_entropy(logits, labels, **opts), np.float64)
  assert np.all(np.abs(ref - impl) <= np.abs(ref - naive) + 1e-5 * (1 + np.abs(ref)))


@each_option(("plain", "t5x", "zloss1e-2", "softcap"))
def test_float16_values_match_reference(opts):
  logits, labels = make_logits(dtype=np.float16), make_labels()
  assert_close(logitlab.cross_entropy(logits, labels, **opts),
               ref_cross_entropy(logits, labels, **opts)[0])


@pytest.mark.parametrize("opts", [{}, dict(z_loss=1e-2), dict(softcap=30.0),
                                  OPTIONS["t5x_zloss_softcap"]],
                         ids=["plain", "zloss", "softcap30", "t5x_zloss_softcap"])
def test_large_logits_are_finite(opts):
  logits, labels = make_logits(scale=1e4), make_labels()
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
  logits, labels = make_logits(), make_labels()
  jitted = jax.jit(functools.partial(logitlab.cross_entropy, **opts))
  ref_loss, _, ref_grad = ref_cross_entropy(logits, labels, **opts)
  assert_close(jitted(logits, labels, where=~MASKED_ROWS), np.where(MASKED_ROWS, 0.0, ref_loss))
  assert_close(jax.jit(jax.grad(lambda x: jnp.sum(jitted(x, labels))))(logits), ref_grad)


@each_option(("plain", "uniform_zloss_softcap"))
def test_vmap_matches_batched_call(opts):
  logits, labels = make_logits((3, *SHAPE)), make_labels((3, BATCH))
  where = np.random.default_rng(6).random((3, BATCH)) < 0.7
  per_example = functools.partial(logitlab.cross_entropy, **opts)
  mapped = jax.jit(jax.vmap(lambda x, y, w: per_example(x, y, where=w)))(logits, labels, where)
  assert_close(mapped, per_example(logits, labels, where=where))
  ref_loss, _, ref_grad = ref_cross_entropy(logits, labels, **opts)
  assert_close(mapped, np.where(where, ref_loss, 0.0))
  mapped_grad = jax.jit(jax.vmap(jax.grad(lambda x, y: jnp.sum(per_example(x, y)))))
  assert_close(mapped_grad(logits, labels), ref_grad)


@pytest.mark.parametrize("where", [None, "examples", "classes", "ignore_index"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_return_lse(where, softcap):
  logits, labels = make_logits(), make_labels()
  kwargs, class_mask, keep = {}, np.ones(SHAPE, bool), ~MASKED_ROWS
  if where == "examples":
    kwargs = dict(where=keep)
  elif where == "ignore_index":
    labels = np.where(keep, labels, -1).astype(np.int32)
    kwargs = dict(ignore_index=-1)
  elif where == "classes":
    class_mask = np.arange(NUM_CLASSES) != (labels[:, None] + 2) % NUM_CLASSES
    class_mask[~keep] = False
    kwargs = dict(where=class_mask)
  else:
    keep = np.ones(BATCH, bool)
  loss, lse = logitlab.cross_entropy(logits, labels, softcap=softcap, return_lse=True, **kwargs)
  z = logits.astype(np.float64) if softcap is None else softcap * np.tanh(logits / softcap)
  assert lse.dtype == jnp.float32
  assert_close(lse, np.where(keep, np_logsumexp(np.where(class_mask, z, -np.inf)), 0.0))
  assert_close(loss, logitlab.cross_entropy(logits, labels, softcap=softcap, **kwargs))


# ----------------------------------------------------------------------------
# Argument errors.
# ----------------------------------------------------------------------------

X = np.zeros(SHAPE, np.float32)
Y = np.zeros(BATCH, np.int32)
P = np.full(SHAPE, 1 / NUM_CLASSES, np.float32)
ce = logitlab.cross_entropy
soft_ce = logitlab.softmax_cross_entropy
kl = logitlab.kl_divergence

BAD_CALLS = {
    "int_logits": (lambda: ce(X.astype(np.int32), Y), TypeError, r"`logits`.*floating"),
    "float_labels": (lambda: ce(X, Y.astype(np.float32)), TypeError, r"`labels`.*integer"),
    "labels_shape": (lambda: ce(X, Y[:3]), ValueError, r"`labels`.*\(3,\).*\(4,\)"),
    "labels_shape_axis": (lambda: ce(X, Y, axis=0), ValueError, r"`labels`.*\(4,\).*\(7,\)"),
    "smoothing_name": (lambda: ce(X, Y, smoothing="pytorch"), ValueError, r"`smoothing`.*pytorch"),
    "eps_negative": (lambda: ce(X, Y, label_smoothing=-0.1), ValueError, "`label_smoothing`"),
    "eps_above_one": (lambda: ce(X, Y, label_smoothing=1.5), ValueError, "`label_smoothing`"),
    "eps_nan": (lambda: ce(X, Y, label_smoothing=float("nan")), ValueError, "`label_smoothing`"),
    "eps_string": (lambda: ce(X, Y, label_smoothing="0.1"), TypeError, "`label_smoothing`"),
    "z_loss_negative": (lambda: ce(X, Y, z_loss=-1e-4), ValueError, "`z_loss`"),
    "softcap_zero": (lambda: ce(X, Y, softcap=0.0), ValueError, "`softcap`"),
    "softcap_negative": (lambda: ce(X, Y, softcap=-5.0), ValueError, "`softcap`"),
    "ignore_index_float": (lambda: ce(X, Y, ignore_index=1.5), TypeError, "`ignore_index`"),
    "where_float": (lambda: ce(X, Y, where=np.ones(BATCH)), TypeError, r"`where`.*bool"),
    "where_broadcast": (lambda: ce(X, Y, where=np.ones(3, bool)), ValueError,
                        r"`where`.*\(3,\).*\(4,\)"),
    "where_class_broadcast": (lambda: ce(X, Y, where=np.ones((4, 3), bool)), ValueError,
                              r"`where`.*\(4, 3\)"),
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
    "soft_ce_int_logits": (lambda: soft_ce(X.astype(np.int32), P), TypeError, "`logits`"),
    "soft_ce_int_labels": (lambda: soft_ce(X, P.astype(np.int32)), TypeError, "`labels`"),
    "soft_ce_shape": (lambda: soft_ce(X, P[:, :5]), ValueError, r"`labels`.*\(4, 5\).*\(4, 7\)"),
    "soft_ce_where_float": (lambda: soft_ce(X, P, where=np.ones(BATCH)), TypeError, "`where`"),
    "soft_ce_axis": (lambda: soft_ce(X, P, axis=5), ValueError, "`axis`"),
    "kl_int_log_predictions": (lambda: kl(X.astype(np.int32), P), TypeError, "`log_predictions`"),
    "kl_int_targets": (lambda: kl(X, P.astype(np.int32)), TypeError, "`targets`"),
    "kl_shape": (lambda: kl(X, P[:2]), ValueError, r"`targets`.*\(2, 7\).*\(4, 7\)"),
    "kl_where_broadcast": (lambda: kl(X, P, where=np.ones(5, bool)), ValueError, "`where`"),
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


@pytest.mark.parametrize("smoothing", ["uniform", "t5x"])
def test_tiny_label_smoothing_equals_none(smoothing):
  """eps at float32's smallest normal: eps/(C-1) would underflow; the loss must stay finite."""
  logits = jnp.array([[0.1, 0.5, -0.2], [2.0, -1.0, 0.3]])
  labels = jnp.array([1, 0])
  tiny = logitlab.cross_entropy(logits, labels, label_smoothing=1.175494351e-38,
                                smoothing=smoothing)
  np.testing.assert_allclose(tiny, logitlab.cross_entropy(logits, labels), rtol=1e-6)
