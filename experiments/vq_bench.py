"""VQ-Logits head against dense heads: output-layer parameters and fwd+bwd time.

  python -m experiments.vq_bench [--n 1024 --repeats 3 --token-bias]

For each (V, K, D) it times ``value_and_grad`` of the mean loss w.r.t. the
hidden states and the head's parameters, median of ``--repeats`` runs in one
process: the naive dense head (materialized ``[N, V]`` logits), the fused dense
head (``linear_cross_entropy``) and the VQ head (``vq_cross_entropy``, exact,
``O(N K + V)``), with the ratios dense / VQ.

``--out-dir DIR`` also writes both tables as ``DIR/{params,time}.{md,csv,png}``, bar
charts ``DIR/{params,time}_bars.png`` and ``DIR/meta.json`` (as ``linear_ce_bench``).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import tqdm

import logitlab
from experiments import common

SHAPES = ((256000, 2048, 2304), (128256, 1024, 4096))  # (V, K, D)


def losses():
  """The three heads' mean losses of (hidden, head parameter, labels, assignment, token_bias).

  The assignment is an argument, not a closed-over constant, as in a real model
  (a constant would let XLA fold the per-code counts at compile time).
  """
  def naive(hidden, weight, labels, assignment, token_bias):
    return logitlab.cross_entropy(hidden @ weight.T, labels).mean()

  def fused(hidden, weight, labels, assignment, token_bias):
    return logitlab.linear_cross_entropy(hidden, weight, labels).mean()

  def vq_head(hidden, codebook, labels, assignment, token_bias):
    return logitlab.vq_cross_entropy(hidden, codebook, assignment, labels,
                                     token_bias=token_bias).mean()

  return {"naive dense": naive, "linear_cross_entropy": fused, "vq_cross_entropy": vq_head}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1024, help="tokens (CPU-sized)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--token-bias", action="store_true", help="VQ head with a per-token bias")
  parser.add_argument("--shapes", default=",".join(f"{v}:{k}:{d}" for v, k, d in SHAPES),
                      help="comma-separated V:K:D")
  common.add_out_dir_argument(parser)
  args = parser.parse_args(argv)
  shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, N={args.n}, float32, "
        f"token_bias={args.token_bias}")

  param_rows, time_rows = [], []
  param_raw, time_raw = [], []  # unformatted values for the bar charts
  for v, k, d in tqdm.tqdm(shapes, desc="vq_bench", file=sys.stderr):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (args.n, d))
    weight = jax.random.normal(keys[1], (v, d)) * d**-0.5
    codebook = jax.random.normal(keys[2], (k, d)) * d**-0.5
    labels = jax.random.randint(keys[3], (args.n,), 0, v)
    assignment = jnp.arange(v) * k // v
    token_bias = jnp.zeros((v,)) if args.token_bias else None
    dense_params, vq_params = v * d, k * d + (v if args.token_bias else 0)
    param_rows.append([f"V={v}, K={k}, D={d}", f"{dense_params:,}", f"{vq_params:,}",
                       f"{100 * (1 - vq_params / dense_params):.2f}%"])
    param_raw.append((dense_params, vq_params))
    times = {}
    for name, loss in losses().items():
      head = codebook if name == "vq_cross_entropy" else weight
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      times[name] = common.median_seconds(
          lambda: step(hidden, head, labels, assignment, token_bias), args.repeats)
    vq_time = times["vq_cross_entropy"]
    time_rows.append([f"V={v}, K={k}, D={d}", *(f"{t * 1e3:.3f}" for t in times.values()),
                      f"{times['naive dense'] / vq_time:.1f}",
                      f"{times['linear_cross_entropy'] / vq_time:.1f}"])
    time_raw.append(times)

  groups = [f"V={v}, K={k}, D={d}" for v, k, d in shapes]
  tables = []
  headers, caption = ["shape", "dense", "VQ", "fewer"], "Output-layer parameters"
  print(f"\n{caption}")
  print(common.table(headers, param_rows))
  tables.append(("params", caption, headers, param_rows, dict(
      groups=groups, ylabel="output-layer parameters", logy=True, fmt="{:,.0f}",
      series={"dense": [d for d, _ in param_raw], "VQ": [q for _, q in param_raw]})))
  headers = ["shape", "naive dense", "linear_cross_entropy", "vq_cross_entropy", "naive/VQ",
             "fused/VQ"]
  caption = f"value_and_grad time (ms), median of {args.repeats} runs"
  print(f"\n{caption}")
  print(common.table(headers, time_rows))
  time_bars = dict(groups=groups, ylabel="time (ms)",
                   series={name: [t[name] * 1e3 for t in time_raw] for name in losses()})
  tables.append(("time", f"{caption}, N={args.n}, float32, token_bias={args.token_bias}",
                 headers, time_rows, time_bars))
  if args.out_dir is not None:
    common.write_meta(args.out_dir, "experiments.vq_bench", argv)
    for name, caption, headers, rows, bars in tables:
      common.write_outputs(args.out_dir, name, headers, rows, caption, bars)
  return 0


if __name__ == "__main__":
  sys.exit(main())
