"""experiments/kd_classification.py: the students' losses, the DHKD step, micro end-to-end runs."""

import csv
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import harness
from experiments import kd_classification as kdc
from logitlab import distill

# Small but complete: every method, two chunks of 20 updates, an eval after each.
MICRO = ["--steps=40", "--scan_steps=20", "--eval_every=20", "--warmup_steps=4",
         "--learning_rate=1e-2", "--num_classes=10", "--n_train=1024", "--n_val=250",
         "--input_dim=16", "--separation=6", "--teacher_width=64", "--student_width=16",
         "--batch_size=32", "--progress=false"]

C, B = 10, 8


def _read_table(path):
  with open(path, newline="") as f:
    return {row["method"]: row for row in csv.DictReader(f)}


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.fixture(scope="module")
def batch():
  ks = jax.random.split(jax.random.key(3), 5)
  return {"s": 2.0 * jax.random.normal(ks[0], (B, C)), "t": 2.0 * jax.random.normal(ks[1], (B, C)),
          "aux": jax.random.normal(ks[2], (B, C)), "weak": jax.random.normal(ks[3], (B, C)),
          "y": jax.random.randint(ks[4], (B,), 0, C)}


# Every weight away from its default, so that a loss ignoring a field fails.
CUSTOM = kdc.Config(
    kd_ce_weight=0.3, kd_weight=0.7, kd_temperature=3.0, lskd_ce_weight=0.2, lskd_weight=5.0,
    lskd_temperature=1.5, dkd_ce_weight=0.5, dkd_alpha=0.7, dkd_beta=3.0, dkd_temperature=2.0,
    dkd_warmup_epochs=8.0, nkd_ce_weight=0.6, nkd_gamma=2.0, nkd_temperature=2.0,
    uskd_ce_weight=0.4, uskd_alpha=0.8, uskd_beta=0.3, uskd_mu=0.05, uskd_rank_quirk=False,
    dhkd_ce_weight=0.9, dhkd_weight=0.4, dhkd_temperature=3.0, pld_tau=2.0, dist_ce_weight=0.7,
    dist_weight=2.0, dist_beta=0.5, dist_gamma=1.5, dist_temperature=2.0)


def _expected(name, c, b, epoch):
  s, t, y = b["s"], b["t"], b["y"]
  if name == "ce":
    return {"ce": _ce(s, y)}
  if name == "kd":
    return {"ce": c.kd_ce_weight * _ce(s, y),
            "kd": c.kd_weight * distill.kd(s, t, temperature=c.kd_temperature).mean()}
  if name == "lskd":
    z = distill.standardize_logits
    return {"ce": c.lskd_ce_weight * _ce(s, y),
            "kd": c.lskd_weight * distill.kd(z(s), z(t), temperature=c.lskd_temperature).mean()}
  if name == "dkd":
    factor = min(epoch / c.dkd_warmup_epochs, 1.0)
    return {"ce": c.dkd_ce_weight * _ce(s, y),
            "dkd": factor * distill.dkd(s, t, y, alpha=c.dkd_alpha, beta=c.dkd_beta,
                                        temperature=c.dkd_temperature).mean()}
  if name == "nkd":
    return {"ce": c.nkd_ce_weight * _ce(s, y),
            "nkd": distill.nkd(s, t, y, gamma=c.nkd_gamma, temperature=c.nkd_temperature).mean()}
  if name == "uskd":
    return {"ce": c.uskd_ce_weight * _ce(s, y),
            "uskd": distill.uskd(s, y, weak_logits=b["weak"], alpha=c.uskd_alpha,
                                 beta=c.uskd_beta, mu=c.uskd_mu,
                                 official_rank_quirk=c.uskd_rank_quirk).mean()}
  if name == "dhkd":
    return {"ce": c.dhkd_ce_weight * _ce(s, y),
            "kd": c.dhkd_weight * distill.binary_kl_norm(
                b["aux"], t, temperature=c.dhkd_temperature).mean()}
  if name == "pld":
    return {"pld": distill.pld(s, t, y, tau=c.pld_tau).mean()}
  if name == "dist":
    return {"ce": c.dist_ce_weight * _ce(s, y),
            "dist": c.dist_weight * distill.dist(s, t, beta=c.dist_beta, gamma=c.dist_gamma,
                                                 temperature=c.dist_temperature)}
  raise AssertionError(name)


