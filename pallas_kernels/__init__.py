"""Pallas kernels for logitlab's memory-critical paths.

Layout contract: one sub-package per op (e.g. ``pallas_kernels/linear_cross_entropy/``),
one module per backend (``tpu.py``, ``gpu.py``), plain JAX + Pallas only and no
``logitlab`` imports, so each kernel can be read, tested and cross-lowered on its
own. ``logitlab`` dispatches to them through each op's ``impl=`` argument; every
op also has a plain-XLA implementation in ``logitlab`` that runs anywhere.
"""
