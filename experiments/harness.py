"""The harness every training experiment runs on: CLI, mesh, train loop, checkpoints, metrics.

An experiment module follows one pattern and runs unchanged on a laptop CPU and a pod::

  python -m experiments.<name> --preset tiny|small|pod --key=value ... [--distributed]

  @dataclasses.dataclass(frozen=True)
  class Config(harness.LMConfig):          # model + training fields, plus the experiment's own
    corpus: str = "synthetic"

  PRESETS = {"tiny": dict(steps=50, width=32), "small": dict(...), "pod": dict(...)}

  def main(argv=None) -> int:
    cfg = harness.parse_config(Config, PRESETS, argv, description=__doc__)
    result = harness.train(cfg, batch_fn=lambda step: ...)   # int32 [B, S+1], a function of step
    ...

* Config: a frozen dataclass; a preset is a dict of field overrides; ``--key=value``
  (or ``--key value``; ``--flag`` for a bool) overrides any field with type
  conversion (int, float, bool, str, ``X | None``, tuples as ``1,2,3``); unknown keys
  and bad values are errors that name them; ``--help`` lists every field with its
  default and help text, and the presets.
* Scale: a ``("data", "vocab")`` :class:`jax.sharding.Mesh` over all devices (the
  vocab axis size is ``--vocab_parallel``); the batch is sharded over ``"data"``,
  parameters are replicated except those a pluggable ``param_spec`` shards (by
  default the dense head's ``weight[V, D]`` / ``bias[V]`` on their vocabulary axis
  over ``"vocab"``); the optimizer state follows its parameters. Plain ``jax.jit``
  with explicit shardings (GSPMD). ``--distributed`` calls
  :func:`jax.distributed.initialize` as soon as the config is parsed (multi-host pods).
* Training: optax AdamW with linear warmup and cosine decay, global-norm
  clipping; one jitted step with the train state donated; an eval step.
  ``batch_fn(step)`` returns the GLOBAL batch of 0-based update ``step`` and must be
  a deterministic function of ``step`` (and the seed): that, a checkpoint of the
  whole train state and deterministic kernels make resume exact.
* Checkpoints: :class:`orbax.checkpoint.CheckpointManager` under ``{out_dir}/checkpoints``
  every ``--checkpoint_every`` updates (synchronous, so a checkpoint on disk is
  complete; ``--keep_checkpoints`` kept). Rerunning the same command resumes from
  the latest one; a run killed with SIGKILL and restarted logs bit-identical losses
  to an uninterrupted run (on one platform; GPUs need XLA's deterministic ops).
* Output in ``--out_dir``: ``config.json``, ``train.jsonl`` / ``train.csv`` (one row
  per update: ``step`` = updates done, ``loss`` = that update's training loss before
  the update, ``grad_norm``, ``lr``, ``tokens``, ``tokens_per_s``, ``time``),
  ``eval.jsonl`` / ``eval.csv``, ``loss.png`` and ``summary.json``; a tqdm bar with tokens/s.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pathlib
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.model import ModelConfig

PRESET_NAMES = ("tiny", "small", "pod")


# ================================================================================================
# Configs and the command line
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Fields of a training run (every experiment config has them)."""
  seed: int = dataclasses.field(default=0, metadata={"help": "parameter init and data seed"})
  steps: int = dataclasses.field(default=100, metadata={"help": "optimizer updates in all"})
  batch_size: int = dataclasses.field(default=8, metadata={"help": "global batch (sequences)"})
  seq_len: int = dataclasses.field(
      default=64, metadata={"help": "tokens per sequence S (batches are [B, S+1])"})
  learning_rate: float = dataclasses.field(default=3e-3, metadata={"help": "peak learning rate"})
  warmup_steps: int = dataclasses.field(default=10, metadata={"help": "linear warmup updates"})
  min_lr_ratio: float = dataclasses.field(
      default=0.1, metadata={"help": "cosine decays to learning_rate * min_lr_ratio"})
  weight_decay: float = dataclasses.field(
      default=0.1, metadata={"help": "AdamW decay of matrices (ndim >= 2)"})
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  grad_clip: float = dataclasses.field(default=1.0, metadata={"help": "global norm; 0: off"})
  eval_every: int = dataclasses.field(
      default=0, metadata={"help": "updates between evals (0: only after the last)"})
  eval_batches: int = dataclasses.field(default=2, metadata={"help": "batches per eval"})
  log_every: int = dataclasses.field(
      default=1, metadata={"help": "host syncs: metrics are fetched every this many updates "
                                   "(every update still gets a row)"})
  checkpoint_every: int = dataclasses.field(
      default=100, metadata={"help": "updates between checkpoints; 0: none"})
  keep_checkpoints: int = dataclasses.field(default=3, metadata={"help": "checkpoints kept"})
  out_dir: str = dataclasses.field(default="runs/lm", metadata={"help": "output directory"})
  vocab_parallel: int = dataclasses.field(
      default=1, metadata={"help": "size of the 'vocab' mesh axis (divides the device count)"})
  distributed: bool = dataclasses.field(
      default=False, metadata={"help": "call jax.distributed.initialize() first (multi-host)"})
  progress: bool = dataclasses.field(default=True, metadata={"help": "tqdm progress bar"})
  plots: bool = dataclasses.field(default=True, metadata={"help": "write loss.png"})

  def __post_init__(self):
    parent = getattr(super(), "__post_init__", None)  # cooperative: configs mixing this in
    if parent is not None:
      parent()
    for name in ("batch_size", "seq_len", "log_every", "vocab_parallel", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
    for name in ("steps", "warmup_steps", "eval_every", "eval_batches", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class LMConfig(ModelConfig, TrainConfig):
  """A language-model run: :class:`experiments.model.ModelConfig` + :class:`TrainConfig` fields."""


class ConfigError(ValueError):
  """A bad command line or preset: unknown keys, unconvertible or invalid values."""


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")
_NONE = ("none", "null")


def _type_name(hint) -> str:
  if isinstance(hint, type):
    return hint.__name__
  return str(hint).replace("typing.", "")


def _convert(name: str, text: str, hint) -> Any:
  """``text`` converted to the annotated type ``hint`` of field ``name`` (else ConfigError)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  fail = ConfigError(f"--{name}: expected {_type_name(hint)}, got {text!r}.")
  if origin in (typing.Union, types.UnionType):
    if type(None) in args and text.strip().lower() in _NONE:
      return None
    options = [a for a in args if a is not type(None)]
    for option in options:
      try:
        return _convert(name, text, option)
      except ConfigError:
        continue
    raise fail
  if origin is typing.Literal:
    for choice in args:
      try:
        if _convert(name, text, type(choice)) == choice:
          return choice
      except ConfigError:
        continue
    raise ConfigError(f"--{name}: expected one of {list(args)}, got {text!r}.")
  if origin in (tuple, Sequence) or hint is tuple:
    stripped = text.strip().strip("()[]").strip()
    items = [s.strip() for s in stripped.split(",")] if stripped else []
    if items and items[-1] == "":  # a trailing comma, as in "3,"
      items.pop()
    if not args:
      return tuple(items)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(name, s, args[0]) for s in items)
    if len(items) != len(args):
      raise ConfigError(f"--{name}: expected {len(args)} comma-separated values "
                        f"({_type_name(hint)}), got {text!r}.")
    return tuple(_convert(name, s, a) for s, a in zip(items, args))
  if hint is bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
      return True
    if lowered in _FALSE:
      return False
    raise ConfigError(f"--{name}: expected a bool (true/false/1/0/yes/no), got {text!r}.")
  if hint is int:
    try:
      return int(text.replace("_", ""), 0) if text.strip()[:2].lower() in ("0x", "0b", "0o") \
          else int(text.replace("_", ""))
    except ValueError:
      try:  # "1e6" is an int if it is integral
        value = float(text)
      except ValueError:
        raise fail from None
      if value.is_integer():
        return int(value)
      raise fail from None
  if hint is float:
    try:
      return float(text.replace("_", ""))
    except ValueError:
      raise fail from None
  if hint is str:
    return text
  raise ConfigError(f"--{name}: fields of type {_type_name(hint)} cannot be set from the "
                    "command line.")


def _hints(config_cls) -> dict[str, Any]:
  hints = typing.get_type_hints(config_cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if f.init}


def _check_keys(config_cls, keys, where: str) -> None:
  known = _hints(config_cls)
  unknown = [k for k in keys if k not in known]
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, list(known), n=1)
      hints.append(f"--{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
    raise ConfigError(f"unknown {where} for {config_cls.__name__}: {', '.join(hints)}. "
                      f"Run with --help for the fields.")


def _check_preset_value(config_cls, key: str, value) -> Any:
  """A preset value (Python object) coerced like a command-line value where it is a string."""
  hint = _hints(config_cls)[key]
  return _convert(key, value, hint) if isinstance(value, str) and hint is not str else value


def _split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str | None]], bool]:
  """``(preset, [(key, text or None for a bare flag)], wants_help)`` from ``argv``."""
  preset, pairs, wants_help = None, [], False
  i = 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if arg in ("-h", "--help"):
      wants_help = True
      continue
    if not arg.startswith("--") or arg == "--":
      raise ConfigError(f"unexpected argument {arg!r}: use --key=value.")
    key, eq, text = arg[2:].partition("=")
    key = key.replace("-", "_")
    if not eq:
      # "--key value" unless the next token is another option; a bare "--flag" sets a bool.
      if i < len(argv) and not argv[i].startswith("--"):
        text = argv[i]
        i += 1
      else:
        text = None
    if key == "preset":
      if text is None:
        raise ConfigError(f"--preset needs a value, one of {list(PRESET_NAMES)}.")
      preset = text
    else:
      pairs.append((key, text))
  return preset, pairs, wants_help


def config_help(config_cls, presets: Mapping[str, Mapping[str, Any]] | None = None, *,
                description: str | None = None, prog: str | None = None) -> str:
  """The ``--help`` text: usage, description, presets, and every field with type and default."""
  if prog is None:
    module = config_cls.__module__
    if module == "__main__":  # run as `python -m pkg.mod` (its spec names it) or as a script
      spec = getattr(sys.modules.get("__main__"), "__spec__", None)
      module = spec.name if spec is not None else None
    prog = f"python -m {module}" if module else f"python {sys.argv[0]}"
  lines = [f"usage: {prog} [--preset NAME] [--key=value ...]", ""]
  if description:
    lines += [description.strip(), ""]
  if presets:
    lines.append("presets (field overrides):")
    for name, overrides in presets.items():
      values = ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "(defaults)"
      lines.append(f"  {name}: {values}")
    lines.append("")
  lines.append("fields (--key=value; bools also --key, tuples as a,b,c):")
  hints = _hints(config_cls)
  for f in dataclasses.fields(config_cls):
    if not f.init:
      continue
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
    text = f"  --{f.name} ({_type_name(hints[f.name])}, default {default!r})"
    if f.metadata.get("help"):
      text += f": {f.metadata['help']}"
    lines.append(text)
  return "\n".join(lines)


def parse_config(config_cls, presets: Mapping[str, Mapping[str, Any]] | None = None,
                 argv: Sequence[str] | None = None, *, default_preset: str | None = None,
                 description: str | None = None, exit_on_error: bool = True):
  """Builds ``config_cls`` from ``--preset`` and ``--key=value`` arguments.

  Order: the dataclass defaults, then the preset's overrides (``--preset``, or
  ``default_preset``), then the command line's, left to right. With
  ``distributed=True`` in the result, :func:`jax.distributed.initialize` is called
  here, before the caller does anything else with jax.

  Args:
    config_cls: a frozen dataclass (e.g. a subclass of :class:`LMConfig`).
    presets: preset name -> dict of field overrides.
    argv: the arguments (default ``sys.argv[1:]``).
    default_preset: the preset used without ``--preset`` (None: dataclass defaults).
    description: shown by ``--help`` (e.g. the module's ``__doc__``).
    exit_on_error: as argparse: print the error and exit with status 2 (and exit 0
      after ``--help``); False raises :class:`ConfigError` (and SystemExit(0) for help).

  Returns:
    the config instance.
  """
  presets = dict(presets or {})
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    preset, pairs, wants_help = _split_argv(argv)
    if wants_help:
      print(config_help(config_cls, presets, description=description))
      raise SystemExit(0)
    preset = preset if preset is not None else default_preset
    values: dict[str, Any] = {}
    if preset is not None:
      if preset not in presets:
        raise ConfigError(f"unknown --preset {preset!r}; choose from {sorted(presets)}.")
      _check_keys(config_cls, presets[preset], f"keys in preset {preset!r}")
      values.update({k: _check_preset_value(config_cls, k, v) for k, v in presets[preset].items()})
    _check_keys(config_cls, [k for k, _ in pairs], "command-line keys")
    hints = _hints(config_cls)
    for key, text in pairs:
      if text is None:
        if hints[key] is not bool:
          raise ConfigError(f"--{key} needs a value (--{key}=...); only bool fields may be "
                            "given bare.")
        values[key] = True
      else:
        values[key] = _convert(key, text, hints[key])
    try:
      config = config_cls(**values)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"invalid {config_cls.__name__}: {e}") from e
  except ConfigError as e:
    if not exit_on_error:
      raise
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if getattr(config, "distributed", False):
    initialize_distributed()
  return config


def config_dict(config) -> dict[str, Any]:
  """The config's fields as a JSON-friendly dict (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# ================================================================================================
# Devices, mesh and shardings
# ================================================================================================

_DISTRIBUTED_INITIALIZED = False


def initialize_distributed() -> None:
  """:func:`jax.distributed.initialize` once per process (cluster settings from the environment)."""
  global _DISTRIBUTED_INITIALIZED
  if not _DISTRIBUTED_INITIALIZED:
    import jax
    jax.distributed.initialize()
    _DISTRIBUTED_INITIALIZED = True


def make_mesh(vocab_parallel: int = 1, devices=None):
  """A ``("data", "vocab")`` mesh over ``devices`` (default all), vocab axis of ``vocab_parallel``.

  Both axes are ``AxisType.Auto`` (GSPMD propagates shardings through plain jit).
  """
  import jax
  devices = list(jax.devices() if devices is None else devices)
  if vocab_parallel < 1 or len(devices) % vocab_parallel:
    raise ValueError(f"make_mesh: vocab_parallel={vocab_parallel} must divide the device count "
                     f"{len(devices)}.")
  shape = (len(devices) // vocab_parallel, vocab_parallel)
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(shape, ("data", "vocab"), axis_types=auto, devices=devices)


def setup(config) -> Any:
  """Distributed init (if ``config.distributed``) and the mesh of ``config.vocab_parallel``."""
  if getattr(config, "distributed", False):
    initialize_distributed()
  return make_mesh(getattr(config, "vocab_parallel", 1))


def default_param_spec(path: tuple[str, ...], shape: tuple[int, ...]):
  """The :class:`PartitionSpec` of a parameter: the dense head's vocabulary axis over ``"vocab"``.

  ``path`` is the parameter's key path in the model's state (e.g. ``("head", "weight")``).
  ``head.weight[V, D]`` -> ``P("vocab", None)``; ``head.bias[V]`` -> ``P("vocab")``;
  everything else (the VQ codebook ``[K, D]`` included) replicated, ``P()``. Pass
  another function of the same signature as ``train(param_spec=...)`` to shard otherwise.
  """
  from jax.sharding import PartitionSpec as P
  if len(path) == 2 and path[0] == "head":
    if path[1] == "weight" and len(shape) == 2:
      return P("vocab", None)
    if path[1] == "bias" and len(shape) == 1:
      return P("vocab")
  return P()


def _fit_spec(spec, shape, mesh, where: str):
  """``spec`` with mesh axes that do not divide their dimension dropped (with a warning)."""
  from jax.sharding import PartitionSpec as P
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries):
    axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    size = math.prod(mesh.shape[a] for a in axes)
    if size > 1 and dim % size:
      warnings.warn(f"{where}: dimension {dim} is not divisible by mesh axes {axes} "
                    f"(size {size}); replicated instead.", stacklevel=3)
      entry = None
    fitted.append(entry)
  return P(*fitted)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_shardings(mesh, params, param_spec: Callable = default_param_spec):
  """NamedShardings of a parameter tree (arrays or ShapeDtypeStructs) under ``param_spec``."""
  import jax
  from jax.sharding import NamedSharding

  def one(path, leaf):
    names = tuple(_key_name(k) for k in path)
    spec = param_spec(names, tuple(leaf.shape))
    return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, "/".join(names)))
  return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh):
  """Batches ``[B, S+1]`` are sharded on B over ``"data"`` (replicated over ``"vocab"``)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  return NamedSharding(mesh, P("data", None))


def shard_batch(batch, sharding):
  """A global batch (numpy or jax array) as a jax.Array with ``sharding`` (works multi-host).

  Every process passes the same global batch; each keeps the slices of its devices.
  """
  import jax
  import numpy as np
  if isinstance(batch, jax.Array) and batch.sharding == sharding:
    return batch
  if isinstance(batch, jax.Array) and batch.is_fully_addressable:
    return jax.device_put(batch, sharding)
  host = np.asarray(batch)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# ================================================================================================
# Optimizer and train state
# ================================================================================================

def make_schedule(config) -> Callable:
  """Linear warmup from 0 to ``learning_rate``, cosine decay to ``learning_rate * min_lr_ratio``."""
  import optax
  warmup = max(0, min(config.warmup_steps, config.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1),
      end_value=config.learning_rate * config.min_lr_ratio)


def make_optimizer(config):
  """``(optax transform, schedule)``: global-norm clipping then AdamW (decay on ndim >= 2 only)."""
  import jax
  import optax
  schedule = make_schedule(config)
  adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=config.weight_decay,
                      mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params))
  parts = ([optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []) + [adamw]
  return optax.chain(*parts), schedule


def default_model_fn(config) -> Callable:
  """``rngs -> TransformerLM`` of the model fields of ``config`` (checks seq_len <= max_seq_len)."""
  from experiments.model import ModelConfig, TransformerLM
  model_config = ModelConfig.from_config(config)
  seq_len = getattr(config, "seq_len", None)
  if seq_len is not None and seq_len > model_config.max_seq_len:
    raise ValueError(f"seq_len={seq_len} exceeds max_seq_len={model_config.max_seq_len}; "
                     f"raise --max_seq_len.")
  return lambda rngs: TransformerLM(model_config, rngs=rngs)


def default_loss_fn(model, tokens, mask):
  """The training objective: ``model.loss(tokens, mask)`` (mean next-token loss)."""
  return model.loss(tokens, mask)


@dataclasses.dataclass
class Trainer:
  """The compiled pieces of a run; :func:`build_trainer` makes one, :func:`train` runs it.

  ``state`` is a dict pytree ``{"step": int32[], "params": ..., "rest": ..., "opt_state": ...}``
  (``params``: the model's ``nnx.Param`` values as a pure dict; ``rest``: its other
  variables, e.g. the VQ assignment). ``train_step(state, batch) -> (state, metrics)``
  donates ``state``; ``eval_step(state, batch) -> loss``; ``batch`` is ``(tokens,)`` or
  ``(tokens, mask)``, sharded with ``batch_sharding``.
  """
  config: Any
  mesh: Any
  graphdef: Any
  optimizer: Any
  schedule: Callable
  state_shardings: Any
  batch_sharding: Any
  init: Callable
  train_step: Callable
  eval_step: Callable
  abstract_state: Any
  num_params: int
  num_head_params: int | None

  def model(self, state):
    """The nnx model holding ``state``'s parameters."""
    from flax import nnx
    return nnx.merge(self.graphdef, state["params"], state["rest"])


