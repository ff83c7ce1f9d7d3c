"""The README's example runs, CI runs the README's test command, the benchmark prints its table."""

import pathlib
import re
import subprocess

import logitlab
from experiments import linear_ce_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands():
  first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
  assert first_block == [
      'pip install -e ".[experiments]" && python -m experiments.linear_ce_bench',
      'pip install -e ".[test]" && python -m pytest',
  ]


def test_ci_extracts_the_readme_test_command():
  script = (ROOT / ".ci/run").read_text()
  pattern = re.search(r"grep -m1 -E '(.*?)' README.md", script).group(1)
  found = subprocess.run(["grep", "-m1", "-E", pattern, "README.md"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
  assert found == 'pip install -e ".[test]" && python -m pytest'


def test_readme_python_examples_run(capsys):
  namespace = {}
  for block in re.findall(r"```python\n(.*?)```", README, re.S):
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
  assert "next-token loss" in capsys.readouterr().out


def test_public_api():
  assert sorted(logitlab.__all__) == sorted(
      ["cross_entropy", "softmax_cross_entropy", "kl_divergence", "linear_cross_entropy",
       "vocab_parallel_linear_cross_entropy",
       "distill", "linear_distillation",
       "debug_checks", "code_log_mass", "vq_code_logits", "vq_cross_entropy", "vq_scatter",
       "TeacherCodeMass", "vq_distillation_loss", "vq_log_probs", "vq_lse", "vq_segment_sum",
       "vq_teacher_code_mass", "vq_top_k", "codebook_from_assignment", "contiguous_assignment",
       "kmeans_assignment", "kmeans_plus_plus", "random_assignment", "reassign",
       "VQSamplerTables", "vq_log_probs_topk", "vq_sample", "vq_sampler_tables",
       "vq_sampling_probs"])
  for name in logitlab.__all__:
    assert getattr(logitlab, name).__doc__


def test_linear_ce_bench_prints_time_table(capsys):
  assert linear_ce_bench.main(["--skip-memory", "--n", "64", "--d", "16", "--v", "300",
                               "--repeats", "2", "--block-tokens", "32", "--block-vocab", "64"]) == 0
  out = capsys.readouterr().out
  row = re.search(r"N=64, D=16, V=300, float32" + r" \|\s*([\d.]+)" * 4, out)
  assert row, out
  matmul_ms, naive_ms, fused_ms, ratio = map(float, row.groups())
  assert matmul_ms > 0 and naive_ms > 0 and fused_ms > 0
  assert abs(ratio - fused_ms / naive_ms) <= 0.001 + 0.01 * ratio


def test_linear_ce_bench_heads_table(capsys, monkeypatch):
  monkeypatch.setattr(linear_ce_bench, "HEAD_SHAPES", {"tiny": (48, 16, 300)})
  assert linear_ce_bench.main(["--skip-memory", "--skip-time", "--heads", "--repeats", "1",
                               "--memory-dtype", "float32", "--block-vocab", "128"]) == 0
  out = capsys.readouterr().out
  rows = re.findall(r"tiny \|\s*(\w+) \|\s*([\d.]+) \|\s*([\d.]+) \|\s*([\d.]+ \w+)", out)
  assert [r[0] for r in rows] == ["naive", "xla", "auto"], out
  assert all(float(ms) > 0 for _, ms, _, _ in rows)


def test_vq_bench_prints_parameter_and_time_tables(capsys):
  from experiments import vq_bench
  assert vq_bench.main(["--n", "32", "--repeats", "1", "--shapes", "500:10:16,300:3:8"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"V=500, K=10, D=16 \|\s+8,000 \|\s+160 \|\s+98.00%", out), out
  rows = re.findall(r"V=300, K=3, D=8" + r" \|\s*([\d.]+)" * 5, out)
  assert len(rows) == 1 and all(float(x) >= 0 for x in rows[0])


def test_distill_bench_prints_memory_and_time_tables(capsys):
  from experiments import distill_bench
  assert distill_bench.main(["--n", "64", "--ds", "16", "--dt", "24", "--v", "300",
                             "--repeats", "2", "--memory-shape", "48,16,24,300",
                             "--memory-dtype", "float32", "--divergences", "kl,jsd",
                             "--block-tokens", "32", "--block-vocab", "64"]) == 0
  out = capsys.readouterr().out
  memory = re.findall(r"(\w+) \| N=48, D_s=16, D_t=24, V=300, float32 \|\s*([\d.]+) (\w+) \|"
                      r"\s*([\d.]+) (\w+) \|\s*([\d.]+)", out)
  assert [row[0] for row in memory] == ["kl", "jsd"], out
  times = re.findall(r"(\w+) \| N=64, D_s=16, D_t=24, V=300, float32" + r" \|\s*([\d.]+)" * 4, out)
  assert [row[0] for row in times] == ["kl", "jsd"], out
  # One forward pass for KL (3 D_s + 2 D_t), two for JSD (4 D_s + 3 D_t), naive 3 D_s + D_t.
  assert [row[4] for row in times] == ["1.33", "1.89"], out
  for _, naive_ms, fused_ms, ratio, _ in times:
    naive_ms, fused_ms, ratio = float(naive_ms), float(fused_ms), float(ratio)
    assert naive_ms > 0 and fused_ms > 0
    assert abs(ratio - fused_ms / naive_ms) <= 0.001 + 0.01 * ratio
