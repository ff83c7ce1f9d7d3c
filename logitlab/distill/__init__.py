"""Knowledge-distillation objectives on logits, each faithful to its method's official definition.

* :mod:`~logitlab.distill.divergences`: forward / reverse KL, generalized JSD, skew KL,
  skew reverse KL, total variation on logits, and the token reductions of LLM libraries.
* :mod:`~logitlab.distill.classification`: Hinton KD, logit standardization, DKD, NKD,
  USKD, DHKD's binary losses and gradient projection, Plackett-Luce (PLD), DIST.
* :mod:`~logitlab.distill.llm`: AlignDistil's teachers and loss, graph-on-logits (GLD).
* :mod:`~logitlab.distill.linear`: :func:`linear_distillation`, any divergence fused
  with both output layers (no ``[N, V]`` tensor; also ``logitlab.linear_distillation``).

Conventions: float32 per-example losses (the caller reduces, e.g. with
:func:`reduce_tokens`), keyword-only static hyperparameters, teacher inputs
``stop_gradient``'ed, ``where`` masks of the batch shape giving loss 0 and gradient 0.
"""

from logitlab.distill.classification import (DHKD_AUXILIARY_LOSSES, binary_kl, binary_kl_norm,
                                             dhkd_losses, dhkd_projection, dist, dkd, dkd_warmup,
                                             kd, nkd, pld, project_conflicting,
                                             standardize_logits, uskd)
from logitlab.distill.divergences import (DIVERGENCES, divergence_terms, generalized_jsd,
                                          kl_divergence, reduce_tokens, reverse_kl, skew_kl,
                                          skew_reverse_kl, total_variation)
from logitlab.distill.linear import linear_distillation
from logitlab.distill.llm import (ALIGNDISTIL_MODES, GLD_ACTIVATIONS, aligndistil_loss,
                                  aligndistil_teacher, gld)

__all__ = [
    "aligndistil_loss",
    "ALIGNDISTIL_MODES",
    "aligndistil_teacher",
    "binary_kl",
    "binary_kl_norm",
    "DHKD_AUXILIARY_LOSSES",
    "dhkd_losses",
    "dhkd_projection",
    "dist",
    "divergence_terms",
    "DIVERGENCES",
    "dkd",
    "dkd_warmup",
    "generalized_jsd",
    "gld",
    "GLD_ACTIVATIONS",
    "kd",
    "kl_divergence",
    "linear_distillation",
    "nkd",
    "pld",
    "project_conflicting",
    "reduce_tokens",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "standardize_logits",
    "total_variation",
    "uskd",
]