def build_trainer(config, *, mesh=None, model_fn: Callable | None = None,
                  loss_fn: Callable = default_loss_fn, optimizer=None,
                  param_spec: Callable = default_param_spec) -> Trainer:
  """The jitted init, train and eval steps of ``config`` on ``mesh`` (compiled on first call).

  Args:
    config: a :class:`TrainConfig` (with model fields, e.g. :class:`LMConfig`).
    mesh: default :func:`setup` ``(config)``.
    model_fn: ``rngs -> nnx.Module`` (default: :class:`experiments.model.TransformerLM`
      of the config's model fields).
    loss_fn: ``(model, tokens[B, S+1], mask[B, S+1] or None) -> scalar``.
    optimizer: an optax transform (default :func:`make_optimizer`); its schedule
      is still logged as ``lr`` from :func:`make_schedule`.
    param_spec: ``(path, shape) -> PartitionSpec`` of each parameter (:func:`default_param_spec`).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = setup(config) if mesh is None else mesh
  model_fn = default_model_fn(config) if model_fn is None else model_fn
  default_optimizer, schedule = make_optimizer(config)
  optimizer = default_optimizer if optimizer is None else optimizer

  abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(config.seed)))
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  head_params = None
  if hasattr(abstract_model, "head"):
    head_params = sum(math.prod(x.shape) for x in
                      jax.tree.leaves(nnx.state(abstract_model.head, nnx.Param)))

  def init():
    model = model_fn(nnx.Rngs(config.seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
            "opt_state": optimizer.init(params)}

  abstract_state = jax.eval_shape(init)
  replicated = NamedSharding(mesh, P())
  p_shardings = param_shardings(mesh, abstract_state["params"], param_spec)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_state["opt_state"], p_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {"step": replicated, "params": p_shardings,
                     "rest": jax.tree.map(lambda _: replicated, abstract_state["rest"]),
                     "opt_state": opt_shardings}
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      abstract_state, state_shardings)
  data_sharding = batch_sharding(mesh)

  def objective(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    tokens, mask = batch[0], (batch[1] if len(batch) > 1 else None)
    return loss_fn(model, tokens, mask)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(objective)(state["params"], state["rest"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss.astype(jnp.float32), "grad_norm": optax.tree.norm(grads),
               "lr": jnp.asarray(schedule(state["step"]), jnp.float32)}
    new_state = {"step": state["step"] + 1, "params": params, "rest": state["rest"],
                 "opt_state": opt_state}
    return new_state, metrics

  def eval_step(state, batch):
    return objective(state["params"], state["rest"], batch).astype(jnp.float32)

  return Trainer(
      config=config, mesh=mesh, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
      state_shardings=state_shardings, batch_sharding=data_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      train_step=jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings, data_sharding),
                        out_shardings=replicated),
      abstract_state=abstract_state, num_params=num_params, num_head_params=head_params)


# ================================================================================================
# Checkpoints
# ================================================================================================

def checkpoint_manager(directory: str | os.PathLike, *, keep: int = 3):
  """A synchronous :class:`orbax.checkpoint.CheckpointManager` (saves are complete on return)."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=options)


