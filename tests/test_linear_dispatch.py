"""How ``linear_cross_entropy`` picks its implementation, and the errors when it cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logitlab
from logitlab import linear

FN = "linear_cross_entropy"
F32, BF16, F16 = jnp.dtype("float32"), jnp.dtype("bfloat16"), jnp.dtype("float16")


class FakeDevice:
  def __init__(self, compute_capability=None):
    if compute_capability is not None:
      self.compute_capability = compute_capability


def on_platform(monkeypatch, platform, device=None):
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  monkeypatch.setattr(jax, "devices", lambda *a: [device or FakeDevice()])


@pytest.mark.parametrize("platform, device, dtypes, expected", [
    ("cpu", None, {F32}, "xla"),
    ("tpu", None, {BF16}, "pallas_tpu"),
    ("tpu", None, {F16, BF16}, "xla"),                 # no float16 on the TPU kernel
    ("gpu", FakeDevice("9.0"), {BF16}, "pallas_gpu"),   # H100 / H200
    ("gpu", FakeDevice("8.0"), {F16}, "pallas_gpu"),    # A100
    ("gpu", FakeDevice("7.0"), {F32}, "xla"),           # V100: no Triton kernel
    ("gpu", FakeDevice(), {F32}, "xla"),                # ROCm: no compute capability
])
def test_auto_picks_the_platform_kernel_where_it_applies(monkeypatch, platform, device, dtypes,
                                                         expected):
  on_platform(monkeypatch, platform, device)
  assert linear._resolve_impl(FN, "auto", False, dtypes) == expected


@pytest.mark.parametrize("platform, expected", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")])
def test_pallas_means_the_platform_kernel(monkeypatch, platform, expected):
  on_platform(monkeypatch, platform, FakeDevice("9.0"))
  assert linear._resolve_impl(FN, "pallas", False, {BF16}) == expected


@pytest.mark.parametrize("impl, interpret, match", [
    ("pallas", False, "impl='pallas' has no kernel for platform 'cpu'"),
    ("pallas", True, "impl='pallas' has no kernel for platform 'cpu'"),
    ("xla", True, "interpret=True applies to the Pallas implementations"),
])
def test_unsupported_choices_raise(impl, interpret, match):
  h, w, y = jnp.ones((4, 8)), jnp.ones((5, 8)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match=f"linear_cross_entropy: {match}"):
    logitlab.linear_cross_entropy(h, w, y, impl=impl, interpret=interpret)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_a_kernel_compiled_for_cpu_without_interpret_fails_clearly(impl):
  h, w, y = jnp.ones((4, 8)), jnp.ones((5, 8)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(Exception, match="interpret mode"):
    logitlab.linear_cross_entropy(h, w, y, impl=impl)


def test_interpret_must_be_a_bool():
  h, w, y = jnp.ones((4, 8)), jnp.ones((5, 8)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(TypeError, match="`interpret` must be a bool"):
    logitlab.linear_cross_entropy(h, w, y, impl="pallas_tpu", interpret=1)


def test_auto_on_cpu_runs_no_pallas_kernel():
  h, w, y = jnp.ones((4, 8)), jnp.ones((5, 8)), jnp.zeros((4,), jnp.int32)
  module = jax.jit(logitlab.linear_cross_entropy).lower(h, w, y).as_text()
  assert "stablehlo.while" in module
  assert "custom_call" not in module
  np.testing.assert_allclose(logitlab.linear_cross_entropy(h, w, y), np.log(5.0), rtol=1e-6)
