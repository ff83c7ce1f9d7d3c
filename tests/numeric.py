"""Reference numerics shared by the tests."""

import numpy as np


def fd_grad(f, x, h=1e-6):
  """Central-difference gradient of ``sum(f(x))`` in float64."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (np.sum(f(x + e)) - np.sum(f(x - e))) / (2 * h)
  return g
