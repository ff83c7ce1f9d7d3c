"""Distilling a transformer LM into a smaller one, fused with both output layers.

  python -m experiments.llm_distill [--preset tiny|small|pod] [--key=value ...]

1. Teacher: a :class:`experiments.model.TransformerLM` (dense head) trained with the
   harness for ``--teacher_steps`` updates on the corpus, in ``{out_dir}/teacher`` (or
   ``--teacher_dir``). A finished teacher is restored from its checkpoint there, so a
   rerun, or another student setting with the same ``--teacher_dir``, skips training it.
2. Students: one smaller TransformerLM (``--student_width``, ``--student_depth``,
   ``--student_heads``; ``D_s != D_t`` is fine) per objective, each trained by the
   harness (:func:`experiments.harness.train`) for ``--steps`` updates on the same
   batches from the same initialization, in ``{out_dir}/students/<name>``:

   * one per ``--divergences`` entry: :func:`logitlab.linear_distillation` of the
     student's final hidden states and output weight against the frozen teacher's
     (``kl`` forward KL(t||s), ``reverse_kl``, ``jsd`` with ``--beta``, ``skew_kl`` /
     ``skew_reverse_kl`` with ``--lam``, ``tv``), at ``--temperature``; neither
     model's ``[N, V]`` logits are built;
   * ``ce`` (``--baseline``): the same function with ``hard_weight=1, soft_weight=0``,
     i.e. plain next-token cross-entropy, the no-teacher baseline;
   * ``<div>+ce`` (``--mix_hard_weight`` > 0): ``mix_hard_weight * CE +
     (1 - mix_hard_weight) * <--mix_divergence>``.

   The objective is the harness's ``loss_fn``: it runs the teacher's trunk on the
   batch under ``stop_gradient`` inside the jitted train step (the teacher's
   parameters enter as closed-over constants) and reduces the per-token losses with
   :func:`logitlab.distill.reduce_tokens` (token mean).
3. Report, on the first ``--eval_batches`` validation batches: every model's
   validation cross-entropy and perplexity, and each student's token-mean
   KL(teacher || student) (``linear_distillation(divergence="kl")``, T = 1), printed
   and written as ``{out_dir}/results.{md,csv,png}`` (plus ``results.json``); the
   students' validation cross-entropy every ``--eval_every`` updates (the harness's
   eval, here computing plain CE instead of the training objective) is plotted in
   ``{out_dir}/val_loss.png``. Each run directory also has the harness's metrics,
   ``loss.png`` and checkpoints. Like any harness run, a student directory that holds a
   checkpoint is resumed (a finished one is only evaluated), even if the settings
   changed (the harness warns): give new settings a new ``--out_dir``.

Presets: ``tiny`` (the default; the standard library's code, 2048-token BPE, a
2-block 128-wide teacher (300 updates) and 1-block 64-wide students (150 updates
each): 3 min 21 s on 2 shared CPU cores), ``small`` (the whole standard library, 8192 tokens, longer), ``pod`` (lm1b
through tensorflow-datasets with the standard library's 32768-token tokenizer, a
vocabulary-parallel mesh: ``--vocab_parallel`` must divide the device count).

Scale note: the teacher's parameters are constants of the student's train step, so
XLA embeds them in the compiled program (replicated) and jax refuses arrays spanning
several processes there: this runs on one host (CPU, one GPU, a single-host TPU
slice), not yet on a multi-host pod. Under GSPMD the streamed loss gathers a
vocabulary-sharded output weight rather than splitting its loop by shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from experiments import common, harness
from experiments.model import ModelConfig

DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")


def _field(default, help_text: str):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Config(harness.LMConfig):
  """The teacher's architecture is the LMConfig model fields; ``steps`` counts student updates."""
  out_dir: str = _field("runs/llm_distill", "output directory (teacher/, students/<name>/, "
                                            "results.*)")
  corpus: str = _field("stdlib", "stdlib (Python's standard library, offline) or a "
                                 "tensorflow-datasets text dataset, e.g. lm1b or c4/en")
  max_files: int | None = _field(None, "stdlib: use the first this many files (None: all)")
  val_fraction: float = _field(0.05, "stdlib: fraction of files held out for validation")
  data_cache: str | None = _field(None, "tokenizer / token cache (default: the data module's)")
  data_dir: str | None = _field(None, "tfds data directory (default $TFDS_DATA_DIR)")
  teacher_steps: int = _field(200, "teacher updates")
  teacher_learning_rate: float | None = _field(None, "teacher peak lr (None: learning_rate)")
  teacher_dir: str | None = _field(None, "teacher run directory (None: {out_dir}/teacher); a "
                                         "finished teacher there is restored, not retrained")
  student_width: int = _field(32, "student width D_s")
  student_depth: int = _field(1, "student transformer blocks")
  student_heads: int = _field(2, "student attention heads")
  student_mlp_ratio: float | None = _field(None, "student MLP ratio (None: the teacher's)")
  divergences: tuple[str, ...] = _field(DIVERGENCES, f"one student per divergence, from "
                                                     f"{','.join(DIVERGENCES)}")
  beta: float = _field(0.5, "jsd mixture weight")
  lam: float = _field(0.1, "skew_kl / skew_reverse_kl skew")
  temperature: float = _field(1.0, "distillation temperature (no T^2 factor)")
  baseline: bool = _field(True, "also train a CE-only student (no teacher)")
  mix_hard_weight: float = _field(0.5, "a student on w*CE + (1-w)*mix_divergence; 0: none")
  mix_divergence: str = _field("kl", "the divergence of the mixed student")
  block_tokens: int | None = _field(None, "linear_distillation token tile (None: default)")
  block_vocab: int | None = _field(None, "linear_distillation vocabulary tile (None: default)")

  def __post_init__(self):
    super().__post_init__()
    unknown = [d for d in self.divergences + (self.mix_divergence,) if d not in DIVERGENCES]
    if unknown:
      raise ValueError(f"unknown divergence(s) {unknown}; choose from {list(DIVERGENCES)}.")
    if len(set(self.divergences)) != len(self.divergences):
      raise ValueError(f"`divergences` has duplicates: {self.divergences}.")
    if not 0.0 <= self.mix_hard_weight < 1.0:
      raise ValueError(f"`mix_hard_weight` must lie in [0, 1), got {self.mix_hard_weight}.")
    if self.temperature <= 0:
      raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
    if self.head != "dense":
      raise ValueError("llm_distill distils dense heads: `head` must be 'dense'.")
    if self.teacher_steps < 1:
      raise ValueError(f"`teacher_steps` must be >= 1, got {self.teacher_steps}.")
    # The student's architecture checks (width % heads, ...), without building a Config.
    ModelConfig.from_config(self, **self._student_fields())

  def _student_fields(self) -> dict[str, Any]:
    return dict(width=self.student_width, depth=self.student_depth, heads=self.student_heads,
                mlp_ratio=self.student_mlp_ratio or self.mlp_ratio)

  def teacher_config(self) -> Config:
    """The teacher run: the model fields as given, ``teacher_steps`` updates."""
    return dataclasses.replace(
        self, steps=self.teacher_steps,
        learning_rate=self.teacher_learning_rate or self.learning_rate,
        out_dir=self.teacher_dir or str(pathlib.Path(self.out_dir) / "teacher"))

  def student_config(self, name: str = "student") -> Config:
    """A student run: the model fields replaced by the student's, in ``students/<name>``."""
    return dataclasses.replace(self, **self._student_fields(),
                               out_dir=str(pathlib.Path(self.out_dir) / "students" / name))


