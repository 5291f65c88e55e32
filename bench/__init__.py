"""Benchmarks for orgmail (issue 7): `python -m bench.run [--only ...] [--out build/bench]`.

Each module measures one thing and returns plain dicts of figures; `bench.run` collects them into
results.json and results.md. Benchmarks report; they never pass or fail a test.
"""
