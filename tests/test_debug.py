"""Tests of ``logitlab.debug_checks``: run-time value checks that work under jit."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

LOGITS = np.zeros((3, 5), np.float32)
GOOD_LABELS = np.array([0, 4, 2], np.int32)
BAD_LABELS = np.array([0, 7, 2], np.int32)
LABEL_ERROR = r"cross_entropy: 1 unmasked label\(s\) outside \[0, 5\), e\.g\. 7"


def jitted_ce(**kwargs):
  """A fresh jitted ``cross_entropy`` (nothing cached from other tests)."""
  return jax.jit(lambda logits, labels: logitlab.cross_entropy(logits, labels, **kwargs))


def run(fn, *args):
  """Calls ``fn`` and waits for the result, so that callback errors surface here."""
  return np.asarray(jax.block_until_ready(fn(*args)))


def with_nan(x, index=(1, 2)):
  x = np.array(x)
  x[index] = np.nan
  return x


@pytest.mark.parametrize("labels, match", [
    (BAD_LABELS, LABEL_ERROR),
    (np.array([0, -1, 9], np.int32), r"2 unmasked label\(s\) outside \[0, 5\), e\.g\. -1"),
], ids=["too_large", "negative_and_too_large"])
def test_out_of_range_labels_raise_under_jit(labels, match):
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
      run(jitted_ce(), LOGITS, labels)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_logits_raise_under_jit(value):
  logits = LOGITS.copy()
  logits[1, 2] = value
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"cross_entropy: `logits` of shape \(3, 5\) holds 1 non-finite "
                             r"value\(s\), the first at flat index 7"):
      run(jitted_ce(), logits, GOOD_LABELS)


@pytest.mark.parametrize("fn, args, match", [
    (logitlab.softmax_cross_entropy, (LOGITS, with_nan(np.full((3, 5), 0.2, np.float32))),
     r"softmax_cross_entropy: `labels` of shape \(3, 5\) holds 1 non-finite"),
    (logitlab.softmax_cross_entropy, (with_nan(LOGITS), np.full((3, 5), 0.2, np.float32)),
     r"softmax_cross_entropy: `logits` of shape \(3, 5\) holds 1 non-finite"),
    (logitlab.kl_divergence, (LOGITS, with_nan(np.full((3, 5), 0.2, np.float32))),
     r"kl_divergence: `targets` of shape \(3, 5\) holds 1 non-finite"),
], ids=["soft_ce_labels", "soft_ce_logits", "kl_targets"])
def test_soft_losses_nonfinite_inputs_raise_under_jit(fn, args, match):
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
      run(jax.jit(fn), *args)


def test_eager_call_raises_value_error():
  with logitlab.debug_checks():
    with pytest.raises(ValueError, match=LABEL_ERROR):
      run(logitlab.cross_entropy, LOGITS, BAD_LABELS)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_checks_run_under_grad_and_vmap(transform):
  loss = lambda x, y: jnp.sum(logitlab.cross_entropy(x, y))
  fn = jax.jit(jax.grad(loss) if transform == "grad" else jax.vmap(loss))
  logits, labels = LOGITS, BAD_LABELS
  if transform == "vmap":
    logits, labels = np.stack([LOGITS, LOGITS]), np.stack([GOOD_LABELS, BAD_LABELS])
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError, match="unmasked label"):
      run(fn, logits, labels)


def test_no_checks_outside_the_context():
  """Without debug checks the bad label reaches the computation (a NaN loss), no error."""
  loss = run(jitted_ce(), LOGITS, BAD_LABELS)
  assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
  assert np.all(np.isnan(run(jitted_ce(), with_nan(LOGITS), GOOD_LABELS)[1]))


def test_function_traced_before_the_context_is_checked_inside_it():
  """Entering and leaving the context clears caches, so a jitted function is retraced."""
  fn = jitted_ce()
  run(fn, LOGITS, BAD_LABELS)  # traced and cached without checks
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError, match=LABEL_ERROR):
      run(fn, LOGITS, BAD_LABELS)
    with logitlab.debug_checks(False):
      assert np.isnan(run(fn, LOGITS, BAD_LABELS)[1])
    with pytest.raises(jax.errors.JaxRuntimeError, match=LABEL_ERROR):
      run(fn, LOGITS, BAD_LABELS)
  assert np.isnan(run(fn, LOGITS, BAD_LABELS)[1])


@pytest.mark.parametrize("labels, kwargs", [
    ([0, 9, 2], dict(where=np.array([True, False, True]))),
    ([0, -100, 2], dict(ignore_index=-100)),
    ([0, -100, 9], dict(ignore_index=-100, where=np.array([True, True, False]))),
], ids=["where", "ignore_index", "both"])
def test_masked_out_of_range_labels_do_not_raise(labels, kwargs):
  with logitlab.debug_checks():
    loss = run(jitted_ce(**kwargs), LOGITS, np.array(labels, np.int32))
  keep = np.array(labels) == np.clip(labels, 0, 4)
  np.testing.assert_allclose(loss, np.where(keep, np.log(5), 0.0), rtol=1e-6)


@pytest.mark.parametrize("case", ["masked_example", "masked_class"])
def test_nonfinite_logits_outside_the_mask_do_not_raise(case):
  """Values the mask removes are not checked (as for labels): -inf on a masked class, a
  NaN row of a masked example, are valid inputs that cross_entropy handles."""
  logits = LOGITS.copy()
  if case == "masked_example":
    logits[1] = np.nan
    where = np.array([True, False, True])
  else:
    logits[:, 3] = -np.inf  # e.g. padded vocabulary entries
    where = np.broadcast_to(np.arange(5) != 3, (3, 5))
  fn = jax.jit(lambda x, y, w: logitlab.cross_entropy(x, y, where=w))
  with logitlab.debug_checks():
    loss = run(fn, logits, GOOD_LABELS, where)
  assert np.all(np.isfinite(loss))


SUBPROCESS_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, logitlab
  try:
    jax.jit(logitlab.cross_entropy)(jnp.zeros((2, 5)), jnp.array([0, 9])).block_until_ready()
  except jax.errors.JaxRuntimeError as e:
    print("RAISED" if "1 unmasked label(s) outside [0, 5)" in str(e) else "OTHER ERROR")
  else:
    print("NO ERROR")
""")