PRESETS = {
    # 3 min 21 s on 2 shared CPU cores, tokenizer training (~3 s, first run only) included.
    "tiny": dict(out_dir="runs/llm_distill/tiny", max_files=300, vocab_size=2048,
                 width=128, depth=2, heads=4, student_width=64, student_depth=1,
                 student_heads=2, seq_len=64, batch_size=16, teacher_steps=300, steps=150,
                 learning_rate=3e-3, warmup_steps=10, eval_every=20, eval_batches=4,
                 checkpoint_every=100, log_every=10),
    "small": dict(out_dir="runs/llm_distill/small", vocab_size=8192, width=256, depth=4,
                  heads=4, student_width=128, student_depth=2, student_heads=2, seq_len=128,
                  batch_size=32, teacher_steps=3000, steps=1500, learning_rate=2e-3,
                  warmup_steps=100, eval_every=250, eval_batches=16, checkpoint_every=500,
                  log_every=50),
    "pod": dict(out_dir="runs/llm_distill/pod", corpus="lm1b", vocab_size=32768, width=768,
                depth=12, heads=12, student_width=384, student_depth=6, student_heads=6,
                seq_len=256, batch_size=256, teacher_steps=20000, steps=10000,
                learning_rate=6e-4, warmup_steps=1000, eval_every=1000, eval_batches=32,
                checkpoint_every=1000, log_every=100, dtype="bfloat16", vocab_parallel=4,
                block_tokens=2048, block_vocab=4096),
}


