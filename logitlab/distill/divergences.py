"""Divergences between a student and a teacher distribution, given their logits.

Every divergence here is a sum over the vocabulary of an elementwise term of the
two log-probabilities ``ls = log_softmax(z_s / T)`` and ``lt = log_softmax(z_t / T)``
(:func:`divergence_terms`); ``p = exp(l)`` and ``0 log 0 = 0``::

  kl               KL(t || s) = sum p_t (lt - ls)                            (forward)
  reverse_kl       KL(s || t) = sum p_s (ls - lt)
  jsd (beta)       beta KL(t || m) + (1 - beta) KL(s || m),  m = (1 - beta) p_s + beta p_t
                   (beta = 0: forward KL, beta = 1: reverse KL; TRL GKD / Liger convention)
  skew_kl (lam)    -sum p_t log(lam p_t + (1 - lam) p_s)         (DistiLLM: a cross-entropy)
                   or KL(t || lam p_t + (1 - lam) p_s) with ``kl=True``
  skew_reverse_kl  KL(s || (1 - lam) p_t + lam p_s)                         (DistiLLM)
  tv               1/2 sum |p_s - p_t|

The fused head (:func:`logitlab.linear_distillation`) streams the same terms over
vocabulary tiles, so the two paths share this one definition. The functions take
logits ``[..., V]`` (class axis last), divide both by the temperature (no ``T^2``
factor: TRL, Liger and DistiLLM use none; :func:`logitlab.distill.kd` has it),
stop the teacher's gradient and return float32 per-position losses ``[...]``.
:func:`reduce_tokens` gives the two reductions LLM libraries use.

References:
  Kullback and Leibler, On Information and Sufficiency, 1951.
  Agarwal et al., On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes (GKD), arXiv:2306.13649.
  Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models,
  arXiv:2402.03898.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from logitlab import _validation as v
from logitlab.distill._common import logits_pair

__all__ = [
    "DIVERGENCES",
    "divergence_terms",
    "generalized_jsd",
    "kl_divergence",
    "reduce_tokens",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
]

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
REDUCTIONS = ("token_mean", "batch_mean", "sum")


def _plogp_ratio(lp: jax.Array, lq: jax.Array) -> jax.Array:
  """``p (log p - log q)`` elementwise with ``p = exp(lp)``; 0 where ``p = 0``.

  Inputs where ``p = 0`` are replaced before the arithmetic so that neither the
  value nor the gradient sees ``0 * inf``. ``p > 0 = q`` gives ``+inf``, as it should.
  """
  present = lp > -jnp.inf
  lp = jnp.where(present, lp, 0.0)
  lq = jnp.where(present, lq, 0.0)
  return jnp.where(present, jnp.exp(lp) * (lp - lq), 0.0)


def _log_mix(weight_a: float, la: jax.Array, lb: jax.Array) -> jax.Array:
  """``log(w p_a + (1 - w) p_b)`` for ``0 < w < 1``; ``-inf`` (zero gradient) where both are 0."""
  either = (la > -jnp.inf) | (lb > -jnp.inf)
  la, lb = jnp.where(either, la, 0.0), jnp.where(either, lb, 0.0)
  mix = jnp.logaddexp(math.log(weight_a) + la, math.log1p(-weight_a) + lb)
  return jnp.where(either, mix, -jnp.inf)


def plain_kl(name: str, *, beta: float = 0.5, lam: float = 0.1, kl: bool = False) -> str | None:
  """``"kl"`` / ``"reverse_kl"`` when divergence ``name`` is exactly that one at these options.

  jsd at ``beta`` 0 / 1, skew_kl (KL form) at ``lam = 0`` and skew_reverse_kl at
  ``lam = 0`` are plain KLs; anything else gives None.
  """
  if name == "kl" or (name == "jsd" and beta == 0.0) or (name == "skew_kl" and lam == 0.0 and kl):
    return "kl"
  if name == "reverse_kl" or (name == "jsd" and beta == 1.0) or (
      name == "skew_reverse_kl" and lam == 0.0):
    return "reverse_kl"
  return None


def divergence_terms(name: str, ls: jax.Array, lt: jax.Array, *, beta: float = 0.5,
                     lam: float = 0.1, kl: bool = False) -> jax.Array:
  """The elementwise terms of divergence ``name`` (summed over the vocabulary it is the loss).

  ``ls``, ``lt``: float32 student / teacher log-probabilities, any shape. See the
  module docstring for the formulas; ``beta`` is the JSD mixture weight, ``lam``
  the skew, ``kl`` turns ``skew_kl`` from the cross-entropy into the KL.
  """
  name = plain_kl(name, beta=beta, lam=lam, kl=kl) or name
  if name == "kl":
    return _plogp_ratio(lt, ls)
  if name == "reverse_kl":
    return _plogp_ratio(ls, lt)
  if name == "jsd":
    lm = _log_mix(beta, lt, ls)
    return beta * _plogp_ratio(lt, lm) + (1.0 - beta) * _plogp_ratio(ls, lm)
  if name == "skew_kl":
    lm = ls if lam == 0.0 else (lt if lam == 1.0 else _log_mix(lam, lt, ls))
    if kl:
      return _plogp_ratio(lt, lm)
    present = lt > -jnp.inf
    lm = jnp.where(present, lm, 0.0)
    return jnp.where(present, -jnp.exp(jnp.where(present, lt, 0.0)) * lm, 0.0)
  if name == "skew_reverse_kl":
    lm = ls if lam == 1.0 else _log_mix(lam, ls, lt)
    return _plogp_ratio(ls, lm)
  if name == "tv":
    return 0.5 * jnp.abs(jnp.exp(ls) - jnp.exp(lt))
  raise ValueError(f"divergence_terms: unknown divergence {name!r}; expected one of "
                   f"{DIVERGENCES}.")


def _log_probs_pair(fn, student_logits, teacher_logits, temperature, where):
  """Validated float32 ``(ls, lt, valid)``: log-softmax of both at ``temperature``."""
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  zs, zt, valid = logits_pair(fn, student_logits, teacher_logits, where)
  log_probs = lambda z: jax.nn.log_softmax(z / temperature, axis=-1)
  return log_probs(zs), log_probs(zt), valid


def _divergence(fn, name, student_logits, teacher_logits, temperature, where, **options):
  ls, lt, valid = _log_probs_pair(fn, student_logits, teacher_logits, temperature, where)
  loss = jnp.sum(divergence_terms(name, ls, lt, **options), axis=-1)
  return jnp.where(valid, loss, 0.0)


def kl_divergence(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                  *, temperature: float = 1.0, where: jax.typing.ArrayLike | None = None
                  ) -> jax.Array:
  r"""Forward KL ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`` of ``p = softmax(z / T)``.

  Mass-covering; the divergence of Hinton KD (without its ``T^2``). ``+inf``
  where the teacher puts mass on a token the student gives probability 0.

  Args:
    student_logits: ``[..., V]`` student logits.
    teacher_logits: ``[..., V]`` teacher logits (``stop_gradient``'ed).
    temperature: ``T > 0`` dividing both.
    where: boolean mask of the batch shape ``[...]``; masked positions give 0 and
      gradient 0, whatever their logits hold.

  Returns:
    float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> s, t = jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0])
    >>> round(float(distill.kl_divergence(s, t)), 4)
    0.4621

  References:
    Hinton et al., Distilling the Knowledge in a Neural Network, arXiv:1503.02531.
  """
  return _divergence("kl_divergence", "kl", student_logits, teacher_logits, temperature, where)


def reverse_kl(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
               temperature: float = 1.0, where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Reverse KL ``KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)`` (mode-seeking; MiniLLM, GKD).

  Args and Returns as :func:`kl_divergence`.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> round(float(distill.reverse_kl(jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]))), 4)
    0.4621

  References:
    Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, arXiv:2306.08543.
    Agarwal et al., On-Policy Distillation of Language Models (GKD), arXiv:2306.13649.
  """
  return _divergence("reverse_kl", "reverse_kl", student_logits, teacher_logits, temperature,
                     where)


