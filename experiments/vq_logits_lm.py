"""Dense vs VQ-Logits heads in a small transformer LM: output parameters, head time, perplexity.

  python -m experiments.vq_logits_lm [--preset tiny|small|pod] [--key=value ...]

Issue 6 section 4, first bullet: the claims of VQ-Logits (Shao et al. 2025, arXiv:2505.10202:
"up to 99% parameter reduction in the output layer and 6x speedup in logit computation, with only
a marginal 4% increase in perplexity") measured on our own small model. Without --preset the tiny
preset runs (about 8 minutes on 2 shared CPU cores, tokenizer training included).

Variants (--variants, comma-separated; the table keeps this order):
  dense               the dense head weight[V, D] (the baseline every ratio is taken against)
  dense+bias          ... with a per-token bias [V]
  vq<K>               a VQ-Logits head, codebook[K, D] and a token-to-code assignment m[V] made by
                      k-means of the trained dense model's output embedding (our formulation of
                      the paper's "pre-assigned" mapping, see logitlab.vq_assignment):
                      logitlab.kmeans_assignment(weight, K) gives the assignment and the initial
                      codebook (the centroids)
  vq<K>:contiguous    baseline: consecutive token ids share a code, codebook randomly initialised
  vq<K>:random        baseline: a balanced random partition, codebook randomly initialised
  ...+bias            any VQ variant with a per-token bias token_bias[V]

Every variant trains the same transformer from the same initialisation (same --seed: the trunk is
created before the head) on the same batches for --steps updates; only the output layer differs.
The dense variants train first: the k-means variants need the plain dense model's trained
head.weight (so they see the dense run's output embedding; the contiguous / random rows do not).
The assignment stays fixed during training (the codebook and token bias train). A per-token bias
(dense or VQ) starts as --bias_init: "unigram" (default) is log p(v), the add-one smoothed token
frequencies of the training data, i.e. the bias of a context-free model, with which a head whose
other logits are 0 predicts the unigram distribution (for a VQ head: within each code the tokens'
shares of the code's frequency); "zeros" is the plain start. With Adam a bias moves about one
learning rate per update, so a zero bias cannot reach log-frequency differences of several nats in
a short run: the unigram start is what lets a short run show what the bias can do.

Columns of the table (printed, and written as results.md / .csv / .png in --out_dir):
  token_bias        no, or the per-token bias's start (--bias_init: unigram | zeros)
  head_params       trainable parameters of the output layer (V D, K D, + V with a bias)
  fewer_params_pct  100 (1 - head_params / dense head_params)
  head_ms           value_and_grad of the head's mean loss alone w.r.t. the hidden states and the
                    head's parameters (the fused loss the model trains with: linear_cross_entropy
                    for dense, vq_cross_entropy for VQ) at one fixed batch of --bench_tokens hidden
                    states (N(0, 1), the scale of the final norm's output) and real next-token
                    labels; median of --bench_repeats runs, all variants timed round-robin in this
                    process after training (so they share the machine's load)
  speedup_vs_dense  dense head_ms / head_ms
  speedup_vs_naive  the same against a materialized dense head (logits [N, V], then cross-entropy)
  val_loss, val_ppl mean next-token loss on --eval_batches validation batches (the same batches for
                    every variant, spread evenly over the stdlib validation split; the first ones of
                    a tfds split) and exp(val_loss); with --z_loss / --label_smoothing the loss
                    includes those terms
  ppl_change_pct    100 (val_ppl / dense val_ppl - 1)
  train_s           wall time of the variant's training run (compilation and evals included)
Above the table: the validation loss of the training data's unigram distribution (a context-free
reference: what a model that ignores its input achieves).

--head, --num_codes and --token_bias are set by each variant and may not be given. Other files in
--out_dir: results.json (raw numbers, data and machine), meta.json (command, jax, device, date, as
the benchmarks write it), assignments.npz (each VQ variant's token-to-code map, keyed by its run
directory's name), val_loss.png (validation-loss curves of all variants), train_loss.png, and one
harness run directory per variant (config.json, train/eval .jsonl / .csv, loss.png, checkpoints
when --checkpoint_every > 0, which a rerun of the same command resumes from).

Data: --corpus=stdlib is the embedded Python-stdlib corpus with a byte-level BPE of --vocab_size
trained on first use (experiments.data.stdlib_data, cached in --cache_dir); another value is a
tensorflow-datasets name (lm1b, c4/en) read with experiments.data.tfds_text, tokenized with the
stdlib BPE of --vocab_size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from experiments import common
from experiments import data as data_lib
from experiments import harness

ASSIGNMENTS = ("kmeans", "contiguous", "random")
BIAS_INITS = ("unigram", "zeros")
# Fields of the model config that each variant sets; the command line may not.
VARIANT_FIELDS = ("head", "num_codes", "token_bias")
PAPER = ("VQ-Logits (arXiv:2505.10202, abstract) reports: up to 99% fewer output-layer "
         "parameters, 6x faster logit computation, +4% perplexity vs the full softmax")

HEADERS = ("variant", "head", "K", "token_bias", "assignment", "head_params", "fewer_params_pct",
           "head_ms", "speedup_vs_dense", "speedup_vs_naive", "val_loss", "val_ppl",
           "ppl_change_pct", "train_s")

_VARIANT_RE = re.compile(r"^(?:(dense)|vq(\d+)(?::([a-z]+))?)(\+bias)?$")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One output layer of the comparison, parsed from its name (see the module docstring)."""
  name: str
  head: str                 # "dense" | "vq"
  num_codes: int | None     # K (VQ only)
  token_bias: bool
  assignment: str | None    # "kmeans" | "contiguous" | "random" (VQ only)

  @property
  def dirname(self) -> str:
    return self.name.replace(":", "-")