# ================================================================================================
# Students and their objective
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class Student:
  """One student's objective: ``hard_weight * CE + soft_weight * divergence``."""
  name: str
  divergence: str
  hard_weight: float
  soft_weight: float
  description: str


def students(cfg: Config) -> list[Student]:
  """The students of ``cfg``, in table order: the CE baseline, the divergences, the mix."""
  options = {"jsd": f"beta={cfg.beta}", "skew_kl": f"lam={cfg.lam}",
             "skew_reverse_kl": f"lam={cfg.lam}"}
  temperature = "" if cfg.temperature == 1.0 else f", T={cfg.temperature}"

  def described(divergence):
    extra = options.get(divergence)
    return divergence + (f" ({extra}{temperature})" if extra else
                         (f" ({temperature[2:]})" if temperature else ""))

  out = []
  if cfg.baseline:
    out.append(Student("ce", "kl", 1.0, 0.0, "CE only (no teacher)"))
  out += [Student(d, d, 0.0, 1.0, described(d)) for d in cfg.divergences]
  if cfg.mix_hard_weight > 0:
    w = cfg.mix_hard_weight
    out.append(Student(f"{cfg.mix_divergence}+ce", cfg.mix_divergence, w, 1.0 - w,
                       f"{w:g} CE + {1 - w:g} {described(cfg.mix_divergence)}"))
  return out


def _bias(model):
  return None if model.head.bias is None else model.head.bias[...]


def distillation_loss_fn(teacher, *, divergence: str = "kl", beta: float = 0.5,
                         lam: float = 0.1, temperature: float = 1.0, hard_weight: float = 0.0,
                         soft_weight: float = 1.0, block_tokens: int | None = None,
                         block_vocab: int | None = None) -> Callable:
  """The student objective ``(model, tokens[B, T], mask | None) -> scalar`` for the harness.

  ``teacher``: a trained dense-head :class:`experiments.model.TransformerLM`; its
  parameters are closed over (constants of the step) and its trunk runs under
  ``stop_gradient``. The student ``model`` reads ``tokens[:, :-1]``; position ``t``
  is distilled towards the teacher's distribution there, and its hard label is
  ``tokens[:, t + 1]``. Returns the token mean (over ``mask[:, 1:]``) of
  :func:`logitlab.linear_distillation`'s per-token losses.
  """
  import jax
  from flax import nnx

  from logitlab.distill import reduce_tokens
  from logitlab.distill.linear import linear_distillation

  graphdef, state = nnx.split(teacher)

  def loss_fn(model, tokens, mask):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    where = None if mask is None else mask[:, 1:].astype(bool)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    teacher_hidden = jax.lax.stop_gradient(frozen.hidden(inputs))
    losses = linear_distillation(
        model.hidden(inputs), model.head.weight[...], teacher_hidden, frozen.head.weight[...],
        targets, divergence=divergence, beta=beta, lam=lam, temperature=temperature,
        hard_weight=hard_weight, soft_weight=soft_weight, student_bias=_bias(model),
        teacher_bias=_bias(frozen), where=where, block_tokens=block_tokens,
        block_vocab=block_vocab)
    return reduce_tokens(losses, where)

  return loss_fn


def cross_entropy_loss_fn(model, tokens, mask):
  """Plain mean next-token CE (no z-loss or smoothing): the validation metric."""
  return model.loss(tokens, mask, z_loss=0.0, label_smoothing=0.0)


