"""logitlab: pure JAX functions for logit heads, losses and distillation."""

from logitlab import distill
from logitlab.debug import debug_checks
from logitlab.distill.linear import linear_distillation
from logitlab.linear import linear_cross_entropy, vocab_parallel_linear_cross_entropy
from logitlab.losses import cross_entropy, kl_divergence, softmax_cross_entropy
from logitlab.vq import code_log_mass, vq_code_logits, vq_cross_entropy, vq_scatter
from logitlab.vq_assignment import (codebook_from_assignment, contiguous_assignment,
                                    kmeans_assignment, kmeans_plus_plus, random_assignment,
                                    reassign)
from logitlab.vq_sampling import (VQSamplerTables, vq_log_probs_topk, vq_sample,
                                  vq_sampler_tables, vq_sampling_probs)
from logitlab.vq_ops import (TeacherCodeMass, vq_distillation_loss, vq_log_probs, vq_lse,
                             vq_segment_sum, vq_teacher_code_mass, vq_top_k)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "debug_checks",
    "kl_divergence",
    "linear_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "distill",
    "linear_distillation",
    "softmax_cross_entropy",
    "code_log_mass",
    "vq_code_logits",
    "vq_cross_entropy",
    "vq_scatter",
    "TeacherCodeMass",
    "vq_distillation_loss",
    "vq_log_probs",
    "vq_lse",
    "vq_segment_sum",
    "vq_teacher_code_mass",
    "vq_top_k",
    "codebook_from_assignment",
    "contiguous_assignment",
    "kmeans_assignment",
    "kmeans_plus_plus",
    "random_assignment",
    "reassign",
    "VQSamplerTables",
    "vq_log_probs_topk",
    "vq_sample",
    "vq_sampler_tables",
    "vq_sampling_probs",
]
