"""experiments.llm_distill: the student objective against the materialized form, and a micro run."""

from __future__ import annotations

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import logitlab
from experiments import harness, llm_distill
from experiments.model import ModelConfig, TransformerLM
from logitlab import distill
from logitlab.distill.linear import linear_distillation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MATERIALIZED = {"kl": distill.kl_divergence, "reverse_kl": distill.reverse_kl,
                "jsd": distill.generalized_jsd, "skew_kl": distill.skew_kl,
                "skew_reverse_kl": distill.skew_reverse_kl, "tv": distill.total_variation}
OPTIONS = {"jsd": dict(beta=0.3), "skew_kl": dict(lam=0.2), "skew_reverse_kl": dict(lam=0.2)}


@pytest.fixture(scope="module")
def models():
  """A teacher and a narrower student (D_t = 24, D_s = 16), both with output biases."""
  teacher = TransformerLM(ModelConfig(vocab_size=37, width=24, depth=1, heads=2, max_seq_len=16,
                                      token_bias=True), rngs=nnx.Rngs(1))
  student = TransformerLM(ModelConfig(vocab_size=37, width=16, depth=1, heads=2, max_seq_len=16,
                                      token_bias=True), rngs=nnx.Rngs(2))
  # Non-zero biases, so that a dropped bias would show.
  teacher.head.bias[...] = jax.random.normal(jax.random.key(3), (37,))
  student.head.bias[...] = 0.5 * jax.random.normal(jax.random.key(4), (37,))
  tokens = jax.random.randint(jax.random.key(5), (3, 9), 0, 37)
  mask = jnp.ones((3, 9), bool).at[1, 5:].set(False).at[2, 1].set(False)
  return teacher, student, tokens, mask


def materialized_loss(student, teacher, tokens, mask, *, divergence, hard_weight, soft_weight,
                      temperature):
  """The token mean of ``soft * D(teacher, student) + hard * CE`` on full ``[B, S, V]`` logits."""
  z_s, z_t = student.logits(tokens[:, :-1]), teacher.logits(tokens[:, :-1])
  per_token = soft_weight * MATERIALIZED[divergence](
      z_s, z_t, temperature=temperature, **OPTIONS.get(divergence, {}))
  per_token += hard_weight * logitlab.cross_entropy(z_s, tokens[:, 1:])
  where = mask[:, 1:]
  return jnp.sum(jnp.where(where, per_token, 0.0)) / jnp.sum(where)


# (divergence, hard_weight, soft_weight, temperature): every divergence, CE only, a mix.
CASES = [("kl", 0.0, 1.0, 1.0), ("reverse_kl", 0.0, 1.0, 2.0), ("jsd", 0.0, 1.0, 1.0),
         ("skew_kl", 0.0, 1.0, 1.0), ("skew_reverse_kl", 0.0, 1.0, 1.0), ("tv", 0.0, 1.0, 0.5),
         ("kl", 1.0, 0.0, 1.0), ("jsd", 0.4, 0.6, 1.5)]


def _objectives(teacher, student, case):
  """``(loss_fn objective, materialized reference)``, both ``(params, tokens, mask) -> scalar``."""
  divergence, hard_weight, soft_weight, temperature = case
  loss_fn = llm_distill.distillation_loss_fn(
      teacher, divergence=divergence, hard_weight=hard_weight, soft_weight=soft_weight,
      temperature=temperature, block_tokens=8, block_vocab=16, **OPTIONS.get(divergence, {}))
  graphdef, _, rest = nnx.split(student, nnx.Param, ...)

  def objective(params, tokens, mask):  # as the harness's train step calls loss_fn
    return loss_fn(nnx.merge(graphdef, params, rest), tokens, mask)

  def reference(params, tokens, mask):
    return materialized_loss(nnx.merge(graphdef, params, rest), teacher, tokens, mask,
                             divergence=divergence, hard_weight=hard_weight,
                             soft_weight=soft_weight, temperature=temperature)
  return objective, reference