def validation_sums_fn(*, block_tokens=None, block_vocab=None) -> Callable:
  """``(model, teacher, batches) -> {"val_ce", "val_kl", "val_tokens"}``, token means.

  ``val_ce``: the model's next-token cross-entropy; ``val_kl``: KL(teacher || model)
  (:func:`logitlab.linear_distillation`, ``divergence="kl"``, T = 1); over the targets
  that ``mask[:, 1:]`` marks valid in each ``(tokens, mask)`` of ``batches``. Both
  models enter the jitted function as arguments (one compilation per architecture pair).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import logitlab
  from logitlab.distill.linear import linear_distillation

  @jax.jit
  def sums(model_split, teacher_split, tokens, mask):
    model, teacher = nnx.merge(*model_split), nnx.merge(*teacher_split)
    inputs, targets, where = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    hidden = model.hidden(inputs)
    ce = logitlab.linear_cross_entropy(hidden, model.head.weight[...], targets,
                                       bias=_bias(model), where=where)
    kl = linear_distillation(hidden, model.head.weight[...], teacher.hidden(inputs),
                             teacher.head.weight[...], divergence="kl",
                             student_bias=_bias(model), teacher_bias=_bias(teacher),
                             where=where, block_tokens=block_tokens, block_vocab=block_vocab)
    return jnp.sum(ce), jnp.sum(kl), jnp.sum(where)  # masked positions are 0 in both

  def evaluate(model, teacher, batches):
    model_split, teacher_split = nnx.split(model), nnx.split(teacher)
    ce_sum = kl_sum = 0.0
    count = 0
    for tokens, mask in batches:
      ce, kl, n = jax.device_get(sums(model_split, teacher_split, tokens, mask))
      ce_sum, kl_sum, count = ce_sum + float(ce), kl_sum + float(kl), count + int(n)
    count = max(count, 1)
    return {"val_ce": ce_sum / count, "val_kl": kl_sum / count, "val_tokens": count}

  return evaluate


# ================================================================================================
# Data
# ================================================================================================

def load_data(cfg: Config):
  """``TokenData`` (stdlib) or ``TfdsTokenData`` (a tfds corpus) of ``cfg``'s vocabulary size."""
  from experiments import data
  if cfg.corpus == "stdlib":
    return data.stdlib_data(vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                            max_files=cfg.max_files, seed=cfg.seed, cache_dir=cfg.data_cache)
  tokenizer = data.stdlib_tokenizer(vocab_size=cfg.vocab_size, cache_dir=cfg.data_cache)
  return data.tfds_text(cfg.corpus, data_dir=cfg.data_dir, tokenizer=tokenizer, seed=cfg.seed,
                        cache_dir=cfg.data_cache)


def validation_batches(dataset, cfg: Config) -> list[tuple[Any, Any]]:
  """The first ``eval_batches`` validation batches as ``(tokens, mask)``; pad targets masked."""
  tokens = list(dataset.val_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches))
  return [(t, t != dataset.pad_id) for t in tokens]


# ================================================================================================
# The experiment
# ================================================================================================

HEADERS = ["model", "objective", "params", "val CE", "val ppl", "val KL(t||s)"]


def _row(name, objective, params, metrics, kl=True):
  return [name, objective, f"{params:,}", f"{metrics['val_ce']:.4f}",
          f"{math.exp(min(metrics['val_ce'], 80.0)):.2f}",
          f"{metrics['val_kl']:.4f}" if kl else "-"]