@pytest.mark.parametrize("value, expected", [("1", "RAISED"), ("0", "NO ERROR")])
def test_environment_variable_enables_checks_at_import(value, expected):
  env = {**os.environ, "LOGITLAB_DEBUG": value, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
  assert result.stdout.strip().splitlines()[-1] == expected, result.stderr


HIDDEN = np.ones((2, 4, 3), np.float32)        # [batch, seq, D]
WEIGHT = np.zeros((6, 3), np.float32)          # V = 6
BIAS = np.zeros((6,), np.float32)


def jitted_lce(**kwargs):
  return jax.jit(lambda h, w, b, y: logitlab.linear_cross_entropy(h, w, y, bias=b, **kwargs))


@pytest.mark.parametrize("labels, kwargs, match", [
    ([[0, 1, 2, 6], [0, 0, 0, 0]], {}, r"linear_cross_entropy: 1 unmasked label\(s\) outside "
                                        r"\[0, 6\), e\.g\. 6"),
    # with shift=1 the label at position 0 is never read, the one at position 3 is.
    ([[9, 1, 2, -3], [0, 0, 0, 0]], {"shift": 1}, r"1 unmasked label\(s\) outside \[0, 6\), e\.g\. -3"),
], ids=["plain", "shifted"])
def test_linear_cross_entropy_checks_labels_it_reads(labels, kwargs, match):
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
      run(jitted_lce(**kwargs), HIDDEN, WEIGHT, BIAS, np.array(labels, np.int32))


@pytest.mark.parametrize("name", ["hidden", "weight", "bias"])
def test_linear_cross_entropy_checks_inputs_are_finite(name):
  inputs = {"hidden": HIDDEN, "weight": WEIGHT, "bias": BIAS}
  inputs[name] = with_nan(inputs[name], (0,) * inputs[name].ndim)
  labels = np.zeros((2, 4), np.int32)
  with logitlab.debug_checks():
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=rf"linear_cross_entropy: `{name}` of shape .* holds 1 non-finite"):
      run(jitted_lce(), inputs["hidden"], inputs["weight"], inputs["bias"], labels)


def test_linear_cross_entropy_skips_masked_and_shifted_out_labels():
  labels = np.array([[7, 1, 2, -100], [0, -100, 0, 0]], np.int32)
  with logitlab.debug_checks():
    loss = run(jitted_lce(shift=1, ignore_index=-100), HIDDEN, WEIGHT, BIAS, labels)
  np.testing.assert_allclose(loss, np.where([[1, 1, 0, 0], [0, 1, 1, 0]], np.log(6), 0.0), rtol=1e-6)
