"""Distillation objectives of LLM alignment and model fusion: AlignDistil and GLD.

* :func:`aligndistil_teacher` / :func:`aligndistil_loss`: AlignDistil, RLHF with a
  DPO reward rewritten as token-level distillation from a teacher built out of the
  logits of a DPO model and a second model (reverse-DPO or reference).
* :func:`gld`: graph-on-logits distillation of InfiGFusion, a Gromov-Wasserstein
  comparison of top-k co-activation graphs (our formulation; no official loss code).

The AlignDistil functions return float32 per-position losses ``[...]`` like
:mod:`logitlab.distill.divergences` (reduce them with
:func:`logitlab.distill.divergences.reduce_tokens`); :func:`gld` compares whole
sequences and returns one float32 value per example.

References:
  Zhang et al., AlignDistil: Token-Level Language Model Alignment as Adaptive
  Policy Distillation (ACL 2025), arXiv:2503.02832.
  Wang et al., InfiGFusion: Graph-on-Logits Distillation via Efficient
  Gromov-Wasserstein for Model Fusion, arXiv:2505.13893.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from logitlab import _validation as v
from logitlab.distill._common import logits_pair
from logitlab.distill.divergences import _log_probs_pair, divergence_terms

__all__ = [
    "ALIGNDISTIL_MODES",
    "GLD_ACTIVATIONS",
    "aligndistil_loss",
    "aligndistil_teacher",
    "gld",
]

# Names of the official ``--reward_boost_type`` values.
ALIGNDISTIL_MODES = ("aligndistil", "theorem1_adaptive", "theorem1", "theorem1_contrast")
_ADAPTIVE_MODES = ("aligndistil", "theorem1_adaptive")
_EXTRAPOLATING_MODES = ("aligndistil", "theorem1_contrast")
GLD_ACTIVATIONS = ("logits", "probs")


def aligndistil_teacher(dpo_logits: jax.typing.ArrayLike, ref_logits: jax.typing.ArrayLike, *,
                        mode: str = "aligndistil", beta: float = 0.1, beta2: float = 10.0,
                        eps: float = 1e-3, where: jax.typing.ArrayLike | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  r"""AlignDistil's teacher logits ``z*`` and token weights ``alpha_t`` from two models' logits.

  With ``z_d`` the DPO model's logits and ``z_r`` the second model's, the modes
  (named after the official ``--reward_boost_type``) are::

    aligndistil        alpha_t = beta2 TVD_t + eps     z* = z_d + alpha_t (z_d - z_r)
    theorem1_adaptive  alpha_t = beta2 TVD_t + eps     z* = alpha_t z_d + (1 - alpha_t) z_r
    theorem1           alpha_t = beta / beta2           z* = alpha_t z_d + (1 - alpha_t) z_r
    theorem1_contrast  alpha_t = beta / beta2           z* = z_d + alpha_t (z_d - z_r)

  with ``TVD_t = sum_v |softmax(z_d)_v - softmax(z_r)_v|``, the plain L1 distance
  (no ``1/2``, so in ``[0, 2]``) of the two models' distributions at temperature
  1, in float32, whatever temperature the loss uses; ``alpha_t`` is neither
  clamped nor bounded above (it can exceed 1, making ``1 - alpha_t`` negative in
  ``theorem1_adaptive``), exactly as in the official trainer.

  Which second model: ``theorem1`` is the paper's Theorem 1 (the RLHF objective
  with the DPO reward ``beta log(pi_d / pi_ref)`` and KL coefficient ``beta2`` is
  distillation from ``pi_ref^(1 - beta/beta2) pi_d^(beta/beta2)``), so ``ref_logits``
  is the DPO run's reference (SFT) policy there. ``aligndistil`` and
  ``theorem1_contrast`` use the contrastive DPO reward ``beta log(pi_d / pi_rd)``
  with ``ref_logits`` from a *reverse*-DPO model (trained on swapped preferences);
  the released scripts pass the reverse-DPO model as the official ``ref_model``
  for every mode. ``theorem1_adaptive`` (in the official trainer; its place in
  the paper unverified) puts the adaptive weight on the Theorem 1 combination.

  Both inputs are ``stop_gradient``'ed: the outputs are constants for the student.

  Args:
    dpo_logits: ``[..., V]`` logits of the DPO model ``z_d``.
    ref_logits: ``[..., V]`` logits of the second model ``z_r`` (see above).
    mode: one of ``ALIGNDISTIL_MODES``; default the paper's method, ``"aligndistil"``.
    beta: the DPO ``beta`` (scripts 0.1).
    beta2: the RLHF KL coefficient ``beta2`` (off-policy script 10, on-policy 15).
    eps: the floor added to ``alpha_t`` in the adaptive modes (official 1e-3).
    where: boolean mask of the batch shape ``[...]``; masked positions are computed
      from zero logits (finite, whatever the inputs hold there).

  Returns:
    ``(teacher_logits, alpha_t)``: float32 ``[..., V]`` and float32 ``[...]``
    (constant ``beta / beta2`` in the fixed modes). Pass both to
    :func:`aligndistil_loss`, which weights each token by ``beta / alpha_t``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.llm import aligndistil_teacher
    >>> z_d, z_r = jnp.array([2.0, 0.0]), jnp.array([0.0, 2.0])
    >>> teacher, alpha = aligndistil_teacher(z_d, z_r, mode="theorem1_contrast")
    >>> [round(float(x), 4) for x in teacher], round(float(alpha), 4)
    ([2.02, -0.02], 0.01)
    >>> teacher, alpha = aligndistil_teacher(z_d, z_r)   # TVD = 2 tanh(1)
    >>> round(float(alpha), 3)
    15.233

  References:
    Zhang et al., AlignDistil: Token-Level Language Model Alignment as Adaptive
    Policy Distillation (ACL 2025), arXiv:2503.02832; official code
    songmzhang/AlignDistil, ``OpenRLHF/openrlhf/trainer/aligndistil_offpolicy_trainer.py``.
  """
  fn = "aligndistil_teacher"
  v.choice(fn, "mode", mode, ALIGNDISTIL_MODES)
  beta = v.static_number(fn, "beta", beta, minimum=0.0, min_open=True)
  beta2 = v.static_number(fn, "beta2", beta2, minimum=0.0, min_open=True)
  eps = v.static_number(fn, "eps", eps, minimum=0.0, min_open=True)
  z_d, z_r, valid = logits_pair(fn, dpo_logits, ref_logits, where,
                                names=("dpo_logits", "ref_logits"))
  z_d = jax.lax.stop_gradient(z_d)
  batch = valid.shape
  if mode in _ADAPTIVE_MODES:
    tvd = jnp.sum(jnp.abs(jax.nn.softmax(z_d, axis=-1) - jax.nn.softmax(z_r, axis=-1)), axis=-1)
    alpha = beta2 * tvd + eps
  else:
    alpha = jnp.full(batch, beta / beta2, jnp.float32)
  a = alpha[..., None]
  if mode in _EXTRAPOLATING_MODES:
    teacher = z_d + a * (z_d - z_r)
  else:
    teacher = a * z_d + (1.0 - a) * z_r
  return teacher, alpha


def aligndistil_loss(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                     alpha_t: jax.typing.ArrayLike, *, beta: float = 0.1,
                     temperature: float = 1.0, where: jax.typing.ArrayLike | None = None
                     ) -> jax.Array:
  r"""AlignDistil's per-token loss ``(beta / alpha_t) KL(pi_theta || softmax(z* / T))``.

  ``pi_theta = softmax(z_s / T)``; ``z*`` and ``alpha_t`` come from
  :func:`aligndistil_teacher`. The reverse KL is the official one
  (``sum pi_theta (log pi_theta - log pi*)``, float32, no ``T^2``). ``alpha_t`` is
  a constant: the official trainer computes it from the frozen models under
  ``no_grad``; here it is ``stop_gradient``'ed (as is the teacher). The weight is
  ``beta / alpha_t``: ``beta2`` in the fixed modes, ``beta / (beta2 TVD_t + 1e-3)``
  in the adaptive ones.

  Temperature: the official on-policy trainer divides both the student and the
  teacher logits by ``--kd_temperature``; its off-policy trainer divides only the
  teacher's (the student stays at 1). This function divides both; the released
  scripts use ``T = 1``, where the two agree.

  Reduction (the caller's, with :func:`~logitlab.distill.divergences.reduce_tokens`):
  the official trainers sum the masked token losses of each sequence, divide by
  its token count when ``--reward_len_norm`` is set (both released scripts set
  it), then average over the micro-batch; with the scripts' micro-batch of 1 that
  is ``reduce_tokens(loss, mask, reduction="token_mean")``; without
  ``--reward_len_norm`` it is ``reduction="batch_mean"``. Mask the positions
  whose *next* token is a response token (the on-policy trainer's shifted labels).

  Args:
    student_logits: ``[..., V]`` logits of the policy being trained.
    teacher_logits: ``[..., V]`` teacher logits ``z*`` (``stop_gradient``'ed).
    alpha_t: float weights ``alpha_t > 0`` broadcastable to ``[...]``, e.g. the second
      output of :func:`aligndistil_teacher` or a Python float in the fixed modes
      (``stop_gradient``'ed).
    beta: the DPO ``beta`` (scripts 0.1).
    temperature: ``T > 0`` dividing both logits (scripts 1).
    where: boolean mask of the batch shape ``[...]``; masked positions give 0 and
      gradient 0, whatever their logits or ``alpha_t`` hold.

  Returns:
    float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.llm import aligndistil_loss, aligndistil_teacher
    >>> z_d, z_r = jnp.array([2.0, 0.0]), jnp.array([0.0, 2.0])
    >>> teacher, alpha = aligndistil_teacher(z_d, z_r, mode="theorem1")
    >>> float(aligndistil_loss(teacher, teacher, alpha))
    0.0
    >>> round(float(aligndistil_loss(jnp.zeros(2), teacher, alpha)), 4)  # beta2 * KL
    4.1863

  References:
    Zhang et al., AlignDistil: Token-Level Language Model Alignment as Adaptive
    Policy Distillation (ACL 2025), arXiv:2503.02832.
  """
  fn = "aligndistil_loss"
  beta = v.static_number(fn, "beta", beta, minimum=0.0, min_open=True)
  ls, lt, valid = _log_probs_pair(fn, student_logits, teacher_logits, temperature, where)
  alpha = v.float_array(fn, "alpha_t", alpha_t)
  try:
    alpha = jnp.broadcast_to(alpha, valid.shape)
  except ValueError:
    raise ValueError(f"{fn}: `alpha_t` of shape {alpha.shape} does not broadcast to the batch "
                     f"shape {valid.shape} of the logits.") from None
  alpha = jnp.where(valid, jax.lax.stop_gradient(alpha).astype(jnp.float32), 1.0)
  kl = jnp.sum(divergence_terms("reverse_kl", ls, lt), axis=-1)
  return jnp.where(valid, (beta / alpha) * kl, 0.0)


def _sorted_gw_cost(x: jax.Array, y: jax.Array, keep: jax.Array) -> jax.Array:
  r"""Closed-form GW cost of two sorted 1-D samples at the identity coupling, ``[B]``.

  ``x``, ``y``: ``[B, n]``, each row ascending over its first ``m`` entries, the
  entries where ``keep`` holds (the rest are ignored). With ``a``, ``b`` the
  centred samples, ``u = a - b``, ``w = a + b``::

    (1/m^2) sum_{i,k} ((x_i - x_k)^2 - (y_i - y_k)^2)^2
        = (1/m^2) [2m sum (u w)^2 + 6 (sum u w)^2 + 8 (sum a^2 sum u^2 - (sum a u)^2)]

  (expand the squares; the sums of ``a`` and ``b`` vanish). Every term is
  non-negative (the last is a Gram determinant) and of order ``u^2`` near a
  match, so nothing large cancels; the determinant is clamped at 0 against
  rounding.
  """
  count = jnp.sum(keep, axis=-1)
  m = jnp.maximum(count, 1).astype(jnp.float32)[:, None]

  def centred(z):
    z = jnp.where(keep, z, 0.0)
    return jnp.where(keep, z - jnp.sum(z, axis=-1, keepdims=True) / m, 0.0)

  a, b = centred(x), centred(y)
  u, w = a - b, a + b
  uw = u * w
  gram = jnp.sum(a * a, -1) * jnp.sum(u * u, -1) - jnp.sum(a * u, -1) ** 2
  m = m[:, 0]
  cost = 2.0 * m * jnp.sum(uw * uw, -1) + 6.0 * jnp.sum(uw, -1) ** 2 + 8.0 * jnp.maximum(gram, 0.0)
  return jnp.where(count > 0, cost / (m * m), 0.0)


def gld(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
        top_k: int = 10, activation: str = "logits", temperature: float = 1.0,
        where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""InfiGFusion's graph-on-logits distillation: sorted 1-D GW between co-activation graphs.

  Our formulation: the paper's exact one was not available to us (only its
  abstract could be read, and the stored Reallm-Labs/InfiGFusion repository holds
  no loss code). Per example, with ``t`` over the valid positions of the sequence
  (``|T|`` of them):

  1. Channels: ``K_t`` = the *teacher's* top-``k`` vocabulary entries at position
     ``t``; the nodes are ``U = union_t K_t``. The student is read on the same
     channels, so its graph has the same nodes and its loss is differentiable.
  2. Signals: ``x_t[i] = f(z_t)[i]`` for ``i`` in ``K_t``, 0 for the other nodes,
     with ``f(z) = z / T`` (``activation="logits"``, the paper's wording) or
     ``softmax(z / T)`` over the full vocabulary (``"probs"``; not renormalized
     over ``K_t``, so the student's mass outside the teacher's channels counts).
  3. Co-activation graph ``A = (1/|T|) sum_t x_t x_t^T`` on ``U`` (a mean, so that
     the scale does not grow with the sequence length), one for each model.
  4. Sorting-based GW: each graph's nodes are projected to their degrees
     ``d_i = sum_j A_ij = (1/|T|) sum_t x_t[i] sum_j x_t[j]`` (``O(S k)`` work, ``A``
     is never formed), sorted, and matched in order. The loss is the
     Gromov-Wasserstein cost of that coupling between the 1-D samples with
     squared-distance structure (Vayer et al., Sliced GW), uniform node weights::

       GLD = (1/m^2) sum_{i,k} ((d^s_(i) - d^s_(k))^2 - (d^t_(i) - d^t_(k))^2)^2,   m = |U|

     computed in closed form in ``O(m)`` after the ``O(V log V)`` sort.

  Why this form: the abstract describes top-``k`` logits, outer products summed
  over positions into a channel graph, and a sorting-based closed-form
  ``O(n log n)`` GW approximation; the 1-D GW at the sorted (monotone) coupling is
  the classic such closed form. It is a feasible coupling's cost, so an upper
  bound of the 1-D GW (the monotone coupling is not optimal in general). Unlike Sliced GW we do not also try the anti-monotone
  coupling: degrees have an orientation (a hub should match a hub), and the
  minimum of the two would call a graph and its mirrored degrees equal.

  Properties: ``>= 0``; 0 when the student's logits equal the teacher's; invariant
  to one permutation of the vocabulary applied to both, to a permutation of the
  sequence positions, and to a common shift of all degrees; piecewise smooth in
  the student logits (gradients flow through the sorted values; the teacher's
  channel choice is constant). Unverified against the paper: the channel set,
  the ``1/|T|`` normalisation, the degree projection, the inner cost (squared
  distances), the activation, the default ``top_k`` (10 is our choice).

  Args:
    student_logits: ``[..., S, V]`` student logits.
    teacher_logits: ``[..., S, V]`` teacher logits (``stop_gradient``'ed).
    top_k: channels kept per position, ``1 <= top_k <= V``.
    activation: ``"logits"`` or ``"probs"`` (see step 2).
    temperature: ``T > 0`` dividing both logits.
    where: boolean mask ``[..., S]`` of the valid positions; masked positions add
      nothing (loss and gradient as if absent, whatever their logits hold). An
      example with no valid position gives 0.

  Returns:
    float32 ``[...]``: one value per sequence.

  Example:
    >>> import jax.numpy as jnp
    >>> from logitlab.distill.llm import gld
    >>> teacher = jnp.array([[[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]]])
    >>> float(gld(teacher, teacher, top_k=2)[0])
    0.0
    >>> round(float(gld(0.5 * teacher, teacher, top_k=2)[0]), 1)
    109.6

  References:
    Wang et al., InfiGFusion: Graph-on-Logits Distillation via Efficient
    Gromov-Wasserstein for Model Fusion, arXiv:2505.13893.
    Vayer et al., Sliced Gromov-Wasserstein, arXiv:1905.10124.
  """
  fn = "gld"
  v.choice(fn, "activation", activation, GLD_ACTIVATIONS)
  temperature = v.static_number(fn, "temperature", temperature, minimum=0.0, min_open=True)
  z_s, z_t, valid = logits_pair(fn, student_logits, teacher_logits, where)
  if z_s.ndim < 2:
    raise ValueError(f"{fn}: the logits must be [..., S, V] (a sequence axis before the "
                     f"vocabulary), got shape {z_s.shape}.")
  *lead, seq, vocab = z_s.shape
  top_k = v.static_int(fn, "top_k", top_k, minimum=1)
  if top_k > vocab:
    raise ValueError(f"{fn}: `top_k`={top_k} exceeds the vocabulary size V={vocab}.")
  rows = math.prod(lead)
  valid = valid.reshape(rows, seq)
  z_s = z_s.reshape(rows, seq, vocab) / temperature
  z_t = z_t.reshape(rows, seq, vocab) / temperature
  _, channels = jax.lax.top_k(z_t, top_k)                           # [rows, S, k]
  if activation == "probs":
    z_s, z_t = jax.nn.softmax(z_s, axis=-1), jax.nn.softmax(z_t, axis=-1)
  # Each position adds x_t[i] * sum_j x_t[j] / |T| to the degree of its channels i.
  positions = jnp.sum(valid, axis=-1)                               # [rows]
  weight = jnp.where(valid, 1.0 / jnp.maximum(positions, 1)[:, None], 0.0)[..., None]
  example = jnp.broadcast_to(jnp.arange(rows)[:, None, None], channels.shape)

  def degrees(z):
    x = jnp.take_along_axis(z, channels, axis=-1)
    contribution = weight * x * jnp.sum(x, axis=-1, keepdims=True)
    return jnp.zeros((rows, vocab), jnp.float32).at[example, channels].add(contribution)

  hits = jnp.zeros((rows, vocab), jnp.float32).at[example, channels].add(
      jnp.broadcast_to(valid[..., None], channels.shape).astype(jnp.float32))
  node = hits > 0                                                   # [rows, V]: channels in U
  # Non-nodes sort last (+inf), then are dropped: the first |U| entries are the sorted degrees.
  keep = jnp.arange(vocab)[None, :] < jnp.sum(node, axis=-1)[:, None]

  def sorted_degrees(z):
    d = jnp.sort(jnp.where(node, degrees(z), jnp.inf), axis=-1)
    return jnp.where(keep, d, 0.0)

  cost = _sorted_gw_cost(sorted_degrees(z_s), sorted_degrees(z_t), keep)
  return cost.reshape(lead)
