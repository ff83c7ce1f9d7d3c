"""Multi-device tests of the fused linear cross-entropy on 8 fake CPU devices.

The device count of the CPU backend is fixed when jax initializes, so the
checks run in a fresh interpreter with ``XLA_FLAGS`` set before jax is imported.
The script computes a single-device result first and raises on any mismatch
with the sharded runs: jit with ``NamedSharding`` (token axis over ``"data"``,
weight replicated), ``jax.shard_map`` with a per-shard loss and ``psum`` of the
weight gradient, and ``jax.pmap`` over a leading device axis.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
  import functools
  import traceback

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import logitlab

  DEVICES = 8
  assert jax.device_count() == DEVICES, jax.devices()
  N, V, D = 64, 75, 16             # 8 tokens per device; V ragged for block_vocab=32
  BLOCKS = dict(block_tokens=16, block_vocab=32)
  OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)

  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(V, D)) / np.sqrt(D), jnp.float32)
  labels = jnp.asarray(rng.integers(0, V, size=(N,)), jnp.int32)
  labels = labels.at[::7].set(-100)          # some ignored positions
  cot = jnp.asarray(rng.uniform(0.5, 2.0, size=(N,)), jnp.float32)


  def fused(h, w, y):
    return logitlab.linear_cross_entropy(h, w, y, ignore_index=-100, **OPTIONS, **BLOCKS)


  def materialized(h, w, y):
    return logitlab.cross_entropy(h @ w.T, y, ignore_index=-100, **OPTIONS)


  def loss_and_grads(loss_fn, h, w, y, c):
    # (per-token loss, (d_hidden, d_weight)) of sum(c * loss).
    def objective(h, w):
      loss = loss_fn(h, w, y)
      return jnp.sum(loss * c), loss
    (_, loss), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, w)
    return loss, grads


  def check(name, got, want, rtol=1e-5):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), name
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
      g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
      assert g.shape == w.shape, (name, i, g.shape, w.shape)
      assert np.all(np.isfinite(g)), (name, i)
      scale = max(float(np.max(np.abs(w))), 1e-30)
      np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale,
                                 err_msg=f"{name}: leaf {i}")
    print("ok", name)


  single = {name: jax.jit(functools.partial(loss_and_grads, fn))(hidden, weight, labels, cot)
            for name, fn in [("fused", fused), ("materialized", materialized)]}
  check("fused single device vs materialized", single["fused"], single["materialized"], 1e-4)
  assert float(jnp.abs(single["fused"][0]).sum()) > 0

  mesh = Mesh(np.array(jax.devices()), ("data",))
  tokens, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data", None))


  def jit_named_sharding(name):
    # (a) jit with NamedSharding: token axis over "data", weight replicated.
    fn = {"fused": fused, "materialized": materialized}[name]
    step = jax.jit(functools.partial(loss_and_grads, fn),
                   in_shardings=(rows, replicated, tokens, tokens),
                   out_shardings=(tokens, (rows, replicated)))
    args = [jax.device_put(x, s) for x, s in
            [(hidden, rows), (weight, replicated), (labels, tokens), (cot, tokens)]]
    out = step(*args)
    assert len(out[0].sharding.device_set) == DEVICES, out[0].sharding
    assert out[0].sharding.is_equivalent_to(tokens, 1), out[0].sharding
    check(f"{name} jit NamedSharding", out, single[name])


  def shard_map_psum(check_vma):
    # (b) shard_map: per-shard loss and grads, psum of the weight gradient. With
    # check_vma (jax's default) the replicated weight is cast to varying first, so
    # that its per-shard gradient is local and the psum is explicit in both modes.
    def per_shard(h, w, y, c):
      if check_vma:
        w = jax.lax.pcast(w, "data", to="varying")
      loss, (d_hidden, d_weight) = loss_and_grads(fused, h, w, y, c)
      return loss, d_hidden, jax.lax.psum(d_weight, "data")

    step = jax.jit(jax.shard_map(
        per_shard, mesh=mesh, in_specs=(P("data", None), P(), P("data"), P("data")),
        out_specs=(P("data"), P("data", None), P()), check_vma=check_vma))
    loss, d_hidden, d_weight = step(hidden, weight, labels, cot)
    check(f"fused shard_map check_vma={check_vma}", (loss, (d_hidden, d_weight)),
          single["fused"])


  def pmap_psum():
    # (c) pmap over a leading device axis, weight broadcast, psum of the weight gradient.
    def per_device(h, w, y, c):
      loss, (d_hidden, d_weight) = loss_and_grads(fused, h, w, y, c)
      return loss, d_hidden, jax.lax.psum(d_weight, "devices")

    split = lambda x: x.reshape((DEVICES, -1) + x.shape[1:])
    loss, d_hidden, d_weight = jax.pmap(per_device, axis_name="devices",
                                        in_axes=(0, None, 0, 0))(
        split(hidden), weight, split(labels), split(cot))
    for i in range(1, DEVICES):      # every device holds the same reduced gradient
      np.testing.assert_array_equal(d_weight[i], d_weight[0])
    check("fused pmap", (loss.reshape(N), (d_hidden.reshape(N, D), d_weight[0])),
          single["fused"])


  # Run every check and report all failures together, so that one broken
  # transformation does not hide the state of the others.
  failures = []
  for name, run in [("jit NamedSharding fused", lambda: jit_named_sharding("fused")),
                    ("jit NamedSharding materialized", lambda: jit_named_sharding("materialized")),
                    ("shard_map check_vma=True", lambda: shard_map_psum(True)),
                    ("shard_map check_vma=False", lambda: shard_map_psum(False)),
                    ("pmap", pmap_psum)]:
    try:
      run()
    except Exception:
      failures.append(f"=== {name} ===\n{traceback.format_exc()}")
  if failures:
    raise SystemExit("\n".join(failures))
  print("all sharding checks passed")
""")


def test_sharded_matches_single_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
  if result.returncode != 0:
    pytest.fail(f"sharding script failed (rc={result.returncode})\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
                pytrace=False)
  assert "all sharding checks passed" in result.stdout, result.stdout
