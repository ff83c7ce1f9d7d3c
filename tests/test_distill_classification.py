"""Tests of ``logitlab.distill.classification`` against float64 numpy references.

Each reference follows the method's formula step by step (for DKD / NKD / USKD /
DHKD / DIST in the order of the official PyTorch code, e.g. DKD takes ``log`` of the
summed binary probabilities and masks the target with ``-1000``), never the code
under test. Reference gradients are central differences of the float64 references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import logitlab
from logitlab.distill import classification as cl
from numeric import fd_grad

N, C = 5, 7
RTOL, ATOL = 2e-5, 2e-5


# ----------------------------------------------------------------------------- data


def make_logits(seed, shape=(N, C), scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def make_labels(seed=7, shape=(N,)):
  return np.random.default_rng(seed).integers(0, C, shape).astype(np.int32)


# ----------------------------------------------------------------------------- references


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_kl_rows(p, log_q):
  """sum_c p (log p - log q) with 0 log 0 = 0 (torch ``kl_div`` uses xlogy)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * (np.log(p) - log_q), 0.0).sum(-1)


def ref_kd(s, t, y=None, *, temperature=4.0):
  pt = np_softmax(np.asarray(t, np.float64) / temperature)
  return temperature**2 * np_kl_rows(pt, np_log_softmax(np.asarray(s, np.float64) / temperature))


def ref_standardize(z, eps=1e-7, ddof=1):
  z = np.asarray(z, np.float64)
  return (z - z.mean(-1, keepdims=True)) / (eps + z.std(-1, ddof=ddof, keepdims=True))


def ref_ls_kd(s, t, y=None, *, temperature=2.0):
  return ref_kd(ref_standardize(s), ref_standardize(t), temperature=temperature)


def ref_dkd(s, t, y, *, alpha=1.0, beta=8.0, temperature=4.0, warmup_factor=1.0):
  """mdistiller ``dkd_loss`` per example, in float64."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  gt = np.eye(s.shape[-1])[y]
  ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
  bs = np.stack([(ps * gt).sum(-1), (ps * (1 - gt)).sum(-1)], -1)
  bt = np.stack([(pt * gt).sum(-1), (pt * (1 - gt)).sum(-1)], -1)
  tckd = np_kl_rows(bt, np.log(bs)) * temperature**2
  pt2 = np_softmax(t / temperature - 1000.0 * gt)
  ls2 = np_log_softmax(s / temperature - 1000.0 * gt)
  nckd = np_kl_rows(pt2, ls2) * temperature**2
  return warmup_factor * (alpha * tckd + beta * nckd)


def _drop_target(x, y):
  keep = ~np.eye(x.shape[-1], dtype=bool)[y]
  return x[keep].reshape(x.shape[0], -1)


def ref_nkd(s, t, y, *, temperature=1.0, gamma=1.5):
  """cls_KD ``NKDLoss`` per example (boolean-index removal of the target, as there)."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  rows = np.arange(len(y))
  loss_t = -np_softmax(t)[rows, y] * np_log_softmax(s)[rows, y]
  S = np_log_softmax(_drop_target(s, y) / temperature)
  T = np_softmax(_drop_target(t, y) / temperature)
  return loss_t - gamma * temperature**2 * (T * S).sum(-1)


def ref_uskd(s, w, y, *, alpha=1.0, beta=0.1, mu=0.005, official_rank_quirk=True,
             frozen=None):
  """cls_KD ``USKDLoss`` per example for integer labels.

  ``frozen``: the student logits the detached quantities (soft target weight,
  Zipf labels) are computed from; the point itself by default (for gradients by
  finite differences, pass the base point).
  """
  s = np.asarray(s, np.float64)
  f = s if frozen is None else np.asarray(frozen, np.float64)
  n, c = s.shape
  rows = np.arange(n)
  p_t = np_softmax(f)[rows, y] ** 2
  p_t = p_t + 1.0 - p_t.mean()
  loss_t = -p_t * np_log_softmax(s)[rows, y]
  onehot = np.eye(c)[y]
  rank = np.zeros((n, c))
  loss_weak = np.zeros(n)
  if w is not None:
    w = np.asarray(w, np.float64)
    target = 0.9 * onehot + 0.1 / c
    loss_weak = -(mu * target * np_log_softmax(w)).sum(-1)
    q = np_softmax(w)
    rank = rank + q / (1 - q[rows, y][:, None] + 1e-6)
  l = np_log_softmax(f) if official_rank_quirk else np_softmax(f)
  rank = rank + l / (1 - l[rows, y][:, None] + 1e-6)
  order = np.argsort(-rank, axis=-1, kind="stable")
  position = np.argsort(order, axis=-1, kind="stable")
  zipf = 1.0 / (position + 1.0)
  nz = _drop_target(zipf, y)
  nz = nz / nz.sum(-1, keepdims=True)
  loss_non = -(nz * np_log_softmax(_drop_target(s, y))).sum(-1)
  return alpha * loss_t + beta * loss_non + loss_weak


