"""Knowledge distillation for classification, on logits ``[..., C]`` (class axis last).

* :func:`kd`: Hinton KD, ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` (mdistiller).
* :func:`standardize_logits`: the z-score pre-process of logit-standardized KD
  (LS-KD, Sun et al. CVPR 2024), for :func:`kd` and :func:`dkd`.
* :func:`dkd` (and :func:`dkd_warmup`): decoupled KD, target + non-target terms.
* :func:`nkd`: normalized KD; :func:`uskd`: its teacher-free self-KD variant.
* :func:`binary_kl_norm`, :func:`binary_kl`: the per-class Bernoulli losses of
  dual-head KD (DHKD), with :func:`project_conflicting` / :func:`dhkd_projection`
  for its gradient projection.
* :func:`pld`: Plackett-Luce distillation (a list-wise loss that replaces CE).
* :func:`dist`: DIST's Pearson-correlation relations (batch-coupled, a scalar).

Conventions (as :mod:`logitlab.distill.divergences`): the arithmetic is float32
whatever the input dtype; hyperparameters are keyword-only static Python numbers;
teacher logits are ``stop_gradient``'ed; ``where`` is a boolean mask of the batch
shape ``[...]`` whose masked rows give loss 0 and gradient 0 even when their
logits hold NaN or inf (they are replaced by zeros with ``jnp.where`` before any
arithmetic). Except :func:`dist`, every loss returns float32 per-example values
``[...]`` whose mean over the batch is the official (batch-mean) loss; the cross-
entropy on the labels, where a method keeps one, is the caller's
(:func:`logitlab.cross_entropy`), as are the loss weights outside the function.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from logitlab import _validation as v
from logitlab import debug
from logitlab.distill._common import logits_pair
from logitlab.distill.divergences import divergence_terms
from logitlab.losses import cross_entropy

__all__ = [
    "DHKD_AUXILIARY_LOSSES",
    "binary_kl",
    "binary_kl_norm",
    "dhkd_losses",
    "dhkd_projection",
    "dist",
    "dkd",
    "dkd_warmup",
    "kd",
    "nkd",
    "pld",
    "project_conflicting",
    "standardize_logits",
    "uskd",
]

# Official DKD (mdistiller) subtracts 1000 from the target logit *after* dividing by T.
_DKD_TARGET_OFFSET = 1000.0
# Official DHKD clamps sigmoids to [1e-8, 1 - 1e-8]; done here on log-probabilities.
_LOG_BERNOULLI_FLOOR = math.log(1e-8)
# Official USKD adds 1e-6 to the normalizers of its ranking score.
_USKD_RANK_EPS = 1e-6
_F32 = jnp.float32


# ----------------------------------------------------------------------------- helpers


def _batch_mask(fn: str, where, batch_shape) -> jax.Array:
  if where is None:
    return jnp.ones(batch_shape, bool)
  return v.bool_mask(fn, "where", where, batch_shape)


def _logits(fn: str, name: str, logits, min_classes: int = 1) -> jax.Array:
  logits = v.float_array(fn, name, logits)
  if logits.ndim < 1:
    raise ValueError(f"{fn}: `{name}` must be [..., C] with a class axis last, got a scalar.")
  if logits.shape[-1] < min_classes:
    raise ValueError(f"{fn}: `{name}` needs at least {min_classes} classes on its last axis, "
                     f"got shape {logits.shape}.")
  return logits


def _masked_f32(x: jax.Array, valid: jax.Array) -> jax.Array:
  """float32 ``x`` with masked rows replaced by zeros (no NaN / inf reaches any arithmetic)."""
  return jnp.where(valid[..., None], x.astype(_F32), 0.0)


def _safe_labels(fn, labels, valid, num_classes) -> jax.Array:
  """Integer labels of the batch shape; masked entries replaced by 0."""
  labels = v.int_array(fn, "labels", labels)
  if labels.shape != valid.shape:
    raise ValueError(f"{fn}: `labels` of shape {labels.shape} must match the batch shape "
                     f"{valid.shape} of the logits.")
  debug.check_labels(fn, labels, valid, num_classes)
  return jnp.where(valid, labels, 0)


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  return labels[..., None] == jnp.arange(num_classes)


def _at(x: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]


def _soft_cross_entropy(target_probs: jax.Array, log_probs: jax.Array,
                        drop: jax.Array) -> jax.Array:
  """``-sum_c q_c log p_c`` over the classes not in ``drop`` (where ``log p`` may be -inf)."""
  log_probs = jnp.where(drop, 0.0, log_probs)
  return -jnp.sum(jnp.where(drop, 0.0, target_probs * log_probs), axis=-1)


def _bernoulli_log_probs(x: jax.Array) -> jax.Array:
  """``[log sigmoid(x), log(1 - sigmoid(x))]`` on a new last axis, each floored at log 1e-8.

  The floors are the official ``clamp(sigmoid, 1e-8, 1 - 1e-8)`` taken in log space,
  where float32 can represent them (``1 - 1e-8`` rounds to 1 in float32, so the
  official clamp lets ``log(1 - sigmoid)`` reach ``-inf`` once ``|x| > ~17``).
  """
  return jnp.maximum(jnp.stack([jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)], axis=-1),
                     _LOG_BERNOULLI_FLOOR)


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
  """Euclidean norm with gradient 0 (not NaN) at the zero vector, as ``torch.norm``."""
  sq = jnp.sum(x * x, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------- KD / LS-KD


def kd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
       temperature: float = 4.0, where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Hinton knowledge distillation ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per example.

  ``loss = T^2 sum_c p_t,c (log p_t,c - log p_s,c)``, ``p = softmax(z / T)``, as
  mdistiller ``distillers/KD.py::kd_loss`` (``kl_div(...).sum(1).mean() * T^2``; the
  mean over the batch is the caller's). The cross-entropy on the labels is the
  caller's too: mdistiller's CIFAR-100 recipe is ``0.1 CE + 0.9 kd(T=4)``, ImageNet
  ``0.5 CE + 0.5 kd(T=1)``.

  Logit-standardized KD (LS-KD, official ``logit-standardization-KD``
  ``mdistiller/distillers/KD.py`` with ``--logit-stand``) is this loss on
  standardized logits, ``T^2`` included::

    kd(standardize_logits(z_s), standardize_logits(z_t), temperature=2.0)

  with the CE still on the raw student logits (the official README runs LS-KD
  with ``--logit-stand --base-temp 2 --kd-weight 9``).

  Args:
    student_logits: ``[..., C]`` student logits.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    temperature: ``T > 0`` (mdistiller CIFAR-100 default 4).
    where: boolean mask of the batch shape ``[...]``; masked rows give 0 and
      gradient 0, whatever their logits hold.

  Returns:
    float32 ``[...]``; 0 where the student equals the teacher.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import kd
    >>> s, t = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, -1.0]])
    >>> [round(float(x), 4) for x in kd(s, t)]
    [1.5141]

  References:
    Hinton, Vinyals and Dean, Distilling the Knowledge in a Neural Network,
    arXiv:1503.02531.
    Sun et al., Logit Standardization in Knowledge Distillation (CVPR 2024),
    arXiv:2403.01427.
  """
  fn = "kd"
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where)
  ls = jax.nn.log_softmax(s / temperature, axis=-1)
  lt = jax.nn.log_softmax(t / temperature, axis=-1)
  loss = temperature**2 * jnp.sum(divergence_terms("kl", ls, lt), axis=-1)
  return jnp.where(valid, loss, 0.0)


