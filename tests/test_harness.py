"""The experiment harness: CLI configs, the transformer LM and its heads, training, sharding,
metrics / plots, and exact resume after SIGKILL (real subprocesses)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import logitlab
from experiments import common, harness
from experiments.model import ModelConfig, TransformerLM

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- CLI -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config(harness.LMConfig):
  widths: tuple[int, ...] = (1, 2)
  pair: tuple[int, float] = (0, 0.5)
  limit: int | None = None
  corpus: str = "synthetic"


PRESETS = {"tiny": dict(steps=7, width=32, heads=2), "small": dict(steps=70, learning_rate=1e-3)}


def test_parse_config_applies_preset_then_overrides_with_types():
  cfg = harness.parse_config(_Config, PRESETS, [
      "--preset=tiny", "--steps=12", "--learning-rate", "2e-4", "--token_bias", "--plots=false",
      "--widths=3,4,5", "--pair=(2, 1.5)", "--limit=none", "--corpus=wiki", "--depth", "3",
      "--batch_size=1e2"], exit_on_error=False)
  assert (cfg.steps, cfg.width, cfg.heads, cfg.depth, cfg.batch_size) == (12, 32, 2, 3, 100)
  assert cfg.learning_rate == 2e-4 and isinstance(cfg.learning_rate, float)
  assert cfg.token_bias is True and cfg.plots is False
  assert cfg.widths == (3, 4, 5) and cfg.pair == (2, 1.5) and cfg.limit is None
  assert cfg.corpus == "wiki"
  assert harness.parse_config(_Config, PRESETS, ["--limit=8"], exit_on_error=False).limit == 8
  # Without --preset: the dataclass defaults, or default_preset.
  assert harness.parse_config(_Config, PRESETS, [], exit_on_error=False).steps == 100
  assert harness.parse_config(_Config, PRESETS, [], default_preset="small",
                              exit_on_error=False).learning_rate == 1e-3
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("argv, match", [
    (["--stepz=3"], r"unknown command-line keys.*--stepz \(did you mean --steps\?\)"),
    (["--steps=3", "--nonsense=1", "--other=2"], r"--nonsense.*--other"),
    (["--steps=three"], r"--steps: expected int, got 'three'"),
    (["--learning_rate=fast"], r"--learning_rate: expected float"),
    (["--plots=maybe"], r"--plots: expected a bool"),
    (["--steps=2.5"], r"--steps: expected int"),
    (["--pair=1,2,3"], r"--pair: expected 2 comma-separated values"),
    (["--widths=1,x"], r"--widths: expected int, got 'x'"),
    (["--steps"], r"--steps needs a value"),
    (["--preset=huge"], r"unknown --preset 'huge'; choose from \['small', 'tiny'\]"),
    (["--width=30", "--heads=4"], r"invalid _Config: .*width.*=30 must be divisible"),
    (["--batch_size=0"], r"invalid _Config: `batch_size` must be >= 1"),
    (["steps=3"], r"unexpected argument 'steps=3'"),
])
def test_parse_config_errors_name_the_problem(argv, match):
  with pytest.raises(harness.ConfigError, match=match):
    harness.parse_config(_Config, PRESETS, argv, exit_on_error=False)


def test_parse_config_error_exits_2_and_bad_preset_keys_are_errors(capsys):
  with pytest.raises(SystemExit) as exit_info:
    harness.parse_config(_Config, PRESETS, ["--stepz=3"])
  assert exit_info.value.code == 2
  assert "error: unknown command-line keys for _Config: --stepz" in capsys.readouterr().err
  with pytest.raises(harness.ConfigError, match=r"keys in preset 'tiny'.*--wdth"):
    harness.parse_config(_Config, {"tiny": dict(wdth=3)}, ["--preset=tiny"], exit_on_error=False)


def test_help_lists_fields_defaults_and_presets(capsys):
  with pytest.raises(SystemExit) as exit_info:
    harness.parse_config(_Config, PRESETS, ["--help"], description="A toy experiment.")
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "A toy experiment." in out
  assert "tiny: steps=7, width=32, heads=2" in out
  assert "--learning_rate (float, default 0.003): peak learning rate" in out
  assert "--head (str, default 'dense'): output head: dense | vq" in out
  assert "--widths (tuple[int, ...], default (1, 2))" in out
  fields = [f.name for f in dataclasses.fields(_Config)]
  assert all(f"--{name} (" in out for name in fields)


def test_distributed_flag_initializes_jax_distributed_once(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(harness, "_DISTRIBUTED_INITIALIZED", False)
  assert harness.parse_config(_Config, PRESETS, ["--distributed"], exit_on_error=False).distributed
  assert calls == [((), {})]
  harness.setup(harness.LMConfig(distributed=True))  # already done: not again
  assert len(calls) == 1
  assert not harness.parse_config(_Config, PRESETS, [], exit_on_error=False).distributed


def test_param_spec_shards_the_dense_head_on_its_vocabulary_axis():
  from jax.sharding import PartitionSpec as P
  spec = harness.default_param_spec
  assert spec(("head", "weight"), (64, 16)) == P("vocab", None)
  assert spec(("head", "bias"), (64,)) == P("vocab")
  assert spec(("head", "codebook"), (8, 16)) == P()
  assert spec(("embed", "embedding"), (64, 16)) == P()
  mesh = jax.sharding.AbstractMesh((4, 2), ("data", "vocab"))
  assert harness._fit_spec(P("vocab", None), (64, 16), mesh, "w") == P("vocab", None)
  with pytest.warns(UserWarning, match=r"head/weight: dimension 63 is not divisible"):
    assert harness._fit_spec(P("vocab", None), (63, 16), mesh, "head/weight") == P(None, None)
  with pytest.raises(ValueError, match="vocab_parallel=3 must divide the device count"):
    harness.make_mesh(3, jax.devices()[:1] * 2)


# --- model ---------------------------------------------------------------------------------------

def _tokens(batch, length, vocab, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


@pytest.mark.parametrize("head, token_bias, positions, norm, masked", [
    ("dense", False, "rope", "rms", False),
    ("dense", True, "learned", "layer", True),
    ("vq", False, "learned", "rms", True),
    ("vq", True, "rope", "layer", False),
])
def test_model_loss_equals_materialized_cross_entropy(head, token_bias, positions, norm, masked):
  config = ModelConfig(vocab_size=37, width=16, depth=2, heads=2, max_seq_len=12, head=head,
                       num_codes=5, token_bias=token_bias, positions=positions, norm=norm)
  model = TransformerLM(config, rngs=nnx.Rngs(1))
  if token_bias:  # a non-zero bias, so that it matters
    bias = model.head.bias if head == "dense" else model.head.token_bias
    bias[...] = jax.random.normal(jax.random.key(5), bias.shape)
  tokens = _tokens(3, 9, 37)
  mask = jnp.ones(tokens.shape, bool).at[1, 5:].set(False).at[2, 1].set(False) if masked else None

  # One compiled program (eager op-by-op dispatch would compile each op on its own).
  hidden, logits, got, mean = nnx.jit(lambda m, t, k: (
      m.hidden(t), m.logits(t), m.token_losses(t, k), m.loss(t, k)))(model, tokens, mask)
  assert hidden.shape == (3, 9, 16)
  assert logits.shape == (3, 9, 37) and logits.dtype == jnp.float32
  where = None if mask is None else mask[:, 1:]
  want = logitlab.cross_entropy(logits[:, :-1], tokens[:, 1:], where=where)
  assert got.shape == (3, 8)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  count = 24 if mask is None else int(mask[:, 1:].sum())
  np.testing.assert_allclose(mean, float(want.sum()) / count, rtol=2e-5)
  # ... and a reference that does not go through logitlab: log-softmax in float64.
  z = np.asarray(logits[:, :-1], np.float64)
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  ref = lse - np.take_along_axis(z, np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
  ref = ref if mask is None else np.where(np.asarray(mask[:, 1:]), ref, 0.0)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_model_is_causal_and_checks_lengths():
  model = TransformerLM(ModelConfig(vocab_size=20, width=16, depth=1, heads=2, max_seq_len=6),
                        rngs=nnx.Rngs(0))
  tokens = _tokens(2, 6, 20)
  changed = tokens.at[:, 4].set((tokens[:, 4] + 1) % 20)
  hidden = nnx.jit(lambda m, t: m.hidden(t))
  a, b = hidden(model, tokens), hidden(model, changed)
  np.testing.assert_array_equal(a[:, :4], b[:, :4])  # the past does not see the future
  assert float(jnp.abs(a[:, 4:] - b[:, 4:]).max()) > 1e-3
  with pytest.raises(ValueError, match="exceeds max_seq_len=6"):
    model.hidden(_tokens(1, 7, 20))
  with pytest.raises(ValueError, match="num_codes"):
    ModelConfig(vocab_size=10, num_codes=11, head="vq")


@pytest.mark.parametrize("head, token_bias, positions, norm", [
    ("dense", False, "rope", "rms"), ("dense", True, "learned", "layer"),
    ("vq", False, "rope", "layer"), ("vq", True, "learned", "rms")])
def test_parameter_counts(head, token_bias, positions, norm):
  v, d, depth, heads, ratio, s, k = 50, 16, 3, 4, 2.5, 10, 7
  config = ModelConfig(vocab_size=v, width=d, depth=depth, heads=heads, mlp_ratio=ratio,
                       max_seq_len=s, head=head, num_codes=k, token_bias=token_bias,
                       positions=positions, norm=norm)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  hidden = int(ratio * d)
  norm_params = d if norm == "rms" else 2 * d
  block = 2 * norm_params + 3 * d * d + d * d + (d * hidden + hidden) + (hidden * d + d)
  head_params = (v * d if head == "dense" else k * d) + (v if token_bias else 0)
  positions_params = s * d if positions == "learned" else 0
  total = v * d + positions_params + depth * block + norm_params + head_params
  assert model.num_head_params == head_params
  assert model.num_params == total
  trainer = harness.build_trainer(
      harness.LMConfig(**dataclasses.asdict(config), seq_len=s, steps=1),
      mesh=harness.make_mesh(1, jax.devices()[:1]))
  assert (trainer.num_params, trainer.num_head_params) == (total, head_params)


# --- training, metrics and plots -----------------------------------------------------------------

def _repeating_batches(batch, seq_len, period=5, vocab=16):
  """Windows of a repeating sequence 0, 1, ..., period-1, 0, ... at step-dependent offsets."""
  def batch_fn(step):
    offsets = np.random.default_rng(step).integers(0, period, size=batch)
    return ((np.arange(seq_len + 1)[None] + offsets[:, None]) % period).astype(np.int32)
  return batch_fn


def test_training_reduces_loss_and_writes_metrics_and_plots(tmp_path, capsys):
  cfg = harness.LMConfig(steps=30, batch_size=4, seq_len=12, vocab_size=16, width=32, depth=1,
                         heads=2, learning_rate=1e-2, warmup_steps=3, eval_every=10,
                         eval_batches=2, checkpoint_every=0, out_dir=str(tmp_path / "run"),
                         progress=False)
  batch_fn = _repeating_batches(4, 12)
  result = harness.train(cfg, batch_fn, eval_batch_fn=lambda i: batch_fn(1000 + i),
                         mesh=harness.make_mesh(1, jax.devices()[:1]))
  losses = [r["loss"] for r in result.train_rows]
  assert [r["step"] for r in result.train_rows] == list(range(1, 31))
  assert losses[0] > 0.8 * math.log(16)  # starts near uniform
  assert losses[-1] < 0.2 * losses[0], losses  # learns the period-5 sequence
  assert [r["step"] for r in result.eval_rows] == [10, 20, 30]
  assert result.eval_rows[-1]["loss"] < 0.2 * losses[0]
  # The returned model holds the trained parameters.
  loss = nnx.jit(lambda model, tokens: model.loss(tokens))
  eval_loss = np.mean([loss(result.model, jnp.asarray(batch_fn(1000 + i))) for i in range(2)])
  np.testing.assert_allclose(eval_loss, result.eval_rows[-1]["loss"], rtol=1e-5)
  # lr follows warmup + cosine.
  lrs = [r["lr"] for r in result.train_rows]
  assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1e-2) and lrs[-1] < lrs[3]

  out = tmp_path / "run"
  rows = common.read_jsonl(out / "train.jsonl")
  assert [r["loss"] for r in rows] == losses
  assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "time"} <= set(rows[0])
  assert rows[-1]["tokens"] == 30 * 4 * 12 and rows[-1]["tokens_per_s"] > 0
  csv_lines = (out / "train.csv").read_text().splitlines()
  assert csv_lines[0].split(",")[:2] == ["step", "loss"] and len(csv_lines) == 31
  assert float(csv_lines[-1].split(",")[1]) == losses[-1]
  assert [r["step"] for r in common.read_jsonl(out / "eval.jsonl")] == [10, 20, 30]
  assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
  assert json.loads((out / "config.json").read_text())["width"] == 32
  summary = json.loads((out / "summary.json").read_text())
  assert summary["final_loss"] == losses[-1] and summary["head_params"] == 16 * 32
  assert "params" in capsys.readouterr().out


def test_common_writers(tmp_path):
  paths = common.write_table(tmp_path / "results.md", ["head", "loss"],
                             [["dense", 1.25], ["vq|k=4", 1.5]], png=True, title="Heads")
  assert [p.name for p in paths] == ["results.md", "results.csv", "results.png"]
  assert "| dense | 1.25 |" in paths[0].read_text() and "vq\\|k=4" in paths[0].read_text()
  assert paths[1].read_text().splitlines() == ["head,loss", "dense,1.25", "vq|k=4,1.5"]
  assert paths[2].read_bytes()[:8] == PNG_MAGIC
  png = common.plot_curves(tmp_path / "c.png", {"a": ([1, 2], [3.0, 2.0]), "b": ([], [])},
                           logy=True)
  assert png.read_bytes()[:8] == PNG_MAGIC
  # MetricsWriter: a resumed run keeps the rows up to its checkpoint, and a new key adds a column.
  with common.MetricsWriter(tmp_path, "m") as w:
    for step in range(1, 6):
      w.write({"step": step, "loss": np.float32(step / 2)})
  with open(tmp_path / "m.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a torn last line, as SIGKILL leaves
  with common.MetricsWriter(tmp_path, "m", keep_through_step=3) as w:
    w.write({"step": 4, "loss": 9.0, "extra": 1})
  assert common.read_jsonl(tmp_path / "m.jsonl") == [
      {"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.5},
      {"step": 4, "loss": 9.0, "extra": 1}]
  assert (tmp_path / "m.csv").read_text().splitlines() == [
      "step,loss,extra", "1,0.5,", "2,1.0,", "3,1.5,", "4,9.0,1"]


# --- 8 devices -----------------------------------------------------------------------------------

SHARDING_SCRIPT = textwrap.dedent(r"""
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec as P
  from experiments import harness

  assert jax.device_count() == 8, jax.devices()
  # V = 64 rows of the dense head: 32 per device of the "vocab" axis.
  cfg = harness.LMConfig(steps=3, batch_size=8, seq_len=8, vocab_size=64, width=16, depth=1,
                         heads=2, token_bias=True, warmup_steps=1, vocab_parallel=2)

  def run(mesh):
    trainer = harness.build_trainer(cfg, mesh=mesh)
    state, losses = trainer.init(), []
    for step in range(cfg.steps):
      tokens = np.random.default_rng(step).integers(0, 64, size=(8, 9)).astype(np.int32)
      batch = (harness.shard_batch(tokens, trainer.batch_sharding),)
      assert batch[0].sharding.spec == P("data", None)
      state, metrics = trainer.train_step(state, batch)
      losses.append(float(metrics["loss"]))
    return state, losses

  _, want = run(harness.make_mesh(1, jax.devices()[:1]))
  mesh = harness.make_mesh(cfg.vocab_parallel)
  assert mesh.axis_names == ("data", "vocab") and dict(mesh.shape) == {"data": 4, "vocab": 2}
  state, got = run(mesh)
  params = state["params"]
  assert params["head"]["weight"].sharding.spec == P("vocab", None)
  assert params["head"]["bias"].sharding.spec == P("vocab")
  assert {s.data.shape for s in params["head"]["weight"].addressable_shards} == {(32, 16)}
  assert state["opt_state"][1][0].mu["head"]["weight"].sharding.spec == P("vocab", None)
  assert params["embed"]["embedding"].sharding.is_fully_replicated
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert want[0] != want[-1]
  print("ok", want, got)
