"""Vocabulary-parallel fused cross-entropy on 8 fake CPU devices.

``linear_cross_entropy(..., vocab_axis=...)`` inside ``jax.shard_map`` and its
wrapper ``vocab_parallel_linear_cross_entropy`` hold a ``[V / P, D]`` slice of the
output layer per device. Their values and gradients (hidden, weight, bias) are
checked against the unsharded ``linear_cross_entropy`` and an independent float64
numpy reference, on a vocabulary-only mesh (8,) and a data x vocabulary mesh
(2, 4), with ragged shards (37 and 74 rows for block_vocab=16), labels on every
shard and on both sides of every shard boundary, both smoothing conventions,
z-loss, softcap, masks with fully masked rows, shift, bf16, the Pallas kernels in
interpret mode, and a lowered module without any [tokens, vocabulary] array.

The device count is fixed when jax initializes, so the checks run in one fresh
interpreter (``XLA_FLAGS`` set before jax is imported) that reports each check by
name; every configuration is compiled once and shared by its assertions.
"""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
  import re
  import traceback

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P

  import logitlab

  assert jax.device_count() == 8, jax.devices()
  D = 20
  SHARD = 37                       # rows per device on the (8,) mesh; 74 on (2, 4)
  V = 8 * SHARD
  BLOCKS = dict(block_tokens=8, block_vocab=16)     # 37 = 2 * 16 + 5, 74 = 4 * 16 + 10
  # First and last id of each (8,)-shard: they include every (2, 4)-shard's too.
  BOUNDARY = np.ravel([[k * SHARD, k * SHARD + SHARD - 1] for k in range(8)])
  VOCAB_ONLY = jax.make_mesh((8,), ("vocab",))                         # Explicit axes
  DATA_VOCAB = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "vocab"))   # Auto axes


  def inputs(shape, seed, dtype=jnp.float32, bias=True, scale=1.0):
    # Random inputs; the first 16 labels are the shard boundaries, the rest random.
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    labels = np.concatenate([BOUNDARY, rng.integers(0, V, size=n - BOUNDARY.size)])
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    return dict(
        hidden=cast(rng.normal(size=shape + (D,)) * scale),
        weight=cast(rng.normal(size=(V, D)) * 1.5 / np.sqrt(D)),
        bias=cast(rng.normal(size=(V,)) * 0.5) if bias else None,
        labels=jnp.asarray(rng.permutation(labels).reshape(shape), jnp.int32),
        cot=jnp.asarray(rng.uniform(0.2, 2.0, size=shape), jnp.float32),
        lse_cot=jnp.asarray(rng.normal(size=shape), jnp.float32))


  def objective(loss_fn, options):
    # (hidden, weight, bias) -> (loss, lse, (d_hidden, d_weight, d_bias)) of
    # sum(cot * loss) + sum(lse_cot * lse).
    def run(hidden, weight, bias, labels, cot, lse_cot, where):
      def total(hidden, weight, bias):
        loss, lse = loss_fn(hidden, weight, labels, bias=bias, where=where, return_lse=True,
                            **options)
        return jnp.sum(cot * loss) + jnp.sum(lse_cot * lse), (loss, lse)
      (_, (loss, lse)), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(
          hidden, weight, bias)
      return loss, lse, grads
    return run


  def numpy_reference(x, where, *, ignore_index=None, shift=0, label_smoothing=0.0,
                      smoothing="uniform", z_loss=0.0, softcap=None, **unused):
    # float64 loss, lse and analytic gradients, from the math.
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    h, w = f64(x["hidden"]).reshape(-1, D), f64(x["weight"])
    labels = np.asarray(x["labels"])
    valid = np.broadcast_to(np.asarray(where), labels.shape).copy()
    if ignore_index is not None:
      valid &= labels != ignore_index
    if shift:
      labels = np.concatenate([labels[..., shift:], np.zeros_like(labels[..., :shift])], -1)
      valid = np.concatenate([valid[..., shift:], np.zeros_like(valid[..., :shift])], -1)
    y, m = labels.reshape(-1), valid.reshape(-1)
    raw = h @ w.T + (0.0 if x["bias"] is None else f64(x["bias"]))
    z = raw if softcap is None else softcap * np.tanh(raw / softcap)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    onehot = np.arange(V)[None, :] == np.where(m, y, 0)[:, None]
    eps = label_smoothing
    if smoothing == "uniform":
      q, neg_entropy = (1 - eps) * onehot + eps / V, 0.0
    else:
      q = np.where(onehot, 1 - eps, eps / (V - 1))
      neg_entropy = np.sum(q * np.log(np.maximum(q, 1e-300)), axis=1)
    loss = lse - np.sum(q * z, axis=1) + neg_entropy + z_loss * lse**2
    p = np.exp(z - lse[:, None])
    cot, lse_cot = f64(x["cot"]).reshape(-1), f64(x["lse_cot"]).reshape(-1)
    g = cot[:, None] * ((1 + 2 * z_loss * lse)[:, None] * p - q) + lse_cot[:, None] * p
    g = np.where(m[:, None], g, 0.0)
    if softcap is not None:
      g = g * (1 - (z / softcap) ** 2)
    shape = labels.shape
    grads = ((g @ w).reshape(shape + (D,)), g.T @ h, None if x["bias"] is None else g.sum(0))
    return np.where(m, loss, 0).reshape(shape), np.where(m, lse, 0).reshape(shape), grads


  def check(name, got, want, rtol):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), (name, len(got_leaves), len(want_leaves))
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
      g, w = np.asarray(jnp.asarray(g, jnp.float32), np.float64), np.asarray(w, np.float64)
      assert g.shape == w.shape, (name, i, g.shape, w.shape)
      assert np.all(np.isfinite(g)), (name, i)
      scale = float(np.max(np.abs(w)))
      assert scale > 0, (name, i)          # a vacuous all-zero comparison proves nothing
      np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=f"{name}: leaf {i}")


  def no_token_by_vocab_arrays(text, tokens, vocab):
    # No array in the module has a vocabulary-sized dimension (global or local) next
    # to at least a shard's worth of tokens: the weight [V_s, D] (D < tokens) passes,
    # any [tokens, V_s] logits or gradient would not.
    shapes = [tuple(int(s) for s in m.split("x")[:-1])
              for m in re.findall(r"tensor<([0-9x]+[a-z]+[0-9]*)>", text)]
    assert shapes, "no tensor types found"
    bad = [s for s in set(shapes) if any(
        s[k] in vocab and np.prod(s[:k] + s[k + 1:]) >= tokens for k in range(len(s)))]
    assert not bad, bad
    assert any(s == (vocab[-1], D) for s in shapes), "the local weight shard is missing"


  def sharded_and_unsharded(mesh, batch_axes, x, where, options, tokens_per_device):
    # Compiles the wrapper's value-and-grad once; checks its module, then returns it,
    # the unsharded function's and the float64 reference's results. mesh=None: the
    # mesh set with jax.set_mesh.
    def wrapper(hidden, weight, labels, **kw):
      return logitlab.vocab_parallel_linear_cross_entropy(
          hidden, weight, labels, vocab_axis="vocab", mesh=mesh, batch_axes=batch_axes, **kw)
    args = [x[k] for k in ("hidden", "weight", "bias", "labels", "cot", "lse_cot")] + [where]
    lowered = jax.jit(objective(wrapper, options)).lower(*args)
    local_vocab = V // (mesh or jax.sharding.get_abstract_mesh()).shape["vocab"]
    no_token_by_vocab_arrays(lowered.as_text(), tokens_per_device, (local_vocab, V))
    got = lowered.compile()(*args)
    unsharded = jax.jit(objective(logitlab.linear_cross_entropy, options))(*args)
    reference = numpy_reference(x, where, **options)
    return got, unsharded, reference


  RESULTS = {}


  def vocab_only_mesh_all_options():
    # (8,) mesh set with jax.set_mesh (mesh=None), Explicit axes, bias, uniform
    # smoothing, z-loss, softcap, ignore_index, lse cotangent.
    x = inputs((24,), seed=1)
    labels = np.asarray(x["labels"])
    ignored = np.flatnonzero(~np.isin(labels, BOUNDARY))[:3]
    x["labels"] = jnp.asarray(labels).at[ignored].set(-100)
    options = dict(ignore_index=-100, label_smoothing=0.1, smoothing="uniform", z_loss=1e-3,
                   softcap=4.0, **BLOCKS)
    with jax.set_mesh(VOCAB_ONLY):
      got, unsharded, reference = sharded_and_unsharded(
          None, None, x, jnp.ones((24,), bool), options, 24)
    check("vs unsharded", got, unsharded, 2e-5)
    check("vs float64", got, reference, 2e-5)
    assert np.all(np.asarray(got[0])[ignored] == 0)
    assert np.all(np.asarray(got[2][0])[ignored] == 0)
    RESULTS["vocab_only"] = (x, options, got)


  def data_vocab_mesh_t5x_masks_shift():
    # (2, 4) mesh, tokens over "data": t5x smoothing, no bias, `where` with a fully
    # masked sequence and scattered holes, shift=1 on [batch, seq, D].
    x = inputs((8, 6), seed=2, bias=False)
    where = jnp.asarray(np.random.default_rng(3).random((8, 6)) < 0.8).at[3].set(False)
    options = dict(label_smoothing=0.2, smoothing="t5x", shift=1, **BLOCKS)
    got, unsharded, reference = sharded_and_unsharded(
        DATA_VOCAB, "data", x, where, options, 24)
    check("vs unsharded", got, unsharded, 2e-5)
    check("vs float64", got, reference, 2e-5)
    for k, name in [(0, "loss"), (1, "lse")]:      # the masked sequence: exactly 0
      np.testing.assert_array_equal(np.asarray(got[k])[3], 0.0, err_msg=name)
    np.testing.assert_array_equal(np.asarray(got[2][0])[3], 0.0, err_msg="d_hidden")


  def bf16_data_vocab():
    # bf16 inputs on the (2, 4) mesh: |ref_f32 - impl| <= |ref_f32 - naive_bf16| + tol.
    x = inputs((8, 6), seed=4, dtype=jnp.bfloat16, scale=2.0)
    where = jnp.ones((8, 6), bool)
    options = dict(label_smoothing=0.1, z_loss=1e-3)
    got = jax.jit(objective(
        lambda h, w, y, **kw: logitlab.vocab_parallel_linear_cross_entropy(
            h, w, y, vocab_axis="vocab", mesh=DATA_VOCAB, batch_axes="data", **kw),
        dict(options, **BLOCKS)))
    args = lambda x: [x[k] for k in ("hidden", "weight", "bias", "labels", "cot", "lse_cot")]
    got = got(*args(x), where)
    def naive(h, w, y, *, bias, where, return_lse, **kw):
      logits = h @ w.T + bias                      # bf16 logits, as a bf16 model has them
      loss = logitlab.cross_entropy(logits, y, where=where, **kw)
      lse = jnp.where(where, jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1), 0.0)
      return loss, lse
    naive_bf16 = jax.jit(objective(naive, options))(*args(x), where)
    x32 = dict(x, **{k: x[k].astype(jnp.float32) for k in ("hidden", "weight", "bias")})
    ref = jax.jit(objective(naive, options))(*args(x32), where)
    assert got[0].dtype == jnp.float32 and [g.dtype for g in got[2]] == [jnp.bfloat16] * 3
    for name, impl, low, want in zip(["loss", "lse", "d_hidden", "d_weight", "d_bias"],
                                     *map(jax.tree.leaves, (got, naive_bf16, ref))):
      impl, low, want = (np.asarray(jnp.asarray(a, jnp.float32), np.float64)
                         for a in (impl, low, want))
      scale = np.max(np.abs(want))
      # One bf16 ulp for the final rounding of bf16 gradients, 1e-3 max|ref| for f32 sums.
      excess = np.abs(want - impl) - (np.abs(want - low) + 2.0**-7 * np.abs(want) + 1e-3 * scale)
      assert np.all(excess <= 0), f"{name}: worst excess {np.max(excess):.3g}"


  def shard_map_check_vma_grad_inside():
    # The keyword API in the caller's own shard_map (check_vma=True, jax's default),
    # gradient taken inside the body: d_hidden psummed over "vocab", d_weight over "data".
    x, options, want = RESULTS["vocab_only"]
    def body(hidden, weight, bias, labels, cot, lse_cot):
      def fn(h, w, y, **kw):
        return logitlab.linear_cross_entropy(h, w, y, vocab_axis="vocab", **kw)
      return objective(fn, options)(hidden, weight, bias, labels, cot, lse_cot, None)
    rows = P("data")
    step = jax.jit(jax.shard_map(
        body, mesh=DATA_VOCAB, in_specs=(rows, P("vocab", None), P("vocab"), rows, rows, rows),
        out_specs=(rows, rows, (rows, P("vocab", None), P("vocab"))), check_vma=True))
    got = step(*[x[k] for k in ("hidden", "weight", "bias", "labels", "cot", "lse_cot")])
    check("vs the wrapper on (8,)", got, want, 2e-5)


  def pallas_kernels_interpret():
    # Both Pallas backends on each device's shard (interpret mode), same case as above.
    x, options, want = RESULTS["vocab_only"]
    args = [x[k] for k in ("hidden", "weight", "bias", "labels", "cot", "lse_cot")]
    for impl, blocks in [("pallas_gpu", dict(block_tokens=16, block_vocab=16)),
                         ("pallas_tpu", dict())]:
      kernel_options = {k: v for k, v in options.items() if k not in BLOCKS}
      def wrapper(h, w, y, **kw):
        return logitlab.vocab_parallel_linear_cross_entropy(
            h, w, y, vocab_axis="vocab", mesh=DATA_VOCAB, impl=impl, interpret=True,
            **blocks, **kw)
      got = jax.jit(objective(wrapper, kernel_options))(*args, None)
      check(f"{impl} vs xla", got, want, 1e-4)


  def pmap_follows_jax_psum_rule():
    # Under pmap the loss equals the unsharded one; a gradient taken inside follows
    # jax's rules there, as documented: the replicated loss counts once per device
    # (psum transposes to psum, so P x) and d_hidden is each device's partial sum.
    x, options, want = RESULTS["vocab_only"]
    def per_device(hidden, weight, bias, labels, cot, lse_cot):
      def fn(h, w, y, **kw):
        return logitlab.linear_cross_entropy(h, w, y, vocab_axis="v", **kw)
      return objective(fn, options)(hidden, weight, bias, labels, cot, lse_cot, None)
    split = lambda a: a.reshape((8, -1) + a.shape[1:])
    loss, lse, (d_hidden, d_weight, d_bias) = jax.pmap(
        per_device, axis_name="v", in_axes=(None, 0, 0, None, None, None))(
        x["hidden"], split(x["weight"]), split(x["bias"]), x["labels"], x["cot"], x["lse_cot"])
    got = (loss[0], lse[0],
           (d_hidden.sum(0) / 8, d_weight.reshape(V, D) / 8, d_bias.reshape(V) / 8))
    check("pmap", got, want, 2e-5)


  def errors_are_clear():
    x = inputs((16,), seed=5)
    h, w, y = x["hidden"], x["weight"], x["labels"]
    lce = logitlab.linear_cross_entropy
    def raises(fn, *pieces):
      try:
        fn()
      except ValueError as e:
        assert all(p in str(e) for p in pieces), str(e)
      else:
        raise AssertionError(f"no ValueError with {pieces}")
    raises(lambda: lce(h, w, y, vocab_axis="vocab"), "vocab_axis", "not bound", "shard_map")
    def in_shard_map(w_spec, **kw):
      return lambda: jax.eval_shape(jax.shard_map(
          lambda h, w, y: lce(h, w, y, vocab_axis="vocab", **kw), mesh=DATA_VOCAB,
          in_specs=(P(), w_spec, P()), out_specs=P()), h, w, y)
    raises(in_shard_map(P()), "`weight`", "replicated", "P('vocab', None)")
    raises(in_shard_map(P("vocab", None), impl="pallas_tpu", interpret=True), "check_vma")
    raises(lambda: logitlab.vocab_parallel_linear_cross_entropy(
        h, w[:-1], y, vocab_axis="vocab", mesh=VOCAB_ONLY), "multiple", "(295, 20)")
    raises(lambda: logitlab.vocab_parallel_linear_cross_entropy(
        h, w, y, vocab_axis="model", mesh=VOCAB_ONLY), "vocab_axis", "'model'")


  for name, run in [("vocab_only_mesh_all_options", vocab_only_mesh_all_options),
                    ("data_vocab_mesh_t5x_masks_shift", data_vocab_mesh_t5x_masks_shift),
                    ("bf16_data_vocab", bf16_data_vocab),
                    ("shard_map_check_vma_grad_inside", shard_map_check_vma_grad_inside),
                    ("pallas_kernels_interpret", pallas_kernels_interpret),
                    ("pmap_follows_jax_psum_rule", pmap_follows_jax_psum_rule),
                    ("errors_are_clear", errors_are_clear)]:
    try:
      run()
      print(f"PASS {name}", flush=True)
    except Exception:
      print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
""")

CHECKS = ["vocab_only_mesh_all_options", "data_vocab_mesh_t5x_masks_shift", "bf16_data_vocab",
          "shard_map_check_vma_grad_inside", "pallas_kernels_interpret",
          "pmap_follows_jax_psum_rule", "errors_are_clear"]


@pytest.fixture(scope="module")
def script_output():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO_ROOT)
  return result


@pytest.mark.parametrize("name", CHECKS)
def test_vocab_parallel(script_output, name):
  out = script_output.stdout
  if f"PASS {name}\n" in out:
    return
  failure = re.search(rf"FAIL {name}\n(.*?)(?=^(?:PASS|FAIL) |\Z)", out, re.S | re.M)
  pytest.fail(failure.group(1) if failure else
              f"check {name!r} did not report (rc={script_output.returncode})\n"
              f"--- stdout ---\n{out}\n--- stderr ---\n{script_output.stderr[-4000:]}",
              pytrace=False)