def standardize_logits(logits: jax.typing.ArrayLike, *, eps: float = 1e-7, ddof: int = 1,
                       where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Per-row z-score of logits, the pre-process of logit-standardized KD.

  ``Z(z) = (z - mean_c z) / (eps + std_c(z, ddof))`` with ``eps`` *outside* the
  square root and ``ddof=1`` (``torch.std``), as ``normalize`` in the official
  ``logit-standardization-KD`` ``mdistiller/distillers/KD.py``. ``Z`` is invariant
  to a per-row shift and (up to ``eps``) a positive per-row scale of ``z``. Apply
  it to both the student and the teacher logits and pass them to :func:`kd` or
  :func:`dkd`: the official LS-KD / LS-DKD standardize before dividing by ``T``.

  A constant row has ``std = 0`` and maps to zeros; the gradient of ``std`` is
  taken as 0 there (``sqrt`` has none at 0). ``eps = 0`` is allowed (AMU-Tuning's
  z-score has none): constant rows still map to 0.

  Args:
    logits: ``[..., C]`` logits.
    eps: ``>= 0`` added to the standard deviation (official 1e-7).
    ddof: delta degrees of freedom of the standard deviation (1 as ``torch.std``;
      0 as ``jnp.std``); ``C > ddof`` is required.
    where: boolean mask of the batch shape; masked rows map to zeros with
      gradient 0 (so NaN rows stay harmless through a following :func:`kd`).

  Returns:
    float32 ``[..., C]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import standardize_logits
    >>> [round(float(x), 4) for x in standardize_logits(jnp.array([1.0, 2.0, 3.0]))]
    [-1.0, 0.0, 1.0]

  References:
    Sun et al., Logit Standardization in Knowledge Distillation (CVPR 2024),
    arXiv:2403.01427.
  """
  fn = "standardize_logits"
  eps = v.static_number(fn, "eps", eps, minimum=0.0)
  ddof = v.static_int(fn, "ddof", ddof, minimum=0)
  z = _logits(fn, "logits", logits)
  num_classes = z.shape[-1]
  if num_classes <= ddof:
    raise ValueError(f"{fn}: the standard deviation with ddof={ddof} needs more than {ddof} "
                     f"classes, got logits of shape {z.shape}.")
  valid = _batch_mask(fn, where, z.shape[:-1])
  z = _masked_f32(z, valid)
  centered = z - jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.sum(centered * centered, axis=-1, keepdims=True) / (num_classes - ddof)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  denom = eps + std
  nonzero = denom > 0
  out = jnp.where(nonzero, centered / jnp.where(nonzero, denom, 1.0), 0.0)
  return jnp.where(valid[..., None], out, 0.0)


# ----------------------------------------------------------------------------- DKD


def _warmup_factor(fn: str, warmup_factor):
  """A static factor in ``[0, 1]`` or a float32 scalar array (traced values allowed)."""
  if isinstance(warmup_factor, numbers.Real) and not isinstance(warmup_factor, bool):
    return v.static_number(fn, "warmup_factor", warmup_factor, minimum=0.0, maximum=1.0)
  if isinstance(warmup_factor, bool):
    raise TypeError(f"{fn}: `warmup_factor` must be a number, got {warmup_factor!r}.")
  factor = jnp.asarray(warmup_factor)
  if factor.shape != () or not (jnp.issubdtype(factor.dtype, jnp.floating)
                                or jnp.issubdtype(factor.dtype, jnp.integer)):
    raise TypeError(f"{fn}: `warmup_factor` must be a real scalar, got dtype {factor.dtype} "
                    f"and shape {factor.shape}.")
  return factor.astype(_F32)


def dkd_warmup(epoch, warmup=20):
  r"""DKD's linear warm-up factor ``min(epoch / warmup, 1)`` (epochs 1-indexed, as mdistiller).

  Pass the result as ``warmup_factor`` to :func:`dkd`. A Python ``epoch`` gives a
  Python float; an array (e.g. a traced step counter) gives a float32 scalar, so a
  jitted train step is not recompiled each epoch.

  Args:
    epoch: current epoch, 1 for the first (``>= 0``).
    warmup: number of warm-up epochs ``> 0`` (mdistiller ``DKD.WARMUP`` 20).

  Returns:
    the factor in ``[0, 1]``.

  Example:
    >>> from logitlab.distill.classification import dkd_warmup
    >>> dkd_warmup(1), dkd_warmup(10), dkd_warmup(40)
    (0.05, 0.5, 1.0)

  References:
    Zhao et al., Decoupled Knowledge Distillation (CVPR 2022), arXiv:2203.08679.
  """
  fn = "dkd_warmup"
  warmup = v.static_number(fn, "warmup", warmup, minimum=0.0, min_open=True)
  if isinstance(epoch, numbers.Real) and not isinstance(epoch, bool):
    epoch = v.static_number(fn, "epoch", epoch, minimum=0.0)
    return min(epoch / warmup, 1.0)
  epoch = jnp.asarray(epoch)
  if epoch.shape != () or epoch.dtype == jnp.bool_:
    raise TypeError(f"{fn}: `epoch` must be a real scalar, got dtype {epoch.dtype} and shape "
                    f"{epoch.shape}.")
  return jnp.minimum(epoch.astype(_F32) / warmup, 1.0)


def dkd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike, *, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0, warmup_factor: float | jax.Array = 1.0,
        where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Decoupled knowledge distillation: target-class KD (TCKD) + non-target-class KD (NCKD).

  With ``p = softmax(z / T)`` and ``b = [p_y, 1 - p_y]`` (the binary target /
  non-target split)::

    TCKD = T^2 KL(b_t || b_s)
    NCKD = T^2 KL(softmax(z_t / T - 1000 e_y) || softmax(z_s / T - 1000 e_y))
    loss = warmup_factor * (alpha TCKD + beta NCKD)

  as mdistiller ``distillers/DKD.py::dkd_loss`` (the ``-1000`` on the target class is
  applied *after* dividing by ``T``, as there; in float32 it removes the target class
  from the NCKD softmax exactly). Matched to the official code, with one numerical
  change: the official takes ``log`` of the summed binary probabilities, which is
  ``-inf`` (a NaN gradient) once ``p_y`` or ``1 - p_y`` underflows; here
  ``log p_y`` is the log-softmax entry and ``log(1 - p_y)`` the log-sum-exp of the
  other classes' log-probabilities, and ``0 log 0`` counts 0. The CE term
  (official weight 1.0) is the caller's.

  LS-DKD: pass :func:`standardize_logits` of both logits (the official LS-DKD
  standardizes before dividing by ``T``, as this does; its README runs it with
  ``--base-temp 2 --kd-weight 9``, which the project's method sheet reads as alpha
  and beta times 9; how that flag reaches DKD's weights was not checked).

  Args:
    student_logits: ``[..., C]`` student logits, ``C >= 2``.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    labels: ``[...]`` integer labels in ``[0, C)``.
    alpha: TCKD weight ``>= 0`` (official 1.0).
    beta: NCKD weight ``>= 0`` (official default 8.0; mdistiller's ImageNet r34->r18
      config: 0.5, with ``T = 1`` and a 1-epoch warm-up).
    temperature: ``T > 0`` (official default 4.0).
    warmup_factor: ``min(epoch / warmup, 1)``, from :func:`dkd_warmup`: a Python
      number in ``[0, 1]`` or a scalar array (which may be traced).
    where: boolean mask of the batch shape; masked rows give 0 and gradient 0.

  Returns:
    float32 ``[...]``; 0 where the student equals the teacher.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import dkd
    >>> s, t = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, -1.0]])
    >>> [round(float(x), 4) for x in dkd(s, t, jnp.array([1]))]
    [5.0863]

  References:
    Zhao et al., Decoupled Knowledge Distillation (CVPR 2022), arXiv:2203.08679.
  """
  fn = "dkd"
  alpha = v.static_number(fn, "alpha", alpha, minimum=0.0)
  beta = v.static_number(fn, "beta", beta, minimum=0.0)
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  warmup_factor = _warmup_factor(fn, warmup_factor)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where, min_classes=2)
  num_classes = s.shape[-1]
  y = _safe_labels(fn, labels, valid, num_classes)
  target = _one_hot(y, num_classes)
  s, t = s / temperature, t / temperature

  def binary_log_probs(z):
    log_p = jax.nn.log_softmax(z, axis=-1)
    log_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_p), axis=-1)
    return jnp.stack([_at(log_p, y), log_rest], axis=-1)

  tckd = jnp.sum(divergence_terms("kl", binary_log_probs(s), binary_log_probs(t)), axis=-1)
  offset = _DKD_TARGET_OFFSET * target
  nckd = jnp.sum(divergence_terms("kl", jax.nn.log_softmax(s - offset, axis=-1),
                                  jax.nn.log_softmax(t - offset, axis=-1)), axis=-1)
  loss = warmup_factor * temperature**2 * (alpha * tckd + beta * nckd)
  return jnp.where(valid, loss, 0.0)