def generalized_jsd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                    *, beta: float = 0.5, temperature: float = 1.0,
                    where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Generalized Jensen-Shannon divergence of GKD (TRL ``GKDTrainer``, Liger ``LigerFusedLinearJSD``).

  ``m = (1 - beta) p_s + beta p_t``, ``JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``;
  ``beta = 0`` is defined as the forward KL ``KL(p_t || p_s)`` and ``beta = 1`` as
  the reverse KL ``KL(p_s || p_t)`` (the mixture form degenerates to 0 there).
  Symmetric in student and teacher at ``beta = 0.5``, bounded by ``log 2``.

  Args:
    beta: mixture weight in ``[0, 1]`` (TRL default 0.5).
    Others as :func:`kl_divergence`.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> round(float(distill.generalized_jsd(jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]))), 4)
    0.1109

  References:
    Agarwal et al., On-Policy Distillation of Language Models (GKD), arXiv:2306.13649.
  """
  fn = "generalized_jsd"
  beta = v.static_number(fn, "beta", beta, minimum=0.0, maximum=1.0)
  return _divergence(fn, "jsd", student_logits, teacher_logits, temperature, where, beta=beta)


def skew_kl(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
            lam: float = 0.1, kl: bool = False, temperature: float = 1.0,
            where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Skew KL of DistiLLM: ``-sum_v p_t log(lam p_t + (1 - lam) p_s)``.

  As in the official ``distillm/losses.py::skewed_forward_kl`` this is a
  cross-entropy: the teacher entropy is omitted, so it is not 0 when the student
  matches the teacher (its gradient is). ``kl=True`` adds ``sum p_t log p_t``,
  giving ``KL(p_t || lam p_t + (1 - lam) p_s)``, which is 0 at a match.

  Args:
    lam: skew ``lambda`` in ``[0, 1]`` (DistiLLM default 0.1; 0 is plain KL / CE).
    kl: include the teacher entropy term (False: the official cross-entropy form).
    Others as :func:`kl_divergence`.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> s, t = jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0])
    >>> round(float(distill.skew_kl(s, t, kl=True)), 4)
    0.3638

  References:
    Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models,
    arXiv:2402.03898.
  """
  fn = "skew_kl"
  lam = v.static_number(fn, "lam", lam, minimum=0.0, maximum=1.0)
  return _divergence(fn, "skew_kl", student_logits, teacher_logits, temperature, where,
                     lam=lam, kl=bool(kl))