def test_student_loss_fn_is_linear_distillation_and_the_materialized_loss(models):
  teacher, student, tokens, mask = models
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)

  @jax.jit  # all cases in one compilation
  def values(params, tokens, mask):
    model = nnx.merge(graphdef, params, rest)
    inputs, where = tokens[:, :-1], mask[:, 1:]
    out = []
    for case in CASES:
      objective, reference = _objectives(teacher, student, case)
      divergence, hard_weight, soft_weight, temperature = case
      # The same inputs into linear_distillation directly, reduced by reduce_tokens.
      direct = distill.reduce_tokens(linear_distillation(
          model.hidden(inputs), model.head.weight[...], teacher.hidden(inputs),
          teacher.head.weight[...], tokens[:, 1:], divergence=divergence,
          temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight,
          student_bias=model.head.bias[...], teacher_bias=teacher.head.bias[...], where=where,
          block_tokens=8, block_vocab=16, **OPTIONS.get(divergence, {})), where)
      out.append(jnp.stack([objective(params, tokens, mask), direct,
                            reference(params, tokens, mask)]))
    return jnp.stack(out)

  got = np.asarray(values(params, tokens, mask))
  assert np.all(np.isfinite(got)) and np.all(got[:, 0] > 0), got
  np.testing.assert_allclose(got[:, 0], got[:, 1], rtol=1e-6, atol=1e-7)  # loss_fn == direct
  np.testing.assert_allclose(got[:, 0], got[:, 2], rtol=1e-5, atol=1e-6)  # == materialized
  assert len(set(np.round(got[:, 0], 5))) == len(CASES)  # every option reaches the loss


def test_student_loss_fn_gradients_match_the_materialized_loss(models):
  teacher, student, tokens, mask = models
  params = nnx.state(student, nnx.Param)

  @jax.jit
  def grads(params, tokens, mask):
    out = []
    for case in (CASES[0], CASES[-1]):  # forward KL; a mix of CE and JSD at T = 1.5
      objective, reference = _objectives(teacher, student, case)
      out.append((jax.grad(objective)(params, tokens, mask),
                  jax.grad(reference)(params, tokens, mask)))
    return out

  for got, want in grads(params, tokens, mask):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want) > 10
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_student_loss_fn_uses_labels_only_where_valid_and_vanishes_on_the_teacher(models):
  teacher, student, tokens, mask = models
  loss_fn = nnx.jit(llm_distill.distillation_loss_fn(teacher, divergence="jsd", hard_weight=0.5))
  base = loss_fn(student, tokens, mask)
  # The last token is only a target: masked in row 1 (no effect), valid in row 0 (an effect,
  # through the hard term; the divergence does not read labels).
  bump = lambda row: tokens.at[row, 8].set((tokens[row, 8] + 1) % 37)
  assert float(loss_fn(student, bump(1), mask)) == float(base)
  assert abs(float(loss_fn(student, bump(0), mask)) - float(base)) > 1e-4
  # A student that is a copy of the teacher has JSD 0 to it.
  jsd = nnx.jit(llm_distill.distillation_loss_fn(teacher, divergence="jsd"))
  assert float(jsd(nnx.clone(teacher), tokens, mask)) == pytest.approx(0.0, abs=1e-6)
  assert float(jsd(student, tokens, mask)) > 1e-3


def test_students_cover_every_objective():
  cfg = llm_distill.Config(beta=0.3, lam=0.2, mix_hard_weight=0.25, mix_divergence="jsd")
  table = {s.name: s for s in llm_distill.students(cfg)}
  assert list(table) == ["ce", *llm_distill.DIVERGENCES, "jsd+ce"]
  assert (table["ce"].hard_weight, table["ce"].soft_weight) == (1.0, 0.0)
  assert all((table[d].divergence, table[d].hard_weight, table[d].soft_weight) == (d, 0.0, 1.0)
             for d in llm_distill.DIVERGENCES)
  mix = table["jsd+ce"]
  assert (mix.divergence, mix.hard_weight, mix.soft_weight) == ("jsd", 0.25, 0.75)
  assert "beta=0.3" in table["jsd"].description and "lam=0.2" in table["skew_kl"].description
  off = llm_distill.Config(baseline=False, mix_hard_weight=0.0, divergences=("tv",))
  assert [s.name for s in llm_distill.students(off)] == ["tv"]