def parse_variant(text: str) -> Variant:
  """``"dense"``, ``"dense+bias"``, ``"vq<K>[:kmeans|:contiguous|:random][+bias]"`` -> Variant."""
  name = text.strip()
  match = _VARIANT_RE.match(name)
  if match is None:
    raise ValueError(f"bad variant {text!r}: expected dense[+bias] or "
                     f"vq<K>[:{'|:'.join(ASSIGNMENTS)}][+bias], e.g. vq256 or vq64:random+bias.")
  dense, codes, assignment, bias = match.groups()
  if dense:
    return Variant(name, "dense", None, bool(bias), None)
  assignment = assignment or "kmeans"
  if assignment not in ASSIGNMENTS:
    raise ValueError(f"bad variant {text!r}: assignment must be one of {list(ASSIGNMENTS)}, got "
                     f"{assignment!r}.")
  if int(codes) < 1:
    raise ValueError(f"bad variant {text!r}: K must be >= 1.")
  return Variant(name, "vq", int(codes), bool(bias), assignment)


@dataclasses.dataclass(frozen=True)
class Config(harness.LMConfig):
  """The LM fields of :class:`experiments.harness.LMConfig` plus this experiment's own."""
  variants: tuple[str, ...] = dataclasses.field(
      default=("dense", "vq64", "vq256", "vq256+bias", "vq256:contiguous"),
      metadata={"help": "output layers compared: dense[+bias], vq<K>[:kmeans|:contiguous|:random]"
                        "[+bias] (see the description)"})
  corpus: str = dataclasses.field(
      default="stdlib",
      metadata={"help": "stdlib (embedded, offline) or a tfds name (lm1b, c4/en)"})
  max_files: int | None = dataclasses.field(
      default=None, metadata={"help": "stdlib corpus: only the first N files (sorted paths)"})
  val_fraction: float = dataclasses.field(
      default=data_lib.DEFAULT_VAL_FRACTION,
      metadata={"help": "stdlib corpus: share of files held out for validation (by path hash)"})
  cache_dir: str | None = dataclasses.field(
      default=None, metadata={"help": "tokenizer / token cache (default: experiments.data's)"})
  data_dir: str | None = dataclasses.field(
      default=None, metadata={"help": "tfds data directory (tfds corpora only)"})
  bias_init: str = dataclasses.field(
      default="unigram", metadata={"help": "start of the per-token bias of '+bias' variants: "
                                           "unigram (log token frequencies) | zeros"})
  kmeans_iterations: int = dataclasses.field(
      default=20, metadata={"help": "Lloyd iterations of the k-means assignment"})
  kmeans_balanced: bool = dataclasses.field(
      default=False, metadata={"help": "cap k-means buckets (logitlab.kmeans_assignment balanced)"})
  bench_tokens: int = dataclasses.field(
      default=0, metadata={"help": "hidden states N of the head timing (0: batch_size * seq_len)"})
  bench_repeats: int = dataclasses.field(
      default=5, metadata={"help": "timed runs per head (the median is reported)"})
  out_dir: str = dataclasses.field(
      default="runs/vq_logits_lm", metadata={"help": "output directory"})

  def __post_init__(self):
    super().__post_init__()
    defaults = {f.name: f.default for f in dataclasses.fields(harness.LMConfig)}
    for name in VARIANT_FIELDS:
      if getattr(self, name) != defaults[name]:
        raise ValueError(f"--{name} is set per variant by --variants; do not pass it.")
    variants = [parse_variant(v) for v in self.variants]
    if not variants:
      raise ValueError("`variants` is empty.")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
      raise ValueError(f"`variants` repeats a name: {names}.")
    if not any(v.head == "dense" for v in variants):
      raise ValueError("`variants` needs a dense variant (the baseline of every ratio).")
    if any(v.assignment == "kmeans" for v in variants) and "dense" not in names:
      raise ValueError("k-means variants cluster the trained plain `dense` head: add `dense` to "
                       "`variants`.")
    for v in variants:
      if v.head == "vq" and v.num_codes > self.vocab_size:
        raise ValueError(f"variant {v.name}: K={v.num_codes} exceeds vocab_size="
                         f"{self.vocab_size}.")
    if self.bias_init not in BIAS_INITS:
      raise ValueError(f"`bias_init` must be one of {list(BIAS_INITS)}, got {self.bias_init!r}.")
    if self.kmeans_iterations < 0 or self.bench_tokens < 0 or self.bench_repeats < 1:
      raise ValueError("`kmeans_iterations` and `bench_tokens` must be >= 0, `bench_repeats` "
                       ">= 1.")

  @property
  def parsed_variants(self) -> list[Variant]:
    return [parse_variant(v) for v in self.variants]


