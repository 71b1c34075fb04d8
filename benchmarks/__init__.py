"""Benchmarks: each ``bench_*.py`` module exposes ``run(quick: bool) -> list[Result]``; ``python -m benchmarks``
runs them all side by side and writes ``benchmarks/results.md`` and ``benchmarks/results.json``."""
