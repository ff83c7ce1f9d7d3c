"""Experiment data: an embedded code corpus, a local BPE tokenizer, LM and classification batches.

  python -m experiments.data [--vocab-size 32768] [--val-fraction 0.05] [--max-files N]
                             [--include-tests] [--cache-dir DIR]

prepares (or loads from the cache) the default language-modelling data and prints the corpus size,
the tokenizer training time, the token counts and where the cache lives.

Everything on the default path runs offline; nothing here downloads.

Default corpus (``stdlib_corpus``)
  The Python standard library's own ``*.py`` files on this machine (``sysconfig.get_paths()["stdlib"]``),
  sorted by relative POSIX path, each file one document. Skipped: ``site-packages`` / ``dist-packages``
  (third-party code, different on every machine), test suites (files under a directory named ``test``,
  ``tests`` or ``idle_test``; ``include_tests=True`` keeps them) and files that are not valid UTF-8. The
  corpus therefore depends on the Python version; its fingerprint (sha256 over paths and texts) keys
  every cache entry, so another Python simply gets its own cache entry.
  The train/validation split is by file: ``split_of`` hashes the relative path, so a file's split does
  not move when files are added or removed, and ``val_fraction`` is a parameter.

Tokenizer (``train_tokenizer``, ``Tokenizer``)
  Byte-level BPE (GPT-2 pre-tokenization regex, no normalization, hence lossless:
  ``decode(encode(s)) == s`` for every ``str``), trained with the ``tokenizers`` package on the train
  split only. Two special tokens: ``<|endoftext|>`` (id 0) ends every document in a token stream and
  ``<|pad|>`` (id 1) pads the tail of the last validation batch. Text that literally contains these
  strings is encoded as ordinary bytes, so only the data pipeline ever emits ids 0 and 1.

Cache (``cache_dir``; default ``$LOGITLAB_DATA_CACHE``, else ``$XDG_CACHE_HOME/logitlab/data``, else
``~/.cache/logitlab/data``)::

  <cache_dir>/bpe-<key>/tokenizer.json            key: train-split fingerprint, vocab size, min frequency,
                                                  special tokens, tokenizers version, format version
  <cache_dir>/bpe-<key>/tokens-<val key>/train.npy, val.npy, meta.json
                                                  uint16 when the vocabulary fits, else int32

  Any changed setting gives a new key, hence a new training run; files are written atomically
  (temporary name, then ``os.replace``), so concurrent workers at worst train twice.

Language-modelling batches (``TokenData``, ``TfdsTokenData``)
  ``batch(step, batch_size, seq_len)`` returns int32 ``[batch_size, seq_len + 1]`` (inputs ``[:, :-1]``,
  targets ``[:, 1:]``) drawn with ``np.random.default_rng((seed, step))`` alone, so step ``s`` gives the
  same batch whatever ran before it and training resumes exactly. ``val_batches(batch_size, seq_len)``
  walks the validation tokens in order in windows of ``seq_len + 1`` tokens with stride ``seq_len``:
  consecutive windows share one token, so every validation token after the first is a target exactly
  once, in order. The tail is padded with ``pad_id`` (mask the positions whose target is ``pad_id``)
  unless ``drop_remainder=True``.

Classification batches (``ClassificationData``): ``synthetic_classification`` (offline, the CPU default
of the distillation experiments) and ``cifar100`` (tensorflow-datasets) share ``batch(step,
batch_size) -> (x float32, y int32)`` (epoch-wise shuffling, a function of (seed, step) alone) and
``val_batches(batch_size)`` (in order, the last batch padded with label ``-1``, i.e. ``ignore_index=-1``,
unless ``drop_remainder=True``).

tensorflow-datasets without TensorFlow (checked with tfds 4.9.10)
  Reading goes through ``tfds.data_source(..., builder_kwargs={"file_format": "array_record"})``
  (random access; needs ``array_record``, and Pillow or OpenCV for images) and works without
  TensorFlow, as does ``tfds.testing.mock_data`` around it. Preparing a dataset does not: cifar100
  encodes PNGs with ``tf.image``, lm1b lists files with ``tf.io.gfile``, c4 needs Apache Beam as well.
  Without TensorFlow the loaders therefore only read an already prepared array_record copy (built on a
  machine with TensorFlow by ``tfds build <name> --file_format=array_record --data_dir=DIR``) and
  raise ``ImportError`` naming ``pip install tensorflow`` when the dataset is not prepared.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
DEFAULT_VOCAB_SIZE = 32768
DEFAULT_VAL_FRACTION = 0.05
# Directory names whose files are skipped unless include_tests=True, and never-included directories.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
# Bump when the tokenizer recipe or the cached token layout changes: old cache entries are then ignored.
_CACHE_FORMAT = 1
_UINT16_VOCAB = 1 << 16


def default_cache_dir() -> pathlib.Path:
  """``$LOGITLAB_DATA_CACHE``, else ``$XDG_CACHE_HOME/logitlab/data``, else ``~/.cache/logitlab/data``."""
  if os.environ.get("LOGITLAB_DATA_CACHE"):
    return pathlib.Path(os.environ["LOGITLAB_DATA_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
  return pathlib.Path(base).expanduser() / "logitlab" / "data"


# ----------------------------------------------------------------------------------------------------
# Corpus


@dataclasses.dataclass(frozen=True)
class Document:
  """One corpus document: its path relative to the corpus root (POSIX form) and its text."""
  path: str
  text: str


def stdlib_root() -> pathlib.Path:
  """The standard library directory of the running Python, ``sysconfig.get_paths()["stdlib"]``."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(*, root: str | os.PathLike | None = None, include_tests: bool = False,
                 max_files: int | None = None) -> list[str]:
  """Sorted relative POSIX paths of the corpus's ``*.py`` files (see the module docstring for the skips).

  ``max_files`` keeps the first ``max_files`` paths of the sorted list (a deterministic subset for tests).
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  paths = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    dirs = set(rel.parts[:-1])
    if dirs & THIRD_PARTY_DIRS or "__pycache__" in dirs or not path.is_file():
      continue
    if not include_tests and dirs & TEST_DIRS:
      continue
    paths.append(rel.as_posix())
  paths.sort()
  return paths if max_files is None else paths[:max_files]


def stdlib_corpus(*, root: str | os.PathLike | None = None, include_tests: bool = False,
                  max_files: int | None = None) -> list[Document]:
  """The default corpus: the standard library's source files as documents, in sorted path order.

  Files that are not valid UTF-8 are skipped (none in CPython 3.11 outside the test suite). ``max_files``
  counts the files considered, before that filter.
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  docs = []
  for rel in stdlib_files(root=root, include_tests=include_tests, max_files=max_files):
    try:
      text = (root / rel).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    docs.append(Document(rel, text))
  return docs