@pytest.mark.parametrize("cfg", [kdc.Config(), CUSTOM], ids=["official", "custom"])
@pytest.mark.parametrize("name", kdc.METHODS)
def test_student_loss_is_the_weighted_library_loss(name, cfg, batch):
  spec = kdc.method(name, cfg)
  outputs = {"logits": batch["s"], "aux_logits": batch["aux"], "weak_logits": batch["weak"]}
  for epoch in (2, 30):  # inside and after DKD's warm-up (official 20 epochs, custom 8)
    got = spec.loss(outputs, batch["y"], batch["t"], epoch=jnp.asarray(epoch))
    want = _expected(name, cfg, batch, epoch)
    assert sorted(got) == sorted(want)
    for term in want:
      np.testing.assert_allclose(got[term], want[term], rtol=2e-5, atol=1e-6, err_msg=term)
  assert spec.uses_teacher == (name not in ("ce", "uskd"))
  assert spec.split == (("ce", "kd") if name == "dhkd" else None)


def test_official_defaults_and_deviations():
  cfg = kdc.Config()
  assert (cfg.kd_ce_weight, cfg.kd_weight, cfg.kd_temperature) == (0.1, 0.9, 4.0)
  assert (cfg.lskd_ce_weight, cfg.lskd_weight, cfg.lskd_temperature) == (0.1, 9.0, 2.0)
  assert (cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_temperature, cfg.dkd_warmup_epochs) == (
      1.0, 8.0, 4.0, 20.0)
  assert (cfg.nkd_gamma, cfg.uskd_alpha, cfg.uskd_beta, cfg.uskd_mu) == (1.5, 1.0, 0.1, 0.005)
  assert (cfg.dhkd_temperature, cfg.dhkd_projection) == (2.0, True)
  assert all(kdc.deviations(m, cfg) in ("official", "baseline") for m in kdc.METHODS)
  changed = dataclasses.replace(cfg, dkd_warmup_epochs=1.5)
  assert kdc.deviations("dkd", changed) == "dkd_warmup_epochs=1.5 (official 20.0)"
  assert kdc.deviations("kd", changed) == "official"  # another method's field does not leak
  tiny = harness.parse_config(kdc.Config, kdc.PRESETS, [], default_preset="tiny")
  epochs = tiny.steps * tiny.batch_size / tiny.n_train
  assert tiny.dkd_warmup_epochs == pytest.approx(epochs * 20 / 240, abs=1e-3)
  with pytest.raises(harness.ConfigError, match="methods"):
    harness.parse_config(kdc.Config, kdc.PRESETS, ["--methods=kd,nope"], exit_on_error=False)


def test_chunk_bounds():
  assert kdc.chunk_bounds(100, 30, 0) == [30, 60, 90, 100]
  assert kdc.chunk_bounds(100, 30, 25) == [25, 30, 50, 60, 75, 90, 100]
  assert kdc.chunk_bounds(100, 30, 25, start=60) == [75, 90, 100]
  assert kdc.chunk_bounds(100, 30, 25, start=100) == []