def ref_binary_kl_norm(s, t, y=None, *, temperature=2.0):
  """DHKD ``BinaryKLNorm`` per example (float64, where 1 - 1e-8 is representable)."""
  x = (np.asarray(s, np.float64) - np.asarray(t, np.float64)) / temperature
  d = np.clip(1 / (1 + np.exp(-x)), 1e-8, 1 - 1e-8)
  per_class = 0.5 * (np.log(0.5) - np.log(d)) + 0.5 * (np.log(0.5) - np.log(1 - d))
  return temperature**2 * per_class.sum(-1)


def ref_binary_kl(s, t, y=None, *, temperature=2.0):
  sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64) / temperature))
  ps, pt = np.clip(sig(s), 1e-8, 1 - 1e-8), np.clip(sig(t), 1e-8, 1 - 1e-8)
  per_class = pt * (np.log(pt) - np.log(ps)) + (1 - pt) * (np.log(1 - pt) - np.log(1 - ps))
  return temperature**2 * per_class.sum(-1)


def ref_pld(s, t, y, *, tau=1.0):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  out = np.zeros(len(y))
  for n in range(len(y)):
    others = [c for c in np.argsort(-t[n], kind="stable") if c != y[n]]
    pi = [int(y[n])] + [int(c) for c in others]
    alpha = np_softmax(t[n] / tau)[pi]
    zs = s[n, pi]
    out[n] = sum(alpha[k] * (np.logaddexp.reduce(zs[k:]) - zs[k]) for k in range(len(pi)))
  return out


def ref_dist(s, t, *, beta=1.0, gamma=1.0, temperature=1.0, eps=1e-8):
  """Official DIST (hunto ``dist_kd.py`` with torchdistill's ``tau``): a scalar."""
  ys = np_softmax(np.asarray(s, np.float64) / temperature)
  yt = np_softmax(np.asarray(t, np.float64) / temperature)

  def pearson(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)

  inter = 1 - pearson(ys, yt).mean()
  intra = 1 - pearson(ys.T, yt.T).mean()
  return temperature**2 * (beta * inter + gamma * intra)




# ----------------------------------------------------------------------------- registry

# name -> (call(s, t, y, where=None, **opts), ref(s, t, y, **opts)); for uskd ``t`` is the
# weak head's logits.
METHODS = {
    "kd": (lambda s, t, y, where=None, **o: cl.kd(s, t, where=where, **o), ref_kd),
    "ls_kd": (lambda s, t, y, where=None, temperature=2.0: cl.kd(
        cl.standardize_logits(s, where=where), cl.standardize_logits(t, where=where),
        temperature=temperature, where=where), ref_ls_kd),
    "dkd": (lambda s, t, y, where=None, **o: cl.dkd(s, t, y, where=where, **o), ref_dkd),
    "nkd": (lambda s, t, y, where=None, **o: cl.nkd(s, t, y, where=where, **o), ref_nkd),
    "uskd": (lambda s, t, y, where=None, **o: cl.uskd(s, y, weak_logits=t, where=where, **o),
             ref_uskd),
    "binary_kl_norm": (lambda s, t, y, where=None, **o: cl.binary_kl_norm(s, t, where=where, **o),
                       ref_binary_kl_norm),
    "binary_kl": (lambda s, t, y, where=None, **o: cl.binary_kl(s, t, where=where, **o),
                  ref_binary_kl),
    "pld": (lambda s, t, y, where=None, **o: cl.pld(s, t, y, where=where, **o), ref_pld),
}
# (method, options): the official defaults first, then other settings.
CASES = [
    ("kd", {}), ("kd", dict(temperature=1.0)), ("kd", dict(temperature=0.5)),
    ("ls_kd", {}), ("ls_kd", dict(temperature=4.0)),
    ("dkd", {}), ("dkd", dict(alpha=0.5, beta=2.0, temperature=1.0, warmup_factor=0.25)),
    ("nkd", {}), ("nkd", dict(temperature=2.0, gamma=0.5)),
    ("uskd", {}), ("uskd", dict(official_rank_quirk=False)),
    ("uskd", dict(alpha=0.5, beta=1.0, mu=0.1)),
    ("binary_kl_norm", {}), ("binary_kl_norm", dict(temperature=0.5)),
    ("binary_kl", {}), ("binary_kl", dict(temperature=1.0)),
    ("pld", {}), ("pld", dict(tau=3.0)),
]
CASE_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in CASES]
DEFAULTS = [(m, o) for m, o in CASES if not o]
DEFAULT_IDS = [m for m, _ in DEFAULTS]
TEACHER_METHODS = [m for m, _ in DEFAULTS if m != "uskd"]