""")


def test_train_step_on_8_devices_matches_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  script = f"OUT = {str(tmp_path)!r}\n" + SHARDING_SCRIPT
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "ok" in proc.stdout


# --- exact resume after SIGKILL ------------------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent(r"""
  # A toy experiment module: python toy.py --preset tiny --out_dir=... [--sleep=...]
  import dataclasses
  import time

  import numpy as np

  from experiments import harness

  @dataclasses.dataclass(frozen=True)
  class Config(harness.LMConfig):
    sleep: float = 0.0   # seconds per batch, so that the test can kill the run midway

  PRESETS = {"tiny": dict(steps=24, batch_size=4, seq_len=8, vocab_size=32, width=16, depth=1,
                          heads=2, checkpoint_every=4, warmup_steps=2, progress=False,
                          plots=False)}

  def main():
    cfg = harness.parse_config(Config, PRESETS)
    def batch_fn(step):
      time.sleep(cfg.sleep)
      rng = np.random.default_rng([cfg.seed, step])
      return rng.integers(0, cfg.vocab_size, size=(cfg.batch_size, cfg.seq_len + 1),
                          dtype=np.int32)
    harness.train(cfg, batch_fn)

  main()
""")


def _launch(script, out_dir, *extra):
  # A compilation cache shared by the runs saves the later ones their compile time (the
  # executables are the same either way: XLA compiles deterministically).
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
             JAX_COMPILATION_CACHE_DIR=str(script.parent / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, str(script), "--preset", "tiny", f"--out_dir={out_dir}",
                           *extra], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_restart_resumes_bit_identically(tmp_path):
  script = tmp_path / "toy.py"
  script.write_text(RESUME_SCRIPT)
  reference = _launch(script, tmp_path / "reference")  # uninterrupted
  out_ref, _ = reference.communicate(timeout=120)
  assert reference.returncode == 0, out_ref
  assert "resumed" not in out_ref
  killed_dir = tmp_path / "killed"
  victim = _launch(script, killed_dir, "--sleep=0.1")
  # Wait until the run is past its second checkpoint (step 8; saves are synchronous, so a
  # logged step 10 means checkpoint 8 is complete), then SIGKILL it mid-run.
  deadline = time.monotonic() + 90
  while True:
    steps = [r["step"] for r in common.read_jsonl(killed_dir / "train.jsonl")]
    if steps and max(steps) >= 10:
      break
    assert victim.poll() is None, victim.stdout.read()
    assert time.monotonic() < deadline, "the run never reached step 10"
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=30)
  assert victim.returncode == -signal.SIGKILL
  logged_before = max(r["step"] for r in common.read_jsonl(killed_dir / "train.jsonl"))
  assert logged_before < 24, "the run finished before it was killed"
  checkpoints = sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints and 8 <= checkpoints[-1] <= logged_before, checkpoints

  # The same command again: it continues from the last checkpoint.
  restarted = _launch(script, killed_dir, "--sleep=0.1")
  out, _ = restarted.communicate(timeout=120)
  assert restarted.returncode == 0, out
  assert f"resumed from checkpoint step {checkpoints[-1]}" in out, out

  want = common.read_jsonl(tmp_path / "reference" / "train.jsonl")
  got = common.read_jsonl(killed_dir / "train.jsonl")
  assert [r["step"] for r in want] == list(range(1, 25))
  assert [r["step"] for r in got] == list(range(1, 25))  # no step lost or logged twice
  # Bit-identical losses (and gradient norms) from the checkpoint on, and before it.
  assert [r["loss"] for r in got] == [r["loss"] for r in want]
  assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
  assert want[-1]["loss"] != want[checkpoints[-1]]["loss"]  # the losses do change
