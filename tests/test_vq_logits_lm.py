"""experiments.vq_logits_lm: variants, config checks, model init, a micro end-to-end run."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import harness
from experiments import vq_logits_lm as exp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
V, D = 300, 16  # the micro run's vocabulary (BPE of 300 on 30 stdlib files) and width
VARIANTS = ("dense", "vq8", "vq16+bias", "vq16:contiguous")
MICRO = ["--preset=tiny", "--max_files=30", "--val_fraction=0.2", f"--vocab_size={V}",
         f"--width={D}", "--depth=1", "--heads=2", "--seq_len=16", "--batch_size=4", "--steps=4",
         "--warmup_steps=1", "--eval_every=2", "--eval_batches=2", "--bench_repeats=2",
         "--kmeans_iterations=5", "--progress=false", "--plots=false",
         f"--variants={','.join(VARIANTS)}"]


# --- variants and config -------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("dense", ("dense", None, False, None)),
    ("dense+bias", ("dense", None, True, None)),
    ("vq256", ("vq", 256, False, "kmeans")),
    ("vq64:kmeans+bias", ("vq", 64, True, "kmeans")),
    ("vq1024:contiguous", ("vq", 1024, False, "contiguous")),
    (" vq8:random+bias ", ("vq", 8, True, "random")),
])
def test_parse_variant(text, want):
  v = exp.parse_variant(text)
  assert (v.head, v.num_codes, v.token_bias, v.assignment) == want
  assert v.name == text.strip() and ":" not in v.dirname


@pytest.mark.parametrize("text", ["", "vq", "vq0", "vq-3", "dense:kmeans", "vq8:learned",
                                  "vq8+bias:random", "VQ8", "dense+biased", "vq8 +bias"])
def test_parse_variant_rejects(text):
  with pytest.raises(ValueError, match="bad variant"):
    exp.parse_variant(text)


@pytest.mark.parametrize("argv, match", [
    (["--head=vq"], r"--head is set per variant by --variants"),
    (["--token_bias"], r"--token_bias is set per variant"),
    (["--num_codes=8"], r"--num_codes is set per variant"),
    (["--variants=vq8:contiguous"], r"needs a dense variant"),
    (["--variants=dense+bias,vq8"], r"k-means variants cluster the trained plain `dense` head"),
    (["--variants=dense,vq8,vq8"], r"repeats a name"),
    (["--variants=dense,vq9000"], r"K=9000 exceeds vocab_size=8192"),
    (["--variants=dense,vq8:nearest"], r"bad variant 'vq8:nearest'"),
    (["--bench_repeats=0"], r"`bench_repeats`"),
])
def test_config_errors_name_the_problem(argv, match):
  with pytest.raises(harness.ConfigError, match=match):
    harness.parse_config(exp.Config, exp.PRESETS, argv, default_preset="tiny",
                         exit_on_error=False)


def test_presets_parse_and_help_documents_them(capsys):
  for name in ("tiny", "small", "pod"):
    cfg = harness.parse_config(exp.Config, exp.PRESETS, [f"--preset={name}"], exit_on_error=False)
    assert cfg.out_dir == f"runs/vq_logits_lm/{name}"
    assert [v.head for v in cfg.parsed_variants][0] == "dense"
  pod = harness.parse_config(exp.Config, exp.PRESETS, ["--preset=pod"], exit_on_error=False)
  assert (pod.corpus, pod.vocab_size, pod.vocab_parallel) == ("lm1b", 32768, 4)
  # Without --preset: tiny.
  assert harness.parse_config(exp.Config, exp.PRESETS, [], default_preset="tiny",
                              exit_on_error=False).width == exp.PRESETS["tiny"]["width"]
  with pytest.raises(SystemExit) as exit_info:
    exp.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "usage: python -m experiments.vq_logits_lm" in out
  for name in ("tiny", "small", "pod"):
    assert f"  {name}: " in out
  assert "--variants (tuple[str, ...], default ('dense', 'vq64', 'vq256', 'vq256+bias'" in out
  assert "vq<K>:contiguous" in out and "speedup_vs_dense" in out


def test_model_fn_sets_the_head_and_keeps_the_trunk_initialization():
  cfg = harness.parse_config(exp.Config, exp.PRESETS, MICRO, exit_on_error=False)
  dense_cfg = exp.lm_config(cfg, exp.parse_variant("dense"), V)
  vq_cfg = exp.lm_config(cfg, exp.parse_variant("vq8+bias"), V)
  assert (vq_cfg.head, vq_cfg.num_codes, vq_cfg.token_bias, vq_cfg.vocab_size) == ("vq", 8, True, V)
  assert vq_cfg.out_dir.endswith("vq8+bias") and dense_cfg.head == "dense"
  rng = np.random.default_rng(0)
  assignment = rng.integers(0, 8, V).astype(np.int32)
  codebook = rng.standard_normal((8, D)).astype(np.float32)
  bias = rng.standard_normal(V).astype(np.float32)
  vq = exp.model_fn(vq_cfg, assignment=assignment, codebook=codebook, bias=bias)(nnx.Rngs(cfg.seed))
  dense = exp.model_fn(dense_cfg)(nnx.Rngs(cfg.seed))
  np.testing.assert_array_equal(vq.head.codebook[...], codebook)
  np.testing.assert_array_equal(vq.head.assignment[...], assignment)
  np.testing.assert_array_equal(vq.head.token_bias[...], bias)
  dense_bias_cfg = exp.lm_config(cfg, exp.parse_variant("dense+bias"), V)
  dense_bias = exp.model_fn(dense_bias_cfg, bias=bias)(nnx.Rngs(cfg.seed))
  np.testing.assert_array_equal(dense_bias.head.bias[...], bias)
  np.testing.assert_array_equal(dense_bias.head.weight[...], dense.head.weight[...])
  # Same seed, same trunk: every variant starts from the same initialization.
  dense_trunk = {k: x for k, x in nnx.to_flat_state(nnx.state(dense, nnx.Param)) if k[0] != "head"}
  vq_trunk = {k: x for k, x in nnx.to_flat_state(nnx.state(vq, nnx.Param)) if k[0] != "head"}
  assert dense_trunk.keys() == vq_trunk.keys() and len(dense_trunk) > 5
  for k in dense_trunk:
    np.testing.assert_array_equal(dense_trunk[k][...], vq_trunk[k][...], err_msg=str(k))


def test_assignment_baselines_are_balanced_and_kmeans_clusters():
  cfg = harness.parse_config(exp.Config, exp.PRESETS, MICRO, exit_on_error=False)
  contiguous, codebook = exp.make_assignment(exp.parse_variant("vq16:contiguous"), V,
                                             dense_weight=None, cfg=cfg)
  assert codebook is None and np.all(np.diff(contiguous) >= 0)
  assert np.bincount(contiguous, minlength=16).max() == math.ceil(V / 16)
  random, _ = exp.make_assignment(exp.parse_variant("vq16:random"), V, dense_weight=None, cfg=cfg)
  assert sorted(np.bincount(random, minlength=16)) == sorted(np.bincount(contiguous, minlength=16))
  assert not np.array_equal(random, contiguous)
  # Four tight, far-apart groups of rows: k-means with K=4 recovers them exactly.
  group = np.arange(40) % 4
  weight = (10.0 * np.eye(4, D)[group] + 0.01 * np.random.default_rng(1).standard_normal((40, D))
            ).astype(np.float32)
  assignment, centroids = exp.make_assignment(exp.parse_variant("vq4"), 40, dense_weight=weight,
                                              cfg=cfg)
  assert centroids.shape == (4, D)
  for g in range(4):
    assert len(set(assignment[group == g].tolist())) == 1
  assert len(set(assignment.tolist())) == 4
  np.testing.assert_allclose(centroids[assignment], weight, atol=0.05)


def test_unigram_log_prior_is_the_smoothed_token_distribution():
  cfg = harness.parse_config(exp.Config, exp.PRESETS, MICRO, exit_on_error=False)
  train = np.array([0, 2, 2, 2, 3, 3], np.uint16)
  dataset = exp.data_lib.TokenData(train, train[:2], tokenizer=None)
  prior = exp.unigram_log_prior(dataset, cfg, 5)
  assert prior.dtype == np.float32 and prior.shape == (5,)
  np.testing.assert_allclose(np.exp(prior), np.array([2, 1, 4, 3, 1]) / 11, rtol=1e-6)


# --- a micro end-to-end run ----------------------------------------------------------------------

def _parse_printed_table(text: str) -> tuple[list[str], list[list[str]]]:
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split("|")[0].strip() == "variant")
  headers = [c.strip() for c in lines[start].split("|")]
  rows = []
  for line in lines[start + 2:]:
    if " | " not in line:
      break
    rows.append([c.strip() for c in line.split("|")])
  return headers, rows


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("vq_logits_lm")
  out_dir = root / "out"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = exp.main([*MICRO, f"--cache_dir={root / 'cache'}", f"--out_dir={out_dir}"])
  assert code == 0
  return out_dir, stdout.getvalue()


def test_micro_run_table(micro_run):
  out_dir, printed = micro_run
  headers, rows = _parse_printed_table(printed)
  assert headers == list(exp.HEADERS)
  assert [r[0] for r in rows] == list(VARIANTS)
  # The same cells in the printed table, the CSV and the Markdown file.
  with open(out_dir / "results.csv", newline="") as f:
    csv_rows = list(csv.reader(f))
  assert csv_rows[0] == headers and csv_rows[1:] == rows
  md_rows = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in (out_dir / "results.md").read_text().splitlines() if line.startswith("| ")]
  assert md_rows[0] == headers and md_rows[1:] == rows

  col = {name: [r[headers.index(name)] for r in rows] for name in headers}
  # Output-layer parameters, exactly: V D dense, K D VQ, + V with the token bias.
  assert col["head_params"] == [str(V * D), str(8 * D), str(16 * D + V), str(16 * D)]
  assert col["head"] == ["dense", "vq", "vq", "vq"]
  assert col["K"] == ["-", "8", "16", "16"]
  assert col["token_bias"] == ["no", "no", "unigram", "no"]
  assert col["assignment"] == ["-", "kmeans", "kmeans", "contiguous"]
  for params, fewer in zip(col["head_params"], col["fewer_params_pct"]):
    assert fewer == f"{100 * (1 - int(params) / (V * D)):.2f}"
  assert col["speedup_vs_dense"][0] == "1.00" and col["ppl_change_pct"][0] == "+0.00"
  ms = [float(x) for x in col["head_ms"]]
  assert all(t > 0 for t in ms)
  for t, speedup in zip(ms, col["speedup_vs_dense"]):
    assert float(speedup) == pytest.approx(ms[0] / t, rel=0.02, abs=0.01)
  loss = [float(x) for x in col["val_loss"]]
  ppl = [float(x) for x in col["val_ppl"]]
  for l, p, change in zip(loss, ppl, col["ppl_change_pct"]):
    assert math.isfinite(p) and 1.0 < p < 10 * V  # barely trained: near the uniform V
    assert p == pytest.approx(math.exp(l), rel=1e-3)
    assert float(change) == pytest.approx(100 * (p / ppl[0] - 1), abs=0.02)


def test_micro_run_records_and_files(micro_run):
  out_dir, printed = micro_run
  summary = json.loads((out_dir / "results.json").read_text())
  assert summary["vocab_size"] == V and summary["reference"] == "dense"
  assert summary["command"].startswith("python -m experiments.vq_logits_lm --preset=tiny ")
  assert summary["jax"] == jax.__version__ and summary["date"] and summary["device_kind"]
  meta = json.loads((out_dir / "meta.json").read_text())
  assert meta == {k: summary[k] for k in meta} and set(meta) >= {"command", "jax", "date"}
  assert summary["bench_tokens"] == 4 * 16 and summary["val_batches"] == 2
  records = {r["variant"]: r for r in summary["variants"]}
  assert list(records) == list(VARIANTS)
  dense = records["dense"]
  for r in records.values():
    assert r["speedup_vs_dense"] == pytest.approx(dense["head_ms"] / r["head_ms"])
    assert r["speedup_vs_naive"] == pytest.approx(summary["naive_dense_ms"] / r["head_ms"])
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert [step for step, _ in r["eval_curve"]] == [2, 4]  # --eval_every=2, --steps=4
    assert r["eval_curve"][-1][1] == r["val_loss"]
  assert 0 < summary["unigram_val_loss"] < 2 * math.log(V)
  assert f"unigram's validation loss {summary['unigram_val_loss']:.4f}" in printed
  saved = np.load(out_dir / "assignments.npz")
  assert sorted(saved.files) == ["vq16+bias", "vq16-contiguous", "vq8"]
  q, r = divmod(V, 16)  # numpy.array_split's bucket sizes, in token order
  np.testing.assert_array_equal(saved["vq16-contiguous"],
                                np.repeat(np.arange(16), [q + 1] * r + [q] * (16 - r)))
  assert saved["vq8"].shape == saved["vq16+bias"].shape == (V,)
  assert 0 <= saved["vq8"].min() and saved["vq8"].max() < 8
  assert 0 <= saved["vq16+bias"].min() and saved["vq16+bias"].max() < 16
  # Assignments: the contiguous one has equal buckets; k-means uses at most K codes.
  assert records["vq16:contiguous"]["largest_bucket"] == math.ceil(V / 16)
  assert records["vq16:contiguous"]["codes_used"] == 16
  assert 1 <= records["vq8"]["codes_used"] <= 8
  assert records["vq16+bias"]["params"] - records["vq16:contiguous"]["params"] == V
  for name in ("results.md", "results.csv", "results.png", "val_loss.png", "train_loss.png"):
    assert (out_dir / name).stat().st_size > 0, name
  for name in ("results.png", "val_loss.png", "train_loss.png"):
    assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC, name
  for v in VARIANTS:  # one harness run directory per variant
    run = out_dir / exp.parse_variant(v).dirname
    assert [row["step"] for row in map(json.loads, (run / "eval.jsonl").read_text().splitlines())
            ] == [2, 4]
    assert json.loads((run / "config.json").read_text())["head"] == ("dense" if v == "dense"
                                                                      else "vq")
  assert "99% fewer output-layer parameters" in printed