# ----------------------------------------------------------------------------- NKD / USKD


def nkd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike, *, temperature: float = 1.0, gamma: float = 1.5,
        where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Normalized knowledge distillation: a target term and a normalized non-target term.

  With ``~`` the logits with the target class ``y`` removed (``C - 1`` classes)::

    loss = -sg(softmax(z_t)_y) log_softmax(z_s)_y                      (T = 1)
           - gamma T^2 sum_{c != y} softmax(z~_t / T)_c log_softmax(z~_s / T)_c

  as the official yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py::NKDLoss`` (the
  paper's ``lambda`` is ``temp`` there, ``T`` here): the target term uses the
  temperature-1 softmax over all classes, the non-target term both ``T`` and the
  ``gamma T^2`` factor. Both terms are cross-entropies (the teacher entropy is not
  subtracted), so the loss is not 0 when the student matches the teacher; its
  gradient is not 0 either in the target term (it pushes ``p_s,y`` up, weighted by
  ``p_t,y``), which is the method's intent. The CE on the labels is the caller's
  (NKD's recipes keep it at weight 1). The official also accepts soft (mixup)
  labels through their argmax: pass ``argmax`` labels here.

  Args:
    student_logits: ``[..., C]`` student logits, ``C >= 2``.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    labels: ``[...]`` integer labels in ``[0, C)``.
    temperature: ``T`` (``lambda``) ``> 0`` of the non-target term (official 1.0).
    gamma: non-target weight ``>= 0`` (official 1.5).
    where: boolean mask of the batch shape; masked rows give 0 and gradient 0.

  Returns:
    float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import nkd
    >>> s, t = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, -1.0]])
    >>> [round(float(x), 4) for x in nkd(s, t, jnp.array([1]))]
    [3.114]

  References:
    Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: A
    Unified Approach with Normalized Loss and Customized Soft Labels (ICCV 2023),
    arXiv:2303.13005.
  """
  fn = "nkd"
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  gamma = v.static_number(fn, "gamma", gamma, minimum=0.0)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where, min_classes=2)
  num_classes = s.shape[-1]
  y = _safe_labels(fn, labels, valid, num_classes)
  target = _one_hot(y, num_classes)
  target_term = -_at(jax.nn.softmax(t, axis=-1), y) * _at(jax.nn.log_softmax(s, axis=-1), y)
  ls_rest = jax.nn.log_softmax(jnp.where(target, -jnp.inf, s / temperature), axis=-1)
  pt_rest = jax.nn.softmax(jnp.where(target, -jnp.inf, t / temperature), axis=-1)
  non_target = _soft_cross_entropy(pt_rest, ls_rest, target)
  loss = target_term + gamma * temperature**2 * non_target
  return jnp.where(valid, loss, 0.0)


def uskd(student_logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
         weak_logits: jax.typing.ArrayLike | None = None, alpha: float = 1.0,
         beta: float = 0.1, mu: float = 0.005, official_rank_quirk: bool = True,
         where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Universal self-knowledge distillation (teacher-free NKD with customized soft labels).

  With ``p = softmax(z_s)``, ``q = softmax(z_w)`` of the weak head, ``~`` the target
  class removed and ``mean_B`` the mean over the valid examples of the batch::

    w     = sg(p_y^2 + 1 - mean_B(p_y^2))                 soft target (couples the batch)
    L_t   = -w log_softmax(z_s)_y
    score = q / (1 - q_y + 1e-6) + l / (1 - l_y + 1e-6)   ranks all C classes, descending
    r_c   = 1 / rank_c  (Zipf; rank 1 = highest score), target dropped, normalized
    L_non = -sum_{c != y} sg(r~_c) log_softmax(z~_s)_c
    L_w   = -mu sum_c (0.9 e_y + 0.1 / C)_c log_softmax(z_w)_c
    loss  = alpha L_t + beta L_non + L_w

  Matched to the official yzd-v/cls_KD ``mmcls/models/dis_losses/uskd.py::USKDLoss``
  for integer labels: the batch mean of ``p_y^2``, the detached soft labels, the
  ranking over all classes *including* the target (non-target classes then get
  ``1/2, 1/3, ...`` or ``1, 1/3, ...`` depending on where the target ranks), the
  1e-6 constants and the 0.9 / 0.1 smoothing of the weak-head CE (computed with
  :func:`logitlab.cross_entropy`, ``label_smoothing=0.1``; uniform convention).

  ``official_rank_quirk``: in the official code the variable holding ``softmax(z_s)``
  is overwritten by ``log_softmax(z_s)`` before the score is formed, so there
  ``l = log_softmax(z_s)`` and ``l_y = log p_y`` (the second term's normalizer is
  ``1 - log p_y + 1e-6 >= 1``); True (default) reproduces that. False uses
  ``l = softmax(z_s)``, both terms then being non-target probabilities normalized
  by their non-target mass, which is our reading of the paper's intent (the paper
  text was not checked line by line: unverified). The weak-head softmax ``q`` is a
  softmax in both. Ties in the score are broken by class index (stable sort; the
  official ``torch.sort`` leaves their order unspecified).

  Differences from the official, by design: the weak head is the caller's
  (official ``USKDLoss`` owns ``fc: Linear(channel, num_classes)`` applied to a
  mid-level feature); pass its logits as ``weak_logits``. Without ``weak_logits``
  the score has the ``l`` term only and ``L_w`` is 0 (an extension; the official
  always has the weak head). The official soft-label (mixup / cutmix, top-2
  classes) branch is not implemented. The batch mean uses the valid examples of
  all batch axes.

  Args:
    student_logits: ``[..., C]`` final logits, ``C >= 2``.
    labels: ``[...]`` integer labels in ``[0, C)``.
    weak_logits: optional ``[..., C]`` logits of the weak (mid-feature) head; they
      get gradient through ``L_w`` only (the ranking is not differentiable).
    alpha: target-term weight ``>= 0`` (official ImageNet 1.0).
    beta: non-target weight ``>= 0`` (official ImageNet 0.1).
    mu: weak-head CE weight ``>= 0`` (official ImageNet 0.005).
    official_rank_quirk: ``l = log_softmax`` (True, official code) or ``softmax``.
    where: boolean mask of the batch shape; masked rows give 0, gradient 0, and
      are left out of ``mean_B``.

  Returns:
    float32 ``[...]``; their mean over a full batch is the official loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import uskd
    >>> z = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]])
    >>> w = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0]])
    >>> [round(float(x), 4) for x in uskd(z, jnp.array([0, 1]), weak_logits=w)]
    [0.2835, 0.6098]

  References:
    Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: A
    Unified Approach with Normalized Loss and Customized Soft Labels (ICCV 2023),
    arXiv:2303.13005.
  """
  fn = "uskd"
  alpha = v.static_number(fn, "alpha", alpha, minimum=0.0)
  beta = v.static_number(fn, "beta", beta, minimum=0.0)
  mu = v.static_number(fn, "mu", mu, minimum=0.0)
  if not isinstance(official_rank_quirk, (bool, np.bool_)):
    raise TypeError(f"{fn}: `official_rank_quirk` must be a bool, got {official_rank_quirk!r}.")
  z = _logits(fn, "student_logits", student_logits, min_classes=2)
  num_classes = z.shape[-1]
  valid = _batch_mask(fn, where, z.shape[:-1])
  z = _masked_f32(z, valid)
  debug.check_finite(fn, student_logits=z)
  y = _safe_labels(fn, labels, valid, num_classes)
  target = _one_hot(y, num_classes)

  log_p = jax.nn.log_softmax(z, axis=-1)
  log_p_y = _at(log_p, y)
  p_y_sq = jax.lax.stop_gradient(jnp.exp(2.0 * log_p_y))
  count = jnp.maximum(jnp.sum(valid), 1)
  batch_mean = jnp.sum(jnp.where(valid, p_y_sq, 0.0)) / count
  target_term = -(p_y_sq + 1.0 - batch_mean) * log_p_y

  l = jax.lax.stop_gradient(log_p if official_rank_quirk else jnp.exp(log_p))
  score = l / (1.0 - _at(l, y)[..., None] + _USKD_RANK_EPS)
  weak_term = jnp.zeros_like(target_term)
  if weak_logits is not None:
    weak = _logits(fn, "weak_logits", weak_logits)
    if weak.shape != z.shape:
      raise ValueError(f"{fn}: `weak_logits` of shape {weak.shape} must match `student_logits` "
                       f"of shape {z.shape}.")
    q = jax.nn.softmax(jax.lax.stop_gradient(_masked_f32(weak, valid)), axis=-1)
    score = score + q / (1.0 - _at(q, y)[..., None] + _USKD_RANK_EPS)
    if mu > 0:
      weak_term = mu * cross_entropy(weak, y, where=valid,
                                     label_smoothing=0.1)
  order = jnp.argsort(-score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True) + 1
  zipf = jnp.where(target, 0.0, 1.0 / rank.astype(_F32))
  zipf = zipf / jnp.sum(zipf, axis=-1, keepdims=True)
  ls_rest = jax.nn.log_softmax(jnp.where(target, -jnp.inf, z), axis=-1)
  non_target = _soft_cross_entropy(zipf, ls_rest, target)

  loss = alpha * target_term + beta * non_target + weak_term
  return jnp.where(valid, loss, 0.0)