def save_checkpoint(manager, state) -> None:
  import orbax.checkpoint as ocp
  step = int(state["step"])
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()


def restore_checkpoint(manager, abstract_state, step: int | None = None):
  """The state of checkpoint ``step`` (default the latest), sharded as ``abstract_state``."""
  import orbax.checkpoint as ocp
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


# ================================================================================================
# The train loop
# ================================================================================================

@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns.

  ``train_rows`` / ``eval_rows``: every metrics row of the run (an earlier,
  interrupted process's rows up to the checkpoint included); ``start_step``: the
  checkpoint step this process resumed from (0: a fresh run).
  """
  trainer: Trainer
  state: Any
  model: Any
  train_rows: list[dict]
  eval_rows: list[dict]
  start_step: int
  out_dir: pathlib.Path

  @property
  def final_loss(self) -> float | None:
    return self.train_rows[-1]["loss"] if self.train_rows else None


def _as_batch(raw, config, step, what: str) -> tuple:
  """``(tokens,)`` or ``(tokens, mask)`` from a batch function's result, shape-checked."""
  import numpy as np
  parts = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
  if not 1 <= len(parts) <= 2:
    raise ValueError(f"{what}({step}) must return tokens or (tokens, mask), got {len(parts)} "
                     "items.")
  want = (config.batch_size, config.seq_len + 1)
  for name, part in zip(("tokens", "mask"), parts):
    if tuple(part.shape) != want:
      raise ValueError(f"{what}({step}): {name} must have shape [batch_size, seq_len + 1] = "
                       f"{list(want)}, got {list(part.shape)}.")
  tokens = parts[0]
  if not np.issubdtype(np.dtype(tokens.dtype), np.integer):
    raise TypeError(f"{what}({step}): tokens must be integers, got {tokens.dtype}.")
  tokens = tokens.astype(np.int32) if tokens.dtype != np.int32 else tokens
  if len(parts) == 2:
    return tokens, parts[1].astype(bool) if parts[1].dtype != bool else parts[1]
  return (tokens,)


def _format_rate(rate: float) -> str:
  for unit, scale in (("M", 1e6), ("k", 1e3)):
    if rate >= scale:
      return f"{rate / scale:.1f}{unit}"
  return f"{rate:.0f}"


def plot_losses(out_dir: pathlib.Path, train_rows: Sequence[dict], eval_rows: Sequence[dict],
                title: str | None = None) -> pathlib.Path:
  """``{out_dir}/loss.png``: training (and eval) loss against updates."""
  from experiments import common
  curves = {"train": ([r["step"] for r in train_rows], [r["loss"] for r in train_rows])}
  if eval_rows:
    curves["eval"] = ([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows])
  return common.plot_curves(out_dir / "loss.png", curves, xlabel="update", ylabel="loss",
                            title=title, markers=("eval",) if len(train_rows) >= 40 else True)


def train(config, batch_fn: Callable[[int], Any], *,
          eval_batch_fn: Callable[[int], Any] | None = None, trainer: Trainer | None = None,
          mesh=None, model_fn: Callable | None = None, loss_fn: Callable = default_loss_fn,
          optimizer=None, param_spec: Callable = default_param_spec,
          title: str | None = None) -> TrainResult:
  """Trains ``config.steps`` updates, resuming from ``{out_dir}/checkpoints`` if there is one.

  Args:
    config: a :class:`TrainConfig` with model fields (e.g. an :class:`LMConfig` subclass).
    batch_fn: ``step -> tokens`` int32 ``[batch_size, seq_len + 1]`` (numpy or jax), or
      ``(tokens, mask)`` with a bool mask of the same shape (see
      :meth:`experiments.model.TransformerLM.token_losses`): the GLOBAL batch of the
      0-based update ``step``, a deterministic function of ``step``.
    eval_batch_fn: ``i -> batch`` (same form and shape as ``batch_fn``'s) for
      ``i < config.eval_batches``, evaluated every ``config.eval_every`` updates and
      after the last one (the mean of the batches' losses, logged to ``eval.jsonl``).
    trainer: a prebuilt :func:`build_trainer` result (else built from the next arguments).
    mesh, model_fn, loss_fn, optimizer, param_spec: as in :func:`build_trainer`.
    title: the loss plot's title (default: ``out_dir``'s name).

  Returns:
    a :class:`TrainResult`.
  """
  import jax
  import tqdm

  from experiments import common

  trainer = trainer or build_trainer(config, mesh=mesh, model_fn=model_fn, loss_fn=loss_fn,
                                     optimizer=optimizer, param_spec=param_spec)
  lead = jax.process_index() == 0
  out_dir = pathlib.Path(config.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  manager = (checkpoint_manager(out_dir / "checkpoints", keep=config.keep_checkpoints)
             if config.checkpoint_every > 0 else None)

  config_path = out_dir / "config.json"
  latest = manager.latest_step() if manager is not None else None
  if latest is not None:
    state = restore_checkpoint(manager, trainer.abstract_state, latest)
    start = int(state["step"])
    if config_path.exists():
      before = json.loads(config_path.read_text())
      changed = sorted(k for k, v in config_dict(config).items() if before.get(k) != v)
      if changed and lead:
        print(f"resuming with changed config fields: {changed}", file=sys.stderr)
    if lead:
      print(f"resumed from checkpoint step {start} in {out_dir / 'checkpoints'}", flush=True)
  else:
    state = trainer.init()
    start = 0
  if lead:
    config_path.write_text(json.dumps(config_dict(config), indent=2) + "\n")
    head = ("" if trainer.num_head_params is None
            else f" (output layer {trainer.num_head_params:,})")
    print(f"devices: {trainer.mesh.size} x {jax.devices()[0].platform}, mesh "
          f"{dict(trainer.mesh.shape)}, params {trainer.num_params:,}{head}", flush=True)

  tokens_per_step = config.batch_size * config.seq_len
  train_log = common.MetricsWriter(out_dir, "train", keep_through_step=start) if lead else None
  eval_log = common.MetricsWriter(out_dir, "eval", keep_through_step=start) if lead else None
  title = title or out_dir.name

  def run_eval(state, step):
    losses = [trainer.eval_step(state, shard(eval_batch_fn(i), i, "eval_batch_fn"))
              for i in range(config.eval_batches)]
    loss = float(sum(jax.device_get(losses)) / len(losses))
    if eval_log is not None:
      eval_log.write({"step": step, "loss": loss, "perplexity": math.exp(min(loss, 80.0))})
    return loss

  def shard(raw, i, what):
    return tuple(shard_batch(part, trainer.batch_sharding)
                 for part in _as_batch(raw, config, i, what))

  def write_plot():
    if lead and config.plots:
      plot_losses(out_dir, train_log.rows, eval_log.rows, title)

  bar = tqdm.tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True,
                  disable=not (config.progress and lead), file=sys.stderr)
  pending: list[tuple[int, dict]] = []
  clock_start = last = time.perf_counter()
  eval_loss = None
  try:
    for step in range(start, config.steps):
      batch = shard(batch_fn(step), step, "batch_fn")
      state, metrics = trainer.train_step(state, batch)
      done = step + 1
      pending.append((done, metrics))
      last_step = done == config.steps
      due_eval = eval_batch_fn is not None and config.eval_batches > 0 and (
          (config.eval_every > 0 and done % config.eval_every == 0) or last_step)
      due_checkpoint = manager is not None and (done % config.checkpoint_every == 0 or last_step)
      if done % config.log_every == 0 or last_step or due_eval or due_checkpoint:
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        rate = len(pending) * tokens_per_step / max(now - last, 1e-9)
        last = now
        for (row_step, _), values in zip(pending, fetched):
          row = {"step": row_step, "loss": float(values["loss"]),
                 **{k: float(v) for k, v in values.items() if k != "loss"},
                 "tokens": row_step * tokens_per_step, "tokens_per_s": rate,
                 "time": now - clock_start}
          if train_log is not None:
            train_log.write(row)
        bar.update(len(pending))
        bar.set_postfix_str(f"loss={float(fetched[-1]['loss']):.4f} tok/s={_format_rate(rate)}"
                            + (f" eval={eval_loss:.4f}" if eval_loss is not None else ""))
        pending = []
      if due_eval:
        eval_loss = run_eval(state, done)
      if due_checkpoint:
        save_checkpoint(manager, state)
        write_plot()
      if due_eval or due_checkpoint:
        last = time.perf_counter()  # tokens/s counts training time only
  finally:
    bar.close()
  write_plot()
  result = TrainResult(
      trainer=trainer, state=state, model=trainer.model(state),
      train_rows=list(train_log.rows) if train_log is not None else [],
      eval_rows=list(eval_log.rows) if eval_log is not None else [],
      start_step=start, out_dir=out_dir)
  if lead:
    summary = {"steps": config.steps, "start_step": start, "final_loss": result.final_loss,
               "final_eval_loss": eval_log.rows[-1]["loss"] if eval_log.rows else None,
               "params": trainer.num_params, "head_params": trainer.num_head_params,
               "devices": trainer.mesh.size, "mesh": dict(trainer.mesh.shape),
               "wall_s": time.perf_counter() - clock_start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    train_log.close()
    eval_log.close()
  if manager is not None:
    manager.close()
  return result