PRESETS = {
    # 2 CPU cores, under 10 minutes including the BPE training (about 10 s) on a fresh cache.
    "tiny": dict(vocab_size=8192, width=128, depth=2, heads=4, seq_len=128, batch_size=16,
                 steps=300, learning_rate=3e-3, warmup_steps=30, eval_every=50, eval_batches=8,
                 checkpoint_every=0, bench_repeats=5,
                 variants=("dense", "vq64", "vq256", "vq256+bias", "vq256:contiguous"),
                 out_dir="runs/vq_logits_lm/tiny"),
    # A workstation (many cores or one GPU): about 100 M tokens per variant.
    "small": dict(vocab_size=16384, width=384, depth=6, heads=6, seq_len=256, batch_size=64,
                  steps=6000, learning_rate=1e-3, warmup_steps=300, eval_every=500,
                  eval_batches=64, checkpoint_every=1000, bench_repeats=10,
                  variants=("dense", "vq64", "vq256", "vq1024", "vq256+bias", "vq1024+bias",
                            "vq256:contiguous", "vq256:random"),
                  out_dir="runs/vq_logits_lm/small"),
    # A pod: lm1b (prepared array_record copy) with the 32768-entry stdlib BPE, data x vocab mesh
    # (the dense head's weight sharded over a "vocab" axis of 4: the device count must divide).
    "pod": dict(corpus="lm1b", vocab_size=32768, width=1024, depth=12, heads=16, seq_len=256,
                batch_size=512, steps=20000, learning_rate=6e-4, warmup_steps=1000,
                eval_every=1000, eval_batches=100, dtype="bfloat16", vocab_parallel=4,
                checkpoint_every=1000, bench_tokens=16384, bench_repeats=10,
                variants=("dense", "vq256", "vq1024", "vq4096", "vq1024+bias",
                          "vq1024:contiguous", "vq1024:random"),
                out_dir="runs/vq_logits_lm/pod"),
}


# ------------------------------------------------------------------------------------------------
# Data


