"""Classification knowledge distillation: one CE teacher, one student per method, one table.

  python -m experiments.kd_classification [--preset tiny|small|pod] [--key=value ...]

Steps (everything in ``--out_dir``):

1. The teacher (wide MLP, or a wider ResNet-ish CNN) is trained with plain CE, or restored
   from ``{out_dir}/teacher/checkpoints`` (an interrupted teacher resumes there; a teacher
   trained under other data/architecture/optimizer settings is an error, not a silent reuse).
2. One student per ``--methods`` entry, all from the same initialization (``seed + 1``; the
   extra heads of DHKD / USKD are created after the shared parameters, so those start equal
   too), trained for ``--steps`` updates on the same batches (``data.batch(step, B)``, plus the
   same on-device augmentation for images) with the same optimizer, the teacher's logits
   computed once per batch and shared.
3. ``results.md`` / ``results.csv`` / ``results.png`` (method, recipe, deviations from the
   official setting, val top-1, val NLL, deltas against the CE student), ``val_accuracy.png``
   (the students' validation accuracy curves), ``train.jsonl`` / ``eval.jsonl`` (per method),
   ``config.json``, ``summary.json``; the table is printed too.

Methods and their official loss weights (fields of the config; the table's "setting"
column names every field that differs from these):

  ce     CE only (the baseline)
  kd     0.1 CE + 0.9 KD, T=4                     mdistiller CIFAR-100 KD
  lskd   0.1 CE + 9 KD(Z(s), Z(t)), T=2           logit-standardization-KD README (--logit-stand)
  dkd    1 CE + min(epoch/20, 1) (1 TCKD + 8 NCKD), T=4    mdistiller CIFAR-100 DKD
  nkd    1 CE + NKD(gamma=1.5, T=1)               yzd-v/cls_KD NKDLoss
  uskd   1 CE + USKD(alpha=1, beta=0.1, mu=0.005), teacher-free, weak head on a mid feature
                                                   yzd-v/cls_KD ImageNet configs (no CIFAR one)
  dhkd   1 CE (head 0) + 1 BinaryKLNorm (head 1, nonlinear 200-unit head), T=2, gradient
         projection on                             penghui-yang/DHKD CIFAR README (-r 1 -a 1 --ga
                                                   --nonlinear; its BatchNorm/dropout left out)
  pld    PLD(tau=1) replacing CE                   no official code; tau unverified
  dist   1 CE + 1 DIST(beta=1, gamma=1, T=1)       hunto image_classification_sota DIST defaults
                                                   (the paper's CIFAR settings not checked)

Differences from the official training, for every method alike: AdamW with linear warm-up
and cosine decay (``harness.make_optimizer``) instead of SGD with step decay, and far fewer
epochs on the CPU presets. DKD's warm-up is counted in epochs of this data set
(``--dkd_warmup_epochs``, official 20 of 240 epochs); the CPU presets scale it to the same
fraction of their run and the table says so. The synthetic data (``data.synthetic_classification``,
Gaussian classes with a superclass structure) is an offline stand-in for CIFAR-100, and the
relative ranking of methods on it need not carry over to images.

Scale: a data-parallel mesh (``harness.make_mesh``; the ``"vocab"`` axis is unused, so
``--vocab_parallel`` must stay 1), batches sharded on their batch axis over ``"data"``,
parameters and optimizer states replicated; ``--distributed`` for multi-host pods. Updates run
in ``jax.lax.scan`` chunks of ``--scan_steps`` (one compilation per method and chunk length).
Unused TrainConfig fields here: ``seq_len``, ``eval_batches`` (the whole validation split is
evaluated, or ``--val_examples``), ``log_every``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import logitlab
from experiments import common, data as data_lib, harness
from logitlab import distill
from logitlab.nn import DenseLogitsHead

METHODS = ("ce", "kd", "lskd", "dkd", "nkd", "uskd", "dhkd", "pld", "dist")


def _f(default, help_text):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Config(harness.TrainConfig):
  """A teacher and one student per method (TrainConfig fields apply to every run)."""
  # TrainConfig fields with other defaults or meanings here.
  steps: int = _f(3000, "optimizer updates of every student (and of the teacher, unless "
                        "--teacher_steps)")
  batch_size: int = _f(256, "global batch (examples)")
  learning_rate: float = _f(2e-3, "peak learning rate (AdamW)")
  warmup_steps: int = _f(150, "linear warmup updates")
  weight_decay: float = _f(0.05, "AdamW decay of matrices (ndim >= 2)")
  adam_b2: float = 0.999
  eval_every: int = _f(150, "updates between validation evals of every model (0: only at the end)")
  checkpoint_every: int = _f(500, "teacher updates between teacher checkpoints (the trained "
                                  "teacher is always saved); 0: only at the end")
  out_dir: str = _f("runs/kd_classification", "output directory")
  plots: bool = _f(True, "write results.png and val_accuracy.png")
  # Data.
  dataset: Literal["synthetic", "cifar100"] = _f(
      "synthetic", "synthetic (offline, data.synthetic_classification) | cifar100 (tfds, "
                   "prepared array_record copy)")
  num_classes: int = _f(100, "synthetic: classes")
  input_dim: int = _f(64, "synthetic: input dimension")
  n_train: int = _f(200_000, "synthetic: training examples")
  n_val: int = _f(5_000, "synthetic: validation examples")
  separation: float = _f(5.0, "synthetic: class-mean separation (difficulty)")
  hierarchy: float = _f(0.5, "synthetic: superclass share of the class means (dark knowledge)")
  data_dir: str | None = _f(None, "cifar100: tfds data_dir")
  max_examples: int | None = _f(None, "cifar100: load only the first examples of each split")
  val_examples: int | None = _f(None, "evaluate on the first N validation examples (None: all)")
  augment: bool = _f(True, "images only: random 4-pixel-padded crop + horizontal flip "
                           "(on device, keyed by seed and step; the same for every student)")
  # Models.
  model: Literal["mlp", "resnet"] = _f("mlp", "mlp (inputs flattened) | resnet (images)")
  teacher_width: int = _f(512, "teacher: MLP width / ResNet base channels")
  teacher_depth: int = _f(2, "teacher: MLP hidden layers / residual blocks per stage")
  student_width: int = _f(64, "student: MLP width / ResNet base channels")
  student_depth: int = _f(2, "student: MLP hidden layers / residual blocks per stage")
  teacher_steps: int | None = _f(None, "teacher updates (None: --steps)")
  scan_steps: int = _f(150, "updates per compiled lax.scan chunk (train-loss logging granularity)")
  methods: tuple[str, ...] = _f(METHODS, "students to train, from " + ",".join(METHODS))
  # KD (mdistiller CIFAR-100).
  kd_ce_weight: float = _f(0.1, "KD: CE weight (official CIFAR 0.1)")
  kd_weight: float = _f(0.9, "KD: KD weight (official CIFAR 0.9)")
  kd_temperature: float = _f(4.0, "KD: T (official CIFAR 4)")
  # LS-KD (logit standardization).
  lskd_ce_weight: float = _f(0.1, "LS-KD: CE weight (official 0.1)")
  lskd_weight: float = _f(9.0, "LS-KD: KD weight (official --kd-weight 9)")
  lskd_temperature: float = _f(2.0, "LS-KD: T (official --base-temp 2)")
  # DKD (mdistiller CIFAR-100).
  dkd_ce_weight: float = _f(1.0, "DKD: CE weight (official 1)")
  dkd_alpha: float = _f(1.0, "DKD: TCKD weight alpha (official 1)")
  dkd_beta: float = _f(8.0, "DKD: NCKD weight beta (official CIFAR 8)")
  dkd_temperature: float = _f(4.0, "DKD: T (official 4)")
  dkd_warmup_epochs: float = _f(20.0, "DKD: linear warm-up, in epochs of this data set "
                                      "(official 20 of 240)")
  # NKD.
  nkd_ce_weight: float = _f(1.0, "NKD: CE weight (official 1)")
  nkd_gamma: float = _f(1.5, "NKD: non-target weight gamma (official 1.5)")
  nkd_temperature: float = _f(1.0, "NKD: non-target temperature lambda (official 1)")
  # USKD (teacher-free).
  uskd_ce_weight: float = _f(1.0, "USKD: CE weight (official 1)")
  uskd_alpha: float = _f(1.0, "USKD: target weight alpha (official ImageNet 1)")
  uskd_beta: float = _f(0.1, "USKD: non-target weight beta (official ImageNet 0.1)")
  uskd_mu: float = _f(0.005, "USKD: weak-head CE weight mu (official ImageNet 0.005)")
  uskd_rank_quirk: bool = _f(True, "USKD: rank with log_softmax as the official code does")
  # DHKD.
  dhkd_ce_weight: float = _f(1.0, "DHKD: CE weight on head 0, -r (official CIFAR 1)")
  dhkd_weight: float = _f(1.0, "DHKD: BinaryKLNorm weight on head 1, -a (official CIFAR 1)")
  dhkd_temperature: float = _f(2.0, "DHKD: T (official 2)")
  dhkd_projection: bool = _f(True, "DHKD: project conflicting KD gradients (official --ga)")
  dhkd_aux_width: int = _f(200, "DHKD: hidden units of the nonlinear head 1 (official "
                                "--nonlinear: 200; 0: a linear head)")
  # PLD.
  pld_tau: float = _f(1.0, "PLD: teacher softmax temperature (default 1, unverified)")
  # DIST.
  dist_ce_weight: float = _f(1.0, "DIST: CE weight (official default 1)")
  dist_weight: float = _f(1.0, "DIST: DIST weight (official default 1)")
  dist_beta: float = _f(1.0, "DIST: inter-class weight (official 1)")
  dist_gamma: float = _f(1.0, "DIST: intra-class weight (official 1)")
  dist_temperature: float = _f(1.0, "DIST: T (official 1)")

  def __post_init__(self):
    super().__post_init__()
    if self.steps < 1:
      raise ValueError(f"`steps` must be >= 1, got {self.steps}.")
    if self.scan_steps < 1:
      raise ValueError(f"`scan_steps` must be >= 1, got {self.scan_steps}.")
    if self.teacher_steps is not None and self.teacher_steps < 1:
      raise ValueError(f"`teacher_steps` must be >= 1, got {self.teacher_steps}.")
    if self.vocab_parallel != 1:
      raise ValueError("`vocab_parallel` must be 1: classification has no vocabulary axis.")
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
      raise ValueError(f"`methods` must be distinct names from {list(METHODS)}, got "
                       f"{list(self.methods)}.")
    for name in ("teacher_width", "teacher_depth", "student_width", "student_depth",
                 "num_classes", "input_dim", "n_train", "n_val"):
      if getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
    if self.dhkd_aux_width < 0:
      raise ValueError(f"`dhkd_aux_width` must be >= 0, got {self.dhkd_aux_width}.")


# The official settings, for the table's "setting" column (fields not listed have none).
OFFICIAL = {f.name: f.default for f in dataclasses.fields(Config)
            if f.name.split("_")[0] in METHODS and f.name != "methods"}

# The CPU presets scale DKD's warm-up to the official fraction of the run (20 of 240 epochs).
_TINY = dict(steps=3000, batch_size=256, n_train=200_000, n_val=5_000, separation=5.0,
             eval_every=150, scan_steps=150, warmup_steps=150, teacher_width=512,
             teacher_depth=2, student_width=64, student_depth=2, checkpoint_every=0)
_SMALL = dict(steps=12_000, batch_size=256, n_train=500_000, n_val=10_000, separation=5.0,
              eval_every=500, scan_steps=250, warmup_steps=500, teacher_width=1024,
              teacher_depth=3, student_width=128, student_depth=2, checkpoint_every=2000)


def _scaled_warmup(preset: dict) -> float:
  epochs = preset["steps"] * preset["batch_size"] / preset["n_train"]
  return round(epochs * 20 / 240, 3)


PRESETS = {
    # Offline, about 2 minutes on 2 (shared) CPU cores.
    "tiny": {**_TINY, "dkd_warmup_epochs": _scaled_warmup(_TINY),
             "out_dir": "runs/kd_classification_tiny"},
    "small": {**_SMALL, "dkd_warmup_epochs": _scaled_warmup(_SMALL),
              "out_dir": "runs/kd_classification_small"},
    # CIFAR-100 (prepared tfds copy), ~240 epochs of 50k images at batch 512, data-parallel.
    "pod": dict(dataset="cifar100", model="resnet", steps=23_500, batch_size=512,
                learning_rate=2e-3, warmup_steps=500, eval_every=500, scan_steps=50,
                teacher_width=64, teacher_depth=3, student_width=32, student_depth=1,
                checkpoint_every=2000, dkd_warmup_epochs=20.0,
                out_dir="runs/kd_classification_pod"),
}


# ================================================================================================
# Models
# ================================================================================================

class MLPClassifier(nnx.Module):
  """``depth`` GELU layers of ``width`` on the flattened input, then a dense head.

  Outputs a dict: ``logits`` (head 0, used for inference), ``aux_logits`` (DHKD's head 1
  on the last feature, when ``aux_width`` is not None: a hidden layer of ``aux_width``
  units, or linear for 0) and ``weak_logits`` (USKD's weak head on the feature after
  layer ``max(1, depth // 2)``, when ``weak_head``). Extra heads are created after the
  shared parameters, so the shared parameters do not depend on them for a given seed.
  """

  def __init__(self, in_dim: int, num_classes: int, *, width: int, depth: int,
               aux_width: int | None = None, weak_head: bool = False, rngs: nnx.Rngs):
    dims = (in_dim,) + (width,) * depth
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.head = DenseLogitsHead(width, num_classes, use_bias=True, rngs=rngs)
    self.mid = max(1, depth // 2)
    self.aux = _aux_head(width, num_classes, aux_width, rngs)
    self.weak = DenseLogitsHead(width, num_classes, use_bias=True, rngs=rngs) if weak_head else None

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    h = x.reshape(x.shape[0], -1)
    mid = None
    for i, layer in enumerate(self.layers):
      h = jax.nn.gelu(layer(h))
      if i + 1 == self.mid:
        mid = h
    return _outputs(self, h, mid)


class _AuxHead(nnx.Module):
  def __init__(self, features: int, hidden: int, num_classes: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(features, hidden, rngs=rngs) if hidden else None
    self.out = DenseLogitsHead(hidden or features, num_classes, use_bias=True, rngs=rngs)

  def __call__(self, h):
    return self.out(jax.nn.relu(self.hidden(h)) if self.hidden is not None else h)


def _aux_head(features, num_classes, aux_width, rngs):
  return None if aux_width is None else _AuxHead(features, aux_width, num_classes, rngs)


def _outputs(model, final, mid) -> dict[str, jax.Array]:
  out = {"logits": model.head(final)}
  if model.aux is not None:
    out["aux_logits"] = model.aux(final)
  if model.weak is not None:
    out["weak_logits"] = model.weak(mid)
  return out


def _conv_init(key, shape, dtype=jnp.float32):
  """LeCun-normal conv kernels drawn as a ``[prod(shape[:-1]), out]`` matrix, then reshaped.

  The same distribution as ``nnx.Conv``'s default (fan-in is ``prod(shape[:-1])`` either way);
  drawing a 2-D array compiles several times faster on XLA:CPU than a 4-D one.
  """
  return _LECUN(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


_LECUN = nnx.initializers.lecun_normal()


def _conv(cin, cout, kernel, stride, rngs):
  return nnx.Conv(cin, cout, kernel, strides=stride, use_bias=False, kernel_init=_conv_init,
                  rngs=rngs)


class ResBlock(nnx.Module):
  """``relu(x' + GN(conv(relu(GN(conv(x))))))``; ``x'``: a strided 1x1 conv if the shape changes."""

  def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, cout, (3, 3), stride, rngs)
    self.norm1 = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs)
    self.conv2 = _conv(cout, cout, (3, 3), 1, rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs)
    self.skip = _conv(cin, cout, (1, 1), stride, rngs) if stride != 1 or cin != cout else None

  def __call__(self, x):
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return jax.nn.relu(y + (x if self.skip is None else self.skip(x)))


class ResNetClassifier(nnx.Module):
  """A CIFAR-style ResNet: 3x3 stem, three stages of ``depth`` blocks (``w, 2w, 4w`` channels,
  strides 1, 2, 2), global average pooling, dense head. GroupNorm instead of BatchNorm, so
  training and evaluation are the same function of the parameters. USKD's weak head reads the
  pooled output of stage 2; outputs as :class:`MLPClassifier`.
  """

  def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int,
               aux_width: int | None = None, weak_head: bool = False, rngs: nnx.Rngs):
    self.stem = _conv(in_channels, width, (3, 3), 1, rngs)
    self.stem_norm = nnx.GroupNorm(width, num_groups=min(8, width), rngs=rngs)
    blocks, cin = [], width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
      for b in range(depth):
        blocks.append(ResBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1, rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.mid_block = 2 * depth  # blocks of stages 1 and 2
    self.head = DenseLogitsHead(4 * width, num_classes, use_bias=True, rngs=rngs)
    self.aux = _aux_head(4 * width, num_classes, aux_width, rngs)
    self.weak = (DenseLogitsHead(2 * width, num_classes, use_bias=True, rngs=rngs)
                 if weak_head else None)

  def __call__(self, x):
    h = jax.nn.relu(self.stem_norm(self.stem(x)))
    mid = None
    for i, block in enumerate(self.blocks):
      h = block(h)
      if i + 1 == self.mid_block:
        mid = h.mean(axis=(1, 2))
    return _outputs(self, h.mean(axis=(1, 2)), mid)


def make_model(cfg: Config, input_shape: tuple[int, ...], num_classes: int, *, role: str,
               method: str = "ce", seed: int) -> nnx.Module:
  """The teacher (``role="teacher"``) or the student of ``method``."""
  width = cfg.teacher_width if role == "teacher" else cfg.student_width
  depth = cfg.teacher_depth if role == "teacher" else cfg.student_depth
  extras = dict(aux_width=cfg.dhkd_aux_width if method == "dhkd" else None,
                weak_head=method == "uskd")
  rngs = nnx.Rngs(seed)
  if cfg.model == "mlp":
    return MLPClassifier(math.prod(input_shape), num_classes, width=width, depth=depth,
                         rngs=rngs, **extras)
  if len(input_shape) != 3:
    raise ValueError(f"--model=resnet needs image inputs [H, W, C], got shape {input_shape}.")
  return ResNetClassifier(input_shape[-1], num_classes, width=width, depth=depth, rngs=rngs,
                          **extras)


# ================================================================================================
# The methods' student losses
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class Method:
  """A student objective.

  ``loss(outputs, labels, teacher_logits, *, epoch) -> {term: weighted scalar}``: the
  training loss is the sum of the terms; ``outputs`` is the model's dict, ``epoch`` the
  1-indexed epoch (DKD's warm-up). ``split``: the (CE term, KD term) whose gradients DHKD's
  projection combines (None: plain sum).
  """
  name: str
  recipe: str
  uses_teacher: bool
  loss: Callable[..., dict[str, jax.Array]]
  split: tuple[str, str] | None = None


def _ce(logits, labels):
  return logitlab.cross_entropy(logits, labels).mean()


def method(name: str, cfg: Config) -> Method:
  """The objective of ``name`` with ``cfg``'s loss weights (see the module docstring)."""
  c = cfg
  if name == "ce":
    def loss(out, y, t, *, epoch):
      return {"ce": _ce(out["logits"], y)}
    return Method(name, "CE", False, loss)
  if name == "kd":
    def loss(out, y, t, *, epoch):
      s = out["logits"]
      return {"ce": c.kd_ce_weight * _ce(s, y),
              "kd": c.kd_weight * distill.kd(s, t, temperature=c.kd_temperature).mean()}
    return Method(name, f"{c.kd_ce_weight:g} CE + {c.kd_weight:g} KD(T={c.kd_temperature:g})",
                  True, loss)
  if name == "lskd":
    def loss(out, y, t, *, epoch):
      s = out["logits"]
      kd = distill.kd(distill.standardize_logits(s), distill.standardize_logits(t),
                      temperature=c.lskd_temperature)
      return {"ce": c.lskd_ce_weight * _ce(s, y), "kd": c.lskd_weight * kd.mean()}
    return Method(name, f"{c.lskd_ce_weight:g} CE + {c.lskd_weight:g} KD(Z(s), Z(t), "
                        f"T={c.lskd_temperature:g})", True, loss)
  if name == "dkd":
    def loss(out, y, t, *, epoch):
      s = out["logits"]
      factor = distill.dkd_warmup(epoch, c.dkd_warmup_epochs)
      dkd = distill.dkd(s, t, y, alpha=c.dkd_alpha, beta=c.dkd_beta,
                        temperature=c.dkd_temperature, warmup_factor=factor)
      return {"ce": c.dkd_ce_weight * _ce(s, y), "dkd": dkd.mean()}
    return Method(name, f"{c.dkd_ce_weight:g} CE + warmup({c.dkd_warmup_epochs:g} ep) "
                        f"({c.dkd_alpha:g} TCKD + {c.dkd_beta:g} NCKD), T={c.dkd_temperature:g}",
                  True, loss)
  if name == "nkd":
    def loss(out, y, t, *, epoch):
      s = out["logits"]
      nkd = distill.nkd(s, t, y, temperature=c.nkd_temperature, gamma=c.nkd_gamma)
      return {"ce": c.nkd_ce_weight * _ce(s, y), "nkd": nkd.mean()}
    return Method(name, f"{c.nkd_ce_weight:g} CE + NKD(gamma={c.nkd_gamma:g}, "
                        f"T={c.nkd_temperature:g})", True, loss)
  if name == "uskd":
    def loss(out, y, t, *, epoch):
      s = out["logits"]
      uskd = distill.uskd(s, y, weak_logits=out["weak_logits"], alpha=c.uskd_alpha,
                          beta=c.uskd_beta, mu=c.uskd_mu,
                          official_rank_quirk=c.uskd_rank_quirk)
      return {"ce": c.uskd_ce_weight * _ce(s, y), "uskd": uskd.mean()}
    return Method(name, f"{c.uskd_ce_weight:g} CE + USKD(alpha={c.uskd_alpha:g}, "
                        f"beta={c.uskd_beta:g}, mu={c.uskd_mu:g}), no teacher", False, loss)
  if name == "dhkd":
    def loss(out, y, t, *, epoch):
      ce, kd = distill.dhkd_losses(out["logits"], out["aux_logits"], t, y,
                                   temperature=c.dhkd_temperature)
      return {"ce": c.dhkd_ce_weight * ce.mean(), "kd": c.dhkd_weight * kd.mean()}
    head = f"{c.dhkd_aux_width}-unit" if c.dhkd_aux_width else "linear"
    return Method(name, f"{c.dhkd_ce_weight:g} CE(head 0) + {c.dhkd_weight:g} BinaryKLNorm("
                        f"{head} head 1, T={c.dhkd_temperature:g})"
                        + (", projection" if c.dhkd_projection else ""), True, loss,
                  split=("ce", "kd") if c.dhkd_projection else None)
  if name == "pld":
    def loss(out, y, t, *, epoch):
      return {"pld": distill.pld(out["logits"], t, y, tau=c.pld_tau).mean()}
    return Method(name, f"PLD(tau={c.pld_tau:g}), no CE", True, loss)
  if name == "dist":
    def loss(out, y, t, *, epoch):
      s = out["logits"]
      d = distill.dist(s, t, beta=c.dist_beta, gamma=c.dist_gamma,
                       temperature=c.dist_temperature)
      return {"ce": c.dist_ce_weight * _ce(s, y), "dist": c.dist_weight * d}
    return Method(name, f"{c.dist_ce_weight:g} CE + {c.dist_weight:g} DIST(beta={c.dist_beta:g}, "
                        f"gamma={c.dist_gamma:g}, T={c.dist_temperature:g})", True, loss)
  raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}.")


def deviations(name: str, cfg: Config) -> str:
  """The fields of method ``name`` that differ from the official setting ("official" if none)."""
  prefix = name + "_"
  diffs = [f"{k}={getattr(cfg, k)!r} (official {v!r})" for k, v in OFFICIAL.items()
           if k.startswith(prefix) and getattr(cfg, k) != v]
  return "; ".join(diffs) if diffs else ("baseline" if name == "ce" else "official")


# ================================================================================================
# Compiled pieces
# ================================================================================================

def _forward(graphdef, params, x):
  return nnx.merge(graphdef, params)(x)


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


@dataclasses.dataclass
class Run:
  """One model being trained: its compiled chunk, eval and state."""
  name: str
  graphdef: Any
  state: Any
  chunk: Callable
  evaluate: Callable
  uses_teacher: bool
  curve: list = dataclasses.field(default_factory=list)  # (step, acc, nll)
  seconds: float = 0.0


def _augment(xs, base_key, start):
  """Random 4-pixel-padded crops and horizontal flips of ``xs[K, B, H, W, C]``, keyed per step."""
  k, b, h, w, ch = xs.shape
  keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(start + jnp.arange(k))

  def one_step(x, key):
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 9)
    crops = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, ch)))(
        padded, offsets)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1, :], crops)

  return jax.vmap(one_step)(xs, keys)