def skew_reverse_kl(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                    *, lam: float = 0.1, temperature: float = 1.0,
                    where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Skew reverse KL of DistiLLM: ``KL(p_s || (1 - lam) p_t + lam p_s)``.

  Official ``distillm/losses.py::skewed_reverse_kl``; 0 when the student matches.

  Args:
    lam: skew ``lambda`` in ``[0, 1]`` (DistiLLM default 0.1; 0 is the reverse KL).
    Others as :func:`kl_divergence`.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> round(float(distill.skew_reverse_kl(jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]))), 4)
    0.3638

  References:
    Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models,
    arXiv:2402.03898.
  """
  fn = "skew_reverse_kl"
  lam = v.static_number(fn, "lam", lam, minimum=0.0, maximum=1.0)
  return _divergence(fn, "skew_reverse_kl", student_logits, teacher_logits, temperature, where,
                     lam=lam)


def total_variation(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                    *, temperature: float = 1.0, where: jax.typing.ArrayLike | None = None
                    ) -> jax.Array:
  r"""Total variation distance ``1/2 sum_v |p_s - p_t|`` in ``[0, 1]``.

  Note the ``1/2``: AlignDistil's token weight uses the plain L1 sum (twice this).

  Args and Returns as :func:`kl_divergence`.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> round(float(distill.total_variation(jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]))), 4)
    0.4621

  References:
    Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation,
    arXiv:2307.15190.
  """
  return _divergence("total_variation", "tv", student_logits, teacher_logits, temperature, where)


def reduce_tokens(losses: jax.typing.ArrayLike, where: jax.typing.ArrayLike | None = None, *,
                  reduction: str = "token_mean") -> jax.Array:
  r"""Reduces per-token losses ``[batch, ...]`` to a scalar, masked entries excluded.

  * ``"token_mean"``: ``sum(loss * mask) / max(sum(mask), 1)``, the mean over valid
    tokens (TRL, Liger, DistiLLM; "batchmean" in LLM libraries).
  * ``"batch_mean"``: ``sum(loss * mask) / batch``, the mean over the leading axis
    (PyTorch ``KLDivLoss(reduction="batchmean")``, the vision-KD repositories).
  * ``"sum"``: ``sum(loss * mask)``.

  Masked entries are selected away with ``jnp.where`` (a NaN there does not leak).
  An all-masked input gives 0 with every reduction.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab import distill
    >>> loss, mask = jnp.array([[1.0, 2.0], [3.0, 9.0]]), jnp.array([[True, True], [True, False]])
    >>> float(distill.reduce_tokens(loss, mask)), float(distill.reduce_tokens(loss, mask, reduction="batch_mean"))
    (2.0, 3.0)
  """
  fn = "reduce_tokens"
  v.choice(fn, "reduction", reduction, REDUCTIONS)
  losses = v.float_array(fn, "losses", losses)
  if losses.ndim < 1:
    raise ValueError(f"{fn}: `losses` must have a leading batch axis, got a scalar.")
  valid = (jnp.ones(losses.shape, bool) if where is None
           else v.bool_mask(fn, "where", where, losses.shape))
  total = jnp.sum(jnp.where(valid, losses.astype(jnp.float32), 0.0))
  if reduction == "token_mean":
    return total / jnp.maximum(jnp.sum(valid), 1)
  if reduction == "batch_mean":
    return total / losses.shape[0]
  return total