def load_data(cfg: Config):
  """``TokenData`` (stdlib) or ``TfdsTokenData`` (a tfds corpus) with the BPE of ``vocab_size``."""
  if cfg.corpus == "stdlib":
    return data_lib.stdlib_data(vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                                max_files=cfg.max_files, seed=cfg.seed, cache_dir=cfg.cache_dir)
  tokenizer = data_lib.stdlib_tokenizer(vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                                        max_files=cfg.max_files, cache_dir=cfg.cache_dir)
  return data_lib.tfds_text(cfg.corpus, data_dir=cfg.data_dir, tokenizer=tokenizer, seed=cfg.seed)


def unigram_log_prior(dataset, cfg: Config, vocab_size: int) -> np.ndarray:
  """``log p(v)``, float32 ``[V]``: add-one smoothed token frequencies of the training data.

  In-memory token streams: all training tokens; tfds corpora: the first ``min(steps, 100)``
  training batches.
  """
  if isinstance(dataset, data_lib.TokenData):
    counts = np.bincount(np.asarray(dataset.train_tokens), minlength=vocab_size)
  else:
    counts = sum(np.bincount(dataset.batch(step, cfg.batch_size, cfg.seq_len).reshape(-1),
                             minlength=vocab_size) for step in range(max(1, min(cfg.steps, 100))))
  counts = counts[:vocab_size].astype(np.float64) + 1.0
  return np.log(counts / counts.sum()).astype(np.float32)


def validation_batches(dataset, cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(tokens, mask)`` validation batches, the same for every variant.

  In-memory token streams: ``eval_batches`` batches spread evenly over all the validation
  windows (the split's files differ in style, so its first batches alone would be a biased
  sample); tfds splits: the first ``eval_batches`` batches. ``mask`` drops padded targets.
  """
  b, s = cfg.batch_size, cfg.seq_len
  if isinstance(dataset, data_lib.TokenData):
    every = list(dataset.val_batches(b, s))
    if not every:
      raise ValueError("the validation split has no tokens: raise --max_files.")
    count = min(max(cfg.eval_batches, 1), len(every))
    picks = np.unique(np.round(np.linspace(0, len(every) - 1, count)).astype(int))
    chosen = [every[i] for i in picks]
  else:
    chosen = list(dataset.val_batches(b, s, max_batches=max(cfg.eval_batches, 1)))
  return [(t, t != dataset.pad_id) for t in chosen]


# ------------------------------------------------------------------------------------------------
# Heads


def lm_config(cfg: Config, variant: Variant, vocab_size: int) -> harness.LMConfig:
  """The harness config of one variant (its own run directory under ``out_dir``)."""
  values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(harness.LMConfig)}
  values.update(vocab_size=vocab_size, head=variant.head, token_bias=variant.token_bias,
                num_codes=variant.num_codes or values["num_codes"],
                out_dir=str(pathlib.Path(cfg.out_dir) / variant.dirname))
  return harness.LMConfig(**values)


def model_fn(config: harness.LMConfig, *, assignment=None, codebook=None,
             bias=None) -> Callable:
  """``rngs -> TransformerLM`` with the VQ head's assignment (and initial codebook, bias) given.

  ``bias`` (``[V]``, heads with a per-token bias only) replaces the zero initial bias.
  """
  from experiments.model import ModelConfig, TransformerLM
  model_config = ModelConfig.from_config(config)
  if config.seq_len > model_config.max_seq_len:
    raise ValueError(f"seq_len={config.seq_len} exceeds max_seq_len={model_config.max_seq_len}; "
                     "raise --max_seq_len.")

  def build(rngs):
    model = TransformerLM(model_config, assignment=assignment, rngs=rngs)
    if codebook is not None:
      model.head.codebook[...] = codebook
    if bias is not None:
      (model.head.bias if config.head == "dense" else model.head.token_bias)[...] = bias
    return model
  return build


def make_assignment(variant: Variant, vocab_size: int, *, dense_weight: np.ndarray | None,
                    cfg: Config) -> tuple[np.ndarray, np.ndarray | None]:
  """``(assignment int32 [V], initial codebook float32 [K, D] or None)`` of a VQ variant."""
  import jax
  import logitlab
  k = variant.num_codes
  if variant.assignment == "contiguous":
    return np.asarray(logitlab.contiguous_assignment(vocab_size, k)), None
  if variant.assignment == "random":
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    return np.asarray(logitlab.random_assignment(vocab_size, k, key=key)), None
  codebook, assignment = logitlab.kmeans_assignment(
      dense_weight, k, key=jax.random.key(cfg.seed), iterations=cfg.kmeans_iterations,
      balanced=cfg.kmeans_balanced)
  return np.asarray(assignment), np.asarray(codebook)


def make_head(variant: Variant, width: int, vocab_size: int, assignment, seed: int):
  """The variant's output layer alone (as :class:`experiments.model.TransformerLM` builds it)."""
  from flax import nnx
  from logitlab import nn as heads
  rngs = nnx.Rngs(seed)
  if variant.head == "dense":
    return heads.DenseLogitsHead(width, vocab_size, use_bias=variant.token_bias, rngs=rngs)
  return heads.VQLogitsHead(width, vocab_size, variant.num_codes, assignment=assignment,
                            use_token_bias=variant.token_bias, rngs=rngs)


def interleaved_median_seconds(fns: Mapping[str, Callable[[], object]],
                               repeats: int) -> dict[str, float]:
  """Median wall time of each ``fn()`` over ``repeats`` rounds that run every fn once in turn.

  One warm-up call each first (compilation). Round-robin, so a burst of load on a shared
  machine slows every function's sample of that round rather than one function's samples.
  """
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in samples.items()}


