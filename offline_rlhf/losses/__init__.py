"""Losses as pure functions of tensors: per-example losses and per-example metrics.

They import only torch, take no model, config or accelerator, and cite the equations
they implement. The training loop sums per-example losses over a global batch.
"""