def split_of(path: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
  """``"val"`` or ``"train"`` for a document, decided by a hash of its path alone.

  The first 8 bytes of ``sha256(path)`` read as a fraction in [0, 1); the document is in the validation
  split when that fraction is below ``val_fraction``. Adding or removing other files never moves it, and
  raising ``val_fraction`` only moves files from train to val.
  """
  if not 0.0 <= val_fraction <= 1.0:
    raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
  digest = hashlib.sha256(path.encode("utf-8")).digest()
  return "val" if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction else "train"


def split_documents(docs: Iterable[Document], *, val_fraction: float = DEFAULT_VAL_FRACTION
                    ) -> tuple[list[Document], list[Document]]:
  """(train, val) by ``split_of``, each keeping the input order."""
  train, val = [], []
  for doc in docs:
    (val if split_of(doc.path, val_fraction) == "val" else train).append(doc)
  return train, val


def corpus_fingerprint(docs: Iterable[Document]) -> str:
  """sha256 (hex) over the documents' paths and texts, in order."""
  h = hashlib.sha256()
  for doc in docs:
    for part in (doc.path.encode("utf-8"), doc.text.encode("utf-8")):
      h.update(len(part).to_bytes(8, "little"))
      h.update(part)
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
  """A byte-level BPE tokenizer: a thin wrapper over ``tokenizers.Tokenizer`` (kept as ``.backend``).

  ``encode`` returns int32 ids and never emits the special ids (text containing ``<|endoftext|>`` is
  encoded as plain bytes); ``decode`` maps every id, special ones included, back to text.
  """

  def __init__(self, backend: Any):
    self.backend = backend
    # Special-token strings inside ordinary text are encoded as text, not as the special ids.
    backend.encode_special_tokens = True
    ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    if None in ids:
      raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
    self.eot_id, self.pad_id = ids

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of ``text`` (no special tokens added)."""
    return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """``[encode(t) for t in texts]``, encoded in parallel by ``tokenizers``."""
    # encode_batch_fast skips the character offsets: same ids, about 3x faster on the stdlib corpus.
    encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ``ids``; special ids decode to their strings (``<|endoftext|>``, ``<|pad|>``)."""
    return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def save(self, path: str | os.PathLike) -> None:
    _atomic_write(pathlib.Path(path), lambda f: f.write(self.backend.to_str().encode("utf-8")))

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    return cls(Backend.from_file(str(path)))


def tokenizer_settings(*, vocab_size: int, min_frequency: int) -> dict[str, Any]:
  """Everything besides the corpus that decides a trained tokenizer (hashed into the cache key)."""
  import tokenizers
  return {"format": _CACHE_FORMAT, "model": "byte-level BPE", "vocab_size": vocab_size,
          "min_frequency": min_frequency, "special_tokens": list(SPECIAL_TOKENS),
          "tokenizers": tokenizers.__version__}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 2) -> Tokenizer:
  """Trains a byte-level BPE tokenizer on ``texts`` (one string per document); no caching.

  The vocabulary holds the two special tokens (ids 0 and 1), the 256 byte symbols, then merges up to
  ``vocab_size`` entries in all (fewer when the corpus has fewer pairs seen ``min_frequency`` times).
  """
  from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
  if vocab_size <= len(SPECIAL_TOKENS) + 256:
    minimum = len(SPECIAL_TOKENS) + 256
    raise ValueError(f"vocab_size must exceed {minimum} (specials + bytes), got {vocab_size}")
  backend = Backend(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(backend)


def _key(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _atomic_write(path: pathlib.Path, write) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def token_dtype(vocab_size: int) -> np.dtype:
  """Storage dtype of token arrays: uint16 when every id fits, else int32."""
  return np.dtype(np.uint16 if vocab_size <= _UINT16_VOCAB else np.int32)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], *, chunk: int = 256) -> np.ndarray:
  """One token stream: each document's ids followed by ``eot_id``, in order, as ``token_dtype``."""
  dtype = token_dtype(tokenizer.vocab_size)
  eot = np.array([tokenizer.eot_id], dtype=np.int32)
  parts = [np.zeros(0, dtype)]
  for i in range(0, len(texts), chunk):
    for ids in tokenizer.encode_batch(texts[i:i + chunk]):
      parts.append(np.concatenate([ids, eot]).astype(dtype))
  return np.concatenate(parts)