@functools.lru_cache(maxsize=None)
def _jitted(method, opts):
  call = METHODS[method][0]
  return jax.jit(lambda s, t, y, where: call(s, t, y, where=where, **dict(opts)))


def run(method, s, t, y, where=None, **opts):
  """``METHODS[method]`` through one jitted program per (method, options) (eager dispatch of
  every small op would dominate the test time)."""
  return _jitted(method, tuple(sorted(opts.items())))(s, t, y, where)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("method,opts", CASES, ids=CASE_IDS)
def test_values_and_student_gradient_match_float64_reference(method, opts):
  s, t, y = make_logits(0), make_logits(1), make_labels()
  ref = METHODS[method][1]
  weights = np.linspace(0.5, 1.5, N).astype(np.float32)  # distinct per-example cotangents

  @jax.jit
  def loss_and_grad(x):
    loss, vjp = jax.vjp(lambda z: run(method, z, t, y, **opts), x)
    return loss, vjp(jnp.asarray(weights))[0]

  loss, grad = loss_and_grad(s)
  assert loss.shape == (N,) and loss.dtype == jnp.float32
  assert_close(loss, ref(s, t, y, **opts))
  frozen = dict(frozen=s) if method == "uskd" else {}
  ref_grad = fd_grad(lambda x: weights * ref(x, t, y, **frozen, **opts), s)
  assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["dkd", "pld"])
def test_check_grads(method):
  t, y = jnp.asarray(make_logits(5, (3, 4))), jnp.asarray(make_labels(6, (3,)) % 4)
  check_grads(jax.jit(lambda x: run(method, x, t, y)), (jnp.asarray(make_logits(6, (3, 4))),),
              order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_teacher_gets_no_gradient(method):
  s, t, y = map(jnp.asarray, (make_logits(0), make_logits(1), make_labels()))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(run(method, s, x, y))))(t)
  assert np.all(np.asarray(grad) == 0.0)


def test_uskd_weak_head_gradient_is_the_smoothed_ce():
  s, w, y = map(jnp.asarray, (make_logits(0), make_logits(1), make_labels()))
  mu = 0.3
  grad = jax.jit(jax.grad(lambda x: jnp.sum(run("uskd", s, x, y, mu=mu))))(w)
  target = 0.9 * np.eye(C)[np.asarray(y)] + 0.1 / C
  assert_close(grad, mu * (np_softmax(np.asarray(w)) - target))


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("method", ["kd", "dkd", "binary_kl_norm", "binary_kl"])
def test_zero_when_student_equals_teacher(method):
  z, y = jnp.asarray(make_logits(0, scale=5.0)), jnp.asarray(make_labels())
  loss = run(method, z, z, y)
  np.testing.assert_allclose(np.asarray(loss), 0.0, atol=2e-6)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(run(method, x, z, y))))(z)
  np.testing.assert_allclose(np.asarray(grad), 0.0, atol=2e-5)


def test_binary_kl_norm_positive_away_from_match():
  z = jnp.asarray(make_logits(0))
  assert np.all(np.asarray(run("binary_kl_norm", z + 0.3, z, None)) > 0)


