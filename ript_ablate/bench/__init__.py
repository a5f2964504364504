"""Benchmarks: scripts that print measured figures (run by hand or `make bench`), never timed unit tests."""