@dataclasses.dataclass
class _Prepared:
  tokenizer: Tokenizer
  tokenizer_path: pathlib.Path
  train_docs: list[Document]
  val_docs: list[Document]
  train_seconds: float | None  # None when the tokenizer came from the cache


def _prepare_tokenizer(*, vocab_size, min_frequency, val_fraction, max_files, include_tests, cache_dir,
                       root) -> _Prepared:
  docs = stdlib_corpus(root=root, include_tests=include_tests, max_files=max_files)
  train, val = split_documents(docs, val_fraction=val_fraction)
  if not train:
    raise ValueError("the train split is empty: raise max_files or lower val_fraction")
  settings = tokenizer_settings(vocab_size=vocab_size, min_frequency=min_frequency)
  key = _key({"corpus": corpus_fingerprint(train), **settings})
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  path = cache_dir / f"bpe-{key}" / "tokenizer.json"
  seconds = None
  if path.exists():
    tokenizer = Tokenizer.load(path)
  else:
    start = time.perf_counter()
    tokenizer = train_tokenizer((d.text for d in train), vocab_size=vocab_size,
                                min_frequency=min_frequency)
    seconds = time.perf_counter() - start
    tokenizer.save(path)
    meta = {"settings": settings, "train_files": len(train), "train_seconds": seconds,
            "corpus": "python stdlib", "python": sys.version}
    _atomic_write(path.with_name("meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
  return _Prepared(tokenizer, path, train, val, seconds)


def stdlib_tokenizer(*, vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
                     val_fraction: float = DEFAULT_VAL_FRACTION, max_files: int | None = None,
                     include_tests: bool = False, cache_dir: str | os.PathLike | None = None,
                     root: str | os.PathLike | None = None) -> Tokenizer:
  """The BPE tokenizer of the default corpus's train split, trained once, then loaded from the cache."""
  return _prepare_tokenizer(vocab_size=vocab_size, min_frequency=min_frequency, val_fraction=val_fraction,
                            max_files=max_files, include_tests=include_tests, cache_dir=cache_dir,
                            root=root).tokenizer


# ----------------------------------------------------------------------------------------------------
# Language-modelling batches


def _check_step(step: int) -> int:
  step = int(step)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return step


def _windows(chunks: Iterable[np.ndarray], seq_len: int, pad_id: int, drop_remainder: bool
             ) -> Iterator[np.ndarray]:
  """Windows of ``seq_len + 1`` tokens, stride ``seq_len``, over the concatenated chunks."""
  buf = np.zeros(0, np.int32)
  for chunk in chunks:
    buf = np.concatenate([buf, np.asarray(chunk, dtype=np.int32)])
    full = (len(buf) - 1) // seq_len if len(buf) else 0
    for i in range(full):
      yield buf[i * seq_len:i * seq_len + seq_len + 1]
    buf = buf[full * seq_len:]
  if not drop_remainder and len(buf) > 1:
    out = np.full(seq_len + 1, pad_id, np.int32)
    out[:len(buf)] = buf
    yield out


def _batched(rows: Iterable[np.ndarray], batch_size: int, pad_row: np.ndarray, drop_remainder: bool,
             max_batches: int | None) -> Iterator[np.ndarray]:
  batch, count = [], 0
  for row in rows:
    if max_batches is not None and count >= max_batches:
      return
    batch.append(row)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch, count = [], count + 1
  if batch and not drop_remainder and (max_batches is None or count < max_batches):
    yield np.stack(batch + [pad_row] * (batch_size - len(batch)))


class TokenData:
  """Language-modelling batches from an in-memory (or memory-mapped) token stream.

  Attributes:
    train_tokens, val_tokens: 1-D integer arrays (documents separated by ``tokenizer.eot_id``).
    tokenizer: the ``Tokenizer`` (``encode`` / ``decode``).
    seed: the batch seed; ``batch(step, ...)`` depends on (seed, step) alone.
    info: where the data came from (corpus, cache paths, tokenizer training time).
  """

  def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, tokenizer: Tokenizer, *,
               seed: int = 0, info: dict[str, Any] | None = None):
    self.train_tokens = train_tokens
    self.val_tokens = val_tokens
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.info = dict(info or {})

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_tokens(self) -> int:
    """Number of training tokens."""
    return len(self.train_tokens)

  @property
  def num_val_tokens(self) -> int:
    return len(self.val_tokens)

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  def batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """int32 ``[batch_size, seq_len + 1]`` training windows at uniform positions from (seed, step)."""
    span = seq_len + 1
    if self.num_tokens < span:
      raise ValueError(f"seq_len + 1 = {span} exceeds the {self.num_tokens} training tokens")
    rng = np.random.default_rng((self.seed, _check_step(step)))
    starts = rng.integers(0, self.num_tokens - span + 1, size=batch_size)
    return np.asarray(self.train_tokens[starts[:, None] + np.arange(span)], dtype=np.int32)

  def val_batches(self, batch_size: int, seq_len: int, *, drop_remainder: bool = False,
                  max_batches: int | None = None) -> Iterator[np.ndarray]:
    """int32 ``[batch_size, seq_len + 1]`` validation windows in order (see the module docstring)."""
    pad_row = np.full(seq_len + 1, self.pad_id, np.int32)
    windows = _windows([self.val_tokens], seq_len, self.pad_id, drop_remainder)
    return _batched(windows, batch_size, pad_row, drop_remainder, max_batches)


def stdlib_data(*, vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION,
                max_files: int | None = None, include_tests: bool = False, min_frequency: int = 2,
                seed: int = 0, cache_dir: str | os.PathLike | None = None,
                root: str | os.PathLike | None = None) -> TokenData:
  """The default language-modelling data: the standard library, its BPE tokenizer, cached token arrays.

  The first call trains the tokenizer on the train split and tokenizes both splits into the cache; later
  calls with the same corpus and settings load the tokenizer and memory-map the arrays.
  """
  prep = _prepare_tokenizer(vocab_size=vocab_size, min_frequency=min_frequency, val_fraction=val_fraction,
                            max_files=max_files, include_tests=include_tests, cache_dir=cache_dir,
                            root=root)
  tokens_dir = prep.tokenizer_path.parent / f"tokens-{_key({'val': corpus_fingerprint(prep.val_docs)})}"
  arrays = {}
  for split, docs in (("train", prep.train_docs), ("val", prep.val_docs)):
    path = tokens_dir / f"{split}.npy"
    if not path.exists():
      tokens = encode_documents(prep.tokenizer, [d.text for d in docs])
      _atomic_write(path, lambda f, tokens=tokens: np.save(f, tokens))
    arrays[split] = np.load(path, mmap_mode="r")
  meta_path = tokens_dir / "meta.json"
  if not meta_path.exists():
    meta = {"train_files": len(prep.train_docs), "val_files": len(prep.val_docs),
            "train_tokens": len(arrays["train"]), "val_tokens": len(arrays["val"]),
            "val_fraction": val_fraction, "dtype": str(arrays["train"].dtype)}
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
  info = {"corpus": "python stdlib", "root": str(root or stdlib_root()),
          "train_files": len(prep.train_docs), "val_files": len(prep.val_docs),
          "train_bytes": sum(len(d.text.encode()) for d in prep.train_docs),
          "val_bytes": sum(len(d.text.encode()) for d in prep.val_docs),
          "tokenizer_path": str(prep.tokenizer_path), "tokens_dir": str(tokens_dir),
          "tokenizer_train_seconds": prep.train_seconds}
  return TokenData(arrays["train"], arrays["val"], prep.tokenizer, seed=seed, info=info)


# ----------------------------------------------------------------------------------------------------
# tensorflow-datasets (random-access array_record sources; no TensorFlow needed to read)


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("the tensorflow-datasets loaders need `pip install tensorflow-datasets` "
                      "(part of logitlab[experiments])") from e
  return tfds


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def tfds_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> Sequence[dict]:
  """A random-access ``tfds.data_source`` over the array_record files of ``name``/``split``.

  With TensorFlow installed, a dataset not yet prepared is downloaded and prepared in the array_record
  format. Without it, only an already prepared copy can be read; otherwise this raises ``ImportError``.
  """
  tfds = _tfds()
  if name.split("/")[0] == "c4":
    # c4 is a legacy builder that `import tensorflow_datasets` does not register when TF is absent.
    import tensorflow_datasets.text.c4  # noqa: F401
  download = _has_tensorflow()
  try:
    return tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir),
                            download=download, builder_kwargs={"file_format": "array_record"})
  except (KeyError, FileNotFoundError, AssertionError, ModuleNotFoundError) as e:
    # Without TF, tfds reports a dataset that is not prepared as an empty split list (KeyError).
    missing_tf = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "tensorflow"
    not_prepared = not download and not isinstance(e, ModuleNotFoundError)
    if not (missing_tf or not_prepared):
      raise
    raise ImportError(
        f"tensorflow-datasets found no prepared array_record copy of {name!r} (split {split!r}, data_dir "
        f"{data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'}), and preparing one needs TensorFlow: "
        f"`pip install tensorflow` (c4 also needs apache-beam), then "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR`. "
        f"Reading a prepared copy needs no TensorFlow.") from e


def _text(example: dict, key: str) -> str:
  value = example[key]
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsTokenData:
  """Language-modelling batches from a tensorflow-datasets text corpus, tokenized on the fly.

  ``batch(step, ...)``: documents drawn uniformly with ``np.random.default_rng((seed, step))``, each
  followed by ``eot_id``, packed into one stream that starts at a random offset inside the first document
  and is cut into the batch's rows. Documents are drawn and tokenized in groups: ``DOCS_PER_DRAW`` first,
  then as many as the mean length so far says are still needed (plus 10%, within [16, 4096]), so a step
  costs few ``encode_batch`` calls whether documents are sentences (lm1b) or pages (c4).
  ``val_batches``: the validation documents in order, windowed like ``TokenData.val_batches``. The token
  count of a split is unknown without a full pass: ``num_documents`` / ``num_val_documents`` instead.
  """

  DOCS_PER_DRAW = 64  # part of the batch recipe (as is the group-size rule): changing it changes batches

  def __init__(self, train_source: Sequence[dict], val_source: Sequence[dict], tokenizer: Tokenizer, *,
               seed: int = 0, text_key: str = "text"):
    self.train_source = train_source
    self.val_source = val_source
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.text_key = text_key

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_documents(self) -> int:
    return len(self.train_source)

  @property
  def num_val_documents(self) -> int:
    return len(self.val_source)

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  def _encode(self, source: Sequence[dict], indices: Iterable[int]) -> list[np.ndarray]:
    texts = [_text(source[int(i)], self.text_key) for i in indices]
    eot = np.array([self.tokenizer.eot_id], np.int32)
    return [np.concatenate([ids, eot]) for ids in self.tokenizer.encode_batch(texts)]

  def batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """int32 ``[batch_size, seq_len + 1]`` packed training rows, a function of (seed, step)."""
    n = self.num_documents
    if n == 0:
      raise ValueError("the training split has no documents")
    rng = np.random.default_rng((self.seed, _check_step(step)))
    need = batch_size * (seq_len + 1)
    parts, have, drawn, draw = [], 0, 0, self.DOCS_PER_DRAW
    while have < need:
      for ids in self._encode(self.train_source, rng.integers(0, n, size=draw)):
        if not parts:
          ids = ids[rng.integers(0, len(ids)):]
        parts.append(ids)
        have += len(ids)
      drawn += draw
      draw = int(min(4096, max(16, np.ceil(1.1 * (need - have) * drawn / max(have, 1)))))
    return np.concatenate(parts)[:need].reshape(batch_size, seq_len + 1)

  def val_batches(self, batch_size: int, seq_len: int, *, drop_remainder: bool = False,
                  max_batches: int | None = None, docs_per_chunk: int = 256) -> Iterator[np.ndarray]:
    """int32 ``[batch_size, seq_len + 1]`` windows over the validation documents in order."""
    def chunks():
      for i in range(0, self.num_val_documents, docs_per_chunk):
        ids = self._encode(self.val_source, range(i, min(i + docs_per_chunk, self.num_val_documents)))
        yield np.concatenate(ids)
    pad_row = np.full(seq_len + 1, self.pad_id, np.int32)
    windows = _windows(chunks(), seq_len, self.pad_id, drop_remainder)
    return _batched(windows, batch_size, pad_row, drop_remainder, max_batches)


_VAL_SPLITS = {"lm1b": "test", "c4": "validation"}


def tfds_text(name: str = "lm1b", *, train_split: str = "train", val_split: str | None = None,
              data_dir: str | os.PathLike | None = None, tokenizer: Tokenizer | None = None,
              seed: int = 0, text_key: str = "text", cache_dir: str | os.PathLike | None = None
              ) -> TfdsTokenData:
  """Language modelling on a tensorflow-datasets text corpus (``lm1b``, ``c4/en``, ...).

  Args:
    name: the tfds name, e.g. ``"lm1b"`` or ``"c4/en"``.
    train_split, val_split: split names; ``val_split`` defaults to ``"test"`` for lm1b and
      ``"validation"`` for c4.
    data_dir: the tfds data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    tokenizer: defaults to the standard-library tokenizer (``stdlib_tokenizer()``, 32768 entries), so
      the pod runs share the CPU runs' vocabulary; ``train_tokenizer(texts)`` gives a corpus-specific one.
    seed: the batch seed.
    text_key: the feature holding the text.
    cache_dir: where the default tokenizer is cached.
  """
  if val_split is None:
    val_split = _VAL_SPLITS.get(name.split("/")[0], "validation")
  train = tfds_source(name, train_split, data_dir=data_dir)
  val = tfds_source(name, val_split, data_dir=data_dir)
  if tokenizer is None:
    tokenizer = stdlib_tokenizer(cache_dir=cache_dir)
  return TfdsTokenData(train, val, tokenizer, seed=seed, text_key=text_key)


# ----------------------------------------------------------------------------------------------------
# Classification


class ClassificationData:
  """Classification batches from in-memory arrays (``cifar100`` and ``synthetic_classification``).

  ``batch(step, batch_size)`` reads position ``p = step * batch_size + i`` of an endless sequence of
  epochs, epoch ``e`` being the permutation ``np.random.default_rng((seed, e)).permutation(num_train)``:
  each epoch visits every example once, and the batch depends on (seed, step) alone.

  Attributes:
    x_train, x_val: float32 ``[N, *input_shape]``.
    y_train, y_val: int32 ``[N]`` in ``[0, num_classes)``.
  """

  def __init__(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
               num_classes: int, seed: int = 0, info: dict[str, Any] | None = None):
    if len(x_train) != len(y_train) or len(x_val) != len(y_val):
      raise ValueError(f"inputs and labels differ in length: {len(x_train)} vs {len(y_train)} (train), "
                       f"{len(x_val)} vs {len(y_val)} (val)")
    self.x_train = np.asarray(x_train, np.float32)
    self.y_train = np.asarray(y_train, np.int32)
    self.x_val = np.asarray(x_val, np.float32)
    self.y_val = np.asarray(y_val, np.int32)
    self.num_classes = int(num_classes)
    self.seed = int(seed)
    self.info = dict(info or {})
    self._perms: dict[int, np.ndarray] = {}

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  @property
  def num_train(self) -> int:
    return len(self.y_train)

  @property
  def num_val(self) -> int:
    return len(self.y_val)

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_train)
    return self._perms[epoch]

  def train_indices(self, step: int, batch_size: int) -> np.ndarray:
    """The training-example indices of ``batch(step, batch_size)``."""
    pos = _check_step(step) * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(pos, self.num_train)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._perm(int(e))[offsets[sel]]
    return out

  def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 ``[batch_size, *input_shape]``, y int32 ``[batch_size]``) for training step ``step``."""
    idx = self.train_indices(step, batch_size)
    return self.x_train[idx], self.y_train[idx]

  def val_batches(self, batch_size: int, *, drop_remainder: bool = False
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches in order; the last is padded with zeros and label ``-1`` unless dropped."""
    for start in range(0, self.num_val, batch_size):
      x, y = self.x_val[start:start + batch_size], self.y_val[start:start + batch_size]
      if len(y) < batch_size:
        if drop_remainder:
          return
        pad = batch_size - len(y)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        y = np.concatenate([y, np.full(pad, -1, np.int32)])
      yield x, y


def synthetic_classification(num_classes: int = 100, dim: int = 64, n_train: int = 50_000,
                             n_val: int = 10_000, *, separation: float = 4.0,
                             num_superclasses: int | None = None, hierarchy: float = 0.5,
                             seed: int = 0) -> ClassificationData:
  """Gaussian class clusters with a superclass structure: an offline stand-in for CIFAR-100.

  Class ``c`` belongs to superclass ``g(c) = c * num_superclasses // num_classes`` (default
  ``num_superclasses = max(1, num_classes // 5)``: 20 for 100 classes, as in CIFAR-100) and has mean
  ``m_c = separation / sqrt(2 dim) * (sqrt(hierarchy) z_g(c) + sqrt(1 - hierarchy) u_c)`` with
  ``z, u ~ N(0, I_dim)``; inputs are ``x = m_y + N(0, I_dim)``, labels uniform. Two means lie about
  ``separation`` noise standard deviations apart (``separation * sqrt(1 - hierarchy)`` within a
  superclass), so ``separation`` sets the difficulty and ``hierarchy`` how much "dark knowledge" (similar
  classes) a teacher's soft labels carry. Deterministic in ``seed``; train and val share the means.
  """
  if not 0.0 <= hierarchy < 1.0:
    raise ValueError(f"hierarchy must lie in [0, 1), got {hierarchy}")
  if num_superclasses is None:
    num_superclasses = max(1, num_classes // 5)
  if not 1 <= num_superclasses <= num_classes:
    raise ValueError(f"num_superclasses must lie in [1, num_classes], got {num_superclasses}")
  rng = np.random.default_rng(seed)
  coarse = rng.standard_normal((num_superclasses, dim))
  fine = rng.standard_normal((num_classes, dim))
  group = np.arange(num_classes) * num_superclasses // num_classes
  mixed = np.sqrt(hierarchy) * coarse[group] + np.sqrt(1 - hierarchy) * fine
  means = separation / np.sqrt(2 * dim) * mixed

  def sample(n):
    y = rng.integers(0, num_classes, size=n)
    return (means[y] + rng.standard_normal((n, dim))).astype(np.float32), y.astype(np.int32)

  x_train, y_train = sample(n_train)
  x_val, y_val = sample(n_val)
  info = {"dataset": "synthetic", "means": means.astype(np.float32), "superclass": group,
          "separation": separation, "hierarchy": hierarchy}
  return ClassificationData(x_train, y_train, x_val, y_val, num_classes=num_classes, seed=seed, info=info)


def cifar100(*, data_dir: str | os.PathLike | None = None, label_key: str = "label", seed: int = 0,
             max_examples: int | None = None) -> ClassificationData:
  """CIFAR-100 from tensorflow-datasets: train split for training, test split for validation.

  Images are float32 ``[N, 32, 32, 3]``, scaled to [0, 1] and then standardized per channel with the
  mean and standard deviation of the (loaded) training images; labels are int32 fine labels (100
  classes) or, with ``label_key="coarse_label"``, the 20 superclasses. ``max_examples`` loads only the
  first examples of each split (quick runs). See the module docstring for what needs TensorFlow.
  """
  num_classes = {"label": 100, "coarse_label": 20}[label_key]
  arrays = {}
  for split in ("train", "test"):
    source = tfds_source("cifar100", split, data_dir=data_dir)
    n = len(source) if max_examples is None else min(max_examples, len(source))
    examples = [source[i] for i in range(n)]
    images = np.zeros((n, 32, 32, 3), np.uint8)
    for i, ex in enumerate(examples):
      images[i] = np.asarray(ex["image"], np.uint8)
    labels = np.array([int(ex[label_key]) for ex in examples], np.int32)
    arrays[split] = (images, labels)
  train_images = arrays["train"][0].astype(np.float64) / 255.0
  mean = train_images.mean(axis=(0, 1, 2))
  std = train_images.std(axis=(0, 1, 2))
  std = np.where(std > 0, std, 1.0)

  def normalize(images):
    return ((images.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)

  info = {"dataset": "cifar100", "label_key": label_key, "mean": mean, "std": std}
  (x_train, y_train), (x_val, y_val) = arrays["train"], arrays["test"]
  return ClassificationData(normalize(x_train), y_train, normalize(x_val), y_val, num_classes=num_classes,
                            seed=seed, info=info)


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
  parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
  parser.add_argument("--max-files", type=int, default=None)
  parser.add_argument("--min-frequency", type=int, default=2)
  parser.add_argument("--include-tests", action="store_true")
  parser.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  data = stdlib_data(vocab_size=args.vocab_size, val_fraction=args.val_fraction, max_files=args.max_files,
                     include_tests=args.include_tests, min_frequency=args.min_frequency,
                     cache_dir=args.cache_dir)
  total = time.perf_counter() - start
  info = data.info
  trained = info["tokenizer_train_seconds"]
  print(f"corpus: {info['root']}: {info['train_files']} train files "
        f"({info['train_bytes'] / 1e6:.2f} MB), "
        f"{info['val_files']} val files ({info['val_bytes'] / 1e6:.2f} MB)")
  print(f"tokenizer: vocab {data.vocab_size}, "
        + (f"trained in {trained:.1f} s" if trained is not None else "loaded from the cache")
        + f" ({info['tokenizer_path']})")
  print(f"tokens: {data.num_tokens:,} train, {data.num_val_tokens:,} val, {data.train_tokens.dtype} "
        f"({info['tokens_dir']}); {info['train_bytes'] / max(data.num_tokens, 1):.2f} bytes/token")
  print(f"total: {total:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
