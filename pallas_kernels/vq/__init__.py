"""Pallas kernels of VQ-Logits (Shao et al., arXiv:2505.10202).

``tpu.py`` (Mosaic TPU, ``impl="pallas_tpu"``) and ``gpu.py`` (Triton,
``impl="pallas_gpu"``) implement the contracts of the plain-JAX forms in
``logitlab.vq`` / ``logitlab.vq_ops`` (``impl="xla"``); all outputs are float32
unless stated, ``z`` are code logits ``[N, K]`` and ``m`` the assignment ``[V]``::

  teacher_code_mass(hidden[N, D], weight[V, D], bias[V] | None, m, token_bias[V] | None,
                    *, num_codes, temperature, ...)
      -> (code_mass[N, K], lse[N], neg_entropy[N], bias_mean[N] | None)
  scatter_logits(z, m, token_bias | None, shift[N] | None, *, out_dtype, ...)
      -> out[N, V] = z[n, m(v)] + b_v - shift[n]                    (in out_dtype)
  scatter_top_k(z, m, token_bias | None, *, k, ...)
      -> (values[N, k], int32 ids[N, k]) = lax.top_k(z[:, m] + b, k)
  segment_sum(probs[N, V], m, *, num_codes, ...)
      -> P[N, K] = sum_{v: m(v)=k} probs[n, v]

``teacher_code_mass`` keeps the teacher's ``[N, V]`` logits in on-chip tiles
(VMEM on TPU; registers / shared memory on GPU); ``scatter_top_k`` keeps its
running top-k there. ``scatter_logits`` and ``segment_sum`` are each other's
transposes (``logitlab._vq_kernels`` uses one as the other's gradient). The GPU
kernels gather code logits with pointer loads; the TPU kernels use exact one-hot
MXU matmuls (see each module). There is no log-sum-exp kernel: the identity
``logsumexp_k(z_k + B_k)`` of ``logitlab.vq_lse`` costs ``O(N K + V)``, less
than any stream over the vocabulary.
"""
