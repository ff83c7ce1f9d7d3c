"""experiments.data: corpus, split, tokenizer, cache, LM and classification batches, tfds (offline)."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from experiments import data

VOCAB = 512
MAX_FILES = 30
VAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def small(cache_dir):
  return data.stdlib_data(vocab_size=VOCAB, max_files=MAX_FILES, val_fraction=VAL_FRACTION,
                          cache_dir=cache_dir, seed=3)


@pytest.fixture(scope="module")
def small_docs():
  return data.split_documents(data.stdlib_corpus(max_files=MAX_FILES), val_fraction=VAL_FRACTION)


# ----------------------------------------------------------------------------------------------------
# Corpus and split


def test_stdlib_files_sorted_filtered_and_deterministic():
  files = data.stdlib_files()
  assert files == sorted(files) and len(set(files)) == len(files) and len(files) > 100
  assert all(f.endswith(".py") for f in files)
  for f in files:
    dirs = set(pathlib.PurePosixPath(f).parts[:-1])
    assert not dirs & (data.THIRD_PARTY_DIRS | data.TEST_DIRS), f
  with_tests = data.stdlib_files(include_tests=True)
  assert set(files) < set(with_tests)
  assert data.stdlib_files(max_files=7) == files[:7]
  a, b = data.stdlib_corpus(max_files=12), data.stdlib_corpus(max_files=12)
  assert a == b and [d.path for d in a] == files[:12]
  assert data.corpus_fingerprint(a) == data.corpus_fingerprint(b)
  changed = [a[0].__class__(a[0].path, a[0].text + " ")] + a[1:]
  assert data.corpus_fingerprint(changed) != data.corpus_fingerprint(a)
  # Moving text between the path and the body must change the fingerprint too.
  assert (data.corpus_fingerprint([data.Document("ab", "c")])
          != data.corpus_fingerprint([data.Document("a", "bc")]))


def test_corpus_rules_on_a_made_up_root(tmp_path):
  files = {"b.py": "b = 1\n", "a/x.py": "x = 'é'\n", "a/test/t.py": "t\n", "tests/u.py": "u\n",
           "site-packages/pkg/m.py": "m\n", "idlelib/idle_test/i.py": "i\n", "notes.txt": "n\n"}
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text, encoding="utf-8")
  (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
  docs = data.stdlib_corpus(root=tmp_path)
  assert [d.path for d in docs] == ["a/x.py", "b.py"]  # sorted; latin1.py is skipped as not UTF-8
  assert docs[0].text == "x = 'é'\n"
  assert data.stdlib_files(root=tmp_path, include_tests=True) == [
      "a/test/t.py", "a/x.py", "b.py", "idlelib/idle_test/i.py", "latin1.py", "tests/u.py"]


def test_split_depends_on_the_path_alone():
  files = data.stdlib_files(include_tests=True)
  splits = {f: data.split_of(f, 0.1) for f in files}
  # Same split inside any subset of the corpus: nothing moves when files are added or removed.
  docs = data.stdlib_corpus(max_files=80)
  train, val = data.split_documents(docs, val_fraction=0.1)
  assert {d.path for d in val} == {d.path for d in docs if splits[d.path] == "val"}
  assert {d.path for d in train} == {d.path for d in docs if splits[d.path] == "train"}
  assert [d.path for d in train] == sorted(d.path for d in train)
  # About val_fraction of the files (binomial: 5 standard deviations).
  n, frac = len(files), sum(s == "val" for s in splits.values()) / len(files)
  assert abs(frac - 0.1) < 5 * np.sqrt(0.1 * 0.9 / n)
  # Raising the fraction only moves files from train to val.
  assert all(data.split_of(f, 0.3) == "val" for f, s in splits.items() if s == "val")
  assert all(data.split_of(f, 0.0) == "train" and data.split_of(f, 1.0) == "val" for f in files[:50])
  with pytest.raises(ValueError, match="val_fraction"):
    data.split_of("a.py", 1.5)


# ----------------------------------------------------------------------------------------------------
# Tokenizer and cache


def test_tokenizer_round_trip_and_special_tokens(small, small_docs):
  tok = small.tokenizer
  assert tok.vocab_size == small.vocab_size == VOCAB
  assert (tok.eot_id, tok.pad_id) == (0, 1)
  assert tok.decode([tok.eot_id, tok.pad_id]) == data.EOT + data.PAD
  _, val = small_docs
  snippets = [d.text[:3000] for d in val] + [val[0].text, "", " \t\r\n  x", "naïve 漢字 🙂 \x00\x7f",
                                            "a = '<|endoftext|>'  # <|pad|>"]
  for text in snippets:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ((ids >= 0) & (ids < VOCAB)).all()
    assert tok.decode(ids) == text
    # Only the pipeline emits the special ids, even for text that spells them.
    assert not np.isin(ids, [tok.eot_id, tok.pad_id]).any()
  batch = tok.encode_batch(snippets)
  assert all(np.array_equal(a, tok.encode(t)) for a, t in zip(batch, snippets))
  # Merges were learned: code compresses well below one token per byte.
  text = val[0].text
  assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_token_arrays_are_the_encoded_documents(small, small_docs):
  train, val = small_docs
  assert small.train_tokens.dtype == np.uint16 and small.val_tokens.dtype == np.uint16
  assert data.token_dtype(65536) == np.uint16 and data.token_dtype(65537) == np.int32
  for tokens, docs in ((small.train_tokens, train), (small.val_tokens, val)):
    expected = np.concatenate([np.append(small.tokenizer.encode(d.text), 0) for d in docs])
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert (np.asarray(tokens) == small.tokenizer.eot_id).sum() == len(docs)
  assert small.num_tokens == len(small.train_tokens) and small.num_val_tokens == len(small.val_tokens)
  assert small.info["train_files"] == len(train) and small.info["val_files"] == len(val)


def test_second_call_loads_from_cache_and_changed_settings_retrain(small, cache_dir, monkeypatch):
  calls = []
  real_train, real_encode = data.train_tokenizer, data.encode_documents
  def spy(name, real):
    return lambda *a, **k: calls.append(name) or real(*a, **k)
  monkeypatch.setattr(data, "train_tokenizer", spy("train", real_train))
  monkeypatch.setattr(data, "encode_documents", spy("encode", real_encode))
  paths = [pathlib.Path(small.info["tokenizer_path"])]
  paths += [pathlib.Path(small.info["tokens_dir"]) / f for f in ("train.npy", "val.npy", "meta.json")]
  mtimes = [p.stat().st_mtime_ns for p in paths]

  again = data.stdlib_data(vocab_size=VOCAB, max_files=MAX_FILES, val_fraction=VAL_FRACTION,
                           cache_dir=cache_dir, seed=3)
  assert calls == [] and again.info["tokenizer_train_seconds"] is None
  assert [p.stat().st_mtime_ns for p in paths] == mtimes
  np.testing.assert_array_equal(again.train_tokens, small.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, small.val_tokens)
  assert again.tokenizer.backend.to_str() == small.tokenizer.backend.to_str()
  np.testing.assert_array_equal(again.batch(5, 4, 16), small.batch(5, 4, 16))

  other = data.stdlib_data(vocab_size=VOCAB + 64, max_files=MAX_FILES, val_fraction=VAL_FRACTION,
                           cache_dir=cache_dir)
  assert calls == ["train", "encode", "encode"] and other.vocab_size == VOCAB + 64
  assert other.info["tokenizer_path"] != small.info["tokenizer_path"]
  calls.clear()
  moved = data.stdlib_data(vocab_size=VOCAB, max_files=MAX_FILES, val_fraction=0.5, cache_dir=cache_dir)
  assert calls == ["train", "encode", "encode"]  # another train split: another tokenizer
  assert moved.info["tokenizer_path"] != small.info["tokenizer_path"]
  calls.clear()
  assert data.stdlib_tokenizer(vocab_size=VOCAB, max_files=MAX_FILES, val_fraction=VAL_FRACTION,
                               cache_dir=cache_dir).vocab_size == VOCAB
  assert calls == []
  assert set(os.listdir(cache_dir)) == {pathlib.Path(d.info["tokenizer_path"]).parent.name
                                        for d in (small, other, moved)}


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("LOGITLAB_DATA_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert data.default_cache_dir() == tmp_path / "logitlab" / "data"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert data.default_cache_dir() == pathlib.Path.home() / ".cache" / "logitlab" / "data"
  monkeypatch.setenv("LOGITLAB_DATA_CACHE", str(tmp_path / "c"))
  assert data.default_cache_dir() == tmp_path / "c"


# ----------------------------------------------------------------------------------------------------
# Language-modelling batches


def test_batch_shapes_windows_and_determinism(small):
  b, seq = 8, 32
  x = small.batch(0, b, seq)
  assert x.shape == (b, seq + 1) and x.dtype == np.int32
  assert ((x >= 0) & (x < small.vocab_size)).all()
  # Every row is a contiguous window of the training stream.
  windows = np.lib.stride_tricks.sliding_window_view(np.asarray(small.train_tokens, np.int32), seq + 1)
  for row in x:
    assert (windows == row).all(axis=1).any()
  np.testing.assert_array_equal(small.batch(0, b, seq), x)
  assert not np.array_equal(small.batch(1, b, seq), x)
  # Resume: a fresh object (as after a restart) reproduces step k without replaying steps 0..k-1.
  fresh = data.TokenData(small.train_tokens, small.val_tokens, small.tokenizer, seed=small.seed)
  for step in (7, 3, 1000):
    np.testing.assert_array_equal(fresh.batch(step, b, seq), small.batch(step, b, seq))
  other_seed = data.TokenData(small.train_tokens, small.val_tokens, small.tokenizer, seed=small.seed + 1)
  assert not np.array_equal(other_seed.batch(0, b, seq), x)
  # Positions spread over the whole stream.
  starts = np.random.default_rng((small.seed, 0)).integers(0, small.num_tokens - seq, size=b)
  np.testing.assert_array_equal(x[:, 0], np.asarray(small.train_tokens)[starts])
  with pytest.raises(ValueError, match="step"):
    small.batch(-1, b, seq)
  with pytest.raises(ValueError, match="training tokens"):
    small.batch(0, 1, small.num_tokens)


@pytest.mark.parametrize("batch_size,seq_len", [(4, 64), (3, 17)])
def test_val_batches_cover_the_val_tokens_once(small, batch_size, seq_len):
  val = np.asarray(small.val_tokens, np.int32)
  batches = list(small.val_batches(batch_size, seq_len))
  assert all(x.shape == (batch_size, seq_len + 1) and x.dtype == np.int32 for x in batches)
  rows = np.concatenate(batches)
  inputs, targets = rows[:, :-1].reshape(-1), rows[:, 1:].reshape(-1)
  pad = small.pad_id
  np.testing.assert_array_equal(targets[targets != pad], val[1:])  # each target exactly once, in order
  np.testing.assert_array_equal(inputs[targets != pad], val[:-1])  # ... predicted from its predecessor
  assert (rows[-1] == pad).any() or (len(val) - 1) % (batch_size * seq_len) == 0
  full = list(small.val_batches(batch_size, seq_len, drop_remainder=True))
  assert len(full) == (len(val) - 1) // seq_len // batch_size
  assert not any((x == pad).any() for x in full)
  for x, y in zip(full, batches):
    np.testing.assert_array_equal(x, y)
  assert len(list(small.val_batches(batch_size, seq_len, max_batches=2))) == 2
  again = list(small.val_batches(batch_size, seq_len))
  assert all(np.array_equal(a, b) for a, b in zip(again, batches))


# ----------------------------------------------------------------------------------------------------
# Classification


def nearest_mean_accuracy(d):
  means = d.info["means"]
  dist = ((d.x_val[:, None, :] - means[None]) ** 2).sum(-1)
  return (dist.argmin(1) == d.y_val).mean()


def test_synthetic_classification_data():
  d = data.synthetic_classification(num_classes=10, dim=8, n_train=1000, n_val=500, separation=6.0,
                                    num_superclasses=2, hierarchy=0.6, seed=1)
  assert d.x_train.shape == (1000, 8) and d.x_val.shape == (500, 8) and d.input_shape == (8,)
  assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32 and d.num_classes == 10
  assert set(np.unique(d.y_train)) == set(range(10))
  same = data.synthetic_classification(num_classes=10, dim=8, n_train=1000, n_val=500, separation=6.0,
                                       num_superclasses=2, hierarchy=0.6, seed=1)
  np.testing.assert_array_equal(same.x_train, d.x_train)
  np.testing.assert_array_equal(same.y_val, d.y_val)
  other = data.synthetic_classification(num_classes=10, dim=8, n_train=1000, n_val=500, seed=2)
  assert not np.array_equal(other.x_train, d.x_train)
  # Residuals around the class means are standard normal.
  resid = d.x_train - d.info["means"][d.y_train]
  assert abs(resid.mean()) < 0.05 and abs(resid.std() - 1) < 0.05
  # Separation sets the difficulty; chance is 0.1.
  accs = [nearest_mean_accuracy(data.synthetic_classification(
      num_classes=10, dim=8, n_train=10, n_val=2000, separation=s, seed=4)) for s in (0.5, 3, 8)]
  assert 0.05 < accs[0] < accs[1] < accs[2] and accs[2] > 0.9
  # Classes of one superclass lie closer together than classes of different superclasses.
  means, group = d.info["means"], d.info["superclass"]
  dist = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))
  same_group = group[:, None] == group[None]
  off_diag = ~np.eye(10, dtype=bool)
  assert dist[same_group & off_diag].mean() < dist[~same_group].mean()
  with pytest.raises(ValueError, match="hierarchy"):
    data.synthetic_classification(hierarchy=1.0)


def test_classification_batches_are_epochs_and_deterministic():
  d = data.synthetic_classification(num_classes=5, dim=3, n_train=60, n_val=25, seed=0)
  b = 12
  x, y = d.batch(0, b)
  assert x.shape == (b, 3) and x.dtype == np.float32 and y.shape == (b,) and y.dtype == np.int32
  np.testing.assert_array_equal(d.batch(0, b)[0], x)
  assert not np.array_equal(d.batch(1, b)[0], x)
  # One epoch (60 / 12 = 5 steps) visits every example once; the next epoch reshuffles.
  epoch0 = np.concatenate([d.train_indices(s, b) for s in range(5)])
  epoch1 = np.concatenate([d.train_indices(s, b) for s in range(5, 10)])
  assert sorted(epoch0) == list(range(60)) and sorted(epoch1) == list(range(60))
  assert not np.array_equal(epoch0, epoch1)
  # Batches that straddle epochs, and a fresh object (resume), agree with the same positions.
  fresh = data.ClassificationData(d.x_train, d.y_train, d.x_val, d.y_val, num_classes=5, seed=0)
  straddle = np.concatenate([fresh.train_indices(s, 7) for s in range(16)])  # 112 positions
  np.testing.assert_array_equal(straddle[:60], epoch0)
  np.testing.assert_array_equal(straddle[60:112], epoch1[:52])
  np.testing.assert_array_equal(fresh.batch(9, 7)[1], d.y_train[fresh.train_indices(9, 7)])
  # Validation: in order, padded with label -1 unless dropped.
  batches = list(d.val_batches(10))
  assert [bx.shape for bx, _ in batches] == [(10, 3)] * 3
  ys = np.concatenate([by for _, by in batches])
  np.testing.assert_array_equal(ys[:25], d.y_val)
  assert (ys[25:] == -1).all()
  np.testing.assert_array_equal(np.concatenate([bx for bx, _ in batches])[:25], d.x_val)
  assert len(list(d.val_batches(10, drop_remainder=True))) == 2


# ----------------------------------------------------------------------------------------------------
# tensorflow-datasets, offline


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def test_cifar100_with_mock_data(tfds):
  with tfds.testing.mock_data(num_examples=40):
    d = data.cifar100(seed=1)
    coarse = data.cifar100(label_key="coarse_label", max_examples=10)
  assert d.x_train.shape == (40, 32, 32, 3) and d.x_train.dtype == np.float32
  assert d.x_val.shape == (40, 32, 32, 3) and d.y_val.dtype == np.int32
  assert d.num_classes == 100 and ((d.y_train >= 0) & (d.y_train < 100)).all()
  assert len(np.unique(d.y_train)) > 5
  # Standardized per channel with the training images' statistics.
  np.testing.assert_allclose(d.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(d.x_train.std(axis=(0, 1, 2)), 1, atol=1e-4)
  raw = d.x_train * d.info["std"] + d.info["mean"]
  np.testing.assert_allclose(raw * 255, np.round(raw * 255), atol=1e-3)  # from uint8 pixels
  x, y = d.batch(3, 16)
  assert x.shape == (16, 32, 32, 3) and y.dtype == np.int32
  np.testing.assert_array_equal(d.batch(3, 16)[0], x)
  assert coarse.num_classes == 20 and coarse.x_train.shape == (10, 32, 32, 3)
  assert ((coarse.y_train >= 0) & (coarse.y_train < 20)).all()


@pytest.mark.parametrize("name", ["lm1b", "c4/en"])
def test_tfds_text_with_mock_data(tfds, small, name):
  with tfds.testing.mock_data(num_examples=30):
    lm = data.tfds_text(name, tokenizer=small.tokenizer, seed=2)
    val_texts = [data._text(lm.val_source[i], "text") for i in range(lm.num_val_documents)]
    x = lm.batch(4, 3, 20)
    assert x.shape == (3, 21) and x.dtype == np.int32
    assert ((x >= 0) & (x < small.vocab_size)).all()
    np.testing.assert_array_equal(lm.batch(4, 3, 20), x)
    assert not np.array_equal(lm.batch(5, 3, 20), x)
    resumed = data.TfdsTokenData(lm.train_source, lm.val_source, small.tokenizer, seed=2)
    np.testing.assert_array_equal(resumed.batch(4, 3, 20), x)
    rows = np.concatenate(list(lm.val_batches(2, 8, docs_per_chunk=7)))
  assert lm.num_documents == 30 and lm.vocab_size == small.vocab_size
  eot = small.tokenizer.eot_id
  stream = np.concatenate([np.append(small.tokenizer.encode(t), eot) for t in val_texts])
  targets = rows[:, 1:].reshape(-1)
  np.testing.assert_array_equal(targets[targets != small.pad_id], stream[1:])


def test_reading_a_prepared_array_record_dataset_without_tensorflow(tfds, small, tmp_path):
  """The unmocked read path (bytes from ArrayRecord) that pod runs use, on a tiny prepared dataset."""

  class LogitlabTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

    def _generate_examples(self, split):
      for i in range(12):
        yield i, {"text": f"def f{split}_{i}(x):\n    return x * {i}  # ünïcode\n"}

  builder = LogitlabTinyText(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  train, test = builder.as_data_source(split="train"), builder.as_data_source(split="test")
  assert isinstance(train[0]["text"], bytes)
  lm = data.TfdsTokenData(train, test, small.tokenizer, seed=0)
  x = lm.batch(0, 2, 64)
  assert x.shape == (2, 65)
  # Between two end-of-text ids the packed stream holds whole training documents.
  train_ids = {tuple(small.tokenizer.encode(train[i]["text"].decode())) for i in range(len(train))}
  stream = x.reshape(-1)
  ends = np.flatnonzero(stream == small.tokenizer.eot_id)
  assert len(ends) >= 3
  for a, b in zip(ends[:-1], ends[1:]):
    assert tuple(stream[a + 1:b]) in train_ids
  texts = [test[i]["text"].decode() for i in range(len(test))]
  stream = np.concatenate([np.append(small.tokenizer.encode(t), 0) for t in texts])
  rows = np.concatenate(list(lm.val_batches(2, 16)))
  targets = rows[:, 1:].reshape(-1)
  np.testing.assert_array_equal(targets[targets != small.pad_id], stream[1:])
  assert "ünïcode" in small.tokenizer.decode(stream)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow installed the loader would try to download")
def test_unprepared_dataset_without_tensorflow_names_the_fix(tfds, tmp_path):
  with pytest.raises(ImportError, match="pip install tensorflow"):
    data.tfds_source("cifar100", "train", data_dir=tmp_path)