def test_dhkd_step_projects_the_kd_gradient_before_the_optimizer():
  cfg = kdc.Config(student_width=8, student_depth=1, dhkd_aux_width=6)
  spec = kdc.method("dhkd", cfg)
  optimizer = optax.chain(distill.dhkd_projection(), optax.sgd(1.0))
  comp = kdc.Compiled(cfg, harness.make_mesh(1), batch_size=6, num_train=60, images=False)
  model_fns = [lambda seed=seed: kdc.make_model(cfg, (5,), 4, role="student", method="dhkd",
                                                seed=seed) for seed in (0, 3)]
  inits = comp.init(model_fns, [optimizer] * 2)
  graphdef = inits[0][0]
  chunk = comp.train_chunk(spec, graphdef, optimizer)  # one compilation for both cases

  @jax.jit
  def reference(params, x, y, t):
    """The separate gradients of the two weighted terms, their dot, the projected sum."""
    def term(name):
      return lambda p: spec.loss(kdc._forward(graphdef, p, x), y, t, epoch=1)[name]
    (ce, ce_g), (kd, kd_g) = jax.value_and_grad(term("ce"))(params), \
        jax.value_and_grad(term("kd"))(params)
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(ce_g), jax.tree.leaves(kd_g)))
    return ce + kd, dot, distill.project_conflicting(kd_g, ce_g), \
        jax.tree.map(jnp.add, ce_g, kd_g)

  dots = []
  for seed, (_, state, _) in zip((0, 3), inits):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 6, 5)).astype(np.float32)
    y = rng.integers(0, 4, (1, 6)).astype(np.int32)
    t = (3 * rng.standard_normal((1, 6, 4))).astype(np.float32)
    params = jax.tree.map(np.asarray, state["params"])
    total, dot, projected, summed = reference(params, x[0], y[0], t[0])
    dots.append(float(dot))
    want = jax.tree.map(lambda p, g: p - g, params, projected)
    plain = jax.tree.map(lambda p, g: p - g, params, summed)
    new_state, losses = chunk(state, x, y, t)
    got = new_state["params"]
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    gap = max(float(jnp.abs(g - p).max())
              for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(plain)))
    assert (gap > 1e-4) == (dots[-1] < 0), (seed, dots[-1], gap)  # projected only on conflict
    np.testing.assert_allclose(losses[0], total, rtol=1e-5)
    assert int(new_state["step"]) == 1
  assert dots[0] > 0 > dots[1]  # one agreeing and one conflicting case


def test_models_share_their_initialization_and_heads_see_the_right_features():
  cfg = kdc.Config(student_width=8, student_depth=2, dhkd_aux_width=0)

  @jax.jit
  def build(x):
    params = {m: kdc._split(kdc.make_model(cfg, (5,), 4, role="student", method=m, seed=1))[1]
              for m in ("ce", "dhkd", "uskd")}
    model = kdc.make_model(cfg, (5,), 4, role="student", method="uskd", seed=1)
    mid = jax.nn.gelu(model.layers[0](x))  # USKD's weak head reads the first of two layers
    return params, model(x)["weak_logits"], model.weak(mid)

  ps, weak, want = build(jnp.linspace(-1.0, 1.0, 15).reshape(3, 5))
  for m in ("dhkd", "uskd"):
    jax.tree.map(np.testing.assert_array_equal, ps["ce"], {k: ps[m][k] for k in ps["ce"]})
  assert set(ps["dhkd"]) - set(ps["ce"]) == {"aux"} and set(ps["uskd"]) - set(ps["ce"]) == {"weak"}
  np.testing.assert_allclose(weak, want, rtol=1e-6)


@pytest.mark.parametrize("name", ["uskd", "dhkd"])
def test_resnet_train_step_traces(name):
  """The image path (ResNet, augmentation, teacher logits, extra heads), traced without compiling
  (XLA:CPU takes tens of seconds on convolutions; the end-to-end run is not in this suite)."""
  cfg = kdc.Config(model="resnet", student_width=4, student_depth=1, teacher_width=8,
                   teacher_depth=1)
  comp = kdc.Compiled(cfg, harness.make_mesh(1), batch_size=4, num_train=40, images=True)
  spec = kdc.method(name, cfg)
  optimizer = optax.chain(distill.dhkd_projection(), optax.sgd(0.1)) if spec.split else \
      optax.sgd(0.1)

  def model(role):
    return kdc.make_model(cfg, (8, 8, 3), 5, role=role, method=name, seed=0)
  graphdef, abstract = kdc._split(nnx.eval_shape(lambda: model("student")))
  t_graphdef, t_abstract = kdc._split(nnx.eval_shape(lambda: model("teacher")))
  assert abstract["head"]["weight"].shape == (5, 16)  # 4 * width channels after stage 3
  if name == "uskd":
    assert abstract["weak"]["weight"].shape == (5, 8)  # the pooled stage-2 feature
  state = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                    "opt_state": optimizer.init(p)}, abstract)
  xs = jax.ShapeDtypeStruct((2, 4, 8, 8, 3), jnp.float32)
  xs_out, ts = jax.eval_shape(comp.prepare(t_graphdef), t_abstract, xs, 0)
  assert xs_out.shape == xs.shape and ts.shape == (2, 4, 5)
  ys = jax.ShapeDtypeStruct((2, 4), jnp.int32)
  batches = (xs_out, ys, ts) if spec.uses_teacher else (xs_out, ys)
  new_state, losses = jax.eval_shape(comp.train_chunk(spec, graphdef, optimizer), state, *batches)
  assert losses.shape == (2,)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state["params"]) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state["params"])


