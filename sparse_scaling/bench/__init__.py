"""Benchmarks that print paper-shaped tables (`python -m sparse_scaling.bench.<name>`).

Each program is its measurement and its table; `common.py` holds what they share (results,
tables, child processes, gin macros, flags), `decoders.py` Table 1's models and `timing.py`
the clocks and the bandwidth probe.
"""