# ----------------------------------------------------------------------------- DHKD


def binary_kl_norm(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                   *, temperature: float = 2.0, where: jax.typing.ArrayLike | None = None
                   ) -> jax.Array:
  r"""DHKD's BinaryKLNorm: ``T^2 sum_c KL(Bern(1/2) || Bern(d_c))`` per example.

  ``d = clip(sigmoid((z_s - z_t) / T), 1e-8, 1 - 1e-8)``; per class
  ``KL = 1/2 log(1/2 / d) + 1/2 log(1/2 / (1 - d))``, 0 exactly where
  ``z_s = z_t`` and minimal there. As penghui-yang/DHKD
  ``distiller_zoo/BinaryKLNorm.py`` (``KLDivLoss(reduction="none")`` summed over
  classes and divided by the batch size, times ``T^2``: the batch mean is the
  caller's). The clamp is applied to the log-probabilities (``log d`` and
  ``log(1 - d)`` each floored at ``log 1e-8``, the official bounds; beyond them the
  gradient is 0 up to ``~1e-8``, as the official clamp's); in float32 the official ``1 - 1e-8`` bound rounds to
  1, so the official loss becomes ``inf`` once ``|z_s - z_t| / T > ~17`` where
  this one saturates at ``~8.5`` per class. In DHKD the loss trains the second
  head only (head 0 gets the CE and serves inference); weights are the caller's.

  Args:
    student_logits: ``[..., C]`` logits of the student's distillation head.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    temperature: ``T > 0`` (official 2).
    where: boolean mask of the batch shape; masked rows give 0 and gradient 0.

  Returns:
    float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import binary_kl_norm
    >>> s, t = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, -1.0]])
    >>> [round(float(x), 4) for x in binary_kl_norm(s, t)]
    [0.9609]

  References:
    Yang et al., Dual-Head Knowledge Distillation: Enhancing Logits Utilization
    with an Auxiliary Head, arXiv:2411.08937.
  """
  fn = "binary_kl_norm"
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where)
  log_d = _bernoulli_log_probs((s - t) / temperature)
  log_half = jnp.full_like(log_d, -math.log(2.0))
  terms = divergence_terms("kl", log_d, log_half)
  loss = temperature**2 * jnp.sum(terms, axis=(-2, -1))
  return jnp.where(valid, loss, 0.0)