def head_times(variants: Sequence[Variant], assignments: Mapping[str, np.ndarray], *,
               cfg: Config, vocab_size: int, labels: np.ndarray) -> dict[str, float]:
  """Seconds of ``value_and_grad`` of each head's mean loss, plus ``"naive dense"``.

  Differentiated w.r.t. the hidden states and the head's parameters; the assignment is an
  argument (as in the model: not a compile-time constant).
  """
  import jax
  import jax.numpy as jnp
  import logitlab
  from flax import nnx

  n, width = labels.shape[0], cfg.width
  device = jax.local_devices()[0]
  hidden = jax.device_put(jax.random.normal(jax.random.key(cfg.seed + 1), (n, width)), device)
  labels = jax.device_put(jnp.asarray(labels, jnp.int32), device)
  options = dict(z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)

  def timed(head, loss):
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)
    params, rest = jax.device_put((params, rest), device)
    step = jax.jit(jax.value_and_grad(
        lambda h, p, r, y: loss(nnx.merge(graphdef, p, r), h, y), argnums=(0, 1)))
    return lambda: step(hidden, params, rest, labels)

  fns = {}
  for v in variants:
    head = make_head(v, width, vocab_size, assignments.get(v.name), cfg.seed)
    fns[v.name] = timed(head, lambda m, h, y: m.loss(h, y, **options).mean())
  naive = make_head(parse_variant("dense"), width, vocab_size, None, cfg.seed)
  fns["naive dense"] = timed(naive, lambda m, h, y: logitlab.cross_entropy(
      m(h), y, **options).mean())
  return interleaved_median_seconds(fns, cfg.bench_repeats)