def test_augment_is_a_padded_crop_or_its_mirror():
  xs = jnp.arange(2 * 3 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 3, 4, 4, 1) + 1
  augment = jax.jit(kdc._augment)
  out = np.asarray(augment(xs, jax.random.key(0), 5))
  again = np.asarray(augment(xs, jax.random.key(0), 5))
  np.testing.assert_array_equal(out, again)
  padded = np.pad(np.asarray(xs), ((0, 0), (0, 0), (4, 4), (4, 4), (0, 0)))
  for k in range(2):
    for b in range(3):
      crops = [padded[k, b, i:i + 4, j:j + 4] for i in range(9) for j in range(9)]
      crops += [c[:, ::-1] for c in crops]
      assert any(np.array_equal(out[k, b], c) for c in crops)
  assert not np.array_equal(out, np.asarray(xs))


def test_main_micro_run_table_files_and_teacher_reload(tmp_path, capsys):
  out = tmp_path / "run"
  assert kdc.main(MICRO + [f"--out_dir={out}"]) == 0
  printed = capsys.readouterr().out
  assert "teacher: training for 40 steps" in printed
  table = _read_table(out / "results.csv")
  assert list(table) == list(kdc.METHODS) + ["teacher"]
  for name, row in table.items():
    acc, nll = float(row["val top-1"]), float(row["val NLL"])
    assert 0.0 <= acc <= 1.0 and math.isfinite(nll) and nll > 0, (name, row)
    assert float(row["d top-1 vs CE"]) == pytest.approx(acc - float(table["ce"]["val top-1"]),
                                                        abs=2e-4)
    assert float(row["d NLL vs CE"]) == pytest.approx(nll - float(table["ce"]["val NLL"]),
                                                      abs=2e-4)
  assert float(table["ce"]["d top-1 vs CE"]) == 0.0 and table["ce"]["setting"] == "baseline"
  assert "dkd_warmup_epochs" in table["dkd"]["setting"]  # the tiny preset scales the warm-up
  assert float(table["teacher"]["val top-1"]) > 0.5  # 10 classes: chance is 0.1
  assert all(float(table[m]["val top-1"]) > 0.2 for m in kdc.METHODS)
  for suffix in ("results.md", "results.png", "val_accuracy.png", "config.json", "train.csv"):
    assert (out / suffix).stat().st_size > 0, suffix
  assert "| method | recipe |" in (out / "results.md").read_text()
  evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
  assert sorted((r["method"], r["step"]) for r in evals if r["method"] != "teacher") == sorted(
      (m, s) for m in kdc.METHODS for s in (20, 40))
  final = {r["method"]: r for r in evals if r["step"] == 40}
  assert final["kd"]["val_acc"] == pytest.approx(float(table["kd"]["val top-1"]), abs=1e-4)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_val"] == 250 and summary["teacher_start_step"] == 0

  # Rerun: the teacher comes from its checkpoint, and the CE student is reproduced exactly.
  assert kdc.main(MICRO + [f"--out_dir={out}", "--methods=ce"]) == 0
  assert "teacher: loaded from" in capsys.readouterr().out
  again = _read_table(out / "results.csv")
  assert list(again) == ["ce", "teacher"]
  for name in again:
    assert again[name]["val top-1"] == table[name]["val top-1"]
    assert again[name]["val NLL"] == table[name]["val NLL"]
  with pytest.raises(harness.ConfigError, match="teacher_width"):
    kdc.main(MICRO + [f"--out_dir={out}", "--methods=ce", "--teacher_width=32"])