def test_standardized_kd_invariant_to_shift_and_scale():
  s, t = make_logits(0), make_logits(1)
  rng = np.random.default_rng(9)
  shift_s, shift_t = rng.normal(size=(N, 1)) * 10, rng.normal(size=(N, 1)) * 10
  scale_s, scale_t = rng.uniform(0.3, 3.0, (N, 1)), rng.uniform(0.3, 3.0, (N, 1))
  base = run("ls_kd", s, t, None)
  moved = run("ls_kd", (scale_s * s + shift_s).astype(np.float32),
              (scale_t * t + shift_t).astype(np.float32), None)
  assert_close(moved, np.asarray(base), rtol=1e-4, atol=1e-4)
  # Plain KD is not invariant (the test can fail).
  assert not np.allclose(run("kd", 2.0 * s, t, None), run("kd", s, t, None), atol=1e-2)


def test_pld_invariant_to_row_shifts():
  s, t, y = make_logits(0), make_logits(1), make_labels()
  rng = np.random.default_rng(3)
  base = run("pld", s, t, y)
  moved = run("pld", s + rng.normal(size=(N, 1)).astype(np.float32) * 20,
              t + rng.normal(size=(N, 1)).astype(np.float32) * 20, y)
  assert_close(moved, np.asarray(base), rtol=1e-4, atol=1e-4)


def test_pld_with_a_one_hot_teacher_is_cross_entropy():
  s, y = make_logits(0), make_labels()
  t = (60.0 * np.eye(C)[y]).astype(np.float32)
  assert_close(run("pld", s, t, y), np.asarray(jax.jit(logitlab.cross_entropy)(s, y)),
               rtol=1e-5, atol=1e-5)


jstandardize = jax.jit(cl.standardize_logits, static_argnames=("eps", "ddof"))


def test_standardize_logits_matches_reference():
  z = make_logits(0)
  assert_close(jstandardize(z), ref_standardize(z))
  assert_close(jstandardize(z, eps=0.1, ddof=0), ref_standardize(z, eps=0.1, ddof=0))
  constant = np.ones((N, C), np.float32)
  assert np.all(np.asarray(jstandardize(constant)) == 0.0)
  assert np.all(np.asarray(jstandardize(constant, eps=0.0)) == 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jstandardize(x) ** 3)))(constant)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_standardize_logits_gradient():
  z = make_logits(1)
  weights = np.random.default_rng(0).normal(size=(N, C))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jstandardize(x) * weights)))(z)
  assert_close(grad, fd_grad(lambda x: ref_standardize(x) * weights, z), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- DKD specifics


def test_dkd_warmup():
  assert cl.dkd_warmup(1) == 0.05 and cl.dkd_warmup(20) == 1.0 and cl.dkd_warmup(45) == 1.0
  assert cl.dkd_warmup(3, warmup=4) == 0.75
  traced = jax.jit(cl.dkd_warmup)(jnp.asarray(10))
  assert traced.dtype == jnp.float32 and float(traced) == 0.5


def test_dkd_traced_warmup_factor_matches_static():
  s, t, y = map(jnp.asarray, (make_logits(0), make_logits(1), make_labels()))
  step = jax.jit(lambda e: cl.dkd(s, t, y, warmup_factor=cl.dkd_warmup(e)))
  assert_close(step(jnp.asarray(5)), np.asarray(run("dkd", s, t, y, warmup_factor=0.25)))


def test_dkd_finite_where_official_float32_log_overflows():
  # The student gives the target class probability exp(-200): 0 in float32, so the
  # official log of the summed probabilities is -inf. The float64 reference is finite.
  s = np.array([[-200.0, 0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
  t = np.array([[0.0, 0.5, 1.0], [300.0, 0.0, 0.0]], np.float32)
  y = np.array([0, 0], np.int32)
  loss, grad = jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(run("dkd", x, t, y, temperature=1.0))))(s)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
  assert_close(run("dkd", s, t, y, temperature=1.0), ref_dkd(s, t, y, temperature=1.0),
               rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- USKD specifics


def test_uskd_rank_quirk_flag_changes_the_soft_labels():
  s, w, y = make_logits(0), make_logits(1), make_labels()
  official = run("uskd", s, w, y, beta=1.0)
  intended = run("uskd", s, w, y, beta=1.0, official_rank_quirk=False)
  assert not np.allclose(np.asarray(official), np.asarray(intended), atol=1e-4)


def test_uskd_without_weak_head():
  s, y = make_logits(0), make_labels()
  for quirk in (True, False):
    assert_close(run("uskd", s, None, y, official_rank_quirk=quirk),
                 ref_uskd(s, None, y, official_rank_quirk=quirk))


def test_uskd_couples_the_batch_through_the_mean():
  s, w, y = make_logits(0), make_logits(1), make_labels()
  full = np.asarray(run("uskd", s, w, y))
  head = np.asarray(run("uskd", s[:2], w[:2], y[:2]))
  assert not np.allclose(full[:2], head, atol=1e-5)
  mask = np.array([True, True, False, True, False])
  masked = run("uskd", s, w, y, where=mask)
  assert_close(np.asarray(masked)[mask], ref_uskd(s[mask], w[mask], y[mask]))


# ----------------------------------------------------------------------------- DHKD specifics


def test_binary_losses_saturate_instead_of_overflowing():
  s = np.array([[80.0, -80.0, 0.0]], np.float32)
  t = np.zeros_like(s)
  for name in ("binary_kl_norm", "binary_kl"):
    ref = METHODS[name][1]
    loss, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(run(name, x, t, None))))(s)
    assert np.isfinite(float(loss))
    assert_close(run(name, s, t, None), ref(s, t), rtol=1e-5, atol=1e-4)
    # Beyond the clamp the official gradient is 0 (torch.clamp); the centre class still moves.
    np.testing.assert_allclose(np.asarray(grad)[0, :2], 0.0, atol=1e-6)


def ref_project(kd_leaves, ce_leaves):
  g_kd = np.concatenate([np.ravel(x) for x in kd_leaves]).astype(np.float64)
  g_ce = np.concatenate([np.ravel(x) for x in ce_leaves]).astype(np.float64)
  dot = g_kd @ g_ce
  if dot < 0:
    g_kd = g_kd - dot / (g_ce @ g_ce) * g_ce
  return g_ce + g_kd


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("conflict", [True, False])
def test_project_conflicting_matches_reference(conflict):
  rng = np.random.default_rng(0)
  ce = {"head0": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
        "head1": {"w": np.zeros((3, 4)), "b": np.zeros(4)}, "body": rng.normal(size=(5,))}
  kd = {"head0": {"w": np.zeros((3, 4)), "b": np.zeros(4)},
        "head1": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
        "body": (-1.0 if conflict else 1.0) * 10 * ce["body"]}
  ce, kd = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (ce, kd))
  assert (float(_flat(kd) @ _flat(ce)) < 0) == conflict
  out = cl.project_conflicting(kd, ce)
  assert jax.tree.structure(out) == jax.tree.structure(ce)
  expected = ref_project(jax.tree.leaves(kd), jax.tree.leaves(ce))
  assert_close(_flat(out), expected, rtol=1e-5, atol=1e-5)
  if conflict:  # the projected KD part is orthogonal to the CE gradient
    assert abs(float((_flat(out) - _flat(ce)) @ _flat(ce))) < 1e-3
  else:
    assert_close(_flat(out), _flat(kd) + _flat(ce))