def _to_host(x, mesh) -> np.ndarray:
  """A (possibly sharded, multi-host) array as a host numpy array."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  if not x.is_fully_addressable:
    x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(x)
  return np.asarray(x)


# ------------------------------------------------------------------------------------------------
# The table


def _fmt(value: float | None, spec: str) -> str:
  return "-" if value is None or not math.isfinite(value) else format(value, spec)


def build_rows(records: Sequence[dict]) -> list[list[str]]:
  """Table rows (strings, ``HEADERS`` order) from the per-variant records of :func:`main`."""
  rows = []
  for r in records:
    rows.append([
        r["variant"], r["head"], "-" if r["num_codes"] is None else str(r["num_codes"]),
        r["token_bias"] or "no", r["assignment"] or "-", str(r["head_params"]),
        _fmt(r["fewer_params_pct"], ".2f"), _fmt(r["head_ms"], ".3f"),
        _fmt(r["speedup_vs_dense"], ".2f"), _fmt(r["speedup_vs_naive"], ".2f"),
        _fmt(r["val_loss"], ".4f"), _fmt(r["val_ppl"], ".3f"), _fmt(r["ppl_change_pct"], "+.2f"),
        _fmt(r["train_s"], ".1f")])
  return rows


def _write_plots(out_dir: pathlib.Path, results: Mapping[str, harness.TrainResult]) -> None:
  val = {name: ([row["step"] for row in res.eval_rows], [row["loss"] for row in res.eval_rows])
         for name, res in results.items()}
  common.plot_curves(out_dir / "val_loss.png", val, xlabel="update", ylabel="validation loss",
                     title="validation loss by output layer", markers=True)
  train = {name: ([row["step"] for row in res.train_rows], [row["loss"] for row in res.train_rows])
           for name, res in results.items()}
  common.plot_curves(out_dir / "train_loss.png", train, xlabel="update", ylabel="training loss",
                     title="training loss by output layer")


# ------------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
  cfg = harness.parse_config(Config, PRESETS, argv, default_preset="tiny", description=__doc__)
  import jax

  lead = jax.process_index() == 0

  def say(text: str) -> None:
    if lead:
      print(text, flush=True)

  variants = cfg.parsed_variants
  out_dir = pathlib.Path(cfg.out_dir)
  clock = time.perf_counter()
  dataset = load_data(cfg)
  vocab_size = dataset.vocab_size
  data_seconds = time.perf_counter() - clock
  info = dict(getattr(dataset, "info", {}))
  trained = info.get("tokenizer_train_seconds")
  say(f"data: {cfg.corpus}, BPE vocab {vocab_size} "
      + (f"(trained in {trained:.1f} s)" if trained is not None else "(from the cache)")
      + (f", {dataset.num_tokens:,} train / {dataset.num_val_tokens:,} val tokens"
         if isinstance(dataset, data_lib.TokenData) else "")
      + f"; ready in {data_seconds:.1f} s")
  for v in variants:
    if v.head == "vq" and v.num_codes > vocab_size:
      raise ValueError(f"variant {v.name}: K={v.num_codes} exceeds the tokenizer's vocabulary "
                       f"({vocab_size}).")

  val = validation_batches(dataset, cfg)
  val_tokens = int(sum(mask[:, 1:].sum() for _, mask in val))
  say(f"validation: {len(val)} batches, {val_tokens:,} target tokens, the same for every variant")
  mesh = harness.setup(cfg)

  def batch_fn(step):
    return dataset.batch(step, cfg.batch_size, cfg.seq_len)

  # Dense first (k-means needs the trained plain dense head), then the VQ heads in order.
  order = [v for v in variants if v.head == "dense"] + [v for v in variants if v.head == "vq"]
  results: dict[str, harness.TrainResult] = {}
  seconds: dict[str, float] = {}
  assignments: dict[str, np.ndarray] = {}
  kmeans_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  dense_weight = None
  prior = unigram_log_prior(dataset, cfg, vocab_size)
  # The context-free reference: the unigram model's loss on the validation targets.
  unigram_loss = float(sum(-prior[t[:, 1:]][m[:, 1:]].sum() for t, m in val) / max(val_tokens, 1))
  bias = prior if cfg.bias_init == "unigram" else None
  for i, v in enumerate(order):
    config = dataclasses.replace(lm_config(cfg, v, vocab_size), eval_batches=len(val))
    codebook = None
    if v.head == "vq":
      if v.assignment == "kmeans":
        if v.num_codes not in kmeans_cache:
          start = time.perf_counter()
          kmeans_cache[v.num_codes] = make_assignment(v, vocab_size, dense_weight=dense_weight,
                                                      cfg=cfg)
          used = len(np.unique(kmeans_cache[v.num_codes][0]))
          say(f"k-means of the dense head.weight {list(dense_weight.shape)} into K={v.num_codes}: "
              f"{time.perf_counter() - start:.1f} s, {used} codes used")
        assignments[v.name], codebook = kmeans_cache[v.num_codes]
      else:
        assignments[v.name], codebook = make_assignment(v, vocab_size, dense_weight=None, cfg=cfg)
    say(f"[{i + 1}/{len(order)}] {v.name}: training {cfg.steps} updates of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens")
    start = time.perf_counter()
    results[v.name] = harness.train(
        config, batch_fn, eval_batch_fn=lambda j: val[j], mesh=mesh, title=v.name,
        model_fn=model_fn(config, assignment=assignments.get(v.name), codebook=codebook,
                          bias=bias if v.token_bias else None))
    seconds[v.name] = time.perf_counter() - start
    if v.name == "dense":
      dense_weight = _to_host(results[v.name].state["params"]["head"]["weight"], mesh)

  # Head timing: one fixed batch of real next-token labels (a step past training).
  n = cfg.bench_tokens or cfg.batch_size * cfg.seq_len
  rows_needed = -(-n // cfg.seq_len)
  labels = np.asarray(dataset.batch(cfg.steps, rows_needed, cfg.seq_len))[:, 1:].reshape(-1)[:n]
  say(f"timing value_and_grad of each head's loss at N={n}, D={cfg.width}, V={vocab_size} "
      f"(median of {cfg.bench_repeats}, round-robin)")
  times = head_times(variants, assignments, cfg=cfg, vocab_size=vocab_size, labels=labels)

  names = [v.name for v in variants]
  reference = "dense" if "dense" in names else next(v.name for v in variants if v.head == "dense")
  ref_result = results[reference]
  ref_params = ref_result.trainer.num_head_params
  ref_loss = ref_result.eval_rows[-1]["loss"] if ref_result.eval_rows else float("nan")
  records = []
  for v in variants:
    res = results[v.name]
    loss = res.eval_rows[-1]["loss"] if res.eval_rows else float("nan")
    params = res.trainer.num_head_params
    assignment = assignments.get(v.name)
    sizes = None if assignment is None else np.bincount(assignment, minlength=v.num_codes)
    records.append({
        "variant": v.name, "head": v.head, "num_codes": v.num_codes,
        "token_bias": cfg.bias_init if v.token_bias else None,
        "assignment": v.assignment, "head_params": params, "params": res.trainer.num_params,
        "fewer_params_pct": 100.0 * (1.0 - params / ref_params),
        "head_ms": 1e3 * times[v.name],
        "speedup_vs_dense": times[reference] / times[v.name],
        "speedup_vs_naive": times["naive dense"] / times[v.name],
        "val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)),
        "ppl_change_pct": 100.0 * (math.exp(min(loss, 80.0) - min(ref_loss, 80.0)) - 1.0),
        "train_s": seconds[v.name],
        "final_train_loss": res.final_loss,
        "codes_used": None if sizes is None else int((sizes > 0).sum()),
        "largest_bucket": None if sizes is None else int(sizes.max()),
        "eval_curve": [[row["step"], row["loss"]] for row in res.eval_rows]})
  rows = build_rows(records)
  naive_ms = 1e3 * times["naive dense"]

  if lead:
    title = (f"{cfg.corpus} BPE V={vocab_size}, D={cfg.width}, depth {cfg.depth}, {cfg.steps} x "
             f"{cfg.batch_size} x {cfg.seq_len} tokens; head time at N={n}")
    print(f"\nDense vs VQ-Logits heads: {title}")
    print(f"head time: value_and_grad (ms), median of {cfg.bench_repeats}; naive dense "
          f"(materialized logits) {naive_ms:.3f} ms; jax {jax.__version__} on "
          f"{jax.devices()[0].platform} x {jax.device_count()}")
    print(f"context-free reference: the training unigram's validation loss {unigram_loss:.4f} "
          f"(perplexity {math.exp(unigram_loss):.3f})")
    print(common.table(HEADERS, rows))
    print(PAPER)
    written = common.write_table(out_dir / "results", HEADERS, rows, png=True, title=title)
    _write_plots(out_dir, {v.name: results[v.name] for v in variants})
    args = list(sys.argv[1:] if argv is None else argv)
    meta = {  # the keys of the benchmarks' meta.json (experiments.linear_ce_bench)
        "command": " ".join(["python -m experiments.vq_logits_lm", *args]),
        "jax": jax.__version__, "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    summary = {
        **meta, "config": harness.config_dict(cfg), "vocab_size": vocab_size,
        "val_batches": len(val), "val_tokens": val_tokens, "bench_tokens": n,
        "naive_dense_ms": naive_ms, "unigram_val_loss": unigram_loss, "reference": reference,
        "data": info, "data_seconds": data_seconds, "wall_s": time.perf_counter() - clock,
        "variants": records}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    np.savez(out_dir / "assignments.npz",
             **{v.dirname: assignments[v.name] for v in variants if v.name in assignments})
    print("wrote " + ", ".join(str(p) for p in [*written, out_dir / "val_loss.png",
                                                 out_dir / "results.json", out_dir / "meta.json"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