class Compiled:
  """Shardings and the jitted functions of one run of this experiment."""

  def __init__(self, cfg: Config, mesh, *, batch_size: int, num_train: int, images: bool):
    self.cfg, self.mesh = cfg, mesh
    self.batch_size, self.num_train = batch_size, num_train
    self.replicated = NamedSharding(mesh, P())
    self.chunk_sharding = NamedSharding(mesh, P(None, "data"))  # [K, B, ...]
    self.augment = cfg.augment and images
    self.aug_key = jax.random.key(cfg.seed + 7919)

  def init(self, model_fns, optimizers):
    """``[(graphdef, state, abstract state)]``: replicated train states, built by ONE jit."""
    graphdefs = [_split(nnx.eval_shape(fn))[0] for fn in model_fns]

    def init():
      states = []
      for fn, optimizer in zip(model_fns, optimizers):
        _, params = _split(fn())
        states.append({"step": jnp.zeros((), jnp.int32), "params": params,
                       "opt_state": optimizer.init(params)})
      return states

    abstract = jax.eval_shape(init)
    states = jax.jit(init, out_shardings=jax.tree.map(lambda _: self.replicated, abstract))()
    return list(zip(graphdefs, states, abstract))

  def abstract_with_sharding(self, abstract):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                        abstract)

  def train_chunk(self, spec: Method, graphdef, optimizer) -> Callable:
    """``(state, xs[K,B,..], ys[K,B](, ts[K,B,C])) -> (state, losses[K])``: K updates in a scan."""
    batch_size, num_train = self.batch_size, self.num_train

    def step(carry, batch):
      params, opt_state, count = carry
      x, y = batch[0], batch[1]
      t = batch[2] if len(batch) > 2 else None
      epoch = count * batch_size // num_train + 1

      def terms(p):
        return spec.loss(_forward(graphdef, p, x), y, t, epoch=epoch)

      if spec.split is not None:
        first, second = spec.split
        def pair_fn(p):
          values = terms(p)
          return jnp.stack([values[first], values[second]])
        pair, vjp = jax.vjp(pair_fn, params)
        (ce_grads,) = vjp(jnp.array([1.0, 0.0], pair.dtype))
        (kd_grads,) = vjp(jnp.array([0.0, 1.0], pair.dtype))
        updates, opt_state = optimizer.update(kd_grads, opt_state, params, ce_updates=ce_grads)
        loss = pair.sum()
      else:
        loss, grads = jax.value_and_grad(lambda p: sum(terms(p).values()))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state, count + 1), loss.astype(jnp.float32)

    def chunk(state, *batches):
      carry = (state["params"], state["opt_state"], state["step"])
      (params, opt_state, count), losses = jax.lax.scan(step, carry, batches)
      return {"step": count, "params": params, "opt_state": opt_state}, losses

    return jax.jit(chunk, out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  def prepare(self, teacher_graphdef=None) -> Callable:
    """Augmentation (images) and, with a teacher, its logits, for a chunk of batches.

    Without a teacher: ``(xs, start) -> xs``; with one:
    ``(teacher_params, xs, start) -> (xs, logits[K, B, C])``. ``start``: the chunk's first step.
    """
    def augment(xs, start):
      return _augment(xs, self.aug_key, start) if self.augment else xs

    if teacher_graphdef is None:
      return jax.jit(augment, out_shardings=self.chunk_sharding)

    def with_teacher(teacher_params, xs, start):
      xs = augment(xs, start)
      logits = jax.lax.map(lambda x: _forward(teacher_graphdef, teacher_params, x)["logits"], xs)
      return xs, jax.lax.stop_gradient(logits)
    return jax.jit(with_teacher, out_shardings=(self.chunk_sharding, self.chunk_sharding))

  def evaluator(self, graphdef, keys: tuple[str, ...] | None = None) -> Callable:
    """``(params, xv[nb,B,..], yv[nb,B]) -> (correct, nll sum)`` over labels >= 0.

    ``keys``: the top-level parameter entries ``graphdef`` takes (others are dropped first).
    """
    def evaluate(params, xv, yv):
      def one(batch):
        x, y = batch
        logits = _forward(graphdef, params, x)["logits"]
        valid = y >= 0
        nll = logitlab.cross_entropy(logits, y, where=valid)
        correct = jnp.where(valid, jnp.argmax(logits, axis=-1) == y, False)
        return jnp.sum(correct.astype(jnp.float32)), jnp.sum(nll)
      correct, nll = jax.lax.map(one, (xv, yv))
      return correct.sum(), nll.sum()
    compiled = jax.jit(evaluate, out_shardings=(self.replicated, self.replicated))
    if keys is None:
      return compiled
    # Filtered outside the jit, so that every parameter structure shares one compilation.
    return lambda params, xv, yv: compiled({k: params[k] for k in keys}, xv, yv)

  def put(self, array):
    return harness.shard_batch(array, self.chunk_sharding)


# ================================================================================================
# Data
# ================================================================================================

def load_data(cfg: Config) -> data_lib.ClassificationData:
  if cfg.dataset == "synthetic":
    return data_lib.synthetic_classification(
        cfg.num_classes, cfg.input_dim, cfg.n_train, cfg.n_val, separation=cfg.separation,
        hierarchy=cfg.hierarchy, seed=cfg.seed)
  return data_lib.cifar100(data_dir=cfg.data_dir, seed=cfg.seed, max_examples=cfg.max_examples)


def chunk_bounds(steps: int, scan_steps: int, eval_every: int, start: int = 0) -> list[int]:
  """Chunk ends after ``start``: multiples of ``scan_steps`` and ``eval_every``, and ``steps``."""
  ends = {steps}
  ends.update(range(scan_steps, steps, scan_steps))
  if eval_every > 0:
    ends.update(range(eval_every, steps, eval_every))
  return sorted(e for e in ends if e > start)


def host_chunk(data, start: int, end: int, batch_size: int):
  xs, ys = zip(*(data.batch(s, batch_size) for s in range(start, end)))
  return np.stack(xs), np.stack(ys)


# ================================================================================================
# Main
# ================================================================================================

TEACHER_FIELDS = ("seed", "dataset", "num_classes", "input_dim", "n_train", "n_val", "separation",
                  "hierarchy", "data_dir", "max_examples", "augment", "model", "teacher_width",
                  "teacher_depth", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio",
                  "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip")


def _teacher_fingerprint(cfg: Config, teacher_steps: int) -> dict:
  values = harness.config_dict(cfg)
  return {**{k: values[k] for k in TEACHER_FIELDS}, "teacher_steps": teacher_steps}


def main(argv=None) -> int:
  cfg = harness.parse_config(Config, PRESETS, argv, default_preset="tiny", description=__doc__)
  clock = time.perf_counter()
  lead = jax.process_index() == 0
  out_dir = pathlib.Path(cfg.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if lead:
    (out_dir / "config.json").write_text(json.dumps(harness.config_dict(cfg), indent=2) + "\n")

  # A teacher checkpoint in out_dir must come from the same teacher settings (checked first).
  teacher_steps = cfg.teacher_steps or cfg.steps
  t_dir = out_dir / "teacher"
  fingerprint = _teacher_fingerprint(cfg, teacher_steps)
  manager = harness.checkpoint_manager(t_dir / "checkpoints", keep=cfg.keep_checkpoints)
  if manager.latest_step() is not None:
    meta = t_dir / "teacher.json"
    saved = json.loads(meta.read_text()) if meta.exists() else None
    if saved != fingerprint:
      manager.close()
      changed = sorted(k for k in fingerprint if saved is None or saved.get(k) != fingerprint[k])
      raise harness.ConfigError(
          f"the teacher checkpoint in {t_dir} was trained with other settings ({changed}); "
          "use another --out_dir or delete that directory.")

  data = load_data(cfg)
  mesh = harness.make_mesh(1)
  if cfg.batch_size % mesh.shape["data"]:
    raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {mesh.shape['data']} "
                     "devices of the data axis.")
  images = len(data.input_shape) == 3
  comp = Compiled(cfg, mesh, batch_size=cfg.batch_size, num_train=data.num_train, images=images)
  val_x, val_y = zip(*data.val_batches(cfg.batch_size))
  val_x, val_y = np.stack(val_x), np.stack(val_y)
  if cfg.val_examples is not None:
    val_y = np.where(np.arange(val_y.size).reshape(val_y.shape) < cfg.val_examples, val_y, -1)
  num_val = int((val_y >= 0).sum())
  val_x, val_y = comp.put(val_x), comp.put(val_y)
  if lead:
    print(f"devices: {mesh.size} x {jax.devices()[0].platform}, mesh {dict(mesh.shape)}; data "
          f"{cfg.dataset}: {data.num_train} train / {num_val} val, {data.num_classes} classes, "
          f"input {data.input_shape}", flush=True)

  def evaluate(run: Run) -> tuple[float, float]:
    correct, nll = jax.device_get(run.evaluate(run.state["params"], val_x, val_y))
    return float(correct) / num_val, float(nll) / num_val

  train_log = common.MetricsWriter(out_dir, "train") if lead else None
  eval_log = common.MetricsWriter(out_dir, "eval") if lead else None

  def log_eval(run: Run, step: int):
    acc, nll = evaluate(run)
    run.curve.append((step, acc, nll))
    if eval_log is not None:
      eval_log.write({"step": step, "method": run.name, "val_acc": acc, "val_nll": nll})

  def log_train(run: Run, start: int, losses):
    if train_log is not None:
      train_log.write({"step": start + len(losses), "method": run.name,
                       "loss": float(np.mean(losses))})

  students = [method(name, cfg) for name in cfg.methods]
  bar = tqdm.tqdm(total=teacher_steps + cfg.steps * len(students), unit="step",
                  dynamic_ncols=True, disable=not (cfg.progress and lead), file=sys.stderr)

  # --- the models: the teacher and every student initialized by one compiled function -----------
  t_cfg = dataclasses.replace(cfg, steps=teacher_steps)
  t_optimizer, _ = harness.make_optimizer(t_cfg)
  optimizer, _ = harness.make_optimizer(cfg)
  s_optimizers = [optax.chain(distill.dhkd_projection(), optimizer) if spec.split else optimizer
                  for spec in students]

  def model_fn(role, name="ce"):
    seed = cfg.seed if role == "teacher" else cfg.seed + 1
    return lambda: make_model(cfg, data.input_shape, data.num_classes, role=role, method=name,
                              seed=seed)

  inits = comp.init([model_fn("teacher")] + [model_fn("student", s.name) for s in students],
                    [t_optimizer] + s_optimizers)
  (t_graphdef, t_state, t_abstract), s_inits = inits[0], inits[1:]
  teacher = Run("teacher", t_graphdef, t_state,
                comp.train_chunk(method("ce", cfg), t_graphdef, t_optimizer),
                comp.evaluator(t_graphdef), uses_teacher=False)
  # Students are evaluated on head 0 alone: one compiled eval for all (extra heads dropped).
  plain_graphdef, plain_params = _split(nnx.eval_shape(model_fn("student")))
  student_eval = comp.evaluator(plain_graphdef, keys=tuple(plain_params))
  runs = [Run(spec.name, graphdef, state, comp.train_chunk(spec, graphdef, opt), student_eval,
              uses_teacher=spec.uses_teacher)
          for spec, opt, (graphdef, state, _) in zip(students, s_optimizers, s_inits)]

  # --- the teacher -----------------------------------------------------------------------------
  t_latest = manager.latest_step()
  if t_latest is not None:
    teacher.state = harness.restore_checkpoint(manager, comp.abstract_with_sharding(t_abstract),
                                               t_latest)
  t_start = int(teacher.state["step"])
  if lead:
    t_dir.mkdir(parents=True, exist_ok=True)
    (t_dir / "teacher.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    if t_start >= teacher_steps:
      print(f"teacher: loaded from {t_dir / 'checkpoints'} (step {t_start})", flush=True)
    elif t_start:
      print(f"teacher: resuming at step {t_start} of {teacher_steps} from {t_dir}", flush=True)
    else:
      print(f"teacher: training for {teacher_steps} steps", flush=True)
  bar.update(t_start)
  prepare_plain = comp.prepare(None)
  start = t_start
  t_clock = time.perf_counter()
  for end in chunk_bounds(teacher_steps, cfg.scan_steps, cfg.eval_every, t_start):
    xs, ys = host_chunk(data, start, end, cfg.batch_size)
    xs = prepare_plain(comp.put(xs), start)
    teacher.state, losses = teacher.chunk(teacher.state, xs, comp.put(ys))
    log_train(teacher, start, jax.device_get(losses))
    if end == teacher_steps or (cfg.eval_every and end % cfg.eval_every == 0):
      log_eval(teacher, end)
    if end == teacher_steps or (cfg.checkpoint_every
                                and end // cfg.checkpoint_every > start // cfg.checkpoint_every):
      harness.save_checkpoint(manager, teacher.state)
    bar.update(end - start)
    start = end
  teacher.seconds = time.perf_counter() - t_clock
  manager.close()
  t_acc, t_nll = evaluate(teacher)
  if lead:
    bar.write(f"teacher: val top-1 {t_acc:.4f}, NLL {t_nll:.4f}")

  # --- the students, in lockstep over the same batches -------------------------------------------
  prepare_teacher = comp.prepare(t_graphdef)
  any_teacher = any(r.uses_teacher for r in runs)
  start = 0
  for end in chunk_bounds(cfg.steps, cfg.scan_steps, cfg.eval_every):
    xs, ys = host_chunk(data, start, end, cfg.batch_size)
    xs, ys = comp.put(xs), comp.put(ys)
    if any_teacher:
      xs, ts = prepare_teacher(teacher.state["params"], xs, start)
    else:
      xs, ts = prepare_plain(xs, start), None
    for run in runs:
      tick = time.perf_counter()
      batches = (xs, ys, ts) if run.uses_teacher else (xs, ys)
      run.state, losses = run.chunk(run.state, *batches)
      losses = jax.device_get(losses)
      run.seconds += time.perf_counter() - tick
      if not np.all(np.isfinite(losses)) and lead:
        bar.write(f"warning: {run.name}: non-finite training loss in steps {start + 1}..{end}")
      log_train(run, start, losses)
      if end == cfg.steps or (cfg.eval_every and end % cfg.eval_every == 0):
        log_eval(run, end)
      bar.update(end - start)
    start = end
  bar.close()

  # --- the table ---------------------------------------------------------------------------------
  base = next((r.curve[-1] for r in runs if r.name == "ce"), None)
  headers = ["method", "recipe", "setting", "val top-1", "val NLL", "d top-1 vs CE",
             "d NLL vs CE"]
  rows = []

  def delta(value, ref):
    return "n/a" if ref is None else f"{value - ref:+.4f}"

  for run, spec in zip(runs, students):
    _, acc, nll = run.curve[-1]
    rows.append([run.name, spec.recipe, deviations(run.name, cfg), round(acc, 4), round(nll, 4),
                 delta(acc, base and base[1]), delta(nll, base and base[2])])
  t_recipe = (f"CE, {cfg.model} {cfg.teacher_width}x{cfg.teacher_depth}, {teacher_steps} steps")
  rows.append(["teacher", t_recipe, "reference", round(t_acc, 4), round(t_nll, 4),
               delta(t_acc, base and base[1]), delta(t_nll, base and base[2])])
  title = (f"KD on {cfg.dataset}: student {cfg.model} {cfg.student_width}x{cfg.student_depth}, "
           f"{cfg.steps} steps x {cfg.batch_size}, AdamW + cosine")
  summary = {"title": title, "headers": headers, "rows": rows, "num_val": num_val,
             "teacher_start_step": t_start, "teacher_seconds": teacher.seconds,
             "student_seconds": {r.name: r.seconds for r in runs},
             "devices": mesh.size, "wall_s": time.perf_counter() - clock}
  if lead:
    written = common.write_table(out_dir / "results", headers, rows, png=cfg.plots, title=title)
    if cfg.plots:
      curves = {r.name: ([s for s, _, _ in r.curve], [a for _, a, _ in r.curve]) for r in runs}
      written.append(common.plot_curves(out_dir / "val_accuracy.png", curves, xlabel="update",
                                        ylabel="val top-1", title=title,
                                        markers=len(runs[0].curve) < 30))
    train_log.close()
    eval_log.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(title)
    print(common.table(headers, rows))
    print("wrote " + ", ".join(str(p) for p in written) + f"; total {summary['wall_s']:.1f} s")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except harness.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
