"""Branchline benchmarks (not tests): ``python -m bench.core [--quick]``.

Every figure is measured when the benchmark runs; results go to
``bench/results/*.json`` and the tables in ``docs/benchmarks.md``.
"""
