"""Benchmarks for issue 5: serving, round stages, hot swap and memory (see docs/benchmarks.md).

Each script runs its baseline in the same run, prints a Markdown table with the ratio, and
writes its numbers as JSON (``--out``, default ``docs/bench/<name>.json``).
"""
