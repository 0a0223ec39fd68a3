"""Benchmarks for issue 5: serving, round stages, hot swap and memory (see docs/benchmarks.md).

Each script runs its baseline in the same run, prints a Markdown table with the ratio, and
writes its numbers as JSON (``--out``, default ``docs/bench/<name>.json``).

Scripts: ``batching``, ``serve``, ``round``, ``swap``, ``swap_replicas``, ``memory`` (and
``gpu_model`` for ``gpu.sh``). Shared parts, one job each: ``state`` (the benchmark's store,
prompts, a candidate), ``server`` (a real ``selflm serve`` process), ``load`` (client threads,
gaps, a swap under load), ``rss`` (memory from /proc), ``reference`` (the reference article's
loops), ``report`` (numbers, tables, the JSON file).
"""
