"""Placeholder: being written (trax 1.4.1 on jax 0.10 shims)."""


def apply():
  pass
