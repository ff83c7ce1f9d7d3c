"""Pallas kernels of the fused linear cross-entropy (Cut Cross-Entropy, arXiv:2411.09009).

``tpu.py`` (Mosaic TPU) and ``gpu.py`` (Triton) implement one contract, shared with
the plain-JAX backend ``logitlab._linear_xla``::

  forward(hidden[N, D], weight[V, D], bias[V] | None, labels[N], *, softcap,
          with_logit_sum, block_tokens, block_vocab, interpret)
      -> float32 (lse[N], label_logit[N], logit_sum[N]) of z = cap(hidden @ weight.T + bias)
  backward(hidden, weight, bias, labels, valid, lse, d_loss, p_scale, *, on, off, z_loss,
           softcap, filter_eps, block_tokens, block_vocab, interpret)
      -> (d_hidden, d_weight, d_bias) for
         g = where(valid, (p_scale * softmax(z) - d_loss * (on * onehot(labels) + off)) * cap'(z), 0)

Any N, V and D: ragged tiles are masked inside the kernels, and nothing of size
[V, D] or [N, V] is copied or materialized. ``logitlab.linear_cross_entropy``
wraps them in its custom VJP (``impl="pallas_tpu"`` / ``"pallas_gpu"``).
"""
