"""Fused linear distillation against the materialized (naive) form: memory and time.

  python -m experiments.distill_bench [--n 2048 --ds 512 --dt 1024 --v 32768 --dtype float32]

(a) Compile-time scratch memory (``memory_analysis().temp_size_in_bytes``; compiled,
    never run) of ``value_and_grad`` w.r.t. the student's hidden states and weight
    of the mean loss, at ``--memory-shape`` (default: a Llama-3 head distilled into a
    smaller student, N=8192, D_s=2048, D_t=4096, V=128256) in ``--memory-dtype``.
(b) Measured fwd+bwd time of the same function at a CPU-sized shape, median of
    ``--repeats`` runs in one process, and the ratio fused / naive.

Naive: both models' logits materialized, the divergence from
:mod:`logitlab.distill.divergences`, gradients by autodiff. Fused:
:func:`logitlab.distill.linear.linear_distillation`. FLOPs per step, naive
``2N(3 D_s + D_t)V``; fused ``2N(4 D_s + 3 D_t)V`` (two forward passes over the
vocabulary, the backward recomputes both models' logits), or ``2N(3 D_s + 2 D_t)V``
for the plain KLs, whose forward takes one pass.

``--out-dir DIR`` also writes both tables as ``DIR/{memory,time}.{md,csv,png}``, bar
charts ``DIR/{memory,time}_bars.png`` (per divergence, naive against fused) and
``DIR/meta.json`` (as ``linear_ce_bench``).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import tqdm

from experiments import common
from logitlab import distill
from logitlab.distill.linear import linear_distillation

NAIVE = {"kl": distill.kl_divergence, "reverse_kl": distill.reverse_kl,
         "jsd": distill.generalized_jsd, "skew_kl": distill.skew_kl,
         "skew_reverse_kl": distill.skew_reverse_kl, "tv": distill.total_variation}


def naive_loss(divergence):
  def loss(hs, ws, ht, wt):
    return NAIVE[divergence](hs @ ws.T, ht @ wt.T).mean()
  return loss


def fused_loss(divergence, args):
  def loss(hs, ws, ht, wt):
    return linear_distillation(hs, ws, ht, wt, divergence=divergence,
                               block_tokens=args.block_tokens, block_vocab=args.block_vocab).mean()
  return loss


def value_and_grad(loss):
  return jax.value_and_grad(loss, argnums=(0, 1))


def shape_structs(n, ds, dt, v, dtype):
  return tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in ((n, ds), (v, ds), (n, dt), (v, dt)))


def random_inputs(n, ds, dt, v, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  def normal(key, shape, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)
  return (normal(keys[0], (n, ds)), normal(keys[1], (v, ds), ds**-0.5),
          normal(keys[2], (n, dt)), normal(keys[3], (v, dt), dt**-0.5))


def shape_arg(text: str) -> tuple[int, int, int, int]:
  parts = tuple(int(p) for p in text.split(","))
  if len(parts) != 4:
    raise argparse.ArgumentTypeError(f"expected N,D_s,D_t,V, got {text!r}")
  return parts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048, help="tokens for the timing run")
  parser.add_argument("--ds", type=int, default=512, help="student hidden size (timing)")
  parser.add_argument("--dt", type=int, default=1024, help="teacher hidden size (timing)")
  parser.add_argument("--v", type=int, default=32768, help="vocabulary (timing)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--memory-shape", type=shape_arg, default=(8192, 2048, 4096, 128256),
                      help="N,D_s,D_t,V of the compile-only memory table")
  parser.add_argument("--memory-dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--divergences", default="kl,jsd",
                      help=f"comma-separated, from {','.join(NAIVE)}")
  parser.add_argument("--block-tokens", type=int, default=None)
  parser.add_argument("--block-vocab", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--skip-time", action="store_true")
  common.add_out_dir_argument(parser)
  args = parser.parse_args(argv)
  divergences = args.divergences.split(",")
  unknown = sorted(set(divergences) - set(NAIVE))
  if unknown:
    parser.error(f"unknown divergence(s) {unknown}; choose from {list(NAIVE)}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")

  steps = ([] if args.skip_memory else [("memory", d) for d in divergences]) + (
      [] if args.skip_time else [("time", d) for d in divergences])
  memory_rows, time_rows = [], []
  memory_raw, time_raw = [], []  # (divergence, naive, fused) unformatted, for the bar charts
  for kind, divergence in tqdm.tqdm(steps, desc="distill_bench", file=sys.stderr):
    naive, fused = naive_loss(divergence), fused_loss(divergence, args)
    if kind == "memory":
      n, ds, dt, v = args.memory_shape
      structs = shape_structs(n, ds, dt, v, jnp.dtype(args.memory_dtype))
      naive_bytes = common.temp_bytes(value_and_grad(naive), *structs)
      fused_bytes = common.temp_bytes(value_and_grad(fused), *structs)
      memory_rows.append([divergence, f"N={n}, D_s={ds}, D_t={dt}, V={v}, {args.memory_dtype}",
                          common.format_bytes(naive_bytes), common.format_bytes(fused_bytes),
                          f"{fused_bytes / naive_bytes:.4f}"])
      memory_raw.append((divergence, naive_bytes / common.MIB, fused_bytes / common.MIB))
    else:
      inputs = random_inputs(args.n, args.ds, args.dt, args.v, jnp.dtype(args.dtype))
      naive_fn, fused_fn = jax.jit(value_and_grad(naive)), jax.jit(value_and_grad(fused))
      t_naive, t_fused = (common.median_seconds(lambda: f(*inputs), args.repeats)
                          for f in (naive_fn, fused_fn))
      passes = 1 if distill.divergences.plain_kl(divergence) else 2
      flops = ((2 + passes) * args.ds + (1 + passes) * args.dt) / (3 * args.ds + args.dt)
      time_rows.append([divergence, f"N={args.n}, D_s={args.ds}, D_t={args.dt}, V={args.v}, "
                        f"{args.dtype}", f"{t_naive * 1e3:.3f}", f"{t_fused * 1e3:.3f}",
                        f"{t_fused / t_naive:.3f}", f"{flops:.2f}"])
      time_raw.append((divergence, t_naive * 1e3, t_fused * 1e3))

  def bars(raw, ylabel, logy):
    return dict(groups=[d for d, _, _ in raw], ylabel=ylabel, logy=logy,
                series={"naive": [n for _, n, _ in raw], "fused": [f for _, _, f in raw]})

  tables = []
  if memory_rows:
    headers = ["divergence", "shape", "naive", "fused", "fused/naive"]
    caption = "(a) value_and_grad (student hidden, weight) temp memory, compile only"
    print(f"\n{caption}")
    print(common.table(headers, memory_rows))
    tables.append(("memory", f"{caption}, {memory_rows[0][1]}", headers, memory_rows,
                   bars(memory_raw, "temp memory (MiB)", logy=True)))
  if time_rows:
    headers = ["divergence", "shape", "naive", "fused", "fused/naive", "FLOPs fused/naive"]
    caption = f"(b) value_and_grad time, median of {args.repeats} runs (ms)"
    print(f"\n{caption}")
    print(common.table(headers, time_rows))
    tables.append(("time", f"{caption}, {time_rows[0][1]}", headers, time_rows,
                   bars(time_raw, "time (ms)", logy=False)))
  if args.out_dir is not None:
    common.write_meta(args.out_dir, "experiments.distill_bench", argv)
    for name, caption, headers, rows, chart in tables:
      common.write_outputs(args.out_dir, name, headers, rows, caption, chart)
  return 0


if __name__ == "__main__":
  sys.exit(main())
