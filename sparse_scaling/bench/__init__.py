"""Benchmarks: scripts that print paper-shaped tables (`python -m sparse_scaling.bench.<name>`)."""
