"""Fleetkeeper benchmarks (`make bench` = `.venv/bin/python -m bench`). Each figure is printed against a baseline
measured in the same run; results are recorded in docs/benchmarks.md."""
