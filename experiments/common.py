"""Helpers shared by the experiment modules: timing, compile-time memory, tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of ``fn()`` (blocked until ready) over ``repeats`` runs after a warm-up."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def temp_bytes(fn: Callable, *shapes: jax.ShapeDtypeStruct) -> int:
  """Compile-time scratch memory of ``jax.jit(fn)`` at ``shapes`` (compiles, runs nothing)."""
  compiled = jax.jit(fn).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  raise AssertionError


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A plain-text table with right-aligned columns."""
  cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)