def test_project_conflicting_zero_ce_gradient_and_jit():
  kd = {"w": jnp.array([1.0, -2.0])}
  out = jax.jit(cl.project_conflicting)(kd, {"w": jnp.zeros(2)})
  assert_close(out["w"], np.array([1.0, -2.0]))


def test_dhkd_projection_in_an_optax_chain():
  rng = np.random.default_rng(1)
  params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
  ce = {"a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), "b": jnp.ones(3)}
  kd = jax.tree.map(lambda x: -2.0 * x + 0.1, ce)
  tx = optax.chain(cl.dhkd_projection(), optax.sgd(0.1))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(kd, state, params, ce_updates=ce)
  expected = jax.tree.map(lambda g: -0.1 * g, cl.project_conflicting(kd, ce))
  assert_close(_flat(updates), _flat(expected), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="ce_updates"):
    tx.update(kd, state, params)


# ----------------------------------------------------------------------------- DIST

jdist = jax.jit(cl.dist, static_argnames=("beta", "gamma", "temperature", "eps"))


@pytest.mark.parametrize("opts", [{}, dict(beta=2.0, gamma=0.5, temperature=4.0)],
                         ids=["default", "T4"])
def test_dist_matches_reference_and_gradient(opts):
  s, t = make_logits(0, scale=1.5), make_logits(1, scale=1.5)
  loss = jdist(s, t, **opts)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert_close(loss, ref_dist(s, t, **opts))
  grad = jax.jit(jax.grad(lambda x: jdist(x, t, **opts)))(s)
  assert_close(grad, fd_grad(lambda x: ref_dist(x, t, **opts), s), rtol=1e-4, atol=1e-4)
  teacher_grad = jax.jit(jax.grad(lambda x: jdist(s, x, **opts)))(t)
  assert np.all(np.asarray(teacher_grad) == 0.0)


def test_dist_where_drops_rows_even_with_nan():
  s, t = make_logits(0), make_logits(1)
  mask = np.array([True, False, True, True, False])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[1], t_bad[4] = np.nan, np.inf
  loss, grad = jax.jit(jax.value_and_grad(lambda x: jdist(x, t_bad, where=mask)))(s_bad)
  assert_close(loss, ref_dist(s[mask], t[mask]))
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~mask] == 0.0)
  assert float(jdist(s, t, where=np.zeros(N, bool))) == 0.0
  # Extra batch axes are flattened: the same scalar.
  assert_close(jdist(s[:4].reshape(2, 2, C), t[:4].reshape(2, 2, C)), ref_dist(s[:4], t[:4]))
  # bf16 inputs: float32 arithmetic and output.
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  loss16 = jdist(s16, t16)
  assert loss16.dtype == jnp.float32
  assert_close(loss16, float(jdist(s16.astype(jnp.float32), t16.astype(jnp.float32))),
               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- masks, dtypes, jit


@pytest.mark.parametrize("method", DEFAULT_IDS)
def test_masked_rows_give_zero_loss_and_gradient_even_with_nan(method):
  s, t, y = make_logits(0), make_logits(1), make_labels()
  mask = np.array([True, False, True, False, True])
  s_bad, t_bad, y_bad = s.copy(), t.copy(), y.copy()
  s_bad[1], t_bad[1], s_bad[3, 2], t_bad[3] = np.nan, np.inf, -np.inf, np.nan
  y_bad[3] = -5                       # out-of-range labels on masked rows are ignored
  ref = METHODS[method][1]
  grad = jax.jit(jax.grad(lambda x: jnp.sum(run(method, x, t_bad, y_bad, where=mask))))(s_bad)
  per_example = np.asarray(run(method, s_bad, t_bad, y_bad, where=mask))
  assert np.all(per_example[~mask] == 0.0)
  assert_close(per_example[mask], ref(s[mask], t[mask], y[mask]))
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[~mask] == 0.0)