def run(cfg: Config) -> list[dict]:
  """Trains the teacher (or restores it) and every student; returns one result dict per model."""
  import jax

  dataset = load_data(cfg)
  if dataset.vocab_size != cfg.vocab_size:
    print(f"vocab_size {cfg.vocab_size} -> {dataset.vocab_size} (the tokenizer's)", flush=True)
    cfg = dataclasses.replace(cfg, vocab_size=dataset.vocab_size)
  val = validation_batches(dataset, cfg)
  if not val:
    raise ValueError("no validation batches: raise --val_fraction or --max_files.")
  if len(val) < cfg.eval_batches:
    print(f"eval_batches {cfg.eval_batches} -> {len(val)} (all the validation data)", flush=True)
    cfg = dataclasses.replace(cfg, eval_batches=len(val))
  lead = jax.process_index() == 0
  mesh = harness.setup(cfg)

  def batch_fn(step):  # the same batches for the teacher and every student
    return dataset.batch(step, cfg.batch_size, cfg.seq_len)

  def eval_batch_fn(i):
    return val[i]

  teacher_cfg = cfg.teacher_config()
  if lead:
    print(f"== teacher: width {teacher_cfg.width}, depth {teacher_cfg.depth}, "
          f"{teacher_cfg.steps} steps -> {teacher_cfg.out_dir}", flush=True)
  teacher_run = harness.train(teacher_cfg, batch_fn, eval_batch_fn=eval_batch_fn, mesh=mesh,
                              title="teacher")
  teacher = teacher_run.model
  evaluate = validation_sums_fn(block_tokens=cfg.block_tokens, block_vocab=cfg.block_vocab)
  results = [{"name": "teacher", "objective": f"CE, {teacher_cfg.steps} steps",
              "params": teacher_run.trainer.num_params, **evaluate(teacher, teacher, val),
              "curve": [(r["step"], r["loss"]) for r in teacher_run.eval_rows]}]

  # The students share architecture, initialization and optimizer: one init and one eval
  # step (plain CE, so that the students' validation curves compare; the harness would
  # evaluate each run's own objective) serve them all; only the train step differs.
  shared = harness.build_trainer(cfg.student_config(), mesh=mesh, loss_fn=cross_entropy_loss_fn)
  for student in students(cfg):
    student_cfg = cfg.student_config(student.name)
    if lead:
      print(f"== student {student.name}: {student.description}, width {student_cfg.width}, "
            f"depth {student_cfg.depth}, {cfg.steps} steps -> {student_cfg.out_dir}", flush=True)
    loss_fn = distillation_loss_fn(
        teacher, divergence=student.divergence, beta=cfg.beta, lam=cfg.lam,
        temperature=cfg.temperature, hard_weight=student.hard_weight,
        soft_weight=student.soft_weight, block_tokens=cfg.block_tokens,
        block_vocab=cfg.block_vocab)
    trainer = dataclasses.replace(
        harness.build_trainer(student_cfg, mesh=mesh, loss_fn=loss_fn),
        init=shared.init, eval_step=shared.eval_step)
    start = time.perf_counter()
    result = harness.train(student_cfg, batch_fn, eval_batch_fn=eval_batch_fn, trainer=trainer,
                           title=f"student {student.name}: {student.description}")
    metrics = evaluate(result.model, teacher, val)
    results.append({"name": student.name, "objective": student.description,
                    "params": trainer.num_params, **metrics,
                    "divergence": student.divergence if student.soft_weight > 0 else None,
                    "hard_weight": student.hard_weight,
                    "soft_weight": student.soft_weight, "final_train_loss": result.final_loss,
                    "wall_s": time.perf_counter() - start,
                    "curve": [(r["step"], r["loss"]) for r in result.eval_rows]})
    if lead:
      print(f"   val CE {metrics['val_ce']:.4f} (ppl {math.exp(metrics['val_ce']):.2f}), "
            f"KL(t||s) {metrics['val_kl']:.4f}", flush=True)

  if lead:
    report(cfg, results)
  return results


def report(cfg: Config, results: Sequence[dict]) -> None:
  """Prints the results table and writes ``results.{md,csv,png,json}`` and ``val_loss.png``."""
  out_dir = pathlib.Path(cfg.out_dir)
  rows = [_row(r["name"], r["objective"], r["params"], r, kl=r["name"] != "teacher")
          for r in results]
  title = (f"llm_distill: {cfg.corpus}, V={cfg.vocab_size}, students {cfg.steps} steps, "
           f"{results[0]['val_tokens']:,} val tokens")
  print(f"\n{title}")
  print(common.table(HEADERS, rows))
  common.write_table(out_dir / "results", HEADERS, rows, png=cfg.plots, title=title)
  (out_dir / "results.json").write_text(json.dumps(
      [{k: v for k, v in r.items() if k != "curve"} for r in results], indent=2) + "\n")
  if cfg.plots:
    teacher_ce = results[0]["val_ce"]
    curves = {r["name"]: tuple(zip(*r["curve"])) if r["curve"] else ((), ())
              for r in results[1:]}
    curves["teacher (final)"] = ((0, cfg.steps), (teacher_ce, teacher_ce))
    common.plot_curves(out_dir / "val_loss.png", curves, xlabel="student update",
                       ylabel="validation cross-entropy (nats)", title=title,
                       markers=[r["name"] for r in results[1:]])


def main(argv: Sequence[str] | None = None) -> int:
  cfg = harness.parse_config(Config, PRESETS, argv, default_preset="tiny", description=__doc__)
  run(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
