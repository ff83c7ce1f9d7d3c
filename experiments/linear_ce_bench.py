"""Fused linear cross-entropy against the materialized (naive) form: memory and time.

  python -m experiments.linear_ce_bench [--n 4096 --d 1024 --v 32768 --dtype float32]

(a) Compile-time scratch memory (``memory_analysis().temp_size_in_bytes``; compiled,
    never run) of ``value_and_grad`` w.r.t. hidden and weight of the mean loss, at the
    Gemma-2-2B and Llama-3-8B head shapes in bf16.
(b) Measured fwd+bwd time of the same function at a CPU-sized shape, median of
    ``--repeats`` runs in one process, and the ratio logitlab / naive, beside the
    time of one plain ``N x D x V`` matmul as the unit of work.

``--out-dir DIR`` also writes each table as ``DIR/<table>.{md,csv,png}`` (the
experiments' :func:`experiments.common.write_table` format), a bar chart of it as
``DIR/<table>_bars.png``, and ``DIR/meta.json`` (command, jax, device, date). The
tables: ``memory`` (a), ``time`` (b), ``heads`` (c).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import tqdm

import logitlab
from experiments import common

HEAD_SHAPES = {  # name: (N tokens, D hidden, V vocabulary)
    "Gemma-2-2B": (8192, 2304, 256000),
    "Llama-3-8B": (8192, 4096, 128256),
}


def naive_loss(hidden, weight, labels):
  return logitlab.cross_entropy(hidden @ weight.T, labels).mean()


def fused_loss(args, impl=None):
  def loss(hidden, weight, labels):
    return logitlab.linear_cross_entropy(
        hidden, weight, labels, impl=impl or args.impl, block_tokens=args.block_tokens,
        block_vocab=args.block_vocab, filter_eps=args.filter_eps).mean()
  return loss


def value_and_grad(loss):
  return jax.value_and_grad(loss, argnums=(0, 1))


def shape_structs(n, d, v, dtype):
  return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype),
          jax.ShapeDtypeStruct((n,), jnp.int32))


def random_inputs(n, d, v, dtype, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (n, d), dtype)
  weight = (jax.random.normal(k2, (v, d), jnp.float32) / d**0.5).astype(dtype)
  return hidden, weight, jax.random.randint(k3, (n,), 0, v)


def time_head(name, args):
  """Rows of (c): naive, the XLA streaming path and ``--impl`` at one head shape."""
  n, d, v = HEAD_SHAPES[name]
  dtype = jnp.dtype(args.memory_dtype)
  inputs = random_inputs(n, d, v, dtype)
  impls = [("naive", naive_loss), ("xla", fused_loss(args, "xla"))]
  if args.impl != "xla":
    impls.append((args.impl, fused_loss(args)))
  rows = []
  for label, loss in impls:
    step = jax.jit(value_and_grad(loss))
    seconds = common.median_seconds(lambda: step(*inputs), args.repeats)
    memory = common.temp_bytes(value_and_grad(loss), *shape_structs(n, d, v, dtype))
    rows.append([name, label, f"{seconds * 1e3:.2f}", f"{8 * n * d * v / seconds / 1e12:.1f}",
                 common.format_bytes(memory)])
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4096, help="tokens for the timing run")
  parser.add_argument("--d", type=int, default=1024, help="hidden size for the timing run")
  parser.add_argument("--v", type=int, default=32768, help="vocabulary for the timing run")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--memory-dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--impl", default="auto", choices=list(logitlab.linear.IMPLEMENTATIONS))
  parser.add_argument("--block-tokens", type=int, default=None)
  parser.add_argument("--block-vocab", type=int, default=None)
  parser.add_argument("--filter-eps", type=float, default=None,
                      help="gradient filtering threshold (approximate; off by default)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--skip-time", action="store_true")
  parser.add_argument("--heads", action="store_true",
                      help="(c) on an accelerator: time naive, xla and --impl at the head shapes "
                           "in --memory-dtype, with effective TFLOP/s (8NDV / time)")
  common.add_out_dir_argument(parser)
  args = parser.parse_args(argv)
  fused = fused_loss(args)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"impl={args.impl}, filter_eps={args.filter_eps}")

  steps = ([] if args.skip_memory else [("memory", name) for name in HEAD_SHAPES]) + (
      [] if args.skip_time else [("time", None)]) + (
      [("heads", name) for name in HEAD_SHAPES] if args.heads else [])
  memory_rows, time_rows, head_rows = [], [], []
  memory_raw, time_raw = [], []  # unformatted values for the bar charts
  for kind, name in tqdm.tqdm(steps, desc="linear_ce_bench", file=sys.stderr):
    if kind == "memory":
      n, d, v = HEAD_SHAPES[name]
      structs = shape_structs(n, d, v, jnp.dtype(args.memory_dtype))
      naive = common.temp_bytes(value_and_grad(naive_loss), *structs)
      ours = common.temp_bytes(value_and_grad(fused), *structs)
      memory_rows.append([f"{name} (N={n}, D={d}, V={v}, {args.memory_dtype})",
                          common.format_bytes(naive), common.format_bytes(ours),
                          f"{ours / naive:.4f}"])
      memory_raw.append((name, naive, ours))
    elif kind == "time":
      inputs = random_inputs(args.n, args.d, args.v, jnp.dtype(args.dtype))
      matmul = jax.jit(lambda h, w, y: h @ w.T)
      naive_fn, fused_fn = jax.jit(value_and_grad(naive_loss)), jax.jit(value_and_grad(fused))
      t_matmul, t_naive, t_fused = (common.median_seconds(lambda: f(*inputs), args.repeats)
                                    for f in (matmul, naive_fn, fused_fn))
      time_rows.append([f"N={args.n}, D={args.d}, V={args.v}, {args.dtype}",
                        f"{t_matmul * 1e3:.3f}", f"{t_naive * 1e3:.3f}", f"{t_fused * 1e3:.3f}",
                        f"{t_fused / t_naive:.3f}"])
      time_raw.append((t_matmul, t_naive, t_fused))
    else:
      head_rows += time_head(name, args)

  tables = []  # (file name, caption, headers, rows, bar chart)
  if memory_rows:
    headers = ["head shape", "naive", "logitlab", "ratio"]
    caption = "(a) value_and_grad temp memory, compile only"
    print(f"\n{caption}")
    print(common.table(headers, memory_rows))
    tables.append(("memory", caption, headers, memory_rows, dict(
        groups=[name for name, _, _ in memory_raw], ylabel="temp memory (MiB)", logy=True,
        series={"naive": [n / common.MIB for _, n, _ in memory_raw],
                "logitlab": [o / common.MIB for _, _, o in memory_raw]})))
  if head_rows:
    headers = ["head shape", "implementation", "time (ms)", "eff. TFLOP/s", "temp memory"]
    caption = (f"(c) value_and_grad at the head shapes, {args.memory_dtype}, median of "
               f"{args.repeats} runs; effective TFLOP/s = 8*N*D*V / time")
    print(f"\n{caption}")
    print(common.table(headers, head_rows))
    names = list(dict.fromkeys(row[0] for row in head_rows))
    impls = list(dict.fromkeys(row[1] for row in head_rows))
    ms = {(row[0], row[1]): float(row[2]) for row in head_rows}
    tables.append(("heads", caption, headers, head_rows, dict(
        groups=names, ylabel="time (ms)",
        series={impl: [ms[name, impl] for name in names] for impl in impls})))
  if time_rows:
    headers = ["shape", "one matmul", "naive", "logitlab", "logitlab/naive"]
    caption = (f"(b) value_and_grad time, median of {args.repeats} runs (ms); one N x D x V "
               "matmul for scale (naive does 3 of them, logitlab 4: 6NDV vs 8NDV FLOPs)")
    print(f"\n{caption}")
    print(common.table(headers, time_rows))
    tables.append(("time", caption, headers, time_rows, dict(
        groups=[row[0] for row in time_rows], ylabel="time (ms)",
        series={label: [t[i] * 1e3 for t in time_raw]
                for i, label in enumerate(["one matmul", "naive", "logitlab"])})))
  if args.out_dir is not None:
    common.write_meta(args.out_dir, "experiments.linear_ce_bench", argv)
    for name, caption, headers, rows, bars in tables:
      common.write_outputs(args.out_dir, name, headers, rows, caption, bars)
  return 0


if __name__ == "__main__":
  sys.exit(main())
