"""Pallas kernels of VQ-Logits distillation (Shao et al., arXiv:2505.10202).

``tpu.py`` (Mosaic TPU, ``impl="pallas_tpu"``) and ``gpu.py`` (Triton,
``impl="pallas_gpu"``; also takes ``block_codes`` and ``block_d``) implement the
contract of the plain-JAX backend ``logitlab.vq_ops`` (``impl="xla"``)::

  teacher_code_mass(hidden[N, D], weight[V, D], bias[V] | None, assignment[V],
                    token_bias[V] | None, *, num_codes, temperature, block_tokens,
                    block_vocab, interpret)
      -> float32 (code_mass[N, K], lse[N], neg_entropy[N], bias_mean[N] | None)

of the teacher ``p = softmax((hidden @ weight.T + bias) / T)``: per-code mass,
log-normalizer, ``sum p log p`` and ``sum_v p_v b_v``, with the ``[N, V]`` logits
kept in on-chip tiles (VMEM on TPU; registers / shared memory on GPU). The TPU
kernel holds the whole ``[block_tokens, K]`` code mass in VMEM; the GPU kernel
adds a grid axis over chunks of ``block_codes`` codes (each chunk's programs
recompute the logit tiles), see ``gpu.py``.
"""
