"""Helpers shared by the experiment modules: timing, compile-time memory, tables, metrics, plots."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import pathlib
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence

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


# --- files an experiment writes: metrics (JSON lines + CSV), tables (.md / .csv / .png), plots ---

def _plain(value):
  """A JSON / CSV friendly copy of ``value`` (numpy and jax scalars become Python numbers)."""
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    return value.item()
  return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The rows of a JSON-lines file (an absent file has none; a torn last line is skipped)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a process killed mid-write leaves a partial last line
      continue
  return rows


class MetricsWriter:
  """Appends metric rows to ``{out_dir}/{name}.jsonl`` and ``{out_dir}/{name}.csv``.

  Every row is flushed as it is written, so a killed run keeps what it logged.
  ``keep_through_step``: on open, drop the rows of an earlier run whose ``"step"``
  is greater (a run resumed from the checkpoint of step ``s`` logs steps ``s+1..``
  again); None starts both files afresh. The CSV's columns are the keys of the
  first row, in order; a row with a new key rewrites the CSV with that column added.

  Example:
    >>> import tempfile
    >>> with MetricsWriter(tempfile.mkdtemp(), "train") as w:
    ...   w.write({"step": 1, "loss": 2.5})
    >>> read_jsonl(w.jsonl_path)
    [{'step': 1, 'loss': 2.5}]
  """

  def __init__(self, out_dir: str | os.PathLike, name: str, *,
               keep_through_step: int | None = None):
    self.out_dir = pathlib.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = self.out_dir / f"{name}.jsonl"
    self.csv_path = self.out_dir / f"{name}.csv"
    kept = []
    if keep_through_step is not None:
      kept = [r for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= keep_through_step]
    self.rows: list[dict] = []
    self._columns: list[str] = []
    self._jsonl = open(self.jsonl_path, "w")  # noqa: SIM115 - closed in close()
    self._csv = None
    for row in kept:
      self.write(row)

  def _rewrite_csv(self):
    if self._csv is not None:
      self._csv.close()
    self._csv = open(self.csv_path, "w", newline="")  # noqa: SIM115
    writer = csv.DictWriter(self._csv, fieldnames=self._columns, restval="")
    writer.writeheader()
    writer.writerows(self.rows)
    self._csv.flush()

  def write(self, row: dict) -> None:
    row = {k: _plain(v) for k, v in row.items()}
    self.rows.append(row)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    new = [k for k in row if k not in self._columns]
    if new or self._csv is None:
      self._columns.extend(new)
      self._rewrite_csv()
    else:
      csv.DictWriter(self._csv, fieldnames=self._columns, restval="").writerow(row)
      self._csv.flush()

  def column(self, key: str) -> tuple[list, list]:
    """``(steps, values)`` of the rows that have ``key``."""
    rows = [r for r in self.rows if key in r]
    return [r.get("step") for r in rows], [r[key] for r in rows]

  def close(self) -> None:
    self._jsonl.close()
    if self._csv is not None:
      self._csv.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@contextlib.contextmanager
def _figure(path: str | os.PathLike, figsize: tuple[float, float], *, tight_layout: bool = True,
            **savefig_options):
  """Yields the axes of a new matplotlib figure, saved to ``path`` (PNG) and closed on exit."""
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on pods or CI
  import matplotlib.pyplot as plt
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=figsize, dpi=110)
  try:
    yield ax
    if tight_layout:
      fig.tight_layout()
    fig.savefig(path, **savefig_options)
  finally:
    plt.close(fig)


def plot_curves(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence, Sequence]], *,
                xlabel: str = "step", ylabel: str = "loss", title: str | None = None,
                logy: bool = False, markers: bool | Sequence[str] = False) -> pathlib.Path:
  """Writes a PNG of line plots: ``curves`` maps a legend label to ``(xs, ys)``.

  ``markers``: dots on every curve (True) or on the curves of these labels.
  Empty curves are skipped (a plot with no data still gets axes and a title).
  """
  with _figure(path, (7, 4.2)) as ax:
    for label, (xs, ys) in curves.items():
      dots = markers is True or (not isinstance(markers, bool) and label in markers)
      if len(xs):
        ax.plot(list(xs), list(ys), label=label, marker="o" if dots else None,
                markersize=3 if dots else None, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
      ax.set_yscale("log")
    if title:
      ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(len(xs) for xs, _ in curves.values()):
      ax.legend()
  return pathlib.Path(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
  def cells(row):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
  return "\n".join([cells(headers), "|" + "|".join("---" for _ in headers) + "|"]
                   + [cells(r) for r in rows]) + "\n"


def render_table_png(path: str | os.PathLike, headers: Sequence[str],
                     rows: Sequence[Sequence[object]], *, title: str | None = None) -> pathlib.Path:
  """Renders a results table to a PNG image with matplotlib."""
  text = [[str(c) for c in row] for row in rows]
  widths = [max([len(str(h))] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
  fig_w = min(max(3.0, 0.11 * sum(widths) + 0.4 * len(headers)), 30.0)
  fig_h = 0.6 + 0.3 * (len(rows) + 1) + (0.3 if title else 0.0)
  with _figure(path, (fig_w, fig_h), tight_layout=False, bbox_inches="tight",
               pad_inches=0.15) as ax:
    ax.axis("off")
    table_artist = ax.table(cellText=text or None, colLabels=list(map(str, headers)),
                            loc="center", cellLoc="right", colLoc="center",
                            colWidths=[w / sum(widths) for w in widths])
    table_artist.auto_set_font_size(False)
    table_artist.set_fontsize(9)
    for (r, _), cell in table_artist.get_celld().items():
      if r == 0:
        cell.set_text_props(weight="bold")
        cell.set_facecolor("#e8e8e8")
    if title:
      ax.set_title(title)
  return pathlib.Path(path)


def write_table(path: str | os.PathLike, headers: Sequence[str], rows: Sequence[Sequence[object]],
                *, png: bool = False, title: str | None = None) -> list[pathlib.Path]:
  """Writes a results table as ``{stem}.md`` and ``{stem}.csv`` (and ``{stem}.png`` with ``png``).

  ``path``'s suffix, if any, is replaced. Returns the paths written.
  """
  stem = pathlib.Path(path)
  stem = stem.with_suffix("") if stem.suffix in (".md", ".csv", ".png") else stem
  stem.parent.mkdir(parents=True, exist_ok=True)
  md, csv_path = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".csv")
  md.write_text((f"**{title}**\n\n" if title else "") + markdown_table(headers, rows))
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(headers)
    writer.writerows([[_plain(c) for c in row] for row in rows])
  written = [md, csv_path]
  if png:
    written.append(render_table_png(stem.with_name(stem.name + ".png"), headers, rows,
                                    title=title))
  return written


# --------------------------------------------------------------------------- --out-dir of the benchmarks

def add_out_dir_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default=None,
                      help="also write the tables (.md, .csv, .png), bar charts and meta.json "
                           "here (default: print only)")


def write_meta(out_dir: str | pathlib.Path, module: str, argv: Sequence[str] | None) -> None:
  """``meta.json``: the command, jax version, device and date of a benchmark run."""
  argv = list(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0]
  meta = {"command": " ".join([f"python -m {module}", *argv]), "jax": jax.__version__,
          "platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def plot_bars(path: str | pathlib.Path, groups: Sequence[str],
              series: Mapping[str, Sequence[float]], *, ylabel: str, title: str | None = None,
              logy: bool = False, fmt: str = "{:.3g}") -> pathlib.Path:
  """Writes a grouped bar chart PNG: one group per ``groups`` entry, one bar per series.

  ``series`` maps a legend label to one value per group; each bar is labelled with
  its value (``fmt``). ``logy`` for values that span orders of magnitude (memory).
  """
  width = 0.8 / max(len(series), 1)
  fig_width = max(5.0, 1.5 + 0.7 * len(groups) * len(series))
  with _figure(path, (fig_width, 4.2)) as ax:
    for i, (label, values) in enumerate(series.items()):
      xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
      bars = ax.bar(xs, list(values), width, label=label)
      ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    if logy:  # bars start at the decade below the smallest value, not at a clipped 0
      ax.set_yscale("log")
      positive = [v for values in series.values() for v in values if v > 0]
      if positive:
        ax.set_ylim(bottom=10 ** math.floor(math.log10(min(positive))))
    if title:
      ax.set_title(textwrap.fill(title, int(11 * fig_width)), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
  return pathlib.Path(path)


def write_outputs(out_dir: str | pathlib.Path, name: str, headers: Sequence[str],
                  rows: Sequence[Sequence[object]], title: str,
                  bars: dict | None = None) -> list[pathlib.Path]:
  """``{name}.md/.csv/.png`` of a printed table and, with ``bars`` (kwargs of
  :func:`plot_bars` without ``path`` and ``title``), ``{name}_bars.png``."""
  out_dir = pathlib.Path(out_dir)
  paths = write_table(out_dir / name, headers, rows, png=True, title=title)
  if bars is not None:
    paths.append(plot_bars(out_dir / f"{name}_bars.png", title=title, **bars))
  print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
  return paths


MIB = 1024 * 1024