@pytest.mark.parametrize("argv,match", [
    (["--divergences=kl,bogus"], "bogus"),
    (["--student_width=30", "--student_heads=4"], "divisible"),
    (["--mix_hard_weight=1.0"], "mix_hard_weight"),
    (["--head=vq"], "dense"),
])
def test_config_errors_name_the_problem(argv, match):
  with pytest.raises(harness.ConfigError, match=match):
    harness.parse_config(llm_distill.Config, llm_distill.PRESETS, argv, exit_on_error=False)


def test_presets_parse_and_describe_smaller_students():
  for name in ("tiny", "small", "pod"):
    cfg = harness.parse_config(llm_distill.Config, llm_distill.PRESETS, ["--preset", name])
    teacher, student = cfg.teacher_config(), cfg.student_config("kl")
    assert student.width < teacher.width and student.depth <= teacher.depth
    assert teacher.steps == cfg.teacher_steps and student.steps == cfg.steps
    assert student.out_dir.endswith("students/kl") and teacher.out_dir.endswith("teacher")
  assert harness.parse_config(llm_distill.Config, llm_distill.PRESETS, ["--preset=pod"]).corpus \
      == "lm1b"


MICRO = ["--max_files=30", "--val_fraction=0.2", "--vocab_size=300", "--width=32", "--depth=1",
         "--heads=2", "--student_width=16", "--student_heads=2", "--seq_len=16", "--batch_size=4",
         "--teacher_steps=12", "--steps=6", "--eval_every=3", "--eval_batches=2",
         "--mix_hard_weight=0", "--log_every=3", "--progress=false"]


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_micro_run_writes_the_table_and_restores(tmp_path, capsys):
  out = tmp_path / "run"
  argv = MICRO + [f"--data_cache={tmp_path / 'cache'}", f"--out_dir={out}"]
  assert llm_distill.main(argv) == 0
  printed = capsys.readouterr().out

  rows = _read_csv(out / "results.csv")
  names = [r["model"] for r in rows]
  assert names == ["teacher", "ce", *llm_distill.DIVERGENCES], names
  for row in rows:
    ce, ppl = float(row["val CE"]), float(row["val ppl"])
    assert math.isfinite(ce) and 1.0 < ppl < 2 * 300, row  # V = 300: near uniform or better
    assert ppl == pytest.approx(math.exp(ce), rel=2e-3)
    assert row["model"] in printed and row["val ppl"] in printed
    if row["model"] == "teacher":
      assert row["val KL(t||s)"] == "-"
    else:
      assert 0.0 < float(row["val KL(t||s)"]) < 10.0, row
  student_params = {r["params"] for r in rows[1:]}
  assert len(student_params) == 1 and rows[0]["params"] not in student_params
  assert "val KL(t||s)" in printed and "llm_distill: stdlib, V=300" in printed

  for name in ("results.md", "results.csv", "results.png", "results.json", "val_loss.png"):
    assert (out / name).stat().st_size > 0, name
  assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
  assert (out / "val_loss.png").read_bytes()[:8] == PNG_MAGIC
  assert "| teacher |" in (out / "results.md").read_text()
  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results] == names
  # Every student: the harness's run directory, val CE logged every 3 updates, and its final
  # eval (CE on the same batches, mean of batch means) close to the table's token mean.
  for result in results[1:]:
    run_dir = out / "students" / result["name"]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[-1]["loss"] == pytest.approx(result["val_ce"], rel=1e-3)
    assert len((run_dir / "train.jsonl").read_text().splitlines()) == 6
    assert (run_dir / "loss.png").exists() and (run_dir / "checkpoints").is_dir()
  teacher_evals = (out / "teacher" / "eval.jsonl").read_text().splitlines()
  assert json.loads(teacher_evals[-1])["step"] == 12

  # A rerun restores the teacher and the finished students from their checkpoints.
  assert llm_distill.main(argv + ["--divergences=kl", "--baseline=false"]) == 0
  printed = capsys.readouterr().out
  assert f"resumed from checkpoint step 12 in {out / 'teacher' / 'checkpoints'}" in printed
  assert f"resumed from checkpoint step 6 in {out / 'students' / 'kl' / 'checkpoints'}" in printed
  again = {r["model"]: r for r in _read_csv(out / "results.csv")}
  assert list(again) == ["teacher", "kl"]
  for name in again:
    before = next(r for r in rows if r["model"] == name)
    assert again[name]["val CE"] == before["val CE"]
    assert again[name]["val KL(t||s)"] == before["val KL(t||s)"]
