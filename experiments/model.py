"""A small decoder-only transformer LM (flax.nnx) with a pluggable logitlab output head.

The trunk is a standard pre-norm GPT: token embedding (plus learned positions,
or rotary positions inside attention), ``depth`` blocks of causal multi-head
self-attention and a GELU MLP, each ``x + f(norm(x))``, and a final norm. The
output layer is a :class:`logitlab.nn.DenseLogitsHead` (``head="dense"``,
``weight[V, D]``) or a :class:`logitlab.nn.VQLogitsHead` (``head="vq"``,
``codebook[K, D]`` plus a token-to-code assignment). Training losses go through
the head's fused loss (:func:`logitlab.linear_cross_entropy` /
:func:`logitlab.vq_cross_entropy`), so no ``[B, S, V]`` logits are built;
:meth:`TransformerLM.logits` materializes them for small evaluations.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> config = ModelConfig(vocab_size=50, width=16, depth=1, heads=2, max_seq_len=8)
  >>> model = TransformerLM(config, rngs=nnx.Rngs(0))
  >>> tokens = jnp.zeros((2, 8), jnp.int32)
  >>> model.hidden(tokens).shape, model.logits(tokens).shape, model.token_losses(tokens).shape
  ((2, 8, 16), (2, 8, 50), (2, 7))
  >>> model.num_head_params
  800
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from logitlab import nn as heads

HEADS = ("dense", "vq")
POSITIONS = ("rope", "learned")
NORMS = ("rms", "layer")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of :class:`TransformerLM` (every field is also a harness CLI flag)."""
  vocab_size: int = dataclasses.field(default=256, metadata={"help": "vocabulary size V"})
  width: int = dataclasses.field(default=64, metadata={"help": "model width D"})
  depth: int = dataclasses.field(default=2, metadata={"help": "transformer blocks"})
  heads: int = dataclasses.field(default=4, metadata={"help": "attention heads (divide width)"})
  mlp_ratio: float = dataclasses.field(default=4.0, metadata={"help": "MLP hidden = ratio * width"})
  max_seq_len: int = dataclasses.field(
      default=1024, metadata={"help": "longest input (table size for learned positions)"})
  positions: str = dataclasses.field(default="rope", metadata={"help": "rope | learned"})
  norm: str = dataclasses.field(default="rms", metadata={"help": "rms | layer (pre-norm)"})
  head: str = dataclasses.field(default="dense", metadata={"help": "output head: dense | vq"})
  num_codes: int = dataclasses.field(default=64, metadata={"help": "VQ head: codebook size K"})
  token_bias: bool = dataclasses.field(
      default=False, metadata={"help": "per-token output bias [V] (dense: bias, vq: token_bias)"})
  dtype: str = dataclasses.field(
      default="float32", metadata={"help": "trunk compute dtype: float32 | bfloat16 (params "
                                           "and the head's loss stay float32)"})
  z_loss: float = dataclasses.field(default=0.0, metadata={"help": "z-loss coefficient"})
  label_smoothing: float = dataclasses.field(default=0.0, metadata={"help": "label smoothing"})

  def __post_init__(self):
    parent = getattr(super(), "__post_init__", None)  # cooperative: configs mixing this in
    if parent is not None:
      parent()
    for name, value, choices in [("head", self.head, HEADS), ("norm", self.norm, NORMS),
                                 ("positions", self.positions, POSITIONS),
                                 ("dtype", self.dtype, DTYPES)]:
      if value not in choices:
        raise ValueError(f"ModelConfig: `{name}` must be one of {choices}, got {value!r}.")
    for name in ("vocab_size", "width", "depth", "heads", "max_seq_len", "num_codes"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig: `{name}` must be >= 1, got {getattr(self, name)}.")
    if self.width % self.heads:
      raise ValueError(f"ModelConfig: `width`={self.width} must be divisible by "
                       f"`heads`={self.heads}.")
    if self.positions == "rope" and (self.width // self.heads) % 2:
      raise ValueError(f"ModelConfig: rotary positions need an even head dimension, got "
                       f"width/heads = {self.width // self.heads}.")
    if self.head == "vq" and self.num_codes > self.vocab_size:
      raise ValueError(f"ModelConfig: `num_codes`={self.num_codes} exceeds "
                       f"`vocab_size`={self.vocab_size}.")
    if self.mlp_ratio <= 0:
      raise ValueError(f"ModelConfig: `mlp_ratio` must be > 0, got {self.mlp_ratio}.")

  @classmethod
  def from_config(cls, config: Any, **overrides) -> "ModelConfig":
    """The model fields of any config object (e.g. an experiment's config that subclasses this)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
              if hasattr(config, f.name)}
    return cls(**{**values, **overrides})


def _norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if config.norm == "rms":
    return nnx.RMSNorm(config.width, dtype=jnp.dtype(config.dtype), rngs=rngs)
  return nnx.LayerNorm(config.width, dtype=jnp.dtype(config.dtype), rngs=rngs)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of ``x[B, S, H, Dh]`` at ``positions[S]`` (half-split pairing).

  Rotates the pairs ``(x[..., i], x[..., i + Dh/2])`` by ``positions * base**(-2i/Dh)``
  (Su et al., RoFormer, arXiv:2104.09864), in float32.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [S, half]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention (``jax.nn.dot_product_attention``, optional rotary)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.heads = config.heads
    self.rope = config.positions == "rope"
    dtype = jnp.dtype(config.dtype)
    self.qkv = nnx.Linear(config.width, 3 * config.width, use_bias=False, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(config.width, config.width, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq, width = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(batch, seq, 3 * self.heads, -1), 3, axis=2)
    if self.rope:
      positions = jnp.arange(seq)
      q, k = rotary(q, positions), rotary(k, positions)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(batch, seq, width))


class MLP(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    hidden = max(1, int(round(config.mlp_ratio * config.width)))
    dtype = jnp.dtype(config.dtype)
    self.up = nnx.Linear(config.width, hidden, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, config.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(config, rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = _norm(config, rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nnx.Module):
  """Decoder-only transformer LM whose output layer is a logitlab head.

  Args:
    config: the architecture.
    assignment: VQ head only: ``[V]`` token-to-code map (default: contiguous
      buckets, see :class:`logitlab.nn.VQLogitsHead`).
    rngs: parameter initialization.

  Attributes:
    head: a :class:`logitlab.nn.DenseLogitsHead` (``head.weight[V, D]``,
      optional ``head.bias[V]``) or :class:`logitlab.nn.VQLogitsHead`
      (``head.codebook[K, D]``, ``head.assignment[V]``, optional ``head.token_bias[V]``).
  """

  def __init__(self, config: ModelConfig, *, assignment: jax.Array | None = None,
               rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.embed = nnx.Embed(config.vocab_size, config.width, dtype=dtype,
                           embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)
    self.position_embed = (
        nnx.Embed(config.max_seq_len, config.width, dtype=dtype,
                  embedding_init=nnx.initializers.normal(stddev=0.02), rngs=rngs)
        if config.positions == "learned" else None)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
    self.final_norm = _norm(config, rngs)
    if config.head == "dense":
      if assignment is not None:
        raise ValueError("TransformerLM: `assignment` applies to head='vq' only.")
      self.head = heads.DenseLogitsHead(config.width, config.vocab_size,
                                        use_bias=config.token_bias, rngs=rngs)
    else:
      self.head = heads.VQLogitsHead(config.width, config.vocab_size, config.num_codes,
                                     assignment=assignment, use_token_bias=config.token_bias,
                                     rngs=rngs)

  # --- forward -------------------------------------------------------------------------------

  def hidden(self, tokens: jax.Array) -> jax.Array:
    """Final (normed) hidden states ``[B, S, D]`` float32 of ``tokens[B, S]``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"TransformerLM: `tokens` must be [batch, seq], got shape {tokens.shape}.")
    if tokens.shape[1] > self.config.max_seq_len:
      raise ValueError(f"TransformerLM: sequence length {tokens.shape[1]} exceeds "
                       f"max_seq_len={self.config.max_seq_len}.")
    x = self.embed(tokens)
    if self.position_embed is not None:
      x = x + self.position_embed(jnp.arange(tokens.shape[1]))[None]
    for block in self.blocks:
      x = block(x)
    return self.final_norm(x).astype(jnp.float32)

  def logits(self, tokens: jax.Array) -> jax.Array:
    """Materialized float32 logits ``[B, S, V]`` (small evaluations; training uses :meth:`loss`)."""
    return self.head(self.hidden(tokens)).astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.logits(tokens)

  # --- losses --------------------------------------------------------------------------------

  def _loss_options(self, **overrides) -> dict:
    options = dict(z_loss=self.config.z_loss, label_smoothing=self.config.label_smoothing)
    return {**options, **overrides}

  def token_losses(self, tokens: jax.Array, mask: jax.Array | None = None,
                   **loss_options) -> jax.Array:
    """Per-position next-token losses ``[B, T-1]`` float32 of ``tokens[B, T]``.

    The trunk reads ``tokens[:, :-1]`` and position ``t`` is scored on
    ``tokens[:, t + 1]`` through the head's fused loss (the same values as
    ``linear_cross_entropy(hidden(tokens), weight, tokens, shift=1)[:, :-1]``,
    without running the trunk on a last position that has no target). ``mask``
    (bool ``[B, T]``, aligned with ``tokens``) marks valid targets: position ``t``
    counts where ``mask[:, t + 1]``; masked positions give 0. ``loss_options``
    pass through to ``head.loss`` (e.g. ``impl=`` or tile sizes for the dense head).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
      raise ValueError(f"TransformerLM: `tokens` must be [batch, seq + 1] with seq >= 1, got "
                       f"shape {tokens.shape}.")
    where = None
    if mask is not None:
      mask = jnp.asarray(mask)
      if mask.shape != tokens.shape:
        raise ValueError(f"TransformerLM: `mask` shape {mask.shape} must equal `tokens` shape "
                         f"{tokens.shape}.")
      where = mask[:, 1:].astype(bool)
    hidden = self.hidden(tokens[:, :-1])
    return self.head.loss(hidden, tokens[:, 1:], where=where, **self._loss_options(**loss_options))

  def loss(self, tokens: jax.Array, mask: jax.Array | None = None, **loss_options) -> jax.Array:
    """Mean next-token loss over the valid targets of ``tokens[B, T]`` (scalar float32).

    See :meth:`token_losses`; a batch without valid targets gives 0.
    """
    losses = self.token_losses(tokens, mask, **loss_options)
    if mask is None:
      return losses.mean()
    count = jnp.asarray(mask)[:, 1:].astype(jnp.float32).sum()
    return losses.sum() / jnp.maximum(count, 1.0)

  # --- sizes ---------------------------------------------------------------------------------

  @property
  def num_params(self) -> int:
    """Trainable parameters of the whole model (the VQ assignment is not a parameter)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  @property
  def num_head_params(self) -> int:
    """Trainable parameters of the output layer (``V D`` (+ V) dense, ``K D`` (+ V) VQ)."""
    return self.head.num_params