def binary_kl(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
              temperature: float = 2.0, where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""DHKD's BinaryKL ablation: ``T^2 sum_c KL(Bern(sigmoid(z_t / T)) || Bern(sigmoid(z_s / T)))``.

  Each class is an independent Bernoulli; both sigmoids are clamped to
  ``[1e-8, 1 - 1e-8]`` as penghui-yang/DHKD ``distiller_zoo/BinaryKL.py`` (applied in
  log space, as in :func:`binary_kl_norm`), summed over classes and multiplied by
  ``T^2`` there (divided by the batch size: the caller's mean). 0 where
  ``z_s = z_t``.

  Args:
    student_logits: ``[..., C]`` student logits.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    temperature: ``T > 0`` (official 2).
    where: boolean mask of the batch shape; masked rows give 0 and gradient 0.

  Returns:
    float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import binary_kl
    >>> s, t = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, -1.0]])
    >>> [round(float(x), 4) for x in binary_kl(s, t)]
    [0.9242]

  References:
    Yang et al., Dual-Head Knowledge Distillation: Enhancing Logits Utilization
    with an Auxiliary Head, arXiv:2411.08937.
  """
  fn = "binary_kl"
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where)
  terms = divergence_terms("kl", _bernoulli_log_probs(s / temperature),
                           _bernoulli_log_probs(t / temperature))
  loss = temperature**2 * jnp.sum(terms, axis=(-2, -1))
  return jnp.where(valid, loss, 0.0)


DHKD_AUXILIARY_LOSSES = ("binary_kl_norm", "binary_kl")


def dhkd_losses(head_logits: jax.typing.ArrayLike, aux_logits: jax.typing.ArrayLike,
                teacher_logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
                temperature: float = 2.0, aux_loss: str = "binary_kl_norm",
                where: jax.typing.ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
  r"""The two losses of a dual-head student (DHKD): ``(CE of head 0, binary KD of head 1)``.

  Both heads share the backbone; head 0 (used at inference) is trained by the
  cross-entropy on the labels only, head 1 (auxiliary) by :func:`binary_kl_norm`
  (or the :func:`binary_kl` ablation) against the teacher::

    ce = -log softmax(head_logits)_y        kd = binary_kl_norm(aux_logits, teacher_logits, T)

  They are returned apart, per example, so that their gradients can be taken
  separately and combined by :func:`project_conflicting` / :func:`dhkd_projection`
  (the official ``--ga``), or simply weighted and added.

  Args:
    head_logits: ``[..., C]`` logits of head 0.
    aux_logits: ``[..., C]`` logits of head 1.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    labels: integer ``[...]``.
    temperature: ``T`` of the binary loss (official 2).
    aux_loss: ``"binary_kl_norm"`` (DHKD) or ``"binary_kl"`` (its ablation).
    where: boolean mask of the batch shape; masked rows give 0 and gradient 0.

  Returns:
    ``(ce, kd)``, float32 ``[...]`` each.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import dhkd_losses
    >>> z = jnp.array([[2.0, 0.0, -1.0]])
    >>> ce, kd = dhkd_losses(z, z, z, jnp.array([0]))
    >>> round(float(ce[0]), 4), float(kd[0])
    (0.1698, 0.0)

  References:
    Yang et al., Dual-Head Knowledge Distillation: Enhancing Logits Utilization
    with an Auxiliary Head, arXiv:2411.08937.
  """
  fn = "dhkd_losses"
  v.choice(fn, "aux_loss", aux_loss, DHKD_AUXILIARY_LOSSES)
  head = _logits(fn, "head_logits", head_logits)
  if jnp.shape(aux_logits) != head.shape:
    raise ValueError(f"{fn}: head_logits and aux_logits must have one shape, got {head.shape} "
                     f"and {jnp.shape(aux_logits)}.")
  valid = _batch_mask(fn, where, head.shape[:-1])
  labels = _safe_labels(fn, labels, valid, head.shape[-1])
  ce = cross_entropy(_masked_f32(head, valid), labels, where=valid)
  binary = binary_kl_norm if aux_loss == "binary_kl_norm" else binary_kl
  kd = binary(aux_logits, teacher_logits, temperature=temperature, where=valid)
  return ce, kd


def _tree_vdot(a_leaves, b_leaves) -> jax.Array:
  total = jnp.zeros((), _F32)
  for a, b in zip(a_leaves, b_leaves):
    total = total + jnp.sum(a.astype(_F32) * b.astype(_F32))
  return total


def project_conflicting(kd_grads, ce_grads):
  r"""DHKD's gradient projection (``--ga``): drop the part of the KD gradient that opposes CE.

  With ``<., .>`` the dot product over the whole pytree (all parameters, float32)::

    g_kd' = g_kd - (<g_kd, g_ce> / ||g_ce||^2) g_ce   if <g_kd, g_ce> < 0, else g_kd
    return g_ce + g_kd'

  As penghui-yang/DHKD ``helper/optimizer.py::OptimGradAlign`` (PCGrad-style, after
  WeiChengTseng/Pytorch-PCGrad) with the objectives ``[gamma CE, alpha KD]``: the
  CE gradient is the reference, only the KD gradient is projected, and the
  optimizer receives the *sum*. Pass the already weighted gradients
  (``grad(gamma * ce)``, ``grad(alpha * kd)``); parameters one loss does not reach
  (the other head) hold zeros, as the official fills them. ``||g_ce|| = 0`` never
  projects (the dot is then 0, not negative).

  Args:
    kd_grads: pytree of the distillation-loss gradients.
    ce_grads: pytree of the CE gradients, same structure and leaf shapes.

  Returns:
    pytree like ``ce_grads`` (leaf dtype: the promoted dtype of the two leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import project_conflicting
    >>> out = project_conflicting({"w": jnp.array([-1.0, 1.0])}, {"w": jnp.array([1.0, 0.0])})
    >>> [float(x) for x in out["w"]]
    [1.0, 1.0]

  References:
    Yang et al., Dual-Head Knowledge Distillation: Enhancing Logits Utilization
    with an Auxiliary Head, arXiv:2411.08937.
    Yu et al., Gradient Surgery for Multi-Task Learning (PCGrad), arXiv:2001.06782.
  """
  fn = "project_conflicting"
  kd_leaves, kd_def = jax.tree.flatten(kd_grads)
  ce_leaves, ce_def = jax.tree.flatten(ce_grads)
  if kd_def != ce_def:
    raise ValueError(f"{fn}: kd_grads and ce_grads must have the same pytree structure, got "
                     f"{kd_def} and {ce_def}.")
  kd_leaves = [v.float_array(fn, "kd_grads", x) for x in kd_leaves]
  ce_leaves = [v.float_array(fn, "ce_grads", x) for x in ce_leaves]
  for a, b in zip(kd_leaves, ce_leaves):
    if a.shape != b.shape:
      raise ValueError(f"{fn}: kd_grads and ce_grads leaves differ in shape: {a.shape} vs "
                       f"{b.shape}.")
  dot = _tree_vdot(kd_leaves, ce_leaves)
  conflict = dot < 0
  coef = jnp.where(conflict, dot / jnp.where(conflict, _tree_vdot(ce_leaves, ce_leaves), 1.0),
                   0.0)
  out = [(b.astype(_F32) + a.astype(_F32) - coef * b.astype(_F32)).astype(jnp.result_type(a, b))
         for a, b in zip(kd_leaves, ce_leaves)]
  return jax.tree.unflatten(ce_def, out)


def dhkd_projection() -> optax.GradientTransformationExtraArgs:
  r"""DHKD's gradient projection as an optax transformation (first in a chain).

  ``update(updates, state, params=None, *, ce_updates)`` takes the KD gradients as
  ``updates`` and the CE gradients as the extra argument ``ce_updates`` and returns
  :func:`project_conflicting` ``(updates, ce_updates)``, the combined gradient the
  rest of the chain sees. Put it first so it sees raw gradients (the official
  projects before the optimizer). Stateless. ``optax.chain`` forwards extra
  arguments to every member that accepts them, so call the chain's ``update`` with
  ``ce_updates=...``.

  Returns:
    an ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from logitlab.distill.classification import dhkd_projection
    >>> tx = optax.chain(dhkd_projection(), optax.sgd(0.5))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> kd_g, ce_g = {"w": jnp.array([-1.0, 1.0])}, {"w": jnp.array([1.0, 0.0])}
    >>> updates, state = tx.update(kd_g, state, params, ce_updates=ce_g)
    >>> [float(x) for x in updates["w"]]
    [-0.5, -0.5]

  References:
    Yang et al., Dual-Head Knowledge Distillation: Enhancing Logits Utilization
    with an Auxiliary Head, arXiv:2411.08937.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, ce_updates=None, **extra_args):
    del params, extra_args
    if ce_updates is None:
      raise ValueError("dhkd_projection: `update` needs the CE gradients as the keyword "
                       "argument `ce_updates` (the KD gradients are `updates`).")
    return project_conflicting(updates, ce_updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- PLD


def pld(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike, *, tau: float = 1.0,
        where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Plackett-Luce distillation: a teacher-weighted list-wise loss on the teacher-optimal ranking.

  ``pi = [y] + (other classes by z_t descending)``, ``alpha_k = softmax(z_t / tau)_{pi_k}``::

    loss = sum_k alpha_k (logsumexp_{j >= k} z_s,pi_j - z_s,pi_k)

  the Plackett-Luce negative log-likelihood of ``pi`` with each stage weighted by
  the teacher's confidence in the class chosen there. The suffix log-sum-exps are
  one stable reverse ``jax.lax.cumlogsumexp``. Invariant to a per-row shift of
  either logits; convex in ``z_s``; with a one-hot teacher on ``y`` it is the CE,
  and it is meant to *replace* the CE (no separate CE term). Ties among the teacher
  logits are ordered by class index. No official code was found; written from the
  paper's formulation. ``tau`` default 1 is unverified (the paper's recipes were
  not checked).

  Args:
    student_logits: ``[..., C]`` student logits.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    labels: ``[...]`` integer labels in ``[0, C)``.
    tau: teacher softmax temperature ``> 0`` (default 1.0, unverified).
    where: boolean mask of the batch shape; masked rows give 0 and gradient 0.

  Returns:
    float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import pld
    >>> s, t = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, -1.0]])
    >>> [round(float(x), 4) for x in pld(s, t, jnp.array([1]))]
    [1.8365]

  References:
    Bassam, Zhu and Bian, PLD: A Choice-Theoretic List-Wise Knowledge Distillation,
    arXiv:2506.12542.
  """
  fn = "pld"
  tau = v.static_number(fn, "tau", tau, minimum=0.0, min_open=True)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where)
  num_classes = s.shape[-1]
  y = _safe_labels(fn, labels, valid, num_classes)
  key = jnp.where(_one_hot(y, num_classes), -jnp.inf, -t)   # ascending sort of -z_t, y first
  order = jnp.argsort(key, axis=-1, stable=True)
  alpha = jnp.take_along_axis(jax.nn.softmax(t / tau, axis=-1), order, axis=-1)
  s_ranked = jnp.take_along_axis(s, order, axis=-1)
  suffix_lse = jax.lax.cumlogsumexp(s_ranked, axis=s_ranked.ndim - 1, reverse=True)
  loss = jnp.sum(alpha * (suffix_lse - s_ranked), axis=-1)
  return jnp.where(valid, loss, 0.0)


# ----------------------------------------------------------------------------- DIST


def _pearson(a: jax.Array, b: jax.Array, axis: int, eps: float, keep=None) -> jax.Array:
  """Pearson correlation along ``axis`` as DIST: ``<a', b'> / (|a'| |b'| + eps)``, centered.

  ``keep`` (broadcastable to ``a``) selects the entries that count; the others are 0.
  """
  if keep is None:
    a = a - jnp.mean(a, axis=axis, keepdims=True)
    b = b - jnp.mean(b, axis=axis, keepdims=True)
  else:
    count = jnp.maximum(jnp.sum(keep, axis=axis, keepdims=True), 1)
    a = jnp.where(keep, a - jnp.sum(jnp.where(keep, a, 0.0), axis, keepdims=True) / count, 0.0)
    b = jnp.where(keep, b - jnp.sum(jnp.where(keep, b, 0.0), axis, keepdims=True) / count, 0.0)
  return jnp.sum(a * b, axis=axis) / (_safe_norm(a, axis) * _safe_norm(b, axis) + eps)


def dist(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
         beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, eps: float = 1e-8,
         where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""DIST: inter-class and intra-class Pearson relations of the softened predictions; a scalar.

  With ``Y = softmax(z / T)`` as a ``[N, C]`` matrix (all batch axes flattened) and
  ``rho(u, v) = <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + eps)``::

    inter = 1 - mean_n rho(Y_s[n, :], Y_t[n, :])      (per example, across classes)
    intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])      (per class, across the batch)
    loss  = T^2 (beta inter + gamma intra)

  as torchdistill ``losses/mid_level.py::DISTLoss`` (``tau``, ``tau**2`` on both
  terms, ``eps`` 1e-8) and the official hunto ``dist_kd.py`` (which adds ``eps`` to
  the product of norms, as here; torchdistill's ``F.cosine_similarity`` clamps
  each norm by ``eps`` instead, a difference only at ``eps`` scale). DIST's
  recipes keep the CE (the caller's).

  The intra-class term correlates each class's column over the batch, so the loss
  couples the examples and is returned as **one scalar**, not per example. ``where``
  drops rows: masked rows are left out of both means and of the column centering
  and norms (so the result equals the loss on the batch with those rows removed),
  and get gradient 0 even if their logits hold NaN. A batch with no valid row
  scores 0. Note (as the official): a row whose student softmax is exactly
  uniform has a zero centered vector, and the gradient there scales like ``1/eps``.

  Args:
    student_logits: ``[..., C]`` student logits.
    teacher_logits: ``[..., C]`` teacher logits (``stop_gradient``'ed).
    beta: inter-class weight ``>= 0`` (official 1.0).
    gamma: intra-class weight ``>= 0`` (official 1.0).
    temperature: ``T > 0`` (official 1.0).
    eps: ``> 0`` added to the product of norms (official 1e-8).
    where: boolean mask of the batch shape.

  Returns:
    float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.classification import dist
    >>> s = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    >>> t = jnp.array([[1.0, 0.5, -1.0], [0.0, 2.0, -1.0]])
    >>> round(float(dist(s, t)), 4)
    0.7794

  References:
    Huang et al., Knowledge Distillation from A Stronger Teacher (NeurIPS 2022),
    arXiv:2205.10536.
  """
  fn = "dist"
  beta = v.static_number(fn, "beta", beta, minimum=0.0)
  gamma = v.static_number(fn, "gamma", gamma, minimum=0.0)
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  eps = v.static_number(fn, "eps", eps, minimum=0.0, min_open=True)
  s, t, valid = logits_pair(fn, student_logits, teacher_logits, where)
  num_classes = s.shape[-1]
  ys = jax.nn.softmax(s.reshape(-1, num_classes) / temperature, axis=-1)
  yt = jax.nn.softmax(t.reshape(-1, num_classes) / temperature, axis=-1)
  valid = valid.reshape(-1)
  count = jnp.sum(valid)
  inter = jnp.sum(jnp.where(valid, 1.0 - _pearson(ys, yt, -1, eps), 0.0)) / jnp.maximum(count, 1)
  intra = 1.0 - jnp.mean(_pearson(ys, yt, 0, eps, keep=valid[:, None]))
  intra = jnp.where(count > 0, intra, 0.0)
  return temperature**2 * (beta * inter + gamma * intra)