@pytest.mark.parametrize("method", DEFAULT_IDS)
def test_bf16_inputs_give_float32_outputs(method):
  s, t, y = make_logits(0), make_logits(1), make_labels()
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  loss = run(method, s16, t16, y)
  assert loss.dtype == jnp.float32
  # The arithmetic is float32 on the bf16 values.
  assert_close(loss, np.asarray(run(method, s16.astype(jnp.float32), t16.astype(jnp.float32), y)),
               rtol=1e-6, atol=1e-6)
  if method == "dkd":
    grad = jax.jit(jax.grad(lambda x: jnp.sum(run(method, x, t16, y))))(s16)
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("method,opts", [("dkd", {}), ("uskd", dict(official_rank_quirk=False))],
                         ids=["dkd", "uskd"])
def test_jit_matches_eager(method, opts):
  s, t, y = map(jnp.asarray, (make_logits(0), make_logits(1), make_labels()))
  call = functools.partial(METHODS[method][0], **opts)
  assert_close(jax.jit(call)(s, t, y), np.asarray(call(s, t, y)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["kd", "dkd", "uskd", "pld"])
def test_extra_batch_axes(method):
  s, t, y = make_logits(0, (6, C)), make_logits(1, (6, C)), make_labels(2, (6,))
  flat = np.asarray(run(method, s, t, y))
  assert_close(run(method, s.reshape(2, 3, C), t.reshape(2, 3, C), y.reshape(2, 3)),
               flat.reshape(2, 3), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
  s, t, y = make_logits(0), make_logits(1), make_labels()
  with pytest.raises(ValueError, match="same shape|one shape"):
    cl.kd(s, t[:, :3])
  with pytest.raises(TypeError, match="labels.*integer"):
    cl.dkd(s, t, y.astype(np.float32))
  with pytest.raises(ValueError, match="labels.*batch shape"):
    cl.nkd(s, t, y[:3])
  with pytest.raises(TypeError, match="student_logits.*floating"):
    cl.pld(y[:, None].repeat(C, 1), t, y)
  with pytest.raises(ValueError, match="temperature"):
    cl.kd(s, t, temperature=0.0)
  with pytest.raises(ValueError, match="beta"):
    cl.dkd(s, t, y, beta=-1.0)
  with pytest.raises(ValueError, match="warmup_factor"):
    cl.dkd(s, t, y, warmup_factor=1.5)
  with pytest.raises(ValueError, match="at least 2 classes"):
    cl.dkd(s[:, :1], t[:, :1], y * 0)
  with pytest.raises(ValueError, match="ddof"):
    cl.standardize_logits(s[:, :1])
  with pytest.raises(ValueError, match="gamma"):
    cl.nkd(s, t, y, gamma=-0.1)
  with pytest.raises(ValueError, match="tau"):
    cl.pld(s, t, y, tau=-1.0)
  with pytest.raises(ValueError, match="weak_logits"):
    cl.uskd(s, y, weak_logits=t[:, :3])
  with pytest.raises(TypeError, match="official_rank_quirk"):
    cl.uskd(s, y, official_rank_quirk="yes")
  with pytest.raises(ValueError, match="mu"):
    cl.uskd(s, y, mu=-1.0)
  with pytest.raises(TypeError, match="where"):
    cl.binary_kl_norm(s, t, where=np.ones(N, np.int32))
  with pytest.raises(ValueError, match="eps"):
    cl.dist(s, t, eps=0.0)
  with pytest.raises(TypeError, match="traced"):
    jax.jit(lambda T: cl.kd(s, t, temperature=T))(2.0)
  with pytest.raises(ValueError, match="structure"):
    cl.project_conflicting({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
  with pytest.raises(ValueError, match="shape"):
    cl.project_conflicting({"a": jnp.ones(2)}, {"a": jnp.ones(3)})
  with pytest.raises(ValueError, match="warmup"):
    cl.dkd_warmup(3, warmup=0)


def test_debug_mode_flags_bad_labels():
  s, t = make_logits(0), make_logits(1)
  y = make_labels()
  y[0] = C
  with logitlab.debug_checks():
    with pytest.raises(Exception, match="label"):
      jax.block_until_ready(cl.dkd(s, t, y))


@pytest.mark.parametrize("aux_loss,ref", [("binary_kl_norm", ref_binary_kl_norm),
                                          ("binary_kl", ref_binary_kl)])
def test_dhkd_losses_split_the_heads_and_their_gradients(aux_loss, ref):
  rng = np.random.default_rng(41)
  head, aux, teacher = (jnp.asarray(rng.normal(size=(6, 5)) * 2, jnp.float32) for _ in range(3))
  y = jnp.asarray(rng.integers(0, 5, size=6), jnp.int32)
  where = jnp.asarray(np.arange(6) != 3)
  head = head.at[3].set(jnp.nan)
  ce, kd_loss = cl.dhkd_losses(head, aux, teacher, y, temperature=3.0, aux_loss=aux_loss,
                               where=where)
  keep = np.asarray(where)
  ls = np_log_softmax(np.asarray(head, np.float64)[keep])
  np.testing.assert_allclose(np.asarray(ce)[keep], -ls[np.arange(5), np.asarray(y)[keep]],
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(kd_loss)[keep],
                             ref(np.asarray(aux)[keep], np.asarray(teacher)[keep], temperature=3.0),
                             rtol=1e-5)
  assert ce[3] == 0 and kd_loss[3] == 0
  # Head 0 is trained by the CE only, head 1 by the binary loss only.
  d_ce = jax.grad(lambda h, a: jnp.sum(cl.dhkd_losses(h, a, teacher, y, where=where)[0]),
                  argnums=(0, 1))(head, aux)
  d_kd = jax.grad(lambda h, a: jnp.sum(cl.dhkd_losses(h, a, teacher, y, where=where)[1]),
                  argnums=(0, 1))(head, aux)
  assert np.all(np.asarray(d_ce[1]) == 0) and np.all(np.asarray(d_kd[0]) == 0)
  assert np.all(np.isfinite(d_ce[0])) and np.all(np.asarray(d_ce[0])[3] == 0)
  with pytest.raises(ValueError, match="aux_loss"):
    cl.dhkd_losses(head, aux, teacher, y, aux_loss="kl")
  with pytest.raises(ValueError, match="one shape"):
    cl.dhkd_losses(head, aux[:, :4], teacher, y)
