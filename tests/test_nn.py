"""flax.nnx heads: same call signature, correct logits and losses, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import logitlab
from logitlab.nn import DenseLogitsHead, VQLogitsHead

D, V, K = 16, 90, 6


@pytest.fixture(params=["dense", "vq", "vq_bias"])
def head(request):
  rngs = nnx.Rngs(0)
  if request.param == "dense":
    return DenseLogitsHead(D, V, use_bias=True, rngs=rngs)
  assignment = jnp.asarray(np.random.default_rng(0).integers(0, K - 1, V), jnp.int32)
  head = VQLogitsHead(D, V, K, assignment=assignment, use_token_bias=request.param == "vq_bias",
                      rngs=rngs)
  if head.token_bias is not None:
    head.token_bias[...] = jnp.linspace(-1.0, 1.0, V)
  return head


def inputs():
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.normal(size=(3, 5, D)), jnp.float32),
          jnp.asarray(rng.integers(0, V, (3, 5)), jnp.int32))


def test_logits_match_the_definition(head):
  hidden, _ = inputs()
  h = np.asarray(hidden, np.float64)
  if isinstance(head, DenseLogitsHead):
    want = h @ np.asarray(head.weight[...], np.float64).T + np.asarray(head.bias[...])
  else:
    z = h @ np.asarray(head.codebook[...], np.float64).T
    want = z[..., np.asarray(head.assignment[...])]
    if head.token_bias is not None:
      want = want + np.asarray(head.token_bias[...])
  np.testing.assert_allclose(head(hidden), want, rtol=1e-5, atol=1e-5)


def test_loss_equals_cross_entropy_of_the_logits(head):
  hidden, labels = inputs()
  options = dict(label_smoothing=0.1, z_loss=1e-3, where=labels % 4 != 0)
  np.testing.assert_allclose(head.loss(hidden, labels, **options),
                             logitlab.cross_entropy(head(hidden), labels, **options),
                             rtol=1e-5, atol=1e-5)


def test_training_step_updates_params_but_not_the_assignment(head):
  hidden, labels = inputs()
  optimizer = nnx.Optimizer(head, optax.sgd(0.5), wrt=nnx.Param)
  before = jax.tree.map(np.asarray, nnx.state(head))

  @nnx.jit
  def step(head, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(hidden, labels).mean())(head)
    optimizer.update(head, grads)
    return loss

  first = step(head, optimizer)
  assert step(head, optimizer) < first
  after = nnx.state(head)
  if isinstance(head, VQLogitsHead):
    np.testing.assert_array_equal(after["assignment"][...], before["assignment"][...])
    assert not np.allclose(after["codebook"][...], before["codebook"][...])


def test_parameter_counts_at_the_paper_scale():
  dense = nnx.eval_shape(lambda: DenseLogitsHead(2304, 256000, rngs=nnx.Rngs(0)))
  vq_head = nnx.eval_shape(lambda: VQLogitsHead(2304, 256000, 2048, use_token_bias=True,
                                                 rngs=nnx.Rngs(0)))
  assert dense.num_params == 256000 * 2304
  assert vq_head.num_params == 2048 * 2304 + 256000
  assert vq_head.num_params / dense.num_params < 0.01     # at least 99% fewer


def test_bad_construction_raises():
  with pytest.raises(ValueError, match="num_codes"):
    VQLogitsHead(D, V, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="assignment"):
    VQLogitsHead(D, V, K, assignment=jnp.zeros((V + 1,), jnp.int32), rngs=nnx.Rngs(0))
