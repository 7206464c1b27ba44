"""Reproductions of the paper's claims at small scale (`python -m sparse_scaling.reproduce.<name>`)."""
